//! The thin gRPC adapter of the balance service.

use loyalty_platform::audit::with_before;
use loyalty_platform::error::Error;
use loyalty_platform::grpc::{millis, timestamp, to_status};
use loyalty_proto::balance::v1 as pb;
use loyalty_proto::common::v1 as common;
use pb::balance_service_server::{BalanceService, BalanceServiceServer};
use pb::gift_certificate_service_server::{GiftCertificateService, GiftCertificateServiceServer};
use tonic::{Request, Response, Status};

use crate::certificate::{Certificate, GiftCertificates, Status as CertStatus};
use crate::ledger::{self, Actor, BalanceView, Entry, HoldState, Op, OpRecord, Reason};
use crate::service::Balance;

pub const SERVICE_NAMES: &[&str] = &[
    "loyalty.balance.v1.BalanceService",
    "loyalty.balance.v1.GiftCertificateService",
];

pub fn add_routes(
    routes: tonic::service::Routes,
    balance: Balance,
    certificates: GiftCertificates,
    max_message_bytes: usize,
) -> tonic::service::Routes {
    let api = Api(balance);
    routes
        .add_service(
            BalanceServiceServer::new(api)
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
        )
        .add_service(
            GiftCertificateServiceServer::new(CertificatesApi(certificates))
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
        )
}

#[derive(Debug, Clone)]
struct Api(Balance);

#[derive(Debug, Clone)]
struct CertificatesApi(GiftCertificates);

pub fn reason_to_proto(r: Reason) -> pb::EntryReason {
    match r {
        Reason::Accrual => pb::EntryReason::Accrual,
        Reason::Redemption => pb::EntryReason::Redemption,
        Reason::RefundReversal => pb::EntryReason::RefundReversal,
        Reason::RedemptionReversal => pb::EntryReason::RedemptionReversal,
        Reason::ReferralBonus => pb::EntryReason::ReferralBonus,
        Reason::SurveyBonus => pb::EntryReason::SurveyBonus,
        Reason::RegistrationBonus => pb::EntryReason::RegistrationBonus,
        Reason::CampaignBonus => pb::EntryReason::CampaignBonus,
        Reason::OpeningBalance => pb::EntryReason::OpeningBalance,
        Reason::Expiry => pb::EntryReason::Expiry,
        Reason::ManualAdjustment => pb::EntryReason::ManualAdjustment,
        Reason::MergeTransfer => pb::EntryReason::MergeTransfer,
    }
}

/// Whether our own services (which checked the member with identity already) sent this.
/// Tills, apps and the back office calling balance directly are checked here: a member
/// identity blocked or erased earns, spends and holds nothing.
fn from_our_services<T>(request: &Request<T>) -> bool {
    loyalty_platform::access::caller(request)
        .is_ok_and(|p| p.role == loyalty_platform::access::Role::Service)
}

/// Keys checkout derives from receipt ids (`receipt:<id>:...`) are its own. An
/// authenticated caller other than our services may not use one, so it cannot take a key
/// that a receipt's commit or refund will need and leave that receipt unable to finish.
/// (With authentication off every caller is trusted, our peers included.)
fn checkout_key<T>(request: &Request<T>, field: &str, key: &str) -> Result<(), Status> {
    let restricted = loyalty_platform::access::caller(request).is_ok_and(|p| {
        p.role != loyalty_platform::access::Role::Service
            && *p != loyalty_platform::access::Principal::unrestricted()
    });
    if key.starts_with(CHECKOUT_KEY_PREFIX) && restricted {
        return Err(to_status(Error::invalid(
            field,
            format!("keys starting with {CHECKOUT_KEY_PREFIX:?} are reserved for checkout"),
        )));
    }
    Ok(())
}

/// What every key of checkout's points operations starts with.
const CHECKOUT_KEY_PREFIX: &str = "receipt:";

