//! The points ledger as pure functions over one member's state. Stores load the state and
//! the records an operation refers to, call [`apply`] and write its [`Change`] atomically;
//! nothing here does I/O. The Redis backend runs the same rules as a Lua script
//! (`store/redis/apply.lua`); the differential test keeps the two in step.
//!
//! Invariants (checked by the property tests below):
//! - `account.total` equals the sum of the member's entry amounts, and the sum of lot
//!   remainders plus the points in open holds;
//! - no lot remainder is ever negative, so the spendable balance never is;
//! - a hold resolves at most once; expiry removes only unspent, unheld remainders;
//! - reversals never take back or give back more than the original operation moved.

use loyalty_platform::clock::Millis;
use loyalty_platform::error::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Largest amount of one operation, in point minor units.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000;
/// Largest balance or lifetime sum of one member. Far below 2^53, so every figure is exact
/// in the Redis script's numbers too.
pub const MAX_BALANCE: i64 = 1_000_000_000_000_000;
/// Latest time the ledger accepts (9999-12-31T23:59:59.999Z); earlier than 2^53 ms.
pub const MAX_TIME: Millis = 253_402_300_799_999;
/// Most lots one member may hold; an accrual beyond it is refused.
pub const MAX_LOTS: usize = 10_000;
/// The start of the refusal of a reversal that must wait for the member's open holds.
pub const HELD_BACK: &str = "the points to take back are held";

/// Most open holds one member may have.
pub const MAX_OPEN_HOLDS: usize = 100;
/// Longest a hold may live.
pub const MAX_HOLD_TIMEOUT_MS: i64 = 24 * 3_600_000;
/// Hold lifetime when the caller gives none.
pub const DEFAULT_HOLD_TIMEOUT_MS: i64 = 15 * 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reason {
    Accrual,
    Redemption,
    Expiry,
    ManualAdjustment,
    RefundReversal,
    RedemptionReversal,
    ReferralBonus,
    SurveyBonus,
    RegistrationBonus,
    MergeTransfer,
    OpeningBalance,
    CampaignBonus,
}

/// Points from one accrual (or one give-back), spendable between its times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lot {
    /// Idempotency key of the operation that created it.
    pub source: String,
    pub remaining: i64,
    pub activate_at: Millis,
    /// `None`: never expires.
    #[serde(default)]
    pub expire_at: Option<Millis>,
}

impl Lot {
    fn active_at(&self, now: Millis) -> bool {
        self.activate_at <= now && self.expire_at.is_none_or(|e| now < e)
    }
}

/// Points reserved by an open hold, remembered by the expiry they had.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// Idempotency key of the `Hold` operation.
    pub key: String,
    pub amount: i64,
    pub parts: Vec<Part>,
    pub expire_at: Millis,
}

/// One member's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Bumped by every change of state, entries or not; durable writes are conditional on it.
    pub version: i64,
    /// Sequence number of the newest entry.
    pub seq: i64,
    /// Sum of all entry amounts: lot remainders plus open holds.
    pub total: i64,
    pub lots: Vec<Lot>,
    pub holds: Vec<Hold>,
    pub lifetime_accrued: i64,
    pub lifetime_redeemed: i64,
    pub lifetime_expired: i64,
    /// Set once the member's points moved to another member; nothing changes it after.
    #[serde(default)]
    pub merged_into: Option<String>,
    /// Identifies this state's lineage: the Redis backend chains it through every change
    /// (a digest of the previous stamp and the operation), and the durable ledger accepts
    /// a change only on top of the stamp it was computed from.
    #[serde(default)]
    pub stamp: String,
}

/// Who made a manual change, and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub id: String,
    pub comment: String,
}

/// A ledger entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: i64,
    pub reason: Reason,
    pub amount: i64,
    pub balance_after: i64,
    pub key: String,
    pub reference: String,
    pub created_at: Millis,
    #[serde(default)]
    pub activate_at: Option<Millis>,
    #[serde(default)]
    pub expire_at: Option<Millis>,
    #[serde(default)]
    pub actor: Option<Actor>,
}

/// What a caller sees of a balance at a moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceView {
    pub active: i64,
    pub pending: i64,
    pub held: i64,
    #[serde(default)]
    pub next_expiry: Option<(i64, Millis)>,
    pub lifetime_accrued: i64,
    pub lifetime_redeemed: i64,
    pub lifetime_expired: i64,
    pub seq: i64,
}

impl Account {
    /// The balance at `now`, counting holds past their timeout as released.
    pub fn view(&self, now: Millis) -> BalanceView {
        let mut released = self.clone();
        released.release_expired_holds(now);
        released.view_as_is(now)
    }

    fn view_as_is(&self, now: Millis) -> BalanceView {
        let mut v = BalanceView {
            lifetime_accrued: self.lifetime_accrued,
            lifetime_redeemed: self.lifetime_redeemed,
            lifetime_expired: self.lifetime_expired,
            seq: self.seq,
            held: self.holds.iter().map(|h| h.amount).sum(),
            ..Default::default()
        };
        for lot in &self.lots {
            if lot.active_at(now) {
                v.active += lot.remaining;
                if let Some(at) = lot.expire_at {
                    v.next_expiry = match v.next_expiry {
                        Some((_, t)) if at < t => Some((lot.remaining, at)),
                        Some((n, t)) if at == t => Some((n + lot.remaining, t)),
                        None => Some((lot.remaining, at)),
                        keep => keep,
                    };
                }
            } else if lot.activate_at > now {
                v.pending += lot.remaining;
            }
        }
        v
    }

    /// When the expiry process next has something to do for this member: the earliest
    /// lot expiry or hold timeout.
    pub fn next_due(&self) -> Option<Millis> {
        let lots = self.lots.iter().filter_map(|l| l.expire_at);
        let holds = self.holds.iter().map(|h| h.expire_at);
        lots.chain(holds).min()
    }

    /// Returns the points of holds past their timeout to the balance. Returns whether any
    /// hold was released.
    fn release_expired_holds(&mut self, now: Millis) -> bool {
        let (expired, open): (Vec<Hold>, Vec<Hold>) = std::mem::take(&mut self.holds)
            .into_iter()
            .partition(|h| h.expire_at <= now);
        self.holds = open;
        for hold in &expired {
            return_parts(self, &hold.key, &hold.parts, hold.expire_at);
        }
        !expired.is_empty()
    }
}

