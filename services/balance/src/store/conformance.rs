//! The storage conformance suite every `BalanceStore` backend must pass.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use loyalty_platform::error::Error;

use super::BalanceStore;
use crate::ledger::{Op, Reason};

fn accrue(amount: i64) -> Op {
    Op::Accrue {
        amount,
        reason: Reason::Accrual,
        reference: "r".into(),
        activate_at: None,
        expire_at: None,
    }
}

fn redeem(amount: i64) -> Op {
    Op::Redeem {
        amount,
        reference: "r".into(),
        up_to_available: false,
    }
}

/// Runs every check; `store` must be empty. The store is shared so concurrency checks can
/// run against it.
pub async fn run_all(store: &(dyn BalanceStore + 'static)) {
    ledger_and_idempotency(store).await;
    refused_operations_write_nothing(store).await;
    reversals(store).await;
    store.ping().await.unwrap();
}

/// Concurrent redemptions against one balance never overdraw it (needs an owned store).
pub async fn concurrent_redemptions_never_overdraw(store: Arc<dyn BalanceStore>) {
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
    let err = store
        .execute("t", "m2", "a1", accrue(500), 10)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)), "{err}");

    store
        .execute("t", "m1", "r1", redeem(200), 20)
        .await
        .unwrap();
    let entries = store.entries("t", "m1", None, 10).await.unwrap();
    let amounts: Vec<_> = entries
        .iter()
        .map(|e| (e.seq, e.amount, e.balance_after))
        .collect();
    assert_eq!(amounts, [(2, -200, 300), (1, 500, 500)], "newest first");
    let older = store.entries("t", "m1", Some(2), 10).await.unwrap();
    assert_eq!(older.len(), 1);
    assert_eq!(older[0].seq, 1);
    assert!(
        store
            .entries("t", "nobody", None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.account("other-tenant", "m1").await.unwrap().total, 0);
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
    let out = store.execute("t", "m3", "rev", rev, 0).await.unwrap();
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
}
