//! Prometheus metrics: RED per RPC (requests by method and status code, duration histogram)
//! recorded by a tower layer around the gRPC server, which also opens each call's server span
//! when tracing is on, and a small `/metrics` HTTP endpoint.
//!
//! Method labels come from an allowlist built from the API's descriptors (plus health and
//! reflection), so a client sending made-up paths cannot grow the label set. The same series
//! can also be pushed over OTLP ([`otlp`]).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata,
    SharedString, Unit,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::Instrument;

pub mod otlp;

/// Seconds buckets of the request duration histogram: sub-millisecond to the deadline.
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// How often histogram samples are folded into their buckets between scrapes.
const UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the process-wide recorder once and returns its handle.
pub fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("duration_seconds".into()),
                    DURATION_BUCKETS,
                )
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let prometheus = builder.build_recorder();
            let handle = prometheus.handle();
            // Histogram samples wait in the recorder until a scrape or an upkeep drains
            // them: without this, a process nobody scrapes would keep every sample.
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP);
                        upkeep.run_upkeep();
                    }
                });
            // Fails only when another recorder is installed (tests): keep that one.
            let _ = metrics::set_global_recorder(Recorder {
                prometheus,
                handles: Handles::default(),
            });
            handle
        })
        .clone()
}

/// The process's recorder: Prometheus, and OTLP too once [`otlp::start`] has run. Handles
/// are kept per name and labels, so both sides see one handle for each series.
struct Recorder {
    prometheus: PrometheusRecorder,
    handles: Handles,
}

#[derive(Default)]
struct Handles {
    counters: RwLock<HashMap<Key, Counter>>,
    gauges: RwLock<HashMap<Key, Gauge>>,
    histograms: RwLock<HashMap<Key, Histogram>>,
}

/// The value kept for `key` in `map`, made once with `make`: a read lock when it is
/// there, the write lock only the first time.
pub(crate) fn cached<K, Q, T>(map: &RwLock<HashMap<K, T>>, key: &Q, make: impl FnOnce() -> T) -> T
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: ToOwned<Owned = K> + std::hash::Hash + Eq + ?Sized,
    T: Clone,
{
    if let Some(found) = map.read().unwrap_or_else(|e| e.into_inner()).get(key) {
        return found.clone();
    }
    map.write()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key.to_owned())
        .or_insert_with(make)
        .clone()
}

/// One series recorded on both sides.
struct Both<P, O> {
    prometheus: P,
    otlp: Arc<O>,
}

impl<O: CounterFn> CounterFn for Both<Counter, O> {
    fn increment(&self, value: u64) {
        self.prometheus.increment(value);
        self.otlp.increment(value);
    }

    fn absolute(&self, value: u64) {
        self.prometheus.absolute(value);
        self.otlp.absolute(value);
    }
}

impl<O: GaugeFn> GaugeFn for Both<Gauge, O> {
    fn increment(&self, value: f64) {
        self.prometheus.increment(value);
        self.otlp.increment(value);
    }

    fn decrement(&self, value: f64) {
        self.prometheus.decrement(value);
        self.otlp.decrement(value);
    }

    fn set(&self, value: f64) {
        self.prometheus.set(value);
        self.otlp.set(value);
    }
}

impl<O: HistogramFn> HistogramFn for Both<Histogram, O> {
    fn record(&self, value: f64) {
        self.prometheus.record(value);
        self.otlp.record(value);
    }
}

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        if let Some(bridge) = otlp::bridge() {
            bridge.describe(key.as_str(), description.clone());
        }
        self.prometheus.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        if let Some(bridge) = otlp::bridge() {
            bridge.describe(key.as_str(), description.clone());
        }
        self.prometheus.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        if let Some(bridge) = otlp::bridge() {
            bridge.describe(key.as_str(), description.clone());
        }
        self.prometheus.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        let Some(bridge) = otlp::bridge() else {
            return self.prometheus.register_counter(key, metadata);
        };
        cached(&self.handles.counters, key, || {
            Counter::from_arc(Arc::new(Both {
                prometheus: self.prometheus.register_counter(key, metadata),
                otlp: bridge.counter(key),
            }))
        })
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        let Some(bridge) = otlp::bridge() else {
            return self.prometheus.register_gauge(key, metadata);
        };
        cached(&self.handles.gauges, key, || {
            Gauge::from_arc(Arc::new(Both {
                prometheus: self.prometheus.register_gauge(key, metadata),
                otlp: bridge.gauge(key),
            }))
        })
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        let Some(bridge) = otlp::bridge() else {
            return self.prometheus.register_histogram(key, metadata);
        };
        cached(&self.handles.histograms, key, || {
            Histogram::from_arc(Arc::new(Both {
                prometheus: self.prometheus.register_histogram(key, metadata),
                otlp: bridge.histogram(key),
            }))
        })
    }
}

