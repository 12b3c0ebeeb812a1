//! The promotion service's narrow storage trait. Every backend passes [`conformance`].

use loyalty_platform::error::Result;

use crate::catalog::{Product, Store};
use crate::program::Program;
use crate::purchase::Purchase;

pub mod conformance;
pub mod embedded;
pub mod traced;

/// What a checkout reads before evaluating, in one snapshot.
#[derive(Debug, Clone, Default)]
pub struct CheckoutContext {
    pub program: Option<Program>,
    pub store: Option<Store>,
    /// In the order of the requested SKUs.
    pub products: Vec<Option<Product>>,
}

#[async_trait::async_trait]
pub trait PromotionStore: Send + Sync + std::fmt::Debug {
    async fn program(&self, tenant_id: &str) -> Result<Option<Program>>;
    /// Saves `program` as the next version. `expected_version` 0 skips the check; otherwise
    /// a different current version is `FailedPrecondition` and nothing is written.
    async fn update_program(&self, program: Program, expected_version: i64) -> Result<Program>;
    async fn upsert_stores(&self, tenant_id: &str, stores: &[Store]) -> Result<()>;
    /// Stores with ids after `after`, in id order.
    async fn list_stores(&self, tenant_id: &str, after: &str, limit: usize) -> Result<Vec<Store>>;
    async fn upsert_products(&self, tenant_id: &str, products: &[Product]) -> Result<()>;
    async fn list_products(
        &self,
        tenant_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<Product>>;
    async fn checkout_context(
        &self,
        tenant_id: &str,
        store_id: &str,
        skus: &[String],
    ) -> Result<CheckoutContext>;
    async fn purchase(&self, tenant_id: &str, receipt_id: &str) -> Result<Option<Purchase>>;
    /// Writes `purchase` if the stored version is `expected_version` (`None`: only if no
    /// purchase with that receipt id exists). `false` and nothing written otherwise.
    async fn put_purchase(
        &self,
        purchase: &Purchase,
        expected_version: Option<u64>,
    ) -> Result<bool>;
    async fn ping(&self) -> Result<()>;
}
