//! The `ymera` process: wires the roles together. `main.rs` only parses the
//! command line and calls [`run`]; tests call the same functions with their
//! own configuration and a listener on port 0.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::http::{StatusCode, header};
use axum::response::Html;
use axum::routing::get;
use chrono::Utc;
use command_api::CommandState;
use infra::auth::Auth;
use infra::config::{AuthConfig, DbConfig, HttpConfig, NatsConfig, SearchConfig};
use infra::http::drain::{self, Drain};
use infra::http::ops::{self, Needs, Ops};
use infra::http::ratelimit::{self, Limits};
use infra::projection::{Ownership, ProjectionWatch};
use infra::{EventStore, StoreError};
use query_api::QueryState;
use query_api::search::SearchIndex;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_scalar::Scalar;

pub const GIT_SHA: &str = env!("YMERA_GIT_SHA");

/// Which roles a process plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Command API, query API and projector in one process, on one port.
    All,
    Command,
    Query,
    Projector,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Command => "command",
            Role::Query => "query",
            Role::Projector => "projector",
        }
    }

    fn commands(self) -> bool {
        matches!(self, Role::All | Role::Command)
    }

    fn queries(self) -> bool {
        matches!(self, Role::All | Role::Query)
    }

    fn projects(self) -> bool {
        matches!(self, Role::All | Role::Projector)
    }
}

/// Everything a serving process is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub nats: NatsConfig,
    pub db: DbConfig,
    pub auth: AuthConfig,
    pub http: HttpConfig,
    pub search: SearchConfig,
}

/// The connections every role needs, made ready: stream provisioned,
/// database migrated.
#[derive(Debug, Clone)]
pub struct Deps {
    pub store: EventStore,
    pub pool: PgPool,
}

/// A dependency that did not answer in time: nothing can be done without
/// it (`ymera` exits with code 3).
#[derive(Debug)]
pub struct Unreachable(pub &'static str);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is not reachable", self.0)
    }
}

/// Connects to NATS and PostgreSQL and applies every migration.
pub async fn connect(nats: &NatsConfig, db: &DbConfig) -> anyhow::Result<Deps> {
    let pool = infra::db::pool(db).context("bad database URL")?;
    infra::db::wait_ready(&pool, db.wait())
        .await
        .context(Unreachable("PostgreSQL"))?;
    migrate(&pool).await?;
    let store = connect_store(nats).await?;
    Ok(Deps { store, pool })
}

/// Connects to the event store: an error says whether NATS could not be
/// reached or the stream is not this process's to use (another partition
/// count, which no retry helps).
pub async fn connect_store(nats: &NatsConfig) -> anyhow::Result<EventStore> {
    match EventStore::connect(nats).await {
        Ok(store) => Ok(store),
        Err(e @ StoreError::Misconfigured(_)) => Err(e.into()),
        Err(e) => Err(anyhow::Error::new(e).context(Unreachable("NATS JetStream"))),
    }
}

/// Applies every crate's migrations: the write side's tables, then the read
/// models.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    command_api::migrate(pool)
        .await
        .context("migrating the core schema")?;
    projector::migrate(pool)
        .await
        .context("migrating the read models")?;
    Ok(())
}

