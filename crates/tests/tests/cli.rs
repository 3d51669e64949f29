//! The `ymera` command as an operator types it, run as a child process:
//! top-level options anywhere on the line, the role as a listed value, the
//! version with its commit, distinct exit codes, JSON output of the
//! commands that list things, and shell completions.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::process::Output;

use serde_json::Value;
use tests::{Sandbox, process};
use ymera::Role;

/// Runs `ymera args…` against `sandbox`'s NATS and PostgreSQL (or none),
/// with `env` on top.
async fn ymera(sandbox: Option<&Sandbox>, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(process::ymera_bin());
    command
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("YMERA_LOG_FORMAT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    if let Some(sandbox) = sandbox {
        let s = &sandbox.settings;
        command
            .env("YMERA_NATS_URL", &s.nats.nats_url)
            .env("YMERA_STREAM", &s.nats.stream)
            .env("YMERA_SUBJECT_PREFIX", &s.nats.subject_prefix)
            .env("YMERA_DATABASE_URL", &s.db.database_url)
            // A search index of its own, never the working directory's.
            .env("YMERA_SEARCH_DIR", sandbox.fresh_search_dir());
    }
    command.envs(env.iter().copied());
    command.output().await.expect("run ymera")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_level_options_go_anywhere_on_the_line() {
    let sandbox = Sandbox::new().await;
    for args in [
        &["--log-format", "json", "migrate"][..],
        &["migrate", "--log-format", "json"][..],
    ] {
        let out = ymera(Some(&sandbox), args, &[]).await;
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        assert!(
            stdout(&out).contains("migrations applied"),
            "{}",
            text(&out)
        );
    }
    let out = ymera(
        Some(&sandbox),
        &["--log-format", "json", "parked", "list", "-o", "json"],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_lists_the_roles_and_version_names_the_commit() {
    let out = ymera(None, &["user", "add", "--help"], &[]).await;
    assert!(out.status.success(), "{}", text(&out));
    let help = stdout(&out);
    for role in ["admin", "editor", "viewer"] {
        assert!(help.contains(role), "--help lists {role}: {help}");
    }
    let out = ymera(None, &["--help"], &[]).await;
    let help = stdout(&out);
    assert!(help.contains("Exit codes"), "{help}");

    let out = ymera(None, &["--version"], &[]).await;
    assert!(out.status.success(), "{}", text(&out));
    let version = stdout(&out);
    let version = version.trim();
    let commit = version
        .strip_prefix(&format!("ymera {} (", env!("CARGO_PKG_VERSION")))
        .and_then(|v| v.strip_suffix(')'))
        .unwrap_or_else(|| panic!("version and commit in {version:?}"));
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{version:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_tell_usage_from_unreachable_from_a_failed_check() {
    // 2: usage, whether clap or the command finds it.
    for args in [
        &["frobnicate"][..],
        &["user", "add", "--username", "zed", "--role", "superuser"][..],
    ] {
        let out = ymera(None, args, &[]).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
    }
    let sandbox = Sandbox::new().await;
    let out = ymera(
        Some(&sandbox),
        &["user", "add", "--username", "no spaces", "--role", "viewer"],
        &[("YMERA_NEW_USER_PASSWORD", "long-enough-password")],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    // 3: PostgreSQL does not answer (nothing listens on that port).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nowhere = format!("postgres://ymera:ymera@127.0.0.1:{port}/ymera");
    let out = ymera(
        None,
        &["migrate"],
        &[
            ("YMERA_DATABASE_URL", nowhere.as_str()),
            ("YMERA_DB_WAIT_SECS", "1"),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));

    // 4: the rebuilt read models disagree with live ones tampered with.
    let app = sandbox.start(Role::All).await;
    app.tamper_with_the_read_model().await;
    let out = ymera(Some(&sandbox), &["rebuild"], &[]).await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("differ"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_print_json_with_dash_o() {
    let sandbox = Sandbox::new().await;
    // Starting a write role creates the first admin.
    let _app = sandbox.start(Role::All).await;
    let out = ymera(Some(&sandbox), &["user", "list", "-o", "json"], &[]).await;
    assert!(out.status.success(), "{}", text(&out));
    let users: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let users = users.as_array().expect("an array");
    assert!(
        users
            .iter()
            .any(|u| u["username"] == "admin" && u["role"] == "admin"),
        "{users:?}"
    );
    let out = ymera(Some(&sandbox), &["parked", "list", "--output", "json"], &[]).await;
    assert!(out.status.success(), "{}", text(&out));
    let parked: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(parked, Value::Array(vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_for_bash_zsh_and_fish() {
    for (shell, mark) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef ymera"),
        ("fish", "complete -c ymera"),
    ] {
        let out = ymera(None, &["completions", shell], &[]).await;
        assert!(out.status.success(), "{shell}: {}", text(&out));
        let script = stdout(&out);
        assert!(script.contains(mark), "{shell}: {script}");
        assert!(script.contains("rebuild"), "{shell} completes the commands");
    }
}

/// The live documents of the search index in `dir`, and the checkpoint of
/// its last commit, as its `meta.json` records them.
fn search_index_at(dir: &std::path::Path) -> (u64, u64) {
    let meta: Value =
        serde_json::from_slice(&std::fs::read(dir.join("meta.json")).unwrap()).unwrap();
    let docs = meta["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s["max_doc"].as_u64().unwrap() - s["deletes"]["num_deleted_docs"].as_u64().unwrap_or(0)
        })
        .sum();
    let payload: Value = serde_json::from_str(meta["payload"].as_str().unwrap()).unwrap();
    (docs, payload["checkpoint"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_builds_the_search_index_as_of_the_same_event() {
    let sandbox = Sandbox::new().await;
    let app = sandbox.start(Role::Command).await;
    let token = app.admin_token().await;
    let mut ids = Vec::new();
    for name in ["Replayed one", "Replayed two", "Replayed three"] {
        let r = app.create_agent(&token, tests::agent_body(name)).await;
        assert_eq!(r.status(), 201);
        let body: Value = r.json().await.unwrap();
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    let r = app
        .request(
            reqwest::Method::DELETE,
            &format!("/api/v1/agents/{}", ids[1]),
            Some(&token),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let until = tests::header_u64(&r, "x-event-seq");
    // Written after the event replayed to: in neither replayed model.
    let r = app
        .create_agent(&token, tests::agent_body("Replayed later"))
        .await;
    assert_eq!(r.status(), 201);

    let dir = sandbox.fresh_search_dir();
    let dir_text = dir.display().to_string();
    let until_text = until.to_string();
    let replay = |schema: &'static str| {
        let args = [
            "replay",
            "--until",
            until_text.as_str(),
            "--into-schema",
            schema,
            "--into-search-dir",
            dir_text.as_str(),
        ];
        let sandbox = &sandbox;
        async move { ymera(Some(sandbox), &args, &[]).await }
    };
    let out = replay("replay_search").await;
    assert!(out.status.success(), "{}", text(&out));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM replay_search.agents")
        .fetch_one(&app.deps.pool)
        .await
        .unwrap();
    assert_eq!(rows, 2, "the PostgreSQL replay stands at event {until}");
    assert_eq!(
        search_index_at(&dir),
        (2, until),
        "the search index stands at the same event"
    );

    // A directory that exists is refused before anything is replayed.
    let out = replay("replay_search_again").await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let schema: Option<String> = sqlx::query_scalar(
        "SELECT schema_name::text FROM information_schema.schemata WHERE schema_name = 'replay_search_again'",
    )
    .fetch_optional(&app.deps.pool)
    .await
    .unwrap();
    assert_eq!(schema, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_with_search_makes_the_read_models_and_the_search_index_at_once() {
    let sandbox = Sandbox::new().await;
    let app = sandbox.start(Role::All).await;
    let token = app.admin_token().await;
    let names: Vec<_> = (0..20)
        .map(|i| tests::agent_body(&format!("rebuilt agent {i}")))
        .collect();
    app.bulk_create(&token, names).await;
    app.settled(&token).await;
    let end = app.last_seq().await;
    let dir = sandbox.fresh_search_dir();
    let dir_text = dir.display().to_string();
    let out = ymera(
        Some(&sandbox),
        &["rebuild", "--with-search"],
        &[("YMERA_SEARCH_DIR", dir_text.as_str())],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let said = stdout(&out);
    assert!(
        said.contains(&format!("rebuilt the read models from {end} events")),
        "{}",
        text(&out)
    );
    assert!(
        said.contains(&format!(
            "rebuilt the search index in {dir_text} from events 1..={end}"
        )),
        "{}",
        text(&out)
    );
    assert!(dir.join("meta.json").exists(), "{}", text(&out));
    // Both at once is one build of each, not another mode of either.
    let out = ymera(
        Some(&sandbox),
        &["rebuild", "--with-search", "--search"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}
