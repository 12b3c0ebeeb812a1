//! The gRPC adapter of `loyalty.reporting.v1.ReportingService`.

use std::pin::Pin;

use loyalty_platform::error::Error;
use loyalty_platform::grpc::{channel, millis, timestamp, to_status};
use loyalty_proto::common::v1::Decimal as PbDecimal;
use loyalty_proto::reporting::v1 as pb;
use pb::reporting_service_server::ReportingService;
use rust_decimal::Decimal;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::export;
use crate::exporter::{self, Kind, Page};
use crate::fraud::Thresholds;
use crate::kpi::{Group, Kpi};
use crate::service::{
    DEFAULT_CHUNK_ROWS, Filter, MAX_CHUNK_ROWS, MAX_FILTER, Period, Reporting, Request as Query,
    View,
};

#[derive(Debug, Clone)]
pub struct Api {
    reporting: Reporting,
}

impl Api {
    pub fn new(reporting: Reporting) -> Self {
        Self { reporting }
    }

    /// Runs a query on the blocking pool: a year of a large chain takes milliseconds of CPU
    /// that the async workers (and the event consumer on them) should not wait for.
    async fn blocking<T, F>(&self, f: F) -> Result<T, Status>
    where
        F: FnOnce(&Reporting) -> loyalty_platform::error::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let reporting = self.reporting.clone();
        tokio::task::spawn_blocking(move || f(&reporting))
            .await
            .map_err(|e| to_status(Error::internal(e)))?
            .map_err(to_status)
    }
}

impl Api {
    /// Runs a query over the rollups it reads (a segment filter's are built first, with
    /// the members' ledger entries when `ledger`).
    async fn over<T, F>(&self, q: Query, ledger: bool, f: F) -> Result<T, Status>
    where
        F: FnOnce(&Reporting, &View, &Query) -> loyalty_platform::error::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let view = self.reporting.view(&q, ledger).await.map_err(to_status)?;
        self.blocking(move |rep| f(rep, &view, &q)).await
    }
}

fn dec(d: Decimal) -> Option<PbDecimal> {
    Some(PbDecimal {
        value: d.normalize().to_string(),
    })
}

fn kpi(value: i32, field: &str) -> Result<Kpi, Status> {
    use pb::Kpi as P;
    let k = match P::try_from(value).unwrap_or(P::Unspecified) {
        P::Unspecified => {
            return Err(to_status(Error::invalid(
                field,
                format!("unknown KPI {value}"),
            )));
        }
        P::PenetrationAmount => Kpi::PenetrationAmount,
        P::PenetrationReceipts => Kpi::PenetrationReceipts,
        P::AverageCheckWithCard => Kpi::AverageCheckWithCard,
        P::AverageCheckWithoutCard => Kpi::AverageCheckWithoutCard,
        P::SalesWithCard => Kpi::SalesWithCard,
        P::SalesWithoutCard => Kpi::SalesWithoutCard,
        P::ReceiptsWithCard => Kpi::ReceiptsWithCard,
        P::ReceiptsWithoutCard => Kpi::ReceiptsWithoutCard,
        P::RedemptionRate => Kpi::RedemptionRate,
        P::BreakageRate => Kpi::BreakageRate,
        P::RepeatPurchaseRate => Kpi::RepeatPurchaseRate,
        P::ContactableShare => Kpi::ContactableShare,
        P::NoQuestionnaireShare => Kpi::NoQuestionnaireShare,
        P::NewMembers => Kpi::NewMembers,
        P::ActiveMembers => Kpi::ActiveMembers,
        P::CrossBrandShare => Kpi::CrossBrandShare,
        P::PointsAccrued => Kpi::PointsAccrued,
        P::PointsRedeemed => Kpi::PointsRedeemed,
        P::PointsExpired => Kpi::PointsExpired,
        P::PointsLiability => Kpi::PointsLiability,
        P::CodeUsage => Kpi::CodeUsage,
        P::AverageCheckWithCode => Kpi::AverageCheckWithCode,
        P::AverageCheckWithoutCode => Kpi::AverageCheckWithoutCode,
        P::Sales => Kpi::Sales,
        P::Receipts => Kpi::Receipts,
        P::AverageCheck => Kpi::AverageCheck,
        P::Discounts => Kpi::Discounts,
    };
    Ok(k)
}