/// Reasons a caller may give an accrual.
fn accrual_reason(value: i32) -> Result<Reason, Error> {
    match pb::EntryReason::try_from(value) {
        Ok(pb::EntryReason::Unspecified | pb::EntryReason::Accrual) => Ok(Reason::Accrual),
        Ok(pb::EntryReason::ReferralBonus) => Ok(Reason::ReferralBonus),
        Ok(pb::EntryReason::SurveyBonus) => Ok(Reason::SurveyBonus),
        Ok(pb::EntryReason::RegistrationBonus) => Ok(Reason::RegistrationBonus),
        Ok(pb::EntryReason::CampaignBonus) => Ok(Reason::CampaignBonus),
        Ok(pb::EntryReason::OpeningBalance) => Ok(Reason::OpeningBalance),
        Ok(
            pb::EntryReason::Redemption
            | pb::EntryReason::Expiry
            | pb::EntryReason::ManualAdjustment
            | pb::EntryReason::RefundReversal
            | pb::EntryReason::RedemptionReversal
            | pb::EntryReason::MergeTransfer,
        )
        | Err(_) => Err(Error::invalid("reason", "is not an accrual reason")),
    }
}

pub fn entry_to_proto(tenant_id: &str, member_id: &str, e: &Entry) -> pb::LedgerEntry {
    pb::LedgerEntry {
        tenant_id: tenant_id.to_string(),
        member_id: member_id.to_string(),
        sequence: e.seq,
        reason: reason_to_proto(e.reason) as i32,
        amount: e.amount,
        balance_after: e.balance_after,
        idempotency_key: e.key.clone(),
        reference: e.reference.clone(),
        create_time: Some(timestamp(e.created_at)),
        activate_time: e.activate_at.map(timestamp),
        expire_time: e.expire_at.map(timestamp),
        actor: e.actor.as_ref().map(|a| common::Actor {
            id: a.id.clone(),
            comment: a.comment.clone(),
        }),
    }
}

pub fn balance_to_proto(tenant_id: &str, member_id: &str, b: &BalanceView) -> pb::Balance {
    pb::Balance {
        tenant_id: tenant_id.to_string(),
        member_id: member_id.to_string(),
        active: b.active,
        pending: b.pending,
        held: b.held,
        next_expiry: b.next_expiry.map(|(amount, at)| pb::Expiry {
            amount,
            expire_time: Some(timestamp(at)),
        }),
        lifetime_accrued: b.lifetime_accrued,
        lifetime_redeemed: b.lifetime_redeemed,
        lifetime_expired: b.lifetime_expired,
        ledger_sequence: b.seq,
    }
}

/// Any reason, for filters.
fn any_reason(value: i32, field: &str) -> Result<Reason, Error> {
    let r = match pb::EntryReason::try_from(value) {
        Ok(pb::EntryReason::Accrual) => Reason::Accrual,
        Ok(pb::EntryReason::Redemption) => Reason::Redemption,
        Ok(pb::EntryReason::Expiry) => Reason::Expiry,
        Ok(pb::EntryReason::ManualAdjustment) => Reason::ManualAdjustment,
        Ok(pb::EntryReason::RefundReversal) => Reason::RefundReversal,
        Ok(pb::EntryReason::RedemptionReversal) => Reason::RedemptionReversal,
        Ok(pb::EntryReason::ReferralBonus) => Reason::ReferralBonus,
        Ok(pb::EntryReason::SurveyBonus) => Reason::SurveyBonus,
        Ok(pb::EntryReason::RegistrationBonus) => Reason::RegistrationBonus,
        Ok(pb::EntryReason::MergeTransfer) => Reason::MergeTransfer,
        Ok(pb::EntryReason::OpeningBalance) => Reason::OpeningBalance,
        Ok(pb::EntryReason::CampaignBonus) => Reason::CampaignBonus,
        Ok(pb::EntryReason::Unspecified) | Err(_) => {
            return Err(Error::invalid(field, "is not a ledger entry reason"));
        }
    };
    Ok(r)
}

