//! What promotion tells other services about purchases: one event per committed receipt and
//! one per refund, published before the caller gets its answer. A retried commit or refund
//! publishes again, so an acknowledged receipt is never missing from the stream; consumers
//! deduplicate by the event id.

use loyalty_platform::clock::Millis;
use loyalty_platform::error::Result;
use rust_decimal::Decimal;

use crate::campaign::normalize_code;
use crate::program::{MONEY_SCALE, Rounding};
use crate::purchase::{Purchase, Refund};
use crate::usage::COUPON_COUNTER_PREFIX;
use loyalty_platform::types::Channel;

/// One line as consumers see it: what was bought and what was paid for it in money.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineFact {
    pub sku: String,
    pub category: String,
    pub brand: String,
    pub quantity: Decimal,
    pub paid: Decimal,
    pub sale_price: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurchaseEvent {
    pub tenant_id: String,
    pub receipt_id: String,
    pub store_id: String,
    /// The cashier who rang the receipt up (empty: not given).
    pub cashier_id: String,
    pub channel: Channel,
    pub member_id: Option<String>,
    pub purchase_time: Millis,
    pub commit_time: Millis,
    pub lines: Vec<LineFact>,
    pub gross: Decimal,
    pub discount: Decimal,
    pub paid: Decimal,
    pub points_accrued: i64,
    pub points_redeemed: i64,
    pub points_balance: Option<i64>,
    /// The member's tier when the receipt was priced (empty: none); None when anonymous.
    pub tier_id: Option<String>,
    pub codes: Vec<String>,
    /// Which of `codes` were coupons the receipt used.
    pub coupon_codes: Vec<String>,
    /// Campaigns that gave the receipt something.
    pub campaign_ids: Vec<String>,
    /// Campaigns whose control group held this member out (for uplift).
    pub held_out_campaign_ids: Vec<String>,
    /// Points paid as fixed bonuses (part of `points_accrued`).
    pub bonus_points: i64,
    pub store: StoreFacts,
    /// The store's local date of the purchase, as days since 1970-01-01.
    pub business_day: i64,
}

impl PurchaseEvent {
    pub fn event_id(&self) -> String {
        format!("purchase/{}/{}", self.tenant_id, self.receipt_id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundEvent {
    pub tenant_id: String,
    pub receipt_id: String,
    pub refund_id: String,
    pub store_id: String,
    pub member_id: Option<String>,
    pub purchase_time: Millis,
    pub refund_time: Millis,
    pub lines: Vec<LineFact>,
    pub refunded: Decimal,
    pub receipt_fully_refunded: bool,
    /// With `receipt_fully_refunded`: the distinct categories and brands of all the
    /// receipt's lines, in order; empty otherwise.
    pub receipt_categories: Vec<String>,
    pub receipt_brands: Vec<String>,
    pub points_reversed: i64,
    pub points_returned: i64,
    pub channel: Channel,
    pub codes: Vec<String>,
    pub coupon_codes: Vec<String>,
    pub campaign_ids: Vec<String>,
    pub held_out_campaign_ids: Vec<String>,
    pub store: StoreFacts,
    /// The refunded purchase's business day.
    pub business_day: i64,
}

impl RefundEvent {
    pub fn event_id(&self) -> String {
        format!(
            "refund/{}/{}/{}",
            self.tenant_id, self.receipt_id, self.refund_id
        )
    }
}

/// Where events go. The wiring plugs in the event log (or nothing, in unit tests).
#[async_trait::async_trait]
pub trait Events: Send + Sync + std::fmt::Debug {
    async fn purchase_committed(&self, event: PurchaseEvent) -> Result<()>;
    async fn refund_committed(&self, event: RefundEvent) -> Result<()>;
}

/// Publishes nothing (unit tests of checkout alone).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEvents;

#[async_trait::async_trait]
impl Events for NoEvents {
    async fn purchase_committed(&self, _: PurchaseEvent) -> Result<()> {
        Ok(())
    }
    async fn refund_committed(&self, _: RefundEvent) -> Result<()> {
        Ok(())
    }
}

/// What the events say about the receipt's products and store, as they were at the purchase.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    /// (category, brand) of each line's product, in line order; empty when unknown.
    pub lines: Vec<(String, String)>,
    pub store: StoreFacts,
}

/// The store's brand, region and time zone: reports slice by them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreFacts {
    pub brand: String,
    pub region: String,
    pub time_zone: String,
}

impl StoreFacts {
    pub fn of(store: &crate::catalog::Store) -> Self {
        Self {
            brand: store.brand.clone(),
            region: store.region.clone(),
            time_zone: store.time_zone.clone(),
        }
    }

