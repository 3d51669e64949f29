//! How each event changes the read models.

use chrono::{DateTime, Utc};
use events::agent::{AgentCreated, AgentEvent};
use events::project::ProjectEvent;
use events::{AggregateType, Envelope};
use infra::db::Tx;

/// Why an event could not be applied. Such an event is parked, never
/// retried forever nor dropped unseen.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("not an event envelope: {0}")]
    Envelope(#[from] serde_json::Error),
    #[error(transparent)]
    Decode(#[from] events::DecodeError),
}

/// Applies one stored message inside the batch's transaction, and records
/// it in the `events` table. Returns the event's `occurred_at`, or `None`
/// when it was parked: a message that cannot be decoded is parked with the
/// reason. A database error aborts the batch.
pub async fn apply_message(
    tx: &mut Tx<'_>,
    seq: u64,
    subject: &str,
    payload: &[u8],
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    match decode(payload) {
        Ok(Decoded::Agent(env, event)) => {
            record_event(tx, seq, &env).await?;
            apply_agent(tx, seq, &env, event).await?;
            Ok(Some(env.occurred_at))
        }
        Ok(Decoded::Project(env, event)) => {
            record_event(tx, seq, &env).await?;
            apply_project(tx, seq, &env, event).await?;
            Ok(Some(env.occurred_at))
        }
        Err(e) => {
            tracing::error!(seq, subject, error = %e, "parking an event that cannot be applied");
            sqlx::query(
                "INSERT INTO parked_events (seq, subject, payload, error) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (seq) DO NOTHING",
            )
            .bind(seq as i64)
            .bind(subject)
            .bind(payload)
            .bind(e.to_string())
            .execute(&mut **tx)
            .await
            .map(|_| None)
        }
    }
}

/// Keeps the event itself, for history, `as_of` and analytics.
async fn record_event(tx: &mut Tx<'_>, seq: u64, env: &Envelope) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO events (seq, event_id, event_type, schema_version, aggregate_type, \
         aggregate_id, aggregate_version, occurred_at, actor, request_id, data) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (seq) DO NOTHING",
    )
    .bind(seq as i64)
    .bind(env.event_id)
    .bind(&env.event_type)
    .bind(env.schema_version as i32)
    .bind(env.aggregate_type.as_str())
    .bind(env.aggregate_id)
    .bind(env.aggregate_version as i64)
    .bind(env.occurred_at)
    .bind(&env.actor)
    .bind(&env.request_id)
    .bind(&env.data)
    .execute(&mut **tx)
    .await
    .map(|_| ())
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

async fn insert_agent(
    tx: &mut Tx<'_>,
    seq: u64,
    env: &Envelope,
    c: &AgentCreated,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO agents (id, name, type, description, status, capabilities, config, tags, \
         project_id, version, created_at, updated_at, created_by, last_seq) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11, $12, $13)",
    )
    .bind(env.aggregate_id)
    .bind(c.name.as_str())
    .bind(c.agent_type.as_str())
    .bind(c.description.as_str())
    .bind(c.status.as_str())
    .bind(c.capabilities.as_slice())
    .bind(json(&c.config))
    .bind(json(&c.tags))
    .bind(c.project_id)
    .bind(env.aggregate_version as i64)
    .bind(env.occurred_at)
    .bind(&env.actor)
    .bind(seq as i64)
    .execute(&mut **tx)
    .await
    .map(|_| ())
}

async fn apply_agent(
    tx: &mut Tx<'_>,
    seq: u64,
    env: &Envelope,
    event: AgentEvent,
) -> Result<(), sqlx::Error> {
    match event {
        AgentEvent::Created(c) => insert_agent(tx, seq, env, &c).await,
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
