//! `loyalty create-key`: the first API keys of a tenant, and the service key.

use std::sync::Arc;

use anyhow::Context;
use loyalty_identity::grpc_access::{key_to_proto, role_to_proto};
use loyalty_identity::keys::{Issuer, Keys};
use loyalty_platform::access::{self, Role};
use loyalty_platform::clock::SystemClock;
use loyalty_platform::config::{Config, ServiceStore};
use loyalty_proto::identity::v1 as pb;

/// What the command line asked for.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub role: String,
    pub tenant: String,
    pub store: String,
    pub member: String,
    pub name: String,
}

/// Creates the key and returns it whole (the only time it is shown).
pub async fn create(config: &Config, addr: Option<&str>, new: NewKey) -> anyhow::Result<String> {
    let role = Role::parse(&new.role).with_context(|| {
        format!(
            "--role {:?}: expected pos, app, admin, analyst or service",
            new.role
        )
    })?;
    if role == Role::Service {
        // The shared secret of our own processes: configured, never stored.
        let hex = loyalty_identity::keys::random_hex(32);
        eprintln!(
            "a service key: set it as auth.service_key (LOYALTY_AUTH__SERVICE_KEY) on every process"
        );
        return Ok(format!("{}service_{hex}", access::KEY_PREFIX));
    }
    let (key, whole) = match addr {
        Some(addr) => remote(config, addr, role, new).await?,
        None => local(config, role, new).await?,
    };
    eprintln!(
        "created API key {} (role {}, tenant {:?}); it is shown only now:",
        key.key_id,
        new_role_name(key.role),
        key.tenant_id
    );
    Ok(whole)
}

fn new_role_name(role: i32) -> &'static str {
    loyalty_identity::grpc_access::role_from_proto(role).map_or("?", Role::name)
}

async fn local(config: &Config, role: Role, new: NewKey) -> anyhow::Result<(pb::ApiKey, String)> {
    // Identity's own store: its file in the data directory (which only a stopped server
    // lets go of) or the Redis every identity replica shares.
    let store = crate::wiring::identity_store(config)
        .await
        .with_context(|| match config.identity.store {
            ServiceStore::Embedded => format!(
                "opening {} (stop the server first, or ask it with --addr)",
                config.data_dir.join("identity.redb").display()
            ),
            ServiceStore::Redis => "connecting to identity's Redis".to_string(),
        })?;
    let keys = Keys::new(store, Arc::new(SystemClock));
    let (key, whole) = keys
        .create(
            loyalty_identity::keys::NewKey {
                tenant_id: new.tenant,
                role: Some(role),
                store_id: new.store,
                member_id: new.member,
                name: new.name,
            },
            Issuer::CommandLine,
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((key_to_proto(&key), whole))
}

async fn remote(
    config: &Config,
    addr: &str,
    role: Role,
    new: NewKey,
) -> anyhow::Result<(pb::ApiKey, String)> {
    let service_key = config.auth.service_key.as_deref().context(
        "--addr needs `auth.service_key` (LOYALTY_AUTH__SERVICE_KEY): the identity service only makes keys for a service or an admin",
    )?;
    // Identity is asked as a peer is: an https address is checked against `tls.peer_ca_file`,
    // and presented this process's certificate when the deployment uses client certificates.
    let channel = loyalty_platform::tls::connect(
        addr,
        config.tls.peer_ca_file.as_deref(),
        loyalty_platform::tls::client_identity(&config.tls)?,
    )
    .await?;
    let mut client = pb::access_service_client::AccessServiceClient::new(channel);
    let mut request = tonic::Request::new(pb::CreateApiKeyRequest {
        tenant_id: new.tenant,
        role: role_to_proto(role) as i32,
        store_id: new.store,
        member_id: new.member,
        name: new.name,
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {service_key}")
            .parse()
            .context("the service key is not a valid header value")?,
    );
    let reply = client
        .create_api_key(request)
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        .into_inner();
    let key = reply.api_key.context("the server answered without a key")?;
    Ok((key, reply.secret))
}
