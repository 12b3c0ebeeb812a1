//! The reporting service. Its API v1 is served so clients can be generated and wired now; every
//! RPC answers UNIMPLEMENTED until the service's own issue lands. It has no storage yet,
//! so it has no dependency whose health could fail.

use loyalty_proto::reporting::v1::reporting_service_server::{
    ReportingService, ReportingServiceServer,
};

pub const SERVICE_NAMES: &[&str] = &["loyalty.reporting.v1.ReportingService"];

#[derive(Debug, Clone, Default)]
struct Api;

/// Every RPC answers UNIMPLEMENTED (the generated default).
#[tonic::async_trait]
impl ReportingService for Api {}

pub fn add_routes(
    routes: tonic::service::Routes,
    max_message_bytes: usize,
) -> tonic::service::Routes {
    routes.add_service(
        ReportingServiceServer::new(Api)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes),
    )
}
