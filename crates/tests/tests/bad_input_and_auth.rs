//! Bad input and missing rights are answered with problem+json 4xx and
//! append nothing.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use infra::auth::Role;
use reqwest::Method;
use serde_json::{Value, json};
use tests::{TestApp, header};

/// Each invalid body from `api.md`'s rules, and the field the 422 must name.
fn invalid_bodies() -> Vec<(Value, &'static str)> {
    let ok = |extra: Value| {
        let mut body = json!({"name": "n", "type": "llm"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let mut no_name = ok(json!({}));
    no_name.as_object_mut().unwrap().remove("name");
    let mut no_type = ok(json!({}));
    no_type.as_object_mut().unwrap().remove("type");
    let many_tags: serde_json::Map<String, Value> =
        (0..33).map(|i| (format!("k{i}"), json!("v"))).collect();
    vec![
        (no_name, "name"),
        (ok(json!({"name": "   "})), "name"),
        (ok(json!({"name": "x".repeat(201)})), "name"),
        (ok(json!({"name": 5})), "name"),
        (no_type, "type"),
        (ok(json!({"type": "LLM"})), "type"),
        (ok(json!({"type": "has space"})), "type"),
        (ok(json!({"type": "a".repeat(65)})), "type"),
        (ok(json!({"type": ""})), "type"),
        (ok(json!({"description": "d".repeat(4001)})), "description"),
        (ok(json!({"status": "sleeping"})), "status"),
        (ok(json!({"capabilities": vec!["c"; 65]})), "capabilities"),
        (ok(json!({"capabilities": ["ok", ""]})), "capabilities[1]"),
        (
            ok(json!({"capabilities": ["c".repeat(101)]})),
            "capabilities[0]",
        ),
        (ok(json!({"capabilities": "search"})), "capabilities"),
        (ok(json!({"config": [1, 2]})), "config"),
        (ok(json!({"config": "text"})), "config"),
        (
            ok(json!({"config": {"blob": "x".repeat(65 * 1024)}})),
            "config",
        ),
        (ok(json!({"tags": many_tags})), "tags"),
        (ok(json!({"tags": {"a:b": "v"}})), "tags.a:b"),
        (ok(json!({"tags": {"k": 1}})), "tags.k"),
        (
            ok(json!({"project_id": uuid::Uuid::now_v7()})),
            "project_id",
        ),
        (ok(json!({"project_id": "not-a-uuid"})), "project_id"),
        (ok(json!({"version": 3})), "version"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_bodies_are_422_naming_the_field_and_append_nothing() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let before = app.last_seq().await;
    for (body, field) in invalid_bodies() {
        let r = app.create_agent(&token, body.clone()).await;
        assert_eq!(r.status(), 422, "body {body:.200}");
        assert_eq!(
            header(&r, "content-type").as_deref(),
            Some("application/problem+json")
        );
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["status"], 422);
        assert_eq!(problem["instance"], "/api/v1/agents");
        assert!(
            problem["request_id"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        );
        let fields: Vec<&str> = problem["errors"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["field"].as_str())
            .collect();
        assert!(
            fields.contains(&field),
            "expected field {field:?} in {fields:?} for {body:.200}"
        );
    }
    assert_eq!(
        app.last_seq().await,
        before,
        "no invalid request appended anything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_media_type_and_size() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let post = |body: Vec<u8>, ct: Option<&'static str>| {
        let mut r = app
            .request(Method::POST, "/api/v1/agents", Some(&token))
            .body(body);
        if let Some(ct) = ct {
            r = r.header("content-type", ct);
        }
        r.send()
    };
    let r = post(b"{\"name\": ".to_vec(), Some("application/json"))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/problem+json")
    );

    let r = post(
        b"{\"name\":\"a\",\"type\":\"b\"} trailing".to_vec(),
        Some("application/json"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);

    let r = post(
        b"{\"name\":\"a\",\"type\":\"b\"}".to_vec(),
        Some("text/plain"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 415);
    let r = post(b"{\"name\":\"a\",\"type\":\"b\"}".to_vec(), None)
        .await
        .unwrap();
    assert_eq!(r.status(), 415);

    let huge = format!(
        "{{\"name\":\"a\",\"type\":\"b\",\"description\":\"{}\"}}",
        "x".repeat(2 * 1024 * 1024)
    );
    let r = post(huge.into_bytes(), Some("application/json"))
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/problem+json")
    );

    assert_eq!(app.last_seq().await, 0, "nothing was appended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_are_enforced() {
    let app = TestApp::spawn().await;
    let body = json!({"name": "n", "type": "llm"});

    // No token, a garbage token, a token signed with another secret.
    let r = app
        .request(Method::POST, "/api/v1/agents", None)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(header(&r, "www-authenticate").as_deref(), Some("Bearer"));
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/problem+json")
    );
    let r = app
        .request(Method::GET, "/api/v1/agents", Some("not.a.token"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let foreign = infra::auth::Auth::new(
        &[9u8; 32],
        std::time::Duration::from_secs(60),
        "ymera",
        "ymera-api",
    );
    let (forged, _) = foreign.issue("admin", Role::Admin, 1).unwrap();
    let r = app
        .request(Method::GET, "/api/v1/agents", Some(&forged))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A viewer reads but may not write; an editor writes but may not manage users.
    let viewer = app.token_for(Role::Viewer).await;
    let r = app
        .request(Method::GET, "/api/v1/agents", Some(&viewer))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app.create_agent(&viewer, body.clone()).await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/problem+json")
    );

    let editor = app.token_for(Role::Editor).await;
    let r = app.create_agent(&editor, body.clone()).await;
    assert_eq!(r.status(), 201);
    let r = app
        .request(Method::GET, "/api/v1/users", Some(&editor))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    assert_eq!(
        app.last_seq().await,
        1,
        "only the editor's write was appended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_and_user_management() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token().await;

    // Unknown user and wrong password get the same answer.
    let attempt = |u: &'static str, p: &'static str| {
        app.request(Method::POST, "/api/v1/auth/login", None)
            .json(&json!({"username": u, "password": p}))
            .send()
    };
    let unknown: Value = attempt("nobody", "whatever-password")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let wrong = attempt("admin", "wrong-password").await.unwrap();
    assert_eq!(wrong.status(), 401);
    let wrong: Value = wrong.json().await.unwrap();
    assert_eq!(unknown["detail"], wrong["detail"]);
    assert_eq!(unknown["status"], 401);
    // A name PostgreSQL cannot even hold (NUL) is an unknown user too, not a
    // 500 (found by scripts/fuzz.sh).
    let nul = attempt("ad\u{0}min", "whatever-password").await.unwrap();
    assert_eq!(nul.status(), 401);
    let nul: Value = nul.json().await.unwrap();
    assert_eq!(nul["detail"], wrong["detail"]);

    let r = app
        .request(Method::POST, "/api/v1/auth/login", None)
        .json(&json!({"username": "admin", "password": tests::ADMIN_PASSWORD}))
        .send()
        .await
        .unwrap();
    let token: Value = r.json().await.unwrap();
    assert_eq!(token["token_type"], "bearer");
    assert_eq!(token["role"], "admin");
    assert_eq!(token["expires_in"], 600);

    // Create, list, refuse duplicates and bad input, delete.
    let create = |body: Value| {
        app.request(Method::POST, "/api/v1/users", Some(&admin))
            .json(&body)
            .send()
    };
    let r = create(json!({"username": "vera", "password": "long-enough-pw", "role": "viewer"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let user: Value = r.json().await.unwrap();
    assert_eq!(user["username"], "vera");
    assert_eq!(user["role"], "viewer");
    assert!(user.get("password").is_none() && user.get("password_hash").is_none());
    let r = create(json!({"username": "vera", "password": "long-enough-pw", "role": "viewer"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let r = create(json!({"username": "bad name", "password": "short", "role": "viewer"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let r = create(json!({"username": "x", "password": "long-enough-pw", "role": "root"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 422);

    let list: Value = app
        .request(Method::GET, "/api/v1/users", Some(&admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["admin", "vera"]);
    assert!(
        !list.to_string().contains("argon2"),
        "hashes never leave the server"
    );

    // The hash in the table is Argon2id.
    let hash: String =
        sqlx::query_scalar("SELECT password_hash FROM users WHERE username = 'vera'")
            .fetch_one(&app.deps.pool)
            .await
            .unwrap();
    assert!(hash.starts_with("$argon2id$"));

    let r = app
        .request(Method::DELETE, "/api/v1/users/admin", Some(&admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409, "the last admin stays");
    let r = app
        .request(Method::DELETE, "/api/v1/users/vera", Some(&admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = app
        .request(Method::DELETE, "/api/v1/users/vera", Some(&admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = attempt("vera", "long-enough-pw").await.unwrap();
    assert_eq!(r.status(), 401, "a deleted user cannot log in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_are_problems() {
    let app = TestApp::spawn().await;
    let r = app
        .request(Method::GET, "/api/v1/nothing-here", None)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/problem+json")
    );
    let r = app
        .request(Method::PATCH, "/api/v1/auth/login", None)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/problem+json")
    );
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["status"], 405);
    assert!(
        header(
            &app.request(Method::GET, "/livez", None)
                .send()
                .await
                .unwrap(),
            "x-request-id"
        )
        .is_some()
    );
}

/// The README's promise: the API limit is per user, whichever of their
/// tokens they send (a login mints a new one, so a limit per token would
/// be no limit), and users do not share a bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_is_per_user_across_their_tokens() {
    let sandbox = tests::Sandbox::new().await;
    let mut settings = sandbox.settings.clone();
    // One a second, bursts of two: a bucket drained stays drained for the
    // next few requests, however slow the machine.
    settings.http.rate_limit_per_user = 1;
    let app = sandbox.start_with(ymera::Role::All, &settings).await;
    let viewer = app.token_for(Role::Viewer).await;
    let first = app.admin_token().await;
    // Logins within one second sign the same claims; a later one does not.
    let second = tests::eventually(
        std::time::Duration::from_secs(5),
        "a second, different token",
        || async {
            let token = app.admin_token().await;
            (token != first).then_some(token)
        },
    )
    .await;
    let get = |token: &str| {
        app.request(Method::GET, "/api/v1/agents", Some(token))
            .send()
    };
    let mut drained = false;
    for _ in 0..5 {
        if get(&first).await.unwrap().status() == 429 {
            drained = true;
            break;
        }
    }
    assert!(drained, "the admin's first token is limited");
    let r = get(&second).await.unwrap();
    assert_eq!(
        r.status(),
        429,
        "the admin's second token shares the first one's bucket"
    );
    assert!(header(&r, "retry-after").is_some());
    assert_eq!(
        get(&viewer).await.unwrap().status(),
        200,
        "another user has a bucket of their own"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_per_user_and_on_login() {
    let sandbox = tests::Sandbox::new().await;
    let mut settings = sandbox.settings.clone();
    settings.http.rate_limit_per_user = 5;
    settings.http.login_attempts_per_minute = 3;
    let app = sandbox.start_with(ymera::Role::All, &settings).await;
    let token = app.admin_token().await;

    // A burst of twice the rate, then 429 with Retry-After.
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..12 {
        let r = app
            .request(Method::GET, "/api/v1/agents", Some(&token))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        last = Some(r);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        10,
        "{statuses:?}"
    );
    let r = last.unwrap();
    assert_eq!(r.status(), 429);
    assert!(header(&r, "retry-after").is_some());
    assert_eq!(header(&r, "ratelimit-limit").as_deref(), Some("10"));
    assert_eq!(header(&r, "ratelimit-remaining").as_deref(), Some("0"));
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/problem+json")
    );
    // Operational endpoints are not limited.
    let r = app
        .request(Method::GET, "/health", None)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Login attempts: the first token used one; two more wrong ones, then 429.
    let attempt = || {
        app.request(Method::POST, "/api/v1/auth/login", None)
            .json(&json!({"username": "admin", "password": "wrong-password"}))
            .send()
    };
    assert_eq!(attempt().await.unwrap().status(), 401);
    assert_eq!(attempt().await.unwrap().status(), 401);
    let r = attempt().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(header(&r, "retry-after").is_some());
}
