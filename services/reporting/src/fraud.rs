//! Fraud signals over a period's purchases: the suspicious patterns of the case studies,
//! found in the stored facts (member ids, store and cashier ids; never personal data).
//!
//! - **Store hopping**: one member buying in many stores within a short time (a card passed
//!   around, or copied).
//! - **Cashier concentration**: most of a cashier's identified receipts carry the same few
//!   members (the cashier's own card, or a friend's, swiped for other customers).
//! - **Early redemption**: points redeemed within hours of the member's registration
//!   (accounts opened to cash out bonuses).
//!
//! Each is computed from the purchase facts of the period, read a page at a time from one
//! snapshot, at most [`MAX_SCAN`] of them.

use std::collections::HashMap;

use loyalty_platform::clock::Millis;
use loyalty_platform::error::{Error, Result, Violations};

use crate::fact::{Fact, Purchase};
use crate::service::{Reporting, Request};
use crate::store::Receipts;

/// Most purchase facts one query reads; a longer period must be split.
pub const MAX_SCAN: u64 = 2_000_000;
/// Most signals of each kind one answer holds.
pub const MAX_SIGNALS: usize = 1_000;
const PAGE: usize = 10_000;
const PAGE_BYTES: usize = 16 << 20;

/// Thresholds of a query; every one has a default (see [`Thresholds::or_defaults`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub min_stores: u32,
    pub store_window_ms: Millis,
    pub min_cashier_receipts: u64,
    pub top_members: usize,
    pub min_top_share_percent: u32,
    pub early_redemption_ms: Millis,
    pub limit: usize,
}

