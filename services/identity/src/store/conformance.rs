//! The storage conformance suite: every `IdentityStore` backend must pass all of it.
//! Backends call [`run_all`] from their own tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loyalty_platform::types::Channel;

use super::{IdentityStore, Replaced, Saved};
use crate::domain::{Card, CardKind, CardStatus, Gender, Inserted, Member, MemberStatus, Profile};

pub(super) fn member(tenant: &str, id: &str, phone: &str, code: &str) -> Member {
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

pub(super) fn card(tenant: &str, number: &str, member: Option<&str>) -> Card {
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
    card_holders(store).await;
    card_lifecycle(store).await;
    profiles(store).await;
    members_in_order(store).await;
    api_keys(store).await;
    super::conformance_lifecycle::run_all(store).await;
    racing_writers(&[store]).await;
    store.ping().await.unwrap();
}

/// Writers racing through `stores` (handles on one storage, as replicas hold): 40
/// registrations of one phone make one member; 20 first profile saves, each with its own
/// email, save one profile and index one email; 10 blocks of one card block it once.
pub async fn racing_writers(stores: &[&dyn IdentityStore]) {
    let phone = "+77010009999";
    let outcomes = futures_util::future::join_all((0..40).map(|i| {
        let s = stores[i % stores.len()];
        async move {
            s.insert_member(&member(
                "race",
                &format!("r{i:02}"),
                phone,
                &format!("RACE{i:04}"),
            ))
            .await
            .unwrap()
        }
    }))
    .await;
    let won: Vec<usize> = (0..40).filter(|i| outcomes[*i] == Inserted::Done).collect();
    assert_eq!(won.len(), 1, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Inserted::Done | Inserted::PhoneTaken))
    );
    let winner = format!("r{:02}", won[0]);
    let s = stores[0];
    assert_eq!(
        s.member_id_by_phone("race", phone).await.unwrap(),
        Some(winner.clone())
    );
    for i in (0..40).filter(|i| *i != won[0]) {
        assert_eq!(s.member("race", &format!("r{i:02}")).await.unwrap(), None);
        assert_eq!(
            s.member_by_referral_code("race", &format!("RACE{i:04}"))
                .await
                .unwrap(),
            None,
            "a refused registration files no code"
        );
    }

    let stored = s.member("race", &winner).await.unwrap().unwrap();
    let saves = futures_util::future::join_all((0..20).map(|i| {
        let s = stores[i % stores.len()];
        let m = Member {
            email: format!("race{i}@x.kz"),
            ..stored.clone()
        };
        async move {
            let profile = Profile {
                version: 1,
                ..Profile::default()
            };
            s.save_profile(&m, &profile, 0).await.unwrap()
        }
    }))
    .await;
    let saved: Vec<usize> = (0..20).filter(|i| saves[*i] == Saved::Done).collect();
    assert_eq!(saved.len(), 1, "{saves:?}");
    for i in 0..20 {
        let owner = s
            .member_id_by_email("race", &format!("race{i}@x.kz"))
            .await
            .unwrap();
        assert_eq!(owner.is_some(), i == saved[0], "email {i}");
    }

    s.insert_card(&card("race", "9900000001", Some(&winner)))
        .await
        .unwrap();
    let blocks = futures_util::future::join_all((0..10).map(|i| {
        let s = stores[i % stores.len()];
        let blocked = Card {
            status: CardStatus::Blocked(crate::domain::BlockReason::Lost),
            ..card("race", "9900000001", Some(&winner))
        };
        async move { s.update_card(&blocked, &CardStatus::Active).await.unwrap() }
    }))
    .await;
    assert_eq!(blocks.iter().filter(|b| **b).count(), 1, "{blocks:?}");
}

fn api_key(tenant: &str, id: &str) -> crate::keys::ApiKey {
    crate::keys::ApiKey {
        key_id: id.into(),
        tenant_id: tenant.into(),
        role: loyalty_platform::access::Role::Pos,
        store_id: "s1".into(),
        member_id: String::new(),
        name: "till 1".into(),
        secret_hash: "ab".repeat(32),
        created_at: 5,
        revoked_at: None,
        created_by: "cli".into(),
        rotated_from: String::new(),
    }
}

