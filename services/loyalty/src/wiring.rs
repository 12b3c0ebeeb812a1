//! Builds the services a process runs. Dev mode runs all five with in-process peers;
//! `serve --service` runs the named ones and reaches the others through gRPC. The service
//! code is the same either way; only what is plugged into the ports differs.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use loyalty_balance::Balance;
use loyalty_balance::certificate::{CertificateStore, GiftCertificates};
use loyalty_balance::store::embedded::EmbeddedBalanceStore;
use loyalty_balance::store::redis::RedisBalanceStore;
use loyalty_balance::store::scylla::ScyllaLedger;
use loyalty_balance::store::scylla_certificates::ScyllaCertificates;
use loyalty_balance::store::{BalanceStore, Ledger};
use loyalty_identity::Identity;
use loyalty_identity::keys::Keys;
use loyalty_identity::publish::LogMemberEvents;
use loyalty_identity::store::IdentityStore;
use loyalty_identity::store::embedded::EmbeddedIdentityStore;
use loyalty_platform::access::{CachedVerifier, Gate, KeyVerifier, Policy, WithServiceKey};
use loyalty_platform::audit::AuditLog;
use loyalty_platform::clock::SharedClock;
use loyalty_platform::config::{Backend, BalanceSettings, Config};
use loyalty_platform::events::redis::RedisEventLog;
use loyalty_platform::events::{EmbeddedEventLog, SharedEventLog};
use loyalty_platform::server::{HealthCheck, HealthEntry};
use loyalty_platform::tasks::supervise;
use loyalty_promotion::actions::ActionBonuses;
use loyalty_promotion::ports::{Members, NoSegments, Points, Segments};
use loyalty_promotion::publish::LogEvents;
use loyalty_promotion::store::PromotionStore;
use loyalty_promotion::store::embedded::EmbeddedPromotionStore;
use loyalty_promotion::store::redis::RedisPromotionStore;
use loyalty_promotion::{Admin, Checkout};
use loyalty_segmentation::Segmentation;
use loyalty_segmentation::store::SegmentationStore;
use loyalty_segmentation::store::embedded::EmbeddedSegmentationStore;
use tonic::service::Routes;
use tonic::transport::Endpoint;

use crate::balancer;
use loyalty_balance::store::traced::Traced as BalanceTraced;

use crate::peers::{
    LocalMembers, LocalPoints, LocalSegmentMembers, LocalSegments, PeerChannel, RemoteKeys,
    RemoteMembers, RemotePoints, RemoteSegmentMembers, RemoteSegments,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceName {
    Identity,
    Balance,
    Promotion,
    Segmentation,
    Reporting,
}

impl ServiceName {
    pub const ALL: [ServiceName; 5] = [
        ServiceName::Identity,
        ServiceName::Balance,
        ServiceName::Promotion,
        ServiceName::Segmentation,
        ServiceName::Reporting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ServiceName::Identity => "identity",
            ServiceName::Balance => "balance",
            ServiceName::Promotion => "promotion",
            ServiceName::Segmentation => "segmentation",
            ServiceName::Reporting => "reporting",
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ServiceName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ServiceName::ALL
            .into_iter()
            .find(|n| n.as_str() == s.trim())
            .ok_or_else(|| {
                format!("unknown service {s:?}; expected identity, balance, promotion, segmentation or reporting")
            })
    }
}

/// Parses `identity,balance`, refusing unknown and repeated names.
pub fn parse_services(list: &str) -> Result<Vec<ServiceName>, String> {
    let mut out: Vec<ServiceName> = Vec::new();
    for part in list.split(',').filter(|p| !p.trim().is_empty()) {
        let name: ServiceName = part.parse()?;
        if out.contains(&name) {
            return Err(format!("service {name} is named twice"));
        }
        out.push(name);
    }
    if out.is_empty() {
        return Err("name at least one service".into());
    }
    out.sort();
    Ok(out)
}

/// What one process runs.
#[derive(Debug)]
pub struct Node {
    pub services: Vec<ServiceName>,
    pub routes: Routes,
    pub health: Vec<HealthEntry>,
    pub identity: Option<Identity>,
    /// API keys, where identity runs.
    pub keys: Option<Keys>,
    pub balance: Option<Balance>,
    /// The Redis balance store, when balances run on Redis.
    pub redis_balances: Option<RedisBalanceStore>,
    pub checkout: Option<Checkout>,
    pub admin: Option<Admin>,
    /// Where this process's admins' calls are audited.
    pub audit: AuditLog,
}

/// This process's name in consumer groups: the host (the pod's name on Kubernetes) and pid.
fn consumer_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "loyalty".into());
    format!("{host}-{}", std::process::id())
}

