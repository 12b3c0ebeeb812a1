//! The segmentation store on redb (`segmentation.redb`).
//!
//! Features, applied event ids, segments and memberships of a change go in one transaction,
//! so an event's effect and the record that it was applied can never part.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use loyalty_platform::clock::Millis;
use loyalty_platform::embedded::{
    EmbeddedDb, Records, get_record, key, open_for_read, prefix_range, put_record, read_record,
    rows_after, storage_error as e,
};
use loyalty_platform::error::Result;
use redb::{ReadableTable, TableDefinition};

use super::{
    Change, DEDUP_WINDOW_MS, FeatureChange, MembershipChange, RfmRun, Rule, RuleBook, SegmentDef,
    SegmentationStore,
};
use crate::expr::Context;
use crate::features::Features;
use crate::rfm::Score;

/// (tenant, member) → features.
const FEATURES: Records = TableDefinition::new("features");
/// (tenant, event id) → when it was applied.
const APPLIED: TableDefinition<&str, i64> = TableDefinition::new("applied_events");
/// (applied at, tenant, event id), to forget old ids in order.
const APPLIED_BY_TIME: TableDefinition<&str, ()> = TableDefinition::new("applied_by_time");
/// (tenant, segment) → definition.
const SEGMENTS: Records = TableDefinition::new("segments");
/// (tenant, member) → the member's segment ids.
const MEMBERSHIP: Records = TableDefinition::new("membership");
/// (tenant, segment, member) → ().
const SEGMENT_MEMBERS: TableDefinition<&str, ()> = TableDefinition::new("segment_members");
/// (tenant, segment) → member count.
const COUNTS: TableDefinition<&str, u64> = TableDefinition::new("segment_counts");
/// (tenant, member, time, segment) → entered.
const HISTORY: TableDefinition<&str, bool> = TableDefinition::new("membership_history");

/// (tenant, generation, member) → score: each run writes its own rows, so readers of the
/// published run never see a run in progress.
const RFM: Records = TableDefinition::new("rfm_scores");
/// tenant → the last generation handed out.
const RFM_GENERATIONS: TableDefinition<&str, u64> = TableDefinition::new("rfm_generations");
/// tenant → the current run.
const RFM_RUNS: Records = TableDefinition::new("rfm_runs");

/// Marks: `scrub_pending` while an erasure's replaced bytes may be in the file's free space.
const MARKS: Records = TableDefinition::new("segmentation_marks");
const SCRUB_PENDING: &str = "scrub_pending";

/// Most history entries kept per member (the oldest go first).
const MAX_HISTORY: usize = 1000;

pub use loyalty_platform::embedded::Row;

/// The tables a copy of the store reads ([`EmbeddedSegmentationStore::rows`]). The counts
/// and marks are left out: counts follow from the members, and a copy holds no replaced
/// data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// (tenant, member) → features.
    Features,
    /// (tenant, event id) → when it was applied (ms, as decimal text).
    Applied,
    /// (tenant, segment) → definition.
    Segments,
    /// (tenant, member) → the member's segment ids (a record).
    Membership,
    /// (tenant, segment, member).
    SegmentMembers,
    /// (tenant, member, time padded to 20 digits, segment) → "1" entered or "0" left.
    History,
    /// (tenant, generation padded to 20 digits, member) → score.
    Rfm,
    /// tenant → the last generation handed out (decimal text).
    RfmGenerations,
    /// tenant → the current run.
    RfmRuns,
}

impl Table {
    pub const ALL: [Table; 9] = [
        Table::Features,
        Table::Applied,
        Table::Segments,
        Table::Membership,
        Table::SegmentMembers,
        Table::History,
        Table::Rfm,
        Table::RfmGenerations,
        Table::RfmRuns,
    ];
}

#[derive(Debug, Clone)]
pub struct EmbeddedSegmentationStore {
    db: EmbeddedDb,
}

