//! What every reporting store must do; run against each backend.

#![allow(clippy::unwrap_used)]

use loyalty_platform::types::Channel;
use rust_decimal::Decimal;

use super::{Receipts, ReportingStore, ScanFrom};
use crate::audit::{AuditEntry, AuditPage, AuditQuery, Order};
use crate::fact::{Fact, LedgerEntry, Member, Outlet, Purchase, Reason, Refund, TenantFact};

pub fn purchase(tenant: &str, receipt: &str, day: i64) -> TenantFact {
    TenantFact {
        tenant_id: tenant.into(),
        fact: Fact::Purchase(Purchase {
            cashier_id: String::new(),
            receipt_id: receipt.into(),
            outlet: Outlet {
                store_id: "s".into(),
                brand: "b".into(),
                region: "r".into(),
            },
            time_zone: "UTC".into(),
            channel: Channel::Store,
            member_id: None,
            time: day * 86_400_000,
            day,
            lines: vec![],
            gross: Decimal::TEN,
            discount: Decimal::ZERO,
            paid: Decimal::TEN,
            points_accrued: 0,
            points_redeemed: 0,
            codes: vec![],
            campaign_ids: vec![],
            held_out_campaign_ids: vec![],
            coupon_codes: Vec::new(),
        }),
    }
}

pub fn refund(tenant: &str, receipt: &str, refund: &str, day: i64) -> TenantFact {
    TenantFact {
        tenant_id: tenant.into(),
        fact: Fact::Refund(Refund {
            receipt_id: receipt.into(),
            refund_id: refund.into(),
            outlet: Outlet::default(),
            time_zone: String::new(),
            channel: Channel::Store,
            member_id: None,
            time: 0,
            day,
            lines: vec![],
            refunded: Decimal::ONE,
            fully_refunded: false,
            points_reversed: 0,
            points_returned: 0,
            codes: vec![],
            campaign_ids: vec![],
            held_out_campaign_ids: vec![],
            coupon_codes: Vec::new(),
        }),
    }
}

fn member(tenant: &str, id: &str, version: i64) -> TenantFact {
    TenantFact {
        tenant_id: tenant.into(),
        fact: Fact::Member(Member {
            member_id: id.into(),
            version,
            active: true,
            ..Member::default()
        }),
    }
}

async fn all(store: &dyn ReportingStore, page: usize) -> Vec<TenantFact> {
    let mut out = Vec::new();
    let mut from = ScanFrom::START;
    loop {
        let (facts, next) = store.scan(from, page).await.unwrap();
        out.extend(facts);
        match next {
            Some(n) => from = n,
            None => return out,
        }
    }
}

pub async fn run(store: &dyn ReportingStore) {
    store.prepare().await.unwrap();
    stores_each_fact_once(store).await;
    members_keep_their_newest_version(store).await;
    pages_respect_days_snapshots_and_positions(store).await;
    member_facts_are_found_by_member(store).await;
    scans_visit_everything_once(store).await;
    audit_records_are_stored_once_and_paged_both_ways(store).await;
    an_answer_replaces_its_start_in_either_order(store).await;
    // Last: it removes every fact.
    clearing_removes_the_facts_and_keeps_the_audit_log(store).await;
}

async fn clearing_removes_the_facts_and_keeps_the_audit_log(store: &dyn ReportingStore) {
    let t = "clear";
    let facts = vec![
        of_member(purchase(t, "c-r1", 100), "m1"),
        refund(t, "c-r1", "x1", 101),
        ledger(t, "m1", 1),
        member(t, "m1", 3),
    ];
    store.append(facts.clone()).await.unwrap();
    store
        .append_audit(vec![audit_entry(t, 1_000, "kept", "a.S/Keep")])
        .await
        .unwrap();
    let before = store.snapshot().await.unwrap();
    assert!(!all(store, 1000).await.is_empty());

    store.clear_facts().await.unwrap();
    assert_eq!(all(store, 1000).await, Vec::new(), "no fact of any tenant");
    let all_days = (i64::MIN, i64::MAX);
    let of_m1 = store
        .member_facts(t, vec!["m1".into()], all_days, true)
        .await
        .unwrap();
    assert!(of_m1.is_empty(), "{of_m1:?}");
    let query = AuditQuery::new(None, None, "", "", "").unwrap();
    let audit = store
        .audit_page(t, &query, Order::NewestFirst, None, 10, usize::MAX)
        .await
        .unwrap();
    assert_eq!(
        audit
            .entries
            .iter()
            .map(|e| e.id.as_str())
            .collect::<Vec<_>>(),
        ["kept"],
        "the audit log stays"
    );

    // The same facts are stored again (a rebuild), under sequence numbers after the old.
    let again = store.append(facts.clone()).await.unwrap();
    assert_eq!(again.len(), facts.len(), "each stored anew: {again:?}");
    assert!(store.snapshot().await.unwrap() > before);
    let mut got: Vec<String> = store
        .member_facts(t, vec!["m1".into()], all_days, true)
        .await
        .unwrap()
        .iter()
        .map(Fact::identity)
        .collect();
    got.sort();
    let mut want = vec![facts[0].fact.identity(), facts[2].fact.identity()];
    want.sort();
    assert_eq!(got, want, "the member index is rebuilt with them");
    assert_eq!(all(store, 1000).await.len(), facts.len());
}

