//! The promotion store on the embedded database.

use std::ops::Bound;
use std::path::Path;

use loyalty_platform::clock::Millis;
use loyalty_platform::embedded::{
    EmbeddedDb, Records, decode, get_record, key, open_for_read, prefix_range, put_record,
    read_record, records_after, storage_error as e,
};
use loyalty_platform::error::{Error, Result};
use redb::{ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{CheckoutContext, PromotionStore, Put, Unsettled};
use crate::campaign::{Campaign, Coupon, StackingGroup};
use crate::catalog::{Product, Store};
use crate::program::Program;
use crate::purchase::{Purchase, PurchaseState};
use crate::usage::{Claim, coupon_counter};

/// Orders a member's purchases newest first: the commit time counted down, then the id.
fn history_position(commit_time: i64, receipt_id: &str) -> String {
    format!("{:020}:{receipt_id}", i64::MAX - commit_time.max(0))
}

const PROGRAMS: Records = TableDefinition::new("programs");
const STORES: Records = TableDefinition::new("stores");
const PRODUCTS: Records = TableDefinition::new("products");
const PURCHASES: Records = TableDefinition::new("purchases");
/// (tenant, member, newest-first commit time, receipt) → nothing: purchase history.
const MEMBER_PURCHASES: Records = TableDefinition::new("member_purchases");
/// (time it became unsettled, tenant, receipt) → nothing: unsettled purchases (pending
/// commits, refunds whose points have not moved), oldest first. The name predates refunds.
const PENDING: Records = TableDefinition::new("pending_purchases");
/// (tenant, member) → the member it was merged into: a purchase of a merged member committed
/// after its history moved is filed under the survivor too.
const MERGED: Records = TableDefinition::new("merged_members");
/// Most merges followed from a member to the one its history is filed under.
const MAX_MERGE_HOPS: usize = 16;
const CAMPAIGNS: Records = TableDefinition::new("campaigns");
/// (tenant, campaign, version as 20 digits) → that version.
const CAMPAIGN_HISTORY: Records = TableDefinition::new("campaign_history");
const GROUPS: Records = TableDefinition::new("stacking_groups");
const COUPONS: Records = TableDefinition::new("coupons");
const COUPON_BATCHES: Records = TableDefinition::new("coupon_batches");
/// (tenant) → version of the tenant's campaigns and groups.
const CAMPAIGN_VERSIONS: TableDefinition<'static, &'static str, u64> =
    TableDefinition::new("campaign_versions");
/// (tenant, counter) → value.
const COUNTERS: TableDefinition<'static, &'static str, i64> = TableDefinition::new("counters");

/// A [`PENDING`] key: the time the purchase became unsettled (zero-padded, so keys sort by
/// it), tenant and receipt id.
fn unsettled_key(since: Millis, tenant: &str, receipt: &str) -> String {
    key(&[&format!("{:020}", since.max(0)), tenant, receipt])
}

/// Where `member`'s purchase history is filed: the end of its chain of merges.
fn survivor(
    merged: &impl ReadableTable<&'static str, &'static [u8]>,
    tenant: &str,
    member: &str,
) -> Result<String> {
    let mut member = member.to_string();
    for _ in 0..MAX_MERGE_HOPS {
        match get_record::<String>(merged, &key(&[tenant, &member]))? {
            Some(into) => member = into,
            None => break,
        }
    }
    Ok(member)
}

fn bump_campaigns(txn: &redb::WriteTransaction, tenant_id: &str) -> Result<()> {
    let mut t = txn.open_table(CAMPAIGN_VERSIONS).map_err(e)?;
    let current = t.get(tenant_id).map_err(e)?.map_or(0, |v| v.value());
    t.insert(tenant_id, current + 1).map_err(e)?;
    Ok(())
}

/// Applies `claims` inside a write: the index of the first that does not fit, or all applied.
fn apply_claims(
    txn: &redb::WriteTransaction,
    tenant_id: &str,
    claims: &[Claim],
) -> Result<Option<usize>> {
    if claims.is_empty() {
        return Ok(None);
    }
    let mut t = txn.open_table(COUNTERS).map_err(e)?;
    let mut next = Vec::with_capacity(claims.len());
    for (i, c) in claims.iter().enumerate() {
        let k = key(&[tenant_id, &c.counter]);
        // A counter may be claimed twice in one write; the pending value counts.
        let current = match next.iter().rev().find(|(k2, _): &&(String, i64)| *k2 == k) {
            Some((_, v)) => *v,
            None => t.get(k.as_str()).map_err(e)?.map_or(0, |v| v.value()),
        };
        if !c.fits(current) {
            return Ok(Some(i));
        }
        next.push((k, current.saturating_add(c.amount).max(0)));
    }
    for (k, v) in next {
        if v == 0 {
            t.remove(k.as_str()).map_err(e)?;
        } else {
            t.insert(k.as_str(), v).map_err(e)?;
        }
    }
    Ok(None)
}

fn read_counter(txn: &redb::ReadTransaction, tenant_id: &str, name: &str) -> Result<i64> {
    Ok(match open_for_read(txn, COUNTERS)? {
        Some(t) => t
            .get(key(&[tenant_id, name]).as_str())
            .map_err(e)?
            .map_or(0, |v| v.value()),
        None => 0,
    })
}

/// The tables of the embedded store, for copying them elsewhere (`loyalty copy-promotion`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Programs,
    Stores,
    Products,
    Purchases,
    MemberPurchases,
    Unsettled,
    Merged,
    Campaigns,
    CampaignHistory,
    Groups,
    Coupons,
    CouponBatches,
    CampaignVersions,
    Counters,
}

