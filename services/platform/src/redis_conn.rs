//! One multiplexed Redis connection: to a single Redis (reconnecting), or to a Redis Cluster
//! (routing each command by its keys' hash slot). Every Redis user in the workspace holds one.

use std::time::Duration;

use redis::Value;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;

#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RedisConn::Single(_) => "RedisConn::Single",
            RedisConn::Cluster(_) => "RedisConn::Cluster",
        })
    }
}

impl RedisConn {
    /// A connection to one Redis, opened on first use and reopened after a failure.
    pub fn single(url: &str, response_timeout: Duration) -> redis::RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(500));
        Ok(RedisConn::Single(
            client.get_connection_manager_lazy(config)?,
        ))
    }

    /// One connection per node of the Redis Cluster seeded by `nodes`, opened in the
    /// background.
    pub fn cluster(nodes: &[String], response_timeout: Duration) -> redis::RedisResult<Self> {
        let client = ClusterClientBuilder::new(nodes.to_vec())
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(response_timeout)
            .retries(3)
            .build()?;
        Ok(RedisConn::Cluster(
            client.get_pending_async_connection_with_config(ClusterConfig::default()),
        ))
    }
}

impl redis::aio::ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

/// Redis refusals that pass (a full or read-only server, one loading its data or busy with a
/// script, a cluster moving slots): a caller may try again.
const PASSING_REFUSALS: &[&str] = &[
    "OOM",
    "READONLY",
    "LOADING",
    "MASTERDOWN",
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
];

/// A store's Redis error as the services' error: lost connections, timeouts and passing
/// refusals are `Unavailable` (callers retry), anything else `Internal`. `store` names the
/// store in the message, e.g. "promotion store".
pub fn store_error(store: &str, e: redis::RedisError) -> crate::error::Error {
    if e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_cluster_error()
        || e.code().is_some_and(|c| PASSING_REFUSALS.contains(&c))
    {
        return crate::error::Error::Unavailable(format!("{store} (redis): {e}"));
    }
    crate::error::Error::internal(anyhow::anyhow!("{store} (redis): {e}"))
}

/// One store's connection: a [`RedisConn`] whose errors name the store and map as
/// [`store_error`] says.
#[derive(Clone, Debug)]
pub struct StoreConn {
    conn: RedisConn,
    store: &'static str,
}

impl StoreConn {
    /// A multiplexed connection to the Redis at `url`, opened on first use.
    pub fn single(store: &'static str, url: &str) -> redis::RedisResult<Self> {
        Ok(Self {
            conn: RedisConn::single(url, Duration::from_secs(2))?,
            store,
        })
    }

    /// One multiplexed connection per node of the Redis Cluster seeded by `nodes`.
    pub fn cluster(store: &'static str, nodes: &[String]) -> redis::RedisResult<Self> {
        Ok(Self {
            conn: RedisConn::cluster(nodes, Duration::from_secs(2))?,
            store,
        })
    }

    /// The Redis `config` names: its cluster when it lists seed nodes, else its URL.
    pub fn for_config(
        store: &'static str,
        config: &crate::config::RedisConfig,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        if config.cluster_nodes.is_empty() {
            Self::single(store, &config.url)
                .with_context(|| format!("bad configuration: `storage.redis.url` (the {store})"))
        } else {
            Self::cluster(store, &config.cluster_nodes).with_context(|| {
                format!("bad configuration: `storage.redis.cluster_nodes` (the {store})")
            })
        }
    }

    pub async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> crate::error::Result<T> {
        cmd.query_async(&mut self.conn.clone())
            .await
            .map_err(|e| store_error(self.store, e))
    }

    pub async fn pipeline<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> crate::error::Result<T> {
        pipe.query_async(&mut self.conn.clone())
            .await
            .map_err(|e| store_error(self.store, e))
    }

    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> crate::error::Result<T> {
        invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| store_error(self.store, e))
    }
}

impl StoreConn {
    /// Sends `cmd` (a command without keys) to every node: the one Redis, or every primary
    /// and replica of the cluster, each of which must accept it.
    pub async fn on_every_node(&self, cmd: &redis::Cmd) -> crate::error::Result<()> {
        use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
        let result: redis::RedisResult<Value> = match &self.conn {
            RedisConn::Single(c) => cmd.query_async(&mut c.clone()).await,
            RedisConn::Cluster(c) => {
                c.clone()
                    .route_command(
                        cmd.clone(),
                        RoutingInfo::MultiNode((
                            MultipleNodeRoutingInfo::AllNodes,
                            Some(ResponsePolicy::AllSucceeded),
                        )),
                    )
                    .await
            }
        };
        result.map(|_| ()).map_err(|e| store_error(self.store, e))
    }
}

