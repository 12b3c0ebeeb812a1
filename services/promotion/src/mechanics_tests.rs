//! One test per campaign mechanic with the case studies' numbers, stacking and caps, and
//! property tests over random campaigns and receipts.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use loyalty_platform::clock::{DAY_MS, Millis};
use loyalty_platform::types::Channel;
use proptest::prelude::*;
use rust_decimal::Decimal;

use crate::book::CampaignBook;
use crate::calendar::{LocalTime, day_number};
use crate::campaign::{
    Benefit, Budget, Campaign, CampaignStatus, CodeRequirement, Coupon, Mechanic, ProductScope,
    SkipReason, StackingGroup, StackingMode, Step, Targeting,
};
use crate::evaluate::{
    Codes, Evaluation, LineInfo, MemberContext, MemberProfile, Situation, evaluate,
};
use crate::program::{Program, Tier};
use crate::receipt::{Identification, Line, Receipt};
use crate::usage::Counters;

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

/// Noon UTC of a date.
fn noon(y: i32, m: u8, day: u8) -> Millis {
    day_number(y, m, day) * DAY_MS + 12 * 3_600_000
}

fn campaign(id: &str, mechanic: Mechanic) -> Campaign {
    Campaign {
        tenant_id: "t".into(),
        campaign_id: id.into(),
        name: String::new(),
        status: CampaignStatus::Active,
        stacking_group_id: String::new(),
        priority: 0,
        targeting: Targeting::default(),
        mechanic,
        code: None,
        budget: Budget::default(),
        member_limit: 0,
        member_limit_period_days: 0,
        control_group_percent: 0,
        version: 1,
        created_at: 0,
        updated_at: 0,
        updated_by: String::new(),
    }
}

fn all() -> ProductScope {
    ProductScope::default()
}

fn category(c: &str) -> ProductScope {
    ProductScope {
        categories: vec![c.into()],
        ..ProductScope::default()
    }
}

fn percent_off(id: &str, pct: &str) -> Campaign {
    campaign(
        id,
        Mechanic::ThresholdDiscount {
            scope: all(),
            steps: vec![Step {
                from: Decimal::ZERO,
                benefit: Benefit::Percent(d(pct)),
            }],
        },
    )
}

/// A receipt line: (sku, category, quantity, unit price, sale).
type L<'a> = (&'a str, &'a str, &'a str, &'a str, bool);

struct World {
    program: Program,
    campaigns: Vec<Campaign>,
    groups: Vec<StackingGroup>,
    lines: Vec<(Line, LineInfo)>,
    member: Option<MemberContext>,
    profile: MemberProfile,
    codes: Codes,
    counters: Counters,
    now: Millis,
    channel: Channel,
    store_id: String,
    points: i64,
}

impl World {
    fn new(lines: &[L]) -> Self {
        Self {
            program: Program::case_study("t", "KZT"),
            campaigns: Vec::new(),
            groups: Vec::new(),
            lines: lines
                .iter()
                .enumerate()
                .map(|(i, (sku, cat, q, p, sale))| {
                    (
                        Line {
                            line_id: i.to_string(),
                            sku: (*sku).into(),
                            quantity: d(q),
                            unit_price: d(p),
                            sale_price: *sale,
                        },
                        LineInfo {
                            category: (*cat).into(),
                            brand: "X".into(),
                        },
                    )
                })
                .collect(),
            member: Some(MemberContext {
                member_id: "m1".into(),
                points_available: 0,
                tier_id: String::new(),
            }),
            profile: MemberProfile::default(),
            codes: Codes::default(),
            counters: Counters::default(),
            now: noon(2026, 3, 10),
            channel: Channel::Store,
            store_id: "s1".into(),
            points: 0,
        }
    }

    fn with(mut self, c: Campaign) -> Self {
        self.campaigns.push(c);
        self
    }

    fn anonymous(mut self) -> Self {
        self.member = None;
        self
    }

