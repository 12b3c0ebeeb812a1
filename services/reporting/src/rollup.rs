//! A tenant's rollups: additive measures per business day, outlet, channel, identified or
//! not and with or without a code; member sets (roaring bitmaps) per day for the KPIs that
//! count distinct members; and each member's newest profile facts.
//!
//! Every update is a sum or a set union, so facts apply in any order with the same result;
//! applying each fact exactly once is the store's job (it deduplicates before anything is
//! applied). Pure and in memory: the service rebuilds it from the stored facts at start.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;

use loyalty_platform::calendar::Day;
use loyalty_platform::types::Channel;
use roaring::RoaringBitmap;
use rust_decimal::Decimal;

use crate::fact::{Fact, Member, Outlet, Purchase, Reason, Refund};

/// Every channel, in the order their index in a cell key follows.
pub const CHANNELS: [Channel; 6] = [
    Channel::Unspecified,
    Channel::Store,
    Channel::Online,
    Channel::App,
    Channel::CallCenter,
    Channel::Admin,
];

pub fn channel_index(c: Channel) -> u8 {
    CHANNELS.iter().position(|x| *x == c).unwrap_or(0) as u8
}

pub fn channel_name(c: Channel) -> &'static str {
    match c {
        Channel::Unspecified => "unspecified",
        Channel::Store => "store",
        Channel::Online => "online",
        Channel::App => "app",
        Channel::CallCenter => "call_center",
        Channel::Admin => "admin",
    }
}

/// Dense numbers for repeated names (members, outlets, campaigns, codes, categories).
#[derive(Debug, Clone)]
pub struct Interner<T> {
    ids: HashMap<T, u32>,
    values: Vec<T>,
}

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Self {
            ids: HashMap::new(),
            values: Vec::new(),
        }
    }
}

impl<T: Clone + Eq + Hash> Interner<T> {
    pub fn intern(&mut self, value: &T) -> u32 {
        if let Some(&id) = self.ids.get(value) {
            return id;
        }
        let id = self.values.len() as u32;
        self.values.push(value.clone());
        self.ids.insert(value.clone(), id);
        id
    }

    pub fn get(&self, value: &T) -> Option<u32> {
        self.ids.get(value).copied()
    }

    pub fn value(&self, id: u32) -> &T {
        &self.values[id as usize]
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.values.iter().enumerate().map(|(i, v)| (i as u32, v))
    }
}

/// Money in rollups: integer ten-thousandths (prices carry at most two decimals), so sums
/// are exact and cheap.
pub const MONEY_SCALE: u32 = 4;

/// `d` in ten-thousandths, saturating far beyond any receipt.
pub fn units(d: Decimal) -> i64 {
    let r = d.round_dp(MONEY_SCALE);
    let v = r.mantissa() * 10i128.pow(MONEY_SCALE - r.scale());
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// Ten-thousandths back to money.
pub fn money(units: i128) -> Decimal {
    Decimal::try_from_i128_with_scale(units, MONEY_SCALE)
        .unwrap_or(if units < 0 {
            Decimal::MIN
        } else {
            Decimal::MAX
        })
        .normalize()
}

/// Sums over receipts and refunds, money in [`units`]. Receipts and money count on the
/// purchase's business day; a refund takes its money (and, when it completes the receipt's
/// refund, the receipt) back on that same day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Measures {
    pub receipts: i64,
    /// Receipts refunded in full.
    pub fully_refunded: i64,
    pub gross: i64,
    pub discount: i64,
    pub paid: i64,
    pub refunded: i64,
    pub points_accrued: i64,
    pub points_reversed: i64,
    pub points_redeemed: i64,
    pub points_returned: i64,
}

impl Measures {
    pub fn add(&mut self, o: &Measures) {
        self.receipts += o.receipts;
        self.fully_refunded += o.fully_refunded;
        self.gross = self.gross.saturating_add(o.gross);
        self.discount = self.discount.saturating_add(o.discount);
        self.paid = self.paid.saturating_add(o.paid);
        self.refunded = self.refunded.saturating_add(o.refunded);
        self.points_accrued = self.points_accrued.saturating_add(o.points_accrued);
        self.points_reversed = self.points_reversed.saturating_add(o.points_reversed);
        self.points_redeemed = self.points_redeemed.saturating_add(o.points_redeemed);
        self.points_returned = self.points_returned.saturating_add(o.points_returned);
    }

