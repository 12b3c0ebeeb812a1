//! Business counters, bumped once when a receipt or refund is newly applied (never on a
//! replay). They go through the `metrics` facade; the process decides where they are
//! exported (Prometheus `/metrics`, and OTLP when configured).

use crate::campaign::SkipReason;
use crate::evaluate::Evaluation;
use crate::purchase::RefundOutcome;

pub fn receipt_committed(e: &Evaluation) {
    let identified = if e.member.is_some() { "true" } else { "false" };
    metrics::counter!("loyalty_receipts_committed_total", "identified" => identified).increment(1);
    // Discounts in cents of the tenant's currency.
    metrics::counter!("loyalty_discounts_granted_total")
        .increment(crate::evaluate::cents(e.discount).max(0).unsigned_abs());
    let exhausted = e
        .skipped
        .iter()
        .filter(|s| s.reason == SkipReason::BudgetExhausted)
        .count();
    if exhausted > 0 {
        metrics::counter!("loyalty_campaign_budget_exhausted_total").increment(exhausted as u64);
    }
    metrics::counter!("loyalty_points_accrued_total")
        .increment(e.total_points_accrued().max(0).unsigned_abs());
    metrics::counter!("loyalty_points_redeemed_total")
        .increment(e.points_redeemed.max(0).unsigned_abs());
}

pub fn refund_applied(outcome: &RefundOutcome) {
    metrics::counter!("loyalty_refunds_total").increment(1);
    metrics::counter!("loyalty_points_reversed_total")
        .increment(outcome.points_reversed.max(0).unsigned_abs());
    metrics::counter!("loyalty_points_returned_total")
        .increment(outcome.points_returned.max(0).unsigned_abs());
}
