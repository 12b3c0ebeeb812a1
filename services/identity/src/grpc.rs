//! The thin gRPC adapter of the identity service: proto in, domain call, proto out.

use loyalty_platform::audit::with_before;
use loyalty_platform::grpc::{channel, channel_to_proto, timestamp, to_status};
use loyalty_proto::identity::v1 as pb;
use pb::card_service_server::{CardService, CardServiceServer};
use pb::member_service_server::{MemberService, MemberServiceServer};
use pb::referral_service_server::{ReferralService, ReferralServiceServer};
use tonic::{Request, Response, Status, Streaming};

use crate::import::{MAX_IMPORT_ROWS, RowInput};
use crate::lifecycle::Audit;

use crate::domain::{
    BlockReason, Card, CardKind, CardStatus, ConsentChannel, Date, Gender, Identity, Member,
    MemberStatus, Profile, ProfileUpdate, Registration,
};

/// gRPC service names, for health reporting.
pub const SERVICE_NAMES: &[&str] = &[
    "loyalty.identity.v1.MemberService",
    "loyalty.identity.v1.CardService",
    "loyalty.identity.v1.ReferralService",
    crate::grpc_access::SERVICE_NAME,
];

/// Adds the identity services (API key management included) to `routes`, with message size
/// limits.
pub fn add_routes(
    routes: tonic::service::Routes,
    identity: Identity,
    keys: crate::keys::Keys,
    max_message_bytes: usize,
) -> tonic::service::Routes {
    let api = Api(identity);
    routes
        .add_service(crate::grpc_access::server(keys, max_message_bytes))
        .add_service(
            MemberServiceServer::new(api.clone())
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
        )
        .add_service(
            CardServiceServer::new(api.clone())
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
        )
        .add_service(
            ReferralServiceServer::new(api)
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
        )
}

#[derive(Debug, Clone)]
struct Api(Identity);

type ImportStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::ImportMembersResponse, Status>> + Send>,
>;

/// The audit of an admin action: the actor the request names and the key that sent it.
fn audit<T: HasActor>(request: &Request<T>) -> Audit {
    let actor = request.get_ref().actor();
    Audit {
        actor: actor.map(|a| a.id.clone()).unwrap_or_default(),
        comment: actor.map(|a| a.comment.clone()).unwrap_or_default(),
        key_id: loyalty_platform::access::caller(request)
            .map(|p| p.key_id.clone())
            .unwrap_or_default(),
        at: 0,
    }
}

trait HasActor {
    fn actor(&self) -> Option<&loyalty_proto::common::v1::Actor>;
}

impl HasActor for pb::MergeMembersRequest {
    fn actor(&self) -> Option<&loyalty_proto::common::v1::Actor> {
        self.actor.as_ref()
    }
}

impl HasActor for pb::BlockMemberRequest {
    fn actor(&self) -> Option<&loyalty_proto::common::v1::Actor> {
        self.actor.as_ref()
    }
}

impl HasActor for pb::UnblockMemberRequest {
    fn actor(&self) -> Option<&loyalty_proto::common::v1::Actor> {
        self.actor.as_ref()
    }
}

impl HasActor for pb::EraseMemberRequest {
    fn actor(&self) -> Option<&loyalty_proto::common::v1::Actor> {
        self.actor.as_ref()
    }
}

fn row_input(r: pb::ImportMemberRow) -> RowInput {
    RowInput {
        row_number: r.row_number,
        phone: r.phone,
        email: r.email,
        first_name: r.first_name,
        last_name: r.last_name,
        birthday: r.birthday.map(|d| (d.year, d.month, d.day)),
        card_numbers: r.card_numbers,
        opening_balance: r.opening_balance,
    }
}

impl Api {
    /// The member with its profile (and why it is blocked, if it is).
    async fn view(&self, member: &Member) -> Result<pb::Member, Status> {
        let profile = self
            .0
            .profile(&member.tenant_id, &member.member_id)
            .await
            .map_err(to_status)?;
        let mut shown = self.shown(member, &profile);
        if member.status == MemberStatus::Blocked {
            shown.block_reason = self
                .0
                .member_block(&member.tenant_id, &member.member_id)
                .await
                .map_err(to_status)?
                .map(|b| b.reason)
                .unwrap_or_default();
        }
        Ok(shown)
    }