impl EmbeddedSegmentationStore {
    /// Up to `limit` rows of `table` in key order after the key `after` (as returned last):
    /// for copying the store elsewhere. Also returns the last key read.
    pub async fn rows(
        &self,
        table: Table,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<Row>, Option<String>)> {
        let bytes = |v: &[u8]| v.to_vec();
        let number = |v: i64| v.to_string().into_bytes();
        let count = |v: u64| v.to_string().into_bytes();
        let flag = |v: bool| if v { b"1".to_vec() } else { b"0".to_vec() };
        let nothing = |_: ()| Vec::new();
        self.db
            .read(move |txn| {
                let after = after.as_deref();
                match table {
                    Table::Features => rows_after(txn, FEATURES, after, limit, bytes),
                    Table::Applied => rows_after(txn, APPLIED, after, limit, number),
                    Table::Segments => rows_after(txn, SEGMENTS, after, limit, bytes),
                    Table::Membership => rows_after(txn, MEMBERSHIP, after, limit, bytes),
                    Table::SegmentMembers => {
                        rows_after(txn, SEGMENT_MEMBERS, after, limit, nothing)
                    }
                    Table::History => rows_after(txn, HISTORY, after, limit, flag),
                    Table::Rfm => rows_after(txn, RFM, after, limit, bytes),
                    Table::RfmGenerations => rows_after(txn, RFM_GENERATIONS, after, limit, count),
                    Table::RfmRuns => rows_after(txn, RFM_RUNS, after, limit, bytes),
                }
            })
            .await
    }
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            db: EmbeddedDb::open(path)?,
        })
    }
}

fn padded(ms: Millis) -> String {
    format!("{:020}", ms.max(0))
}

/// The keys under `prefix` that come after the entry `prefix, after` (all of them when
/// `after` is empty), for paging in key order.
fn page_range(prefix: &[&str], after: &str) -> (String, String) {
    let (start, end) = prefix_range(prefix);
    if after.is_empty() {
        return (start, end);
    }
    let mut parts = prefix.to_vec();
    parts.push(after);
    let mut from = key(&parts);
    from.push('\u{0}');
    (from, end)
}

/// The rules whose segment still has the version they were compiled from.
fn current_rules<'r>(
    txn: &redb::WriteTransaction,
    tenant: &str,
    rules: &'r [Rule],
) -> Result<Vec<&'r Rule>> {
    let segments = txn.open_table(SEGMENTS).map_err(e)?;
    let mut out = Vec::with_capacity(rules.len());
    for rule in rules {
        let stored: Option<SegmentDef> = get_record(&segments, &key(&[tenant, &rule.segment_id]))?;
        if stored.is_some_and(|d| (d.version, d.update_time) == (rule.version, rule.update_time)) {
            out.push(rule);
        }
    }
    Ok(out)
}

/// Evaluates one member against the rules and writes the flags; how many changed.
fn evaluate_member(
    txn: &redb::WriteTransaction,
    tenant: &str,
    member: &str,
    f: &Features,
    rules: &[&Rule],
    now: Millis,
) -> Result<usize> {
    let cx = Context { now };
    let mut changed = 0;
    for rule in rules {
        if set_one(
            txn,
            tenant,
            member,
            &rule.segment_id,
            rule.expr.matches(f, cx),
            now,
        )? {
            changed += 1;
        }
    }
    Ok(changed)
}