impl Table {
    pub const ALL: [Table; 14] = [
        Table::Programs,
        Table::Stores,
        Table::Products,
        Table::Purchases,
        Table::MemberPurchases,
        Table::Unsettled,
        Table::Merged,
        Table::Campaigns,
        Table::CampaignHistory,
        Table::Groups,
        Table::Coupons,
        Table::CouponBatches,
        Table::CampaignVersions,
        Table::Counters,
    ];

    fn records(self) -> Option<Records> {
        Some(match self {
            Table::Programs => PROGRAMS,
            Table::Stores => STORES,
            Table::Products => PRODUCTS,
            Table::Purchases => PURCHASES,
            Table::MemberPurchases => MEMBER_PURCHASES,
            Table::Unsettled => PENDING,
            Table::Merged => MERGED,
            Table::Campaigns => CAMPAIGNS,
            Table::CampaignHistory => CAMPAIGN_HISTORY,
            Table::Groups => GROUPS,
            Table::Coupons => COUPONS,
            Table::CouponBatches => COUPON_BATCHES,
            Table::CampaignVersions | Table::Counters => return None,
        })
    }
}

/// One stored row: its key's parts (as the table orders them) and its value: the stored
/// bytes, or a number's decimal text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub key: Vec<String>,
    pub value: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct EmbeddedPromotionStore {
    db: EmbeddedDb,
}

