//! The promotion store on Redis, shared by every promotion replica.
//!
//! All of a tenant's records live under keys sharing one hash tag, so everything works on
//! Redis Cluster and a commit's purchase record and its claims on budgets, limits and
//! coupons change in one atomic script: budgets hold exactly across replicas. Conditional
//! writes (a purchase at its expected version, a campaign or program saved over the
//! version read, a coupon batch) are Lua scripts that check and write in one step; reads
//! that must agree with each other (the checkout context, the campaign set) are one
//! `MULTI`/`EXEC`. Records are encoded as in the embedded store, purchases LZ4-compressed
//! on top. A set of tenants (its own
//! key) lets the repair and the history walks find every tenant's purchases.
//!
//! This Redis holds the only copy of the promotion state, so it must persist it: see
//! ARCHITECTURE.md, "Promotion on Redis".

use loyalty_platform::clock::Millis;
use loyalty_platform::embedded::{decode, encode};
use loyalty_platform::error::{Error, Result};
use loyalty_platform::redis_conn::{RememberedSet, StoreConn, conflict_pause, lex_after};
use redis::{Script, Value};
use serde::de::DeserializeOwned;

use super::embedded::{EmbeddedPromotionStore, Row, Table};
use super::{CheckoutContext, PromotionStore, Put, Unsettled};
use crate::campaign::{Campaign, Coupon, StackingGroup};
use crate::catalog::{Product, Store};
use crate::program::Program;
use crate::purchase::{Purchase, PurchaseState};
use crate::usage::{Claim, coupon_counter};

/// The set of tenants with purchases.
const TENANTS: &str = "lp:tenants";
/// How often a versioned save reads and tries again when another save got in between.
const MAX_SAVE_ATTEMPTS: usize = 16;
/// How often a write is filed again because the member's history moved (a merge) between
/// the caller's look and the script.
const MAX_MERGE_RETRIES: usize = 8;

/// Orders a member's purchases newest first: the commit time counted down, then the id.
/// The same positions as the embedded store, so paging tokens mean the same.
fn history_position(commit_time: i64, receipt_id: &str) -> String {
    format!("{:020}:{receipt_id}", i64::MAX - commit_time.max(0))
}

/// Where an unsettled purchase is filed in its tenant's list: by the time it became
/// unsettled (zero-padded, so the list sorts by it), then receipt id.
fn unsettled_entry(since: Millis, receipt: &str) -> String {
    format!("{:020}\0{receipt}", since.max(0))
}

/// The key prefix of one tenant. The tag holds the tenant's length, so whatever the id
/// contains (even `}`), every key of a tenant carries the same prefix and so the same tag.
fn prefix(tenant: &str) -> String {
    format!("lp:{{{}:{tenant}}}", tenant.len())
}

/// The keys of one tenant.
struct Keys {
    p: String,
}

impl Keys {
    fn of(tenant: &str) -> Self {
        Self { p: prefix(tenant) }
    }
    fn k(&self, name: &str) -> String {
        format!("{}:{name}", self.p)
    }
    /// A member's purchase history: receipts by [`history_position`].
    fn history(&self, member: &str) -> String {
        format!("{}:mh:{member}", self.p)
    }
}

/// What errors call this store.
const STORE: &str = "promotion store";

/// The largest purchase record a stored value may unpack to (far above any receipt's).
const MAX_PURCHASE_BYTES: usize = 16 << 20;

/// A purchase record as stored: encoded, then LZ4-compressed with its length in front.
/// Purchases are most of what this store holds, and their evaluations repeat campaign ids
/// and reasons: compressed, a typical record takes about a third of the memory.
fn pack_purchase(p: &Purchase) -> Result<Vec<u8>> {
    Ok(lz4_flex::block::compress_prepend_size(&encode(p)?))
}

fn unpack_purchase(bytes: &[u8]) -> Result<Purchase> {
    let size = bytes
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    if size.is_none_or(|n| n > MAX_PURCHASE_BYTES) {
        return Err(Error::internal(anyhow::anyhow!(
            "a stored purchase record is damaged (length {size:?})"
        )));
    }
    let raw = lz4_flex::block::decompress_size_prepended(bytes).map_err(Error::internal)?;
    decode(&raw)
}

fn decode_all<T: DeserializeOwned>(values: Vec<Option<Vec<u8>>>) -> Result<Vec<Option<T>>> {
    values
        .into_iter()
        .map(|v| v.as_deref().map(decode).transpose())
        .collect()
}

/// A script's answer: its first element as text, and the rest.
fn answer(value: Value) -> Result<(String, Vec<Value>)> {
    let Value::Array(mut items) = value else {
        return Err(Error::internal(anyhow::anyhow!(
            "unexpected script answer {value:?}"
        )));
    };
    if items.is_empty() {
        return Err(Error::internal(anyhow::anyhow!("empty script answer")));
    }
    let rest = items.split_off(1);
    let word: String = redis::from_redis_value(items.remove(0)).map_err(Error::internal)?;
    Ok((word, rest))
}

