//! The end-to-end test harness: every test gets its own PostgreSQL database,
//! its own JetStream stream and subject prefix, and its own port, against
//! the real servers that `scripts/setup.sh` starts. Nothing is mocked.
//!
//! Servers are found through `YMERA_TEST_NATS_URL` and
//! `YMERA_TEST_DATABASE_URL` (a role allowed to create databases), which
//! `scripts/test.sh` sets; the defaults match `scripts/setup.sh`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use infra::auth::Role as UserRole;
use infra::config::{AuthConfig, DbConfig, HttpConfig, NatsConfig, SearchConfig};
use projector::progress::Reporter;
use projector::rebuild::{self, Until};
use reqwest::{Method, RequestBuilder, Response};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use ymera::{Deps, Role, Running, Settings};

pub use ymera;

pub mod cluster;
pub mod faults;
pub mod nats;
pub mod process;
pub mod proxy;
pub mod seed;

pub const ADMIN_PASSWORD: &str = "admin-password-for-tests";
pub const JWT_SECRET: &str = "a-test-secret-that-is-long-enough-0123456789";
/// The stream's consumers while a `TestApp` runs and no client listens:
/// the projector's subscription, the detacher's (projector::detach) and the
/// search index's reader, each for as long as the process runs.
pub const BACKGROUND_CONSUMERS: usize = 3;

pub fn nats_url() -> String {
    std::env::var("YMERA_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

pub fn admin_database_url() -> String {
    std::env::var("YMERA_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://ymera:ymera@127.0.0.1:5432/ymera".into())
}

/// A fresh, isolated place for one test: a database, a stream and a prefix
/// of its own.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub id: String,
    pub settings: Settings,
    _cleanup: Arc<Cleanup>,
}

/// Drops the sandbox's stream and database when the last handle on it goes,
/// so repeated local runs do not pile them up. Best effort: a test that
/// aborts leaves them, and `scripts/test.sh` sweeps databases at start.
#[derive(Debug)]
struct Cleanup {
    stream: String,
    database: String,
    search_root: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.search_root);
        let stream = self.stream.clone();
        let database = self.database.clone();
        let worker = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(client) = async_nats::connect(nats_url()).await {
                    let _ = async_nats::jetstream::new(client)
                        .delete_stream(&stream)
                        .await;
                }
                if let Ok(admin) = sqlx::PgPool::connect(&admin_database_url()).await {
                    let sql = format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&admin).await;
                }
            });
        });
        let _ = worker.join();
    }
}

impl Sandbox {
    /// Creates the database; the stream is made by the first process that
    /// connects.
    pub async fn new() -> Sandbox {
        let id = Uuid::now_v7().simple().to_string();
        let id = id[id.len() - 12..].to_owned();
        let db_name = format!("ymera_test_{id}");
        let admin = sqlx::PgPool::connect(&admin_database_url())
            .await
            .expect("connect to PostgreSQL");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let db_url = url_with_database(&admin_database_url(), &db_name);
        let mut http = HttpConfig::local();
        http.min_seq_wait_ms = 5_000;
        let settings = Settings {
            nats: NatsConfig::local(nats_url(), format!("T_{id}"), format!("t_{id}")),
            db: DbConfig::local(db_url),
            auth: AuthConfig {
                jwt_secret: Some(SecretString::from(JWT_SECRET)),
                jwt_ttl_secs: 600,
                jwt_issuer: "ymera".into(),
                jwt_audience: "ymera-api".into(),
                admin_username: "admin".into(),
                admin_password: Some(SecretString::from(ADMIN_PASSWORD)),
                dev: false,
            },
            http,
            search: SearchConfig {
                search_dir: std::env::temp_dir().join(format!("ymera-search-{id}")),
            },
        };
        let cleanup = Arc::new(Cleanup {
            stream: settings.nats.stream.clone(),
            database: db_name,
            search_root: settings.search.search_dir.clone(),
        });
        Sandbox {
            id,
            settings,
            _cleanup: cleanup,
        }
    }

