//! Fraud signals through the real binary: a member buying in three stores within minutes, a
//! cashier whose receipts carry one member, and points redeemed right after registration
//! are reported from the committed receipts; ordinary shoppers are not.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loyalty_e2e::*;
use loyalty_proto::common::v1::TimeRange;
use loyalty_proto::promotion::v1 as ppb;
use loyalty_proto::reporting::v1 as rpb;
use tonic::Code;

const T: &str = "t1";

fn period() -> Option<TimeRange> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let day = 86_400_000;
    Some(TimeRange {
        start_time: Some(loyalty_platform::grpc::timestamp(now - 2 * day)),
        end_time: Some(loyalty_platform::grpc::timestamp(now + 2 * day)),
    })
}

fn sale(id: &str, store: &str, cashier: &str, card: &str, redeem: i64) -> ppb::Receipt {
    let mut r = receipt(
        T,
        id,
        Some(card),
        vec![line("1", "boots", "1", "10000.00", false)],
    );
    r.store_id = store.into();
    r.cashier_id = cashier.into();
    r.points_to_redeem = redeem;
    r
}

fn request() -> rpb::GetFraudSignalsRequest {
    rpb::GetFraudSignalsRequest {
        tenant_id: T.into(),
        period: period(),
        time_zone: "UTC".into(),
        min_cashier_receipts: 5,
        top_members: 1,
        min_top_share_percent: 60,
        ..Default::default()
    }
}

#[tokio::test]
async fn suspicious_patterns_are_reported_from_the_receipts() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    setup_tenant(&channel, T).await;
    ppb::catalog_service_client::CatalogServiceClient::new(channel.clone())
        .upsert_stores(ppb::UpsertStoresRequest {
            tenant_id: T.into(),
            stores: ["s2", "s3"]
                .iter()
                .map(|s| ppb::Store {
                    store_id: (*s).into(),
                    name: (*s).into(),
                    brand: "ShoeHub".into(),
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .unwrap();
    let mut pos = Pos::new(&channel, &channel);

    // A card in three stores within minutes.
    let (hopper, hopper_card) = pos.member_with_card(T, "+77017500001").await;
    for (i, store) in ["s1", "s2", "s3"].iter().enumerate() {
        pos.commit(sale(&format!("H-{i}"), store, "", &hopper_card, 0))
            .await
            .unwrap();
    }
    // Cashier k1: four receipts of one member, one of another; k2 serves five members.
    let (friend, friend_card) = pos.member_with_card(T, "+77017500002").await;
    for i in 0..4 {
        pos.commit(sale(&format!("K1-{i}"), "s1", "k1", &friend_card, 0))
            .await
            .unwrap();
    }
    let (_, once_card) = pos.member_with_card(T, "+77017500003").await;
    pos.commit(sale("K1-x", "s1", "k1", &once_card, 0))
        .await
        .unwrap();
    for i in 0..5 {
        let (_, card) = pos.member_with_card(T, &format!("+7701750010{i}")).await;
        pos.commit(sale(&format!("K2-{i}"), "s2", "k2", &card, 0))
            .await
            .unwrap();
    }
    // A new member earns points and spends them at once.
    let (newbie, newbie_card) = pos.member_with_card(T, "+77017500004").await;
    pos.commit(sale("N-1", "s1", "", &newbie_card, 0))
        .await
        .unwrap();
    let redeemed = pos
        .commit(sale("N-2", "s1", "", &newbie_card, 5_000))
        .await
        .unwrap();
    assert!(redeemed.evaluation.unwrap().points_redeemed > 0);

    // Reporting sees them once their events arrive.
    let mut reporting = rpb::reporting_service_client::ReportingServiceClient::new(channel.clone());
    let mut signals = rpb::GetFraudSignalsResponse::default();
    for _ in 0..100 {
        signals = reporting
            .get_fraud_signals(request())
            .await
            .unwrap()
            .into_inner();
        // Member events (registration times) travel apart from purchase events.
        if signals.receipts_scanned == 15 && !signals.early_redemptions.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(signals.receipts_scanned, 15);

    let hopping: Vec<&str> = signals
        .store_hopping
        .iter()
        .map(|h| h.member_id.as_str())
        .collect();
    assert_eq!(hopping, [hopper.as_str()], "{signals:?}");
    assert_eq!(signals.store_hopping[0].store_ids, ["s1", "s2", "s3"]);
    assert_eq!(signals.store_hopping[0].receipts, 3);

    assert_eq!(signals.cashier_concentration.len(), 1, "{signals:?}");
    let k1 = &signals.cashier_concentration[0];
    assert_eq!((k1.store_id.as_str(), k1.cashier_id.as_str()), ("s1", "k1"));
    assert_eq!(
        (k1.identified_receipts, k1.distinct_members, k1.top_receipts),
        (5, 2, 4)
    );
    assert_eq!(k1.top_member_ids, [friend]);

    let early: Vec<(&str, &str)> = signals
        .early_redemptions
        .iter()
        .map(|e| (e.member_id.as_str(), e.receipt_id.as_str()))
        .collect();
    assert_eq!(early, [(newbie.as_str(), "N-2")]);

    // Bad thresholds and periods are refused.
    let bad = reporting
        .get_fraud_signals(rpb::GetFraudSignalsRequest {
            min_stores: 1,
            ..request()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(violations(&bad)[0].0, "min_stores");
    let inverted = reporting
        .get_fraud_signals(rpb::GetFraudSignalsRequest {
            period: period().map(|p| TimeRange {
                start_time: p.end_time,
                end_time: p.start_time,
            }),
            ..request()
        })
        .await
        .unwrap_err();
    assert_eq!(inverted.code(), Code::InvalidArgument);
    assert_eq!(server.stop().await, 0);
}
