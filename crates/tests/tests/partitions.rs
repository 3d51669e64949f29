//! A partitioned projection (`YMERA_PARTITIONS=4`): projectors share the
//! partitions, one owner each, and hand a dead one's over within seconds;
//! read models that span aggregates (a project's `agent_count`) stay exact
//! however the partitions interleave; and a read at an event's sequence is
//! answered once every partition has got that far, a partition with
//! nothing of its own to apply included. Each partition is delivered only
//! its own events (the partition is the last token of the subjects of a
//! split log), and a process given another partition count than its
//! stream's refuses to start. `ymera rebuild` swaps new models in under
//! projectors that keep running.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use infra::projection::{self, Partition, PartitionState};
use projector::progress::Reporter;
use projector::rebuild;
use reqwest::Method;
use serde_json::{Value, json};
use tests::{Sandbox, TestApp, agent_body, eventually, header_u64, process};
use tokio_util::sync::CancellationToken;
use ymera::Role;

const PARTITIONS: u32 = 4;

/// The partitions that `/health` of the projector process at `addr` says
/// it owns; `None` when it does not answer.
async fn owned(client: &reqwest::Client, addr: SocketAddr) -> Option<BTreeSet<u64>> {
    let health = process::health(client, addr).await?;
    let owned = health["checks"]["projector"]["partitions"].as_array()?;
    Some(owned.iter().filter_map(Value::as_u64).collect())
}

/// Waits until the two projector processes at `addrs` own two partitions
/// each, none twice: every partition.
async fn shared(client: &reqwest::Client, addrs: [SocketAddr; 2]) -> BTreeSet<u64> {
    let all: BTreeSet<u64> = (0..u64::from(PARTITIONS)).collect();
    eventually(
        Duration::from_secs(30),
        "the projectors to share the partitions",
        || {
            let (client, all) = (client.clone(), all.clone());
            async move {
                let (a, b) = (
                    owned(&client, addrs[0]).await?,
                    owned(&client, addrs[1]).await?,
                );
                let shared = a.len() == 2
                    && b.len() == 2
                    && a.union(&b).copied().collect::<BTreeSet<_>>() == all;
                shared.then_some(())
            }
        },
    )
    .await;
    all
}

/// A process playing every role on a projection split [`PARTITIONS`]
/// ways, and an admin token.
async fn partitioned_app() -> (TestApp, String) {
    let sandbox = Sandbox::new().await;
    let mut settings = sandbox.settings.clone();
    settings.nats.partitions = PARTITIONS;
    let app = sandbox.start_with(Role::All, &settings).await;
    let token = app.admin_token().await;
    (app, token)
}

