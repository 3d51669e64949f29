//! The write side: takes commands over HTTP, decides them against aggregate
//! state rebuilt from the event log (and cached), and appends the resulting
//! events to JetStream. Also login and user management.
//!
//! Handlers are thin: extract, build the command, call the service, map the
//! result. The log decides and answers: no read model is consulted for a
//! decision or an answer. The write model (`repo`, `service`) fails with
//! its own `WriteError`, which becomes an HTTP problem only at the edge.

pub mod accounts;
pub mod agents;
pub mod error;
pub mod idempotency;
mod keyed;
pub mod projects;
pub mod repo;
pub mod service;
mod update_body;
pub mod users;
mod verdicts;
mod write_request;
mod write_response;

use std::sync::Arc;

use axum::extract::FromRef;
use infra::EventStore;
use infra::auth::Auth;
use infra::config::HttpConfig;
use infra::http::ratelimit::Limits;
use sqlx::PgPool;
use sqlx::migrate::{MigrateError, Migrator};
use utoipa_axum::router::OpenApiRouter;

/// Everything the write handlers need; cheap to clone.
#[derive(Debug, Clone)]
pub struct CommandState {
    pub commands: Arc<service::Commands>,
    pub pool: PgPool,
    pub auth: Arc<Auth>,
    pub http: Arc<HttpConfig>,
    pub limits: Arc<Limits>,
}

impl CommandState {
    pub fn new(
        store: EventStore,
        pool: PgPool,
        auth: Arc<Auth>,
        http: Arc<HttpConfig>,
        limits: Arc<Limits>,
    ) -> Self {
        let commands = service::Commands::new(store);
        CommandState {
            commands: Arc::new(commands),
            pool,
            auth,
            http,
            limits,
        }
    }
}

impl FromRef<CommandState> for Arc<Auth> {
    fn from_ref(s: &CommandState) -> Self {
        s.auth.clone()
    }
}

/// The write side's own tables (users, idempotency keys). They are not
/// derived from the log, so they live in the core schema, not with the
/// disposable read models.
static MIGRATIONS: Migrator = sqlx::migrate!("./migrations");

/// Applies the write side's migrations into the core schema.
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    infra::db::migrate_schema(pool, &MIGRATIONS, infra::db::CORE_SCHEMA).await
}

/// The write routes, relative to `/api/v1`.
pub fn router(state: CommandState) -> OpenApiRouter {
    routes(state.http.bulk_body_limit)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            idempotency::idempotency,
        ))
        .with_state(state)
}

/// The write side's part of the OpenAPI spec, relative to `/api/v1`: the
/// same whichever roles a process plays, so every process can serve the
/// whole spec.
pub fn spec() -> utoipa::openapi::OpenApi {
    // The bulk body limit shapes no part of the spec.
    routes(0).into_openapi()
}

fn routes(bulk_body_limit: usize) -> OpenApiRouter<CommandState> {
    OpenApiRouter::new()
        .merge(agents::router(bulk_body_limit))
        .merge(projects::router())
        .merge(users::router())
}
