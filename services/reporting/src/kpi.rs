//! The KPIs, defined as code over the rollups. docs/kpis.md states each one in words; the
//! property test in `tests` checks each against a straightforward recomputation from the
//! raw facts.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use loyalty_platform::calendar::{Day, civil};
use loyalty_platform::error::{Error, Result};
use loyalty_platform::rfm;
use loyalty_platform::types::Channel;
use roaring::RoaringBitmap;
use rust_decimal::Decimal;

use crate::rollup::{
    Buyers, CHANNELS, Cells, LEDGER_BUCKET_MS, Measures, Rollups, SliceKey, Slot, channel_index,
    channel_name, money,
};

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
    CrossBrandShare,
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
    /// Distinct buyers and the brands of the stores they bought at.
    Brands,
}

impl Kpi {
    /// Whether the KPI is read from the points ledger.
    pub fn reads_ledger(self) -> bool {
        self.source() == Source::Ledger
    }

    fn source(self) -> Source {
        use Kpi::*;
        match self {
            RepeatPurchaseRate | ActiveMembers => Source::Buyers,
            ContactableShare | NoQuestionnaireShare | NewMembers => Source::Members,
            BreakageRate | PointsExpired | PointsLiability => Source::Ledger,
            CrossBrandShare => Source::Brands,
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

/// Sums of measures, money in [`crate::rollup::units`] with room for any total.
#[derive(Debug, Clone, Copy, Default)]
struct Sums {
    receipts: i64,
    fully_refunded: i64,
    discount: i128,
    paid: i128,
    refunded: i128,
    points_accrued: i128,
    points_reversed: i128,
    points_redeemed: i128,
    points_returned: i128,
}

impl Sums {
    fn add(&mut self, m: &Measures) {
        self.receipts += m.receipts;
        self.fully_refunded += m.fully_refunded;
        self.discount += i128::from(m.discount);
        self.paid += i128::from(m.paid);
        self.refunded += i128::from(m.refunded);
        self.points_accrued += i128::from(m.points_accrued);
        self.points_reversed += i128::from(m.points_reversed);
        self.points_redeemed += i128::from(m.points_redeemed);
        self.points_returned += i128::from(m.points_returned);
    }

    fn merge(&mut self, o: &Sums) {
        self.receipts += o.receipts;
        self.fully_refunded += o.fully_refunded;
        self.discount += o.discount;
        self.paid += o.paid;
        self.refunded += o.refunded;
        self.points_accrued += o.points_accrued;
        self.points_reversed += o.points_reversed;
        self.points_redeemed += o.points_redeemed;
        self.points_returned += o.points_returned;
    }

    /// Receipts that still count: committed and not refunded in full.
    fn receipts(&self) -> Decimal {
        Decimal::from(self.receipts - self.fully_refunded)
    }

    /// Money paid, less money refunded.
    fn sales(&self) -> Decimal {
        money(self.paid - self.refunded)
    }

    fn accrued(&self) -> Decimal {
        Decimal::from_i128_with_scale(self.points_accrued - self.points_reversed, 0)
    }

    fn redeemed(&self) -> Decimal {
        Decimal::from_i128_with_scale(self.points_redeemed - self.points_returned, 0)
    }
}

/// Sums split by identified (first index) and with a code (second).
#[derive(Debug, Clone, Copy, Default)]
pub struct Split([[Sums; 2]; 2]);

impl Split {
    fn add(&mut self, slot: &Slot, m: &Measures) {
        self.0[usize::from(slot.identified)][usize::from(slot.with_code)].add(m);
    }

    fn pick(&self, identified: Option<bool>, coded: Option<bool>) -> Sums {
        let mut out = Sums::default();
        for i in [false, true] {
            for c in [false, true] {
                if identified.is_none_or(|x| x == i) && coded.is_none_or(|x| x == c) {
                    out.merge(&self.0[usize::from(i)][usize::from(c)]);
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
        match kpi {
            PenetrationAmount => ratio(kpi, group, card.sales(), all.sales()),
            PenetrationReceipts => ratio(kpi, group, card.receipts(), all.receipts()),
            AverageCheckWithCard => ratio(kpi, group, card.sales(), card.receipts()),
            AverageCheckWithoutCard => ratio(kpi, group, anon.sales(), anon.receipts()),
            SalesWithCard => sum(kpi, group, card.sales()),
            SalesWithoutCard => sum(kpi, group, anon.sales()),
            ReceiptsWithCard => sum(kpi, group, card.receipts()),
            ReceiptsWithoutCard => sum(kpi, group, anon.receipts()),
            RedemptionRate => ratio(kpi, group, all.redeemed(), all.accrued()),
            PointsAccrued => sum(kpi, group, all.accrued()),
            PointsRedeemed => sum(kpi, group, all.redeemed()),
            CodeUsage => sum(kpi, group, code.receipts()),
            AverageCheckWithCode => ratio(kpi, group, code.sales(), code.receipts()),
            AverageCheckWithoutCode => ratio(kpi, group, no_code.sales(), no_code.receipts()),
            Sales => sum(kpi, group, all.sales()),
            Receipts => sum(kpi, group, all.receipts()),
            AverageCheck => ratio(kpi, group, all.sales(), all.receipts()),
            Discounts => sum(kpi, group, money(all.discount)),
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

fn month_number(day: Day) -> i64 {
    let (y, m, _) = civil(day);
    i64::from(y) * 12 + i64::from(m) - 1
}

/// Numbers the groups of a scope: which slices it admits and the group each falls in, by
/// dense index, with the labels made once at the end.
struct Grouper {
    group: Group,
    from: Day,
    outlets: Vec<bool>,
    channels: [bool; CHANNELS.len()],
    /// Store, brand or region grouping: each outlet's group.
    outlet_group: Vec<usize>,
    names: Vec<String>,
}

impl Grouper {
    fn new(r: &Rollups, scope: &Scope, group: Group) -> Self {
        let mut names: Vec<String> = Vec::new();
        let mut outlet_group = Vec::new();
        if matches!(group, Group::Store | Group::Brand | Group::Region) {
            let mut ids: HashMap<&str, usize> = HashMap::new();
            for (_, o) in r.outlets.iter() {
                let name = match group {
                    Group::Store => o.store_id.as_str(),
                    Group::Brand => o.brand.as_str(),
                    _ => o.region.as_str(),
                };
                let next = ids.len();
                let id = *ids.entry(name).or_insert(next);
                if id == names.len() {
                    names.push(name.to_string());
                }
                outlet_group.push(id);
            }
        }
        let from = period_start(scope.from, group);
        match group {
            Group::Day | Group::Week => {
                let step = if group == Group::Week { 7 } else { 1 };
                let mut d = from;
                while d <= scope.to {
                    names.push(date_label(d));
                    d += step;
                }
            }
            Group::Month => {
                for m in month_number(scope.from)..=month_number(scope.to) {
                    let (y, mo) = (m.div_euclid(12) as i32, (m.rem_euclid(12) + 1) as u32);
                    names.push(date_label(loyalty_platform::calendar::day_from_civil(
                        y, mo, 1,
                    )));
                }
            }
            Group::Channel => {
                names = CHANNELS
                    .iter()
                    .map(|c| channel_name(*c).to_string())
                    .collect();
            }
            Group::None | Group::Campaign | Group::Code => names.push(String::new()),
            Group::Store | Group::Brand | Group::Region => {}
        }
        Self {
            group,
            from,
            outlets: admitted(r, scope),
            channels: channels(scope),
            outlet_group,
            names,
        }
    }

    /// The group of a slice, None when the scope leaves it out.
    #[inline]
    fn index(&self, day: Day, outlet: u32, channel: u8) -> Option<usize> {
        if !self.outlets[outlet as usize] || !self.channels[usize::from(channel)] {
            return None;
        }
        Some(match self.group {
            Group::Day | Group::Week | Group::Month => self.day_index(day),
            Group::None | Group::Campaign | Group::Code => 0,
            Group::Store | Group::Brand | Group::Region => self.outlet_group[outlet as usize],
            Group::Channel => usize::from(channel),
        })
    }

    /// The group of a day when grouping by time (0 otherwise).
    fn day_index(&self, day: Day) -> usize {
        match self.group {
            Group::Day => (day - self.from) as usize,
            Group::Week => ((day - self.from) / 7) as usize,
            Group::Month => (month_number(day) - month_number(self.from)) as usize,
            _ => 0,
        }
    }

    fn len(&self) -> usize {
        self.names.len()
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

fn receipt_groups(r: &Rollups, scope: &Scope, group: Group) -> Result<Vec<(String, Split)>> {
    let g = Grouper::new(r, scope, group);
    let fold = |cells: &Cells, into: &mut Vec<Option<Split>>| {
        for (day, slots) in cells.range(scope.from, scope.to) {
            for (slot, m) in slots {
                if let Some(i) = g.index(day, slot.outlet, slot.channel) {
                    into[i].get_or_insert_with(Split::default).add(slot, m);
                }
            }
        }
    };
    let mut out: Vec<(String, Split)> = Vec::new();
    match group {
        Group::Campaign | Group::Code => {
            let (maps, names) = if group == Group::Campaign {
                (&r.by_campaign, &r.campaigns)
            } else {
                (&r.by_code, &r.codes)
            };
            for (id, cells) in maps {
                let mut one = vec![None];
                fold(cells, &mut one);
                if let Some(split) = one.pop().flatten() {
                    out.push((names.value(*id).clone(), split));
                }
            }
        }
        _ => {
            let mut groups = vec![None; g.len()];
            fold(&r.cells, &mut groups);
            out.extend(
                groups
                    .into_iter()
                    .zip(g.names.iter())
                    .filter_map(|(s, name)| s.map(|s| (name.clone(), s))),
            );
        }
    }
    if group == Group::None && out.is_empty() {
        out.push((String::new(), Split::default()));
    }
    check_groups(out.len())?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Member sets of the scope's slices, by group.
fn slices<'a, T>(
    r: &Rollups,
    scope: &Scope,
    group: Group,
    sets: &'a BTreeMap<SliceKey, T>,
) -> Vec<(String, Vec<&'a T>)> {
    let g = Grouper::new(r, scope, group);
    let mut groups: Vec<Vec<&T>> = vec![Vec::new(); g.len()];
    let mut used = vec![false; g.len()];
    for ((day, outlet, channel), set) in
        sets.range((scope.from, 0, 0)..=(scope.to, u32::MAX, u8::MAX))
    {
        if let Some(i) = g.index(*day, *outlet, *channel) {
            groups[i].push(set);
            used[i] = true;
        }
    }
    let mut out: Vec<(String, Vec<&T>)> = groups
        .into_iter()
        .zip(g.names)
        .zip(used)
        .filter(|(_, used)| *used || group == Group::None)
        .map(|((sets, name), _)| (name, sets))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// How many distinct members a group's sets hold, and how many of them bought twice or more
/// (in two sets, or twice within one).
fn fold_buyers(sets: &[&Buyers]) -> (u64, u64) {
    let total: u64 = sets.iter().map(|b| b.once.len() + b.again.len()).sum();
    if sets.is_empty() {
        return (0, 0);
    }
    if total / sets.len() as u64 >= 256 {
        by_bitmaps(sets)
    } else {
        by_sorting(sets, total as usize)
    }
}

/// Few large sets (whole days): whole-bitmap operations.
fn by_bitmaps(sets: &[&Buyers]) -> (u64, u64) {
    let mut seen = RoaringBitmap::new();
    let mut twice = RoaringBitmap::new();
    for b in sets {
        twice |= &seen & &b.once;
        twice |= &b.again;
        seen |= &b.once;
    }
    (seen.len(), twice.len())
}

/// Many small sets (a store's days): the members in one array, sorted, counted in runs; a
/// member twice within a set is there twice.
fn by_sorting(sets: &[&Buyers], total: usize) -> (u64, u64) {
    let mut all: Vec<u32> = Vec::with_capacity(total);
    for b in sets {
        all.extend(b.once.iter());
        all.extend(b.again.iter());
    }
    all.sort_unstable();
    let (mut seen, mut twice) = (0, 0);
    let mut i = 0;
    while i < all.len() {
        let mut j = i + 1;
        while j < all.len() && all[j] == all[i] {
            j += 1;
        }
        seen += 1;
        twice += u64::from(j - i >= 2);
        i = j;
    }
    (seen, twice)
}

fn buyer_values(r: &Rollups, scope: &Scope, group: Group, kpis: &[Kpi]) -> Result<Vec<Value>> {
    let unfiltered = scope.stores.is_empty()
        && scope.brands.is_empty()
        && scope.regions.is_empty()
        && scope.channels.is_empty();
    let groups: Vec<(String, (u64, u64))> = match group {
        // Whole days: the per-day sets, a few hundred bitmaps for a year.
        Group::None | Group::Day | Group::Week | Group::Month if unfiltered => {
            let g = Grouper::new(r, scope, group);
            let mut per: Vec<Vec<&Buyers>> = vec![Vec::new(); g.len()];
            if scope.from <= scope.to {
                for (day, b) in r.day_buyers.range(scope.from..=scope.to) {
                    per[g.day_index(*day)].push(b);
                }
            }
            let mut out: Vec<(String, (u64, u64))> = per
                .into_iter()
                .zip(g.names)
                .filter(|(sets, _)| !sets.is_empty() || group == Group::None)
                .map(|(sets, name)| (name, fold_buyers(&sets)))
                .collect();
            out.sort_by(|a, b| a.0.cmp(&b.0));
            out
        }
        _ => slices(r, scope, group, &r.buyers)
            .into_iter()
            .map(|(name, sets)| (name, fold_buyers(&sets)))
            .collect(),
    };
    check_groups(groups.len())?;
    let mut out = Vec::new();
    for &kpi in kpis {
        for (g, (seen, twice)) in &groups {
            out.push(match kpi {
                Kpi::ActiveMembers => sum(kpi, g.clone(), Decimal::from(*seen)),
                _ => ratio(kpi, g.clone(), Decimal::from(*twice), Decimal::from(*seen)),
            });
        }
    }
    Ok(out)
}

/// Cross-brand shopping: of the members who bought in a group, the share who bought at stores
/// of two brands or more. A member's brands are those of their purchases in the period within
/// the filter; in a day, week or month series, in that day, week or month.
fn brand_values(r: &Rollups, scope: &Scope, group: Group, kpi: Kpi) -> Result<Vec<Value>> {
    let g = Grouper::new(r, scope, group);
    let series = matches!(group, Group::Day | Group::Week | Group::Month);
    let periods = if series { g.len() } else { 1 };
    let mut by_brand: Vec<HashMap<&str, RoaringBitmap>> = vec![HashMap::new(); periods];
    let mut members: Vec<RoaringBitmap> = vec![RoaringBitmap::new(); g.len()];
    let mut used = vec![false; g.len()];
    if scope.from <= scope.to {
        for ((day, outlet, channel), b) in r
            .buyers
            .range((scope.from, 0, 0)..=(scope.to, u32::MAX, u8::MAX))
        {
            let Some(i) = g.index(*day, *outlet, *channel) else {
                continue;
            };
            let brand = r.outlets.value(*outlet).brand.as_str();
            *by_brand[if series { i } else { 0 }]
                .entry(brand)
                .or_default() |= &b.once;
            members[i] |= &b.once;
            used[i] = true;
        }
    }
    // Per period, the members in two brands' sets or more.
    let multi: Vec<RoaringBitmap> = by_brand
        .iter()
        .map(|brands| {
            let (mut seen, mut twice) = (RoaringBitmap::new(), RoaringBitmap::new());
            for set in brands.values() {
                twice |= &seen & set;
                seen |= set;
            }
            twice
        })
        .collect();
    let mut out: Vec<Value> = members
        .iter()
        .zip(&g.names)
        .enumerate()
        .filter(|(i, _)| used[*i] || group == Group::None)
        .map(|(i, (set, name))| {
            let across = set.intersection_len(&multi[if series { i } else { 0 }]);
            ratio(
                kpi,
                name.clone(),
                Decimal::from(across),
                Decimal::from(set.len()),
            )
        })
        .collect();
    check_groups(out.len())?;
    out.sort_by(|a, b| a.group.cmp(&b.group));
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
    // A store that changed brand or region has several outlets: the member's registration
    // counts under the first by (brand, region), whatever order they arrived in.
    let store_outlet = |store: &str| -> Option<u32> {
        r.stores.get(store).and_then(|s| {
            s.iter().copied().min_by(|a, b| {
                let (a, b) = (r.outlets.value(*a), r.outlets.value(*b));
                (&a.brand, &a.region).cmp(&(&b.brand, &b.region))
            })
        })
    };
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
            // A series shows the period's registrations only.
            (Group::Day | Group::Week | Group::Month, _) => match day {
                Some(d) if d >= scope.from && d <= scope.to => date_label(period_start(d, group)),
                _ => continue,
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

/// The ledger's KPIs: expired points and breakage over each group, liability at each
/// group's end. Every group of the period answers, entries or not.
fn ledger_values(
    r: &Rollups,
    scope: &Scope,
    group: Group,
    kpi: Kpi,
    day_of: &dyn Fn(i64) -> Day,
) -> Vec<Value> {
    let g = Grouper::new(r, scope, group);
    let n = g.len();
    let (mut opening, mut net, mut expired, mut issued) =
        (0i128, vec![0i128; n], vec![0i128; n], vec![0i128; n]);
    // Buckets far enough past the period's last day to cover any time zone.
    let last = (scope.to + 2) * loyalty_platform::clock::DAY_MS / LEDGER_BUCKET_MS;
    for (bucket, sums) in r.ledger.range(..=last) {
        let day = day_of(bucket * LEDGER_BUCKET_MS);
        if day < scope.from {
            opening += i128::from(sums.net);
        } else if day <= scope.to {
            let i = g.day_index(day);
            net[i] += i128::from(sums.net);
            expired[i] += i128::from(sums.expired);
            issued[i] += i128::from(sums.issued);
        }
    }
    let points = |v: i128| Decimal::from_i128_with_scale(v, 0);
    let mut running = opening;
    let mut out = Vec::with_capacity(n);
    for (i, name) in g.names.iter().enumerate() {
        running += net[i];
        out.push(match kpi {
            Kpi::PointsExpired => sum(kpi, name.clone(), points(expired[i])),
            Kpi::BreakageRate => ratio(kpi, name.clone(), points(expired[i]), points(issued[i])),
            _ => sum(kpi, name.clone(), points(running)),
        });
    }
    out
}

/// Whether every KPI asked can be computed over the scope and grouping: checked before
/// anything is read.
pub fn check(kpis: &[Kpi], scope: &Scope, group: Group) -> Result<()> {
    for &kpi in kpis {
        match (kpi.source(), group) {
            (Source::Ledger, Group::None | Group::Day | Group::Week | Group::Month)
                if scope.stores.is_empty()
                    && scope.brands.is_empty()
                    && scope.regions.is_empty()
                    && scope.channels.is_empty() => {}
            (Source::Ledger, _) => {
                return Err(Error::invalid(
                    "filter",
                    format!(
                        "{kpi:?} is chain-wide (the ledger knows members, not stores or channels): no store, brand, region or channel filter, grouped by time or not at all"
                    ),
                ));
            }
            (Source::Buyers | Source::Members | Source::Brands, Group::Campaign | Group::Code) => {
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
    Ok(())
}

/// Every KPI asked, in the order asked, each over the scope and grouped.
pub fn compute(
    r: &Rollups,
    kpis: &[Kpi],
    scope: &Scope,
    group: Group,
    day_of: &dyn Fn(i64) -> Day,
) -> Result<Vec<Value>> {
    check(kpis, scope, group)?;
    let mut out = Vec::new();
    let mut receipts_groups = None;
    let buyer_kpis: Vec<Kpi> = kpis
        .iter()
        .copied()
        .filter(|k| k.source() == Source::Buyers)
        .collect();
    let mut buyers: Option<Vec<Value>> = None;
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
            Source::Buyers => {
                if buyers.is_none() {
                    buyers = Some(buyer_values(r, scope, group, &buyer_kpis)?);
                }
                out.extend(buyers.iter().flatten().filter(|v| v.kpi == kpi).cloned());
            }
            Source::Members => out.extend(member_values(r, scope, group, &[kpi], day_of)?),
            Source::Brands => out.extend(brand_values(r, scope, group, kpi)?),
            Source::Ledger => out.extend(ledger_values(r, scope, group, kpi, day_of)),
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
        for (_, group) in slices(r, scope, Group::None, sets) {
            for s in group {
                set |= s;
            }
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
    for e in slices(r, scope, Group::None, sets)
        .into_iter()
        .flat_map(|(_, v)| v)
    {
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

/// Members and their spend per named RFM segment, scored as segmentation scores them: every
/// member whose receipts through `today` still count (net of refunds), recency from the last
/// purchase made, frequency and spend over the 365 days through `today`.
pub fn rfm_overview(r: &Rollups, today: Day) -> Vec<(rfm::Named, u64, Decimal)> {
    let from = today - 364;
    let mut inputs = Vec::new();
    for (m, days) in &r.member_days {
        let (mut receipts, mut frequency, mut monetary, mut last) =
            (0i64, 0i64, Decimal::ZERO, None);
        for (day, d) in days.range(..=today) {
            receipts += d.receipts;
            if d.bought > 0 {
                last = Some(*day);
            }
            if *day >= from {
                frequency += d.receipts;
                monetary += d.paid;
            }
        }
        if let (true, Some(last)) = (receipts > 0, last) {
            inputs.push(rfm::Inputs {
                member_id: r.members.value(*m).clone(),
                recency_days: today - last,
                frequency: frequency.max(0),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ways_of_counting_buyers_agree() {
        let mut state = 7u64;
        let mut next = move |n: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % n) as u32
        };
        for _ in 0..50 {
            let sets: Vec<Buyers> = (0..next(20) + 1)
                .map(|_| {
                    let once: RoaringBitmap = (0..next(600)).map(|_| next(2000)).collect();
                    let again: RoaringBitmap = once.iter().filter(|m| m % 7 == 0).collect();
                    Buyers { once, again }
                })
                .collect();
            let refs: Vec<&Buyers> = sets.iter().collect();
            let total = sets
                .iter()
                .map(|b| (b.once.len() + b.again.len()) as usize)
                .sum();
            assert_eq!(by_bitmaps(&refs), by_sorting(&refs, total));
        }
    }
}