    /// A member as it is now, for the audit record of a change about to be made.
    async fn before(&self, tenant_id: &str, member_id: &str) -> Option<pb::Member> {
        let (member, _) = self.0.member(tenant_id, member_id).await.ok()?;
        self.view(&member).await.ok()
    }

    fn shown(&self, member: &Member, profile: &Profile) -> pb::Member {
        member_to_proto(
            member,
            profile,
            self.0.questionnaire_complete(member, profile),
        )
    }
}

/// Reads an update mask over `member` into the changes it names.
fn profile_update(
    member: Option<pb::Member>,
    mask: &[String],
) -> Result<ProfileUpdate, loyalty_platform::Error> {
    let member = member.unwrap_or_default();
    if mask.is_empty() {
        return Err(loyalty_platform::Error::invalid(
            "update_mask",
            "must name the fields to change, e.g. [\"email\", \"birthday\"]",
        ));
    }
    let mut update = ProfileUpdate::default();
    for path in mask {
        match path.as_str() {
            "first_name" => update.first_name = Some(member.first_name.clone()),
            "last_name" => update.last_name = Some(member.last_name.clone()),
            "email" => update.email = Some(member.email.clone()),
            "gender" => {
                update.gender = Some(match pb::Gender::try_from(member.gender) {
                    Ok(pb::Gender::Female) => Gender::Female,
                    Ok(pb::Gender::Male) => Gender::Male,
                    Ok(pb::Gender::Other) => Gender::Other,
                    Ok(pb::Gender::Unspecified) => Gender::Unspecified,
                    Err(_) => {
                        return Err(loyalty_platform::Error::invalid(
                            "member.gender",
                            "is not a known gender",
                        ));
                    }
                });
            }
            "birthday" => {
                update.birthday = Some(match member.birthday {
                    None => None,
                    Some(d) => Some(Date::checked(d.year, d.month, d.day).ok_or_else(|| {
                        loyalty_platform::Error::invalid(
                            "member.birthday",
                            "must be a real date between 1900 and 2100",
                        )
                    })?),
                });
            }
            "preferred_store_id" => {
                update.preferred_store_id = Some(member.preferred_store_id.clone());
            }
            "attributes" => {
                update.attributes = Some(member.attributes.clone().into_iter().collect());
            }
            other => {
                return Err(loyalty_platform::Error::invalid(
                    "update_mask",
                    format!(
                        "{other:?} cannot be changed here; allowed: first_name, last_name, email, gender, birthday, preferred_store_id, attributes"
                    ),
                ));
            }
        }
    }
    Ok(update)
}

fn gender_to_proto(g: Gender) -> pb::Gender {
    match g {
        Gender::Unspecified => pb::Gender::Unspecified,
        Gender::Female => pb::Gender::Female,
        Gender::Male => pb::Gender::Male,
        Gender::Other => pb::Gender::Other,
    }
}

fn consent_channel_to_proto(c: ConsentChannel) -> pb::ConsentChannel {
    match c {
        ConsentChannel::Sms => pb::ConsentChannel::Sms,
        ConsentChannel::Email => pb::ConsentChannel::Email,
        ConsentChannel::Push => pb::ConsentChannel::Push,
        ConsentChannel::Messenger => pb::ConsentChannel::Messenger,
    }
}

