//! The segmentation core: features from events, segment definitions, and membership kept in
//! step with both (on every event for the members it touched, on a schedule for segments whose
//! truth moves with time, and in full when a segment is saved).

use std::collections::BTreeSet;
use std::sync::Arc;

use loyalty_platform::clock::{Millis, SharedClock};
use loyalty_platform::error::{Error, MAX_ID_LEN, Result, Violations};
use loyalty_platform::types::check_tenant;

use crate::expr::{self, Clause, Context, Expr};
use crate::features::Features;
use crate::rfm::{self, Inputs, Score};
use crate::store::{
    FeatureChange, MembershipChange, RfmRun, Rule, RuleBook, SegmentDef, SegmentKind,
    SegmentationStore,
};

/// Longest segment name.
pub const MAX_NAME_LEN: usize = 200;
/// Members evaluated per store page when a whole tenant is re-evaluated.
const PAGE: usize = 1000;
/// Largest preview sample.
pub const MAX_SAMPLE: usize = 100;
/// Most member ids in one upload message.
pub const MAX_UPLOAD: usize = 10_000;

#[derive(Debug, Clone)]
pub struct Segmentation {
    store: Arc<dyn SegmentationStore>,
    clock: SharedClock,
}

/// A segment with its parsed predicate.
struct Compiled {
    def: SegmentDef,
    expr: Option<Expr>,
}

fn check_id(v: &mut Violations, value: &str, field: &str) {
    v.text(value, field, MAX_ID_LEN);
}

/// Parses a predicate into a field violation carrying the column.
fn parse_predicate(field: &str, source: &str) -> Result<Expr> {
    expr::parse(source).map_err(|err| Error::invalid(field, err.to_string()))
}

impl Segmentation {
    pub fn new(store: Arc<dyn SegmentationStore>, clock: SharedClock) -> Self {
        Self { store, clock }
    }

    pub fn store(&self) -> &Arc<dyn SegmentationStore> {
        &self.store
    }

    pub fn now(&self) -> Millis {
        self.clock.now_ms()
    }

    async fn compiled(&self, tenant_id: &str) -> Result<Vec<Compiled>> {
        let defs = self.store.segments(tenant_id).await?;
        Ok(defs
            .into_iter()
            .map(|def| {
                let expr = match def.kind {
                    SegmentKind::Dynamic => expr::parse(&def.predicate).ok(),
                    SegmentKind::Static => None,
                };
                Compiled { def, expr }
            })
            .collect())
    }

    /// The tenant's dynamic segments as rules (optionally only `only`).
    async fn rules(&self, tenant_id: &str, only: Option<&[String]>) -> Result<Vec<Rule>> {
        Ok(self
            .compiled(tenant_id)
            .await?
            .into_iter()
            .filter(|s| only.is_none_or(|ids| ids.contains(&s.def.segment_id)))
            .filter_map(|s| {
                s.expr.map(|expr| Rule {
                    segment_id: s.def.segment_id,
                    version: s.def.version,
                    update_time: s.def.update_time,
                    expr,
                })
            })
            .collect())
    }

    /// Applies events (each at most once) and brings the named members' memberships up to
    /// date in the same transaction. Idempotent: a redelivered batch changes no feature, and
    /// re-evaluates its members in case the first delivery's effect stopped short.
    pub async fn apply(&self, changes: Vec<FeatureChange>) -> Result<usize> {
        if changes.is_empty() {
            return Ok(0);
        }
        let tenants: BTreeSet<&str> = changes.iter().map(|c| c.tenant_id.as_str()).collect();
        let mut book = RuleBook::new();
        for tenant in tenants {
            let rules = self.rules(tenant, None).await?;
            if !rules.is_empty() {
                book.insert(tenant.to_owned(), rules);
            }
        }
        self.store.apply_changes(changes, book, self.now()).await
    }

    /// Re-evaluates `segments` (all dynamic ones of the tenant when None) for every member
    /// with features, a page per transaction. Returns how many memberships changed. It runs
    /// in a task of its own, so a caller that goes away does not cut it short.
    async fn reevaluate(&self, tenant_id: &str, only: Option<&[String]>) -> Result<usize> {
        let rules = self.rules(tenant_id, only).await?;
        if rules.is_empty() {
            return Ok(0);
        }
        let (store, tenant, now) = (self.store.clone(), tenant_id.to_owned(), self.now());
        let pass = tokio::spawn(async move {
            let mut after = String::new();
            let mut changed = 0;
            loop {
                let (last, n) = store
                    .evaluate_page(&tenant, &after, PAGE, rules.clone(), now)
                    .await?;
                changed += n;
                match last {
                    Some(last) => after = last,
                    None => break,
                }
            }
            Ok::<usize, Error>(changed)
        });
        pass.await.map_err(Error::internal)?
    }

