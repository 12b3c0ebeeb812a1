//! The reporting store on redb (`reporting.redb`). A fact, its identity and the sequence
//! counter move in one transaction, so a fact is never stored twice nor half.

use std::collections::HashSet;
use std::path::Path;

use loyalty_platform::calendar::Day;
use loyalty_platform::clock::Millis;
use loyalty_platform::embedded::{EmbeddedDb, decode, encode, open_for_read, storage_error as e};
use loyalty_platform::error::Result;
use redb::{ReadableTable, TableDefinition};

use super::{AUDIT_SCAN, FactPage, Position, Receipts, ReportingStore, ScanFrom};
use crate::audit::{AuditCursor, AuditEntry, AuditHead, AuditPage, AuditQuery, Order};
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
/// name → value: "seq", the last sequence handed out; "by_member", the sequence up to which
/// `BY_MEMBER` covers the facts (behind "seq" when a binary without the index stored some).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// (tenant, member, kind, day or time, sequence) → (): where each member's receipt and
/// ledger facts are, for the segment filter.
const BY_MEMBER: TableDefinition<(&str, &str, u8, i64, u64), ()> =
    TableDefinition::new("by_member");

/// (tenant, time, record id) → audit record.
const AUDIT: TableDefinition<(&str, i64, &str), &[u8]> = TableDefinition::new("audit");
/// (tenant, time, record id) → the record's filter fields.
const AUDIT_HEADS: TableDefinition<(&str, i64, &str), &[u8]> = TableDefinition::new("audit_heads");
/// (tenant, record id) → the record's time: each record is stored once.
const AUDIT_IDS: TableDefinition<(&str, &str), i64> = TableDefinition::new("audit_ids");
/// (tenant, record id) of the records that are a call's start, with no answer yet.
const AUDIT_OPEN: TableDefinition<(&str, &str), ()> = TableDefinition::new("audit_open");

const KINDS: [Receipts; 3] = [Receipts::Purchases, Receipts::Refunds, Receipts::Ledger];

fn kind_code(kind: Receipts) -> u8 {
    match kind {
        Receipts::Purchases => 0,
        Receipts::Refunds => 1,
        Receipts::Ledger => 2,
    }
}

