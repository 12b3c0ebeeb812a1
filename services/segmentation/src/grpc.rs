//! The thin gRPC adapter of the segmentation service.

use std::pin::Pin;

use loyalty_platform::audit::with_before;
use loyalty_platform::error::Error;
use loyalty_platform::grpc::{timestamp, to_status};
use loyalty_proto::common::v1::Decimal as PbDecimal;
use loyalty_proto::segmentation::v1 as pb;
use pb::segmentation_service_server::{SegmentationService, SegmentationServiceServer};
use rust_decimal::Decimal;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::features::Features;
use crate::rfm::{Named, Score};
use crate::service::Segmentation;
use crate::store::{SegmentDef, SegmentKind};

pub const SERVICE_NAMES: &[&str] = &["loyalty.segmentation.v1.SegmentationService"];

/// Members per message of a streamed segment.
const STREAM_CHUNK: usize = 1000;
/// Most member ids in one upload stream.
const MAX_UPLOAD_TOTAL: usize = 5_000_000;
/// Largest history page.
const MAX_PAGE: usize = 500;

pub fn add_routes(
    routes: tonic::service::Routes,
    segmentation: Segmentation,
    max_message_bytes: usize,
) -> tonic::service::Routes {
    routes.add_service(
        SegmentationServiceServer::new(Api(segmentation))
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes),
    )
}

#[derive(Debug, Clone)]
struct Api(Segmentation);

impl Api {
    /// A segment as the API shows it, with its current member count.
    async fn view(&self, def: SegmentDef) -> Result<pb::Segment, Status> {
        let count = self
            .0
            .store()
            .count(&def.tenant_id, &def.segment_id)
            .await
            .map_err(to_status)?;
        Ok(shown(def, count))
    }
}

fn shown(def: SegmentDef, member_count: u64) -> pb::Segment {
    pb::Segment {
        tenant_id: def.tenant_id,
        segment_id: def.segment_id,
        name: def.name,
        kind: match def.kind {
            SegmentKind::Dynamic => pb::SegmentKind::Dynamic,
            SegmentKind::Static => pb::SegmentKind::Static,
        } as i32,
        predicate: def.predicate,
        member_count: i64::try_from(member_count).unwrap_or(i64::MAX),
        version: def.version,
        update_time: Some(timestamp(def.update_time)),
    }
}

fn definition(segment: Option<pb::Segment>) -> Result<SegmentDef, Status> {
    let s = segment.ok_or_else(|| to_status(Error::invalid("segment", "is required")))?;
    let kind = match pb::SegmentKind::try_from(s.kind) {
        Ok(pb::SegmentKind::Dynamic) => SegmentKind::Dynamic,
        Ok(pb::SegmentKind::Static) => SegmentKind::Static,
        _ => {
            return Err(to_status(Error::invalid(
                "segment.kind",
                "must be SEGMENT_KIND_DYNAMIC or SEGMENT_KIND_STATIC",
            )));
        }
    };
    Ok(SegmentDef {
        tenant_id: s.tenant_id,
        segment_id: s.segment_id,
        name: s.name,
        kind,
        predicate: s.predicate,
        version: 0,
        update_time: 0,
    })
}

fn rfm_score(s: Score) -> pb::RfmScore {
    pb::RfmScore {
        recency: i32::from(s.recency),
        frequency: i32::from(s.frequency),
        monetary: i32::from(s.monetary),
        segment: match s.named {
            Named::Champions => pb::RfmSegment::Champions,
            Named::Loyal => pb::RfmSegment::Loyal,
            Named::PotentialLoyalists => pb::RfmSegment::PotentialLoyalist,
            Named::NewCustomers => pb::RfmSegment::NewCustomers,
            Named::Promising => pb::RfmSegment::Promising,
            Named::NeedAttention => pb::RfmSegment::NeedAttention,
            Named::AboutToSleep => pb::RfmSegment::AboutToSleep,
            Named::AtRisk => pb::RfmSegment::AtRisk,
            Named::CannotLose => pb::RfmSegment::CannotLose,
            Named::Hibernating => pb::RfmSegment::Hibernating,
            Named::Lost => pb::RfmSegment::Lost,
        } as i32,
    }
}

fn dec(d: Decimal) -> Option<PbDecimal> {
    Some(PbDecimal {
        value: d.normalize().to_string(),
    })
}

