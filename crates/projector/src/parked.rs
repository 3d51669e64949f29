//! Parked events: what the projector could not apply, kept with the reason.
//! After the cause is fixed (usually a newer version that understands the
//! event), `ymera parked retry` applies them. A retried event is applied
//! where the projection now is, not where it would have been: for events of
//! an aggregate that later events depend on, a rebuild gives the exact
//! result.

use infra::EventStore;
use sqlx::PgPool;

use crate::apply;

/// One parked event.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct Parked {
    pub seq: i64,
    pub subject: String,
    pub error: String,
    pub parked_at: chrono::DateTime<chrono::Utc>,
}

pub async fn list(pool: &PgPool) -> Result<Vec<Parked>, sqlx::Error> {
    sqlx::query_as("SELECT seq, subject, error, parked_at FROM parked_events ORDER BY seq")
        .fetch_all(pool)
        .await
}

/// Outcome of a retry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retried {
    pub applied: usize,
    pub still_parked: usize,
}

/// Tries every parked event again, each in its own transaction, with the
/// event as it is in the log (a log that lost it is an error).
pub async fn retry(
    store: &EventStore,
    pool: &PgPool,
) -> Result<Retried, crate::rebuild::RebuildError> {
    let mut out = Retried::default();
    for parked in list(pool).await? {
        let seq = parked.seq.max(0) as u64;
        let stored = store.get_raw(seq).await?;
        let mut tx = pool.begin().await?;
        sqlx::query("DELETE FROM parked_events WHERE seq = $1")
            .bind(parked.seq)
            .execute(&mut *tx)
            .await?;
        apply::apply_message(&mut tx, seq, &stored.0, &stored.1).await?;
        let again: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM parked_events WHERE seq = $1)")
                .bind(parked.seq)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        if again {
            out.still_parked += 1;
        } else {
            out.applied += 1;
        }
    }
    Ok(out)
}