/// A member with its profile, as the API shows it.
pub fn member_to_proto(m: &Member, profile: &Profile, questionnaire_complete: bool) -> pb::Member {
    pb::Member {
        gender: gender_to_proto(profile.gender) as i32,
        birthday: profile.birthday.map(|d| loyalty_proto::common::v1::Date {
            year: i32::from(d.year),
            month: i32::from(d.month),
            day: i32::from(d.day),
        }),
        preferred_store_id: profile.preferred_store_id.clone(),
        attributes: profile
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        consents: profile
            .consents
            .iter()
            .map(|c| pb::Consent {
                channel: consent_channel_to_proto(c.channel) as i32,
                granted: c.granted,
                recorded_at: Some(timestamp(c.recorded_at)),
                source: c.source.clone(),
            })
            .collect(),
        contactable: profile.contactable(),
        questionnaire_complete,
        tenant_id: m.tenant_id.clone(),
        member_id: m.member_id.clone(),
        status: match m.status {
            MemberStatus::Active => pb::MemberStatus::Active,
            MemberStatus::Merged => pb::MemberStatus::Merged,
            MemberStatus::Erased => pb::MemberStatus::Erased,
            MemberStatus::Blocked => pb::MemberStatus::Blocked,
        } as i32,
        phone: m.phone.clone(),
        email: m.email.clone(),
        first_name: m.first_name.clone(),
        last_name: m.last_name.clone(),
        referral_code: m.referral_code.clone(),
        referred_by_member_id: m.referred_by.clone().unwrap_or_default(),
        registration_channel: channel_to_proto(m.channel),
        registration_store_id: m.store_id.clone(),
        registered_at: Some(timestamp(m.registered_at)),
        updated_at: Some(timestamp(m.updated_at)),
        ..Default::default()
    }
}

pub fn card_to_proto(c: &Card) -> pb::Card {
    let (status, block_reason, replaced_by) = match &c.status {
        CardStatus::Active => (
            pb::CardStatus::Active,
            pb::BlockReason::Unspecified,
            String::new(),
        ),
        CardStatus::Unbound => (
            pb::CardStatus::Unbound,
            pb::BlockReason::Unspecified,
            String::new(),
        ),
        CardStatus::Blocked(r) => (
            pb::CardStatus::Blocked,
            match r {
                BlockReason::Lost => pb::BlockReason::Lost,
                BlockReason::Stolen => pb::BlockReason::Stolen,
                BlockReason::Fraud => pb::BlockReason::Fraud,
            },
            String::new(),
        ),
        CardStatus::Replaced { by } => (
            pb::CardStatus::Replaced,
            pb::BlockReason::Unspecified,
            by.clone(),
        ),
    };
    pb::Card {
        tenant_id: c.tenant_id.clone(),
        number: c.number.clone(),
        kind: match c.kind {
            CardKind::Plastic => pb::CardKind::Plastic,
            CardKind::Virtual => pb::CardKind::Virtual,
            CardKind::NoName => pb::CardKind::NoName,
        } as i32,
        status: status as i32,
        member_id: c.member_id.clone().unwrap_or_default(),
        block_reason: block_reason as i32,
        replaced_by_number: replaced_by,
        issued_at: Some(timestamp(c.issued_at)),
    }
}

