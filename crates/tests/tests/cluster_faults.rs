//! The production shape under faults: on the cluster `scripts/cluster.sh`
//! runs (three NATS nodes with the stream R3, two command-api, two
//! query-api, two projectors sharing four partitions, nginx), writers
//! create and update agents through nginx with `Idempotency-Key`s,
//! retrying 5xx answers and connection errors with backoff, while NATS
//! nodes, a command-api and a projector that owns partitions are killed
//! with SIGKILL and restarted, and another NATS node is frozen for a few
//! seconds.
//!
//! Afterwards: every acknowledged create is stored exactly once in the log
//! and once in the read model, every agent's read model equals the fold of
//! its events, a read through nginx at each write's `X-Event-Seq` saw the
//! write, and every partition's checkpoint is at the end of the log.
//!
//! Every operation, attempt and fault goes to a history file (one JSON
//! object a line, its path printed on failure, with the processes' logs
//! next to it), from which a failing run can be replayed by reading it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use tests::cluster::Cluster;
use tests::eventually;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How many writers run at once.
const WRITERS: usize = 4;
/// Updates per agent after its create.
const UPDATES: usize = 2;
/// How long one operation is retried before the writer gives up on it
/// (its outcome then stays unknown: it may or may not be stored). Longer
/// than the command side takes to give up on a key whose attempt died with
/// its process (60 s; until then a retry is told the first attempt is still
/// in flight), so such writes end through the unknown-outcome retry.
const OPERATION_DEADLINE: Duration = Duration::from_secs(90);

/// The history of one run: what each writer sent and got, and each fault.
struct History {
    path: PathBuf,
    file: Mutex<std::fs::File>,
    started: Instant,
}

impl History {
    fn new(path: PathBuf) -> History {
        let file = std::fs::File::create(&path).expect("history file");
        History {
            path,
            file: Mutex::new(file),
            started: Instant::now(),
        }
    }

    fn record(&self, mut entry: Value) {
        entry["t_ms"] = json!(self.started.elapsed().as_millis());
        let mut file = self.file.lock().expect("history lock");
        writeln!(file, "{entry}").expect("write history");
    }
}

/// A write that was acknowledged (2xx), with what it answered.
#[derive(Debug, Clone)]
struct Acked {
    agent: String,
    seq: u64,
    version: u64,
    description: String,
}

/// What the writers saw.
#[derive(Debug, Default)]
struct Outcomes {
    acked: Vec<Acked>,
    /// Creates that were given up: each may or may not be stored, but at
    /// most once.
    unknown_creates: usize,
    /// Reads at a write's sequence that did not show the write.
    stale_reads: Vec<String>,
}

struct Writer {
    id: usize,
    http: Client,
    url: String,
    token: String,
    history: Arc<History>,
    outcomes: Arc<Mutex<Outcomes>>,
}

