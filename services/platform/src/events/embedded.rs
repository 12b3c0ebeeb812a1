//! The event log in a redb file (dev mode): durable, with the same group semantics as Redis
//! Streams. Appends and reads go through the store's group-committing writer, so many
//! producers share one fsync.
//!
//! Entries a group has acknowledged are trimmed once every group of the stream has; a stream
//! keeps at most [`MAX_RETAINED`] entries whatever its groups do (the oldest go first), the
//! same bound the Redis log applies with `MAXLEN`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use redb::{ReadableTable, TableDefinition};
use tokio::sync::Notify;

use super::{Delivery, EventLog, Lag, MAX_READ, check_payloads};
use crate::clock::{Clock, SystemClock};
use crate::embedded::{EmbeddedDb, storage_error};
use crate::error::{Error, Result};

/// Most entries a stream keeps.
pub const MAX_RETAINED: u64 = 5_000_000;

/// (stream, seq) → payload.
const ENTRIES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("entries");
/// stream → last assigned seq.
const HEADS: TableDefinition<&str, u64> = TableDefinition::new("heads");
/// (stream, group) → last delivered seq.
const GROUPS: TableDefinition<(&str, &str), u64> = TableDefinition::new("groups");
/// (stream, group, seq) → (consumer, delivered at in ms).
const PENDING: TableDefinition<(&str, &str, u64), (&str, i64)> = TableDefinition::new("pending");

#[derive(Clone)]
pub struct EmbeddedEventLog {
    db: EmbeddedDb,
    appended: Arc<Notify>,
}

impl std::fmt::Debug for EmbeddedEventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedEventLog").finish_non_exhaustive()
    }
}

fn id_of(seq: u64) -> String {
    format!("{seq:020}")
}

fn seq_of(id: &str) -> Result<u64> {
    id.parse()
        .map_err(|_| Error::invalid("ids", format!("{id:?} is not an entry id of this log")))
}

fn now_ms() -> i64 {
    SystemClock.now_ms()
}

impl EmbeddedEventLog {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            db: EmbeddedDb::open(path)?,
            appended: Arc::new(Notify::new()),
        })
    }

    async fn try_read(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        max: usize,
    ) -> Result<Vec<Delivery>> {
        let (stream, group, consumer) = (stream.to_owned(), group.to_owned(), consumer.to_owned());
        // Delivery marks need not be on disk: after a crash they are gone and the entries
        // are delivered again, which at-least-once allows.
        self.db
            .write_lazily(move |txn| {
                let mut groups = txn.open_table(GROUPS).map_err(storage_error)?;
                let Some(last) = groups
                    .get((stream.as_str(), group.as_str()))
                    .map_err(storage_error)?
                    .map(|v| v.value())
                else {
                    return Err(Error::NotFound(format!(
                        "no group {group:?} on stream {stream:?}"
                    )));
                };
                let entries = txn.open_table(ENTRIES).map_err(storage_error)?;
                let mut pending = txn.open_table(PENDING).map_err(storage_error)?;
                let mut out = Vec::new();
                let now = now_ms();
                let mut newest = last;
                for item in entries
                    .range((stream.as_str(), last + 1)..=(stream.as_str(), u64::MAX))
                    .map_err(storage_error)?
                    .take(max)
                {
                    let (k, v) = item.map_err(storage_error)?;
                    let seq = k.value().1;
                    pending
                        .insert(
                            (stream.as_str(), group.as_str(), seq),
                            (consumer.as_str(), now),
                        )
                        .map_err(storage_error)?;
                    out.push(Delivery {
                        id: id_of(seq),
                        payload: v.value().to_vec(),
                    });
                    newest = seq;
                }
                if newest != last {
                    groups
                        .insert((stream.as_str(), group.as_str()), newest)
                        .map_err(storage_error)?;
                }
                Ok(out)
            })
            .await
    }
}

#[async_trait::async_trait]
impl EventLog for EmbeddedEventLog {
    async fn append(&self, stream: &str, payloads: &[Vec<u8>]) -> Result<()> {
        check_payloads(payloads)?;
        if payloads.is_empty() {
            return Ok(());
        }
        let stream = stream.to_owned();
        let payloads = payloads.to_vec();
        self.db
            .write(move |txn| {
                let mut heads = txn.open_table(HEADS).map_err(storage_error)?;
                let mut entries = txn.open_table(ENTRIES).map_err(storage_error)?;
                let mut head = heads
                    .get(stream.as_str())
                    .map_err(storage_error)?
                    .map_or(0, |v| v.value());
                for p in &payloads {
                    head += 1;
                    entries
                        .insert((stream.as_str(), head), p.as_slice())
                        .map_err(storage_error)?;
                }
                heads.insert(stream.as_str(), head).map_err(storage_error)?;
                if head > MAX_RETAINED {
                    let floor = head - MAX_RETAINED;
                    entries
                        .retain_in((stream.as_str(), 0)..=(stream.as_str(), floor), |_, _| {
                            false
                        })
                        .map_err(storage_error)?;
                }
                Ok(())
            })
            .await?;
        self.appended.notify_waiters();
        Ok(())
    }

    async fn create_group(&self, stream: &str, group: &str) -> Result<()> {
        let (stream, group) = (stream.to_owned(), group.to_owned());
        self.db
            .write(move |txn| {
                let mut groups = txn.open_table(GROUPS).map_err(storage_error)?;
                if groups
                    .get((stream.as_str(), group.as_str()))
                    .map_err(storage_error)?
                    .is_none()
                {
                    // Start before the oldest retained entry.
                    let entries = txn.open_table(ENTRIES).map_err(storage_error)?;
                    let first = entries
                        .range((stream.as_str(), 0)..=(stream.as_str(), u64::MAX))
                        .map_err(storage_error)?
                        .next()
                        .transpose()
                        .map_err(storage_error)?
                        .map_or(0, |(k, _)| k.value().1.saturating_sub(1));
                    groups
                        .insert((stream.as_str(), group.as_str()), first)
                        .map_err(storage_error)?;
                }
                Ok(())
            })
            .await
    }

