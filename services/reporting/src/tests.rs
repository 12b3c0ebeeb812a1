//! Every KPI against a straightforward recomputation from the raw facts, for random tenants,
//! with events delivered twice, out of order, and across a restart; and the case studies'
//! with/without-card shapes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use loyalty_platform::calendar::Day;
use loyalty_platform::clock::{DAY_MS, SystemClock};
use loyalty_platform::error::MAX_ID_LEN;
use loyalty_platform::rfm;
use loyalty_platform::types::Channel;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;

use crate::fact::{Fact, LedgerEntry, Line, Member, Outlet, Purchase, Reason, Refund, TenantFact};
use crate::kpi::{Group, Kpi, date_label};
use crate::ports::SegmentMembers;
use crate::rollup::channel_name;
use crate::service::{Filter, Period, Reporting, Request, View};
use crate::store::embedded::EmbeddedReportingStore;

const T: &str = "t";
const BASE: Day = 20_000;
const DAYS: i64 = 120;

struct World {
    stores: Vec<Outlet>,
    facts: Vec<Fact>,
}

fn money(rng: &mut StdRng, max: i64) -> Decimal {
    Decimal::new(rng.random_range(0..=max * 100), 2)
}

fn pick(rng: &mut StdRng, of: &[&str]) -> Vec<String> {
    of.iter()
        .filter(|_| rng.random_bool(0.3))
        .map(|s| s.to_string())
        .collect()
}

fn world(seed: u64) -> World {
    let mut rng = StdRng::seed_from_u64(seed);
    let stores: Vec<Outlet> = (0..rng.random_range(1..=4))
        .map(|i| Outlet {
            store_id: format!("s{i}"),
            brand: format!("b{}", i % 2),
            region: format!("r{}", i % 3),
        })
        .collect();
    let members: Vec<String> = (0..rng.random_range(1..=12))
        .map(|i| format!("m{i}"))
        .collect();
    let mut facts = Vec::new();
    for (i, m) in members.iter().enumerate() {
        for version in 0..rng.random_range(1..=3) {
            facts.push(Fact::Member(Member {
                member_id: m.clone(),
                version,
                active: rng.random_bool(0.9),
                registered_at: Some((BASE + (i as i64 * 7) % DAYS) * DAY_MS + 3_600_000),
                channel: if i % 2 == 0 {
                    Channel::Store
                } else {
                    Channel::App
                },
                store_id: stores[i % stores.len()].store_id.clone(),
                contactable: rng.random_bool(0.5),
                questionnaire_complete: rng.random_bool(0.5),
                referred: rng.random_bool(0.2),
            }));
        }
    }
    let receipts = rng.random_range(0..60);
    for r in 0..receipts + stores.len() {
        // Every store has a receipt, so each is known.
        let outlet = stores[if r < stores.len() {
            r
        } else {
            rng.random_range(0..stores.len())
        }]
        .clone();
        let member =
            (rng.random_bool(0.6)).then(|| members[rng.random_range(0..members.len())].clone());
        let day = BASE + rng.random_range(0..DAYS);
        let lines: Vec<Line> = (0..rng.random_range(1..=3))
            .map(|_| Line {
                sku: format!("k{}", rng.random_range(0..9)),
                category: format!("c{}", rng.random_range(0..4)),
                brand: "x".into(),
                quantity: Decimal::ONE,
                paid: money(&mut rng, 50),
                sale_price: false,
            })
            .collect();
        let paid: Decimal = lines.iter().map(|l| l.paid).sum();
        let discount = money(&mut rng, 5);
        let campaigns = pick(&mut rng, &["k1", "k2"]);
        let held_out: Vec<String> = pick(&mut rng, &["k1", "k2", "k3"])
            .into_iter()
            .filter(|c| !campaigns.contains(c) && member.is_some())
            .collect();
        let p = Purchase {
            cashier_id: String::new(),
            receipt_id: format!("r{r}"),
            outlet: outlet.clone(),
            time_zone: "UTC".into(),
            channel: if rng.random_bool(0.8) {
                Channel::Store
            } else {
                Channel::Online
            },
            member_id: member.clone(),
            time: day * DAY_MS + 36_000_000,
            day,
            lines,
            gross: paid + discount,
            discount,
            paid,
            points_accrued: if member.is_some() {
                rng.random_range(0..500)
            } else {
                0
            },
            points_redeemed: if member.is_some() {
                rng.random_range(0..100)
            } else {
                0
            },
            codes: pick(&mut rng, &["SALE", "11.11"]),
            campaign_ids: campaigns,
            held_out_campaign_ids: held_out,
            coupon_codes: Vec::new(),
        };
        // Some receipts use a coupon: a code of its own, counted as a code but grouped
        // under its campaign only.
        let mut p = p;
        if rng.random_bool(0.2) {
            let coupon = format!("C{r}");
            p.codes.push(coupon.clone());
            p.coupon_codes.push(coupon);
        }
        if rng.random_bool(0.25) {
            let full = rng.random_bool(0.5);
            facts.push(Fact::Refund(Refund {
                receipt_id: p.receipt_id.clone(),
                refund_id: "1".into(),
                outlet: p.outlet.clone(),
                time_zone: "UTC".into(),
                channel: p.channel,
                member_id: p.member_id.clone(),
                time: p.time + DAY_MS,
                day: p.day,
                lines: p.lines.clone(),
                refunded: if full {
                    p.paid
                } else {
                    (p.paid / Decimal::TWO).round_dp(2)
                },
                fully_refunded: full,
                points_reversed: p.points_accrued / 2,
                points_returned: p.points_redeemed / 2,
                codes: p.codes.clone(),
                campaign_ids: p.campaign_ids.clone(),
                held_out_campaign_ids: p.held_out_campaign_ids.clone(),
                coupon_codes: p.coupon_codes.clone(),
            }));
        }
        facts.push(Fact::Purchase(p));
    }
    // Each member's ledger: accruals, redemptions, bonuses, adjustments and expiries at any
    // minute of the days around the period.
    for m in &members {
        let mut balance = 0;
        for seq in 1..=rng.random_range(0..8i64) {
            let reason = [
                Reason::Accrual,
                Reason::Redemption,
                Reason::Expiry,
                Reason::RegistrationBonus,
                Reason::ManualAdjustment,
                Reason::RefundReversal,
            ][rng.random_range(0..6)];
            let amount = match reason {
                Reason::Accrual | Reason::RegistrationBonus => rng.random_range(1..5000),
                Reason::ManualAdjustment => rng.random_range(-500..500),
                _ => -rng.random_range(0..300),
            };
            balance += amount;
            facts.push(Fact::Ledger(LedgerEntry {
                member_id: m.clone(),
                seq,
                reason,
                amount,
                balance_after: balance,
                time: (BASE - 10) * DAY_MS + rng.random_range(0..(DAYS + 20) * DAY_MS),
            }));
        }
    }
    World { stores, facts }
}

