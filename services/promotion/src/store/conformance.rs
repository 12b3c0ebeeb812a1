//! The storage conformance suite every `PromotionStore` backend must pass.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loyalty_platform::error::Error;
use loyalty_platform::types::Channel;

use super::{PromotionStore, Put};
use crate::book::CampaignBook;
use crate::calendar::LocalTime;
use crate::campaign::{
    Budget, Campaign, CampaignStatus, Coupon, Mechanic, StackingGroup, StackingMode, Targeting,
};
use crate::catalog::{Product, Store};
use crate::evaluate::{Codes, LineInfo, Situation, evaluate};
use crate::program::Program;
use crate::purchase::{Purchase, PurchaseState, fingerprint};
use crate::receipt::{Identification, Line, Receipt};
use crate::usage::{Claim, Counters};

fn store(id: &str) -> Store {
    Store {
        store_id: id.into(),
        name: format!("Store {id}"),
        brand: "b".into(),
        region: String::new(),
        time_zone: String::new(),
    }
}

fn product(sku: &str) -> Product {
    Product {
        sku: sku.into(),
        name: sku.into(),
        category: "c".into(),
        brand: "b".into(),
    }
}

/// A pending purchase of tenant "t" at time 0, evaluated for real.
pub(crate) fn purchase(receipt_id: &str) -> Purchase {
    let receipt = Receipt {
        tenant_id: "t".into(),
        receipt_id: receipt_id.into(),
        store_id: "s1".into(),
        channel: Channel::Store,
        terminal_id: String::new(),
        cashier_id: String::new(),
        identification: Identification::None,
        lines: vec![Line {
            line_id: "1".into(),
            sku: "p1".into(),
            quantity: 1.into(),
            unit_price: 10.into(),
            sale_price: false,
        }],
        codes: Vec::new(),
        points_to_redeem: 0,
        purchase_time: None,
    };
    let situation = Situation {
        store_brand: "",
        local: LocalTime::at(0, ""),
        time_zone: "",
        lines: &[LineInfo::default()],
        member: None,
        profile: None,
        codes: &Codes::default(),
        counters: &Counters::default(),
        now: 0,
    };
    let program = Program::case_study("t", "KZT");
    let evaluation = evaluate(&program, &CampaignBook::default(), &receipt, &situation);
    Purchase {
        fingerprint: fingerprint(&receipt),
        receipt,
        program,
        evaluated_at: 0,
        month: 0,
        store: crate::events::StoreFacts {
            brand: "b".into(),
            region: "r".into(),
            time_zone: "Asia/Almaty".into(),
        },
        evaluation,
        state: PurchaseState::Pending,
        refunds: Vec::new(),
        version: 1,
    }
}

/// Runs every check; `s` must be empty.
pub async fn run_all(s: &dyn PromotionStore) {
    programs(s).await;
    catalog(s).await;
    purchases(s).await;
    claims(s).await;
    campaigns(s).await;
    coupons(s).await;
    purchases_in_order(s).await;
    a_merged_members_history_moves(s).await;
    unsettled_purchases(s).await;
    unsettled_pages(s).await;
    racing_claims(&[s]).await;
    s.ping().await.unwrap();
}

/// 40 commits race for a budget of 7 uses through `stores` (handles on one storage, as
/// replicas hold): exactly 7 are written, and the counter says 7.
pub async fn racing_claims(stores: &[&dyn PromotionStore]) {
    let attempts = (0..40).map(|i| {
        let s = stores[i % stores.len()];
        async move {
            let mut p = purchase(&format!("race-{i}"));
            p.receipt.tenant_id = "race".into();
            s.put_purchase(&p, None, &[claim("uses/budget", 1, 7)])
                .await
                .unwrap()
        }
    });
    let outcomes = futures_util::future::join_all(attempts).await;
    let written = outcomes.iter().filter(|o| **o == Put::Written).count();
    assert_eq!(written, 7, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Put::Written | Put::Refused(0)))
    );
    let names = ["uses/budget".to_string()];
    assert_eq!(stores[0].counters("race", &names).await.unwrap(), [7]);
    let mut stored = 0;
    for i in 0..40 {
        stored += usize::from(
            stores[0]
                .purchase("race", &format!("race-{i}"))
                .await
                .unwrap()
                .is_some(),
        );
    }
    assert_eq!(stored, 7, "a refused commit writes no purchase");
}

