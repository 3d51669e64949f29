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

use anyhow::Context;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
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

/// An agent found by search, with its relevance: the schema of an item
/// of [`SearchPage`], which is written as [`hit_json`] makes it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SearchHit {
    #[serde(flatten)]
    pub agent: AgentView,
    /// Relevance: higher is better. Depends on the agent and the query
    /// only, so it is the same on every page.
    pub score: f64,
}

/// A page of search hits, with the facet counts when asked for: the
/// schema of the response, which [`FoundPage::to_json`] writes.
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

/// A page as [`run`] finds it, each hit already JSON ([`hit_json`]).
#[derive(Debug)]
pub struct FoundPage {
    pub items: Vec<String>,
    pub next_cursor: Option<String>,
    pub facets: Option<FacetCounts>,
}

impl FoundPage {
    /// The response body: a [`SearchPage`] in JSON.
    pub fn to_json(&self) -> anyhow::Result<Vec<u8>> {
        let items: usize = self.items.iter().map(|i| i.len() + 1).sum();
        let mut out = Vec::with_capacity(items + 64);
        out.extend_from_slice(b"{\"items\":[");
        for (i, item) in self.items.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(item.as_bytes());
        }
        out.extend_from_slice(b"],\"next_cursor\":");
        serde_json::to_writer(&mut out, &self.next_cursor)?;
        if let Some(facets) = &self.facets {
            out.extend_from_slice(b",\"facets\":");
            serde_json::to_writer(&mut out, facets)?;
        }
        out.push(b'}');
        Ok(out)
    }
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
pub fn run(index: &SearchIndex, search: &Search) -> anyhow::Result<(u64, FoundPage)> {
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
    let page = &found.hits[..found.hits.len().min(limit)];
    let mut items = Vec::with_capacity(page.len());
    for hit in page {
        let score = f64::from(hit.score);
        index.with_agent_json(&view, hit.address, |agent| {
            items.push(hit_json(agent, score)?);
            anyhow::Ok(())
        })??;
    }
    let next_cursor = (found.hits.len() > limit)
        .then(|| page.last())
        .flatten()
        .map(|h| {
            SearchCursor {
                score: f64::from(h.score),
                id: Uuid::from_u128(h.id),
            }
            .encode()
        });
    let facets = (!search.facets.is_empty()).then(|| facets::counts(&search.facets, found.facets));
    Ok((
        view.seq,
        FoundPage {
            items,
            next_cursor,
            facets,
        },
    ))
}

/// A hit as the response shows it: the agent's stored JSON (an object,
/// written by `serde_json` from the [`AgentView`] the index was given, so
/// exactly what the agent reads show), with `"score"` added as its last
/// member. Copied, not parsed and written again: reading back each hit's
/// agent, dates and all, and writing it out again was a quarter of a
/// search's time.
fn hit_json(agent: &str, score: f64) -> anyhow::Result<String> {
    let members = agent
        .strip_prefix('{')
        .and_then(|a| a.strip_suffix('}'))
        .context("a stored agent that is not a JSON object")?;
    let mut json = String::with_capacity(agent.len() + 32);
    json.push('{');
    json.push_str(members);
    if !members.trim().is_empty() {
        json.push(',');
    }
    json.push_str("\"score\":");
    json.push_str(&serde_json::to_string(&score)?);
    json.push('}');
    Ok(json)
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
    let (seq, body) = tokio::task::spawn_blocking(move || {
        let (seq, page) = run(&index, &search)?;
        anyhow::Ok((seq, page.to_json()?))
    })
    .await
    .map_err(|e| ApiError::Internal(e.into()))??;
    let json = [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    )];
    Ok(with_projection_seq((json, body), seq))
}

pub fn router() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new().routes(routes!(search_agents))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_written_from_stored_json_is_the_page_serde_writes() {
        let agent = AgentView {
            id: Uuid::new_v4(),
            name: "Planner \"one\"".into(),
            agent_type: "planner".into(),
            description: "plans, then reports".into(),
            status: "active".into(),
            capabilities: vec!["text-summarization".into()],
            config: serde_json::json!({"model": "m", "limits": [1, 2.5]}),
            tags: [("env".to_owned(), "prod".to_owned())].into(),
            project_id: Some(Uuid::new_v4()),
            version: 3,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            created_by: "admin".into(),
        };
        let stored = serde_json::to_string(&agent).unwrap();
        for score in [3004.5_f32, 0.1, 12345.678] {
            let score = f64::from(score);
            let facets: FacetCounts =
                [("status".to_owned(), [("active".to_owned(), 2)].into())].into();
            for (next_cursor, facets) in [(None, None), (Some("c".to_owned()), Some(facets))] {
                let found = FoundPage {
                    items: vec![hit_json(&stored, score).unwrap(); 2],
                    next_cursor: next_cursor.clone(),
                    facets: facets.clone(),
                };
                let written: serde_json::Value =
                    serde_json::from_slice(&found.to_json().unwrap()).unwrap();
                let hit = SearchHit {
                    agent: agent.clone(),
                    score,
                };
                let page = SearchPage {
                    items: vec![hit.clone(), hit],
                    next_cursor,
                    facets,
                };
                assert_eq!(written, serde_json::to_value(&page).unwrap());
            }
        }
        assert!(hit_json("[1]", 1.0).is_err());
    }

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
