//! A member's features, maintained incrementally from purchase, refund, ledger and member
//! events.
//!
//! Every aggregate is a sum, a minimum or a maximum, so applying the same set of events in any
//! order gives the same features; redelivery is handled before this (an event applies at most
//! once per member, see `store`). Window figures (30/90/365 days, the previous calendar year)
//! are computed at read time from per-day totals, so they stay true as time passes without any
//! event arriving.

use std::collections::BTreeMap;

use loyalty_platform::clock::{DAY_MS, Millis};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::calendar::{self, Day};

/// Per-day totals are kept for this many days back from the newest purchase (enough for the
/// 365-day window and the whole previous calendar year).
pub const DAYS_KEPT: i64 = 800;
/// At most this many categories, brands or stores are tracked per member; past it, the ones
/// with the oldest last purchase are dropped.
pub const MAX_AFFINITIES: usize = 512;

/// The windows the features answer, in days.
pub const WINDOWS: [i64; 3] = [30, 90, 365];

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Receipts (a fully refunded receipt counts −1 on its purchase day).
    pub count: i64,
    /// Paid amount in money, net of refunds.
    pub spend: Decimal,
}

impl Totals {
    fn add(&mut self, other: Totals) {
        self.count += other.count;
        self.spend += other.spend;
    }
}

/// What a member bought in one category, brand or store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Affinity {
    pub first: Millis,
    pub last: Millis,
    /// Net of refunds.
    pub spend: Decimal,
    /// Receipts with at least one line of it.
    pub receipts: i64,
}

/// The member-data part of the features (from member events).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberData {
    /// Whether a member event has arrived at all.
    pub known: bool,
    pub active: bool,
    pub registered_at: Option<Millis>,
    /// Where the member registered.
    pub first_store: String,
    /// (month, day), and the year when known.
    pub birthday: Option<(u32, u32, Option<i32>)>,
    pub consents: Consents,
    pub questionnaire_complete: bool,
    pub referred: bool,
    pub tier_id: String,
    /// The version of the member record these came from (newer wins).
    pub version: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consents {
    pub sms: bool,
    pub email: bool,
    pub push: bool,
    pub messenger: bool,
}

impl Consents {
    pub fn any(&self) -> bool {
        self.sms || self.email || self.push || self.messenger
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Features {
    pub first_purchase: Option<Millis>,
    pub last_purchase: Option<Millis>,
    pub total: Totals,
    /// Per-day totals by purchase day (UTC), pruned to `DAYS_KEPT`.
    pub days: BTreeMap<Day, Totals>,
    pub categories: BTreeMap<String, Affinity>,
    pub brands: BTreeMap<String, Affinity>,
    pub stores: BTreeMap<String, Affinity>,
    /// Active points after the member's latest receipt, and when that was.
    pub points_balance: i64,
    pub points_balance_at: Millis,
    pub member: MemberData,
    /// The points after the member's newest ledger entry.
    pub ledger: LedgerPoints,
}

/// A member's points as the ledger tells them: the balance (active, pending and held) after
/// the entry with the highest sequence seen, so the order entries arrive in does not matter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerPoints {
    /// The member's entry sequence (from 1); 0: no entry seen.
    pub sequence: i64,
    pub total: i64,
    /// When that entry was made.
    pub at: Millis,
}

/// Features as stored before `ledger` existed (postcard writes a struct as its fields in
/// order, so this tuple reads those records).
type FeaturesBeforeLedger = (
    Option<Millis>,
    Option<Millis>,
    Totals,
    BTreeMap<Day, Totals>,
    BTreeMap<String, Affinity>,
    BTreeMap<String, Affinity>,
    BTreeMap<String, Affinity>,
    i64,
    Millis,
    MemberData,
);

impl Features {
    /// Reads a stored record, of this shape or of the one before `ledger`.
    pub fn decode(bytes: &[u8]) -> loyalty_platform::error::Result<Self> {
        use loyalty_platform::embedded::decode;
        decode(bytes).or_else(|e| {
            let old: FeaturesBeforeLedger = decode(bytes).map_err(|_| e)?;
            let (first_purchase, last_purchase, total, days, categories, brands, stores) =
                (old.0, old.1, old.2, old.3, old.4, old.5, old.6);
            Ok(Self {
                first_purchase,
                last_purchase,
                total,
                days,
                categories,
                brands,
                stores,
                points_balance: old.7,
                points_balance_at: old.8,
                member: old.9,
                ledger: LedgerPoints::default(),
            })
        })
    }
}

/// One receipt's contribution, as the purchase event tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurchaseFacts {
    pub time: Millis,
    pub store_id: String,
    /// Paid amount of the receipt.
    pub paid: Decimal,
    /// (category, brand, paid) per line.
    pub lines: Vec<(String, String, Decimal)>,
    pub points_balance: Option<i64>,
    /// The member's tier when the receipt was priced (None: not told).
    pub tier_id: Option<String>,
}

