//! The consumer loop every service runs over the event log: claim what a dead consumer
//! left pending, else read new entries; handle the batch; acknowledge it only after the
//! handler's effect is durable. Stopping at any point is safe: a batch cut short is
//! delivered again, and every handler deduplicates.

use std::future::Future;
use std::time::Duration;

use tracing::Instrument;

use super::{Delivery, SharedEventLog};
use crate::error::Result;
use crate::telemetry::work_span;

/// Entries pending this long are taken over from their consumer.
pub const CLAIM_IDLE: Duration = Duration::from_secs(30);
/// Most entries one batch carries.
pub const BATCH: usize = 500;
/// Pause after a batch that was not full.
const GATHER: Duration = Duration::from_millis(25);

/// Where a consumer reads: a stream, its group, and the name of this consumer.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub stream: &'static str,
    pub group: &'static str,
    pub consumer: String,
    /// The name of the span each batch runs in.
    pub span: &'static str,
}

/// Consumes for as long as the process runs, retrying with back-off after errors.
pub async fn consume<F, Fut>(log: SharedEventLog, sub: Subscription, handle: F)
where
    F: Fn(Vec<Delivery>) -> Fut + Send + Sync,
    Fut: Future<Output = Result<()>> + Send,
{
    let mut backoff = Duration::from_millis(100);
    let mut group_ready = false;
    loop {
        if !group_ready {
            // Once per start and after an error (the stream may have been deleted), not per
            // step: on the embedded log it is a durable write.
            group_ready = log.create_group(sub.stream, sub.group).await.is_ok();
        }
        match step(&log, &sub, &handle).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(err) => {
                group_ready = false;
                tracing::warn!(error = %err, stream = sub.stream, group = sub.group, "event consumer step failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn step<F, Fut>(log: &SharedEventLog, sub: &Subscription, handle: &F) -> Result<()>
where
    F: Fn(Vec<Delivery>) -> Fut + Send + Sync,
    Fut: Future<Output = Result<()>> + Send,
{
    let (stream, group) = (sub.stream, sub.group);
    let mut batch = log
        .claim(stream, group, &sub.consumer, CLAIM_IDLE, BATCH)
        .await?;
    if batch.is_empty() {
        batch = log
            .read(stream, group, &sub.consumer, BATCH, Duration::from_secs(1))
            .await?;
    }
    if batch.is_empty() {
        return Ok(());
    }
    let full = batch.len() >= BATCH;
    let ids: Vec<String> = batch.iter().map(|d| d.id.clone()).collect();
    // One trace per batch, with the store's spans under it.
    handle(batch).instrument(work_span(sub.span)).await?;
    log.ack(stream, group, &ids).await?;
    if !full {
        // Let events gather: a few larger batches cost the disk far less than many small
        // ones, for a few milliseconds of delay.
        tokio::time::sleep(GATHER).await;
    }
    if let Ok(lag) = log.lag(stream, group).await {
        metrics::gauge!("loyalty_event_stream_lag", "stream" => stream, "group" => group)
            .set(lag.undelivered as f64 + lag.pending as f64);
    }
    Ok(())
}
