//! One owner per projection: two `ymera projector` processes started
//! together against one database and stream. Exactly one applies events
//! while the other stands by; killed with SIGKILL mid-load, the owner is
//! replaced by the standby within seconds, and the read models still equal
//! a fold of the log, with a checkpoint that never moved backwards. And a
//! former owner that has not noticed it lost the projection cannot commit.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use projector::{Outcome, Projector, ProjectorError, Settings};
use reqwest::Method;
use serde_json::{Value, json};
use tests::{Sandbox, agent_body, eventually, process};
use tokio_util::sync::CancellationToken;
use ymera::Role;

const WRITERS: usize = 16;
const UPDATES: usize = 1_500;

/// What `/health` of the projector process at `addr` says of its lease
/// (`owner` or `standby`); `None` when it does not answer.
async fn lease(client: &reqwest::Client, addr: SocketAddr) -> Option<String> {
    let health = process::health(client, addr).await?;
    health["checks"]["projector"]["lease"]
        .as_str()
        .map(str::to_owned)
}

/// The sample `series` (a metric's name and labels) of the process at
/// `addr`; `None` when it has not been recorded.
async fn metric(client: &reqwest::Client, addr: SocketAddr, series: &str) -> Option<f64> {
    let text = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = text
        .lines()
        .find(|l| l.rsplit_once(' ').is_some_and(|(s, _)| s == series))?;
    Some(line.rsplit(' ').next().unwrap().parse().unwrap())
}

/// The `ymera_projector_owner` gauge of the process at `addr`.
async fn owner_gauge(client: &reqwest::Client, addr: SocketAddr) -> Option<f64> {
    metric(client, addr, "ymera_projector_owner{projection=\"main\"}").await
}

/// How many events the process at `addr` has applied.
async fn applied(client: &reqwest::Client, addr: SocketAddr) -> u64 {
    metric(client, addr, "ymera_projector_events_applied_total")
        .await
        .unwrap_or(0.0) as u64
}

/// One look at both processes and the checkpoint.
#[derive(Debug, Clone)]
struct Sample {
    leases: [Option<String>; 2],
    /// `None` when the test's own look at the database did not get a
    /// connection within the pool's wait (the machine busy with the other
    /// tests): a look missed, not anything the projectors did.
    checkpoint: Option<u64>,
    /// When the look was sent, and when both processes had answered.
    sent: Instant,
    answered: Instant,
}

