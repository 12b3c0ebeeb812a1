//! The thin gRPC adapter of the promotion service.

use loyalty_platform::audit::with_before;
use loyalty_platform::error::{Error, Violations};
use loyalty_platform::grpc::{channel, millis, timestamp, to_status};
use loyalty_proto::common::v1::Decimal as PbDecimal;
use loyalty_proto::promotion::v1 as pb;
use pb::campaign_service_server::{CampaignService, CampaignServiceServer};
use pb::catalog_service_server::{CatalogService, CatalogServiceServer};
use pb::checkout_service_server::{CheckoutService, CheckoutServiceServer};
use pb::program_service_server::{ProgramService, ProgramServiceServer};
use rust_decimal::Decimal;
use tonic::{Request, Response, Status};

use crate::Admin;
use crate::campaign::normalize_code;
use crate::catalog::{Product, Store};
use crate::checkout::{Checkout, Committed, Refunded};
use crate::evaluate::{Effect, Evaluation};
use crate::grpc_campaign::{
    campaign_from_proto, campaign_to_proto, coupon_to_proto, group_from_proto, group_to_proto,
    skip_reason_to, status_from,
};
use crate::program::{BaseAccrual, Program, Rounding, Tier, TierWindow};
use crate::purchase::{Purchase, PurchaseState};
use crate::receipt::{Identification, RawLine, Receipt, parse_decimal};
use crate::velocity::{Action, Subject, VelocityLimit, Window};

pub const SERVICE_NAMES: &[&str] = &[
    "loyalty.promotion.v1.CheckoutService",
    "loyalty.promotion.v1.ProgramService",
    "loyalty.promotion.v1.CatalogService",
    "loyalty.promotion.v1.CampaignService",
];

pub fn add_routes(
    routes: tonic::service::Routes,
    checkout: Checkout,
    admin: Admin,
    max_message_bytes: usize,
) -> tonic::service::Routes {
    let api = Api { checkout, admin };
    let m = max_message_bytes;
    routes
        .add_service(
            CheckoutServiceServer::new(api.clone())
                .max_decoding_message_size(m)
                .max_encoding_message_size(m),
        )
        .add_service(
            ProgramServiceServer::new(api.clone())
                .max_decoding_message_size(m)
                .max_encoding_message_size(m),
        )
        .add_service(
            CatalogServiceServer::new(api.clone())
                .max_decoding_message_size(m)
                .max_encoding_message_size(m),
        )
        .add_service(
            CampaignServiceServer::new(api)
                .max_decoding_message_size(m)
                .max_encoding_message_size(m),
        )
}

#[derive(Debug, Clone)]
struct Api {
    checkout: Checkout,
    admin: Admin,
}

fn dec(d: Decimal) -> Option<PbDecimal> {
    Some(PbDecimal {
        value: d.to_string(),
    })
}

fn receipt_from_proto(r: Option<pb::Receipt>) -> Result<Receipt, Error> {
    let r = r.ok_or_else(|| Error::invalid("receipt", "is required"))?;
    use pb::receipt::Identification as PbId;
    let identification = match r.identification {
        None => Identification::None,
        Some(PbId::CardNumber(c)) => Identification::Card(c),
        Some(PbId::MemberId(m)) => Identification::Member(m),
        Some(PbId::Phone(p)) => Identification::Phone(p),
    };
    let lines = r
        .lines
        .into_iter()
        .map(|l| RawLine {
            line_id: l.line_id,
            sku: l.sku,
            quantity: l.quantity.map(|d| d.value).unwrap_or_default(),
            unit_price: l.unit_price.map(|d| d.value).unwrap_or_default(),
            sale_price: l.sale_price,
        })
        .collect();
    Receipt::parse(
        r.tenant_id,
        r.receipt_id,
        r.store_id,
        channel(r.channel),
        r.terminal_id,
        r.cashier_id,
        identification,
        lines,
        r.codes,
        r.points_to_redeem,
        r.purchase_time.as_ref().map(millis),
    )
}