fn features(tenant_id: String, member_id: String, f: &Features, now: i64) -> pb::MemberFeatures {
    let last = |m: &std::collections::BTreeMap<String, crate::features::Affinity>| {
        m.iter()
            .map(|(k, a)| (k.clone(), timestamp(a.last)))
            .collect()
    };
    let w30 = f.window(30, now);
    let w365 = f.window(365, now);
    pb::MemberFeatures {
        tenant_id,
        member_id,
        first_purchase_time: f.first_purchase.map(timestamp),
        last_purchase_time: f.last_purchase.map(timestamp),
        purchase_count_30d: w30.count,
        purchase_count_365d: w365.count,
        purchase_count_total: f.total.count,
        spend_30d: dec(w30.spend),
        spend_365d: dec(w365.spend),
        spend_total: dec(f.total.spend),
        average_check: dec(f.average_check()),
        categories: last(&f.categories),
        brands: last(&f.brands),
        stores: last(&f.stores),
        points_balance: f.points_balance,
        points_total: (f.ledger.sequence > 0).then_some(f.ledger.total),
        tier_id: f.member.tier_id.clone(),
        registered_at: f.member.registered_at.map(timestamp),
        birthday: f
            .member
            .birthday
            .map(|(m, d, y)| loyalty_proto::common::v1::Date {
                year: y.unwrap_or(0),
                month: i32::try_from(m).unwrap_or(0),
                day: i32::try_from(d).unwrap_or(0),
            }),
        contactable: f.member.consents.any(),
        questionnaire_complete: f.member.questionnaire_complete,
    }
}

fn page_size(requested: i32, default: usize) -> usize {
    usize::try_from(requested)
        .ok()
        .filter(|n| *n > 0)
        .unwrap_or(default)
        .min(MAX_PAGE)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Result<String, Status> {
    let bad = || {
        to_status(Error::invalid(
            "page_token",
            "is not a token this service issued",
        ))
    };
    if !text.len().is_multiple_of(2) || text.len() > 4096 {
        return Err(bad());
    }
    let bytes = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| bad())?;
    String::from_utf8(bytes).map_err(|_| bad())
}