    fn of_purchase(p: &Purchase) -> Self {
        Self {
            receipts: 1,
            gross: units(p.gross),
            discount: units(p.discount),
            paid: units(p.paid),
            points_accrued: p.points_accrued,
            points_redeemed: p.points_redeemed,
            ..Self::default()
        }
    }

    fn of_refund(r: &Refund) -> Self {
        Self {
            fully_refunded: i64::from(r.fully_refunded),
            refunded: units(r.refunded),
            points_reversed: r.points_reversed,
            points_returned: r.points_returned,
            ..Self::default()
        }
    }
}

/// Where in a day additive measures are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot {
    pub outlet: u32,
    pub channel: u8,
    pub identified: bool,
    pub with_code: bool,
}

impl Slot {
    fn packed(&self) -> u64 {
        (u64::from(self.outlet) << 8)
            | (u64::from(self.channel) << 2)
            | (u64::from(self.identified) << 1)
            | u64::from(self.with_code)
    }
}

#[derive(Debug, Clone, Default)]
struct DayCells {
    index: HashMap<u64, u32>,
    cells: Vec<(Slot, Measures)>,
}

/// Measures per business day and slot, each day's cells contiguous, so a period is a scan
/// of a few arrays.
#[derive(Debug, Clone, Default)]
pub struct Cells {
    days: BTreeMap<Day, DayCells>,
}

impl Cells {
    pub fn add(&mut self, day: Day, slot: Slot, m: &Measures) {
        let d = self.days.entry(day).or_default();
        let i = *d.index.entry(slot.packed()).or_insert_with(|| {
            d.cells.push((slot, Measures::default()));
            (d.cells.len() - 1) as u32
        });
        d.cells[i as usize].1.add(m);
    }

    /// Every cell of days `from..=to`, day by day.
    pub fn range(&self, from: Day, to: Day) -> impl Iterator<Item = (Day, &[(Slot, Measures)])> {
        self.days
            .range(from..=to.max(from))
            .filter(move |_| from <= to)
            .map(|(d, c)| (*d, c.cells.as_slice()))
    }
}

/// Ledger entries are summed per quarter hour: every time zone's offset is a multiple of
/// it, so a local day is a whole number of buckets.
pub const LEDGER_BUCKET_MS: i64 = 15 * 60_000;

/// Sums of ledger entries in a bucket, in point minor units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerSums {
    /// Every entry's amount: the change of the points outstanding.
    pub net: i64,
    /// Points expired (positive).
    pub expired: i64,
    /// Points issued (`Reason::issues`).
    pub issued: i64,
}

/// Day, outlet and channel: where member sets are kept.
pub type SliceKey = (Day, u32, u8);

/// The identified buyers of a slice: once, and again (two receipts or more that day there).
#[derive(Debug, Clone, Default)]
pub struct Buyers {
    pub once: RoaringBitmap,
    pub again: RoaringBitmap,
}

/// A campaign's exposed and held-out members in a slice, and the money of their receipts.
#[derive(Debug, Clone, Default)]
pub struct Exposure {
    pub target: RoaringBitmap,
    pub control: RoaringBitmap,
    pub target_paid: Decimal,
    pub control_paid: Decimal,
}

/// A member's receipts and spend on one day (net of refunds), for RFM, and the purchases
/// made that day (refunds leave it alone: recency counts from the last purchase made).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemberDay {
    pub receipts: i64,
    pub paid: Decimal,
    pub bought: u32,
}

#[derive(Debug, Clone, Default)]
pub struct Rollups {
    pub outlets: Interner<Outlet>,
    pub members: Interner<String>,
    pub campaigns: Interner<String>,
    pub codes: Interner<String>,
    pub categories: Interner<String>,
    pub cells: Cells,
    pub by_campaign: HashMap<u32, Cells>,
    pub by_code: HashMap<u32, Cells>,
    pub buyers: BTreeMap<SliceKey, Buyers>,
    /// The same over every outlet and channel: what unfiltered queries read.
    pub day_buyers: BTreeMap<Day, Buyers>,
    pub category_buyers: HashMap<u32, BTreeMap<SliceKey, RoaringBitmap>>,
    pub exposure: HashMap<u32, BTreeMap<SliceKey, Exposure>>,
    pub member_days: HashMap<u32, BTreeMap<Day, MemberDay>>,
    /// Member ids in order, for paging member features.
    pub member_order: BTreeMap<String, u32>,
    /// Newest facts of each member, by member number.
    pub profiles: HashMap<u32, Member>,
    /// Ledger sums per quarter hour (every time zone's day starts on one).
    pub ledger: BTreeMap<i64, LedgerSums>,
    /// The time zones of the tenant's stores.
    pub time_zones: BTreeSet<String>,
    /// Each store's outlets (a store that changed brand or region has several).
    pub stores: BTreeMap<String, BTreeSet<u32>>,
}

