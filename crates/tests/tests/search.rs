//! `GET /agents/search`: prefixes, typos, ranking, filters, pagination and
//! hostile input. The rules one by one, facets and the index's life (restart,
//! rebuild, crash) are in `search_index.rs`.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use reqwest::Method;
use serde_json::{Value, json};
use tests::{TestApp, header_u64, names};

async fn seed(app: &TestApp, token: &str) -> u64 {
    let mut seq = 0;
    for body in [
        json!({"name": "Summarizer", "type": "llm", "capabilities": ["summarize"], "description": "condenses reports"}),
        json!({"name": "Helper", "type": "tool", "description": "a summarizer of long documents and mail"}),
        json!({"name": "Translator", "type": "llm", "status": "paused", "description": "translates between languages"}),
        json!({"name": "Scout", "type": "crawler", "capabilities": ["search"], "tags": {"team": "research"}}),
        json!({"name": "Агент поиска", "type": "llm", "description": "ищет документы"}),
    ] {
        let r = app.create_agent(token, body).await;
        assert_eq!(r.status(), 201);
        seq = header_u64(&r, "x-event-seq");
    }
    seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_typos_ranking_filters_and_pages() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let seq = seed(&app, &token).await;

    // A prefix finds both; the name match ranks first.
    let page = app.search(&token, &[("q", "summ")], seq).await;
    assert_eq!(names(&page), ["Summarizer", "Helper"]);
    let scores: Vec<f64> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["score"].as_f64().unwrap())
        .collect();
    assert!(scores[0] > scores[1], "{scores:?}");
    assert_eq!(page["items"][0]["type"], "llm", "items are whole agents");
    assert_eq!(page["next_cursor"], Value::Null);

    // One typo (a letter missing, one swapped) still finds the agent, first.
    let page = app.search(&token, &[("q", "sumarizer")], seq).await;
    assert_eq!(names(&page)[0], "Summarizer");
    let page = app.search(&token, &[("q", "translater")], seq).await;
    assert_eq!(names(&page), ["Translator"]);

    // Type, capabilities, tags and description are searched too, any case.
    assert_eq!(
        names(&app.search(&token, &[("q", "RESEARCH")], seq).await),
        ["Scout"]
    );
    assert_eq!(
        names(&app.search(&token, &[("q", "crawl")], seq).await),
        ["Scout"]
    );
    assert_eq!(
        names(&app.search(&token, &[("q", "languages")], seq).await),
        ["Translator"]
    );
    // Non-Latin text.
    assert_eq!(
        names(&app.search(&token, &[("q", "агент")], seq).await),
        ["Агент поиска"]
    );
    // Nothing matches: an empty page, not an error.
    assert!(names(&app.search(&token, &[("q", "zzzzqqqq")], seq).await).is_empty());

    // The list filters apply.
    let page = app
        .search(&token, &[("q", "summ"), ("type", "tool")], seq)
        .await;
    assert_eq!(names(&page), ["Helper"]);
    let page = app
        .search(&token, &[("q", "translator"), ("status", "active")], seq)
        .await;
    assert!(names(&page).is_empty());

    // Keyset pages on (score, id): no repeats, no gaps.
    let first = app
        .search(&token, &[("q", "summ"), ("limit", "1")], seq)
        .await;
    assert_eq!(names(&first), ["Summarizer"]);
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let second = app
        .search(
            &token,
            &[("q", "summ"), ("limit", "1"), ("cursor", &cursor)],
            seq,
        )
        .await;
    assert_eq!(names(&second), ["Helper"]);
    assert_eq!(second["next_cursor"], Value::Null);

    // Bad requests are 400 problems.
    for query in [
        vec![],
        vec![("q", "")],
        vec![("q", "   ")],
        vec![("q", "x"), ("bogus", "1")],
        vec![("q", "x"), ("limit", "0")],
        vec![("q", "x"), ("cursor", "garbage")],
        vec![("q", "x"), ("status", "sleeping")],
    ] {
        let r = app
            .request(Method::GET, "/api/v1/agents/search", Some(&token))
            .query(&query)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{query:?}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{query:?}"
        );
    }
    let long = "a".repeat(201);
    let r = app
        .request(Method::GET, "/api/v1/agents/search", Some(&token))
        .query(&[("q", long.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let ok = "é".repeat(200);
    assert_eq!(
        app.request(Method::GET, "/api/v1/agents/search", Some(&token))
            .query(&[("q", ok.as_str())])
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "200 characters (not bytes) are allowed"
    );
    // Viewers may search; no token may not.
    let r = app
        .request(Method::GET, "/api/v1/agents/search?q=x", None)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_strings_are_answered_never_5xx() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let seq = seed(&app, &token).await;
    for q in [
        "'",
        "''",
        "%",
        "_",
        "\\",
        "\\\\'",
        "&|!():*",
        "a & b | !c",
        "summ:*",
        "summ:* | !x",
        "(((",
        "<->",
        "a <-> b",
        "'; DROP TABLE agents; --",
        "%' OR '1'='1",
        "$1",
        "日本語のエージェント",
        "Ünïcödé ☃ 🤖",
        "\u{202e}rtl",
        "null",
        "   spaced   out   ",
        "-",
        "*",
    ] {
        let r = app
            .request(Method::GET, "/api/v1/agents/search", Some(&token))
            .query(&[("q", q)])
            .header("x-min-event-seq", seq.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "q = {q:?}");
        let page: Value = r.json().await.unwrap();
        assert!(page["items"].is_array(), "q = {q:?}");
    }
    // The classic injection finds nothing and breaks nothing.
    let page = app.search(&token, &[("q", "summ' OR 1=1 --")], seq).await;
    assert!(names(&page).len() <= 2);
    // NUL is refused: a 400, not a 500.
    let r = app
        .request(Method::GET, "/api/v1/agents/search?q=a%00b", Some(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    for path in [
        "/api/v1/agents/search?q=x&tag=a:%00",
        "/api/v1/agents/export?tag=a%00:b",
        "/api/v1/agents?tag=a:b%00",
    ] {
        let r = app
            .request(Method::GET, path, Some(&token))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path}");
    }
    // Hostile tag values are just values.
    let page = app
        .search(&token, &[("q", "scout"), ("tag", "team:'%_\\&|!")], seq)
        .await;
    assert!(names(&page).is_empty());
    // Everything still there.
    let page = app.search(&token, &[("q", "scout")], seq).await;
    assert_eq!(names(&page), ["Scout"]);
}

/// Many agents worth the same score, written in several commits (so in
/// several segments), one of the oldest updated (its document moves to the
/// newest segment, out of id order there) and one deleted: every page is
/// the next run of ids in descending order, with no repeats and no gaps,
/// whether a search stops a segment early or reads it whole (facets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_scores_page_in_id_order_across_segments_updates_and_deletes() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let mut ids = Vec::new();
    for batch in 0..3 {
        let agents = (0..8)
            .map(|i| json!({"name": format!("Tier agent {batch}-{i}"), "type": "llm"}))
            .collect();
        ids.extend(app.bulk_create(&token, agents).await);
        // Searching at the sequence waits for the batch's commit: a
        // segment of 8, more than a page.
        let seq = app.last_seq().await;
        app.search(&token, &[("q", "tier")], seq).await;
    }
    let r = app
        .request(
            Method::PUT,
            &format!("/api/v1/agents/{}", ids[1]),
            Some(&token),
        )
        .json(&json!({"description": "still a tier agent, changed last"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let updated = header_u64(&r, "x-event-seq");
    let r = app
        .request(
            Method::DELETE,
            &format!("/api/v1/agents/{}", ids[7]),
            Some(&token),
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let seq = updated.max(header_u64(&r, "x-event-seq"));
    let mut expected: Vec<String> = ids.iter().filter(|id| **id != ids[7]).cloned().collect();
    expected.sort_unstable_by(|a, b| b.cmp(a));

    for facets in [None, Some("type")] {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut query = vec![("q", "tier"), ("limit", "5")];
            if let Some(c) = &cursor {
                query.push(("cursor", c));
            }
            if let Some(f) = facets {
                query.push(("facets", f));
            }
            let page = app.search(&token, &query, seq).await;
            for item in page["items"].as_array().unwrap() {
                assert_eq!(item["score"], page["items"][0]["score"], "{facets:?}");
                seen.push(item["id"].as_str().unwrap().to_owned());
            }
            if let Some(f) = facets {
                assert_eq!(page["facets"][f]["llm"], 23, "every match counted");
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        assert_eq!(seen, expected, "facets {facets:?}");
    }
}
