//! Who is calling, and may they: API keys with roles, bound to one tenant (and a POS key to
//! its store, an app key to its member), checked by one layer in front of every service.
//!
//! - The layer reads `authorization: Bearer <key>`, asks a [`KeyVerifier`] who that is, and
//!   checks the caller's role against the RPC's rule ([`policy::RULES`]).
//! - It then checks the request's own tenant, store and member fields on the wire, message by
//!   message (unary and streaming alike), before any handler decodes them: a caller of one
//!   tenant cannot name another, whatever the handler does.
//! - Handlers find the caller as a [`Principal`] in the request's extensions.
//! - With authentication off (dev mode on loopback) every call is let through as an
//!   unrestricted caller, and the process says so at start.

pub mod limits;
pub mod policy;
pub mod wire;

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http_body::Frame;
use sha2::{Digest, Sha256};
use tonic::Status;
use tonic::body::Body;

pub use limits::RateLimits;
pub use policy::{MethodRule, Policy};

use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};

/// What a caller may do. Every RPC lists the roles it allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A cash register, bound to its store: checkout, lookups, registration.
    Pos,
    /// A member's mobile app: the member's own data.
    App,
    /// The chain's back office: configuration, adjustments, erasure.
    Admin,
    /// Data teams: reporting, without personal data.
    Analyst,
    /// Our own services calling each other: every tenant.
    Service,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Pos,
        Role::App,
        Role::Admin,
        Role::Analyst,
        Role::Service,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Pos => "pos",
            Role::App => "app",
            Role::Admin => "admin",
            Role::Analyst => "analyst",
            Role::Service => "service",
        }
    }

    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The authenticated caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The API key's public id (never its secret); "-" with authentication off.
    pub key_id: String,
    pub role: Role,
    /// The one tenant this caller acts for; empty when `all_tenants`.
    pub tenant_id: String,
    /// A POS key's store: the caller may only name this store.
    pub store_id: String,
    /// An app key's member: the caller may only name this member.
    pub member_id: String,
    /// Service keys, and everyone with authentication off.
    pub all_tenants: bool,
}

impl Principal {
    /// One of our processes calling with authentication off ([`PEER_HEADER`]).
    pub fn peer() -> Self {
        Self {
            role: Role::Service,
            ..Self::unrestricted()
        }
    }

    /// The caller when authentication is off: anything, for any tenant.
    pub fn unrestricted() -> Self {
        Self {
            key_id: "-".into(),
            role: Role::Admin,
            tenant_id: String::new(),
            store_id: String::new(),
            member_id: String::new(),
            all_tenants: true,
        }
    }
}

/// A header our own processes send with every call to a peer. With authentication off it is
/// all that tells them from other callers (every caller is trusted then): their calls act as
/// [`Role::Service`], so checkout's ledger operations are not audited as an admin's changes.
/// With authentication on it means nothing; the service key decides.
pub const PEER_HEADER: &str = "x-loyalty-peer";

/// The RPCs that manage API keys: audited for service callers too.
const KEY_MANAGEMENT: &str = "/loyalty.identity.v1.AccessService/";

/// The prefix of every API key; the key reads `lk_<key id>_<secret>`.
pub const KEY_PREFIX: &str = "lk_";

/// Splits a presented key into its public id and its secret.
pub fn parse_key(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 16) && hex(secret, 64)).then_some((id, secret))
}

