//! The agent write endpoints: parse at the boundary, decide, append.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use events::agent::{AgentChanges, AgentCreated};
use events::fields::{AgentStatus, AgentType, Capabilities, Config, Description, Name, Tags};
use events::{AggregateType, FieldError};
use infra::http::{ApiError, ApiJson, ApiPath, Problem, ProblemItem};
use infra::views::AgentView;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::CommandState;
use crate::error::{TargetProblems, WriteError};
use crate::service::AgentWrite;
use crate::update_body::update_body;
use crate::verdicts::{Verdicts, invalid};
use crate::write_request::{IfMatch, WriteRequest};
use crate::write_response::{self, Written};

/// The body of `POST /agents`. Unknown fields are rejected (422).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAgentRequest {
    /// 1..=200 characters after trimming. Required.
    #[schema(schema_with = infra::http::schema::name, required = true)]
    pub name: Option<String>,
    /// 1..=64 characters of `[a-z0-9_-]`. Required.
    #[serde(rename = "type")]
    #[schema(schema_with = infra::http::schema::agent_type, required = true)]
    pub agent_type: Option<String>,
    /// At most 4,000 characters; default "".
    #[schema(schema_with = infra::http::schema::description)]
    pub description: Option<String>,
    /// `active` (default), `inactive`, `paused` or `error`.
    #[schema(value_type = infra::http::schema::AgentStatusName, required = false)]
    pub status: Option<String>,
    /// At most 64 strings of 1..=100 characters.
    #[schema(schema_with = infra::http::schema::capabilities)]
    pub capabilities: Option<Vec<String>>,
    /// A JSON object of at most 64 KiB.
    #[schema(schema_with = infra::http::schema::config)]
    pub config: Option<serde_json::Value>,
    /// At most 32 entries; keys 1..=64 characters without ':', values at
    /// most 256 characters.
    #[schema(schema_with = infra::http::schema::tags)]
    pub tags: Option<BTreeMap<String, String>>,
    /// An existing project, or null.
    pub project_id: Option<Uuid>,
}

impl CreateAgentRequest {
    /// Parses into the domain's validated types, or lists every bad field.
    pub fn parse(self) -> Result<AgentCreated, Vec<FieldError>> {
        let mut v = Verdicts::default();
        let name = v.required("name", self.name, |n| Name::parse("name", &n));
        let agent_type = v.required("type", self.agent_type, |t| AgentType::parse(&t));
        let description = v.defaulted(self.description, Description::empty, |d| {
            Description::parse(&d)
        });
        let status = v.defaulted(self.status, AgentStatus::default, |s| {
            AgentStatus::parse(&s)
        });
        let capabilities = v.check(Capabilities::parse(self.capabilities.unwrap_or_default()));
        let config = v.defaulted(self.config, Config::default, Config::parse);
        let tags = v.check(Tags::parse(self.tags.unwrap_or_default()));
        v.created(|| {
            Some(AgentCreated {
                name: name?,
                agent_type: agent_type?,
                description: description?,
                status: status?,
                capabilities: capabilities?,
                config: config?,
                tags: tags?,
                project_id: self.project_id,
            })
        })
    }
}

/// A written agent as its endpoint answers it. The service returns only
/// live agents from a create or an update.
fn written(committed: &AgentWrite) -> Result<Written<AgentView>, WriteError> {
    let agent = committed
        .state
        .live()
        .ok_or(WriteError::NotFound(AggregateType::Agent))?;
    Ok(Written {
        id: agent.id,
        view: AgentView::from(agent),
        version: agent.version,
        seq: committed.seq,
    })
}

/// Create an agent.
#[utoipa::path(post, path = "/agents", tag = "agents",
    request_body = CreateAgentRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created", body = AgentView,
            headers(("Location" = String), ("ETag" = String), ("X-Event-Seq" = u64))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or bad token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Role may not write", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "NATS unreachable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_agent(
    State(state): State<CommandState>,
    write: WriteRequest,
    ApiJson(body): ApiJson<CreateAgentRequest>,
) -> Result<Response, ApiError> {
    let created = body.parse().map_err(invalid)?;
    let agent = state.commands.create_agent(&write.ctx, created).await?;
    Ok(written(&agent)?.created("/api/v1/agents"))
}

