//! Reporting's facts and audit log on ScyllaDB (`migrations/scylla/0001_reporting.cql`), so
//! they outlive the pod and a new reporting replica rebuilds its rollups from them.
//!
//! A receipt or ledger fact first claims its identity (`IF NOT EXISTS`) with the sequence
//! number it will be stored under, then is written. The claim is the commit point: a
//! redelivered fact whose claim exists but whose row is missing (the writer died between
//! the two) is written then and counts as new, so a fact is stored once and never lost.
//! Sequence numbers are reserved a batch at a time with a conditional update. `landed`
//! follows the last batch written whole and is what an export's snapshot reads up to.
//!
//! The store expects one writing replica at a time (the chart runs one): appends of one
//! process go one after another, and two writers stay correct (claims and reservations are
//! conditional) but a snapshot taken while the other's batch is half written can miss it.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use futures_util::StreamExt;
use loyalty_platform::calendar::Day;
use loyalty_platform::clock::Millis;
use loyalty_platform::embedded::{decode, encode};
use loyalty_platform::error::{Error, Result};
use loyalty_platform::scylla::{Migration, all_rows, applied, first_row, prepare, row_stream, run};
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use tokio::sync::Mutex;

use super::{AUDIT_SCAN, FactPage, Position, Receipts, ReportingStore, ScanFrom};
use crate::audit::{AuditCursor, AuditEntry, AuditHead, AuditPage, AuditQuery, Order};
use crate::fact::{Fact, TenantFact};

pub const MIGRATIONS: &[Migration] = &[Migration {
    service: "reporting",
    version: 1,
    name: "reporting",
    cql: include_str!("../../migrations/scylla/0001_reporting.cql"),
}];

/// Conditional writes tried before giving up on a contended row.
const ATTEMPTS: usize = 32;
/// Concurrent requests one append or read keeps in flight.
const CONCURRENCY: usize = 64;
/// Shards of a tenant's member facts.
const MEMBER_SHARDS: i8 = 64;
const MINUTE_MS: i64 = 60_000;
const DAY_MS: i64 = 86_400_000;

fn kind_code(kind: Receipts) -> i8 {
    match kind {
        Receipts::Purchases => 0,
        Receipts::Refunds => 1,
        Receipts::Ledger => 2,
    }
}

fn kind_of(fact: &Fact) -> Receipts {
    match fact {
        Fact::Refund(_) => Receipts::Refunds,
        Fact::Ledger(_) => Receipts::Ledger,
        _ => Receipts::Purchases,
    }
}

/// The partition of a fact: receipts by day and block of 65,536 sequence numbers, ledger
/// entries by minute. Buckets in order hold the facts in (position, seq) order.
fn bucket(kind: Receipts, position: i64, seq: u64) -> i64 {
    match kind {
        Receipts::Ledger => position.div_euclid(MINUTE_MS),
        _ => position
            .saturating_mul(1 << 32)
            .saturating_add((seq >> 16).min(u64::from(u32::MAX)) as i64),
    }
}

/// The last bucket that can hold a fact at `position`.
fn last_bucket(kind: Receipts, position: i64) -> i64 {
    match kind {
        Receipts::Ledger => position.div_euclid(MINUTE_MS),
        _ => position
            .saturating_mul(1 << 32)
            .saturating_add(i64::from(u32::MAX)),
    }
}

/// A member's shard: FNV-1a of the id, stable across versions.
fn member_shard(member: &str) -> i8 {
    let mut h: u32 = 0x811c_9dc5;
    for b in member.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % MEMBER_SHARDS as u32) as i8
}

fn seq_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn seq_value(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// Runs `futures` [`CONCURRENCY`] at a time; the answers in order.
async fn in_chunks<T, F>(futures: Vec<F>) -> Result<Vec<T>>
where
    F: std::future::Future<Output = Result<T>>,
{
    let mut out = Vec::with_capacity(futures.len());
    let mut rest = futures.into_iter().peekable();
    while rest.peek().is_some() {
        let chunk: Vec<F> = rest.by_ref().take(CONCURRENCY).collect();
        out.extend(futures_util::future::try_join_all(chunk).await?);
    }
    Ok(out)
}

fn poisoned() -> Error {
    Error::internal(anyhow::anyhow!(
        "a thread panicked holding reporting's write set"
    ))
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("scylladb: {e}"))
}