    fn receipt(&self) -> Receipt {
        Receipt {
            tenant_id: "t".into(),
            receipt_id: "r".into(),
            store_id: self.store_id.clone(),
            channel: self.channel,
            terminal_id: String::new(),
            cashier_id: String::new(),
            identification: if self.member.is_some() {
                Identification::Member("m1".into())
            } else {
                Identification::None
            },
            lines: self.lines.iter().map(|(l, _)| l.clone()).collect(),
            codes: Vec::new(),
            points_to_redeem: self.points,
            purchase_time: None,
        }
    }

    fn eval(&self) -> Evaluation {
        let book = CampaignBook::compile(1, self.campaigns.clone(), &self.groups);
        let infos: Vec<LineInfo> = self.lines.iter().map(|(_, i)| i.clone()).collect();
        let s = Situation {
            store_brand: "Main",
            local: LocalTime::at(self.now, ""),
            time_zone: "",
            lines: &infos,
            member: self.member.as_ref(),
            profile: Some(&self.profile),
            codes: &self.codes,
            counters: &self.counters,
            now: self.now,
        };
        let e = evaluate(&self.program, &book, &self.receipt(), &s);
        check_invariants(&self.program, &self.receipt(), &e);
        e
    }
}

fn skip_of(e: &Evaluation, id: &str) -> Option<SkipReason> {
    e.skipped
        .iter()
        .find(|s| &*s.campaign_id == id)
        .map(|s| s.reason)
}

/// What must hold for every evaluation.
fn check_invariants(p: &Program, r: &Receipt, e: &Evaluation) {
    let mut discount = Decimal::ZERO;
    for (line, raw) in e.lines.iter().zip(&r.lines) {
        assert!(line.discount >= Decimal::ZERO && line.discount <= line.gross);
        assert!(
            line.discount <= line.gross * p.max_line_discount_percent / Decimal::ONE_HUNDRED,
            "line cap"
        );
        assert_eq!(line.net, line.gross - line.discount);
        assert!(line.paid_with_points <= line.net);
        if raw.sale_price && p.sale_excluded_from_accrual {
            assert_eq!(line.points_accrued, 0, "sale lines never accrue");
        }
        if raw.sale_price && p.sale_excluded_from_redemption {
            assert_eq!(line.paid_with_points, Decimal::ZERO);
        }
        if raw.sale_price && p.sale_excluded_from_discounts {
            assert_eq!(line.discount, Decimal::ZERO, "sale lines get no discount");
        }
        let effects: Decimal = line.effects.iter().map(|x| x.discount).sum();
        assert_eq!(effects, line.discount, "every discount is explained");
        let points: i64 = line.effects.iter().map(|x| x.points).sum();
        assert_eq!(points, line.points_accrued, "every point is explained");
        discount += line.discount;
    }
    assert_eq!(discount, e.discount);
    assert!(e.discount <= e.gross * p.max_receipt_discount_percent / Decimal::ONE_HUNDRED);
    assert!(e.paid_with_points <= (e.net * p.max_redeem_percent / Decimal::ONE_HUNDRED));
    assert_eq!(e.amount_due, e.net - e.paid_with_points);
    let lines_points: i64 = e.lines.iter().map(|l| l.points_accrued).sum();
    assert_eq!(lines_points, e.points_accrued);
    for (k, b) in e.bonuses.iter().enumerate() {
        let spread: i64 = e.lines.iter().map(|l| l.bonus_points[k]).sum();
        assert_eq!(spread, b.points, "a bonus is spread over the lines in full");
    }
}

#[test]
fn birthday_boost_of_14_percent_from_two_days_before_through_the_birthday() {
    let boost = campaign(
        "bday",
        Mechanic::BirthdayBoost {
            percent: d("14"),
            days_before: 2,
            days_after: 0,
        },
    );
    let mut w = World::new(&[("boots", "Boots", "1", "10000.00", false)]).with(boost);
    w.profile.birthday = Some((3, 12));
    for (day, points) in [(9, 10_000), (10, 140_000), (12, 140_000), (13, 10_000)] {
        w.now = noon(2026, 3, day);
        let e = w.eval();
        assert_eq!(e.points_accrued, points, "on 2026-03-{day}");
    }
    w.now = noon(2026, 3, 13);
    assert_eq!(skip_of(&w.eval(), "bday"), Some(SkipReason::OutsideWindow));
    w.now = noon(2026, 3, 11);
    let e = w.eval();
    assert_eq!(e.lines[0].accrual_percent, d("14"));
    assert!(
        e.effects
            .iter()
            .any(|x| &*x.campaign_id == "bday" && x.points == 130_000)
    );
}

