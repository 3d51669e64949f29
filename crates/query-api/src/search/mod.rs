//! `GET /agents/search`: relevance-ranked search over name, type,
//! capabilities, tags and description, served from this process's own
//! search index (an embedded tantivy index kept from the event log; see
//! [`index`]), not from PostgreSQL.
//!
//! * every word of `q` must match; a word of 5+ characters may carry one
//!   typo, of 9+ two (a swap of neighbouring letters is one typo); the
//!   last word also matches as a prefix (see [`query`] for the ranking);
//! * the list filters select inside the engine, and `facets=` counts the
//!   values of `status`, `type`, `project_id` or a tag key over every
//!   match ([`facets`]);
//! * pages are a keyset on `(score, id)`, both descending; a score depends
//!   on the agent and the query only, so the cursor is stable;
//! * `X-Min-Event-Seq` waits for the index's own checkpoint, and
//!   `X-Projection-Seq` reports it.
//!
//! `q` never reaches the engine as syntax: it is split into words of
//! letters and digits in Rust, and each word becomes a term.

pub mod facets;
pub mod index;
pub mod query;
pub mod schema;

use std::sync::LazyLock;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use infra::http::auth::Viewer;
use infra::http::{ApiError, Problem, QueryPairs};
use infra::views::AgentView;
use serde::Serialize;
use tokio::sync::Semaphore;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::QueryState;
use crate::agents::AgentList;
use crate::filters::Filters;
use crate::paging::{Cursor, PageQuery, parse_cursor, parse_limit};
use crate::problems::{RequestProblems, Unavailable};
use crate::projection::{MinSeq, MinSeqHeader, await_min_seq_on, with_projection_seq};
use facets::{Facet, FacetCounts, PageCollector};
pub use index::SearchIndex;
use tantivy::collector::{Collector, SegmentCollector};
use tantivy::{SegmentOrdinal, TERMINATED};

/// Longest `q`, in characters.
pub const MAX_Q_CHARS: usize = 200;
/// Most words of `q` that are searched for.
const MAX_WORDS: usize = 16;

/// Searches running at once in this process: one per core. A search is
/// CPU work from start to end, so more at once only slows each down (and
/// the p99 with it); the rest queue, first come first served.
static SEARCHES: LazyLock<Semaphore> =
    LazyLock::new(|| Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())));

/// An agent found by search, with its relevance.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SearchHit {
    #[serde(flatten)]
    pub agent: AgentView,
    /// Relevance: higher is better. Depends on the agent and the query
    /// only, so it is the same on every page.
    pub score: f64,
}

/// A page of search hits, with the facet counts when asked for.
#[derive(Debug, Serialize, ToSchema)]
pub struct SearchPage {
    pub items: Vec<SearchHit>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
    /// With `facets=`: for each facet asked, the number of matching agents
    /// per value (the 100 most frequent values), over every match.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub facets: Option<FacetCounts>,
}

/// `facets`, documented.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FacetsQuery {
    /// Comma-separated: `status`, `type`, `project_id`, `tag:<key>` (at most 8)
    #[param(
        pattern = "^(status|type|project_id|tag:[^,\\s\\u0000]+)(,(status|type|project_id|tag:[^,\\s\\u0000]+)){0,7}$"
    )]
    pub facets: Option<String>,
}

/// A parsed search request.
#[derive(Debug)]
pub struct Search {
    /// `q`'s words (letters and digits only), lowercased, at most
    /// [`MAX_WORDS`]; empty when `q` has no letter or digit.
    pub words: Vec<String>,
    pub filters: Filters,
    pub facets: Vec<Facet>,
    pub cursor: Option<SearchCursor>,
    pub limit: i64,
}

/// The position after the last hit of a page.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SearchCursor {
    pub score: f64,
    pub id: Uuid,
}

impl Cursor for SearchCursor {
    /// The exact score, as its bits.
    fn to_text(&self) -> String {
        format!("s:{:016x}:{}", self.score.to_bits(), self.id)
    }

    fn from_text(text: &str) -> Option<SearchCursor> {
        let mut parts = text.splitn(3, ':');
        let (Some("s"), Some(bits), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
            return None;
        };
        let score = f64::from_bits(u64::from_str_radix(bits, 16).ok()?);
        if !score.is_finite() {
            return None;
        }
        Some(SearchCursor {
            score,
            id: id.parse().ok()?,
        })
    }
}

/// The words of `q`: runs of letters and digits, lowercased, at most
/// [`MAX_WORDS`]; the index splits text the same way.
pub fn query_words(q: &str) -> Vec<String> {
    q.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(MAX_WORDS)
        .map(str::to_lowercase)
        .collect()
}

