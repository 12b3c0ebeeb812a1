//! The reporting store on redb (`reporting.redb`). A fact, its identity and the sequence
//! counter move in one transaction, so a fact is never stored twice nor half.

use std::collections::HashSet;
use std::path::Path;

use loyalty_platform::calendar::Day;
use loyalty_platform::embedded::{EmbeddedDb, decode, encode, open_for_read, storage_error as e};
use loyalty_platform::error::Result;
use redb::{ReadableTable, TableDefinition};

use super::{FactPage, Position, Receipts, ReportingStore, ScanFrom};
use crate::fact::{Fact, TenantFact};

type FactTable = TableDefinition<'static, (&'static str, i64, u64), &'static [u8]>;

/// (tenant, business day, sequence) → purchase.
const PURCHASES: FactTable = TableDefinition::new("purchases");
/// (tenant, business day, sequence) → refund.
const REFUNDS: FactTable = TableDefinition::new("refunds");
/// (tenant, time, sequence) → ledger entry.
const LEDGER: FactTable = TableDefinition::new("ledger");
/// (tenant, member) → the member's newest facts.
const MEMBERS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("members");
/// (tenant, identity) → the sequence a receipt fact was stored under.
const IDENTITIES: TableDefinition<(&str, &str), u64> = TableDefinition::new("identities");
/// name → value: "seq", the last sequence handed out.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

#[derive(Debug, Clone)]
pub struct EmbeddedReportingStore {
    db: EmbeddedDb,
}

impl EmbeddedReportingStore {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            db: EmbeddedDb::open(path)?,
        })
    }
}

fn table(kind: Receipts) -> FactTable {
    match kind {
        Receipts::Purchases => PURCHASES,
        Receipts::Refunds => REFUNDS,
        Receipts::Ledger => LEDGER,
    }
}

#[async_trait::async_trait]
impl ReportingStore for EmbeddedReportingStore {
    async fn append(&self, facts: Vec<TenantFact>) -> Result<Vec<TenantFact>> {
        if facts.is_empty() {
            return Ok(Vec::new());
        }
        self.db
            .write(move |txn| {
                let mut meta = txn.open_table(META).map_err(e)?;
                let mut seq = meta.get("seq").map_err(e)?.map_or(0, |v| v.value());
                let mut identities = txn.open_table(IDENTITIES).map_err(e)?;
                let mut purchases = txn.open_table(PURCHASES).map_err(e)?;
                let mut refunds = txn.open_table(REFUNDS).map_err(e)?;
                let mut members = txn.open_table(MEMBERS).map_err(e)?;
                let mut ledger = txn.open_table(LEDGER).map_err(e)?;
                let mut fresh = Vec::new();
                let mut in_batch = HashSet::new();
                for f in &facts {
                    let tenant = f.tenant_id.as_str();
                    match &f.fact {
                        Fact::Member(m) => {
                            let key = (tenant, m.member_id.as_str());
                            let newer = match members.get(key).map_err(e)? {
                                Some(stored) => {
                                    decode::<Fact>(stored.value()).is_ok_and(|s| match s {
                                        Fact::Member(s) => s.version < m.version,
                                        _ => true,
                                    })
                                }
                                None => true,
                            };
                            if newer {
                                members
                                    .insert(key, encode(&f.fact)?.as_slice())
                                    .map_err(e)?;
                                fresh.push(f.clone());
                            }
                        }
                        fact => {
                            let identity = fact.identity();
                            let id_key = (tenant, identity.as_str());
                            if !in_batch.insert((tenant, identity.clone()))
                                || identities.get(id_key).map_err(e)?.is_some()
                            {
                                continue;
                            }
                            seq += 1;
                            identities.insert(id_key, seq).map_err(e)?;
                            let day = fact.order().unwrap_or_default();
                            let target = match fact {
                                Fact::Refund(_) => &mut refunds,
                                Fact::Ledger(_) => &mut ledger,
                                _ => &mut purchases,
                            };
                            target
                                .insert((tenant, day, seq), encode(fact)?.as_slice())
                                .map_err(e)?;
                            fresh.push(f.clone());
                        }
                    }
                }
                meta.insert("seq", seq).map_err(e)?;
                Ok(fresh)
            })
            .await
    }

    async fn snapshot(&self) -> Result<u64> {
        self.db
            .read(|txn| {
                let Some(meta) = open_for_read(txn, META)? else {
                    return Ok(0);
                };
                Ok(meta.get("seq").map_err(e)?.map_or(0, |v| v.value()))
            })
            .await
    }

