//! Metrics (JSON and Prometheus) move with requests and events; analytics
//! counts what existed at a time from the event history; `/health` says
//! `degraded` when the projector lags.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use reqwest::Method;
use serde_json::{Value, json};
use tests::seed::{Seeder, agent_created, project_created};
use tests::{Sandbox, TestApp, agent_body, eventually, header_u64};
use uuid::Uuid;
use ymera::Role;

async fn metrics_json(app: &TestApp, token: &str, min_seq: u64) -> Value {
    let r = app
        .request(
            Method::GET,
            &format!("/api/v1/metrics?min_seq={min_seq}"),
            Some(token),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(header_u64(&r, "x-projection-seq") >= min_seq);
    r.json().await.unwrap()
}

async fn prometheus(app: &TestApp) -> String {
    let r = app
        .request(Method::GET, "/metrics", None)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the scrape needs no token");
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    r.text().await.unwrap()
}

/// The value of the first sample line starting with `prefix`.
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no sample {prefix} in:\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_requests_and_events() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let before = metrics_json(&app, &token, 0).await;
    for path in [
        "/uptime_seconds",
        "/http/requests_total",
        "/http/in_flight",
        "/http/by_status",
        "/http/latency_ms/p50",
        "/http/latency_ms/p90",
        "/http/latency_ms/p99",
        "/events/last_seq",
        "/events/stream_messages",
        "/events/stream_bytes",
        "/events/appended_total",
        "/projector/checkpoint_seq",
        "/projector/lag_events",
        "/projector/lag_seconds",
        "/projector/applied_total",
        "/db_pool/size",
        "/db_pool/idle",
        "/live/connections",
        "/live/consumers",
    ] {
        assert!(before.pointer(path).is_some(), "{path} missing: {before}");
    }
    assert!(
        before["http"]["in_flight"].as_i64().unwrap() >= 1,
        "this request"
    );
    assert_eq!(before["live"]["connections"], 0);
    assert_eq!(before["live"]["consumers"], 0);
    let text_before = prometheus(&app).await;

    let mut seq = 0;
    for i in 0..3 {
        let r = app.create_agent(&token, agent_body(&format!("m{i}"))).await;
        assert_eq!(r.status(), 201);
        seq = header_u64(&r, "x-event-seq");
    }
    let r = app
        .request(
            Method::GET,
            &format!("/api/v1/agents/{}", Uuid::now_v7()),
            Some(&token),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let after = metrics_json(&app, &token, seq).await;
    let n = |v: &Value, p: &str| v.pointer(p).unwrap().as_f64().unwrap();
    assert!(n(&after, "/http/requests_total") >= n(&before, "/http/requests_total") + 4.0);
    assert!(after["http"]["by_status"]["201"].as_u64().unwrap() >= 3);
    assert!(after["http"]["by_status"]["404"].as_u64().unwrap() >= 1);
    assert!(n(&after, "/http/latency_ms/p50") > 0.0);
    assert!(n(&after, "/http/latency_ms/p99") >= n(&after, "/http/latency_ms/p50"));
    assert_eq!(
        n(&after, "/events/appended_total") - n(&before, "/events/appended_total"),
        3.0
    );
    assert_eq!(after["events"]["last_seq"], seq);
    assert_eq!(after["events"]["stream_messages"], seq);
    assert!(n(&after, "/events/stream_bytes") > n(&before, "/events/stream_bytes"));
    assert_eq!(after["projector"]["checkpoint_seq"], seq);
    assert_eq!(after["projector"]["lag_events"], 0);
    assert_eq!(after["projector"]["lag_seconds"], 0.0);
    // The projector counts a batch right after its commit, which is when
    // min_seq lets the read through: the counter may trail by an instant.
    let applied_before = n(&before, "/projector/applied_total");
    eventually(
        StdDuration::from_secs(10),
        "applied_total to move",
        || async {
            let m = metrics_json(&app, &token, seq).await;
            (n(&m, "/projector/applied_total") >= applied_before + 3.0).then_some(())
        },
    )
    .await;
    assert!(n(&after, "/db_pool/size") >= 1.0);
    assert!(n(&after, "/uptime_seconds") >= n(&before, "/uptime_seconds"));

    let text = prometheus(&app).await;
    for family in [
        "ymera_http_request_duration_seconds_bucket{",
        "ymera_event_append_duration_seconds_bucket{",
        "ymera_projector_batch_duration_seconds_bucket{",
        "ymera_write_to_visible_seconds_bucket{",
        "ymera_projector_lag_events ",
        "ymera_projector_lag_seconds ",
        "ymera_projector_checkpoint ",
        "ymera_db_pool_connections ",
        "ymera_db_pool_idle ",
        "ymera_live_connections ",
        "ymera_live_consumers ",
        "ymera_http_requests_in_flight ",
        "ymera_stream_last_seq ",
        "ymera_uptime_seconds ",
        "# TYPE ymera_http_request_duration_seconds histogram",
    ] {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }
    let created =
        "ymera_http_requests_total{method=\"POST\",route=\"/api/v1/agents\",status=\"201\"}";
    assert!(sample(&text, created) >= 3.0, "{text}");
    assert!(
        text.contains("route=\"/api/v1/agents/{id}\",status=\"404\""),
        "routes, not raw paths"
    );
    assert_eq!(
        sample(&text, "ymera_events_appended_total ")
            - text_before
                .lines()
                .find(|l| l.starts_with("ymera_events_appended_total "))
                .map_or(0.0, |l| l.rsplit(' ').next().unwrap().parse().unwrap()),
        3.0
    );
    assert_eq!(sample(&text, "ymera_projector_checkpoint "), seq as f64);
    assert_eq!(sample(&text, "ymera_stream_last_seq "), seq as f64);
    assert!(sample(&text, "ymera_write_to_visible_seconds_count") >= 3.0);

    // Viewers may read the JSON; nobody without a token.
    let viewer = app.token_for(infra::auth::Role::Viewer).await;
    metrics_json(&app, &viewer, 0).await;
    let r = app
        .request(Method::GET, "/api/v1/metrics", None)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

async fn analytics(app: &TestApp, token: &str, query: &str, min_seq: u64) -> Value {
    let r = app
        .request(
            Method::GET,
            &format!("/api/v1/analytics?{query}"),
            Some(token),
        )
        .header("x-min-event-seq", min_seq.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{query}");
    assert!(header_u64(&r, "x-projection-seq") >= min_seq);
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_counts_now_and_as_of_a_past_time() {
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let now = Utc::now();
    let h = |n: i64| now - Duration::hours(n);
    let mut seeder = Seeder::new(&app.deps.store);
    let project = Uuid::now_v7();
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    seeder
        .project(project, "project.created", project_created("P"), h(5))
        .await;
    // A: created 3 h ago in the project, paused 100 minutes ago.
    seeder
        .agent(
            a,
            "agent.created",
            agent_created("A", "llm", "active", &["search"], Some(project)),
            h(3),
        )
        .await;
    seeder
        .agent(
            a,
            "agent.updated",
            json!({"status": "paused"}),
            now - Duration::minutes(100),
        )
        .await;
    // B: created 2 h ago, deleted 1 h ago.
    let b_created = seeder
        .agent(
            b,
            "agent.created",
            agent_created("B", "tool", "active", &["search", "code"], None),
            h(2),
        )
        .await;
    seeder.agent(b, "agent.deleted", json!({}), h(1)).await;
    // C: created now, over HTTP.
    let r = app
        .create_agent(
            &token,
            json!({"name": "C", "type": "router", "capabilities": ["code"]}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let seq = header_u64(&r, "x-event-seq");

    // Now: A and C.
    let now_view = analytics(&app, &token, "", seq).await;
    assert_eq!(now_view["totals"]["agents"], 2);
    assert_eq!(
        now_view["totals"]["by_status"],
        json!({"active": 1, "paused": 1, "inactive": 0, "error": 0})
    );
    assert_eq!(
        now_view["totals"]["by_type"],
        json!({"llm": 1, "router": 1})
    );
    assert_eq!(now_view["as_of_seq"], seq);
    assert_eq!(
        now_view["top_capabilities"],
        json!([{"capability": "code", "agents": 1}, {"capability": "search", "agents": 1}])
    );
    // The last 24 hours by hour: every bucket, the events where they fell.
    let buckets = now_view["events_over_time"].as_array().unwrap();
    assert!((24..=25).contains(&buckets.len()), "{}", buckets.len());
    let sum = |k: &str| buckets.iter().map(|b| b[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!((sum("created"), sum("updated"), sum("deleted")), (3, 1, 1));
    let starts: Vec<DateTime<Utc>> = buckets
        .iter()
        .map(|b| b["bucket_start"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(starts.windows(2).all(|w| w[1] - w[0] == Duration::hours(1)));
    assert_eq!(starts[0].timestamp() % 3600, 0, "aligned to the hour");

    // 90 minutes ago: A (already paused) and B (not yet deleted); not C.
    let then = analytics(
        &app,
        &token,
        &format!("as_of={}", ts(now - Duration::minutes(90))),
        seq,
    )
    .await;
    assert_eq!(then["totals"]["agents"], 2);
    assert_eq!(then["totals"]["by_type"], json!({"llm": 1, "tool": 1}));
    assert_eq!(then["totals"]["by_status"]["paused"], 1);
    assert_eq!(then["totals"]["by_status"]["active"], 1);
    assert_eq!(
        then["top_capabilities"],
        json!([{"capability": "search", "agents": 2}, {"capability": "code", "agents": 1}])
    );
    assert_eq!(then["as_of_seq"], b_created);
    // 30 minutes ago: only A. 4 hours ago: nothing.
    let later = analytics(
        &app,
        &token,
        &format!("as_of={}", ts(now - Duration::minutes(30))),
        seq,
    )
    .await;
    assert_eq!(later["totals"]["agents"], 1);
    assert_eq!(later["totals"]["by_type"], json!({"llm": 1}));
    let early = analytics(&app, &token, &format!("as_of={}", ts(h(4))), seq).await;
    assert_eq!(early["totals"]["agents"], 0);
    assert_eq!(early["top_capabilities"], json!([]));

    // By project, now and then.
    let p = analytics(&app, &token, &format!("project_id={project}"), seq).await;
    assert_eq!(p["totals"]["agents"], 1);
    assert_eq!(p["totals"]["by_type"], json!({"llm": 1}));
    let events: u64 = p["events_over_time"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["created"].as_u64().unwrap() + b["updated"].as_u64().unwrap())
        .sum();
    assert_eq!(events, 2, "A's creation and update only");
    let p = analytics(
        &app,
        &token,
        &format!("project_id={project}&as_of={}", ts(h(4))),
        seq,
    )
    .await;
    assert_eq!(p["totals"]["agents"], 0);

    // An explicit window by minute.
    let w = analytics(
        &app,
        &token,
        &format!(
            "from={}&to={}&bucket=minute",
            ts(h(2) - Duration::minutes(5)),
            ts(h(2) + Duration::minutes(5))
        ),
        seq,
    )
    .await;
    let buckets = w["events_over_time"].as_array().unwrap();
    // Ten minutes: 11 buckets from an unaligned start (partial first and
    // last), 10 when the start happens to fall on a whole minute.
    assert!((10..=11).contains(&buckets.len()), "{}", buckets.len());
    assert_eq!(
        buckets
            .iter()
            .map(|b| b["created"].as_u64().unwrap())
            .sum::<u64>(),
        1,
        "B"
    );
    let d = analytics(
        &app,
        &token,
        &format!("from={}&to={}&bucket=day", ts(h(24 * 7)), ts(now)),
        seq,
    )
    .await;
    assert!((7..=8).contains(&d["events_over_time"].as_array().unwrap().len()));

    // Bad input.
    for bad in [
        "bucket=week".to_owned(),
        "as_of=soon".to_owned(),
        "from=x".to_owned(),
        format!("from={}&to={}", ts(now), ts(h(1))),
        format!("from={}&to={}&bucket=minute", ts(h(24 * 30)), ts(now)),
        "project_id=nope".to_owned(),
        "other=1".to_owned(),
    ] {
        let r = app
            .request(
                Method::GET,
                &format!("/api/v1/analytics?{bad}"),
                Some(&token),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_degraded_while_the_projector_lags() {
    let sandbox = Sandbox::new().await;
    let mut settings = sandbox.settings.clone();
    settings.http.degraded_lag_events = 1;
    // Writes only: nothing projects.
    let writer = sandbox.start_with(Role::Command, &settings).await;
    let token = writer.admin_token().await;
    for i in 0..2 {
        let r = writer
            .create_agent(&token, agent_body(&format!("lag{i}")))
            .await;
        assert_eq!(r.status(), 201);
    }
    let health = |app: &TestApp| {
        let r = app.request(Method::GET, "/health", None).send();
        async move {
            let r = r.await.unwrap();
            assert_eq!(r.status(), 200, "degraded is still up");
            r.json::<Value>().await.unwrap()
        }
    };
    let h = health(&writer).await;
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["checks"]["projector"]["status"], "degraded");
    assert_eq!(h["checks"]["projector"]["lag_events"], 2);
    assert_eq!(h["checks"]["nats"]["status"], "ok");

    // A projector catches up: ok again.
    let projector = sandbox.start(Role::Projector).await;
    eventually(StdDuration::from_secs(20), "health back to ok", || async {
        let h = health(&writer).await;
        (h["status"] == "ok").then_some(())
    })
    .await;
    let h = health(&writer).await;
    assert_eq!(h["checks"]["projector"]["lag_events"], 0);
    projector.stop().await;
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_project_filter_of_analytics_finds_its_agents_through_an_index_of_named_projects_only()
{
    let app = TestApp::spawn().await;
    let token = app.admin_token().await;
    let project = app
        .request(Method::POST, "/api/v1/projects", Some(&token))
        .json(&json!({"name": "indexed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(project.status(), 201);
    let project: Value = project.json().await.unwrap();
    let mut placed = agent_body("placed");
    placed["project_id"] = project["id"].clone();
    assert_eq!(app.create_agent(&token, placed).await.status(), 201);
    assert_eq!(
        app.create_agent(&token, agent_body("loose")).await.status(),
        201
    );
    app.settled(&token).await;

    let mut tx = app.deps.pool.begin().await.unwrap();
    // With sequential scans priced out, the plan uses the index whenever
    // its predicate admits the query (a parameter, as analytics binds it).
    sqlx::query("SET LOCAL enable_seqscan = off")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SET LOCAL plan_cache_mode = force_generic_plan")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "PREPARE by_project(uuid) AS SELECT aggregate_id FROM events \
         WHERE aggregate_type = 'agent' AND data ->> 'project_id' = $1::text",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN EXECUTE by_project('{}')",
        project["id"].as_str().unwrap()
    )))
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert!(
        plan.iter().any(|l| l.contains("events_agent_project")),
        "{plan:#?}"
    );
    // The agent events that name no project have no entry.
    let predicate: String = sqlx::query_scalar(
        "SELECT pg_get_expr(indpred, indrelid) FROM pg_index \
         WHERE indexrelid = 'events_agent_project'::regclass",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert!(predicate.contains("IS NOT NULL"), "{predicate}");
}