fn receipt_to_proto(r: &Receipt) -> pb::Receipt {
    use pb::receipt::Identification as PbId;
    pb::Receipt {
        tenant_id: r.tenant_id.clone(),
        receipt_id: r.receipt_id.clone(),
        store_id: r.store_id.clone(),
        channel: loyalty_platform::grpc::channel_to_proto(r.channel),
        terminal_id: r.terminal_id.clone(),
        cashier_id: r.cashier_id.clone(),
        identification: match &r.identification {
            Identification::None => None,
            Identification::Card(c) => Some(PbId::CardNumber(c.clone())),
            Identification::Member(m) => Some(PbId::MemberId(m.clone())),
            Identification::Phone(p) => Some(PbId::Phone(p.clone())),
        },
        lines: r
            .lines
            .iter()
            .map(|l| pb::ReceiptLine {
                line_id: l.line_id.clone(),
                sku: l.sku.clone(),
                quantity: dec(l.quantity),
                unit_price: dec(l.unit_price),
                sale_price: l.sale_price,
            })
            .collect(),
        codes: r.codes.clone(),
        points_to_redeem: r.points_to_redeem,
        purchase_time: r.purchase_time.map(timestamp),
    }
}

fn effect_to_proto(e: &Effect) -> pb::AppliedEffect {
    pb::AppliedEffect {
        campaign_id: e.campaign_id.to_string(),
        description: e.description.to_string(),
        discount: dec(e.discount),
        points: e.points,
    }
}

fn evaluation_to_proto(e: &Evaluation) -> pb::Evaluation {
    pb::Evaluation {
        lines: e
            .lines
            .iter()
            .map(|l| pb::LineResult {
                line_id: l.line_id.clone(),
                sku: l.sku.clone(),
                quantity: dec(l.quantity),
                gross_amount: dec(l.gross),
                discount: dec(l.discount),
                net_amount: dec(l.net),
                paid_with_points: dec(l.paid_with_points),
                points_accrued: l
                    .bonus_points
                    .iter()
                    .fold(l.points_accrued, |t, b| t.saturating_add(*b)),
                max_payable_with_points: dec(l.max_payable_with_points),
                effects: l.effects.iter().map(effect_to_proto).collect(),
                notes: l.notes.clone(),
            })
            .collect(),
        gross_amount: dec(e.gross),
        discount: dec(e.discount),
        net_amount: dec(e.net),
        amount_due: dec(e.amount_due),
        paid_with_points: dec(e.paid_with_points),
        points_redeemed: e.points_redeemed,
        points_accrued: e.total_points_accrued(),
        points_activate_time: Some(timestamp(e.activate_at)),
        points_expire_time: e.expire_at.map(timestamp),
        max_redeemable_points: e.max_redeemable_points,
        effects: e.effects.iter().map(effect_to_proto).collect(),
        skipped_campaigns: e
            .skipped
            .iter()
            .map(|s| pb::SkippedCampaign {
                campaign_id: s.campaign_id.to_string(),
                reason: skip_reason_to(s.reason),
                description: s.description.to_string(),
            })
            .collect(),
        member: e.member.as_ref().map(|m| pb::MemberContext {
            member_id: m.member_id.clone(),
            points_available: m.points_available,
            tier_id: m.tier_id.clone(),
        }),
        program_version: e.program_version,
        velocity_flags: e.velocity_flags.clone(),
    }
}

fn refund_to_proto(r: &Refunded) -> pb::RefundResponse {
    pb::RefundResponse {
        refund_id: r.refund_id.clone(),
        refunded_amount: dec(r.refunded_amount),
        points_reversed: r.outcome.points_reversed,
        points_unrecovered: r.outcome.points_unrecovered,
        points_returned: r.outcome.points_returned,
        points_balance: r.outcome.points_balance,
    }
}

/// The store a POS key is bound to, when the caller presents one: such a caller reads and
/// refunds only its own store's receipts. (Quote and commit name their store, which the
/// access layer checks.)
fn bound_store<T>(request: &Request<T>) -> Option<String> {
    let who = loyalty_platform::access::caller(request).ok()?;
    (who.role == loyalty_platform::access::Role::Pos && !who.store_id.is_empty())
        .then(|| who.store_id.clone())
}

fn of_store(p: &Purchase, store: &str) -> Result<(), Status> {
    if p.receipt.store_id == store {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "this API key is bound to store {store:?}; receipt {:?} was bought at another store (refunds at another store go through the back office)",
            p.receipt.receipt_id
        )))
    }
}

