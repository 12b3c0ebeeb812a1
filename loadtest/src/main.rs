//! `loyalty-loadtest`: drives a loyalty deployment with realistic retail traffic over gRPC and
//! writes a JSON and an HTML report.

mod keys;
mod model;
mod report;
mod runner;
mod stats;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::model::{Model, ModelConfig};
use crate::runner::{Clients, RunPlan, Service, Shape, Workload};
use crate::stats::Rpc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// The POS mix: lookups, quotes, commits, balances and some refunds at a constant rate.
    Steady,
    /// One call alone.
    Lookup,
    Quote,
    Commit,
    /// Partial refunds of receipts this run commits: one commit feeds each refund, and the
    /// report shows the two calls apart.
    Refund,
    Register,
    Balance,
    /// Balance operations alone: accruals and redemptions (up to what is available), 1:1.
    Points,
    /// The segments of a member (the POS's targeting lookup) alone.
    Segments,
    /// The steady mix ramping to --peak-factor times the rate, a spike, then holding.
    BlackFriday,
    /// A trading day (the model's daily shape) compressed into the run.
    Day,
    /// The steady mix for a long, bounded time.
    Soak,
}

#[derive(Debug, Parser)]
#[command(
    name = "loyalty-loadtest",
    version,
    about = "Realistic retail traffic against a loyalty deployment"
)]
struct Cli {
    /// Address of a server (repeat for several, used round-robin), e.g. http://127.0.0.1:50051.
    /// `SERVICE=URL` (identity, balance, promotion or segmentation) sends that service's calls
    /// to URL instead, for deployments that split the services over processes.
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    #[arg(long, value_enum, default_value = "steady")]
    scenario: Scenario,
    /// Offered calls per second (open loop); the base rate for black-friday and day.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Closed loop with this many workers instead of a rate.
    #[arg(long)]
    closed: Option<usize>,
    /// Measured seconds (after warm-up). At most 86400.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Seconds of warm-up, sent but not measured.
    #[arg(long, default_value_t = 5.0)]
    warmup: f64,
    /// Stop after this many measured calls (after warm-up), or at the end of --duration,
    /// whichever comes first.
    #[arg(long)]
    count: Option<u64>,
    /// Peak rate as a multiple of --rate in the black-friday scenario.
    #[arg(long, default_value_t = 3.0)]
    peak_factor: f64,
    /// Calls waiting at once before new ones are dropped (and counted).
    #[arg(long, default_value_t = 20_000)]
    max_in_flight: usize,
    /// A JSON file with the traffic model (see ModelConfig); flags below override it.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long)]
    members: Option<usize>,
    /// Active campaigns to seed over the categories (a birthday boost, the promo code
    /// "11.11" and a coupon campaign come on top); 0 seeds only those three.
    #[arg(long)]
    campaigns: Option<usize>,
    #[arg(long)]
    stores: Option<usize>,
    #[arg(long)]
    products: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Reuse the program and catalog an earlier run created (members are still resolved:
    /// registered, or looked up when they exist).
    #[arg(long)]
    skip_setup: bool,
    /// Threads of the load generator's runtime (default: one per CPU). On the machine under
    /// test, fewer threads leave more of it to the server.
    #[arg(long)]
    threads: Option<usize>,
    /// Concurrent calls while provisioning members.
    #[arg(long, default_value_t = 64)]
    setup_concurrency: usize,
    /// A header sent with every call, e.g. `x-tenant-region=kz`. Repeatable.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// An admin API key of the tenant, for a target that checks keys. It provisions the
    /// tenant and makes this run's keys: a POS key per store for the tills and app keys for
    /// the busiest members (`--app-keys`), revoked when the run ends.
    #[arg(long, env = "LOYALTY_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// How many of the busiest members get an app key for balance lookups (with
    /// `--api-key`); the others' lookups go through a till.
    #[arg(long, default_value_t = 1000)]
    app_keys: usize,
    /// A PEM CA certificate for https targets (otherwise the web PKI roots).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// A PEM client certificate presented to https targets (mutual TLS); needs --key.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// The PEM private key of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Where report.json and report.html go.
    #[arg(long, default_value = "loadtest-report")]
    out: PathBuf,
    /// Only create the tenant (program, stores, products, members with cards), then exit.
    #[arg(long)]
    seed_only: bool,
    /// Exit with status 1 when any call failed or was dropped.
    #[arg(long)]
    fail_on_errors: bool,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

fn mix(scenario: Scenario, model: &ModelConfig) -> Vec<(Rpc, f64)> {
    match scenario {
        Scenario::Lookup => vec![(Rpc::LookupMember, 1.0)],
        Scenario::Quote => vec![(Rpc::Quote, 1.0)],
        Scenario::Commit => vec![(Rpc::Commit, 1.0)],
        // Refunds need committed receipts: one commit for every refund.
        Scenario::Refund => vec![(Rpc::Refund, 1.0), (Rpc::Commit, 1.0)],
        Scenario::Register => vec![(Rpc::RegisterMember, 1.0)],
        Scenario::Balance => vec![(Rpc::GetBalance, 1.0)],
        Scenario::Points => vec![(Rpc::Accrue, 1.0), (Rpc::Redeem, 1.0)],
        Scenario::Segments => vec![(Rpc::GetMemberSegments, 1.0)],
        // Per receipt: a card lookup when identified (the penetration), a quote, the commit;
        // a share of receipts come back as partial refunds; the app checks balances; a few
        // customers register at the till. The model file sets every share.
        Scenario::Steady | Scenario::BlackFriday | Scenario::Day | Scenario::Soak => vec![
            (Rpc::LookupMember, model.identified_share),
            (Rpc::Quote, 1.0),
            (Rpc::Commit, 1.0),
            (Rpc::Refund, model.refund_share),
            (Rpc::GetBalance, model.balance_share),
            (Rpc::RegisterMember, model.register_share),
        ]
        .into_iter()
        .filter(|(_, w)| *w > 0.0)
        .collect(),
    }
}

fn model_config(cli: &Cli) -> anyhow::Result<ModelConfig> {
    let mut config = match &cli.model {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => ModelConfig::default(),
    };
    if let Some(t) = &cli.tenant {
        config.tenant = t.clone();
    }
    if let Some(n) = cli.members {
        config.members = n;
    }
    if let Some(n) = cli.stores {
        config.stores = n;
    }
    if let Some(n) = cli.campaigns {
        config.campaigns = n;
    }
    if let Some(n) = cli.products {
        config.products = n;
    }
    if let Some(s) = cli.seed {
        config.seed = s;
    }
    Ok(config)
}

/// Splits `identity=http://…` into the service and the URL; a plain URL has no service.
fn parse_target(target: &str) -> anyhow::Result<(Option<Service>, String)> {
    if let Some((name, url)) = target.split_once('=')
        && !name.contains(':')
    {
        let service = Service::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .with_context(|| {
                format!("--target {target}: unknown service {name:?}; use identity, balance, promotion or segmentation")
            })?;
        return Ok((Some(service), url.to_string()));
    }
    Ok((None, target.to_string()))
}

async fn clients(cli: &Cli) -> anyhow::Result<Clients> {
    let mut shared = Vec::new();
    let mut per_service: BTreeMap<Service, Vec<_>> = BTreeMap::new();
    for given in &cli.targets {
        let (service, target) = parse_target(given)?;
        let target = &target;
        let mut endpoint = Endpoint::from_shared(target.clone())
            .with_context(|| {
                format!("--target {target} is not a URL such as http://127.0.0.1:50051")
            })?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .timeout(runner::CALL_TIMEOUT);
        if target.starts_with("https://") || cli.ca.is_some() || cli.cert.is_some() {
            let read = |path: &PathBuf| {
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))
            };
            let mut tls = ClientTlsConfig::new().with_webpki_roots();
            if let Some(ca) = &cli.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&cli.cert, &cli.key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            endpoint = endpoint.tls_config(tls)?;
        }
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot reach {target}"))?;
        match service {
            Some(service) => per_service.entry(service).or_default().push(channel),
            None => shared.push(channel),
        }
    }
    let unrouted: Vec<&str> = Service::ALL
        .into_iter()
        .filter(|s| !per_service.contains_key(s))
        .map(Service::name)
        .collect();
    anyhow::ensure!(
        !shared.is_empty() || unrouted.is_empty(),
        "no --target for {}: give a plain --target URL or SERVICE=URL for each",
        unrouted.join(", ")
    );
    let mut headers = Vec::new();
    for h in &cli.headers {
        let (k, v) = h
            .split_once('=')
            .with_context(|| format!("--header {h:?} must be key=value"))?;
        headers.push((
            k.trim()
                .to_ascii_lowercase()
                .parse()
                .with_context(|| format!("bad header name {k:?}"))?,
            v.trim()
                .parse()
                .with_context(|| format!("bad header value for {k}"))?,
        ));
    }
    anyhow::ensure!(
        cli.api_key.is_none()
            || !headers.iter().any(
                |(k, _): &(tonic::metadata::AsciiMetadataKey, _)| k.as_str() == "authorization"
            ),
        "--api-key and --header authorization=... both name a key; give one"
    );
    let clients = Clients::new(shared, per_service, headers);
    Ok(match &cli.api_key {
        Some(key) => clients.with_credentials(keys::Credentials::admin(key)?),
        None => clients,
    })
}

