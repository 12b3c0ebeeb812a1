//! Storage spans: wraps any [`PromotionStore`] so each call runs in a span with the database
//! semantic-convention attributes (system and operation, never receipt contents).

use std::sync::Arc;

use loyalty_platform::error::Result;
use loyalty_platform::telemetry::in_db_span;

use super::{CheckoutContext, PromotionStore, Put};
use crate::campaign::{Campaign, Coupon, StackingGroup};
use crate::catalog::{Product, Store};
use crate::program::Program;
use crate::purchase::Purchase;
use crate::usage::Claim;

/// A store whose calls are traced as `system` (e.g. `redb`).
#[derive(Debug)]
pub struct Traced {
    system: &'static str,
    inner: Arc<dyn PromotionStore>,
}

impl Traced {
    pub fn new(system: &'static str, inner: Arc<dyn PromotionStore>) -> Self {
        Self { system, inner }
    }
}

#[async_trait::async_trait]
impl PromotionStore for Traced {
    async fn program(&self, tenant_id: &str) -> Result<Option<Program>> {
        in_db_span(
            self.system,
            "promotion.program",
            self.inner.program(tenant_id),
        )
        .await
    }
    async fn update_program(&self, program: Program, expected_version: i64) -> Result<Program> {
        let call = self.inner.update_program(program, expected_version);
        in_db_span(self.system, "promotion.update_program", call).await
    }
    async fn upsert_stores(&self, tenant_id: &str, stores: &[Store]) -> Result<()> {
        let call = self.inner.upsert_stores(tenant_id, stores);
        in_db_span(self.system, "promotion.upsert_stores", call).await
    }
    async fn list_stores(&self, tenant_id: &str, after: &str, limit: usize) -> Result<Vec<Store>> {
        let call = self.inner.list_stores(tenant_id, after, limit);
        in_db_span(self.system, "promotion.list_stores", call).await
    }
    async fn upsert_products(&self, tenant_id: &str, products: &[Product]) -> Result<()> {
        let call = self.inner.upsert_products(tenant_id, products);
        in_db_span(self.system, "promotion.upsert_products", call).await
    }
    async fn list_products(
        &self,
        tenant_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<Product>> {
        let call = self.inner.list_products(tenant_id, after, limit);
        in_db_span(self.system, "promotion.list_products", call).await
    }
    async fn checkout_context(
        &self,
        tenant_id: &str,
        store_id: &str,
        skus: &[String],
        codes: &[String],
    ) -> Result<CheckoutContext> {
        let call = self
            .inner
            .checkout_context(tenant_id, store_id, skus, codes);
        in_db_span(self.system, "promotion.checkout_context", call).await
    }
    async fn purchases_after(
        &self,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<Purchase>> {
        let call = self.inner.purchases_after(after, limit);
        in_db_span(self.system, "promotion.purchases_after", call).await
    }
    async fn purchase(&self, tenant_id: &str, receipt_id: &str) -> Result<Option<Purchase>> {
        let call = self.inner.purchase(tenant_id, receipt_id);
        in_db_span(self.system, "promotion.purchase", call).await
    }
    async fn put_purchase(
        &self,
        purchase: &Purchase,
        expected_version: Option<u64>,
        claims: &[Claim],
    ) -> Result<Put> {
        let call = self.inner.put_purchase(purchase, expected_version, claims);
        in_db_span(self.system, "promotion.put_purchase", call).await
    }
    async fn stale_unsettled(
        &self,
        before: loyalty_platform::clock::Millis,
        after: Option<&super::Unsettled>,
        limit: usize,
    ) -> Result<Vec<super::Unsettled>> {
        let call = self.inner.stale_unsettled(before, after, limit);
        in_db_span(self.system, "promotion.stale_unsettled", call).await
    }
    async fn member_purchases(
        &self,
        tenant_id: &str,
        member_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Purchase)>> {
        let call = self
            .inner
            .member_purchases(tenant_id, member_id, after, limit);
        in_db_span(self.system, "promotion.member_purchases", call).await
    }
    async fn move_member_purchases(&self, tenant_id: &str, from: &str, to: &str) -> Result<u64> {
        let call = self.inner.move_member_purchases(tenant_id, from, to);
        in_db_span(self.system, "promotion.move_member_purchases", call).await
    }
    async fn claim(&self, tenant_id: &str, claims: &[Claim]) -> Result<Option<usize>> {
        let call = self.inner.claim(tenant_id, claims);
        in_db_span(self.system, "promotion.claim", call).await
    }
    async fn counters(&self, tenant_id: &str, names: &[String]) -> Result<Vec<i64>> {
        let call = self.inner.counters(tenant_id, names);
        in_db_span(self.system, "promotion.counters", call).await
    }
    async fn campaigns(&self, tenant_id: &str) -> Result<(u64, Vec<Campaign>, Vec<StackingGroup>)> {
        let call = self.inner.campaigns(tenant_id);
        in_db_span(self.system, "promotion.campaigns", call).await
    }
    async fn campaign(&self, tenant_id: &str, campaign_id: &str) -> Result<Option<Campaign>> {
        let call = self.inner.campaign(tenant_id, campaign_id);
        in_db_span(self.system, "promotion.campaign", call).await
    }
    async fn save_campaign(
        &self,
        campaign: Campaign,
        expected_version: Option<i64>,
    ) -> Result<Campaign> {
        let call = self.inner.save_campaign(campaign, expected_version);
        in_db_span(self.system, "promotion.save_campaign", call).await
    }
    async fn campaign_versions(
        &self,
        tenant_id: &str,
        campaign_id: &str,
        before: i64,
        limit: usize,
    ) -> Result<Vec<Campaign>> {
        let call = self
            .inner
            .campaign_versions(tenant_id, campaign_id, before, limit);
        in_db_span(self.system, "promotion.campaign_versions", call).await
    }
    async fn save_group(&self, group: StackingGroup) -> Result<()> {
        let call = self.inner.save_group(group);
        in_db_span(self.system, "promotion.save_group", call).await
    }
    async fn coupon(&self, tenant_id: &str, code: &str) -> Result<Option<(Coupon, i64)>> {
        let call = self.inner.coupon(tenant_id, code);
        in_db_span(self.system, "promotion.coupon", call).await
    }
    async fn insert_coupons(
        &self,
        tenant_id: &str,
        batch_key: &str,
        coupons: &[Coupon],
    ) -> Result<Vec<String>> {
        let call = self.inner.insert_coupons(tenant_id, batch_key, coupons);
        in_db_span(self.system, "promotion.insert_coupons", call).await
    }
    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }
}
