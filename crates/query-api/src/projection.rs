//! Where a read stands in the log: every statement joins the projection's
//! checkpoint so the data and its sequence come from one snapshot, every
//! answer says that sequence (`X-Projection-Seq`), and a reader that needs
//! its own writes is answered only once the projection has got as far as it
//! asks (`X-Min-Event-Seq` or `?min_seq=`). On a partitioned projection
//! that sequence is the lowest of the partitions' watermarks (see
//! `infra::projection`).

use std::sync::LazyLock;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use infra::http::{ApiError, QueryPairs, X_PROJECTION_SEQ, min_seq};
use infra::projection::{ProjectionWatch, WATERMARK_SQL};
use sqlx::Row;
use sqlx::postgres::PgRow;
use utoipa::IntoParams;

use crate::QueryState;
use crate::params::Params;

/// The live projection's checkpoint as one row `c` with the column `seq`,
/// to join the data against so both come from one snapshot: the lowest
/// watermark of its partitions, up to which every event is applied.
pub(crate) static CHECKPOINT: LazyLock<String> =
    LazyLock::new(|| format!("(SELECT ({WATERMARK_SQL}) AS seq) c"));

/// The `projection_seq` column of a row joined to [`CHECKPOINT`].
pub(crate) fn projection_seq(row: &PgRow) -> Result<u64, sqlx::Error> {
    Ok(row.try_get::<i64, _>("projection_seq")?.max(0) as u64)
}

/// Honours `X-Min-Event-Seq` / `?min_seq=` before reading.
pub(crate) async fn await_min_seq(
    state: &QueryState,
    headers: &HeaderMap,
    query: &QueryPairs,
) -> Result<(), ApiError> {
    await_min_seq_on(&state.watch, state, headers, query).await
}

/// Honours `X-Min-Event-Seq` / `?min_seq=` on the checkpoint `watch`
/// follows: the projection's, or the search index's.
pub(crate) async fn await_min_seq_on(
    watch: &ProjectionWatch,
    state: &QueryState,
    headers: &HeaderMap,
    query: &QueryPairs,
) -> Result<(), ApiError> {
    let Some(seq) = min_seq(headers, query)? else {
        return Ok(());
    };
    let wait = watch.wait_for(seq, state.http.min_seq_wait());
    tokio::pin!(wait);
    if seq > watch.current() {
        // A sequence past the end of the log can never be reached: say so
        // at once instead of waiting out the timeout. The end is asked for
        // beside the wait, not before it: it is a round trip to NATS (tens
        // of milliseconds on a busy server) that a wait over first need not
        // pay.
        tokio::select! {
            biased;
            reached = &mut wait => {
                reached?;
                return Ok(());
            }
            end = state.store.last_seq() => {
                let end = end?;
                if seq > end {
                    return Err(ApiError::BadRequest(format!(
                        "min_seq {seq} is beyond the end of the log ({end})"
                    )));
                }
            }
        }
    }
    wait.await?;
    Ok(())
}

/// An answer with the sequence its data reflects in `X-Projection-Seq`.
pub(crate) fn with_projection_seq(response: impl IntoResponse, seq: u64) -> Response {
    let mut response = response.into_response();
    response
        .headers_mut()
        .insert(X_PROJECTION_SEQ.clone(), HeaderValue::from(seq));
    response
}

/// What a read handler starts from: its query parameters, every one
/// checked, and the projection caught up with the request's `min_seq`.
///
/// The parameters are checked first, so a bad request is a 400 at once
/// rather than after the wait.
#[derive(Debug)]
pub struct Fresh<P>(pub P);

impl<P: Params> FromRequestParts<QueryState> for Fresh<P> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &QueryState,
    ) -> Result<Self, Self::Rejection> {
        let query = QueryPairs::from_request_parts(parts, state).await?;
        let params = P::parse(&query)?;
        await_min_seq(state, &parts.headers, &query).await?;
        Ok(Fresh(params))
    }
}

/// `?min_seq=`, which [`Fresh`] honours, as the lists and most reads
/// document it: bare, as the spec has always shown it there. (A field's doc
/// comment would become the description; single-resource reads document
/// both forms with descriptions, next to their conditional GET.)
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MinSeq {
    pub min_seq: Option<u64>,
}

/// `X-Min-Event-Seq`, the header form of [`MinSeq`], documented bare the
/// same way.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct MinSeqHeader {
    #[param(rename = "X-Min-Event-Seq", nullable = false)]
    pub x_min_event_seq: Option<u64>,
}
