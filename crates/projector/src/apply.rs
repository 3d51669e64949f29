//! How each event changes the read models.

use chrono::{DateTime, Utc};
use events::agent::{AgentCreated, AgentEvent};
use events::envelope::EventCodec;
use events::project::ProjectEvent;
use events::{AggregateType, Envelope};
use infra::db::Tx;
use infra::event_store::TraceCarrier;

/// Why an event could not be applied. Such an event is parked, never
/// retried forever nor dropped unseen.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("not an event envelope: {0}")]
    Envelope(#[from] serde_json::Error),
    #[error(transparent)]
    Decode(#[from] events::DecodeError),
}

/// One message of a batch, as it came from the stream.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    pub seq: u64,
    pub subject: &'a str,
    pub payload: &'a [u8],
    /// The trace context of the request that wrote the event.
    pub trace: Option<TraceCarrier<'a>>,
}

/// Applies a batch of messages, in order, inside the batch's transaction,
/// and records each in the `events` table. Runs of `agent.created` become
/// one multi-row insert, and every event row one more: a batch costs a few
/// statements, not two per event. Returns each event's `occurred_at`
/// (`None` for a message parked because it cannot be decoded). A database
/// error aborts the batch.
pub async fn apply_all(
    tx: &mut Tx<'_>,
    messages: &[Incoming<'_>],
) -> Result<Vec<Option<DateTime<Utc>>>, sqlx::Error> {
    let mut occurred = Vec::with_capacity(messages.len());
    let mut events = EventRows::default();
    let mut creates = AgentRows::default();
    for m in messages {
        // Each event's span continues the trace of the request that wrote
        // it; made only when traces are exported, as they cost per event.
        let span = infra::telemetry::enabled().then(|| {
            let span = tracing::info_span!("projector.apply", otel.kind = "consumer", seq = m.seq, subject = %m.subject);
            if let Some(trace) = &m.trace {
                infra::telemetry::continue_trace(&span, trace);
            }
            span
        });
        let _entered = span.as_ref().map(|s| s.enter());
        match decode(m.payload) {
            Ok(Decoded::Agent(env, AgentEvent::Created(c))) => {
                events.push(m.seq, &env);
                creates.push(m.seq, &env, &c);
                occurred.push(Some(env.occurred_at));
            }
            Ok(Decoded::Agent(env, event)) => {
                events.push(m.seq, &env);
                creates.flush(tx).await?;
                apply_agent(tx, m.seq, &env, event).await?;
                occurred.push(Some(env.occurred_at));
            }
            Ok(Decoded::Project(env, event)) => {
                events.push(m.seq, &env);
                creates.flush(tx).await?;
                apply_project(tx, m.seq, &env, event).await?;
                occurred.push(Some(env.occurred_at));
            }
            Err(e) => {
                tracing::error!(seq = m.seq, subject = m.subject, error = %e, "parking an event that cannot be applied");
                sqlx::query(
                    "INSERT INTO parked_events (seq, subject, payload, error) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (seq) DO NOTHING",
                )
                .bind(m.seq as i64)
                .bind(m.subject)
                .bind(m.payload)
                .bind(e.to_string())
                .execute(&mut **tx)
                .await?;
                occurred.push(None);
            }
        }
    }
    creates.flush(tx).await?;
    events.flush(tx).await?;
    Ok(occurred)
}

/// Applies one message (a parked event's retry).
pub async fn apply_message(
    tx: &mut Tx<'_>,
    seq: u64,
    subject: &str,
    payload: &[u8],
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let one = Incoming {
        seq,
        subject,
        payload,
        trace: None,
    };
    Ok(apply_all(tx, &[one]).await?.pop().flatten())
}

/// `events` rows waiting for their one insert.
#[derive(Default)]
struct EventRows {
    seq: Vec<i64>,
    event_id: Vec<uuid::Uuid>,
    event_type: Vec<String>,
    schema_version: Vec<i32>,
    aggregate_type: Vec<&'static str>,
    aggregate_id: Vec<uuid::Uuid>,
    aggregate_version: Vec<i64>,
    occurred_at: Vec<DateTime<Utc>>,
    actor: Vec<String>,
    request_id: Vec<String>,
    data: Vec<serde_json::Value>,
}

impl EventRows {
    fn push(&mut self, seq: u64, env: &Envelope) {
        self.seq.push(seq as i64);
        self.event_id.push(env.event_id);
        self.event_type.push(env.event_type.clone());
        self.schema_version.push(env.schema_version as i32);
        self.aggregate_type.push(env.aggregate_type.as_str());
        self.aggregate_id.push(env.aggregate_id);
        self.aggregate_version.push(env.aggregate_version as i64);
        self.occurred_at.push(env.occurred_at);
        self.actor.push(env.actor.clone());
        self.request_id.push(env.request_id.clone());
        self.data.push(env.data.clone());
    }

    /// Keeps the events themselves, for history, `as_of` and analytics.
    async fn flush(&mut self, tx: &mut Tx<'_>) -> Result<(), sqlx::Error> {
        if self.seq.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(self);
        sqlx::query(
            "INSERT INTO events (seq, event_id, event_type, schema_version, aggregate_type, \
             aggregate_id, aggregate_version, occurred_at, actor, request_id, data) \
             SELECT * FROM UNNEST($1::int8[], $2::uuid[], $3::text[], $4::int4[], $5::text[], \
             $6::uuid[], $7::int8[], $8::timestamptz[], $9::text[], $10::text[], $11::jsonb[]) \
             ON CONFLICT (seq) DO NOTHING",
        )
        .bind(rows.seq)
        .bind(rows.event_id)
        .bind(rows.event_type)
        .bind(rows.schema_version)
        .bind(rows.aggregate_type)
        .bind(rows.aggregate_id)
        .bind(rows.aggregate_version)
        .bind(rows.occurred_at)
        .bind(rows.actor)
        .bind(rows.request_id)
        .bind(rows.data)
        .execute(&mut **tx)
        .await
        .map(|_| ())
    }
}

/// New `agents` rows waiting for their one insert. Flushed before any
/// other statement, so an update later in the batch finds its row.
#[derive(Default)]
struct AgentRows {
    id: Vec<uuid::Uuid>,
    name: Vec<String>,
    agent_type: Vec<String>,
    description: Vec<String>,
    status: Vec<&'static str>,
    capabilities: Vec<serde_json::Value>,
    config: Vec<serde_json::Value>,
    tags: Vec<serde_json::Value>,
    project_id: Vec<Option<uuid::Uuid>>,
    version: Vec<i64>,
    at: Vec<DateTime<Utc>>,
    actor: Vec<String>,
    seq: Vec<i64>,
}

impl AgentRows {
    fn push(&mut self, seq: u64, env: &Envelope, c: &AgentCreated) {
        self.id.push(env.aggregate_id);
        self.name.push(c.name.as_str().to_owned());
        self.agent_type.push(c.agent_type.as_str().to_owned());
        self.description.push(c.description.as_str().to_owned());
        self.status.push(c.status.as_str());
        self.capabilities.push(json(&c.capabilities));
        self.config.push(json(&c.config));
        self.tags.push(json(&c.tags));
        self.project_id.push(c.project_id);
        self.version.push(env.aggregate_version as i64);
        self.at.push(env.occurred_at);
        self.actor.push(env.actor.clone());
        self.seq.push(seq as i64);
    }

    async fn flush(&mut self, tx: &mut Tx<'_>) -> Result<(), sqlx::Error> {
        if self.id.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(self);
        // Capabilities travel as JSON arrays: arrays of arrays cannot be
        // unnested row by row.
        sqlx::query(
            "INSERT INTO agents (id, name, type, description, status, capabilities, config, tags, \
             project_id, version, created_at, updated_at, created_by, last_seq) \
             SELECT u.id, u.name, u.type, u.description, u.status, \
                    ARRAY(SELECT jsonb_array_elements_text(u.caps)), u.config, u.tags, \
                    u.project_id, u.version, u.at, u.at, u.actor, u.seq \
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[], \
                         $7::jsonb[], $8::jsonb[], $9::uuid[], $10::int8[], $11::timestamptz[], \
                         $12::text[], $13::int8[]) \
               AS u(id, name, type, description, status, caps, config, tags, project_id, version, at, actor, seq)",
        )
        .bind(rows.id)
        .bind(rows.name)
        .bind(rows.agent_type)
        .bind(rows.description)
        .bind(rows.status)
        .bind(rows.capabilities)
        .bind(rows.config)
        .bind(rows.tags)
        .bind(rows.project_id)
        .bind(rows.version)
        .bind(rows.at)
        .bind(rows.actor)
        .bind(rows.seq)
        .execute(&mut **tx)
        .await
        .map(|_| ())
    }
}

enum Decoded {
    Agent(Envelope, AgentEvent),
    Project(Envelope, ProjectEvent),
}

fn decode(payload: &[u8]) -> Result<Decoded, ApplyError> {
    let env: Envelope = serde_json::from_slice(payload)?;
    Ok(match env.aggregate_type {
        AggregateType::Agent => {
            let event = AgentEvent::decode(&env)?;
            Decoded::Agent(env, event)
        }
        AggregateType::Project => {
            let event = ProjectEvent::decode(&env)?;
            Decoded::Project(env, event)
        }
    })
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

async fn apply_agent(
    tx: &mut Tx<'_>,
    seq: u64,
    env: &Envelope,
    event: AgentEvent,
) -> Result<(), sqlx::Error> {
    match event {
        AgentEvent::Created(c) => {
            let mut one = AgentRows::default();
            one.push(seq, env, &c);
            one.flush(tx).await
        }
        AgentEvent::Updated(c) => {
            // NULL means "unchanged" for every column but project_id, whose
            // change is flagged separately because NULL is a real value.
            sqlx::query(
                "UPDATE agents SET \
                   name = COALESCE($2, name), type = COALESCE($3, type), \
                   description = COALESCE($4, description), status = COALESCE($5, status), \
                   capabilities = COALESCE($6, capabilities), config = COALESCE($7, config), \
                   tags = COALESCE($8, tags), \
                   project_id = CASE WHEN $9 THEN $10 ELSE project_id END, \
                   version = $11, updated_at = $12, last_seq = $13 \
                 WHERE id = $1",
            )
            .bind(env.aggregate_id)
            .bind(c.name.as_ref().map(|v| v.as_str()))
            .bind(c.agent_type.as_ref().map(|v| v.as_str()))
            .bind(c.description.as_ref().map(|v| v.as_str()))
            .bind(c.status.map(|v| v.as_str()))
            .bind(c.capabilities.as_ref().map(|v| v.as_slice()))
            .bind(c.config.as_ref().map(json))
            .bind(c.tags.as_ref().map(json))
            .bind(c.project_id.is_some())
            .bind(c.project_id.flatten())
            .bind(env.aggregate_version as i64)
            .bind(env.occurred_at)
            .bind(seq as i64)
            .execute(&mut **tx)
            .await
            .map(|_| ())
        }
        AgentEvent::Deleted => sqlx::query("DELETE FROM agents WHERE id = $1")
            .bind(env.aggregate_id)
            .execute(&mut **tx)
            .await
            .map(|_| ()),
    }
}

async fn apply_project(
    tx: &mut Tx<'_>,
    seq: u64,
    env: &Envelope,
    event: ProjectEvent,
) -> Result<(), sqlx::Error> {
    let query = match &event {
        ProjectEvent::Created(c) => sqlx::query(
            "INSERT INTO projects (id, name, description, version, created_at, updated_at, created_by, last_seq) \
             VALUES ($1, $2, $3, $4, $5, $5, $6, $7)",
        )
        .bind(env.aggregate_id)
        .bind(c.name.as_str())
        .bind(c.description.as_str())
        .bind(env.aggregate_version as i64)
        .bind(env.occurred_at)
        .bind(&env.actor)
        .bind(seq as i64),
        ProjectEvent::Updated(c) => sqlx::query(
            "UPDATE projects SET name = COALESCE($2, name), description = COALESCE($3, description), \
             version = $4, updated_at = $5, last_seq = $6 WHERE id = $1",
        )
        .bind(env.aggregate_id)
        .bind(c.name.as_ref().map(|v| v.as_str()))
        .bind(c.description.as_ref().map(|v| v.as_str()))
        .bind(env.aggregate_version as i64)
        .bind(env.occurred_at)
        .bind(seq as i64),
        ProjectEvent::Deleted => sqlx::query("DELETE FROM projects WHERE id = $1").bind(env.aggregate_id),
    };
    query.execute(&mut **tx).await.map(|_| ())
}