fn distinct(values: &[String]) -> BTreeSet<&String> {
    values.iter().filter(|v| !v.is_empty()).collect()
}

impl Rollups {
    /// Empty rollups that know this tenant's stores (outlets, brands, regions, time zones),
    /// to fill with part of its facts.
    pub fn directory(&self) -> Rollups {
        Rollups {
            outlets: self.outlets.clone(),
            time_zones: self.time_zones.clone(),
            stores: self.stores.clone(),
            ..Rollups::default()
        }
    }

    pub fn apply(&mut self, fact: &Fact) {
        match fact {
            Fact::Purchase(p) => self.purchase(p),
            Fact::Refund(r) => self.refund(r),
            Fact::Member(m) => self.member(m),
            Fact::Ledger(l) => {
                let bucket = l.time.div_euclid(LEDGER_BUCKET_MS);
                let sums = self.ledger.entry(bucket).or_default();
                sums.net = sums.net.saturating_add(l.amount);
                if l.reason == Reason::Expiry {
                    sums.expired = sums.expired.saturating_sub(l.amount);
                }
                if l.reason.issues() && l.amount > 0 {
                    sums.issued = sums.issued.saturating_add(l.amount);
                }
            }
        }
    }

    fn member_number(&mut self, id: &String) -> u32 {
        let before = self.members.len();
        let m = self.members.intern(id);
        if self.members.len() > before {
            self.member_order.insert(id.clone(), m);
        }
        m
    }

    fn outlet(&mut self, outlet: &Outlet, time_zone: &str) -> u32 {
        let o = self.outlets.intern(outlet);
        if !self
            .stores
            .get(&outlet.store_id)
            .is_some_and(|s| s.contains(&o))
        {
            self.stores
                .entry(outlet.store_id.clone())
                .or_default()
                .insert(o);
        }
        if !time_zone.is_empty() && !self.time_zones.contains(time_zone) {
            self.time_zones.insert(time_zone.to_string());
        }
        o
    }

    fn add_measures(
        &mut self,
        day: Day,
        slot: Slot,
        m: &Measures,
        campaigns: &[String],
        codes: &[String],
        coupons: &[String],
    ) {
        self.cells.add(day, slot, m);
        for c in distinct(campaigns) {
            let id = self.campaigns.intern(c);
            self.by_campaign.entry(id).or_default().add(day, slot, m);
        }
        // Promo codes only: every coupon is a code of its own, used about once, so a table
        // per coupon would grow with every one redeemed. Coupons count under their campaign.
        for c in distinct(codes).into_iter().filter(|c| !coupons.contains(c)) {
            let id = self.codes.intern(c);
            self.by_code.entry(id).or_default().add(day, slot, m);
        }
    }

    fn purchase(&mut self, p: &Purchase) {
        let outlet = self.outlet(&p.outlet, &p.time_zone);
        let channel = channel_index(p.channel);
        let slot = Slot {
            outlet,
            channel,
            identified: p.member_id.is_some(),
            with_code: !p.codes.is_empty(),
        };
        self.add_measures(
            p.day,
            slot,
            &Measures::of_purchase(p),
            &p.campaign_ids,
            &p.codes,
            &p.coupon_codes,
        );
        let Some(member) = &p.member_id else { return };
        let m = self.member_number(member);
        let slice = (p.day, outlet, channel);
        for buyers in [
            self.buyers.entry(slice).or_default(),
            self.day_buyers.entry(p.day).or_default(),
        ] {
            if !buyers.once.insert(m) {
                buyers.again.insert(m);
            }
        }
        let categories: BTreeSet<&String> = p
            .lines
            .iter()
            .map(|l| &l.category)
            .filter(|c| !c.is_empty())
            .collect();
        for c in categories {
            let id = self.categories.intern(c);
            self.category_buyers
                .entry(id)
                .or_default()
                .entry(slice)
                .or_default()
                .insert(m);
        }
        self.expose(&p.campaign_ids, &p.held_out_campaign_ids, slice, m, p.paid);
        let day = self
            .member_days
            .entry(m)
            .or_default()
            .entry(p.day)
            .or_default();
        day.receipts += 1;
        day.bought = day.bought.saturating_add(1);
        day.paid = day.paid.saturating_add(p.paid);
    }

