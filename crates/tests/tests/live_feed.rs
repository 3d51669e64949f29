//! The live feed over WebSocket and SSE: latency, replay-then-live without
//! gap or duplicate, filters, auth before upgrade, slow clients, caps, and
//! clients that go away or stop reading releasing all they held.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tests::{BACKGROUND_CONSUMERS, Sandbox, TestApp, agent_body, eventually, header_u64};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};
use uuid::Uuid;
use ymera::Role;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(
    app: &TestApp,
    query: &str,
    token: Option<&str>,
) -> Result<Ws, tungstenite::Error> {
    let url = format!("{}/api/v1/ws{query}", app.base.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    if let Some(t) = token {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(ws, _)| ws)
}

/// The next event frame (skipping pings), within `within`.
async fn next_event(ws: &mut Ws, within: Duration) -> Value {
    tokio::time::timeout(within, async {
        loop {
            match ws.next().await.expect("socket open").expect("frame") {
                Message::Text(t) => return serde_json::from_str::<Value>(&t).unwrap(),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("unexpected frame {other:?}"),
            }
        }
    })
    .await
    .expect("an event in time")
}

/// Parses an SSE byte stream into (id, event, data) triples.
fn sse_events(
    stream: impl Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
) -> impl Stream<Item = (Option<String>, String, Value)> {
    futures::stream::unfold(
        (stream, String::new()),
        |(mut stream, mut buf)| async move {
            loop {
                if let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    let (mut id, mut event, mut data) =
                        (None, String::from("message"), String::new());
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("id:") {
                            id = Some(v.trim().to_owned());
                        } else if let Some(v) = line.strip_prefix("event:") {
                            event = v.trim().to_owned();
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push_str(v.trim_start());
                        }
                    }
                    if data.is_empty() {
                        continue; // keep-alive comment
                    }
                    return Some((
                        (id, event, serde_json::from_str(&data).unwrap()),
                        (stream, buf),
                    ));
                }
                match stream.next().await {
                    Some(Ok(chunk)) => buf.push_str(&String::from_utf8_lossy(&chunk)),
                    _ => return None,
                }
            }
        },
    )
}

async fn sse(app: &TestApp, query: &str, last_event_id: Option<u64>) -> reqwest::Response {
    let mut r = app.request(Method::GET, &format!("/api/v1/events/stream{query}"), None);
    if let Some(id) = last_event_id {
        r = r.header("last-event-id", id.to_string());
    }
    r.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_sse_clients_see_a_write_within_a_second() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let mut ws = ws_connect(&app, "", Some(&token)).await.unwrap();
    let r = sse(&app, &format!("?access_token={token}"), None).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut events = Box::pin(sse_events(Box::pin(r.bytes_stream())));

    let r = app.create_agent(&token, agent_body("live")).await;
    let seq = header_u64(&r, "x-event-seq");
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let e = next_event(&mut ws, Duration::from_secs(1)).await;
    assert_eq!(e["type"], "agent.created");
    assert_eq!(e["aggregate_id"], id.as_str());
    assert_eq!(e["seq"], seq);
    assert_eq!(e["data"]["name"], "live");
    assert_eq!(e["actor"], "admin");

    let (sse_id, kind, data) = tokio::time::timeout(Duration::from_secs(1), events.next())
        .await
        .expect("in time")
        .expect("an event");
    assert_eq!(sse_id.as_deref(), Some(seq.to_string().as_str()));
    assert_eq!(kind, "agent.created");
    assert_eq!(data["aggregate_id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_then_live_has_no_gap_and_no_duplicate() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    for i in 0..10 {
        app.create_agent(&token, agent_body(&format!("before {i}")))
            .await;
    }
    assert_eq!(app.last_seq().await, 10);

    // Writers keep going while the clients connect and replay.
    let writer = {
        let client = app.client.clone();
        let url = app.url("/api/v1/agents");
        let token = token.clone();
        tokio::spawn(async move {
            for i in 0..40 {
                let r = client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&agent_body(&format!("during {i}")))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
            }
        })
    };
    let mut ws = ws_connect(&app, "?since_seq=4", Some(&token))
        .await
        .unwrap();
    let r = sse(&app, &format!("?access_token={token}"), Some(7)).await;
    assert_eq!(r.status(), 200);
    let mut events = Box::pin(sse_events(Box::pin(r.bytes_stream())));
    writer.await.unwrap();
    let last = app.last_seq().await;
    assert_eq!(last, 50);

    let mut ws_seqs = Vec::new();
    while ws_seqs.last() != Some(&last) {
        ws_seqs.push(
            next_event(&mut ws, Duration::from_secs(5)).await["seq"]
                .as_u64()
                .unwrap(),
        );
    }
    assert_eq!(
        ws_seqs,
        (5..=last).collect::<Vec<_>>(),
        "WebSocket: every event after since_seq, once, in order"
    );

    let mut sse_seqs = Vec::new();
    while sse_seqs.last() != Some(&last) {
        let (id, _, data) = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            id.unwrap().parse::<u64>().unwrap(),
            data["seq"].as_u64().unwrap()
        );
        sse_seqs.push(data["seq"].as_u64().unwrap());
    }
    assert_eq!(
        sse_seqs,
        (8..=last).collect::<Vec<_>>(),
        "SSE: every event after Last-Event-ID, once, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_by_type_and_aggregate() {
    filters_by_type_and_aggregate_on_a_log_split(1).await;
}

