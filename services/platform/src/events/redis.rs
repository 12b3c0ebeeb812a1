//! The event log on Redis Streams (microservices mode): `XADD` with `MAXLEN ~` trimming,
//! consumer groups (`XREADGROUP`), `XACK`, and `XAUTOCLAIM` to take over entries a dead
//! consumer left pending.
//!
//! A stream `s` lives under the key `ev:{s}`. Blocking reads use a connection of their own
//! (a blocked command would hold up everything queued behind it on a multiplexed connection),
//! with a response timeout longer than the block.

use std::collections::HashMap;
use std::time::Duration;

use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamInfoGroupsReply, StreamMaxlen,
    StreamReadOptions, StreamReadReply,
};
use redis::{AsyncCommands, Value};
use tokio::sync::Mutex;

use super::{Delivery, EventLog, Lag, MAX_READ, check_payloads};
use crate::error::{Error, Result};
use crate::redis_conn::RedisConn;

/// Entries a stream keeps (approximately, `MAXLEN ~`).
pub const MAX_RETAINED: usize = 5_000_000;
/// Longest a read blocks on the server.
const MAX_BLOCK: Duration = Duration::from_secs(5);
const FIELD: &str = "e";

type Reader = std::sync::Arc<Mutex<RedisConn>>;

#[derive(Clone)]
pub struct RedisEventLog {
    commands: RedisConn,
    /// A connection per stream for blocking reads (a blocked read holds up its connection;
    /// consumers of one stream in a process take turns on it).
    readers: std::sync::Arc<std::sync::Mutex<HashMap<String, Reader>>>,
    connect_reader: std::sync::Arc<dyn Fn() -> redis::RedisResult<RedisConn> + Send + Sync>,
}

impl std::fmt::Debug for RedisEventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEventLog").finish_non_exhaustive()
    }
}

fn key(stream: &str) -> String {
    format!("ev:{{{stream}}}")
}

fn unavailable(err: redis::RedisError) -> Error {
    Error::Unavailable(format!("event stream: {err}"))
}

/// The entries with their payloads, and the ids of entries without one (not ours: they are
/// acknowledged unread, or they would stay pending and be claimed again for good).
fn deliveries(ids: Vec<StreamId>) -> (Vec<Delivery>, Vec<String>) {
    let mut out = Vec::with_capacity(ids.len());
    let mut foreign = Vec::new();
    for mut entry in ids {
        match entry.map.remove(FIELD) {
            Some(Value::BulkString(payload)) => out.push(Delivery {
                id: entry.id,
                payload,
            }),
            _ => {
                tracing::warn!(id = %entry.id, "event stream entry without a payload skipped");
                foreign.push(entry.id);
            }
        }
    }
    (out, foreign)
}

impl RedisEventLog {
    /// Prepares the connections to one Redis (opened on first use, reopened after a
    /// failure).
    pub fn connect(url: &str) -> anyhow::Result<Self> {
        let url = url.to_owned();
        let commands = RedisConn::single(&url, Duration::from_secs(2))?;
        Ok(Self::with(
            commands,
            std::sync::Arc::new(move || {
                RedisConn::single(&url, MAX_BLOCK + Duration::from_secs(2))
            }),
        ))
    }

    fn with(
        commands: RedisConn,
        connect_reader: std::sync::Arc<dyn Fn() -> redis::RedisResult<RedisConn> + Send + Sync>,
    ) -> Self {
        Self {
            commands,
            readers: std::sync::Arc::default(),
            connect_reader,
        }
    }

    fn reader(&self, stream: &str) -> Result<Reader> {
        let mut readers = self
            .readers
            .lock()
            .map_err(|_| Error::internal(anyhow::anyhow!("event stream readers poisoned")))?;
        if let Some(r) = readers.get(stream) {
            return Ok(r.clone());
        }
        let conn = (self.connect_reader)().map_err(unavailable)?;
        let reader: Reader = std::sync::Arc::new(Mutex::new(conn));
        readers.insert(stream.to_owned(), reader.clone());
        Ok(reader)
    }

    /// The Redis (or cluster) of `storage.redis`.
    pub fn for_config(config: &crate::config::RedisConfig) -> anyhow::Result<Self> {
        use anyhow::Context;
        if config.cluster_nodes.is_empty() {
            Self::connect(&config.url)
                .context("bad configuration: `storage.redis.url` (the event stream)")
        } else {
            Self::connect_cluster(&config.cluster_nodes)
                .context("bad configuration: `storage.redis.cluster_nodes` (the event stream)")
        }
    }

    /// Prepares the connections to a Redis Cluster seeded by `nodes`; the stream is one key,
    /// so it lives on the node that owns its slot.
    pub fn connect_cluster(nodes: &[String]) -> anyhow::Result<Self> {
        let nodes = nodes.to_vec();
        let commands = RedisConn::cluster(&nodes, Duration::from_secs(2))?;
        Ok(Self::with(
            commands,
            std::sync::Arc::new(move || {
                RedisConn::cluster(&nodes, MAX_BLOCK + Duration::from_secs(2))
            }),
        ))
    }
}

