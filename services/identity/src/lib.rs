//! The identity service: members, cards, lookups at the POS.
//!
//! `domain` is the core (no gRPC, no storage engine), `store` the narrow storage trait and
//! its backends, `grpc` the adapter.

pub mod domain;
pub mod events;
pub mod grpc;
pub mod grpc_access;
pub mod import;
pub mod keys;
pub mod lifecycle;
pub mod publish;
pub mod store;

pub use domain::Identity;
