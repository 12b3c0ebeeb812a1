//! The durable [`Ledger`] on ScyllaDB, under the Redis hot state in production.
//!
//! Schema: `migrations/scylla/` (applied by `loyalty migrate`). A member's state, entries
//! and records share one partition; a change is one logged batch conditional on the state
//! row's version and stamp (a lightweight transaction), so it lands whole or not at all,
//! and only on top of the state it was computed from. Statements are prepared once.
//! Values are encoded as in the embedded store.

use std::sync::Arc;

use loyalty_platform::clock::{DAY_MS, Millis};
use loyalty_platform::embedded::{decode, encode};
use loyalty_platform::error::Result;
use loyalty_platform::scylla::{Migration, applied, execution_error, prepare, rows_error};
use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::CqlValue;

use super::{Due, EntryQuery, Ledger, MAX_SCAN, Page};
use crate::ledger::{Account, Change, OpRecord};

/// The balance service's schema, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        service: "balance",
        version: 1,
        name: "ledger",
        cql: include_str!("../../migrations/scylla/0001_ledger.cql"),
    },
    Migration {
        service: "balance",
        version: 2,
        name: "gift_certificates",
        cql: include_str!("../../migrations/scylla/0002_gift_certificates.cql"),
    },
];

const ENTRY: i8 = 1;
const RECORD: i8 = 2;
/// How far back the expiry process looks for due members.
const DUE_LOOKBACK_DAYS: i64 = 31;

#[derive(Debug, Clone)]
pub struct ScyllaLedger {
    session: Arc<Session>,
    s: Arc<Statements>,
}

#[derive(Debug)]
struct Statements {
    insert_state: PreparedStatement,
    update_state: PreparedStatement,
    insert_row: PreparedStatement,
    insert_own_record: PreparedStatement,
    select_record: PreparedStatement,
    select_state: PreparedStatement,
    select_entries: PreparedStatement,
    select_members: PreparedStatement,
    select_members_after: PreparedStatement,
    insert_due: PreparedStatement,
    select_due: PreparedStatement,
    delete_due: PreparedStatement,
}

fn seq_id(seq: i64) -> String {
    format!("{:020}", seq.max(0))
}

fn day(at: Millis) -> i64 {
    at.div_euclid(DAY_MS)
}

impl ScyllaLedger {
    /// Prepares every statement on `session` (whose keyspace is selected).
    pub async fn new(session: Arc<Session>) -> anyhow::Result<Self> {
        let statement = |cql: &'static str| prepare(&session, cql);
        let s = Statements {
            insert_state: statement(
                "INSERT INTO balance_ledger (tenant, member, kind, id, version, stamp, body) \
                 VALUES (?, ?, 0, '', ?, ?, ?) IF NOT EXISTS",
            )
            .await?,
            update_state: statement(
                "UPDATE balance_ledger SET version = ?, stamp = ?, body = ? \
                 WHERE tenant = ? AND member = ? AND kind = 0 AND id = '' \
                 IF version = ? AND stamp = ?",
            )
            .await?,
            insert_row: statement(
                "INSERT INTO balance_ledger (tenant, member, kind, id, body) VALUES (?, ?, ?, ?, ?)",
            )
            .await?,
            insert_own_record: statement(
                "INSERT INTO balance_ledger (tenant, member, kind, id, body) VALUES (?, ?, 2, ?, ?) \
                 IF NOT EXISTS",
            )
            .await?,
            select_record: statement(
                "SELECT body FROM balance_ledger \
                 WHERE tenant = ? AND member = ? AND kind = 2 AND id = ?",
            )
            .await?,
            select_state: statement(
                "SELECT version, body FROM balance_ledger \
                 WHERE tenant = ? AND member = ? AND kind = 0 AND id = ''",
            )
            .await?,
            select_entries: statement(
                "SELECT body FROM balance_ledger \
                 WHERE tenant = ? AND member = ? AND kind = 1 AND id < ? LIMIT ?",
            )
            .await?,
            select_members: statement(
                "SELECT DISTINCT tenant, member FROM balance_ledger LIMIT ?",
            )
            .await?,
            select_members_after: statement(
                "SELECT DISTINCT tenant, member FROM balance_ledger \
                 WHERE token(tenant, member) > token(?, ?) LIMIT ?",
            )
            .await?,
            insert_due: statement(
                "INSERT INTO balance_due (day, due, tenant, member) VALUES (?, ?, ?, ?)",
            )
            .await?,
            select_due: statement(
                "SELECT due, tenant, member FROM balance_due WHERE day = ? AND due <= ? LIMIT ?",
            )
            .await?,
            delete_due: statement(
                "DELETE FROM balance_due WHERE day = ? AND due = ? AND tenant = ? AND member = ?",
            )
            .await?,
        };
        Ok(Self {
            session,
            s: Arc::new(s),
        })
    }

