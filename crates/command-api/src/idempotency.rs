//! `Idempotency-Key` on every POST, PUT and DELETE of the write API.
//!
//! The first request with a key (per user) is served and its response
//! stored in PostgreSQL; a retry with the same key and the same request
//! within 24 hours gets that response back (with `Idempotent-Replayed:
//! true`) and appends nothing, also after a restart and long after
//! JetStream's duplicate window. The same key with a different request is a
//! 422; a retry while the first is still being served is a 409. 5xx answers
//! are not stored: the outcome is unknown, so a retry runs again.

use std::time::Duration;

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use infra::http::ApiError;
use infra::http::auth;
use sha2::{Digest, Sha256};

use crate::CommandState;

pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub static REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// How long a key is remembered.
const RETENTION: &str = "24 hours";
/// After this long, a first request that never finished (its process died)
/// no longer blocks retries.
const ABANDONED_AFTER: Duration = Duration::from_secs(60);

/// The response headers worth replaying.
const KEPT_HEADERS: [HeaderName; 4] = [
    header::CONTENT_TYPE,
    header::LOCATION,
    header::ETAG,
    HeaderName::from_static("x-event-seq"),
];

fn valid_key(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    (!s.is_empty() && s.len() <= 255 && s.bytes().all(|b| (0x21..0x7f).contains(&b)))
        .then(|| s.to_owned())
}

enum Claim {
    /// Ours to serve.
    Claimed,
    /// Already answered: here is the answer.
    Replay(Response),
}

pub async fn idempotency(State(state): State<CommandState>, req: Request, next: Next) -> Response {
    let writes = matches!(*req.method(), Method::POST | Method::PUT | Method::DELETE);
    let Some(raw_key) = req
        .headers()
        .get(&IDEMPOTENCY_KEY)
        .filter(|_| writes)
        .cloned()
    else {
        return next.run(req).await;
    };
    let Some(key) = valid_key(&raw_key) else {
        return ApiError::BadRequest(
            "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
        )
        .into_response();
    };
    let (mut parts, body) = req.into_parts();
    // Keys are per user. Without a valid token the handler answers 401
    // anyway; nothing to remember.
    let actor = match auth::authenticate(&mut parts, &state.auth) {
        Ok(claims) => claims.sub.clone(),
        Err(_) => return next.run(Request::from_parts(parts, body)).await,
    };
    let bytes = match to_bytes(body, state.http.bulk_body_limit).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::PayloadTooLarge("the request body is larger than allowed".into())
                .into_response();
        }
    };
    let hash = request_hash(
        &parts.method,
        parts.uri.path_and_query().map_or("", |p| p.as_str()),
        &bytes,
    );

    match claim(&state, &actor, &key, &hash).await {
        Ok(Claim::Claimed) => {}
        Ok(Claim::Replay(response)) => return response,
        Err(e) => return e.into_response(),
    }

    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let (parts, body) = response.into_parts();
    let body = to_bytes(body, usize::MAX).await.unwrap_or_default();
    if let Err(e) = remember(&state, &actor, &key, parts.status, &parts.headers, &body).await {
        tracing::warn!(error = %e, "could not store the idempotent response");
    }
    Response::from_parts(parts, Body::from(body))
}

fn request_hash(method: &Method, path: &str, body: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update(b"\n");
    h.update(path.as_bytes());
    h.update(b"\n");
    h.update(body);
    h.finalize().to_vec()
}

type StoredRow = (
    Vec<u8>,
    Option<i16>,
    Option<serde_json::Value>,
    Option<Vec<u8>>,
    bool,
    bool,
);

