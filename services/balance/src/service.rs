//! The balance service's domain operations over its store.

use std::sync::Arc;

use loyalty_platform::clock::SharedClock;
use loyalty_platform::error::{MAX_ID_LEN, Result, Violations};
use loyalty_platform::types::check_tenant;

use crate::ledger::{self, BalanceView, Entry, Op, OpRecord};
use crate::store::BalanceStore;

/// Longest idempotency key.
pub const MAX_KEY_LEN: usize = 256;
/// Longest free-text reference on an entry.
pub const MAX_REFERENCE_LEN: usize = 256;
/// Largest page of ledger entries.
pub const MAX_PAGE_SIZE: usize = 1000;
const DEFAULT_PAGE_SIZE: usize = 100;

#[derive(Debug, Clone)]
pub struct Balance {
    store: Arc<dyn BalanceStore>,
    clock: SharedClock,
}

fn check_ids(v: &mut Violations, tenant_id: &str, member_id: &str) {
    check_tenant(v, tenant_id);
    v.text(member_id, "member_id", MAX_ID_LEN);
}

impl Balance {
    pub fn new(store: Arc<dyn BalanceStore>, clock: SharedClock) -> Self {
        Self { store, clock }
    }

    pub fn store(&self) -> &Arc<dyn BalanceStore> {
        &self.store
    }

    pub async fn balance(&self, tenant_id: &str, member_id: &str) -> Result<BalanceView> {
        let mut v = Violations::new();
        check_ids(&mut v, tenant_id, member_id);
        v.finish()?;
        let account = self.store.account(tenant_id, member_id).await?;
        Ok(account.view(self.clock.now_ms()))
    }

    /// Applies a mutating operation idempotently under `key`.
    pub async fn execute(
        &self,
        tenant_id: &str,
        member_id: &str,
        key: &str,
        op: Op,
    ) -> Result<OpRecord> {
        let mut v = Violations::new();
        check_ids(&mut v, tenant_id, member_id);
        v.text(key, "idempotency_key", MAX_KEY_LEN);
        let (reference, original) = match &op {
            Op::Accrue { reference, .. } | Op::Redeem { reference, .. } => (reference, None),
            Op::Reverse {
                reference,
                original_key,
                ..
            } => (reference, Some(original_key)),
        };
        v.optional_text(reference, "reference", MAX_REFERENCE_LEN);
        if let Some(original) = original {
            v.text(original, "original_idempotency_key", MAX_KEY_LEN);
        }
        v.finish()?;
        ledger::validate(&op)?;
        self.store
            .execute(tenant_id, member_id, key, op, self.clock.now_ms())
            .await
    }

    /// One page of the ledger, newest first. The page token is the sequence number to
    /// continue below.
    pub async fn entries(
        &self,
        tenant_id: &str,
        member_id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<Entry>, Option<i64>)> {
        let mut v = Violations::new();
        check_ids(&mut v, tenant_id, member_id);
        v.check(
            (0..=MAX_PAGE_SIZE as i32).contains(&page_size),
            "page_size",
            format!("must be between 0 and {MAX_PAGE_SIZE}"),
        );
        let before = if page_token.is_empty() {
            None
        } else {
            let parsed = page_token.parse::<i64>().ok().filter(|s| *s > 0);
            v.check(
                parsed.is_some(),
                "page_token",
                "is not a token this service issued",
            );
            parsed
        };
        v.finish()?;
        let size = if page_size == 0 {
            DEFAULT_PAGE_SIZE
        } else {
            page_size as usize
        };
        let entries = self
            .store
            .entries(tenant_id, member_id, before, size)
            .await?;
        let next = match entries.last() {
            Some(last) if entries.len() == size && last.seq > 1 => Some(last.seq),
            _ => None,
        };
        Ok((entries, next))
    }
}