fn kpi_to_proto(k: Kpi) -> i32 {
    use pb::Kpi as P;
    let p = match k {
        Kpi::PenetrationAmount => P::PenetrationAmount,
        Kpi::PenetrationReceipts => P::PenetrationReceipts,
        Kpi::AverageCheckWithCard => P::AverageCheckWithCard,
        Kpi::AverageCheckWithoutCard => P::AverageCheckWithoutCard,
        Kpi::SalesWithCard => P::SalesWithCard,
        Kpi::SalesWithoutCard => P::SalesWithoutCard,
        Kpi::ReceiptsWithCard => P::ReceiptsWithCard,
        Kpi::ReceiptsWithoutCard => P::ReceiptsWithoutCard,
        Kpi::RedemptionRate => P::RedemptionRate,
        Kpi::BreakageRate => P::BreakageRate,
        Kpi::RepeatPurchaseRate => P::RepeatPurchaseRate,
        Kpi::ContactableShare => P::ContactableShare,
        Kpi::NoQuestionnaireShare => P::NoQuestionnaireShare,
        Kpi::NewMembers => P::NewMembers,
        Kpi::ActiveMembers => P::ActiveMembers,
        Kpi::CrossBrandShare => P::CrossBrandShare,
        Kpi::PointsAccrued => P::PointsAccrued,
        Kpi::PointsRedeemed => P::PointsRedeemed,
        Kpi::PointsExpired => P::PointsExpired,
        Kpi::PointsLiability => P::PointsLiability,
        Kpi::CodeUsage => P::CodeUsage,
        Kpi::AverageCheckWithCode => P::AverageCheckWithCode,
        Kpi::AverageCheckWithoutCode => P::AverageCheckWithoutCode,
        Kpi::Sales => P::Sales,
        Kpi::Receipts => P::Receipts,
        Kpi::AverageCheck => P::AverageCheck,
        Kpi::Discounts => P::Discounts,
    };
    p as i32
}

fn group(value: i32) -> Group {
    use pb::GroupBy as G;
    match G::try_from(value).unwrap_or(G::Unspecified) {
        G::Unspecified => Group::None,
        G::Day => Group::Day,
        G::Store => Group::Store,
        G::Brand => Group::Brand,
        G::Campaign => Group::Campaign,
        G::Region => Group::Region,
        G::Channel => Group::Channel,
        G::Code => Group::Code,
    }
}

fn granularity(value: i32) -> Group {
    use pb::Granularity as G;
    match G::try_from(value).unwrap_or(G::Unspecified) {
        G::Unspecified | G::Day => Group::Day,
        G::Week => Group::Week,
        G::Month => Group::Month,
    }
}

pub(crate) fn query(
    tenant_id: String,
    period: Option<loyalty_proto::common::v1::TimeRange>,
    stores: Vec<String>,
    filter: Option<pb::Filter>,
    time_zone: String,
) -> Query {
    let f = filter.unwrap_or_default();
    let mut store_ids = stores;
    store_ids.extend(f.store_ids);
    Query {
        tenant_id,
        period: Period {
            start: period
                .as_ref()
                .and_then(|p| p.start_time.as_ref())
                .map(millis),
            end: period
                .as_ref()
                .and_then(|p| p.end_time.as_ref())
                .map(millis),
        },
        filter: Filter {
            stores: store_ids,
            brands: f.brands,
            regions: f.regions,
            channels: f
                .channels
                .into_iter()
                .take(MAX_FILTER)
                .map(channel)
                .collect(),
            segment: f.segment_id,
        },
        time_zone,
    }
}

