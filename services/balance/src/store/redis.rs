//! The balance store on Redis hot state over a durable [`Ledger`].
//!
//! Each member's state and records live under keys sharing one hash tag, so everything
//! works on Redis Cluster. Only Lua scripts change them: `apply.lua` decides and applies an
//! operation atomically (the same rules as [`crate::ledger::apply`]) and returns the change,
//! which is then appended to the ledger *before* the caller hears of it. The ledger accepts
//! a change only on top of the state it was computed from (the state's stamp, chained by
//! the script through every change), so hot state that lost writes, ran ahead of the ledger
//! or was restored from an old snapshot can never get a change into the ledger: such a
//! change is refused, the hot state is dropped and rebuilt from the ledger, and the
//! operation runs again. Missing state is rebuilt lazily from the ledger on first access.
//!
//! Idempotency records are a cache of the ledger's: Redis keeps those written within the
//! retention ([`RedisBalanceStore::with_record_retention`]), and an operation that needs an
//! older one finds it in the ledger. See ARCHITECTURE.md, "Redis over a durable ledger".

use std::sync::Arc;
use std::time::Duration;

use loyalty_platform::clock::Millis;
use loyalty_platform::error::{Error, Result};
use loyalty_platform::redis_conn::RedisConn;
use redis::{Script, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{BalanceStore, Due, EntryQuery, Ledger, Page};
use crate::ledger::{self, Account, Change, Op, OpRecord};

mod sequencer;

/// How often one operation's script runs: again after its hot state had to be rebuilt, or
/// a record it refers to was put back from the ledger.
const MAX_ATTEMPTS: usize = 6;
/// How often a refusal is decided again because the member's state moved on in the
/// ledger and in Redis meanwhile, on top of [`MAX_ATTEMPTS`].
const MAX_OVERTAKEN: usize = 32;
/// How long Redis keeps a record after its last change, unless configured otherwise.
pub const DEFAULT_RECORD_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a change waits for the ledger to catch up with the changes before it (applied
/// to the hot state earlier, still being appended) before the hot state is declared
/// diverged.
const COMMIT_WAIT: Duration = Duration::from_secs(1);
/// Stripes of members for ordering rebuilds with the operations in flight.
const STRIPES: usize = 4096;

#[derive(Clone)]
pub struct RedisBalanceStore {
    redis: RedisConn,
    ledger: Arc<dyn Ledger>,
    apply: Script,
    load: Script,
    drop: Script,
    restore: Script,
    /// How long a record stays in Redis after it was last written (ms; 0: for ever); also
    /// how long the state of a member without changes stays after it was read.
    retention_ms: i64,
    /// Keeps this process's ledger appends of a member in script order.
    order: Arc<sequencer::Sequencer>,
    /// Per stripe of members: how many hot states were rebuilt. Operations hold it shared
    /// from before their script until their change is queued on the ledger; a rebuild holds
    /// it alone, so it never runs under a script in flight, and the operations it held up
    /// run on the rebuilt state.
    rebuilds: Arc<Vec<tokio::sync::RwLock<u64>>>,
}

impl std::fmt::Debug for RedisBalanceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBalanceStore")
            .field("ledger", &self.ledger)
            .finish_non_exhaustive()
    }
}

/// Keys of one member, under one hash tag.
struct Keys {
    /// The member's state.
    state: String,
    /// Its records: a hash of idempotency key to record.
    records: String,
    /// When each record was last written: a sorted set of idempotency keys.
    times: String,
}

/// The tag holds the tenant's length so no two (tenant, member) pairs share keys; whatever
/// the ids contain, all keys of a member carry the same prefix and so the same tag.
fn keys(tenant: &str, member: &str) -> Keys {
    let tag = format!("lb:{{{}:{tenant}{member}}}", tenant.len());
    Keys {
        state: format!("{tag}:s"),
        records: format!("{tag}:o"),
        times: format!("{tag}:t"),
    }
}

impl Keys {
    fn on<'a>(&self, script: &'a Script) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(&self.state)
            .key(&self.records)
            .key(&self.times);
        invocation
    }
}

/// A refusal by a script, from its code and message.
fn refusal(code: &str, detail: String) -> Error {
    match code {
        "FAILED_PRECONDITION" => Error::FailedPrecondition(detail),
        "NOT_FOUND" => Error::NotFound(detail),
        "ALREADY_EXISTS" => Error::AlreadyExists(detail),
        "INVALID_ARGUMENT" => Error::invalid("operation", detail),
        other => Error::internal(anyhow::anyhow!("refusal {other}: {detail}")),
    }
}

fn redis_error(e: redis::RedisError) -> Error {
    loyalty_platform::redis_conn::store_error("balance hot state", e)
}

fn pack<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    rmp_serde::to_vec_named(value).map_err(Error::internal)
}

fn unpack<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    rmp_serde::from_slice(bytes).map_err(Error::internal)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The answer to a retry under `key` whose record is `stored`.
fn replay(stored: OpRecord, key: &str, fingerprint: &str) -> Result<OpRecord> {
    if stored.fingerprint == fingerprint {
        Ok(stored)
    } else {
        Err(Error::AlreadyExists(format!(
            "idempotency key {key} was already used for a different operation"
        )))
    }
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        _ => None,
    }
}

/// Looking again for the ledger to catch up: after a pause that grows from 200 µs to
/// 20 ms, for up to [`COMMIT_WAIT`].
struct Patience {
    started: tokio::time::Instant,
    pause: Duration,
}

impl Patience {
    fn new() -> Self {
        Self {
            started: tokio::time::Instant::now(),
            pause: Duration::from_micros(200),
        }
    }

    /// Waits before the next look; `false`, at once, when the time is up.
    async fn wait(&mut self) -> bool {
        if self.started.elapsed() > COMMIT_WAIT {
            return false;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Duration::from_millis(20));
        true
    }
}