    async fn read(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>> {
        let max = max.clamp(1, MAX_READ);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so an append in between still wakes us.
            let appended = self.appended.notified();
            let out = self.try_read(stream, group, consumer, max).await?;
            if !out.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(out);
            }
            if tokio::time::timeout_at(deadline, appended).await.is_err() {
                return self.try_read(stream, group, consumer, max).await;
            }
        }
    }

    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<()> {
        let seqs = ids
            .iter()
            .map(|id| seq_of(id))
            .collect::<Result<Vec<_>>>()?;
        let (stream, group) = (stream.to_owned(), group.to_owned());
        // A lost acknowledgement only means a redelivery.
        self.db
            .write_lazily(move |txn| {
                let mut pending = txn.open_table(PENDING).map_err(storage_error)?;
                for seq in &seqs {
                    pending
                        .remove((stream.as_str(), group.as_str(), *seq))
                        .map_err(storage_error)?;
                }
                // Trim what every group of the stream is done with.
                let groups = txn.open_table(GROUPS).map_err(storage_error)?;
                let mut floor = u64::MAX;
                for item in groups
                    .range((stream.as_str(), "")..)
                    .map_err(storage_error)?
                {
                    let (k, v) = item.map_err(storage_error)?;
                    let (s, g) = k.value();
                    if s != stream {
                        break;
                    }
                    let oldest_pending = pending
                        .range((s, g, 0)..=(s, g, u64::MAX))
                        .map_err(storage_error)?
                        .next()
                        .transpose()
                        .map_err(storage_error)?
                        .map(|(k, _)| k.value().2);
                    let done_below = oldest_pending.unwrap_or(v.value().saturating_add(1));
                    floor = floor.min(done_below);
                }
                if floor != u64::MAX && floor > 0 {
                    let mut entries = txn.open_table(ENTRIES).map_err(storage_error)?;
                    entries
                        .retain_in((stream.as_str(), 0)..(stream.as_str(), floor), |_, _| false)
                        .map_err(storage_error)?;
                }
                Ok(())
            })
            .await
    }

    async fn claim(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        max: usize,
    ) -> Result<Vec<Delivery>> {
        let max = max.clamp(1, MAX_READ);
        let min_idle = i64::try_from(min_idle.as_millis()).unwrap_or(i64::MAX);
        let (stream, group, consumer) = (stream.to_owned(), group.to_owned(), consumer.to_owned());
        self.db
            .write_lazily(move |txn| {
                let mut pending = txn.open_table(PENDING).map_err(storage_error)?;
                let entries = txn.open_table(ENTRIES).map_err(storage_error)?;
                let now = now_ms();
                let (s, g) = (stream.as_str(), group.as_str());
                let mut stale = Vec::new();
                for item in pending
                    .range((s, g, 0)..=(s, g, u64::MAX))
                    .map_err(storage_error)?
                {
                    let (k, v) = item.map_err(storage_error)?;
                    let (_, at) = v.value();
                    if now.saturating_sub(at) >= min_idle {
                        stale.push(k.value().2);
                        if stale.len() >= max {
                            break;
                        }
                    }
                }
                let mut out = Vec::new();
                for seq in stale {
                    let payload = entries
                        .get((s, seq))
                        .map_err(storage_error)?
                        .map(|v| v.value().to_vec());
                    match payload {
                        Some(payload) => {
                            pending
                                .insert((s, g, seq), (consumer.as_str(), now))
                                .map_err(storage_error)?;
                            out.push(Delivery {
                                id: id_of(seq),
                                payload,
                            });
                        }
                        // Trimmed by the retention bound: nothing left to deliver.
                        None => {
                            pending.remove((s, g, seq)).map_err(storage_error)?;
                        }
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn lag(&self, stream: &str, group: &str) -> Result<Lag> {
        let (stream, group) = (stream.to_owned(), group.to_owned());
        self.db
            .read(move |txn| {
                let (s, g) = (stream.as_str(), group.as_str());
                let head = match txn.open_table(HEADS) {
                    Ok(t) => t.get(s).map_err(storage_error)?.map_or(0, |v| v.value()),
                    Err(redb::TableError::TableDoesNotExist(_)) => 0,
                    Err(e) => return Err(storage_error(e)),
                };
                let last = match txn.open_table(GROUPS) {
                    Ok(t) => t.get((s, g)).map_err(storage_error)?.map(|v| v.value()),
                    Err(redb::TableError::TableDoesNotExist(_)) => None,
                    Err(e) => return Err(storage_error(e)),
                };
                let Some(last) = last else {
                    return Err(Error::NotFound(format!("no group {g:?} on stream {s:?}")));
                };
                let pending = match txn.open_table(PENDING) {
                    Ok(t) => t
                        .range((s, g, 0)..=(s, g, u64::MAX))
                        .map_err(storage_error)?
                        .count() as u64,
                    Err(redb::TableError::TableDoesNotExist(_)) => 0,
                    Err(e) => return Err(storage_error(e)),
                };
                Ok(Lag {
                    undelivered: head.saturating_sub(last),
                    pending,
                })
            })
            .await
    }

    async fn ping(&self) -> Result<()> {
        self.db.ping().await
    }
}