    /// Evaluates every dynamic segment of every tenant for every member: at start-up, so a
    /// full evaluation cut short by a crash is finished. A tenant that fails is logged and
    /// the others go on.
    pub async fn reevaluate_all(&self) -> Result<usize> {
        let mut changed = 0;
        for tenant in self.store.tenants().await? {
            each_tenant(
                &tenant,
                "finishing deletions",
                self.finish_deletions(&tenant).await,
            );
            changed += each_tenant(&tenant, "evaluating", self.reevaluate(&tenant, None).await);
        }
        Ok(changed)
    }

    /// The scheduled pass: segments whose truth moves with time alone ("active in the last
    /// 30 days", "birthday within 7 days") are re-evaluated for every member of every tenant.
    /// A tenant that fails is logged and the others go on.
    pub async fn reevaluate_time_dependent(&self) -> Result<usize> {
        let mut changed = 0;
        for tenant in self.store.tenants().await? {
            each_tenant(
                &tenant,
                "finishing deletions",
                self.finish_deletions(&tenant).await,
            );
            let pass = async {
                let ids: Vec<String> = self
                    .compiled(&tenant)
                    .await?
                    .into_iter()
                    .filter(|s| s.expr.as_ref().is_some_and(Expr::depends_on_time))
                    .map(|s| s.def.segment_id)
                    .collect();
                match ids.is_empty() {
                    true => Ok(0),
                    false => self.reevaluate(&tenant, Some(&ids)).await,
                }
            };
            changed += each_tenant(&tenant, "re-evaluating time-dependent segments", pass.await);
        }
        Ok(changed)
    }

    /// Finishes the deletions of the tenant's segments that a stopped process left half
    /// done (their members leave, their definitions go); at start-up and on every scheduled
    /// pass. Returns how many.
    pub async fn finish_deletions(&self, tenant_id: &str) -> Result<usize> {
        let mut finished = 0;
        for segment_id in self.store.deletions_cut_short(tenant_id).await? {
            if self
                .store
                .finish_deletion(tenant_id, &segment_id, self.now())
                .await?
            {
                tracing::info!(tenant = %tenant_id, segment = %segment_id, "finished a segment deletion that was cut short");
                finished += 1;
            }
        }
        Ok(finished)
    }

    fn validate(def: &SegmentDef) -> Result<Option<Expr>> {
        let mut v = Violations::new();
        check_tenant(&mut v, &def.tenant_id);
        check_id(&mut v, &def.segment_id, "segment.segment_id");
        v.text(&def.name, "segment.name", MAX_NAME_LEN);
        match def.kind {
            SegmentKind::Static => v.check(
                def.predicate.is_empty(),
                "segment.predicate",
                "a static segment has no predicate; upload its members instead",
            ),
            SegmentKind::Dynamic => v.check(
                !def.predicate.trim().is_empty(),
                "segment.predicate",
                "is required for a dynamic segment",
            ),
        }
        v.finish()?;
        match def.kind {
            SegmentKind::Dynamic => Ok(Some(parse_predicate("segment.predicate", &def.predicate)?)),
            SegmentKind::Static => Ok(None),
        }
    }

    /// Creates a segment and computes its members before answering.
    pub async fn create(&self, mut def: SegmentDef) -> Result<SegmentDef> {
        Self::validate(&def)?;
        def.version = 1;
        def.update_time = self.now();
        if !self.store.put_segment(def.clone(), None).await? {
            return Err(
                if self
                    .store
                    .segment(&def.tenant_id, &def.segment_id)
                    .await?
                    .is_some()
                {
                    Error::AlreadyExists(format!("segment {} already exists", def.segment_id))
                } else {
                    Error::FailedPrecondition(format!(
                        "a tenant may have at most {} segments",
                        crate::store::MAX_SEGMENTS
                    ))
                },
            );
        }
        self.reevaluate(&def.tenant_id, Some(std::slice::from_ref(&def.segment_id)))
            .await?;
        Ok(def)
    }

