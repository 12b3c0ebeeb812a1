//! The identity service's narrow storage trait. Every backend implements it and passes the
//! same conformance suite ([`conformance`]).

use loyalty_platform::error::Result;

use crate::domain::{Card, CardStatus, Inserted, Member, MemberStatus, Profile};
use crate::keys::ApiKey;
use crate::lifecycle::{Erasure, ImportRow, MemberBlock, MergeRecord};

/// What [`IdentityStore::save_profile`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    Done,
    /// The stored profile's version was not the expected one (or the member is gone):
    /// nothing written.
    Stale,
    /// Another member of the tenant has the new email: nothing written.
    EmailTaken,
}

/// What [`IdentityStore::import_member`] did; nothing is written unless `Done`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Imported {
    Done,
    PhoneTaken,
    EmailTaken,
    CodeTaken,
    /// This card is bound to a member, blocked or replaced.
    CardTaken(String),
}

/// What [`IdentityStore::replace_card`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replaced {
    Done,
    /// The old card's stored status was not the expected one: nothing written.
    OldChanged,
    /// The new card exists when it should not, or its status was not the expected one:
    /// nothing written.
    NewChanged,
}

/// What the POS lookup by card reads: the card, the member it is bound to and that member's
/// profile ([`IdentityStore::card_holder`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CardHolder {
    pub card: Card,
    /// The member an active card is bound to, as stored (merged ones too); `None` for a card
    /// that is not active and bound, or whose member is missing.
    pub member: Option<Member>,
    /// The profile of `member` when it is stored active (`None`: none saved yet).
    pub profile: Option<Profile>,
}

pub mod conformance;
mod conformance_lifecycle;
pub mod embedded;
pub mod redis;
pub mod traced;

