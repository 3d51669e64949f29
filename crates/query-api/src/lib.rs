//! The read side: every read is served from the PostgreSQL read models,
//! except search, which has an index of its own in each query process
//! ([`search::index`]).
//!
//! Each response says which event sequence its data reflects
//! (`X-Projection-Seq`), read in the same statement as the data, and a
//! reader that needs its own writes sends `X-Min-Event-Seq` (or `?min_seq=`)
//! to be answered only once the projection has got that far.

// One feature each, with its router.
pub mod agents;
pub mod analytics;
pub mod export;
pub mod history;
pub mod live;
pub mod lookup;
pub mod metrics;
pub mod projects;
pub mod search;

// What the features share; these never import a feature.
pub mod conditional;
pub mod filters;
pub mod paging;
pub mod params;
pub mod problems;
pub mod projection;
pub mod rows;

use std::sync::Arc;

use axum::extract::FromRef;
use infra::EventStore;
use infra::auth::Auth;
use infra::config::HttpConfig;
use infra::projection::ProjectionWatch;
use sqlx::PgPool;
use utoipa_axum::router::OpenApiRouter;

/// Everything the read handlers need; cheap to clone.
#[derive(Debug, Clone)]
pub struct QueryState {
    pub pool: PgPool,
    /// The log itself, for what the read models do not keep (per-agent
    /// history, state as of a past time) and for the live feed.
    pub store: EventStore,
    pub auth: Arc<Auth>,
    pub watch: ProjectionWatch,
    pub http: Arc<HttpConfig>,
    pub live: Arc<live::LiveHub>,
    pub exports: Arc<export::Exports>,
    /// This process's search index, kept from the log by its own reader.
    pub search: Arc<search::SearchIndex>,
    /// Reads of agents by id, batched under load.
    pub lookup: lookup::AgentLookup,
}

impl FromRef<QueryState> for Arc<Auth> {
    fn from_ref(s: &QueryState) -> Self {
        s.auth.clone()
    }
}

/// The read routes, relative to `/api/v1`, except the streaming ones.
pub fn router(state: QueryState) -> OpenApiRouter {
    routes().with_state(state)
}

/// The streaming read routes (export), relative to `/api/v1`: to be
/// mounted outside the request timeout.
pub fn streaming_router(state: QueryState) -> OpenApiRouter {
    export::router().with_state(state)
}

/// The read side's part of the OpenAPI spec, relative to `/api/v1`: the
/// same whichever roles a process plays, so every process can serve the
/// whole spec.
pub fn spec() -> utoipa::openapi::OpenApi {
    routes().merge(export::router()).into_openapi()
}

fn routes() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new()
        .merge(agents::router())
        .merge(search::router())
        .merge(history::router())
        .merge(live::router())
        .merge(projects::router())
        .merge(metrics::router())
        .merge(analytics::router())
}
