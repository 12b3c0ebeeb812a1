//! The storage conformance suite every `BalanceStore` backend must pass.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use loyalty_platform::clock::DAY_MS;
use loyalty_platform::error::Error;

use super::{BalanceStore, EntryQuery};
use crate::ledger::{Actor, HoldState, Kind, Op, Reason};

fn accrue(amount: i64) -> Op {
    accrue_at(amount, None, None)
}

fn accrue_at(amount: i64, activate_at: Option<i64>, expire_at: Option<i64>) -> Op {
    Op::Accrue {
        amount,
        reason: Reason::Accrual,
        reference: "r".into(),
        activate_at,
        expire_at,
    }
}

fn redeem(amount: i64) -> Op {
    Op::Redeem {
        amount,
        reference: "r".into(),
        up_to_available: false,
    }
}

fn page(limit: usize) -> EntryQuery {
    EntryQuery {
        limit,
        ..Default::default()
    }
}

/// Gift certificates: every store of them behaves alike.
pub async fn certificates(store: Arc<dyn crate::certificate::CertificateStore>) {
    use crate::certificate::{CertOp, Status};
    let t = "cert-tenant";
    let d = |v: &str| -> rust_decimal::Decimal { v.parse().unwrap() };
    let issue = |value: &str| CertOp::Issue {
        value: d(value),
        expire_at: Some(10_000),
    };
    let spend = |amount: &str| CertOp::Spend {
        amount: d(amount),
        reference: "receipt".into(),
    };
    let refund = |amount: &str| CertOp::Refund {
        amount: d(amount),
        reference: "receipt".into(),
    };
    let run = |code: &str, key: &str, op: CertOp, now: i64| {
        let store = store.clone();
        let (code, key) = (code.to_string(), key.to_string());
        async move {
            let fingerprint = op.fingerprint();
            store.execute(t, &code, &key, &fingerprint, op, now).await
        }
    };

    // An issue, retried under its key: the same certificate, even when the retry chose
    // another code; the key with another value is refused.
    let first = run("GIFT-AAAA", "sale-1", issue("100.00"), 1)
        .await
        .unwrap();
    assert_eq!((first.remaining, first.operations), (d("100.00"), 1));
    let again = run("GIFT-BBBB", "sale-1", issue("100.00"), 2)
        .await
        .unwrap();
    assert_eq!(again, first);
    assert!(store.get(t, "GIFT-BBBB").await.unwrap().is_none());
    assert!(matches!(
        run("GIFT-CCCC", "sale-1", issue("200.00"), 2).await,
        Err(Error::AlreadyExists(_))
    ));
    // Another issue naming a code that exists is refused, and its key stays free.
    assert!(matches!(
        run("GIFT-AAAA", "sale-2", issue("50.00"), 2).await,
        Err(Error::AlreadyExists(_))
    ));
    let second = run("GIFT-DDDD", "sale-2", issue("50.00"), 2).await.unwrap();
    assert_eq!(second.code, "GIFT-DDDD");

    // Spends and refunds, each once under its key; what is left never goes below zero.
    let c = run("GIFT-AAAA", "pay-1", spend("30.50"), 3).await.unwrap();
    assert_eq!((c.remaining, c.spent), (d("69.50"), d("30.50")));
    assert_eq!(
        run("GIFT-AAAA", "pay-1", spend("30.50"), 4).await.unwrap(),
        c
    );
    assert!(matches!(
        run("GIFT-AAAA", "pay-1", spend("1.00"), 4).await,
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        run("GIFT-AAAA", "pay-2", spend("69.51"), 4).await,
        Err(Error::FailedPrecondition(_))
    ));
    assert!(matches!(
        run("GIFT-AAAA", "back-1", refund("30.51"), 4).await,
        Err(Error::FailedPrecondition(_))
    ));
    let c = run("GIFT-AAAA", "back-1", refund("0.50"), 5).await.unwrap();
    assert_eq!(
        (c.remaining, c.refunded, c.operations),
        (d("70.00"), d("0.50"), 3)
    );
    assert!(matches!(
        run("GIFT-NONE", "pay-1", spend("1.00"), 5).await,
        Err(Error::NotFound(_))
    ));
    assert_eq!(store.get(t, "GIFT-AAAA").await.unwrap(), Some(c.clone()));

    // Concurrent spends of one certificate: exactly as many as it covers go through.
    let mut tasks = Vec::new();
    for i in 0..8 {
        tasks.push(tokio::spawn(run(
            "GIFT-AAAA",
            &format!("rush-{i}"),
            spend("20.00"),
            6,
        )));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(Error::FailedPrecondition(_)) => {}
            Err(e) => panic!("unexpected: {e:?}"),
        }
    }
    assert_eq!(ok, 3, "70.00 covers three spends of 20.00");
    let c = store.get(t, "GIFT-AAAA").await.unwrap().unwrap();
    assert_eq!(c.remaining, d("10.00"));

    // Past its expiry nothing is spent or refunded.
    assert_eq!(c.status(10_000), Status::Expired);
    assert!(matches!(
        run("GIFT-AAAA", "late", spend("1.00"), 10_000).await,
        Err(Error::FailedPrecondition(_))
    ));
}

