//! Typed, layered configuration: built-in defaults, then an optional TOML file, then
//! `LOYALTY_*` environment variables (`__` separates sections, e.g.
//! `LOYALTY_SERVER__GRACE_PERIOD_SECS=5`), then command-line flags. Unknown keys and bad
//! values are errors that name the key.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The whole configuration of one `loyalty` process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the gRPC server binds; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Where embedded stores keep their files.
    pub data_dir: PathBuf,
    pub log: LogConfig,
    pub tracing: TracingConfig,
    pub metrics: MetricsConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub rate_limits: RateLimitConfig,
    pub server: ServerConfig,
    pub peers: PeersConfig,
    pub storage: StorageConfig,
    pub identity: IdentitySettings,
    pub balance: BalanceSettings,
    pub promotion: PromotionSettings,
    pub segmentation: SegmentationSettings,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: PathBuf::from("data"),
            log: LogConfig::default(),
            tracing: TracingConfig::default(),
            metrics: MetricsConfig::default(),
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            rate_limits: RateLimitConfig::default(),
            server: ServerConfig::default(),
            peers: PeersConfig::default(),
            storage: StorageConfig::default(),
            identity: IdentitySettings::default(),
            balance: BalanceSettings::default(),
            promotion: PromotionSettings::default(),
            segmentation: SegmentationSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentationSettings {
    /// How often segments whose truth moves with time alone ("bought in the last 30 days")
    /// are re-evaluated for every member; 0 turns the schedule off in this process.
    pub reevaluate_interval_ms: u64,
    /// How often every tenant's RFM scores are recomputed; 0 turns the schedule off in this
    /// process (`RecomputeRfm` still works).
    pub rfm_interval_ms: u64,
    /// How often segmentation checks for erasures whose replaced member data is still in its
    /// store's free space, and rewrites the store when there are; 0: never.
    pub scrub_interval_secs: u64,
    /// Where segmentation keeps features, segments, memberships and RFM scores.
    pub store: ServiceStore,
}

impl Default for SegmentationSettings {
    fn default() -> Self {
        Self {
            reevaluate_interval_ms: 300_000,
            rfm_interval_ms: 3_600_000,
            scrub_interval_secs: 60,
            store: ServiceStore::Embedded,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PromotionSettings {
    /// Where promotion keeps its state (programs, catalog, campaigns, coupons, budget
    /// counters, purchase history).
    pub store: ServiceStore,
}

/// Where a service that can share its state between replicas (identity, promotion,
/// segmentation) keeps it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ServiceStore {
    /// A redb file in `data_dir`: one process of the service.
    #[default]
    Embedded,
    /// The Redis (or Redis Cluster) of `storage.redis`, shared by every replica of the
    /// service. For identity and promotion that Redis holds the only copy of their state
    /// and must persist it (ARCHITECTURE.md, "Identity on Redis", "Promotion on Redis");
    /// segmentation's features can be rebuilt
    /// from the sources, its segments cannot ("Segmentation on Redis").
    Redis,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BalanceSettings {
    /// How often the expiry process looks for due lots and timed-out holds; 0 turns it off
    /// in this process (it is safe to run on every replica).
    pub expiry_interval_ms: u64,
    /// Most members one expiry round handles.
    pub expiry_batch: usize,
    /// On the `redis` and `scylla` backends: how long Redis keeps an idempotency record
    /// after its last change (and the state of a member only read); older ones are read
    /// from the ledger when a retry, refund or hold needs them. 0: for ever.
    pub hot_record_retention_secs: u64,
}

impl Default for BalanceSettings {
    fn default() -> Self {
        Self {
            expiry_interval_ms: 10_000,
            expiry_batch: 1_000,
            hot_record_retention_secs: 7 * 24 * 3600,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `info,loyalty_balance=debug`.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

/// OpenTelemetry tracing. With no endpoint nothing is exported and no span is made for it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// Where spans go over OTLP/gRPC, e.g. `http://otel-collector:4317`; unset: tracing off.
    pub otlp_endpoint: Option<String>,
    /// Share of traces started here that are kept (head sampling, 0 to 1). A call that comes
    /// with a sampled W3C `traceparent` is always kept (parent-based).
    pub sample_ratio: f64,
    /// The `service.name` resource attribute; unset: `loyalty-` and the services this
    /// process runs, e.g. `loyalty-balance`.
    pub service_name: Option<String>,
    /// Deadline of one export of a batch of spans.
    pub export_timeout_ms: u64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            service_name: None,
            export_timeout_ms: 10_000,
        }
    }
}

/// Metrics pushed over OTLP, besides the Prometheus endpoint (`server.metrics_listen`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where metrics go over OTLP/gRPC, e.g. `http://otel-collector:4317`; unset: not pushed.
    /// The `service.name` is the one of `tracing.service_name`.
    pub otlp_endpoint: Option<String>,
    /// How often the current values are pushed (cumulative).
    pub export_interval_ms: u64,
    /// Deadline of one push.
    pub export_timeout_ms: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            export_interval_ms: 15_000,
            export_timeout_ms: 10_000,
        }
    }
}

