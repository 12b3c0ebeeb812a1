//! The storage conformance suite every `PromotionStore` backend must pass.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loyalty_platform::error::Error;
use loyalty_platform::types::Channel;

use super::PromotionStore;
use crate::catalog::{Product, Store};
use crate::evaluate::evaluate;
use crate::program::Program;
use crate::purchase::{Purchase, PurchaseState, fingerprint};
use crate::receipt::{Identification, Line, Receipt};

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

fn purchase(receipt_id: &str) -> Purchase {
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
    let evaluation = evaluate(&Program::case_study("t", "KZT"), &receipt, None, 0);
    Purchase {
        fingerprint: fingerprint(&receipt),
        receipt,
        program: Program::case_study("t", "KZT"),
        evaluated_at: 0,
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
    s.ping().await.unwrap();
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
        .checkout_context("t", "s1", &["p2".into(), "nope".into(), "p1".into()])
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
    let ctx = s.checkout_context("u", "s1", &["p1".into()]).await.unwrap();
    assert!(ctx.store.is_none() && ctx.program.is_none() && ctx.products == [None]);
}

async fn purchases(s: &dyn PromotionStore) {
    let mut p = purchase("r1");
    assert!(s.put_purchase(&p, None).await.unwrap());
    assert!(!s.put_purchase(&p, None).await.unwrap(), "insert-if-absent");
    p.version = 2;
    assert!(
        !s.put_purchase(&p, Some(7)).await.unwrap(),
        "compare-and-set on the version"
    );
    assert!(s.put_purchase(&p, Some(1)).await.unwrap());
    assert_eq!(s.purchase("t", "r1").await.unwrap().unwrap().version, 2);
}
