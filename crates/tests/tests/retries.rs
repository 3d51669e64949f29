//! Clients that retry: a keyed write whose ack was lost (NATS paused past
//! the append timeout, so the client saw a 503 although the event was
//! stored) is stored once however it is retried (in the same process or
//! after a restart, within JetStream's duplicate window or past it), and the
//! retry answers what the first success would have. A replayed answer is the
//! first one exactly, problems included. Project writes answer from the log
//! alone, so they are acknowledged while PostgreSQL is cut.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use events::AggregateType;
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{Value, json};
use tests::nats::PrivateNats;
use tests::{Sandbox, TestApp, agent_body, eventually, header, header_u64};
use uuid::Uuid;
use ymera::Role;

/// A sandbox whose log lives on a private NATS server the test can pause,
/// with JetStream's duplicate window set to `window_secs`.
async fn sandbox_on_private_nats(window_secs: u64) -> (PrivateNats, Sandbox) {
    let nats = PrivateNats::start().await;
    let mut sandbox = Sandbox::new().await;
    sandbox.settings.nats.nats_url = nats.url.clone();
    sandbox.settings.nats.duplicate_window_secs = window_secs;
    (nats, sandbox)
}

/// How the retry comes after the lost ack.
#[derive(Debug, Clone, Copy)]
struct Retry {
    /// The process is restarted between the two attempts.
    restart: bool,
    /// The stream's duplicate window (1 s) has passed before the retry, so
    /// JetStream no longer recognises the event id.
    past_window: bool,
}

/// The retry comes at once, to the same process.
const SAME_PROCESS: Retry = Retry {
    restart: false,
    past_window: false,
};
/// The retry comes to a restarted process, after the duplicate window.
const RESTARTED_PAST_THE_WINDOW: Retry = Retry {
    restart: true,
    past_window: true,
};

impl Retry {
    /// A process on a private NATS server whose duplicate window suits
    /// this retry, and an admin token.
    async fn started(self) -> (PrivateNats, TestApp, String) {
        let window_secs = if self.past_window { 1 } else { 120 };
        let (nats, sandbox) = sandbox_on_private_nats(window_secs).await;
        let app = sandbox.start(Role::All).await;
        let token = app.admin_token().await;
        (nats, app, token)
    }
}

/// Sends `request` while NATS is paused: the append's ack does not come in
/// time and the client gets a 503, but the event was sent. Resumes NATS and
/// waits until the stream holds `stored` messages, the lost write included.
async fn ack_lost(nats: &PrivateNats, app: &TestApp, request: RequestBuilder, stored: u64) {
    nats.pause();
    let r = request.send().await.unwrap();
    nats.resume();
    assert_eq!(
        r.status(),
        503,
        "the ack was lost: {}",
        r.text().await.unwrap()
    );
    eventually(
        Duration::from_secs(10),
        "the lost write to be stored",
        || async { (messages(app).await == stored).then_some(()) },
    )
    .await;
}

/// What the retry meets: the same process or a restarted one, with the
/// duplicate window still open or passed.
async fn before_retry(nats: &PrivateNats, app: TestApp, retry: Retry) -> TestApp {
    if retry.past_window {
        duplicate_window_passed(&nats.url).await;
    }
    if retry.restart {
        let sandbox = app.sandbox.clone();
        app.stop().await;
        sandbox.start(Role::All).await
    } else {
        app
    }
}

/// Waits until a message id published now (after the lost write was
/// stored) is no longer recognised as a duplicate by a stream with the
/// same 1 s window: by then JetStream has forgotten the lost write's id.
async fn duplicate_window_passed(url: &str) {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "WINDOW_PROBE".into(),
        subjects: vec!["window-probe".into()],
        duplicate_window: Duration::from_secs(1),
        ..Default::default()
    })
    .await
    .unwrap();
    let probe = || async {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", "probe");
        js.publish_with_headers("window-probe", headers, "p".into())
            .await
            .unwrap()
            .await
            .unwrap()
    };
    assert!(!probe().await.duplicate);
    eventually(
        Duration::from_secs(10),
        "the duplicate window to pass",
        || async { (!probe().await.duplicate).then_some(()) },
    )
    .await;
}

