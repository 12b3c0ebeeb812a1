//! Velocity limits: how many receipts and points one card, member, store or cashier may
//! accrue or redeem per clock hour or UTC day (program rules, per tenant).
//!
//! Each limit counts in a counter of the same store as budgets (`velocity/...`): a commit
//! claims its receipt and points in the same atomic write as its purchase record, so a hard
//! limit holds exactly under any concurrency and across replicas. A hard limit refuses the
//! receipt (quote and commit) with the limit in the message; a soft one lets it through and
//! flags it on the purchase, in the log and in `loyalty_velocity_flagged_total`. Windows are
//! fixed (the clock hour, the UTC day), not sliding; refunds do not give counts back.

use loyalty_platform::clock::{DAY_MS, Millis};
use loyalty_platform::error::{Error, Violations};
use serde::{Deserialize, Serialize};

use crate::evaluate::Evaluation;
use crate::receipt::{Identification, Receipt};
use crate::usage::{Claim, Counters};

/// Most velocity limits one program holds.
pub const MAX_LIMITS: usize = 32;
const HOUR_MS: i64 = 3_600_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Subject {
    /// The card number the receipt was identified by (receipts identified otherwise do not
    /// count against card limits).
    Card,
    Member,
    Store,
    /// The receipt's cashier id (receipts without one do not count).
    Cashier,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    Accrual,
    Redemption,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Window {
    Hour,
    Day,
}

/// One limit of a program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VelocityLimit {
    pub subject: Subject,
    pub action: Action,
    pub window: Window,
    /// Receipts that accrue (or redeem) per window; 0: not limited.
    pub max_receipts: i64,
    /// Points (minor units) accrued (or redeemed) per window; 0: not limited.
    pub max_points: i64,
    /// Refuse the receipt (true) or only flag it (false).
    pub hard: bool,
}

impl Subject {
    fn name(self) -> &'static str {
        match self {
            Self::Card => "card",
            Self::Member => "member",
            Self::Store => "store",
            Self::Cashier => "cashier",
        }
    }
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Self::Accrual => "accrual",
            Self::Redemption => "redemption",
        }
    }
}

impl Window {
    fn name(self) -> &'static str {
        match self {
            Self::Hour => "hour",
            Self::Day => "day",
        }
    }

    fn period(self, now: Millis) -> i64 {
        match self {
            Self::Hour => now.div_euclid(HOUR_MS),
            Self::Day => now.div_euclid(DAY_MS),
        }
    }
}

/// Checks a program's limits, naming the fields.
pub fn validate(v: &mut Violations, limits: &[VelocityLimit]) {
    v.check(
        limits.len() <= MAX_LIMITS,
        "program.velocity_limits",
        format!("at most {MAX_LIMITS} limits"),
    );
    for (i, l) in limits.iter().enumerate().take(MAX_LIMITS) {
        let field = format!("program.velocity_limits[{i}]");
        v.check(
            l.max_receipts > 0 || l.max_points > 0,
            &field,
            "must limit receipts, points or both",
        );
        v.check(
            (0..=1_000_000_000).contains(&l.max_receipts),
            format!("{field}.max_receipts"),
            "must be between 0 and 10^9",
        );
        v.check(
            (0..=crate::MAX_POINTS).contains(&l.max_points),
            format!("{field}.max_points"),
            "must be between 0 and 10^12",
        );
        let same = limits[..i].iter().any(|p| {
            (p.subject, p.action, p.window, p.hard) == (l.subject, l.action, l.window, l.hard)
        });
        v.check(
            !same,
            &field,
            "repeats the subject, action, window and mode of an earlier limit",
        );
    }
}

/// The subject's id on this receipt, if it has one.
fn subject_id<'a>(
    subject: Subject,
    receipt: &'a Receipt,
    member: Option<&'a str>,
) -> Option<&'a str> {
    let id = match subject {
        Subject::Card => match &receipt.identification {
            Identification::Card(number) => Some(number.as_str()),
            _ => None,
        },
        Subject::Member => member,
        Subject::Store => Some(receipt.store_id.as_str()),
        Subject::Cashier => Some(receipt.cashier_id.as_str()),
    };
    id.filter(|s| !s.is_empty())
}

fn counter(l: &VelocityLimit, id: &str, now: Millis, what: &str) -> String {
    format!(
        "velocity/{}/{}/{}/{}/{what}/{id}",
        l.subject.name(),
        l.action.name(),
        l.window.name(),
        l.window.period(now),
    )
}

