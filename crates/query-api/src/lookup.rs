//! `GET /agents/{id}` reads agents in batches under load.
//!
//! Each read by id costs the database little. What costs is the round
//! trip: the request sends its query, and both this process and a
//! PostgreSQL backend are woken to handle it. On a loaded machine those
//! wake-ups cost more than the query and the HTTP exchange together.
//! Profiled at 32 clients, a fifth of this process's time went to waking
//! backends for one-row reads.
//!
//! So a read goes to one dispatcher. While fewer than [`IN_FLIGHT`] batches
//! are being read, the next read is sent at once, alone: an idle server
//! adds no wait. While they are all under way, the requests that arrive
//! meanwhile queue, and the first batch to finish lets the next one carry
//! them all together, up to [`MAX_BATCH`], as one `= ANY($1)` query.
//!
//! Each request still sees a snapshot taken after it arrived, because a
//! batch is only sent once every request in it is queued. Each request
//! also still sees its answer with the projection's checkpoint from the
//! same snapshot (`X-Projection-Seq`).
//!
//! Bounds: the queue holds at most [`QUEUE`] requests, and a request beyond
//! them waits for room within its own timeout. A batch holds one pooled
//! connection for one query, and at most [`IN_FLIGHT`] batches hold
//! connections, so reads by id never take more than that share of the
//! pool. A request whose client left before its batch was sent is dropped
//! from the batch.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use infra::http::ApiError;
use infra::views::AgentView;
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tracing::Instrument;
use uuid::Uuid;

use crate::projection::{CHECKPOINT, projection_seq};
use crate::rows::{AGENT_COLUMNS, agent_of};

/// Batches read at once: each holds a connection of the pool for one query.
/// Two keep one read going while the other's answers are handed out. More
/// would make the batches smaller, and so the wake-ups more: at 32 clients,
/// 4 in flight served 15,500 reads/s and 2 served 19,000.
const IN_FLIGHT: usize = 2;
/// Most reads in one batch.
const MAX_BATCH: usize = 128;
/// Most reads waiting for a batch.
const QUEUE: usize = 4_096;

/// The agents of the ids `$1` (a `uuid[]`), with the projection's
/// checkpoint, from one snapshot: one row per agent found, or one row with
/// a null `id` when none is.
static GET_AGENTS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT c.seq AS projection_seq, {AGENT_COLUMNS} FROM {} \
         LEFT JOIN agents a ON a.id = ANY($1)",
        *CHECKPOINT
    )
});

/// What a read by id finds: the agent, if any, and the projection's
/// checkpoint when it was read.
pub type Found = (Option<AgentView>, u64);

/// What a batch's failure leaves each of its reads: the batch shares one
/// error, so each read answers from it.
type Answer = Result<Found, Arc<sqlx::Error>>;

/// One request's read, queued for a batch.
struct Ask {
    id: Uuid,
    /// The request's span, which the batch's span follows from.
    span: tracing::Span,
    answer: oneshot::Sender<Answer>,
}

/// The queue of reads by id, and the dispatcher that batches them.
#[derive(Debug, Clone)]
pub struct AgentLookup {
    queue: mpsc::Sender<Ask>,
}

impl AgentLookup {
    /// Starts the dispatcher. It ends when the last handle is dropped.
    pub fn spawn(pool: PgPool) -> AgentLookup {
        let (queue, asks) = mpsc::channel(QUEUE);
        tokio::spawn(dispatch(pool, asks));
        AgentLookup { queue }
    }

    /// The agent `id` as the read model holds it now, and the projection's
    /// checkpoint.
    pub async fn get(&self, id: Uuid) -> Result<Found, ApiError> {
        let (answer, answered) = oneshot::channel();
        let ask = Ask {
            id,
            span: tracing::Span::current(),
            answer,
        };
        let stopped = || ApiError::Unavailable("the server is shutting down".into());
        self.queue.send(ask).await.map_err(|_| stopped())?;
        match answered.await.map_err(|_| stopped())? {
            Ok(found) => Ok(found),
            Err(e) => Err(ApiError::of_database(&e)),
        }
    }
}

/// Takes the queued reads a batch at a time, as connections for them come
/// free.
async fn dispatch(pool: PgPool, mut asks: mpsc::Receiver<Ask>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = asks.recv().await {
        // Waiting for a slot is what lets the reads that arrive meanwhile
        // join this batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(MAX_BATCH.min(asks.len() + 1));
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match asks.try_recv() {
                Ok(ask) => batch.push(ask),
                Err(_) => break,
            }
        }
        batch.retain(|ask| !ask.answer.is_closed());
        if batch.is_empty() {
            continue;
        }
        tokio::spawn(read(pool.clone(), batch, slot));
    }
}

/// Reads one batch and answers each of its reads.
async fn read(pool: PgPool, batch: Vec<Ask>, _slot: OwnedSemaphorePermit) {
    let span = tracing::debug_span!("read agents by id", batch = batch.len());
    for ask in &batch {
        span.follows_from(&ask.span);
    }
    infra::metrics::record_agent_read_batch(batch.len());
    let ids: Vec<Uuid> = batch.iter().map(|ask| ask.id).collect();
    let rows = sqlx::query(sqlx::AssertSqlSafe(GET_AGENTS.as_str()))
        .bind(&ids)
        .fetch_all(&pool)
        .instrument(span)
        .await;
    let found = rows.and_then(|rows| {
        let seq = rows.first().map(projection_seq).transpose()?.unwrap_or(0);
        let mut agents = HashMap::with_capacity(rows.len());
        for row in &rows {
            if let Some(agent) = agent_of(row)? {
                agents.insert(agent.id, agent);
            }
        }
        Ok((agents, seq))
    });
    match found {
        Ok((mut agents, seq)) => {
            // An id asked for twice (by two requests) is answered from one
            // row: the last ask for it takes the row, the others a copy.
            let mut left: HashMap<Uuid, usize> = HashMap::with_capacity(batch.len());
            for ask in &batch {
                *left.entry(ask.id).or_default() += 1;
            }
            for ask in batch {
                let n = left.get_mut(&ask.id).map_or(0, |n| {
                    *n -= 1;
                    *n
                });
                let agent = if n == 0 {
                    agents.remove(&ask.id)
                } else {
                    agents.get(&ask.id).cloned()
                };
                // A requester that has gone away no longer listens.
                let _ = ask.answer.send(Ok((agent, seq)));
            }
        }
        Err(e) => {
            let e = Arc::new(e);
            for ask in batch {
                let _ = ask.answer.send(Err(e.clone()));
            }
        }
    }
}