#[derive(Debug)]
struct Statements {
    select_meta: PreparedStatement,
    insert_meta: PreparedStatement,
    update_meta: PreparedStatement,
    select_identity: PreparedStatement,
    claim_identity: PreparedStatement,
    select_fact: PreparedStatement,
    insert_fact: PreparedStatement,
    insert_bucket: PreparedStatement,
    insert_tenant: PreparedStatement,
    insert_by_member: PreparedStatement,
    select_buckets: PreparedStatement,
    select_rows: PreparedStatement,
    select_tenants: PreparedStatement,
    select_member: PreparedStatement,
    insert_member: PreparedStatement,
    update_member: PreparedStatement,
    select_members: PreparedStatement,
    select_member_index: PreparedStatement,
    select_audit_id: PreparedStatement,
    insert_audit_id: PreparedStatement,
    insert_audit: PreparedStatement,
    delete_audit: PreparedStatement,
    insert_audit_day: PreparedStatement,
    insert_open: PreparedStatement,
    delete_open: PreparedStatement,
    select_open: PreparedStatement,
    select_days_asc: PreparedStatement,
    select_days_desc: PreparedStatement,
    select_audit_from: PreparedStatement,
    select_audit_after: PreparedStatement,
    select_audit_desc: PreparedStatement,
}

#[derive(Debug, Clone)]
pub struct ScyllaReportingStore {
    session: Arc<Session>,
    s: Arc<Statements>,
    /// One append (of facts or audit records) at a time in this process.
    writer: Arc<Mutex<()>>,
    /// The last write timestamp handed out (microseconds), so this process's writes to one
    /// row apply in the order it made them whatever the nodes' clocks say.
    last_stamp: Arc<AtomicI64>,
    /// Facts an append wrote before it failed, by (tenant, identity or member version): its
    /// retry finds them stored and still reports them as new, so the rollups count them.
    unreported: Arc<std::sync::Mutex<HashSet<(String, String)>>>,
}

/// A receipt or ledger fact of a batch, and where it is (to be) stored.
struct Placed {
    index: usize,
    kind: Receipts,
    position: i64,
    seq: u64,
}