/// What a refusal decided on the hot state comes to.
enum Weighed {
    /// It was decided on the ledger's state: the answer.
    Stands(Error),
    /// The operation is a retry of one the ledger holds: its stored reply.
    Replay(Box<OpRecord>),
    /// It was decided on changes the ledger does not hold: decide again.
    Rerun,
    /// The ledger moved past the state it was decided on while Redis did too (a busy
    /// member): decide again, without counting it as a failed attempt.
    Overtaken,
}

/// What the ledger said to a change.
enum Commit {
    Done,
    /// The ledger has not yet seen the changes before this one.
    Behind,
    /// The change was computed from a state the ledger never had.
    Diverged,
}

impl RedisBalanceStore {
    /// Prepares one multiplexed connection to `url`, shared by every request, opened on
    /// first use and reopened after a failure, over `ledger`.
    pub fn connect(url: &str, ledger: Arc<dyn Ledger>) -> anyhow::Result<Self> {
        let redis = RedisConn::single(url, Duration::from_secs(2))?;
        Ok(Self::with(redis, ledger))
    }

    /// Prepares one multiplexed connection per node of the Redis Cluster seeded by `nodes`,
    /// opened in the background, over `ledger`. All of a member's keys share a hash slot.
    pub fn connect_cluster(nodes: &[String], ledger: Arc<dyn Ledger>) -> anyhow::Result<Self> {
        let redis = RedisConn::cluster(nodes, Duration::from_secs(2))?;
        Ok(Self::with(redis, ledger))
    }

    /// The Redis (or cluster) of `storage.redis`, over `ledger`.
    pub fn for_config(
        config: &loyalty_platform::config::RedisConfig,
        ledger: Arc<dyn Ledger>,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        if config.cluster_nodes.is_empty() {
            Self::connect(&config.url, ledger)
                .context("bad configuration: `storage.redis.url` (the balances)")
        } else {
            Self::connect_cluster(&config.cluster_nodes, ledger)
                .context("bad configuration: `storage.redis.cluster_nodes` (the balances)")
        }
    }

    fn with(redis: RedisConn, ledger: Arc<dyn Ledger>) -> Self {
        Self {
            redis,
            ledger,
            apply: Script::new(include_str!("redis/apply.lua")),
            load: Script::new(include_str!("redis/load.lua")),
            drop: Script::new(include_str!("redis/drop.lua")),
            restore: Script::new(include_str!("redis/restore.lua")),
            retention_ms: millis(DEFAULT_RECORD_RETENTION),
            order: Arc::default(),
            rebuilds: Arc::new((0..STRIPES).map(|_| tokio::sync::RwLock::new(0)).collect()),
        }
    }

    /// Keeps records in Redis for `retention` after their last change (zero: for ever);
    /// older ones are read from the ledger when an operation needs them. A member's state
    /// that no change ever made (a balance read) stays as long.
    #[must_use]
    pub fn with_record_retention(mut self, retention: Duration) -> Self {
        self.retention_ms = millis(retention);
        self
    }

    /// Rebuilds one member's hot state from the ledger (a no-op when it is present). Its
    /// records come back one at a time, when an operation needs them.
    async fn rebuild(&self, tenant: &str, member: &str) -> Result<()> {
        let account = self.ledger.load_account(tenant, member).await?;
        let mut invocation = keys(tenant, member).on(&self.load);
        invocation.arg(pack(&account)?).arg(self.retention_ms);
        let mut con = self.redis.clone();
        let _: i64 = invocation
            .invoke_async(&mut con)
            .await
            .map_err(redis_error)?;
        Ok(())
    }

    /// Puts the ledger's copy of the record under `key`, which an operation refers to,
    /// back into the hot state, once every change the hot state holds is in the ledger (so
    /// the copy has them all). Returns `false` when the ledger has no such record. A hot
    /// state that stays ahead of the ledger is rebuilt; one whose record came back
    /// meanwhile is left as it is.
    async fn bring_back(
        &self,
        tenant: &str,
        member: &str,
        key: &str,
        now: Millis,
        seen: u64,
    ) -> Result<bool> {
        let mut patience = Patience::new();
        loop {
            let version = self.ledger.version(tenant, member).await?;
            let Some(record) = self.ledger.record(tenant, member, key).await? else {
                return Ok(false);
            };
            let mut invocation = keys(tenant, member).on(&self.restore);
            invocation
                .arg(now)
                .arg(self.retention_ms)
                .arg(key)
                .arg(pack(&record)?)
                .arg(version);
            let mut con = self.redis.clone();
            let restored: i64 = invocation
                .invoke_async(&mut con)
                .await
                .map_err(redis_error)?;
            if restored >= 0 {
                metrics::counter!("loyalty_balance_records_restored_total")
                    .increment(restored.unsigned_abs());
                return Ok(true);
            }
            if !patience.wait().await {
                let why = "the state stayed ahead of the ledger";
                self.reset(tenant, member, seen, why).await?;
                return Ok(true);
            }
        }
    }

    /// Drops a member's hot state: only if it still carries `stamp`, or unconditionally.
    /// Returns whether it did.
    async fn drop_state(&self, tenant: &str, member: &str, stamp: Option<&str>) -> Result<bool> {
        let mut invocation = keys(tenant, member).on(&self.drop);
        invocation.arg(stamp.unwrap_or_default());
        let mut con = self.redis.clone();
        let dropped: i64 = invocation
            .invoke_async(&mut con)
            .await
            .map_err(redis_error)?;
        Ok(dropped == 1)
    }

    /// Drops and rebuilds every member's hot state from the ledger; returns how many.
    pub async fn rebuild_all(&self) -> Result<usize> {
        let mut after = None;
        let mut count = 0;
        loop {
            let page = self.ledger.members(after.clone(), 500).await?;
            let Some(last) = page.last().cloned() else {
                return Ok(count);
            };
            for (tenant, member) in &page {
                self.drop_state(tenant, member, None).await?;
                self.rebuild(tenant, member).await?;
                count += 1;
            }
            after = Some(last);
        }
    }

