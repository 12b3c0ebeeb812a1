//! The traffic model of a retail chain. Every parameter is configurable; the defaults come
//! from the case studies (about 60% of receipts identified, baskets of 1-30 lines, sale
//! items, several brands and regions, stores and members of very different sizes).

use rand::Rng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Zipf};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub seed: u64,
    pub tenant: String,
    pub stores: usize,
    pub brands: Vec<String>,
    pub regions: Vec<String>,
    /// Zipf exponent of store sizes: a few big stores take most receipts.
    pub store_zipf: f64,
    pub products: usize,
    pub categories: usize,
    /// Share of the catalogue sold at a sale price.
    pub sale_share: f64,
    pub members: usize,
    /// Zipf exponent of purchase frequency over members.
    pub member_zipf: f64,
    /// Share of receipts with a card (penetration).
    pub identified_share: f64,
    /// Mean lines per receipt; sizes run from 1 to `max_lines`, geometric.
    pub basket_mean: f64,
    pub max_lines: usize,
    /// Share of identified receipts that pay with points.
    pub redeem_share: f64,
    /// Receipts later refunded in part, per committed receipt (the steady mix).
    pub refund_share: f64,
    /// Balance checks from the app, per committed receipt (the steady mix).
    pub balance_share: f64,
    /// Customers registering at the till, per committed receipt (the steady mix).
    pub register_share: f64,
    /// Active campaigns seeded: accrual boosts, threshold and quantity discounts, n for m,
    /// fixed bonuses and a birthday boost over the categories, in stacking groups; a promo
    /// code and a coupon campaign come on top.
    pub campaigns: usize,
    /// Share of receipts that present the promo code "11.11".
    pub promo_share: f64,
    /// Share of commits that present a single-use coupon (a fresh batch per run).
    pub coupon_share: f64,
    /// Coupons generated per run.
    pub coupons: usize,
    /// Prices in whole currency units, log-uniform between these.
    pub price_min: u32,
    pub price_max: u32,
    /// Relative traffic per hour of the day (the `day` scenario); 0 while stores are closed.
    pub daily_shape: Vec<f64>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            tenant: "loadtest".into(),
            stores: 50,
            brands: vec!["ShoeHub".into(), "KidsStep".into(), "Stride".into()],
            regions: vec![
                "Almaty".into(),
                "Astana".into(),
                "Shymkent".into(),
                "Karaganda".into(),
            ],
            store_zipf: 1.1,
            products: 2_000,
            categories: 40,
            sale_share: 0.15,
            members: 5_000,
            member_zipf: 1.1,
            identified_share: 0.6,
            basket_mean: 4.0,
            max_lines: 30,
            redeem_share: 0.1,
            refund_share: 0.02,
            balance_share: 0.30,
            register_share: 0.03,
            campaigns: 100,
            promo_share: 0.05,
            coupon_share: 0.02,
            coupons: 20_000,
            price_min: 200,
            price_max: 60_000,
            // Stores open 8:00-22:00, a lunch peak and an evening peak.
            daily_shape: vec![
                0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.5, 0.7, 0.8, 1.0, 1.0, 0.8, 0.7,
                0.8, 0.9, 1.0, 1.0, 0.8, 0.5, 0.0, 0.0,
            ],
        }
    }
}

