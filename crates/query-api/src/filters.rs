//! The agent filters that list, search and export share: `status`, `type`,
//! `project_id` and `tag` (repeatable, all must match), parsed once and
//! appended to a statement as bound parameters, and documented once: the
//! struct they parse into is also their OpenAPI parameters.

use events::fields::{AgentStatus, AgentType};
use infra::http::{ApiError, QueryPairs};
use sqlx::{Postgres, QueryBuilder};
use utoipa::IntoParams;
use uuid::Uuid;

/// The filters shared by list, search and export. A field's doc comment is
/// its parameter's description in the spec.
#[derive(Debug, Default, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Filters {
    #[param(value_type = Option<infra::http::schema::AgentStatusName>, inline)]
    pub status: Option<AgentStatus>,
    #[param(rename = "type", value_type = Option<String>, pattern = "^[a-z0-9_-]{1,64}$")]
    pub agent_type: Option<AgentType>,
    pub project_id: Option<Uuid>,
    /// key:value; repeat for several (all must match)
    #[param(rename = "tag", value_type = Option<Vec<infra::http::schema::TagFilter>>, inline)]
    pub tags: serde_json::Map<String, serde_json::Value>,
}

impl Filters {
    pub const PARAMS: [&'static str; 4] = ["status", "type", "project_id", "tag"];

    pub fn parse(q: &QueryPairs) -> Result<Filters, ApiError> {
        let bad = |name: &str, e: events::FieldError| {
            ApiError::BadRequest(format!("query parameter {name:?}: {}", e.message))
        };
        let status = q
            .one("status")?
            .map(AgentStatus::parse)
            .transpose()
            .map_err(|e| bad("status", e))?;
        let agent_type = q
            .one("type")?
            .map(AgentType::parse)
            .transpose()
            .map_err(|e| bad("type", e))?;
        let project_id = q.parse::<Uuid>("project_id")?;
        let mut tags = serde_json::Map::new();
        for tag in q.all("tag") {
            let (k, v) = tag
                .split_once(':')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| {
                    ApiError::BadRequest(format!("tag filter {tag:?} must be key:value"))
                })?;
            // PostgreSQL text and jsonb cannot hold NUL: refuse it here
            // rather than fail in the database.
            if tag.contains('\0') {
                return Err(ApiError::BadRequest(
                    "tag filters must not contain NUL".into(),
                ));
            }
            tags.insert(k.to_owned(), serde_json::Value::String(v.to_owned()));
        }
        Ok(Filters {
            status,
            agent_type,
            project_id,
            tags,
        })
    }

    /// Appends `AND ...` for each filter; every value is a bound parameter.
    pub fn push_where(&self, qb: &mut QueryBuilder<Postgres>) {
        if let Some(s) = self.status {
            qb.push(" AND status = ").push_bind(s.as_str());
        }
        if let Some(t) = &self.agent_type {
            qb.push(" AND type = ").push_bind(t.as_str().to_owned());
        }
        if let Some(p) = self.project_id {
            qb.push(" AND project_id = ").push_bind(p);
        }
        if !self.tags.is_empty() {
            qb.push(" AND tags @> ")
                .push_bind(serde_json::Value::Object(self.tags.clone()));
        }
    }
}