fn hold_status(state: Option<HoldState>) -> pb::HoldStatus {
    match state {
        Some(HoldState::Open) | None => pb::HoldStatus::Open,
        Some(HoldState::Confirmed) => pb::HoldStatus::Confirmed,
        Some(HoldState::Cancelled) => pb::HoldStatus::Cancelled,
        Some(HoldState::Expired) => pb::HoldStatus::Expired,
    }
}

fn entry_of(tenant_id: &str, member_id: &str, record: &OpRecord) -> Option<pb::LedgerEntry> {
    record
        .reply
        .entry
        .as_ref()
        .map(|e| entry_to_proto(tenant_id, member_id, e))
}

fn balance_of(tenant_id: &str, member_id: &str, record: &OpRecord) -> Option<pb::Balance> {
    Some(balance_to_proto(
        tenant_id,
        member_id,
        &record.reply.balance,
    ))
}

fn accrue_op(
    amount: i64,
    reason: i32,
    reference: String,
    activate: Option<&prost_types::Timestamp>,
    expire: Option<&prost_types::Timestamp>,
) -> Result<Op, Error> {
    Ok(Op::Accrue {
        amount,
        reason: accrual_reason(reason)?,
        reference,
        activate_at: activate.map(millis),
        expire_at: expire.map(millis),
    })
}

/// Whether an admin made the call: the access layer audits it, with the balance before.
fn by_admin<T>(request: &Request<T>) -> bool {
    loyalty_platform::access::caller(request)
        .is_ok_and(|p| p.role == loyalty_platform::access::Role::Admin)
}

impl Api {
    /// For an admin's call, the member's balance just before the change; None for everyone
    /// else, so tills and our services pay no extra read.
    async fn before(&self, admin: bool, tenant_id: &str, member_id: &str) -> Option<pb::Balance> {
        if !admin {
            return None;
        }
        let view = self.0.balance(tenant_id, member_id).await.ok()?;
        Some(balance_to_proto(tenant_id, member_id, &view))
    }
}

/// Attaches `before` for the audit record, unless the call was a replay (the same key again
/// changes nothing, so the ledger did not move past `before`): `record` is the call's.
fn with_balance_before<T: prost::Message>(
    response: Response<T>,
    before: Option<pb::Balance>,
    record: &OpRecord,
    shape: impl FnOnce(pb::Balance) -> T,
) -> Response<T> {
    match before {
        Some(b) if b.ledger_sequence < record.reply.balance.seq => with_before(response, &shape(b)),
        _ => response,
    }
}

