//! Storage spans: wraps any [`IdentityStore`] so each call runs in a span with the database
//! semantic-convention attributes (system and operation, never phones, names or numbers).

use std::sync::Arc;

use loyalty_platform::error::Result;
use loyalty_platform::telemetry::in_db_span;

use super::{CardHolder, IdentityStore, Imported, Replaced, Saved};
use crate::domain::{Card, CardStatus, Inserted, Member, Profile};
use crate::keys::ApiKey;
use crate::lifecycle::{Erasure, ImportRow, MemberBlock, MergeRecord};

/// A store whose calls are traced as `system` (e.g. `redb`).
#[derive(Debug)]
pub struct Traced {
    system: &'static str,
    inner: Arc<dyn IdentityStore>,
}

impl Traced {
    pub fn new(system: &'static str, inner: Arc<dyn IdentityStore>) -> Self {
        Self { system, inner }
    }
}

#[async_trait::async_trait]
impl IdentityStore for Traced {
    async fn insert_member(&self, member: &Member) -> Result<Inserted> {
        in_db_span(
            self.system,
            "identity.insert_member",
            self.inner.insert_member(member),
        )
        .await
    }
    async fn members_after(
        &self,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<Member>> {
        let call = self.inner.members_after(after, limit);
        in_db_span(self.system, "identity.members_after", call).await
    }
    async fn member(&self, tenant_id: &str, member_id: &str) -> Result<Option<Member>> {
        in_db_span(
            self.system,
            "identity.member",
            self.inner.member(tenant_id, member_id),
        )
        .await
    }
    async fn member_id_by_phone(&self, tenant_id: &str, phone: &str) -> Result<Option<String>> {
        let call = self.inner.member_id_by_phone(tenant_id, phone);
        in_db_span(self.system, "identity.member_by_phone", call).await
    }
    async fn member_by_referral_code(&self, tenant_id: &str, code: &str) -> Result<Option<String>> {
        let call = self.inner.member_by_referral_code(tenant_id, code);
        in_db_span(self.system, "identity.member_by_referral_code", call).await
    }
    async fn insert_card(&self, card: &Card) -> Result<bool> {
        in_db_span(
            self.system,
            "identity.insert_card",
            self.inner.insert_card(card),
        )
        .await
    }
    async fn card(&self, tenant_id: &str, number: &str) -> Result<Option<Card>> {
        in_db_span(
            self.system,
            "identity.card",
            self.inner.card(tenant_id, number),
        )
        .await
    }
    async fn card_holder(&self, tenant_id: &str, number: &str) -> Result<Option<CardHolder>> {
        in_db_span(
            self.system,
            "identity.card_holder",
            self.inner.card_holder(tenant_id, number),
        )
        .await
    }
    async fn cards_of_member(&self, tenant_id: &str, member_id: &str) -> Result<Vec<Card>> {
        let call = self.inner.cards_of_member(tenant_id, member_id);
        in_db_span(self.system, "identity.cards_of_member", call).await
    }
    async fn profile(&self, tenant_id: &str, member_id: &str) -> Result<Option<Profile>> {
        in_db_span(
            self.system,
            "identity.profile",
            self.inner.profile(tenant_id, member_id),
        )
        .await
    }
    async fn save_profile(
        &self,
        member: &Member,
        profile: &Profile,
        expected: u64,
    ) -> Result<Saved> {
        let call = self.inner.save_profile(member, profile, expected);
        in_db_span(self.system, "identity.save_profile", call).await
    }
    async fn member_id_by_email(&self, tenant_id: &str, email: &str) -> Result<Option<String>> {
        let call = self.inner.member_id_by_email(tenant_id, email);
        in_db_span(self.system, "identity.member_by_email", call).await
    }
    async fn merge_members(
        &self,
        duplicate: &Member,
        profile: &Profile,
        expected: u64,
        record: &MergeRecord,
    ) -> Result<bool> {
        let call = self
            .inner
            .merge_members(duplicate, profile, expected, record);
        in_db_span(self.system, "identity.merge_members", call).await
    }
    async fn merge_record(&self, tenant_id: &str, member_id: &str) -> Result<Option<MergeRecord>> {
        let call = self.inner.merge_record(tenant_id, member_id);
        in_db_span(self.system, "identity.merge_record", call).await
    }
    async fn save_merge_record(
        &self,
        tenant_id: &str,
        member_id: &str,
        record: &MergeRecord,
    ) -> Result<()> {
        let call = self.inner.save_merge_record(tenant_id, member_id, record);
        in_db_span(self.system, "identity.save_merge_record", call).await
    }
    async fn erase_member(
        &self,
        member: &Member,
        profile: &Profile,
        expected: u64,
        erasure: &Erasure,
    ) -> Result<bool> {
        let call = self.inner.erase_member(member, profile, expected, erasure);
        in_db_span(self.system, "identity.erase_member", call).await
    }
    async fn merged_from(&self, tenant_id: &str, member_id: &str) -> Result<Vec<String>> {
        let call = self.inner.merged_from(tenant_id, member_id);
        in_db_span(self.system, "identity.merged_from", call).await
    }
    async fn erasure(&self, tenant_id: &str, member_id: &str) -> Result<Option<Erasure>> {
        let call = self.inner.erasure(tenant_id, member_id);
        in_db_span(self.system, "identity.erasure", call).await
    }
    async fn set_block(
        &self,
        member: &Member,
        profile: &Profile,
        expected: u64,
        block: Option<&MemberBlock>,
    ) -> Result<bool> {
        let call = self.inner.set_block(member, profile, expected, block);
        in_db_span(self.system, "identity.set_block", call).await
    }
    async fn member_block(&self, tenant_id: &str, member_id: &str) -> Result<Option<MemberBlock>> {
        let call = self.inner.member_block(tenant_id, member_id);
        in_db_span(self.system, "identity.member_block", call).await
    }
    async fn import_member(
        &self,
        member: &Member,
        profile: &Profile,
        cards: &[Card],
        row: &ImportRow,
    ) -> Result<Imported> {
        let call = self.inner.import_member(member, profile, cards, row);
        in_db_span(self.system, "identity.import_member", call).await
    }
    async fn import_row(
        &self,
        tenant_id: &str,
        import_id: &str,
        row_number: i64,
    ) -> Result<Option<ImportRow>> {
        let call = self.inner.import_row(tenant_id, import_id, row_number);
        in_db_span(self.system, "identity.import_row", call).await
    }
    async fn save_import_row(&self, row: &ImportRow) -> Result<()> {
        let call = self.inner.save_import_row(row);
        in_db_span(self.system, "identity.save_import_row", call).await
    }
    async fn insert_cards(&self, cards: &[Card]) -> Result<u64> {
        in_db_span(
            self.system,
            "identity.insert_cards",
            self.inner.insert_cards(cards),
        )
        .await
    }
    async fn update_card(&self, card: &Card, expected: &CardStatus) -> Result<bool> {
        let call = self.inner.update_card(card, expected);
        in_db_span(self.system, "identity.update_card", call).await
    }
    async fn replace_card(
        &self,
        old: &Card,
        old_expected: &CardStatus,
        new: &Card,
        new_expected: Option<&CardStatus>,
    ) -> Result<Replaced> {
        let call = self
            .inner
            .replace_card(old, old_expected, new, new_expected);
        in_db_span(self.system, "identity.replace_card", call).await
    }
    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }

    async fn scrub(&self) -> Result<bool> {
        in_db_span(self.system, "identity.scrub", self.inner.scrub()).await
    }

    async fn save_api_keys(&self, keys: &[ApiKey], expect_live: Option<&str>) -> Result<bool> {
        in_db_span(
            self.system,
            "identity.save_api_keys",
            self.inner.save_api_keys(keys, expect_live),
        )
        .await
    }
    async fn api_key(&self, key_id: &str) -> Result<Option<ApiKey>> {
        in_db_span(self.system, "identity.api_key", self.inner.api_key(key_id)).await
    }
    async fn api_keys(
        &self,
        tenant_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ApiKey>> {
        in_db_span(
            self.system,
            "identity.api_keys",
            self.inner.api_keys(tenant_id, after, limit),
        )
        .await
    }
}
