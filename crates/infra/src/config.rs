//! Configuration shared by every role, from flags or `YMERA_*` environment
//! variables. Each group is a `clap::Args` so roles take only what they use,
//! and tests build them directly as plain structs.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;

/// Where the event log lives and how the stream is provisioned.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsConfig {
    /// NATS server URL (JetStream must be enabled), or the URLs of a
    /// cluster's nodes separated by commas.
    #[arg(long, env = "YMERA_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Name of the JetStream stream that holds the event log.
    #[arg(long, env = "YMERA_STREAM", default_value = "YMERA")]
    pub stream: String,
    /// Subject prefix: events live under `<prefix>.<aggregate>.<id>` (and
    /// a partition token after it on a split log).
    #[arg(long, env = "YMERA_SUBJECT_PREFIX", default_value = "ymera")]
    pub subject_prefix: String,
    /// Stream replicas: 1 on a single server; 3 on a cluster survives the
    /// loss of a machine.
    #[arg(long, env = "YMERA_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,
    /// `file` keeps the log across server restarts; `memory` is for
    /// throwaway runs only.
    #[arg(long, env = "YMERA_STREAM_STORAGE", default_value = "file")]
    pub stream_storage: StreamStorage,
    /// How long JetStream remembers a `Nats-Msg-Id` to drop duplicates, in
    /// seconds.
    #[arg(long, env = "YMERA_DUPLICATE_WINDOW_SECS", default_value_t = 120)]
    pub duplicate_window_secs: u64,
    /// How long an append waits for JetStream's ack before answering 503, in
    /// milliseconds.
    #[arg(long, env = "YMERA_NATS_TIMEOUT_MS", default_value_t = 1_000)]
    pub request_timeout_ms: u64,
    /// How many partitions the log and its projection are split into, by a
    /// hash of the aggregate id: the partition is the last token of every
    /// event's subject, and projectors share the partitions, one owner
    /// each. Recorded in the stream when it is made: every process of every
    /// role must be given the stream's value, or it refuses to start (1 to
    /// 64).
    #[arg(long, env = "YMERA_PARTITIONS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::projection::MAX_PARTITIONS)))]
    pub partitions: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StreamStorage {
    File,
    Memory,
}

impl NatsConfig {
    /// The servers `nats_url` names: one URL, or several separated by
    /// commas (the nodes of a cluster, so that a process starting while
    /// one of them is down still connects).
    pub fn nats_servers(&self) -> Vec<&str> {
        self.nats_url.split(',').map(str::trim).collect()
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// A configuration for `url` with every other setting at its default.
    pub fn local(
        url: impl Into<String>,
        stream: impl Into<String>,
        prefix: impl Into<String>,
    ) -> Self {
        NatsConfig {
            nats_url: url.into(),
            stream: stream.into(),
            subject_prefix: prefix.into(),
            stream_replicas: 1,
            stream_storage: StreamStorage::File,
            duplicate_window_secs: 120,
            request_timeout_ms: 1_000,
            partitions: 1,
        }
    }
}

/// The PostgreSQL database that holds the read models and users.
#[derive(Debug, Clone, clap::Args)]
pub struct DbConfig {
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "YMERA_DATABASE_URL",
        default_value = "postgres://ymera:ymera@127.0.0.1:5432/ymera"
    )]
    pub database_url: String,
    /// Most connections this process keeps open.
    #[arg(long, env = "YMERA_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
    /// How long to wait for a free connection before answering 503, in
    /// milliseconds.
    #[arg(long, env = "YMERA_DB_ACQUIRE_TIMEOUT_MS", default_value_t = 1_000)]
    pub db_acquire_timeout_ms: u64,
    /// How long a starting process or a command waits for PostgreSQL to
    /// answer before it gives up (`ymera` then exits with code 3), in
    /// seconds.
    #[arg(long, env = "YMERA_DB_WAIT_SECS", default_value_t = 60)]
    pub db_wait_secs: u64,
}

impl DbConfig {
    pub fn local(url: impl Into<String>) -> Self {
        DbConfig {
            database_url: url.into(),
            db_max_connections: 16,
            db_acquire_timeout_ms: 1_000,
            db_wait_secs: 60,
        }
    }

