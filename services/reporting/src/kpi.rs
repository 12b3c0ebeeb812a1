//! The KPIs, defined as code over the rollups. docs/kpis.md states each one in words; the
//! property test in `tests` checks each against a straightforward recomputation from the
//! raw facts.

use std::collections::{BTreeMap, BTreeSet};

use loyalty_platform::calendar::{Day, civil};
use loyalty_platform::error::{Error, Result};
use loyalty_platform::rfm;
use loyalty_platform::types::Channel;
use roaring::RoaringBitmap;
use rust_decimal::Decimal;

use crate::rollup::{CHANNELS, CellKey, Measures, Rollups, SliceKey, channel_index, channel_name};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kpi {
    PenetrationAmount,
    PenetrationReceipts,
    AverageCheckWithCard,
    AverageCheckWithoutCard,
    SalesWithCard,
    SalesWithoutCard,
    ReceiptsWithCard,
    ReceiptsWithoutCard,
    RedemptionRate,
    BreakageRate,
    RepeatPurchaseRate,
    ContactableShare,
    NoQuestionnaireShare,
    NewMembers,
    ActiveMembers,
    PointsAccrued,
    PointsRedeemed,
    PointsExpired,
    PointsLiability,
    CodeUsage,
    AverageCheckWithCode,
    AverageCheckWithoutCode,
    Sales,
    Receipts,
    AverageCheck,
    Discounts,
}

/// What a KPI is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Sums over receipts and refunds.
    Receipts,
    /// Distinct buyers.
    Buyers,
    /// Members' registrations and profiles.
    Members,
    /// The points ledger.
    Ledger,
}

