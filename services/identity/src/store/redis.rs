//! The identity store on Redis, shared by every identity replica.
//!
//! All of a tenant's records live under keys sharing one hash tag, so everything works on
//! Redis Cluster. Records are hashes by id (members, profiles, cards, index entries by
//! phone, email and referral code); every write that must be all or nothing, or that is
//! conditional (a member at its profile version, a card at its status, a phone or code
//! not yet taken), is one Lua script (`redis/*.lua`) that checks and writes in one step.
//! Beside each member a small meta field holds what those scripts check: its status, its
//! profile version and the phone, email and code it owns in the indexes. Beside each card
//! a state field holds its status and member. Scripts that change several records the
//! caller computed (a merge rewrites the duplicate's cards, an erasure the members merged
//! into the erased one) are given what the caller read and write nothing when it changed
//! since; the store reads again and retries.
//!
//! API keys live under one hash tag of their own (`li:{keys}`); a set of tenants (its own
//! key) lets the walk over every member find every tenant.
//!
//! This Redis holds the only copy of the members, so it must persist it: see
//! ARCHITECTURE.md, "Identity on Redis".

use std::collections::BTreeSet;

use loyalty_platform::embedded::{decode, digest_of_tables, encode};
use loyalty_platform::error::{Error, Result};
use loyalty_platform::redis_conn::{
    CopyMark, RememberedSet, ScrubMark, StoreConn, conflict_pause, lex_after,
};
use redis::Script;
use serde::de::DeserializeOwned;

use super::embedded::{EmbeddedIdentityStore, Row, Table};
use super::{CardHolder, IdentityStore, Imported, Replaced, Saved};
use crate::domain::{Card, CardStatus, Inserted, Member, MemberStatus, Profile};
use crate::keys::ApiKey;
use crate::lifecycle::{Erasure, ImportRow, MemberBlock, MergeRecord};

/// What errors call this store.
const STORE: &str = "identity store";
/// The set of tenants with members.
const TENANTS: &str = "li:tenants";
/// Set while `copy_from` runs: a Redis with it holds a copy that did not finish.
const COPYING: &str = "li:copying";
const COPY: CopyMark = CopyMark {
    key: COPYING,
    service: "identity",
    keys: "li:*",
};
/// Up while erased personal data may still be in the append-only files.
const SCRUB: ScrubMark = ScrubMark::new("li:scrub");
/// API keys by id, the ids of the unrevoked ones, and `tenant \0 key id` entries.
const API_KEYS: &str = "li:{keys}:k";
const LIVE_KEYS: &str = "li:{keys}:live";
const TENANT_KEYS: &str = "li:{keys}:t";
/// Most members one merge or erasure reaches through earlier merges (as embedded).
const MAX_FAMILY: usize = 10_000;
/// How often a merge, erasure or import reads again when what it read changed meanwhile.
const MAX_ATTEMPTS: usize = 16;
/// Separates the fields of a meta or card state value.
const SEP: char = '\u{1f}';

/// The key prefix of one tenant. The tag holds the tenant's length, so whatever the id
/// contains, every key of a tenant carries the same tag.
fn prefix(tenant: &str) -> String {
    format!("li:{{{}:{tenant}}}", tenant.len())
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
    fn members(&self) -> String {
        self.k("m")
    }
    fn profiles(&self) -> String {
        self.k("p")
    }
    fn meta(&self) -> String {
        self.k("meta")
    }
    fn ids(&self) -> String {
        self.k("ids")
    }
    fn phones(&self) -> String {
        self.k("phone")
    }
    fn emails(&self) -> String {
        self.k("email")
    }
    fn codes(&self) -> String {
        self.k("code")
    }
    fn cards(&self) -> String {
        self.k("c")
    }
    fn card_states(&self) -> String {
        self.k("cs")
    }
    /// The numbers of the cards filed under a member.
    fn member_cards(&self, member: &str) -> String {
        format!("{}:mc:{member}", self.p)
    }
    /// The members merged directly into a member.
    fn merged_into(&self, member: &str) -> String {
        format!("{}:mf:{member}", self.p)
    }
}

fn status_code(s: MemberStatus) -> &'static str {
    match s {
        MemberStatus::Active => "A",
        MemberStatus::Merged => "M",
        MemberStatus::Erased => "E",
        MemberStatus::Blocked => "B",
    }
}

/// A member's meta value ([`SEP`]-separated): what the scripts check and unindex.
fn meta(m: &Member, version: u64) -> String {
    [
        status_code(m.status),
        &version.to_string(),
        &m.phone,
        &m.email,
        &m.referral_code,
    ]
    .join(&SEP.to_string())
}

/// The profile version a meta value holds.
fn version_of(meta: &str) -> Result<u64> {
    meta.split(SEP)
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            Error::internal(anyhow::anyhow!("a stored member meta is damaged: {meta:?}"))
        })
}

/// A card status as the scripts compare it.
fn card_code(s: &CardStatus) -> String {
    match s {
        CardStatus::Active => "A".into(),
        CardStatus::Unbound => "U".into(),
        CardStatus::Blocked(r) => format!("B:{}", r.as_str()),
        CardStatus::Replaced { by } => format!("R:{by}"),
    }
}

/// A card's state value: its status code and member.
fn card_state(c: &Card) -> String {
    format!(
        "{}{SEP}{}",
        card_code(&c.status),
        c.member_id.as_deref().unwrap_or("")
    )
}

fn import_field(import_id: &str, row: i64) -> String {
    format!("{import_id}\0{row:020}")
}

fn tenant_key_entry(tenant: &str, key_id: &str) -> String {
    format!("{tenant}\0{key_id}")
}

fn unexpected(what: &str, value: impl std::fmt::Debug) -> Error {
    Error::internal(anyhow::anyhow!("unexpected {what} script answer {value:?}"))
}

/// How many times a script said the caller's reads were out of date.
fn too_busy(what: &str) -> Error {
    Error::Unavailable(format!(
        "{what} kept changing while it was written: try again"
    ))
}

