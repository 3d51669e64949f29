//! `POST /agents`: parse at the boundary, decide, append.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use events::FieldError;
use events::agent::AgentCreated;
use events::fields::{AgentStatus, AgentType, Capabilities, Config, Description, Name, Tags};
use infra::auth::Editor;
use infra::http::{ApiError, ApiJson, Problem, RequestId, X_EVENT_SEQ, etag};
use infra::views::AgentView;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::CommandState;
use crate::service::{WriteContext, Written};

/// The body of `POST /agents`. Unknown fields are rejected (422).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAgentRequest {
    /// 1..=200 characters after trimming. Required.
    pub name: Option<String>,
    /// 1..=64 characters of `[a-z0-9_-]`. Required.
    #[serde(rename = "type")]
    pub agent_type: Option<String>,
    /// At most 4,000 characters; default "".
    pub description: Option<String>,
    /// `active` (default), `inactive`, `paused` or `error`.
    pub status: Option<String>,
    /// At most 64 strings of 1..=100 characters.
    pub capabilities: Option<Vec<String>>,
    /// A JSON object of at most 64 KiB.
    #[schema(value_type = Option<Object>)]
    pub config: Option<serde_json::Value>,
    /// At most 32 entries; keys 1..=64 characters without ':', values at
    /// most 256 characters.
    pub tags: Option<BTreeMap<String, String>>,
    /// An existing project, or null.
    pub project_id: Option<Uuid>,
}

/// Collects every field's verdict, so one 422 lists all that is wrong.
#[derive(Default)]
struct Verdicts(Vec<FieldError>);

impl Verdicts {
    fn check<T>(&mut self, r: Result<T, FieldError>) -> Option<T> {
        r.map_err(|e| self.0.push(e)).ok()
    }

    fn required<T>(&mut self, field: &str, v: Option<T>) -> Option<T> {
        if v.is_none() {
            self.0.push(FieldError::new(field, "is required"));
        }
        v
    }
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
pub(crate) fn written_response(status: StatusCode, written: &Written) -> Response {
    let mut response = (status, Json(AgentView::from(&written.agent))).into_response();
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag(written.agent.version));
    headers.insert(X_EVENT_SEQ.clone(), HeaderValue::from(written.seq));
    response
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
    let created = body
        .parse()
        .map_err(|errors| ApiError::invalid(errors.into_iter().map(Into::into).collect()))?;
    let ctx = write_context(&claims.sub, &request_id, &headers);
    let written = state.service.create(&ctx, created).await?;
    let mut response = written_response(StatusCode::CREATED, &written);
    let location = format!("/api/v1/agents/{}", written.agent.id);
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

pub fn router() -> OpenApiRouter<CommandState> {
    OpenApiRouter::new().routes(routes!(create_agent))
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