impl Kpi {
    fn source(self) -> Source {
        use Kpi::*;
        match self {
            RepeatPurchaseRate | ActiveMembers => Source::Buyers,
            ContactableShare | NoQuestionnaireShare | NewMembers => Source::Members,
            BreakageRate | PointsExpired | PointsLiability => Source::Ledger,
            _ => Source::Receipts,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    None,
    Day,
    Week,
    Month,
    Store,
    Brand,
    Region,
    Channel,
    Campaign,
    Code,
}

/// Which facts count: business days `from..=to` and every non-empty list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub from: Day,
    pub to: Day,
    pub stores: BTreeSet<String>,
    pub brands: BTreeSet<String>,
    pub regions: BTreeSet<String>,
    pub channels: BTreeSet<Channel>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    pub kpi: Kpi,
    pub group: String,
    pub value: Decimal,
    /// Ratios' parts (for sums: the value and 1).
    pub numerator: Decimal,
    pub denominator: Decimal,
}

/// Most groups one answer holds.
pub const MAX_GROUPS: usize = 100_000;

pub fn date_label(day: Day) -> String {
    let (y, m, d) = civil(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The first day of the group a day falls in.
fn period_start(day: Day, group: Group) -> Day {
    match group {
        // 1970-01-01 was a Thursday: Monday is three days earlier.
        Group::Week => day - (day + 3).rem_euclid(7),
        Group::Month => {
            let (y, m, _) = civil(day);
            loyalty_platform::calendar::day_from_civil(y, m, 1)
        }
        _ => day,
    }
}

/// Ratio with exact parts; 0 when the denominator is.
fn ratio(kpi: Kpi, group: String, n: Decimal, d: Decimal) -> Value {
    let value = if d.is_zero() {
        Decimal::ZERO
    } else {
        (n / d).round_dp(6).normalize()
    };
    Value {
        kpi,
        group,
        value,
        numerator: n,
        denominator: d,
    }
}

fn sum(kpi: Kpi, group: String, v: Decimal) -> Value {
    Value {
        kpi,
        group,
        value: v.normalize(),
        numerator: v,
        denominator: Decimal::ONE,
    }
}

/// Measures split by identified (first index) and with a code (second).
#[derive(Debug, Clone, Copy, Default)]
pub struct Split([[Measures; 2]; 2]);

impl Split {
    fn add(&mut self, key: &CellKey, m: &Measures) {
        self.0[usize::from(key.identified)][usize::from(key.with_code)].add(m);
    }

    fn pick(&self, identified: Option<bool>, coded: Option<bool>) -> Measures {
        let mut out = Measures::default();
        for i in [false, true] {
            for c in [false, true] {
                if identified.is_none_or(|x| x == i) && coded.is_none_or(|x| x == c) {
                    out.add(&self.0[usize::from(i)][usize::from(c)]);
                }
            }
        }
        out
    }

    fn value(&self, kpi: Kpi, group: String) -> Value {
        use Kpi::*;
        let all = self.pick(None, None);
        let card = self.pick(Some(true), None);
        let anon = self.pick(Some(false), None);
        let code = self.pick(None, Some(true));
        let no_code = self.pick(None, Some(false));
        let receipts = |m: &Measures| Decimal::from(m.net_receipts());
        match kpi {
            PenetrationAmount => ratio(kpi, group, card.sales(), all.sales()),
            PenetrationReceipts => ratio(kpi, group, receipts(&card), receipts(&all)),
            AverageCheckWithCard => ratio(kpi, group, card.sales(), receipts(&card)),
            AverageCheckWithoutCard => ratio(kpi, group, anon.sales(), receipts(&anon)),
            SalesWithCard => sum(kpi, group, card.sales()),
            SalesWithoutCard => sum(kpi, group, anon.sales()),
            ReceiptsWithCard => sum(kpi, group, receipts(&card)),
            ReceiptsWithoutCard => sum(kpi, group, receipts(&anon)),
            RedemptionRate => ratio(
                kpi,
                group,
                Decimal::from(all.net_points_redeemed()),
                Decimal::from(all.net_points_accrued()),
            ),
            PointsAccrued => sum(kpi, group, Decimal::from(all.net_points_accrued())),
            PointsRedeemed => sum(kpi, group, Decimal::from(all.net_points_redeemed())),
            CodeUsage => sum(kpi, group, receipts(&code)),
            AverageCheckWithCode => ratio(kpi, group, code.sales(), receipts(&code)),
            AverageCheckWithoutCode => ratio(kpi, group, no_code.sales(), receipts(&no_code)),
            Sales => sum(kpi, group, all.sales()),
            Receipts => sum(kpi, group, receipts(&all)),
            AverageCheck => ratio(kpi, group, all.sales(), receipts(&all)),
            Discounts => sum(kpi, group, all.discount),
            _ => sum(kpi, group, Decimal::ZERO),
        }
    }
}

/// Which outlets a scope admits, by outlet number.
fn admitted(r: &Rollups, scope: &Scope) -> Vec<bool> {
    r.outlets
        .iter()
        .map(|(_, o)| {
            (scope.stores.is_empty() || scope.stores.contains(&o.store_id))
                && (scope.brands.is_empty() || scope.brands.contains(&o.brand))
                && (scope.regions.is_empty() || scope.regions.contains(&o.region))
        })
        .collect()
}

fn channels(scope: &Scope) -> [bool; CHANNELS.len()] {
    let mut out = [scope.channels.is_empty(); CHANNELS.len()];
    for c in &scope.channels {
        out[usize::from(channel_index(*c))] = true;
    }
    out
}

/// The group label of a slice; None when the grouping is by campaign or code (handled by
/// the caller).
fn label(r: &Rollups, group: Group, day: Day, outlet: u32, channel: u8) -> String {
    match group {
        Group::None | Group::Campaign | Group::Code => String::new(),
        Group::Day | Group::Week | Group::Month => date_label(period_start(day, group)),
        Group::Store => r.outlets.value(outlet).store_id.clone(),
        Group::Brand => r.outlets.value(outlet).brand.clone(),
        Group::Region => r.outlets.value(outlet).region.clone(),
        Group::Channel => channel_name(CHANNELS[usize::from(channel)]).to_string(),
    }
}

fn check_groups(n: usize) -> Result<()> {
    if n > MAX_GROUPS {
        return Err(Error::invalid(
            "group_by",
            format!(
                "the answer would have more than {MAX_GROUPS} groups; narrow the period or the filter"
            ),
        ));
    }
    Ok(())
}

fn receipt_groups(r: &Rollups, scope: &Scope, group: Group) -> Result<BTreeMap<String, Split>> {
    let outlets = admitted(r, scope);
    let chans = channels(scope);
    let range = CellKey::first_of(scope.from)..=CellKey::last_of(scope.to);
    let mut out: BTreeMap<String, Split> = BTreeMap::new();
    let mut fold = |cells: &BTreeMap<CellKey, Measures>, name: &str| {
        for (k, m) in cells.range(range.clone()) {
            if !outlets[k.outlet as usize] || !chans[usize::from(k.channel)] {
                continue;
            }
            let g = match group {
                Group::Campaign | Group::Code => name.to_string(),
                _ => label(r, group, k.day, k.outlet, k.channel),
            };
            out.entry(g).or_default().add(k, m);
        }
    };
    match group {
        Group::Campaign => {
            for (id, cells) in &r.by_campaign {
                fold(cells, r.campaigns.value(*id));
            }
        }
        Group::Code => {
            for (id, cells) in &r.by_code {
                fold(cells, r.codes.value(*id));
            }
        }
        _ => fold(&r.cells, ""),
    }
    if group == Group::None && out.is_empty() {
        out.insert(String::new(), Split::default());
    }
    check_groups(out.len())?;
    Ok(out)
}

/// Member sets of the scope's slices, grouped.
fn slices<'a, T>(
    r: &Rollups,
    scope: &Scope,
    group: Group,
    sets: &'a BTreeMap<SliceKey, T>,
) -> BTreeMap<String, Vec<&'a T>> {
    let outlets = admitted(r, scope);
    let chans = channels(scope);
    let mut out: BTreeMap<String, Vec<&T>> = BTreeMap::new();
    for ((day, outlet, channel), set) in
        sets.range((scope.from, 0, 0)..=(scope.to, u32::MAX, u8::MAX))
    {
        if outlets[*outlet as usize] && chans[usize::from(*channel)] {
            out.entry(label(r, group, *day, *outlet, *channel))
                .or_default()
                .push(set);
        }
    }
    out
}

fn buyer_values(r: &Rollups, scope: &Scope, group: Group, kpis: &[Kpi]) -> Result<Vec<Value>> {
    let mut groups = slices(r, scope, group, &r.buyers);
    if group == Group::None && groups.is_empty() {
        groups.insert(String::new(), Vec::new());
    }
    check_groups(groups.len())?;
    let mut out = Vec::new();
    for (g, sets) in groups {
        // Members seen in two slices, or twice in one, bought at least twice.
        let mut seen = RoaringBitmap::new();
        let mut twice = RoaringBitmap::new();
        for b in sets {
            twice |= &seen & &b.once;
            twice |= &b.again;
            seen |= &b.once;
        }
        for &kpi in kpis {
            out.push(match kpi {
                Kpi::ActiveMembers => sum(kpi, g.clone(), Decimal::from(seen.len())),
                _ => ratio(
                    kpi,
                    g.clone(),
                    Decimal::from(twice.len()),
                    Decimal::from(seen.len()),
                ),
            });
        }
    }
    Ok(out)
}

/// Registration-based KPIs: new members registered in the period, and shares of the
/// members registered by its end who are not erased. The store, brand and region are those
/// of the store the member registered in, the channel the one they registered through.
fn member_values(
    r: &Rollups,
    scope: &Scope,
    group: Group,
    kpis: &[Kpi],
    day_of: &dyn Fn(i64) -> Day,
) -> Result<Vec<Value>> {
    let outlets = admitted(r, scope);
    let chans = channels(scope);
    let store_outlet =
        |store: &str| -> Option<u32> { r.stores.get(store).and_then(|s| s.iter().next().copied()) };
    let filtered =
        !(scope.stores.is_empty() && scope.brands.is_empty() && scope.regions.is_empty());
    // (new, population, contactable, without a questionnaire) per group.
    let mut groups: BTreeMap<String, [i64; 4]> = BTreeMap::new();
    for m in r.profiles.values() {
        let outlet = store_outlet(&m.store_id);
        let admitted_here = match outlet {
            Some(o) => outlets[o as usize],
            None => !filtered || scope.stores.contains(&m.store_id),
        };
        if !admitted_here || !chans[usize::from(channel_index(m.channel))] {
            continue;
        }
        let day = m.registered_at.map(day_of);
        let g = match (group, outlet) {
            (Group::Store, _) => m.store_id.clone(),
            (Group::Brand, Some(o)) => r.outlets.value(o).brand.clone(),
            (Group::Region, Some(o)) => r.outlets.value(o).region.clone(),
            (Group::Brand | Group::Region, None) => String::new(),
            (Group::Channel, _) => channel_name(m.channel).to_string(),
            (Group::Day | Group::Week | Group::Month, _) => match day {
                Some(d) => date_label(period_start(d, group)),
                None => continue,
            },
            _ => String::new(),
        };
        let counts = groups.entry(g).or_default();
        if day.is_some_and(|d| d >= scope.from && d <= scope.to) {
            counts[0] += 1;
        }
        if m.active && day.is_none_or(|d| d <= scope.to) {
            counts[1] += 1;
            counts[2] += i64::from(m.contactable);
            counts[3] += i64::from(!m.questionnaire_complete);
        }
    }
    if group == Group::None && groups.is_empty() {
        groups.insert(String::new(), [0; 4]);
    }
    check_groups(groups.len())?;
    let mut out = Vec::new();
    for (g, c) in groups {
        for &kpi in kpis {
            let d = Decimal::from;
            out.push(match kpi {
                Kpi::NewMembers => sum(kpi, g.clone(), d(c[0])),
                Kpi::ContactableShare => ratio(kpi, g.clone(), d(c[2]), d(c[1])),
                _ => ratio(kpi, g.clone(), d(c[3]), d(c[1])),
            });
        }
    }
    Ok(out)
}

/// Every KPI asked, in the order asked, each over the scope and grouped.
pub fn compute(
    r: &Rollups,
    kpis: &[Kpi],
    scope: &Scope,
    group: Group,
    day_of: &dyn Fn(i64) -> Day,
) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for &kpi in kpis {
        match (kpi.source(), group) {
            (Source::Ledger, _) => {
                return Err(Error::FailedPrecondition(format!(
                    "{kpi:?} needs the points ledger's entries (expiries), which reporting does not receive yet"
                )));
            }
            (Source::Buyers | Source::Members, Group::Campaign | Group::Code) => {
                return Err(Error::invalid(
                    "group_by",
                    format!("{kpi:?} counts members and cannot be grouped by campaign or code"),
                ));
            }
            (Source::Members, Group::Day | Group::Week | Group::Month)
                if kpi != Kpi::NewMembers =>
            {
                return Err(Error::invalid(
                    "group_by",
                    format!(
                        "{kpi:?} is a share of the members registered by the period's end and has no series"
                    ),
                ));
            }
            _ => {}
        }
    }
    let mut receipts_groups = None;
    for &kpi in kpis {
        match kpi.source() {
            Source::Receipts => {
                if receipts_groups.is_none() {
                    receipts_groups = Some(receipt_groups(r, scope, group)?);
                }
                if let Some(groups) = &receipts_groups {
                    out.extend(groups.iter().map(|(g, s)| s.value(kpi, g.clone())));
                }
            }
            Source::Buyers => out.extend(buyer_values(r, scope, group, &[kpi])?),
            Source::Members => out.extend(member_values(r, scope, group, &[kpi], day_of)?),
            Source::Ledger => {}
        }
    }
    Ok(out)
}