fn purchase_to_proto(p: &Purchase) -> pb::Purchase {
    pb::Purchase {
        receipt: Some(receipt_to_proto(&p.receipt)),
        evaluation: Some(evaluation_to_proto(&p.evaluation)),
        commit_time: match p.state {
            PurchaseState::Committed { commit_time, .. } => Some(timestamp(commit_time)),
            PurchaseState::Pending | PurchaseState::PendingOnHold { .. } => None,
        },
        refunds: p
            .refunds
            .iter()
            .filter_map(|r| {
                r.outcome.map(|outcome| {
                    refund_to_proto(&Refunded {
                        refund_id: r.refund_id.clone(),
                        refunded_amount: r.refunded_amount,
                        outcome,
                    })
                })
            })
            .collect(),
        pending_refund_ids: p.unsettled_refunds().map(|r| r.refund_id.clone()).collect(),
    }
}

fn rounding_from(v: i32, default: Rounding) -> Rounding {
    match pb::RoundingMode::try_from(v).unwrap_or(pb::RoundingMode::Unspecified) {
        pb::RoundingMode::Unspecified => default,
        pb::RoundingMode::Down => Rounding::Down,
        pb::RoundingMode::HalfUp => Rounding::HalfUp,
        pb::RoundingMode::Up => Rounding::Up,
    }
}

fn rounding_to(r: Rounding) -> i32 {
    (match r {
        Rounding::Down => pb::RoundingMode::Down,
        Rounding::HalfUp => pb::RoundingMode::HalfUp,
        Rounding::Up => pb::RoundingMode::Up,
    }) as i32
}

/// Reads an optional decimal field, with a default when absent.
fn decimal_field(
    v: &mut Violations,
    d: &Option<PbDecimal>,
    field: &str,
    default: Decimal,
) -> Decimal {
    match d {
        None => default,
        Some(d) if d.value.is_empty() => default,
        Some(d) => parse_decimal(&d.value, 6).unwrap_or_else(|why| {
            v.add(field, why);
            default
        }),
    }
}

fn program_from_proto(p: Option<pb::Program>) -> Result<Program, Error> {
    let p = p.ok_or_else(|| Error::invalid("program", "is required"))?;
    let mut v = Violations::new();
    let tiers: Vec<Tier> = p
        .tiers
        .iter()
        .enumerate()
        .map(|(i, t)| Tier {
            tier_id: t.tier_id.clone(),
            name: t.name.clone(),
            min_spend: decimal_field(
                &mut v,
                &t.min_spend,
                &format!("program.tiers[{i}].min_spend"),
                Decimal::ZERO,
            ),
            accrual_percent: decimal_field(
                &mut v,
                &t.accrual_percent,
                &format!("program.tiers[{i}].accrual_percent"),
                Decimal::ZERO,
            ),
        })
        .collect();
    let tier_window =
        match pb::TierWindow::try_from(p.tier_window).unwrap_or(pb::TierWindow::Unspecified) {
            pb::TierWindow::PreviousCalendarYear => TierWindow::PreviousCalendarYear,
            pb::TierWindow::Rolling12Months | pb::TierWindow::Unspecified => {
                TierWindow::Rolling12Months
            }
        };
    let accrual =
        match p.base_accrual {
            Some(pb::program::BaseAccrual::AccrualPercent(d)) => BaseAccrual::Percent(
                decimal_field(&mut v, &Some(d), "program.accrual_percent", Decimal::ZERO),
            ),
            Some(pb::program::BaseAccrual::AccrualFixedPoints(n)) => BaseAccrual::FixedPoints(n),
            None => {
                v.add(
                    "program.base_accrual",
                    "one of accrual_percent or accrual_fixed_points is required",
                );
                BaseAccrual::Percent(Decimal::ZERO)
            }
        };
    v.check(
        p.point_value.is_some(),
        "program.point_value",
        "is required",
    );
    let program = Program {
        tenant_id: p.tenant_id,
        currency: p.currency,
        point_minor_units: if p.point_minor_units == 0 {
            100
        } else {
            p.point_minor_units
        },
        accrual,
        point_value: decimal_field(&mut v, &p.point_value, "program.point_value", Decimal::ONE),
        max_redeem_percent: decimal_field(
            &mut v,
            &p.max_redeem_percent,
            "program.max_redeem_percent",
            Decimal::ZERO,
        ),
        min_paid_amount: decimal_field(
            &mut v,
            &p.min_paid_amount,
            "program.min_paid_amount",
            Decimal::ZERO,
        ),
        sale_excluded_from_accrual: p.sale_items_excluded_from_accrual,
        sale_excluded_from_redemption: p.sale_items_excluded_from_redemption,
        accrual_rounding: rounding_from(p.accrual_rounding, Rounding::Down),
        discount_rounding: rounding_from(p.discount_rounding, Rounding::HalfUp),
        activation_delay_days: p.activation_delay_days,
        point_lifetime_days: p.point_lifetime_days,
        max_line_discount_percent: decimal_field(
            &mut v,
            &p.max_line_discount_percent,
            "program.max_line_discount_percent",
            Decimal::ONE_HUNDRED,
        ),
        max_receipt_discount_percent: decimal_field(
            &mut v,
            &p.max_receipt_discount_percent,
            "program.max_receipt_discount_percent",
            Decimal::ONE_HUNDRED,
        ),
        refund_returns_redeemed_points: p.refund_returns_redeemed_points,
        sale_excluded_from_discounts: p.sale_items_excluded_from_discounts,
        tiers,
        tier_window,
        velocity_limits: p
            .velocity_limits
            .iter()
            .enumerate()
            .map(|(i, l)| velocity_from_proto(&mut v, i, l))
            .collect(),
        version: 0,
        updated_at: 0,
    };
    v.finish()?;
    Ok(program)
}