/// Every ledger entry once.
fn entries(facts: &[Fact]) -> Vec<LedgerEntry> {
    let mut out: BTreeMap<(String, i64), LedgerEntry> = BTreeMap::new();
    for f in facts {
        if let Fact::Ledger(l) = f {
            out.insert((l.member_id.clone(), l.seq), l.clone());
        }
    }
    out.into_values().collect()
}

/// The unique facts: receipts once, members at their newest version.
fn unique(facts: &[Fact]) -> (Vec<Purchase>, Vec<Refund>, Vec<Member>) {
    let (mut p, mut r) = (BTreeMap::new(), BTreeMap::new());
    let mut m: BTreeMap<String, Member> = BTreeMap::new();
    for f in facts {
        match f {
            Fact::Purchase(x) => {
                p.insert(x.receipt_id.clone(), x.clone());
            }
            Fact::Refund(x) => {
                r.insert((x.receipt_id.clone(), x.refund_id.clone()), x.clone());
            }
            Fact::Member(x) => {
                if m.get(&x.member_id).is_none_or(|k| k.version < x.version) {
                    m.insert(x.member_id.clone(), x.clone());
                }
            }
            Fact::Ledger(_) => {}
        }
    }
    (
        p.into_values().collect(),
        r.into_values().collect(),
        m.into_values().collect(),
    )
}

#[derive(Debug, Clone)]
struct Query {
    from: Day,
    to: Day,
    stores: Vec<String>,
    brands: Vec<String>,
    channels: Vec<Channel>,
    group: Group,
}

fn week_start(d: Day) -> Day {
    d - (d + 3).rem_euclid(7)
}

fn month_start(d: Day) -> Day {
    let (y, m, _) = loyalty_platform::calendar::civil(d);
    loyalty_platform::calendar::day_from_civil(y, m, 1)
}

fn admitted(q: &Query, o: &Outlet, c: Channel) -> bool {
    (q.stores.is_empty() || q.stores.contains(&o.store_id))
        && (q.brands.is_empty() || q.brands.contains(&o.brand))
        && (q.channels.is_empty() || q.channels.contains(&c))
}

