//! The audit log: every change an admin makes, in any service, recorded by the access layer.
//!
//! A call is audited when its caller has the `admin` role (with authentication off, every
//! caller does), the RPC allows admins, and the RPC changes something (it is not one of
//! [`crate::access::policy::READS`]). The layer keeps a copy of the request's messages as they
//! reach the handler and of the response as it leaves. Each call is recorded twice under one
//! record id, on the `audit` stream:
//!
//! - its start, before the handler sees the request's first message: who (key id, role, the
//!   request's actor), when, what (the RPC, the request, the member it names), marked
//!   `in_flight`. If it cannot be written, the handler gets an error instead of the request,
//!   so nothing changes unaudited; a process killed later leaves this record behind.
//! - its answer, once the handler has answered: the same, with the outcome (gRPC status), the
//!   state after (the response) and, where the handler supplies it with [`with_before`], the
//!   state before. The call's status reaches the caller only once this record is in the
//!   stream (one that cannot be written is logged as an error and counted in
//!   `loyalty_audit_records_total{outcome="failed"}`).
//!
//! The reader keeps the answer over the start, whichever arrives first.
//!
//! Records carry no personal data and no secrets: the fields in [`REDACTED`] are replaced by
//! `"<redacted>"` before anything is written, so erasing a member leaves nothing behind here.
//! Reporting consumes the stream into its store, where records are listed and exported.

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use loyalty_proto::events::v1 as ev;
use loyalty_proto::reporting::v1 as pb;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};
use tonic::Status;
use tonic::body::Body;

use crate::access::policy::FieldPath;
use crate::access::{MethodRule, Principal, wire};
use crate::clock::Millis;
use crate::events::{AUDIT, SharedEventLog};

/// Request or response bytes kept per call; messages beyond are counted, not recorded.
pub const MAX_CAPTURE_BYTES: usize = 1024 * 1024;
/// Longest JSON rendering of a request, a before or an after; a longer one shows its lists by
/// their length, and is left out if that is still too long.
pub const MAX_JSON_BYTES: usize = 16 * 1024;
/// How long the layer waits for the stream to take a record.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Field names whose values never enter a record: personal data and secrets.
pub const REDACTED: &[&str] = &[
    // Personal data.
    "phone",
    "email",
    "first_name",
    "last_name",
    "gender",
    "birthday",
    "attributes",
    // What opens an account or spends money: key secrets, card numbers, referral codes,
    // gift certificate and coupon codes.
    "secret",
    "key",
    "number",
    "numbers",
    "card_numbers",
    "new_number",
    "old_number",
    "referral_code",
    "code",
    "codes",
];

/// The state a call changed, before it changed it: a message of the RPC's response type,
/// encoded. Handlers attach it with [`with_before`].
#[derive(Debug, Clone)]
pub struct AuditBefore(Vec<u8>);

/// Attaches `before` (a message of the RPC's response type, holding the state before the
/// call) to a response, for the audit record.
pub fn with_before<T, M: Message>(
    mut response: tonic::Response<T>,
    before: &M,
) -> tonic::Response<T> {
    response
        .extensions_mut()
        .insert(AuditBefore(before.encode_to_vec()));
    response
}

/// Where audit records go, and how they are rendered.
#[derive(Clone)]
pub struct AuditLog {
    log: SharedEventLog,
    /// Request and response types by RPC path (`/package.Service/Method`).
    methods: Arc<HashMap<String, (MessageDescriptor, MessageDescriptor)>>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("methods", &self.methods.len())
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Records of the loyalty API's calls, appended to `log`'s `audit` stream.
    pub fn new(log: SharedEventLog) -> anyhow::Result<Self> {
        let pool = DescriptorPool::decode(loyalty_proto::FILE_DESCRIPTOR_SET)?;
        let methods = pool
            .services()
            .flat_map(|s| s.methods().collect::<Vec<_>>())
            .map(|m| {
                (
                    format!("/{}/{}", m.parent_service().full_name(), m.name()),
                    (m.input(), m.output()),
                )
            })
            .collect();
        Ok(Self {
            log,
            methods: Arc::new(methods),
        })
    }

