//! Evaluates a receipt under the program and its campaigns: a pure function, the same for
//! Quote and Commit, so a quote equals the commit that follows it.
//!
//! Order: gross per line → who may take part (targeting, codes, budgets, limits, control
//! groups) → discounts, group by group in stacking order, within the line, group, receipt
//! and budget caps → points payment, capped and spread over eligible lines → accrual on what
//! is left to pay in money, at the best rate a line earns → fixed bonuses in their own lots.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use loyalty_platform::clock::{DAY_MS, Millis};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::book::{Bits, CampaignBook, Entry};
use crate::calendar::{LocalTime, end_of_local_day, in_birthday_window};
use crate::campaign::{
    Benefit, Campaign, CodeRequirement, Coupon, Mechanic, SkipReason, StackingMode, Step, held_out,
};
use crate::program::{BaseAccrual, MONEY_SCALE, Program, Rounding};
use crate::receipt::Receipt;
use crate::usage::{Claim, Counters, coupon_counter, member_counter};

/// Who is buying, as far as pricing cares (kept with the purchase).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberContext {
    pub member_id: String,
    /// Active points (minor units) before this receipt.
    pub points_available: i64,
    /// Empty without tiers.
    pub tier_id: String,
}

/// What targeting reads about a member beyond the id (not kept with the purchase).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberProfile {
    /// (month, day).
    pub birthday: Option<(u8, u8)>,
    pub attributes: BTreeMap<String, String>,
    pub segments: Vec<String>,
}

/// Category and brand of a line's product.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LineInfo {
    pub category: String,
    pub brand: String,
}

/// Codes the customer presented, checked and resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Codes {
    /// Normalized promo codes.
    pub promo: Vec<String>,
    /// Valid coupons.
    pub coupons: Vec<Coupon>,
}

/// Everything an evaluation reads besides the program, the campaigns and the receipt.
#[derive(Debug, Clone)]
pub struct Situation<'a> {
    pub store_brand: &'a str,
    pub local: LocalTime,
    /// The store's IANA time zone (empty: UTC); points expire at the end of its local day.
    pub time_zone: &'a str,
    /// Aligned with the receipt's lines.
    pub lines: &'a [LineInfo],
    pub member: Option<&'a MemberContext>,
    pub profile: Option<&'a MemberProfile>,
    pub codes: &'a Codes,
    pub counters: &'a Counters,
    pub now: Millis,
}

/// Shared text: cloning an effect's campaign id or description costs no allocation.
pub type Text = Arc<str>;

/// The campaign id of the base program's effects (empty).
pub fn base_program() -> Text {
    static EMPTY: LazyLock<Text> = LazyLock::new(|| Text::from(""));
    EMPTY.clone()
}

/// Why a campaign did not apply: the reason and, in words, the detail.
pub type Why = (SkipReason, Cow<'static, str>);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Effect {
    /// Empty for the base program.
    pub campaign_id: Text,
    pub description: Text,
    pub discount: Decimal,
    pub points: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub campaign_id: Text,
    pub reason: SkipReason,
    pub description: Cow<'static, str>,
}