    /// The store's local date at `time`, as days since 1970-01-01: the business day.
    pub fn business_day(&self, time: Millis) -> i64 {
        crate::calendar::LocalTime::at(time, &self.time_zone).day_number
    }
}

pub fn purchase_event(
    p: &Purchase,
    catalog: &Catalog,
    commit_time: Millis,
    points_balance: Option<i64>,
) -> PurchaseEvent {
    let e = &p.evaluation;
    let lines = p
        .receipt
        .lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let result = e.lines.iter().find(|l| l.line_id == line.line_id);
            let (category, brand) = catalog.lines.get(i).cloned().unwrap_or_default();
            LineFact {
                sku: line.sku.clone(),
                category,
                brand,
                quantity: line.quantity,
                paid: result.map_or(Decimal::ZERO, |l| l.net - l.paid_with_points),
                sale_price: line.sale_price,
            }
        })
        .collect();
    let purchase_time = p.purchase_time();
    let codes = codes(p);
    PurchaseEvent {
        tenant_id: p.receipt.tenant_id.clone(),
        receipt_id: p.receipt.receipt_id.clone(),
        store_id: p.receipt.store_id.clone(),
        cashier_id: p.receipt.cashier_id.clone(),
        channel: p.receipt.channel,
        member_id: e.member.as_ref().map(|m| m.member_id.clone()),
        purchase_time,
        commit_time,
        lines,
        gross: e.gross,
        discount: e.discount,
        paid: e.amount_due,
        points_accrued: e.total_points_accrued(),
        points_redeemed: e.points_redeemed,
        points_balance,
        tier_id: e.member.as_ref().map(|m| m.tier_id.clone()),
        coupon_codes: coupon_codes(p, &codes),
        codes,
        campaign_ids: e
            .applied_campaigns()
            .iter()
            .map(|c| c.to_string())
            .collect(),
        held_out_campaign_ids: e.held_out().map(str::to_string).collect(),
        bonus_points: e.bonuses.iter().map(|b| b.points).sum(),
        business_day: catalog.store.business_day(purchase_time),
        store: catalog.store.clone(),
    }
}

/// The refund's event. `p` holds the refund (with its outcome) among its refunds.
pub fn refund_event(p: &Purchase, refund: &Refund, catalog: &Catalog, now: Millis) -> RefundEvent {
    let e = &p.evaluation;
    // Quantities refunded by the refunds recorded before this one, per line.
    let earlier: Vec<&Refund> = p
        .refunds
        .iter()
        .take_while(|r| r.refund_id != refund.refund_id)
        .collect();
    let mut lines = Vec::new();
    for (line_id, qty) in &refund.lines {
        let Some(i) = p.receipt.lines.iter().position(|l| &l.line_id == line_id) else {
            continue;
        };
        let Some(result) = e.lines.iter().find(|l| &l.line_id == line_id) else {
            continue;
        };
        let before: Decimal = earlier
            .iter()
            .flat_map(|r| r.lines.iter())
            .filter(|(id, _)| id == line_id)
            .map(|(_, q)| *q)
            .sum();
        let paid = result.net - result.paid_with_points;
        let money = |q: Decimal| Rounding::Down.apply(paid * q / result.quantity, MONEY_SCALE);
        let (category, brand) = catalog.lines.get(i).cloned().unwrap_or_default();
        lines.push(LineFact {
            sku: result.sku.clone(),
            category,
            brand,
            quantity: *qty,
            paid: money(before + qty) - money(before),
            sale_price: p.receipt.lines[i].sale_price,
        });
    }
    // Fully refunded with this refund: every line is refunded in full counting the refunds
    // up to and including this one, and was not before it.
    let refunded_through = |refunds: &[&Refund], line_id: &str| -> Decimal {
        refunds
            .iter()
            .flat_map(|r| r.lines.iter())
            .filter(|(id, _)| id == line_id)
            .map(|(_, q)| *q)
            .sum()
    };
    let mut through: Vec<&Refund> = earlier.clone();
    through.push(refund);
    let full = |refunds: &[&Refund]| {
        e.lines
            .iter()
            .all(|l| refunded_through(refunds, &l.line_id) >= l.quantity)
    };
    let outcome = refund.outcome.unwrap_or(crate::purchase::RefundOutcome {
        points_reversed: 0,
        points_unrecovered: 0,
        points_returned: 0,
        points_balance: 0,
    });
    let purchase_time = p.purchase_time();
    let fully_refunded = full(&through) && !full(&earlier);
    let (mut receipt_categories, mut receipt_brands) = (Vec::new(), Vec::new());
    if fully_refunded {
        for (category, brand) in &catalog.lines {
            if !category.is_empty() && !receipt_categories.contains(category) {
                receipt_categories.push(category.clone());
            }
            if !brand.is_empty() && !receipt_brands.contains(brand) {
                receipt_brands.push(brand.clone());
            }
        }
    }
    let codes = codes(p);
    RefundEvent {
        tenant_id: p.receipt.tenant_id.clone(),
        receipt_id: p.receipt.receipt_id.clone(),
        refund_id: refund.refund_id.clone(),
        store_id: p.receipt.store_id.clone(),
        member_id: e.member.as_ref().map(|m| m.member_id.clone()),
        purchase_time,
        refund_time: now,
        lines,
        refunded: refund.refunded_amount,
        receipt_fully_refunded: fully_refunded,
        receipt_categories,
        receipt_brands,
        points_reversed: outcome.points_reversed,
        points_returned: outcome.points_returned,
        channel: p.receipt.channel,
        coupon_codes: coupon_codes(p, &codes),
        codes,
        campaign_ids: e
            .applied_campaigns()
            .iter()
            .map(|c| c.to_string())
            .collect(),
        held_out_campaign_ids: e.held_out().map(str::to_string).collect(),
        business_day: catalog.store.business_day(purchase_time),
        store: catalog.store.clone(),
    }
}

/// The receipt's codes, normalized as the checkout matched them (so "spring" and "SPRING"
/// are one code in reports).
fn codes(p: &Purchase) -> Vec<String> {
    p.receipt.codes.iter().map(|c| normalize_code(c)).collect()
}

/// Which of the receipt's `codes` (normalized) were coupons it used: those it claimed a use
/// of.
fn coupon_codes(p: &Purchase, codes: &[String]) -> Vec<String> {
    let used: std::collections::HashSet<&str> = p
        .evaluation
        .claims
        .iter()
        .filter_map(|c| c.counter.strip_prefix(COUPON_COUNTER_PREFIX))
        .collect();
    codes
        .iter()
        .filter(|c| used.contains(c.as_str()))
        .cloned()
        .collect()
}