    async fn state(&self, tenant: &str, member: &str) -> Result<Option<(i64, Account)>> {
        let row = self
            .session
            .execute_unpaged(&self.s.select_state, (tenant, member))
            .await
            .map_err(execution_error)?
            .into_rows_result()
            .map_err(rows_error)?
            .maybe_first_row::<(Option<i64>, Option<Vec<u8>>)>()
            .map_err(rows_error)?;
        match row {
            Some((version, Some(body))) => Ok(Some((version.unwrap_or(0), decode(&body)?))),
            _ => Ok(None),
        }
    }
}

#[async_trait::async_trait]
impl Ledger for ScyllaLedger {
    async fn commit(
        &self,
        tenant_id: &str,
        member_id: &str,
        expected: i64,
        change: &Change,
    ) -> Result<bool> {
        // The schedule first: a due row for a change that then fails only costs the expiry
        // process a no-op.
        if let Some(at) = change.account.next_due() {
            // Filed no earlier than the operation's day, so the expiry process's look-back
            // (from its own clock) finds even a lot that was already due when it was written.
            self.session
                .execute_unpaged(
                    &self.s.insert_due,
                    (day(at).max(day(change.at)), at, tenant_id, member_id),
                )
                .await
                .map_err(execution_error)?;
        }
        let mut batch = Batch::new(BatchType::Logged);
        batch.set_consistency(Consistency::LocalQuorum);
        batch.set_serial_consistency(Some(SerialConsistency::LocalSerial));
        let state = encode(&change.account)?;
        let mut values: Vec<Vec<CqlValue>> = Vec::new();
        let text = |s: &str| CqlValue::Text(s.to_string());
        if expected == 0 {
            batch.append_statement(self.s.insert_state.clone());
            values.push(vec![
                text(tenant_id),
                text(member_id),
                CqlValue::BigInt(change.account.version),
                text(&change.account.stamp),
                CqlValue::Blob(state),
            ]);
        } else {
            batch.append_statement(self.s.update_state.clone());
            values.push(vec![
                CqlValue::BigInt(change.account.version),
                text(&change.account.stamp),
                CqlValue::Blob(state),
                text(tenant_id),
                text(member_id),
                CqlValue::BigInt(expected),
                text(&change.prev_stamp),
            ]);
        }
        for entry in &change.entries {
            batch.append_statement(self.s.insert_row.clone());
            values.push(vec![
                text(tenant_id),
                text(member_id),
                CqlValue::TinyInt(ENTRY),
                text(&seq_id(entry.seq)),
                CqlValue::Blob(encode(entry)?),
            ]);
        }
        for (key, record) in &change.records {
            if *key == change.key {
                // Conditional too: a change whose own record the ledger already holds (hot
                // state that lost its records) must not apply twice.
                batch.append_statement(self.s.insert_own_record.clone());
                values.push(vec![
                    text(tenant_id),
                    text(member_id),
                    text(key),
                    CqlValue::Blob(encode(record)?),
                ]);
            } else {
                batch.append_statement(self.s.insert_row.clone());
                values.push(vec![
                    text(tenant_id),
                    text(member_id),
                    CqlValue::TinyInt(RECORD),
                    text(key),
                    CqlValue::Blob(encode(record)?),
                ]);
            }
        }
        let result = self
            .session
            .batch(&batch, values)
            .await
            .map_err(execution_error)?;
        applied(result)
    }

    async fn record(
        &self,
        tenant_id: &str,
        member_id: &str,
        key: &str,
    ) -> Result<Option<OpRecord>> {
        let row = self
            .session
            .execute_unpaged(&self.s.select_record, (tenant_id, member_id, key))
            .await
            .map_err(execution_error)?
            .into_rows_result()
            .map_err(rows_error)?
            .maybe_first_row::<(Vec<u8>,)>()
            .map_err(rows_error)?;
        row.map(|(b,)| decode(&b)).transpose()
    }

    async fn version(&self, tenant_id: &str, member_id: &str) -> Result<i64> {
        Ok(self
            .state(tenant_id, member_id)
            .await?
            .map_or(0, |(v, _)| v))
    }

    async fn load_account(&self, tenant_id: &str, member_id: &str) -> Result<Account> {
        Ok(self
            .state(tenant_id, member_id)
            .await?
            .map(|(_, a)| a)
            .unwrap_or_default())
    }