struct Check<F>(F);

#[async_trait::async_trait]
impl<F, Fut> HealthCheck for Check<F>
where
    F: Fn() -> Fut + Send + Sync,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    async fn check(&self) -> Result<(), String> {
        (self.0)().await
    }
}

fn entry<F, Fut>(names: &[&'static str], f: F) -> HealthEntry
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    HealthEntry {
        service_names: names.to_vec(),
        check: Arc::new(Check(f)),
    }
}

/// The channel to a peer: balanced per call over every address of the URL's host name,
/// re-resolved every `peers.dns_refresh_ms` (see `balancer`).
pub(crate) fn peer_channel(
    config: &Config,
    name: ServiceName,
    url: &Option<String>,
) -> anyhow::Result<PeerChannel> {
    let url = url.as_ref().with_context(|| {
        format!("bad configuration: `peers.{name}` is required because the {name} service does not run in this process")
    })?;
    let timeout = config.peer_timeout();
    // An https peer is checked against its URL's host, whichever address a call goes to.
    let tls = match url.parse::<tonic::transport::Uri>() {
        Ok(uri) if uri.scheme_str() == Some("https") => {
            let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
            let tls = loyalty_platform::tls::client_config(&config.tls, host)?;
            // Settings that load once load every time: `configure` cannot fail later.
            Endpoint::from_shared(url.clone())?.tls_config(tls.clone())?;
            Some(tls)
        }
        _ => None,
    };
    let configure: balancer::Configure = Arc::new(move |endpoint: Endpoint| {
        // Keep-alives find a connection to a vanished peer (a lost node, a partition) in
        // seconds instead of the kernel's minutes.
        let endpoint = endpoint
            .connect_timeout(timeout)
            .timeout(timeout)
            .tcp_nodelay(true)
            .tcp_keepalive(Some(std::time::Duration::from_secs(30)))
            .http2_keep_alive_interval(std::time::Duration::from_secs(10))
            .keep_alive_timeout(std::time::Duration::from_secs(5))
            .keep_alive_while_idle(true);
        match &tls {
            Some(tls) => endpoint.clone().tls_config(tls.clone()).unwrap_or(endpoint),
            None => endpoint,
        }
    });
    balancer::channel(
        name.as_str(),
        url,
        configure,
        config.peer_dns_refresh(),
        Arc::new(balancer::Dns),
    )
    .map(|channel| PeerChannel::new(channel).with_key(config.auth.service_key.as_deref()))
    .with_context(|| format!("bad configuration: `peers.{name}` is not a valid URL"))
}

/// Reporting's facts: in ScyllaDB on the scylla backend, in the data directory's
/// `reporting.redb` otherwise.
pub(crate) async fn reporting_store(
    config: &Config,
) -> anyhow::Result<Arc<dyn loyalty_reporting::store::ReportingStore>> {
    if config.storage.backend == Backend::Scylla {
        let session = loyalty_platform::scylla::connect(&config.storage.scylla).await?;
        return Ok(Arc::new(
            loyalty_reporting::store::scylla::ScyllaReportingStore::new(session)
                .await
                .context("preparing reporting's statements (has `loyalty migrate` run?)")?,
        ));
    }
    Ok(Arc::new(
        loyalty_reporting::store::embedded::EmbeddedReportingStore::open(
            &config.data_dir.join("reporting.redb"),
        )?,
    ))
}

/// Opens the stores of `services` and builds their routes and health checks.
pub async fn build(
    config: &Config,
    services: &[ServiceName],
    clock: SharedClock,
) -> anyhow::Result<Node> {
    let dir = &config.data_dir;
    let max = config.server.max_message_bytes;
    let runs = |n: ServiceName| services.contains(&n);
    let mut routes = Routes::default();
    let mut health = Vec::new();

    // The event streams from identity, promotion and balance (producers) to segmentation and
    // reporting (consumers), and every process's audit records to reporting: an embedded log
    // in dev mode, Redis Streams on the Redis backends.
    let events: SharedEventLog = match config.storage.backend {
        Backend::Embedded => Arc::new(loyalty_platform::events::traced::Traced::new(
            "redb",
            Arc::new(EmbeddedEventLog::open(&dir.join("events.redb"))?),
        )),
        Backend::Redis | Backend::Scylla => {
            Arc::new(loyalty_platform::events::traced::Traced::new(
                "redis",
                Arc::new(RedisEventLog::for_config(&config.storage.redis)?),
            ))
        }
    };
    check_redis_settings(config, &runs);
    if config.storage.backend == Backend::Embedded && !runs(ServiceName::Reporting) {
        tracing::warn!(
            "the embedded event log is local to this process: admins' calls here are audited into it, but reporting, which lists the audit log, does not run in this process (use the redis backend to split services)"
        );
    }
    let producers = [
        ServiceName::Identity,
        ServiceName::Promotion,
        ServiceName::Balance,
    ];
    let consumers = [ServiceName::Segmentation, ServiceName::Reporting];
    if config.storage.backend == Backend::Embedded
        && producers
            .iter()
            .any(|p| consumers.iter().any(|c| runs(*p) != runs(*c)))
    {
        tracing::warn!(
            "the embedded event log is local to this process: member, purchase and ledger events reach segmentation and reporting only when identity, promotion, balance, segmentation and reporting run in one process (use the redis backend to split them)"
        );
    }

    let mut api_keys = None;
    let identity = if runs(ServiceName::Identity) {
        let identity = Identity::new(
            identity_store(config).await?,
            clock.clone(),
            config.identity.default_region.clone(),
        )
        .with_questionnaire(config.identity.questionnaire.clone())
        .with_events(Arc::new(LogMemberEvents::new(events.clone())));
        // Its routes are added once balance is known: merges and imports move points.
        api_keys = Some(Keys::new(identity.store().clone(), clock.clone()));
        let probe = identity.clone();
        let stream = events.clone();
        health.push(entry(loyalty_identity::grpc::SERVICE_NAMES, move || {
            let (probe, stream) = (probe.clone(), stream.clone());
            async move {
                probe
                    .store()
                    .ping()
                    .await
                    .map_err(|e| format!("identity store: {e}"))?;
                stream
                    .ping()
                    .await
                    .map_err(|e| format!("event stream: {e}"))
            }
        }));
        let scrubbed = identity.clone();
        spawn_scrub(config.identity.scrub_interval_secs, move || {
            let identity = scrubbed.clone();
            async move { identity.scrub_erased().await.map_err(|e| (e, "identity")) }
        });
        Some(identity)
    } else {
        None
    };

    let mut redis_balances = None;
    let balance = if runs(ServiceName::Balance) {
        let ledger = Arc::new(EmbeddedBalanceStore::open(&dir.join("balance.redb"))?);
        // Certificates live where the durable ledger does: in the pod's file on the embedded
        // and redis backends (one balance node), in ScyllaDB on the scylla backend.
        let mut certificate_store: Arc<dyn CertificateStore> = ledger.clone();
        let store: Arc<dyn BalanceStore> = match config.storage.backend {
            Backend::Embedded => Arc::new(BalanceTraced::new("redb", ledger)),
            Backend::Redis | Backend::Scylla => {
                let durable: Arc<dyn Ledger> = if config.storage.backend == Backend::Scylla {
                    let session = loyalty_platform::scylla::connect(&config.storage.scylla).await?;
                    certificate_store = Arc::new(
                        ScyllaCertificates::new(session.clone()).await.context(
                            "preparing the gift certificates' statements (has `loyalty migrate` run?)",
                        )?,
                    );
                    let ledger = ScyllaLedger::new(session).await.context(
                        "preparing the balance ledger's statements (has `loyalty migrate` run?)",
                    )?;
                    Arc::new(BalanceTraced::new("scylladb", Arc::new(ledger)))
                } else {
                    Arc::new(BalanceTraced::new("redb", ledger))
                };
                let redis = RedisBalanceStore::for_config(&config.storage.redis, durable)?;
                let retention = config.balance.hot_record_retention_secs;
                let redis = redis.with_record_retention(std::time::Duration::from_secs(retention));
                redis_balances = Some(redis.clone());
                Arc::new(BalanceTraced::new("redis", Arc::new(redis)))
            }
        };
        let mut balance = Balance::new(store, clock.clone());
        // Ledger entries go to the stream reporting and segmentation read: always on the
        // shared Redis stream; on the embedded log only when one of them runs in this process
        // to read it.
        if config.storage.backend != Backend::Embedded
            || runs(ServiceName::Reporting)
            || runs(ServiceName::Segmentation)
        {
            balance = balance.with_events(Arc::new(
                loyalty_balance::publish::LogLedgerEvents::new(events.clone()),
            ));
        }
        // Bulk accrual checks members with identity, in process or over gRPC when reachable.
        if let Some(identity) = &identity {
            balance = balance.with_directory(Arc::new(LocalMembers(identity.clone())));
        } else if config.peers.identity.is_some() {
            let channel = peer_channel(config, ServiceName::Identity, &config.peers.identity)?;
            balance = balance.with_directory(Arc::new(RemoteMembers(channel)));
        }
        // Certificates are low-volume money records: they stay in the embedded store on
        // every backend for now.
        let certificates = GiftCertificates::new(certificate_store, clock.clone());
        routes = loyalty_balance::grpc::add_routes(routes, balance.clone(), certificates, max);
        let probe = balance.clone();
        health.push(entry(loyalty_balance::grpc::SERVICE_NAMES, move || {
            let probe = probe.clone();
            async move {
                probe
                    .store()
                    .ping()
                    .await
                    .map_err(|e| format!("balance store: {e}"))
            }
        }));
        Some(balance)
    } else {
        None
    };

    // Identity moves points on a merge and hands opening balances over on an import: to
    // balance in this process, or over gRPC at `peers.balance`, or nowhere (then refused).
    let identity = match identity {
        Some(identity) => {
            let identity = match (&balance, &config.peers.balance) {
                (Some(balance), _) => identity.with_points(Arc::new(LocalPoints(balance.clone()))),
                (None, Some(_)) => identity.with_points(Arc::new(RemotePoints(peer_channel(
                    config,
                    ServiceName::Balance,
                    &config.peers.balance,
                )?))),
                (None, None) => identity,
            };
            if let Some(keys) = &api_keys {
                routes =
                    loyalty_identity::grpc::add_routes(routes, identity.clone(), keys.clone(), max);
            }
            Some(identity)
        }
        None => None,
    };

    let segmentation = if runs(ServiceName::Segmentation) {
        let store = segmentation_store(config).await?;
        let segmentation = Segmentation::new(store.clone(), clock.clone());
        routes = loyalty_segmentation::add_routes(routes, segmentation.clone(), max);
        let log = events.clone();
        let probe = log.clone();
        health.push(entry(loyalty_segmentation::SERVICE_NAMES, move || {
            let (store, log) = (store.clone(), probe.clone());
            async move {
                store
                    .ping()
                    .await
                    .map_err(|e| format!("segmentation store: {e}"))?;
                log.ping().await.map_err(|e| format!("event stream: {e}"))
            }
        }));
        let s = segmentation.clone();
        supervise("segmentation-evaluate-at-start", move || {
            loyalty_segmentation::consumer::evaluate_at_start(s.clone())
        });
        let consumer = consumer_name();
        for stream in loyalty_segmentation::consumer::STREAMS {
            let (s, log, consumer) = (segmentation.clone(), log.clone(), consumer.clone());
            supervise("segmentation-consumer", move || {
                loyalty_segmentation::consumer::run(
                    s.clone(),
                    log.clone(),
                    stream,
                    consumer.clone(),
                )
            });
        }
        let rfm_every = config.segmentation.rfm_interval_ms;
        if rfm_every > 0 {
            let s = segmentation.clone();
            supervise("segmentation-rfm", move || {
                loyalty_segmentation::consumer::schedule_rfm(
                    s.clone(),
                    std::time::Duration::from_millis(rfm_every),
                )
            });
        }
        let every = config.segmentation.reevaluate_interval_ms;
        if every > 0 {
            let s = segmentation.clone();
            supervise("segmentation-reevaluate", move || {
                loyalty_segmentation::consumer::schedule(
                    s.clone(),
                    std::time::Duration::from_millis(every),
                )
            });
        }
        let scrubbed = segmentation.clone();
        spawn_scrub(config.segmentation.scrub_interval_secs, move || {
            let segmentation = scrubbed.clone();
            async move {
                segmentation
                    .scrub_erased()
                    .await
                    .map_err(|e| (e, "segmentation"))
            }
        });
        Some(segmentation)
    } else {
        None
    };
    let (checkout, admin) = if runs(ServiceName::Promotion) {
        let store = promotion_store(config)?;
        let members: Arc<dyn Members> = match &identity {
            Some(identity) => Arc::new(LocalMembers(identity.clone())),
            None => Arc::new(RemoteMembers(peer_channel(
                config,
                ServiceName::Identity,
                &config.peers.identity,
            )?)),
        };
        let points: Arc<dyn Points> = match &balance {
            Some(balance) => Arc::new(LocalPoints(balance.clone())),
            None => Arc::new(RemotePoints(peer_channel(
                config,
                ServiceName::Balance,
                &config.peers.balance,
            )?)),
        };
        let log = events.clone();
        // Segment targeting asks segmentation, in process or over gRPC; without it no
        // member is in any segment and campaigns cannot target one.
        let segments: Arc<dyn Segments> = match &segmentation {
            Some(s) => Arc::new(LocalSegments(s.clone())),
            None if config.peers.segmentation.is_some() => Arc::new(RemoteSegments(peer_channel(
                config,
                ServiceName::Segmentation,
                &config.peers.segmentation,
            )?)),
            None => {
                tracing::info!(
                    "segmentation is not reachable from promotion (`peers.segmentation` is unset): campaigns cannot target segments"
                );
                Arc::new(NoSegments)
            }
        };
        let checkout = Checkout::new(
            store.clone(),
            members.clone(),
            points.clone(),
            segments.clone(),
            Arc::new(LogEvents::new(log.clone())),
            clock.clone(),
        );
        let admin = Admin::new(store.clone(), segments, clock.clone());
        // Registration, questionnaire and referral bonuses, from the member stream.
        let bonuses = ActionBonuses::new(store.clone(), points.clone(), clock.clone());
        let (bonus_log, consumer) = (log.clone(), consumer_name());
        supervise("promotion-action-bonuses", move || {
            loyalty_promotion::consume::run(bonuses.clone(), bonus_log.clone(), consumer.clone())
        });
        routes = loyalty_promotion::grpc::add_routes(routes, checkout.clone(), admin.clone(), max);
        // Checkout cannot serve without its store and both peers.
        health.push(entry(loyalty_promotion::grpc::SERVICE_NAMES, move || {
            let (store, members, points) = (store.clone(), members.clone(), points.clone());
            let log = log.clone();
            async move {
                store
                    .ping()
                    .await
                    .map_err(|e| format!("promotion store: {e}"))?;
                members.ping().await.map_err(|e| format!("identity: {e}"))?;
                points.ping().await.map_err(|e| format!("balance: {e}"))?;
                log.ping().await.map_err(|e| format!("event stream: {e}"))
            }
        }));
        (Some(checkout), Some(admin))
    } else {
        (None, None)
    };
    if runs(ServiceName::Reporting) {
        // Reporting keeps its facts in ScyllaDB on the scylla backend, in its embedded store
        // otherwise (one replica either way: the rollups live in its memory; the chart pins
        // it), and rebuilds its rollups from them here.
        let store = reporting_store(config).await?;
        let started = std::time::Instant::now();
        // The segment filter asks segmentation, in process or over gRPC.
        let segments: Arc<dyn loyalty_reporting::ports::SegmentMembers> = match &segmentation {
            Some(s) => Arc::new(LocalSegmentMembers(s.clone())),
            None if config.peers.segmentation.is_some() => {
                Arc::new(RemoteSegmentMembers(peer_channel(
                    config,
                    ServiceName::Segmentation,
                    &config.peers.segmentation,
                )?))
            }
            None => {
                tracing::info!(
                    "segmentation is not reachable from reporting (`peers.segmentation` is unset): KPIs cannot be filtered by segment"
                );
                Arc::new(loyalty_reporting::ports::NoSegmentation)
            }
        };
        let reporting = loyalty_reporting::Reporting::open(store, clock.clone())
            .await
            .context("rebuilding the reporting rollups from the stored facts")?
            .with_segments(segments);
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            "reporting rollups rebuilt from the stored facts"
        );
        routes = loyalty_reporting::add_routes(routes, reporting.clone(), max);
        let log = events.clone();
        let probe = (reporting.clone(), log.clone());
        health.push(entry(loyalty_reporting::SERVICE_NAMES, move || {
            let (reporting, log) = probe.clone();
            async move {
                reporting
                    .ping()
                    .await
                    .map_err(|e| format!("reporting store: {e}"))?;
                log.ping().await.map_err(|e| format!("event stream: {e}"))
            }
        }));
        let consumer = consumer_name();
        for stream in loyalty_reporting::consumer::STREAMS {
            let (r, log, consumer) = (reporting.clone(), log.clone(), consumer.clone());
            supervise("reporting-consumer", move || {
                loyalty_reporting::consumer::run(r.clone(), log.clone(), stream, consumer.clone())
            });
        }
        let (r, audit_log) = (reporting.clone(), log.clone());
        supervise("reporting-audit-consumer", move || {
            loyalty_reporting::consumer::run_audit(r.clone(), audit_log.clone(), consumer.clone())
        });
    }

    let audit = AuditLog::new(events)?;
    Ok(Node {
        audit,
        services: services.to_vec(),
        routes,
        health,
        identity,
        keys: api_keys,
        balance,
        redis_balances,
        checkout,
        admin,
    })
}

