//! The adapter from the event stream to the segmentation core: reads the purchase stream in
//! the `segmentation` consumer group, applies each batch (deduplicated by event id, durable),
//! and only then acknowledges it. Entries a dead consumer left pending are claimed after
//! [`loyalty_platform::events::consume::CLAIM_IDLE`]. Also runs the scheduled re-evaluation of time-relative segments.

use std::time::Duration;

use loyalty_platform::clock::Millis;
use loyalty_platform::events::consume::{Subscription, consume};
use loyalty_platform::events::{Delivery, LEDGER, MEMBERS, PURCHASES, SharedEventLog};
use loyalty_platform::grpc::millis;
use loyalty_proto::events::v1 as pb;
use prost::Message;
use rust_decimal::Decimal;

use crate::features::{Consents, LedgerPoints, MemberData, PurchaseFacts, RefundFacts};
use crate::service::Segmentation;
use crate::store::{Change, FeatureChange};

pub const GROUP: &str = "segmentation";

fn dec(d: &Option<loyalty_proto::common::v1::Decimal>) -> Decimal {
    d.as_ref()
        .and_then(|d| d.value.parse().ok())
        .unwrap_or_default()
}

fn time(t: &Option<prost_types::Timestamp>, or: Millis) -> Millis {
    t.as_ref().map_or(or, millis)
}

/// A purchase time the till sent is trusted up to a day past the event: one dated years
/// ahead would otherwise push every real day out of the member's window history.
fn not_after(t: Millis, event_time: Millis) -> Millis {
    if event_time > 0 {
        t.min(event_time + loyalty_platform::clock::DAY_MS)
    } else {
        t
    }
}

fn lines(lines: &[pb::Line]) -> Vec<(String, String, Decimal)> {
    lines
        .iter()
        .map(|l| (l.category.clone(), l.brand.clone(), dec(&l.paid)))
        .collect()
}

/// The feature change an event carries; None for events about no member (anonymous
/// receipts) and for payloads this version does not understand (logged, then skipped).
pub fn decode(payload: &[u8]) -> Option<FeatureChange> {
    let event = match pb::Event::decode(payload) {
        Ok(e) => e,
        Err(err) => {
            tracing::warn!(error = %err, "undecodable event skipped");
            return None;
        }
    };
    let event_time = time(&event.event_time, 0);
    let (member_id, change) = match event.kind? {
        pb::event::Kind::Purchase(p) => (
            p.member_id.clone(),
            Change::Purchase(PurchaseFacts {
                time: not_after(time(&p.purchase_time, event_time), event_time),
                store_id: p.store_id.clone(),
                paid: dec(&p.paid),
                lines: lines(&p.lines),
                points_balance: p.points_balance,
                tier_id: p.tier_id.clone(),
            }),
        ),
        pb::event::Kind::Member(m) => (
            m.member_id.clone(),
            (if m.erased {
                Change::Erasure
            } else {
                Change::Member
            })(MemberData {
                known: true,
                active: m.active,
                registered_at: m.registration_time.as_ref().map(millis),
                first_store: m.store_id.clone(),
                birthday: m.birthday.as_ref().and_then(|d| {
                    let month = u32::try_from(d.month)
                        .ok()
                        .filter(|m| (1..=12).contains(m))?;
                    let day = u32::try_from(d.day).ok().filter(|d| (1..=31).contains(d))?;
                    Some((month, day, (d.year > 0).then_some(d.year)))
                }),
                consents: Consents {
                    sms: m.contactable_sms,
                    email: m.contactable_email,
                    push: m.contactable_push,
                    messenger: m.contactable_messenger,
                },
                questionnaire_complete: m.questionnaire_complete,
                referred: m.referred,
                tier_id: String::new(),
                version: m.version,
            }),
        ),
        pb::event::Kind::Ledger(l) => (
            l.member_id.clone(),
            Change::Ledger(LedgerPoints {
                sequence: l.sequence,
                total: l.balance_after,
                at: time(&l.create_time, event_time),
            }),
        ),
        pb::event::Kind::Audit(_) => return None,
        pb::event::Kind::Refund(r) => (
            r.member_id.clone(),
            Change::Refund(RefundFacts {
                purchase_time: not_after(time(&r.purchase_time, event_time), event_time),
                store_id: r.store_id.clone(),
                refunded: dec(&r.refunded),
                lines: lines(&r.lines),
                receipt_fully_refunded: r.receipt_fully_refunded,
                receipt_categories: r.receipt_categories.clone(),
                receipt_brands: r.receipt_brands.clone(),
            }),
        ),
    };
    if member_id.is_empty() || event.event_id.is_empty() || event.tenant_id.is_empty() {
        return None;
    }
    Some(FeatureChange {
        tenant_id: event.tenant_id,
        event_id: event.event_id,
        member_id,
        change,
    })
}

/// Applies one batch; the caller acknowledges it after this returns Ok.
pub async fn apply_batch(
    segmentation: &Segmentation,
    batch: &[Delivery],
) -> loyalty_platform::error::Result<()> {
    let changes: Vec<FeatureChange> = batch.iter().filter_map(|d| decode(&d.payload)).collect();
    segmentation.apply(changes).await?;
    Ok(())
}

