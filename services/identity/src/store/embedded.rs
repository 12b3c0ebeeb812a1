//! The identity store on the embedded database.

use std::path::Path;

use loyalty_platform::embedded::{
    EmbeddedDb, Records, get_record, key, open_for_read, prefix_range, put_record, read_record,
    records_after, rows_after, storage_error as e,
};
use loyalty_platform::error::Result;
use redb::{ReadableTable, TableDefinition};

use super::{CardHolder, IdentityStore, Imported, Replaced, Saved};
use crate::domain::{Card, CardStatus, Inserted, Member, MemberStatus, Profile};
use crate::keys::ApiKey;
use crate::lifecycle::{Erasure, ImportRow, MemberBlock, MergeRecord};

const MEMBERS: Records = TableDefinition::new("members");
const PHONES: TableDefinition<&str, &str> = TableDefinition::new("members_by_phone");
const REFERRAL_CODES: TableDefinition<&str, &str> =
    TableDefinition::new("members_by_referral_code");
const CARDS: Records = TableDefinition::new("cards");
const MEMBER_CARDS: TableDefinition<&str, ()> = TableDefinition::new("cards_by_member");
/// API keys by key id, and their ids by tenant.
const API_KEYS: Records = TableDefinition::new("api_keys");
const TENANT_KEYS: TableDefinition<&str, ()> = TableDefinition::new("api_keys_by_tenant");
/// Profiles beside members (a separate table, so member records keep their layout).
const PROFILES: Records = TableDefinition::new("profiles");
/// Member ids by lower-case email.
const EMAILS: TableDefinition<&str, &str> = TableDefinition::new("members_by_email");
/// Merge records by merged member, and erasure records by erased member.
const MERGES: Records = TableDefinition::new("member_merges");
const ERASURES: Records = TableDefinition::new("member_erasures");
/// Facts about the data directory itself, e.g. which one-off indexing ran.
const META: Records = TableDefinition::new("identity_meta");
const EMAILS_INDEXED: &str = "emails_indexed";
/// Set by an erasure, cleared by the rewrite that follows it ([`IdentityStore::scrub`]).
const SCRUB_PENDING: &str = "scrub_pending";
/// Members merged into each survivor: (tenant, survivor, merged member).
const MERGED_FROM: TableDefinition<&str, ()> = TableDefinition::new("members_merged_from");
/// Why a member is blocked, while it is.
const BLOCKS: Records = TableDefinition::new("member_blocks");
/// Imported rows by (tenant, import id, row number).
const IMPORT_ROWS: Records = TableDefinition::new("member_import_rows");

type Index<'t> = redb::Table<'t, &'static str, &'static str>;

/// Points `tenant`'s `value` entry of `index` at `to` if it points at `from` now.
fn repoint(index: &mut Index<'_>, tenant: &str, value: &str, from: &str, to: &str) -> Result<()> {
    if value.is_empty() {
        return Ok(());
    }
    let k = key(&[tenant, value]);
    let current = index.get(k.as_str()).map_err(e)?.map(|v| v.value() == from);
    if current == Some(true) {
        index.insert(k.as_str(), to).map_err(e)?;
    }
    Ok(())
}

/// Removes `tenant`'s `value` entry of `index` if it points at `member`.
fn unindex(index: &mut Index<'_>, tenant: &str, value: &str, member: &str) -> Result<()> {
    if value.is_empty() {
        return Ok(());
    }
    let k = key(&[tenant, value]);
    let current = index
        .get(k.as_str())
        .map_err(e)?
        .map(|v| v.value() == member);
    if current == Some(true) {
        index.remove(k.as_str()).map_err(e)?;
    }
    Ok(())
}

/// Whether `tenant`'s `value` entry of `index` is free (or `member`'s own).
fn free_for(index: &Index<'_>, tenant: &str, value: &str, member: &str) -> Result<bool> {
    if value.is_empty() {
        return Ok(true);
    }
    let k = key(&[tenant, value]);
    Ok(index
        .get(k.as_str())
        .map_err(e)?
        .is_none_or(|v| v.value() == member))
}

/// Removes `tenant`'s `value` entry of `index` if it points at any of `members`.
fn unindex_any(index: &mut Index<'_>, tenant: &str, value: &str, members: &[String]) -> Result<()> {
    if value.is_empty() {
        return Ok(());
    }
    let k = key(&[tenant, value]);
    let ours = index
        .get(k.as_str())
        .map_err(e)?
        .is_some_and(|v| members.iter().any(|m| m == v.value()));
    if ours {
        index.remove(k.as_str()).map_err(e)?;
    }
    Ok(())
}

/// Most members one erasure reaches through merges.
const MAX_FAMILY: usize = 10_000;

