//! Storage spans: wraps any [`BalanceStore`] or [`Ledger`] so each call runs in a span with
//! the database semantic-convention attributes (system and operation, never keys or values).
//! With tracing off a call costs one atomic load more.

use std::sync::Arc;

use loyalty_platform::clock::Millis;
use loyalty_platform::error::Result;
use loyalty_platform::telemetry::{db_span, in_db_span, record_storage_duration};
use tracing::Instrument;

use super::{BalanceStore, Due, EntryQuery, Ledger, Page, PendingCommit};
use crate::ledger::{Account, Change, Op, OpRecord};

/// A store or ledger whose calls are traced as `system` (`redis`, `scylladb`, `redb`).
#[derive(Debug)]
pub struct Traced<S: ?Sized> {
    system: &'static str,
    inner: Arc<S>,
}

impl<S: ?Sized> Traced<S> {
    pub fn new(system: &'static str, inner: Arc<S>) -> Self {
        Self { system, inner }
    }
}

#[async_trait::async_trait]
impl<S: BalanceStore + ?Sized> BalanceStore for Traced<S> {
    async fn execute(
        &self,
        tenant_id: &str,
        member_id: &str,
        key: &str,
        op: Op,
        now: Millis,
    ) -> Result<Option<OpRecord>> {
        let call = self.inner.execute(tenant_id, member_id, key, op, now);
        in_db_span(self.system, "balance.execute", call).await
    }
    async fn account(&self, tenant_id: &str, member_id: &str) -> Result<Account> {
        in_db_span(
            self.system,
            "balance.account",
            self.inner.account(tenant_id, member_id),
        )
        .await
    }
    async fn record(
        &self,
        tenant_id: &str,
        member_id: &str,
        key: &str,
    ) -> Result<Option<OpRecord>> {
        let call = self.inner.record(tenant_id, member_id, key);
        in_db_span(self.system, "balance.record", call).await
    }
    async fn entries(&self, tenant_id: &str, member_id: &str, query: &EntryQuery) -> Result<Page> {
        let call = self.inner.entries(tenant_id, member_id, query);
        in_db_span(self.system, "balance.entries", call).await
    }
    async fn members(
        &self,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<(String, String)>> {
        let call = BalanceStore::members(&*self.inner, after, limit);
        in_db_span(self.system, "balance.members", call).await
    }
    async fn due(&self, now: Millis, limit: usize) -> Result<Vec<Due>> {
        in_db_span(self.system, "balance.due", self.inner.due(now, limit)).await
    }
    async fn done_due(&self, due: &Due) -> Result<()> {
        in_db_span(self.system, "balance.done_due", self.inner.done_due(due)).await
    }
    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }
}

#[async_trait::async_trait]
impl<L: Ledger + ?Sized> Ledger for Traced<L> {
    async fn submit(
        &self,
        tenant_id: &str,
        member_id: &str,
        expected: i64,
        change: &Change,
    ) -> Result<PendingCommit> {
        // The span and the duration cover the commit up to its answer, not just the
        // hand-over.
        let span = db_span(self.system, "ledger.commit");
        let start = std::time::Instant::now();
        let pending = self
            .inner
            .submit(tenant_id, member_id, expected, change)
            .instrument(span.clone())
            .await?;
        let system = self.system;
        Ok(Box::pin(
            async move {
                let answer = pending.await;
                record_storage_duration(system, "ledger.commit", start);
                answer
            }
            .instrument(span),
        ))
    }
    async fn commit(
        &self,
        tenant_id: &str,
        member_id: &str,
        expected: i64,
        change: &Change,
    ) -> Result<bool> {
        let call = self.inner.commit(tenant_id, member_id, expected, change);
        in_db_span(self.system, "ledger.commit", call).await
    }
    async fn version(&self, tenant_id: &str, member_id: &str) -> Result<i64> {
        in_db_span(
            self.system,
            "ledger.version",
            self.inner.version(tenant_id, member_id),
        )
        .await
    }
    async fn record(
        &self,
        tenant_id: &str,
        member_id: &str,
        key: &str,
    ) -> Result<Option<OpRecord>> {
        let call = Ledger::record(&*self.inner, tenant_id, member_id, key);
        in_db_span(self.system, "ledger.record", call).await
    }
    async fn load_account(&self, tenant_id: &str, member_id: &str) -> Result<Account> {
        let call = self.inner.load_account(tenant_id, member_id);
        in_db_span(self.system, "ledger.load_account", call).await
    }
    async fn members(
        &self,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<(String, String)>> {
        in_db_span(
            self.system,
            "ledger.members",
            self.inner.members(after, limit),
        )
        .await
    }
    async fn entries(&self, tenant_id: &str, member_id: &str, query: &EntryQuery) -> Result<Page> {
        let call = Ledger::entries(&*self.inner, tenant_id, member_id, query);
        in_db_span(self.system, "ledger.entries", call).await
    }
    async fn due(&self, now: Millis, limit: usize) -> Result<Vec<Due>> {
        in_db_span(
            self.system,
            "ledger.due",
            Ledger::due(&*self.inner, now, limit),
        )
        .await
    }
    async fn done_due(&self, due: &Due) -> Result<()> {
        in_db_span(
            self.system,
            "ledger.done_due",
            Ledger::done_due(&*self.inner, due),
        )
        .await
    }
    async fn ping(&self) -> Result<()> {
        Ledger::ping(&*self.inner).await
    }
}
