//! The balance store on the embedded database: state, entries, records and the expiry
//! schedule of one operation are written in one transaction, group-committed. The same
//! tables serve as the durable [`Ledger`] under the Redis backend.

use std::path::Path;

use loyalty_platform::clock::Millis;
use loyalty_platform::embedded::{
    EmbeddedDb, Records, decode, get_record, key, open_for_read, put_record, read_record,
    storage_error as e,
};
use loyalty_platform::error::{Error, Result};
use redb::{ReadableTable, TableDefinition, WriteTransaction};

use super::{BalanceStore, Due, EntryQuery, Ledger, Page, PendingCommit};
use crate::ledger::{self, Account, Change, Op, OpRecord};

/// Everything of one member, adjacent so one change dirties as few pages as possible:
/// - tenant, member, `a`: the account;
/// - tenant, member, `e`, sequence number as 20 digits (byte order is numeric order): an
///   entry;
/// - tenant, member, `o`, idempotency key: an operation record.
const MEMBERS: Records = TableDefinition::new("members");
/// Key: tenant, code (the certificate); tenant, code, key (an operation's record); tenant,
/// NUL-prefixed issue key (an issue's record, scoped to the tenant because an issue may
/// generate its code).
const CERTIFICATES: Records = TableDefinition::new("certificates");
/// Key: due time as 20 digits, tenant, member. Value: empty.
const DUE: Records = TableDefinition::new("due");

#[derive(Debug, Clone)]
pub struct EmbeddedBalanceStore {
    db: EmbeddedDb,
}

impl EmbeddedBalanceStore {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            db: EmbeddedDb::open(path)?,
        })
    }
}

fn account_key(tenant: &str, member: &str) -> String {
    key(&[tenant, member, "a"])
}

fn seq_key(tenant: &str, member: &str, seq: i64) -> String {
    key(&[tenant, member, "e", &format!("{:020}", seq.max(0))])
}

fn record_key(tenant: &str, member: &str, op: &str) -> String {
    key(&[tenant, member, "o", op])
}

fn due_key(at: Millis, tenant: &str, member: &str) -> String {
    key(&[&format!("{:020}", at.max(0)), tenant, member])
}

