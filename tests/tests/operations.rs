//! What SREs rely on: health per service, reflection, message limits, config errors,
//! graceful drain.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loyalty_e2e::*;
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

const SERVICES: &[&str] = &[
    "loyalty.identity.v1.MemberService",
    "loyalty.identity.v1.CardService",
    "loyalty.balance.v1.BalanceService",
    "loyalty.promotion.v1.CheckoutService",
    "loyalty.segmentation.v1.SegmentationService",
    "loyalty.reporting.v1.ReportingService",
];

#[tokio::test]
async fn health_and_reflection_cover_every_service() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    for service in SERVICES.iter().chain(&["", "liveness"]) {
        let mut serving = false;
        for _ in 0..50 {
            let reply = health
                .check(HealthCheckRequest {
                    service: (*service).into(),
                })
                .await;
            if reply.is_ok_and(|r| r.into_inner().status == 1) {
                serving = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(serving, "{service:?} is not SERVING");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in SERVICES {
        assert!(
            names.iter().any(|n| n == service),
            "{service} missing from reflection: {names:?}"
        );
    }
    assert_eq!(server.stop().await, 0);
}

#[tokio::test]
async fn oversize_messages_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        Launch::dev().env("LOYALTY_SERVER__MAX_MESSAGE_BYTES", "65536"),
        dir.path(),
    )
    .await;
    let channel = server.channel().await;
    let mut members = identity::member_service_client::MemberServiceClient::new(channel);
    let err = members
        .register_member(identity::RegisterMemberRequest {
            tenant_id: "t1".into(),
            phone: "+77010000000".into(),
            first_name: "x".repeat(100_000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    // tonic reports a message over the decoding limit as OUT_OF_RANGE.
    assert!(
        matches!(
            err.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{err:?}"
    );
    // A long but in-limit field is refused by validation, naming the field.
    let err = members
        .register_member(identity::RegisterMemberRequest {
            tenant_id: "t1".into(),
            phone: "+77010000000".into(),
            first_name: "x".repeat(1_000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err)[0].0, "first_name");
    server.stop().await;
}

#[tokio::test]
async fn bad_config_exits_non_zero_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = [
        "dev".to_string(),
        "--data-dir".into(),
        dir.path().display().to_string(),
    ];
    for (key, value, expect) in [
        (
            "LOYALTY_SERVER__GRACE_PERIOD_SECS",
            "soon",
            "server.grace_period_secs",
        ),
        ("LOYALTY_STORAGE__BACKEND", "cassandra", "storage.backend"),
        (
            "LOYALTY_IDENTITY__DEFAULT_REGION",
            "Kazakhstan",
            "identity.default_region",
        ),
    ] {
        let out = command(&base, &[(key.into(), value.into())])
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{key}={value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{key}: {err}");
    }
    let config = dir.path().join("loyalty.toml");
    std::fs::write(&config, "[server]\nmax_mesage_bytes = 10\n").unwrap();
    let mut args = base.to_vec();
    args.extend(["--config".into(), config.display().to_string()]);
    let out = command(&args, &[]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_mesage_bytes"));

    // `loyalty config` prints the effective layered configuration.
    let out = command(
        &[
            "config".into(),
            "--config".into(),
            config.display().to_string(),
        ],
        &[],
    )
    .output()
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "the same file is refused by `config` too"
    );
    let out = command(
        &["config".into()],
        &[("LOYALTY_SERVER__GRACE_PERIOD_SECS".into(), "7".into())],
    )
    .output()
    .await
    .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("grace_period_secs = 7"));
}

#[tokio::test]
async fn sigterm_drains_in_flight_calls() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    setup_tenant(&channel, "t1").await;
    let mut pos = Pos::new(&channel, &channel);
    let (_, card) = pos.member_with_card("t1", "+77014445566").await;
    // Calls in flight when SIGTERM arrives complete; the process then exits 0.
    let mut calls = Vec::new();
    for i in 0..50 {
        let mut pos = pos.clone();
        let card = card.clone();
        calls.push(tokio::spawn(async move {
            let r = receipt(
                "t1",
                &format!("D-{i}"),
                Some(&card),
                vec![line("1", "boots", "1", "10.00", false)],
            );
            pos.commit(r).await
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let log = server.log.clone();
    assert_eq!(server.stop().await, 0);
    let mut ok = 0;
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => ok += 1,
            // Calls that had not reached the server yet are refused, never half-done.
            Err(s) => assert!(
                matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ),
                "{s:?}"
            ),
        }
    }
    assert!(ok > 0, "some calls were in flight");
    let text = std::fs::read_to_string(log).unwrap();
    assert!(text.contains("health is not serving"), "{text}");
    assert!(text.contains("server stopped"), "{text}");
}

#[tokio::test]
async fn metrics_count_calls_by_method_and_code() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        Launch::dev().env("LOYALTY_SERVER__METRICS_LISTEN", "127.0.0.1:0"),
        dir.path(),
    )
    .await;
    let channel = server.channel().await;
    setup_tenant(&channel, "t1").await;
    let mut pos = Pos::new(&channel, &channel);
    let (_, card) = pos.member_with_card("t1", "+77015556677").await;
    for i in 0..3 {
        let r = receipt(
            "t1",
            &format!("M-{i}"),
            Some(&card),
            vec![line("1", "boots", "1", "10.00", false)],
        );
        pos.commit(r).await.unwrap();
    }
    let bad = receipt("t1", "M-bad", Some(&card), vec![]);
    pos.commit(bad).await.unwrap_err();
    // A made-up method must not become a label of its own.
    let mut raw = tonic::client::Grpc::new(channel.clone());
    raw.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/made.up.v1.Nope/Call");
    let _ = raw
        .unary::<(), (), _>(
            tonic::Request::new(()),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await;

    let text = server.scrape_metrics().await;
    let commit = "method=\"/loyalty.promotion.v1.CheckoutService/Commit\"";
    let count = |code: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("grpc_server_requests_total")
                    && l.contains(commit)
                    && l.contains(&format!("code=\"{code}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    assert_eq!(count("OK"), Some(3), "{text}");
    assert_eq!(count("InvalidArgument"), Some(1), "{text}");
    assert!(
        text.contains("grpc_server_request_duration_seconds_bucket"),
        "{text}"
    );
    // Business counters move once per receipt: 3 identified receipts of 10.00 at 1% accrue
    // 0.10 points (10 minor units) each; replaying a commit adds nothing.
    let value = |name: &str| metric_value(&text, name).and_then(|v| v.parse::<u64>().ok());
    assert_eq!(
        value("loyalty_receipts_committed_total{identified=\"true\"}"),
        Some(3),
        "{text}"
    );
    assert_eq!(value("loyalty_points_accrued_total"), Some(30), "{text}");
    // Each store counts its write transactions and the writes they carried: promotion wrote
    // each identified receipt twice (pending, committed).
    let promotion_writes = value("loyalty_store_writes_total{store=\"promotion\"}").unwrap_or(0);
    let promotion_commits = value("loyalty_store_commits_total{store=\"promotion\"}").unwrap_or(0);
    assert!(promotion_writes >= 6, "{text}");
    assert!(
        (1..=promotion_writes).contains(&promotion_commits),
        "{text}"
    );
    assert!(
        value("loyalty_store_writes_total{store=\"balance\"}").is_some_and(|n| n >= 3),
        "{text}"
    );
    let replay = receipt(
        "t1",
        "M-0",
        Some(&card),
        vec![line("1", "boots", "1", "10.00", false)],
    );
    pos.commit(replay).await.unwrap();
    let again = server.scrape_metrics().await;
    assert!(
        again.contains("loyalty_receipts_committed_total{identified=\"true\"} 3"),
        "{again}"
    );
    assert!(
        !text.contains("made.up"),
        "unknown methods are labelled \"unknown\": {text}"
    );
    server.stop().await;
}