#[derive(Clone)]
pub struct RedisIdentityStore {
    redis: StoreConn,
    insert: Script,
    save: Script,
    block: Script,
    merge: Script,
    erase: Script,
    import: Script,
    cards: Script,
    card: Script,
    holder: Script,
    keys: Script,
    tenants: RememberedSet,
}

impl std::fmt::Debug for RedisIdentityStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisIdentityStore")
            .field("redis", &self.redis)
            .finish_non_exhaustive()
    }
}

/// A script with the shared helpers in front.
fn script(body: &str) -> Script {
    Script::new(&format!("{}\n{body}", include_str!("redis/prelude.lua")))
}

impl RedisIdentityStore {
    /// Prepares one multiplexed connection to the Redis at `url`, opened on first use.
    pub fn connect(url: &str) -> anyhow::Result<Self> {
        Ok(Self::with(StoreConn::single(STORE, url)?))
    }

    /// Prepares one multiplexed connection per node of the Redis Cluster seeded by `nodes`.
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
            insert: script(include_str!("redis/insert.lua")),
            save: script(include_str!("redis/save.lua")),
            block: script(include_str!("redis/block.lua")),
            merge: script(include_str!("redis/merge.lua")),
            erase: script(include_str!("redis/erase.lua")),
            import: script(include_str!("redis/import.lua")),
            cards: script(include_str!("redis/cards.lua")),
            card: script(include_str!("redis/card.lua")),
            // The hot path needs none of the shared helpers.
            holder: Script::new(include_str!("redis/holder.lua")),
            keys: script(include_str!("redis/keys.lua")),
            tenants: RememberedSet::new(TENANTS),
        }
    }

    async fn hget<T: DeserializeOwned>(&self, key: &str, field: &str) -> Result<Option<T>> {
        let raw: Option<Vec<u8>> = self
            .redis
            .query(redis::cmd("HGET").arg(key).arg(field))
            .await?;
        raw.as_deref().map(decode).transpose()
    }

    /// Records of a hash by field, in the order asked; missing ones are left out.
    async fn hmget<T: DeserializeOwned>(&self, key: &str, fields: &[String]) -> Result<Vec<T>> {
        if fields.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<Option<Vec<u8>>> = self
            .redis
            .query(redis::cmd("HMGET").arg(key).arg(fields))
            .await?;
        raw.into_iter().flatten().map(|v| decode(&v)).collect()
    }

    async fn index(&self, key: String, value: &str) -> Result<Option<String>> {
        self.redis
            .query(redis::cmd("HGET").arg(key).arg(value))
            .await
    }

    /// Every member merged into `root`, at any depth, level by level in id order.
    async fn family(&self, keys: &Keys, root: &str) -> Result<Vec<String>> {
        let mut family = Vec::new();
        let mut level = vec![root.to_string()];
        while !level.is_empty() && family.len() < MAX_FAMILY {
            let mut pipe = redis::pipe();
            for id in &level {
                pipe.cmd("SMEMBERS").arg(keys.merged_into(id));
            }
            let sets: Vec<Vec<String>> = self.redis.pipeline(&pipe).await?;
            level = Vec::new();
            for mut set in sets {
                set.sort();
                level.extend(set);
            }
            level.truncate(MAX_FAMILY.saturating_sub(family.len()));
            family.extend(level.iter().cloned());
        }
        Ok(family)
    }

    /// The cards filed under a member, each as stored and decoded.
    async fn raw_cards(&self, keys: &Keys, member_id: &str) -> Result<Vec<(Vec<u8>, Card)>> {
        let numbers: Vec<String> = self
            .redis
            .query(redis::cmd("SMEMBERS").arg(keys.member_cards(member_id)))
            .await?;
        if numbers.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<Option<Vec<u8>>> = self
            .redis
            .query(redis::cmd("HMGET").arg(keys.cards()).arg(&numbers))
            .await?;
        raw.into_iter()
            .flatten()
            .map(|r| {
                let card = decode(&r)?;
                Ok((r, card))
            })
            .collect()
    }

    /// Adds the tenant to [`TENANTS`] before its first member is written.
    async fn register_tenant(&self, tenant_id: &str) -> Result<()> {
        self.tenants.add(&self.redis, tenant_id).await
    }

    /// Runs [`card.lua`](redis/card.lua) on `cards` (number, expected status, new card):
    /// 0 when written, else the position of the first card whose status was not expected.
    async fn write_cards(&self, cards: &[(&str, Option<&CardStatus>, &Card)]) -> Result<i64> {
        let Some((_, _, last)) = cards.last() else {
            return Ok(0);
        };
        let keys = Keys::of(&last.tenant_id);
        let mut invocation = self.card.prepare_invoke();
        invocation.key(keys.cards()).key(keys.card_states());
        if let Some(member) = &last.member_id {
            invocation.key(keys.member_cards(member));
        }
        invocation.arg(cards.len());
        for (number, expected, card) in cards {
            invocation
                .arg(*number)
                .arg(expected.map(card_code).unwrap_or_default())
                .arg(encode(*card)?)
                .arg(card_state(card));
        }
        self.redis.invoke(&invocation).await
    }
}

/// What [`RedisIdentityStore::copy_from`] copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Copied {
    pub tenants: usize,
    pub members: u64,
    pub cards: u64,
    pub api_keys: u64,
    /// Every row of every table.
    pub rows: u64,
}

impl RedisIdentityStore {
    /// Whether this Redis holds no identity data (no member and no API key).
    pub async fn is_empty(&self) -> Result<bool> {
        let held: i64 = self
            .redis
            .query(redis::cmd("EXISTS").arg(TENANTS).arg(API_KEYS))
            .await?;
        Ok(held == 0)
    }

    /// Whether a [`RedisIdentityStore::copy_from`] into this Redis started and did not
    /// finish: serving it would show part of the members.
    pub async fn copy_unfinished(&self) -> Result<bool> {
        COPY.unfinished(&self.redis).await
    }

