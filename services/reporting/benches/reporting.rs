//! Reporting's three figures of merit. Run with `cargo bench -p loyalty-reporting --bench reporting`.
//!
//! - `ingest`: purchase events stored (one durable write per batch of 500, as the consumer
//!   does) and rolled up, through `Reporting::ingest` on an embedded store.
//! - `kpi_year_500_stores`: KPI queries over a year of a 500-store chain in two brands and ten
//!   regions: 365 days × 500 stores × 8 receipts a day (every cell of the rollups filled:
//!   identified or not, with or without a code, two channels), 60% identified among 300,000
//!   members. The rollups are built once, outside the measurement.
//! - `export_lines`: purchase lines paged out of the store and written as CSV, as
//!   `ExportFacts` does, 10,000 purchases of 10 lines.
//! - `segment_filter`: six receipt KPIs over a year for the members of a segment, which
//!   reads their facts from the store and rolls them up first: 240,000 stored purchases, 60%
//!   identified among 20,000 members (about 7 each).

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

/// The allocator the binary runs with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use loyalty_platform::clock::{DAY_MS, SystemClock};
use loyalty_platform::types::Channel;
use loyalty_reporting::Reporting;
use loyalty_reporting::fact::{Fact, Line, Outlet, Purchase, TenantFact};
use loyalty_reporting::kpi::{self, Group, Kpi, Scope};
use loyalty_reporting::rollup::Rollups;
use loyalty_reporting::store::Receipts;
use loyalty_reporting::store::embedded::EmbeddedReportingStore;
use rust_decimal::Decimal;

const BASE: i64 = 20_000;

fn purchase(n: u64, store: u64, day: i64, lines: usize) -> Purchase {
    let identified = n % 5 < 3;
    Purchase {
        cashier_id: String::new(),
        receipt_id: format!("r{n}"),
        outlet: Outlet {
            store_id: format!("s{store}"),
            brand: format!("b{}", store % 2),
            region: format!("r{}", store % 10),
        },
        time_zone: "Asia/Almaty".into(),
        channel: if n % 8 < 7 {
            Channel::Store
        } else {
            Channel::Online
        },
        member_id: identified.then(|| format!("m{}", (n * 7_919) % 300_000)),
        time: day * DAY_MS,
        day,
        lines: (0..lines)
            .map(|i| Line {
                sku: format!("sku-{}", (n + i as u64) % 5000),
                category: format!("c{}", (n + i as u64) % 40),
                brand: format!("brand-{}", i % 7),
                quantity: Decimal::ONE,
                paid: Decimal::new(123_450 + i as i64, 2),
                sale_price: i % 9 == 0,
            })
            .collect(),
        gross: Decimal::new(1_500_000, 2),
        discount: Decimal::new(50_000, 2),
        paid: Decimal::new(1_450_000, 2),
        points_accrued: if identified { 14_500 } else { 0 },
        points_redeemed: if n.is_multiple_of(11) { 2_000 } else { 0 },
        codes: if n.is_multiple_of(4) {
            vec!["11.11".into()]
        } else {
            vec![]
        },
        campaign_ids: vec![format!("k{}", n % 20)],
        held_out_campaign_ids: vec![],
        coupon_codes: Vec::new(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn ingest(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let reporting = rt.block_on(async {
        let store = Arc::new(EmbeddedReportingStore::open(&dir.path().join("r.redb")).unwrap());
        Reporting::open(store, Arc::new(SystemClock)).await.unwrap()
    });
    let mut next = 0u64;
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(500));
    g.bench_function("batch_of_500_purchases", |b| {
        b.iter(|| {
            let batch: Vec<TenantFact> = (0..500)
                .map(|_| {
                    next += 1;
                    TenantFact {
                        tenant_id: "t".into(),
                        fact: Fact::Purchase(purchase(
                            next,
                            next % 500,
                            BASE + (next / 4000) as i64 % 365,
                            5,
                        )),
                    }
                })
                .collect();
            rt.block_on(reporting.ingest(batch)).unwrap()
        })
    });
    g.finish();
}

fn year_of_500_stores() -> Rollups {
    let mut r = Rollups::default();
    let mut n = 0u64;
    for day in BASE..BASE + 365 {
        for store in 0..500 {
            for _ in 0..8 {
                n += 1;
                r.apply(&Fact::Purchase(purchase(n, store, day, 2)));
            }
        }
    }
    r
}

fn kpis(c: &mut Criterion) {
    let r = year_of_500_stores();
    let year = Scope {
        from: BASE,
        to: BASE + 364,
        ..Scope::default()
    };
    let day_of = |at: i64| at.div_euclid(DAY_MS);
    let receipts = [
        Kpi::PenetrationAmount,
        Kpi::PenetrationReceipts,
        Kpi::AverageCheckWithCard,
        Kpi::AverageCheckWithoutCard,
        Kpi::RedemptionRate,
        Kpi::CodeUsage,
    ];
    let mut g = c.benchmark_group("kpi_year_500_stores");
    g.sample_size(20);
    g.bench_function("six_receipt_kpis", |b| {
        b.iter(|| black_box(kpi::compute(&r, &receipts, &year, Group::None, &day_of).unwrap()))
    });
    g.bench_function("six_receipt_kpis_by_store", |b| {
        b.iter(|| black_box(kpi::compute(&r, &receipts, &year, Group::Store, &day_of).unwrap()))
    });
    let one_brand = Scope {
        brands: ["b1".to_string()].into(),
        ..year.clone()
    };
    g.bench_function("six_receipt_kpis_one_brand_by_month", |b| {
        b.iter(|| {
            black_box(kpi::compute(&r, &receipts, &one_brand, Group::Month, &day_of).unwrap())
        })
    });
    g.bench_function("active_members_and_repeat_rate", |b| {
        b.iter(|| {
            black_box(
                kpi::compute(
                    &r,
                    &[Kpi::ActiveMembers, Kpi::RepeatPurchaseRate],
                    &year,
                    Group::None,
                    &day_of,
                )
                .unwrap(),
            )
        })
    });
    g.bench_function("active_members_and_repeat_rate_by_store", |b| {
        b.iter(|| {
            black_box(
                kpi::compute(
                    &r,
                    &[Kpi::ActiveMembers, Kpi::RepeatPurchaseRate],
                    &year,
                    Group::Store,
                    &day_of,
                )
                .unwrap(),
            )
        })
    });
    g.finish();
}

/// Reporting on a fresh embedded store in `dir`, holding purchases `0..count` made by
/// `make`, ingested in batches of `batch`.
fn stored(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    count: u64,
    batch: usize,
    make: impl Fn(u64) -> Purchase,
) -> Reporting {
    rt.block_on(async {
        let store = Arc::new(EmbeddedReportingStore::open(&dir.join("r.redb")).unwrap());
        let reporting = Reporting::open(store, Arc::new(SystemClock)).await.unwrap();
        for chunk in (0..count).collect::<Vec<_>>().chunks(batch) {
            let facts = chunk
                .iter()
                .map(|&n| TenantFact {
                    tenant_id: "t".into(),
                    fact: Fact::Purchase(make(n)),
                })
                .collect();
            reporting.ingest(facts).await.unwrap();
        }
        reporting
    })
}

fn export_lines(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let reporting = stored(&rt, dir.path(), 10_000, 500, |n| {
        purchase(n, n % 500, BASE + (n % 30) as i64, 10)
    });
    let scope = Scope {
        from: BASE,
        to: BASE + 29,
        ..Scope::default()
    };
    let mut g = c.benchmark_group("export_lines");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(100_000));
    g.bench_function("csv_100k_lines", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut after = None;
                let mut rows = 0;
                loop {
                    let (facts, next) = reporting
                        .export_page(
                            "t",
                            Receipts::Purchases,
                            &scope,
                            (scope.from, scope.to),
                            u64::MAX,
                            after,
                            10_000,
                            loyalty_reporting::exporter::PAGE_BYTES,
                        )
                        .await
                        .unwrap();
                    let mut out = String::with_capacity(1 << 20);
                    for (_, f) in &facts {
                        rows += loyalty_reporting::export::fact(&mut out, f, true);
                    }
                    black_box(out);
                    match next {
                        Some(n) => after = Some(n),
                        None => break,
                    }
                }
                assert_eq!(rows, 100_000);
            })
        })
    });
    g.finish();
}

