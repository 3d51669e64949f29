//! `GET /agents/{id}/history` and `GET /agents/{id}?as_of=`: the agent's
//! past, from its events.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use reqwest::Method;
use serde_json::{Value, json};
use tests::seed::Seeder;
use tests::{TestApp, header, header_u64};

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

async fn get(app: &TestApp, token: &str, path: &str, min_seq: u64) -> reqwest::Response {
    app.read_at(path, token, min_seq).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_of_rebuilds_the_agent_and_history_lists_its_events() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let viewer = app.token_for(infra::auth::Role::Viewer).await;

    let r = app
        .request(Method::POST, "/api/v1/agents", Some(&token))
        .header("x-request-id", "req-create-1")
        .json(&json!({"name": "Scout", "type": "llm", "capabilities": ["search"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let created_seq = header_u64(&r, "x-event-seq");
    let v1: Value = r.json().await.unwrap();
    let id = v1["id"].as_str().unwrap().to_owned();
    let t0: DateTime<Utc> = v1["created_at"].as_str().unwrap().parse().unwrap();

    // Two updates and a delete, appended to the log directly (at chosen
    // times after the creation).
    let uuid = id.parse().unwrap();
    let mut seeder = Seeder::new(&app.deps.store);
    seeder.actor = "bob".into();
    seeder.request_id = "req-update-1".into();
    seeder
        .agent(
            uuid,
            "agent.updated",
            json!({"status": "paused"}),
            t0 + Duration::seconds(10),
        )
        .await;
    seeder.request_id = "req-update-2".into();
    seeder
        .agent(
            uuid,
            "agent.updated",
            json!({"name": "Scout II", "capabilities": ["search", "crawl"]}),
            t0 + Duration::seconds(20),
        )
        .await;
    let last = app.last_seq().await;

    // Now: version 3.
    let now: Value = get(&app, &viewer, &format!("/api/v1/agents/{id}"), last)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(now["version"], 3);
    assert_eq!(now["name"], "Scout II");

    let as_of = |t: DateTime<Utc>| format!("/api/v1/agents/{id}?as_of={}", ts(t));
    // Between the two updates: the earlier state.
    let r = get(&app, &viewer, &as_of(t0 + Duration::seconds(15)), last).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "etag").as_deref(), Some("\"2\""));
    assert!(header_u64(&r, "x-projection-seq") >= last);
    let v2: Value = r.json().await.unwrap();
    assert_eq!(v2["version"], 2);
    assert_eq!(v2["status"], "paused");
    assert_eq!(v2["name"], "Scout");
    assert_eq!(v2["capabilities"], json!(["search"]));
    assert_eq!(v2["updated_at"], json!(t0 + Duration::seconds(10)));
    // Right after creation: exactly what the create answered.
    let r = get(&app, &viewer, &as_of(t0 + Duration::seconds(5)), last).await;
    assert_eq!(r.json::<Value>().await.unwrap(), v1);
    // At the instant of creation, inclusive.
    let r = get(&app, &viewer, &as_of(t0), last).await;
    assert_eq!(r.status(), 200);
    // After both: the current state.
    let r = get(&app, &viewer, &as_of(t0 + Duration::seconds(25)), last).await;
    assert_eq!(r.json::<Value>().await.unwrap(), now);
    // Before it existed: 404.
    let r = get(&app, &viewer, &as_of(t0 - Duration::seconds(1)), last).await;
    assert_eq!(r.status(), 404);
    // A `+00:00` offset works whether or not the client escaped the `+`.
    let plus = (t0 + Duration::seconds(15)).to_rfc3339_opts(SecondsFormat::Micros, false);
    assert!(plus.ends_with("+00:00"));
    for q in [plus.replace('+', "%2B"), plus.clone()] {
        let r = get(
            &app,
            &viewer,
            &format!("/api/v1/agents/{id}?as_of={q}"),
            last,
        )
        .await;
        assert_eq!(r.status(), 200, "{q}");
        assert_eq!(r.json::<Value>().await.unwrap()["version"], 2);
    }
    // Bad times are 400.
    for bad in ["yesterday", "2026-13-01T00:00:00Z", "", "1700000000"] {
        let r = get(
            &app,
            &viewer,
            &format!("/api/v1/agents/{id}?as_of={bad}"),
            last,
        )
        .await;
        assert_eq!(r.status(), 400, "{bad:?}");
    }
    let r = get(&app, &viewer, &format!("/api/v1/agents/{id}?at=x"), last).await;
    assert_eq!(r.status(), 400, "unknown parameter");

    // Deleted: gone now, but still there as of before the deletion.
    seeder.request_id = "req-delete".into();
    let deleted_seq = seeder
        .agent(uuid, "agent.deleted", json!({}), t0 + Duration::seconds(30))
        .await;
    let r = get(&app, &viewer, &format!("/api/v1/agents/{id}"), deleted_seq).await;
    assert_eq!(r.status(), 404);
    let r = get(
        &app,
        &viewer,
        &as_of(t0 + Duration::seconds(35)),
        deleted_seq,
    )
    .await;
    assert_eq!(r.status(), 404);
    let r = get(
        &app,
        &viewer,
        &as_of(t0 + Duration::seconds(25)),
        deleted_seq,
    )
    .await;
    assert_eq!(r.status(), 200);

    // History: every event oldest first, with actor and request id; a
    // deleted agent keeps it.
    let r = get(
        &app,
        &viewer,
        &format!("/api/v1/agents/{id}/history"),
        deleted_seq,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(header_u64(&r, "x-projection-seq") >= deleted_seq);
    let page: Value = r.json().await.unwrap();
    let items = page["items"].as_array().unwrap();
    assert_eq!(page["next_cursor"], Value::Null);
    let summary: Vec<(String, u64, String, String)> = items
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["version"].as_u64().unwrap(),
                e["actor"].as_str().unwrap().to_owned(),
                e["request_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "agent.created".into(),
                1,
                "admin".into(),
                "req-create-1".into()
            ),
            (
                "agent.updated".into(),
                2,
                "bob".into(),
                "req-update-1".into()
            ),
            (
                "agent.updated".into(),
                3,
                "bob".into(),
                "req-update-2".into()
            ),
            ("agent.deleted".into(), 4, "bob".into(), "req-delete".into()),
        ]
    );
    assert_eq!(items[0]["seq"], created_seq);
    assert!(
        items
            .windows(2)
            .all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64())
    );
    assert_eq!(items[0]["data"]["name"], "Scout");
    assert_eq!(
        items[1]["data"],
        json!({"status": "paused"}),
        "changed fields only"
    );
    assert_eq!(items[1]["occurred_at"], json!(t0 + Duration::seconds(10)));
    let keys: Vec<&String> = items[0].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "actor",
            "data",
            "occurred_at",
            "request_id",
            "seq",
            "type",
            "version"
        ]
    );

    // Pages of two.
    let first: Value = get(
        &app,
        &viewer,
        &format!("/api/v1/agents/{id}/history?limit=2"),
        0,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(first["items"].as_array().unwrap().len(), 2);
    let cursor = first["next_cursor"].as_str().unwrap();
    let second: Value = get(
        &app,
        &viewer,
        &format!("/api/v1/agents/{id}/history?limit=2&cursor={cursor}"),
        0,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(second["items"][0]["version"], 3);
    assert_eq!(second["items"][1]["version"], 4);
    assert_eq!(second["next_cursor"], Value::Null);

    // Never existed: 404; bad input: 400.
    let r = get(
        &app,
        &viewer,
        &format!("/api/v1/agents/{}/history", uuid::Uuid::now_v7()),
        0,
    )
    .await;
    assert_eq!(r.status(), 404);
    let r = get(&app, &viewer, "/api/v1/agents/not-a-uuid/history", 0).await;
    assert_eq!(r.status(), 400);
    let r = get(
        &app,
        &viewer,
        &format!("/api/v1/agents/{id}/history?cursor=zz"),
        0,
    )
    .await;
    assert_eq!(r.status(), 400);
    let r = app
        .request(Method::GET, &format!("/api/v1/agents/{id}/history"), None)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}
