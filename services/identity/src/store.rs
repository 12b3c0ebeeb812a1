//! The identity service's narrow storage trait. Every backend implements it and passes the
//! same conformance suite ([`conformance`]).

use loyalty_platform::error::Result;

use crate::domain::{Card, CardStatus, Inserted, Member, Profile};
use crate::keys::ApiKey;

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

pub mod conformance;
pub mod embedded;
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
    /// The member's profile; `None` before its first update.
    async fn profile(&self, tenant_id: &str, member_id: &str) -> Result<Option<Profile>>;
    /// Writes `member` and `profile` together if the stored profile's version is `expected`
    /// (0: none stored); `false` and nothing written otherwise.
    async fn save_profile(&self, member: &Member, profile: &Profile, expected: u64)
    -> Result<bool>;
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
