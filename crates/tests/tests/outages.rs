//! Dependency outages: NATS or PostgreSQL cut off while writes flow. The
//! process answers 503 fast, recovers by itself when the dependency
//! returns, and loses no acknowledged write.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;
use tests::proxy::Proxy;
use tests::{Sandbox, TestApp, agent_body, eventually, header, header_u64};
use ymera::Role;

/// Creates an agent; `Some((id, seq))` when it was acknowledged.
async fn write(app: &TestApp, token: &str, name: &str) -> (u16, Option<(String, u64)>, Duration) {
    let started = Instant::now();
    let r = app.create_agent(token, agent_body(name)).await;
    let elapsed = started.elapsed();
    let status = r.status().as_u16();
    if status == 201 {
        let seq = header_u64(&r, "x-event-seq");
        let id = r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        (status, Some((id, seq)), elapsed)
    } else {
        assert_eq!(
            header(&r, "content-type").as_deref(),
            Some("application/problem+json")
        );
        (status, None, elapsed)
    }
}

/// `ymera all` reaching NATS and PostgreSQL through proxies the test can
/// cut, and an admin token.
async fn started_behind_proxies() -> (TestApp, String, Proxy, Proxy) {
    let (sandbox, nats, pg) = Sandbox::new().await.behind_proxies().await;
    let app = sandbox.start(Role::All).await;
    let token = app.admin_token().await;
    (app, token, nats, pg)
}

/// `n` agents written while everything is up: each acknowledged.
async fn written_before(app: &TestApp, token: &str, n: usize) -> Vec<(String, u64)> {
    let mut acked = Vec::new();
    for i in 0..n {
        let (status, ok, _) = write(app, token, &format!("before {i}")).await;
        assert_eq!(status, 201);
        acked.extend(ok);
    }
    acked
}

/// Every acknowledged agent is in the read model once it has caught up.
async fn all_visible(app: &TestApp, token: &str, acked: &[(String, u64)]) {
    let last = acked.iter().map(|(_, s)| *s).max().unwrap();
    for (id, _) in acked {
        let r = app
            .read_at(&format!("/api/v1/agents/{id}"), token, last)
            .await;
        assert_eq!(r.status(), 200, "acknowledged agent {id} is readable");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_gives_fast_503s_and_recovers_without_a_restart() {
    let (app, token, nats, _pg) = started_behind_proxies().await;
    let mut acked = written_before(&app, &token, 10).await;

    nats.down();
    for i in 0..5 {
        let (status, ok, elapsed) = write(&app, &token, &format!("during {i}")).await;
        assert!(ok.is_none(), "no write is acknowledged while NATS is away");
        assert_eq!(status, 503);
        assert!(
            elapsed < Duration::from_millis(1500),
            "503 within a second or so, took {elapsed:?}"
        );
    }
    let r = app
        .request(Method::GET, "/health", None)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let health: Value = r.json().await.unwrap();
    assert_eq!(health["status"], "unavailable");
    assert_eq!(health["checks"]["nats"]["status"], "down");
    // Reads keep working from the read models.
    let r = app
        .request(Method::GET, "/api/v1/agents", Some(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    nats.up();
    let first = eventually(
        Duration::from_secs(30),
        "writes to succeed again",
        || async {
            let (status, ok, _) = write(&app, &token, "after").await;
            ok.filter(|_| status == 201)
        },
    )
    .await;
    acked.push(first);
    for i in 0..10 {
        let (status, ok, _) = write(&app, &token, &format!("after {i}")).await;
        assert_eq!(status, 201);
        acked.extend(ok);
    }
    all_visible(&app, &token, &acked).await;
    let r = app
        .request(Method::GET, "/health", None)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_gives_fast_503s_on_reads_and_the_projection_catches_up() {
    let (app, token, _nats, pg) = started_behind_proxies().await;
    let mut acked = written_before(&app, &token, 5).await;

    pg.down();
    // Writes go to the log, which is up: they are acknowledged.
    for i in 0..20 {
        let (status, ok, _) = write(&app, &token, &format!("during {i}")).await;
        assert_eq!(status, 201, "writes do not need PostgreSQL");
        acked.extend(ok);
    }
    // Reads need PostgreSQL: a fast 503, for a list and for reads by id
    // (which share their queries).
    let by_id = format!("/api/v1/agents/{}", uuid::Uuid::now_v7());
    for path in ["/api/v1/agents", &by_id, &by_id] {
        let started = Instant::now();
        let r = app
            .request(Method::GET, path, Some(&token))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{path}");
        assert!(header(&r, "retry-after").is_some());
        assert!(
            started.elapsed() < Duration::from_millis(2500),
            "took {:?}",
            started.elapsed()
        );
    }
    let r = app
        .request(Method::GET, "/health", None)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let health: Value = r.json().await.unwrap();
    assert_eq!(health["checks"]["postgres"]["status"], "down");

    pg.up();
    // The projector resumes from its checkpoint by itself; every
    // acknowledged write shows up.
    eventually(Duration::from_secs(30), "reads to work again", || async {
        let r = app
            .request(Method::GET, "/api/v1/agents", Some(&token))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    all_visible(&app, &token, &acked).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM agents")
        .fetch_one(&app.deps.pool)
        .await
        .unwrap();
    assert_eq!(rows as usize, acked.len(), "each acknowledged agent once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_lost_while_the_listener_reconnects_does_not_stall_reads() {
    let sandbox = Sandbox::new().await;
    // Writes and the projector reach PostgreSQL directly; the reader goes
    // through a proxy, and waits long enough for a connection to get
    // through it after a hold.
    let writer = sandbox.start(Role::All).await;
    let token = writer.admin_token().await;
    let (proxied, _nats, pg) = sandbox.behind_proxies().await;
    let mut settings = proxied.settings.clone();
    settings.db.db_acquire_timeout_ms = 10_000;
    settings.http.min_seq_wait_ms = 3_000;
    let reader = proxied.start_with(Role::Query, &settings).await;

    let (status, before, _) = write(&writer, &token, "before").await;
    assert_eq!(status, 201);
    let (id, seq) = before.unwrap();
    let r = reader
        .read_at(&format!("/api/v1/agents/{id}"), &token, seq)
        .await;
    assert_eq!(r.status(), 200, "the reader's watch follows the projection");
    // A pooled connection idle for over a second is checked before use
    // (infra::db). Once the reader's have aged past that, its listener,
    // cut off, reconnects through the proxy (and is held there) instead of
    // failing at once on a pooled connection the cut has killed.
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    // The listener's connection drops; its new one is held while the
    // projector commits, so that commit's notification never reaches it.
    pg.hold();
    let (status, during, _) = write(&writer, &token, "during").await;
    assert_eq!(status, 201);
    let (id, seq) = during.unwrap();
    eventually(
        Duration::from_secs(10),
        "the projector to apply it",
        || async {
            let cp = infra::projection::checkpoint(&writer.deps.pool)
                .await
                .ok()?;
            (cp >= seq).then_some(())
        },
    )
    .await;
    pg.up();

    // The listener, connected again, has read the checkpoint afresh.
    let r = reader
        .read_at(&format!("/api/v1/agents/{id}"), &token, seq)
        .await;
    assert_eq!(
        r.status(),
        200,
        "a read at a sequence applied while the listener was away is served"
    );
}
