//! Authentication and authorization through the real binary: API keys made by the command
//! line and the API, every RPC walked for every role, every RPC tried against another
//! tenant, keys rotated and revoked, and a split deployment checking keys over gRPC.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::{Buf, BufMut};
use loyalty_e2e::{Launch, Server, command, create_key, with_key};
use loyalty_platform::access::{Policy, Role};
use loyalty_proto::identity::v1 as ipb;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Passes encoded messages through untouched, to call any RPC by its path.
#[derive(Debug, Clone, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A message holding only `value` at the field path `path` (nested messages outermost
/// first).
fn at(path: &[u32], value: &str) -> Vec<u8> {
    let mut inner = value.as_bytes().to_vec();
    for field in path.iter().rev() {
        let mut wrapped = Vec::new();
        varint(u64::from(*field) << 3 | 2, &mut wrapped);
        varint(inner.len() as u64, &mut wrapped);
        wrapped.extend(inner);
        inner = wrapped;
    }
    inner
}

/// Calls `path` with one message and `key`; the status the call ended with (OK included).
async fn call(channel: &Channel, path: &str, message: Vec<u8>, key: Option<&str>) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(futures_util::stream::iter([message]));
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    let answer = grpc.streaming(request, path.parse().unwrap(), Raw).await;
    match answer {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            match stream.message().await {
                Err(status) => status,
                Ok(_) => Status::ok(""),
            }
        }
    }
}

async fn api_key(
    channel: &Channel,
    admin: &str,
    role: ipb::Role,
    store: &str,
    member: &str,
) -> (String, String) {
    let reply = ipb::access_service_client::AccessServiceClient::new(channel.clone())
        .create_api_key(with_key(
            ipb::CreateApiKeyRequest {
                tenant_id: "acme".into(),
                role: role as i32,
                store_id: store.into(),
                member_id: member.into(),
                name: format!("{role:?}"),
            },
            admin,
        ))
        .await
        .unwrap()
        .into_inner();
    (reply.api_key.unwrap().key_id, reply.secret)
}

struct Keys {
    by_role: Vec<(Role, String)>,
}

/// A request a caller of `role` would send to `rule`'s RPC: its tenant, and its store or
/// member where the key is bound to one.
fn request_for(rule: &loyalty_platform::access::MethodRule, role: Role, tenant: &str) -> Vec<u8> {
    let mut m = Vec::new();
    if let Some(p) = &rule.tenant {
        m.extend(at(p, tenant));
    }
    if role == Role::Pos
        && let Some(p) = &rule.store
    {
        m.extend(at(p, "s1"));
    }
    if role == Role::App
        && let Some(p) = &rule.member
    {
        m.extend(at(p, "m1"));
    }
    m
}

