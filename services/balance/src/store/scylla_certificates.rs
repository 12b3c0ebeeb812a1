//! Gift certificates on ScyllaDB, shared by every balance replica in production.
//!
//! Schema: `migrations/scylla/0002_gift_certificates.cql`. A certificate's state and the
//! records of its operations share one partition; a change is one logged batch conditional
//! on the state row's operation count and on the operation's record not existing yet (a
//! lightweight transaction), so concurrent spends of one certificate serialize and a retried
//! operation applies once. The rules are [`certificate::apply`], as on the embedded store.
//! An issue first claims its idempotency key for the tenant with the code it chose, so a
//! retry after a crash completes the same certificate instead of issuing another.

use std::sync::Arc;

use loyalty_platform::clock::Millis;
use loyalty_platform::embedded::{decode, encode};
use loyalty_platform::error::{Error, Result};
use loyalty_platform::scylla::{applied, execution_error, prepare, rows_error};
use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::CqlValue;

use super::embedded::key_reused;
use crate::certificate::{self, CertOp, CertRecord, Certificate, CertificateStore};

/// The record of the issue that created a certificate.
const ISSUE: i8 = 1;
/// The record of a spend or refund.
const RECORD: i8 = 2;
/// Conditional writes a change tries before giving up on a busy certificate.
const ATTEMPTS: usize = 32;

#[derive(Debug, Clone)]
pub struct ScyllaCertificates {
    session: Arc<Session>,
    s: Arc<Statements>,
}

#[derive(Debug)]
struct Statements {
    claim_issue: PreparedStatement,
    select_issue: PreparedStatement,
    release_issue: PreparedStatement,
    select_state: PreparedStatement,
    select_record: PreparedStatement,
    insert_state: PreparedStatement,
    update_state: PreparedStatement,
    insert_record: PreparedStatement,
}

impl ScyllaCertificates {
    /// Prepares every statement on `session` (whose keyspace is selected).
    pub async fn new(session: Arc<Session>) -> anyhow::Result<Self> {
        let statement = |cql: &'static str| prepare(&session, cql);
        let s = Statements {
            claim_issue: statement(
                "INSERT INTO gift_certificate_issues (tenant, key, code, fingerprint) \
                 VALUES (?, ?, ?, ?) IF NOT EXISTS",
            )
            .await?,
            select_issue: statement(
                "SELECT code, fingerprint FROM gift_certificate_issues \
                 WHERE tenant = ? AND key = ?",
            )
            .await?,
            release_issue: statement(
                "DELETE FROM gift_certificate_issues WHERE tenant = ? AND key = ? IF code = ?",
            )
            .await?,
            select_state: statement(
                "SELECT operations, body FROM gift_certificates \
                 WHERE tenant = ? AND code = ? AND kind = 0 AND key = ''",
            )
            .await?,
            select_record: statement(
                "SELECT body FROM gift_certificates \
                 WHERE tenant = ? AND code = ? AND kind = ? AND key = ?",
            )
            .await?,
            insert_state: statement(
                "INSERT INTO gift_certificates (tenant, code, kind, key, operations, body) \
                 VALUES (?, ?, 0, '', ?, ?) IF NOT EXISTS",
            )
            .await?,
            update_state: statement(
                "UPDATE gift_certificates SET operations = ?, body = ? \
                 WHERE tenant = ? AND code = ? AND kind = 0 AND key = '' IF operations = ?",
            )
            .await?,
            insert_record: statement(
                "INSERT INTO gift_certificates (tenant, code, kind, key, body) \
                 VALUES (?, ?, ?, ?, ?) IF NOT EXISTS",
            )
            .await?,
        };
        Ok(Self {
            session,
            s: Arc::new(s),
        })
    }

    /// The certificate and the operation count its row was written with.
    async fn state(&self, tenant: &str, code: &str) -> Result<Option<(i32, Certificate)>> {
        let row = self
            .session
            .execute_unpaged(&self.s.select_state, (tenant, code))
            .await
            .map_err(execution_error)?
            .into_rows_result()
            .map_err(rows_error)?
            .maybe_first_row::<(Option<i32>, Option<Vec<u8>>)>()
            .map_err(rows_error)?;
        match row {
            Some((operations, Some(body))) => Ok(Some((operations.unwrap_or(0), decode(&body)?))),
            _ => Ok(None),
        }
    }

    async fn record(
        &self,
        tenant: &str,
        code: &str,
        kind: i8,
        key: &str,
    ) -> Result<Option<CertRecord>> {
        let row = self
            .session
            .execute_unpaged(&self.s.select_record, (tenant, code, kind, key))
            .await
            .map_err(execution_error)?
            .into_rows_result()
            .map_err(rows_error)?
            .maybe_first_row::<(Option<Vec<u8>>,)>()
            .map_err(rows_error)?;
        row.and_then(|(b,)| b).map(|b| decode(&b)).transpose()
    }

