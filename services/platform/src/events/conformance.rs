//! The conformance suite every `EventLog` must pass.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use super::{Delivery, EventLog};

const NO_WAIT: Duration = Duration::from_millis(0);

fn payloads(range: std::ops::Range<u32>) -> Vec<Vec<u8>> {
    range.map(|i| format!("e{i}").into_bytes()).collect()
}

fn texts(d: &[Delivery]) -> Vec<String> {
    d.iter()
        .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
        .collect()
}

fn ids(d: &[Delivery]) -> Vec<String> {
    d.iter().map(|d| d.id.clone()).collect()
}

pub async fn run_all(log: &dyn EventLog) {
    delivers_in_order_once_per_group(log).await;
    groups_are_independent(log).await;
    unacknowledged_entries_are_claimed(log).await;
    read_waits_for_an_append(log).await;
    lag_counts_undelivered_and_pending(log).await;
    oversized_payloads_are_refused(log).await;
}

async fn delivers_in_order_once_per_group(log: &dyn EventLog) {
    log.create_group("s1", "g").await.unwrap();
    log.append("s1", &payloads(0..5)).await.unwrap();
    log.append("s1", &payloads(5..7)).await.unwrap();
    let a = log.read("s1", "g", "c1", 4, NO_WAIT).await.unwrap();
    assert_eq!(texts(&a), ["e0", "e1", "e2", "e3"]);
    let b = log.read("s1", "g", "c2", 10, NO_WAIT).await.unwrap();
    assert_eq!(texts(&b), ["e4", "e5", "e6"]);
    let mut all: Vec<String> = ids(&a);
    all.extend(ids(&b));
    let sorted: Vec<String> = {
        let mut s = all.clone();
        s.sort();
        s
    };
    assert_eq!(all, sorted, "ids are ordered");
    assert_eq!(
        all.iter().collect::<BTreeSet<_>>().len(),
        7,
        "ids are unique"
    );
    assert!(
        log.read("s1", "g", "c1", 10, NO_WAIT)
            .await
            .unwrap()
            .is_empty()
    );
    // Creating the group again changes nothing.
    log.create_group("s1", "g").await.unwrap();
    assert!(
        log.read("s1", "g", "c1", 10, NO_WAIT)
            .await
            .unwrap()
            .is_empty()
    );
    log.ack("s1", "g", &all).await.unwrap();
}

async fn groups_are_independent(log: &dyn EventLog) {
    log.append("s2", &payloads(0..3)).await.unwrap();
    // A group created after entries were appended still sees them.
    log.create_group("s2", "a").await.unwrap();
    log.create_group("s2", "b").await.unwrap();
    let a = log.read("s2", "a", "c", 10, NO_WAIT).await.unwrap();
    log.ack("s2", "a", &ids(&a)).await.unwrap();
    let b = log.read("s2", "b", "c", 10, NO_WAIT).await.unwrap();
    assert_eq!(texts(&a), texts(&b));
    assert_eq!(texts(&b), ["e0", "e1", "e2"]);
    log.ack("s2", "b", &ids(&b)).await.unwrap();
    // Acknowledged by both: new entries still flow.
    log.append("s2", &payloads(3..4)).await.unwrap();
    assert_eq!(
        texts(&log.read("s2", "a", "c", 10, NO_WAIT).await.unwrap()),
        ["e3"]
    );
}

