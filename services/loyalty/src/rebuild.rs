//! `loyalty rebuild-reporting` and `loyalty rebuild-segmentation`: rebuild reporting's facts
//! and segmentation's member features from the sources of truth, the purchase history
//! (promotion), the points ledger (balance) and the members (identity). Every record comes
//! as the event it published and is decoded by the consumer's own decoder, so a rebuilt
//! fact or feature is what the stream delivered.
//!
//! Where the sources are read depends on the backend:
//! - `embedded` (dev mode): the stores in the data directory of a stopped server;
//! - `redis` or `scylla` (microservices): the running identity, balance and promotion
//!   services named by `peers.*`, over gRPC with the service key (`Replay*Events`), while
//!   the consumer being rebuilt is stopped.
//!
//! Reporting's facts are cleared (its audit log is kept) and stored again: in ScyllaDB on the
//! `scylla` backend, in `reporting.redb` of the data directory otherwise. Segmentation's
//! features are rebuilt in place, because its file also holds what no source has (segment
//! definitions, uploaded lists, membership history): the features are cleared, every event
//! applied once, and every dynamic segment evaluated once at the end. Every source answers
//! before anything is cleared; a rebuild cut short is run again.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use loyalty_balance::publish::LedgerReplay;
use loyalty_balance::store::embedded::EmbeddedBalanceStore;
use loyalty_identity::Identity;
use loyalty_identity::publish::MemberReplay;
use loyalty_identity::store::IdentityStore;
use loyalty_identity::store::embedded::EmbeddedIdentityStore;
use loyalty_identity::store::redis::RedisIdentityStore;
use loyalty_platform::clock::{SharedClock, SystemClock};
use loyalty_platform::config::{Backend, Config, ServiceStore};
use loyalty_platform::error::Result;
use loyalty_platform::replay::{self, EventSource};
use loyalty_promotion::publish::PurchaseReplay;
use loyalty_promotion::store::embedded::EmbeddedPromotionStore;
use loyalty_proto::events::v1 as epb;
use loyalty_reporting::fact::TenantFact;
use loyalty_reporting::store::ReportingStore;
use loyalty_segmentation::Segmentation;
use loyalty_segmentation::store::embedded::EmbeddedSegmentationStore;
use loyalty_segmentation::store::{RuleBook, SegmentationStore};
use prost::Message;

use crate::peers::PeerChannel;
use crate::wiring::{ServiceName, peer_channel};

/// Events asked for per page: small enough that a page answers well within a peer call's
/// deadline.
const PAGE: usize = 200;
/// Attempts at one page from a peer before the rebuild gives up.
const ATTEMPTS: u32 = 6;
/// How often a rebuild says how far it got.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// Largest page message accepted from a peer: a page stops at about 1 MiB plus one event.
const MAX_PAGE_MESSAGE: usize = 16 * 1024 * 1024;

/// What a rebuild read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rebuilt {
    pub purchases: usize,
    pub refunds: usize,
    pub ledger_entries: usize,
    pub members: usize,
}

impl Rebuilt {
    fn events(&self) -> usize {
        self.purchases + self.refunds + self.ledger_entries + self.members
    }

    /// A line on stderr: a long rebuild shows it is moving, and how fast.
    fn progress(&self, reading: &str, elapsed: Duration) {
        eprintln!(
            "loyalty: reading the {reading}; so far {} purchases, {} refunds, {} ledger entries, {} members ({:.0} events/s)",
            self.purchases,
            self.refunds,
            self.ledger_entries,
            self.members,
            self.events() as f64 / elapsed.as_secs_f64().max(0.001)
        );
    }

    fn count(&mut self, payload: &[u8]) {
        match epb::Event::decode(payload).ok().and_then(|e| e.kind) {
            Some(epb::event::Kind::Purchase(_)) => self.purchases += 1,
            Some(epb::event::Kind::Refund(_)) => self.refunds += 1,
            Some(epb::event::Kind::Ledger(_)) => self.ledger_entries += 1,
            Some(epb::event::Kind::Member(_)) => self.members += 1,
            _ => {}
        }
    }
}

fn open<T>(
    dir: &Path,
    file: &str,
    open: impl FnOnce(&Path) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let path = dir.join(file);
    anyhow::ensure!(
        path.exists(),
        "{} does not exist: nothing to rebuild from",
        path.display()
    );
    open(&path).with_context(|| in_use(&path, "a server"))
}

/// Where replayed events go: a batch of encoded `loyalty.events.v1.Event`s at a time.
#[async_trait::async_trait]
trait Sink {
    async fn take(&mut self, payloads: Vec<Vec<u8>>) -> anyhow::Result<()>;
}

struct ReportingSink(Arc<dyn ReportingStore>);

