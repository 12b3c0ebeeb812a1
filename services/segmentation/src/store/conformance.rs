//! The storage conformance suite every `SegmentationStore` backend must pass.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loyalty_platform::clock::{DAY_MS, Millis};
use rust_decimal::Decimal;

use super::{
    Change, FeatureChange, RfmRun, Rule, RuleBook, SegmentDef, SegmentKind, SegmentationStore,
};
use crate::expr;
use crate::features::{LedgerPoints, MemberData, PurchaseFacts};
use crate::rfm::{Named, Score};

const T0: Millis = 1_750_000_000_000;

pub(super) fn purchase(
    tenant: &str,
    id: &str,
    member: &str,
    at: Millis,
    paid: i64,
) -> FeatureChange {
    FeatureChange {
        tenant_id: tenant.into(),
        event_id: format!("purchase/{tenant}/{id}"),
        member_id: member.into(),
        change: Change::Purchase(PurchaseFacts {
            time: at,
            store_id: "s1".into(),
            paid: Decimal::from(paid),
            lines: vec![("c".into(), "b".into(), Decimal::from(paid))],
            points_balance: None,
            tier_id: None,
        }),
    }
}

fn ledger(tenant: &str, member: &str, sequence: i64, total: i64) -> FeatureChange {
    FeatureChange {
        tenant_id: tenant.into(),
        event_id: format!("ledger/{tenant}/{member}/{sequence}"),
        member_id: member.into(),
        change: Change::Ledger(LedgerPoints {
            sequence,
            total,
            at: T0,
        }),
    }
}

pub(super) fn dynamic(
    tenant: &str,
    id: &str,
    predicate: &str,
    version: i64,
    at: Millis,
) -> SegmentDef {
    SegmentDef {
        tenant_id: tenant.into(),
        segment_id: id.into(),
        name: id.into(),
        kind: SegmentKind::Dynamic,
        predicate: predicate.into(),
        version,
        update_time: at,
    }
}

fn rule(def: &SegmentDef) -> Rule {
    Rule {
        segment_id: def.segment_id.clone(),
        version: def.version,
        update_time: def.update_time,
        expr: expr::parse(&def.predicate).unwrap(),
    }
}

fn book(tenant: &str, rules: Vec<Rule>) -> RuleBook {
    let mut book = RuleBook::new();
    book.insert(tenant.into(), rules);
    book
}

/// Runs every check; `s` must be empty.
pub async fn run_all(s: &dyn SegmentationStore) {
    events_apply_once(s).await;
    segments_are_compare_and_set(s).await;
    memberships_follow_rules_and_history(s).await;
    stale_rules_write_nothing(s).await;
    ledger_entries_touch_only_rules_that_read_points(s).await;
    pages_of_members_and_features(s).await;
    deleting_a_segment_drops_its_members(s).await;
    static_memberships(s).await;
    rfm_runs(s).await;
    tenants_are_listed(s).await;
    clearing_features_keeps_segments(s).await;
    racing_writers(&[s]).await;
    s.ping().await.unwrap();
}

/// 40 purchases of one member applied at once through `stores` (handles on one storage, as
/// replicas hold), with a re-evaluation racing them: none is lost, and the member ends in
/// the segment its features say.
pub async fn racing_writers(stores: &[&dyn SegmentationStore]) {
    let big = dynamic("race", "big", "purchase_count_total >= 40", 1, T0);
    assert!(stores[0].put_segment(big.clone(), None).await.unwrap());
    let writes = (0..40).map(|i| {
        let s = stores[i % stores.len()];
        let rules = book("race", vec![rule(&big)]);
        async move {
            let change = purchase("race", &format!("p{i}"), "m1", T0, 1);
            s.apply_changes(vec![change], rules, T0).await.unwrap()
        }
    });
    let evaluations = (0..4).map(|i| {
        let s = stores[i % stores.len()];
        let rules = vec![rule(&big)];
        async move { s.evaluate_page("race", "", 10, rules, T0).await.unwrap().1 }
    });
    let (applied, _) = futures_util::future::join(
        futures_util::future::join_all(writes),
        futures_util::future::join_all(evaluations),
    )
    .await;
    assert_eq!(applied.iter().sum::<usize>(), 40);
    let f = stores[0].features("race", "m1").await.unwrap().unwrap();
    assert_eq!(f.total.count, 40, "no purchase lost");
    assert_eq!(
        stores[0].member_segments("race", "m1").await.unwrap(),
        ["big"]
    );
    assert_eq!(stores[0].count("race", "big").await.unwrap(), 1);
}