fn velocity_from_proto(v: &mut Violations, i: usize, l: &pb::VelocityLimit) -> VelocityLimit {
    let field = |name: &str| format!("program.velocity_limits[{i}].{name}");
    let subject = match pb::VelocitySubject::try_from(l.subject) {
        Ok(pb::VelocitySubject::Card) => Subject::Card,
        Ok(pb::VelocitySubject::Member) => Subject::Member,
        Ok(pb::VelocitySubject::Store) => Subject::Store,
        Ok(pb::VelocitySubject::Cashier) => Subject::Cashier,
        Ok(pb::VelocitySubject::Unspecified) | Err(_) => {
            v.add(field("subject"), "must be CARD, MEMBER, STORE or CASHIER");
            Subject::Card
        }
    };
    let action = match pb::VelocityAction::try_from(l.action) {
        Ok(pb::VelocityAction::Accrual) => Action::Accrual,
        Ok(pb::VelocityAction::Redemption) => Action::Redemption,
        Ok(pb::VelocityAction::Unspecified) | Err(_) => {
            v.add(field("action"), "must be ACCRUAL or REDEMPTION");
            Action::Accrual
        }
    };
    let window = match pb::VelocityWindow::try_from(l.window) {
        Ok(pb::VelocityWindow::Hour) => Window::Hour,
        Ok(pb::VelocityWindow::Day) => Window::Day,
        Ok(pb::VelocityWindow::Unspecified) | Err(_) => {
            v.add(field("window"), "must be HOUR or DAY");
            Window::Hour
        }
    };
    VelocityLimit {
        subject,
        action,
        window,
        max_receipts: l.max_receipts,
        max_points: l.max_points,
        hard: l.hard,
    }
}

fn velocity_to_proto(l: &VelocityLimit) -> pb::VelocityLimit {
    pb::VelocityLimit {
        subject: match l.subject {
            Subject::Card => pb::VelocitySubject::Card,
            Subject::Member => pb::VelocitySubject::Member,
            Subject::Store => pb::VelocitySubject::Store,
            Subject::Cashier => pb::VelocitySubject::Cashier,
        } as i32,
        action: match l.action {
            Action::Accrual => pb::VelocityAction::Accrual,
            Action::Redemption => pb::VelocityAction::Redemption,
        } as i32,
        window: match l.window {
            Window::Hour => pb::VelocityWindow::Hour,
            Window::Day => pb::VelocityWindow::Day,
        } as i32,
        max_receipts: l.max_receipts,
        max_points: l.max_points,
        hard: l.hard,
    }
}