fn audit_entry(tenant: &str, time: i64, id: &str, method: &str) -> AuditEntry {
    AuditEntry {
        id: id.into(),
        tenant_id: tenant.into(),
        time,
        key_id: "k1".into(),
        role: "admin".into(),
        actor_id: "manager:anna".into(),
        actor_comment: String::new(),
        method: method.into(),
        member_id: String::new(),
        status_code: 0,
        status_message: String::new(),
        request: "{}".into(),
        before: String::new(),
        after: "{}".into(),
        in_flight: false,
    }
}

async fn an_answer_replaces_its_start_in_either_order(store: &dyn ReportingStore) {
    let t = "audit-open";
    let start = |id: &str| AuditEntry {
        status_code: 2,
        after: String::new(),
        in_flight: true,
        ..audit_entry(t, 5_000, id, "a.S/Change")
    };
    let answer = |id: &str| AuditEntry {
        after: "{\"done\":true}".into(),
        ..audit_entry(t, 5_000, id, "a.S/Change")
    };
    let all = AuditQuery::new(None, None, "", "", "").unwrap();
    let page = || async {
        store
            .audit_page(t, &all, Order::OldestFirst, None, 100, usize::MAX)
            .await
            .unwrap()
            .entries
    };

    // A start alone is listed as in flight, and a redelivered start changes nothing.
    assert_eq!(store.append_audit(vec![start("a")]).await.unwrap(), 1);
    assert_eq!(store.append_audit(vec![start("a")]).await.unwrap(), 0);
    assert_eq!(page().await, [start("a")]);
    assert_eq!(store.oldest_open_audit(t, 0).await.unwrap(), Some(5_000));
    assert_eq!(store.oldest_open_audit(t, 5_001).await.unwrap(), None);
    assert_eq!(store.oldest_open_audit("other", 0).await.unwrap(), None);
    // Its answer replaces it, once; a start redelivered after the answer is ignored.
    assert_eq!(store.append_audit(vec![answer("a")]).await.unwrap(), 1);
    assert_eq!(
        store
            .append_audit(vec![start("a"), answer("a")])
            .await
            .unwrap(),
        0
    );
    assert_eq!(page().await, [answer("a")]);
    assert_eq!(store.oldest_open_audit(t, 0).await.unwrap(), None);
    // The answer first (or both in one batch): the start never replaces it.
    assert_eq!(store.append_audit(vec![answer("b")]).await.unwrap(), 1);
    assert_eq!(store.append_audit(vec![start("b")]).await.unwrap(), 0);
    assert_eq!(
        store
            .append_audit(vec![start("c"), answer("c")])
            .await
            .unwrap(),
        2
    );
    assert_eq!(page().await, [answer("a"), answer("b"), answer("c")]);
}

