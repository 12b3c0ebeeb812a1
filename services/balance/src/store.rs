//! The balance service's narrow storage trait: apply one operation to one member
//! atomically and durably, read state back. Every backend passes [`conformance`].

use loyalty_platform::clock::Millis;
use loyalty_platform::error::Result;

use crate::ledger::{Account, Entry, Op, OpRecord};

pub mod conformance;
pub mod embedded;

#[async_trait::async_trait]
pub trait BalanceStore: Send + Sync + std::fmt::Debug {
    /// Applies `op` under idempotency key `key` with [`crate::ledger::apply`], atomically:
    /// the entry, the new state and the record are durable before this returns. A retry with
    /// the same key and operation returns the stored record; the same key with another
    /// operation or member is `AlreadyExists`.
    async fn execute(
        &self,
        tenant_id: &str,
        member_id: &str,
        key: &str,
        op: Op,
        now: Millis,
    ) -> Result<OpRecord>;
    /// The member's state; empty for a member without entries.
    async fn account(&self, tenant_id: &str, member_id: &str) -> Result<Account>;
    /// Entries newest first, with sequence numbers below `before_seq` when given.
    async fn entries(
        &self,
        tenant_id: &str,
        member_id: &str,
        before_seq: Option<i64>,
        limit: usize,
    ) -> Result<Vec<Entry>>;
    async fn ping(&self) -> Result<()>;
}
