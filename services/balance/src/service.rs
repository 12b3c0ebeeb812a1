//! The balance service's domain operations over its store.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use loyalty_platform::clock::{Millis, SharedClock};
use loyalty_platform::error::{Error, MAX_ID_LEN, Result, Violations};
use loyalty_platform::types::check_tenant;

use crate::events::{LedgerEvent, LedgerEvents, NoLedgerEvents};
use crate::ledger::{self, Account, BalanceView, Entry, HoldState, Op, OpRecord, Reason};
use crate::store::{BalanceStore, EntryQuery, Page};

/// Longest idempotency key.
pub const MAX_KEY_LEN: usize = 256;
/// Longest free-text reference on an entry.
pub const MAX_REFERENCE_LEN: usize = 256;
/// Longest adjustment comment.
pub const MAX_COMMENT_LEN: usize = 1_000;
/// Largest page of ledger entries.
pub const MAX_PAGE_SIZE: usize = 1000;
const DEFAULT_PAGE_SIZE: usize = 100;
/// Most members of one bulk accrual.
pub const MAX_BULK_MEMBERS: usize = 10_000;
/// Members accrued at once by a bulk accrual.
const BULK_CONCURRENCY: usize = 64;

#[derive(Debug, Clone)]
pub struct Balance {
    store: Arc<dyn BalanceStore>,
    clock: SharedClock,
    directory: Option<Arc<dyn MemberDirectory>>,
    events: Arc<dyn LedgerEvents>,
    /// Events waiting to be published again.
    republishing: Arc<AtomicUsize>,
}

/// Most ledger events retried in the background at once.
pub const MAX_REPUBLISHING: usize = 10_000;

/// Which members exist: identity owns them. Bulk accrual skips ids it does not know.
#[async_trait::async_trait]
pub trait MemberDirectory: Send + Sync + std::fmt::Debug {
    async fn exists(&self, tenant_id: &str, member_id: &str) -> Result<bool>;
    /// Refuses (FAILED_PRECONDITION) a member identity has blocked or erased.
    async fn usable(&self, tenant_id: &str, member_id: &str) -> Result<()>;
}

/// What a bulk accrual did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BulkOutcome {
    pub accrued: i64,
    /// Members this batch had already accrued (a resumed or retried batch).
    pub already_done: i64,
    /// Members identity does not know; nothing was written for them.
    pub unknown: Vec<String>,
    /// Members whose accrual the ledger refused, with why (in member id order); nothing was
    /// written for them, the others went on.
    pub refused: Vec<(String, String)>,
}

fn check_ids(v: &mut Violations, tenant_id: &str, member_id: &str) {
    check_tenant(v, tenant_id);
    v.text(member_id, "member_id", MAX_ID_LEN);
}

/// A hold's public id: the member and the hold's idempotency key, so a confirmation
/// finds the member's state without another lookup.
pub fn hold_id(member_id: &str, hold_key: &str) -> String {
    format!("{}:{member_id}{hold_key}", member_id.len())
}

/// Splits a hold id into member and key.
pub fn parse_hold_id(hold_id: &str) -> Result<(&str, &str)> {
    let bad = || Error::invalid("hold_id", "is not a hold id this service issued");
    let (len, rest) = hold_id.split_once(':').ok_or_else(bad)?;
    let len: usize = len.parse().map_err(|_| bad())?;
    if len == 0 || len > MAX_ID_LEN || !rest.is_char_boundary(len.min(rest.len())) {
        return Err(bad());
    }
    let (member, key) = (rest.get(..len).ok_or_else(bad)?, &rest[len..]);
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(bad());
    }
    Ok((member, key))
}

/// Most merges followed from a merged member to the member holding its lots now.
const MAX_MERGE_HOPS: usize = 16;

/// A hold as the POS sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldView {
    pub hold_id: String,
    pub state: HoldState,
    pub expire_at: Option<Millis>,
    pub record: OpRecord,
}

/// A hold as it stands, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldInfo {
    pub member_id: String,
    /// What it reserved when placed.
    pub amount: i64,
    pub state: HoldState,
    pub expire_at: Option<Millis>,
}