    /// How long to wait for PostgreSQL to answer at start.
    pub fn wait(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.db_wait_secs)
    }
}

/// Tokens, passwords and the first admin.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthConfig {
    /// Secret for signing HS256 tokens; at least 32 bytes. Required unless
    /// `--dev`, where a random one is made for the process.
    #[arg(long, env = "YMERA_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<SecretString>,
    /// Token lifetime in seconds.
    #[arg(long, env = "YMERA_JWT_TTL_SECS", default_value_t = 3_600)]
    pub jwt_ttl_secs: u64,
    /// The `iss` claim issued and required.
    #[arg(long, env = "YMERA_JWT_ISSUER", default_value = "ymera")]
    pub jwt_issuer: String,
    /// The `aud` claim issued and required.
    #[arg(long, env = "YMERA_JWT_AUDIENCE", default_value = "ymera-api")]
    pub jwt_audience: String,
    /// Username of the admin created when no user exists yet.
    #[arg(long, env = "YMERA_ADMIN_USERNAME", default_value = "admin")]
    pub admin_username: String,
    /// Password of that first admin. In `--dev` mode, when unset, one is
    /// generated and printed once.
    #[arg(long, env = "YMERA_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<SecretString>,
    /// Development mode: generate the JWT secret and the first admin's
    /// password when they are not given. Never for production.
    #[arg(long, env = "YMERA_DEV", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    pub dev: bool,
}

/// The methods CORS allows unless configured: every one the API has.
const CORS_METHODS: &str = "GET,POST,PUT,DELETE";
/// The request headers CORS allows unless configured: every one the API
/// reads.
const CORS_HEADERS: &str = "authorization,content-type,if-match,if-none-match,idempotency-key,\
                            x-request-id,x-min-event-seq,last-event-id,traceparent,tracestate,baggage";

/// Where a query process keeps its search index.
#[derive(Debug, Clone, clap::Args)]
pub struct SearchConfig {
    /// The search index's directory: each query process needs its own. It
    /// is rebuilt from the log when missing, of another version or of
    /// another stream, and resumed from its checkpoint otherwise.
    #[arg(long, env = "YMERA_SEARCH_DIR", default_value = ".data/search")]
    pub search_dir: std::path::PathBuf,
}

