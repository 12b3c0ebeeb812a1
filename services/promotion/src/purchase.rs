//! Purchase history records. A purchase is written *pending* (with its evaluation) before
//! any points move, and *committed* after; a retry finds the pending record and finishes
//! the same work with the same idempotency keys, so a crash between steps never doubles
//! an effect.

use loyalty_platform::clock::Millis;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::evaluate::Evaluation;
use crate::program::Program;
use crate::receipt::Receipt;

/// Most refunds one receipt may have (each is kept in the purchase record).
pub const MAX_REFUNDS_PER_RECEIPT: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PurchaseState {
    Pending,
    Committed {
        commit_time: Millis,
        /// Active points after the receipt, when identified.
        points_balance: Option<i64>,
    },
    /// Pending, redeeming from the till's hold `hold_id` (two-phase redemption). A variant
    /// of its own, after the others, so records written before it still read.
    PendingOnHold {
        hold_id: String,
    },
}

impl PurchaseState {
    /// Written, but its points have not moved yet.
    pub fn is_pending(&self) -> bool {
        !matches!(self, Self::Committed { .. })
    }

    /// The hold a pending purchase redeems from.
    pub fn hold_id(&self) -> Option<&str> {
        match self {
            Self::PendingOnHold { hold_id } => Some(hold_id),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purchase {
    pub receipt: Receipt,
    pub fingerprint: Vec<u8>,
    /// The program the receipt was evaluated under and when: a retry that has to re-price
    /// (because fewer points could be redeemed) uses exactly these, never today's.
    pub program: Program,
    pub evaluated_at: Millis,
    /// The store's local month of the purchase (tier spend).
    pub month: i32,
    /// The store's brand, region and time zone at the purchase: its events, and its
    /// refunds' events, report it where it was bought.
    pub store: crate::events::StoreFacts,
    /// Pending: the quote-time evaluation. Committed: what was applied.
    pub evaluation: Evaluation,
    pub state: PurchaseState,
    pub refunds: Vec<Refund>,
    /// Increases on every change; stores update with compare-and-set on it.
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    pub refund_id: String,
    pub fingerprint: Vec<u8>,
    pub lines: Vec<(String, Decimal)>,
    pub refunded_amount: Decimal,
    /// Accrued points to take back.
    pub reverse_points: i64,
    /// Redeemed points to give back.
    pub give_back_points: i64,
    /// Points to take back from each bonus lot, in the evaluation's order.
    pub reverse_bonus: Vec<i64>,
    /// Given back to budgets, limits, coupons and tier spend with the refund record.
    pub releases: Vec<crate::usage::Claim>,
    /// Set once the points have moved.
    pub outcome: Option<RefundOutcome>,
    /// When the refund was first asked for: its event's time, however often it is retried.
    pub refunded_at: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundOutcome {
    pub points_reversed: i64,
    pub points_unrecovered: i64,
    pub points_returned: i64,
    pub points_balance: i64,
}

/// A stable digest of anything serializable, for "same key, same payload?" checks.
pub fn fingerprint<T: Serialize>(value: &T) -> Vec<u8> {
    let bytes = postcard::to_stdvec(value).unwrap_or_default();
    Sha256::digest(&bytes).to_vec()
}

impl Purchase {
    /// When the purchase happened, for its events and its refunds' events alike: the till's
    /// time, but never more than a day after the server evaluated the receipt (a till's
    /// clock far ahead would otherwise file it in the future); the evaluation time when the
    /// till gave none. The same value for the purchase and every refund, so consumers file
    /// a refund on the purchase's day.
    pub fn purchase_time(&self) -> Millis {
        let latest = self
            .evaluated_at
            .saturating_add(loyalty_platform::clock::DAY_MS);
        self.receipt
            .purchase_time
            .unwrap_or(self.evaluated_at)
            .min(latest)
    }

    /// Since when the purchase has work left: its evaluation time while its commit is
    /// pending, else the time of its oldest refund whose points have not moved. `None` when
    /// settled. Stores index unsettled purchases by this time for the repair.
    pub fn unsettled_since(&self) -> Option<Millis> {
        if self.state.is_pending() {
            return Some(self.evaluated_at);
        }
        self.unsettled_refunds().map(|r| r.refunded_at).min()
    }

    /// Refunds accepted whose points have not moved yet, oldest first.
    pub fn unsettled_refunds(&self) -> impl Iterator<Item = &Refund> {
        self.refunds.iter().filter(|r| r.outcome.is_none())
    }

    /// Quantity of a line already refunded (pending refunds included).
    pub fn refunded_quantity(&self, line_id: &str) -> Decimal {
        self.refunds
            .iter()
            .flat_map(|r| r.lines.iter())
            .filter(|(id, _)| id == line_id)
            .map(|(_, q)| *q)
            .sum()
    }
}

/// Idempotency keys of the points operations of a receipt.
pub fn redeem_key(receipt_id: &str) -> String {
    format!("receipt:{receipt_id}:redeem")
}

/// Returns the till's hold when the receipt redeems nothing from it.
pub fn release_hold_key(receipt_id: &str) -> String {
    format!("receipt:{receipt_id}:release-hold")
}

/// Gives back points redeemed beyond what re-pricing could use (odd point values only).
pub fn redeem_excess_key(receipt_id: &str) -> String {
    format!("receipt:{receipt_id}:redeem-excess")
}

pub fn accrue_key(receipt_id: &str) -> String {
    format!("receipt:{receipt_id}:accrue")
}

/// The lot of a fixed-bonus campaign on a receipt.
pub fn bonus_key(receipt_id: &str, campaign_id: &str) -> String {
    format!("receipt:{receipt_id}:bonus:{campaign_id}")
}

pub fn refund_key(receipt_id: &str, refund_id: &str, what: &str) -> String {
    format!("receipt:{receipt_id}:refund:{refund_id}:{what}")
}

/// Longest idempotency key the ledger takes.
pub const MAX_LEDGER_KEY_LEN: usize = 256;

/// The refund of a fixed-bonus lot. Long receipt, refund and campaign ids together can pass
/// the ledger's key limit; such a key names the campaign by a digest instead (a key that
/// fits keeps the plain form, so refunds recorded before stay the same operation).
pub fn refund_bonus_key(receipt_id: &str, refund_id: &str, campaign_id: &str) -> String {
    let plain = refund_key(receipt_id, refund_id, &format!("bonus:{campaign_id}"));
    if plain.len() <= MAX_LEDGER_KEY_LEN {
        return plain;
    }
    let digest: String = Sha256::digest(campaign_id.as_bytes())[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    refund_key(receipt_id, refund_id, &format!("bonus#{digest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_till_far_ahead_is_held_to_a_day_after_the_evaluation() {
        let day = loyalty_platform::clock::DAY_MS;
        let at = |time| {
            let mut p = crate::store::conformance::purchase("r1");
            p.receipt.purchase_time = time;
            p.evaluated_at = 10 * day;
            p
        };
        assert_eq!(at(None).purchase_time(), 10 * day, "none given");
        assert_eq!(
            at(Some(9 * day)).purchase_time(),
            9 * day,
            "an offline till's"
        );
        assert_eq!(at(Some(19 * day)).purchase_time(), 11 * day, "far ahead");
    }

    #[test]
    fn a_bonus_refund_key_always_fits_the_ledger() {
        assert_eq!(
            refund_bonus_key("r1", "f1", "fast-points"),
            "receipt:r1:refund:f1:bonus:fast-points",
            "a key that fits keeps its plain form"
        );
        let receipt = "r".repeat(64);
        let refund = "f".repeat(64);
        let long_a = "a".repeat(128);
        let long_b = format!("{}b", "a".repeat(127));
        let a = refund_bonus_key(&receipt, &refund, &long_a);
        let b = refund_bonus_key(&receipt, &refund, &long_b);
        assert!(a.len() <= MAX_LEDGER_KEY_LEN, "{}", a.len());
        assert_ne!(a, b, "campaigns keep their own keys");
        assert_eq!(a, refund_bonus_key(&receipt, &refund, &long_a), "stable");
        assert!(a.starts_with(&format!("receipt:{receipt}:refund:{refund}:bonus#")));
    }
}
