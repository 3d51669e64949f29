//! The agent write endpoints: parse at the boundary, decide, append.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use events::FieldError;
use events::agent::{AgentChanges, AgentCreated};
use events::fields::{AgentStatus, AgentType, Capabilities, Config, Description, Name, Tags};
use infra::auth::Editor;
use infra::http::{ApiError, ApiJson, ApiPath, Problem, ProblemItem, RequestId, X_EVENT_SEQ, etag};
use infra::views::AgentView;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::CommandState;
use crate::service::{AgentWrite, WriteContext};

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

/// Collects every field's verdict, so one 422 lists all that is wrong.
#[derive(Default)]
pub(crate) struct Verdicts(pub(crate) Vec<FieldError>);

impl Verdicts {
    pub(crate) fn check<T>(&mut self, r: Result<T, FieldError>) -> Option<T> {
        r.map_err(|e| self.0.push(e)).ok()
    }

    pub(crate) fn required<T>(&mut self, field: &str, v: Option<T>) -> Option<T> {
        if v.is_none() {
            self.0.push(FieldError::new(field, "is required"));
        }
        v
    }

    /// Parses an optional field: absent stays absent.
    pub(crate) fn optional<R, T>(
        &mut self,
        v: Option<R>,
        parse: impl FnOnce(R) -> Result<T, FieldError>,
    ) -> Option<T> {
        v.and_then(|raw| self.check(parse(raw)))
    }
}

/// Field errors as a 422.
pub(crate) fn invalid(errors: Vec<FieldError>) -> ApiError {
    ApiError::invalid(errors.into_iter().map(Into::into).collect())
}

impl CreateAgentRequest {
    /// Parses into the domain's validated types, or lists every bad field.
    pub fn parse(self) -> Result<AgentCreated, Vec<FieldError>> {
        let mut v = Verdicts::default();
        let name = v
            .required("name", self.name)
            .and_then(|n| v.check(Name::parse("name", &n)));
        let agent_type = v
            .required("type", self.agent_type)
            .and_then(|t| v.check(AgentType::parse(&t)));
        let description = match self.description {
            Some(d) => v.check(Description::parse(&d)),
            None => Some(Description::empty()),
        };
        let status = match self.status {
            Some(s) => v.check(AgentStatus::parse(&s)),
            None => Some(AgentStatus::default()),
        };
        let capabilities = v.check(Capabilities::parse(self.capabilities.unwrap_or_default()));
        let config = match self.config {
            Some(c) => v.check(Config::parse(c)),
            None => Some(Config::default()),
        };
        let tags = v.check(Tags::parse(self.tags.unwrap_or_default()));
        match (
            name,
            agent_type,
            description,
            status,
            capabilities,
            config,
            tags,
        ) {
            (
                Some(name),
                Some(agent_type),
                Some(description),
                Some(status),
                Some(capabilities),
                Some(config),
                Some(tags),
            ) if v.0.is_empty() => Ok(AgentCreated {
                name,
                agent_type,
                description,
                status,
                capabilities,
                config,
                tags,
                project_id: self.project_id,
            }),
            _ => Err(v.0),
        }
    }
}

/// The context of a write: the caller, the request id and the trace context.
pub(crate) fn write_context(
    actor: &str,
    request_id: &RequestId,
    headers: &HeaderMap,
) -> WriteContext {
    WriteContext {
        actor: actor.to_owned(),
        request_id: request_id.as_str().to_owned(),
        traceparent: headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= 128)
            .map(str::to_owned),
    }
}

/// A written agent as a response: body, `ETag`, `X-Event-Seq`.
pub(crate) fn written_response(
    status: StatusCode,
    written: &AgentWrite,
) -> Result<Response, ApiError> {
    let agent = written
        .state
        .live()
        .ok_or_else(|| ApiError::NotFound("no such agent".into()))?;
    let mut response = (status, Json(AgentView::from(agent))).into_response();
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag(agent.version));
    headers.insert(X_EVENT_SEQ.clone(), HeaderValue::from(written.seq));
    Ok(response)
}

/// 204 for a delete, with the sequence of its last event.
pub(crate) fn deleted_response(seq: u64) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    response
        .headers_mut()
        .insert(X_EVENT_SEQ.clone(), HeaderValue::from(seq));
    response
}