    /// Settles a change the ledger first answered with `first`: when it was refused because
    /// the changes before it have not landed yet, waits for them. The change was computed
    /// on the hot state as of `seen` rebuilds of its stripe.
    async fn settle(
        &self,
        tenant: &str,
        member: &str,
        change: &Change,
        first: Result<bool>,
        seen: u64,
    ) -> Result<Commit> {
        if first? {
            return Ok(Commit::Done);
        }
        let outcome = self
            .wait_for_predecessor(tenant, member, change, seen)
            .await;
        let label = match &outcome {
            Ok(Commit::Done) => "landed",
            Ok(Commit::Behind) => "behind",
            Ok(Commit::Diverged) => "diverged",
            Err(_) => "error",
        };
        metrics::counter!("loyalty_balance_ledger_retries_total", "outcome" => label).increment(1);
        outcome
    }

    /// Waits for the change before `change` to reach the ledger, then tries once more. Gives
    /// up at once when the hot state was rebuilt meanwhile: the predecessor was refused, and
    /// so will this change be.
    async fn wait_for_predecessor(
        &self,
        tenant: &str,
        member: &str,
        change: &Change,
        seen: u64,
    ) -> Result<Commit> {
        let rebuilds = self.rebuilds(&keys(tenant, member).state);
        let expected = change.account.version - 1;
        let mut patience = Patience::new();
        loop {
            let stored = self.ledger.version(tenant, member).await?;
            if stored > expected {
                return Ok(Commit::Diverged);
            }
            if stored == expected {
                // The predecessor has landed (or the lineage differs): one more try decides.
                return Ok(
                    if self.ledger.commit(tenant, member, expected, change).await? {
                        Commit::Done
                    } else {
                        Commit::Diverged
                    },
                );
            }
            let rebuilt = rebuilds.try_read().map_or(true, |count| *count != seen);
            if rebuilt || !patience.wait().await {
                return Ok(Commit::Behind);
            }
        }
    }

    async fn get_state(&self, tenant: &str, member: &str) -> Result<Option<Account>> {
        let mut con = self.redis.clone();
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(keys(tenant, member).state)
            .query_async(&mut con)
            .await
            .map_err(redis_error)?;
        raw.map(|b| unpack(&b)).transpose()
    }
}

