//! Segmentation through the real binary: purchases committed at the POS reach member features
//! over the event stream (the embedded log in dev mode, Redis Streams between processes),
//! dynamic segments follow them, and the admin API previews, explains, counts and streams.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use loyalty_e2e::*;
use loyalty_platform::redis_server::RedisServer;
use loyalty_proto::promotion::v1 as ppb;
use loyalty_proto::segmentation::v1 as spb;
use spb::segmentation_service_client::SegmentationServiceClient;
use tonic::transport::Channel;

const TENANT: &str = "seg-tenant";

async fn add_gloves(channel: &Channel) {
    ppb::catalog_service_client::CatalogServiceClient::new(channel.clone())
        .upsert_products(ppb::UpsertProductsRequest {
            tenant_id: TENANT.into(),
            products: vec![ppb::Product {
                sku: "gloves".into(),
                name: "gloves".into(),
                category: "Accessories".into(),
                brand: "Polar".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
}

fn dynamic(id: &str, predicate: &str) -> spb::CreateSegmentRequest {
    spb::CreateSegmentRequest {
        segment: Some(spb::Segment {
            tenant_id: TENANT.into(),
            segment_id: id.into(),
            name: id.into(),
            kind: spb::SegmentKind::Dynamic as i32,
            predicate: predicate.into(),
            ..Default::default()
        }),
    }
}

async fn features(
    seg: &mut SegmentationServiceClient<Channel>,
    member: &str,
) -> spb::MemberFeatures {
    seg.get_member_features(spb::GetMemberFeaturesRequest {
        tenant_id: TENANT.into(),
        member_id: member.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .features
    .unwrap()
}

/// Waits until the member's features count `receipts` purchases (events are asynchronous).
async fn wait_for_receipts(
    seg: &mut SegmentationServiceClient<Channel>,
    member: &str,
    receipts: i64,
) {
    for _ in 0..200 {
        if features(seg, member).await.purchase_count_total == receipts {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let f = features(seg, member).await;
    panic!("{member} never reached {receipts} receipts: {f:?}");
}

/// The id of the tenant's member with this phone.
async fn member_by_phone(pos: &mut Pos, phone: &str) -> String {
    pos.members
        .lookup_member(identity::LookupMemberRequest {
            tenant_id: TENANT.into(),
            key: Some(identity::lookup_member_request::Key::Phone(phone.into())),
            default_region: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap()
        .member_id
}

async fn segments_of(seg: &mut SegmentationServiceClient<Channel>, member: &str) -> Vec<String> {
    seg.get_member_segments(spb::GetMemberSegmentsRequest {
        tenant_id: TENANT.into(),
        member_id: member.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .segment_ids
}

async fn wait_for_segments(
    seg: &mut SegmentationServiceClient<Channel>,
    member: &str,
    want: &[&str],
) {
    for _ in 0..200 {
        if segments_of(seg, member).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = segments_of(seg, member).await;
    panic!("{member} is in {got:?}, expected {want:?}");
}

/// The whole flow against one POS channel and one segmentation channel.
async fn purchases_drive_segments(
    pos_channel: &Channel,
    identity_channel: &Channel,
    seg_channel: &Channel,
) {
    setup_tenant(pos_channel, TENANT).await;
    add_gloves(pos_channel).await;
    let mut pos = Pos::new(identity_channel, pos_channel);
    let mut seg = SegmentationServiceClient::new(seg_channel.clone());
    let (anna, anna_card) = pos.member_with_card(TENANT, "+77015550101").await;
    let (boris, boris_card) = pos.member_with_card(TENANT, "+77015550102").await;

    // Anna buys boots twice and gloves once; Boris buys gloves; one anonymous receipt.
    let boots = |id: &str, card: &str| {
        receipt(
            TENANT,
            id,
            Some(card),
            vec![line("l1", "boots", "1", "30000", false)],
        )
    };
    pos.commit(boots("a1", &anna_card)).await.unwrap();
    pos.commit(boots("a2", &anna_card)).await.unwrap();
    pos.commit(receipt(
        TENANT,
        "a3",
        Some(&anna_card),
        vec![line("l1", "gloves", "2", "2500", false)],
    ))
    .await
    .unwrap();
    // A retried commit publishes again; it must not count twice.
    pos.commit(boots("a2", &anna_card)).await.unwrap();
    pos.commit(receipt(
        TENANT,
        "b1",
        Some(&boris_card),
        vec![line("l1", "gloves", "1", "2500", false)],
    ))
    .await
    .unwrap();
    pos.commit(receipt(
        TENANT,
        "anon",
        None,
        vec![line("l1", "socks", "1", "900", false)],
    ))
    .await
    .unwrap();
    wait_for_receipts(&mut seg, &anna, 3).await;
    wait_for_receipts(&mut seg, &boris, 1).await;

    let f = features(&mut seg, &anna).await;
    assert_eq!(f.spend_total.as_ref().unwrap().value, "65000");
    assert_eq!(f.purchase_count_30d, 3);
    assert!(f.categories.contains_key("Shoes") && f.categories.contains_key("Accessories"));
    assert!(f.brands.contains_key("Tundra") && f.brands.contains_key("Polar"));
    assert!(f.stores.contains_key("s1"));
    assert!(
        f.points_balance > 0,
        "the balance after the last receipt: {f:?}"
    );

    // A bad predicate: the column is in the message, nothing is saved.
    let err = seg
        .create_segment(dynamic("broken", "spend_total > and contactable"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let fields = violations(&err);
    assert_eq!(fields[0].0, "segment.predicate");
    assert!(fields[0].1.contains("column 15"), "{fields:?}");
    let err = seg
        .create_segment(dynamic("broken", "spend_totl > 5"))
        .await
        .unwrap_err();
    assert!(violations(&err)[0].1.contains("unknown feature"), "{err:?}");
    let listed = seg
        .list_segments(spb::ListSegmentsRequest {
            tenant_id: TENANT.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.segments.is_empty());

    // Preview before saving.
    let preview = seg
        .preview_segment(spb::PreviewSegmentRequest {
            tenant_id: TENANT.into(),
            predicate: "bought_brand(\"Polar\")".into(),
            sample_size: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(preview.member_count, 2);

    // Segments computed at creation.
    let big = seg
        .create_segment(dynamic("big-spenders", "spend_30d >= 60000"))
        .await
        .unwrap()
        .into_inner()
        .segment
        .unwrap();
    assert_eq!(big.member_count, 1);
    assert_eq!(big.version, 1);
    seg.create_segment(dynamic("only-polar", "only_brand(\"Polar\")"))
        .await
        .unwrap();
    assert_eq!(segments_of(&mut seg, &anna).await, ["big-spenders"]);
    assert_eq!(segments_of(&mut seg, &boris).await, ["only-polar"]);

    // An event moves a member in: Boris buys boots and leaves `only-polar`, then joins
    // `big-spenders` with a second pair.
    pos.commit(boots("b2", &boris_card)).await.unwrap();
    wait_for_segments(&mut seg, &boris, &[]).await;
    pos.commit(boots("b3", &boris_card)).await.unwrap();
    wait_for_segments(&mut seg, &boris, &["big-spenders"]).await;

    // A refund moves Anna out: one pair of boots back.
    pos.refund(TENANT, "a1", "r1", &[("l1", "1")])
        .await
        .unwrap();
    wait_for_segments(&mut seg, &anna, &[]).await;
    let f = features(&mut seg, &anna).await;
    assert_eq!(
        f.purchase_count_total, 2,
        "a fully refunded receipt stops counting"
    );
    assert_eq!(f.spend_total.unwrap().value, "35000");

    // Why is Anna not in `big-spenders`?
    let why = seg
        .explain_membership(spb::ExplainMembershipRequest {
            tenant_id: TENANT.into(),
            segment_id: "big-spenders".into(),
            member_id: anna.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!why.member);
    assert_eq!(why.conditions.len(), 1);
    assert_eq!(why.conditions[0].text, "spend_30d >= 60000");
    assert_eq!(why.conditions[0].values, ["spend_30d = 35000"]);

    // Counts, streaming and history.
    let count = seg
        .count_segment_members(spb::CountSegmentMembersRequest {
            tenant_id: TENANT.into(),
            segment_id: "big-spenders".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .member_count;
    assert_eq!(count, 1);
    let mut stream = seg
        .stream_segment_members(spb::StreamSegmentMembersRequest {
            tenant_id: TENANT.into(),
            segment_id: "big-spenders".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut streamed = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        streamed.extend(chunk.member_ids);
    }
    assert_eq!(streamed, std::slice::from_ref(&boris));
    let history = seg
        .get_membership_history(spb::GetMembershipHistoryRequest {
            tenant_id: TENANT.into(),
            member_id: boris.clone(),
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.changes.len(), 2);
    assert_eq!(history.changes[0].segment_id, "big-spenders");
    assert!(history.changes[0].entered);
    assert!(!history.next_page_token.is_empty());
    let rest = seg
        .get_membership_history(spb::GetMembershipHistoryRequest {
            tenant_id: TENANT.into(),
            member_id: boris.clone(),
            page_size: 10,
            page_token: history.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.changes.len(), 1, "entered only-polar at creation");
    assert!(rest.changes[0].entered && rest.changes[0].segment_id == "only-polar");

    // Member events: registration is known at once; consents and the birthday follow the
    // profile (a segment on them, computed at creation, then moved by the events).
    let f = features(&mut seg, &anna).await;
    assert!(f.registered_at.is_some(), "{f:?}");
    assert!(!f.contactable);
    seg.create_segment(dynamic(
        "sms-birthday",
        "contactable_sms and days_to_birthday <= 400",
    ))
    .await
    .unwrap();
    assert!(
        !segments_of(&mut seg, &anna)
            .await
            .contains(&"sms-birthday".to_string())
    );
    pos.members
        .set_consents(identity::SetConsentsRequest {
            tenant_id: TENANT.into(),
            member_id: anna.clone(),
            consents: vec![identity::Consent {
                channel: identity::ConsentChannel::Sms as i32,
                granted: true,
                recorded_at: None,
                source: "pos".into(),
            }],
        })
        .await
        .unwrap();
    pos.members
        .update_profile(identity::UpdateProfileRequest {
            tenant_id: TENANT.into(),
            member_id: anna.clone(),
            member: Some(identity::Member {
                birthday: Some(loyalty_proto::common::v1::Date {
                    year: 1991,
                    month: 3,
                    day: 8,
                }),
                ..Default::default()
            }),
            update_mask: vec!["birthday".into()],
        })
        .await
        .unwrap();
    wait_for_segments(&mut seg, &anna, &["sms-birthday"]).await;
    let f = features(&mut seg, &anna).await;
    assert!(f.contactable);
    assert_eq!(f.birthday.map(|d| (d.month, d.day)), Some((3, 8)));
    seg.delete_segment(spb::DeleteSegmentRequest {
        tenant_id: TENANT.into(),
        segment_id: "sms-birthday".into(),
    })
    .await
    .unwrap();

    // Ledger events: every entry moves `points_total`, not only receipts. The back office's
    // adjustment moves Anna into a segment on it.
    let before = pos.balance(TENANT, &anna).await;
    let total = before.active + before.pending + before.held;
    assert!(total > 0);
    for _ in 0..200 {
        if features(&mut seg, &anna).await.points_total == Some(total) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(features(&mut seg, &anna).await.points_total, Some(total));
    seg.create_segment(dynamic("points-rich", "points_total >= 1000000"))
        .await
        .unwrap();
    assert_eq!(segments_of(&mut seg, &anna).await, Vec::<String>::new());
    loyalty_proto::balance::v1::balance_service_client::BalanceServiceClient::new(
        pos_channel.clone(),
    )
    .adjust(loyalty_proto::balance::v1::AdjustRequest {
        tenant_id: TENANT.into(),
        member_id: anna.clone(),
        idempotency_key: "goodwill-1".into(),
        amount: 1_000_000,
        actor: Some(loyalty_proto::common::v1::Actor {
            id: "manager:olga".into(),
            comment: "goodwill".into(),
        }),
    })
    .await
    .unwrap();
    wait_for_segments(&mut seg, &anna, &["points-rich"]).await;
    let f = features(&mut seg, &anna).await;
    assert_eq!(f.points_total, Some(total + 1_000_000));
    seg.delete_segment(spb::DeleteSegmentRequest {
        tenant_id: TENANT.into(),
        segment_id: "points-rich".into(),
    })
    .await
    .unwrap();

    // RFM on demand: two scored members; Boris spent more in the year (90,000 against 35,000
    // after Anna's refund) and bought more often, so he scores higher on both.
    let err = seg
        .get_member_rfm(spb::GetMemberRfmRequest {
            tenant_id: TENANT.into(),
            member_id: anna.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "no run yet");
    let run = seg
        .recompute_rfm(spb::RecomputeRfmRequest {
            tenant_id: TENANT.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run.member_count, 2);
    let rfm = |member: &str| {
        let mut seg = seg.clone();
        let member = member.to_owned();
        async move {
            seg.get_member_rfm(spb::GetMemberRfmRequest {
                tenant_id: TENANT.into(),
                member_id: member,
            })
            .await
            .unwrap()
            .into_inner()
            .rfm
            .unwrap()
        }
    };
    let (a, b) = (rfm(&anna).await, rfm(&boris).await);
    assert_eq!((b.frequency, b.monetary), (3, 3), "{b:?}");
    assert_eq!((a.frequency, a.monetary), (1, 1), "{a:?}");
    assert_eq!(a.recency, b.recency, "both bought today");
    let answer = seg
        .get_member_segments(spb::GetMemberSegmentsRequest {
            tenant_id: TENANT.into(),
            member_id: boris.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.rfm, Some(b));
}

/// A receipt refunded in full, over two refunds of one line each, stops counting for every
/// brand and category it had, not only for those of the last refund.
#[tokio::test]
async fn a_receipt_refunded_in_full_leaves_its_brands_and_categories() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    setup_tenant(&channel, TENANT).await;
    add_gloves(&channel).await;
    let mut pos = Pos::new(&channel, &channel);
    let mut seg = SegmentationServiceClient::new(channel.clone());
    let (dana, card) = pos.member_with_card(TENANT, "+77015550109").await;
    pos.commit(receipt(
        TENANT,
        "d1",
        Some(&card),
        vec![line("l1", "gloves", "1", "5000", false)],
    ))
    .await
    .unwrap();
    wait_for_receipts(&mut seg, &dana, 1).await;
    seg.create_segment(dynamic("only-polar", "only_brand(\"Polar\")"))
        .await
        .unwrap();
    seg.create_segment(dynamic("shoes", "bought_category('Shoes')"))
        .await
        .unwrap();
    assert_eq!(segments_of(&mut seg, &dana).await, ["only-polar"]);

    pos.commit(receipt(
        TENANT,
        "d2",
        Some(&card),
        vec![
            line("l1", "boots", "1", "30000", false),
            line("l2", "gloves", "1", "5000", false),
        ],
    ))
    .await
    .unwrap();
    wait_for_segments(&mut seg, &dana, &["shoes"]).await;

    // The boots first, then the gloves: the second refund completes the receipt.
    pos.refund(TENANT, "d2", "back-1", &[("l1", "1")])
        .await
        .unwrap();
    pos.refund(TENANT, "d2", "back-2", &[("l2", "1")])
        .await
        .unwrap();
    wait_for_segments(&mut seg, &dana, &["only-polar"]).await;
    let f = features(&mut seg, &dana).await;
    assert_eq!(f.purchase_count_total, 1);
    assert_eq!(f.spend_total.unwrap().value, "5000");
    server.stop().await;
}

#[tokio::test]
async fn dev_mode_segments_follow_purchases_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    purchases_drive_segments(&channel, &channel, &channel).await;
    server.stop().await;

    // After a restart nothing is applied twice and new purchases still flow.
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    let mut seg = SegmentationServiceClient::new(channel.clone());
    let big = seg
        .get_segment(spb::GetSegmentRequest {
            tenant_id: TENANT.into(),
            segment_id: "big-spenders".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .segment
        .unwrap();
    assert_eq!(big.member_count, 1);
    let mut pos = Pos::new(&channel, &channel);
    let (carla, card) = pos.member_with_card(TENANT, "+77015550103").await;
    pos.commit(receipt(
        TENANT,
        "c1",
        Some(&card),
        vec![line("l1", "boots", "2", "30000", false)],
    ))
    .await
    .unwrap();
    wait_for_segments(&mut seg, &carla, &["big-spenders"]).await;
    let members_of = |seg: SegmentationServiceClient<Channel>, segment: &'static str| async move {
        let mut seg = seg;
        let mut stream = seg
            .stream_segment_members(spb::StreamSegmentMembersRequest {
                tenant_id: TENANT.into(),
                segment_id: segment.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut ids = Vec::new();
        while let Some(chunk) = stream.message().await.unwrap() {
            ids.extend(chunk.member_ids);
        }
        ids.sort();
        ids
    };
    let big_members = members_of(seg.clone(), "big-spenders").await;
    assert_eq!(big_members.len(), 2, "Boris and Carla");
    let mut before = Vec::new();
    for member in &big_members {
        before.push(features(&mut seg, member).await);
    }
    server.stop().await;

    // A receipt segmentation never saw: committed while it did not run, and the event log
    // lost since.
    let till = Server::start(Launch::serve("identity,balance,promotion"), dir.path()).await;
    let channel = till.channel().await;
    let mut pos = Pos::new(&channel, &channel);
    pos.commit(receipt(
        TENANT,
        "c2",
        Some(&card),
        vec![line("l1", "socks", "1", "900", false)],
    ))
    .await
    .unwrap();
    till.stop().await;
    std::fs::remove_file(dir.path().join("events.redb")).unwrap();

    // The admin command rebuilds the features from the purchase history, the ledger and the
    // members, in place: the segments stay and hold the same members, and the missed receipt
    // counts.
    let rebuild = || {
        let out = std::process::Command::new(loyalty_bin())
            .args(["rebuild-segmentation", "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{said}");
        said
    };
    let said = rebuild();
    assert!(said.contains("segmentation rebuilt in"), "{said}");
    assert!(said.contains("9 purchases, 1 refunds"), "{said}");
    assert!(said.contains("0 memberships changed"), "{said}");
    let server = Server::start(Launch::dev(), dir.path()).await;
    let mut seg = SegmentationServiceClient::new(server.channel().await);
    assert_eq!(members_of(seg.clone(), "big-spenders").await, big_members);
    let mut rebuilt = Vec::new();
    for (member, was) in big_members.iter().zip(&before) {
        let now = features(&mut seg, member).await;
        let missed = i64::from(*member == carla);
        assert_eq!(now.purchase_count_total, was.purchase_count_total + missed);
        if missed == 0 {
            assert_eq!(&now, was);
        }
        rebuilt.push(now);
    }
    server.stop().await;

    // Segmentation's file lost: the features come back (segments are defined anew).
    std::fs::remove_file(dir.path().join("segmentation.redb")).unwrap();
    rebuild();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let mut seg = SegmentationServiceClient::new(server.channel().await);
    for (member, was) in big_members.iter().zip(&rebuilt) {
        assert_eq!(&features(&mut seg, member).await, was);
    }
    server.stop().await;
}

#[tokio::test]
async fn microservices_events_cross_processes_on_redis_streams() {
    let redis = RedisServer::start().unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let segmentation = Server::start(
        Launch::serve("segmentation").on_redis(&redis.url()),
        dir_a.path(),
    )
    .await;
    let pos_node = Server::start(
        Launch::serve("identity,balance,promotion").on_redis(&redis.url()),
        dir_b.path(),
    )
    .await;
    let pos_channel = pos_node.channel().await;
    let seg_channel = segmentation.channel().await;
    purchases_drive_segments(&pos_channel, &pos_channel, &seg_channel).await;
    // The stream really is in Redis, and the group has acknowledged everything.
    let out = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port().to_string(),
            "xinfo",
            "groups",
            "ev:{purchases}",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("segmentation"), "{text}");

    // A segmentation pod that starts empty, with the group moved back to the start of the
    // stream (docs/operations.md): features are rebuilt from the stream, each event once.
    let anna_before = {
        let mut seg = SegmentationServiceClient::new(seg_channel.clone());
        let mut pos = Pos::new(&pos_channel, &pos_channel);
        let anna = member_by_phone(&mut pos, "+77015550101").await;
        (anna.clone(), features(&mut seg, &anna).await)
    };
    segmentation.stop().await;
    for stream in ["ev:{purchases}", "ev:{members}", "ev:{ledger}"] {
        let port = redis.port().to_string();
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port, "xgroup", "setid", stream, "segmentation", "0"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "OK",
            "{stream}"
        );
    }
    let dir_c = tempfile::tempdir().unwrap();
    let segmentation = Server::start(
        Launch::serve("segmentation").on_redis(&redis.url()),
        dir_c.path(),
    )
    .await;
    let mut seg = SegmentationServiceClient::new(segmentation.channel().await);
    let (anna, before) = anna_before;
    let mut after = features(&mut seg, &anna).await;
    for _ in 0..200 {
        if after == before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = features(&mut seg, &anna).await;
    }
    assert_eq!(after, before, "rebuilt from the stream, each event once");

    // Or, with the stream gone too: `rebuild-segmentation` reads the purchase history, the
    // ledger and the members from the running services.
    drop(seg);
    segmentation.stop().await;
    let dir_d = tempfile::tempdir().unwrap();
    let args = [
        "rebuild-segmentation".to_string(),
        "--data-dir".into(),
        dir_d.path().display().to_string(),
    ];
    let env: Vec<(String, String)> = [
        ("LOYALTY_STORAGE__BACKEND", "redis".to_string()),
        ("LOYALTY_STORAGE__REDIS__URL", redis.url()),
        ("LOYALTY_PEERS__IDENTITY", pos_node.url()),
        ("LOYALTY_PEERS__BALANCE", pos_node.url()),
        ("LOYALTY_PEERS__PROMOTION", pos_node.url()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let out = command(&args, &env).output().await.unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    for stream in ["ev:{purchases}", "ev:{members}", "ev:{ledger}"] {
        let port = redis.port().to_string();
        std::process::Command::new("redis-cli")
            .args(["-p", &port, "del", stream])
            .output()
            .unwrap();
    }
    let segmentation = Server::start(
        Launch::serve("segmentation").on_redis(&redis.url()),
        dir_d.path(),
    )
    .await;
    let mut seg = SegmentationServiceClient::new(segmentation.channel().await);
    assert_eq!(
        features(&mut seg, &anna).await,
        before,
        "rebuilt from the sources of truth"
    );
    pos_node.stop().await;
    segmentation.stop().await;
}

/// Two segmentation processes on `segmentation.store = "redis"` are replicas of one service:
/// they share the consumer group, so each event is applied by one of them, and either answers
/// from the same features, segments and memberships. Nothing of theirs is on local disk.
#[tokio::test]
async fn segmentation_replicas_on_redis_share_features_and_segments() {
    let redis = RedisServer::start().unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut replicas = Vec::new();
    for dir in &dirs[..2] {
        replicas.push(
            Server::start(
                Launch::serve("segmentation")
                    .on_redis(&redis.url())
                    .env("LOYALTY_SEGMENTATION__STORE", "redis"),
                dir.path(),
            )
            .await,
        );
    }
    let pos_node = Server::start(
        Launch::serve("identity,balance,promotion").on_redis(&redis.url()),
        dirs[2].path(),
    )
    .await;
    let pos_channel = pos_node.channel().await;
    let first = replicas[0].channel().await;
    let second = replicas[1].channel().await;
    purchases_drive_segments(&pos_channel, &pos_channel, &first).await;

    let mut pos = Pos::new(&pos_channel, &pos_channel);
    let anna = member_by_phone(&mut pos, "+77015550101").await;
    let (mut one, mut two) = (
        SegmentationServiceClient::new(first.clone()),
        SegmentationServiceClient::new(second.clone()),
    );
    assert_eq!(
        features(&mut two, &anna).await,
        features(&mut one, &anna).await
    );
    assert!(features(&mut two, &anna).await.purchase_count_total > 0);
    assert_eq!(
        segments_of(&mut two, &anna).await,
        segments_of(&mut one, &anna).await
    );
    let listed = |c: &mut SegmentationServiceClient<Channel>| {
        let mut c = c.clone();
        async move {
            let mut ids: Vec<String> = c
                .list_segments(spb::ListSegmentsRequest {
                    tenant_id: TENANT.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .segments
                .into_iter()
                .map(|s| s.segment_id)
                .collect();
            ids.sort();
            ids
        }
    };
    let ids = listed(&mut one).await;
    assert!(!ids.is_empty());
    assert_eq!(listed(&mut two).await, ids);
    let mut members = 0;
    for id in &ids {
        let count = |c: &mut SegmentationServiceClient<Channel>| {
            let mut c = c.clone();
            let id = id.clone();
            async move {
                c.count_segment_members(spb::CountSegmentMembersRequest {
                    tenant_id: TENANT.into(),
                    segment_id: id,
                })
                .await
                .unwrap()
                .into_inner()
                .member_count
            }
        };
        let n = count(&mut one).await;
        assert_eq!(count(&mut two).await, n, "{id}");
        members += n;
    }
    assert!(members > 0, "memberships were written");
    for dir in &dirs[..2] {
        assert!(!std::fs::exists(dir.path().join("segmentation.redb")).unwrap());
    }
    for r in replicas {
        assert_eq!(r.stop().await, 0);
    }
    assert_eq!(pos_node.stop().await, 0);
}

/// What a segmentation service answers about the test's tenant: every segment with its
/// count and members, and Anna's features, segments and membership history.
type Snapshot = (
    Vec<(String, i64, Vec<String>)>,
    (spb::MemberFeatures, Vec<String>, Vec<spb::MembershipChange>),
);

async fn snapshot(channel: &Channel, anna: &str) -> Snapshot {
    let mut seg = SegmentationServiceClient::new(channel.clone());
    let mut ids: Vec<String> = seg
        .list_segments(spb::ListSegmentsRequest {
            tenant_id: TENANT.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .segments
        .into_iter()
        .map(|s| s.segment_id)
        .collect();
    ids.sort();
    let mut segments = Vec::new();
    for id in ids {
        let count = seg
            .count_segment_members(spb::CountSegmentMembersRequest {
                tenant_id: TENANT.into(),
                segment_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .member_count;
        let mut stream = seg
            .stream_segment_members(spb::StreamSegmentMembersRequest {
                tenant_id: TENANT.into(),
                segment_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut members = Vec::new();
        while let Some(page) = stream.message().await.unwrap() {
            members.extend(page.member_ids);
        }
        segments.push((id, count, members));
    }
    let history = seg
        .get_membership_history(spb::GetMembershipHistoryRequest {
            tenant_id: TENANT.into(),
            member_id: anna.into(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .changes;
    assert!(!history.is_empty());
    let about_anna = (
        features(&mut seg, anna).await,
        segments_of(&mut seg, anna).await,
        history,
    );
    (segments, about_anna)
}

/// `loyalty copy-segmentation` moves a dev data directory's segments, memberships and
/// features into Redis: a server on `segmentation.store = "redis"` answers the same.
#[tokio::test]
async fn copy_segmentation_moves_the_embedded_state_into_redis() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    purchases_drive_segments(&channel, &channel, &channel).await;
    let mut pos = Pos::new(&channel, &channel);
    let anna = member_by_phone(&mut pos, "+77015550101").await;
    let before = snapshot(&channel, &anna).await;
    assert!(before.0.iter().any(|(_, n, _)| *n > 0), "{before:?}");
    assert_eq!(server.stop().await, 0);

    // On an empty Redis beside the file, the server refuses to start.
    let dev = [
        "dev".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.path().display().to_string(),
    ];
    let on_redis = [
        (
            "LOYALTY_SEGMENTATION__STORE".to_string(),
            "redis".to_string(),
        ),
        ("LOYALTY_STORAGE__REDIS__URL".into(), redis.url()),
    ];
    let refused = tokio::time::timeout(Duration::from_secs(30), command(&dev, &on_redis).output())
        .await
        .expect("a server beside an uncopied segmentation.redb must not start")
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(said.contains("loyalty copy-segmentation"), "{said}");

    let out = command(
        &[
            "copy-segmentation".into(),
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
    assert!(said.contains("segmentation copied"), "{said}");

    let server = Server::start(
        Launch::dev()
            .env("LOYALTY_SEGMENTATION__STORE", "redis")
            .env("LOYALTY_STORAGE__REDIS__URL", &redis.url()),
        dir.path(),
    )
    .await;
    let channel = server.channel().await;
    assert_eq!(snapshot(&channel, &anna).await, before);
    assert_eq!(server.stop().await, 0);
}
