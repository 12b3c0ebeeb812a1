//! Logs and traces. Logs go to stderr (text or JSON) so stdout stays for what the binary
//! prints to people; their filter can change while the process runs. Traces go over
//! OTLP/gRPC when `tracing.otlp_endpoint` is set: a span per RPC (server and client), per
//! storage call and per rule evaluation, linked across services by W3C trace context in gRPC
//! metadata. With no endpoint no span is made for tracing at all, so it costs one atomic load
//! per call site.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::field::Empty;
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::{LogConfig, LogFormat, MetricsConfig, TracingConfig};

static TRACING: AtomicBool = AtomicBool::new(false);

/// Whether spans are being exported; call sites make no span when not.
pub fn tracing_on() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// The installed logging and tracing: changes the log filter at run time, flushes spans at
/// shutdown.
pub struct Telemetry {
    filter: Option<reload::Handle<EnvFilter, Registry>>,
    current: std::sync::Mutex<String>,
    provider: std::sync::Mutex<Option<SdkTracerProvider>>,
    meters: std::sync::Mutex<Option<opentelemetry_sdk::metrics::SdkMeterProvider>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("tracing", &tracing_on())
            .finish_non_exhaustive()
    }
}

/// Installs the global subscriber: logs per `log`, spans exported per `tracing` and metrics
/// pushed per `metrics` when they name an endpoint. `RUST_LOG` overrides the configured
/// filter. Must run inside the Tokio runtime when either exports (the exporters' gRPC
/// clients live there).
pub fn init(
    log: &LogConfig,
    tracing: &TracingConfig,
    metrics: &MetricsConfig,
    service_name: &str,
) -> anyhow::Result<Telemetry> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let from_env = std::env::var("RUST_LOG").ok();
    let filter_text = from_env.clone().unwrap_or_else(|| log.filter.clone());
    let filter = EnvFilter::try_new(&filter_text).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);

    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let fmt = match log.format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };

    let provider = match &tracing.otlp_endpoint {
        Some(endpoint) => Some(provider(endpoint, tracing, service_name)?),
        None => None,
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("loyalty"))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
    });
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    // A second init (tests) keeps the first subscriber.
    let filter = installed.is_ok().then_some(handle);
    if provider.is_some() {
        TRACING.store(true, Ordering::Relaxed);
        tracing::info!(
            endpoint = tracing.otlp_endpoint.as_deref().unwrap_or_default(),
            sample_ratio = tracing.sample_ratio,
            "exporting traces over otlp"
        );
    }
    if from_env.is_some() {
        tracing::info!("log filter comes from RUST_LOG; log.filter changes are ignored");
    }
    let name = tracing.service_name.as_deref().unwrap_or(service_name);
    let meters = crate::metrics::otlp::start(metrics, name)?;
    Ok(Telemetry {
        filter: filter.filter(|_| from_env.is_none()),
        current: std::sync::Mutex::new(filter_text),
        provider: std::sync::Mutex::new(provider),
        meters: std::sync::Mutex::new(meters),
    })
}

fn provider(
    endpoint: &str,
    config: &TracingConfig,
    service_name: &str,
) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_millis(config.export_timeout_ms))
        .build()
        .context("cannot set up the otlp span exporter")?;
    let name = config
        .service_name
        .clone()
        .unwrap_or_else(|| service_name.to_owned());
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(name)
                .build(),
        )
        .build())
}

impl Telemetry {
    /// Applies a new log filter if it differs from the current one. Returns whether it did.
    pub fn set_filter(&self, text: &str) -> anyhow::Result<bool> {
        let Some(handle) = &self.filter else {
            return Ok(false);
        };
        let mut current = self
            .current
            .lock()
            .map_err(|_| anyhow::anyhow!("log filter lock poisoned"))?;
        if *current == text {
            return Ok(false);
        }
        let filter = EnvFilter::try_new(text).context("bad log filter")?;
        handle
            .reload(filter)
            .context("cannot change the log filter")?;
        text.clone_into(&mut current);
        tracing::info!(filter = text, "log filter changed");
        Ok(true)
    }

    /// Exports the spans still buffered and the metrics' last values, and stops the
    /// exporters.
    pub async fn shutdown(&self) {
        TRACING.store(false, Ordering::Relaxed);
        let provider = self.provider.lock().ok().and_then(|mut p| p.take());
        if let Some(provider) = provider {
            let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(e)) = done {
                tracing::warn!(error = %e, "flushing spans at shutdown failed");
            }
        }
        let meters = self.meters.lock().ok().and_then(|mut p| p.take());
        if let Some(meters) = meters {
            let done = tokio::task::spawn_blocking(move || meters.shutdown()).await;
            if let Ok(Err(e)) = done {
                tracing::warn!(error = %e, "pushing the last metrics at shutdown failed");
            }
        }
    }
}

/// `http::HeaderMap` as a W3C trace-context carrier.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut http::HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Health checks and reflection: traced, they would start a trace every probe period.
fn is_plumbing(path: &str) -> bool {
    path.starts_with("/grpc.")
}

/// Splits `/package.Service/Method`.
fn rpc_parts(path: &str) -> (&str, &str) {
    let path = path.trim_start_matches('/');
    path.split_once('/').unwrap_or((path, ""))
}

