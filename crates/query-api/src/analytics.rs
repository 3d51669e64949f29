//! `GET /analytics`: fleet totals, agent events over time and the most
//! common capabilities, all read in one `REPEATABLE READ READ ONLY`
//! transaction so every figure (and `X-Projection-Seq`) comes from the same
//! snapshot.
//!
//! Totals and capabilities describe the agents alive now (from the `agents`
//! read model) or, with `as_of`, alive at that time: then they are folded
//! from the projected event log, never from today's rows.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::response::Response;
use chrono::{DateTime, Duration, Utc};
use infra::http::auth::Viewer;
use infra::http::{ApiError, Problem, QueryPairs};
use serde::Serialize;
use sqlx::{Postgres, Transaction};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::QueryState;
use crate::params::{Params, one_of, parse_time};
use crate::problems::{RequestProblems, Unavailable};
use crate::projection::{CHECKPOINT, Fresh, MinSeq, MinSeqHeader, with_projection_seq};

/// Most buckets one request may ask for.
pub const MAX_BUCKETS: i64 = 10_000;
/// How many capabilities `top_capabilities` lists.
pub const TOP_CAPABILITIES: i64 = 10;

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Analytics {
    pub totals: Totals,
    /// Agent events per bucket, oldest first, every bucket present (zeros
    /// included).
    pub events_over_time: Vec<BucketCount>,
    /// The most common capabilities among the counted agents (at most 10),
    /// most common first, ties by name.
    pub top_capabilities: Vec<CapabilityCount>,
    /// The event sequence the figures stand at: the projection's checkpoint,
    /// or with `as_of` the last event at or before that time.
    pub as_of_seq: u64,
    /// The window of `events_over_time`, as resolved.
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// `minute`, `hour` or `day`.
    pub bucket: &'static str,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Totals {
    /// Live agents (in the project, when filtered).
    pub agents: u64,
    /// Every status, zeros included.
    pub by_status: BTreeMap<String, u64>,
    pub by_type: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BucketCount {
    pub bucket_start: DateTime<Utc>,
    pub created: u64,
    pub updated: u64,
    pub deleted: u64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CapabilityCount {
    pub capability: String,
    pub agents: u64,
}

#[derive(Debug, Clone, Copy)]
enum Bucket {
    Minute,
    Hour,
    Day,
}

impl Bucket {
    fn parse(raw: Option<&str>) -> Result<Bucket, ApiError> {
        one_of(
            "bucket",
            raw,
            Bucket::Hour,
            &[Bucket::Minute, Bucket::Hour, Bucket::Day],
            Bucket::name,
        )
    }

    fn name(self) -> &'static str {
        match self {
            Bucket::Minute => "minute",
            Bucket::Hour => "hour",
            Bucket::Day => "day",
        }
    }

    fn width(self) -> Duration {
        match self {
            Bucket::Minute => Duration::minutes(1),
            Bucket::Hour => Duration::hours(1),
            Bucket::Day => Duration::days(1),
        }
    }
}

/// A parsed analytics request.
#[derive(Debug)]
pub struct Request {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    bucket: Bucket,
    /// `from` rounded down to the bucket size: where the first bucket starts.
    origin: DateTime<Utc>,
    buckets: i64,
    project_id: Option<Uuid>,
    as_of: Option<DateTime<Utc>>,
}

/// `t` rounded down to a whole `width` since the Unix epoch (UTC-aligned
/// buckets), for any time chrono can hold. (chrono's `duration_trunc` counts
/// in nanoseconds and so gives up outside 1677..2262.)
fn truncate(t: DateTime<Utc>, width: Duration) -> Option<DateTime<Utc>> {
    let width = width.num_seconds();
    if width <= 0 {
        return None;
    }
    let secs = t.timestamp();
    DateTime::from_timestamp(secs - secs.rem_euclid(width), 0)
}

impl Params for Request {
    fn parse(query: &QueryPairs) -> Result<Request, ApiError> {
        query.only(&["from", "to", "bucket", "project_id", "as_of", "min_seq"])?;
        let to = query
            .one("to")?
            .map(parse_time("to"))
            .transpose()?
            .unwrap_or_else(Utc::now);
        let from = query
            .one("from")?
            .map(parse_time("from"))
            .transpose()?
            .unwrap_or(to - Duration::hours(24));
        if from >= to {
            return Err(ApiError::BadRequest("from must be before to".into()));
        }
        let bucket = Bucket::parse(query.one("bucket")?)?;
        let width = bucket.width();
        let origin = truncate(from, width)
            .ok_or_else(|| ApiError::BadRequest("from is out of range".into()))?;
        let span = (to - origin).num_microseconds().ok_or_else(|| {
            ApiError::BadRequest("the range between from and to is too long".into())
        })?;
        let width_us = width.num_microseconds().unwrap_or(1).max(1);
        let buckets = (span + width_us - 1) / width_us;
        if buckets > MAX_BUCKETS {
            return Err(ApiError::BadRequest(format!(
                "from..to spans {buckets} {} buckets; at most {MAX_BUCKETS} are allowed: \
                 narrow the range or use a larger bucket",
                bucket.name()
            )));
        }
        Ok(Request {
            from,
            to,
            bucket,
            origin,
            buckets,
            project_id: query.parse::<Uuid>("project_id")?,
            as_of: query.one("as_of")?.map(parse_time("as_of")).transpose()?,
        })
    }
}

/// The agents counted, one row each: from the read model now, or folded
/// from the event log as of a time. `$1` is the project filter (or NULL),
/// `$2` the time.
const POPULATION_NOW: &str = "SELECT id, status, type, capabilities FROM agents \
     WHERE ($1::uuid IS NULL OR project_id = $1)";
const POPULATION_AS_OF: &str = "SELECT aggregate_id AS id, status, type, \
       ARRAY(SELECT jsonb_array_elements_text(capabilities)) AS capabilities \
     FROM (SELECT aggregate_id, \
             (array_agg(event_type ORDER BY seq DESC))[1] AS last_event, \
             (array_agg(data ->> 'status' ORDER BY seq DESC) FILTER (WHERE data ? 'status'))[1] AS status, \
             (array_agg(data ->> 'type' ORDER BY seq DESC) FILTER (WHERE data ? 'type'))[1] AS type, \
             (array_agg(data -> 'project_id' ORDER BY seq DESC) FILTER (WHERE data ? 'project_id'))[1] AS project_id, \
             (array_agg(data -> 'capabilities' ORDER BY seq DESC) FILTER (WHERE data ? 'capabilities'))[1] AS capabilities \
           FROM events WHERE aggregate_type = 'agent' AND occurred_at <= $2 \
           GROUP BY aggregate_id) folded \
     WHERE last_event <> 'agent.deleted' \
       AND ($1::uuid IS NULL OR project_id #>> '{}' = $1::text)";

async fn totals(
    tx: &mut Transaction<'static, Postgres>,
    req: &Request,
) -> Result<(Totals, Vec<CapabilityCount>), sqlx::Error> {
    let population = if req.as_of.is_some() {
        POPULATION_AS_OF
    } else {
        POPULATION_NOW
    };
    // Both statements bind the time; the `$2 IS NOT NULL` below only gives
    // it a type where the population does not use it.
    let at = req.as_of.unwrap_or_else(Utc::now);
    let groups: Vec<(String, String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT status, type, count(*) FROM ({population}) pop \
         WHERE ($2::timestamptz IS NOT NULL) GROUP BY status, type"
    )))
    .bind(req.project_id)
    .bind(at)
    .fetch_all(&mut **tx)
    .await?;
    let mut totals = Totals {
        agents: 0,
        by_status: ["active", "inactive", "paused", "error"]
            .into_iter()
            .map(|s| (s.to_owned(), 0))
            .collect(),
        by_type: BTreeMap::new(),
    };
    for (status, agent_type, n) in groups {
        let n = n.max(0) as u64;
        totals.agents += n;
        *totals.by_status.entry(status).or_default() += n;
        *totals.by_type.entry(agent_type).or_default() += n;
    }
    let top: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT cap, count(DISTINCT pop.id) AS agents FROM ({population}) pop, \
           unnest(pop.capabilities) AS cap \
         WHERE ($2::timestamptz IS NOT NULL) \
         GROUP BY cap ORDER BY agents DESC, cap LIMIT {TOP_CAPABILITIES}"
    )))
    .bind(req.project_id)
    .bind(at)
    .fetch_all(&mut **tx)
    .await?;
    let top = top
        .into_iter()
        .map(|(capability, n)| CapabilityCount {
            capability,
            agents: n.max(0) as u64,
        })
        .collect();
    Ok((totals, top))
}