impl Thresholds {
    /// Raw request values (0: default) checked and completed.
    pub fn or_defaults(
        min_stores: i32,
        store_window_minutes: i32,
        min_cashier_receipts: i32,
        top_members: i32,
        min_top_share_percent: i32,
        early_redemption_hours: i32,
        limit: i32,
    ) -> Result<Self> {
        let mut v = Violations::new();
        let mut pick = |value: i32, default: i64, range: (i64, i64), field: &str| -> i64 {
            let value = if value == 0 {
                default
            } else {
                i64::from(value)
            };
            v.check(
                (range.0..=range.1).contains(&value),
                field,
                format!("must be between {} and {}", range.0, range.1),
            );
            value.clamp(range.0, range.1)
        };
        let t = Self {
            min_stores: u32::try_from(pick(min_stores, 3, (2, 1_000), "min_stores")).unwrap_or(3),
            store_window_ms: pick(
                store_window_minutes,
                60,
                (1, 10_080),
                "store_window_minutes",
            ) * 60_000,
            min_cashier_receipts: u64::try_from(pick(
                min_cashier_receipts,
                20,
                (1, 1_000_000),
                "min_cashier_receipts",
            ))
            .unwrap_or(20),
            top_members: usize::try_from(pick(top_members, 3, (1, 100), "top_members"))
                .unwrap_or(3),
            min_top_share_percent: u32::try_from(pick(
                min_top_share_percent,
                50,
                (1, 100),
                "min_top_share_percent",
            ))
            .unwrap_or(50),
            early_redemption_ms: pick(
                early_redemption_hours,
                24,
                (1, 8_760),
                "early_redemption_hours",
            ) * 3_600_000,
            limit: usize::try_from(pick(limit, 100, (1, MAX_SIGNALS as i64), "limit"))
                .unwrap_or(100),
        };
        v.finish()?;
        Ok(t)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreHopping {
    pub member_id: String,
    /// The stores of the busiest window, in order of the first visit.
    pub store_ids: Vec<String>,
    pub first: Millis,
    pub last: Millis,
    pub receipts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CashierConcentration {
    pub store_id: String,
    pub cashier_id: String,
    pub identified_receipts: u64,
    pub distinct_members: u64,
    /// The members on most of the cashier's receipts, most first.
    pub top_member_ids: Vec<String>,
    pub top_receipts: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarlyRedemption {
    pub member_id: String,
    pub registered_at: Millis,
    pub redeemed_at: Millis,
    pub receipt_id: String,
    pub store_id: String,
    pub points_redeemed: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signals {
    pub store_hopping: Vec<StoreHopping>,
    pub cashier_concentration: Vec<CashierConcentration>,
    pub early_redemptions: Vec<EarlyRedemption>,
    pub receipts_scanned: u64,
}

/// What one pass over the purchases keeps.
#[derive(Debug, Default)]
struct Collected {
    /// (time, store) of each member's identified purchases.
    visits: HashMap<String, Vec<(Millis, String)>>,
    /// Per (store, cashier): receipts per member.
    cashiers: HashMap<(String, String), HashMap<String, u64>>,
    /// Identified purchases that redeemed points.
    redemptions: Vec<Redeemed>,
    scanned: u64,
}

/// What early redemption needs of a purchase.
#[derive(Debug)]
struct Redeemed {
    member_id: String,
    time: Millis,
    receipt_id: String,
    store_id: String,
    points: i64,
}

impl Collected {
    fn add(&mut self, p: Purchase) {
        self.scanned += 1;
        let Some(member) = p.member_id.clone() else {
            return;
        };
        self.visits
            .entry(member.clone())
            .or_default()
            .push((p.time, p.outlet.store_id.clone()));
        if !p.cashier_id.is_empty() {
            *self
                .cashiers
                .entry((p.outlet.store_id.clone(), p.cashier_id.clone()))
                .or_default()
                .entry(member)
                .or_default() += 1;
        }
        if p.points_redeemed > 0 {
            self.redemptions.push(Redeemed {
                member_id: p.member_id.unwrap_or_default(),
                time: p.time,
                receipt_id: p.receipt_id,
                store_id: p.outlet.store_id,
                points: p.points_redeemed,
            });
        }
    }
}

impl Reporting {
    /// The fraud signals of `req`'s period (business days in the tenant's zone; filters
    /// other than the period do not apply).
    /// A query holds up to [`MAX_SCAN`] purchases' visits in memory: it takes one of the
    /// permits segment builds take, so heavy queries run at most that many at once.
    pub async fn fraud_signals(&self, req: &Request, t: Thresholds) -> Result<Signals> {
        let (from, to) = self.days(req)?;
        let permit = self.heavy_query().await?;
        let snapshot = self.store.snapshot().await?;
        let mut collected = Collected::default();
        let mut after = None;
        loop {
            let page = self
                .store
                .page(
                    &req.tenant_id,
                    Receipts::Purchases,
                    from,
                    to,
                    snapshot,
                    after,
                    PAGE,
                    PAGE_BYTES,
                )
                .await?;
            let next = match (page.more, page.rows.last()) {
                (true, Some((position, _))) => Some(*position),
                _ => None,
            };
            for (_, fact) in page.rows {
                if let Fact::Purchase(p) = fact {
                    collected.add(p);
                }
            }
            if collected.scanned > MAX_SCAN {
                return Err(Error::invalid(
                    "period",
                    format!("holds more than {MAX_SCAN} purchases; ask for a shorter one"),
                ));
            }
            match next {
                Some(position) => after = Some(position),
                None => break,
            }
        }
        let members: Vec<&String> = collected.redemptions.iter().map(|r| &r.member_id).collect();
        let registered = self.registered_at(&req.tenant_id, &members);
        // The work is CPU only; off the async workers like a segment view.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            Ok(judge(collected, &registered, t))
        })
        .await
        .map_err(Error::internal)?
    }
}

fn judge(c: Collected, registered: &HashMap<String, Millis>, t: Thresholds) -> Signals {
    let mut store_hopping: Vec<StoreHopping> = c
        .visits
        .into_iter()
        .filter_map(|(member, visits)| hopping(member, visits, t))
        .collect();
    store_hopping.sort_by(|a, b| {
        (b.store_ids.len(), b.receipts, &a.member_id).cmp(&(
            a.store_ids.len(),
            a.receipts,
            &b.member_id,
        ))
    });
    store_hopping.truncate(t.limit);

    let mut cashier_concentration: Vec<CashierConcentration> = c
        .cashiers
        .into_iter()
        .filter_map(|((store_id, cashier_id), members)| {
            let identified: u64 = members.values().sum();
            if identified < t.min_cashier_receipts {
                return None;
            }
            let mut counts: Vec<(String, u64)> = members.into_iter().collect();
            counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            let distinct = counts.len() as u64;
            counts.truncate(t.top_members);
            let top: u64 = counts.iter().map(|(_, n)| n).sum();
            (top * 100 >= identified * u64::from(t.min_top_share_percent)).then(|| {
                CashierConcentration {
                    store_id,
                    cashier_id,
                    identified_receipts: identified,
                    distinct_members: distinct,
                    top_member_ids: counts.into_iter().map(|(m, _)| m).collect(),
                    top_receipts: top,
                }
            })
        })
        .collect();
    cashier_concentration.sort_by(|a, b| {
        (b.top_receipts * a.identified_receipts)
            .cmp(&(a.top_receipts * b.identified_receipts))
            .then_with(|| b.identified_receipts.cmp(&a.identified_receipts))
            .then_with(|| (&a.store_id, &a.cashier_id).cmp(&(&b.store_id, &b.cashier_id)))
    });
    cashier_concentration.truncate(t.limit);

    let mut early_redemptions: Vec<EarlyRedemption> = c
        .redemptions
        .into_iter()
        .filter_map(|r| {
            let registered_at = *registered.get(&r.member_id)?;
            let after = r.time - registered_at;
            (0..=t.early_redemption_ms)
                .contains(&after)
                .then_some(EarlyRedemption {
                    member_id: r.member_id,
                    registered_at,
                    redeemed_at: r.time,
                    receipt_id: r.receipt_id,
                    store_id: r.store_id,
                    points_redeemed: r.points,
                })
        })
        .collect();
    early_redemptions.sort_by(|a, b| {
        (a.redeemed_at - a.registered_at, &a.receipt_id)
            .cmp(&(b.redeemed_at - b.registered_at, &b.receipt_id))
    });
    early_redemptions.truncate(t.limit);

    Signals {
        store_hopping,
        cashier_concentration,
        early_redemptions,
        receipts_scanned: c.scanned,
    }
}

/// The window of `t.store_window_ms` with the most distinct stores, if it has enough.
fn hopping(
    member_id: String,
    mut visits: Vec<(Millis, String)>,
    t: Thresholds,
) -> Option<StoreHopping> {
    if visits.len() < t.min_stores as usize {
        return None;
    }
    visits.sort();
    // A sliding window with a count per store: each visit enters and leaves it once.
    let mut inside: HashMap<&str, u32> = HashMap::new();
    let mut best: Option<(usize, usize, usize)> = None; // (stores, start, end)
    let mut start = 0;
    for end in 0..visits.len() {
        *inside.entry(visits[end].1.as_str()).or_default() += 1;
        while visits[end].0 - visits[start].0 > t.store_window_ms {
            let store = visits[start].1.as_str();
            if let Some(n) = inside.get_mut(store) {
                *n -= 1;
                if *n == 0 {
                    inside.remove(store);
                }
            }
            start += 1;
        }
        if best.is_none_or(|(n, _, _)| inside.len() > n) {
            best = Some((inside.len(), start, end));
        }
    }
    let (n, start, end) = best?;
    if n < t.min_stores as usize {
        return None;
    }
    let window = &visits[start..=end];
    let mut store_ids: Vec<String> = Vec::new();
    for (_, s) in window {
        if !store_ids.contains(s) {
            store_ids.push(s.clone());
        }
    }
    Some(StoreHopping {
        member_id,
        store_ids,
        first: window[0].0,
        last: window[window.len() - 1].0,
        receipts: u32::try_from(window.len()).unwrap_or(u32::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fact::Outlet;
    use loyalty_platform::types::Channel;
    use rust_decimal::Decimal;

    fn thresholds() -> Thresholds {
        Thresholds::or_defaults(0, 0, 4, 1, 60, 0, 0).unwrap()
    }

    fn bought(
        receipt: &str,
        member: &str,
        store: &str,
        cashier: &str,
        minute: i64,
        redeemed: i64,
    ) -> Purchase {
        Purchase {
            receipt_id: receipt.into(),
            outlet: Outlet {
                store_id: store.into(),
                brand: "b".into(),
                region: "r".into(),
            },
            cashier_id: cashier.into(),
            time_zone: "UTC".into(),
            channel: Channel::Store,
            member_id: Some(member.into()),
            time: minute * 60_000,
            day: 0,
            lines: Vec::new(),
            gross: Decimal::ONE,
            discount: Decimal::ZERO,
            paid: Decimal::ONE,
            points_accrued: 0,
            points_redeemed: redeemed,
            codes: Vec::new(),
            campaign_ids: Vec::new(),
            held_out_campaign_ids: Vec::new(),
            coupon_codes: Vec::new(),
        }
    }

    #[test]
    fn each_pattern_is_found_and_ordinary_shoppers_are_not() {
        let mut c = Collected::default();
        // Three stores within an hour; an ordinary member two stores a day apart.
        for (i, s) in ["s1", "s2", "s3"].iter().enumerate() {
            c.add(bought(&format!("h{i}"), "hopper", s, "", i as i64 * 20, 0));
        }
        c.add(bought("o1", "ordinary", "s1", "", 0, 0));
        c.add(bought("o2", "ordinary", "s2", "", 1_440, 0));
        c.add(bought("o3", "ordinary", "s3", "", 2_880, 0));
        // Cashier k1 rings up "friend" on 4 of 5 receipts; k2 serves five members.
        for i in 0..4 {
            c.add(bought(
                &format!("k1-{i}"),
                "friend",
                "s9",
                "k1",
                5_000 + i,
                0,
            ));
        }
        c.add(bought("k1-x", "m-x", "s9", "k1", 5_010, 0));
        for i in 0..5 {
            c.add(bought(
                &format!("k2-{i}"),
                &format!("m{i}"),
                "s9",
                "k2",
                6_000 + i,
                0,
            ));
        }
        // A redemption two hours after registration, and one two days after.
        c.add(bought("r-fast", "newbie", "s1", "", 10_000 + 120, 500));
        c.add(bought("r-slow", "oldie", "s1", "", 10_000 + 2_880, 500));
        let registered = HashMap::from([
            ("newbie".to_string(), 10_000 * 60_000),
            ("oldie".to_string(), 10_000 * 60_000),
        ]);
        let s = judge(c, &registered, thresholds());
        let hoppers: Vec<&str> = s
            .store_hopping
            .iter()
            .map(|h| h.member_id.as_str())
            .collect();
        assert_eq!(hoppers, ["hopper"]);
        assert_eq!(s.store_hopping[0].store_ids, ["s1", "s2", "s3"]);
        assert_eq!(s.cashier_concentration.len(), 1);
        let k1 = &s.cashier_concentration[0];
        assert_eq!(
            (
                k1.cashier_id.as_str(),
                k1.identified_receipts,
                k1.distinct_members,
                k1.top_receipts
            ),
            ("k1", 5, 2, 4)
        );
        assert_eq!(k1.top_member_ids, ["friend"]);
        let early: Vec<&str> = s
            .early_redemptions
            .iter()
            .map(|e| e.receipt_id.as_str())
            .collect();
        assert_eq!(early, ["r-fast"]);
        assert_eq!(s.receipts_scanned, 18);
    }

    #[test]
    fn thresholds_are_bounded() {
        assert!(Thresholds::or_defaults(1, 0, 0, 0, 0, 0, 0).is_err());
        assert!(Thresholds::or_defaults(0, 0, 0, 0, 101, 0, 0).is_err());
        assert!(Thresholds::or_defaults(0, 0, 0, 0, 0, 0, 5_000).is_err());
        let d = Thresholds::or_defaults(0, 0, 0, 0, 0, 0, 0).unwrap();
        assert_eq!(
            (d.min_stores, d.store_window_ms, d.limit),
            (3, 3_600_000, 100)
        );
    }
}