/// Every gRPC method path the server knows.
fn known_methods() -> HashSet<String> {
    let mut known = HashSet::new();
    for set in [
        loyalty_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ] {
        if let Ok(set) = prost_types::FileDescriptorSet::decode(set) {
            for file in set.file {
                for service in &file.service {
                    for method in &service.method {
                        known.insert(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
    }
    known.insert("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".into());
    known
}

/// The tower layer that records RED metrics for every call.
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer {
    known: Arc<HashSet<String>>,
}

impl Default for RpcMetricsLayer {
    fn default() -> Self {
        recorder();
        Self {
            known: Arc::new(known_methods()),
        }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            known: self.known.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    known: Arc<HashSet<String>>,
}

/// grpc-go's names for status codes, as dashboards expect them.
fn code_label(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "Canceled",
        3 => "InvalidArgument",
        4 => "DeadlineExceeded",
        5 => "NotFound",
        6 => "AlreadyExists",
        7 => "PermissionDenied",
        8 => "ResourceExhausted",
        9 => "FailedPrecondition",
        10 => "Aborted",
        11 => "OutOfRange",
        12 => "Unimplemented",
        13 => "Internal",
        14 => "Unavailable",
        15 => "DataLoss",
        16 => "Unauthenticated",
        _ => "Unknown",
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let method = if self.known.contains(path) {
            path.to_string()
        } else {
            "unknown".to_string()
        };
        let span = crate::telemetry::server_span(request.headers(), &method);
        let start = Instant::now();
        let response = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(
            async move {
                let result = response.await;
                let code = match &result {
                    Ok(r) => crate::telemetry::grpc_code(r.headers()),
                    Err(_) => 2,
                };
                crate::telemetry::record_status(&tracing::Span::current(), code);
                metrics::counter!("grpc_server_requests_total", "method" => method.clone(), "code" => code_label(code)).increment(1);
                metrics::histogram!("grpc_server_request_duration_seconds", "method" => method)
                    .record(start.elapsed().as_secs_f64());
                result
            }
            .instrument(span),
        )
    }
}

/// Answers `GET /metrics` with the Prometheus text format until `shutdown` resolves.
pub async fn serve_metrics(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let handle = recorder();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((socket, _)) = accepted else {
            continue;
        };
        let handle = handle.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            const WITHIN: std::time::Duration = std::time::Duration::from_secs(5);
            match tls {
                None => answer_scrape(socket, &handle).await,
                Some(tls) => {
                    if let Ok(Ok(stream)) = tokio::time::timeout(WITHIN, tls.accept(socket)).await {
                        answer_scrape(stream, &handle).await;
                    }
                }
            }
        });
    }
}

/// Answers one `GET /metrics` on `socket`, then closes it.
async fn answer_scrape<S>(mut socket: S, handle: &PrometheusHandle)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut request = [0u8; 4096];
    let read =
        tokio::time::timeout(std::time::Duration::from_secs(5), socket.read(&mut request)).await;
    let n = match read {
        Ok(Ok(n)) => n,
        _ => return,
    };
    let head = String::from_utf8_lossy(&request[..n]);
    let (status, body) = if head.starts_with("GET /metrics ") || head.starts_with("GET /metrics?") {
        ("200 OK", handle.render())
    } else {
        ("404 Not Found", "try GET /metrics\n".to_string())
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = socket.write_all(reply.as_bytes()).await;
    let _ = socket.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allowlist_knows_the_api_and_health() {
        let known = known_methods();
        assert!(known.contains("/loyalty.promotion.v1.CheckoutService/Commit"));
        assert!(known.contains("/grpc.health.v1.Health/Check"));
        assert!(!known.contains("/made.up/Path"));
    }
}