#[test]
fn tiers_five_percent_and_ten_from_500000() {
    let mut w = World::new(&[("boots", "Boots", "1", "1000.00", false)]);
    w.program.tiers = vec![
        Tier {
            tier_id: "base".into(),
            name: "Base".into(),
            min_spend: Decimal::ZERO,
            accrual_percent: d("5"),
        },
        Tier {
            tier_id: "gold".into(),
            name: "Gold".into(),
            min_spend: d("500000"),
            accrual_percent: d("10"),
        },
    ];
    w.member.as_mut().unwrap().tier_id = "base".into();
    assert_eq!(w.eval().points_accrued, 5_000);
    w.member.as_mut().unwrap().tier_id = "gold".into();
    assert_eq!(w.eval().points_accrued, 10_000);
}

#[test]
fn promo_code_11_11_turns_30_percent_into_41() {
    let mut code = campaign(
        "promo",
        Mechanic::ExtraDiscount {
            scope: all(),
            percent: d("11"),
        },
    );
    code.code = Some(CodeRequirement::PromoCode("11.11".into()));
    let mut w = World::new(&[("dress", "Dresses", "1", "10000.00", false)])
        .with(percent_off("sale30", "30"))
        .with(code);
    let e = w.eval();
    assert_eq!(e.discount, d("3000.00"));
    assert_eq!(skip_of(&e, "promo"), Some(SkipReason::CodeMissing));
    w.codes.promo = vec!["11.11".into()];
    let e = w.eval();
    assert_eq!(e.discount, d("4100.00"), "30% + 11% of the shelf price");
    assert_eq!(e.net, d("5900.00"));
    assert_eq!(e.lines[0].effects.len(), 3, "two discounts and the accrual");
}

#[test]
fn two_for_one_makes_the_cheapest_free() {
    let offer = campaign(
        "2for1",
        Mechanic::NForM {
            scope: category("Socks"),
            n: 2,
            m: 1,
        },
    );
    let w = World::new(&[
        ("a", "Socks", "1", "500.00", false),
        ("b", "Socks", "2", "300.00", false),
        ("c", "Boots", "1", "9000.00", false),
    ])
    .with(offer.clone());
    let e = w.eval();
    // Units by price: 500, 300, 300 → one pair (500, 300): the 300 is free; the last 300
    // has no pair.
    assert_eq!(e.discount, d("300.00"));
    assert_eq!(e.lines[1].discount, d("300.00"));
    assert_eq!(e.lines[2].discount, Decimal::ZERO, "boots are out of scope");
    let w = World::new(&[("a", "Socks", "1", "500.00", false)]).with(offer.clone());
    assert_eq!(
        skip_of(&w.eval(), "2for1"),
        Some(SkipReason::ThresholdNotReached)
    );
    // 3 for 2 over six units: the two cheapest of each three are... one per three free.
    let three = campaign(
        "3for2",
        Mechanic::NForM {
            scope: all(),
            n: 3,
            m: 2,
        },
    );
    let w = World::new(&[
        ("a", "Socks", "3", "100.00", false),
        ("b", "Socks", "3", "50.00", false),
    ])
    .with(three);
    assert_eq!(w.eval().discount, d("150.00"), "one 100 and one 50 free");
}

#[test]
fn threshold_steps_pick_the_highest_step_reached() {
    let steps = campaign(
        "steps",
        Mechanic::ThresholdDiscount {
            scope: all(),
            steps: vec![
                Step {
                    from: d("5000"),
                    benefit: Benefit::Percent(d("5")),
                },
                Step {
                    from: d("10000"),
                    benefit: Benefit::Percent(d("10")),
                },
                Step {
                    from: d("20000"),
                    benefit: Benefit::Amount(d("3000")),
                },
            ],
        },
    );
    let at = |price: &str| {
        World::new(&[("x", "C", "1", price, false)])
            .with(steps.clone())
            .eval()
    };
    assert_eq!(
        skip_of(&at("4999.99"), "steps"),
        Some(SkipReason::ThresholdNotReached)
    );
    assert_eq!(at("5000.00").discount, d("250.00"));
    assert_eq!(at("15000.00").discount, d("1500.00"));
    assert_eq!(at("25000.00").discount, d("3000.00"));
}

