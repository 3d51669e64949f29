//! `GET /agents/export`: every agent that matches the list filters, streamed
//! as CSV, NDJSON or a JSON array.
//!
//! The whole export reads one snapshot: a `REPEATABLE READ READ ONLY`
//! transaction on a connection of its own, the checkpoint read first (it is
//! the `X-Projection-Seq` of the response), then a server-side cursor
//! fetched a chunk at a time. A task of its own fetches the chunks, at most
//! [`CHUNKS_AHEAD`] ahead of the response, which encodes and sends them: the
//! database reads the next chunk while this one is encoded and written, yet
//! memory stays constant whatever the row count, and a slow client only
//! slows the export down. The route is mounted outside the request timeout.
//!
//! An export holds its connection and snapshot for as long as its client
//! takes, so exports are bounded apart from everything else ([`Exports`]):
//! a pool of their own, a cap on how many run at once (503 with
//! `Retry-After` beyond it), and a stall timeout: a client that takes no
//! chunk for that long loses its export (transaction rolled back,
//! connection and slot given back, the response cut off).
//!
//! Should the database fail mid-stream, or the process's shutdown drain
//! end before the export does, the response is cut off (the chunked body
//! never ends properly), which every HTTP client reports as an error: a
//! truncated export never looks complete.
//!
//! CSV fields that a spreadsheet would run as a formula (starting with
//! `=`, `+`, `-`, `@`, a tab or a carriage return) are defused as OWASP
//! advises: prefixed with `'` and quoted. `csv_formula_guard=false` turns
//! that off for a consumer that wants the values verbatim.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chrono::SecondsFormat;
use futures::stream;
use infra::config::HttpConfig;
use infra::http::auth::Viewer;
use infra::http::send_timeout::SendTimeout;
use infra::http::{ApiError, QueryPairs};
use infra::views::AgentView;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, QueryBuilder, Transaction};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::QueryState;
use crate::filters::Filters;
use crate::params::{Params, one_of};
use crate::problems::{RequestProblems, Unavailable};
use crate::projection::{CHECKPOINT, Fresh, MinSeq, MinSeqHeader, with_projection_seq};
use crate::rows::{AGENT_COLUMNS, agent};

/// Rows fetched from the cursor at a time.
const CHUNK_ROWS: usize = 1_000;
/// Chunks fetched ahead of the one being sent: enough to keep the database
/// busy while the response encodes, few enough to bound memory (a chunk of
/// 1,000 agents is about half a megabyte).
const CHUNKS_AHEAD: usize = 2;

/// What every export of a process shares: the bounds that keep slow or
/// stalled downloads from taking what other requests need.
#[derive(Debug)]
pub struct Exports {
    /// The exports' own connections; never the reads' or the projector's.
    pool: PgPool,
    /// One permit per export running. Refusing at once beyond the cap
    /// (rather than queueing on the pool) tells the client to come back.
    slots: Arc<Semaphore>,
    /// How long a client may leave the next chunk untaken.
    stall_timeout: Duration,
    /// Fires when the shutdown drain ends: exports still running are cut
    /// off.
    stopped: CancellationToken,
}

impl Exports {
    /// Exports on a pool of their own beside `pool`, as `http` bounds them,
    /// cut off when `stopped` fires.
    pub fn new(pool: &PgPool, http: &HttpConfig, stopped: CancellationToken) -> Exports {
        let max = http.export_max_concurrent.max(1);
        Exports {
            pool: infra::db::side_pool(pool, max),
            slots: Arc::new(Semaphore::new(max as usize)),
            stall_timeout: http.export_stall_timeout(),
            stopped,
        }
    }

    fn slot(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            ApiError::Unavailable("too many exports are running; try again shortly".into())
        })
    }
}

/// The export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Ndjson,
    Json,
}

impl Format {
    fn parse(raw: Option<&str>) -> Result<Format, ApiError> {
        one_of(
            "format",
            raw,
            Format::Csv,
            &[Format::Csv, Format::Ndjson, Format::Json],
            Format::extension,
        )
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv; charset=utf-8; header=present",
            Format::Ndjson => "application/x-ndjson",
            Format::Json => "application/json",
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Ndjson => "ndjson",
            Format::Json => "json",
        }
    }
}