/// The access layer of this process: API keys checked by identity (here, or over gRPC with
/// the service key, its answers cached), or nothing checked on a loopback-only listener.
pub fn gate(config: &Config, node: &Node) -> anyhow::Result<Gate> {
    let policy = Policy::loyalty()?;
    if !config.auth_required() {
        tracing::warn!(
            listen = %config.listen,
            "authentication is OFF: every caller may do anything for any tenant; this is allowed only on a loopback address (set auth.mode = \"required\" to check API keys)"
        );
        return Ok(Gate::open(policy).with_audit(Some(node.audit.clone())));
    }
    let service_key = config.auth.service_key.as_deref();
    let p = &config.peers;
    let has_peers = [
        &p.identity,
        &p.balance,
        &p.promotion,
        &p.segmentation,
        &p.reporting,
    ]
    .iter()
    .any(|peer| peer.is_some());
    anyhow::ensure!(
        service_key.is_some() || !has_peers,
        "bad configuration: `auth.service_key` is required: with authentication on, this process calls other services (`peers.*`) and presents the service key to them"
    );
    let keys: Arc<dyn KeyVerifier> = match &node.keys {
        Some(keys) => Arc::new(keys.clone()),
        None => {
            anyhow::ensure!(
                service_key.is_some(),
                "bad configuration: `auth.service_key` is required: with authentication on, this process asks the identity service about API keys, and presents the service key to do so"
            );
            let channel = peer_channel(config, ServiceName::Identity, &config.peers.identity)?;
            Arc::new(CachedVerifier::new(
                RemoteKeys(channel),
                Duration::from_secs(config.auth.cache_ttl_secs),
                100_000,
            ))
        }
    };
    tracing::info!(
        service_key = service_key.is_some(),
        "authentication is on: every call presents an API key"
    );
    let limits = loyalty_platform::access::RateLimits::new(&config.rate_limits);
    if limits.is_some() {
        let l = &config.rate_limits;
        tracing::info!(
            per_key = l.per_key,
            per_tenant = l.per_tenant,
            tenants_with_their_own = l.tenants.len(),
            burst_secs = l.burst_secs,
            "rate limits on (calls per second, per process)"
        );
    }
    Ok(Gate::new(
        policy,
        Arc::new(WithServiceKey::new(service_key, Some(keys))),
        config.server.max_message_bytes,
    )
    .with_rate_limits(limits)
    .with_audit(Some(node.audit.clone())))
}