pub fn program_to_proto(p: &Program) -> pb::Program {
    pb::Program {
        tenant_id: p.tenant_id.clone(),
        currency: p.currency.clone(),
        point_minor_units: p.point_minor_units,
        base_accrual: Some(match &p.accrual {
            BaseAccrual::Percent(d) => pb::program::BaseAccrual::AccrualPercent(PbDecimal {
                value: d.to_string(),
            }),
            BaseAccrual::FixedPoints(n) => pb::program::BaseAccrual::AccrualFixedPoints(*n),
        }),
        point_value: dec(p.point_value),
        max_redeem_percent: dec(p.max_redeem_percent),
        min_paid_amount: dec(p.min_paid_amount),
        sale_items_excluded_from_accrual: p.sale_excluded_from_accrual,
        sale_items_excluded_from_redemption: p.sale_excluded_from_redemption,
        accrual_rounding: rounding_to(p.accrual_rounding),
        discount_rounding: rounding_to(p.discount_rounding),
        activation_delay_days: p.activation_delay_days,
        point_lifetime_days: p.point_lifetime_days,
        max_line_discount_percent: dec(p.max_line_discount_percent),
        max_receipt_discount_percent: dec(p.max_receipt_discount_percent),
        refund_returns_redeemed_points: p.refund_returns_redeemed_points,
        tiers: p.tiers.iter().map(tier_to_proto).collect(),
        tier_window: (match p.tier_window {
            TierWindow::PreviousCalendarYear => pb::TierWindow::PreviousCalendarYear,
            TierWindow::Rolling12Months => pb::TierWindow::Rolling12Months,
        }) as i32,
        version: p.version,
        update_time: Some(timestamp(p.updated_at)),
        sale_items_excluded_from_discounts: p.sale_excluded_from_discounts,
        velocity_limits: p.velocity_limits.iter().map(velocity_to_proto).collect(),
    }
}

fn tier_to_proto(t: &Tier) -> pb::Tier {
    pb::Tier {
        tier_id: t.tier_id.clone(),
        name: t.name.clone(),
        min_spend: dec(t.min_spend),
        accrual_percent: dec(t.accrual_percent),
    }
}

fn committed_to_proto(c: &Committed) -> pb::CommitResponse {
    pb::CommitResponse {
        evaluation: Some(evaluation_to_proto(&c.evaluation)),
        points_balance: c.points_balance.unwrap_or(0),
        commit_time: Some(timestamp(c.commit_time)),
    }
}

#[tonic::async_trait]
impl CheckoutService for Api {
    async fn quote(
        &self,
        request: Request<pb::QuoteRequest>,
    ) -> Result<Response<pb::QuoteResponse>, Status> {
        let r = request.into_inner();
        let receipt = receipt_from_proto(r.receipt).map_err(to_status)?;
        let hold = Some(r.hold_id.as_str()).filter(|h| !h.is_empty());
        let e = self
            .checkout
            .quote(receipt, hold)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::QuoteResponse {
            evaluation: Some(evaluation_to_proto(&e)),
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let r = request.into_inner();
        let receipt = receipt_from_proto(r.receipt).map_err(to_status)?;
        let hold = Some(r.hold_id.as_str()).filter(|h| !h.is_empty());
        let c = self
            .checkout
            .commit(receipt, hold)
            .await
            .map_err(to_status)?;
        Ok(Response::new(committed_to_proto(&c)))
    }

    async fn refund(
        &self,
        request: Request<pb::RefundRequest>,
    ) -> Result<Response<pb::RefundResponse>, Status> {
        let bound = bound_store(&request);
        let r = request.into_inner();
        if let Some(store) = bound {
            let p = self
                .checkout
                .purchase(&r.tenant_id, &r.receipt_id)
                .await
                .map_err(to_status)?;
            of_store(&p, &store)?;
        }
        let lines: Vec<(String, String)> = r
            .lines
            .into_iter()
            .map(|l| (l.line_id, l.quantity.map(|q| q.value).unwrap_or_default()))
            .collect();
        let refunded = self
            .checkout
            .refund(&r.tenant_id, &r.receipt_id, &r.refund_id, &lines)
            .await
            .map_err(to_status)?;
        Ok(Response::new(refund_to_proto(&refunded)))
    }

    async fn get_purchase(
        &self,
        request: Request<pb::GetPurchaseRequest>,
    ) -> Result<Response<pb::GetPurchaseResponse>, Status> {
        let bound = bound_store(&request);
        let r = request.into_inner();
        let p = self
            .checkout
            .purchase(&r.tenant_id, &r.receipt_id)
            .await
            .map_err(to_status)?;
        if let Some(store) = bound {
            of_store(&p, &store)?;
        }
        Ok(Response::new(pb::GetPurchaseResponse {
            purchase: Some(purchase_to_proto(&p)),
        }))
    }

    async fn list_purchases(
        &self,
        request: Request<pb::ListPurchasesRequest>,
    ) -> Result<Response<pb::ListPurchasesResponse>, Status> {
        let r = request.into_inner();
        let (items, next) = self
            .checkout
            .list_purchases(&r.tenant_id, &r.member_id, r.page_size, &r.page_token)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListPurchasesResponse {
            purchases: items.iter().map(purchase_to_proto).collect(),
            next_page_token: next,
        }))
    }

    async fn replay_purchase_events(
        &self,
        request: Request<pb::ReplayPurchaseEventsRequest>,
    ) -> Result<Response<pb::ReplayPurchaseEventsResponse>, Status> {
        let r = request.into_inner();
        let source = crate::publish::PurchaseReplay(self.checkout.store().clone());
        let (events, next_cursor) =
            loyalty_platform::replay::answer(&source, &r.cursor, r.limit).await?;
        Ok(Response::new(pb::ReplayPurchaseEventsResponse {
            events,
            next_cursor,
        }))
    }
}

