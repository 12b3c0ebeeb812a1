//! Reporting through the real binary: receipts committed and refunded at the POS reach the
//! KPIs (from the event stream), which agree with what the POS was answered; groups, series,
//! category intersection, campaign uplift and RFM answer; exports stream the same facts and
//! resume; bad queries are refused; and a restart rebuilds the same figures from the
//! stored facts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::time::Duration;

use futures_util::TryStreamExt;
use loyalty_e2e::*;
use loyalty_proto::common::v1::TimeRange;
use loyalty_proto::promotion::v1 as ppb;
use loyalty_proto::reporting::v1 as rpb;
use rpb::reporting_service_client::ReportingServiceClient;
use rust_decimal::Decimal;
use tonic::Code;
use tonic::transport::Channel;

const T: &str = "t1";

fn d(v: &Option<loyalty_proto::common::v1::Decimal>) -> Decimal {
    Decimal::from_str(&v.as_ref().unwrap().value).unwrap()
}

/// Two days either side of now, in UTC.
fn period() -> Option<TimeRange> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let day = 86_400_000;
    Some(TimeRange {
        start_time: Some(loyalty_platform::grpc::timestamp(now - 2 * day)),
        end_time: Some(loyalty_platform::grpc::timestamp(now + 2 * day)),
    })
}

fn kpis_request(kpis: &[rpb::Kpi], group: rpb::GroupBy) -> rpb::GetKpisRequest {
    rpb::GetKpisRequest {
        tenant_id: T.into(),
        kpis: kpis.iter().map(|k| *k as i32).collect(),
        period: period(),
        group_by: group as i32,
        time_zone: "UTC".into(),
        ..Default::default()
    }
}

async fn kpis(
    r: &mut ReportingServiceClient<Channel>,
    kpis: &[rpb::Kpi],
    group: rpb::GroupBy,
) -> BTreeMap<(i32, String), Decimal> {
    r.get_kpis(kpis_request(kpis, group))
        .await
        .unwrap()
        .into_inner()
        .values
        .into_iter()
        .map(|v| ((v.kpi, v.group), d(&v.value)))
        .collect()
}

fn one(values: &BTreeMap<(i32, String), Decimal>, k: rpb::Kpi) -> Decimal {
    values[&(k as i32, String::new())]
}