impl RedisBalanceStore {
    fn rebuilds(&self, state_key: &str) -> &tokio::sync::RwLock<u64> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        state_key.hash(&mut h);
        &self.rebuilds[(h.finish() % STRIPES as u64) as usize]
    }

    /// Drops a member's hot state and rebuilds it from the ledger, once no script of its
    /// stripe is in flight in this process, unless it was rebuilt since `seen` (the count
    /// the refused operation ran under): the operations refused together rebuild once.
    async fn reset(&self, tenant: &str, member: &str, seen: u64, why: &str) -> Result<()> {
        let mut rebuilt = self.rebuilds(&keys(tenant, member).state).write().await;
        if *rebuilt != seen {
            return Ok(());
        }
        tracing::warn!(
            tenant,
            member,
            why,
            "hot balance state diverged from the ledger; rebuilding it"
        );
        self.drop_state(tenant, member, None).await?;
        self.rebuild(tenant, member).await?;
        *rebuilt += 1;
        Ok(())
    }

    /// The ledger's record under `key`, waiting a little for a change that may still be on
    /// its way there.
    async fn durable(&self, tenant: &str, member: &str, key: &str) -> Result<Option<OpRecord>> {
        let mut patience = Patience::new();
        loop {
            if let Some(record) = self.ledger.record(tenant, member, key).await? {
                return Ok(Some(record));
            }
            if !patience.wait().await {
                return Ok(None);
            }
        }
    }

    /// Weighs the script's refusal of `key`'s operation, decided on the hot state as of
    /// `version` and `stamp`. Redis keeps recent records only, so the operation may be a
    /// retry of one the ledger holds: that gets its stored reply (or `AlreadyExists`). And a
    /// refusal stands only when decided on the ledger's own state: the hot state may hold
    /// changes still on their way to the ledger (waited for), or ones that never will be
    /// (such as a retry decided again because its record was gone, until it is taken back
    /// out), and then the operation is decided again.
    #[allow(clippy::too_many_arguments)]
    async fn weigh(
        &self,
        tenant: &str,
        member: &str,
        key: &str,
        fingerprint: &str,
        refusal: Error,
        (version, stamp): (i64, &str),
        seen: u64,
    ) -> Result<Weighed> {
        if !key.is_empty()
            && let Some(stored) = self.ledger.record(tenant, member, key).await?
        {
            return replay(stored, key, fingerprint).map(|r| Weighed::Replay(Box::new(r)));
        }
        let rebuilds = self.rebuilds(&keys(tenant, member).state);
        let mut patience = Patience::new();
        loop {
            let durable = self.ledger.load_account(tenant, member).await?;
            if durable.version == version && durable.stamp == stamp {
                return Ok(Weighed::Stands(refusal));
            }
            if durable.version >= version {
                // The ledger holds another state at or past that version. Redis runs ahead
                // of the ledger, never behind it: a hot state still at that version lost
                // writes (a failover, an old snapshot) or diverged, and is rebuilt.
                return Ok(if self.drop_state(tenant, member, Some(stamp)).await? {
                    Weighed::Rerun
                } else {
                    Weighed::Overtaken
                });
            }
            let rebuilt = rebuilds.try_read().map_or(true, |count| *count != seen);
            if rebuilt {
                return Ok(Weighed::Rerun);
            }
            if !patience.wait().await {
                let why = "a refusal was decided on changes the ledger never got";
                self.reset(tenant, member, seen, why).await?;
                return Ok(Weighed::Rerun);
            }
        }
    }

    async fn run(
        &self,
        tenant_id: &str,
        member_id: &str,
        key: &str,
        op: Op,
        now: Millis,
    ) -> Result<Option<OpRecord>> {
        let member_keys = keys(tenant_id, member_id);
        let state_key = &member_keys.state;
        let fingerprint = if op.is_keyless() {
            String::new()
        } else {
            op.fingerprint()
        };
        let packed_op = pack(&op)?;
        let referenced = ledger::referenced_key(&op).unwrap_or_default();
        // Whether the record `op` refers to was found in neither Redis nor the ledger.
        let mut referenced_absent = false;
        // Reruns of refusals overtaken on a busy member, beyond the attempts.
        let mut overtaken = 0;
        let mut attempts = 0;
        while attempts < MAX_ATTEMPTS {
            attempts += 1;
            // Both held from before the script until the change is queued on the ledger
            // (not until it is durable): a rebuild waits for them, and the member's changes
            // from this process are queued in script order while several scripts are in
            // flight. Other processes' changes are ordered by the ledger's condition.
            let shared = self.rebuilds(state_key).read().await;
            let seen = *shared;
            let ticket = self.order.enter(state_key);
            let mut con = self.redis.clone();
            let mut invocation = member_keys.on(&self.apply);
            invocation
                .arg(now)
                .arg(key)
                .arg(&fingerprint)
                .arg(packed_op.as_slice())
                .arg(referenced)
                .arg(self.retention_ms)
                .arg(if referenced_absent { "1" } else { "" });
            let reply: Vec<Value> = invocation
                .invoke_async(&mut con)
                .await
                .map_err(redis_error)?;
            let status = match reply.first() {
                Some(Value::Int(s)) => *s,
                other => {
                    return Err(Error::internal(anyhow::anyhow!(
                        "unexpected reply from apply.lua: {other:?}"
                    )));
                }
            };
            match status {
                0 => {
                    drop((ticket, shared));
                    let record = reply.get(1).and_then(bytes).ok_or_else(|| {
                        Error::internal(anyhow::anyhow!("apply.lua replay without a record"))
                    })?;
                    let _: OpRecord = unpack(record)?;
                    // A record in Redis whose change never reached the ledger must not be
                    // replayed as if it had: rebuild and apply the operation for real. The
                    // answer is the ledger's copy: Redis may hold one that never gets there
                    // (a retry decided again, or a reused key, until taken back out).
                    if let Some(stored) = self.durable(tenant_id, member_id, key).await? {
                        return replay(stored, key, &fingerprint).map(Some);
                    }
                    let why = "a replayed operation is not in the ledger";
                    self.reset(tenant_id, member_id, seen, why).await?;
                }
                1 => {
                    let change: Change = match reply
                        .get(1)
                        .and_then(bytes)
                        .ok_or_else(|| {
                            Error::internal(anyhow::anyhow!("apply.lua without a change"))
                        })
                        .and_then(unpack)
                    {
                        Ok(change) => change,
                        Err(e) => {
                            // Applied in Redis but unreadable here: take it back out.
                            drop((ticket, shared));
                            let _ = self.drop_state(tenant_id, member_id, None).await;
                            return Err(e);
                        }
                    };
                    let record = match reply.get(2).and_then(bytes) {
                        Some(b) if !b.is_empty() => Some(unpack::<OpRecord>(b)?),
                        _ => None,
                    };
                    ticket.turn(change.account.version).await;
                    let submitted = self
                        .ledger
                        .submit(tenant_id, member_id, change.account.version - 1, &change)
                        .await;
                    drop((ticket, shared));
                    let first = match submitted {
                        Ok(pending) => pending.await,
                        Err(e) => Err(e),
                    };
                    match self
                        .settle(tenant_id, member_id, &change, first, seen)
                        .await
                    {
                        Ok(Commit::Done) => return Ok(record),
                        Ok(Commit::Behind) => {
                            let why = "the change before it never reached the ledger";
                            self.reset(tenant_id, member_id, seen, why).await?;
                        }
                        Ok(Commit::Diverged) => {
                            // The ledger may hold the operation itself, decided again
                            // because Redis no longer held its record: the change is taken
                            // back out, and the retry gets the stored reply.
                            let why = "the ledger holds another change in its place";
                            self.reset(tenant_id, member_id, seen, why).await?;
                            if !key.is_empty()
                                && let Some(stored) =
                                    self.ledger.record(tenant_id, member_id, key).await?
                            {
                                return replay(stored, key, &fingerprint).map(Some);
                            }
                        }
                        Err(e) => {
                            // Not acknowledged: take the change back out of the hot state
                            // (if nothing came after it) so no reader sees it.
                            let _ = self
                                .drop_state(tenant_id, member_id, Some(&change.account.stamp))
                                .await;
                            return Err(e);
                        }
                    }
                }
                2 => {
                    drop((ticket, shared));
                    self.rebuild(tenant_id, member_id).await?;
                }
                4 => {
                    drop((ticket, shared));
                    // The record it refers to was dropped from Redis for its age.
                    referenced_absent = !self
                        .bring_back(tenant_id, member_id, referenced, now, seen)
                        .await?;
                }
                5 => {
                    drop((ticket, shared));
                    let text = |i: usize| {
                        reply
                            .get(i)
                            .and_then(bytes)
                            .map(|b| String::from_utf8_lossy(b).into_owned())
                            .unwrap_or_default()
                    };
                    let version = match reply.get(3) {
                        Some(Value::Int(v)) => *v,
                        _ => 0,
                    };
                    let (refused, stamp) = (refusal(&text(1), text(2)), text(4));
                    let decided_on = (version, stamp.as_str());
                    match self
                        .weigh(
                            tenant_id,
                            member_id,
                            key,
                            &fingerprint,
                            refused,
                            decided_on,
                            seen,
                        )
                        .await?
                    {
                        Weighed::Stands(refused) => return Err(refused),
                        Weighed::Replay(stored) => return Ok(Some(*stored)),
                        Weighed::Rerun => referenced_absent = false,
                        Weighed::Overtaken if overtaken < MAX_OVERTAKEN => {
                            overtaken += 1;
                            attempts -= 1;
                            referenced_absent = false;
                        }
                        Weighed::Overtaken => referenced_absent = false,
                    }
                }
                3 => {
                    drop((ticket, shared));
                    // Nothing to do in the hot state; make sure it is not behind the ledger
                    // (the expiry process relies on this answer).
                    let hot = match reply.get(1) {
                        Some(Value::Int(v)) => *v,
                        _ => 0,
                    };
                    if self.ledger.version(tenant_id, member_id).await? <= hot {
                        return Ok(None);
                    }
                    let why = "the state is behind the ledger";
                    self.reset(tenant_id, member_id, seen, why).await?;
                }
                other => {
                    return Err(Error::internal(anyhow::anyhow!(
                        "unexpected status {other} from apply.lua"
                    )));
                }
            }
        }
        Err(Error::Unavailable(
            "the member's balance state kept changing; try again".into(),
        ))
    }
}

