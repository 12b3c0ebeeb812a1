//! The thin gRPC adapter of the balance service.

use loyalty_platform::error::Error;
use loyalty_platform::grpc::{millis, timestamp, to_status};
use loyalty_proto::balance::v1 as pb;
use pb::balance_service_server::{BalanceService, BalanceServiceServer};
use pb::gift_certificate_service_server::{GiftCertificateService, GiftCertificateServiceServer};
use tonic::{Request, Response, Status};

use crate::ledger::{BalanceView, Entry, Op, OpRecord, Reason};
use crate::service::Balance;

pub const SERVICE_NAMES: &[&str] = &[
    "loyalty.balance.v1.BalanceService",
    "loyalty.balance.v1.GiftCertificateService",
];

pub fn add_routes(
    routes: tonic::service::Routes,
    balance: Balance,
    max_message_bytes: usize,
) -> tonic::service::Routes {
    let api = Api(balance);
    routes
        .add_service(
            BalanceServiceServer::new(api.clone())
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
        )
        .add_service(
            GiftCertificateServiceServer::new(api)
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
        )
}

#[derive(Debug, Clone)]
struct Api(Balance);

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
    }
}

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
        actor: None,
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

struct Parts {
    entry: Option<pb::LedgerEntry>,
    balance: Option<pb::Balance>,
    unrecovered: i64,
}

fn reply_parts(tenant_id: &str, member_id: &str, record: &OpRecord) -> Parts {
    Parts {
        entry: record
            .reply
            .entry
            .as_ref()
            .map(|e| entry_to_proto(tenant_id, member_id, e)),
        balance: Some(balance_to_proto(
            tenant_id,
            member_id,
            &record.reply.balance,
        )),
        unrecovered: record.reply.unrecovered,
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
        let r = request.into_inner();
        let op = Op::Accrue {
            amount: r.amount,
            reason: accrual_reason(r.reason).map_err(to_status)?,
            reference: r.reference,
            activate_at: r.activate_time.as_ref().map(millis),
            expire_at: r.expire_time.as_ref().map(millis),
        };
        let record = self
            .0
            .execute(&r.tenant_id, &r.member_id, &r.idempotency_key, op)
            .await
            .map_err(to_status)?;
        let p = reply_parts(&r.tenant_id, &r.member_id, &record);
        Ok(Response::new(pb::AccrueResponse {
            entry: p.entry,
            balance: p.balance,
        }))
    }

    async fn redeem(
        &self,
        request: Request<pb::RedeemRequest>,
    ) -> Result<Response<pb::RedeemResponse>, Status> {
        let r = request.into_inner();
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
        let p = reply_parts(&r.tenant_id, &r.member_id, &record);
        Ok(Response::new(pb::RedeemResponse {
            entry: p.entry,
            balance: p.balance,
        }))
    }

    async fn reverse(
        &self,
        request: Request<pb::ReverseRequest>,
    ) -> Result<Response<pb::ReverseResponse>, Status> {
        let r = request.into_inner();
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
        let p = reply_parts(&r.tenant_id, &r.member_id, &record);
        Ok(Response::new(pb::ReverseResponse {
            entry: p.entry,
            balance: p.balance,
            unrecovered_amount: p.unrecovered,
        }))
    }

    async fn list_ledger_entries(
        &self,
        request: Request<pb::ListLedgerEntriesRequest>,
    ) -> Result<Response<pb::ListLedgerEntriesResponse>, Status> {
        let r = request.into_inner();
        if !r.reasons.is_empty() || r.period.is_some() {
            return Err(loyalty_platform::grpc::unimplemented(
                "ListLedgerEntries filters (reasons, period)",
            ));
        }
        let (entries, next) = self
            .0
            .entries(&r.tenant_id, &r.member_id, r.page_size, &r.page_token)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListLedgerEntriesResponse {
            entries: entries
                .iter()
                .map(|e| entry_to_proto(&r.tenant_id, &r.member_id, e))
                .collect(),
            next_page_token: next.map(|s| s.to_string()).unwrap_or_default(),
        }))
    }
}

/// Gift certificates arrive with the balance issue; every RPC answers UNIMPLEMENTED.
#[tonic::async_trait]
impl GiftCertificateService for Api {}
