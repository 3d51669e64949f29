//! Conditional GET for single resources: an `ETag` on every answer, and 304
//! when the reader already holds that version (`If-None-Match`).

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::projection::with_projection_seq;

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