#[async_trait::async_trait]
impl BalanceStore for RedisBalanceStore {
    /// Runs to completion even when the caller goes away: once the script has applied a
    /// change, its ledger append (or its removal from the hot state) must happen.
    async fn execute(
        &self,
        tenant_id: &str,
        member_id: &str,
        key: &str,
        op: Op,
        now: Millis,
    ) -> Result<Option<OpRecord>> {
        // The script trusts its operation as `ledger::apply` does after this check.
        ledger::validate(&op)?;
        let this = self.clone();
        let (tenant, member, key) = (
            tenant_id.to_string(),
            member_id.to_string(),
            key.to_string(),
        );
        // The task keeps the caller's span, so the ledger commit stays in the call's trace.
        let run = async move { this.run(&tenant, &member, &key, op, now).await };
        tokio::spawn(tracing::Instrument::in_current_span(run))
            .await
            .map_err(Error::internal)?
    }

    async fn account(&self, tenant_id: &str, member_id: &str) -> Result<Account> {
        if let Some(account) = self.get_state(tenant_id, member_id).await? {
            return Ok(account);
        }
        self.rebuild(tenant_id, member_id).await?;
        Ok(self
            .get_state(tenant_id, member_id)
            .await?
            .unwrap_or_default())
    }

    async fn record(
        &self,
        tenant_id: &str,
        member_id: &str,
        key: &str,
    ) -> Result<Option<OpRecord>> {
        let member_keys = keys(tenant_id, member_id);
        for _ in 0..2 {
            let mut con = self.redis.clone();
            let (exists, raw): (bool, Option<Vec<u8>>) = redis::pipe()
                .exists(&member_keys.state)
                .hget(&member_keys.records, key)
                .query_async(&mut con)
                .await
                .map_err(redis_error)?;
            if exists {
                return match raw {
                    Some(b) => unpack(&b).map(Some),
                    // Redis keeps recent records only.
                    None => self.ledger.record(tenant_id, member_id, key).await,
                };
            }
            self.rebuild(tenant_id, member_id).await?;
        }
        Err(Error::Unavailable(
            "the member's balance state is being rebuilt".into(),
        ))
    }

    async fn entries(&self, tenant_id: &str, member_id: &str, query: &EntryQuery) -> Result<Page> {
        self.ledger.entries(tenant_id, member_id, query).await
    }

    async fn members(
        &self,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<(String, String)>> {
        self.ledger.members(after, limit).await
    }

    async fn due(&self, now: Millis, limit: usize) -> Result<Vec<Due>> {
        self.ledger.due(now, limit).await
    }

    async fn done_due(&self, due: &Due) -> Result<()> {
        self.ledger.done_due(due).await
    }

    async fn ping(&self) -> Result<()> {
        let mut con = self.redis.clone();
        let _: String = redis::cmd("PING")
            .query_async(&mut con)
            .await
            .map_err(redis_error)?;
        self.ledger.ping().await
    }
}

#[cfg(test)]
mod tests {
    use loyalty_platform::redis_server::RedisServer;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::ledger::{Actor, Kind, Part, Reason, Reply};
    use crate::store::embedded::EmbeddedBalanceStore;

    async fn setup() -> (
        RedisServer,
        tempfile::TempDir,
        Arc<EmbeddedBalanceStore>,
        RedisBalanceStore,
    ) {
        let server = RedisServer::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(EmbeddedBalanceStore::open(&dir.path().join("ledger.redb")).unwrap());
        let store = RedisBalanceStore::connect(&server.url(), ledger.clone()).unwrap();
        (server, dir, ledger, store)
    }

    /// The same suite on a three-node Redis Cluster: every script call and pipeline touches
    /// one member's keys, which share a hash slot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_on_redis_cluster() {
        let nodes = RedisServer::start_cluster(3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(EmbeddedBalanceStore::open(&dir.path().join("ledger.redb")).unwrap());
        let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
        let store = RedisBalanceStore::connect_cluster(&urls, ledger).unwrap();
        crate::store::conformance::run_all(Arc::new(store.clone())).await;
        // The members' keys really are spread over the nodes.
        let mut holding = 0;
        for node in &nodes {
            let out = std::process::Command::new("redis-cli")
                .args(["-p", &node.port().to_string(), "dbsize"])
                .output()
                .unwrap();
            let keys: u64 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0);
            holding += u64::from(keys > 0);
        }
        assert!(holding >= 2, "keys on {holding} of 3 nodes");
    }

    /// Runs the script for member ("t", "m") as a process that dies before the ledger
    /// append would.
    async fn apply_without_ledger(store: &RedisBalanceStore, key: &str, op: &Op, now: Millis) {
        let mut con = store.redis.clone();
        let mut invocation = keys("t", "m").on(&store.apply);
        invocation
            .arg(now)
            .arg(key)
            .arg(op.fingerprint())
            .arg(pack(op).unwrap())
            .arg("")
            .arg(store.retention_ms)
            .arg("");
        let _: Vec<Value> = invocation.invoke_async(&mut con).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        let (_server, _dir, _ledger, store) = setup().await;
        let store = Arc::new(store);
        crate::store::conformance::run_all(store.clone()).await;
        crate::store::conformance::filtered_pages_past_the_scan_bound(store).await;
    }

    fn accrue(amount: i64) -> Op {
        Op::Accrue {
            amount,
            reason: Reason::Accrual,
            reference: String::new(),
            activate_at: None,
            expire_at: None,
        }
    }

