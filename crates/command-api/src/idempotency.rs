//! `Idempotency-Key` on every POST, PUT and DELETE of the write API.
//!
//! The first request with a key (per user) is served and its response
//! stored in PostgreSQL exactly as the client received it (status, the
//! headers that matter, the body: a problem with its `errors`, its
//! `instance` and the first request's `request_id`); a retry with the same
//! key and the same request within 24 hours gets that response back (with
//! `Idempotent-Replayed: true`) and appends nothing, also after a restart and
//! long after JetStream's duplicate window. The same key with a different
//! request is a 422; a retry while the first is still being served is a 409.
//!
//! A key that cannot be recorded (PostgreSQL unreachable) refuses the write
//! with 503 before anything is appended.
//!
//! What the write appends is named from the key (see `keyed`), so an outcome
//! that is unknown is not forgotten: a 5xx, or a request dropped before it
//! was answered (the request timeout), leaves the key marked `unknown`, and
//! a retry runs the same write under the same names, which finds in the log
//! whatever the first attempt stored and answers as its success would have.
//! A 409 is a verdict on a moment (other writers won the race), so it is not
//! remembered: the key is released and a retry runs again.

use std::time::Duration;

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use infra::http::{ApiError, RequestId, auth, finish_problem};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::CommandState;
use crate::keyed::Keyed;

pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub static REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// How long a key is remembered.
const RETENTION: &str = "24 hours";
/// After this long, an attempt that never settled (its process died, or its
/// response could not be stored) no longer blocks retries: the next one runs
/// as a retry whose outcome is unknown.
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

/// A key claimed for the attempt now being served.
struct Claimed {
    /// When the key was first used, in Unix milliseconds.
    first_used_ms: u64,
    /// Whether an earlier attempt may have stored the write.
    retry: bool,
}

enum Claim {
    /// Ours to serve.
    Claimed(Claimed),
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
    let actor = match auth::authenticate(&mut parts, &state.auth).await {
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

    let claimed = match claim(&state, &actor, &key, &hash).await {
        Ok(Claim::Claimed(claimed)) => claimed,
        Ok(Claim::Replay(response)) => return response,
        Err(e) => return e.into_response(),
    };
    let mut unsettled = Unsettled(Some((state.pool.clone(), actor.clone(), key.clone())));
    parts.extensions.insert(Keyed::new(
        &actor,
        &key,
        &hash,
        claimed.first_used_ms,
        claimed.retry,
    ));
    let path = parts.uri.path().to_owned();
    let request_id = parts
        .extensions
        .get::<RequestId>()
        .map(|id| id.as_str().to_owned())
        .unwrap_or_default();

    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    // As the client receives it: a problem's body is written now, so that a
    // replay gives it whole.
    let response = finish_problem(response, &path, &request_id);
    let (parts, body) = response.into_parts();
    let body = to_bytes(body, usize::MAX).await.unwrap_or_default();
    if let Err(e) = settle(&state, &actor, &key, parts.status, &parts.headers, &body).await {
        // The key stays claimed: a retry is refused (409) until the claim
        // is abandoned, then runs again and finds this write in the log.
        tracing::warn!(error = %e, "could not store the idempotent response");
    }
    unsettled.0 = None;
    Response::from_parts(parts, Body::from(body))
}

/// A claimed key whose attempt has not been settled. Dropped unsettled (the
/// request timeout fired, or the client went away and the handler was
/// cancelled, maybe after its append), it marks the outcome unknown, so a
/// retry may take the key over at once.
struct Unsettled(Option<(PgPool, String, String)>);

impl Drop for Unsettled {
    fn drop(&mut self) {
        if let Some((pool, actor, key)) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                if let Err(e) = mark_unknown(&pool, &actor, &key).await {
                    tracing::warn!(error = %e, "could not mark an unanswered write unknown");
                }
            });
        }
    }
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