    /// Claims issue key `key` of `tenant` for `code`; returns the code the key stands for
    /// (an earlier attempt's, on a retry), or refuses a key used for another issue.
    async fn claim_issue(
        &self,
        tenant: &str,
        key: &str,
        code: &str,
        fingerprint: &str,
    ) -> Result<String> {
        let result = self
            .session
            .execute_unpaged(&self.s.claim_issue, (tenant, key, code, fingerprint))
            .await
            .map_err(execution_error)?;
        if applied(result)? {
            return Ok(code.to_string());
        }
        let row = self
            .session
            .execute_unpaged(&self.s.select_issue, (tenant, key))
            .await
            .map_err(execution_error)?
            .into_rows_result()
            .map_err(rows_error)?
            .maybe_first_row::<(Option<String>, Option<String>)>()
            .map_err(rows_error)?;
        match row {
            Some((Some(claimed), Some(fp))) if fp == fingerprint => Ok(claimed),
            Some(_) => Err(key_reused(key)),
            None => Err(Error::Unavailable(format!(
                "issue key {key} changed while it was claimed; retry"
            ))),
        }
    }
}

#[async_trait::async_trait]
impl CertificateStore for ScyllaCertificates {
    async fn execute(
        &self,
        tenant_id: &str,
        code: &str,
        key: &str,
        fingerprint: &str,
        op: CertOp,
        now: Millis,
    ) -> Result<Certificate> {
        let issue = matches!(op, CertOp::Issue { .. });
        let (code, kind) = if issue {
            (
                self.claim_issue(tenant_id, key, code, fingerprint).await?,
                ISSUE,
            )
        } else {
            (code.to_string(), RECORD)
        };
        let mut attempt = 0usize;
        while attempt < ATTEMPTS {
            if let Some(r) = self.record(tenant_id, &code, kind, key).await? {
                return if r.fingerprint == fingerprint {
                    Ok(r.certificate)
                } else {
                    Err(key_reused(key))
                };
            }
            let current = self.state(tenant_id, &code).await?;
            let next = match certificate::apply(current.as_ref().map(|(_, c)| c), &code, &op, now) {
                Ok(next) => next,
                Err(e) => {
                    if issue && current.is_some() {
                        // The certificate exists. An attempt under this same key may have
                        // written it since the record was read: its batch wrote the record
                        // with the state, so the record says whose it is.
                        if let Some(r) = self.record(tenant_id, &code, kind, key).await? {
                            return if r.fingerprint == fingerprint {
                                Ok(r.certificate)
                            } else {
                                Err(key_reused(key))
                            };
                        }
                        // Another issue's code: the key claims nothing.
                        self.session
                            .execute_unpaged(&self.s.release_issue, (tenant_id, key, &code))
                            .await
                            .map_err(execution_error)?;
                    }
                    return Err(e);
                }
            };
            let record = CertRecord {
                fingerprint: fingerprint.to_string(),
                certificate: next.clone(),
            };
            let operations = i32::try_from(next.operations).unwrap_or(i32::MAX);
            let text = |s: &str| CqlValue::Text(s.to_string());
            let mut batch = Batch::new(BatchType::Logged);
            batch.set_consistency(Consistency::LocalQuorum);
            batch.set_serial_consistency(Some(SerialConsistency::LocalSerial));
            let mut values: Vec<Vec<CqlValue>> = Vec::new();
            match &current {
                None => {
                    batch.append_statement(self.s.insert_state.clone());
                    values.push(vec![
                        text(tenant_id),
                        text(&code),
                        CqlValue::Int(operations),
                        CqlValue::Blob(encode(&next)?),
                    ]);
                }
                Some((expected, _)) => {
                    batch.append_statement(self.s.update_state.clone());
                    values.push(vec![
                        CqlValue::Int(operations),
                        CqlValue::Blob(encode(&next)?),
                        text(tenant_id),
                        text(&code),
                        CqlValue::Int(*expected),
                    ]);
                }
            }
            batch.append_statement(self.s.insert_record.clone());
            values.push(vec![
                text(tenant_id),
                text(&code),
                CqlValue::TinyInt(kind),
                text(key),
                CqlValue::Blob(encode(&record)?),
            ]);
            let result = self
                .session
                .batch(&batch, values)
                .await
                .map_err(execution_error)?;
            if applied(result)? {
                return Ok(next);
            }
            // Another operation got there first: read again and decide on what it left,
            // after a short, growing pause so contenders spread out.
            attempt += 1;
            let spread = key
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
                % 4;
            let pause = (attempt as u64).min(10) * 2 + spread;
            tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        }
        Err(Error::Unavailable(format!(
            "certificate {code} kept changing; retry"
        )))
    }

    async fn get(&self, tenant_id: &str, code: &str) -> Result<Option<Certificate>> {
        Ok(self.state(tenant_id, code).await?.map(|(_, c)| c))
    }
}