    /// The same sandbox, reached through proxies that can cut NATS and
    /// PostgreSQL off: `(sandbox, nats, postgres)`.
    pub async fn behind_proxies(&self) -> (Sandbox, proxy::Proxy, proxy::Proxy) {
        let nats = proxy::Proxy::start(proxy::host_port(&self.settings.nats.nats_url)).await;
        let pg = proxy::Proxy::start(proxy::host_port(&self.settings.db.database_url)).await;
        let mut sandbox = self.clone();
        sandbox.settings.nats.nats_url =
            proxy::with_host_port(&self.settings.nats.nats_url, nats.addr);
        sandbox.settings.db.database_url =
            proxy::with_host_port(&self.settings.db.database_url, pg.addr);
        (sandbox, nats, pg)
    }

    /// A search index directory no process uses yet, removed with the
    /// sandbox.
    pub fn fresh_search_dir(&self) -> std::path::PathBuf {
        self.settings
            .search
            .search_dir
            .join(Uuid::now_v7().simple().to_string())
    }

    /// Starts a process playing `role` on a free port.
    pub async fn start(&self, role: Role) -> TestApp {
        self.start_with(role, &self.settings).await
    }

    /// Starts a process with adjusted settings (same database and stream).
    ///
    /// The sandbox's `search_dir` is the root of its processes' search
    /// indexes: a process started with it gets a fresh directory of its own
    /// below it (each query process needs its own index). Settings that
    /// name another directory (a test that restarts a process on its
    /// index) are used as given.
    pub async fn start_with(&self, role: Role, settings: &Settings) -> TestApp {
        let mut settings = settings.clone();
        if settings.search.search_dir == self.settings.search.search_dir {
            settings.search.search_dir = self.fresh_search_dir();
        }
        let settings = &settings;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let shutdown = CancellationToken::new();
        let running = ymera::start(role, settings, listener, shutdown.clone())
            .await
            .expect("start ymera");
        let base = format!("http://{}", running.addr);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        let deps = running.deps.clone();
        TestApp {
            base,
            client,
            deps,
            shutdown,
            running: Some(running),
            sandbox: self.clone(),
        }
    }
}

