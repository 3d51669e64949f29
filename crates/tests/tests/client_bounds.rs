//! What a broken or hostile client cannot pin or flood (issue 13): stalled
//! exports leave reads working and are released after the stall timeout,
//! made-up HTTP methods make no metrics series, and a bulk body of millions
//! of items is refused without being held in memory.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;
use tests::{Sandbox, TestApp, agent_body, eventually, header_u64};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use ymera::Role;

fn addr(app: &TestApp) -> SocketAddr {
    app.running.as_ref().unwrap().addr
}

/// An export requested by a client with a 4 KiB receive buffer that reads
/// the response head and then nothing: the stream and the head.
async fn stalled_export(addr: SocketAddr, token: &str) -> (TcpStream, String) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let request = format!(
        "GET /api/v1/agents/export HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("the response head in time")
            .unwrap();
        assert!(n > 0, "connection closed before the response head");
        head.extend_from_slice(&buf[..n]);
    }
    let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
    (stream, head)
}

fn status_of(head: &str) -> u16 {
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// 24 exports whose clients never read: a few run, the rest are refused
/// with 503 and `Retry-After`, and neither reads nor read-your-writes wait
/// on them (before: the exports held every pooled connection and `GET
/// /agents` answered 503 after a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_exports_leave_reads_working() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    // Some 20 MB to export, far more than the socket buffers between the
    // server and a client that never reads: such an export stalls with its
    // snapshot open.
    app.seed_read_model_agents(20_000, 1_000).await;

    // One after another, so that each holds its snapshot before the next asks.
    let mut exports = Vec::new();
    for _ in 0..24 {
        exports.push(stalled_export(addr(&app), &token).await);
    }

    for _ in 0..5 {
        let started = Instant::now();
        let r = app.read_at("/api/v1/agents?limit=1", &token, 0).await;
        assert_eq!(r.status(), 200);
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    }
    // Read-your-writes: the projector's connections are not the exports'.
    let started = Instant::now();
    let created = app.create_agent(&token, agent_body("written")).await;
    assert_eq!(created.status(), 201);
    let seq = header_u64(&created, "x-event-seq");
    let r = app.read_at("/api/v1/agents?limit=1", &token, seq).await;
    assert_eq!(r.status(), 200);
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    let running = exports.iter().filter(|(_, h)| status_of(h) == 200).count();
    for (_, head) in exports.iter().filter(|(_, h)| status_of(h) != 200) {
        assert_eq!(status_of(head), 503, "{head}");
        assert!(head.contains("retry-after:"), "{head}");
    }
    assert_eq!(running, 4, "exports running at once");
    drop(exports);
}

/// An export whose client stops reading is given up after the stall
/// timeout: its transaction ends, its slot is free for the next export,
/// and the stalled response ends cut off (no final chunk), never looking
/// complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_export_is_released_after_the_stall_timeout() {
    let sandbox = Sandbox::new().await;
    let mut settings = sandbox.settings.clone();
    settings.http.export_max_concurrent = 1;
    settings.http.export_stall_timeout_ms = 500;
    let app = sandbox.start_with(Role::All, &settings).await;
    let token = app.admin_token().await;
    // Some 20 MB to export, far more than the socket buffers between the
    // server and a client that never reads: such an export stalls with its
    // snapshot open.
    app.seed_read_model_agents(20_000, 1_000).await;

    let (mut stalled, head) = stalled_export(addr(&app), &token).await;
    assert_eq!(status_of(&head), 200, "{head}");
    let (_, refused) = stalled_export(addr(&app), &token).await;
    assert_eq!(status_of(&refused), 503, "one export at a time: {refused}");
    assert!(refused.contains("retry-after:"), "{refused}");

    // Its slot (and with it its transaction) is given back: the next
    // export runs.
    let started = Instant::now();
    let r = eventually(
        Duration::from_secs(10),
        "the stalled export's slot to be free",
        || async {
            let r = app
                .request(Method::GET, "/api/v1/agents/export", Some(&token))
                .send()
                .await
                .unwrap();
            (r.status() == 200).then_some(r)
        },
    )
    .await;
    println!("slot free after {:?}", started.elapsed());
    drop(r);
    eventually(
        Duration::from_secs(10),
        "no export transaction left open",
        || async { (app.transactions_left_open().await == 0).then_some(()) },
    )
    .await;

    // The stalled client, reading at last, gets what was already on its
    // way and then the end of a response that never completed.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => rest.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the cut-off response to end");
    assert!(
        !rest.ends_with(b"0\r\n\r\n"),
        "a stalled export looks complete"
    );
}

/// Unknown methods are counted as `OTHER`: a client cannot add series to
/// the exposition by inventing methods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_make_no_metrics_series() {
    let app = TestApp::spawn().await;
    for m in ["M1", "M2", "FROBNICATE"] {
        let method = Method::from_bytes(m.as_bytes()).unwrap();
        app.request(method, "/livez", None).send().await.unwrap();
    }
    let scrape = app.request(Method::GET, "/metrics", None).send();
    let text = scrape.await.unwrap().text().await.unwrap();
    for m in ["M1", "M2", "FROBNICATE"] {
        assert!(
            !text.contains(&format!("method=\"{m}\"")),
            "a series for {m}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("ymera_http_requests_total") && l.contains("method=\"OTHER\"")),
        "unknown methods are counted as OTHER"
    );
}

/// Peak and current resident memory of process `pid`, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Three concurrent 16 MiB bulk bodies of `[0,0,…]` (millions of items) are
/// refused with the count's 422 while the server's memory stays bounded
/// (before: each became millions of JSON values, 40 → 551 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_of_millions_of_items_is_refused_in_bounded_memory() {
    let sandbox = Sandbox::new().await;
    let (child, addr) = tests::process::spawn(&sandbox, "all");
    let pid = child.id().unwrap();
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let token = tests::process::ready_admin_token(addr).await;

    let limit = 16 * 1024 * 1024;
    let mut body = Vec::with_capacity(limit);
    body.extend_from_slice(b"{\"agents\":[0");
    while body.len() + 4 < limit {
        body.extend_from_slice(b",0");
    }
    body.extend_from_slice(b"]}");
    let body = bytes::Bytes::from(body);

    let (peak_before, _) = memory_kib(pid);
    let answers = futures::future::join_all((0..3).map(|_| {
        client
            .post(format!("{base}/api/v1/agents/bulk"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
    }))
    .await;
    for r in answers {
        let r = r.unwrap();
        assert_eq!(r.status(), 422);
        let p: Value = r.json().await.unwrap();
        assert_eq!(p["errors"][0]["field"], "agents", "{p}");
        assert_eq!(
            p["errors"][0]["message"], "must hold 1 to 1000 agents",
            "{p}"
        );
    }
    let (peak_after, rss_after) = memory_kib(pid);
    let growth_mib = peak_after.saturating_sub(peak_before) / 1024;
    println!("peak RSS {peak_before} → {peak_after} KiB (now {rss_after} KiB): +{growth_mib} MiB");
    assert!(
        growth_mib < 128,
        "three refused bulks cost {growth_mib} MiB"
    );
    drop(child);
}