/// Who may call: API keys with roles (see `access`).
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `required` or `off`. Unset: off when the server listens on loopback only (dev mode on
    /// a laptop), required otherwise. `off` is refused on any other address.
    pub mode: Option<AuthMode>,
    /// The shared secret our processes present to each other (role `service`, every
    /// tenant); at least 32 characters. Needed when services run in separate processes with
    /// authentication on. Usually from `LOYALTY_AUTH__SERVICE_KEY`.
    pub service_key: Option<String>,
    /// How long a process that does not run identity trusts identity's answer about a key:
    /// a revoked key keeps working there for at most this long.
    pub cache_ttl_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: None,
            service_key: None,
            cache_ttl_secs: 10,
        }
    }
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("mode", &self.mode)
            .field("service_key", &self.service_key.as_ref().map(|_| "<set>"))
            .field("cache_ttl_secs", &self.cache_ttl_secs)
            .finish()
    }
}

/// Calls per second a caller may make (see `access::limits`); 0 is no limit. Checked per
/// process, on callers with an API key; our own processes are never limited.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Per API key (or client certificate).
    pub per_key: f64,
    /// Per tenant, all its keys together.
    pub per_tenant: f64,
    /// How many seconds' worth of calls may come at once.
    pub burst_secs: f64,
    /// Per-tenant rates instead of `per_tenant`, by tenant id.
    pub tenants: std::collections::HashMap<String, f64>,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            per_key: 0.0,
            per_tenant: 0.0,
            burst_secs: 1.0,
            tenants: std::collections::HashMap::new(),
        }
    }
}

/// TLS on the gRPC listener and to peers; unset files leave the listener plain.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// This process's certificate chain, PEM. With `key_file`, the gRPC listener speaks TLS
    /// only.
    pub cert_file: Option<PathBuf>,
    /// The private key of `cert_file`, PEM.
    pub key_file: Option<PathBuf>,
    /// A CA certificate (PEM) whose client certificates identify callers (mutual TLS): a
    /// certificate whose subject common name is an API key's id acts as that key, without
    /// its secret. Clients without a certificate still connect unless
    /// `require_client_cert`.
    pub client_ca_file: Option<PathBuf>,
    /// Refuse connections without a client certificate signed by `client_ca_file`.
    pub require_client_cert: bool,
    /// The CA certificate (PEM) that signed the peers' certificates, for `https://` peer
    /// URLs; unset: the web PKI roots. With `client_ca_file`, calls to peers present
    /// `cert_file` as a client certificate, so it must allow client authentication.
    pub peer_ca_file: Option<PathBuf>,
    /// Serve the Prometheus endpoint (`server.metrics_listen`) over TLS too, with
    /// `cert_file` and `key_file` (no client certificates asked). The plain-text health
    /// listener stays plain: probes cannot speak TLS.
    pub metrics: bool,
}

