//! The two ways promotion reaches identity and balance: in-process calls (dev mode, or when
//! they share a process) and gRPC clients (microservices mode). Checkout cannot tell which.

use loyalty_balance::Balance;
use loyalty_balance::ledger::{HoldState as LedgerHoldState, Op, OpRecord, Reason};
use loyalty_balance::service::MemberDirectory;
use loyalty_identity::Identity;
use loyalty_identity::lifecycle::MemberPoints;
use loyalty_platform::clock::Millis;
use loyalty_platform::error::{Error, Result};
use loyalty_platform::grpc::{from_status, timestamp};
use loyalty_platform::telemetry::ClientTrace;
use loyalty_promotion::ports::{
    Held, HoldState, Members, Points, Redeemed, Resolved, Reversal, Segments,
};
use loyalty_promotion::receipt::Identification;
use loyalty_proto::balance::v1 as bpb;
use loyalty_proto::identity::v1 as ipb;
use loyalty_proto::segmentation::v1 as spb;
use loyalty_reporting::ports::SegmentMembers;
use loyalty_segmentation::Segmentation;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A channel to a peer service whose calls carry the caller's trace.
pub type PeerChannel = ClientTrace<Channel>;

#[derive(Debug, Clone)]
pub struct LocalMembers(pub Identity);

#[async_trait::async_trait]
impl Members for LocalMembers {
    async fn resolve(
        &self,
        tenant_id: &str,
        id: &Identification,
        with_profile: bool,
    ) -> Result<Option<Resolved>> {
        let member_id = match id {
            Identification::None => return Ok(None),
            Identification::Card(number) => {
                // The lookup read the profile already.
                let found = self.0.lookup_by_card(tenant_id, number).await?;
                return Ok(Some(resolved_locally(
                    found.member.member_id,
                    with_profile.then_some(found.profile),
                )));
            }
            Identification::Member(member_id) => {
                self.0.usable_member(tenant_id, member_id).await?.member_id
            }
            Identification::Phone(phone) => {
                self.0
                    .lookup_by_phone(tenant_id, phone, "")
                    .await?
                    .member_id
            }
        };
        let profile = match with_profile {
            true => Some(self.0.profile(tenant_id, &member_id).await?),
            false => None,
        };
        Ok(Some(resolved_locally(member_id, profile)))
    }

    async fn ping(&self) -> Result<()> {
        self.0.store().ping().await
    }
}

/// A member resolved in process, with the birthday and attributes campaigns target when
/// `profile` was read.
fn resolved_locally(
    member_id: String,
    profile: Option<loyalty_identity::domain::Profile>,
) -> Resolved {
    let mut resolved = Resolved {
        member_id,
        ..Resolved::default()
    };
    if let Some(profile) = profile {
        resolved.birthday = profile.birthday.map(|d| (d.month, d.day));
        resolved.attributes = profile.attributes;
    }
    resolved
}

#[derive(Debug, Clone)]
pub struct LocalPoints(pub Balance);

/// What a redemption or a confirmed hold took, and the active balance after.
fn redeemed(record: OpRecord) -> Redeemed {
    Redeemed {
        amount: record.reply.entry.map_or(0, |e| e.amount.abs()),
        active_after: record.reply.balance.active,
    }
}

#[async_trait::async_trait]
impl Points for LocalPoints {
    async fn available(&self, tenant_id: &str, member_id: &str) -> Result<i64> {
        Ok(self.0.balance(tenant_id, member_id).await?.active)
    }

    async fn accrue(
        &self,
        tenant_id: &str,
        member_id: &str,
        key: &str,
        amount: i64,
        reference: &str,
        activate_at: Millis,
        expire_at: Option<Millis>,
    ) -> Result<i64> {
        let op = Op::Accrue {
            amount,
            reason: Reason::Accrual,
            reference: reference.to_string(),
            activate_at: Some(activate_at),
            expire_at,
        };
        Ok(self
            .0
            .execute(tenant_id, member_id, key, op)
            .await?
            .reply
            .balance
            .active)
    }