/// Writes one applied change: state, entries, records and the expiry schedule.
fn write_change(
    txn: &WriteTransaction,
    tenant: &str,
    member: &str,
    before: &Account,
    change: &Change,
) -> Result<()> {
    let mut members = txn.open_table(MEMBERS).map_err(e)?;
    put_record(&mut members, &account_key(tenant, member), &change.account)?;
    for entry in &change.entries {
        put_record(&mut members, &seq_key(tenant, member, entry.seq), entry)?;
    }
    for (k, record) in &change.records {
        put_record(&mut members, &record_key(tenant, member, k), record)?;
    }
    let (old, new) = (before.next_due(), change.account.next_due());
    if old != new {
        let mut due = txn.open_table(DUE).map_err(e)?;
        if let Some(at) = old {
            due.remove(due_key(at, tenant, member).as_str())
                .map_err(e)?;
        }
        if let Some(at) = new {
            due.insert(due_key(at, tenant, member).as_str(), [].as_slice())
                .map_err(e)?;
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl BalanceStore for EmbeddedBalanceStore {
    async fn execute(
        &self,
        tenant_id: &str,
        member_id: &str,
        op_key: &str,
        op: Op,
        now: Millis,
    ) -> Result<Option<OpRecord>> {
        // Bad input is refused as such, even under a key used before (as on Redis).
        crate::ledger::validate(&op)?;
        let (tenant, member, key_of_op) = (
            tenant_id.to_string(),
            member_id.to_string(),
            op_key.to_string(),
        );
        let fingerprint = if op.is_keyless() {
            String::new()
        } else {
            op.fingerprint()
        };
        self.db
            .write(move |txn| {
                let (stored, referenced, account) = {
                    let members = txn.open_table(MEMBERS).map_err(e)?;
                    let stored = if op.is_keyless() {
                        None
                    } else {
                        get_record::<OpRecord>(&members, &record_key(&tenant, &member, &key_of_op))?
                    };
                    let referenced = match ledger::referenced_key(&op) {
                        Some(k) => {
                            get_record::<OpRecord>(&members, &record_key(&tenant, &member, k))?
                        }
                        None => None,
                    };
                    let account: Option<Account> =
                        get_record(&members, &account_key(&tenant, &member))?;
                    (stored, referenced, account.unwrap_or_default())
                };
                if let Some(record) = stored {
                    if record.fingerprint == fingerprint {
                        return Ok(Some(record));
                    }
                    return Err(key_reused(&key_of_op));
                }
                let (change, record) = ledger::apply(
                    &account,
                    &key_of_op,
                    &fingerprint,
                    &op,
                    referenced.as_ref(),
                    now,
                )?;
                if change.account.version != account.version {
                    write_change(txn, &tenant, &member, &account, &change)?;
                }
                Ok(record)
            })
            .await
    }

    async fn account(&self, tenant_id: &str, member_id: &str) -> Result<Account> {
        let k = account_key(tenant_id, member_id);
        self.db
            .get(|txn| Ok(read_record(txn, MEMBERS, &k)?.unwrap_or_default()))
    }

    async fn record(
        &self,
        tenant_id: &str,
        member_id: &str,
        op_key: &str,
    ) -> Result<Option<OpRecord>> {
        let k = record_key(tenant_id, member_id, op_key);
        self.db.read(move |txn| read_record(txn, MEMBERS, &k)).await
    }

    async fn entries(&self, tenant_id: &str, member_id: &str, query: &EntryQuery) -> Result<Page> {
        Ledger::entries(self, tenant_id, member_id, query).await
    }

    async fn members(
        &self,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<(String, String)>> {
        Ledger::members(self, after, limit).await
    }

    async fn due(&self, now: Millis, limit: usize) -> Result<Vec<Due>> {
        Ledger::due(self, now, limit).await
    }

    async fn done_due(&self, due: &Due) -> Result<()> {
        Ledger::done_due(self, due).await
    }

    async fn ping(&self) -> Result<()> {
        self.db.ping().await
    }
}

pub(crate) fn key_reused(op_key: &str) -> Error {
    Error::AlreadyExists(format!(
        "idempotency key {op_key} was already used for a different operation"
    ))
}

#[async_trait::async_trait]
impl Ledger for EmbeddedBalanceStore {
    async fn commit(
        &self,
        tenant_id: &str,
        member_id: &str,
        expected: i64,
        change: &Change,
    ) -> Result<bool> {
        self.submit(tenant_id, member_id, expected, change)
            .await?
            .await
    }

    /// Queued on the group-committing writer, which commits in queue order.
    async fn submit(
        &self,
        tenant_id: &str,
        member_id: &str,
        expected: i64,
        change: &Change,
    ) -> Result<PendingCommit> {
        let (tenant, member, change) =
            (tenant_id.to_string(), member_id.to_string(), change.clone());
        let answer = self
            .db
            .submit(move |txn| {
                let (account, applied_before) = {
                    let members = txn.open_table(MEMBERS).map_err(e)?;
                    let account: Account =
                        get_record(&members, &account_key(&tenant, &member))?.unwrap_or_default();
                    let applied_before = !change.key.is_empty()
                        && members
                            .get(record_key(&tenant, &member, &change.key).as_str())
                            .map_err(e)?
                            .is_some();
                    (account, applied_before)
                };
                if account.version != expected
                    || account.stamp != change.prev_stamp
                    || applied_before
                {
                    return Ok(false);
                }
                write_change(txn, &tenant, &member, &account, &change)?;
                Ok(true)
            })
            .await?;
        Ok(Box::pin(answer))
    }

    async fn record(
        &self,
        tenant_id: &str,
        member_id: &str,
        op_key: &str,
    ) -> Result<Option<OpRecord>> {
        BalanceStore::record(self, tenant_id, member_id, op_key).await
    }

    async fn version(&self, tenant_id: &str, member_id: &str) -> Result<i64> {
        Ok(BalanceStore::account(self, tenant_id, member_id)
            .await?
            .version)
    }

    async fn load_account(&self, tenant_id: &str, member_id: &str) -> Result<Account> {
        BalanceStore::account(self, tenant_id, member_id).await
    }

    async fn members(
        &self,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<(String, String)>> {
        self.db
            .read(move |txn| {
                let Some(t) = open_for_read(txn, MEMBERS)? else {
                    return Ok(Vec::new());
                };
                // Every key of a member starts with tenant NUL member NUL; jump past them.
                let past = |tenant: &str, member: &str| {
                    let mut k = key(&[tenant, member]);
                    k.push('\u{1}');
                    k
                };
                let mut start = after.map_or_else(String::new, |(t, m)| past(&t, &m));
                let mut out = Vec::new();
                while out.len() < limit {
                    let Some(item) = t.range(start.as_str()..).map_err(e)?.next() else {
                        break;
                    };
                    let (k, _) = item.map_err(e)?;
                    let mut parts = k.value().split('\u{0}');
                    let (Some(tenant), Some(member)) = (parts.next(), parts.next()) else {
                        break;
                    };
                    start = past(tenant, member);
                    out.push((tenant.to_string(), member.to_string()));
                }
                Ok(out)
            })
            .await
    }

    async fn entries(&self, tenant_id: &str, member_id: &str, query: &EntryQuery) -> Result<Page> {
        let start = seq_key(tenant_id, member_id, 0);
        let end = seq_key(tenant_id, member_id, query.before_seq.unwrap_or(i64::MAX));
        let query = query.clone();
        self.db
            .read(move |txn| {
                let Some(t) = open_for_read(txn, MEMBERS)? else {
                    return Ok(Page::default());
                };
                let range = t.range(start.as_str()..end.as_str()).map_err(e)?;
                query.page(range.rev().map(|item| {
                    let (_, v) = item.map_err(e)?;
                    decode(v.value())
                }))
            })
            .await
    }

    /// Nothing to do: every change keeps the schedule in step in its own transaction.
    async fn done_due(&self, _due: &Due) -> Result<()> {
        Ok(())
    }

    async fn due(&self, now: Millis, limit: usize) -> Result<Vec<Due>> {
        let end = due_key(now.saturating_add(1), "", "");
        self.db
            .read(move |txn| {
                let Some(t) = open_for_read(txn, DUE)? else {
                    return Ok(Vec::new());
                };
                let mut out = Vec::new();
                for item in t.range(..end.as_str()).map_err(e)?.take(limit) {
                    let (k, _) = item.map_err(e)?;
                    let mut parts = k.value().splitn(3, '\u{0}');
                    if let (Some(at), Some(tenant), Some(member)) =
                        (parts.next(), parts.next(), parts.next())
                    {
                        out.push(Due {
                            at: at.parse().map_err(Error::internal)?,
                            tenant: tenant.to_string(),
                            member: member.to_string(),
                            bucket: 0,
                        });
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn ping(&self) -> Result<()> {
        self.db.ping().await
    }
}

#[async_trait::async_trait]
impl crate::certificate::CertificateStore for EmbeddedBalanceStore {
    async fn execute(
        &self,
        tenant_id: &str,
        code: &str,
        op_key: &str,
        fingerprint: &str,
        op: crate::certificate::CertOp,
        now: Millis,
    ) -> Result<crate::certificate::Certificate> {
        use crate::certificate::{self, CertOp, CertRecord, Certificate};
        let record_key = match op {
            CertOp::Issue { .. } => key(&[tenant_id, "", op_key]),
            _ => key(&[tenant_id, code, op_key]),
        };
        let cert_key = key(&[tenant_id, code]);
        let (code, fingerprint) = (code.to_string(), fingerprint.to_string());
        let op_key = op_key.to_string();
        self.db
            .write(move |txn| {
                let mut t = txn.open_table(CERTIFICATES).map_err(e)?;
                if let Some(r) = get_record::<CertRecord>(&t, &record_key)? {
                    if r.fingerprint == fingerprint {
                        return Ok(r.certificate);
                    }
                    return Err(key_reused(&op_key));
                }
                let current: Option<Certificate> = get_record(&t, &cert_key)?;
                let next = certificate::apply(current.as_ref(), &code, &op, now)?;
                put_record(&mut t, &cert_key, &next)?;
                let record = CertRecord {
                    fingerprint: fingerprint.clone(),
                    certificate: next.clone(),
                };
                put_record(&mut t, &record_key, &record)?;
                Ok(next)
            })
            .await
    }

    async fn get(
        &self,
        tenant_id: &str,
        code: &str,
    ) -> Result<Option<crate::certificate::Certificate>> {
        let k = key(&[tenant_id, code]);
        self.db
            .read(move |txn| read_record(txn, CERTIFICATES, &k))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedBalanceStore::open(&dir.path().join("balance.redb")).unwrap();
        let store = std::sync::Arc::new(store);
        super::super::conformance::run_all(store.clone()).await;
        super::super::conformance::certificates(store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn filtered_pages_past_the_scan_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedBalanceStore::open(&dir.path().join("balance.redb")).unwrap();
        super::super::conformance::filtered_pages_past_the_scan_bound(std::sync::Arc::new(store))
            .await;
    }
}