/// The aggregate filter's replay reads the aggregate's subject, which
/// carries its partition on a split log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_by_type_and_aggregate_on_a_partitioned_log() {
    filters_by_type_and_aggregate_on_a_log_split(4).await;
}

async fn filters_by_type_and_aggregate_on_a_log_split(partitions: u32) {
    let mut sandbox = Sandbox::new().await;
    sandbox.settings.nats.partitions = partitions;
    let app = sandbox.start(Role::All).await;
    let token = app.admin_token().await;
    let r = app.create_agent(&token, agent_body("watched")).await;
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut by_type = ws_connect(&app, "?types=agent.deleted", Some(&token))
        .await
        .unwrap();
    let mut by_id = ws_connect(
        &app,
        &format!("?aggregate_id={id}&since_seq=0"),
        Some(&token),
    )
    .await
    .unwrap();

    app.create_agent(&token, agent_body("other")).await;
    let path = format!("/api/v1/agents/{id}");
    app.request(Method::PUT, &path, Some(&token))
        .json(&json!({"status": "paused"}))
        .send()
        .await
        .unwrap();
    app.request(Method::DELETE, &path, Some(&token))
        .send()
        .await
        .unwrap();

    let e = next_event(&mut by_type, Duration::from_secs(2)).await;
    assert_eq!(
        (e["type"].as_str(), e["aggregate_id"].as_str()),
        (Some("agent.deleted"), Some(id.as_str()))
    );
    let types: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let e = next_event(&mut by_id, Duration::from_secs(2)).await;
            assert_eq!(e["aggregate_id"], id.as_str());
            v.push(e["type"].as_str().unwrap().to_owned());
        }
        v
    };
    assert_eq!(types, ["agent.created", "agent.updated", "agent.deleted"]);

    let r = sse(
        &app,
        &format!("?access_token={token}&types=agent.exploded"),
        None,
    )
    .await;
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_before_the_upgrade() {
    let app = TestApp::spawn().await;
    for (query, token) in [
        ("", None),
        ("?access_token=garbage", None),
        ("", Some("not.a.token")),
    ] {
        match ws_connect(&app, query, token).await {
            Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
            other => panic!(
                "expected 401 before upgrade, got {:?}",
                other.map(|_| "upgraded")
            ),
        }
    }
    let r = sse(&app, "", None).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["content-type"], "application/problem+json");

    // The token may also come as the `bearer, <token>` subprotocol.
    let token = app.admin_token().await;
    let url = format!("{}/api/v1/ws", app.base.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        format!("bearer, {token}").parse().unwrap(),
    );
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "bearer");
    app.create_agent(&token, agent_body("x")).await;
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(2)).await["type"],
        "agent.created"
    );
}

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_dropped_and_memory_stays_bounded() {
    let sandbox = Sandbox::new().await;
    let mut settings = sandbox.settings.clone();
    settings.http.live_buffer = 32;
    settings.http.live_ping_secs = 1;
    settings.http.live_max_connections = 2;
    let app = sandbox.start_with(Role::All, &settings).await;
    let token = app.admin_token().await;

    // The same writes once without any live client first: the memory that
    // bulk writes and their projection take (and the allocator keeps) is
    // then part of the baseline, and what grows after it is what the
    // stalled client costs.
    let description = "x".repeat(3_900);
    let bulk = |round: usize| {
        let agents: Vec<Value> = (0..1000)
            .map(|i| json!({"name": format!("{round}-{i}"), "type": "t", "description": description}))
            .collect();
        app.request(Method::POST, "/api/v1/agents/bulk", Some(&token))
            .json(&json!({"agents": agents}))
            .send()
    };
    for round in 0..4 {
        assert_eq!(bulk(100 + round).await.unwrap().status(), 201);
    }
    let warmed = app.last_seq().await;
    let r = app.read_at("/api/v1/agents?limit=1", &token, warmed).await;
    assert_eq!(r.status(), 200);

    let mut stalled = ws_connect(&app, "", Some(&token)).await.unwrap();
    let _second = ws_connect(&app, "", Some(&token)).await.unwrap();
    match ws_connect(&app, "", Some(&token)).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503, "the cap holds")
        }
        other => panic!("expected 503, got {:?}", other.map(|_| "upgraded")),
    }

    // Far more than the socket buffers hold, while the client reads nothing.
    let rss_before = vm_rss_kib();
    let mut total = 0;
    for round in 0..4 {
        assert_eq!(bulk(round).await.unwrap().status(), 201);
        total += 1000;
    }

    // Now read: the server gave up on us before the end.
    let mut received = 0;
    let mut closed_with = None;
    let reading = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(frame) = stalled.next().await {
            match frame {
                Ok(Message::Text(_)) => received += 1,
                Ok(Message::Close(frame)) => {
                    closed_with = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(reading.is_ok(), "the server closed the stalled connection");
    assert!(
        received < total,
        "a client that never read was cut off ({received} of {total})"
    );
    if let Some((code, reason)) = &closed_with {
        assert_eq!(*code, 1008, "{reason}");
        assert!(reason.contains("since_seq="), "{reason}");
    }
    let grown_mib = vm_rss_kib().saturating_sub(rss_before) / 1024;
    assert!(grown_mib < 100, "memory grew by {grown_mib} MiB");

    // Its slot is free again.
    let _third = tests::eventually(Duration::from_secs(10), "a free live slot", || async {
        ws_connect(&app, "", Some(&token)).await.ok()
    })
    .await;
}

/// The process reads the stream for the live feed only while a client
/// listens: with none connected, the projector's is the only consumer on
/// the stream; the first client adds the feed's reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_reads_the_stream_only_while_a_client_listens() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let consumers = || async { app.deps.store.stream_state().await.unwrap().consumer_count };
    let wait_for = |want: usize| async move {
        let started = std::time::Instant::now();
        loop {
            let n = consumers().await;
            if n == want {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{n} consumers on the stream, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let background = BACKGROUND_CONSUMERS;
    let r = app.create_agent(&token, agent_body("before")).await;
    assert_eq!(r.status(), 201);
    wait_for(background).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        consumers().await,
        background,
        "no client, yet the feed reads the stream"
    );

    let mut ws = ws_connect(&app, "", Some(&token)).await.unwrap();
    wait_for(background + 1).await;
    let r = app.create_agent(&token, agent_body("after")).await;
    let seq = header_u64(&r, "x-event-seq");
    let e = next_event(&mut ws, Duration::from_secs(2)).await;
    assert_eq!(
        e["seq"], seq,
        "the first event after connecting is the write"
    );
}

/// What the process holds for the live feed while one client that stays is
/// connected: consumers on the stream (the projector's and the detacher's
/// durable ones, and the feed's reader), and the feed's connection and
/// consumer gauges. Clients that come and go must bring it back to this.
#[derive(Debug, PartialEq)]
struct LiveLoad {
    stream_consumers: usize,
    connections: Option<f64>,
    feed_consumers: Option<f64>,
}

async fn live_load(app: &TestApp) -> LiveLoad {
    LiveLoad {
        stream_consumers: app.deps.store.stream_state().await.unwrap().consumer_count,
        connections: app.metric("ymera_live_connections").await,
        feed_consumers: app.metric("ymera_live_consumers").await,
    }
}

/// A few events, then one client that stays (so the process keeps reading
/// the stream for the feed throughout): returns it and the baseline.
async fn stay_connected(app: &TestApp, token: &str) -> (Ws, LiveLoad) {
    for i in 0..3 {
        app.create_agent(token, agent_body(&format!("stored {i}")))
            .await;
    }
    let mut stays = ws_connect(app, "", Some(token)).await.unwrap();
    app.create_agent(token, agent_body("seen")).await;
    next_event(&mut stays, Duration::from_secs(2)).await;
    let background = BACKGROUND_CONSUMERS;
    let baseline = eventually(Duration::from_secs(10), "the baseline", || async {
        let load = live_load(app).await;
        (load.stream_consumers == background + 1).then_some(load)
    })
    .await;
    assert_eq!(baseline.connections, Some(1.0));
    assert_eq!(baseline.feed_consumers, Some(1.0), "the feed's reader");
    (stays, baseline)
}

/// Waits until the process holds no more than `baseline` for the feed.
async fn released(app: &TestApp, baseline: &LiveLoad) {
    let started = Instant::now();
    let last = std::sync::Mutex::new(None);
    eventually(
        Duration::from_secs(10),
        "the stream's consumers and the feed's gauges back to their baseline",
        || async {
            let load = live_load(app).await;
            let mut last = last.lock().unwrap();
            if last.as_ref() != Some(&load) {
                println!("{:?} after {:?}", load, started.elapsed());
            }
            let done = load == *baseline;
            *last = Some(load);
            done.then_some(())
        },
    )
    .await;
    println!("released within {:?}", started.elapsed());
}

/// 60 clients that follow an aggregate nothing is ever appended to, with
/// history (`since_seq=1`), and leave after 50 ms: each one's replay
/// consumer and task go with it, although nothing was ever sent to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_filtered_websocket_feeds_release_their_consumers() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let (_stays, baseline) = stay_connected(&app, &token).await;
    let query = format!("?aggregate_id={}&since_seq=1", Uuid::now_v7());
    futures::future::join_all((0..60).map(|i| {
        let (app, token, query) = (&app, &token, &query);
        async move {
            let mut ws = ws_connect(app, query, Some(token)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await; // the client's whole life
            if i % 2 == 0 {
                ws.close(None).await.unwrap();
            } // else: the socket just closes, without a close frame
        }
    }))
    .await;
    released(&app, &baseline).await;
}

/// The same over SSE: the client's going away is noticed on the socket,
/// though no event is ever written to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_filtered_sse_feeds_release_their_consumers() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let (_stays, baseline) = stay_connected(&app, &token).await;
    let query = format!(
        "?aggregate_id={}&since_seq=1&access_token={token}",
        Uuid::now_v7()
    );
    futures::future::join_all((0..60).map(|_| async {
        let r = sse(&app, &query, None).await;
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(50)).await; // the client's whole life
        drop(r);
    }))
    .await;
    released(&app, &baseline).await;
}

/// 40 SSE clients with a 4 KiB receive buffer that send their request and
/// never read: while writes go on, the server drops each once it has taken
/// no bytes for `YMERA_LIVE_PING_SECS` (the WebSocket send timeout), and the
/// writes keep succeeding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_clients_that_never_read_are_dropped_while_writes_go_on() {
    let sandbox = Sandbox::new().await;
    let mut settings = sandbox.settings.clone();
    settings.http.live_ping_secs = 1;
    let app = sandbox.start_with(Role::All, &settings).await;
    let token = app.admin_token().await;
    let addr: SocketAddr = app.base.trim_start_matches("http://").parse().unwrap();
    let request =
        format!("GET /api/v1/events/stream?access_token={token} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let mut clients = Vec::new();
    for _ in 0..40 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4 * 1024).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        clients.push(stream);
    }
    let connections = || async { app.metric("ymera_live_connections").await };
    eventually(Duration::from_secs(10), "40 live connections", || async {
        (connections().await == Some(40.0)).then_some(())
    })
    .await;

    // Far more than any buffer holds, in rounds, until every client that
    // never read is gone.
    let description = "x".repeat(3_900);
    let started = Instant::now();
    let mut rounds = 0;
    loop {
        let agents: Vec<Value> = (0..1000)
            .map(|i| json!({"name": format!("{rounds}-{i}"), "type": "t", "description": description}))
            .collect();
        let r = app
            .request(Method::POST, "/api/v1/agents/bulk", Some(&token))
            .json(&json!({ "agents": agents }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "writes go on");
        rounds += 1;
        let now = connections().await;
        if now == Some(0.0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{now:?} of 40 clients that never read still connected after {rounds} rounds of 1,000 writes"
        );
    }
    println!(
        "40 stalled SSE clients dropped within {:?} ({rounds} rounds of 1,000 writes)",
        started.elapsed()
    );

    // Dropped, not only forgotten: each socket reaches its end.
    futures::future::join_all(clients.into_iter().map(|mut stream| async move {
        let drained = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::copy(&mut stream, &mut tokio::io::sink()),
        )
        .await;
        assert!(drained.is_ok(), "the server closed the connection");
    }))
    .await;
}
