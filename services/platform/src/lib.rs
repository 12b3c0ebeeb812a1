//! Shared runtime of every loyalty service: the error vocabulary and its gRPC mapping,
//! layered config, the embedded store, server bootstrap and health, clock and logging.

pub mod access;
pub mod audit;
pub mod calendar;
pub mod clock;
pub mod config;
pub mod embedded;
pub mod error;
pub mod events;
pub mod grpc;
pub mod metrics;
pub mod redis_conn;
pub mod redis_server;
pub mod replay;
pub mod rfm;
pub mod scylla;
pub mod server;
pub mod tasks;
pub mod telemetry;
pub mod tls;
pub mod types;

pub use error::{Error, Result, Violations};
