//! SIGTERM to a real `ymera` process: `/readyz` turns 503 at once, new work
//! is refused, requests in flight finish within the drain timeout, and
//! what is still running at its deadline is ended (an export cut off, the
//! live feed closed with a close frame).

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;
use tests::{Sandbox, eventually, header};
use tokio::process::Child;
use tokio_tungstenite::tungstenite::Message;
use ymera::Role;

/// Rows in the export the tests hold open: with 4 KiB descriptions, far
/// more than the socket buffers hold, so the response cannot be written
/// out before the client reads it.
const ROWS: u32 = 4_000;

/// A sandbox whose read model holds [`ROWS`] agents, and `ymera all`
/// serving it with `drain_ms` of drain; with an admin token.
async fn serving(drain_ms: &str) -> (Sandbox, Child, SocketAddr, String) {
    let sandbox = Sandbox::new().await;
    let seeder = sandbox.start(Role::Query).await;
    seeder.seed_read_model_agents(ROWS, 4096).await;
    seeder.stop().await;
    let (child, addr) =
        tests::process::spawn_with(&sandbox, "all", &[("YMERA_DRAIN_TIMEOUT_MS", drain_ms)]);
    let token = tests::process::ready_admin_token(addr).await;
    (sandbox, child, addr, token)
}

/// An export whose body the caller has not read yet.
async fn open_export(addr: SocketAddr, token: &str) -> reqwest::Response {
    let r = reqwest::Client::new()
        .get(format!("http://{addr}/api/v1/agents/export?format=csv"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r
}

fn sigterm(child: &Child) {
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
}

async fn exits_cleanly(mut child: Child, within: Duration) {
    let status = tokio::time::timeout(within, child.wait())
        .await
        .expect("the process exits after its drain")
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_readyz_503_refuses_new_work_and_lets_requests_finish() {
    let (_sandbox, child, addr, token) = serving("30000").await;
    let mut export = open_export(addr, &token).await;
    let first = export.chunk().await.unwrap().unwrap();

    sigterm(&child);
    // A fresh client each time: the refusal closes its connection.
    let get = |path: &'static str| {
        let token = token.clone();
        async move {
            reqwest::Client::new()
                .get(format!("http://{addr}{path}"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
        }
    };
    eventually(Duration::from_secs(10), "/readyz to turn 503", || async {
        let r = get("/readyz").await;
        let code = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        (code == 503 && body["status"] == "draining").then_some(())
    })
    .await;
    assert_eq!(get("/livez").await.status(), 200, "alive while draining");
    let r = get("/api/v1/agents").await;
    assert_eq!(r.status(), 503, "new work is refused");
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/problem+json")
    );
    assert!(header(&r, "retry-after").is_some());
    assert_eq!(header(&r, "connection").as_deref(), Some("close"));

    // The export begun before the signal completes, whole.
    let mut body = first.to_vec();
    while let Some(chunk) = export.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    let records = body.windows(2).filter(|w| w == b"\r\n").count();
    assert_eq!(records, ROWS as usize + 1, "the header and every row");
    exits_cleanly(child, Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_drain_deadline_exports_are_cut_off_and_live_feeds_closed() {
    let (_sandbox, child, addr, token) = serving("1500").await;
    let mut export = open_export(addr, &token).await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/api/v1/ws?access_token={token}"))
            .await
            .unwrap();

    sigterm(&child);
    let signalled = Instant::now();
    let close = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => {}
                other => panic!("the feed ended without a close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("a close frame within the drain");
    let frame = close.expect("a close frame with a code");
    assert_eq!(u16::from(frame.code), 1001, "going away");
    assert!(
        signalled.elapsed() >= Duration::from_millis(1000),
        "the feed lasted until the drain's deadline, closed after {:?}",
        signalled.elapsed()
    );

    // The export, never read during the drain, was cut off: a truncated
    // body is an error, never a complete-looking file.
    let mut outcome = Ok(0);
    loop {
        match export.chunk().await {
            Ok(Some(chunk)) => outcome = outcome.map(|n| n + chunk.len()),
            Ok(None) => break,
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    assert!(outcome.is_err(), "the export was cut off: {outcome:?}");
    exits_cleanly(child, Duration::from_secs(15)).await;
}