/// How the HTTP side listens and what it accepts.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpConfig {
    /// Address to listen on.
    #[arg(long, env = "YMERA_BIND", default_value = "127.0.0.1:8000")]
    pub bind: SocketAddr,
    /// Largest request body in bytes (bulk requests have their own limit).
    #[arg(long, env = "YMERA_BODY_LIMIT", default_value_t = 1024 * 1024)]
    pub body_limit: usize,
    /// Largest bulk request body in bytes.
    #[arg(long, env = "YMERA_BULK_BODY_LIMIT", default_value_t = 16 * 1024 * 1024)]
    pub bulk_body_limit: usize,
    /// Non-streaming requests taking longer are answered 503, in seconds.
    #[arg(long, env = "YMERA_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub request_timeout_secs: u64,
    /// How long a read with `X-Min-Event-Seq` waits for the projection, in
    /// milliseconds, before answering 503.
    #[arg(long, env = "YMERA_MIN_SEQ_WAIT_MS", default_value_t = 5_000)]
    pub min_seq_wait_ms: u64,
    /// Projector lag (events) past which `/health` says `degraded`.
    #[arg(long, env = "YMERA_DEGRADED_LAG_EVENTS", default_value_t = 10_000)]
    pub degraded_lag_events: u64,
    /// Most live-feed clients (WebSocket and SSE together); more get 503.
    #[arg(long, env = "YMERA_LIVE_MAX_CONNECTIONS", default_value_t = 1_000)]
    pub live_max_connections: usize,
    /// How many events a live-feed client may fall behind before it is
    /// disconnected as too slow. This bounds the memory a slow client costs.
    #[arg(long, env = "YMERA_LIVE_BUFFER", default_value_t = 1_024)]
    pub live_buffer: usize,
    /// Seconds between server pings on the live feed; a client that does
    /// not answer two in a row is dropped.
    #[arg(long, env = "YMERA_LIVE_PING_SECS", default_value_t = 15)]
    pub live_ping_secs: u64,
    /// Most exports (`GET /agents/export`) running at once (at least 1);
    /// more get 503 with `Retry-After`. Exports use a database pool of this
    /// many connections of their own, on top of `YMERA_DB_MAX_CONNECTIONS`,
    /// so a slow download never holds a connection the reads or the
    /// projector need.
    #[arg(long, env = "YMERA_EXPORT_MAX_CONCURRENT", default_value_t = 4)]
    pub export_max_concurrent: u32,
    /// How long an export waits for its client to take the next chunk, in
    /// milliseconds, before it gives up: its transaction and connection are
    /// released and the response is cut off (a truncated download, never
    /// one that looks complete).
    #[arg(long, env = "YMERA_EXPORT_STALL_TIMEOUT_MS", default_value_t = 30_000)]
    pub export_stall_timeout_ms: u64,
    /// Requests per second each user may make to the API, sustained
    /// (bursts of twice that are allowed), whichever of their tokens they
    /// use. 0 turns the limit off.
    #[arg(long, env = "YMERA_RATE_LIMIT_PER_USER", default_value_t = 1_000)]
    pub rate_limit_per_user: u32,
    /// Requests per second each client address may make without a valid
    /// token. 0 turns the limit off.
    #[arg(long, env = "YMERA_RATE_LIMIT_PER_IP", default_value_t = 100)]
    pub rate_limit_per_ip: u32,
    /// Login attempts per minute, per username and per client address.
    #[arg(long, env = "YMERA_LOGIN_ATTEMPTS_PER_MINUTE", default_value_t = 60)]
    pub login_attempts_per_minute: u32,
    /// Most keys (tokens, addresses, usernames) each rate limiter remembers;
    /// past it, buckets that have refilled and then the least recently used
    /// are forgotten. About 40 bytes each.
    #[arg(long, env = "YMERA_RATE_LIMIT_MAX_KEYS", default_value_t = 100_000)]
    pub rate_limit_max_keys: usize,
    /// Take the client address for per-address limits from
    /// `X-Forwarded-For`: only behind a reverse proxy that sets it.
    #[arg(long, env = "YMERA_TRUST_FORWARDED_FOR", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    pub trust_forwarded_for: bool,
    /// Origins allowed to call the API from a browser (CORS), comma
    /// separated, or `*` for any. Empty (the default) turns CORS off.
    #[arg(long, env = "YMERA_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Methods CORS allows, comma separated.
    #[arg(
        long,
        env = "YMERA_CORS_METHODS",
        value_delimiter = ',',
        default_value = CORS_METHODS
    )]
    pub cors_methods: Vec<String>,
    /// Request headers CORS allows, comma separated.
    #[arg(
        long,
        env = "YMERA_CORS_HEADERS",
        value_delimiter = ',',
        default_value = CORS_HEADERS
    )]
    pub cors_headers: Vec<String>,
    /// On SIGTERM, how long requests already running (downloads included)
    /// may take to finish, in milliseconds, before they are cut off and
    /// the live feeds closed.
    #[arg(long, env = "YMERA_DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,
}

impl HttpConfig {
    pub fn local() -> Self {
        HttpConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            body_limit: 1024 * 1024,
            bulk_body_limit: 16 * 1024 * 1024,
            request_timeout_secs: 30,
            min_seq_wait_ms: 5_000,
            degraded_lag_events: 10_000,
            live_max_connections: 1_000,
            live_buffer: 1_024,
            live_ping_secs: 15,
            export_max_concurrent: 4,
            export_stall_timeout_ms: 30_000,
            rate_limit_per_user: 1_000,
            rate_limit_per_ip: 100,
            login_attempts_per_minute: 60,
            rate_limit_max_keys: 100_000,
            trust_forwarded_for: false,
            cors_origins: Vec::new(),
            cors_methods: CORS_METHODS.split(',').map(String::from).collect(),
            cors_headers: CORS_HEADERS.split(',').map(String::from).collect(),
            drain_timeout_ms: 10_000,
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }

    pub fn min_seq_wait(&self) -> Duration {
        Duration::from_millis(self.min_seq_wait_ms)
    }

    pub fn export_stall_timeout(&self) -> Duration {
        Duration::from_millis(self.export_stall_timeout_ms)
    }
}
