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
