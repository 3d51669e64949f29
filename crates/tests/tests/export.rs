//! `GET /agents/export`: every format parses back to exactly the rows, CSV
//! quoting holds, and 100,000 rows stream in constant memory.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use reqwest::Method;
use serde_json::{Value, json};
use tests::{TestApp, header, header_u64};
use uuid::Uuid;

/// A streaming RFC 4180 parser: feed bytes, take whole records.
#[derive(Default)]
struct CsvParser {
    field: Vec<u8>,
    record: Vec<String>,
    in_quotes: bool,
    quote_pending: bool,
    cr: bool,
}

impl CsvParser {
    fn feed(&mut self, bytes: &[u8], mut on_record: impl FnMut(Vec<String>)) {
        for &b in bytes {
            if self.in_quotes {
                if self.quote_pending {
                    self.quote_pending = false;
                    if b == b'"' {
                        self.field.push(b'"');
                        continue;
                    }
                    self.in_quotes = false;
                    // fall through: the byte after a closing quote
                } else if b == b'"' {
                    self.quote_pending = true;
                    continue;
                } else {
                    self.field.push(b);
                    continue;
                }
            }
            match b {
                b'"' if self.field.is_empty() => self.in_quotes = true,
                b',' => self.end_field(),
                b'\r' => self.cr = true,
                b'\n' => {
                    assert!(self.cr, "records end with CRLF");
                    self.cr = false;
                    self.end_field();
                    on_record(std::mem::take(&mut self.record));
                }
                _ => {
                    assert!(!self.cr, "a bare CR outside quotes");
                    self.field.push(b)
                }
            }
        }
    }

    fn end_field(&mut self) {
        let f = String::from_utf8(std::mem::take(&mut self.field)).unwrap();
        self.record.push(f);
    }

    fn finish(&self) {
        assert!(
            self.field.is_empty() && self.record.is_empty() && !self.in_quotes,
            "the body ends inside a record"
        );
    }
}

/// This process's resident memory in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

const ROWS: u64 = 100_000;

fn id_of(i: u64) -> Uuid {
    Uuid::parse_str(&format!("00000000-0000-4000-8000-{i:012x}")).unwrap()
}

fn index_of(id: &str) -> u64 {
    let id = Uuid::parse_str(id).unwrap();
    let i = (id.as_u128() & 0xffff_ffff_ffff) as u64;
    assert_eq!(id_of(i), id);
    i
}

/// What row `i` was seeded with: every thousandth name needs quoting.
fn name_of(i: u64) -> String {
    if i.is_multiple_of(1000) {
        format!("agent {i}, \"quoted\"\nsecond line")
    } else {
        format!("agent {i}")
    }
}

/// Checks one exported agent against what was seeded; returns its index.
fn check_row(a: &Value) -> u64 {
    let i = index_of(a["id"].as_str().unwrap());
    assert_eq!(a["name"], name_of(i));
    assert_eq!(a["type"], ["llm", "tool", "router"][(i % 3) as usize]);
    assert_eq!(a["description"], format!("row {i}"));
    assert_eq!(
        a["status"],
        ["active", "inactive", "paused", "error"][(i % 4) as usize]
    );
    assert_eq!(a["capabilities"], json!([format!("cap{}", i % 7), "all"]));
    assert_eq!(a["config"], json!({"n": i}));
    assert_eq!(a["tags"], json!({"shard": (i % 10).to_string()}));
    assert_eq!(a["project_id"], Value::Null);
    assert_eq!(a["version"], 1);
    assert_eq!(a["created_by"], "seed");
    i
}

/// A CSV record as the agent JSON it stands for.
fn csv_to_agent(header: &[String], record: Vec<String>) -> Value {
    assert_eq!(record.len(), header.len(), "{record:?}");
    let mut a = serde_json::Map::new();
    for (k, v) in header.iter().zip(record) {
        let v = match k.as_str() {
            "capabilities" | "config" | "tags" => serde_json::from_str(&v).unwrap(),
            "version" => json!(v.parse::<u64>().unwrap()),
            "project_id" if v.is_empty() => Value::Null,
            _ => Value::String(v),
        };
        a.insert(k.clone(), v);
    }
    Value::Object(a)
}