/// The first value after a script's answer word.
fn first_of<T: redis::FromRedisValue>(rest: Vec<Value>) -> Result<T> {
    match rest.into_iter().next() {
        Some(v) => redis::from_redis_value(v).map_err(Error::internal),
        None => Err(Error::internal(anyhow::anyhow!("short script answer"))),
    }
}

#[derive(Clone)]
pub struct RedisPromotionStore {
    redis: StoreConn,
    put: Script,
    moved: Script,
    cas: Script,
    group: Script,
    coupons: Script,
    /// The tenants with purchases ([`TENANTS`]).
    tenants: RememberedSet,
}

impl std::fmt::Debug for RedisPromotionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPromotionStore")
            .field("redis", &self.redis)
            .finish_non_exhaustive()
    }
}

impl RedisPromotionStore {
    /// Prepares one multiplexed connection to the Redis at `url`, opened on first use.
    pub fn connect(url: &str) -> anyhow::Result<Self> {
        Ok(Self::with(StoreConn::single(STORE, url)?))
    }

    /// Prepares one multiplexed connection per node of the Redis Cluster seeded by `nodes`.
    /// All of a tenant's keys share a hash slot.
    pub fn connect_cluster(nodes: &[String]) -> anyhow::Result<Self> {
        Ok(Self::with(StoreConn::cluster(STORE, nodes)?))
    }

    /// The Redis (or cluster) of `storage.redis`.
    pub fn for_config(config: &loyalty_platform::config::RedisConfig) -> anyhow::Result<Self> {
        Ok(Self::with(StoreConn::for_config(STORE, config)?))
    }

    fn with(redis: StoreConn) -> Self {
        Self {
            redis,
            put: Script::new(include_str!("redis/put.lua")),
            moved: Script::new(include_str!("redis/move.lua")),
            cas: Script::new(include_str!("redis/cas.lua")),
            group: Script::new(include_str!("redis/group.lua")),
            coupons: Script::new(include_str!("redis/coupons.lua")),
            tenants: RememberedSet::new(TENANTS),
        }
    }

    async fn get_record<T: DeserializeOwned>(&self, key: &str, field: &str) -> Result<Option<T>> {
        let raw: Option<Vec<u8>> = self
            .redis
            .query(redis::cmd("HGET").arg(key).arg(field))
            .await?;
        raw.as_deref().map(decode).transpose()
    }

    /// Records of a hash by field, in the order asked.
    async fn get_records<T: DeserializeOwned>(
        &self,
        key: &str,
        fields: &[String],
    ) -> Result<Vec<Option<T>>> {
        if fields.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<Option<Vec<u8>>> = self
            .redis
            .query(redis::cmd("HMGET").arg(key).arg(fields))
            .await?;
        decode_all(raw)
    }

    /// Purchase records by receipt id, in the order asked.
    async fn purchases(&self, keys: &Keys, receipts: &[String]) -> Result<Vec<Option<Purchase>>> {
        if receipts.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<Option<Vec<u8>>> = self
            .redis
            .query(redis::cmd("HMGET").arg(keys.k("pur")).arg(receipts))
            .await?;
        raw.into_iter()
            .map(|v| v.as_deref().map(unpack_purchase).transpose())
            .collect()
    }

