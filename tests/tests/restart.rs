//! Durability: stop the binary, start it on the same data dir, everything is there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loyalty_e2e::*;

#[tokio::test]
async fn balances_and_history_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    setup_tenant(&channel, "t1").await;
    let mut pos = Pos::new(&channel, &channel);
    let (member_id, receipt_id) = skeleton_flow(&mut pos, "t1").await;
    let before = pos.balance("t1", &member_id).await;
    let purchase_before = pos
        .checkout
        .get_purchase(promotion::GetPurchaseRequest {
            tenant_id: "t1".into(),
            receipt_id: receipt_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(server.stop().await, 0, "graceful stop exits 0");

    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    let mut pos = Pos::new(&channel, &channel);
    assert_eq!(pos.balance("t1", &member_id).await, before);
    let purchase_after = pos
        .checkout
        .get_purchase(promotion::GetPurchaseRequest {
            tenant_id: "t1".into(),
            receipt_id: receipt_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(purchase_after, purchase_before);
    let ledger = pos
        .balance
        .list_ledger_entries(balance::ListLedgerEntriesRequest {
            tenant_id: "t1".into(),
            member_id: member_id.clone(),
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let amounts: Vec<i64> = ledger.entries.iter().map(|e| e.amount).collect();
    assert_eq!(
        amounts,
        [-1500, 3000],
        "newest first: the refund reversal, then the accrual"
    );

    // Retrying the old commit after the restart still accrues nothing new.
    let r = receipt(
        "t1",
        &receipt_id,
        None,
        vec![
            line("1", "boots", "2", "1500.00", false),
            line("2", "socks", "1", "500.00", true),
        ],
    );
    let err = pos.commit(r).await.unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::AlreadyExists,
        "different identification, same id"
    );
    assert_eq!(pos.balance("t1", &member_id).await, before);
    assert_eq!(server.stop().await, 0);
}

#[tokio::test]
async fn a_killed_process_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    setup_tenant(&channel, "t1").await;
    let mut pos = Pos::new(&channel, &channel);
    let (member_id, card) = pos.member_with_card("t1", "+77011112233").await;
    for i in 0..20 {
        let r = receipt(
            "t1",
            &format!("K-{i}"),
            Some(&card),
            vec![line("1", "boots", "1", "100.00", false)],
        );
        pos.commit(r).await.unwrap();
    }
    // No graceful shutdown: SIGKILL right after the last acknowledgement.
    server.child.start_kill().unwrap();
    server.child.wait().await.unwrap();

    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    let mut pos = Pos::new(&channel, &channel);
    let b = pos.balance("t1", &member_id).await;
    assert_eq!((b.active, b.ledger_sequence), (20 * 100, 20));
    assert_eq!(server.stop().await, 0);
}