impl Writer {
    /// Sends one write under one key until it is answered with anything
    /// but a 5xx, a 409 (the first attempt still in flight) or a
    /// connection error; `None` when the deadline passes first.
    async fn send(&self, op: &str, method: Method, path: &str, body: &Value) -> Option<Value> {
        let key = Uuid::now_v7().to_string();
        let started = Instant::now();
        let mut pause = Duration::from_millis(100);
        for attempt in 1.. {
            let sent = self
                .http
                .request(method.clone(), format!("{}{path}", self.url))
                .bearer_auth(&self.token)
                .header("idempotency-key", &key)
                .json(body)
                .send()
                .await;
            let (status, answer) = match sent {
                Ok(r) => {
                    let status = r.status();
                    let seq = tests::header(&r, "x-event-seq");
                    let body: Value = r.json().await.unwrap_or(Value::Null);
                    (Some(status), json!({"seq": seq, "body": body}))
                }
                Err(e) => (None, json!({"error": e.to_string()})),
            };
            self.history.record(json!({
                "writer": self.id, "op": op, "path": path, "key": key, "attempt": attempt,
                "status": status.map(|s| s.as_u16()), "answer": answer,
            }));
            match status {
                Some(s) if s.is_success() => return Some(answer),
                Some(s) if !(s.is_server_error() || s == StatusCode::CONFLICT) => {
                    panic!(
                        "{op} {path} answered {s}: {answer}; history: {}",
                        self.history.path.display()
                    )
                }
                _ if started.elapsed() > OPERATION_DEADLINE => {
                    self.history
                        .record(json!({"writer": self.id, "op": op, "key": key, "gave_up": true}));
                    return None;
                }
                _ => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
        unreachable!("the loop returns")
    }

    /// Reads the agent through nginx at `acked.seq` until answered, and
    /// notes a read that does not show the write.
    async fn read_at(&self, acked: &Acked) {
        let started = Instant::now();
        loop {
            let r = self
                .http
                .get(format!("{}/api/v1/agents/{}", self.url, acked.agent))
                .bearer_auth(&self.token)
                .header("x-min-event-seq", acked.seq.to_string())
                .send()
                .await;
            let (status, projection_seq, body) = match r {
                Ok(r) => (
                    Some(r.status()),
                    tests::header(&r, "x-projection-seq"),
                    r.json::<Value>().await.unwrap_or(Value::Null),
                ),
                Err(e) => (None, None, json!({"error": e.to_string()})),
            };
            self.history.record(json!({
                "writer": self.id, "op": "read_at", "agent": acked.agent, "min_seq": acked.seq,
                "status": status.map(|s| s.as_u16()), "version": body["version"],
                "projection_seq": projection_seq,
            }));
            if status == Some(StatusCode::OK) {
                if body["version"].as_u64() < Some(acked.version) {
                    self.outcomes
                        .lock()
                        .expect("outcomes lock")
                        .stale_reads
                        .push(format!(
                            "agent {} at seq {}: version {} < {}",
                            acked.agent, acked.seq, body["version"], acked.version
                        ));
                }
                return;
            }
            if started.elapsed() > OPERATION_DEADLINE {
                self.outcomes
                    .lock()
                    .expect("outcomes lock")
                    .stale_reads
                    .push(format!(
                        "agent {} at seq {}: no answer in time ({status:?})",
                        acked.agent, acked.seq
                    ));
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn acked(&self, answer: &Value) -> Acked {
        let acked = Acked {
            agent: answer["body"]["id"].as_str().expect("agent id").to_owned(),
            seq: answer["seq"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("X-Event-Seq"),
            version: answer["body"]["version"].as_u64().expect("version"),
            description: answer["body"]["description"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        };
        self.outcomes
            .lock()
            .expect("outcomes lock")
            .acked
            .push(acked.clone());
        acked
    }

    /// Creates agents and updates each, until told to stop.
    async fn run(self, stop: CancellationToken) {
        let mut n = 0;
        while !stop.is_cancelled() {
            n += 1;
            let name = format!("w{}-{n}", self.id);
            let body = json!({"name": name, "type": "llm", "description": "created"});
            let Some(answer) = self
                .send("create", Method::POST, "/api/v1/agents", &body)
                .await
            else {
                self.outcomes.lock().expect("outcomes lock").unknown_creates += 1;
                continue;
            };
            let created = self.acked(&answer);
            self.read_at(&created).await;
            for u in 1..=UPDATES {
                let body = json!({"description": format!("update {u} of {name}")});
                let path = format!("/api/v1/agents/{}", created.agent);
                let Some(answer) = self.send("update", Method::PUT, &path, &body).await else {
                    break;
                };
                let updated = self.acked(&answer);
                self.read_at(&updated).await;
            }
        }
    }
}

/// The NATS node that leads the stream now, from any live node's view.
async fn stream_leader(cluster: &Cluster, http: &Client) -> u16 {
    eventually(Duration::from_secs(30), "a stream leader", || async {
        for n in 1..=3 {
            let url = format!("{}/jsz?streams=true", cluster.nats_monitor_url(n));
            let Ok(r) = http.get(url).timeout(Duration::from_secs(1)).send().await else {
                continue;
            };
            let Ok(jsz) = r.json::<Value>().await else {
                continue;
            };
            let leader = jsz["account_details"][0]["stream_detail"][0]["cluster"]["leader"]
                .as_str()
                .and_then(|l| l.strip_prefix("nats-"))
                .and_then(|l| l.parse().ok());
            if leader.is_some() {
                return leader;
            }
        }
        None
    })
    .await
}

/// A projector that owns partitions of the projection now.
async fn projection_owner(cluster: &Cluster, http: &Client) -> &'static str {
    eventually(Duration::from_secs(30), "a projection owner", || async {
        for name in ["projector-1", "projector-2"] {
            let url = format!("{}/health", cluster.process_url(name));
            let Ok(r) = http.get(url).timeout(Duration::from_secs(2)).send().await else {
                continue;
            };
            let Ok(health) = r.json::<Value>().await else {
                continue;
            };
            if health["checks"]["projector"]["lease"] == "owner" {
                return Some(name);
            }
        }
        None
    })
    .await
}

/// Runs `scripts/cluster.sh restart NAME` off the async threads.
async fn restart(cluster: &Arc<Cluster>, history: &History, name: &str) {
    let c = cluster.clone();
    let n = name.to_owned();
    tokio::task::spawn_blocking(move || c.restart(&n))
        .await
        .expect("restart task");
    history.record(json!({"fault": "restarted", "process": name}));
}

/// The faults, one after another, each while the writers write.
async fn inject_faults(cluster: Arc<Cluster>, history: Arc<History>, http: Client) {
    let settle = Duration::from_secs(2);
    tokio::time::sleep(settle).await;

    // The stream's leader dies: an election, and appends in flight lose
    // their acks.
    let leader = stream_leader(&cluster, &http).await;
    let killed = format!("nats-{leader}");
    history.record(json!({"fault": "kill -9", "process": killed, "role": "stream leader"}));
    cluster.kill(&killed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    restart(&cluster, &history, &killed).await;
    tokio::time::sleep(settle).await;

    history.record(json!({"fault": "kill -9", "process": "command-api-1"}));
    cluster.kill("command-api-1");
    tokio::time::sleep(settle).await;
    restart(&cluster, &history, "command-api-1").await;
    tokio::time::sleep(settle).await;

    let owner = projection_owner(&cluster, &http).await;
    history.record(json!({"fault": "kill -9", "process": owner, "role": "projection owner"}));
    cluster.kill(owner);
    tokio::time::sleep(settle).await;
    restart(&cluster, &history, owner).await;
    tokio::time::sleep(settle).await;

    // Another node freezes: its connections stay open, nothing answers.
    let leader = stream_leader(&cluster, &http).await;
    let frozen = format!("nats-{}", if leader == 1 { 2 } else { 1 });
    history.record(json!({"fault": "SIGSTOP", "process": frozen}));
    cluster.pause(&frozen);
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.resume(&frozen);
    history.record(json!({"fault": "SIGCONT", "process": frozen}));
    tokio::time::sleep(settle).await;
}

/// How many write attempts were answered with an error or not at all (the
/// faults did bite), from the history.
fn retried_attempts(history: &std::path::Path) -> usize {
    std::fs::read_to_string(history)
        .expect("history")
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["attempt"].is_u64() && e["status"].as_u64().is_none_or(|s| s >= 300))
        .count()
}

/// Folds an agent's events (types and data, oldest first) into the fields
/// its read model shows, with its version.
fn fold(events: &[(String, Value)]) -> Value {
    let mut agent = json!({});
    for (event_type, data) in events {
        match event_type.as_str() {
            "agent.created" | "agent.updated" => {
                for (k, v) in data.as_object().expect("event data") {
                    agent[k] = v.clone();
                }
            }
            other => panic!("unexpected event {other}"),
        }
    }
    agent["version"] = json!(events.len());
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_acknowledged_is_lost_or_doubled_under_node_and_process_faults() {
    let work =
        std::env::temp_dir().join(format!("ymera-cluster-faults-{}", Uuid::now_v7().simple()));
    std::fs::create_dir_all(&work).expect("work dir");
    let history = Arc::new(History::new(work.join("history.jsonl")));
    // Shown with the output of a failing run, whatever failed.
    eprintln!("history: {}", history.path.display());
    let cluster = Arc::new(Cluster::up(&work));
    let history_path = history.path.display().to_string();
    history.record(json!({"cluster": cluster.url, "work": work}));

    let http = Client::builder()
        .timeout(Duration::from_secs(35))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .expect("http client");
    let token = {
        let r = http
            .post(format!("{}/api/v1/auth/login", cluster.url))
            .json(&json!({"username": cluster.admin_username, "password": cluster.admin_password}))
            .send()
            .await
            .expect("login");
        assert_eq!(r.status(), 200, "login");
        r.json::<Value>().await.expect("token")["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned()
    };

    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let stop = CancellationToken::new();
    let writers: Vec<_> = (0..WRITERS)
        .map(|id| {
            let writer = Writer {
                id,
                http: http.clone(),
                url: cluster.url.clone(),
                token: token.clone(),
                history: history.clone(),
                outcomes: outcomes.clone(),
            };
            tokio::spawn(writer.run(stop.clone()))
        })
        .collect();
    inject_faults(cluster.clone(), history.clone(), http.clone()).await;
    stop.cancel();
    for w in writers {
        w.await.expect("writer");
    }
    history.record(json!({"writers": "stopped"}));

    // Every partition of the projection reaches the end of the log.
    let store = cluster.store().await;
    let pool = infra::db::pool(&infra::config::DbConfig::local(&cluster.database_url))
        .expect("cluster database");
    let last = store.last_seq().await.expect("last seq");
    eventually(
        Duration::from_secs(60),
        "every partition's checkpoint at the end of the log",
        || async {
            let partitions = infra::projection::partitions(&pool).await.ok()?;
            (partitions.len() == tests::cluster::PARTITIONS as usize
                && partitions.iter().all(|p| p.checkpoint == last))
            .then_some(())
        },
    )
    .await;

    // The log, whole: each event once, each agent's events in order.
    let mut events: BTreeMap<String, Vec<(String, Value)>> = BTreeMap::new();
    let mut event_ids = HashSet::new();
    let mut seqs = Vec::new();
    let mut reader = store.read_log(1).await.expect("read the log");
    while let Some(message) = reader.next().await {
        let stored = message.expect("stored message").decode().expect("an event");
        assert!(
            event_ids.insert(stored.envelope.event_id),
            "event {} stored twice; history: {history_path}",
            stored.envelope.event_id
        );
        seqs.push(stored.seq as i64);
        events
            .entry(stored.envelope.aggregate_id.to_string())
            .or_default()
            .push((stored.envelope.event_type, stored.envelope.data));
        if stored.seq == last {
            break;
        }
    }

    // The projection applied each of them: an event it skipped (an update
    // whose fields a later one overwrites) could leave the read models
    // equal to the fold, and only a read at the right moment would see it.
    let applied: Vec<i64> = sqlx::query_scalar("SELECT seq FROM events ORDER BY seq")
        .fetch_all(&pool)
        .await
        .expect("the applied events");
    let skipped: Vec<_> = seqs
        .iter()
        .filter(|s| applied.binary_search(s).is_err())
        .collect();
    assert!(
        skipped.is_empty() && applied.len() == seqs.len(),
        "the projection skipped events {skipped:?} ({} applied of {}); history: {history_path}",
        applied.len(),
        seqs.len()
    );

    let outcomes = std::mem::take(&mut *outcomes.lock().expect("outcomes lock"));
    assert!(
        outcomes.stale_reads.is_empty(),
        "reads at a write's X-Event-Seq missed it: {:?}; history: {history_path}",
        outcomes.stale_reads
    );
    let mut latest: HashMap<&str, &Acked> = HashMap::new();
    for acked in &outcomes.acked {
        let entry = latest.entry(acked.agent.as_str()).or_insert(acked);
        if acked.version > entry.version {
            *entry = acked;
        }
    }
    let creates = outcomes.acked.iter().filter(|a| a.version == 1).count();
    assert!(
        creates >= WRITERS,
        "every writer got creates through ({creates}); history: {history_path}"
    );
    for (agent, acked) in &latest {
        let stored = events.get(*agent).unwrap_or_else(|| {
            panic!("acknowledged agent {agent} is not in the log; history: {history_path}")
        });
        let created = stored.iter().filter(|(t, _)| t == "agent.created").count();
        assert_eq!(
            created, 1,
            "agent {agent} created {created} times; history: {history_path}"
        );
        assert!(
            stored.len() as u64 >= acked.version,
            "agent {agent}: {} events in the log, version {} acknowledged; history: {history_path}",
            stored.len(),
            acked.version
        );
    }
    // Each agent in the log (acknowledged or not) once in the read model,
    // equal to the fold of its events.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM agents")
        .fetch_one(&pool)
        .await
        .expect("count agents");
    assert_eq!(
        rows as usize,
        events.len(),
        "one read-model row per agent; history: {history_path}"
    );
    for (agent, stored) in &events {
        let expected = fold(stored);
        let r = http
            .get(format!("{}/api/v1/agents/{agent}", cluster.url))
            .bearer_auth(&token)
            .header("x-min-event-seq", last.to_string())
            .send()
            .await
            .expect("read agent");
        assert_eq!(
            r.status(),
            200,
            "agent {agent} readable; history: {history_path}"
        );
        let read: Value = r.json().await.expect("agent json");
        for (field, value) in expected.as_object().expect("folded agent") {
            assert_eq!(
                &read[field], value,
                "agent {agent}: read model's {field} differs from the fold of its events; history: {history_path}"
            );
        }
        if let Some(acked) = latest.get(agent.as_str()) {
            assert!(read["version"].as_u64() >= Some(acked.version));
            if read["version"].as_u64() == Some(acked.version) {
                assert_eq!(read["description"], acked.description);
            }
        }
    }
    let verdict = json!({
        "verdict": "ok", "acked": outcomes.acked.len(), "agents": events.len(),
        "unknown_creates": outcomes.unknown_creates, "last_seq": last,
        "retried_attempts": retried_attempts(&history.path),
    });
    history.record(verdict.clone());
    println!("{verdict}");
    drop(cluster);
    let _ = std::fs::remove_dir_all(&work);
}