/// Points of a fixed-bonus campaign, accrued as their own lot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bonus {
    pub campaign_id: String,
    pub points: i64,
    pub activate_at: Millis,
    pub expire_at: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineResult {
    pub line_id: String,
    pub sku: String,
    pub quantity: Decimal,
    pub gross: Decimal,
    pub discount: Decimal,
    pub net: Decimal,
    pub paid_with_points: Decimal,
    /// Points (minor units) redeemed on this line; refunds give back from it.
    pub points_redeemed: i64,
    /// Points this line accrues in the receipt's main lot (base and boosts).
    pub points_accrued: i64,
    pub max_payable_with_points: Decimal,
    /// The accrual rate of the base program (or the member's tier) and the rate the line
    /// earned, with the campaign that raised it (empty: none).
    pub base_percent: Decimal,
    pub accrual_percent: Decimal,
    pub accrual_campaign_id: Text,
    /// This line's share of each of the evaluation's bonuses, in their order.
    pub bonus_points: Vec<i64>,
    pub effects: Vec<Effect>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evaluation {
    pub lines: Vec<LineResult>,
    pub gross: Decimal,
    pub discount: Decimal,
    pub net: Decimal,
    pub amount_due: Decimal,
    pub paid_with_points: Decimal,
    pub points_redeemed: i64,
    /// The main lot: base accrual and boosts.
    pub points_accrued: i64,
    pub activate_at: Millis,
    pub expire_at: Option<Millis>,
    pub bonuses: Vec<Bonus>,
    pub max_redeemable_points: i64,
    pub effects: Vec<Effect>,
    pub skipped: Vec<Skipped>,
    /// What the applied campaigns use of budgets, member limits and coupons.
    pub claims: Vec<Claim>,
    pub member: Option<MemberContext>,
    pub program_version: i64,
    pub campaigns_version: u64,
    /// Soft velocity limits the receipt went over (set by the checkout).
    pub velocity_flags: Vec<String>,
}

impl Evaluation {
    /// Every point the receipt accrues, bonuses included.
    pub fn total_points_accrued(&self) -> i64 {
        self.bonuses
            .iter()
            .fold(self.points_accrued, |t, b| t.saturating_add(b.points))
    }

    /// Campaigns that held this member out (A/B control group).
    pub fn held_out(&self) -> impl Iterator<Item = &str> {
        self.skipped
            .iter()
            .filter(|s| s.reason == SkipReason::ControlGroup)
            .map(|s| &*s.campaign_id)
    }

    /// Campaigns that gave something.
    pub fn applied_campaigns(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self
            .effects
            .iter()
            .filter(|e| !e.campaign_id.is_empty())
            .map(|e| &*e.campaign_id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

fn money(value: Decimal) -> Decimal {
    Rounding::HalfUp.apply(value, MONEY_SCALE)
}

fn money_down(value: Decimal) -> Decimal {
    Rounding::Down.apply(value, MONEY_SCALE)
}

fn cent() -> Decimal {
    Decimal::new(1, MONEY_SCALE)
}

fn to_i64(value: Decimal) -> i64 {
    i64::try_from(value).unwrap_or(if value.is_sign_negative() {
        0
    } else {
        i64::MAX
    })
}

/// Money in cents (saturating far beyond any bounded amount).
pub fn cents(value: Decimal) -> i64 {
    value
        .checked_mul(Decimal::ONE_HUNDRED)
        .map_or(i64::MAX, |c| to_i64(c.trunc()))
}

/// Spreads `total` over `weights` proportionally without ever giving a slot more than its
/// weight; `unit` is the smallest step (one cent, one point). Sum of the result = `total`
/// when `total <= sum(weights)`. The slots with the most room left take the units that
/// proportional floors leave over, the earlier slot first among equals.
pub fn spread(total: Decimal, weights: &[Decimal], unit: Decimal) -> Vec<Decimal> {
    if total.is_zero() {
        return vec![Decimal::ZERO; weights.len()];
    }
    spread_scaled(total, weights, unit).unwrap_or_else(|| spread_decimal(total, weights, unit))
}

/// [`spread`] in integers at one common scale: the usual case (money and points), exact and
/// an order of magnitude cheaper than decimal division. `None` when the values do not fit.
fn spread_scaled(total: Decimal, weights: &[Decimal], unit: Decimal) -> Option<Vec<Decimal>> {
    let scale = weights
        .iter()
        .map(Decimal::scale)
        .chain([total.scale(), unit.scale()])
        .max()
        .unwrap_or(0);
    if scale > 12 {
        return None;
    }
    let int = |d: Decimal| -> Option<i128> {
        let m = d.mantissa();
        (m >= 0)
            .then_some(m)?
            .checked_mul(10i128.checked_pow(scale - d.scale())?)
    };
    let w: Vec<i128> = weights.iter().map(|d| int(*d)).collect::<Option<_>>()?;
    let (t, u) = (int(total)?, int(unit)?);
    let sum = w.iter().try_fold(0i128, |a, b| a.checked_add(*b))?;
    let back = |v: i128| Decimal::from_i128_with_scale(v, scale);
    if sum == 0 || t == 0 || u == 0 {
        return Some(vec![Decimal::ZERO; weights.len()]);
    }
    let den = sum.checked_mul(u)?;
    let mut shares = Vec::with_capacity(w.len());
    for wi in &w {
        shares.push(t.checked_mul(*wi)? / den * u);
    }
    let mut left = t - shares.iter().sum::<i128>();
    if left > 0 {
        let mut order: Vec<usize> = (0..w.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(w[i] - shares[i]));
        for i in order {
            if left <= 0 {
                break;
            }
            let room = (w[i] - shares[i]) / u * u;
            let add = left.min(room);
            shares[i] += add;
            left -= add;
        }
    }
    if left > 0
        && let Some(i) = (0..w.len()).max_by(|&a, &b| w[a].cmp(&w[b]))
    {
        shares[i] += left;
    }
    Some(shares.into_iter().map(back).collect())
}

fn spread_decimal(total: Decimal, weights: &[Decimal], unit: Decimal) -> Vec<Decimal> {
    let sum: Decimal = weights.iter().copied().sum();
    if sum.is_zero() || total.is_zero() {
        return vec![Decimal::ZERO; weights.len()];
    }
    // total × w ÷ sum; when the product would overflow, the share is taken first.
    let mut shares: Vec<Decimal> = weights
        .iter()
        .map(|w| {
            let share = total
                .checked_mul(*w)
                .map_or_else(|| total * (*w / sum), |x| x / sum);
            (share / unit).floor() * unit
        })
        .collect();
    let mut left = total - shares.iter().copied().sum::<Decimal>();
    if left > Decimal::ZERO {
        let mut order: Vec<usize> = (0..weights.len()).collect();
        order.sort_by(|&a, &b| (weights[b] - shares[b]).cmp(&(weights[a] - shares[a])));
        for i in order {
            if left <= Decimal::ZERO {
                break;
            }
            let room = ((weights[i] - shares[i]) / unit).floor() * unit;
            let add = left.min(room);
            shares[i] += add;
            left -= add;
        }
    }
    // Rounding of fractional weights can leave less than one unit per slot unplaced; the
    // largest slot takes it so the shares always add up to the total.
    if left > Decimal::ZERO
        && let Some(i) = (0..weights.len()).max_by(|&a, &b| weights[a].cmp(&weights[b]))
    {
        shares[i] += left;
    }
    shares
}

fn label(c: &Campaign) -> &str {
    if c.name.is_empty() {
        &c.campaign_id
    } else {
        &c.name
    }
}

fn remaining(counters: &Counters, counter: &str, limit: i64) -> i64 {
    limit - counters.get(counter).copied().unwrap_or(0)
}

/// Whether a campaign may take part in this receipt at all, and why not.
fn target(e: &Entry, receipt: &Receipt, s: &Situation) -> Option<Why> {
    let c = &e.campaign;
    use SkipReason as R;
    let t = &c.targeting;
    if t.start.is_some_and(|start| s.now < start) {
        return Some((R::OutsideWindow, "the campaign has not started".into()));
    }
    if t.end.is_some_and(|end| s.now >= end) {
        return Some((R::OutsideWindow, "the campaign has ended".into()));
    }
    if !t.days_of_week.is_empty() && !t.days_of_week.contains(&s.local.weekday) {
        return Some((R::WrongDayOrHour, "not on this weekday (store time)".into()));
    }
    if (t.start_hour, t.end_hour) != (0, 0) && !(t.start_hour..t.end_hour).contains(&s.local.hour) {
        return Some((
            R::WrongDayOrHour,
            format!(
                "runs {}:00 to {}:00 store time, now {}:00",
                t.start_hour, t.end_hour, s.local.hour
            )
            .into(),
        ));
    }
    if !t.store_ids.is_empty() && !t.store_ids.contains(&receipt.store_id) {
        return Some((R::WrongStore, "not in this store".into()));
    }
    if !t.brands.is_empty() && !t.brands.iter().any(|b| b == s.store_brand) {
        return Some((R::WrongStore, "not in stores of this brand".into()));
    }
    if !t.channels.is_empty() && !t.channels.contains(&receipt.channel) {
        return Some((R::WrongChannel, "not in this channel".into()));
    }
    let needs_member = t.needs_member()
        || c.member_limit > 0
        || c.control_group_percent > 0
        || matches!(
            c.mechanic,
            Mechanic::AccrualBoost { .. }
                | Mechanic::BirthdayBoost { .. }
                | Mechanic::FixedBonus { .. }
        );
    let member = s.member;
    if needs_member && member.is_none() {
        return Some((
            R::MemberRequired,
            "applies to identified members only".into(),
        ));
    }
    if let Some(m) = member {
        if held_out(&c.campaign_id, &m.member_id, c.control_group_percent) {
            return Some((
                R::ControlGroup,
                format!(
                    "member is in the {}% control group",
                    c.control_group_percent
                )
                .into(),
            ));
        }
        if !t.segment_ids.is_empty() {
            let segments = s.profile.map_or(&[][..], |p| p.segments.as_slice());
            if !t.segment_ids.iter().any(|id| segments.contains(id)) {
                return Some((R::NotInSegment, "member is in none of the segments".into()));
            }
        }
        if !t.tier_ids.is_empty() && !t.tier_ids.contains(&m.tier_id) {
            return Some((R::WrongTier, "the member's tier is not targeted".into()));
        }
        for (key, want) in &t.member_attributes {
            let have = s.profile.and_then(|p| p.attributes.get(key));
            if have != Some(want) {
                return Some((
                    R::MemberAttributes,
                    format!("member attribute {key:?} is not {want:?}").into(),
                ));
            }
        }
        if let Mechanic::BirthdayBoost {
            days_before,
            days_after,
            ..
        } = c.mechanic
        {
            match s.profile.and_then(|p| p.birthday) {
                None => return Some((R::OutsideWindow, "member has no birthday on file".into())),
                Some((month, day))
                    if !in_birthday_window(&s.local, month, day, days_before, days_after) =>
                {
                    return Some((R::OutsideWindow, "not within the birthday window".into()));
                }
                Some(_) => {}
            }
        }
        if c.member_limit > 0 {
            let counter = member_counter(
                &c.campaign_id,
                &m.member_id,
                period(&s.local, c.member_limit_period_days),
            );
            if remaining(s.counters, &counter, i64::from(c.member_limit)) <= 0 {
                return Some((
                    R::MemberLimitReached,
                    format!(
                        "member used it {} times in {} days already",
                        c.member_limit, c.member_limit_period_days
                    )
                    .into(),
                ));
            }
        }
    }
    match &c.code {
        None => {}
        Some(CodeRequirement::PromoCode(_))
            if !s
                .codes
                .promo
                .iter()
                .any(|p| Some(p) == e.promo_code.as_ref()) =>
        {
            return Some((R::CodeMissing, "needs its promo code".into()));
        }
        Some(CodeRequirement::PromoCode(_)) => {}
        Some(CodeRequirement::Coupons { .. })
            if !s
                .codes
                .coupons
                .iter()
                .any(|k| k.campaign_id == c.campaign_id) =>
        {
            return Some((R::CodeMissing, "needs one of its coupons".into()));
        }
        Some(CodeRequirement::Coupons { .. }) => {}
    }
    let b = &c.budget;
    if b.max_uses > 0 && remaining(s.counters, &e.uses_counter, b.max_uses) <= 0 {
        return Some((R::BudgetExhausted, "all its uses are spent".into()));
    }
    if let Some(max) = b.max_discount
        && remaining(s.counters, &e.discount_counter, cents(max)) <= 0
    {
        return Some((R::BudgetExhausted, "its discount budget is spent".into()));
    }
    if b.max_points > 0 && remaining(s.counters, &e.points_counter, b.max_points) <= 0 {
        return Some((R::BudgetExhausted, "its points budget is spent".into()));
    }
    None
}

/// The member-limit period the store's local day falls in: periods of `days` whole local
/// days, so a daily limit resets at the store's midnight.
pub fn period(local: &LocalTime, days: u32) -> i64 {
    local.day_number.div_euclid(i64::from(days.max(1)))
}

/// A step reached by `value`, the highest one.
fn step_for(steps: &[Step], value: Decimal) -> Option<&Step> {
    steps.iter().rev().find(|s| value >= s.from)
}

/// Units made free by "buy n, pay m" among the first `x` of the units sorted from the
/// most expensive: in each group of `n`, positions `m..n` are free.
fn free_before(x: i64, n: i64, m: i64) -> i64 {
    (x / n) * (n - m) + (x % n - m).max(0)
}

/// What a discount campaign takes off each line: (line index, amount).
type Plan = Vec<(usize, Decimal)>;

struct Pricing<'a> {
    book: &'a CampaignBook,
    receipt: &'a Receipt,
    lines: Vec<LineResult>,
    covering: Vec<Bits>,
    discountable: Vec<bool>,
    receipt_room: Decimal,
    /// The most discount each line may carry in all (the program's line cap).
    line_caps: Vec<Decimal>,
    rounding: Rounding,
}

impl Pricing<'_> {
    /// Lines a campaign covers and may discount; or why none.
    fn scope_lines(&self, i: usize) -> Result<Vec<usize>, Why> {
        let mut covered = false;
        let mut open = Vec::new();
        for l in 0..self.lines.len() {
            if self.covering[l].get(i) {
                covered = true;
                if self.discountable[l] && self.lines[l].net > Decimal::ZERO {
                    open.push(l);
                }
            }
        }
        if !covered {
            return Err((
                SkipReason::NoMatchingLines,
                "no line matches its products".into(),
            ));
        }
        if open.is_empty() {
            return Err((
                SkipReason::SaleItem,
                "its lines are at a sale price or already free".into(),
            ));
        }
        Ok(open)
    }

    fn percent_of_gross(&self, lines: &[usize], pct: Decimal) -> Vec<(usize, Decimal)> {
        // A percent over 100 is exact in decimal: one division per campaign, not per line.
        let share = pct / Decimal::ONE_HUNDRED;
        lines
            .iter()
            .map(|&l| {
                let d = self
                    .rounding
                    .apply(self.lines[l].gross * share, MONEY_SCALE);
                (l, d)
            })
            .collect()
    }

    fn benefit(&self, lines: &[usize], benefit: Benefit) -> Vec<(usize, Decimal)> {
        match benefit {
            Benefit::Percent(p) => self.percent_of_gross(lines, p),
            Benefit::Amount(a) => {
                let weights: Vec<Decimal> = lines.iter().map(|&l| self.lines[l].net).collect();
                let total: Decimal = weights.iter().copied().sum();
                let shares = spread(a.min(total), &weights, cent());
                lines.iter().copied().zip(shares).collect()
            }
        }
    }

    /// What campaign `i` would take off each line, before caps.
    fn propose(&self, i: usize) -> Result<Vec<(usize, Decimal)>, Why> {
        let c = &self.book.entries[i].campaign;
        let lines = self.scope_lines(i)?;
        let gross_of = |ls: &[usize]| -> Decimal { ls.iter().map(|&l| self.lines[l].gross).sum() };
        match &c.mechanic {
            Mechanic::ThresholdDiscount { steps, .. } => {
                let total = gross_of(&lines);
                let step = step_for(steps, total).ok_or_else(|| {
                    (
                        SkipReason::ThresholdNotReached,
                        format!("the total {total} is below {}", steps[0].from).into(),
                    )
                })?;
                Ok(self.benefit(&lines, step.benefit))
            }
            Mechanic::QuantityDiscount { steps, .. } => {
                let count: Decimal = lines.iter().map(|&l| self.lines[l].quantity).sum();
                let step = step_for(steps, count).ok_or_else(|| {
                    (
                        SkipReason::ThresholdNotReached,
                        format!("{count} items, fewer than {}", steps[0].from).into(),
                    )
                })?;
                Ok(self.benefit(&lines, step.benefit))
            }
            Mechanic::NForM { n, m, .. } => {
                let (n, m) = (i64::from(*n), i64::from(*m));
                let mut runs: Vec<(usize, i64, Decimal)> = lines
                    .iter()
                    .map(|&l| {
                        let r = &self.receipt.lines[l];
                        (l, to_i64(r.quantity.floor()), r.unit_price)
                    })
                    .filter(|(_, units, _)| *units > 0)
                    .collect();
                runs.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
                let units: i64 = runs.iter().map(|r| r.1).sum();
                let full = units / n * n;
                if full == 0 {
                    return Err((
                        SkipReason::ThresholdNotReached,
                        format!("{units} matching items, the offer needs {n}").into(),
                    ));
                }
                let mut at = 0;
                let mut out = Vec::new();
                for (l, count, price) in runs {
                    let (a, b) = (at.min(full), (at + count).min(full));
                    at += count;
                    let free = free_before(b, n, m) - free_before(a, n, m);
                    if free > 0 {
                        out.push((l, price * Decimal::from(free)));
                    }
                }
                Ok(out)
            }
            Mechanic::ExtraDiscount { percent, .. } => Ok(self.percent_of_gross(&lines, *percent)),
            _ => Ok(Vec::new()),
        }
    }

    /// Caps a proposal by each line's room and by the receipt's and group's room.
    fn cap(&self, proposal: Vec<(usize, Decimal)>, group_room: Decimal) -> Vec<(usize, Decimal)> {
        let capped: Vec<(usize, Decimal)> = proposal
            .into_iter()
            .map(|(l, d)| {
                let line = &self.lines[l];
                let cap = self.line_caps[l] - line.discount;
                (l, d.min(cap).min(line.net).max(Decimal::ZERO))
            })
            .collect();
        let total: Decimal = capped.iter().map(|(_, d)| *d).sum();
        let room = self.receipt_room.min(group_room).max(Decimal::ZERO);
        if total <= room {
            return capped;
        }
        let weights: Vec<Decimal> = capped.iter().map(|(_, d)| *d).collect();
        let shares = spread(room, &weights, cent());
        capped.into_iter().map(|(l, _)| l).zip(shares).collect()
    }

    fn apply(&mut self, i: usize, discounts: &[(usize, Decimal)]) -> Decimal {
        let mut total = Decimal::ZERO;
        for (l, d) in discounts {
            if d.is_zero() {
                continue;
            }
            let line = &mut self.lines[*l];
            line.discount += *d;
            line.net -= *d;
            line.effects.push(Effect {
                campaign_id: self.book.entries[i].id.clone(),
                description: self.book.entries[i].description.clone(),
                discount: *d,
                points: 0,
            });
            total += *d;
        }
        self.receipt_room -= total;
        total
    }
}

/// Accrual rate of a line: the base (or tier) rate, raised by the best campaign covering it.
fn rate_for(
    book: &CampaignBook,
    boosts: &[usize],
    covering: &Bits,
    base: Decimal,
) -> (Decimal, Option<usize>) {
    let mut best = (base, None);
    for &i in boosts {
        if !covering.get(i) {
            continue;
        }
        let rate = match &book.entries[i].campaign.mechanic {
            Mechanic::AccrualBoost {
                percent: Some(p), ..
            } => *p,
            Mechanic::AccrualBoost {
                multiplier: Some(x),
                ..
            } => base * *x,
            Mechanic::BirthdayBoost { percent, .. } => *percent,
            _ => continue,
        };
        if rate > best.0 {
            best = (rate, Some(i));
        }
    }
    best
}

/// Evaluates `receipt` under `program` and the campaigns of `book`.
pub fn evaluate(
    program: &Program,
    book: &CampaignBook,
    receipt: &Receipt,
    s: &Situation,
) -> Evaluation {
    // One span per rule evaluation when tracing is on; nothing otherwise.
    let _span = loyalty_platform::telemetry::work_span("promotion.evaluate").entered();
    let n = book.entries.len();
    let mut skip: Vec<Option<Why>> = book.entries.iter().map(|e| target(e, receipt, s)).collect();
    let lines: Vec<LineResult> = receipt
        .lines
        .iter()
        .map(|l| {
            let gross = money(l.quantity * l.unit_price);
            LineResult {
                line_id: l.line_id.clone(),
                sku: l.sku.clone(),
                quantity: l.quantity,
                gross,
                discount: Decimal::ZERO,
                net: gross,
                paid_with_points: Decimal::ZERO,
                points_redeemed: 0,
                points_accrued: 0,
                max_payable_with_points: Decimal::ZERO,
                base_percent: Decimal::ZERO,
                accrual_percent: Decimal::ZERO,
                accrual_campaign_id: base_program(),
                bonus_points: Vec::new(),
                effects: Vec::new(),
                notes: Vec::new(),
            }
        })
        .collect();
    let gross_total: Decimal = lines.iter().map(|l| l.gross).sum();
    let lines_gross: Vec<Decimal> = lines.iter().map(|l| l.gross).collect();
    let empty = LineInfo::default();
    let covering: Vec<Bits> = receipt
        .lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let info = s.lines.get(i).unwrap_or(&empty);
            book.covering(&l.sku, &info.category, &info.brand)
        })
        .collect();
    let mut pricing = Pricing {
        book,
        receipt,
        discountable: receipt
            .lines
            .iter()
            .map(|l| !(l.sale_price && program.sale_excluded_from_discounts))
            .collect(),
        lines,
        covering,
        receipt_room: money_down(
            gross_total * program.max_receipt_discount_percent / Decimal::ONE_HUNDRED,
        ),
        line_caps: lines_gross
            .iter()
            .map(|g| {
                if program.max_line_discount_percent == Decimal::ONE_HUNDRED {
                    *g
                } else {
                    money_down(*g * program.max_line_discount_percent / Decimal::ONE_HUNDRED)
                }
            })
            .collect(),
        rounding: program.discount_rounding,
    };

    // Discounts, group by group. Campaigns of other kinds are chosen here too (exclusive
    // groups weigh every kind against the others) and applied further down.
    let mut selected = vec![false; n];
    let mut given = vec![Decimal::ZERO; n];
    let point_money =
        |points: Decimal| points * program.point_value / Decimal::from(program.point_minor_units);
    for group in &book.groups {
        let mut group_room = group.max_discount_percent.map_or(Decimal::MAX, |p| {
            money_down(gross_total * p / Decimal::ONE_HUNDRED)
        });
        let open: Vec<usize> = group
            .members
            .iter()
            .copied()
            .filter(|&i| skip[i].is_none())
            .collect();
        match group.mode {
            StackingMode::Stackable => {
                for i in open {
                    let c = &book.entries[i].campaign;
                    if !c.mechanic.is_discount() {
                        selected[i] = true;
                        continue;
                    }
                    match pricing.propose(i) {
                        Err(why) => skip[i] = Some(why),
                        Ok(p) => {
                            let raw: Decimal = p.iter().map(|(_, d)| *d).sum();
                            let capped = pricing.cap(p, group_room);
                            let total: Decimal = capped.iter().map(|(_, d)| *d).sum();
                            if let Some(why) =
                                budget_refusal(&book.entries[i], s.counters, total, 0)
                            {
                                skip[i] = Some(why);
                            } else if total.is_zero() {
                                skip[i] = Some(cap_reason(raw));
                            } else {
                                given[i] = pricing.apply(i, &capped);
                                group_room -= given[i];
                            }
                        }
                    }
                }
            }
            StackingMode::ExclusiveFirst | StackingMode::ExclusiveBest => {
                // Weigh each candidate: discount money, or points at their money value.
                let mut best: Option<(usize, Decimal, Plan)> = None;
                for &i in &open {
                    let c = &book.entries[i].campaign;
                    let (value, plan) = if c.mechanic.is_discount() {
                        match pricing.propose(i) {
                            Err(why) => {
                                skip[i] = Some(why);
                                continue;
                            }
                            Ok(p) => {
                                let raw: Decimal = p.iter().map(|(_, d)| *d).sum();
                                let capped = pricing.cap(p, group_room);
                                let total: Decimal = capped.iter().map(|(_, d)| *d).sum();
                                if let Some(why) =
                                    budget_refusal(&book.entries[i], s.counters, total, 0)
                                {
                                    skip[i] = Some(why);
                                    continue;
                                }
                                if total.is_zero() {
                                    skip[i] = Some(cap_reason(raw));
                                    continue;
                                }
                                (total, capped)
                            }
                        }
                    } else {
                        let points = estimate_points(program, &pricing, i, s);
                        if points <= 0 {
                            skip[i] = Some((
                                SkipReason::NoMatchingLines,
                                "would earn no points on this receipt".into(),
                            ));
                            continue;
                        }
                        // A candidate its budget would refuse must not win the group.
                        if let Some(why) =
                            budget_refusal(&book.entries[i], s.counters, Decimal::ZERO, points)
                        {
                            skip[i] = Some(why);
                            continue;
                        }
                        (point_money(Decimal::from(points)), Vec::new())
                    };
                    let better = match &best {
                        None => true,
                        Some((_, v, _)) => group.mode == StackingMode::ExclusiveBest && value > *v,
                    };
                    if better {
                        best = Some((i, value, plan));
                    }
                    if group.mode == StackingMode::ExclusiveFirst {
                        break;
                    }
                }
                if let Some((winner, _, plan)) = best {
                    let wc = &book.entries[winner].campaign;
                    // One text for every campaign the winner excluded.
                    let mut excluded: Option<String> = None;
                    for &i in &open {
                        if i != winner && skip[i].is_none() {
                            let why = excluded.get_or_insert_with(|| {
                                format!(
                                    "only one campaign of group {:?} applies: {}",
                                    group.group_id,
                                    label(wc)
                                )
                            });
                            skip[i] = Some((SkipReason::ExcludedByStacking, why.clone().into()));
                        }
                    }
                    if wc.mechanic.is_discount() {
                        given[winner] = pricing.apply(winner, &plan);
                    } else {
                        selected[winner] = true;
                    }
                }
            }
        }
    }
    let Pricing {
        mut lines,
        covering,
        ..
    } = pricing;
    let net: Decimal = lines.iter().map(|l| l.net).sum();

    // Points payment.
    let member = s.member;
    let max_redeemable = pay_with_points(program, receipt, &mut lines, member, net);

    // Accrual: the best rate each line earns; a campaign over its points budget drops out.
    let base_percent = base_rate(program, member);
    let accruable: Vec<bool> = receipt
        .lines
        .iter()
        .map(|l| !(l.sale_price && program.sale_excluded_from_accrual))
        .collect();
    let mut campaign_points = vec![0i64; n];
    let mut effects = Vec::new();
    let mut points_accrued = 0;
    let mut winners: Vec<Option<usize>> = vec![None; lines.len()];
    if member.is_some() {
        loop {
            // The accrual campaigns still chosen.
            let boosts: Vec<usize> = (0..n)
                .filter(|&i| selected[i] && book.entries[i].campaign.mechanic.is_accrual())
                .collect();
            for (l, line) in lines.iter_mut().enumerate() {
                line.base_percent = base_percent;
                line.accrual_percent = base_percent;
                line.accrual_campaign_id = base_program();
                winners[l] = None;
                if !accruable[l] {
                    continue;
                }
                let (rate, winner) = rate_for(book, &boosts, &covering[l], base_percent);
                if let Some(i) = winner {
                    winners[l] = Some(i);
                    line.accrual_percent = rate;
                    line.accrual_campaign_id = book.entries[i].id.clone();
                }
            }
            effects.clear();
            points_accrued = accrue(
                program,
                receipt,
                &mut lines,
                member,
                &accruable,
                &mut effects,
            );
            // What each boost gave, from the lines' effects.
            campaign_points.iter_mut().for_each(|p| *p = 0);
            for (line, winner) in lines.iter().zip(&winners) {
                if let Some(i) = winner {
                    let points = line
                        .effects
                        .iter()
                        .filter(|x| !x.campaign_id.is_empty())
                        .fold(0i64, |t, x| t.saturating_add(x.points));
                    campaign_points[*i] = campaign_points[*i].saturating_add(points);
                }
            }
            let over = (0..n).find(|&i| {
                campaign_points[i] > 0
                    && budget_refusal(
                        &book.entries[i],
                        s.counters,
                        Decimal::ZERO,
                        campaign_points[i],
                    )
                    .is_some()
            });
            match over {
                Some(i) => {
                    selected[i] = false;
                    skip[i] = Some((
                        SkipReason::BudgetExhausted,
                        "its points budget cannot cover this receipt".into(),
                    ));
                }
                None => break,
            }
        }
    } else {
        accrue(
            program,
            receipt,
            &mut lines,
            member,
            &accruable,
            &mut effects,
        );
    }

    // Campaigns chosen for accrual that raised no line explain why.
    for i in 0..n {
        let c = &book.entries[i].campaign;
        if selected[i] && c.mechanic.is_accrual() && campaign_points[i] == 0 && skip[i].is_none() {
            let covered = (0..lines.len()).any(|l| covering[l].get(i));
            let accrues = (0..lines.len()).any(|l| covering[l].get(i) && accruable[l]);
            skip[i] = Some(if !covered {
                (
                    SkipReason::NoMatchingLines,
                    "no line matches its products".into(),
                )
            } else if !accrues {
                (
                    SkipReason::SaleItem,
                    "its lines are at a sale price and accrue nothing".into(),
                )
            } else {
                (
                    SkipReason::ExcludedByStacking,
                    "a higher accrual rate applied".into(),
                )
            });
            selected[i] = false;
        }
    }

    // Fixed bonuses, each its own lot, spread over the lines for refunds.
    let activate_at = s.now + i64::from(program.activation_delay_days) * DAY_MS;
    let expire_at = (program.point_lifetime_days > 0).then(|| {
        end_of_local_day(
            activate_at + i64::from(program.point_lifetime_days) * DAY_MS,
            s.time_zone,
        )
    });
    let mut bonuses = Vec::new();
    if member.is_some() {
        for i in 0..n {
            let c = &book.entries[i].campaign;
            let Mechanic::FixedBonus {
                points,
                activation_delay_days,
                lifetime_days,
            } = c.mechanic
            else {
                continue;
            };
            if !selected[i] {
                continue;
            }
            if let Some(why) = budget_refusal(&book.entries[i], s.counters, Decimal::ZERO, points) {
                skip[i] = Some(why);
                selected[i] = false;
                continue;
            }
            let activate = s.now + i64::from(activation_delay_days) * DAY_MS;
            let lifetime = if lifetime_days > 0 {
                i64::from(lifetime_days)
            } else {
                i64::from(program.point_lifetime_days)
            };
            bonuses.push(Bonus {
                campaign_id: c.campaign_id.clone(),
                points,
                activate_at: activate,
                expire_at: (lifetime > 0)
                    .then(|| end_of_local_day(activate + lifetime * DAY_MS, s.time_zone)),
            });
            campaign_points[i] = points;
            let weights: Vec<Decimal> = lines.iter().map(|l| l.net.max(Decimal::ZERO)).collect();
            let weights = if weights.iter().all(|w| w.is_zero()) {
                vec![Decimal::ONE; lines.len()]
            } else {
                weights
            };
            let total: Decimal = weights.iter().copied().sum();
            let scaled: Vec<Decimal> = weights
                .iter()
                .map(|w| *w / total * Decimal::from(points))
                .collect();
            for (line, share) in
                lines
                    .iter_mut()
                    .zip(spread(Decimal::from(points), &scaled, Decimal::ONE))
            {
                line.bonus_points.push(to_i64(share));
            }
            effects.push(Effect {
                campaign_id: book.entries[i].id.clone(),
                description: format!("{}: {} bonus points", label(c), points).into(),
                discount: Decimal::ZERO,
                points,
            });
        }
    }

    // Receipt-level effects and claims of every campaign that gave something.
    let mut claims = Vec::new();
    for i in 0..n {
        let c = &book.entries[i].campaign;
        let discount = given[i];
        let points = campaign_points[i];
        if discount.is_zero() && points == 0 {
            continue;
        }
        if c.mechanic.is_discount() {
            effects.push(Effect {
                campaign_id: book.entries[i].id.clone(),
                description: book.entries[i].description.clone(),
                discount,
                points: 0,
            });
        } else if c.mechanic.is_accrual() {
            effects.push(Effect {
                campaign_id: book.entries[i].id.clone(),
                description: book.entries[i].description.clone(),
                discount: Decimal::ZERO,
                points,
            });
        }
        claims.extend(campaign_claims(&book.entries[i], s, discount, points));
    }
    let skipped = skip
        .into_iter()
        .enumerate()
        .filter_map(|(i, why)| {
            why.map(|(reason, description)| Skipped {
                campaign_id: book.entries[i].id.clone(),
                reason,
                description,
            })
        })
        .collect();
    let paid_with_points: Decimal = lines.iter().map(|l| l.paid_with_points).sum();
    let points_redeemed: i64 = lines.iter().map(|l| l.points_redeemed).sum();
    Evaluation {
        gross: gross_total,
        discount: lines.iter().map(|l| l.discount).sum(),
        net,
        amount_due: net - paid_with_points,
        paid_with_points,
        points_redeemed,
        points_accrued,
        activate_at,
        expire_at,
        bonuses,
        max_redeemable_points: max_redeemable,
        effects,
        skipped,
        claims,
        member: member.cloned(),
        program_version: program.version,
        campaigns_version: book.version,
        velocity_flags: Vec::new(),
        lines,
    }
}

