//! The audit log through the real binary: admins' changes in identity, balance and promotion
//! are recorded with who, when, what, before and after; reads are not; personal data and key
//! secrets never enter a record; the log is listed (newest first, filtered, paged) and
//! exported (oldest first, resumable) by admins of the tenant only, and survives a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use loyalty_e2e::*;
use loyalty_proto::balance::v1 as bpb;
use loyalty_proto::common::v1::{Actor, Decimal};
use loyalty_proto::identity::v1 as ipb;
use loyalty_proto::promotion::v1 as ppb;
use loyalty_proto::reporting::v1 as rpb;
use serde_json::Value;
use tonic::Code;
use tonic::transport::Channel;

const T: &str = "t1";
const PHONE: &str = "+77017600042";
const EMAIL: &str = "aigerim.private@example.kz";
const FIRST: &str = "Aigerim";

fn key_id(key: &str) -> String {
    key.trim_start_matches("lk_")
        .split('_')
        .next()
        .unwrap()
        .to_string()
}

fn program(percent: &str) -> ppb::Program {
    ppb::Program {
        tenant_id: T.into(),
        currency: "KZT".into(),
        point_minor_units: 100,
        base_accrual: Some(ppb::program::BaseAccrual::AccrualPercent(Decimal {
            value: percent.into(),
        })),
        point_value: dec("1"),
        max_redeem_percent: dec("20"),
        point_lifetime_days: 180,
        ..Default::default()
    }
}

fn actor(comment: &str) -> Option<Actor> {
    Some(Actor {
        id: "manager:anna".into(),
        comment: comment.into(),
    })
}