/// The HTTP application of `role`: its API routes under `/api/v1`, the
/// operational routes at the root and under `/api/v1`, the OpenAPI spec at
/// `/api/v1/openapi.json` and its interactive reference at `/docs` (the
/// whole spec, whatever the role), and the middleware every request
/// passes. `projector` is the ownership of this process's projector, if it
/// runs one; `search` its search index, in a role that serves reads. The
/// app refuses new work once `drain` begins, and its live feeds and exports
/// end when the drain does.
#[allow(clippy::too_many_arguments)] // each is a separate part of the process
pub fn app(
    role: Role,
    deps: &Deps,
    auth: Arc<Auth>,
    http: Arc<HttpConfig>,
    watch: ProjectionWatch,
    projector: Option<Ownership>,
    search: Option<Arc<SearchIndex>>,
    drain: Arc<Drain>,
) -> anyhow::Result<Router> {
    let stopped = drain.stopped().clone();
    let ops_state = Arc::new(Ops {
        store: deps.store.clone(),
        pool: deps.pool.clone(),
        role: role.name(),
        git_sha: GIT_SHA,
        started_at: Utc::now(),
        degraded_lag_events: http.degraded_lag_events,
        projector,
        needs: Needs {
            nats: role.commands() || role.projects(),
            postgres: role.queries() || role.projects(),
        },
        draining: drain.draining().clone(),
        search: search.as_ref().map(|s| s.watch()),
    });
    let limits = Arc::new(Limits::new(auth.clone(), &http));
    let limited = || axum::middleware::from_fn_with_state(limits.clone(), ratelimit::rate_limit);
    // Every route but the streaming ones answers 503 past the request
    // timeout; streams (export) run as long as the client reads.
    let timeout = tower_http::timeout::TimeoutLayer::with_status_code(
        StatusCode::SERVICE_UNAVAILABLE,
        http.request_timeout(),
    );
    let mut api = OpenApiRouter::new().merge(ops::router(ops_state.clone()));
    if role.commands() {
        let state = CommandState::new(
            deps.store.clone(),
            deps.pool.clone(),
            auth.clone(),
            http.clone(),
            limits.clone(),
        );
        api = api.merge(command_api::router(state).layer(limited()));
    }
    let query_state = search.map(|search| QueryState {
        search,
        lookup: query_api::lookup::AgentLookup::spawn(deps.pool.clone()),
        pool: deps.pool.clone(),
        store: deps.store.clone(),
        auth: auth.clone(),
        watch,
        http: http.clone(),
        live: query_api::live::LiveHub::spawn(deps.store.clone(), &http, stopped.clone()),
        exports: Arc::new(query_api::export::Exports::new(
            &deps.pool,
            &http,
            stopped.clone(),
        )),
    });
    if let Some(state) = &query_state {
        api = api.merge(query_api::router(state.clone()).layer(limited()));
    }
    let mut api = api.layer(timeout);
    if let Some(state) = query_state {
        api = api.merge(query_api::streaming_router(state).layer(limited()));
    }
    let api: Router = OpenApiRouter::new().nest("/api/v1", api).into();
    // Rendered once: the spec is the same for the life of the process.
    let spec = spec();
    let docs = Html(
        Scalar::new(spec.clone())
            .title("YMERA API reference")
            .to_html(),
    );
    let spec = (
        [(header::CONTENT_TYPE, "application/json")],
        Bytes::from(serde_json::to_vec(&spec).context("serializing the spec")?),
    );
    let root_ops: Router = ops::router(ops_state).into();
    let scrape = deps.clone();

    let router = Router::new()
        .merge(api)
        .merge(root_ops.layer(timeout))
        .route(
            "/api/v1/openapi.json",
            get(move || async move { spec.clone() }),
        )
        .route("/docs", get(move || async move { docs.clone() }))
        .route("/metrics", get(move || prometheus(scrape.clone())))
        .fallback(infra::http::context::not_found)
        .layer(axum::extract::DefaultBodyLimit::max(http.body_limit))
        .layer(axum::middleware::from_fn_with_state(drain, drain::admit));
    infra::http::edge::layers(router, &http)
}

/// The whole OpenAPI spec: every role's endpoints under `/api/v1`, whichever
/// roles this process plays, so that any process (behind nginx, a query API
/// answers `/api/v1/openapi.json`) documents the whole API.
pub fn spec() -> OpenApi {
    let mut api = ops::spec();
    api.merge(command_api::spec());
    api.merge(query_api::spec());
    let mut spec = base_spec().nest("/api/v1", api);
    document_common_errors(&mut spec);
    spec
}

/// `GET /metrics`: the Prometheus scrape, without auth (api.md); put it
/// behind the network, not a token.
async fn prometheus(deps: Deps) -> impl axum::response::IntoResponse {
    let text = infra::http::snapshot::prometheus(&deps.pool, &deps.store).await;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

/// Adds the error answers every endpoint can give (from the shared
/// middleware and extractors) to each operation that does not list them
/// itself, so the spec says every status a client can see.
fn document_common_errors(spec: &mut OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
    let problem = |description: &str| {
        RefOr::T(
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/problem+json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("Problem")))
                        .build(),
                )
                .build(),
        )
    };
    for item in spec.paths.paths.values_mut() {
        let ops = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
        ];
        for op in ops.into_iter().flatten() {
            let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
            let operational = op
                .tags
                .as_ref()
                .is_some_and(|t| t.iter().any(|t| t == "ops"));
            let has_body = op.request_body.is_some();
            let responses = &mut op.responses.responses;
            let mut add = |code: &str, description: &str| {
                responses
                    .entry(code.to_owned())
                    .or_insert_with(|| problem(description));
            };
            add(
                "400",
                "Malformed request: a bad query parameter, path segment or header",
            );
            add("431", "Request headers too large");
            add(
                "503",
                "A dependency is unreachable, or the projection has not caught up in time",
            );
            if secured {
                add("401", "Missing, malformed or expired token");
                add("403", "The token's role may not do this");
            }
            if !operational {
                add(
                    "429",
                    "Rate limited; see Retry-After and the RateLimit headers",
                );
            }
            if has_body {
                add("413", "Body too large");
                add("415", "Body is not JSON");
                add(
                    "422",
                    "Well-formed but invalid; `errors` names each bad field",
                );
            }
        }
    }
}

