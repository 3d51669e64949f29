//! The event store's guards and the projector's exactly-once resumption,
//! against real JetStream and PostgreSQL.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use chrono::Utc;
use events::{AggregateType, Envelope, EventMeta};
use futures::StreamExt;
use infra::{EventStore, StoreError};
use projector::{Outcome, Projector, Settings};
use serde_json::json;
use tests::{Sandbox, agent_body, header_u64};
use uuid::Uuid;
use ymera::Role;

fn envelope(id: Uuid, version: u64) -> Envelope {
    let meta = EventMeta {
        aggregate_id: id,
        aggregate_version: version,
        occurred_at: Utc::now(),
        actor: "test".into(),
        request_id: "req".into(),
    };
    Envelope::new(
        Uuid::now_v7(),
        AggregateType::Agent,
        &meta,
        "agent.deleted",
        1,
        json!({}),
    )
}

async fn store(sandbox: &Sandbox) -> EventStore {
    EventStore::connect(&sandbox.settings.nats)
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_msg_id_is_stored_once() {
    let sandbox = Sandbox::new().await;
    let store = store(&sandbox).await;
    let id = Uuid::now_v7();
    let subject = store.subject(AggregateType::Agent, id);
    let env = envelope(id, 1);

    let first = store.append(&subject, 0, &env, None).await.unwrap();
    // A retry of the very same append (same event id → same Nats-Msg-Id).
    let second = store.append(&subject, 0, &env, None).await;
    match second {
        Ok(seq) => assert_eq!(
            seq, first,
            "a duplicate is acknowledged with the original sequence"
        ),
        Err(e) => panic!("a retried append must be deduplicated, not fail: {e}"),
    }
    let state = store.stream_state().await.unwrap();
    assert_eq!(state.messages, 1, "one message in the stream");
    let (events, last) = store.load(&subject).await.unwrap();
    assert_eq!((events.len(), last), (1, first));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_expected_sequence_is_rejected_and_appends_nothing() {
    let sandbox = Sandbox::new().await;
    let store = store(&sandbox).await;
    let id = Uuid::now_v7();
    let subject = store.subject(AggregateType::Agent, id);

    let s1 = store
        .append(&subject, 0, &envelope(id, 1), None)
        .await
        .unwrap();
    let s2 = store
        .append(&subject, s1, &envelope(id, 2), None)
        .await
        .unwrap();
    assert!(s2 > s1);

    // Someone who loaded before the second event tries to append on top of the first.
    let stale = store.append(&subject, s1, &envelope(id, 2), None).await;
    assert!(matches!(stale, Err(StoreError::Conflict)), "got {stale:?}");
    // And "this subject must be empty" fails once it is not.
    let stale = store.append(&subject, 0, &envelope(id, 1), None).await;
    assert!(matches!(stale, Err(StoreError::Conflict)), "got {stale:?}");

    assert_eq!(store.stream_state().await.unwrap().messages, 2);
    assert_eq!(store.last_seq().await.unwrap(), s2);
    let (events, last) = store.load(&subject).await.unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(last, s2);
    assert_eq!(
        events
            .iter()
            .map(|e| e.envelope.aggregate_version)
            .collect::<Vec<_>>(),
        [1, 2]
    );
}

/// Drives `projector` until its checkpoint reaches `target`.
async fn drain(projector: &mut Projector, target: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while projector.checkpoint() < target {
        assert!(
            tokio::time::Instant::now() < deadline,
            "projector stuck at {}",
            projector.checkpoint()
        );
        projector
            .process_next_batch(Duration::from_millis(500))
            .await
            .expect("projector step");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_projector_resumes_from_its_checkpoint_exactly_once() {
    let sandbox = Sandbox::new().await;
    // The write API alone: no projector runs.
    let app = sandbox.start(Role::Command).await;
    let token = app.admin_token().await;
    let mut last = 0;
    for i in 0..100 {
        let r = app
            .create_agent(&token, json!({"name": format!("agent {i}"), "type": "llm"}))
            .await;
        assert_eq!(r.status(), 201);
        last = header_u64(&r, "x-event-seq");
    }
    assert_eq!(app.last_seq().await, last);
    let pool = app.deps.pool.clone();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM agents")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        rows, 0,
        "nothing is projected while the projector is stopped"
    );

    // A first projector applies part of the log, then "crashes" (is dropped
    // without any shutdown) after a committed batch.
    let small = Settings {
        batch_size: 30,
        ..Settings::default()
    };
    let mut first = Projector::new(app.deps.store.clone(), pool.clone(), small.clone());
    match first
        .process_next_batch(Duration::from_secs(5))
        .await
        .unwrap()
    {
        Outcome::Applied { events, checkpoint } => {
            assert!((1..=30).contains(&events));
            assert_eq!(checkpoint, first.checkpoint());
        }
        Outcome::Idle => panic!("events were waiting"),
    }
    let partial = first.checkpoint();
    assert!(partial < last);
    drop(first);

    // A restarted projector picks up from the checkpoint in PostgreSQL.
    let mut second = Projector::new(app.deps.store.clone(), pool.clone(), small);
    drain(&mut second, last).await;
    assert_eq!(second.checkpoint(), last);
    assert_eq!(
        second
            .process_next_batch(Duration::from_millis(200))
            .await
            .unwrap(),
        Outcome::Idle,
        "nothing left to apply"
    );

    let (rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT id) FROM agents")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((rows, distinct), (100, 100), "each agent exactly once");
    let checkpoint: i64 =
        sqlx::query_scalar("SELECT last_seq FROM projector_checkpoint WHERE name = 'main'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        checkpoint as u64,
        app.last_seq().await,
        "checkpoint equals the stream's last sequence"
    );
    let names: i64 = sqlx::query_scalar("SELECT count(DISTINCT name) FROM agents")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(names, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_cannot_be_applied_is_parked_and_the_rest_applied() {
    let sandbox = Sandbox::new().await;
    let app = sandbox.start(Role::Command).await;
    let token = app.admin_token().await;
    let store = app.deps.store.clone();

    let id = Uuid::now_v7();
    let subject = store.subject(AggregateType::Agent, id);
    let mut poison = envelope(id, 1);
    poison.event_type = "agent.teleported".into();
    let poison_seq = store.append(&subject, 0, &poison, None).await.unwrap();
    let r = app
        .create_agent(&token, json!({"name": "after", "type": "llm"}))
        .await;
    let last = header_u64(&r, "x-event-seq");

    let mut projector = Projector::new(store, app.deps.pool.clone(), Settings::default());
    drain(&mut projector, last).await;
    let parked: (i64, String) = sqlx::query_as("SELECT seq, error FROM parked_events")
        .fetch_one(&app.deps.pool)
        .await
        .unwrap();
    assert_eq!(parked.0 as u64, poison_seq);
    assert!(parked.1.contains("agent.teleported"), "{}", parked.1);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM agents WHERE name = 'after'")
        .fetch_one(&app.deps.pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);

    // Health and metrics count it.
    let health: serde_json::Value = app
        .request(reqwest::Method::GET, "/health", None)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["checks"]["projector"]["parked_events"], 1);

    // A retry cannot apply what is still not understood...
    let retried = projector::parked::retry(&app.deps.store, &app.deps.pool)
        .await
        .unwrap();
    assert_eq!((retried.applied, retried.still_parked), (0, 1));
    // ...but applies what now is: here, an event an older version had
    // parked (its row removed, as if it had never been applied).
    sqlx::query("DELETE FROM agents WHERE name = 'after'")
        .execute(&app.deps.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO parked_events (seq, subject, payload, error) VALUES ($1, 'old', '', 'unknown then')")
        .bind(last as i64)
        .execute(&app.deps.pool)
        .await
        .unwrap();
    let retried = projector::parked::retry(&app.deps.store, &app.deps.pool)
        .await
        .unwrap();
    assert_eq!((retried.applied, retried.still_parked), (1, 1));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM agents WHERE name = 'after'")
        .fetch_one(&app.deps.pool)
        .await
        .unwrap();
    assert_eq!(rows, 1, "the retried event was applied");
}

/// A message that the projector's consumer delivered but that never
/// reached the projector (it went down with the NATS server it was routed
/// through, as when a node is killed) is applied all the same: the
/// projector must not apply the deliveries after it, whose cumulative
/// acknowledgement would acknowledge the lost one too, so it would never
/// come again. Here a second client pulls from the projector's consumer
/// and drops what it gets, which is what the consumer sees of such a loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_lost_on_its_way_to_the_projector_is_applied_all_the_same() {
    let sandbox = Sandbox::new().await;
    // The write API alone: the projector is driven by the test.
    let app = sandbox.start(Role::Command).await;
    let token = app.admin_token().await;
    let (store, pool) = (&app.deps.store, &app.deps.pool);
    let settings = Settings {
        consumer: "lossy".into(),
        ..Settings::default()
    };
    let mut projector = Projector::new(store.clone(), pool.clone(), settings);
    // Subscribed (the idle step makes the subscription when the log is
    // still empty), and applied whatever the log already holds.
    let start = app.last_seq().await;
    drain(&mut projector, start).await;
    let _ = projector
        .process_next_batch(Duration::from_millis(100))
        .await
        .unwrap();

    // Another pull on the projector's consumer, waiting for one message.
    let js = async_nats::jetstream::new(async_nats::connect(tests::nats_url()).await.unwrap());
    let consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(store.stream_name())
        .await
        .unwrap()
        .get_consumer("lossy")
        .await
        .unwrap();
    let mut astray = consumer
        .batch()
        .max_messages(1)
        .expires(Duration::from_secs(20))
        .messages()
        .await
        .unwrap();
    let lost = tokio::spawn(async move {
        let message = astray.next().await.expect("a message").expect("no error");
        message.info().unwrap().stream_sequence
    });

    // Agents are created until that pull has taken one (the server shares
    // the messages among the waiting pulls), then one more, so that a
    // delivery follows the lost one.
    let mut created: i64 = 0;
    while !lost.is_finished() {
        assert!(created < 50, "the other pull never got a message");
        let r = app
            .create_agent(&token, agent_body(&format!("a{created}")))
            .await;
        assert_eq!(r.status(), 201);
        created += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lost = lost.await.unwrap();
    let r = app.create_agent(&token, agent_body("after")).await;
    assert_eq!(r.status(), 201);
    let last = header_u64(&r, "x-event-seq");
    assert!(lost < last);

    // The projector gets there, through an error and a fresh subscription
    // when it notices the gap, and applied the lost event.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while projector.checkpoint() < last {
        assert!(tokio::time::Instant::now() < deadline, "projector stuck");
        let _ = projector
            .process_next_batch(Duration::from_millis(500))
            .await;
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE seq = $1")
        .bind(lost as i64)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(applied, 1, "event {lost}, delivered elsewhere, was applied");
    let agents: i64 = sqlx::query_scalar("SELECT count(*) FROM agents")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(
        agents,
        created + 1,
        "every created agent is in the read model"
    );
    let (live, fold) = app.live_and_replayed("fold_of_the_log").await;
    assert_eq!(live, fold, "the read models equal a fold of the log");
}
