//! Proximity in search ranking, case by case: the words of a query near
//! each other in one field (a phrase with a slop of two) add 100 to a
//! hit's score. The index answers two-word queries from terms of the word
//! pairs it keeps, and checks the phrase only on those documents; these
//! cases pin the phrase's rules so that shortcut can never change a score:
//! either order when adjacent, up to three positions apart in order, words
//! across the values of one field, never across two fields, numbers, a
//! repeated word and three words (which go by the phrase alone).

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::BTreeMap;

use serde_json::{Value, json};
use tests::{TestApp, header_u64};

/// What proximity adds to a score, and the part of a score below the typo
/// tiers (1000 each) that holds it: the fields' weights and exactness add
/// at most 16 × 4.5 = 72.
const PROXIMITY: f64 = 100.0;

fn agent(name: &str, description: &str) -> Value {
    json!({"name": name, "type": "tool", "description": description})
}

/// Whether each hit of `q` had its words near each other, by name.
async fn near(app: &TestApp, token: &str, q: &str, seq: u64) -> BTreeMap<String, bool> {
    let page = app.search(token, &[("q", q), ("limit", "100")], seq).await;
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|hit| {
            let below_tiers = hit["score"].as_f64().unwrap() % 1000.0;
            (
                hit["name"].as_str().unwrap().to_owned(),
                below_tiers >= PROXIMITY,
            )
        })
        .collect()
}

fn expect(cases: &[(&str, bool)]) -> BTreeMap<String, bool> {
    cases.iter().map(|(n, b)| ((*n).to_owned(), *b)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words_near_each_other_in_one_field_add_proximity() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let bodies = vec![
        agent("N1", "alpha beta gamma"),
        agent("N2", "beta alpha gamma"),
        agent("N3", "alpha one two beta"),
        agent("N4", "alpha one two three beta"),
        agent("N5", "beta one alpha"),
        agent("N6", "gamma 42 alpha"),
        agent("N7", "42 one two three alpha"),
        json!({"name": "N8", "type": "tool", "capabilities": ["alpha", "beta"]}),
        json!({"name": "N9", "type": "tool", "tags": {"k1": "alpha", "k2": "beta"}}),
        json!({"name": "N10", "type": "tool", "capabilities": ["alpha"], "description": "beta"}),
        agent("N11", "alpha gamma one beta"),
    ];
    let mut seq = 0;
    for body in bodies {
        let r = app.create_agent(&token, body).await;
        assert_eq!(r.status(), 201);
        seq = header_u64(&r, "x-event-seq");
    }

    // Two words: adjacent in either order; in order up to three positions
    // apart; not four apart, nor two apart the other way round.
    // Capabilities' values stand two positions apart (N8), tags' values
    // "k1 alpha" and "k2 beta" three (N9); two fields never count (N10).
    let expected = expect(&[
        ("N1", true),
        ("N2", true),
        ("N3", true),
        ("N4", false),
        ("N5", false),
        ("N8", true),
        ("N9", true),
        ("N10", false),
        ("N11", true),
    ]);
    assert_eq!(near(&app, &token, "alpha beta", seq).await, expected);
    // The other order: now "alpha" may stand one position before "beta" or
    // up to three after it.
    let reversed = expect(&[
        ("N1", true),
        ("N2", true),
        ("N3", false),
        ("N4", false),
        ("N5", true),
        ("N8", false),
        ("N9", false),
        ("N10", false),
        ("N11", false),
    ]);
    assert_eq!(near(&app, &token, "beta alpha", seq).await, reversed);

    // A number and a word: the same rules.
    let numbers = expect(&[("N6", true), ("N7", false)]);
    assert_eq!(near(&app, &token, "42 alpha", seq).await, numbers);
    // A repeated word stands near itself wherever it is.
    let repeated = near(&app, &token, "gamma gamma", seq).await;
    assert_eq!(
        repeated,
        expect(&[("N1", true), ("N2", true), ("N6", true), ("N11", true)])
    );
    // Three words, as a phrase.
    let three = near(&app, &token, "alpha beta gamma", seq).await;
    assert_eq!(three.get("N1"), Some(&true));
    assert_eq!(three.get("N4"), None, "every word must match");
}