    fn redeem(amount: i64) -> Op {
        Op::Redeem {
            amount,
            reference: String::new(),
            up_to_available: false,
        }
    }

    fn random_op(rng: &mut StdRng, n: usize, now: Millis) -> (String, Op) {
        let earlier = |rng: &mut StdRng| format!("k{}", rng.random_range(0..n.max(1)));
        let op = match rng.random_range(0..12) {
            0 | 1 => Op::Accrue {
                amount: rng.random_range(1..1_000),
                reason: Reason::Accrual,
                reference: "r".into(),
                activate_at: rng.random_bool(0.3).then(|| now + rng.random_range(1..500)),
                expire_at: rng
                    .random_bool(0.6)
                    .then(|| now + rng.random_range(500..5_000)),
            },
            2 => Op::Redeem {
                amount: rng.random_range(1..1_500),
                reference: "r".into(),
                up_to_available: rng.random_bool(0.5),
            },
            3 => Op::Hold {
                amount: rng.random_range(1..800),
                reference: "pos".into(),
                timeout_ms: rng.random_range(1..3_000),
            },
            4 => Op::Confirm {
                hold_key: earlier(rng),
                amount: rng.random_range(0..900),
            },
            5 => Op::Cancel {
                hold_key: earlier(rng),
            },
            6 => Op::Reverse {
                original_key: earlier(rng),
                amount: rng.random_range(1..1_000),
                reference: "refund".into(),
            },
            7 => Op::Activate {
                accrual_key: rng.random_bool(0.5).then(|| earlier(rng)),
            },
            8 => Op::Adjust {
                amount: rng.random_range(-300..300i64).max(1)
                    * if rng.random_bool(0.3) { -1 } else { 1 },
                actor: Actor {
                    id: "manager:anna".into(),
                    comment: "check".into(),
                },
                expire_at: rng.random_bool(0.5).then(|| now + 4_000),
            },
            9 => Op::Expire,
            10 => {
                // A merged member's accrual or redemption taken over (sometimes a kind that
                // cannot be, refused alike).
                let amount = rng.random_range(1..600);
                let kind = match rng.random_range(0..5) {
                    0 => Kind::Hold,
                    1 | 2 => Kind::Credit,
                    _ => Kind::Debit,
                };
                let parts = if kind == Kind::Debit {
                    vec![Part {
                        expire_at: rng.random_bool(0.7).then(|| now + 3_000),
                        amount,
                        returned: 0,
                    }]
                } else {
                    Vec::new()
                };
                Op::Adopt {
                    from_member: "dup".into(),
                    record: Box::new(OpRecord {
                        fingerprint: "f".into(),
                        kind,
                        amount,
                        reversed: rng.random_range(0..=amount / 2),
                        parts,
                        hold: None,
                        hold_expire_at: None,
                        reply: Reply::default(),
                    }),
                }
            }
            _ => accrue(rng.random_range(1..50)),
        };
        let key = if op.is_keyless() {
            String::new()
        } else if rng.random_bool(0.1) {
            earlier(rng)
        } else {
            format!("k{n}")
        };
        (key, op)
    }

    fn same_outcome(a: &Result<Option<OpRecord>>, b: &Result<Option<OpRecord>>) -> bool {
        match (a, b) {
            (Ok(x), Ok(y)) => x == y,
            (Err(x), Err(y)) => std::mem::discriminant(x) == std::mem::discriminant(y),
            _ => false,
        }
    }