/// The counters a receipt's limits read, for the checkout to fetch before evaluating.
pub fn counter_names(
    limits: &[VelocityLimit],
    receipt: &Receipt,
    member: Option<&str>,
    now: Millis,
) -> Vec<String> {
    let mut names = Vec::new();
    for l in limits {
        let Some(id) = subject_id(l.subject, receipt, member) else {
            continue;
        };
        for (max, what) in [(l.max_receipts, "receipts"), (l.max_points, "points")] {
            let name = counter(l, id, now, what);
            if max > 0 && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// What the limits make of one evaluated receipt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Claims to write with the purchase (hard limits carry their maximum).
    pub claims: Vec<Claim>,
    /// Soft limits the receipt goes over, described.
    pub flags: Vec<String>,
    /// The first hard limit the receipt goes over, described.
    pub refused: Option<String>,
}

/// Judges an evaluated receipt against the limits, with counter values read before.
pub fn judge(
    limits: &[VelocityLimit],
    receipt: &Receipt,
    evaluation: &Evaluation,
    counters: &Counters,
    now: Millis,
) -> Verdict {
    let member = evaluation.member.as_ref().map(|m| m.member_id.as_str());
    let mut verdict = Verdict::default();
    if member.is_none() {
        return verdict; // nothing accrues or redeems without a member
    }
    for l in limits {
        let Some(id) = subject_id(l.subject, receipt, member) else {
            continue;
        };
        let points = match l.action {
            Action::Accrual => evaluation.total_points_accrued(),
            Action::Redemption => evaluation.points_redeemed,
        };
        if points <= 0 {
            continue;
        }
        for (max, amount, what) in [
            (l.max_receipts, 1, "receipts"),
            (l.max_points, points, "points"),
        ] {
            if max <= 0 {
                continue;
            }
            let name = counter(l, id, now, what);
            let so_far = counters.get(&name).copied().unwrap_or(0);
            let over = so_far.saturating_add(amount) > max;
            let description = format!(
                "{} {id}: {what} of {} per {} would exceed {max} (so far {so_far})",
                l.subject.name(),
                l.action.name(),
                l.window.name(),
            );
            // One claim per counter: a soft and a hard limit on the same counter share it.
            match verdict.claims.iter_mut().find(|c| c.counter == name) {
                Some(c) if l.hard => c.limit = max,
                Some(_) => {}
                None => verdict.claims.push(Claim {
                    counter: name,
                    amount,
                    limit: if l.hard { max } else { 0 },
                }),
            }
            if over && l.hard && verdict.refused.is_none() {
                verdict.refused = Some(description);
            } else if over && !l.hard {
                verdict.flags.push(description);
            }
        }
    }
    verdict
}

/// The error a refused receipt gets.
pub fn refusal(description: &str) -> Error {
    Error::FailedPrecondition(format!("velocity limit: {description}"))
}

/// Whether a refused claim is a velocity counter's.
pub fn is_velocity(counter: &str) -> bool {
    counter.starts_with("velocity/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_per_subject_action_window_and_period() {
        let l = VelocityLimit {
            subject: Subject::Card,
            action: Action::Accrual,
            window: Window::Hour,
            max_receipts: 3,
            max_points: 0,
            hard: true,
        };
        let a = counter(&l, "100", 0, "receipts");
        assert_eq!(a, "velocity/card/accrual/hour/0/receipts/100");
        assert_eq!(counter(&l, "100", HOUR_MS - 1, "receipts"), a);
        assert_ne!(counter(&l, "100", HOUR_MS, "receipts"), a);
        let day = VelocityLimit {
            window: Window::Day,
            ..l.clone()
        };
        assert_eq!(
            counter(&day, "100", DAY_MS + 5, "receipts"),
            "velocity/card/accrual/day/1/receipts/100"
        );
    }

    #[test]
    fn limits_are_validated() {
        let ok = VelocityLimit {
            subject: Subject::Member,
            action: Action::Redemption,
            window: Window::Day,
            max_receipts: 0,
            max_points: 100,
            hard: false,
        };
        let mut v = Violations::new();
        validate(&mut v, std::slice::from_ref(&ok));
        assert!(v.is_empty());
        let none = VelocityLimit {
            max_points: 0,
            ..ok.clone()
        };
        let mut v = Violations::new();
        validate(&mut v, &[ok.clone(), ok.clone(), none]);
        let err = v.finish().unwrap_err().to_string();
        assert!(
            err.contains("repeats") && err.contains("must limit"),
            "{err}"
        );
    }
}
