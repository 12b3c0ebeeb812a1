//! The walking skeleton through the real binary in dev mode.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loyalty_e2e::*;

#[tokio::test]
async fn checkout_skeleton_in_dev_mode() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    setup_tenant(&channel, "t1").await;
    let mut pos = Pos::new(&channel, &channel);
    skeleton_flow(&mut pos, "t1").await;

    // Paying with points: at most 20% of the receipt, and the rest accrues 1%.
    let (member, card) = pos.member_with_card("t1", "+77017770000").await;
    let seed = receipt(
        "t1",
        "R-seed",
        Some(&card),
        vec![line("1", "boots", "1", "100000.00", false)],
    );
    pos.commit(seed).await.unwrap();
    assert_eq!(
        pos.balance("t1", &member).await.active,
        100_000,
        "1000 points"
    );
    let mut pay = receipt(
        "t1",
        "R-pay",
        Some(&card),
        vec![line("1", "boots", "1", "1000.00", false)],
    );
    pay.points_to_redeem = 100_000;
    let c = pos.commit(pay).await.unwrap();
    let e = c.evaluation.unwrap();
    assert_eq!(e.points_redeemed, 20_000, "20% of 1000 is 200 points");
    assert_eq!(e.amount_due.unwrap().value, "800.00");
    assert_eq!(e.points_accrued, 800);
    assert_eq!(c.points_balance, 100_000 - 20_000 + 800);

    // Points expire at the end of a day, so the day's accruals share one expiry (and one
    // lot): the next expiry is the whole balance.
    let entries = all_ledger_entries(&mut pos.balance, "t1", &member).await;
    let expiries: Vec<i64> = entries
        .iter()
        .filter_map(|e| Some(e.expire_time?.seconds))
        .collect();
    assert_eq!(expiries.len(), 2, "{entries:?}");
    assert!(expiries.iter().all(|s| s % 86_400 == 0), "{expiries:?}");
    let b = pos.balance("t1", &member).await;
    let next = b.next_expiry.unwrap();
    if expiries[0] == expiries[1] {
        assert_eq!(next.amount, b.active);
    } else {
        // The two commits straddled midnight UTC.
        assert_eq!((expiries[0] - expiries[1]).abs(), 86_400);
    }

    // Refunding it all gives the redeemed points back and takes the accrual away.
    let r = pos
        .refund("t1", "R-pay", "F-all", &[("1", "1")])
        .await
        .unwrap();
    assert_eq!((r.points_reversed, r.points_returned), (800, 20_000));
    assert_eq!(pos.balance("t1", &member).await.active, 100_000);
    assert_eq!(server.stop().await, 0);
}

#[tokio::test]
async fn demo_tenant_answers_at_once_and_walkthrough_runs() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev().arg("--demo"), dir.path()).await;
    let out = command(&["walkthrough".into(), "--addr".into(), server.url()], &[])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "walkthrough failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("8. balance"), "{text}");

    let channel = server.channel().await;
    let mut pos = Pos::new(&channel, &channel);
    let member = pos
        .members
        .lookup_member(identity::LookupMemberRequest {
            tenant_id: "demo".into(),
            key: Some(identity::lookup_member_request::Key::CardNumber(
                "1000000001".into(),
            )),
            default_region: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap();
    assert_eq!(pos.balance("demo", &member.member_id).await.active, 50_000);
    assert_eq!(server.stop().await, 0);
}