update_body! {
/// The body of `PUT /agents/{id}`: any non-empty subset of the mutable
/// fields. The read-only fields of an agent (`id`, `version`, `created_at`,
/// `updated_at`, `created_by`) are accepted and ignored, so a client may
/// send back what it read; any other unknown field is a 422.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1)]
pub struct UpdateAgentRequest {
    #[schema(schema_with = infra::http::schema::name)]
    pub name: Option<String>,
    #[serde(rename = "type")]
    #[schema(schema_with = infra::http::schema::agent_type)]
    pub agent_type: Option<String>,
    #[schema(schema_with = infra::http::schema::description)]
    pub description: Option<String>,
    #[schema(value_type = infra::http::schema::AgentStatusName, required = false)]
    pub status: Option<String>,
    #[schema(schema_with = infra::http::schema::capabilities)]
    pub capabilities: Option<Vec<String>>,
    #[schema(schema_with = infra::http::schema::config)]
    pub config: Option<serde_json::Value>,
    #[schema(schema_with = infra::http::schema::tags)]
    pub tags: Option<BTreeMap<String, String>>,
    /// An existing project, or null to leave the current one.
    #[serde(default, with = "events::agent::double_option")]
    #[schema(value_type = Option<Uuid>)]
    pub project_id: Option<Option<Uuid>>,
}
read_only: id, version, created_at, updated_at, created_by
}

impl UpdateAgentRequest {
    /// Parses into the changes asked for, or lists every bad field.
    pub fn parse(self) -> Result<AgentChanges, Vec<FieldError>> {
        let mut v = Verdicts::default();
        let changes = AgentChanges {
            name: v.optional(self.name, |n| Name::parse("name", &n)),
            agent_type: v.optional(self.agent_type, |t| AgentType::parse(&t)),
            description: v.optional(self.description, |d| Description::parse(&d)),
            status: v.optional(self.status, |s| AgentStatus::parse(&s)),
            capabilities: v.optional(self.capabilities, Capabilities::parse),
            config: v.optional(self.config, Config::parse),
            tags: v.optional(self.tags, Tags::parse),
            project_id: self.project_id,
        };
        v.changes(
            changes,
            "name, type, description, status, capabilities, config, tags, project_id",
        )
    }
}

/// Update an agent.
#[utoipa::path(put, path = "/agents/{id}", tag = "agents",
    params(("id" = Uuid, Path), ("If-Match" = Option<String>, Header, nullable = false, pattern = r#"^(\*|(W/)?"[0-9]{1,19}")$"#, description = "412 unless the agent is at this version")),
    request_body = UpdateAgentRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The agent after the update; a body that changes nothing appends no event",
            body = AgentView, headers(("ETag" = String), ("X-Event-Seq" = u64))),
        (status = 404, description = "Unknown or deleted", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Concurrent writers kept winning", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Stale If-Match", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn update_agent(
    State(state): State<CommandState>,
    write: WriteRequest,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<UpdateAgentRequest>,
) -> Result<Response, ApiError> {
    let expected = write.if_match();
    let changes = body.parse().map_err(invalid)?;
    let agent = state
        .commands
        .update_agent(&write.ctx, id.into(), expected.as_deref(), changes)
        .await?;
    Ok(written(&agent)?.updated())
}

/// Delete an agent.
#[utoipa::path(delete, path = "/agents/{id}", tag = "agents",
    params(("id" = Uuid, Path), IfMatch),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted", headers(("X-Event-Seq" = u64))),
        TargetProblems,
        (status = 404, description = "Unknown or already deleted", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete_agent(
    State(state): State<CommandState>,
    write: WriteRequest,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Response, ApiError> {
    let expected = write.if_match();
    let deleted = state
        .commands
        .delete_agent(&write.ctx, id.into(), expected.as_deref())
        .await?;
    Ok(write_response::deleted(deleted.seq))
}

/// The body of `POST /agents/bulk`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkCreateRequest {
    /// 1..=1,000 create bodies.
    #[schema(value_type = Vec<CreateAgentRequest>, min_items = 1, max_items = 1000)]
    pub agents: BulkItems,
}

/// The items of a bulk request, each kept as JSON so that every bad one
/// can be reported with its index. Parsing refuses an array longer than
/// [`infra::event_store::MAX_BATCH`] the moment its next item begins: a
/// body of millions of tiny items (`[0,0,…]`) would otherwise become
/// millions of JSON values, many times the body's own size, before the
/// count was checked.
#[derive(Debug)]
pub struct BulkItems(pub Vec<serde_json::Value>);

/// What a bulk request must hold; the message of the 422 for any other
/// count.
const BULK_COUNT: &str = "must hold 1 to 1000 agents";

impl<'de> Deserialize<'de> for BulkItems {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Items;

        impl<'de> serde::de::Visitor<'de> for Items {
            type Value = BulkItems;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of agents")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<BulkItems, A::Error> {
                let max = infra::event_store::MAX_BATCH;
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(max));
                while items.len() < max {
                    match seq.next_element()? {
                        Some(item) => items.push(item),
                        None => return Ok(BulkItems(items)),
                    }
                }
                // One more item is one too many; it is skipped, not kept.
                match seq.next_element::<serde::de::IgnoredAny>()? {
                    Some(_) => Err(serde::de::Error::custom(BULK_COUNT)),
                    None => Ok(BulkItems(items)),
                }
            }
        }

        deserializer.deserialize_seq(Items)
    }
}