/// The group labels a receipt counts under.
fn labels(
    q: &Query,
    day: Day,
    o: &Outlet,
    c: Channel,
    campaigns: &[String],
    codes: &[String],
    coupons: &[String],
) -> Vec<String> {
    let set = |v: &[String]| -> Vec<String> {
        v.iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    match q.group {
        Group::None => vec![String::new()],
        Group::Day => vec![date_label(day)],
        Group::Week => vec![date_label(week_start(day))],
        Group::Month => vec![date_label(month_start(day))],
        Group::Store => vec![o.store_id.clone()],
        Group::Brand => vec![o.brand.clone()],
        Group::Region => vec![o.region.clone()],
        Group::Channel => vec![channel_name(c).to_string()],
        Group::Campaign => set(campaigns),
        Group::Code => set(codes)
            .into_iter()
            .filter(|c| !coupons.contains(c))
            .collect(),
    }
}

#[derive(Default, Clone, Copy)]
struct Tally {
    // [identified][with code]: receipts, money, accrued, redeemed
    receipts: [[i64; 2]; 2],
    money: [[Decimal; 2]; 2],
    discount: Decimal,
    accrued: i64,
    redeemed: i64,
}

fn ratio(n: Decimal, d: Decimal) -> (Decimal, Decimal, Decimal) {
    let v = if d.is_zero() {
        Decimal::ZERO
    } else {
        (n / d).round_dp(6).normalize()
    };
    (v, n, d)
}

/// The KPIs by their definitions (docs/kpis.md), from the facts themselves; the stores'
/// brands and regions come from the purchases in `directory`.
fn reference_with(
    facts: &[Fact],
    directory: &[Fact],
    q: &Query,
    kpis: &[Kpi],
) -> BTreeMap<(Kpi, String), (Decimal, Decimal, Decimal)> {
    let (purchases, refunds, members) = unique(facts);
    let (known_stores, _, _) = unique(directory);
    let in_period = |d: Day| d >= q.from && d <= q.to;
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    for p in purchases
        .iter()
        .filter(|p| in_period(p.day) && admitted(q, &p.outlet, p.channel))
    {
        for g in labels(
            q,
            p.day,
            &p.outlet,
            p.channel,
            &p.campaign_ids,
            &p.codes,
            &p.coupon_codes,
        ) {
            let t = tallies.entry(g).or_default();
            let (i, c) = (
                usize::from(p.member_id.is_some()),
                usize::from(!p.codes.is_empty()),
            );
            t.receipts[i][c] += 1;
            t.money[i][c] += p.paid;
            t.discount += p.discount;
            t.accrued += p.points_accrued;
            t.redeemed += p.points_redeemed;
        }
    }
    for r in refunds
        .iter()
        .filter(|r| in_period(r.day) && admitted(q, &r.outlet, r.channel))
    {
        for g in labels(
            q,
            r.day,
            &r.outlet,
            r.channel,
            &r.campaign_ids,
            &r.codes,
            &r.coupon_codes,
        ) {
            let t = tallies.entry(g).or_default();
            let (i, c) = (
                usize::from(r.member_id.is_some()),
                usize::from(!r.codes.is_empty()),
            );
            t.receipts[i][c] -= i64::from(r.fully_refunded);
            t.money[i][c] -= r.refunded;
            t.accrued -= r.points_reversed;
            t.redeemed -= r.points_returned;
        }
    }
    if q.group == Group::None {
        tallies.entry(String::new()).or_default();
    }
    let mut out = BTreeMap::new();
    let d = Decimal::from;
    let one = |v: Decimal| (v.normalize(), v, Decimal::ONE);
    for &kpi in kpis {
        use Kpi::*;
        match kpi {
            ActiveMembers | RepeatPurchaseRate => {
                let mut counts: BTreeMap<String, HashMap<String, i64>> = BTreeMap::new();
                for p in purchases
                    .iter()
                    .filter(|p| in_period(p.day) && admitted(q, &p.outlet, p.channel))
                {
                    let Some(m) = &p.member_id else { continue };
                    for g in labels(q, p.day, &p.outlet, p.channel, &[], &[], &[]) {
                        *counts.entry(g).or_default().entry(m.clone()).or_default() += 1;
                    }
                }
                if q.group == Group::None {
                    counts.entry(String::new()).or_default();
                }
                for (g, c) in counts {
                    let active = d(c.len() as i64);
                    let again = d(c.values().filter(|n| **n >= 2).count() as i64);
                    let v = if kpi == ActiveMembers {
                        one(active)
                    } else {
                        ratio(again, active)
                    };
                    out.insert((kpi, g), v);
                }
            }
            CrossBrandShare => {
                // A member's brands over the period, or over the series' own day, week or
                // month.
                let series = matches!(q.group, Group::Day | Group::Week | Group::Month);
                let mut brands: HashMap<(String, String), BTreeSet<String>> = HashMap::new();
                let mut buyers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
                for p in purchases
                    .iter()
                    .filter(|p| in_period(p.day) && admitted(q, &p.outlet, p.channel))
                {
                    let Some(m) = &p.member_id else { continue };
                    let groups = labels(q, p.day, &p.outlet, p.channel, &[], &[], &[]);
                    let period = if series {
                        groups[0].clone()
                    } else {
                        String::new()
                    };
                    brands
                        .entry((period, m.clone()))
                        .or_default()
                        .insert(p.outlet.brand.clone());
                    for g in groups {
                        buyers.entry(g).or_default().insert(m.clone());
                    }
                }
                if q.group == Group::None {
                    buyers.entry(String::new()).or_default();
                }
                for (g, members) in buyers {
                    let period = if series { g.clone() } else { String::new() };
                    let across = members
                        .iter()
                        .filter(|m| brands[&(period.clone(), (*m).clone())].len() >= 2)
                        .count();
                    out.insert((kpi, g), ratio(d(across as i64), d(members.len() as i64)));
                }
            }
            PointsExpired | PointsLiability | BreakageRate => {
                // Every group of the period, by the entries' UTC days.
                let label = |d: Day| match q.group {
                    Group::Day => date_label(d),
                    Group::Week => date_label(week_start(d)),
                    Group::Month => date_label(month_start(d)),
                    _ => String::new(),
                };
                let labels: BTreeSet<String> = (q.from..=q.to).map(label).collect();
                let ledger = entries(facts);
                for g in labels {
                    let in_group = |t: i64| {
                        let d = t.div_euclid(DAY_MS);
                        in_period(d) && label(d) == g
                    };
                    let last = (q.from..=q.to).filter(|d| label(*d) == g).max().unwrap();
                    let v = match kpi {
                        PointsExpired => one(d(ledger
                            .iter()
                            .filter(|l| l.reason == Reason::Expiry && in_group(l.time))
                            .map(|l| -l.amount)
                            .sum())),
                        PointsLiability => one(d(ledger
                            .iter()
                            .filter(|l| l.time.div_euclid(DAY_MS) <= last)
                            .map(|l| l.amount)
                            .sum())),
                        _ => ratio(
                            d(ledger
                                .iter()
                                .filter(|l| l.reason == Reason::Expiry && in_group(l.time))
                                .map(|l| -l.amount)
                                .sum()),
                            d(ledger
                                .iter()
                                .filter(|l| l.reason.issues() && l.amount > 0 && in_group(l.time))
                                .map(|l| l.amount)
                                .sum()),
                        ),
                    };
                    out.insert((kpi, g), v);
                }
            }
            NewMembers | ContactableShare | NoQuestionnaireShare => {
                let mut groups: BTreeMap<String, [i64; 4]> = BTreeMap::new();
                for m in &members {
                    let store = facts_store(&known_stores, &m.store_id);
                    let Some(o) = store else { continue };
                    if !admitted(q, &o, m.channel) {
                        continue;
                    }
                    let day = m.registered_at.map(|t| t.div_euclid(DAY_MS));
                    let series = matches!(q.group, Group::Day | Group::Week | Group::Month);
                    if series && !day.is_some_and(in_period) {
                        continue;
                    }
                    let g = match q.group {
                        Group::Store => o.store_id.clone(),
                        Group::Brand => o.brand.clone(),
                        Group::Region => o.region.clone(),
                        Group::Channel => channel_name(m.channel).to_string(),
                        Group::Day => date_label(day.unwrap()),
                        Group::Week => date_label(week_start(day.unwrap())),
                        Group::Month => date_label(month_start(day.unwrap())),
                        _ => String::new(),
                    };
                    let c = groups.entry(g).or_default();
                    if day.is_some_and(in_period) {
                        c[0] += 1;
                    }
                    if m.active && day.is_none_or(|x| x <= q.to) {
                        c[1] += 1;
                        c[2] += i64::from(m.contactable);
                        c[3] += i64::from(!m.questionnaire_complete);
                    }
                }
                if q.group == Group::None {
                    groups.entry(String::new()).or_default();
                }
                for (g, c) in groups {
                    let v = match kpi {
                        NewMembers => one(d(c[0])),
                        ContactableShare => ratio(d(c[2]), d(c[1])),
                        _ => ratio(d(c[3]), d(c[1])),
                    };
                    out.insert((kpi, g), v);
                }
            }
            _ => {
                for (g, t) in &tallies {
                    let rc = |i: Option<usize>, c: Option<usize>| -> (Decimal, Decimal) {
                        let (mut n, mut m) = (0i64, Decimal::ZERO);
                        for a in 0..2 {
                            for b in 0..2 {
                                if i.is_none_or(|x| x == a) && c.is_none_or(|x| x == b) {
                                    n += t.receipts[a][b];
                                    m += t.money[a][b];
                                }
                            }
                        }
                        (d(n), m)
                    };
                    let (all_n, all_m) = rc(None, None);
                    let (card_n, card_m) = rc(Some(1), None);
                    let (anon_n, anon_m) = rc(Some(0), None);
                    let (code_n, code_m) = rc(None, Some(1));
                    let (nocode_n, nocode_m) = rc(None, Some(0));
                    let v = match kpi {
                        PenetrationAmount => ratio(card_m, all_m),
                        PenetrationReceipts => ratio(card_n, all_n),
                        AverageCheckWithCard => ratio(card_m, card_n),
                        AverageCheckWithoutCard => ratio(anon_m, anon_n),
                        SalesWithCard => one(card_m),
                        SalesWithoutCard => one(anon_m),
                        ReceiptsWithCard => one(card_n),
                        ReceiptsWithoutCard => one(anon_n),
                        RedemptionRate => ratio(d(t.redeemed), d(t.accrued)),
                        PointsAccrued => one(d(t.accrued)),
                        PointsRedeemed => one(d(t.redeemed)),
                        CodeUsage => one(code_n),
                        AverageCheckWithCode => ratio(code_m, code_n),
                        AverageCheckWithoutCode => ratio(nocode_m, nocode_n),
                        Sales => one(all_m),
                        Receipts => one(all_n),
                        AverageCheck => ratio(all_m, all_n),
                        Discounts => one(t.discount),
                        _ => continue,
                    };
                    out.insert((kpi, g.clone()), v);
                }
            }
        }
    }
    out
}

fn facts_store(purchases: &[Purchase], store: &str) -> Option<Outlet> {
    purchases
        .iter()
        .find(|p| p.outlet.store_id == store)
        .map(|p| p.outlet.clone())
}

const RECEIPT_KPIS: &[Kpi] = &[
    Kpi::PenetrationAmount,
    Kpi::PenetrationReceipts,
    Kpi::AverageCheckWithCard,
    Kpi::AverageCheckWithoutCard,
    Kpi::SalesWithCard,
    Kpi::SalesWithoutCard,
    Kpi::ReceiptsWithCard,
    Kpi::ReceiptsWithoutCard,
    Kpi::RedemptionRate,
    Kpi::PointsAccrued,
    Kpi::PointsRedeemed,
    Kpi::CodeUsage,
    Kpi::AverageCheckWithCode,
    Kpi::AverageCheckWithoutCode,
    Kpi::Sales,
    Kpi::Receipts,
    Kpi::AverageCheck,
    Kpi::Discounts,
];

const MEMBER_KPIS: &[Kpi] = &[
    Kpi::ActiveMembers,
    Kpi::RepeatPurchaseRate,
    Kpi::NewMembers,
    Kpi::CrossBrandShare,
];
const SHARE_KPIS: &[Kpi] = &[Kpi::ContactableShare, Kpi::NoQuestionnaireShare];
const LEDGER_KPIS: &[Kpi] = &[Kpi::PointsExpired, Kpi::PointsLiability, Kpi::BreakageRate];

fn request(q: &Query) -> Request {
    segment_request(q, "")
}

fn segment_request(q: &Query, segment: &str) -> Request {
    Request {
        tenant_id: T.into(),
        period: Period {
            start: Some(q.from * DAY_MS),
            end: Some((q.to + 1) * DAY_MS),
        },
        filter: Filter {
            stores: q.stores.clone(),
            brands: q.brands.clone(),
            regions: Vec::new(),
            channels: q.channels.clone(),
            segment: segment.into(),
        },
        time_zone: "UTC".into(),
    }
}

async fn answer(
    r: &Reporting,
    q: &Query,
    segment: &str,
    kpis: &[Kpi],
) -> BTreeMap<(Kpi, String), (Decimal, Decimal, Decimal)> {
    let req = segment_request(q, segment);
    let ledger = kpis.iter().any(|k| k.reads_ledger());
    r.kpis(&r.view(&req, ledger).await.unwrap(), &req, kpis, q.group)
        .unwrap()
        .into_iter()
        .map(|v| ((v.kpi, v.group), (v.value, v.numerator, v.denominator)))
        .collect()
}

fn queries(w: &World, seed: u64) -> Vec<Query> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let groups = [
        Group::None,
        Group::Day,
        Group::Week,
        Group::Month,
        Group::Store,
        Group::Brand,
        Group::Region,
        Group::Channel,
        Group::Campaign,
        Group::Code,
    ];
    groups
        .iter()
        .map(|&group| {
            let from = BASE + rng.random_range(-5..DAYS);
            let to = from + rng.random_range(0..DAYS);
            Query {
                from,
                to,
                stores: w
                    .stores
                    .iter()
                    .filter(|_| rng.random_bool(0.2))
                    .map(|s| s.store_id.clone())
                    .collect(),
                brands: if rng.random_bool(0.2) {
                    vec!["b0".into()]
                } else {
                    vec![]
                },
                channels: if rng.random_bool(0.2) {
                    vec![Channel::Store]
                } else {
                    vec![]
                },
                group,
            }
        })
        .collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Opens the store, waiting for the previous opener's writer thread to let go of the file.
async fn open(path: &std::path::Path) -> Reporting {
    let mut tries = 0;
    let store = loop {
        match EmbeddedReportingStore::open(path) {
            Ok(s) => break Arc::new(s),
            Err(e) if tries < 200 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(e) => panic!("{e:#}"),
        }
    };
    Reporting::open(store, Arc::new(SystemClock)).await.unwrap()
}

fn rfm_reference(facts: &[Fact], today: Day) -> BTreeMap<&'static str, (u64, Decimal)> {
    let (purchases, refunds, _) = unique(facts);
    // Per member: receipts made, receipts refunded in full and money per purchase day.
    let mut per: BTreeMap<String, BTreeMap<Day, (i64, i64, Decimal)>> = BTreeMap::new();
    for p in &purchases {
        if let Some(m) = &p.member_id {
            let e = per.entry(m.clone()).or_default().entry(p.day).or_default();
            e.0 += 1;
            e.2 += p.paid;
        }
    }
    for r in &refunds {
        if let Some(m) = &r.member_id {
            let e = per.entry(m.clone()).or_default().entry(r.day).or_default();
            e.1 += i64::from(r.fully_refunded);
            e.2 -= r.refunded;
        }
    }
    let mut inputs = Vec::new();
    for (m, days) in per {
        let upto: Vec<(&Day, &(i64, i64, Decimal))> =
            days.iter().filter(|(d, _)| **d <= today).collect();
        let counting: i64 = upto.iter().map(|(_, v)| v.0 - v.1).sum();
        let last = upto.iter().filter(|(_, v)| v.0 > 0).map(|(d, _)| **d).max();
        let year = upto.iter().filter(|(d, _)| **d > today - 365);
        let frequency: i64 = year.clone().map(|(_, v)| v.0 - v.1).sum();
        if let (true, Some(last)) = (counting > 0, last) {
            inputs.push(rfm::Inputs {
                member_id: m,
                recency_days: today - last,
                frequency: frequency.max(0),
                monetary: year.map(|(_, v)| v.2).sum(),
            });
        }
    }
    let mut out: BTreeMap<&'static str, (u64, Decimal)> = BTreeMap::new();
    for (i, s) in inputs.iter().zip(rfm::score_all(&inputs)) {
        let e = out.entry(s.named.as_str()).or_default();
        e.0 += 1;
        e.1 += i.monetary;
    }
    out
}

