//! The projector killed with SIGKILL at random points while 10,000 writes
//! flow, restarted each time: afterwards the read models equal a fresh
//! replay of the log, row for row. The projector runs as a real `ymera
//! projector` child process (built by `scripts/test.sh` before the tests).

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tests::{Sandbox, agent_body};
use tokio::process::Child;
use ymera::Role;

fn spawn_projector(sandbox: &Sandbox) -> Child {
    tests::process::spawn(sandbox, "projector").0
}

/// Cheap pseudo-random pauses, different every run.
fn pause(i: u64) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    Duration::from_millis(50 + (nanos ^ (i * 7919)) % 300)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_projector_leaves_read_models_equal_to_a_fresh_replay() {
    let sandbox = Sandbox::new().await;
    let app = sandbox.start(Role::Command).await;
    let token = app.admin_token().await;

    let done = tokio_util::sync::CancellationToken::new();
    let killer = {
        let (sandbox, done) = (sandbox.clone(), done.clone());
        tokio::spawn(async move {
            let mut kills = 0u64;
            let mut child = spawn_projector(&sandbox);
            while !done.is_cancelled() {
                tokio::time::sleep(pause(kills)).await;
                child.start_kill().unwrap(); // SIGKILL: no chance to clean up
                child.wait().await.unwrap();
                kills += 1;
                child = spawn_projector(&sandbox);
            }
            (kills, child)
        })
    };

    // 10,000 events: bulk creates, single creates, updates and deletes.
    let mut ids = Vec::new();
    for round in 0..8 {
        let agents: Vec<Value> = (0..1000)
            .map(|i| json!({"name": format!("b{round}-{i}"), "type": "bulk"}))
            .collect();
        ids.extend(app.bulk_create(&token, agents).await.into_iter().take(125));
    }
    for i in 0..1000 {
        let r = app
            .create_agent(&token, agent_body(&format!("single {i}")))
            .await;
        assert_eq!(r.status(), 201);
    }
    for (i, id) in ids.iter().enumerate() {
        let path = format!("/api/v1/agents/{id}");
        let r = if i % 2 == 0 {
            app.request(Method::PUT, &path, Some(&token))
                .json(&json!({"status": "paused", "description": format!("d{i}")}))
                .send()
                .await
                .unwrap()
        } else {
            app.request(Method::DELETE, &path, Some(&token))
                .send()
                .await
                .unwrap()
        };
        assert!(r.status().is_success(), "{}", r.status());
    }
    let last = app.last_seq().await;
    assert_eq!(last, 10_000);

    done.cancel();
    let (kills, mut child) = killer.await.unwrap();
    assert!(kills >= 3, "the projector was killed {kills} times");
    // The last projector, left running, catches up.
    app.caught_up_to(last, Duration::from_secs(60)).await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();

    let (live, fresh) = app.live_and_replayed("fresh_replay").await;
    assert_eq!(
        live, fresh,
        "read models after {kills} kills equal a fresh replay"
    );
    let agents = live.iter().find(|t| t.table == "agents").unwrap();
    assert_eq!(agents.rows, 8000 + 1000 - 500);
}
