//! Card lifecycle through the real binary: pre-printed ranges imported in bulk, no-name cards
//! bound at the POS, blocking (refused at the POS with the reason) and replacement (the
//! member, and so the balance, follow to the new card).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use identity::lookup_member_request::Key;
use loyalty_e2e::*;
use loyalty_proto::identity::v1 as identity;

fn fields(status: &tonic::Status) -> Vec<String> {
    violations(status).into_iter().map(|(f, _)| f).collect()
}

async fn lookup(pos: &mut Pos, tenant: &str, card: &str) -> Result<String, tonic::Status> {
    pos.members
        .lookup_member(identity::LookupMemberRequest {
            tenant_id: tenant.into(),
            key: Some(Key::CardNumber(card.into())),
            default_region: String::new(),
        })
        .await
        .map(|r| r.into_inner().member.unwrap().member_id)
}

fn range(kind: identity::CardKind, first: &str, last: &str) -> identity::ImportCardRangeRequest {
    identity::ImportCardRangeRequest {
        tenant_id: "t1".into(),
        kind: kind as i32,
        first_number: first.into(),
        last_number: last.into(),
    }
}

#[tokio::test]
async fn ranges_binding_blocking_and_replacement() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    setup_tenant(&channel, "t1").await;
    let mut pos = Pos::new(&channel, &channel);
    use identity::CardKind::{NoName, Plastic, Virtual};

    // Ranges import once; an overlapping import adds only what is new.
    let created =
        |r: tonic::Response<identity::ImportCardRangeResponse>| r.into_inner().cards_created;
    let first = pos
        .cards
        .import_card_range(range(NoName, "70000000", "70000099"))
        .await;
    assert_eq!(created(first.unwrap()), 100);
    let overlap = pos
        .cards
        .import_card_range(range(NoName, "70000050", "70000149"))
        .await;
    assert_eq!(created(overlap.unwrap()), 50);
    let plastic = pos
        .cards
        .import_card_range(range(Plastic, "0080000000", "0080000009"))
        .await;
    assert_eq!(created(plastic.unwrap()), 10, "leading zeros are kept");

    // Bad ranges are refused, naming the field, and create nothing.
    for (request, field) in [
        (range(Virtual, "70000000", "70000001"), "kind"),
        (range(NoName, "7000000", "70000001"), "first_number"),
        (range(NoName, "70000000", "700000001"), "last_number"),
        (range(NoName, "70000009", "70000001"), "last_number"),
        (range(NoName, "1000000000", "1000100000"), "last_number"),
        (range(NoName, "7000000x", "70000001"), "first_number"),
    ] {
        let err = pos.cards.import_card_range(request).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(fields(&err).contains(&field.to_string()), "{err:?}");
    }
    let err = pos
        .cards
        .get_card(identity::GetCardRequest {
            tenant_id: "t1".into(),
            number: "1000000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // An unbound card is not usable at the POS until it is bound.
    let err = lookup(&mut pos, "t1", "70000001").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("not bound"), "{err:?}");

    let (member, _) = pos.member_with_card("t1", "+77015550001").await;
    let (other, _) = pos.member_with_card("t1", "+77015550002").await;
    let bind = |number: &str, member: &str| identity::BindCardRequest {
        tenant_id: "t1".into(),
        number: number.into(),
        member_id: member.into(),
    };
    let bound = pos
        .cards
        .bind_card(bind("70000001", &member))
        .await
        .unwrap()
        .into_inner();
    let bound = bound.card.unwrap();
    assert_eq!(bound.status, identity::CardStatus::Active as i32);
    assert_eq!(bound.member_id, member);
    assert_eq!(lookup(&mut pos, "t1", "70000001").await.unwrap(), member);
    // Binding again to the same member is a no-op; to another member it is refused.
    let again = pos
        .cards
        .bind_card(bind("70000001", &member))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.card.unwrap(), bound);
    let err = pos
        .cards
        .bind_card(bind("70000001", &other))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    let err = pos
        .cards
        .bind_card(bind("79999999", &member))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let err = pos
        .cards
        .bind_card(bind("70000002", "nobody"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");

    // Issuing a pre-printed plastic card from an imported range binds it.
    let issued = pos
        .cards
        .issue_card(identity::IssueCardRequest {
            tenant_id: "t1".into(),
            member_id: other.clone(),
            kind: Plastic as i32,
            number: "0080000003".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap();
    assert_eq!(
        (issued.member_id.as_str(), issued.kind),
        (other.as_str(), Plastic as i32)
    );

    // Points earned with the card.
    let reply = pos
        .commit(receipt(
            "t1",
            "R-1",
            Some("70000001"),
            vec![line("1", "boots", "1", "100.00", false)],
        ))
        .await
        .unwrap();
    let earned = reply.points_balance;
    assert!(earned > 0);

    // Blocking needs a reason; a blocked card is refused at the POS with it.
    let block = |reason: identity::BlockReason| identity::BlockCardRequest {
        tenant_id: "t1".into(),
        number: "70000001".into(),
        reason: reason as i32,
        actor: None,
    };
    let err = pos
        .cards
        .block_card(block(identity::BlockReason::Unspecified))
        .await
        .unwrap_err();
    assert_eq!(fields(&err), ["reason"]);
    let blocked = pos
        .cards
        .block_card(block(identity::BlockReason::Lost))
        .await
        .unwrap();
    let blocked = blocked.into_inner().card.unwrap();
    assert_eq!(blocked.status, identity::CardStatus::Blocked as i32);
    assert_eq!(blocked.block_reason, identity::BlockReason::Lost as i32);
    let again = pos
        .cards
        .block_card(block(identity::BlockReason::Stolen))
        .await
        .unwrap();
    assert_eq!(
        again.into_inner().card.unwrap(),
        blocked,
        "blocking twice changes nothing"
    );
    let err = lookup(&mut pos, "t1", "70000001").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("blocked (lost)"), "{err:?}");
    let err = pos
        .commit(receipt(
            "t1",
            "R-2",
            Some("70000001"),
            vec![line("1", "boots", "1", "100.00", false)],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("blocked"), "{err:?}");
    let err = pos
        .cards
        .bind_card(bind("70000001", &member))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    // Replacing the lost card with a pre-printed one: the member and the balance follow.
    let replace = |old: &str, new: &str| identity::ReplaceCardRequest {
        tenant_id: "t1".into(),
        old_number: old.into(),
        new_number: new.into(),
        actor: None,
    };
    let pair = pos
        .cards
        .replace_card(replace("70000001", "70000002"))
        .await
        .unwrap()
        .into_inner();
    let (old, new) = (pair.old_card.unwrap(), pair.new_card.unwrap());
    assert_eq!(old.status, identity::CardStatus::Replaced as i32);
    assert_eq!(old.replaced_by_number, "70000002");
    assert_eq!(
        (new.status, new.member_id.as_str()),
        (identity::CardStatus::Active as i32, member.as_str())
    );
    assert_eq!(lookup(&mut pos, "t1", "70000002").await.unwrap(), member);
    let err = lookup(&mut pos, "t1", "70000001").await.unwrap_err();
    assert!(
        err.message().contains("replaced by card 70000002"),
        "{err:?}"
    );
    assert_eq!(pos.balance("t1", &member).await.active, earned);
    // A retry answers the same pair; another new number for the same old card is refused.
    let retry = pos
        .cards
        .replace_card(replace("70000001", "70000002"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (retry.old_card.unwrap(), retry.new_card.unwrap()),
        (old, new.clone())
    );
    let err = pos
        .cards
        .replace_card(replace("70000001", "70000003"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    // A card in use is not a replacement; an unbound card has nothing to replace.
    let err = pos
        .cards
        .replace_card(replace("70000002", "0080000003"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    let err = pos
        .cards
        .replace_card(replace("70000010", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    // With no new number the replacement is a virtual card.
    let pair = pos
        .cards
        .replace_card(replace("70000002", ""))
        .await
        .unwrap()
        .into_inner();
    let virtual_card = pair.new_card.unwrap();
    assert_eq!(virtual_card.kind, Virtual as i32);
    assert_eq!(
        lookup(&mut pos, "t1", &virtual_card.number).await.unwrap(),
        member
    );
    let reply = pos
        .commit(receipt(
            "t1",
            "R-3",
            Some(&virtual_card.number),
            vec![line("1", "boots", "1", "100.00", false)],
        ))
        .await
        .unwrap();
    assert!(
        reply.points_balance > earned,
        "the new card earns on the same account"
    );

    // The member's cards list all of it.
    let cards = pos
        .members
        .get_member(identity::GetMemberRequest {
            tenant_id: "t1".into(),
            member_id: member.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .cards;
    let mut numbers: Vec<&str> = cards.iter().map(|c| c.number.as_str()).collect();
    numbers.sort_unstable();
    assert!(
        numbers.contains(&"70000001") && numbers.contains(&"70000002"),
        "{numbers:?}"
    );
    assert_eq!(server.stop().await, 0);
}