/// A refund's contribution: amounts come off the original purchase's day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundFacts {
    pub purchase_time: Millis,
    pub store_id: String,
    pub refunded: Decimal,
    /// (category, brand, refunded) per line.
    pub lines: Vec<(String, String, Decimal)>,
    /// The receipt is refunded in full with this refund: it stops counting as a purchase.
    pub receipt_fully_refunded: bool,
    /// With `receipt_fully_refunded`: the categories and brands of all the receipt's lines,
    /// each of which stops counting the receipt.
    pub receipt_categories: Vec<String>,
    pub receipt_brands: Vec<String>,
}

fn touch(
    map: &mut BTreeMap<String, Affinity>,
    key: &str,
    time: Millis,
    spend: Decimal,
    receipt: i64,
) {
    if key.is_empty() {
        return;
    }
    match map.get_mut(key) {
        Some(a) => {
            a.first = a.first.min(time);
            a.last = a.last.max(time);
            a.spend += spend;
            a.receipts += receipt;
        }
        None => {
            map.insert(
                key.to_owned(),
                Affinity {
                    first: time,
                    last: time,
                    spend,
                    receipts: receipt,
                },
            );
        }
    }
}

fn bound(map: &mut BTreeMap<String, Affinity>) {
    while map.len() > MAX_AFFINITIES {
        let oldest = map
            .iter()
            .min_by_key(|(k, a)| (a.last, (*k).clone()))
            .map(|(k, _)| k.clone());
        match oldest {
            Some(k) => {
                map.remove(&k);
            }
            None => break,
        }
    }
}

impl Features {
    pub fn apply_purchase(&mut self, p: &PurchaseFacts) {
        self.first_purchase = Some(self.first_purchase.map_or(p.time, |t| t.min(p.time)));
        self.last_purchase = Some(self.last_purchase.map_or(p.time, |t| t.max(p.time)));
        let one = Totals {
            count: 1,
            spend: p.paid,
        };
        self.total.add(one);
        self.days
            .entry(calendar::day_of(p.time))
            .or_default()
            .add(one);
        touch(&mut self.stores, &p.store_id, p.time, p.paid, 1);
        let mut categories: BTreeMap<&str, Decimal> = BTreeMap::new();
        let mut brands: BTreeMap<&str, Decimal> = BTreeMap::new();
        for (category, brand, paid) in &p.lines {
            *categories.entry(category).or_default() += *paid;
            *brands.entry(brand).or_default() += *paid;
        }
        for (c, spend) in categories {
            touch(&mut self.categories, c, p.time, spend, 1);
        }
        for (b, spend) in brands {
            touch(&mut self.brands, b, p.time, spend, 1);
        }
        // The balance and tier of the latest receipt that tells its balance (every identified
        // receipt does); on equal times, the one applied last.
        if let Some(balance) = p.points_balance
            && p.time >= self.points_balance_at
        {
            self.points_balance = balance;
            if let Some(tier) = &p.tier_id {
                self.member.tier_id.clone_from(tier);
            }
            self.points_balance_at = p.time;
        }
        self.prune();
    }

    /// Keeps the newer of the two snapshots (by version; on a tie, the incoming one, which is
    /// the same snapshot delivered again).
    pub fn apply_member(&mut self, m: &MemberData) {
        if !self.member.known || m.version >= self.member.version {
            // Member events do not carry the tier: it comes from receipts.
            let tier_id = std::mem::take(&mut self.member.tier_id);
            self.member = MemberData {
                known: true,
                tier_id,
                ..m.clone()
            };
        }
    }

    /// Keeps the ledger entry with the highest sequence.
    pub fn apply_ledger(&mut self, entry: &LedgerPoints) {
        if entry.sequence > self.ledger.sequence {
            self.ledger = *entry;
        }
    }