#[tokio::test]
async fn every_rpc_admits_exactly_its_roles_and_only_the_callers_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin = create_key(&data, &["--role", "admin", "--tenant", "acme"]).await;
    let service = create_key(&data, &["--role", "service"]).await;
    let server = Server::start(
        Launch::dev()
            .env("LOYALTY_AUTH__MODE", "required")
            .env("LOYALTY_AUTH__SERVICE_KEY", &service),
        &data,
    )
    .await;
    assert!(server.log_text().contains("authentication is on"));
    let channel = server.channel().await;
    let (_, pos) = api_key(&channel, &admin, ipb::Role::Pos, "s1", "").await;
    let (_, app) = api_key(&channel, &admin, ipb::Role::App, "", "m1").await;
    let (_, analyst) = api_key(&channel, &admin, ipb::Role::Analyst, "", "").await;
    let keys = Keys {
        by_role: vec![
            (Role::Pos, pos.clone()),
            (Role::App, app),
            (Role::Admin, admin.clone()),
            (Role::Analyst, analyst),
            (Role::Service, service.clone()),
        ],
    };

    let policy = Policy::loyalty().unwrap();
    let mut walked = 0;
    for (path, rule) in policy.rules() {
        for (role, key) in &keys.by_role {
            let status = call(&channel, path, request_for(rule, *role, "acme"), Some(key)).await;
            if rule.roles.contains(role) {
                assert!(
                    !matches!(
                        status.code(),
                        Code::PermissionDenied | Code::Unauthenticated
                    ),
                    "{role} must be let into {path}: {status:?}"
                );
            } else {
                assert_eq!(
                    status.code(),
                    Code::PermissionDenied,
                    "{role} on {path}: {status:?}"
                );
                assert!(status.message().contains("may not call"), "{status:?}");
            }
            walked += 1;
        }
        // Another tenant, named by a caller bound to "acme": refused before any handler.
        if let (Some(_), Some((role, key))) = (
            &rule.tenant,
            keys.by_role
                .iter()
                .find(|(r, _)| rule.roles.contains(r) && *r != Role::Service),
        ) {
            let status = call(&channel, path, request_for(rule, *role, "rival"), Some(key)).await;
            assert_eq!(
                status.code(),
                Code::PermissionDenied,
                "{role} on {path} for rival: {status:?}"
            );
            assert!(status.message().contains("tenant \"rival\""), "{status:?}");
        }
        // No key at all, or a made-up one.
        let status = call(&channel, path, request_for(rule, Role::Admin, "acme"), None).await;
        assert_eq!(status.code(), Code::Unauthenticated, "{path}");
        let forged = format!("lk_{}_{}", "0".repeat(16), "1".repeat(64));
        let status = call(&channel, path, Vec::new(), Some(&forged)).await;
        assert_eq!(status.code(), Code::Unauthenticated, "{path}");
    }
    assert_eq!(walked, policy.rules().count() * 5);

    // A till of store s1 may not act for store s2; an app key for m1 not for m2.
    let quote = ipb::GetMemberRequest {
        tenant_id: "acme".into(),
        member_id: "m2".into(),
    };
    let status = ipb::member_service_client::MemberServiceClient::new(channel.clone())
        .get_member(with_key(quote, &keys.by_role[1].1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let rule = policy
        .rule("/loyalty.promotion.v1.CheckoutService/Quote")
        .unwrap();
    let mut other_store = at(rule.tenant.as_ref().unwrap(), "acme");
    other_store.extend(at(rule.store.as_ref().unwrap(), "s2"));
    let status = call(
        &channel,
        "/loyalty.promotion.v1.CheckoutService/Quote",
        other_store,
        Some(&pos),
    )
    .await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("store \"s2\""), "{status:?}");

    // Arrow Flight names the tenant in its ticket: the handler checks it.
    let ticket = |tenant: &str| {
        arrow_flight::Ticket::new(format!(
            "{{\"tenant_id\":\"{tenant}\",\"kind\":\"member_features\"}}"
        ))
    };
    let analyst = &keys.by_role[3].1;
    let mut flight = arrow_flight::FlightClient::new(channel.clone());
    flight
        .add_header("authorization", &format!("Bearer {analyst}"))
        .unwrap();
    let denied = flight.do_get(ticket("rival")).await.err().unwrap();
    assert!(
        matches!(&denied, arrow_flight::error::FlightError::Tonic(s) if s.code() == Code::PermissionDenied),
        "{denied:?}"
    );
    assert!(flight.do_get(ticket("acme")).await.is_ok());
    let mut flight = arrow_flight::FlightClient::new(channel.clone());
    flight
        .add_header("authorization", &format!("Bearer {pos}"))
        .unwrap();
    let denied = flight.do_get(ticket("acme")).await.err().unwrap();
    assert!(
        matches!(&denied, arrow_flight::error::FlightError::Tonic(s) if s.code() == Code::PermissionDenied),
        "a till exports nothing: {denied:?}"
    );
    assert_eq!(server.stop().await, 0);
}

