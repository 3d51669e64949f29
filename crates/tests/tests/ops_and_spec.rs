//! Operational endpoints and the OpenAPI spec.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use reqwest::Method;
use serde_json::Value;
use tests::TestApp;

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