#[async_trait::async_trait]
impl Sink for ReportingSink {
    async fn take(&mut self, payloads: Vec<Vec<u8>>) -> anyhow::Result<()> {
        let facts: Vec<TenantFact> = payloads
            .iter()
            .filter_map(|p| loyalty_reporting::consumer::decode(p))
            .collect();
        self.0.append(facts).await?;
        Ok(())
    }
}

struct SegmentationSink {
    store: Arc<dyn SegmentationStore>,
    now: loyalty_platform::clock::Millis,
}

#[async_trait::async_trait]
impl Sink for SegmentationSink {
    async fn take(&mut self, payloads: Vec<Vec<u8>>) -> anyhow::Result<()> {
        let changes = payloads
            .iter()
            .filter_map(|p| loyalty_segmentation::consumer::decode(p))
            .collect();
        // No rules: memberships are evaluated once, over the finished features.
        self.store
            .apply_changes(changes, RuleBook::new(), self.now)
            .await?;
        Ok(())
    }
}

/// The three sources of truth, each replaying its records.
struct Sources {
    purchases: Box<dyn EventSource>,
    ledger: Box<dyn EventSource>,
    members: Box<dyn EventSource>,
    /// Where they are, for messages.
    place: String,
}

impl Sources {
    /// The stores of a stopped dev-mode data directory (embedded backend), or the running
    /// producer services (any other).
    fn of(config: &Config) -> anyhow::Result<Self> {
        if config.storage.backend == Backend::Embedded {
            return Self::local(config);
        }
        let peer =
            |name: ServiceName, url: &Option<String>| -> anyhow::Result<Box<dyn EventSource>> {
                Ok(Box::new(RemoteReplay {
                    service: name,
                    channel: peer_channel(config, name, url)?,
                }))
            };
        let peers = &config.peers;
        Ok(Self {
            purchases: peer(ServiceName::Promotion, &peers.promotion)?,
            ledger: peer(ServiceName::Balance, &peers.balance)?,
            members: peer(ServiceName::Identity, &peers.identity)?,
            place: format!(
                "promotion at {}, balance at {}, identity at {}",
                peers.promotion.as_deref().unwrap_or_default(),
                peers.balance.as_deref().unwrap_or_default(),
                peers.identity.as_deref().unwrap_or_default()
            ),
        })
    }

    fn local(config: &Config) -> anyhow::Result<Self> {
        let dir = &config.data_dir;
        let clock: SharedClock = Arc::new(SystemClock);
        let promotion = match config.promotion.store {
            ServiceStore::Embedded => {
                Arc::new(open(dir, "promotion.redb", EmbeddedPromotionStore::open)?)
            }
            ServiceStore::Redis => crate::wiring::promotion_store(config)?,
        };
        let ledger = open(dir, "balance.redb", EmbeddedBalanceStore::open)?;
        let members: Arc<dyn IdentityStore> = match config.identity.store {
            ServiceStore::Embedded => {
                Arc::new(open(dir, "identity.redb", EmbeddedIdentityStore::open)?)
            }
            ServiceStore::Redis => Arc::new(RedisIdentityStore::for_config(&config.storage.redis)?),
        };
        let identity = Identity::new(members, clock, config.identity.default_region.clone())
            .with_questionnaire(config.identity.questionnaire.clone());
        Ok(Self {
            purchases: Box::new(PurchaseReplay(promotion)),
            ledger: Box::new(LedgerReplay(Arc::new(ledger))),
            members: Box::new(MemberReplay(identity)),
            place: dir.display().to_string(),
        })
    }

    /// Asks each source for its first event, so one that cannot answer stops the rebuild
    /// before anything is cleared.
    async fn check(&self) -> anyhow::Result<()> {
        for (name, source) in self.each() {
            source
                .page(&[], 1)
                .await
                .with_context(|| format!("reading the {name} from {}", self.place))?;
        }
        Ok(())
    }

