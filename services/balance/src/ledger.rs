//! The points ledger as pure functions over one member's state. Stores load the state,
//! call [`apply`] and write its results atomically; nothing here does I/O.
//!
//! Invariants (checked by the property test below):
//! - `account.total` equals the sum of the member's entry amounts, and the sum of lot
//!   remainders;
//! - no lot remainder is ever negative, so the spendable balance never is;
//! - reversals never take back or give back more than the original operation moved.

use loyalty_platform::clock::Millis;
use loyalty_platform::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Largest amount of one operation, in point minor units.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    Accrual,
    Redemption,
    RefundReversal,
    RedemptionReversal,
    ReferralBonus,
    SurveyBonus,
    RegistrationBonus,
    CampaignBonus,
    OpeningBalance,
}

/// Points from one accrual (or one give-back), spendable between its times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lot {
    /// Idempotency key of the operation that created it.
    pub source: String,
    pub remaining: i64,
    pub activate_at: Millis,
    /// `None`: never expires.
    pub expire_at: Option<Millis>,
}

impl Lot {
    fn active_at(&self, now: Millis) -> bool {
        self.activate_at <= now && self.expire_at.is_none_or(|e| now < e)
    }
}

/// One member's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Sequence number of the newest entry.
    pub seq: i64,
    /// Sum of all entry amounts.
    pub total: i64,
    pub lots: Vec<Lot>,
    pub lifetime_accrued: i64,
    pub lifetime_redeemed: i64,
    pub lifetime_expired: i64,
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
    pub activate_at: Option<Millis>,
    pub expire_at: Option<Millis>,
}

/// What a caller sees of a balance at a moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceView {
    pub active: i64,
    pub pending: i64,
    pub held: i64,
    pub next_expiry: Option<(i64, Millis)>,
    pub lifetime_accrued: i64,
    pub lifetime_redeemed: i64,
    pub lifetime_expired: i64,
    pub seq: i64,
}

impl Account {
    pub fn view(&self, now: Millis) -> BalanceView {
        let mut v = BalanceView {
            lifetime_accrued: self.lifetime_accrued,
            lifetime_redeemed: self.lifetime_redeemed,
            lifetime_expired: self.lifetime_expired,
            seq: self.seq,
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
}

/// A mutating operation, as requested (its equality is the idempotency fingerprint).
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
}

/// Part of a redemption taken from lots expiring at one time, remembered so a give-back
/// restores the same points.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub expire_at: Option<Millis>,
    pub amount: i64,
    pub returned: i64,
}

/// What an operation did, kept under its idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRecord {
    pub member_id: String,
    pub op: Op,
    pub reply: Reply,
    /// Amount moved by an accrual or redemption.
    pub amount: i64,
    /// How much of it later reversals have claimed.
    pub reversed: i64,
    /// For redemptions: where the points came from.
    pub parts: Vec<Part>,
}

/// The reply of an operation, replayed verbatim on a retry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub entry: Option<Entry>,
    pub balance: BalanceView,
    pub unrecovered: i64,
}

/// Validates an operation's own fields, before any state is read.
pub fn validate(op: &Op) -> Result<()> {
    let amount = match op {
        Op::Accrue {
            amount,
            activate_at,
            expire_at,
            ..
        } => {
            if let (Some(a), Some(e)) = (activate_at, expire_at)
                && e <= a
            {
                return Err(Error::invalid("expire_time", "must be after activate_time"));
            }
            *amount
        }
        Op::Redeem { amount, .. } | Op::Reverse { amount, .. } => *amount,
    };
    if amount <= 0 {
        return Err(Error::invalid("amount", "must be positive"));
    }
    if amount > MAX_AMOUNT {
        return Err(Error::invalid(
            "amount",
            format!("must be at most {MAX_AMOUNT}"),
        ));
    }
    Ok(())
}

/// The outcome of [`apply`]: the record to keep under the key (the entry is inside).
#[derive(Debug)]
pub struct Applied {
    pub record: OpRecord,
}

