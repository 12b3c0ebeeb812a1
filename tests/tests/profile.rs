//! Member profiles and consents through the real binary: partial updates by field mask,
//! questionnaire completeness from the configured fields, consents per channel with time and
//! source, and "contactable" derived from them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loyalty_e2e::*;
use loyalty_proto::common::v1::Date;
use loyalty_proto::identity::v1 as identity;

fn fields(status: &tonic::Status) -> Vec<String> {
    violations(status).into_iter().map(|(f, _)| f).collect()
}

fn update(
    member_id: &str,
    member: identity::Member,
    mask: &[&str],
) -> identity::UpdateProfileRequest {
    identity::UpdateProfileRequest {
        tenant_id: "t1".into(),
        member_id: member_id.into(),
        member: Some(member),
        update_mask: mask.iter().map(|s| (*s).to_string()).collect(),
    }
}

fn consent(channel: identity::ConsentChannel, granted: bool, source: &str) -> identity::Consent {
    identity::Consent {
        channel: channel as i32,
        granted,
        recorded_at: None,
        source: source.into(),
    }
}

#[tokio::test]
async fn profiles_and_consents() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    let mut pos = Pos::new(&channel, &channel);
    let registered = pos
        .members
        .register_member(identity::RegisterMemberRequest {
            tenant_id: "t1".into(),
            phone: "+77017770001".into(),
            first_name: "Aigerim".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap();
    let id = registered.member_id.clone();
    assert!(!registered.contactable && !registered.questionnaire_complete);

    // Only the masked fields change; the questionnaire (names, gender, birthday) completes.
    let changes = identity::Member {
        last_name: "Sadykova".into(),
        first_name: "ignored: not in the mask".into(),
        gender: identity::Gender::Female as i32,
        birthday: Some(Date {
            year: 1990,
            month: 2,
            day: 28,
        }),
        email: "Aigerim@Example.KZ".into(),
        attributes: [("shoe_size".to_string(), "37".to_string())].into(),
        ..Default::default()
    };
    let updated = pos
        .members
        .update_profile(update(
            &id,
            changes.clone(),
            &["last_name", "gender", "birthday", "email", "attributes"],
        ))
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap();
    assert_eq!(updated.first_name, "Aigerim");
    assert_eq!(updated.last_name, "Sadykova");
    assert_eq!(updated.email, "aigerim@example.kz");
    assert_eq!(
        updated.birthday,
        Some(Date {
            year: 1990,
            month: 2,
            day: 28
        })
    );
    assert_eq!(
        updated.attributes.get("shoe_size").map(String::as_str),
        Some("37")
    );
    assert!(updated.questionnaire_complete);

    // Bad updates name the field and change nothing.
    let bad_cases: Vec<(identity::Member, Vec<&str>, &str)> = vec![
        (
            identity::Member {
                email: "not-an-email".into(),
                ..Default::default()
            },
            vec!["email"],
            "member.email",
        ),
        (
            identity::Member {
                birthday: Some(Date {
                    year: 2023,
                    month: 2,
                    day: 30,
                }),
                ..Default::default()
            },
            vec!["birthday"],
            "member.birthday",
        ),
        (identity::Member::default(), vec!["phone"], "update_mask"),
        (identity::Member::default(), vec![], "update_mask"),
        (
            identity::Member {
                attributes: (0..51)
                    .map(|i| (format!("k{i}"), "v".to_string()))
                    .collect(),
                ..Default::default()
            },
            vec!["attributes"],
            "member.attributes",
        ),
        (
            identity::Member {
                last_name: "x".repeat(101),
                ..Default::default()
            },
            vec!["last_name"],
            "member.last_name",
        ),
    ];
    for (member, mask, field) in bad_cases {
        let err = pos
            .members
            .update_profile(update(&id, member, &mask))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(
            fields(&err).contains(&field.to_string()),
            "{field}: {err:?}"
        );
    }
    let err = pos
        .members
        .update_profile(update("nobody", changes, &["last_name"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Consents per channel, with time and source; contactable follows them.
    use identity::ConsentChannel::{Email, Messenger, Sms, Unspecified};
    let set = |consents: Vec<identity::Consent>| identity::SetConsentsRequest {
        tenant_id: "t1".into(),
        member_id: id.clone(),
        consents,
    };
    let member = pos
        .members
        .set_consents(set(vec![
            consent(Sms, true, "pos"),
            consent(Email, false, "app"),
        ]))
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap();
    assert!(member.contactable);
    assert_eq!(member.consents.len(), 2);
    assert!(member.consents.iter().all(|c| c.recorded_at.is_some()));
    assert_eq!(member.consents[0].source, "pos");
    for (consents, field) in [
        (
            vec![consent(Sms, true, "pos"), consent(Sms, false, "pos")],
            "consents[1].channel",
        ),
        (
            vec![consent(Unspecified, true, "pos")],
            "consents[0].channel",
        ),
        (
            vec![consent(Messenger, true, &"s".repeat(33))],
            "consents[0].source",
        ),
        (vec![], "consents"),
    ] {
        let err = pos.members.set_consents(set(consents)).await.unwrap_err();
        assert!(
            fields(&err).contains(&field.to_string()),
            "{field}: {err:?}"
        );
    }
    let member = pos
        .members
        .set_consents(set(vec![consent(Sms, false, "call-center")]))
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap();
    assert!(!member.contactable, "withdrawn: {member:?}");
    assert_eq!(member.consents[0].source, "call-center");

    // Lookups show the whole profile.
    let looked_up = pos
        .members
        .lookup_member(identity::LookupMemberRequest {
            tenant_id: "t1".into(),
            key: Some(identity::lookup_member_request::Key::Phone(
                "+77017770001".into(),
            )),
            default_region: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap();
    assert_eq!(looked_up.last_name, "Sadykova");
    assert_eq!(looked_up.consents.len(), 2);
    assert!(looked_up.questionnaire_complete);
    assert_eq!(server.stop().await, 0);
}

#[tokio::test]
async fn the_questionnaire_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        Launch::dev().env("LOYALTY_IDENTITY__QUESTIONNAIRE", r#"["email"]"#),
        dir.path(),
    )
    .await;
    let channel = server.channel().await;
    let mut pos = Pos::new(&channel, &channel);
    let member = pos
        .members
        .register_member(identity::RegisterMemberRequest {
            tenant_id: "t1".into(),
            phone: "+77017770002".into(),
            email: "a@b.kz".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap();
    assert!(
        member.questionnaire_complete,
        "email is all this tenant asks"
    );
    assert_eq!(server.stop().await, 0);

    let out = command(
        &["config".into()],
        &[(
            "LOYALTY_IDENTITY__QUESTIONNAIRE".into(),
            r#"["shoe_size"]"#.into(),
        )],
    )
    .output()
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("identity.questionnaire"));
}
