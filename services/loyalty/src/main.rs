//! `loyalty`: one binary, two ways to run.
//!
//! - `loyalty dev`: all five services in one process on embedded storage.
//! - `loyalty serve --service NAME[,NAME...]`: the named services; peers over gRPC.

mod balancer;
mod demo;
mod export;
mod keys;
mod peers;
mod rebuild;
mod walkthrough;
mod wiring;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use loyalty_platform::clock::{SharedClock, SystemClock};
use loyalty_platform::config::{Config, Overrides};
use loyalty_platform::{server, telemetry};
use tokio::net::TcpListener;

use crate::wiring::{ServiceName, parse_services};

/// The storage engine allocates and frees many page-sized buffers; glibc's allocator spends
/// more and more time consolidating them as the heap grows, mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "loyalty",
    version,
    about = "A high-throughput loyalty engine for retail chains"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// All five services in one process on embedded storage in --data-dir.
    Dev {
        #[command(flatten)]
        common: Common,
        /// Load a sample tenant ("demo") with stores, products, a program and members.
        #[arg(long)]
        demo: bool,
    },
    /// Only the named services (microservices mode); peers come from config.
    Serve {
        #[command(flatten)]
        common: Common,
        /// Comma-separated: identity, balance, promotion, segmentation, reporting.
        #[arg(long, value_name = "NAME[,NAME...]")]
        service: String,
        /// Before serving, drop every member's hot balance state in Redis and rebuild it
        /// from the durable ledger (after a Redis failover or a restore from a snapshot).
        #[arg(long)]
        rebuild_balances: bool,
    },
    /// Creates the ScyllaDB keyspace if needed and applies pending schema migrations
    /// (`storage.scylla`), then exits.
    Migrate {
        #[command(flatten)]
        common: Common,
    },
    /// Prints the effective configuration (secrets redacted) and exits.
    Config {
        #[command(flatten)]
        common: Common,
    },
    /// Walks through register, card, quote, commit, refund and balance against a server
    /// started with `dev --demo`.
    Walkthrough {
        /// The server's address.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        #[arg(long, default_value = demo::TENANT)]
        tenant: String,
    },
    /// Rebuilds reporting's facts from the purchase history, the points ledger and the
    /// members, keeping its audit log. On the embedded backend it reads them from --data-dir
    /// (the server must be stopped); on the others from the running identity, balance and
    /// promotion services (`peers.*`, with `auth.service_key`), and writes the facts to
    /// ScyllaDB (`scylla`) or --data-dir's `reporting.redb` (`redis`). Reporting must be
    /// stopped while it runs.
    RebuildReporting {
        #[command(flatten)]
        common: Common,
    },
    /// Rebuilds segmentation's member features in --data-dir's `segmentation.redb` from the
    /// purchase history, the points ledger and the members (read as for
    /// `rebuild-reporting`), in place: segments, uploaded lists and membership history stay,
    /// and every dynamic segment is evaluated again. Segmentation must be stopped.
    RebuildSegmentation {
        #[command(flatten)]
        common: Common,
    },
    /// Copies identity's state (members, profiles, cards, their indexes, merges, erasures,
    /// blocks, import rows, API keys) from --data-dir's `identity.redb` into the Redis of
    /// `storage.redis`, for a move to `identity.store = "redis"`. Identity must be stopped;
    /// refuses a Redis that already holds identity data.
    CopyIdentity {
        #[command(flatten)]
        common: Common,
    },
    /// Copies segmentation's state (features, the event ids applied, segments with their
    /// members and history, RFM runs and scores) from --data-dir's `segmentation.redb` into
    /// the Redis of `storage.redis`, for a move to `segmentation.store = "redis"`.
    /// Segmentation must be stopped; refuses a Redis that already holds segmentation data.
    CopySegmentation {
        #[command(flatten)]
        common: Common,
    },
    /// Copies promotion's state (programs, catalog, campaigns with their history, coupons,
    /// counters, purchases) from --data-dir's `promotion.redb` into the Redis of
    /// `storage.redis`, for a move to `promotion.store = "redis"`. Promotion must be stopped;
    /// refuses a Redis that already holds promotion data.
    CopyPromotion {
        #[command(flatten)]
        common: Common,
    },
    /// Creates an API key and prints it (shown only now). With --addr, asks a running
    /// identity service, presenting `auth.service_key`; otherwise writes into identity's
    /// store: --data-dir's file (the server must be stopped) or, with
    /// `identity.store = "redis"`, the Redis every identity replica shares. `--role service` prints a fresh
    /// `auth.service_key` and stores nothing.
    CreateKey {
        #[command(flatten)]
        common: Common,
        /// A running identity service, e.g. http://identity:50051.
        #[arg(long)]
        addr: Option<String>,
        /// pos, app, admin, analyst or service.
        #[arg(long)]
        role: String,
        #[arg(long, default_value = "")]
        tenant: String,
        /// The store a pos key is bound to.
        #[arg(long, default_value = "")]
        store: String,
        /// The one member an app key acts for (required for app keys).
        #[arg(long, default_value = "")]
        member: String,
        /// A label, e.g. "back office".
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Writes an export of reporting's facts as a Parquet file, read over Arrow Flight from
    /// a running server: `<out>/<tenant>-<kind>.parquet`.
    Export {
        /// The server's address.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        #[arg(long)]
        tenant: String,
        /// purchases, purchase_lines, refunds or member_features.
        #[arg(long)]
        kind: String,
        /// Start of the period (RFC 3339, inclusive); purchases, lines and refunds need it.
        #[arg(long)]
        from: Option<String>,
        /// End of the period (RFC 3339, exclusive).
        #[arg(long)]
        to: Option<String>,
        /// IANA time zone the period's days are read in.
        #[arg(long, default_value = "")]
        time_zone: String,
        /// Directory to write into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The PEM CA certificate an https:// server is checked against (otherwise the web
        /// PKI roots).
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// A PEM client certificate for a server that asks for one; its common name may
        /// name the API key instead of `--api-key`.
        #[arg(long, value_name = "FILE", requires = "key")]
        cert: Option<PathBuf>,
        /// The PEM private key of `--cert`.
        #[arg(long, value_name = "FILE", requires = "cert")]
        key: Option<PathBuf>,
        /// The API key to present (when the server checks keys).
        #[arg(long, env = "LOYALTY_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
}

#[derive(Debug, Args)]
struct Common {
    /// A TOML config file; LOYALTY_* environment variables and flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// Directory of the embedded stores.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

/// Runs `loyalty copy-<service>`: prints what `copy` copied from the data directory into
/// Redis, or why it did not.
async fn copy_command<F, Fut>(common: &Common, service: &str, copy: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<String>>,
{
    let config = match load_config(common) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let dir = config.data_dir.display().to_string();
    match copy(config).await {
        Ok(copied) => {
            eprintln!("{service} copied from {dir} to Redis: {copied}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loyalty copy-{service}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(common: &Common) -> Result<Config, ExitCode> {
    let overrides = Overrides {
        listen: common.listen,
        data_dir: common.data_dir.clone(),
    };
    Config::load(common.config.as_deref(), std::env::vars(), &overrides).map_err(|e| {
        eprintln!("loyalty: {e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loyalty: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

#[allow(clippy::print_stdout)]
async fn run(cli: Cli) -> ExitCode {
    let (common, services, demo, rebuild) = match cli.command {
        Command::Dev { common, demo } => (common, ServiceName::ALL.to_vec(), demo, false),
        Command::Serve {
            common,
            service,
            rebuild_balances,
        } => match parse_services(&service) {
            Ok(services) => (common, services, false, rebuild_balances),
            Err(e) => {
                eprintln!("loyalty: --service: {e}");
                return ExitCode::from(2);
            }
        },
        Command::Config { common } => {
            return match load_config(&common) {
                Ok(config) => {
                    print!("{}", config.to_toml());
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            };
        }
        Command::Migrate { common } => {
            let config = match load_config(&common) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let migrations = [
                loyalty_balance::store::scylla::MIGRATIONS,
                loyalty_reporting::store::scylla::MIGRATIONS,
            ]
            .concat();
            return match loyalty_platform::scylla::migrate(&config.storage.scylla, &migrations)
                .await
            {
                Ok(applied) if applied.is_empty() => {
                    println!("schema is up to date");
                    ExitCode::SUCCESS
                }
                Ok(applied) => {
                    for m in applied {
                        println!("applied {m}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("loyalty migrate: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::RebuildReporting { common } => {
            let config = match load_config(&common) {
                Ok(c) => c,
                Err(code) => return code,
            };
            return match rebuild::run(&config).await {
                Ok((r, place)) => {
                    eprintln!(
                        "reporting rebuilt in {place}: {} purchases, {} refunds, {} ledger entries, {} members",
                        r.purchases, r.refunds, r.ledger_entries, r.members
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("loyalty rebuild-reporting: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::RebuildSegmentation { common } => {
            let config = match load_config(&common) {
                Ok(c) => c,
                Err(code) => return code,
            };
            return match rebuild::run_segmentation(&config).await {
                Ok(r) => {
                    eprintln!(
                        "segmentation rebuilt in {}: {} purchases, {} refunds, {} ledger entries, {} members replayed; {} memberships changed",
                        config.data_dir.display(),
                        r.replayed.purchases,
                        r.replayed.refunds,
                        r.replayed.ledger_entries,
                        r.replayed.members,
                        r.memberships_changed
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("loyalty rebuild-segmentation: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::CopyIdentity { common } => {
            return copy_command(&common, "identity", |c| async move {
                rebuild::copy_identity(&c).await
            })
            .await;
        }
        Command::CopySegmentation { common } => {
            return copy_command(&common, "segmentation", |c| async move {
                rebuild::copy_segmentation(&c).await
            })
            .await;
        }
        Command::CopyPromotion { common } => {
            return copy_command(&common, "promotion", |c| async move {
                rebuild::copy_promotion(&c).await
            })
            .await;
        }
        Command::Export {
            addr,
            tenant,
            kind,
            from,
            to,
            time_zone,
            out,
            ca,
            cert,
            key,
            api_key,
        } => {
            let request = export::Request {
                addr,
                tenant,
                kind,
                from,
                to,
                time_zone,
                out,
                api_key,
                ca,
                cert,
                key,
            };
            return match export::run(&request).await {
                Ok((path, rows)) => {
                    eprintln!("{}", export::describe(&path, rows));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("loyalty export: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::CreateKey {
            common,
            addr,
            role,
            tenant,
            store,
            member,
            name,
        } => {
            let config = match load_config(&common) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let new = keys::NewKey {
                role,
                tenant,
                store,
                member,
                name,
            };
            return match keys::create(&config, addr.as_deref(), new).await {
                Ok(key) => {
                    println!("{key}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("loyalty create-key: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Walkthrough { addr, tenant } => {
            return match walkthrough::run(&addr, &tenant).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("loyalty walkthrough: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    let config = match load_config(&common) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let service_name = if services.len() == ServiceName::ALL.len() {
        "loyalty".to_owned()
    } else {
        let names: Vec<&str> = services.iter().map(|s| s.as_str()).collect();
        format!("loyalty-{}", names.join("-"))
    };
    let telemetry =
        match telemetry::init(&config.log, &config.tracing, &config.metrics, &service_name) {
            Ok(t) => Arc::new(t),
            Err(e) => {
                eprintln!("loyalty: {e:#}");
                return ExitCode::FAILURE;
            }
        };
    if let Some(file) = common.config.clone() {
        tokio::spawn(watch_log_filter(file, common, telemetry.clone()));
    }
    let outcome = serve(config, services, demo, rebuild).await;
    telemetry.shutdown().await;
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loyalty: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How often the config file is read again for a new `log.filter`.
const LOG_FILTER_RELOAD: std::time::Duration = std::time::Duration::from_secs(2);

/// Applies `log.filter` from the config file (and environment) while the process runs, so
/// the log level changes without a restart. Other settings need one.
async fn watch_log_filter(file: PathBuf, common: Common, telemetry: Arc<telemetry::Telemetry>) {
    let mut last_error = String::new();
    loop {
        tokio::time::sleep(LOG_FILTER_RELOAD).await;
        let overrides = Overrides {
            listen: common.listen,
            data_dir: common.data_dir.clone(),
        };
        match Config::load(Some(&file), std::env::vars(), &overrides) {
            Ok(config) => {
                last_error.clear();
                if let Err(e) = telemetry.set_filter(&config.log.filter) {
                    tracing::warn!(error = %e, "cannot apply the new log filter");
                }
            }
            Err(e) => {
                let e = e.to_string();
                if e != last_error {
                    tracing::warn!(error = %e, "the config file no longer loads; keeping the log filter");
                    last_error = e;
                }
            }
        }
    }
}

#[allow(clippy::print_stdout)]
async fn serve(
    config: Config,
    services: Vec<ServiceName>,
    demo: bool,
    rebuild_balances: bool,
) -> anyhow::Result<()> {
    use anyhow::Context;
    // Listening for SIGTERM from the start: one that comes while the services are still being
    // built stops the process as soon as it serves, cleanly.
    let shutdown = server::shutdown_signal();
    let clock: SharedClock = Arc::new(SystemClock);
    let node = wiring::build(&config, &services, clock.clone()).await?;
    if rebuild_balances {
        let Some(redis) = &node.redis_balances else {
            anyhow::bail!(
                "--rebuild-balances needs the balance service with storage.backend = \"redis\""
            );
        };
        let count = redis.rebuild_all().await?;
        tracing::info!(members = count, "hot balance state rebuilt from the ledger");
    }
    if let Some(balance) = node.balance.clone() {
        wiring::spawn_expiry(balance, &config.balance);
    }
    if let Some(checkout) = node.checkout.clone() {
        wiring::spawn_commit_repair(checkout);
    }
    if demo {
        if demo::load(&node, &clock).await? {
            tracing::info!(tenant = demo::TENANT, "demo tenant loaded");
        } else {
            tracing::info!(tenant = demo::TENANT, "demo tenant already present");
        }
    }
    let metrics_tls = loyalty_platform::tls::metrics_acceptor(&config.tls)?;
    let metrics = match config.server.metrics_listen {
        Some(at) => {
            let l = TcpListener::bind(at)
                .await
                .with_context(|| format!("cannot listen for metrics on {at}"))?;
            let scheme = if metrics_tls.is_some() {
                "https"
            } else {
                "http"
            };
            println!("metrics on {scheme}://{}/metrics", l.local_addr()?);
            Some(l)
        }
        None => None,
    };
    let health = match config.server.health_listen {
        Some(at) => {
            let l = TcpListener::bind(at)
                .await
                .with_context(|| format!("cannot listen for health checks on {at}"))?;
            println!("health on {}", l.local_addr()?);
            Some(l)
        }
        None => None,
    };
    let gate = wiring::gate(&config, &node)?;
    let tls = loyalty_platform::tls::server_config(&config.tls)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let names: Vec<&str> = node.services.iter().map(|s| s.as_str()).collect();
    println!(
        "loyalty: serving {} on {addr} (data in {})",
        names.join(", "),
        config.data_dir.display()
    );
    println!("listening on {addr}");
    if tls.is_some() {
        let clients = match (&config.tls.client_ca_file, config.tls.require_client_cert) {
            (None, _) => "not asked for",
            (Some(_), false) => "optional",
            (Some(_), true) => "required",
        };
        tracing::info!(client_certificates = clients, "TLS on the gRPC listener");
    }
    if node.checkout.is_some() && node.identity.is_some() && tls.is_none() {
        println!("Try it (the demo tenant comes with `loyalty dev --demo`):");
        println!("  loyalty walkthrough --addr http://{addr}");
        println!(
            "  grpcurl -plaintext -d '{{\"tenant_id\":\"demo\",\"card_number\":\"1000000001\"}}' {addr} loyalty.identity.v1.MemberService/LookupMember"
        );
    }
    server::serve(
        server::Listeners {
            grpc: listener,
            tls,
            metrics,
            metrics_tls,
            health,
        },
        node.routes,
        node.health,
        gate,
        &config.server,
        shutdown,
    )
    .await
}
