//! Helpers for end-to-end tests: build and start the real `loyalty` binary on a free port
//! with its own data directory, and talk to it through the generated clients.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

pub mod pki;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use loyalty_proto::common::v1::Decimal;
use loyalty_proto::promotion::v1 as ppb;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

pub use loyalty_proto::{
    balance::v1 as balance, identity::v1 as identity, promotion::v1 as promotion,
};

/// Path of the `loyalty` binary, built once per test process so it is never stale.
/// `LOYALTY_TEST_BIN` points at a prebuilt binary instead.
pub fn loyalty_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("LOYALTY_TEST_BIN") {
            return PathBuf::from(path);
        }
        // target/<profile>/deps/<test> -> target/<profile>/loyalty
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let mut cmd = std::process::Command::new(option_env!("CARGO").unwrap_or("cargo"));
        cmd.args(["build", "--quiet", "-p", "loyalty", "--bin", "loyalty"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .expect("running cargo build for the loyalty binary");
        assert!(status.success(), "building the loyalty binary failed");
        profile_dir.join("loyalty")
    })
    .clone()
}

/// A running `loyalty` process.
#[derive(Debug)]
pub struct Server {
    pub child: Child,
    pub addr: String,
    /// `http://host:port/metrics` when the server was started with a metrics listener.
    pub metrics_url: Option<String>,
    /// `host:port` of the plain-text health listener, when started with one.
    pub health_addr: Option<String>,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

/// How to start a server.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// `dev` or `serve`.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Launch {
    pub fn dev() -> Self {
        Self {
            args: vec!["dev".into()],
            env: Vec::new(),
        }
    }

    pub fn serve(services: &str) -> Self {
        Self {
            args: vec!["serve".into(), "--service".into(), services.into()],
            env: Vec::new(),
        }
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.into());
        self
    }

    /// On the `redis` backend, with the Redis at `url` (a test's own `RedisServer`).
    pub fn on_redis(self, url: &str) -> Self {
        self.env("LOYALTY_STORAGE__BACKEND", "redis")
            .env("LOYALTY_STORAGE__REDIS__URL", url)
    }
}

/// A command for the binary with a clean environment: only what the test gives it.
pub fn command(args: &[String], env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(loyalty_bin());
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.kill_on_drop(true);
    cmd
}

