//! Apache Arrow Flight on the same port and tonic stack as the gRPC API, so `pyarrow.flight`,
//! polars and DuckDB read exports directly. `DoGet` takes a JSON ticket naming the export:
//!
//! ```json
//! {"tenant_id": "demo", "kind": "purchase_lines", "start_time": "2026-01-01T00:00:00Z",
//!  "end_time": "2026-02-01T00:00:00Z", "time_zone": "Asia/Almaty"}
//! ```
//!
//! `kind` is `purchases`, `purchase_lines`, `refunds`, `ledger_entries` or `member_features`; `time_zone` and
//! `rows` (record batch size, default 10,000) are optional. The stream is the same
//! snapshot-consistent, paged export `ExportFacts` sends, as Arrow record batches; it is not
//! resumable (an interrupted `DoGet` starts again).

use std::pin::Pin;

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures_util::StreamExt;
use loyalty_platform::error::Error;
use loyalty_platform::grpc::to_status;
use serde::Deserialize;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::exporter::{self, Kind};
use crate::service::{DEFAULT_CHUNK_ROWS, MAX_CHUNK_ROWS, Period, Reporting, Request as Query};

/// Longest ticket accepted.
const MAX_TICKET_BYTES: usize = 4096;

#[derive(Debug, Clone)]
pub struct Flight {
    reporting: Reporting,
}

impl Flight {
    pub fn new(reporting: Reporting) -> Self {
        Self { reporting }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportTicket {
    tenant_id: String,
    kind: String,
    #[serde(default)]
    start_time: Option<String>,
    #[serde(default)]
    end_time: Option<String>,
    #[serde(default)]
    time_zone: String,
    #[serde(default)]
    rows: Option<usize>,
}

fn instant(field: &str, value: Option<&str>) -> Result<Option<i64>, Status> {
    value
        .map(|v| {
            v.parse::<jiff::Timestamp>()
                .map(|t| t.as_millisecond())
                .map_err(|_| {
                    to_status(Error::invalid(
                        field,
                        format!("{v:?} is not an RFC 3339 time like \"2026-01-01T00:00:00Z\""),
                    ))
                })
        })
        .transpose()
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn unsupported<T>(what: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!(
        "{what} is not offered: this Flight endpoint serves exports through DoGet"
    )))
}

#[tonic::async_trait]
impl FlightService for Flight {
    type HandshakeStream = Boxed<HandshakeResponse>;
    type ListFlightsStream = Boxed<FlightInfo>;
    type DoGetStream = Boxed<FlightData>;
    type DoPutStream = Boxed<PutResult>;
    type DoExchangeStream = Boxed<FlightData>;
    type DoActionStream = Boxed<arrow_flight::Result>;
    type ListActionsStream = Boxed<ActionType>;

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let who = loyalty_platform::access::caller(&request)?.clone();
        let ticket = request.into_inner().ticket;
        if ticket.len() > MAX_TICKET_BYTES {
            return Err(to_status(Error::invalid(
                "ticket",
                format!("at most {MAX_TICKET_BYTES} bytes"),
            )));
        }
        let t: ExportTicket = serde_json::from_slice(&ticket).map_err(|e| {
            to_status(Error::invalid(
                "ticket",
                format!("is not an export ticket ({e}); see docs/kpis.md"),
            ))
        })?;
        let kind = Kind::parse(&t.kind).ok_or_else(|| {
            to_status(Error::invalid(
                "ticket.kind",
                "one of purchases, purchase_lines, refunds, ledger_entries, member_features",
            ))
        })?;
        loyalty_platform::access::admit_tenant(&who, &t.tenant_id)?;
        let rows = t.rows.unwrap_or(DEFAULT_CHUNK_ROWS);
        if rows == 0 || rows > MAX_CHUNK_ROWS {
            return Err(to_status(Error::invalid(
                "ticket.rows",
                format!("between 1 and {MAX_CHUNK_ROWS}"),
            )));
        }
        let query = Query {
            tenant_id: t.tenant_id,
            period: Period {
                start: instant("ticket.start_time", t.start_time.as_deref())?,
                end: instant("ticket.end_time", t.end_time.as_deref())?,
            },
            time_zone: t.time_zone,
            ..Query::default()
        };
        let job = self
            .reporting
            .export_job(&query, kind, "flight", "", rows)
            .await
            .map_err(to_status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(exporter::run(self.reporting.clone(), job, tx));
        let batches = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |page| {
            page.and_then(|p| crate::arrow::batch(kind, &p.rows))
                .map_err(|e| FlightError::from(to_status(e)))
        });
        let data = FlightDataEncoderBuilder::new()
            .with_schema(crate::arrow::schema(kind))
            .build(batches)
            .map(|d| d.map_err(Status::from));
        Ok(Response::new(Box::pin(data)))
    }

    async fn handshake(
        &self,
        _: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        unsupported("Handshake")
    }

    async fn list_flights(
        &self,
        _: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        unsupported("ListFlights")
    }

    async fn get_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        unsupported("GetFlightInfo")
    }

    async fn poll_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        unsupported("PollFlightInfo")
    }

    async fn get_schema(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        unsupported("GetSchema")
    }

    async fn do_put(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        unsupported("DoPut")
    }

    async fn do_exchange(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        unsupported("DoExchange")
    }

    async fn do_action(
        &self,
        _: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        unsupported("DoAction")
    }

    async fn list_actions(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        unsupported("ListActions")
    }
}