#[tonic::async_trait]
impl MemberService for Api {
    async fn register_member(
        &self,
        request: Request<pb::RegisterMemberRequest>,
    ) -> Result<Response<pb::RegisterMemberResponse>, Status> {
        let r = request.into_inner();
        let member = self
            .0
            .register(Registration {
                tenant_id: r.tenant_id,
                phone: r.phone,
                default_region: r.default_region,
                channel: channel(r.channel),
                store_id: r.store_id,
                referral_code: r.referral_code,
                email: r.email,
                first_name: r.first_name,
                last_name: r.last_name,
            })
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::RegisterMemberResponse {
            member: Some(self.shown(&member, &Profile::default())),
        }))
    }

    async fn get_member(
        &self,
        request: Request<pb::GetMemberRequest>,
    ) -> Result<Response<pb::GetMemberResponse>, Status> {
        let r = request.into_inner();
        let (member, cards) = self
            .0
            .member(&r.tenant_id, &r.member_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetMemberResponse {
            member: Some(self.view(&member).await?),
            cards: cards.iter().map(card_to_proto).collect(),
        }))
    }

    async fn lookup_member(
        &self,
        request: Request<pb::LookupMemberRequest>,
    ) -> Result<Response<pb::LookupMemberResponse>, Status> {
        let r = request.into_inner();
        use pb::lookup_member_request::Key;
        let member = match r.key {
            Some(Key::CardNumber(number)) => {
                let found = self
                    .0
                    .lookup_by_card(&r.tenant_id, &number)
                    .await
                    .map_err(to_status)?;
                // Active (a lookup answers no other), so there is no block reason to read.
                return Ok(Response::new(pb::LookupMemberResponse {
                    member: Some(self.shown(&found.member, &found.profile)),
                    card: Some(card_to_proto(&found.card)),
                }));
            }
            Some(Key::Phone(phone)) => self
                .0
                .lookup_by_phone(&r.tenant_id, &phone, &r.default_region)
                .await
                .map_err(to_status)?,
            Some(Key::Email(email)) => self
                .0
                .lookup_by_email(&r.tenant_id, &email)
                .await
                .map_err(to_status)?,
            None => {
                return Err(to_status(loyalty_platform::Error::invalid(
                    "key",
                    "one of card_number, phone or email is required",
                )));
            }
        };
        Ok(Response::new(pb::LookupMemberResponse {
            member: Some(self.view(&member).await?),
            card: None,
        }))
    }

    async fn merge_members(
        &self,
        request: Request<pb::MergeMembersRequest>,
    ) -> Result<Response<pb::MergeMembersResponse>, Status> {
        let audit = audit(&request);
        let r = request.into_inner();
        let survivor = self
            .0
            .merge(
                &r.tenant_id,
                &r.survivor_member_id,
                &r.duplicate_member_id,
                audit,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::MergeMembersResponse {
            survivor: Some(self.view(&survivor).await?),
        }))
    }

    async fn erase_member(
        &self,
        request: Request<pb::EraseMemberRequest>,
    ) -> Result<Response<pb::EraseMemberResponse>, Status> {
        let audit = audit(&request);
        let r = request.into_inner();
        let member = self
            .0
            .erase(&r.tenant_id, &r.member_id, audit)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::EraseMemberResponse {
            member: Some(self.view(&member).await?),
        }))
    }

    async fn block_member(
        &self,
        request: Request<pb::BlockMemberRequest>,
    ) -> Result<Response<pb::BlockMemberResponse>, Status> {
        let audit = audit(&request);
        let r = request.into_inner();
        let before = self.before(&r.tenant_id, &r.member_id).await;
        let member = self
            .0
            .block(&r.tenant_id, &r.member_id, &r.reason, audit)
            .await
            .map_err(to_status)?;
        let response = Response::new(pb::BlockMemberResponse {
            member: Some(self.view(&member).await?),
        });
        Ok(match before {
            Some(b) => with_before(response, &pb::BlockMemberResponse { member: Some(b) }),
            None => response,
        })
    }

    async fn unblock_member(
        &self,
        request: Request<pb::UnblockMemberRequest>,
    ) -> Result<Response<pb::UnblockMemberResponse>, Status> {
        let audit = audit(&request);
        let r = request.into_inner();
        let before = self.before(&r.tenant_id, &r.member_id).await;
        let member = self
            .0
            .unblock(&r.tenant_id, &r.member_id, audit)
            .await
            .map_err(to_status)?;
        let response = Response::new(pb::UnblockMemberResponse {
            member: Some(self.view(&member).await?),
        });
        Ok(match before {
            Some(b) => with_before(response, &pb::UnblockMemberResponse { member: Some(b) }),
            None => response,
        })
    }

    async fn list_members(
        &self,
        request: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        let r = request.into_inner();
        let size = match r.page_size {
            0 => 100,
            n => usize::try_from(n).unwrap_or(0),
        };
        let members = self
            .0
            .list_members(&r.tenant_id, &r.page_token, size)
            .await
            .map_err(to_status)?;
        let next_page_token = match members.last() {
            Some(last) if members.len() == size => last.member_id.clone(),
            _ => String::new(),
        };
        let mut shown = Vec::with_capacity(members.len());
        for m in &members {
            let mut view = self.view(m).await?;
            if m.status == MemberStatus::Merged {
                view.merged_into_member_id = self
                    .0
                    .merged_into(&m.tenant_id, &m.member_id)
                    .await
                    .map_err(to_status)?;
            }
            shown.push(view);
        }
        Ok(Response::new(pb::ListMembersResponse {
            members: shown,
            next_page_token,
        }))
    }

    async fn replay_member_events(
        &self,
        request: Request<pb::ReplayMemberEventsRequest>,
    ) -> Result<Response<pb::ReplayMemberEventsResponse>, Status> {
        let r = request.into_inner();
        let source = crate::publish::MemberReplay(self.0.clone());
        let (events, next_cursor) =
            loyalty_platform::replay::answer(&source, &r.cursor, r.limit).await?;
        Ok(Response::new(pb::ReplayMemberEventsResponse {
            events,
            next_cursor,
        }))
    }

    async fn import_members(
        &self,
        request: Request<Streaming<pb::ImportMembersRequest>>,
    ) -> Result<Response<ImportStream>, Status> {
        let mut incoming = request.into_inner();
        let identity = self.0.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            // One import per stream: the first chunk names tenant and import for the rest.
            let mut named: Option<(String, String)> = None;
            loop {
                let chunk = match incoming.message().await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => return,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let (tenant, import) =
                    named.get_or_insert_with(|| (chunk.tenant_id.clone(), chunk.import_id.clone()));
                let answer = if (&chunk.tenant_id, &chunk.import_id) != (&*tenant, &*import) {
                    Err(to_status(loyalty_platform::Error::invalid(
                        "import_id",
                        "every message of one stream names the same tenant and import",
                    )))
                } else if chunk.rows.len() > MAX_IMPORT_ROWS {
                    Err(to_status(loyalty_platform::Error::invalid(
                        "rows",
                        format!("at most {MAX_IMPORT_ROWS} rows per message"),
                    )))
                } else {
                    let rows: Vec<RowInput> = chunk.rows.into_iter().map(row_input).collect();
                    identity
                        .import_members(tenant, import, &rows)
                        .await
                        .map(|outcome| pb::ImportMembersResponse {
                            rows_imported: i64::try_from(outcome.imported).unwrap_or(i64::MAX),
                            errors: outcome
                                .errors
                                .into_iter()
                                .map(|e| pb::ImportRowError {
                                    row_number: e.row_number,
                                    field: e.field,
                                    description: e.description,
                                })
                                .collect(),
                        })
                        .map_err(to_status)
                };
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    return; // the client went away, or the stream ends on its error
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn update_profile(
        &self,
        request: Request<pb::UpdateProfileRequest>,
    ) -> Result<Response<pb::UpdateProfileResponse>, Status> {
        let r = request.into_inner();
        let update = profile_update(r.member, &r.update_mask).map_err(to_status)?;
        let before = self.before(&r.tenant_id, &r.member_id).await;
        let (member, profile) = self
            .0
            .update_profile(&r.tenant_id, &r.member_id, update)
            .await
            .map_err(to_status)?;
        let response = Response::new(pb::UpdateProfileResponse {
            member: Some(self.shown(&member, &profile)),
        });
        Ok(match before {
            Some(b) => with_before(response, &pb::UpdateProfileResponse { member: Some(b) }),
            None => response,
        })
    }

    async fn set_consents(
        &self,
        request: Request<pb::SetConsentsRequest>,
    ) -> Result<Response<pb::SetConsentsResponse>, Status> {
        let r = request.into_inner();
        let consents: Vec<(Option<ConsentChannel>, bool, String)> = r
            .consents
            .into_iter()
            .map(|c| {
                let channel = match pb::ConsentChannel::try_from(c.channel) {
                    Ok(pb::ConsentChannel::Sms) => Some(ConsentChannel::Sms),
                    Ok(pb::ConsentChannel::Email) => Some(ConsentChannel::Email),
                    Ok(pb::ConsentChannel::Push) => Some(ConsentChannel::Push),
                    Ok(pb::ConsentChannel::Messenger) => Some(ConsentChannel::Messenger),
                    Ok(pb::ConsentChannel::Unspecified) | Err(_) => None,
                };
                (channel, c.granted, c.source)
            })
            .collect();
        let (member, profile) = self
            .0
            .set_consents(&r.tenant_id, &r.member_id, &consents)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::SetConsentsResponse {
            member: Some(self.shown(&member, &profile)),
        }))
    }
}