    fn each(&self) -> [(&'static str, &dyn EventSource); 3] {
        [
            ("purchase history", &*self.purchases),
            ("points ledger", &*self.ledger),
            ("members", &*self.members),
        ]
    }
}

/// A producer service's replay over gRPC.
struct RemoteReplay {
    service: ServiceName,
    channel: PeerChannel,
}

impl RemoteReplay {
    /// One page: its events and the next cursor (empty after the last page).
    async fn call(
        &self,
        cursor: Vec<u8>,
        limit: u32,
    ) -> std::result::Result<(Vec<Vec<u8>>, Vec<u8>), tonic::Status> {
        use loyalty_proto::balance::v1 as bpb;
        use loyalty_proto::identity::v1 as ipb;
        use loyalty_proto::promotion::v1 as ppb;
        let channel = self.channel.clone();
        Ok(match self.service {
            ServiceName::Promotion => {
                let request = ppb::ReplayPurchaseEventsRequest { cursor, limit };
                let r = ppb::checkout_service_client::CheckoutServiceClient::new(channel)
                    .max_decoding_message_size(MAX_PAGE_MESSAGE)
                    .replay_purchase_events(request)
                    .await?
                    .into_inner();
                (r.events, r.next_cursor)
            }
            ServiceName::Balance => {
                let request = bpb::ReplayLedgerEventsRequest { cursor, limit };
                let r = bpb::balance_service_client::BalanceServiceClient::new(channel)
                    .max_decoding_message_size(MAX_PAGE_MESSAGE)
                    .replay_ledger_events(request)
                    .await?
                    .into_inner();
                (r.events, r.next_cursor)
            }
            _ => {
                let request = ipb::ReplayMemberEventsRequest { cursor, limit };
                let r = ipb::member_service_client::MemberServiceClient::new(channel)
                    .max_decoding_message_size(MAX_PAGE_MESSAGE)
                    .replay_member_events(request)
                    .await?
                    .into_inner();
                (r.events, r.next_cursor)
            }
        })
    }
}

#[async_trait::async_trait]
impl EventSource for RemoteReplay {
    async fn page(&self, cursor: &[u8], limit: usize) -> Result<replay::Page> {
        let mut attempt = 0;
        let mut limit = u32::try_from(limit).unwrap_or(u32::MAX);
        loop {
            match self.call(cursor.to_vec(), limit).await {
                Ok((events, next)) => {
                    return Ok(replay::Page {
                        events,
                        next: (!next.is_empty()).then_some(next),
                    });
                }
                // A page read changes nothing: one a busy or restarting peer did not answer
                // is asked for again.
                Err(status)
                    if attempt + 1 < ATTEMPTS
                        && matches!(
                            status.code(),
                            tonic::Code::Unavailable
                                | tonic::Code::DeadlineExceeded
                                | tonic::Code::ResourceExhausted
                        ) =>
                {
                    // The commands log nowhere else: say it where the operator watches.
                    eprintln!(
                        "loyalty: {} did not answer a replay page ({}: {}); asking again",
                        self.service,
                        status.code(),
                        status.message()
                    );
                    // A page that took too long is asked for in a smaller size.
                    if status.code() == tonic::Code::DeadlineExceeded {
                        limit = (limit / 2).max(1);
                    }
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                    attempt += 1;
                }
                Err(status) => return Err(loyalty_platform::grpc::from_status(status)),
            }
        }
    }
}

/// Where `loyalty rebuild-reporting` stores the facts, and its name for messages.
async fn reporting_store(config: &Config) -> anyhow::Result<(Arc<dyn ReportingStore>, String)> {
    let store = crate::wiring::reporting_store(config).await;
    if config.storage.backend == Backend::Scylla {
        return Ok((store?, "ScyllaDB".into()));
    }
    let path = config.data_dir.join("reporting.redb");
    let store = store.with_context(|| in_use(&path, "reporting"))?;
    Ok((store, path.display().to_string()))
}

/// What to say when a store file of `service` cannot be opened.
fn in_use(path: &Path, service: &str) -> String {
    format!(
        "opening {} (is {service} still running on this data directory? stop it first)",
        path.display()
    )
}

/// Refuses when `service` answers at its `peers.*` address: a consumer must be stopped
/// while its derived state is rebuilt (on ScyllaDB no file lock would stop this).
async fn ensure_stopped(
    config: &Config,
    service: ServiceName,
    url: &Option<String>,
) -> anyhow::Result<()> {
    if url.is_none() || config.storage.backend == Backend::Embedded {
        return Ok(());
    }
    let channel = peer_channel(config, service, url)?;
    let answered = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await;
    // Only a peer that cannot be reached is taken as stopped: any answer, even a refusal,
    // comes from a running process.
    let stopped = matches!(
        answered.map_err(|s| s.code()),
        Err(tonic::Code::Unavailable | tonic::Code::DeadlineExceeded)
    );
    anyhow::ensure!(
        stopped,
        "{service} is running at {}: stop it first (scale it to 0), then rebuild",
        url.as_deref().unwrap_or_default()
    );
    Ok(())
}

/// `loyalty rebuild-reporting`: returns what it read and where the facts are.
pub async fn run(config: &Config) -> anyhow::Result<(Rebuilt, String)> {
    ensure_stopped(config, ServiceName::Reporting, &config.peers.reporting).await?;
    let sources = Sources::of(config)?;
    let (store, place) = reporting_store(config).await?;
    sources.check().await?;
    store.prepare().await?;
    store.clear_facts().await?;
    let done = replay(&sources, &mut ReportingSink(store)).await?;
    Ok((done, place))
}

/// What a segmentation rebuild did: the events it replayed, and the memberships that changed
/// when the segments were evaluated over the rebuilt features.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RebuiltSegmentation {
    pub replayed: Rebuilt,
    pub memberships_changed: usize,
}