    /// The record of one call: finished, or (`in_flight`) about to start.
    fn record(
        &self,
        call: &Call,
        after: &Capture,
        status: &Status,
        in_flight: bool,
    ) -> (String, pb::AuditRecord) {
        let request = call.request.lock().map(|c| c.clone()).unwrap_or_default();
        let first = request.messages().first().copied().unwrap_or_default();
        // A message cut by the capture still names its tenant and member near its start.
        let head = request.first_head();
        let read = |path: &Option<FieldPath>| -> String {
            let Some(path) = path else {
                return String::new();
            };
            let value = match wire::string_at(first, path) {
                Ok(Some(v)) => Some(v),
                _ => match path.as_slice() {
                    [number] => wire::leading_string(head, *number),
                    _ => None,
                },
            };
            value
                .map(|v| String::from_utf8_lossy(v).chars().take(128).collect())
                .unwrap_or_default()
        };
        // A tenant-bound caller acts for its own tenant (the access layer checked every
        // message); others name theirs in the request.
        let tenant_id: String = if call.principal.all_tenants {
            read(&call.rule.tenant)
        } else {
            call.principal.tenant_id.clone()
        };
        let member_id: String = read(&call.rule.member);
        let types = self.methods.get(&call.path);
        let (request_json, actor, before_json, after_json, sensitive) = match types {
            Some((input, output)) => {
                let before = call
                    .before
                    .as_ref()
                    .map(|b| render(output, &[b.0.as_slice()], false))
                    .unwrap_or_default();
                let after = if status.code() == tonic::Code::Ok {
                    render(output, &after.messages(), after.more())
                } else {
                    String::new()
                };
                // The request is decoded once: its JSON gives the actor, what to scrub
                // elsewhere, and (redacted) the record's request.
                let values = to_json(input, &request.messages());
                let (actor, sensitive) = (actor(values.first()), sensitive_values(&values));
                // A start shows the first message alone, whatever follows it.
                (
                    finish(values, request.more() && !in_flight),
                    actor,
                    before,
                    after,
                    sensitive,
                )
            }
            None => Default::default(),
        };
        // What the request carried in redacted fields, echoed anywhere else (an error
        // message, a row error), is redacted there too.
        let scrub = |text: String| -> String {
            sensitive
                .iter()
                .fold(text, |t, v| t.replace(v.as_str(), "<redacted>"))
        };
        let (before_json, after_json) = (scrub(before_json), scrub(after_json));
        let status_message = scrub(status.message().chars().take(1024).collect());
        let record = pb::AuditRecord {
            record_id: call.record_id.clone(),
            record_time: Some(crate::grpc::timestamp(call.started)),
            key_id: call.principal.key_id.clone(),
            role: call.principal.role.name().to_string(),
            actor,
            method: call.path.trim_start_matches('/').to_string(),
            member_id,
            status_code: status.code() as i32,
            status_message,
            request_json,
            before_json,
            after_json,
            in_flight,
        };
        (tenant_id, record)
    }

    /// Writes the record of `call` on a task of its own, so it completes even when the
    /// call's caller goes away; the handle tells when it is done.
    fn spawn(&self, call: Call, after: Capture, status: Status) -> tokio::task::JoinHandle<()> {
        let log = self.clone();
        tokio::spawn(async move { log.write(call, after, status).await })
    }

    /// Appends the record of `call`'s answer; failures are logged and counted, never returned.
    async fn write(&self, call: Call, after: Capture, status: Status) {
        let _ = self.append(&call, &after, &status, false).await;
    }

    /// Appends the record of `call`'s start, before its handler sees the request.
    async fn write_start(&self, call: &Call) -> Result<(), Status> {
        let unknown = Status::unknown(
            "no answer recorded: the call is running, or its process ended before answering",
        );
        self.append(call, &Capture::default(), &unknown, true).await
    }

