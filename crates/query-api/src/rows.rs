//! The `agents` read model's rows, as every endpoint that serves agents
//! (get, list, search, export) selects and reads them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use infra::views::AgentView;
use sqlx::postgres::PgRow;
use sqlx::{FromRow, Row};
use uuid::Uuid;

/// The agent columns, from the `agents` table as `a`, in [`AgentRow`]'s
/// names.
pub(crate) const AGENT_COLUMNS: &str = "a.id, a.name, a.type, a.description, a.status, a.capabilities, a.config, \
     a.tags, a.project_id, a.version, a.created_at, a.updated_at, a.created_by";

/// An `agents` row.
#[derive(Debug, FromRow)]
struct AgentRow {
    id: Uuid,
    name: String,
    #[sqlx(rename = "type")]
    agent_type: String,
    description: String,
    status: String,
    capabilities: Vec<String>,
    config: serde_json::Value,
    tags: sqlx::types::Json<BTreeMap<String, String>>,
    project_id: Option<Uuid>,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    created_by: String,
}

/// Reads the agent columns of a row.
pub(crate) fn agent(row: &PgRow) -> Result<AgentView, sqlx::Error> {
    let r = AgentRow::from_row(row)?;
    Ok(AgentView {
        id: r.id,
        name: r.name,
        agent_type: r.agent_type,
        description: r.description,
        status: r.status,
        capabilities: r.capabilities,
        config: r.config,
        tags: r.tags.0,
        project_id: r.project_id,
        version: r.version.max(0) as u64,
        created_at: r.created_at,
        updated_at: r.updated_at,
        created_by: r.created_by,
    })
}

/// Reads the agent columns of a row that came from a LEFT JOIN: `None` when
/// the join found nothing.
pub(crate) fn agent_of(row: &PgRow) -> Result<Option<AgentView>, sqlx::Error> {
    let id: Option<Uuid> = row.try_get("id")?;
    if id.is_none() {
        return Ok(None);
    }
    agent(row).map(Some)
}