/// Runs the expiry process in the background: every interval, expires due lots and
/// releases timed-out holds. Safe on every replica at once.
/// Finishes, every 30 s, commits left pending for over a minute (their caller never
/// retried), exactly as a retry would. Safe on every replica at once.
pub fn spawn_commit_repair(checkout: Checkout) {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(30);
    const AGE_MS: i64 = 60_000;
    const BATCH: usize = 1_000;
    supervise("promotion-commit-repair", move || {
        let checkout = checkout.clone();
        async move {
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match checkout.repair_stale(AGE_MS, BATCH).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(receipts = n, "finished commits their callers left pending")
                    }
                    Err(e) => tracing::warn!(error = %e, "finishing pending commits could not run"),
                }
            }
        }
    });
}

/// Runs `scrub` (a store's rewrite when erasures left replaced personal data in its free
/// space) every `interval_secs`, and once at start. Safe on every replica.
pub fn spawn_scrub<F, Fut>(interval_secs: u64, scrub: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<bool, (loyalty_platform::error::Error, &'static str)>>
        + Send
        + 'static,
{
    if interval_secs == 0 {
        return;
    }
    let scrub = Arc::new(scrub);
    supervise("scrub", move || {
        let scrub = scrub.clone();
        async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(interval_secs));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err((e, store)) = scrub().await {
                    tracing::warn!(error = %e, store, "the scrub of erased personal data could not run");
                }
            }
        }
    });
}

