//! The promotion service: program rules, catalog, and the POS checkout.
//!
//! `program`, `catalog`, `receipt`, `evaluate` and `purchase` are the pure domain; `checkout`
//! and `admin` orchestrate it over the `store` trait and the `ports` to identity and
//! balance; `grpc` is the adapter.

pub mod actions;
pub mod admin;
pub mod book;
pub mod calendar;
pub mod campaign;
mod campaign_admin;
pub mod catalog;
pub mod checkout;
pub mod consume;
mod counters;
pub mod evaluate;
pub mod events;
pub mod grpc;
mod grpc_campaign;
#[cfg(test)]
mod mechanics_tests;
pub mod ports;
pub mod program;
pub mod publish;
pub mod purchase;
pub mod receipt;
pub mod store;
pub mod tier;
pub mod usage;
pub mod velocity;

pub use admin::Admin;
pub use campaign_admin::CampaignDocument;
pub use checkout::Checkout;

/// Largest points amount accepted anywhere, in point minor units.
pub const MAX_POINTS: i64 = 1_000_000_000_000;
