//! The gRPC adapter of `loyalty.reporting.v1.AuditService`: the audit log, listed and
//! exported (admins only, by the access policy).

use std::pin::Pin;

use loyalty_platform::clock::{Clock, Millis, SystemClock};
use loyalty_platform::error::{Error, Violations};
use loyalty_platform::grpc::{millis, timestamp, to_status};
use loyalty_proto::common::v1::Actor;
use loyalty_proto::reporting::v1 as pb;
use pb::audit_service_server::AuditService;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::Reporting;
use crate::audit::{
    AuditEntry, AuditQuery, DEFAULT_PAGE, MAX_PAGE, Order, decode_cursor, encode_cursor,
};

/// Records per export chunk.
const CHUNK: usize = 500;
/// An export without an end stops before a call of this last while still running.
const OPEN_GRACE_MS: Millis = 15 * 60_000;

#[derive(Debug, Clone)]
pub struct AuditApi {
    reporting: Reporting,
}

impl AuditApi {
    pub fn new(reporting: Reporting) -> Self {
        Self { reporting }
    }
}

/// The query a request's tenant and filter name; `until`: the end when the filter has none.
fn query(
    tenant_id: &str,
    filter: Option<pb::AuditFilter>,
    until: Option<Millis>,
) -> Result<AuditQuery, Status> {
    let mut v = Violations::new();
    v.text(tenant_id, "tenant_id", 64);
    v.finish().map_err(to_status)?;
    let f = filter.unwrap_or_default();
    AuditQuery::new(
        f.start_time.as_ref().map(millis),
        f.end_time.as_ref().map(millis).or(until),
        &f.method,
        &f.key_id,
        &f.member_id,
    )
    .map_err(to_status)
}

fn record(e: AuditEntry) -> pb::AuditRecord {
    let actor = (!e.actor_id.is_empty() || !e.actor_comment.is_empty()).then_some(Actor {
        id: e.actor_id,
        comment: e.actor_comment,
    });
    pb::AuditRecord {
        record_id: e.id,
        record_time: Some(timestamp(e.time)),
        key_id: e.key_id,
        role: e.role,
        actor,
        method: e.method,
        member_id: e.member_id,
        status_code: e.status_code,
        status_message: e.status_message,
        request_json: e.request,
        before_json: e.before,
        after_json: e.after,
        in_flight: e.in_flight,
    }
}

type ExportStream =
    Pin<Box<dyn Stream<Item = Result<pb::ExportAuditRecordsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn list_audit_records(
        &self,
        request: Request<pb::ListAuditRecordsRequest>,
    ) -> Result<Response<pb::ListAuditRecordsResponse>, Status> {
        let r = request.into_inner();
        let q = query(&r.tenant_id, r.filter, None)?;
        let limit = match r.page_size {
            0 => DEFAULT_PAGE,
            n if n < 0 || n as usize > MAX_PAGE => {
                return Err(to_status(Error::invalid(
                    "page_size",
                    format!("between 1 and {MAX_PAGE}"),
                )));
            }
            n => n as usize,
        };
        let after = decode_cursor("page_token", &r.page_token).map_err(to_status)?;
        let page = self
            .reporting
            .audit_page(&r.tenant_id, &q, Order::NewestFirst, after, limit)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListAuditRecordsResponse {
            records: page.entries.into_iter().map(record).collect(),
            next_page_token: page.next.as_ref().map(encode_cursor).unwrap_or_default(),
        }))
    }

    async fn export_audit_records(
        &self,
        request: Request<pb::ExportAuditRecordsRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        let r = request.into_inner();
        // Without an end, the export ends at its start (a bounded snapshot), and before the
        // first call of the last 15 minutes still running: its answer takes the start's
        // place, so a resumed export reads it again, answered. A start older than that (its
        // process ended before answering) is exported as it stands.
        query(&r.tenant_id, r.filter.clone(), None)?;
        let now = SystemClock.now_ms();
        let mut until = now + 1;
        if r.filter
            .as_ref()
            .and_then(|f| f.end_time.as_ref())
            .is_none()
        {
            let open = self
                .reporting
                .oldest_open_audit(&r.tenant_id, now - OPEN_GRACE_MS)
                .await
                .map_err(to_status)?;
            until = open.map_or(until, |t| t.min(until));
        }
        let from = r
            .filter
            .as_ref()
            .and_then(|f| f.start_time.as_ref())
            .map(millis);
        if from.is_some_and(|from| from >= until) {
            // Nothing to read yet: the caller resumes later with the same token.
            return Ok(Response::new(Box::pin(tokio_stream::empty())));
        }
        let q = query(&r.tenant_id, r.filter, Some(until))?;
        let mut after = decode_cursor("resume_token", &r.resume_token).map_err(to_status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let reporting = self.reporting.clone();
        let tenant = r.tenant_id;
        tokio::spawn(async move {
            loop {
                let page = reporting
                    .audit_page(&tenant, &q, Order::OldestFirst, after.clone(), CHUNK)
                    .await;
                let page = match page {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(to_status(e))).await;
                        return;
                    }
                };
                let last = page
                    .next
                    .clone()
                    .or_else(|| page.entries.last().map(|e| (e.time, e.id.clone())));
                let done = page.next.is_none();
                if !page.entries.is_empty() {
                    let chunk = pb::ExportAuditRecordsResponse {
                        records: page.entries.into_iter().map(record).collect(),
                        resume_token: last.as_ref().map(encode_cursor).unwrap_or_default(),
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                }
                if done {
                    return;
                }
                after = last;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
