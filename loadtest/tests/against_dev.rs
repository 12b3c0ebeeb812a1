//! A short run against the real `loyalty dev` completes with zero errors and writes a
//! well-formed report.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loyalty_e2e::{Launch, Server};

#[tokio::test]
async fn a_short_steady_run_completes_cleanly_with_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), &dir.path().join("data")).await;
    let out = dir.path().join("report");
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_loyalty-loadtest"))
        .args([
            "--target",
            &server.url(),
            "--scenario",
            "steady",
            "--rate",
            "200",
            "--duration",
            "3",
        ])
        .args([
            "--warmup",
            "1",
            "--members",
            "200",
            "--stores",
            "10",
            "--products",
            "300",
            "--quiet",
        ])
        .args(["--fail-on-errors", "--out"])
        .arg(&out)
        .status()
        .await
        .unwrap();
    assert!(
        status.success(),
        "load test failed; server log:\n{}",
        server.log_text()
    );

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let count = report["count"].as_u64().unwrap();
    assert!(count >= 500, "about 600 calls expected, got {count}");
    assert_eq!(
        report["statusCodeDistribution"]["OK"].as_u64(),
        Some(count),
        "every call OK"
    );
    assert_eq!(report["dropped"].as_u64(), Some(0));
    let rpcs = report["rpcs"].as_object().unwrap();
    for method in [
        "loyalty.promotion.v1.CheckoutService/Commit",
        "loyalty.promotion.v1.CheckoutService/Quote",
        "loyalty.identity.v1.MemberService/LookupMember",
    ] {
        let r = &rpcs[method];
        assert!(r["count"].as_u64().unwrap() > 0, "{method} never called");
        let dist = r["latencyDistribution"].as_array().unwrap();
        let p50 = dist.iter().find(|d| d["percentage"] == 50.0).unwrap()["latency"]
            .as_u64()
            .unwrap();
        let p99 = dist.iter().find(|d| d["percentage"] == 99.0).unwrap()["latency"]
            .as_u64()
            .unwrap();
        assert!(p50 > 0 && p50 <= p99, "{method}: p50 {p50} p99 {p99}");
    }
    assert!(report["timeline"].as_array().unwrap().len() >= 3);
    // ghz's fields: why the run ended, the latency histogram and the calls one by one.
    assert_eq!(report["endReason"], "timeout");
    let bins = report["histogram"].as_array().unwrap();
    assert_eq!(
        bins.iter()
            .map(|b| b["count"].as_u64().unwrap())
            .sum::<u64>(),
        count
    );
    let details = report["details"].as_array().unwrap();
    assert_eq!(
        details.len() as u64,
        count,
        "runs this short keep every call"
    );
    assert!(details.iter().all(|d| d["status"] == "OK"
        && d["latency"].as_u64().unwrap() > 0
        && d["timestamp"].as_str().unwrap().ends_with('Z')));
    // The seed made the model's campaigns: 100 over the categories, a birthday boost, the
    // promo code and the coupon campaign (receipts presented both, and none failed).
    let mut campaigns =
        loyalty_proto::promotion::v1::campaign_service_client::CampaignServiceClient::new(
            server.channel().await,
        );
    let listed = campaigns
        .list_campaigns(loyalty_proto::promotion::v1::ListCampaignsRequest {
            tenant_id: "loadtest".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .campaigns;
    assert_eq!(listed.len(), 103);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        html.contains("<svg") && html.contains("No call failed"),
        "{html}"
    );

    // Registrations alone, ended by a call count: every call a new member.
    let out = dir.path().join("register");
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_loyalty-loadtest"))
        .args(["--target", &server.url(), "--scenario", "register"])
        .args(["--rate", "100", "--count", "40", "--warmup", "0"])
        .args(["--members", "200", "--stores", "10", "--products", "300"])
        .args(["--skip-setup", "--quiet", "--fail-on-errors", "--out"])
        .arg(&out)
        .status()
        .await
        .unwrap();
    assert!(status.success(), "{}", server.log_text());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["endReason"], "normal");
    assert_eq!(report["count"], 40);
    assert_eq!(
        report["rpcs"]["loyalty.identity.v1.MemberService/RegisterMember"]["count"],
        40
    );
    assert_eq!(server.stop().await, 0);
}