    async fn members(
        &self,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<(String, String)>> {
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let result = match &after {
            Some((tenant, member)) => {
                self.session
                    .execute_unpaged(
                        &self.s.select_members_after,
                        (tenant.as_str(), member.as_str(), limit),
                    )
                    .await
            }
            None => {
                self.session
                    .execute_unpaged(&self.s.select_members, (limit,))
                    .await
            }
        }
        .map_err(execution_error)?;
        let rows = result.into_rows_result().map_err(rows_error)?;
        rows.rows::<(String, String)>()
            .map_err(rows_error)?
            .map(|r| r.map_err(rows_error))
            .collect()
    }

    async fn entries(&self, tenant_id: &str, member_id: &str, query: &EntryQuery) -> Result<Page> {
        let filtered = !query.reasons.is_empty() || query.from.is_some() || query.until.is_some();
        // One row past the scan bound, so a filtered page that stops there gets its token.
        let fetch = if filtered { MAX_SCAN + 1 } else { query.limit };
        let before = seq_id(query.before_seq.unwrap_or(i64::MAX));
        let rows = self
            .session
            .execute_unpaged(
                &self.s.select_entries,
                (
                    tenant_id,
                    member_id,
                    before,
                    i32::try_from(fetch).unwrap_or(i32::MAX),
                ),
            )
            .await
            .map_err(execution_error)?
            .into_rows_result()
            .map_err(rows_error)?;
        let bodies: Vec<(Vec<u8>,)> = rows
            .rows::<(Vec<u8>,)>()
            .map_err(rows_error)?
            .collect::<std::result::Result<_, _>>()
            .map_err(rows_error)?;
        query.page(bodies.into_iter().map(|(b,)| decode(&b)))
    }

    async fn due(&self, now: Millis, limit: usize) -> Result<Vec<Due>> {
        let mut out = Vec::new();
        for d in (day(now) - DUE_LOOKBACK_DAYS)..=day(now) {
            if out.len() >= limit {
                break;
            }
            let left = i32::try_from(limit - out.len()).unwrap_or(i32::MAX);
            let rows = self
                .session
                .execute_unpaged(&self.s.select_due, (d, now, left))
                .await
                .map_err(execution_error)?
                .into_rows_result()
                .map_err(rows_error)?;
            for row in rows.rows::<(i64, String, String)>().map_err(rows_error)? {
                let (at, tenant, member) = row.map_err(rows_error)?;
                out.push(Due {
                    at,
                    tenant,
                    member,
                    bucket: d,
                });
            }
        }
        Ok(out)
    }

    async fn done_due(&self, due: &Due) -> Result<()> {
        self.session
            .execute_unpaged(
                &self.s.delete_due,
                (
                    // Where `due` found it, which is later than `day(at)` for a lot written
                    // when it was already due.
                    due.bucket,
                    due.at,
                    due.tenant.as_str(),
                    due.member.as_str(),
                ),
            )
            .await
            .map_err(execution_error)?;
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        self.session
            .query_unpaged("SELECT now() FROM system.local", ())
            .await
            .map_err(execution_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use loyalty_platform::config::ScyllaConfig;
    use loyalty_platform::redis_server::RedisServer;

    use super::*;
    use crate::store::redis::RedisBalanceStore;

    /// The conformance suite on Redis over a real ScyllaDB node, when `LOYALTY_TEST_SCYLLA`
    /// names one (`host:port`). Each run uses a fresh keyspace.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_on_a_real_node() {
        let Ok(node) = std::env::var("LOYALTY_TEST_SCYLLA") else {
            eprintln!("LOYALTY_TEST_SCYLLA is not set: the ScyllaDB conformance run is skipped");
            return;
        };
        let config = ScyllaConfig {
            nodes: vec![node],
            keyspace: format!("loyalty_test_{}", std::process::id()),
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
            ..ScyllaConfig::default()
        };
        loyalty_platform::scylla::migrate(&config, MIGRATIONS)
            .await
            .unwrap();
        let session = loyalty_platform::scylla::connect(&config).await.unwrap();
        let ledger = Arc::new(ScyllaLedger::new(session.clone()).await.unwrap());
        let server = RedisServer::start().unwrap();
        let store = RedisBalanceStore::connect(&server.url(), ledger).unwrap();
        let store = Arc::new(store);
        crate::store::conformance::run_all(store.clone()).await;
        crate::store::conformance::filtered_pages_past_the_scan_bound(store).await;
        let certificates = crate::store::scylla_certificates::ScyllaCertificates::new(session)
            .await
            .unwrap();
        crate::store::conformance::certificates(Arc::new(certificates)).await;
    }
}