type MemberStream =
    Pin<Box<dyn Stream<Item = Result<pb::StreamSegmentMembersResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SegmentationService for Api {
    async fn create_segment(
        &self,
        request: Request<pb::CreateSegmentRequest>,
    ) -> Result<Response<pb::CreateSegmentResponse>, Status> {
        let def = definition(request.into_inner().segment)?;
        let def = self.0.create(def).await.map_err(to_status)?;
        Ok(Response::new(pb::CreateSegmentResponse {
            segment: Some(self.view(def).await?),
        }))
    }

    async fn update_segment(
        &self,
        request: Request<pb::UpdateSegmentRequest>,
    ) -> Result<Response<pb::UpdateSegmentResponse>, Status> {
        let r = request.into_inner();
        let def = definition(r.segment)?;
        let before = match self.0.get(&def.tenant_id, &def.segment_id).await {
            Ok(b) => self.view(b).await.ok(),
            Err(_) => None,
        };
        let def = self
            .0
            .update(def, r.expected_version)
            .await
            .map_err(to_status)?;
        let response = Response::new(pb::UpdateSegmentResponse {
            segment: Some(self.view(def).await?),
        });
        Ok(match before {
            Some(b) => with_before(response, &pb::UpdateSegmentResponse { segment: Some(b) }),
            None => response,
        })
    }

    async fn get_segment(
        &self,
        request: Request<pb::GetSegmentRequest>,
    ) -> Result<Response<pb::GetSegmentResponse>, Status> {
        let r = request.into_inner();
        let def = self
            .0
            .get(&r.tenant_id, &r.segment_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetSegmentResponse {
            segment: Some(self.view(def).await?),
        }))
    }

    async fn list_segments(
        &self,
        request: Request<pb::ListSegmentsRequest>,
    ) -> Result<Response<pb::ListSegmentsResponse>, Status> {
        let r = request.into_inner();
        let size = page_size(r.page_size, 100);
        let mut defs = self.0.list(&r.tenant_id).await.map_err(to_status)?;
        if !r.page_token.is_empty() {
            let after = unhex(&r.page_token)?;
            defs.retain(|d| d.segment_id > after);
        }
        let next = if defs.len() > size {
            defs.truncate(size);
            defs.last()
                .map(|d| hex(d.segment_id.as_bytes()))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let mut segments = Vec::with_capacity(defs.len());
        for def in defs {
            segments.push(self.view(def).await?);
        }
        Ok(Response::new(pb::ListSegmentsResponse {
            segments,
            next_page_token: next,
        }))
    }

    async fn delete_segment(
        &self,
        request: Request<pb::DeleteSegmentRequest>,
    ) -> Result<Response<pb::DeleteSegmentResponse>, Status> {
        let r = request.into_inner();
        self.0
            .delete(&r.tenant_id, &r.segment_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DeleteSegmentResponse {}))
    }

    async fn upload_segment_members(
        &self,
        request: Request<Streaming<pb::UploadSegmentMembersRequest>>,
    ) -> Result<Response<pb::UploadSegmentMembersResponse>, Status> {
        let mut stream = request.into_inner();
        let mut target: Option<(String, String)> = None;
        let mut total = 0usize;
        while let Some(message) = stream.message().await? {
            total += message.member_ids.len();
            if total > MAX_UPLOAD_TOTAL {
                return Err(to_status(Error::invalid(
                    "member_ids",
                    format!(
                        "at most {MAX_UPLOAD_TOTAL} members per upload; the members so far are saved, send the rest in another upload"
                    ),
                )));
            }
            let this = (message.tenant_id.clone(), message.segment_id.clone());
            match &target {
                None => target = Some(this),
                Some(t) if *t != this => {
                    return Err(to_status(Error::invalid(
                        "segment_id",
                        "every message of an upload names the same tenant and segment",
                    )));
                }
                Some(_) => {}
            }
            self.0
                .upload(&message.tenant_id, &message.segment_id, &message.member_ids)
                .await
                .map_err(to_status)?;
        }
        let Some((tenant, segment)) = target else {
            return Err(to_status(Error::invalid(
                "member_ids",
                "the upload was empty",
            )));
        };
        let count = self.0.count(&tenant, &segment).await.map_err(to_status)?;
        Ok(Response::new(pb::UploadSegmentMembersResponse {
            member_count: i64::try_from(count).unwrap_or(i64::MAX),
            unknown_member_ids: Vec::new(),
        }))
    }

    async fn get_member_segments(
        &self,
        request: Request<pb::GetMemberSegmentsRequest>,
    ) -> Result<Response<pb::GetMemberSegmentsResponse>, Status> {
        let r = request.into_inner();
        let segment_ids = self
            .0
            .member_segments(&r.tenant_id, &r.member_id)
            .await
            .map_err(to_status)?;
        let rfm = self
            .0
            .member_rfm(&r.tenant_id, &r.member_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetMemberSegmentsResponse {
            segment_ids,
            rfm: rfm.map(rfm_score),
        }))
    }

    async fn count_segment_members(
        &self,
        request: Request<pb::CountSegmentMembersRequest>,
    ) -> Result<Response<pb::CountSegmentMembersResponse>, Status> {
        let r = request.into_inner();
        let count = self
            .0
            .count(&r.tenant_id, &r.segment_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CountSegmentMembersResponse {
            member_count: i64::try_from(count).unwrap_or(i64::MAX),
        }))
    }

    async fn stream_segment_members(
        &self,
        request: Request<pb::StreamSegmentMembersRequest>,
    ) -> Result<Response<MemberStream>, Status> {
        let r = request.into_inner();
        self.0
            .get(&r.tenant_id, &r.segment_id)
            .await
            .map_err(to_status)?;
        let segmentation = self.0.clone();
        // Pages are read one at a time as the client takes them, so memory stays bounded
        // whatever the segment's size.
        let stream = futures_util_unfold(segmentation, r.tenant_id, r.segment_id);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_membership_history(
        &self,
        request: Request<pb::GetMembershipHistoryRequest>,
    ) -> Result<Response<pb::GetMembershipHistoryResponse>, Status> {
        let r = request.into_inner();
        let before = if r.page_token.is_empty() {
            None
        } else {
            Some(unhex(&r.page_token)?)
        };
        let (changes, next) = self
            .0
            .history(
                &r.tenant_id,
                &r.member_id,
                before,
                page_size(r.page_size, 100),
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetMembershipHistoryResponse {
            changes: changes
                .into_iter()
                .map(|c| pb::MembershipChange {
                    segment_id: c.segment_id,
                    entered: c.entered,
                    change_time: Some(timestamp(c.time)),
                })
                .collect(),
            next_page_token: next.map(|k| hex(k.as_bytes())).unwrap_or_default(),
        }))
    }

    async fn get_member_features(
        &self,
        request: Request<pb::GetMemberFeaturesRequest>,
    ) -> Result<Response<pb::GetMemberFeaturesResponse>, Status> {
        // Analysts see no personal data: the birthday (which segments read) stays here.
        let analyst = loyalty_platform::access::caller(&request)
            .is_ok_and(|p| p.role == loyalty_platform::access::Role::Analyst);
        let r = request.into_inner();
        let f = self
            .0
            .features(&r.tenant_id, &r.member_id)
            .await
            .map_err(to_status)?;
        let now = self.0.now();
        let mut shown = features(r.tenant_id, r.member_id, &f, now);
        if analyst {
            shown.birthday = None;
        }
        Ok(Response::new(pb::GetMemberFeaturesResponse {
            features: Some(shown),
        }))
    }

    async fn get_member_rfm(
        &self,
        request: Request<pb::GetMemberRfmRequest>,
    ) -> Result<Response<pb::GetMemberRfmResponse>, Status> {
        let r = request.into_inner();
        let score = self
            .0
            .member_rfm(&r.tenant_id, &r.member_id)
            .await
            .map_err(to_status)?
            .ok_or_else(|| {
                to_status(Error::NotFound(format!(
                    "member {} has no RFM score: no purchase yet, or none before the last computation",
                    r.member_id
                )))
            })?;
        Ok(Response::new(pb::GetMemberRfmResponse {
            rfm: Some(rfm_score(score)),
        }))
    }

    async fn recompute_rfm(
        &self,
        request: Request<pb::RecomputeRfmRequest>,
    ) -> Result<Response<pb::RecomputeRfmResponse>, Status> {
        let r = request.into_inner();
        let run = self
            .0
            .recompute_rfm(&r.tenant_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::RecomputeRfmResponse {
            member_count: i64::try_from(run.members).unwrap_or(i64::MAX),
            compute_time: Some(timestamp(run.computed_at)),
        }))
    }

    async fn preview_segment(
        &self,
        request: Request<pb::PreviewSegmentRequest>,
    ) -> Result<Response<pb::PreviewSegmentResponse>, Status> {
        let r = request.into_inner();
        let sample = usize::try_from(r.sample_size).unwrap_or(0);
        let (count, sample) = self
            .0
            .preview(&r.tenant_id, &r.predicate, sample)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::PreviewSegmentResponse {
            member_count: i64::try_from(count).unwrap_or(i64::MAX),
            sample_member_ids: sample,
        }))
    }

    async fn explain_membership(
        &self,
        request: Request<pb::ExplainMembershipRequest>,
    ) -> Result<Response<pb::ExplainMembershipResponse>, Status> {
        let r = request.into_inner();
        let (member, clauses) = self
            .0
            .explain(&r.tenant_id, &r.segment_id, &r.member_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ExplainMembershipResponse {
            member,
            conditions: clauses
                .into_iter()
                .map(|c| pb::Condition {
                    text: c.text,
                    holds: c.holds,
                    values: c.values,
                })
                .collect(),
        }))
    }
}

/// The members of a segment as a stream of chunks, one store page per chunk.
fn futures_util_unfold(
    segmentation: Segmentation,
    tenant: String,
    segment: String,
) -> impl Stream<Item = Result<pb::StreamSegmentMembersResponse, Status>> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        let mut after = String::new();
        loop {
            let page = segmentation
                .members_page(&tenant, &segment, &after, STREAM_CHUNK)
                .await;
            let page = match page {
                Ok(p) => p,
                Err(err) => {
                    let _ = tx.send(Err(to_status(err))).await;
                    return;
                }
            };
            let Some(last) = page.last().cloned() else {
                return;
            };
            let done = page.len() < STREAM_CHUNK;
            if tx
                .send(Ok(pb::StreamSegmentMembersResponse { member_ids: page }))
                .await
                .is_err()
            {
                return; // the client went away
            }
            if done {
                return;
            }
            after = last;
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