/// A mutating operation, as requested. Its [`Op::fingerprint`] tells a retry from a reuse
/// of the key for something else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Accrue {
        amount: i64,
        reason: Reason,
        reference: String,
        activate_at: Option<Millis>,
        expire_at: Option<Millis>,
    },
    Redeem {
        amount: i64,
        reference: String,
        /// Take what is active, up to `amount` (possibly nothing), instead of refusing when
        /// the balance is short. Checkout uses it so a commit never fails half-way.
        up_to_available: bool,
    },
    Reverse {
        original_key: String,
        amount: i64,
        reference: String,
    },
    /// Reserves active points for `timeout_ms` from the moment it is applied.
    Hold {
        amount: i64,
        reference: String,
        timeout_ms: i64,
    },
    /// Redeems `amount` of an open hold (0: all of it); the rest returns.
    Confirm {
        hold_key: String,
        amount: i64,
    },
    Cancel {
        hold_key: String,
    },
    /// Makes pending points active now: all of them, or one accrual's.
    Activate {
        accrual_key: Option<String>,
    },
    /// A signed manual change; a negative one never takes the active balance below zero.
    Adjust {
        amount: i64,
        actor: Actor,
        expire_at: Option<Millis>,
    },
    /// Expires due lots and releases timed-out holds. Keyless: it is naturally idempotent.
    Expire,
    /// Moves every lot to `to_member` and closes this member (a merge).
    TransferOut {
        to_member: String,
    },
    /// Receives the lots a `TransferOut` moved.
    TransferIn {
        from_member: String,
        lots: Vec<Lot>,
    },
    /// Takes over, under the same key, the record of an accrual or redemption of
    /// `from_member`, which was merged into this member with its lots, so the operation can
    /// be reversed here (a refund after a merge). Moves no points.
    Adopt {
        from_member: String,
        record: Box<OpRecord>,
    },
}

impl Op {
    /// A digest of the operation's payload; equal payloads give equal fingerprints.
    pub fn fingerprint(&self) -> String {
        let bytes = postcard::to_stdvec(self).unwrap_or_default();
        let digest = Sha256::digest(&bytes);
        digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
    }

    pub fn is_keyless(&self) -> bool {
        matches!(self, Op::Expire)
    }
}

/// Part of a redemption or hold taken from lots expiring at one time, remembered so a
/// give-back restores the same points.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    #[serde(default)]
    pub expire_at: Option<Millis>,
    pub amount: i64,
    pub returned: i64,
}

/// What an operation moved, for reversals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Added points (accrual, positive adjustment): a reversal takes them back.
    Credit,
    /// Took points (redemption, confirmed hold, negative adjustment): a reversal gives
    /// them back.
    Debit,
    /// Reserved points; its state says whether it is still open.
    Hold,
    /// Nothing to reverse.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldState {
    Open,
    Confirmed,
    Cancelled,
    /// Released by its timeout.
    Expired,
}

/// What an operation did, kept under its idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRecord {
    pub fingerprint: String,
    pub kind: Kind,
    /// Points moved (credited, debited or held).
    pub amount: i64,
    /// Points of `amount` reversed so far.
    pub reversed: i64,
    pub parts: Vec<Part>,
    /// For holds: `Open` until confirmed or cancelled. An open record whose hold is no
    /// longer in the account was released by its timeout.
    #[serde(default)]
    pub hold: Option<HoldState>,
    #[serde(default)]
    pub hold_expire_at: Option<Millis>,
    /// The reply the caller got; a retry gets it again.
    pub reply: Reply,
}

/// A reply to a mutating call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    #[serde(default)]
    pub entry: Option<Entry>,
    pub balance: BalanceView,
    /// Reversals: accrued points already spent that could not be taken back.
    pub unrecovered: i64,
    /// Activations: points made active. Transfers: points moved.
    pub moved: i64,
    /// Holds, confirmations and cancellations: the hold's state after the call.
    #[serde(default)]
    pub hold: Option<HoldState>,
    /// Transfers out: the lots moved, for the receiving side.
    pub lots: Vec<Lot>,
}

/// Everything one applied operation writes: the new state, the entries it appended and
/// the records it created or updated (the operation's own, and the one it refers to).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The idempotency key of the operation ('' for a keyless one): the ledger refuses a
    /// change whose own record it already holds.
    pub key: String,
    /// The stamp of the state this change was computed from.
    pub prev_stamp: String,
    /// The operation's time (the `now` it was applied at).
    pub at: Millis,
    pub account: Account,
    pub entries: Vec<Entry>,
    pub records: Vec<(String, OpRecord)>,
}

fn check_time(field: &str, at: Option<Millis>) -> Result<()> {
    match at {
        Some(t) if !(0..=MAX_TIME).contains(&t) => Err(Error::invalid(
            field,
            "must be between 1970-01-01 and 9999-12-31",
        )),
        _ => Ok(()),
    }
}

fn check_amount(field: &str, amount: i64) -> Result<()> {
    if amount <= 0 {
        return Err(Error::invalid(field, "must be positive"));
    }
    if amount > MAX_AMOUNT {
        return Err(Error::invalid(
            field,
            format!("must be at most {MAX_AMOUNT}"),
        ));
    }
    Ok(())
}

/// Validates an operation's own fields, before any state is read.
pub fn validate(op: &Op) -> Result<()> {
    match op {
        Op::Accrue {
            amount,
            activate_at,
            expire_at,
            ..
        } => {
            check_time("activate_time", *activate_at)?;
            check_time("expire_time", *expire_at)?;
            if let (Some(a), Some(e)) = (activate_at, expire_at)
                && e <= a
            {
                return Err(Error::invalid("expire_time", "must be after activate_time"));
            }
            check_amount("amount", *amount)
        }
        Op::Redeem { amount, .. } | Op::Reverse { amount, .. } => check_amount("amount", *amount),
        Op::Hold {
            amount, timeout_ms, ..
        } => {
            if !(1..=MAX_HOLD_TIMEOUT_MS).contains(timeout_ms) {
                return Err(Error::invalid(
                    "timeout_seconds",
                    format!("must be at most {}", MAX_HOLD_TIMEOUT_MS / 1000),
                ));
            }
            check_amount("amount", *amount)
        }
        Op::Confirm { amount, .. } => {
            if *amount != 0 {
                check_amount("amount", *amount)?;
            }
            Ok(())
        }
        Op::Adjust {
            amount,
            actor,
            expire_at,
        } => {
            check_time("expire_time", *expire_at)?;
            if actor.id.is_empty() {
                return Err(Error::invalid("actor.id", "is required"));
            }
            check_amount("amount", amount.abs())
        }
        Op::TransferIn { lots, .. } => {
            if lots.len() > MAX_LOTS {
                return Err(Error::invalid(
                    "lots",
                    format!("at most {MAX_LOTS} lots move at once"),
                ));
            }
            if lots
                .iter()
                .any(|l| l.remaining <= 0 || l.remaining > MAX_BALANCE)
            {
                return Err(Error::invalid("lots", "every lot must hold points"));
            }
            for lot in lots {
                check_time("lots.activate_at", Some(lot.activate_at))?;
                check_time("lots.expire_at", lot.expire_at)?;
            }
            Ok(())
        }
        Op::Adopt { record, .. } => {
            if !matches!(record.kind, Kind::Credit | Kind::Debit)
                || !(0..=MAX_BALANCE).contains(&record.amount)
                || !(0..=record.amount).contains(&record.reversed)
                || record.parts.len() > MAX_LOTS
            {
                return Err(Error::invalid(
                    "record",
                    "only an accrual's or a redemption's record can be taken over",
                ));
            }
            Ok(())
        }
        Op::Cancel { .. } | Op::Activate { .. } | Op::Expire | Op::TransferOut { .. } => Ok(()),
    }
}