/// An event applies once: a redelivery, alone or inside a later batch, changes nothing.
async fn events_apply_once(s: &dyn SegmentationStore) {
    let first = vec![
        purchase("a", "p1", "m1", T0, 100),
        purchase("a", "p2", "m1", T0, 50),
    ];
    assert_eq!(
        s.apply_changes(first.clone(), RuleBook::new(), T0)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        s.apply_changes(first, RuleBook::new(), T0).await.unwrap(),
        0
    );
    let mixed = vec![
        purchase("a", "p2", "m1", T0, 50),
        purchase("a", "p3", "m1", T0, 25),
    ];
    assert_eq!(
        s.apply_changes(mixed, RuleBook::new(), T0).await.unwrap(),
        1
    );
    let f = s.features("a", "m1").await.unwrap().unwrap();
    assert_eq!(f.total.count, 3);
    assert_eq!(f.total.spend, Decimal::from(175));
    assert!(s.features("a", "nobody").await.unwrap().is_none());
    assert!(
        s.features("other", "m1").await.unwrap().is_none(),
        "tenants apart"
    );
    // The same event id twice in one batch counts once.
    let twice = vec![
        purchase("a", "p4", "m2", T0, 10),
        purchase("a", "p4", "m2", T0, 10),
    ];
    assert_eq!(
        s.apply_changes(twice, RuleBook::new(), T0).await.unwrap(),
        1
    );
    assert_eq!(s.features("a", "m2").await.unwrap().unwrap().total.count, 1);
}

async fn segments_are_compare_and_set(s: &dyn SegmentationStore) {
    let v1 = dynamic("b", "big", "spend_total > 100", 1, T0);
    assert!(s.put_segment(v1.clone(), None).await.unwrap());
    assert!(!s.put_segment(v1.clone(), None).await.unwrap(), "exists");
    let v2 = dynamic("b", "big", "spend_total > 200", 2, T0 + 1);
    assert!(
        !s.put_segment(v2.clone(), Some(5)).await.unwrap(),
        "wrong version"
    );
    assert!(
        !s.put_segment(dynamic("b", "x", "spend_total > 1", 2, T0), Some(1))
            .await
            .unwrap()
    );
    assert!(s.put_segment(v2.clone(), Some(1)).await.unwrap());
    assert_eq!(s.segment("b", "big").await.unwrap(), Some(v2.clone()));
    assert_eq!(s.segment("b", "none").await.unwrap(), None);
    let small = dynamic("b", "a-small", "spend_total < 10", 1, T0);
    assert!(s.put_segment(small.clone(), None).await.unwrap());
    let mut listed = s.segments("b").await.unwrap();
    listed.sort_by(|x, y| x.segment_id.cmp(&y.segment_id));
    assert_eq!(listed, vec![small, v2]);
    assert!(s.segments("nobody").await.unwrap().is_empty());
    for id in ["big", "a-small"] {
        assert!(s.delete_segment("b", id, T0).await.unwrap());
    }
}