/// Keys by id and by tenant in id order; a conditional write writes all or nothing.
async fn api_keys(store: &dyn IdentityStore) {
    for id in ["k3", "k1", "k2"] {
        assert!(
            store
                .save_api_keys(&[api_key("t1", id)], None)
                .await
                .unwrap()
        );
    }
    assert!(
        store
            .save_api_keys(&[api_key("t10", "k0")], None)
            .await
            .unwrap()
    );
    assert_eq!(
        store.api_key("k1").await.unwrap(),
        Some(api_key("t1", "k1"))
    );
    assert_eq!(store.api_key("nope").await.unwrap(), None);
    let ids =
        |keys: Vec<crate::keys::ApiKey>| keys.into_iter().map(|k| k.key_id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.api_keys("t1", None, 10).await.unwrap()),
        ["k1", "k2", "k3"]
    );
    assert_eq!(
        ids(store.api_keys("t1", Some("k1"), 1).await.unwrap()),
        ["k2"]
    );
    assert_eq!(ids(store.api_keys("t10", None, 10).await.unwrap()), ["k0"]);
    assert!(store.api_keys("t2", None, 10).await.unwrap().is_empty());
    // Rotation: the new key and the old one revoked, only while the old one is live.
    let revoked = crate::keys::ApiKey {
        revoked_at: Some(9),
        ..api_key("t1", "k1")
    };
    let successor = api_key("t1", "k4");
    assert!(
        store
            .save_api_keys(&[successor.clone(), revoked.clone()], Some("k1"))
            .await
            .unwrap()
    );
    assert_eq!(store.api_key("k1").await.unwrap(), Some(revoked));
    let again = api_key("t1", "k5");
    assert!(!store.save_api_keys(&[again], Some("k1")).await.unwrap());
    assert_eq!(store.api_key("k5").await.unwrap(), None, "nothing written");
    assert!(
        !store
            .save_api_keys(&[api_key("t1", "k6")], Some("missing"))
            .await
            .unwrap()
    );
    assert_eq!(store.api_keys("t1", None, 10).await.unwrap().len(), 4);
}

/// Every member once, in (tenant, member) order, a page at a time.
async fn members_in_order(store: &dyn IdentityStore) {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = store.members_after(after.clone(), 2).await.unwrap();
        if page.is_empty() {
            break;
        }
        after = page
            .last()
            .map(|m| (m.tenant_id.clone(), m.member_id.clone()));
        all.extend(page);
    }
    let keys: Vec<(String, String)> = all
        .iter()
        .map(|m| (m.tenant_id.clone(), m.member_id.clone()))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(keys, sorted, "in order, each once");
    assert!(keys.contains(&("t1".to_string(), "m1".to_string())));
    for m in &all {
        assert_eq!(
            store
                .member(&m.tenant_id, &m.member_id)
                .await
                .unwrap()
                .as_ref(),
            Some(m)
        );
    }
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

async fn card_holders(store: &dyn IdentityStore) {
    let with_profile = member("ch", "h1", "+77010000201", "CODECH01");
    let without = member("ch", "h2", "+77010000202", "CODECH02");
    let blocked = Member {
        status: MemberStatus::Blocked,
        ..member("ch", "h3", "+77010000203", "CODECH03")
    };
    for m in [&with_profile, &without, &blocked] {
        assert_eq!(store.insert_member(m).await.unwrap(), Inserted::Done);
    }
    let profile = Profile {
        version: 1,
        gender: Gender::Male,
        ..Profile::default()
    };
    assert_eq!(
        store
            .save_profile(&with_profile, &profile, 0)
            .await
            .unwrap(),
        Saved::Done
    );
    let blocked_card = Card {
        status: CardStatus::Blocked(crate::domain::BlockReason::Lost),
        ..card("ch", "200000005", Some("h1"))
    };
    for c in [
        card("ch", "200000001", Some("h1")),
        card("ch", "200000002", Some("h2")),
        card("ch", "200000003", None),
        card("ch", "200000004", Some("gone")),
        card("ch", "200000006", Some("h3")),
        blocked_card.clone(),
    ] {
        assert!(store.insert_card(&c).await.unwrap());
    }
    let holder = |number: &'static str| async move {
        store.card_holder("ch", number).await.unwrap().unwrap()
    };

    let h = holder("200000001").await;
    assert_eq!(h.card, card("ch", "200000001", Some("h1")));
    assert_eq!(h.member, Some(with_profile.clone()));
    assert_eq!(
        h.profile,
        Some(profile),
        "an active member's profile comes along"
    );

    let h = holder("200000002").await;
    assert_eq!(h.member, Some(without));
    assert_eq!(h.profile, None, "no profile saved yet");

    let h = holder("200000003").await;
    assert_eq!(
        (h.member, h.profile),
        (None, None),
        "an unbound card names nobody"
    );
    let h = holder("200000004").await;
    assert_eq!(
        (h.member, h.profile),
        (None, None),
        "a missing member is none"
    );

    let h = holder("200000005").await;
    assert_eq!(h.card, blocked_card);
    assert_eq!(
        (h.member, h.profile),
        (None, None),
        "a blocked card's member is not read"
    );

    let h = holder("200000006").await;
    assert_eq!(h.member, Some(blocked), "the member as stored");
    assert_eq!(h.profile, None, "only an active member's profile is read");

    assert_eq!(store.card_holder("ch", "200000009").await.unwrap(), None);
    assert_eq!(
        store.card_holder("other", "200000001").await.unwrap(),
        None,
        "tenants are apart"
    );
}