fn cap_reason(raw: Decimal) -> Why {
    if raw.is_zero() {
        (
            SkipReason::NoMatchingLines,
            "gives nothing on these lines".into(),
        )
    } else {
        (
            SkipReason::CapReached,
            "the discount caps are reached".into(),
        )
    }
}

/// Why a campaign cannot give `discount` and `points` more, if its budget says so.
fn budget_refusal(e: &Entry, counters: &Counters, discount: Decimal, points: i64) -> Option<Why> {
    let c = &e.campaign;
    if let Some(max) = c.budget.max_discount
        && cents(discount) > remaining(counters, &e.discount_counter, cents(max))
    {
        return Some((
            SkipReason::BudgetExhausted,
            "its discount budget cannot cover this receipt".into(),
        ));
    }
    if c.budget.max_points > 0
        && points > remaining(counters, &e.points_counter, c.budget.max_points)
    {
        return Some((
            SkipReason::BudgetExhausted,
            "its points budget cannot cover this receipt".into(),
        ));
    }
    None
}

fn campaign_claims(e: &Entry, s: &Situation, discount: Decimal, points: i64) -> Vec<Claim> {
    let c = &e.campaign;
    let id = &c.campaign_id;
    let mut claims = Vec::new();
    if c.budget.max_uses > 0 {
        claims.push(Claim {
            counter: e.uses_counter.clone(),
            amount: 1,
            limit: c.budget.max_uses,
        });
    }
    if let Some(max) = c.budget.max_discount {
        claims.push(Claim {
            counter: e.discount_counter.clone(),
            amount: cents(discount),
            limit: cents(max),
        });
    }
    if c.budget.max_points > 0 {
        claims.push(Claim {
            counter: e.points_counter.clone(),
            amount: points,
            limit: c.budget.max_points,
        });
    }
    if c.member_limit > 0
        && let Some(m) = s.member
    {
        claims.push(Claim {
            counter: member_counter(
                id,
                &m.member_id,
                period(&s.local, c.member_limit_period_days),
            ),
            amount: 1,
            limit: i64::from(c.member_limit),
        });
    }
    if let Some(coupon) = s.codes.coupons.iter().find(|k| &k.campaign_id == id) {
        claims.push(Claim {
            counter: coupon_counter(&coupon.code),
            amount: 1,
            limit: i64::from(coupon.max_uses),
        });
    }
    claims
}