    /// Appends one record of `call`; failures are logged, counted and returned.
    async fn append(
        &self,
        call: &Call,
        after: &Capture,
        status: &Status,
        in_flight: bool,
    ) -> Result<(), Status> {
        let (tenant_id, record) = self.record(call, after, status, in_flight);
        if tenant_id.is_empty() {
            tracing::error!(method = %call.path, key_id = %call.principal.key_id, "an audit record names no tenant; it is kept under tenant \"-\"");
        }
        let tenant_id = if tenant_id.is_empty() {
            "-".to_string()
        } else {
            tenant_id
        };
        let suffix = if in_flight { "/start" } else { "" };
        let event = ev::Event {
            event_id: format!("audit/{tenant_id}/{}{suffix}", record.record_id),
            tenant_id,
            event_time: record.record_time,
            kind: Some(ev::event::Kind::Audit(record)),
        };
        let written = tokio::time::timeout(
            WRITE_TIMEOUT,
            self.log.append(AUDIT, &[event.encode_to_vec()]),
        )
        .await;
        let (outcome, result) = match written {
            Ok(Ok(())) => ("written", Ok(())),
            Ok(Err(e)) => {
                tracing::error!(error = %e, method = %call.path, key_id = %call.principal.key_id, in_flight, "an audit record could not be written");
                ("failed", Err(e.to_string()))
            }
            Err(_) => {
                tracing::error!(method = %call.path, key_id = %call.principal.key_id, in_flight, "an audit record could not be written in time");
                ("failed", Err("timed out".to_string()))
            }
        };
        metrics::counter!("loyalty_audit_records_total", "outcome" => outcome).increment(1);
        result.map_err(|e| {
            Status::unavailable(format!(
                "the audit log could not be written ({e}), so the call was not made"
            ))
        })
    }
}

/// The actor a request names in its top-level `actor` field (`message`: its JSON).
fn actor(message: Option<&serde_json::Value>) -> Option<loyalty_proto::common::v1::Actor> {
    let actor = message?.get("actor")?;
    let text = |name: &str| {
        actor
            .get(name)
            .and_then(serde_json::Value::as_str)
            .map(|s| s.chars().take(256).collect::<String>())
            .unwrap_or_default()
    };
    Some(loyalty_proto::common::v1::Actor {
        id: text("id"),
        comment: text("comment"),
    })
}

/// Messages as protobuf JSON with proto field names, as they are (not redacted).
fn to_json(descriptor: &MessageDescriptor, messages: &[&[u8]]) -> Vec<serde_json::Value> {
    let options = SerializeOptions::new().use_proto_field_name(true);
    messages
        .iter()
        .map(|m| match DynamicMessage::decode(descriptor.clone(), *m) {
            Ok(d) => d
                .serialize_with_options(serde_json::value::Serializer, &options)
                .unwrap_or_else(|e| serde_json::Value::String(format!("<not rendered: {e}>"))),
            Err(_) => serde_json::Value::String("<not a valid message>".into()),
        })
        .collect()
}

/// Messages as protobuf JSON with proto field names, redacted and bounded: one message as an
/// object, several as an array (ending in a note when more were not kept).
pub fn render(descriptor: &MessageDescriptor, messages: &[&[u8]], more: bool) -> String {
    finish(to_json(descriptor, messages), more)
}

/// [`render`] of messages already in JSON.
fn finish(mut values: Vec<serde_json::Value>, more: bool) -> String {
    for v in &mut values {
        redact(v);
    }
    let mut value = match (values.len(), more) {
        (0, false) => return String::new(),
        (1, false) => values.pop().unwrap_or_default(),
        _ => {
            if more {
                values.push(serde_json::Value::String("<more messages not kept>".into()));
            }
            serde_json::Value::Array(values)
        }
    };
    let text = value.to_string();
    if text.len() <= MAX_JSON_BYTES {
        return text;
    }
    shorten_lists(&mut value, 0);
    let text = value.to_string();
    if text.len() <= MAX_JSON_BYTES {
        return text;
    }
    serde_json::json!({ "omitted": format!("{} bytes of JSON, over the audit limit", text.len()) })
        .to_string()
}