/// The record `op` refers to, if any: the original of a reversal, the hold of a
/// confirmation or cancellation, the accrual of a targeted activation.
pub fn referenced_key(op: &Op) -> Option<&str> {
    match op {
        Op::Reverse { original_key, .. } => Some(original_key),
        Op::Confirm { hold_key, .. } | Op::Cancel { hold_key } => Some(hold_key),
        Op::Activate {
            accrual_key: Some(key),
        } => Some(key),
        _ => None,
    }
}

struct Ctx<'a> {
    account: &'a mut Account,
    key: &'a str,
    now: Millis,
    entries: Vec<Entry>,
}

impl Ctx<'_> {
    #[allow(clippy::too_many_arguments)]
    fn entry(
        &mut self,
        reason: Reason,
        delta: i64,
        reference: &str,
        activate_at: Option<Millis>,
        expire_at: Option<Millis>,
        actor: Option<Actor>,
    ) -> Option<Entry> {
        if delta == 0 {
            return None;
        }
        self.account.seq += 1;
        self.account.total += delta;
        let entry = Entry {
            seq: self.account.seq,
            reason,
            amount: delta,
            balance_after: self.account.total,
            key: self.key.to_string(),
            reference: reference.to_string(),
            created_at: self.now,
            activate_at,
            expire_at,
            actor,
        };
        self.entries.push(entry.clone());
        Some(entry)
    }
}

/// Applies `op`, under idempotency key `key` with fingerprint `fingerprint` (empty for a
/// keyless [`Op::Expire`]), to `account` at `now`. `referenced` is the stored record of
/// [`referenced_key`]. On `Err` the caller must write nothing; on `Ok` with no change
/// (`Change::account.version` unchanged, and no record) there is nothing to write either.
/// A keyless operation that changed something returns a record that is not kept.
/// How the refusal of a keyed operation on a merged member begins (the Lua script says the
/// same), followed by the member it was merged into.
pub const MERGED: &str = "the member was merged into ";