/// Of the members who bought category A in the scope, those who also bought B.
pub fn category_intersection(r: &Rollups, scope: &Scope, a: &str, b: &str) -> (u64, u64) {
    let members = |category: &str| -> RoaringBitmap {
        let mut set = RoaringBitmap::new();
        let Some(sets) = r
            .categories
            .get(&category.to_string())
            .and_then(|id| r.category_buyers.get(&id))
        else {
            return set;
        };
        for s in slices(r, scope, Group::None, sets).into_values().flatten() {
            set |= s;
        }
        set
    };
    let in_a = members(a);
    let both = &in_a & &members(b);
    (in_a.len(), both.len())
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uplift {
    pub target_members: u64,
    pub control_members: u64,
    pub target_average: Decimal,
    pub control_average: Decimal,
    /// (target − control) / control × 100; None when the control spent nothing.
    pub uplift_percent: Option<Decimal>,
}

pub fn uplift(r: &Rollups, scope: &Scope, campaign: &str) -> Uplift {
    let Some(sets) = r
        .campaigns
        .get(&campaign.to_string())
        .and_then(|id| r.exposure.get(&id))
    else {
        return Uplift::default();
    };
    let (mut target, mut control) = (RoaringBitmap::new(), RoaringBitmap::new());
    let (mut target_paid, mut control_paid) = (Decimal::ZERO, Decimal::ZERO);
    for e in slices(r, scope, Group::None, sets).into_values().flatten() {
        target |= &e.target;
        control |= &e.control;
        target_paid += e.target_paid;
        control_paid += e.control_paid;
    }
    let average = |paid: Decimal, n: u64| {
        if n == 0 {
            Decimal::ZERO
        } else {
            (paid / Decimal::from(n)).round_dp(2)
        }
    };
    let (ta, ca) = (
        average(target_paid, target.len()),
        average(control_paid, control.len()),
    );
    Uplift {
        target_members: target.len(),
        control_members: control.len(),
        target_average: ta,
        control_average: ca,
        uplift_percent: (!ca.is_zero()).then(|| ((ta - ca) / ca * Decimal::from(100)).round_dp(2)),
    }
}

/// Members and their spend per named RFM segment, scored over the 365 days through
/// `today` (receipts and spend net of refunds; members with no receipt left are not scored).
pub fn rfm_overview(r: &Rollups, today: Day) -> Vec<(rfm::Named, u64, Decimal)> {
    let from = today - 364;
    let mut inputs = Vec::new();
    for (m, days) in &r.member_days {
        let (mut frequency, mut monetary, mut last) = (0i64, Decimal::ZERO, None);
        for (day, d) in days.range(from..=today) {
            frequency += d.receipts;
            monetary += d.paid;
            if d.receipts > 0 {
                last = Some(*day);
            }
        }
        if let (true, Some(last)) = (frequency > 0, last) {
            inputs.push(rfm::Inputs {
                member_id: r.members.value(*m).clone(),
                recency_days: today - last,
                frequency,
                monetary,
            });
        }
    }
    let scores = rfm::score_all(&inputs);
    let mut by: BTreeMap<&'static str, (rfm::Named, u64, Decimal)> = BTreeMap::new();
    for (i, s) in inputs.iter().zip(scores) {
        let e = by
            .entry(s.named.as_str())
            .or_insert((s.named, 0, Decimal::ZERO));
        e.1 += 1;
        e.2 += i.monetary;
    }
    by.into_values().collect()
}
