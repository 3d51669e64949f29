//! `GET /projects` and `GET /projects/{id}` with `agent_count`, projects
//! created by appending `project.created` to the log.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use chrono::{Duration, Utc};
use reqwest::Method;
use serde_json::{Value, json};
use tests::seed::{Seeder, project_created};
use tests::{TestApp, header, header_u64};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_list_and_get_with_agent_count() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let viewer = app.token_for(infra::auth::Role::Viewer).await;
    let mut seeder = Seeder::new(&app.deps.store);
    let (p1, p2) = (Uuid::now_v7(), Uuid::now_v7());
    let t = Utc::now();
    seeder
        .project(
            p1,
            "project.created",
            project_created("Alpha"),
            t - Duration::seconds(2),
        )
        .await;
    seeder
        .project(
            p2,
            "project.created",
            project_created("Beta"),
            t - Duration::seconds(1),
        )
        .await;

    // Two agents in Alpha (the write side checks the project in the log),
    // one in none.
    let mut seq = 0;
    let mut in_alpha = Vec::new();
    for (name, project) in [("a1", Some(p1)), ("a2", Some(p1)), ("loose", None)] {
        let r = app
            .create_agent(
                &token,
                json!({"name": name, "type": "llm", "project_id": project}),
            )
            .await;
        assert_eq!(r.status(), 201, "{name}");
        seq = header_u64(&r, "x-event-seq");
        let a: Value = r.json().await.unwrap();
        if project.is_some() {
            in_alpha.push(a["id"].as_str().unwrap().parse::<Uuid>().unwrap());
        }
    }

    let r = app.read_at("/api/v1/projects", &viewer, seq).await;
    assert_eq!(r.status(), 200);
    assert!(header_u64(&r, "x-projection-seq") >= seq);
    let list: Value = r.json().await.unwrap();
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["name"], "Beta", "newest first");
    assert_eq!(items[0]["agent_count"], 0);
    assert_eq!(items[1]["name"], "Alpha");
    assert_eq!(items[1]["agent_count"], 2);
    assert_eq!(list["next_cursor"], Value::Null);
    let keys: Vec<&String> = items[1].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "agent_count",
            "created_at",
            "created_by",
            "description",
            "id",
            "name",
            "updated_at",
            "version"
        ]
    );
    assert_eq!(items[1]["created_by"], "seeder");
    assert_eq!(items[1]["version"], 1);

    // Keyset pages.
    let page: Value = app
        .request(Method::GET, "/api/v1/projects?limit=1", Some(&viewer))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"][0]["name"], "Beta");
    let cursor = page["next_cursor"].as_str().unwrap();
    let page: Value = app
        .request(
            Method::GET,
            &format!("/api/v1/projects?limit=1&cursor={cursor}"),
            Some(&viewer),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"][0]["name"], "Alpha");
    assert_eq!(page["next_cursor"], Value::Null);

    // One project, with ETag and 304.
    let r = app
        .request(
            Method::GET,
            &format!("/api/v1/projects/{p1}"),
            Some(&viewer),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "etag").as_deref(), Some("\"1\""));
    assert!(header(&r, "x-projection-seq").is_some());
    let alpha: Value = r.json().await.unwrap();
    assert_eq!(alpha, items[1]);
    let r = app
        .request(
            Method::GET,
            &format!("/api/v1/projects/{p1}"),
            Some(&viewer),
        )
        .header("if-none-match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);

    // The count follows the agents: delete one, move... by events.
    let deleted = seeder
        .agent(in_alpha[0], "agent.deleted", json!({}), Utc::now())
        .await;
    let renamed = seeder
        .project(
            p1,
            "project.updated",
            json!({"name": "Alpha 2"}),
            Utc::now(),
        )
        .await;
    assert!(renamed > deleted);
    let r = app
        .request(
            Method::GET,
            &format!("/api/v1/projects/{p1}?min_seq={renamed}"),
            Some(&viewer),
        )
        .header("if-none-match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a new version is not 304");
    assert_eq!(header(&r, "etag").as_deref(), Some("\"2\""));
    let alpha: Value = r.json().await.unwrap();
    assert_eq!(alpha["agent_count"], 1);
    assert_eq!(alpha["name"], "Alpha 2");

    // Deleted or unknown: 404; malformed: 400.
    let gone = seeder
        .project(p2, "project.deleted", json!({}), Utc::now())
        .await;
    let r = app
        .request(
            Method::GET,
            &format!("/api/v1/projects/{p2}?min_seq={gone}"),
            Some(&viewer),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/problem+json")
    );
    for path in [format!("/api/v1/projects/{}", Uuid::now_v7())] {
        let r = app
            .request(Method::GET, &path, Some(&viewer))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    for path in [
        "/api/v1/projects/nope",
        "/api/v1/projects?limit=501",
        "/api/v1/projects?x=1",
    ] {
        let r = app
            .request(Method::GET, path, Some(&viewer))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path}");
    }
    let r = app
        .request(Method::GET, "/api/v1/projects", None)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}
