//! What every process knows about the projection's progress: the checkpoint
//! table the projector moves, and a watch on it for read-your-writes.
//!
//! The projector commits each batch together with its checkpoint and sends
//! `NOTIFY ymera_projection, '<seq>'` in the same transaction, so a listener
//! learns of a new checkpoint exactly when its data becomes visible.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::http::ApiError;

/// The channel the projector notifies on after each committed batch.
pub const CHANNEL: &str = "ymera_projection";
/// The projection whose checkpoint reads are measured against.
pub const MAIN: &str = "main";

/// The live projection's checkpoint: the stream sequence of the last event
/// applied (0 before the first).
pub async fn checkpoint(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let seq: Option<i64> =
        sqlx::query_scalar("SELECT last_seq FROM projector_checkpoint WHERE name = $1")
            .bind(MAIN)
            .fetch_optional(pool)
            .await?;
    Ok(seq.unwrap_or(0).max(0) as u64)
}

/// How many events the projector has parked as impossible to apply.
pub async fn parked(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_events")
        .fetch_one(pool)
        .await?;
    Ok(n.max(0) as u64)
}

/// The latest checkpoint this process has seen, kept current by a
/// `LISTEN` task.
#[derive(Debug, Clone)]
pub struct ProjectionWatch {
    rx: watch::Receiver<u64>,
}

impl ProjectionWatch {
    /// Starts the listener. It reconnects by itself after a database outage
    /// and re-reads the checkpoint on every (re)connect, so no notification
    /// missed while disconnected is lost.
    pub fn spawn(pool: PgPool, shutdown: CancellationToken) -> Self {
        let (tx, rx) = watch::channel(0u64);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let run = listen(&pool, &tx);
                let err = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    err = run => err,
                };
                tracing::warn!(error = %err, "projection listener lost; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
        ProjectionWatch { rx }
    }

    /// The newest checkpoint seen.
    pub fn current(&self) -> u64 {
        *self.rx.borrow()
    }

    /// Waits until the projection has applied event `seq`, at most
    /// `timeout`; then 503, so a client never reads older data than it
    /// asked for.
    pub async fn wait_for(&self, seq: u64, timeout: Duration) -> Result<u64, ApiError> {
        if self.current() >= seq {
            return Ok(self.current());
        }
        let mut rx = self.rx.clone();
        match tokio::time::timeout(timeout, rx.wait_for(|v| *v >= seq)).await {
            Ok(Ok(v)) => Ok(*v),
            _ => Err(ApiError::Unavailable(format!(
                "the projection has not reached event {seq} yet (it is at {}); retry shortly",
                self.current()
            ))),
        }
    }
}

async fn listen(pool: &PgPool, tx: &watch::Sender<u64>) -> sqlx::Error {
    let mut listener = match PgListener::connect_with(pool).await {
        Ok(l) => l,
        Err(e) => return e,
    };
    if let Err(e) = listener.listen(CHANNEL).await {
        return e;
    }
    match checkpoint(pool).await {
        Ok(seq) => advance(tx, seq),
        Err(e) => return e,
    }
    loop {
        match listener.recv().await {
            Ok(n) => {
                if let Ok(seq) = n.payload().parse::<u64>() {
                    advance(tx, seq);
                }
            }
            Err(e) => return e,
        }
    }
}

fn advance(tx: &watch::Sender<u64>, seq: u64) {
    tx.send_if_modified(|cur| {
        let moved = seq > *cur;
        if moved {
            *cur = seq;
        }
        moved
    });
}
