//! API keys, for a target that checks them (`--api-key`).
//!
//! The operator's admin key provisions the tenant. It also makes the keys the traffic
//! presents, as a real chain's would: one POS key per store, for the tills, and app keys
//! for the busiest members, for balance lookups from the app. Those keys are made for one
//! run and revoked when it ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use loyalty_proto::identity::v1 as ipb;
use tonic::metadata::AsciiMetadataValue;

use crate::model::Model;
use crate::runner::{Clients, Service};

/// Who a call is made as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The operator's key: provisioning and coupon generation.
    Admin,
    /// The till of the store at this index.
    Pos(usize),
    /// The app of the member at this index; members without an app key ask at a till.
    App(usize),
}

/// The `authorization` values a run presents; empty when the target checks no keys.
#[derive(Debug, Default)]
pub struct Credentials {
    admin: Option<AsciiMetadataValue>,
    pos: Vec<AsciiMetadataValue>,
    /// By the model's member index.
    app: std::collections::HashMap<usize, AsciiMetadataValue>,
    /// Ids of the keys made for this run, to revoke at its end.
    made: Vec<String>,
}

fn bearer(key: &str) -> anyhow::Result<AsciiMetadataValue> {
    format!("Bearer {key}")
        .parse()
        .context("the API key is not a valid header value")
}

impl Credentials {
    /// Only the operator's admin key (before the run's own keys exist).
    pub fn admin(key: &str) -> anyhow::Result<Self> {
        Ok(Self {
            admin: Some(bearer(key)?),
            ..Self::default()
        })
    }

    /// The `authorization` value for `caller`.
    pub fn value(&self, caller: Caller) -> Option<&AsciiMetadataValue> {
        let pos = |store: usize| match self.pos.len() {
            0 => self.admin.as_ref(),
            n => self.pos.get(store % n),
        };
        match caller {
            Caller::Admin => self.admin.as_ref(),
            Caller::Pos(store) => pos(store),
            Caller::App(member) => self.app.get(&member).or_else(|| pos(member)),
        }
    }

    pub fn made(&self) -> usize {
        self.made.len()
    }
}

/// Makes this run's POS keys (one per store) and app keys (for the `app_keys` busiest
/// members, those the traffic picks most), `concurrency` at a time.
pub async fn provision(
    model: &Model,
    clients: &Clients,
    member_ids: &[String],
    app_keys: usize,
    concurrency: usize,
) -> anyhow::Result<Credentials> {
    let tenant = &model.config.tenant;
    let mut wanted: Vec<ipb::CreateApiKeyRequest> = model
        .stores
        .iter()
        .map(|store| ipb::CreateApiKeyRequest {
            tenant_id: tenant.clone(),
            role: ipb::Role::Pos as i32,
            store_id: store.id.clone(),
            name: format!("loyalty-loadtest till {}", store.id),
            ..Default::default()
        })
        .collect();
    let stores = wanted.len();
    let with_apps: Vec<usize> = model
        .busiest(app_keys)
        .iter()
        .copied()
        .filter(|&i| i < member_ids.len())
        .collect();
    wanted.extend(with_apps.iter().map(|&i| ipb::CreateApiKeyRequest {
        tenant_id: tenant.clone(),
        role: ipb::Role::App as i32,
        member_id: member_ids[i].clone(),
        name: "loyalty-loadtest app".into(),
        ..Default::default()
    }));
    let made =
        each(
            clients,
            wanted,
            concurrency,
            |clients, request| async move {
                let mut access = ipb::access_service_client::AccessServiceClient::new(
                    clients.channel(Service::Identity),
                );
                let reply = access
            .create_api_key(clients.request(request))
            .await
            .context("making the run's API keys (does --api-key name an admin key of the tenant?)")?
            .into_inner();
                let id = reply.api_key.map(|k| k.key_id).unwrap_or_default();
                Ok((id, bearer(&reply.secret)?))
            },
        )
        .await?;
    let mut credentials = Credentials {
        admin: clients.credentials().admin.clone(),
        ..Credentials::default()
    };
    for (i, (id, value)) in made.into_iter().enumerate() {
        credentials.made.push(id);
        if i < stores {
            credentials.pos.push(value);
        } else {
            credentials.app.insert(with_apps[i - stores], value);
        }
    }
    Ok(credentials)
}

/// Revokes the keys `provision` made; returns how many were revoked.
pub async fn revoke(model: &Model, clients: &Clients, concurrency: usize) -> anyhow::Result<usize> {
    let tenant = model.config.tenant.clone();
    let requests: Vec<ipb::RevokeApiKeyRequest> = clients
        .credentials()
        .made
        .iter()
        .map(|key_id| ipb::RevokeApiKeyRequest {
            tenant_id: tenant.clone(),
            key_id: key_id.clone(),
        })
        .collect();
    let revoked = each(
        clients,
        requests,
        concurrency,
        |clients, request| async move {
            let mut access = ipb::access_service_client::AccessServiceClient::new(
                clients.channel(Service::Identity),
            );
            access
                .revoke_api_key(clients.request(request))
                .await
                .context("revoking the run's API keys")?;
            Ok(())
        },
    )
    .await?;
    Ok(revoked.len())
}

/// Runs `call` on every item, `concurrency` at a time, as the admin; answers in order.
async fn each<I, O, F, Fut>(
    clients: &Clients,
    items: Vec<I>,
    concurrency: usize,
    call: F,
) -> anyhow::Result<Vec<O>>
where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(Clients, I) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<O>> + Send,
{
    let count = items.len();
    let items: Arc<Vec<std::sync::Mutex<Option<I>>>> = Arc::new(
        items
            .into_iter()
            .map(|i| std::sync::Mutex::new(Some(i)))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let call = Arc::new(call);
    let mut workers = Vec::new();
    for _ in 0..concurrency.clamp(1, count.max(1)) {
        let (clients, items, next, call) =
            (clients.clone(), items.clone(), next.clone(), call.clone());
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(slot) = items.get(i) else {
                    return Ok::<_, anyhow::Error>(done);
                };
                let item = slot.lock().ok().and_then(|mut s| s.take());
                if let Some(item) = item {
                    done.push((i, call(clients.clone(), item).await?));
                }
            }
        }));
    }
    let mut answers = Vec::with_capacity(count);
    for w in workers {
        answers.extend(w.await??);
    }
    answers.sort_by_key(|(i, _)| *i);
    Ok(answers.into_iter().map(|(_, o)| o).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_fall_back_to_a_till_then_to_the_admin() {
        let mut c = Credentials::admin("lk_admin").unwrap();
        assert_eq!(c.value(Caller::Pos(3)), c.admin.as_ref());
        c.pos = vec![bearer("p0").unwrap(), bearer("p1").unwrap()];
        c.app = [(7, bearer("a7").unwrap())].into();
        let shown = |caller| c.value(caller).unwrap().to_str().unwrap().to_string();
        assert_eq!(shown(Caller::Admin), "Bearer lk_admin");
        assert_eq!(shown(Caller::Pos(1)), "Bearer p1");
        assert_eq!(shown(Caller::Pos(3)), "Bearer p1");
        assert_eq!(shown(Caller::App(7)), "Bearer a7");
        assert_eq!(
            shown(Caller::App(2)),
            "Bearer p0",
            "no app key: asks at a till"
        );
        assert!(Credentials::default().value(Caller::Pos(0)).is_none());
    }
}
