//! `GET /agents/search`: relevance-ranked search over name, type,
//! capabilities, tags and description.
//!
//! Every match goes through one index, the weighted `search_doc` tsvector
//! (name A, type and capabilities B, tags C, description D; the `simple`
//! configuration: no stemming, any script):
//! * every word of `q` is a prefix (`'summ':*`);
//! * a word of four or more letters may also be misspelt: it is looked up
//!   first in `search_words`, the dictionary of the words agents contain
//!   (trigram-indexed, one row per distinct word), and its closest words
//!   there (trigram similarity >= 0.5, at most four) join it as
//!   alternatives: `sumarizer` becomes `('sumarizer':* | 'summarizer')`.
//!
//! Looking typos up in a small dictionary, rather than comparing `q` with
//! every agent's text, keeps both sides cheap: an insert indexes its words
//! once, and a search reads one GIN index.
//!
//! `q` never reaches SQL as text to parse: it is split into words of letters
//! and digits in Rust, dictionary words are taken only when they are letters
//! and digits too, so tsquery operators (`&|!():*<>'\`) cannot appear in the
//! tsquery, and the tsquery and `q` are bound parameters.
//!
//! The score is `ts_rank` of the query with its alternatives, plus
//! `ts_rank` of `q`'s words as typed (a word spelt as asked outranks a
//! correction), plus the similarity of `q` to the name (a name match
//! outranks a description match). Pages are a keyset on `(score, id)`,
//! both descending; the cursor carries the exact score.

use axum::extract::State;
use axum::response::Response;
use infra::http::auth::Viewer;
use infra::http::{ApiError, Problem, QueryPairs};
use infra::views::{AgentView, Page};
use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, QueryBuilder, Row};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::QueryState;
use crate::agents::AgentList;
use crate::filters::Filters;
use crate::paging::{Cursor, PageQuery, keyset_page, parse_cursor, parse_limit};
use crate::params::Params;
use crate::problems::{RequestProblems, Unavailable};
use crate::projection::{CHECKPOINT, Fresh, MinSeq, MinSeqHeader};
use crate::rows::{AGENT_COLUMNS, agent_of};

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
    /// `q`, trimmed and lowercased: compared with the name for the score.
    pub text: String,
    /// `q`'s words (letters and digits only), lowercased, at most
    /// [`MAX_WORDS`]; empty when `q` has no letter or digit.
    pub words: Vec<String>,
    /// For each of `words`, the close dictionary words that also match it
    /// (filled by [`Search::expand`]).
    pub alternatives: Vec<Vec<String>>,
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
/// [`MAX_WORDS`]. Nothing in them is a tsquery operator or quote.
pub fn query_words(q: &str) -> Vec<String> {
    q.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(MAX_WORDS)
        .map(str::to_lowercase)
        .collect()
}

/// Whether a word is worth a dictionary lookup for typos: four characters
/// or more (shorter ones have too few trigrams to compare) and not a
/// number (a different number is not a typo).
fn fuzzy_candidate(word: &str) -> bool {
    word.chars().count() >= 4 && !word.chars().all(|c| c.is_ascii_digit())
}

/// A tsquery of `words`, each a prefix, AND-ed; with `alternatives`, each
/// word OR-ed with its close dictionary words (whole words).
fn tsquery(words: &[String], alternatives: &[Vec<String>]) -> String {
    let mut out = String::new();
    for (i, word) in words.iter().enumerate() {
        if i > 0 {
            out.push_str(" & ");
        }
        let alts = alternatives.get(i).map_or(&[][..], Vec::as_slice);
        if alts.is_empty() {
            out.push_str(&format!("'{word}':*"));
        } else {
            out.push_str(&format!("('{word}':*"));
            for alt in alts {
                out.push_str(&format!(" | '{alt}'"));
            }
            out.push(')');
        }
    }
    out
}

/// Close words in the dictionary for each word worth a lookup: trigram
/// similarity at least 0.5 (the `%` operator's index scan finds those above
/// pg_trgm's 0.3 first), best four, the word itself excluded.
const ALTERNATIVES_SQL: &str = "SELECT q.i, d.word FROM unnest($1::text[]) WITH ORDINALITY AS q(word, i), \
     LATERAL (SELECT word FROM search_words WHERE word % q.word AND word <> q.word \
       AND similarity(word, q.word) >= 0.5 \
       ORDER BY similarity(word, q.word) DESC, word LIMIT 4) d";

/// The handler's parameters are the search itself ([`Search::parse`]).
impl Params for Search {
    fn parse(query: &QueryPairs) -> Result<Search, ApiError> {
        Search::parse(query)
    }
}

impl Search {
    /// Checks every parameter: `q`, and the list's filters and page. `q` is
    /// required, 1..=200 characters after trimming, without NUL.
    pub fn parse(query: &QueryPairs) -> Result<Search, ApiError> {
        query.only(&[&["q"][..], &AgentList::PARAMS].concat())?;
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
        let words = query_words(q);
        Ok(Search {
            text: q.to_lowercase(),
            alternatives: vec![Vec::new(); words.len()],
            words,
            filters: Filters::parse(query)?,
            cursor: parse_cursor(query)?,
            limit: parse_limit(query)?,
        })
    }

