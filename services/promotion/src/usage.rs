//! Counters that make budgets, per-member limits and coupon uses exact: a commit claims
//! what it uses in the same atomic write as its purchase record, and a refund gives it back.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Counter values by name, as read before an evaluation.
pub type Counters = HashMap<String, i64>;

/// Adds `amount` to `counter`; refused when that would take it above `limit` (0: no limit).
/// Negative amounts give back and never take a counter below zero.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub counter: String,
    pub amount: i64,
    pub limit: i64,
}

impl Claim {
    /// The opposite of this claim (for a refund), as much as `amount`.
    pub fn give_back(&self, amount: i64) -> Claim {
        Claim {
            counter: self.counter.clone(),
            amount: -amount,
            limit: 0,
        }
    }

    /// Whether the claim fits on top of `current`.
    pub fn fits(&self, current: i64) -> bool {
        self.amount <= 0 || self.limit <= 0 || current.saturating_add(self.amount) <= self.limit
    }
}

/// Receipts a campaign applied to.
pub fn uses_counter(campaign_id: &str) -> String {
    format!("uses/{campaign_id}")
}

/// Discount a campaign gave, in cents.
pub fn discount_counter(campaign_id: &str) -> String {
    format!("discount/{campaign_id}")
}

/// Points a campaign granted.
pub fn points_counter(campaign_id: &str) -> String {
    format!("points/{campaign_id}")
}

/// Uses of a campaign by one member in one period.
pub fn member_counter(campaign_id: &str, member_id: &str, period: i64) -> String {
    format!("member/{campaign_id}/{member_id}/{period}")
}

/// What names a coupon's counter, before its code.
pub const COUPON_COUNTER_PREFIX: &str = "coupon/";

/// Uses of one coupon.
pub fn coupon_counter(code: &str) -> String {
    format!("{COUPON_COUNTER_PREFIX}{code}")
}

/// Receipts spending a till's hold (at most one): two receipts naming the same hold cannot
/// both be pending on it.
pub fn hold_counter(hold_id: &str) -> String {
    format!("hold/{hold_id}")
}

/// Grants of an action bonus to one member (at most one).
pub fn action_counter(campaign_id: &str, member_id: &str) -> String {
    format!("action/{campaign_id}/{member_id}")
}