async fn events_over_time(
    tx: &mut Transaction<'static, Postgres>,
    req: &Request,
) -> Result<Vec<BucketCount>, sqlx::Error> {
    let width = format!("1 {}", req.bucket.name());
    let rows: Vec<(DateTime<Utc>, i64, i64, i64)> = sqlx::query_as(
        "SELECT date_bin($1::interval, occurred_at, $2) AS bucket, \
           count(*) FILTER (WHERE event_type = 'agent.created'), \
           count(*) FILTER (WHERE event_type = 'agent.updated'), \
           count(*) FILTER (WHERE event_type = 'agent.deleted') \
         FROM events \
         WHERE aggregate_type = 'agent' AND occurred_at >= $3 AND occurred_at < $4 \
           AND ($5::uuid IS NULL OR aggregate_id IN ( \
                SELECT aggregate_id FROM events \
                WHERE aggregate_type = 'agent' AND data ->> 'project_id' = $5::text)) \
         GROUP BY bucket",
    )
    .bind(width)
    .bind(req.origin)
    .bind(req.from)
    .bind(req.to)
    .bind(req.project_id)
    .fetch_all(&mut **tx)
    .await?;
    let counted: BTreeMap<DateTime<Utc>, (i64, i64, i64)> = rows
        .into_iter()
        .map(|(b, c, u, d)| (b, (c, u, d)))
        .collect();
    let width = req.bucket.width();
    Ok((0..req.buckets)
        .map(|i| {
            let start = req.origin + width * (i as i32);
            let (c, u, d) = counted.get(&start).copied().unwrap_or_default();
            BucketCount {
                bucket_start: start,
                created: c.max(0) as u64,
                updated: u.max(0) as u64,
                deleted: d.max(0) as u64,
            }
        })
        .collect())
}