pub fn apply(
    account: &Account,
    key: &str,
    fingerprint: &str,
    op: &Op,
    referenced: Option<&OpRecord>,
    now: Millis,
) -> Result<(Change, Option<OpRecord>)> {
    validate(op)?;
    if let Some(into) = &account.merged_into
        && !op.is_keyless()
    {
        return Err(Error::FailedPrecondition(format!("{MERGED}{into}")));
    }
    let mut next = account.clone();
    let mut changed = next.release_expired_holds(now);
    let mut ctx = Ctx {
        account: &mut next,
        key,
        now,
        entries: Vec::new(),
    };
    let before = referenced;
    let mut referenced = referenced.cloned();
    let mut record = OpRecord {
        fingerprint: fingerprint.to_string(),
        kind: Kind::Other,
        amount: 0,
        reversed: 0,
        parts: Vec::new(),
        hold: None,
        hold_expire_at: None,
        reply: Reply::default(),
    };
    match op {
        Op::Accrue {
            amount,
            reason,
            reference,
            activate_at,
            expire_at,
        } => {
            if ctx.account.lots.len() >= MAX_LOTS {
                return Err(Error::FailedPrecondition(format!(
                    "the member already has {MAX_LOTS} lots"
                )));
            }
            // An expiry already past is accepted (a late retry of a checkout): the lot
            // never counts as active and the expiry process removes it.
            let activate = activate_at.unwrap_or(now);
            ctx.account.lots.push(Lot {
                source: key.to_string(),
                remaining: *amount,
                activate_at: activate,
                expire_at: *expire_at,
            });
            ctx.account.lifetime_accrued += amount;
            record.kind = Kind::Credit;
            record.amount = *amount;
            record.reply.entry = ctx.entry(
                *reason,
                *amount,
                reference,
                Some(activate),
                *expire_at,
                None,
            );
        }
        Op::Redeem {
            amount,
            reference,
            up_to_available,
        } => {
            let active = ctx.account.view_as_is(now).active;
            if *amount > active && !up_to_available {
                return Err(insufficient(active, *amount));
            }
            let take = (*amount).min(active);
            record.parts = take_earliest_expiry(ctx.account, take, now, None);
            ctx.account.lifetime_redeemed += take;
            record.kind = Kind::Debit;
            record.amount = take;
            record.reply.entry = ctx.entry(Reason::Redemption, -take, reference, None, None, None);
        }
        Op::Reverse {
            original_key,
            amount,
            reference,
        } => {
            let original = referenced
                .as_mut()
                .ok_or_else(|| not_found("operation", original_key))?;
            let left = original.amount - original.reversed;
            if matches!(original.kind, Kind::Credit | Kind::Debit) && *amount > left {
                return Err(Error::FailedPrecondition(format!(
                    "only {left} of operation {original_key} is left to reverse, {amount} requested"
                )));
            }
            match original.kind {
                Kind::Credit => {
                    let taken = take_back_accrual(ctx.account, original_key, *amount, now);
                    // Points an open hold took out of their lots come back if it is cancelled
                    // or times out: counting them unrecovered now would let the member keep
                    // them. The reversal waits for the holds instead.
                    let held: i64 = ctx.account.holds.iter().map(|h| h.amount).sum();
                    if taken < *amount && held > 0 {
                        return Err(Error::FailedPrecondition(format!(
                            "{HELD_BACK}: {} of the {amount} points to take back are in open holds; retry once they are confirmed, cancelled or timed out",
                            (amount - taken).min(held)
                        )));
                    }
                    record.reply.unrecovered = amount - taken;
                    original.reversed += amount;
                    ctx.account.lifetime_accrued -= taken.min(ctx.account.lifetime_accrued);
                    record.reply.entry =
                        ctx.entry(Reason::RefundReversal, -taken, reference, None, None, None);
                }
                Kind::Debit => {
                    give_back(ctx.account, original, key, *amount, now);
                    original.reversed += amount;
                    ctx.account.lifetime_redeemed -= (*amount).min(ctx.account.lifetime_redeemed);
                    record.reply.entry = ctx.entry(
                        Reason::RedemptionReversal,
                        *amount,
                        reference,
                        None,
                        None,
                        None,
                    );
                }
                Kind::Hold | Kind::Other => {
                    return Err(Error::FailedPrecondition(format!(
                        "operation {original_key} moved no points that could be reversed"
                    )));
                }
            }
        }
        Op::Hold {
            amount,
            reference: _,
            timeout_ms,
        } => {
            if ctx.account.holds.len() >= MAX_OPEN_HOLDS {
                return Err(Error::FailedPrecondition(format!(
                    "the member already has {MAX_OPEN_HOLDS} open holds"
                )));
            }
            let active = ctx.account.view_as_is(now).active;
            if *amount > active {
                return Err(insufficient(active, *amount));
            }
            let parts = take_earliest_expiry(ctx.account, *amount, now, None);
            let expire_at = now + timeout_ms;
            ctx.account.holds.push(Hold {
                key: key.to_string(),
                amount: *amount,
                parts: parts.clone(),
                expire_at,
            });
            changed = true;
            record.kind = Kind::Hold;
            record.amount = *amount;
            record.parts = parts;
            record.hold = Some(HoldState::Open);
            record.hold_expire_at = Some(expire_at);
            record.reply.hold = Some(HoldState::Open);
        }
        Op::Confirm { hold_key, amount } => {
            let original = open_hold_record(&mut referenced, hold_key)?;
            let Some(i) = ctx.account.holds.iter().position(|h| &h.key == hold_key) else {
                return Err(Error::FailedPrecondition(format!(
                    "hold {hold_key} expired and its points were released"
                )));
            };
            let hold = ctx.account.holds[i].clone();
            let confirm = if *amount == 0 { hold.amount } else { *amount };
            if confirm > hold.amount {
                return Err(Error::FailedPrecondition(format!(
                    "hold {hold_key} reserves {}, {confirm} requested",
                    hold.amount
                )));
            }
            ctx.account.holds.remove(i);
            // The hold's parts are earliest expiry first: confirm those, return the rest.
            let mut left = confirm;
            let mut confirmed = Vec::new();
            let mut rest = Vec::new();
            for part in &hold.parts {
                let take = left.min(part.amount);
                left -= take;
                if take > 0 {
                    confirmed.push(Part {
                        expire_at: part.expire_at,
                        amount: take,
                        returned: 0,
                    });
                }
                if part.amount > take {
                    rest.push(Part {
                        expire_at: part.expire_at,
                        amount: part.amount - take,
                        returned: 0,
                    });
                }
            }
            return_parts(ctx.account, hold_key, &rest, now);
            // The held points leave `total` only now.
            ctx.account.lifetime_redeemed += confirm;
            original.hold = Some(HoldState::Confirmed);
            record.kind = Kind::Debit;
            record.amount = confirm;
            record.parts = confirmed;
            record.reply.hold = Some(HoldState::Confirmed);
            record.reply.entry =
                ctx.entry(Reason::Redemption, -confirm, hold_key, None, None, None);
        }
        Op::Cancel { hold_key } => {
            let original = referenced
                .as_mut()
                .filter(|r| r.kind == Kind::Hold)
                .ok_or_else(|| not_found("hold", hold_key))?;
            match original.hold {
                Some(HoldState::Confirmed) => {
                    return Err(Error::FailedPrecondition(format!(
                        "hold {hold_key} is already confirmed"
                    )));
                }
                Some(HoldState::Cancelled) => record.reply.hold = Some(HoldState::Cancelled),
                _ => match ctx.account.holds.iter().position(|h| &h.key == hold_key) {
                    None => record.reply.hold = Some(HoldState::Expired),
                    Some(i) => {
                        let hold = ctx.account.holds.remove(i);
                        return_parts(ctx.account, hold_key, &hold.parts, now);
                        original.hold = Some(HoldState::Cancelled);
                        record.reply.hold = Some(HoldState::Cancelled);
                        changed = true;
                    }
                },
            }
        }
        Op::Activate { accrual_key } => {
            if let Some(k) = accrual_key
                && referenced.as_ref().is_none_or(|r| r.kind != Kind::Credit)
            {
                return Err(not_found("accrual", k));
            }
            let mut activated = 0;
            for lot in &mut ctx.account.lots {
                let pending = lot.activate_at > now && lot.expire_at.is_none_or(|e| now < e);
                if pending && accrual_key.as_ref().is_none_or(|k| &lot.source == k) {
                    lot.activate_at = now;
                    activated += lot.remaining;
                }
            }
            changed |= activated > 0;
            record.reply.moved = activated;
        }
        Op::Adjust {
            amount,
            actor,
            expire_at,
        } => {
            if *amount > 0 {
                if ctx.account.lots.len() >= MAX_LOTS {
                    return Err(Error::FailedPrecondition(format!(
                        "the member already has {MAX_LOTS} lots"
                    )));
                }
                ctx.account.lots.push(Lot {
                    source: key.to_string(),
                    remaining: *amount,
                    activate_at: now,
                    expire_at: *expire_at,
                });
                record.kind = Kind::Credit;
                record.amount = *amount;
            } else {
                let want = -amount;
                let active = ctx.account.view_as_is(now).active;
                if want > active {
                    return Err(insufficient(active, want));
                }
                record.parts = take_earliest_expiry(ctx.account, want, now, None);
                record.kind = Kind::Debit;
                record.amount = want;
            }
            record.reply.entry = ctx.entry(
                Reason::ManualAdjustment,
                *amount,
                &actor.comment,
                None,
                if *amount > 0 { *expire_at } else { None },
                Some(actor.clone()),
            );
        }
        Op::Expire => {
            let mut expired = 0;
            for lot in &mut ctx.account.lots {
                if lot.expire_at.is_some_and(|e| e <= now) {
                    expired += lot.remaining;
                    lot.remaining = 0;
                }
            }
            ctx.account.lifetime_expired += expired;
            record.reply.entry = ctx.entry(Reason::Expiry, -expired, "", None, None, None);
        }
        Op::TransferOut { to_member } => {
            if !ctx.account.holds.is_empty() {
                return Err(Error::FailedPrecondition(
                    "the member has open holds; confirm or cancel them first".into(),
                ));
            }
            let lots = std::mem::take(&mut ctx.account.lots);
            let moved: i64 = lots.iter().map(|l| l.remaining).sum();
            ctx.account.merged_into = Some(to_member.clone());
            changed = true;
            record.reply.moved = moved;
            record.reply.lots = lots;
            record.reply.entry =
                ctx.entry(Reason::MergeTransfer, -moved, to_member, None, None, None);
        }
        Op::Adopt {
            record: adopted, ..
        } => {
            record.kind = adopted.kind;
            record.amount = adopted.amount;
            record.reversed = adopted.reversed;
            record.parts = adopted.parts.clone();
        }
        Op::TransferIn { from_member, lots } => {
            if ctx.account.lots.len() + lots.len() > MAX_LOTS {
                return Err(Error::FailedPrecondition(format!(
                    "the member would have more than {MAX_LOTS} lots"
                )));
            }
            let moved: i64 = lots.iter().map(|l| l.remaining).sum();
            ctx.account.lots.extend(lots.iter().cloned());
            record.reply.moved = moved;
            record.reply.entry =
                ctx.entry(Reason::MergeTransfer, moved, from_member, None, None, None);
        }
    }
    let entries = std::mem::take(&mut ctx.entries);
    if next.total > MAX_BALANCE || next.lifetime_accrued > MAX_BALANCE {
        return Err(Error::FailedPrecondition(format!(
            "the member's balance would exceed {MAX_BALANCE}"
        )));
    }
    consolidate(&mut next, now);
    next.lots.retain(|l| l.remaining > 0);
    let keyed = !op.is_keyless();
    if !entries.is_empty() || changed || keyed {
        next.version += 1;
    }
    record.reply.balance = next.view_as_is(now);
    let mut records = Vec::new();
    if let (Some(k), Some(r)) = (referenced_key(op), referenced)
        && Some(&r) != before
    {
        records.push((k.to_string(), r));
    }
    // A keyless operation keeps no record, but its caller still learns what it did.
    let record = (keyed || next.version != account.version).then_some(record);
    if let (true, Some(r)) = (keyed, &record) {
        records.push((key.to_string(), r.clone()));
    }
    Ok((
        Change {
            key: if keyed {
                key.to_string()
            } else {
                String::new()
            },
            prev_stamp: account.stamp.clone(),
            at: now,
            account: next,
            entries,
            records,
        },
        record,
    ))
}