/// The CSV columns, in order: the agent's fields. `capabilities`, `config`
/// and `tags` are JSON text.
pub const CSV_HEADER: [&str; 13] = [
    "id",
    "name",
    "type",
    "description",
    "status",
    "capabilities",
    "config",
    "tags",
    "project_id",
    "version",
    "created_at",
    "updated_at",
    "created_by",
];

/// The first characters that make a spreadsheet read a cell as a formula
/// (OWASP, CSV injection).
const FORMULA_STARTS: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

/// Appends one RFC 4180 field: quoted (quotes doubled) when it holds a
/// comma, a quote, CR or LF. With `guard`, a field that starts like a
/// formula is prefixed with `'` and quoted, so a spreadsheet shows it as
/// text.
fn csv_field(out: &mut Vec<u8>, value: &str, guard: bool) {
    let defused = guard && value.starts_with(FORMULA_STARTS);
    if defused || value.contains([',', '"', '\r', '\n']) {
        out.push(b'"');
        if defused {
            out.push(b'\'');
        }
        for part in value.split_inclusive('"') {
            out.extend_from_slice(part.as_bytes());
            if part.ends_with('"') {
                out.push(b'"');
            }
        }
        out.push(b'"');
    } else {
        out.extend_from_slice(value.as_bytes());
    }
}

fn csv_record<'a>(out: &mut Vec<u8>, fields: impl IntoIterator<Item = &'a str>, guard: bool) {
    for (i, f) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        csv_field(out, f, guard);
    }
    out.extend_from_slice(b"\r\n");
}

fn csv_agent(out: &mut Vec<u8>, a: &AgentView, guard: bool) {
    let time = |t: &chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
    let fields = [
        a.id.to_string(),
        a.name.clone(),
        a.agent_type.clone(),
        a.description.clone(),
        a.status.clone(),
        to_json(&a.capabilities),
        to_json(&a.config),
        to_json(&a.tags),
        a.project_id.map(|p| p.to_string()).unwrap_or_default(),
        a.version.to_string(),
        time(&a.created_at),
        time(&a.updated_at),
        a.created_by.clone(),
    ];
    csv_record(out, fields.iter().map(String::as_str), guard);
}

/// Compact JSON text of a field (strings, lists and maps cannot fail to
/// serialize).
fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// How far the response has got.
struct Export {
    format: Format,
    /// Whether CSV fields that start like a formula are defused.
    formula_guard: bool,
    rows_sent: u64,
}

impl Export {
    /// The bytes before the first row.
    fn preamble(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self.format {
            Format::Csv => csv_record(&mut out, CSV_HEADER, false),
            Format::Json => out.push(b'['),
            Format::Ndjson => {}
        }
        out
    }

    fn encode(&mut self, rows: &[PgRow]) -> Result<Vec<u8>, anyhow::Error> {
        let mut out = Vec::with_capacity(rows.len() * 512);
        for row in rows {
            let a = agent(row)?;
            match self.format {
                Format::Csv => csv_agent(&mut out, &a, self.formula_guard),
                Format::Ndjson => {
                    serde_json::to_writer(&mut out, &a)?;
                    out.push(b'\n');
                }
                Format::Json => {
                    out.extend_from_slice(if self.rows_sent == 0 { b"\n" } else { b",\n" });
                    serde_json::to_writer(&mut out, &a)?;
                }
            }
            self.rows_sent += 1;
        }
        Ok(out)
    }

    fn trailer(&self) -> &'static [u8] {
        match self.format {
            Format::Json => b"\n]\n",
            _ => b"",
        }
    }
}

