//! API keys: created, listed, rotated and revoked per tenant; verified on every call.
//!
//! A key reads `lk_<key id>_<secret>`: 64 random bits of public id, 256 of secret. Only the
//! secret's SHA-256 is stored, so a copy of the database lets nobody call the API.

use std::sync::Arc;

use loyalty_platform::access::{self, KeyVerifier, Principal, Role};
use loyalty_platform::clock::{Millis, SharedClock};
use loyalty_platform::error::{Error, Result, Violations};
use loyalty_platform::types::check_tenant;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::store::IdentityStore;

/// Longest key label.
pub const MAX_KEY_NAME_LEN: usize = 200;
/// Longest store or member id a key is bound to.
pub const MAX_BINDING_LEN: usize = 128;
/// Largest page of keys.
pub const MAX_KEYS_PAGE: usize = 1000;

/// One stored API key (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub key_id: String,
    /// Empty for service keys.
    pub tenant_id: String,
    pub role: Role,
    pub store_id: String,
    pub member_id: String,
    pub name: String,
    pub secret_hash: String,
    pub created_at: Millis,
    pub revoked_at: Option<Millis>,
    /// The key that made this one, or "cli".
    pub created_by: String,
    pub rotated_from: String,
}

impl ApiKey {
    pub fn principal(&self) -> Principal {
        Principal {
            key_id: self.key_id.clone(),
            role: self.role,
            tenant_id: self.tenant_id.clone(),
            store_id: self.store_id.clone(),
            member_id: self.member_id.clone(),
            all_tenants: self.role == Role::Service,
        }
    }
}

/// What a new key is for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewKey {
    pub tenant_id: String,
    pub role: Option<Role>,
    pub store_id: String,
    pub member_id: String,
    pub name: String,
}

/// Where a key comes from: the API (no service keys) or the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Issuer<'a> {
    Api { key_id: &'a str },
    CommandLine,
}

impl Issuer<'_> {
    fn name(&self) -> String {
        match self {
            Issuer::Api { key_id } => (*key_id).to_string(),
            Issuer::CommandLine => "cli".into(),
        }
    }
}

/// The key operations.
#[derive(Debug, Clone)]
pub struct Keys {
    store: Arc<dyn IdentityStore>,
    clock: SharedClock,
}

/// `bytes` random bytes from the OS-seeded generator, as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

impl Keys {
    pub fn new(store: Arc<dyn IdentityStore>, clock: SharedClock) -> Self {
        Self { store, clock }
    }

    /// Creates a key; returns it and the whole key to present, shown only now.
    pub async fn create(&self, new: NewKey, issuer: Issuer<'_>) -> Result<(ApiKey, String)> {
        let mut v = Violations::new();
        let role = new.role;
        match role {
            None => v.add("role", "is required: pos, app, admin, analyst or service"),
            Some(Role::Service) => {
                if matches!(issuer, Issuer::Api { .. }) {
                    v.add(
                        "role",
                        "service keys act for every tenant and are made with `loyalty create-key`",
                    );
                }
                v.check(
                    new.tenant_id.is_empty(),
                    "tenant_id",
                    "must be empty for a service key",
                );
            }
            Some(_) => check_tenant(&mut v, &new.tenant_id),
        }
        v.check(
            role == Some(Role::Pos) || new.store_id.is_empty(),
            "store_id",
            "binds POS keys only",
        );
        if role == Some(Role::Pos) {
            v.text(&new.store_id, "store_id", MAX_BINDING_LEN);
        }
        v.check(
            role == Some(Role::App) || new.member_id.is_empty(),
            "member_id",
            "binds app keys only",
        );
        if role == Some(Role::App) {
            // An app key acts for one member: a leaked key exposes that member alone.
            v.text(&new.member_id, "member_id", MAX_BINDING_LEN);
        }
        v.check(
            new.name.len() <= MAX_KEY_NAME_LEN,
            "name",
            format!("is longer than {MAX_KEY_NAME_LEN} bytes"),
        );
        v.finish()?;
        let role = role.ok_or_else(|| Error::invalid("role", "is required"))?;
        let key = ApiKey {
            key_id: random_hex(8),
            tenant_id: new.tenant_id,
            role,
            store_id: new.store_id,
            member_id: new.member_id,
            name: new.name,
            secret_hash: String::new(),
            created_at: self.clock.now_ms(),
            revoked_at: None,
            created_by: issuer.name(),
            rotated_from: String::new(),
        };
        self.issue(key, None).await
    }