/// The span of one served call, continuing the caller's trace from the request's
/// `traceparent`. `path` is the method path, or "unknown" for paths the API does not have.
pub fn server_span(headers: &http::HeaderMap, path: &str) -> Span {
    if !tracing_on() || is_plumbing(path) {
        return Span::none();
    }
    let (service, method) = rpc_parts(path);
    let span = tracing::info_span!(
        "rpc",
        otel.name = path.trim_start_matches('/'),
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        trace_id = Empty,
        span_id = Empty,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
    let _ = span.set_parent(parent);
    // The ids as fields too, so every log line written during the call names them.
    let context = span.context();
    let ids = context.span().span_context().clone();
    if ids.trace_id() != opentelemetry::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(ids.trace_id()));
        span.record("span_id", tracing::field::display(ids.span_id()));
    }
    span
}

/// Records a finished call's gRPC status on its span (server or client).
pub fn record_status(span: &Span, code: i32) {
    if span.is_none() {
        return;
    }
    span.record("rpc.grpc.status_code", code);
    if code != 0 {
        span.record("otel.status_code", "ERROR");
    }
}

/// The span of one storage call, with the database semantic-convention attributes: the
/// system (`redis`, `scylladb`, `redb`) and the operation. Carries no keys or values.
pub fn db_span(system: &'static str, operation: &'static str) -> Span {
    if !tracing_on() {
        return Span::none();
    }
    tracing::info_span!(
        "db",
        otel.name = operation,
        otel.kind = "client",
        db.system.name = system,
        db.operation.name = operation,
    )
}

/// A span for a step of domain work (e.g. one rule evaluation), when tracing is on.
pub fn work_span(name: &'static str) -> Span {
    if !tracing_on() {
        return Span::none();
    }
    tracing::info_span!("work", otel.name = name, otel.kind = "internal")
}

/// Runs `fut` inside a storage span and records its duration in
/// `loyalty_storage_duration_seconds{system, operation}`.
pub async fn in_db_span<F: Future>(
    system: &'static str,
    operation: &'static str,
    fut: F,
) -> F::Output {
    let start = std::time::Instant::now();
    let out = fut.instrument(db_span(system, operation)).await;
    record_storage_duration(system, operation, start);
    out
}

/// Records one storage call's duration.
pub fn record_storage_duration(
    system: &'static str,
    operation: &'static str,
    start: std::time::Instant,
) {
    metrics::histogram!(
        "loyalty_storage_duration_seconds",
        "system" => system,
        "operation" => operation
    )
    .record(start.elapsed().as_secs_f64());
}

/// A tower layer for gRPC clients: a client span per call, whose context travels in the
/// request's `traceparent` so the peer's server span becomes its child.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientTraceLayer;

impl<S> tower::Layer<S> for ClientTraceLayer {
    type Service = ClientTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ClientTrace::new(inner)
    }
}

/// See [`ClientTraceLayer`]. Also presents this process's service key, when it has one, and
/// [`crate::access::PEER_HEADER`].
#[derive(Clone)]
pub struct ClientTrace<S> {
    inner: S,
    authorization: Option<http::HeaderValue>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for ClientTrace<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTrace")
            .field("inner", &self.inner)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<set>"),
            )
            .finish()
    }
}

impl<S> ClientTrace<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            authorization: None,
        }
    }

    /// Sends `authorization: Bearer <key>` with every call (the peer's `service` key).
    #[must_use]
    pub fn with_key(mut self, key: Option<&str>) -> Self {
        self.authorization = key.and_then(|k| {
            let mut v = http::HeaderValue::from_str(&format!("Bearer {k}")).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        self
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for ClientTrace<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        request.headers_mut().insert(
            crate::access::PEER_HEADER,
            http::HeaderValue::from_static("1"),
        );
        if let Some(key) = &self.authorization {
            request
                .headers_mut()
                .entry(http::header::AUTHORIZATION)
                .or_insert_with(|| key.clone());
        }
        if !tracing_on() || is_plumbing(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        let path = request.uri().path().to_owned();
        let (service, method) = rpc_parts(&path);
        let span = tracing::info_span!(
            "rpc",
            otel.name = path.trim_start_matches('/'),
            otel.kind = "client",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = Empty,
        );
        let context = span.context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&context, &mut HeadersMut(request.headers_mut()));
        });
        let response = self.inner.call(request);
        Box::pin(
            async move {
                let result = response.await;
                let code = match &result {
                    Ok(r) => grpc_code(r.headers()),
                    Err(_) => 14,
                };
                record_status(&Span::current(), code);
                result
            }
            .instrument(span),
        )
    }
}

/// The status code in a response's headers: a unary error comes back "trailers-only", with
/// `grpc-status` in the headers; without it the status is in the trailers, which for a unary
/// call that got this far means OK. An unreadable status counts as UNKNOWN.
pub fn grpc_code(headers: &http::HeaderMap) -> i32 {
    headers.get("grpc-status").map_or(0, |v| {
        v.to_str().ok().and_then(|s| s.parse().ok()).unwrap_or(2)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            rpc_parts("/loyalty.balance.v1.BalanceService/Accrue"),
            ("loyalty.balance.v1.BalanceService", "Accrue")
        );
        assert_eq!(rpc_parts("unknown"), ("unknown", ""));
    }

    #[test]
    fn no_span_is_made_while_tracing_is_off() {
        assert!(!tracing_on());
        assert!(server_span(&http::HeaderMap::new(), "/a.B/C").is_none());
        assert!(db_span("redis", "balance.execute").is_none());
        assert!(work_span("evaluate").is_none());
    }

    #[test]
    fn status_codes_come_from_headers() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(grpc_code(&headers), 0);
        headers.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(grpc_code(&headers), 5);
    }
}