/// The string values of [`REDACTED`] fields in `messages` (their JSON; values of at least
/// 4 characters, so a short one does not blank ordinary text), longest first.
fn sensitive_values(messages: &[serde_json::Value]) -> Vec<String> {
    fn collect(value: &serde_json::Value, under_redacted: bool, out: &mut Vec<String>) {
        match value {
            serde_json::Value::String(s) if under_redacted && s.chars().count() >= 4 => {
                out.push(s.clone());
            }
            serde_json::Value::Object(fields) => {
                for (name, v) in fields {
                    collect(v, under_redacted || REDACTED.contains(&name.as_str()), out);
                }
            }
            serde_json::Value::Array(items) => {
                items.iter().for_each(|v| collect(v, under_redacted, out));
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for m in messages {
        collect(m, false, &mut out);
    }
    out.sort_by_key(|v| std::cmp::Reverse(v.len()));
    out.dedup();
    out
}

/// Replaces the values of [`REDACTED`] fields, at any depth, by `"<redacted>"`.
fn redact(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(fields) => {
            for (name, v) in fields.iter_mut() {
                if REDACTED.contains(&name.as_str()) {
                    *v = serde_json::Value::String("<redacted>".into());
                } else {
                    redact(v);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// Replaces every list below the top by its length.
fn shorten_lists(value: &mut serde_json::Value, depth: usize) {
    match value {
        serde_json::Value::Array(items) if depth > 0 => {
            *value = serde_json::Value::String(format!("<{} items>", items.len()));
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| shorten_lists(v, 1)),
        serde_json::Value::Object(fields) => fields
            .values_mut()
            .for_each(|v| shorten_lists(v, depth + 1)),
        _ => {}
    }
}

/// Bytes of a gRPC message stream, as far as they are kept.
#[derive(Debug, Clone, Default)]
pub(crate) struct Capture {
    kept: Vec<u8>,
    seen: usize,
}

impl Capture {
    fn push(&mut self, data: &[u8]) {
        self.seen += data.len();
        let room = MAX_CAPTURE_BYTES.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// The complete, uncompressed messages kept.
    fn messages(&self) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut rest = self.kept.as_slice();
        while rest.len() >= 5 {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            if rest.len() < 5 + len {
                break;
            }
            if rest[0] == 0 {
                out.push(&rest[5..5 + len]);
            }
            rest = &rest[5 + len..];
        }
        out
    }

    /// The kept bytes of the first message (all of it, or its start when it was cut).
    fn first_head(&self) -> &[u8] {
        if self.kept.len() < 5 || self.kept[0] != 0 {
            return &[];
        }
        let len =
            u32::from_be_bytes([self.kept[1], self.kept[2], self.kept[3], self.kept[4]]) as usize;
        &self.kept[5..self.kept.len().min(5 + len)]
    }

    /// The first message has arrived whole (in any encoding), or more than is kept.
    fn has_first(&self) -> bool {
        if self.kept.len() >= 5 {
            let len = u32::from_be_bytes([self.kept[1], self.kept[2], self.kept[3], self.kept[4]])
                as usize;
            if self.kept.len() >= 5 + len {
                return true;
            }
        }
        self.seen > self.kept.len()
    }

    /// Bytes went by that were not kept (or a message was cut).
    fn more(&self) -> bool {
        let complete: usize = self.messages().iter().map(|m| m.len() + 5).sum();
        self.seen > complete
    }
}

/// An audited call, while it runs.
#[derive(Clone)]
pub(crate) struct Call {
    /// Shared by the records of its start and of its answer: time-ordered (UUID v7).
    pub record_id: String,
    /// When the call reached the service.
    pub started: Millis,
    pub path: String,
    pub principal: Principal,
    pub rule: Arc<MethodRule>,
    pub request: Arc<Mutex<Capture>>,
    pub before: Option<AuditBefore>,
}

type BodyFrame = Option<Result<Frame<Bytes>, Status>>;

/// A request body that keeps a copy of what passes to the handler, and holds the frame that
/// completes the first message (or ends the body) until the record of the call's start is
/// written.
pub(crate) struct Tapped {
    inner: Body,
    capture: Arc<Mutex<Capture>>,
    /// The call whose start is still to be recorded.
    start: Option<(AuditLog, Call)>,
    writing: Option<tokio::task::JoinHandle<Result<(), Status>>>,
    held: Option<BodyFrame>,
}

impl Tapped {
    pub(crate) fn new(inner: Body, log: AuditLog, call: &Call) -> Self {
        Self {
            inner,
            capture: call.request.clone(),
            start: Some((log, call.clone())),
            writing: None,
            held: None,
        }
    }
}

impl http_body::Body for Tapped {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some(writing) = &mut this.writing {
            let written = ready!(Pin::new(writing).poll(cx))
                .unwrap_or_else(|e| Err(Status::internal(format!("audit: {e}"))));
            this.writing = None;
            let frame = this.held.take().flatten();
            return Poll::Ready(match written {
                Ok(()) => frame,
                Err(status) => Some(Err(status)),
            });
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        let mut first = !matches!(&frame, Some(Ok(_)));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
            && let Ok(mut capture) = this.capture.lock()
        {
            capture.push(data);
            first = capture.has_first();
        }
        if first && let Some((log, call)) = this.start.take() {
            // Written on a task of its own, so it completes even if the call is dropped.
            this.writing = Some(tokio::spawn(async move { log.write_start(&call).await }));
            this.held = Some(frame);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        // Not while the start is still to be written: an empty body ends only after it.
        self.start.is_none()
            && self.held.is_none()
            && self.writing.is_none()
            && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::default()
    }
}

/// An audited call whose handler has not answered yet: dropped before it does (the caller
/// reset the call, or the request timed out), it records the call as cancelled.
pub(crate) struct Pending(Option<(AuditLog, Call)>);

impl Pending {
    pub(crate) fn new(log: AuditLog, call: Call) -> Self {
        Self(Some((log, call)))
    }

    /// The call, now that its handler answered (once).
    pub(crate) fn take(&mut self) -> Option<(AuditLog, Call)> {
        self.0.take()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some((log, call)) = self.0.take()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            log.spawn(
                call,
                Capture::default(),
                Status::cancelled("the call was cancelled before its handler answered"),
            );
        }
    }
}

/// Records `call` once its response is complete. A response that is already complete (an
/// error, sent as headers only) is recorded before it is returned.
pub(crate) async fn answer(
    log: AuditLog,
    mut call: Call,
    response: http::Response<Body>,
) -> http::Response<Body> {
    let (mut parts, body) = response.into_parts();
    call.before = parts.extensions.remove::<AuditBefore>();
    if let Some(status) = Status::from_header_map(&parts.headers) {
        // Written on its own task: dropping this call (its caller went away) does not
        // stop the record.
        let _ = log.spawn(call, Capture::default(), status).await;
        return http::Response::from_parts(parts, body);
    }
    let body = Audited {
        inner: body,
        log,
        call: Some(call),
        response: Capture::default(),
        writing: None,
        held: None,
    };
    http::Response::from_parts(parts, Body::new(body))
}

/// A response body that holds back its trailers (the call's status) until the call's record
/// is written.
struct Audited {
    inner: Body,
    log: AuditLog,
    call: Option<Call>,
    response: Capture,
    writing: Option<tokio::task::JoinHandle<()>>,
    held: Option<Frame<Bytes>>,
}

impl Audited {
    /// Starts writing the record, on its own task.
    fn start(&mut self, status: Status) {
        if let Some(call) = self.call.take() {
            let response = std::mem::take(&mut self.response);
            self.writing = Some(self.log.spawn(call, response, status));
        }
    }
}

impl Drop for Audited {
    /// A body dropped before its end (the caller reset the stream, or the server stopped
    /// waiting): the call is recorded as cancelled, with what was sent of its answer.
    fn drop(&mut self) {
        if self.call.is_some() && tokio::runtime::Handle::try_current().is_ok() {
            self.start(Status::cancelled(
                "the caller went away before the call's status was sent",
            ));
        }
    }
}

impl http_body::Body for Audited {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if let Some(writing) = &mut this.writing {
                let _ = ready!(Pin::new(writing).poll(cx));
                this.writing = None;
                return Poll::Ready(this.held.take().map(Ok));
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        this.response.push(data);
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    let status = frame
                        .trailers_ref()
                        .and_then(Status::from_header_map)
                        .unwrap_or_else(|| Status::ok(""));
                    this.held = Some(frame);
                    this.start(status);
                    if this.writing.is_none() {
                        return Poll::Ready(this.held.take().map(Ok));
                    }
                }
                Some(Err(status)) => {
                    // The stream broke: recorded in the background, the error goes on now.
                    this.start(status.clone());
                    this.writing = None;
                    return Poll::Ready(Some(Err(status)));
                }
                None => {
                    // Ended without trailers: recorded as answered.
                    this.start(Status::ok(""));
                    if this.writing.is_none() {
                        return Poll::Ready(None);
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.call.is_none()
            && self.writing.is_none()
            && self.held.is_none()
            && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> DescriptorPool {
        DescriptorPool::decode(loyalty_proto::FILE_DESCRIPTOR_SET).unwrap()
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    /// An event log whose appends succeed (recorded) or fail.
    #[derive(Debug, Default)]
    struct Appends {
        fail: bool,
        seen: Mutex<Vec<ev::Event>>,
    }

    #[async_trait::async_trait]
    impl crate::events::EventLog for Appends {
        async fn append(&self, _: &str, payloads: &[Vec<u8>]) -> crate::error::Result<()> {
            if self.fail {
                return Err(crate::error::Error::Unavailable("the log is down".into()));
            }
            let mut seen = self.seen.lock().unwrap();
            seen.extend(
                payloads
                    .iter()
                    .map(|p| ev::Event::decode(p.as_slice()).unwrap()),
            );
            Ok(())
        }
        async fn create_group(&self, _: &str, _: &str) -> crate::error::Result<()> {
            Ok(())
        }
        async fn read(
            &self,
            _: &str,
            _: &str,
            _: &str,
            _: usize,
            _: Duration,
        ) -> crate::error::Result<Vec<crate::events::Delivery>> {
            Ok(Vec::new())
        }
        async fn ack(&self, _: &str, _: &str, _: &[String]) -> crate::error::Result<()> {
            Ok(())
        }
        async fn claim(
            &self,
            _: &str,
            _: &str,
            _: &str,
            _: Duration,
            _: usize,
        ) -> crate::error::Result<Vec<crate::events::Delivery>> {
            Ok(Vec::new())
        }
        async fn lag(&self, _: &str, _: &str) -> crate::error::Result<crate::events::Lag> {
            Ok(crate::events::Lag::default())
        }
        async fn ping(&self) -> crate::error::Result<()> {
            Ok(())
        }
    }

    /// An admin's `Adjust` with its request body, tapped for the audit log `log`.
    fn tapped_adjust(log: Arc<Appends>) -> (Call, Tapped) {
        use loyalty_proto::balance::v1 as bpb;
        let request = bpb::AdjustRequest {
            tenant_id: "t".into(),
            member_id: "m1".into(),
            idempotency_key: "k".into(),
            amount: 5,
            ..Default::default()
        }
        .encode_to_vec();
        let body = Body::new(http_body_util::Full::new(Bytes::from(framed(&request))));
        let call = Call {
            record_id: "0193-record".into(),
            started: 1_000,
            path: "/loyalty.balance.v1.BalanceService/Adjust".into(),
            principal: Principal::unrestricted(),
            rule: Arc::new(MethodRule {
                roles: &[],
                tenant: Some(vec![1]),
                store: None,
                member: Some(vec![2]),
                audited: true,
            }),
            request: Arc::default(),
            before: None,
        };
        let tapped = Tapped::new(body, AuditLog::new(log).unwrap(), &call);
        (call, tapped)
    }

    #[tokio::test]
    async fn the_handler_sees_the_request_only_after_its_start_is_recorded() {
        use http_body_util::BodyExt;
        let log = Arc::new(Appends::default());
        let (_, mut body) = tapped_adjust(log.clone());
        let frame = body.frame().await.unwrap().unwrap();
        assert!(frame.data_ref().is_some());
        let seen = log.seen.lock().unwrap().clone();
        let [event] = seen.as_slice() else {
            panic!("one record expected before the request: {seen:?}");
        };
        assert_eq!(event.event_id, "audit/t/0193-record/start");
        let Some(ev::event::Kind::Audit(record)) = &event.kind else {
            panic!("{event:?}");
        };
        assert!(record.in_flight);
        assert_eq!(record.member_id, "m1");
        assert_eq!(record.status_code, tonic::Code::Unknown as i32);
        assert!(
            record.request_json.contains("\"amount\":\"5\""),
            "{record:?}"
        );
        // The rest of the body passes as it is, with no second start.
        assert!(body.frame().await.is_none());
        assert_eq!(log.seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_first_message_in_several_frames_is_held_at_its_last_frame() {
        use http_body_util::BodyExt;
        let log = Arc::new(Appends::default());
        let (call, _) = tapped_adjust(log.clone());
        let request = loyalty_proto::balance::v1::AdjustRequest {
            tenant_id: "t".into(),
            member_id: "m1".into(),
            amount: 5,
            ..Default::default()
        }
        .encode_to_vec();
        let bytes = framed(&request);
        let (head, tail) = bytes.split_at(4);
        let frames: Vec<Result<Frame<Bytes>, Status>> = vec![
            Ok(Frame::data(Bytes::copy_from_slice(head))),
            Ok(Frame::data(Bytes::copy_from_slice(tail))),
        ];
        let inner = Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )));
        let mut body = Tapped::new(inner, AuditLog::new(log.clone()).unwrap(), &call);
        assert!(!http_body::Body::is_end_stream(&body));
        // The first part passes at once: it is not a message yet.
        body.frame().await.unwrap().unwrap();
        assert!(log.seen.lock().unwrap().is_empty());
        // The part that completes the message waits for the start.
        body.frame().await.unwrap().unwrap();
        assert_eq!(log.seen.lock().unwrap().len(), 1);
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_broken_request_body_still_records_a_start_and_passes_the_error_on() {
        use http_body_util::BodyExt;
        let log = Arc::new(Appends::default());
        let (call, _) = tapped_adjust(log.clone());
        let frames: Vec<Result<Frame<Bytes>, Status>> = vec![Err(Status::internal("reset"))];
        let inner = Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )));
        let mut body = Tapped::new(inner, AuditLog::new(log.clone()).unwrap(), &call);
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.message(), "reset");
        assert_eq!(log.seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_start_that_cannot_be_recorded_keeps_the_request_from_the_handler() {
        use http_body_util::BodyExt;
        let log = Arc::new(Appends {
            fail: true,
            ..Default::default()
        });
        let (_, mut body) = tapped_adjust(log);
        let refused = body.frame().await.unwrap().unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert!(refused.message().contains("audit log"), "{refused:?}");
    }

    #[test]
    fn personal_data_and_secrets_never_enter_a_record() {
        use loyalty_proto::identity::v1 as id;
        let pool = pool();
        let request = id::RegisterMemberRequest {
            tenant_id: "t".into(),
            phone: "+491701234567".into(),
            email: "anna@example.org".into(),
            first_name: "Anna".into(),
            last_name: "Schmidt".into(),
            ..Default::default()
        };
        let desc = pool
            .get_message_by_name("loyalty.identity.v1.RegisterMemberRequest")
            .unwrap();
        let json = render(&desc, &[&request.encode_to_vec()], false);
        for secret in ["+491701234567", "anna@example.org", "Anna", "Schmidt"] {
            assert!(!json.contains(secret), "{json}");
        }
        assert!(json.contains("\"tenant_id\":\"t\""), "{json}");
        assert!(json.contains("\"phone\":\"<redacted>\""), "{json}");

        let created = id::CreateApiKeyResponse {
            secret: "lk_0123456789abcdef_00".into(),
            ..Default::default()
        };
        let desc = pool
            .get_message_by_name("loyalty.identity.v1.CreateApiKeyResponse")
            .unwrap();
        let json = render(&desc, &[&created.encode_to_vec()], false);
        assert!(!json.contains("lk_0123"), "{json}");
    }

    #[test]
    fn long_renderings_are_bounded_and_streams_show_their_messages() {
        use loyalty_proto::segmentation::v1 as sg;
        let pool = pool();
        let desc = pool
            .get_message_by_name("loyalty.segmentation.v1.UploadSegmentMembersRequest")
            .unwrap();
        let big = sg::UploadSegmentMembersRequest {
            tenant_id: "t".into(),
            member_ids: (0..5_000).map(|i| format!("member-{i:06}")).collect(),
            ..Default::default()
        };
        let json = render(&desc, &[&big.encode_to_vec()], false);
        assert!(json.len() <= MAX_JSON_BYTES);
        assert!(json.contains("<5000 items>"), "{json}");

        let small = sg::UploadSegmentMembersRequest {
            tenant_id: "t".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let mut capture = Capture::default();
        capture.push(&framed(&small));
        capture.push(&framed(&small));
        assert_eq!(capture.messages().len(), 2);
        assert!(!capture.more());
        let json = render(&desc, &capture.messages(), capture.more());
        assert!(json.starts_with('['), "{json}");
        // A first message larger than what is kept still names its tenant.
        let huge = sg::UploadSegmentMembersRequest {
            tenant_id: "big-tenant".into(),
            member_ids: (0..100_000).map(|i| format!("member-{i:08}")).collect(),
            ..Default::default()
        }
        .encode_to_vec();
        assert!(huge.len() > MAX_CAPTURE_BYTES);
        let mut cut = Capture::default();
        cut.push(&framed(&huge));
        assert!(cut.messages().is_empty() && cut.more());
        assert_eq!(
            wire::leading_string(cut.first_head(), 1),
            Some(&b"big-tenant"[..])
        );
        // Past the kept bytes, the rest is counted, not kept.
        capture.push(&vec![0u8; MAX_CAPTURE_BYTES]);
        assert!(capture.more());
        assert!(capture.kept.len() <= MAX_CAPTURE_BYTES);
    }
}