/// Runs every check against an empty store.
pub async fn run_all(store: Arc<dyn BalanceStore>) {
    ledger_and_idempotency(store.as_ref()).await;
    refused_operations_write_nothing(store.as_ref()).await;
    reversals(store.as_ref()).await;
    holds(store.as_ref()).await;
    expiry_and_schedule(store.as_ref()).await;
    activation_adjustment_and_transfer(store.as_ref()).await;
    filtered_pages(store.as_ref()).await;
    concurrent_redemptions_never_overdraw(store.clone()).await;
    the_ledger_replays_every_entry_once(store.clone()).await;
    store.ping().await.unwrap();
}

/// Every member's every entry, replayed a few at a time (stopping inside members), is
/// every stored entry exactly once.
async fn the_ledger_replays_every_entry_once(store: Arc<dyn BalanceStore>) {
    use loyalty_platform::replay::EventSource;
    use loyalty_proto::events::v1 as pb;
    use prost::Message;

    for i in 0..5 {
        store
            .execute("replay", "r1", &format!("k{i}"), accrue(10), i)
            .await
            .unwrap();
    }
    let mut stored = Vec::new();
    let mut after = None;
    loop {
        let members = store.members(after.clone(), 2).await.unwrap();
        let Some(last) = members.last() else { break };
        after = Some(last.clone());
        for (tenant, member) in members {
            let entries = store.entries(&tenant, &member, &page(1000)).await.unwrap();
            assert!(!entries.entries.is_empty(), "{tenant}/{member} has entries");
            stored.extend(
                entries
                    .entries
                    .into_iter()
                    .map(|e| (tenant.clone(), member.clone(), e.seq, e.balance_after)),
            );
        }
    }
    assert!(stored.iter().any(|(t, m, ..)| t == "replay" && m == "r1"));

    let replay = crate::publish::LedgerReplay(store.clone());
    let mut replayed = Vec::new();
    let mut cursor = Vec::new();
    loop {
        let page = replay.page(&cursor, 3).await.unwrap();
        assert!(page.events.len() <= 3, "{} events", page.events.len());
        for event in &page.events {
            let e = pb::Event::decode(event.as_slice()).unwrap();
            let Some(pb::event::Kind::Ledger(l)) = e.kind else {
                panic!("{e:?}")
            };
            assert_eq!(
                e.event_id,
                format!("ledger/{}/{}/{}", e.tenant_id, l.member_id, l.sequence)
            );
            replayed.push((e.tenant_id, l.member_id, l.sequence, l.balance_after));
        }
        match page.next {
            Some(next) => cursor = next,
            None => break,
        }
    }
    stored.sort();
    replayed.sort();
    assert_eq!(replayed, stored);
}