/// A segment of the first `n` members of the `segment_filter` population.
#[derive(Debug)]
struct FirstMembers(usize);

#[async_trait::async_trait]
impl loyalty_reporting::ports::SegmentMembers for FirstMembers {
    async fn members(
        &self,
        _: &str,
        _: &str,
        _: usize,
    ) -> loyalty_platform::error::Result<Vec<String>> {
        Ok((0..self.0).map(|i| format!("m{i}")).collect())
    }
}

fn segment_filter(c: &mut Criterion) {
    use loyalty_reporting::service::{Filter, Period, Request};
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let reporting = stored(&rt, dir.path(), 240_000, 2_000, |n| {
        let mut p = purchase(n, n % 500, BASE + (n % 365) as i64, 2);
        p.member_id = p.member_id.map(|_| format!("m{}", n % 20_000));
        p
    });
    let request = Request {
        tenant_id: "t".into(),
        period: Period {
            start: Some(BASE * DAY_MS),
            end: Some((BASE + 365) * DAY_MS),
        },
        filter: Filter {
            segment: "picked".into(),
            ..Filter::default()
        },
        time_zone: "UTC".into(),
    };
    let six = [
        Kpi::Sales,
        Kpi::Receipts,
        Kpi::AverageCheck,
        Kpi::PointsAccrued,
        Kpi::PointsRedeemed,
        Kpi::CodeUsage,
    ];
    let mut g = c.benchmark_group("segment_filter");
    g.sample_size(10);
    for members in [1_000, 10_000] {
        let r = reporting
            .clone()
            .with_segments(Arc::new(FirstMembers(members)));
        g.bench_function(format!("six_kpis_year_{members}_members"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let view = r.view(&request, false).await.unwrap();
                    black_box(r.kpis(&view, &request, &six, Group::None).unwrap())
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, ingest, kpis, export_lines, segment_filter);
criterion_main!(benches);
