//! The projector folds a batch in memory per aggregate and writes each
//! table once per batch: the read models must be the same, row for row, as
//! when every event is applied on its own, whatever a batch mixes; and a
//! batch that fails halfway leaves nothing behind.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use chrono::{SubsecRound, Utc};
use events::{AggregateType, Envelope, EventMeta};
use infra::EventStore;
use projector::rebuild::{self, TableCheck};
use projector::{Projector, ProjectorError, Settings};
use serde_json::{Value, json};
use sqlx::PgPool;
use tests::Sandbox;
use uuid::Uuid;
use ymera::Role;

/// Appends one event straight to the log (no command checks it), returns
/// its stream sequence.
async fn append(
    store: &EventStore,
    kind: AggregateType,
    id: Uuid,
    version: u64,
    event_type: &str,
    data: Value,
) -> u64 {
    let meta = EventMeta {
        aggregate_id: id,
        aggregate_version: version,
        occurred_at: Utc::now().trunc_subsecs(6),
        actor: "test".into(),
        request_id: format!("req-{version}"),
    };
    let env = Envelope::new(Uuid::now_v7(), kind, &meta, event_type, 1, data);
    let subject = store.subject(kind, id);
    let last = store.last_seq_of(&subject).await.unwrap();
    store.append(&subject, last, &env, None).await.unwrap()
}

/// id, name, status, project_id, version, capabilities, tags.
type AgentRow = (Uuid, String, String, Option<Uuid>, i64, Vec<String>, Value);

fn created(name: &str, project: Option<Uuid>) -> Value {
    json!({
        "name": name, "type": "llm", "description": format!("about {name}"),
        "status": "active", "capabilities": ["search", "multi-word \"quoted\" \\ cap"],
        "config": {"model": "m-1"}, "tags": {"env": "test"}, "project_id": project,
    })
}