fn committed(receipt_id: &str, member: &str, at: i64) -> Purchase {
    let mut p = purchase(receipt_id);
    p.receipt.tenant_id = "mh".into();
    p.evaluation.member = Some(crate::evaluate::MemberContext {
        member_id: member.into(),
        points_available: 0,
        tier_id: String::new(),
    });
    p.state = PurchaseState::Committed {
        commit_time: at,
        points_balance: Some(0),
    };
    p
}

/// Pending commits and refunds whose points have not moved are listed by the time they
/// became unsettled, until settled. Runs after the other cases: it expects every earlier
/// purchase settled or pending since time 0.
async fn unsettled_purchases(s: &dyn PromotionStore) {
    let stale = |before| async move {
        s.stale_unsettled(before, None, 100)
            .await
            .unwrap()
            .into_iter()
            .filter(|u| u.tenant_id == "un")
            .map(|u| u.receipt_id)
            .collect::<Vec<_>>()
    };
    let mut pending = purchase("u1");
    pending.receipt.tenant_id = "un".into();
    pending.evaluated_at = 5_000;
    assert_eq!(
        s.put_purchase(&pending, None, &[]).await.unwrap(),
        Put::Written
    );
    assert_eq!(
        stale(5_000).await,
        Vec::<String>::new(),
        "not before it was evaluated"
    );
    assert_eq!(stale(5_001).await, ["u1"]);

    // Committed: settled, until a refund is accepted whose points have not moved.
    let mut p = pending.clone();
    p.state = PurchaseState::Committed {
        commit_time: 6_000,
        points_balance: None,
    };
    p.version = 2;
    assert_eq!(
        s.put_purchase(&p, Some(1), &[]).await.unwrap(),
        Put::Written
    );
    assert!(
        stale(i64::MAX).await.is_empty(),
        "a committed purchase is settled"
    );
    let refund = |id: &str, at: i64| crate::purchase::Refund {
        refund_id: id.into(),
        fingerprint: Vec::new(),
        lines: vec![("1".into(), 1.into())],
        refunded_amount: 10.into(),
        reverse_points: 1,
        give_back_points: 0,
        reverse_bonus: Vec::new(),
        releases: Vec::new(),
        outcome: None,
        refunded_at: at,
    };
    p.refunds.push(refund("f1", 9_000));
    p.refunds.push(refund("f2", 8_000));
    p.version = 3;
    assert_eq!(
        s.put_purchase(&p, Some(2), &[]).await.unwrap(),
        Put::Written
    );
    assert!(stale(8_000).await.is_empty());
    assert_eq!(
        stale(8_001).await,
        ["u1"],
        "since its oldest unsettled refund"
    );

    let settled = crate::purchase::RefundOutcome {
        points_reversed: 1,
        points_unrecovered: 0,
        points_returned: 0,
        points_balance: 0,
    };
    p.refunds[1].outcome = Some(settled);
    p.version = 4;
    assert_eq!(
        s.put_purchase(&p, Some(3), &[]).await.unwrap(),
        Put::Written
    );
    assert!(
        stale(9_000).await.is_empty(),
        "f2 settled: filed under f1's time now"
    );
    assert_eq!(stale(9_001).await, ["u1"]);
    p.refunds[0].outcome = Some(settled);
    p.version = 5;
    assert_eq!(
        s.put_purchase(&p, Some(4), &[]).await.unwrap(),
        Put::Written
    );
    assert!(stale(i64::MAX).await.is_empty(), "every refund settled");
}

/// Unsettled purchases page by a cursor, in (time, tenant, receipt) order.
async fn unsettled_pages(s: &dyn PromotionStore) {
    for (r, at) in [("p1", 300), ("p3", 200), ("p2", 200)] {
        let mut p = purchase(r);
        p.receipt.tenant_id = "uc".into();
        p.evaluated_at = at;
        assert_eq!(s.put_purchase(&p, None, &[]).await.unwrap(), Put::Written);
    }
    let all = s.stale_unsettled(301, None, 10_000).await.unwrap();
    assert!(all.windows(2).all(|w| w[0] < w[1]), "in order: {all:?}");
    let ours: Vec<&str> = all
        .iter()
        .filter(|u| u.tenant_id == "uc")
        .map(|u| u.receipt_id.as_str())
        .collect();
    assert_eq!(ours, ["p2", "p3", "p1"]);
    assert_eq!(
        all.iter().find(|u| u.receipt_id == "p1").map(|u| u.since),
        Some(300)
    );
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = s.stale_unsettled(301, after.as_ref(), 2).await.unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last().cloned() else {
            break;
        };
        paged.extend(page);
        after = Some(last);
    }
    assert_eq!(paged, all, "pages after a cursor skip and repeat nothing");
}

