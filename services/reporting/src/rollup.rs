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

use crate::fact::{Fact, Member, Outlet, Purchase, Refund};

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

/// Sums over receipts and refunds. Receipts and money count on the purchase's business day;
/// a refund takes its money (and, when it completes the receipt's refund, the receipt)
/// back on that same day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Measures {
    pub receipts: i64,
    /// Receipts refunded in full.
    pub fully_refunded: i64,
    pub gross: Decimal,
    pub discount: Decimal,
    pub paid: Decimal,
    pub refunded: Decimal,
    pub points_accrued: i64,
    pub points_reversed: i64,
    pub points_redeemed: i64,
    pub points_returned: i64,
}

impl Measures {
    pub fn add(&mut self, o: &Measures) {
        self.receipts += o.receipts;
        self.fully_refunded += o.fully_refunded;
        self.gross += o.gross;
        self.discount += o.discount;
        self.paid += o.paid;
        self.refunded += o.refunded;
        self.points_accrued += o.points_accrued;
        self.points_reversed += o.points_reversed;
        self.points_redeemed += o.points_redeemed;
        self.points_returned += o.points_returned;
    }

    /// Receipts that still count: committed and not refunded in full.
    pub fn net_receipts(&self) -> i64 {
        self.receipts - self.fully_refunded
    }

    /// Money paid, less money refunded.
    pub fn sales(&self) -> Decimal {
        self.paid - self.refunded
    }

    pub fn net_points_accrued(&self) -> i64 {
        self.points_accrued - self.points_reversed
    }

    pub fn net_points_redeemed(&self) -> i64 {
        self.points_redeemed - self.points_returned
    }

    fn of_purchase(p: &Purchase) -> Self {
        Self {
            receipts: 1,
            gross: p.gross,
            discount: p.discount,
            paid: p.paid,
            points_accrued: p.points_accrued,
            points_redeemed: p.points_redeemed,
            ..Self::default()
        }
    }

    fn of_refund(r: &Refund) -> Self {
        Self {
            fully_refunded: i64::from(r.fully_refunded),
            refunded: r.refunded,
            points_reversed: r.points_reversed,
            points_returned: r.points_returned,
            ..Self::default()
        }
    }
}

/// Where additive measures are kept: ordered by day first, so a period is one range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CellKey {
    pub day: Day,
    pub outlet: u32,
    pub channel: u8,
    pub identified: bool,
    pub with_code: bool,
}

impl CellKey {
    pub fn first_of(day: Day) -> Self {
        Self {
            day,
            outlet: 0,
            channel: 0,
            identified: false,
            with_code: false,
        }
    }

    pub fn last_of(day: Day) -> Self {
        Self {
            day,
            outlet: u32::MAX,
            channel: u8::MAX,
            identified: true,
            with_code: true,
        }
    }
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

/// A member's receipts and spend on one day (net of refunds), for RFM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemberDay {
    pub receipts: i64,
    pub paid: Decimal,
}

#[derive(Debug, Clone, Default)]
pub struct Rollups {
    pub outlets: Interner<Outlet>,
    pub members: Interner<String>,
    pub campaigns: Interner<String>,
    pub codes: Interner<String>,
    pub categories: Interner<String>,
    pub cells: BTreeMap<CellKey, Measures>,
    pub by_campaign: HashMap<u32, BTreeMap<CellKey, Measures>>,
    pub by_code: HashMap<u32, BTreeMap<CellKey, Measures>>,
    pub buyers: BTreeMap<SliceKey, Buyers>,
    pub category_buyers: HashMap<u32, BTreeMap<SliceKey, RoaringBitmap>>,
    pub exposure: HashMap<u32, BTreeMap<SliceKey, Exposure>>,
    pub member_days: HashMap<u32, BTreeMap<Day, MemberDay>>,
    /// Newest facts of each member, by member number.
    pub profiles: HashMap<u32, Member>,
    /// The time zones of the tenant's stores.
    pub time_zones: BTreeSet<String>,
    /// Each store's outlets (a store that changed brand or region has several).
    pub stores: BTreeMap<String, BTreeSet<u32>>,
}

fn distinct(values: &[String]) -> BTreeSet<&String> {
    values.iter().filter(|v| !v.is_empty()).collect()
}

impl Rollups {
    pub fn apply(&mut self, fact: &Fact) {
        match fact {
            Fact::Purchase(p) => self.purchase(p),
            Fact::Refund(r) => self.refund(r),
            Fact::Member(m) => self.member(m),
        }
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

    fn add_measures(&mut self, key: CellKey, m: &Measures, campaigns: &[String], codes: &[String]) {
        self.cells.entry(key).or_default().add(m);
        for c in distinct(campaigns) {
            let id = self.campaigns.intern(c);
            self.by_campaign
                .entry(id)
                .or_default()
                .entry(key)
                .or_default()
                .add(m);
        }
        for c in distinct(codes) {
            let id = self.codes.intern(c);
            self.by_code
                .entry(id)
                .or_default()
                .entry(key)
                .or_default()
                .add(m);
        }
    }

    fn purchase(&mut self, p: &Purchase) {
        let outlet = self.outlet(&p.outlet, &p.time_zone);
        let channel = channel_index(p.channel);
        let key = CellKey {
            day: p.day,
            outlet,
            channel,
            identified: p.member_id.is_some(),
            with_code: !p.codes.is_empty(),
        };
        self.add_measures(key, &Measures::of_purchase(p), &p.campaign_ids, &p.codes);
        let Some(member) = &p.member_id else { return };
        let m = self.members.intern(member);
        let slice = (p.day, outlet, channel);
        let buyers = self.buyers.entry(slice).or_default();
        if !buyers.once.insert(m) {
            buyers.again.insert(m);
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
        day.paid += p.paid;
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
                    e.control_paid += paid;
                } else {
                    e.target.insert(m);
                    e.target_paid += paid;
                }
            }
        }
    }

    fn refund(&mut self, r: &Refund) {
        let outlet = self.outlet(&r.outlet, &r.time_zone);
        let channel = channel_index(r.channel);
        let key = CellKey {
            day: r.day,
            outlet,
            channel,
            identified: r.member_id.is_some(),
            with_code: !r.codes.is_empty(),
        };
        self.add_measures(key, &Measures::of_refund(r), &r.campaign_ids, &r.codes);
        let Some(member) = &r.member_id else { return };
        let m = self.members.intern(member);
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
        day.paid -= r.refunded;
    }

    fn member(&mut self, member: &Member) {
        let m = self.members.intern(&member.member_id);
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
        let total: Measures = r.cells.values().fold(Measures::default(), |mut a, m| {
            a.add(m);
            a
        });
        assert_eq!(total.receipts, 3);
        assert_eq!(total.paid, Decimal::from(13));
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