impl EmbeddedPromotionStore {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            db: EmbeddedDb::open(path)?,
        })
    }

    async fn get<T: DeserializeOwned + Send + 'static>(
        &self,
        table: Records,
        k: String,
    ) -> Result<Option<T>> {
        self.db.get(|txn| read_record(txn, table, &k))
    }

    async fn upsert<T: Serialize + Clone + Send + 'static>(
        &self,
        table: Records,
        items: Vec<(String, T)>,
    ) -> Result<()> {
        self.db
            .write(move |txn| {
                let mut t = txn.open_table(table).map_err(e)?;
                for (k, item) in &items {
                    put_record(&mut t, k, item)?;
                }
                Ok(())
            })
            .await
    }

    async fn list<T: DeserializeOwned + Send + 'static>(
        &self,
        table: Records,
        tenant_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<T>> {
        let (start, end) = prefix_range(&[tenant_id]);
        let after = if after.is_empty() {
            None
        } else {
            Some(key(&[tenant_id, after]))
        };
        self.db
            .read(move |txn| {
                let Some(t) = open_for_read(txn, table)? else {
                    return Ok(Vec::new());
                };
                let mut out = Vec::new();
                for item in t.range(start.as_str()..end.as_str()).map_err(e)? {
                    let (k, v) = item.map_err(e)?;
                    if after.as_deref().is_some_and(|a| k.value() <= a) {
                        continue;
                    }
                    out.push(decode(v.value())?);
                    if out.len() == limit {
                        break;
                    }
                }
                Ok(out)
            })
            .await
    }
}

impl EmbeddedPromotionStore {
    /// Rows of `table` in key order after the row whose raw key is `after`, at most `limit`;
    /// with the raw key of the last, to continue from.
    pub async fn rows(
        &self,
        table: Table,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<Row>, Option<String>)> {
        fn range<'a, V: redb::Value + 'static>(
            t: &'a impl ReadableTable<&'static str, V>,
            after: &'a Option<String>,
        ) -> Result<redb::Range<'a, &'static str, V>> {
            match after {
                Some(a) => t.range::<&str>((Bound::Excluded(a.as_str()), Bound::Unbounded)),
                None => t.range::<&str>(..),
            }
            .map_err(e)
        }
        fn split(k: &str) -> Vec<String> {
            k.split('\0').map(str::to_string).collect()
        }
        self.db
            .read(move |txn| {
                let mut out = Vec::new();
                let mut last = None;
                let mut push = |k: &str, value: Vec<u8>| {
                    out.push(Row {
                        key: split(k),
                        value,
                    });
                    last = Some(k.to_string());
                };
                match table.records() {
                    Some(records) => {
                        if let Some(t) = open_for_read(txn, records)? {
                            for item in range(&t, &after)?.take(limit) {
                                let (k, v) = item.map_err(e)?;
                                push(k.value(), v.value().to_vec());
                            }
                        }
                    }
                    None if table == Table::CampaignVersions => {
                        if let Some(t) = open_for_read(txn, CAMPAIGN_VERSIONS)? {
                            for item in range(&t, &after)?.take(limit) {
                                let (k, v) = item.map_err(e)?;
                                push(k.value(), v.value().to_string().into_bytes());
                            }
                        }
                    }
                    None => {
                        if let Some(t) = open_for_read(txn, COUNTERS)? {
                            for item in range(&t, &after)?.take(limit) {
                                let (k, v) = item.map_err(e)?;
                                push(k.value(), v.value().to_string().into_bytes());
                            }
                        }
                    }
                }
                Ok((out, last))
            })
            .await
    }
}

#[async_trait::async_trait]
impl PromotionStore for EmbeddedPromotionStore {
    async fn program(&self, tenant_id: &str) -> Result<Option<Program>> {
        self.get(PROGRAMS, key(&[tenant_id])).await
    }

    async fn update_program(&self, program: Program, expected_version: i64) -> Result<Program> {
        self.db
            .write(move |txn| {
                let mut t = txn.open_table(PROGRAMS).map_err(e)?;
                let k = key(&[&program.tenant_id]);
                let current: Option<Program> = get_record(&t, &k)?;
                let current_version = current.map_or(0, |p| p.version);
                if expected_version != 0 && expected_version != current_version {
                    return Err(Error::FailedPrecondition(format!(
                        "program is at version {current_version}, not {expected_version}: read it again"
                    )));
                }
                let mut saved = program.clone();
                saved.version = current_version + 1;
                put_record(&mut t, &k, &saved)?;
                Ok(saved)
            })
            .await
    }