/// Rules are evaluated in the write that applies the events; each change is in the
/// member's history, newest first, paged.
async fn memberships_follow_rules_and_history(s: &dyn SegmentationStore) {
    let big = dynamic("c", "big", "spend_total >= 100", 1, T0);
    let any = dynamic("c", "any", "purchase_count_total > 0", 1, T0);
    for d in [&big, &any] {
        assert!(s.put_segment(d.clone(), None).await.unwrap());
    }
    let rules = || book("c", vec![rule(&big), rule(&any)]);
    s.apply_changes(vec![purchase("c", "p1", "m1", T0, 60)], rules(), T0)
        .await
        .unwrap();
    assert_eq!(s.member_segments("c", "m1").await.unwrap(), ["any"]);
    s.apply_changes(vec![purchase("c", "p2", "m1", T0, 60)], rules(), T0 + 1)
        .await
        .unwrap();
    let mut now_in = s.member_segments("c", "m1").await.unwrap();
    now_in.sort();
    assert_eq!(now_in, ["any", "big"]);
    assert_eq!(s.count("c", "big").await.unwrap(), 1);
    assert_eq!(s.count("c", "any").await.unwrap(), 1);
    assert_eq!(s.segment_members("c", "big", "", 10).await.unwrap(), ["m1"]);
    // A redelivered batch re-evaluates its members: a rule the first pass missed applies.
    let late = dynamic("c", "late", "spend_total > 0", 1, T0);
    assert!(s.put_segment(late.clone(), None).await.unwrap());
    let with_late = book("c", vec![rule(&big), rule(&any), rule(&late)]);
    assert_eq!(
        s.apply_changes(vec![purchase("c", "p2", "m1", T0, 60)], with_late, T0 + 2)
            .await
            .unwrap(),
        0
    );
    assert!(
        s.member_segments("c", "m1")
            .await
            .unwrap()
            .contains(&"late".to_string())
    );

    let (page, token) = s.history("c", "m1", None, 2).await.unwrap();
    assert_eq!(page.len(), 2);
    assert_eq!(
        (page[0].segment_id.as_str(), page[0].entered, page[0].time),
        ("late", true, T0 + 2)
    );
    assert_eq!((page[1].segment_id.as_str(), page[1].time), ("big", T0 + 1));
    let (rest, end) = s.history("c", "m1", token, 10).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!((rest[0].segment_id.as_str(), rest[0].time), ("any", T0));
    assert!(end.is_none());
    assert!(
        s.history("c", "nobody", None, 10)
            .await
            .unwrap()
            .0
            .is_empty()
    );
}

/// A rule compiled from an older version of its segment, or from a segment deleted and
/// created again, writes no membership.
async fn stale_rules_write_nothing(s: &dyn SegmentationStore) {
    let v1 = dynamic("d", "seg", "spend_total > 0", 1, T0);
    assert!(s.put_segment(v1.clone(), None).await.unwrap());
    let v2 = dynamic("d", "seg", "spend_total > 1000", 2, T0 + 5);
    assert!(s.put_segment(v2, Some(1)).await.unwrap());
    s.apply_changes(
        vec![purchase("d", "p1", "m1", T0, 10)],
        book("d", vec![rule(&v1)]),
        T0,
    )
    .await
    .unwrap();
    assert!(s.member_segments("d", "m1").await.unwrap().is_empty());
    assert!(s.delete_segment("d", "seg", T0).await.unwrap());
    let again = dynamic("d", "seg", "spend_total > 0", 1, T0 + 9);
    assert!(s.put_segment(again.clone(), None).await.unwrap());
    assert_eq!(
        s.evaluate_page("d", "", 10, vec![rule(&v1)], T0)
            .await
            .unwrap()
            .1,
        0,
        "the first incarnation's rule"
    );
    assert!(s.member_segments("d", "m1").await.unwrap().is_empty());
    let (last, changed) = s
        .evaluate_page("d", "", 10, vec![rule(&again)], T0)
        .await
        .unwrap();
    assert_eq!((last.as_deref(), changed), (Some("m1"), 1));
    assert_eq!(s.member_segments("d", "m1").await.unwrap(), ["seg"]);
}

/// A member named only by ledger entries is evaluated only against rules that read points.
async fn ledger_entries_touch_only_rules_that_read_points(s: &dyn SegmentationStore) {
    let rich = dynamic("e", "rich", "points_total >= 500", 1, T0);
    let big = dynamic("e", "big", "spend_total > 0", 1, T0);
    for d in [&rich, &big] {
        assert!(s.put_segment(d.clone(), None).await.unwrap());
    }
    // `big` is true of m1 but only a purchase event evaluates it.
    s.apply_changes(vec![purchase("e", "p1", "m1", T0, 10)], RuleBook::new(), T0)
        .await
        .unwrap();
    let rules = || book("e", vec![rule(&rich), rule(&big)]);
    s.apply_changes(vec![ledger("e", "m1", 1, 700)], rules(), T0)
        .await
        .unwrap();
    assert_eq!(s.member_segments("e", "m1").await.unwrap(), ["rich"]);
    assert_eq!(
        s.features("e", "m1").await.unwrap().unwrap().ledger.total,
        700
    );
    s.apply_changes(vec![purchase("e", "p2", "m1", T0, 10)], rules(), T0)
        .await
        .unwrap();
    let mut all = s.member_segments("e", "m1").await.unwrap();
    all.sort();
    assert_eq!(all, ["big", "rich"]);
}