/// Fleet analytics.
///
/// `from`/`to` (RFC 3339; default the 24 hours before now) bound
/// `events_over_time`, counted per `bucket` (`minute`, `hour` (default) or
/// `day`, aligned to UTC; the first and last buckets may be partial, only
/// events in `[from, to)` count). At most 10,000 buckets, else 400.
/// `project_id` narrows everything to that project (for events: agents
/// that were ever placed in it). `as_of` gives the totals and top
/// capabilities as they stood at that time, folded from the event log.
#[utoipa::path(get, path = "/analytics", tag = "analytics",
    params(
        ("from" = Option<String>, Query, format = DateTime, description = "RFC 3339; default to - 24 h"),
        ("to" = Option<String>, Query, format = DateTime, description = "RFC 3339; default now"),
        ("bucket" = inline(Option<infra::http::schema::BucketName>), Query, description = "minute, hour (default) or day"),
        ("project_id" = Option<Uuid>, Query),
        ("as_of" = Option<String>, Query, format = DateTime, description = "RFC 3339: totals as they stood then, from the event log"),
        MinSeq, MinSeqHeader,
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Analytics, headers(("X-Projection-Seq" = u64))),
        RequestProblems, Unavailable,
        (status = 400, description = "Bad time, bucket or range (from >= to, more than 10,000 buckets)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn analytics(
    State(state): State<QueryState>,
    _viewer: Viewer,
    Fresh(req): Fresh<Request>,
) -> Result<Response, ApiError> {
    let mut tx = state.pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let (checkpoint, as_of_seq): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT c.seq, COALESCE((SELECT max(seq) FROM events WHERE occurred_at <= $1), 0) FROM {}",
        *CHECKPOINT
    )))
    .bind(req.as_of)
    .fetch_one(&mut *tx)
    .await?;
    let (totals, top_capabilities) = totals(&mut tx, &req).await?;
    let events_over_time = events_over_time(&mut tx, &req).await?;
    tx.commit().await?;

    let checkpoint = checkpoint.max(0) as u64;
    let body = Analytics {
        totals,
        events_over_time,
        top_capabilities,
        as_of_seq: if req.as_of.is_some() {
            as_of_seq.max(0) as u64
        } else {
            checkpoint
        },
        from: req.from,
        to: req.to,
        bucket: req.bucket.name(),
    };
    Ok(with_projection_seq(Json(body), checkpoint))
}

pub fn router() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new().routes(routes!(analytics))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn truncate_aligns_to_utc_also_far_from_the_epoch() {
        let hour = Duration::hours(1);
        let day = Duration::days(1);
        assert_eq!(
            truncate(t("2026-01-31T12:34:56.789Z"), hour),
            Some(t("2026-01-31T12:00:00Z"))
        );
        assert_eq!(
            truncate(t("2026-01-31T12:34:56+02:00"), day),
            Some(t("2026-01-31T00:00:00Z"))
        );
        // Outside 1677..2262, where chrono's nanosecond `duration_trunc` fails.
        assert_eq!(
            truncate(t("1033-10-09T18:58:05.371+09:02"), hour),
            Some(t("1033-10-09T09:00:00Z"))
        );
        assert_eq!(
            truncate(t("0001-01-01T00:00:01Z"), Duration::minutes(1)),
            Some(t("0001-01-01T00:00:00Z"))
        );
        assert_eq!(
            truncate(t("9999-12-31T23:59:59Z"), day),
            Some(t("9999-12-31T00:00:00Z"))
        );
    }
}
