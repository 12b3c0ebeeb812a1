//! The consumer loop every service runs over the event log: claim what a dead consumer
//! left pending, else read new entries; handle the batch; acknowledge it only after the
//! handler's effect is durable. Stopping at any point is safe: a batch cut short is
//! delivered again, and every handler deduplicates.
//!
//! A batch the handler refuses is handled again one entry at a time, so one bad entry holds
//! back none of the others. An entry that keeps failing alone while the handler succeeds
//! with others is set aside after [`MAX_FAILURES`] tries: appended to `<stream>.dead`,
//! acknowledged, logged at error level and counted (`loyalty_event_dead_letters_total`).
//! When every entry fails (the store is down), nothing is set aside.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::{Delivery, SharedEventLog};
use crate::error::{Error, Result};
use crate::telemetry::work_span;

/// Entries pending this long are taken over from their consumer.
pub const CLAIM_IDLE: Duration = Duration::from_secs(30);
/// Most entries one batch carries.
pub const BATCH: usize = 500;
/// Pause after a batch that was not full.
const GATHER: Duration = Duration::from_millis(25);
/// Tries of an entry that fails alone, while others succeed, before it is set aside.
pub const MAX_FAILURES: u32 = 5;
/// Most failing entries remembered; past it the counts start over.
const MAX_REMEMBERED: usize = 10_000;

/// What one consumer remembers of entries that failed alone.
#[derive(Debug)]
struct Failures {
    /// Entry id -> (times it failed alone with the handler working between, when it last
    /// failed).
    entries: HashMap<String, (u32, Instant)>,
    /// When the handler last succeeded with any entry.
    last_success: Option<Instant>,
}

impl Failures {
    fn new() -> Self {
        Self {
            entries: HashMap::new(),
            last_success: None,
        }
    }

    /// Counts a failure of `id` alone; whether it is to be set aside. A failure counts only
    /// when it is not the store's unavailability and the handler succeeded with another
    /// entry since this one last failed: an outage sets nothing aside.
    fn failed(&mut self, id: &str, err: &Error) -> bool {
        if matches!(err, Error::Unavailable(_)) {
            return false;
        }
        if self.entries.len() >= MAX_REMEMBERED && !self.entries.contains_key(id) {
            self.entries.clear();
        }
        let now = Instant::now();
        let worked = self.last_success;
        let (count, last) = self.entries.entry(id.to_string()).or_insert((0, now));
        if *count == 0 || worked.is_some_and(|t| t > *last) {
            *count += 1;
        }
        *last = now;
        *count >= MAX_FAILURES
    }