/// The streams segmentation consumes.
pub const STREAMS: [&str; 3] = [PURCHASES, MEMBERS, LEDGER];

/// Consumes `stream` for as long as the process runs (see [`consume`]).
pub async fn run(
    segmentation: Segmentation,
    log: SharedEventLog,
    stream: &'static str,
    consumer: String,
) {
    let sub = Subscription {
        stream,
        group: GROUP,
        consumer,
        span: "segmentation.apply_batch",
    };
    consume(log, sub, move |batch| {
        let segmentation = segmentation.clone();
        async move { apply_batch(&segmentation, &batch).await }
    })
    .await;
}

/// Recomputes every tenant's RFM scores every `every`, for as long as the process runs.
pub async fn schedule_rfm(segmentation: Segmentation, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let started = std::time::Instant::now();
        match segmentation.recompute_all_rfm().await {
            Ok(members) => tracing::info!(
                members,
                seconds = started.elapsed().as_secs_f64(),
                "rfm scores recomputed"
            ),
            Err(err) => tracing::warn!(error = %err, "recomputing rfm scores failed"),
        }
    }
}

/// Evaluates every dynamic segment once, at start-up: a full evaluation that a crash cut
/// short (after a segment was saved) is finished here.
pub async fn evaluate_at_start(segmentation: Segmentation) {
    let started = std::time::Instant::now();
    match segmentation.reevaluate_all().await {
        Ok(changed) => tracing::info!(
            changed,
            seconds = started.elapsed().as_secs_f64(),
            "segments evaluated at start-up"
        ),
        Err(err) => tracing::warn!(error = %err, "evaluating segments at start-up failed"),
    }
}

/// Re-evaluates time-relative segments every `every`, for as long as the process runs.
pub async fn schedule(segmentation: Segmentation, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match segmentation.reevaluate_time_dependent().await {
            Ok(changed) if changed > 0 => {
                tracing::info!(changed, "time-relative segments re-evaluated");
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "re-evaluating segments failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use loyalty_platform::clock::DAY_MS;
    use loyalty_platform::grpc::timestamp;

    use super::*;

    fn purchase_event(purchase_time: Millis, event_time: Millis, member: &str) -> Vec<u8> {
        pb::Event {
            event_id: "purchase/t/r1".into(),
            tenant_id: "t".into(),
            event_time: Some(timestamp(event_time)),
            kind: Some(pb::event::Kind::Purchase(pb::PurchaseCommitted {
                receipt_id: "r1".into(),
                member_id: member.into(),
                purchase_time: Some(timestamp(purchase_time)),
                ..Default::default()
            })),
        }
        .encode_to_vec()
    }

    #[test]
    fn purchase_times_far_ahead_of_their_event_are_clamped() {
        let now = 1_750_000_000_000;
        let far = decode(&purchase_event(now + 900 * DAY_MS, now, "m")).unwrap();
        let Change::Purchase(p) = far.change else {
            panic!("a purchase")
        };
        assert_eq!(p.time, now + DAY_MS);
        let past = decode(&purchase_event(now - 3 * DAY_MS, now, "m")).unwrap();
        let Change::Purchase(p) = past.change else {
            panic!("a purchase")
        };
        assert_eq!(p.time, now - 3 * DAY_MS);
    }

    #[test]
    fn an_erasure_snapshot_is_an_erasure() {
        let event = |erased: bool| {
            pb::Event {
                event_id: "member/t/m1/3".into(),
                tenant_id: "t".into(),
                event_time: Some(timestamp(1_750_000_000_000)),
                kind: Some(pb::event::Kind::Member(pb::MemberChanged {
                    member_id: "m1".into(),
                    version: 3,
                    erased,
                    ..Default::default()
                })),
            }
            .encode_to_vec()
        };
        let erased = decode(&event(true)).unwrap();
        assert!(
            matches!(&erased.change, Change::Erasure(m) if m.version == 3 && m.birthday.is_none())
        );
        assert!(matches!(
            decode(&event(false)).unwrap().change,
            Change::Member(_)
        ));
    }

    #[test]
    fn a_ledger_entry_carries_its_sequence_and_balance() {
        let event = pb::Event {
            event_id: "ledger/t/m1/4".into(),
            tenant_id: "t".into(),
            event_time: Some(timestamp(1_750_000_000_000)),
            kind: Some(pb::event::Kind::Ledger(pb::LedgerEntryAppended {
                member_id: "m1".into(),
                sequence: 4,
                amount: -50,
                balance_after: 950,
                create_time: Some(timestamp(1_750_000_000_123)),
                ..Default::default()
            })),
        }
        .encode_to_vec();
        let change = decode(&event).unwrap();
        assert_eq!(change.member_id, "m1");
        assert_eq!(
            change.change,
            Change::Ledger(LedgerPoints {
                sequence: 4,
                total: 950,
                at: 1_750_000_000_123,
            })
        );
    }

    #[test]
    fn anonymous_and_undecodable_events_are_skipped() {
        assert!(decode(&purchase_event(1, 1, "")).is_none());
        assert!(decode(b"\xff\xff not protobuf").is_none());
    }
}