/// Sets one membership flag inside a write transaction; true when it changed.
fn set_one(
    txn: &redb::WriteTransaction,
    tenant: &str,
    member: &str,
    segment: &str,
    is_member: bool,
    now: Millis,
) -> Result<bool> {
    let mut index = txn.open_table(SEGMENT_MEMBERS).map_err(e)?;
    let k = key(&[tenant, segment, member]);
    let was = index.get(k.as_str()).map_err(e)?.is_some();
    if was == is_member {
        return Ok(false);
    }
    let mut counts = txn.open_table(COUNTS).map_err(e)?;
    let ck = key(&[tenant, segment]);
    let count = counts.get(ck.as_str()).map_err(e)?.map_or(0, |v| v.value());
    let mut membership = txn.open_table(MEMBERSHIP).map_err(e)?;
    let mk = key(&[tenant, member]);
    let mut segments: BTreeSet<String> = get_record(&membership, &mk)?.unwrap_or_default();
    if is_member {
        index.insert(k.as_str(), ()).map_err(e)?;
        counts.insert(ck.as_str(), count + 1).map_err(e)?;
        segments.insert(segment.to_owned());
    } else {
        index.remove(k.as_str()).map_err(e)?;
        counts
            .insert(ck.as_str(), count.saturating_sub(1))
            .map_err(e)?;
        segments.remove(segment);
    }
    if segments.is_empty() {
        membership.remove(mk.as_str()).map_err(e)?;
    } else {
        put_record(&mut membership, &mk, &segments)?;
    }
    let mut history = txn.open_table(HISTORY).map_err(e)?;
    history
        .insert(
            key(&[tenant, member, &padded(now), segment]).as_str(),
            is_member,
        )
        .map_err(e)?;
    // Bound the member's history.
    let (start, end) = prefix_range(&[tenant, member]);
    let extra = history
        .range(start.as_str()..end.as_str())
        .map_err(e)?
        .count()
        .saturating_sub(MAX_HISTORY);
    if extra > 0 {
        let oldest: Vec<String> = history
            .range(start.as_str()..end.as_str())
            .map_err(e)?
            .take(extra)
            .filter_map(|r| r.ok().map(|(k, _)| k.value().to_owned()))
            .collect();
        for k in oldest {
            history.remove(k.as_str()).map_err(e)?;
        }
    }
    Ok(true)
}

#[async_trait::async_trait]
impl SegmentationStore for EmbeddedSegmentationStore {
    async fn apply_changes(
        &self,
        changes: Vec<FeatureChange>,
        rules: RuleBook,
        now: Millis,
    ) -> Result<usize> {
        self.db
            .write(move |txn| {
                let mut new = 0;
                // Every member the batch names, with their features after it.
                let mut named: BTreeMap<(String, String), Features> = BTreeMap::new();
                // Those named by more than ledger entries: a ledger entry changes only
                // `points_total`, so a member it alone names is evaluated only against rules
                // that read it.
                let mut beyond_ledger: BTreeSet<(String, String)> = BTreeSet::new();
                {
                    let mut applied = txn.open_table(APPLIED).map_err(e)?;
                    let mut by_time = txn.open_table(APPLIED_BY_TIME).map_err(e)?;
                    let mut features = txn.open_table(FEATURES).map_err(e)?;
                    for c in &changes {
                        let id = (c.tenant_id.clone(), c.member_id.clone());
                        if !matches!(c.change, Change::Ledger(_)) {
                            beyond_ledger.insert(id.clone());
                        }
                        let fk = key(&[&c.tenant_id, &c.member_id]);
                        let mut f: Features = match named.remove(&id) {
                            Some(f) => f,
                            None => features
                                .get(fk.as_str())
                                .map_err(e)?
                                .map(|v| Features::decode(v.value()))
                                .transpose()?
                                .unwrap_or_default(),
                        };
                        let ak = key(&[&c.tenant_id, &c.event_id]);
                        if applied.get(ak.as_str()).map_err(e)?.is_none() {
                            applied.insert(ak.as_str(), now).map_err(e)?;
                            by_time
                                .insert(
                                    key(&[&padded(now), &c.tenant_id, &c.event_id]).as_str(),
                                    (),
                                )
                                .map_err(e)?;
                            match &c.change {
                                Change::Purchase(p) => f.apply_purchase(p),
                                Change::Refund(r) => f.apply_refund(r),
                                Change::Member(m) => f.apply_member(m),
                                Change::Ledger(l) => f.apply_ledger(l),
                                Change::Erasure(m) => {
                                    f.apply_member(m);
                                    loyalty_platform::embedded::mark(txn, MARKS, SCRUB_PENDING)?;
                                }
                            }
                            put_record(&mut features, &fk, &f)?;
                            new += 1;
                        }
                        named.insert(id, f);
                    }
                    // Forget ids older than the window, a bounded number per call.
                    let horizon = padded(now - DEDUP_WINDOW_MS);
                    let old: Vec<String> = by_time
                        .range(..horizon.as_str())
                        .map_err(e)?
                        .take(1000)
                        .filter_map(|r| r.ok().map(|(k, _)| k.value().to_owned()))
                        .collect();
                    for k in old {
                        by_time.remove(k.as_str()).map_err(e)?;
                        let mut parts = k.splitn(3, '\u{0}');
                        let (_, tenant, event) = (parts.next(), parts.next(), parts.next());
                        if let (Some(tenant), Some(event)) = (tenant, event) {
                            applied.remove(key(&[tenant, event]).as_str()).map_err(e)?;
                        }
                    }
                }
                for ((tenant, member), f) in &named {
                    if let Some(tenant_rules) = rules.get(tenant) {
                        let ledger_only =
                            !beyond_ledger.contains(&(tenant.clone(), member.clone()));
                        let reads_points = |r: &Rule| r.expr.reads_feature("points_total");
                        if ledger_only && !tenant_rules.iter().any(reads_points) {
                            continue;
                        }
                        let mut current = current_rules(txn, tenant, tenant_rules)?;
                        if ledger_only {
                            current.retain(|r| reads_points(r));
                        }
                        evaluate_member(txn, tenant, member, f, &current, now)?;
                    }
                }
                Ok(new)
            })
            .await
    }