/// A segment for the segment filter: these members, as segmentation would list them.
#[derive(Debug)]
struct FixedSegment(Vec<String>);

#[async_trait::async_trait]
impl SegmentMembers for FixedSegment {
    async fn members(
        &self,
        _: &str,
        segment_id: &str,
        _: usize,
    ) -> loyalty_platform::error::Result<Vec<String>> {
        match segment_id {
            "picked" => Ok(self.0.clone()),
            other => Err(loyalty_platform::error::Error::NotFound(format!(
                "segment {other}"
            ))),
        }
    }
}

/// A random part of the world's members (and one the facts never mention), and the facts
/// of that part alone: what the segment filter must read as if they were the tenant.
fn pick_segment(w: &World, seed: u64) -> (Vec<String>, Vec<Fact>) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5e9);
    let everyone: BTreeSet<&String> = w.facts.iter().filter_map(Fact::member_id).collect();
    let mut picked: BTreeSet<String> = everyone
        .into_iter()
        .filter(|_| rng.random_bool(0.4))
        .cloned()
        .collect();
    let facts = w
        .facts
        .iter()
        .filter(|f| match f {
            Fact::Member(m) => picked.contains(&m.member_id),
            f => f.member_id().is_some_and(|m| picked.contains(m)),
        })
        .cloned()
        .collect();
    picked.insert("never-bought".into());
    (picked.into_iter().collect(), facts)
}

