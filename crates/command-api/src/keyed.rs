//! Names for what a write sent with an `Idempotency-Key` appends.
//!
//! The idempotency middleware gives each keyed write a [`Keyed`]: a seed
//! hashed from the user, the key and the request, and the moment the key was
//! first claimed. Everything the write appends is named from them: the id of
//! each aggregate it creates (by index: a bulk's items in order) and each
//! event's id, which is also its `Nats-Msg-Id`. Every attempt at the same
//! request therefore appends the same events under the same names, so a
//! retry cannot store a second copy: within the stream's duplicate window
//! JetStream drops it, and beyond it the write finds its own events on the
//! aggregate's subject and answers as the first success would have.
//!
//! Names are UUID v7 like every other id: the timestamp is the key's first
//! claim (the same for every attempt), the rest comes from the hash.

use std::collections::HashMap;
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// What the idempotency middleware hands a keyed write (a request
/// extension).
#[derive(Debug, Clone)]
pub struct Keyed {
    /// SHA-256 of the user, the key and the request's fingerprint.
    pub seed: [u8; 32],
    /// When the key was first claimed, in Unix milliseconds.
    pub claimed_at_ms: u64,
    /// Whether an earlier attempt may have stored this write (its outcome
    /// is unknown): the write then looks for its own events first.
    pub retry: bool,
}

impl Keyed {
    pub fn new(
        actor: &str,
        key: &str,
        request_hash: &[u8],
        claimed_at_ms: u64,
        retry: bool,
    ) -> Self {
        let mut h = Sha256::new();
        for part in [
            b"ymera idempotent write".as_slice(),
            actor.as_bytes(),
            key.as_bytes(),
            request_hash,
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        Keyed {
            seed: h.finalize().into(),
            claimed_at_ms,
            retry,
        }
    }

    fn name(&self, parts: &[&[u8]]) -> Uuid {
        let mut h = Sha256::new();
        h.update(self.seed);
        for part in parts {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        let digest = h.finalize();
        let mut tail = [0u8; 10];
        tail.copy_from_slice(&digest[..10]);
        uuid::Builder::from_unix_timestamp_millis(self.claimed_at_ms, &tail).into_uuid()
    }

    /// The id of the `index`th aggregate this write creates.
    pub fn aggregate_id(&self, index: usize) -> Uuid {
        self.name(&[b"aggregate", &(index as u64).to_be_bytes()])
    }

    /// The id of the `ordinal`th event this write appends to `aggregate`.
    pub fn event_id(&self, aggregate: Uuid, ordinal: u32) -> Uuid {
        self.name(&[b"event", aggregate.as_bytes(), &ordinal.to_be_bytes()])
    }
}

/// A keyed write in progress: its names, and how many events it has
/// appended to each aggregate so far (which names the next one).
#[derive(Debug)]
pub struct KeyedWrite {
    keyed: Keyed,
    appended: Mutex<HashMap<Uuid, u32>>,
}

impl KeyedWrite {
    pub fn new(keyed: Keyed) -> Self {
        KeyedWrite {
            keyed,
            appended: Mutex::default(),
        }
    }

    pub fn keyed(&self) -> &Keyed {
        &self.keyed
    }

    fn count(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, u32>> {
        self.appended.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The id of the next event this write appends to `aggregate`.
    pub fn next_event_id(&self, aggregate: Uuid) -> Uuid {
        let ordinal = self.count().get(&aggregate).copied().unwrap_or(0);
        self.keyed.event_id(aggregate, ordinal)
    }

    /// Records that the next event on `aggregate` is stored.
    pub fn appended(&self, aggregate: Uuid) {
        *self.count().entry(aggregate).or_default() += 1;
    }

    /// Records that the log already holds `count` events of this write on
    /// `aggregate` (found by a retry).
    pub fn found(&self, aggregate: Uuid, count: u32) {
        self.count().insert(aggregate, count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_fixed_by_the_request_and_tell_apart_what_differs() {
        let a = Keyed::new("alice", "k1", b"hash", 1_700_000_000_000, false);
        let again = Keyed::new("alice", "k1", b"hash", 1_700_000_000_000, true);
        assert_eq!(a.aggregate_id(0), again.aggregate_id(0));
        assert_eq!(
            a.event_id(a.aggregate_id(0), 0),
            again.event_id(a.aggregate_id(0), 0)
        );
        assert_ne!(a.aggregate_id(0), a.aggregate_id(1));
        assert_ne!(
            a.event_id(a.aggregate_id(0), 0),
            a.event_id(a.aggregate_id(0), 1)
        );
        for other in [
            Keyed::new("bob", "k1", b"hash", 1_700_000_000_000, false),
            Keyed::new("alice", "k2", b"hash", 1_700_000_000_000, false),
            Keyed::new("alice", "k1", b"other", 1_700_000_000_000, false),
        ] {
            assert_ne!(a.aggregate_id(0), other.aggregate_id(0));
        }
        let id = a.aggregate_id(0);
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(
            id.get_timestamp().map(|t| t.to_unix().0),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn the_next_event_is_named_by_what_was_appended_before() {
        let write = KeyedWrite::new(Keyed::new("a", "k", b"h", 0, false));
        let agg = write.keyed().aggregate_id(0);
        let first = write.next_event_id(agg);
        assert_eq!(write.next_event_id(agg), first, "not appended yet");
        write.appended(agg);
        assert_eq!(write.next_event_id(agg), write.keyed().event_id(agg, 1));
        write.found(agg, 0);
        assert_eq!(write.next_event_id(agg), first);
    }
}