    /// A digest of everything `from` holds: a copy cut short is run again only from the
    /// same source.
    async fn digest_of(from: &EmbeddedIdentityStore) -> Result<String> {
        digest_of_tables(&Table::ALL, |table, after, limit| {
            from.rows(table, after, limit)
        })
        .await
    }

    /// Copies everything the embedded store `from` holds (identity moving from
    /// `identity.store = "embedded"` to `"redis"`; nothing may write to either meanwhile).
    /// Refuses, writing nothing, when this Redis already holds identity data, unless it is
    /// what an earlier copy from the same source (by digest) left unfinished: then the copy
    /// runs again (every write is idempotent).
    pub async fn copy_from(&self, from: &EmbeddedIdentityStore) -> Result<Copied> {
        const PAGE: usize = 500;
        let digest = Self::digest_of(from).await?;
        COPY.begin(&self.redis, &digest, self.is_empty()).await?;
        let mut copied = Copied::default();
        let mut tenants = BTreeSet::new();
        for table in Table::ALL {
            let mut after = None;
            loop {
                let (rows, last) = from.rows(table, after, PAGE).await?;
                // One pipeline per slot: a tenant's rows, or the API keys'. A cluster
                // refuses a pipeline across slots.
                let slot_of = |row: &Row| match table {
                    Table::ApiKeys | Table::TenantKeys => String::new(),
                    _ => row.key.first().cloned().unwrap_or_default(),
                };
                for run in rows.chunk_by(|a, b| slot_of(a) == slot_of(b)) {
                    let mut pipe = redis::pipe();
                    for row in run {
                        if let Some(tenant) = self.copy_row(&mut pipe, table, row, from).await? {
                            tenants.insert(tenant);
                        }
                    }
                    self.redis.pipeline::<()>(&pipe).await?;
                }
                copied.rows += rows.len() as u64;
                match table {
                    Table::Members => copied.members += rows.len() as u64,
                    Table::Cards => copied.cards += rows.len() as u64,
                    Table::ApiKeys => copied.api_keys += rows.len() as u64,
                    _ => {}
                }
                match last {
                    Some(l) if rows.len() == PAGE => after = Some(l),
                    _ => break,
                }
            }
        }
        // Last: a walk over the members finds them once they are all in.
        for tenant in &tenants {
            self.register_tenant(tenant).await?;
        }
        COPY.finish(&self.redis).await?;
        copied.tenants = tenants.len();
        Ok(copied)
    }

    /// Adds the commands that file `row` of `table` to `pipe`; the row's tenant, for a
    /// member.
    async fn copy_row(
        &self,
        pipe: &mut redis::Pipeline,
        table: Table,
        row: &Row,
        from: &EmbeddedIdentityStore,
    ) -> Result<Option<String>> {
        let part = |i: usize| row.key.get(i).map(String::as_str).unwrap_or_default();
        let damaged = || {
            Error::internal(anyhow::anyhow!(
                "a stored {table:?} row is damaged: key {:?}",
                row.key
            ))
        };
        let expected_parts = match table {
            Table::ApiKeys => 1,
            Table::MemberCards | Table::MergedFrom | Table::ImportRows => 3,
            _ => 2,
        };
        if row.key.len() != expected_parts {
            return Err(damaged());
        }
        let keys = Keys::of(part(0));
        let value = row.value.as_slice();
        match table {
            Table::Members => {
                let member: Member = decode(value)?;
                let version = from
                    .profile(&member.tenant_id, &member.member_id)
                    .await?
                    .map_or(0, |p| p.version);
                pipe.cmd("HSET").arg(keys.members()).arg(part(1)).arg(value);
                pipe.cmd("HSET")
                    .arg(keys.meta())
                    .arg(part(1))
                    .arg(meta(&member, version));
                pipe.cmd("ZADD").arg(keys.ids()).arg(0).arg(part(1));
                return Ok(Some(part(0).to_string()));
            }
            Table::Profiles => {
                pipe.cmd("HSET")
                    .arg(keys.profiles())
                    .arg(part(1))
                    .arg(value);
            }
            Table::Phones => {
                pipe.cmd("HSET").arg(keys.phones()).arg(part(1)).arg(value);
            }
            Table::Emails => {
                pipe.cmd("HSET").arg(keys.emails()).arg(part(1)).arg(value);
            }
            Table::ReferralCodes => {
                pipe.cmd("HSET").arg(keys.codes()).arg(part(1)).arg(value);
            }
            Table::Cards => {
                let card: Card = decode(value)?;
                pipe.cmd("HSET").arg(keys.cards()).arg(part(1)).arg(value);
                pipe.cmd("HSET")
                    .arg(keys.card_states())
                    .arg(part(1))
                    .arg(card_state(&card));
            }
            Table::MemberCards => {
                pipe.cmd("SADD")
                    .arg(keys.member_cards(part(1)))
                    .arg(part(2));
            }
            Table::ApiKeys => {
                let key: ApiKey = decode(value)?;
                pipe.cmd("HSET").arg(API_KEYS).arg(part(0)).arg(value);
                if key.revoked_at.is_none() {
                    pipe.cmd("SADD").arg(LIVE_KEYS).arg(part(0));
                }
            }
            Table::TenantKeys => {
                pipe.cmd("ZADD")
                    .arg(TENANT_KEYS)
                    .arg(0)
                    .arg(tenant_key_entry(part(0), part(1)));
            }
            Table::Merges => {
                let record: MergeRecord = decode(value)?;
                pipe.cmd("HSET")
                    .arg(keys.k("merge"))
                    .arg(part(1))
                    .arg(value);
                if !record.points_moved {
                    pipe.cmd("SADD").arg(keys.k("unmoved")).arg(part(1));
                }
            }
            Table::Erasures => {
                pipe.cmd("HSET")
                    .arg(keys.k("erasure"))
                    .arg(part(1))
                    .arg(value);
            }
            Table::MergedFrom => {
                pipe.cmd("SADD").arg(keys.merged_into(part(1))).arg(part(2));
            }
            Table::Blocks => {
                pipe.cmd("HSET")
                    .arg(keys.k("block"))
                    .arg(part(1))
                    .arg(value);
            }
            Table::ImportRows => {
                let row_number: i64 = part(2).parse().map_err(|_| damaged())?;
                pipe.cmd("HSET")
                    .arg(keys.k("import"))
                    .arg(import_field(part(1), row_number))
                    .arg(value);
            }
        }
        Ok(None)
    }
}