#[async_trait::async_trait]
pub trait IdentityStore: Send + Sync + std::fmt::Debug {
    /// Inserts a new member with its phone and referral-code index entries, atomically:
    /// nothing is written when the phone or the code is taken.
    async fn insert_member(&self, member: &Member) -> Result<Inserted>;
    async fn member(&self, tenant_id: &str, member_id: &str) -> Result<Option<Member>>;
    /// Every member of every tenant in (tenant, member id) order after `after`, at most
    /// `limit`: for rebuilding what other services derive from members.
    async fn members_after(
        &self,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<Member>>;
    async fn member_id_by_phone(&self, tenant_id: &str, phone: &str) -> Result<Option<String>>;
    async fn member_by_referral_code(&self, tenant_id: &str, code: &str) -> Result<Option<String>>;
    /// Inserts a card; `false` (and nothing written) when the number exists.
    async fn insert_card(&self, card: &Card) -> Result<bool>;
    async fn card(&self, tenant_id: &str, number: &str) -> Result<Option<Card>>;
    async fn cards_of_member(&self, tenant_id: &str, member_id: &str) -> Result<Vec<Card>>;
    /// The card with its member and profile, read together: a backend with snapshot reads
    /// answers from one snapshot; this default reads them one after the other.
    async fn card_holder(&self, tenant_id: &str, number: &str) -> Result<Option<CardHolder>> {
        let Some(card) = self.card(tenant_id, number).await? else {
            return Ok(None);
        };
        let member = match (&card.status, &card.member_id) {
            (CardStatus::Active, Some(id)) => self.member(tenant_id, id).await?,
            _ => None,
        };
        let profile = match &member {
            Some(m) if m.status == MemberStatus::Active => {
                self.profile(tenant_id, &m.member_id).await?
            }
            _ => None,
        };
        Ok(Some(CardHolder {
            card,
            member,
            profile,
        }))
    }
    /// The member's profile; `None` before its first update.
    async fn profile(&self, tenant_id: &str, member_id: &str) -> Result<Option<Profile>>;
    /// Writes `member` and `profile` together if the stored profile's version is `expected`
    /// (0: none stored), moving the member's email index entry when the email changed.
    async fn save_profile(
        &self,
        member: &Member,
        profile: &Profile,
        expected: u64,
    ) -> Result<Saved>;
    async fn member_id_by_email(&self, tenant_id: &str, email: &str) -> Result<Option<String>>;

    /// Merges `duplicate` (its new record and profile, status merged) into `record.into`,
    /// atomically: the duplicate's cards move to the survivor, its phone and email index
    /// entries point to the survivor, and `record` is kept. Nothing is written (false)
    /// unless both are stored active and the duplicate's profile version is `expected`.
    async fn merge_members(
        &self,
        duplicate: &Member,
        profile: &Profile,
        expected: u64,
        record: &MergeRecord,
    ) -> Result<bool>;
    async fn merge_record(&self, tenant_id: &str, member_id: &str) -> Result<Option<MergeRecord>>;
    /// Replaces a stored merge record (to mark its points as moved).
    async fn save_merge_record(
        &self,
        tenant_id: &str,
        member_id: &str,
        record: &MergeRecord,
    ) -> Result<()>;

    /// Writes an erased member and profile with its erasure record, atomically, removing
    /// the stored phone, email and referral-code index entries that point to it, and its
    /// block record (a free-text reason). Members
    /// merged into it (at any depth) lose their personal data and index entries in the same
    /// write. Nothing is written (false) unless the member is stored active or blocked with
    /// profile version `expected`.
    async fn erase_member(
        &self,
        member: &Member,
        profile: &Profile,
        expected: u64,
        erasure: &Erasure,
    ) -> Result<bool>;
    async fn erasure(&self, tenant_id: &str, member_id: &str) -> Result<Option<Erasure>>;
    /// Every member merged into `member_id`, at any depth.
    async fn merged_from(&self, tenant_id: &str, member_id: &str) -> Result<Vec<String>>;

    /// Writes a member whose status changed (blocked or unblocked) with its profile if the
    /// stored profile's version is `expected`, and puts (`Some`) or removes (`None`) its
    /// block record, atomically; false and nothing written otherwise.
    async fn set_block(
        &self,
        member: &Member,
        profile: &Profile,
        expected: u64,
        block: Option<&MemberBlock>,
    ) -> Result<bool>;
    async fn member_block(&self, tenant_id: &str, member_id: &str) -> Result<Option<MemberBlock>>;

    /// Inserts an imported member with its profile and cards and the import's row record,
    /// atomically. A card that does not exist is inserted; an unbound one is bound.
    async fn import_member(
        &self,
        member: &Member,
        profile: &Profile,
        cards: &[Card],
        row: &ImportRow,
    ) -> Result<Imported>;
    async fn import_row(
        &self,
        tenant_id: &str,
        import_id: &str,
        row_number: i64,
    ) -> Result<Option<ImportRow>>;
    async fn save_import_row(&self, row: &ImportRow) -> Result<()>;
    /// Inserts the cards whose numbers do not exist yet, atomically; returns how many.
    async fn insert_cards(&self, cards: &[Card]) -> Result<u64>;
    /// Writes `card` if the stored card's status is `expected`; `false` (nothing written)
    /// otherwise. A newly set member id enters the member's card index.
    async fn update_card(&self, card: &Card, expected: &CardStatus) -> Result<bool>;
    /// Writes `old` (status `old_expected` before) and `new` together, or nothing: `new` is
    /// inserted when `new_expected` is `None`, else its stored status must be `new_expected`.
    async fn replace_card(
        &self,
        old: &Card,
        old_expected: &CardStatus,
        new: &Card,
        new_expected: Option<&CardStatus>,
    ) -> Result<Replaced>;
    /// Answers when the backend is reachable.
    async fn ping(&self) -> Result<()>;

    /// Removes from storage, for good, the bytes erasures replaced (a backend that keeps
    /// replaced data in free space rewrites it); true when there was something to do.
    /// Idempotent, and cheap when no erasure happened since the last run.
    async fn scrub(&self) -> Result<bool>;

    /// Writes API keys in one transaction. With `expect_live`, nothing is written (and the
    /// answer is false) unless that key exists unrevoked: a key is revoked or rotated once.
    async fn save_api_keys(&self, keys: &[ApiKey], expect_live: Option<&str>) -> Result<bool>;
    async fn api_key(&self, key_id: &str) -> Result<Option<ApiKey>>;
    /// A tenant's keys in key id order after `after`, at most `limit`.
    async fn api_keys(
        &self,
        tenant_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ApiKey>>;
}