/// Warns when the Redis behind `conn` may lose what `holds` (e.g. "identity's members")
/// keeps there: an eviction policy other than `noeviction` drops keys when memory is full,
/// and without AOF a restart loses every write since the last snapshot. A Redis that does
/// not let clients read its configuration (managed services often do not) is not judged.
pub async fn check_settings(conn: &StoreConn, holds: &str) {
    async fn setting(conn: &StoreConn, name: &str) -> Option<String> {
        let pair: Vec<String> = conn
            .query(redis::cmd("CONFIG").arg("GET").arg(name))
            .await
            .ok()?;
        pair.into_iter().nth(1)
    }
    match setting(conn, "maxmemory-policy").await {
        Some(policy) if policy != "noeviction" => tracing::warn!(
            policy = %policy,
            "Redis may evict keys when its memory is full, and it holds {holds}, which nothing rebuilds: set maxmemory-policy noeviction"
        ),
        Some(_) => {}
        None => {
            tracing::debug!(
                "Redis does not show its configuration; its eviction policy and persistence are not checked"
            );
            return;
        }
    }
    if setting(conn, "appendonly").await.as_deref() == Some("no") {
        tracing::warn!(
            "Redis runs without its append-only file, and it holds {holds}, which nothing rebuilds: a restart loses every write since its last snapshot (docs/operations.md, section 6)"
        );
    }
}

/// Marks that erasures replaced personal data which the Redis append-only file may still
/// hold, until a rewrite that started after the last of them ([`ScrubMark::scrub`]).
///
/// An erasure counts the mark up before its write (so a crash after the write leaves the
/// mark) and again after it (so a rewrite that forked before the write cannot clear the
/// mark: the scrub clears it only when it reads the same count after starting its rewrite
/// as before).
#[derive(Clone, Debug)]
pub struct ScrubMark {
    key: &'static str,
}

impl ScrubMark {
    pub const fn new(key: &'static str) -> Self {
        Self { key }
    }

    /// Counts the mark up: before and after every erasure's write.
    pub async fn raise(&self, conn: &StoreConn) -> crate::error::Result<()> {
        let _: i64 = conn.query(redis::cmd("INCR").arg(self.key)).await?;
        Ok(())
    }

    /// Rewrites the append-only file of every node when the mark is up, then clears the mark
    /// unless an erasure counted it up meanwhile. True when a rewrite was started.
    pub async fn scrub(&self, conn: &StoreConn) -> crate::error::Result<bool> {
        let seen: Option<i64> = conn.query(redis::cmd("GET").arg(self.key)).await?;
        let Some(seen) = seen else {
            return Ok(false);
        };
        // Memory holds only live data; the append-only file keeps replaced values until it
        // is rewritten. A rewrite already running may have forked before the erasure: then
        // the node refuses, and the next run asks again.
        if let Err(e) = conn.on_every_node(&redis::cmd("BGREWRITEAOF")).await {
            let message = e.to_string();
            if message.contains("in progress") {
                tracing::info!(error = %message, "an append-only file rewrite is running; asking again after it");
            } else {
                tracing::warn!(error = %message, "the Redis append-only files could not be rewritten after an erasure; the replaced personal data stays in them until they are");
            }
            return Ok(false);
        }
        let _: i64 = conn
            .invoke(
                redis::Script::new(
                    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
                )
                .key(self.key)
                .arg(seen),
            )
            .await?;
        Ok(true)
    }
}

/// The `ZRANGEBYLEX` start for members strictly after `after` (`-`: from the first).
pub fn lex_after(after: &str) -> String {
    if after.is_empty() {
        "-".into()
    } else {
        format!("({after}")
    }
}

/// A Redis set this process adds members to, remembering (up to 10,000) those it already
/// added so a hot path pays the `SADD` once per member and process.
#[derive(Clone, Debug)]
pub struct RememberedSet {
    key: &'static str,
    added: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl RememberedSet {
    const REMEMBERED: usize = 10_000;

    pub fn new(key: &'static str) -> Self {
        Self {
            key,
            added: Default::default(),
        }
    }

    fn added(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.added.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `member` unless this process already did.
    pub async fn add(&self, conn: &StoreConn, member: &str) -> crate::error::Result<()> {
        if self.added().contains(member) {
            return Ok(());
        }
        let _: i64 = conn
            .query(redis::cmd("SADD").arg(self.key).arg(member))
            .await?;
        let mut set = self.added();
        if set.len() < Self::REMEMBERED {
            set.insert(member.to_string());
        }
        Ok(())
    }

    /// Forgets what this process added (after the set was deleted).
    pub fn forget(&self) {
        self.added().clear();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::redis_server::RedisServer;

    /// How many append-only file rewrites the node at `url` has started.
    async fn rewrites(url: &str) -> i64 {
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let info: String = redis::cmd("INFO")
            .arg("persistence")
            .query_async(&mut conn)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("aof_rewrites:"))
            .map_or(0, |n| n.trim().parse().unwrap())
    }

    /// A scrub on a cluster rewrites the append-only file of every node, then clears the
    /// mark; with no mark up it does nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scrub_rewrites_every_node_once_per_mark() {
        let nodes = RedisServer::start_cluster(3).unwrap();
        let urls: Vec<String> = nodes.iter().map(RedisServer::url).collect();
        let conn = StoreConn::cluster("test store", &urls).unwrap();
        let mark = ScrubMark::new("test:scrub");
        assert!(!mark.scrub(&conn).await.unwrap(), "no mark, no rewrite");
        mark.raise(&conn).await.unwrap();
        mark.raise(&conn).await.unwrap();
        assert!(mark.scrub(&conn).await.unwrap());
        for url in &urls {
            assert_eq!(rewrites(url).await, 1, "{url}");
        }
        let left: Option<i64> = conn
            .query(redis::cmd("GET").arg("test:scrub"))
            .await
            .unwrap();
        assert_eq!(left, None);
        assert!(!mark.scrub(&conn).await.unwrap(), "cleared");
    }
}