pub fn spawn_expiry(balance: Balance, settings: &BalanceSettings) {
    if settings.expiry_interval_ms == 0 {
        return;
    }
    let interval = std::time::Duration::from_millis(settings.expiry_interval_ms);
    let batch = settings.expiry_batch;
    supervise("balance-expiry", move || {
        let balance = balance.clone();
        async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // A full batch means more may be due: go again at once.
                loop {
                    match balance.expire_due(batch).await {
                        Ok(n) if n == batch => continue,
                        Ok(n) => {
                            if n > 0 {
                                tracing::info!(members = n, "expired points and released holds");
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "the expiry process could not run");
                            break;
                        }
                    }
                }
            }
        }
    });
}

/// Warns, in the background, when the Redis this process keeps state in that nothing
/// rebuilds may evict it or lose it on a restart (`redis_conn::check_settings`).
fn check_redis_settings(config: &Config, runs: &dyn Fn(ServiceName) -> bool) {
    use loyalty_platform::config::ServiceStore;
    let mut holds = Vec::new();
    if config.storage.backend != Backend::Embedded {
        holds.push("the event streams");
    }
    for (name, store, what) in [
        (
            ServiceName::Identity,
            config.identity.store,
            "identity's members, cards and API keys",
        ),
        (
            ServiceName::Promotion,
            config.promotion.store,
            "promotion's campaigns, budgets and purchase history",
        ),
        (
            ServiceName::Segmentation,
            config.segmentation.store,
            "segmentation's segments",
        ),
    ] {
        if runs(name) && store == ServiceStore::Redis {
            holds.push(what);
        }
    }
    if holds.is_empty() {
        return;
    }
    let Ok(conn) =
        loyalty_platform::redis_conn::StoreConn::for_config("redis check", &config.storage.redis)
    else {
        return;
    };
    let holds = holds.join(", ");
    tokio::spawn(async move { loyalty_platform::redis_conn::check_settings(&conn, &holds).await });
}