#[tokio::test]
async fn keys_are_listed_without_secrets_rotated_and_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin = create_key(
        &data,
        &["--role", "admin", "--tenant", "acme", "--name", "boot"],
    )
    .await;
    let rival = create_key(&data, &["--role", "admin", "--tenant", "rival"]).await;
    let server = Server::start(Launch::dev().env("LOYALTY_AUTH__MODE", "required"), &data).await;
    let channel = server.channel().await;
    let mut access = ipb::access_service_client::AccessServiceClient::new(channel.clone());
    let (pos_id, pos) = api_key(&channel, &admin, ipb::Role::Pos, "s1", "").await;

    // Bad requests write nothing: a POS key needs its store; service keys are not made here.
    for (role, store) in [
        (ipb::Role::Pos, ""),
        (ipb::Role::Service, ""),
        (ipb::Role::Unspecified, ""),
        (ipb::Role::App, ""),
    ] {
        let status = access
            .create_api_key(with_key(
                ipb::CreateApiKeyRequest {
                    tenant_id: "acme".into(),
                    role: role as i32,
                    store_id: store.into(),
                    ..Default::default()
                },
                &admin,
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{role:?}: {status:?}");
    }
    let list_client = access.clone();
    let list = |include_revoked: bool| {
        let mut access = list_client.clone();
        let admin = admin.clone();
        async move {
            access
                .list_api_keys(with_key(
                    ipb::ListApiKeysRequest {
                        tenant_id: "acme".into(),
                        include_revoked,
                        ..Default::default()
                    },
                    &admin,
                ))
                .await
                .unwrap()
                .into_inner()
                .api_keys
        }
    };
    let listed = list(false).await;
    assert_eq!(listed.len(), 2, "the boot key and the till: {listed:?}");
    assert!(
        listed
            .iter()
            .any(|k| k.name == "boot" && k.created_by == "cli")
    );
    let till = listed.iter().find(|k| k.key_id == pos_id).unwrap();
    assert_eq!(
        (till.role, till.store_id.as_str()),
        (ipb::Role::Pos as i32, "s1")
    );
    let everything = format!("{listed:?}");
    assert!(
        !everything.contains(pos.rsplit('_').next().unwrap()),
        "no secret listed"
    );

    // Another tenant's admin neither sees nor touches acme's keys.
    let status = access
        .revoke_api_key(with_key(
            ipb::RevokeApiKeyRequest {
                tenant_id: "rival".into(),
                key_id: pos_id.clone(),
            },
            &rival,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // Rotation: the new key works, the old one stops at once.
    let rotated = access
        .rotate_api_key(with_key(
            ipb::RotateApiKeyRequest {
                tenant_id: "acme".into(),
                key_id: pos_id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let new = rotated.api_key.unwrap();
    assert_eq!(
        (new.rotated_from.as_str(), new.store_id.as_str()),
        (pos_id.as_str(), "s1")
    );
    let program = |key: String| {
        let channel = channel.clone();
        async move {
            loyalty_proto::promotion::v1::program_service_client::ProgramServiceClient::new(channel)
                .get_program(with_key(
                    loyalty_proto::promotion::v1::GetProgramRequest {
                        tenant_id: "acme".into(),
                    },
                    &key,
                ))
                .await
        }
    };
    assert_eq!(
        program(pos.clone()).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let fresh = rotated.secret;
    assert_ne!(
        program(fresh.clone()).await.map_err(|s| s.code()).err(),
        Some(Code::Unauthenticated)
    );
    assert_ne!(
        program(admin.clone()).await.map_err(|s| s.code()).err(),
        Some(Code::Unauthenticated)
    );
    access
        .revoke_api_key(with_key(
            ipb::RevokeApiKeyRequest {
                tenant_id: "acme".into(),
                key_id: new.key_id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap();
    assert_eq!(
        program(fresh).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(list(false).await.len(), 1);
    assert_eq!(list(true).await.len(), 3);
    assert_eq!(server.stop().await, 0);
}

/// Identity in one process, the rest in another: the second asks the first about keys with
/// the service key, and presents it on its own calls to identity.
#[tokio::test]
async fn a_split_deployment_checks_keys_with_identity() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let admin = create_key(&a, &["--role", "admin", "--tenant", "acme"]).await;
    let service = create_key(&a, &["--role", "service"]).await;
    let identity = Server::start(
        Launch::serve("identity")
            .env("LOYALTY_AUTH__MODE", "required")
            .env("LOYALTY_AUTH__SERVICE_KEY", &service),
        &a,
    )
    .await;
    let rest = Server::start(
        Launch::serve("balance,promotion,segmentation,reporting")
            .env("LOYALTY_AUTH__MODE", "required")
            .env("LOYALTY_AUTH__SERVICE_KEY", &service)
            .env("LOYALTY_AUTH__CACHE_TTL_SECS", "0")
            .env("LOYALTY_PEERS__IDENTITY", &identity.url()),
        &dir.path().join("b"),
    )
    .await;
    let id_channel = identity.channel().await;
    let (pos_id, pos) = api_key(&id_channel, &admin, ipb::Role::Pos, "s1", "").await;
    let member = ipb::member_service_client::MemberServiceClient::new(id_channel.clone())
        .register_member(with_key(
            ipb::RegisterMemberRequest {
                tenant_id: "acme".into(),
                phone: "+77011234567".into(),
                ..Default::default()
            },
            &pos,
        ))
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap();
    // The till asks balance (the other process) for the member's balance: verified over
    // gRPC with identity.
    let rest_channel = rest.channel().await;
    let balance = |key: String| {
        let (channel, member_id) = (rest_channel.clone(), member.member_id.clone());
        async move {
            loyalty_proto::balance::v1::balance_service_client::BalanceServiceClient::new(channel)
                .get_balance(with_key(
                    loyalty_proto::balance::v1::GetBalanceRequest {
                        tenant_id: "acme".into(),
                        member_id,
                    },
                    &key,
                ))
                .await
        }
    };
    balance(pos.clone()).await.unwrap();
    assert_eq!(
        balance("lk_nope".into()).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // Revoked at identity: refused by the other process too (no cache here).
    ipb::access_service_client::AccessServiceClient::new(id_channel)
        .revoke_api_key(with_key(
            ipb::RevokeApiKeyRequest {
                tenant_id: "acme".into(),
                key_id: pos_id,
            },
            &admin,
        ))
        .await
        .unwrap();
    assert_eq!(
        balance(pos).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(rest.stop().await, 0);
    assert_eq!(identity.stop().await, 0);
}

#[tokio::test]
async fn auth_cannot_be_off_off_loopback() {
    let out = command(
        &["config".into()],
        &[
            ("LOYALTY_AUTH__MODE".into(), "off".into()),
            ("LOYALTY_LISTEN".into(), "0.0.0.0:50051".into()),
        ],
    )
    .output()
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.mode"));
}

async fn list_keys(channel: &Channel, key: &str, tenant: &str) -> Result<(), Status> {
    ipb::access_service_client::AccessServiceClient::new(channel.clone())
        .list_api_keys(with_key(
            ipb::ListApiKeysRequest {
                tenant_id: tenant.into(),
                ..Default::default()
            },
            key,
        ))
        .await
        .map(|_| ())
}

#[tokio::test]
async fn callers_over_their_rate_get_resource_exhausted_with_a_retry_hint() {
    use tonic_types::StatusExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let acme = create_key(&data, &["--role", "admin", "--tenant", "acme"]).await;
    let acme_other = create_key(&data, &["--role", "admin", "--tenant", "acme"]).await;
    let beta = create_key(&data, &["--role", "admin", "--tenant", "beta"]).await;
    let beta_other = create_key(&data, &["--role", "admin", "--tenant", "beta"]).await;
    let server = Server::start(
        Launch::dev()
            .env("LOYALTY_AUTH__MODE", "required")
            .env("LOYALTY_RATE_LIMITS__PER_KEY", "5")
            .env("LOYALTY_RATE_LIMITS__BURST_SECS", "1")
            .env("LOYALTY_RATE_LIMITS__TENANTS__BETA", "3"),
        &data,
    )
    .await;
    let channel = server.channel().await;

    // One key: its burst of five, then refusals that say when to come back.
    let started = std::time::Instant::now();
    let (mut passed, mut refusal) = (0u32, None);
    for _ in 0..40 {
        match list_keys(&channel, &acme, "acme").await {
            Ok(()) => passed += 1,
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let refusal = refusal.expect("forty calls in a row were never limited");
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(
        f64::from(passed) <= 5.0 + (elapsed * 5.0).ceil(),
        "{passed} calls passed in {elapsed:.2} s at 5/s"
    );
    assert!(
        refusal.message().contains("for this API key"),
        "{}",
        refusal.message()
    );
    let retry = refusal
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("a RetryInfo detail");
    assert!(retry > std::time::Duration::ZERO && retry <= std::time::Duration::from_millis(201));
    // The tenant's other key has its own bucket (acme has no tenant limit).
    list_keys(&channel, &acme_other, "acme").await.unwrap();
    // Waiting as told lets the next call through.
    tokio::time::sleep(retry).await;
    list_keys(&channel, &acme, "acme").await.unwrap();

    // beta has a tenant limit of 3/s over all its keys.
    let (mut passed, mut refusal) = (0u32, None);
    let started = std::time::Instant::now();
    for i in 0..40 {
        let key = if i % 2 == 0 { &beta } else { &beta_other };
        match list_keys(&channel, key, "beta").await {
            Ok(()) => passed += 1,
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let refusal = refusal.expect("the tenant was never limited");
    assert_eq!(refusal.code(), Code::ResourceExhausted);
    assert!(
        refusal.message().contains("for this tenant (beta)"),
        "{}",
        refusal.message()
    );
    assert!(
        f64::from(passed) <= 3.0 + (elapsed * 3.0).ceil(),
        "{passed} calls passed in {elapsed:.2} s at 3/s"
    );
    assert_eq!(server.stop().await, 0);
}

/// A till reads and refunds only its own store's receipts: receipt ids are unique per
/// tenant, so without this a till could read or refund any store's purchase by its id.
#[tokio::test]
async fn a_till_reads_and_refunds_only_its_own_stores_receipts() {
    use loyalty_e2e::{Pos, line, receipt, setup_tenant};
    use loyalty_proto::promotion::v1 as ppb;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The tenant and a receipt at s1, set up with authentication off (loopback).
    let server = Server::start(Launch::dev(), &data).await;
    let channel = server.channel().await;
    setup_tenant(&channel, "acme").await;
    let mut pos = Pos::new(&channel, &channel);
    let (_, card) = pos.member_with_card("acme", "+77017300001").await;
    pos.commit(receipt(
        "acme",
        "R-1",
        Some(&card),
        vec![line("1", "boots", "2", "100.00", false)],
    ))
    .await
    .unwrap();
    assert_eq!(server.stop().await, 0);

    let own = create_key(
        &data,
        &["--role", "pos", "--tenant", "acme", "--store", "s1"],
    )
    .await;
    let other = create_key(
        &data,
        &["--role", "pos", "--tenant", "acme", "--store", "s2"],
    )
    .await;
    let server = Server::start(Launch::dev().env("LOYALTY_AUTH__MODE", "required"), &data).await;
    let mut checkout =
        ppb::checkout_service_client::CheckoutServiceClient::new(server.channel().await);
    let get = |key: &str| {
        with_key(
            ppb::GetPurchaseRequest {
                tenant_id: "acme".into(),
                receipt_id: "R-1".into(),
            },
            key,
        )
    };
    let refund = |key: &str| {
        with_key(
            ppb::RefundRequest {
                tenant_id: "acme".into(),
                receipt_id: "R-1".into(),
                refund_id: "F-1".into(),
                lines: vec![ppb::RefundLine {
                    line_id: "1".into(),
                    quantity: loyalty_e2e::dec("1"),
                }],
            },
            key,
        )
    };
    let denied = checkout.get_purchase(get(&other)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("\"s2\""), "{denied:?}");
    let denied = checkout.refund(refund(&other)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    // The refused refund wrote nothing; the receipt's own till reads and refunds it.
    let purchase = checkout
        .get_purchase(get(&own))
        .await
        .unwrap()
        .into_inner()
        .purchase
        .unwrap();
    assert!(purchase.refunds.is_empty());
    let refunded = checkout.refund(refund(&own)).await.unwrap().into_inner();
    assert_eq!(refunded.refund_id, "F-1");
    assert_eq!(server.stop().await, 0);
}