/// Members with features page in id order; a page evaluation writes what changed.
async fn pages_of_members_and_features(s: &dyn SegmentationStore) {
    for (i, m) in ["m3", "m1", "m2"].iter().enumerate() {
        s.apply_changes(
            vec![purchase("f", &format!("p{i}"), m, T0 - 40 * DAY_MS, 10)],
            RuleBook::new(),
            T0,
        )
        .await
        .unwrap();
    }
    let page = s.features_page("f", "", 2).await.unwrap();
    let ids: Vec<&str> = page.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(ids, ["m1", "m2"]);
    let rest = s.features_page("f", "m2", 10).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].0, "m3");
    let active = dynamic("f", "active", "purchase_count_30d > 0", 1, T0);
    let ever = dynamic("f", "ever", "purchase_count_total > 0", 1, T0);
    for d in [&active, &ever] {
        assert!(s.put_segment(d.clone(), None).await.unwrap());
    }
    let rules = vec![rule(&active), rule(&ever)];
    let (last, changed) = s
        .evaluate_page("f", "", 2, rules.clone(), T0)
        .await
        .unwrap();
    assert_eq!((last.as_deref(), changed), (Some("m2"), 2));
    let (last, changed) = s
        .evaluate_page("f", "m2", 2, rules.clone(), T0)
        .await
        .unwrap();
    assert_eq!((last.as_deref(), changed), (Some("m3"), 1));
    let (last, changed) = s
        .evaluate_page("f", "m3", 2, rules.clone(), T0)
        .await
        .unwrap();
    assert_eq!((last, changed), (None, 0));
    assert_eq!(s.count("f", "ever").await.unwrap(), 3);
    assert_eq!(s.count("f", "active").await.unwrap(), 0);
    // Nothing changes on a second pass.
    assert_eq!(s.evaluate_page("f", "", 10, rules, T0).await.unwrap().1, 0);
    assert_eq!(
        s.segment_members("f", "ever", "m1", 10).await.unwrap(),
        ["m2", "m3"]
    );
}