#[tokio::test]
async fn refused_arguments_exit_2() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_loyalty-loadtest"))
        .args(["--target", "http://127.0.0.1:1", "--duration", "0"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--duration"));
}

/// Identity in one process, everything else in another: `--target identity=URL` sends the
/// identity calls (seeding, lookups, registrations) there and the rest to the other process.
#[tokio::test]
async fn per_service_targets_drive_a_split_deployment() {
    let dir = tempfile::tempdir().unwrap();
    let identity = Server::start(Launch::serve("identity"), &dir.path().join("a")).await;
    let rest = Server::start(
        Launch::serve("balance,promotion,segmentation,reporting")
            .env("LOYALTY_PEERS__IDENTITY", &identity.url()),
        &dir.path().join("b"),
    )
    .await;
    let out = dir.path().join("report");
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_loyalty-loadtest"))
        .args(["--target", &format!("identity={}", identity.url())])
        .args(["--target", &rest.url()])
        .args([
            "--scenario",
            "steady",
            "--rate",
            "100",
            "--duration",
            "2",
            "--warmup",
            "1",
        ])
        .args([
            "--members",
            "100",
            "--stores",
            "5",
            "--products",
            "100",
            "--quiet",
        ])
        .args(["--fail-on-errors", "--out"])
        .arg(&out)
        .status()
        .await
        .unwrap();
    assert!(
        status.success(),
        "load test failed; logs:\n{}\n{}",
        identity.log_text(),
        rest.log_text()
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let rpcs = report["rpcs"].as_object().unwrap();
    assert!(
        rpcs["loyalty.identity.v1.MemberService/LookupMember"]["count"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(
        rpcs["loyalty.promotion.v1.CheckoutService/Commit"]["count"]
            .as_u64()
            .unwrap()
            > 0
    );

    // A service name the tool does not know is refused.
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_loyalty-loadtest"))
        .args(["--target", "billing=http://127.0.0.1:1", "--duration", "1"])
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unknown service"));
    // A run bounded by count: exactly that many measured calls, long before the duration.
    let counted = dir.path().join("counted");
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_loyalty-loadtest"))
        .args(["--target", &format!("identity={}", identity.url())])
        .args(["--target", &rest.url()])
        .args(["--scenario", "lookup", "--closed", "4", "--count", "300"])
        .args([
            "--duration",
            "60",
            "--warmup",
            "0",
            "--members",
            "100",
            "--skip-setup",
        ])
        .args(["--quiet", "--fail-on-errors", "--out"])
        .arg(&counted)
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(counted.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(report["count"].as_u64(), Some(300));
    let seconds = report["total"].as_f64().unwrap() / 1e9;
    assert!(
        seconds < 30.0,
        "stopped by count, not by the 60 s duration: {seconds}"
    );
    assert_eq!(identity.stop().await, 0);
    assert_eq!(rest.stop().await, 0);
}

/// A server that checks keys and speaks mutual TLS: the operator's admin key provisions the
/// tenant and makes the run's POS and app keys, the traffic presents them, and they are
/// revoked at the end.
#[tokio::test]
async fn a_run_presents_per_store_and_per_member_keys_over_mutual_tls() {
    use loyalty_e2e::pki::{Ca, write};
    use loyalty_proto::identity::v1 as ipb;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut args: Vec<String> = vec!["create-key".into(), "--data-dir".into()];
    args.push(data.display().to_string());
    args.extend(["--role", "admin", "--tenant", "loadtest"].map(String::from));
    let made = loyalty_e2e::command(&args, &[]).output().await.unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let admin = String::from_utf8(made.stdout).unwrap().trim().to_string();
    let ca = Ca::new("loadtest CA");
    let (cert, key) = ca.issue("localhost");
    let (client_cert, client_key) = ca.issue("loyalty-loadtest");
    let file = |name: &str, text: &str| write(dir.path(), name, text).display().to_string();
    let server = Server::start(
        Launch::dev()
            .env("LOYALTY_AUTH__MODE", "required")
            .env("LOYALTY_TLS__CERT_FILE", &file("server.pem", &cert))
            .env("LOYALTY_TLS__KEY_FILE", &file("server.key", &key))
            .env("LOYALTY_TLS__CLIENT_CA_FILE", &file("ca.pem", &ca.pem))
            .env("LOYALTY_TLS__REQUIRE_CLIENT_CERT", "true"),
        &data,
    )
    .await;
    let target = format!(
        "https://localhost:{}",
        server.addr.rsplit(':').next().unwrap()
    );
    let out = dir.path().join("report");
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_loyalty-loadtest"))
        .args(["--target", &target, "--scenario", "steady"])
        .args(["--rate", "100", "--count", "150", "--warmup", "0"])
        .args(["--members", "60", "--stores", "4", "--products", "100"])
        .args(["--campaigns", "5", "--app-keys", "20"])
        .args(["--ca", &file("ca.pem", &ca.pem)])
        .args(["--cert", &file("client.pem", &client_cert)])
        .args(["--key", &file("client.key", &client_key)])
        .env("LOYALTY_API_KEY", &admin)
        .args(["--quiet", "--fail-on-errors", "--out"])
        .arg(&out)
        .output()
        .await
        .unwrap();
    assert!(
        run.status.success(),
        "load test failed:\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&run.stderr),
        server.log_text()
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["count"], 150);
    assert_eq!(report["statusCodeDistribution"]["OK"], 150);

    // Four till keys and twenty app keys were made for the run, and revoked after it.
    let channel = tonic::transport::Endpoint::from_shared(target)
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&ca.pem))
                .identity(tonic::transport::Identity::from_pem(
                    &client_cert,
                    &client_key,
                )),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut request = tonic::Request::new(ipb::ListApiKeysRequest {
        tenant_id: "loadtest".into(),
        include_revoked: true,
        page_size: 1000,
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {admin}").parse().unwrap());
    let keys = ipb::access_service_client::AccessServiceClient::new(channel)
        .list_api_keys(request)
        .await
        .unwrap()
        .into_inner()
        .api_keys;
    let made: Vec<_> = keys
        .iter()
        .filter(|k| k.name.starts_with("loyalty-loadtest"))
        .collect();
    let role = |r: ipb::Role| made.iter().filter(|k| k.role == r as i32).count();
    assert_eq!((role(ipb::Role::Pos), role(ipb::Role::App)), (4, 20));
    assert!(
        made.iter().all(|k| k.revoked_at.is_some()),
        "the run's keys outlived it"
    );
    assert!(
        keys.iter()
            .any(|k| k.role == ipb::Role::Admin as i32 && k.revoked_at.is_none())
    );
    assert_eq!(server.stop().await, 0);
}
