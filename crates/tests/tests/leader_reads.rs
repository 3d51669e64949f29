//! On a replicated stream the reads that decide a write (an aggregate's
//! events and last sequence, whether a project exists) come from the
//! stream's leader, never from whichever replica answers a direct get: a
//! command-api whose NATS node is cut off from the rest of the cluster,
//! and so holds an old copy of the log, answers 503 rather than decide on
//! that copy (a 404 for an agent created since, a 422 for a project
//! created since, a no-op for an update that is one only on the old
//! state), and decides on the current state once its node rejoins.
//!
//! The same holds through the stream's leader when it is the node cut off:
//! it goes on answering leader reads from its copy until it steps down
//! (about 18 s after the cut here, 8 s after the others elected a new
//! leader and took writes), but a read it answers counts only while it
//! still hears from a quorum of the replicas.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::{Duration, Instant};

use infra::StoreError;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tests::nats::PrivateCluster;
use tests::{Sandbox, TestApp, eventually};
use ymera::Role;

/// How late the slow follower learns of each append: well inside the
/// event store's request timeout (1 s) both ways, so a read through it
/// from the leader is answered, and well past the time a request takes.
const LAG: Duration = Duration::from_millis(300);

/// One command-api as a writer sees it.
struct Writer<'a> {
    app: &'a TestApp,
    token: &'a str,
}

impl Writer<'_> {
    /// Sends `method path` with `body`: the status and body.
    async fn send(&self, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
        let r = self
            .app
            .request(method, path, Some(self.token))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Sets the description of the agent at `path`.
    async fn describe(&self, path: &str, description: &str) -> (StatusCode, Value) {
        let body = json!({"description": description});
        self.send(Method::PUT, path, body).await
    }

    /// Creates what `body` describes under `collection`, which must
    /// succeed: the new resource's path.
    async fn create(&self, collection: &str, body: Value) -> String {
        let (status, created) = self.send(Method::POST, collection, body).await;
        assert_eq!(status, StatusCode::CREATED, "POST {collection}");
        format!("{collection}/{}", created["id"].as_str().unwrap())
    }

    /// Creates an agent named `name`: its path.
    async fn agent(&self, name: &str) -> String {
        let body = json!({"name": name, "type": "llm"});
        self.create("/api/v1/agents", body).await
    }

    /// Creates a project named `name`: its id.
    async fn project(&self, name: &str) -> String {
        let path = self.create("/api/v1/projects", json!({"name": name})).await;
        id_of(&path).to_owned()
    }
}

