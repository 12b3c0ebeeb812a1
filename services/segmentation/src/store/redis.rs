//! The segmentation store on Redis, shared by every segmentation replica.
//!
//! All of a tenant's keys share one hash tag (one slot of a cluster). A member changes in
//! one script (`member.lua`) that checks the member is still at the version the caller read
//! (every change of its features or memberships moves it on), then records the events'
//! ids, writes the features and sets the membership flags with their history. The caller
//! reads the member, applies the events and evaluates the rules in Rust, and reads again
//! when another writer got in between, so two replicas consuming one stream, or a
//! re-evaluation beside the consumer, never lose each other's changes. A flag is written only
//! while its segment is at the version its rule was compiled from. See ARCHITECTURE.md,
//! "Segmentation on Redis".

use std::collections::{BTreeMap, BTreeSet};

use futures_util::StreamExt;
use loyalty_platform::clock::Millis;
use loyalty_platform::embedded::{decode, digest_of_tables, encode};
use loyalty_platform::error::{Error, Result};
use loyalty_platform::redis_conn::{
    CopyMark, RememberedSet, ScrubMark, StoreConn, conflict_pause, lex_after,
};
use redis::{Script, Value};

use super::embedded::{EmbeddedSegmentationStore, Row, Table as CopyTable};
use super::{
    Change, DEDUP_WINDOW_MS, FeatureChange, MAX_SEGMENTS, MembershipChange, RfmRun, Rule, RuleBook,
    SegmentDef, SegmentationStore,
};
use crate::expr::Context;
use crate::features::Features;
use crate::rfm::Score;

/// Tenants with segments, and tenants with member features (each its own key).
const TENANTS_WITH_SEGMENTS: &str = "ls:tenants:segments";
const TENANTS_WITH_FEATURES: &str = "ls:tenants:features";
/// Up while an erasure's replaced data may still be in the append-only files.
const SCRUB: ScrubMark = ScrubMark::new("ls:scrub");
/// What a segment's version reads while the segment is being deleted: no rule matches it.
const DELETING: &str = "deleting";
/// How often one member's change is read and tried again when another writer got in.
const MAX_ATTEMPTS: usize = 32;
/// Members changed at once.
const CONCURRENCY: usize = 128;
/// Members taken out of a deleted segment per script call.
const LEAVE_CHUNK: usize = 200;

fn padded(ms: Millis) -> String {
    format!("{:020}", ms.max(0))
}

/// A segment's version and update time as the scripts compare them.
fn stamp(version: i64, update_time: Millis) -> String {
    format!("{version}:{update_time}")
}

struct Keys {
    p: String,
}

impl Keys {
    /// The tag holds the tenant's length, so every key of a tenant has one tag whatever the
    /// id contains.
    fn of(tenant: &str) -> Self {
        Self {
            p: format!("ls:{{{}:{tenant}}}", tenant.len()),
        }
    }
    fn k(&self, name: &str) -> String {
        format!("{}:{name}", self.p)
    }
    fn segments_of(&self, member: &str) -> String {
        format!("{}:ms:{member}", self.p)
    }
    fn history_of(&self, member: &str) -> String {
        format!("{}:h:{member}", self.p)
    }
    fn members_of(&self, segment: &str) -> String {
        format!("{}:sm:{segment}", self.p)
    }
    fn rfm(&self, generation: u64) -> String {
        format!("{}:rfm:{generation}", self.p)
    }
}

/// What errors call this store.
const STORE: &str = "segmentation store";

/// What a flag names instead of a segment version when any version will do (static lists),
/// as long as the segment exists and is not being deleted.
const ANY_LIVE_VERSION: &str = "*";

/// `member.lua`'s answer: how many memberships changed, or `None` for a conflict.
fn changed_by(answer: &[Value]) -> Result<Option<usize>> {
    let word: String = answer
        .first()
        .map(|v| redis::from_redis_value(v.clone()))
        .transpose()
        .map_err(Error::internal)?
        .unwrap_or_default();
    if word != "ok" {
        return Ok(None);
    }
    Ok(Some(
        answer
            .get(1)
            .map(|v| redis::from_redis_value(v.clone()))
            .transpose()
            .map_err(Error::internal)?
            .unwrap_or(0),
    ))
}

/// What `member.lua` writes for one member.
struct MemberWrite<'a> {
    member: &'a str,
    /// The member's version as read (`None`: never written).
    version: Option<&'a str>,
    /// Its new features, encoded (empty: unchanged).
    features: &'a [u8],
    /// Event ids newly applied.
    ids: &'a [&'a str],
    /// (segment, is a member, the segment version the flag was decided on).
    flags: &'a [(&'a str, bool, &'a str)],
}

/// One member's work in a write: its new events and the rules to evaluate it against.
struct MemberWork {
    tenant: String,
    member: String,
    /// Its changes in batch order (an id twice in the batch counts once).
    changes: Vec<FeatureChange>,
    /// The rules to evaluate; `None`: none at all (a ledger entry no rule reads).
    rules: Option<Vec<Rule>>,
}

/// What a member's write did.
#[derive(Default)]
struct Done {
    new: usize,
    changed: usize,
}

#[derive(Clone)]
pub struct RedisSegmentationStore {
    redis: StoreConn,
    member: Script,
    segment: Script,
    leave: Script,
    mark: Script,
    gone: Script,
    forget: Script,
    publish: Script,
    /// [`TENANTS_WITH_FEATURES`].
    with_features: RememberedSet,
}

impl std::fmt::Debug for RedisSegmentationStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSegmentationStore")
            .field("redis", &self.redis)
            .finish_non_exhaustive()
    }
}

