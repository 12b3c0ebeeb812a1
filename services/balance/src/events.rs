//! What balance tells other services: every ledger entry, once it is durable. Published
//! before the caller gets its answer, so a caller that never got one retries, and the
//! retry (answered from the stored record) publishes again; the expiry process publishes
//! an expiry again when it finds one it made before a crash. A stream that refuses an event
//! gets it again in the background rather than failing a change that was made: the one
//! gap is a process that dies while an event waits for the stream to come back. Consumers
//! deduplicate by member and sequence number.

use loyalty_platform::error::Result;

use crate::ledger::Entry;

/// One entry, with whose ledger it is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEvent {
    pub tenant_id: String,
    pub member_id: String,
    pub entry: Entry,
}

/// Where entries go. The wiring plugs in the event log, or nothing.
#[async_trait::async_trait]
pub trait LedgerEvents: Send + Sync + std::fmt::Debug {
    async fn appended(&self, event: LedgerEvent) -> Result<()>;
}

/// Publishes nothing (a process whose entries no one consumes, and unit tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoLedgerEvents;

#[async_trait::async_trait]
impl LedgerEvents for NoLedgerEvents {
    async fn appended(&self, _: LedgerEvent) -> Result<()> {
        Ok(())
    }
}