impl Sample {
    /// Whether the look was under way when the owner was killed (at
    /// `kill`): each process tells its lease when its own answer is made,
    /// so the killed owner's answer may come from before the kill and the
    /// standby's from after its takeover. Such a look shows two owners
    /// that never were at once.
    fn spans(&self, kill: Option<Instant>) -> bool {
        kill.is_some_and(|kill| self.sent <= kill && kill <= self.answered)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_owner_at_a_time_and_the_standby_takes_over_a_killed_owner() {
    let sandbox = Sandbox::new().await;
    let app = sandbox.start(Role::Command).await;
    let token = app.admin_token().await;
    let agents: Vec<Value> = (0..WRITERS)
        .map(|i| json!({"name": format!("writer {i}"), "type": "llm"}))
        .collect();
    let ids = app.bulk_create(&token, agents).await;

    let (first, first_addr) = process::spawn(&sandbox, "projector");
    let (second, second_addr) = process::spawn(&sandbox, "projector");
    let mut children = [Some(first), Some(second)];
    let addrs = [first_addr, second_addr];
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();

    // Both up; one owns the projection, the other stands by.
    let owner = eventually(Duration::from_secs(30), "one projector to own", || {
        let client = client.clone();
        async move {
            let leases = [
                lease(&client, addrs[0]).await?,
                lease(&client, addrs[1]).await?,
            ];
            leases.iter().position(|l| l == "owner")
        }
    })
    .await;
    let standby = 1 - owner;
    assert_eq!(
        lease(&client, addrs[standby]).await.as_deref(),
        Some("standby")
    );
    assert_eq!(owner_gauge(&client, addrs[owner]).await, Some(1.0));
    assert_eq!(owner_gauge(&client, addrs[standby]).await, Some(0.0));

    // Both processes and the checkpoint, looked at all along.
    let done = CancellationToken::new();
    let kill = Arc::new(OnceLock::new());
    let sampler = {
        let (client, pool, done) = (client.clone(), app.deps.pool.clone(), done.clone());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while !done.is_cancelled() {
                let sent = Instant::now();
                let (a, b, checkpoint) = tokio::join!(
                    lease(&client, addrs[0]),
                    lease(&client, addrs[1]),
                    infra::projection::checkpoint(&pool),
                );
                let checkpoint = match checkpoint {
                    Ok(checkpoint) => Some(checkpoint),
                    Err(sqlx::Error::PoolTimedOut) => None,
                    Err(e) => panic!("reading the checkpoint: {e}"),
                };
                samples.push(Sample {
                    leases: [a, b],
                    checkpoint,
                    sent,
                    answered: Instant::now(),
                });
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            samples
        })
    };

    // 16 writers, 1,500 updates in all, each writer on an agent of its own.
    let written = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for (w, id) in ids.iter().enumerate() {
        let updates = UPDATES / WRITERS + usize::from(w < UPDATES % WRITERS);
        let (client, url, token, id, written) = (
            app.client.clone(),
            app.url(&format!("/api/v1/agents/{id}")),
            token.clone(),
            id.clone(),
            written.clone(),
        );
        writers.push(tokio::spawn(async move {
            for k in 0..updates {
                let r = client
                    .request(Method::PUT, &url)
                    .bearer_auth(&token)
                    .json(&json!({"description": format!("{id} update {k}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "update {k} of {id}");
                written.fetch_add(1, Ordering::SeqCst);
            }
            updates
        }));
    }

    // Halfway through, the owner is killed outright.
    eventually(Duration::from_secs(60), "half the updates", || async {
        (written.load(Ordering::SeqCst) >= UPDATES / 2).then_some(())
    })
    .await;
    assert_eq!(
        applied(&client, addrs[standby]).await,
        0,
        "the standby applied nothing while it stood by"
    );
    let before_kill = infra::projection::checkpoint(&app.deps.pool).await.unwrap();
    let mut killed = children[owner].take().unwrap();
    kill.set(Instant::now()).unwrap();
    killed.start_kill().unwrap(); // SIGKILL: no chance to give the lease up
    killed.wait().await.unwrap();
    let killed_at = Instant::now();
    eventually(Duration::from_secs(10), "the standby to take over", || {
        let client = client.clone();
        async move {
            (lease(&client, addrs[standby]).await.as_deref() == Some("owner")).then_some(())
        }
    })
    .await;
    let takeover = killed_at.elapsed();
    assert!(
        takeover < Duration::from_secs(3),
        "the standby took over after {takeover:?}"
    );
    assert_eq!(owner_gauge(&client, addrs[standby]).await, Some(1.0));

    let mut per_writer = Vec::new();
    for w in writers {
        per_writer.push(w.await.unwrap());
    }
    assert_eq!(per_writer.iter().sum::<usize>(), UPDATES);
    let last = app.last_seq().await;
    assert_eq!(
        last,
        (WRITERS + UPDATES) as u64,
        "the creates and every update"
    );

    // A process started again finds the projection owned: it stands by.
    let (mut again, again_addr) = process::spawn(&sandbox, "projector");
    eventually(Duration::from_secs(30), "the new process to stand by", || {
        let client = client.clone();
        async move { (lease(&client, again_addr).await.as_deref() == Some("standby")).then_some(()) }
    })
    .await;

    app.caught_up_to(last, Duration::from_secs(30)).await;
    done.cancel();
    let samples = sampler.await.unwrap();
    // The new owner applied what was left, and nothing the old one had
    // committed.
    let by_survivor = applied(&client, addrs[standby]).await;
    assert!(
        (1..=last - before_kill).contains(&by_survivor),
        "the new owner applied {by_survivor} events; {} were left",
        last - before_kill
    );

    // The checkpoint never moved backwards.
    let checkpoints: Vec<u64> = samples.iter().filter_map(|s| s.checkpoint).collect();
    assert!(
        checkpoints.len() * 10 >= samples.len() * 9,
        "only {} of {} looks read the checkpoint",
        checkpoints.len(),
        samples.len()
    );
    for pair in checkpoints.windows(2) {
        assert!(
            pair[1] >= pair[0],
            "the checkpoint moved back from {} to {}",
            pair[0],
            pair[1]
        );
    }
    // Never two owners; exactly one whenever both answered (but in a look
    // that spans the kill, see `Sample::spans`).
    let owners = |s: &Sample| {
        s.leases
            .iter()
            .filter(|l| l.as_deref() == Some("owner"))
            .count()
    };
    let kill = kill.get().copied();
    let two = samples
        .iter()
        .filter(|s| owners(s) > 1 && !s.spans(kill))
        .collect::<Vec<_>>();
    assert!(two.is_empty(), "two owners at once: {two:?}");
    let both_up: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.leases.iter().all(Option::is_some) && !s.spans(kill))
        .collect();
    assert!(both_up.len() > 10, "{} samples with both up", both_up.len());
    assert!(
        both_up.iter().all(|s| owners(s) == 1),
        "exactly one owner while both ran"
    );

    // Nothing lost: each agent shows its writer's last update.
    for (w, id) in ids.iter().enumerate() {
        let (description, version): (String, i64) =
            sqlx::query_as("SELECT description, version FROM agents WHERE id = $1::uuid")
                .bind(id)
                .fetch_one(&app.deps.pool)
                .await
                .unwrap();
        assert_eq!(description, format!("{id} update {}", per_writer[w] - 1));
        assert_eq!(version as usize, 1 + per_writer[w]);
    }
    // Nothing applied twice or out of order: the read models equal a fresh
    // fold of the log, row for row.
    again.start_kill().unwrap();
    again.wait().await.unwrap();
    for child in children.iter_mut().flatten() {
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }
    let (live, fold) = app.live_and_replayed("fold_of_the_log").await;
    assert_eq!(live, fold, "the read models equal a fold of the log");
}

/// One step of `projector`, which must apply a batch; its checkpoint.
async fn applied_batch(projector: &mut Projector) -> u64 {
    match projector
        .process_next_batch(Duration::from_secs(5))
        .await
        .unwrap()
    {
        Outcome::Applied { checkpoint, .. } => checkpoint,
        Outcome::Idle => panic!("events were waiting"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_former_owner_cannot_commit_once_another_has_claimed_the_projection() {
    let sandbox = Sandbox::new().await;
    // The write API alone: the projectors are driven by the test.
    let app = sandbox.start(Role::Command).await;
    let token = app.admin_token().await;
    for i in 0..20 {
        let r = app.create_agent(&token, agent_body(&format!("a{i}"))).await;
        assert_eq!(r.status(), 201);
    }
    // Two projectors of the one projection, each reading the log through a
    // subscription of its own, as two processes would around a takeover.
    let settings = |consumer: &str| Settings {
        batch_size: 5,
        consumer: consumer.to_owned(),
        ..Settings::default()
    };
    let (store, pool) = (&app.deps.store, &app.deps.pool);
    let mut former = Projector::new(store.clone(), pool.clone(), settings("former"));
    let left_at = applied_batch(&mut former).await;

    // Another claims the projection and moves on from the checkpoint, past
    // anything the former owner's next batch could reach.
    let mut current = Projector::new(store.clone(), pool.clone(), settings("current"));
    let mut now_at = left_at;
    while now_at <= left_at + 5 {
        now_at = applied_batch(&mut current).await;
    }

    // The former owner's next batch (from `left_at + 1` again) is refused,
    // whole: the checkpoint stays where the current owner put it.
    let refused = former.process_next_batch(Duration::from_secs(5)).await;
    assert!(
        matches!(refused, Err(ProjectorError::Fenced(_))),
        "{refused:?}"
    );
    assert_eq!(infra::projection::checkpoint(pool).await.unwrap(), now_at);

    while now_at < 20 {
        now_at = applied_batch(&mut current).await;
    }
    let (live, fold) = app.live_and_replayed("fold_of_the_log").await;
    assert_eq!(live, fold, "the read models equal a fold of the log");
}
