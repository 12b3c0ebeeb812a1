//! Storage spans: wraps any [`SegmentationStore`] so each call runs in a span with the
//! database semantic-convention attributes (system and operation, never member data) and
//! is counted in `loyalty_storage_duration_seconds`.

use std::sync::Arc;

use loyalty_platform::clock::Millis;
use loyalty_platform::error::Result;
use loyalty_platform::telemetry::in_db_span;

use super::{
    FeatureChange, MembershipChange, RfmRun, Rule, RuleBook, SegmentDef, SegmentationStore,
};
use crate::features::Features;
use crate::rfm::Score;

/// A store whose calls are traced as `system` (e.g. `redb`).
#[derive(Debug)]
pub struct Traced {
    system: &'static str,
    inner: Arc<dyn SegmentationStore>,
}

impl Traced {
    pub fn new(system: &'static str, inner: Arc<dyn SegmentationStore>) -> Self {
        Self { system, inner }
    }
}

#[async_trait::async_trait]
impl SegmentationStore for Traced {
    async fn apply_changes(
        &self,
        changes: Vec<FeatureChange>,
        rules: RuleBook,
        now: Millis,
    ) -> Result<usize> {
        let call = self.inner.apply_changes(changes, rules, now);
        in_db_span(self.system, "segmentation.apply_changes", call).await
    }
    async fn evaluate_page(
        &self,
        tenant_id: &str,
        after: &str,
        limit: usize,
        rules: Vec<Rule>,
        now: Millis,
    ) -> Result<(Option<String>, usize)> {
        let call = self
            .inner
            .evaluate_page(tenant_id, after, limit, rules, now);
        in_db_span(self.system, "segmentation.evaluate_page", call).await
    }
    async fn features(&self, tenant_id: &str, member_id: &str) -> Result<Option<Features>> {
        let call = self.inner.features(tenant_id, member_id);
        in_db_span(self.system, "segmentation.features", call).await
    }
    async fn features_page(
        &self,
        tenant_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Features)>> {
        let call = self.inner.features_page(tenant_id, after, limit);
        in_db_span(self.system, "segmentation.features_page", call).await
    }
    async fn put_segment(
        &self,
        segment: SegmentDef,
        expected_version: Option<i64>,
    ) -> Result<bool> {
        let call = self.inner.put_segment(segment, expected_version);
        in_db_span(self.system, "segmentation.put_segment", call).await
    }
    async fn segment(&self, tenant_id: &str, segment_id: &str) -> Result<Option<SegmentDef>> {
        let call = self.inner.segment(tenant_id, segment_id);
        in_db_span(self.system, "segmentation.segment", call).await
    }
    async fn segments(&self, tenant_id: &str) -> Result<Vec<SegmentDef>> {
        let call = self.inner.segments(tenant_id);
        in_db_span(self.system, "segmentation.segments", call).await
    }
    async fn delete_segment(&self, tenant_id: &str, segment_id: &str, now: Millis) -> Result<bool> {
        let call = self.inner.delete_segment(tenant_id, segment_id, now);
        in_db_span(self.system, "segmentation.delete_segment", call).await
    }
    async fn finish_deletion(
        &self,
        tenant_id: &str,
        segment_id: &str,
        now: Millis,
    ) -> Result<bool> {
        let call = self.inner.finish_deletion(tenant_id, segment_id, now);
        in_db_span(self.system, "segmentation.finish_deletion", call).await
    }
    async fn deletions_cut_short(&self, tenant_id: &str) -> Result<Vec<String>> {
        let call = self.inner.deletions_cut_short(tenant_id);
        in_db_span(self.system, "segmentation.deletions_cut_short", call).await
    }
    async fn set_memberships(
        &self,
        tenant_id: &str,
        changes: Vec<(String, String, bool)>,
        now: Millis,
    ) -> Result<usize> {
        let call = self.inner.set_memberships(tenant_id, changes, now);
        in_db_span(self.system, "segmentation.set_memberships", call).await
    }
    async fn member_segments(&self, tenant_id: &str, member_id: &str) -> Result<Vec<String>> {
        let call = self.inner.member_segments(tenant_id, member_id);
        in_db_span(self.system, "segmentation.member_segments", call).await
    }
    async fn segment_members(
        &self,
        tenant_id: &str,
        segment_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>> {
        let call = self
            .inner
            .segment_members(tenant_id, segment_id, after, limit);
        in_db_span(self.system, "segmentation.segment_members", call).await
    }
    async fn count(&self, tenant_id: &str, segment_id: &str) -> Result<u64> {
        let call = self.inner.count(tenant_id, segment_id);
        in_db_span(self.system, "segmentation.count", call).await
    }
    async fn history(
        &self,
        tenant_id: &str,
        member_id: &str,
        before: Option<String>,
        limit: usize,
    ) -> Result<(Vec<MembershipChange>, Option<String>)> {
        let call = self.inner.history(tenant_id, member_id, before, limit);
        in_db_span(self.system, "segmentation.history", call).await
    }
    async fn tenants(&self) -> Result<Vec<String>> {
        in_db_span(self.system, "segmentation.tenants", self.inner.tenants()).await
    }
    async fn tenants_with_features(&self) -> Result<Vec<String>> {
        let call = self.inner.tenants_with_features();
        in_db_span(self.system, "segmentation.tenants_with_features", call).await
    }
    async fn next_rfm_generation(&self, tenant_id: &str) -> Result<u64> {
        let call = self.inner.next_rfm_generation(tenant_id);
        in_db_span(self.system, "segmentation.next_rfm_generation", call).await
    }
    async fn put_rfm(
        &self,
        tenant_id: &str,
        generation: u64,
        scores: Vec<(String, Score)>,
    ) -> Result<()> {
        let call = self.inner.put_rfm(tenant_id, generation, scores);
        in_db_span(self.system, "segmentation.put_rfm", call).await
    }
    async fn publish_rfm(&self, tenant_id: &str, run: RfmRun) -> Result<bool> {
        let call = self.inner.publish_rfm(tenant_id, run);
        in_db_span(self.system, "segmentation.publish_rfm", call).await
    }
    async fn rfm_run(&self, tenant_id: &str) -> Result<Option<RfmRun>> {
        let call = self.inner.rfm_run(tenant_id);
        in_db_span(self.system, "segmentation.rfm_run", call).await
    }
    async fn rfm(&self, tenant_id: &str, member_id: &str) -> Result<Option<Score>> {
        let call = self.inner.rfm(tenant_id, member_id);
        in_db_span(self.system, "segmentation.rfm", call).await
    }
    async fn clear_features(&self) -> Result<()> {
        in_db_span(
            self.system,
            "segmentation.clear_features",
            self.inner.clear_features(),
        )
        .await
    }
    async fn scrub(&self) -> Result<bool> {
        in_db_span(self.system, "segmentation.scrub", self.inner.scrub()).await
    }
    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }
}