/// Fetches the cursor chunk by chunk into `chunks` until it is exhausted
/// (then commits, and ends with an empty chunk) or fails (then sends the
/// error). Stops as soon as the response is gone, or has taken no chunk for
/// `stall_timeout`: the transaction is dropped, which rolls it back and
/// returns the connection, and the export's slot is given back with it.
/// The response then ends in an error once the chunks already fetched are
/// sent.
async fn fetch_chunks(
    mut tx: Transaction<'static, Postgres>,
    chunks: mpsc::Sender<Result<Vec<PgRow>, anyhow::Error>>,
    stall_timeout: Duration,
    _slot: OwnedSemaphorePermit,
) {
    // Whether the response took `chunk` in time; every send is bounded,
    // the last one too, or a stalled client would keep its slot.
    let send = |chunk| async {
        match tokio::time::timeout(stall_timeout, chunks.send(chunk)).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                tracing::warn!(
                    ?stall_timeout,
                    "export client stopped reading; releasing its snapshot"
                );
                false
            }
        }
    };
    loop {
        let fetched = sqlx::query(sqlx::AssertSqlSafe(format!(
            "FETCH FORWARD {CHUNK_ROWS} FROM agents_export"
        )))
        .fetch_all(&mut *tx)
        .await;
        match fetched {
            Ok(rows) if rows.is_empty() => {
                let end = tx.commit().await.map(|()| rows).map_err(Into::into);
                send(end).await;
                return;
            }
            Ok(rows) => {
                if !send(Ok(rows)).await {
                    return;
                }
            }
            Err(e) => {
                send(Err(e.into())).await;
                return;
            }
        }
    }
}

/// Opens the snapshot and the cursor; returns the checkpoint it reflects.
async fn open(
    exports: &Exports,
    filters: &Filters,
) -> Result<(Transaction<'static, Postgres>, u64), ApiError> {
    let mut tx = exports.pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    // The first read fixes the snapshot: the checkpoint and every row come
    // from it.
    let seq: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT c.seq FROM {}",
        *CHECKPOINT
    )))
    .fetch_one(&mut *tx)
    .await?;
    let mut qb = QueryBuilder::<Postgres>::new(format!(
        "DECLARE agents_export NO SCROLL CURSOR FOR SELECT {AGENT_COLUMNS} FROM agents a WHERE true"
    ));
    filters.push_where(&mut qb);
    qb.push(" ORDER BY a.created_at DESC, a.id DESC");
    qb.build().execute(&mut *tx).await?;
    Ok((tx, seq.max(0) as u64))
}

/// `GET /agents/export`'s parameters: the format and the list filters.
#[derive(Debug)]
pub struct ExportParams {
    pub format: Format,
    /// `csv_formula_guard`: defuse CSV fields that start like a formula
    /// (default true).
    pub formula_guard: bool,
    pub filters: Filters,
}

impl Params for ExportParams {
    fn parse(query: &QueryPairs) -> Result<ExportParams, ApiError> {
        query.only(&[
            "format",
            "csv_formula_guard",
            "status",
            "type",
            "project_id",
            "tag",
            "min_seq",
        ])?;
        Ok(ExportParams {
            format: Format::parse(query.one("format")?)?,
            formula_guard: query.parse::<bool>("csv_formula_guard")?.unwrap_or(true),
            filters: Filters::parse(query)?,
        })
    }
}

/// Export agents as a file download.
///
/// Every agent matching the filters, newest first, from one consistent
/// snapshot (its sequence is `X-Projection-Seq`), streamed with constant
/// memory whatever the count, and exempt from the request timeout. A few
/// run at once (more get 503 with `Retry-After`); a client that takes no
/// data for the stall timeout has its download cut off.
/// `csv` (default): RFC 4180 with a header row and CRLF line ends;
/// `capabilities`, `config` and `tags` are JSON text, `project_id` is empty
/// when null; a field that starts with `=`, `+`, `-`, `@`, a tab or a
/// carriage return is prefixed with `'` and quoted, so a spreadsheet shows
/// it as text rather than run it as a formula (`csv_formula_guard=false`
/// keeps fields verbatim). `ndjson`: one agent object per line. `json`: one
/// array of agent objects. An export still running when the server's
/// shutdown drain ends is cut off.
#[utoipa::path(get, path = "/agents/export", tag = "agents",
    params(
        ("format" = inline(Option<infra::http::schema::ExportFormat>), Query, description = "csv (default), ndjson or json"),
        ("csv_formula_guard" = Option<bool>, Query, description = "CSV only: prefix fields that start with =, +, -, @, tab or CR with ' (default true)"),
        Filters, MinSeq, MinSeqHeader,
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The file, streamed", content(
            (String = "text/csv"), (String = "application/x-ndjson"), (Vec<AgentView> = "application/json")),
            headers(("Content-Disposition" = String), ("X-Projection-Seq" = u64))),
        RequestProblems, Unavailable,
    ))]