/// Messages in the test's stream.
async fn messages(app: &TestApp) -> u64 {
    app.deps.store.stream_state().await.unwrap().messages
}

/// The events stored on one agent's subject.
async fn agent_events(app: &TestApp, id: &str) -> Vec<infra::StoredEvent> {
    let store = &app.deps.store;
    let subject = store.subject(AggregateType::Agent, Uuid::parse_str(id).unwrap());
    store.load(&subject).await.unwrap().0
}

fn keyed(app: &TestApp, method: Method, path: &str, token: &str, key: &str) -> RequestBuilder {
    app.request(method, path, Some(token))
        .header("idempotency-key", key)
}

/// Status, the headers that matter and the body of an answer.
async fn answer(r: Response) -> (u16, [Option<String>; 4], Value) {
    let headers = ["location", "etag", "x-event-seq", "content-type"].map(|h| header(&r, h));
    (r.status().as_u16(), headers, r.json().await.unwrap())
}

/// The same request again with the same key: the stored answer, exactly.
async fn replayed(request: RequestBuilder, first: &(u16, [Option<String>; 4], Value)) {
    let r = request.send().await.unwrap();
    assert_eq!(header(&r, "idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(&answer(r).await, first, "a replay gives the first answer");
}

async fn keyed_create(retry: Retry) {
    let (nats, app, token) = retry.started().await;
    let body = json!({"name": "Scout", "type": "llm", "tags": {"team": "a"}});
    let send =
        |app: &TestApp| keyed(app, Method::POST, "/api/v1/agents", &token, "create-1").json(&body);

    ack_lost(&nats, &app, send(&app), 1).await;
    let app = before_retry(&nats, app, retry).await;

    let r = send(&app).send().await.unwrap();
    assert_eq!(r.status(), 201, "{retry:?}");
    assert_eq!(
        header(&r, "idempotent-replayed"),
        None,
        "answered from the log"
    );
    let first = answer(r).await;
    let (_, [location, etag, seq, _], created) = &first;
    let id = created["id"].as_str().unwrap();
    assert_eq!(
        messages(&app).await,
        1,
        "one agent in the stream, {retry:?}"
    );
    let events = agent_events(&app, id).await;
    assert_eq!(events.len(), 1);
    // What the first success would have answered: the agent its event
    // made, at that event's sequence.
    assert_eq!(
        location.as_deref(),
        Some(format!("/api/v1/agents/{id}").as_str())
    );
    assert_eq!(etag.as_deref(), Some("\"1\""));
    let seq: u64 = seq.as_deref().unwrap().parse().unwrap();
    assert_eq!(seq, events[0].seq);
    let r = app
        .read_at(&format!("/api/v1/agents/{id}"), &token, seq)
        .await;
    assert_eq!(&r.json::<Value>().await.unwrap(), created);
    let r = app.read_at("/api/v1/agents", &token, seq).await;
    assert_eq!(
        r.json::<Value>().await.unwrap()["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    replayed(send(&app), &first).await;
    assert_eq!(messages(&app).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_create_whose_ack_was_lost_is_stored_once() {
    keyed_create(SAME_PROCESS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_create_retried_after_a_restart_past_the_duplicate_window_is_stored_once() {
    keyed_create(RESTARTED_PAST_THE_WINDOW).await;
}

async fn keyed_bulk(retry: Retry) {
    let (nats, app, token) = retry.started().await;
    let agents: Vec<Value> = (0..50).map(|i| agent_body(&format!("bulk {i}"))).collect();
    let body = json!({ "agents": agents });
    let send = |app: &TestApp| {
        keyed(app, Method::POST, "/api/v1/agents/bulk", &token, "bulk-1").json(&body)
    };

    ack_lost(&nats, &app, send(&app), 50).await;
    let app = before_retry(&nats, app, retry).await;

    let r = send(&app).send().await.unwrap();
    assert_eq!(r.status(), 201, "{retry:?}");
    let first = answer(r).await;
    let (_, [_, _, seq, _], created) = &first;
    assert_eq!(messages(&app).await, 50, "the batch stored once, {retry:?}");
    assert_eq!(created["created"], 50);
    let seq: u64 = seq.as_deref().unwrap().parse().unwrap();
    assert_eq!(seq, 50, "the batch's last event");
    let items = created["items"].as_array().unwrap();
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item["name"], format!("bulk {i}"), "in request order");
        assert_eq!(
            agent_events(&app, item["id"].as_str().unwrap()).await.len(),
            1
        );
    }
    // The read model holds each once, as the answer gave it.
    let r = app.read_at("/api/v1/agents?limit=100", &token, seq).await;
    let mut read = r.json::<Value>().await.unwrap()["items"]
        .as_array()
        .unwrap()
        .clone();
    let mut answered = items.clone();
    let by_id = |a: &Value, b: &Value| a["id"].as_str().cmp(&b["id"].as_str());
    read.sort_by(by_id);
    answered.sort_by(by_id);
    assert_eq!(read, answered);

    replayed(send(&app), &first).await;
    assert_eq!(messages(&app).await, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_bulk_whose_ack_was_lost_is_stored_once() {
    keyed_bulk(SAME_PROCESS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_bulk_retried_after_a_restart_past_the_duplicate_window_is_stored_once() {
    keyed_bulk(RESTARTED_PAST_THE_WINDOW).await;
}

async fn keyed_update(retry: Retry) {
    let (nats, app, token) = retry.started().await;
    let r = app.create_agent(&token, agent_body("Scout")).await;
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/api/v1/agents/{id}");
    let send = |app: &TestApp| {
        keyed(app, Method::PUT, &path, &token, "update-1")
            .header("if-match", "\"1\"")
            .json(&json!({"status": "paused", "description": "resting"}))
    };

    ack_lost(&nats, &app, send(&app), 2).await;
    let app = before_retry(&nats, app, retry).await;

    let r = send(&app).send().await.unwrap();
    assert_eq!(r.status(), 200, "not a 412 for its own update, {retry:?}");
    let first = answer(r).await;
    let (_, [_, etag, seq, _], updated) = &first;
    let events = agent_events(&app, &id).await;
    assert_eq!(events.len(), 2, "the update stored once, {retry:?}");
    assert_eq!(messages(&app).await, 2);
    assert_eq!(etag.as_deref(), Some("\"2\""));
    let seq: u64 = seq.as_deref().unwrap().parse().unwrap();
    assert_eq!(seq, events[1].seq);
    assert_eq!(updated["status"], "paused");
    assert_eq!(updated["version"], 2);
    let r = app.read_at(&path, &token, seq).await;
    assert_eq!(&r.json::<Value>().await.unwrap(), updated);

    replayed(send(&app), &first).await;
    assert_eq!(agent_events(&app, &id).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_update_whose_ack_was_lost_is_applied_once() {
    keyed_update(SAME_PROCESS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_update_retried_after_a_restart_past_the_duplicate_window_is_applied_once() {
    keyed_update(RESTARTED_PAST_THE_WINDOW).await;
}

/// A 503 leaves the key's outcome unknown, not forgotten: the same key with
/// another request is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_outcome_is_unknown_still_refuses_another_request() {
    let (nats, sandbox) = sandbox_on_private_nats(120).await;
    let app = sandbox.start(Role::All).await;
    let token = app.admin_token().await;
    let send = |body: Value| keyed(&app, Method::POST, "/api/v1/agents", &token, "k").json(&body);
    ack_lost(&nats, &app, send(agent_body("one")), 1).await;
    let r = send(agent_body("another")).send().await.unwrap();
    assert_eq!(r.status(), 422);
    let r = send(agent_body("one")).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(messages(&app).await, 1);
}

/// The request timeout fires while the append waits for its ack: the
/// handler is dropped, the key is marked unknown all the same, and the retry
/// finds the write in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_write_cut_off_by_the_request_timeout_is_resolved_by_its_retry() {
    let (nats, mut sandbox) = sandbox_on_private_nats(120).await;
    sandbox.settings.http.request_timeout_secs = 1;
    sandbox.settings.nats.request_timeout_ms = 5_000;
    let app = sandbox.start(Role::All).await;
    let token = app.admin_token().await;
    let send =
        || keyed(&app, Method::POST, "/api/v1/agents", &token, "slow").json(&agent_body("slow"));
    ack_lost(&nats, &app, send(), 1).await;
    // Marking the key unknown happens as the handler is dropped; until it
    // has, the key is still being served (409).
    let r = eventually(
        Duration::from_secs(10),
        "the retry to be served",
        || async {
            let r = send().send().await.unwrap();
            (r.status() != 409).then_some(r)
        },
    )
    .await;
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    assert_eq!(
        agent_events(&app, created["id"].as_str().unwrap())
            .await
            .len(),
        1
    );
    assert_eq!(messages(&app).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_422_is_the_first_answer_byte_for_byte() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let send = || {
        keyed(&app, Method::POST, "/api/v1/agents", &token, "bad-1")
            .header(
                "x-request-id",
                format!("attempt-{}", Uuid::now_v7().simple()),
            )
            .json(&json!({"type": "LLM", "status": "sleeping"}))
    };
    let first = send().send().await.unwrap();
    assert_eq!(first.status(), 422);
    let first_type = header(&first, "content-type");
    let first_body = first.bytes().await.unwrap();
    let problem: Value = serde_json::from_slice(&first_body).unwrap();
    assert_eq!(problem["errors"].as_array().unwrap().len(), 3, "{problem}");

    let again = send().send().await.unwrap();
    assert_eq!(again.status(), 422);
    assert_eq!(
        header(&again, "idempotent-replayed").as_deref(),
        Some("true")
    );
    assert_eq!(header(&again, "content-type"), first_type);
    assert_ne!(
        header(&again, "x-request-id").as_deref(),
        problem["request_id"].as_str(),
        "the header names this request"
    );
    assert_eq!(
        again.bytes().await.unwrap(),
        first_body,
        "the body is the first one, its request_id included"
    );
    assert_eq!(app.last_seq().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn project_writes_are_answered_from_the_log_while_postgres_is_cut() {
    let (sandbox, _nats, pg) = Sandbox::new().await.behind_proxies().await;
    let app = sandbox.start(Role::All).await;
    let token = app.admin_token().await;

    pg.down();
    let r = app
        .request(Method::POST, "/api/v1/projects", Some(&token))
        .json(&json!({"name": "Apollo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let seq = header_u64(&r, "x-event-seq");
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["name"], "Apollo");
    assert_eq!(created["version"], 1);
    assert!(
        created.get("agent_count").is_none(),
        "only reads count agents"
    );
    let path = format!("/api/v1/projects/{}", created["id"].as_str().unwrap());
    let r = app
        .request(Method::PUT, &path, Some(&token))
        .json(&json!({"description": "moon"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["version"], 2);
    assert_eq!(app.last_seq().await, seq + 1);

    // A keyed write whose key cannot be recorded is refused before anything
    // is appended; retried once PostgreSQL is back, it is stored once.
    let send = || {
        keyed(&app, Method::POST, "/api/v1/projects", &token, "project-1")
            .json(&json!({"name": "Gemini"}))
    };
    let r = send().send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(app.last_seq().await, seq + 1, "nothing appended");
    pg.up();
    let r = eventually(
        Duration::from_secs(30),
        "the keyed write to go through",
        || async {
            let r = send().send().await.ok()?;
            (r.status() == 201).then_some(r)
        },
    )
    .await;
    let first = answer(r).await;
    assert_eq!(first.2["name"], "Gemini");
    replayed(send(), &first).await;
    assert_eq!(app.last_seq().await, seq + 2, "one Gemini");
    let r = app.read_at("/api/v1/projects", &token, seq + 2).await;
    let names: Vec<Value> = r.json::<Value>().await.unwrap()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].clone())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}
