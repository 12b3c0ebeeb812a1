//! Where reporting keeps its facts. The facts are the truth; rollups are rebuilt from them
//! when the service starts. A fact is stored once: purchases by receipt, refunds by refund,
//! members by their newest version, so a redelivered or older event stores nothing.

#[cfg(test)]
pub(crate) mod conformance;
pub mod embedded;
pub mod scylla;

use loyalty_platform::calendar::Day;
use loyalty_platform::clock::Millis;
use loyalty_platform::error::Result;

use crate::audit::{AuditCursor, AuditEntry, AuditPage, AuditQuery, Order};
use crate::fact::{Fact, TenantFact};

/// Which facts a page reads: receipts (by business day) or ledger entries (by time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipts {
    Purchases,
    Refunds,
    Ledger,
}

/// Where a page of a tenant's facts starts: after this (business day or, for ledger
/// entries, time in milliseconds; sequence).
pub type Position = (i64, u64);

/// A page of receipt facts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FactPage {
    pub rows: Vec<(Position, Fact)>,
    /// The page stopped at its limit or size: there may be more after its last row.
    pub more: bool,
}

/// Where a full scan continues: the purchases, the refunds, the ledger entries, then the
/// members, each after the key given (from their start when None).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanFrom {
    Purchases(Option<(String, Day, u64)>),
    Refunds(Option<(String, Day, u64)>),
    Ledger(Option<(String, i64, u64)>),
    Members(Option<(String, String)>),
}

impl ScanFrom {
    pub const START: ScanFrom = ScanFrom::Purchases(None);

    /// Where a scan of `kind` continues after `at`.
    pub fn within(kind: Receipts, at: Option<(String, i64, u64)>) -> ScanFrom {
        match kind {
            Receipts::Purchases => ScanFrom::Purchases(at),
            Receipts::Refunds => ScanFrom::Refunds(at),
            Receipts::Ledger => ScanFrom::Ledger(at),
        }
    }

    /// Where a scan continues once it has read every fact of `kind`.
    pub fn after_all(kind: Receipts) -> ScanFrom {
        match kind {
            Receipts::Purchases => ScanFrom::Refunds(None),
            Receipts::Refunds => ScanFrom::Ledger(None),
            Receipts::Ledger => ScanFrom::Members(None),
        }
    }
}

#[async_trait::async_trait]
pub trait ReportingStore: Send + Sync + std::fmt::Debug {
    /// Stores, in one durable write, the facts not stored yet, and returns exactly those
    /// (a fact repeated within the batch is returned once).
    async fn append(&self, facts: Vec<TenantFact>) -> Result<Vec<TenantFact>>;

    /// The newest sequence number handed out: a snapshot of every receipt fact so far.
    async fn snapshot(&self) -> Result<u64>;

    /// A tenant's receipt facts with business days `from..=to` and sequence numbers up to
    /// `snapshot`, in (day, sequence) order after `after`: at most `limit` of them, and no
    /// more once they take `max_bytes` stored (at least one).
    #[allow(clippy::too_many_arguments)]
    async fn page(
        &self,
        tenant_id: &str,
        kind: Receipts,
        from: Day,
        to: Day,
        snapshot: u64,
        after: Option<Position>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<FactPage>;

    /// Every stored fact of every tenant, a page at a time, for rebuilding rollups.
    async fn scan(
        &self,
        from: ScanFrom,
        limit: usize,
    ) -> Result<(Vec<TenantFact>, Option<ScanFrom>)>;

    /// Brings the store's indexes up to date with its facts; called once at open, before
    /// anything else.
    async fn prepare(&self) -> Result<()>;

    /// Removes every fact of every tenant, keeping the audit log and the sequence (numbers
    /// handed out later stay above those handed out before): the first step of rebuilding
    /// the facts from their sources, while no reporting process runs on the store.
    async fn clear_facts(&self) -> Result<()>;

    /// These members' stored purchases and refunds with business days `from..=to`, and
    /// with `ledger` all their ledger entries (not their profiles), in no particular order.
    async fn member_facts(
        &self,
        tenant_id: &str,
        members: Vec<String>,
        days: (Day, Day),
        ledger: bool,
    ) -> Result<Vec<Fact>>;

    /// Stores, in one durable write, the audit records not stored yet (by tenant and id),
    /// and answers over the starts (`in_flight`) of their calls; a start never replaces
    /// anything. Returns how many records were stored or replaced.
    async fn append_audit(&self, entries: Vec<AuditEntry>) -> Result<usize>;

    /// When the oldest of a tenant's calls whose start is recorded without an answer began,
    /// among those that began at or after `since`.
    async fn oldest_open_audit(&self, tenant_id: &str, since: Millis) -> Result<Option<Millis>>;

    /// A tenant's audit records matching `query`, in `order` after `after`: at most `limit`,
    /// and no more once they take `max_bytes` stored (at least one). A page looks at most at
    /// [`AUDIT_SCAN`] records, so a narrow filter may return a short (even empty) page with a
    /// `next` to continue from.
    async fn audit_page(
        &self,
        tenant_id: &str,
        query: &AuditQuery,
        order: Order,
        after: Option<AuditCursor>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<AuditPage>;

    async fn ping(&self) -> Result<()>;
}

/// Most audit records one page looks at (their filter fields only) past its filter.
pub const AUDIT_SCAN: usize = 100_000;
