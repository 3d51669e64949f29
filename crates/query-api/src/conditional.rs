//! Conditional GET for single resources: an `ETag` on every answer, and 304
//! when the reader already holds that version (`If-None-Match`); and how a
//! single resource's read documents its parameters and answers.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use infra::http::Problem;
use utoipa::{IntoParams, IntoResponses};

use crate::projection::with_projection_seq;

/// A single resource's `min_seq`, documented with a description (the
/// lists show [`MinSeq`](crate::projection::MinSeq) bare). A field's doc
/// comment is its description.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ResourceQuery {
    /// Answer only once the projection has applied this event
    pub min_seq: Option<u64>,
}

/// A single resource's headers: `X-Min-Event-Seq`, described as above,
/// and `If-None-Match`.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct ResourceHeaders {
    /// Same as min_seq
    #[param(rename = "X-Min-Event-Seq", nullable = false)]
    pub x_min_event_seq: Option<u64>,
    /// 304 when the ETag matches
    #[param(rename = "If-None-Match", nullable = false)]
    pub if_none_match: Option<String>,
}

/// What a single resource's read answers besides the resource itself and
/// the [problems](crate::problems) the reads share. A variant's doc comment
/// is its description.
#[derive(Debug, IntoResponses)]
pub enum ResourceResponses {
    /// Not modified
    #[response(status = 304)]
    NotModified,
    /// Unknown or deleted
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(Problem),
}

/// A single-resource answer with its `ETag` and `X-Projection-Seq`, or 304
/// when `If-None-Match` names the tag.
pub(crate) fn conditional(
    headers: &HeaderMap,
    tag: HeaderValue,
    body: impl IntoResponse,
    seq: u64,
) -> Response {
    let not_modified = headers.get(header::IF_NONE_MATCH).is_some_and(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii() == tag.as_bytes() || t.trim_ascii() == b"*")
    });
    let mut response = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        body.into_response()
    };
    response.headers_mut().insert(header::ETAG, tag);
    with_projection_seq(response, seq)
}
