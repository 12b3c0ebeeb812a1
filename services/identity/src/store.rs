//! The identity service's narrow storage trait. Every backend implements it and passes the
//! same conformance suite ([`conformance`]).

use loyalty_platform::error::Result;

use crate::domain::{Card, Inserted, Member};

pub mod conformance;
pub mod embedded;
pub mod traced;

#[async_trait::async_trait]
pub trait IdentityStore: Send + Sync + std::fmt::Debug {
    /// Inserts a new member with its phone and referral-code index entries, atomically:
    /// nothing is written when the phone or the code is taken.
    async fn insert_member(&self, member: &Member) -> Result<Inserted>;
    async fn member(&self, tenant_id: &str, member_id: &str) -> Result<Option<Member>>;
    async fn member_id_by_phone(&self, tenant_id: &str, phone: &str) -> Result<Option<String>>;
    async fn member_by_referral_code(&self, tenant_id: &str, code: &str) -> Result<Option<String>>;
    /// Inserts a card; `false` (and nothing written) when the number exists.
    async fn insert_card(&self, card: &Card) -> Result<bool>;
    async fn card(&self, tenant_id: &str, number: &str) -> Result<Option<Card>>;
    async fn cards_of_member(&self, tenant_id: &str, member_id: &str) -> Result<Vec<Card>>;
    /// Answers when the backend is reachable.
    async fn ping(&self) -> Result<()>;
}