impl RedisSegmentationStore {
    /// The rest of a deletion once the segment's version reads [`DELETING`]: its members
    /// leave a chunk at a time, then its definition goes. Stops, false, as soon as the
    /// segment is no longer being deleted (another process finished it, and it may have been
    /// created again since).
    async fn finish(&self, keys: &Keys, segment_id: &str, now: Millis) -> Result<bool> {
        let members_key = keys.members_of(segment_id);
        loop {
            let members: Vec<String> = self
                .redis
                .query(
                    redis::cmd("ZRANGE")
                        .arg(&members_key)
                        .arg(0)
                        .arg(LEAVE_CHUNK - 1),
                )
                .await?;
            let mut invocation = self.leave.prepare_invoke();
            invocation
                .key(&members_key)
                .key(keys.k("mv"))
                .key(keys.k("segv"));
            for m in &members {
                invocation.key(keys.segments_of(m)).key(keys.history_of(m));
            }
            invocation.arg(segment_id).arg(padded(now)).arg(DELETING);
            for m in &members {
                invocation.arg(m);
            }
            let left: i64 = self.redis.invoke(&invocation).await?;
            if left < 0 {
                return Ok(false);
            }
            if members.is_empty() {
                break;
            }
        }
        let mut invocation = self.gone.prepare_invoke();
        invocation
            .key(keys.k("segs"))
            .key(keys.k("segv"))
            .arg(segment_id)
            .arg(DELETING);
        let gone: i64 = self.redis.invoke(&invocation).await?;
        Ok(gone == 1)
    }
    /// One multiplexed connection to the Redis at `url`, opened on first use.
    pub fn connect(url: &str) -> anyhow::Result<Self> {
        Ok(Self::with(StoreConn::single(STORE, url)?))
    }

    /// One multiplexed connection per node of the Redis Cluster seeded by `nodes`.
    pub fn connect_cluster(nodes: &[String]) -> anyhow::Result<Self> {
        Ok(Self::with(StoreConn::cluster(STORE, nodes)?))
    }

    /// The Redis (or cluster) of `storage.redis`.
    pub fn for_config(config: &loyalty_platform::config::RedisConfig) -> anyhow::Result<Self> {
        Ok(Self::with(StoreConn::for_config(STORE, config)?))
    }

    fn with(redis: StoreConn) -> Self {
        Self {
            redis,
            member: Script::new(include_str!("redis/member.lua")),
            segment: Script::new(include_str!("redis/segment.lua")),
            leave: Script::new(include_str!("redis/leave.lua")),
            mark: Script::new(include_str!("redis/mark.lua")),
            gone: Script::new(include_str!("redis/gone.lua")),
            forget: Script::new(include_str!("redis/forget.lua")),
            publish: Script::new(include_str!("redis/publish.lua")),
            with_features: RememberedSet::new(TENANTS_WITH_FEATURES),
        }
    }

    async fn register_features(&self, tenant: &str) -> Result<()> {
        self.with_features.add(&self.redis, tenant).await
    }

    /// Reads one member, applies its new events, evaluates it and writes the difference;
    /// again when another writer changed the member in between.
    async fn change_member(&self, work: &MemberWork, now: Millis) -> Result<Done> {
        let keys = Keys::of(&work.tenant);
        let member = work.member.as_str();
        let mut ids: Vec<&str> = Vec::new();
        for c in &work.changes {
            if !ids.contains(&c.event_id.as_str()) {
                ids.push(&c.event_id);
            }
        }
        // Each rule's segment version; the script writes a flag only while its segment is
        // still at it.
        let rules: Vec<(&Rule, String)> = work
            .rules
            .iter()
            .flatten()
            .map(|r| (r, stamp(r.version, r.update_time)))
            .collect();
        for attempt in 0..MAX_ATTEMPTS {
            let mut pipe = redis::pipe();
            pipe.atomic()
                .cmd("HGET")
                .arg(keys.k("mv"))
                .arg(member)
                .cmd("HGET")
                .arg(keys.k("feat"))
                .arg(member)
                .cmd("SMEMBERS")
                .arg(keys.segments_of(member));
            if !ids.is_empty() {
                pipe.cmd("HMGET").arg(keys.k("applied")).arg(&ids);
            }
            let mut replies: std::collections::VecDeque<Value> =
                self.redis.pipeline::<Vec<Value>>(&pipe).await?.into();
            let mut next = || -> Result<Value> {
                replies
                    .pop_front()
                    .ok_or_else(|| Error::internal(anyhow::anyhow!("short member read")))
            };
            let version: Option<String> =
                redis::from_redis_value(next()?).map_err(Error::internal)?;
            let stored: Option<Vec<u8>> =
                redis::from_redis_value(next()?).map_err(Error::internal)?;
            let current: BTreeSet<String> =
                redis::from_redis_value(next()?).map_err(Error::internal)?;
            let applied: Vec<Option<String>> = if ids.is_empty() {
                Vec::new()
            } else {
                redis::from_redis_value(next()?).map_err(Error::internal)?
            };

            let mut features = match &stored {
                Some(bytes) => Features::decode(bytes)?,
                None => Features::default(),
            };
            let mut new_ids = Vec::new();
            for c in &work.changes {
                let i = ids.iter().position(|id| *id == c.event_id).unwrap_or(0);
                if applied.get(i).is_some_and(Option::is_some) || new_ids.contains(&ids[i]) {
                    continue;
                }
                new_ids.push(ids[i]);
                match &c.change {
                    Change::Purchase(p) => features.apply_purchase(p),
                    Change::Refund(r) => features.apply_refund(r),
                    Change::Member(m) => features.apply_member(m),
                    Change::Ledger(l) => features.apply_ledger(l),
                    Change::Erasure(m) => features.apply_member(m),
                }
            }
            // The flags that change.
            let cx = Context { now };
            let mut flags: Vec<(&str, bool, &str)> = Vec::new();
            for (rule, version) in &rules {
                let is_member = rule.expr.matches(&features, cx);
                if is_member != current.contains(&rule.segment_id) {
                    flags.push((rule.segment_id.as_str(), is_member, version.as_str()));
                }
            }
            if new_ids.is_empty() && flags.is_empty() {
                return Ok(Done::default());
            }
            if !new_ids.is_empty() {
                self.register_features(&work.tenant).await?;
            }
            let encoded = if new_ids.is_empty() {
                Vec::new()
            } else {
                encode(&features)?
            };
            let write = MemberWrite {
                member,
                version: version.as_deref(),
                features: &encoded,
                ids: &new_ids,
                flags: &flags,
            };
            let invocation = self.member_invocation(&keys, &write, now);
            let answer: Vec<Value> = self.redis.invoke(&invocation).await?;
            if let Some(changed) = changed_by(&answer)? {
                return Ok(Done {
                    new: new_ids.len(),
                    changed,
                });
            }
            conflict_pause(attempt, MAX_ATTEMPTS).await;
        }
        Err(Error::Unavailable(format!(
            "member {member} kept changing while it was written: try again"
        )))
    }