/// `root` and every member merged into it, at any depth, root first.
fn merged_family(
    merged_from: &impl ReadableTable<&'static str, ()>,
    tenant: &str,
    root: &str,
) -> Result<Vec<String>> {
    let mut family = vec![root.to_string()];
    let mut i = 0;
    while i < family.len() && family.len() < MAX_FAMILY {
        let (start, end) = prefix_range(&[tenant, &family[i]]);
        for entry in merged_from.range(start.as_str()..end.as_str()).map_err(e)? {
            let (k, _) = entry.map_err(e)?;
            if let Some(id) = k.value().rsplit('\u{0}').next() {
                family.push(id.to_string());
            }
        }
        i += 1;
    }
    Ok(family)
}

type RecordTable<'t> = redb::Table<'t, &'static str, &'static [u8]>;

/// The stored member at `k` when its status passes `status_ok` and its profile is at
/// version `expected` (0: no profile stored): the condition of every conditional member
/// write. `None` when the write must not happen.
fn member_at(
    members: &RecordTable<'_>,
    profiles: &RecordTable<'_>,
    k: &str,
    expected: u64,
    status_ok: fn(MemberStatus) -> bool,
) -> Result<Option<Member>> {
    let Some(member) = get_record::<Member>(members, k)? else {
        return Ok(None);
    };
    let version = get_record::<Profile>(profiles, k)?.map_or(0, |p| p.version);
    Ok((status_ok(member.status) && version == expected).then_some(member))
}

fn any_status(_: MemberStatus) -> bool {
    true
}

fn active_or_blocked(s: MemberStatus) -> bool {
    matches!(s, MemberStatus::Active | MemberStatus::Blocked)
}

fn import_key(tenant: &str, import_id: &str, row: i64) -> String {
    // Zero-padded so rows sort by number (row numbers are positive).
    key(&[tenant, import_id, &format!("{row:020}")])
}

/// The tables a copy of the store reads ([`EmbeddedIdentityStore::rows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Members,
    Profiles,
    Phones,
    Emails,
    ReferralCodes,
    Cards,
    MemberCards,
    ApiKeys,
    TenantKeys,
    Merges,
    Erasures,
    MergedFrom,
    Blocks,
    ImportRows,
}

impl Table {
    pub const ALL: [Table; 14] = [
        Table::Members,
        Table::Profiles,
        Table::Phones,
        Table::Emails,
        Table::ReferralCodes,
        Table::Cards,
        Table::MemberCards,
        Table::ApiKeys,
        Table::TenantKeys,
        Table::Merges,
        Table::Erasures,
        Table::MergedFrom,
        Table::Blocks,
        Table::ImportRows,
    ];
}

pub use loyalty_platform::embedded::Row;

#[derive(Debug, Clone)]
pub struct EmbeddedIdentityStore {
    db: EmbeddedDb,
}

impl EmbeddedIdentityStore {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            db: EmbeddedDb::open(path)?,
        })
    }

    /// Up to `limit` rows of `table` in key order after the key `after` (as returned last):
    /// for copying the store elsewhere. Also returns the last key read.
    pub async fn rows(
        &self,
        table: Table,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<Row>, Option<String>)> {
        let bytes = |v: &[u8]| v.to_vec();
        let text = |v: &str| v.as_bytes().to_vec();
        let nothing = |_: ()| Vec::new();
        self.db
            .read(move |txn| match table {
                Table::Members => rows_after(txn, MEMBERS, after.as_deref(), limit, bytes),
                Table::Profiles => rows_after(txn, PROFILES, after.as_deref(), limit, bytes),
                Table::Cards => rows_after(txn, CARDS, after.as_deref(), limit, bytes),
                Table::ApiKeys => rows_after(txn, API_KEYS, after.as_deref(), limit, bytes),
                Table::Merges => rows_after(txn, MERGES, after.as_deref(), limit, bytes),
                Table::Erasures => rows_after(txn, ERASURES, after.as_deref(), limit, bytes),
                Table::Blocks => rows_after(txn, BLOCKS, after.as_deref(), limit, bytes),
                Table::ImportRows => rows_after(txn, IMPORT_ROWS, after.as_deref(), limit, bytes),
                Table::Phones => rows_after(txn, PHONES, after.as_deref(), limit, text),
                Table::Emails => rows_after(txn, EMAILS, after.as_deref(), limit, text),
                Table::ReferralCodes => {
                    rows_after(txn, REFERRAL_CODES, after.as_deref(), limit, text)
                }
                Table::MemberCards => {
                    rows_after(txn, MEMBER_CARDS, after.as_deref(), limit, nothing)
                }
                Table::TenantKeys => rows_after(txn, TENANT_KEYS, after.as_deref(), limit, nothing),
                Table::MergedFrom => rows_after(txn, MERGED_FROM, after.as_deref(), limit, nothing),
            })
            .await
    }

    /// Files the emails of members stored before the email index existed, once per data
    /// directory. An email two of them share stays with the first in id order (the other is
    /// logged). Returns how many were filed.
    pub async fn index_stored_emails(&self) -> Result<u64> {
        self.db
            .write(|txn| {
                let mut meta = txn.open_table(META).map_err(e)?;
                if meta.get(EMAILS_INDEXED).map_err(e)?.is_some() {
                    return Ok(0);
                }
                let members = txn.open_table(MEMBERS).map_err(e)?;
                let mut emails = txn.open_table(EMAILS).map_err(e)?;
                let mut filed = 0;
                for entry in members.iter().map_err(e)? {
                    let (_, bytes) = entry.map_err(e)?;
                    let m: Member = loyalty_platform::embedded::decode(bytes.value())?;
                    if m.email.is_empty() || m.status != MemberStatus::Active {
                        continue;
                    }
                    let k = key(&[&m.tenant_id, &m.email]);
                    let owner = emails
                        .get(k.as_str())
                        .map_err(e)?
                        .map(|v| v.value().to_string());
                    match owner {
                        None => {
                            emails.insert(k.as_str(), m.member_id.as_str()).map_err(e)?;
                            filed += 1;
                        }
                        Some(owner) if owner != m.member_id => tracing::warn!(
                            tenant_id = %m.tenant_id,
                            member_id = %m.member_id,
                            owner = %owner,
                            "two stored members share an email; lookups by it find the first"
                        ),
                        Some(_) => {}
                    }
                }
                meta.insert(EMAILS_INDEXED, &[][..]).map_err(e)?;
                Ok(filed)
            })
            .await
    }
}