async fn check(r: &Reporting, w: &World, seed: u64) {
    check_over(r, w, &w.facts, "", seed).await;
    let (members, facts) = pick_segment(w, seed);
    let r = r.clone().with_segments(Arc::new(FixedSegment(members)));
    check_over(&r, w, &facts, "picked", seed).await;
    let q = &queries(w, seed)[0];
    let unknown = segment_request(q, "nobody");
    assert!(matches!(
        r.view(&unknown, false).await,
        Err(loyalty_platform::error::Error::NotFound(_))
    ));
    // At the end of the history, and 300 days later, when its first weeks have left the
    // 365-day window but their buyers are still scored.
    for today in [BASE + DAYS, BASE + DAYS + 300] {
        let rfm: BTreeMap<&'static str, (u64, Decimal)> = r
            .rfm_overview(T, Some(today * DAY_MS + 1))
            .unwrap()
            .into_iter()
            .map(|(n, c, s)| (n, (c, s)))
            .collect();
        assert_eq!(rfm, rfm_reference(&w.facts, today));
    }
}

/// Every query's KPIs over `facts`: the world's, or a segment's members' with `segment`.
async fn check_over(r: &Reporting, w: &World, facts: &[Fact], segment: &str, seed: u64) {
    for q in queries(w, seed) {
        let req = segment_request(&q, segment);
        // Without the ledger: what category intersection and uplift ask for.
        let view = r.view(&req, false).await.unwrap();
        let unfiltered = q.stores.is_empty() && q.brands.is_empty() && q.channels.is_empty();
        let by_time = matches!(
            q.group,
            Group::None | Group::Day | Group::Week | Group::Month
        );
        if unfiltered && by_time {
            assert_eq!(
                answer(r, &q, segment, LEDGER_KPIS).await,
                reference_with(facts, &w.facts, &q, LEDGER_KPIS),
                "{q:?}"
            );
        } else {
            assert!(r.kpis(&view, &req, LEDGER_KPIS, q.group).is_err(), "{q:?}");
        }
        let kpis: Vec<Kpi> = match q.group {
            Group::Campaign | Group::Code => RECEIPT_KPIS.to_vec(),
            Group::Day | Group::Week | Group::Month => {
                RECEIPT_KPIS.iter().chain(MEMBER_KPIS).copied().collect()
            }
            _ => RECEIPT_KPIS
                .iter()
                .chain(MEMBER_KPIS)
                .chain(SHARE_KPIS)
                .copied()
                .collect(),
        };
        assert_eq!(
            answer(r, &q, segment, &kpis).await,
            reference_with(facts, &w.facts, &q, &kpis),
            "{q:?}"
        );
        // Category intersection and uplift over the same scope.
        let (purchases, refunds, _) = unique(facts);
        let in_scope =
            |p: &Purchase| p.day >= q.from && p.day <= q.to && admitted(&q, &p.outlet, p.channel);
        let buyers = |c: &str| -> BTreeSet<String> {
            purchases
                .iter()
                .filter(|p| in_scope(p) && p.lines.iter().any(|l| l.category == c))
                .filter_map(|p| p.member_id.clone())
                .collect()
        };
        let (a, b) = (buyers("c0"), buyers("c1"));
        let got = r.category_intersection(&view, &req, "c0", "c1").unwrap();
        assert_eq!(got, (a.len() as u64, a.intersection(&b).count() as u64));
        let u = r.uplift(&view, &req, "k1").unwrap();
        let (mut target, mut control) = (BTreeSet::new(), BTreeSet::new());
        let (mut tp, mut cp) = (Decimal::ZERO, Decimal::ZERO);
        for p in purchases.iter().filter(|p| in_scope(p)) {
            let Some(m) = &p.member_id else { continue };
            if p.campaign_ids.iter().any(|c| c == "k1") {
                target.insert(m.clone());
                tp += p.paid;
            }
            if p.held_out_campaign_ids.iter().any(|c| c == "k1") {
                control.insert(m.clone());
                cp += p.paid;
            }
        }
        for x in refunds
            .iter()
            .filter(|x| x.day >= q.from && x.day <= q.to && admitted(&q, &x.outlet, x.channel))
        {
            if x.member_id.is_none() {
                continue;
            }
            if x.campaign_ids.iter().any(|c| c == "k1") {
                tp -= x.refunded;
            }
            if x.held_out_campaign_ids.iter().any(|c| c == "k1") {
                cp -= x.refunded;
            }
        }
        assert_eq!(
            (u.target_members, u.control_members),
            (target.len() as u64, control.len() as u64)
        );
        if !target.is_empty() {
            assert_eq!(
                u.target_average,
                (tp / Decimal::from(target.len())).round_dp(2)
            );
        }
        if !control.is_empty() {
            assert_eq!(
                u.control_average,
                (cp / Decimal::from(control.len())).round_dp(2)
            );
        }
    }
}

