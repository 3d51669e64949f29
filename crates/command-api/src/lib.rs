//! The write side: takes commands over HTTP, decides them against aggregate
//! state rebuilt from the event log, and appends the resulting events to
//! JetStream. Also login and user management.
//!
//! Handlers are thin: extract, build the command, call the service, map the
//! result. The log decides; no read model is consulted for a write.

pub mod agents;
pub mod service;
pub mod users;

use std::sync::Arc;

use axum::extract::FromRef;
use infra::EventStore;
use infra::auth::Auth;
use infra::config::HttpConfig;
use sqlx::PgPool;
use utoipa_axum::router::OpenApiRouter;

/// Everything the write handlers need; cheap to clone.
#[derive(Debug, Clone)]
pub struct CommandState {
    pub service: Arc<service::AgentService>,
    pub pool: PgPool,
    pub auth: Arc<Auth>,
    pub http: Arc<HttpConfig>,
}

impl CommandState {
    pub fn new(store: EventStore, pool: PgPool, auth: Arc<Auth>, http: Arc<HttpConfig>) -> Self {
        CommandState {
            service: Arc::new(service::AgentService::new(store)),
            pool,
            auth,
            http,
        }
    }
}

impl FromRef<CommandState> for Arc<Auth> {
    fn from_ref(s: &CommandState) -> Self {
        s.auth.clone()
    }
}

/// The write routes, relative to `/api/v1`.
pub fn router(state: CommandState) -> OpenApiRouter {
    OpenApiRouter::new()
        .merge(agents::router())
        .merge(users::router())
        .with_state(state)
}