impl Search {
    /// Checks every parameter: `q`, `facets`, and the list's filters and
    /// page. `q` is required, 1..=200 characters after trimming, without
    /// NUL.
    pub fn parse(query: &QueryPairs) -> Result<Search, ApiError> {
        query.only(&[&["q", "facets"][..], &AgentList::PARAMS].concat())?;
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
        let facets = match query.one("facets")? {
            Some(list) => Facet::parse_list(list)?,
            None => Vec::new(),
        };
        Ok(Search {
            words: query_words(q),
            filters: Filters::parse(query)?,
            facets,
            cursor: parse_cursor(query)?,
            limit: parse_limit(query)?,
        })
    }
}

/// One page of `search` from `index`, and the checkpoint it reflects.
pub fn run(index: &SearchIndex, search: &Search) -> anyhow::Result<(u64, SearchPage)> {
    let view = index.view();
    let plan = query::Plan::new(
        &index.fields,
        &search.words,
        &search.filters,
        view.searcher(),
    )?;
    let limit = usize::try_from(search.limit).unwrap_or(0);
    let collector = PageCollector {
        // One more than the page: it only says there is a next page.
        limit: limit + 1,
        // Scores are f32 in the engine; the cursor's came from one.
        after: search.cursor.map(|c| (c.score as f32, c.id.as_u128())),
        facets: search.facets.clone(),
    };
    // An index made before documents were kept in id order is read whole.
    let sorted = schema::sorted_by_id(view.searcher().index());
    let mut fruits = Vec::new();
    // The disk index's segments, then the overlay's (see [`index`]).
    for (ord, (reader, alive)) in view.segments().enumerate() {
        let Some(mut matches) = plan.segment(reader)? else {
            continue;
        };
        let mut segment = collector.for_segment(ord as SegmentOrdinal, reader)?;
        let mut doc = matches.doc();
        while doc != TERMINATED {
            if sorted && segment.is_closed(matches.bound, doc) {
                break;
            }
            if alive.is_alive(doc) {
                segment.collect(doc, matches.score());
            }
            doc = matches.advance();
        }
        fruits.push(segment.harvest());
    }
    let found = collector.merge_fruits(fruits)?;
    let mut items = Vec::with_capacity(found.hits.len().min(limit));
    for hit in found.hits.iter().take(limit) {
        items.push(SearchHit {
            agent: index.agent(&view, hit.address)?,
            score: f64::from(hit.score),
        });
    }
    let next_cursor = (found.hits.len() > limit)
        .then(|| items.last())
        .flatten()
        .map(|h| {
            SearchCursor {
                score: h.score,
                id: h.agent.id,
            }
            .encode()
        });
    let facets = (!search.facets.is_empty()).then(|| facets::counts(&search.facets, found.facets));
    Ok((
        view.seq,
        SearchPage {
            items,
            next_cursor,
            facets,
        },
    ))
}

/// Search agents, best match first.
///
/// Every word must match, in name, type, capabilities, tags or
/// description; a word of 5+ characters may carry one typo, of 9+ two (a
/// swap of neighbouring letters is one); the last word matches as a prefix
/// too (`summ` finds "Summarizer"). Takes the list filters, and `facets` to
/// count the matches by status, type, project or tag. Pages follow
/// `next_cursor` (a keyset on score and id). `X-Projection-Seq` is the
/// search index's own checkpoint, which `X-Min-Event-Seq` waits for.
#[utoipa::path(get, path = "/agents/search", tag = "agents",
    params(
        ("q" = String, Query, min_length = 1, max_length = 200, pattern = "^[^\\u0000]*[^\\s\\u0000\\u0085][^\\u0000]*$", description = "What to look for: 1..=200 characters"),
        Filters, FacetsQuery, PageQuery, MinSeq, MinSeqHeader,
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, body = SearchPage, headers(("X-Projection-Seq" = u64))),
        RequestProblems, Unavailable,
        (status = 400, description = "Missing or too long q, bad filter, facet or cursor", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn search_agents(
    State(state): State<QueryState>,
    _viewer: Viewer,
    headers: HeaderMap,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    let search = Search::parse(&query)?;
    let index = state.search.clone();
    await_min_seq_on(&index.watch(), &state, &headers, &query).await?;
    // Searches wait their turn for a core here rather than all running at
    // once on blocking threads that only take turns on the cores anyway.
    let _turn = SEARCHES
        .acquire()
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    let (seq, page) = tokio::task::spawn_blocking(move || run(&index, &search))
        .await
        .map_err(|e| ApiError::Internal(e.into()))??;
    Ok(with_projection_seq(Json(page), seq))
}

pub fn router() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new().routes(routes!(search_agents))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_is_only_words() {
        assert_eq!(query_words("a&b|!(c):*'d\\"), ["a", "b", "c", "d"]);
        assert!(query_words("&|!():*%_'\\").is_empty());
        assert_eq!(query_words("Ünïcode 日本"), ["ünïcode", "日本"]);
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