/// Concurrent redemptions against one balance never overdraw it.
async fn concurrent_redemptions_never_overdraw(store: Arc<dyn BalanceStore>) {
    store
        .execute("t", "c", "seed", accrue(1_000), 0)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .execute("t", "c", &format!("red{i}"), redeem(7), 0)
                .await
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => accepted += 7,
            Err(Error::FailedPrecondition(_)) => {}
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!(accepted, 1_000 - 1_000 % 7);
    let account = store.account("t", "c").await.unwrap();
    assert_eq!(account.view(0).active, 1_000 % 7);
    let entries = store.entries("t", "c", &page(1_000)).await.unwrap().entries;
    assert_eq!(entries.len(), 1 + 142);
    assert_eq!(entries.iter().map(|e| e.amount).sum::<i64>(), account.total);
}

async fn ledger_and_idempotency(store: &dyn BalanceStore) {
    let first = store
        .execute("t", "m1", "a1", accrue(500), 10)
        .await
        .unwrap();
    let replay = store
        .execute("t", "m1", "a1", accrue(500), 99)
        .await
        .unwrap();
    assert_eq!(first, replay, "a retry returns the stored reply");
    let account = store.account("t", "m1").await.unwrap();
    assert_eq!(account.total, 500, "a retry accrues once");
    let err = store
        .execute("t", "m1", "a1", accrue(501), 10)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
    // Keys are scoped to the member.
    store
        .execute("t", "m2", "a1", accrue(500), 10)
        .await
        .unwrap();

    store
        .execute("t", "m1", "r1", redeem(200), 20)
        .await
        .unwrap();
    let entries = store.entries("t", "m1", &page(10)).await.unwrap().entries;
    let amounts: Vec<_> = entries
        .iter()
        .map(|e| (e.seq, e.amount, e.balance_after))
        .collect();
    assert_eq!(amounts, [(2, -200, 300), (1, 500, 500)], "newest first");
    let older = EntryQuery {
        before_seq: Some(2),
        limit: 10,
        ..Default::default()
    };
    let older = store.entries("t", "m1", &older).await.unwrap();
    assert_eq!(older.entries.len(), 1);
    assert_eq!(older.entries[0].seq, 1);
    assert_eq!(older.next_before, None);
    let first_page = store.entries("t", "m1", &page(1)).await.unwrap();
    assert_eq!(first_page.next_before, Some(2));
    assert!(
        store
            .entries("t", "nobody", &page(10))
            .await
            .unwrap()
            .entries
            .is_empty()
    );
    assert_eq!(store.account("other-tenant", "m1").await.unwrap().total, 0);
    assert_eq!(store.record("t", "m1", "a1").await.unwrap(), first);
    assert!(store.record("t", "m1", "none").await.unwrap().is_none());
}

async fn refused_operations_write_nothing(store: &dyn BalanceStore) {
    let before = store.account("t", "m1").await.unwrap();
    let err = store
        .execute("t", "m1", "big", redeem(1_000_000), 30)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    assert_eq!(store.account("t", "m1").await.unwrap(), before);
    // The refused key is free: nothing was recorded under it.
    store
        .execute("t", "m1", "big", redeem(1), 30)
        .await
        .unwrap();
}