#[tonic::async_trait]
impl ProgramService for Api {
    async fn get_program(
        &self,
        request: Request<pb::GetProgramRequest>,
    ) -> Result<Response<pb::GetProgramResponse>, Status> {
        let p = self
            .admin
            .program(&request.into_inner().tenant_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetProgramResponse {
            program: Some(program_to_proto(&p)),
        }))
    }

    async fn update_program(
        &self,
        request: Request<pb::UpdateProgramRequest>,
    ) -> Result<Response<pb::UpdateProgramResponse>, Status> {
        let r = request.into_inner();
        let program = program_from_proto(r.program).map_err(to_status)?;
        let (before, saved) = self
            .admin
            .update_program(program, r.expected_version)
            .await
            .map_err(to_status)?;
        let response = Response::new(pb::UpdateProgramResponse {
            program: Some(program_to_proto(&saved)),
        });
        Ok(match before {
            Some(before) => with_before(
                response,
                &pb::UpdateProgramResponse {
                    program: Some(program_to_proto(&before)),
                },
            ),
            None => response,
        })
    }

    async fn get_member_tier(
        &self,
        request: Request<pb::GetMemberTierRequest>,
    ) -> Result<Response<pb::GetMemberTierResponse>, Status> {
        let r = request.into_inner();
        let s = self
            .admin
            .member_tier(&r.tenant_id, &r.member_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetMemberTierResponse {
            tier: s.tier.as_ref().map(tier_to_proto),
            next_tier: s.next.as_ref().map(tier_to_proto),
            spend_in_window: dec(s.spend),
            missing_for_next_tier: dec(s.missing),
        }))
    }
}

