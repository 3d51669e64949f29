//! YMERA's domain, free of IO.
//!
//! Everything the system knows is a sequence of past-tense events. This crate
//! defines them, the envelope they travel in, the subjects they are stored
//! under, and the two pure functions every aggregate is made of:
//!
//! * `decide(state, command) -> Result<events, error>`: what a command means
//!   given the state rebuilt from the log;
//! * `evolve(state, event) -> state`: how one event changes that state. It
//!   cannot fail: an event is a fact that already happened.
//!
//! The write side and the query side (history, `as_of`) fold events with the
//! same `evolve`, so both agree on what an aggregate looked like at any time.
//! There is no tokio, sqlx or NATS here: given/when/then tests run without a
//! server.

pub mod agent;
pub mod aggregate;
pub mod envelope;
pub mod fields;
pub mod ids;
pub mod project;

pub use aggregate::Aggregate;
pub use envelope::{AggregateType, DecodeError, Envelope, EventMeta, Recorded};
pub use fields::FieldError;
pub use ids::{AgentId, ProjectId};

/// How a stored subject is formed: `<prefix>.<aggregate type>.<aggregate id>`.
///
/// One subject per aggregate lets JetStream guard every append with
/// `Nats-Expected-Last-Subject-Sequence`, and lets a loader read exactly one
/// aggregate's events.
pub fn subject(prefix: &str, aggregate_type: AggregateType, id: uuid::Uuid) -> String {
    format!("{prefix}.{}.{id}", aggregate_type.as_str())
}

/// The wildcard that matches every event of one aggregate type.
pub fn type_subjects(prefix: &str, aggregate_type: AggregateType) -> String {
    format!("{prefix}.{}.*", aggregate_type.as_str())
}

/// The wildcard that matches every event of the system under `prefix`.
pub fn all_subjects(prefix: &str) -> String {
    format!("{prefix}.>")
}