impl ScyllaReportingStore {
    /// Prepares every statement on `session` (whose keyspace is selected).
    pub async fn new(session: Arc<Session>) -> anyhow::Result<Self> {
        let statement = |cql: &'static str| prepare(&session, cql);
        let s = Statements {
            select_meta: statement("SELECT value FROM reporting_meta WHERE name = ?").await?,
            insert_meta: statement(
                "INSERT INTO reporting_meta (name, value) VALUES (?, ?) IF NOT EXISTS",
            )
            .await?,
            update_meta: statement(
                "UPDATE reporting_meta SET value = ? WHERE name = ? IF value = ?",
            )
            .await?,
            select_identity: statement(
                "SELECT kind, position, seq FROM reporting_identities \
                 WHERE tenant = ? AND identity = ?",
            )
            .await?,
            claim_identity: statement(
                "INSERT INTO reporting_identities (tenant, identity, kind, position, seq) \
                 VALUES (?, ?, ?, ?, ?) IF NOT EXISTS",
            )
            .await?,
            select_fact: statement(
                "SELECT body FROM reporting_facts WHERE tenant = ? AND kind = ? \
                 AND bucket = ? AND position = ? AND seq = ?",
            )
            .await?,
            insert_fact: statement(
                "INSERT INTO reporting_facts (tenant, kind, bucket, position, seq, body) \
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .await?,
            insert_bucket: statement(
                "INSERT INTO reporting_buckets (tenant, kind, bucket) VALUES (?, ?, ?)",
            )
            .await?,
            insert_tenant: statement("INSERT INTO reporting_tenants (shard, tenant) VALUES (0, ?)")
                .await?,
            insert_by_member: statement(
                "INSERT INTO reporting_by_member (tenant, member, kind, position, seq) \
                 VALUES (?, ?, ?, ?, ?)",
            )
            .await?,
            select_buckets: statement(
                "SELECT bucket FROM reporting_buckets WHERE tenant = ? AND kind = ? \
                 AND bucket >= ? AND bucket <= ?",
            )
            .await?,
            select_rows: statement(
                "SELECT position, seq, body FROM reporting_facts WHERE tenant = ? AND kind = ? \
                 AND bucket = ? AND (position, seq) >= (?, ?) AND (position, seq) <= (?, ?)",
            )
            .await?,
            select_tenants: statement(
                "SELECT tenant FROM reporting_tenants WHERE shard = 0 AND tenant >= ?",
            )
            .await?,
            select_member: statement(
                "SELECT version FROM reporting_members WHERE tenant = ? AND shard = ? \
                 AND member = ?",
            )
            .await?,
            insert_member: statement(
                "INSERT INTO reporting_members (tenant, shard, member, version, body) \
                 VALUES (?, ?, ?, ?, ?) IF NOT EXISTS",
            )
            .await?,
            update_member: statement(
                "UPDATE reporting_members SET version = ?, body = ? \
                 WHERE tenant = ? AND shard = ? AND member = ? IF version = ?",
            )
            .await?,
            select_members: statement(
                "SELECT member, body FROM reporting_members WHERE tenant = ? AND shard = ? \
                 AND member > ?",
            )
            .await?,
            select_member_index: statement(
                "SELECT position, seq FROM reporting_by_member WHERE tenant = ? AND member = ? \
                 AND kind = ? AND position >= ? AND position <= ?",
            )
            .await?,
            select_audit_id: statement(
                "SELECT time, open FROM reporting_audit_ids WHERE tenant = ? AND id = ?",
            )
            .await?,
            insert_audit_id: statement(
                "INSERT INTO reporting_audit_ids (tenant, id, time, open) VALUES (?, ?, ?, ?) \
                 USING TIMESTAMP ?",
            )
            .await?,
            insert_audit: statement(
                "INSERT INTO reporting_audit (tenant, day, time, id, open, head, body) \
                 VALUES (?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?",
            )
            .await?,
            delete_audit: statement(
                "DELETE FROM reporting_audit USING TIMESTAMP ? \
                 WHERE tenant = ? AND day = ? AND time = ? AND id = ?",
            )
            .await?,
            insert_audit_day: statement(
                "INSERT INTO reporting_audit_days (tenant, day) VALUES (?, ?)",
            )
            .await?,
            insert_open: statement(
                "INSERT INTO reporting_audit_open (tenant, id, time) VALUES (?, ?, ?) \
                 USING TIMESTAMP ?",
            )
            .await?,
            delete_open: statement(
                "DELETE FROM reporting_audit_open USING TIMESTAMP ? WHERE tenant = ? AND id = ?",
            )
            .await?,
            select_open: statement("SELECT time FROM reporting_audit_open WHERE tenant = ?")
                .await?,
            select_days_asc: statement(
                "SELECT day FROM reporting_audit_days WHERE tenant = ? AND day >= ? AND day <= ?",
            )
            .await?,
            select_days_desc: statement(
                "SELECT day FROM reporting_audit_days WHERE tenant = ? AND day >= ? AND day <= ? \
                 ORDER BY day DESC",
            )
            .await?,
            select_audit_from: statement(
                "SELECT time, id, open, head, body FROM reporting_audit WHERE tenant = ? \
                 AND day = ? AND (time, id) >= (?, ?) AND (time, id) < (?, ?)",
            )
            .await?,
            select_audit_after: statement(
                "SELECT time, id, open, head, body FROM reporting_audit WHERE tenant = ? \
                 AND day = ? AND (time, id) > (?, ?) AND (time, id) < (?, ?)",
            )
            .await?,
            select_audit_desc: statement(
                "SELECT time, id, open, head, body FROM reporting_audit WHERE tenant = ? \
                 AND day = ? AND (time, id) >= (?, ?) AND (time, id) < (?, ?) \
                 ORDER BY time DESC, id DESC",
            )
            .await?,
        };
        Ok(Self {
            session,
            s: Arc::new(s),
            writer: Arc::new(Mutex::new(())),
            last_stamp: Arc::new(AtomicI64::new(0)),
            unreported: Arc::default(),
        })
    }

    /// A write timestamp after every one this process handed out before.
    fn stamp(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        let mut last = self.last_stamp.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self.last_stamp.compare_exchange_weak(
                last,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    async fn meta(&self, name: &str) -> Result<Option<i64>> {
        let row = first_row::<(Option<i64>,)>(&self.session, &self.s.select_meta, (name,)).await?;
        Ok(row.and_then(|(v,)| v))
    }

    /// Sets `name` to `value` when it is below it (conditionally; a concurrent change wins
    /// and is looked at again). Returns the value it ends at.
    async fn raise_meta(&self, name: &str, value: i64) -> Result<i64> {
        for _ in 0..ATTEMPTS {
            match self.meta(name).await? {
                Some(current) if current >= value => return Ok(current),
                current => {
                    if self.set_meta(name, current, value).await? {
                        return Ok(value);
                    }
                }
            }
        }
        Err(Error::Unavailable(format!(
            "reporting's {name} counter is contended; retry"
        )))
    }

    /// Sets `name` to `value` if it still is `current` (None: not set yet); whether it did.
    async fn set_meta(&self, name: &str, current: Option<i64>, value: i64) -> Result<bool> {
        let result = match current {
            Some(current) => {
                run(&self.session, &self.s.update_meta, (value, name, current)).await?
            }
            None => run(&self.session, &self.s.insert_meta, (name, value)).await?,
        };
        applied(result)
    }

    /// Reserves `n` sequence numbers; returns the first.
    async fn reserve(&self, n: u64) -> Result<u64> {
        for _ in 0..ATTEMPTS {
            let current = self.meta("seq").await?;
            let base = current.map_or(0, seq_of);
            if self.set_meta("seq", current, seq_value(base + n)).await? {
                return Ok(base + 1);
            }
        }
        Err(Error::Unavailable(
            "reporting's sequence is contended; retry".into(),
        ))
    }

    async fn identity(&self, tenant: &str, identity: &str) -> Result<Option<(i8, i64, u64)>> {
        let row =
            first_row::<(i8, i64, i64)>(&self.session, &self.s.select_identity, (tenant, identity))
                .await?;
        Ok(row.map(|(k, p, s)| (k, p, seq_of(s))))
    }

    /// The stored fact at `at`, if its row is there (None inside: a row without a body).
    async fn fact_at(&self, tenant: &str, at: &Placed) -> Result<Option<Option<Vec<u8>>>> {
        let row = first_row::<(Option<Vec<u8>>,)>(
            &self.session,
            &self.s.select_fact,
            (
                tenant,
                kind_code(at.kind),
                bucket(at.kind, at.position, at.seq),
                at.position,
                seq_value(at.seq),
            ),
        )
        .await?;
        Ok(row.map(|(body,)| body))
    }

    async fn write_fact(&self, tenant: &str, fact: &Fact, at: &Placed) -> Result<()> {
        let k = kind_code(at.kind);
        let b = bucket(at.kind, at.position, at.seq);
        let seq = seq_value(at.seq);
        // The index rows first: a fact is found through them, and a row they name that is
        // not written yet reads as missing (and is written when its event comes again).
        let bucket_row = async { run(&self.session, &self.s.insert_bucket, (tenant, k, b)).await };
        let member_row = async {
            match fact.member_id() {
                Some(member) => run(
                    &self.session,
                    &self.s.insert_by_member,
                    (tenant, member.as_str(), k, at.position, seq),
                )
                .await
                .map(|_| ()),
                None => Ok(()),
            }
        };
        futures_util::try_join!(bucket_row, member_row)?;
        run(
            &self.session,
            &self.s.insert_fact,
            (tenant, k, b, at.position, seq, encode(fact)?),
        )
        .await?;
        Ok(())
    }

    /// Stores a member's facts when newer than the stored ones; whether it did.
    async fn put_member(&self, tenant: &str, fact: &Fact) -> Result<bool> {
        let Fact::Member(m) = fact else {
            return Ok(false);
        };
        let shard = member_shard(&m.member_id);
        let body = encode(fact)?;
        for _ in 0..ATTEMPTS {
            let stored = first_row::<(Option<i64>,)>(
                &self.session,
                &self.s.select_member,
                (tenant, shard, m.member_id.as_str()),
            )
            .await?;
            let ok = match stored {
                Some((Some(version),)) if version >= m.version => return Ok(false),
                Some((version,)) => applied(
                    run(
                        &self.session,
                        &self.s.update_member,
                        (
                            m.version,
                            body.clone(),
                            tenant,
                            shard,
                            m.member_id.as_str(),
                            version,
                        ),
                    )
                    .await?,
                )?,
                None => applied(
                    run(
                        &self.session,
                        &self.s.insert_member,
                        (tenant, shard, m.member_id.as_str(), m.version, body.clone()),
                    )
                    .await?,
                )?,
            };
            if ok {
                return Ok(true);
            }
        }
        Err(Error::Unavailable(format!(
            "member {} is contended in reporting's store; retry",
            m.member_id
        )))
    }

    async fn tenants_from(&self, first: &str) -> Result<Vec<String>> {
        Ok(
            all_rows::<(String,)>(&self.session, &self.s.select_tenants, (first,))
                .await?
                .into_iter()
                .map(|(t,)| t)
                .collect(),
        )
    }

    /// Walks a tenant's `kind` facts from `start` (inclusive) to `end` (inclusive) in
    /// (position, seq) order, handing each to `visit` until it says stop. Returns whether it
    /// was stopped.
    async fn walk(
        &self,
        tenant: &str,
        kind: Receipts,
        start: (i64, u64),
        end: (i64, u64),
        visit: &mut (dyn FnMut(i64, u64, Vec<u8>) -> Result<bool> + Send),
    ) -> Result<bool> {
        if start > end {
            return Ok(false);
        }
        let lo = bucket(kind, start.0, start.1);
        let hi = last_bucket(kind, end.0);
        // The bucket list is paged as it is walked: a page of facts near the start of a long
        // history reads the few buckets it needs, not every bucket to the end of time.
        let mut buckets = row_stream::<(i64,)>(
            &self.session,
            &self.s.select_buckets,
            (tenant, kind_code(kind), lo, hi),
        )
        .await?;
        while let Some(b) = buckets.next().await {
            let (b,) = b.map_err(unavailable)?;
            let mut rows = row_stream::<(i64, i64, Vec<u8>)>(
                &self.session,
                &self.s.select_rows,
                (
                    tenant,
                    kind_code(kind),
                    b,
                    start.0,
                    seq_value(start.1),
                    end.0,
                    seq_value(end.1),
                ),
            )
            .await?;
            while let Some(row) = rows.next().await {
                let (position, seq, body) = row.map_err(unavailable)?;
                if !visit(position, seq_of(seq), body)? {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

#[async_trait::async_trait]
impl ReportingStore for ScyllaReportingStore {
    async fn append(&self, facts: Vec<TenantFact>) -> Result<Vec<TenantFact>> {
        if facts.is_empty() {
            return Ok(Vec::new());
        }
        let _one_writer = self.writer.lock().await;
        // Receipt and ledger facts, once each within the batch, and what they claimed.
        let mut seen = HashSet::new();
        let receipts: Vec<usize> = facts
            .iter()
            .enumerate()
            .filter(|(_, f)| !matches!(f.fact, Fact::Member(_)))
            .filter(|(_, f)| seen.insert((f.tenant_id.clone(), f.fact.identity())))
            .map(|(i, _)| i)
            .collect();
        let identities: Vec<String> = facts.iter().map(|f| f.fact.identity()).collect();
        let identities = &identities;
        let facts_ref = &facts;
        let claimed = in_chunks(
            receipts
                .iter()
                .map(|&i| self.identity(&facts_ref[i].tenant_id, &identities[i]))
                .collect(),
        )
        .await?;
        let mut write = Vec::new();
        let mut earlier = Vec::new();
        let mut new = Vec::new();
        for (&i, claim) in receipts.iter().zip(claimed) {
            let kind = kind_of(&facts[i].fact);
            match claim {
                Some((_, position, seq)) => earlier.push(Placed {
                    index: i,
                    kind,
                    position,
                    seq,
                }),
                None => new.push(i),
            }
        }
        if !new.is_empty() {
            let first = self.reserve(new.len() as u64).await?;
            let placed: Vec<Placed> = new
                .iter()
                .enumerate()
                .map(|(n, &i)| Placed {
                    index: i,
                    kind: kind_of(&facts[i].fact),
                    position: facts[i].fact.order().unwrap_or_default(),
                    seq: first + n as u64,
                })
                .collect();
            let won = in_chunks(
                placed
                    .iter()
                    .map(|p| async move {
                        applied(
                            run(
                                &self.session,
                                &self.s.claim_identity,
                                (
                                    facts_ref[p.index].tenant_id.as_str(),
                                    identities[p.index].as_str(),
                                    kind_code(p.kind),
                                    p.position,
                                    seq_value(p.seq),
                                ),
                            )
                            .await?,
                        )
                    })
                    .collect(),
            )
            .await?;
            for (p, won) in placed.into_iter().zip(won) {
                if won {
                    write.push(p);
                } else if let Some((_, position, seq)) = self
                    .identity(&facts[p.index].tenant_id, &identities[p.index])
                    .await?
                {
                    // Another writer claimed it just now.
                    earlier.push(Placed { position, seq, ..p });
                }
            }
        }
        // Claimed before: stored, unless the writer stopped between claim and write.
        let missing = in_chunks(
            earlier
                .iter()
                .map(|p| async move {
                    Ok::<_, Error>(
                        self.fact_at(&facts_ref[p.index].tenant_id, p)
                            .await?
                            .is_none(),
                    )
                })
                .collect(),
        )
        .await?;
        let key = |i: usize| (facts[i].tenant_id.clone(), identities[i].clone());
        let mut top = None;
        let mut fresh: HashSet<usize> = HashSet::new();
        {
            let unreported = self.unreported.lock().map_err(|_| poisoned())?;
            for (p, missing) in earlier.into_iter().zip(missing) {
                top = top.max(Some(p.seq));
                if missing {
                    write.push(p);
                } else if unreported.contains(&key(p.index)) {
                    // Written by an append of this process that failed after it.
                    fresh.insert(p.index);
                }
            }
        }
        top = top.max(write.iter().map(|p| p.seq).max());
        // Until this append answers, what it writes counts as not reported.
        {
            let mut unreported = self.unreported.lock().map_err(|_| poisoned())?;
            unreported.extend(write.iter().map(|p| key(p.index)));
        }
        let tenants: HashSet<&str> = facts.iter().map(|f| f.tenant_id.as_str()).collect();
        for tenant in tenants {
            run(&self.session, &self.s.insert_tenant, (tenant,)).await?;
        }
        in_chunks(
            write
                .iter()
                .map(|p| {
                    self.write_fact(&facts_ref[p.index].tenant_id, &facts_ref[p.index].fact, p)
                })
                .collect(),
        )
        .await?;
        fresh.extend(write.iter().map(|p| p.index));
        // Members, in batch order: a version newer than the stored one replaces it.
        let mut reported = HashSet::new();
        for (i, f) in facts.iter().enumerate() {
            let Fact::Member(m) = &f.fact else {
                continue;
            };
            let version = (
                f.tenant_id.clone(),
                format!("{}\0{}", identities[i], m.version),
            );
            // Stored by an append of this process that failed after it (once per batch).
            let carried = {
                let mut unreported = self.unreported.lock().map_err(|_| poisoned())?;
                let carried = !reported.contains(&version) && unreported.contains(&version);
                unreported.insert(version.clone());
                carried
            };
            if self.put_member(&f.tenant_id, &f.fact).await? || carried {
                fresh.insert(i);
            }
            reported.insert(version);
        }
        if let Some(top) = top {
            self.raise_meta("landed", seq_value(top)).await?;
        }
        {
            let mut unreported = self.unreported.lock().map_err(|_| poisoned())?;
            for i in &receipts {
                unreported.remove(&key(*i));
            }
            for version in &reported {
                unreported.remove(version);
            }
        }
        Ok(facts
            .into_iter()
            .enumerate()
            .filter(|(i, _)| fresh.contains(i))
            .map(|(_, f)| f)
            .collect())
    }

    async fn snapshot(&self) -> Result<u64> {
        Ok(self.meta("landed").await?.map_or(0, seq_of))
    }

    async fn page(
        &self,
        tenant_id: &str,
        kind: Receipts,
        from: Day,
        to: Day,
        snapshot: u64,
        after: Option<Position>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<FactPage> {
        let start = match after {
            Some((day, seq)) if seq == u64::MAX => (day.saturating_add(1), 0),
            Some((day, seq)) => (day, seq + 1),
            None => (from, 0),
        }
        .max((from, 0));
        let mut page = FactPage::default();
        let mut bytes = 0;
        let limit = limit.max(1);
        let mut visit = |position: i64, seq: u64, body: Vec<u8>| -> Result<bool> {
            if seq > snapshot {
                return Ok(true);
            }
            if page.rows.len() >= limit || (bytes >= max_bytes && !page.rows.is_empty()) {
                page.more = true;
                return Ok(false);
            }
            bytes += body.len();
            page.rows.push(((position, seq), decode(&body)?));
            Ok(true)
        };
        self.walk(tenant_id, kind, start, (to, u64::MAX >> 1), &mut visit)
            .await?;
        Ok(page)
    }

    async fn scan(
        &self,
        from: ScanFrom,
        limit: usize,
    ) -> Result<(Vec<TenantFact>, Option<ScanFrom>)> {
        let limit = limit.max(1);
        let mut out: Vec<TenantFact> = Vec::new();
        let mut phase = from;
        loop {
            let (kind, after) = match &phase {
                ScanFrom::Purchases(a) => (Receipts::Purchases, a.clone()),
                ScanFrom::Refunds(a) => (Receipts::Refunds, a.clone()),
                ScanFrom::Ledger(a) => (Receipts::Ledger, a.clone()),
                ScanFrom::Members(after) => {
                    let after = after.clone();
                    let first = after.as_ref().map_or("", |(t, _)| t.as_str());
                    for tenant in self.tenants_from(first).await? {
                        let resume = after
                            .as_ref()
                            .filter(|(t, _)| *t == tenant)
                            .map(|(_, m)| (member_shard(m), m.clone()));
                        for shard in 0..MEMBER_SHARDS {
                            let since = match &resume {
                                Some((s, _)) if shard < *s => continue,
                                Some((s, m)) if shard == *s => m.clone(),
                                _ => String::new(),
                            };
                            let mut rows = row_stream::<(String, Vec<u8>)>(
                                &self.session,
                                &self.s.select_members,
                                (tenant.as_str(), shard, since.as_str()),
                            )
                            .await?;
                            while let Some(row) = rows.next().await {
                                let (member, body) = row.map_err(unavailable)?;
                                out.push(TenantFact {
                                    tenant_id: tenant.clone(),
                                    fact: decode(&body)?,
                                });
                                if out.len() >= limit {
                                    let at = Some((tenant.clone(), member));
                                    return Ok((out, Some(ScanFrom::Members(at))));
                                }
                            }
                        }
                    }
                    return Ok((out, None));
                }
            };
            let first = after.as_ref().map_or("", |(t, _, _)| t.as_str());
            for tenant in self.tenants_from(first).await? {
                let start = match &after {
                    Some((t, position, seq)) if *t == tenant => (*position, seq + 1),
                    _ => (i64::MIN, 0),
                };
                let mut last = None;
                let mut batch = Vec::new();
                let room = limit - out.len();
                let mut visit = |position: i64, seq: u64, body: Vec<u8>| -> Result<bool> {
                    batch.push(decode::<Fact>(&body)?);
                    last = Some((position, seq));
                    Ok(batch.len() < room)
                };
                let stopped = self
                    .walk(&tenant, kind, start, (i64::MAX, u64::MAX >> 1), &mut visit)
                    .await?;
                let full = stopped || batch.len() >= room;
                out.extend(batch.into_iter().map(|fact| TenantFact {
                    tenant_id: tenant.clone(),
                    fact,
                }));
                if full && let Some((position, seq)) = last {
                    let at = Some((tenant.clone(), position, seq));
                    return Ok((out, Some(ScanFrom::within(kind, at))));
                }
            }
            phase = ScanFrom::after_all(kind);
        }
    }

    async fn prepare(&self) -> Result<()> {
        // Every append keeps the indexes; there is nothing to catch up.
        Ok(())
    }

    async fn member_facts(
        &self,
        tenant_id: &str,
        members: Vec<String>,
        days: (Day, Day),
        ledger: bool,
    ) -> Result<Vec<Fact>> {
        let mut ranges = vec![
            (Receipts::Purchases, days.0, days.1),
            (Receipts::Refunds, days.0, days.1),
        ];
        if ledger {
            ranges.push((Receipts::Ledger, i64::MIN, i64::MAX));
        }
        // One index read per member and kind, [`CONCURRENCY`] at a time like the fact reads:
        // a 10,000-member segment is not 30,000 round trips one after another.
        let reads = members
            .iter()
            .flat_map(|member| ranges.iter().map(move |r| (member, *r)))
            .map(|(member, (kind, from, to))| async move {
                let rows = all_rows::<(i64, i64)>(
                    &self.session,
                    &self.s.select_member_index,
                    (tenant_id, member.as_str(), kind_code(kind), from, to),
                )
                .await?;
                Ok::<_, Error>(
                    rows.into_iter()
                        .map(|(position, seq)| Placed {
                            index: 0,
                            kind,
                            position,
                            seq: seq_of(seq),
                        })
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let places: Vec<Placed> = in_chunks(reads).await?.into_iter().flatten().collect();
        let found: Vec<Option<Fact>> = in_chunks(
            places
                .iter()
                .map(|p| async move {
                    match self.fact_at(tenant_id, p).await? {
                        Some(Some(body)) => Ok(Some(decode(&body)?)),
                        _ => Ok::<_, Error>(None),
                    }
                })
                .collect(),
        )
        .await?;
        Ok(found.into_iter().flatten().collect())
    }

    async fn append_audit(&self, entries: Vec<AuditEntry>) -> Result<usize> {
        if entries.is_empty() {
            return Ok(0);
        }
        let _one_writer = self.writer.lock().await;
        let mut fresh = 0;
        for entry in &entries {
            let (tenant, id) = (entry.tenant_id.as_str(), entry.id.as_str());
            let stored = first_row::<(Option<i64>, Option<bool>)>(
                &self.session,
                &self.s.select_audit_id,
                (tenant, id),
            )
            .await?;
            if let Some((time, open)) = stored {
                // Only the answer to a start still open replaces it.
                if entry.in_flight || open != Some(true) {
                    continue;
                }
                // A row at another time goes; one at the same time is overwritten.
                if let Some(time) = time.filter(|&t| t != entry.time) {
                    run(
                        &self.session,
                        &self.s.delete_audit,
                        (self.stamp(), tenant, time.div_euclid(DAY_MS), time, id),
                    )
                    .await?;
                }
            }
            let day = entry.time.div_euclid(DAY_MS);
            run(&self.session, &self.s.insert_audit_day, (tenant, day)).await?;
            run(
                &self.session,
                &self.s.insert_audit,
                (
                    tenant,
                    day,
                    entry.time,
                    id,
                    entry.in_flight,
                    encode(&AuditHead::of(entry))?,
                    encode(entry)?,
                    self.stamp(),
                ),
            )
            .await?;
            if entry.in_flight {
                run(
                    &self.session,
                    &self.s.insert_open,
                    (tenant, id, entry.time, self.stamp()),
                )
                .await?;
            } else {
                run(
                    &self.session,
                    &self.s.delete_open,
                    (self.stamp(), tenant, id),
                )
                .await?;
            }
            // Last: the id row is what makes the record count as stored.
            run(
                &self.session,
                &self.s.insert_audit_id,
                (tenant, id, entry.time, entry.in_flight, self.stamp()),
            )
            .await?;
            fresh += 1;
        }
        Ok(fresh)
    }

    async fn oldest_open_audit(&self, tenant_id: &str, since: Millis) -> Result<Option<Millis>> {
        let times: Vec<(Option<i64>,)> =
            all_rows::<(Option<i64>,)>(&self.session, &self.s.select_open, (tenant_id,)).await?;
        Ok(times
            .into_iter()
            .filter_map(|(t,)| t)
            .filter(|&t| t >= since)
            .min())
    }

    async fn audit_page(
        &self,
        tenant_id: &str,
        query: &AuditQuery,
        order: Order,
        after: Option<AuditCursor>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<AuditPage> {
        let mut page = AuditPage::default();
        // The days to read, bounded by the period and the cursor.
        let (mut lo, mut hi) = (
            query.from.div_euclid(DAY_MS),
            (query.to.saturating_sub(1)).div_euclid(DAY_MS),
        );
        if let Some((time, _)) = &after {
            match order {
                Order::OldestFirst => lo = lo.max(time.div_euclid(DAY_MS)),
                Order::NewestFirst => hi = hi.min(time.div_euclid(DAY_MS)),
            }
        }
        if lo > hi {
            return Ok(page);
        }
        let days_statement = match order {
            Order::OldestFirst => &self.s.select_days_asc,
            Order::NewestFirst => &self.s.select_days_desc,
        };
        let days: Vec<i64> =
            Ok(
                all_rows::<(i64,)>(&self.session, days_statement, (tenant_id, lo, hi))
                    .await?
                    .into_iter()
                    .map(|(d,)| d)
                    .collect(),
            )?;
        let (mut last, mut bytes, mut looked) = (None, 0, 0usize);
        for day in days {
            let (statement, values) = match (order, &after) {
                (Order::OldestFirst, Some((time, id))) => (
                    &self.s.select_audit_after,
                    (tenant_id, day, *time, id.clone(), query.to, String::new()),
                ),
                (Order::OldestFirst, None) => (
                    &self.s.select_audit_from,
                    (
                        tenant_id,
                        day,
                        query.from,
                        String::new(),
                        query.to,
                        String::new(),
                    ),
                ),
                (Order::NewestFirst, Some((time, id))) => (
                    &self.s.select_audit_desc,
                    (tenant_id, day, query.from, String::new(), *time, id.clone()),
                ),
                (Order::NewestFirst, None) => (
                    &self.s.select_audit_desc,
                    (
                        tenant_id,
                        day,
                        query.from,
                        String::new(),
                        query.to,
                        String::new(),
                    ),
                ),
            };
            let mut rows = row_stream::<(i64, String, Option<bool>, Vec<u8>, Vec<u8>)>(
                &self.session,
                statement,
                values,
            )
            .await?;
            while let Some(row) = rows.next().await {
                let (time, id, open, head, body) = row.map_err(unavailable)?;
                let full = page.entries.len() >= limit.max(1)
                    || (bytes >= max_bytes && !page.entries.is_empty());
                if full || looked >= AUDIT_SCAN {
                    page.next = last;
                    return Ok(page);
                }
                looked += 1;
                last = Some((time, id));
                let head: AuditHead = decode(&head)?;
                if !query.matches_head(time, &head) {
                    continue;
                }
                bytes += body.len();
                let mut entry: AuditEntry = decode(&body)?;
                entry.in_flight = open == Some(true);
                page.entries.push(entry);
            }
        }
        Ok(page)
    }

    async fn clear_facts(&self) -> Result<()> {
        let _one_writer = self.writer.lock().await;
        for table in [
            "reporting_facts",
            "reporting_buckets",
            "reporting_tenants",
            "reporting_identities",
            "reporting_by_member",
            "reporting_members",
        ] {
            // TRUNCATE flushes (and, with `auto_snapshot`, snapshots) the table on every node:
            // far longer than a request's usual deadline.
            let mut truncate =
                scylla::statement::unprepared::Statement::new(format!("TRUNCATE {table}"));
            truncate.set_request_timeout(Some(std::time::Duration::from_secs(600)));
            self.session
                .query_unpaged(truncate, ())
                .await
                .map_err(unavailable)?;
        }
        self.unreported.lock().map_err(|_| poisoned())?.clear();
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        self.meta("seq").await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_position_then_sequence() {
        let p = Receipts::Purchases;
        assert!(bucket(p, 10, 0) < bucket(p, 10, 70_000));
        assert!(bucket(p, 10, 70_000) < bucket(p, 11, 0));
        assert!(bucket(p, 10, u64::MAX >> 1) <= last_bucket(p, 10));
        assert!(bucket(p, -3, 5) < bucket(p, 0, 0));
        let l = Receipts::Ledger;
        assert_eq!(bucket(l, 59_999, 9), bucket(l, 0, 1));
        assert!(bucket(l, -1, 0) < bucket(l, 0, 0));
        assert_eq!(last_bucket(l, 120_000), 2);
    }

    #[test]
    fn member_shards_are_stable_and_spread() {
        assert_eq!(member_shard("m1"), member_shard("m1"));
        let shards: HashSet<i8> = (0..1000).map(|i| member_shard(&format!("m{i}"))).collect();
        assert_eq!(shards.len(), MEMBER_SHARDS as usize);
        assert!(shards.iter().all(|s| (0..MEMBER_SHARDS).contains(s)));
    }

    /// The conformance suite against a real ScyllaDB node, when `LOYALTY_TEST_SCYLLA` names
    /// one (`host:port`). Each run uses a fresh keyspace.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_on_a_real_node() {
        let Ok(node) = std::env::var("LOYALTY_TEST_SCYLLA") else {
            eprintln!("LOYALTY_TEST_SCYLLA is not set: the ScyllaDB conformance run is skipped");
            return;
        };
        let config = loyalty_platform::config::ScyllaConfig {
            nodes: vec![node],
            keyspace: format!("loyalty_reporting_test_{}", std::process::id()),
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
            ..loyalty_platform::config::ScyllaConfig::default()
        };
        loyalty_platform::scylla::migrate(&config, MIGRATIONS)
            .await
            .unwrap();
        let session = loyalty_platform::scylla::connect(&config).await.unwrap();
        let store = ScyllaReportingStore::new(session).await.unwrap();
        crate::store::conformance::run(&store).await;
    }
}