fn insufficient(active: i64, requested: i64) -> Error {
    Error::FailedPrecondition(format!(
        "insufficient points: {active} active, {requested} requested"
    ))
}

fn not_found(what: &str, key: &str) -> Error {
    Error::NotFound(format!("no {what} with idempotency key {key}"))
}

fn open_hold_record<'a>(
    referenced: &'a mut Option<OpRecord>,
    hold_key: &str,
) -> Result<&'a mut OpRecord> {
    let record = referenced
        .as_mut()
        .filter(|r| r.kind == Kind::Hold)
        .ok_or_else(|| not_found("hold", hold_key))?;
    match record.hold {
        Some(HoldState::Confirmed) => Err(Error::FailedPrecondition(format!(
            "hold {hold_key} is already confirmed"
        ))),
        Some(HoldState::Cancelled) => Err(Error::FailedPrecondition(format!(
            "hold {hold_key} is cancelled"
        ))),
        _ => Ok(record),
    }
}

/// The state a hold record shows at `now` given the account it belongs to.
pub fn hold_state(record: &OpRecord, hold_key: &str, account: &Account, now: Millis) -> HoldState {
    match record.hold {
        Some(HoldState::Open) | None => match account.holds.iter().find(|h| h.key == hold_key) {
            Some(h) if h.expire_at > now => HoldState::Open,
            _ => HoldState::Expired,
        },
        Some(state) => state,
    }
}

/// Consumes up to `amount` from active lots, earliest expiry first (never-expiring last),
/// skipping `skip`. Returns what was taken, grouped by expiry.
fn take_earliest_expiry(
    account: &mut Account,
    amount: i64,
    now: Millis,
    skip: Option<&str>,
) -> Vec<Part> {
    let mut order: Vec<usize> = (0..account.lots.len())
        .filter(|&i| {
            account.lots[i].active_at(now) && Some(account.lots[i].source.as_str()) != skip
        })
        .collect();
    order.sort_by_key(|&i| {
        (
            account.lots[i].expire_at.is_none(),
            account.lots[i].expire_at,
        )
    });
    let mut left = amount;
    let mut parts: Vec<Part> = Vec::new();
    for i in order {
        if left == 0 {
            break;
        }
        let lot = &mut account.lots[i];
        let take = left.min(lot.remaining);
        if take == 0 {
            continue;
        }
        lot.remaining -= take;
        left -= take;
        match parts.last_mut() {
            Some(p) if p.expire_at == lot.expire_at => p.amount += take,
            _ => parts.push(Part {
                expire_at: lot.expire_at,
                amount: take,
                returned: 0,
            }),
        }
    }
    parts
}

/// Takes back accrued points: first from the accrual's own lot (even while pending), then
/// from other active lots. Returns how much could be taken.
fn take_back_accrual(account: &mut Account, source: &str, amount: i64, now: Millis) -> i64 {
    let mut taken = 0;
    if let Some(lot) = account.lots.iter_mut().find(|l| l.source == source) {
        taken = amount.min(lot.remaining);
        lot.remaining -= taken;
    }
    if taken < amount {
        let parts = take_earliest_expiry(account, amount - taken, now, Some(source));
        taken += parts.iter().map(|p| p.amount).sum::<i64>();
    }
    taken
}

/// Gives redeemed points back as new lots with the expiry they had, latest expiry first.
fn give_back(account: &mut Account, original: &mut OpRecord, key: &str, amount: i64, now: Millis) {
    let mut left = amount;
    for part in original.parts.iter_mut().rev() {
        if left == 0 {
            break;
        }
        let give = left.min(part.amount - part.returned);
        if give == 0 {
            continue;
        }
        part.returned += give;
        left -= give;
        account.lots.push(Lot {
            source: key.to_string(),
            remaining: give,
            activate_at: now,
            expire_at: part.expire_at,
        });
    }
}

/// Merges active lots that expire together into the first of them, so a member's state
/// grows with the number of distinct expiry times, not with the number of purchases.
/// Pending lots stay apart (each activates on its own); a reversal whose own lot was merged
/// takes the points back from the active balance, earliest expiry first.
fn consolidate(account: &mut Account, now: Millis) {
    let mut first: Vec<(Option<Millis>, usize)> = Vec::new();
    for i in 0..account.lots.len() {
        let lot = &account.lots[i];
        if lot.activate_at > now || lot.remaining == 0 {
            continue;
        }
        let expire_at = lot.expire_at;
        match first.iter().find(|(e, _)| *e == expire_at) {
            Some(&(_, j)) => {
                let moved = account.lots[i].remaining;
                account.lots[j].remaining += moved;
                account.lots[i].remaining = 0;
            }
            None => first.push((expire_at, i)),
        }
    }
}

