//! Query parameters: what each read endpoint parses from its query string,
//! and the kinds of value several endpoints share (times, one of a few
//! names).
//!
//! Every endpoint refuses a parameter it does not know, so a typo is a 400
//! rather than a silently ignored filter.

use chrono::{DateTime, Utc};
use infra::http::{ApiError, QueryPairs};

/// An endpoint's parameters, parsed and checked from its query string.
/// `min_seq` is among the ones each allows; the `Fresh` extractor that
/// parses them honours it.
pub trait Params: Sized + Send {
    /// 400 on any parameter the endpoint does not take or cannot parse.
    fn parse(query: &QueryPairs) -> Result<Self, ApiError>;
}

/// An endpoint with no parameter of its own: only `min_seq`.
impl Params for () {
    fn parse(query: &QueryPairs) -> Result<(), ApiError> {
        query.only(&["min_seq"])
    }
}

/// Parses an RFC 3339 time from a query parameter. A `+` decoded to a
/// space by form decoding is taken back as `+`.
pub(crate) fn parse_time(name: &'static str) -> impl Fn(&str) -> Result<DateTime<Utc>, ApiError> {
    move |raw| {
        DateTime::parse_from_rfc3339(raw)
            .or_else(|_| DateTime::parse_from_rfc3339(&raw.replace(' ', "+")))
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| {
                ApiError::BadRequest(format!(
                    "query parameter {name:?} must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z"
                ))
            })
    }
}

/// A parameter whose value names one of a few choices: `default` when it
/// is absent, 400 listing the names when it is none of them.
pub(crate) fn one_of<T: Copy>(
    param: &str,
    raw: Option<&str>,
    default: T,
    choices: &[T],
    name: impl Fn(T) -> &'static str,
) -> Result<T, ApiError> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    choices
        .iter()
        .copied()
        .find(|c| name(*c) == raw)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|c| name(*c)).collect();
            ApiError::BadRequest(format!(
                "{param} {raw:?} is not one of {}",
                names.join(", ")
            ))
        })
}