    /// The Lua script and the Rust ledger agree on every outcome of random sequences:
    /// replies, refusals, records, state and entries.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lua_and_rust_rules_agree() {
        let (_server, dir, _ledger, redis) = setup().await;
        // Records leave Redis a second (of the test's clock) after their last change, so
        // retries, reversals, confirmations and activations often need one from the ledger.
        let redis = redis.with_record_retention(Duration::from_secs(1));
        let reference = EmbeddedBalanceStore::open(&dir.path().join("reference.redb")).unwrap();
        for seed in 0..40u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let member = format!("m{seed}");
            let mut now = 1_000;
            let mut sent: Vec<(String, Op)> = Vec::new();
            for n in 0..60 {
                if rng.random_bool(0.2) {
                    now += rng.random_range(1..1_500);
                }
                // Sometimes an exact retry of an earlier call, often past the retention.
                let (key, op) = if !sent.is_empty() && rng.random_bool(0.1) {
                    sent[rng.random_range(0..sent.len())].clone()
                } else {
                    random_op(&mut rng, n, now)
                };
                sent.push((key.clone(), op.clone()));
                let want = reference.execute("t", &member, &key, op.clone(), now).await;
                let got = redis.execute("t", &member, &key, op.clone(), now).await;
                assert!(
                    same_outcome(&want, &got),
                    "seed {seed} step {n} {key} {op:?}:\n rust {want:?}\n lua  {got:?}"
                );
            }
            let mut want = reference.account("t", &member).await.unwrap();
            let got = redis.account("t", &member).await.unwrap();
            want.stamp.clone_from(&got.stamp);
            assert_eq!(want, got, "seed {seed}");
            let all = EntryQuery {
                limit: 1_000,
                ..Default::default()
            };
            assert_eq!(
                BalanceStore::entries(&reference, "t", &member, &all)
                    .await
                    .unwrap(),
                redis.entries("t", &member, &all).await.unwrap()
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lost_hot_state_is_rebuilt_from_the_ledger() {
        let (server, _dir, _ledger, store) = setup().await;
        let first = store.execute("t", "m", "a", accrue(100), 0).await.unwrap();
        store.execute("t", "m", "r", redeem(30), 0).await.unwrap();
        let mut con = store.redis.clone();
        let _: () = redis::cmd("FLUSHALL").query_async(&mut con).await.unwrap();
        // A retry after the loss replays instead of accruing again.
        assert_eq!(
            store.execute("t", "m", "a", accrue(100), 5).await.unwrap(),
            first
        );
        assert_eq!(store.account("t", "m").await.unwrap().view(5).active, 70);
        drop(server);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hot_state_ahead_of_or_behind_the_ledger_never_reaches_it() {
        let (_server, _dir, ledger, store) = setup().await;
        store.execute("t", "m", "a", accrue(100), 0).await.unwrap();
        let snapshot = state_of_m(&store).await;

        // Ahead: an accrual applied to Redis whose ledger append never happened (the
        // process died in between). The next operation must not build on it.
        apply_without_ledger(&store, "phantom", &accrue(1_000_000), 0).await;
        let err = store
            .execute("t", "m", "big", redeem(500), 1)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        assert_eq!(store.account("t", "m").await.unwrap().total, 100);
        assert_eq!(Ledger::version(ledger.as_ref(), "t", "m").await.unwrap(), 1);

        // Behind: Redis restored from an old snapshot after more operations.
        store.execute("t", "m", "r", redeem(60), 2).await.unwrap();
        put_state_of_m(&store, snapshot).await;
        let err = store
            .execute("t", "m", "r2", redeem(50), 3)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::FailedPrecondition(_)),
            "40 left, not 100: {err}"
        );
        let account = store.account("t", "m").await.unwrap();
        assert_eq!(account.total, 40);
        let all = EntryQuery {
            limit: 100,
            ..Default::default()
        };
        let amounts: Vec<i64> = store
            .entries("t", "m", &all)
            .await
            .unwrap()
            .entries
            .iter()
            .map(|e| e.amount)
            .collect();
        assert_eq!(amounts, [-60, 100]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_that_never_reached_the_ledger_is_not_replayed() {
        let (_server, _dir, ledger, store) = setup().await;
        store.execute("t", "m", "a", accrue(100), 0).await.unwrap();
        // The script applies "ghost" but the process dies before the ledger append.
        let ghost = accrue(5);
        apply_without_ledger(&store, "ghost", &ghost, 1).await;
        // The client's retry must apply it for real, once.
        store.execute("t", "m", "ghost", ghost, 2).await.unwrap();
        assert!(
            Ledger::record(ledger.as_ref(), "t", "m", "ghost")
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(store.account("t", "m").await.unwrap().total, 105);
        assert_eq!(Ledger::version(ledger.as_ref(), "t", "m").await.unwrap(), 2);
    }

    /// Member ("t", "m")'s hot state as stored.
    async fn state_of_m(store: &RedisBalanceStore) -> Vec<u8> {
        let mut con = store.redis.clone();
        redis::cmd("GET")
            .arg(keys("t", "m").state)
            .query_async(&mut con)
            .await
            .unwrap()
    }

    /// Puts `state` back as member ("t", "m")'s hot state, as an old snapshot would.
    async fn put_state_of_m(store: &RedisBalanceStore, state: Vec<u8>) {
        let mut con = store.redis.clone();
        let _: () = redis::cmd("SET")
            .arg(keys("t", "m").state)
            .arg(state)
            .query_async(&mut con)
            .await
            .unwrap();
    }

    async fn redis_int(store: &RedisBalanceStore, cmd: &str, key: &str) -> i64 {
        let mut con = store.redis.clone();
        redis::cmd(cmd)
            .arg(key)
            .query_async(&mut con)
            .await
            .unwrap()
    }

    /// Records leave Redis once older than the retention, and every operation that needs
    /// one still gets the ledger's: retries, reuses, reversals and reads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_past_the_retention_leave_redis_and_still_answer() {
        let (_server, _dir, _ledger, store) = setup().await;
        let store = store.with_record_retention(Duration::from_secs(60));
        let minute = 60_000;
        let k = keys("t", "m");
        let accrued = store.execute("t", "m", "a", accrue(100), 0).await.unwrap();
        let redeemed = store.execute("t", "m", "r", redeem(30), 0).await.unwrap();
        assert_eq!(redis_int(&store, "HLEN", &k.records).await, 2);
        let ttl = redis_int(&store, "PTTL", &k.records).await;
        assert!(ttl > 0 && ttl <= minute, "{ttl}");

        // A change two minutes on drops both (they were last written before the retention).
        store
            .execute("t", "m", "b", accrue(10), 2 * minute)
            .await
            .unwrap();
        assert_eq!(redis_int(&store, "HLEN", &k.records).await, 1);
        assert_eq!(redis_int(&store, "ZCARD", &k.times).await, 1);

        // Spend everything, so a retry of "r" decided again would be refused.
        store
            .execute("t", "m", "all", redeem(80), 2 * minute)
            .await
            .unwrap();
        let at = 3 * minute;
        assert_eq!(
            store.execute("t", "m", "r", redeem(30), at).await.unwrap(),
            redeemed
        );
        assert_eq!(
            store.execute("t", "m", "a", accrue(100), at).await.unwrap(),
            accrued
        );
        let reuse = store
            .execute("t", "m", "a", accrue(7), at)
            .await
            .unwrap_err();
        assert!(matches!(reuse, Error::AlreadyExists(_)), "{reuse}");
        assert_eq!(store.account("t", "m").await.unwrap().total, 0);

        // A refund of the dropped accrual finds it, and stays capped by it.
        store
            .execute("t", "m", "b2", accrue(500), at)
            .await
            .unwrap();
        let later = 5 * minute;
        let reverse = |amount| Op::Reverse {
            original_key: "a".into(),
            amount,
            reference: "refund".into(),
        };
        store
            .execute("t", "m", "x1", reverse(60), later)
            .await
            .unwrap();
        let over = store
            .execute("t", "m", "x2", reverse(50), later)
            .await
            .unwrap_err();
        assert!(matches!(over, Error::FailedPrecondition(_)), "{over}");
        assert_eq!(
            store.record("t", "m", "a").await.unwrap().unwrap().reversed,
            60
        );
        assert_eq!(store.account("t", "m").await.unwrap().total, 440);
        // Reads of a dropped record come from the ledger too.
        store
            .execute("t", "m", "c", accrue(1), 10 * minute)
            .await
            .unwrap();
        assert_eq!(redis_int(&store, "HLEN", &k.records).await, 1);
        assert_eq!(store.record("t", "m", "r").await.unwrap(), redeemed);
        let missing = Op::Reverse {
            original_key: "nope".into(),
            amount: 1,
            reference: String::new(),
        };
        let err = store
            .execute("t", "m", "x3", missing, 10 * minute)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err}");

        // However long the history, Redis holds only the retention's records.
        for i in 0..300 {
            let key = format!("daily{i}");
            store
                .execute("t", "m", &key, accrue(1), 11 * minute + i * 10_000)
                .await
                .unwrap();
        }
        assert!(redis_int(&store, "HLEN", &k.records).await <= 7);

        // A member only ever read is not kept for ever.
        store.account("t", "reader").await.unwrap();
        let ttl = redis_int(&store, "PTTL", &keys("t", "reader").state).await;
        assert!(ttl > 0 && ttl <= minute, "{ttl}");
        assert_eq!(redis_int(&store, "PTTL", &k.state).await, -1);
    }

    /// A record is brought back from the ledger only onto the ledger's own state: a hot
    /// state ahead of it (a change that never reached the ledger) is rebuilt first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_is_brought_back_only_onto_the_ledgers_state() {
        let (_server, _dir, ledger, store) = setup().await;
        store.execute("t", "m", "a", accrue(100), 0).await.unwrap();
        apply_without_ledger(&store, "ghost", &accrue(1_000), 1).await;
        let mut con = store.redis.clone();
        let _: () = redis::cmd("HDEL")
            .arg(keys("t", "m").records)
            .arg("a")
            .query_async(&mut con)
            .await
            .unwrap();
        // The ledger's copy of "a" (version 1) is not put onto the ghost's state (version 2).
        let mut invocation = keys("t", "m").on(&store.restore);
        let a = Ledger::record(ledger.as_ref(), "t", "m", "a")
            .await
            .unwrap();
        invocation
            .arg(2)
            .arg(store.retention_ms)
            .arg("a")
            .arg(pack(&a.unwrap()).unwrap())
            .arg(1);
        let restored: i64 = invocation.invoke_async(&mut con).await.unwrap();
        assert_eq!(restored, -1);
        let refund = Op::Reverse {
            original_key: "a".into(),
            amount: 40,
            reference: "refund".into(),
        };
        store.execute("t", "m", "x", refund, 2).await.unwrap();
        let account = store.account("t", "m").await.unwrap();
        assert_eq!((account.total, account.version), (60, 2));
        assert_eq!(
            store.record("t", "m", "a").await.unwrap().unwrap().reversed,
            40
        );
        assert_eq!(store.record("t", "m", "ghost").await.unwrap(), None);
    }