#[async_trait::async_trait]
impl IdentityStore for RedisIdentityStore {
    async fn insert_member(&self, member: &Member) -> Result<Inserted> {
        self.register_tenant(&member.tenant_id).await?;
        let keys = Keys::of(&member.tenant_id);
        let mut invocation = self.insert.prepare_invoke();
        invocation
            .key(keys.phones())
            .key(keys.emails())
            .key(keys.codes())
            .key(keys.members())
            .key(keys.meta())
            .key(keys.ids())
            .arg(&member.member_id)
            .arg(&member.phone)
            .arg(&member.email)
            .arg(&member.referral_code)
            .arg(encode(member)?)
            .arg(meta(member, 0))
            .arg(status_code(member.status));
        let word: String = self.redis.invoke(&invocation).await?;
        match word.as_str() {
            "done" => Ok(Inserted::Done),
            "phone" => Ok(Inserted::PhoneTaken),
            "email" => Ok(Inserted::EmailTaken),
            "code" => Ok(Inserted::CodeTaken),
            other => Err(unexpected("insert", other)),
        }
    }

    async fn member(&self, tenant_id: &str, member_id: &str) -> Result<Option<Member>> {
        self.hget(&Keys::of(tenant_id).members(), member_id).await
    }

    async fn members_after(
        &self,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<Member>> {
        let mut tenants: Vec<String> = self
            .redis
            .query(redis::cmd("SMEMBERS").arg(TENANTS))
            .await?;
        tenants.sort();
        let (from_tenant, from_member) = after.unwrap_or_default();
        let mut out = Vec::new();
        for tenant in tenants.into_iter().filter(|t| *t >= from_tenant) {
            if out.len() >= limit {
                break;
            }
            let keys = Keys::of(&tenant);
            let mut start = if tenant == from_tenant {
                from_member.clone()
            } else {
                String::new()
            };
            loop {
                let want = limit - out.len();
                let ids: Vec<String> = self
                    .redis
                    .query(
                        redis::cmd("ZRANGEBYLEX")
                            .arg(keys.ids())
                            .arg(lex_after(&start))
                            .arg("+")
                            .arg("LIMIT")
                            .arg(0)
                            .arg(want),
                    )
                    .await?;
                let Some(last) = ids.last().cloned() else {
                    break;
                };
                let page = ids.len();
                out.extend(self.hmget::<Member>(&keys.members(), &ids).await?);
                if page < want || out.len() >= limit {
                    break;
                }
                start = last;
            }
        }
        Ok(out)
    }

    async fn member_id_by_phone(&self, tenant_id: &str, phone: &str) -> Result<Option<String>> {
        self.index(Keys::of(tenant_id).phones(), phone).await
    }

    async fn member_by_referral_code(&self, tenant_id: &str, code: &str) -> Result<Option<String>> {
        self.index(Keys::of(tenant_id).codes(), code).await
    }

    async fn insert_card(&self, card: &Card) -> Result<bool> {
        Ok(self.insert_cards(std::slice::from_ref(card)).await? == 1)
    }

    async fn card(&self, tenant_id: &str, number: &str) -> Result<Option<Card>> {
        self.hget(&Keys::of(tenant_id).cards(), number).await
    }

    async fn card_holder(&self, tenant_id: &str, number: &str) -> Result<Option<CardHolder>> {
        let keys = Keys::of(tenant_id);
        let mut invocation = self.holder.prepare_invoke();
        invocation
            .key(keys.cards())
            .key(keys.card_states())
            .key(keys.members())
            .key(keys.profiles())
            .key(keys.meta())
            .arg(number);
        let found: Vec<Vec<u8>> = self.redis.invoke(&invocation).await?;
        let mut found = found.into_iter();
        let Some(card) = found.next() else {
            return Ok(None);
        };
        Ok(Some(CardHolder {
            card: decode(&card)?,
            member: found.next().as_deref().map(decode).transpose()?,
            profile: found.next().as_deref().map(decode).transpose()?,
        }))
    }

    async fn cards_of_member(&self, tenant_id: &str, member_id: &str) -> Result<Vec<Card>> {
        let keys = Keys::of(tenant_id);
        let mut numbers: Vec<String> = self
            .redis
            .query(redis::cmd("SMEMBERS").arg(keys.member_cards(member_id)))
            .await?;
        numbers.sort();
        self.hmget(&keys.cards(), &numbers).await
    }

    async fn profile(&self, tenant_id: &str, member_id: &str) -> Result<Option<Profile>> {
        self.hget(&Keys::of(tenant_id).profiles(), member_id).await
    }

    async fn save_profile(
        &self,
        member: &Member,
        profile: &Profile,
        expected: u64,
    ) -> Result<Saved> {
        let keys = Keys::of(&member.tenant_id);
        let mut invocation = self.save.prepare_invoke();
        invocation
            .key(keys.members())
            .key(keys.profiles())
            .key(keys.meta())
            .key(keys.emails())
            .arg(&member.member_id)
            .arg(expected)
            .arg(encode(member)?)
            .arg(encode(profile)?)
            .arg(meta(member, profile.version))
            .arg(&member.email);
        let word: String = self.redis.invoke(&invocation).await?;
        match word.as_str() {
            "done" => Ok(Saved::Done),
            "stale" => Ok(Saved::Stale),
            "email" => Ok(Saved::EmailTaken),
            other => Err(unexpected("profile", other)),
        }
    }

    async fn member_id_by_email(&self, tenant_id: &str, email: &str) -> Result<Option<String>> {
        self.index(Keys::of(tenant_id).emails(), email).await
    }

    async fn merge_members(
        &self,
        duplicate: &Member,
        profile: &Profile,
        expected: u64,
        record: &MergeRecord,
    ) -> Result<bool> {
        let keys = Keys::of(&duplicate.tenant_id);
        let (dup, into) = (&duplicate.member_id, &record.into);
        let encoded = (
            encode(duplicate)?,
            encode(profile)?,
            encode(record)?,
            meta(duplicate, profile.version),
        );
        for attempt in 0..MAX_ATTEMPTS {
            let family = self.family(&keys, dup).await?;
            let cards = self.raw_cards(&keys, dup).await?;
            let mut invocation = self.merge.prepare_invoke();
            invocation
                .key(keys.members())
                .key(keys.profiles())
                .key(keys.meta())
                .key(keys.cards())
                .key(keys.card_states())
                .key(keys.member_cards(dup))
                .key(keys.member_cards(into))
                .key(keys.phones())
                .key(keys.emails())
                .key(keys.codes())
                .key(keys.k("merge"))
                .key(keys.k("unmoved"))
                .key(keys.merged_into(into))
                .key(keys.merged_into(dup));
            invocation
                .arg(dup)
                .arg(expected)
                .arg(into)
                .arg(&encoded.0)
                .arg(&encoded.1)
                .arg(&encoded.3)
                .arg(&encoded.2)
                .arg(if record.points_moved { "1" } else { "0" })
                .arg(family.len());
            for id in &family {
                invocation.arg(id);
            }
            invocation.arg(cards.len());
            for (raw, card) in &cards {
                let moved = Card {
                    member_id: Some(into.clone()),
                    ..card.clone()
                };
                invocation
                    .arg(&card.number)
                    .arg(raw.as_slice())
                    .arg(encode(&moved)?)
                    .arg(card_state(&moved));
            }
            let word: String = self.redis.invoke(&invocation).await?;
            match word.as_str() {
                "yes" => return Ok(true),
                "no" => return Ok(false),
                "retry" => {
                    conflict_pause(attempt, MAX_ATTEMPTS).await;
                    continue;
                }
                other => return Err(unexpected("merge", other)),
            }
        }
        Err(too_busy("the merged member"))
    }

    async fn merge_record(&self, tenant_id: &str, member_id: &str) -> Result<Option<MergeRecord>> {
        self.hget(&Keys::of(tenant_id).k("merge"), member_id).await
    }

    async fn save_merge_record(
        &self,
        tenant_id: &str,
        member_id: &str,
        record: &MergeRecord,
    ) -> Result<()> {
        let keys = Keys::of(tenant_id);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HSET")
            .arg(keys.k("merge"))
            .arg(member_id)
            .arg(encode(record)?)
            .ignore();
        pipe.cmd(if record.points_moved { "SREM" } else { "SADD" })
            .arg(keys.k("unmoved"))
            .arg(member_id)
            .ignore();
        self.redis.pipeline(&pipe).await
    }

    async fn erase_member(
        &self,
        member: &Member,
        profile: &Profile,
        expected: u64,
        erasure: &Erasure,
    ) -> Result<bool> {
        let keys = Keys::of(&member.tenant_id);
        let id = &member.member_id;
        let encoded_erasure = encode(erasure)?;
        for attempt in 0..MAX_ATTEMPTS {
            let family = self.family(&keys, id).await?;
            // The merged members as read, blanked: their personal data goes too.
            let mut entries = vec![(
                id.clone(),
                expected,
                encode(member)?,
                encode(profile)?,
                meta(member, profile.version),
            )];
            // Versions first, then records: the script checks the versions, so a record
            // changed after its version was read is caught.
            let (metas, stored): (Vec<Option<String>>, Vec<Option<Vec<u8>>>) = if family.is_empty()
            {
                (Vec::new(), Vec::new())
            } else {
                let metas = self
                    .redis
                    .query(redis::cmd("HMGET").arg(keys.meta()).arg(&family))
                    .await?;
                let stored = self
                    .redis
                    .query(redis::cmd("HMGET").arg(keys.members()).arg(&family))
                    .await?;
                (metas, stored)
            };
            for ((merged_id, meta_value), raw) in family.iter().zip(metas).zip(stored) {
                let (Some(meta_value), Some(raw)) = (meta_value, raw) else {
                    continue;
                };
                let old: Member = decode(&raw)?;
                let version = version_of(&meta_value)?;
                let blank = Member {
                    phone: String::new(),
                    email: String::new(),
                    first_name: String::new(),
                    last_name: String::new(),
                    referral_code: String::new(),
                    updated_at: member.updated_at,
                    ..old
                };
                let blank_profile = Profile {
                    version: version + 1,
                    ..Profile::default()
                };
                entries.push((
                    merged_id.clone(),
                    version,
                    encode(&blank)?,
                    encode(&blank_profile)?,
                    meta(&blank, version + 1),
                ));
            }
            let mut invocation = self.erase.prepare_invoke();
            invocation
                .key(keys.members())
                .key(keys.profiles())
                .key(keys.meta())
                .key(keys.phones())
                .key(keys.emails())
                .key(keys.codes())
                .key(keys.k("erasure"))
                .key(keys.k("block"))
                .key(keys.merged_into(id))
                .arg(id)
                .arg(expected)
                .arg(&encoded_erasure)
                .arg(entries.len());
            for (member_id, version, m, p, mt) in &entries {
                invocation
                    .arg(member_id)
                    .arg(*version)
                    .arg(m)
                    .arg(p)
                    .arg(mt);
            }
            // The append-only file keeps the replaced records until it is rewritten
            // ([`IdentityStore::scrub`]).
            SCRUB.raise(&self.redis).await?;
            let answered = self.redis.invoke::<String>(&invocation).await;
            // Counted up again once the write happened, or may have (no answer).
            if !matches!(answered.as_deref(), Ok("no" | "retry")) {
                SCRUB.raise_after(&self.redis).await;
            }
            match answered?.as_str() {
                "yes" => return Ok(true),
                "no" => return Ok(false),
                "retry" => {
                    conflict_pause(attempt, MAX_ATTEMPTS).await;
                    continue;
                }
                other => return Err(unexpected("erasure", other)),
            }
        }
        Err(too_busy("the erased member's family"))
    }

    async fn erasure(&self, tenant_id: &str, member_id: &str) -> Result<Option<Erasure>> {
        self.hget(&Keys::of(tenant_id).k("erasure"), member_id)
            .await
    }

    async fn merged_from(&self, tenant_id: &str, member_id: &str) -> Result<Vec<String>> {
        self.family(&Keys::of(tenant_id), member_id).await
    }

    async fn set_block(
        &self,
        member: &Member,
        profile: &Profile,
        expected: u64,
        block: Option<&MemberBlock>,
    ) -> Result<bool> {
        let keys = Keys::of(&member.tenant_id);
        let mut invocation = self.block.prepare_invoke();
        invocation
            .key(keys.members())
            .key(keys.profiles())
            .key(keys.meta())
            .key(keys.k("block"))
            .arg(&member.member_id)
            .arg(expected)
            .arg(encode(member)?)
            .arg(encode(profile)?)
            .arg(meta(member, profile.version))
            .arg(block.map(encode).transpose()?.unwrap_or_default());
        let word: String = self.redis.invoke(&invocation).await?;
        match word.as_str() {
            "yes" => Ok(true),
            "no" => Ok(false),
            other => Err(unexpected("block", other)),
        }
    }

    async fn member_block(&self, tenant_id: &str, member_id: &str) -> Result<Option<MemberBlock>> {
        self.hget(&Keys::of(tenant_id).k("block"), member_id).await
    }

    async fn import_member(
        &self,
        member: &Member,
        profile: &Profile,
        cards: &[Card],
        row: &ImportRow,
    ) -> Result<Imported> {
        self.register_tenant(&member.tenant_id).await?;
        let (tenant, id) = (&member.tenant_id, &member.member_id);
        let keys = Keys::of(tenant);
        let numbers: Vec<String> = cards.iter().map(|c| c.number.clone()).collect();
        for attempt in 0..MAX_ATTEMPTS {
            let stored: Vec<Option<Vec<u8>>> = if numbers.is_empty() {
                Vec::new()
            } else {
                self.redis
                    .query(redis::cmd("HMGET").arg(keys.cards()).arg(&numbers))
                    .await?
            };
            // Each card as read, what it becomes, and whether it is taken (the script
            // answers that after the phone, email and code, as the embedded store does).
            let mut writes = Vec::with_capacity(cards.len());
            for (card, raw) in cards.iter().zip(stored) {
                let (bound, taken) = match &raw {
                    None => (card.clone(), false),
                    Some(raw) => {
                        let stored: Card = decode(raw)?;
                        let taken = stored.status != CardStatus::Unbound;
                        let bound = Card {
                            status: CardStatus::Active,
                            member_id: card.member_id.clone(),
                            ..stored
                        };
                        (bound, taken)
                    }
                };
                writes.push((raw.unwrap_or_default(), bound, taken));
            }
            let mut invocation = self.import.prepare_invoke();
            invocation
                .key(keys.phones())
                .key(keys.emails())
                .key(keys.codes())
                .key(keys.members())
                .key(keys.profiles())
                .key(keys.meta())
                .key(keys.ids())
                .key(keys.cards())
                .key(keys.card_states())
                .key(keys.member_cards(id))
                .key(keys.k("import"))
                .arg(id)
                .arg(&member.phone)
                .arg(&member.email)
                .arg(&member.referral_code)
                .arg(encode(member)?)
                .arg(encode(profile)?)
                .arg(meta(member, profile.version))
                .arg(import_field(&row.import_id, row.row_number))
                .arg(encode(row)?)
                .arg(writes.len());
            for (read, card, taken) in &writes {
                invocation
                    .arg(&card.number)
                    .arg(read.as_slice())
                    .arg(encode(card)?)
                    .arg(card_state(card))
                    .arg(if card.member_id.as_ref() == Some(id) {
                        "1"
                    } else {
                        "0"
                    })
                    .arg(if *taken { "1" } else { "0" });
            }
            let word: String = self.redis.invoke(&invocation).await?;
            return match word.as_str() {
                "done" => Ok(Imported::Done),
                "phone" => Ok(Imported::PhoneTaken),
                "email" => Ok(Imported::EmailTaken),
                "code" => Ok(Imported::CodeTaken),
                "retry" => {
                    conflict_pause(attempt, MAX_ATTEMPTS).await;
                    continue;
                }
                other => match other.strip_prefix("card:") {
                    Some(number) => Ok(Imported::CardTaken(number.to_string())),
                    None => Err(unexpected("import", other)),
                },
            };
        }
        Err(too_busy("an imported member's cards"))
    }

    async fn import_row(
        &self,
        tenant_id: &str,
        import_id: &str,
        row_number: i64,
    ) -> Result<Option<ImportRow>> {
        self.hget(
            &Keys::of(tenant_id).k("import"),
            &import_field(import_id, row_number),
        )
        .await
    }

    async fn save_import_row(&self, row: &ImportRow) -> Result<()> {
        let _: i64 = self
            .redis
            .query(
                redis::cmd("HSET")
                    .arg(Keys::of(&row.tenant_id).k("import"))
                    .arg(import_field(&row.import_id, row.row_number))
                    .arg(encode(row)?),
            )
            .await?;
        Ok(())
    }

    async fn insert_cards(&self, cards: &[Card]) -> Result<u64> {
        let Some(first) = cards.first() else {
            return Ok(0);
        };
        // One script: all or nothing, so one tenant's cards (as every caller passes).
        let tenant = first.tenant_id.as_str();
        if cards.iter().any(|c| c.tenant_id != tenant) {
            return Err(Error::internal(anyhow::anyhow!(
                "cards of several tenants cannot be inserted together"
            )));
        }
        {
            let keys = Keys::of(tenant);
            let mine: Vec<&Card> = cards.iter().collect();
            let members: Vec<&str> = mine
                .iter()
                .filter_map(|c| c.member_id.as_deref())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let mut invocation = self.cards.prepare_invoke();
            invocation.key(keys.cards()).key(keys.card_states());
            for m in &members {
                invocation.key(keys.member_cards(m));
            }
            invocation.arg(mine.len());
            for card in mine {
                let set = card
                    .member_id
                    .as_deref()
                    .and_then(|m| members.iter().position(|x| *x == m))
                    .map_or(0, |i| i + 3);
                invocation
                    .arg(&card.number)
                    .arg(encode(card)?)
                    .arg(card_state(card))
                    .arg(set);
            }
            self.redis.invoke(&invocation).await
        }
    }

    async fn update_card(&self, card: &Card, expected: &CardStatus) -> Result<bool> {
        Ok(self
            .write_cards(&[(&card.number, Some(expected), card)])
            .await?
            == 0)
    }

    async fn replace_card(
        &self,
        old: &Card,
        old_expected: &CardStatus,
        new: &Card,
        new_expected: Option<&CardStatus>,
    ) -> Result<Replaced> {
        if old.tenant_id != new.tenant_id {
            return Err(Error::internal(anyhow::anyhow!(
                "a card is replaced by a card of its own tenant"
            )));
        }
        match self
            .write_cards(&[
                (&old.number, Some(old_expected), old),
                (&new.number, new_expected, new),
            ])
            .await?
        {
            0 => Ok(Replaced::Done),
            1 => Ok(Replaced::OldChanged),
            2 => Ok(Replaced::NewChanged),
            other => Err(unexpected("card", other)),
        }
    }

    async fn ping(&self) -> Result<()> {
        let _: String = self.redis.query(&redis::cmd("PING")).await?;
        Ok(())
    }

    async fn scrub(&self) -> Result<bool> {
        SCRUB.scrub(&self.redis).await
    }

    async fn save_api_keys(&self, keys: &[ApiKey], expect_live: Option<&str>) -> Result<bool> {
        let mut invocation = self.keys.prepare_invoke();
        invocation
            .key(API_KEYS)
            .key(LIVE_KEYS)
            .key(TENANT_KEYS)
            .arg(expect_live.unwrap_or(""))
            .arg(keys.len());
        for k in keys {
            invocation
                .arg(&k.key_id)
                .arg(encode(k)?)
                .arg(tenant_key_entry(&k.tenant_id, &k.key_id))
                .arg(if k.revoked_at.is_some() { "1" } else { "0" });
        }
        let written: i64 = self.redis.invoke(&invocation).await?;
        Ok(written == 1)
    }

    async fn api_key(&self, key_id: &str) -> Result<Option<ApiKey>> {
        self.hget(API_KEYS, key_id).await
    }

    async fn api_keys(
        &self,
        tenant_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ApiKey>> {
        let start = match after {
            Some(id) => lex_after(&tenant_key_entry(tenant_id, id)),
            None => format!("[{}", tenant_key_entry(tenant_id, "")),
        };
        let entries: Vec<String> = self
            .redis
            .query(
                redis::cmd("ZRANGEBYLEX")
                    .arg(TENANT_KEYS)
                    .arg(start)
                    .arg(format!("({tenant_id}\u{1}"))
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit),
            )
            .await?;
        let ids: Vec<String> = entries
            .iter()
            .filter_map(|e| e.split_once('\0').map(|(_, id)| id.to_string()))
            .collect();
        self.hmget(API_KEYS, &ids).await
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
        let store = RedisIdentityStore::connect(&server.url()).unwrap();
        super::super::conformance::run_all(&store).await;
    }

    /// Two replicas (two stores, each with its own connection) racing for one phone, one
    /// profile version and one card.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_race_exactly() {
        let server = RedisServer::start().unwrap();
        let a = RedisIdentityStore::connect(&server.url()).unwrap();
        let b = RedisIdentityStore::connect(&server.url()).unwrap();
        super::super::conformance::racing_writers(&[&a, &b]).await;
    }

