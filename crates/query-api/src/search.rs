//! `GET /agents/search`: relevance-ranked search over name, type,
//! capabilities, tags and description.
//!
//! Two index-backed ways to match, OR-ed (PostgreSQL combines the two GIN
//! indexes in a bitmap):
//! * full text: every word of `q` as a prefix (`'summ':*`) against the
//!   weighted `search_doc` tsvector (name A, type and capabilities B, tags C,
//!   description D), with the `simple` configuration (no stemming, any
//!   script);
//! * fuzzy: trigram word similarity of `q` against `search_text`
//!   (`q <% search_text`, pg_trgm's default threshold 0.6), which forgives a
//!   typo or two in words of five letters or more.
//!
//! `q` never reaches SQL as text to parse: it is split into words of letters
//! and digits in Rust, so tsquery operators (`&|!():*<>'\`) cannot appear in
//! the tsquery, and both the tsquery and `q` itself are bound parameters.
//!
//! The score is `ts_rank` + word similarity + similarity of `q` to the name,
//! so a name match outranks a description match. Pages are a keyset on
//! `(score, id)`, both descending; the cursor carries the exact score.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use infra::auth::Viewer;
use infra::http::{ApiError, Problem, QueryPairs};
use infra::views::{AgentView, Page};
use serde::Serialize;
use sqlx::{FromRow, Postgres, QueryBuilder, Row};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::QueryState;
use crate::agents::{
    AGENT_COLUMNS, AgentRow, CHECKPOINT, Filters, await_min_seq, parse_limit, projection_seq,
    with_projection_seq,
};

/// How many matches of each kind (words, trigrams) a search scores at
/// most. Enough that precise queries are ranked in full; a very common word
/// is ranked among its first matches rather than across the whole table.
pub const SEARCH_CANDIDATES: i64 = 2_000;

/// Longest `q`, in characters.
pub const MAX_Q_CHARS: usize = 200;
/// Most words of `q` that go into the full-text query.
const MAX_WORDS: usize = 16;

/// An agent found by search, with its relevance.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SearchHit {
    #[serde(flatten)]
    pub agent: AgentView,
    /// Relevance: higher is better. Comparable within one search only.
    pub score: f64,
}

/// A parsed search request.
#[derive(Debug)]
pub struct Search {
    /// `q`, trimmed and lowercased: the fuzzy match's input.
    pub text: String,
    /// `q`'s words as a tsquery of prefixes, e.g. `'summ':* & 'bot':*`;
    /// `None` when `q` has no letters or digits.
    pub tsquery: Option<String>,
    pub filters: Filters,
    pub cursor: Option<SearchCursor>,
    pub limit: i64,
}

/// The position after the last hit of a page.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SearchCursor {
    pub score: f64,
    pub id: Uuid,
}

impl SearchCursor {
    pub fn encode(&self) -> String {
        crate::agents::opaque_encode(&format!("s:{:016x}:{}", self.score.to_bits(), self.id))
    }

    pub fn decode(s: &str) -> Result<SearchCursor, ApiError> {
        let bad = crate::agents::bad_cursor;
        let raw = crate::agents::opaque_decode(s)?;
        let mut parts = raw.splitn(3, ':');
        let (Some("s"), Some(bits), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let score = f64::from_bits(u64::from_str_radix(bits, 16).map_err(|_| bad())?);
        if !score.is_finite() {
            return Err(bad());
        }
        Ok(SearchCursor {
            score,
            id: id.parse().map_err(|_| bad())?,
        })
    }
}

/// The words of `q` as a tsquery of prefixes: only letters and digits, so
/// nothing in it is a tsquery operator or quote.
pub fn prefix_tsquery(q: &str) -> Option<String> {
    let words: Vec<String> = q
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(MAX_WORDS)
        .map(|w| format!("'{}':*", w.to_lowercase()))
        .collect();
    (!words.is_empty()).then(|| words.join(" & "))
}

impl Search {
    pub const PARAMS: [&'static str; 8] = [
        "q",
        "status",
        "type",
        "project_id",
        "tag",
        "limit",
        "cursor",
        "min_seq",
    ];

    /// Checks every parameter: `q` is required, 1..=200 characters after
    /// trimming, without NUL.
    pub fn parse(query: &QueryPairs) -> Result<Search, ApiError> {
        query.only(&Self::PARAMS)?;
        let q = query
            .one("q")?
            .map(str::trim)
            .filter(|q| !q.is_empty())
            .ok_or_else(|| ApiError::BadRequest("query parameter \"q\" is required".into()))?;
        if q.chars().count() > MAX_Q_CHARS {
            return Err(ApiError::BadRequest(format!(
                "query parameter \"q\" is longer than {MAX_Q_CHARS} characters"
            )));
        }
        if q.contains('\0') {
            return Err(ApiError::BadRequest(
                "query parameter \"q\" must not contain NUL".into(),
            ));
        }
        Ok(Search {
            text: q.to_lowercase(),
            tsquery: prefix_tsquery(q),
            filters: Filters::parse(query)?,
            cursor: query.one("cursor")?.map(SearchCursor::decode).transpose()?,
            limit: parse_limit(query)?,
        })
    }