    /// Stores `key` with a fresh secret (and `retire`, revoked, in the same write).
    async fn issue(&self, mut key: ApiKey, retire: Option<ApiKey>) -> Result<(ApiKey, String)> {
        let secret = random_hex(32);
        key.secret_hash = access::hash_secret(&secret);
        let whole = format!("{}{}_{secret}", access::KEY_PREFIX, key.key_id);
        let expect_live = retire.as_ref().map(|k| k.key_id.clone());
        let mut write = vec![key.clone()];
        write.extend(retire);
        if !self
            .store
            .save_api_keys(&write, expect_live.as_deref())
            .await?
        {
            return Err(Error::FailedPrecondition(
                "the key was revoked or rotated meanwhile".into(),
            ));
        }
        Ok((key, whole))
    }

    /// The tenant's key `key_id`, or NOT_FOUND (also for another tenant's key).
    async fn owned(&self, tenant_id: &str, key_id: &str) -> Result<ApiKey> {
        loyalty_platform::types::tenant(tenant_id)?;
        self.store
            .api_key(key_id)
            .await?
            .filter(|k| k.tenant_id == tenant_id)
            .ok_or_else(|| Error::NotFound(format!("no API key {key_id:?}")))
    }

    /// Replaces a live key with a new one of the same role and bindings.
    pub async fn rotate(
        &self,
        tenant_id: &str,
        key_id: &str,
        issuer: Issuer<'_>,
    ) -> Result<(ApiKey, String)> {
        let old = self.owned(tenant_id, key_id).await?;
        if old.revoked_at.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "API key {key_id:?} is revoked"
            )));
        }
        let now = self.clock.now_ms();
        let new = ApiKey {
            key_id: random_hex(8),
            secret_hash: String::new(),
            created_at: now,
            revoked_at: None,
            created_by: issuer.name(),
            rotated_from: old.key_id.clone(),
            ..old.clone()
        };
        let retired = ApiKey {
            revoked_at: Some(now),
            ..old
        };
        self.issue(new, Some(retired)).await
    }

    /// Revokes a key for good; revoking a revoked key changes nothing.
    pub async fn revoke(&self, tenant_id: &str, key_id: &str) -> Result<ApiKey> {
        let key = self.owned(tenant_id, key_id).await?;
        if key.revoked_at.is_some() {
            return Ok(key);
        }
        let revoked = ApiKey {
            revoked_at: Some(self.clock.now_ms()),
            ..key
        };
        if self
            .store
            .save_api_keys(std::slice::from_ref(&revoked), Some(key_id))
            .await?
        {
            Ok(revoked)
        } else {
            self.owned(tenant_id, key_id).await
        }
    }

    /// A page of the tenant's keys in key id order, after `page_token`.
    pub async fn list(
        &self,
        tenant_id: &str,
        include_revoked: bool,
        page_size: usize,
        page_token: &str,
    ) -> Result<(Vec<ApiKey>, String)> {
        loyalty_platform::types::tenant(tenant_id)?;
        let limit = match page_size {
            0 => 100,
            n => n.min(MAX_KEYS_PAGE),
        };
        let mut cursor = (!page_token.is_empty()).then(|| page_token.to_string());
        let mut out = Vec::new();
        // Revoked keys are skipped, so a page may take several reads.
        loop {
            let batch = self
                .store
                .api_keys(tenant_id, cursor.as_deref(), limit)
                .await?;
            let read = batch.len();
            for key in batch {
                cursor = Some(key.key_id.clone());
                if include_revoked || key.revoked_at.is_none() {
                    out.push(key);
                    if out.len() == limit {
                        return Ok((out, cursor.unwrap_or_default()));
                    }
                }
            }
            if read < limit {
                return Ok((out, String::new()));
            }
        }
    }

    /// Who presents `key`: `None` when it is malformed, unknown or revoked.
    pub async fn verify_key(&self, key: &str) -> Result<Option<ApiKey>> {
        let Some((key_id, secret)) = access::parse_key(key) else {
            return Ok(None);
        };
        let Some(stored) = self.store.api_key(key_id).await? else {
            return Ok(None);
        };
        let genuine = access::same_hash(&stored.secret_hash, &access::hash_secret(secret));
        Ok((genuine && stored.revoked_at.is_none()).then_some(stored))
    }

    /// The live key `key_id`, for a caller whose verified client certificate names it (no
    /// secret to check: the certificate authority vouched for the caller).
    pub async fn certified_key(&self, key_id: &str) -> Result<Option<ApiKey>> {
        if !access::is_key_id(key_id) {
            return Ok(None);
        }
        let stored = self.store.api_key(key_id).await?;
        // The service role spans every tenant: it is never granted on a certificate's word.
        Ok(stored.filter(|k| k.revoked_at.is_none() && k.role != Role::Service))
    }
}

#[async_trait::async_trait]
impl KeyVerifier for Keys {
    async fn verify(&self, key: &str) -> Result<Option<Principal>> {
        Ok(self.verify_key(key).await?.map(|k| k.principal()))
    }

    async fn verify_certified(&self, key_id: &str) -> Result<Option<Principal>> {
        Ok(self.certified_key(key_id).await?.map(|k| k.principal()))
    }
}