    async fn evaluate_page(
        &self,
        tenant_id: &str,
        after: &str,
        limit: usize,
        rules: Vec<Rule>,
        now: Millis,
    ) -> Result<(Option<String>, usize)> {
        let tenant = tenant_id.to_owned();
        let (from, end) = page_range(&[tenant_id], after);
        self.db
            .write(move |txn| {
                let page: Vec<(String, Features)> = {
                    let t = txn.open_table(FEATURES).map_err(e)?;
                    let mut page = Vec::new();
                    for item in t.range(from.as_str()..end.as_str()).map_err(e)?.take(limit) {
                        let (k, v) = item.map_err(e)?;
                        let member = k.value().rsplit('\u{0}').next().unwrap_or_default();
                        page.push((member.to_owned(), Features::decode(v.value())?));
                    }
                    page
                };
                let current = current_rules(txn, &tenant, &rules)?;
                let mut changed = 0;
                for (member, f) in &page {
                    changed += evaluate_member(txn, &tenant, member, f, &current, now)?;
                }
                Ok((page.last().map(|(m, _)| m.clone()), changed))
            })
            .await
    }

    async fn features(&self, tenant_id: &str, member_id: &str) -> Result<Option<Features>> {
        let k = key(&[tenant_id, member_id]);
        self.db.get(|txn| {
            let Some(t) = open_for_read(txn, FEATURES)? else {
                return Ok(None);
            };
            let v = t.get(k.as_str()).map_err(e)?;
            v.map(|v| Features::decode(v.value())).transpose()
        })
    }

    async fn features_page(
        &self,
        tenant_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Features)>> {
        let (from, end) = page_range(&[tenant_id], after);
        self.db
            .read(move |txn| {
                let Some(t) = open_for_read(txn, FEATURES)? else {
                    return Ok(Vec::new());
                };
                let mut out = Vec::new();
                for item in t.range(from.as_str()..end.as_str()).map_err(e)?.take(limit) {
                    let (k, v) = item.map_err(e)?;
                    let member = k
                        .value()
                        .rsplit('\u{0}')
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    out.push((member, Features::decode(v.value())?));
                }
                Ok(out)
            })
            .await
    }