fn deliver(facts: &[Fact], rng: &mut StdRng) -> Vec<TenantFact> {
    let mut events: Vec<TenantFact> = facts
        .iter()
        .map(|f| TenantFact {
            tenant_id: T.into(),
            fact: f.clone(),
        })
        .collect();
    // Redelivery: a third of the events arrive twice.
    let again: Vec<TenantFact> = events
        .iter()
        .filter(|_| rng.random_bool(0.33))
        .cloned()
        .collect();
    events.extend(again);
    events.shuffle(rng);
    events
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn every_kpi_equals_its_recomputation_from_the_facts(seed in any::<u64>()) {
        let w = world(seed);
        let mut rng = StdRng::seed_from_u64(seed);
        let events = deliver(&w.facts, &mut rng);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reporting.redb");
        rt().block_on(async {
            // Half the stream, a restart, then the rest with the first half again.
            let cut = events.len() / 2;
            {
                let r = open(&path).await;
                for batch in events[..cut].chunks(7) {
                    r.ingest(batch.to_vec()).await.unwrap();
                }
            }
            let r = open(&path).await;
            for batch in events[cut..].chunks(5).chain(events[..cut].chunks(11)) {
                r.ingest(batch.to_vec()).await.unwrap();
            }
            check(&r, &w, seed).await;
            // And once more from the stored facts alone.
            drop(r);
            check(&open(&path).await, &w, seed).await;
        });
    }
}