impl TlsConfig {
    /// Whether the gRPC listener speaks TLS.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Required,
    Off,
}

impl Config {
    /// Whether calls must present an API key, after the default for `auth.mode`.
    pub fn auth_required(&self) -> bool {
        match self.auth.mode {
            Some(mode) => mode == AuthMode::Required,
            None => !self.listen.ip().is_loopback(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Largest request or response message, in bytes.
    pub max_message_bytes: usize,
    /// How long in-flight calls may finish after SIGTERM before they are dropped.
    pub grace_period_secs: u64,
    /// Deadline of every call on the server side.
    pub request_timeout_secs: u64,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// How often health is re-checked against real dependencies.
    pub health_interval_secs: u64,
    /// Where `GET /metrics` (Prometheus) is served; unset: no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Where `grpc.health.v1.Health` alone is served in plain text, for probes that cannot
    /// speak TLS (Kubernetes' gRPC probes); unset: health only on `listen`.
    pub health_listen: Option<SocketAddr>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 * 1024 * 1024,
            grace_period_secs: 20,
            request_timeout_secs: 10,
            max_concurrent_streams: 1024,
            health_interval_secs: 2,
            metrics_listen: None,
            health_listen: None,
        }
    }
}

/// Addresses of peer services, used in microservices mode for services not run in this
/// process, e.g. `http://identity:50051`. When a peer's host is a DNS name, calls are spread
/// per call over every address the name resolves to (a Kubernetes headless Service resolves to
/// all ready pods); an IP address is one endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PeersConfig {
    pub identity: Option<String>,
    pub balance: Option<String>,
    pub promotion: Option<String>,
    pub segmentation: Option<String>,
    pub reporting: Option<String>,
    /// Deadline of one call to a peer.
    pub timeout_ms: u64,
    /// How often, in milliseconds, a peer's DNS name is resolved again: new addresses join
    /// the set calls are spread over and vanished ones leave it. A failed or empty answer
    /// keeps the last known addresses. Between 100 and 600000; default 5000.
    pub dns_refresh_ms: u64,
}