async fn reversals(store: &dyn BalanceStore) {
    store
        .execute("t", "m3", "acc", accrue(100), 0)
        .await
        .unwrap();
    store
        .execute("t", "m3", "red", redeem(40), 0)
        .await
        .unwrap();
    let rev = Op::Reverse {
        original_key: "acc".into(),
        amount: 100,
        reference: "refund".into(),
    };
    let out = store
        .execute("t", "m3", "rev", rev, 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.reply.unrecovered, 40);
    assert_eq!(store.account("t", "m3").await.unwrap().total, 0);
    let again = Op::Reverse {
        original_key: "acc".into(),
        amount: 1,
        reference: "refund".into(),
    };
    let err = store
        .execute("t", "m3", "rev2", again, 0)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    let give_back = Op::Reverse {
        original_key: "red".into(),
        amount: 40,
        reference: "refund".into(),
    };
    store
        .execute("t", "m3", "back", give_back, 0)
        .await
        .unwrap();
    assert_eq!(store.account("t", "m3").await.unwrap().view(0).active, 40);
    let missing = Op::Reverse {
        original_key: "nope".into(),
        amount: 1,
        reference: String::new(),
    };
    let err = store.execute("t", "m3", "x", missing, 0).await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");

    // Points an open hold took are not counted unrecovered: the reversal waits for it.
    store
        .execute("t", "m4", "acc", accrue(100), 0)
        .await
        .unwrap();
    let hold = Op::Hold {
        amount: 80,
        reference: "pos".into(),
        timeout_ms: 1_000,
    };
    store.execute("t", "m4", "h", hold, 0).await.unwrap();
    let rev = Op::Reverse {
        original_key: "acc".into(),
        amount: 100,
        reference: "refund".into(),
    };
    let err = store
        .execute("t", "m4", "rev", rev.clone(), 10)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::FailedPrecondition(m) if m.starts_with(crate::ledger::HELD_BACK)),
        "{err}"
    );
    assert_eq!(
        store.account("t", "m4").await.unwrap().total,
        100,
        "nothing written"
    );
    let cancel = Op::Cancel {
        hold_key: "h".into(),
    };
    store.execute("t", "m4", "x", cancel, 20).await.unwrap();
    let out = store
        .execute("t", "m4", "rev", rev, 30)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.reply.unrecovered, 0);
    assert_eq!(store.account("t", "m4").await.unwrap().total, 0);
}

