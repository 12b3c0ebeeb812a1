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

use std::path::Path;
use std::sync::Arc;

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

/// A redb database with a group-committing writer.
#[derive(Clone)]
pub struct EmbeddedDb {
    db: Arc<Database>,
    writes: mpsc::Sender<Job>,
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
            .set_cache_size(64 * 1024 * 1024)
            .create(path)
            .with_context(|| format!("opening embedded store {}", path.display()))?;
        let db = Arc::new(db);
        let (writes, queue) = mpsc::channel(QUEUE_DEPTH);
        let writer_db = db.clone();
        let name = format!(
            "writer-{}",
            path.file_stem().and_then(|s| s.to_str()).unwrap_or("db")
        );
        std::thread::Builder::new()
            .name(name)
            .spawn(move || writer_loop(&writer_db, queue))
            .context("starting the store writer thread")?;
        Ok(Self { db, writes })
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
            .send(job)
            .await
            .map_err(|_| Error::Unavailable("the store is shutting down".into()))?;
        Ok(async move {
            answer
                .await
                .map_err(|_| Error::internal(anyhow::anyhow!("store writer stopped")))?
        })
    }

    /// Runs `f` in a read transaction on the blocking pool.
    pub async fn read<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&ReadTransaction) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let db = self.db.clone();
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

fn writer_loop(db: &Database, mut queue: mpsc::Receiver<Job>) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        commit_batch(db, &mut batch);
    }
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
