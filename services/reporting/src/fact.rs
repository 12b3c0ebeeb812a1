//! The facts reporting keeps: purchases, refunds and members as the event stream told them,
//! without personal data (member ids are opaque; no phones, names, emails or birthdays).
//! Every KPI is a function of these facts; the rollups are only a faster way to it.

use loyalty_platform::calendar::Day;
use loyalty_platform::clock::Millis;
use loyalty_platform::embedded::added_last;
use loyalty_platform::types::Channel;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// One line of a purchase or refund: what was bought and the money paid for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub sku: String,
    pub category: String,
    pub brand: String,
    pub quantity: Decimal,
    pub paid: Decimal,
    pub sale_price: bool,
}

/// Where a purchase happened, as the store was at the time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Outlet {
    pub store_id: String,
    pub brand: String,
    pub region: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purchase {
    pub receipt_id: String,
    pub outlet: Outlet,
    /// Empty when the POS did not say.
    pub cashier_id: String,
    pub time_zone: String,
    pub channel: Channel,
    /// None: an anonymous receipt.
    pub member_id: Option<String>,
    pub time: Millis,
    /// The store's local date: the day every figure of the receipt counts on.
    pub day: Day,
    pub lines: Vec<Line>,
    pub gross: Decimal,
    pub discount: Decimal,
    /// Money paid, after discounts and points.
    pub paid: Decimal,
    pub points_accrued: i64,
    pub points_redeemed: i64,
    pub codes: Vec<String>,
    pub campaign_ids: Vec<String>,
    pub held_out_campaign_ids: Vec<String>,
    /// Which of `codes` were coupons the receipt used. Last, so facts stored before it
    /// existed read as none.
    #[serde(deserialize_with = "added_last")]
    pub coupon_codes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    pub receipt_id: String,
    pub refund_id: String,
    pub outlet: Outlet,
    pub time_zone: String,
    pub channel: Channel,
    pub member_id: Option<String>,
    /// When the refund was made.
    pub time: Millis,
    /// The refunded purchase's business day: refunds count against it.
    pub day: Day,
    pub lines: Vec<Line>,
    pub refunded: Decimal,
    /// With this refund, the whole receipt has been refunded.
    pub fully_refunded: bool,
    pub points_reversed: i64,
    pub points_returned: i64,
    pub codes: Vec<String>,
    pub campaign_ids: Vec<String>,
    pub held_out_campaign_ids: Vec<String>,
    /// Which of `codes` were coupons the receipt used. Last, so facts stored before it
    /// existed read as none.
    #[serde(deserialize_with = "added_last")]
    pub coupon_codes: Vec<String>,
}

/// A member as their newest event describes them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub member_id: String,
    pub version: i64,
    /// False once the member was erased or merged away.
    pub active: bool,
    pub registered_at: Option<Millis>,
    pub channel: Channel,
    /// The store they registered in.
    pub store_id: String,
    pub contactable: bool,
    pub questionnaire_complete: bool,
    pub referred: bool,
}

/// An entry of a member's points ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub member_id: String,
    pub seq: i64,
    pub reason: Reason,
    /// Signed, in point minor units.
    pub amount: i64,
    pub balance_after: i64,
    pub time: Millis,
}

/// Why a ledger entry was made (the ledger's own reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reason {
    Unspecified,
    Accrual,
    Redemption,
    Expiry,
    ManualAdjustment,
    RefundReversal,
    RedemptionReversal,
    ReferralBonus,
    SurveyBonus,
    RegistrationBonus,
    MergeTransfer,
    OpeningBalance,
    CampaignBonus,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Unspecified => "unspecified",
            Reason::Accrual => "accrual",
            Reason::Redemption => "redemption",
            Reason::Expiry => "expiry",
            Reason::ManualAdjustment => "manual_adjustment",
            Reason::RefundReversal => "refund_reversal",
            Reason::RedemptionReversal => "redemption_reversal",
            Reason::ReferralBonus => "referral_bonus",
            Reason::SurveyBonus => "survey_bonus",
            Reason::RegistrationBonus => "registration_bonus",
            Reason::MergeTransfer => "merge_transfer",
            Reason::OpeningBalance => "opening_balance",
            Reason::CampaignBonus => "campaign_bonus",
        }
    }

    /// Points issued to members: what breakage is a share of. Reversals give back what
    /// was moved before, transfers move between members, redemptions and expiries take.
    pub fn issues(self) -> bool {
        matches!(
            self,
            Reason::Accrual
                | Reason::ManualAdjustment
                | Reason::ReferralBonus
                | Reason::SurveyBonus
                | Reason::RegistrationBonus
                | Reason::OpeningBalance
                | Reason::CampaignBonus
        )
    }
}

/// A fact with its identity: the event it came from names it exactly once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fact {
    Purchase(Purchase),
    Refund(Refund),
    Member(Member),
    Ledger(LedgerEntry),
}

impl Fact {
    /// The member a receipt or ledger fact belongs to; None for anonymous receipts and for
    /// member profiles (kept by member anyway).
    pub fn member_id(&self) -> Option<&String> {
        match self {
            Fact::Purchase(p) => p.member_id.as_ref(),
            Fact::Refund(r) => r.member_id.as_ref(),
            Fact::Ledger(l) => Some(&l.member_id),
            Fact::Member(_) => None,
        }
    }

    /// What deduplicates the fact: a receipt, a refund of a receipt, a member. A member's
    /// facts replace each other by version instead.
    pub fn identity(&self) -> String {
        match self {
            Fact::Purchase(p) => format!("p\0{}", p.receipt_id),
            Fact::Refund(r) => format!("r\0{}\0{}", r.receipt_id, r.refund_id),
            Fact::Member(m) => format!("m\0{}", m.member_id),
            Fact::Ledger(l) => format!("l\0{}\0{}", l.member_id, l.seq),
        }
    }

    /// What the fact is stored and paged by: the business day of receipts, the time of
    /// ledger entries (None for members).
    pub fn order(&self) -> Option<i64> {
        match self {
            Fact::Purchase(p) => Some(p.day),
            Fact::Refund(r) => Some(r.day),
            Fact::Ledger(l) => Some(l.time),
            Fact::Member(_) => None,
        }
    }
}

/// Facts of one tenant, as a batch arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantFact {
    pub tenant_id: String,
    pub fact: Fact,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use loyalty_platform::embedded::{decode, encode};

    use super::*;
    use crate::store::conformance::{purchase, refund};

    #[test]
    fn receipts_stored_before_coupons_were_told_apart_read_as_without_coupons() {
        for fact in [purchase("t", "r1", 3).fact, refund("t", "r1", "f1", 3).fact] {
            let mut with = fact.clone();
            match &mut with {
                Fact::Purchase(p) => p.coupon_codes = vec!["C1".into()],
                Fact::Refund(r) => r.coupon_codes = vec!["C1".into()],
                _ => unreachable!(),
            }
            assert_eq!(decode::<Fact>(&encode(&with).unwrap()).unwrap(), with);
            // The encoding before the field: the same bytes without the empty list's length.
            let mut old = encode(&fact).unwrap();
            assert_eq!(old.pop(), Some(0));
            assert_eq!(decode::<Fact>(&old).unwrap(), fact);
        }
    }
}
