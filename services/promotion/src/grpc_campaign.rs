//! Campaigns, stacking groups and coupons between protobuf and the domain.

use loyalty_platform::error::{Error, Violations};
use loyalty_platform::grpc::{channel, channel_to_proto, millis, timestamp};
use loyalty_proto::common::v1::{Decimal as PbDecimal, TimeRange};
use loyalty_proto::promotion::v1 as pb;
use rust_decimal::Decimal;

use crate::campaign::{
    ActionKind, Benefit, Budget, Campaign, CampaignStatus, CodeRequirement, Coupon, Mechanic,
    ProductScope, SkipReason, StackingGroup, StackingMode, Step, Targeting,
};
use crate::receipt::parse_decimal;

fn dec(d: Decimal) -> Option<PbDecimal> {
    Some(PbDecimal {
        value: d.to_string(),
    })
}

/// A required decimal (percent, amount); `None` and a violation when missing or malformed.
fn required(v: &mut Violations, d: &Option<PbDecimal>, field: &str) -> Option<Decimal> {
    match d {
        Some(d) if !d.value.is_empty() => match parse_decimal(&d.value, 6) {
            Ok(x) => Some(x),
            Err(why) => {
                v.add(field, why);
                None
            }
        },
        _ => {
            v.add(field, "is required");
            None
        }
    }
}

fn optional(v: &mut Violations, d: &Option<PbDecimal>, field: &str) -> Option<Decimal> {
    match d {
        Some(d) if !d.value.is_empty() => required(v, &Some(d.clone()), field),
        _ => None,
    }
}

pub fn status_from(v: &mut Violations, s: i32, field: &str) -> CampaignStatus {
    match pb::CampaignStatus::try_from(s).unwrap_or(pb::CampaignStatus::Unspecified) {
        pb::CampaignStatus::Unspecified | pb::CampaignStatus::Draft => CampaignStatus::Draft,
        pb::CampaignStatus::Active => CampaignStatus::Active,
        pb::CampaignStatus::Paused => CampaignStatus::Paused,
        pb::CampaignStatus::Archived => {
            v.add(field, "archive a campaign with ArchiveCampaign");
            CampaignStatus::Archived
        }
    }
}

pub fn status_to(s: CampaignStatus) -> i32 {
    (match s {
        CampaignStatus::Draft => pb::CampaignStatus::Draft,
        CampaignStatus::Active => pb::CampaignStatus::Active,
        CampaignStatus::Paused => pb::CampaignStatus::Paused,
        CampaignStatus::Archived => pb::CampaignStatus::Archived,
    }) as i32
}

fn scope_from(s: Option<pb::ProductScope>) -> ProductScope {
    let s = s.unwrap_or_default();
    ProductScope {
        skus: s.skus,
        categories: s.categories,
        brands: s.brands,
    }
}

fn scope_to(s: &ProductScope) -> Option<pb::ProductScope> {
    Some(pb::ProductScope {
        skus: s.skus.clone(),
        categories: s.categories.clone(),
        brands: s.brands.clone(),
    })
}

fn steps_from(v: &mut Violations, steps: Vec<pb::DiscountStep>, field: &str) -> Vec<Step> {
    steps
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let f = format!("{field}.steps[{i}]");
            let from = optional(v, &s.from_value, &format!("{f}.from_value")).unwrap_or_default();
            let benefit = match s.benefit {
                Some(pb::discount_step::Benefit::Percent(p)) => Benefit::Percent(
                    required(v, &Some(p), &format!("{f}.percent")).unwrap_or_default(),
                ),
                Some(pb::discount_step::Benefit::Amount(a)) => Benefit::Amount(
                    required(v, &Some(a), &format!("{f}.amount")).unwrap_or_default(),
                ),
                None => {
                    v.add(
                        format!("{f}.benefit"),
                        "one of percent or amount is required",
                    );
                    Benefit::Percent(Decimal::ZERO)
                }
            };
            Step { from, benefit }
        })
        .collect()
}

