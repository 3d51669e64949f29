//! Conditional requests as RFC 9110 has them: `If-None-Match` on reads
//! compares weakly and takes lists and `*`; `If-Match` on writes compares
//! strongly (a weak tag never matches) and takes lists and `*`.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use reqwest::{Method, RequestBuilder};
use serde_json::{Value, json};
use tests::{TestApp, agent_body, header, header_u64};

/// `builder` with one `name` header line per value.
fn with_lines(mut builder: RequestBuilder, name: &str, values: &[&str]) -> RequestBuilder {
    for v in values {
        builder = builder.header(name, *v);
    }
    builder
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_none_match_compares_weakly_and_takes_lists_and_star() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let r = app.create_agent(&token, agent_body("a")).await;
    let seq = header_u64(&r, "x-event-seq");
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let project = app
        .request(Method::POST, "/api/v1/projects", Some(&token))
        .json(&json!({"name": "p"}))
        .send()
        .await
        .unwrap();
    let project_seq = header_u64(&project, "x-event-seq");
    let project = project.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let agent_path = format!("/api/v1/agents/{id}?min_seq={seq}");
    let project_path = format!("/api/v1/projects/{project}?min_seq={project_seq}");

    for (values, expected) in [
        (&["\"1\""][..], 304),
        (&["W/\"1\""][..], 304),
        (&["\"7\", W/\"1\""][..], 304),
        (&["\"7\",\"8\""][..], 200),
        (&["\"7\"", "W/\"1\""][..], 304),
        (&["*"][..], 304),
        (&["\"2\""][..], 200),
        (&["W/\"01\""][..], 200),
        // Malformed: ignored, the resource is sent.
        (&["1"][..], 200),
    ] {
        for path in [&agent_path, &project_path] {
            let r = with_lines(
                app.request(Method::GET, path, Some(&token)),
                "if-none-match",
                values,
            )
            .send()
            .await
            .unwrap();
            assert_eq!(r.status(), expected, "If-None-Match {values:?} on {path}");
            assert_eq!(header(&r, "etag").as_deref(), Some("\"1\""));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_match_compares_strongly_and_takes_lists_and_star() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let r = app.create_agent(&token, agent_body("a")).await;
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/api/v1/agents/{id}");
    let mut version = 1;
    let mut last_seq = app.last_seq().await;
    for (values, expected) in [
        // A weak tag never matches, even of the current version.
        (&["W/\"1\""][..], 412),
        (&["\"0\", \"1\""][..], 200),
        (&["\"9\", W/\"2\""][..], 412),
        (&["\"9\"", "\"2\""][..], 200),
        (&["*"][..], 200),
        // Only the exact tag: "04" is not "4".
        (&["\"04\""][..], 412),
        (&["\"abc\", \"4\""][..], 200),
        // Malformed: refused before anything is decided.
        (&["4"][..], 400),
        (&["*, \"5\""][..], 400),
    ] {
        let r = with_lines(
            app.request(Method::PUT, &path, Some(&token)),
            "if-match",
            values,
        )
        .json(&json!({"description": format!("v{}", version + 1)}))
        .send()
        .await
        .unwrap();
        assert_eq!(
            r.status(),
            expected,
            "If-Match {values:?} at version {version}"
        );
        if expected == 200 {
            version += 1;
            assert_eq!(header(&r, "etag"), Some(format!("\"{version}\"")));
        } else {
            assert_eq!(
                header(&r, "content-type").as_deref(),
                Some("application/problem+json")
            );
            assert_eq!(
                app.last_seq().await,
                last_seq,
                "a refused write appends nothing"
            );
        }
        last_seq = app.last_seq().await;
    }

    let r = app
        .request(Method::DELETE, &path, Some(&token))
        .header("if-match", "W/\"5\", \"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    let r = app
        .request(Method::DELETE, &path, Some(&token))
        .header("if-match", "\"1\", \"5\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
}