/// Points an accrual or bonus campaign would give on the lines as they stand (for weighing
/// it against discounts in an exclusive group).
fn estimate_points(program: &Program, pricing: &Pricing, i: usize, s: &Situation) -> i64 {
    let c = &pricing.book.entries[i].campaign;
    let base = base_rate(program, s.member);
    let minor = Decimal::from(program.point_minor_units);
    let rate = match &c.mechanic {
        Mechanic::FixedBonus { points, .. } => return *points,
        Mechanic::AccrualBoost {
            percent: Some(p), ..
        } => *p,
        Mechanic::AccrualBoost {
            multiplier: Some(x),
            ..
        } => base * *x,
        Mechanic::BirthdayBoost { percent, .. } => *percent,
        _ => return 0,
    };
    let extra = (rate - base).max(Decimal::ZERO);
    let paid: Decimal = pricing
        .lines
        .iter()
        .enumerate()
        .filter(|(l, _)| {
            pricing.covering[*l].get(i)
                && !(pricing.receipt.lines[*l].sale_price && program.sale_excluded_from_accrual)
        })
        .map(|(_, line)| line.net)
        .sum();
    to_i64((paid * extra / Decimal::ONE_HUNDRED / program.point_value * minor).floor())
}

/// The member's base accrual percent: the tier's rate, or the program's percent (0 for a
/// fixed-points program, whose points come per receipt).
fn base_rate(program: &Program, member: Option<&MemberContext>) -> Decimal {
    if let Some(m) = member
        && !m.tier_id.is_empty()
        && let Some(t) = program.tiers.iter().find(|t| t.tier_id == m.tier_id)
    {
        return t.accrual_percent;
    }
    match program.accrual {
        BaseAccrual::Percent(p) => p,
        BaseAccrual::FixedPoints(_) => Decimal::ZERO,
    }
}