async fn list(
    channel: &Channel,
    key: &str,
    filter: rpb::AuditFilter,
    page_size: i32,
    page_token: &str,
) -> Result<rpb::ListAuditRecordsResponse, tonic::Status> {
    rpb::audit_service_client::AuditServiceClient::new(channel.clone())
        .list_audit_records(with_key(
            rpb::ListAuditRecordsRequest {
                tenant_id: T.into(),
                filter: Some(filter),
                page_size,
                page_token: page_token.into(),
            },
            key,
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// Every record of the tenant, newest first, once `want` have arrived and each has its
/// answer (the log is fed from the event stream: a call's start may be read before its
/// answer).
async fn all_records(channel: &Channel, key: &str, want: usize) -> Vec<rpb::AuditRecord> {
    for _ in 0..200 {
        let page = list(channel, key, rpb::AuditFilter::default(), 1000, "")
            .await
            .unwrap();
        if page.records.len() >= want && page.records.iter().all(|r| !r.in_flight) {
            return page.records;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the audit log never reached {want} records");
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test]
async fn admins_changes_are_audited_listed_and_exported() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin = create_key(&data, &["--role", "admin", "--tenant", T]).await;
    let other_admin = create_key(&data, &["--role", "admin", "--tenant", "t2"]).await;
    let analyst = create_key(&data, &["--role", "analyst", "--tenant", T]).await;
    let launch = || {
        Launch::dev()
            .env("LOYALTY_AUTH__MODE", "required")
            .env("LOYALTY_SERVER__METRICS_LISTEN", "127.0.0.1:0")
    };
    let server = Server::start(launch(), &data).await;
    let channel = server.channel().await;

    // Promotion: the program, twice (the second record has the first as its before).
    let mut programs = ppb::program_service_client::ProgramServiceClient::new(channel.clone());
    for percent in ["1", "2"] {
        programs
            .update_program(with_key(
                ppb::UpdateProgramRequest {
                    program: Some(program(percent)),
                    expected_version: 0,
                    actor: actor("new rate"),
                },
                &admin,
            ))
            .await
            .unwrap();
    }
    // Identity: a registration with personal data, a block.
    let mut members = ipb::member_service_client::MemberServiceClient::new(channel.clone());
    let member_id = members
        .register_member(with_key(
            ipb::RegisterMemberRequest {
                tenant_id: T.into(),
                phone: PHONE.into(),
                email: EMAIL.into(),
                first_name: FIRST.into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap()
        .member_id;
    // Balance: two manual adjustments, and one refused.
    let mut balance = bpb::balance_service_client::BalanceServiceClient::new(channel.clone());
    for (key, amount) in [("goodwill-1", 500), ("goodwill-2", 100)] {
        balance
            .adjust(with_key(
                bpb::AdjustRequest {
                    tenant_id: T.into(),
                    member_id: member_id.clone(),
                    idempotency_key: key.into(),
                    amount,
                    actor: actor("complaint 17"),
                },
                &admin,
            ))
            .await
            .unwrap();
    }
    // A manual redemption by the back office is a manual balance change too.
    balance
        .redeem(with_key(
            bpb::RedeemRequest {
                tenant_id: T.into(),
                member_id: member_id.clone(),
                idempotency_key: "manual-redeem".into(),
                amount: 100,
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    let refused = balance
        .adjust(with_key(
            bpb::AdjustRequest {
                tenant_id: T.into(),
                member_id: member_id.clone(),
                idempotency_key: String::new(),
                amount: 5,
                actor: actor("no key"),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    members
        .block_member(with_key(
            ipb::BlockMemberRequest {
                tenant_id: T.into(),
                member_id: member_id.clone(),
                reason: "one card in 12 stores in an hour".into(),
                actor: actor(""),
            },
            &admin,
        ))
        .await
        .unwrap();
    // A key: its secret is answered once and never recorded.
    let created = ipb::access_service_client::AccessServiceClient::new(channel.clone())
        .create_api_key(with_key(
            ipb::CreateApiKeyRequest {
                tenant_id: T.into(),
                role: ipb::Role::Pos as i32,
                store_id: "s1".into(),
                name: "till 3".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let secret = created.secret.clone();
    // Reads are not audited.
    balance
        .get_balance(with_key(
            bpb::GetBalanceRequest {
                tenant_id: T.into(),
                member_id: member_id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap();

    let records = all_records(&channel, &admin, 9).await;
    let methods: Vec<&str> = records.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(
        methods,
        [
            "loyalty.identity.v1.AccessService/CreateApiKey",
            "loyalty.identity.v1.MemberService/BlockMember",
            "loyalty.balance.v1.BalanceService/Adjust",
            "loyalty.balance.v1.BalanceService/Redeem",
            "loyalty.balance.v1.BalanceService/Adjust",
            "loyalty.balance.v1.BalanceService/Adjust",
            "loyalty.identity.v1.MemberService/RegisterMember",
            "loyalty.promotion.v1.ProgramService/UpdateProgram",
            "loyalty.promotion.v1.ProgramService/UpdateProgram",
        ],
        "newest first, reads left out"
    );
    let admin_id = key_id(&admin);
    for r in &records {
        assert_eq!(r.key_id, admin_id);
        assert_eq!(r.role, "admin");
        assert!(r.record_time.is_some());
        // No personal data or secret anywhere in a record.
        let text = format!("{r:?}");
        for private in [PHONE, EMAIL, FIRST, secret.as_str()] {
            assert!(!text.contains(private), "{private} in {text}");
        }
    }

    // Program: before and after of the second update.
    let second = &records[7];
    assert_eq!(second.actor.as_ref().unwrap().comment, "new rate");
    let before = json(&second.before_json);
    let after = json(&second.after_json);
    assert_eq!(before["program"]["accrual_percent"]["value"], "1");
    assert_eq!(after["program"]["accrual_percent"]["value"], "2");
    assert_eq!(
        json(&second.request_json)["program"]["accrual_percent"]["value"],
        "2"
    );
    assert!(
        records[8].before_json.is_empty(),
        "the first program replaced none"
    );

    // Adjustments: who, why, and the balance before and after.
    let (refused_rec, redeemed, plus_100, plus_500) =
        (&records[2], &records[3], &records[4], &records[5]);
    assert_eq!(plus_500.member_id, member_id);
    assert_eq!(plus_500.actor.as_ref().unwrap().id, "manager:anna");
    assert_eq!(plus_500.actor.as_ref().unwrap().comment, "complaint 17");
    let active = |v: &Value| v["balance"]["active"].as_str().map(str::to_string);
    assert_eq!(json(&plus_100.request_json)["amount"], "100");
    assert_eq!(active(&json(&plus_100.before_json)).as_deref(), Some("500"));
    assert_eq!(active(&json(&plus_100.after_json)).as_deref(), Some("600"));
    assert_eq!(active(&json(&redeemed.before_json)).as_deref(), Some("600"));
    assert_eq!(active(&json(&redeemed.after_json)).as_deref(), Some("500"));
    let first = &plus_500.before_json;
    assert!(first.is_empty() || json(first)["balance"].get("active").is_none());
    assert_eq!(refused_rec.status_code, Code::InvalidArgument as i32);
    assert!(refused_rec.after_json.is_empty());
    assert_eq!(refused_rec.status_message, refused.message());
    assert_eq!(plus_500.status_code, 0);

    // Block: the member's status before and after; registration: personal data redacted.
    let block = &records[1];
    assert_eq!(
        json(&block.before_json)["member"]["status"],
        "MEMBER_STATUS_ACTIVE"
    );
    assert_eq!(
        json(&block.after_json)["member"]["status"],
        "MEMBER_STATUS_BLOCKED"
    );
    let registration = json(&records[6].request_json);
    assert_eq!(registration["phone"], "<redacted>");
    assert_eq!(registration["email"], "<redacted>");
    assert_eq!(json(&records[0].after_json)["secret"], "<redacted>");

    // Filters: by method and by member; pages continue without overlap.
    let adjustments = list(
        &channel,
        &admin,
        rpb::AuditFilter {
            method: "loyalty.balance.v1.BalanceService/Adjust".into(),
            ..Default::default()
        },
        100,
        "",
    )
    .await
    .unwrap();
    assert_eq!(adjustments.records.len(), 3);
    let of_member = list(
        &channel,
        &admin,
        rpb::AuditFilter {
            member_id: member_id.clone(),
            ..Default::default()
        },
        100,
        "",
    )
    .await
    .unwrap();
    assert_eq!(
        of_member.records.len(),
        5,
        "three adjustments, the redemption and the block"
    );
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(&channel, &admin, rpb::AuditFilter::default(), 3, &token)
            .await
            .unwrap();
        paged.extend(page.records.into_iter().map(|r| r.record_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let ids: Vec<String> = records.iter().map(|r| r.record_id.clone()).collect();
    assert_eq!(paged, ids);

    // Export: oldest first; resuming after a record gives exactly the newer ones.
    let export = |resume: String| {
        let channel = channel.clone();
        let admin = admin.clone();
        async move {
            let mut stream = rpb::audit_service_client::AuditServiceClient::new(channel)
                .export_audit_records(with_key(
                    rpb::ExportAuditRecordsRequest {
                        tenant_id: T.into(),
                        filter: None,
                        resume_token: resume,
                    },
                    &admin,
                ))
                .await
                .unwrap()
                .into_inner();
            let mut out = Vec::new();
            while let Some(chunk) = stream.message().await.unwrap() {
                out.extend(chunk.records.into_iter().map(|r| r.record_id));
            }
            out
        }
    };
    let mut oldest_first = ids.clone();
    oldest_first.reverse();
    assert_eq!(export(String::new()).await, oldest_first);
    let two = list(&channel, &admin, rpb::AuditFilter::default(), 2, "")
        .await
        .unwrap();
    assert_eq!(export(two.next_page_token).await, ids[..1].to_vec());

    // Only the tenant's admins read it; bad input is refused.
    let denied = list(&channel, &other_admin, rpb::AuditFilter::default(), 10, "")
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = list(&channel, &analyst, rpb::AuditFilter::default(), 10, "")
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let inverted = list(
        &channel,
        &admin,
        rpb::AuditFilter {
            start_time: Some(prost_types::Timestamp {
                seconds: 2_000_000_000,
                nanos: 0,
            }),
            end_time: Some(prost_types::Timestamp {
                seconds: 1_000_000_000,
                nanos: 0,
            }),
            ..Default::default()
        },
        10,
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(inverted.code(), Code::InvalidArgument);
    let bad = list(&channel, &admin, rpb::AuditFilter::default(), 5000, "")
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let bad = list(&channel, &admin, rpb::AuditFilter::default(), 10, "forged")
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    let scrape = server.scrape_metrics().await;
    assert!(
        scrape.contains("loyalty_audit_records_total{outcome=\"written\"}"),
        "{scrape}"
    );

    // Durable: the same records after a restart, none twice.
    server.stop().await;
    let server = Server::start(launch(), &data).await;
    let channel = server.channel().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = all_records(&channel, &admin, 9).await;
    let again: Vec<String> = again.into_iter().map(|r| r.record_id).collect();
    assert_eq!(again, ids);
    server.stop().await;
}

/// Microservices on Redis: the changes made in one process reach the audit log that the
/// reporting process serves, through the `audit` stream.
#[tokio::test]
async fn changes_in_one_process_reach_the_audit_log_of_another_over_redis() {
    let redis = loyalty_platform::redis_server::RedisServer::start().unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let reporting = Server::start(
        Launch::serve("reporting").on_redis(&redis.url()),
        dir_a.path(),
    )
    .await;
    let pos_node = Server::start(
        Launch::serve("identity,balance,promotion").on_redis(&redis.url()),
        dir_b.path(),
    )
    .await;
    let channel = pos_node.channel().await;
    // Authentication is off on loopback: every caller counts as an admin with key "-".
    setup_tenant(&channel, T).await;
    let member_id = ipb::member_service_client::MemberServiceClient::new(channel.clone())
        .register_member(ipb::RegisterMemberRequest {
            tenant_id: T.into(),
            phone: PHONE.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap()
        .member_id;
    bpb::balance_service_client::BalanceServiceClient::new(channel.clone())
        .adjust(bpb::AdjustRequest {
            tenant_id: T.into(),
            member_id: member_id.clone(),
            idempotency_key: "opening".into(),
            amount: 250,
            actor: actor("migration"),
        })
        .await
        .unwrap();

    let log = reporting.channel().await;
    let mut records = Vec::new();
    for _ in 0..200 {
        records = rpb::audit_service_client::AuditServiceClient::new(log.clone())
            .list_audit_records(rpb::ListAuditRecordsRequest {
                tenant_id: T.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .records;
        if records.len() >= 5 && records.iter().all(|r| !r.in_flight) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let methods: Vec<&str> = records.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(
        methods,
        [
            "loyalty.balance.v1.BalanceService/Adjust",
            "loyalty.identity.v1.MemberService/RegisterMember",
            "loyalty.promotion.v1.CatalogService/UpsertProducts",
            "loyalty.promotion.v1.CatalogService/UpsertStores",
            "loyalty.promotion.v1.ProgramService/UpdateProgram",
        ]
    );
    assert!(records.iter().all(|r| r.key_id == "-" && r.role == "admin"));
    assert_eq!(records[0].member_id, member_id);
    assert!(!format!("{records:?}").contains(PHONE));
    // The stream is in Redis, and reporting's group has taken everything.
    let out = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port().to_string(),
            "xinfo",
            "groups",
            "ev:{audit}",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("reporting"), "{text}");
    pos_node.stop().await;
    reporting.stop().await;
}

/// The log's records of one RPC in a dev-mode server with authentication off, newest first.
async fn records_of(channel: &Channel, method: &str) -> Vec<rpb::AuditRecord> {
    rpb::audit_service_client::AuditServiceClient::new(channel.clone())
        .list_audit_records(rpb::ListAuditRecordsRequest {
            tenant_id: T.into(),
            filter: Some(rpb::AuditFilter {
                method: method.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records
}

/// A process killed while an admin's call runs leaves the call's start in the log, marked in
/// flight: who sent what, and that no answer was recorded. The start is written before the
/// handler sees the request, so no change can be made that the log does not know of.
#[tokio::test]
async fn a_call_cut_short_by_a_killed_process_stays_in_the_log_in_flight() {
    const IMPORT: &str = "loyalty.identity.v1.MemberService/ImportMembers";
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;

    // An import whose stream stays open: its first chunk is imported and answered, and the
    // handler waits for more.
    let (rows, stream) = tokio::sync::mpsc::channel(4);
    rows.send(ipb::ImportMembersRequest {
        tenant_id: T.into(),
        import_id: "migration-7".into(),
        rows: vec![ipb::ImportMemberRow {
            row_number: 1,
            phone: PHONE.into(),
            first_name: FIRST.into(),
            ..Default::default()
        }],
    })
    .await
    .unwrap();
    let mut replies = ipb::member_service_client::MemberServiceClient::new(channel.clone())
        .import_members(tokio_stream::wrappers::ReceiverStream::new(stream))
        .await
        .unwrap()
        .into_inner();
    let first = replies.message().await.unwrap().unwrap();
    assert_eq!(first.rows_imported, 1, "{first:?}");

    let mut started = Vec::new();
    for _ in 0..200 {
        started = records_of(&channel, IMPORT).await;
        if !started.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let [start] = started.as_slice() else {
        panic!("one record of the running import expected: {started:?}");
    };
    assert!(start.in_flight, "{start:?}");
    assert_eq!(start.status_code, Code::Unknown as i32, "{start:?}");
    assert!(start.request_json.contains("migration-7"), "{start:?}");
    assert!(!start.request_json.contains(PHONE) && !start.request_json.contains(FIRST));
    assert!(start.after_json.is_empty());

    // No graceful shutdown: the call never gets its answer recorded.
    server.child.start_kill().unwrap();
    server.child.wait().await.unwrap();
    drop((rows, replies));

    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    let after = records_of(&channel, IMPORT).await;
    assert_eq!(
        after, started,
        "the start survives the kill, still in flight"
    );

    // A call answered normally leaves one record, its answer, in place of its start.
    let (rows, stream) = tokio::sync::mpsc::channel(1);
    rows.send(ipb::ImportMembersRequest {
        tenant_id: T.into(),
        import_id: "migration-8".into(),
        rows: vec![ipb::ImportMemberRow {
            row_number: 1,
            phone: "+77017600043".into(),
            ..Default::default()
        }],
    })
    .await
    .unwrap();
    drop(rows);
    let mut replies = ipb::member_service_client::MemberServiceClient::new(channel.clone())
        .import_members(tokio_stream::wrappers::ReceiverStream::new(stream))
        .await
        .unwrap()
        .into_inner();
    while replies.message().await.unwrap().is_some() {}
    let mut records = Vec::new();
    for _ in 0..200 {
        records = records_of(&channel, IMPORT).await;
        if records.len() == 2 && !records[0].in_flight {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(
        !records[0].in_flight && records[0].status_code == 0,
        "{records:?}"
    );
    assert!(
        records[0].request_json.contains("migration-8"),
        "{records:?}"
    );
    assert_eq!(records[1], started[0]);

    // An export without an end stops before a call of the last 15 minutes still without an
    // answer (so a resumed export reads its answer once it comes); with an end it reads all.
    let export = |end: Option<prost_types::Timestamp>| {
        let channel = channel.clone();
        async move {
            let mut chunks = rpb::audit_service_client::AuditServiceClient::new(channel)
                .export_audit_records(rpb::ExportAuditRecordsRequest {
                    tenant_id: T.into(),
                    filter: Some(rpb::AuditFilter {
                        end_time: end,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let mut ids = Vec::new();
            while let Some(chunk) = chunks.message().await.unwrap() {
                ids.extend(chunk.records.into_iter().map(|r| r.record_id));
            }
            ids
        }
    };
    assert_eq!(export(None).await, Vec::<String>::new());
    let now = std::time::SystemTime::now() + Duration::from_secs(1);
    let all = export(Some(prost_types::Timestamp::from(now))).await;
    assert_eq!(
        all,
        [started[0].record_id.clone(), records[0].record_id.clone()]
    );
    server.stop().await;
}
