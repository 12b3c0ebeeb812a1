//! The reporting service: the case studies' KPIs defined as code, kept exact from the event
//! stream, and raw facts exported for data teams.
//!
//! `fact`, `rollup` and `kpi` are the pure domain; `service` is the core over a
//! [`store::ReportingStore`]; `consumer` and `grpc` are the adapters.

pub mod arrow;
pub mod audit;
pub mod consumer;
pub mod export;
pub mod exporter;
pub mod fact;
pub mod flight;
pub mod fraud;
pub mod grpc;
pub mod grpc_audit;
pub mod kpi;
pub mod ports;
pub mod rollup;
pub mod service;
pub mod store;
#[cfg(test)]
mod tests;

use loyalty_proto::reporting::v1::audit_service_server::AuditServiceServer;
use loyalty_proto::reporting::v1::reporting_service_server::ReportingServiceServer;

pub use service::Reporting;

pub const SERVICE_NAMES: &[&str] = &[
    "loyalty.reporting.v1.ReportingService",
    "loyalty.reporting.v1.AuditService",
    "arrow.flight.protocol.FlightService",
];

pub fn add_routes(
    routes: tonic::service::Routes,
    reporting: Reporting,
    max_message_bytes: usize,
) -> tonic::service::Routes {
    routes
        .add_service(
            ReportingServiceServer::new(grpc::Api::new(reporting.clone()))
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
        )
        .add_service(
            AuditServiceServer::new(grpc_audit::AuditApi::new(reporting.clone()))
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
        )
        .add_service(
            arrow_flight::flight_service_server::FlightServiceServer::new(flight::Flight::new(
                reporting,
            ))
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes),
        )
}