    /// Looks the words of `q` that may be misspelt up in the dictionary
    /// and keeps their close words as alternatives. Only words of letters
    /// and digits are kept, so none can break out of the tsquery.
    pub async fn expand(&mut self, pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
        let looked_up: Vec<String> = self
            .words
            .iter()
            .map(|w| {
                if fuzzy_candidate(w) {
                    w.clone()
                } else {
                    String::new()
                }
            })
            .collect();
        if looked_up.iter().all(String::is_empty) {
            return Ok(());
        }
        let found: Vec<(i64, String)> = sqlx::query_as(ALTERNATIVES_SQL)
            .bind(&looked_up)
            .fetch_all(pool)
            .await?;
        for (i, word) in found {
            let Some(alts) = usize::try_from(i - 1)
                .ok()
                .and_then(|i| self.alternatives.get_mut(i))
            else {
                continue;
            };
            if word.chars().all(char::is_alphanumeric) {
                alts.push(word);
            }
        }
        Ok(())
    }

    /// The statement the handler runs, behind `prefix` (tests put
    /// `EXPLAIN` there). Every user value is a bound parameter.
    pub fn build(&self, prefix: &str) -> QueryBuilder<Postgres> {
        let mut qb = QueryBuilder::<Postgres>::new(format!(
            "{prefix}SELECT c.seq AS projection_seq, {AGENT_COLUMNS}, a.score FROM {} \
             LEFT JOIN LATERAL (SELECT * FROM (SELECT agents.*, (",
            *CHECKPOINT
        ));
        if self.words.is_empty() {
            // Without a letter or digit there is no word to match: nothing
            // can match, and the plan says so without reading a row.
            qb.push("0::float8) AS score FROM agents WHERE false");
        } else {
            let expanded = tsquery(&self.words, &self.alternatives);
            let typed = tsquery(&self.words, &[]);
            qb.push("ts_rank(search_doc, to_tsquery('simple', ")
                .push_bind(expanded.clone())
                .push("))::float8 + ts_rank(search_doc, to_tsquery('simple', ")
                .push_bind(typed)
                .push("))::float8 + similarity(")
                .push_bind(self.text.clone())
                .push(", lower(name))::float8) AS score FROM ")
                // Candidates first, bounded: ranking every match of a
                // common word in a large table (a third of it, say) would
                // cost seconds. At most SEARCH_CANDIDATES matches are
                // scored, each fetched by primary key (LATERAL), never a
                // scan of the table joined against the candidates.
                .push("(SELECT id FROM agents WHERE search_doc @@ to_tsquery('simple', ")
                .push_bind(expanded)
                .push(")");
            self.filters.push_where(&mut qb);
            qb.push(" LIMIT ")
                .push_bind(SEARCH_CANDIDATES)
                .push(") candidates, LATERAL (SELECT * FROM agents a0 WHERE a0.id = candidates.id LIMIT 1) agents");
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
        Filters, PageQuery, MinSeq, MinSeqHeader,
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Page<SearchHit>, headers(("X-Projection-Seq" = u64))),
        RequestProblems, Unavailable,
        (status = 400, description = "Missing or too long q, bad filter or cursor", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn search_agents(
    State(state): State<QueryState>,
    _viewer: Viewer,
    Fresh(mut search): Fresh<Search>,
) -> Result<Response, ApiError> {
    search.expand(&state.pool).await?;
    let rows = search.build("").build().fetch_all(&state.pool).await?;
    keyset_page(&rows, search.limit, hit_of, |h| SearchCursor {
        score: h.score,
        id: h.agent.id,
    })
}

/// The hit of a row from [`Search::build`]; `None` for the row of a join
/// that found nothing.
fn hit_of(row: &PgRow) -> Result<Option<SearchHit>, sqlx::Error> {
    let Some(agent) = agent_of(row)? else {
        return Ok(None);
    };
    Ok(Some(SearchHit {
        agent,
        score: row.try_get("score")?,
    }))
}

pub fn router() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new().routes(routes!(search_agents))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_never_reaches_the_tsquery_as_syntax() {
        let words = query_words("a&b|!(c):*'d\\");
        assert_eq!(tsquery(&words, &[]), "'a':* & 'b':* & 'c':* & 'd':*");
        assert!(query_words("&|!():*%_'\\").is_empty());
        let words = query_words("Ünïcode 日本");
        assert_eq!(tsquery(&words, &[]), "'ünïcode':* & '日本':*");
    }

    #[test]
    fn alternatives_are_or_ed_with_the_word_they_correct() {
        let words = query_words("sumarizer bot");
        let alts = vec![
            vec!["summarizer".to_owned(), "summarize".to_owned()],
            vec![],
        ];
        assert_eq!(
            tsquery(&words, &alts),
            "('sumarizer':* | 'summarizer' | 'summarize') & 'bot':*"
        );
        assert!(fuzzy_candidate("sumarizer"));
        assert!(!fuzzy_candidate("bot"));
        assert!(!fuzzy_candidate("20261127"));
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