/// Indexes every stored fact by member when the index does not cover them all: a file
/// written before the index existed, or facts stored since by a binary without it.
fn index_by_member(txn: &redb::WriteTransaction) -> Result<()> {
    let mut meta = txn.open_table(META).map_err(e)?;
    let seq = meta.get("seq").map_err(e)?.map_or(0, |v| v.value());
    let covered = meta.get("by_member").map_err(e)?.map(|v| v.value());
    if covered == Some(seq) {
        return Ok(());
    }
    let mut index = txn.open_table(BY_MEMBER).map_err(e)?;
    if seq > 0 {
        for kind in KINDS {
            let t = txn.open_table(table(kind)).map_err(e)?;
            for row in t.range::<(&str, i64, u64)>(..).map_err(e)? {
                let (k, v) = row.map_err(e)?;
                let (tenant, order, seq) = k.value();
                if let Some(member) = decode::<Fact>(v.value())?.member_id() {
                    index
                        .insert((tenant, member.as_str(), kind_code(kind), order, seq), ())
                        .map_err(e)?;
                }
            }
        }
    }
    meta.insert("by_member", seq).map_err(e)?;
    Ok(())
}

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
                let mut by_member = txn.open_table(BY_MEMBER).map_err(e)?;
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
                            let (target, kind) = match fact {
                                Fact::Refund(_) => (&mut refunds, Receipts::Refunds),
                                Fact::Ledger(_) => (&mut ledger, Receipts::Ledger),
                                _ => (&mut purchases, Receipts::Purchases),
                            };
                            target
                                .insert((tenant, day, seq), encode(fact)?.as_slice())
                                .map_err(e)?;
                            if let Some(member) = fact.member_id() {
                                by_member
                                    .insert(
                                        (tenant, member.as_str(), kind_code(kind), day, seq),
                                        (),
                                    )
                                    .map_err(e)?;
                            }
                            fresh.push(f.clone());
                        }
                    }
                }
                meta.insert("seq", seq).map_err(e)?;
                // `prepare` made the index whole; this batch's facts are in it too.
                meta.insert("by_member", seq).map_err(e)?;
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
                                        return Ok((out, Some(ScanFrom::within(kind, at))));
                                    }
                                }
                            }
                            phase = ScanFrom::after_all(kind);
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

    async fn prepare(&self) -> Result<()> {
        self.db.write(index_by_member).await
    }

    async fn member_facts(
        &self,
        tenant_id: &str,
        members: Vec<String>,
        days: (Day, Day),
        ledger: bool,
    ) -> Result<Vec<Fact>> {
        let tenant = tenant_id.to_string();
        self.db
            .read(move |txn| {
                let mut out = Vec::new();
                let Some(index) = open_for_read(txn, BY_MEMBER)? else {
                    return Ok(out);
                };
                let tables = KINDS
                    .map(|k| open_for_read(txn, table(k)))
                    .into_iter()
                    .collect::<Result<Vec<_>>>()?;
                let mut ranges = vec![
                    (Receipts::Purchases, days.0, days.1),
                    (Receipts::Refunds, days.0, days.1),
                ];
                if ledger {
                    ranges.push((Receipts::Ledger, i64::MIN, i64::MAX));
                }
                for member in &members {
                    let (t, m) = (tenant.as_str(), member.as_str());
                    for &(kind, from, to) in &ranges {
                        let k = kind_code(kind);
                        let Some(Some(facts)) = tables.get(usize::from(k)) else {
                            continue;
                        };
                        let rows = index
                            .range((t, m, k, from, 0)..=(t, m, k, to, u64::MAX))
                            .map_err(e)?;
                        for row in rows {
                            let (key, _) = row.map_err(e)?;
                            let (_, _, _, order, seq) = key.value();
                            if let Some(v) = facts.get((t, order, seq)).map_err(e)? {
                                out.push(decode(v.value())?);
                            }
                        }
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn append_audit(&self, entries: Vec<AuditEntry>) -> Result<usize> {
        if entries.is_empty() {
            return Ok(0);
        }
        self.db
            .write(move |txn| {
                let mut ids = txn.open_table(AUDIT_IDS).map_err(e)?;
                let mut records = txn.open_table(AUDIT).map_err(e)?;
                let mut heads = txn.open_table(AUDIT_HEADS).map_err(e)?;
                let mut open = txn.open_table(AUDIT_OPEN).map_err(e)?;
                let mut fresh = 0;
                for entry in &entries {
                    let key = (entry.tenant_id.as_str(), entry.id.as_str());
                    let stored = ids.get(key).map_err(e)?.map(|t| t.value());
                    if let Some(time) = stored {
                        // Only the answer to a start still open replaces it.
                        if entry.in_flight || open.remove(key).map_err(e)?.is_none() {
                            continue;
                        }
                        let old = (entry.tenant_id.as_str(), time, entry.id.as_str());
                        records.remove(old).map_err(e)?;
                        heads.remove(old).map_err(e)?;
                    } else if entry.in_flight {
                        open.insert(key, ()).map_err(e)?;
                    }
                    ids.insert(key, entry.time).map_err(e)?;
                    let key = (entry.tenant_id.as_str(), entry.time, entry.id.as_str());
                    records.insert(key, encode(entry)?.as_slice()).map_err(e)?;
                    heads
                        .insert(key, encode(&AuditHead::of(entry))?.as_slice())
                        .map_err(e)?;
                    fresh += 1;
                }
                Ok(fresh)
            })
            .await
    }

    async fn oldest_open_audit(&self, tenant_id: &str, since: Millis) -> Result<Option<Millis>> {
        let tenant = tenant_id.to_string();
        self.db
            .read(move |txn| {
                let (Some(open), Some(ids)) = (
                    open_for_read(txn, AUDIT_OPEN)?,
                    open_for_read(txn, AUDIT_IDS)?,
                ) else {
                    return Ok(None);
                };
                let mut oldest: Option<Millis> = None;
                for row in open.range((tenant.as_str(), "")..).map_err(e)? {
                    let (k, _) = row.map_err(e)?;
                    let (t, id) = k.value();
                    if t != tenant {
                        break;
                    }
                    if let Some(time) = ids.get((t, id)).map_err(e)?.map(|v| v.value())
                        && time >= since
                    {
                        oldest = Some(oldest.map_or(time, |o| o.min(time)));
                    }
                }
                Ok(oldest)
            })
            .await
    }

    async fn audit_page(
        &self,
        tenant_id: &str,
        query: &AuditQuery,
        order: Order,
        after: Option<AuditCursor>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<AuditPage> {
        use std::ops::Bound::{Excluded, Included};
        let tenant = tenant_id.to_string();
        let query = query.clone();
        self.db
            .read(move |txn| {
                let mut page = AuditPage::default();
                let (Some(heads), Some(records)) =
                    (open_for_read(txn, AUDIT_HEADS)?, open_for_read(txn, AUDIT)?)
                else {
                    return Ok(page);
                };
                let open = open_for_read(txn, AUDIT_OPEN)?;
                let tenant = tenant.as_str();
                let start = Included((tenant, query.from, ""));
                let end = Excluded((tenant, query.to, ""));
                let rows: Box<dyn Iterator<Item = _>> = match (order, &after) {
                    (Order::OldestFirst, Some((time, id))) => Box::new(
                        heads
                            .range((Excluded((tenant, *time, id.as_str())), end))
                            .map_err(e)?,
                    ),
                    (Order::OldestFirst, None) => Box::new(heads.range((start, end)).map_err(e)?),
                    (Order::NewestFirst, Some((time, id))) => Box::new(
                        heads
                            .range((start, Excluded((tenant, *time, id.as_str()))))
                            .map_err(e)?
                            .rev(),
                    ),
                    (Order::NewestFirst, None) => {
                        Box::new(heads.range((start, end)).map_err(e)?.rev())
                    }
                };
                let (mut last, mut bytes) = (None, 0);
                for (looked, row) in rows.enumerate() {
                    let (k, v) = row.map_err(e)?;
                    let full = page.entries.len() >= limit.max(1)
                        || (bytes >= max_bytes && !page.entries.is_empty());
                    if full || looked >= AUDIT_SCAN {
                        page.next = last;
                        break;
                    }
                    let (_, time, id) = k.value();
                    last = Some((time, id.to_string()));
                    let head: AuditHead = decode(v.value())?;
                    if !query.matches_head(time, &head) {
                        continue;
                    }
                    if let Some(record) = records.get(k.value()).map_err(e)? {
                        bytes += record.value().len();
                        let mut entry: AuditEntry = decode(record.value())?;
                        if let Some(open) = &open {
                            entry.in_flight = open.get((tenant, id)).map_err(e)?.is_some();
                        }
                        page.entries.push(entry);
                    }
                }
                Ok(page)
            })
            .await
    }

    async fn clear_facts(&self) -> Result<()> {
        self.db
            .write(move |txn| {
                for table in [PURCHASES, REFUNDS, LEDGER] {
                    txn.delete_table(table).map_err(e)?;
                }
                txn.delete_table(MEMBERS).map_err(e)?;
                txn.delete_table(IDENTITIES).map_err(e)?;
                txn.delete_table(BY_MEMBER).map_err(e)?;
                Ok(())
            })
            .await
    }

    async fn ping(&self) -> Result<()> {
        self.db.ping().await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::store::conformance::purchase;

    fn of_m1(mut f: TenantFact) -> TenantFact {
        if let Fact::Purchase(p) = &mut f.fact {
            p.member_id = Some("m1".into());
        }
        f
    }

    async fn found(store: &EmbeddedReportingStore) -> Vec<Fact> {
        store
            .member_facts("t", vec!["m1".into()], (0, 100), true)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn facts_the_member_index_does_not_cover_are_indexed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedReportingStore::open(&dir.path().join("reporting.redb")).unwrap();
        store.prepare().await.unwrap();
        let first = of_m1(purchase("t", "r1", 10));
        store.append(vec![first.clone()]).await.unwrap();
        assert_eq!(found(&store).await, vec![first.fact.clone()]);
        // As a file written before the index existed.
        store
            .db
            .write(|txn| {
                txn.delete_table(BY_MEMBER).map_err(e)?;
                txn.open_table(META)
                    .map_err(e)?
                    .remove("by_member")
                    .map_err(e)?;
                Ok(())
            })
            .await
            .unwrap();
        assert!(found(&store).await.is_empty());
        store.prepare().await.unwrap();
        assert_eq!(found(&store).await, vec![first.fact.clone()]);
        // As a fact stored by a binary without the index, after this one had covered all.
        let second = of_m1(purchase("t", "r2", 11));
        store.append(vec![second.clone()]).await.unwrap();
        store
            .db
            .write(|txn| {
                let mut index = txn.open_table(BY_MEMBER).map_err(e)?;
                index.retain(|k, _| k.4 != 2).map_err(e)?;
                txn.open_table(META)
                    .map_err(e)?
                    .insert("by_member", 1)
                    .map_err(e)?;
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(found(&store).await, vec![first.fact.clone()]);
        store.prepare().await.unwrap();
        assert_eq!(found(&store).await, vec![first.fact, second.fact]);
    }
}