    async fn redeem(
        &self,
        tenant_id: &str,
        member_id: &str,
        key: &str,
        amount: i64,
        reference: &str,
    ) -> Result<Redeemed> {
        let op = Op::Redeem {
            amount,
            reference: reference.to_string(),
            up_to_available: true,
        };
        Ok(redeemed(
            self.0.execute(tenant_id, member_id, key, op).await?,
        ))
    }

    async fn hold(&self, tenant_id: &str, hold_id: &str) -> Result<Held> {
        let hold = self.0.get_hold(tenant_id, hold_id).await?;
        Ok(Held {
            member_id: hold.member_id,
            amount: hold.amount,
            state: match hold.state {
                LedgerHoldState::Open => HoldState::Open,
                LedgerHoldState::Confirmed => HoldState::Confirmed,
                LedgerHoldState::Cancelled => HoldState::Cancelled,
                LedgerHoldState::Expired => HoldState::Expired,
            },
        })
    }

    async fn confirm_hold(
        &self,
        tenant_id: &str,
        hold_id: &str,
        key: &str,
        amount: i64,
    ) -> Result<Redeemed> {
        let (_, record) = self
            .0
            .resolve_hold(tenant_id, hold_id, key, Some(amount))
            .await?;
        Ok(redeemed(record))
    }

    async fn cancel_hold(&self, tenant_id: &str, hold_id: &str, key: &str) -> Result<()> {
        self.0.resolve_hold(tenant_id, hold_id, key, None).await?;
        Ok(())
    }

    async fn reverse(
        &self,
        tenant_id: &str,
        member_id: &str,
        key: &str,
        original_key: &str,
        amount: i64,
        reference: &str,
    ) -> Result<Reversal> {
        let op = Op::Reverse {
            original_key: original_key.to_string(),
            amount,
            reference: reference.to_string(),
        };
        let reply = self.0.execute(tenant_id, member_id, key, op).await?.reply;
        Ok(Reversal {
            taken: reply.entry.map_or(0, |e| e.amount.abs()),
            unrecovered: reply.unrecovered,
            active_after: reply.balance.active,
        })
    }

    async fn ping(&self) -> Result<()> {
        self.0.store().ping().await
    }
}

/// Asks a peer's grpc.health.v1 whether `service` is SERVING.
async fn peer_health(channel: &PeerChannel, service: &str) -> Result<()> {
    let reply = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|s| Error::Unavailable(format!("{service}: {}", s.message())))?;
    if reply.into_inner().status == ServingStatus::Serving as i32 {
        Ok(())
    } else {
        Err(Error::Unavailable(format!("{service} is not serving")))
    }
}

/// API keys checked by a remote identity service (with this process's service key).
#[derive(Debug, Clone)]
pub struct RemoteKeys(pub PeerChannel);

#[async_trait::async_trait]
impl loyalty_platform::access::KeyVerifier for RemoteKeys {
    async fn verify(&self, key: &str) -> Result<Option<loyalty_platform::access::Principal>> {
        self.ask(ipb::VerifyApiKeyRequest {
            key: key.to_string(),
            certified_key_id: String::new(),
        })
        .await
    }

    async fn verify_certified(
        &self,
        key_id: &str,
    ) -> Result<Option<loyalty_platform::access::Principal>> {
        self.ask(ipb::VerifyApiKeyRequest {
            key: String::new(),
            certified_key_id: key_id.to_string(),
        })
        .await
    }
}

impl RemoteKeys {
    async fn ask(
        &self,
        request: ipb::VerifyApiKeyRequest,
    ) -> Result<Option<loyalty_platform::access::Principal>> {
        use loyalty_platform::access::{Principal, Role};
        let mut client = ipb::access_service_client::AccessServiceClient::new(self.0.clone());
        let reply = client
            .verify_api_key(request)
            .await
            .map_err(from_status)?
            .into_inner();
        Ok(reply.api_key.and_then(|k| {
            let role = loyalty_identity::grpc_access::role_from_proto(k.role)?;
            Some(Principal {
                key_id: k.key_id,
                role,
                tenant_id: k.tenant_id,
                store_id: k.store_id,
                member_id: k.member_id,
                all_tenants: role == Role::Service,
            })
        }))
    }
}