    /// The statement the handler runs, behind `prefix` (tests put
    /// `EXPLAIN` there). Every user value is a bound parameter.
    pub fn build(&self, prefix: &str) -> QueryBuilder<Postgres> {
        let mut qb = QueryBuilder::<Postgres>::new(format!(
            "{prefix}SELECT c.seq AS projection_seq, {AGENT_COLUMNS}, a.score FROM {CHECKPOINT} \
             LEFT JOIN LATERAL (SELECT * FROM (SELECT agents.*, ("
        ));
        if let Some(tsq) = &self.tsquery {
            qb.push("ts_rank(search_doc, to_tsquery('simple', ")
                .push_bind(tsq.clone())
                .push("))::float8 + ");
        }
        qb.push("word_similarity(")
            .push_bind(self.text.clone())
            .push(", search_text)::float8 + similarity(")
            .push_bind(self.text.clone())
            .push(", lower(name))::float8) AS score FROM ");
        match &self.tsquery {
            // Candidates first, each way of matching bounded by its index:
            // ranking every match of a common word in a large table (a
            // third of it, say) would cost seconds. At most
            // SEARCH_CANDIDATES matches of each kind are scored.
            Some(tsq) => {
                qb.push("((SELECT id FROM agents WHERE search_doc @@ to_tsquery('simple', ")
                    .push_bind(tsq.clone())
                    .push(")");
                self.filters.push_where(&mut qb);
                qb.push(" LIMIT ")
                    .push_bind(SEARCH_CANDIDATES)
                    .push(") UNION (SELECT id FROM agents WHERE ")
                    .push_bind(self.text.clone())
                    .push(" <% search_text");
                self.filters.push_where(&mut qb);
                qb.push(" LIMIT ")
                    .push_bind(SEARCH_CANDIDATES)
                    // Each candidate fetched by primary key (LATERAL), never a
                    // scan of the table joined against the candidates.
                    .push(")) candidates, LATERAL (SELECT * FROM agents a0 WHERE a0.id = candidates.id LIMIT 1) agents");
            }
            // Without a letter or digit there is no word to match and no
            // trigram either (pg_trgm ignores everything else): nothing
            // can match, and the plan says so without reading a row.
            None => {
                qb.push("agents WHERE false");
            }
        }
        qb.push(") m WHERE true");
        if let Some(c) = self.cursor {
            qb.push(" AND (m.score, m.id) < (")
                .push_bind(c.score)
                .push(", ")
                .push_bind(c.id)
                .push(")");
        }
        qb.push(" ORDER BY m.score DESC, m.id DESC LIMIT ")
            .push_bind(self.limit + 1)
            .push(") a ON true ORDER BY a.score DESC, a.id DESC");
        qb
    }
}

/// Search agents, best match first.
///
/// Matches word prefixes (`summ` finds "Summarizer") and tolerates small
/// typos (`sumarizer`) across name, type, capabilities, tags and
/// description; takes the list filters too. Pages follow `next_cursor` (a
/// keyset on score and id), so a page never repeats or skips a hit while
/// the data stands still.
#[utoipa::path(get, path = "/agents/search", tag = "agents",
    params(
        ("q" = String, Query, min_length = 1, max_length = 200, pattern = "^[^\\u0000]*[^\\s\\u0000\\u0085][^\\u0000]*$", description = "What to look for: 1..=200 characters"),
        ("status" = inline(Option<infra::http::schema::AgentStatusName>), Query),
        ("type" = Option<String>, Query, pattern = "^[a-z0-9_-]{1,64}$"),
        ("project_id" = Option<Uuid>, Query),
        ("tag" = inline(Option<Vec<infra::http::schema::TagFilter>>), Query, description = "key:value; repeat for several (all must match)"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "1..=500, default 50"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
        ("min_seq" = Option<u64>, Query),
        ("X-Min-Event-Seq" = Option<u64>, Header, nullable = false),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Page<SearchHit>, headers(("X-Projection-Seq" = u64))),
        (status = 400, description = "Missing or too long q, bad filter or cursor", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn search_agents(
    State(state): State<QueryState>,
    _viewer: Viewer,
    query: QueryPairs,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let search = Search::parse(&query)?;
    await_min_seq(&state, &headers, &query).await?;
    let rows = search.build("").build().fetch_all(&state.pool).await?;

    let seq = rows.first().map(projection_seq).transpose()?.unwrap_or(0);
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        if row.try_get::<Option<Uuid>, _>("id")?.is_none() {
            continue;
        }
        items.push(SearchHit {
            agent: AgentRow::from_row(row)?.into(),
            score: row.try_get("score")?,
        });
    }
    let next_cursor = if items.len() as i64 > search.limit {
        items.truncate(search.limit as usize);
        items.last().map(|h| {
            SearchCursor {
                score: h.score,
                id: h.agent.id,
            }
            .encode()
        })
    } else {
        None
    };
    Ok(with_projection_seq(
        Json(Page { items, next_cursor }).into_response(),
        seq,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_never_reaches_the_tsquery_as_syntax() {
        assert_eq!(
            prefix_tsquery("a&b|!(c):*'d\\").as_deref(),
            Some("'a':* & 'b':* & 'c':* & 'd':*")
        );
        assert_eq!(prefix_tsquery("&|!():*%_'\\"), None);
        assert_eq!(
            prefix_tsquery("Ünïcode 日本").as_deref(),
            Some("'ünïcode':* & '日本':*")
        );
    }

    #[test]
    fn search_cursors_round_trip() {
        let c = SearchCursor {
            score: 1.234_567_890_123,
            id: Uuid::now_v7(),
        };
        assert_eq!(SearchCursor::decode(&c.encode()).unwrap(), c);
        assert!(SearchCursor::decode("nope").is_err());
    }
}