#[test]
fn quantity_steps_count_items_in_scope() {
    let q = campaign(
        "qty",
        Mechanic::QuantityDiscount {
            scope: category("Socks"),
            steps: vec![
                Step {
                    from: d("3"),
                    benefit: Benefit::Percent(d("10")),
                },
                Step {
                    from: d("5"),
                    benefit: Benefit::Percent(d("20")),
                },
            ],
        },
    );
    let w = |n: &str| {
        World::new(&[
            ("s", "Socks", n, "100.00", false),
            ("b", "Boots", "10", "100.00", false),
        ])
        .with(q.clone())
        .eval()
    };
    assert_eq!(
        skip_of(&w("2"), "qty"),
        Some(SkipReason::ThresholdNotReached)
    );
    assert_eq!(w("3").discount, d("30.00"));
    assert_eq!(w("6").discount, d("120.00"));
}

#[test]
fn accrual_boost_on_a_category_and_sale_lines_follow_the_sale_rule() {
    let boost = campaign(
        "boots5",
        Mechanic::AccrualBoost {
            scope: category("Boots"),
            percent: Some(d("5")),
            multiplier: None,
        },
    );
    let w = World::new(&[
        ("b", "Boots", "1", "1000.00", false),
        ("b2", "Boots", "1", "1000.00", true),
        ("s", "Socks", "1", "1000.00", false),
    ])
    .with(boost)
    .with(percent_off("ten", "10"));
    let e = w.eval();
    assert_eq!(e.lines[0].points_accrued, 4_500, "5% of 900");
    assert_eq!(e.lines[1].points_accrued, 0, "sale line: no accrual");
    assert_eq!(e.lines[1].discount, Decimal::ZERO, "sale line: no discount");
    assert_eq!(e.lines[2].points_accrued, 900, "1% of 900");
    let double = campaign(
        "x2",
        Mechanic::AccrualBoost {
            scope: all(),
            percent: None,
            multiplier: Some(d("2")),
        },
    );
    let e = World::new(&[("s", "Socks", "1", "1000.00", false)])
        .with(double)
        .eval();
    assert_eq!(e.points_accrued, 2_000);
}

#[test]
fn fast_burning_bonus_points_have_their_own_lot() {
    let bonus = campaign(
        "burn",
        Mechanic::FixedBonus {
            points: 50_000,
            activation_delay_days: 1,
            lifetime_days: 7,
        },
    );
    let w = World::new(&[
        ("a", "C", "1", "300.00", false),
        ("b", "C", "1", "100.00", false),
    ])
    .with(bonus.clone());
    let e = w.eval();
    assert_eq!(e.bonuses.len(), 1);
    let b = &e.bonuses[0];
    assert_eq!(b.points, 50_000);
    assert_eq!(b.activate_at, w.now + DAY_MS);
    // Seven days after activation, to the end of that day.
    assert_eq!(
        b.expire_at,
        Some(crate::calendar::end_of_local_day(w.now + 8 * DAY_MS, ""))
    );
    assert_eq!(b.expire_at.unwrap() % DAY_MS, 0);
    assert_eq!(e.total_points_accrued(), 50_000 + 400);
    let e = World::new(&[("a", "C", "1", "300.00", false)])
        .with(bonus)
        .anonymous()
        .eval();
    assert!(e.bonuses.is_empty());
}