/// Points payment: the cap is a share of the receipt, only eligible lines can take it, and
/// a minimum may have to be paid in money. Returns the most points the member could redeem.
fn pay_with_points(
    program: &Program,
    receipt: &Receipt,
    lines: &mut [LineResult],
    member: Option<&MemberContext>,
    net: Decimal,
) -> i64 {
    let minor = Decimal::from(program.point_minor_units);
    let eligible: Vec<Decimal> = receipt
        .lines
        .iter()
        .zip(lines.iter_mut())
        .map(|(raw, line)| {
            line.paid_with_points = Decimal::ZERO;
            line.points_redeemed = 0;
            if raw.sale_price && program.sale_excluded_from_redemption {
                let note = "sale item: cannot be paid with points";
                if !line.notes.iter().any(|n| n == note) {
                    line.notes.push(note.into());
                }
                Decimal::ZERO
            } else {
                line.net
            }
        })
        .collect();
    let eligible_total: Decimal = eligible.iter().copied().sum();
    let cap = money_down(net * program.max_redeem_percent / Decimal::ONE_HUNDRED)
        .min(eligible_total)
        .min((net - program.min_paid_amount).max(Decimal::ZERO));
    for (line, e) in lines.iter_mut().zip(&eligible) {
        line.max_payable_with_points = (*e).min(cap);
    }
    let cap_points = to_i64((cap / program.point_value * minor).floor());
    let max_redeemable = member.map_or(0, |m| cap_points.min(m.points_available.max(0)));
    let requested = receipt.points_to_redeem.min(max_redeemable);
    // Money is paid in whole cents: charge only the points those cents are worth.
    let paid_with_points = money_down(Decimal::from(requested) * program.point_value / minor);
    let points_redeemed =
        to_i64((paid_with_points / program.point_value * minor).floor()).min(requested);
    if points_redeemed == 0 && paid_with_points.is_zero() {
        return max_redeemable;
    }
    let money_shares = spread(paid_with_points, &eligible, cent());
    // Points are spread by the same eligibility, in point units.
    let point_weights: Vec<Decimal> = eligible
        .iter()
        .map(|e| *e / program.point_value * minor)
        .collect();
    let point_shares = spread(Decimal::from(points_redeemed), &point_weights, Decimal::ONE);
    for ((line, m), p) in lines.iter_mut().zip(money_shares).zip(point_shares) {
        line.paid_with_points = m;
        line.points_redeemed = to_i64(p);
    }
    max_redeemable
}

