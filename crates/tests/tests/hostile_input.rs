//! A corpus of hostile requests: each gets a 4xx problem+json, never a 5xx,
//! and nothing is appended.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use base64::Engine;
use reqwest::Method;
use serde_json::Value;
use tests::{TestApp, header};

/// A hostile request: a name, method, path, token, content type and body.
type Case = (
    &'static str,
    Method,
    String,
    Option<String>,
    Option<&'static str>,
    Vec<u8>,
);

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_4xx_problems_and_append_nothing() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let nested = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_object = format!(
        "{{\"name\":\"a\",\"type\":\"b\",\"config\":{}{}}}",
        "{\"k\":".repeat(200),
        "}".repeat(200)
    );
    let mut invalid_utf8 = b"{\"name\":\"".to_vec();
    invalid_utf8.extend_from_slice(&[0xff, 0xfe, 0xfd]);
    invalid_utf8.extend_from_slice(b"\",\"type\":\"x\"}");

    // Tokens: tampered, expired, alg none, wrong issuer.
    let parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&parts[1])
            .unwrap(),
    )
    .unwrap();
    let mut admin_claims = claims.clone();
    admin_claims["sub"] = "mallory".into();
    let tampered = format!("{}.{}.{}", parts[0], b64(&admin_claims), parts[2]);
    let none = format!(
        "{}.{}.",
        b64(&serde_json::json!({"alg": "none", "typ": "JWT"})),
        parts[1]
    );
    let mut expired_claims = claims.clone();
    expired_claims["exp"] = 1.into();
    let expired = format!("{}.{}.{}", parts[0], b64(&expired_claims), parts[2]);
    let hs512 = format!(
        "{}.{}.{}",
        b64(&serde_json::json!({"alg": "HS512", "typ": "JWT"})),
        parts[1],
        parts[2]
    );

    let json = "application/json";
    let cases: Vec<Case> = vec![
        (
            "deep array",
            Method::POST,
            "/api/v1/agents".into(),
            Some(token.clone()),
            Some(json),
            nested.into_bytes(),
        ),
        (
            "deep config",
            Method::POST,
            "/api/v1/agents".into(),
            Some(token.clone()),
            Some(json),
            deep_object.into_bytes(),
        ),
        (
            "invalid utf-8",
            Method::POST,
            "/api/v1/agents".into(),
            Some(token.clone()),
            Some(json),
            invalid_utf8,
        ),
        (
            "huge number",
            Method::POST,
            "/api/v1/agents".into(),
            Some(token.clone()),
            Some(json),
            b"{\"name\":1e999999,\"type\":\"x\"}".to_vec(),
        ),
        (
            "huge integer",
            Method::POST,
            "/api/v1/agents".into(),
            Some(token.clone()),
            Some(json),
            format!(
                "{{\"name\":\"a\",\"type\":\"b\",\"config\":{{\"n\":{}}}}}",
                "9".repeat(5000)
            )
            .into_bytes(),
        ),
        (
            "array body",
            Method::POST,
            "/api/v1/agents".into(),
            Some(token.clone()),
            Some(json),
            b"[1,2,3]".to_vec(),
        ),
        (
            "null body",
            Method::POST,
            "/api/v1/agents".into(),
            Some(token.clone()),
            Some(json),
            b"null".to_vec(),
        ),
        (
            "empty body",
            Method::POST,
            "/api/v1/agents".into(),
            Some(token.clone()),
            Some(json),
            vec![],
        ),
        (
            "nul in name",
            Method::POST,
            "/api/v1/agents".into(),
            Some(token.clone()),
            Some(json),
            b"{\"name\":\"a\\u0000b\",\"type\":\"x\"}".to_vec(),
        ),
        (
            "form body",
            Method::POST,
            "/api/v1/agents".into(),
            Some(token.clone()),
            Some("application/x-www-form-urlencoded"),
            b"name=a&type=b".to_vec(),
        ),
        (
            "oversized",
            Method::POST,
            "/api/v1/agents".into(),
            Some(token.clone()),
            Some(json),
            vec![b' '; 2 * 1024 * 1024],
        ),
        (
            "bulk of junk",
            Method::POST,
            "/api/v1/agents/bulk".into(),
            Some(token.clone()),
            Some(json),
            b"{\"agents\":[1,\"x\",null,{}]}".to_vec(),
        ),
        (
            "bad id",
            Method::GET,
            "/api/v1/agents/../../etc/passwd".into(),
            Some(token.clone()),
            None,
            vec![],
        ),
        (
            "bad uuid",
            Method::PUT,
            "/api/v1/agents/123".into(),
            Some(token.clone()),
            Some(json),
            b"{\"name\":\"x\"}".to_vec(),
        ),
        (
            "negative limit",
            Method::GET,
            "/api/v1/agents?limit=-1".into(),
            Some(token.clone()),
            None,
            vec![],
        ),
        (
            "huge limit",
            Method::GET,
            "/api/v1/agents?limit=99999999999999999999".into(),
            Some(token.clone()),
            None,
            vec![],
        ),
        (
            "tampered token",
            Method::POST,
            "/api/v1/agents".into(),
            Some(tampered),
            Some(json),
            b"{\"name\":\"a\",\"type\":\"b\"}".to_vec(),
        ),
        (
            "alg none",
            Method::POST,
            "/api/v1/agents".into(),
            Some(none),
            Some(json),
            b"{\"name\":\"a\",\"type\":\"b\"}".to_vec(),
        ),
        (
            "expired",
            Method::POST,
            "/api/v1/agents".into(),
            Some(expired),
            Some(json),
            b"{\"name\":\"a\",\"type\":\"b\"}".to_vec(),
        ),
        (
            "other alg",
            Method::POST,
            "/api/v1/agents".into(),
            Some(hs512),
            Some(json),
            b"{\"name\":\"a\",\"type\":\"b\"}".to_vec(),
        ),
        (
            "garbage token",
            Method::GET,
            "/api/v1/agents".into(),
            Some("%%%".into()),
            None,
            vec![],
        ),
        (
            "bad if-match",
            Method::DELETE,
            format!("/api/v1/agents/{}", uuid::Uuid::now_v7()),
            Some(token.clone()),
            None,
            vec![],
        ),
        (
            "search without q",
            Method::GET,
            "/api/v1/agents/search".into(),
            Some(token.clone()),
            None,
            vec![],
        ),
        (
            "search too long",
            Method::GET,
            format!("/api/v1/agents/search?q={}", "a".repeat(201)),
            Some(token.clone()),
            None,
            vec![],
        ),
        (
            "bad as_of",
            Method::GET,
            format!("/api/v1/agents/{}?as_of=yesterday", uuid::Uuid::now_v7()),
            Some(token.clone()),
            None,
            vec![],
        ),
        (
            "bad export format",
            Method::GET,
            "/api/v1/agents/export?format=xml".into(),
            Some(token.clone()),
            None,
            vec![],
        ),
        (
            "bad bucket",
            Method::GET,
            "/api/v1/analytics?bucket=century".into(),
            Some(token.clone()),
            None,
            vec![],
        ),
        (
            "login junk",
            Method::POST,
            "/api/v1/auth/login".into(),
            None,
            Some(json),
            b"{\"username\":[],\"password\":{}}".to_vec(),
        ),
    ];
    // A fresh connection per case: the server answers an oversized body
    // without reading it and closes that connection, and a pooled client
    // could race the close with its next request.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for (name, method, path, token, content_type, body) in cases {
        let mut r = client.request(method.clone(), app.url(&path)).body(body);
        if let Some(t) = &token {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        if let Some(ct) = content_type {
            r = r.header("content-type", ct);
        }
        if name == "bad if-match" {
            r = r.header("if-match", "\"1\", \"2\"");
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        assert!(
            (400..500).contains(&status),
            "{name}: {method} {path} answered {status}"
        );
        assert_eq!(
            header(&r, "content-type").as_deref(),
            Some("application/problem+json"),
            "{name}"
        );
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["status"], status, "{name}");
        assert!(problem["request_id"].is_string(), "{name}");
    }
    assert_eq!(app.last_seq().await, 0, "nothing was appended");

    // Oversized headers and too many of them.
    let r = app
        .request(Method::GET, "/api/v1/agents", Some(&token))
        .header("x-junk", "x".repeat(100 * 1024))
        .send()
        .await;
    if let Ok(r) = r {
        assert_eq!(r.status(), 431, "huge header");
        assert_eq!(
            header(&r, "content-type").as_deref(),
            Some("application/problem+json")
        );
    }
}