#[derive(Debug, Clone)]
pub struct RemoteMembers(pub PeerChannel);

#[async_trait::async_trait]
impl Members for RemoteMembers {
    async fn resolve(
        &self,
        tenant_id: &str,
        id: &Identification,
        _with_profile: bool,
    ) -> Result<Option<Resolved>> {
        use ipb::lookup_member_request::Key;
        let mut client = ipb::member_service_client::MemberServiceClient::new(self.0.clone());
        let key = match id {
            Identification::None => return Ok(None),
            Identification::Member(member_id) => {
                let reply = client
                    .get_member(ipb::GetMemberRequest {
                        tenant_id: tenant_id.to_string(),
                        member_id: member_id.clone(),
                    })
                    .await
                    .map_err(from_status)?;
                let member = reply.into_inner().member;
                if let Some(m) = &member {
                    usable_status(m)?;
                }
                return Ok(member.map(resolved));
            }
            Identification::Card(number) => Key::CardNumber(number.clone()),
            Identification::Phone(phone) => Key::Phone(phone.clone()),
        };
        let reply = client
            .lookup_member(ipb::LookupMemberRequest {
                tenant_id: tenant_id.to_string(),
                key: Some(key),
                default_region: String::new(),
            })
            .await
            .map_err(from_status)?;
        Ok(reply.into_inner().member.map(resolved))
    }

    async fn ping(&self) -> Result<()> {
        peer_health(&self.0, "loyalty.identity.v1.MemberService").await
    }
}

/// A member as identity's API shows it (the profile always comes along).
fn resolved(m: ipb::Member) -> Resolved {
    Resolved {
        member_id: m.member_id,
        birthday: m
            .birthday
            .and_then(|d| Some((u8::try_from(d.month).ok()?, u8::try_from(d.day).ok()?))),
        attributes: m.attributes.into_iter().collect(),
    }
}

#[derive(Debug, Clone)]
pub struct LocalSegments(pub Segmentation);

#[async_trait::async_trait]
impl Segments for LocalSegments {
    async fn member_segments(&self, tenant_id: &str, member_id: &str) -> Result<Vec<String>> {
        self.0.member_segments(tenant_id, member_id).await
    }

    async fn exist(&self, tenant_id: &str, segment_ids: &[String]) -> Result<Vec<bool>> {
        let mut out = Vec::with_capacity(segment_ids.len());
        for id in segment_ids {
            out.push(match self.0.get(tenant_id, id).await {
                Ok(_) => true,
                Err(Error::NotFound(_) | Error::InvalidArgument(_)) => false,
                Err(e) => return Err(e),
            });
        }
        Ok(out)
    }
}

/// Reporting's segment filter, on segmentation in this process.
#[derive(Debug, Clone)]
pub struct LocalSegmentMembers(pub Segmentation);

/// Members read from segmentation per page.
const SEGMENT_PAGE: usize = 10_000;

#[async_trait::async_trait]
impl SegmentMembers for LocalSegmentMembers {
    async fn members(
        &self,
        tenant_id: &str,
        segment_id: &str,
        limit: usize,
    ) -> Result<Vec<String>> {
        self.0.get(tenant_id, segment_id).await?;
        let mut out: Vec<String> = Vec::new();
        loop {
            let after = out.last().cloned().unwrap_or_default();
            let page = self
                .0
                .members_page(tenant_id, segment_id, &after, SEGMENT_PAGE)
                .await?;
            let full = page.len() == SEGMENT_PAGE;
            out.extend(page);
            if out.len() > limit {
                return Err(loyalty_reporting::ports::too_many(segment_id, limit));
            }
            if !full {
                return Ok(out);
            }
        }
    }
}