/// Accrues the main lot at each line's rate (set in `base_percent`, `accrual_percent` and
/// `accrual_campaign_id`) on what it pays in money, or the program's fixed points. Fills
/// the lines' accrual effects and the receipt's base effect; returns the lot's points.
fn accrue(
    program: &Program,
    receipt: &Receipt,
    lines: &mut [LineResult],
    member: Option<&MemberContext>,
    accruable: &[bool],
    effects: &mut Vec<Effect>,
) -> i64 {
    lines.iter_mut().for_each(|l| {
        l.points_accrued = 0;
        l.effects.retain(|e| e.points == 0);
    });
    if member.is_none() {
        return 0;
    }
    let minor = Decimal::from(program.point_minor_units);
    // Points = paid × rate% ÷ point value, in minor units: one division per line and rate.
    let denominator = program.point_value * Decimal::ONE_HUNDRED;
    let points_at = |paid: Decimal, rate: Decimal| -> i64 {
        if rate.is_zero() || paid.is_zero() {
            return 0;
        }
        to_i64(
            program
                .accrual_rounding
                .apply(paid * rate * minor / denominator, 0),
        )
    };
    let mut described: Option<(Decimal, Text)> = None;
    let mut raised: Vec<(Decimal, Text)> = Vec::new();
    let mut base_total = 0i64;
    let mut total = 0i64;
    for (l, line) in lines.iter_mut().enumerate() {
        if !accruable[l] {
            let note = "sale item: no accrual";
            if !line.notes.iter().any(|n| n == note) {
                line.notes.push(note.into());
            }
            continue;
        }
        let paid = line.net - line.paid_with_points;
        let base = points_at(paid, line.base_percent);
        let all = if line.accrual_percent == line.base_percent {
            base
        } else {
            points_at(paid, line.accrual_percent).max(base)
        };
        if base > 0 {
            let description = match &described {
                Some((rate, text)) if *rate == line.base_percent => text.clone(),
                _ => {
                    let text =
                        Text::from(format!("base accrual {}%", line.base_percent.normalize()));
                    described = Some((line.base_percent, text.clone()));
                    text
                }
            };
            line.effects.push(Effect {
                campaign_id: base_program(),
                description,
                discount: Decimal::ZERO,
                points: base,
            });
        }
        if all > base {
            let description = match raised.iter().find(|(r, _)| *r == line.accrual_percent) {
                Some((_, text)) => text.clone(),
                None => {
                    let text = Text::from(format!(
                        "accrual raised to {}%",
                        line.accrual_percent.normalize()
                    ));
                    raised.push((line.accrual_percent, text.clone()));
                    text
                }
            };
            line.effects.push(Effect {
                campaign_id: line.accrual_campaign_id.clone(),
                description,
                discount: Decimal::ZERO,
                points: all - base,
            });
        }
        line.points_accrued = all;
        base_total = base_total.saturating_add(base);
        total = total.saturating_add(all);
    }
    if let BaseAccrual::FixedPoints(points) = program.accrual {
        let paid: Vec<Decimal> = receipt
            .lines
            .iter()
            .zip(lines.iter())
            .enumerate()
            .map(|(l, (_, line))| {
                if accruable[l] {
                    line.net - line.paid_with_points
                } else {
                    Decimal::ZERO
                }
            })
            .collect();
        let sum: Decimal = paid.iter().copied().sum();
        if sum > Decimal::ZERO && points > 0 {
            // Spread over the lines by what they paid, so refunds take it back per line.
            let weights: Vec<Decimal> = paid
                .iter()
                .map(|p| *p / sum * Decimal::from(points))
                .collect();
            let shares = spread(Decimal::from(points), &weights, Decimal::ONE);
            for (line, share) in lines.iter_mut().zip(shares) {
                let share = to_i64(share);
                if share > 0 {
                    line.points_accrued += share;
                    line.effects.push(Effect {
                        campaign_id: base_program(),
                        description: "base accrual: fixed points per receipt".into(),
                        discount: Decimal::ZERO,
                        points: share,
                    });
                }
            }
            effects.push(Effect {
                campaign_id: base_program(),
                description: "base accrual: fixed points per receipt".into(),
                discount: Decimal::ZERO,
                points,
            });
            total = total.saturating_add(points);
        }
    }
    if base_total > 0 {
        let rate = lines
            .first()
            .map_or(Decimal::ZERO, |l| l.base_percent)
            .normalize();
        effects.insert(
            0,
            Effect {
                campaign_id: base_program(),
                description: format!("base accrual {rate}% of the amount paid in money").into(),
                discount: Decimal::ZERO,
                points: base_total,
            },
        );
    }
    total
}

