//! Microservices mode: identity alone in one process, the other four in another, each with
//! its own data dir, completing the skeleton checkout together over gRPC.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loyalty_e2e::*;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn status(channel: &tonic::transport::Channel, service: &str) -> i32 {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
}

async fn wait_for(channel: &tonic::transport::Channel, service: &str, want: ServingStatus) {
    for _ in 0..100 {
        if status(channel, service).await == want as i32 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{service} never became {want:?}");
}

#[tokio::test]
async fn two_processes_complete_the_skeleton_over_grpc() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let identity_node = Server::start(Launch::serve("identity"), dir_a.path()).await;
    let rest = Server::start(
        Launch::serve("balance,promotion,segmentation,reporting")
            .env("LOYALTY_PEERS__IDENTITY", &identity_node.url())
            .env("LOYALTY_SERVER__HEALTH_INTERVAL_SECS", "1"),
        dir_b.path(),
    )
    .await;
    let a = identity_node.channel().await;
    let b = rest.channel().await;

    // Each process serves only its own services.
    let mut members_on_b = identity::member_service_client::MemberServiceClient::new(b.clone());
    let err = members_on_b
        .get_member(identity::GetMemberRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::Unimplemented,
        "identity is not served by process B"
    );
    assert!(std::fs::exists(dir_a.path().join("identity.redb")).unwrap());
    assert!(!std::fs::exists(dir_b.path().join("identity.redb")).unwrap());

    wait_for(
        &b,
        "loyalty.promotion.v1.CheckoutService",
        ServingStatus::Serving,
    )
    .await;
    setup_tenant(&b, "t1").await;
    let mut pos = Pos::new(&a, &b);
    skeleton_flow(&mut pos, "t1").await;

    // Health follows the real dependency: without identity, checkout is NOT_SERVING.
    assert_eq!(identity_node.stop().await, 0);
    wait_for(
        &b,
        "loyalty.promotion.v1.CheckoutService",
        ServingStatus::NotServing,
    )
    .await;
    assert_eq!(
        status(&b, "loyalty.balance.v1.BalanceService").await,
        ServingStatus::Serving as i32
    );
    // Liveness never follows a dependency: a restart would not bring identity back.
    assert_eq!(status(&b, "liveness").await, ServingStatus::Serving as i32);
    // And a card checkout now fails as UNAVAILABLE, not as an internal error.
    let err = pos
        .checkout
        .quote(promotion::QuoteRequest {
            receipt: Some(receipt(
                "t1",
                "Q",
                Some("12345678"),
                vec![line("1", "boots", "1", "1.00", false)],
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert_eq!(rest.stop().await, 0);
}

#[tokio::test]
async fn a_missing_peer_address_is_a_config_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = command(
        &[
            "serve".into(),
            "--service".into(),
            "promotion".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            dir.path().display().to_string(),
        ],
        &[],
    )
    .output()
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("peers.identity"), "{err}");
}
