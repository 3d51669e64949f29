//! What every agent and project write carries besides its body: an editor's
//! token, the context recorded in each event it appends (actor, request id,
//! trace context, and how a keyed write names what it appends) and an
//! optional `If-Match` precondition, which documents itself for the updates
//! and deletes that take it.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderValue, header};
use infra::http::auth::Editor;
use infra::http::{ApiError, RequestId};
use infra::telemetry::TraceHeaders;
use utoipa::IntoParams;

use crate::CommandState;
use crate::keyed::{Keyed, KeyedWrite};
use crate::repo::WriteContext;

/// An editor's write request. Extracting it refuses a missing or bad token
/// (401) and a role that may not write (403), before anything else.
#[derive(Debug)]
pub struct WriteRequest {
    /// Who writes, for which request and trace: recorded in every event.
    pub ctx: WriteContext,
    if_match: IfMatch,
}

/// The `If-Match` header of a write, as it came. Also its OpenAPI
/// parameter, bare (a doc comment on the field would be its description).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IfMatch {
    #[param(rename = "If-Match", value_type = Option<String>, nullable = false, pattern = r#"^(\*|(W/)?"[0-9]{1,19}")$"#)]
    value: Option<HeaderValue>,
}

impl FromRequestParts<CommandState> for WriteRequest {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &CommandState) -> Result<Self, ApiError> {
        let Editor(claims) = Editor::from_request_parts(parts, state).await?;
        // Set on every request by the request context middleware.
        let request_id = parts
            .extensions
            .get::<RequestId>()
            .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("the request has no request id")))?
            .as_str()
            .to_owned();
        Ok(WriteRequest {
            ctx: WriteContext {
                actor: claims.sub,
                request_id,
                trace: TraceHeaders::from_http(&parts.headers),
                // Set by the idempotency middleware on a keyed write.
                keyed: parts
                    .extensions
                    .get::<Keyed>()
                    .map(|k| Arc::new(KeyedWrite::new(k.clone()))),
            },
            if_match: IfMatch {
                value: parts.headers.get(header::IF_MATCH).cloned(),
            },
        })
    }
}

impl WriteRequest {
    /// The version `If-Match: "<version>"` expects (a weak `W/` prefix is
    /// accepted; `*` or no header expects none). A value that names no
    /// version can match nothing: 412.
    pub fn if_match(&self) -> Result<Option<u64>, ApiError> {
        let Some(value) = &self.if_match.value else {
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
            ApiError::PreconditionFailed(format!(
                "If-Match {raw} names no version of this resource"
            ))
        })
    }
}
