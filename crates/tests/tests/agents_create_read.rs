//! Create and read agents end to end: HTTP → JetStream → projector →
//! PostgreSQL → HTTP, with read-your-writes.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use reqwest::Method;
use serde_json::{Value, json};
use tests::{TestApp, agent_body, header, header_u64};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_then_read_your_write() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;

    let body = json!({
        "name": "  Scout  ",
        "type": "llm_worker",
        "description": "finds things",
        "status": "paused",
        "capabilities": ["search", "summarize"],
        "config": {"model": "small", "temperature": 0.2},
        "tags": {"env": "prod", "team": "core"}
    });
    let r = app
        .request(Method::POST, "/api/v1/agents", Some(&token))
        .header("x-request-id", "client-req-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "x-request-id").as_deref(), Some("client-req-1"));
    assert_eq!(header(&r, "etag").as_deref(), Some("\"1\""));
    let seq = header_u64(&r, "x-event-seq");
    assert_eq!(
        seq,
        app.last_seq().await,
        "X-Event-Seq is the appended event's sequence"
    );
    let location = header(&r, "location").expect("Location");
    let created: Value = r.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/api/v1/agents/{id}"));
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);
    assert_eq!(created["name"], "Scout", "name is trimmed");
    assert_eq!(created["status"], "paused");
    assert_eq!(created["version"], 1);
    assert_eq!(created["created_by"], "admin");
    assert_eq!(created["project_id"], Value::Null);

    // Read it back, asking for the projection to have applied our write.
    let r = app.read_at(&location, &token, seq).await;
    assert_eq!(r.status(), 200);
    assert!(header_u64(&r, "x-projection-seq") >= seq);
    assert_eq!(header(&r, "etag").as_deref(), Some("\"1\""));
    let read: Value = r.json().await.unwrap();
    assert_eq!(
        read, created,
        "the read model returns exactly what the write answered"
    );

    // The same through ?min_seq= and in the list.
    let r = app
        .request(
            Method::GET,
            &format!("/api/v1/agents?min_seq={seq}"),
            Some(&token),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(header_u64(&r, "x-projection-seq") >= seq);
    let list: Value = r.json().await.unwrap();
    assert_eq!(list["items"][0], created);
    assert_eq!(list["next_cursor"], Value::Null);

    // The event in the log carries actor and request id.
    let subject = app
        .deps
        .store
        .subject(events::AggregateType::Agent, id.parse().unwrap());
    let (stored, last) = app.deps.store.load(&subject).await.unwrap();
    assert_eq!(last, seq);
    assert_eq!(stored.len(), 1);
    let env = &stored[0].envelope;
    assert_eq!(env.event_type, "agent.created");
    assert_eq!(env.schema_version, 1);
    assert_eq!(env.aggregate_version, 1);
    assert_eq!(env.actor, "admin");
    assert_eq!(env.request_id, "client-req-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etag_gives_304_and_unknown_ids_404() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let r = app.create_agent(&token, agent_body("a")).await;
    let seq = header_u64(&r, "x-event-seq");
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let r = app
        .request(
            Method::GET,
            &format!("/api/v1/agents/{id}?min_seq={seq}"),
            Some(&token),
        )
        .header("if-none-match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);

    let r = app
        .request(
            Method::GET,
            &format!("/api/v1/agents/{}", uuid::Uuid::now_v7()),
            Some(&token),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/problem+json")
    );

    let r = app
        .request(Method::GET, "/api/v1/agents/not-a-uuid", Some(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["status"], 400);
    assert_eq!(problem["instance"], "/api/v1/agents/not-a-uuid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_beyond_the_projection_is_503_after_the_bounded_wait() {
    let sandbox = tests::Sandbox::new().await;
    let mut settings = sandbox.settings.clone();
    settings.http.min_seq_wait_ms = 300;
    // A writer, and a reader with no projector behind it: the projection
    // never reaches the write.
    let writer = sandbox.start_with(ymera::Role::Command, &settings).await;
    let reader = sandbox.start_with(ymera::Role::Query, &settings).await;
    let token = writer.admin_token().await;
    let r = writer.create_agent(&token, agent_body("unseen")).await;
    let seq = header_u64(&r, "x-event-seq");

    let started = std::time::Instant::now();
    let r = reader.read_at("/api/v1/agents", &token, seq).await;
    assert_eq!(r.status(), 503);
    assert!(header(&r, "retry-after").is_some());
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(300),
        "it waited"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "503 comes after the bounded wait"
    );

    // A sequence past the end of the log can never be reached: 400 at once.
    let started = std::time::Instant::now();
    let r = reader
        .request(Method::GET, "/api/v1/agents", Some(&token))
        .header("x-min-event-seq", (seq + 1000).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(started.elapsed() < std::time::Duration::from_millis(300));

    let r = reader
        .request(Method::GET, "/api/v1/agents", Some(&token))
        .header("x-min-event-seq", "soon")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_newest_first_and_filters() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let mut ids = Vec::new();
    let mut seq = 0;
    for i in 0..7 {
        let body = json!({
            "name": format!("agent {i}"),
            "type": if i % 2 == 0 { "even" } else { "odd" },
            "status": if i < 3 { "active" } else { "inactive" },
            "tags": {"env": if i == 4 { "prod" } else { "dev" }, "n": i.to_string()},
        });
        let r = app.create_agent(&token, body).await;
        assert_eq!(r.status(), 201);
        seq = header_u64(&r, "x-event-seq");
        ids.push(
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    ids.reverse(); // newest first

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/api/v1/agents?limit=3&min_seq={seq}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page: Value = app
            .request(Method::GET, &path, Some(&token))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 3);
        seen.extend(items.iter().map(|a| a["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        seen, ids,
        "keyset pages cover every agent once, newest first"
    );

    let count = |path: String| {
        let app = &app;
        let token = &token;
        async move {
            let r = app
                .request(Method::GET, &path, Some(token))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{path}");
            r.json::<Value>().await.unwrap()["items"]
                .as_array()
                .unwrap()
                .len()
        }
    };
    assert_eq!(count("/api/v1/agents?status=active".into()).await, 3);
    assert_eq!(count("/api/v1/agents?type=odd".into()).await, 3);
    assert_eq!(
        count("/api/v1/agents?type=even&status=inactive".into()).await,
        2
    );
    assert_eq!(count("/api/v1/agents?tag=env:prod".into()).await, 1);
    assert_eq!(count("/api/v1/agents?tag=env:dev&tag=n:1".into()).await, 1);
    assert_eq!(
        count(format!(
            "/api/v1/agents?project_id={}",
            uuid::Uuid::now_v7()
        ))
        .await,
        0
    );

    for bad in [
        "limit=0",
        "limit=501",
        "limit=ten",
        "status=sleeping",
        "type=UPPER",
        "tag=novalue",
        "project_id=xyz",
        "cursor=garbage",
        "colour=blue",
    ] {
        let r = app
            .request(Method::GET, &format!("/api/v1/agents?{bad}"), Some(&token))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        assert_eq!(
            header(&r, "content-type").as_deref(),
            Some("application/problem+json")
        );
    }
}

/// Reads by id that arrive together share queries (`query_api::lookup`):
/// each still gets its own agent, with the checkpoint it was read at; an
/// id asked for by many requests at once gets the same agent in each; an
/// unknown id in a batch of known ones gets its 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_by_id_that_arrive_together_share_queries_and_each_gets_its_own_agent() {
    const READS: usize = 400;
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let agents = (0..40)
        .map(|i| agent_body(&format!("reader {i}")))
        .collect();
    let ids = app.bulk_create(&token, agents).await;
    app.settled(&token).await;
    let last = app.last_seq().await;
    let unknown: Vec<String> = (0..4).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let reads_before = app.metric("ymera_agent_reads_total").await.unwrap_or(0.0);
    let batches_before = app
        .metric("ymera_agent_read_batches_total")
        .await
        .unwrap_or(0.0);

    // Every agent ten times over and the unknown ids, all at once.
    let mut reads = tokio::task::JoinSet::new();
    for k in 0..READS {
        let (id, name) = if k % 10 == 9 {
            (unknown[k % unknown.len()].clone(), None)
        } else {
            let i = k % ids.len();
            (ids[i].clone(), Some(format!("reader {i}")))
        };
        let read = app.request(Method::GET, &format!("/api/v1/agents/{id}"), Some(&token));
        reads.spawn(async move { (id, name, read.send().await.unwrap()) });
    }
    while let Some(read) = reads.join_next().await {
        let (id, name, r) = read.unwrap();
        let Some(name) = name else {
            assert_eq!(r.status(), 404, "{id} is unknown");
            assert_eq!(
                header(&r, "content-type").as_deref(),
                Some("application/problem+json")
            );
            continue;
        };
        assert_eq!(r.status(), 200, "{id}");
        assert!(header_u64(&r, "x-projection-seq") >= last);
        assert_eq!(header(&r, "etag").as_deref(), Some("\"1\""));
        let agent: Value = r.json().await.unwrap();
        assert_eq!(agent["id"], id.as_str());
        assert_eq!(agent["name"], name.as_str(), "{id}");
    }

    let reads = app.metric("ymera_agent_reads_total").await.unwrap() - reads_before;
    let batches = app.metric("ymera_agent_read_batches_total").await.unwrap() - batches_before;
    assert_eq!(reads, READS as f64, "every read counted once");
    assert!(
        batches < reads,
        "{READS} reads at once took {batches} queries: none shared one"
    );
}