#[derive(Debug, serde::Serialize, ToSchema)]
pub struct BulkCreated {
    pub created: usize,
    pub items: Vec<AgentView>,
}

/// Create up to 1,000 agents, all or nothing.
#[utoipa::path(post, path = "/agents/bulk", tag = "agents",
    request_body = BulkCreateRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, body = BulkCreated, headers(("X-Event-Seq" = u64, description = "Sequence of the last event"))),
        (status = 413, body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Any invalid item: each bad `index` is listed and nothing is appended",
            body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn bulk_create(
    State(state): State<CommandState>,
    write: WriteRequest,
    ApiJson(body): ApiJson<BulkCreateRequest>,
) -> Result<Response, ApiError> {
    let BulkItems(agents) = body.agents;
    let n = agents.len();
    if !(1..=infra::event_store::MAX_BATCH).contains(&n) {
        return Err(ApiError::invalid_field("agents", BULK_COUNT));
    }
    let mut items = Vec::with_capacity(n);
    let mut errors = Vec::new();
    for (index, raw) in agents.into_iter().enumerate() {
        let parsed = serde_json::from_value::<CreateAgentRequest>(raw)
            .map_err(|e| vec![FieldError::new("body", e.to_string())])
            .and_then(CreateAgentRequest::parse);
        match parsed {
            Ok(created) => items.push(created),
            Err(bad) => errors.extend(bad.into_iter().map(|e| ProblemItem {
                field: Some(e.field),
                index: Some(index),
                message: e.message,
            })),
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let (agents, last_seq) = state.commands.bulk_create(&write.ctx, items).await?;
    let items: Vec<AgentView> = agents.iter().map(AgentView::from).collect();
    let created = Json(BulkCreated {
        created: items.len(),
        items,
    });
    Ok(write_response::with_event_seq(
        (StatusCode::CREATED, created).into_response(),
        last_seq,
    ))
}

pub fn router(bulk_body_limit: usize) -> OpenApiRouter<CommandState> {
    OpenApiRouter::new()
        .routes(routes!(create_agent))
        .routes(routes!(update_agent, delete_agent))
        .merge(
            OpenApiRouter::new()
                .routes(routes!(bulk_create))
                .layer(axum::extract::DefaultBodyLimit::max(bulk_body_limit)),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: serde_json::Value) -> CreateAgentRequest {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn defaults_apply() {
        let c = req(serde_json::json!({"name": " a ", "type": "llm"}))
            .parse()
            .unwrap();
        assert_eq!(c.name.as_str(), "a");
        assert_eq!(c.status, AgentStatus::Active);
        assert_eq!(c.description.as_str(), "");
    }

    #[test]
    fn every_bad_field_is_listed() {
        let errors = req(serde_json::json!({"type": "LLM", "status": "sleeping", "config": []}))
            .parse()
            .unwrap_err();
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["name", "type", "status", "config"]);
    }
}
