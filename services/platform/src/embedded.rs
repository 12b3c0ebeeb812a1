//! Embedded storage on redb: one database file per service in the data directory.
//!
//! Writes go through a single writer thread that *group-commits*: it takes every write
//! waiting in its queue (up to [`MAX_BATCH`]), runs them in one transaction and pays for one
//! fsync. Each caller is answered only after that commit is durable. A write that fails must
//! not leave partial changes, so when a write of a batch fails the transaction is aborted,
//! that write is answered with its own error, and the rest of the batch runs again in one
//! transaction. Write closures are therefore `FnMut` and must be safe to run more than once
//! (they only read their captured request, never move out of it).
//!
//! Reads run on the blocking pool in their own read transaction (redb gives snapshot
//! isolation, so reads never wait for the writer).
//!
//! redb never overwrites a freed page on purpose: bytes a write replaced (an erased phone)
//! stay in the file until the page is reused. [`EmbeddedDb::rewrite`] copies the live data
//! into a fresh file and puts it in place of the old one, so nothing removed survives in it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};

/// Most writes committed together in one transaction.
pub const MAX_BATCH: usize = 512;
/// Writes that may wait for the writer before callers are slowed down.
const QUEUE_DEPTH: usize = 8192;

type Job = Box<dyn WriteJob>;

trait WriteJob: Send {
    /// Runs the write inside `txn`; `Err` means the transaction must not commit it.
    fn run(&mut self, txn: &WriteTransaction) -> Result<(), ()>;
    /// Reports the outcome after the commit (or its failure).
    fn finish(self: Box<Self>, committed: Result<(), &anyhow::Error>);
    /// Whether the caller must not be answered before the write is on disk.
    fn durable(&self) -> bool;
}

struct Pending<F, R> {
    f: F,
    outcome: Option<Result<R>>,
    reply: oneshot::Sender<Result<R>>,
    durable: bool,
}

impl<F, R> WriteJob for Pending<F, R>
where
    F: FnMut(&WriteTransaction) -> Result<R> + Send,
    R: Send,
{
    fn run(&mut self, txn: &WriteTransaction) -> Result<(), ()> {
        let outcome = (self.f)(txn);
        let failed = outcome.is_err();
        self.outcome = Some(outcome);
        if failed { Err(()) } else { Ok(()) }
    }

    fn finish(self: Box<Self>, committed: Result<(), &anyhow::Error>) {
        let outcome = match (committed, self.outcome) {
            (_, None) => Err(Error::internal(anyhow::anyhow!("write did not run"))),
            (Ok(()), Some(outcome)) => outcome,
            // A write that failed on its own reports its own error, not the commit's.
            (Err(_), Some(Err(own))) => Err(own),
            (Err(e), Some(Ok(_))) => Err(Error::internal(anyhow::anyhow!("commit failed: {e:#}"))),
        };
        // The caller may have gone away (cancelled request); the write stands regardless.
        let _ = self.reply.send(outcome);
    }

    fn durable(&self) -> bool {
        self.durable
    }
}

/// What the writer thread is asked to do.
enum Work {
    Write(Job),
    Rewrite(Rewrite),
}

/// What a rewrite runs in the new file's transaction after the copy.
type Finish = Box<dyn FnOnce(&WriteTransaction) -> Result<()> + Send>;

/// A rewrite of the file.
struct Rewrite {
    finish: Finish,
    reply: oneshot::Sender<Result<RewriteStats>>,
}

/// What a rewrite did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RewriteStats {
    pub tables: usize,
    pub rows: u64,
    /// The file's size before and after, in bytes.
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// The database readers use; the writer thread replaces it after a rewrite.
type Current = Arc<RwLock<Arc<Database>>>;

fn current(db: &Current) -> Arc<Database> {
    db.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Most point lookups a read makes on the calling thread ([`EmbeddedDb::read_keys`]).
pub const INLINE_KEYS: usize = 64;

/// A redb database with a group-committing writer.
#[derive(Clone)]
pub struct EmbeddedDb {
    db: Current,
    writes: mpsc::Sender<Work>,
}

impl std::fmt::Debug for EmbeddedDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedDb").finish_non_exhaustive()
    }
}