#[test]
fn exclusive_groups_apply_the_first_or_the_best() {
    let group = |mode| StackingGroup {
        tenant_id: "t".into(),
        group_id: "g".into(),
        name: String::new(),
        mode,
        priority: 0,
        max_discount_percent: None,
    };
    let mut small = percent_off("small", "10");
    small.stacking_group_id = "g".into();
    small.priority = 1;
    let mut big = percent_off("big", "25");
    big.stacking_group_id = "g".into();
    big.priority = 2;
    let mut w = World::new(&[("x", "C", "1", "1000.00", false)])
        .with(small)
        .with(big);
    w.groups = vec![group(StackingMode::ExclusiveFirst)];
    let e = w.eval();
    assert_eq!(e.discount, d("100.00"));
    assert_eq!(skip_of(&e, "big"), Some(SkipReason::ExcludedByStacking));
    w.groups = vec![group(StackingMode::ExclusiveBest)];
    let e = w.eval();
    assert_eq!(e.discount, d("250.00"));
    assert_eq!(skip_of(&e, "small"), Some(SkipReason::ExcludedByStacking));
    w.groups = vec![group(StackingMode::Stackable)];
    assert_eq!(w.eval().discount, d("350.00"));
    // A group cap of 20% holds the stack.
    let mut capped = group(StackingMode::Stackable);
    capped.max_discount_percent = Some(d("20"));
    w.groups = vec![capped];
    let e = w.eval();
    assert_eq!(e.discount, d("200.00"));
    assert_eq!(
        e.lines[0].effects[1].discount,
        d("100.00"),
        "the second is cut"
    );
}

#[test]
fn program_caps_hold_every_discount() {
    let mut w = World::new(&[("x", "C", "2", "1000.00", false)])
        .with(percent_off("a", "30"))
        .with(percent_off("b", "30"));
    w.program.max_line_discount_percent = d("50");
    let e = w.eval();
    assert_eq!(e.discount, d("1000.00"), "half of the line");
    w.program.max_receipt_discount_percent = d("10");
    let e = w.eval();
    assert_eq!(e.discount, d("200.00"));
    assert_eq!(skip_of(&e, "b"), Some(SkipReason::CapReached));
}

#[test]
fn targeting_explains_every_miss() {
    let base = World::new(&[("x", "C", "1", "1000.00", false)]);
    let check = |edit: &dyn Fn(&mut Campaign), reason: SkipReason| {
        let mut c = percent_off("c", "10");
        edit(&mut c);
        let e = World {
            campaigns: vec![c],
            ..World::new(&[("x", "C", "1", "1000.00", false)])
        }
        .eval();
        assert_eq!(skip_of(&e, "c"), Some(reason));
        assert_eq!(e.discount, Decimal::ZERO);
    };
    check(
        &|c| c.targeting.end = Some(base.now - 1),
        SkipReason::OutsideWindow,
    );
    check(
        &|c| c.targeting.start = Some(base.now + 1),
        SkipReason::OutsideWindow,
    );
    // 2026-03-10 is a Tuesday; noon UTC.
    check(
        &|c| c.targeting.days_of_week = vec![1, 3],
        SkipReason::WrongDayOrHour,
    );
    check(
        &|c| {
            c.targeting.start_hour = 8;
            c.targeting.end_hour = 12;
        },
        SkipReason::WrongDayOrHour,
    );
    check(
        &|c| c.targeting.store_ids = vec!["s2".into()],
        SkipReason::WrongStore,
    );
    check(
        &|c| c.targeting.brands = vec!["Outlet".into()],
        SkipReason::WrongStore,
    );
    check(
        &|c| c.targeting.channels = vec![Channel::Online],
        SkipReason::WrongChannel,
    );
    check(
        &|c| c.targeting.segment_ids = vec!["vip".into()],
        SkipReason::NotInSegment,
    );
    check(
        &|c| c.targeting.tier_ids = vec!["gold".into()],
        SkipReason::WrongTier,
    );
    check(
        &|c| {
            c.targeting.member_attributes =
                BTreeMap::from([("city".to_string(), "Almaty".to_string())])
        },
        SkipReason::MemberAttributes,
    );
    // And each one applies when it matches.
    let mut c = percent_off("c", "10");
    c.targeting.days_of_week = vec![2];
    c.targeting.start_hour = 12;
    c.targeting.end_hour = 13;
    c.targeting.store_ids = vec!["s1".into()];
    c.targeting.brands = vec!["Main".into()];
    c.targeting.channels = vec![Channel::Store];
    c.targeting.segment_ids = vec!["vip".into()];
    c.targeting.member_attributes = BTreeMap::from([("city".to_string(), "Almaty".to_string())]);
    let mut w = World::new(&[("x", "C", "1", "1000.00", false)]).with(c.clone());
    w.profile.segments = vec!["vip".into()];
    w.profile.attributes.insert("city".into(), "Almaty".into());
    assert_eq!(w.eval().discount, d("100.00"));
    let e = w.anonymous().eval();
    assert_eq!(skip_of(&e, "c"), Some(SkipReason::MemberRequired));
}

