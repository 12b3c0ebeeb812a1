//! The storage conformance suite: every `IdentityStore` backend must pass all of it.
//! Backends call [`run_all`] from their own tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loyalty_platform::types::Channel;

use super::IdentityStore;
use crate::domain::{Card, CardKind, CardStatus, Inserted, Member, MemberStatus};

fn member(tenant: &str, id: &str, phone: &str, code: &str) -> Member {
    Member {
        tenant_id: tenant.into(),
        member_id: id.into(),
        status: MemberStatus::Active,
        phone: phone.into(),
        email: String::new(),
        first_name: "A".into(),
        last_name: String::new(),
        referral_code: code.into(),
        referred_by: None,
        channel: Channel::Store,
        store_id: "s1".into(),
        registered_at: 1,
        updated_at: 1,
    }
}

fn card(tenant: &str, number: &str, member: Option<&str>) -> Card {
    Card {
        tenant_id: tenant.into(),
        number: number.into(),
        kind: CardKind::Plastic,
        status: CardStatus::Active,
        member_id: member.map(str::to_string),
        issued_at: 1,
    }
}

/// Runs every check against `store`, which must be empty.
pub async fn run_all(store: &dyn IdentityStore) {
    members_and_their_indexes(store).await;
    uniqueness_writes_nothing(store).await;
    tenants_are_isolated(store).await;
    cards(store).await;
    store.ping().await.unwrap();
}

async fn members_and_their_indexes(store: &dyn IdentityStore) {
    let m = member("t1", "m1", "+77010000001", "CODE0001");
    assert_eq!(store.insert_member(&m).await.unwrap(), Inserted::Done);
    assert_eq!(store.member("t1", "m1").await.unwrap(), Some(m.clone()));
    assert_eq!(
        store
            .member_id_by_phone("t1", "+77010000001")
            .await
            .unwrap()
            .as_deref(),
        Some("m1")
    );
    assert_eq!(
        store
            .member_by_referral_code("t1", "CODE0001")
            .await
            .unwrap()
            .as_deref(),
        Some("m1")
    );
    assert_eq!(store.member("t1", "nobody").await.unwrap(), None);
}

async fn uniqueness_writes_nothing(store: &dyn IdentityStore) {
    let same_phone = member("t1", "m2", "+77010000001", "CODE0002");
    assert_eq!(
        store.insert_member(&same_phone).await.unwrap(),
        Inserted::PhoneTaken
    );
    assert_eq!(store.member("t1", "m2").await.unwrap(), None);
    assert_eq!(
        store
            .member_by_referral_code("t1", "CODE0002")
            .await
            .unwrap(),
        None
    );

    let same_code = member("t1", "m3", "+77010000003", "CODE0001");
    assert_eq!(
        store.insert_member(&same_code).await.unwrap(),
        Inserted::CodeTaken
    );
    assert_eq!(store.member("t1", "m3").await.unwrap(), None);
    assert_eq!(
        store
            .member_id_by_phone("t1", "+77010000003")
            .await
            .unwrap(),
        None
    );
}

async fn tenants_are_isolated(store: &dyn IdentityStore) {
    let other = member("t2", "m1", "+77010000001", "CODE0001");
    assert_eq!(store.insert_member(&other).await.unwrap(), Inserted::Done);
    assert_eq!(
        store.member("t2", "m1").await.unwrap().unwrap().tenant_id,
        "t2"
    );
    assert_eq!(
        store.member("t1", "m1").await.unwrap().unwrap().tenant_id,
        "t1"
    );
}

async fn cards(store: &dyn IdentityStore) {
    assert!(
        store
            .insert_card(&card("t1", "100000001", Some("m1")))
            .await
            .unwrap()
    );
    assert!(
        store
            .insert_card(&card("t1", "100000002", Some("m1")))
            .await
            .unwrap()
    );
    assert!(
        store
            .insert_card(&card("t1", "100000003", None))
            .await
            .unwrap()
    );
    assert!(
        !store
            .insert_card(&card("t1", "100000001", Some("m9")))
            .await
            .unwrap()
    );
    let got = store.card("t1", "100000001").await.unwrap().unwrap();
    assert_eq!(
        got.member_id.as_deref(),
        Some("m1"),
        "a refused insert must not overwrite"
    );
    let mut numbers: Vec<_> = store
        .cards_of_member("t1", "m1")
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.number)
        .collect();
    numbers.sort();
    assert_eq!(numbers, ["100000001", "100000002"]);
    assert!(store.cards_of_member("t2", "m1").await.unwrap().is_empty());
    assert_eq!(store.card("t2", "100000001").await.unwrap(), None);
}
