//! Tiers: a member's level from spend over the program's window, the next level and what
//! is missing for it. Spend is kept per member and local month as counters the checkout
//! bumps with each receipt and lowers with each refund.

use rust_decimal::Decimal;

use crate::calendar::LocalTime;
use crate::program::{Program, Tier, TierWindow};

/// The months (inclusive, as [`LocalTime::month_number`]) whose spend decides the tier.
pub fn window_months(window: TierWindow, now: &LocalTime) -> (i32, i32) {
    match window {
        TierWindow::PreviousCalendarYear => {
            let start = (now.year - 1) * 12;
            (start, start + 11)
        }
        TierWindow::Rolling12Months => (now.month_number() - 11, now.month_number()),
    }
}

/// The counter holding a member's spend in one month, in cents.
pub fn spend_counter(member_id: &str, month: i32) -> String {
    format!("spend/{member_id}/{month}")
}

/// Counters to read for a member's tier at `now`.
pub fn spend_counters(program: &Program, member_id: &str, now: &LocalTime) -> Vec<String> {
    if program.tiers.is_empty() {
        return Vec::new();
    }
    let (from, to) = window_months(program.tier_window, now);
    (from..=to).map(|m| spend_counter(member_id, m)).collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierStatus {
    pub tier: Option<Tier>,
    pub next: Option<Tier>,
    pub spend: Decimal,
    /// Spend still missing for the next tier; zero at the top.
    pub missing: Decimal,
}

/// The tier `spend` (money over the window) earns.
pub fn status(program: &Program, spend: Decimal) -> TierStatus {
    let reached = program.tiers.iter().rposition(|t| spend >= t.min_spend);
    let next = program.tiers.get(reached.map_or(0, |i| i + 1)).cloned();
    TierStatus {
        tier: reached.map(|i| program.tiers[i].clone()),
        missing: next
            .as_ref()
            .map_or(Decimal::ZERO, |n| (n.min_spend - spend).max(Decimal::ZERO)),
        next,
        spend,
    }
}

/// Spend in money from the counters' cents.
pub fn spend_from_cents(cents: &[i64]) -> Decimal {
    Decimal::new(cents.iter().copied().fold(0i64, i64::saturating_add), 2)
}

#[cfg(test)]
mod tests {
    use loyalty_platform::clock::DAY_MS;

    use super::*;
    use crate::calendar::day_number;

    fn program() -> Program {
        let mut p = Program::case_study("t", "KZT");
        p.tiers = vec![
            Tier {
                tier_id: "base".into(),
                name: "Base".into(),
                min_spend: Decimal::ZERO,
                accrual_percent: Decimal::from(5),
            },
            Tier {
                tier_id: "gold".into(),
                name: "Gold".into(),
                min_spend: Decimal::from(500_000),
                accrual_percent: Decimal::from(10),
            },
        ];
        p
    }

    #[test]
    fn five_percent_on_registration_and_ten_from_500000_a_year() {
        let p = program();
        let s = status(&p, Decimal::ZERO);
        assert_eq!(s.tier.unwrap().tier_id, "base");
        assert_eq!(s.next.unwrap().tier_id, "gold");
        assert_eq!(s.missing, Decimal::from(500_000));
        let s = status(&p, Decimal::from(499_999));
        assert_eq!(s.missing, Decimal::ONE);
        let s = status(&p, Decimal::from(500_000));
        assert_eq!(s.tier.unwrap().tier_id, "gold");
        assert_eq!((s.next, s.missing), (None, Decimal::ZERO));
    }

    #[test]
    fn windows_are_the_previous_year_or_the_last_twelve_months() {
        let now = LocalTime::at(day_number(2026, 3, 15) * DAY_MS, "");
        assert_eq!(
            window_months(TierWindow::PreviousCalendarYear, &now),
            (2025 * 12, 2025 * 12 + 11)
        );
        assert_eq!(
            window_months(TierWindow::Rolling12Months, &now),
            (2025 * 12 + 3, 2026 * 12 + 2)
        );
        assert_eq!(spend_counters(&program(), "m", &now).len(), 12);
    }
}