impl EmbeddedDb {
    /// Opens (or creates) the database file and starts its writer thread.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating data directory {}", dir.display()))?;
        }
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .with_context(|| format!("opening embedded store {}", path.display()))?;
        let db: Current = Arc::new(RwLock::new(Arc::new(db)));
        let (writes, queue) = mpsc::channel(QUEUE_DEPTH);
        let writer_db = db.clone();
        let name = format!(
            "writer-{}",
            path.file_stem().and_then(|s| s.to_str()).unwrap_or("db")
        );
        let path = path.to_path_buf();
        std::thread::Builder::new()
            .name(name)
            .spawn(move || writer_loop(&writer_db, &path, queue))
            .context("starting the store writer thread")?;
        Ok(Self { db, writes })
    }

    /// Copies every table into a fresh file and puts it in place of the old one, between
    /// two write batches (writes wait meanwhile; reads go on, on the old file until the
    /// new one is in place). `finish` runs in the new file's transaction after the copy.
    /// Tables must have string keys and byte, string, unit, integer or boolean values.
    pub async fn rewrite(
        &self,
        finish: impl FnOnce(&WriteTransaction) -> Result<()> + Send + 'static,
    ) -> Result<RewriteStats> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(Work::Rewrite(Rewrite {
                finish: Box::new(finish),
                reply,
            }))
            .await
            .map_err(|_| Error::Unavailable("the store is shutting down".into()))?;
        answer
            .await
            .map_err(|_| Error::internal(anyhow::anyhow!("store writer stopped")))?
    }

    /// Rewrites the file when a write left the mark `key` in `table` (see [`mark`]): an
    /// erasure's replaced bytes stay in freed pages until then. The mark is cleared in the
    /// copy itself, so a mark set by a write queued behind the rewrite survives it. `store`
    /// names the store in the log line. Returns whether it rewrote.
    pub async fn rewrite_if_marked(&self, table: Records, key: &str, store: &str) -> Result<bool> {
        let owned = key.to_string();
        let marked = self
            .read(move |txn| {
                let Some(t) = open_for_read(txn, table)? else {
                    return Ok(false);
                };
                Ok(t.get(owned.as_str()).map_err(storage_error)?.is_some())
            })
            .await?;
        if !marked {
            return Ok(false);
        }
        let owned = key.to_string();
        let stats = self
            .rewrite(move |txn| {
                txn.open_table(table)
                    .map_err(storage_error)?
                    .remove(owned.as_str())
                    .map_err(storage_error)?;
                Ok(())
            })
            .await?;
        tracing::info!(
            tables = stats.tables,
            rows = stats.rows,
            bytes_before = stats.bytes_before,
            bytes_after = stats.bytes_after,
            "{store}'s store rewritten: nothing erased remains in it"
        );
        Ok(true)
    }

    /// Runs `f` in a write transaction and returns once its effects are durable.
    pub async fn write<R, F>(&self, f: F) -> Result<R>
    where
        F: FnMut(&WriteTransaction) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.submit(f).await?.await
    }

    /// Runs `f` in a write transaction and returns once it is committed and visible, but
    /// maybe not yet on disk: it becomes durable with the next durable commit, and a crash
    /// before that loses it. For bookkeeping whose loss only repeats work (an event log's
    /// delivery marks), never for anything acknowledged as stored.
    pub async fn write_lazily<R, F>(&self, f: F) -> Result<R>
    where
        F: FnMut(&WriteTransaction) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.queue(f, false).await?.await
    }

    /// Queues `f` for the writer and returns once it is queued; the returned future
    /// resolves once its effects are durable. Writes run in the order they were queued, so
    /// a caller can keep order without waiting for each commit.
    pub async fn submit<R, F>(
        &self,
        f: F,
    ) -> Result<impl std::future::Future<Output = Result<R>> + Send + 'static>
    where
        F: FnMut(&WriteTransaction) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        self.queue(f, true).await
    }

    async fn queue<R, F>(
        &self,
        f: F,
        durable: bool,
    ) -> Result<impl std::future::Future<Output = Result<R>> + Send + 'static>
    where
        F: FnMut(&WriteTransaction) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(Pending {
            f,
            outcome: None,
            reply,
            durable,
        });
        self.writes
            .send(Work::Write(job))
            .await
            .map_err(|_| Error::Unavailable("the store is shutting down".into()))?;
        Ok(async move {
            answer
                .await
                .map_err(|_| Error::internal(anyhow::anyhow!("store writer stopped")))?
        })
    }

    /// Runs `f` in a read transaction on the calling thread: for point reads of a few keys
    /// (the POS path's lookups), whose pages are almost always in the cache. Handing such a
    /// read to the blocking pool, as [`Self::read`] does, costs more than the read: two
    /// thread wake-ups, which took half the CPU of a card lookup. A read that walks a range
    /// goes through [`Self::read`].
    pub fn get<R>(&self, f: impl FnOnce(&ReadTransaction) -> Result<R>) -> Result<R> {
        let db = current(&self.db);
        let txn = db.begin_read().map_err(Error::internal)?;
        f(&txn)
    }

    /// Runs `f`, a read of `keys` point lookups, with [`Self::get`] when they are at most
    /// [`INLINE_KEYS`], with [`Self::read`] otherwise.
    pub async fn read_keys<R, F>(&self, keys: usize, f: F) -> Result<R>
    where
        F: FnOnce(&ReadTransaction) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        if keys <= INLINE_KEYS {
            self.get(f)
        } else {
            self.read(f).await
        }
    }

    /// Runs `f` in a read transaction on the blocking pool.
    pub async fn read<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&ReadTransaction) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let db = current(&self.db);
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(Error::internal)?;
            f(&txn)
        })
        .await
        .map_err(Error::internal)?
    }

    /// A cheap end-to-end check that the store answers and its writer is alive, for health.
    pub async fn ping(&self) -> Result<()> {
        if self.writes.is_closed() {
            return Err(Error::Unavailable("the store writer has stopped".into()));
        }
        self.read(|_| Ok(())).await
    }
}