pub async fn export_agents(
    State(state): State<QueryState>,
    _viewer: Viewer,
    Fresh(ExportParams {
        format,
        formula_guard,
        filters,
    }): Fresh<ExportParams>,
    send_timeout: SendTimeout,
) -> Result<Response, ApiError> {
    let exports = &state.exports;
    let slot = exports.slot()?;
    // The connection too: a client that takes no bytes for as long is cut
    // off, rather than keep the chunks already fetched until TCP gives up.
    send_timeout.set(exports.stall_timeout);
    let (tx, seq) = open(exports, &filters).await?;

    let (sender, chunks) = mpsc::channel(CHUNKS_AHEAD);
    tokio::spawn(fetch_chunks(tx, sender, exports.stall_timeout, slot));
    let export = Export {
        format,
        formula_guard,
        rows_sent: 0,
    };
    let stopped = exports.stopped.clone();
    let preamble = Bytes::from(export.preamble());
    let rows = stream::try_unfold(
        (export, chunks, false),
        move |(mut export, mut chunks, done)| {
            let stopped = stopped.clone();
            async move {
                if done {
                    return Ok(None);
                }
                let rows = tokio::select! {
                    rows = chunks.recv() => rows,
                    () = stopped.cancelled() => anyhow::bail!("the server is shutting down"),
                };
                let rows =
                    rows.ok_or_else(|| anyhow::anyhow!("the export's fetch task ended early"))??;
                if rows.is_empty() {
                    let trailer = Bytes::from_static(export.trailer());
                    return Ok(Some((trailer, (export, chunks, true))));
                }
                let chunk = Bytes::from(export.encode(&rows)?);
                Ok::<_, anyhow::Error>(Some((chunk, (export, chunks, false))))
            }
        },
    );
    let body = futures::StreamExt::chain(stream::once(async { Ok(preamble) }), rows);
    let body = futures::TryStreamExt::map_err(body, |e: anyhow::Error| {
        tracing::error!(error = %e, "export failed mid-stream; cutting the response off");
        std::io::Error::other(e.to_string())
    });

    let filename = format!(
        "attachment; filename=\"agents-{}.{}\"",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
        format.extension()
    );
    let mut response = Body::from_stream(body).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    if let Ok(v) = HeaderValue::from_str(&filename) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(with_projection_seq(response, seq))
}

/// The streaming routes: mounted outside the request timeout.
pub fn router() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new().routes(routes!(export_agents))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_only_what_needs_it() {
        let mut out = Vec::new();
        csv_record(
            &mut out,
            ["plain", "a,b", "say \"hi\"", "two\nlines", ""],
            true,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "plain,\"a,b\",\"say \"\"hi\"\"\",\"two\nlines\",\r\n"
        );
    }

    #[test]
    fn csv_formula_guard_defuses_formula_starts_only() {
        let fields = [
            "=1+2", "+1", "-x", "@SUM(A1)", "\tx", "\rx", "a=b", "=\"q\",r",
        ];
        let mut out = Vec::new();
        csv_record(&mut out, fields, true);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\"'=1+2\",\"'+1\",\"'-x\",\"'@SUM(A1)\",\"'\tx\",\"'\rx\",a=b,\"'=\"\"q\"\",r\"\r\n"
        );
        let mut out = Vec::new();
        csv_record(&mut out, ["=1+2", "-x"], false);
        assert_eq!(String::from_utf8(out).unwrap(), "=1+2,-x\r\n");
    }
}