#[async_trait::async_trait]
impl IdentityStore for EmbeddedIdentityStore {
    async fn insert_member(&self, member: &Member) -> Result<Inserted> {
        let member = member.clone();
        self.db
            .write(move |txn| {
                let mut phones = txn.open_table(PHONES).map_err(e)?;
                let phone_key = key(&[&member.tenant_id, &member.phone]);
                if phones.get(phone_key.as_str()).map_err(e)?.is_some() {
                    return Ok(Inserted::PhoneTaken);
                }
                let mut emails = txn.open_table(EMAILS).map_err(e)?;
                if !free_for(&emails, &member.tenant_id, &member.email, &member.member_id)? {
                    return Ok(Inserted::EmailTaken);
                }
                let mut codes = txn.open_table(REFERRAL_CODES).map_err(e)?;
                let code_key = key(&[&member.tenant_id, &member.referral_code]);
                if codes.get(code_key.as_str()).map_err(e)?.is_some() {
                    return Ok(Inserted::CodeTaken);
                }
                if !member.email.is_empty() {
                    emails
                        .insert(
                            key(&[&member.tenant_id, &member.email]).as_str(),
                            member.member_id.as_str(),
                        )
                        .map_err(e)?;
                }
                let mut members = txn.open_table(MEMBERS).map_err(e)?;
                put_record(
                    &mut members,
                    &key(&[&member.tenant_id, &member.member_id]),
                    &member,
                )?;
                phones
                    .insert(phone_key.as_str(), member.member_id.as_str())
                    .map_err(e)?;
                codes
                    .insert(code_key.as_str(), member.member_id.as_str())
                    .map_err(e)?;
                Ok(Inserted::Done)
            })
            .await
    }

    async fn member(&self, tenant_id: &str, member_id: &str) -> Result<Option<Member>> {
        let k = key(&[tenant_id, member_id]);
        self.db.get(|txn| read_record(txn, MEMBERS, &k))
    }

