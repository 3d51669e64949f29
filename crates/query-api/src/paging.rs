//! Keyset pagination, the same for every list: `limit`, an opaque cursor
//! after the last item of a page, and the page built from rows fetched one
//! past the limit (the extra row only says there is more).
//!
//! A keyset never skips or repeats an item while the data stands still,
//! and costs the same on the thousandth page as on the first.

use axum::Json;
use axum::response::Response;
use base64::Engine;
use chrono::{DateTime, Utc};
use infra::http::{ApiError, QueryPairs};
use infra::views::Page;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, QueryBuilder};
use utoipa::IntoParams;
use uuid::Uuid;

use crate::params::Params;
use crate::projection::{CHECKPOINT, projection_seq, with_projection_seq};

/// `limit`: 1..=500, default 50.
pub(crate) fn parse_limit(q: &QueryPairs) -> Result<i64, ApiError> {
    match q.parse::<i64>("limit")? {
        None => Ok(50),
        Some(n) if (1..=500).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::BadRequest(
            "limit must be between 1 and 500".into(),
        )),
    }
}

/// `cursor`: the `next_cursor` of the previous page, if any.
pub(crate) fn parse_cursor<C: Cursor>(q: &QueryPairs) -> Result<Option<C>, ApiError> {
    q.one("cursor")?.map(C::decode).transpose()
}

/// The position after the last item of a page. Clients see it only as
/// opaque text (its own text, base64url-encoded), so its form can change
/// without breaking them.
pub trait Cursor: Sized {
    /// The cursor's own text.
    fn to_text(&self) -> String;

    /// Reads the cursor's own text back; `None` when it is not one.
    fn from_text(text: &str) -> Option<Self>;

    fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.to_text())
    }

    /// 400 when `s` is not a cursor of this kind.
    fn decode(s: &str) -> Result<Self, ApiError> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()
            .and_then(|raw| String::from_utf8(raw).ok())
            .and_then(|text| Self::from_text(&text))
            .ok_or_else(|| ApiError::BadRequest("the cursor is not valid".into()))
    }
}

/// The position in a newest-first list: creation time, then id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreatedCursor {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

impl Cursor for CreatedCursor {
    fn to_text(&self) -> String {
        format!("{}:{}", self.created_at.timestamp_micros(), self.id)
    }

    fn from_text(text: &str) -> Option<CreatedCursor> {
        let (micros, id) = text.split_once(':')?;
        Some(CreatedCursor {
            created_at: DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            id: id.parse().ok()?,
        })
    }
}

/// Which page of a list: `limit` and `cursor`.
#[derive(Debug)]
pub struct PageParams<C> {
    pub limit: i64,
    pub cursor: Option<C>,
}

impl<C: Cursor> PageParams<C> {
    /// The two paging parameters, for an endpoint that takes others too.
    pub(crate) fn from_query(q: &QueryPairs) -> Result<PageParams<C>, ApiError> {
        Ok(PageParams {
            limit: parse_limit(q)?,
            cursor: parse_cursor(q)?,
        })
    }
}

/// `limit` and `cursor` as the spec documents them, for every list to name
/// in its `params(...)`; they parse into [`PageParams`]. (`PageParams`
/// cannot document itself: its cursor type has no schema, only text.)
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// 1..=500, default 50
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// next_cursor of the previous page
    pub cursor: Option<String>,
}

/// A list that takes nothing but the page.
impl<C: Cursor + Send> Params for PageParams<C> {
    fn parse(query: &QueryPairs) -> Result<Self, ApiError> {
        query.only(&["limit", "cursor", "min_seq"])?;
        PageParams::from_query(query)
    }
}

/// One page of `table`, newest first, joined to the checkpoint: `columns`
/// read from the page's rows as `alias`. `filter` appends the caller's
/// `AND ...` conditions. The caller runs it and hands the rows to
/// [`keyset_page`].
pub(crate) fn newest_first(
    columns: &str,
    table: &str,
    alias: &str,
    page: &PageParams<CreatedCursor>,
    filter: impl FnOnce(&mut QueryBuilder<Postgres>),
) -> QueryBuilder<Postgres> {
    let mut qb = QueryBuilder::<Postgres>::new(format!(
        "SELECT c.seq AS projection_seq, {columns} FROM {} \
         LEFT JOIN LATERAL (SELECT * FROM {table} WHERE true",
        *CHECKPOINT
    ));
    filter(&mut qb);
    if let Some(c) = page.cursor {
        qb.push(" AND (created_at, id) < (")
            .push_bind(c.created_at)
            .push(", ")
            .push_bind(c.id)
            .push(")");
    }
    qb.push(" ORDER BY created_at DESC, id DESC LIMIT ")
        .push_bind(page.limit + 1);
    qb.push(") ").push(alias).push(" ON true");
    qb
}

/// A page from rows fetched with `LIMIT limit + 1` and joined to the
/// checkpoint, in the order the rows come: the items (`item_of` is `None`
/// for the row of a join that found nothing), the cursor after the last one
/// when there is more, and `X-Projection-Seq`.
pub(crate) fn keyset_page<T: serde::Serialize, C: Cursor>(
    rows: &[PgRow],
    limit: i64,
    item_of: impl Fn(&PgRow) -> Result<Option<T>, sqlx::Error>,
    cursor_of: impl Fn(&T) -> C,
) -> Result<Response, ApiError> {
    let seq = rows.first().map(projection_seq).transpose()?.unwrap_or(0);
    let mut items = Vec::with_capacity(rows.len());
    for row in rows {
        if let Some(item) = item_of(row)? {
            items.push(item);
        }
    }
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|item| cursor_of(item).encode())
    } else {
        None
    };
    Ok(with_projection_seq(Json(Page { items, next_cursor }), seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = CreatedCursor {
            created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: Uuid::now_v7(),
        };
        assert_eq!(CreatedCursor::decode(&c.encode()).unwrap(), c);
        assert!(CreatedCursor::decode("not a cursor").is_err());
        assert!(CreatedCursor::decode("bm9wZQ").is_err());
    }
}