/// `loyalty rebuild-segmentation`.
pub async fn run_segmentation(config: &Config) -> anyhow::Result<RebuiltSegmentation> {
    ensure_stopped(
        config,
        ServiceName::Segmentation,
        &config.peers.segmentation,
    )
    .await?;
    let sources = Sources::of(config)?;
    let clock: SharedClock = Arc::new(SystemClock);
    let store: Arc<dyn SegmentationStore> = match config.segmentation.store {
        ServiceStore::Embedded => {
            let path = config.data_dir.join("segmentation.redb");
            Arc::new(
                EmbeddedSegmentationStore::open(&path)
                    .with_context(|| in_use(&path, "segmentation"))?,
            )
        }
        ServiceStore::Redis => crate::wiring::segmentation_store(config).await?,
    };
    // Every source answers before the features are cleared: a missing one changes nothing.
    sources.check().await?;
    store.clear_features().await?;
    let mut into = SegmentationSink {
        store: store.clone(),
        now: clock.now_ms(),
    };
    let replayed = replay(&sources, &mut into).await?;
    let memberships_changed = Segmentation::new(store, clock).reevaluate_all().await?;
    Ok(RebuiltSegmentation {
        replayed,
        memberships_changed,
    })
}

/// Replays the purchase history, the ledger and the members, in that order, into `into`.
async fn replay(sources: &Sources, into: &mut dyn Sink) -> anyhow::Result<Rebuilt> {
    let mut done = Rebuilt::default();
    let started = std::time::Instant::now();
    let mut said = started;
    for (name, source) in sources.each() {
        let mut cursor = Vec::new();
        loop {
            let page = source
                .page(&cursor, PAGE)
                .await
                .with_context(|| format!("reading the {name} from {}", sources.place))?;
            for event in &page.events {
                done.count(event);
            }
            into.take(page.events).await?;
            if said.elapsed() >= PROGRESS_EVERY {
                said = std::time::Instant::now();
                done.progress(name, started.elapsed());
            }
            match page.next {
                Some(next) => cursor = next,
                None => break,
            }
        }
    }
    Ok(done)
}

/// `loyalty copy-identity`: everything in --data-dir's `identity.redb` (server stopped) into
/// the Redis of `storage.redis`, after filing the emails of members stored before the email
/// index (as a server opening the file would).
pub async fn copy_identity(config: &Config) -> anyhow::Result<String> {
    let from = open(
        &config.data_dir,
        "identity.redb",
        EmbeddedIdentityStore::open,
    )?;
    from.index_stored_emails().await?;
    let to = RedisIdentityStore::for_config(&config.storage.redis)?;
    let c = to.copy_from(&from).await?;
    Ok(format!(
        "{} tenants, {} members, {} cards, {} API keys ({} rows)",
        c.tenants, c.members, c.cards, c.api_keys, c.rows
    ))
}

/// `loyalty copy-segmentation`: everything in --data-dir's `segmentation.redb` (server
/// stopped) into the Redis of `storage.redis`.
pub async fn copy_segmentation(config: &Config) -> anyhow::Result<String> {
    use loyalty_segmentation::store::redis::RedisSegmentationStore;
    let from = open(
        &config.data_dir,
        "segmentation.redb",
        EmbeddedSegmentationStore::open,
    )?;
    let to = RedisSegmentationStore::for_config(&config.storage.redis)?;
    let c = to.copy_from(&from).await?;
    Ok(format!(
        "{} tenants, {} segments, {} members with features ({} rows)",
        c.tenants, c.segments, c.members_with_features, c.rows
    ))
}

/// `loyalty copy-promotion`: everything in --data-dir's `promotion.redb` (server stopped)
/// into the Redis of `storage.redis`.
pub async fn copy_promotion(config: &Config) -> anyhow::Result<String> {
    use loyalty_promotion::store::redis::RedisPromotionStore;
    let from = open(
        &config.data_dir,
        "promotion.redb",
        EmbeddedPromotionStore::open,
    )?;
    let to = RedisPromotionStore::for_config(&config.storage.redis)?;
    let c = to.copy_from(&from).await?;
    Ok(format!(
        "{} tenants, {} purchases, {} campaigns, {} coupons ({} rows)",
        c.tenants, c.purchases, c.campaigns, c.coupons, c.rows
    ))
}