/// A population built the case studies' way: members buy twice as often as anonymous
/// shoppers' receipts would suggest, and their check is 30% higher. The KPIs give back
/// exactly the shape that was constructed.
#[test]
fn the_case_study_shape_comes_back_as_constructed() {
    let store = Outlet {
        store_id: "s".into(),
        brand: "b".into(),
        region: "r".into(),
    };
    let mut facts = Vec::new();
    let mut receipt = 0;
    let mut push = |member: Option<String>, paid: i64, day: Day| {
        receipt += 1;
        facts.push(TenantFact {
            tenant_id: T.into(),
            fact: Fact::Purchase(Purchase {
                cashier_id: String::new(),
                receipt_id: format!("r{receipt}"),
                outlet: store.clone(),
                time_zone: "UTC".into(),
                channel: Channel::Store,
                member_id: member,
                time: day * DAY_MS,
                day,
                lines: vec![],
                gross: Decimal::from(paid),
                discount: Decimal::ZERO,
                paid: Decimal::from(paid),
                points_accrued: 0,
                points_redeemed: 0,
                codes: vec![],
                campaign_ids: vec![],
                held_out_campaign_ids: vec![],
                coupon_codes: Vec::new(),
            }),
        });
    };
    // 500 members, two receipts each of 1,300; 1,000 anonymous receipts of 1,000.
    for m in 0..500 {
        push(Some(format!("m{m}")), 1300, BASE + m % 30);
        push(Some(format!("m{m}")), 1300, BASE + 1 + m % 29);
    }
    for a in 0..1000 {
        push(None, 1000, BASE + a % 30);
    }
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let r = open(&dir.path().join("reporting.redb")).await;
        r.ingest(facts).await.unwrap();
        let q = Query {
            from: BASE,
            to: BASE + 29,
            stores: vec![],
            brands: vec![],
            channels: vec![],
            group: Group::None,
        };
        let a = answer(
            &r,
            &q,
            "",
            &[
                Kpi::PenetrationReceipts,
                Kpi::PenetrationAmount,
                Kpi::AverageCheckWithCard,
                Kpi::AverageCheckWithoutCard,
                Kpi::RepeatPurchaseRate,
                Kpi::ActiveMembers,
            ],
        )
        .await;
        let v = |k: Kpi| a[&(k, String::new())].0;
        assert_eq!(
            v(Kpi::PenetrationReceipts),
            Decimal::new(5, 1),
            "1,000 of 2,000 receipts"
        );
        assert_eq!(
            v(Kpi::PenetrationAmount),
            Decimal::new(565217, 6),
            "1.3M of 2.3M"
        );
        assert_eq!(v(Kpi::AverageCheckWithCard), Decimal::from(1300));
        assert_eq!(v(Kpi::AverageCheckWithoutCard), Decimal::from(1000));
        assert_eq!(
            v(Kpi::AverageCheckWithCard) / v(Kpi::AverageCheckWithoutCard),
            Decimal::new(13, 1)
        );
        assert_eq!(
            v(Kpi::RepeatPurchaseRate),
            Decimal::ONE,
            "every member bought twice"
        );
        assert_eq!(v(Kpi::ActiveMembers), Decimal::from(500));
    });
}