    /// A refusal decided on a change the ledger never got (here a redemption whose process
    /// died before its append) does not stand: the operation is decided again on the
    /// ledger's state.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusal_stands_only_when_decided_on_the_ledgers_state() {
        let (_server, _dir, _ledger, store) = setup().await;
        store.execute("t", "m", "a", accrue(100), 0).await.unwrap();
        apply_without_ledger(&store, "ghost", &redeem(50), 1).await;
        store.execute("t", "m", "r", redeem(80), 2).await.unwrap();
        assert_eq!(store.account("t", "m").await.unwrap().total, 20);
        // A refusal decided on the ledger's state stands.
        let err = store
            .execute("t", "m", "r2", redeem(30), 3)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("insufficient"), "{err}");
    }

    /// A refusal decided on a hot state behind the ledger (restored from an old snapshot)
    /// is decided again on the rebuilt state, and answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusal_on_a_state_behind_the_ledger_is_decided_again() {
        let (_server, _dir, _ledger, store) = setup().await;
        store.execute("t", "m", "a", accrue(100), 0).await.unwrap();
        let snapshot = state_of_m(&store).await;
        store.execute("t", "m", "r", redeem(80), 1).await.unwrap();
        put_state_of_m(&store, snapshot).await;
        let err = store
            .execute("t", "m", "big", redeem(150), 2)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("insufficient points: 20 active"),
            "{err}"
        );
        assert_eq!(store.account("t", "m").await.unwrap().total, 20);
    }

    /// Concurrent retries of an operation whose record left Redis all get its first reply,
    /// never the copy a retry decided again leaves in Redis until it is taken back out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_retries_past_the_retention_get_the_first_reply() {
        let (_server, _dir, _ledger, store) = setup().await;
        let store = store.with_record_retention(Duration::from_secs(60));
        let first = store.execute("t", "m", "a", accrue(100), 0).await.unwrap();
        let redeemed = store.execute("t", "m", "r", redeem(30), 0).await.unwrap();
        store
            .execute("t", "m", "b", accrue(1), 120_000)
            .await
            .unwrap();
        let mut retries = tokio::task::JoinSet::new();
        for i in 0..8 {
            let store = store.clone();
            retries.spawn(async move {
                let (key, op) = if i % 2 == 0 {
                    ("a", accrue(100))
                } else {
                    ("r", redeem(30))
                };
                (i, store.execute("t", "m", key, op, 121_000).await)
            });
        }
        while let Some(done) = retries.join_next().await {
            let (i, got) = done.unwrap();
            let want = if i % 2 == 0 { &first } else { &redeemed };
            assert_eq!(got.unwrap().as_ref(), want.as_ref(), "retry {i}");
        }
        assert_eq!(store.account("t", "m").await.unwrap().total, 71);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lost_records_never_apply_an_operation_twice() {
        let (_server, _dir, _ledger, store) = setup().await;
        let first = store.execute("t", "m", "a", accrue(100), 0).await.unwrap();
        let mut con = store.redis.clone();
        let _: () = redis::cmd("DEL")
            .arg(keys("t", "m").records)
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(
            store.execute("t", "m", "a", accrue(100), 1).await.unwrap(),
            first
        );
        assert_eq!(store.account("t", "m").await.unwrap().total, 100);
    }
}