async fn unacknowledged_entries_are_claimed(log: &dyn EventLog) {
    log.create_group("s3", "g").await.unwrap();
    log.append("s3", &payloads(0..4)).await.unwrap();
    let got = log.read("s3", "g", "dead", 10, NO_WAIT).await.unwrap();
    assert_eq!(got.len(), 4);
    // The consumer acknowledges half, then dies.
    log.ack("s3", "g", &ids(&got[..2])).await.unwrap();
    // Not idle long enough yet.
    let early = log
        .claim("s3", "g", "live", Duration::from_secs(60), 10)
        .await
        .unwrap();
    assert!(early.is_empty(), "{early:?}");
    tokio::time::sleep(Duration::from_millis(30)).await;
    let claimed = log
        .claim("s3", "g", "live", Duration::from_millis(20), 10)
        .await
        .unwrap();
    assert_eq!(texts(&claimed), ["e2", "e3"]);
    assert_eq!(
        ids(&claimed),
        ids(&got[2..]),
        "a claimed entry keeps its id"
    );
    log.ack("s3", "g", &ids(&claimed)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(
        log.claim("s3", "g", "live", Duration::from_millis(20), 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Acknowledging again is harmless.
    log.ack("s3", "g", &ids(&claimed)).await.unwrap();
}

async fn read_waits_for_an_append(log: &dyn EventLog) {
    log.create_group("s4", "g").await.unwrap();
    let started = std::time::Instant::now();
    let none = log
        .read("s4", "g", "c", 10, Duration::from_millis(100))
        .await
        .unwrap();
    assert!(none.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(90), "waited");
    let (got, ()) = tokio::join!(
        log.read("s4", "g", "c", 10, Duration::from_secs(4)),
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            log.append("s4", &payloads(0..1)).await.unwrap();
        }
    );
    assert_eq!(texts(&got.unwrap()), ["e0"]);
}

async fn lag_counts_undelivered_and_pending(log: &dyn EventLog) {
    log.create_group("s5", "g").await.unwrap();
    log.append("s5", &payloads(0..5)).await.unwrap();
    let lag = log.lag("s5", "g").await.unwrap();
    assert_eq!((lag.undelivered, lag.pending), (5, 0));
    let got = log.read("s5", "g", "c", 3, NO_WAIT).await.unwrap();
    let lag = log.lag("s5", "g").await.unwrap();
    assert_eq!((lag.undelivered, lag.pending), (2, 3));
    log.ack("s5", "g", &ids(&got)).await.unwrap();
    let lag = log.lag("s5", "g").await.unwrap();
    assert_eq!((lag.undelivered, lag.pending), (2, 0));
    assert!(log.lag("s5", "missing").await.is_err());
}

async fn oversized_payloads_are_refused(log: &dyn EventLog) {
    log.create_group("s6", "g").await.unwrap();
    let big = vec![0u8; super::MAX_PAYLOAD_BYTES + 1];
    assert!(log.append("s6", &[b"ok".to_vec(), big]).await.is_err());
    // Nothing of the refused batch was written.
    assert!(
        log.read("s6", "g", "c", 10, NO_WAIT)
            .await
            .unwrap()
            .is_empty()
    );
}

#[cfg(test)]
mod tests {
    use crate::events::EmbeddedEventLog;
    use crate::events::redis::RedisEventLog;
    use crate::redis_server::RedisServer;

    #[tokio::test]
    async fn embedded() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedEventLog::open(&dir.path().join("events.redb")).unwrap();
        super::run_all(&log).await;
    }

    #[tokio::test]
    async fn embedded_survives_a_reopen() {
        use crate::events::EventLog;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.redb");
        {
            let log = EmbeddedEventLog::open(&path).unwrap();
            log.create_group("s", "g").await.unwrap();
            log.append("s", &super::payloads(0..3)).await.unwrap();
            let got = log.read("s", "g", "c", 1, super::NO_WAIT).await.unwrap();
            assert_eq!(super::texts(&got), ["e0"]);
        }
        // Give the writer thread of the first handle time to let go of the file.
        let log = loop {
            match EmbeddedEventLog::open(&path) {
                Ok(log) => break log,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        };
        // Delivery marks may or may not have reached the disk: what was not acknowledged is
        // delivered again, by a read or a claim, and nothing is lost or invented.
        let mut got = super::texts(&log.read("s", "g", "c", 10, super::NO_WAIT).await.unwrap());
        got.extend(super::texts(
            &log.claim("s", "g", "c2", std::time::Duration::ZERO, 10)
                .await
                .unwrap(),
        ));
        got.sort();
        got.dedup();
        assert_eq!(got, ["e0", "e1", "e2"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_streams_on_a_cluster() {
        let nodes = RedisServer::start_cluster(3).unwrap();
        let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
        let log = RedisEventLog::connect_cluster(&urls).unwrap();
        super::run_all(&log).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_streams() {
        let server = RedisServer::start().unwrap();
        let log = RedisEventLog::connect(&server.url()).unwrap();
        super::run_all(&log).await;
    }

    /// An entry someone else added without our payload field is skipped and acknowledged,
    /// not left pending to be claimed again for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_entries_without_a_payload_are_acknowledged_unread() {
        use crate::events::EventLog;
        let server = RedisServer::start().unwrap();
        let log = RedisEventLog::connect(&server.url()).unwrap();
        log.create_group("s", "g").await.unwrap();
        let client = redis::Client::open(server.url()).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let _: String = redis::cmd("XADD")
            .arg("ev:{s}")
            .arg("*")
            .arg("other")
            .arg("x")
            .query_async(&mut con)
            .await
            .unwrap();
        log.append("s", &super::payloads(0..1)).await.unwrap();
        let got = log.read("s", "g", "c", 10, super::NO_WAIT).await.unwrap();
        assert_eq!(super::texts(&got), ["e0"]);
        let ids: Vec<String> = got.iter().map(|d| d.id.clone()).collect();
        log.ack("s", "g", &ids).await.unwrap();
        let lag = log.lag("s", "g").await.unwrap();
        assert_eq!((lag.undelivered, lag.pending), (0, 0));
    }
}