    /// `member.lua` called for `write`.
    fn member_invocation<'a>(
        &'a self,
        keys: &Keys,
        write: &MemberWrite<'_>,
        now: Millis,
    ) -> redis::ScriptInvocation<'a> {
        let mut invocation = self.member.prepare_invoke();
        for name in ["mv", "feat", "fids", "applied", "applied_t", "segv"] {
            invocation.key(keys.k(name));
        }
        invocation
            .key(keys.segments_of(write.member))
            .key(keys.history_of(write.member));
        for (segment, _, _) in write.flags {
            invocation.key(keys.members_of(segment));
        }
        invocation
            .arg(write.member)
            .arg(write.version.unwrap_or_default())
            .arg(write.features)
            .arg(now)
            .arg(padded(now))
            .arg(write.ids.len());
        for id in write.ids {
            invocation.arg(*id);
        }
        invocation.arg(write.flags.len());
        for (segment, on, version) in write.flags {
            invocation
                .arg(*segment)
                .arg(if *on { "1" } else { "0" })
                .arg(*version);
        }
        invocation
    }

    /// Sets static flags of one member (a list upload): whatever the segment's version, as
    /// long as it exists and is not being deleted.
    async fn set_flags(
        &self,
        keys: &Keys,
        member: &str,
        flags: &[(String, bool)],
        now: Millis,
    ) -> Result<usize> {
        for attempt in 0..MAX_ATTEMPTS {
            let version: Option<String> = self
                .redis
                .query(redis::cmd("HGET").arg(keys.k("mv")).arg(member))
                .await?;
            let flags: Vec<(&str, bool, &str)> = flags
                .iter()
                .map(|(segment, on)| (segment.as_str(), *on, ANY_LIVE_VERSION))
                .collect();
            let write = MemberWrite {
                member,
                version: version.as_deref(),
                features: &[],
                ids: &[],
                flags: &flags,
            };
            let invocation = self.member_invocation(keys, &write, now);
            let answer: Vec<Value> = self.redis.invoke(&invocation).await?;
            if let Some(changed) = changed_by(&answer)? {
                return Ok(changed);
            }
            conflict_pause(attempt, MAX_ATTEMPTS).await;
        }
        Err(Error::Unavailable(format!(
            "member {member} kept changing while its flags were set: try again"
        )))
    }

    /// Members with features after `after` in id order, at most `limit`.
    async fn members_with_features(
        &self,
        keys: &Keys,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>> {
        self.redis
            .query(
                redis::cmd("ZRANGEBYLEX")
                    .arg(keys.k("fids"))
                    .arg(lex_after(after))
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit),
            )
            .await
    }

    /// The tenants in the set `set` whose hash `name` still holds something, in order.
    async fn listed(&self, set: &str, name: &str) -> Result<Vec<String>> {
        let listed: Vec<String> = self.redis.query(redis::cmd("SMEMBERS").arg(set)).await?;
        let mut out = Vec::new();
        for tenant in listed {
            let n: i64 = self
                .redis
                .query(redis::cmd("HLEN").arg(Keys::of(&tenant).k(name)))
                .await?;
            if n > 0 {
                out.push(tenant);
            }
        }
        out.sort();
        Ok(out)
    }

    async fn change_all(&self, work: Vec<MemberWork>, now: Millis) -> Result<Vec<Done>> {
        let results: Vec<Result<Done>> = futures_util::stream::iter(work)
            .map(|w| async move { self.change_member(&w, now).await })
            .buffered(CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect()
    }
}

/// Set while `copy_from` runs: a Redis with it holds a copy that did not finish.
const COPYING: &str = "ls:copying";
const COPY: CopyMark = CopyMark {
    key: COPYING,
    service: "segmentation",
    keys: "ls:*",
};

/// What [`RedisSegmentationStore::copy_from`] copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Copied {
    pub tenants: usize,
    pub segments: u64,
    pub members_with_features: u64,
    /// Every row of every table.
    pub rows: u64,
}

impl RedisSegmentationStore {
    /// Whether a [`RedisSegmentationStore::copy_from`] into this Redis started and did not
    /// finish.
    pub async fn copy_unfinished(&self) -> Result<bool> {
        COPY.unfinished(&self.redis).await
    }

    /// Whether this Redis holds no segmentation data (no segment and no features).
    pub async fn is_empty(&self) -> Result<bool> {
        let held: i64 = self
            .redis
            .query(
                redis::cmd("EXISTS")
                    .arg(TENANTS_WITH_SEGMENTS)
                    .arg(TENANTS_WITH_FEATURES),
            )
            .await?;
        Ok(held == 0)
    }

    /// A digest of everything `from` holds: a copy cut short is run again only from the
    /// same source.
    async fn digest_of(from: &EmbeddedSegmentationStore) -> Result<String> {
        digest_of_tables(&CopyTable::ALL, |table, after, limit| {
            from.rows(table, after, limit)
        })
        .await
    }