/// `postgres://u:p@h:port/db?x` with the database replaced.
pub(crate) fn url_with_database(url: &str, db: &str) -> String {
    let (head, query) = url
        .split_once('?')
        .map_or((url, None), |(h, q)| (h, Some(q)));
    let authority_start = head.find("//").map_or(0, |i| i + 2);
    let slash = match head.rfind('/') {
        Some(i) if i >= authority_start => i,
        _ => return format!("{head}/{db}"),
    };
    let mut out = format!("{}/{db}", &head[..slash]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// One running `ymera` process inside a test, with an HTTP client for it.
#[derive(Debug)]
pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub deps: Deps,
    pub shutdown: CancellationToken,
    pub running: Option<Running>,
    pub sandbox: Sandbox,
}

impl TestApp {
    /// A sandbox and one all-in-one process in it.
    pub async fn spawn() -> TestApp {
        Sandbox::new().await.start(Role::All).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn request(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let r = self.client.request(method, self.url(path));
        match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    pub async fn login(&self, username: &str, password: &str) -> String {
        let r = self
            .request(Method::POST, "/api/v1/auth/login", None)
            .json(&json!({ "username": username, "password": password }))
            .send()
            .await
            .expect("login request");
        assert_eq!(r.status(), 200, "login as {username}");
        let body: Value = r.json().await.expect("login body");
        body["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned()
    }

    pub async fn admin_token(&self) -> String {
        self.login("admin", ADMIN_PASSWORD).await
    }

    /// A token for a new user with `role`, made through the API.
    pub async fn token_for(&self, role: UserRole) -> String {
        let admin = self.admin_token().await;
        let username = format!(
            "{}-{}",
            role.as_str(),
            &Uuid::now_v7().simple().to_string()[20..]
        );
        let password = "a-long-enough-password";
        let r = self
            .request(Method::POST, "/api/v1/users", Some(&admin))
            .json(&json!({ "username": username, "password": password, "role": role.as_str() }))
            .send()
            .await
            .expect("create user");
        assert_eq!(r.status(), 201, "create {role:?} user");
        self.login(&username, password).await
    }

    pub async fn create_agent(&self, token: &str, body: Value) -> Response {
        self.request(Method::POST, "/api/v1/agents", Some(token))
            .json(&body)
            .send()
            .await
            .expect("POST /agents")
    }

    /// `POST /agents` of `body`, which must succeed (201): the new
    /// agent's id and the event's sequence.
    pub async fn create_agent_seq(&self, token: &str, body: Value) -> (String, u64) {
        let r = self.create_agent(token, body).await;
        assert_eq!(r.status(), 201, "create");
        let seq = header_u64(&r, "x-event-seq");
        let id = r.json::<Value>().await.expect("the created agent")["id"]
            .as_str()
            .expect("its id")
            .to_owned();
        (id, seq)
    }

    /// `PUT /agents/{id}` with `body`, which must succeed: the event's
    /// sequence.
    pub async fn update_agent(&self, token: &str, id: &str, body: Value) -> u64 {
        let r = self
            .request(Method::PUT, &format!("/api/v1/agents/{id}"), Some(token))
            .json(&body)
            .send()
            .await
            .expect("PUT /agents/{id}");
        assert_eq!(r.status(), 200, "update of {id}");
        header_u64(&r, "x-event-seq")
    }

    /// `POST /agents/bulk` of `agents`, which must succeed (201); the
    /// created ids, in order.
    pub async fn bulk_create(&self, token: &str, agents: Vec<Value>) -> Vec<String> {
        let r = self
            .request(Method::POST, "/api/v1/agents/bulk", Some(token))
            .json(&json!({ "agents": agents }))
            .send()
            .await
            .expect("POST /agents/bulk");
        assert_eq!(r.status(), 201, "bulk create");
        let body: Value = r.json().await.expect("bulk body");
        body["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|a| a["id"].as_str().expect("id").to_owned())
            .collect()
    }

    /// The types and data of an agent's events in the log, oldest first.
    pub async fn agent_events(&self, id: &str) -> Vec<(String, Value)> {
        let id = id.parse().expect("an agent id");
        let subject = self.deps.store.subject(events::AggregateType::Agent, id);
        let (events, _) = self
            .deps
            .store
            .load(&subject)
            .await
            .expect("load the agent");
        events
            .into_iter()
            .map(|e| (e.envelope.event_type, e.envelope.data))
            .collect()
    }

    /// `GET path` once the projection has reached `min_seq`
    /// (`X-Min-Event-Seq`).
    pub async fn read_at(&self, path: &str, token: &str, min_seq: u64) -> Response {
        self.request(Method::GET, path, Some(token))
            .header("x-min-event-seq", min_seq.to_string())
            .send()
            .await
            .expect("GET at a sequence")
    }

    /// The stream's last sequence, straight from JetStream.
    /// Writes five agents (`a0` to `a4`), waits for the projection, then
    /// renames `a3` to `tampered` in the live read model behind the
    /// projector's back: read models a rebuild must find wrong.
    pub async fn tamper_with_the_read_model(&self) {
        let token = self.admin_token().await;
        for i in 0..5 {
            self.create_agent(&token, agent_body(&format!("a{i}")))
                .await;
        }
        self.settled(&token).await;
        sqlx::query("UPDATE agents SET name = 'tampered' WHERE name = 'a3'")
            .execute(&self.deps.pool)
            .await
            .expect("tamper with the read model");
    }

    /// Waits until the projection has applied every event appended so far.
    pub async fn settled(&self, token: &str) {
        let last = self.last_seq().await;
        let r = self.read_at("/api/v1/agents?limit=1", token, last).await;
        assert_eq!(r.status(), 200, "the projection catches up");
    }

    pub async fn last_seq(&self) -> u64 {
        self.deps.store.last_seq().await.expect("stream state")
    }

    /// The sample `series` (a metric's name, with its labels if it has
    /// any) of this process's Prometheus scrape; `None` when it has not
    /// been recorded.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self
            .request(Method::GET, "/metrics", None)
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("the scrape");
        text.lines()
            .filter_map(|l| l.rsplit_once(' '))
            .find(|(s, _)| *s == series)
            .map(|(_, v)| v.parse().expect("a sample value"))
    }

    /// Waits, at most `deadline`, until the live projection has applied
    /// exactly up to event `seq`.
    pub async fn caught_up_to(&self, seq: u64, deadline: Duration) {
        eventually(deadline, "the projection to catch up", || async {
            let cp = infra::projection::checkpoint(&self.deps.pool).await.ok()?;
            (cp == seq).then_some(())
        })
        .await;
    }

    /// Inserts `count` agents straight into the read model (no events),
    /// each with a description of `description_chars` characters: for
    /// tests that need many rows to read, fast.
    pub async fn seed_read_model_agents(&self, count: u32, description_chars: u32) {
        sqlx::query(
            "INSERT INTO agents (id, name, type, description, status, capabilities, config, tags, \
               project_id, version, created_at, updated_at, created_by, last_seq) \
             SELECT gen_random_uuid(), 'agent ' || i, 'llm', repeat('x', $2), 'active', \
               ARRAY['all'], '{}'::jsonb, '{}'::jsonb, NULL, 1, now(), now(), 'seed', 0 \
             FROM generate_series(1, $1) AS i",
        )
        .bind(count as i32)
        .bind(description_chars as i32)
        .execute(&self.deps.pool)
        .await
        .expect("seed the read model");
    }

    /// Sessions of the sandbox's database sitting idle inside a
    /// transaction: what an export, or anything else, left open.
    pub async fn transactions_left_open(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND state LIKE 'idle in transaction%'",
        )
        .fetch_one(&self.deps.pool)
        .await
        .expect("pg_stat_activity")
    }

    /// The checksums of the live read models, and of a fresh replay of the
    /// whole log into `schema`: equal when the live models are exactly a
    /// fold of the log.
    pub async fn live_and_replayed(
        &self,
        schema: &str,
    ) -> (Vec<rebuild::TableCheck>, Vec<rebuild::TableCheck>) {
        let db = &self.sandbox.settings.db;
        rebuild::replay(
            &self.deps.store,
            db,
            &self.deps.pool,
            schema,
            Until::End,
            &Reporter::silent(),
        )
        .await
        .expect("replay the log");
        let mut conn = self.deps.pool.acquire().await.expect("a connection");
        let live = rebuild::checksums(&mut conn, infra::db::READ_SCHEMA).await;
        let replayed = rebuild::checksums(&mut conn, schema).await;
        (
            live.expect("live checksums"),
            replayed.expect("replayed checksums"),
        )
    }

    /// `GET /agents/search` with `query`, once the search index has
    /// applied `min_seq`: must answer 200; the page.
    pub async fn search(&self, token: &str, query: &[(&str, &str)], min_seq: u64) -> Value {
        let r = self
            .request(Method::GET, "/api/v1/agents/search", Some(token))
            .query(query)
            .header("x-min-event-seq", min_seq.to_string())
            .send()
            .await
            .expect("GET /agents/search");
        assert_eq!(r.status(), 200, "search {query:?}");
        assert!(header_u64(&r, "x-projection-seq") >= min_seq);
        r.json().await.expect("a search page")
    }

    /// The JSON body of `GET path` without a token (the operational
    /// routes), whatever the status.
    pub async fn get_json(&self, path: &str) -> Value {
        self.request(Method::GET, path, None)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// Stops the process gracefully and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(r) = self.running.take() {
            r.join().await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Extracts a header as a string.
pub fn header(r: &Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A header parsed as an integer; panics with the header name when absent.
pub fn header_u64(r: &Response, name: &str) -> u64 {
    header(r, name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .parse()
        .expect("integer header")
}

/// Polls `check` until it yields `Some`, failing the test after `deadline`.
/// For conditions that have no event to wait on; never a fixed sleep.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// The names of a page's items.
pub fn names(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|a| a["name"].as_str().expect("a name").to_owned())
        .collect()
}

/// A minimal valid agent body.
pub fn agent_body(name: &str) -> Value {
    json!({ "name": name, "type": "llm" })
}

#[cfg(test)]
mod tests {
    use super::url_with_database;

    #[test]
    fn database_is_swapped_in_urls() {
        assert_eq!(
            url_with_database("postgres://u:p@h:5432/ymera", "t1"),
            "postgres://u:p@h:5432/t1"
        );
        assert_eq!(
            url_with_database("postgres://u:p@h/ymera?sslmode=disable", "t1"),
            "postgres://u:p@h/t1?sslmode=disable"
        );
        assert_eq!(
            url_with_database("postgres://u:p@h", "t1"),
            "postgres://u:p@h/t1"
        );
    }
}