async fn claim(
    state: &CommandState,
    actor: &str,
    key: &str,
    hash: &[u8],
) -> Result<Claim, ApiError> {
    let pool = &state.pool;
    // Forget expired keys now and then; cheap with the index.
    if rand_percent() == 0 {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM idempotency_keys WHERE created_at < now() - interval '{RETENTION}'"
        )))
        .execute(pool)
        .await?;
    }
    for _ in 0..3 {
        let inserted = sqlx::query("INSERT INTO idempotency_keys (actor, key, request_hash) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(actor)
            .bind(key)
            .bind(hash)
            .execute(pool)
            .await?;
        if inserted.rows_affected() == 1 {
            return Ok(Claim::Claimed);
        }
        let row: Option<StoredRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT request_hash, status, headers, body, \
                    created_at < now() - interval '{RETENTION}', \
                    created_at < now() - make_interval(secs => {}) \
             FROM idempotency_keys WHERE actor = $1 AND key = $2",
            ABANDONED_AFTER.as_secs()
        )))
        .bind(actor)
        .bind(key)
        .fetch_optional(pool)
        .await?;
        let Some((stored_hash, status, headers, body, expired, abandoned)) = row else {
            continue; // deleted meanwhile: claim again
        };
        if expired {
            sqlx::query(
                "DELETE FROM idempotency_keys WHERE actor = $1 AND key = $2 AND request_hash = $3",
            )
            .bind(actor)
            .bind(key)
            .bind(&stored_hash)
            .execute(pool)
            .await?;
            continue;
        }
        if stored_hash != hash {
            return Err(ApiError::invalid_field(
                "Idempotency-Key",
                "this key was used for a different request; use a new key",
            ));
        }
        match status {
            Some(status) => return Ok(Claim::Replay(replay(status, headers, body))),
            None if abandoned => {
                let taken = sqlx::query(
                    "UPDATE idempotency_keys SET created_at = now() \
                     WHERE actor = $1 AND key = $2 AND status IS NULL AND created_at < now() - make_interval(secs => $3)",
                )
                .bind(actor)
                .bind(key)
                .bind(ABANDONED_AFTER.as_secs_f64())
                .execute(pool)
                .await?;
                if taken.rows_affected() == 1 {
                    return Ok(Claim::Claimed);
                }
            }
            None => {}
        }
        return Err(ApiError::Conflict(
            "a request with this Idempotency-Key is still being served; retry shortly".into(),
        ));
    }
    Err(ApiError::Conflict(
        "could not claim the Idempotency-Key; retry".into(),
    ))
}

fn replay(status: i16, headers: Option<serde_json::Value>, body: Option<Vec<u8>>) -> Response {
    let status = StatusCode::from_u16(status as u16).unwrap_or(StatusCode::OK);
    let mut response = Response::new(Body::from(body.unwrap_or_default()));
    *response.status_mut() = status;
    if let Some(serde_json::Value::Object(map)) = headers {
        for (name, value) in map {
            if let (Ok(n), Some(v)) = (HeaderName::try_from(name), value.as_str())
                && let Ok(v) = HeaderValue::from_str(v)
            {
                response.headers_mut().insert(n, v);
            }
        }
    }
    response
        .headers_mut()
        .insert(REPLAYED.clone(), HeaderValue::from_static("true"));
    response
}

async fn remember(
    state: &CommandState,
    actor: &str,
    key: &str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), sqlx::Error> {
    if status.is_server_error() {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE actor = $1 AND key = $2 AND status IS NULL",
        )
        .bind(actor)
        .bind(key)
        .execute(&state.pool)
        .await?;
        return Ok(());
    }
    let kept: serde_json::Map<String, serde_json::Value> = KEPT_HEADERS
        .iter()
        .filter_map(|n| {
            let v = headers.get(n)?.to_str().ok()?;
            Some((
                n.as_str().to_owned(),
                serde_json::Value::String(v.to_owned()),
            ))
        })
        .collect();
    sqlx::query("UPDATE idempotency_keys SET status = $3, headers = $4, body = $5 WHERE actor = $1 AND key = $2")
        .bind(actor)
        .bind(key)
        .bind(status.as_u16() as i16)
        .bind(serde_json::Value::Object(kept))
        .bind(body)
        .execute(&state.pool)
        .await?;
    Ok(())
}

fn rand_percent() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() % 100)
        .unwrap_or(1)
}