/// Applies `op` (key `key`) to `account` at `now`. `original` is the record of the
/// operation a `Reverse` refers to. On `Err` the caller must write nothing.
pub fn apply(
    account: &mut Account,
    member_id: &str,
    key: &str,
    op: &Op,
    original: Option<&mut OpRecord>,
    now: Millis,
) -> Result<Applied> {
    validate(op)?;
    let mut parts = Vec::new();
    let mut unrecovered = 0;
    let (reason, delta, reference, activate_at, expire_at) = match op {
        Op::Accrue {
            amount,
            reason,
            reference,
            activate_at,
            expire_at,
        } => {
            // An expiry already past is accepted (a late retry of a checkout): the lot simply
            // never counts as active.
            let activate = activate_at.unwrap_or(now);
            account.lots.push(Lot {
                source: key.to_string(),
                remaining: *amount,
                activate_at: activate,
                expire_at: *expire_at,
            });
            account.lifetime_accrued += amount;
            (*reason, *amount, reference, Some(activate), *expire_at)
        }
        Op::Redeem {
            amount,
            reference,
            up_to_available,
        } => {
            let active = account.view(now).active;
            if *amount > active && !up_to_available {
                return Err(Error::FailedPrecondition(format!(
                    "insufficient points: {active} active, {amount} requested"
                )));
            }
            let take = (*amount).min(active);
            parts = take_earliest_expiry(account, take, now, None);
            account.lifetime_redeemed += take;
            (Reason::Redemption, -take, reference, None, None)
        }
        Op::Reverse {
            original_key,
            amount,
            reference,
        } => {
            let original = original.ok_or_else(|| {
                Error::NotFound(format!("no operation with idempotency key {original_key}"))
            })?;
            if original.member_id != member_id {
                return Err(Error::FailedPrecondition(format!(
                    "operation {original_key} belongs to another member"
                )));
            }
            let left = original.amount - original.reversed;
            if *amount > left {
                return Err(Error::FailedPrecondition(format!(
                    "only {left} of operation {original_key} is left to reverse, {amount} requested"
                )));
            }
            match &original.op {
                Op::Accrue { .. } => {
                    let taken = take_back_accrual(account, original_key, *amount, now);
                    unrecovered = amount - taken;
                    original.reversed += amount;
                    account.lifetime_accrued -= taken;
                    (Reason::RefundReversal, -taken, reference, None, None)
                }
                Op::Redeem { .. } => {
                    give_back(account, original, key, *amount, now);
                    original.reversed += amount;
                    account.lifetime_redeemed -= amount;
                    (Reason::RedemptionReversal, *amount, reference, None, None)
                }
                Op::Reverse { .. } => {
                    return Err(Error::FailedPrecondition(format!(
                        "operation {original_key} is itself a reversal"
                    )));
                }
            }
        }
    };
    account.lots.retain(|l| l.remaining > 0);
    let entry = if delta == 0 {
        None
    } else {
        account.seq += 1;
        account.total += delta;
        Some(Entry {
            seq: account.seq,
            reason,
            amount: delta,
            balance_after: account.total,
            key: key.to_string(),
            reference: reference.clone(),
            created_at: now,
            activate_at,
            expire_at,
        })
    };
    let moved = match op {
        Op::Accrue { .. } | Op::Redeem { .. } => delta.abs(),
        Op::Reverse { .. } => 0,
    };
    Ok(Applied {
        record: OpRecord {
            member_id: member_id.to_string(),
            op: op.clone(),
            reply: Reply {
                entry,
                balance: account.view(now),
                unrecovered,
            },
            amount: moved,
            reversed: 0,
            parts,
        },
    })
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn accrue(amount: i64) -> Op {
        accrue_at(amount, None, None)
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

    #[test]
    fn redemption_takes_earliest_expiry_first_and_never_overdraws() {
        let mut a = Account::default();
        let late = accrue_at(100, None, Some(2_000));
        let early = accrue_at(50, None, Some(1_000));
        apply(&mut a, "m", "k1", &late, None, 0).unwrap();
        apply(&mut a, "m", "k2", &early, None, 0).unwrap();
        let r = apply(
            &mut a,
            "m",
            "k3",
            &Op::Redeem {
                amount: 60,
                reference: String::new(),
                up_to_available: false,
            },
            None,
            0,
        )
        .unwrap();
        assert_eq!(
            r.record.parts[0],
            Part {
                expire_at: Some(1_000),
                amount: 50,
                returned: 0
            }
        );
        assert_eq!(a.view(0).active, 90);
        assert_eq!(a.view(0).next_expiry, Some((90, 2_000)));
        let err = apply(
            &mut a,
            "m",
            "k4",
            &Op::Redeem {
                amount: 91,
                reference: String::new(),
                up_to_available: false,
            },
            None,
            0,
        );
        assert!(matches!(err, Err(Error::FailedPrecondition(_))));
        assert_eq!(a.view(0).active, 90);
    }

    #[test]
    fn pending_points_are_not_spendable() {
        let mut a = Account::default();
        let op = accrue_at(100, Some(1_000), None);
        apply(&mut a, "m", "k1", &op, None, 0).unwrap();
        assert_eq!(a.view(0).pending, 100);
        assert_eq!(a.view(0).active, 0);
        assert_eq!(a.view(1_000).active, 100);
    }

    #[test]
    fn reversing_spent_accrual_reports_unrecovered() {
        let mut a = Account::default();
        let mut rec = apply(&mut a, "m", "acc", &accrue(100), None, 0)
            .unwrap()
            .record;
        apply(
            &mut a,
            "m",
            "red",
            &Op::Redeem {
                amount: 70,
                reference: String::new(),
                up_to_available: false,
            },
            None,
            0,
        )
        .unwrap();
        let rev = Op::Reverse {
            original_key: "acc".into(),
            amount: 100,
            reference: String::new(),
        };
        let out = apply(&mut a, "m", "rev", &rev, Some(&mut rec), 0)
            .unwrap()
            .record;
        assert_eq!(out.reply.unrecovered, 70);
        assert_eq!(out.reply.entry.unwrap().amount, -30);
        assert_eq!(a.total, 0);
        let rev = Op::Reverse {
            original_key: "acc".into(),
            amount: 1,
            reference: String::new(),
        };
        let again = apply(&mut a, "m", "rev2", &rev, Some(&mut rec), 0);
        assert!(
            matches!(again, Err(Error::FailedPrecondition(_))),
            "never more than the original"
        );
    }

    #[derive(Debug, Clone)]
    enum Step {
        Accrue(i64, Option<i64>),
        Redeem(i64, bool),
        Reverse(usize, i64),
        Wait(i64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (1..1_000i64, proptest::option::of(1..5_000i64)).prop_map(|(a, e)| Step::Accrue(a, e)),
            (1..1_500i64, any::<bool>()).prop_map(|(a, u)| Step::Redeem(a, u)),
            (0..20usize, 1..1_000i64).prop_map(|(i, a)| Step::Reverse(i, a)),
            (1..2_000i64).prop_map(Step::Wait),
        ]
    }

    proptest! {
        #[test]
        fn invariants_hold_for_any_sequence(steps in proptest::collection::vec(step(), 1..60)) {
            let mut a = Account::default();
            let mut records: Vec<(String, OpRecord)> = Vec::new();
            let mut entries_sum = 0i64;
            let mut reversed_by_key: HashMap<String, i64> = HashMap::new();
            let mut now = 0;
            for (n, s) in steps.into_iter().enumerate() {
                let key = format!("k{n}");
                let before = a.clone();
                let result = match s {
                    Step::Wait(ms) => { now += ms; continue; }
                    Step::Accrue(amount, ttl) => {
                        let op = accrue_at(amount, None, ttl.map(|t| now + t));
                        apply(&mut a, "m", &key, &op, None, now)
                    }
                    Step::Redeem(amount, up_to_available) => {
                        let active = a.view(now).active;
                        let op = Op::Redeem { amount, reference: String::new(), up_to_available };
                        let r = apply(&mut a, "m", &key, &op, None, now);
                        if let Ok(applied) = &r {
                            prop_assert_eq!(applied.record.amount, amount.min(active), "takes what it may, never more");
                        }
                        r
                    }
                    Step::Reverse(i, amount) => {
                        if records.is_empty() { continue; }
                        let idx = i % records.len();
                        let (orig_key, rec) = &mut records[idx];
                        let op = Op::Reverse { original_key: orig_key.clone(), amount, reference: String::new() };
                        let r = apply(&mut a, "m", &key, &op, Some(rec), now);
                        if r.is_ok() {
                            *reversed_by_key.entry(orig_key.clone()).or_default() += amount;
                            prop_assert!(reversed_by_key[orig_key.as_str()] <= rec.amount);
                        }
                        r
                    }
                };
                match result {
                    Ok(applied) => {
                        if let Some(e) = &applied.record.reply.entry { entries_sum += e.amount; }
                        if !matches!(applied.record.op, Op::Reverse { .. }) {
                            records.push((key, applied.record));
                        }
                    }
                    Err(_) => prop_assert_eq!(&a, &before, "a refused operation changes nothing"),
                }
                prop_assert_eq!(a.total, entries_sum);
                prop_assert_eq!(a.total, a.lots.iter().map(|l| l.remaining).sum::<i64>());
                prop_assert!(a.lots.iter().all(|l| l.remaining >= 0));
                prop_assert!(a.view(now).active >= 0);
            }
        }
    }
}