fn writer_loop(db: &Current, path: &Path, mut queue: mpsc::Receiver<Work>) {
    let store = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("db")
        .to_string();
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.blocking_recv() {
        let mut rewrite = None;
        match first {
            Work::Write(job) => batch.push(job),
            Work::Rewrite(r) => rewrite = Some(r),
        }
        while rewrite.is_none() && batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(Work::Write(job)) => batch.push(job),
                Ok(Work::Rewrite(r)) => rewrite = Some(r),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            // Looked up per batch: the store may open before the metrics recorder is set.
            metrics::counter!("loyalty_store_commits_total", "store" => store.clone()).increment(1);
            metrics::counter!("loyalty_store_writes_total", "store" => store.clone())
                .increment(batch.len() as u64);
            commit_batch(&current(db), &mut batch);
        }
        if let Some(Rewrite { finish, reply }) = rewrite {
            let outcome = rewrite_file(db, path, finish).map_err(|e| {
                tracing::error!(error = %format!("{e:#}"), file = %path.display(), "rewriting the embedded store failed; the old file stays");
                Error::internal(e)
            });
            let _ = reply.send(outcome);
        }
    }
}

/// Copies `db` into a new file beside `path`, renames it over `path` and makes it current.
fn rewrite_file(db: &Current, path: &Path, finish: Finish) -> anyhow::Result<RewriteStats> {
    let old = current(db);
    let fresh_path: PathBuf = path.with_extension("redb.rewrite");
    let _ = std::fs::remove_file(&fresh_path);
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mut stats = RewriteStats {
        bytes_before: size(path),
        ..RewriteStats::default()
    };
    let fresh = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(&fresh_path)
        .with_context(|| format!("creating {}", fresh_path.display()))?;
    {
        let from = old.begin_read().context("reading the old file")?;
        let to = fresh.begin_write().context("writing the new file")?;
        for handle in from.list_tables().context("listing tables")? {
            let name = redb::TableHandle::name(&handle).to_string();
            stats.rows +=
                copy_table(&from, &to, &name).with_context(|| format!("copying table {name}"))?;
            stats.tables += 1;
        }
        anyhow::ensure!(
            from.list_multimap_tables()
                .context("listing multimap tables")?
                .next()
                .is_none(),
            "multimap tables are not copied"
        );
        finish(&to).map_err(|e| anyhow::anyhow!("{e}"))?;
        to.commit().context("committing the new file")?;
    }
    std::fs::rename(&fresh_path, path).with_context(|| {
        format!(
            "putting {} in place of {}",
            fresh_path.display(),
            path.display()
        )
    })?;
    if let Some(dir) = path.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    *db.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(fresh);
    stats.bytes_after = size(path);
    Ok(stats)
}