    /// Everything the conformance suite leaves in an embedded store, copied, reads back the
    /// same from Redis through the trait, and conditional writes find the copied versions;
    /// a second copy is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_of_the_embedded_store_reads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let from = EmbeddedIdentityStore::open(&dir.path().join("identity.redb")).unwrap();
        super::super::conformance::run_all(&from).await;
        let server = RedisServer::start().unwrap();
        let to = RedisIdentityStore::connect(&server.url()).unwrap();
        let copied = to.copy_from(&from).await.unwrap();
        assert!(
            copied.members > 10 && copied.cards > 5 && copied.api_keys > 3,
            "{copied:?}"
        );
        let rows = |table| {
            let from = from.clone();
            async move { from.rows(table, None, 100_000).await.unwrap().0 }
        };
        let members = from.members_after(None, 100_000).await.unwrap();
        assert_eq!(members, to.members_after(None, 100_000).await.unwrap());
        for m in &members {
            let (t, id) = (m.tenant_id.as_str(), m.member_id.as_str());
            assert_eq!(
                from.profile(t, id).await.unwrap(),
                to.profile(t, id).await.unwrap()
            );
            assert_eq!(
                from.member_block(t, id).await.unwrap(),
                to.member_block(t, id).await.unwrap()
            );
            assert_eq!(
                from.erasure(t, id).await.unwrap(),
                to.erasure(t, id).await.unwrap()
            );
            assert_eq!(
                from.merge_record(t, id).await.unwrap(),
                to.merge_record(t, id).await.unwrap()
            );
            assert_eq!(
                from.merged_from(t, id).await.unwrap(),
                to.merged_from(t, id).await.unwrap()
            );
            assert_eq!(
                from.cards_of_member(t, id).await.unwrap(),
                to.cards_of_member(t, id).await.unwrap()
            );
        }
        for (table, which) in [
            (Table::Phones, 0),
            (Table::Emails, 1),
            (Table::ReferralCodes, 2),
        ] {
            for row in rows(table).await {
                let (t, v) = (&row.key[0], &row.key[1]);
                let (a, b) = match which {
                    0 => (
                        from.member_id_by_phone(t, v).await.unwrap(),
                        to.member_id_by_phone(t, v).await.unwrap(),
                    ),
                    1 => (
                        from.member_id_by_email(t, v).await.unwrap(),
                        to.member_id_by_email(t, v).await.unwrap(),
                    ),
                    _ => (
                        from.member_by_referral_code(t, v).await.unwrap(),
                        to.member_by_referral_code(t, v).await.unwrap(),
                    ),
                };
                assert!(a.is_some());
                assert_eq!(a, b, "{table:?} {t}/{v}");
            }
        }
        for row in rows(Table::Cards).await {
            let (t, n) = (&row.key[0], &row.key[1]);
            assert_eq!(
                from.card_holder(t, n).await.unwrap(),
                to.card_holder(t, n).await.unwrap(),
                "{t}/{n}"
            );
        }
        for row in rows(Table::ImportRows).await {
            let (t, import, n) = (&row.key[0], &row.key[1], row.key[2].parse().unwrap());
            assert_eq!(
                from.import_row(t, import, n).await.unwrap(),
                to.import_row(t, import, n).await.unwrap()
            );
        }
        for row in rows(Table::TenantKeys).await {
            let t = &row.key[0];
            assert_eq!(
                from.api_keys(t, None, 1000).await.unwrap(),
                to.api_keys(t, None, 1000).await.unwrap()
            );
        }
        for row in rows(Table::ApiKeys).await {
            let id = &row.key[0];
            assert_eq!(
                from.api_key(id).await.unwrap(),
                to.api_key(id).await.unwrap()
            );
        }
        // Conditional writes see the copied profile versions.
        let mut saved = 0;
        for m in members.iter().filter(|m| m.status == MemberStatus::Active) {
            let profile = to.profile(&m.tenant_id, &m.member_id).await.unwrap();
            let version = profile.as_ref().map_or(0, |p| p.version);
            let next = Profile {
                version: version + 1,
                ..profile.unwrap_or_default()
            };
            assert_eq!(
                to.save_profile(m, &next, version).await.unwrap(),
                Saved::Done,
                "{}/{}",
                m.tenant_id,
                m.member_id
            );
            saved += 1;
        }
        assert!(saved > 5, "{saved}");
        let err = to.copy_from(&from).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    }

    /// A merge whose points have not moved holds its survivor back after a copy too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copied_unfinished_merge_still_holds_its_survivor() {
        use crate::lifecycle::Audit;
        let dir = tempfile::tempdir().unwrap();
        let from = EmbeddedIdentityStore::open(&dir.path().join("identity.redb")).unwrap();
        let member = |id: &str, phone: &str| super::super::conformance::member("t", id, phone, id);
        for (id, phone) in [
            ("a", "+77010000001"),
            ("b", "+77010000002"),
            ("c", "+77010000003"),
        ] {
            from.insert_member(&member(id, phone)).await.unwrap();
        }
        let merged = Member {
            status: MemberStatus::Merged,
            ..member("a", "+77010000001")
        };
        let record = |into: &str| MergeRecord {
            into: into.into(),
            audit: Audit {
                actor: "x".into(),
                comment: String::new(),
                key_id: String::new(),
                at: 1,
            },
            points_moved: false,
        };
        let profile = Profile {
            version: 1,
            ..Profile::default()
        };
        assert!(
            from.merge_members(&merged, &profile, 0, &record("b"))
                .await
                .unwrap()
        );
        let server = RedisServer::start().unwrap();
        let to = RedisIdentityStore::connect(&server.url()).unwrap();
        to.copy_from(&from).await.unwrap();
        let b = Member {
            status: MemberStatus::Merged,
            ..member("b", "+77010000002")
        };
        assert!(
            !to.merge_members(&b, &profile, 0, &record("c"))
                .await
                .unwrap(),
            "a's points have not reached b"
        );
    }

    /// A copy into a Redis Cluster (one pipeline per slot), and a copy cut short: the
    /// Redis says so, and running the copy again finishes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_into_a_cluster_and_a_copy_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let from = EmbeddedIdentityStore::open(&dir.path().join("identity.redb")).unwrap();
        super::super::conformance::run_all(&from).await;
        let nodes = RedisServer::start_cluster(3).unwrap();
        let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
        let to = RedisIdentityStore::connect_cluster(&urls).unwrap();
        // As a copy from another source that stopped after its first writes leaves it:
        // refused; from this source: finished.
        let _: () = to
            .redis
            .query(redis::cmd("SET").arg(COPYING).arg("another source"))
            .await
            .unwrap();
        let err = to.copy_from(&from).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        let digest = RedisIdentityStore::digest_of(&from).await.unwrap();
        let _: () = to
            .redis
            .query(redis::cmd("SET").arg(COPYING).arg(digest))
            .await
            .unwrap();
        to.save_api_keys(&[], None).await.unwrap();
        assert!(to.copy_unfinished().await.unwrap());
        let copied = to.copy_from(&from).await.unwrap();
        assert!(copied.tenants > 1, "{copied:?}");
        assert!(!to.copy_unfinished().await.unwrap());
        assert_eq!(
            from.members_after(None, 100_000).await.unwrap(),
            to.members_after(None, 100_000).await.unwrap()
        );
        for m in from.members_after(None, 100_000).await.unwrap() {
            assert_eq!(
                from.cards_of_member(&m.tenant_id, &m.member_id)
                    .await
                    .unwrap(),
                to.cards_of_member(&m.tenant_id, &m.member_id)
                    .await
                    .unwrap()
            );
        }
    }

    /// The same suite on a three-node Redis Cluster: every script touches one tenant's keys
    /// (or the API keys'), which share a hash slot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_on_redis_cluster() {
        let nodes = RedisServer::start_cluster(3).unwrap();
        let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
        let store = RedisIdentityStore::connect_cluster(&urls).unwrap();
        super::super::conformance::run_all(&store).await;
    }
}