/// The id at the end of `path`.
fn id_of(path: &str) -> &str {
    path.rsplit('/').next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_the_leader_never_decides_a_write_on_its_old_copy() {
    let cluster = PrivateCluster::start().await;
    let sandbox = Sandbox::new().await;
    let mut settings = sandbox.settings.clone();
    settings.nats.nats_url = cluster.urls_without(&[]);
    settings.nats.stream_replicas = 3;

    // The stream, R3, made through the whole cluster; the node to cut off
    // is one of its followers.
    let store = infra::EventStore::connect(&settings.nats).await.unwrap();
    let stream = settings.nats.stream.clone();
    let leader = eventually(Duration::from_secs(30), "the stream's leader", || {
        cluster.stream_leader(0, &stream)
    })
    .await;
    drop(store);
    let cut = (0..cluster.nodes.len()).find(|n| *n != leader).unwrap();

    // A command-api on that follower, and one on the node left, through
    // which the writes go.
    let on_node = |node: usize| {
        let mut on = settings.clone();
        on.nats.nats_url = cluster.nodes[node].url.clone();
        on
    };
    let other = (0..cluster.nodes.len())
        .find(|n| *n != leader && *n != cut)
        .unwrap();
    let app = sandbox.start_with(Role::Command, &on_node(other)).await;
    let lagging = sandbox.start_with(Role::Command, &on_node(cut)).await;
    let token = app.admin_token().await;
    let writer = |app| Writer { app, token: &token };
    let (rest, alone) = (writer(&app), writer(&lagging));
    let (ok, unavailable) = (StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE);

    // An agent, on every node.
    let first = rest.agent("first").await;
    cluster.replicas_current(leader, &stream).await;

    // A follower that learns of each append a moment after the others (it
    // still follows the leader): what the rest of the cluster has just
    // stored, a write through it decides on, or it fails.
    cluster.slow(cut, LAG);
    assert_eq!(rest.describe(&first, "after").await.0, ok);
    // A no-op on the old state, a change on the current one.
    let (status, answer) = alone.describe(&first, "").await;
    assert!(
        status == unavailable || (status == ok && answer["version"] == 3),
        "an update decided on the old copy: {status} {answer}"
    );
    let second = rest.agent("second").await;
    let (status, answer) = alone.describe(&second, "x").await;
    assert!(
        status == unavailable || status == ok,
        "an agent just created, not found: {status} {answer}"
    );
    let project = rest.project("new").await;
    let joins = json!({"name": "joins", "type": "llm", "project_id": project});
    let (status, answer) = alone.send(Method::POST, "/api/v1/agents", joins).await;
    assert!(
        status == unavailable || status == StatusCode::CREATED,
        "a project just created, not found: {status} {answer}"
    );
    cluster.rejoin(cut);
    assert_eq!(rest.describe(&first, "before the cut").await.0, ok);
    cluster.replicas_current(leader, &stream).await;

    // Cut off, the node is not current any more: through it, every write
    // that its old copy would decide (a no-op, a 404, a 422) is refused
    // with 503 instead, quickly.
    cluster.isolate(cut);
    assert_eq!(rest.describe(&first, "after the cut").await.0, ok);
    let third = rest.agent("third").await;
    let project = rest.project("since").await;
    let attempts = [
        (
            Method::PUT,
            first.clone(),
            json!({"description": "before the cut"}),
        ),
        (Method::PUT, third.clone(), json!({"description": "x"})),
        (Method::DELETE, third.clone(), Value::Null),
        (
            Method::POST,
            "/api/v1/agents".to_owned(),
            json!({"name": "joins", "type": "llm", "project_id": project}),
        ),
    ];
    for (method, path, body) in attempts {
        let asked = Instant::now();
        let (status, answer) = alone.send(method.clone(), &path, body).await;
        assert_eq!(
            status, unavailable,
            "{method} {path} decided on the old copy: {answer}"
        );
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "{method} {path} took {:?}",
            asked.elapsed()
        );
    }
    // The event store itself: the subject's last event and its events
    // cannot be read there.
    let subject = lagging
        .deps
        .store
        .subject(events::AggregateType::Agent, id_of(&third).parse().unwrap());
    assert!(matches!(
        lagging.deps.store.last_on_subject(&subject).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        lagging.deps.store.load(&subject).await,
        Err(StoreError::Unavailable(_))
    ));

    // Once the node is back, it decides on the current state.
    cluster.rejoin(cut);
    eventually(
        Duration::from_secs(30),
        "the node to serve writes again",
        || {
            let (alone, third) = (&alone, &third);
            async move { (alone.describe(third, "rejoined").await.0 == ok).then_some(()) }
        },
    )
    .await;
    assert_eq!(alone.describe(&first, "before the cut").await.0, ok);

    // Nothing was stored from the old copy: the agents' events are the
    // writes answered 2xx since the cut, in order.
    let descriptions = |events: Vec<(String, Value)>| {
        events
            .into_iter()
            .map(|(_, data)| data["description"].as_str().unwrap_or("-").to_owned())
            .collect::<Vec<_>>()
    };
    let first_events = descriptions(app.agent_events(id_of(&first)).await);
    assert_eq!(
        first_events[first_events.len() - 3..],
        ["before the cut", "after the cut", "before the cut"]
    );
    let third_events = descriptions(app.agent_events(id_of(&third)).await);
    assert_eq!(
        third_events.len(),
        2,
        "created, then updated once: {third_events:?}"
    );
    assert_eq!(third_events[1], "rejoined");

    // The leader cut off (the stream's leader now, with a command-api on
    // it and one on the others): once the others have elected another,
    // and taken writes, a write through it is not decided on its copy.
    let leader = eventually(Duration::from_secs(30), "the stream's leader", || {
        cluster.stream_leader(other, &stream)
    })
    .await;
    let on_leader = sandbox.start_with(Role::Command, &on_node(leader)).await;
    let mut without = settings.clone();
    without.nats.nats_url = cluster.urls_without(&[leader]);
    let on_the_others = sandbox.start_with(Role::Command, &without).await;
    let (deposed, rest) = (writer(&on_leader), writer(&on_the_others));
    cluster.replicas_current(leader, &stream).await;
    cluster.isolate(leader);
    let asking = (0..cluster.nodes.len()).find(|n| *n != leader).unwrap();
    eventually(Duration::from_secs(30), "another leader", || {
        let (cluster, stream) = (&cluster, &stream);
        async move {
            let now = cluster.stream_leader(asking, stream).await?;
            (now != leader).then_some(())
        }
    })
    .await;
    let project = rest.project("under the new leader").await;
    let joins = json!({"name": "joins", "type": "llm", "project_id": project});
    let (status, answer) = deposed.send(Method::POST, "/api/v1/agents", joins).await;
    assert_eq!(
        status, unavailable,
        "a project just created, not found by the former leader: {answer}"
    );
}