/// Copies one table, whichever of the value types it has; the number of rows.
fn copy_table(from: &ReadTransaction, to: &WriteTransaction, name: &str) -> anyhow::Result<u64> {
    fn copy<V: redb::Value + 'static>(
        from: &ReadTransaction,
        to: &WriteTransaction,
        name: &str,
    ) -> Option<anyhow::Result<u64>> {
        let definition = TableDefinition::<&str, V>::new(name);
        let source = match from.open_table(definition) {
            Ok(t) => t,
            Err(redb::TableError::TableTypeMismatch { .. }) => return None,
            Err(e) => return Some(Err(e.into())),
        };
        let run = || -> anyhow::Result<u64> {
            let mut target = to.open_table(definition)?;
            let mut rows = 0;
            for row in source.iter()? {
                let (k, v) = row?;
                target.insert(k.value(), v.value())?;
                rows += 1;
            }
            Ok(rows)
        };
        Some(run())
    }
    copy::<&[u8]>(from, to, name)
        .or_else(|| copy::<&str>(from, to, name))
        .or_else(|| copy::<()>(from, to, name))
        .or_else(|| copy::<u64>(from, to, name))
        .or_else(|| copy::<i64>(from, to, name))
        .or_else(|| copy::<bool>(from, to, name))
        .unwrap_or_else(|| {
            anyhow::bail!("table {name} has a key or value type a rewrite does not copy")
        })
}

fn commit_batch(db: &Database, batch: &mut Vec<Job>) {
    loop {
        match run_in_one_transaction(db, batch) {
            Ok(None) => return finish_all(batch, Ok(())),
            Ok(Some(failed)) => {
                // That write's own error stands: it saw exactly the writes queued before it,
                // which the next attempt replays in the same order. Drop it and commit the
                // rest together, so a failing write never costs the others an fsync each.
                let job = batch.remove(failed);
                job.finish(Ok(()));
                if batch.is_empty() {
                    return;
                }
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "embedded store commit failed");
                return finish_all(batch, Err(&e));
            }
        }
    }
}

/// Runs the jobs in one transaction. `Ok(None)`: committed. `Ok(Some(i))`: job `i` failed
/// (or panicked) and the transaction was aborted.
fn run_in_one_transaction(db: &Database, jobs: &mut [Job]) -> anyhow::Result<Option<usize>> {
    let mut txn = db.begin_write().context("beginning a write transaction")?;
    if !jobs.iter().any(|j| j.durable()) {
        txn.set_durability(redb::Durability::None)
            .context("setting a lazy commit")?;
    }
    for (i, job) in jobs.iter_mut().enumerate() {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run(&txn)));
        if !matches!(outcome, Ok(Ok(()))) {
            if outcome.is_err() {
                tracing::error!("a store write panicked; it is refused and the others go on");
            }
            txn.abort().context("aborting a write transaction")?;
            return Ok(Some(i));
        }
    }
    txn.commit().context("committing a write transaction")?;
    Ok(None)
}

fn finish_all(batch: &mut Vec<Job>, committed: Result<(), &anyhow::Error>) {
    for job in batch.drain(..) {
        job.finish(committed);
    }
}

/// Builds a composite key from parts. Parts never contain NUL (ids are validated to exclude
/// control characters), so NUL separates them unambiguously and keeps prefix order.
pub fn key(parts: &[&str]) -> String {
    parts.join("\u{0}")
}

/// The half-open range of keys that start with `parts` followed by a separator.
pub fn prefix_range(parts: &[&str]) -> (String, String) {
    let mut start = key(parts);
    start.push('\u{0}');
    let mut end = key(parts);
    end.push('\u{1}');
    (start, end)
}

/// A table of encoded records under composite string keys.
pub type Records = TableDefinition<'static, &'static str, &'static [u8]>;

/// Sets the mark `key` in `table`, in the transaction of the write that calls for it (for
/// [`EmbeddedDb::rewrite_if_marked`]).
pub fn mark(txn: &WriteTransaction, table: Records, key: &str) -> Result<()> {
    txn.open_table(table)
        .map_err(storage_error)?
        .insert(key, &[][..])
        .map_err(storage_error)?;
    Ok(())
}

/// Maps a storage-engine error to an internal error.
pub fn storage_error(err: impl Into<anyhow::Error>) -> Error {
    Error::internal(err)
}

/// Reads and decodes one record from an open table.
pub fn get_record<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>> {
    table
        .get(key)
        .map_err(storage_error)?
        .map(|v| decode(v.value()))
        .transpose()
}