/// Returns reserved points as lots active from `at`, with the expiry they had.
fn return_parts(account: &mut Account, source: &str, parts: &[Part], at: Millis) {
    for part in parts.iter().filter(|p| p.amount > 0) {
        account.lots.push(Lot {
            source: source.to_string(),
            remaining: part.amount,
            activate_at: at,
            expire_at: part.expire_at,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// A member's account and records, applying operations as a store would.
    #[derive(Debug, Default, Clone)]
    struct Member {
        account: Account,
        records: HashMap<String, OpRecord>,
        entries: Vec<Entry>,
    }

    impl Member {
        fn run(&mut self, key: &str, op: Op, now: Millis) -> Result<OpRecord> {
            let fp = op.fingerprint();
            if let Some(r) = self.records.get(key) {
                return if r.fingerprint == fp {
                    Ok(r.clone())
                } else {
                    Err(Error::AlreadyExists(key.into()))
                };
            }
            let referenced = referenced_key(&op).and_then(|k| self.records.get(k));
            let (change, record) = apply(&self.account, key, &fp, &op, referenced, now)?;
            self.commit(change);
            Ok(record.unwrap_or_else(|| unreachable!("keyed operations keep a record")))
        }

        fn expire(&mut self, now: Millis) -> Vec<Entry> {
            let (change, _) = apply(&self.account, "", "", &Op::Expire, None, now).unwrap();
            let entries = change.entries.clone();
            self.commit(change);
            entries
        }

        fn commit(&mut self, change: Change) {
            assert!(change.account.version >= self.account.version);
            self.account = change.account;
            self.entries.extend(change.entries);
            for (k, r) in change.records {
                self.records.insert(k, r);
            }
        }
    }

    fn accrue_at(amount: i64, activate_at: Option<Millis>, expire_at: Option<Millis>) -> Op {
        Op::Accrue {
            amount,
            reason: Reason::Accrual,
            reference: String::new(),
            activate_at,
            expire_at,
        }
    }

    fn redeem(amount: i64) -> Op {
        Op::Redeem {
            amount,
            reference: String::new(),
            up_to_available: false,
        }
    }

    fn hold(amount: i64, timeout_ms: i64) -> Op {
        Op::Hold {
            amount,
            reference: String::new(),
            timeout_ms,
        }
    }

    #[test]
    fn redemption_takes_earliest_expiry_first_and_never_overdraws() {
        let mut m = Member::default();
        m.run("k1", accrue_at(100, None, Some(2_000)), 0).unwrap();
        m.run("k2", accrue_at(50, None, Some(1_000)), 0).unwrap();
        let r = m.run("k3", redeem(60), 0).unwrap();
        assert_eq!(
            r.parts[0],
            Part {
                expire_at: Some(1_000),
                amount: 50,
                returned: 0
            }
        );
        assert_eq!(m.account.view(0).active, 90);
        assert_eq!(m.account.view(0).next_expiry, Some((90, 2_000)));
        let err = m.run("k4", redeem(91), 0);
        assert!(matches!(err, Err(Error::FailedPrecondition(_))));
        assert_eq!(m.account.view(0).active, 90);
        assert!(!m.records.contains_key("k4"), "a refusal keeps no record");
    }

    #[test]
    fn pending_points_are_not_spendable_until_activated() {
        let mut m = Member::default();
        m.run("k1", accrue_at(100, Some(1_000), None), 0).unwrap();
        m.run("k2", accrue_at(40, Some(1_000), None), 0).unwrap();
        assert_eq!(m.account.view(0).pending, 140);
        assert_eq!(m.account.view(0).active, 0);
        assert_eq!(m.account.view(1_000).active, 140);
        let one = Op::Activate {
            accrual_key: Some("k2".into()),
        };
        assert_eq!(m.run("a1", one, 10).unwrap().reply.moved, 40);
        assert_eq!(m.account.view(10).active, 40);
        let all = Op::Activate { accrual_key: None };
        assert_eq!(m.run("a2", all, 10).unwrap().reply.moved, 100);
        let missing = Op::Activate {
            accrual_key: Some("nope".into()),
        };
        assert!(matches!(m.run("a3", missing, 10), Err(Error::NotFound(_))));
    }

    #[test]
    fn reversing_spent_accrual_reports_unrecovered() {
        let mut m = Member::default();
        m.run("acc", accrue_at(100, None, None), 0).unwrap();
        m.run("red", redeem(70), 0).unwrap();
        let rev = |amount| Op::Reverse {
            original_key: "acc".into(),
            amount,
            reference: String::new(),
        };
        let out = m.run("rev", rev(100), 0).unwrap();
        assert_eq!(out.reply.unrecovered, 70);
        assert_eq!(out.reply.entry.unwrap().amount, -30);
        assert_eq!(m.account.total, 0);
        assert!(
            matches!(m.run("rev2", rev(1), 0), Err(Error::FailedPrecondition(_))),
            "never more than the original"
        );
    }

    #[test]
    fn reversing_an_accrual_whose_points_are_held_waits_for_the_hold() {
        let mut m = Member::default();
        m.run("acc", accrue_at(100, None, None), 0).unwrap();
        m.run("h", hold(100, 60_000), 0).unwrap();
        let rev = || Op::Reverse {
            original_key: "acc".into(),
            amount: 100,
            reference: String::new(),
        };
        let err = m.run("rev", rev(), 0).unwrap_err();
        assert!(
            matches!(&err, Error::FailedPrecondition(msg) if msg.starts_with(HELD_BACK)),
            "{err:?}"
        );
        assert_eq!(m.account.total, 100, "nothing written");
        // The till gives up: the hold times out, its points return, the retry takes them.
        let out = m.run("rev", rev(), 60_000).unwrap();
        assert_eq!(out.reply.unrecovered, 0);
        assert_eq!(m.account.total, 0);
    }

    #[test]
    fn a_hold_reserves_then_resolves_once() {
        let mut m = Member::default();
        m.run("acc", accrue_at(100, None, None), 0).unwrap();
        let h = m.run("h", hold(60, 1_000), 0).unwrap();
        assert_eq!(h.reply.hold, Some(HoldState::Open));
        assert_eq!((h.reply.balance.active, h.reply.balance.held), (40, 60));
        assert!(
            matches!(m.run("r", redeem(41), 1), Err(Error::FailedPrecondition(_))),
            "held points are not spendable"
        );
        let confirm = |amount| Op::Confirm {
            hold_key: "h".into(),
            amount,
        };
        let c = m.run("c", confirm(45), 2).unwrap();
        assert_eq!(c.reply.entry.as_ref().unwrap().amount, -45);
        assert_eq!((c.reply.balance.active, c.reply.balance.held), (55, 0));
        assert_eq!(m.records["h"].hold, Some(HoldState::Confirmed));
        assert!(matches!(
            m.run("c2", confirm(0), 3),
            Err(Error::FailedPrecondition(_))
        ));
        let cancel = Op::Cancel {
            hold_key: "h".into(),
        };
        assert!(matches!(
            m.run("x", cancel, 3),
            Err(Error::FailedPrecondition(_))
        ));
        assert_eq!(m.account.total, 55);
    }

    #[test]
    fn a_hold_releases_itself_after_its_timeout() {
        let mut m = Member::default();
        m.run("acc", accrue_at(100, None, None), 0).unwrap();
        m.run("h", hold(100, 1_000), 0).unwrap();
        assert_eq!(m.account.view(999).held, 100);
        assert_eq!(m.account.view(1_000).held, 0);
        assert_eq!(m.account.view(1_000).active, 100);
        assert_eq!(
            hold_state(&m.records["h"], "h", &m.account, 1_000),
            HoldState::Expired
        );
        let confirm = Op::Confirm {
            hold_key: "h".into(),
            amount: 0,
        };
        assert!(matches!(
            m.run("c", confirm, 1_000),
            Err(Error::FailedPrecondition(_))
        ));
        let cancel = Op::Cancel {
            hold_key: "h".into(),
        };
        let c = m.run("x", cancel, 1_001).unwrap();
        assert_eq!(c.reply.hold, Some(HoldState::Expired));
        assert_eq!(m.account.view(1_001).active, 100);
    }

    #[test]
    fn expiry_takes_only_unspent_unheld_remainders() {
        let mut m = Member::default();
        m.run("a", accrue_at(100, None, Some(1_000)), 0).unwrap();
        m.run("b", accrue_at(100, None, None), 0).unwrap();
        m.run("r", redeem(30), 0).unwrap();
        m.run("h", hold(50, 5_000), 0).unwrap();
        // 30 spent and 50 held from lot a (earliest expiry): 20 remain to expire.
        let entries = m.expire(1_000);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].amount, -20);
        assert_eq!(entries[0].reason, Reason::Expiry);
        assert!(m.expire(1_000).is_empty(), "expiry is idempotent");
        let view = m.account.view(1_000);
        assert_eq!(
            (view.active, view.held, view.lifetime_expired),
            (100, 50, 20)
        );
        // Points held from the expired lot come back already expired when cancelled.
        let cancel = Op::Cancel {
            hold_key: "h".into(),
        };
        m.run("x", cancel, 1_500).unwrap();
        assert_eq!(m.expire(1_500)[0].amount, -50);
        assert_eq!(m.account.total, 100);
    }

    #[test]
    fn adjustments_are_audited_and_never_overdraw() {
        let mut m = Member::default();
        let actor = Actor {
            id: "manager:anna".into(),
            comment: "goodwill".into(),
        };
        let adjust = |amount| Op::Adjust {
            amount,
            actor: actor.clone(),
            expire_at: None,
        };
        let r = m.run("j1", adjust(25), 0).unwrap();
        let e = r.reply.entry.unwrap();
        assert_eq!((e.reason, e.amount), (Reason::ManualAdjustment, 25));
        assert_eq!(e.actor.as_ref().unwrap().id, "manager:anna");
        assert!(matches!(
            m.run("j2", adjust(-26), 0),
            Err(Error::FailedPrecondition(_))
        ));
        assert_eq!(m.run("j3", adjust(-25), 0).unwrap().reply.balance.active, 0);
    }

    #[test]
    fn a_transfer_moves_every_lot_and_closes_the_source() {
        let mut from = Member::default();
        from.run("a", accrue_at(100, None, Some(9_000)), 0).unwrap();
        from.run("b", accrue_at(7, Some(500), None), 0).unwrap();
        let out = from
            .run(
                "merge:out",
                Op::TransferOut {
                    to_member: "m2".into(),
                },
                1,
            )
            .unwrap();
        assert_eq!(out.reply.moved, 107);
        assert_eq!(from.account.total, 0);
        assert!(matches!(
            from.run("late", accrue_at(1, None, None), 2),
            Err(Error::FailedPrecondition(_))
        ));
        let mut to = Member::default();
        let lots = out.reply.lots.clone();
        let r = to
            .run(
                "merge:in",
                Op::TransferIn {
                    from_member: "m1".into(),
                    lots,
                },
                2,
            )
            .unwrap();
        assert_eq!(r.reply.entry.unwrap().amount, 107);
        let v = to.account.view(2);
        assert_eq!(
            (v.active, v.pending, v.next_expiry),
            (100, 7, Some((100, 9_000)))
        );
    }

    #[test]
    fn lots_expiring_together_merge_so_state_stays_small() {
        let mut m = Member::default();
        for i in 0..50 {
            m.run(&format!("a{i}"), accrue_at(10, None, Some(9_000)), i)
                .unwrap();
            m.run(&format!("r{i}"), redeem(5), i).unwrap();
        }
        m.run("never", accrue_at(10, None, None), 60).unwrap();
        m.run("later", accrue_at(10, Some(500), Some(9_000)), 60)
            .unwrap();
        assert_eq!(m.account.lots.len(), 3, "{:?}", m.account.lots);
        let v = m.account.view(60);
        assert_eq!((v.active, v.pending), (260, 10));
        assert_eq!(m.account.view(500).active, 270);
    }

    #[test]
    fn times_and_balances_stay_within_exact_bounds() {
        let mut m = Member::default();
        let far = m.run("far", accrue_at(1, None, Some(i64::MAX)), 0);
        assert!(matches!(far, Err(Error::InvalidArgument(_))), "{far:?}");
        m.account.total = MAX_BALANCE - 5;
        m.account.lifetime_accrued = MAX_BALANCE - 5;
        let over = m.run("over", accrue_at(6, None, None), 0);
        assert!(
            matches!(over, Err(Error::FailedPrecondition(_))),
            "{over:?}"
        );
        m.run("fits", accrue_at(5, None, None), 0).unwrap();
    }

    #[test]
    fn fingerprints_tell_payloads_apart() {
        assert_eq!(redeem(5).fingerprint(), redeem(5).fingerprint());
        assert_ne!(redeem(5).fingerprint(), redeem(6).fingerprint());
    }

    #[derive(Debug, Clone)]
    enum Step {
        Accrue(i64, Option<i64>, Option<i64>),
        Redeem(i64, bool),
        Hold(i64, i64),
        Confirm(usize, i64),
        Cancel(usize),
        Reverse(usize, i64),
        Activate(Option<usize>),
        Expire,
        Retry(usize),
        Wait(i64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (
                1..1_000i64,
                proptest::option::of(1..500i64),
                proptest::option::of(500..5_000i64)
            )
                .prop_map(|(a, p, e)| Step::Accrue(a, p, e)),
            (1..1_500i64, any::<bool>()).prop_map(|(a, u)| Step::Redeem(a, u)),
            (1..800i64, 1..3_000i64).prop_map(|(a, t)| Step::Hold(a, t)),
            (0..20usize, 0..900i64).prop_map(|(i, a)| Step::Confirm(i, a)),
            (0..20usize).prop_map(Step::Cancel),
            (0..20usize, 1..1_000i64).prop_map(|(i, a)| Step::Reverse(i, a)),
            proptest::option::of(0..20usize).prop_map(Step::Activate),
            Just(Step::Expire),
            (0..40usize).prop_map(Step::Retry),
            (1..2_000i64).prop_map(Step::Wait),
        ]
    }

    /// What the model expects of holds: how each was resolved, if at all.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum ModelHold {
        Open { amount: i64, until: Millis },
        Resolved,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn state_machine_keeps_every_invariant(steps in proptest::collection::vec(step(), 1..80)) {
            let mut m = Member::default();
            let mut now: Millis = 0;
            // The model: keys of credits and debits with what they moved, holds, and the
            // requests made so far (for retries).
            let mut credits: Vec<(String, i64)> = Vec::new();
            let mut debits: Vec<(String, i64)> = Vec::new();
            let mut holds: Vec<(String, ModelHold)> = Vec::new();
            let mut reversed: HashMap<String, i64> = HashMap::new();
            let mut requests: Vec<(String, Op, OpRecord)> = Vec::new();
            let mut expired_total = 0;
            for (n, s) in steps.into_iter().enumerate() {
                let key = format!("k{n}");
                let before = m.clone();
                let active = m.account.view(now).active;
                let op = match s {
                    Step::Wait(ms) => { now += ms; continue; }
                    Step::Expire => {
                        let expirable: i64 = {
                            let mut a = m.account.clone();
                            a.release_expired_holds(now);
                            a.lots.iter().filter(|l| l.expire_at.is_some_and(|e| e <= now)).map(|l| l.remaining).sum()
                        };
                        let held_before = m.account.view(now).held;
                        let entries = m.expire(now);
                        let taken: i64 = entries.iter().map(|e| -e.amount).sum();
                        prop_assert_eq!(taken, expirable, "expiry takes exactly the unspent, unheld remainders that are due");
                        prop_assert_eq!(m.account.view(now).held, held_before, "expiry never touches held points");
                        expired_total += taken;
                        continue;
                    }
                    Step::Retry(i) => {
                        if requests.is_empty() { continue; }
                        let (k, op, rec) = requests[i % requests.len()].clone();
                        let again = m.run(&k, op, now);
                        prop_assert_eq!(again.as_ref().ok().map(|r| &r.reply), Some(&rec.reply), "a retry gets the stored reply");
                        prop_assert_eq!(&m.account, &before.account, "a retry changes nothing");
                        continue;
                    }
                    Step::Accrue(a, p, e) => accrue_at(a, p.map(|p| now + p), e.map(|e| now + e)),
                    Step::Redeem(a, up_to_available) => Op::Redeem { amount: a, reference: String::new(), up_to_available },
                    Step::Hold(a, t) => hold(a, t),
                    Step::Confirm(i, a) => {
                        if holds.is_empty() { continue; }
                        Op::Confirm { hold_key: holds[i % holds.len()].0.clone(), amount: a }
                    }
                    Step::Cancel(i) => {
                        if holds.is_empty() { continue; }
                        Op::Cancel { hold_key: holds[i % holds.len()].0.clone() }
                    }
                    Step::Reverse(i, a) => {
                        let all: Vec<&(String, i64)> = credits.iter().chain(debits.iter()).collect();
                        if all.is_empty() { continue; }
                        Op::Reverse { original_key: all[i % all.len()].0.clone(), amount: a, reference: String::new() }
                    }
                    Step::Activate(i) => Op::Activate {
                        accrual_key: i.and_then(|i| (!credits.is_empty()).then(|| credits[i % credits.len()].0.clone())),
                    },
                };
                let result = m.run(&key, op.clone(), now);
                match (&op, &result) {
                    (_, Err(_)) => {
                        prop_assert_eq!(&m.account, &before.account, "a refused operation changes nothing");
                        prop_assert_eq!(m.entries.len(), before.entries.len());
                    }
                    (Op::Accrue { amount, .. }, Ok(_)) => credits.push((key.clone(), *amount)),
                    (Op::Redeem { amount, up_to_available, .. }, Ok(r)) => {
                        prop_assert!(*amount <= active || *up_to_available, "never overdraws");
                        prop_assert_eq!(r.amount, (*amount).min(active));
                        debits.push((key.clone(), r.amount));
                    }
                    (Op::Hold { amount, timeout_ms, .. }, Ok(_)) => {
                        prop_assert!(*amount <= active);
                        holds.push((key.clone(), ModelHold::Open { amount: *amount, until: now + timeout_ms }));
                    }
                    (Op::Confirm { hold_key, amount }, Ok(r)) => {
                        let h = holds.iter_mut().find(|h| &h.0 == hold_key).map(|h| &mut h.1);
                        let Some(h) = h else { unreachable!() };
                        match *h {
                            ModelHold::Open { amount: held, until } => {
                                prop_assert!(now < until, "an expired hold cannot be confirmed");
                                let want = if *amount == 0 { held } else { *amount };
                                prop_assert_eq!(r.amount, want);
                                prop_assert!(want <= held);
                            }
                            ModelHold::Resolved => prop_assert!(false, "a hold resolves once"),
                        }
                        *h = ModelHold::Resolved;
                        debits.push((key.clone(), r.amount));
                    }
                    (Op::Cancel { hold_key }, Ok(r)) => {
                        let h = holds.iter_mut().find(|h| &h.0 == hold_key).map(|h| &mut h.1);
                        let Some(h) = h else { unreachable!() };
                        let was = before.records.get(hold_key).and_then(|r| r.hold);
                        let is = m.records.get(hold_key).and_then(|r| r.hold);
                        prop_assert!(r.reply.hold.is_some());
                        if was != is {
                            prop_assert_eq!(is, Some(HoldState::Cancelled));
                            let open_before = before.account.holds.iter().any(|x| &x.key == hold_key);
                            prop_assert!(matches!(*h, ModelHold::Open { until, .. } if now < until) && open_before,
                                "only an open hold is cancelled");
                            *h = ModelHold::Resolved;
                        }
                        if matches!(*h, ModelHold::Resolved) && was == is {
                            prop_assert!(!m.account.holds.iter().any(|x| &x.key == hold_key), "a resolved hold stays resolved");
                        }
                    }
                    (Op::Reverse { original_key, amount, .. }, Ok(_)) => {
                        let moved = credits.iter().chain(debits.iter()).find(|c| &c.0 == original_key).map(|c| c.1).unwrap_or(0);
                        let total = reversed.entry(original_key.clone()).or_default();
                        *total += amount;
                        prop_assert!(*total <= moved, "never reverses more than was moved");
                    }
                    (_, Ok(_)) => {}
                }
                if let Ok(r) = &result {
                    requests.push((key.clone(), op, r.clone()));
                }
                let entries_sum: i64 = m.entries.iter().map(|e| e.amount).sum();
                prop_assert_eq!(m.account.total, entries_sum, "balance is the sum of entries");
                let in_lots: i64 = m.account.lots.iter().map(|l| l.remaining).sum();
                let in_holds: i64 = m.account.holds.iter().map(|h| h.amount).sum();
                prop_assert_eq!(m.account.total, in_lots + in_holds);
                prop_assert!(m.account.lots.iter().all(|l| l.remaining > 0));
                let view = m.account.view(now);
                prop_assert!(view.active >= 0 && view.pending >= 0 && view.held >= 0);
                let seqs: Vec<i64> = m.entries.iter().map(|e| e.seq).collect();
                prop_assert_eq!(seqs, (1..=m.entries.len() as i64).collect::<Vec<_>>(), "sequence numbers have no gaps");
                prop_assert_eq!(m.account.lifetime_expired, expired_total);
            }
        }
    }
}