async fn holds(store: &dyn BalanceStore) {
    store
        .execute("t", "h1", "acc", accrue(100), 0)
        .await
        .unwrap();
    let hold = Op::Hold {
        amount: 70,
        reference: "pos".into(),
        timeout_ms: 1_000,
    };
    let h = store
        .execute("t", "h1", "h", hold, 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((h.reply.balance.active, h.reply.balance.held), (30, 70));
    let confirm = Op::Confirm {
        hold_key: "h".into(),
        amount: 50,
    };
    let c = store
        .execute("t", "h1", "c", confirm.clone(), 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.reply.entry.as_ref().unwrap().amount, -50);
    assert_eq!(c.reply.balance.active, 50);
    assert_eq!(
        store
            .execute("t", "h1", "c", confirm, 20)
            .await
            .unwrap()
            .unwrap(),
        c,
        "a retried confirmation replays"
    );
    let hold_record = store.record("t", "h1", "h").await.unwrap().unwrap();
    assert_eq!(hold_record.hold, Some(HoldState::Confirmed));
    let cancel = Op::Cancel {
        hold_key: "h".into(),
    };
    let err = store.execute("t", "h1", "x", cancel, 20).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");

    // A second hold times out; confirming it afterwards fails and writes nothing.
    let hold = Op::Hold {
        amount: 50,
        reference: "pos".into(),
        timeout_ms: 100,
    };
    store.execute("t", "h1", "h2", hold, 100).await.unwrap();
    assert_eq!(store.account("t", "h1").await.unwrap().view(199).held, 50);
    assert_eq!(store.account("t", "h1").await.unwrap().view(200).held, 0);
    let late = Op::Confirm {
        hold_key: "h2".into(),
        amount: 0,
    };
    let err = store.execute("t", "h1", "c2", late, 200).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    let account = store.account("t", "h1").await.unwrap();
    assert_eq!(account.view(200).active, 50);
    assert_eq!(account.total, 50);
}

async fn expiry_and_schedule(store: &dyn BalanceStore) {
    store
        .execute("e", "x1", "a", accrue_at(100, None, Some(1_000)), 0)
        .await
        .unwrap();
    store
        .execute("e", "x2", "a", accrue_at(10, None, Some(5_000)), 0)
        .await
        .unwrap();
    store.execute("e", "x1", "r", redeem(30), 0).await.unwrap();
    let due_in_e = |due: Vec<super::Due>| -> Vec<String> {
        due.into_iter()
            .filter(|d| d.tenant == "e")
            .map(|d| d.member)
            .collect()
    };
    assert!(due_in_e(store.due(999, 100).await.unwrap()).is_empty());
    assert_eq!(due_in_e(store.due(1_000, 100).await.unwrap()), ["x1"]);
    let expired = store
        .execute("e", "x1", "", Op::Expire, 1_000)
        .await
        .unwrap()
        .and_then(|r| r.reply.entry)
        .map(|e| e.amount);
    assert_eq!(expired, Some(-70));
    assert!(
        store
            .execute("e", "x1", "", Op::Expire, 1_000)
            .await
            .unwrap()
            .is_none(),
        "nothing left to expire"
    );
    assert!(
        store.record("e", "x1", "").await.unwrap().is_none(),
        "not kept"
    );
    for d in store.due(1_000, 100).await.unwrap() {
        if d.tenant == "e" {
            store.done_due(&d).await.unwrap();
        }
    }
    let entries = store.entries("e", "x1", &page(10)).await.unwrap().entries;
    assert_eq!(entries[0].reason, Reason::Expiry);
    assert_eq!(entries[0].amount, -70);
    assert_eq!(entries.len(), 3, "a second run expires nothing more");
    let account = store.account("e", "x1").await.unwrap();
    assert_eq!((account.total, account.lifetime_expired), (0, 70));
    assert!(due_in_e(store.due(1_000, 100).await.unwrap()).is_empty());
    assert_eq!(due_in_e(store.due(5_000, 100).await.unwrap()), ["x2"]);

    // A lot written when it is already due (a late retry) is found, expired and, once done,
    // never handed out again, even though it is due days before it was written.
    let now = 10 * DAY_MS;
    store
        .execute("e", "x3", "late", accrue_at(40, None, Some(DAY_MS)), now)
        .await
        .unwrap();
    let due: Vec<_> = store
        .due(now, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|d| d.tenant == "e" && d.member == "x3")
        .collect();
    assert_eq!(due.len(), 1, "{due:?}");
    store.execute("e", "x3", "", Op::Expire, now).await.unwrap();
    store.done_due(&due[0]).await.unwrap();
    let again = store.due(now, 100).await.unwrap();
    assert!(
        !again.iter().any(|d| d.tenant == "e" && d.member == "x3"),
        "done twice: {again:?}"
    );
    assert_eq!(store.account("e", "x3").await.unwrap().total, 0);
}

async fn activation_adjustment_and_transfer(store: &dyn BalanceStore) {
    store
        .execute("t", "p1", "later", accrue_at(80, Some(5_000), None), 0)
        .await
        .unwrap();
    let activate = Op::Activate {
        accrual_key: Some("later".into()),
    };
    let r = store
        .execute("t", "p1", "act", activate, 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((r.reply.moved, r.reply.balance.active), (80, 80));
    let adjust = Op::Adjust {
        amount: -30,
        actor: Actor {
            id: "manager:anna".into(),
            comment: "duplicate accrual".into(),
        },
        expire_at: None,
    };
    let r = store
        .execute("t", "p1", "adj", adjust, 10)
        .await
        .unwrap()
        .unwrap();
    let entry = r.reply.entry.unwrap();
    assert_eq!(entry.reason, Reason::ManualAdjustment);
    assert_eq!(entry.actor.unwrap().comment, "duplicate accrual");

    let out = store
        .execute(
            "t",
            "p1",
            "merge:p2",
            Op::TransferOut {
                to_member: "p2".into(),
            },
            20,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.reply.moved, 50);
    let into = Op::TransferIn {
        from_member: "p1".into(),
        lots: out.reply.lots.clone(),
    };
    store
        .execute("t", "p2", "merge:p1", into, 20)
        .await
        .unwrap();
    assert_eq!(store.account("t", "p2").await.unwrap().view(20).active, 50);
    assert_eq!(store.account("t", "p1").await.unwrap().total, 0);
    let err = store
        .execute("t", "p1", "late", accrue(1), 30)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");

    // The survivor takes over the merged member's accrual under its key, moving nothing,
    // and a reversal of it then takes back from the lot that moved with it.
    let original = store.record("t", "p1", "later").await.unwrap().unwrap();
    let adopt = Op::Adopt {
        from_member: "p1".into(),
        record: Box::new(original.clone()),
    };
    let taken = store
        .execute("t", "p2", "later", adopt.clone(), 40)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((taken.kind, taken.amount), (original.kind, 80));
    assert!(taken.reply.entry.is_none());
    assert_eq!(taken.reply.balance.active, 50);
    let again = store
        .execute("t", "p2", "later", adopt, 41)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again, taken, "a retried take-over answers the same");
    let reverse = Op::Reverse {
        original_key: "later".into(),
        amount: 60,
        reference: "refund".into(),
    };
    let r = store
        .execute("t", "p2", "later:refund", reverse, 50)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.reply.entry.unwrap().amount, -50);
    assert_eq!((r.reply.unrecovered, r.reply.balance.active), (10, 0));
    let adopted = store.record("t", "p2", "later").await.unwrap().unwrap();
    assert_eq!(adopted.reversed, 60);
    let too_much = Op::Reverse {
        original_key: "later".into(),
        amount: 21,
        reference: "refund".into(),
    };
    let err = store
        .execute("t", "p2", "later:refund-2", too_much, 60)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    // Only an accrual's or a redemption's record can be taken over.
    let mut hold = original;
    hold.kind = Kind::Hold;
    let err = store
        .execute(
            "t",
            "p2",
            "held",
            Op::Adopt {
                from_member: "p1".into(),
                record: Box::new(hold),
            },
            60,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

async fn filtered_pages(store: &dyn BalanceStore) {
    for i in 0..6 {
        store
            .execute("t", "f1", &format!("a{i}"), accrue(10), i * 100)
            .await
            .unwrap();
        store
            .execute("t", "f1", &format!("r{i}"), redeem(1), i * 100 + 50)
            .await
            .unwrap();
    }
    let q = EntryQuery {
        limit: 2,
        reasons: vec![Reason::Redemption],
        from: Some(100),
        until: Some(500),
        ..Default::default()
    };
    let first = store.entries("t", "f1", &q).await.unwrap();
    let at: Vec<_> = first.entries.iter().map(|e| e.created_at).collect();
    assert_eq!(at, [450, 350]);
    let q2 = EntryQuery {
        before_seq: first.next_before,
        ..q
    };
    let second = store.entries("t", "f1", &q2).await.unwrap();
    let at: Vec<_> = second.entries.iter().map(|e| e.created_at).collect();
    assert_eq!(at, [250, 150]);
}

/// A filtered listing reads at most `MAX_SCAN` entries a page and hands out a token to go
/// on: a member with more entries still reaches its oldest ones. Slow (over 10,000 writes),
/// so backends run it apart from [`run_all`].
pub async fn filtered_pages_past_the_scan_bound(store: Arc<dyn BalanceStore>) {
    use crate::store::{EntryQuery, MAX_SCAN};
    store
        .execute("t", "deep", "first", accrue(10), 0)
        .await
        .unwrap();
    store
        .execute("t", "deep", "spent", redeem(1), 0)
        .await
        .unwrap();
    let keys: Vec<String> = (0..MAX_SCAN).map(|i| format!("a{i}")).collect();
    for chunk in keys.chunks(500) {
        let mut writes = tokio::task::JoinSet::new();
        for key in chunk {
            let (store, key) = (store.clone(), key.clone());
            writes.spawn(async move { store.execute("t", "deep", &key, accrue(1), 0).await });
        }
        while let Some(outcome) = writes.join_next().await {
            outcome.unwrap().unwrap();
        }
    }
    let mut query = EntryQuery {
        limit: 10,
        reasons: vec![Reason::Redemption],
        ..EntryQuery::default()
    };
    let mut found = Vec::new();
    for _ in 0..3 {
        let page = store.entries("t", "deep", &query).await.unwrap();
        found.extend(page.entries.into_iter().map(|e| e.amount));
        match page.next_before {
            Some(before) => query.before_seq = Some(before),
            None => break,
        }
    }
    assert_eq!(found, [-1], "the redemption below 10,000 newer entries");
}
