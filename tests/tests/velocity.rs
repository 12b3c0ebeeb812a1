//! Velocity limits through the real binary: a hard limit on a card's accruals per hour
//! refuses the receipt at quote and commit, exactly under concurrency; a soft limit on a
//! store's points per day lets receipts through and flags them; bad limits are refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loyalty_e2e::*;
use loyalty_proto::promotion::v1 as ppb;
use tonic::Code;

const T: &str = "t1";

fn limit(
    subject: ppb::VelocitySubject,
    action: ppb::VelocityAction,
    window: ppb::VelocityWindow,
    max_receipts: i64,
    max_points: i64,
    hard: bool,
) -> ppb::VelocityLimit {
    ppb::VelocityLimit {
        subject: subject as i32,
        action: action as i32,
        window: window as i32,
        max_receipts,
        max_points,
        hard,
    }
}

async fn set_limits(
    channel: &tonic::transport::Channel,
    limits: Vec<ppb::VelocityLimit>,
) -> Result<ppb::Program, tonic::Status> {
    let mut programs = ppb::program_service_client::ProgramServiceClient::new(channel.clone());
    let mut program = programs
        .get_program(ppb::GetProgramRequest {
            tenant_id: T.into(),
        })
        .await?
        .into_inner()
        .program
        .unwrap();
    program.velocity_limits = limits;
    programs
        .update_program(ppb::UpdateProgramRequest {
            program: Some(program),
            expected_version: 0,
            actor: None,
        })
        .await
        .map(|r| r.into_inner().program.unwrap())
}

fn boots(id: &str, card: Option<&str>) -> ppb::Receipt {
    let mut r = receipt(
        T,
        id,
        card,
        vec![line("1", "boots", "1", "10000.00", false)],
    );
    r.cashier_id = "cashier-7".into();
    r
}

#[tokio::test]
async fn hard_limits_refuse_and_soft_limits_flag() {
    use ppb::{VelocityAction as A, VelocitySubject as S, VelocityWindow as W};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        Launch::dev().env("LOYALTY_SERVER__METRICS_LISTEN", "127.0.0.1:0"),
        dir.path(),
    )
    .await;
    let channel = server.channel().await;
    setup_tenant(&channel, T).await;
    let mut pos = Pos::new(&channel, &channel);

    // Bad limits are refused with the field, and change nothing.
    let none = set_limits(
        &channel,
        vec![limit(S::Card, A::Accrual, W::Hour, 0, 0, true)],
    )
    .await
    .unwrap_err();
    assert_eq!(none.code(), Code::InvalidArgument);
    assert_eq!(violations(&none)[0].0, "program.velocity_limits[0]");
    let unspecified = set_limits(
        &channel,
        vec![limit(S::Unspecified, A::Accrual, W::Hour, 1, 0, true)],
    )
    .await
    .unwrap_err();
    assert_eq!(
        violations(&unspecified)[0].0,
        "program.velocity_limits[0].subject"
    );

    // Two accruing receipts per card per hour (hard); 150 points per store per day (soft):
    // each boots receipt accrues 100 points at 1%.
    let program = set_limits(
        &channel,
        vec![
            limit(S::Card, A::Accrual, W::Hour, 2, 0, true),
            limit(S::Store, A::Accrual, W::Day, 0, 15_000, false),
        ],
    )
    .await
    .unwrap();
    assert_eq!(program.velocity_limits.len(), 2);
    let (_, card) = pos.member_with_card(T, "+77017400001").await;
    let first = pos.commit(boots("V-1", Some(&card))).await.unwrap();
    let flags = &first.evaluation.as_ref().unwrap().velocity_flags;
    assert!(flags.is_empty(), "{flags:?}");
    let second = pos.commit(boots("V-2", Some(&card))).await.unwrap();
    let flags = &second.evaluation.as_ref().unwrap().velocity_flags;
    assert_eq!(flags.len(), 1, "the store's 200 points pass 150: {flags:?}");
    assert!(flags[0].contains("store s1"), "{flags:?}");

    // The third is refused, at quote and at commit, saying why; nothing is written.
    let quoted = pos
        .checkout
        .quote(ppb::QuoteRequest {
            receipt: Some(boots("V-3", Some(&card))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(quoted.code(), Code::FailedPrecondition, "{quoted:?}");
    let refused = pos.commit(boots("V-3", Some(&card))).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("velocity limit: card")
            && refused.message().contains("exceed 2"),
        "{}",
        refused.message()
    );
    let stored = pos
        .checkout
        .get_purchase(ppb::GetPurchaseRequest {
            tenant_id: T.into(),
            receipt_id: "V-3".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(stored.code(), Code::NotFound);
    // A retry of an accepted receipt still answers; so does the sale without the card.
    let again = pos.commit(boots("V-2", Some(&card))).await.unwrap();
    assert_eq!(again.evaluation, second.evaluation);
    pos.commit(boots("V-3", None)).await.unwrap();
    // The flag is kept with the purchase.
    let kept = pos
        .checkout
        .get_purchase(ppb::GetPurchaseRequest {
            tenant_id: T.into(),
            receipt_id: "V-2".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .purchase
        .unwrap();
    assert_eq!(kept.evaluation.unwrap().velocity_flags.len(), 1);

    // Exact under concurrency: another card, twelve receipts at once, two get through.
    let (_, other) = pos.member_with_card(T, "+77017400002").await;
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let mut pos = pos.clone();
            let other = other.clone();
            tokio::spawn(async move { pos.commit(boots(&format!("C-{i}"), Some(&other))).await })
        })
        .collect();
    let mut passed = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => passed += 1,
            Err(status) => assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}"),
        }
    }
    assert_eq!(passed, 2);

    let metrics = server.scrape_metrics().await;
    let value = |name: &str| metric_value(&metrics, name);
    // Flagged: V-2, and the two concurrent ones (the store is past 150 points by then).
    assert_eq!(
        value("loyalty_velocity_flagged_total").as_deref(),
        Some("3"),
        "{metrics}"
    );
    assert_eq!(
        value("loyalty_velocity_refused_total").as_deref(),
        Some("11"),
        "one refused commit, then ten concurrent ones: {metrics}"
    );
    assert_eq!(server.stop().await, 0);
}