impl Default for PeersConfig {
    fn default() -> Self {
        Self {
            identity: None,
            balance: None,
            promotion: None,
            segmentation: None,
            reporting: None,
            timeout_ms: 1000,
            dns_refresh_ms: 5000,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub backend: Backend,
    pub redis: RedisConfig,
    pub scylla: ScyllaConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScyllaConfig {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// The keyspace's replication map, used when `loyalty migrate` creates it.
    pub replication: String,
    /// Extra keyspace options for `loyalty migrate`, e.g. `AND tablets = {'enabled': false}`
    /// on ScyllaDB versions whose tablets do not support lightweight transactions.
    pub keyspace_options: String,
    pub connect_timeout_ms: u64,
    pub request_timeout_ms: u64,
}

impl Default for ScyllaConfig {
    fn default() -> Self {
        Self {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "loyalty".into(),
            replication: "{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}".into(),
            keyspace_options: String::new(),
            connect_timeout_ms: 5_000,
            request_timeout_ms: 2_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Where the hot balance state lives, e.g. `redis://redis:6379/`.
    pub url: String,
    /// Redis Cluster seed nodes (`redis://host:port/`); when given, `url` is not used.
    pub cluster_nodes: Vec<String>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/".into(),
            cluster_nodes: Vec::new(),
        }
    }
}

/// Storage backends this build offers.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// redb files in `data_dir`, one per service.
    #[default]
    Embedded,
    /// Balances: hot state in Redis (`storage.redis`) over the embedded durable ledger
    /// (single node). Other services: embedded.
    Redis,
    /// Balances: hot state in Redis over the durable ledger in ScyllaDB
    /// (`storage.scylla`, schema applied by `loyalty migrate`). Other services: embedded.
    Scylla,
}

/// The member fields a questionnaire can require.
pub const QUESTIONNAIRE_FIELDS: &[&str] = &[
    "first_name",
    "last_name",
    "email",
    "gender",
    "birthday",
    "preferred_store_id",
];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IdentitySettings {
    /// ISO 3166-1 region assumed for phone numbers written without a country code.
    pub default_region: String,
    /// The fields whose filling makes a member's questionnaire complete (any of
    /// [`QUESTIONNAIRE_FIELDS`]).
    pub questionnaire: Vec<String>,
    /// How often identity checks for erasures whose replaced bytes are still in its store's
    /// free space (embedded) or append-only file (Redis), and rewrites it when there are;
    /// 0: never.
    pub scrub_interval_secs: u64,
    /// Where identity keeps members, cards, indexes and API keys.
    pub store: ServiceStore,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        Self {
            scrub_interval_secs: 60,
            store: ServiceStore::Embedded,
            default_region: "KZ".into(),
            questionnaire: ["first_name", "last_name", "gender", "birthday"]
                .map(String::from)
                .to_vec(),
        }
    }
}

/// Flags that override every other layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
}

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("bad configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    /// Loads the layers. `env` is the process environment as (name, value) pairs, passed in
    /// so tests never touch the real environment.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        // Variables for the test harness (`LOYALTY_TEST_*`) are not configuration.
        let vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("LOYALTY_") && !k.starts_with("LOYALTY_TEST_"))
            .collect();
        figment = figment.merge(EnvSnapshot(vars));
        let mut config: Config = figment.extract().map_err(|e| ConfigError(render(&e)))?;
        if let Some(listen) = overrides.listen {
            config.listen = listen;
        }
        if let Some(dir) = &overrides.data_dir {
            config.data_dir = dir.clone();
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("`{key}` {why}")));
        if self.server.max_message_bytes < 1024 || self.server.max_message_bytes > 64 << 20 {
            return bad(
                "server.max_message_bytes",
                "must be between 1 KiB and 64 MiB",
            );
        }
        if self.server.request_timeout_secs == 0 {
            return bad("server.request_timeout_secs", "must be positive");
        }
        if self.server.max_concurrent_streams == 0 {
            return bad("server.max_concurrent_streams", "must be positive");
        }
        if self.server.health_interval_secs == 0 {
            return bad("server.health_interval_secs", "must be positive");
        }
        if !(1..=60_000).contains(&self.peers.timeout_ms) {
            return bad("peers.timeout_ms", "must be between 1 and 60000");
        }
        if !(100..=600_000).contains(&self.peers.dns_refresh_ms) {
            return bad("peers.dns_refresh_ms", "must be between 100 and 600000");
        }
        if !self.storage.redis.url.starts_with("redis://")
            || self
                .storage
                .redis
                .cluster_nodes
                .iter()
                .any(|n| !n.starts_with("redis://"))
        {
            return bad(
                "storage.redis.url",
                "must be a redis:// URL, e.g. redis://redis:6379/",
            );
        }
        let ks = &self.storage.scylla.keyspace;
        if ks.is_empty()
            || ks.len() > 48
            || !ks.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return bad(
                "storage.scylla.keyspace",
                "must be 1 to 48 letters, digits or underscores",
            );
        }
        if self.storage.scylla.nodes.is_empty() {
            return bad("storage.scylla.nodes", "must name at least one node");
        }
        if self.balance.expiry_batch == 0 || self.balance.expiry_batch > 100_000 {
            return bad("balance.expiry_batch", "must be between 1 and 100000");
        }
        if self.balance.hot_record_retention_secs > 10 * 366 * 24 * 3600 {
            return bad(
                "balance.hot_record_retention_secs",
                "must be at most ten years (0: for ever)",
            );
        }
        let peers = [
            ("peers.identity", &self.peers.identity),
            ("peers.balance", &self.peers.balance),
            ("peers.promotion", &self.peers.promotion),
            ("peers.segmentation", &self.peers.segmentation),
            ("peers.reporting", &self.peers.reporting),
        ]
        .map(|(key, url)| (key, url, "http://identity:50051"));
        let collectors = [
            ("tracing.otlp_endpoint", &self.tracing.otlp_endpoint),
            ("metrics.otlp_endpoint", &self.metrics.otlp_endpoint),
        ]
        .map(|(key, url)| (key, url, "http://otel-collector:4317"));
        for (key, url, example) in peers.into_iter().chain(collectors) {
            if let Some(url) = url {
                let ok = (url.starts_with("http://") || url.starts_with("https://"))
                    && url.parse::<tonic::transport::Uri>().is_ok();
                if !ok {
                    return bad(
                        key,
                        &format!("must be an http:// or https:// URL, e.g. {example}"),
                    );
                }
            }
        }
        if !(100..=3_600_000).contains(&self.metrics.export_interval_ms) {
            return bad(
                "metrics.export_interval_ms",
                "must be between 100 and 3600000",
            );
        }
        if !(1..=600_000).contains(&self.metrics.export_timeout_ms) {
            return bad("metrics.export_timeout_ms", "must be between 1 and 600000");
        }
        if self.auth.mode == Some(AuthMode::Off) && !self.listen.ip().is_loopback() {
            return bad(
                "auth.mode",
                "may be \"off\" only when `listen` is a loopback address: anyone who can reach the port could do anything",
            );
        }
        if let Some(key) = &self.auth.service_key
            && (key.len() < 32 || key.len() > 256 || !key.bytes().all(|b| b.is_ascii_graphic()))
        {
            return bad(
                "auth.service_key",
                "must be 32 to 256 printable characters without spaces (`loyalty create-key --role service` makes one)",
            );
        }
        let tls = &self.tls;
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return bad("tls.cert_file", "and `tls.key_file` must be set together");
        }
        if tls.client_ca_file.is_some() && !tls.enabled() {
            return bad(
                "tls.client_ca_file",
                "needs `tls.cert_file` and `tls.key_file`: client certificates are asked for only over TLS",
            );
        }
        if tls.metrics && !tls.enabled() {
            return bad(
                "tls.metrics",
                "needs `tls.cert_file` and `tls.key_file`, the certificate the metrics listener presents",
            );
        }
        if tls.require_client_cert && tls.client_ca_file.is_none() {
            return bad(
                "tls.require_client_cert",
                "needs `tls.client_ca_file`, the CA the client certificates are checked against",
            );
        }
        let plain_peer = [
            ("peers.identity", &self.peers.identity),
            ("peers.balance", &self.peers.balance),
            ("peers.promotion", &self.peers.promotion),
            ("peers.segmentation", &self.peers.segmentation),
            ("peers.reporting", &self.peers.reporting),
        ]
        .into_iter()
        .find(|(_, url)| url.as_deref().is_some_and(|u| u.starts_with("http://")));
        if tls.enabled()
            && let Some((key, _)) = plain_peer
        {
            return bad(
                key,
                "is http:// while `tls.cert_file` is set: the peers speak TLS, and the service key would travel in clear; use https://",
            );
        }
        let limits = &self.rate_limits;
        // 0 (no limit), or at least one call in 1000 seconds.
        let rate_ok = |r: f64| r == 0.0 || (r.is_finite() && (0.001..=10_000_000.0).contains(&r));
        if !rate_ok(limits.per_key) {
            return bad(
                "rate_limits.per_key",
                "must be 0 or between 0.001 and 10000000 calls per second",
            );
        }
        if !rate_ok(limits.per_tenant) {
            return bad(
                "rate_limits.per_tenant",
                "must be 0 or between 0.001 and 10000000 calls per second",
            );
        }
        if !(limits.burst_secs.is_finite()
            && limits.burst_secs > 0.0
            && limits.burst_secs <= 3_600.0)
        {
            return bad(
                "rate_limits.burst_secs",
                "must be more than 0 and at most 3600",
            );
        }
        if limits.tenants.len() > 10_000 {
            return bad("rate_limits.tenants", "may name at most 10000 tenants");
        }
        if let Some((tenant, _)) = limits.tenants.iter().find(|(_, r)| !rate_ok(**r)) {
            return bad(
                "rate_limits.tenants",
                &format!(
                    "gives tenant {tenant:?} a rate that is not 0 or between 0.001 and 10000000"
                ),
            );
        }
        if self.auth.cache_ttl_secs > 3_600 {
            return bad("auth.cache_ttl_secs", "must be at most 3600");
        }
        if !(0.0..=1.0).contains(&self.tracing.sample_ratio) {
            return bad("tracing.sample_ratio", "must be between 0 and 1");
        }
        if !(1..=600_000).contains(&self.tracing.export_timeout_ms) {
            return bad("tracing.export_timeout_ms", "must be between 1 and 600000");
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.filter).is_err() {
            return bad(
                "log.filter",
                "must be a tracing filter such as `info` or `info,loyalty_balance=debug`",
            );
        }
        if let Some(field) = self
            .identity
            .questionnaire
            .iter()
            .find(|f| !QUESTIONNAIRE_FIELDS.contains(&f.as_str()))
        {
            return bad(
                "identity.questionnaire",
                &format!(
                    "names {field:?}; the fields are {}",
                    QUESTIONNAIRE_FIELDS.join(", ")
                ),
            );
        }
        let region = &self.identity.default_region;
        if region.len() != 2 || !region.chars().all(|c| c.is_ascii_uppercase()) {
            return bad(
                "identity.default_region",
                "must be an ISO 3166-1 alpha-2 code such as KZ",
            );
        }
        Ok(())
    }

    /// The deadline of one call to a peer service.
    pub fn peer_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.peers.timeout_ms)
    }

    /// How often a peer's DNS name is resolved again.
    pub fn peer_dns_refresh(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.peers.dns_refresh_ms)
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        if shown.auth.service_key.is_some() {
            shown.auth.service_key = Some("[redacted]".into());
        }
        let redis = &mut shown.storage.redis;
        redis.url = redact_credentials(&redis.url);
        for node in &mut redis.cluster_nodes {
            *node = redact_credentials(node);
        }
        toml::to_string(&shown)
            .unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
    }
}