impl Balance {
    pub fn new(store: Arc<dyn BalanceStore>, clock: SharedClock) -> Self {
        Self {
            store,
            clock,
            directory: None,
            events: Arc::new(NoLedgerEvents),
            republishing: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Publishes every ledger entry to `events`.
    pub fn with_events(mut self, events: Arc<dyn LedgerEvents>) -> Self {
        self.events = events;
        self
    }

    /// Publishes the entry a change appended, before its caller is answered. The entry is
    /// durable by then, so the change stands whatever happens here: a stream that refuses
    /// the event gets it again in the background (with back-off, up to
    /// [`MAX_REPUBLISHING`] at a time) instead of failing a change that was made.
    async fn publish(&self, tenant_id: &str, member_id: &str, entry: Option<&Entry>) -> Result<()> {
        let Some(entry) = entry else { return Ok(()) };
        let event = LedgerEvent {
            tenant_id: tenant_id.to_string(),
            member_id: member_id.to_string(),
            entry: entry.clone(),
        };
        let Err(err) = self.events.appended(event.clone()).await else {
            return Ok(());
        };
        let waiting = self.republishing.clone();
        if waiting.fetch_add(1, Ordering::Relaxed) >= MAX_REPUBLISHING {
            waiting.fetch_sub(1, Ordering::Relaxed);
            metrics::counter!("loyalty_ledger_events_lost_total").increment(1);
            tracing::error!(error = %err, "a ledger entry's event was dropped: too many wait for the stream");
            return Ok(());
        }
        tracing::warn!(error = %err, "publishing a ledger entry failed; retrying in the background");
        metrics::counter!("loyalty_ledger_events_retried_total").increment(1);
        let events = self.events.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            while events.appended(event.clone()).await.is_err() {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            waiting.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(())
    }

    /// Refuses a member identity has blocked or erased, when identity is within reach.
    /// Balance's adapter asks this for the accruals, redemptions and holds of tills, apps
    /// and the back office; our own services checked the member with identity already.
    /// A retry of an operation (same key) that went through before the block answers as
    /// it did then.
    pub async fn check_member(&self, tenant_id: &str, member_id: &str, key: &str) -> Result<()> {
        let Some(directory) = &self.directory else {
            return Ok(());
        };
        match directory.usable(tenant_id, member_id).await {
            Err(refused @ Error::FailedPrecondition(_)) => {
                let done_before = !key.is_empty()
                    && self
                        .store
                        .record(tenant_id, member_id, key)
                        .await?
                        .is_some();
                if done_before { Ok(()) } else { Err(refused) }
            }
            other => other,
        }
    }

    /// Checks bulk accruals' members against `directory`.
    pub fn with_directory(mut self, directory: Arc<dyn MemberDirectory>) -> Self {
        self.directory = Some(directory);
        self
    }

    pub fn store(&self) -> &Arc<dyn BalanceStore> {
        &self.store
    }

    pub fn now(&self) -> Millis {
        self.clock.now_ms()
    }

    pub async fn balance(&self, tenant_id: &str, member_id: &str) -> Result<BalanceView> {
        let mut v = Violations::new();
        check_ids(&mut v, tenant_id, member_id);
        v.finish()?;
        let account = self.store.account(tenant_id, member_id).await?;
        Ok(account.view(self.clock.now_ms()))
    }

    pub async fn account(&self, tenant_id: &str, member_id: &str) -> Result<Account> {
        self.store.account(tenant_id, member_id).await
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
        check_op(&mut v, &op);
        v.finish()?;
        ledger::validate(&op)?;
        // A merged member's points are with its survivor: accruals, redemptions and
        // reversals go there (a receipt resolved just before the merge, a refund after it),
        // and so do the points of a member merged into it that left their source while it
        // was being merged away itself. The store refuses them on the merged member (after
        // replaying one it recorded), so only that refusal costs the look at where the
        // member went.
        let follows = matches!(
            op,
            Op::Accrue { .. } | Op::Redeem { .. } | Op::Reverse { .. } | Op::TransferIn { .. }
        )
        .then(|| op.clone());
        let record = match self
            .store
            .execute(tenant_id, member_id, key, op, self.clock.now_ms())
            .await
        {
            Err(Error::FailedPrecondition(why)) if why.starts_with(ledger::MERGED) => {
                let into = self.store.account(tenant_id, member_id).await?.merged_into;
                return match (follows, into) {
                    (Some(op), Some(into)) => {
                        Box::pin(self.follow_merge(tenant_id, member_id, into, key, op)).await
                    }
                    _ => Err(Error::FailedPrecondition(why)),
                };
            }
            other => other?,
        }
        .ok_or_else(|| Error::internal(anyhow::anyhow!("a keyed operation kept no record")))?;
        self.publish(tenant_id, member_id, record.reply.entry.as_ref())
            .await?;
        Ok(record)
    }

    /// Runs an accrual, redemption or reversal of a member merged into `into` on the member
    /// that holds its lots now (a receipt resolved just before the merge, a refund of one
    /// the duplicate made). A reversal of the merged member's own operation first has the
    /// survivor take over the original's record under the same key ([`Op::Adopt`]). An
    /// operation the member recorded before its merge answers as it did then.
    async fn follow_merge(
        &self,
        tenant_id: &str,
        member_id: &str,
        into: String,
        key: &str,
        op: Op,
    ) -> Result<OpRecord> {
        let original_key = match &op {
            Op::Reverse { original_key, .. } => Some(original_key.clone()),
            _ => None,
        };
        // Walk the merges one member at a time; each merged member is frozen, so what it
        // holds is final. An operation one of them recorded answers as it did then, and the
        // original of a reversal is the latest copy along the way (with the reversals made
        // where it was).
        let mut original: Option<(String, OpRecord)> = None;
        let (mut member, mut next) = (member_id.to_string(), into);
        for _ in 0..MAX_MERGE_HOPS {
            if let Some(done) = self.store.record(tenant_id, &member, key).await? {
                if done.fingerprint != op.fingerprint() {
                    return Err(Error::AlreadyExists(format!(
                        "idempotency key {key} was already used for a different operation"
                    )));
                }
                return Ok(done);
            }
            if let Some(k) = &original_key
                && let Some(r) = self.store.record(tenant_id, &member, k).await?
            {
                original = Some((member.clone(), r));
            }
            self.merge_landed(tenant_id, &member, &next).await?;
            member = next;
            match self.store.account(tenant_id, &member).await?.merged_into {
                Some(after) => next = after,
                None => break,
            }
        }
        let survivor = member;
        if let (Some(original_key), Some((from, record))) = (&original_key, original) {
            // The survivor takes the original over under its key, unless it did already;
            // a record of its own under that key is not the duplicate's to reverse.
            let adopt = Op::Adopt {
                from_member: from.clone(),
                record: Box::new(record),
            };
            match self
                .store
                .record(tenant_id, &survivor, original_key)
                .await?
            {
                Some(r) if r.fingerprint == adopt.fingerprint() => {}
                Some(_) => {
                    return Err(Error::FailedPrecondition(format!(
                        "member {survivor}, which {from} was merged into, used idempotency key {original_key} for an operation of its own; reverse it with an adjustment instead"
                    )));
                }
                // Concurrent takeovers of one original are the same operation: one applies,
                // the other replays it.
                None => {
                    Box::pin(self.execute(tenant_id, &survivor, original_key, adopt)).await?;
                }
            }
        }
        Box::pin(self.execute(tenant_id, &survivor, key, op)).await
    }

    /// Refuses, for now, to act for `from` on `into` while `from`'s points left it but did
    /// not reach `into` yet (a merge whose second step is still to be retried).
    async fn merge_landed(&self, tenant_id: &str, from: &str, into: &str) -> Result<()> {
        let moves = EntryQuery {
            limit: 100,
            reasons: vec![Reason::MergeTransfer],
            ..EntryQuery::default()
        };
        let out = self.store.entries(tenant_id, from, &moves).await?;
        if out.entries.iter().all(|e| e.amount >= 0) {
            return Ok(());
        }
        let mut page = self.store.entries(tenant_id, into, &moves).await?;
        loop {
            if page
                .entries
                .iter()
                .any(|e| e.amount > 0 && e.reference == from)
            {
                return Ok(());
            }
            match page.next_before {
                Some(before) => {
                    let q = EntryQuery {
                        before_seq: Some(before),
                        ..moves.clone()
                    };
                    page = self.store.entries(tenant_id, into, &q).await?;
                }
                None => {
                    return Err(Error::Unavailable(format!(
                        "the merge of member {from} into {into} is not finished; retry"
                    )));
                }
            }
        }
    }

    /// Places a hold; returns its public id with the record.
    pub async fn hold(
        &self,
        tenant_id: &str,
        member_id: &str,
        key: &str,
        op: Op,
    ) -> Result<HoldView> {
        let record = self.execute(tenant_id, member_id, key, op).await?;
        Ok(HoldView {
            hold_id: hold_id(member_id, key),
            state: record.reply.hold.unwrap_or(HoldState::Open),
            expire_at: record.hold_expire_at,
            record,
        })
    }

    /// Confirms (`Op::Confirm`) or cancels (`Op::Cancel`) the hold `hold_id`; returns the
    /// member and the record.
    pub async fn resolve_hold(
        &self,
        tenant_id: &str,
        hold_id: &str,
        key: &str,
        confirm: Option<i64>,
    ) -> Result<(String, OpRecord)> {
        let (member, hold_key) = parse_hold_id(hold_id)?;
        let op = match confirm {
            Some(amount) => Op::Confirm {
                hold_key: hold_key.to_string(),
                amount,
            },
            None => Op::Cancel {
                hold_key: hold_key.to_string(),
            },
        };
        let record = self.execute(tenant_id, member, key, op).await?;
        Ok((member.to_string(), record))
    }

    /// The hold `hold_id` as it stands now.
    pub async fn get_hold(&self, tenant_id: &str, hold_id: &str) -> Result<HoldInfo> {
        let (member, key) = parse_hold_id(hold_id)?;
        let mut v = Violations::new();
        check_ids(&mut v, tenant_id, member);
        v.finish()?;
        let not_found = || Error::NotFound(format!("hold {hold_id} not found"));
        let record = self
            .store
            .record(tenant_id, member, key)
            .await?
            .filter(|r| r.kind == ledger::Kind::Hold)
            .ok_or_else(not_found)?;
        let account = self.store.account(tenant_id, member).await?;
        Ok(HoldInfo {
            member_id: member.to_string(),
            amount: record.amount,
            state: ledger::hold_state(&record, key, &account, self.clock.now_ms()),
            expire_at: record.hold_expire_at,
        })
    }

    /// Moves every point of `from` to `to` (a member merge) and closes `from`. Each side is
    /// its own idempotent operation, so a retry after a failure between them completes the
    /// move exactly once. Returns the amount moved and the survivor's balance.
    pub async fn transfer(
        &self,
        tenant_id: &str,
        from: &str,
        to: &str,
        key: &str,
    ) -> Result<(i64, BalanceView)> {
        let mut v = Violations::new();
        check_ids(&mut v, tenant_id, from);
        v.text(to, "to_member_id", MAX_ID_LEN);
        v.check(
            from != to,
            "to_member_id",
            "must differ from from_member_id",
        );
        v.text(key, "idempotency_key", MAX_KEY_LEN - 4);
        v.finish()?;
        // Refuse up front what the receiving side would refuse after the source is closed.
        let source = self.store.account(tenant_id, from).await?;
        if source.merged_into.is_none() {
            let target = self.store.account(tenant_id, to).await?;
            if let Some(into) = &target.merged_into {
                return Err(Error::FailedPrecondition(format!(
                    "member {to} was merged into {into}; transfer to that member instead"
                )));
            }
            if source.lots.len() + target.lots.len() > ledger::MAX_LOTS {
                return Err(Error::FailedPrecondition(format!(
                    "member {to} would have more than {} lots",
                    ledger::MAX_LOTS
                )));
            }
        }
        let out = Op::TransferOut {
            to_member: to.to_string(),
        };
        let out = self
            .execute(tenant_id, from, &format!("{key}:out"), out)
            .await?;
        let into = Op::TransferIn {
            from_member: from.to_string(),
            lots: out.reply.lots.clone(),
        };
        let into = self
            .execute(tenant_id, to, &format!("{key}:in"), into)
            .await?;
        Ok((out.reply.moved, into.reply.balance))
    }

    /// Accrues `op` to every member in `members` under the same key (keys are scoped to
    /// the member, so each member gets it at most once, and a retried or resumed batch
    /// skips those done). Members identity does not know are skipped and reported.
    pub async fn bulk_accrue(
        &self,
        tenant_id: &str,
        batch_id: &str,
        members: &[String],
        op: Op,
    ) -> Result<BulkOutcome> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        v.text(batch_id, "batch_id", MAX_KEY_LEN - 5);
        v.check(
            !members.is_empty() && members.len() <= MAX_BULK_MEMBERS,
            "member_ids",
            format!("must hold 1 to {MAX_BULK_MEMBERS} members"),
        );
        for (i, m) in members.iter().enumerate() {
            v.text(m, format!("member_ids[{i}]"), MAX_ID_LEN);
        }
        if !matches!(op, Op::Accrue { .. }) {
            v.add("operation", "bulk operations accrue");
        }
        check_op(&mut v, &op);
        v.finish()?;
        ledger::validate(&op)?;
        let key = format!("bulk:{batch_id}");
        let mut unique: Vec<&String> = members.iter().collect();
        unique.sort();
        unique.dedup();
        let mut outcome = BulkOutcome::default();
        for chunk in unique.chunks(BULK_CONCURRENCY) {
            let mut tasks = tokio::task::JoinSet::new();
            for member in chunk {
                let (this, member, key, op) =
                    (self.clone(), (*member).clone(), key.clone(), op.clone());
                let tenant = tenant_id.to_string();
                tasks.spawn(async move {
                    if let Some(directory) = &this.directory
                        && !directory.exists(&tenant, &member).await?
                    {
                        return Ok::<_, Error>((member, None));
                    }
                    let before = this.store.record(&tenant, &member, &key).await?;
                    let done = match this.check_member(&tenant, &member, &key).await {
                        Ok(()) => this.execute(&tenant, &member, &key, op).await.map(drop),
                        refused => refused,
                    };
                    match done {
                        Ok(()) => Ok((member, Some(Ok(before.is_some())))),
                        // About this member only (blocked, or a ledger limit reached): the
                        // batch goes on without it.
                        Err(Error::FailedPrecondition(why)) => Ok((member, Some(Err(why)))),
                        Err(other) => Err(other),
                    }
                });
            }
            while let Some(joined) = tasks.join_next().await {
                match joined.map_err(Error::internal)?? {
                    (_, Some(Ok(true))) => outcome.already_done += 1,
                    (_, Some(Ok(false))) => outcome.accrued += 1,
                    (member, Some(Err(why))) => outcome.refused.push((member, why)),
                    (member, None) => outcome.unknown.push(member),
                }
            }
        }
        outcome.unknown.sort();
        outcome.refused.sort();
        Ok(outcome)
    }

    /// Expires what is due for up to `limit` members; returns how many were handled.
    /// Safe to run on several replicas at once: each member's expiry is one atomic,
    /// idempotent operation.
    pub async fn expire_due(&self, limit: usize) -> Result<usize> {
        let now = self.clock.now_ms();
        let due = self.store.due(now, limit).await?;
        let mut changed = 0;
        for d in due {
            let done = match self
                .store
                .execute(&d.tenant, &d.member, "", Op::Expire, now)
                .await
            {
                Ok(did) => {
                    let entry = match did.and_then(|r| r.reply.entry) {
                        Some(entry) => {
                            // Counted once: only the change that reached the ledger answers.
                            metrics::counter!("loyalty_points_expired_total")
                                .increment(entry.amount.unsigned_abs());
                            Some(entry)
                        }
                        // Nothing left to expire: maybe a run that crashed before marking
                        // this due expired it; its entry is published again.
                        None => self.latest_expiry(&d).await?,
                    };
                    match self.publish(&d.tenant, &d.member, entry.as_ref()).await {
                        Ok(()) => self.store.done_due(&d).await,
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            match done {
                Ok(()) => changed += 1,
                Err(e) => tracing::warn!(
                    tenant = %d.tenant,
                    member = %d.member,
                    error = %e,
                    "expiring points failed"
                ),
            }
        }
        Ok(changed)
    }

    /// The member's newest expiry made since `due` fell due, if any.
    async fn latest_expiry(&self, due: &crate::store::Due) -> Result<Option<Entry>> {
        let query = EntryQuery {
            limit: 1,
            reasons: vec![Reason::Expiry],
            from: Some(due.at),
            ..Default::default()
        };
        let page = self.store.entries(&due.tenant, &due.member, &query).await?;
        Ok(page.entries.into_iter().next())
    }

    /// One page of the ledger, newest first. The page token is the sequence number to
    /// continue below.
    pub async fn entries(
        &self,
        tenant_id: &str,
        member_id: &str,
        page_size: i32,
        page_token: &str,
        reasons: Vec<Reason>,
        period: (Option<Millis>, Option<Millis>),
    ) -> Result<Page> {
        let mut v = Violations::new();
        check_ids(&mut v, tenant_id, member_id);
        v.check(
            (0..=MAX_PAGE_SIZE as i32).contains(&page_size),
            "page_size",
            format!("must be between 0 and {MAX_PAGE_SIZE}"),
        );
        if let (Some(from), Some(until)) = period {
            v.check(until > from, "period.end_time", "must be after start_time");
        }
        let before_seq = if page_token.is_empty() {
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
        let limit = if page_size == 0 {
            DEFAULT_PAGE_SIZE
        } else {
            page_size as usize
        };
        let query = EntryQuery {
            before_seq,
            limit,
            reasons,
            from: period.0,
            until: period.1,
        };
        self.store.entries(tenant_id, member_id, &query).await
    }
}

fn check_op(v: &mut Violations, op: &Op) {
    match op {
        Op::Accrue { reference, .. }
        | Op::Redeem { reference, .. }
        | Op::Hold { reference, .. } => v.optional_text(reference, "reference", MAX_REFERENCE_LEN),
        Op::Reverse {
            reference,
            original_key,
            ..
        } => {
            v.optional_text(reference, "reference", MAX_REFERENCE_LEN);
            v.text(original_key, "original_idempotency_key", MAX_KEY_LEN);
        }
        Op::Confirm { hold_key, .. } | Op::Cancel { hold_key } => {
            v.text(hold_key, "hold_id", MAX_KEY_LEN);
        }
        Op::Activate { accrual_key } => {
            if let Some(k) = accrual_key {
                v.text(k, "accrual_idempotency_key", MAX_KEY_LEN);
            }
        }
        Op::Adjust { actor, .. } => {
            v.text(&actor.id, "actor.id", MAX_ID_LEN);
            v.optional_text(&actor.comment, "actor.comment", MAX_COMMENT_LEN);
        }
        Op::TransferOut { to_member } => v.text(to_member, "to_member_id", MAX_ID_LEN),
        Op::TransferIn { from_member, .. } | Op::Adopt { from_member, .. } => {
            v.text(from_member, "from_member_id", MAX_ID_LEN)
        }
        Op::Expire => v.add("operation", "expiry runs only as the background process"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex;

    use super::*;

    /// Refuses the first `refuse` events, then keeps them.
    #[derive(Debug, Default)]
    struct Flaky {
        refuse: Mutex<usize>,
        kept: Mutex<Vec<LedgerEvent>>,
    }

    #[async_trait::async_trait]
    impl LedgerEvents for Flaky {
        async fn appended(&self, event: LedgerEvent) -> Result<()> {
            let mut refuse = self.refuse.lock().unwrap();
            if *refuse > 0 {
                *refuse -= 1;
                return Err(Error::Unavailable("the stream is restarting".into()));
            }
            self.kept.lock().unwrap().push(event);
            Ok(())
        }
    }

    /// Knows every member; "full" is blocked.
    #[derive(Debug)]
    struct OneBlocked;

    #[async_trait::async_trait]
    impl MemberDirectory for OneBlocked {
        async fn exists(&self, _: &str, _: &str) -> Result<bool> {
            Ok(true)
        }
        async fn usable(&self, _: &str, member_id: &str) -> Result<()> {
            match member_id {
                "full" => Err(Error::FailedPrecondition("member full is blocked".into())),
                _ => Ok(()),
            }
        }
    }

    #[tokio::test]
    async fn a_member_refused_does_not_stop_a_bulk_accrual() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BalanceStore> = Arc::new(
            crate::store::embedded::EmbeddedBalanceStore::open(&dir.path().join("b.redb")).unwrap(),
        );
        let accrue = || Op::Accrue {
            amount: 1,
            reason: Reason::Accrual,
            reference: "r".into(),
            activate_at: None,
            expire_at: None,
        };
        let balance = Balance::new(store, Arc::new(loyalty_platform::clock::SystemClock))
            .with_directory(Arc::new(OneBlocked));
        let members: Vec<String> = ["a", "full", "z"].map(String::from).to_vec();
        let outcome = balance
            .bulk_accrue("t", "b1", &members, accrue())
            .await
            .unwrap();
        assert_eq!(outcome.accrued, 2, "the others went on");
        assert_eq!(outcome.refused.len(), 1);
        assert_eq!(outcome.refused[0].0, "full");
        assert!(
            outcome.refused[0].1.contains("blocked"),
            "{:?}",
            outcome.refused
        );
        assert_eq!(balance.balance("t", "z").await.unwrap().active, 1);
        // A retry does the refused member again and the others not twice.
        let again = balance
            .bulk_accrue("t", "b1", &members, accrue())
            .await
            .unwrap();
        assert_eq!(
            (again.accrued, again.already_done, again.refused.len()),
            (0, 2, 1)
        );
    }

    #[tokio::test]
    async fn a_made_change_stands_when_its_event_must_wait() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::store::embedded::EmbeddedBalanceStore::open(&dir.path().join("b.redb")).unwrap();
        let events = Arc::new(Flaky {
            refuse: Mutex::new(2),
            kept: Mutex::default(),
        });
        let balance = Balance::new(
            Arc::new(store),
            Arc::new(loyalty_platform::clock::SystemClock),
        )
        .with_events(events.clone());
        let op = Op::Accrue {
            amount: 500,
            reason: Reason::Accrual,
            reference: "r1".into(),
            activate_at: None,
            expire_at: None,
        };
        let record = balance.execute("t", "m", "k1", op).await.unwrap();
        assert_eq!(
            record.reply.balance.active, 500,
            "the change was made and answered"
        );
        for _ in 0..100 {
            if !events.kept.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let kept = events.kept.lock().unwrap().clone();
        assert_eq!(kept.len(), 1, "published once the stream took it");
        assert_eq!((kept[0].entry.seq, kept[0].entry.amount), (1, 500));
    }

    /// A balance service on an embedded store in a fresh directory.
    fn embedded_balance() -> (tempfile::TempDir, Balance) {
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::store::embedded::EmbeddedBalanceStore::open(&dir.path().join("b.redb")).unwrap();
        let balance = Balance::new(
            Arc::new(store),
            Arc::new(loyalty_platform::clock::SystemClock),
        );
        (dir, balance)
    }

    fn accrue(amount: i64) -> Op {
        Op::Accrue {
            amount,
            reason: Reason::Accrual,
            reference: "r".into(),
            activate_at: None,
            expire_at: None,
        }
    }

    #[tokio::test]
    async fn points_moving_to_a_member_merged_away_meanwhile_land_on_its_survivor() {
        let (_dir, balance) = embedded_balance();
        balance.execute("t", "x", "k1", accrue(100)).await.unwrap();
        balance.execute("t", "y", "k2", accrue(50)).await.unwrap();
        // x -> y passed its checks and closed x just as y -> z ran to the end.
        let out = Op::TransferOut {
            to_member: "y".into(),
        };
        balance.execute("t", "x", "merge:x:out", out).await.unwrap();
        balance.transfer("t", "y", "z", "merge:y").await.unwrap();
        let (moved, at) = balance.transfer("t", "x", "y", "merge:x").await.unwrap();
        assert_eq!((moved, at.active), (100, 150), "x's points are with z");
        let again = balance.transfer("t", "x", "y", "merge:x").await.unwrap();
        assert_eq!(
            (again.0, again.1.active),
            (100, 150),
            "a retry moves nothing more"
        );
        assert_eq!(balance.balance("t", "z").await.unwrap().active, 150);
    }

    #[tokio::test]
    async fn a_merged_members_operations_land_on_its_survivor() {
        let (_dir, balance) = embedded_balance();
        let reverse = |original: &str, amount| Op::Reverse {
            original_key: original.into(),
            amount,
            reference: "refund".into(),
        };
        let active = |b: &Balance, m: &'static str| {
            let b = b.clone();
            async move { b.balance("t", m).await.unwrap().active }
        };
        balance
            .execute("t", "a", "before", accrue(300))
            .await
            .unwrap();
        let early = balance
            .execute("t", "a", "before:r0", reverse("before", 10))
            .await
            .unwrap();
        balance.execute("t", "b", "own", accrue(50)).await.unwrap();
        balance.transfer("t", "a", "b", "merge:a").await.unwrap();
        balance.transfer("t", "b", "c", "merge:b").await.unwrap();
        assert_eq!(active(&balance, "c").await, 340);

        // A receipt resolved to `a` just before the merges finishes on `c`, once.
        let late = balance.execute("t", "a", "late", accrue(20)).await.unwrap();
        assert_eq!(late.reply.balance.active, 360);
        let again = balance.execute("t", "a", "late", accrue(20)).await.unwrap();
        assert_eq!(again, late);
        let err = balance
            .execute("t", "a", "late", accrue(21))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
        // Refunds: of `a`'s own accrual (taken over by `c`), and of the late one.
        let r = balance
            .execute("t", "a", "before:r1", reverse("before", 100))
            .await
            .unwrap();
        assert_eq!(r.reply.balance.active, 260);
        let r = balance
            .execute("t", "a", "before:r2", reverse("before", 250))
            .await
            .unwrap_err();
        assert!(matches!(r, Error::FailedPrecondition(_)), "190 left: {r}");
        balance
            .execute("t", "a", "late:r1", reverse("late", 20))
            .await
            .unwrap();
        assert_eq!(active(&balance, "c").await, 240);
        // Retries answer as they did and take nothing more: of a refund after the merges,
        // and of one `a` recorded before them.
        let replay = balance
            .execute("t", "a", "before:r1", reverse("before", 100))
            .await
            .unwrap();
        assert_eq!(replay.reply.balance.active, 260);
        let replay = balance
            .execute("t", "a", "before:r0", reverse("before", 10))
            .await
            .unwrap();
        assert_eq!(replay, early);
        assert_eq!(active(&balance, "c").await, 240);
        assert_eq!(active(&balance, "a").await, 0);
        // The reversal of an operation nobody made is refused.
        let missing = balance
            .execute("t", "a", "x", reverse("nothing", 1))
            .await
            .unwrap_err();
        assert!(matches!(missing, Error::NotFound(_)), "{missing}");

        // A refund between two merges of a chain, retried after the second: it answers as
        // it did, and what is left to reverse carries along the chain.
        balance.execute("t", "x", "buy", accrue(100)).await.unwrap();
        balance.transfer("t", "x", "y", "merge:x").await.unwrap();
        let first = balance
            .execute("t", "x", "buy:r1", reverse("buy", 60))
            .await
            .unwrap();
        balance.transfer("t", "y", "z", "merge:y").await.unwrap();
        let again = balance
            .execute("t", "x", "buy:r1", reverse("buy", 60))
            .await
            .unwrap();
        assert_eq!(again, first);
        assert_eq!(active(&balance, "z").await, 40);
        let over = balance
            .execute("t", "x", "buy:r2", reverse("buy", 41))
            .await
            .unwrap_err();
        assert!(
            matches!(over, Error::FailedPrecondition(_)),
            "40 left: {over}"
        );
        balance
            .execute("t", "x", "buy:r2", reverse("buy", 40))
            .await
            .unwrap();
        assert_eq!(active(&balance, "z").await, 0);

        // The survivor's own operation under the same key is not the duplicate's.
        balance
            .execute("t", "p", "bulk:1", accrue(10))
            .await
            .unwrap();
        balance
            .execute("t", "q", "bulk:1", accrue(10))
            .await
            .unwrap();
        balance.transfer("t", "p", "q", "merge:p").await.unwrap();
        let mixed = balance
            .execute("t", "p", "bulk:1:r", reverse("bulk:1", 10))
            .await
            .unwrap_err();
        assert!(matches!(mixed, Error::FailedPrecondition(_)), "{mixed}");
        assert_eq!(active(&balance, "q").await, 20);

        // A merge whose second step has not run yet: the points are in neither place, so
        // the refund waits for it.
        balance.execute("t", "u", "buy", accrue(30)).await.unwrap();
        let out = Op::TransferOut {
            to_member: "v".into(),
        };
        let moved = balance.execute("t", "u", "merge:u:out", out).await.unwrap();
        let early = balance
            .execute("t", "u", "buy:r", reverse("buy", 30))
            .await
            .unwrap_err();
        assert!(matches!(early, Error::Unavailable(_)), "{early}");
        let into = Op::TransferIn {
            from_member: "u".into(),
            lots: moved.reply.lots,
        };
        balance.execute("t", "v", "merge:u:in", into).await.unwrap();
        balance
            .execute("t", "u", "buy:r", reverse("buy", 30))
            .await
            .unwrap();
        assert_eq!(active(&balance, "v").await, 0);
    }

    #[test]
    fn hold_ids_round_trip_and_refuse_forgeries() {
        let id = hold_id("m:1", "pos-7:hold");
        assert_eq!(parse_hold_id(&id).unwrap(), ("m:1", "pos-7:hold"));
        for bad in ["", "x", "3:ab", "0:abc", "99:abc", "2:ab", "a:bcd"] {
            assert!(parse_hold_id(bad).is_err(), "{bad}");
        }
    }
}
