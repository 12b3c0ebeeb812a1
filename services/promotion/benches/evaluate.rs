//! Rule evaluation: a 20-line receipt against 100 active campaigns of every discount and
//! accrual mechanic, in stacking groups, some targeted elsewhere. One core, no I/O. Two
//! catalogues: a typical one (campaigns spread over 40 categories, the receipt's lines in 20
//! of them) and a dense one (8 categories, so every line is covered by about a dozen
//! campaigns). Run with `cargo bench -p loyalty-promotion --bench evaluate`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;

/// The allocator the binary runs with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{Criterion, criterion_group, criterion_main};
use loyalty_platform::types::Channel;
use loyalty_promotion::book::CampaignBook;
use loyalty_promotion::calendar::LocalTime;
use loyalty_promotion::campaign::{
    Benefit, Budget, Campaign, CampaignStatus, CodeRequirement, Mechanic, ProductScope,
    StackingGroup, StackingMode, Step, Targeting,
};
use loyalty_promotion::evaluate::{
    Codes, LineInfo, MemberContext, MemberProfile, Situation, evaluate,
};
use loyalty_promotion::program::Program;
use loyalty_promotion::receipt::{Identification, Line, Receipt};
use loyalty_promotion::usage::Counters;
use rust_decimal::Decimal;

fn category(i: usize, categories: usize) -> String {
    format!("category-{}", i % categories)
}

fn campaign(i: usize, categories: usize) -> Campaign {
    let scope = |i: usize| ProductScope {
        categories: vec![category(i, categories)],
        ..ProductScope::default()
    };
    let mechanic = match i % 5 {
        0 => Mechanic::ThresholdDiscount {
            scope: scope(i),
            steps: vec![
                Step {
                    from: Decimal::from(1_000),
                    benefit: Benefit::Percent(Decimal::from(5)),
                },
                Step {
                    from: Decimal::from(5_000),
                    benefit: Benefit::Percent(Decimal::from(10)),
                },
            ],
        },
        1 => Mechanic::QuantityDiscount {
            scope: scope(i),
            steps: vec![Step {
                from: Decimal::TWO,
                benefit: Benefit::Amount(Decimal::from(100)),
            }],
        },
        2 => Mechanic::NForM {
            scope: scope(i),
            n: 3,
            m: 2,
        },
        3 => Mechanic::AccrualBoost {
            scope: scope(i),
            percent: Some(Decimal::from(3 + (i % 7) as i64)),
            multiplier: None,
        },
        _ => Mechanic::ExtraDiscount {
            scope: scope(i),
            percent: Decimal::from(2),
        },
    };
    let mut targeting = Targeting::default();
    // A third is for other stores, a few for a segment the member is in.
    if i.is_multiple_of(3) {
        targeting.store_ids = vec![format!("other-{i}")];
    }
    if i % 10 == 1 {
        targeting.segment_ids = vec!["vip".into()];
    }
    Campaign {
        tenant_id: "t".into(),
        campaign_id: format!("c{i:03}"),
        name: format!("Campaign {i}"),
        status: CampaignStatus::Active,
        stacking_group_id: ["", "exclusive", "best", "stack"][i % 4].to_string(),
        priority: (i % 13) as i32,
        targeting,
        mechanic,
        code: (i % 25 == 4).then(|| CodeRequirement::PromoCode(format!("CODE{i}"))),
        budget: Budget {
            max_uses: if i.is_multiple_of(7) { 1_000_000 } else { 0 },
            ..Budget::default()
        },
        member_limit: 0,
        member_limit_period_days: 0,
        control_group_percent: if i.is_multiple_of(11) { 10 } else { 0 },
        version: 1,
        created_at: 0,
        updated_at: 0,
        updated_by: String::new(),
    }
}

fn group(id: &str, mode: StackingMode, priority: i32) -> StackingGroup {
    StackingGroup {
        tenant_id: "t".into(),
        group_id: id.into(),
        name: id.into(),
        mode,
        priority,
        max_discount_percent: Some(Decimal::from(30)),
    }
}

fn bench(c: &mut Criterion) {
    for (name, categories) in [("typical", 40), ("dense", 8)] {
        let (program, book, receipt, infos) = setup(categories);
        run(c, name, &program, &book, &receipt, &infos);
    }
}

fn setup(categories: usize) -> (Program, CampaignBook, Receipt, Vec<LineInfo>) {
    let mut program = Program::case_study("t", "KZT");
    program.max_receipt_discount_percent = Decimal::from(50);
    let groups = [
        group("exclusive", StackingMode::ExclusiveFirst, 1),
        group("best", StackingMode::ExclusiveBest, 2),
        group("stack", StackingMode::Stackable, 3),
    ];
    let book = CampaignBook::compile(
        1,
        (0..100).map(|i| campaign(i, categories)).collect(),
        &groups,
    );
    let lines: Vec<Line> = (0..20)
        .map(|i| Line {
            line_id: i.to_string(),
            sku: format!("sku-{i}"),
            quantity: Decimal::from(1 + i % 3),
            unit_price: Decimal::new(49_900 + i64::from(i) * 1_000, 2),
            sale_price: i % 9 == 8,
        })
        .collect();
    let infos: Vec<LineInfo> = (0..20)
        .map(|i| LineInfo {
            category: category(i, categories),
            brand: "Tundra".into(),
        })
        .collect();
    let receipt = Receipt {
        tenant_id: "t".into(),
        receipt_id: "r".into(),
        store_id: "s1".into(),
        channel: Channel::Store,
        terminal_id: String::new(),
        cashier_id: String::new(),
        identification: Identification::Card("1".into()),
        lines,
        codes: Vec::new(),
        points_to_redeem: 50_000,
        purchase_time: None,
    };
    (program, book, receipt, infos)
}

fn run(
    c: &mut Criterion,
    name: &str,
    program: &Program,
    book: &CampaignBook,
    receipt: &Receipt,
    infos: &[LineInfo],
) {
    let member = MemberContext {
        member_id: "m1".into(),
        points_available: 1_000_000,
        tier_id: String::new(),
    };
    let profile = MemberProfile {
        segments: vec!["vip".into()],
        ..MemberProfile::default()
    };
    let codes = Codes {
        promo: vec!["CODE4".into()],
        coupons: Vec::new(),
    };
    let counters = Counters::default();
    let now = 1_795_000_000_000;
    let situation = Situation {
        store_brand: "Main",
        local: LocalTime::at(now, "Asia/Almaty"),
        time_zone: "Asia/Almaty",
        lines: infos,
        member: Some(&member),
        profile: Some(&profile),
        codes: &codes,
        counters: &counters,
        now,
    };
    let e = evaluate(program, book, receipt, &situation);
    assert!(!e.effects.is_empty() && !e.skipped.is_empty());
    c.bench_function(&format!("evaluate 20 lines x 100 campaigns, {name}"), |b| {
        b.iter(|| evaluate(black_box(program), book, black_box(receipt), &situation))
    });
    if name == "typical" {
        c.bench_function("evaluate 20 lines, no campaigns", |b| {
            let empty = CampaignBook::default();
            b.iter(|| evaluate(black_box(program), &empty, black_box(receipt), &situation))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