fn base_spec() -> OpenApi {
    let mut spec = OpenApi::default();
    spec.info.title = "YMERA API".into();
    spec.info.version = env!("CARGO_PKG_VERSION").into();
    spec.info.description = Some(
        "Event-sourced backend for fleets of AI agents. Errors are application/problem+json \
         (RFC 9457). Writes return X-Event-Seq; reads honour X-Min-Event-Seq and return \
         X-Projection-Seq."
            .into(),
    );
    let components = spec.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .build(),
        ),
    );
    components.schemas.insert(
        "ConfigValue".into(),
        infra::http::schema::config_value().into(),
    );
    spec
}

/// A running process's handles, for tests and for `main`.
#[derive(Debug)]
pub struct Running {
    pub deps: Deps,
    pub auth: Arc<Auth>,
    pub addr: std::net::SocketAddr,
    /// Set when development mode generated the first admin's password.
    pub generated_admin_password: Option<secrecy::SecretString>,
    tasks: tokio::task::JoinSet<()>,
}

impl Running {
    /// Waits for every task (HTTP server, projector) to finish after
    /// shutdown was signalled.
    pub async fn join(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Starts `role` on `listener`: connects, migrates, bootstraps the first
/// admin (write roles), spawns the projector (projector roles) and serves
/// HTTP until `shutdown`, then drains: not ready, new work refused,
/// in-flight requests given up to the drain timeout, then everything
/// stopped.
pub async fn start(
    role: Role,
    settings: &Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let deps = connect(&settings.nats, &settings.db).await?;
    let drain = Drain::spawn(shutdown, settings.http.drain_timeout());
    // What runs for the life of the process stops when the drain ends.
    let stopped = drain.stopped().clone();
    // Every role verifies tokens, so every role follows changes to users.
    let sessions = infra::sessions::Sessions::spawn(deps.pool.clone(), stopped.clone());
    let auth = Arc::new(Auth::from_config(&settings.auth)?.with_sessions(sessions));
    let generated_admin_password = if role.commands() {
        command_api::accounts::bootstrap_admin(&deps.pool, &settings.auth).await?
    } else {
        None
    };
    infra::metrics::spawn_upkeep(stopped.clone());
    let mut tasks = tokio::task::JoinSet::new();
    let ownership = role.projects().then(Ownership::default);
    if let Some(ownership) = &ownership {
        projector::partitions::stand_by(&deps.store, ownership);
        tasks.spawn(projector::partitions::run(
            deps.store.clone(),
            deps.pool.clone(),
            ownership.clone(),
            stopped.clone(),
        ));
        let detacher = projector::detach::Detacher::new(deps.store.clone(), deps.pool.clone());
        tasks.spawn(detacher.run(stopped.clone()));
    }
    let search = if role.queries() {
        let index = Arc::new(
            SearchIndex::open(&settings.search.search_dir, deps.store.stream_name())
                .context("opening the search index")?,
        );
        tasks.spawn(index.clone().run(deps.store.clone(), stopped.clone()));
        Some(index)
    } else {
        None
    };
    let watch = ProjectionWatch::spawn(deps.pool.clone(), stopped.clone());
    let router = app(
        role,
        &deps,
        auth.clone(),
        Arc::new(settings.http.clone()),
        watch,
        ownership,
        search,
        drain,
    )?;
    let addr = listener.local_addr()?;
    tasks.spawn(async move {
        let serving = infra::http::send_timeout::serve(listener, router)
            .with_graceful_shutdown(stopped.clone().cancelled_owned())
            .into_future();
        // Past the drain, connections still open get a moment to send
        // what was cut off (close frames, the end of a stream), no more.
        let closing = async {
            stopped.cancelled().await;
            tokio::time::sleep(CLOSE_GRACE).await;
        };
        tokio::select! {
            served = serving => if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server failed");
            },
            () = closing => tracing::warn!("connections still open after the drain; closing them"),
        }
    });
    tracing::info!(role = role.name(), %addr, stream = deps.store.stream_name(), "ymera is serving");
    Ok(Running {
        deps,
        auth,
        addr,
        generated_admin_password,
        tasks,
    })
}

/// How long connections may stay open once the drain has ended.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
