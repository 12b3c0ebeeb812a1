//! A member record's whole life through the real binary: lookup by email, listing, merging
//! a duplicate (cards, points, lookups), erasure on request, and the bulk import of members
//! with their cards and opening balances from a previous system, resumed after a break.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loyalty_e2e::*;
use loyalty_proto::common::v1::{Actor, Date};
use loyalty_proto::identity::v1 as identity;
use tonic::Code;

const T: &str = "t1";

async fn register(
    pos: &mut Pos,
    phone: &str,
    email: &str,
) -> Result<identity::Member, tonic::Status> {
    pos.members
        .register_member(identity::RegisterMemberRequest {
            tenant_id: T.into(),
            phone: phone.into(),
            email: email.into(),
            first_name: "Aigerim".into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().member.unwrap())
}

async fn lookup(
    pos: &mut Pos,
    key: identity::lookup_member_request::Key,
) -> Result<identity::Member, tonic::Status> {
    pos.members
        .lookup_member(identity::LookupMemberRequest {
            tenant_id: T.into(),
            key: Some(key),
            default_region: "KZ".into(),
        })
        .await
        .map(|r| r.into_inner().member.unwrap())
}

fn actor(id: &str) -> Option<Actor> {
    Some(Actor {
        id: id.into(),
        comment: "asked by the member".into(),
    })
}

async fn merge(
    pos: &mut Pos,
    survivor: &str,
    duplicate: &str,
) -> Result<identity::Member, tonic::Status> {
    pos.members
        .merge_members(identity::MergeMembersRequest {
            tenant_id: T.into(),
            survivor_member_id: survivor.into(),
            duplicate_member_id: duplicate.into(),
            actor: actor("manager:anna"),
        })
        .await
        .map(|r| r.into_inner().survivor.unwrap())
}

async fn get(pos: &mut Pos, member_id: &str) -> identity::GetMemberResponse {
    pos.members
        .get_member(identity::GetMemberRequest {
            tenant_id: T.into(),
            member_id: member_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

use identity::lookup_member_request::Key;

#[tokio::test]
async fn emails_are_looked_up_and_unique_per_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    let mut pos = Pos::new(&channel, &channel);

    let a = register(&mut pos, "+77017000001", "Aigerim@Example.KZ")
        .await
        .unwrap();
    let found = lookup(&mut pos, Key::Email("aigerim@example.kz".into()))
        .await
        .unwrap();
    assert_eq!(found.member_id, a.member_id);
    let found = lookup(&mut pos, Key::Email("AIGERIM@example.kz".into()))
        .await
        .unwrap();
    assert_eq!(found.member_id, a.member_id, "emails compare without case");

    // The same email again, at registration or by a profile change: refused, nothing written.
    let taken = register(&mut pos, "+77017000002", "aigerim@example.kz")
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");
    let missing = lookup(&mut pos, Key::Phone("+77017000002".into()))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let b = register(&mut pos, "+77017000002", "").await.unwrap();
    let grab = pos
        .members
        .update_profile(identity::UpdateProfileRequest {
            tenant_id: T.into(),
            member_id: b.member_id.clone(),
            member: Some(identity::Member {
                email: "aigerim@example.kz".into(),
                ..Default::default()
            }),
            update_mask: vec!["email".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(grab.code(), Code::AlreadyExists, "{grab:?}");
    assert_eq!(get(&mut pos, &b.member_id).await.member.unwrap().email, "");

    // A changed email moves: the old one finds nobody, the new one finds the member.
    pos.members
        .update_profile(identity::UpdateProfileRequest {
            tenant_id: T.into(),
            member_id: a.member_id.clone(),
            member: Some(identity::Member {
                email: "new@example.kz".into(),
                ..Default::default()
            }),
            update_mask: vec!["email".into()],
        })
        .await
        .unwrap();
    let old = lookup(&mut pos, Key::Email("aigerim@example.kz".into()))
        .await
        .unwrap_err();
    assert_eq!(old.code(), Code::NotFound);
    let new = lookup(&mut pos, Key::Email("new@example.kz".into()))
        .await
        .unwrap();
    assert_eq!(new.member_id, a.member_id);

    let bad = lookup(&mut pos, Key::Email("not-an-email".into()))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(violations(&bad)[0].0, "email");

    // Listing pages through the tenant's members in id order.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = pos
            .members
            .list_members(identity::ListMembersRequest {
                tenant_id: T.into(),
                page_size: 1,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.members.into_iter().map(|m| m.member_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut want = vec![a.member_id, b.member_id];
    want.sort();
    assert_eq!(seen, want);
    let too_big = pos
        .members
        .list_members(identity::ListMembersRequest {
            tenant_id: T.into(),
            page_size: 5000,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(too_big.code(), Code::InvalidArgument);
    assert_eq!(server.stop().await, 0);
}

#[tokio::test]
async fn a_merge_moves_cards_points_and_lookups_to_the_survivor() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    setup_tenant(&channel, T).await;
    let mut pos = Pos::new(&channel, &channel);

    let (keep, keep_card) = pos.member_with_card(T, "+77017100001").await;
    let (dup, dup_card) = pos.member_with_card(T, "+77017100002").await;
    pos.commit(receipt(
        T,
        "R-keep",
        Some(&keep_card),
        vec![line("1", "boots", "1", "10000.00", false)],
    ))
    .await
    .unwrap();
    pos.commit(receipt(
        T,
        "R-dup",
        Some(&dup_card),
        vec![line("1", "boots", "1", "20000.00", false)],
    ))
    .await
    .unwrap();
    let keep_before = pos.balance(T, &keep).await;
    let dup_before = pos.balance(T, &dup).await;
    assert!(dup_before.active + dup_before.pending > 0, "{dup_before:?}");

    // Bad requests write nothing.
    let same = merge(&mut pos, &keep, &keep).await.unwrap_err();
    assert_eq!(same.code(), Code::InvalidArgument);
    let unknown = merge(&mut pos, &keep, "nobody").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let no_actor = pos
        .members
        .merge_members(identity::MergeMembersRequest {
            tenant_id: T.into(),
            survivor_member_id: keep.clone(),
            duplicate_member_id: dup.clone(),
            actor: None,
        })
        .await
        .unwrap_err();
    assert_eq!(no_actor.code(), Code::InvalidArgument);
    assert_eq!(violations(&no_actor)[0].0, "actor.id");
    assert_eq!(
        get(&mut pos, &dup).await.member.unwrap().status,
        identity::MemberStatus::Active as i32
    );

    let survivor = merge(&mut pos, &keep, &dup).await.unwrap();
    assert_eq!(survivor.member_id, keep);
    // Points: all of the duplicate's, now the survivor's; the duplicate's ledger says where.
    let after = pos.balance(T, &keep).await;
    assert_eq!(
        (after.active, after.pending),
        (
            keep_before.active + dup_before.active,
            keep_before.pending + dup_before.pending
        )
    );
    let dup_entries = all_ledger_entries(&mut pos.balance, T, &dup).await;
    assert_eq!(
        dup_entries[0].reason,
        loyalty_proto::balance::v1::EntryReason::MergeTransfer as i32
    );
    // Lookups by the duplicate's card, phone and id land on the survivor.
    let by_card = pos
        .members
        .lookup_member(identity::LookupMemberRequest {
            tenant_id: T.into(),
            key: Some(Key::CardNumber(dup_card.clone())),
            default_region: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_card.member.unwrap().member_id, keep);
    assert_eq!(by_card.card.unwrap().member_id, keep);
    let by_phone = lookup(&mut pos, Key::Phone("+77017100002".into()))
        .await
        .unwrap();
    assert_eq!(by_phone.member_id, keep);
    let by_id = get(&mut pos, &dup).await;
    assert_eq!(by_id.member.unwrap().member_id, keep);
    let mut cards: Vec<String> = by_id.cards.into_iter().map(|c| c.number).collect();
    cards.sort();
    let mut want = vec![keep_card.clone(), dup_card.clone()];
    want.sort();
    assert_eq!(cards, want);
    // A receipt with the duplicate's card now earns the survivor points.
    pos.commit(receipt(
        T,
        "R-after",
        Some(&dup_card),
        vec![line("1", "boots", "1", "10000.00", false)],
    ))
    .await
    .unwrap();
    let later = pos.balance(T, &keep).await;
    assert!(later.active + later.pending > after.active + after.pending);
    let listed = pos
        .members
        .list_members(identity::ListMembersRequest {
            tenant_id: T.into(),
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .members;
    let shown = listed.iter().find(|m| m.member_id == dup).unwrap();
    assert_eq!(shown.status, identity::MemberStatus::Merged as i32);
    assert_eq!(shown.merged_into_member_id, keep);

    // The duplicate's purchase history is listed under the survivor (moved by promotion
    // when the merge event reaches it).
    let mut checkout = pos.checkout.clone();
    let mut receipts = Vec::new();
    for _ in 0..100 {
        receipts = checkout
            .list_purchases(loyalty_proto::promotion::v1::ListPurchasesRequest {
                tenant_id: T.into(),
                member_id: keep.clone(),
                page_size: 10,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .purchases
            .into_iter()
            .map(|p| p.receipt.unwrap().receipt_id)
            .collect::<Vec<_>>();
        if receipts.len() == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    receipts.sort();
    assert_eq!(receipts, ["R-after", "R-dup", "R-keep"]);

    // A retry answers the same and moves nothing twice; another survivor is refused.
    let again = merge(&mut pos, &keep, &dup).await.unwrap();
    assert_eq!(again.member_id, keep);
    assert_eq!(pos.balance(T, &keep).await.active, later.active);
    let (other, _) = pos.member_with_card(T, "+77017100003").await;
    let elsewhere = merge(&mut pos, &other, &dup).await.unwrap_err();
    assert_eq!(elsewhere.code(), Code::FailedPrecondition, "{elsewhere:?}");
    // The duplicate can no longer survive anything.
    let into_merged = merge(&mut pos, &dup, &other).await.unwrap_err();
    assert_eq!(
        into_merged.code(),
        Code::FailedPrecondition,
        "{into_merged:?}"
    );

    // A receipt of the duplicate returned after the merge: its points come back from the
    // survivor, which holds them now, once however often the till retries.
    let before_refund = pos.balance(T, &keep).await;
    let refund = pos
        .refund(T, "R-dup", "R-dup-1", &[("1", "1")])
        .await
        .unwrap();
    assert_eq!(
        refund.points_reversed, 20_000,
        "200 points for 20,000.00 at 1%"
    );
    assert_eq!(refund.points_unrecovered, 0);
    assert_eq!(
        refund.points_balance,
        before_refund.active - 20_000,
        "taken from the survivor"
    );
    let retried = pos
        .refund(T, "R-dup", "R-dup-1", &[("1", "1")])
        .await
        .unwrap();
    assert_eq!(retried, refund);
    assert_eq!(
        pos.balance(T, &keep).await.active,
        before_refund.active - 20_000
    );
    let survivor_entries = all_ledger_entries(&mut pos.balance, T, &keep).await;
    assert_eq!(
        survivor_entries[0].reason,
        loyalty_proto::balance::v1::EntryReason::RefundReversal as i32
    );
    assert_eq!(survivor_entries[0].amount, -20_000);
    assert_eq!(server.stop().await, 0);
}

#[tokio::test]
async fn an_erased_member_keeps_no_personal_data_and_frees_the_phone() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    setup_tenant(&channel, T).await;
    let mut pos = Pos::new(&channel, &channel);

    let member = register(&mut pos, "+77017200001", "erase.me@example.kz")
        .await
        .unwrap();
    let id = member.member_id.clone();
    let card = pos
        .cards
        .issue_card(identity::IssueCardRequest {
            tenant_id: T.into(),
            member_id: id.clone(),
            kind: identity::CardKind::Virtual as i32,
            number: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap()
        .number;
    pos.members
        .update_profile(identity::UpdateProfileRequest {
            tenant_id: T.into(),
            member_id: id.clone(),
            member: Some(identity::Member {
                birthday: Some(Date {
                    year: 1990,
                    month: 5,
                    day: 17,
                }),
                gender: identity::Gender::Female as i32,
                attributes: [("shoe_size".to_string(), "37".to_string())].into(),
                ..Default::default()
            }),
            update_mask: vec!["birthday".into(), "gender".into(), "attributes".into()],
        })
        .await
        .unwrap();
    pos.commit(receipt(
        T,
        "R-e",
        Some(&card),
        vec![line("1", "boots", "1", "10000.00", false)],
    ))
    .await
    .unwrap();

    let members = pos.members.clone();
    let erase = |member_id: String| {
        let mut members = members.clone();
        async move {
            members
                .erase_member(identity::EraseMemberRequest {
                    tenant_id: T.into(),
                    member_id,
                    actor: actor("dpo:marat"),
                })
                .await
                .map(|r| r.into_inner().member.unwrap())
        }
    };
    let erased = erase(id.clone()).await.unwrap();
    assert_eq!(erased.status, identity::MemberStatus::Erased as i32);
    let shown = get(&mut pos, &id).await.member.unwrap();
    for (field, value) in [
        ("phone", &shown.phone),
        ("email", &shown.email),
        ("first_name", &shown.first_name),
        ("last_name", &shown.last_name),
        ("referral_code", &shown.referral_code),
    ] {
        assert!(value.is_empty(), "{field} kept: {value}");
    }
    assert!(shown.birthday.is_none() && shown.attributes.is_empty() && shown.consents.is_empty());
    assert_eq!(shown.gender, identity::Gender::Unspecified as i32);
    // What reports need stays: the id, where and when the member registered.
    assert_eq!(shown.registered_at, member.registered_at);

    // The card is refused at the POS with the reason; phone and email find nobody.
    let at_pos = pos
        .commit(receipt(
            T,
            "R-e2",
            Some(&card),
            vec![line("1", "boots", "1", "100.00", false)],
        ))
        .await
        .unwrap_err();
    assert_eq!(at_pos.code(), Code::FailedPrecondition, "{at_pos:?}");
    assert!(at_pos.message().contains("erased"), "{}", at_pos.message());
    let by_phone = lookup(&mut pos, Key::Phone("+77017200001".into()))
        .await
        .unwrap_err();
    assert_eq!(by_phone.code(), Code::NotFound);
    let by_email = lookup(&mut pos, Key::Email("erase.me@example.kz".into()))
        .await
        .unwrap_err();
    assert_eq!(by_email.code(), Code::NotFound);

    // Erasing again answers the same; the phone and email register a new member.
    assert_eq!(
        erase(id.clone()).await.unwrap().status,
        identity::MemberStatus::Erased as i32
    );
    let again = register(&mut pos, "+77017200001", "erase.me@example.kz")
        .await
        .unwrap();
    assert_ne!(again.member_id, id);
    let unknown = erase("nobody".into()).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    // The erasure is logged with its actor and ids only.
    let log = server.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("member erased"))
        .expect("an audit line for the erasure");
    assert!(line.contains("dpo:marat") && line.contains(&id), "{line}");
    assert!(
        !log.contains("erase.me@example.kz"),
        "the erased email is in the log"
    );
    assert_eq!(server.stop().await, 0);
}

fn row(n: i64, phone: &str, cards: &[&str], opening: i64) -> identity::ImportMemberRow {
    identity::ImportMemberRow {
        row_number: n,
        phone: phone.into(),
        first_name: format!("Row {n}"),
        card_numbers: cards.iter().map(|c| (*c).to_string()).collect(),
        opening_balance: opening,
        ..Default::default()
    }
}

fn chunk(import_id: &str, rows: Vec<identity::ImportMemberRow>) -> identity::ImportMembersRequest {
    identity::ImportMembersRequest {
        tenant_id: T.into(),
        import_id: import_id.into(),
        rows,
    }
}

async fn import(
    pos: &mut Pos,
    chunks: Vec<identity::ImportMembersRequest>,
) -> Result<Vec<identity::ImportMembersResponse>, tonic::Status> {
    let mut replies = pos
        .members
        .import_members(tokio_stream::iter(chunks))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(reply) = replies.message().await? {
        out.push(reply);
    }
    Ok(out)
}

#[tokio::test]
async fn members_import_with_cards_and_opening_balances_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    let mut pos = Pos::new(&channel, &channel);
    // Pre-printed cards the old system handed out, and one member who registered already.
    pos.cards
        .import_card_range(identity::ImportCardRangeRequest {
            tenant_id: T.into(),
            kind: identity::CardKind::Plastic as i32,
            first_number: "5000000001".into(),
            last_number: "5000000010".into(),
        })
        .await
        .unwrap();
    register(&mut pos, "+77017300009", "").await.unwrap();

    let mut birthday = row(2, "8 701 730 0002", &[], 0);
    birthday.birthday = Some(Date {
        year: 1985,
        month: 3,
        day: 8,
    });
    birthday.email = "Row2@Example.KZ".into();
    let mut bad_email = row(5, "+77017300005", &[], 0);
    bad_email.email = "nope".into();
    let chunks = vec![
        chunk(
            "old-crm",
            vec![
                row(1, "+77017300001", &["5000000001", "5000000002"], 12_345),
                birthday,
                row(3, "not a phone", &[], 0),
            ],
        ),
        chunk(
            "old-crm",
            vec![
                row(4, "+77017300009", &[], 100),
                bad_email,
                row(6, "+77017300006", &["5000000001"], 0),
                row(7, "+77017300007", &["12"], 0),
                row(8, "+77017300008", &[], -5),
                row(9, "+77017300010", &["6000000001"], 700),
            ],
        ),
    ];
    let replies = import(&mut pos, chunks.clone()).await.unwrap();
    assert_eq!(replies.len(), 2, "one answer per message");
    assert_eq!(replies[0].rows_imported, 2);
    assert_eq!(replies[1].rows_imported, 1);
    let errors: Vec<(i64, String)> = replies
        .iter()
        .flat_map(|r| r.errors.iter().map(|e| (e.row_number, e.field.clone())))
        .collect();
    assert_eq!(
        errors,
        [
            (3, "phone".to_string()),
            (4, "phone".to_string()),
            (5, "email".to_string()),
            (6, "card_numbers".to_string()),
            (7, "card_numbers".to_string()),
            (8, "opening_balance".to_string()),
        ]
    );

    // Row 1: its two pre-printed cards are bound, its opening balance is active.
    let one = lookup(&mut pos, Key::Phone("+77017300001".into()))
        .await
        .unwrap();
    let card = pos
        .cards
        .get_card(identity::GetCardRequest {
            tenant_id: T.into(),
            number: "5000000002".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap();
    assert_eq!(card.member_id, one.member_id);
    assert_eq!(card.status, identity::CardStatus::Active as i32);
    assert_eq!(pos.balance(T, &one.member_id).await.active, 12_345);
    let entries = all_ledger_entries(&mut pos.balance, T, &one.member_id).await;
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].reason,
        loyalty_proto::balance::v1::EntryReason::OpeningBalance as i32
    );
    // Row 2: the profile came along; row 9: a new plastic card number.
    let two = lookup(&mut pos, Key::Email("row2@example.kz".into()))
        .await
        .unwrap();
    assert_eq!(two.phone, "+77017300002");
    assert_eq!(two.birthday.unwrap().day, 8);
    let nine = lookup(&mut pos, Key::CardNumber("6000000001".into()))
        .await
        .unwrap();
    assert_eq!(pos.balance(T, &nine.member_id).await.active, 700);
    // The member who was there already is untouched.
    let existing = lookup(&mut pos, Key::Phone("+77017300009".into()))
        .await
        .unwrap();
    assert_eq!(existing.first_name, "Aigerim");

    // The same import sent again (as after a broken connection): nothing twice.
    let replies = import(&mut pos, chunks).await.unwrap();
    assert_eq!(replies[0].rows_imported + replies[1].rows_imported, 3);
    assert_eq!(pos.balance(T, &one.member_id).await.active, 12_345);
    assert_eq!(
        all_ledger_entries(&mut pos.balance, T, &one.member_id)
            .await
            .len(),
        1
    );
    let listed = pos
        .members
        .list_members(identity::ListMembersRequest {
            tenant_id: T.into(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .members;
    assert_eq!(listed.len(), 4, "three imported, one registered");

    // A row number of the import sent again with other data is that row's error, not a
    // silent skip; the row it names stays as it was.
    let replies = import(
        &mut pos,
        vec![chunk(
            "old-crm",
            vec![
                row(1, "+77017300014", &[], 999),
                row(10, "+77017300015", &[], 0),
            ],
        )],
    )
    .await
    .unwrap();
    assert_eq!(replies[0].rows_imported, 1);
    let errors: Vec<(i64, &str)> = replies[0]
        .errors
        .iter()
        .map(|e| (e.row_number, e.field.as_str()))
        .collect();
    assert_eq!(errors, [(1, "row_number")], "{:?}", replies[0].errors);
    assert!(replies[0].errors[0].description.contains("other data"));
    let other = lookup(&mut pos, Key::Phone("+77017300014".into()))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::NotFound);
    assert_eq!(pos.balance(T, &one.member_id).await.active, 12_345);

    // One stream is one import; a message over the row limit is refused whole.
    let mixed = import(
        &mut pos,
        vec![
            chunk("a", vec![row(1, "+77017300011", &[], 0)]),
            chunk("b", vec![row(2, "+77017300012", &[], 0)]),
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(mixed.code(), Code::InvalidArgument, "{mixed:?}");
    let rows: Vec<_> = (1..=1001).map(|n| row(n, "+77017300013", &[], 0)).collect();
    let too_many = import(&mut pos, vec![chunk("big", rows)])
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
    let no_tenant = import(
        &mut pos,
        vec![identity::ImportMembersRequest {
            tenant_id: String::new(),
            import_id: "x".into(),
            rows: vec![row(1, "+77017300014", &[], 0)],
        }],
    )
    .await
    .unwrap_err();
    assert_eq!(no_tenant.code(), Code::InvalidArgument);
    assert!(
        lookup(&mut pos, Key::Phone("+77017300013".into()))
            .await
            .is_err()
    );
    assert_eq!(server.stop().await, 0);
}

#[tokio::test]
async fn a_blocked_member_is_refused_everywhere_until_unblocked() {
    use loyalty_proto::balance::v1 as bpb;
    use loyalty_proto::promotion::v1::receipt::Identification;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    setup_tenant(&channel, T).await;
    let mut pos = Pos::new(&channel, &channel);
    let (id, card) = pos.member_with_card(T, "+77017800001").await;
    let sale = |n: &str| {
        receipt(
            T,
            n,
            Some(&card),
            vec![line("1", "boots", "1", "10000.00", false)],
        )
    };
    pos.commit(sale("B-1")).await.unwrap();
    // An accrual made directly before the block; its retry after the block answers as then.
    let early = bpb::AccrueRequest {
        tenant_id: T.into(),
        member_id: id.clone(),
        idempotency_key: "early-1".into(),
        amount: 100,
        ..Default::default()
    };
    let first = pos
        .balance
        .accrue(early.clone())
        .await
        .unwrap()
        .into_inner();
    let before = pos.balance(T, &id).await;

    let block = |reason: &str| {
        let mut members = pos.members.clone();
        let request = identity::BlockMemberRequest {
            tenant_id: T.into(),
            member_id: id.clone(),
            reason: reason.into(),
            actor: actor("fraud:aliya"),
        };
        async move {
            members
                .block_member(request)
                .await
                .map(|r| r.into_inner().member.unwrap())
        }
    };
    let no_reason = block("").await.unwrap_err();
    assert_eq!(no_reason.code(), Code::InvalidArgument);
    assert_eq!(violations(&no_reason)[0].0, "reason");
    let blocked = block("one card in 9 stores in an hour").await.unwrap();
    assert_eq!(blocked.status, identity::MemberStatus::Blocked as i32);
    assert_eq!(blocked.block_reason, "one card in 9 stores in an hour");
    assert_eq!(
        block("again").await.unwrap().block_reason,
        blocked.block_reason
    );

    // The POS: lookups and receipts by card or by member id.
    let refused = |status: tonic::Status| {
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("blocked"), "{status:?}");
    };
    refused(
        lookup(&mut pos, Key::CardNumber(card.clone()))
            .await
            .unwrap_err(),
    );
    refused(
        lookup(&mut pos, Key::Phone("+77017800001".into()))
            .await
            .unwrap_err(),
    );
    refused(pos.commit(sale("B-2")).await.unwrap_err());
    let mut by_id = sale("B-3");
    by_id.identification = Some(Identification::MemberId(id.clone()));
    refused(pos.commit(by_id.clone()).await.unwrap_err());
    // Balance, called directly: no accrual, redemption or hold.
    let mut balance = pos.balance.clone();
    refused(
        balance
            .accrue(bpb::AccrueRequest {
                tenant_id: T.into(),
                member_id: id.clone(),
                idempotency_key: "a-1".into(),
                amount: 100,
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    refused(
        balance
            .redeem(bpb::RedeemRequest {
                tenant_id: T.into(),
                member_id: id.clone(),
                idempotency_key: "r-1".into(),
                amount: 1,
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    refused(
        balance
            .hold(bpb::HoldRequest {
                tenant_id: T.into(),
                member_id: id.clone(),
                idempotency_key: "h-1".into(),
                amount: 1,
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    assert_eq!(
        pos.balance(T, &id).await.active,
        before.active,
        "nothing moved"
    );
    let replayed = balance.accrue(early).await.unwrap().into_inner();
    assert_eq!(replayed.entry, first.entry, "the stored reply");
    // The back office can still take the points away.
    balance
        .adjust(bpb::AdjustRequest {
            tenant_id: T.into(),
            member_id: id.clone(),
            idempotency_key: "adj-1".into(),
            amount: -1,
            actor: actor("fraud:aliya"),
        })
        .await
        .unwrap();

    // Unblocked, the member buys again.
    let unblocked = pos
        .members
        .unblock_member(identity::UnblockMemberRequest {
            tenant_id: T.into(),
            member_id: id.clone(),
            actor: actor("fraud:aliya"),
        })
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap();
    assert_eq!(unblocked.status, identity::MemberStatus::Active as i32);
    assert!(unblocked.block_reason.is_empty());
    pos.commit(sale("B-2")).await.unwrap();
    pos.commit(by_id).await.unwrap();
    assert_eq!(
        lookup(&mut pos, Key::CardNumber(card.clone()))
            .await
            .unwrap()
            .member_id,
        id
    );
    assert_eq!(server.stop().await, 0);
}

#[tokio::test]
async fn chained_merges_resolve_and_an_erasure_reaches_the_merged() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    let mut pos = Pos::new(&channel, &channel);
    let a = register(&mut pos, "+77017900001", "a.chain@example.kz")
        .await
        .unwrap();
    let b = register(&mut pos, "+77017900002", "b.chain@example.kz")
        .await
        .unwrap();
    let c = register(&mut pos, "+77017900003", "").await.unwrap();
    merge(&mut pos, &b.member_id, &a.member_id).await.unwrap();
    merge(&mut pos, &c.member_id, &b.member_id).await.unwrap();

    // A's phone, email and id all land on C; so does A's referral code.
    for key in [
        Key::Phone("+77017900001".into()),
        Key::Email("a.chain@example.kz".into()),
        Key::Phone("+77017900002".into()),
    ] {
        assert_eq!(lookup(&mut pos, key).await.unwrap().member_id, c.member_id);
    }
    assert_eq!(
        get(&mut pos, &a.member_id).await.member.unwrap().member_id,
        c.member_id
    );
    let referred = pos
        .members
        .register_member(identity::RegisterMemberRequest {
            tenant_id: T.into(),
            phone: "+77017900004".into(),
            referral_code: a.referral_code.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap();
    assert_eq!(referred.referred_by_member_id, c.member_id);

    // A blocked member's code refers nobody.
    pos.members
        .block_member(identity::BlockMemberRequest {
            tenant_id: T.into(),
            member_id: c.member_id.clone(),
            reason: "abuse".into(),
            actor: actor("fraud:aliya"),
        })
        .await
        .unwrap();
    let refused = pos
        .members
        .register_member(identity::RegisterMemberRequest {
            tenant_id: T.into(),
            phone: "+77017900005".into(),
            referral_code: c.referral_code.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert_eq!(violations(&refused)[0].0, "referral_code");

    // Erasing C erases what A and B brought: their phones and emails register anew.
    pos.members
        .erase_member(identity::EraseMemberRequest {
            tenant_id: T.into(),
            member_id: c.member_id.clone(),
            actor: actor("dpo:marat"),
        })
        .await
        .unwrap();
    let listed = pos
        .members
        .list_members(identity::ListMembersRequest {
            tenant_id: T.into(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .members;
    for id in [&a.member_id, &b.member_id] {
        let m = listed.iter().find(|m| &m.member_id == id).unwrap();
        assert!(
            m.phone.is_empty() && m.email.is_empty() && m.first_name.is_empty(),
            "{m:?}"
        );
        assert_eq!(m.status, identity::MemberStatus::Merged as i32);
    }
    for phone in ["+77017900001", "+77017900002", "+77017900003"] {
        let err = lookup(&mut pos, Key::Phone(phone.into()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{phone}: {err:?}");
    }
    let again = register(&mut pos, "+77017900001", "a.chain@example.kz")
        .await
        .unwrap();
    assert_ne!(again.member_id, a.member_id);
    assert_eq!(server.stop().await, 0);
}