fn steps_to(steps: &[Step]) -> Vec<pb::DiscountStep> {
    steps
        .iter()
        .map(|s| pb::DiscountStep {
            from_value: dec(s.from),
            benefit: Some(match s.benefit {
                Benefit::Percent(p) => pb::discount_step::Benefit::Percent(PbDecimal {
                    value: p.to_string(),
                }),
                Benefit::Amount(a) => pb::discount_step::Benefit::Amount(PbDecimal {
                    value: a.to_string(),
                }),
            }),
        })
        .collect()
}

fn small(v: &mut Violations, n: i32, field: &str) -> u16 {
    u16::try_from(n).unwrap_or_else(|_| {
        v.add(field, "must be between 0 and 65535");
        0
    })
}

fn count(v: &mut Violations, n: i32, field: &str) -> u32 {
    u32::try_from(n).unwrap_or_else(|_| {
        v.add(field, "must not be negative");
        0
    })
}

fn mechanic_from(v: &mut Violations, m: Option<pb::campaign::Mechanic>) -> Mechanic {
    use pb::campaign::Mechanic as M;
    let c = "campaign";
    match m {
        None => {
            v.add(
                format!("{c}.mechanic"),
                "one mechanic is required: accrual_boost, birthday_boost, threshold_discount, quantity_discount, n_for_m, fixed_bonus, action_bonus or extra_discount",
            );
            Mechanic::ExtraDiscount {
                scope: ProductScope::default(),
                percent: Decimal::ZERO,
            }
        }
        Some(M::AccrualBoost(b)) => Mechanic::AccrualBoost {
            scope: scope_from(b.scope),
            percent: optional(
                v,
                &b.accrual_percent,
                "campaign.accrual_boost.accrual_percent",
            ),
            multiplier: optional(v, &b.multiplier, "campaign.accrual_boost.multiplier"),
        },
        Some(M::BirthdayBoost(b)) => Mechanic::BirthdayBoost {
            percent: required(
                v,
                &b.accrual_percent,
                "campaign.birthday_boost.accrual_percent",
            )
            .unwrap_or_default(),
            days_before: small(v, b.days_before, "campaign.birthday_boost.days_before"),
            days_after: small(v, b.days_after, "campaign.birthday_boost.days_after"),
        },
        Some(M::ThresholdDiscount(t)) => Mechanic::ThresholdDiscount {
            scope: scope_from(t.scope),
            steps: steps_from(v, t.steps, "campaign.threshold_discount"),
        },
        Some(M::QuantityDiscount(q)) => Mechanic::QuantityDiscount {
            scope: scope_from(q.scope),
            steps: steps_from(v, q.steps, "campaign.quantity_discount"),
        },
        Some(M::NForM(x)) => Mechanic::NForM {
            scope: scope_from(x.scope),
            n: count(v, x.n, "campaign.n_for_m.n"),
            m: count(v, x.m, "campaign.n_for_m.m"),
        },
        Some(M::FixedBonus(b)) => Mechanic::FixedBonus {
            points: b.points,
            activation_delay_days: small(
                v,
                b.activation_delay_days,
                "campaign.fixed_bonus.activation_delay_days",
            ),
            lifetime_days: small(v, b.lifetime_days, "campaign.fixed_bonus.lifetime_days"),
        },
        Some(M::ActionBonus(b)) => Mechanic::ActionBonus {
            action: match pb::ActionKind::try_from(b.action).unwrap_or(pb::ActionKind::Unspecified)
            {
                pb::ActionKind::Registration => ActionKind::Registration,
                pb::ActionKind::Questionnaire => ActionKind::Questionnaire,
                pb::ActionKind::Referral => ActionKind::Referral,
                pb::ActionKind::Unspecified => {
                    v.add(
                        "campaign.action_bonus.action",
                        "is required: registration, questionnaire or referral",
                    );
                    ActionKind::Registration
                }
            },
            points: b.points,
            lifetime_days: small(v, b.lifetime_days, "campaign.action_bonus.lifetime_days"),
        },
        Some(M::ExtraDiscount(x)) => Mechanic::ExtraDiscount {
            scope: scope_from(x.scope),
            percent: required(v, &x.percent, "campaign.extra_discount.percent").unwrap_or_default(),
        },
    }
}