#[test]
fn a_daily_member_limit_follows_the_stores_day() {
    // 08:59 and 09:01 in Tokyo are 23:59 and 00:01 UTC: one local day, two UTC days.
    let before = noon(2026, 3, 10) + 11 * 3_600_000 + 59 * 60_000;
    let after = before + 2 * 60_000;
    let tokyo = |t| crate::evaluate::period(&LocalTime::at(t, "Asia/Tokyo"), 1);
    let utc = |t| crate::evaluate::period(&LocalTime::at(t, ""), 1);
    assert_eq!(tokyo(before), tokyo(after), "one day at the store");
    assert_ne!(utc(before), utc(after));
    // The next local midnight (15:00 UTC) starts the next period.
    let midnight = noon(2026, 3, 11) + 3 * 3_600_000;
    assert_eq!(tokyo(midnight - 1), tokyo(before));
    assert_eq!(tokyo(midnight), tokyo(before) + 1);
}

#[test]
fn budgets_and_member_limits_stop_a_campaign_and_are_claimed() {
    let mut c = percent_off("c", "10");
    c.budget = Budget {
        max_discount: Some(d("1000")),
        max_points: 0,
        max_uses: 3,
    };
    c.member_limit = 1;
    c.member_limit_period_days = 30;
    let mut w = World::new(&[("x", "C", "1", "1000.00", false)]).with(c);
    let e = w.eval();
    assert_eq!(e.discount, d("100.00"));
    let counters: Vec<(&str, i64, i64)> = e
        .claims
        .iter()
        .map(|c| (c.counter.as_str(), c.amount, c.limit))
        .collect();
    let period = crate::evaluate::period(&LocalTime::at(w.now, ""), 30);
    let member = format!("member/c/m1/{period}");
    assert_eq!(
        counters,
        [
            ("uses/c", 1, 3),
            ("discount/c", 10_000, 100_000),
            (member.as_str(), 1, 1)
        ]
    );
    w.counters.insert(member.clone(), 1);
    assert_eq!(
        skip_of(&w.eval(), "c"),
        Some(SkipReason::MemberLimitReached)
    );
    w.counters.clear();
    w.counters.insert("uses/c".into(), 3);
    assert_eq!(skip_of(&w.eval(), "c"), Some(SkipReason::BudgetExhausted));
    w.counters.clear();
    w.counters.insert("discount/c".into(), 95_000);
    assert_eq!(
        skip_of(&w.eval(), "c"),
        Some(SkipReason::BudgetExhausted),
        "50 left cannot pay a 100 discount"
    );
}

#[test]
fn a_control_group_is_held_out_and_recorded() {
    let mut c = percent_off("c", "10");
    c.control_group_percent = 50;
    let held = (0..200)
        .filter(|i| {
            let mut w = World::new(&[("x", "C", "1", "1000.00", false)]).with(c.clone());
            w.member.as_mut().unwrap().member_id = format!("m{i}");
            let e = w.eval();
            let out = skip_of(&e, "c") == Some(SkipReason::ControlGroup);
            assert_eq!(out, e.held_out().any(|id| id == "c"));
            assert_eq!(out, e.discount.is_zero());
            out
        })
        .count();
    assert!((60..140).contains(&held), "{held} of 200 held out");
}

