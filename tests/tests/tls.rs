//! TLS on the listener and between services, and callers named by client certificates,
//! through the real binary: a one-process server and a split deployment whose processes
//! call each other over mutual TLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loyalty_e2e::pki::{Ca, ExtendedKeyUsagePurpose, write};
use loyalty_e2e::{Launch, Server, command, create_key};
use loyalty_proto::balance::v1 as bpb;
use loyalty_proto::identity::v1 as ipb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The id inside a key `lk_<id>_<secret>`.
fn key_id(key: &str) -> &str {
    key.split('_').nth(1).unwrap()
}

/// A TLS channel to `server` trusting `ca`, presenting `client` when given.
async fn tls_channel(
    server: &Server,
    ca: &str,
    client: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{}", server.addr))?
        .tls_config(tls)?
        .connect()
        .await
}

fn with_key<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(key) = key {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    r
}

async fn list_keys(channel: &Channel, key: Option<&str>, tenant: &str) -> Result<usize, Code> {
    ipb::access_service_client::AccessServiceClient::new(channel.clone())
        .list_api_keys(with_key(
            ipb::ListApiKeysRequest {
                tenant_id: tenant.into(),
                ..Default::default()
            },
            key,
        ))
        .await
        .map(|r| r.into_inner().api_keys.len())
        .map_err(|s| s.code())
}

