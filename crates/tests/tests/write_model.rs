//! The complete write model: update, delete, bulk, projects, idempotency
//! keys and concurrency, decided against the log.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::BTreeSet;
use std::time::Duration;

use events::AggregateType;
use reqwest::{Method, Response};
use serde_json::{Value, json};
use tests::{Sandbox, TestApp, agent_body, eventually, header, header_u64};
use uuid::Uuid;
use ymera::Role;

async fn created_id(r: Response) -> (String, u64) {
    assert_eq!(r.status(), 201);
    let seq = header_u64(&r, "x-event-seq");
    let body: Value = r.json().await.unwrap();
    (body["id"].as_str().unwrap().to_owned(), seq)
}

/// Every event type on an agent's subject, oldest first, with its data.
fn put(app: &TestApp, token: &str, path: &str, body: Value) -> reqwest::RequestBuilder {
    app.request(Method::PUT, path, Some(token)).json(&body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_appends_only_what_changed_and_no_op_appends_nothing() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let (id, _) = created_id(
        app.create_agent(
            &token,
            json!({"name": "a", "type": "llm", "tags": {"k": "v"}}),
        )
        .await,
    )
    .await;
    let path = format!("/api/v1/agents/{id}");

    // Read-only fields are ignored; only status changes.
    let r = put(
        &app,
        &token,
        &path,
        json!({"status": "paused", "name": "a", "id": "x", "version": 99, "created_by": "me"}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "etag").as_deref(), Some("\"2\""));
    let seq = header_u64(&r, "x-event-seq");
    assert_eq!(seq, app.last_seq().await);
    let agent: Value = r.json().await.unwrap();
    assert_eq!(
        (
            agent["status"].as_str(),
            agent["version"].as_u64(),
            agent["name"].as_str()
        ),
        (Some("paused"), Some(2), Some("a"))
    );
    assert_eq!(agent["id"], id.as_str());
    let h = app.agent_events(&id).await;
    assert_eq!(h.len(), 2);
    assert_eq!(
        h[1],
        ("agent.updated".to_owned(), json!({"status": "paused"})),
        "only the changed field"
    );

    // The same body again changes nothing: no event, same version.
    let r = put(&app, &token, &path, json!({"status": "paused"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header_u64(&r, "x-event-seq"), seq);
    assert_eq!(r.json::<Value>().await.unwrap()["version"], 2);
    assert_eq!(app.last_seq().await, seq, "a no-op update appends nothing");

    // Clearing and setting nullable and collection fields.
    let r = put(
        &app,
        &token,
        &path,
        json!({"tags": {}, "capabilities": ["x"], "project_id": null}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let h = app.agent_events(&id).await;
    assert_eq!(
        h.last().unwrap().1,
        json!({"tags": {}, "capabilities": ["x"]}),
        "project_id was already null"
    );

    // Bad bodies: empty, unknown field, invalid value.
    let before = app.last_seq().await;
    for (body, field) in [
        (json!({}), "body"),
        (json!({"colour": "red"}), "colour"),
        (json!({"type": "BAD"}), "type"),
        (json!({"project_id": Uuid::now_v7()}), "project_id"),
    ] {
        let r = put(&app, &token, &path, body.clone()).send().await.unwrap();
        assert_eq!(r.status(), 422, "{body}");
        let p: Value = r.json().await.unwrap();
        assert_eq!(p["errors"][0]["field"], field, "{body}");
    }
    assert_eq!(app.last_seq().await, before);

    // The read model follows.
    let r = app
        .request(Method::GET, &path, Some(&token))
        .header("x-min-event-seq", app.last_seq().await.to_string())
        .send()
        .await
        .unwrap();
    let read: Value = r.json().await.unwrap();
    assert_eq!(read["version"], 3);
    assert_eq!(read["tags"], json!({}));
    assert_eq!(read["capabilities"], json!(["x"]));
    assert_eq!(read["status"], "paused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_match_guards_updates_and_deletes() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let (id, _) = created_id(app.create_agent(&token, agent_body("a")).await).await;
    let path = format!("/api/v1/agents/{id}");
    let r = put(&app, &token, &path, json!({"description": "one"}))
        .header("if-match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seq = app.last_seq().await;

    let r = put(&app, &token, &path, json!({"description": "two"}))
        .header("if-match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/problem+json")
    );
    let r = put(&app, &token, &path, json!({"description": "two"}))
        .header("if-match", "\"abc\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    let r = app
        .request(Method::DELETE, &path, Some(&token))
        .header("if-match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    assert_eq!(app.last_seq().await, seq, "stale If-Match appends nothing");

    // A weak tag never matches If-Match (RFC 9110 strong comparison).
    let r = put(&app, &token, &path, json!({"description": "two"}))
        .header("if-match", "W/\"2\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    let r = put(&app, &token, &path, json!({"description": "two"}))
        .header("if-match", "\"2\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .request(Method::DELETE, &path, Some(&token))
        .header("if-match", "\"3\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_agents_are_404_on_read_update_and_delete() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let (id, _) = created_id(app.create_agent(&token, agent_body("a")).await).await;
    let path = format!("/api/v1/agents/{id}");
    let r = app
        .request(Method::DELETE, &path, Some(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let seq = header_u64(&r, "x-event-seq");
    assert_eq!(seq, app.last_seq().await);

    let r = app.read_at(&path, &token, seq).await;
    assert_eq!(r.status(), 404);
    let r = put(&app, &token, &path, json!({"name": "b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = app
        .request(Method::DELETE, &path, Some(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let missing = format!("/api/v1/agents/{}", Uuid::now_v7());
    assert_eq!(
        put(&app, &token, &missing, json!({"name": "b"}))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        app.request(Method::DELETE, &missing, Some(&token))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        app.last_seq().await,
        seq,
        "nothing appended after the delete"
    );
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
    assert_eq!(list["items"], json!([]));
}

/// 50 clients update one agent at once across `apps`: every 200 has its
/// own version, the versions run 2, 3, … without a gap, and the log holds
/// exactly one update per 200.
async fn concurrent_updates(apps: &[&TestApp]) {
    let token = apps[0].admin_token().await;
    let (id, _) = created_id(apps[0].create_agent(&token, agent_body("contended")).await).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let app = apps[i % apps.len()];
        let request = put(
            app,
            &token,
            &format!("/api/v1/agents/{id}"),
            json!({"description": format!("writer {i}")}),
        );
        tasks.push(tokio::spawn(async move {
            let r = request.send().await.unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap();
            (status, body)
        }));
    }
    let mut versions = Vec::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            200 => versions.push(body["version"].as_u64().unwrap()),
            409 => {}
            other => panic!("unexpected {other}: {body}"),
        }
    }
    versions.sort_unstable();
    assert!(!versions.is_empty());
    let expected: Vec<u64> = (2..2 + versions.len() as u64).collect();
    assert_eq!(versions, expected, "distinct, contiguous versions from 2");
    let h = apps[0].agent_events(&id).await;
    let updates = h.iter().filter(|(t, _)| t == "agent.updated").count();
    assert_eq!(
        updates,
        versions.len(),
        "one event per 200, nothing lost or doubled"
    );
    let descriptions: BTreeSet<String> = h
        .iter()
        .skip(1)
        .map(|(_, d)| d["description"].to_string())
        .collect();
    assert_eq!(descriptions.len(), versions.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_updates_lose_nothing() {
    let app = TestApp::spawn().await;
    concurrent_updates(&[&app]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_updates_across_two_processes_lose_nothing() {
    let sandbox = Sandbox::new().await;
    let one = sandbox.start(Role::All).await;
    let two = sandbox.start(Role::Command).await;
    concurrent_updates(&[&one, &two]).await;
}

fn bulk(n: usize) -> Vec<Value> {
    (0..n).map(|i| json!({"name": format!("bulk {i}"), "type": "worker", "tags": {"i": i.to_string()}})).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_is_all_or_nothing() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let post = |agents: Vec<Value>| {
        app.request(Method::POST, "/api/v1/agents/bulk", Some(&token))
            .json(&json!({"agents": agents}))
            .send()
    };

    // One bad item among 1,000: 422 naming its index, nothing appended.
    let mut items = bulk(1000);
    items[737]["type"] = json!("NOT VALID");
    items[900] = json!({"name": 5, "type": "x"});
    let r = post(items).await.unwrap();
    assert_eq!(r.status(), 422);
    let p: Value = r.json().await.unwrap();
    let indexes: Vec<u64> = p["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [737, 900]);
    assert_eq!(app.last_seq().await, 0);
    assert_eq!(post(vec![]).await.unwrap().status(), 422);
    assert_eq!(post(bulk(1001)).await.unwrap().status(), 422);
    assert_eq!(app.last_seq().await, 0);

    // 1,000 good ones: all appended together, all projected.
    let r = post(bulk(1000)).await.unwrap();
    assert_eq!(r.status(), 201);
    let last = header_u64(&r, "x-event-seq");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["created"], 1000);
    assert_eq!(body["items"].as_array().unwrap().len(), 1000);
    assert_eq!(body["items"][999]["name"], "bulk 999");
    assert_eq!(last, 1000);
    assert_eq!(app.deps.store.stream_state().await.unwrap().messages, 1000);
    let r = app
        .request(
            Method::GET,
            &format!("/api/v1/agents?limit=500&min_seq={last}"),
            Some(&token),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM agents")
        .fetch_one(&app.deps.pool)
        .await
        .unwrap();
    assert_eq!(rows, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_cut_off_in_the_middle_leaves_nothing() {
    let sandbox = Sandbox::new().await;
    let store = infra::EventStore::connect(&sandbox.settings.nats)
        .await
        .unwrap();
    let envelopes: Vec<(String, events::Envelope)> = (0..1000)
        .map(|i| {
            let id = Uuid::now_v7();
            let meta = events::EventMeta {
                aggregate_id: id,
                aggregate_version: 1,
                occurred_at: chrono::Utc::now(),
                actor: "t".into(),
                request_id: format!("r{i}"),
            };
            let env = events::Envelope::new(
                Uuid::now_v7(),
                AggregateType::Agent,
                &meta,
                "agent.deleted",
                1,
                json!({}),
            );
            (store.subject(AggregateType::Agent, id), env)
        })
        .collect();
    let items: Vec<infra::BatchItem<'_>> = envelopes
        .iter()
        .map(|(s, e)| infra::BatchItem {
            subject: s,
            expected: 0,
            envelope: e,
        })
        .collect();

    // The writer dies after sending half the batch: nothing becomes visible.
    tests::faults::abandon_batch(&sandbox.settings.nats, &items, 500).await;
    assert_eq!(store.stream_state().await.unwrap().messages, 0);

    // A batch in which one event's guard fails is refused whole.
    let taken = &envelopes[10].0;
    let first = store
        .append(taken, 0, &envelopes[10].1, None)
        .await
        .unwrap();
    assert_eq!(first, 1);
    let refused = store.append_batch(&items[..20], None).await;
    assert!(
        matches!(refused, Err(infra::StoreError::Conflict)),
        "{refused:?}"
    );
    assert_eq!(store.stream_state().await.unwrap().messages, 1);

    // A complete batch lands whole, with consecutive sequences.
    let seqs = store.append_batch(&items[20..], None).await.unwrap();
    assert_eq!(seqs.len(), 980);
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    let state = store.stream_state().await.unwrap();
    assert_eq!(state.messages, 981);
    assert_eq!(state.last_sequence, *seqs.last().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_retries_return_the_first_response_even_after_a_restart() {
    let sandbox = Sandbox::new().await;
    let app = sandbox.start(Role::All).await;
    let token = app.admin_token().await;
    let send = |app: &TestApp, key: &str, body: Value| {
        app.request(Method::POST, "/api/v1/agents", Some(&token))
            .header("idempotency-key", key)
            .json(&body)
            .send()
    };
    let r = send(&app, "key-1", agent_body("once")).await.unwrap();
    assert_eq!(r.status(), 201);
    let location = header(&r, "location");
    let first: Value = r.json().await.unwrap();
    let seq = app.last_seq().await;

    let r = send(&app, "key-1", agent_body("once")).await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(header(&r, "location"), location);
    assert_eq!(r.json::<Value>().await.unwrap(), first);
    assert_eq!(app.last_seq().await, seq, "a retry appends nothing");

    let r = send(&app, "key-1", agent_body("another")).await.unwrap();
    assert_eq!(r.status(), 422, "the same key with another body");
    assert_eq!(app.last_seq().await, seq);

    // Restart: a new process on the same stream and database.
    app.stop().await;
    let app = sandbox.start(Role::All).await;
    let r = send(&app, "key-1", agent_body("once")).await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.json::<Value>().await.unwrap(), first);
    assert_eq!(
        app.last_seq().await,
        seq,
        "still nothing appended after the restart"
    );

    // Keys are per user, and work for updates and deletes too.
    let path = format!("/api/v1/agents/{}", first["id"].as_str().unwrap());
    for _ in 0..2 {
        let r = app
            .request(Method::DELETE, &path, Some(&token))
            .header("idempotency-key", "del-1")
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            204,
            "the retried delete answers as the first did"
        );
    }
    assert_eq!(app.last_seq().await, seq + 1);
    let r = app
        .request(Method::POST, "/api/v1/agents", Some(&token))
        .header("idempotency-key", "")
        .json(&agent_body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_and_what_deleting_one_does_to_its_agents() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;

    let r = app
        .request(Method::POST, "/api/v1/projects", Some(&token))
        .json(&json!({"name": " Apollo ", "description": "moon"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "etag").as_deref(), Some("\"1\""));
    let project: Value = r.json().await.unwrap();
    let pid = project["id"].as_str().unwrap().to_owned();
    assert_eq!(project["name"], "Apollo");
    assert!(
        project.get("agent_count").is_none(),
        "a write answers from the log; only reads count agents"
    );
    assert_eq!(project["version"], 1);
    let ppath = format!("/api/v1/projects/{pid}");

    let r = app
        .request(Method::POST, "/api/v1/projects", Some(&token))
        .json(&json!({"description": "no name"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);

    // Agents join by id; unknown projects are refused.
    let (a1, _) = created_id(
        app.create_agent(
            &token,
            json!({"name": "a1", "type": "t", "project_id": pid}),
        )
        .await,
    )
    .await;
    let (a2, _) = created_id(
        app.create_agent(&token, json!({"name": "a2", "type": "t"}))
            .await,
    )
    .await;
    let r = put(
        &app,
        &token,
        &format!("/api/v1/agents/{a2}"),
        json!({"project_id": pid}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["project_id"], pid.as_str());

    let r = put(
        &app,
        &token,
        &ppath,
        json!({"description": "to the moon", "agent_count": 7}),
    )
    .header("if-match", "\"1\"")
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let updated: Value = r.json().await.unwrap();
    assert_eq!(updated["description"], "to the moon");
    assert_eq!(updated["version"], 2);
    let r = put(&app, &token, &ppath, json!({"name": "x"}))
        .header("if-match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);

    // Deleting the project answers once its own event is stored; the
    // projector's process manager then detaches its agents, which live on
    // unassigned, each by one event in the log.
    let r = app
        .request(Method::DELETE, &ppath, Some(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let seq = header_u64(&r, "x-event-seq");
    let deletion = app.deps.store.get(seq).await.unwrap();
    assert_eq!(deletion.envelope.event_type, "project.deleted");
    for agent in [&a1, &a2] {
        let h = eventually(Duration::from_secs(10), "the agent is detached", || async {
            let h = app.agent_events(agent).await;
            (h.last().unwrap().0 == "agent.updated").then_some(h)
        })
        .await;
        assert_eq!(
            h.last().unwrap(),
            &("agent.updated".to_owned(), json!({"project_id": null}))
        );
        let detaches = h
            .iter()
            .filter(|(_, data)| data == &json!({"project_id": null}));
        assert_eq!(detaches.count(), 1, "agent {agent} is detached once");
        let r = app
            .read_at(
                &format!("/api/v1/agents/{agent}"),
                &token,
                app.last_seq().await,
            )
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.json::<Value>().await.unwrap()["project_id"],
            Value::Null,
            "agent {agent} detached"
        );
    }
    let r = app
        .create_agent(
            &token,
            json!({"name": "late", "type": "t", "project_id": pid}),
        )
        .await;
    assert_eq!(r.status(), 422, "a deleted project takes no agents");
    assert_eq!(
        app.request(Method::DELETE, &ppath, Some(&token))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        put(&app, &token, &ppath, json!({"name": "x"}))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM projects")
        .fetch_one(&app.deps.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_cannot_write_anything() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;
    let (id, _) = created_id(app.create_agent(&admin, agent_body("a")).await).await;
    let viewer = app.token_for(infra::auth::Role::Viewer).await;
    let seq = app.last_seq().await;
    for (method, path, body) in [
        (
            Method::PUT,
            format!("/api/v1/agents/{id}"),
            json!({"name": "b"}),
        ),
        (Method::DELETE, format!("/api/v1/agents/{id}"), json!(null)),
        (
            Method::POST,
            "/api/v1/agents/bulk".to_owned(),
            json!({"agents": [agent_body("x")]}),
        ),
        (
            Method::POST,
            "/api/v1/projects".to_owned(),
            json!({"name": "p"}),
        ),
    ] {
        let r = app
            .request(method.clone(), &path, Some(&viewer))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{method} {path}");
    }
    assert_eq!(app.last_seq().await, seq);
}
