//! Operational endpoints and the OpenAPI spec.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use tests::{Sandbox, TestApp, eventually, header};
use ymera::Role;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_liveness_readiness_and_info() {
    let app = TestApp::spawn().await;
    for prefix in ["", "/api/v1"] {
        let r = app
            .request(Method::GET, &format!("{prefix}/health"), None)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let h: Value = r.json().await.unwrap();
        assert_eq!(h["status"], "ok");
        assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
        for check in ["nats", "postgres", "projector"] {
            assert_eq!(h["checks"][check]["status"], "ok", "{check}: {h}");
        }
        assert!(h["checks"]["nats"]["latency_ms"].as_f64().is_some());

        let r = app
            .request(Method::GET, &format!("{prefix}/livez"), None)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = app
            .request(Method::GET, &format!("{prefix}/readyz"), None)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let info: Value = app
        .request(Method::GET, "/api/v1/system/info", None)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["name"], "ymera");
    assert_eq!(info["role"], "all");
    assert_eq!(info["stream"], format!("T_{}", app.sandbox.id));
    assert!(
        info["nats_server_version"]
            .as_str()
            .unwrap()
            .starts_with("2.")
    );
    assert!(info["postgres_version"].as_str().is_some());
    assert!(info["uptime_seconds"].as_i64().unwrap() >= 0);
    assert!(info["git_sha"].as_str().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spec_lists_every_endpoint() {
    let app = TestApp::spawn().await;
    let r = app
        .request(Method::GET, "/api/v1/openapi.json", None)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let spec: Value = r.json().await.unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    let paths = spec["paths"].as_object().unwrap();
    for (path, method) in [
        ("/api/v1/health", "get"),
        ("/api/v1/livez", "get"),
        ("/api/v1/readyz", "get"),
        ("/api/v1/system/info", "get"),
        ("/api/v1/auth/login", "post"),
        ("/api/v1/users", "post"),
        ("/api/v1/users", "get"),
        ("/api/v1/users/{username}", "delete"),
        ("/api/v1/agents", "post"),
        ("/api/v1/agents", "get"),
        ("/api/v1/agents/{id}", "get"),
        ("/api/v1/agents/{id}", "put"),
        ("/api/v1/agents/{id}", "delete"),
        ("/api/v1/agents/bulk", "post"),
        ("/api/v1/projects", "post"),
        ("/api/v1/projects/{id}", "put"),
        ("/api/v1/projects/{id}", "delete"),
        ("/api/v1/ws", "get"),
        ("/api/v1/events/stream", "get"),
        ("/api/v1/agents/search", "get"),
        ("/api/v1/agents/export", "get"),
        ("/api/v1/agents/{id}/history", "get"),
        ("/api/v1/projects", "get"),
        ("/api/v1/projects/{id}", "get"),
        ("/api/v1/metrics", "get"),
        ("/api/v1/analytics", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing from the spec"
        );
    }
    assert!(spec["components"]["securitySchemes"]["bearer"].is_object());
    assert!(spec["components"]["schemas"]["Problem"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_is_an_html_reference_over_the_spec() {
    let app = TestApp::spawn().await;
    let r = app
        .request(Method::GET, "/docs", None)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = header(&r, "content-type").unwrap();
    assert!(ct.starts_with("text/html"), "{ct}");
    let html = r.text().await.unwrap();
    assert!(html.contains("<html"), "{html:.200}");
    assert!(html.contains("api-reference"), "the Scalar reference");
    assert!(html.contains("/api/v1/agents/bulk"), "the spec is embedded");
}

/// Behind nginx, `/api/v1/openapi.json` is answered by a query API: every
/// role serves the same, whole spec, writes, login and users included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_serves_the_whole_spec() {
    let sandbox = Sandbox::new().await;
    let mut specs = Vec::new();
    for role in [Role::Query, Role::Command, Role::Projector, Role::All] {
        let app = sandbox.start(role).await;
        let spec: Value = app
            .request(Method::GET, "/api/v1/openapi.json", None)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        app.stop().await;
        specs.push(spec);
    }
    let query = &specs[0];
    for (path, method) in [
        ("/api/v1/auth/login", "post"),
        ("/api/v1/users", "post"),
        ("/api/v1/agents", "post"),
        ("/api/v1/agents/{id}", "put"),
        ("/api/v1/agents/bulk", "post"),
        ("/api/v1/projects/{id}", "delete"),
        ("/api/v1/agents/export", "get"),
    ] {
        assert!(
            query["paths"][path][method].is_object(),
            "a query API's spec lacks {method} {path}"
        );
    }
    for (role, spec) in ["command", "projector", "all"].iter().zip(&specs[1..]) {
        assert_eq!(spec, query, "the {role} spec differs from the query API's");
    }
}

/// `/readyz`'s status code and `status`.
async fn ready(app: &TestApp) -> (u16, String) {
    let r = app
        .request(Method::GET, "/readyz", None)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    (status, body["status"].as_str().unwrap().to_owned())
}

/// Waits until `/readyz` of `app` (named `name`) answers `want`.
async fn wait_ready(app: &TestApp, name: &str, want: u16) {
    let what = format!("{name} /readyz to answer {want}");
    eventually(Duration::from_secs(10), &what, || async {
        (ready(app).await.0 == want).then_some(())
    })
    .await;
}

/// `/readyz` asks only what the role needs: a query API serves reads
/// without NATS, a command API writes without PostgreSQL, a projector
/// needs both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_asks_only_what_each_role_needs() {
    let (sandbox, nats, pg) = Sandbox::new().await.behind_proxies().await;
    let command = sandbox.start(Role::Command).await;
    let query = sandbox.start(Role::Query).await;
    let projector = sandbox.start(Role::Projector).await;
    let token = command.admin_token().await;
    for app in [&command, &query, &projector] {
        assert_eq!(ready(app).await, (200, "ready".into()));
    }

    nats.down();
    wait_ready(&command, "command", 503).await;
    wait_ready(&projector, "projector", 503).await;
    assert_eq!(ready(&command).await, (503, "unavailable".into()));
    assert_eq!(ready(&query).await, (200, "ready".into()));
    let r = query
        .request(Method::GET, "/api/v1/agents", Some(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "reads go on without NATS");
    nats.up();
    wait_ready(&command, "command", 200).await;
    wait_ready(&projector, "projector", 200).await;

    pg.down();
    wait_ready(&query, "query", 503).await;
    wait_ready(&projector, "projector", 503).await;
    assert_eq!(ready(&command).await, (200, "ready".into()));
    pg.up();
    wait_ready(&query, "query", 200).await;
    wait_ready(&projector, "projector", 200).await;
}
