//! The event stream between services: producers append, consumer groups read.
//!
//! Delivery is at least once. An entry read by a group stays *pending* for the consumer that
//! read it until that consumer acknowledges it, which it does only after the entry's effect
//! is durable; entries pending longer than a given idle time (their consumer died) are
//! claimed by another consumer and delivered again. Consumers therefore see an entry more
//! than once after a failure, and every consumer deduplicates by the event's own id.
//!
//! Two implementations: [`EmbeddedEventLog`] (a redb file, dev mode) and
//! [`redis::RedisEventLog`] (Redis Streams with consumer groups, microservices mode). Both
//! pass `tests/conformance`.

#[cfg(test)]
mod conformance;
pub mod consume;
pub mod embedded;
pub mod redis;
pub mod traced;

use std::time::Duration;

use crate::error::Result;

pub use embedded::EmbeddedEventLog;

/// The stream purchase and refund events go to (promotion produces them).
pub const PURCHASES: &str = "purchases";
/// The stream member events go to (identity produces them).
pub const MEMBERS: &str = "members";
/// The stream ledger entries go to (balance produces them).
pub const LEDGER: &str = "ledger";

/// The stream audit records go to (the access layer of every process produces them).
pub const AUDIT: &str = "audit";

/// Longest payload accepted by `append`.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
/// Most entries one `read` or `claim` returns.
pub const MAX_READ: usize = 1000;

/// One entry as a consumer gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The entry's id within its stream: ordered, assigned by the log.
    pub id: String,
    pub payload: Vec<u8>,
}

/// How far a group is behind its stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lag {
    /// Entries not yet delivered to the group.
    pub undelivered: u64,
    /// Entries delivered and not yet acknowledged.
    pub pending: u64,
}

#[async_trait::async_trait]
pub trait EventLog: Send + Sync + std::fmt::Debug {
    /// Appends payloads in order; durable (in the log's terms) when it returns.
    async fn append(&self, stream: &str, payloads: &[Vec<u8>]) -> Result<()>;

    /// Creates the group if it does not exist yet, positioned at the start of the stream so
    /// it sees every retained entry.
    async fn create_group(&self, stream: &str, group: &str) -> Result<()>;

    /// Entries the group has not delivered yet, at most `max`, marked pending for `consumer`.
    /// Waits up to `wait` for one to arrive when there is none.
    async fn read(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>>;

    /// Acknowledges entries: they are never delivered to the group again.
    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<()>;

    /// Takes over entries pending for longer than `min_idle` (whatever consumer had them) and
    /// delivers them to `consumer`, at most `max`.
    async fn claim(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        max: usize,
    ) -> Result<Vec<Delivery>>;

    async fn lag(&self, stream: &str, group: &str) -> Result<Lag>;

    /// Answers when the log is reachable, for health.
    async fn ping(&self) -> Result<()>;
}

/// Shared handle to the event log a process uses.
pub type SharedEventLog = std::sync::Arc<dyn EventLog>;

fn check_payloads(payloads: &[Vec<u8>]) -> Result<()> {
    if let Some(p) = payloads.iter().find(|p| p.len() > MAX_PAYLOAD_BYTES) {
        return Err(crate::error::Error::invalid(
            "event",
            format!(
                "an event of {} bytes exceeds the limit of {MAX_PAYLOAD_BYTES}",
                p.len()
            ),
        ));
    }
    Ok(())
}
