//! Base program rules per tenant: accrual, redemption, rounding, point lifetimes.

use loyalty_platform::clock::Millis;
use loyalty_platform::error::{Result, Violations};
use loyalty_platform::types::check_tenant;
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

/// Money is kept to this many fraction digits (the currency's minor unit).
pub const MONEY_SCALE: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rounding {
    Down,
    HalfUp,
    Up,
}

impl Rounding {
    pub fn apply(self, value: Decimal, dp: u32) -> Decimal {
        // Already that precise: nothing to round (the common case for money).
        if value.scale() <= dp {
            return value;
        }
        let strategy = match self {
            Rounding::Down => RoundingStrategy::ToZero,
            Rounding::HalfUp => RoundingStrategy::MidpointAwayFromZero,
            Rounding::Up => RoundingStrategy::AwayFromZero,
        };
        value.round_dp_with_strategy(dp, strategy)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BaseAccrual {
    /// Percent of the amount paid in money, accrued as points worth that much.
    Percent(Decimal),
    /// Fixed points (minor units) per receipt with a positive paid amount.
    FixedPoints(i64),
}

/// Which spend decides a member's tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TierWindow {
    PreviousCalendarYear,
    Rolling12Months,
}

/// A status level: from `min_spend` over the tier window, accrual at `accrual_percent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tier {
    pub tier_id: String,
    pub name: String,
    pub min_spend: Decimal,
    pub accrual_percent: Decimal,
}

/// Most tiers in a program.
pub const MAX_TIERS: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Program {
    pub tenant_id: String,
    pub currency: String,
    pub point_minor_units: i64,
    pub accrual: BaseAccrual,
    /// Money one point pays.
    pub point_value: Decimal,
    pub max_redeem_percent: Decimal,
    pub min_paid_amount: Decimal,
    pub sale_excluded_from_accrual: bool,
    pub sale_excluded_from_redemption: bool,
    pub accrual_rounding: Rounding,
    pub discount_rounding: Rounding,
    pub activation_delay_days: i32,
    /// 0: points never expire.
    pub point_lifetime_days: i32,
    pub max_line_discount_percent: Decimal,
    pub max_receipt_discount_percent: Decimal,
    pub refund_returns_redeemed_points: bool,
    /// Campaign discounts skip lines already at a sale price.
    pub sale_excluded_from_discounts: bool,
    /// Status levels, lowest first; a member's tier rate replaces the base rate.
    pub tiers: Vec<Tier>,
    pub tier_window: TierWindow,
    /// Receipts and points per card, member, store or cashier per hour or day.
    pub velocity_limits: Vec<crate::velocity::VelocityLimit>,
    pub version: i64,
    pub updated_at: Millis,
}

impl Program {
    /// The base program of the case studies: 1% accrual, 1 point = 1 currency unit, pay up
    /// to 20% with points, sale items excluded, points active at once and live 180 days.
    pub fn case_study(tenant_id: &str, currency: &str) -> Self {
        Self {
            tenant_id: tenant_id.to_string(),
            currency: currency.to_string(),
            point_minor_units: 100,
            accrual: BaseAccrual::Percent(Decimal::ONE),
            point_value: Decimal::ONE,
            max_redeem_percent: Decimal::from(20),
            min_paid_amount: Decimal::ZERO,
            sale_excluded_from_accrual: true,
            sale_excluded_from_redemption: true,
            accrual_rounding: Rounding::Down,
            discount_rounding: Rounding::HalfUp,
            activation_delay_days: 0,
            point_lifetime_days: 180,
            max_line_discount_percent: Decimal::ONE_HUNDRED,
            max_receipt_discount_percent: Decimal::ONE_HUNDRED,
            refund_returns_redeemed_points: true,
            sale_excluded_from_discounts: true,
            tiers: Vec::new(),
            tier_window: TierWindow::Rolling12Months,
            velocity_limits: Vec::new(),
            version: 0,
            updated_at: 0,
        }
    }

    /// Refuses contradictory or dangerous rules, naming the fields.
    pub fn validate(&self) -> Result<()> {
        let mut v = Violations::new();
        check_tenant(&mut v, &self.tenant_id);
        v.check(
            self.currency.len() == 3 && self.currency.chars().all(|c| c.is_ascii_uppercase()),
            "program.currency",
            "must be an ISO 4217 code such as KZT",
        );
        v.check(
            [1, 10, 100, 1000].contains(&self.point_minor_units),
            "program.point_minor_units",
            "must be 1, 10, 100 or 1000",
        );
        match &self.accrual {
            BaseAccrual::Percent(p) => v.check(
                *p >= Decimal::ZERO && *p <= Decimal::ONE_HUNDRED,
                "program.accrual_percent",
                "must be between 0 and 100",
            ),
            BaseAccrual::FixedPoints(n) => v.check(
                (0..=crate::MAX_POINTS).contains(n),
                "program.accrual_fixed_points",
                "must be between 0 and 10^12",
            ),
        }
        v.check(
            self.point_value > Decimal::ZERO && self.point_value <= Decimal::from(1_000_000),
            "program.point_value",
            "must be positive and at most 1000000",
        );
        for (field, p) in [
            ("program.max_redeem_percent", self.max_redeem_percent),
            (
                "program.max_line_discount_percent",
                self.max_line_discount_percent,
            ),
            (
                "program.max_receipt_discount_percent",
                self.max_receipt_discount_percent,
            ),
        ] {
            v.check(
                p >= Decimal::ZERO && p <= Decimal::ONE_HUNDRED,
                field,
                "must be between 0 and 100",
            );
        }
        v.check(
            self.min_paid_amount >= Decimal::ZERO,
            "program.min_paid_amount",
            "must not be negative",
        );
        v.check(
            (0..=3650).contains(&self.activation_delay_days),
            "program.activation_delay_days",
            "must be between 0 and 3650",
        );
        v.check(
            (0..=36500).contains(&self.point_lifetime_days),
            "program.point_lifetime_days",
            "must be between 0 (never expire) and 36500",
        );
        v.check(
            self.tiers.len() <= MAX_TIERS,
            "program.tiers",
            format!("at most {MAX_TIERS} tiers"),
        );
        for (i, t) in self.tiers.iter().enumerate().take(MAX_TIERS) {
            v.text(
                &t.tier_id,
                format!("program.tiers[{i}].tier_id"),
                loyalty_platform::error::MAX_ID_LEN,
            );
            v.optional_text(&t.name, format!("program.tiers[{i}].name"), 200);
            v.check(
                t.min_spend >= Decimal::ZERO,
                format!("program.tiers[{i}].min_spend"),
                "must not be negative",
            );
            v.check(
                t.accrual_percent >= Decimal::ZERO && t.accrual_percent <= Decimal::ONE_HUNDRED,
                format!("program.tiers[{i}].accrual_percent"),
                "must be between 0 and 100",
            );
            if i > 0 {
                let prev = &self.tiers[i - 1];
                v.check(
                    t.min_spend > prev.min_spend,
                    format!("program.tiers[{i}].min_spend"),
                    "tiers go from the lowest spend up, strictly",
                );
                v.check(
                    !self.tiers[..i].iter().any(|p| p.tier_id == t.tier_id),
                    format!("program.tiers[{i}].tier_id"),
                    format!("duplicate tier id {:?}", t.tier_id),
                );
            }
        }
        crate::velocity::validate(&mut v, &self.velocity_limits);
        v.finish()
    }
}
