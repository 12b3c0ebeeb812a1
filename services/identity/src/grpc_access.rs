//! The thin gRPC adapter of API key management (`AccessService`).

use loyalty_platform::access::{self, Role, caller};
use loyalty_platform::grpc::{timestamp, to_status};
use loyalty_proto::identity::v1 as pb;
use pb::access_service_server::{AccessService, AccessServiceServer};
use tonic::{Request, Response, Status};

use crate::keys::{ApiKey, Issuer, Keys, NewKey};

pub const SERVICE_NAME: &str = "loyalty.identity.v1.AccessService";

/// The key management service, with message size limits.
pub fn server(keys: Keys, max_message_bytes: usize) -> AccessServiceServer<AccessApi> {
    AccessServiceServer::new(AccessApi(keys))
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes)
}

#[derive(Debug, Clone)]
pub struct AccessApi(Keys);

pub fn role_to_proto(role: Role) -> pb::Role {
    match role {
        Role::Pos => pb::Role::Pos,
        Role::App => pb::Role::App,
        Role::Admin => pb::Role::Admin,
        Role::Analyst => pb::Role::Analyst,
        Role::Service => pb::Role::Service,
    }
}

pub fn role_from_proto(role: i32) -> Option<Role> {
    match pb::Role::try_from(role).ok()? {
        pb::Role::Unspecified => None,
        pb::Role::Pos => Some(Role::Pos),
        pb::Role::App => Some(Role::App),
        pb::Role::Admin => Some(Role::Admin),
        pb::Role::Analyst => Some(Role::Analyst),
        pb::Role::Service => Some(Role::Service),
    }
}

pub fn key_to_proto(k: &ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        key_id: k.key_id.clone(),
        tenant_id: k.tenant_id.clone(),
        role: role_to_proto(k.role) as i32,
        store_id: k.store_id.clone(),
        member_id: k.member_id.clone(),
        name: k.name.clone(),
        created_at: Some(timestamp(k.created_at)),
        revoked_at: k.revoked_at.map(timestamp),
        created_by: k.created_by.clone(),
        rotated_from: k.rotated_from.clone(),
    }
}

#[tonic::async_trait]
impl AccessService for AccessApi {
    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let by = caller(&request)?.key_id.clone();
        let r = request.into_inner();
        let (key, secret) = self
            .0
            .create(
                NewKey {
                    tenant_id: r.tenant_id,
                    role: role_from_proto(r.role),
                    store_id: r.store_id,
                    member_id: r.member_id,
                    name: r.name,
                },
                Issuer::Api { key_id: &by },
            )
            .await
            .map_err(to_status)?;
        tracing::info!(key_id = %key.key_id, role = %key.role, created_by = %by, "API key created");
        Ok(Response::new(pb::CreateApiKeyResponse {
            api_key: Some(key_to_proto(&key)),
            secret,
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let r = request.into_inner();
        let page_size = usize::try_from(r.page_size)
            .map_err(|_| Status::invalid_argument("page_size must not be negative"))?;
        let (keys, next) = self
            .0
            .list(&r.tenant_id, r.include_revoked, page_size, &r.page_token)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListApiKeysResponse {
            api_keys: keys.iter().map(key_to_proto).collect(),
            next_page_token: next,
        }))
    }

    async fn rotate_api_key(
        &self,
        request: Request<pb::RotateApiKeyRequest>,
    ) -> Result<Response<pb::RotateApiKeyResponse>, Status> {
        let by = caller(&request)?.key_id.clone();
        let r = request.into_inner();
        let (key, secret) = self
            .0
            .rotate(&r.tenant_id, &r.key_id, Issuer::Api { key_id: &by })
            .await
            .map_err(to_status)?;
        tracing::info!(key_id = %key.key_id, rotated_from = %key.rotated_from, created_by = %by, "API key rotated");
        Ok(Response::new(pb::RotateApiKeyResponse {
            api_key: Some(key_to_proto(&key)),
            secret,
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let by = caller(&request)?.key_id.clone();
        let r = request.into_inner();
        let key = self
            .0
            .revoke(&r.tenant_id, &r.key_id)
            .await
            .map_err(to_status)?;
        tracing::info!(key_id = %key.key_id, revoked_by = %by, "API key revoked");
        Ok(Response::new(pb::RevokeApiKeyResponse {
            api_key: Some(key_to_proto(&key)),
        }))
    }

    async fn verify_api_key(
        &self,
        request: Request<pb::VerifyApiKeyRequest>,
    ) -> Result<Response<pb::VerifyApiKeyResponse>, Status> {
        let r = request.into_inner();
        if r.key.len() > 256 {
            return Err(Status::invalid_argument("key is longer than 256 bytes"));
        }
        let key = if r.key.is_empty() && !r.certified_key_id.is_empty() {
            if !access::is_key_id(&r.certified_key_id) {
                return Err(Status::invalid_argument(
                    "certified_key_id must be a key id: 16 lowercase hex digits",
                ));
            }
            self.0.certified_key(&r.certified_key_id).await
        } else {
            self.0.verify_key(&r.key).await
        }
        .map_err(to_status)?;
        Ok(Response::new(pb::VerifyApiKeyResponse {
            api_key: key.as_ref().map(key_to_proto),
        }))
    }
}
