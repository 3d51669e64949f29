//! The JSON shapes of resources, shared by the write side (which answers
//! with the state it just decided) and the read side (which answers from the
//! read models), so both speak the same contract.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use events::agent::Agent;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// An agent, as `api.md` gives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AgentView {
    pub id: Uuid,
    pub name: String,
    #[serde(rename = "type")]
    pub agent_type: String,
    pub description: String,
    /// `active`, `inactive`, `paused` or `error`.
    #[schema(value_type = crate::http::schema::AgentStatusName)]
    pub status: String,
    pub capabilities: Vec<String>,
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    pub tags: BTreeMap<String, String>,
    pub project_id: Option<Uuid>,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub created_by: String,
}

impl From<&Agent> for AgentView {
    fn from(a: &Agent) -> Self {
        AgentView {
            id: a.id,
            name: a.name.to_string(),
            agent_type: a.agent_type.to_string(),
            description: a.description.to_string(),
            status: a.status.as_str().to_owned(),
            capabilities: a.capabilities.as_slice().to_vec(),
            config: serde_json::Value::Object(a.config.as_map().clone()),
            tags: a.tags.as_map().clone(),
            project_id: a.project_id,
            version: a.version,
            created_at: a.created_at,
            updated_at: a.updated_at,
            created_by: a.created_by.clone(),
        }
    }
}

/// A page of a list: keyset pagination with an opaque cursor.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// A project, as `api.md` gives it. `agent_count` is the number of live
/// agents in it, from the read model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProjectView {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    /// Live agents in the project, from the read model.
    pub agent_count: u64,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub created_by: String,
}

impl ProjectView {
    pub fn new(p: &events::project::Project, agent_count: u64) -> Self {
        ProjectView {
            id: p.id,
            name: p.name.to_string(),
            description: p.description.to_string(),
            agent_count,
            version: p.version,
            created_at: p.created_at,
            updated_at: p.updated_at,
            created_by: p.created_by.clone(),
        }
    }
}

#[cfg(test)]
mod json_number_tests {
    /// PostgreSQL's jsonb prints numbers in plain decimal: a `config` that
    /// held 1.7976931348623157e308 (f64::MAX) comes back as 309 digits. Without
    /// serde_json's `float_roundtrip`, those digits parse as infinity ("number
    /// out of range") and every read of that agent was a 500.
    #[test]
    fn plain_decimals_from_postgres_parse_back() {
        let max = format!("179769313486231570{}", "0".repeat(291));
        let v: serde_json::Value = serde_json::from_str(&max).unwrap();
        assert_eq!(v.as_f64(), Some(f64::MAX));
        let tiny = format!("0.{}49406564584124654", "0".repeat(323));
        let v: serde_json::Value = serde_json::from_str(&tiny).unwrap();
        assert_eq!(v.as_f64(), Some(5e-324));
    }
}
