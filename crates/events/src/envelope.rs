//! The envelope every event is stored in, as `api.md` gives it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The kinds of aggregate whose events live in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregateType {
    Agent,
    Project,
}

impl AggregateType {
    pub fn as_str(self) -> &'static str {
        match self {
            AggregateType::Agent => "agent",
            AggregateType::Project => "project",
        }
    }
}

/// One event as it is stored in JetStream and served by `/history` and the
/// live feed.
///
/// `data` stays untyped here so that the envelope can be read, filtered and
/// forwarded without knowing every event type; typed access goes through each
/// aggregate's `decode`, which also upcasts old schema versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub event_id: Uuid,
    #[serde(rename = "type")]
    pub event_type: String,
    pub schema_version: u32,
    pub aggregate_type: AggregateType,
    pub aggregate_id: Uuid,
    /// The aggregate's version after this event: 1 for its first event.
    pub aggregate_version: u64,
    pub occurred_at: DateTime<Utc>,
    /// The `sub` of the token that caused the event.
    pub actor: String,
    /// The HTTP request id that caused the event, for tracing it back.
    pub request_id: String,
    pub data: serde_json::Value,
}

/// What is known about an event besides its data: who, when, which request,
/// and where in the aggregate's life it falls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMeta {
    pub aggregate_id: Uuid,
    pub aggregate_version: u64,
    pub occurred_at: DateTime<Utc>,
    pub actor: String,
    pub request_id: String,
}

/// A typed event together with its metadata, as `evolve` consumes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded<E> {
    pub meta: EventMeta,
    pub event: E,
}

impl Envelope {
    /// Wraps a typed event with its metadata into the stored form.
    pub fn new(
        event_id: Uuid,
        aggregate_type: AggregateType,
        meta: &EventMeta,
        event_type: &str,
        schema_version: u32,
        data: serde_json::Value,
    ) -> Self {
        Envelope {
            event_id,
            event_type: event_type.to_owned(),
            schema_version,
            aggregate_type,
            aggregate_id: meta.aggregate_id,
            aggregate_version: meta.aggregate_version,
            occurred_at: meta.occurred_at,
            actor: meta.actor.clone(),
            request_id: meta.request_id.clone(),
            data,
        }
    }

    pub fn meta(&self) -> EventMeta {
        EventMeta {
            aggregate_id: self.aggregate_id,
            aggregate_version: self.aggregate_version,
            occurred_at: self.occurred_at,
            actor: self.actor.clone(),
            request_id: self.request_id.clone(),
        }
    }
}

/// Why a stored event could not be turned into a typed one.
///
/// The projector parks such events instead of stalling on them.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("event type {event_type:?} has no schema version {version}")]
    UnknownVersion { event_type: String, version: u32 },
    #[error("event {event_type:?} carries bad data: {source}")]
    BadData {
        event_type: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("envelope is not valid JSON: {0}")]
    BadEnvelope(#[source] serde_json::Error),
}
