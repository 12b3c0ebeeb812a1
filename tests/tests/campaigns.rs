//! Campaigns through the real binary and its gRPC API: every mechanic reaches the POS,
//! answers explain themselves, codes and coupons are checked, budgets hold under
//! concurrency, refunds give back, changes take effect on the next request, tiers and
//! segments target, and definitions are validated, versioned and exported.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use loyalty_e2e::*;
use loyalty_proto::common::v1::{Actor, Date};
use loyalty_proto::identity::v1 as ipb;
use loyalty_proto::promotion::v1 as ppb;
use loyalty_proto::segmentation::v1 as spb;
use ppb::campaign_service_client::CampaignServiceClient;
use tonic::Code;
use tonic::transport::Channel;

fn actor(id: &str) -> Option<Actor> {
    Some(Actor {
        id: id.into(),
        comment: String::new(),
    })
}

fn percent_step(from: &str, pct: &str) -> ppb::DiscountStep {
    ppb::DiscountStep {
        from_value: dec(from),
        benefit: Some(ppb::discount_step::Benefit::Percent(
            loyalty_proto::common::v1::Decimal { value: pct.into() },
        )),
    }
}

fn campaign(tenant: &str, id: &str, mechanic: ppb::campaign::Mechanic) -> ppb::Campaign {
    ppb::Campaign {
        tenant_id: tenant.into(),
        campaign_id: id.into(),
        name: id.into(),
        status: ppb::CampaignStatus::Active as i32,
        mechanic: Some(mechanic),
        ..Default::default()
    }
}

fn percent_off(tenant: &str, id: &str, pct: &str) -> ppb::Campaign {
    campaign(
        tenant,
        id,
        ppb::campaign::Mechanic::ThresholdDiscount(ppb::ThresholdDiscount {
            scope: None,
            steps: vec![percent_step("0", pct)],
        }),
    )
}

async fn create(
    c: &mut CampaignServiceClient<Channel>,
    campaign: ppb::Campaign,
) -> Result<ppb::Campaign, tonic::Status> {
    c.create_campaign(ppb::CreateCampaignRequest {
        campaign: Some(campaign),
        actor: actor("manager:anna"),
    })
    .await
    .map(|r| r.into_inner().campaign.unwrap())
}

async fn quote(pos: &mut Pos, r: ppb::Receipt) -> Result<ppb::Evaluation, tonic::Status> {
    pos.checkout
        .quote(ppb::QuoteRequest {
            receipt: Some(r),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().evaluation.unwrap())
}

fn skipped(e: &ppb::Evaluation, id: &str) -> Option<ppb::SkipReason> {
    e.skipped_campaigns
        .iter()
        .find(|s| s.campaign_id == id)
        .map(|s| ppb::SkipReason::try_from(s.reason).unwrap())
}

fn money(d: &Option<loyalty_proto::common::v1::Decimal>) -> String {
    d.as_ref().unwrap().value.clone()
}

async fn dev() -> (tempfile::TempDir, Server, Channel) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        Launch::dev().env("LOYALTY_SERVER__METRICS_LISTEN", "127.0.0.1:0"),
        dir.path(),
    )
    .await;
    let channel = server.channel().await;
    setup_tenant(&channel, "t1").await;
    (dir, server, channel)
}

