//! Microservices mode: identity alone in one process, the other four in another, each with
//! its own data dir, completing the skeleton checkout together over gRPC; and two identity
//! replicas, and two promotion replicas, sharing their state in Redis.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loyalty_e2e::*;
use loyalty_platform::redis_server::RedisServer;
use promotion::campaign_service_client::CampaignServiceClient;
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

/// A 50% discount for everyone, at most `uses` receipts.
fn half_off(tenant: &str, id: &str, uses: i64) -> promotion::Campaign {
    promotion::Campaign {
        tenant_id: tenant.into(),
        campaign_id: id.into(),
        name: id.into(),
        status: promotion::CampaignStatus::Active as i32,
        mechanic: Some(promotion::campaign::Mechanic::ThresholdDiscount(
            promotion::ThresholdDiscount {
                scope: None,
                steps: vec![promotion::DiscountStep {
                    from_value: dec("0"),
                    benefit: Some(promotion::discount_step::Benefit::Percent(
                        loyalty_proto::common::v1::Decimal { value: "50".into() },
                    )),
                }],
            },
        )),
        budget: Some(promotion::Budget {
            max_uses: uses,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn discount(e: &promotion::Evaluation) -> String {
    e.discount
        .as_ref()
        .map(|d| d.value.clone())
        .unwrap_or_default()
}

/// Two promotion processes on `promotion.store = "redis"` are replicas of one service: a
/// campaign created on one applies on the other's next request, a budget is granted exactly
/// across both, and a receipt committed on one is a retry on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_replicas_on_redis_share_campaigns_budgets_and_receipts() {
    let redis = RedisServer::start().unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let core = Server::start(
        Launch::serve("identity,balance,segmentation,reporting").on_redis(&redis.url()),
        dirs[0].path(),
    )
    .await;
    let mut replicas = Vec::new();
    for dir in &dirs[1..] {
        replicas.push(
            Server::start(
                Launch::serve("promotion")
                    .on_redis(&redis.url())
                    .env("LOYALTY_PROMOTION__STORE", "redis")
                    .env("LOYALTY_PEERS__IDENTITY", &core.url())
                    .env("LOYALTY_PEERS__BALANCE", &core.url())
                    .env("LOYALTY_PEERS__SEGMENTATION", &core.url()),
                dir.path(),
            )
            .await,
        );
    }
    let core_channel = core.channel().await;
    let mut channels = Vec::new();
    for r in &replicas {
        let channel = r.channel().await;
        wait_for(
            &channel,
            "loyalty.promotion.v1.CheckoutService",
            ServingStatus::Serving,
        )
        .await;
        channels.push(channel);
    }

    // The program, catalog and campaign go in through replica 1 ...
    setup_tenant(&channels[0], "t1").await;
    CampaignServiceClient::new(channels[0].clone())
        .create_campaign(promotion::CreateCampaignRequest {
            campaign: Some(half_off("t1", "first10", 10)),
            actor: None,
        })
        .await
        .unwrap();
    // ... and replica 2 prices with them on its next request.
    let mut pos2 = Pos::new(&core_channel, &channels[1]);
    let quoted = pos2
        .checkout
        .quote(promotion::QuoteRequest {
            receipt: Some(receipt(
                "t1",
                "Q",
                None,
                vec![line("1", "socks", "1", "100.00", false)],
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .evaluation
        .unwrap();
    assert_eq!(discount(&quoted), "50.00");

    // 60 tills, half on each replica, race for a budget of 10 uses.
    let mut tasks = Vec::new();
    for i in 0..60 {
        let mut pos = Pos::new(&core_channel, &channels[i % 2]);
        tasks.push(tokio::spawn(async move {
            pos.commit(receipt(
                "t1",
                &format!("B-{i}"),
                None,
                vec![line("1", "socks", "1", "100.00", false)],
            ))
            .await
        }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap().unwrap());
    }
    let granted = replies
        .iter()
        .filter(|r| discount(r.evaluation.as_ref().unwrap()) == "50.00")
        .count();
    assert_eq!(granted, 10, "the budget holds across both replicas");

    // A receipt committed on one replica is a retry on the other: the stored reply, no
    // second use of the budget.
    for (i, first) in replies.iter().enumerate().take(4) {
        let mut other = Pos::new(&core_channel, &channels[(i + 1) % 2]);
        let again = other
            .commit(receipt(
                "t1",
                &format!("B-{i}"),
                None,
                vec![line("1", "socks", "1", "100.00", false)],
            ))
            .await
            .unwrap();
        assert_eq!(again.evaluation, first.evaluation, "B-{i}");
    }
    let purchase = pos2
        .checkout
        .get_purchase(promotion::GetPurchaseRequest {
            tenant_id: "t1".into(),
            receipt_id: "B-0".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .purchase
        .unwrap();
    assert_eq!(purchase.evaluation, replies[0].evaluation);
    // Nothing of promotion's is in the replicas' data directories.
    for dir in &dirs[1..] {
        assert!(!std::fs::exists(dir.path().join("promotion.redb")).unwrap());
    }

    // Replica 1 is killed in the middle of 40 identified commits; the tills retry them all on
    // replica 2, which finishes what replica 1 left pending: each receipt accrues once.
    let mut at_core = Pos::new(&core_channel, &core_channel);
    let (member, card) = at_core.member_with_card("t1", "+77015550101").await;
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let boots = |i: usize, card: &str| {
        receipt(
            "t1",
            &format!("K-{i}"),
            Some(card),
            vec![line("1", "boots", "1", "100.00", false)],
        )
    };
    let mut in_flight = Vec::new();
    for i in 0..40 {
        let mut pos = Pos::new(&core_channel, &channels[0]);
        let (r, answered) = (boots(i, &card), answered.clone());
        in_flight.push(tokio::spawn(async move {
            let outcome = pos.commit(r).await;
            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            outcome
        }));
    }
    while answered.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let mut killed = replicas.remove(0);
    killed.child.start_kill().unwrap();
    killed.child.wait().await.unwrap();
    let acknowledged = futures_util::future::join_all(in_flight)
        .await
        .into_iter()
        .filter(|t| matches!(t, Ok(Ok(_))))
        .count();
    let mut survivor = Pos::new(&core_channel, &channels[1]);
    for i in 0..40 {
        survivor.commit(boots(i, &card)).await.unwrap();
    }
    let b = at_core.balance("t1", &member).await;
    assert_eq!(
        (b.active, b.ledger_sequence),
        (40 * 100, 40),
        "{acknowledged} of 40 were acknowledged before the kill"
    );

    // With authentication off, checkout's calls to balance still act as a service: they
    // are not in the audit log as an admin's changes. An admin's adjustment is.
    balance::balance_service_client::BalanceServiceClient::new(core_channel.clone())
        .adjust(balance::AdjustRequest {
            tenant_id: "t1".into(),
            member_id: member.clone(),
            idempotency_key: "goodwill-1".into(),
            amount: 1,
            actor: Some(loyalty_proto::common::v1::Actor {
                id: "manager:anna".into(),
                comment: "goodwill".into(),
            }),
        })
        .await
        .unwrap();
    use loyalty_proto::reporting::v1 as reporting;
    let mut audit = reporting::audit_service_client::AuditServiceClient::new(core_channel.clone());
    let mut methods = Vec::new();
    for _ in 0..200 {
        methods = audit
            .list_audit_records(reporting::ListAuditRecordsRequest {
                tenant_id: "t1".into(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .records
            .into_iter()
            .map(|r| r.method)
            .collect();
        if methods.iter().any(|m| m.ends_with("/Adjust")) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        methods.iter().any(|m| m.ends_with("/Adjust")),
        "{methods:?}"
    );
    assert!(
        !methods
            .iter()
            .any(|m| m.contains("BalanceService/") && !m.ends_with("/Adjust")),
        "{methods:?}"
    );

    for r in replicas {
        assert_eq!(r.stop().await, 0);
    }
    assert_eq!(core.stop().await, 0);
}

/// `loyalty copy-promotion` moves a dev data directory's promotion state into Redis: started
/// again on `promotion.store = "redis"`, the process knows the purchases, campaigns and
/// budgets it had.
#[tokio::test]
async fn copy_promotion_moves_the_embedded_state_into_redis() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    setup_tenant(&channel, "t1").await;
    CampaignServiceClient::new(channel.clone())
        .create_campaign(promotion::CreateCampaignRequest {
            campaign: Some(half_off("t1", "first2", 2)),
            actor: None,
        })
        .await
        .unwrap();
    let mut pos = Pos::new(&channel, &channel);
    let (member, card) = pos.member_with_card("t1", "+77015550202").await;
    let boots = |i: usize| {
        receipt(
            "t1",
            &format!("M-{i}"),
            Some(&card),
            vec![line("1", "boots", "1", "100.00", false)],
        )
    };
    let mut first = Vec::new();
    for i in 0..3 {
        first.push(pos.commit(boots(i)).await.unwrap());
    }
    let discounted = |r: &promotion::CommitResponse| discount(r.evaluation.as_ref().unwrap());
    assert_eq!(first.iter().filter(|r| discounted(r) == "50.00").count(), 2);
    let points = pos.balance("t1", &member).await.active;
    assert_eq!(server.stop().await, 0);

    let out = command(
        &[
            "copy-promotion".into(),
            "--data-dir".into(),
            dir.path().display().to_string(),
        ],
        &[("LOYALTY_STORAGE__REDIS__URL".into(), redis.url())],
    )
    .output()
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("1 tenants, 3 purchases, 1 campaigns"),
        "{said}"
    );

    let server = Server::start(
        Launch::dev()
            .env("LOYALTY_PROMOTION__STORE", "redis")
            .env("LOYALTY_STORAGE__REDIS__URL", &redis.url()),
        dir.path(),
    )
    .await;
    let channel = server.channel().await;
    let mut pos = Pos::new(&channel, &channel);
    // A retry gets the stored reply; the budget of two is used up; a refund finds its receipt.
    let again = pos.commit(boots(0)).await.unwrap();
    assert_eq!(again.evaluation, first[0].evaluation);
    let next = pos.commit(boots(3)).await.unwrap();
    assert_eq!(
        discounted(&next),
        "0",
        "the copied budget counts the two uses"
    );
    pos.refund("t1", "M-1", "r1", &[("1", "1")]).await.unwrap();
    // M-3 accrued 1% of 100.00; the refund of M-1 (paid 50.00) took its 0.50 back.
    assert_eq!(pos.balance("t1", &member).await.active, points + 100 - 50);
    assert_eq!(server.stop().await, 0);
}

fn manager() -> Option<loyalty_proto::common::v1::Actor> {
    Some(loyalty_proto::common::v1::Actor {
        id: "manager:anna".into(),
        comment: "asked at the desk".into(),
    })
}

async fn lookup_card(
    channel: &tonic::transport::Channel,
    tenant: &str,
    card: &str,
) -> Result<String, tonic::Status> {
    identity::member_service_client::MemberServiceClient::new(channel.clone())
        .lookup_member(identity::LookupMemberRequest {
            tenant_id: tenant.into(),
            key: Some(identity::lookup_member_request::Key::CardNumber(
                card.into(),
            )),
            default_region: String::new(),
        })
        .await
        .map(|r| r.into_inner().member.unwrap().member_id)
}

async fn lookup_phone(
    channel: &tonic::transport::Channel,
    tenant: &str,
    phone: &str,
) -> Result<String, tonic::Status> {
    identity::member_service_client::MemberServiceClient::new(channel.clone())
        .lookup_member(identity::LookupMemberRequest {
            tenant_id: tenant.into(),
            key: Some(identity::lookup_member_request::Key::Phone(phone.into())),
            default_region: String::new(),
        })
        .await
        .map(|r| r.into_inner().member.unwrap().member_id)
}

/// Two identity processes on `identity.store = "redis"` are replicas of one service: a member
/// registered on one is found on the other, a card blocked on one is refused by the other on
/// its next lookup, a phone raced for from both makes one member, merges, erasures and API
/// keys made on one hold on the other, and the survivor of a SIGKILL serves everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_replicas_on_redis_share_members_cards_and_keys() {
    let redis = RedisServer::start().unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let shared = |services: &str| {
        Launch::serve(services)
            .on_redis(&redis.url())
            .env("LOYALTY_IDENTITY__STORE", "redis")
    };
    // Replica 1 runs beside balance (merges move points), replica 2 alone asks it.
    let mut replicas = vec![Server::start(shared("identity,balance"), dirs[0].path()).await];
    let second = shared("identity").env("LOYALTY_PEERS__BALANCE", &replicas[0].url());
    replicas.push(Server::start(second, dirs[1].path()).await);
    let ids: Vec<_> = futures_util::future::join_all(replicas.iter().map(Server::channel)).await;
    // Promotion and the rest, asking replica 2 about members.
    let core = Server::start(
        Launch::serve("promotion,segmentation,reporting")
            .on_redis(&redis.url())
            .env("LOYALTY_PEERS__IDENTITY", &replicas[1].url())
            .env("LOYALTY_PEERS__BALANCE", &replicas[0].url()),
        dirs[2].path(),
    )
    .await;
    let core_channel = core.channel().await;
    wait_for(
        &core_channel,
        "loyalty.promotion.v1.CheckoutService",
        ServingStatus::Serving,
    )
    .await;
    setup_tenant(&core_channel, "t1").await;

    // Registered and carded on replica 2, found on replica 1, and earning at the till.
    let mut pos2 = Pos::new(&ids[1], &core_channel);
    let (member, card) = pos2.member_with_card("t1", "+77015550101").await;
    assert_eq!(lookup_card(&ids[0], "t1", &card).await.unwrap(), member);
    assert_eq!(
        lookup_phone(&ids[0], "t1", "+77015550101").await.unwrap(),
        member
    );
    let mut pos1 = Pos::new(&ids[0], &core_channel);
    let reply = pos1
        .commit(receipt(
            "t1",
            "R-1",
            Some(&card),
            vec![line("1", "boots", "1", "1000.00", false)],
        ))
        .await
        .unwrap();
    assert!(reply.points_balance > 0, "{reply:?}");

    // 20 tills, half on each replica, register one phone: one member.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut members =
            identity::member_service_client::MemberServiceClient::new(ids[i % 2].clone());
        tasks.push(tokio::spawn(async move {
            members
                .register_member(identity::RegisterMemberRequest {
                    tenant_id: "t1".into(),
                    phone: "+77015550202".into(),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().member.unwrap().member_id)
        }));
    }
    let mut made = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(id) => made.push(id),
            Err(e) => assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}"),
        }
    }
    assert_eq!(
        made.len(),
        1,
        "one member per phone across replicas: {made:?}"
    );
    let duplicate = made.remove(0);
    let dup_card = pos1
        .cards
        .issue_card(identity::IssueCardRequest {
            tenant_id: "t1".into(),
            member_id: duplicate.clone(),
            kind: identity::CardKind::Virtual as i32,
            number: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap()
        .number;

    // Merged on replica 1: replica 2 finds the survivor by the duplicate's card and phone.
    let survivor = pos1
        .members
        .merge_members(identity::MergeMembersRequest {
            tenant_id: "t1".into(),
            survivor_member_id: member.clone(),
            duplicate_member_id: duplicate.clone(),
            actor: manager(),
        })
        .await
        .unwrap()
        .into_inner()
        .survivor
        .unwrap();
    assert_eq!(survivor.member_id, member);
    assert_eq!(lookup_card(&ids[1], "t1", &dup_card).await.unwrap(), member);
    assert_eq!(
        lookup_phone(&ids[1], "t1", "+77015550202").await.unwrap(),
        member
    );

    // Blocked on replica 1: replica 2 refuses the card on its next lookup, and so does the
    // till, whose checkout asks replica 2.
    pos1.cards
        .block_card(identity::BlockCardRequest {
            tenant_id: "t1".into(),
            number: card.clone(),
            reason: identity::BlockReason::Lost as i32,
            actor: manager(),
        })
        .await
        .unwrap();
    let err = lookup_card(&ids[1], "t1", &card).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("blocked (lost)"), "{err:?}");
    let err = pos2
        .commit(receipt(
            "t1",
            "R-2",
            Some(&card),
            vec![line("1", "boots", "1", "1000.00", false)],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("blocked"), "{err:?}");

    // An API key made on replica 1 is listed by replica 2.
    let made = identity::access_service_client::AccessServiceClient::new(ids[0].clone())
        .create_api_key(identity::CreateApiKeyRequest {
            tenant_id: "t1".into(),
            role: identity::Role::Pos as i32,
            store_id: "s1".into(),
            member_id: String::new(),
            name: "till 7".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap();
    let listed = identity::access_service_client::AccessServiceClient::new(ids[1].clone())
        .list_api_keys(identity::ListApiKeysRequest {
            tenant_id: "t1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .api_keys;
    assert!(listed.iter().any(|k| k.key_id == made.key_id), "{listed:?}");

    // Erased on replica 2: the phone is free on replica 1.
    identity::member_service_client::MemberServiceClient::new(ids[1].clone())
        .erase_member(identity::EraseMemberRequest {
            tenant_id: "t1".into(),
            member_id: member.clone(),
            actor: manager(),
        })
        .await
        .unwrap();
    let err = lookup_phone(&ids[0], "t1", "+77015550101")
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let again = pos1.member_with_card("t1", "+77015550101").await;
    assert_ne!(again.0, member);

    // Replica 2 killed: replica 1 serves every member, nothing of identity's on either disk.
    let mut second = replicas.remove(1);
    second.child.start_kill().unwrap();
    second.child.wait().await.unwrap();
    assert_eq!(lookup_card(&ids[0], "t1", &again.1).await.unwrap(), again.0);
    for dir in &dirs[..2] {
        assert!(!std::fs::exists(dir.path().join("identity.redb")).unwrap());
    }
    assert_eq!(core.stop().await, 0);
    assert_eq!(replicas.remove(0).stop().await, 0);
}

/// `loyalty copy-identity` moves a dev data directory's members, cards, merges and API keys
/// into Redis; a server on `identity.store = "redis"` then answers as before, and one pointed
/// at an empty Redis beside the file refuses to start rather than show every member gone.
#[tokio::test]
async fn copy_identity_moves_the_embedded_state_into_redis() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    setup_tenant(&channel, "t1").await;
    let mut pos = Pos::new(&channel, &channel);
    let (kept, kept_card) = pos.member_with_card("t1", "+77015550303").await;
    let (dup, dup_card) = pos.member_with_card("t1", "+77015550304").await;
    pos.members
        .merge_members(identity::MergeMembersRequest {
            tenant_id: "t1".into(),
            survivor_member_id: kept.clone(),
            duplicate_member_id: dup.clone(),
            actor: manager(),
        })
        .await
        .unwrap();
    let (blocked, blocked_card) = pos.member_with_card("t1", "+77015550305").await;
    pos.cards
        .block_card(identity::BlockCardRequest {
            tenant_id: "t1".into(),
            number: blocked_card.clone(),
            reason: identity::BlockReason::Stolen as i32,
            actor: manager(),
        })
        .await
        .unwrap();
    let key = identity::access_service_client::AccessServiceClient::new(channel.clone())
        .create_api_key(identity::CreateApiKeyRequest {
            tenant_id: "t1".into(),
            role: identity::Role::Pos as i32,
            store_id: "s1".into(),
            member_id: String::new(),
            name: "till 1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap();
    assert_eq!(server.stop().await, 0);

    // On an empty Redis beside the file, the server refuses to start.
    let on_redis = [
        ("LOYALTY_IDENTITY__STORE".to_string(), "redis".to_string()),
        ("LOYALTY_STORAGE__REDIS__URL".into(), redis.url()),
    ];
    let dev = [
        "dev".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.path().display().to_string(),
    ];
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        command(&dev, &on_redis).output(),
    )
    .await
    .expect("a server beside an uncopied identity.redb must not start")
    .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(said.contains("loyalty copy-identity"), "{said}");

    let copy = |args: &[&str]| {
        let mut all = vec!["copy-identity".to_string()];
        all.extend(args.iter().map(|a| (*a).to_string()));
        command(&all, &on_redis[1..]).output()
    };
    let out = copy(&["--data-dir", &dir.path().display().to_string()])
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("1 tenants, 3 members, 3 cards, 1 API keys"),
        "{said}"
    );
    let again = copy(&["--data-dir", &dir.path().display().to_string()])
        .await
        .unwrap();
    assert!(!again.status.success(), "a second copy is refused");

    let mut launch = Launch::dev();
    for (k, v) in &on_redis {
        launch = launch.env(k, v);
    }
    let server = Server::start(launch, dir.path()).await;
    let channel = server.channel().await;
    assert_eq!(lookup_card(&channel, "t1", &kept_card).await.unwrap(), kept);
    assert_eq!(lookup_card(&channel, "t1", &dup_card).await.unwrap(), kept);
    assert_eq!(
        lookup_phone(&channel, "t1", "+77015550304").await.unwrap(),
        kept,
        "the merged member's phone finds the survivor"
    );
    let err = lookup_card(&channel, "t1", &blocked_card)
        .await
        .unwrap_err();
    assert!(err.message().contains("blocked (stolen)"), "{err:?}");
    let err = identity::member_service_client::MemberServiceClient::new(channel.clone())
        .register_member(identity::RegisterMemberRequest {
            tenant_id: "t1".into(),
            phone: "+77015550305".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{blocked}: {err:?}");
    let listed = identity::access_service_client::AccessServiceClient::new(channel.clone())
        .list_api_keys(identity::ListApiKeysRequest {
            tenant_id: "t1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .api_keys;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key_id, key.key_id);
    assert_eq!(server.stop().await, 0);
}

/// Identity on Redis through a Redis crash: while Redis is down, lookups and registrations
/// fail `UNAVAILABLE` (a till retries) and identity reports NOT_SERVING; once Redis is back
/// with its append-only file, the same members answer again, with no restart of identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_on_redis_rides_out_a_redis_crash() {
    let mut redis = RedisServer::start_with_aof().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        Launch::dev()
            .env("LOYALTY_IDENTITY__STORE", "redis")
            .env("LOYALTY_STORAGE__REDIS__URL", &redis.url())
            .env("LOYALTY_SERVER__HEALTH_INTERVAL_SECS", "1"),
        dir.path(),
    )
    .await;
    let channel = server.channel().await;
    let mut pos = Pos::new(&channel, &channel);
    let (member, card) = pos.member_with_card("t1", "+77015550606").await;
    // The append-only file is written once a second.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;

    redis.kill();
    let err = lookup_card(&channel, "t1", &card).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let err = pos
        .members
        .register_member(identity::RegisterMemberRequest {
            tenant_id: "t1".into(),
            phone: "+77015550607".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    wait_for(
        &channel,
        "loyalty.identity.v1.MemberService",
        ServingStatus::NotServing,
    )
    .await;

    redis.restart().unwrap();
    let mut found = Err(tonic::Status::unavailable("not yet"));
    for _ in 0..100 {
        found = lookup_card(&channel, "t1", &card).await;
        if found.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(found.unwrap(), member);
    wait_for(
        &channel,
        "loyalty.identity.v1.MemberService",
        ServingStatus::Serving,
    )
    .await;
    assert_eq!(server.stop().await, 0);
}
