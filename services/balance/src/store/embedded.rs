//! The balance store on the embedded database: state, ledger and idempotency records are
//! written in one transaction, group-committed.

use std::path::Path;

use loyalty_platform::clock::Millis;
use loyalty_platform::embedded::{
    EmbeddedDb, Records, get_record, key, open_for_read, put_record, read_record,
    storage_error as e,
};
use loyalty_platform::error::{Error, Result};
use redb::TableDefinition;

use super::BalanceStore;
use crate::ledger::{self, Account, Entry, Op, OpRecord};

const ACCOUNTS: Records = TableDefinition::new("accounts");
/// Key: tenant, member, sequence number as 20 digits (so byte order is numeric order).
const LEDGER: Records = TableDefinition::new("ledger");
const OPS: Records = TableDefinition::new("operations");

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

fn seq_key(tenant: &str, member: &str, seq: i64) -> String {
    key(&[tenant, member, &format!("{seq:020}")])
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
    ) -> Result<OpRecord> {
        let (tenant, member, op_key) = (
            tenant_id.to_string(),
            member_id.to_string(),
            op_key.to_string(),
        );
        self.db
            .write(move |txn| {
                let mut ops = txn.open_table(OPS).map_err(e)?;
                let record_key = key(&[&tenant, &op_key]);
                if let Some(record) = get_record::<OpRecord>(&ops, &record_key)? {
                    if record.member_id == member && record.op == op {
                        return Ok(record);
                    }
                    return Err(Error::AlreadyExists(format!(
                        "idempotency key {op_key} was already used for a different operation"
                    )));
                }
                let mut accounts = txn.open_table(ACCOUNTS).map_err(e)?;
                let account_key = key(&[&tenant, &member]);
                let mut account: Account = get_record(&accounts, &account_key)?.unwrap_or_default();
                let mut original = match &op {
                    Op::Reverse { original_key, .. } => {
                        let k = key(&[&tenant, original_key]);
                        get_record::<OpRecord>(&ops, &k)?.map(|record| (k, record))
                    }
                    _ => None,
                };
                let applied = ledger::apply(
                    &mut account,
                    &member,
                    &op_key,
                    &op,
                    original.as_mut().map(|(_, r)| r),
                    now,
                )?;
                if let Some(entry) = &applied.record.reply.entry {
                    let mut ledger_table = txn.open_table(LEDGER).map_err(e)?;
                    put_record(
                        &mut ledger_table,
                        &seq_key(&tenant, &member, entry.seq),
                        entry,
                    )?;
                }
                put_record(&mut accounts, &account_key, &account)?;
                if let Some((k, rec)) = &original {
                    put_record(&mut ops, k, rec)?;
                }
                put_record(&mut ops, &record_key, &applied.record)?;
                Ok(applied.record)
            })
            .await
    }

    async fn account(&self, tenant_id: &str, member_id: &str) -> Result<Account> {
        let k = key(&[tenant_id, member_id]);
        self.db
            .read(move |txn| Ok(read_record(txn, ACCOUNTS, &k)?.unwrap_or_default()))
            .await
    }

    async fn entries(
        &self,
        tenant_id: &str,
        member_id: &str,
        before_seq: Option<i64>,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let start = seq_key(tenant_id, member_id, 0);
        let end = seq_key(tenant_id, member_id, before_seq.unwrap_or(i64::MAX));
        self.db
            .read(move |txn| {
                let Some(t) = open_for_read(txn, LEDGER)? else {
                    return Ok(Vec::new());
                };
                let mut out = Vec::new();
                for item in t
                    .range(start.as_str()..end.as_str())
                    .map_err(e)?
                    .rev()
                    .take(limit)
                {
                    let (_, v) = item.map_err(e)?;
                    out.push(loyalty_platform::embedded::decode(v.value())?);
                }
                Ok(out)
            })
            .await
    }

    async fn ping(&self) -> Result<()> {
        self.db.ping().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedBalanceStore::open(&dir.path().join("balance.redb")).unwrap();
        super::super::conformance::run_all(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_redemptions_never_overdraw() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedBalanceStore::open(&dir.path().join("balance.redb")).unwrap();
        super::super::conformance::concurrent_redemptions_never_overdraw(std::sync::Arc::new(
            store,
        ))
        .await;
    }
}
