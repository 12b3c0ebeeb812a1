//! A tenant's active campaigns compiled for checkout: in stacking order, with product scopes
//! indexed so a line finds the campaigns that cover it in a few lookups.

use std::collections::{HashMap, HashSet};

use rust_decimal::Decimal;

use crate::evaluate::Text;
use crate::usage::{discount_counter, points_counter, uses_counter};

use crate::campaign::{
    Campaign, CampaignStatus, CodeRequirement, Mechanic, StackingGroup, StackingMode,
    normalize_code,
};

/// A set of campaign indexes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bits(Vec<u64>);

impl Bits {
    pub fn with_len(n: usize) -> Self {
        Self(vec![0; n.div_ceil(64)])
    }

    pub fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    pub fn get(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    pub fn or(&mut self, other: &Bits) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a |= b;
        }
    }
}

/// A campaign with where it stands in stacking.
#[derive(Debug, Clone)]
pub struct Entry {
    pub campaign: Campaign,
    pub id: Text,
    /// How its effects are described: "name: mechanic".
    pub description: Text,
    /// Its normalized promo code, if it has one.
    pub promo_code: Option<String>,
    /// Names of its budget counters.
    pub uses_counter: String,
    pub discount_counter: String,
    pub points_counter: String,
    /// Index into [`CampaignBook::groups`].
    pub group: usize,
}

/// A stacking group in order; campaigns without a group form the last, stackable one.
#[derive(Debug, Clone)]
pub struct Group {
    pub group_id: String,
    pub mode: StackingMode,
    pub max_discount_percent: Option<Decimal>,
    /// Indexes of its campaigns in [`CampaignBook::entries`], in priority order.
    pub members: Vec<usize>,
}

#[derive(Debug, Clone, Default)]
pub struct CampaignBook {
    pub version: u64,
    pub entries: Vec<Entry>,
    pub groups: Vec<Group>,
    /// Campaigns whose scope is every line.
    all_lines: Bits,
    by_sku: HashMap<String, Bits>,
    by_category: HashMap<String, Bits>,
    by_brand: HashMap<String, Bits>,
    /// Normalized promo code → campaigns asking for it.
    pub promo_codes: HashMap<String, Vec<usize>>,
    /// Some campaign targets segments: checkout asks segmentation.
    pub needs_segments: bool,
    /// Some campaign reads the member's birthday or attributes: checkout reads the profile.
    pub needs_profile: bool,
    /// Some campaign limits uses per member, budgets or coupons: checkout reads counters.
    pub needs_counters: bool,
}

pub fn scope_of(m: &Mechanic) -> Option<&crate::campaign::ProductScope> {
    match m {
        Mechanic::AccrualBoost { scope, .. }
        | Mechanic::ThresholdDiscount { scope, .. }
        | Mechanic::QuantityDiscount { scope, .. }
        | Mechanic::NForM { scope, .. }
        | Mechanic::ExtraDiscount { scope, .. } => Some(scope),
        Mechanic::BirthdayBoost { .. }
        | Mechanic::FixedBonus { .. }
        | Mechanic::ActionBonus { .. } => None,
    }
}

impl CampaignBook {
    /// Compiles the active checkout campaigns (action bonuses are granted elsewhere).
    pub fn compile(version: u64, campaigns: Vec<Campaign>, groups: &[StackingGroup]) -> Self {
        let mut ordered_groups: Vec<&StackingGroup> = groups.iter().collect();
        ordered_groups.sort_by(|a, b| (a.priority, &a.group_id).cmp(&(b.priority, &b.group_id)));
        let mut book_groups: Vec<Group> = ordered_groups
            .iter()
            .map(|g| Group {
                group_id: g.group_id.clone(),
                mode: g.mode,
                max_discount_percent: g.max_discount_percent,
                members: Vec::new(),
            })
            .collect();
        book_groups.push(Group {
            group_id: String::new(),
            mode: StackingMode::Stackable,
            max_discount_percent: None,
            members: Vec::new(),
        });
        let index: HashMap<&str, usize> = book_groups
            .iter()
            .enumerate()
            .map(|(i, g)| (g.group_id.as_str(), i))
            .collect();
        let ungrouped = book_groups.len() - 1;
        let mut entries: Vec<Entry> = campaigns
            .into_iter()
            .filter(|c| {
                c.status == CampaignStatus::Active
                    && !matches!(c.mechanic, Mechanic::ActionBonus { .. })
            })
            .map(|c| Entry {
                id: Text::from(c.campaign_id.as_str()),
                description: Text::from(format!(
                    "{}: {}",
                    if c.name.is_empty() {
                        &c.campaign_id
                    } else {
                        &c.name
                    },
                    c.mechanic.name()
                )),
                promo_code: match &c.code {
                    Some(CodeRequirement::PromoCode(p)) => Some(normalize_code(p)),
                    _ => None,
                },
                uses_counter: uses_counter(&c.campaign_id),
                discount_counter: discount_counter(&c.campaign_id),
                points_counter: points_counter(&c.campaign_id),
                group: index
                    .get(c.stacking_group_id.as_str())
                    .copied()
                    .unwrap_or(ungrouped),
                campaign: c,
            })
            .collect();
        entries.sort_by(|a, b| {
            (a.group, a.campaign.priority, &a.campaign.campaign_id).cmp(&(
                b.group,
                b.campaign.priority,
                &b.campaign.campaign_id,
            ))
        });
        let n = entries.len();
        let mut book = CampaignBook {
            version,
            all_lines: Bits::with_len(n),
            ..Default::default()
        };
        for (i, e) in entries.iter().enumerate() {
            book_groups[e.group].members.push(i);
            let c = &e.campaign;
            if let Some(scope) = scope_of(&c.mechanic) {
                if scope.is_all() {
                    book.all_lines.set(i);
                }
                for (map, list) in [
                    (&mut book.by_sku, &scope.skus),
                    (&mut book.by_category, &scope.categories),
                    (&mut book.by_brand, &scope.brands),
                ] {
                    let unique: HashSet<&String> = list.iter().collect();
                    for key in unique {
                        map.entry(key.clone())
                            .or_insert_with(|| Bits::with_len(n))
                            .set(i);
                    }
                }
            } else {
                book.all_lines.set(i);
            }
            if let Some(CodeRequirement::PromoCode(code)) = &c.code {
                book.promo_codes
                    .entry(normalize_code(code))
                    .or_default()
                    .push(i);
            }
            let t = &c.targeting;
            book.needs_segments |= !t.segment_ids.is_empty();
            book.needs_profile |= !t.member_attributes.is_empty()
                || matches!(c.mechanic, Mechanic::BirthdayBoost { .. });
            book.needs_counters |= c.budget.is_limited()
                || c.member_limit > 0
                || matches!(c.code, Some(CodeRequirement::Coupons { .. }));
        }
        book.entries = entries;
        book.groups = book_groups;
        book
    }

    /// The campaigns whose product scope covers a line.
    pub fn covering(&self, sku: &str, category: &str, brand: &str) -> Bits {
        let mut bits = self.all_lines.clone();
        if let Some(b) = self.by_sku.get(sku) {
            bits.or(b);
        }
        if !category.is_empty()
            && let Some(b) = self.by_category.get(category)
        {
            bits.or(b);
        }
        if !brand.is_empty()
            && let Some(b) = self.by_brand.get(brand)
        {
            bits.or(b);
        }
        bits
    }
}