    fn succeeded(&mut self, ids: &[String]) {
        self.last_success = Some(Instant::now());
        for id in ids {
            self.entries.remove(id);
        }
    }
}

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
    let mut failures = Failures::new();
    loop {
        if !group_ready {
            // Once per start and after an error (the stream may have been deleted), not per
            // step: on the embedded log it is a durable write.
            group_ready = log.create_group(sub.stream, sub.group).await.is_ok();
        }
        match step(&log, &sub, &handle, &mut failures).await {
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

async fn step<F, Fut>(
    log: &SharedEventLog,
    sub: &Subscription,
    handle: &F,
    failures: &mut Failures,
) -> Result<()>
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
    if batch.len() == 1 {
        one_at_a_time(log, sub, handle, failures, batch).await?;
    } else {
        // One trace per batch, with the store's spans under it.
        match handle(batch.clone()).instrument(work_span(sub.span)).await {
            Ok(()) => {
                log.ack(stream, group, &ids).await?;
                failures.succeeded(&ids);
            }
            Err(err) => {
                tracing::warn!(error = %err, stream, group, entries = batch.len(), "a batch of events failed; handling its entries one at a time");
                one_at_a_time(log, sub, handle, failures, batch).await?;
            }
        }
    }
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

/// Handles each entry alone, acknowledging those that succeed and setting aside one that
/// keeps failing while others succeed. Fails (so the loop backs off) when none succeeded
/// or was set aside.
async fn one_at_a_time<F, Fut>(
    log: &SharedEventLog,
    sub: &Subscription,
    handle: &F,
    failures: &mut Failures,
    batch: Vec<Delivery>,
) -> Result<()>
where
    F: Fn(Vec<Delivery>) -> Fut + Send + Sync,
    Fut: Future<Output = Result<()>> + Send,
{
    let (stream, group) = (sub.stream, sub.group);
    let mut last_error = None;
    let mut moved_on = false;
    for delivery in batch {
        let id = delivery.id.clone();
        match handle(vec![delivery.clone()])
            .instrument(work_span(sub.span))
            .await
        {
            Ok(()) => {
                log.ack(stream, group, std::slice::from_ref(&id)).await?;
                failures.succeeded(std::slice::from_ref(&id));
                moved_on = true;
            }
            Err(err) if failures.failed(&id, &err) => {
                let dead = format!("{stream}.dead");
                log.append(&dead, std::slice::from_ref(&delivery.payload))
                    .await?;
                log.ack(stream, group, std::slice::from_ref(&id)).await?;
                failures.entries.remove(&id);
                metrics::counter!("loyalty_event_dead_letters_total", "stream" => stream, "group" => group)
                    .increment(1);
                tracing::error!(error = %err, stream, group, id = %id, dead_letters = %dead, "an event failed {MAX_FAILURES} times while others succeeded; set aside");
                moved_on = true;
            }
            // The store is away: the rest would fail the same way; back off.
            Err(err @ Error::Unavailable(_)) if !moved_on => return Err(err),
            Err(err) => {
                if last_error.is_none() {
                    tracing::warn!(error = %err, stream, group, id = %id, "an event failed; it stays pending");
                }
                last_error = Some(err);
            }
        }
    }
    match last_error {
        Some(err) if !moved_on => Err(err),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::events::embedded::EmbeddedEventLog;

    const STREAM: &str = "purchases";

    fn setup() -> (tempfile::TempDir, SharedEventLog, Subscription) {
        let dir = tempfile::tempdir().unwrap();
        let log: SharedEventLog =
            Arc::new(EmbeddedEventLog::open(&dir.path().join("events.redb")).unwrap());
        let sub = Subscription {
            stream: STREAM,
            group: "g",
            consumer: "c1".into(),
            span: "test.consume",
        };
        (dir, log, sub)
    }

    async fn append(log: &SharedEventLog, payloads: &[&str]) {
        let payloads: Vec<Vec<u8>> = payloads.iter().map(|p| p.as_bytes().to_vec()).collect();
        log.append(STREAM, &payloads).await.unwrap();
    }

    /// A handler that takes every entry but "bad" (and everything while `down`), keeping
    /// what it took.
    fn handler(
        taken: Arc<Mutex<Vec<String>>>,
        down: Arc<Mutex<bool>>,
    ) -> impl Fn(Vec<Delivery>) -> std::future::Ready<Result<()>> {
        move |batch: Vec<Delivery>| {
            let texts: Vec<String> = batch
                .iter()
                .map(|d| String::from_utf8(d.payload.clone()).unwrap())
                .collect();
            std::future::ready(if *down.lock().unwrap() {
                Err(Error::Unavailable("store away".into()))
            } else if texts.iter().any(|t| t == "bad") {
                Err(Error::internal(anyhow::anyhow!("cannot decode")))
            } else {
                taken.lock().unwrap().extend(texts);
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn one_bad_event_holds_back_none_of_the_others_and_is_set_aside_in_the_end() {
        let (_dir, log, sub) = setup();
        log.create_group(STREAM, "g").await.unwrap();
        let taken = Arc::new(Mutex::new(Vec::new()));
        let handle = handler(taken.clone(), Arc::new(Mutex::new(false)));
        let mut failures = Failures::new();
        append(&log, &["a", "bad", "b"]).await;
        step(&log, &sub, &handle, &mut failures).await.unwrap();
        assert_eq!(
            *taken.lock().unwrap(),
            ["a", "b"],
            "the others went through"
        );
        assert_eq!(log.lag(STREAM, "g").await.unwrap().pending, 1);
        let bad = log
            .claim(STREAM, "g", "c1", Duration::ZERO, 10)
            .await
            .unwrap();
        assert_eq!(bad.len(), 1);
        // Delivered again and again while other events go through: set aside at the fifth.
        for n in 2..=MAX_FAILURES {
            append(&log, &[&format!("ok{n}")]).await;
            step(&log, &sub, &handle, &mut failures).await.unwrap();
            one_at_a_time(&log, &sub, &handle, &mut failures, bad.clone())
                .await
                .ok();
            let pending = log.lag(STREAM, "g").await.unwrap().pending;
            assert_eq!(pending, u64::from(n < MAX_FAILURES), "after {n} failures");
        }
        log.create_group("purchases.dead", "ops").await.unwrap();
        let dead = log
            .read("purchases.dead", "ops", "me", 10, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].payload, b"bad");
    }

    #[tokio::test]
    async fn an_outage_sets_nothing_aside() {
        let (_dir, log, sub) = setup();
        log.create_group(STREAM, "g").await.unwrap();
        let taken = Arc::new(Mutex::new(Vec::new()));
        let down = Arc::new(Mutex::new(true));
        let handle = handler(taken.clone(), down.clone());
        let mut failures = Failures::new();
        append(&log, &["a", "b"]).await;
        assert!(step(&log, &sub, &handle, &mut failures).await.is_err());
        let pending = log
            .claim(STREAM, "g", "c1", Duration::ZERO, 10)
            .await
            .unwrap();
        for _ in 0..MAX_FAILURES * 2 {
            assert!(
                one_at_a_time(&log, &sub, &handle, &mut failures, pending.clone())
                    .await
                    .is_err()
            );
        }
        assert_eq!(log.lag(STREAM, "g").await.unwrap().pending, 2);
        *down.lock().unwrap() = false;
        one_at_a_time(&log, &sub, &handle, &mut failures, pending)
            .await
            .unwrap();
        assert_eq!(*taken.lock().unwrap(), ["a", "b"]);
        assert_eq!(log.lag(STREAM, "g").await.unwrap().pending, 0);
    }
}