/// Reporting's segment filter, on segmentation over gRPC.
#[derive(Debug, Clone)]
pub struct RemoteSegmentMembers(pub PeerChannel);

#[async_trait::async_trait]
impl SegmentMembers for RemoteSegmentMembers {
    async fn members(
        &self,
        tenant_id: &str,
        segment_id: &str,
        limit: usize,
    ) -> Result<Vec<String>> {
        let mut client =
            spb::segmentation_service_client::SegmentationServiceClient::new(self.0.clone());
        let mut stream = client
            .stream_segment_members(spb::StreamSegmentMembersRequest {
                tenant_id: tenant_id.to_string(),
                segment_id: segment_id.to_string(),
            })
            .await
            .map_err(from_status)?
            .into_inner();
        let mut out = Vec::new();
        while let Some(page) = stream.message().await.map_err(from_status)? {
            out.extend(page.member_ids);
            if out.len() > limit {
                return Err(loyalty_reporting::ports::too_many(segment_id, limit));
            }
        }
        Ok(out)
    }
}

#[derive(Debug, Clone)]
pub struct RemoteSegments(pub PeerChannel);

#[async_trait::async_trait]
impl Segments for RemoteSegments {
    async fn member_segments(&self, tenant_id: &str, member_id: &str) -> Result<Vec<String>> {
        let mut client =
            spb::segmentation_service_client::SegmentationServiceClient::new(self.0.clone());
        let reply = client
            .get_member_segments(spb::GetMemberSegmentsRequest {
                tenant_id: tenant_id.to_string(),
                member_id: member_id.to_string(),
            })
            .await
            .map_err(from_status)?;
        Ok(reply.into_inner().segment_ids)
    }

    async fn exist(&self, tenant_id: &str, segment_ids: &[String]) -> Result<Vec<bool>> {
        let mut client =
            spb::segmentation_service_client::SegmentationServiceClient::new(self.0.clone());
        let mut out = Vec::with_capacity(segment_ids.len());
        for id in segment_ids {
            let reply = client
                .get_segment(spb::GetSegmentRequest {
                    tenant_id: tenant_id.to_string(),
                    segment_id: id.clone(),
                })
                .await;
            out.push(match reply {
                Ok(_) => true,
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::NotFound | tonic::Code::InvalidArgument
                    ) =>
                {
                    false
                }
                Err(s) => return Err(from_status(s)),
            });
        }
        Ok(out)
    }
}

#[derive(Debug, Clone)]
pub struct RemotePoints(pub PeerChannel);

impl RemotePoints {
    fn client(&self) -> bpb::balance_service_client::BalanceServiceClient<PeerChannel> {
        bpb::balance_service_client::BalanceServiceClient::new(self.0.clone())
    }
}

fn active(balance: Option<bpb::Balance>) -> i64 {
    balance.map_or(0, |b| b.active)
}

#[async_trait::async_trait]
impl Points for RemotePoints {
    async fn available(&self, tenant_id: &str, member_id: &str) -> Result<i64> {
        let reply = self
            .client()
            .get_balance(bpb::GetBalanceRequest {
                tenant_id: tenant_id.to_string(),
                member_id: member_id.to_string(),
            })
            .await
            .map_err(from_status)?;
        Ok(active(reply.into_inner().balance))
    }

    async fn accrue(
        &self,
        tenant_id: &str,
        member_id: &str,
        key: &str,
        amount: i64,
        reference: &str,
        activate_at: Millis,
        expire_at: Option<Millis>,
    ) -> Result<i64> {
        let reply = self
            .client()
            .accrue(bpb::AccrueRequest {
                tenant_id: tenant_id.to_string(),
                member_id: member_id.to_string(),
                idempotency_key: key.to_string(),
                amount,
                reason: bpb::EntryReason::Accrual as i32,
                reference: reference.to_string(),
                activate_time: Some(timestamp(activate_at)),
                expire_time: expire_at.map(timestamp),
            })
            .await
            .map_err(from_status)?;
        Ok(active(reply.into_inner().balance))
    }