#[tokio::test]
async fn discounts_codes_and_coupons_at_the_pos() {
    let (_dir, server, channel) = dev().await;
    let mut campaigns = CampaignServiceClient::new(channel.clone());
    let mut pos = Pos::new(&channel, &channel);
    let (_member, card) = pos.member_with_card("t1", "+77010000001").await;

    // 30% on everything, and promo code "11.11" adds 11% of the shelf price: 41%.
    create(&mut campaigns, percent_off("t1", "sale30", "30"))
        .await
        .unwrap();
    let mut promo = campaign(
        "t1",
        "promo-11-11",
        ppb::campaign::Mechanic::ExtraDiscount(ppb::ExtraDiscount {
            scope: None,
            percent: dec("11"),
        }),
    );
    promo.code = Some(ppb::CodeRequirement {
        kind: Some(ppb::code_requirement::Kind::PromoCode("11.11".into())),
    });
    create(&mut campaigns, promo).await.unwrap();
    let lines = vec![line("1", "boots", "1", "10000.00", false)];
    let e = quote(&mut pos, receipt("t1", "q1", Some(&card), lines.clone()))
        .await
        .unwrap();
    assert_eq!(money(&e.discount), "3000.00");
    assert_eq!(
        skipped(&e, "promo-11-11"),
        Some(ppb::SkipReason::CodeMissing)
    );
    let mut with_code = receipt("t1", "r-promo", Some(&card), lines.clone());
    with_code.codes = vec!["11.11".into()];
    let quoted = quote(&mut pos, with_code.clone()).await.unwrap();
    assert_eq!(money(&quoted.discount), "4100.00");
    assert_eq!(money(&quoted.net_amount), "5900.00");
    let committed = pos.commit(with_code).await.unwrap();
    // Equal but for the moment each was evaluated at (the points' dates).
    let undated = |mut e: ppb::Evaluation| {
        e.points_activate_time = None;
        e.points_expire_time = None;
        e
    };
    assert_eq!(
        undated(committed.evaluation.clone().unwrap()),
        undated(quoted),
        "a quote equals the commit that follows it"
    );

    // An unknown code is a clear error and writes nothing.
    let mut bad = receipt("t1", "r-bad", Some(&card), lines.clone());
    bad.codes = vec!["NOPE".into()];
    let err = pos.commit(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err)[0].0, "receipt.codes[0]");
    let missing = pos
        .checkout
        .get_purchase(ppb::GetPurchaseRequest {
            tenant_id: "t1".into(),
            receipt_id: "r-bad".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Single-use coupons: generated in a batch, used once, given back by a full refund.
    let mut coupon_campaign = percent_off("t1", "coupon15", "15");
    coupon_campaign.code = Some(ppb::CodeRequirement {
        kind: Some(ppb::code_requirement::Kind::Coupons(ppb::CouponPolicy {
            max_uses: 1,
            member_bound: false,
        })),
    });
    create(&mut campaigns, coupon_campaign).await.unwrap();
    let batch = ppb::GenerateCouponsRequest {
        tenant_id: "t1".into(),
        campaign_id: "coupon15".into(),
        count: 3,
        idempotency_key: "batch-1".into(),
        ..Default::default()
    };
    let codes = campaigns
        .generate_coupons(batch.clone())
        .await
        .unwrap()
        .into_inner()
        .codes;
    assert_eq!(codes.len(), 3);
    let again = campaigns
        .generate_coupons(batch)
        .await
        .unwrap()
        .into_inner()
        .codes;
    assert_eq!(again, codes, "the idempotency key returns the same batch");
    let socks = vec![line("1", "socks", "2", "1000.00", false)];
    let mut first = receipt("t1", "r-coupon-1", Some(&card), socks.clone());
    first.codes = vec![codes[0].to_lowercase()];
    let e = pos.commit(first).await.unwrap().evaluation.unwrap();
    assert_eq!(money(&e.discount), "900.00", "30% + 15% of 2000");
    let mut second = receipt("t1", "r-coupon-2", Some(&card), socks.clone());
    second.codes = vec![codes[0].clone()];
    let err = pos.commit(second.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(violations(&err)[0].1.contains("used up"), "{err:?}");
    let coupon = |code: String| {
        let mut c = campaigns.clone();
        async move {
            c.get_coupon(ppb::GetCouponRequest {
                tenant_id: "t1".into(),
                code,
            })
            .await
            .unwrap()
            .into_inner()
            .coupon
            .unwrap()
        }
    };
    assert_eq!(coupon(codes[0].clone()).await.uses, 1);
    // A partial refund keeps the use; the full refund gives it back.
    pos.refund("t1", "r-coupon-1", "f1", &[("1", "1")])
        .await
        .unwrap();
    assert_eq!(coupon(codes[0].clone()).await.uses, 1);
    pos.refund("t1", "r-coupon-1", "f2", &[("1", "1")])
        .await
        .unwrap();
    assert_eq!(coupon(codes[0].clone()).await.uses, 0);
    pos.commit(second).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn two_for_one_thresholds_boosts_and_fast_burning_points() {
    let (_dir, server, channel) = dev().await;
    let mut campaigns = CampaignServiceClient::new(channel.clone());
    let mut pos = Pos::new(&channel, &channel);
    let (member, card) = pos.member_with_card("t1", "+77010000002").await;
    create(
        &mut campaigns,
        campaign(
            "t1",
            "2for1",
            ppb::campaign::Mechanic::NForM(ppb::NForM {
                scope: Some(ppb::ProductScope {
                    skus: vec!["socks".into()],
                    ..Default::default()
                }),
                n: 2,
                m: 1,
            }),
        ),
    )
    .await
    .unwrap();
    create(
        &mut campaigns,
        campaign(
            "t1",
            "boots-x5",
            ppb::campaign::Mechanic::AccrualBoost(ppb::AccrualBoost {
                scope: Some(ppb::ProductScope {
                    skus: vec!["boots".into()],
                    ..Default::default()
                }),
                accrual_percent: dec("5"),
                multiplier: None,
            }),
        ),
    )
    .await
    .unwrap();
    create(
        &mut campaigns,
        campaign(
            "t1",
            "burn",
            ppb::campaign::Mechanic::FixedBonus(ppb::FixedBonus {
                points: 50_000,
                activation_delay_days: 0,
                lifetime_days: 7,
            }),
        ),
    )
    .await
    .unwrap();
    let r = receipt(
        "t1",
        "r1",
        Some(&card),
        vec![
            line("1", "socks", "2", "500.00", false),
            line("2", "boots", "1", "10000.00", false),
        ],
    );
    let c = pos.commit(r).await.unwrap();
    let e = c.evaluation.unwrap();
    assert_eq!(
        money(&e.lines[0].discount),
        "500.00",
        "one pair of socks, one free"
    );
    // 1% of 500 on socks, 5% of 10000 on boots, plus 500 fast-burning points.
    assert_eq!(e.points_accrued, 500 + 50_000 + 50_000);
    assert_eq!(c.points_balance, 100_500);
    assert_eq!(pos.balance("t1", &member).await.active, 100_500);
    let entries = all_ledger_entries(&mut pos.balance, "t1", &member).await;
    // Lifetimes run to the end of the store's local day (UTC here) on which they end.
    let lots: Vec<(i64, i64)> = entries
        .iter()
        .filter_map(|x| {
            let expire = x.expire_time?.seconds;
            Some((expire - x.activate_time?.seconds, expire))
        })
        .collect();
    let lives = |days: i64| {
        lots.iter().any(|&(life, expire)| {
            (days * 86_400..(days + 1) * 86_400).contains(&life) && expire % 86_400 == 0
        })
    };
    assert!(lives(7), "the bonus lives 7 days: {lots:?}");
    assert!(lives(180), "the rest lives 180: {lots:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_budget_of_n_uses_grants_exactly_n_under_200_concurrent_commits() {
    let (_dir, server, channel) = dev().await;
    let mut campaigns = CampaignServiceClient::new(channel.clone());
    let mut limited = percent_off("t1", "first10", "50");
    limited.budget = Some(ppb::Budget {
        max_uses: 10,
        ..Default::default()
    });
    create(&mut campaigns, limited).await.unwrap();
    let pos = Pos::new(&channel, &channel);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut pos = pos.clone();
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
    let mut granted = 0;
    for t in tasks {
        let e = t.await.unwrap().unwrap().evaluation.unwrap();
        if money(&e.discount) == "50.00" {
            granted += 1;
        } else {
            assert_eq!(
                skipped(&e, "first10"),
                Some(ppb::SkipReason::BudgetExhausted)
            );
        }
    }
    assert_eq!(granted, 10);
    // The business counters saw it: ten discounts of 50.00, 190 receipts the budget refused.
    let metrics = server.scrape_metrics().await;
    let value = |name: &str| metric_value(&metrics, name);
    assert_eq!(
        value("loyalty_discounts_granted_total").as_deref(),
        Some("50000"),
        "{metrics}"
    );
    assert_eq!(
        value("loyalty_campaign_budget_exhausted_total").as_deref(),
        Some("190"),
        "{metrics}"
    );
    // A refund gives the use back; the next receipt gets it.
    let mut pos = pos.clone();
    let mut refunded = None;
    for i in 0..200 {
        let id = format!("B-{i}");
        let p = pos
            .checkout
            .get_purchase(ppb::GetPurchaseRequest {
                tenant_id: "t1".into(),
                receipt_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .purchase
            .unwrap();
        if money(&p.evaluation.unwrap().discount) == "50.00" {
            pos.refund("t1", &id, "f", &[("1", "1")]).await.unwrap();
            refunded = Some(id);
            break;
        }
    }
    assert!(refunded.is_some());
    let e = pos
        .commit(receipt(
            "t1",
            "B-after",
            None,
            vec![line("1", "socks", "1", "100.00", false)],
        ))
        .await
        .unwrap()
        .evaluation
        .unwrap();
    assert_eq!(money(&e.discount), "50.00", "the refunded use came back");
    server.stop().await;
}

#[tokio::test]
async fn tiers_birthdays_segments_and_member_limits_target_members() {
    let (_dir, server, channel) = dev().await;
    let mut campaigns = CampaignServiceClient::new(channel.clone());
    let mut program = ppb::program_service_client::ProgramServiceClient::new(channel.clone());
    let mut pos = Pos::new(&channel, &channel);
    // Tiers: 5% from registration, 10% from 500,000 over the last 12 months.
    let mut p = program
        .get_program(ppb::GetProgramRequest {
            tenant_id: "t1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .program
        .unwrap();
    p.tiers = vec![
        ppb::Tier {
            tier_id: "base".into(),
            name: "Base".into(),
            min_spend: dec("0"),
            accrual_percent: dec("5"),
        },
        ppb::Tier {
            tier_id: "gold".into(),
            name: "Gold".into(),
            min_spend: dec("500000"),
            accrual_percent: dec("10"),
        },
    ];
    p.tier_window = ppb::TierWindow::Rolling12Months as i32;
    program
        .update_program(ppb::UpdateProgramRequest {
            program: Some(p),
            expected_version: 0,
            actor: actor("manager:anna"),
        })
        .await
        .unwrap();
    let (member, card) = pos.member_with_card("t1", "+77010000003").await;
    let e = pos
        .commit(receipt(
            "t1",
            "t-1",
            Some(&card),
            vec![line("1", "boots", "1", "400000.00", false)],
        ))
        .await
        .unwrap()
        .evaluation
        .unwrap();
    assert_eq!(e.points_accrued, 2_000_000, "5% at the base tier");
    assert_eq!(e.member.unwrap().tier_id, "base");
    let tier = program
        .get_member_tier(ppb::GetMemberTierRequest {
            tenant_id: "t1".into(),
            member_id: member.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tier.tier.unwrap().tier_id, "base");
    assert_eq!(tier.next_tier.unwrap().tier_id, "gold");
    assert_eq!(money(&tier.missing_for_next_tier), "100000.00");
    pos.commit(receipt(
        "t1",
        "t-2",
        Some(&card),
        vec![line("1", "boots", "1", "100000.00", false)],
    ))
    .await
    .unwrap();
    let e = quote(
        &mut pos,
        receipt(
            "t1",
            "t-3",
            Some(&card),
            vec![line("1", "socks", "1", "1000.00", false)],
        ),
    )
    .await
    .unwrap();
    assert_eq!(e.member.unwrap().tier_id, "gold");
    assert_eq!(e.points_accrued, 10_000, "10% from 500,000 spent");

    // A tier-targeted campaign, limited to one use per member per 30 days.
    let mut gold_only = percent_off("t1", "gold-gift", "10");
    gold_only.targeting = Some(ppb::Targeting {
        tier_ids: vec!["gold".into()],
        ..Default::default()
    });
    gold_only.member_limit = 1;
    gold_only.member_limit_period_days = 30;
    create(&mut campaigns, gold_only).await.unwrap();
    let socks = |id: &str, card: &str| {
        receipt(
            "t1",
            id,
            Some(card),
            vec![line("1", "socks", "1", "1000.00", false)],
        )
    };
    let e = pos
        .commit(socks("g-1", &card))
        .await
        .unwrap()
        .evaluation
        .unwrap();
    assert_eq!(money(&e.discount), "100.00");
    // Segmentation learns the tier from the receipts: a segment on it holds the member.
    let mut seg = spb::segmentation_service_client::SegmentationServiceClient::new(channel.clone());
    let mut tier_seen = String::new();
    for _ in 0..200 {
        tier_seen = seg
            .get_member_features(spb::GetMemberFeaturesRequest {
                tenant_id: "t1".into(),
                member_id: member.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .features
            .unwrap()
            .tier_id;
        if tier_seen == "gold" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(tier_seen, "gold");
    let golden = seg
        .preview_segment(spb::PreviewSegmentRequest {
            tenant_id: "t1".into(),
            predicate: "tier = \"gold\"".into(),
            sample_size: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(golden.sample_member_ids, std::slice::from_ref(&member));
    let e = pos
        .commit(socks("g-2", &card))
        .await
        .unwrap()
        .evaluation
        .unwrap();
    assert_eq!(
        skipped(&e, "gold-gift"),
        Some(ppb::SkipReason::MemberLimitReached)
    );
    let (other, other_card) = pos.member_with_card("t1", "+77010000004").await;
    let e = quote(&mut pos, socks("o-1", &other_card)).await.unwrap();
    assert_eq!(skipped(&e, "gold-gift"), Some(ppb::SkipReason::WrongTier));

    // Birthday boost: 14% from two days before through the birthday.
    create(
        &mut campaigns,
        campaign(
            "t1",
            "bday",
            ppb::campaign::Mechanic::BirthdayBoost(ppb::BirthdayBoost {
                accrual_percent: dec("14"),
                days_before: 2,
                days_after: 0,
            }),
        ),
    )
    .await
    .unwrap();
    let e = quote(&mut pos, socks("o-2", &other_card)).await.unwrap();
    assert_eq!(skipped(&e, "bday"), Some(ppb::SkipReason::OutsideWindow));
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        / 86_400;
    let (_, m, d) = civil(today + 1);
    let mut members = ipb::member_service_client::MemberServiceClient::new(channel.clone());
    members
        .update_profile(ipb::UpdateProfileRequest {
            tenant_id: "t1".into(),
            member_id: other.clone(),
            member: Some(ipb::Member {
                birthday: Some(Date {
                    year: 1990,
                    month: m,
                    day: d,
                }),
                ..Default::default()
            }),
            update_mask: vec!["birthday".into()],
        })
        .await
        .unwrap();
    let e = quote(&mut pos, socks("o-3", &other_card)).await.unwrap();
    assert_eq!(e.points_accrued, 14_000, "14% the day before the birthday");

    // Segments: a campaign for members who bought at least once.
    let mut seg = spb::segmentation_service_client::SegmentationServiceClient::new(channel.clone());
    seg.create_segment(spb::CreateSegmentRequest {
        segment: Some(spb::Segment {
            tenant_id: "t1".into(),
            segment_id: "buyers".into(),
            name: "Buyers".into(),
            kind: spb::SegmentKind::Dynamic as i32,
            predicate: "purchase_count_total >= 1".into(),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let mut for_buyers = percent_off("t1", "buyers-5", "5");
    for_buyers.targeting = Some(ppb::Targeting {
        segment_ids: vec!["buyers".into()],
        ..Default::default()
    });
    create(&mut campaigns, for_buyers).await.unwrap();
    let mut unknown = percent_off("t1", "nobody", "5");
    unknown.targeting = Some(ppb::Targeting {
        segment_ids: vec!["no-such-segment".into()],
        ..Default::default()
    });
    let err = create(&mut campaigns, unknown).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err)[0].0, "campaign.targeting.segment_ids[0]");
    let mut in_segment = false;
    for _ in 0..200 {
        let e = quote(&mut pos, socks("s-1", &card)).await.unwrap();
        if skipped(&e, "buyers-5").is_none() {
            in_segment = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(in_segment, "the buyer reached the segment and the campaign");
    let e = quote(&mut pos, socks("s-2", &other_card)).await.unwrap();
    assert_eq!(skipped(&e, "buyers-5"), Some(ppb::SkipReason::NotInSegment));
    server.stop().await;
}

/// Days since 1970-01-01 → (year, month, day).
fn civil(days: i64) -> (i32, i32, i32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        (yoe + era * 400 + i64::from(m <= 2)) as i32,
        m as i32,
        d as i32,
    )
}

#[tokio::test]
async fn definitions_are_validated_versioned_live_and_exported() {
    let (_dir, server, channel) = dev().await;
    let mut campaigns = CampaignServiceClient::new(channel.clone());
    let mut pos = Pos::new(&channel, &channel);

    // Dangerous definitions are refused with the fields at fault, and nothing is saved.
    let err = create(&mut campaigns, percent_off("t1", "too-much", "120"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        violations(&err)[0].0,
        "campaign.threshold_discount.steps[0].percent"
    );
    let mut grouped = percent_off("t1", "grouped", "10");
    grouped.stacking_group_id = "no-group".into();
    let err = create(&mut campaigns, grouped).await.unwrap_err();
    assert_eq!(violations(&err)[0].0, "campaign.stacking_group_id");
    let mut window = percent_off("t1", "backwards", "10");
    window.targeting = Some(ppb::Targeting {
        window: Some(loyalty_proto::common::v1::TimeRange {
            start_time: Some(prost_types::Timestamp {
                seconds: 2_000_000_000,
                nanos: 0,
            }),
            end_time: Some(prost_types::Timestamp {
                seconds: 1_000_000_000,
                nanos: 0,
            }),
        }),
        ..Default::default()
    });
    let err = create(&mut campaigns, window).await.unwrap_err();
    assert_eq!(violations(&err)[0].0, "campaign.targeting.window");
    let mut code_a = percent_off("t1", "code-a", "10");
    code_a.code = Some(ppb::CodeRequirement {
        kind: Some(ppb::code_requirement::Kind::PromoCode("SPRING".into())),
    });
    create(&mut campaigns, code_a.clone()).await.unwrap();
    let mut code_b = code_a.clone();
    code_b.campaign_id = "code-b".into();
    code_b.code = Some(ppb::CodeRequirement {
        kind: Some(ppb::code_requirement::Kind::PromoCode("spring".into())),
    });
    let err = create(&mut campaigns, code_b.clone()).await.unwrap_err();
    assert_eq!(violations(&err)[0].0, "campaign.code.promo_code");
    code_b.code = Some(ppb::CodeRequirement {
        kind: Some(ppb::code_requirement::Kind::PromoCode("SUMMER SALE".into())),
    });
    let err = create(&mut campaigns, code_b).await.unwrap_err();
    assert_eq!(violations(&err)[0].0, "campaign.code.promo_code");
    assert!(violations(&err)[0].1.contains("one word"), "{err:?}");
    let listed = campaigns
        .list_campaigns(ppb::ListCampaignsRequest {
            tenant_id: "t1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .campaigns;
    assert_eq!(listed.len(), 1, "only the valid one was saved");

    // A change takes effect on the next request.
    let r = || {
        receipt(
            "t1",
            "live",
            None,
            vec![line("1", "boots", "1", "1000.00", false)],
        )
    };
    let mut spring = r();
    spring.codes = vec!["spring".into()];
    assert_eq!(
        money(&quote(&mut pos, spring.clone()).await.unwrap().discount),
        "100.00"
    );
    let mut changed = code_a.clone();
    changed.mechanic = Some(ppb::campaign::Mechanic::ThresholdDiscount(
        ppb::ThresholdDiscount {
            scope: None,
            steps: vec![percent_step("0", "25")],
        },
    ));
    let err = campaigns
        .update_campaign(ppb::UpdateCampaignRequest {
            campaign: Some(changed.clone()),
            expected_version: 7,
            actor: actor("manager:boris"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let saved = campaigns
        .update_campaign(ppb::UpdateCampaignRequest {
            campaign: Some(changed),
            expected_version: 1,
            actor: actor("manager:boris"),
        })
        .await
        .unwrap()
        .into_inner()
        .campaign
        .unwrap();
    assert_eq!(saved.version, 2);
    assert_eq!(
        money(&quote(&mut pos, spring.clone()).await.unwrap().discount),
        "250.00"
    );
    let versions = campaigns
        .list_campaign_versions(ppb::ListCampaignVersionsRequest {
            tenant_id: "t1".into(),
            campaign_id: "code-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    let who: Vec<(i64, &str)> = versions
        .iter()
        .map(|v| (v.version, v.updated_by.as_str()))
        .collect();
    assert_eq!(who, [(2, "manager:boris"), (1, "manager:anna")]);

    // Export, import into another tenant, archive.
    let json = campaigns
        .export_campaigns(ppb::ExportCampaignsRequest {
            tenant_id: "t1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .json;
    setup_tenant(&channel, "t2").await;
    let err = campaigns
        .import_campaigns(ppb::ImportCampaignsRequest {
            tenant_id: "t2".into(),
            json: json.clone(),
            actor: actor("ops"),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "another tenant's document"
    );
    let moved = json.replace("\"t1\"", "\"t2\"");
    let imported = campaigns
        .import_campaigns(ppb::ImportCampaignsRequest {
            tenant_id: "t2".into(),
            json: moved,
            actor: actor("ops"),
        })
        .await
        .unwrap()
        .into_inner()
        .imported_count;
    assert_eq!(imported, 1);
    let mut in_t2 = spring.clone();
    in_t2.tenant_id = "t2".into();
    assert_eq!(
        money(&quote(&mut pos, in_t2).await.unwrap().discount),
        "250.00"
    );
    campaigns
        .archive_campaign(ppb::ArchiveCampaignRequest {
            tenant_id: "t1".into(),
            campaign_id: "code-a".into(),
            actor: actor("manager:anna"),
        })
        .await
        .unwrap();
    let err = quote(&mut pos, spring).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "an archived campaign's code is unknown"
    );
    server.stop().await;
}

async fn wait_for_balance(pos: &mut Pos, member: &str, want: i64) {
    for _ in 0..200 {
        if pos.balance("t1", member).await.active == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = pos.balance("t1", member).await.active;
    panic!("{member} has {got} points, expected {want}");
}

#[tokio::test]
async fn registration_questionnaire_and_referral_bonuses_are_granted_once() {
    let (_dir, server, channel) = dev().await;
    let mut campaigns = CampaignServiceClient::new(channel.clone());
    let mut pos = Pos::new(&channel, &channel);
    for (id, action, points) in [
        ("welcome", ppb::ActionKind::Registration, 10_000),
        ("profile", ppb::ActionKind::Questionnaire, 5_000),
        ("invite", ppb::ActionKind::Referral, 20_000),
    ] {
        create(
            &mut campaigns,
            campaign(
                "t1",
                id,
                ppb::campaign::Mechanic::ActionBonus(ppb::ActionBonus {
                    action: action as i32,
                    points,
                    lifetime_days: 30,
                }),
            ),
        )
        .await
        .unwrap();
    }
    let referrer = pos
        .members
        .register_member(ipb::RegisterMemberRequest {
            tenant_id: "t1".into(),
            phone: "+77010000010".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap();
    wait_for_balance(&mut pos, &referrer.member_id, 10_000).await;
    let friend = pos
        .members
        .register_member(ipb::RegisterMemberRequest {
            tenant_id: "t1".into(),
            phone: "+77010000011".into(),
            referral_code: referrer.referral_code.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap();
    wait_for_balance(&mut pos, &friend.member_id, 10_000).await;
    wait_for_balance(&mut pos, &referrer.member_id, 30_000).await;
    // Filling the questionnaire earns its bonus once, however often the profile changes.
    for name in ["Aigerim", "Aiya"] {
        pos.members
            .update_profile(ipb::UpdateProfileRequest {
                tenant_id: "t1".into(),
                member_id: friend.member_id.clone(),
                member: Some(ipb::Member {
                    first_name: name.into(),
                    last_name: "Sadykova".into(),
                    gender: ipb::Gender::Female as i32,
                    birthday: Some(Date {
                        year: 1990,
                        month: 5,
                        day: 17,
                    }),
                    ..Default::default()
                }),
                update_mask: vec![
                    "first_name".into(),
                    "last_name".into(),
                    "gender".into(),
                    "birthday".into(),
                ],
            })
            .await
            .unwrap();
    }
    wait_for_balance(&mut pos, &friend.member_id, 15_000).await;
    // Nothing more arrives later (redeliveries and later changes grant nothing twice).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pos.balance("t1", &friend.member_id).await.active, 15_000);
    assert_eq!(pos.balance("t1", &referrer.member_id).await.active, 30_000);
    server.stop().await;
}