    async fn page(
        &self,
        tenant_id: &str,
        kind: Receipts,
        from: Day,
        to: Day,
        snapshot: u64,
        after: Option<Position>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<FactPage> {
        let tenant = tenant_id.to_string();
        self.db
            .read(move |txn| {
                let mut page = FactPage::default();
                let Some(t) = open_for_read(txn, table(kind))? else {
                    return Ok(page);
                };
                let start = match after {
                    Some((day, seq)) if seq == u64::MAX => (day + 1, 0),
                    Some((day, seq)) => (day, seq + 1),
                    None => (from, 0),
                }
                .max((from, 0));
                if start.0 > to {
                    return Ok(page);
                }
                let mut bytes = 0;
                let range = t
                    .range((tenant.as_str(), start.0, start.1)..=(tenant.as_str(), to, u64::MAX))
                    .map_err(e)?;
                for row in range {
                    let (k, v) = row.map_err(e)?;
                    let (_, day, seq) = k.value();
                    if seq > snapshot {
                        continue;
                    }
                    if page.rows.len() >= limit.max(1)
                        || (bytes >= max_bytes && !page.rows.is_empty())
                    {
                        page.more = true;
                        break;
                    }
                    bytes += v.value().len();
                    page.rows.push(((day, seq), decode(v.value())?));
                }
                Ok(page)
            })
            .await
    }

    async fn scan(
        &self,
        from: ScanFrom,
        limit: usize,
    ) -> Result<(Vec<TenantFact>, Option<ScanFrom>)> {
        self.db
            .read(move |txn| {
                let mut out = Vec::new();
                let mut phase = from.clone();
                loop {
                    let kind = match &phase {
                        ScanFrom::Purchases(_) => Receipts::Purchases,
                        ScanFrom::Refunds(_) => Receipts::Refunds,
                        _ => Receipts::Ledger,
                    };
                    match phase {
                        ScanFrom::Purchases(after)
                        | ScanFrom::Refunds(after)
                        | ScanFrom::Ledger(after) => {
                            if let Some(t) = open_for_read(txn, table(kind))? {
                                let rows = match &after {
                                    Some((tenant, day, seq)) => {
                                        t.range((tenant.as_str(), *day, *seq)..).map_err(e)?
                                    }
                                    None => t.range::<(&str, i64, u64)>(..).map_err(e)?,
                                };
                                for row in rows {
                                    let (k, v) = row.map_err(e)?;
                                    let (tenant, day, seq) = k.value();
                                    let at = Some((tenant.to_string(), day, seq));
                                    if at == after {
                                        continue;
                                    }
                                    out.push(TenantFact {
                                        tenant_id: tenant.to_string(),
                                        fact: decode(v.value())?,
                                    });
                                    if out.len() >= limit {
                                        let next = match kind {
                                            Receipts::Purchases => ScanFrom::Purchases(at),
                                            Receipts::Refunds => ScanFrom::Refunds(at),
                                            Receipts::Ledger => ScanFrom::Ledger(at),
                                        };
                                        return Ok((out, Some(next)));
                                    }
                                }
                            }
                            phase = match kind {
                                Receipts::Purchases => ScanFrom::Refunds(None),
                                Receipts::Refunds => ScanFrom::Ledger(None),
                                Receipts::Ledger => ScanFrom::Members(None),
                            };
                        }
                        ScanFrom::Members(after) => {
                            let Some(t) = open_for_read(txn, MEMBERS)? else {
                                return Ok((out, None));
                            };
                            let rows = match &after {
                                Some((tenant, member)) => {
                                    t.range((tenant.as_str(), member.as_str())..).map_err(e)?
                                }
                                None => t.range::<(&str, &str)>(..).map_err(e)?,
                            };
                            for row in rows {
                                let (k, v) = row.map_err(e)?;
                                let (tenant, member) = k.value();
                                let at = Some((tenant.to_string(), member.to_string()));
                                if at == after {
                                    continue;
                                }
                                out.push(TenantFact {
                                    tenant_id: tenant.to_string(),
                                    fact: decode(v.value())?,
                                });
                                if out.len() >= limit {
                                    return Ok((out, Some(ScanFrom::Members(at))));
                                }
                            }
                            return Ok((out, None));
                        }
                    }
                }
            })
            .await
    }

    async fn ping(&self) -> Result<()> {
        self.db.ping().await
    }
}
