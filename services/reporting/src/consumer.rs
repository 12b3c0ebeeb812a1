//! The adapter from the event stream to the reporting core: reads the purchase, member and
//! ledger streams in the `reporting` consumer group, stores each batch's new facts (deduplicated,
//! durable), rolls them up, and only then acknowledges the batch.

use loyalty_platform::calendar::{Day, day_from_civil};
use loyalty_platform::clock::Millis;
use loyalty_platform::events::consume::{Subscription, consume};
use loyalty_platform::events::{AUDIT, Delivery, LEDGER, MEMBERS, PURCHASES, SharedEventLog};
use loyalty_platform::grpc::{channel, millis};
use loyalty_proto::events::v1 as pb;
use prost::Message;
use rust_decimal::Decimal;

use crate::audit::AuditEntry;
use crate::fact::{Fact, LedgerEntry, Line, Member, Outlet, Purchase, Reason, Refund, TenantFact};
use crate::service::Reporting;

pub const GROUP: &str = "reporting";

/// The streams reporting consumes.
pub const STREAMS: [&str; 3] = [PURCHASES, MEMBERS, LEDGER];

fn dec(d: &Option<loyalty_proto::common::v1::Decimal>) -> Decimal {
    d.as_ref()
        .and_then(|d| d.value.parse().ok())
        .unwrap_or_default()
}

fn time(t: &Option<prost_types::Timestamp>, or: Millis) -> Millis {
    t.as_ref().map_or(or, millis)
}

/// The business day the event names; for events from before events carried it, the date of
/// the purchase in the store's time zone (UTC when that is unknown too).
fn business_day(d: &Option<loyalty_proto::common::v1::Date>, time: Millis, zone: &str) -> Day {
    match d {
        Some(d) if (1..=12).contains(&d.month) && (1..=31).contains(&d.day) => {
            day_from_civil(d.year, d.month as u32, d.day as u32)
        }
        _ => {
            let tz = jiff::tz::TimeZone::get(zone).unwrap_or(jiff::tz::TimeZone::UTC);
            crate::service::local_day(time, &tz)
        }
    }
}

fn lines(lines: &[pb::Line]) -> Vec<Line> {
    lines
        .iter()
        .map(|l| Line {
            sku: l.sku.clone(),
            category: l.category.clone(),
            brand: l.brand.clone(),
            quantity: dec(&l.quantity),
            paid: dec(&l.paid),
            sale_price: l.sale_price,
        })
        .collect()
}

fn reason(value: i32) -> Reason {
    use loyalty_proto::balance::v1::EntryReason as P;
    match P::try_from(value).unwrap_or(P::Unspecified) {
        P::Unspecified => Reason::Unspecified,
        P::Accrual => Reason::Accrual,
        P::Redemption => Reason::Redemption,
        P::Expiry => Reason::Expiry,
        P::ManualAdjustment => Reason::ManualAdjustment,
        P::RefundReversal => Reason::RefundReversal,
        P::RedemptionReversal => Reason::RedemptionReversal,
        P::ReferralBonus => Reason::ReferralBonus,
        P::SurveyBonus => Reason::SurveyBonus,
        P::RegistrationBonus => Reason::RegistrationBonus,
        P::MergeTransfer => Reason::MergeTransfer,
        P::OpeningBalance => Reason::OpeningBalance,
        P::CampaignBonus => Reason::CampaignBonus,
    }
}

fn member(id: &str) -> Option<String> {
    (!id.is_empty()).then(|| id.to_string())
}

