//! The conformance suite's part on emails, merges, erasures and imports.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::conformance::{card, member};
use super::{IdentityStore, Imported, Saved};
use crate::domain::{CardStatus, Gender, Inserted, Member, MemberStatus, Profile};
use crate::lifecycle::{Audit, Erasure, ImportRow, MemberBlock, MergeRecord};

pub async fn run_all(store: &dyn IdentityStore) {
    emails_are_unique_and_follow_changes(store).await;
    a_merge_moves_cards_and_lookups_at_once(store).await;
    an_unfinished_merge_into_a_member_holds_it(store).await;
    an_erasure_frees_the_indexes(store).await;
    an_import_writes_all_or_nothing(store).await;
    a_block_and_its_record_go_together(store).await;
}

async fn a_block_and_its_record_go_together(store: &dyn IdentityStore) {
    let m = member("bl", "m", "+77010005001", "BLCODE01");
    store.insert_member(&m).await.unwrap();
    let blocked = Member {
        status: MemberStatus::Blocked,
        ..m.clone()
    };
    let p1 = Profile {
        version: 1,
        ..Profile::default()
    };
    let block = MemberBlock {
        reason: "fraud".into(),
        audit: audit(),
    };
    assert!(
        !store
            .set_block(&blocked, &p1, 4, Some(&block))
            .await
            .unwrap(),
        "stale version"
    );
    assert_eq!(store.member_block("bl", "m").await.unwrap(), None);
    assert!(
        store
            .set_block(&blocked, &p1, 0, Some(&block))
            .await
            .unwrap()
    );
    assert_eq!(
        store.member("bl", "m").await.unwrap(),
        Some(blocked.clone())
    );
    assert_eq!(store.member_block("bl", "m").await.unwrap(), Some(block));
    let p2 = Profile {
        version: 2,
        ..Profile::default()
    };
    assert!(store.set_block(&m, &p2, 1, None).await.unwrap());
    assert_eq!(store.member("bl", "m").await.unwrap(), Some(m.clone()));
    assert_eq!(store.member_block("bl", "m").await.unwrap(), None);
    // A blocked member can be erased.
    let p3 = Profile {
        version: 3,
        ..Profile::default()
    };
    let again = MemberBlock {
        reason: "again".into(),
        audit: audit(),
    };
    assert!(
        store
            .set_block(&blocked, &p3, 2, Some(&again))
            .await
            .unwrap()
    );
    let erased = Member {
        status: MemberStatus::Erased,
        phone: String::new(),
        ..m
    };
    let p4 = Profile {
        version: 4,
        ..Profile::default()
    };
    let erasure = Erasure { audit: audit() };
    assert!(store.erase_member(&erased, &p4, 3, &erasure).await.unwrap());
    assert_eq!(
        store
            .member_id_by_phone("bl", "+77010005001")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.member_block("bl", "m").await.unwrap(),
        None,
        "the block's free-text reason goes with the erasure"
    );
}

fn with_email(mut m: Member, email: &str) -> Member {
    m.email = email.into();
    m
}

async fn emails_are_unique_and_follow_changes(store: &dyn IdentityStore) {
    let a = with_email(member("em", "a", "+77010001001", "EMCODE01"), "a@x.kz");
    assert_eq!(store.insert_member(&a).await.unwrap(), Inserted::Done);
    let b = with_email(member("em", "b", "+77010001002", "EMCODE02"), "a@x.kz");
    assert_eq!(store.insert_member(&b).await.unwrap(), Inserted::EmailTaken);
    assert_eq!(store.member("em", "b").await.unwrap(), None);
    assert_eq!(
        store
            .member_id_by_phone("em", "+77010001002")
            .await
            .unwrap(),
        None,
        "nothing of a refused insert is written"
    );
    let b = with_email(b, "b@x.kz");
    assert_eq!(store.insert_member(&b).await.unwrap(), Inserted::Done);
    let by =
        |email: &'static str| async move { store.member_id_by_email("em", email).await.unwrap() };
    assert_eq!(by("a@x.kz").await.as_deref(), Some("a"));
    // Taking another member's email writes nothing.
    let grab = with_email(b.clone(), "a@x.kz");
    let p1 = Profile {
        version: 1,
        ..Profile::default()
    };
    assert_eq!(
        store.save_profile(&grab, &p1, 0).await.unwrap(),
        Saved::EmailTaken
    );
    assert_eq!(store.member("em", "b").await.unwrap(), Some(b.clone()));
    // A changed email moves the index entry; a cleared one removes it.
    let moved = with_email(b.clone(), "new@x.kz");
    assert_eq!(
        store.save_profile(&moved, &p1, 0).await.unwrap(),
        Saved::Done
    );
    assert_eq!(by("b@x.kz").await, None);
    assert_eq!(by("new@x.kz").await.as_deref(), Some("b"));
    let cleared = with_email(b, "");
    let p2 = Profile {
        version: 2,
        ..Profile::default()
    };
    assert_eq!(
        store.save_profile(&cleared, &p2, 1).await.unwrap(),
        Saved::Done
    );
    assert_eq!(by("new@x.kz").await, None);
    assert_eq!(
        store.member_id_by_email("other", "a@x.kz").await.unwrap(),
        None
    );
}

