//! What every agent and project write carries besides its body: an editor's
//! token, the context recorded in each event it appends (actor, request id,
//! trace context, and how a keyed write names what it appends) and an
//! optional `If-Match` precondition (RFC 9110: `*` or a list of entity
//! tags, compared strongly; a malformed value is a 400), which documents
//! itself for the updates and deletes that take it.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use infra::http::auth::Editor;
use infra::http::preconditions::EntityTags;
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
    #[param(rename = "If-Match", value_type = Option<String>, nullable = false, pattern = r#"^(\*|(W/)?"[0-9]{1,19}"( *, *(W/)?"[0-9]{1,19}")*)$"#)]
    value: Option<EntityTags>,
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
                value: EntityTags::from_headers(&parts.headers, &header::IF_MATCH)
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?,
            },
        })
    }
}

impl WriteRequest {
    /// The versions `If-Match` accepts, compared strongly as RFC 9110 says:
    /// `None` without the header or for `*`; else the versions its strong
    /// tags name (`"3"`), possibly none, since a weak tag (`W/"3"`) or one
    /// naming no version never matches: 412.
    pub fn if_match(&self) -> Option<Vec<u64>> {
        self.if_match
            .value
            .as_ref()
            .and_then(EntityTags::strong_versions)
    }
}