/// The fact an event carries; None for payloads this version does not understand (logged,
/// then skipped: a poison event must not stop the stream).
pub fn decode(payload: &[u8]) -> Option<TenantFact> {
    let event = match pb::Event::decode(payload) {
        Ok(e) => e,
        Err(err) => {
            tracing::warn!(error = %err, "undecodable event skipped");
            return None;
        }
    };
    if event.tenant_id.is_empty() {
        return None;
    }
    let event_time = time(&event.event_time, 0);
    let fact = match event.kind? {
        pb::event::Kind::Purchase(p) => {
            let at = time(&p.purchase_time, event_time);
            let day = business_day(&p.business_day, at, &p.store_time_zone);
            Fact::Purchase(Purchase {
                cashier_id: p.cashier_id,
                outlet: Outlet {
                    store_id: p.store_id,
                    brand: p.store_brand,
                    region: p.store_region,
                },
                time_zone: p.store_time_zone,
                channel: channel(p.channel),
                member_id: member(&p.member_id),
                time: at,
                day,
                lines: lines(&p.lines),
                gross: dec(&p.gross),
                discount: dec(&p.discount),
                paid: dec(&p.paid),
                points_accrued: p.points_accrued,
                points_redeemed: p.points_redeemed,
                codes: p.codes,
                coupon_codes: p.coupon_codes,
                campaign_ids: p.campaign_ids,
                held_out_campaign_ids: p.held_out_campaign_ids,
                receipt_id: p.receipt_id,
            })
        }
        pb::event::Kind::Refund(r) => {
            let bought = time(&r.purchase_time, event_time);
            let day = business_day(&r.business_day, bought, &r.store_time_zone);
            Fact::Refund(Refund {
                outlet: Outlet {
                    store_id: r.store_id,
                    brand: r.store_brand,
                    region: r.store_region,
                },
                time_zone: r.store_time_zone,
                channel: channel(r.channel),
                member_id: member(&r.member_id),
                time: event_time,
                day,
                lines: lines(&r.lines),
                refunded: dec(&r.refunded),
                fully_refunded: r.receipt_fully_refunded,
                points_reversed: r.points_reversed,
                points_returned: r.points_returned,
                codes: r.codes,
                coupon_codes: r.coupon_codes,
                campaign_ids: r.campaign_ids,
                held_out_campaign_ids: r.held_out_campaign_ids,
                receipt_id: r.receipt_id,
                refund_id: r.refund_id,
            })
        }
        pb::event::Kind::Ledger(l) => Fact::Ledger(LedgerEntry {
            reason: reason(l.reason),
            amount: l.amount,
            balance_after: l.balance_after,
            time: time(&l.create_time, event_time),
            seq: l.sequence,
            member_id: l.member_id,
        }),
        pb::event::Kind::Member(m) => Fact::Member(Member {
            version: m.version,
            active: m.active,
            registered_at: m.registration_time.as_ref().map(millis),
            channel: channel(m.channel),
            store_id: m.store_id,
            contactable: m.contactable_sms
                || m.contactable_email
                || m.contactable_push
                || m.contactable_messenger,
            questionnaire_complete: m.questionnaire_complete,
            referred: m.referred,
            member_id: m.member_id,
        }),
        // Audit records travel on their own stream ([`decode_audit`]).
        pb::event::Kind::Audit(_) => return None,
    };
    let named = match &fact {
        Fact::Purchase(p) => !p.receipt_id.is_empty(),
        Fact::Refund(r) => !r.receipt_id.is_empty() && !r.refund_id.is_empty(),
        Fact::Member(m) => !m.member_id.is_empty(),
        Fact::Ledger(l) => !l.member_id.is_empty() && l.seq > 0,
    };
    named.then_some(TenantFact {
        tenant_id: event.tenant_id,
        fact,
    })
}

/// The audit record an event on the `audit` stream carries; None for anything else.
pub fn decode_audit(payload: &[u8]) -> Option<AuditEntry> {
    let event = pb::Event::decode(payload).ok()?;
    let Some(pb::event::Kind::Audit(r)) = event.kind else {
        return None;
    };
    if event.tenant_id.is_empty() || r.record_id.is_empty() {
        return None;
    }
    let actor = r.actor.unwrap_or_default();
    Some(AuditEntry {
        id: r.record_id,
        tenant_id: event.tenant_id,
        time: time(&r.record_time, time(&event.event_time, 0)),
        key_id: r.key_id,
        role: r.role,
        actor_id: actor.id,
        actor_comment: actor.comment,
        method: r.method,
        member_id: r.member_id,
        status_code: r.status_code,
        status_message: r.status_message,
        request: r.request_json,
        before: r.before_json,
        after: r.after_json,
        in_flight: r.in_flight,
    })
}

/// Consumes the `audit` stream for as long as the process runs: each batch's new records
/// are stored (durable, deduplicated by id) before the batch is acknowledged.
pub async fn run_audit(reporting: Reporting, log: SharedEventLog, consumer: String) {
    let sub = Subscription {
        stream: AUDIT,
        group: GROUP,
        consumer,
        span: "reporting.apply_audit",
    };
    consume(log, sub, move |batch| {
        let reporting = reporting.clone();
        async move {
            let entries = batch
                .iter()
                .filter_map(|d| decode_audit(&d.payload))
                .collect();
            reporting.record_audit(entries).await.map(|_| ())
        }
    })
    .await;
}

/// Applies one batch; the caller acknowledges it after this returns Ok.
pub async fn apply_batch(
    reporting: &Reporting,
    batch: &[Delivery],
) -> loyalty_platform::error::Result<()> {
    let facts: Vec<TenantFact> = batch.iter().filter_map(|d| decode(&d.payload)).collect();
    reporting.ingest(facts).await?;
    Ok(())
}

/// Consumes `stream` for as long as the process runs.
pub async fn run(
    reporting: Reporting,
    log: SharedEventLog,
    stream: &'static str,
    consumer: String,
) {
    let sub = Subscription {
        stream,
        group: GROUP,
        consumer,
        span: "reporting.apply_batch",
    };
    consume(log, sub, move |batch| {
        let reporting = reporting.clone();
        async move { apply_batch(&reporting, &batch).await }
    })
    .await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use loyalty_platform::grpc::timestamp;

    use super::*;

    #[test]
    fn a_purchase_counts_on_the_business_day_its_event_names() {
        let payload = pb::Event {
            event_id: "purchase/t/r1".into(),
            tenant_id: "t".into(),
            event_time: Some(timestamp(1_000)),
            kind: Some(pb::event::Kind::Purchase(pb::PurchaseCommitted {
                receipt_id: "r1".into(),
                store_id: "s".into(),
                purchase_time: Some(timestamp(1_763_850_000_000)),
                business_day: Some(loyalty_proto::common::v1::Date {
                    year: 2025,
                    month: 11,
                    day: 23,
                }),
                ..Default::default()
            })),
        }
        .encode_to_vec();
        let f = decode(&payload).unwrap();
        assert_eq!(f.fact.order(), Some(day_from_civil(2025, 11, 23)));
        assert!(decode(b"\xff not protobuf").is_none());
    }
}