/// Waits until reporting has taken in `receipts` net receipts and `sales` (the stream is
/// asynchronous).
async fn settled(r: &mut ReportingServiceClient<Channel>, receipts: i64, sales: Decimal) {
    for _ in 0..200 {
        let v = kpis(
            r,
            &[rpb::Kpi::Receipts, rpb::Kpi::Sales],
            rpb::GroupBy::Unspecified,
        )
        .await;
        if one(&v, rpb::Kpi::Receipts) == Decimal::from(receipts)
            && one(&v, rpb::Kpi::Sales) == sales
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("reporting did not take the receipts in");
}

async fn export(
    r: &mut ReportingServiceClient<Channel>,
    kind: rpb::FactKind,
    chunk_rows: i32,
    resume: &str,
) -> Vec<rpb::ExportFactsResponse> {
    let mut stream = r
        .export_facts(rpb::ExportFactsRequest {
            tenant_id: T.into(),
            kind: kind as i32,
            period: period(),
            format: rpb::ExportFormat::Csv as i32,
            chunk_rows,
            time_zone: "UTC".into(),
            resume_token: resume.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut chunks = Vec::new();
    while let Some(c) = stream.message().await.unwrap() {
        chunks.push(c);
    }
    chunks
}

fn csv(chunks: &[rpb::ExportFactsResponse]) -> Vec<Vec<String>> {
    chunks
        .iter()
        .flat_map(|c| {
            String::from_utf8(c.data.clone())
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

fn rfc3339(days: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let t = prost_types::Timestamp {
        seconds: now + days * 86_400,
        nanos: 0,
    };
    t.to_string()
}

/// A Flight ticket for the test's period.
fn ticket(kind: &str) -> String {
    format!(
        "{{\"tenant_id\":\"{T}\",\"kind\":\"{kind}\",\"start_time\":\"{}\",\"end_time\":\"{}\",\"time_zone\":\"UTC\"}}",
        rfc3339(-2),
        rfc3339(2)
    )
}

fn receipt_ids(batches: &[arrow_array::RecordBatch]) -> Vec<String> {
    use arrow_array::Array;
    let mut out = Vec::new();
    for b in batches {
        let col = b.column_by_name("receipt_id").unwrap();
        let ids = col
            .as_any()
            .downcast_ref::<arrow_array::StringArray>()
            .unwrap();
        out.extend((0..ids.len()).map(|i| ids.value(i).to_string()));
    }
    out
}

fn decimal_sum(batches: &[arrow_array::RecordBatch], column: &str) -> Decimal {
    use arrow_array::Array;
    let mut sum = Decimal::ZERO;
    for b in batches {
        let col = b.column_by_name(column).unwrap();
        let values = col
            .as_any()
            .downcast_ref::<arrow_array::Decimal128Array>()
            .unwrap();
        for i in 0..values.len() {
            sum += Decimal::from_i128_with_scale(values.value(i), values.scale() as u32);
        }
    }
    sum
}

fn decimal_column_sum(rows: &[Vec<String>], column: &str) -> Decimal {
    let i = rows[0].iter().position(|c| c == column).unwrap();
    rows[1..]
        .iter()
        .map(|r| Decimal::from_str(&r[i]).unwrap())
        .sum()
}

struct Committed {
    receipt: String,
    member: Option<String>,
    paid: Decimal,
    held_out: bool,
    applied: bool,
}

#[tokio::test]
async fn receipts_reach_every_report_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    setup_tenant(&channel, T).await;
    let mut catalog = ppb::catalog_service_client::CatalogServiceClient::new(channel.clone());
    catalog
        .upsert_stores(ppb::UpsertStoresRequest {
            tenant_id: T.into(),
            stores: vec![ppb::Store {
                store_id: "s2".into(),
                name: "Store 2".into(),
                brand: "Other".into(),
                region: "North".into(),
                time_zone: "UTC".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    catalog
        .upsert_products(ppb::UpsertProductsRequest {
            tenant_id: T.into(),
            products: vec![ppb::Product {
                sku: "polish".into(),
                name: "polish".into(),
                category: "Care".into(),
                brand: "Tundra".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    // 10% off with half the members held out as a control group; a promo code adds 11%.
    let mut campaigns = ppb::campaign_service_client::CampaignServiceClient::new(channel.clone());
    campaigns
        .create_campaign(ppb::CreateCampaignRequest {
            campaign: Some(ppb::Campaign {
                tenant_id: T.into(),
                campaign_id: "ten".into(),
                name: "ten".into(),
                status: ppb::CampaignStatus::Active as i32,
                control_group_percent: 50,
                mechanic: Some(ppb::campaign::Mechanic::ThresholdDiscount(
                    ppb::ThresholdDiscount {
                        scope: None,
                        steps: vec![ppb::DiscountStep {
                            from_value: dec("0"),
                            benefit: Some(ppb::discount_step::Benefit::Percent(
                                loyalty_proto::common::v1::Decimal { value: "10".into() },
                            )),
                        }],
                    },
                )),
                ..Default::default()
            }),
            actor: None,
        })
        .await
        .unwrap();
    campaigns
        .create_campaign(ppb::CreateCampaignRequest {
            campaign: Some(ppb::Campaign {
                tenant_id: T.into(),
                campaign_id: "promo".into(),
                name: "promo".into(),
                status: ppb::CampaignStatus::Active as i32,
                code: Some(ppb::CodeRequirement {
                    kind: Some(ppb::code_requirement::Kind::PromoCode("11.11".into())),
                }),
                mechanic: Some(ppb::campaign::Mechanic::ExtraDiscount(ppb::ExtraDiscount {
                    scope: None,
                    percent: dec("11"),
                })),
                ..Default::default()
            }),
            actor: None,
        })
        .await
        .unwrap();

    let mut pos = Pos::new(&channel, &channel);
    let mut cards = Vec::new();
    for i in 0..8 {
        cards.push(pos.member_with_card(T, &format!("+7701555000{i}")).await);
    }
    // Each member buys boots at s1; the even ones buy polish too, at s2, with the code for
    // the first two; two anonymous receipts.
    let mut committed = Vec::new();
    let mut n = 0;
    let mut commit = |store: &str,
                      card: Option<&str>,
                      member: Option<&str>,
                      lines: Vec<ppb::ReceiptLine>,
                      codes: &[&str]| {
        n += 1;
        let mut r = receipt(T, &format!("r{n}"), card, lines);
        r.store_id = store.into();
        r.codes = codes.iter().map(|c| c.to_string()).collect();
        (r, member.map(str::to_string))
    };
    let mut receipts = Vec::new();
    for (i, (member, card)) in cards.iter().enumerate() {
        receipts.push(commit(
            "s1",
            Some(card),
            Some(member),
            vec![line("1", "boots", "2", "5000.00", false)],
            &[],
        ));
        if i % 2 == 0 {
            let codes: &[&str] = if i < 4 { &["11.11"] } else { &[] };
            receipts.push(commit(
                "s2",
                Some(card),
                Some(member),
                vec![line("1", "polish", "1", "500.00", false)],
                codes,
            ));
        }
    }
    receipts.push(commit(
        "s1",
        None,
        None,
        vec![line("1", "socks", "1", "2000.00", false)],
        &[],
    ));
    receipts.push(commit(
        "s2",
        None,
        None,
        vec![line("1", "socks", "3", "1000.00", false)],
        &["11.11"],
    ));
    for (r, member) in receipts {
        let id = r.receipt_id.clone();
        let e = pos.commit(r).await.unwrap().evaluation.unwrap();
        let held_out = e
            .skipped_campaigns
            .iter()
            .any(|s| s.campaign_id == "ten" && s.reason == ppb::SkipReason::ControlGroup as i32);
        let applied = e.effects.iter().any(|x| x.campaign_id == "ten");
        assert!(
            held_out != applied || member.is_none(),
            "a member is either held out or given the discount"
        );
        committed.push(Committed {
            receipt: id,
            member,
            paid: d(&e.amount_due),
            held_out,
            applied,
        });
    }
    // s2 moves to another brand: its receipts, and their refunds, stay with the old one.
    catalog
        .upsert_stores(ppb::UpsertStoresRequest {
            tenant_id: T.into(),
            stores: vec![ppb::Store {
                store_id: "s2".into(),
                name: "Store 2".into(),
                brand: "Renamed".into(),
                region: "North".into(),
                time_zone: "UTC".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    // A full refund of r2 (polish of the first member) and one of the two boots of r1.
    pos.refund(T, "r2", "f1", &[("1", "1")]).await.unwrap();
    let partial = pos.refund(T, "r1", "f1", &[("1", "1")]).await.unwrap();
    let partial_money = d(&partial.refunded_amount);
    let r2 = committed.iter().find(|c| c.receipt == "r2").unwrap().paid;
    let refunded = r2 + partial_money;

    let mut reports = ReportingServiceClient::new(channel.clone());
    let total_receipts = committed.len() as i64 - 1;
    let all_paid: Decimal = committed.iter().map(|c| c.paid).sum();
    settled(&mut reports, total_receipts, all_paid - refunded).await;

    // Receipt KPIs agree with what the POS was answered.
    let paid = |f: &dyn Fn(&Committed) -> bool| -> Decimal {
        committed.iter().filter(|c| f(c)).map(|c| c.paid).sum()
    };
    let card_sales = paid(&|c| c.member.is_some()) - refunded;
    let anon_sales = paid(&|c| c.member.is_none());
    let card_receipts =
        Decimal::from(committed.iter().filter(|c| c.member.is_some()).count() as i64 - 1);
    let all = [
        rpb::Kpi::Sales,
        rpb::Kpi::Receipts,
        rpb::Kpi::SalesWithCard,
        rpb::Kpi::SalesWithoutCard,
        rpb::Kpi::ReceiptsWithCard,
        rpb::Kpi::ReceiptsWithoutCard,
        rpb::Kpi::PenetrationAmount,
        rpb::Kpi::PenetrationReceipts,
        rpb::Kpi::AverageCheckWithCard,
        rpb::Kpi::AverageCheckWithoutCard,
        rpb::Kpi::CodeUsage,
        rpb::Kpi::ActiveMembers,
        rpb::Kpi::RepeatPurchaseRate,
        rpb::Kpi::NewMembers,
        rpb::Kpi::NoQuestionnaireShare,
        rpb::Kpi::PointsAccrued,
        rpb::Kpi::RedemptionRate,
    ];
    let v = kpis(&mut reports, &all, rpb::GroupBy::Unspecified).await;
    assert_eq!(one(&v, rpb::Kpi::SalesWithCard), card_sales);
    assert_eq!(one(&v, rpb::Kpi::SalesWithoutCard), anon_sales);
    assert_eq!(one(&v, rpb::Kpi::Sales), card_sales + anon_sales);
    assert_eq!(one(&v, rpb::Kpi::Receipts), Decimal::from(total_receipts));
    assert_eq!(one(&v, rpb::Kpi::ReceiptsWithCard), card_receipts);
    assert_eq!(one(&v, rpb::Kpi::ReceiptsWithoutCard), Decimal::TWO);
    assert_eq!(
        one(&v, rpb::Kpi::PenetrationAmount),
        (card_sales / (card_sales + anon_sales))
            .round_dp(6)
            .normalize()
    );
    assert_eq!(
        one(&v, rpb::Kpi::AverageCheckWithCard),
        (card_sales / card_receipts).round_dp(6).normalize()
    );
    assert_eq!(
        one(&v, rpb::Kpi::AverageCheckWithoutCard),
        (anon_sales / Decimal::TWO).normalize()
    );
    assert_eq!(
        one(&v, rpb::Kpi::CodeUsage),
        Decimal::TWO,
        "two member receipts and one anonymous presented 11.11; one was refunded in full"
    );
    assert_eq!(one(&v, rpb::Kpi::ActiveMembers), Decimal::from(8));
    assert_eq!(
        one(&v, rpb::Kpi::RepeatPurchaseRate),
        Decimal::new(5, 1),
        "4 of 8 bought twice"
    );
    assert_eq!(one(&v, rpb::Kpi::NewMembers), Decimal::from(8));
    assert_eq!(one(&v, rpb::Kpi::NoQuestionnaireShare), Decimal::ONE);
    assert!(one(&v, rpb::Kpi::PointsAccrued) > Decimal::ZERO);

    // The ledger's KPIs: liability is every member's points (active, pending and held), as
    // balance answers them; every entry is exported.
    let mut liability = Decimal::ZERO;
    let mut entries = 0;
    for (member, _) in &cards {
        let b = pos.balance(T, member).await;
        liability += Decimal::from(b.active + b.pending + b.held);
        entries += b.ledger_sequence;
    }
    let mut ledger = BTreeMap::new();
    for _ in 0..200 {
        ledger = kpis(
            &mut reports,
            &[
                rpb::Kpi::PointsLiability,
                rpb::Kpi::PointsExpired,
                rpb::Kpi::BreakageRate,
            ],
            rpb::GroupBy::Unspecified,
        )
        .await;
        if one(&ledger, rpb::Kpi::PointsLiability) == liability {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(liability > Decimal::ZERO);
    assert_eq!(one(&ledger, rpb::Kpi::PointsLiability), liability);
    assert_eq!(one(&ledger, rpb::Kpi::PointsExpired), Decimal::ZERO);

    // Filtered by a segment of two members: their receipts, money and points alone.
    let picked: Vec<String> = cards[..2].iter().map(|(m, _)| m.clone()).collect();
    let mut segments =
        loyalty_proto::segmentation::v1::segmentation_service_client::SegmentationServiceClient::new(
            channel.clone(),
        );
    segments
        .create_segment(loyalty_proto::segmentation::v1::CreateSegmentRequest {
            segment: Some(loyalty_proto::segmentation::v1::Segment {
                tenant_id: T.into(),
                segment_id: "picked".into(),
                name: "Picked".into(),
                kind: loyalty_proto::segmentation::v1::SegmentKind::Static as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    segments
        .upload_segment_members(tokio_stream::iter(vec![
            loyalty_proto::segmentation::v1::UploadSegmentMembersRequest {
                tenant_id: T.into(),
                segment_id: "picked".into(),
                member_ids: picked.clone(),
            },
        ]))
        .await
        .unwrap();
    let in_segment = |c: &Committed| c.member.as_ref().is_some_and(|m| picked.contains(m));
    // The first member's r2 was refunded in full and one boot of r1 was returned.
    let segment_sales = paid(&in_segment) - refunded;
    let mut segment_liability = Decimal::ZERO;
    for member in &picked {
        let b = pos.balance(T, member).await;
        segment_liability += Decimal::from(b.active + b.pending + b.held);
    }
    let mut request = kpis_request(
        &[
            rpb::Kpi::Sales,
            rpb::Kpi::Receipts,
            rpb::Kpi::SalesWithoutCard,
            rpb::Kpi::PenetrationReceipts,
            rpb::Kpi::ActiveMembers,
            rpb::Kpi::NewMembers,
            rpb::Kpi::PointsLiability,
        ],
        rpb::GroupBy::Unspecified,
    );
    request.filter = Some(rpb::Filter {
        segment_id: "picked".into(),
        ..Default::default()
    });
    let seg: BTreeMap<(i32, String), Decimal> = reports
        .get_kpis(request.clone())
        .await
        .unwrap()
        .into_inner()
        .values
        .into_iter()
        .map(|v| ((v.kpi, v.group), d(&v.value)))
        .collect();
    assert_eq!(one(&seg, rpb::Kpi::Sales), segment_sales);
    assert_eq!(
        one(&seg, rpb::Kpi::Receipts),
        Decimal::TWO,
        "r1 and the second member's"
    );
    assert_eq!(one(&seg, rpb::Kpi::SalesWithoutCard), Decimal::ZERO);
    assert_eq!(one(&seg, rpb::Kpi::PenetrationReceipts), Decimal::ONE);
    assert_eq!(one(&seg, rpb::Kpi::ActiveMembers), Decimal::TWO);
    assert_eq!(one(&seg, rpb::Kpi::NewMembers), Decimal::TWO);
    assert_eq!(one(&seg, rpb::Kpi::PointsLiability), segment_liability);
    assert!(segment_liability > Decimal::ZERO && segment_liability < liability);
    // A segment that does not exist.
    request.filter = Some(rpb::Filter {
        segment_id: "nobody".into(),
        ..Default::default()
    });
    let err = reports.get_kpis(request.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // A request that cannot be answered is refused before the segment is read.
    request.kpis.clear();
    let err = reports.get_kpis(request.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    request.kpis = vec![rpb::Kpi::PointsLiability as i32];
    request.group_by = rpb::GroupBy::Store as i32;
    let err = reports.get_kpis(request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let ledger_rows = csv(&export(&mut reports, rpb::FactKind::LedgerEntries, 0, "").await);
    assert_eq!(ledger_rows[0][0], "member_id");
    assert_eq!((ledger_rows.len() - 1) as i64, entries);
    let mut by_store = kpis_request(&[rpb::Kpi::PointsLiability], rpb::GroupBy::Store);
    by_store.time_zone = "UTC".into();
    let err = reports.get_kpis(by_store).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "the ledger is chain-wide"
    );

    // By store and by brand; a day series; by campaign and code.
    let by_store = kpis(&mut reports, &[rpb::Kpi::Receipts], rpb::GroupBy::Store).await;
    assert_eq!(
        by_store.values().copied().sum::<Decimal>(),
        Decimal::from(total_receipts)
    );
    assert_eq!(
        by_store[&(rpb::Kpi::Receipts as i32, "s1".into())],
        Decimal::from(9)
    );
    let by_brand = kpis(&mut reports, &[rpb::Kpi::Sales], rpb::GroupBy::Brand).await;
    assert_eq!(
        by_brand.keys().map(|(_, g)| g.as_str()).collect::<Vec<_>>(),
        vec!["Other", "ShoeHub"]
    );
    // s2 had 5 receipts as "Other"; the full refund of r2 there took one back.
    let by_brand_receipts = kpis(&mut reports, &[rpb::Kpi::Receipts], rpb::GroupBy::Brand).await;
    assert_eq!(
        by_brand_receipts[&(rpb::Kpi::Receipts as i32, "Other".into())],
        Decimal::from(4)
    );
    // Every member bought at s1 (ShoeHub), the even ones at s2 (Other) too: half of the
    // buyers shop across brands, all of Other's buyers do.
    let cross = rpb::Kpi::CrossBrandShare;
    let across = kpis(&mut reports, &[cross], rpb::GroupBy::Unspecified).await;
    assert_eq!(one(&across, cross), Decimal::new(5, 1));
    let across = kpis(&mut reports, &[cross], rpb::GroupBy::Brand).await;
    assert_eq!(across[&(cross as i32, "Other".into())], Decimal::ONE);
    assert_eq!(
        across[&(cross as i32, "ShoeHub".into())],
        Decimal::new(5, 1)
    );
    let by_code = kpis(&mut reports, &[rpb::Kpi::Receipts], rpb::GroupBy::Code).await;
    assert_eq!(
        by_code[&(rpb::Kpi::Receipts as i32, "11.11".into())],
        Decimal::TWO
    );
    let series = reports
        .get_time_series(rpb::GetTimeSeriesRequest {
            tenant_id: T.into(),
            kpi: rpb::Kpi::Sales as i32,
            period: period(),
            granularity: rpb::Granularity::Day as i32,
            time_zone: "UTC".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .points;
    assert_eq!(
        series.iter().map(|p| d(&p.value)).sum::<Decimal>(),
        card_sales + anon_sales
    );
    assert!(
        series.iter().all(|p| p.group.len() == 10),
        "days as YYYY-MM-DD"
    );

    // Every member bought boots (Shoes); the even ones polish (Care).
    let x = reports
        .get_category_intersection(rpb::GetCategoryIntersectionRequest {
            tenant_id: T.into(),
            category_a: "Shoes".into(),
            category_b: "Care".into(),
            period: period(),
            time_zone: "UTC".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((x.members_a, x.members_a_and_b), (8, 4));
    assert_eq!(d(&x.share), Decimal::new(5, 1));

    // Uplift: the members the campaign applied to against those it held out.
    let u = reports
        .get_campaign_uplift(rpb::GetCampaignUpliftRequest {
            tenant_id: T.into(),
            campaign_id: "ten".into(),
            period: period(),
            time_zone: "UTC".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let members = |f: &dyn Fn(&Committed) -> bool| -> BTreeSet<String> {
        committed
            .iter()
            .filter(|c| f(c))
            .filter_map(|c| c.member.clone())
            .collect()
    };
    assert_eq!(u.target_members as usize, members(&|c| c.applied).len());
    assert_eq!(u.control_members as usize, members(&|c| c.held_out).len());
    assert_eq!(u.target_members + u.control_members, 8);

    // RFM over the members who bought: every one of them is scored.
    let rfm = reports
        .get_rfm_overview(rpb::GetRfmOverviewRequest {
            tenant_id: T.into(),
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner()
        .rows;
    assert_eq!(rfm.iter().map(|r| r.member_count).sum::<i64>(), 8);
    assert_eq!(rfm.iter().map(|r| d(&r.spend)).sum::<Decimal>(), card_sales);

    // Exports: purchases, lines and refunds agree with the POS, and resume where they stopped.
    let purchases = export(&mut reports, rpb::FactKind::Purchases, 0, "").await;
    let rows = csv(&purchases);
    assert_eq!(rows[0][0], "receipt_id");
    assert_eq!(rows.len() - 1, committed.len());
    let exported: BTreeSet<&str> = rows[1..].iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        exported,
        committed.iter().map(|c| c.receipt.as_str()).collect()
    );
    let paid_col = rows[0].iter().position(|c| c == "paid").unwrap();
    assert_eq!(
        rows[1..]
            .iter()
            .map(|r| Decimal::from_str(&r[paid_col]).unwrap())
            .sum::<Decimal>(),
        paid(&|_| true)
    );
    let member_col = rows[0].iter().position(|c| c == "member_id").unwrap();
    assert!(
        rows[1..].iter().all(|r| !r[member_col].starts_with('+')),
        "no phones"
    );
    let paged = export(&mut reports, rpb::FactKind::Purchases, 4, "").await;
    assert!(paged.len() >= 4);
    let resumed = export(
        &mut reports,
        rpb::FactKind::Purchases,
        4,
        &paged[1].resume_token,
    )
    .await;
    let mut stitched = csv(&paged[..2]);
    stitched.extend(csv(&resumed));
    assert_eq!(
        stitched, rows,
        "a resumed export continues exactly after its chunk"
    );
    assert_eq!(paged.last().unwrap().resume_token, "");
    // A token continues only its own export.
    let mut elsewhere = kpis_request(&[rpb::Kpi::Sales], rpb::GroupBy::Unspecified).period;
    elsewhere.as_mut().unwrap().end_time = Some(loyalty_platform::grpc::timestamp(
        loyalty_platform::grpc::millis(elsewhere.as_ref().unwrap().end_time.as_ref().unwrap())
            + 86_400_000,
    ));
    let err = reports
        .export_facts(rpb::ExportFactsRequest {
            tenant_id: T.into(),
            kind: rpb::FactKind::Purchases as i32,
            period: elsewhere,
            chunk_rows: 4,
            time_zone: "UTC".into(),
            resume_token: paged[1].resume_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err)[0].0, "resume_token");
    let lines = csv(&export(&mut reports, rpb::FactKind::PurchaseLines, 0, "").await);
    assert_eq!(lines.len() - 1, committed.len(), "one line per receipt");
    let refunds = csv(&export(&mut reports, rpb::FactKind::Refunds, 0, "").await);
    assert_eq!(refunds.len() - 1, 2);
    let features = csv(&export(&mut reports, rpb::FactKind::MemberFeatures, 0, "").await);
    assert_eq!(features.len() - 1, 8);
    assert!(
        features[0]
            .iter()
            .all(|c| !c.contains("phone") && !c.contains("name"))
    );

    // The same facts as Arrow: IPC chunks, a Flight stream and a Parquet file.
    let ipc: Vec<u8> = {
        let mut stream = reports
            .export_facts(rpb::ExportFactsRequest {
                tenant_id: T.into(),
                kind: rpb::FactKind::Purchases as i32,
                period: period(),
                format: rpb::ExportFormat::ArrowIpc as i32,
                chunk_rows: 4,
                time_zone: "UTC".into(),
                resume_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(c) = stream.message().await.unwrap() {
            bytes.extend(c.data);
        }
        bytes
    };
    let reader = arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None).unwrap();
    let batches: Vec<arrow_array::RecordBatch> = reader.map(Result::unwrap).collect();
    let csv_receipts: Vec<String> = rows[1..].iter().map(|r| r[0].clone()).collect();
    assert_eq!(
        receipt_ids(&batches),
        csv_receipts,
        "Arrow IPC holds the CSV's receipts in order"
    );

    let mut flight = arrow_flight::FlightClient::new(channel.clone());
    let lines_csv = csv(&export(&mut reports, rpb::FactKind::PurchaseLines, 0, "").await);
    let flown: Vec<arrow_array::RecordBatch> = flight
        .do_get(arrow_flight::Ticket::new(ticket("purchase_lines")))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        receipt_ids(&flown),
        lines_csv[1..]
            .iter()
            .map(|r| r[0].clone())
            .collect::<Vec<_>>(),
        "Flight carries the CSV's lines"
    );
    assert_eq!(
        decimal_sum(&flown, "paid"),
        decimal_column_sum(&lines_csv, "paid")
    );
    // And with pyarrow, a real Flight client, when the test command could install it.
    match std::env::var("LOYALTY_TEST_PYARROW") {
        Ok(python) => {
            let script = "import sys, pyarrow.flight as fl\n\
                t = fl.connect(sys.argv[1]).do_get(fl.Ticket(sys.argv[2].encode())).read_all()\n\
                print(' '.join(t.column('receipt_id').to_pylist()))\n\
                print(sum(t.column('paid').to_pylist()))\n";
            let url = server.url().replace("http://", "grpc://");
            let out = std::process::Command::new(python)
                .args(["-c", script, &url, &ticket("purchase_lines")])
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let mut said = said.lines();
            let ids: Vec<String> = said
                .next()
                .unwrap()
                .split(' ')
                .map(str::to_string)
                .collect();
            assert_eq!(
                ids,
                receipt_ids(&flown),
                "pyarrow reads the lines the Rust client reads"
            );
            let paid = Decimal::from_str(said.next().unwrap().trim()).unwrap();
            assert_eq!(paid, decimal_column_sum(&lines_csv, "paid"));
        }
        Err(_) => eprintln!(
            "pyarrow is not installed (LOYALTY_TEST_PYARROW unset): the Flight export was read with the Rust client only"
        ),
    }
    let err = flight
        .do_get(arrow_flight::Ticket::new("{\"tenant_id\":\"t1\"}"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ticket"), "{err}");

    let out = dir.path().join("exports");
    let status = std::process::Command::new(loyalty_bin())
        .args([
            "export",
            "--addr",
            &server.url(),
            "--tenant",
            T,
            "--kind",
            "purchases",
        ])
        .args([
            "--from",
            &rfc3339(-2),
            "--to",
            &rfc3339(2),
            "--time-zone",
            "UTC",
        ])
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let file = std::fs::File::open(out.join("t1-purchases.parquet")).unwrap();
    let parquet: Vec<arrow_array::RecordBatch> =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
            .map(Result::unwrap)
            .collect();
    assert_eq!(
        receipt_ids(&parquet),
        csv_receipts,
        "the Parquet file holds the CSV's receipts"
    );
    assert_eq!(
        decimal_sum(&parquet, "paid"),
        decimal_column_sum(&rows, "paid")
    );

    // Bad input: clear errors.
    let mut bad = kpis_request(&[rpb::Kpi::Sales], rpb::GroupBy::Unspecified);
    let p = bad.period.as_mut().unwrap();
    std::mem::swap(&mut p.start_time, &mut p.end_time);
    let err = reports.get_kpis(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err)[0].0, "period");
    let mut unknown = kpis_request(&[rpb::Kpi::Sales], rpb::GroupBy::Unspecified);
    unknown.store_ids = vec!["s9".into()];
    let err = reports.get_kpis(unknown).await.unwrap_err();
    assert_eq!(violations(&err)[0].0, "filter.store_ids[0]");
    let mut long = kpis_request(&[rpb::Kpi::Sales], rpb::GroupBy::Unspecified);
    long.period.as_mut().unwrap().start_time = Some(loyalty_platform::grpc::timestamp(0));
    let err = reports.get_kpis(long).await.unwrap_err();
    assert_eq!(violations(&err)[0].0, "period");

    // A restart rebuilds the same figures from the stored facts.
    drop(reports);
    assert_eq!(server.stop().await, 0);
    let server = Server::start(Launch::dev(), dir.path()).await;
    let mut reports = ReportingServiceClient::new(server.channel().await);
    assert_eq!(kpis(&mut reports, &all, rpb::GroupBy::Unspecified).await, v);
    let ledger_kpis = [
        rpb::Kpi::PointsLiability,
        rpb::Kpi::PointsExpired,
        rpb::Kpi::BreakageRate,
    ];
    let ledger_before = kpis(&mut reports, &ledger_kpis, rpb::GroupBy::Day).await;
    let exported_before = csv(&export(&mut reports, rpb::FactKind::PurchaseLines, 0, "").await);
    drop(reports);
    assert_eq!(server.stop().await, 0);

    // Reporting's facts lost: the admin command rebuilds them from the purchase history, the
    // ledger and the members, and every figure comes back.
    std::fs::remove_file(dir.path().join("reporting.redb")).unwrap();
    let out = std::process::Command::new(loyalty_bin())
        .args(["rebuild-reporting", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains(&format!("{} purchases, 2 refunds", committed.len())),
        "{said}"
    );
    let server = Server::start(Launch::dev(), dir.path()).await;
    let mut reports = ReportingServiceClient::new(server.channel().await);
    assert_eq!(kpis(&mut reports, &all, rpb::GroupBy::Unspecified).await, v);
    assert_eq!(
        kpis(&mut reports, &ledger_kpis, rpb::GroupBy::Day).await,
        ledger_before
    );
    let mut rebuilt = csv(&export(&mut reports, rpb::FactKind::PurchaseLines, 0, "").await);
    let mut before = exported_before;
    rebuilt.sort();
    before.sort();
    assert_eq!(
        rebuilt, before,
        "the same lines, whatever order they were stored in"
    );
    server.stop().await;
}

/// Runs `loyalty <what> --data-dir DIR` with only `env`; its success and what it said.
/// A coupon is a code of its own, used once: receipts with one count as receipts with a
/// code and under the coupon's campaign, but a coupon is no group of its own (a table per
/// coupon would grow with every one redeemed). Promo codes group by code.
#[tokio::test]
async fn coupons_count_as_codes_and_group_under_their_campaign() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Launch::dev(), dir.path()).await;
    let channel = server.channel().await;
    setup_tenant(&channel, T).await;
    let mut campaigns = ppb::campaign_service_client::CampaignServiceClient::new(channel.clone());
    for (id, code) in [
        (
            "spring",
            ppb::code_requirement::Kind::PromoCode("SPRING".into()),
        ),
        (
            "welcome",
            ppb::code_requirement::Kind::Coupons(ppb::CouponPolicy {
                max_uses: 1,
                member_bound: false,
            }),
        ),
    ] {
        campaigns
            .create_campaign(ppb::CreateCampaignRequest {
                campaign: Some(ppb::Campaign {
                    tenant_id: T.into(),
                    campaign_id: id.into(),
                    name: id.into(),
                    status: ppb::CampaignStatus::Active as i32,
                    code: Some(ppb::CodeRequirement { kind: Some(code) }),
                    mechanic: Some(ppb::campaign::Mechanic::ExtraDiscount(ppb::ExtraDiscount {
                        scope: None,
                        percent: dec("5"),
                    })),
                    ..Default::default()
                }),
                actor: None,
            })
            .await
            .unwrap();
    }
    let coupons = campaigns
        .generate_coupons(ppb::GenerateCouponsRequest {
            tenant_id: T.into(),
            campaign_id: "welcome".into(),
            count: 2,
            idempotency_key: "welcome-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .codes;
    let mut pos = Pos::new(&channel, &channel);
    let (_, card) = pos.member_with_card(T, "+77015550100").await;
    let codes: [&[&str]; 4] = [
        &[&coupons[0]],
        &[&coupons[1].to_lowercase(), "SPRING"],
        &["spring"],
        &[],
    ];
    let mut sales = Decimal::ZERO;
    for (i, codes) in codes.iter().enumerate() {
        let mut r = receipt(
            T,
            &format!("c{i}"),
            Some(&card),
            vec![line("1", "boots", "1", "1000.00", false)],
        );
        r.codes = codes.iter().map(|c| c.to_string()).collect();
        let e = pos.commit(r).await.unwrap().evaluation.unwrap();
        sales += Decimal::from_str(&e.amount_due.unwrap().value).unwrap();
    }
    let mut reports = ReportingServiceClient::new(channel.clone());
    settled(&mut reports, 4, sales).await;
    let all = kpis(
        &mut reports,
        &[rpb::Kpi::CodeUsage],
        rpb::GroupBy::Unspecified,
    )
    .await;
    assert_eq!(one(&all, rpb::Kpi::CodeUsage), Decimal::from(3));
    let by_code = kpis(&mut reports, &[rpb::Kpi::Receipts], rpb::GroupBy::Code).await;
    let groups: BTreeMap<&str, Decimal> =
        by_code.iter().map(|((_, g), v)| (g.as_str(), *v)).collect();
    assert_eq!(
        groups,
        BTreeMap::from([("SPRING", Decimal::TWO)]),
        "the promo code however it was typed; no coupon"
    );
    let by_campaign = kpis(&mut reports, &[rpb::Kpi::Receipts], rpb::GroupBy::Campaign).await;
    assert_eq!(
        by_campaign[&(rpb::Kpi::Receipts as i32, "welcome".into())],
        Decimal::TWO
    );
    assert_eq!(
        by_campaign[&(rpb::Kpi::Receipts as i32, "spring".into())],
        Decimal::TWO
    );
}

async fn rebuild(what: &str, dir: &std::path::Path, env: &[(String, String)]) -> (bool, String) {
    let args = [
        what.to_string(),
        "--data-dir".into(),
        dir.display().to_string(),
    ];
    let out = command(&args, env).output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Microservices on Redis: reporting loses its volume, and `rebuild-reporting` takes its
/// facts back from the running identity, balance and promotion over gRPC.
#[tokio::test]
async fn microservices_reporting_is_rebuilt_from_the_running_services() {
    let redis = loyalty_platform::redis_server::RedisServer::start().unwrap();
    let (producers_dir, reporting_dir) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let producers = Server::start(
        Launch::serve("identity,balance,promotion").on_redis(&redis.url()),
        producers_dir.path(),
    )
    .await;
    let reporting = Server::start(
        Launch::serve("reporting").on_redis(&redis.url()),
        reporting_dir.path(),
    )
    .await;
    let channel = producers.channel().await;
    setup_tenant(&channel, T).await;
    let mut pos = Pos::new(&channel, &channel);
    let mut paid = Decimal::ZERO;
    for i in 0..3 {
        let (_, card) = pos.member_with_card(T, &format!("+7701555010{i}")).await;
        let r = receipt(
            T,
            &format!("m{i}"),
            Some(&card),
            vec![line("1", "boots", "2", "5000.00", false)],
        );
        paid += d(&pos.commit(r).await.unwrap().evaluation.unwrap().amount_due);
    }
    let anonymous = receipt(
        T,
        "anon",
        None,
        vec![line("1", "socks", "1", "2000.00", false)],
    );
    paid += d(&pos
        .commit(anonymous)
        .await
        .unwrap()
        .evaluation
        .unwrap()
        .amount_due);

    let all = [
        rpb::Kpi::Sales,
        rpb::Kpi::Receipts,
        rpb::Kpi::SalesWithCard,
        rpb::Kpi::PenetrationReceipts,
        rpb::Kpi::AverageCheckWithCard,
        rpb::Kpi::ActiveMembers,
        rpb::Kpi::NewMembers,
        rpb::Kpi::PointsAccrued,
        rpb::Kpi::PointsLiability,
    ];
    let mut reports = ReportingServiceClient::new(reporting.channel().await);
    settled(&mut reports, 4, paid).await;
    // The ledger and member streams are consumed apart from the purchases: wait for them.
    let mut before = kpis(&mut reports, &all, rpb::GroupBy::Unspecified).await;
    for _ in 0..200 {
        if one(&before, rpb::Kpi::PointsLiability) > Decimal::ZERO
            && one(&before, rpb::Kpi::NewMembers) == Decimal::from(3)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        before = kpis(&mut reports, &all, rpb::GroupBy::Unspecified).await;
    }
    assert_eq!(one(&before, rpb::Kpi::NewMembers), Decimal::from(3));

    let peers = vec![
        ("LOYALTY_STORAGE__BACKEND".to_string(), "redis".to_string()),
        ("LOYALTY_STORAGE__REDIS__URL".into(), redis.url()),
        ("LOYALTY_PEERS__IDENTITY".into(), producers.url()),
        ("LOYALTY_PEERS__BALANCE".into(), producers.url()),
        ("LOYALTY_PEERS__PROMOTION".into(), producers.url()),
    ];
    // Refused while reporting runs on the directory, and without the peers to read from.
    let (ok, said) = rebuild("rebuild-reporting", reporting_dir.path(), &peers).await;
    assert!(!ok && said.contains("stop it first"), "{said}");
    let (ok, said) = rebuild("rebuild-reporting", reporting_dir.path(), &peers[..2]).await;
    assert!(!ok && said.contains("peers.promotion"), "{said}");
    // Where its facts are not a locked file (ScyllaDB), a reporting that answers at
    // `peers.reporting` stops the rebuild too.
    let elsewhere = tempfile::tempdir().unwrap();
    let mut with_reporting = peers.clone();
    with_reporting.push(("LOYALTY_PEERS__REPORTING".into(), reporting.url()));
    let (ok, said) = rebuild("rebuild-reporting", elsewhere.path(), &with_reporting).await;
    assert!(!ok && said.contains("reporting is running"), "{said}");
    drop(reports);
    assert_eq!(reporting.stop().await, 0);

    // Its volume lost: a new directory, and the consumer group has acknowledged every event,
    // so whatever the new pod knows comes from the rebuild.
    let fresh = tempfile::tempdir().unwrap();
    let (ok, said) = rebuild("rebuild-reporting", fresh.path(), &with_reporting).await;
    assert!(ok, "{said}");
    assert!(
        said.contains("4 purchases, 0 refunds, 3 ledger entries, 3 members"),
        "{said}"
    );
    let reporting = Server::start(
        Launch::serve("reporting").on_redis(&redis.url()),
        fresh.path(),
    )
    .await;
    let mut reports = ReportingServiceClient::new(reporting.channel().await);
    assert_eq!(
        kpis(&mut reports, &all, rpb::GroupBy::Unspecified).await,
        before
    );

    // An audited change (authentication is off on loopback: every caller is an admin)
    // reaches the new pod's audit log.
    ppb::catalog_service_client::CatalogServiceClient::new(channel.clone())
        .upsert_stores(ppb::UpsertStoresRequest {
            tenant_id: T.into(),
            stores: vec![ppb::Store {
                store_id: "s9".into(),
                name: "Store 9".into(),
                time_zone: "UTC".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    let audit_log = |channel: Channel| async move {
        rpb::audit_service_client::AuditServiceClient::new(channel)
            .list_audit_records(rpb::ListAuditRecordsRequest {
                tenant_id: T.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .records
    };
    let mut audited = Vec::new();
    for _ in 0..200 {
        audited = audit_log(reporting.channel().await).await;
        if audited.iter().any(|r| !r.in_flight) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(audited.len(), 1, "{audited:?}");

    // A second rebuild over the kept facts counts nothing twice, and keeps the audit log.
    drop(reports);
    assert_eq!(reporting.stop().await, 0);
    let (ok, said) = rebuild("rebuild-reporting", fresh.path(), &peers).await;
    assert!(ok, "{said}");
    let reporting = Server::start(
        Launch::serve("reporting").on_redis(&redis.url()),
        fresh.path(),
    )
    .await;
    let mut reports = ReportingServiceClient::new(reporting.channel().await);
    assert_eq!(
        kpis(&mut reports, &all, rpb::GroupBy::Unspecified).await,
        before
    );
    assert_eq!(audit_log(reporting.channel().await).await, audited);
    reporting.stop().await;
    producers.stop().await;
}