/// A member's history newest first, and a merge filing it under the survivor.
async fn a_merged_members_history_moves(s: &dyn PromotionStore) {
    for (r, m, at) in [("h1", "keep", 10), ("h2", "dup", 20), ("h3", "dup", 30)] {
        assert_eq!(
            s.put_purchase(&committed(r, m, at), None, &[])
                .await
                .unwrap(),
            Put::Written
        );
    }
    let receipts = |items: Vec<(String, Purchase)>| -> Vec<String> {
        items
            .into_iter()
            .map(|(_, p)| p.receipt.receipt_id)
            .collect()
    };
    let dup = s.member_purchases("mh", "dup", "", 10).await.unwrap();
    assert_eq!(receipts(dup), ["h3", "h2"]);
    assert_eq!(
        s.move_member_purchases("mh", "dup", "keep").await.unwrap(),
        2
    );
    let keep = s.member_purchases("mh", "keep", "", 10).await.unwrap();
    assert_eq!(receipts(keep), ["h3", "h2", "h1"]);
    assert!(
        s.member_purchases("mh", "dup", "", 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.move_member_purchases("mh", "dup", "keep").await.unwrap(),
        0
    );
    assert_eq!(
        receipts(s.member_purchases("mh", "keep", "", 10).await.unwrap()).len(),
        3
    );
    // A receipt of the merged member committed after its history moved (resolved just
    // before the merge) is filed under the survivor, through chains of merges too.
    s.put_purchase(&committed("h4", "dup", 40), None, &[])
        .await
        .unwrap();
    s.move_member_purchases("mh", "old", "dup").await.unwrap();
    s.put_purchase(&committed("h5", "old", 50), None, &[])
        .await
        .unwrap();
    let keep = s.member_purchases("mh", "keep", "", 10).await.unwrap();
    assert_eq!(receipts(keep), ["h5", "h4", "h3", "h2", "h1"]);
    // History moved to a member merged away already goes on to where that one's went.
    s.put_purchase(&committed("h0", "oldest", 5), None, &[])
        .await
        .unwrap();
    assert_eq!(
        s.move_member_purchases("mh", "oldest", "dup")
            .await
            .unwrap(),
        1
    );
    let keep = s.member_purchases("mh", "keep", "", 10).await.unwrap();
    assert_eq!(receipts(keep), ["h5", "h4", "h3", "h2", "h1", "h0"]);
    for merged in ["dup", "old", "oldest"] {
        assert!(
            s.member_purchases("mh", merged, "", 10)
                .await
                .unwrap()
                .is_empty()
        );
    }
}

/// Every purchase once, in (tenant, receipt) order, a page at a time.
async fn purchases_in_order(s: &dyn PromotionStore) {
    let mut keys = Vec::new();
    let mut after = None;
    loop {
        let page = s.purchases_after(after.clone(), 3).await.unwrap();
        if page.is_empty() {
            break;
        }
        after = page
            .last()
            .map(|p| (p.receipt.tenant_id.clone(), p.receipt.receipt_id.clone()));
        keys.extend(
            page.iter()
                .map(|p| (p.receipt.tenant_id.clone(), p.receipt.receipt_id.clone())),
        );
    }
    assert!(!keys.is_empty(), "the suite stored purchases before");
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(keys, sorted, "in order, each once");
}

async fn programs(s: &dyn PromotionStore) {
    assert_eq!(s.program("t").await.unwrap(), None);
    let saved = s
        .update_program(Program::case_study("t", "KZT"), 0)
        .await
        .unwrap();
    assert_eq!(saved.version, 1);
    let saved = s
        .update_program(Program::case_study("t", "KZT"), 1)
        .await
        .unwrap();
    assert_eq!(saved.version, 2);
    let err = s
        .update_program(Program::case_study("t", "USD"), 1)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    assert_eq!(
        s.program("t").await.unwrap().unwrap().currency,
        "KZT",
        "a refused update writes nothing"
    );
    assert_eq!(s.program("other").await.unwrap(), None);
}

async fn catalog(s: &dyn PromotionStore) {
    s.upsert_stores("t", &[store("s2"), store("s1"), store("s3")])
        .await
        .unwrap();
    s.upsert_stores("u", &[store("s9")]).await.unwrap();
    let page: Vec<_> = s
        .list_stores("t", "", 2)
        .await
        .unwrap()
        .into_iter()
        .map(|x| x.store_id)
        .collect();
    assert_eq!(page, ["s1", "s2"]);
    let page: Vec<_> = s
        .list_stores("t", "s2", 2)
        .await
        .unwrap()
        .into_iter()
        .map(|x| x.store_id)
        .collect();
    assert_eq!(page, ["s3"]);
    s.upsert_products("t", &[product("p1"), product("p2")])
        .await
        .unwrap();
    assert_eq!(s.list_products("t", "", 10).await.unwrap().len(), 2);
    let ctx = s
        .checkout_context("t", "s1", &["p2".into(), "nope".into(), "p1".into()], &[])
        .await
        .unwrap();
    assert_eq!(ctx.store.unwrap().store_id, "s1");
    assert_eq!(ctx.program.unwrap().tenant_id, "t");
    let skus: Vec<_> = ctx
        .products
        .iter()
        .map(|p| p.as_ref().map(|p| p.sku.as_str()))
        .collect();
    assert_eq!(skus, [Some("p2"), None, Some("p1")]);
    let ctx = s
        .checkout_context("u", "s1", &["p1".into()], &[])
        .await
        .unwrap();
    assert!(ctx.store.is_none() && ctx.program.is_none() && ctx.products == [None]);
    assert_eq!(ctx.campaigns_version, 0);
}

async fn purchases(s: &dyn PromotionStore) {
    let mut p = purchase("r1");
    assert_eq!(s.put_purchase(&p, None, &[]).await.unwrap(), Put::Written);
    assert_eq!(
        s.put_purchase(&p, None, &[]).await.unwrap(),
        Put::Conflict,
        "insert-if-absent"
    );
    p.version = 2;
    assert_eq!(
        s.put_purchase(&p, Some(7), &[]).await.unwrap(),
        Put::Conflict,
        "compare-and-set on the version"
    );
    assert_eq!(
        s.put_purchase(&p, Some(1), &[]).await.unwrap(),
        Put::Written
    );
    assert_eq!(s.purchase("t", "r1").await.unwrap().unwrap().version, 2);
}

fn claim(counter: &str, amount: i64, limit: i64) -> Claim {
    Claim {
        counter: counter.into(),
        amount,
        limit,
    }
}

async fn claims(s: &dyn PromotionStore) {
    let names = ["uses/c1".to_string(), "spend/m/1".to_string()];
    assert_eq!(s.counters("t", &names).await.unwrap(), [0, 0]);
    let p = purchase("r2");
    let both = [claim("uses/c1", 1, 2), claim("spend/m/1", 500, 0)];
    assert_eq!(s.put_purchase(&p, None, &both).await.unwrap(), Put::Written);
    assert_eq!(s.counters("t", &names).await.unwrap(), [1, 500]);
    // Two uses of the same counter in one write count together.
    let p = purchase("r3");
    let twice = [claim("uses/c1", 1, 2), claim("uses/c1", 1, 2)];
    assert_eq!(
        s.put_purchase(&p, None, &twice).await.unwrap(),
        Put::Refused(1)
    );
    assert!(
        s.purchase("t", "r3").await.unwrap().is_none(),
        "a refusal writes nothing"
    );
    assert_eq!(s.counters("t", &names).await.unwrap(), [1, 500]);
    let p = purchase("r3");
    assert_eq!(
        s.put_purchase(
            &p,
            None,
            &[claim("spend/m/1", 7, 0), claim("uses/c1", 1, 2)]
        )
        .await
        .unwrap(),
        Put::Written
    );
    assert_eq!(s.counters("t", &names).await.unwrap(), [2, 507]);
    assert_eq!(
        s.claim("t", &[claim("uses/c1", 1, 2)]).await.unwrap(),
        Some(0)
    );
    // Giving back never goes below zero; other tenants are apart.
    assert_eq!(
        s.claim("t", &[claim("uses/c1", -5, 0)]).await.unwrap(),
        None
    );
    assert_eq!(s.counters("t", &names).await.unwrap(), [0, 507]);
    assert_eq!(s.counters("u", &names).await.unwrap(), [0, 0]);
}

fn campaign(id: &str, group: &str) -> Campaign {
    Campaign {
        tenant_id: "t".into(),
        campaign_id: id.into(),
        name: format!("Campaign {id}"),
        status: CampaignStatus::Active,
        stacking_group_id: group.into(),
        priority: 0,
        targeting: Targeting::default(),
        mechanic: Mechanic::FixedBonus {
            points: 100,
            activation_delay_days: 0,
            lifetime_days: 7,
        },
        code: None,
        budget: Budget::default(),
        member_limit: 0,
        member_limit_period_days: 0,
        control_group_percent: 0,
        version: 0,
        created_at: 0,
        updated_at: 0,
        updated_by: "test".into(),
    }
}

async fn campaigns(s: &dyn PromotionStore) {
    let (v0, none, _) = s.campaigns("t").await.unwrap();
    assert!(none.is_empty());
    let saved = s.save_campaign(campaign("c1", ""), None).await.unwrap();
    assert_eq!(saved.version, 1);
    let err = s.save_campaign(campaign("c1", ""), None).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
    let err = s
        .save_campaign(campaign("c1", ""), Some(7))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    let err = s
        .save_campaign(campaign("zz", ""), Some(1))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    assert_eq!(
        s.save_campaign(campaign("c1", ""), Some(1))
            .await
            .unwrap()
            .version,
        2
    );
    s.save_group(StackingGroup {
        tenant_id: "t".into(),
        group_id: "g".into(),
        name: String::new(),
        mode: StackingMode::ExclusiveBest,
        priority: 1,
        max_discount_percent: None,
    })
    .await
    .unwrap();
    s.save_campaign(campaign("c0", "g"), None).await.unwrap();
    let (v1, all, groups) = s.campaigns("t").await.unwrap();
    assert!(v1 > v0, "every change moves the version");
    let ids: Vec<_> = all.iter().map(|c| c.campaign_id.as_str()).collect();
    assert_eq!(ids, ["c0", "c1"]);
    assert_eq!(groups.len(), 1);
    let ctx = s.checkout_context("t", "s1", &[], &[]).await.unwrap();
    assert_eq!(ctx.campaigns_version, v1);
    assert_eq!(
        s.campaign("t", "c0")
            .await
            .unwrap()
            .unwrap()
            .stacking_group_id,
        "g"
    );
    assert!(s.campaign("u", "c0").await.unwrap().is_none());
    assert!(s.campaigns("u").await.unwrap().1.is_empty());
    let history: Vec<i64> = s
        .campaign_versions("t", "c1", 0, 10)
        .await
        .unwrap()
        .iter()
        .map(|c| c.version)
        .collect();
    assert_eq!(history, [2, 1], "every saved version is kept, newest first");
    let older: Vec<i64> = s
        .campaign_versions("t", "c1", 2, 10)
        .await
        .unwrap()
        .iter()
        .map(|c| c.version)
        .collect();
    assert_eq!(older, [1]);
}

async fn coupons(s: &dyn PromotionStore) {
    let coupon = |code: &str| Coupon {
        tenant_id: "t".into(),
        code: code.into(),
        campaign_id: "c1".into(),
        member_id: String::new(),
        max_uses: 1,
        expire_at: None,
        created_at: 0,
    };
    let codes = s
        .insert_coupons("t", "batch-1", &[coupon("AAA"), coupon("BBB")])
        .await
        .unwrap();
    assert_eq!(codes, ["AAA", "BBB"]);
    let again = s
        .insert_coupons("t", "batch-1", &[coupon("CCC")])
        .await
        .unwrap();
    assert_eq!(again, ["AAA", "BBB"], "the batch key makes it idempotent");
    let err = s
        .insert_coupons("t", "batch-2", &[coupon("DDD"), coupon("AAA")])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
    assert!(
        s.coupon("t", "DDD").await.unwrap().is_none(),
        "nothing written"
    );
    // One code twice in a batch is refused the same way.
    let err = s
        .insert_coupons(
            "t",
            "batch-3",
            &[coupon("EEE"), coupon("FFF"), coupon("EEE")],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
    assert!(
        s.coupon("t", "FFF").await.unwrap().is_none(),
        "nothing written"
    );
    s.claim("t", &[claim("coupon/AAA", 1, 1)]).await.unwrap();
    let (c, uses) = s.coupon("t", "AAA").await.unwrap().unwrap();
    assert_eq!((c.code.as_str(), uses), ("AAA", 1));
    let ctx = s
        .checkout_context("t", "s1", &[], &["BBB".into(), "NOPE".into()])
        .await
        .unwrap();
    assert_eq!(ctx.coupons.len(), 2);
    assert_eq!(ctx.coupons[0].as_ref().unwrap().1, 0);
    assert!(ctx.coupons[1].is_none());
    assert!(s.coupon("u", "AAA").await.unwrap().is_none());
}
