//! What the segmentation core needs from storage.

#[cfg(test)]
pub mod conformance;
pub mod embedded;
pub mod redis;
pub mod traced;

use loyalty_platform::clock::Millis;
use loyalty_platform::error::Result;
use serde::{Deserialize, Serialize};

use crate::features::{Features, LedgerPoints, MemberData, PurchaseFacts, RefundFacts};
use crate::rfm::Score;

/// Most segments per tenant.
pub const MAX_SEGMENTS: usize = 1000;
/// How long an applied event's id is remembered for deduplication (redeliveries come within
/// minutes; this is generous).
pub const DEDUP_WINDOW_MS: Millis = 30 * loyalty_platform::clock::DAY_MS;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Purchase(PurchaseFacts),
    Refund(RefundFacts),
    /// A member snapshot: replaces the member data when its version is newer.
    Member(MemberData),
    /// The snapshot of an erasure: applied like [`Change::Member`], and the store is marked
    /// for a [`SegmentationStore::scrub`], since the replaced data may linger in free space.
    Erasure(MemberData),
    /// An entry appended to the member's points ledger.
    Ledger(LedgerPoints),
}

/// One event's effect on one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureChange {
    pub tenant_id: String,
    pub event_id: String,
    pub member_id: String,
    pub change: Change,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SegmentKind {
    Dynamic,
    Static,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentDef {
    pub tenant_id: String,
    pub segment_id: String,
    pub name: String,
    pub kind: SegmentKind,
    /// The expression of a dynamic segment (empty for a static one).
    pub predicate: String,
    pub version: i64,
    pub update_time: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipChange {
    pub segment_id: String,
    pub entered: bool,
    pub time: Millis,
}

/// A dynamic segment's predicate, compiled from the segment's `version`. Inside the write
/// transaction a rule is used only if the stored segment still has that version and update
/// time, so an evaluation computed from an older predicate never overwrites a newer one,
/// nor one of a segment deleted and created again (which starts at version 1 again).
#[derive(Debug, Clone)]
pub struct Rule {
    pub segment_id: String,
    pub version: i64,
    pub update_time: Millis,
    pub expr: crate::expr::Expr,
}

/// Rules per tenant.
pub type RuleBook = std::collections::BTreeMap<String, Vec<Rule>>;

/// One published RFM computation of a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RfmRun {
    pub generation: u64,
    pub computed_at: Millis,
    pub members: u64,
}

#[async_trait::async_trait]
pub trait SegmentationStore: Send + Sync + std::fmt::Debug {
    /// Applies each change whose event id has not been applied for its tenant, atomically
    /// with remembering the id, then evaluates every member the batch names (those whose
    /// events were already applied too, so a batch redelivered after a crash still brings
    /// memberships up to date) against `rules`, in the same transaction. Returns how many
    /// changes were new.
    async fn apply_changes(
        &self,
        changes: Vec<FeatureChange>,
        rules: RuleBook,
        now: Millis,
    ) -> Result<usize>;

    /// Evaluates the members after `after` (at most `limit`, in id order) against `rules`,
    /// reading their features in the same transaction that writes the memberships. Returns
    /// the last member evaluated (None when there were none) and how many memberships changed.
    async fn evaluate_page(
        &self,
        tenant_id: &str,
        after: &str,
        limit: usize,
        rules: Vec<Rule>,
        now: Millis,
    ) -> Result<(Option<String>, usize)>;

    async fn features(&self, tenant_id: &str, member_id: &str) -> Result<Option<Features>>;

    /// Members with features after `after` in id order, at most `limit`.
    async fn features_page(
        &self,
        tenant_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Features)>>;

    /// Creates (`expected_version` None: must not exist) or replaces a segment with
    /// compare-and-set on its version. Returns false when the check failed.
    async fn put_segment(&self, segment: SegmentDef, expected_version: Option<i64>)
    -> Result<bool>;

    async fn segment(&self, tenant_id: &str, segment_id: &str) -> Result<Option<SegmentDef>>;

    async fn segments(&self, tenant_id: &str) -> Result<Vec<SegmentDef>>;

    /// Removes the segment and all its memberships. False when it did not exist.
    async fn delete_segment(&self, tenant_id: &str, segment_id: &str, now: Millis) -> Result<bool>;

    /// Segments whose deletion started and has not finished: cut short by a stopped process,
    /// or under way (a backend that deletes in one transaction has none).
    async fn deletions_cut_short(&self, _tenant_id: &str) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Finishes a deletion [`SegmentationStore::deletions_cut_short`] listed, unless it is
    /// over by now (then false, and a segment created again under the id is left alone).
    async fn finish_deletion(
        &self,
        _tenant_id: &str,
        _segment_id: &str,
        _now: Millis,
    ) -> Result<bool> {
        Ok(false)
    }

    /// Sets membership flags; records a history entry for each one that changed. Returns how
    /// many changed. Memberships of segments that no longer exist are ignored.
    async fn set_memberships(
        &self,
        tenant_id: &str,
        changes: Vec<(String, String, bool)>,
        now: Millis,
    ) -> Result<usize>;

    /// The segments a member is in.
    async fn member_segments(&self, tenant_id: &str, member_id: &str) -> Result<Vec<String>>;

    async fn segment_members(
        &self,
        tenant_id: &str,
        segment_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>>;

    async fn count(&self, tenant_id: &str, segment_id: &str) -> Result<u64>;

    /// Newest first; `before` is the cursor of the previous page's last entry.
    async fn history(
        &self,
        tenant_id: &str,
        member_id: &str,
        before: Option<String>,
        limit: usize,
    ) -> Result<(Vec<MembershipChange>, Option<String>)>;

    /// Tenants that have at least one segment.
    async fn tenants(&self) -> Result<Vec<String>>;

    /// Tenants with member features.
    async fn tenants_with_features(&self) -> Result<Vec<String>>;

    /// A new RFM run's generation, never handed out before for the tenant.
    async fn next_rfm_generation(&self, tenant_id: &str) -> Result<u64>;

    /// Writes scores of an RFM run that is not published yet.
    async fn put_rfm(
        &self,
        tenant_id: &str,
        generation: u64,
        scores: Vec<(String, Score)>,
    ) -> Result<()>;

    /// Makes the run current (unless a later run already is) and drops earlier runs' scores.
    /// False when a later run was published first.
    async fn publish_rfm(&self, tenant_id: &str, run: RfmRun) -> Result<bool>;

    async fn rfm_run(&self, tenant_id: &str) -> Result<Option<RfmRun>>;

    /// The member's score in the current run.
    async fn rfm(&self, tenant_id: &str, member_id: &str) -> Result<Option<Score>>;

    /// Forgets every member's features and the applied event ids, in one write, so the
    /// events can be applied again from the start (a rebuild). Segments, static lists,
    /// memberships, their history and RFM runs stay.
    async fn clear_features(&self) -> Result<()>;

    /// When an erasure was applied since the last scrub, puts every live record into fresh
    /// storage, so nothing the erasure replaced stays readable in free space; whether it did.
    async fn scrub(&self) -> Result<bool>;

    async fn ping(&self) -> Result<()>;
}