/// `If-Match: "<version>"` (a weak `W/` prefix is accepted). A value that
/// names no version can match nothing: 412.
pub(crate) fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let raw = value
        .to_str()
        .map_err(|_| ApiError::BadRequest("If-Match is not valid ASCII".into()))?
        .trim();
    if raw == "*" {
        return Ok(None);
    }
    if raw.contains(',') {
        return Err(ApiError::BadRequest("If-Match takes a single ETag".into()));
    }
    let tag = raw.strip_prefix("W/").unwrap_or(raw).trim_matches('"');
    tag.parse::<u64>().map(Some).map_err(|_| {
        ApiError::PreconditionFailed(format!("If-Match {raw} names no version of this resource"))
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
    Editor(claims): Editor,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateAgentRequest>,
) -> Result<Response, ApiError> {
    let created = body.parse().map_err(invalid)?;
    let ctx = write_context(&claims.sub, &request_id, &headers);
    let written = state.commands.create_agent(&ctx, created).await?;
    let mut response = written_response(StatusCode::CREATED, &written)?;
    if let Some(agent) = written.state.live()
        && let Ok(v) = HeaderValue::from_str(&format!("/api/v1/agents/{}", agent.id))
    {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

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
    #[serde(default)]
    #[schema(ignore)]
    pub id: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    #[schema(ignore)]
    pub version: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    #[schema(ignore)]
    pub created_at: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    #[schema(ignore)]
    pub updated_at: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    #[schema(ignore)]
    pub created_by: Option<serde::de::IgnoredAny>,
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
        if !v.0.is_empty() {
            return Err(v.0);
        }
        if changes.is_empty() {
            return Err(vec![FieldError::new(
                "body",
                "give at least one of name, type, description, status, capabilities, config, tags, project_id",
            )]);
        }
        Ok(changes)
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
    Editor(claims): Editor,
    Extension(request_id): Extension<RequestId>,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<UpdateAgentRequest>,
) -> Result<Response, ApiError> {
    let expected = if_match(&headers)?;
    let changes = body.parse().map_err(invalid)?;
    let ctx = write_context(&claims.sub, &request_id, &headers);
    let written = state
        .commands
        .update_agent(&ctx, id, expected, changes)
        .await?;
    written_response(StatusCode::OK, &written)
}

/// Delete an agent.
#[utoipa::path(delete, path = "/agents/{id}", tag = "agents",
    params(("id" = Uuid, Path), ("If-Match" = Option<String>, Header, nullable = false, pattern = r#"^(\*|(W/)?"[0-9]{1,19}")$"#)),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted", headers(("X-Event-Seq" = u64))),
        (status = 404, description = "Unknown or already deleted", body = Problem, content_type = "application/problem+json"),
        (status = 412, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete_agent(
    State(state): State<CommandState>,
    Editor(claims): Editor,
    Extension(request_id): Extension<RequestId>,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let expected = if_match(&headers)?;
    let ctx = write_context(&claims.sub, &request_id, &headers);
    let written = state.commands.delete_agent(&ctx, id, expected).await?;
    Ok(deleted_response(written.seq))
}

/// The body of `POST /agents/bulk`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkCreateRequest {
    /// 1..=1,000 create bodies.
    #[schema(value_type = Vec<CreateAgentRequest>, min_items = 1, max_items = 1000)]
    pub agents: Vec<serde_json::Value>,
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
    Editor(claims): Editor,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<BulkCreateRequest>,
) -> Result<Response, ApiError> {
    let n = body.agents.len();
    if !(1..=infra::event_store::MAX_BATCH).contains(&n) {
        return Err(ApiError::invalid_field(
            "agents",
            "must hold 1 to 1000 agents",
        ));
    }
    let mut items = Vec::with_capacity(n);
    let mut errors = Vec::new();
    for (index, raw) in body.agents.into_iter().enumerate() {
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
    let ctx = write_context(&claims.sub, &request_id, &headers);
    let (agents, last_seq) = state.commands.bulk_create(&ctx, items).await?;
    let items: Vec<AgentView> = agents.iter().map(AgentView::from).collect();
    let mut response = (
        StatusCode::CREATED,
        Json(BulkCreated {
            created: items.len(),
            items,
        }),
    )
        .into_response();
    response
        .headers_mut()
        .insert(X_EVENT_SEQ.clone(), HeaderValue::from(last_seq));
    Ok(response)
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
