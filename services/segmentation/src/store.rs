//! What the segmentation core needs from storage.

pub mod embedded;

use loyalty_platform::clock::Millis;
use loyalty_platform::error::Result;
use serde::{Deserialize, Serialize};

use crate::features::{Features, MemberData, PurchaseFacts, RefundFacts};
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

/// A member whose features an event changed, with the features after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Touched {
    pub tenant_id: String,
    pub member_id: String,
    pub features: Features,
}

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
    /// with remembering the id, and returns the members that changed with their features.
    async fn apply_changes(&self, changes: Vec<FeatureChange>, now: Millis)
    -> Result<Vec<Touched>>;

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

    /// Writes scores of an RFM run that is not published yet.
    async fn put_rfm(
        &self,
        tenant_id: &str,
        generation: u64,
        scores: Vec<(String, Score)>,
    ) -> Result<()>;

    /// Makes the run current: from now on only its scores are answered.
    async fn publish_rfm(&self, tenant_id: &str, run: RfmRun) -> Result<()>;

    async fn rfm_run(&self, tenant_id: &str) -> Result<Option<RfmRun>>;

    /// The member's score in the current run.
    async fn rfm(&self, tenant_id: &str, member_id: &str) -> Result<Option<Score>>;

    async fn ping(&self) -> Result<()>;
}