    fn expose(
        &mut self,
        target: &[String],
        control: &[String],
        slice: SliceKey,
        m: u32,
        paid: Decimal,
    ) {
        for (ids, held_out) in [(target, false), (control, true)] {
            for c in distinct(ids) {
                let id = self.campaigns.intern(c);
                let e = self
                    .exposure
                    .entry(id)
                    .or_default()
                    .entry(slice)
                    .or_default();
                if held_out {
                    e.control.insert(m);
                    e.control_paid = e.control_paid.saturating_add(paid);
                } else {
                    e.target.insert(m);
                    e.target_paid = e.target_paid.saturating_add(paid);
                }
            }
        }
    }

    fn refund(&mut self, r: &Refund) {
        let outlet = self.outlet(&r.outlet, &r.time_zone);
        let channel = channel_index(r.channel);
        let slot = Slot {
            outlet,
            channel,
            identified: r.member_id.is_some(),
            with_code: !r.codes.is_empty(),
        };
        self.add_measures(
            r.day,
            slot,
            &Measures::of_refund(r),
            &r.campaign_ids,
            &r.codes,
            &r.coupon_codes,
        );
        let Some(member) = &r.member_id else { return };
        let m = self.member_number(member);
        // The refund's money leaves the exposure sums; the member stays exposed.
        self.expose(
            &r.campaign_ids,
            &r.held_out_campaign_ids,
            (r.day, outlet, channel),
            m,
            -r.refunded,
        );
        let day = self
            .member_days
            .entry(m)
            .or_default()
            .entry(r.day)
            .or_default();
        day.receipts -= i64::from(r.fully_refunded);
        day.paid = day.paid.saturating_sub(r.refunded);
    }

    fn member(&mut self, member: &Member) {
        let m = self.member_number(&member.member_id);
        match self.profiles.get(&m) {
            Some(known) if known.version >= member.version => {}
            _ => {
                self.profiles.insert(m, member.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fact::Line;

    fn purchase(receipt: &str, member: Option<&str>, day: Day, paid: i64) -> Purchase {
        Purchase {
            cashier_id: String::new(),
            receipt_id: receipt.into(),
            outlet: Outlet {
                store_id: "s1".into(),
                brand: "b".into(),
                region: "r".into(),
            },
            time_zone: "Asia/Almaty".into(),
            channel: Channel::Store,
            member_id: member.map(str::to_string),
            time: day * 86_400_000,
            day,
            lines: vec![Line {
                sku: "a".into(),
                category: "milk".into(),
                brand: "x".into(),
                quantity: Decimal::ONE,
                paid: Decimal::from(paid),
                sale_price: false,
            }],
            gross: Decimal::from(paid),
            discount: Decimal::ZERO,
            paid: Decimal::from(paid),
            points_accrued: paid,
            points_redeemed: 0,
            codes: vec![],
            campaign_ids: vec![],
            held_out_campaign_ids: vec![],
            coupon_codes: Vec::new(),
        }
    }

    #[test]
    fn a_member_buying_twice_a_day_is_a_repeat_buyer_of_that_slice() {
        let mut r = Rollups::default();
        r.apply(&Fact::Purchase(purchase("1", Some("m"), 10, 5)));
        r.apply(&Fact::Purchase(purchase("2", Some("m"), 10, 7)));
        r.apply(&Fact::Purchase(purchase("3", None, 10, 1)));
        let b = r.buyers.values().next().cloned().unwrap_or_default();
        assert_eq!((b.once.len(), b.again.len()), (1, 1));
        let mut total = Measures::default();
        for (_, cells) in r.cells.range(0, 100) {
            for (_, m) in cells {
                total.add(m);
            }
        }
        assert_eq!(total.receipts, 3);
        assert_eq!(money(i128::from(total.paid)), Decimal::from(13));
        assert_eq!(r.time_zones.len(), 1);
    }

    #[test]
    fn older_member_versions_never_replace_newer_ones() {
        let mut r = Rollups::default();
        let newer = Member {
            member_id: "m".into(),
            version: 3,
            contactable: true,
            ..Member::default()
        };
        let older = Member {
            version: 1,
            contactable: false,
            ..newer.clone()
        };
        r.apply(&Fact::Member(newer.clone()));
        r.apply(&Fact::Member(older));
        assert_eq!(r.profiles.values().next(), Some(&newer));
    }
}
