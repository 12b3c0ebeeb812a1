//! Storage spans: wraps any [`PromotionStore`] so each call runs in a span with the database
//! semantic-convention attributes (system and operation, never receipt contents).

use std::sync::Arc;

use loyalty_platform::error::Result;
use loyalty_platform::telemetry::in_db_span;

use super::{CheckoutContext, PromotionStore};
use crate::catalog::{Product, Store};
use crate::program::Program;
use crate::purchase::Purchase;

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
    ) -> Result<CheckoutContext> {
        let call = self.inner.checkout_context(tenant_id, store_id, skus);
        in_db_span(self.system, "promotion.checkout_context", call).await
    }
    async fn purchase(&self, tenant_id: &str, receipt_id: &str) -> Result<Option<Purchase>> {
        let call = self.inner.purchase(tenant_id, receipt_id);
        in_db_span(self.system, "promotion.purchase", call).await
    }
    async fn put_purchase(
        &self,
        purchase: &Purchase,
        expected_version: Option<u64>,
    ) -> Result<bool> {
        let call = self.inner.put_purchase(purchase, expected_version);
        in_db_span(self.system, "promotion.put_purchase", call).await
    }
    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }
}
