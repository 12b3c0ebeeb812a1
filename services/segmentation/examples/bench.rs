//! Segmentation throughput without gRPC: how fast purchase events are applied (features,
//! deduplication and membership upkeep, in the consumer's batches), and how long a full RFM
//! recompute takes; on the embedded store, or with `redis` on the Redis store (a throwaway
//! `redis-server` on loopback, its memory reported at the end).
//!
//! cargo run --release -p loyalty-segmentation --example bench -- [MEMBERS] [EVENTS] [redis]

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::sync::Arc;
use std::time::Instant;

use loyalty_platform::clock::{Clock, DAY_MS, SystemClock};
use loyalty_segmentation::Segmentation;
use loyalty_segmentation::features::PurchaseFacts;
use loyalty_segmentation::store::embedded::EmbeddedSegmentationStore;
use loyalty_segmentation::store::redis::RedisSegmentationStore;
use loyalty_segmentation::store::{
    Change, FeatureChange, SegmentDef, SegmentKind, SegmentationStore,
};
use rust_decimal::Decimal;

const BATCH: usize = 500;

fn event(i: u64, members: u64, now: i64) -> FeatureChange {
    // A deterministic scatter over members, days, stores and categories (splitmix64).
    let mut x = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    // Every member buys once first, then at random.
    let member = if i < members { i } else { x % members };
    let days = ((x >> 20) % 700) as i64;
    FeatureChange {
        tenant_id: "bench".into(),
        event_id: format!("purchase/bench/r{i}"),
        member_id: format!("m{member:08}"),
        change: Change::Purchase(PurchaseFacts {
            time: now - days * DAY_MS,
            store_id: format!("s{}", (x >> 30) % 50),
            paid: Decimal::new(((x >> 12) % 2_000_000) as i64, 2),
            lines: (0..((x >> 40) % 4 + 1))
                .map(|l| {
                    (
                        format!("c{}", (x >> (8 + l)) % 40),
                        format!("b{}", (x >> (16 + l)) % 25),
                        Decimal::new(((x >> 24) % 500_000) as i64, 2),
                    )
                })
                .collect(),
            points_balance: Some(((x >> 5) % 100_000) as i64),
            tier_id: Some(["", "silver", "gold"][(x % 3) as usize].to_string()),
        }),
    }
}

#[tokio::main]
async fn main() {
    let on_redis = std::env::args().any(|a| a == "redis");
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter(|a| a != "redis")
        .map(|a| a.parse().unwrap())
        .collect();
    let members = args.first().copied().unwrap_or(100_000);
    let events = args.get(1).copied().unwrap_or(members);
    let dir = tempfile::tempdir().unwrap();
    let server = on_redis.then(|| loyalty_platform::redis_server::RedisServer::start().unwrap());
    let store: Arc<dyn SegmentationStore> = match &server {
        Some(server) => Arc::new(RedisSegmentationStore::connect(&server.url()).unwrap()),
        None => Arc::new(
            EmbeddedSegmentationStore::open(&dir.path().join("segmentation.redb")).unwrap(),
        ),
    };
    let s = Segmentation::new(store, Arc::new(SystemClock));
    for (id, predicate) in [
        ("active-30d", "purchase_count_30d > 0"),
        ("regulars", "purchase_count_365d >= 3"),
        (
            "big",
            "spend_365d > 10000 and not (last_purchase < now - 90d)",
        ),
        (
            "boots-2y",
            "days_since(category_last(\"c7\")) between 300 and 400",
        ),
        ("mono", "only_brand(\"b3\")"),
    ] {
        s.create(SegmentDef {
            tenant_id: "bench".into(),
            segment_id: id.into(),
            name: id.into(),
            kind: SegmentKind::Dynamic,
            predicate: predicate.into(),
            version: 0,
            update_time: 0,
        })
        .await
        .unwrap();
    }
    let now = SystemClock.now_ms();
    let started = Instant::now();
    let mut i = 0;
    while i < events {
        let batch: Vec<FeatureChange> = (i..(i + BATCH as u64).min(events))
            .map(|k| event(k, members, now))
            .collect();
        i += batch.len() as u64;
        s.apply(batch).await.unwrap();
    }
    let took = started.elapsed().as_secs_f64();
    println!(
        "applied {events} purchase events over {members} members with 5 dynamic segments in {took:.1} s: {:.0} events/s (batches of {BATCH})",
        events as f64 / took
    );
    let started = Instant::now();
    let again: Vec<FeatureChange> = (0..BATCH as u64).map(|k| event(k, members, now)).collect();
    s.apply(again).await.unwrap();
    println!(
        "a redelivered batch of {BATCH}: {:.1} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    let started = Instant::now();
    let run = s.recompute_rfm("bench").await.unwrap();
    println!(
        "rfm recompute of {} members: {:.1} s",
        run.members,
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let changed = s.reevaluate_time_dependent().await.unwrap();
    println!(
        "scheduled re-evaluation of the time-relative segments: {:.1} s ({changed} memberships changed)",
        started.elapsed().as_secs_f64()
    );
    if let Some(server) = &server {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &server.port().to_string(), "info", "memory"])
            .output()
            .unwrap();
        let info = String::from_utf8_lossy(&out.stdout);
        let used: u64 = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory_dataset:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        println!(
            "redis data: {:.1} MB, {:.0} bytes per member",
            used as f64 / 1e6,
            used as f64 / members as f64
        );
    }
}
