//! The only places the write side consults a read model.
//!
//! The log decides every write; these two reads decide nothing. One fills
//! in a project's `agent_count` in a write's answer (the log keeps no count;
//! the read model may lag the very latest writes). The other finds the
//! agents to detach from a deleted project: the log is kept per aggregate,
//! so it cannot list a project's members cheaply, while the read model can
//! once it has applied the deletion. Both are stopgaps until those answers
//! come from the log itself.

use events::{AgentId, ProjectId};
use sqlx::PgPool;
use uuid::Uuid;

/// How many live agents the read model counts in `project`.
pub async fn agent_count(pool: &PgPool, project: ProjectId) -> Result<u64, sqlx::Error> {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM agents WHERE project_id = $1")
        .bind(project.as_uuid())
        .fetch_one(pool)
        .await?;
    Ok(count.max(0) as u64)
}

/// The agents the read model has in `project`.
pub async fn project_members(
    pool: &PgPool,
    project: ProjectId,
) -> Result<Vec<AgentId>, sqlx::Error> {
    let members: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM agents WHERE project_id = $1")
        .bind(project.as_uuid())
        .fetch_all(pool)
        .await?;
    Ok(members.into_iter().map(AgentId::from).collect())
}