fn mechanic_to(m: &Mechanic) -> pb::campaign::Mechanic {
    use pb::campaign::Mechanic as M;
    match m {
        Mechanic::AccrualBoost {
            scope,
            percent,
            multiplier,
        } => M::AccrualBoost(pb::AccrualBoost {
            scope: scope_to(scope),
            accrual_percent: percent.and_then(dec),
            multiplier: multiplier.and_then(dec),
        }),
        Mechanic::BirthdayBoost {
            percent,
            days_before,
            days_after,
        } => M::BirthdayBoost(pb::BirthdayBoost {
            accrual_percent: dec(*percent),
            days_before: i32::from(*days_before),
            days_after: i32::from(*days_after),
        }),
        Mechanic::ThresholdDiscount { scope, steps } => {
            M::ThresholdDiscount(pb::ThresholdDiscount {
                scope: scope_to(scope),
                steps: steps_to(steps),
            })
        }
        Mechanic::QuantityDiscount { scope, steps } => M::QuantityDiscount(pb::QuantityDiscount {
            scope: scope_to(scope),
            steps: steps_to(steps),
        }),
        Mechanic::NForM { scope, n, m } => M::NForM(pb::NForM {
            scope: scope_to(scope),
            n: i32::try_from(*n).unwrap_or(i32::MAX),
            m: i32::try_from(*m).unwrap_or(i32::MAX),
        }),
        Mechanic::FixedBonus {
            points,
            activation_delay_days,
            lifetime_days,
        } => M::FixedBonus(pb::FixedBonus {
            points: *points,
            activation_delay_days: i32::from(*activation_delay_days),
            lifetime_days: i32::from(*lifetime_days),
        }),
        Mechanic::ActionBonus {
            action,
            points,
            lifetime_days,
        } => M::ActionBonus(pb::ActionBonus {
            action: (match action {
                ActionKind::Registration => pb::ActionKind::Registration,
                ActionKind::Questionnaire => pb::ActionKind::Questionnaire,
                ActionKind::Referral => pb::ActionKind::Referral,
            }) as i32,
            points: *points,
            lifetime_days: i32::from(*lifetime_days),
        }),
        Mechanic::ExtraDiscount { scope, percent } => M::ExtraDiscount(pb::ExtraDiscount {
            scope: scope_to(scope),
            percent: dec(*percent),
        }),
    }
}

fn targeting_from(v: &mut Violations, t: Option<pb::Targeting>) -> Targeting {
    let t = t.unwrap_or_default();
    let window = t.window.unwrap_or_default();
    let hour = |v: &mut Violations, h: i32, f: &str| {
        u8::try_from(h)
            .ok()
            .filter(|h| *h <= 24)
            .unwrap_or_else(|| {
                v.add(f, "hours are 0 to 24");
                0
            })
    };
    Targeting {
        start: window.start_time.as_ref().map(millis),
        end: window.end_time.as_ref().map(millis),
        days_of_week: t
            .days_of_week
            .iter()
            .map(|d| u8::try_from(*d).unwrap_or(0))
            .collect(),
        start_hour: hour(v, t.start_hour, "campaign.targeting.start_hour"),
        end_hour: hour(v, t.end_hour, "campaign.targeting.end_hour"),
        store_ids: t.store_ids,
        brands: t.brands,
        channels: t.channels.into_iter().map(channel).collect(),
        segment_ids: t.segment_ids,
        tier_ids: t.tier_ids,
        member_attributes: t.member_attributes.into_iter().collect(),
        members_only: t.members_only,
    }
}

