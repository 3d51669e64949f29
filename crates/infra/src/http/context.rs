//! The middleware every request passes through first: request id, span,
//! access log, and the final rendering of problem documents.

use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::error::{PROBLEM_JSON, PendingProblem, Problem, slug_and_title};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The id of the request being served: the client's `X-Request-Id` when it
/// sent a sane one, else a new UUID v7. Stored in each event's metadata.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

impl RequestId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A client's request id is echoed only when it is short printable ASCII,
/// so it cannot smuggle anything into logs or headers.
fn client_request_id(value: &HeaderValue) -> Option<String> {
    let s = value.to_str().ok()?;
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    ok.then(|| s.to_owned())
}

/// Gives the request its id and span, and finishes the response: the
/// `X-Request-Id` header, and a problem+json body for every error.
pub async fn request_context(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(client_request_id)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let path = req.uri().path().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().clone();
    let in_flight = crate::metrics::InFlight::enter();
    req.extensions_mut().insert(RequestId(id.clone()));

    let span = tracing::info_span!(
        "http",
        // Trace backends index span names: bounded like the metrics.
        otel.name = %format!("{} {route}", crate::metrics::method_label(method.as_str())),
        otel.kind = "server",
        %method,
        route = %route,
        request_id = %id,
        trace_id = tracing::field::Empty,
        status = tracing::field::Empty,
    );
    // Continue the caller's trace when it sent a W3C trace context.
    crate::telemetry::continue_trace(&span, &opentelemetry_http::HeaderExtractor(req.headers()));
    if let Some(trace_id) = span.in_scope(crate::telemetry::current_trace_id) {
        span.record("trace_id", trace_id);
    }
    let response = if header_bytes(&req) > MAX_HEADER_BYTES {
        too_large_headers()
    } else {
        next.run(req).instrument(span.clone()).await
    };
    let mut response = finish_problem(response, &path, &id);
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(X_REQUEST_ID.clone(), v);
    }
    let status = response.status().as_u16();
    span.record("status", status);
    let elapsed = started.elapsed();
    drop(in_flight);
    crate::metrics::record_http(method.as_str(), &route, status, elapsed);
    let elapsed_ms = elapsed.as_secs_f64() * 1e3;
    span.in_scope(|| {
        if status >= 500 {
            tracing::warn!(status, elapsed_ms, "request failed");
        } else {
            tracing::debug!(status, elapsed_ms, "request served");
        }
    });
    response
}

/// The most header bytes a request may carry (names and values together).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

fn header_bytes(req: &Request) -> usize {
    req.headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum()
}

fn too_large_headers() -> Response {
    let mut response = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE.into_response();
    response
        .extensions_mut()
        .insert(super::error::PendingProblem {
            slug: "headers-too-large",
            title: "Request header fields too large",
            detail: format!("the request headers exceed {MAX_HEADER_BYTES} bytes"),
            errors: None,
        });
    response
}

/// Renders a pending problem, or converts an error response that is not yet
/// problem+json (axum's own rejections, limits, timeouts). `path` and
/// `request_id` are the request's, for `instance` and `request_id`. Also
/// used by the idempotency middleware, which stores a response as the
/// client receives it.
pub fn finish_problem(mut response: Response, path: &str, request_id: &str) -> Response {
    let status = response.status();
    let pending = response.extensions_mut().remove::<PendingProblem>();
    let pending = match pending {
        Some(p) => p,
        None if is_error(status) && !is_json(&response) => {
            let (slug, title) = slug_and_title(status);
            PendingProblem {
                slug,
                title,
                detail: title.to_owned(),
                errors: None,
            }
        }
        None => return response,
    };
    let problem = Problem {
        problem_type: format!("urn:ymera:problem:{}", pending.slug),
        title: pending.title.to_owned(),
        status: status.as_u16(),
        detail: pending.detail,
        instance: path.to_owned(),
        request_id: request_id.to_owned(),
        errors: pending.errors,
    };
    let body = serde_json::to_vec(&problem).unwrap_or_default();
    let (mut parts, _) = response.into_parts();
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

fn is_error(status: StatusCode) -> bool {
    status.is_client_error() || status.is_server_error()
}

/// Whether an error response already speaks JSON: a problem, or a
/// deliberate JSON body such as `/health`'s 503. Anything else (empty,
/// plain text, HTML) is turned into a problem.
fn is_json(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| {
            let v = v.as_bytes();
            v.starts_with(PROBLEM_JSON.as_bytes()) || v.starts_with(b"application/json")
        })
}

/// The fallback for unknown routes: a problem, not an empty 404.
pub async fn not_found() -> Response {
    super::ApiError::NotFound("no such endpoint".into()).into_response()
}