#[tokio::test]
async fn the_listener_speaks_tls_and_client_certificates_name_keys() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin = create_key(&data, &["--role", "admin", "--tenant", "acme"]).await;
    let ca = Ca::new("loyalty test CA");
    let (cert, key) = ca.issue("localhost");
    let launch = Launch::dev()
        .env("LOYALTY_AUTH__MODE", "required")
        .env(
            "LOYALTY_TLS__CERT_FILE",
            write(dir.path(), "server.pem", &cert).to_str().unwrap(),
        )
        .env(
            "LOYALTY_TLS__KEY_FILE",
            write(dir.path(), "server.key", &key).to_str().unwrap(),
        )
        .env(
            "LOYALTY_TLS__CLIENT_CA_FILE",
            write(dir.path(), "ca.pem", &ca.pem).to_str().unwrap(),
        )
        .env("LOYALTY_SERVER__HEALTH_LISTEN", "127.0.0.1:0")
        .env("LOYALTY_SERVER__METRICS_LISTEN", "127.0.0.1:0")
        .env("LOYALTY_TLS__METRICS", "true");
    let server = Server::start(launch, &data).await;

    // Plain text gets no answer from a TLS listener.
    let plain = server.channel().await;
    assert!(list_keys(&plain, Some(&admin), "acme").await.is_err());

    // TLS without a certificate: the key decides, as before.
    let anonymous = tls_channel(&server, &ca.pem, None).await.unwrap();
    assert_eq!(list_keys(&anonymous, Some(&admin), "acme").await, Ok(1));
    assert_eq!(
        list_keys(&anonymous, None, "acme").await,
        Err(Code::Unauthenticated)
    );

    // A certificate naming the admin key's id acts as that key, with no secret sent; the
    // key's tenant still binds it.
    let as_admin = ca.issue(key_id(&admin));
    let certified = tls_channel(&server, &ca.pem, Some(&as_admin))
        .await
        .unwrap();
    assert_eq!(list_keys(&certified, None, "acme").await, Ok(1));
    assert_eq!(
        list_keys(&certified, None, "other").await,
        Err(Code::PermissionDenied)
    );
    // A key sent over the same connection decides: a wrong one is not rescued by the
    // certificate.
    assert_eq!(
        list_keys(&certified, Some("lk_0123456789abcdef_nope"), "acme").await,
        Err(Code::Unauthenticated)
    );
    // The `lk_` form of the id works too.
    let prefixed = ca.issue(&format!("lk_{}", key_id(&admin)));
    let prefixed = tls_channel(&server, &ca.pem, Some(&prefixed))
        .await
        .unwrap();
    assert_eq!(list_keys(&prefixed, None, "acme").await, Ok(1));

    // A POS key's certificate gets the POS role: no key management.
    let created = ipb::access_service_client::AccessServiceClient::new(certified.clone())
        .create_api_key(with_key(
            ipb::CreateApiKeyRequest {
                tenant_id: "acme".into(),
                role: ipb::Role::Pos as i32,
                store_id: "s1".into(),
                name: "till 1".into(),
                ..Default::default()
            },
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    let pos_id = created.api_key.unwrap().key_id;
    let till = tls_channel(&server, &ca.pem, Some(&ca.issue(&pos_id)))
        .await
        .unwrap();
    assert_eq!(
        list_keys(&till, None, "acme").await,
        Err(Code::PermissionDenied)
    );

    // A certificate naming no key, or an unknown one, is refused; so is a certificate from
    // another authority, at the handshake.
    let nameless = tls_channel(&server, &ca.pem, Some(&ca.issue("till-7")))
        .await
        .unwrap();
    assert_eq!(
        list_keys(&nameless, None, "acme").await,
        Err(Code::Unauthenticated)
    );
    let unknown = tls_channel(&server, &ca.pem, Some(&ca.issue("0123456789abcdef")))
        .await
        .unwrap();
    assert_eq!(
        list_keys(&unknown, None, "acme").await,
        Err(Code::Unauthenticated)
    );
    let stranger = Ca::new("someone else");
    let forged = stranger.issue(key_id(&admin));
    let refused = match tls_channel(&server, &ca.pem, Some(&forged)).await {
        Err(_) => true,
        Ok(channel) => list_keys(&channel, None, "acme").await.is_err(),
    };
    assert!(refused, "a certificate from another CA was accepted");

    // Revoking the key ends its certificate's access.
    ipb::access_service_client::AccessServiceClient::new(certified.clone())
        .revoke_api_key(with_key(
            ipb::RevokeApiKeyRequest {
                tenant_id: "acme".into(),
                key_id: pos_id,
            },
            None,
        ))
        .await
        .unwrap();
    assert_eq!(
        list_keys(&till, None, "acme").await.unwrap_err(),
        Code::Unauthenticated
    );

    // Probes that cannot speak TLS ask the plain health port.
    let health_addr = server.health_addr.clone().expect("a health listener");
    let health = Channel::from_shared(format!("http://{health_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = tonic_health::pb::health_client::HealthClient::new(health)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let health = Channel::from_shared(format!("http://{health_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(
        list_keys(&health, Some(&admin), "acme").await,
        Err(Code::Unimplemented),
        "the health port serves health alone"
    );

    // The command line reaches the TLS listener with the CA.
    let mut args: Vec<String> = [
        "export",
        "--addr",
        &format!(
            "https://localhost:{}",
            server.addr.rsplit(':').next().unwrap()
        ),
        "--tenant",
        "acme",
        "--kind",
        "member_features",
        "--ca",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(dir.path().join("ca.pem").display().to_string());
    args.extend(["--out".into(), dir.path().join("out").display().to_string()]);
    let out = command(&args, &[("LOYALTY_API_KEY".into(), admin.clone())])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The metrics listener speaks TLS too (`tls.metrics`), and counted the calls above.
    let url = server.metrics_url.clone().unwrap();
    let hostport = url
        .strip_prefix("https://")
        .expect("metrics over https")
        .trim_end_matches("/metrics")
        .to_string();
    let scrape = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut plain_scrape = tokio::net::TcpStream::connect(&hostport).await.unwrap();
    plain_scrape.write_all(scrape).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        plain_scrape.read_to_end(&mut reply),
    )
    .await;
    assert!(!String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 200"));
    let connector = {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca.pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
    };
    let tcp = tokio::net::TcpStream::connect(&hostport).await.unwrap();
    let mut tls_scrape = connector
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    tls_scrape.write_all(scrape).await.unwrap();
    let mut reply = Vec::new();
    let _ = tls_scrape.read_to_end(&mut reply).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("loyalty_"), "{reply}");

    assert_eq!(server.stop().await, 0);
}

#[tokio::test]
async fn a_split_deployment_calls_its_peers_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let admin = create_key(&a, &["--role", "admin", "--tenant", "acme"]).await;
    let service = create_key(&a, &["--role", "service"]).await;
    let ca = Ca::new("cluster CA");
    // As cert-manager issues them for pods that serve and call each other.
    let (cert, key) = ca.issue_for(
        "localhost",
        &[
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    );
    let tls = |launch: Launch| {
        launch
            .env("LOYALTY_AUTH__MODE", "required")
            .env("LOYALTY_AUTH__SERVICE_KEY", &service)
            .env("LOYALTY_AUTH__CACHE_TTL_SECS", "0")
            .env(
                "LOYALTY_TLS__CERT_FILE",
                write(dir.path(), "server.pem", &cert).to_str().unwrap(),
            )
            .env(
                "LOYALTY_TLS__KEY_FILE",
                write(dir.path(), "server.key", &key).to_str().unwrap(),
            )
            .env(
                "LOYALTY_TLS__CLIENT_CA_FILE",
                write(dir.path(), "ca.pem", &ca.pem).to_str().unwrap(),
            )
            .env("LOYALTY_TLS__REQUIRE_CLIENT_CERT", "true")
            .env(
                "LOYALTY_TLS__PEER_CA_FILE",
                dir.path().join("ca.pem").to_str().unwrap(),
            )
    };
    let identity = Server::start(tls(Launch::serve("identity")), &a).await;
    let port = identity.addr.rsplit(':').next().unwrap().to_string();
    let rest = Server::start(
        tls(Launch::serve("balance,promotion,segmentation,reporting")).env(
            "LOYALTY_PEERS__IDENTITY",
            &format!("https://localhost:{port}"),
        ),
        &dir.path().join("b"),
    )
    .await;

    // Without a client certificate the handshake is refused.
    let refused = match tls_channel(&identity, &ca.pem, None).await {
        Err(_) => true,
        Ok(channel) => list_keys(&channel, Some(&admin), "acme").await.is_err(),
    };
    assert!(refused, "a client without a certificate was served");

    // A till with a certificate for its POS key registers a member at identity and asks
    // the other process for the balance: that process checks the certificate's key with
    // identity over mutual TLS.
    let as_admin = ca.issue(key_id(&admin));
    let id_channel = tls_channel(&identity, &ca.pem, Some(&as_admin))
        .await
        .unwrap();
    let pos_id = ipb::access_service_client::AccessServiceClient::new(id_channel.clone())
        .create_api_key(with_key(
            ipb::CreateApiKeyRequest {
                tenant_id: "acme".into(),
                role: ipb::Role::Pos as i32,
                store_id: "s1".into(),
                name: "till".into(),
                ..Default::default()
            },
            None,
        ))
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap()
        .key_id;
    let till_cert = ca.issue(&pos_id);
    let till_at_identity = tls_channel(&identity, &ca.pem, Some(&till_cert))
        .await
        .unwrap();
    let member = ipb::member_service_client::MemberServiceClient::new(till_at_identity)
        .register_member(with_key(
            ipb::RegisterMemberRequest {
                tenant_id: "acme".into(),
                phone: "+77011234567".into(),
                ..Default::default()
            },
            None,
        ))
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap();
    let till = tls_channel(&rest, &ca.pem, Some(&till_cert)).await.unwrap();
    let balance = || {
        let (channel, member_id) = (till.clone(), member.member_id.clone());
        async move {
            bpb::balance_service_client::BalanceServiceClient::new(channel)
                .get_balance(with_key(
                    bpb::GetBalanceRequest {
                        tenant_id: "acme".into(),
                        member_id,
                    },
                    None,
                ))
                .await
        }
    };
    balance().await.unwrap();
    ipb::access_service_client::AccessServiceClient::new(id_channel)
        .revoke_api_key(with_key(
            ipb::RevokeApiKeyRequest {
                tenant_id: "acme".into(),
                key_id: pos_id,
            },
            None,
        ))
        .await
        .unwrap();
    assert_eq!(balance().await.unwrap_err().code(), Code::Unauthenticated);

    // `loyalty create-key --addr` reaches identity over mutual TLS, as a peer does.
    let launch = tls(Launch::default());
    let mut args: Vec<String> = ["create-key", "--addr"].map(String::from).to_vec();
    args.push(format!("https://localhost:{port}"));
    args.extend(["--role", "admin", "--tenant", "beta"].map(String::from));
    let out = command(&args, &launch.env).output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let beta_admin = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let beta = tls_channel(&identity, &ca.pem, Some(&as_admin))
        .await
        .unwrap();
    assert_eq!(list_keys(&beta, Some(&beta_admin), "beta").await, Ok(1));

    assert_eq!(rest.stop().await, 0);
    assert_eq!(identity.stop().await, 0);
}

#[tokio::test]
async fn tls_settings_that_cannot_work_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let garbled = write(dir.path(), "cert.pem", "not a certificate");
    let ca = Ca::new("test CA");
    let (cert, _) = ca.issue("localhost");
    let (_, other_key) = ca.issue("localhost");
    let cert = write(dir.path(), "server.pem", &cert);
    let other_key = write(dir.path(), "other.key", &other_key);
    for (env, expected) in [
        (
            vec![("LOYALTY_TLS__CERT_FILE", garbled.to_str().unwrap())],
            "`tls.cert_file` and `tls.key_file` must be set together",
        ),
        (
            vec![
                ("LOYALTY_TLS__CERT_FILE", garbled.to_str().unwrap()),
                ("LOYALTY_TLS__KEY_FILE", garbled.to_str().unwrap()),
            ],
            "is not a PEM file",
        ),
        (
            vec![
                ("LOYALTY_TLS__CERT_FILE", cert.to_str().unwrap()),
                ("LOYALTY_TLS__KEY_FILE", other_key.to_str().unwrap()),
            ],
            "do not make a TLS server",
        ),
        (
            vec![("LOYALTY_TLS__REQUIRE_CLIENT_CERT", "true")],
            "`tls.require_client_cert` needs `tls.client_ca_file`",
        ),
        (
            vec![("LOYALTY_TLS__METRICS", "true")],
            "`tls.metrics` needs `tls.cert_file`",
        ),
        (
            vec![
                ("LOYALTY_TLS__CERT_FILE", garbled.to_str().unwrap()),
                ("LOYALTY_TLS__KEY_FILE", garbled.to_str().unwrap()),
                ("LOYALTY_PEERS__IDENTITY", "http://127.0.0.1:1"),
            ],
            "`peers.identity` is http:// while `tls.cert_file` is set",
        ),
    ] {
        let mut args: Vec<String> = vec!["dev".into(), "--listen".into(), "127.0.0.1:0".into()];
        args.extend(["--data-dir".into(), dir.path().display().to_string()]);
        let env: Vec<(String, String)> = env
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let out = command(&args, &env).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {env:?}");
        assert!(stderr.contains(expected), "{env:?}: {stderr}");
    }
}
