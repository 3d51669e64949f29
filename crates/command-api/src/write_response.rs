//! How a write is answered: with the resource it wrote (or 204 for a
//! delete), and always with the sequence of its last event in
//! `X-Event-Seq`, which a client passes as `X-Min-Event-Seq` to read its own
//! write.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use infra::http::{X_EVENT_SEQ, etag};
use serde::Serialize;
use uuid::Uuid;

/// A resource as a write left it.
pub(crate) struct Written<V> {
    pub id: Uuid,
    /// The body.
    pub view: V,
    /// The resource's version, sent as its `ETag`.
    pub version: u64,
    /// The sequence of the write's last event (the current one when the
    /// write appended nothing).
    pub seq: u64,
}

impl<V: Serialize> Written<V> {
    /// 200 with the resource, its `ETag` and `X-Event-Seq`.
    pub(crate) fn updated(self) -> Response {
        self.respond(StatusCode::OK)
    }

    /// 201 with the resource, its `ETag`, `X-Event-Seq` and its `Location`
    /// in `collection` (say, `/api/v1/agents`).
    pub(crate) fn created(self, collection: &str) -> Response {
        let location = format!("{collection}/{}", self.id);
        let mut response = self.respond(StatusCode::CREATED);
        if let Ok(v) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(header::LOCATION, v);
        }
        response
    }

    fn respond(self, status: StatusCode) -> Response {
        let mut response = (status, Json(self.view)).into_response();
        response
            .headers_mut()
            .insert(header::ETAG, etag(self.version));
        with_event_seq(response, self.seq)
    }
}

/// 204 for a delete.
pub(crate) fn deleted(seq: u64) -> Response {
    with_event_seq(StatusCode::NO_CONTENT.into_response(), seq)
}

/// `response` with `X-Event-Seq: seq`.
pub(crate) fn with_event_seq(mut response: Response, seq: u64) -> Response {
    response
        .headers_mut()
        .insert(X_EVENT_SEQ.clone(), HeaderValue::from(seq));
    response
}
