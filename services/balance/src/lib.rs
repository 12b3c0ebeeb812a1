//! The balance service: the points ledger.
//!
//! `ledger` is the pure core (lots, entries, reversals), `service` the domain operations,
//! `store` the narrow storage trait and its backends, `grpc` the adapter.

pub mod certificate;
pub mod events;
pub mod grpc;
pub mod ledger;
pub mod publish;
pub mod service;
pub mod store;

pub use service::Balance;
