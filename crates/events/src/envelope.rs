//! The envelope every event is stored in, as `api.md` gives it, and the
//! codec between an aggregate's typed events and that stored form.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
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

    /// The data read as an event body; `BadData` naming the event type when
    /// it does not fit.
    pub(crate) fn body<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        T::deserialize(&self.data).map_err(|source| DecodeError::BadData {
            event_type: self.event_type.clone(),
            source,
        })
    }
}

/// How an aggregate's typed events map to and from their stored form: a
/// type name, a schema version and a JSON body.
pub trait EventCodec: Sized {
    /// The schema version events are written with.
    const SCHEMA_VERSION: u32;

    /// The type name the envelope carries.
    fn event_type(&self) -> &'static str;

    /// The stored form of this event's data.
    fn to_data(&self) -> serde_json::Value;

    /// Reads the data of an event stored at [`Self::SCHEMA_VERSION`].
    fn decode_current(envelope: &Envelope) -> Result<Self, DecodeError>;

    /// Reads a stored event at the current schema version, and refuses any
    /// other. Events that gain a new version override this to upcast the
    /// older ones to the current types.
    fn decode(envelope: &Envelope) -> Result<Self, DecodeError> {
        if envelope.schema_version != Self::SCHEMA_VERSION {
            return Err(DecodeError::UnknownVersion {
                event_type: envelope.event_type.clone(),
                version: envelope.schema_version,
            });
        }
        Self::decode_current(envelope)
    }

    /// Decodes and pairs with metadata: what `evolve` takes.
    fn recorded(envelope: &Envelope) -> Result<Recorded<Self>, DecodeError> {
        Ok(Recorded {
            meta: envelope.meta(),
            event: Self::decode(envelope)?,
        })
    }
}

/// The stored form of an event body. Serializing plain structs of strings,
/// maps and ids into a `Value` cannot fail: there are no non-string map
/// keys and no IO.
pub(crate) fn data_of(body: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(body).unwrap_or(serde_json::Value::Null)
}

/// Implements [`EventCodec`] (schema version 1) for an aggregate's event
/// enum of the shape every aggregate has so far, `Created(body)`,
/// `Updated(changes)` and `Deleted`, given the three type names. A
/// deletion carries `{}`.
///
/// A macro rather than a generic: the variants are the enum's own, and a
/// trait that could name them would be longer than the three matches it
/// writes.
macro_rules! lifecycle_codec {
    ($event:ident: $created:path, $updated:path, $deleted:path) => {
        impl $crate::envelope::EventCodec for $event {
            const SCHEMA_VERSION: u32 = 1;

            fn event_type(&self) -> &'static str {
                match self {
                    $event::Created(_) => $created,
                    $event::Updated(_) => $updated,
                    $event::Deleted => $deleted,
                }
            }

            fn to_data(&self) -> serde_json::Value {
                match self {
                    $event::Created(body) => $crate::envelope::data_of(body),
                    $event::Updated(changes) => $crate::envelope::data_of(changes),
                    $event::Deleted => serde_json::Value::Object(Default::default()),
                }
            }

            fn decode_current(
                envelope: &$crate::envelope::Envelope,
            ) -> Result<Self, $crate::envelope::DecodeError> {
                match envelope.event_type.as_str() {
                    $created => envelope.body().map($event::Created),
                    $updated => envelope.body().map($event::Updated),
                    $deleted => Ok($event::Deleted),
                    other => Err($crate::envelope::DecodeError::UnknownType(other.to_owned())),
                }
            }
        }
    };
}
pub(crate) use lifecycle_codec;

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
