//! The segmentation service: member features maintained from purchase events, dynamic
//! segments as predicates over them (`expr`), static segments, and membership answered at
//! the POS with one read.
//!
//! `calendar`, `features` and `expr` are the pure domain; `service` orchestrates it over the
//! `store` trait; `consumer` (the event stream) and `grpc` are adapters.

pub mod calendar;
pub mod consumer;
pub mod expr;
pub mod features;
pub mod grpc;
pub use loyalty_platform::rfm;
pub mod service;
pub mod store;

pub use grpc::{SERVICE_NAMES, add_routes};
pub use service::Segmentation;
