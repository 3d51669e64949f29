//! The edge every request passes: compression when the client asks (never
//! the live feed), CORS off unless configured, and a handler's panic
//! answered as a problem with the request id.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::io::Read;

use reqwest::Method;
use serde_json::Value;
use tests::{Sandbox, TestApp, agent_body, header, header_u64};
use ymera::Role;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_compressed_as_the_client_asks() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let mut seq = 0;
    for i in 0..20 {
        let r = app
            .create_agent(&token, agent_body(&format!("agent {i}")))
            .await;
        seq = header_u64(&r, "x-event-seq");
    }
    let plain: Value = app
        .read_at("/api/v1/agents", &token, seq)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(plain["items"].as_array().unwrap().len(), 20);

    let get = |encoding: &'static str, path: &'static str| {
        app.request(Method::GET, path, Some(&token))
            .header("accept-encoding", encoding)
            .send()
    };
    // Without Accept-Encoding, nothing is compressed.
    let r = app
        .request(Method::GET, "/api/v1/agents", Some(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "content-encoding"), None);

    let r = get("gzip", "/api/v1/agents").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-encoding").as_deref(), Some("gzip"));
    let bytes = r.bytes().await.unwrap();
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_end(&mut json)
        .unwrap();
    let gzipped: Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(gzipped["items"], plain["items"]);

    let r = get("zstd", "/api/v1/agents").await.unwrap();
    assert_eq!(header(&r, "content-encoding").as_deref(), Some("zstd"));
    let json = zstd::decode_all(&r.bytes().await.unwrap()[..]).unwrap();
    let zstded: Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(zstded["items"], plain["items"]);

    let r = get("br;q=1, gzip;q=0.5", "/api/v1/agents").await.unwrap();
    assert_eq!(header(&r, "content-encoding").as_deref(), Some("br"));

    // A streamed export is compressed as it streams, and arrives whole.
    let r = get("gzip", "/api/v1/agents/export?format=ndjson")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-encoding").as_deref(), Some("gzip"));
    assert_eq!(header(&r, "content-length"), None, "still streamed");
    let bytes = r.bytes().await.unwrap();
    let mut ndjson = String::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_string(&mut ndjson)
        .unwrap();
    assert_eq!(ndjson.lines().count(), 20);

    // Small answers (a problem, a single agent) are not worth it.
    let r = get("gzip", "/api/v1/agents?limit=0").await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/problem+json")
    );
    assert_eq!(header(&r, "content-encoding"), None);

    // Never the live feed: an encoder would hold events back.
    let r = get("gzip, br, zstd", "/api/v1/events/stream")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(header(&r, "content-encoding"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_by_default_and_follows_the_configuration() {
    let sandbox = Sandbox::new().await;
    let preflight = |app: &TestApp, origin: &'static str| {
        app.request(Method::OPTIONS, "/api/v1/agents", None)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let off = sandbox.start(Role::All).await;
    let r = preflight(&off, "https://app.example").await.unwrap();
    assert_eq!(header(&r, "access-control-allow-origin"), None);
    let r = off
        .request(Method::GET, "/health", None)
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "access-control-allow-origin"), None);
    off.stop().await;

    let mut settings = sandbox.settings.clone();
    settings.http.cors_origins = vec!["https://app.example".into()];
    let on = sandbox.start_with(Role::All, &settings).await;
    let r = preflight(&on, "https://app.example").await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    let methods = header(&r, "access-control-allow-methods").unwrap();
    assert!(methods.contains("POST"), "{methods}");
    let allowed = header(&r, "access-control-allow-headers").unwrap();
    assert!(allowed.contains("authorization"), "{allowed}");

    let r = on
        .request(Method::GET, "/health", None)
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    let exposed = header(&r, "access-control-expose-headers").unwrap();
    assert!(
        exposed.contains("etag") && exposed.contains("x-event-seq"),
        "{exposed}"
    );

    // An origin not listed gets no CORS headers: the browser refuses.
    let r = preflight(&on, "https://evil.example").await.unwrap();
    assert_eq!(header(&r, "access-control-allow-origin"), None);
}

/// A route that panics, behind the same edge layers as every role's app:
/// the client gets a problem+json 500 with its request id, and the
/// connection survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_answered_with_a_problem() {
    async fn boom() -> &'static str {
        panic!("a bug in a handler")
    }
    let router = axum::Router::new().route("/boom", axum::routing::get(boom));
    let http = infra::config::HttpConfig::local();
    let app = infra::http::edge::layers(router, &http).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    // One connection for both requests: the panic must not drop it.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    for attempt in ["first", "second"] {
        let r = client
            .get(format!("http://{addr}/boom"))
            .header("x-request-id", format!("panic-{attempt}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 500);
        assert_eq!(
            header(&r, "content-type").as_deref(),
            Some("application/problem+json")
        );
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["status"], 500);
        assert_eq!(problem["request_id"], format!("panic-{attempt}"));
        assert_eq!(problem["instance"], "/boom");
        let detail = problem["detail"].as_str().unwrap();
        assert!(
            !detail.contains("a bug in a handler"),
            "no internals: {detail}"
        );
    }
}