/// Refuses to serve `service` from a Redis that a `loyalty copy-<service>` left half
/// written (`unfinished`), or that holds nothing of it while `file`, its embedded file,
/// still exists beside it (a move whose copy was forgotten: every member or segment would
/// look gone). When Redis cannot be asked, the process starts (and is not ready until Redis
/// answers) rather than fail.
async fn refuse_uncopied<F, Fut>(
    service: &str,
    file: &std::path::Path,
    unfinished: loyalty_platform::error::Result<bool>,
    is_empty: F,
) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = loyalty_platform::error::Result<bool>>,
{
    match unfinished {
        Ok(true) => anyhow::bail!(
            "a `loyalty copy-{service}` into {service}'s Redis did not finish: run it again before serving"
        ),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(error = %e, "{service}'s Redis does not answer; whether a copy into it finished is not checked");
            return Ok(());
        }
    }
    if !file.exists() {
        return Ok(());
    }
    match is_empty().await {
        Ok(true) => anyhow::bail!(
            "{service}.store is \"redis\" and that Redis holds no {service} data, but {} exists: \
             copy it first with `loyalty copy-{service} --data-dir {}`, or move the file away to start empty",
            file.display(),
            file.parent()
                .map(|d| d.display().to_string())
                .unwrap_or_default()
        ),
        Ok(false) => Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, "{service}'s Redis does not answer; whether it holds the data of {} is not checked", file.display());
            Ok(())
        }
    }
}