impl Server {
    /// Starts the binary on 127.0.0.1:0 with `data_dir` and waits until it listens.
    pub async fn start(launch: Launch, data_dir: &Path) -> Server {
        std::fs::create_dir_all(data_dir).unwrap();
        let log = data_dir.join(format!("loyalty-{}.log", std::process::id()));
        let mut args = launch.args.clone();
        args.extend(["--listen".into(), "127.0.0.1:0".into(), "--data-dir".into()]);
        args.push(data_dir.display().to_string());
        let mut cmd = command(&args, &launch.env);
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
        let mut child = cmd.spawn().expect("starting loyalty");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut metrics_url = None;
        let mut health_addr = None;
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.strip_prefix("metrics on ") {
                    metrics_url = Some(url.to_string());
                }
                if let Some(addr) = line.strip_prefix("health on ") {
                    health_addr = Some(addr.to_string());
                }
                if let Some(addr) = line.strip_prefix("listening on ") {
                    return Some(addr.to_string());
                }
            }
            None
        })
        .await
        .expect("loyalty did not start listening within 60 s");
        let Some(addr) = addr else {
            let status = child.wait().await.unwrap();
            panic!(
                "loyalty exited ({status}) before listening:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Server {
            child,
            addr,
            metrics_url,
            health_addr,
            data_dir: data_dir.to_path_buf(),
            log,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// SIGTERM, then waits for a clean exit; returns the exit code.
    pub async fn stop(mut self) -> i32 {
        let pid = Pid::from_raw(i32::try_from(self.child.id().unwrap()).unwrap());
        kill(pid, Signal::SIGTERM).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("loyalty did not stop within 30 s of SIGTERM")
            .unwrap();
        if !status.success() {
            // The test's assertion on the code shows in its output with this beside it.
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "loyalty exited with {status} after SIGTERM; the end of its log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        status.code().unwrap_or(-1)
    }

    /// Scrapes the metrics endpoint with a plain HTTP/1.1 GET.
    pub async fn scrape_metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let url = self
            .metrics_url
            .as_ref()
            .expect("started without a metrics listener");
        let hostport = url
            .trim_start_matches("http://")
            .trim_end_matches("/metrics");
        let mut socket = tokio::net::TcpStream::connect(hostport).await.unwrap();
        socket
            .write_all(format!("GET /metrics HTTP/1.1\r\nHost: {hostport}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut reply = String::new();
        socket.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        reply
    }

    /// The server's log so far, for assertion messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

pub fn dec(s: &str) -> Option<Decimal> {
    Some(Decimal { value: s.into() })
}

pub fn line(id: &str, sku: &str, qty: &str, price: &str, sale: bool) -> ppb::ReceiptLine {
    ppb::ReceiptLine {
        line_id: id.into(),
        sku: sku.into(),
        quantity: dec(qty),
        unit_price: dec(price),
        sale_price: sale,
    }
}

/// Sets up a tenant like the case studies: base program, one store, a few products.
pub async fn setup_tenant(channel: &Channel, tenant: &str) {
    let mut program = ppb::program_service_client::ProgramServiceClient::new(channel.clone());
    program
        .update_program(ppb::UpdateProgramRequest {
            program: Some(ppb::Program {
                tenant_id: tenant.into(),
                currency: "KZT".into(),
                point_minor_units: 100,
                base_accrual: Some(ppb::program::BaseAccrual::AccrualPercent(Decimal {
                    value: "1".into(),
                })),
                point_value: dec("1"),
                max_redeem_percent: dec("20"),
                sale_items_excluded_from_accrual: true,
                sale_items_excluded_from_redemption: true,
                point_lifetime_days: 180,
                refund_returns_redeemed_points: true,
                ..Default::default()
            }),
            expected_version: 0,
            actor: None,
        })
        .await
        .unwrap();
    let mut catalog = ppb::catalog_service_client::CatalogServiceClient::new(channel.clone());
    catalog
        .upsert_stores(ppb::UpsertStoresRequest {
            tenant_id: tenant.into(),
            stores: vec![ppb::Store {
                store_id: "s1".into(),
                name: "Store 1".into(),
                brand: "ShoeHub".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    catalog
        .upsert_products(ppb::UpsertProductsRequest {
            tenant_id: tenant.into(),
            products: ["boots", "socks", "insoles"]
                .iter()
                .map(|sku| ppb::Product {
                    sku: (*sku).into(),
                    name: (*sku).into(),
                    category: "Shoes".into(),
                    brand: "Tundra".into(),
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .unwrap();
}

/// A receipt for `tenant` at store s1.
pub fn receipt(
    tenant: &str,
    id: &str,
    card: Option<&str>,
    lines: Vec<ppb::ReceiptLine>,
) -> ppb::Receipt {
    ppb::Receipt {
        tenant_id: tenant.into(),
        receipt_id: id.into(),
        store_id: "s1".into(),
        identification: card.map(|c| ppb::receipt::Identification::CardNumber(c.into())),
        lines,
        ..Default::default()
    }
}

/// The field violations of an INVALID_ARGUMENT status, as (field, description).
pub fn violations(status: &tonic::Status) -> Vec<(String, String)> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .bad_request()
        .map(|br| {
            br.field_violations
                .iter()
                .map(|v| (v.field.clone(), v.description.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// Clients for the POS flow over one channel (or two, in microservices mode).
#[derive(Debug, Clone)]
pub struct Pos {
    pub members: identity::member_service_client::MemberServiceClient<Channel>,
    pub cards: identity::card_service_client::CardServiceClient<Channel>,
    pub checkout: promotion::checkout_service_client::CheckoutServiceClient<Channel>,
    pub balance: balance::balance_service_client::BalanceServiceClient<Channel>,
}

impl Pos {
    /// `identity_channel` serves identity, `channel` everything else.
    pub fn new(identity_channel: &Channel, channel: &Channel) -> Self {
        Self {
            members: identity::member_service_client::MemberServiceClient::new(
                identity_channel.clone(),
            ),
            cards: identity::card_service_client::CardServiceClient::new(identity_channel.clone()),
            checkout: promotion::checkout_service_client::CheckoutServiceClient::new(
                channel.clone(),
            ),
            balance: balance::balance_service_client::BalanceServiceClient::new(channel.clone()),
        }
    }

    /// Registers a member by phone and issues a virtual card; returns (member id, card).
    pub async fn member_with_card(&mut self, tenant: &str, phone: &str) -> (String, String) {
        let member = self
            .members
            .register_member(identity::RegisterMemberRequest {
                tenant_id: tenant.into(),
                phone: phone.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .member
            .unwrap();
        let card = self
            .cards
            .issue_card(identity::IssueCardRequest {
                tenant_id: tenant.into(),
                member_id: member.member_id.clone(),
                kind: identity::CardKind::Virtual as i32,
                number: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .card
            .unwrap();
        (member.member_id, card.number)
    }

    pub async fn balance(&mut self, tenant: &str, member_id: &str) -> balance::Balance {
        self.balance
            .get_balance(balance::GetBalanceRequest {
                tenant_id: tenant.into(),
                member_id: member_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .balance
            .unwrap()
    }

    pub async fn commit(
        &mut self,
        receipt: promotion::Receipt,
    ) -> Result<promotion::CommitResponse, tonic::Status> {
        self.checkout
            .commit(promotion::CommitRequest {
                receipt: Some(receipt),
                ..Default::default()
            })
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn refund(
        &mut self,
        tenant: &str,
        receipt_id: &str,
        refund_id: &str,
        lines: &[(&str, &str)],
    ) -> Result<promotion::RefundResponse, tonic::Status> {
        self.checkout
            .refund(promotion::RefundRequest {
                tenant_id: tenant.into(),
                receipt_id: receipt_id.into(),
                refund_id: refund_id.into(),
                lines: lines
                    .iter()
                    .map(|(id, q)| promotion::RefundLine {
                        line_id: (*id).into(),
                        quantity: dec(q),
                    })
                    .collect(),
            })
            .await
            .map(tonic::Response::into_inner)
    }
}

/// The value of the first series in a Prometheus scrape whose line starts with `name`
/// (name and labels as written there).
pub fn metric_value(scrape: &str, name: &str) -> Option<String> {
    scrape
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last().map(str::to_string))
}

/// Runs `loyalty create-key` against a stopped server's data directory; the whole key.
pub async fn create_key(data_dir: &Path, args: &[&str]) -> String {
    let mut all: Vec<String> = vec!["create-key".into(), "--data-dir".into()];
    all.push(data_dir.display().to_string());
    all.extend(args.iter().map(|s| (*s).to_string()));
    let out = command(&all, &[]).output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `message` presenting `key` as `authorization: Bearer <key>`.
pub fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

/// The walking skeleton, asserted step by step. Used by the dev-mode, restart and
/// microservices tests alike. Returns (member id, receipt id) for follow-up checks.
pub async fn skeleton_flow(pos: &mut Pos, tenant: &str) -> (String, String) {
    // Register by phone (normalized to E.164), issue a card, look the member up by card.
    let (member_id, card) = pos.member_with_card(tenant, "8 (701) 555-12-34").await;
    let found = pos
        .members
        .lookup_member(identity::LookupMemberRequest {
            tenant_id: tenant.into(),
            key: Some(identity::lookup_member_request::Key::CardNumber(
                card.clone(),
            )),
            default_region: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap();
    assert_eq!(found.member_id, member_id);
    assert_eq!(found.phone, "+77015551234");

    // Quote: 1% of 2 x 1500 = 30 points (3000 minor units); sale line excluded. Writes nothing.
    let lines = vec![
        line("1", "boots", "2", "1500.00", false),
        line("2", "socks", "1", "500.00", true),
    ];
    let r = receipt(tenant, "R-1", Some(&card), lines);
    let quote = pos
        .checkout
        .quote(promotion::QuoteRequest {
            receipt: Some(r.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .evaluation
        .unwrap();
    assert_eq!(quote.points_accrued, 3000);
    assert_eq!(quote.net_amount.as_ref().unwrap().value, "3500.00");
    assert_eq!(quote.lines[1].points_accrued, 0);
    assert!(
        quote.lines[1].notes.iter().any(|n| n.contains("sale")),
        "{:?}",
        quote.lines[1].notes
    );
    assert_eq!(
        pos.balance(tenant, &member_id).await.active,
        0,
        "a quote writes nothing"
    );
    let nothing = pos
        .checkout
        .get_purchase(promotion::GetPurchaseRequest {
            tenant_id: tenant.into(),
            receipt_id: "R-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        nothing.code(),
        tonic::Code::NotFound,
        "a quote records no purchase"
    );

    // Commit: points accrue, purchase recorded; the same answer as the quote.
    let committed = pos.commit(r.clone()).await.unwrap();
    let evaluation = committed.evaluation.clone().unwrap();
    assert_eq!(evaluation.points_accrued, quote.points_accrued);
    assert_eq!(evaluation.lines, quote.lines);
    assert_eq!(committed.points_balance, 3000);
    assert_eq!(pos.balance(tenant, &member_id).await.active, 3000);

    // Retry: same answer, accrues once.
    let again = pos.commit(r.clone()).await.unwrap();
    assert_eq!(again, committed);
    let b = pos.balance(tenant, &member_id).await;
    assert_eq!((b.active, b.ledger_sequence), (3000, 1));

    // Same id, different receipt: refused, nothing changes.
    let mut other = r.clone();
    other.lines[0].quantity = dec("3");
    let err = pos.commit(other).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    assert_eq!(pos.balance(tenant, &member_id).await.active, 3000);

    // An unidentified purchase is recorded too.
    let anonymous = receipt(
        tenant,
        "R-anon",
        None,
        vec![line("1", "insoles", "1", "990.00", false)],
    );
    let c = pos.commit(anonymous).await.unwrap();
    assert!(c.evaluation.unwrap().member.is_none());
    let recorded = pos
        .checkout
        .get_purchase(promotion::GetPurchaseRequest {
            tenant_id: tenant.into(),
            receipt_id: "R-anon".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .purchase
        .unwrap();
    assert!(recorded.commit_time.is_some());

    // Partial refund: one of the two boots reverses half the points.
    let refund = pos
        .refund(tenant, "R-1", "F-1", &[("1", "1")])
        .await
        .unwrap();
    assert_eq!(refund.points_reversed, 1500);
    assert_eq!(refund.refunded_amount.as_ref().unwrap().value, "1500.00");
    assert_eq!(refund.points_balance, 1500);
    let replay = pos
        .refund(tenant, "R-1", "F-1", &[("1", "1")])
        .await
        .unwrap();
    assert_eq!(replay, refund, "a refund retry returns the same answer");
    assert_eq!(
        pos.balance(tenant, &member_id).await.active,
        1500,
        "and reverses once"
    );
    let too_much = pos
        .refund(tenant, "R-1", "F-2", &[("1", "2")])
        .await
        .unwrap_err();
    assert_eq!(
        too_much.code(),
        tonic::Code::FailedPrecondition,
        "{too_much:?}"
    );
    assert_eq!(pos.balance(tenant, &member_id).await.active, 1500);
    (member_id, "R-1".into())
}

/// Every ledger entry of a member, newest first, following page tokens.
pub async fn all_ledger_entries(
    client: &mut balance::balance_service_client::BalanceServiceClient<Channel>,
    tenant: &str,
    member: &str,
) -> Vec<balance::LedgerEntry> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_ledger_entries(balance::ListLedgerEntriesRequest {
                tenant_id: tenant.into(),
                member_id: member.into(),
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        all.extend(page.entries);
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
}

/// One span as an OTLP receiver got it.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The exporting process's `service.name`.
    pub service: String,
    pub name: String,
    /// 1 internal, 2 server, 3 client.
    pub kind: i32,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    pub parent_span_id: Vec<u8>,
    pub attributes: Vec<(String, String)>,
}

impl ReceivedSpan {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// One data point of one metric as an OTLP receiver got it.
#[derive(Debug, Clone)]
pub struct ReceivedPoint {
    /// The exporting process's `service.name`.
    pub service: String,
    pub name: String,
    pub attributes: Vec<(String, String)>,
    /// A sum's or gauge's value; a histogram's count.
    pub value: f64,
    /// A histogram's sum.
    pub sum: f64,
    /// Whether the point is a monotonic sum (a counter).
    pub monotonic: bool,
}

impl ReceivedPoint {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// An OTLP/gRPC trace and metrics receiver on a free loopback port that keeps what it is
/// sent.
#[derive(Debug)]
pub struct OtlpReceiver {
    pub endpoint: String,
    spans: std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>,
    points: std::sync::Arc<std::sync::Mutex<Vec<ReceivedPoint>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone, Default)]
struct Collect(std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>);

#[derive(Debug, Clone, Default)]
struct CollectMetrics(std::sync::Arc<std::sync::Mutex<Vec<ReceivedPoint>>>);

fn attribute_texts(
    attributes: &[opentelemetry_proto::tonic::common::v1::KeyValue],
) -> Vec<(String, String)> {
    attributes
        .iter()
        .map(|kv| (kv.key.clone(), any_value_text(kv.value.as_ref())))
        .collect()
}

fn service_name(resource: Option<&opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    resource
        .iter()
        .flat_map(|r| r.attributes.iter())
        .find(|kv| kv.key == "service.name")
        .map(|kv| any_value_text(kv.value.as_ref()))
        .unwrap_or_default()
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsService
    for CollectMetrics
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse,
        >,
        tonic::Status,
    > {
        use opentelemetry_proto::tonic::metrics::v1::metric::Data;
        use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value;
        let number = |v: Option<&Value>| match v {
            Some(Value::AsDouble(d)) => *d,
            #[allow(clippy::cast_precision_loss)]
            Some(Value::AsInt(i)) => *i as f64,
            None => 0.0,
        };
        let mut got = Vec::new();
        for resource_metrics in request.into_inner().resource_metrics {
            let service = service_name(resource_metrics.resource.as_ref());
            for scope in resource_metrics.scope_metrics {
                for metric in scope.metrics {
                    let point = |attributes, value, sum, monotonic| ReceivedPoint {
                        service: service.clone(),
                        name: metric.name.clone(),
                        attributes,
                        value,
                        sum,
                        monotonic,
                    };
                    match &metric.data {
                        Some(Data::Sum(s)) => got.extend(s.data_points.iter().map(|p| {
                            point(
                                attribute_texts(&p.attributes),
                                number(p.value.as_ref()),
                                0.0,
                                s.is_monotonic,
                            )
                        })),
                        Some(Data::Gauge(g)) => got.extend(g.data_points.iter().map(|p| {
                            point(
                                attribute_texts(&p.attributes),
                                number(p.value.as_ref()),
                                0.0,
                                false,
                            )
                        })),
                        #[allow(clippy::cast_precision_loss)]
                        Some(Data::Histogram(h)) => got.extend(h.data_points.iter().map(|p| {
                            point(
                                attribute_texts(&p.attributes),
                                p.count as f64,
                                p.sum.unwrap_or_default(),
                                false,
                            )
                        })),
                        _ => {}
                    }
                }
            }
        }
        self.0.lock().unwrap().extend(got);
        Ok(tonic::Response::new(Default::default()))
    }
}

fn any_value_text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match value.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collect
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let mut got = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = service_name(resource_spans.resource.as_ref());
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    got.push(ReceivedSpan {
                        service: service.clone(),
                        name: span.name,
                        kind: span.kind,
                        trace_id: span.trace_id,
                        span_id: span.span_id,
                        parent_span_id: span.parent_span_id,
                        attributes: attribute_texts(&span.attributes),
                    });
                }
            }
        }
        self.0.lock().unwrap().extend(got);
        Ok(tonic::Response::new(Default::default()))
    }
}

impl OtlpReceiver {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0").await
    }

    /// Listens on `addr` (loopback only in tests and benchmarks).
    pub async fn start_on(addr: &str) -> Self {
        use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsServiceServer;
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let collect = Collect::default();
        let spans = collect.0.clone();
        let collect_metrics = CollectMetrics::default();
        let points = collect_metrics.0.clone();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collect))
                .add_service(MetricsServiceServer::new(collect_metrics))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        Self {
            endpoint,
            spans,
            points,
            task,
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// Every metric data point received so far, oldest first.
    pub fn points(&self) -> Vec<ReceivedPoint> {
        self.points.lock().unwrap().clone()
    }

    /// The newest value pushed for the series `name` whose attributes include `labels`.
    pub fn latest(&self, name: &str, labels: &[(&str, &str)]) -> Option<ReceivedPoint> {
        self.points
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|p| p.name == name && labels.iter().all(|(k, v)| p.attribute(k) == Some(*v)))
            .cloned()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