    async fn put_segment(
        &self,
        segment: SegmentDef,
        expected_version: Option<i64>,
    ) -> Result<bool> {
        self.db
            .write(move |txn| {
                let mut segments = txn.open_table(SEGMENTS).map_err(e)?;
                let k = key(&[&segment.tenant_id, &segment.segment_id]);
                let current: Option<SegmentDef> = get_record(&segments, &k)?;
                let ok = match (&current, expected_version) {
                    (None, None) => {
                        let (start, end) = prefix_range(&[&segment.tenant_id]);
                        segments
                            .range(start.as_str()..end.as_str())
                            .map_err(e)?
                            .count()
                            < super::MAX_SEGMENTS
                    }
                    (Some(c), Some(v)) => c.version == v,
                    _ => false,
                };
                if ok {
                    put_record(&mut segments, &k, &segment)?;
                }
                Ok(ok)
            })
            .await
    }

    async fn segment(&self, tenant_id: &str, segment_id: &str) -> Result<Option<SegmentDef>> {
        let k = key(&[tenant_id, segment_id]);
        self.db
            .read(move |txn| read_record(txn, SEGMENTS, &k))
            .await
    }

    async fn segments(&self, tenant_id: &str) -> Result<Vec<SegmentDef>> {
        let (start, end) = prefix_range(&[tenant_id]);
        self.db
            .read(move |txn| {
                let Some(t) = open_for_read(txn, SEGMENTS)? else {
                    return Ok(Vec::new());
                };
                let mut out = Vec::new();
                for item in t.range(start.as_str()..end.as_str()).map_err(e)? {
                    let (_, v) = item.map_err(e)?;
                    out.push(loyalty_platform::embedded::decode(v.value())?);
                }
                Ok(out)
            })
            .await
    }

    async fn delete_segment(&self, tenant_id: &str, segment_id: &str, now: Millis) -> Result<bool> {
        let (tenant, segment) = (tenant_id.to_owned(), segment_id.to_owned());
        self.db
            .write(move |txn| {
                let mut segments = txn.open_table(SEGMENTS).map_err(e)?;
                if segments
                    .remove(key(&[&tenant, &segment]).as_str())
                    .map_err(e)?
                    .is_none()
                {
                    return Ok(false);
                }
                let (start, end) = prefix_range(&[&tenant, &segment]);
                let members: Vec<String> = {
                    let index = txn.open_table(SEGMENT_MEMBERS).map_err(e)?;
                    index
                        .range(start.as_str()..end.as_str())
                        .map_err(e)?
                        .filter_map(|r| {
                            r.ok().map(|(k, _)| {
                                k.value()
                                    .rsplit('\u{0}')
                                    .next()
                                    .unwrap_or_default()
                                    .to_owned()
                            })
                        })
                        .collect()
                };
                for m in members {
                    set_one(txn, &tenant, &m, &segment, false, now)?;
                }
                let mut counts = txn.open_table(COUNTS).map_err(e)?;
                counts
                    .remove(key(&[&tenant, &segment]).as_str())
                    .map_err(e)?;
                Ok(true)
            })
            .await
    }

    async fn set_memberships(
        &self,
        tenant_id: &str,
        changes: Vec<(String, String, bool)>,
        now: Millis,
    ) -> Result<usize> {
        let tenant = tenant_id.to_owned();
        self.db
            .write(move |txn| {
                let mut n = 0;
                for (member, segment, is_member) in &changes {
                    let exists = {
                        let segments = txn.open_table(SEGMENTS).map_err(e)?;
                        segments
                            .get(key(&[&tenant, segment]).as_str())
                            .map_err(e)?
                            .is_some()
                    };
                    if exists && set_one(txn, &tenant, member, segment, *is_member, now)? {
                        n += 1;
                    }
                }
                Ok(n)
            })
            .await
    }

