//! Personal data stays where it belongs, through the real binary: a day of member work
//! (registration, profile, lookups that fail, an import with a bad row, a receipt, an
//! erasure) leaves no phone, email or name in the log, and analysts reading member features
//! get no birthday; on Redis, an erasure leaves none in the append-only files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loyalty_e2e::*;
use loyalty_proto::common::v1::Date;
use loyalty_proto::identity::v1 as identity;
use loyalty_proto::segmentation::v1 as spb;

const T: &str = "t1";
const PHONE: &str = "+77017600001";
const EMAIL: &str = "dana.private@example.kz";
const FIRST: &str = "Dinara";
const LAST: &str = "Kassymova";

#[tokio::test]
async fn no_personal_data_in_logs_or_analyst_answers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin = create_key(&data, &["--role", "admin", "--tenant", T]).await;
    let analyst = create_key(&data, &["--role", "analyst", "--tenant", T]).await;
    let server = Server::start(
        Launch::dev()
            .env("LOYALTY_AUTH__MODE", "required")
            .env("LOYALTY_LOG__FORMAT", "json")
            .env("LOYALTY_IDENTITY__SCRUB_INTERVAL_SECS", "1")
            .env("LOYALTY_SEGMENTATION__SCRUB_INTERVAL_SECS", "1")
            .env("RUST_LOG", "debug"),
        &data,
    )
    .await;
    let channel = server.channel().await;
    let mut members = identity::member_service_client::MemberServiceClient::new(channel.clone());

    let member = members
        .register_member(with_key(
            identity::RegisterMemberRequest {
                tenant_id: T.into(),
                phone: PHONE.into(),
                email: EMAIL.into(),
                first_name: FIRST.into(),
                last_name: LAST.into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap();
    members
        .update_profile(with_key(
            identity::UpdateProfileRequest {
                tenant_id: T.into(),
                member_id: member.member_id.clone(),
                member: Some(identity::Member {
                    birthday: Some(Date {
                        year: 1991,
                        month: 4,
                        day: 12,
                    }),
                    ..Default::default()
                }),
                update_mask: vec!["birthday".into()],
            },
            &admin,
        ))
        .await
        .unwrap();
    // Failures that echo what the caller sent.
    let twice = members
        .register_member(with_key(
            identity::RegisterMemberRequest {
                tenant_id: T.into(),
                phone: PHONE.into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(twice.code(), tonic::Code::AlreadyExists);
    use identity::lookup_member_request::Key;
    for key in [
        Key::Phone("+77017600999".into()),
        Key::Email("nobody.private@example.kz".into()),
    ] {
        members
            .lookup_member(with_key(
                identity::LookupMemberRequest {
                    tenant_id: T.into(),
                    key: Some(key),
                    default_region: String::new(),
                },
                &admin,
            ))
            .await
            .unwrap_err();
    }
    let mut replies = members
        .import_members(with_key(
            tokio_stream::iter(vec![identity::ImportMembersRequest {
                tenant_id: T.into(),
                import_id: "old".into(),
                rows: vec![identity::ImportMemberRow {
                    row_number: 1,
                    phone: "not-a-phone-Kassymova".into(),
                    first_name: "Aliya".into(),
                    ..Default::default()
                }],
            }]),
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    assert_eq!(reply.errors.len(), 1);

    // Segmentation knows the birthday (segments use it); analysts do not see it.
    let segments =
        spb::segmentation_service_client::SegmentationServiceClient::new(channel.clone());
    let features = |key: String| {
        let mut segments = segments.clone();
        let member_id = member.member_id.clone();
        async move {
            for _ in 0..100 {
                let f = segments
                    .get_member_features(with_key(
                        spb::GetMemberFeaturesRequest {
                            tenant_id: T.into(),
                            member_id: member_id.clone(),
                        },
                        &key,
                    ))
                    .await;
                if let Ok(f) = f
                    && let Some(f) = f.into_inner().features
                    && f.registered_at.is_some()
                {
                    return f;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            panic!("segmentation never learned of the member");
        }
    };
    for _ in 0..100 {
        if features(admin.clone()).await.birthday.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(features(admin.clone()).await.birthday.unwrap().year, 1991);
    assert!(features(analyst.clone()).await.birthday.is_none());

    members
        .erase_member(with_key(
            identity::EraseMemberRequest {
                tenant_id: T.into(),
                member_id: member.member_id.clone(),
                actor: Some(loyalty_proto::common::v1::Actor {
                    id: "dpo".into(),
                    comment: String::new(),
                }),
            },
            &admin,
        ))
        .await
        .unwrap();

    // The audit log holds every one of these admin calls, and none of the data.
    let mut audit = loyalty_proto::reporting::v1::audit_service_client::AuditServiceClient::new(
        channel.clone(),
    );
    let mut records = Vec::new();
    for _ in 0..200 {
        records = audit
            .list_audit_records(with_key(
                loyalty_proto::reporting::v1::ListAuditRecordsRequest {
                    tenant_id: T.into(),
                    ..Default::default()
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner()
            .records;
        if records.iter().any(|r| r.method.ends_with("/EraseMember"))
            && records.iter().all(|r| !r.in_flight)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(records.len() >= 5, "{records:?}");
    // Identity and segmentation rewrite their stores once an erasure left replaced bytes in
    // their free space; segmentation has dropped the birthday.
    let rewritten = [
        "identity's store rewritten: nothing erased remains in it",
        "segmentation's store rewritten: nothing erased remains in it",
    ];
    for _ in 0..200 {
        let log = server.log_text();
        if rewritten.iter().all(|line| log.contains(line)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let log = server.log_text();
    for line in rewritten {
        assert!(log.contains(line), "{line:?} is not in the log");
    }
    assert!(features(admin.clone()).await.birthday.is_none());

    let log = server.log_text();
    assert_eq!(server.stop().await, 0);
    // Nothing of the erased member is left in any data file: identity's store, the event
    // log, segmentation's features, reporting's facts and audit log.
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        for secret in [&PHONE[1..], EMAIL, FIRST, LAST] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret:?} is in {}",
                path.display()
            );
        }
    }
    // The log was written during the calls (the erasure's audit line is there).
    assert!(log.contains("member erased"), "{log}");
    let secret_part = admin.rsplit('_').next().unwrap().to_string();
    for secret in [
        &PHONE[1..],
        "7017600999",
        EMAIL,
        "nobody.private",
        FIRST,
        LAST,
        "Aliya",
        &secret_part,
    ] {
        assert!(
            !log.contains(secret),
            "{secret:?} is in the log:\n{}",
            log.lines()
                .filter(|l| l.contains(secret))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Every file under `dir` (recursively) that holds one of `secrets`.
fn files_holding(dir: &std::path::Path, secrets: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).unwrap_or_default();
            for secret in secrets {
                if bytes.windows(secret.len()).any(|w| w == secret.as_bytes()) {
                    found.push(format!("{secret:?} in {}", path.display()));
                }
            }
        }
    }
    found
}

/// With identity on a Redis that keeps an append-only file, the member's data reaches that
/// file, and after the erasure identity's scrub rewrites it: none is left (with the scrub
/// off, the test finds all of it still there).
#[tokio::test]
async fn an_erasure_leaves_nothing_in_the_redis_append_only_files() {
    let redis = loyalty_platform::redis_server::RedisServer::start_with_aof().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        Launch::dev()
            .env("LOYALTY_IDENTITY__STORE", "redis")
            .env("LOYALTY_STORAGE__REDIS__URL", &redis.url())
            .env("LOYALTY_IDENTITY__SCRUB_INTERVAL_SECS", "1"),
        dir.path(),
    )
    .await;
    let channel = server.channel().await;
    let mut members = identity::member_service_client::MemberServiceClient::new(channel.clone());
    let member = members
        .register_member(identity::RegisterMemberRequest {
            tenant_id: T.into(),
            phone: PHONE.into(),
            email: EMAIL.into(),
            first_name: FIRST.into(),
            last_name: LAST.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap();
    let secrets = [&PHONE[1..], EMAIL, FIRST, LAST];
    // The registration reached the append-only file (written within about a second).
    for _ in 0..100 {
        if files_holding(redis.dir(), &secrets).len() >= secrets.len() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        files_holding(redis.dir(), &secrets).len() >= secrets.len(),
        "the member never reached the append-only file"
    );
    members
        .erase_member(identity::EraseMemberRequest {
            tenant_id: T.into(),
            member_id: member.member_id.clone(),
            actor: Some(loyalty_proto::common::v1::Actor {
                id: "dpo".into(),
                comment: String::new(),
            }),
        })
        .await
        .unwrap();
    let mut left = Vec::new();
    for _ in 0..200 {
        left = files_holding(redis.dir(), &secrets);
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(left.is_empty(), "after the erasure: {left:?}");
    assert!(!std::fs::exists(dir.path().join("identity.redb")).unwrap());
    assert_eq!(server.stop().await, 0);
}
