//! The balance service through the real binary and its gRPC API, on embedded storage
//! (`dev`) and on Redis hot state over the durable ledger (`serve --service balance` with
//! `storage.backend = "redis"` and a redis-server the test starts on loopback).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use loyalty_e2e::*;
use loyalty_platform::redis_server::RedisServer;
use loyalty_proto::common::v1 as common;
use tonic::Code;
use tonic::transport::Channel;

use balance::balance_service_client::BalanceServiceClient;

type Client = BalanceServiceClient<Channel>;

fn now_plus(ms: i64) -> prost_types::Timestamp {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + ms;
    prost_types::Timestamp {
        seconds: now.div_euclid(1000),
        nanos: (now.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn accrue(member: &str, key: &str, amount: i64) -> balance::AccrueRequest {
    balance::AccrueRequest {
        tenant_id: "t".into(),
        member_id: member.into(),
        idempotency_key: key.into(),
        amount,
        ..Default::default()
    }
}

fn redeem(member: &str, key: &str, amount: i64) -> balance::RedeemRequest {
    balance::RedeemRequest {
        tenant_id: "t".into(),
        member_id: member.into(),
        idempotency_key: key.into(),
        amount,
        ..Default::default()
    }
}

async fn get(c: &mut Client, member: &str) -> balance::Balance {
    c.get_balance(balance::GetBalanceRequest {
        tenant_id: "t".into(),
        member_id: member.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .balance
    .unwrap()
}

async fn entries(c: &mut Client, member: &str) -> Vec<balance::LedgerEntry> {
    all_ledger_entries(c, "t", member).await
}

/// Runs every balance behaviour against `channel`. `bulk_members` are 300 member ids for
/// the bulk accrual; with `identity_checks`, identity runs too and a made-up id is reported
/// unknown.
async fn balance_behaviour(channel: Channel, bulk_members: Vec<String>, identity_checks: bool) {
    let mut c = BalanceServiceClient::new(channel);

    // Pending points, then early activation of one accrual.
    let mut later = accrue("m1", "a-later", 500);
    later.activate_time = Some(now_plus(3_600_000));
    c.accrue(later.clone()).await.unwrap();
    c.accrue(accrue("m1", "a-now", 1_000)).await.unwrap();
    let b = get(&mut c, "m1").await;
    assert_eq!((b.active, b.pending), (1_000, 500));
    let activated = c
        .activate_pending(balance::ActivatePendingRequest {
            tenant_id: "t".into(),
            member_id: "m1".into(),
            idempotency_key: "act-1".into(),
            accrual_idempotency_key: "a-later".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(activated.activated_amount, 500);
    assert_eq!(activated.balance.unwrap().active, 1_500);

    // Two-phase redemption: hold, partial confirm, the rest returns; resolved once.
    let hold = c
        .hold(balance::HoldRequest {
            tenant_id: "t".into(),
            member_id: "m1".into(),
            idempotency_key: "hold-1".into(),
            amount: 600,
            reference: "R-1".into(),
            timeout_seconds: 60,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hold.status(), balance::HoldStatus::Open);
    let b = hold.balance.unwrap();
    assert_eq!((b.active, b.held), (900, 600));
    let open = c
        .get_hold(balance::GetHoldRequest {
            tenant_id: "t".into(),
            hold_id: hold.hold_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (open.status(), open.amount, open.expire_time),
        (balance::HoldStatus::Open, 600, hold.expire_time)
    );
    let elsewhere = c
        .get_hold(balance::GetHoldRequest {
            tenant_id: "t2".into(),
            hold_id: hold.hold_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(elsewhere.code(), Code::NotFound, "another tenant's hold");
    let confirm = balance::ConfirmHoldRequest {
        tenant_id: "t".into(),
        hold_id: hold.hold_id.clone(),
        idempotency_key: "confirm-1".into(),
        amount: 400,
    };
    let confirmed = c.confirm_hold(confirm.clone()).await.unwrap().into_inner();
    assert_eq!(confirmed.entry.as_ref().unwrap().amount, -400);
    assert_eq!(confirmed.balance.as_ref().unwrap().active, 1_100);
    let replay = c.confirm_hold(confirm.clone()).await.unwrap().into_inner();
    assert_eq!(
        replay, confirmed,
        "a retried confirmation gets the stored reply"
    );
    let again = balance::ConfirmHoldRequest {
        idempotency_key: "confirm-2".into(),
        ..confirm.clone()
    };
    let err = c.confirm_hold(again).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = c
        .cancel_hold(balance::CancelHoldRequest {
            tenant_id: "t".into(),
            hold_id: hold.hold_id.clone(),
            idempotency_key: "cancel-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // A hold that times out releases itself; confirming it afterwards fails.
    let short = c
        .hold(balance::HoldRequest {
            tenant_id: "t".into(),
            member_id: "m1".into(),
            idempotency_key: "hold-2".into(),
            amount: 100,
            timeout_seconds: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(short.balance.unwrap().held, 100);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(get(&mut c, "m1").await.held, 0);
    let err = c
        .confirm_hold(balance::ConfirmHoldRequest {
            tenant_id: "t".into(),
            hold_id: short.hold_id.clone(),
            idempotency_key: "confirm-3".into(),
            amount: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // Each hold reads back as it ended; an id nobody issued is not found.
    let get_hold = |hold_id: &str| balance::GetHoldRequest {
        tenant_id: "t".into(),
        hold_id: hold_id.into(),
    };
    for (hold_id, status, amount) in [
        (&hold.hold_id, balance::HoldStatus::Confirmed, 600),
        (&short.hold_id, balance::HoldStatus::Expired, 100),
    ] {
        let read = c.get_hold(get_hold(hold_id)).await.unwrap().into_inner();
        assert_eq!(
            (read.member_id.as_str(), read.status(), read.amount),
            ("m1", status, amount)
        );
        assert!(read.expire_time.is_some());
    }
    let err = c.get_hold(get_hold("2:m1never-held")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = c.get_hold(get_hold("forged")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // An audited manual adjustment.
    let adjusted = c
        .adjust(balance::AdjustRequest {
            tenant_id: "t".into(),
            member_id: "m1".into(),
            idempotency_key: "adj-1".into(),
            amount: -100,
            actor: Some(common::Actor {
                id: "manager:anna".into(),
                comment: "duplicate receipt".into(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let e = adjusted.entry.unwrap();
    assert_eq!(e.reason(), balance::EntryReason::ManualAdjustment);
    assert_eq!(e.actor.unwrap().id, "manager:anna");

    // History: newest first, filterable by reason.
    let all = entries(&mut c, "m1").await;
    let seqs: Vec<i64> = all.iter().map(|e| e.sequence).collect();
    assert_eq!(seqs, (1..=all.len() as i64).rev().collect::<Vec<_>>());
    let b = get(&mut c, "m1").await;
    assert_eq!(
        all.iter().map(|e| e.amount).sum::<i64>(),
        b.active + b.pending + b.held
    );
    let redemptions = c
        .list_ledger_entries(balance::ListLedgerEntriesRequest {
            tenant_id: "t".into(),
            member_id: "m1".into(),
            reasons: vec![balance::EntryReason::Redemption as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(redemptions.entries.len(), 1);

    // Idempotency: a replay of an accrual returns the stored reply; another payload under
    // the same key is refused.
    let first = c.accrue(accrue("m2", "k", 70)).await.unwrap().into_inner();
    assert_eq!(
        c.accrue(accrue("m2", "k", 70)).await.unwrap().into_inner(),
        first
    );
    let err = c.accrue(accrue("m2", "k", 71)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    // Bad input: a clear error and nothing written.
    let before = get(&mut c, "m2").await;
    for bad in [0, -5] {
        let err = c.accrue(accrue("m2", "bad", bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        let err = c.redeem(redeem("m2", "bad", bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    let err = c
        .confirm_hold(balance::ConfirmHoldRequest {
            tenant_id: "t".into(),
            hold_id: "forged".into(),
            idempotency_key: "x".into(),
            amount: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = c
        .bulk_accrue(balance::BulkAccrueRequest {
            tenant_id: "t".into(),
            batch_id: "huge".into(),
            member_ids: (0..10_001).map(|i| format!("b{i}")).collect(),
            amount: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(get(&mut c, "m2").await, before);
    assert_eq!(get(&mut c, "b0").await.ledger_sequence, 0);

    // Bulk accrual: idempotent per member, resumable; unknown members are skipped.
    let bulk = |members: Vec<String>| balance::BulkAccrueRequest {
        tenant_id: "t".into(),
        batch_id: "birthday-2026".into(),
        member_ids: members,
        amount: 50,
        reason: balance::EntryReason::CampaignBonus as i32,
        ..Default::default()
    };
    let mut half: Vec<String> = bulk_members[..150].to_vec();
    half.push("ghost".into());
    let r = c.bulk_accrue(bulk(half)).await.unwrap().into_inner();
    if identity_checks {
        assert_eq!((r.accrued_count, r.already_done_count), (150, 0));
        assert_eq!(r.unknown_member_ids, ["ghost"]);
        assert_eq!(
            get(&mut c, "ghost").await.ledger_sequence,
            0,
            "nothing written"
        );
    } else {
        assert_eq!((r.accrued_count, r.already_done_count), (151, 0));
    }
    let r = c
        .bulk_accrue(bulk(bulk_members.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.accrued_count, r.already_done_count), (150, 150));
    assert_eq!(get(&mut c, &bulk_members[7]).await.active, 50);

    // Merge: every point moves to the survivor, the source is closed.
    let moved = c
        .transfer_member(balance::TransferMemberRequest {
            tenant_id: "t".into(),
            from_member_id: bulk_members[1].clone(),
            to_member_id: bulk_members[2].clone(),
            idempotency_key: "merge-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.transferred_amount, 50);
    assert_eq!(moved.balance.unwrap().active, 100);
    // The merged id resolves to the survivor: a late accrual lands there, once.
    let late = c
        .accrue(accrue(&bulk_members[1], "late", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(late.balance.unwrap().active, 101);
    c.accrue(accrue(&bulk_members[1], "late", 1)).await.unwrap();
    assert_eq!(get(&mut c, &bulk_members[2]).await.active, 101);
    assert_eq!(get(&mut c, &bulk_members[1]).await.active, 0);

    // The expiry process (every 200 ms in these tests) expires due lots.
    let mut expiring = accrue("x1", "soon", 300);
    expiring.expire_time = Some(now_plus(500));
    c.accrue(expiring).await.unwrap();
    c.redeem(redeem("x1", "spend", 120)).await.unwrap();
    // On Redis the hot balance shows the expiry while its ledger append is still on its way
    // (the expiry process is nobody's call to acknowledge), so wait for the ledger too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let b = get(&mut c, "x1").await;
        let x1 = entries(&mut c, "x1").await;
        if b.lifetime_expired > 0 && x1[0].reason() == balance::EntryReason::Expiry {
            assert_eq!(
                b.lifetime_expired, 180,
                "only the unspent remainder expires"
            );
            assert_eq!(x1[0].amount, -180);
            assert_eq!(x1[0].balance_after, b.active + b.pending + b.held);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing expired: {b:?} {x1:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 200 concurrent redemptions against one balance never overdraw it; every replay
    // returns the stored reply.
    c.accrue(accrue("c1", "seed", 1_000)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let r = redeem("c1", &format!("red-{i}"), 7);
            let first = c.redeem(r.clone()).await;
            let replay = c.redeem(r).await;
            (first, replay)
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        match t.await.unwrap() {
            (Ok(first), Ok(replay)) => {
                assert_eq!(first.into_inner(), replay.into_inner());
                accepted += 7;
            }
            (Err(e), _) => assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}"),
            (Ok(_), Err(e)) => panic!("a replay failed: {e:?}"),
        }
    }
    assert_eq!(accepted, 1_000 - 1_000 % 7);
    assert_eq!(get(&mut c, "c1").await.active, 1_000 % 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_api_on_embedded_storage() {
    let dir = tempfile::tempdir().unwrap();
    let launch = Launch::dev()
        .env("LOYALTY_BALANCE__EXPIRY_INTERVAL_MS", "200")
        .env("LOYALTY_SERVER__METRICS_LISTEN", "127.0.0.1:0");
    let server = Server::start(launch, dir.path()).await;
    let channel = server.channel().await;
    let mut members = identity::member_service_client::MemberServiceClient::new(channel.clone());
    let mut ids = Vec::new();
    for i in 0..300 {
        let m = members
            .register_member(identity::RegisterMemberRequest {
                tenant_id: "t".into(),
                phone: format!("+7701555{i:04}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .member
            .unwrap();
        ids.push(m.member_id);
    }
    balance_behaviour(channel, ids, true).await;
    let metrics = server.scrape_metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "loyalty_points_expired_total 180"),
        "expired points are counted once: {}",
        metrics
            .lines()
            .filter(|l| l.contains("expired"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(server.stop().await, 0);
}

fn redis_launch(redis: &RedisServer) -> Launch {
    Launch::serve("balance")
        .on_redis(&redis.url())
        .env("LOYALTY_BALANCE__EXPIRY_INTERVAL_MS", "200")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_api_on_redis() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(redis_launch(&redis), dir.path()).await;
    let ids = (0..300).map(|i| format!("b{i}")).collect();
    balance_behaviour(server.channel().await, ids, false).await;
    assert_eq!(server.stop().await, 0);
}

/// The member's idempotency records Redis holds (`HLEN` of the records hash).
fn hot_records(redis: &RedisServer, member: &str) -> i64 {
    let key = format!("lb:{{1:t{member}}}:o");
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port().to_string(), "hlen", &key])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// With `balance.hot_record_retention_secs = 3`, Redis drops a record three seconds after its
/// last change, and everything that needs one reads the ledger's: a retry gets the stored
/// reply, a reused key is refused, a refund finds its accrual and stays capped by it, a
/// hold is read and confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_past_the_retention_come_from_the_ledger() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let launch = redis_launch(&redis).env("LOYALTY_BALANCE__HOT_RECORD_RETENTION_SECS", "3");
    let server = Server::start(launch, dir.path()).await;
    let mut c = Client::new(server.channel().await);

    let accrued = c
        .accrue(accrue("old", "a", 1_000))
        .await
        .unwrap()
        .into_inner();
    let redeemed = c
        .redeem(redeem("old", "r", 300))
        .await
        .unwrap()
        .into_inner();
    let hold = c
        .hold(balance::HoldRequest {
            tenant_id: "t".into(),
            member_id: "old".into(),
            idempotency_key: "h".into(),
            amount: 100,
            reference: "till".into(),
            timeout_seconds: 600,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hot_records(&redis, "old"), 3);
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert_eq!(
        hot_records(&redis, "old"),
        0,
        "the retention without a change"
    );

    // Spend the rest, so that a retry of "r" decided again would be refused.
    c.redeem(redeem("old", "rest", 600)).await.unwrap();
    assert_eq!(hot_records(&redis, "old"), 1);
    assert_eq!(
        c.accrue(accrue("old", "a", 1_000))
            .await
            .unwrap()
            .into_inner(),
        accrued
    );
    assert_eq!(
        c.redeem(redeem("old", "r", 300))
            .await
            .unwrap()
            .into_inner(),
        redeemed
    );
    let reused = c.accrue(accrue("old", "a", 5)).await.unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists, "{reused:?}");
    let read = c
        .get_hold(balance::GetHoldRequest {
            tenant_id: "t".into(),
            hold_id: hold.hold_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (read.status(), read.amount),
        (balance::HoldStatus::Open, 100)
    );
    let confirmed = c
        .confirm_hold(balance::ConfirmHoldRequest {
            tenant_id: "t".into(),
            hold_id: hold.hold_id.clone(),
            idempotency_key: "h-confirm".into(),
            amount: 40,
        })
        .await
        .unwrap()
        .into_inner();
    let b = confirmed.balance.unwrap();
    assert_eq!((b.active, b.held), (60, 0));

    // A refund of the accrual, after its record left Redis again.
    c.accrue(accrue("old", "more", 2_000)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let reverse = |key: &str, amount| balance::ReverseRequest {
        tenant_id: "t".into(),
        member_id: "old".into(),
        idempotency_key: key.into(),
        original_idempotency_key: "a".into(),
        amount,
        reference: "refund".into(),
    };
    c.reverse(reverse("x1", 700)).await.unwrap();
    let over = c.reverse(reverse("x2", 301)).await.unwrap_err();
    assert_eq!(over.code(), Code::FailedPrecondition, "{over:?}");
    c.reverse(reverse("x3", 300)).await.unwrap();
    let b = get(&mut c, "old").await;
    assert_eq!((b.active, b.held), (2_060 - 1_000, 0));
    let ledger = entries(&mut c, "old").await;
    assert_eq!(ledger.len(), 7, "{ledger:?}");
    assert_eq!(ledger.iter().map(|e| e.amount).sum::<i64>(), 1_060);
    assert_eq!(server.stop().await, 0);
}

/// Under a running load of accruals and redemptions, Redis is killed with SIGKILL and
/// restarted empty. Afterwards every acknowledged operation is in the ledger, no refused
/// one is, and every balance Redis reports equals its ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_operations_survive_kill_9_of_redis() {
    let mut redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(redis_launch(&redis), dir.path()).await;
    let channel = server.channel().await;
    let members = 8;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..8 {
        let mut c = BalanceServiceClient::new(channel.clone());
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            // key -> (member, signed amount) of every acknowledged operation, and the keys
            // of every refused one.
            let mut acked: HashMap<String, (String, i64)> = HashMap::new();
            let mut refused: Vec<(String, String)> = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let member = format!("f{}", (w + i) % members);
                let key = format!("w{w}-{i}");
                if i % 3 == 2 {
                    let mut r = redeem(&member, &key, 40);
                    r.up_to_available = true;
                    match c.redeem(r).await {
                        Ok(reply) => {
                            let taken = reply.into_inner().entry.map_or(0, |e| e.amount);
                            acked.insert(key, (member, taken));
                        }
                        Err(_) => refused.push((member, key)),
                    }
                } else {
                    match c.accrue(accrue(&member, &key, 25)).await {
                        Ok(_) => {
                            acked.insert(key, (member, 25));
                        }
                        Err(_) => refused.push((member, key)),
                    }
                }
                i += 1;
            }
            (acked, refused)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart().unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = HashMap::new();
    let mut refused = Vec::new();
    for w in workers {
        let (a, r) = w.await.unwrap();
        acked.extend(a);
        refused.extend(r);
    }
    eprintln!(
        "fault test: {} operations acknowledged, {} refused around the kill",
        acked.len(),
        refused.len()
    );
    assert!(
        acked.len() > 100,
        "the load ran: {} acknowledged",
        acked.len()
    );
    assert!(!refused.is_empty(), "the kill interrupted some calls");

    let mut c = BalanceServiceClient::new(channel);
    for m in 0..members {
        let member = format!("f{m}");
        let ledger = entries(&mut c, &member).await;
        let by_key: HashMap<&str, i64> = ledger
            .iter()
            .map(|e| (e.idempotency_key.as_str(), e.amount))
            .collect();
        for (key, (owner, amount)) in &acked {
            if owner == &member && *amount != 0 {
                assert_eq!(
                    by_key.get(key.as_str()),
                    Some(amount),
                    "acknowledged {key} is in the ledger"
                );
            }
        }
        for (owner, key) in &refused {
            if owner == &member {
                assert!(
                    !by_key.contains_key(key.as_str()),
                    "refused {key} is not in the ledger"
                );
            }
        }
        let b = get(&mut c, &member).await;
        assert_eq!(
            b.active + b.pending + b.held,
            ledger.iter().map(|e| e.amount).sum::<i64>(),
            "{member}"
        );
        assert_eq!(b.ledger_sequence, ledger.len() as i64);
    }
    assert_eq!(server.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gift_certificates_issue_spend_refund_and_expire() {
    use balance::gift_certificate_service_client::GiftCertificateServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let mut c = GiftCertificateServiceClient::new(server.channel().await);
    let money = |v: &str| Some(common::Decimal { value: v.into() });
    let issue = balance::IssueCertificateRequest {
        tenant_id: "t".into(),
        idempotency_key: "issue-1".into(),
        value: money("5000.00"),
        ..Default::default()
    };
    let issued = c
        .issue_certificate(issue.clone())
        .await
        .unwrap()
        .into_inner();
    let cert = issued.certificate.clone().unwrap();
    assert_eq!(cert.code.len(), 16, "a code is generated");
    assert_eq!(cert.status(), balance::CertificateStatus::Active);
    let again = c.issue_certificate(issue).await.unwrap().into_inner();
    assert_eq!(
        again, issued,
        "a retried issue returns the same certificate"
    );

    let spend = |key: &str, amount: &str| balance::SpendCertificateRequest {
        tenant_id: "t".into(),
        code: cert.code.clone(),
        idempotency_key: key.into(),
        amount: money(amount),
        reference: "R-1".into(),
    };
    let refund = |key: &str, amount: &str| balance::RefundCertificateRequest {
        tenant_id: "t".into(),
        code: cert.code.clone(),
        idempotency_key: key.into(),
        amount: money(amount),
        reference: "R-1".into(),
    };
    let after = c
        .spend_certificate(spend("s1", "1200.50"))
        .await
        .unwrap()
        .into_inner();
    let remaining = |r: &Option<balance::Certificate>| {
        r.as_ref().unwrap().remaining_value.clone().unwrap().value
    };
    assert_eq!(remaining(&after.certificate), "3799.50");
    assert_eq!(
        c.spend_certificate(spend("s1", "1200.50"))
            .await
            .unwrap()
            .into_inner(),
        after
    );
    let err = c
        .spend_certificate(spend("s2", "3799.51"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = c
        .refund_certificate(refund("r1", "1200.51"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let back = c
        .refund_certificate(refund("r1", "200.50"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(remaining(&back.certificate), "4000.00");
    for bad in ["0", "-1", "1.234", "abc", ""] {
        let err = c.spend_certificate(spend("bad", bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
    }
    let got = c
        .get_certificate(balance::GetCertificateRequest {
            tenant_id: "t".into(),
            code: cert.code.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        remaining(&got.certificate),
        "4000.00",
        "bad input wrote nothing"
    );

    // A certificate past its expiry can no longer be spent.
    let short = c
        .issue_certificate(balance::IssueCertificateRequest {
            tenant_id: "t".into(),
            idempotency_key: "issue-2".into(),
            code: "GIFT-SHORT".into(),
            value: money("100"),
            expire_time: Some(now_plus(800)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(short.certificate.unwrap().code, "GIFT-SHORT");
    tokio::time::sleep(Duration::from_millis(900)).await;
    let mut late = spend("late", "10");
    late.code = "GIFT-SHORT".into();
    let err = c.spend_certificate(late).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let got = c
        .get_certificate(balance::GetCertificateRequest {
            tenant_id: "t".into(),
            code: "GIFT-SHORT".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.certificate.unwrap().status(),
        balance::CertificateStatus::Expired
    );
    let err = c
        .get_certificate(balance::GetCertificateRequest {
            tenant_id: "t".into(),
            code: "NOPE-1234".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(server.stop().await, 0);
}

/// Redis comes back with old data (a restore or a lagging failover): reads show the stale
/// balance until `serve --rebuild-balances` rebuilds every member from the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_balances_repairs_redis_restored_from_an_old_snapshot() {
    let mut redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(redis_launch(&redis), dir.path()).await;
    let mut c = BalanceServiceClient::new(server.channel().await);
    c.accrue(accrue("s1", "a1", 100)).await.unwrap();
    c.accrue(accrue("s2", "a1", 7)).await.unwrap();
    redis.save().unwrap();
    c.accrue(accrue("s1", "a2", 50)).await.unwrap();
    c.redeem(redeem("s2", "r1", 7)).await.unwrap();
    assert_eq!(server.stop().await, 0);
    redis.restart().unwrap();

    let server = Server::start(redis_launch(&redis), dir.path()).await;
    let mut c = BalanceServiceClient::new(server.channel().await);
    assert_eq!(
        get(&mut c, "s1").await.active,
        100,
        "the restored snapshot is stale"
    );
    assert_eq!(server.stop().await, 0);

    let server = Server::start(redis_launch(&redis).arg("--rebuild-balances"), dir.path()).await;
    let mut c = BalanceServiceClient::new(server.channel().await);
    let s1 = get(&mut c, "s1").await;
    assert_eq!((s1.active, s1.ledger_sequence), (150, 2));
    let s2 = get(&mut c, "s2").await;
    assert_eq!((s2.active, s2.ledger_sequence), (0, 2));
    // And the next operation builds on the ledger's state.
    let err = c.redeem(redeem("s2", "r2", 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(server.stop().await, 0);
}