#[tonic::async_trait]
impl CardService for Api {
    async fn issue_card(
        &self,
        request: Request<pb::IssueCardRequest>,
    ) -> Result<Response<pb::IssueCardResponse>, Status> {
        let r = request.into_inner();
        let kind = match pb::CardKind::try_from(r.kind) {
            Ok(pb::CardKind::Virtual) => CardKind::Virtual,
            Ok(pb::CardKind::Plastic) => CardKind::Plastic,
            Ok(pb::CardKind::NoName) => CardKind::NoName,
            Ok(pb::CardKind::Unspecified) | Err(_) => {
                return Err(to_status(loyalty_platform::Error::invalid(
                    "kind",
                    "must be CARD_KIND_VIRTUAL or CARD_KIND_PLASTIC",
                )));
            }
        };
        let card = self
            .0
            .issue_card(&r.tenant_id, &r.member_id, kind, &r.number)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::IssueCardResponse {
            card: Some(card_to_proto(&card)),
        }))
    }

    async fn get_card(
        &self,
        request: Request<pb::GetCardRequest>,
    ) -> Result<Response<pb::GetCardResponse>, Status> {
        let r = request.into_inner();
        let card = self
            .0
            .card(&r.tenant_id, &r.number)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetCardResponse {
            card: Some(card_to_proto(&card)),
        }))
    }
    async fn import_card_range(
        &self,
        request: Request<pb::ImportCardRangeRequest>,
    ) -> Result<Response<pb::ImportCardRangeResponse>, Status> {
        let r = request.into_inner();
        let kind = match pb::CardKind::try_from(r.kind) {
            Ok(pb::CardKind::Plastic) => CardKind::Plastic,
            Ok(pb::CardKind::NoName) => CardKind::NoName,
            Ok(pb::CardKind::Virtual) => CardKind::Virtual,
            Ok(pb::CardKind::Unspecified) | Err(_) => {
                return Err(to_status(loyalty_platform::Error::invalid(
                    "kind",
                    "must be CARD_KIND_PLASTIC or CARD_KIND_NO_NAME",
                )));
            }
        };
        let created = self
            .0
            .import_card_range(&r.tenant_id, kind, &r.first_number, &r.last_number)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ImportCardRangeResponse {
            cards_created: i64::try_from(created).unwrap_or(i64::MAX),
        }))
    }

    async fn bind_card(
        &self,
        request: Request<pb::BindCardRequest>,
    ) -> Result<Response<pb::BindCardResponse>, Status> {
        let r = request.into_inner();
        let card = self
            .0
            .bind_card(&r.tenant_id, &r.number, &r.member_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::BindCardResponse {
            card: Some(card_to_proto(&card)),
        }))
    }

    async fn block_card(
        &self,
        request: Request<pb::BlockCardRequest>,
    ) -> Result<Response<pb::BlockCardResponse>, Status> {
        let r = request.into_inner();
        let reason = match pb::BlockReason::try_from(r.reason) {
            Ok(pb::BlockReason::Lost) => Some(BlockReason::Lost),
            Ok(pb::BlockReason::Stolen) => Some(BlockReason::Stolen),
            Ok(pb::BlockReason::Fraud) => Some(BlockReason::Fraud),
            Ok(pb::BlockReason::Unspecified) | Err(_) => None,
        };
        let before = self.0.card(&r.tenant_id, &r.number).await.ok();
        let card = self
            .0
            .block_card(&r.tenant_id, &r.number, reason)
            .await
            .map_err(to_status)?;
        let response = Response::new(pb::BlockCardResponse {
            card: Some(card_to_proto(&card)),
        });
        Ok(match before {
            Some(b) => with_before(
                response,
                &pb::BlockCardResponse {
                    card: Some(card_to_proto(&b)),
                },
            ),
            None => response,
        })
    }

    async fn replace_card(
        &self,
        request: Request<pb::ReplaceCardRequest>,
    ) -> Result<Response<pb::ReplaceCardResponse>, Status> {
        let r = request.into_inner();
        let (old, new) = self
            .0
            .replace_card(&r.tenant_id, &r.old_number, &r.new_number)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ReplaceCardResponse {
            old_card: Some(card_to_proto(&old)),
            new_card: Some(card_to_proto(&new)),
        }))
    }
}

#[tonic::async_trait]
impl ReferralService for Api {
    async fn resolve_referral_code(
        &self,
        request: Request<pb::ResolveReferralCodeRequest>,
    ) -> Result<Response<pb::ResolveReferralCodeResponse>, Status> {
        let r = request.into_inner();
        let member_id = self
            .0
            .resolve_referral_code(&r.tenant_id, &r.referral_code)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ResolveReferralCodeResponse { member_id }))
    }
}