/// Reads one record in a read transaction; a table never written to reads as empty.
pub fn read_record<T: serde::de::DeserializeOwned>(
    txn: &ReadTransaction,
    table: Records,
    key: &str,
) -> Result<Option<T>> {
    match txn.open_table(table) {
        Ok(t) => get_record(&t, key),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(storage_error(e)),
    }
}

/// Opens a table for reading; `None` when it was never written to.
pub fn open_for_read<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    table: TableDefinition<'static, K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>> {
    match txn.open_table(table) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(storage_error(e)),
    }
}

/// Records of a table in key order after `after` (from the start when None), at most
/// `limit`: for walking a whole table a page at a time.
pub fn records_after<T: serde::de::DeserializeOwned>(
    txn: &ReadTransaction,
    table: Records,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<T>> {
    let Some(t) = open_for_read(txn, table)? else {
        return Ok(Vec::new());
    };
    let rows = match after {
        Some(a) => t
            .range::<&str>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
            .map_err(storage_error)?,
        None => t.range::<&str>(..).map_err(storage_error)?,
    };
    let mut out = Vec::new();
    for row in rows.take(limit) {
        let (_, v) = row.map_err(storage_error)?;
        out.push(decode(v.value())?);
    }
    Ok(out)
}

/// One stored row, for copying a store elsewhere: its key split into its parts, and its
/// value as bytes (a record's encoding, an index entry's text, nothing for a set's entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub key: Vec<String>,
    pub value: Vec<u8>,
}

/// A digest of rows (their keys and values, in the order added): tells whether a store
/// still holds what it held, e.g. when a copy cut short is run again.
#[derive(Default)]
pub struct RowDigest(sha2::Sha256);

impl std::fmt::Debug for RowDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RowDigest")
    }
}

impl RowDigest {
    pub fn add(&mut self, row: &Row) {
        use sha2::Digest;
        for part in &row.key {
            self.0.update((part.len() as u64).to_le_bytes());
            self.0.update(part.as_bytes());
        }
        self.0.update([0xff]);
        self.0.update((row.value.len() as u64).to_le_bytes());
        self.0.update(&row.value);
    }

    pub fn finish(self) -> String {
        use sha2::Digest;
        self.0
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The digest ([`RowDigest`]) of every row of `tables`, read a page at a time with `page`
/// (table, the last key of the page before, page size).
pub async fn digest_of_tables<T, F, Fut>(tables: &[T], mut page: F) -> Result<String>
where
    T: Copy,
    F: FnMut(T, Option<String>, usize) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<Row>, Option<String>)>>,
{
    const PAGE: usize = 1000;
    let mut digest = RowDigest::default();
    for table in tables {
        let mut after = None;
        loop {
            let (rows, last) = page(*table, after, PAGE).await?;
            rows.iter().for_each(|r| digest.add(r));
            match last {
                Some(l) if rows.len() == PAGE => after = Some(l),
                _ => break,
            }
        }
    }
    Ok(digest.finish())
}

/// Up to `limit` rows of `table` in key order after the key `after` (from the start when
/// None), each value turned into bytes by `value`; and the last key read.
pub fn rows_after<V: redb::Value + 'static>(
    txn: &ReadTransaction,
    table: TableDefinition<'static, &'static str, V>,
    after: Option<&str>,
    limit: usize,
    value: impl Fn(V::SelfType<'_>) -> Vec<u8>,
) -> Result<(Vec<Row>, Option<String>)> {
    let Some(t) = open_for_read(txn, table)? else {
        return Ok((Vec::new(), None));
    };
    let range = match after {
        Some(a) => t.range::<&str>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
        None => t.range::<&str>(..),
    }
    .map_err(storage_error)?;
    let mut out = Vec::new();
    let mut last = None;
    for item in range.take(limit) {
        let (k, v) = item.map_err(storage_error)?;
        let k = k.value();
        out.push(Row {
            key: k.split('\u{0}').map(str::to_string).collect(),
            value: value(v.value()),
        });
        last = Some(k.to_string());
    }
    Ok((out, last))
}

/// Encodes `value` and stores it under `key`.
pub fn put_record<T: serde::Serialize>(
    table: &mut redb::Table<'_, &'static str, &'static [u8]>,
    key: &str,
    value: &T,
) -> Result<()> {
    let bytes = encode(value)?;
    table.insert(key, bytes.as_slice()).map_err(storage_error)?;
    Ok(())
}

/// Encodes a stored record.
pub fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(Error::internal)
}

