//! The gRPC adapter of `loyalty.reporting.v1.ReportingService`.

use std::pin::Pin;

use loyalty_platform::error::Error;
use loyalty_platform::grpc::{channel, millis, to_status};
use loyalty_proto::common::v1::Decimal as PbDecimal;
use loyalty_proto::reporting::v1 as pb;
use pb::reporting_service_server::ReportingService;
use rust_decimal::Decimal;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::export;
use crate::kpi::{Group, Kpi, Scope};
use crate::service::{
    DEFAULT_CHUNK_ROWS, Filter, MAX_CHUNK_ROWS, MAX_FILTER, Period, Reporting, Request as Query,
};
use crate::store::{Position, Receipts};

#[derive(Debug, Clone)]
pub struct Api {
    reporting: Reporting,
}

impl Api {
    pub fn new(reporting: Reporting) -> Self {
        Self { reporting }
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

fn query(
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

/// Where an export continues: `<kind>.<snapshot>.<day>.<seq>` for receipt facts,
/// `members.<member id>` for member features.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resume {
    Receipts(u64, Position),
    Members(String),
}

fn kind_name(kind: pb::FactKind) -> &'static str {
    kind.as_str_name()
}

fn parse_token(token: &str, kind: pb::FactKind) -> Result<Option<Resume>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || {
        to_status(Error::invalid(
            "resume_token",
            "is not a token this export handed out",
        ))
    };
    let (name, rest) = token.split_once('.').ok_or_else(bad)?;
    if name != kind_name(kind) {
        return Err(to_status(Error::invalid(
            "resume_token",
            "belongs to an export of another kind",
        )));
    }
    if kind == pb::FactKind::MemberFeatures {
        return Ok(Some(Resume::Members(rest.to_string())));
    }
    let parts: Vec<&str> = rest.split('.').collect();
    match parts.as_slice() {
        [snapshot, day, seq] => Ok(Some(Resume::Receipts(
            snapshot.parse().map_err(|_| bad())?,
            (
                day.parse().map_err(|_| bad())?,
                seq.parse().map_err(|_| bad())?,
            ),
        ))),
        _ => Err(bad()),
    }
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportFactsResponse, Status>> + Send>>;

/// One export as asked.
#[derive(Debug)]
struct Export {
    tenant_id: String,
    kind: pb::FactKind,
    scope: Scope,
    snapshot: u64,
    resume: Option<Resume>,
    chunk_rows: usize,
}

/// Streams the export chunk by chunk; at most two chunks wait for a slow reader.
async fn export(
    reporting: Reporting,
    job: Export,
    tx: tokio::sync::mpsc::Sender<Result<pb::ExportFactsResponse, Status>>,
) {
    let Export {
        tenant_id,
        kind,
        scope,
        snapshot,
        resume,
        chunk_rows,
    } = job;
    let send = |data: String, rows: usize, token: String| {
        let tx = tx.clone();
        async move {
            tx.send(Ok(pb::ExportFactsResponse {
                data: data.into_bytes(),
                row_count: rows as i64,
                resume_token: token,
            }))
            .await
            .is_ok()
        }
    };
    let first = resume.is_none();
    if kind == pb::FactKind::MemberFeatures {
        let mut after = match resume {
            Some(Resume::Members(m)) => Some(m),
            _ => None,
        };
        let mut header = first;
        loop {
            let rows = match reporting.member_features(&tenant_id, after.as_deref(), chunk_rows) {
                Ok(rows) => rows,
                Err(e) => {
                    let _ = tx.send(Err(to_status(e))).await;
                    return;
                }
            };
            let mut out = String::new();
            if std::mem::take(&mut header) {
                export::header(&mut out, export::MEMBER_COLUMNS);
            }
            for m in &rows {
                export::member(&mut out, m);
            }
            let more = rows.len() >= chunk_rows;
            after = rows.last().map(|m| m.member_id.clone());
            let token = match (&after, more) {
                (Some(a), true) => format!("{}.{a}", kind_name(kind)),
                _ => String::new(),
            };
            if !send(out, rows.len(), token).await || !more {
                return;
            }
        }
    }
    let (receipts, columns, as_lines) = match kind {
        pb::FactKind::Refunds => (Receipts::Refunds, export::REFUND_COLUMNS, false),
        pb::FactKind::PurchaseLines => (Receipts::Purchases, export::LINE_COLUMNS, true),
        _ => (Receipts::Purchases, export::PURCHASE_COLUMNS, false),
    };
    let (snapshot, mut after) = match resume {
        Some(Resume::Receipts(s, p)) => (s, Some(p)),
        _ => (snapshot, None),
    };
    // Lines come whole receipts at a time: read fewer receipts per chunk.
    let page = if as_lines {
        chunk_rows.div_ceil(16)
    } else {
        chunk_rows
    };
    let mut header = first;
    loop {
        let (facts, next) = match reporting
            .export_page(&tenant_id, receipts, &scope, snapshot, after, page)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Err(to_status(e))).await;
                return;
            }
        };
        let mut out = String::new();
        if std::mem::take(&mut header) {
            export::header(&mut out, columns);
        }
        let rows: usize = facts
            .iter()
            .map(|f| export::fact(&mut out, f, as_lines))
            .sum();
        let token = next.map_or(String::new(), |(day, seq)| {
            format!("{}.{snapshot}.{day}.{seq}", kind_name(kind))
        });
        if !send(out, rows, token).await || next.is_none() {
            return;
        }
        after = next;
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
        let v = self
            .reporting
            .kpis(&q, &kpis, group(r.group_by))
            .map_err(to_status)?;
        Ok(Response::new(pb::GetKpisResponse { values: values(v) }))
    }

    async fn get_time_series(
        &self,
        request: Request<pb::GetTimeSeriesRequest>,
    ) -> Result<Response<pb::GetTimeSeriesResponse>, Status> {
        let r = request.into_inner();
        let k = kpi(r.kpi, "kpi")?;
        let q = query(r.tenant_id, r.period, r.store_ids, r.filter, r.time_zone);
        let v = self
            .reporting
            .kpis(&q, &[k], granularity(r.granularity))
            .map_err(to_status)?;
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
            .reporting
            .category_intersection(&q, &r.category_a, &r.category_b)
            .map_err(to_status)?;
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
            .reporting
            .rfm_overview(&r.tenant_id, r.as_of.as_ref().map(millis))
            .map_err(to_status)?;
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

    async fn get_campaign_uplift(
        &self,
        request: Request<pb::GetCampaignUpliftRequest>,
    ) -> Result<Response<pb::GetCampaignUpliftResponse>, Status> {
        let r = request.into_inner();
        let q = query(r.tenant_id, r.period, Vec::new(), r.filter, r.time_zone);
        let u = self
            .reporting
            .uplift(&q, &r.campaign_id)
            .map_err(to_status)?;
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
        let kind = pb::FactKind::try_from(r.kind).unwrap_or(pb::FactKind::Unspecified);
        match kind {
            pb::FactKind::Unspecified => {
                return Err(to_status(Error::invalid("kind", "is required")));
            }
            pb::FactKind::LedgerEntries => {
                return Err(to_status(Error::FailedPrecondition(
                    "ledger entries are not exported yet: reporting does not receive the ledger's entries".into(),
                )));
            }
            _ => {}
        }
        match pb::ExportFormat::try_from(r.format).unwrap_or(pb::ExportFormat::Unspecified) {
            pb::ExportFormat::Unspecified | pb::ExportFormat::Csv => {}
            pb::ExportFormat::ArrowIpc => {
                return Err(Status::unimplemented(
                    "Arrow IPC exports are not built yet; ask for EXPORT_FORMAT_CSV",
                ));
            }
        }
        let chunk_rows = match r.chunk_rows {
            0 => DEFAULT_CHUNK_ROWS,
            n if n < 0 || n as usize > MAX_CHUNK_ROWS => {
                return Err(to_status(Error::invalid(
                    "chunk_rows",
                    format!("between 1 and {MAX_CHUNK_ROWS}"),
                )));
            }
            n => n as usize,
        };
        let resume = parse_token(&r.resume_token, kind)?;
        let tenant_id = r.tenant_id.clone();
        // Member features have no period: any (or none) is accepted.
        let (scope, snapshot) = if kind == pb::FactKind::MemberFeatures {
            loyalty_platform::types::tenant(&tenant_id).map_err(to_status)?;
            (Scope::default(), 0)
        } else {
            let q = query(r.tenant_id, r.period, Vec::new(), None, r.time_zone);
            self.reporting.export_scope(&q).await.map_err(to_status)?
        };
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let job = Export {
            tenant_id,
            kind,
            scope,
            snapshot,
            resume,
            chunk_rows,
        };
        tokio::spawn(export(self.reporting.clone(), job, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn resume_tokens_round_trip_and_refuse_strangers() {
        let k = pb::FactKind::Purchases;
        let t = format!("{}.7.20000.42", kind_name(k));
        assert_eq!(
            parse_token(&t, k).unwrap(),
            Some(Resume::Receipts(7, (20000, 42)))
        );
        assert!(parse_token("garbage", k).is_err());
        assert!(parse_token(&t, pb::FactKind::Refunds).is_err());
        let m = format!(
            "{}.member.with.dots",
            kind_name(pb::FactKind::MemberFeatures)
        );
        assert_eq!(
            parse_token(&m, pb::FactKind::MemberFeatures).unwrap(),
            Some(Resume::Members("member.with.dots".into()))
        );
    }
}