    /// Saves records by id in a hash, with the ids in a lexically sorted set (listing).
    async fn upsert<T: serde::Serialize>(
        &self,
        tenant_id: &str,
        table: &str,
        items: &[(&str, &T)],
    ) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let keys = Keys::of(tenant_id);
        let (ids, records) = (keys.k(&format!("{table}:ids")), keys.k(table));
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (id, item) in items {
            pipe.cmd("ZADD").arg(&ids).arg(0).arg(*id).ignore();
            pipe.cmd("HSET")
                .arg(&records)
                .arg(*id)
                .arg(encode(item)?)
                .ignore();
        }
        self.redis.pipeline::<()>(&pipe).await
    }

    async fn list<T: DeserializeOwned>(
        &self,
        tenant_id: &str,
        table: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<T>> {
        let keys = Keys::of(tenant_id);
        let ids: Vec<String> = self
            .redis
            .query(
                redis::cmd("ZRANGEBYLEX")
                    .arg(keys.k(&format!("{table}:ids")))
                    .arg(lex_after(after))
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit),
            )
            .await?;
        let records = self.get_records(&keys.k(table), &ids).await?;
        Ok(records.into_iter().flatten().collect())
    }

    /// Every tenant with purchases, in order.
    async fn tenants(&self) -> Result<Vec<String>> {
        let mut tenants: Vec<String> = self
            .redis
            .query(redis::cmd("SMEMBERS").arg(TENANTS))
            .await?;
        tenants.sort();
        Ok(tenants)
    }

    /// Adds the tenant to [`TENANTS`] before its first purchase is written, once per
    /// process (the walks then find every purchase written).
    async fn register_tenant(&self, tenant_id: &str) -> Result<()> {
        self.tenants.add(&self.redis, tenant_id).await
    }

    /// Runs the purchase script; `purchase` `None` applies the claims alone.
    async fn put(
        &self,
        tenant_id: &str,
        purchase: Option<(&Purchase, Option<u64>)>,
        claims: &[Claim],
    ) -> Result<Put> {
        let keys = Keys::of(tenant_id);
        let (member, position) = match purchase {
            Some((p, _)) => match (&p.state, &p.evaluation.member) {
                (PurchaseState::Committed { commit_time, .. }, Some(m)) => (
                    m.member_id.as_str(),
                    history_position(*commit_time, &p.receipt.receipt_id),
                ),
                _ => ("", String::new()),
            },
            None => ("", String::new()),
        };
        let encoded = purchase.map(|(p, _)| pack_purchase(p)).transpose()?;
        // Filed under the member itself unless the script finds it merged away.
        let mut survivor = member.to_string();
        for _ in 0..MAX_MERGE_RETRIES {
            let mut invocation = self.put.prepare_invoke();
            for name in ["purv", "ctr", "pur", "pids", "uns", "unsr", "merged"] {
                invocation.key(keys.k(name));
            }
            invocation.key(keys.history(&survivor));
            match (purchase, &encoded) {
                (Some((p, expected)), Some(encoded)) => {
                    invocation
                        .arg(&p.receipt.receipt_id)
                        .arg(expected.map(|v| v.to_string()).unwrap_or_default())
                        .arg(p.version)
                        .arg(encoded.as_slice())
                        .arg(
                            p.unsettled_since()
                                .map(|since| unsettled_entry(since, &p.receipt.receipt_id))
                                .unwrap_or_default(),
                        );
                }
                _ => {
                    invocation.arg("").arg("").arg(0).arg("").arg("");
                }
            }
            invocation.arg(member).arg(&survivor).arg(&position);
            invocation.arg(claims.len());
            for c in claims {
                invocation.arg(&c.counter).arg(c.amount).arg(c.limit);
            }
            let value: Value = self.redis.invoke(&invocation).await?;
            let (word, rest) = answer(value)?;
            return match word.as_str() {
                "written" => Ok(Put::Written),
                "conflict" => Ok(Put::Conflict),
                "refused" => Ok(Put::Refused(first_of(rest)?)),
                "moved" => {
                    survivor = first_of(rest)?;
                    continue;
                }
                other => Err(Error::internal(anyhow::anyhow!(
                    "unexpected purchase script answer {other}"
                ))),
            };
        }
        Err(Error::Unavailable(format!(
            "member {member}'s history kept moving while the purchase was filed: try again"
        )))
    }

    /// Saves a versioned record if its stored version is still the one read; `false` when
    /// another save got in between.
    async fn compare_and_save(&self, save: Save<'_>) -> Result<bool> {
        let mut invocation = self.cas.prepare_invoke();
        invocation.key(save.versions).key(save.records);
        if let Some((history, campaigns_version)) = save.history {
            invocation.key(history).key(campaigns_version);
        }
        invocation
            .arg(save.field)
            .arg(save.read.map(|v| v.to_string()).unwrap_or_default())
            .arg(save.version)
            .arg(save.encoded);
        let saved: i64 = self.redis.invoke(&invocation).await?;
        Ok(saved == 1)
    }
}

/// A versioned record to save over the version read.
struct Save<'a> {
    /// The hash of versions and the hash of records, by field.
    versions: String,
    records: String,
    field: &'a str,
    /// The version read (`None`: none was stored).
    read: Option<i64>,
    version: i64,
    encoded: Vec<u8>,
    /// A campaign keeps its history and bumps its tenant's campaigns version: those keys.
    history: Option<(String, String)>,
}

/// What [`RedisPromotionStore::copy_from`] copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Copied {
    pub tenants: usize,
    pub purchases: u64,
    pub campaigns: u64,
    pub coupons: u64,
    /// Every row of every table.
    pub rows: u64,
}

impl RedisPromotionStore {
    /// Copies everything the embedded store `from` holds (a promotion moving from
    /// `promotion.store = "embedded"` to `"redis"`; nothing may write to either meanwhile).
    /// Refuses, writing nothing, when this Redis already holds promotion data.
    pub async fn copy_from(&self, from: &EmbeddedPromotionStore) -> Result<Copied> {
        const PAGE: usize = 500;
        let held: i64 = self.redis.query(redis::cmd("SCARD").arg(TENANTS)).await?;
        let mut tenants = std::collections::BTreeSet::new();
        let mut after = None;
        loop {
            let (rows, last) = from.rows(Table::Programs, after, PAGE).await?;
            for row in &rows {
                tenants.insert(row.key[0].clone());
            }
            match last {
                Some(l) if rows.len() == PAGE => after = Some(l),
                _ => break,
            }
        }
        let mut taken = Vec::new();
        for tenant in &tenants {
            let keys = Keys::of(tenant);
            let n: i64 = self
                .redis
                .query(redis::cmd("EXISTS").arg(keys.k("prog")).arg(keys.k("camp")))
                .await?;
            if n > 0 {
                taken.push(tenant.clone());
            }
        }
        if held > 0 || !taken.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "this Redis already holds promotion data ({held} tenants with purchases; programs or campaigns of {taken:?}): copy into an empty one"
            )));
        }
        let mut copied = Copied {
            tenants: tenants.len(),
            ..Copied::default()
        };
        for table in Table::ALL {
            let mut after = None;
            loop {
                let (rows, last) = from.rows(table, after, PAGE).await?;
                // Rows of one tenant share a slot: one pipeline per run of a tenant's rows,
                // since a cluster refuses a pipeline across slots. Nothing reads the target
                // meanwhile.
                let mut purchase_tenants = std::collections::BTreeSet::new();
                for tenant in purchase_tenants_of(table, &rows) {
                    purchase_tenants.insert(tenant);
                }
                for tenant in &purchase_tenants {
                    self.register_tenant(tenant).await?;
                }
                let tenant_of = |row: &Row| {
                    let at = usize::from(table == Table::Unsettled);
                    row.key.get(at).cloned().unwrap_or_default()
                };
                for run in rows.chunk_by(|a, b| tenant_of(a) == tenant_of(b)) {
                    let mut pipe = redis::pipe();
                    for row in run {
                        copied.rows += 1;
                        copy_row(&mut pipe, table, row, &mut copied)?;
                    }
                    self.redis.pipeline::<()>(&pipe).await?;
                }
                match last {
                    Some(l) if rows.len() == PAGE => after = Some(l),
                    _ => break,
                }
            }
        }
        Ok(copied)
    }
}