#[tonic::async_trait]
impl BalanceService for Api {
    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceResponse>, Status> {
        let r = request.into_inner();
        let view = self
            .0
            .balance(&r.tenant_id, &r.member_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetBalanceResponse {
            balance: Some(balance_to_proto(&r.tenant_id, &r.member_id, &view)),
        }))
    }

    async fn accrue(
        &self,
        request: Request<pb::AccrueRequest>,
    ) -> Result<Response<pb::AccrueResponse>, Status> {
        let ours = from_our_services(&request);
        let admin = by_admin(&request);
        checkout_key(
            &request,
            "idempotency_key",
            &request.get_ref().idempotency_key,
        )?;
        let r = request.into_inner();
        let before = self.before(admin, &r.tenant_id, &r.member_id).await;
        if !ours {
            self.0
                .check_member(&r.tenant_id, &r.member_id, &r.idempotency_key)
                .await
                .map_err(to_status)?;
        }
        let op = accrue_op(
            r.amount,
            r.reason,
            r.reference,
            r.activate_time.as_ref(),
            r.expire_time.as_ref(),
        )
        .map_err(to_status)?;
        let record = self
            .0
            .execute(&r.tenant_id, &r.member_id, &r.idempotency_key, op)
            .await
            .map_err(to_status)?;
        let response = Response::new(pb::AccrueResponse {
            entry: entry_of(&r.tenant_id, &r.member_id, &record),
            balance: balance_of(&r.tenant_id, &r.member_id, &record),
        });
        Ok(with_balance_before(response, before, &record, |b| {
            pb::AccrueResponse {
                entry: None,
                balance: Some(b),
            }
        }))
    }

    async fn redeem(
        &self,
        request: Request<pb::RedeemRequest>,
    ) -> Result<Response<pb::RedeemResponse>, Status> {
        let ours = from_our_services(&request);
        let admin = by_admin(&request);
        checkout_key(
            &request,
            "idempotency_key",
            &request.get_ref().idempotency_key,
        )?;
        let r = request.into_inner();
        let before = self.before(admin, &r.tenant_id, &r.member_id).await;
        if !ours {
            self.0
                .check_member(&r.tenant_id, &r.member_id, &r.idempotency_key)
                .await
                .map_err(to_status)?;
        }
        let op = Op::Redeem {
            amount: r.amount,
            reference: r.reference,
            up_to_available: r.up_to_available,
        };
        let record = self
            .0
            .execute(&r.tenant_id, &r.member_id, &r.idempotency_key, op)
            .await
            .map_err(to_status)?;
        let response = Response::new(pb::RedeemResponse {
            entry: entry_of(&r.tenant_id, &r.member_id, &record),
            balance: balance_of(&r.tenant_id, &r.member_id, &record),
        });
        Ok(with_balance_before(response, before, &record, |b| {
            pb::RedeemResponse {
                entry: None,
                balance: Some(b),
            }
        }))
    }

    async fn hold(
        &self,
        request: Request<pb::HoldRequest>,
    ) -> Result<Response<pb::HoldResponse>, Status> {
        let ours = from_our_services(&request);
        checkout_key(
            &request,
            "idempotency_key",
            &request.get_ref().idempotency_key,
        )?;
        let r = request.into_inner();
        if !ours {
            self.0
                .check_member(&r.tenant_id, &r.member_id, &r.idempotency_key)
                .await
                .map_err(to_status)?;
        }
        let timeout_ms = match r.timeout_seconds {
            0 => ledger::DEFAULT_HOLD_TIMEOUT_MS,
            s if s < 0 => {
                return Err(to_status(Error::invalid(
                    "timeout_seconds",
                    "must not be negative",
                )));
            }
            s => i64::from(s) * 1000,
        };
        let op = Op::Hold {
            amount: r.amount,
            reference: r.reference,
            timeout_ms,
        };
        let hold = self
            .0
            .hold(&r.tenant_id, &r.member_id, &r.idempotency_key, op)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::HoldResponse {
            hold_id: hold.hold_id,
            status: hold_status(Some(hold.state)) as i32,
            expire_time: hold.expire_at.map(timestamp),
            balance: balance_of(&r.tenant_id, &r.member_id, &hold.record),
        }))
    }

    async fn confirm_hold(
        &self,
        request: Request<pb::ConfirmHoldRequest>,
    ) -> Result<Response<pb::ConfirmHoldResponse>, Status> {
        checkout_key(
            &request,
            "idempotency_key",
            &request.get_ref().idempotency_key,
        )?;
        let r = request.into_inner();
        if r.amount < 0 {
            return Err(to_status(Error::invalid("amount", "must not be negative")));
        }
        let (member, record) = self
            .0
            .resolve_hold(&r.tenant_id, &r.hold_id, &r.idempotency_key, Some(r.amount))
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ConfirmHoldResponse {
            entry: entry_of(&r.tenant_id, &member, &record),
            balance: balance_of(&r.tenant_id, &member, &record),
        }))
    }

    async fn cancel_hold(
        &self,
        request: Request<pb::CancelHoldRequest>,
    ) -> Result<Response<pb::CancelHoldResponse>, Status> {
        checkout_key(
            &request,
            "idempotency_key",
            &request.get_ref().idempotency_key,
        )?;
        let r = request.into_inner();
        let (member, record) = self
            .0
            .resolve_hold(&r.tenant_id, &r.hold_id, &r.idempotency_key, None)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CancelHoldResponse {
            status: hold_status(record.reply.hold) as i32,
            balance: balance_of(&r.tenant_id, &member, &record),
        }))
    }

    async fn get_hold(
        &self,
        request: Request<pb::GetHoldRequest>,
    ) -> Result<Response<pb::GetHoldResponse>, Status> {
        let r = request.into_inner();
        let hold = self
            .0
            .get_hold(&r.tenant_id, &r.hold_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetHoldResponse {
            hold_id: r.hold_id,
            member_id: hold.member_id,
            status: hold_status(Some(hold.state)) as i32,
            amount: hold.amount,
            expire_time: hold.expire_at.map(timestamp),
        }))
    }

    async fn reverse(
        &self,
        request: Request<pb::ReverseRequest>,
    ) -> Result<Response<pb::ReverseResponse>, Status> {
        let admin = by_admin(&request);
        checkout_key(
            &request,
            "idempotency_key",
            &request.get_ref().idempotency_key,
        )?;
        let r = request.into_inner();
        let before = self.before(admin, &r.tenant_id, &r.member_id).await;
        let op = Op::Reverse {
            original_key: r.original_idempotency_key,
            amount: r.amount,
            reference: r.reference,
        };
        let record = self
            .0
            .execute(&r.tenant_id, &r.member_id, &r.idempotency_key, op)
            .await
            .map_err(to_status)?;
        let response = Response::new(pb::ReverseResponse {
            entry: entry_of(&r.tenant_id, &r.member_id, &record),
            balance: balance_of(&r.tenant_id, &r.member_id, &record),
            unrecovered_amount: record.reply.unrecovered,
        });
        Ok(with_balance_before(response, before, &record, |b| {
            pb::ReverseResponse {
                balance: Some(b),
                ..Default::default()
            }
        }))
    }

    async fn adjust(
        &self,
        request: Request<pb::AdjustRequest>,
    ) -> Result<Response<pb::AdjustResponse>, Status> {
        let admin = by_admin(&request);
        checkout_key(
            &request,
            "idempotency_key",
            &request.get_ref().idempotency_key,
        )?;
        let r = request.into_inner();
        let before = self.before(admin, &r.tenant_id, &r.member_id).await;
        let actor = r.actor.unwrap_or_default();
        let op = Op::Adjust {
            amount: r.amount,
            actor: Actor {
                id: actor.id,
                comment: actor.comment,
            },
            expire_at: None,
        };

        let record = self
            .0
            .execute(&r.tenant_id, &r.member_id, &r.idempotency_key, op)
            .await
            .map_err(to_status)?;
        let response = Response::new(pb::AdjustResponse {
            entry: entry_of(&r.tenant_id, &r.member_id, &record),
            balance: balance_of(&r.tenant_id, &r.member_id, &record),
        });
        Ok(with_balance_before(response, before, &record, |b| {
            pb::AdjustResponse {
                entry: None,
                balance: Some(b),
            }
        }))
    }

    async fn activate_pending(
        &self,
        request: Request<pb::ActivatePendingRequest>,
    ) -> Result<Response<pb::ActivatePendingResponse>, Status> {
        let admin = by_admin(&request);
        checkout_key(
            &request,
            "idempotency_key",
            &request.get_ref().idempotency_key,
        )?;
        let r = request.into_inner();
        let before = self.before(admin, &r.tenant_id, &r.member_id).await;
        let op = Op::Activate {
            accrual_key: (!r.accrual_idempotency_key.is_empty())
                .then_some(r.accrual_idempotency_key),
        };
        let record = self
            .0
            .execute(&r.tenant_id, &r.member_id, &r.idempotency_key, op)
            .await
            .map_err(to_status)?;
        let response = Response::new(pb::ActivatePendingResponse {
            activated_amount: record.reply.moved,
            balance: balance_of(&r.tenant_id, &r.member_id, &record),
        });
        Ok(with_balance_before(response, before, &record, |b| {
            pb::ActivatePendingResponse {
                activated_amount: 0,
                balance: Some(b),
            }
        }))
    }

    async fn list_ledger_entries(
        &self,
        request: Request<pb::ListLedgerEntriesRequest>,
    ) -> Result<Response<pb::ListLedgerEntriesResponse>, Status> {
        let r = request.into_inner();
        let reasons = r
            .reasons
            .iter()
            .enumerate()
            .map(|(i, v)| any_reason(*v, &format!("reasons[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(to_status)?;
        let period = r.period.as_ref().map_or((None, None), |p| {
            (
                p.start_time.as_ref().map(millis),
                p.end_time.as_ref().map(millis),
            )
        });
        let page = self
            .0
            .entries(
                &r.tenant_id,
                &r.member_id,
                r.page_size,
                &r.page_token,
                reasons,
                period,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListLedgerEntriesResponse {
            entries: page
                .entries
                .iter()
                .map(|e| entry_to_proto(&r.tenant_id, &r.member_id, e))
                .collect(),
            next_page_token: page.next_before.map(|s| s.to_string()).unwrap_or_default(),
        }))
    }

    async fn bulk_accrue(
        &self,
        request: Request<pb::BulkAccrueRequest>,
    ) -> Result<Response<pb::BulkAccrueResponse>, Status> {
        checkout_key(&request, "batch_id", &request.get_ref().batch_id)?;
        let r = request.into_inner();
        let op = accrue_op(
            r.amount,
            r.reason,
            r.reference,
            r.activate_time.as_ref(),
            r.expire_time.as_ref(),
        )
        .map_err(to_status)?;
        let outcome = self
            .0
            .bulk_accrue(&r.tenant_id, &r.batch_id, &r.member_ids, op)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::BulkAccrueResponse {
            accrued_count: outcome.accrued,
            already_done_count: outcome.already_done,
            unknown_member_ids: outcome.unknown,
            refused: outcome
                .refused
                .into_iter()
                .map(|(member_id, reason)| pb::BulkAccrueRefusal { member_id, reason })
                .collect(),
        }))
    }

    async fn transfer_member(
        &self,
        request: Request<pb::TransferMemberRequest>,
    ) -> Result<Response<pb::TransferMemberResponse>, Status> {
        checkout_key(
            &request,
            "idempotency_key",
            &request.get_ref().idempotency_key,
        )?;
        let r = request.into_inner();
        let (moved, balance) = self
            .0
            .transfer(
                &r.tenant_id,
                &r.from_member_id,
                &r.to_member_id,
                &r.idempotency_key,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::TransferMemberResponse {
            transferred_amount: moved,
            balance: Some(balance_to_proto(&r.tenant_id, &r.to_member_id, &balance)),
        }))
    }

    async fn replay_ledger_events(
        &self,
        request: Request<pb::ReplayLedgerEventsRequest>,
    ) -> Result<Response<pb::ReplayLedgerEventsResponse>, Status> {
        let r = request.into_inner();
        let source = crate::publish::LedgerReplay(self.0.store().clone());
        let (events, next_cursor) =
            loyalty_platform::replay::answer(&source, &r.cursor, r.limit).await?;
        Ok(Response::new(pb::ReplayLedgerEventsResponse {
            events,
            next_cursor,
        }))
    }
}