#[derive(sqlx::FromRow)]
struct StoredRow {
    request_hash: Vec<u8>,
    status: Option<i16>,
    headers: Option<serde_json::Value>,
    body: Option<Vec<u8>>,
    unknown: bool,
    expired: bool,
    abandoned: bool,
    first_used_ms: i64,
}

/// `created_at` in Unix milliseconds, as SQL.
const FIRST_USED_MS: &str = "(extract(epoch FROM created_at) * 1000)::bigint";

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
        let inserted: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "INSERT INTO idempotency_keys (actor, key, request_hash) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING RETURNING {FIRST_USED_MS}"
        )))
        .bind(actor)
        .bind(key)
        .bind(hash)
        .fetch_optional(pool)
        .await?;
        if let Some(ms) = inserted {
            return Ok(Claim::Claimed(Claimed {
                first_used_ms: ms.max(0) as u64,
                retry: false,
            }));
        }
        let row: Option<StoredRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT request_hash, status, headers, body, unknown, \
                    created_at < now() - interval '{RETENTION}' AS expired, \
                    claimed_at < now() - make_interval(secs => {}) AS abandoned, \
                    {FIRST_USED_MS} AS first_used_ms \
             FROM idempotency_keys WHERE actor = $1 AND key = $2",
            ABANDONED_AFTER.as_secs()
        )))
        .bind(actor)
        .bind(key)
        .fetch_optional(pool)
        .await?;
        let Some(row) = row else {
            continue; // deleted meanwhile: claim again
        };
        if row.expired {
            sqlx::query(
                "DELETE FROM idempotency_keys WHERE actor = $1 AND key = $2 AND request_hash = $3",
            )
            .bind(actor)
            .bind(key)
            .bind(&row.request_hash)
            .execute(pool)
            .await?;
            continue;
        }
        if row.request_hash != hash {
            return Err(ApiError::invalid_field(
                "Idempotency-Key",
                "this key was used for a different request; use a new key",
            ));
        }
        if let Some(status) = row.status {
            return Ok(Claim::Replay(replay(status, row.headers, row.body)));
        }
        if row.unknown || row.abandoned {
            // The earlier attempt may or may not have stored the write: run
            // it again under the same names.
            let taken = sqlx::query(
                "UPDATE idempotency_keys SET unknown = false, claimed_at = now() \
                 WHERE actor = $1 AND key = $2 AND status IS NULL \
                   AND (unknown OR claimed_at < now() - make_interval(secs => $3))",
            )
            .bind(actor)
            .bind(key)
            .bind(ABANDONED_AFTER.as_secs_f64())
            .execute(pool)
            .await?;
            if taken.rows_affected() == 1 {
                return Ok(Claim::Claimed(Claimed {
                    first_used_ms: row.first_used_ms.max(0) as u64,
                    retry: true,
                }));
            }
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

/// Records how the attempt ended: its response, to be replayed; or, for a
/// 5xx, that its outcome is unknown; or, for a 409, nothing at all.
async fn settle(
    state: &CommandState,
    actor: &str,
    key: &str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), sqlx::Error> {
    if status.is_server_error() {
        return mark_unknown(&state.pool, actor, key).await;
    }
    if status == StatusCode::CONFLICT {
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
    sqlx::query(
        "UPDATE idempotency_keys SET status = $3, headers = $4, body = $5, unknown = false \
         WHERE actor = $1 AND key = $2",
    )
    .bind(actor)
    .bind(key)
    .bind(status.as_u16() as i16)
    .bind(serde_json::Value::Object(kept))
    .bind(body)
    .execute(&state.pool)
    .await?;
    Ok(())
}

/// Marks the key's attempt as ended without a known outcome.
async fn mark_unknown(pool: &PgPool, actor: &str, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE idempotency_keys SET unknown = true \
         WHERE actor = $1 AND key = $2 AND status IS NULL",
    )
    .bind(actor)
    .bind(key)
    .execute(pool)
    .await?;
    Ok(())
}

fn rand_percent() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() % 100)
        .unwrap_or(1)
}
