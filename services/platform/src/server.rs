//! Server bootstrap shared by every mode: health that follows real dependency state,
//! reflection, limits, and graceful shutdown (NOT_SERVING, then drain within a grace period).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::ServerConfig;

/// The health service name that answers SERVING for as long as the process runs, whatever
/// its dependencies do and during the drain: what a liveness probe asks. Readiness asks for
/// "" (every service) or one service's name.
pub const LIVENESS: &str = "liveness";

/// Something whose health decides whether a set of gRPC services is SERVING.
#[async_trait::async_trait]
pub trait HealthCheck: Send + Sync {
    /// `Err` with a short reason when a dependency does not answer.
    async fn check(&self) -> Result<(), String>;
}

/// One service's health: its gRPC service names and the check behind them.
pub struct HealthEntry {
    pub service_names: Vec<&'static str>,
    pub check: Arc<dyn HealthCheck>,
}

impl std::fmt::Debug for HealthEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthEntry")
            .field("service_names", &self.service_names)
            .finish_non_exhaustive()
    }
}

/// Turns SIGTERM or SIGINT into a future, for `main`. The handlers are installed when this
/// is called, not when the future is first polled, so a signal that arrives while the
/// process is still starting up shuts it down cleanly instead of killing it.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    #[cfg(unix)]
    let int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
    async move {
        #[cfg(unix)]
        {
            let (mut term, mut int) = match (term, int) {
                (Ok(term), Ok(int)) => (term, int),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(error = %e, "cannot listen for sigterm or sigint");
                    return std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = int.recv() => tracing::info!("sigint received, shutting down"),
                _ = term.recv() => tracing::info!("sigterm received, shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!(error = %e, "cannot listen for ctrl-c");
                std::future::pending::<()>().await;
            }
            tracing::info!("ctrl-c received, shutting down");
        }
    }
}

/// The listeners of one process: gRPC, and optionally Prometheus metrics and plain-text
/// health (for probes that cannot speak TLS).
pub struct Listeners {
    pub grpc: TcpListener,
    /// TLS on `grpc`; `None`: plain text.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    pub metrics: Option<TcpListener>,
    /// TLS on `metrics`; `None`: plain text.
    pub metrics_tls: Option<tokio_rustls::TlsAcceptor>,
    pub health: Option<TcpListener>,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listeners")
            .field("grpc", &self.grpc)
            .field("tls", &self.tls.is_some())
            .field("metrics", &self.metrics)
            .field("metrics_tls", &self.metrics_tls.is_some())
            .field("health", &self.health)
            .finish()
    }
}

/// Serves `routes` on `listeners.grpc` until `shutdown` resolves, then reports NOT_SERVING,
/// stops accepting, and gives in-flight calls `grace_period_secs` to finish.
pub async fn serve(
    listeners: Listeners,
    routes: Routes,
    health: Vec<HealthEntry>,
    gate: crate::access::Gate,
    config: &ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Listeners {
        grpc: listener,
        tls,
        metrics,
        metrics_tls,
        health: health_listener,
    } = listeners;
    let metrics_task = metrics.map(|l| {
        tokio::spawn(crate::metrics::serve_metrics(
            l,
            metrics_tls,
            std::future::pending(),
        ))
    });
    let (reporter, health_service) = tonic_health::server::health_reporter();
    // The same statuses, plain text on their own port; nothing else is served there.
    let health_task = health_listener.map(|l| {
        let health_service = health_service.clone();
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(health_service)
                .serve_with_incoming(TcpIncoming::from(l).with_nodelay(Some(true)))
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the health listener stopped");
            }
        })
    });
    reporter
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(loyalty_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let routes = routes.add_service(health_service).add_service(reflection);

    // The monitor is the only writer of health statuses. On shutdown it flips every status to
    // NOT_SERVING and says so; only then does the server stop accepting and start draining.
    let (stopping_tx, stopping) = watch::channel(false);
    let (flipped_tx, flipped) = tokio::sync::oneshot::channel();
    let monitor = tokio::spawn(monitor_health(
        reporter,
        health,
        Duration::from_secs(config.health_interval_secs),
        stopping,
        flipped_tx,
    ));
    let mut drain_started = stopping_tx.subscribe();
    let signal = async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), flipped).await;
        tracing::info!("health is not serving; draining in-flight calls");
    };

    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let server = builder
        .timeout(Duration::from_secs(config.request_timeout_secs))
        .max_concurrent_streams(config.max_concurrent_streams)
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .layer(crate::metrics::RpcMetricsLayer::default())
        .layer(gate)
        .add_routes(routes)
        // Accepted sockets need TCP_NODELAY set here: the builder's own setting only applies
        // when tonic binds the listener itself. Without it, Nagle holds response frames back
        // until the client's delayed ACK, about 40 ms per call.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60))),
            signal,
        );
    tokio::pin!(server);

    let grace = Duration::from_secs(config.grace_period_secs);
    let outcome = tokio::select! {
        result = &mut server => result.map_err(anyhow::Error::from),
        () = async {
            let _ = drain_started.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(grace_secs = grace.as_secs(), "grace period over; dropping calls still in flight");
            Ok(())
        }
    };
    monitor.abort();
    for task in [metrics_task, health_task].into_iter().flatten() {
        task.abort();
    }
    tracing::info!("server stopped");
    outcome
}

/// Re-checks every entry's dependencies and publishes the result per service name. The
/// overall ("") status is SERVING only when every service is. When `stopping` turns true it
/// sets everything NOT_SERVING, reports that on `flipped` and ends.
async fn monitor_health(
    reporter: HealthReporter,
    entries: Vec<HealthEntry>,
    interval: Duration,
    mut stopping: watch::Receiver<bool>,
    flipped: tokio::sync::oneshot::Sender<()>,
) {
    let mut last: Vec<Option<bool>> = vec![None; entries.len()];
    loop {
        let mut statuses = Vec::with_capacity(entries.len());
        let checks = async {
            for (entry, last) in entries.iter().zip(last.iter_mut()) {
                let result = tokio::time::timeout(interval, entry.check.check())
                    .await
                    .unwrap_or_else(|_| Err("health check timed out".into()));
                if *last != Some(result.is_ok()) {
                    match &result {
                        Ok(()) => tracing::info!(services = ?entry.service_names, "serving"),
                        Err(why) => {
                            tracing::warn!(services = ?entry.service_names, reason = %why, "not serving")
                        }
                    }
                    *last = Some(result.is_ok());
                }
                statuses.push(result.is_ok());
            }
        };
        tokio::select! {
            () = checks => {}
            _ = stopping.wait_for(|s| *s) => break,
        }
        if *stopping.borrow() {
            break;
        }
        for (entry, ok) in entries.iter().zip(&statuses) {
            for name in &entry.service_names {
                reporter.set_service_status(*name, serving(*ok)).await;
            }
        }
        reporter
            .set_service_status("", serving(statuses.iter().all(|ok| *ok)))
            .await;
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stopping.wait_for(|s| *s) => break,
        }
    }
    for entry in &entries {
        for name in &entry.service_names {
            reporter
                .set_service_status(*name, ServingStatus::NotServing)
                .await;
        }
    }
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let _ = flipped.send(());
}

fn serving(ok: bool) -> ServingStatus {
    if ok {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}