/// Prices a stored evaluation again with only `available` points to redeem, keeping its
/// discounts, rates and bonuses: what a commit does when the balance moved since its
/// evaluation. Campaign points never grow, so the budgets claimed stay enough.
pub fn reprice(
    program: &Program,
    receipt: &Receipt,
    stored: &Evaluation,
    available: i64,
) -> Evaluation {
    let mut e = stored.clone();
    let Some(member) = stored.member.clone() else {
        return e;
    };
    let mut ctx = member.clone();
    ctx.points_available = available;
    let before: Vec<i64> = stored
        .lines
        .iter()
        .map(|l| {
            l.effects
                .iter()
                .filter(|x| !x.campaign_id.is_empty())
                .map(|x| x.points)
                .sum()
        })
        .collect();
    let max_redeemable = pay_with_points(program, receipt, &mut e.lines, Some(&ctx), e.net);
    let accruable: Vec<bool> = receipt
        .lines
        .iter()
        .map(|l| !(l.sale_price && program.sale_excluded_from_accrual))
        .collect();
    let mut effects: Vec<Effect> = Vec::new();
    e.points_accrued = accrue(
        program,
        receipt,
        &mut e.lines,
        Some(&ctx),
        &accruable,
        &mut effects,
    );
    // Hold each line's campaign points at most at what was claimed.
    for (line, cap) in e.lines.iter_mut().zip(before) {
        let mut over = line
            .effects
            .iter()
            .filter(|x| !x.campaign_id.is_empty())
            .map(|x| x.points)
            .sum::<i64>()
            - cap;
        if over > 0 {
            for x in line
                .effects
                .iter_mut()
                .filter(|x| !x.campaign_id.is_empty() && x.points > 0)
            {
                let cut = over.min(x.points);
                x.points -= cut;
                line.points_accrued -= cut;
                e.points_accrued -= cut;
                over -= cut;
            }
        }
    }
    // Receipt-level effects: the base ones anew, each boost's points as its lines add up.
    e.effects.retain(|x| !x.campaign_id.is_empty());
    let bonus_ids: Vec<String> = e.bonuses.iter().map(|b| b.campaign_id.clone()).collect();
    for x in e.effects.iter_mut() {
        if x.points > 0 && !bonus_ids.iter().any(|b| **b == *x.campaign_id) {
            x.points = e
                .lines
                .iter()
                .flat_map(|l| l.effects.iter())
                .filter(|y| y.campaign_id == x.campaign_id)
                .map(|y| y.points)
                .sum();
        }
    }
    for x in effects.into_iter().rev() {
        e.effects.insert(0, x);
    }
    e.paid_with_points = e.lines.iter().map(|l| l.paid_with_points).sum();
    e.points_redeemed = e.lines.iter().map(|l| l.points_redeemed).sum();
    e.amount_due = e.net - e.paid_with_points;
    e.max_redeemable_points = max_redeemable;
    e.member = Some(member);
    e
}

#[cfg(test)]
mod tests {
    use loyalty_platform::types::Channel;
    use proptest::prelude::*;

    use super::*;
    use crate::receipt::{Identification, Line};

    fn receipt(lines: &[(&str, &str, bool)], points: i64) -> Receipt {
        Receipt {
            tenant_id: "t".into(),
            receipt_id: "r".into(),
            store_id: "s".into(),
            channel: Channel::Store,
            terminal_id: String::new(),
            cashier_id: String::new(),
            identification: Identification::Card("1".into()),
            lines: lines
                .iter()
                .enumerate()
                .map(|(i, (q, p, sale))| Line {
                    line_id: i.to_string(),
                    sku: "sku".into(),
                    quantity: q.parse().unwrap(),
                    unit_price: p.parse().unwrap(),
                    sale_price: *sale,
                })
                .collect(),
            codes: Vec::new(),
            points_to_redeem: points,
            purchase_time: None,
        }
    }

