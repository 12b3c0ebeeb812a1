//! One test per error class: the right gRPC code, field violations for bad input, no
//! internal detail, and nothing written by a rejected request.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loyalty_e2e::*;
use tonic::Code;

async fn started() -> (tempfile::TempDir, Server, Pos) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    setup_tenant(&channel, "t1").await;
    let pos = Pos::new(&channel, &channel);
    (dir, server, pos)
}

async fn nothing_recorded(pos: &mut Pos, receipt_id: &str) {
    let err = pos
        .checkout
        .get_purchase(promotion::GetPurchaseRequest {
            tenant_id: "t1".into(),
            receipt_id: receipt_id.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::NotFound,
        "a rejected commit must record nothing"
    );
}

#[tokio::test]
async fn invalid_argument_with_field_violations() {
    let (_dir, server, mut pos) = started().await;

    // Bad phone.
    let err = pos
        .members
        .register_member(identity::RegisterMemberRequest {
            tenant_id: "t1".into(),
            phone: "12345".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err)[0].0, "phone");

    let (member_id, card) = pos.member_with_card("t1", "+77012223344").await;
    let good = || line("1", "boots", "1", "100.00", false);

    // Negative quantity.
    let r = receipt(
        "t1",
        "E-neg",
        Some(&card),
        vec![line("1", "boots", "-1", "100.00", false)],
    );
    let err = pos.commit(r).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        violations(&err)
            .iter()
            .any(|(f, _)| f == "receipt.lines[0].quantity"),
        "{err:?}"
    );
    nothing_recorded(&mut pos, "E-neg").await;

    // Empty receipt.
    let err = pos
        .commit(receipt("t1", "E-empty", Some(&card), vec![]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        violations(&err).iter().any(|(f, _)| f == "receipt.lines"),
        "{err:?}"
    );
    nothing_recorded(&mut pos, "E-empty").await;

    // Unknown store.
    let mut r = receipt("t1", "E-store", Some(&card), vec![good()]);
    r.store_id = "nowhere".into();
    let err = pos.commit(r).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        violations(&err)
            .iter()
            .any(|(f, _)| f == "receipt.store_id"),
        "{err:?}"
    );
    nothing_recorded(&mut pos, "E-store").await;

    // Unknown product.
    let r = receipt(
        "t1",
        "E-sku",
        Some(&card),
        vec![line("1", "caviar", "1", "1.00", false)],
    );
    let err = pos.commit(r).await.unwrap_err();
    assert!(
        violations(&err)
            .iter()
            .any(|(f, _)| f == "receipt.lines[0].sku"),
        "{err:?}"
    );

    // Oversize receipt: 501 lines.
    let lines = (0..501)
        .map(|i| line(&i.to_string(), "boots", "1", "1.00", false))
        .collect();
    let err = pos
        .commit(receipt("t1", "E-big", Some(&card), lines))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        violations(&err)
            .iter()
            .any(|(f, d)| f == "receipt.lines" && d.contains("500")),
        "{err:?}"
    );
    nothing_recorded(&mut pos, "E-big").await;

    // Duplicate line ids and several problems at once are all reported.
    let r = receipt(
        "t1",
        "E-dup",
        Some(&card),
        vec![
            line("1", "boots", "1", "1.00", false),
            line("1", "boots", "0", "x", false),
        ],
    );
    let err = pos.commit(r).await.unwrap_err();
    let fields: Vec<String> = violations(&err).into_iter().map(|(f, _)| f).collect();
    for f in [
        "receipt.lines[1].line_id",
        "receipt.lines[1].quantity",
        "receipt.lines[1].unit_price",
    ] {
        assert!(fields.iter().any(|x| x == f), "{f} missing in {fields:?}");
    }

    // Points payment without a card.
    let mut r = receipt("t1", "E-points", None, vec![good()]);
    r.points_to_redeem = 100;
    let err = pos.commit(r).await.unwrap_err();
    assert!(
        violations(&err)
            .iter()
            .any(|(f, _)| f == "receipt.points_to_redeem"),
        "{err:?}"
    );

    assert_eq!(
        pos.balance("t1", &member_id).await.ledger_sequence,
        0,
        "nothing was written"
    );
    server.stop().await;
}

#[tokio::test]
async fn not_found_already_exists_failed_precondition_unimplemented() {
    let (_dir, server, mut pos) = started().await;
    let err = pos
        .members
        .lookup_member(identity::LookupMemberRequest {
            tenant_id: "t1".into(),
            key: Some(identity::lookup_member_request::Key::CardNumber(
                "99999999".into(),
            )),
            default_region: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    pos.member_with_card("t1", "+77013334455").await;
    let err = pos
        .members
        .register_member(identity::RegisterMemberRequest {
            tenant_id: "t1".into(),
            phone: "8 701 333 44 55".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::AlreadyExists,
        "same phone in another format"
    );

    // A tenant without a program cannot check out.
    let err = pos
        .checkout
        .quote(promotion::QuoteRequest {
            receipt: Some(receipt(
                "no-program",
                "Q",
                None,
                vec![line("1", "boots", "1", "1.00", false)],
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Redeeming more points than the member has.
    let err = pos
        .balance
        .redeem(balance::RedeemRequest {
            tenant_id: "t1".into(),
            member_id: "m-empty".into(),
            idempotency_key: "k".into(),
            amount: 100,
            reference: String::new(),
            up_to_available: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Refunding a receipt that does not exist.
    let err = pos
        .refund("t1", "nope", "F", &[("1", "1")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // What is not offered answers UNIMPLEMENTED, never a fake answer: Flight serves DoGet
    // only.
    let channel = server.channel().await;
    let err = arrow_flight::flight_service_client::FlightServiceClient::new(channel.clone())
        .list_flights(arrow_flight::Criteria::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);

    // Campaigns are served: a request without a tenant is refused as invalid.
    let mut campaigns = promotion::campaign_service_client::CampaignServiceClient::new(channel);
    let err = campaigns
        .list_campaigns(promotion::ListCampaignsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = campaigns
        .get_campaign(promotion::GetCampaignRequest {
            tenant_id: "t1".into(),
            campaign_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}
