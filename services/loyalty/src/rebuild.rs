//! `loyalty rebuild-reporting` and `loyalty rebuild-segmentation`: rebuild reporting's facts
//! and segmentation's member features from the sources of truth, the purchase history
//! (promotion), the points ledger (balance) and the members (identity), in the data
//! directory of a stopped dev-mode server. Every record is encoded as the event it published
//! and decoded by the consumer's own decoder, so a rebuilt fact or feature is what the stream
//! delivered.
//!
//! Reporting's new file replaces `reporting.redb` only once it is complete. Segmentation's
//! features are rebuilt in place, because its file also holds what no source has (segment
//! definitions, uploaded lists, membership history): the features are cleared, every event
//! applied once, and every dynamic segment evaluated once at the end. A rebuild cut short is
//! run again.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use loyalty_balance::store::embedded::EmbeddedBalanceStore;
use loyalty_balance::store::{EntryQuery, Ledger};
use loyalty_identity::Identity;
use loyalty_identity::store::embedded::EmbeddedIdentityStore;
use loyalty_platform::clock::{SharedClock, SystemClock};
use loyalty_platform::config::{Backend, Config};
use loyalty_promotion::store::PromotionStore;
use loyalty_promotion::store::embedded::EmbeddedPromotionStore;
use loyalty_reporting::fact::TenantFact;
use loyalty_reporting::store::ReportingStore;
use loyalty_reporting::store::embedded::EmbeddedReportingStore;
use loyalty_segmentation::Segmentation;
use loyalty_segmentation::store::embedded::EmbeddedSegmentationStore;
use loyalty_segmentation::store::{RuleBook, SegmentationStore};

const PAGE: usize = 1000;

/// What a rebuild read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rebuilt {
    pub purchases: usize,
    pub refunds: usize,
    pub ledger_entries: usize,
    pub members: usize,
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
    open(&path).with_context(|| {
        format!(
            "opening {} (is a server still running on this data directory? stop it first)",
            path.display()
        )
    })
}

/// Where replayed events go: a batch of encoded `loyalty.events.v1.Event`s at a time.
#[async_trait::async_trait]
trait Sink {
    async fn take(&mut self, payloads: Vec<Vec<u8>>) -> anyhow::Result<()>;
}

struct ReportingSink(EmbeddedReportingStore);

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

fn embedded_only(config: &Config, what: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.storage.backend == Backend::Embedded,
        "rebuilding {what} reads the embedded stores of one data directory (dev mode); with the {:?} backend the ledger and history live elsewhere",
        config.storage.backend
    );
    Ok(())
}

/// The sources of truth of one data directory, opened before anything is changed.
struct Sources {
    promotion: EmbeddedPromotionStore,
    ledger: EmbeddedBalanceStore,
    identity: Identity,
}

impl Sources {
    fn open(config: &Config) -> anyhow::Result<Self> {
        let dir = &config.data_dir;
        let clock: SharedClock = Arc::new(SystemClock);
        Ok(Self {
            promotion: open(dir, "promotion.redb", EmbeddedPromotionStore::open)?,
            ledger: open(dir, "balance.redb", EmbeddedBalanceStore::open)?,
            identity: Identity::new(
                Arc::new(open(dir, "identity.redb", EmbeddedIdentityStore::open)?),
                clock,
                config.identity.default_region.clone(),
            )
            .with_questionnaire(config.identity.questionnaire.clone()),
        })
    }
}

/// `loyalty rebuild-reporting`.
pub async fn run(config: &Config) -> anyhow::Result<Rebuilt> {
    embedded_only(config, "reporting")?;
    let sources = Sources::open(config)?;
    let partial = config.data_dir.join("reporting.redb.rebuilding");
    if partial.exists() {
        std::fs::remove_file(&partial)
            .with_context(|| format!("removing {}", partial.display()))?;
    }
    let mut into = ReportingSink(EmbeddedReportingStore::open(&partial)?);
    let done = replay(&sources, &mut into).await?;
    drop(into);
    std::fs::rename(&partial, config.data_dir.join("reporting.redb"))
        .context("moving the rebuilt reporting.redb into place")?;
    Ok(done)
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
    embedded_only(config, "segmentation")?;
    // Every source opens before the features are cleared: a missing one changes nothing.
    let sources = Sources::open(config)?;
    let clock: SharedClock = Arc::new(SystemClock);
    let path = config.data_dir.join("segmentation.redb");
    let store: Arc<dyn SegmentationStore> =
        Arc::new(EmbeddedSegmentationStore::open(&path).with_context(|| {
            format!(
                "opening {} (is a server still running on this data directory? stop it first)",
                path.display()
            )
        })?);
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

/// Replays the purchase history, the ledger and the members, as the events they published,
/// into `into`.
async fn replay(sources: &Sources, into: &mut dyn Sink) -> anyhow::Result<Rebuilt> {
    let Sources {
        promotion,
        ledger,
        identity,
    } = sources;
    let clock: SharedClock = Arc::new(SystemClock);
    let mut done = Rebuilt::default();

    let mut after = None;
    loop {
        let page = promotion.purchases_after(after.clone(), PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some((
            last.receipt.tenant_id.clone(),
            last.receipt.receipt_id.clone(),
        ));
        let mut payloads = Vec::new();
        for p in &page {
            let (purchase, refunds) =
                loyalty_promotion::checkout::stored_events(promotion, p).await?;
            if let Some(e) = purchase {
                done.purchases += 1;
                payloads.push(loyalty_promotion::publish::encode_purchase(e));
            }
            done.refunds += refunds.len();
            payloads.extend(
                refunds
                    .into_iter()
                    .map(loyalty_promotion::publish::encode_refund),
            );
        }
        into.take(payloads).await?;
    }

    let mut after = None;
    loop {
        let members = ledger.members(after.clone(), PAGE).await?;
        let Some(last) = members.last() else { break };
        after = Some(last.clone());
        for (tenant, member) in &members {
            let mut before = None;
            loop {
                let query = EntryQuery {
                    before_seq: before,
                    limit: PAGE,
                    ..EntryQuery::default()
                };
                let page = Ledger::entries(ledger, tenant, member, &query).await?;
                done.ledger_entries += page.entries.len();
                let payloads = page
                    .entries
                    .into_iter()
                    .map(|entry| {
                        loyalty_balance::publish::encode(loyalty_balance::events::LedgerEvent {
                            tenant_id: tenant.clone(),
                            member_id: member.clone(),
                            entry,
                        })
                    })
                    .collect();
                into.take(payloads).await?;
                match page.next_before {
                    Some(n) => before = Some(n),
                    None => break,
                }
            }
        }
    }

    let mut after = None;
    let now = clock.now_ms();
    loop {
        let snapshots = identity.snapshots(after.clone(), PAGE).await?;
        let Some(last) = snapshots.last() else { break };
        after = Some((last.tenant_id.clone(), last.member_id.clone()));
        done.members += snapshots.len();
        let payloads = snapshots
            .into_iter()
            .map(|s| loyalty_identity::publish::encode(s, now))
            .collect();
        into.take(payloads).await?;
    }
    Ok(done)
}