/// A till cannot spend points past checkout: it may place a hold, but only a Commit that
/// names the hold confirms it, and that commit counts against the redemption limits.
#[tokio::test]
async fn a_tills_two_phase_redemption_goes_through_checkout_and_its_limits() {
    use loyalty_proto::balance::v1 as bpb;
    use loyalty_proto::identity::v1 as ipb;
    use ppb::{VelocityAction as A, VelocitySubject as S, VelocityWindow as W};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin = create_key(&data, &["--role", "admin", "--tenant", T]).await;

    // Set up with keys off: the program, one redeeming receipt per member per day (hard),
    // two members with points.
    let server = Server::start(Launch::dev().env("LOYALTY_AUTH__MODE", "off"), &data).await;
    let channel = server.channel().await;
    setup_tenant(&channel, T).await;
    set_limits(
        &channel,
        vec![limit(S::Member, A::Redemption, W::Day, 1, 0, true)],
    )
    .await
    .unwrap();
    let mut pos = Pos::new(&channel, &channel);
    let (ann, ann_card) = pos.member_with_card(T, "+77017400011").await;
    let (bob, bob_card) = pos.member_with_card(T, "+77017400012").await;
    for member in [&ann, &bob] {
        pos.balance
            .accrue(bpb::AccrueRequest {
                tenant_id: T.into(),
                member_id: member.clone(),
                idempotency_key: "welcome".into(),
                amount: 100_000,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert_eq!(server.stop().await, 0);

    let server = Server::start(Launch::dev().env("LOYALTY_AUTH__MODE", "required"), &data).await;
    let channel = server.channel().await;
    let till = ipb::access_service_client::AccessServiceClient::new(channel.clone())
        .create_api_key(with_key(
            ipb::CreateApiKeyRequest {
                tenant_id: T.into(),
                role: ipb::Role::Pos as i32,
                store_id: "s1".into(),
                name: "till 1".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .secret;
    let mut balance = bpb::balance_service_client::BalanceServiceClient::new(channel.clone());
    let mut checkout = ppb::checkout_service_client::CheckoutServiceClient::new(channel.clone());
    let active = |b: Option<bpb::Balance>| b.unwrap().active;

    // Spending outright, or confirming its own hold, is not the till's.
    let direct = balance
        .redeem(with_key(
            bpb::RedeemRequest {
                tenant_id: T.into(),
                member_id: ann.clone(),
                idempotency_key: "direct".into(),
                amount: 1_000,
                ..Default::default()
            },
            &till,
        ))
        .await
        .unwrap_err();
    assert_eq!(direct.code(), Code::PermissionDenied, "{direct:?}");
    let hold = |key: &str, member: &str| {
        with_key(
            bpb::HoldRequest {
                tenant_id: T.into(),
                member_id: member.into(),
                idempotency_key: key.into(),
                amount: 2_000,
                ..Default::default()
            },
            &till,
        )
    };
    let held = balance.hold(hold("h-1", &ann)).await.unwrap().into_inner();
    assert_eq!(active(held.balance), 98_000);
    let confirm = balance
        .confirm_hold(with_key(
            bpb::ConfirmHoldRequest {
                tenant_id: T.into(),
                hold_id: held.hold_id.clone(),
                idempotency_key: "confirm".into(),
                amount: 0,
            },
            &till,
        ))
        .await
        .unwrap_err();
    assert_eq!(confirm.code(), Code::PermissionDenied, "{confirm:?}");
    let get_hold = |hold_id: &str| {
        with_key(
            bpb::GetHoldRequest {
                tenant_id: T.into(),
                hold_id: hold_id.into(),
            },
            &till,
        )
    };
    let open = balance
        .get_hold(get_hold(&held.hold_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (open.member_id.as_str(), open.amount, open.status),
        (ann.as_str(), 2_000, bpb::HoldStatus::Open as i32)
    );

    // The commit that names the hold redeems from it (at most what it holds) and confirms it.
    let commit = |id: &str, card: &str, hold_id: &str| {
        let mut r = boots(id, Some(card));
        r.points_to_redeem = 5_000;
        with_key(
            ppb::CommitRequest {
                receipt: Some(r),
                hold_id: hold_id.into(),
            },
            &till,
        )
    };
    let first = checkout
        .commit(commit("H-1", &ann_card, &held.hold_id))
        .await
        .unwrap()
        .into_inner();
    let evaluation = first.evaluation.unwrap();
    assert_eq!(evaluation.points_redeemed, 2_000);
    assert_eq!(
        first.points_balance,
        100_000 - 2_000 + evaluation.points_accrued,
        "the hold's points are spent once"
    );
    let done = balance
        .get_hold(get_hold(&held.hold_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.status, bpb::HoldStatus::Confirmed as i32);

    // A second hold of Ann's: Bob's receipt cannot spend it, and Ann's second redeeming
    // receipt today is over the limit. Nothing is written; the till lets the hold go.
    let second = balance.hold(hold("h-2", &ann)).await.unwrap().into_inner();
    let theirs = checkout
        .commit(commit("H-2", &bob_card, &second.hold_id))
        .await
        .unwrap_err();
    assert_eq!(theirs.code(), Code::FailedPrecondition, "{theirs:?}");
    assert!(theirs.message().contains("another member's"), "{theirs:?}");
    let over = checkout
        .commit(commit("H-3", &ann_card, &second.hold_id))
        .await
        .unwrap_err();
    assert_eq!(over.code(), Code::FailedPrecondition, "{over:?}");
    assert!(
        over.message().contains("velocity limit: member"),
        "{over:?}"
    );
    for id in ["H-2", "H-3"] {
        let missing = checkout
            .get_purchase(with_key(
                ppb::GetPurchaseRequest {
                    tenant_id: T.into(),
                    receipt_id: id.into(),
                },
                &till,
            ))
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::NotFound, "{id}");
    }
    let cancelled = balance
        .cancel_hold(with_key(
            bpb::CancelHoldRequest {
                tenant_id: T.into(),
                hold_id: second.hold_id.clone(),
                idempotency_key: "let-go".into(),
            },
            &till,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.status, bpb::HoldStatus::Cancelled as i32);
    assert_eq!(active(cancelled.balance), first.points_balance);
    // Bob's hold, on his own receipt: his first redemption today.
    let bobs = balance.hold(hold("h-3", &bob)).await.unwrap().into_inner();
    let bob_paid = checkout
        .commit(commit("H-4", &bob_card, &bobs.hold_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bob_paid.evaluation.unwrap().points_redeemed, 2_000);

    // A refund gives back what the hold paid.
    let refund = checkout
        .refund(with_key(
            ppb::RefundRequest {
                tenant_id: T.into(),
                receipt_id: "H-1".into(),
                refund_id: "H-1-r".into(),
                lines: vec![ppb::RefundLine {
                    line_id: "1".into(),
                    quantity: dec("1"),
                }],
            },
            &till,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(refund.points_returned, 2_000);
    let after = balance
        .get_balance(with_key(
            bpb::GetBalanceRequest {
                tenant_id: T.into(),
                member_id: ann.clone(),
            },
            &till,
        ))
        .await
        .unwrap()
        .into_inner()
        .balance
        .unwrap();
    assert_eq!(
        (after.active, after.held),
        (100_000, 0),
        "the receipt undone: the hold's points back, the accrual taken back"
    );
    // Keys derived from receipts are checkout's: a till cannot take one that a later
    // commit will need.
    let taken = balance
        .hold(hold("receipt:H-9:redeem", &ann))
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::InvalidArgument, "{taken:?}");
    assert_eq!(server.stop().await, 0);
}