/// What is stored of a secret: its SHA-256, hex. Keys carry 256 random bits, so a fast hash
/// is as strong as a slow one and costs nothing on the hot path.
pub fn hash_secret(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compares two hashes in time independent of where they differ.
pub fn same_hash(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Tells who presents a key: `None` for an unknown, revoked or expired key.
#[async_trait::async_trait]
pub trait KeyVerifier: Send + Sync + fmt::Debug {
    /// Who presents `key` (id and secret); `None`: unknown, revoked or a wrong secret.
    async fn verify(&self, key: &str) -> Result<Option<Principal>>;
    /// Who the key `key_id` is, for a caller whose client certificate, checked by TLS
    /// against `tls.client_ca_file`, names it; `None`: unknown or revoked.
    async fn verify_certified(&self, key_id: &str) -> Result<Option<Principal>>;
}

/// Whether `id` has the shape of a key id: 16 lowercase hex digits.
pub fn is_key_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Our own processes' shared key (`auth.service_key`), checked before the keys `inner`
/// knows: it is the `service` role, for every tenant.
#[derive(Debug)]
pub struct WithServiceKey {
    service_hash: Option<String>,
    inner: Option<Arc<dyn KeyVerifier>>,
}

impl WithServiceKey {
    /// `inner`: the verifier of the keys the API manages (`None`: only the service key).
    pub fn new(service_key: Option<&str>, inner: Option<Arc<dyn KeyVerifier>>) -> Self {
        Self {
            service_hash: service_key.map(hash_secret),
            inner,
        }
    }
}

#[async_trait::async_trait]
impl KeyVerifier for WithServiceKey {
    async fn verify(&self, key: &str) -> Result<Option<Principal>> {
        if let Some(hash) = &self.service_hash
            && same_hash(hash, &hash_secret(key))
        {
            return Ok(Some(Principal {
                key_id: "service".into(),
                role: Role::Service,
                tenant_id: String::new(),
                store_id: String::new(),
                member_id: String::new(),
                all_tenants: true,
            }));
        }
        // Anything not shaped like a key is refused here, without asking anyone.
        match &self.inner {
            Some(inner) if parse_key(key).is_some() => inner.verify(key).await,
            _ => Ok(None),
        }
    }

    async fn verify_certified(&self, key_id: &str) -> Result<Option<Principal>> {
        match &self.inner {
            Some(inner) if is_key_id(key_id) => inner.verify_certified(key_id).await,
            _ => Ok(None),
        }
    }
}

/// Key checks a process sends to identity at once; a caller past them is refused
/// (`UNAVAILABLE`, retry), so a flood of made-up keys cannot take identity down.
pub const MAX_CHECKS_IN_FLIGHT: usize = 64;
/// Why a key check was refused for [`MAX_CHECKS_IN_FLIGHT`] (counted, not logged per call).
const CHECKS_BUSY: &str = "too many API keys are being checked at once; retry";

/// Remembers answers of a slower verifier (another process) for a while, so the hot path
/// asks once per key and `ttl`. A revoked key works at most `ttl` longer in such a process.
/// Keys found invalid are remembered apart (a made-up key asked again costs nothing, and
/// cannot push a valid one out), and at most [`MAX_CHECKS_IN_FLIGHT`] checks run at once.
#[derive(Debug)]
pub struct CachedVerifier<V> {
    inner: V,
    ttl: Duration,
    max_entries: usize,
    seen: Mutex<HashMap<String, (Instant, Option<Principal>)>>,
    rejected: Mutex<HashMap<String, Instant>>,
    checks: tokio::sync::Semaphore,
}

impl<V: KeyVerifier> CachedVerifier<V> {
    pub fn new(inner: V, ttl: Duration, max_entries: usize) -> Self {
        Self {
            inner,
            ttl,
            max_entries: max_entries.max(1),
            seen: Mutex::new(HashMap::new()),
            rejected: Mutex::new(HashMap::new()),
            checks: tokio::sync::Semaphore::new(MAX_CHECKS_IN_FLIGHT),
        }
    }
}

#[async_trait::async_trait]
impl<V: KeyVerifier> KeyVerifier for CachedVerifier<V> {
    async fn verify(&self, key: &str) -> Result<Option<Principal>> {
        // Keyed by a hash, so the process holds no usable secret.
        self.remembered(hash_secret(key), self.inner.verify(key))
            .await
    }

    async fn verify_certified(&self, key_id: &str) -> Result<Option<Principal>> {
        // A key id is not a secret; the prefix keeps it apart from hashes of whole keys.
        self.remembered(
            format!("cert:{key_id}"),
            self.inner.verify_certified(key_id),
        )
        .await
    }
}

impl<V: KeyVerifier> CachedVerifier<V> {
    /// The answer remembered under `id`, or `ask`'s.
    async fn remembered(
        &self,
        id: String,
        ask: impl Future<Output = Result<Option<Principal>>>,
    ) -> Result<Option<Principal>> {
        if let Ok(seen) = self.seen.lock()
            && let Some((at, answer)) = seen.get(&id)
            && at.elapsed() < self.ttl
        {
            return Ok(answer.clone());
        }
        if let Ok(rejected) = self.rejected.lock()
            && rejected.get(&id).is_some_and(|at| at.elapsed() < self.ttl)
        {
            return Ok(None);
        }
        let Ok(_check) = self.checks.try_acquire() else {
            metrics::counter!("loyalty_key_checks_refused_total").increment(1);
            return Err(Error::Unavailable(CHECKS_BUSY.into()));
        };
        // Timed from before the question: an answer is never trusted longer than `ttl` after
        // it could have been true.
        let asked = Instant::now();
        let answer = ask.await?;
        if answer.is_none()
            && let Ok(mut rejected) = self.rejected.lock()
        {
            if rejected.len() >= self.max_entries {
                let ttl = self.ttl;
                rejected.retain(|_, at| at.elapsed() < ttl);
                if rejected.len() >= self.max_entries {
                    // A flood of made-up keys: remembering them is only a saving.
                    rejected.clear();
                }
            }
            rejected.insert(id.clone(), asked);
        }
        // Only valid keys are remembered: made-up ones cannot push real ones out.
        if answer.is_some()
            && let Ok(mut seen) = self.seen.lock()
        {
            if seen.len() >= self.max_entries {
                let ttl = self.ttl;
                seen.retain(|_, (at, _)| at.elapsed() < ttl);
                if seen.len() >= self.max_entries
                    && let Some(oldest) = seen
                        .iter()
                        .min_by_key(|(_, (at, _))| *at)
                        .map(|(k, _)| k.clone())
                {
                    seen.remove(&oldest);
                }
            }
            seen.insert(id, (asked, answer.clone()));
        }
        Ok(answer)
    }
}

/// The caller of a request, as the layer found it.
pub fn caller<T>(request: &tonic::Request<T>) -> std::result::Result<&Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .ok_or_else(|| Status::unauthenticated("no caller: the access layer is not installed"))
}

/// Checks a tenant a handler read itself (where the layer cannot, e.g. a Flight ticket).
pub fn admit_tenant(who: &Principal, tenant_id: &str) -> std::result::Result<(), Status> {
    if who.all_tenants || who.tenant_id == tenant_id {
        Ok(())
    } else {
        Err(other_tenant(tenant_id))
    }
}

fn other_tenant(named: &str) -> Status {
    Status::permission_denied(format!(
        "this API key may not act for tenant {:?}",
        shown(named)
    ))
}

/// A caller's value as echoed in an error: at most 64 characters.
fn shown(value: &str) -> String {
    value.chars().take(64).collect()
}

/// The access layer: installed on the server in front of every service.
#[derive(Debug, Clone)]
pub struct Gate {
    policy: Arc<Policy>,
    /// `None`: authentication is off.
    verifier: Option<Arc<dyn KeyVerifier>>,
    max_message_bytes: usize,
    limits: Option<Arc<RateLimits>>,
    audit: Option<crate::audit::AuditLog>,
}

impl Gate {
    /// A gate checking keys with `verifier`.
    pub fn new(policy: Policy, verifier: Arc<dyn KeyVerifier>, max_message_bytes: usize) -> Self {
        Self {
            policy: Arc::new(policy),
            verifier: Some(verifier),
            max_message_bytes,
            limits: None,
            audit: None,
        }
    }

    /// Refuses callers over `limits` with RESOURCE_EXHAUSTED.
    pub fn with_rate_limits(mut self, limits: Option<RateLimits>) -> Self {
        self.limits = limits.map(Arc::new);
        self
    }

    /// A gate letting every call through as [`Principal::unrestricted`].
    pub fn open(policy: Policy) -> Self {
        Self {
            policy: Arc::new(policy),
            verifier: None,
            max_message_bytes: usize::MAX,
            limits: None,
            audit: None,
        }
    }

    /// Records admins' changes in `audit` ([`crate::audit`]).
    pub fn with_audit(mut self, audit: Option<crate::audit::AuditLog>) -> Self {
        self.audit = audit;
        self
    }

    pub fn is_open(&self) -> bool {
        self.verifier.is_none()
    }

    /// Who the request's caller is, and whether they may call its RPC; the checks of the
    /// request's fields, when the caller is bound to a tenant.
    /// `certified`: the key id a verified client certificate names, `Some("")` for a
    /// certificate naming none.
    async fn admit(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        certified: Option<String>,
    ) -> std::result::Result<Option<Admitted>, Status> {
        let Some(rule) = self.policy.rule(path) else {
            // Not an RPC of ours (health, reflection) or not one at all (tonic answers).
            return Ok(None);
        };
        let Some(verifier) = &self.verifier else {
            let principal = if headers.contains_key(PEER_HEADER) {
                Principal::peer()
            } else {
                Principal::unrestricted()
            };
            return Ok(Some(Admitted {
                principal,
                checks: None,
                rule,
            }));
        };
        let key = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let answer = match (key, certified) {
            (Some(key), _) => verifier.verify(key).await,
            (None, Some(key_id)) if !key_id.is_empty() => verifier.verify_certified(&key_id).await,
            (None, Some(_)) => {
                return Err(Status::unauthenticated(
                    "the client certificate's common name is not an API key id; send an API key: `authorization: Bearer <key>`",
                ));
            }
            (None, None) => {
                return Err(Status::unauthenticated(
                    "send an API key: `authorization: Bearer <key>`",
                ));
            }
        };
        let principal = answer
            .map_err(|e| {
                if !matches!(&e, Error::Unavailable(m) if m == CHECKS_BUSY) {
                    tracing::warn!(error = %e, "cannot check an API key");
                }
                Status::unavailable("cannot check the API key now; retry")
            })?
            .ok_or_else(|| Status::unauthenticated("unknown, revoked or expired API key"))?;
        if !rule.roles.contains(&principal.role) {
            return Err(Status::permission_denied(format!(
                "role {} may not call {}",
                principal.role,
                path.trim_start_matches('/')
            )));
        }
        if let Some(limits) = &self.limits {
            limits.admit(&principal, Instant::now())?;
        }
        let checks = (!principal.all_tenants).then(|| Checks {
            rule: rule.clone(),
            principal: principal.clone(),
            max_message_bytes: self.max_message_bytes,
        });
        Ok(Some(Admitted {
            principal,
            checks,
            rule,
        }))
    }
}

/// A caller let through, with what the layer still does for the call.
struct Admitted {
    principal: Principal,
    checks: Option<Checks>,
    rule: Arc<MethodRule>,
}

impl<S> tower::Layer<S> for Gate {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Gated {
            inner,
            gate: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Gated<S> {
    inner: S,
    gate: Gate,
}

impl<S> tower::Service<http::Request<Body>> for Gated<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = std::result::Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The ready service answers this call; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gate = self.gate.clone();
        Box::pin(async move {
            // A certificate is read only when no key was sent: the key decides otherwise.
            let certified = if request.headers().contains_key(http::header::AUTHORIZATION) {
                None
            } else {
                certified_key_id(&request)
            };
            let admitted = gate
                .admit(request.uri().path(), request.headers(), certified)
                .await;
            match admitted {
                Ok(None) => inner.call(request).await,
                Ok(Some(Admitted {
                    principal,
                    checks,
                    rule,
                })) => {
                    let (mut parts, body) = request.into_parts();
                    let audit = gate
                        .audit
                        .clone()
                        .filter(|_| {
                            // Admins' changes, and keys made with the service key
                            // (`loyalty create-key --addr`).
                            rule.audited
                                && (principal.role == Role::Admin
                                    || (principal.role == Role::Service
                                        && parts.uri.path().starts_with(KEY_MANAGEMENT)))
                        })
                        .map(|log| {
                            let call = crate::audit::Call {
                                record_id: uuid::Uuid::now_v7().to_string(),
                                started: SystemClock.now_ms(),
                                path: parts.uri.path().to_string(),
                                principal: principal.clone(),
                                rule,
                                request: Arc::default(),
                                before: None,
                            };
                            (log, call)
                        });
                    parts.extensions.insert(principal);
                    let body = match checks {
                        Some(checks) => Body::new(Checked {
                            inner: body,
                            checks,
                            pending: BytesMut::new(),
                        }),
                        None => body,
                    };
                    let Some((log, call)) = audit else {
                        return inner.call(http::Request::from_parts(parts, body)).await;
                    };
                    let body = Body::new(crate::audit::Tapped::new(body, log.clone(), &call));
                    // Recorded as cancelled if this future is dropped before the handler
                    // answers (the caller reset the call).
                    let mut pending = crate::audit::Pending::new(log, call);
                    let response = inner.call(http::Request::from_parts(parts, body)).await?;
                    match pending.take() {
                        Some((log, call)) => Ok(crate::audit::answer(log, call, response).await),
                        None => Ok(response),
                    }
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// The key id named by the client certificate TLS verified on the request's connection:
/// `None` without one, `Some("")` when its common name is no key id.
fn certified_key_id(request: &http::Request<Body>) -> Option<String> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let certs = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?
        .peer_certs()?;
    let leaf = certs.first()?;
    Some(crate::tls::certified_key_id(leaf).unwrap_or_default())
}

/// What every message of a bound caller's request must name.
#[derive(Debug, Clone)]
struct Checks {
    rule: std::sync::Arc<MethodRule>,
    principal: Principal,
    max_message_bytes: usize,
}

impl Checks {
    fn check(&self, message: &[u8]) -> std::result::Result<(), Status> {
        let read =
            |path: &Option<policy::FieldPath>| -> std::result::Result<Option<String>, Status> {
                let Some(path) = path else { return Ok(None) };
                let value = wire::string_at(message, path)
                    .map_err(|_| Status::invalid_argument("the request is not a valid message"))?
                    .unwrap_or_default();
                Ok(Some(String::from_utf8_lossy(value).into_owned()))
            };
        let p = &self.principal;
        if let Some(tenant) = read(&self.rule.tenant)? {
            if tenant.is_empty() {
                return Err(Status::invalid_argument("tenant_id is required"));
            }
            if tenant != p.tenant_id {
                return Err(other_tenant(&tenant));
            }
        }
        // An empty store names none (a registration's optional store); a handler needing
        // one refuses it.
        if !p.store_id.is_empty()
            && let Some(store) = read(&self.rule.store)?
            && !store.is_empty()
            && store != p.store_id
        {
            return Err(Status::permission_denied(format!(
                "this API key is bound to store {:?} and may not act for store {:?}",
                p.store_id,
                shown(&store)
            )));
        }
        // RPCs open to apps without naming a member hold no member's data (the policy's
        // test holds every other app RPC to naming one).
        if !p.member_id.is_empty()
            && let Some(member) = read(&self.rule.member)?
            && member != p.member_id
        {
            return Err(Status::permission_denied(format!(
                "this API key acts for one member and may not act for member {:?}",
                shown(&member)
            )));
        }
        Ok(())
    }
}

/// A request body whose gRPC messages are checked as they arrive: a message failing the
/// checks never reaches the handler; the call ends with the check's status instead.
struct Checked {
    inner: Body,
    checks: Checks,
    /// Bytes of the message being received (frame header included).
    pending: BytesMut,
}

impl Checked {
    /// Checks every message completed by the bytes received so far.
    fn check_complete(&mut self) -> std::result::Result<(), Status> {
        loop {
            if self.pending.len() < 5 {
                return Ok(());
            }
            let compressed = self.pending[0];
            let len = u32::from_be_bytes([
                self.pending[1],
                self.pending[2],
                self.pending[3],
                self.pending[4],
            ]) as usize;
            if len > self.checks.max_message_bytes {
                return Err(Status::resource_exhausted(format!(
                    "a request message of {len} bytes is over the limit of {}",
                    self.checks.max_message_bytes
                )));
            }
            if self.pending.len() < 5 + len {
                return Ok(());
            }
            let frame = self.pending.split_to(5 + len);
            if compressed != 0 {
                return Err(Status::unimplemented(
                    "compressed requests are not accepted",
                ));
            }
            self.checks.check(&frame[5..])?;
        }
    }
}

impl http_body::Body for Checked {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(mut data) => {
                    let data = data.copy_to_bytes(data.remaining());
                    this.pending.extend_from_slice(&data);
                    match this.check_complete() {
                        Ok(()) => Poll::Ready(Some(Ok(Frame::data(data)))),
                        Err(status) => Poll::Ready(Some(Err(status))),
                    }
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_hash() {
        let secret = "ab".repeat(32);
        let key = format!("lk_0123456789abcdef_{secret}");
        assert_eq!(parse_key(&key), Some(("0123456789abcdef", secret.as_str())));
        assert_eq!(parse_key("lk_0123_abcd"), None);
        assert_eq!(parse_key(&key.replace("lk_", "xx_")), None);
        assert_eq!(hash_secret("abc").len(), 64);
        assert!(same_hash(&hash_secret("abc"), &hash_secret("abc")));
        assert!(!same_hash(&hash_secret("abc"), &hash_secret("abd")));
        for role in Role::ALL {
            assert_eq!(Role::parse(role.name()), Some(role));
        }
    }

    #[derive(Debug, Default)]
    struct Counting(std::sync::atomic::AtomicUsize);

    #[async_trait::async_trait]
    impl KeyVerifier for Counting {
        async fn verify(&self, key: &str) -> Result<Option<Principal>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok((key != "bad").then(Principal::unrestricted))
        }

        async fn verify_certified(&self, key_id: &str) -> Result<Option<Principal>> {
            self.verify(key_id).await
        }
    }

    #[tokio::test]
    async fn the_cache_asks_once_per_key_and_ttl_and_stays_bounded() {
        let cached = CachedVerifier::new(Counting::default(), Duration::from_secs(60), 2);
        for _ in 0..3 {
            assert!(cached.verify("good").await.unwrap().is_some());
            assert!(cached.verify("bad").await.unwrap().is_none());
        }
        // Each key asked once, the made-up one too (remembered apart).
        assert_eq!(cached.inner.0.load(std::sync::atomic::Ordering::Relaxed), 2);
        assert_eq!(cached.rejected.lock().unwrap().len(), 1);
        cached.verify("third").await.unwrap();
        cached.verify("fourth").await.unwrap();
        assert_eq!(cached.seen.lock().unwrap().len(), 2, "the oldest made room");
        let fresh = CachedVerifier::new(Counting::default(), Duration::ZERO, 10);
        fresh.verify("good").await.unwrap();
        fresh.verify("good").await.unwrap();
        assert_eq!(fresh.inner.0.load(std::sync::atomic::Ordering::Relaxed), 2);
        // A certificate's key id is remembered apart from a whole key of the same text.
        let both = CachedVerifier::new(Counting::default(), Duration::from_secs(60), 10);
        both.verify("good").await.unwrap();
        both.verify_certified("good").await.unwrap();
        both.verify_certified("good").await.unwrap();
        assert_eq!(both.inner.0.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    /// A verifier that answers only when told to.
    #[derive(Debug, Default)]
    struct Waiting(tokio::sync::Notify);

    #[async_trait::async_trait]
    impl KeyVerifier for Waiting {
        async fn verify(&self, _: &str) -> Result<Option<Principal>> {
            self.0.notified().await;
            Ok(None)
        }

        async fn verify_certified(&self, key_id: &str) -> Result<Option<Principal>> {
            self.verify(key_id).await
        }
    }

    /// With authentication off, our processes' calls act as a service and everyone else's as
    /// an admin.
    #[tokio::test]
    async fn an_open_gate_tells_our_peers_from_other_callers() {
        let gate = Gate::open(Policy::loyalty().unwrap());
        let path = "/loyalty.balance.v1.BalanceService/Accrue";
        let mut headers = http::HeaderMap::new();
        let admitted = gate.admit(path, &headers, None).await.unwrap().unwrap();
        assert_eq!(admitted.principal, Principal::unrestricted());
        headers.insert(PEER_HEADER, http::HeaderValue::from_static("1"));
        let admitted = gate.admit(path, &headers, None).await.unwrap().unwrap();
        assert_eq!(admitted.principal.role, Role::Service);
        assert!(admitted.principal.all_tenants);
    }

    #[tokio::test]
    async fn at_most_so_many_keys_are_checked_at_once() {
        let cached = std::sync::Arc::new(CachedVerifier::new(
            Waiting::default(),
            Duration::from_secs(60),
            10,
        ));
        let mut waiting = Vec::new();
        for i in 0..MAX_CHECKS_IN_FLIGHT {
            let cached = cached.clone();
            waiting.push(tokio::spawn(async move {
                cached.verify(&format!("key{i}")).await
            }));
        }
        while cached.checks.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let refused = cached.verify("one more").await.unwrap_err();
        assert!(matches!(refused, Error::Unavailable(_)), "{refused:?}");
        cached.inner.0.notify_waiters();
        for w in waiting {
            assert!(w.await.unwrap().unwrap().is_none());
        }
        assert_eq!(cached.checks.available_permits(), MAX_CHECKS_IN_FLIGHT);
    }

    fn bound(role: Role, store: &str, member: &str) -> Principal {
        Principal {
            key_id: "k".into(),
            role,
            tenant_id: "acme".into(),
            store_id: store.into(),
            member_id: member.into(),
            all_tenants: false,
        }
    }

    #[test]
    fn bound_callers_may_only_name_their_own_tenant_store_and_member() {
        use loyalty_proto::balance::v1 as bpb;
        use loyalty_proto::promotion::v1 as ppb;
        use prost::Message;
        let policy = Policy::loyalty().unwrap();
        let checks = |path: &str, p: Principal| Checks {
            rule: policy.rule(path).unwrap(),
            principal: p,
            max_message_bytes: 1 << 20,
        };
        let quote = |tenant: &str, store: &str| {
            ppb::QuoteRequest {
                receipt: Some(ppb::Receipt {
                    tenant_id: tenant.into(),
                    store_id: store.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }
            .encode_to_vec()
        };
        let pos = checks(
            "/loyalty.promotion.v1.CheckoutService/Quote",
            bound(Role::Pos, "s1", ""),
        );
        assert!(pos.check(&quote("acme", "s1")).is_ok());
        let denied = pos.check(&quote("other", "s1")).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(
            denied.message().contains("\"other\""),
            "{}",
            denied.message()
        );
        assert_eq!(
            pos.check(&quote("acme", "s2")).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            pos.check(&quote("", "s1")).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let balance = |member: &str| {
            bpb::GetBalanceRequest {
                tenant_id: "acme".into(),
                member_id: member.into(),
            }
            .encode_to_vec()
        };
        let app = checks(
            "/loyalty.balance.v1.BalanceService/GetBalance",
            bound(Role::App, "", "m1"),
        );
        assert!(app.check(&balance("m1")).is_ok());
        assert_eq!(
            app.check(&balance("m2")).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }

    #[tokio::test]
    async fn a_message_failing_its_checks_ends_the_body_with_the_status() {
        use http_body_util::BodyExt;
        use loyalty_proto::balance::v1 as bpb;
        use prost::Message;
        let policy = Policy::loyalty().unwrap();
        let checks = Checks {
            rule: policy
                .rule("/loyalty.balance.v1.BalanceService/GetBalance")
                .unwrap(),
            principal: bound(Role::Pos, "", ""),
            max_message_bytes: 1 << 20,
        };
        let framed = |tenant: &str| {
            let m = bpb::GetBalanceRequest {
                tenant_id: tenant.into(),
                member_id: "m".into(),
            }
            .encode_to_vec();
            let mut f = vec![0u8];
            f.extend((m.len() as u32).to_be_bytes());
            f.extend(m);
            f
        };
        // Two messages, the second of another tenant, split mid-frame across chunks.
        let mut all = framed("acme");
        all.extend(framed("other"));
        let (a, b) = all.split_at(7);
        let chunks: Vec<std::result::Result<Frame<Bytes>, Status>> = vec![
            Ok(Frame::data(Bytes::copy_from_slice(a))),
            Ok(Frame::data(Bytes::copy_from_slice(b))),
        ];
        let body = Checked {
            inner: Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
                chunks,
            ))),
            checks,
            pending: BytesMut::new(),
        };
        let err = body.collect().await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }
}