    /// Replaces a segment's name and predicate (its kind is fixed) with compare-and-set on
    /// the version, and recomputes its members.
    pub async fn update(&self, mut def: SegmentDef, expected_version: i64) -> Result<SegmentDef> {
        Self::validate(&def)?;
        let current = self.get(&def.tenant_id, &def.segment_id).await?;
        if current.kind != def.kind {
            return Err(Error::invalid(
                "segment.kind",
                "a segment's kind cannot change",
            ));
        }
        if current.version != expected_version {
            return Err(Error::FailedPrecondition(format!(
                "segment {} is at version {}, not {expected_version}",
                def.segment_id, current.version
            )));
        }
        def.version = current.version + 1;
        def.update_time = self.now();
        if !self
            .store
            .put_segment(def.clone(), Some(expected_version))
            .await?
        {
            return Err(Error::FailedPrecondition(format!(
                "segment {} changed concurrently; read it again",
                def.segment_id
            )));
        }
        self.reevaluate(&def.tenant_id, Some(std::slice::from_ref(&def.segment_id)))
            .await?;
        Ok(def)
    }

    pub async fn get(&self, tenant_id: &str, segment_id: &str) -> Result<SegmentDef> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        check_id(&mut v, segment_id, "segment_id");
        v.finish()?;
        self.store
            .segment(tenant_id, segment_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("segment {segment_id} not found")))
    }

    pub async fn list(&self, tenant_id: &str) -> Result<Vec<SegmentDef>> {
        loyalty_platform::types::tenant(tenant_id)?;
        self.store.segments(tenant_id).await
    }

    pub async fn delete(&self, tenant_id: &str, segment_id: &str) -> Result<()> {
        self.get(tenant_id, segment_id).await?;
        self.store
            .delete_segment(tenant_id, segment_id, self.now())
            .await?;
        Ok(())
    }

    /// Adds members to a static segment.
    pub async fn upload(
        &self,
        tenant_id: &str,
        segment_id: &str,
        member_ids: &[String],
    ) -> Result<usize> {
        let def = self.get(tenant_id, segment_id).await?;
        if def.kind != SegmentKind::Static {
            return Err(Error::FailedPrecondition(format!(
                "segment {segment_id} is dynamic: its members follow its predicate"
            )));
        }
        let mut v = Violations::new();
        v.check(
            member_ids.len() <= MAX_UPLOAD,
            "member_ids",
            format!("at most {MAX_UPLOAD} per message"),
        );
        for (i, m) in member_ids.iter().enumerate() {
            check_id(&mut v, m, &format!("member_ids[{i}]"));
        }
        v.finish()?;
        let unique: BTreeSet<&String> = member_ids.iter().collect();
        let flags = unique
            .into_iter()
            .map(|m| (m.clone(), segment_id.to_owned(), true))
            .collect();
        self.store
            .set_memberships(tenant_id, flags, self.now())
            .await
    }

    fn check_member(tenant_id: &str, member_id: &str) -> Result<()> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        check_id(&mut v, member_id, "member_id");
        v.finish()
    }

    /// Rewrites the store when erasures left replaced member data in its free space; true
    /// when it did.
    pub async fn scrub_erased(&self) -> Result<bool> {
        self.store.scrub().await
    }

    /// The POS path: one read.
    pub async fn member_segments(&self, tenant_id: &str, member_id: &str) -> Result<Vec<String>> {
        Self::check_member(tenant_id, member_id)?;
        self.store.member_segments(tenant_id, member_id).await
    }

    pub async fn features(&self, tenant_id: &str, member_id: &str) -> Result<Features> {
        Self::check_member(tenant_id, member_id)?;
        Ok(self
            .store
            .features(tenant_id, member_id)
            .await?
            .unwrap_or_default())
    }

    pub async fn count(&self, tenant_id: &str, segment_id: &str) -> Result<u64> {
        self.get(tenant_id, segment_id).await?;
        self.store.count(tenant_id, segment_id).await
    }

    pub async fn members_page(
        &self,
        tenant_id: &str,
        segment_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>> {
        self.store
            .segment_members(tenant_id, segment_id, after, limit)
            .await
    }

    pub async fn history(
        &self,
        tenant_id: &str,
        member_id: &str,
        before: Option<String>,
        limit: usize,
    ) -> Result<(Vec<MembershipChange>, Option<String>)> {
        Self::check_member(tenant_id, member_id)?;
        self.store
            .history(tenant_id, member_id, before, limit)
            .await
    }

    /// Recomputes the tenant's RFM scores from every member's features and publishes them
    /// at once: until the new run is complete, readers keep getting the previous one.
    pub async fn recompute_rfm(&self, tenant_id: &str) -> Result<RfmRun> {
        loyalty_platform::types::tenant(tenant_id)?;
        let now = self.now();
        let mut inputs = Vec::new();
        let mut after = String::new();
        loop {
            let page = self.store.features_page(tenant_id, &after, PAGE).await?;
            let Some((last, _)) = page.last() else { break };
            after = last.clone();
            let full = page.len() == PAGE;
            for (member, f) in page {
                let (Some(last), true) = (f.last_purchase, f.total.count > 0) else {
                    continue;
                };
                let year = f.window(365, now);
                inputs.push(Inputs {
                    member_id: member,
                    recency_days: Features::days_since(last, now).max(0),
                    frequency: year.count.max(0),
                    monetary: year.spend,
                });
            }
            if !full {
                break;
            }
        }
        let scores = rfm::score_all(&inputs);
        let generation = self.store.next_rfm_generation(tenant_id).await?;
        let mut rows: Vec<(String, Score)> = inputs
            .into_iter()
            .map(|i| i.member_id)
            .zip(scores)
            .collect();
        let members = rows.len() as u64;
        while !rows.is_empty() {
            let rest = rows.split_off(rows.len().min(PAGE * 5));
            self.store.put_rfm(tenant_id, generation, rows).await?;
            rows = rest;
        }
        let run = RfmRun {
            generation,
            computed_at: now,
            members,
        };
        if !self.store.publish_rfm(tenant_id, run).await? {
            return Err(Error::Unavailable(
                "a later RFM computation finished first; its scores stand".into(),
            ));
        }
        Ok(run)
    }

    /// Recomputes RFM for every tenant with features (the schedule). A tenant that fails is
    /// logged and the others go on.
    pub async fn recompute_all_rfm(&self) -> Result<u64> {
        let mut members = 0;
        for tenant in self.store.tenants_with_features().await? {
            let run = self.recompute_rfm(&tenant).await.map(|run| run.members);
            members += each_tenant(&tenant, "computing RFM", run);
        }
        Ok(members)
    }

    /// The member's RFM score in the latest run (None: not scored, e.g. no purchase yet or
    /// no run since their first).
    pub async fn member_rfm(&self, tenant_id: &str, member_id: &str) -> Result<Option<Score>> {
        Self::check_member(tenant_id, member_id)?;
        self.store.rfm(tenant_id, member_id).await
    }

    /// Counts the members a predicate selects, with a sample, saving nothing.
    pub async fn preview(
        &self,
        tenant_id: &str,
        predicate: &str,
        sample: usize,
    ) -> Result<(u64, Vec<String>)> {
        loyalty_platform::types::tenant(tenant_id)?;
        let e = parse_predicate("predicate", predicate)?;
        let sample = sample.min(MAX_SAMPLE);
        let now = self.now();
        let mut after = String::new();
        let (mut count, mut picked) = (0u64, Vec::new());
        loop {
            let page = self.store.features_page(tenant_id, &after, PAGE).await?;
            let Some((last, _)) = page.last() else { break };
            after = last.clone();
            for (member, f) in &page {
                if e.matches(f, Context { now }) {
                    count += 1;
                    if picked.len() < sample {
                        picked.push(member.clone());
                    }
                }
            }
            if page.len() < PAGE {
                break;
            }
        }
        Ok((count, picked))
    }

    /// Why a member is or is not in a dynamic segment.
    pub async fn explain(
        &self,
        tenant_id: &str,
        segment_id: &str,
        member_id: &str,
    ) -> Result<(bool, Vec<Clause>)> {
        Self::check_member(tenant_id, member_id)?;
        let def = self.get(tenant_id, segment_id).await?;
        if def.kind == SegmentKind::Static {
            let member = self
                .store
                .member_segments(tenant_id, member_id)
                .await?
                .contains(&def.segment_id);
            return Ok((member, Vec::new()));
        }
        let e = parse_predicate("predicate", &def.predicate)?;
        let f = self
            .store
            .features(tenant_id, member_id)
            .await?
            .unwrap_or_default();
        let cx = Context { now: self.now() };
        Ok((e.matches(&f, cx), e.explain(&def.predicate, &f, cx)))
    }
}

