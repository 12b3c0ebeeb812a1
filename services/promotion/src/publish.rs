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
            coupon_codes: e.coupon_codes,
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
            receipt_categories: e.receipt_categories,
            receipt_brands: e.receipt_brands,
            points_reversed: e.points_reversed,
            points_returned: e.points_returned,
            channel: channel_to_proto(e.channel),
            codes: e.codes,
            coupon_codes: e.coupon_codes,
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
/// receipt as its purchase event followed by its refunds' events. The cursor is (tenant,
/// receipt, how many of the receipt's events were sent; 0: all of them), so a receipt with
/// many large refunds spreads over pages.
///
/// Lines get their category and brand from the catalog as it is now (the store is kept with
/// the receipt): what checkout published when nothing changed since.
#[derive(Debug, Clone)]
pub struct PurchaseReplay(pub Arc<dyn PromotionStore>);

type PurchaseCursor = (String, String, u32);

impl PurchaseReplay {
    /// A stored receipt's events, in the order they were published.
    async fn events(&self, p: &crate::purchase::Purchase) -> Result<Vec<Vec<u8>>> {
        let (purchase, refunds) = stored_events(&*self.0, p).await?;
        Ok(purchase
            .map(encode_purchase)
            .into_iter()
            .chain(refunds.into_iter().map(encode_refund))
            .collect())
    }

    /// Adds `events` from `skip` on to `page`, stopping once it is full: the cursor to
    /// resume from then, `None` when every event went in.
    fn fill(
        page: &mut replay::Page,
        events: Vec<Vec<u8>>,
        skip: usize,
        limit: usize,
        at: (&str, &str),
    ) -> Option<Vec<u8>> {
        let total = events.len();
        for (n, event) in events.into_iter().enumerate().skip(skip) {
            page.events.push(event);
            if page.is_full(limit) {
                let sent = if n + 1 == total { 0 } else { n + 1 };
                return Some(replay::cursor(&(at.0, at.1, sent as u32)));
            }
        }
        None
    }
}

#[async_trait::async_trait]
impl EventSource for PurchaseReplay {
    async fn page(&self, cursor: &[u8], limit: usize) -> Result<replay::Page> {
        let mut page = replay::Page::default();
        let after = match replay::position::<PurchaseCursor>(cursor)? {
            None => None,
            Some((tenant, receipt, 0)) => Some((tenant, receipt)),
            // Inside a receipt: the rest of its events first.
            Some((tenant, receipt, sent)) => {
                if let Some(p) = self.0.purchase(&tenant, &receipt).await? {
                    let events = self.events(&p).await?;
                    let at = (tenant.as_str(), receipt.as_str());
                    if let Some(next) = Self::fill(&mut page, events, sent as usize, limit, at) {
                        page.next = Some(next);
                        return Ok(page);
                    }
                }
                Some((tenant, receipt))
            }
        };
        let purchases = self.0.purchases_after(after, limit).await?;
        for (n, p) in purchases.iter().enumerate() {
            // Reading a receipt's catalog is a few point reads on this task: let the
            // till's calls in between.
            tokio::task::yield_now().await;
            let events = self.events(p).await?;
            let at = (p.receipt.tenant_id.as_str(), p.receipt.receipt_id.as_str());
            if let Some(next) = Self::fill(&mut page, events, 0, limit, at) {
                page.next = Some(next);
                return Ok(page);
            }
            if n + 1 == limit {
                page.next = Some(replay::cursor(&(at.0, at.1, 0_u32)));
            }
        }
        Ok(page)
    }
}
