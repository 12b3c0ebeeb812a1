//! One trace per receipt: four processes (identity; balance; segmentation; promotion with
//! reporting) export spans over OTLP to a receiver inside the test. A commit carrying
//! the POS's W3C `traceparent` yields one trace in which every span hangs off the POS's,
//! linked parent to child across processes, with storage and rule-evaluation spans inside.
//! Reporting, beside promotion, filters KPIs by a segment it asks segmentation for over gRPC.
//! Metrics go over OTLP too, and the last values at shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use loyalty_e2e::*;
use loyalty_platform::redis_server::RedisServer;
use loyalty_proto::promotion::v1 as promotion;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const POS_SPAN: &str = "00f067aa0ba902b7";
const FAILED_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `span` descends from `ancestor` through the parent links in `by_id`.
fn descends(by_id: &HashMap<String, &ReceivedSpan>, span: &ReceivedSpan, ancestor: &str) -> bool {
    let mut parent = hex(&span.parent_span_id);
    for _ in 0..64 {
        if parent == ancestor {
            return true;
        }
        match by_id.get(&parent) {
            Some(p) => parent = hex(&p.parent_span_id),
            None => return false,
        }
    }
    false
}

#[tokio::test]
async fn a_receipt_is_one_trace_across_processes() {
    let receiver = OtlpReceiver::start().await;
    let tracing_env = |launch: Launch| {
        launch
            .env("LOYALTY_TRACING__OTLP_ENDPOINT", &receiver.endpoint)
            .env("LOYALTY_SERVER__HEALTH_INTERVAL_SECS", "1")
    };
    let (dir_a, dir_b, dir_c, dir_d) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    // Segmentation in its own process: checkout asks it for the member's segments.
    let segmentation_node =
        Server::start(tracing_env(Launch::serve("segmentation")), dir_d.path()).await;
    let identity_node = Server::start(tracing_env(Launch::serve("identity")), dir_a.path()).await;
    // Balance on Redis over its ledger, so the trace shows both.
    let redis = RedisServer::start().unwrap();
    let balance_node = Server::start(
        tracing_env(Launch::serve("balance"))
            .env("LOYALTY_PEERS__IDENTITY", &identity_node.url())
            .on_redis(&redis.url()),
        dir_c.path(),
    )
    .await;
    let promotion_node = Server::start(
        tracing_env(Launch::serve("promotion,reporting"))
            .env("LOYALTY_PEERS__IDENTITY", &identity_node.url())
            .env("LOYALTY_PEERS__BALANCE", &balance_node.url())
            .env("LOYALTY_PEERS__SEGMENTATION", &segmentation_node.url())
            .env("LOYALTY_LOG__FORMAT", "json")
            .env("LOYALTY_SERVER__METRICS_LISTEN", "127.0.0.1:0"),
        dir_b.path(),
    )
    .await;
    let a = identity_node.channel().await;
    let b = promotion_node.channel().await;
    setup_tenant(&b, "t1").await;
    // A campaign for a segment, so the checkout asks segmentation about the member.
    let s = segmentation_node.channel().await;
    loyalty_proto::segmentation::v1::segmentation_service_client::SegmentationServiceClient::new(s)
        .create_segment(loyalty_proto::segmentation::v1::CreateSegmentRequest {
            segment: Some(loyalty_proto::segmentation::v1::Segment {
                tenant_id: "t1".into(),
                segment_id: "buyers".into(),
                name: "Buyers".into(),
                kind: loyalty_proto::segmentation::v1::SegmentKind::Dynamic as i32,
                predicate: "spend_365d > 0".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    promotion::campaign_service_client::CampaignServiceClient::new(b.clone())
        .create_campaign(promotion::CreateCampaignRequest {
            campaign: Some(promotion::Campaign {
                tenant_id: "t1".into(),
                campaign_id: "buyers-boost".into(),
                name: "Buyers boost".into(),
                status: promotion::CampaignStatus::Active as i32,
                targeting: Some(promotion::Targeting {
                    segment_ids: vec!["buyers".into()],
                    ..Default::default()
                }),
                mechanic: Some(promotion::campaign::Mechanic::AccrualBoost(
                    promotion::AccrualBoost {
                        multiplier: dec("2"),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }),
            actor: None,
        })
        .await
        .unwrap();
    let mut pos = Pos::new(&a, &b);
    let (member, card) = pos.member_with_card("t1", "+77017778899").await;

    // The POS starts the trace and sends its context with the commit.
    let mut request = tonic::Request::new(promotion::CommitRequest {
        receipt: Some(receipt(
            "t1",
            "TRACED-1",
            Some(&card),
            vec![line("1", "boots", "1", "100.00", false)],
        )),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE}-{POS_SPAN}-01").parse().unwrap(),
    );
    let mut checkout = promotion::checkout_service_client::CheckoutServiceClient::new(b.clone());
    let reply = checkout.commit(request).await.unwrap().into_inner();
    assert!(
        reply
            .evaluation
            .as_ref()
            .is_some_and(|e| e.points_accrued > 0),
        "{reply:?}"
    );

    // The metrics of that receipt moved too.
    let metrics = promotion_node.scrape_metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("loyalty_receipts_committed_total{identified=\"true\"} 1")),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("loyalty_storage_duration_seconds_count")
                && l.contains("system=\"redb\"")
                && l.contains("operation=\"promotion.put_purchase\"")),
        "{metrics}"
    );

    // Reporting, beside promotion, filters by a segment kept in segmentation's process.
    {
        use loyalty_proto::reporting::v1 as rpb;
        use loyalty_proto::segmentation::v1 as spb;
        let mut segments = spb::segmentation_service_client::SegmentationServiceClient::new(
            segmentation_node.channel().await,
        );
        segments
            .create_segment(spb::CreateSegmentRequest {
                segment: Some(spb::Segment {
                    tenant_id: "t1".into(),
                    segment_id: "listed".into(),
                    name: "Listed".into(),
                    kind: spb::SegmentKind::Static as i32,
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
        segments
            .upload_segment_members(tokio_stream::iter(vec![spb::UploadSegmentMembersRequest {
                tenant_id: "t1".into(),
                segment_id: "listed".into(),
                member_ids: vec![member.clone()],
            }]))
            .await
            .unwrap();
        let mut reports = rpb::reporting_service_client::ReportingServiceClient::new(b.clone());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let request = |segment: &str| rpb::GetKpisRequest {
            tenant_id: "t1".into(),
            kpis: vec![rpb::Kpi::Receipts as i32],
            period: Some(loyalty_proto::common::v1::TimeRange {
                start_time: Some(loyalty_platform::grpc::timestamp(now - 86_400_000)),
                end_time: Some(loyalty_platform::grpc::timestamp(now + 86_400_000)),
            }),
            filter: Some(rpb::Filter {
                segment_id: segment.into(),
                ..Default::default()
            }),
            time_zone: "UTC".into(),
            ..Default::default()
        };
        let mut receipts = String::new();
        for _ in 0..100 {
            let reply = reports
                .get_kpis(request("listed"))
                .await
                .unwrap()
                .into_inner();
            receipts = reply.values[0].value.clone().unwrap().value;
            if receipts == "1" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(receipts, "1", "the member's one receipt");
        // A segment nobody is in counts nothing, though the receipt is in.
        segments
            .create_segment(spb::CreateSegmentRequest {
                segment: Some(spb::Segment {
                    tenant_id: "t1".into(),
                    segment_id: "empty".into(),
                    name: "Empty".into(),
                    kind: spb::SegmentKind::Static as i32,
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
        let reply = reports
            .get_kpis(request("empty"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.values[0].value.clone().unwrap().value, "0");
        let err = reports.get_kpis(request("unlisted")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    }

    // Two-phase redemption with balance in a process of its own: checkout reads and
    // confirms the till's hold over gRPC, and the rest of the hold goes back.
    {
        use loyalty_proto::balance::v1 as bpb;
        let mut balance =
            bpb::balance_service_client::BalanceServiceClient::new(balance_node.channel().await);
        let before = balance
            .get_balance(bpb::GetBalanceRequest {
                tenant_id: "t1".into(),
                member_id: member.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .balance
            .unwrap()
            .active;
        let held = balance
            .hold(bpb::HoldRequest {
                tenant_id: "t1".into(),
                member_id: member.clone(),
                idempotency_key: "till-hold-1".into(),
                amount: 60,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut r = receipt(
            "t1",
            "HELD-1",
            Some(&card),
            vec![line("1", "boots", "1", "100.00", false)],
        );
        r.points_to_redeem = 50;
        let paid = checkout
            .commit(promotion::CommitRequest {
                receipt: Some(r),
                hold_id: held.hold_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let evaluation = paid.evaluation.unwrap();
        assert_eq!(evaluation.points_redeemed, 50);
        assert_eq!(
            paid.points_balance,
            before - 50 + evaluation.points_accrued,
            "50 of the hold spent, 10 back"
        );
        let hold = balance
            .get_hold(bpb::GetHoldRequest {
                tenant_id: "t1".into(),
                hold_id: held.hold_id,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(hold.status, bpb::HoldStatus::Confirmed as i32);
    }

    // A call that goes wrong logs with its trace id: identity is gone for this one.
    assert_eq!(identity_node.stop().await, 0);
    let mut request = tonic::Request::new(promotion::CommitRequest {
        receipt: Some(receipt(
            "t1",
            "TRACED-2",
            Some(&card),
            vec![line("1", "boots", "1", "100.00", false)],
        )),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{FAILED_TRACE}-{POS_SPAN}-01").parse().unwrap(),
    );
    let err = checkout.commit(request).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let log = promotion_node.log_text();
    let warning = log
        .lines()
        .find(|l| l.contains("peer service unavailable"))
        .unwrap_or_else(|| panic!("no warning logged:\n{log}"));
    assert!(warning.contains(FAILED_TRACE), "{warning}");
    assert!(warning.starts_with('{'), "not JSON: {warning}");
    let logged_span = warning
        .split("\"span_id\":\"")
        .nth(1)
        .and_then(|rest| rest.get(..16))
        .unwrap_or_else(|| panic!("no span id: {warning}"))
        .to_owned();

    // Stopping flushes every process's exporter.
    assert_eq!(promotion_node.stop().await, 0);
    assert_eq!(balance_node.stop().await, 0);
    assert_eq!(segmentation_node.stop().await, 0);
    let mut spans = Vec::new();
    for _ in 0..50 {
        spans = receiver.spans();
        if spans.iter().any(|s| s.service == "loyalty-balance") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The failed call's log line named its server span.
    let failed = spans
        .iter()
        .find(|s| hex(&s.trace_id) == FAILED_TRACE && s.kind == 2 && s.name.ends_with("/Commit"))
        .expect("the failed commit's server span");
    assert_eq!(hex(&failed.span_id), logged_span);
    let traced: Vec<&ReceivedSpan> = spans.iter().filter(|s| hex(&s.trace_id) == TRACE).collect();
    let by_id: HashMap<String, &ReceivedSpan> =
        traced.iter().map(|s| (hex(&s.span_id), *s)).collect();
    let describe = || {
        traced
            .iter()
            .map(|s| {
                format!(
                    "{} {} kind={} id={} parent={}",
                    s.service,
                    s.name,
                    s.kind,
                    hex(&s.span_id),
                    hex(&s.parent_span_id)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };

    // Every span of the receipt hangs off the POS's span: one trace, no orphans.
    assert!(
        !traced.is_empty(),
        "no span of the trace arrived: {spans:?}"
    );
    for span in &traced {
        assert!(
            descends(&by_id, span, POS_SPAN),
            "{} is not linked to the POS's span:\n{}",
            span.name,
            describe()
        );
    }

    let commit = traced
        .iter()
        .find(|s| s.kind == 2 && s.name == "loyalty.promotion.v1.CheckoutService/Commit")
        .unwrap_or_else(|| panic!("no checkout server span:\n{}", describe()));
    assert_eq!(hex(&commit.parent_span_id), POS_SPAN);
    assert_eq!(commit.service, "loyalty-promotion-reporting");
    assert_eq!(commit.attribute("rpc.system"), Some("grpc"));
    assert_eq!(commit.attribute("rpc.method"), Some("Commit"));
    assert_eq!(commit.attribute("rpc.grpc.status_code"), Some("0"));
    let commit_id = hex(&commit.span_id);

    // Each peer call: a client span under the commit, and the peer's server span under it.
    for (peer_service, process) in [
        ("loyalty.identity.v1.MemberService", "loyalty-identity"),
        ("loyalty.balance.v1.BalanceService", "loyalty-balance"),
        (
            "loyalty.segmentation.v1.SegmentationService",
            "loyalty-segmentation",
        ),
    ] {
        let client = traced
            .iter()
            .find(|s| s.kind == 3 && s.attribute("rpc.service") == Some(peer_service))
            .unwrap_or_else(|| panic!("no client span to {peer_service}:\n{}", describe()));
        assert!(descends(&by_id, client, &commit_id));
        let server = traced
            .iter()
            .find(|s| s.kind == 2 && s.service == process)
            .unwrap_or_else(|| panic!("no server span in {process}:\n{}", describe()));
        assert_eq!(
            server.parent_span_id,
            client.span_id,
            "{process}'s span is not the child of the caller's:\n{}",
            describe()
        );
    }

    // Storage calls in every process, with the database attributes.
    for (process, system) in [
        ("loyalty-identity", "redb"),
        ("loyalty-balance", "redis"),
        ("loyalty-promotion-reporting", "redb"),
    ] {
        let db = traced
            .iter()
            .find(|s| s.service == process && s.attribute("db.system.name") == Some(system))
            .unwrap_or_else(|| panic!("no {system} span in {process}:\n{}", describe()));
        assert_eq!(db.kind, 3);
        assert!(db.attribute("db.operation.name").is_some());
    }
    // Under Redis, the durable ledger's commit is part of the same call.
    let execute = traced
        .iter()
        .find(|s| s.name == "balance.execute")
        .unwrap_or_else(|| panic!("no balance.execute span:\n{}", describe()));
    let commit_to_ledger = traced
        .iter()
        .find(|s| s.name == "ledger.commit")
        .unwrap_or_else(|| panic!("no ledger.commit span:\n{}", describe()));
    assert!(descends(&by_id, commit_to_ledger, &hex(&execute.span_id)));
    assert_eq!(commit_to_ledger.attribute("db.system.name"), Some("redb"));
    let evaluate = traced
        .iter()
        .find(|s| s.name == "promotion.evaluate")
        .unwrap_or_else(|| panic!("no rule-evaluation span:\n{}", describe()));
    assert!(descends(&by_id, evaluate, &commit_id));
    // The purchase event is appended within the commit, before the POS gets its answer.
    let append = traced
        .iter()
        .find(|s| s.attribute("db.operation.name") == Some("events.append"))
        .unwrap_or_else(|| panic!("no events.append span:\n{}", describe()));
    assert!(descends(&by_id, append, &commit_id));
    assert_eq!(append.attribute("db.system.name"), Some("redb"));

    // No personal data in span attributes.
    for span in &spans {
        for (k, v) in &span.attributes {
            assert!(
                !v.contains("7701777") && !v.contains(&card),
                "{k}={v} in {}",
                span.name
            );
        }
    }
}

#[tokio::test]
async fn the_log_filter_changes_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[log]\nfilter = \"warn\"\n").unwrap();
    let server = Server::start(
        Launch::dev().arg("--config").arg(config.to_str().unwrap()),
        &dir.path().join("data"),
    )
    .await;
    assert!(
        !server.log_text().contains("INFO"),
        "info lines at warn: {}",
        server.log_text()
    );
    std::fs::write(&config, "[log]\nfilter = \"info\"\n").unwrap();
    let mut changed = false;
    for _ in 0..100 {
        if server.log_text().contains("log filter changed") {
            changed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(changed, "{}", server.log_text());
    // A bad filter is refused and the running one stays.
    std::fs::write(&config, "[log]\nfilter = \"info,=[\"\n").unwrap();
    let mut refused = false;
    for _ in 0..100 {
        if server
            .log_text()
            .contains("the config file no longer loads")
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "{}", server.log_text());
    assert_eq!(server.stop().await, 0);
}

/// Polls `receiver` until `check` holds, for up to 30 s.
async fn eventually(receiver: &OtlpReceiver, what: &str, check: impl Fn(&OtlpReceiver) -> bool) {
    for _ in 0..300 {
        if check(receiver) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{what}: not received within 30 s; got {:#?}",
        receiver.points()
    );
}

/// The value of the Prometheus series `series` (name and labels as printed) in `text`.
fn scraped(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn metrics_are_pushed_over_otlp_and_flushed_at_shutdown() {
    const COMMIT: &str = "/loyalty.promotion.v1.CheckoutService/Commit";
    let receiver = OtlpReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        Launch::dev()
            .env("LOYALTY_METRICS__OTLP_ENDPOINT", &receiver.endpoint)
            .env("LOYALTY_METRICS__EXPORT_INTERVAL_MS", "200")
            .env("LOYALTY_TRACING__SERVICE_NAME", "loyalty-pushing")
            .env("LOYALTY_SERVER__METRICS_LISTEN", "127.0.0.1:0"),
        dir.path(),
    )
    .await;
    let channel = server.channel().await;
    setup_tenant(&channel, "t1").await;
    let mut pos = Pos::new(&channel, &channel);
    let (_, card) = pos.member_with_card("t1", "+77017778800").await;
    let reply = pos
        .commit(receipt(
            "t1",
            "PUSHED-1",
            Some(&card),
            vec![line("1", "boots", "1", "100.00", false)],
        ))
        .await
        .unwrap();
    let accrued = reply.evaluation.as_ref().unwrap().points_accrued;
    assert!(accrued > 0, "{reply:?}");

    eventually(&receiver, "the commit's counters", |r| {
        r.latest(
            "loyalty_receipts_committed_total",
            &[("identified", "true")],
        )
        .is_some_and(|p| p.value == 1.0)
            && r.latest("loyalty_points_accrued_total", &[])
                .is_some_and(|p| p.value == accrued as f64)
            && r.latest(
                "grpc_server_requests_total",
                &[("method", COMMIT), ("code", "OK")],
            )
            .is_some_and(|p| p.value == 1.0)
    })
    .await;
    let receipts = receiver
        .latest(
            "loyalty_receipts_committed_total",
            &[("identified", "true")],
        )
        .unwrap();
    assert_eq!(receipts.service, "loyalty-pushing");
    assert!(receipts.monotonic, "a counter is a monotonic sum");
    let duration = receiver
        .latest(
            "grpc_server_request_duration_seconds",
            &[("method", COMMIT)],
        )
        .expect("the commit's duration histogram");
    assert_eq!(duration.value, 1.0, "one commit timed");
    assert!(duration.sum > 0.0 && duration.sum < 10.0, "{duration:?}");
    // The Prometheus endpoint tells the same.
    let text = server.scrape_metrics().await;
    assert_eq!(
        scraped(
            &text,
            "loyalty_receipts_committed_total{identified=\"true\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        scraped(&text, "loyalty_points_accrued_total"),
        Some(accrued as f64),
        "{text}"
    );
    assert_eq!(server.stop().await, 0);

    // Pushed once an hour: what arrives can only come from the push at shutdown.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        Launch::dev()
            .env("LOYALTY_METRICS__OTLP_ENDPOINT", &receiver.endpoint)
            .env("LOYALTY_METRICS__EXPORT_INTERVAL_MS", "3600000")
            .env("LOYALTY_TRACING__SERVICE_NAME", "loyalty-stopping"),
        dir.path(),
    )
    .await;
    let channel = server.channel().await;
    setup_tenant(&channel, "t1").await;
    let mut pos = Pos::new(&channel, &channel);
    pos.commit(receipt(
        "t1",
        "ANONYMOUS-1",
        None,
        vec![line("1", "boots", "1", "100.00", false)],
    ))
    .await
    .unwrap();
    let stopping = |r: &OtlpReceiver| {
        r.points().into_iter().any(|p| {
            p.service == "loyalty-stopping"
                && p.name == "loyalty_receipts_committed_total"
                && p.attribute("identified") == Some("false")
                && p.value == 1.0
        })
    };
    assert!(!stopping(&receiver), "pushed before the interval");
    assert_eq!(server.stop().await, 0);
    eventually(&receiver, "the push at shutdown", stopping).await;
}