#[allow(clippy::print_stdout)]
async fn run(cli: Cli) -> anyhow::Result<bool> {
    anyhow::ensure!(
        cli.duration > 0.0 && cli.duration <= 86_400.0,
        "--duration must be in (0, 86400] seconds"
    );
    anyhow::ensure!(
        cli.warmup >= 0.0 && cli.warmup <= 3_600.0,
        "--warmup must be in [0, 3600] seconds"
    );
    anyhow::ensure!(
        cli.rate > 0.0 && cli.rate <= 1_000_000.0,
        "--rate must be in (0, 1000000]"
    );
    anyhow::ensure!(
        (1..=1_000_000).contains(&cli.max_in_flight),
        "--max-in-flight must be 1..=1000000"
    );
    anyhow::ensure!(
        cli.closed.is_none_or(|n| (1..=100_000).contains(&n)),
        "--closed must be 1..=100000"
    );
    anyhow::ensure!(
        cli.count.is_none_or(|n| n >= 1),
        "--count must be at least 1"
    );
    let model = Model::new(model_config(&cli)?)?;
    let clients = clients(&cli).await?;
    if !cli.quiet {
        eprintln!(
            "provisioning tenant {:?}: {} stores, {} products, {} members",
            model.config.tenant,
            model.stores.len(),
            model.products.len(),
            model.config.members
        );
    }
    let member_ids = runner::setup(&model, &clients, cli.setup_concurrency, cli.skip_setup).await?;
    let clients = if cli.api_key.is_some() && !cli.seed_only {
        let made = keys::provision(
            &model,
            &clients,
            &member_ids,
            cli.app_keys,
            cli.setup_concurrency,
        )
        .await?;
        if !cli.quiet {
            eprintln!("made {} API keys for this run", made.made());
        }
        clients.with_credentials(made)
    } else {
        clients
    };
    if cli.seed_only {
        println!(
            "seeded tenant {:?}: {} stores, {} products, {} members with cards",
            model.config.tenant,
            model.stores.len(),
            model.products.len(),
            member_ids.len()
        );
        return Ok(true);
    }
    let shape = match cli.scenario {
        Scenario::BlackFriday => Shape::BlackFriday {
            peak: cli.peak_factor,
        },
        Scenario::Day => Shape::Day(model.config.daily_shape.clone()),
        _ => Shape::Constant,
    };
    let run_id = format!(
        "lt{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let info = report::RunInfo {
        date: humantime(std::time::SystemTime::now()),
        targets: cli.targets.clone(),
        scenario: format!("{:?}", cli.scenario).to_lowercase(),
        mode: match cli.closed {
            Some(n) => format!("closed loop, {n} workers"),
            None => "open loop".into(),
        },
        offered_rate: match (cli.closed, cli.scenario) {
            (Some(_), _) => None,
            (None, Scenario::BlackFriday | Scenario::Day) => None,
            (None, _) => Some(cli.rate),
        },
        duration_secs: cli.duration,
        warmup_secs: cli.warmup,
        model: model.config.clone(),
    };
    let seed = model.config.seed;
    // From here on Ctrl-C ends the run early and still revokes the run's keys; a second
    // Ctrl-C stops at once.
    let interrupted = Arc::new(tokio::sync::Notify::new());
    {
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.notify_one();
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("interrupted again: stopping now; this run's API keys stay");
                    std::process::exit(130);
                }
            }
        });
    }
    let coupons = tokio::select! {
        coupons = runner::generate_coupons(&model, &clients, &run_id) => coupons,
        _ = interrupted.notified() => Err(anyhow::anyhow!("interrupted before the run started")),
    };
    let coupons = match coupons {
        Ok(coupons) => coupons,
        Err(e) => {
            // The run's keys go with the run, also when it cannot start.
            if clients.credentials().made() > 0 {
                keys::revoke(&model, &clients, cli.setup_concurrency).await?;
            }
            return Err(e);
        }
    };
    let mix = mix(cli.scenario, &model.config);
    let workload = Arc::new(Workload::new(
        model,
        member_ids,
        clients.clone(),
        run_id,
        mix,
        coupons,
    ));
    let plan = RunPlan {
        rate: cli.rate,
        shape,
        warmup: Duration::from_secs_f64(cli.warmup),
        duration: Duration::from_secs_f64(cli.duration),
        max_in_flight: cli.max_in_flight,
        closed_workers: cli.closed,
        max_calls: cli.count,
        seed,
        progress: !cli.quiet,
    };
    // Ctrl-C ends the run early; the keys it made still go with it.
    let stats = tokio::select! {
        stats = runner::run(workload.clone(), plan) => stats,
        _ = interrupted.notified() => {
            if clients.credentials().made() > 0 {
                let revoked = keys::revoke(&workload.model, &clients, cli.setup_concurrency).await?;
                eprintln!("interrupted: revoked this run's {revoked} API keys");
            }
            anyhow::bail!("interrupted before the run ended: no report written");
        }
    };
    if clients.credentials().made() > 0 {
        let revoked = keys::revoke(&workload.model, &clients, cli.setup_concurrency).await?;
        if !cli.quiet {
            eprintln!("revoked this run's {revoked} API keys");
        }
    }
    let mut info = info;
    info.duration_secs = stats.measured_secs;
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    let json = report::json(&info, &stats);
    std::fs::write(
        cli.out.join("report.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(cli.out.join("report.html"), report::html(&info, &stats))?;
    println!("{}", report::summary(&info, &stats));
    for (rpc, s) in &stats.rpcs {
        let q = |p: f64| s.latency.value_at_quantile(p) as f64 / 1000.0;
        println!(
            "  {:<48} {:>8.0}/s  p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  max {:>8.2} ms  failed {}",
            rpc.method(),
            // Over the measured time: a run ended by --count is shorter than --duration.
            s.completed() as f64 / stats.measured_secs.max(1e-9),
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            s.latency.max() as f64 / 1000.0,
            s.failed()
        );
    }
    println!(
        "reports: {} and {}",
        cli.out.join("report.json").display(),
        cli.out.join("report.html").display()
    );
    let clean = stats.total().failed() == 0 && stats.dropped == 0 && stats.unfinished() == 0;
    Ok(clean || !cli.fail_on_errors)
}

/// RFC 3339 in UTC, to the second.
fn humantime(t: std::time::SystemTime) -> String {
    let micros = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    report::rfc3339(micros, false)
}

// The generator allocates per call (requests, responses, HTTP/2 frames); mimalloc keeps that
// off the CPU the server under test shares.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.threads {
        if threads == 0 {
            eprintln!("loyalty-loadtest: --threads must be at least 1");
            return std::process::ExitCode::FAILURE;
        }
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loyalty-loadtest: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("loyalty-loadtest: some calls failed (--fail-on-errors)");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("loyalty-loadtest: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steady_mix_follows_the_receipt_flow() {
        let defaults = ModelConfig::default();
        let m = mix(Scenario::Steady, &defaults);
        let w = |rpc: Rpc| m.iter().find(|(r, _)| *r == rpc).map(|(_, w)| *w).unwrap();
        assert_eq!(w(Rpc::Quote), w(Rpc::Commit), "a quote before every commit");
        assert!((w(Rpc::LookupMember) / w(Rpc::Commit) - defaults.identified_share).abs() < 1e-9);
        assert!(
            (w(Rpc::Refund) / w(Rpc::Commit) - 0.02).abs() < 1e-9,
            "2% of receipts refunded"
        );
        assert!((w(Rpc::GetBalance) / w(Rpc::Commit) - 0.30).abs() < 1e-9);
        assert!((w(Rpc::RegisterMember) / w(Rpc::Commit) - 0.03).abs() < 1e-9);
    }

    #[test]
    fn the_model_file_sets_the_mix_and_a_zero_share_leaves_the_call_out() {
        let config: ModelConfig = serde_json::from_str(
            r#"{"identified_share": 0.8, "refund_share": 0.05, "balance_share": 2.0, "register_share": 0}"#,
        )
        .unwrap();
        config.validate().unwrap();
        let m = mix(Scenario::BlackFriday, &config);
        let w = |rpc: Rpc| m.iter().find(|(r, _)| *r == rpc).map(|(_, w)| *w);
        assert_eq!(w(Rpc::LookupMember), Some(0.8));
        assert_eq!(w(Rpc::Refund), Some(0.05));
        assert_eq!(w(Rpc::GetBalance), Some(2.0));
        assert_eq!(w(Rpc::RegisterMember), None);
        assert_eq!(
            mix(Scenario::Register, &config),
            vec![(Rpc::RegisterMember, 1.0)]
        );
        let bad: ModelConfig = serde_json::from_str(r#"{"refund_share": 1.5}"#).unwrap();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn targets_name_a_service_or_none() {
        assert_eq!(
            parse_target("identity=http://a:1").unwrap(),
            (Some(Service::Identity), "http://a:1".to_string())
        );
        assert_eq!(
            parse_target("http://b:2").unwrap(),
            (None, "http://b:2".to_string())
        );
        // A URL whose query has `=` is still a plain URL.
        assert_eq!(parse_target("http://b:2/?x=1").unwrap().0, None);
        assert!(parse_target("billing=http://c:3").is_err());
    }

    #[test]
    fn dates() {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(humantime(t), "2026-11-18T11:06:40Z");
        assert_eq!(humantime(std::time::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }
}
