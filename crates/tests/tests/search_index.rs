//! The search index as a read model of its own: the typo and ranking rules
//! one by one, filters and facets inside the engine, read-your-writes on
//! its own checkpoint, and its life across restarts, a deleted or outdated
//! directory, a `kill -9` in the middle of indexing, and an OS crash that
//! tore its unsynced files.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::Path;
use std::time::Duration;

use query_api::search::index::rebuild_offline;
use reqwest::Method;
use serde_json::{Value, json};
use tests::{Sandbox, TestApp, eventually, header_u64, names};
use ymera::{Role, Settings};

const INDEXED: &str = "ymera_search_events_indexed_total";

async fn delete(app: &TestApp, token: &str, id: &str) -> reqwest::Response {
    app.request(Method::DELETE, &format!("/api/v1/agents/{id}"), Some(token))
        .send()
        .await
        .unwrap()
}

/// Creates each agent; the sequence of the last.
async fn create_all(app: &TestApp, token: &str, bodies: Vec<Value>) -> u64 {
    let mut seq = 0;
    for body in bodies {
        let r = app.create_agent(token, body).await;
        assert_eq!(r.status(), 201);
        seq = header_u64(&r, "x-event-seq");
    }
    seq
}

fn fleet() -> Vec<Value> {
    vec![
        json!({"name": "Summarizer", "type": "llm", "capabilities": ["text-summarization"], "description": "condenses long reports"}),
        json!({"name": "Sentiment Analyzer", "type": "classifier", "capabilities": ["sentiment-analysis"], "description": "scores the mood of reviews"}),
        json!({"name": "Invoice Parser", "type": "tool", "capabilities": ["ocr"], "tags": {"team": "finance"}, "description": "reads scanned invoices"}),
        json!({"name": "Translator", "type": "llm", "status": "paused", "description": "translates between languages"}),
        json!({"name": "Scout", "type": "crawler", "capabilities": ["search"], "tags": {"team": "research"}, "description": "walks the web"}),
        json!({"name": "Scoot", "type": "mover", "description": "moves things along"}),
        json!({"name": "Bot", "type": "tool", "description": "a tiny helper"}),
        json!({"name": "Documentation Writer", "type": "llm", "description": "writes manuals"}),
        json!({"name": "Report Builder", "type": "tool"}),
        json!({"name": "X1", "type": "tool", "capabilities": ["report"]}),
        json!({"name": "X2", "type": "tool", "tags": {"kind": "report"}}),
        json!({"name": "X3", "type": "tool", "description": "makes a report"}),
        json!({"name": "P1", "type": "tool", "description": "fast parser for long documents"}),
        json!({"name": "P2", "type": "tool", "description": "long story made short: the documents are parsed"}),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typos_prefixes_fields_and_ranking_follow_the_rules() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let seq = create_all(&app, &token, fleet()).await;
    let first = async |q: &str| names(&app.search(&token, &[("q", q)], seq).await);

    // One typo in a word of 5-8 characters: a swap of neighbouring letters
    // (one typo, not two), an insertion, a substitution.
    assert_eq!(
        first("invocie").await,
        ["Invoice Parser"],
        "swap, 7 letters"
    );
    assert_eq!(first("scoutt").await, ["Scout"], "insertion");
    assert_eq!(first("invoise").await, ["Invoice Parser"], "substitution");
    // The examples, which the PostgreSQL search missed.
    assert_eq!(first("summarzier").await, ["Summarizer"], "swap");
    assert_eq!(first("sentimnet").await, ["Sentiment Analyzer"], "swap");
    // A deletion.
    assert_eq!(first("tanslator").await, ["Translator"], "deletion");
    // Two typos in a word of 9+ characters; not in one of 8.
    assert_eq!(
        first("smmarizre").await,
        ["Summarizer"],
        "two typos, 9 letters"
    );
    assert!(first("trnslatr").await.is_empty(), "two typos, 8 letters");
    // Short words match exactly (or as the prefix they are).
    assert_eq!(first("bot").await, ["Bot"]);
    assert!(first("bat").await.is_empty(), "no typo under 5 letters");
    assert!(first("scot").await.is_empty(), "no typo under 5 letters");

    // Prefix on the last word, and only there.
    assert_eq!(first("summ").await, ["Summarizer"]);
    assert_eq!(first("doc").await[0], "Documentation Writer");
    assert_eq!(first("reports summ").await, ["Summarizer"]);
    assert!(first("summ reports").await.is_empty());

    // Every word must match, in any field.
    assert_eq!(first("sentiment analyzer").await, ["Sentiment Analyzer"]);
    assert_eq!(first("invoice scanned").await, ["Invoice Parser"]);
    assert!(first("scout finance").await.is_empty());

    // Each field: name, type, capabilities (hyphenated values split into
    // words), tag keys and values, description.
    assert_eq!(first("translator").await, ["Translator"]);
    assert_eq!(first("crawler").await, ["Scout"]);
    assert_eq!(first("summarization").await, ["Summarizer"]);
    assert_eq!(first("analysis").await, ["Sentiment Analyzer"]);
    assert_eq!(first("finance").await, ["Invoice Parser"]);
    assert_eq!(first("mood").await, ["Sentiment Analyzer"]);
    let mut team = first("team").await;
    team.sort();
    assert_eq!(team, ["Invoice Parser", "Scout"]);

    // The field ranks: name > capabilities > tags > description, and a
    // whole word before a prefix of a longer one ("reports").
    assert_eq!(
        first("report").await,
        ["Report Builder", "X1", "X2", "X3", "Summarizer"]
    );
    // Fewer typos first.
    assert_eq!(first("scout").await, ["Scout", "Scoot"]);
    // Words near each other first.
    assert_eq!(first("long documents").await, ["P1", "P2"]);

    // Scores are the same on every page, and pages neither repeat nor skip.
    let whole = app.search(&token, &[("q", "report")], seq).await;
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut q = vec![("q", "report"), ("limit", "2")];
        if let Some(c) = &cursor {
            q.push(("cursor", c));
        }
        let page = app.search(&token, &q, seq).await;
        paged.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(&paged, whole["items"].as_array().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_select_inside_the_engine_and_facets_count_every_match() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let project = app
        .request(Method::POST, "/api/v1/projects", Some(&token))
        .json(&json!({"name": "Apollo"}))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // 60 agents that match best, and one that only a filter finds: a
    // filter applied to the top hits after the search would miss it.
    let mut bodies: Vec<Value> = (0..60)
        .map(|i| json!({"name": format!("Filler {i}"), "type": "tool", "tags": {"team": if i % 3 == 0 { "red" } else { "blue" }}}))
        .collect();
    bodies.push(json!({"name": "Odd one", "type": "rare", "status": "paused", "description": "a filler too", "project_id": project, "tags": {"team": "green"}}));
    let seq = create_all(&app, &token, bodies).await;

    let page = app
        .search(
            &token,
            &[("q", "filler"), ("type", "rare"), ("limit", "1")],
            seq,
        )
        .await;
    assert_eq!(names(&page), ["Odd one"]);
    for (filter, value) in [
        ("status", "paused"),
        ("project_id", project.as_str()),
        ("tag", "team:green"),
    ] {
        let page = app
            .search(
                &token,
                &[("q", "filler"), (filter, value), ("limit", "1")],
                seq,
            )
            .await;
        assert_eq!(names(&page), ["Odd one"], "{filter}");
    }

    // Facets count the whole matching set, not the page.
    let page = app
        .search(
            &token,
            &[
                ("q", "filler"),
                ("limit", "1"),
                ("facets", "status,type,project_id,tag:team"),
            ],
            seq,
        )
        .await;
    assert_eq!(
        page["facets"],
        json!({
            "status": {"active": 60, "paused": 1},
            "type": {"tool": 60, "rare": 1},
            "project_id": {project.as_str(): 1},
            "tag:team": {"blue": 40, "red": 20, "green": 1},
        })
    );
    // With a filter, of the filtered set; without `facets`, none.
    let page = app
        .search(
            &token,
            &[("q", "filler"), ("tag", "team:red"), ("facets", "type")],
            seq,
        )
        .await;
    assert_eq!(page["facets"], json!({"type": {"tool": 20}}));
    let page = app.search(&token, &[("q", "filler")], seq).await;
    assert!(page.get("facets").is_none());
    // An unknown facet is a 400.
    let r = app
        .request(
            Method::GET,
            "/api/v1/agents/search?q=x&facets=colour",
            Some(&token),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_reads_its_own_writes_on_the_index_checkpoint() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    for round in 0..5 {
        let r = app
            .create_agent(
                &token,
                json!({"name": format!("Quasar{round}"), "type": "llm"}),
            )
            .await;
        let seq = header_u64(&r, "x-event-seq");
        let id = r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let q = format!("quasar{round}");
        assert_eq!(
            names(&app.search(&token, &[("q", &q)], seq).await),
            [format!("Quasar{round}")]
        );
        // An update folds onto the indexed agent: the new name is found,
        // the old one no more, and the fields it did not touch stay.
        let r = app
            .request(Method::PUT, &format!("/api/v1/agents/{id}"), Some(&token))
            .json(&json!({"name": format!("Pulsar{round}")}))
            .send()
            .await
            .unwrap();
        let seq = header_u64(&r, "x-event-seq");
        assert!(names(&app.search(&token, &[("q", &q)], seq).await).is_empty());
        let page = app
            .search(&token, &[("q", &format!("pulsar{round}"))], seq)
            .await;
        assert_eq!(page["items"][0]["type"], "llm");
        assert_eq!(page["items"][0]["version"], 2);
        let seq = header_u64(&delete(&app, &token, &id).await, "x-event-seq");
        assert!(
            names(
                &app.search(&token, &[("q", &format!("pulsar{round}"))], seq)
                    .await
            )
            .is_empty()
        );
    }
    // Past the end of the log: a 400 at once.
    let r = app
        .request(Method::GET, "/api/v1/agents/search?q=x", Some(&token))
        .header("x-min-event-seq", "1000000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // /health and /readyz report the index's lag.
    let last = app.last_seq().await;
    index_at(&app, last).await;
    let search = &app.get_json("/health").await["checks"]["search"];
    assert_eq!(search["lag_events"], 0, "{search}");
    assert_eq!(app.get_json("/readyz").await["search_lag_events"], 0);
}

/// The index's checkpoint as `/health` reports it.
async fn health_checkpoint(app: &TestApp) -> u64 {
    app.get_json("/health").await["checks"]["search"]["checkpoint_seq"]
        .as_u64()
        .unwrap()
}

/// Waits until `app`'s index has applied exactly up to `seq`.
async fn index_at(app: &TestApp, seq: u64) {
    eventually(
        Duration::from_secs(300),
        "the index to catch up",
        || async { (health_checkpoint(app).await == seq).then_some(()) },
    )
    .await;
}

/// Edits the payload (checkpoint, schema version, boot) of the last commit
/// of the index in `dir`.
fn edit_payload(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let meta_path = dir.join("meta.json");
    let mut meta: Value = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    let mut payload: Value = serde_json::from_str(meta["payload"].as_str().unwrap()).unwrap();
    edit(&mut payload);
    meta["payload"] = json!(payload.to_string());
    std::fs::write(&meta_path, meta.to_string()).unwrap();
}

fn with_search_dir(sandbox: &Sandbox, dir: &Path) -> Settings {
    let mut settings = sandbox.settings.clone();
    settings.search.search_dir = dir.to_owned();
    settings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_and_a_deleted_or_outdated_index_is_rebuilt() {
    let sandbox = Sandbox::new().await;
    let dir = sandbox.fresh_search_dir();
    let settings = with_search_dir(&sandbox, &dir);
    let app = sandbox.start_with(Role::All, &settings).await;
    let token = app.admin_token().await;
    let bodies = (0..30).map(|i| json!({"name": format!("Nebula {i}"), "type": "llm"}));
    let seq = create_all(&app, &token, bodies.collect()).await;
    app.search(&token, &[("q", "nebula")], seq).await;
    let indexed = app.metric(INDEXED).await.unwrap();
    app.stop().await;

    // A restart opens the index at its checkpoint and reads only what
    // came after it.
    let app = sandbox.start_with(Role::All, &settings).await;
    assert_eq!(health_checkpoint(&app).await, seq, "resumed at once");
    let r = app
        .create_agent(&token, json!({"name": "Nebula new", "type": "llm"}))
        .await;
    let seq = header_u64(&r, "x-event-seq");
    let page = app
        .search(&token, &[("q", "nebula"), ("limit", "500")], seq)
        .await;
    assert_eq!(names(&page).len(), 31);
    assert_eq!(
        app.metric(INDEXED).await.unwrap() - indexed,
        1.0,
        "a restart indexes only the new event"
    );
    let indexed = app.metric(INDEXED).await.unwrap();
    app.stop().await;

    // A deleted index is rebuilt from the whole log.
    std::fs::remove_dir_all(&dir).unwrap();
    let app = sandbox.start_with(Role::All, &settings).await;
    let page = app
        .search(&token, &[("q", "nebula"), ("limit", "500")], seq)
        .await;
    assert_eq!(names(&page).len(), 31);
    let log = app.last_seq().await as f64;
    assert_eq!(app.metric(INDEXED).await.unwrap() - indexed, log);
    let indexed = app.metric(INDEXED).await.unwrap();
    app.stop().await;

    // So is one written under another schema version.
    edit_payload(&dir, |payload| {
        assert_eq!(payload["checkpoint"], seq);
        payload["schema_version"] = json!(0);
    });
    let app = sandbox.start_with(Role::All, &settings).await;
    let page = app
        .search(&token, &[("q", "nebula"), ("limit", "500")], seq)
        .await;
    assert_eq!(names(&page).len(), 31);
    assert_eq!(app.metric(INDEXED).await.unwrap() - indexed, log);

    // `ymera rebuild --search` refuses a directory a process holds, and
    // rebuilds one nobody does: a process then starts at its end and has
    // nothing left to index.
    let store = app.deps.store.clone();
    assert!(rebuild_offline(&dir, &store).await.is_err());
    let indexed = app.metric(INDEXED).await.unwrap();
    app.stop().await;
    assert_eq!(rebuild_offline(&dir, &store).await.unwrap(), seq);
    let app = sandbox.start_with(Role::All, &settings).await;
    assert_eq!(health_checkpoint(&app).await, seq);
    let page = app
        .search(&token, &[("q", "nebula"), ("limit", "500")], seq)
        .await;
    assert_eq!(names(&page).len(), 31);
    assert_eq!(
        app.metric(INDEXED).await.unwrap() - indexed,
        log,
        "the rebuild read the log once, the process nothing more"
    );
}

/// Every hit of `q` in `app`'s index, page by page, with its score.
async fn everything(app: &TestApp, token: &str, q: &str, seq: u64) -> Vec<Value> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut query = vec![("q", q), ("limit", "500")];
        if let Some(c) = &cursor {
            query.push(("cursor", c));
        }
        let page = app.search(token, &query, seq).await;
        all.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return all,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_in_the_middle_of_indexing_leaves_an_index_equal_to_a_fresh_one() {
    let sandbox = Sandbox::new().await;
    let writer = sandbox.start(Role::Command).await;
    let token = writer.admin_token().await;
    // A long log: creates, then updates and deletes of some of them.
    tests::seed::agents_in_bulk(&writer.deps.store, 25_000).await;
    let agents: Vec<Value> = (0..1000)
        .map(|i| json!({"name": format!("bulk http {i}"), "type": "seed", "tags": {"n": (i % 7).to_string()}}))
        .collect();
    let ids = writer.bulk_create(&token, agents).await;
    for id in &ids[..200] {
        let r = writer
            .request(Method::PUT, &format!("/api/v1/agents/{id}"), Some(&token))
            .json(&json!({"description": "updated seed", "status": "paused"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    for id in &ids[200..300] {
        assert_eq!(delete(&writer, &token, id).await.status(), 204);
    }
    let last = writer.last_seq().await;

    // A query process indexes the log from scratch, and is killed with
    // SIGKILL once it has committed part of it.
    let dir = sandbox.fresh_search_dir();
    let dir_text = dir.display().to_string();
    let (mut child, addr) =
        tests::process::spawn_with(&sandbox, "query-api", &[("YMERA_SEARCH_DIR", &dir_text)]);
    let client = reqwest::Client::new();
    let at_kill = eventually(Duration::from_secs(120), "a partly built index", || async {
        let h: Value = client
            .get(format!("http://{addr}/health"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let cp = h["checks"]["search"]["checkpoint_seq"].as_u64()?;
        (cp > 0).then_some(cp)
    })
    .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    assert!(at_kill < last, "killed in the middle ({at_kill} of {last})");

    // Restarted on what the kill left, it ends equal to a fresh index.
    let resumed = sandbox
        .start_with(Role::Query, &with_search_dir(&sandbox, &dir))
        .await;
    let fresh = sandbox.start(Role::Query).await;
    for app in [&resumed, &fresh] {
        index_at(app, last).await;
    }
    let a = everything(&resumed, &token, "seed", last).await;
    let b = everything(&fresh, &token, "seed", last).await;
    assert_eq!(a.len(), 25_000 + 900);
    assert_eq!(a, b);
    let facets = [("q", "seed"), ("limit", "1"), ("facets", "status,tag:n")];
    assert_eq!(
        resumed.search(&token, &facets, last).await["facets"],
        fresh.search(&token, &facets, last).await["facets"]
    );
}

/// A backlog is indexed in full batches held for one commit (see
/// `CATCH_UP_COMMIT_EVERY`): an update of an agent that a held batch
/// created, read before that batch is committed, is folded onto it all the
/// same (the held batches are committed first), and nothing is searchable
/// before it is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catching_up_in_held_batches_folds_updates_onto_held_agents() {
    let sandbox = Sandbox::new().await;
    let writer = sandbox.start(Role::Command).await;
    let token = writer.admin_token().await;
    let store = writer.deps.store.clone();
    let mut seeder = tests::seed::Seeder::new(&store);
    let at = chrono::Utc::now();
    // In the first full batch: agents that the third one updates.
    let early: Vec<uuid::Uuid> = (0..100).map(|_| uuid::Uuid::now_v7()).collect();
    for (i, id) in early.iter().enumerate() {
        let data = tests::seed::agent_created(&format!("early {i}"), "seed", "active", &[], None);
        seeder.agent(*id, "agent.created", data, at).await;
    }
    tests::seed::agents_in_bulk(&store, 20_000).await;
    for id in &early {
        let changes = json!({"description": "refolded after holding", "status": "paused"});
        seeder.agent(*id, "agent.updated", changes, at).await;
    }
    tests::seed::agents_in_bulk(&store, 10_000).await;
    let last = writer.last_seq().await;

    let app = sandbox.start(Role::Query).await;
    index_at(&app, last).await;
    let page = app
        .search(&token, &[("q", "refolded"), ("limit", "500")], last)
        .await;
    assert_eq!(names(&page).len(), 100, "every update folded: {page}");
    assert!(
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["status"] == "paused" && a["name"].as_str().unwrap().starts_with("early"))
    );
    let facets = [("q", "early"), ("limit", "1"), ("facets", "status")];
    let page = app.search(&token, &facets, last).await;
    assert_eq!(page["facets"]["status"], json!({"paused": 100}), "{page}");
    assert_eq!(
        app.search(
            &token,
            &[("q", "seed"), ("limit", "1"), ("facets", "status")],
            last
        )
        .await["facets"]["status"],
        json!({"active": 30_000, "paused": 100})
    );
}

/// A backlog that ends with a full batch (nothing read after it that
/// would commit what is held) is committed once the log has nothing more
/// to give: 20,000 events, two full batches, both held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_that_ends_in_held_batches_is_committed_when_the_log_pauses() {
    let sandbox = Sandbox::new().await;
    let writer = sandbox.start(Role::Command).await;
    let token = writer.admin_token().await;
    let count = 20_000 - writer.last_seq().await;
    tests::seed::agents_in_bulk(&writer.deps.store, count as usize).await;
    let last = writer.last_seq().await;
    assert_eq!(last, 20_000, "two full batches");

    let app = sandbox.start(Role::Query).await;
    eventually(
        Duration::from_secs(60),
        "the held batches committed",
        || async { (health_checkpoint(&app).await == last).then_some(()) },
    )
    .await;
    let page = app
        .search(
            &token,
            &[("q", "bulk"), ("limit", "1"), ("facets", "status")],
            last,
        )
        .await;
    assert_eq!(page["facets"]["status"], json!({"active": count}), "{page}");
}

/// Rewrites the payload of the last commit in `dir` as if it had been
/// written in another boot of the machine.
fn as_if_written_before_a_reboot(dir: &Path) {
    edit_payload(dir, |payload| payload["boot"] = json!("an-earlier-boot"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_torn_by_an_os_crash_is_rebuilt_and_a_whole_one_kept() {
    let sandbox = Sandbox::new().await;
    let dir = sandbox.fresh_search_dir();
    let settings = with_search_dir(&sandbox, &dir);
    let app = sandbox.start_with(Role::All, &settings).await;
    let token = app.admin_token().await;
    let bodies = (0..20).map(|i| json!({"name": format!("Comet {i}"), "type": "llm"}));
    let seq = create_all(&app, &token, bodies.collect()).await;
    let last = app.last_seq().await;
    index_at(&app, last).await;
    let indexed = app.metric(INDEXED).await.unwrap();
    app.stop().await;

    // Written in an earlier boot, whole: checked, then resumed.
    as_if_written_before_a_reboot(&dir);
    let app = sandbox.start_with(Role::All, &settings).await;
    assert_eq!(health_checkpoint(&app).await, last, "resumed at once");
    let page = app
        .search(&token, &[("q", "comet"), ("limit", "500")], seq)
        .await;
    assert_eq!(names(&page).len(), 20);
    assert_eq!(
        app.metric(INDEXED).await.unwrap_or(0.0),
        indexed,
        "nothing indexed again"
    );
    app.stop().await;

    // Written in an earlier boot, and a file of it lost its end (what an
    // OS crash leaves of a file never synced): rebuilt from the log.
    as_if_written_before_a_reboot(&dir);
    let meta: Value =
        serde_json::from_slice(&std::fs::read(dir.join("meta.json")).unwrap()).unwrap();
    let segment = meta["segments"][0]["segment_id"].as_str().unwrap();
    let segment_file = dir.join(format!("{}.store", segment.replace('-', "")));
    let len = std::fs::metadata(&segment_file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment_file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let app = sandbox.start_with(Role::All, &settings).await;
    let page = app
        .search(&token, &[("q", "comet"), ("limit", "500")], seq)
        .await;
    assert_eq!(names(&page).len(), 20);
    assert_eq!(
        app.metric(INDEXED).await.unwrap() - indexed,
        last as f64,
        "the whole log indexed again"
    );
}