fn values(values: Vec<crate::kpi::Value>) -> Vec<pb::KpiValue> {
    values
        .into_iter()
        .map(|v| pb::KpiValue {
            kpi: kpi_to_proto(v.kpi),
            group: v.group,
            value: dec(v.value),
            numerator: dec(v.numerator),
            denominator: dec(v.denominator),
        })
        .collect()
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportFactsResponse, Status>> + Send>>;

fn kind(value: i32) -> Result<Kind, Status> {
    match pb::FactKind::try_from(value).unwrap_or(pb::FactKind::Unspecified) {
        pb::FactKind::Unspecified => Err(to_status(Error::invalid("kind", "is required"))),
        pb::FactKind::LedgerEntries => Ok(Kind::Ledger),
        pb::FactKind::Purchases => Ok(Kind::Purchases),
        pb::FactKind::PurchaseLines => Ok(Kind::Lines),
        pb::FactKind::Refunds => Ok(Kind::Refunds),
        pb::FactKind::MemberFeatures => Ok(Kind::Members),
    }
}

/// The export's pages as the response's chunks, in the asked format. A resumed export
/// continues the first one's bytes: no second header row, no second schema message.
async fn respond(
    kind: Kind,
    arrow: bool,
    resumed: bool,
    binding: u64,
    mut pages: tokio::sync::mpsc::Receiver<loyalty_platform::error::Result<Page>>,
    tx: tokio::sync::mpsc::Sender<Result<pb::ExportFactsResponse, Status>>,
) {
    let mut ipc: Option<arrow_ipc::writer::StreamWriter<Vec<u8>>> = None;
    let mut first = !resumed;
    while let Some(page) = pages.recv().await {
        let chunk = page.and_then(|page| {
            let rows = page.rows.count(kind);
            let data = if arrow {
                let batch = crate::arrow::batch(kind, &page.rows)?;
                let writer = match &mut ipc {
                    Some(w) => w,
                    None => {
                        let mut w =
                            arrow_ipc::writer::StreamWriter::try_new(Vec::new(), &batch.schema())
                                .map_err(Error::internal)?;
                        if resumed {
                            w.get_mut().clear();
                        }
                        ipc.insert(w)
                    }
                };
                writer.write(&batch).map_err(Error::internal)?;
                if page.resume.is_none() {
                    writer.finish().map_err(Error::internal)?;
                }
                std::mem::take(writer.get_mut())
            } else {
                let mut out = String::new();
                export::chunk(&mut out, kind, &page.rows, first);
                out.into_bytes()
            };
            first = false;
            Ok(pb::ExportFactsResponse {
                data,
                row_count: rows as i64,
                resume_token: page
                    .resume
                    .map(|r| r.token(kind, binding))
                    .unwrap_or_default(),
            })
        });
        if tx.send(chunk.map_err(to_status)).await.is_err() {
            return;
        }
    }
}

#[tonic::async_trait]
impl ReportingService for Api {
    async fn get_kpis(
        &self,
        request: Request<pb::GetKpisRequest>,
    ) -> Result<Response<pb::GetKpisResponse>, Status> {
        let r = request.into_inner();
        let kpis = r
            .kpis
            .iter()
            .enumerate()
            .map(|(i, k)| kpi(*k, &format!("kpis[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let q = query(r.tenant_id, r.period, r.store_ids, r.filter, r.time_zone);
        let ledger = kpis.iter().any(|k| k.reads_ledger());
        let by = group(r.group_by);
        self.reporting
            .check_kpis(&q, &kpis, by)
            .map_err(to_status)?;
        let v = self
            .over(q, ledger, move |rep, view, q| rep.kpis(view, q, &kpis, by))
            .await?;
        Ok(Response::new(pb::GetKpisResponse { values: values(v) }))
    }

    async fn get_time_series(
        &self,
        request: Request<pb::GetTimeSeriesRequest>,
    ) -> Result<Response<pb::GetTimeSeriesResponse>, Status> {
        let r = request.into_inner();
        let k = kpi(r.kpi, "kpi")?;
        let q = query(r.tenant_id, r.period, r.store_ids, r.filter, r.time_zone);
        let by = granularity(r.granularity);
        self.reporting.check_kpis(&q, &[k], by).map_err(to_status)?;
        let v = self
            .over(q, k.reads_ledger(), move |rep, view, q| {
                rep.kpis(view, q, &[k], by)
            })
            .await?;
        Ok(Response::new(pb::GetTimeSeriesResponse {
            points: values(v),
        }))
    }

    async fn get_category_intersection(
        &self,
        request: Request<pb::GetCategoryIntersectionRequest>,
    ) -> Result<Response<pb::GetCategoryIntersectionResponse>, Status> {
        let r = request.into_inner();
        let q = query(r.tenant_id, r.period, Vec::new(), r.filter, r.time_zone);
        let (a, both) = self
            .over(q, false, move |rep, view, q| {
                rep.category_intersection(view, q, &r.category_a, &r.category_b)
            })
            .await?;
        let share = if a == 0 {
            Decimal::ZERO
        } else {
            (Decimal::from(both) / Decimal::from(a)).round_dp(6)
        };
        Ok(Response::new(pb::GetCategoryIntersectionResponse {
            members_a: a as i64,
            members_a_and_b: both as i64,
            share: dec(share),
        }))
    }

    async fn get_rfm_overview(
        &self,
        request: Request<pb::GetRfmOverviewRequest>,
    ) -> Result<Response<pb::GetRfmOverviewResponse>, Status> {
        let r = request.into_inner();
        let rows = self
            .blocking(move |rep| rep.rfm_overview(&r.tenant_id, r.as_of.as_ref().map(millis)))
            .await?;
        Ok(Response::new(pb::GetRfmOverviewResponse {
            rows: rows
                .into_iter()
                .map(|(segment, n, spend)| pb::RfmOverviewRow {
                    segment: segment.to_string(),
                    member_count: n as i64,
                    spend: dec(spend),
                })
                .collect(),
        }))
    }

    async fn get_fraud_signals(
        &self,
        request: Request<pb::GetFraudSignalsRequest>,
    ) -> Result<Response<pb::GetFraudSignalsResponse>, Status> {
        let r = request.into_inner();
        let t = Thresholds::or_defaults(
            r.min_stores,
            r.store_window_minutes,
            r.min_cashier_receipts,
            r.top_members,
            r.min_top_share_percent,
            r.early_redemption_hours,
            r.limit,
        )
        .map_err(to_status)?;
        let q = query(r.tenant_id, r.period, Vec::new(), None, r.time_zone);
        let s = self
            .reporting
            .fraud_signals(&q, t)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetFraudSignalsResponse {
            store_hopping: s
                .store_hopping
                .into_iter()
                .map(|h| pb::StoreHopping {
                    member_id: h.member_id,
                    store_ids: h.store_ids,
                    first_time: Some(timestamp(h.first)),
                    last_time: Some(timestamp(h.last)),
                    receipts: i32::try_from(h.receipts).unwrap_or(i32::MAX),
                })
                .collect(),
            cashier_concentration: s
                .cashier_concentration
                .into_iter()
                .map(|c| pb::CashierConcentration {
                    store_id: c.store_id,
                    cashier_id: c.cashier_id,
                    identified_receipts: i64::try_from(c.identified_receipts).unwrap_or(i64::MAX),
                    distinct_members: i64::try_from(c.distinct_members).unwrap_or(i64::MAX),
                    top_member_ids: c.top_member_ids,
                    top_receipts: i64::try_from(c.top_receipts).unwrap_or(i64::MAX),
                })
                .collect(),
            early_redemptions: s
                .early_redemptions
                .into_iter()
                .map(|e| pb::EarlyRedemption {
                    member_id: e.member_id,
                    registered_at: Some(timestamp(e.registered_at)),
                    redeemed_at: Some(timestamp(e.redeemed_at)),
                    receipt_id: e.receipt_id,
                    store_id: e.store_id,
                    points_redeemed: e.points_redeemed,
                })
                .collect(),
            receipts_scanned: i64::try_from(s.receipts_scanned).unwrap_or(i64::MAX),
        }))
    }

    async fn get_campaign_uplift(
        &self,
        request: Request<pb::GetCampaignUpliftRequest>,
    ) -> Result<Response<pb::GetCampaignUpliftResponse>, Status> {
        let r = request.into_inner();
        let q = query(r.tenant_id, r.period, Vec::new(), r.filter, r.time_zone);
        let u = self
            .over(q, false, move |rep, view, q| {
                rep.uplift(view, q, &r.campaign_id)
            })
            .await?;
        Ok(Response::new(pb::GetCampaignUpliftResponse {
            target_members: u.target_members as i64,
            control_members: u.control_members as i64,
            target_average_spend: dec(u.target_average),
            control_average_spend: dec(u.control_average),
            uplift_percent: u.uplift_percent.and_then(dec),
        }))
    }

    async fn export_facts(
        &self,
        request: Request<pb::ExportFactsRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        let r = request.into_inner();
        let kind = kind(r.kind)?;
        let arrow =
            match pb::ExportFormat::try_from(r.format).unwrap_or(pb::ExportFormat::Unspecified) {
                pb::ExportFormat::Unspecified | pb::ExportFormat::Csv => false,
                pb::ExportFormat::ArrowIpc => true,
            };
        let rows = match r.chunk_rows {
            0 => DEFAULT_CHUNK_ROWS,
            n if n < 0 || n as usize > MAX_CHUNK_ROWS => {
                return Err(to_status(Error::invalid(
                    "chunk_rows",
                    format!("between 1 and {MAX_CHUNK_ROWS}"),
                )));
            }
            n => n as usize,
        };
        let q = query(r.tenant_id, r.period, Vec::new(), None, r.time_zone);
        let format = if arrow { "arrow" } else { "csv" };
        let job = self
            .reporting
            .export_job(&q, kind, format, &r.resume_token, rows)
            .await
            .map_err(to_status)?;
        let resumed = job.resume.is_some();
        let binding = job.binding;
        let (pages_tx, pages) = tokio::sync::mpsc::channel(2);
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(exporter::run(self.reporting.clone(), job, pages_tx));
        tokio::spawn(respond(kind, arrow, resumed, binding, pages, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