/// The identity store `identity.store` names: the embedded file in `data_dir` (its emails
/// indexed once, for files written before the email index), or the Redis of
/// `storage.redis` shared by every identity replica.
pub async fn identity_store(config: &Config) -> anyhow::Result<Arc<dyn IdentityStore>> {
    use loyalty_identity::store::redis::RedisIdentityStore;
    use loyalty_identity::store::traced::Traced;
    use loyalty_platform::config::ServiceStore;
    Ok(match config.identity.store {
        ServiceStore::Embedded => {
            let path = config.data_dir.join("identity.redb");
            let store = Arc::new(EmbeddedIdentityStore::open(&path)?);
            let filed = store.index_stored_emails().await?;
            if filed > 0 {
                tracing::info!(
                    filed,
                    "emails of members stored before the email index were filed"
                );
            }
            Arc::new(Traced::new("redb", store))
        }
        ServiceStore::Redis => {
            let store = RedisIdentityStore::for_config(&config.storage.redis)?;
            let file = config.data_dir.join("identity.redb");
            refuse_uncopied("identity", &file, store.copy_unfinished().await, || {
                store.is_empty()
            })
            .await?;
            Arc::new(Traced::new("redis", Arc::new(store)))
        }
    })
}

/// The promotion store `promotion.store` names: the embedded file in `data_dir`, or the
/// Redis of `storage.redis` shared by every promotion replica.
pub fn promotion_store(config: &Config) -> anyhow::Result<Arc<dyn PromotionStore>> {
    use loyalty_platform::config::ServiceStore;
    use loyalty_promotion::store::traced::Traced;
    Ok(match config.promotion.store {
        ServiceStore::Embedded => Arc::new(Traced::new(
            "redb",
            Arc::new(EmbeddedPromotionStore::open(
                &config.data_dir.join("promotion.redb"),
            )?),
        )),
        ServiceStore::Redis => Arc::new(Traced::new(
            "redis",
            Arc::new(RedisPromotionStore::for_config(&config.storage.redis)?),
        )),
    })
}