#[test]
fn bad_queries_are_refused_with_their_field() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let r = open(&dir.path().join("reporting.redb")).await;
        r.ingest(vec![crate::store::conformance::purchase(T, "r", BASE)])
            .await
            .unwrap();
        let ok = Query {
            from: BASE,
            to: BASE,
            stores: vec![],
            brands: vec![],
            channels: vec![],
            group: Group::None,
        };
        let all = View::default();
        let field = |req: Request| match r.kpis(&all, &req, &[Kpi::Sales], Group::None) {
            Err(loyalty_platform::Error::InvalidArgument(v)) => v[0].field.clone(),
            other => panic!("expected a violation, got {other:?}"),
        };
        let mut inverted = request(&ok);
        inverted.period = Period {
            start: Some(10 * DAY_MS),
            end: Some(DAY_MS),
        };
        assert_eq!(field(inverted), "period");
        let mut long = request(&ok);
        long.period.end = Some(long.period.start.unwrap() + 2000 * DAY_MS);
        assert_eq!(field(long), "period");
        let mut unknown = request(&ok);
        unknown.filter.stores = vec!["nowhere".into()];
        assert_eq!(field(unknown), "filter.store_ids[0]");
        let mut tz = request(&ok);
        tz.time_zone = "Mars/Olympus".into();
        assert_eq!(field(tz), "time_zone");
        let mut open_ended = request(&ok);
        open_ended.period.end = None;
        assert_eq!(field(open_ended), "period.end_time");
        let mut by_store = request(&ok);
        by_store.filter.stores = vec!["s".into()];
        match r.kpis(&all, &by_store, &[Kpi::PointsLiability], Group::None) {
            Err(loyalty_platform::Error::InvalidArgument(v)) => assert_eq!(v[0].field, "filter"),
            other => panic!("ledger KPIs are chain-wide, got {other:?}"),
        }
        assert_eq!(
            r.kpis(&all, &request(&ok), &[Kpi::Sales], Group::None)
                .unwrap()[0]
                .value,
            Decimal::TEN
        );
        // A segment filter needs segmentation, and names a segment it knows.
        let mut segment = request(&ok);
        segment.filter.segment = "vip".into();
        assert!(matches!(
            r.view(&segment, false).await,
            Err(loyalty_platform::Error::FailedPrecondition(_))
        ));
        segment.filter.segment = "x".repeat(MAX_ID_LEN + 1);
        match r.view(&segment, false).await {
            Err(loyalty_platform::Error::InvalidArgument(v)) => {
                assert_eq!(v[0].field, "filter.segment_id");
            }
            other => panic!("expected a violation, got {other:?}"),
        }
    });
}
