//! Loading, caching and appending aggregates.
//!
//! State is cached per aggregate in this process, with the subject sequence
//! it reflects. A write decides against the cached state and appends with
//! that sequence as `Nats-Expected-Last-Subject-Sequence`, so a stale cache
//! (another process wrote meanwhile) cannot write: JetStream refuses, the
//! state is reloaded from the log and the command decided again, a bounded
//! number of times, before answering 409. Outcomes that append nothing (a
//! refusal, a no-op update) are confirmed against the log's current sequence
//! first, so a stale cache never answers for the log.
//!
//! Writes to one aggregate are serialized within the process by a lock on
//! its cache slot, so concurrent requests here queue instead of conflicting.

use std::collections::HashMap;
use std::fmt::{Debug, Display};
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{SubsecRound, Utc};
use events::agent::AgentState;
use events::project::ProjectState;
use events::{AgentId, Aggregate, Envelope, EventMeta, ProjectId, Recorded};
use infra::telemetry::TraceHeaders;
use infra::{EventStore, StoreError, StoredEvent};
use uuid::Uuid;

use crate::error::WriteError;
use crate::keyed::KeyedWrite;

/// Who is writing and on behalf of which request: recorded in every event.
#[derive(Debug, Clone)]
pub struct WriteContext {
    pub actor: String,
    pub request_id: String,
    /// The trace context of the HTTP request, carried into the NATS
    /// headers so the projection continues the same trace.
    pub trace: TraceHeaders,
    /// Set when the request carries an `Idempotency-Key`: what the write
    /// appends is then named from it, so a retry cannot store a copy.
    pub keyed: Option<Arc<KeyedWrite>>,
}

impl WriteContext {
    /// The id of the `index`th aggregate this write creates: named from the
    /// key when there is one, else a fresh UUID v7.
    pub fn new_id(&self, index: usize) -> Uuid {
        match &self.keyed {
            Some(k) => k.keyed().aggregate_id(index),
            None => Uuid::now_v7(),
        }
    }

    /// Whether an earlier attempt at this keyed write may have stored it.
    pub fn is_retry(&self) -> bool {
        self.keyed.as_ref().is_some_and(|k| k.keyed().retry)
    }

    /// The id of the next event this write appends to `aggregate`.
    pub fn next_event_id(&self, aggregate: Uuid) -> Uuid {
        match &self.keyed {
            Some(k) => k.next_event_id(aggregate),
            None => Uuid::now_v7(),
        }
    }

    /// Records that the event [`Self::next_event_id`] named is stored.
    pub fn appended(&self, aggregate: Uuid) {
        if let Some(k) = &self.keyed {
            k.appended(aggregate);
        }
    }

    /// The metadata of the next event of an aggregate at `version`.
    pub fn meta(&self, id: Uuid, version: u64) -> EventMeta {
        EventMeta {
            aggregate_id: id,
            aggregate_version: version + 1,
            // PostgreSQL keeps microseconds: record no more, so the write's
            // answer and every later read agree to the digit.
            occurred_at: Utc::now().trunc_subsecs(6),
            actor: self.actor.clone(),
            request_id: self.request_id.clone(),
        }
    }
}

/// The result of a command: the state after it and the subject sequence of
/// its last event (the current one when nothing was appended).
#[derive(Debug, Clone)]
pub struct Committed<A> {
    pub state: A,
    pub seq: u64,
    pub appended: bool,
}

/// How often a command is decided again after losing a race to another
/// process before answering 409.
const MAX_ATTEMPTS: u32 = 10;
/// Cached aggregates kept before idle ones are dropped.
const CACHE_CAPACITY: usize = 100_000;

#[derive(Debug, Default)]
struct Slot<A> {
    state: A,
    seq: u64,
    loaded: bool,
}

/// An aggregate the repository holds, named by an id type of its own, so
/// that one aggregate's id cannot be passed where another's is meant.
pub trait Identified: Aggregate + Debug {
    type Id: Copy + Eq + Hash + Debug + Display + Into<Uuid> + Send + Sync + 'static;
}

impl Identified for AgentState {
    type Id = AgentId;
}