/// A projector of the log into `schema` (made fresh), `batch_size` events
/// at most per batch, driven until it has applied event `last`.
async fn project_into(
    sandbox: &Sandbox,
    store: &EventStore,
    live: &PgPool,
    schema: &str,
    batch_size: usize,
    last: u64,
) -> (Vec<TableCheck>, usize) {
    infra::db::migrate_schema(live, &projector::MIGRATIONS, schema)
        .await
        .unwrap();
    let pool = infra::db::pool_reading(&sandbox.settings.db, schema).unwrap();
    let settings = Settings {
        batch_size,
        consumer: format!("fold-{}", schema.replace('_', "-")),
        live: false,
        ..Settings::default()
    };
    let mut projector = Projector::new(store.clone(), pool.clone(), settings);
    let mut batches = 0;
    let mut store_errors = 0;
    while projector.checkpoint() < last {
        assert!(
            batches < 1_000,
            "projector stuck at {}",
            projector.checkpoint()
        );
        // As the projector's own loop does, a step that lost its pull from
        // JetStream (a heartbeat missed on a busy machine) is taken again
        // from the checkpoint; anything else fails the test.
        match projector.process_next_batch(Duration::from_secs(2)).await {
            Ok(_) => batches += 1,
            Err(ProjectorError::Store(e)) if store_errors < 5 => {
                store_errors += 1;
                eprintln!("step retried from the checkpoint after: {e}");
            }
            Err(e) => panic!("projector step failed: {e}"),
        }
    }
    let mut conn = live.acquire().await.unwrap();
    let checks = rebuild::checksums(&mut conn, schema).await.unwrap();
    pool.close().await;
    (checks, batches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_folds_to_what_one_event_at_a_time_gives() {
    let sandbox = Sandbox::new().await;
    // The write API alone: no projector runs, the test drives its own.
    let app = sandbox.start(Role::Command).await;
    let store = app.deps.store.clone();
    let (agent, project) = (AggregateType::Agent, AggregateType::Project);
    let [a, b, c, d, e, p, q] = [(); 7].map(|_| Uuid::now_v7());

    append(
        &store,
        project,
        p,
        1,
        "project.created",
        json!({"name": "p", "description": ""}),
    )
    .await;
    append(
        &store,
        project,
        q,
        1,
        "project.created",
        json!({"name": "q", "description": ""}),
    )
    .await;
    // a: created in p, then changed field by field, moved out and into q.
    append(&store, agent, a, 1, "agent.created", created("a", Some(p))).await;
    append(&store, agent, e, 1, "agent.created", created("e", None)).await;
    append(&store, agent, a, 2, "agent.updated", json!({"name": "a2"})).await;
    append(
        &store,
        agent,
        a,
        3,
        "agent.updated",
        json!({"tags": {"k": "v"}, "capabilities": []}),
    )
    .await;
    append(
        &store,
        agent,
        a,
        4,
        "agent.updated",
        json!({"project_id": null}),
    )
    .await;
    // An event nobody can apply, parked in the middle of it all.
    append(
        &store,
        agent,
        Uuid::now_v7(),
        1,
        "agent.teleported",
        json!({}),
    )
    .await;
    append(
        &store,
        agent,
        a,
        5,
        "agent.updated",
        json!({"project_id": q, "status": "paused"}),
    )
    .await;
    // b: created and deleted. c: deleted, then created again.
    append(&store, agent, b, 1, "agent.created", created("b", None)).await;
    append(&store, agent, c, 1, "agent.created", created("c", Some(q))).await;
    append(&store, agent, b, 2, "agent.deleted", json!({})).await;
    append(
        &store,
        agent,
        c,
        2,
        "agent.updated",
        json!({"description": "c2", "config": {"x": 1}}),
    )
    .await;
    append(&store, agent, c, 3, "agent.deleted", json!({})).await;
    append(
        &store,
        agent,
        c,
        4,
        "agent.created",
        created("c again", None),
    )
    .await;
    // d: updated but never created; e: changed after others.
    append(
        &store,
        agent,
        d,
        2,
        "agent.updated",
        json!({"name": "ghost"}),
    )
    .await;
    append(
        &store,
        agent,
        e,
        2,
        "agent.updated",
        json!({"type": "tool", "project_id": p}),
    )
    .await;
    append(
        &store,
        project,
        q,
        2,
        "project.updated",
        json!({"name": "q2"}),
    )
    .await;
    append(&store, project, p, 2, "project.deleted", json!({})).await;
    let last = append(
        &store,
        agent,
        e,
        3,
        "agent.updated",
        json!({"description": "e3"}),
    )
    .await;

    let live = &app.deps.pool;
    let (one_by_one, batches) = project_into(&sandbox, &store, live, "fold_single", 1, last).await;
    assert_eq!(batches as u64, last, "one event per batch");
    let (at_once, batches) = project_into(&sandbox, &store, live, "fold_batch", 5_000, last).await;
    assert!(batches < last as usize, "events folded in one batch");
    assert_eq!(one_by_one, at_once, "the fold equals one event at a time");

    // And what both say is what the events say.
    let rows: Vec<AgentRow> = sqlx::query_as(
        "SELECT id, name, status, project_id, version, capabilities, tags \
         FROM fold_batch.agents ORDER BY name",
    )
    .fetch_all(live)
    .await
    .unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(names, ["a2", "c again", "e"]);
    assert_eq!(
        (rows[0].0, rows[0].2.as_str(), rows[0].3, rows[0].4),
        (a, "paused", Some(q), 5)
    );
    assert!(rows[0].5.is_empty());
    assert_eq!(rows[0].6, json!({"k": "v"}));
    assert_eq!((rows[1].0, rows[1].4, rows[1].3), (c, 4, None));
    assert_eq!(
        rows[1].5,
        ["search", "multi-word \"quoted\" \\ cap"],
        "capabilities keep quotes and backslashes"
    );
    assert_eq!((rows[2].0, rows[2].3, rows[2].4), (e, Some(p), 3));
    let projects: Vec<(Uuid, String)> = sqlx::query_as("SELECT id, name FROM fold_batch.projects")
        .fetch_all(live)
        .await
        .unwrap();
    assert_eq!(projects, [(q, "q2".to_owned())]);
    let (events, parked): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM fold_batch.events), \
                (SELECT count(*) FROM fold_batch.parked_events)",
    )
    .fetch_one(live)
    .await
    .unwrap();
    assert_eq!((events + parked) as u64, last, "every event recorded once");
    assert_eq!(parked, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_fails_halfway_leaves_nothing_and_is_applied_whole_after() {
    let sandbox = Sandbox::new().await;
    let app = sandbox.start(Role::Command).await;
    let store = app.deps.store.clone();
    let pool = app.deps.pool.clone();
    let agent = AggregateType::Agent;
    let [x, y, z] = [(); 3].map(|_| Uuid::now_v7());

    append(&store, agent, x, 1, "agent.created", created("x", None)).await;
    let first = append(&store, agent, y, 1, "agent.created", created("y", None)).await;
    // Then an update and a delete, written before the insert that fails
    // (a row with z's id is already there) when they share its batch.
    let x2 = append(&store, agent, x, 2, "agent.updated", json!({"name": "x2"})).await;
    let y2 = append(&store, agent, y, 2, "agent.deleted", json!({})).await;
    let last = append(&store, agent, z, 1, "agent.created", created("z", None)).await;

    let mut projector = Projector::new(
        store.clone(),
        pool.clone(),
        Settings {
            stop_at: Some(first),
            ..Settings::default()
        },
    );
    while projector.checkpoint() < first {
        projector
            .process_next_batch(Duration::from_secs(2))
            .await
            .unwrap();
    }
    sqlx::query(
        "INSERT INTO agents (id, name, type, description, status, capabilities, config, tags, \
         version, created_at, updated_at, created_by, last_seq) \
         VALUES ($1, 'squatter', 'llm', '', 'active', '{}', '{}', '{}', 1, now(), now(), 't', 0)",
    )
    .bind(z)
    .execute(&pool)
    .await
    .unwrap();

    // The batch with z fails (the events before it may have come in a
    // batch of their own, which commits).
    let mut projector = Projector::new(store.clone(), pool.clone(), Settings::default());
    let failed = loop {
        match projector.process_next_batch(Duration::from_secs(2)).await {
            Err(e) => break e,
            Ok(_) => assert!(projector.checkpoint() < last, "z was inserted"),
        }
    };
    assert!(failed.to_string().contains("duplicate key"), "{failed}");
    let (names, events, checkpoint): (Vec<String>, i64, i64) = sqlx::query_as(
        "SELECT (SELECT array_agg(name ORDER BY name) FROM agents), \
                (SELECT count(*) FROM events), \
                (SELECT last_seq FROM projector_checkpoint WHERE name = 'main')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let at = checkpoint as u64;
    let mut expected = vec!["squatter", if at >= x2 { "x2" } else { "x" }];
    if at < y2 {
        expected.push("y");
    }
    assert_eq!(
        names, expected,
        "nothing of the failed batch (checkpoint {at})"
    );
    assert_eq!(events as u64, at, "no event of the failed batch recorded");

    // Once the cause is gone, the projector resumes from its checkpoint and
    // the models are exactly a fold of the log.
    sqlx::query("DELETE FROM agents WHERE id = $1")
        .bind(z)
        .execute(&pool)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while projector.checkpoint() < last {
        assert!(tokio::time::Instant::now() < deadline, "projector stuck");
        let _ = projector.process_next_batch(Duration::from_secs(2)).await;
    }
    let (live, replayed) = app.live_and_replayed("fold_replayed").await;
    assert_eq!(live, replayed);
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM agents ORDER BY name")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(names, ["x2", "z"]);
}