    async fn members_after(
        &self,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<Member>> {
        let after = after.map(|(t, m)| key(&[&t, &m]));
        self.db
            .read(move |txn| records_after(txn, MEMBERS, after.as_deref(), limit))
            .await
    }

    async fn member_id_by_phone(&self, tenant_id: &str, phone: &str) -> Result<Option<String>> {
        lookup(&self.db, PHONES, key(&[tenant_id, phone])).await
    }

    async fn member_by_referral_code(&self, tenant_id: &str, code: &str) -> Result<Option<String>> {
        lookup(&self.db, REFERRAL_CODES, key(&[tenant_id, code])).await
    }

    async fn insert_card(&self, card: &Card) -> Result<bool> {
        let card = card.clone();
        self.db
            .write(move |txn| {
                let mut cards = txn.open_table(CARDS).map_err(e)?;
                let card_key = key(&[&card.tenant_id, &card.number]);
                if cards.get(card_key.as_str()).map_err(e)?.is_some() {
                    return Ok(false);
                }
                put_record(&mut cards, &card_key, &card)?;
                let mut by_member = txn.open_table(MEMBER_CARDS).map_err(e)?;
                index_card(&mut by_member, &card)?;
                Ok(true)
            })
            .await
    }

    async fn card(&self, tenant_id: &str, number: &str) -> Result<Option<Card>> {
        let k = key(&[tenant_id, number]);
        self.db.get(|txn| read_record(txn, CARDS, &k))
    }

    async fn card_holder(&self, tenant_id: &str, number: &str) -> Result<Option<CardHolder>> {
        let card_key = key(&[tenant_id, number]);
        self.db.get(|txn| {
            let Some(card) = read_record::<Card>(txn, CARDS, &card_key)? else {
                return Ok(None);
            };
            let member = match (&card.status, &card.member_id) {
                (CardStatus::Active, Some(id)) => {
                    read_record::<Member>(txn, MEMBERS, &key(&[tenant_id, id]))?
                }
                _ => None,
            };
            let profile = match &member {
                Some(m) if m.status == MemberStatus::Active => {
                    read_record(txn, PROFILES, &key(&[tenant_id, &m.member_id]))?
                }
                _ => None,
            };
            Ok(Some(CardHolder {
                card,
                member,
                profile,
            }))
        })
    }

    async fn cards_of_member(&self, tenant_id: &str, member_id: &str) -> Result<Vec<Card>> {
        let (start, end) = prefix_range(&[tenant_id, member_id]);
        let tenant = tenant_id.to_string();
        self.db
            .read(move |txn| {
                let (Some(index), Some(cards)) = (
                    open_for_read(txn, MEMBER_CARDS)?,
                    open_for_read(txn, CARDS)?,
                ) else {
                    return Ok(Vec::new());
                };
                let mut out = Vec::new();
                for entry in index.range(start.as_str()..end.as_str()).map_err(e)? {
                    let (k, _) = entry.map_err(e)?;
                    let Some(number) = k.value().rsplit('\u{0}').next().map(str::to_string) else {
                        continue;
                    };
                    if let Some(card) = get_record(&cards, &key(&[&tenant, &number]))? {
                        out.push(card);
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn profile(&self, tenant_id: &str, member_id: &str) -> Result<Option<Profile>> {
        let k = key(&[tenant_id, member_id]);
        self.db.get(|txn| read_record(txn, PROFILES, &k))
    }

    async fn save_profile(
        &self,
        member: &Member,
        profile: &Profile,
        expected: u64,
    ) -> Result<Saved> {
        let (member, profile) = (member.clone(), profile.clone());
        self.db
            .write(move |txn| {
                let k = key(&[&member.tenant_id, &member.member_id]);
                let mut profiles = txn.open_table(PROFILES).map_err(e)?;
                let mut members = txn.open_table(MEMBERS).map_err(e)?;
                let Some(before) = member_at(&members, &profiles, &k, expected, any_status)? else {
                    return Ok(Saved::Stale);
                };
                if before.email != member.email {
                    let mut emails = txn.open_table(EMAILS).map_err(e)?;
                    let (tenant, id) = (&member.tenant_id, &member.member_id);
                    if !free_for(&emails, tenant, &member.email, id)? {
                        return Ok(Saved::EmailTaken);
                    }
                    unindex(&mut emails, tenant, &before.email, id)?;
                    if !member.email.is_empty() {
                        emails
                            .insert(key(&[tenant, &member.email]).as_str(), id.as_str())
                            .map_err(e)?;
                    }
                }
                put_record(&mut members, &k, &member)?;
                put_record(&mut profiles, &k, &profile)?;
                Ok(Saved::Done)
            })
            .await
    }

    async fn member_id_by_email(&self, tenant_id: &str, email: &str) -> Result<Option<String>> {
        lookup(&self.db, EMAILS, key(&[tenant_id, email])).await
    }

    async fn merge_members(
        &self,
        duplicate: &Member,
        profile: &Profile,
        expected: u64,
        record: &MergeRecord,
    ) -> Result<bool> {
        let (dup, profile, record) = (duplicate.clone(), profile.clone(), record.clone());
        self.db
            .write(move |txn| {
                let tenant = dup.tenant_id.as_str();
                let dup_key = key(&[tenant, &dup.member_id]);
                let mut members = txn.open_table(MEMBERS).map_err(e)?;
                let mut profiles = txn.open_table(PROFILES).map_err(e)?;
                let active = |s| s == MemberStatus::Active;
                let survivor = get_record::<Member>(&members, &key(&[tenant, &record.into]))?;
                if member_at(&members, &profiles, &dup_key, expected, active)?.is_none()
                    || !survivor.is_some_and(|m| active(m.status))
                {
                    return Ok(false);
                }
                // Members merged into the duplicate whose points have not arrived hold it
                // back: their transfer goes to the duplicate's account.
                let mut merged_from = txn.open_table(MERGED_FROM).map_err(e)?;
                let merges = txn.open_table(MERGES).map_err(e)?;
                for from in merged_family(&merged_from, tenant, &dup.member_id)?
                    .iter()
                    .skip(1)
                {
                    let r = get_record::<MergeRecord>(&merges, &key(&[tenant, from]))?;
                    if r.is_some_and(|r| !r.points_moved) {
                        return Ok(false);
                    }
                }
                drop(merges);
                // The duplicate's cards, now the survivor's.
                let mut by_member = txn.open_table(MEMBER_CARDS).map_err(e)?;
                let mut cards = txn.open_table(CARDS).map_err(e)?;
                let (start, end) = prefix_range(&[tenant, &dup.member_id]);
                let mut moved = Vec::new();
                for entry in by_member.range(start.as_str()..end.as_str()).map_err(e)? {
                    let (k, _) = entry.map_err(e)?;
                    moved.push(k.value().to_string());
                }
                for index_key in moved {
                    by_member.remove(index_key.as_str()).map_err(e)?;
                    let Some(number) = index_key.rsplit('\u{0}').next() else {
                        continue;
                    };
                    let card_key = key(&[tenant, number]);
                    if let Some(mut card) = get_record::<Card>(&cards, &card_key)? {
                        card.member_id = Some(record.into.clone());
                        put_record(&mut cards, &card_key, &card)?;
                        index_card(&mut by_member, &card)?;
                    }
                }
                let mut phones = txn.open_table(PHONES).map_err(e)?;
                repoint(
                    &mut phones,
                    tenant,
                    &dup.phone,
                    &dup.member_id,
                    &record.into,
                )?;
                let mut emails = txn.open_table(EMAILS).map_err(e)?;
                repoint(
                    &mut emails,
                    tenant,
                    &dup.email,
                    &dup.member_id,
                    &record.into,
                )?;
                let mut codes = txn.open_table(REFERRAL_CODES).map_err(e)?;
                repoint(
                    &mut codes,
                    tenant,
                    &dup.referral_code,
                    &dup.member_id,
                    &record.into,
                )?;
                put_record(&mut members, &dup_key, &dup)?;
                put_record(&mut profiles, &dup_key, &profile)?;
                let mut merges = txn.open_table(MERGES).map_err(e)?;
                put_record(&mut merges, &dup_key, &record)?;
                merged_from
                    .insert(key(&[tenant, &record.into, &dup.member_id]).as_str(), ())
                    .map_err(e)?;
                Ok(true)
            })
            .await
    }

    async fn merge_record(&self, tenant_id: &str, member_id: &str) -> Result<Option<MergeRecord>> {
        let k = key(&[tenant_id, member_id]);
        self.db.get(|txn| read_record(txn, MERGES, &k))
    }

    async fn save_merge_record(
        &self,
        tenant_id: &str,
        member_id: &str,
        record: &MergeRecord,
    ) -> Result<()> {
        let (k, record) = (key(&[tenant_id, member_id]), record.clone());
        self.db
            .write(move |txn| {
                let mut merges = txn.open_table(MERGES).map_err(e)?;
                put_record(&mut merges, &k, &record)
            })
            .await
    }

    async fn erase_member(
        &self,
        member: &Member,
        profile: &Profile,
        expected: u64,
        erasure: &Erasure,
    ) -> Result<bool> {
        let (member, profile, erasure) = (member.clone(), profile.clone(), erasure.clone());
        self.db
            .write(move |txn| {
                let (tenant, id) = (member.tenant_id.as_str(), member.member_id.as_str());
                let k = key(&[tenant, id]);
                let mut members = txn.open_table(MEMBERS).map_err(e)?;
                let mut profiles = txn.open_table(PROFILES).map_err(e)?;
                if member_at(&members, &profiles, &k, expected, active_or_blocked)?.is_none() {
                    return Ok(false);
                }
                // Members merged into it, at any depth: their personal data goes too, and so
                // do their phones, emails and codes, which find this member now.
                let family = {
                    let merged_from = txn.open_table(MERGED_FROM).map_err(e)?;
                    merged_family(&merged_from, tenant, id)?
                };
                let mut phones = txn.open_table(PHONES).map_err(e)?;
                let mut emails = txn.open_table(EMAILS).map_err(e)?;
                let mut codes = txn.open_table(REFERRAL_CODES).map_err(e)?;
                let mut erasures = txn.open_table(ERASURES).map_err(e)?;
                let mut blocks = txn.open_table(BLOCKS).map_err(e)?;
                for (i, member_id) in family.iter().enumerate() {
                    let mk = key(&[tenant, member_id]);
                    let Some(old) = get_record::<Member>(&members, &mk)? else {
                        continue;
                    };
                    // A block's reason is free text an operator typed about the person.
                    blocks.remove(mk.as_str()).map_err(e)?;
                    unindex_any(&mut phones, tenant, &old.phone, &family)?;
                    unindex_any(&mut emails, tenant, &old.email, &family)?;
                    unindex_any(&mut codes, tenant, &old.referral_code, &family)?;
                    if i == 0 {
                        put_record(&mut members, &k, &member)?;
                        put_record(&mut profiles, &k, &profile)?;
                    } else {
                        let blank = Member {
                            phone: String::new(),
                            email: String::new(),
                            first_name: String::new(),
                            last_name: String::new(),
                            referral_code: String::new(),
                            updated_at: member.updated_at,
                            ..old
                        };
                        let version =
                            get_record::<Profile>(&profiles, &mk)?.map_or(0, |p| p.version);
                        put_record(&mut members, &mk, &blank)?;
                        put_record(
                            &mut profiles,
                            &mk,
                            &Profile {
                                version: version + 1,
                                ..Profile::default()
                            },
                        )?;
                    }
                    put_record(&mut erasures, &mk, &erasure)?;
                }
                // The replaced records stay in freed pages until the file is rewritten.
                loyalty_platform::embedded::mark(txn, META, SCRUB_PENDING)?;
                Ok(true)
            })
            .await
    }

    async fn merged_from(&self, tenant_id: &str, member_id: &str) -> Result<Vec<String>> {
        let (tenant, root) = (tenant_id.to_string(), member_id.to_string());
        self.db
            .read(move |txn| {
                let Some(merged_from) = open_for_read(txn, MERGED_FROM)? else {
                    return Ok(Vec::new());
                };
                let mut family = merged_family(&merged_from, &tenant, &root)?;
                family.remove(0);
                Ok(family)
            })
            .await
    }

    async fn scrub(&self) -> Result<bool> {
        self.db
            .rewrite_if_marked(META, SCRUB_PENDING, "identity")
            .await
    }

    async fn erasure(&self, tenant_id: &str, member_id: &str) -> Result<Option<Erasure>> {
        let k = key(&[tenant_id, member_id]);
        self.db.get(|txn| read_record(txn, ERASURES, &k))
    }

    async fn set_block(
        &self,
        member: &Member,
        profile: &Profile,
        expected: u64,
        block: Option<&MemberBlock>,
    ) -> Result<bool> {
        let (member, profile, block) = (member.clone(), profile.clone(), block.cloned());
        self.db
            .write(move |txn| {
                let k = key(&[&member.tenant_id, &member.member_id]);
                let mut members = txn.open_table(MEMBERS).map_err(e)?;
                let mut profiles = txn.open_table(PROFILES).map_err(e)?;
                if member_at(&members, &profiles, &k, expected, active_or_blocked)?.is_none() {
                    return Ok(false);
                }
                put_record(&mut members, &k, &member)?;
                put_record(&mut profiles, &k, &profile)?;
                let mut blocks = txn.open_table(BLOCKS).map_err(e)?;
                match &block {
                    Some(b) => put_record(&mut blocks, &k, b)?,
                    None => {
                        blocks.remove(k.as_str()).map_err(e)?;
                    }
                }
                Ok(true)
            })
            .await
    }

    async fn member_block(&self, tenant_id: &str, member_id: &str) -> Result<Option<MemberBlock>> {
        let k = key(&[tenant_id, member_id]);
        self.db.get(|txn| read_record(txn, BLOCKS, &k))
    }

    async fn import_member(
        &self,
        member: &Member,
        profile: &Profile,
        cards: &[Card],
        row: &ImportRow,
    ) -> Result<Imported> {
        let (member, profile, cards, row) =
            (member.clone(), profile.clone(), cards.to_vec(), row.clone());
        self.db
            .write(move |txn| {
                let (tenant, id) = (member.tenant_id.as_str(), member.member_id.as_str());
                let mut phones = txn.open_table(PHONES).map_err(e)?;
                if !free_for(&phones, tenant, &member.phone, id)? {
                    return Ok(Imported::PhoneTaken);
                }
                let mut emails = txn.open_table(EMAILS).map_err(e)?;
                if !free_for(&emails, tenant, &member.email, id)? {
                    return Ok(Imported::EmailTaken);
                }
                let mut codes = txn.open_table(REFERRAL_CODES).map_err(e)?;
                if !free_for(&codes, tenant, &member.referral_code, id)? {
                    return Ok(Imported::CodeTaken);
                }
                let mut table = txn.open_table(CARDS).map_err(e)?;
                let mut bound = Vec::with_capacity(cards.len());
                for card in &cards {
                    let card_key = key(&[tenant, &card.number]);
                    match get_record::<Card>(&table, &card_key)? {
                        None => bound.push(card.clone()),
                        Some(stored) if stored.status == CardStatus::Unbound => bound.push(Card {
                            status: CardStatus::Active,
                            member_id: card.member_id.clone(),
                            ..stored
                        }),
                        Some(_) => return Ok(Imported::CardTaken(card.number.clone())),
                    }
                }
                let mut by_member = txn.open_table(MEMBER_CARDS).map_err(e)?;
                for card in &bound {
                    put_record(&mut table, &key(&[tenant, &card.number]), card)?;
                    index_card(&mut by_member, card)?;
                }
                let k = key(&[tenant, id]);
                phones
                    .insert(key(&[tenant, &member.phone]).as_str(), id)
                    .map_err(e)?;
                if !member.email.is_empty() {
                    emails
                        .insert(key(&[tenant, &member.email]).as_str(), id)
                        .map_err(e)?;
                }
                codes
                    .insert(key(&[tenant, &member.referral_code]).as_str(), id)
                    .map_err(e)?;
                let mut members = txn.open_table(MEMBERS).map_err(e)?;
                put_record(&mut members, &k, &member)?;
                let mut profiles = txn.open_table(PROFILES).map_err(e)?;
                put_record(&mut profiles, &k, &profile)?;
                let mut rows = txn.open_table(IMPORT_ROWS).map_err(e)?;
                put_record(
                    &mut rows,
                    &import_key(tenant, &row.import_id, row.row_number),
                    &row,
                )?;
                Ok(Imported::Done)
            })
            .await
    }

    async fn import_row(
        &self,
        tenant_id: &str,
        import_id: &str,
        row_number: i64,
    ) -> Result<Option<ImportRow>> {
        let k = import_key(tenant_id, import_id, row_number);
        self.db
            .read(move |txn| read_record(txn, IMPORT_ROWS, &k))
            .await
    }

    async fn save_import_row(&self, row: &ImportRow) -> Result<()> {
        let row = row.clone();
        self.db
            .write(move |txn| {
                let mut rows = txn.open_table(IMPORT_ROWS).map_err(e)?;
                put_record(
                    &mut rows,
                    &import_key(&row.tenant_id, &row.import_id, row.row_number),
                    &row,
                )
            })
            .await
    }

    async fn insert_cards(&self, cards: &[Card]) -> Result<u64> {
        let cards = cards.to_vec();
        self.db
            .write(move |txn| {
                let mut table = txn.open_table(CARDS).map_err(e)?;
                let mut by_member = txn.open_table(MEMBER_CARDS).map_err(e)?;
                let mut created = 0;
                for card in &cards {
                    let card_key = key(&[&card.tenant_id, &card.number]);
                    if table.get(card_key.as_str()).map_err(e)?.is_some() {
                        continue;
                    }
                    put_record(&mut table, &card_key, card)?;
                    index_card(&mut by_member, card)?;
                    created += 1;
                }
                Ok(created)
            })
            .await
    }

    async fn update_card(&self, card: &Card, expected: &CardStatus) -> Result<bool> {
        let (card, expected) = (card.clone(), expected.clone());
        self.db
            .write(move |txn| {
                let mut table = txn.open_table(CARDS).map_err(e)?;
                let card_key = key(&[&card.tenant_id, &card.number]);
                let stored: Option<Card> = get_record(&table, &card_key)?;
                if stored.is_none_or(|s| s.status != expected) {
                    return Ok(false);
                }
                put_record(&mut table, &card_key, &card)?;
                let mut by_member = txn.open_table(MEMBER_CARDS).map_err(e)?;
                index_card(&mut by_member, &card)?;
                Ok(true)
            })
            .await
    }

    async fn replace_card(
        &self,
        old: &Card,
        old_expected: &CardStatus,
        new: &Card,
        new_expected: Option<&CardStatus>,
    ) -> Result<Replaced> {
        let (old, old_expected, new) = (old.clone(), old_expected.clone(), new.clone());
        let new_expected = new_expected.cloned();
        self.db
            .write(move |txn| {
                let mut table = txn.open_table(CARDS).map_err(e)?;
                let old_key = key(&[&old.tenant_id, &old.number]);
                let new_key = key(&[&new.tenant_id, &new.number]);
                let stored_old: Option<Card> = get_record(&table, &old_key)?;
                if stored_old.is_none_or(|s| s.status != old_expected) {
                    return Ok(Replaced::OldChanged);
                }
                let stored_new: Option<Card> = get_record(&table, &new_key)?;
                let new_ok = match (&new_expected, stored_new) {
                    (None, None) => true,
                    (Some(want), Some(s)) => s.status == *want,
                    _ => false,
                };
                if !new_ok {
                    return Ok(Replaced::NewChanged);
                }
                put_record(&mut table, &old_key, &old)?;
                put_record(&mut table, &new_key, &new)?;
                let mut by_member = txn.open_table(MEMBER_CARDS).map_err(e)?;
                index_card(&mut by_member, &new)?;
                Ok(Replaced::Done)
            })
            .await
    }

    async fn save_api_keys(&self, keys: &[ApiKey], expect_live: Option<&str>) -> Result<bool> {
        let keys = keys.to_vec();
        let expect_live = expect_live.map(str::to_string);
        self.db
            .write(move |txn| {
                let mut table = txn.open_table(API_KEYS).map_err(e)?;
                if let Some(id) = &expect_live {
                    let live: Option<ApiKey> = get_record(&table, id)?;
                    if live.is_none_or(|k| k.revoked_at.is_some()) {
                        return Ok(false);
                    }
                }
                let mut by_tenant = txn.open_table(TENANT_KEYS).map_err(e)?;
                for k in &keys {
                    put_record(&mut table, &k.key_id, k)?;
                    by_tenant
                        .insert(key(&[&k.tenant_id, &k.key_id]).as_str(), ())
                        .map_err(e)?;
                }
                Ok(true)
            })
            .await
    }

    async fn api_key(&self, key_id: &str) -> Result<Option<ApiKey>> {
        let id = key_id.to_string();
        self.db.get(|txn| read_record(txn, API_KEYS, &id))
    }

    async fn api_keys(
        &self,
        tenant_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ApiKey>> {
        let (start, end) = prefix_range(&[tenant_id]);
        let start = match after {
            Some(id) => {
                let mut k = key(&[tenant_id, id]);
                k.push('\u{0}');
                k
            }
            None => start,
        };
        self.db
            .read(move |txn| {
                let (Some(index), Some(keys)) = (
                    open_for_read(txn, TENANT_KEYS)?,
                    open_for_read(txn, API_KEYS)?,
                ) else {
                    return Ok(Vec::new());
                };
                let mut out = Vec::new();
                for entry in index.range(start.as_str()..end.as_str()).map_err(e)? {
                    if out.len() >= limit {
                        break;
                    }
                    let (k, _) = entry.map_err(e)?;
                    let Some(id) = k.value().rsplit('\u{0}').next().map(str::to_string) else {
                        continue;
                    };
                    if let Some(found) = get_record(&keys, &id)? {
                        out.push(found);
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

/// Files a bound card under its member.
fn index_card(by_member: &mut redb::Table<'_, &str, ()>, card: &Card) -> Result<()> {
    if let Some(member_id) = &card.member_id {
        let k = key(&[&card.tenant_id, member_id, &card.number]);
        by_member.insert(k.as_str(), ()).map_err(e)?;
    }
    Ok(())
}

async fn lookup(
    db: &EmbeddedDb,
    table: TableDefinition<'static, &'static str, &'static str>,
    k: String,
) -> Result<Option<String>> {
    db.get(|txn| {
        let Some(t) = open_for_read(txn, table)? else {
            return Ok(None);
        };
        Ok(t.get(k.as_str()).map_err(e)?.map(|v| v.value().to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn emails_stored_before_the_index_are_filed_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedIdentityStore::open(&dir.path().join("identity.redb")).unwrap();
        // Members as an older build wrote them: records without email index entries.
        let old = |id: &str, email: &str| Member {
            tenant_id: "t".into(),
            member_id: id.into(),
            status: MemberStatus::Active,
            phone: format!("+7701000000{id}"),
            email: email.into(),
            first_name: String::new(),
            last_name: String::new(),
            referral_code: format!("CODE000{id}"),
            referred_by: None,
            channel: loyalty_platform::types::Channel::Store,
            store_id: String::new(),
            registered_at: 1,
            updated_at: 1,
        };
        let records = [old("1", "a@x.kz"), old("2", "a@x.kz"), old("3", "")];
        store
            .db
            .write(move |txn| {
                let mut members = txn.open_table(MEMBERS).map_err(e)?;
                for m in &records {
                    put_record(&mut members, &key(&[&m.tenant_id, &m.member_id]), m)?;
                }
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(store.member_id_by_email("t", "a@x.kz").await.unwrap(), None);
        assert_eq!(store.index_stored_emails().await.unwrap(), 1);
        assert_eq!(
            store
                .member_id_by_email("t", "a@x.kz")
                .await
                .unwrap()
                .as_deref(),
            Some("1"),
            "the first in id order keeps a shared email"
        );
        assert_eq!(store.index_stored_emails().await.unwrap(), 0, "once");
    }

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedIdentityStore::open(&dir.path().join("identity.redb")).unwrap();
        super::super::conformance::run_all(&store).await;
    }
}