impl Identified for ProjectState {
    type Id = ProjectId;
}

/// The aggregates of one type, cached.
#[derive(Debug)]
pub struct Repository<A: Identified> {
    store: EventStore,
    slots: Mutex<HashMap<A::Id, SharedSlot<A>>>,
}

/// A cache slot, locked by the write in progress on its aggregate.
type SharedSlot<A> = Arc<tokio::sync::Mutex<Slot<A>>>;

impl<A: Identified> Repository<A>
where
    WriteError: From<A::Error>,
{
    pub fn new(store: EventStore) -> Self {
        Repository {
            store,
            slots: Mutex::new(HashMap::new()),
        }
    }

    pub fn store(&self) -> &EventStore {
        &self.store
    }

    fn slot(&self, id: A::Id) -> SharedSlot<A> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.len() >= CACHE_CAPACITY && !slots.contains_key(&id) {
            // Drop idle entries; ones in use are kept.
            slots.retain(|_, slot| Arc::strong_count(slot) > 1);
        }
        slots.entry(id).or_default().clone()
    }

    /// The aggregate's state and subject sequence, straight from the log.
    pub async fn load(&self, id: A::Id) -> Result<(A, u64), WriteError> {
        self.fold(id, |_, _| {}).await
    }

    /// Loads the aggregate from the log, calling `each` with every stored
    /// event and the state right after it.
    async fn fold(
        &self,
        id: A::Id,
        mut each: impl FnMut(&StoredEvent, &A),
    ) -> Result<(A, u64), WriteError> {
        let subject = self.store.subject(A::TYPE, id.into());
        let (stored, last) = self.store.load(&subject).await?;
        let mut state = A::default();
        for e in &stored {
            let event = A::decode(&e.envelope).map_err(|err| StoreError::Corrupt {
                seq: e.seq,
                reason: err.to_string(),
            })?;
            state = state.evolve(&Recorded {
                meta: e.envelope.meta(),
                event,
            });
            each(e, &state);
        }
        Ok((state, last))
    }

    /// What a keyed write already stored on aggregate `id`, found by the
    /// names of its events: the aggregate as the write's last stored event
    /// left it, with that event's sequence. `None` when the log holds none
    /// of them (or the write has no key). Later appends of this write to
    /// `id` are named after the ones found.
    pub async fn stored(
        &self,
        id: A::Id,
        ctx: &WriteContext,
    ) -> Result<Option<Committed<A>>, WriteError> {
        let Some(keyed) = &ctx.keyed else {
            return Ok(None);
        };
        let aggregate: Uuid = id.into();
        let mut found = 0;
        let mut ours = None;
        let (state, last) = self
            .fold(id, |e, state| {
                if e.envelope.event_id == keyed.keyed().event_id(aggregate, found) {
                    found += 1;
                    ours = Some((state.clone(), e.seq));
                }
            })
            .await?;
        keyed.found(aggregate, found);
        self.remember(id, state, last).await;
        Ok(ours.map(|(state, seq)| Committed {
            state,
            seq,
            appended: true,
        }))
    }

    /// What an earlier attempt at this write stored on `id`, when there may
    /// have been one (a keyed retry whose first outcome is unknown; see
    /// [`Self::stored`]). `None` without a read for any other write.
    pub async fn stored_before(
        &self,
        id: A::Id,
        ctx: &WriteContext,
    ) -> Result<Option<Committed<A>>, WriteError> {
        if !ctx.is_retry() {
            return Ok(None);
        }
        self.stored(id, ctx).await
    }

    /// Remembers a state just written by other means (a bulk append).
    pub async fn remember(&self, id: A::Id, state: A, seq: u64) {
        let slot = self.slot(id);
        let mut slot = slot.lock().await;
        *slot = Slot {
            state,
            seq,
            loaded: true,
        };
    }

    /// Creates aggregate `id`, a fresh id (see [`WriteContext::new_id`]),
    /// with `command`. A fresh id has no events: nothing to load. The append
    /// still expects an empty subject, so a collision would be a conflict.
    pub async fn create(
        &self,
        id: A::Id,
        ctx: &WriteContext,
        command: A::Command,
    ) -> Result<Committed<A>, WriteError>
    where
        A::Command: Clone,
    {
        self.remember(id, A::default(), 0).await;
        self.execute(id, ctx, None, |_| Ok(command.clone())).await
    }

    /// Decides `command` against the aggregate and appends what it yields.
    /// `if_match` lists the versions the caller accepts (412 for any
    /// other; `None` accepts any).
    /// `command` may be called more than once: after a lost race the state
    /// is reloaded and the command rebuilt against it.
    pub async fn execute(
        &self,
        id: A::Id,
        ctx: &WriteContext,
        if_match: Option<&[u64]>,
        command: impl Fn(&A) -> Result<A::Command, WriteError>,
    ) -> Result<Committed<A>, WriteError> {
        let slot = self.slot(id);
        let mut slot = slot.lock().await;
        let mut fresh = false;
        for attempt in 1..=MAX_ATTEMPTS {
            if !slot.loaded {
                let (state, seq) = self.load(id).await?;
                *slot = Slot {
                    state,
                    seq,
                    loaded: true,
                };
                fresh = true;
            }
            let current = slot.state.version();
            let decided = if_match
                .filter(|accepted| !accepted.contains(&current))
                .map(|_| Err(WriteError::PreconditionFailed { current }))
                .unwrap_or_else(|| command(&slot.state).and_then(|c| Ok(slot.state.decide(c)?)));
            let events = match decided {
                Ok(events) if !events.is_empty() => events,
                // Appending nothing (refusal or no-op): only on state known
                // to be current.
                outcome if !fresh && !self.is_current(id, slot.seq).await? => {
                    drop(outcome);
                    slot.loaded = false;
                    continue;
                }
                Ok(_) => {
                    return Ok(Committed {
                        state: slot.state.clone(),
                        seq: slot.seq,
                        appended: false,
                    });
                }
                Err(e) => return Err(e),
            };
            match self
                .append(id, slot.state.clone(), slot.seq, events, ctx)
                .await
            {
                Ok((state, seq)) => {
                    *slot = Slot {
                        state: state.clone(),
                        seq,
                        loaded: true,
                    };
                    return Ok(Committed {
                        state,
                        seq,
                        appended: true,
                    });
                }
                Err(StoreError::Conflict) => {
                    tracing::debug!(%id, attempt, "lost a race to another writer; reloading");
                    slot.loaded = false;
                    fresh = false;
                    let jitter = rand_millis(attempt);
                    tokio::time::sleep(jitter).await;
                }
                Err(e) => {
                    // The outcome is unknown (say, the ack was lost): reload
                    // next time rather than trust the cache.
                    slot.loaded = false;
                    return Err(e.into());
                }
            }
        }
        Err(WriteError::Conflict {
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Whether the log's last sequence for the aggregate is still `seq`.
    async fn is_current(&self, id: A::Id, seq: u64) -> Result<bool, WriteError> {
        let subject = self.store.subject(A::TYPE, id.into());
        Ok(self.store.last_seq_of(&subject).await? == seq)
    }

    /// Appends `events` in order, each guarded by the sequence the one
    /// before it got, folding them into `state`.
    async fn append(
        &self,
        id: A::Id,
        mut state: A,
        mut expected: u64,
        events: Vec<A::Event>,
        ctx: &WriteContext,
    ) -> Result<(A, u64), StoreError> {
        let subject = self.store.subject(A::TYPE, id.into());
        for event in events {
            let meta = ctx.meta(id.into(), state.version());
            let envelope = Envelope::new(
                ctx.next_event_id(id.into()),
                A::TYPE,
                &meta,
                A::event_type(&event),
                A::schema_version(&event),
                A::to_data(&event),
            );
            expected = self
                .store
                .append(&subject, expected, &envelope, Some(&ctx.trace))
                .await?;
            ctx.appended(id.into());
            state = state.evolve(&Recorded { meta, event });
        }
        Ok((state, expected))
    }
}

/// A small, growing pause between attempts, so racing writers spread out.
fn rand_millis(attempt: u32) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    Duration::from_micros(u64::from(nanos % 1000) * u64::from(attempt.min(5)))
}