    pub fn apply_refund(&mut self, r: &RefundFacts) {
        let minus = Totals {
            count: if r.receipt_fully_refunded { -1 } else { 0 },
            spend: -r.refunded,
        };
        self.total.add(minus);
        self.days
            .entry(calendar::day_of(r.purchase_time))
            .or_default()
            .add(minus);
        let receipt = minus.count;
        touch(
            &mut self.stores,
            &r.store_id,
            r.purchase_time,
            -r.refunded,
            receipt,
        );
        for (category, brand, refunded) in &r.lines {
            touch(
                &mut self.categories,
                category,
                r.purchase_time,
                -*refunded,
                0,
            );
            touch(&mut self.brands, brand, r.purchase_time, -*refunded, 0);
        }
        if r.receipt_fully_refunded {
            for category in &r.receipt_categories {
                touch(
                    &mut self.categories,
                    category,
                    r.purchase_time,
                    Decimal::ZERO,
                    -1,
                );
            }
            for brand in &r.receipt_brands {
                touch(&mut self.brands, brand, r.purchase_time, Decimal::ZERO, -1);
            }
        }
        self.prune();
    }

    /// Drops per-day totals older than `DAYS_KEPT` before the newest day, and bounds the
    /// affinity maps. Depends only on the set of events, not their order: the newest day is a
    /// maximum.
    fn prune(&mut self) {
        if let Some((&newest, _)) = self.days.last_key_value() {
            let keep_from = newest - DAYS_KEPT;
            self.days = self.days.split_off(&keep_from);
        }
        bound(&mut self.categories);
        bound(&mut self.brands);
        bound(&mut self.stores);
    }

    /// Receipts and spend over the last `days` days up to `now` (today included).
    pub fn window(&self, days: i64, now: Millis) -> Totals {
        let today = calendar::day_of(now);
        let mut out = Totals::default();
        for (_, t) in self.days.range(today - days + 1..=today) {
            out.add(*t);
        }
        out
    }

    /// Receipts and spend in the previous calendar year (UTC).
    pub fn previous_year(&self, now: Millis) -> Totals {
        let (year, _, _) = calendar::civil(calendar::day_of(now));
        let from = calendar::day_from_civil(year - 1, 1, 1);
        let to = calendar::day_from_civil(year, 1, 1);
        let mut out = Totals::default();
        for (_, t) in self.days.range(from..to) {
            out.add(*t);
        }
        out
    }

    /// Spend per receipt over all time (zero without receipts), rounded to cents.
    pub fn average_check(&self) -> Decimal {
        if self.total.count <= 0 {
            return Decimal::ZERO;
        }
        (self.total.spend / Decimal::from(self.total.count)).round_dp(2)
    }