impl ModelConfig {
    /// Refuses parameters the model cannot honour.
    pub fn validate(&self) -> anyhow::Result<()> {
        let share = |v: f64| (0.0..=1.0).contains(&v);
        anyhow::ensure!(
            self.stores >= 1 && self.stores <= 100_000,
            "stores must be 1..=100000"
        );
        anyhow::ensure!(
            self.products >= 1 && self.products <= 1_000_000,
            "products must be 1..=1000000"
        );
        anyhow::ensure!(
            self.members >= 1 && self.members <= 10_000_000,
            "members must be 1..=10000000"
        );
        anyhow::ensure!(self.categories >= 1, "categories must be at least 1");
        anyhow::ensure!(
            !self.brands.is_empty() && !self.regions.is_empty(),
            "brands and regions must not be empty"
        );
        anyhow::ensure!(
            share(self.sale_share)
                && share(self.identified_share)
                && share(self.redeem_share)
                && share(self.promo_share)
                && share(self.coupon_share)
                && share(self.refund_share)
                && share(self.register_share),
            "shares must be between 0 and 1"
        );
        anyhow::ensure!(
            (0.0..=100.0).contains(&self.balance_share),
            "balance_share must be between 0 and 100 checks per receipt"
        );
        anyhow::ensure!(self.campaigns <= 5_000, "campaigns must be 0..=5000");
        anyhow::ensure!(self.coupons <= 100_000, "coupons must be 0..=100000");
        anyhow::ensure!(
            (1..=500).contains(&self.max_lines),
            "max_lines must be 1..=500"
        );
        anyhow::ensure!(
            self.basket_mean >= 1.0 && self.basket_mean <= self.max_lines as f64,
            "basket_mean must be between 1 and max_lines"
        );
        anyhow::ensure!(
            self.price_min >= 1 && self.price_min <= self.price_max,
            "price_min must be 1..=price_max"
        );
        anyhow::ensure!(
            self.store_zipf > 0.0 && self.member_zipf > 0.0,
            "zipf exponents must be positive"
        );
        anyhow::ensure!(
            self.daily_shape.len() == 24 && self.daily_shape.iter().any(|w| *w > 0.0),
            "daily_shape needs 24 weights, some positive"
        );
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSpec {
    pub id: String,
    pub brand: String,
    pub region: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductSpec {
    pub sku: String,
    pub category: String,
    pub brand: String,
    /// Price in minor units (cents).
    pub price: u64,
    pub sale: bool,
}

/// One generated receipt line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineSpec {
    pub product: usize,
    pub quantity: u32,
}

/// One generated receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptSpec {
    pub store: usize,
    pub member: Option<usize>,
    pub lines: Vec<LineSpec>,
    /// Points (minor units) the customer asks to pay with.
    pub redeem_points: i64,
    /// Presents the promo code.
    pub promo: bool,
    /// Presents a coupon (commits only).
    pub coupon: bool,
}

/// The chain, generated once from the config and a seed.
#[derive(Debug, Clone)]
pub struct Model {
    pub config: ModelConfig,
    pub stores: Vec<StoreSpec>,
    pub products: Vec<ProductSpec>,
    store_pick: Zipf<f64>,
    member_pick: Zipf<f64>,
    /// Members shuffled so the frequent ones are not simply the first registered.
    member_order: Vec<usize>,
}

/// A member's phone number and card number, derived from their index.
pub fn member_phone(i: usize) -> String {
    format!("+7701{:07}", i % 10_000_000)
}

pub fn member_card(i: usize) -> String {
    format!("77{:010}", i)
}

/// Member `i`'s birthday as (year, month, day): adults born 1950-2007, spread over the year.
/// Four members in five give one at the till; the rest are `None`.
pub fn member_birthday(i: usize) -> Option<(i32, i32, i32)> {
    // A fixed scatter (splitmix64) so a member keeps their birthday across runs.
    let mut x = (i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    if x.is_multiple_of(5) {
        return None;
    }
    let year = 1950 + (x >> 8) % 58;
    let month = 1 + (x >> 16) % 12;
    let day = 1 + (x >> 24) % 28;
    Some((year as i32, month as i32, day as i32))
}

impl Model {
    pub fn new(config: ModelConfig) -> anyhow::Result<Self> {
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(config.seed);
        let stores = (0..config.stores)
            .map(|i| StoreSpec {
                id: format!("store-{i:05}"),
                brand: config.brands[i % config.brands.len()].clone(),
                region: config.regions[(i / config.brands.len()) % config.regions.len()].clone(),
            })
            .collect();
        let (lo, hi) = (
            f64::from(config.price_min).ln(),
            f64::from(config.price_max).ln(),
        );
        let products = (0..config.products)
            .map(|i| {
                let units = rng.random_range(lo..=hi).exp().round();
                ProductSpec {
                    sku: format!("sku-{i:07}"),
                    category: format!("category-{:03}", i % config.categories),
                    brand: config.brands[rng.random_range(0..config.brands.len())].clone(),
                    price: (units as u64) * 100 - if rng.random_bool(0.5) { 10 } else { 0 },
                    sale: rng.random_bool(config.sale_share),
                }
            })
            .collect();
        let mut member_order: Vec<usize> = (0..config.members).collect();
        member_order.shuffle(&mut rng);
        Ok(Self {
            store_pick: Zipf::new(config.stores as f64, config.store_zipf)?,
            member_pick: Zipf::new(config.members as f64, config.member_zipf)?,
            stores,
            products,
            member_order,
            config,
        })
    }

    fn basket_size(&self, rng: &mut StdRng) -> usize {
        // Geometric on 1..: P(k) = p (1-p)^(k-1), mean 1/p, truncated at max_lines.
        let p = 1.0 / self.config.basket_mean;
        let mut k = 1;
        while k < self.config.max_lines && !rng.random_bool(p) {
            k += 1;
        }
        k
    }

    /// A random receipt.
    pub fn receipt(&self, rng: &mut StdRng) -> ReceiptSpec {
        let store = self.store_pick.sample(rng) as usize - 1;
        let member = rng
            .random_bool(self.config.identified_share)
            .then(|| self.member_order[self.member_pick.sample(rng) as usize - 1]);
        let lines = (0..self.basket_size(rng))
            .map(|_| LineSpec {
                product: rng.random_range(0..self.products.len()),
                quantity: if rng.random_bool(0.8) {
                    1
                } else {
                    rng.random_range(2..=4)
                },
            })
            .collect();
        let redeem_points = if member.is_some() && rng.random_bool(self.config.redeem_share) {
            rng.random_range(1..=500) * 100
        } else {
            0
        };
        let promo = rng.random_bool(self.config.promo_share);
        let coupon = rng.random_bool(self.config.coupon_share);
        ReceiptSpec {
            store,
            member,
            lines,
            redeem_points,
            promo,
            coupon,
        }
    }

    /// The indexes of the `n` members the traffic picks most often, busiest first.
    pub fn busiest(&self, n: usize) -> &[usize] {
        &self.member_order[..n.min(self.member_order.len())]
    }

    /// A member picked by purchase frequency.
    pub fn member(&self, rng: &mut StdRng) -> usize {
        self.member_order[self.member_pick.sample(rng) as usize - 1]
    }
}

/// Formats minor units as a decimal string.
pub fn money(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn distributions_come_out_as_configured() {
        let config = ModelConfig {
            identified_share: 0.6,
            basket_mean: 4.0,
            ..ModelConfig::default()
        };
        let model = Model::new(config).unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let n = 50_000;
        let receipts: Vec<ReceiptSpec> = (0..n).map(|_| model.receipt(&mut rng)).collect();
        let identified = receipts.iter().filter(|r| r.member.is_some()).count() as f64 / n as f64;
        assert!((identified - 0.6).abs() < 0.01, "penetration {identified}");
        let sizes: Vec<usize> = receipts.iter().map(|r| r.lines.len()).collect();
        assert!(sizes.iter().all(|s| (1..=30).contains(s)));
        let mean = sizes.iter().sum::<usize>() as f64 / n as f64;
        assert!((mean - 4.0).abs() < 0.15, "basket mean {mean}");
        // Zipf stores: the biggest store takes far more than its even share.
        let top = receipts.iter().filter(|r| r.store == 0).count() as f64 / n as f64;
        assert!(top > 5.0 / 50.0, "top store share {top}");
        let redeeming = receipts.iter().filter(|r| r.redeem_points > 0).count() as f64 / n as f64;
        assert!(
            (redeeming - 0.06).abs() < 0.01,
            "redeeming share {redeeming}"
        );
    }

    /// The members `busiest` names take most of the picks: app keys made for them cover most
    /// of the app traffic.
    #[test]
    fn the_busiest_members_are_the_most_picked() {
        let model = Model::new(ModelConfig::default()).unwrap();
        let mut rng = StdRng::seed_from_u64(11);
        let mut picks = vec![0u32; model.config.members];
        let n = 100_000;
        for _ in 0..n {
            picks[model.member(&mut rng)] += 1;
        }
        let most = (0..picks.len()).max_by_key(|&i| picks[i]).unwrap();
        assert_eq!(model.busiest(1), [most]);
        let covered: u32 = model.busiest(1000).iter().map(|&i| picks[i]).sum();
        assert!(
            f64::from(covered) > 0.7 * f64::from(n),
            "the 1000 busiest took {covered} of {n} picks"
        );
    }

    #[test]
    fn four_members_in_five_have_a_real_birthday() {
        let given: Vec<(i32, i32, i32)> = (0..10_000).filter_map(member_birthday).collect();
        let share = given.len() as f64 / 10_000.0;
        assert!((0.77..0.83).contains(&share), "{share}");
        assert!(given.iter().all(|&(y, m, d)| (1950..2008).contains(&y)
            && (1..=12).contains(&m)
            && (1..=28).contains(&d)));
        for month in 1..=12 {
            assert!(given.iter().any(|b| b.1 == month), "month {month}");
        }
        assert_eq!(member_birthday(42), member_birthday(42));
    }

    #[test]
    fn the_same_seed_gives_the_same_chain() {
        let a = Model::new(ModelConfig::default()).unwrap();
        let b = Model::new(ModelConfig::default()).unwrap();
        assert_eq!(a.products, b.products);
        let sale = a.products.iter().filter(|p| p.sale).count() as f64 / a.products.len() as f64;
        assert!((sale - 0.15).abs() < 0.03, "sale share {sale}");
    }

    #[test]
    fn bad_configs_are_refused() {
        for bad in [
            ModelConfig {
                identified_share: 1.5,
                ..ModelConfig::default()
            },
            ModelConfig {
                max_lines: 0,
                ..ModelConfig::default()
            },
            ModelConfig {
                daily_shape: vec![1.0; 3],
                ..ModelConfig::default()
            },
        ] {
            assert!(Model::new(bad).is_err());
        }
    }
}