fn targeting_to(t: &Targeting) -> pb::Targeting {
    pb::Targeting {
        window: (t.start.is_some() || t.end.is_some()).then(|| TimeRange {
            start_time: t.start.map(timestamp),
            end_time: t.end.map(timestamp),
        }),
        days_of_week: t.days_of_week.iter().map(|d| i32::from(*d)).collect(),
        start_hour: i32::from(t.start_hour),
        end_hour: i32::from(t.end_hour),
        store_ids: t.store_ids.clone(),
        brands: t.brands.clone(),
        channels: t.channels.iter().map(|c| channel_to_proto(*c)).collect(),
        segment_ids: t.segment_ids.clone(),
        tier_ids: t.tier_ids.clone(),
        member_attributes: t
            .member_attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        members_only: t.members_only,
    }
}

pub fn campaign_from_proto(c: Option<pb::Campaign>) -> Result<Campaign, Error> {
    let c = c.ok_or_else(|| Error::invalid("campaign", "is required"))?;
    let mut v = Violations::new();
    let status = status_from(&mut v, c.status, "campaign.status");
    let code = match c.code.and_then(|x| x.kind) {
        None => None,
        Some(pb::code_requirement::Kind::PromoCode(p)) => Some(CodeRequirement::PromoCode(p)),
        Some(pb::code_requirement::Kind::Coupons(p)) => Some(CodeRequirement::Coupons {
            max_uses: count(&mut v, p.max_uses, "campaign.code.coupons.max_uses"),
            member_bound: p.member_bound,
        }),
    };
    let budget = c.budget.unwrap_or_default();
    let campaign = Campaign {
        tenant_id: c.tenant_id,
        campaign_id: c.campaign_id,
        name: c.name,
        status,
        stacking_group_id: c.stacking_group_id,
        priority: c.priority,
        targeting: targeting_from(&mut v, c.targeting),
        mechanic: mechanic_from(&mut v, c.mechanic),
        code,
        budget: Budget {
            max_discount: optional(&mut v, &budget.max_discount, "campaign.budget.max_discount"),
            max_points: budget.max_points,
            max_uses: budget.max_uses,
        },
        member_limit: count(&mut v, c.member_limit, "campaign.member_limit"),
        member_limit_period_days: count(
            &mut v,
            c.member_limit_period_days,
            "campaign.member_limit_period_days",
        ),
        control_group_percent: u8::try_from(c.control_group_percent).unwrap_or_else(|_| {
            v.add("campaign.control_group_percent", "must be between 0 and 99");
            0
        }),
        version: 0,
        created_at: 0,
        updated_at: 0,
        updated_by: String::new(),
    };
    v.finish()?;
    Ok(campaign)
}

pub fn campaign_to_proto(c: &Campaign) -> pb::Campaign {
    pb::Campaign {
        tenant_id: c.tenant_id.clone(),
        campaign_id: c.campaign_id.clone(),
        name: c.name.clone(),
        status: status_to(c.status),
        stacking_group_id: c.stacking_group_id.clone(),
        priority: c.priority,
        targeting: Some(targeting_to(&c.targeting)),
        mechanic: Some(mechanic_to(&c.mechanic)),
        code: c.code.as_ref().map(|code| pb::CodeRequirement {
            kind: Some(match code {
                CodeRequirement::PromoCode(p) => pb::code_requirement::Kind::PromoCode(p.clone()),
                CodeRequirement::Coupons {
                    max_uses,
                    member_bound,
                } => pb::code_requirement::Kind::Coupons(pb::CouponPolicy {
                    max_uses: i32::try_from(*max_uses).unwrap_or(i32::MAX),
                    member_bound: *member_bound,
                }),
            }),
        }),
        budget: Some(pb::Budget {
            max_discount: c.budget.max_discount.and_then(dec),
            max_points: c.budget.max_points,
            max_uses: c.budget.max_uses,
        }),
        member_limit: i32::try_from(c.member_limit).unwrap_or(i32::MAX),
        member_limit_period_days: i32::try_from(c.member_limit_period_days).unwrap_or(i32::MAX),
        control_group_percent: i32::from(c.control_group_percent),
        version: c.version,
        update_time: Some(timestamp(c.updated_at)),
        updated_by: c.updated_by.clone(),
        create_time: Some(timestamp(c.created_at)),
    }
}