    /// Copies everything the embedded store `from` holds (segmentation moving from
    /// `segmentation.store = "embedded"` to `"redis"`; nothing may write to either
    /// meanwhile): features, the event ids applied, segments, memberships and their history,
    /// RFM runs and scores. Refuses, writing nothing, when this Redis already holds
    /// segmentation data, unless an earlier copy from the same source (by digest) did not
    /// finish: then it runs again (every write is idempotent).
    pub async fn copy_from(&self, from: &EmbeddedSegmentationStore) -> Result<Copied> {
        const PAGE: usize = 500;
        let digest = Self::digest_of(from).await?;
        COPY.begin(&self.redis, &digest, self.is_empty()).await?;
        let mut copied = Copied::default();
        let (mut with_segments, mut with_features) = (BTreeSet::new(), BTreeSet::new());
        for table in CopyTable::ALL {
            let mut after = None;
            loop {
                let (rows, last) = from.rows(table, after, PAGE).await?;
                // One pipeline per tenant: its keys share a slot, and a cluster refuses a
                // pipeline across slots.
                let tenant_of = |row: &Row| row.key.first().cloned().unwrap_or_default();
                for run in rows.chunk_by(|a, b| tenant_of(a) == tenant_of(b)) {
                    let mut pipe = redis::pipe();
                    for row in run {
                        copy_row(&mut pipe, table, row)?;
                        copied.rows += 1;
                        match table {
                            CopyTable::Segments => {
                                copied.segments += 1;
                                with_segments.insert(tenant_of(row));
                            }
                            CopyTable::Features => {
                                copied.members_with_features += 1;
                                with_features.insert(tenant_of(row));
                            }
                            _ => {}
                        }
                    }
                    self.redis.pipeline::<()>(&pipe).await?;
                }
                match last {
                    Some(l) if rows.len() == PAGE => after = Some(l),
                    _ => break,
                }
            }
        }
        // Last: the walks over tenants find them once everything is in.
        for tenant in &with_segments {
            let _: i64 = self
                .redis
                .query(redis::cmd("SADD").arg(TENANTS_WITH_SEGMENTS).arg(tenant))
                .await?;
        }
        for tenant in &with_features {
            self.with_features.add(&self.redis, tenant).await?;
        }
        COPY.finish(&self.redis).await?;
        copied.tenants = with_segments.union(&with_features).count();
        Ok(copied)
    }
}