/// The segmentation store `segmentation.store` names: the embedded file in `data_dir`, or
/// the Redis of `storage.redis` shared by every segmentation replica.
pub async fn segmentation_store(config: &Config) -> anyhow::Result<Arc<dyn SegmentationStore>> {
    use loyalty_platform::config::ServiceStore;
    use loyalty_segmentation::store::redis::RedisSegmentationStore;
    use loyalty_segmentation::store::traced::Traced;
    Ok(match config.segmentation.store {
        ServiceStore::Embedded => {
            let path = config.data_dir.join("segmentation.redb");
            Arc::new(Traced::new(
                "redb",
                Arc::new(EmbeddedSegmentationStore::open(&path)?),
            ))
        }
        ServiceStore::Redis => {
            let store = RedisSegmentationStore::for_config(&config.storage.redis)?;
            let file = config.data_dir.join("segmentation.redb");
            refuse_uncopied("segmentation", &file, store.copy_unfinished().await, || {
                store.is_empty()
            })
            .await?;
            Arc::new(Traced::new("redis", Arc::new(store)))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_lists() {
        assert_eq!(
            parse_services("promotion, identity").unwrap(),
            [ServiceName::Identity, ServiceName::Promotion]
        );
        assert!(parse_services("identity,identity").is_err());
        assert!(
            parse_services("ledger")
                .unwrap_err()
                .contains("unknown service")
        );
        assert!(parse_services("").is_err());
    }
}