async fn audit_records_are_stored_once_and_paged_both_ways(store: &dyn ReportingStore) {
    let t = "audit-tenant";
    let entries: Vec<AuditEntry> = (0..10)
        .map(|i| {
            let method = if i % 2 == 0 { "a.S/Even" } else { "a.S/Odd" };
            audit_entry(t, 1_000 + i, &format!("id{i:02}"), method)
        })
        .collect();
    assert_eq!(store.append_audit(entries[..6].to_vec()).await.unwrap(), 6);
    // A redelivered batch stores only what is new; another tenant's records stay apart.
    assert_eq!(store.append_audit(entries.clone()).await.unwrap(), 4);
    assert_eq!(
        store
            .append_audit(vec![audit_entry("other", 1_000, "id00", "a.S/Even")])
            .await
            .unwrap(),
        1
    );
    let all = AuditQuery::new(None, None, "", "", "").unwrap();
    let ids = |p: &AuditPage| p.entries.iter().map(|e| e.id.clone()).collect::<Vec<_>>();

    // Newest first, in pages that continue where the last stopped.
    let first = store
        .audit_page(t, &all, Order::NewestFirst, None, 4, usize::MAX)
        .await
        .unwrap();
    assert_eq!(ids(&first), ["id09", "id08", "id07", "id06"]);
    let second = store
        .audit_page(
            t,
            &all,
            Order::NewestFirst,
            first.next.clone(),
            4,
            usize::MAX,
        )
        .await
        .unwrap();
    assert_eq!(ids(&second), ["id05", "id04", "id03", "id02"]);
    let last = store
        .audit_page(
            t,
            &all,
            Order::NewestFirst,
            second.next.clone(),
            4,
            usize::MAX,
        )
        .await
        .unwrap();
    assert_eq!(ids(&last), ["id01", "id00"]);
    assert_eq!(last.next, None);

    // Oldest first, filtered by method and period.
    let odd = AuditQuery::new(Some(1_002), Some(1_009), "a.S/Odd", "", "").unwrap();
    let page = store
        .audit_page(t, &odd, Order::OldestFirst, None, 2, usize::MAX)
        .await
        .unwrap();
    assert_eq!(ids(&page), ["id03", "id05"]);
    let rest = store
        .audit_page(
            t,
            &odd,
            Order::OldestFirst,
            page.next.clone(),
            2,
            usize::MAX,
        )
        .await
        .unwrap();
    assert_eq!(ids(&rest), ["id07"]);
    assert_eq!(rest.next, None);
    assert_eq!(rest.entries[0], entries[7]);

    // A byte budget stops a page after the record that reaches it (at least one).
    let small = store
        .audit_page(t, &all, Order::OldestFirst, None, 100, 1)
        .await
        .unwrap();
    assert_eq!(ids(&small), ["id00"]);
    let next = store
        .audit_page(t, &all, Order::OldestFirst, small.next.clone(), 100, 1)
        .await
        .unwrap();
    assert_eq!(ids(&next), ["id01"]);

    let other = store
        .audit_page("other", &all, Order::OldestFirst, None, 100, usize::MAX)
        .await
        .unwrap();
    assert_eq!(ids(&other), ["id00"]);
    let none = store
        .audit_page("nobody", &all, Order::NewestFirst, None, 100, usize::MAX)
        .await
        .unwrap();
    assert!(none.entries.is_empty() && none.next.is_none());
}

fn of_member(mut f: TenantFact, member: &str) -> TenantFact {
    match &mut f.fact {
        Fact::Purchase(p) => p.member_id = Some(member.into()),
        Fact::Refund(r) => r.member_id = Some(member.into()),
        _ => {}
    }
    f
}

fn ledger(tenant: &str, member: &str, seq: i64) -> TenantFact {
    TenantFact {
        tenant_id: tenant.into(),
        fact: Fact::Ledger(LedgerEntry {
            member_id: member.into(),
            seq,
            reason: Reason::Accrual,
            amount: 10,
            balance_after: 10 * seq,
            time: seq * 1000,
        }),
    }
}

async fn member_facts_are_found_by_member(store: &dyn ReportingStore) {
    let mine = vec![
        of_member(purchase("tm", "m-r1", 100), "m1"),
        of_member(purchase("tm", "m-r2", 140), "m1"),
        of_member(refund("tm", "m-r1", "x1", 101), "m1"),
        ledger("tm", "m1", 1),
        ledger("tm", "m1", 2),
    ];
    let others = vec![
        purchase("tm", "m-anonymous", 100),
        of_member(purchase("tm", "m-r3", 100), "m2"),
        ledger("tm", "m2", 1),
        of_member(purchase("tm-other", "m-r1", 100), "m1"),
        member("tm", "m1", 1),
    ];
    store.append(mine.clone()).await.unwrap();
    store.append(others.clone()).await.unwrap();
    // Redelivered: still found once.
    store.append(mine.clone()).await.unwrap();
    let all_days = (i64::MIN, i64::MAX);
    let mut got: Vec<String> = store
        .member_facts("tm", vec!["m1".into()], all_days, true)
        .await
        .unwrap()
        .iter()
        .map(Fact::identity)
        .collect();
    got.sort();
    let mut want: Vec<String> = mine.iter().map(|f| f.fact.identity()).collect();
    want.sort();
    assert_eq!(got, want);
    let both = store
        .member_facts(
            "tm",
            vec!["m1".into(), "m2".into(), "nobody".into()],
            all_days,
            true,
        )
        .await
        .unwrap();
    assert_eq!(both.len(), mine.len() + 2);
    assert!(
        store
            .member_facts("tm", vec!["nobody".into()], all_days, true)
            .await
            .unwrap()
            .is_empty()
    );
    // Receipts of the days asked for (a refund counts on its purchase's day); the ledger
    // only when asked for.
    let mut days: Vec<String> = store
        .member_facts("tm", vec!["m1".into()], (100, 101), false)
        .await
        .unwrap()
        .iter()
        .map(Fact::identity)
        .collect();
    days.sort();
    let mut want: Vec<String> = mine[..1]
        .iter()
        .chain(&mine[2..3])
        .map(|f| f.fact.identity())
        .collect();
    want.sort();
    assert_eq!(days, want);
}