/// One tenant's share of a pass over every tenant: its count, or 0 with a warning, so one
/// tenant's failure does not hold up the others.
fn each_tenant<N: Default>(tenant: &str, what: &str, outcome: Result<N>) -> N {
    outcome.unwrap_or_else(|err| {
        tracing::warn!(%tenant, error = %err, "{what} failed for this tenant; the others go on");
        N::default()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use loyalty_platform::clock::{DAY_MS, ManualClock};
    use rust_decimal::Decimal;

    use super::*;
    use crate::features::{MemberData, PurchaseFacts, RefundFacts};
    use crate::store::Change;
    use crate::store::embedded::EmbeddedSegmentationStore;

    const T0: Millis = 1_750_000_000_000;

    fn setup() -> (tempfile::TempDir, ManualClock, Segmentation) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedSegmentationStore::open(&dir.path().join("s.redb")).unwrap();
        let clock = ManualClock::at(T0);
        let s = Segmentation::new(Arc::new(store), Arc::new(clock.clone()));
        (dir, clock, s)
    }

    fn purchase(id: &str, member: &str, at: Millis, paid: i64, category: &str) -> FeatureChange {
        FeatureChange {
            tenant_id: "t".into(),
            event_id: format!("purchase/t/{id}"),
            member_id: member.into(),
            change: Change::Purchase(PurchaseFacts {
                time: at,
                store_id: "s1".into(),
                paid: Decimal::from(paid),
                lines: vec![(category.into(), "b".into(), Decimal::from(paid))],
                points_balance: Some(paid),
                tier_id: None,
            }),
        }
    }

    fn refund(id: &str, member: &str, at: Millis, amount: i64) -> FeatureChange {
        FeatureChange {
            tenant_id: "t".into(),
            event_id: format!("refund/t/{id}/r1"),
            member_id: member.into(),
            change: Change::Refund(RefundFacts {
                purchase_time: at,
                store_id: "s1".into(),
                refunded: Decimal::from(amount),
                lines: vec![("c".into(), "b".into(), Decimal::from(amount))],
                receipt_fully_refunded: false,
                receipt_categories: Vec::new(),
                receipt_brands: Vec::new(),
            }),
        }
    }

    fn member(version: i64, birthday: Option<(u32, u32, Option<i32>)>) -> MemberData {
        MemberData {
            known: true,
            active: birthday.is_some(),
            registered_at: Some(T0),
            first_store: "s1".into(),
            birthday,
            version,
            ..MemberData::default()
        }
    }

    #[tokio::test]
    async fn an_erasure_drops_the_birthday_and_the_store_is_rewritten_without_it() {
        let (dir, _clock, s) = setup();
        let path = dir.path().join("s.redb");
        let change = |id: &str, change: Change| FeatureChange {
            tenant_id: "t".into(),
            event_id: format!("member/t/m1/{id}"),
            member_id: "m1".into(),
            change,
        };
        s.apply(vec![change(
            "0",
            Change::Member(member(0, Some((7, 23, Some(1977))))),
        )])
        .await
        .unwrap();
        let before = s.features("t", "m1").await.unwrap();
        assert_eq!(before.member.birthday, Some((7, 23, Some(1977))));
        // Nothing erased yet: no rewrite.
        assert!(!s.scrub_erased().await.unwrap());

        s.apply(vec![change("1", Change::Erasure(member(1, None)))])
            .await
            .unwrap();
        assert_eq!(s.features("t", "m1").await.unwrap().member.birthday, None);
        let old = loyalty_platform::embedded::encode(&before).unwrap();
        let holds_old = || {
            let bytes = std::fs::read(&path).unwrap();
            bytes.windows(old.len()).any(|w| w == old.as_slice())
        };
        assert!(
            holds_old(),
            "the replaced record is still in the file's free space"
        );
        assert!(s.scrub_erased().await.unwrap());
        assert!(!holds_old(), "the rewrite left the replaced record behind");
        // Once is enough, until the next erasure; the data is all still there.
        assert!(!s.scrub_erased().await.unwrap());
        assert_eq!(s.features("t", "m1").await.unwrap().member.version, 1);
        // A redelivered erasure changes nothing and marks nothing.
        s.apply(vec![change("1", Change::Erasure(member(1, None)))])
            .await
            .unwrap();
        assert!(!s.scrub_erased().await.unwrap());
    }

    fn dynamic(id: &str, predicate: &str) -> SegmentDef {
        SegmentDef {
            tenant_id: "t".into(),
            segment_id: id.into(),
            name: id.into(),
            kind: SegmentKind::Dynamic,
            predicate: predicate.into(),
            version: 0,
            update_time: 0,
        }
    }

    #[tokio::test]
    async fn redelivered_and_reordered_events_leave_results_unchanged() {
        let events: Vec<FeatureChange> = (0..20)
            .map(|i| {
                purchase(
                    &format!("r{i}"),
                    &format!("m{}", i % 4),
                    T0 - i * DAY_MS,
                    100 + i,
                    "c",
                )
            })
            .chain([refund("r3", "m3", T0 - 3 * DAY_MS, 50)])
            .collect();
        let (_d1, _, once) = setup();
        once.create(dynamic("big", "spend_30d > 400"))
            .await
            .unwrap();
        once.apply(events.clone()).await.unwrap();

        let (_d2, _, messy) = setup();
        messy
            .create(dynamic("big", "spend_30d > 400"))
            .await
            .unwrap();
        let mut reversed = events.clone();
        reversed.reverse();
        // Every event twice, in another order, in batches that overlap.
        messy.apply(reversed[..12].to_vec()).await.unwrap();
        messy.apply(events.clone()).await.unwrap();
        messy.apply(reversed.clone()).await.unwrap();

        for m in ["m0", "m1", "m2", "m3"] {
            assert_eq!(
                once.features("t", m).await.unwrap(),
                messy.features("t", m).await.unwrap(),
                "{m}"
            );
            assert_eq!(
                once.member_segments("t", m).await.unwrap(),
                messy.member_segments("t", m).await.unwrap()
            );
        }
        let m3 = once.features("t", "m3").await.unwrap();
        assert_eq!(m3.total.count, 5);
        // 103 + 107 + 111 + 115 + 119 − 50
        assert_eq!(m3.total.spend, Decimal::from(505));
        assert_eq!(
            once.count("t", "big").await.unwrap(),
            messy.count("t", "big").await.unwrap()
        );
    }

    #[tokio::test]
    async fn a_redelivered_batch_brings_memberships_up_to_date() {
        // As after a crash between applying a batch and evaluating it: the features are in,
        // the membership is not. The redelivery finds every event applied and still
        // evaluates the members it names.
        let (_d, _, s) = setup();
        let batch = vec![purchase("r1", "m1", T0, 500, "c")];
        s.apply(batch.clone()).await.unwrap();
        let mut def = dynamic("big", "spend_total > 100");
        def.version = 1;
        assert!(s.store.put_segment(def, None).await.unwrap());
        assert!(s.member_segments("t", "m1").await.unwrap().is_empty());
        assert_eq!(s.apply(batch).await.unwrap(), 0, "nothing new applied");
        assert_eq!(s.member_segments("t", "m1").await.unwrap(), ["big"]);
        assert_eq!(s.features("t", "m1").await.unwrap().total.count, 1);
    }

    /// A purchase of 500 by m1, evaluated with `rules`, as a batch compiled earlier would.
    async fn apply_with(s: &Segmentation, rules: Vec<Rule>) {
        let mut book = RuleBook::new();
        book.insert("t".into(), rules);
        s.store
            .apply_changes(vec![purchase("r1", "m1", T0, 500, "c")], book, T0)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_evaluation_from_an_older_predicate_is_not_written() {
        let (_d, _, s) = setup();
        s.create(dynamic("x", "spend_total > 100")).await.unwrap();
        let stale = s.rules("t", None).await.unwrap();
        s.update(dynamic("x", "spend_total > 1000"), 1)
            .await
            .unwrap();
        // An event evaluated with the rules compiled before the update.
        apply_with(&s, stale).await;
        assert!(
            s.member_segments("t", "m1").await.unwrap().is_empty(),
            "500 is not above 1000: the old predicate must not decide"
        );
    }

    #[tokio::test]
    async fn an_evaluation_from_a_deleted_segment_is_not_written_to_its_successor() {
        let (_d, clock, s) = setup();
        s.create(dynamic("x", "spend_total > 100")).await.unwrap();
        let stale = s.rules("t", None).await.unwrap();
        s.delete("t", "x").await.unwrap();
        clock.advance(1);
        let again = s.create(dynamic("x", "spend_total > 1000")).await.unwrap();
        assert_eq!(again.version, 1, "a new segment starts at version 1 again");
        apply_with(&s, stale).await;
        assert!(
            s.member_segments("t", "m1").await.unwrap().is_empty(),
            "the deleted segment's predicate must not decide for the new one"
        );
    }

    #[tokio::test]
    async fn the_schedule_moves_members_out_as_time_passes() {
        let (_d, clock, s) = setup();
        s.create(dynamic("active", "purchase_count_30d > 0"))
            .await
            .unwrap();
        s.create(dynamic("ever", "purchase_count_total > 0"))
            .await
            .unwrap();
        s.apply(vec![purchase("r1", "m1", T0 - DAY_MS, 10, "c")])
            .await
            .unwrap();
        assert_eq!(
            s.member_segments("t", "m1").await.unwrap(),
            ["active", "ever"]
        );
        clock.advance(28 * DAY_MS);
        s.reevaluate_time_dependent().await.unwrap();
        assert_eq!(s.count("t", "active").await.unwrap(), 1);
        clock.advance(3 * DAY_MS);
        assert_eq!(s.reevaluate_time_dependent().await.unwrap(), 1);
        assert_eq!(s.member_segments("t", "m1").await.unwrap(), ["ever"]);
        assert_eq!(s.count("t", "active").await.unwrap(), 0);
        let (history, _) = s.history("t", "m1", None, 10).await.unwrap();
        assert_eq!(history.len(), 3);
        assert_eq!(history[0].segment_id, "active");
        assert!(!history[0].entered, "newest first: left `active`");
        let (first, cursor) = s.history("t", "m1", None, 1).await.unwrap();
        assert_eq!(first, history[..1]);
        let (rest, end) = s.history("t", "m1", cursor.clone(), 10).await.unwrap();
        assert_eq!(rest, history[1..]);
        assert!(end.is_none());
        let err = s.history("t", "m2", cursor, 10).await.unwrap_err();
        assert!(err.to_string().contains("another member"), "{err}");
    }

    #[tokio::test]
    async fn a_cohort_on_generated_history() {
        // "bought boots about two years ago and not since", against a direct computation.
        let (_d, _, s) = setup();
        let mut events = Vec::new();
        let mut expected = Vec::new();
        for m in 0..200i64 {
            let member = format!("m{m:03}");
            let boots_days_ago = (m * 37) % 1000;
            events.push(purchase(
                &format!("b{m}"),
                &member,
                T0 - boots_days_ago * DAY_MS,
                90,
                "boots",
            ));
            let again = m % 5 == 0;
            if again {
                events.push(purchase(
                    &format!("a{m}"),
                    &member,
                    T0 - (m % 30) * DAY_MS,
                    90,
                    "boots",
                ));
            }
            events.push(purchase(
                &format!("s{m}"),
                &member,
                T0 - (m % 50) * DAY_MS,
                10,
                "socks",
            ));
            let last_boots = if again {
                (m % 30).min(boots_days_ago)
            } else {
                boots_days_ago
            };
            if (700..=760).contains(&last_boots) {
                expected.push(member);
            }
        }
        s.apply(events).await.unwrap();
        let def = s
            .create(dynamic(
                "boots-2y",
                "days_since(category_last(\"boots\")) between 700 and 760",
            ))
            .await
            .unwrap();
        let members = s
            .members_page("t", &def.segment_id, "", 1000)
            .await
            .unwrap();
        assert!(!expected.is_empty());
        assert_eq!(members, expected);
        let (count, sample) = s
            .preview(
                "t",
                "days_since(category_last(\"boots\")) between 700 and 760",
                3,
            )
            .await
            .unwrap();
        assert_eq!(count as usize, expected.len());
        assert_eq!(sample, expected[..3]);
    }

    #[tokio::test]
    async fn bad_segments_are_refused_and_nothing_is_saved() {
        let (_d, _, s) = setup();
        let err = s.create(dynamic("x", "spend_30d >")).await.unwrap_err();
        assert!(err.to_string().contains("column 12"), "{err}");
        let err = s.create(dynamic("x", "spend_31d > 1")).await.unwrap_err();
        assert!(err.to_string().contains("unknown feature"), "{err}");
        let err = s.create(dynamic("x", "spend_30d > now")).await.unwrap_err();
        assert!(err.to_string().contains("cannot compare"), "{err}");
        let err = s.create(dynamic("", "contactable")).await.unwrap_err();
        assert!(err.to_string().contains("segment_id"), "{err}");
        let mut static_with_predicate = dynamic("x", "contactable");
        static_with_predicate.kind = SegmentKind::Static;
        assert!(s.create(static_with_predicate).await.is_err());
        assert!(s.list("t").await.unwrap().is_empty());
        // Updates check the version and recompute.
        s.create(dynamic("x", "spend_total > 5")).await.unwrap();
        assert!(s.create(dynamic("x", "spend_total > 5")).await.is_err());
        s.apply(vec![purchase("r", "m", T0, 10, "c")])
            .await
            .unwrap();
        assert_eq!(s.count("t", "x").await.unwrap(), 1);
        assert!(s.update(dynamic("x", "spend_total > 50"), 7).await.is_err());
        let v2 = s.update(dynamic("x", "spend_total > 50"), 1).await.unwrap();
        assert_eq!(v2.version, 2);
        assert_eq!(s.count("t", "x").await.unwrap(), 0);
        s.delete("t", "x").await.unwrap();
        assert!(s.get("t", "x").await.is_err());
        assert!(s.member_segments("t", "m").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn static_segments_take_uploaded_lists() {
        let (_d, _, s) = setup();
        let mut def = dynamic("vip", "");
        def.kind = SegmentKind::Static;
        s.create(def).await.unwrap();
        let ids: Vec<String> = (0..2500).map(|i| format!("m{i:05}")).collect();
        for chunk in ids.chunks(1000) {
            s.upload("t", "vip", chunk).await.unwrap();
        }
        s.upload("t", "vip", &ids[..10]).await.unwrap();
        assert_eq!(s.count("t", "vip").await.unwrap(), 2500);
        assert_eq!(s.member_segments("t", "m00042").await.unwrap(), ["vip"]);
        let too_many: Vec<String> = (0..MAX_UPLOAD + 1).map(|i| format!("m{i}")).collect();
        assert!(s.upload("t", "vip", &too_many).await.is_err());
        s.create(dynamic("dyn", "contactable")).await.unwrap();
        assert!(s.upload("t", "dyn", &ids[..1]).await.is_err());
    }

    #[tokio::test]
    async fn rfm_scores_through_the_store_match_the_definition() {
        let (_d, _, s) = setup();
        // A generated population: member i last bought (i * 7) % 300 days ago, with
        // i % 9 receipts of (i * 13) % 500 + 1 each in the last year, one older receipt.
        let mut events = Vec::new();
        for i in 0..300i64 {
            let member = format!("m{i:03}");
            for k in 0..(i % 9) {
                let at = T0 - ((i * 7) % 300 + k * 3) * DAY_MS;
                events.push(purchase(
                    &format!("{member}-{k}"),
                    &member,
                    at,
                    (i * 13) % 500 + 1,
                    "c",
                ));
            }
            events.push(purchase(
                &format!("{member}-old"),
                &member,
                T0 - 600 * DAY_MS,
                5,
                "c",
            ));
        }
        s.apply(events).await.unwrap();
        assert!(
            s.member_rfm("t", "m001").await.unwrap().is_none(),
            "no run yet"
        );
        let run = s.recompute_rfm("t").await.unwrap();
        assert_eq!((run.generation, run.members), (1, 300));
        // The straightforward computation from the features the service reads.
        let mut inputs = Vec::new();
        for i in 0..300i64 {
            let f = s.features("t", &format!("m{i:03}")).await.unwrap();
            let year = f.window(365, T0);
            inputs.push((
                Features::days_since(f.last_purchase.unwrap(), T0),
                year.count,
                year.spend,
            ));
        }
        let n = inputs.len();
        let score = |worse: usize| (1 + 5 * worse / n) as u8;
        for (i, (r, f, m)) in inputs.iter().enumerate() {
            let want = (
                score(inputs.iter().filter(|x| x.0 > *r).count()),
                score(inputs.iter().filter(|x| x.1 < *f).count()),
                score(inputs.iter().filter(|x| x.2 < *m).count()),
            );
            let got = s
                .member_rfm("t", &format!("m{i:03}"))
                .await
                .unwrap()
                .unwrap();
            assert_eq!((got.recency, got.frequency, got.monetary), want, "m{i:03}");
            assert_eq!(got.named, crate::rfm::Named::of(want.0, want.1, want.2));
        }
        // A run in progress (written, not published) does not disturb readers.
        let before = s.member_rfm("t", "m001").await.unwrap();
        let pending = s.store.next_rfm_generation("t").await.unwrap();
        let junk = crate::rfm::Score {
            recency: 1,
            frequency: 1,
            monetary: 1,
            named: crate::rfm::Named::Lost,
        };
        s.store
            .put_rfm("t", pending, vec![("m001".into(), junk)])
            .await
            .unwrap();
        assert_eq!(s.member_rfm("t", "m001").await.unwrap(), before);
        let again = s.recompute_rfm("t").await.unwrap();
        assert_eq!(again.generation, 3);
        // The abandoned run can no longer be published over a later one.
        let stale = crate::store::RfmRun {
            generation: pending,
            computed_at: T0,
            members: 1,
        };
        assert!(!s.store.publish_rfm("t", stale).await.unwrap());
        assert_eq!(s.member_rfm("t", "m001").await.unwrap(), before);
        assert_eq!(s.recompute_all_rfm().await.unwrap(), 300);
    }
}