/// The tenants of a page of purchase rows: registered before their purchases are written,
/// so the walks find every purchase copied.
fn purchase_tenants_of(table: Table, rows: &[Row]) -> Vec<String> {
    if table != Table::Purchases {
        return Vec::new();
    }
    rows.iter().filter_map(|r| r.key.first().cloned()).collect()
}

/// The commands that write one embedded row where this store keeps it.
fn copy_row(
    pipe: &mut redis::Pipeline,
    table: Table,
    row: &Row,
    copied: &mut Copied,
) -> Result<()> {
    let part = |i: usize| -> Result<&str> {
        row.key.get(i).map(String::as_str).ok_or_else(|| {
            Error::internal(anyhow::anyhow!(
                "a {table:?} row has a short key {:?}",
                row.key
            ))
        })
    };
    let keys = Keys::of(part(0)?);
    let bytes = row.value.as_slice();
    let text = || String::from_utf8_lossy(bytes).into_owned();
    match table {
        Table::Programs => {
            let program: Program = decode(bytes)?;
            pipe.cmd("HSET")
                .arg(keys.k("prog"))
                .arg("")
                .arg(bytes)
                .ignore();
            pipe.cmd("HSET")
                .arg(keys.k("progv"))
                .arg("")
                .arg(program.version)
                .ignore();
        }
        Table::Stores | Table::Products => {
            let name = if table == Table::Stores {
                "stores"
            } else {
                "products"
            };
            let id = part(1)?;
            pipe.cmd("ZADD")
                .arg(keys.k(&format!("{name}:ids")))
                .arg(0)
                .arg(id)
                .ignore();
            pipe.cmd("HSET")
                .arg(keys.k(name))
                .arg(id)
                .arg(bytes)
                .ignore();
        }
        Table::Purchases => {
            let purchase: Purchase = decode(bytes)?;
            let receipt = part(1)?;
            pipe.cmd("HSET")
                .arg(keys.k("pur"))
                .arg(receipt)
                .arg(pack_purchase(&purchase)?)
                .ignore();
            pipe.cmd("HSET")
                .arg(keys.k("purv"))
                .arg(receipt)
                .arg(purchase.version)
                .ignore();
            pipe.cmd("ZADD")
                .arg(keys.k("pids"))
                .arg(0)
                .arg(receipt)
                .ignore();
            copied.purchases += 1;
        }
        Table::MemberPurchases => {
            pipe.cmd("ZADD")
                .arg(keys.history(part(1)?))
                .arg(0)
                .arg(part(2)?)
                .ignore();
        }
        Table::Unsettled => {
            // (since, tenant, receipt): the tenant comes second here.
            let keys = Keys::of(part(1)?);
            let since: Millis = part(0)?.parse().map_err(Error::internal)?;
            let receipt = part(2)?;
            let entry = unsettled_entry(since, receipt);
            pipe.cmd("ZADD")
                .arg(keys.k("uns"))
                .arg(0)
                .arg(&entry)
                .ignore();
            pipe.cmd("HSET")
                .arg(keys.k("unsr"))
                .arg(receipt)
                .arg(&entry)
                .ignore();
        }
        Table::Merged => {
            let into: String = decode(bytes)?;
            pipe.cmd("HSET")
                .arg(keys.k("merged"))
                .arg(part(1)?)
                .arg(into)
                .ignore();
        }
        Table::Campaigns => {
            let campaign: Campaign = decode(bytes)?;
            let id = part(1)?;
            pipe.cmd("HSET")
                .arg(keys.k("camp"))
                .arg(id)
                .arg(bytes)
                .ignore();
            pipe.cmd("HSET")
                .arg(keys.k("campv"))
                .arg(id)
                .arg(campaign.version)
                .ignore();
            copied.campaigns += 1;
        }
        Table::CampaignHistory => {
            let version: i64 = part(2)?.parse().map_err(Error::internal)?;
            pipe.cmd("ZADD")
                .arg(keys.k(&format!("camph:{}", part(1)?)))
                .arg(version)
                .arg(bytes)
                .ignore();
        }
        Table::Groups => {
            pipe.cmd("HSET")
                .arg(keys.k("groups"))
                .arg(part(1)?)
                .arg(bytes)
                .ignore();
        }
        Table::Coupons => {
            pipe.cmd("HSET")
                .arg(keys.k("coupons"))
                .arg(part(1)?)
                .arg(bytes)
                .ignore();
            copied.coupons += 1;
        }
        Table::CouponBatches => {
            pipe.cmd("HSET")
                .arg(keys.k("cbatch"))
                .arg(part(1)?)
                .arg(bytes)
                .ignore();
        }
        Table::CampaignVersions => {
            pipe.cmd("SET").arg(keys.k("cver")).arg(text()).ignore();
        }
        Table::Counters => {
            pipe.cmd("HSET")
                .arg(keys.k("ctr"))
                .arg(part(1)?)
                .arg(text())
                .ignore();
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl PromotionStore for RedisPromotionStore {
    async fn program(&self, tenant_id: &str) -> Result<Option<Program>> {
        self.get_record(&Keys::of(tenant_id).k("prog"), "").await
    }

    async fn update_program(&self, program: Program, expected_version: i64) -> Result<Program> {
        let keys = Keys::of(&program.tenant_id);
        for attempt in 0..MAX_SAVE_ATTEMPTS {
            let current: Option<Program> = self.get_record(&keys.k("prog"), "").await?;
            let read = current.as_ref().map(|p| p.version);
            let current_version = read.unwrap_or(0);
            if expected_version != 0 && expected_version != current_version {
                return Err(Error::FailedPrecondition(format!(
                    "program is at version {current_version}, not {expected_version}: read it again"
                )));
            }
            let mut saved = program.clone();
            saved.version = current_version + 1;
            let save = Save {
                versions: keys.k("progv"),
                records: keys.k("prog"),
                field: "",
                read,
                version: saved.version,
                encoded: encode(&saved)?,
                history: None,
            };
            if self.compare_and_save(save).await? {
                return Ok(saved);
            }
            conflict_pause(attempt, MAX_SAVE_ATTEMPTS).await;
        }
        Err(Error::Unavailable(
            "the program changed on every attempt to save it: try again".into(),
        ))
    }

    async fn upsert_stores(&self, tenant_id: &str, stores: &[Store]) -> Result<()> {
        let items: Vec<(&str, &Store)> = stores.iter().map(|s| (s.store_id.as_str(), s)).collect();
        self.upsert(tenant_id, "stores", &items).await
    }

    async fn list_stores(&self, tenant_id: &str, after: &str, limit: usize) -> Result<Vec<Store>> {
        self.list(tenant_id, "stores", after, limit).await
    }

    async fn upsert_products(&self, tenant_id: &str, products: &[Product]) -> Result<()> {
        let items: Vec<(&str, &Product)> = products.iter().map(|p| (p.sku.as_str(), p)).collect();
        self.upsert(tenant_id, "products", &items).await
    }

    async fn list_products(
        &self,
        tenant_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<Product>> {
        self.list(tenant_id, "products", after, limit).await
    }

    async fn checkout_context(
        &self,
        tenant_id: &str,
        store_id: &str,
        skus: &[String],
        codes: &[String],
    ) -> Result<CheckoutContext> {
        let keys = Keys::of(tenant_id);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HGET").arg(keys.k("prog")).arg("");
        pipe.cmd("HGET").arg(keys.k("stores")).arg(store_id);
        pipe.cmd("GET").arg(keys.k("cver"));
        if !skus.is_empty() {
            pipe.cmd("HMGET").arg(keys.k("products")).arg(skus);
        }
        if !codes.is_empty() {
            let counters: Vec<String> = codes.iter().map(|c| coupon_counter(c)).collect();
            pipe.cmd("HMGET").arg(keys.k("coupons")).arg(codes);
            pipe.cmd("HMGET").arg(keys.k("ctr")).arg(counters);
        }
        let mut replies: std::collections::VecDeque<Value> =
            self.redis.pipeline::<Vec<Value>>(&pipe).await?.into();
        let mut next = || {
            replies
                .pop_front()
                .ok_or_else(|| Error::internal(anyhow::anyhow!("short checkout context reply")))
        };
        let one = |v: Value| -> Result<Option<Vec<u8>>> {
            redis::from_redis_value(v).map_err(Error::internal)
        };
        let many = |v: Value| -> Result<Vec<Option<Vec<u8>>>> {
            redis::from_redis_value(v).map_err(Error::internal)
        };
        let program = one(next()?)?.as_deref().map(decode).transpose()?;
        let store = one(next()?)?.as_deref().map(decode).transpose()?;
        let campaigns_version: Option<u64> =
            redis::from_redis_value(next()?).map_err(Error::internal)?;
        let products = if skus.is_empty() {
            Vec::new()
        } else {
            decode_all(many(next()?)?)?
        };
        let coupons = if codes.is_empty() {
            Vec::new()
        } else {
            let coupons: Vec<Option<Coupon>> = decode_all(many(next()?)?)?;
            let uses: Vec<Option<i64>> =
                redis::from_redis_value(next()?).map_err(Error::internal)?;
            coupons
                .into_iter()
                .zip(uses)
                .map(|(c, u)| c.map(|c| (c, u.unwrap_or(0))))
                .collect()
        };
        Ok(CheckoutContext {
            program,
            store,
            products,
            campaigns_version: campaigns_version.unwrap_or(0),
            coupons,
        })
    }

    async fn purchase(&self, tenant_id: &str, receipt_id: &str) -> Result<Option<Purchase>> {
        let keys = Keys::of(tenant_id);
        let mut found = self.purchases(&keys, &[receipt_id.to_string()]).await?;
        Ok(found.pop().flatten())
    }

    async fn purchases_after(
        &self,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<Purchase>> {
        let mut out = Vec::new();
        for tenant in self.tenants().await? {
            let start = match &after {
                Some((t, _)) if tenant < *t => continue,
                Some((t, r)) if tenant == *t => lex_after(r),
                _ => "-".into(),
            };
            let keys = Keys::of(&tenant);
            let ids: Vec<String> = self
                .redis
                .query(
                    redis::cmd("ZRANGEBYLEX")
                        .arg(keys.k("pids"))
                        .arg(start)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(limit - out.len()),
                )
                .await?;
            out.extend(self.purchases(&keys, &ids).await?.into_iter().flatten());
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    async fn put_purchase(
        &self,
        purchase: &Purchase,
        expected_version: Option<u64>,
        claims: &[Claim],
    ) -> Result<Put> {
        let tenant = purchase.receipt.tenant_id.as_str();
        self.register_tenant(tenant).await?;
        self.put(tenant, Some((purchase, expected_version)), claims)
            .await
    }

    async fn stale_unsettled(
        &self,
        before: Millis,
        after: Option<&Unsettled>,
        limit: usize,
    ) -> Result<Vec<Unsettled>> {
        let end = format!("({:020}", before.max(0));
        let mut out: Vec<Unsettled> = Vec::new();
        for tenant in self.tenants().await? {
            // Strictly after `after` in (since, tenant, receipt) order.
            let start = match after {
                None => "-".to_string(),
                Some(a) if tenant > a.tenant_id => format!("[{:020}", a.since.max(0)),
                Some(a) if tenant < a.tenant_id => {
                    format!("[{:020}", a.since.max(0).saturating_add(1))
                }
                Some(a) => format!("({}", unsettled_entry(a.since, &a.receipt_id)),
            };
            let entries: Vec<String> = self
                .redis
                .query(
                    redis::cmd("ZRANGEBYLEX")
                        .arg(Keys::of(&tenant).k("uns"))
                        .arg(start)
                        .arg(&end)
                        .arg("LIMIT")
                        .arg(0)
                        .arg(limit),
                )
                .await?;
            for entry in entries {
                let Some((since, receipt)) = entry.split_once('\0') else {
                    continue;
                };
                out.push(Unsettled {
                    since: since.parse().map_err(Error::internal)?,
                    tenant_id: tenant.clone(),
                    receipt_id: receipt.to_string(),
                });
            }
            // Only the first `limit` over all tenants are needed.
            out.sort();
            out.truncate(limit);
        }
        Ok(out)
    }

    async fn member_purchases(
        &self,
        tenant_id: &str,
        member_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Purchase)>> {
        let keys = Keys::of(tenant_id);
        let positions: Vec<String> = self
            .redis
            .query(
                redis::cmd("ZRANGEBYLEX")
                    .arg(keys.history(member_id))
                    .arg(lex_after(after))
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit),
            )
            .await?;
        let receipts: Vec<String> = positions
            .iter()
            .map(|p| {
                p.split_once(':')
                    .map(|(_, r)| r)
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        let purchases = self.purchases(&keys, &receipts).await?;
        Ok(positions
            .into_iter()
            .zip(purchases)
            .filter_map(|(position, p)| p.map(|p| (position, p)))
            .collect())
    }

    async fn move_member_purchases(&self, tenant_id: &str, from: &str, to: &str) -> Result<u64> {
        let keys = Keys::of(tenant_id);
        // Filed under `to` unless the script finds it merged away meanwhile.
        let mut survivor = to.to_string();
        for _ in 0..MAX_MERGE_RETRIES {
            let mut invocation = self.moved.prepare_invoke();
            invocation
                .key(keys.k("merged"))
                .key(keys.history(from))
                .key(keys.history(&survivor))
                .arg(from)
                .arg(to)
                .arg(&survivor);
            let value: Value = self.redis.invoke(&invocation).await?;
            let (word, rest) = answer(value)?;
            match word.as_str() {
                "done" => return first_of(rest),
                "moved" => survivor = first_of(rest)?,
                other => {
                    return Err(Error::internal(anyhow::anyhow!(
                        "unexpected merge script answer {other}"
                    )));
                }
            }
        }
        Err(Error::Unavailable(format!(
            "member {to}'s merges kept moving while {from}'s history moved: try again"
        )))
    }

    async fn claim(&self, tenant_id: &str, claims: &[Claim]) -> Result<Option<usize>> {
        Ok(match self.put(tenant_id, None, claims).await? {
            Put::Refused(i) => Some(i),
            Put::Written | Put::Conflict => None,
        })
    }

    async fn counters(&self, tenant_id: &str, names: &[String]) -> Result<Vec<i64>> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Option<i64>> = self
            .redis
            .query(
                redis::cmd("HMGET")
                    .arg(Keys::of(tenant_id).k("ctr"))
                    .arg(names),
            )
            .await?;
        Ok(values.into_iter().map(|v| v.unwrap_or(0)).collect())
    }

    async fn campaigns(&self, tenant_id: &str) -> Result<(u64, Vec<Campaign>, Vec<StackingGroup>)> {
        let keys = Keys::of(tenant_id);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("GET")
            .arg(keys.k("cver"))
            .cmd("HVALS")
            .arg(keys.k("camp"))
            .cmd("HVALS")
            .arg(keys.k("groups"));
        let (version, campaigns, groups): (Option<u64>, Vec<Vec<u8>>, Vec<Vec<u8>>) =
            self.redis.pipeline(&pipe).await?;
        let mut campaigns = campaigns
            .iter()
            .map(|b| decode(b))
            .collect::<Result<Vec<Campaign>>>()?;
        let mut groups = groups
            .iter()
            .map(|b| decode(b))
            .collect::<Result<Vec<StackingGroup>>>()?;
        // In id order, as the embedded store lists them.
        campaigns.sort_by(|a, b| a.campaign_id.cmp(&b.campaign_id));
        groups.sort_by(|a, b| a.group_id.cmp(&b.group_id));
        Ok((version.unwrap_or(0), campaigns, groups))
    }

    async fn campaign(&self, tenant_id: &str, campaign_id: &str) -> Result<Option<Campaign>> {
        self.get_record(&Keys::of(tenant_id).k("camp"), campaign_id)
            .await
    }

    async fn save_campaign(
        &self,
        campaign: Campaign,
        expected_version: Option<i64>,
    ) -> Result<Campaign> {
        let keys = Keys::of(&campaign.tenant_id);
        let history = keys.k(&format!("camph:{}", campaign.campaign_id));
        for attempt in 0..MAX_SAVE_ATTEMPTS {
            let current: Option<Campaign> = self
                .get_record(&keys.k("camp"), &campaign.campaign_id)
                .await?;
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
            let save = Save {
                versions: keys.k("campv"),
                records: keys.k("camp"),
                field: &campaign.campaign_id,
                read: current.map(|c| c.version),
                version: saved.version,
                encoded: encode(&saved)?,
                history: Some((history.clone(), keys.k("cver"))),
            };
            if self.compare_and_save(save).await? {
                return Ok(saved);
            }
            conflict_pause(attempt, MAX_SAVE_ATTEMPTS).await;
        }
        Err(Error::Unavailable(format!(
            "campaign {} changed on every attempt to save it: try again",
            campaign.campaign_id
        )))
    }

    async fn campaign_versions(
        &self,
        tenant_id: &str,
        campaign_id: &str,
        before: i64,
        limit: usize,
    ) -> Result<Vec<Campaign>> {
        let history = Keys::of(tenant_id).k(&format!("camph:{campaign_id}"));
        let max = if before > 0 {
            format!("({before}")
        } else {
            "+inf".into()
        };
        let raw: Vec<Vec<u8>> = self
            .redis
            .query(
                redis::cmd("ZREVRANGEBYSCORE")
                    .arg(history)
                    .arg(max)
                    .arg("-inf")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit),
            )
            .await?;
        raw.iter().map(|b| decode(b)).collect()
    }

    async fn save_group(&self, group: StackingGroup) -> Result<()> {
        let keys = Keys::of(&group.tenant_id);
        let mut invocation = self.group.prepare_invoke();
        invocation
            .key(keys.k("groups"))
            .key(keys.k("cver"))
            .arg(&group.group_id)
            .arg(encode(&group)?);
        let _: i64 = self.redis.invoke(&invocation).await?;
        Ok(())
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
        let keys = Keys::of(tenant_id);
        let codes: Vec<String> = coupons.iter().map(|c| c.code.clone()).collect();
        let mut invocation = self.coupons.prepare_invoke();
        invocation
            .key(keys.k("coupons"))
            .key(keys.k("cbatch"))
            .arg(batch_key)
            .arg(encode(&codes)?);
        for c in coupons {
            invocation.arg(&c.code).arg(encode(c)?);
        }
        let value: Value = self.redis.invoke(&invocation).await?;
        let (word, rest) = answer(value)?;
        match word.as_str() {
            "done" => Ok(codes),
            "repeat" => decode(&first_of::<Vec<u8>>(rest)?),
            "exists" => Err(Error::AlreadyExists(format!(
                "coupon {} exists",
                first_of::<String>(rest)?
            ))),
            other => Err(Error::internal(anyhow::anyhow!(
                "unexpected coupon script answer {other}"
            ))),
        }
    }

    async fn ping(&self) -> Result<()> {
        let _: String = self.redis.query(&redis::cmd("PING")).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use loyalty_platform::redis_server::RedisServer;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        let server = RedisServer::start().unwrap();
        let store = RedisPromotionStore::connect(&server.url()).unwrap();
        super::super::conformance::run_all(&store).await;
    }

    /// Two replicas (two stores, each with its own connection) racing for one budget grant
    /// it exactly.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_share_budgets_exactly() {
        let server = RedisServer::start().unwrap();
        let a = RedisPromotionStore::connect(&server.url()).unwrap();
        let b = RedisPromotionStore::connect(&server.url()).unwrap();
        super::super::conformance::racing_claims(&[&a, &b]).await;
    }

    /// Everything the conformance suite leaves in an embedded store, copied, reads back the
    /// same from Redis through every listing of the trait; a second copy is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_of_the_embedded_store_reads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let from = EmbeddedPromotionStore::open(&dir.path().join("promotion.redb")).unwrap();
        super::super::conformance::run_all(&from).await;
        let server = RedisServer::start().unwrap();
        let to = RedisPromotionStore::connect(&server.url()).unwrap();
        let copied = to.copy_from(&from).await.unwrap();
        assert!(
            copied.purchases >= 20 && copied.campaigns > 0 && copied.coupons > 0,
            "{copied:?}"
        );
        assert_same(&from, &to).await;
        let err = to.copy_from(&from).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    }

    /// Every tenant's rows of `table` in `s`.
    async fn all_rows(s: &EmbeddedPromotionStore, table: Table) -> Vec<Row> {
        let (rows, _) = s.rows(table, None, 100_000).await.unwrap();
        rows
    }

    async fn assert_same(a: &EmbeddedPromotionStore, b: &RedisPromotionStore) {
        let everything = a.purchases_after(None, 100_000).await.unwrap();
        assert_eq!(everything, b.purchases_after(None, 100_000).await.unwrap());
        assert_eq!(
            a.stale_unsettled(i64::MAX, None, 1000).await.unwrap(),
            b.stale_unsettled(i64::MAX, None, 1000).await.unwrap()
        );
        for row in all_rows(a, Table::MemberPurchases).await {
            let (tenant, member) = (&row.key[0], &row.key[1]);
            assert_eq!(
                a.member_purchases(tenant, member, "", 1000).await.unwrap(),
                b.member_purchases(tenant, member, "", 1000).await.unwrap(),
                "{tenant}/{member}"
            );
        }
        for row in all_rows(a, Table::Programs).await {
            let tenant = &row.key[0];
            assert_eq!(
                a.program(tenant).await.unwrap(),
                b.program(tenant).await.unwrap()
            );
            assert_eq!(
                a.list_stores(tenant, "", 1000).await.unwrap(),
                b.list_stores(tenant, "", 1000).await.unwrap()
            );
            assert_eq!(
                a.list_products(tenant, "", 1000).await.unwrap(),
                b.list_products(tenant, "", 1000).await.unwrap()
            );
        }
        for row in all_rows(a, Table::CampaignVersions).await {
            let tenant = &row.key[0];
            let (va, ca, ga) = a.campaigns(tenant).await.unwrap();
            let (vb, cb, gb) = b.campaigns(tenant).await.unwrap();
            assert_eq!((va, &ca, ga), (vb, &cb, gb), "{tenant}");
            for c in &ca {
                assert_eq!(
                    a.campaign_versions(tenant, &c.campaign_id, 0, 100)
                        .await
                        .unwrap(),
                    b.campaign_versions(tenant, &c.campaign_id, 0, 100)
                        .await
                        .unwrap()
                );
            }
        }
        for row in all_rows(a, Table::Coupons).await {
            let (tenant, code) = (&row.key[0], &row.key[1]);
            assert_eq!(
                a.coupon(tenant, code).await.unwrap(),
                b.coupon(tenant, code).await.unwrap()
            );
        }
        for row in all_rows(a, Table::Counters).await {
            let names = [row.key[1].clone()];
            assert_eq!(
                a.counters(&row.key[0], &names).await.unwrap(),
                b.counters(&row.key[0], &names).await.unwrap()
            );
        }
    }

    /// A copy into a Redis Cluster: every tenant's rows go in pipelines of their own slot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_into_a_cluster_reads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let from = EmbeddedPromotionStore::open(&dir.path().join("promotion.redb")).unwrap();
        super::super::conformance::run_all(&from).await;
        let nodes = RedisServer::start_cluster(3).unwrap();
        let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
        let to = RedisPromotionStore::connect_cluster(&urls).unwrap();
        let purchases = from.purchases_after(None, 100_000).await.unwrap();
        let tenants: std::collections::BTreeSet<&str> = purchases
            .iter()
            .map(|p| p.receipt.tenant_id.as_str())
            .collect();
        assert!(tenants.len() > 1, "rows of several tenants: {tenants:?}");
        to.copy_from(&from).await.unwrap();
        assert_same(&from, &to).await;
    }

    /// The same suite on a three-node Redis Cluster: every script and `MULTI` touches one
    /// tenant's keys, which share a hash slot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_on_redis_cluster() {
        let nodes = RedisServer::start_cluster(3).unwrap();
        let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
        let store = RedisPromotionStore::connect_cluster(&urls).unwrap();
        super::super::conformance::run_all(&store).await;
    }
}
