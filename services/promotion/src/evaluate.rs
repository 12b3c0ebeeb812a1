//! Evaluates a receipt under the program: a pure function, the same for Quote and Commit,
//! so a quote equals the commit that follows it.
//!
//! Order: gross per line → discounts (none until campaigns exist) → points payment, capped
//! and spread over eligible lines → accrual on what is left to pay in money.

use loyalty_platform::clock::{DAY_MS, Millis};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::program::{BaseAccrual, MONEY_SCALE, Program, Rounding};
use crate::receipt::Receipt;

/// Who is buying, as far as pricing cares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberContext {
    pub member_id: String,
    /// Active points (minor units) before this receipt.
    pub points_available: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Effect {
    /// Empty for the base program.
    pub campaign_id: String,
    pub description: String,
    pub discount: Decimal,
    pub points: i64,
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
    pub points_accrued: i64,
    pub max_payable_with_points: Decimal,
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
    pub points_accrued: i64,
    pub activate_at: Millis,
    pub expire_at: Option<Millis>,
    pub max_redeemable_points: i64,
    pub effects: Vec<Effect>,
    pub member: Option<MemberContext>,
    pub program_version: i64,
}

fn money(value: Decimal) -> Decimal {
    Rounding::HalfUp.apply(value, MONEY_SCALE)
}

fn money_down(value: Decimal) -> Decimal {
    Rounding::Down.apply(value, MONEY_SCALE)
}

fn to_i64(value: Decimal) -> i64 {
    i64::try_from(value).unwrap_or(if value.is_sign_negative() {
        0
    } else {
        i64::MAX
    })
}

/// Spreads `total` over `weights` proportionally without ever giving a slot more than its
/// weight; `unit` is the smallest step (one cent, one point). Sum of the result = `total`
/// when `total <= sum(weights)`.
fn spread(total: Decimal, weights: &[Decimal], unit: Decimal) -> Vec<Decimal> {
    let sum: Decimal = weights.iter().copied().sum();
    if sum.is_zero() || total.is_zero() {
        return vec![Decimal::ZERO; weights.len()];
    }
    let mut shares: Vec<Decimal> = weights
        .iter()
        .map(|w| ((total * *w / sum) / unit).floor() * unit)
        .collect();
    let mut left = total - shares.iter().copied().sum::<Decimal>();
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
    // Rounding of fractional weights can leave less than one unit per slot unplaced; the
    // largest slot takes it so the shares always add up to the total.
    if left > Decimal::ZERO
        && let Some(i) = (0..weights.len()).max_by(|&a, &b| weights[a].cmp(&weights[b]))
    {
        shares[i] += left;
    }
    shares
}

/// Evaluates `receipt` for `member` (None: unidentified) at `now`.
pub fn evaluate(
    program: &Program,
    receipt: &Receipt,
    member: Option<&MemberContext>,
    now: Millis,
) -> Evaluation {
    // One span per rule evaluation when tracing is on; nothing otherwise.
    let _span = loyalty_platform::telemetry::work_span("promotion.evaluate").entered();
    let minor = Decimal::from(program.point_minor_units);
    let mut lines: Vec<LineResult> = receipt
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
                effects: Vec::new(),
                notes: Vec::new(),
            }
        })
        .collect();
    let net: Decimal = lines.iter().map(|l| l.net).sum();

    // Points payment: the cap is a share of the receipt, only eligible lines can take it,
    // and a minimum may have to be paid in money.
    let eligible: Vec<Decimal> = receipt
        .lines
        .iter()
        .zip(&mut lines)
        .map(|(raw, line)| {
            if raw.sale_price && program.sale_excluded_from_redemption {
                line.notes
                    .push("sale item: cannot be paid with points".into());
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
    let money_shares = spread(paid_with_points, &eligible, Decimal::new(1, MONEY_SCALE));
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

    // Accrual on what is paid in money.
    let mut points_accrued: i64 = 0;
    let mut effects = Vec::new();
    match (&program.accrual, member) {
        (_, None) => {}
        (BaseAccrual::Percent(pct), Some(_)) => {
            for (raw, line) in receipt.lines.iter().zip(&mut lines) {
                if raw.sale_price && program.sale_excluded_from_accrual {
                    line.notes.push("sale item: no accrual".into());
                    continue;
                }
                let paid = line.net - line.paid_with_points;
                let points = program.accrual_rounding.apply(
                    paid * *pct / Decimal::ONE_HUNDRED / program.point_value * minor,
                    0,
                );
                let points = to_i64(points);
                if points > 0 {
                    line.points_accrued = points;
                    line.effects.push(Effect {
                        campaign_id: String::new(),
                        description: format!("base accrual {pct}%"),
                        discount: Decimal::ZERO,
                        points,
                    });
                    points_accrued = points_accrued.saturating_add(points);
                }
            }
            if points_accrued > 0 {
                effects.push(Effect {
                    campaign_id: String::new(),
                    description: format!("base accrual {pct}% of the amount paid in money"),
                    discount: Decimal::ZERO,
                    points: points_accrued,
                });
            }
        }
        (BaseAccrual::FixedPoints(points), Some(_)) => {
            let paid: Vec<Decimal> = receipt
                .lines
                .iter()
                .zip(&lines)
                .map(|(raw, l)| {
                    if raw.sale_price && program.sale_excluded_from_accrual {
                        Decimal::ZERO
                    } else {
                        l.net - l.paid_with_points
                    }
                })
                .collect();
            let total: Decimal = paid.iter().copied().sum();
            if total > Decimal::ZERO && *points > 0 {
                // Spread over the lines by what they paid, so refunds take it back per line.
                let weights: Vec<Decimal> = paid
                    .iter()
                    .map(|p| *p / total * Decimal::from(*points))
                    .collect();
                let shares = spread(Decimal::from(*points), &weights, Decimal::ONE);
                for (line, share) in lines.iter_mut().zip(shares) {
                    line.points_accrued = to_i64(share);
                }
                points_accrued = *points;
                effects.push(Effect {
                    campaign_id: String::new(),
                    description: "base accrual: fixed points per receipt".into(),
                    discount: Decimal::ZERO,
                    points: *points,
                });
            }
        }
    }

    let activate_at = now + i64::from(program.activation_delay_days) * DAY_MS;
    let expire_at = (program.point_lifetime_days > 0)
        .then(|| activate_at + i64::from(program.point_lifetime_days) * DAY_MS);
    Evaluation {
        gross: lines.iter().map(|l| l.gross).sum(),
        discount: lines.iter().map(|l| l.discount).sum(),
        net,
        amount_due: net - paid_with_points,
        paid_with_points,
        points_redeemed,
        points_accrued,
        activate_at,
        expire_at,
        max_redeemable_points: max_redeemable,
        effects,
        member: member.cloned(),
        program_version: program.version,
        lines,
    }
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
        }
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
