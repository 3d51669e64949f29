//! The adapters every YMERA process shares: configuration, the JetStream
//! event store, the PostgreSQL pool and migrations, authentication
//! (and whether a token's user still holds it), telemetry and the HTTP plumbing (problem+json errors, request ids,
//! extractors, operational endpoints).
//!
//! Nothing here decides anything about agents or projects; that is the
//! `events` crate's job. This crate only moves bytes in and out.

pub mod auth;
pub mod config;
pub mod db;
pub mod event_store;
pub mod http;
pub mod metrics;
pub mod projection;
pub mod sessions;
pub mod telemetry;
pub mod views;

pub use event_store::{BatchItem, EventStore, StoreError, StoredEvent};
