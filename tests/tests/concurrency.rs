//! Checkout under concurrency, through the real binary: points are never overdrawn, and
//! simultaneous retries of one receipt apply it exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loyalty_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_paying_with_points_never_overdraw() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    setup_tenant(&channel, "t1").await;
    let mut pos = Pos::new(&channel, &channel);
    let (member, card) = pos.member_with_card("t1", "+77016667788").await;
    // 100 points to spend.
    pos.commit(receipt(
        "t1",
        "seed",
        Some(&card),
        vec![line("1", "boots", "1", "10000.00", false)],
    ))
    .await
    .unwrap();
    assert_eq!(pos.balance("t1", &member).await.active, 10_000);

    // 200 tills each try to pay 10 points (the 20% cap allows it) on a 50.00 receipt.
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut pos = pos.clone();
        let card = card.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = receipt(
                "t1",
                &format!("C-{i}"),
                Some(&card),
                vec![line("1", "socks", "1", "50.00", false)],
            );
            r.points_to_redeem = 1_000;
            pos.commit(r).await
        }));
    }
    let mut redeemed = 0;
    let mut accrued = 0;
    for t in tasks {
        let reply = t
            .await
            .unwrap()
            .expect("a commit never fails for lack of points: it redeems what is left");
        let e = reply.evaluation.unwrap();
        assert!(e.points_redeemed == 0 || e.points_redeemed <= 1_000);
        redeemed += e.points_redeemed;
        accrued += e.points_accrued;
    }
    assert!(
        redeemed <= 10_000 + accrued,
        "redeemed {redeemed} of 10000 (+{accrued} accrued meanwhile)"
    );
    let balance = pos.balance("t1", &member).await;
    assert!(balance.active >= 0);
    assert_eq!(
        balance.active,
        10_000 - redeemed + accrued,
        "the balance is exactly what the replies say"
    );

    // And the ledger agrees: the sum of all entries is the balance.
    let total: i64 = all_ledger_entries(&mut pos.balance, "t1", &member)
        .await
        .iter()
        .map(|e| e.amount)
        .sum();
    assert_eq!(total, balance.active);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_retries_of_one_receipt_apply_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    setup_tenant(&channel, "t1").await;
    let mut pos = Pos::new(&channel, &channel);
    let (member, card) = pos.member_with_card("t1", "+77017778899").await;
    let r = receipt(
        "t1",
        "SAME",
        Some(&card),
        vec![line("1", "boots", "3", "1000.00", false)],
    );
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut pos = pos.clone();
        let r = r.clone();
        tasks.push(tokio::spawn(async move { pos.commit(r).await }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(reply) => replies.push(reply),
            // A retry that lost every race may be told to retry, never given a different answer.
            Err(s) => assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}"),
        }
    }
    assert!(!replies.is_empty());
    assert!(
        replies.windows(2).all(|w| w[0] == w[1]),
        "every retry gets the same answer"
    );
    let b = pos.balance("t1", &member).await;
    assert_eq!(
        (b.active, b.ledger_sequence),
        (3_000, 1),
        "accrued exactly once"
    );
    server.stop().await;
}