    async fn member_segments(&self, tenant_id: &str, member_id: &str) -> Result<Vec<String>> {
        let k = key(&[tenant_id, member_id]);
        self.db.get(|txn| {
            let set: Option<BTreeSet<String>> = read_record(txn, MEMBERSHIP, &k)?;
            Ok(set.unwrap_or_default().into_iter().collect())
        })
    }

    async fn segment_members(
        &self,
        tenant_id: &str,
        segment_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>> {
        let (from, end) = page_range(&[tenant_id, segment_id], after);
        self.db
            .read(move |txn| {
                let Some(t) = open_for_read(txn, SEGMENT_MEMBERS)? else {
                    return Ok(Vec::new());
                };
                let mut out = Vec::new();
                for item in t.range(from.as_str()..end.as_str()).map_err(e)?.take(limit) {
                    let (k, _) = item.map_err(e)?;
                    out.push(
                        k.value()
                            .rsplit('\u{0}')
                            .next()
                            .unwrap_or_default()
                            .to_owned(),
                    );
                }
                Ok(out)
            })
            .await
    }

    async fn count(&self, tenant_id: &str, segment_id: &str) -> Result<u64> {
        let k = key(&[tenant_id, segment_id]);
        self.db
            .read(move |txn| {
                let Some(t) = open_for_read(txn, COUNTS)? else {
                    return Ok(0);
                };
                Ok(t.get(k.as_str()).map_err(e)?.map_or(0, |v| v.value()))
            })
            .await
    }

    async fn history(
        &self,
        tenant_id: &str,
        member_id: &str,
        before: Option<String>,
        limit: usize,
    ) -> Result<(Vec<MembershipChange>, Option<String>)> {
        let (start, end) = prefix_range(&[tenant_id, member_id]);
        let end = match before {
            None => end,
            Some(b) if b.as_str() > start.as_str() && b.as_str() <= end.as_str() => b,
            Some(_) => {
                return Err(loyalty_platform::error::Error::invalid(
                    "page_token",
                    "belongs to another member's history",
                ));
            }
        };
        self.db
            .read(move |txn| {
                let Some(t) = open_for_read(txn, HISTORY)? else {
                    return Ok((Vec::new(), None));
                };
                let mut out = Vec::new();
                let mut last = None;
                for item in t
                    .range(start.as_str()..end.as_str())
                    .map_err(e)?
                    .rev()
                    .take(limit + 1)
                {
                    let (k, v) = item.map_err(e)?;
                    if out.len() == limit {
                        return Ok((out, last));
                    }
                    let k = k.value().to_owned();
                    let mut parts = k.rsplitn(3, '\u{0}');
                    let segment_id = parts.next().unwrap_or_default().to_owned();
                    let time = parts.next().and_then(|t| t.parse().ok()).unwrap_or(0);
                    out.push(MembershipChange {
                        segment_id,
                        entered: v.value(),
                        time,
                    });
                    last = Some(k);
                }
                Ok((out, None))
            })
            .await
    }

    async fn tenants(&self) -> Result<Vec<String>> {
        self.db
            .read(move |txn| {
                let Some(t) = open_for_read(txn, SEGMENTS)? else {
                    return Ok(Vec::new());
                };
                let mut out: Vec<String> = Vec::new();
                for item in t.iter().map_err(e)? {
                    let (k, _) = item.map_err(e)?;
                    let tenant = k
                        .value()
                        .split('\u{0}')
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    if out.last() != Some(&tenant) {
                        out.push(tenant);
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn tenants_with_features(&self) -> Result<Vec<String>> {
        self.db
            .read(move |txn| {
                let Some(t) = open_for_read(txn, FEATURES)? else {
                    return Ok(Vec::new());
                };
                // Skip from tenant to tenant instead of walking every member.
                let mut out: Vec<String> = Vec::new();
                let mut from = String::new();
                loop {
                    let next = t
                        .range(from.as_str()..)
                        .map_err(e)?
                        .next()
                        .transpose()
                        .map_err(e)?
                        .map(|(k, _)| {
                            k.value()
                                .split('\u{0}')
                                .next()
                                .unwrap_or_default()
                                .to_owned()
                        });
                    let Some(tenant) = next else { break };
                    from = prefix_range(&[&tenant]).1;
                    out.push(tenant);
                }
                Ok(out)
            })
            .await
    }

    async fn next_rfm_generation(&self, tenant_id: &str) -> Result<u64> {
        let tenant = tenant_id.to_owned();
        self.db
            .write(move |txn| {
                let mut t = txn.open_table(RFM_GENERATIONS).map_err(e)?;
                let next = t.get(tenant.as_str()).map_err(e)?.map_or(0, |v| v.value()) + 1;
                t.insert(tenant.as_str(), next).map_err(e)?;
                Ok(next)
            })
            .await
    }

    async fn put_rfm(
        &self,
        tenant_id: &str,
        generation: u64,
        scores: Vec<(String, Score)>,
    ) -> Result<()> {
        let (tenant, generation) = (tenant_id.to_owned(), format!("{generation:020}"));
        self.db
            .write(move |txn| {
                let mut t = txn.open_table(RFM).map_err(e)?;
                for (member, score) in &scores {
                    put_record(&mut t, &key(&[&tenant, &generation, member]), score)?;
                }
                Ok(())
            })
            .await
    }

    async fn publish_rfm(&self, tenant_id: &str, run: RfmRun) -> Result<bool> {
        let tenant = tenant_id.to_owned();
        self.db
            .write(move |txn| {
                let mut runs = txn.open_table(RFM_RUNS).map_err(e)?;
                let current: Option<RfmRun> = get_record(&runs, &tenant)?;
                if current.is_some_and(|c| c.generation >= run.generation) {
                    // A later run was published first; this one is dropped below.
                    return Ok(false);
                }
                put_record(&mut runs, &tenant, &run)?;
                // Scores of every earlier run go.
                let mut t = txn.open_table(RFM).map_err(e)?;
                let (start, _) = prefix_range(&[&tenant]);
                let below = key(&[&tenant, &format!("{:020}", run.generation)]);
                t.retain_in(start.as_str()..below.as_str(), |_, _| false)
                    .map_err(e)?;
                Ok(true)
            })
            .await
    }

    async fn rfm_run(&self, tenant_id: &str) -> Result<Option<RfmRun>> {
        let tenant = tenant_id.to_owned();
        self.db
            .read(move |txn| read_record(txn, RFM_RUNS, &tenant))
            .await
    }

    async fn rfm(&self, tenant_id: &str, member_id: &str) -> Result<Option<Score>> {
        let (tenant, member) = (tenant_id.to_owned(), member_id.to_owned());
        self.db
            .read(move |txn| {
                let Some(run) = read_record::<RfmRun>(txn, RFM_RUNS, &tenant)? else {
                    return Ok(None);
                };
                let generation = format!("{:020}", run.generation);
                read_record(txn, RFM, &key(&[&tenant, &generation, &member]))
            })
            .await
    }

    async fn clear_features(&self) -> Result<()> {
        self.db
            .write(|txn| {
                txn.delete_table(FEATURES).map_err(e)?;
                txn.delete_table(APPLIED).map_err(e)?;
                txn.delete_table(APPLIED_BY_TIME).map_err(e)?;
                Ok(())
            })
            .await
    }

    async fn scrub(&self) -> Result<bool> {
        self.db
            .rewrite_if_marked(MARKS, SCRUB_PENDING, "segmentation")
            .await
    }

    async fn ping(&self) -> Result<()> {
        self.db.ping().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedSegmentationStore::open(&dir.path().join("s.redb")).unwrap();
        super::super::conformance::run_all(&store).await;
    }
}