async fn card_lifecycle(store: &dyn IdentityStore) {
    // A range imports once; a second import of an overlapping range adds only the new ones.
    let unbound = |n: &str| Card {
        kind: CardKind::NoName,
        status: CardStatus::Unbound,
        ..card("lc", n, None)
    };
    let first: Vec<Card> = ["50000001", "50000002", "50000003"]
        .iter()
        .map(|n| unbound(n))
        .collect();
    assert_eq!(store.insert_cards(&first).await.unwrap(), 3);
    let again: Vec<Card> = ["50000003", "50000004"]
        .iter()
        .map(|n| unbound(n))
        .collect();
    assert_eq!(store.insert_cards(&again).await.unwrap(), 1);
    assert_eq!(
        store.card("lc", "50000004").await.unwrap().unwrap().status,
        CardStatus::Unbound
    );

    // Binding is a compare-and-set on the status, and files the card under its member.
    let bound = Card {
        status: CardStatus::Active,
        member_id: Some("m9".into()),
        ..unbound("50000001")
    };
    assert!(
        store
            .update_card(&bound, &CardStatus::Unbound)
            .await
            .unwrap()
    );
    assert!(
        !store
            .update_card(&bound, &CardStatus::Unbound)
            .await
            .unwrap(),
        "the second bind sees Active"
    );
    let missing = unbound("59999999");
    assert!(
        !store
            .update_card(&missing, &CardStatus::Unbound)
            .await
            .unwrap()
    );
    assert!(store.card("lc", "59999999").await.unwrap().is_none());
    let of_m9 = store.cards_of_member("lc", "m9").await.unwrap();
    assert_eq!(of_m9, vec![bound.clone()]);

    // Replacing moves the member to the new card in one write, or writes nothing.
    let old = Card {
        status: CardStatus::Replaced {
            by: "50000002".into(),
        },
        ..bound.clone()
    };
    let new = Card {
        status: CardStatus::Active,
        member_id: Some("m9".into()),
        ..unbound("50000002")
    };
    let stale = store
        .replace_card(&old, &CardStatus::Unbound, &new, Some(&CardStatus::Unbound))
        .await
        .unwrap();
    assert_eq!(stale, Replaced::OldChanged);
    let taken = store
        .replace_card(&old, &CardStatus::Active, &new, None)
        .await
        .unwrap();
    assert_eq!(taken, Replaced::NewChanged, "the new number exists");
    assert_eq!(store.card("lc", "50000001").await.unwrap(), Some(bound));
    let done = store
        .replace_card(&old, &CardStatus::Active, &new, Some(&CardStatus::Unbound))
        .await
        .unwrap();
    assert_eq!(done, Replaced::Done);
    assert_eq!(
        store.card("lc", "50000001").await.unwrap(),
        Some(old.clone())
    );
    assert_eq!(
        store.card("lc", "50000002").await.unwrap(),
        Some(new.clone())
    );
    let mut of_m9 = store.cards_of_member("lc", "m9").await.unwrap();
    of_m9.sort_by(|a, b| a.number.cmp(&b.number));
    assert_eq!(of_m9, vec![old.clone(), new]);

    // A new card that does not exist yet is inserted.
    let fresh = Card {
        status: CardStatus::Active,
        member_id: Some("m9".into()),
        ..card("lc", "50000009", Some("m9"))
    };
    let newer = Card {
        status: CardStatus::Replaced {
            by: "50000009".into(),
        },
        ..store.card("lc", "50000002").await.unwrap().unwrap()
    };
    let done = store
        .replace_card(&newer, &CardStatus::Active, &fresh, None)
        .await
        .unwrap();
    assert_eq!(done, Replaced::Done);
    assert_eq!(store.card("lc", "50000009").await.unwrap(), Some(fresh));
}

async fn profiles(store: &dyn IdentityStore) {
    let m = member("pr", "p1", "+77010000099", "CODEPR01");
    assert_eq!(store.insert_member(&m).await.unwrap(), Inserted::Done);
    assert_eq!(store.profile("pr", "p1").await.unwrap(), None);
    let renamed = Member {
        first_name: "B".into(),
        updated_at: 2,
        ..m.clone()
    };
    let profile = Profile {
        version: 1,
        gender: Gender::Female,
        ..Profile::default()
    };
    assert!(
        store.save_profile(&renamed, &profile, 1).await.unwrap() == Saved::Stale,
        "no profile stored yet: version 0"
    );
    assert_eq!(
        store.save_profile(&renamed, &profile, 0).await.unwrap(),
        Saved::Done
    );
    assert_eq!(
        store.profile("pr", "p1").await.unwrap(),
        Some(profile.clone())
    );
    assert_eq!(
        store.member("pr", "p1").await.unwrap(),
        Some(renamed.clone())
    );
    // A stale version writes nothing, neither the member nor the profile.
    let stale = Member {
        first_name: "C".into(),
        ..renamed.clone()
    };
    assert_eq!(
        store
            .save_profile(
                &stale,
                &Profile {
                    version: 2,
                    ..profile.clone()
                },
                0
            )
            .await
            .unwrap(),
        Saved::Stale
    );
    assert_eq!(store.member("pr", "p1").await.unwrap(), Some(renamed));
    // No profile for a member that does not exist.
    let ghost = member("pr", "nobody", "+77010000098", "CODEPR02");
    assert_eq!(
        store.save_profile(&ghost, &profile, 0).await.unwrap(),
        Saved::Stale
    );
    assert_eq!(store.profile("pr", "nobody").await.unwrap(), None);
}