#[tonic::async_trait]
impl CatalogService for Api {
    async fn upsert_stores(
        &self,
        request: Request<pb::UpsertStoresRequest>,
    ) -> Result<Response<pb::UpsertStoresResponse>, Status> {
        let r = request.into_inner();
        let stores: Vec<Store> = r
            .stores
            .into_iter()
            .map(|s| Store {
                store_id: s.store_id,
                name: s.name,
                brand: s.brand,
                region: s.region,
                time_zone: s.time_zone,
            })
            .collect();
        let n = self
            .admin
            .upsert_stores(&r.tenant_id, &stores)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::UpsertStoresResponse {
            upserted_count: i32::try_from(n).unwrap_or(i32::MAX),
        }))
    }

    async fn list_stores(
        &self,
        request: Request<pb::ListStoresRequest>,
    ) -> Result<Response<pb::ListStoresResponse>, Status> {
        let r = request.into_inner();
        let (stores, next) = self
            .admin
            .list_stores(&r.tenant_id, r.page_size, &r.page_token)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListStoresResponse {
            stores: stores
                .into_iter()
                .map(|s| pb::Store {
                    tenant_id: r.tenant_id.clone(),
                    store_id: s.store_id,
                    name: s.name,
                    brand: s.brand,
                    region: s.region,
                    time_zone: s.time_zone,
                })
                .collect(),
            next_page_token: next,
        }))
    }

    async fn upsert_products(
        &self,
        request: Request<pb::UpsertProductsRequest>,
    ) -> Result<Response<pb::UpsertProductsResponse>, Status> {
        let r = request.into_inner();
        let products: Vec<Product> = r
            .products
            .into_iter()
            .map(|p| Product {
                sku: p.sku,
                name: p.name,
                category: p.category,
                brand: p.brand,
            })
            .collect();
        let n = self
            .admin
            .upsert_products(&r.tenant_id, &products)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::UpsertProductsResponse {
            upserted_count: i32::try_from(n).unwrap_or(i32::MAX),
        }))
    }

    async fn list_products(
        &self,
        request: Request<pb::ListProductsRequest>,
    ) -> Result<Response<pb::ListProductsResponse>, Status> {
        let r = request.into_inner();
        let (products, next) = self
            .admin
            .list_products(&r.tenant_id, r.page_size, &r.page_token)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListProductsResponse {
            products: products
                .into_iter()
                .map(|p| pb::Product {
                    tenant_id: r.tenant_id.clone(),
                    sku: p.sku,
                    name: p.name,
                    category: p.category,
                    brand: p.brand,
                })
                .collect(),
            next_page_token: next,
        }))
    }
}