    async fn redeem(
        &self,
        tenant_id: &str,
        member_id: &str,
        key: &str,
        amount: i64,
        reference: &str,
    ) -> Result<Redeemed> {
        let reply = self
            .client()
            .redeem(bpb::RedeemRequest {
                tenant_id: tenant_id.to_string(),
                member_id: member_id.to_string(),
                idempotency_key: key.to_string(),
                amount,
                reference: reference.to_string(),
                up_to_available: true,
            })
            .await
            .map_err(from_status)?
            .into_inner();
        Ok(Redeemed {
            amount: reply.entry.map_or(0, |e| e.amount.abs()),
            active_after: active(reply.balance),
        })
    }

    async fn hold(&self, tenant_id: &str, hold_id: &str) -> Result<Held> {
        let reply = self
            .client()
            .get_hold(bpb::GetHoldRequest {
                tenant_id: tenant_id.to_string(),
                hold_id: hold_id.to_string(),
            })
            .await
            .map_err(from_status)?
            .into_inner();
        let state = match bpb::HoldStatus::try_from(reply.status) {
            Ok(bpb::HoldStatus::Open) => HoldState::Open,
            Ok(bpb::HoldStatus::Confirmed) => HoldState::Confirmed,
            Ok(bpb::HoldStatus::Cancelled) => HoldState::Cancelled,
            Ok(bpb::HoldStatus::Expired) => HoldState::Expired,
            _ => {
                return Err(Error::internal(anyhow::anyhow!(
                    "balance answered hold status {}",
                    reply.status
                )));
            }
        };
        Ok(Held {
            member_id: reply.member_id,
            amount: reply.amount,
            state,
        })
    }

    async fn confirm_hold(
        &self,
        tenant_id: &str,
        hold_id: &str,
        key: &str,
        amount: i64,
    ) -> Result<Redeemed> {
        let reply = self
            .client()
            .confirm_hold(bpb::ConfirmHoldRequest {
                tenant_id: tenant_id.to_string(),
                hold_id: hold_id.to_string(),
                idempotency_key: key.to_string(),
                amount,
            })
            .await
            .map_err(from_status)?
            .into_inner();
        Ok(Redeemed {
            amount: reply.entry.map_or(0, |e| e.amount.abs()),
            active_after: active(reply.balance),
        })
    }

    async fn cancel_hold(&self, tenant_id: &str, hold_id: &str, key: &str) -> Result<()> {
        self.client()
            .cancel_hold(bpb::CancelHoldRequest {
                tenant_id: tenant_id.to_string(),
                hold_id: hold_id.to_string(),
                idempotency_key: key.to_string(),
            })
            .await
            .map_err(from_status)?;
        Ok(())
    }

    async fn reverse(
        &self,
        tenant_id: &str,
        member_id: &str,
        key: &str,
        original_key: &str,
        amount: i64,
        reference: &str,
    ) -> Result<Reversal> {
        let reply = self
            .client()
            .reverse(bpb::ReverseRequest {
                tenant_id: tenant_id.to_string(),
                member_id: member_id.to_string(),
                idempotency_key: key.to_string(),
                original_idempotency_key: original_key.to_string(),
                amount,
                reference: reference.to_string(),
            })
            .await
            .map_err(from_status)?
            .into_inner();
        Ok(Reversal {
            taken: reply.entry.map_or(0, |e| e.amount.abs()),
            unrecovered: reply.unrecovered_amount,
            active_after: active(reply.balance),
        })
    }

    async fn ping(&self) -> Result<()> {
        peer_health(&self.0, "loyalty.balance.v1.BalanceService").await
    }
}