fn money(
    v: &mut loyalty_platform::error::Violations,
    field: &str,
    d: Option<&common::Decimal>,
) -> rust_decimal::Decimal {
    let text = d.map(|d| d.value.as_str()).unwrap_or_default();
    loyalty_platform::types::parse_decimal(text, crate::certificate::MONEY_SCALE).unwrap_or_else(
        |why| {
            v.add(field, why);
            rust_decimal::Decimal::ZERO
        },
    )
}

fn certificate_to_proto(tenant_id: &str, c: &Certificate, now: i64) -> pb::Certificate {
    pb::Certificate {
        tenant_id: tenant_id.to_string(),
        code: c.code.clone(),
        status: match c.status(now) {
            CertStatus::Active => pb::CertificateStatus::Active,
            CertStatus::Spent => pb::CertificateStatus::Spent,
            CertStatus::Expired => pb::CertificateStatus::Expired,
        } as i32,
        initial_value: Some(common::Decimal {
            value: c.initial.to_string(),
        }),
        remaining_value: Some(common::Decimal {
            value: c.remaining.to_string(),
        }),
        expire_time: c.expire_at.map(timestamp),
    }
}

#[tonic::async_trait]
impl GiftCertificateService for CertificatesApi {
    async fn issue_certificate(
        &self,
        request: Request<pb::IssueCertificateRequest>,
    ) -> Result<Response<pb::IssueCertificateResponse>, Status> {
        let r = request.into_inner();
        let mut v = loyalty_platform::error::Violations::new();
        let value = money(&mut v, "value", r.value.as_ref());
        v.finish().map_err(to_status)?;
        let c = self
            .0
            .issue(
                &r.tenant_id,
                &r.idempotency_key,
                &r.code,
                value,
                r.expire_time.as_ref().map(millis),
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::IssueCertificateResponse {
            certificate: Some(certificate_to_proto(&r.tenant_id, &c, self.0.now())),
        }))
    }

    async fn get_certificate(
        &self,
        request: Request<pb::GetCertificateRequest>,
    ) -> Result<Response<pb::GetCertificateResponse>, Status> {
        let r = request.into_inner();
        let c = self.0.get(&r.tenant_id, &r.code).await.map_err(to_status)?;
        Ok(Response::new(pb::GetCertificateResponse {
            certificate: Some(certificate_to_proto(&r.tenant_id, &c, self.0.now())),
        }))
    }

    async fn spend_certificate(
        &self,
        request: Request<pb::SpendCertificateRequest>,
    ) -> Result<Response<pb::SpendCertificateResponse>, Status> {
        let r = request.into_inner();
        let certificate = self
            .change(
                r.tenant_id,
                r.code,
                r.idempotency_key,
                r.amount,
                r.reference,
                false,
            )
            .await?;
        Ok(Response::new(pb::SpendCertificateResponse { certificate }))
    }

    async fn refund_certificate(
        &self,
        request: Request<pb::RefundCertificateRequest>,
    ) -> Result<Response<pb::RefundCertificateResponse>, Status> {
        let r = request.into_inner();
        let certificate = self
            .change(
                r.tenant_id,
                r.code,
                r.idempotency_key,
                r.amount,
                r.reference,
                true,
            )
            .await?;
        Ok(Response::new(pb::RefundCertificateResponse { certificate }))
    }
}

impl CertificatesApi {
    /// Spends or refunds: the two requests carry the same fields.
    async fn change(
        &self,
        tenant_id: String,
        code: String,
        key: String,
        amount: Option<common::Decimal>,
        reference: String,
        refund: bool,
    ) -> Result<Option<pb::Certificate>, Status> {
        let mut v = loyalty_platform::error::Violations::new();
        let amount = money(&mut v, "amount", amount.as_ref());
        v.finish().map_err(to_status)?;
        let c = self
            .0
            .change(&tenant_id, &code, &key, amount, reference, refund)
            .await
            .map_err(to_status)?;
        Ok(Some(certificate_to_proto(&tenant_id, &c, self.0.now())))
    }
}