pub fn group_from_proto(g: Option<pb::StackingGroup>) -> Result<StackingGroup, Error> {
    let g = g.ok_or_else(|| Error::invalid("group", "is required"))?;
    let mut v = Violations::new();
    let mode = match pb::StackingMode::try_from(g.mode).unwrap_or(pb::StackingMode::Unspecified) {
        pb::StackingMode::Stackable => StackingMode::Stackable,
        pb::StackingMode::ExclusiveFirst => StackingMode::ExclusiveFirst,
        pb::StackingMode::ExclusiveBest => StackingMode::ExclusiveBest,
        pb::StackingMode::Unspecified => {
            v.add(
                "group.mode",
                "is required: stackable, exclusive_first or exclusive_best",
            );
            StackingMode::Stackable
        }
    };
    let group = StackingGroup {
        tenant_id: g.tenant_id,
        group_id: g.group_id,
        name: g.name,
        mode,
        priority: g.priority,
        max_discount_percent: optional(
            &mut v,
            &g.max_discount_percent,
            "group.max_discount_percent",
        ),
    };
    v.finish()?;
    Ok(group)
}

pub fn group_to_proto(g: &StackingGroup) -> pb::StackingGroup {
    pb::StackingGroup {
        tenant_id: g.tenant_id.clone(),
        group_id: g.group_id.clone(),
        name: g.name.clone(),
        mode: (match g.mode {
            StackingMode::Stackable => pb::StackingMode::Stackable,
            StackingMode::ExclusiveFirst => pb::StackingMode::ExclusiveFirst,
            StackingMode::ExclusiveBest => pb::StackingMode::ExclusiveBest,
        }) as i32,
        priority: g.priority,
        max_discount_percent: g.max_discount_percent.and_then(dec),
    }
}

pub fn coupon_to_proto(c: &Coupon, uses: i64) -> pb::Coupon {
    pb::Coupon {
        tenant_id: c.tenant_id.clone(),
        code: c.code.clone(),
        campaign_id: c.campaign_id.clone(),
        member_id: c.member_id.clone(),
        uses: i32::try_from(uses).unwrap_or(i32::MAX),
        max_uses: i32::try_from(c.max_uses).unwrap_or(i32::MAX),
        expire_time: c.expire_at.map(timestamp),
    }
}

pub fn skip_reason_to(r: SkipReason) -> i32 {
    use pb::SkipReason as P;
    (match r {
        SkipReason::OutsideWindow => P::OutsideWindow,
        SkipReason::WrongDayOrHour => P::WrongDayOrHour,
        SkipReason::WrongStore => P::WrongStore,
        SkipReason::WrongChannel => P::WrongChannel,
        SkipReason::NotInSegment => P::NotInSegment,
        SkipReason::WrongTier => P::WrongTier,
        SkipReason::MemberRequired => P::MemberRequired,
        SkipReason::CodeMissing => P::CodeMissing,
        SkipReason::ThresholdNotReached => P::ThresholdNotReached,
        SkipReason::BudgetExhausted => P::BudgetExhausted,
        SkipReason::MemberLimitReached => P::MemberLimitReached,
        SkipReason::ExcludedByStacking => P::ExcludedByStacking,
        SkipReason::ControlGroup => P::ControlGroup,
        SkipReason::SaleItem => P::SaleItem,
        SkipReason::CapReached => P::CapReached,
        SkipReason::NoMatchingLines => P::NoMatchingLines,
        SkipReason::MemberAttributes => P::MemberAttributes,
    }) as i32
}