/// `redis://user:password@host/` → `redis://[redacted]@host/`: a URL's user information
/// never prints.
fn redact_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://[redacted]{}", &rest[at..]),
        None => url.to_owned(),
    }
}

/// Makes figment's message name the key: "invalid type ... for key `server.x`".
fn render(e: &figment::Error) -> String {
    e.clone()
        .into_iter()
        .map(|one| {
            let key = one.path.join(".");
            if key.is_empty() {
                one.kind.to_string()
            } else {
                format!("`{key}`: {}", one.kind)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// An `Env` provider fed from a snapshot instead of the live process environment.
struct EnvSnapshot(Vec<(String, String)>);

impl figment::Provider for EnvSnapshot {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("environment variable(s)")
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        use figment::value::{Dict, Value};
        let mut dict = Dict::new();
        for (name, raw) in &self.0 {
            let Some(rest) = name.strip_prefix("LOYALTY_") else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
            let value: Value = raw.parse().unwrap_or_else(|_| Value::from(raw.clone()));
            insert_path(&mut dict, &path, value);
        }
        Ok(figment::Profile::Default.collect(dict))
    }
}

fn insert_path(dict: &mut figment::value::Dict, path: &[String], value: figment::value::Value) {
    use figment::value::{Dict, Value};
    match path {
        [] => {}
        [last] => {
            dict.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry(first.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

/// A secret value (password, token, URL with credentials) that never prints: its `Debug`,
/// `Display` and serialized forms are `[redacted]`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn printed_config_hides_redis_credentials() {
        let env = [
            (
                "LOYALTY_STORAGE__REDIS__URL".to_owned(),
                "redis://:hunter2@redis:6379/0".to_owned(),
            ),
            (
                "LOYALTY_STORAGE__REDIS__CLUSTER_NODES".to_owned(),
                r#"["redis://user:hunter2@a:6379/", "redis://b:6379/"]"#.to_owned(),
            ),
        ];
        let config = super::Config::load(None, env, &super::Overrides::default()).unwrap();
        assert_eq!(config.storage.redis.url, "redis://:hunter2@redis:6379/0");
        let shown = config.to_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redis://[redacted]@redis:6379/0"), "{shown}");
        assert!(shown.contains("redis://b:6379/"), "{shown}");
    }

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load() {
        let c = Config::load(None, env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:7000\"\n[server]\ngrace_period_secs = 3\nrequest_timeout_secs = 4\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&file),
            env(&[
                ("LOYALTY_SERVER__GRACE_PERIOD_SECS", "9"),
                ("LOYALTY_PEERS__IDENTITY", "http://id:50051"),
                ("LOYALTY_TEST_SCYLLA", "ignored"),
                ("PATH", "/bin"),
            ]),
            &Overrides {
                listen: Some("127.0.0.1:7001".parse().unwrap()),
                data_dir: None,
            },
        )
        .unwrap();
        assert_eq!(c.server.grace_period_secs, 9, "env beats file");
        assert_eq!(c.server.request_timeout_secs, 4, "file beats defaults");
        assert_eq!(c.listen.port(), 7001, "flags beat everything");
        assert_eq!(c.peers.identity.as_deref(), Some("http://id:50051"));
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = Config::load(
            None,
            env(&[("LOYALTY_SERVER__GRACE_PERIOD_SECS", "soon")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("server.grace_period_secs"),
            "{err}"
        );

        let err = Config::load(
            None,
            env(&[("LOYALTY_SERVR__X", "1")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("servr"), "{err}");

        let err = Config::load(
            None,
            env(&[("LOYALTY_PEERS__BALANCE", "balance:50051")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("peers.balance"), "{err}");

        for (key, value, named) in [
            (
                "LOYALTY_METRICS__OTLP_ENDPOINT",
                "collector:4317",
                "metrics.otlp_endpoint",
            ),
            (
                "LOYALTY_METRICS__EXPORT_INTERVAL_MS",
                "99",
                "metrics.export_interval_ms",
            ),
            (
                "LOYALTY_METRICS__EXPORT_TIMEOUT_MS",
                "0",
                "metrics.export_timeout_ms",
            ),
        ] {
            let err = Config::load(None, env(&[(key, value)]), &Overrides::default()).unwrap_err();
            assert!(err.to_string().contains(named), "{err}");
        }
        let c = Config::load(
            None,
            env(&[("LOYALTY_METRICS__OTLP_ENDPOINT", "http://collector:4317")]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            c.metrics.otlp_endpoint.as_deref(),
            Some("http://collector:4317")
        );

        for refresh in ["0", "99", "600001"] {
            let err = Config::load(
                None,
                env(&[("LOYALTY_PEERS__DNS_REFRESH_MS", refresh)]),
                &Overrides::default(),
            )
            .unwrap_err();
            assert!(err.to_string().contains("peers.dns_refresh_ms"), "{err}");
        }
        for refresh in ["100", "600000"] {
            let c = Config::load(
                None,
                env(&[("LOYALTY_PEERS__DNS_REFRESH_MS", refresh)]),
                &Overrides::default(),
            )
            .unwrap();
            assert_eq!(c.peers.dns_refresh_ms.to_string(), refresh);
        }

        let err = Config::load(
            None,
            env(&[("LOYALTY_STORAGE__BACKEND", "cassandra")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("storage.backend"), "{err}");
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert_eq!(
            figment::value::Value::serialize(&s).unwrap().as_str(),
            Some("[redacted]")
        );
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn renders_as_toml() {
        let text = Config::default().to_toml();
        assert!(text.contains("listen = \"127.0.0.1:50051\""), "{text}");
        assert!(text.contains("[server]"), "{text}");
    }
}
