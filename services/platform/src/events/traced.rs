//! Wraps an [`EventLog`] so an append (made inside a request: a commit, a registration) runs
//! in a storage span, and every call is counted in `loyalty_storage_duration_seconds`. The
//! consumer's reads, claims and acknowledgements get no span of their own: they run in the
//! background, where each would start a trace of its own once a second.

use std::time::{Duration, Instant};

use super::{Delivery, EventLog, Lag, SharedEventLog};
use crate::error::Result;
use crate::telemetry::{in_db_span, record_storage_duration};

#[derive(Debug)]
pub struct Traced {
    system: &'static str,
    inner: SharedEventLog,
}

impl Traced {
    pub fn new(system: &'static str, inner: SharedEventLog) -> Self {
        Self { system, inner }
    }
}

#[async_trait::async_trait]
impl EventLog for Traced {
    async fn append(&self, stream: &str, payloads: &[Vec<u8>]) -> Result<()> {
        in_db_span(
            self.system,
            "events.append",
            self.inner.append(stream, payloads),
        )
        .await
    }

    async fn create_group(&self, stream: &str, group: &str) -> Result<()> {
        let start = Instant::now();
        let out = self.inner.create_group(stream, group).await;
        record_storage_duration(self.system, "events.create_group", start);
        out
    }

    async fn read(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>> {
        // Not timed: it waits for events on purpose.
        self.inner.read(stream, group, consumer, max, wait).await
    }

    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<()> {
        let start = Instant::now();
        let out = self.inner.ack(stream, group, ids).await;
        record_storage_duration(self.system, "events.ack", start);
        out
    }

    async fn claim(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        max: usize,
    ) -> Result<Vec<Delivery>> {
        let start = Instant::now();
        let out = self
            .inner
            .claim(stream, group, consumer, min_idle, max)
            .await;
        record_storage_duration(self.system, "events.claim", start);
        out
    }

    async fn lag(&self, stream: &str, group: &str) -> Result<Lag> {
        self.inner.lag(stream, group).await
    }

    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }
}