/// The commands that file one embedded row where this store keeps it.
fn copy_row(pipe: &mut redis::Pipeline, table: CopyTable, row: &Row) -> Result<()> {
    let parts = match table {
        CopyTable::RfmGenerations | CopyTable::RfmRuns => 1,
        CopyTable::SegmentMembers | CopyTable::Rfm => 3,
        CopyTable::History => 4,
        _ => 2,
    };
    if row.key.len() != parts {
        return Err(Error::internal(anyhow::anyhow!(
            "a stored {table:?} row is damaged: key {:?}",
            row.key
        )));
    }
    let part = |i: usize| row.key[i].as_str();
    let text = || String::from_utf8_lossy(&row.value).into_owned();
    let keys = Keys::of(part(0));
    let value = row.value.as_slice();
    match table {
        CopyTable::Features => {
            pipe.cmd("HSET").arg(keys.k("feat")).arg(part(1)).arg(value);
            pipe.cmd("ZADD").arg(keys.k("fids")).arg(0).arg(part(1));
            pipe.cmd("HSETNX").arg(keys.k("mv")).arg(part(1)).arg(1);
        }
        CopyTable::Applied => {
            let at: i64 = text().parse().map_err(Error::internal)?;
            pipe.cmd("HSET").arg(keys.k("applied")).arg(part(1)).arg(at);
            pipe.cmd("ZADD")
                .arg(keys.k("applied_t"))
                .arg(at)
                .arg(part(1));
        }
        CopyTable::Segments => {
            let def: SegmentDef = decode(value)?;
            pipe.cmd("HSET").arg(keys.k("segs")).arg(part(1)).arg(value);
            pipe.cmd("HSET")
                .arg(keys.k("segv"))
                .arg(part(1))
                .arg(stamp(def.version, def.update_time));
        }
        CopyTable::Membership => {
            let segments: Vec<String> = decode(value)?;
            if !segments.is_empty() {
                pipe.cmd("SADD")
                    .arg(keys.segments_of(part(1)))
                    .arg(&segments);
            }
            pipe.cmd("HSETNX").arg(keys.k("mv")).arg(part(1)).arg(1);
        }
        CopyTable::SegmentMembers => {
            pipe.cmd("ZADD")
                .arg(keys.members_of(part(1)))
                .arg(0)
                .arg(part(2));
        }
        CopyTable::History => {
            let entered = if row.value.as_slice() == b"1" {
                "1"
            } else {
                "0"
            };
            pipe.cmd("ZADD")
                .arg(keys.history_of(part(1)))
                .arg(0)
                .arg(format!("{}\0{}\0{entered}", part(2), part(3)));
        }
        CopyTable::Rfm => {
            let generation: u64 = part(1).parse().map_err(Error::internal)?;
            pipe.cmd("HSET")
                .arg(keys.rfm(generation))
                .arg(part(2))
                .arg(value);
            pipe.cmd("ZADD")
                .arg(keys.k("rfmgens"))
                .arg(generation)
                .arg(generation);
        }
        CopyTable::RfmGenerations => {
            let last: u64 = text().parse().map_err(Error::internal)?;
            pipe.cmd("SET").arg(keys.k("rfmgen")).arg(last);
        }
        CopyTable::RfmRuns => {
            let run: RfmRun = decode(value)?;
            pipe.cmd("SET").arg(keys.k("rfmrun")).arg(value);
            pipe.cmd("SET").arg(keys.k("rfmcur")).arg(run.generation);
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl SegmentationStore for RedisSegmentationStore {
    async fn apply_changes(
        &self,
        changes: Vec<FeatureChange>,
        rules: RuleBook,
        now: Millis,
    ) -> Result<usize> {
        // Each member's changes, in the order the batch names the members.
        let mut order: Vec<(String, String)> = Vec::new();
        let mut by_member: BTreeMap<(String, String), Vec<FeatureChange>> = BTreeMap::new();
        for c in changes {
            let id = (c.tenant_id.clone(), c.member_id.clone());
            let entry = by_member.entry(id.clone()).or_default();
            if entry.is_empty() {
                order.push(id);
            }
            entry.push(c);
        }
        let reads_points = |r: &Rule| r.expr.reads_feature("points_total");
        let mut work = Vec::with_capacity(order.len());
        for id in order {
            let changes = by_member.remove(&id).unwrap_or_default();
            let ledger_only = changes
                .iter()
                .all(|c| matches!(c.change, Change::Ledger(_)));
            let tenant_rules = rules.get(&id.0).cloned().unwrap_or_default();
            let rules = if ledger_only {
                let wanted: Vec<Rule> = tenant_rules.into_iter().filter(reads_points).collect();
                (!wanted.is_empty()).then_some(wanted)
            } else {
                Some(tenant_rules)
            };
            work.push(MemberWork {
                tenant: id.0,
                member: id.1,
                changes,
                rules,
            });
        }
        let tenants: BTreeSet<String> = work.iter().map(|w| w.tenant.clone()).collect();
        // Marked before anything is written: an erasure applied in a batch that then fails
        // is not applied again on redelivery, and must not go unmarked.
        let erasure = work
            .iter()
            .flat_map(|w| &w.changes)
            .any(|c| matches!(c.change, Change::Erasure(_)));
        if erasure {
            SCRUB.raise(&self.redis).await?;
        }
        let done = self.change_all(work, now).await;
        // Counted up again once the writes happened, or may have (an error part way).
        if erasure {
            SCRUB.raise_after(&self.redis).await;
        }
        let done = done?;
        // Forget ids older than the window, a bounded number per tenant and call.
        for tenant in tenants {
            let keys = Keys::of(&tenant);
            let mut invocation = self.forget.prepare_invoke();
            invocation
                .key(keys.k("applied"))
                .key(keys.k("applied_t"))
                .arg(now - DEDUP_WINDOW_MS);
            let _: i64 = self.redis.invoke(&invocation).await?;
        }
        Ok(done.iter().map(|d| d.new).sum())
    }

    async fn evaluate_page(
        &self,
        tenant_id: &str,
        after: &str,
        limit: usize,
        rules: Vec<Rule>,
        now: Millis,
    ) -> Result<(Option<String>, usize)> {
        let keys = Keys::of(tenant_id);
        let members = self.members_with_features(&keys, after, limit).await?;
        let last = members.last().cloned();
        let work = members
            .into_iter()
            .map(|member| MemberWork {
                tenant: tenant_id.to_string(),
                member,
                changes: Vec::new(),
                rules: Some(rules.clone()),
            })
            .collect();
        let done = self.change_all(work, now).await?;
        Ok((last, done.iter().map(|d| d.changed).sum()))
    }

    async fn features(&self, tenant_id: &str, member_id: &str) -> Result<Option<Features>> {
        let raw: Option<Vec<u8>> = self
            .redis
            .query(
                redis::cmd("HGET")
                    .arg(Keys::of(tenant_id).k("feat"))
                    .arg(member_id),
            )
            .await?;
        raw.as_deref().map(Features::decode).transpose()
    }

    async fn features_page(
        &self,
        tenant_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Features)>> {
        let keys = Keys::of(tenant_id);
        let members = self.members_with_features(&keys, after, limit).await?;
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<Option<Vec<u8>>> = self
            .redis
            .query(redis::cmd("HMGET").arg(keys.k("feat")).arg(&members))
            .await?;
        let mut out = Vec::with_capacity(members.len());
        for (member, bytes) in members.into_iter().zip(raw) {
            if let Some(bytes) = bytes {
                out.push((member, Features::decode(&bytes)?));
            }
        }
        Ok(out)
    }

    async fn put_segment(
        &self,
        segment: SegmentDef,
        expected_version: Option<i64>,
    ) -> Result<bool> {
        let keys = Keys::of(&segment.tenant_id);
        let _: i64 = self
            .redis
            .query(
                redis::cmd("SADD")
                    .arg(TENANTS_WITH_SEGMENTS)
                    .arg(&segment.tenant_id),
            )
            .await?;
        let mut invocation = self.segment.prepare_invoke();
        invocation
            .key(keys.k("segs"))
            .key(keys.k("segv"))
            .arg(&segment.segment_id)
            .arg(expected_version.map(|v| v.to_string()).unwrap_or_default())
            .arg(MAX_SEGMENTS)
            .arg(encode(&segment)?)
            .arg(stamp(segment.version, segment.update_time));
        let saved: i64 = self.redis.invoke(&invocation).await?;
        Ok(saved == 1)
    }

    async fn segment(&self, tenant_id: &str, segment_id: &str) -> Result<Option<SegmentDef>> {
        let raw: Option<Vec<u8>> = self
            .redis
            .query(
                redis::cmd("HGET")
                    .arg(Keys::of(tenant_id).k("segs"))
                    .arg(segment_id),
            )
            .await?;
        raw.as_deref().map(decode).transpose()
    }

    async fn segments(&self, tenant_id: &str) -> Result<Vec<SegmentDef>> {
        let raw: Vec<Vec<u8>> = self
            .redis
            .query(redis::cmd("HVALS").arg(Keys::of(tenant_id).k("segs")))
            .await?;
        let mut out = raw
            .iter()
            .map(|b| decode(b))
            .collect::<Result<Vec<SegmentDef>>>()?;
        out.sort_by(|a, b| a.segment_id.cmp(&b.segment_id));
        Ok(out)
    }

    async fn delete_segment(&self, tenant_id: &str, segment_id: &str, now: Millis) -> Result<bool> {
        let keys = Keys::of(tenant_id);
        // First no rule matches the segment any more (its version reads `deleting`), so no
        // write adds a member while the members leave; the definition goes last, so a
        // deletion cut short is finished by the next.
        let mut invocation = self.mark.prepare_invoke();
        invocation
            .key(keys.k("segs"))
            .key(keys.k("segv"))
            .arg(segment_id)
            .arg(DELETING);
        let marked: i64 = self.redis.invoke(&invocation).await?;
        if marked == 0 {
            return Ok(false);
        }
        self.finish(&keys, segment_id, now).await?;
        Ok(true)
    }

    async fn finish_deletion(
        &self,
        tenant_id: &str,
        segment_id: &str,
        now: Millis,
    ) -> Result<bool> {
        self.finish(&Keys::of(tenant_id), segment_id, now).await
    }

    async fn deletions_cut_short(&self, tenant_id: &str) -> Result<Vec<String>> {
        let versions: Vec<(String, String)> = self
            .redis
            .query(redis::cmd("HGETALL").arg(Keys::of(tenant_id).k("segv")))
            .await?;
        let mut ids: Vec<String> = versions
            .into_iter()
            .filter(|(_, v)| v == DELETING)
            .map(|(id, _)| id)
            .collect();
        ids.sort();
        Ok(ids)
    }

    async fn set_memberships(
        &self,
        tenant_id: &str,
        changes: Vec<(String, String, bool)>,
        now: Millis,
    ) -> Result<usize> {
        let keys = Keys::of(tenant_id);
        let mut by_member: BTreeMap<String, Vec<(String, bool)>> = BTreeMap::new();
        for (member, segment, on) in changes {
            by_member.entry(member).or_default().push((segment, on));
        }
        // Flags of segments that are gone (or going) are ignored; the script checks again.
        let named: BTreeSet<String> = by_member
            .values()
            .flatten()
            .map(|(s, _)| s.clone())
            .collect();
        let named: Vec<String> = named.into_iter().collect();
        let stamps: Vec<Option<String>> = if named.is_empty() {
            Vec::new()
        } else {
            self.redis
                .query(redis::cmd("HMGET").arg(keys.k("segv")).arg(&named))
                .await?
        };
        let live: BTreeSet<&str> = named
            .iter()
            .zip(&stamps)
            .filter(|(_, st)| st.as_deref().is_some_and(|st| st != DELETING))
            .map(|(s, _)| s.as_str())
            .collect();
        let keys = &keys;
        let live = &live;
        let results: Vec<Result<usize>> = futures_util::stream::iter(by_member)
            .map(|(member, flags)| async move {
                let flags: Vec<(String, bool)> = flags
                    .into_iter()
                    .filter(|(s, _)| live.contains(s.as_str()))
                    .collect();
                if flags.is_empty() {
                    return Ok(0);
                }
                self.set_flags(keys, &member, &flags, now).await
            })
            .buffered(CONCURRENCY)
            .collect()
            .await;
        results.into_iter().sum()
    }

    async fn member_segments(&self, tenant_id: &str, member_id: &str) -> Result<Vec<String>> {
        let mut segments: Vec<String> = self
            .redis
            .query(redis::cmd("SMEMBERS").arg(Keys::of(tenant_id).segments_of(member_id)))
            .await?;
        segments.sort();
        Ok(segments)
    }

    async fn segment_members(
        &self,
        tenant_id: &str,
        segment_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>> {
        self.redis
            .query(
                redis::cmd("ZRANGEBYLEX")
                    .arg(Keys::of(tenant_id).members_of(segment_id))
                    .arg(lex_after(after))
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit),
            )
            .await
    }

    async fn count(&self, tenant_id: &str, segment_id: &str) -> Result<u64> {
        self.redis
            .query(redis::cmd("ZCARD").arg(Keys::of(tenant_id).members_of(segment_id)))
            .await
    }

    async fn history(
        &self,
        tenant_id: &str,
        member_id: &str,
        before: Option<String>,
        limit: usize,
    ) -> Result<(Vec<MembershipChange>, Option<String>)> {
        // The token is the member and the last entry returned.
        let start = match &before {
            None => "+".to_string(),
            Some(token) => match token.split_once('\u{1}') {
                Some((member, entry)) if member == member_id => format!("({entry}"),
                _ => {
                    return Err(Error::invalid(
                        "page_token",
                        "belongs to another member's history",
                    ));
                }
            },
        };
        let entries: Vec<String> = self
            .redis
            .query(
                redis::cmd("ZREVRANGEBYLEX")
                    .arg(Keys::of(tenant_id).history_of(member_id))
                    .arg(start)
                    .arg("-")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit + 1),
            )
            .await?;
        let more = entries.len() > limit;
        let mut out = Vec::with_capacity(limit);
        let mut last = None;
        for entry in entries.into_iter().take(limit) {
            let mut parts = entry.splitn(3, '\0');
            let (time, segment, flag) = (parts.next(), parts.next(), parts.next());
            out.push(MembershipChange {
                segment_id: segment.unwrap_or_default().to_string(),
                entered: flag == Some("1"),
                time: time.and_then(|t| t.parse().ok()).unwrap_or(0),
            });
            last = Some(format!("{member_id}\u{1}{entry}"));
        }
        Ok((out, if more { last } else { None }))
    }

    async fn tenants(&self) -> Result<Vec<String>> {
        self.listed(TENANTS_WITH_SEGMENTS, "segs").await
    }

    async fn tenants_with_features(&self) -> Result<Vec<String>> {
        self.listed(TENANTS_WITH_FEATURES, "feat").await
    }

    async fn next_rfm_generation(&self, tenant_id: &str) -> Result<u64> {
        self.redis
            .query(redis::cmd("INCR").arg(Keys::of(tenant_id).k("rfmgen")))
            .await
    }

    async fn put_rfm(
        &self,
        tenant_id: &str,
        generation: u64,
        scores: Vec<(String, Score)>,
    ) -> Result<()> {
        let keys = Keys::of(tenant_id);
        let key = keys.rfm(generation);
        for chunk in scores.chunks(1000) {
            let mut pipe = redis::pipe();
            pipe.cmd("ZADD")
                .arg(keys.k("rfmgens"))
                .arg(generation)
                .arg(generation)
                .ignore();
            let mut hset = redis::cmd("HSET");
            hset.arg(&key);
            for (member, score) in chunk {
                hset.arg(member).arg(encode(score)?);
            }
            pipe.add_command(hset).ignore();
            self.redis.pipeline::<()>(&pipe).await?;
        }
        Ok(())
    }

    async fn publish_rfm(&self, tenant_id: &str, run: RfmRun) -> Result<bool> {
        let keys = Keys::of(tenant_id);
        let mut invocation = self.publish.prepare_invoke();
        invocation
            .key(keys.k("rfmrun"))
            .key(keys.k("rfmcur"))
            .arg(run.generation)
            .arg(encode(&run)?);
        let published: i64 = self.redis.invoke(&invocation).await?;
        if published == 0 {
            return Ok(false);
        }
        // Scores of every earlier run go (nothing reads them once the run moved on).
        let earlier: Vec<u64> = self
            .redis
            .query(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(keys.k("rfmgens"))
                    .arg("-inf")
                    .arg(format!("({}", run.generation)),
            )
            .await?;
        for generation in earlier {
            let mut pipe = redis::pipe();
            pipe.cmd("UNLINK")
                .arg(keys.rfm(generation))
                .ignore()
                .cmd("ZREM")
                .arg(keys.k("rfmgens"))
                .arg(generation)
                .ignore();
            self.redis.pipeline::<()>(&pipe).await?;
        }
        Ok(true)
    }

    async fn rfm_run(&self, tenant_id: &str) -> Result<Option<RfmRun>> {
        let raw: Option<Vec<u8>> = self
            .redis
            .query(redis::cmd("GET").arg(Keys::of(tenant_id).k("rfmrun")))
            .await?;
        raw.as_deref().map(decode).transpose()
    }

    async fn rfm(&self, tenant_id: &str, member_id: &str) -> Result<Option<Score>> {
        let keys = Keys::of(tenant_id);
        let current = || async {
            self.redis
                .query::<Option<u64>>(redis::cmd("GET").arg(keys.k("rfmcur")))
                .await
        };
        let mut generation = current().await?;
        // A run published between the two reads drops the scores read from: read again.
        for _ in 0..4 {
            let Some(g) = generation else {
                return Ok(None);
            };
            let raw: Option<Vec<u8>> = self
                .redis
                .query(redis::cmd("HGET").arg(keys.rfm(g)).arg(member_id))
                .await?;
            if raw.is_some() {
                return raw.as_deref().map(decode).transpose();
            }
            let now = current().await?;
            if now == generation {
                return Ok(None);
            }
            generation = now;
        }
        Ok(None)
    }

    async fn clear_features(&self) -> Result<()> {
        let tenants: Vec<String> = self
            .redis
            .query(redis::cmd("SMEMBERS").arg(TENANTS_WITH_FEATURES))
            .await?;
        for tenant in &tenants {
            let keys = Keys::of(tenant);
            let mut pipe = redis::pipe();
            pipe.atomic();
            for name in ["feat", "fids", "applied", "applied_t"] {
                pipe.cmd("DEL").arg(keys.k(name)).ignore();
            }
            self.redis.pipeline::<()>(&pipe).await?;
        }
        let _: i64 = self
            .redis
            .query(redis::cmd("DEL").arg(TENANTS_WITH_FEATURES))
            .await?;
        self.with_features.forget();
        Ok(())
    }

    async fn scrub(&self) -> Result<bool> {
        SCRUB.scrub(&self.redis).await
    }

    async fn ping(&self) -> Result<()> {
        let _: String = self.redis.query(&redis::cmd("PING")).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use loyalty_platform::redis_server::RedisServer;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        let server = RedisServer::start().unwrap();
        let store = RedisSegmentationStore::connect(&server.url()).unwrap();
        super::super::conformance::run_all(&store).await;
    }

    /// Two replicas' stores (each its own connection) writing one member at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_lose_no_change() {
        let server = RedisServer::start().unwrap();
        let a = RedisSegmentationStore::connect(&server.url()).unwrap();
        let b = RedisSegmentationStore::connect(&server.url()).unwrap();
        super::super::conformance::racing_writers(&[&a, &b]).await;
    }

    /// A deletion cut short after its mark leaves the segment listed as such; the next
    /// scheduled pass (or start-up) finishes it: members out, definition gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deletion_cut_short_is_finished_by_the_next_pass() {
        let server = RedisServer::start().unwrap();
        let store = RedisSegmentationStore::connect(&server.url()).unwrap();
        let def = super::super::conformance::dynamic("t", "seg", "spend_total > 0", 1, 1);
        assert!(store.put_segment(def, None).await.unwrap());
        let changes = (0..300)
            .map(|i| (format!("m{i:03}"), "seg".to_string(), true))
            .collect();
        assert_eq!(store.set_memberships("t", changes, 1).await.unwrap(), 300);
        // The deletion's first step, then the process stops.
        let keys = Keys::of("t");
        let mut invocation = store.mark.prepare_invoke();
        invocation
            .key(keys.k("segs"))
            .key(keys.k("segv"))
            .arg("seg")
            .arg(DELETING);
        let _: i64 = store.redis.invoke(&invocation).await.unwrap();
        assert_eq!(store.deletions_cut_short("t").await.unwrap(), ["seg"]);
        assert_eq!(store.member_segments("t", "m007").await.unwrap(), ["seg"]);

        let clock = std::sync::Arc::new(loyalty_platform::clock::ManualClock::at(10));
        let service = crate::Segmentation::new(std::sync::Arc::new(store.clone()), clock);
        service.reevaluate_time_dependent().await.unwrap();
        assert!(store.deletions_cut_short("t").await.unwrap().is_empty());
        assert!(store.member_segments("t", "m007").await.unwrap().is_empty());
        assert_eq!(store.count("t", "seg").await.unwrap(), 0);
        assert_eq!(store.segment("t", "seg").await.unwrap(), None);

        // A replica that listed the deletion late, after the segment was created again,
        // leaves the new one alone.
        let again = super::super::conformance::dynamic("t", "seg", "spend_total > 5", 1, 20);
        assert!(store.put_segment(again.clone(), None).await.unwrap());
        let changes = vec![("m001".to_string(), "seg".to_string(), true)];
        assert_eq!(store.set_memberships("t", changes, 21).await.unwrap(), 1);
        assert!(!store.finish_deletion("t", "seg", 22).await.unwrap());
        assert_eq!(store.segment("t", "seg").await.unwrap(), Some(again));
        assert_eq!(store.member_segments("t", "m001").await.unwrap(), ["seg"]);
    }

    /// Everything the conformance suite leaves in an embedded store, copied, reads back the
    /// same through the trait, and a redelivered event the embedded store applied is still
    /// one; a second copy is refused. On a cluster too (one pipeline per slot).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_of_the_embedded_store_reads_the_same() {
        let server = RedisServer::start().unwrap();
        let to = RedisSegmentationStore::connect(&server.url()).unwrap();
        copy_and_compare(&to).await;
        let nodes = RedisServer::start_cluster(3).unwrap();
        let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
        copy_and_compare(&RedisSegmentationStore::connect_cluster(&urls).unwrap()).await;
    }

    async fn copy_and_compare(to: &RedisSegmentationStore) {
        use super::super::conformance::purchase;
        let dir = tempfile::tempdir().unwrap();
        let from = EmbeddedSegmentationStore::open(&dir.path().join("segmentation.redb")).unwrap();
        super::super::conformance::run_all(&from).await;
        let event = || vec![purchase("copied", "e1", "m1", 1_750_000_000_000, 10)];
        from.apply_changes(event(), RuleBook::new(), 1_750_000_000_000)
            .await
            .unwrap();
        let copied = to.copy_from(&from).await.unwrap();
        assert!(copied.tenants > 2 && copied.segments > 0, "{copied:?}");

        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        assert_eq!(
            sorted(from.tenants().await.unwrap()),
            sorted(to.tenants().await.unwrap())
        );
        assert_eq!(
            sorted(from.tenants_with_features().await.unwrap()),
            sorted(to.tenants_with_features().await.unwrap())
        );
        let rows = |table| {
            let from = from.clone();
            async move { from.rows(table, None, 100_000).await.unwrap().0 }
        };
        let mut members = BTreeSet::new();
        for table in [
            CopyTable::Features,
            CopyTable::Membership,
            CopyTable::History,
        ] {
            for row in rows(table).await {
                members.insert((row.key[0].clone(), row.key[1].clone()));
            }
        }
        for (t, m) in &members {
            assert_eq!(
                from.features(t, m).await.unwrap(),
                to.features(t, m).await.unwrap()
            );
            assert_eq!(
                from.member_segments(t, m).await.unwrap(),
                to.member_segments(t, m).await.unwrap(),
                "{t}/{m}"
            );
            assert_eq!(
                from.history(t, m, None, 1000).await.unwrap().0,
                to.history(t, m, None, 1000).await.unwrap().0,
                "{t}/{m}"
            );
            assert_eq!(from.rfm(t, m).await.unwrap(), to.rfm(t, m).await.unwrap());
        }
        for tenant in from.tenants().await.unwrap() {
            let segments = from.segments(&tenant).await.unwrap();
            let mut theirs = to.segments(&tenant).await.unwrap();
            theirs.sort_by(|a, b| a.segment_id.cmp(&b.segment_id));
            let mut ours = segments.clone();
            ours.sort_by(|a, b| a.segment_id.cmp(&b.segment_id));
            assert_eq!(ours, theirs);
            for s in &segments {
                let id = &s.segment_id;
                assert_eq!(
                    from.segment_members(&tenant, id, "", 100_000)
                        .await
                        .unwrap(),
                    to.segment_members(&tenant, id, "", 100_000).await.unwrap()
                );
                assert_eq!(
                    from.count(&tenant, id).await.unwrap(),
                    to.count(&tenant, id).await.unwrap()
                );
            }
        }
        for row in rows(CopyTable::RfmRuns).await {
            let t = &row.key[0];
            assert_eq!(from.rfm_run(t).await.unwrap(), to.rfm_run(t).await.unwrap());
            assert_eq!(
                from.next_rfm_generation(t).await.unwrap(),
                to.next_rfm_generation(t).await.unwrap()
            );
        }
        // The applied event ids came along: a redelivery changes nothing.
        to.apply_changes(event(), RuleBook::new(), 1_750_000_000_001)
            .await
            .unwrap();
        assert_eq!(
            to.features("copied", "m1")
                .await
                .unwrap()
                .unwrap()
                .total
                .count,
            1
        );
        let err = to.copy_from(&from).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        // A copy cut short is finished by a second run from the same source only.
        for (mark, finishes) in [("another source", false), ("", true)] {
            let mark = match mark {
                "" => RedisSegmentationStore::digest_of(&from).await.unwrap(),
                other => other.to_string(),
            };
            let _: () = to
                .redis
                .query(redis::cmd("SET").arg(COPYING).arg(mark))
                .await
                .unwrap();
            assert!(to.copy_unfinished().await.unwrap());
            assert_eq!(to.copy_from(&from).await.is_ok(), finishes);
        }
        assert!(!to.copy_unfinished().await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_on_redis_cluster() {
        let nodes = RedisServer::start_cluster(3).unwrap();
        let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
        let store = RedisSegmentationStore::connect_cluster(&urls).unwrap();
        super::super::conformance::run_all(&store).await;
    }
}