/// Refuses a member (read by id) that may not buy, earn or spend, like identity's lookups.
fn usable_status(m: &ipb::Member) -> Result<()> {
    match ipb::MemberStatus::try_from(m.status) {
        Ok(ipb::MemberStatus::Blocked) => Err(Error::FailedPrecondition(format!(
            "member {} is blocked",
            m.member_id
        ))),
        Ok(ipb::MemberStatus::Erased) => Err(Error::FailedPrecondition(format!(
            "member {} was erased",
            m.member_id
        ))),
        _ => Ok(()),
    }
}

/// Refuses a blocked or erased member; a member identity does not know is balance's own
/// business (accounts exist before and apart from identity's records).
async fn member_usable(members: &impl Members, tenant_id: &str, member_id: &str) -> Result<()> {
    let id = Identification::Member(member_id.to_string());
    match members.resolve(tenant_id, &id, false).await {
        Ok(_) | Err(Error::NotFound(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether identity knows `member_id` as a member that may earn, through either way of
/// reaching it (blocked and erased members count as unknown).
async fn member_exists(members: &impl Members, tenant_id: &str, member_id: &str) -> Result<bool> {
    match members
        .resolve(
            tenant_id,
            &Identification::Member(member_id.to_string()),
            false,
        )
        .await
    {
        Ok(found) => Ok(found.is_some()),
        Err(Error::NotFound(_) | Error::FailedPrecondition(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

#[async_trait::async_trait]
impl MemberDirectory for LocalMembers {
    async fn exists(&self, tenant_id: &str, member_id: &str) -> Result<bool> {
        member_exists(self, tenant_id, member_id).await
    }
    async fn usable(&self, tenant_id: &str, member_id: &str) -> Result<()> {
        member_usable(self, tenant_id, member_id).await
    }
}

#[async_trait::async_trait]
impl MemberDirectory for RemoteMembers {
    async fn exists(&self, tenant_id: &str, member_id: &str) -> Result<bool> {
        member_exists(self, tenant_id, member_id).await
    }
    async fn usable(&self, tenant_id: &str, member_id: &str) -> Result<()> {
        member_usable(self, tenant_id, member_id).await
    }
}

/// The import's reference on an opening balance entry.
const OPENING_REFERENCE: &str = "member import";

#[async_trait::async_trait]
impl MemberPoints for LocalPoints {
    async fn transfer(&self, tenant_id: &str, from: &str, to: &str, key: &str) -> Result<i64> {
        Ok(self.0.transfer(tenant_id, from, to, key).await?.0)
    }

    async fn opening_balance(
        &self,
        tenant_id: &str,
        member_id: &str,
        amount: i64,
        key: &str,
    ) -> Result<()> {
        let op = Op::Accrue {
            amount,
            reason: Reason::OpeningBalance,
            reference: OPENING_REFERENCE.to_string(),
            activate_at: None,
            expire_at: None,
        };
        self.0.execute(tenant_id, member_id, key, op).await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl MemberPoints for RemotePoints {
    async fn transfer(&self, tenant_id: &str, from: &str, to: &str, key: &str) -> Result<i64> {
        let reply = self
            .client()
            .transfer_member(bpb::TransferMemberRequest {
                tenant_id: tenant_id.to_string(),
                from_member_id: from.to_string(),
                to_member_id: to.to_string(),
                idempotency_key: key.to_string(),
            })
            .await
            .map_err(from_status)?;
        Ok(reply.into_inner().transferred_amount)
    }

    async fn opening_balance(
        &self,
        tenant_id: &str,
        member_id: &str,
        amount: i64,
        key: &str,
    ) -> Result<()> {
        self.client()
            .accrue(bpb::AccrueRequest {
                tenant_id: tenant_id.to_string(),
                member_id: member_id.to_string(),
                idempotency_key: key.to_string(),
                amount,
                reason: bpb::EntryReason::OpeningBalance as i32,
                reference: OPENING_REFERENCE.to_string(),
                activate_time: None,
                expire_time: None,
            })
            .await
            .map_err(from_status)?;
        Ok(())
    }
}
