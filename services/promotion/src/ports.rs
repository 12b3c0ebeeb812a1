//! What checkout needs from other services. In dev mode these are in-process calls, in
//! microservices mode gRPC clients; the checkout code cannot tell the difference.

use loyalty_platform::clock::Millis;
use loyalty_platform::error::Result;

use crate::receipt::Identification;

/// A member as checkout needs them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    pub member_id: String,
    /// Filled when asked for: (month, day).
    pub birthday: Option<(u8, u8)>,
    pub attributes: std::collections::BTreeMap<String, String>,
}

/// Resolves how a customer identified to a member.
#[async_trait::async_trait]
pub trait Members: Send + Sync + std::fmt::Debug {
    /// `Ok(None)` for an unidentified purchase; errors for unknown or blocked cards.
    /// `with_profile` also reads the birthday and attributes.
    async fn resolve(
        &self,
        tenant_id: &str,
        id: &Identification,
        with_profile: bool,
    ) -> Result<Option<Resolved>>;
    /// Answers when the peer is reachable.
    async fn ping(&self) -> Result<()>;
}

/// Segment membership, for campaigns targeted at segments.
#[async_trait::async_trait]
pub trait Segments: Send + Sync + std::fmt::Debug {
    /// Ids of the segments the member is in.
    async fn member_segments(&self, tenant_id: &str, member_id: &str) -> Result<Vec<String>>;
    /// Whether each segment exists (campaign validation).
    async fn exist(&self, tenant_id: &str, segment_ids: &[String]) -> Result<Vec<bool>>;
}

/// Where segmentation does not run: no member is in any segment, and targeting a segment
/// is refused as unknown.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSegments;

#[async_trait::async_trait]
impl Segments for NoSegments {
    async fn member_segments(&self, _: &str, _: &str) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    async fn exist(&self, _: &str, segment_ids: &[String]) -> Result<Vec<bool>> {
        Ok(vec![false; segment_ids.len()])
    }
}

/// Result of taking points back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reversal {
    pub taken: i64,
    pub unrecovered: i64,
    pub active_after: i64,
}

/// Result of a redemption that takes what is available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redeemed {
    pub amount: i64,
    pub active_after: i64,
}

/// How a hold stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldState {
    Open,
    Confirmed,
    Cancelled,
    Expired,
}

/// A hold a till placed on a member's points, as checkout needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub member_id: String,
    /// What it reserved.
    pub amount: i64,
    pub state: HoldState,
}

/// The member's points, idempotent by key.
#[async_trait::async_trait]
pub trait Points: Send + Sync + std::fmt::Debug {
    async fn available(&self, tenant_id: &str, member_id: &str) -> Result<i64>;
    /// Returns the active balance after.
    #[allow(clippy::too_many_arguments)]
    async fn accrue(
        &self,
        tenant_id: &str,
        member_id: &str,
        key: &str,
        amount: i64,
        reference: &str,
        activate_at: Millis,
        expire_at: Option<Millis>,
    ) -> Result<i64>;
    /// Redeems what is active, up to `amount`, atomically; a retry returns the same result.
    async fn redeem(
        &self,
        tenant_id: &str,
        member_id: &str,
        key: &str,
        amount: i64,
        reference: &str,
    ) -> Result<Redeemed>;
    /// The hold `hold_id`; NOT_FOUND when there is none.
    async fn hold(&self, tenant_id: &str, hold_id: &str) -> Result<Held>;
    /// Redeems `amount` (positive, at most the hold's) of an open hold under `key` and
    /// returns the rest to the balance; a retry returns the same result.
    async fn confirm_hold(
        &self,
        tenant_id: &str,
        hold_id: &str,
        key: &str,
        amount: i64,
    ) -> Result<Redeemed>;
    /// Returns all of a hold's points; an expired or cancelled hold stays as it is, a
    /// confirmed one is refused (FAILED_PRECONDITION).
    async fn cancel_hold(&self, tenant_id: &str, hold_id: &str, key: &str) -> Result<()>;
    /// Reverses part of the operation recorded under `original_key`.
    async fn reverse(
        &self,
        tenant_id: &str,
        member_id: &str,
        key: &str,
        original_key: &str,
        amount: i64,
        reference: &str,
    ) -> Result<Reversal>;
    async fn ping(&self) -> Result<()>;
}