    fn member(points: i64) -> MemberContext {
        MemberContext {
            member_id: "m".into(),
            points_available: points,
            tier_id: String::new(),
        }
    }

    /// Evaluates under the program alone, no campaigns.
    fn evaluate(p: &Program, r: &Receipt, m: Option<&MemberContext>, now: Millis) -> Evaluation {
        let infos = vec![LineInfo::default(); r.lines.len()];
        let s = Situation {
            store_brand: "",
            local: LocalTime::at(now, ""),
            time_zone: "",
            lines: &infos,
            member: m,
            profile: None,
            codes: &Codes::default(),
            counters: &Counters::default(),
            now,
        };
        super::evaluate(p, &CampaignBook::default(), r, &s)
    }

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn one_percent_base_accrual() {
        let p = Program::case_study("t", "KZT");
        let e = evaluate(
            &p,
            &receipt(&[("2", "1500.00", false)], 0),
            Some(&member(0)),
            0,
        );
        assert_eq!(e.net, d("3000.00"));
        // 1% of 3000 = 30 points = 3000 minor units.
        assert_eq!(e.points_accrued, 3000);
        assert_eq!(e.expire_at, Some(180 * DAY_MS));
    }

    #[test]
    fn points_pay_at_most_twenty_percent_and_accrual_skips_that_part() {
        let p = Program::case_study("t", "KZT");
        let e = evaluate(
            &p,
            &receipt(&[("1", "1000.00", false)], 1_000_000),
            Some(&member(1_000_000)),
            0,
        );
        assert_eq!(e.max_redeemable_points, 20_000, "20% of 1000 = 200 points");
        assert_eq!(e.points_redeemed, 20_000);
        assert_eq!(e.paid_with_points, d("200.00"));
        assert_eq!(e.amount_due, d("800.00"));
        assert_eq!(e.points_accrued, 800, "1% of the 800 paid in money");
    }

    #[test]
    fn redemption_is_limited_by_the_balance() {
        let p = Program::case_study("t", "KZT");
        let e = evaluate(
            &p,
            &receipt(&[("1", "1000.00", false)], 50_000),
            Some(&member(5_000)),
            0,
        );
        assert_eq!(e.max_redeemable_points, 5_000);
        assert_eq!(e.points_redeemed, 5_000);
    }

    #[test]
    fn sale_items_get_no_accrual_and_no_points_payment() {
        let p = Program::case_study("t", "KZT");
        let r = receipt(&[("1", "500.00", true), ("1", "500.00", false)], 1_000_000);
        let e = evaluate(&p, &r, Some(&member(1_000_000)), 0);
        assert_eq!(e.lines[0].points_accrued, 0);
        assert_eq!(e.lines[0].paid_with_points, Decimal::ZERO);
        assert_eq!(
            e.paid_with_points,
            d("200.00"),
            "20% of the whole receipt, on the regular line"
        );
        assert_eq!(e.lines[1].paid_with_points, d("200.00"));
        assert_eq!(
            e.points_accrued, 300,
            "1% of the 300 paid in money on the regular line"
        );
    }

    #[test]
    fn fixed_points_are_spread_over_lines_so_refunds_can_take_them_back() {
        let mut p = Program::case_study("t", "KZT");
        p.accrual = BaseAccrual::FixedPoints(1_000);
        let r = receipt(
            &[
                ("1", "300.00", false),
                ("1", "100.00", true),
                ("1", "100.00", false),
            ],
            0,
        );
        let e = evaluate(&p, &r, Some(&member(0)), 0);
        let per_line: Vec<i64> = e.lines.iter().map(|l| l.points_accrued).collect();
        assert_eq!(per_line, [750, 0, 250]);
        assert_eq!(e.points_accrued, 1_000);
    }

    #[test]
    fn points_are_charged_only_for_whole_cents() {
        let mut p = Program::case_study("t", "KZT");
        p.point_minor_units = 1000;
        let e = evaluate(
            &p,
            &receipt(&[("1", "1000.00", false)], 1_234),
            Some(&member(10_000)),
            0,
        );
        assert_eq!(e.paid_with_points, d("1.23"));
        assert_eq!(e.points_redeemed, 1_230);
        let e = evaluate(
            &p,
            &receipt(&[("1", "1000.00", false)], 5),
            Some(&member(10_000)),
            0,
        );
        assert_eq!((e.points_redeemed, e.paid_with_points), (0, Decimal::ZERO));
    }

    #[test]
    fn unidentified_purchases_accrue_nothing() {
        let p = Program::case_study("t", "KZT");
        let e = evaluate(&p, &receipt(&[("1", "100.00", false)], 0), None, 0);
        assert_eq!(e.points_accrued, 0);
        assert_eq!(e.net, d("100.00"));
    }

    proptest! {
        /// The integer spread and the decimal one agree wherever both apply.
        #[test]
        fn integer_and_decimal_spreads_agree(
            weights in proptest::collection::vec(0i64..10_000_000, 1..30),
            wscale in 0u32..4,
            total_share in 0u32..=100,
            unit_cents in prop_oneof![Just(1i64), Just(100)],
        ) {
            let w: Vec<Decimal> = weights.iter().map(|x| Decimal::new(*x, wscale)).collect();
            let sum: Decimal = w.iter().copied().sum();
            let unit = Decimal::new(unit_cents, 2);
            let total = ((sum * Decimal::from(total_share) / Decimal::ONE_HUNDRED) / unit).floor() * unit;
            let a = spread_scaled(total, &w, unit).unwrap();
            let b = spread_decimal(total, &w, unit);
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(a.iter().copied().sum::<Decimal>(), total);
            // Fractional weights can leave units over, which the largest slot takes.
            let slack = unit * Decimal::from(w.len());
            for (share, weight) in a.iter().zip(&w) {
                prop_assert!(*share < *weight + slack);
            }
        }

        #[test]
        fn points_payment_never_exceeds_cap_or_lines(
            prices in proptest::collection::vec((1u32..100_000, any::<bool>()), 1..20),
            available in 0i64..10_000_000,
            wanted in 0i64..10_000_000,
        ) {
            let p = Program::case_study("t", "KZT");
            let lines: Vec<(String, String, bool)> = prices.iter()
                .map(|(c, s)| ("1".to_string(), Decimal::new(i64::from(*c), 2).to_string(), *s)).collect();
            let refs: Vec<(&str, &str, bool)> = lines.iter().map(|(q, pr, s)| (q.as_str(), pr.as_str(), *s)).collect();
            let e = evaluate(&p, &receipt(&refs, wanted), Some(&member(available)), 0);
            prop_assert!(e.points_redeemed <= available && e.points_redeemed <= wanted);
            prop_assert!(e.paid_with_points <= money_down(e.net * Decimal::from(20) / Decimal::ONE_HUNDRED));
            let mut sum_money = Decimal::ZERO;
            let mut sum_points = 0;
            for (l, (_, sale)) in e.lines.iter().zip(&prices) {
                prop_assert!(l.paid_with_points <= l.net);
                if *sale { prop_assert_eq!(l.paid_with_points, Decimal::ZERO); prop_assert_eq!(l.points_accrued, 0); }
                sum_money += l.paid_with_points;
                sum_points += l.points_redeemed;
            }
            prop_assert_eq!(sum_money, e.paid_with_points);
            prop_assert_eq!(sum_points, e.points_redeemed);
            prop_assert_eq!(e.amount_due, e.net - e.paid_with_points);
        }
    }
}
