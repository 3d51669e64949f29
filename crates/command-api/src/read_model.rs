//! The only place the write side consults a read model.
//!
//! The log decides every write, and a write's answer comes from the log
//! alone; this read decides nothing. It finds the agents to detach from a
//! deleted project: the log is kept per aggregate, so it cannot list a
//! project's members cheaply, while the read model can once it has applied
//! the deletion. A stopgap until that answer comes from the log itself.

use events::{AgentId, ProjectId};
use sqlx::PgPool;
use uuid::Uuid;

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