fn actor(a: Option<loyalty_proto::common::v1::Actor>) -> String {
    a.map(|a| a.id)
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn checked_actor(a: Option<loyalty_proto::common::v1::Actor>) -> Result<String, Status> {
    let id = actor(a);
    if id.len() > 200 {
        return Err(to_status(Error::invalid(
            "actor.id",
            "at most 200 characters",
        )));
    }
    Ok(id)
}

#[tonic::async_trait]
impl CampaignService for Api {
    async fn create_campaign(
        &self,
        request: Request<pb::CreateCampaignRequest>,
    ) -> Result<Response<pb::CreateCampaignResponse>, Status> {
        let r = request.into_inner();
        let who = checked_actor(r.actor)?;
        let c = campaign_from_proto(r.campaign).map_err(to_status)?;
        let saved = self
            .admin
            .create_campaign(c, &who)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CreateCampaignResponse {
            campaign: Some(campaign_to_proto(&saved)),
        }))
    }

    async fn update_campaign(
        &self,
        request: Request<pb::UpdateCampaignRequest>,
    ) -> Result<Response<pb::UpdateCampaignResponse>, Status> {
        let r = request.into_inner();
        let who = checked_actor(r.actor)?;
        let c = campaign_from_proto(r.campaign).map_err(to_status)?;
        let (before, saved) = self
            .admin
            .update_campaign(c, r.expected_version, &who)
            .await
            .map_err(to_status)?;
        Ok(with_before(
            Response::new(pb::UpdateCampaignResponse {
                campaign: Some(campaign_to_proto(&saved)),
            }),
            &pb::UpdateCampaignResponse {
                campaign: Some(campaign_to_proto(&before)),
            },
        ))
    }

    async fn get_campaign(
        &self,
        request: Request<pb::GetCampaignRequest>,
    ) -> Result<Response<pb::GetCampaignResponse>, Status> {
        let r = request.into_inner();
        let c = self
            .admin
            .campaign(&r.tenant_id, &r.campaign_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetCampaignResponse {
            campaign: Some(campaign_to_proto(&c)),
        }))
    }

    async fn list_campaigns(
        &self,
        request: Request<pb::ListCampaignsRequest>,
    ) -> Result<Response<pb::ListCampaignsResponse>, Status> {
        let r = request.into_inner();
        let mut v = Violations::new();
        let statuses: Vec<_> = r
            .statuses
            .iter()
            .map(|s| match pb::CampaignStatus::try_from(*s) {
                Ok(pb::CampaignStatus::Archived) => crate::campaign::CampaignStatus::Archived,
                _ => status_from(&mut v, *s, "statuses"),
            })
            .collect();
        v.finish().map_err(to_status)?;
        let (items, next) = self
            .admin
            .list_campaigns(&r.tenant_id, &statuses, r.page_size, &r.page_token)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListCampaignsResponse {
            campaigns: items.iter().map(campaign_to_proto).collect(),
            next_page_token: next,
        }))
    }

    async fn archive_campaign(
        &self,
        request: Request<pb::ArchiveCampaignRequest>,
    ) -> Result<Response<pb::ArchiveCampaignResponse>, Status> {
        let r = request.into_inner();
        let who = checked_actor(r.actor)?;
        let (before, c) = self
            .admin
            .archive_campaign(&r.tenant_id, &r.campaign_id, &who)
            .await
            .map_err(to_status)?;
        Ok(with_before(
            Response::new(pb::ArchiveCampaignResponse {
                campaign: Some(campaign_to_proto(&c)),
            }),
            &pb::ArchiveCampaignResponse {
                campaign: Some(campaign_to_proto(&before)),
            },
        ))
    }

    async fn upsert_stacking_group(
        &self,
        request: Request<pb::UpsertStackingGroupRequest>,
    ) -> Result<Response<pb::UpsertStackingGroupResponse>, Status> {
        let r = request.into_inner();
        checked_actor(r.actor)?;
        let g = group_from_proto(r.group).map_err(to_status)?;
        let saved = self.admin.upsert_group(g).await.map_err(to_status)?;
        Ok(Response::new(pb::UpsertStackingGroupResponse {
            group: Some(group_to_proto(&saved)),
        }))
    }

    async fn list_stacking_groups(
        &self,
        request: Request<pb::ListStackingGroupsRequest>,
    ) -> Result<Response<pb::ListStackingGroupsResponse>, Status> {
        let r = request.into_inner();
        let groups = self.admin.groups(&r.tenant_id).await.map_err(to_status)?;
        Ok(Response::new(pb::ListStackingGroupsResponse {
            groups: groups.iter().map(group_to_proto).collect(),
        }))
    }

    async fn generate_coupons(
        &self,
        request: Request<pb::GenerateCouponsRequest>,
    ) -> Result<Response<pb::GenerateCouponsResponse>, Status> {
        let r = request.into_inner();
        let codes = self
            .admin
            .generate_coupons(
                &r.tenant_id,
                &r.campaign_id,
                r.count,
                &r.member_id,
                r.expire_time.as_ref().map(millis),
                &r.idempotency_key,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GenerateCouponsResponse { codes }))
    }

    async fn get_coupon(
        &self,
        request: Request<pb::GetCouponRequest>,
    ) -> Result<Response<pb::GetCouponResponse>, Status> {
        let r = request.into_inner();
        let (c, uses) = self
            .admin
            .coupon(&r.tenant_id, &normalize_code(&r.code))
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetCouponResponse {
            coupon: Some(coupon_to_proto(&c, uses)),
        }))
    }

    async fn export_campaigns(
        &self,
        request: Request<pb::ExportCampaignsRequest>,
    ) -> Result<Response<pb::ExportCampaignsResponse>, Status> {
        let r = request.into_inner();
        let doc = self
            .admin
            .export_campaigns(&r.tenant_id)
            .await
            .map_err(to_status)?;
        let json = serde_json::to_string_pretty(&doc).map_err(|e| to_status(Error::internal(e)))?;
        Ok(Response::new(pb::ExportCampaignsResponse { json }))
    }

    async fn import_campaigns(
        &self,
        request: Request<pb::ImportCampaignsRequest>,
    ) -> Result<Response<pb::ImportCampaignsResponse>, Status> {
        let r = request.into_inner();
        let who = checked_actor(r.actor)?;
        let n = self
            .admin
            .import_campaigns(&r.tenant_id, &r.json, &who)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ImportCampaignsResponse {
            imported_count: i32::try_from(n).unwrap_or(i32::MAX),
        }))
    }

    async fn list_campaign_versions(
        &self,
        request: Request<pb::ListCampaignVersionsRequest>,
    ) -> Result<Response<pb::ListCampaignVersionsResponse>, Status> {
        let r = request.into_inner();
        let (items, next) = self
            .admin
            .campaign_versions(&r.tenant_id, &r.campaign_id, r.page_size, &r.page_token)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListCampaignVersionsResponse {
            versions: items.iter().map(campaign_to_proto).collect(),
            next_page_token: next,
        }))
    }
}