async fn deleting_a_segment_drops_its_members(s: &dyn SegmentationStore) {
    let all = dynamic("g", "all", "purchase_count_total > 0", 1, T0);
    assert!(s.put_segment(all.clone(), None).await.unwrap());
    let changes = (0..5)
        .map(|i| purchase("g", &format!("p{i}"), &format!("m{i}"), T0, 10))
        .collect();
    s.apply_changes(changes, book("g", vec![rule(&all)]), T0)
        .await
        .unwrap();
    assert_eq!(s.count("g", "all").await.unwrap(), 5);
    assert!(s.delete_segment("g", "all", T0 + 1).await.unwrap());
    assert!(!s.delete_segment("g", "all", T0 + 1).await.unwrap(), "gone");
    assert_eq!(s.count("g", "all").await.unwrap(), 0);
    assert!(
        s.segment_members("g", "all", "", 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.member_segments("g", "m0").await.unwrap().is_empty());
    let (history, _) = s.history("g", "m0", None, 10).await.unwrap();
    assert!(
        !history[0].entered,
        "leaving is in the history: {history:?}"
    );
}

/// Static lists: flags set directly, counted once, ignored for a segment that is gone.
async fn static_memberships(s: &dyn SegmentationStore) {
    let list = SegmentDef {
        kind: SegmentKind::Static,
        predicate: String::new(),
        ..dynamic("h", "vip", "", 1, T0)
    };
    assert!(s.put_segment(list.clone(), None).await.unwrap());
    // Renamed (a new version) before the upload: the flags are set all the same.
    let renamed = SegmentDef {
        name: "VIP".into(),
        version: 2,
        update_time: T0 + 1,
        ..list
    };
    assert!(s.put_segment(renamed, Some(1)).await.unwrap());
    let set = |m: &str, on: bool| (m.to_string(), "vip".to_string(), on);
    let changed = s
        .set_memberships(
            "h",
            vec![set("m1", true), set("m2", true), set("m1", true)],
            T0,
        )
        .await
        .unwrap();
    assert_eq!(changed, 2);
    assert_eq!(s.count("h", "vip").await.unwrap(), 2);
    let gone = ("m1".to_string(), "nothing".to_string(), true);
    assert_eq!(s.set_memberships("h", vec![gone], T0).await.unwrap(), 0);
    assert_eq!(
        s.set_memberships("h", vec![set("m2", false)], T0)
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.segment_members("h", "vip", "", 10).await.unwrap(), ["m1"]);
    assert_eq!(s.member_segments("h", "m1").await.unwrap(), ["vip"]);
}

async fn rfm_runs(s: &dyn SegmentationStore) {
    let score = |r: u8| Score {
        recency: r,
        frequency: 3,
        monetary: 3,
        named: Named::Loyal,
    };
    assert!(s.rfm_run("r").await.unwrap().is_none());
    let g1 = s.next_rfm_generation("r").await.unwrap();
    let g2 = s.next_rfm_generation("r").await.unwrap();
    assert!(g2 > g1);
    s.put_rfm("r", g1, vec![("m1".into(), score(1))])
        .await
        .unwrap();
    assert!(
        s.rfm("r", "m1").await.unwrap().is_none(),
        "not published yet"
    );
    let run = |generation: u64| RfmRun {
        generation,
        computed_at: T0,
        members: 1,
    };
    assert!(s.publish_rfm("r", run(g1)).await.unwrap());
    assert_eq!(s.rfm("r", "m1").await.unwrap(), Some(score(1)));
    s.put_rfm("r", g2, vec![("m1".into(), score(5))])
        .await
        .unwrap();
    assert!(s.publish_rfm("r", run(g2)).await.unwrap());
    assert_eq!(s.rfm_run("r").await.unwrap(), Some(run(g2)));
    assert_eq!(s.rfm("r", "m1").await.unwrap(), Some(score(5)));
    // An earlier run finishing late is not published over a later one.
    assert!(!s.publish_rfm("r", run(g1)).await.unwrap());
    assert_eq!(s.rfm("r", "m1").await.unwrap(), Some(score(5)));
    assert!(s.rfm("r", "m2").await.unwrap().is_none());
}

async fn tenants_are_listed(s: &dyn SegmentationStore) {
    let with_segments = s.tenants().await.unwrap();
    for t in ["c", "d", "e", "f", "h"] {
        assert!(
            with_segments.contains(&t.to_string()),
            "{t}: {with_segments:?}"
        );
    }
    assert!(
        !with_segments.contains(&"a".to_string()),
        "{with_segments:?}"
    );
    let with_features = s.tenants_with_features().await.unwrap();
    for t in ["a", "c", "d", "e", "f", "g"] {
        assert!(
            with_features.contains(&t.to_string()),
            "{t}: {with_features:?}"
        );
    }
    assert!(
        !with_features.contains(&"h".to_string()),
        "{with_features:?}"
    );
}

/// Clearing features forgets them and the applied ids; segments and memberships stay.
async fn clearing_features_keeps_segments(s: &dyn SegmentationStore) {
    s.clear_features().await.unwrap();
    assert!(s.features("a", "m1").await.unwrap().is_none());
    assert!(s.tenants_with_features().await.unwrap().is_empty());
    assert_eq!(s.member_segments("c", "m1").await.unwrap().len(), 3);
    assert!(s.segment("c", "big").await.unwrap().is_some());
    // The events apply again.
    let again = vec![purchase("a", "p1", "m1", T0, 100)];
    assert_eq!(
        s.apply_changes(again, RuleBook::new(), T0).await.unwrap(),
        1
    );
    let erased = FeatureChange {
        tenant_id: "a".into(),
        event_id: "member/a/m1/9".into(),
        member_id: "m1".into(),
        change: Change::Erasure(MemberData {
            known: true,
            version: 9,
            ..MemberData::default()
        }),
    };
    s.apply_changes(vec![erased], RuleBook::new(), T0)
        .await
        .unwrap();
    assert!(s.scrub().await.unwrap(), "an erasure was applied");
    assert!(!s.scrub().await.unwrap(), "nothing since");
}
