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