#[test]
fn coupons_apply_their_campaign_and_claim_a_use() {
    let mut c = percent_off("c", "15");
    c.code = Some(CodeRequirement::Coupons {
        max_uses: 1,
        member_bound: false,
    });
    let mut w = World::new(&[("x", "C", "1", "1000.00", false)]).with(c);
    assert_eq!(skip_of(&w.eval(), "c"), Some(SkipReason::CodeMissing));
    w.codes.coupons = vec![Coupon {
        tenant_id: "t".into(),
        code: "ABCDEFGH2345".into(),
        campaign_id: "c".into(),
        member_id: String::new(),
        max_uses: 1,
        expire_at: None,
        created_at: 0,
    }];
    let e = w.eval();
    assert_eq!(e.discount, d("150.00"));
    assert_eq!(e.claims.len(), 1);
    assert_eq!(e.claims[0].counter, "coupon/ABCDEFGH2345");
}

fn mechanic_strategy() -> impl Strategy<Value = Mechanic> {
    let pct = (1u32..=100).prop_map(Decimal::from);
    let scope = prop_oneof![
        Just(ProductScope::default()),
        Just(category("A")),
        Just(category("B"))
    ];
    prop_oneof![
        (scope.clone(), pct.clone()).prop_map(|(scope, p)| Mechanic::ThresholdDiscount {
            scope,
            steps: vec![Step {
                from: Decimal::from(100),
                benefit: Benefit::Percent(p)
            }]
        }),
        (scope.clone(), 1u32..50_000).prop_map(|(scope, a)| Mechanic::QuantityDiscount {
            scope,
            steps: vec![Step {
                from: Decimal::TWO,
                benefit: Benefit::Amount(Decimal::new(i64::from(a), 2))
            }]
        }),
        (scope.clone(), 2u32..5).prop_map(|(scope, n)| Mechanic::NForM { scope, n, m: n - 1 }),
        (scope.clone(), pct.clone())
            .prop_map(|(scope, percent)| Mechanic::ExtraDiscount { scope, percent }),
        (scope, pct).prop_map(|(scope, p)| Mechanic::AccrualBoost {
            scope,
            percent: Some(p),
            multiplier: None
        }),
        (1i64..100_000).prop_map(|points| Mechanic::FixedBonus {
            points,
            activation_delay_days: 0,
            lifetime_days: 3
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Over random campaigns, groups, caps and receipts: discounts never pass a line's
    /// price or the caps, points never pay more than the cap, sale lines never accrue,
    /// and every discount and point is explained (see `check_invariants`).
    #[test]
    fn caps_and_explanations_hold_for_any_campaigns(
        mechanics in proptest::collection::vec((mechanic_strategy(), 0usize..3), 0..12),
        modes in proptest::collection::vec(0u8..3, 2),
        lines in proptest::collection::vec((0u8..2, 1u32..5, 1u32..200_000, any::<bool>()), 1..15),
        line_cap in 0u32..=100,
        receipt_cap in 0u32..=100,
        group_cap in proptest::option::of(1u32..=100),
        points in 0i64..10_000_000,
    ) {
        let owned: Vec<(String, String, String, String, bool)> = lines
            .iter()
            .enumerate()
            .map(|(i, (cat, q, p, sale))| (
                format!("sku{i}"),
                if *cat == 0 { "A".to_string() } else { "B".to_string() },
                q.to_string(),
                Decimal::new(i64::from(*p), 2).to_string(),
                *sale,
            ))
            .collect();
        let refs: Vec<L> = owned.iter().map(|(a, b, c, e, f)| (a.as_str(), b.as_str(), c.as_str(), e.as_str(), *f)).collect();
        let mut w = World::new(&refs);
        w.program.max_line_discount_percent = Decimal::from(line_cap);
        w.program.max_receipt_discount_percent = Decimal::from(receipt_cap);
        w.member.as_mut().unwrap().points_available = points;
        w.points = points;
        let mode = |m: u8| match m {
            0 => StackingMode::Stackable,
            1 => StackingMode::ExclusiveFirst,
            _ => StackingMode::ExclusiveBest,
        };
        w.groups = (0..2)
            .map(|g| StackingGroup {
                tenant_id: "t".into(),
                group_id: format!("g{g}"),
                name: String::new(),
                mode: mode(modes[g]),
                priority: g as i32,
                max_discount_percent: group_cap.map(Decimal::from),
            })
            .collect();
        for (i, (m, group)) in mechanics.into_iter().enumerate() {
            let mut c = campaign(&format!("c{i}"), m);
            c.stacking_group_id = if group < 2 { format!("g{group}") } else { String::new() };
            c.priority = i as i32;
            w.campaigns.push(c);
        }
        let e = w.eval();
        // Exclusive groups apply at most one campaign each.
        for g in &w.groups {
            if g.mode != StackingMode::Stackable {
                let applied = w
                    .campaigns
                    .iter()
                    .filter(|c| c.stacking_group_id == g.group_id)
                    .filter(|c| e.applied_campaigns().contains(&c.campaign_id.as_str()))
                    .count();
                prop_assert!(applied <= 1, "group {} applied {applied}", g.group_id);
            }
        }
        if let Some(cap) = group_cap {
            for g in &w.groups {
                let given: Decimal = e
                    .effects
                    .iter()
                    .filter(|x| w.campaigns.iter().any(|c| *c.campaign_id == *x.campaign_id && c.stacking_group_id == g.group_id))
                    .map(|x| x.discount)
                    .sum();
                prop_assert!(given <= e.gross * Decimal::from(cap) / Decimal::ONE_HUNDRED);
            }
        }
    }
}

#[test]
fn the_purchase_event_names_applied_and_held_out_campaigns() {
    let mut held = percent_off("held", "10");
    held.control_group_percent = 99;
    let bonus = campaign(
        "burn",
        Mechanic::FixedBonus {
            points: 700,
            activation_delay_days: 0,
            lifetime_days: 7,
        },
    );
    let w = World::new(&[("x", "C", "1", "1000.00", false)])
        .with(percent_off("sale", "5"))
        .with(held)
        .with(bonus);
    let evaluation = w.eval();
    assert_eq!(
        skip_of(&evaluation, "held"),
        Some(SkipReason::ControlGroup),
        "99% are held out, m1 among them"
    );
    let receipt = w.receipt();
    let purchase = crate::purchase::Purchase {
        fingerprint: Vec::new(),
        program: w.program.clone(),
        evaluated_at: w.now,
        month: 0,
        store: Default::default(),
        evaluation,
        state: crate::purchase::PurchaseState::Pending,
        refunds: Vec::new(),
        version: 1,
        receipt,
    };
    let event = crate::events::purchase_event(&purchase, &Default::default(), w.now, None);
    assert_eq!(event.campaign_ids, ["burn", "sale"]);
    assert_eq!(event.held_out_campaign_ids, ["held"]);
    assert_eq!(event.bonus_points, 700);
    assert_eq!(event.points_accrued, 700 + 950);
}

#[test]
fn a_full_refund_gives_each_budget_back_what_it_claimed_even_with_slashes_in_ids() {
    let mut a = percent_off("a", "10");
    a.budget.max_discount = Some(d("100000"));
    let mut ab = percent_off("a/b", "5");
    ab.budget.max_discount = Some(d("100000"));
    let w = World::new(&[("x", "C", "2", "1000.00", false)])
        .with(a)
        .with(ab);
    let evaluation = w.eval();
    let claimed: Vec<(&str, i64)> = evaluation
        .claims
        .iter()
        .map(|c| (c.counter.as_str(), c.amount))
        .collect();
    assert_eq!(claimed, [("discount/a", 20_000), ("discount/a/b", 10_000)]);
    let receipt = w.receipt();
    let purchase = crate::purchase::Purchase {
        fingerprint: Vec::new(),
        program: w.program.clone(),
        evaluated_at: w.now,
        month: 0,
        store: Default::default(),
        evaluation,
        state: crate::purchase::PurchaseState::Committed {
            commit_time: w.now,
            points_balance: Some(0),
        },
        refunds: Vec::new(),
        version: 2,
        receipt,
    };
    let half = crate::checkout::plan_refund(
        &purchase,
        "f1",
        Vec::new(),
        vec![("0".into(), d("1"))],
        true,
    )
    .unwrap();
    let back: Vec<(&str, i64)> = half
        .releases
        .iter()
        .filter(|c| c.counter.starts_with("discount/"))
        .map(|c| (c.counter.as_str(), c.amount))
        .collect();
    assert_eq!(back, [("discount/a", -10_000), ("discount/a/b", -5_000)]);
}
