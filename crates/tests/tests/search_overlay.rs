//! The search index's in-memory overlay: a write is searchable at its own
//! sequence before the disk index commits it, a newer version in the
//! overlay hides the one on disk (in hits and in facet counts), and a
//! `kill -9` while the overlay holds writes loses nothing: a restart
//! resumes from the disk commit and reads the rest from the log again.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tests::{Sandbox, TestApp, eventually, header_u64, names};
use ymera::Role;

/// The sequence the disk index last committed (searches see further).
const DISK: &str = "ymera_search_disk_checkpoint";
const INDEXED: &str = "ymera_search_events_indexed_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_write_is_searchable_at_its_sequence_under_a_steady_write_load() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let done = AtomicBool::new(false);
    // Other writes all along, so batches hold more than the one written.
    let load = async {
        let mut n = 0;
        while !done.load(Ordering::Relaxed) {
            let writes = (0..4).map(|i| {
                app.create_agent(
                    &token,
                    json!({"name": format!("filler {n} {i}"), "type": "load"}),
                )
            });
            for r in futures::future::join_all(writes).await {
                assert_eq!(r.status(), 201);
            }
            n += 1;
        }
    };
    let check = async {
        let mut previous: Option<(String, String)> = None;
        for round in 0..40 {
            let name = format!("Zephyrine{round:03}");
            let (id, seq) = app
                .create_agent_seq(&token, json!({"name": name, "type": "llm"}))
                .await;
            let found = names(&app.search(&token, &[("q", &name)], seq).await);
            assert!(found.contains(&name), "{name} at {seq}: {found:?}");
            // An update of the agent before: its new name at the update's
            // sequence, its old one no more.
            if let Some((id, old)) = previous.take() {
                let new = format!("Borealis{round:03}");
                let seq = app.update_agent(&token, &id, json!({"name": new})).await;
                let found = names(&app.search(&token, &[("q", &new)], seq).await);
                assert!(found.contains(&new), "{new} at {seq}: {found:?}");
                let found = names(&app.search(&token, &[("q", &old)], seq).await);
                assert!(!found.contains(&old), "{old} still found at {seq}");
            }
            previous = Some((id, name));
        }
        done.store(true, Ordering::Relaxed);
    };
    tokio::join!(load, check);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_version_in_memory_hides_the_one_on_disk_in_hits_and_facets() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    // The disk commits about every 250 ms: a round whose search ran
    // before the commit of its changes shows the overlay at work; one in
    // five such rounds is plenty.
    for round in 0..5 {
        let word = format!("orionid{round}");
        let (a, _) = app
            .create_agent_seq(
                &token,
                json!({"name": format!("{word} alpha"), "type": "scanner"}),
            )
            .await;
        let (b, _) = app
            .create_agent_seq(
                &token,
                json!({"name": format!("{word} beta"), "type": "scanner"}),
            )
            .await;
        let (_, seq) = app
            .create_agent_seq(
                &token,
                json!({"name": format!("{word} gamma"), "type": "scanner"}),
            )
            .await;
        eventually(Duration::from_secs(30), "the agents on disk", || async {
            (app.metric(DISK).await? >= seq as f64).then_some(())
        })
        .await;

        app.update_agent(
            &token,
            &a,
            json!({"name": format!("{word} delta"), "type": "probe"}),
        )
        .await;
        let r = app
            .request(Method::DELETE, &format!("/api/v1/agents/{b}"), Some(&token))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        let seq = header_u64(&r, "x-event-seq");
        let query = [("q", word.as_str()), ("facets", "type"), ("limit", "1")];
        let first = app.search(&token, &query, seq).await;
        let in_memory = app.metric(DISK).await.unwrap() < seq as f64;

        // Page by page (one hit a page), each agent once, newest version.
        let mut hits = names(&first);
        let mut cursor = first["next_cursor"].as_str().map(str::to_owned);
        while let Some(c) = cursor {
            let page = app
                .search(&token, &[("q", &word), ("limit", "1"), ("cursor", &c)], seq)
                .await;
            hits.extend(names(&page));
            cursor = page["next_cursor"].as_str().map(str::to_owned);
        }
        hits.sort();
        assert_eq!(hits, [format!("{word} delta"), format!("{word} gamma")]);
        assert_eq!(
            first["facets"]["type"],
            json!({"probe": 1, "scanner": 1}),
            "counted once each, the deleted one not at all"
        );
        if in_memory {
            return;
        }
    }
    panic!("every round's search came after the disk commit: the overlay was never read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_while_writes_are_only_in_memory_loses_none_of_them() {
    let sandbox = Sandbox::new().await;
    let writer = sandbox.start(Role::Command).await;
    let token = writer.admin_token().await;
    let dir = sandbox.fresh_search_dir();
    let dir_text = dir.display().to_string();
    let (mut child, addr) =
        tests::process::spawn_with(&sandbox, "query-api", &[("YMERA_SEARCH_DIR", &dir_text)]);
    let client = reqwest::Client::new();
    let metric = |series: &'static str| {
        let client = client.clone();
        async move {
            let text = client
                .get(format!("http://{addr}/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.lines()
                .filter_map(|l| l.rsplit_once(' '))
                .find(|(s, _)| *s == series)
                .and_then(|(_, v)| v.parse::<f64>().ok())
        }
    };
    let search = |seq: u64| {
        let client = client.clone();
        let token = token.clone();
        async move {
            let r = client
                .get(format!("http://{addr}/api/v1/agents/search"))
                .bearer_auth(token)
                .query(&[("q", "lyrae"), ("limit", "500")])
                .header("x-min-event-seq", seq.to_string())
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())?;
            r.json::<Value>().await.ok()
        }
    };
    let mut written = 0;
    let (seq, disk) = loop {
        let mut seq = 0;
        for _ in 0..10 {
            seq = writer
                .create_agent_seq(
                    &token,
                    json!({"name": format!("lyrae {written}"), "type": "llm"}),
                )
                .await
                .1;
            written += 1;
        }
        let page = eventually(Duration::from_secs(60), "the writes searchable", || {
            search(seq)
        })
        .await;
        assert_eq!(names(&page).len(), written);
        let disk = metric(DISK).await.unwrap_or(0.0) as u64;
        if disk < seq {
            break (seq, disk);
        }
        assert!(written < 100, "the disk commit was never behind the search");
    };
    child.start_kill().unwrap();
    child.wait().await.unwrap();

    // The restart resumes from the disk commit and reads the rest again.
    let resumed = sandbox
        .start_with(Role::Query, &{
            let mut s = sandbox.settings.clone();
            s.search.search_dir = dir.clone();
            s
        })
        .await;
    let page = resumed
        .search(&token, &[("q", "lyrae"), ("limit", "500")], seq)
        .await;
    assert_eq!(names(&page).len(), written);
    let log = resumed.last_seq().await;
    assert!(disk < log);
    assert_eq!(
        resumed.metric(INDEXED).await.unwrap(),
        (log - disk) as f64,
        "only what the disk did not hold was read again"
    );
}
