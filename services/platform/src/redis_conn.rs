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
    /// A cluster's seed node, whose scheme and credentials reach every node.
    seed: Option<String>,
}

impl StoreConn {
    /// A multiplexed connection to the Redis at `url`, opened on first use.
    pub fn single(store: &'static str, url: &str) -> redis::RedisResult<Self> {
        Ok(Self {
            conn: RedisConn::single(url, Duration::from_secs(2))?,
            store,
            seed: None,
        })
    }

    /// One multiplexed connection per node of the Redis Cluster seeded by `nodes`.
    pub fn cluster(store: &'static str, nodes: &[String]) -> redis::RedisResult<Self> {
        Ok(Self {
            conn: RedisConn::cluster(nodes, Duration::from_secs(2))?,
            store,
            seed: nodes.first().cloned(),
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
    /// Sends `cmd` (a command without keys) to every node: the one Redis of a URL (its
    /// replicas are not reached), or every primary and replica the cluster lists (each on a
    /// connection of its own, opened for this). Every node must accept it; the answers, one
    /// per node.
    pub async fn on_every_node(&self, cmd: &redis::Cmd) -> crate::error::Result<Vec<Value>> {
        let Some(seed) = &self.seed else {
            return Ok(vec![self.query(cmd).await?]);
        };
        let failed = |e: redis::RedisError| store_error(self.store, e);
        let seed =
            redis::IntoConnectionInfo::into_connection_info(seed.as_str()).map_err(failed)?;
        let mut answers = Vec::new();
        for (host, port) in self.cluster_nodes().await? {
            let info = seed
                .clone()
                .set_addr(redis::ConnectionAddr::Tcp(host.clone(), port));
            let answer = async {
                let client = redis::Client::open(info)?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                cmd.query_async::<Value>(&mut conn).await
            };
            let answer = tokio::time::timeout(Duration::from_secs(5), answer)
                .await
                .map_err(|_| {
                    crate::error::Error::Unavailable(format!(
                        "{} (redis): node {host}:{port} did not answer",
                        self.store
                    ))
                })?
                .map_err(failed)?;
            answers.push(answer);
        }
        Ok(answers)
    }

    /// The address of every primary and replica the cluster lists as reachable.
    async fn cluster_nodes(&self) -> crate::error::Result<Vec<(String, u16)>> {
        let listing: String = self.query(redis::cmd("CLUSTER").arg("NODES")).await?;
        let mut nodes = Vec::new();
        for line in listing.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(address), Some(flags)) = (fields.get(1), fields.get(2)) else {
                continue;
            };
            if flags
                .split(',')
                .any(|f| matches!(f, "fail" | "noaddr" | "handshake"))
            {
                continue;
            }
            // ip:port@cport[,hostname]
            let endpoint = address.split('@').next().unwrap_or_default();
            let Some((host, port)) = endpoint.rsplit_once(':') else {
                continue;
            };
            if let Ok(port) = port.parse() {
                nodes.push((host.to_string(), port));
            }
        }
        if nodes.is_empty() {
            return Err(crate::error::Error::Unavailable(format!(
                "{} (redis): the cluster lists no reachable node",
                self.store
            )));
        }
        Ok(nodes)
    }

    /// A setting of every node [`StoreConn::on_every_node`] reaches (`CONFIG GET`).
    pub async fn setting_on_every_node(&self, name: &str) -> crate::error::Result<Vec<String>> {
        let answers = self
            .on_every_node(redis::cmd("CONFIG").arg("GET").arg(name))
            .await?;
        let mut values = Vec::new();
        for answer in answers {
            let pair: Vec<String> = redis::from_redis_value(answer).map_err(|e| {
                crate::error::Error::internal(anyhow::anyhow!("{} (redis): {e}", self.store))
            })?;
            values.extend(pair.into_iter().nth(1));
        }
        Ok(values)
    }
}

/// Warns when the Redis behind `conn` may lose what `holds` (e.g. "identity's members")
/// keeps there: an eviction policy other than `noeviction` drops keys when memory is full,
/// and without AOF a restart loses every write since the last snapshot. Every node the
/// connection knows is asked. A Redis that does not let clients read its configuration
/// (managed services often do not) is not judged.
pub async fn check_settings(conn: &StoreConn, holds: &str) {
    let Ok(policies) = conn.setting_on_every_node("maxmemory-policy").await else {
        tracing::debug!(
            "Redis does not show its configuration; its eviction policy and persistence are not checked"
        );
        return;
    };
    if let Some(policy) = policies.iter().find(|p| *p != "noeviction") {
        tracing::warn!(
            policy = %policy,
            "Redis may evict keys when its memory is full, and it holds {holds}, which nothing rebuilds: set maxmemory-policy noeviction"
        );
    }
    let aof = conn.setting_on_every_node("appendonly").await;
    if aof.is_ok_and(|nodes| nodes.iter().any(|v| v == "no")) {
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

/// Whether a refused rewrite was reported as a warning already (later ones are debug lines).
static REWRITE_REFUSAL_WARNED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

impl ScrubMark {
    pub const fn new(key: &'static str) -> Self {
        Self { key }
    }

    /// Counts the mark up: before every erasure's write.
    pub async fn raise(&self, conn: &StoreConn) -> crate::error::Result<()> {
        let _: i64 = conn.query(redis::cmd("INCR").arg(self.key)).await?;
        Ok(())
    }

    /// Counts the mark up after an erasure's write (or a write that may have happened): the
    /// erasure stands whatever this answers, so a failure is logged, not returned.
    pub async fn raise_after(&self, conn: &StoreConn) {
        if let Err(e) = self.raise(conn).await {
            tracing::warn!(error = %e, "the erasure mark could not be counted up after an erasure; a scrub running just then may clear it early");
        }
    }

    /// The mark's count, when it is up.
    pub async fn seen(&self, conn: &StoreConn) -> crate::error::Result<Option<i64>> {
        conn.query(redis::cmd("GET").arg(self.key)).await
    }

    /// Asks every node to rewrite its append-only file; true once every node started (or
    /// when no node keeps one: then there is nothing to rewrite).
    pub async fn rewrite(&self, conn: &StoreConn) -> crate::error::Result<bool> {
        let aof = conn.setting_on_every_node("appendonly").await;
        if aof.is_ok_and(|nodes| nodes.iter().all(|v| v == "no")) {
            return Ok(true);
        }
        // Memory holds only live data; the append-only file keeps replaced values until it
        // is rewritten. A rewrite already running may have forked before the erasure: then
        // the node refuses, and the next run asks again.
        match conn.on_every_node(&redis::cmd("BGREWRITEAOF")).await {
            Ok(_) => Ok(true),
            Err(e) => {
                let message = e.to_string();
                if message.contains("in progress") {
                    tracing::info!(error = %message, "an append-only file rewrite is running; asking again after it");
                } else if !REWRITE_REFUSAL_WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(error = %message, "the Redis append-only files could not be rewritten after an erasure; the replaced personal data stays in them until they are (asked again every scrub interval)");
                } else {
                    tracing::debug!(error = %message, "the Redis append-only files could not be rewritten after an erasure");
                }
                Ok(false)
            }
        }
    }

    /// Clears the mark if its count is still `seen`: an erasure that counted it up since
    /// keeps it up for the next scrub.
    pub async fn clear(&self, conn: &StoreConn, seen: i64) -> crate::error::Result<()> {
        let _: i64 = conn
            .invoke(
                redis::Script::new(
                    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
                )
                .key(self.key)
                .arg(seen),
            )
            .await?;
        Ok(())
    }

    /// Rewrites the append-only file of every node when the mark is up, then clears the mark
    /// unless an erasure counted it up meanwhile. True when there was something to do.
    pub async fn scrub(&self, conn: &StoreConn) -> crate::error::Result<bool> {
        let Some(seen) = self.seen(conn).await? else {
            return Ok(false);
        };
        if !self.rewrite(conn).await? {
            return Ok(false);
        }
        self.clear(conn, seen).await?;
        Ok(true)
    }
}

/// The mark a copy of a service's embedded file into Redis (`loyalty copy-<service>`) keeps
/// while it runs: the digest of the source, so that a copy cut short is finished only from
/// the same source, and a service can refuse a half-written Redis.
#[derive(Clone, Copy, Debug)]
pub struct CopyMark {
    pub key: &'static str,
    /// The service, as in `<service>.redb`.
    pub service: &'static str,
    /// The pattern of the service's keys, for the message asking to remove them.
    pub keys: &'static str,
}

impl CopyMark {
    /// Whether a copy started and did not finish.
    pub async fn unfinished(&self, conn: &StoreConn) -> crate::error::Result<bool> {
        let n: i64 = conn.query(redis::cmd("EXISTS").arg(self.key)).await?;
        Ok(n > 0)
    }

    /// Starts a copy of a source with `digest`, or resumes one cut short from the same
    /// source. Refuses, writing nothing, a Redis that holds the service's data (`empty`
    /// says whether it holds none) other than a copy cut short from this source.
    pub async fn begin(
        &self,
        conn: &StoreConn,
        digest: &str,
        empty: impl std::future::Future<Output = crate::error::Result<bool>>,
    ) -> crate::error::Result<()> {
        let service = self.service;
        let earlier: Option<String> = conn.query(redis::cmd("GET").arg(self.key)).await?;
        match earlier {
            Some(earlier) if earlier != digest => {
                return Err(crate::error::Error::FailedPrecondition(format!(
                    "a copy into this Redis was cut short, and {service}.redb changed since (was {service} started on it?): \
                     remove this Redis's {service} keys (`{}`) and copy again",
                    self.keys
                )));
            }
            Some(_) => {}
            None if !empty.await? => {
                return Err(crate::error::Error::FailedPrecondition(format!(
                    "this Redis already holds {service} data: copy into an empty one"
                )));
            }
            None => {}
        }
        let _: () = conn
            .query(redis::cmd("SET").arg(self.key).arg(digest))
            .await?;
        Ok(())
    }

    /// Ends a copy: everything is in.
    pub async fn finish(&self, conn: &StoreConn) -> crate::error::Result<()> {
        let _: i64 = conn.query(redis::cmd("DEL").arg(self.key)).await?;
        Ok(())
    }
}

/// Waits a little before an optimistic write tries again after losing a race (`attempt`
/// from 0, of `attempts`): a random pause of up to 2^attempt ms, at most 20 ms, so writers
/// racing for one record spread out instead of colliding on every round. None after the
/// last attempt: the caller gives up at once.
pub async fn conflict_pause(attempt: usize, attempts: usize) {
    if attempt + 1 >= attempts {
        return;
    }
    let ceiling = 1u64 << attempt.min(5);
    let ms = rand::random_range(0..=ceiling.min(20));
    tokio::time::sleep(Duration::from_millis(ms)).await;
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

    /// Waits until no rewrite runs or is scheduled on the node at `url`; its rewrites then.
    async fn settled_rewrites(url: &str) -> i64 {
        for _ in 0..200 {
            let client = redis::Client::open(url).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let info: String = redis::cmd("INFO")
                .arg("all")
                .query_async(&mut conn)
                .await
                .unwrap();
            let busy = info.lines().map(str::trim).any(|l| {
                l == "aof_rewrite_in_progress:1"
                    || l == "aof_rewrite_scheduled:1"
                    || l == "rdb_bgsave_in_progress:1"
                    || l == "master_link_status:down"
                    || l == "master_sync_in_progress:1"
            });
            if !busy {
                return rewrites(url).await;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("{url} kept rewriting");
    }

    /// A scrub on a cluster with replicas and append-only files rewrites the file of every
    /// primary and replica once, then clears the mark; with no mark up it does nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scrub_rewrites_every_node_once_per_mark() {
        let nodes = RedisServer::start_cluster_with(3, 1, &["--appendonly", "yes"]).unwrap();
        let urls: Vec<String> = nodes.iter().map(RedisServer::url).collect();
        let conn = StoreConn::cluster("test store", &urls).unwrap();
        let mark = ScrubMark::new("test:scrub");
        assert!(!mark.scrub(&conn).await.unwrap(), "no mark, no rewrite");
        // Replicas rewrite once after their first sync; wait for every node to settle.
        let mut before = Vec::new();
        for url in &urls {
            before.push(settled_rewrites(url).await);
        }
        mark.raise(&conn).await.unwrap();
        mark.raise(&conn).await.unwrap();
        assert!(mark.scrub(&conn).await.unwrap());
        for (url, before) in urls.iter().zip(before) {
            assert_eq!(settled_rewrites(url).await, before + 1, "{url}");
        }
        assert_eq!(mark.seen(&conn).await.unwrap(), None);
        assert!(!mark.scrub(&conn).await.unwrap(), "cleared");
    }

    /// An erasure that counts the mark up while a scrub runs keeps it up for the next one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_erasure_during_a_scrub_keeps_the_mark() {
        let server = RedisServer::start().unwrap();
        let conn = StoreConn::single("test store", &server.url()).unwrap();
        let mark = ScrubMark::new("test:scrub");
        mark.raise(&conn).await.unwrap();
        let seen = mark.seen(&conn).await.unwrap().unwrap();
        assert!(mark.rewrite(&conn).await.unwrap());
        mark.raise(&conn).await.unwrap();
        mark.clear(&conn, seen).await.unwrap();
        assert!(
            mark.seen(&conn).await.unwrap().is_some(),
            "kept for the next scrub"
        );
        assert!(mark.scrub(&conn).await.unwrap());
        assert_eq!(mark.seen(&conn).await.unwrap(), None);
    }
}