    async fn upsert_stores(&self, tenant_id: &str, stores: &[Store]) -> Result<()> {
        let items = stores
            .iter()
            .map(|s| (key(&[tenant_id, &s.store_id]), s.clone()))
            .collect();
        self.upsert(STORES, items).await
    }

    async fn list_stores(&self, tenant_id: &str, after: &str, limit: usize) -> Result<Vec<Store>> {
        self.list(STORES, tenant_id, after, limit).await
    }

    async fn upsert_products(&self, tenant_id: &str, products: &[Product]) -> Result<()> {
        let items = products
            .iter()
            .map(|p| (key(&[tenant_id, &p.sku]), p.clone()))
            .collect();
        self.upsert(PRODUCTS, items).await
    }

    async fn list_products(
        &self,
        tenant_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<Product>> {
        self.list(PRODUCTS, tenant_id, after, limit).await
    }

    async fn checkout_context(
        &self,
        tenant_id: &str,
        store_id: &str,
        skus: &[String],
        codes: &[String],
    ) -> Result<CheckoutContext> {
        let tenant = tenant_id.to_string();
        let program_key = key(&[tenant_id]);
        let store_key = key(&[tenant_id, store_id]);
        let product_keys: Vec<String> = skus.iter().map(|s| key(&[tenant_id, s])).collect();
        let codes = codes.to_vec();
        let keys = product_keys.len() + 2 * codes.len() + 3;
        self.db
            .read_keys(keys, move |txn| {
                let products = match open_for_read(txn, PRODUCTS)? {
                    Some(t) => product_keys
                        .iter()
                        .map(|k| get_record(&t, k))
                        .collect::<Result<Vec<_>>>()?,
                    None => vec![None; product_keys.len()],
                };
                let campaigns_version = match open_for_read(txn, CAMPAIGN_VERSIONS)? {
                    Some(t) => t.get(tenant.as_str()).map_err(e)?.map_or(0, |v| v.value()),
                    None => 0,
                };
                let mut coupons = Vec::with_capacity(codes.len());
                for code in &codes {
                    let coupon: Option<Coupon> = read_record(txn, COUPONS, &key(&[&tenant, code]))?;
                    coupons.push(match coupon {
                        Some(c) => {
                            let uses = read_counter(txn, &tenant, &coupon_counter(code))?;
                            Some((c, uses))
                        }
                        None => None,
                    });
                }
                Ok(CheckoutContext {
                    program: read_record(txn, PROGRAMS, &program_key)?,
                    store: read_record(txn, STORES, &store_key)?,
                    products,
                    campaigns_version,
                    coupons,
                })
            })
            .await
    }

    async fn purchase(&self, tenant_id: &str, receipt_id: &str) -> Result<Option<Purchase>> {
        self.get(PURCHASES, key(&[tenant_id, receipt_id])).await
    }

    async fn purchases_after(
        &self,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<Purchase>> {
        let after = after.map(|(t, r)| key(&[&t, &r]));
        self.db
            .read(move |txn| records_after(txn, PURCHASES, after.as_deref(), limit))
            .await
    }

    async fn put_purchase(
        &self,
        purchase: &Purchase,
        expected_version: Option<u64>,
        claims: &[Claim],
    ) -> Result<Put> {
        let purchase = purchase.clone();
        let claims = claims.to_vec();
        self.db
            .write(move |txn| {
                let tenant = purchase.receipt.tenant_id.as_str();
                let mut t = txn.open_table(PURCHASES).map_err(e)?;
                let k = key(&[tenant, &purchase.receipt.receipt_id]);
                let current: Option<Purchase> = get_record(&t, &k)?;
                if current.as_ref().map(|p| p.version) != expected_version {
                    return Ok(Put::Conflict);
                }
                // Claims are all checked before any is written: a refusal writes nothing.
                if let Some(i) = apply_claims(txn, tenant, &claims)? {
                    return Ok(Put::Refused(i));
                }
                put_record(&mut t, &k, &purchase)?;
                // Filed under the time it became unsettled; moved or removed as that changes.
                let receipt = purchase.receipt.receipt_id.as_str();
                let filed = |since: Millis| unsettled_key(since, tenant, receipt);
                let was = current.as_ref().and_then(Purchase::unsettled_since);
                let now = purchase.unsettled_since();
                if was != now {
                    let mut waiting = txn.open_table(PENDING).map_err(e)?;
                    if let Some(since) = was {
                        waiting.remove(filed(since).as_str()).map_err(e)?;
                    }
                    if let Some(since) = now {
                        waiting.insert(filed(since).as_str(), &[][..]).map_err(e)?;
                    }
                }
                if let (PurchaseState::Committed { commit_time, .. }, Some(m)) =
                    (&purchase.state, &purchase.evaluation.member)
                {
                    // Filed where the member's history is now (a receipt resolved just
                    // before a merge is committed after it).
                    let merged = txn.open_table(MERGED).map_err(e)?;
                    let member = survivor(&merged, tenant, &m.member_id)?;
                    drop(merged);
                    let mut index = txn.open_table(MEMBER_PURCHASES).map_err(e)?;
                    let position = history_position(*commit_time, &purchase.receipt.receipt_id);
                    index
                        .insert(key(&[tenant, &member, &position]).as_str(), &[][..])
                        .map_err(e)?;
                }
                Ok(Put::Written)
            })
            .await
    }

    async fn stale_unsettled(
        &self,
        before: Millis,
        after: Option<&Unsettled>,
        limit: usize,
    ) -> Result<Vec<Unsettled>> {
        let end = format!("{:020}", before.max(0));
        let start = after.map(|u| unsettled_key(u.since, &u.tenant_id, &u.receipt_id));
        self.db
            .read(move |txn| {
                let Some(t) = open_for_read(txn, PENDING)? else {
                    return Ok(Vec::new());
                };
                let range = match &start {
                    Some(s) => t.range::<&str>((
                        Bound::Excluded(s.as_str()),
                        Bound::Excluded(end.as_str()),
                    )),
                    None => t.range::<&str>(..end.as_str()),
                };
                let mut out = Vec::new();
                for item in range.map_err(e)? {
                    let (k, _) = item.map_err(e)?;
                    let mut parts = k.value().split('\0');
                    if let (Some(since), Some(tenant), Some(receipt)) =
                        (parts.next(), parts.next(), parts.next())
                    {
                        out.push(Unsettled {
                            since: since.parse().map_err(Error::internal)?,
                            tenant_id: tenant.to_string(),
                            receipt_id: receipt.to_string(),
                        });
                    }
                    if out.len() == limit {
                        break;
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn move_member_purchases(&self, tenant_id: &str, from: &str, to: &str) -> Result<u64> {
        let (start, end) = prefix_range(&[tenant_id, from]);
        let (tenant, from, to) = (tenant_id.to_string(), from.to_string(), to.to_string());
        self.db
            .write(move |txn| {
                // Filed under the end of `to`'s chain: a survivor merged away meanwhile has
                // its history listed under its own survivor.
                let mut merged = txn.open_table(MERGED).map_err(e)?;
                let to = survivor(&merged, &tenant, &to)?;
                if to == from {
                    return Ok(0);
                }
                put_record(&mut merged, &key(&[&tenant, &from]), &to)?;
                drop(merged);
                let mut index = txn.open_table(MEMBER_PURCHASES).map_err(e)?;
                let mut positions = Vec::new();
                for item in index.range(start.as_str()..end.as_str()).map_err(e)? {
                    let (k, _) = item.map_err(e)?;
                    positions.push(k.value().to_string());
                }
                for old in &positions {
                    index.remove(old.as_str()).map_err(e)?;
                    let position = old.rsplit('\0').next().unwrap_or_default();
                    index
                        .insert(key(&[&tenant, &to, position]).as_str(), &[][..])
                        .map_err(e)?;
                }
                Ok(positions.len() as u64)
            })
            .await
    }

    async fn member_purchases(
        &self,
        tenant_id: &str,
        member_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Purchase)>> {
        let (start, end) = prefix_range(&[tenant_id, member_id]);
        let start = if after.is_empty() {
            start
        } else {
            // Just past the token's key.
            format!("{}\u{1}", key(&[tenant_id, member_id, after]))
        };
        let tenant = tenant_id.to_string();
        self.db
            .read(move |txn| {
                let Some(index) = open_for_read(txn, MEMBER_PURCHASES)? else {
                    return Ok(Vec::new());
                };
                let mut out = Vec::new();
                for item in index.range(start.as_str()..end.as_str()).map_err(e)? {
                    let (k, _) = item.map_err(e)?;
                    let position = k
                        .value()
                        .rsplit('\0')
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    let receipt = position.split_once(':').map(|(_, r)| r).unwrap_or_default();
                    if let Some(p) =
                        read_record::<Purchase>(txn, PURCHASES, &key(&[&tenant, receipt]))?
                    {
                        out.push((position, p));
                    }
                    if out.len() == limit {
                        break;
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn claim(&self, tenant_id: &str, claims: &[Claim]) -> Result<Option<usize>> {
        let tenant = tenant_id.to_string();
        let claims = claims.to_vec();
        self.db
            .write(move |txn| apply_claims(txn, &tenant, &claims))
            .await
    }

    async fn counters(&self, tenant_id: &str, names: &[String]) -> Result<Vec<i64>> {
        let tenant = tenant_id.to_string();
        let names = names.to_vec();
        self.db
            .read_keys(names.len(), move |txn| {
                names
                    .iter()
                    .map(|n| read_counter(txn, &tenant, n))
                    .collect()
            })
            .await
    }

    async fn campaigns(&self, tenant_id: &str) -> Result<(u64, Vec<Campaign>, Vec<StackingGroup>)> {
        let tenant = tenant_id.to_string();
        self.db
            .read(move |txn| {
                let version = match open_for_read(txn, CAMPAIGN_VERSIONS)? {
                    Some(t) => t.get(tenant.as_str()).map_err(e)?.map_or(0, |v| v.value()),
                    None => 0,
                };
                let all = |table: Records| -> Result<Vec<Vec<u8>>> {
                    let (start, end) = prefix_range(&[&tenant]);
                    let Some(t) = open_for_read(txn, table)? else {
                        return Ok(Vec::new());
                    };
                    let mut out = Vec::new();
                    for item in t.range(start.as_str()..end.as_str()).map_err(e)? {
                        out.push(item.map_err(e)?.1.value().to_vec());
                    }
                    Ok(out)
                };
                let campaigns = all(CAMPAIGNS)?
                    .iter()
                    .map(|b| decode(b))
                    .collect::<Result<Vec<Campaign>>>()?;
                let groups = all(GROUPS)?
                    .iter()
                    .map(|b| decode(b))
                    .collect::<Result<Vec<StackingGroup>>>()?;
                Ok((version, campaigns, groups))
            })
            .await
    }

    async fn campaign(&self, tenant_id: &str, campaign_id: &str) -> Result<Option<Campaign>> {
        self.get(CAMPAIGNS, key(&[tenant_id, campaign_id])).await
    }

    async fn save_campaign(
        &self,
        campaign: Campaign,
        expected_version: Option<i64>,
    ) -> Result<Campaign> {
        self.db
            .write(move |txn| {
                let tenant = campaign.tenant_id.clone();
                let mut t = txn.open_table(CAMPAIGNS).map_err(e)?;
                let k = key(&[&tenant, &campaign.campaign_id]);
                let current: Option<Campaign> = get_record(&t, &k)?;
                let current_version = match (&current, expected_version) {
                    (Some(_), None) => {
                        return Err(Error::AlreadyExists(format!(
                            "campaign {} exists; update it instead",
                            campaign.campaign_id
                        )));
                    }
                    (None, Some(v)) if v != 0 => {
                        return Err(Error::NotFound(format!(
                            "campaign {} not found",
                            campaign.campaign_id
                        )));
                    }
                    (Some(c), Some(v)) if v != 0 && v != c.version => {
                        return Err(Error::FailedPrecondition(format!(
                            "campaign is at version {}, not {v}: read it again",
                            c.version
                        )));
                    }
                    (c, _) => c.as_ref().map_or(0, |c| c.version),
                };
                let mut saved = campaign.clone();
                saved.version = current_version + 1;
                put_record(&mut t, &k, &saved)?;
                drop(t);
                let mut history = txn.open_table(CAMPAIGN_HISTORY).map_err(e)?;
                let version = format!("{:020}", saved.version);
                put_record(
                    &mut history,
                    &key(&[&tenant, &saved.campaign_id, &version]),
                    &saved,
                )?;
                drop(history);
                bump_campaigns(txn, &tenant)?;
                Ok(saved)
            })
            .await
    }

    async fn campaign_versions(
        &self,
        tenant_id: &str,
        campaign_id: &str,
        before: i64,
        limit: usize,
    ) -> Result<Vec<Campaign>> {
        let (start, end) = prefix_range(&[tenant_id, campaign_id]);
        let end = if before > 0 {
            key(&[tenant_id, campaign_id, &format!("{before:020}")])
        } else {
            end
        };
        self.db
            .read(move |txn| {
                let Some(t) = open_for_read(txn, CAMPAIGN_HISTORY)? else {
                    return Ok(Vec::new());
                };
                let mut out = Vec::new();
                for item in t.range(start.as_str()..end.as_str()).map_err(e)?.rev() {
                    out.push(decode(item.map_err(e)?.1.value())?);
                    if out.len() == limit {
                        break;
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn save_group(&self, group: StackingGroup) -> Result<()> {
        self.db
            .write(move |txn| {
                let mut t = txn.open_table(GROUPS).map_err(e)?;
                put_record(&mut t, &key(&[&group.tenant_id, &group.group_id]), &group)?;
                drop(t);
                bump_campaigns(txn, &group.tenant_id)
            })
            .await
    }

    async fn coupon(&self, tenant_id: &str, code: &str) -> Result<Option<(Coupon, i64)>> {
        let ctx = self
            .checkout_context(tenant_id, "", &[], &[code.to_string()])
            .await?;
        Ok(ctx.coupons.into_iter().next().flatten())
    }

    async fn insert_coupons(
        &self,
        tenant_id: &str,
        batch_key: &str,
        coupons: &[Coupon],
    ) -> Result<Vec<String>> {
        let tenant = tenant_id.to_string();
        let batch = (!batch_key.is_empty()).then(|| key(&[tenant_id, batch_key]));
        let coupons = coupons.to_vec();
        self.db
            .write(move |txn| {
                let mut batches = txn.open_table(COUPON_BATCHES).map_err(e)?;
                if let Some(b) = &batch
                    && let Some(codes) = get_record::<Vec<String>>(&batches, b)?
                {
                    return Ok(codes);
                }
                let mut t = txn.open_table(COUPONS).map_err(e)?;
                for c in &coupons {
                    let k = key(&[&tenant, &c.code]);
                    if t.get(k.as_str()).map_err(e)?.is_some() {
                        return Err(Error::AlreadyExists(format!("coupon {} exists", c.code)));
                    }
                    put_record(&mut t, &k, c)?;
                }
                let codes: Vec<String> = coupons.iter().map(|c| c.code.clone()).collect();
                if let Some(b) = &batch {
                    put_record(&mut batches, b, &codes)?;
                }
                Ok(codes)
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
        let store = EmbeddedPromotionStore::open(&dir.path().join("promotion.redb")).unwrap();
        super::super::conformance::run_all(&store).await;
    }
}