/// Streams one export, checking every row as it arrives; returns how far
/// resident memory rose above `baseline` at most.
async fn export_and_check(app: &TestApp, token: &str, format: &str, baseline: u64) -> u64 {
    let r = app
        .request(
            Method::GET,
            &format!("/api/v1/agents/export?format={format}"),
            Some(token),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{format}");
    let disposition = header(&r, "content-disposition").unwrap();
    assert!(
        disposition.starts_with("attachment;") && disposition.ends_with(&format!(".{format}\"")),
        "{disposition}"
    );
    assert!(header(&r, "x-projection-seq").is_some());
    assert!(
        header(&r, "content-length").is_none(),
        "streamed, not buffered"
    );

    let mut seen = vec![false; ROWS as usize + 1];
    let mut count = 0u64;
    let mut peak = 0u64;
    let mut mark = |i: u64| {
        assert!(
            !std::mem::replace(&mut seen[i as usize], true),
            "row {i} twice"
        );
        count += 1;
    };
    let mut r = r;
    let mut csv = CsvParser::default();
    let mut csv_header: Option<Vec<String>> = None;
    let mut line = Vec::new();
    let mut json_open = false;
    let mut json_closed = false;
    let mut chunks = 0u64;
    while let Some(chunk) = r.chunk().await.unwrap() {
        chunks += 1;
        if chunks.is_multiple_of(16) {
            peak = peak.max(rss().saturating_sub(baseline));
        }
        match format {
            "csv" => csv.feed(&chunk, |record| match &csv_header {
                None => csv_header = Some(record),
                Some(h) => mark(check_row(&csv_to_agent(h, record))),
            }),
            _ => {
                for &b in chunk.iter() {
                    if b != b'\n' {
                        line.push(b);
                        continue;
                    }
                    let text = std::str::from_utf8(&line).unwrap();
                    match (format, text) {
                        ("json", "[") => json_open = true,
                        ("json", "]") => json_closed = true,
                        ("json", t) => {
                            assert!(json_open && !json_closed);
                            let t = t.strip_suffix(',').unwrap_or(t);
                            mark(check_row(&serde_json::from_str(t).unwrap()));
                        }
                        (_, t) => mark(check_row(&serde_json::from_str(t).unwrap())),
                    }
                    line.clear();
                }
            }
        }
    }
    peak = peak.max(rss().saturating_sub(baseline));
    csv.finish();
    assert!(line.is_empty(), "{format}: the body ends with a newline");
    if format == "json" {
        assert!(json_open && json_closed, "a whole JSON array");
    }
    if format == "csv" {
        assert_eq!(
            csv_header.unwrap(),
            [
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
                "created_by"
            ]
        );
    }
    assert_eq!(count, ROWS, "{format}: every row exactly once");
    assert!(seen[1..].iter().all(|s| *s), "{format}: no row missing");
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_agents_stream_in_every_format_in_constant_memory() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    // Seeded straight into the read model, for speed.
    sqlx::query(
        "INSERT INTO agents (id, name, type, description, status, capabilities, config, tags, \
           project_id, version, created_at, updated_at, created_by, last_seq) \
         SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, \
           CASE WHEN i % 1000 = 0 THEN 'agent ' || i || ', \"quoted\"' || chr(10) || 'second line' \
                ELSE 'agent ' || i END, \
           (ARRAY['llm','tool','router'])[1 + i % 3], 'row ' || i, \
           (ARRAY['active','inactive','paused','error'])[1 + i % 4], \
           ARRAY['cap' || (i % 7), 'all'], jsonb_build_object('n', i), \
           jsonb_build_object('shard', (i % 10)::text), NULL, 1, \
           now() - i * interval '1 millisecond', now(), 'seed', 0 \
         FROM generate_series(1, $1) AS i",
    )
    .bind(ROWS as i64)
    .execute(&app.deps.pool)
    .await
    .unwrap();

    // Warm up the client and server paths once, so the baseline includes
    // their one-time allocations.
    let r = app
        .request(
            Method::GET,
            "/api/v1/agents/export?format=ndjson&type=nonexistent",
            Some(&token),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), 0);

    for format in ["csv", "ndjson", "json"] {
        let baseline = rss();
        let growth = export_and_check(&app, &token, format, baseline).await;
        eprintln!(
            "{format}: resident memory grew by {} KiB at most",
            growth / 1024
        );
        assert!(
            growth < 50 * 1024 * 1024,
            "{format}: resident memory grew by {} MiB",
            growth / 1024 / 1024
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_quotes_commas_quotes_and_newlines_and_formats_agree() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let mut seq = 0;
    for body in [
        json!({"name": "Smith, \"Agent\"\nNo. 7", "type": "llm",
               "description": "line one\r\nline two, with \"quotes\"",
               "capabilities": ["a,b", "say \"hi\""], "tags": {"k": "v,w"}}),
        json!({"name": "plain", "type": "tool", "status": "paused"}),
        json!({"name": "ünïcødé 日本", "type": "llm", "description": ",\",\n"}),
    ] {
        let r = app.create_agent(&token, body).await;
        assert_eq!(r.status(), 201);
        seq = header_u64(&r, "x-event-seq");
    }
    let list: Value = app
        .request(
            Method::GET,
            &format!("/api/v1/agents?min_seq={seq}"),
            Some(&token),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let expected = list["items"].as_array().unwrap().clone();
    assert_eq!(expected.len(), 3);

    let get = |format: &'static str, extra: &'static str| {
        let app = &app;
        let token = token.clone();
        async move {
            let r = app
                .request(
                    Method::GET,
                    &format!("/api/v1/agents/export?format={format}{extra}"),
                    Some(&token),
                )
                .header("x-min-event-seq", seq.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert!(header_u64(&r, "x-projection-seq") >= seq);
            let ct = header(&r, "content-type").unwrap();
            (ct, r.bytes().await.unwrap())
        }
    };

    // CSV: the same agents, fields intact, newest first like the list.
    let (ct, body) = get("csv", "").await;
    assert!(ct.starts_with("text/csv"), "{ct}");
    let mut parser = CsvParser::default();
    let mut records = Vec::new();
    parser.feed(&body, |r| records.push(r));
    parser.finish();
    let header_row = records.remove(0);
    let mut from_csv: Vec<Value> = records
        .into_iter()
        .map(|r| csv_to_agent(&header_row, r))
        .collect();
    for (got, want) in from_csv.iter_mut().zip(&expected) {
        // CSV has text only: compare the times as given.
        assert_eq!(got["created_at"], want["created_at"]);
        assert_eq!(got, want);
    }
    assert_eq!(from_csv.len(), 3);
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.contains("\"Smith, \"\"Agent\"\"\nNo. 7\""), "{text}");
    // No default format parameter means CSV.
    let (ct, _) = get("csv", "&status=paused").await;
    assert!(ct.starts_with("text/csv"));

    // NDJSON and JSON: exactly the list's objects.
    let (ct, body) = get("ndjson", "").await;
    assert_eq!(ct, "application/x-ndjson");
    let lines: Vec<Value> = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(lines, expected);
    let (ct, body) = get("json", "").await;
    assert_eq!(ct, "application/json");
    let all: Vec<Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!(all, expected);

    // Filters apply; an empty export is a valid empty file.
    let (_, body) = get("json", "&status=paused").await;
    let paused: Vec<Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!(paused.len(), 1);
    assert_eq!(paused[0]["name"], "plain");
    let (_, body) = get("json", "&type=nothing").await;
    assert_eq!(
        serde_json::from_slice::<Vec<Value>>(&body).unwrap(),
        Vec::<Value>::new()
    );

    // Bad requests.
    for bad in ["format=xml", "bogus=1", "status=sleeping", "tag=nocolon"] {
        let r = app
            .request(
                Method::GET,
                &format!("/api/v1/agents/export?{bad}"),
                Some(&token),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
    let r = app
        .request(Method::GET, "/api/v1/agents/export", None)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// Fields a spreadsheet would run as a formula are defused in CSV (a
/// leading `'`, quoted), unless the client asks for them verbatim; other
/// formats are never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_defuses_formulas_unless_asked_not_to() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let r = app
        .create_agent(
            &token,
            json!({"name": "=HYPERLINK(\"http://evil.example\",\"x\")", "type": "-llm",
                   "description": "@SUM(A1:A9)", "capabilities": ["+1"],
                   "tags": {"k": "\tv"}}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let seq = header_u64(&r, "x-event-seq");
    let export = |query: &'static str| {
        let app = &app;
        let token = token.clone();
        async move {
            let r = app
                .request(
                    Method::GET,
                    &format!("/api/v1/agents/export?min_seq={seq}&{query}"),
                    Some(&token),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{query}");
            let mut parser = CsvParser::default();
            let mut records = Vec::new();
            parser.feed(&r.bytes().await.unwrap(), |r| records.push(r));
            parser.finish();
            assert_eq!(records.len(), 2, "{query}");
            let header_row = records.remove(0);
            header_row
                .into_iter()
                .zip(records.remove(0))
                .collect::<std::collections::HashMap<_, _>>()
        }
    };
    let guarded = export("format=csv").await;
    assert_eq!(
        guarded["name"],
        "'=HYPERLINK(\"http://evil.example\",\"x\")"
    );
    assert_eq!(guarded["type"], "'-llm");
    assert_eq!(guarded["description"], "'@SUM(A1:A9)");
    // JSON text starts with a bracket: nothing to defuse.
    assert_eq!(guarded["capabilities"], "[\"+1\"]");
    assert_eq!(guarded["status"], "active");

    let verbatim = export("format=csv&csv_formula_guard=false").await;
    assert_eq!(
        verbatim["name"],
        "=HYPERLINK(\"http://evil.example\",\"x\")"
    );
    assert_eq!(verbatim["type"], "-llm");
    assert_eq!(verbatim["description"], "@SUM(A1:A9)");

    let r = app
        .request(
            Method::GET,
            "/api/v1/agents/export?csv_formula_guard=maybe",
            Some(&token),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

/// A client that hangs up mid-export ends the export's transaction and
/// gives its connection back: forty abandoned exports in a row (more than
/// the pool holds) leave every read working and no transaction open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_exports_give_their_connections_back() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    app.seed_read_model_agents(20_000, 200).await;

    for _ in 0..40 {
        let mut r = app
            .request(Method::GET, "/api/v1/agents/export", Some(&token))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(!r.chunk().await.unwrap().unwrap().is_empty());
        drop(r); // hang up after the first chunk
    }

    let started = std::time::Instant::now();
    while app.transactions_left_open().await > 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "abandoned exports still hold {} transactions",
            app.transactions_left_open().await
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let r = app
        .request(Method::GET, "/api/v1/agents?limit=1", Some(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
