//! The promotion service's narrow storage trait. Every backend passes [`conformance`].

use loyalty_platform::clock::Millis;
use loyalty_platform::error::Result;

use crate::campaign::{Campaign, Coupon, StackingGroup};
use crate::catalog::{Product, Store};
use crate::program::Program;
use crate::purchase::Purchase;
use crate::usage::Claim;

pub mod conformance;
pub mod embedded;
pub mod redis;
pub mod traced;

/// What a checkout reads before evaluating, in one snapshot.
#[derive(Debug, Clone, Default)]
pub struct CheckoutContext {
    pub program: Option<Program>,
    pub store: Option<Store>,
    /// In the order of the requested SKUs.
    pub products: Vec<Option<Product>>,
    /// Bumped by every change to the tenant's campaigns or stacking groups.
    pub campaigns_version: u64,
    /// In the order of the requested codes: the coupon with its uses so far, if one.
    pub coupons: Vec<Option<(Coupon, i64)>>,
}

/// A purchase waiting to be settled, in the order [`PromotionStore::stale_unsettled`] lists
/// them: by the time it became unsettled, then tenant and receipt id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Unsettled {
    pub since: Millis,
    pub tenant_id: String,
    pub receipt_id: String,
}

/// The outcome of a purchase write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Written,
    /// The stored version is not the expected one; nothing written.
    Conflict,
    /// Claim number `n` does not fit its limit; nothing written.
    Refused(usize),
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
    /// `codes` are normalized coupon or promo codes.
    async fn checkout_context(
        &self,
        tenant_id: &str,
        store_id: &str,
        skus: &[String],
        codes: &[String],
    ) -> Result<CheckoutContext>;
    async fn purchase(&self, tenant_id: &str, receipt_id: &str) -> Result<Option<Purchase>>;
    /// Every purchase of every tenant in (tenant, receipt id) order after `after`, at most
    /// `limit`: the purchase history other services rebuild from.
    async fn purchases_after(
        &self,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<Purchase>>;
    /// Writes `purchase` if the stored version is `expected_version` (`None`: only if no
    /// purchase with that receipt id exists) and every claim fits, applying the claims in
    /// the same atomic write. Nothing is written otherwise.
    async fn put_purchase(
        &self,
        purchase: &Purchase,
        expected_version: Option<u64>,
        claims: &[Claim],
    ) -> Result<Put>;
    /// Purchases unsettled ([`Purchase::unsettled_since`]) since before `before`, oldest
    /// first, strictly after `after` in that order: commits and refunds whose caller never
    /// retried, at most `limit`.
    async fn stale_unsettled(
        &self,
        before: Millis,
        after: Option<&Unsettled>,
        limit: usize,
    ) -> Result<Vec<Unsettled>>;
    /// A member's committed purchases, newest first, strictly after `after` (a token this
    /// call returned; empty: from the newest).
    async fn member_purchases(
        &self,
        tenant_id: &str,
        member_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Purchase)>>;
    /// Files `from`'s purchase history under `to` (a member merge), or under `to`'s own
    /// survivor when `to` was merged away before: afterwards that listing holds both,
    /// `from`'s none. Idempotent; returns how many purchases moved.
    async fn move_member_purchases(&self, tenant_id: &str, from: &str, to: &str) -> Result<u64>;
    /// Applies claims atomically outside a purchase (action bonuses): all or, with the
    /// index of the first that does not fit, none.
    async fn claim(&self, tenant_id: &str, claims: &[Claim]) -> Result<Option<usize>>;
    /// Counter values, 0 for counters never touched.
    async fn counters(&self, tenant_id: &str, names: &[String]) -> Result<Vec<i64>>;

    /// Every campaign of the tenant (archived included) and its stacking groups, with the
    /// version they are at.
    async fn campaigns(&self, tenant_id: &str) -> Result<(u64, Vec<Campaign>, Vec<StackingGroup>)>;
    async fn campaign(&self, tenant_id: &str, campaign_id: &str) -> Result<Option<Campaign>>;
    /// Saves a campaign as its next version. `expected_version`: `None` creates (an
    /// existing id is `AlreadyExists`), `Some(0)` replaces whatever is there, `Some(v)`
    /// replaces version `v` only (`FailedPrecondition` otherwise).
    async fn save_campaign(
        &self,
        campaign: Campaign,
        expected_version: Option<i64>,
    ) -> Result<Campaign>;
    /// Saved versions of a campaign older than `before` (0: all), newest first.
    async fn campaign_versions(
        &self,
        tenant_id: &str,
        campaign_id: &str,
        before: i64,
        limit: usize,
    ) -> Result<Vec<Campaign>>;
    async fn save_group(&self, group: StackingGroup) -> Result<()>;
    /// Inserts new coupons; any code that exists already is `AlreadyExists`, nothing written.
    /// `batch_key` makes the call idempotent: a repeat returns the codes of the first.
    async fn coupon(&self, tenant_id: &str, code: &str) -> Result<Option<(Coupon, i64)>>;
    async fn insert_coupons(
        &self,
        tenant_id: &str,
        batch_key: &str,
        coupons: &[Coupon],
    ) -> Result<Vec<String>>;
    async fn ping(&self) -> Result<()>;
}
