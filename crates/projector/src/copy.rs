//! Rows for `COPY … FROM STDIN (FORMAT binary)`, the cheapest way to hand
//! PostgreSQL rows to insert.
//!
//! Against an `INSERT … SELECT FROM UNNEST(…)` of the same rows, the server
//! skips building and unnesting arrays and the executor's projection, and
//! the client sends each value once, in the form the server stores (a
//! `jsonb` value is still parsed from its text, as on any path in). The
//! format is PostgreSQL's documented one: a header, then per row a field
//! count and each field as a length (-1 for NULL) and its binary value,
//! then a trailer.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

/// `PGCOPY\n\xff\r\n\0`, no flags, no header extension.
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The `oid` of `text`, named in a binary `text[]`.
const TEXT_OID: i32 = 25;

/// The rows of one COPY, in binary form, sent in chunks as they grow: the
/// server parses and inserts a chunk while the caller prepares the next.
pub struct CopyRows {
    buf: Vec<u8>,
}

impl CopyRows {
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes.max(HEADER.len()));
        buf.extend_from_slice(HEADER);
        CopyRows { buf }
    }

    /// Starts a row of `fields` values, which the calls after it give in
    /// the order of the COPY's column list.
    pub fn row(&mut self, fields: i16) -> &mut Self {
        self.buf.extend_from_slice(&fields.to_be_bytes());
        self
    }

    fn field(&mut self, value: &[u8]) -> &mut Self {
        let len = i32::try_from(value.len()).unwrap_or(i32::MAX);
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(value);
        self
    }

    pub fn null(&mut self) -> &mut Self {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
        self
    }

    pub fn uuid(&mut self, v: Uuid) -> &mut Self {
        self.field(v.as_bytes())
    }

    pub fn opt_uuid(&mut self, v: Option<Uuid>) -> &mut Self {
        match v {
            Some(v) => self.uuid(v),
            None => self.null(),
        }
    }

    pub fn text(&mut self, v: &str) -> &mut Self {
        self.field(v.as_bytes())
    }

    pub fn int4(&mut self, v: i32) -> &mut Self {
        self.field(&v.to_be_bytes())
    }

    pub fn int8(&mut self, v: i64) -> &mut Self {
        self.field(&v.to_be_bytes())
    }

    pub fn timestamptz(&mut self, v: DateTime<Utc>) -> &mut Self {
        self.int8(v.timestamp_micros() - PG_EPOCH_MICROS)
    }

    /// A `jsonb` value from its JSON text (format version 1).
    pub fn jsonb(&mut self, json: &str) -> &mut Self {
        let len = i32::try_from(json.len() + 1).unwrap_or(i32::MAX);
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.push(1);
        self.buf.extend_from_slice(json.as_bytes());
        self
    }

    /// A one-dimensional `text[]` without NULLs (`{}` when empty).
    pub fn text_array(&mut self, items: &[String]) -> &mut Self {
        let body: usize = items.iter().map(|s| 4 + s.len()).sum();
        let dims = if items.is_empty() { 0 } else { 8 };
        let len = i32::try_from(12 + dims + body).unwrap_or(i32::MAX);
        self.buf.extend_from_slice(&len.to_be_bytes());
        let ndim = i32::from(!items.is_empty());
        for word in [ndim, 0, TEXT_OID] {
            self.buf.extend_from_slice(&word.to_be_bytes());
        }
        if !items.is_empty() {
            let n = i32::try_from(items.len()).unwrap_or(i32::MAX);
            for word in [n, 1] {
                self.buf.extend_from_slice(&word.to_be_bytes());
            }
        }
        for item in items {
            self.field(item.as_bytes());
        }
        self
    }

    /// Bytes ready to send.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Takes what is ready to send, leaving the buffer empty for the rows
    /// after it.
    pub fn take(&mut self) -> Vec<u8> {
        let capacity = self.buf.capacity();
        std::mem::replace(&mut self.buf, Vec::with_capacity(capacity))
    }

    /// The last of the data: what is left, and the trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }
}

/// COPYs `rows` (all of them, or what a [`CopyRows::take`] left) with
/// `statement`, a `COPY … FROM STDIN (FORMAT binary)`.
pub async fn copy_all(
    conn: &mut PgConnection,
    statement: &str,
    rows: CopyRows,
) -> Result<u64, sqlx::Error> {
    let mut copy = conn.copy_in_raw(statement).await?;
    copy.send(rows.finish()).await?;
    copy.finish().await
}
