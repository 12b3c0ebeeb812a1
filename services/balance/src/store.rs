//! The balance service's narrow storage trait: apply one operation to one member
//! atomically and durably, read state back. Every backend passes [`conformance`].
//!
//! - [`embedded`]: everything in the embedded database (dev mode); it is also the durable
//!   [`Ledger`] under Redis on a single node.
//! - [`redis`]: hot state in Redis, decided by a Lua script, over a durable [`Ledger`].

use loyalty_platform::clock::Millis;
use loyalty_platform::error::Result;

use crate::ledger::{Account, Change, Entry, Op, OpRecord, Reason};

pub mod conformance;
pub mod embedded;
pub mod redis;
pub mod scylla;
pub mod scylla_certificates;
pub mod traced;

/// Which entries a page holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryQuery {
    /// Only entries with a sequence number below this.
    pub before_seq: Option<i64>,
    pub limit: usize,
    /// Empty: every reason.
    pub reasons: Vec<Reason>,
    /// Inclusive start, exclusive end of `created_at`.
    pub from: Option<Millis>,
    pub until: Option<Millis>,
}

/// Most entries one page request examines; a sparse filter returns a short page with a
/// token to continue.
pub const MAX_SCAN: usize = 10_000;

impl EntryQuery {
    pub fn matches(&self, e: &Entry) -> bool {
        (self.reasons.is_empty() || self.reasons.contains(&e.reason))
            && self.from.is_none_or(|f| e.created_at >= f)
            && self.until.is_none_or(|u| e.created_at < u)
    }

    /// Filters entries given newest first into a page and the token to continue below.
    pub fn page(&self, newest_first: impl Iterator<Item = Result<Entry>>) -> Result<Page> {
        let mut entries = Vec::new();
        let mut last_seen = None;
        for (scanned, e) in newest_first.enumerate() {
            if scanned == MAX_SCAN {
                return Ok(Page {
                    entries,
                    next_before: last_seen,
                });
            }
            let e = e?;
            last_seen = Some(e.seq);
            if self.matches(&e) {
                entries.push(e);
                if entries.len() == self.limit {
                    let next_before = last_seen.filter(|s| *s > 1);
                    return Ok(Page {
                        entries,
                        next_before,
                    });
                }
            }
        }
        Ok(Page {
            entries,
            next_before: None,
        })
    }
}

/// A member with something due for the expiry process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub at: Millis,
    pub tenant: String,
    pub member: String,
    /// Where the backend filed it (ScyllaDB: the day partition).
    pub bucket: i64,
}

/// One page of entries, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub entries: Vec<Entry>,
    /// Where the next page starts (exclusive), when there may be more.
    pub next_before: Option<i64>,
}

#[async_trait::async_trait]
pub trait BalanceStore: Send + Sync + std::fmt::Debug {
    /// Applies `op` under idempotency key `key` (scoped to the member; empty only for the
    /// keyless [`Op::Expire`]) with [`crate::ledger::apply`], atomically: the entries, the
    /// new state and the records are durable before this returns. A retry with the same key
    /// and operation returns the stored record; the same key with another operation is
    /// `AlreadyExists`. A keyless operation returns what it did when it changed something
    /// (a record that is not kept), `None` otherwise.
    async fn execute(
        &self,
        tenant_id: &str,
        member_id: &str,
        key: &str,
        op: Op,
        now: Millis,
    ) -> Result<Option<OpRecord>>;
    /// The member's state; empty for a member without entries.
    async fn account(&self, tenant_id: &str, member_id: &str) -> Result<Account>;
    /// The record kept under `key`.
    async fn record(&self, tenant_id: &str, member_id: &str, key: &str)
    -> Result<Option<OpRecord>>;
    /// A page of entries, newest first.
    async fn entries(&self, tenant_id: &str, member_id: &str, query: &EntryQuery) -> Result<Page>;
    /// Every member with ledger entries, a page at a time after `after` (tenant, member).
    async fn members(
        &self,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<(String, String)>>;
    /// Up to `limit` members with a lot expiry or hold timeout at or before `now`.
    async fn due(&self, now: Millis, limit: usize) -> Result<Vec<Due>>;
    /// Marks `due` handled (after the member's expiry ran).
    async fn done_due(&self, due: &Due) -> Result<()>;
    async fn ping(&self) -> Result<()>;
}

/// A commit handed to the ledger; it resolves to [`Ledger::commit`]'s answer.
pub type PendingCommit = std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool>> + Send>>;

/// The durable ledger under a hot-state backend: the source of truth it rebuilds from.
#[async_trait::async_trait]
pub trait Ledger: Send + Sync + std::fmt::Debug {
    /// Hands `change` to the ledger as [`Ledger::commit`] would, returning once commits
    /// submitted after it cannot overtake it; the returned future gives the answer.
    async fn submit(
        &self,
        tenant_id: &str,
        member_id: &str,
        expected: i64,
        change: &Change,
    ) -> Result<PendingCommit> {
        let answer = self.commit(tenant_id, member_id, expected, change).await;
        Ok(Box::pin(std::future::ready(answer)))
    }

    /// Durably writes `change` if the stored account's version is `expected` (0: none
    /// stored), its stamp is `change.prev_stamp` and no record is kept under `change.key`
    /// yet. Returns `false`, writing nothing, when not.
    async fn commit(
        &self,
        tenant_id: &str,
        member_id: &str,
        expected: i64,
        change: &Change,
    ) -> Result<bool>;
    /// The version of the member's stored state (0: none).
    async fn version(&self, tenant_id: &str, member_id: &str) -> Result<i64>;
    /// The durable record kept under `key`.
    async fn record(&self, tenant_id: &str, member_id: &str, key: &str)
    -> Result<Option<OpRecord>>;
    /// The member's stored state (empty when none), to rebuild hot state from.
    async fn load_account(&self, tenant_id: &str, member_id: &str) -> Result<Account>;
    /// Every member with state, a page at a time after `after` (tenant, member).
    async fn members(
        &self,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<(String, String)>>;
    async fn entries(&self, tenant_id: &str, member_id: &str, query: &EntryQuery) -> Result<Page>;
    async fn due(&self, now: Millis, limit: usize) -> Result<Vec<Due>>;
    async fn done_due(&self, due: &Due) -> Result<()>;
    async fn ping(&self) -> Result<()>;
}