fn audit() -> Audit {
    Audit {
        actor: "manager:anna".into(),
        comment: "same person".into(),
        key_id: "k1".into(),
        at: 7,
    }
}

/// While a member merged into B has not had its points moved, B cannot be merged away.
async fn an_unfinished_merge_into_a_member_holds_it(store: &dyn IdentityStore) {
    for (id, phone, code) in [
        ("a", "+77010002101", "UMCODE01"),
        ("b", "+77010002102", "UMCODE02"),
        ("c", "+77010002103", "UMCODE03"),
    ] {
        store
            .insert_member(&member("um", id, phone, code))
            .await
            .unwrap();
    }
    let merged = |id: &str, phone: &str, code: &str| Member {
        status: MemberStatus::Merged,
        ..member("um", id, phone, code)
    };
    let profile = Profile {
        version: 1,
        ..Profile::default()
    };
    let into = |to: &str| MergeRecord {
        into: to.into(),
        audit: audit(),
        points_moved: false,
    };
    let a = merged("a", "+77010002101", "UMCODE01");
    let b = merged("b", "+77010002102", "UMCODE02");
    assert!(
        store
            .merge_members(&a, &profile, 0, &into("b"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .merge_members(&b, &profile, 0, &into("c"))
            .await
            .unwrap(),
        "a's points have not reached b"
    );
    assert_eq!(
        store.member("um", "b").await.unwrap().unwrap().status,
        MemberStatus::Active
    );
    let done = MergeRecord {
        points_moved: true,
        ..into("b")
    };
    store.save_merge_record("um", "a", &done).await.unwrap();
    assert!(
        store
            .merge_members(&b, &profile, 0, &into("c"))
            .await
            .unwrap()
    );
    assert_eq!(store.merged_from("um", "c").await.unwrap().len(), 2);
}

async fn a_merge_moves_cards_and_lookups_at_once(store: &dyn IdentityStore) {
    let keep = member("mg", "keep", "+77010002001", "MGCODE01");
    let dup = with_email(member("mg", "dup", "+77010002002", "MGCODE02"), "dup@x.kz");
    store.insert_member(&keep).await.unwrap();
    store.insert_member(&dup).await.unwrap();
    store
        .insert_card(&card("mg", "2000000001", Some("keep")))
        .await
        .unwrap();
    store
        .insert_card(&card("mg", "2000000002", Some("dup")))
        .await
        .unwrap();
    store
        .insert_card(&card("mg", "2000000003", Some("dup")))
        .await
        .unwrap();
    let record = MergeRecord {
        into: "keep".into(),
        audit: audit(),
        points_moved: false,
    };
    let merged = Member {
        status: MemberStatus::Merged,
        ..dup.clone()
    };
    let profile = Profile {
        version: 1,
        ..Profile::default()
    };
    // A stale profile version writes nothing.
    assert!(
        !store
            .merge_members(&merged, &profile, 3, &record)
            .await
            .unwrap()
    );
    assert_eq!(store.member("mg", "dup").await.unwrap(), Some(dup.clone()));
    assert_eq!(store.merge_record("mg", "dup").await.unwrap(), None);
    assert_eq!(store.cards_of_member("mg", "dup").await.unwrap().len(), 2);
    // Nor does a survivor that is not active.
    let to_nobody = MergeRecord {
        into: "nobody".into(),
        ..record.clone()
    };
    assert!(
        !store
            .merge_members(&merged, &profile, 0, &to_nobody)
            .await
            .unwrap()
    );

    assert!(
        store
            .merge_members(&merged, &profile, 0, &record)
            .await
            .unwrap()
    );
    assert_eq!(
        store.member("mg", "dup").await.unwrap(),
        Some(merged.clone())
    );
    assert_eq!(
        store.profile("mg", "dup").await.unwrap(),
        Some(profile.clone())
    );
    assert_eq!(
        store.merge_record("mg", "dup").await.unwrap(),
        Some(record.clone())
    );
    assert!(store.cards_of_member("mg", "dup").await.unwrap().is_empty());
    let mut numbers: Vec<String> = store
        .cards_of_member("mg", "keep")
        .await
        .unwrap()
        .into_iter()
        .map(|c| {
            assert_eq!(c.member_id.as_deref(), Some("keep"));
            c.number
        })
        .collect();
    numbers.sort();
    assert_eq!(numbers, ["2000000001", "2000000002", "2000000003"]);
    assert_eq!(
        store
            .member_id_by_phone("mg", "+77010002002")
            .await
            .unwrap()
            .as_deref(),
        Some("keep")
    );
    assert_eq!(
        store
            .member_id_by_email("mg", "dup@x.kz")
            .await
            .unwrap()
            .as_deref(),
        Some("keep")
    );
    assert_eq!(store.merged_from("mg", "keep").await.unwrap(), ["dup"]);
    assert!(store.merged_from("mg", "dup").await.unwrap().is_empty());
    // Merged once: a second merge of the same member writes nothing.
    assert!(
        !store
            .merge_members(&merged, &profile, 1, &record)
            .await
            .unwrap()
    );
    let done = MergeRecord {
        points_moved: true,
        ..record
    };
    store.save_merge_record("mg", "dup", &done).await.unwrap();
    assert_eq!(store.merge_record("mg", "dup").await.unwrap(), Some(done));
}

async fn an_erasure_frees_the_indexes(store: &dyn IdentityStore) {
    let m = with_email(member("er", "m", "+77010003001", "ERCODE01"), "m@x.kz");
    store.insert_member(&m).await.unwrap();
    store
        .insert_card(&card("er", "3000000001", Some("m")))
        .await
        .unwrap();
    let before = Profile {
        version: 1,
        gender: Gender::Male,
        ..Profile::default()
    };
    assert_eq!(
        store.save_profile(&m, &before, 0).await.unwrap(),
        Saved::Done
    );
    let erased = Member {
        status: MemberStatus::Erased,
        phone: String::new(),
        email: String::new(),
        first_name: String::new(),
        referral_code: String::new(),
        ..m.clone()
    };
    let blank = Profile {
        version: 2,
        ..Profile::default()
    };
    let erasure = Erasure { audit: audit() };
    assert!(
        !store
            .erase_member(&erased, &blank, 0, &erasure)
            .await
            .unwrap(),
        "stale version"
    );
    assert_eq!(store.member("er", "m").await.unwrap(), Some(m.clone()));
    assert_eq!(store.erasure("er", "m").await.unwrap(), None);
    assert!(
        store
            .erase_member(&erased, &blank, 1, &erasure)
            .await
            .unwrap()
    );
    assert_eq!(store.member("er", "m").await.unwrap(), Some(erased.clone()));
    assert_eq!(store.profile("er", "m").await.unwrap(), Some(blank.clone()));
    assert_eq!(
        store.erasure("er", "m").await.unwrap(),
        Some(erasure.clone())
    );
    // The scrub after an erasure keeps every live record; a second one has nothing to do.
    assert!(store.scrub().await.unwrap());
    assert!(!store.scrub().await.unwrap());
    assert_eq!(store.member("er", "m").await.unwrap(), Some(erased.clone()));
    assert_eq!(
        store.erasure("er", "m").await.unwrap(),
        Some(erasure.clone())
    );
    assert_eq!(
        store
            .member_id_by_phone("er", "+77010003001")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.member_id_by_email("er", "m@x.kz").await.unwrap(),
        None
    );
    assert_eq!(
        store
            .member_by_referral_code("er", "ERCODE01")
            .await
            .unwrap(),
        None
    );
    // Erased once.
    assert!(
        !store
            .erase_member(&erased, &blank, 2, &erasure)
            .await
            .unwrap()
    );
    // The phone, email and code are free again.
    let again = with_email(member("er", "n", "+77010003001", "ERCODE01"), "m@x.kz");
    assert_eq!(store.insert_member(&again).await.unwrap(), Inserted::Done);
}

async fn an_import_writes_all_or_nothing(store: &dyn IdentityStore) {
    store
        .insert_cards(&[
            crate::domain::Card {
                status: CardStatus::Unbound,
                ..card("im", "4000000001", None)
            },
            card("im", "4000000009", Some("someone")),
        ])
        .await
        .unwrap();
    let m = with_email(member("im", "i1", "+77010004001", "IMCODE01"), "i1@x.kz");
    let profile = Profile::default();
    let row = ImportRow {
        tenant_id: "im".into(),
        import_id: "old-crm".into(),
        row_number: 7,
        member_id: "i1".into(),
        opening_balance: 500,
        balance_done: false,
        fingerprint: vec![7; 32],
    };
    // A card bound to someone else refuses the whole row.
    let cards = [
        card("im", "4000000001", Some("i1")),
        card("im", "4000000009", Some("i1")),
    ];
    assert_eq!(
        store
            .import_member(&m, &profile, &cards, &row)
            .await
            .unwrap(),
        Imported::CardTaken("4000000009".into())
    );
    assert_eq!(store.member("im", "i1").await.unwrap(), None);
    assert_eq!(store.import_row("im", "old-crm", 7).await.unwrap(), None);
    assert_eq!(
        store
            .card("im", "4000000001")
            .await
            .unwrap()
            .unwrap()
            .status,
        CardStatus::Unbound
    );
    // An unbound card is bound, a new number inserted.
    let cards = [
        card("im", "4000000001", Some("i1")),
        card("im", "4000000002", Some("i1")),
    ];
    assert_eq!(
        store
            .import_member(&m, &profile, &cards, &row)
            .await
            .unwrap(),
        Imported::Done
    );
    assert_eq!(store.member("im", "i1").await.unwrap(), Some(m.clone()));
    assert_eq!(store.cards_of_member("im", "i1").await.unwrap().len(), 2);
    let bound = store.card("im", "4000000001").await.unwrap().unwrap();
    assert_eq!(
        (bound.status, bound.member_id.as_deref()),
        (CardStatus::Active, Some("i1"))
    );
    assert_eq!(
        store
            .member_id_by_email("im", "i1@x.kz")
            .await
            .unwrap()
            .as_deref(),
        Some("i1")
    );
    assert_eq!(
        store.import_row("im", "old-crm", 7).await.unwrap(),
        Some(row.clone())
    );
    assert_eq!(store.import_row("im", "other", 7).await.unwrap(), None);
    // Phone, email and code are checked like a registration's.
    let twin = member("im", "i2", "+77010004001", "IMCODE02");
    let row2 = ImportRow {
        row_number: 8,
        member_id: "i2".into(),
        ..row.clone()
    };
    assert_eq!(
        store
            .import_member(&twin, &profile, &[], &row2)
            .await
            .unwrap(),
        Imported::PhoneTaken
    );
    // The phone is told before a taken card, as a registration would be refused.
    assert_eq!(
        store
            .import_member(
                &twin,
                &profile,
                &[card("im", "4000000009", Some("i2"))],
                &row2
            )
            .await
            .unwrap(),
        Imported::PhoneTaken
    );
    let twin = with_email(member("im", "i2", "+77010004002", "IMCODE02"), "i1@x.kz");
    assert_eq!(
        store
            .import_member(&twin, &profile, &[], &row2)
            .await
            .unwrap(),
        Imported::EmailTaken
    );
    let done = ImportRow {
        balance_done: true,
        ..row
    };
    store.save_import_row(&done).await.unwrap();
    assert_eq!(
        store.import_row("im", "old-crm", 7).await.unwrap(),
        Some(done)
    );
}
