//! The only place the write side consults a read model.
//!
//! The log decides every write; this read decides nothing. It fills in a
//! project's `agent_count` in a write's answer (the log keeps no count; the
//! read model may lag the very latest writes): a stopgap until that answer
//! comes from the write model itself.

use events::ProjectId;
use sqlx::PgPool;

/// How many live agents the read model counts in `project`.
pub async fn agent_count(pool: &PgPool, project: ProjectId) -> Result<u64, sqlx::Error> {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM agents WHERE project_id = $1")
        .bind(project.as_uuid())
        .fetch_one(pool)
        .await?;
    Ok(count.max(0) as u64)
}