/// Decodes a stored record.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(Error::internal)
}

/// Reads a field added at the end of a stored record (`#[serde(deserialize_with =
/// "added_last")]`): a record written before the field existed ends where the field would
/// start, and reads as the default. Records are encoded with postcard, which is not
/// self-describing, so a field can only be added this way: last in a record that is last
/// in its encoding.
pub fn added_last<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de> + Default,
{
    Ok(T::deserialize(d).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use redb::ReadableTableMetadata;

    use super::*;

    const T: TableDefinition<&str, u64> = TableDefinition::new("t");

    fn open() -> (tempfile::TempDir, EmbeddedDb) {
        let dir = tempfile::tempdir().unwrap();
        let db = EmbeddedDb::open(&dir.path().join("x.redb")).unwrap();
        (dir, db)
    }

    #[tokio::test]
    async fn a_rewrite_keeps_every_row_and_nothing_removed() {
        const BYTES: Records = TableDefinition::new("bytes");
        const TEXT: TableDefinition<&str, &str> = TableDefinition::new("text");
        const UNIT: TableDefinition<&str, ()> = TableDefinition::new("unit");
        const FLAGS: TableDefinition<&str, bool> = TableDefinition::new("flags");
        const SIGNED: TableDefinition<&str, i64> = TableDefinition::new("signed");
        const SECRET: &str = "phone-+77015550199-of-an-erased-member";
        let (dir, db) = open();
        let path = dir.path().join("x.redb");
        db.write(|txn| {
            let mut b = txn.open_table(BYTES).map_err(storage_error)?;
            b.insert("kept", &b"kept-value"[..])
                .map_err(storage_error)?;
            b.insert("gone", SECRET.as_bytes()).map_err(storage_error)?;
            txn.open_table(TEXT)
                .map_err(storage_error)?
                .insert("a", SECRET)
                .map_err(storage_error)?;
            txn.open_table(UNIT)
                .map_err(storage_error)?
                .insert("u", ())
                .map_err(storage_error)?;
            txn.open_table(T)
                .map_err(storage_error)?
                .insert("n", 7)
                .map_err(storage_error)?;
            txn.open_table(FLAGS)
                .map_err(storage_error)?
                .insert("f", true)
                .map_err(storage_error)?;
            txn.open_table(SIGNED)
                .map_err(storage_error)?
                .insert("s", -3)
                .map_err(storage_error)?;
            Ok(())
        })
        .await
        .unwrap();
        db.write(|txn| {
            txn.open_table(BYTES)
                .map_err(storage_error)?
                .remove("gone")
                .map_err(storage_error)?;
            txn.open_table(TEXT)
                .map_err(storage_error)?
                .insert("a", "overwritten")
                .map_err(storage_error)?;
            Ok(())
        })
        .await
        .unwrap();
        let contains = |p: &Path| {
            let bytes = std::fs::read(p).unwrap();
            bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes())
        };
        // The freed pages still hold the removed bytes.
        assert!(contains(&path));

        let stats = db
            .rewrite(|txn| {
                txn.open_table(UNIT)
                    .map_err(storage_error)?
                    .insert("finished", ())
                    .map_err(storage_error)?;
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(stats.tables, 6);
        assert_eq!(stats.rows, 6);
        assert!(
            !contains(&path),
            "the rewritten file holds no removed bytes"
        );
        assert!(!path.with_extension("redb.rewrite").exists());
        // Reads and writes go on against the new file, and survive a reopen.
        let read = db
            .read(|txn| {
                let b = txn.open_table(BYTES).map_err(storage_error)?;
                let t = txn.open_table(TEXT).map_err(storage_error)?;
                let u = txn.open_table(UNIT).map_err(storage_error)?;
                let f = txn.open_table(FLAGS).map_err(storage_error)?;
                let s = txn.open_table(SIGNED).map_err(storage_error)?;
                Ok((
                    f.get("f").map_err(storage_error)?.map(|v| v.value()),
                    s.get("s").map_err(storage_error)?.map(|v| v.value()),
                    b.get("kept")
                        .map_err(storage_error)?
                        .map(|v| v.value().to_vec()),
                    b.get("gone").map_err(storage_error)?.is_some(),
                    t.get("a")
                        .map_err(storage_error)?
                        .map(|v| v.value().to_string()),
                    u.len().map_err(storage_error)?,
                ))
            })
            .await
            .unwrap();
        assert_eq!(
            read,
            (
                Some(true),
                Some(-3),
                Some(b"kept-value".to_vec()),
                false,
                Some("overwritten".to_string()),
                2
            )
        );
        db.write(|txn| {
            txn.open_table(T)
                .map_err(storage_error)?
                .insert("after", 8)
                .map_err(storage_error)?;
            Ok(())
        })
        .await
        .unwrap();
        drop(db);
        // The writer thread lets go of the file when its queue closes.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let again = EmbeddedDb::open(&path).unwrap();
        let n = again
            .read(|txn| {
                let t = txn.open_table(T).map_err(storage_error)?;
                Ok((
                    t.get("n").map_err(storage_error)?.map(|v| v.value()),
                    t.get("after").map_err(storage_error)?.map(|v| v.value()),
                ))
            })
            .await
            .unwrap();
        assert_eq!(n, (Some(7), Some(8)));
    }

    async fn get(db: &EmbeddedDb, k: &'static str) -> Option<u64> {
        db.read(move |txn| {
            let Ok(t) = txn.open_table(T) else {
                return Ok(None);
            };
            Ok(t.get(k).map_err(Error::internal)?.map(|v| v.value()))
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_failing_write_leaves_nothing_and_does_not_sink_its_batch() {
        let (_dir, db) = open();
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                db.write(move |txn| {
                    let mut t = txn.open_table(T).map_err(Error::internal)?;
                    let k = format!("k{i}");
                    t.insert(k.as_str(), i).map_err(Error::internal)?;
                    if i % 10 == 0 {
                        return Err(Error::FailedPrecondition(format!("refuse {i}")));
                    }
                    Ok(i)
                })
                .await
            }));
        }
        let mut ok = 0;
        for (i, task) in tasks.into_iter().enumerate() {
            match task.await.unwrap() {
                Ok(v) => {
                    assert_eq!(v, i as u64);
                    ok += 1;
                }
                Err(Error::FailedPrecondition(msg)) => assert_eq!(msg, format!("refuse {i}")),
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(ok, 180);
        let count = db
            .read(|txn| {
                txn.open_table(T)
                    .map_err(Error::internal)?
                    .len()
                    .map_err(Error::internal)
            })
            .await
            .unwrap();
        assert_eq!(count, 180, "failed writes must leave nothing behind");
        assert_eq!(get(&db, "k10").await, None);
        assert_eq!(get(&db, "k11").await, Some(11));
    }

    #[tokio::test]
    async fn a_panicking_write_is_refused_and_the_writer_lives_on() {
        let (_dir, db) = open();
        let bad = db.clone();
        let panicked = tokio::spawn(async move {
            bad.write(|_txn| -> Result<()> { panic!("bug in a write") })
                .await
        });
        let good = db.write(|txn| {
            txn.open_table(T)
                .map_err(Error::internal)?
                .insert("after", 1)
                .map_err(Error::internal)?;
            Ok(())
        });
        assert!(matches!(panicked.await.unwrap(), Err(Error::Internal(_))));
        good.await.unwrap();
        db.ping().await.unwrap();
        assert_eq!(get(&db, "after").await, Some(1));
    }

    #[tokio::test]
    async fn writes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.redb");
        {
            let db = EmbeddedDb::open(&path).unwrap();
            db.write(|txn| {
                txn.open_table(T)
                    .map_err(Error::internal)?
                    .insert("a", 7)
                    .map_err(Error::internal)?;
                Ok(())
            })
            .await
            .unwrap();
        }
        // The writer thread of the first handle exits once its queue closes; redb allows a
        // single open handle per file, so wait for it to let go.
        let mut reopened = EmbeddedDb::open(&path);
        for _ in 0..500 {
            if reopened.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            reopened = EmbeddedDb::open(&path);
        }
        let db = reopened.unwrap();
        assert_eq!(get(&db, "a").await, Some(7));
    }

    #[test]
    fn prefix_range_covers_exactly_the_prefix() {
        let (start, end) = prefix_range(&["t1"]);
        assert!(key(&["t1", "a"]) > start && key(&["t1", "a"]) < end);
        assert!(key(&["t10", "a"]) > end);
        assert!(key(&["t"]) < start);
    }
}