#[async_trait::async_trait]
impl EventLog for RedisEventLog {
    async fn append(&self, stream: &str, payloads: &[Vec<u8>]) -> Result<()> {
        check_payloads(payloads)?;
        if payloads.is_empty() {
            return Ok(());
        }
        let key = key(stream);
        let mut pipe = redis::pipe();
        pipe.atomic();
        for p in payloads {
            pipe.xadd_maxlen(
                &key,
                StreamMaxlen::Approx(MAX_RETAINED),
                "*",
                &[(FIELD, p.as_slice())],
            )
            .ignore();
        }
        let mut con = self.commands.clone();
        let () = pipe.query_async(&mut con).await.map_err(unavailable)?;
        Ok(())
    }

    async fn create_group(&self, stream: &str, group: &str) -> Result<()> {
        let mut con = self.commands.clone();
        let created: redis::RedisResult<()> =
            con.xgroup_create_mkstream(key(stream), group, "0").await;
        match created {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
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
        let block = wait.min(MAX_BLOCK);
        let options = StreamReadOptions::default()
            .group(group, consumer)
            .count(max)
            .block(usize::try_from(block.as_millis()).unwrap_or(0).max(1));
        let keys = [key(stream)];
        let reply: Option<StreamReadReply> = if block.is_zero() {
            let mut con = self.commands.clone();
            con.xread_options(&keys, &[">"], &options.block(1))
                .await
                .map_err(unavailable)?
        } else {
            let reader = self.reader(stream)?;
            let mut con = reader.lock().await;
            con.xread_options(&keys, &[">"], &options)
                .await
                .map_err(unavailable)?
        };
        let (out, foreign) = deliveries(
            reply
                .into_iter()
                .flat_map(|r| r.keys)
                .flat_map(|k| k.ids)
                .collect(),
        );
        self.ack(stream, group, &foreign).await?;
        Ok(out)
    }

    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut con = self.commands.clone();
        let _: usize = con
            .xack(key(stream), group, ids)
            .await
            .map_err(unavailable)?;
        Ok(())
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
        let min_idle = u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX);
        let mut con = self.commands.clone();
        let mut start = "0-0".to_owned();
        let mut out = Vec::new();
        // XAUTOCLAIM scans a bounded part of the pending list per call: go on until the scan
        // wraps around or enough entries were claimed.
        for _ in 0..64 {
            let reply: StreamAutoClaimReply = con
                .xautoclaim_options(
                    key(stream),
                    group,
                    consumer,
                    min_idle,
                    &start,
                    StreamAutoClaimOptions::default().count(max - out.len()),
                )
                .await
                .map_err(unavailable)?;
            let (claimed, foreign) = deliveries(reply.claimed);
            out.extend(claimed);
            self.ack(stream, group, &foreign).await?;
            if !reply.deleted_ids.is_empty() {
                // Trimmed (`MAXLEN ~`) while still pending: gone before they were applied.
                metrics::counter!("loyalty_event_trimmed_unapplied_total", "stream" => stream.to_owned(), "group" => group.to_owned())
                    .increment(reply.deleted_ids.len() as u64);
                tracing::error!(stream, group, entries = reply.deleted_ids.len(), first = %reply.deleted_ids[0], "pending events were trimmed from the stream before they were applied");
            }
            if reply.next_stream_id == "0-0" || out.len() >= max {
                break;
            }
            start = reply.next_stream_id;
        }
        Ok(out)
    }

    async fn lag(&self, stream: &str, group: &str) -> Result<Lag> {
        let mut con = self.commands.clone();
        let info: StreamInfoGroupsReply = con.xinfo_groups(key(stream)).await.map_err(|e| {
            if e.code() == Some("ERR") && e.to_string().contains("no such key") {
                Error::NotFound(format!("no stream {stream:?}"))
            } else {
                unavailable(e)
            }
        })?;
        let Some(g) = info.groups.into_iter().find(|g| g.name == group) else {
            return Err(Error::NotFound(format!(
                "no group {group:?} on stream {stream:?}"
            )));
        };
        let undelivered = match g.lag {
            Some(lag) => lag as u64,
            // Redis cannot tell (entries were deleted or trimmed past the group): the whole
            // stream is the bound, so a group far behind never reads as caught up.
            None => con.xlen::<_, u64>(key(stream)).await.map_err(unavailable)?,
        };
        Ok(Lag {
            undelivered,
            pending: g.pending as u64,
        })
    }

    async fn ping(&self) -> Result<()> {
        let mut con = self.commands.clone();
        let _: String = redis::cmd("PING")
            .query_async(&mut con)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
