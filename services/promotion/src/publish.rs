//! The adapter from promotion's events to the event stream: each event encoded as a
//! `loyalty.events.v1.Event` and appended to `events::PURCHASES`.

use std::sync::Arc;

use loyalty_platform::error::Result;
use loyalty_platform::events::{PURCHASES, SharedEventLog};
use loyalty_platform::grpc::{channel_to_proto, timestamp};
use loyalty_platform::replay::{self, EventSource};
use loyalty_proto::common::v1::Decimal as PbDecimal;
use loyalty_proto::events::v1 as pb;
use prost::Message;
use rust_decimal::Decimal;

use crate::checkout::stored_events;
use crate::events::{Events, LineFact, PurchaseEvent, RefundEvent};
use crate::store::PromotionStore;

#[derive(Debug, Clone)]
pub struct LogEvents {
    log: SharedEventLog,
}

impl LogEvents {
    pub fn new(log: SharedEventLog) -> Self {
        Self { log }
    }
}

fn dec(d: Decimal) -> Option<PbDecimal> {
    Some(PbDecimal {
        value: d.normalize().to_string(),
    })
}

fn date(day: i64) -> loyalty_proto::common::v1::Date {
    let (year, month, day) = loyalty_platform::calendar::civil(day);
    loyalty_proto::common::v1::Date {
        year,
        month: month as i32,
        day: day as i32,
    }
}

fn lines(lines: Vec<LineFact>) -> Vec<pb::Line> {
    lines
        .into_iter()
        .map(|l| pb::Line {
            sku: l.sku,
            category: l.category,
            brand: l.brand,
            quantity: dec(l.quantity),
            paid: dec(l.paid),
            sale_price: l.sale_price,
        })
        .collect()
}

pub fn encode_purchase(e: PurchaseEvent) -> Vec<u8> {
    pb::Event {
        event_id: e.event_id(),
        tenant_id: e.tenant_id,
        event_time: Some(timestamp(e.commit_time)),
        kind: Some(pb::event::Kind::Purchase(pb::PurchaseCommitted {
            receipt_id: e.receipt_id,
            store_id: e.store_id,
            cashier_id: e.cashier_id,
            channel: channel_to_proto(e.channel),
            member_id: e.member_id.unwrap_or_default(),
            purchase_time: Some(timestamp(e.purchase_time)),
            lines: lines(e.lines),
            gross: dec(e.gross),
            discount: dec(e.discount),
            paid: dec(e.paid),
            points_accrued: e.points_accrued,
            points_redeemed: e.points_redeemed,
            points_balance: e.points_balance,
            tier_id: e.tier_id,
            codes: e.codes,
            campaign_ids: e.campaign_ids,
            held_out_campaign_ids: e.held_out_campaign_ids,
            bonus_points: e.bonus_points,
            business_day: Some(date(e.business_day)),
            store_brand: e.store.brand,
            store_region: e.store.region,
            store_time_zone: e.store.time_zone,
        })),
    }
    .encode_to_vec()
}

pub fn encode_refund(e: RefundEvent) -> Vec<u8> {
    pb::Event {
        event_id: e.event_id(),
        tenant_id: e.tenant_id,
        event_time: Some(timestamp(e.refund_time)),
        kind: Some(pb::event::Kind::Refund(pb::RefundCommitted {
            receipt_id: e.receipt_id,
            refund_id: e.refund_id,
            store_id: e.store_id,
            member_id: e.member_id.unwrap_or_default(),
            purchase_time: Some(timestamp(e.purchase_time)),
            lines: lines(e.lines),
            refunded: dec(e.refunded),
            receipt_fully_refunded: e.receipt_fully_refunded,
            points_reversed: e.points_reversed,
            points_returned: e.points_returned,
            channel: channel_to_proto(e.channel),
            codes: e.codes,
            campaign_ids: e.campaign_ids,
            held_out_campaign_ids: e.held_out_campaign_ids,
            business_day: Some(date(e.business_day)),
            store_brand: e.store.brand,
            store_region: e.store.region,
            store_time_zone: e.store.time_zone,
        })),
    }
    .encode_to_vec()
}

#[async_trait::async_trait]
impl Events for LogEvents {
    async fn purchase_committed(&self, event: PurchaseEvent) -> Result<()> {
        self.log.append(PURCHASES, &[encode_purchase(event)]).await
    }

    async fn refund_committed(&self, event: RefundEvent) -> Result<()> {
        self.log.append(PURCHASES, &[encode_refund(event)]).await
    }
}

/// The purchase history replayed: receipts in (tenant, receipt id) order, each committed
/// receipt as its purchase event followed by its refunds' events. The cursor is the last
/// receipt a page holds.
#[derive(Debug, Clone)]
pub struct PurchaseReplay(pub Arc<dyn PromotionStore>);

#[async_trait::async_trait]
impl EventSource for PurchaseReplay {
    async fn page(&self, cursor: &[u8], limit: usize) -> Result<replay::Page> {
        let after = replay::position::<(String, String)>(cursor)?;
        let purchases = self.0.purchases_after(after, limit).await?;
        let mut page = replay::Page::default();
        for (n, p) in purchases.iter().enumerate() {
            let (purchase, refunds) = stored_events(&*self.0, p).await?;
            page.events.extend(purchase.map(encode_purchase));
            page.events.extend(refunds.into_iter().map(encode_refund));
            if page.is_full(limit) || n + 1 == limit {
                let at = (&p.receipt.tenant_id, &p.receipt.receipt_id);
                page.next = Some(replay::cursor(&at));
                break;
            }
        }
        Ok(page)
    }
}