/// Creates project `name`: its id.
async fn create_project(app: &TestApp, token: &str, name: &str) -> String {
    let r = app
        .request(Method::POST, "/api/v1/projects", Some(token))
        .json(&json!({"name": name}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Creates agent `name`: its id and the event's sequence.
async fn create_agent(app: &TestApp, token: &str, name: &str) -> (String, u64) {
    let r = app.create_agent(token, agent_body(name)).await;
    assert_eq!(r.status(), 201);
    let seq = header_u64(&r, "x-event-seq");
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    (id, seq)
}

/// Each project's `agent_count` as the query API gives it at `seq`.
async fn agent_counts(app: &TestApp, token: &str, projects: &[String], seq: u64) -> Vec<u64> {
    let mut counts = Vec::new();
    for project in projects {
        let r = app
            .read_at(&format!("/api/v1/projects/{project}"), token, seq)
            .await;
        assert_eq!(r.status(), 200);
        counts.push(
            r.json::<Value>().await.unwrap()["agent_count"]
                .as_u64()
                .unwrap(),
        );
    }
    counts
}

/// Waits until every partition's checkpoint is at `last`; the partitions.
async fn all_partitions_at(app: &TestApp, last: u64) -> Vec<PartitionState> {
    eventually(
        Duration::from_secs(30),
        "every partition at the end of the log",
        || async {
            let partitions = projection::partitions(&app.deps.pool).await.ok()?;
            (partitions.len() == PARTITIONS as usize
                && partitions.iter().all(|p| p.checkpoint == last))
            .then_some(partitions)
        },
    )
    .await
}

/// The live read models and a fresh fold of the log agree, table by table
/// (the checkpoint table aside: the live one has a row per partition).
async fn assert_read_models_are_the_fold(app: &TestApp) {
    let (live, fold) = app.live_and_replayed("fold_of_the_log").await;
    let tables = |checks: Vec<projector::rebuild::TableCheck>| {
        checks
            .into_iter()
            .filter(|c| c.table != "projector_checkpoint")
            .collect::<Vec<_>>()
    };
    assert_eq!(
        tables(live),
        tables(fold),
        "the read models equal a fold of the log"
    );
}

/// A sandbox with a command-api (no projector runs yet), an admin token,
/// three projects and `agents` agents in the first: the projects, and the
/// agents' ids.
async fn agents_in_the_first_of_three_projects(
    agents: usize,
) -> (Sandbox, TestApp, String, [String; 3], Vec<String>) {
    // Every process of the stream is given its partition count.
    let mut sandbox = Sandbox::new().await;
    sandbox.settings.nats.partitions = PARTITIONS;
    let app = sandbox.start(Role::Command).await;
    let token = app.admin_token().await;
    let projects = [
        create_project(&app, &token, "alpha").await,
        create_project(&app, &token, "beta").await,
        create_project(&app, &token, "gamma").await,
    ];
    let bodies: Vec<Value> = (0..agents)
        .map(|i| json!({"name": format!("agent {i}"), "type": "llm", "project_id": projects[0]}))
        .collect();
    let ids = app.bulk_create(&token, bodies).await;
    (sandbox, app, token, projects, ids)
}

/// Kills the projector processes `children`, then checks that the live
/// read models are the fold of the log.
async fn stop_and_compare_with_the_fold(
    app: &TestApp,
    children: impl IntoIterator<Item = tokio::process::Child>,
) {
    for mut child in children {
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }
    assert_read_models_are_the_fold(app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_projectors_share_the_partitions_and_one_takes_over_a_killed_ones() {
    let (sandbox, app, token, projects, ids) = agents_in_the_first_of_three_projects(24).await;

    let env = [("YMERA_PARTITIONS", "4")];
    let (first, first_addr) = process::spawn_with(&sandbox, "projector", &env);
    let (second, second_addr) = process::spawn_with(&sandbox, "projector", &env);
    let mut children = [Some(first), Some(second)];
    let addrs = [first_addr, second_addr];
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();

    // Two partitions each, none owned twice.
    let all = shared(&client, addrs).await;

    // Both processes looked at all along: a partition never has two owners.
    // A look starts every 10 ms whether or not the ones before have been
    // answered (at most 32 at once), so how many there are does not depend
    // on how fast a loaded machine answers `/health`.
    let done = CancellationToken::new();
    let sampler = {
        let (client, done) = (client.clone(), done.clone());
        tokio::spawn(async move {
            let mut looks = tokio::task::JoinSet::new();
            let mut samples = Vec::new();
            while !done.is_cancelled() {
                if looks.len() < 32 {
                    let client = client.clone();
                    looks.spawn(async move {
                        let asked = Instant::now();
                        let (a, b) =
                            tokio::join!(owned(&client, addrs[0]), owned(&client, addrs[1]));
                        (asked..Instant::now(), [a, b])
                    });
                }
                while let Some(look) = looks.try_join_next() {
                    samples.push(look.unwrap());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            samples.extend(looks.join_all().await);
            samples
        })
    };

    // Writers move their agents between the projects, each agent's moves
    // applied by its own partition, concurrently with the others'.
    const MOVES: usize = 24;
    let mut writers = Vec::new();
    for (w, pair) in ids.chunks(2).enumerate() {
        let (app_client, base, token, pair, projects) = (
            app.client.clone(),
            app.base.clone(),
            token.clone(),
            pair.to_vec(),
            projects.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut last_project = Vec::new();
            for (a, id) in pair.iter().enumerate() {
                let mut at = 0;
                for k in 0..MOVES {
                    at = (w + a + k * (a + 1)) % projects.len();
                    let r = app_client
                        .put(format!("{base}/api/v1/agents/{id}"))
                        .bearer_auth(&token)
                        .json(&json!({"project_id": projects[at], "description": format!("move {k}")}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200, "move {k} of {id}");
                }
                last_project.push(at);
            }
            last_project
        }));
    }

    // A moment in, one projector is killed outright; the other takes its
    // partitions over.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut killed = children[0].take().unwrap();
    let kill_sent = Instant::now();
    killed.start_kill().unwrap(); // SIGKILL: no chance to give a lease up
    killed.wait().await.unwrap();
    let killed_at = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the survivor to own every partition",
        || {
            let (client, all) = (client.clone(), all.clone());
            async move { (owned(&client, addrs[1]).await? == all).then_some(()) }
        },
    )
    .await;
    let takeover = killed_at.elapsed();
    assert!(
        takeover < Duration::from_secs(3),
        "took over after {takeover:?}"
    );

    let mut expected = [0u64; 3];
    for w in writers {
        for at in w.await.unwrap() {
            expected[at] += 1;
        }
    }
    let last = app.last_seq().await;
    all_partitions_at(&app, last).await;
    done.cancel();
    let samples = sampler.await.unwrap();
    for (when, sample) in &samples {
        // The two answers of a look are not one instant: a look the kill
        // fell inside can pair the killed process's last answer with the
        // survivor's after its takeover.
        if when.contains(&kill_sent) {
            continue;
        }
        if let [Some(a), Some(b)] = sample {
            assert!(
                a.is_disjoint(b),
                "a partition with two owners: {a:?} and {b:?}"
            );
        }
    }
    let slowest = samples.iter().map(|(when, _)| when.end - when.start).max();
    assert!(
        samples.len() > 10,
        "{} samples, the slowest look {slowest:?}",
        samples.len()
    );

    // agent_count is exact: every agent counted in its last project once.
    let reader = sandbox.start(Role::Query).await;
    let counts = agent_counts(&reader, &token, &projects, last).await;
    assert_eq!(counts, expected.to_vec(), "each project's agent_count");
    assert_eq!(counts.iter().sum::<u64>(), ids.len() as u64);

    stop_and_compare_with_the_fold(&app, children.into_iter().flatten()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_waits_for_every_partition_and_an_idle_one_does_not_hold_it_back() {
    let (app, token) = partitioned_app().await;

    // One agent: one partition has events of its own, three have none.
    let (id, _) = create_agent(&app, &token, "solo").await;
    for k in 0..20 {
        let seq = app
            .update_agent(&token, &id, json!({"description": format!("v{k}")}))
            .await;
        // Read back at once, through the watch of every partition.
        let started = Instant::now();
        let r = app
            .read_at(&format!("/api/v1/agents/{id}"), &token, seq)
            .await;
        assert_eq!(r.status(), 200, "read at {seq}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a read at {seq} waited {:?}",
            started.elapsed()
        );
        assert!(header_u64(&r, "x-projection-seq") >= seq);
        assert_eq!(
            r.json::<Value>().await.unwrap()["description"],
            format!("v{k}")
        );
    }

    // Every partition saw the whole log: the three idle ones moved their
    // watermark over the events they did not apply.
    let last = app.last_seq().await;
    let partitions = all_partitions_at(&app, last).await;
    assert_eq!(
        partitions
            .iter()
            .map(|p| p.name.clone())
            .collect::<Vec<_>>(),
        (0..PARTITIONS)
            .map(|i| format!("main:{i}/{PARTITIONS}"))
            .collect::<Vec<_>>()
    );
    let r = app.read_at("/api/v1/agents?limit=1", &token, last).await;
    assert_eq!(
        header_u64(&r, "x-projection-seq"),
        last,
        "the lowest watermark"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_count_is_exact_under_concurrent_partitions_and_a_deletion_detaches_all() {
    let (app, token) = partitioned_app().await;
    let from = create_project(&app, &token, "from").await;
    let to = create_project(&app, &token, "to").await;
    let agents: Vec<Value> = (0..40)
        .map(|i| json!({"name": format!("a{i}"), "type": "llm", "project_id": from}))
        .collect();
    let ids = app.bulk_create(&token, agents).await;
    // The agents fall into every partition.
    let partitions: BTreeSet<u32> = ids
        .iter()
        .map(|id| events::partition_of(id, PARTITIONS))
        .collect();
    assert_eq!(partitions.len(), PARTITIONS as usize);

    // All move at once, three quarters of them back again: the partitions
    // apply their own agents' moves concurrently.
    let moves = ids.iter().enumerate().map(|(i, id)| {
        let (app, token, from, to) = (&app, &token, &from, &to);
        async move {
            app.update_agent(token, id, json!({"project_id": to})).await;
            if i % 4 != 0 {
                app.update_agent(token, id, json!({"project_id": from}))
                    .await;
            }
        }
    });
    futures::future::join_all(moves).await;
    let last = app.last_seq().await;
    let projects = [from.clone(), to.clone()];
    assert_eq!(
        agent_counts(&app, &token, &projects, last).await,
        vec![30, 10]
    );

    // The detach reaction waits for every partition before it reads the
    // members: all thirty are detached.
    let r = app
        .request(
            Method::DELETE,
            &format!("/api/v1/projects/{from}"),
            Some(&token),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    eventually(Duration::from_secs(30), "the members detached", || async {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM agents WHERE project_id = $1::uuid")
                .bind(&from)
                .fetch_one(&app.deps.pool)
                .await
                .ok()?;
        let detached: i64 =
            sqlx::query_scalar("SELECT count(*) FROM agents WHERE project_id IS NULL")
                .fetch_one(&app.deps.pool)
                .await
                .ok()?;
        (left == 0 && detached == 30).then_some(())
    })
    .await;
    let last = app.last_seq().await;
    all_partitions_at(&app, last).await;
    assert_eq!(agent_counts(&app, &token, &[to], last).await, vec![10]);
    app.stop().await;
}

/// `ymera rebuild` of a partitioned projection, while two projector
/// processes share its partitions and writers move agents between
/// projects: the new models follow each partition to where its owner
/// stands, are swapped in between batches, and the owners go on from
/// their partitions' rows in them, applying nothing twice and skipping
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_swaps_in_while_two_projectors_share_the_partitions() {
    const AGENTS: usize = 200;
    const MOVERS: usize = 8;
    let (sandbox, app, token, projects, ids) = agents_in_the_first_of_three_projects(AGENTS).await;

    let env = [("YMERA_PARTITIONS", "4")];
    let (first, first_addr) = process::spawn_with(&sandbox, "projector", &env);
    let (second, second_addr) = process::spawn_with(&sandbox, "projector", &env);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    shared(&client, [first_addr, second_addr]).await;
    let reader = sandbox.start(Role::Query).await;
    let r = reader.read_at("/api/v1/agents?limit=1", &token, 0).await;
    assert_eq!(r.status(), 200);

    // Writers move their agents from project to project until stopped,
    // before, during and after the rebuild.
    let stop = CancellationToken::new();
    let moves = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for (w, pair) in ids[..MOVERS].chunks(2).enumerate() {
        let (app_client, base, token, pair, projects, stop, moves) = (
            app.client.clone(),
            app.base.clone(),
            token.clone(),
            pair.to_vec(),
            projects.clone(),
            stop.clone(),
            moves.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut at = vec![0; pair.len()];
            let mut k = 0;
            while !stop.is_cancelled() {
                for (a, id) in pair.iter().enumerate() {
                    at[a] = (at[a] + 1 + (w + a + k) % 2) % projects.len();
                    let r = app_client
                        .put(format!("{base}/api/v1/agents/{id}"))
                        .bearer_auth(&token)
                        .json(&json!({"project_id": projects[at[a]], "description": format!("move {k}")}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200, "move {k} of {id}");
                    moves.fetch_add(1, Ordering::SeqCst);
                }
                k += 1;
            }
            at
        }));
    }
    let moved = || moves.load(Ordering::SeqCst);
    eventually(Duration::from_secs(30), "the writers to start", || async {
        (moved() > 20).then_some(())
    })
    .await;

    let before = moved();
    let report = rebuild::rebuild(
        &app.deps.store,
        &sandbox.settings.db,
        &app.deps.pool,
        false,
        &Reporter::silent(),
    )
    .await
    .expect("a partitioned projection is rebuilt");
    let during = moved() - before;
    assert!(during > 0, "the writers went on during the rebuild");
    assert!(
        report.checkpoint > AGENTS as u64,
        "rebuilt up to {}",
        report.checkpoint
    );

    // After the swap the owners go on in the new models: the moves, and a
    // create (read back below, with the rest, at the end of the log).
    let settled = moved();
    eventually(Duration::from_secs(30), "writes after the swap", || async {
        (moved() > settled + 20).then_some(())
    })
    .await;
    let after = json!({"name": "after the swap", "type": "llm", "project_id": projects[1]});
    assert_eq!(app.create_agent(&token, after).await.status(), 201);
    stop.cancel();
    let mut expected = [AGENTS as u64 - MOVERS as u64, 1, 0];
    for w in writers {
        for at in w.await.unwrap() {
            expected[at] += 1;
        }
    }

    // Every partition reaches the end of the log in the swapped-in models,
    // each agent counted once, in its last project.
    let last = app.last_seq().await;
    all_partitions_at(&app, last).await;
    let counts = agent_counts(&reader, &token, &projects, last).await;
    assert_eq!(counts, expected.to_vec(), "each project's agent_count");
    let schemas: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'ymera_read_%'",
    )
    .fetch_all(&app.deps.pool)
    .await
    .unwrap();
    assert!(schemas.is_empty(), "left behind: {schemas:?}");

    // Each agent's row (and every other) is the fold of its events.
    stop_and_compare_with_the_fold(&app, [first, second]).await;
}

/// The scrape shows each partition's checkpoint and lag on its own
/// (`partition` label), and the projection's as the lowest of them: a
/// partition held back shows as the one behind, and the unlabelled
/// checkpoint stays at it however far the others move.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_metrics_show_each_partition_and_the_projection_at_the_lowest() {
    let (app, token) = partitioned_app().await;
    let agents: Vec<Value> = (0..20)
        .map(|i| json!({"name": format!("m{i}"), "type": "llm"}))
        .collect();
    let ids = app.bulk_create(&token, agents).await;
    let held_at = app.last_seq().await;
    all_partitions_at(&app, held_at).await;
    let series = |name: &str, partition: u32| {
        format!("{name}{{partition=\"main:{partition}/{PARTITIONS}\"}}")
    };

    // Partition 0's checkpoint row is locked: its owner's next move waits,
    // while the other partitions go on to the end of the log.
    let mut hold = app.deps.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM projector_checkpoint WHERE name = $1 FOR UPDATE")
        .bind(format!("main:0/{PARTITIONS}"))
        .execute(&mut *hold)
        .await
        .unwrap();
    for id in &ids[..8] {
        app.update_agent(&token, id, json!({"description": "moved on"}))
            .await;
    }
    let end = app.last_seq().await;
    eventually(
        Duration::from_secs(30),
        "the other partitions at the end of the log",
        || async {
            let partitions = projection::partitions(&app.deps.pool).await.ok()?;
            partitions
                .iter()
                .all(|p| {
                    p.checkpoint
                        == if p.name.starts_with("main:0/") {
                            held_at
                        } else {
                            end
                        }
                })
                .then_some(())
        },
    )
    .await;
    for _ in 0..10 {
        assert_eq!(
            app.metric(&series("ymera_projector_partition_checkpoint", 0))
                .await,
            Some(held_at as f64)
        );
        assert_eq!(
            app.metric(&series("ymera_projector_partition_lag_events", 0))
                .await,
            Some((end - held_at) as f64)
        );
        for partition in 1..PARTITIONS {
            assert_eq!(
                app.metric(&series("ymera_projector_partition_checkpoint", partition))
                    .await,
                Some(end as f64),
                "partition {partition}"
            );
            assert_eq!(
                app.metric(&series("ymera_projector_partition_lag_events", partition))
                    .await,
                Some(0.0),
                "partition {partition}"
            );
        }
        assert_eq!(
            app.metric("ymera_projector_checkpoint").await,
            Some(held_at as f64),
            "the projection's checkpoint is the lowest partition's"
        );
        assert_eq!(
            app.metric("ymera_projector_lag_events").await,
            Some((end - held_at) as f64)
        );
    }

    hold.rollback().await.unwrap();
    all_partitions_at(&app, end).await;
    for partition in 0..PARTITIONS {
        assert_eq!(
            app.metric(&series("ymera_projector_partition_checkpoint", partition))
                .await,
            Some(end as f64)
        );
    }
    assert_eq!(
        app.metric("ymera_projector_checkpoint").await,
        Some(end as f64)
    );
    app.stop().await;
}

/// The durable consumer of `partition` of the projection of `app`'s
/// stream, as the server describes it.
async fn consumer_info(
    app: &TestApp,
    partition: Partition,
) -> async_nats::jetstream::consumer::Info {
    let nats = &app.sandbox.settings.nats;
    let js = async_nats::jetstream::new(async_nats::connect(&nats.nats_url).await.unwrap());
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(&nats.stream)
        .await
        .unwrap()
        .get_consumer(&projector::Settings::live(partition).consumer)
        .await
        .unwrap();
    consumer.info().await.unwrap().clone()
}

/// Every message of `app`'s log: (sequence, subject).
async fn stored_subjects(app: &TestApp) -> Vec<(u64, String)> {
    let store = &app.deps.store;
    let mut reader = store
        .read_stored(&events::all_subjects(store.prefix()), 1)
        .await
        .unwrap();
    let mut subjects = Vec::new();
    while let Some(message) = reader.next().await {
        let message = message.unwrap();
        subjects.push((message.seq, message.subject().to_owned()));
    }
    subjects
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_partition_is_delivered_its_own_events_only() {
    let (app, token) = partitioned_app().await;
    let project = create_project(&app, &token, "home").await;
    let agents: Vec<Value> = (0..24)
        .map(|i| json!({"name": format!("a{i}"), "type": "llm", "project_id": project}))
        .collect();
    let ids = app.bulk_create(&token, agents).await;
    for id in ids.iter().step_by(3) {
        app.update_agent(&token, id, json!({"description": "moved on"}))
            .await;
    }
    let last = app.last_seq().await;
    all_partitions_at(&app, last).await;

    // Each event is stored with its aggregate's partition last.
    let prefix = app.deps.store.prefix().to_owned();
    let mut own = vec![0u64; PARTITIONS as usize];
    for (seq, subject) in stored_subjects(&app).await {
        let tokens: Vec<&str> = subject.split('.').collect();
        assert_eq!(tokens.len(), 4, "event {seq} on {subject}");
        let partition = events::partition_of(tokens[2], PARTITIONS);
        assert_eq!(tokens[3], partition.to_string(), "event {seq} on {subject}");
        own[partition as usize] += 1;
    }
    assert_eq!(own.iter().sum::<u64>(), last);

    // The server delivered each partition's consumer its own events, and
    // nothing else: every event once in all.
    for partition in Partition::all(PARTITIONS) {
        let info = consumer_info(&app, partition).await;
        assert_eq!(
            info.config.filter_subject,
            format!("{prefix}.*.*.{}", partition.index),
            "{}",
            partition.name()
        );
        assert_eq!(
            info.delivered.consumer_sequence,
            own[partition.index as usize],
            "deliveries to {}: its own events",
            partition.name()
        );
    }
    assert_read_models_are_the_fold(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_at_a_write_is_answered_promptly_while_the_other_partitions_get_nothing() {
    let (app, token) = partitioned_app().await;
    let (id, _) = create_agent(&app, &token, "lonely").await;
    let mine = events::partition_of(&id, PARTITIONS);

    // Writes now and then, each read back at once at its sequence: the
    // three partitions that get nothing must move their watermark past it
    // by themselves.
    let mut waits = Vec::new();
    for k in 0..15 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let seq = app
            .update_agent(&token, &id, json!({"description": format!("v{k}")}))
            .await;
        let started = Instant::now();
        let r = app
            .read_at(&format!("/api/v1/agents/{id}"), &token, seq)
            .await;
        let waited = started.elapsed();
        assert_eq!(r.status(), 200, "read at {seq}");
        assert_eq!(
            r.json::<Value>().await.unwrap()["description"],
            format!("v{k}")
        );
        waits.push(waited);
    }
    waits.sort_unstable();
    let median = waits[waits.len() / 2];
    let worst = waits[waits.len() - 1];
    assert!(
        worst < Duration::from_secs(1) && median < Duration::from_millis(150),
        "reads at a write waited {median:?} (median), {worst:?} (worst)"
    );
    // Only the agent's partition was delivered anything.
    for partition in Partition::all(PARTITIONS) {
        let delivered = consumer_info(&app, partition)
            .await
            .delivered
            .consumer_sequence;
        if partition.index == mine {
            assert_eq!(delivered, 16, "{}", partition.name());
        } else {
            assert_eq!(delivered, 0, "{}", partition.name());
        }
    }
    app.stop().await;
}

/// Starts `ymera command-api` on `sandbox`'s stream with
/// `YMERA_PARTITIONS=partitions` and waits (at most 30 s) for it to exit:
/// its exit code and what it wrote to stderr.
async fn start_refused(sandbox: &Sandbox, partitions: u32) -> (Option<i32>, String) {
    let s = &sandbox.settings;
    let secret = s.auth.jwt_secret.as_ref().unwrap();
    let mut command = tokio::process::Command::new(process::ymera_bin());
    command
        .arg("command-api")
        .env("YMERA_NATS_URL", &s.nats.nats_url)
        .env("YMERA_STREAM", &s.nats.stream)
        .env("YMERA_SUBJECT_PREFIX", &s.nats.subject_prefix)
        .env("YMERA_DATABASE_URL", &s.db.database_url)
        .env("YMERA_BIND", "127.0.0.1:0")
        .env(
            "YMERA_JWT_SECRET",
            secrecy::ExposeSecret::expose_secret(secret),
        )
        .env("YMERA_PARTITIONS", partitions.to_string())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("a process of another partition count refuses to start")
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_process_of_another_partition_count_than_the_streams_refuses_to_start() {
    let (app, _token) = partitioned_app().await;
    let (code, stderr) = start_refused(&app.sandbox, 2).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("YMERA_PARTITIONS=4") && stderr.contains("YMERA_PARTITIONS=2"),
        "{stderr}"
    );
    // In process too, for every role that opens the event store.
    let mut nats = app.sandbox.settings.nats.clone();
    nats.partitions = 1;
    let refused = infra::EventStore::connect(&nats).await.unwrap_err();
    assert!(
        matches!(&refused, infra::StoreError::Misconfigured(m) if m.contains("YMERA_PARTITIONS=4")),
        "{refused}"
    );
    app.stop().await;

    // A stream made before partitions (no count recorded) holds a log of
    // one: a process split four ways is refused.
    let sandbox = Sandbox::new().await;
    let whole = sandbox.start(Role::Command).await;
    let (code, stderr) = start_refused(&sandbox, 4).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("YMERA_PARTITIONS=1") && stderr.contains("YMERA_PARTITIONS=4"),
        "{stderr}"
    );
    whole.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_partition_keeps_the_subjects_and_the_whole_log_consumer() {
    let sandbox = Sandbox::new().await;
    let app = sandbox.start(Role::All).await;
    let token = app.admin_token().await;
    let (id, seq) = create_agent(&app, &token, "plain").await;
    app.caught_up_to(seq, Duration::from_secs(10)).await;
    let prefix = &sandbox.settings.nats.subject_prefix;
    assert_eq!(
        stored_subjects(&app).await,
        vec![(seq, format!("{prefix}.agent.{id}"))]
    );
    let info = consumer_info(&app, Partition::WHOLE).await;
    assert_eq!(info.config.filter_subject, format!("{prefix}.>"));
    app.stop().await;
}