    /// Whole days since `time` at `now` (negative in the future).
    pub fn days_since(time: Millis, now: Millis) -> i64 {
        (now - time).div_euclid(DAY_MS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = 1_700_000_000_000; // 2023-11-14

    fn purchase(time: Millis, paid: i64, category: &str) -> PurchaseFacts {
        PurchaseFacts {
            time,
            store_id: "s1".into(),
            paid: Decimal::from(paid),
            lines: vec![(category.into(), "b".into(), Decimal::from(paid))],
            points_balance: None,
            tier_id: None,
        }
    }

    #[test]
    fn the_tier_is_the_latest_receipts_and_member_events_keep_it() {
        let at = |time: Millis, tier: &str| PurchaseFacts {
            tier_id: Some(tier.into()),
            points_balance: Some(time),
            ..purchase(time, 100, "Shoes")
        };
        // A receipt that does not tell its balance moves neither, whatever its time.
        let untold = PurchaseFacts {
            points_balance: None,
            ..at(4 * DAY_MS, "silver")
        };
        let receipts = [
            at(DAY_MS, "base"),
            untold,
            at(3 * DAY_MS, "gold"),
            at(2 * DAY_MS, "base"),
        ];
        let mut forward = Features::default();
        receipts.iter().for_each(|p| forward.apply_purchase(p));
        let mut backward = Features::default();
        receipts
            .iter()
            .rev()
            .for_each(|p| backward.apply_purchase(p));
        assert_eq!(forward.member.tier_id, "gold");
        assert_eq!(forward.points_balance, 3 * DAY_MS);
        assert_eq!(forward, backward);
        // A member snapshot (which knows nothing of tiers) leaves it.
        forward.apply_member(&MemberData {
            known: true,
            version: 4,
            ..MemberData::default()
        });
        assert_eq!(forward.member.tier_id, "gold");
        assert_eq!(forward.member.version, 4);
    }

    #[test]
    fn the_ledger_entry_with_the_highest_sequence_wins_in_any_order() {
        let entry = |sequence, total| LedgerPoints {
            sequence,
            total,
            at: 1_000 + sequence,
        };
        let entries = [entry(1, 500), entry(2, 300), entry(3, 800)];
        let mut forward = Features::default();
        entries.iter().for_each(|e| forward.apply_ledger(e));
        let mut backward = Features::default();
        entries.iter().rev().for_each(|e| backward.apply_ledger(e));
        backward.apply_ledger(&entries[1]);
        assert_eq!(forward.ledger, entry(3, 800));
        assert_eq!(forward, backward);
    }

    #[test]
    fn records_stored_before_the_ledger_feature_still_read() {
        let mut f = Features::default();
        f.apply_purchase(&purchase(DAY_MS, 1200, "Shoes"));
        f.points_balance = 42;
        f.member.version = 7;
        let old: FeaturesBeforeLedger = (
            f.first_purchase,
            f.last_purchase,
            f.total,
            f.days.clone(),
            f.categories.clone(),
            f.brands.clone(),
            f.stores.clone(),
            f.points_balance,
            f.points_balance_at,
            f.member.clone(),
        );
        let bytes = loyalty_platform::embedded::encode(&old).unwrap();
        assert_eq!(Features::decode(&bytes).unwrap(), f);
        let current = loyalty_platform::embedded::encode(&f).unwrap();
        assert_eq!(Features::decode(&current).unwrap(), f);
        assert!(Features::decode(b"\xff\xff\xff").is_err());
    }

    #[test]
    fn windows_move_with_time() {
        let mut f = Features::default();
        f.apply_purchase(&purchase(T0, 100, "c"));
        f.apply_purchase(&purchase(T0 - 40 * DAY_MS, 50, "c"));
        assert_eq!(f.window(30, T0).count, 1);
        assert_eq!(f.window(90, T0).spend, Decimal::from(150));
        assert_eq!(f.window(30, T0 + 31 * DAY_MS).count, 0);
        assert_eq!(f.average_check(), Decimal::from(75));
    }

    #[test]
    fn order_does_not_matter() {
        let events = [
            purchase(T0, 100, "a"),
            purchase(T0 + DAY_MS, 20, "b"),
            purchase(T0 - 900 * DAY_MS, 7, "a"),
        ];
        let refund = RefundFacts {
            purchase_time: T0,
            store_id: "s1".into(),
            refunded: Decimal::from(100),
            lines: vec![("a".into(), "b".into(), Decimal::from(100))],
            receipt_fully_refunded: true,
            receipt_categories: vec!["a".into()],
            receipt_brands: vec!["b".into()],
        };
        let mut forward = Features::default();
        for e in &events {
            forward.apply_purchase(e);
        }
        forward.apply_refund(&refund);
        let mut backward = Features::default();
        backward.apply_refund(&refund);
        for e in events.iter().rev() {
            backward.apply_purchase(e);
        }
        assert_eq!(forward, backward);
        assert_eq!(forward.total.count, 2);
        assert_eq!(
            forward.categories["a"].receipts, 1,
            "the refunded receipt no longer counts for its category"
        );
        assert_eq!(forward.window(30, T0 + DAY_MS).spend, Decimal::from(20));
    }

    #[test]
    fn previous_calendar_year() {
        let mut f = Features::default();
        let jan_2023 = calendar::day_from_civil(2023, 1, 5) * DAY_MS;
        f.apply_purchase(&purchase(jan_2023, 10, "c"));
        let in_2024 = calendar::day_from_civil(2024, 3, 1) * DAY_MS;
        assert_eq!(f.previous_year(in_2024).spend, Decimal::from(10));
        assert_eq!(f.previous_year(jan_2023).spend, Decimal::ZERO);
    }

    #[test]
    fn the_newest_member_snapshot_wins_in_any_order() {
        let snapshot = |version: i64, sms: bool| MemberData {
            known: true,
            active: true,
            registered_at: Some(T0),
            consents: Consents {
                sms,
                ..Consents::default()
            },
            version,
            ..MemberData::default()
        };
        let (v0, v1, v2) = (snapshot(0, false), snapshot(1, true), snapshot(2, false));
        let mut forward = Features::default();
        for m in [&v0, &v1, &v2, &v1] {
            forward.apply_member(m);
        }
        let mut backward = Features::default();
        for m in [&v2, &v0, &v1] {
            backward.apply_member(m);
        }
        assert_eq!(forward, backward);
        assert_eq!(forward.member, v2);
        assert!(!forward.member.consents.sms);
    }
}