async fn stores_each_fact_once(store: &dyn ReportingStore) {
    let batch = vec![
        purchase("once", "r1", 10),
        purchase("once", "r1", 10),
        refund("once", "r1", "x", 10),
        purchase("other", "r1", 10),
    ];
    let fresh = store.append(batch.clone()).await.unwrap();
    assert_eq!(fresh.len(), 3, "a repeat within a batch is stored once");
    assert!(store.append(batch).await.unwrap().is_empty());
    let again = store
        .append(vec![refund("once", "r1", "y", 10)])
        .await
        .unwrap();
    assert_eq!(
        again.len(),
        1,
        "another refund of the receipt is a new fact"
    );
}

async fn members_keep_their_newest_version(store: &dyn ReportingStore) {
    assert_eq!(
        store.append(vec![member("m", "a", 2)]).await.unwrap().len(),
        1
    );
    assert!(
        store
            .append(vec![member("m", "a", 1)])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .append(vec![member("m", "a", 2)])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.append(vec![member("m", "a", 3)]).await.unwrap().len(),
        1
    );
    let stored: Vec<TenantFact> = all(store, 100)
        .await
        .into_iter()
        .filter(|f| f.tenant_id == "m")
        .collect();
    assert_eq!(stored, vec![member("m", "a", 3)]);
}

async fn pages_respect_days_snapshots_and_positions(store: &dyn ReportingStore) {
    let facts: Vec<TenantFact> = (0..10)
        .map(|i| purchase("pages", &format!("r{i}"), 100 + i % 5))
        .collect();
    store.append(facts).await.unwrap();
    let snapshot = store.snapshot().await.unwrap();
    store
        .append(vec![purchase("pages", "late", 101)])
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .page(
                "pages",
                Receipts::Purchases,
                101,
                103,
                snapshot,
                after,
                3,
                usize::MAX,
            )
            .await
            .unwrap();
        after = page.rows.last().map(|(p, _)| *p);
        let more = page.more;
        seen.extend(page.rows);
        if !more {
            break;
        }
    }
    assert_eq!(seen.len(), 6, "days 101..=103 hold two receipts each");
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "in (day, seq) order"
    );
    assert!(seen.iter().all(|(p, _)| (101..=103).contains(&p.0)));
    let later = store
        .page(
            "pages",
            Receipts::Purchases,
            101,
            101,
            u64::MAX,
            None,
            100,
            usize::MAX,
        )
        .await
        .unwrap();
    assert_eq!(
        later.rows.len(),
        3,
        "a newer snapshot sees the late receipt"
    );
    assert!(!later.more);
    let small = store
        .page(
            "pages",
            Receipts::Purchases,
            0,
            1000,
            u64::MAX,
            None,
            100,
            1,
        )
        .await
        .unwrap();
    assert_eq!(
        small.rows.len(),
        1,
        "a page past its size holds at least one row"
    );
    assert!(small.more);
    let before = store
        .page(
            "pages",
            Receipts::Purchases,
            103,
            103,
            u64::MAX,
            Some((0, 0)),
            100,
            usize::MAX,
        )
        .await
        .unwrap();
    assert!(
        before.rows.iter().all(|(p, _)| p.0 == 103),
        "a position before the period starts at it"
    );
    let refunds = store
        .page(
            "pages",
            Receipts::Refunds,
            0,
            1000,
            u64::MAX,
            None,
            100,
            usize::MAX,
        )
        .await
        .unwrap();
    assert!(refunds.rows.is_empty());
}

async fn scans_visit_everything_once(store: &dyn ReportingStore) {
    let whole = all(store, 1000).await;
    for page in [1, 2, 7] {
        assert_eq!(all(store, page).await, whole, "page size {page}");
    }
    assert!(whole.iter().any(|f| matches!(f.fact, Fact::Refund(_))));
    assert!(whole.iter().any(|f| matches!(f.fact, Fact::Member(_))));
}

#[tokio::test]
async fn embedded_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        super::embedded::EmbeddedReportingStore::open(&dir.path().join("reporting.redb")).unwrap();
    run(&store).await;
}
