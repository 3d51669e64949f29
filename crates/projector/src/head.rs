//! The end of the log as a projector process last saw it, shared by the
//! projectors of its partitions.
//!
//! A partition of a split log is delivered only its own events, so its
//! projector learns that the log has moved on (and that its watermark may
//! follow, see `infra::projection`) from elsewhere: from the other
//! partitions of the same process, which report every event they are
//! delivered ([`LogHead::see`]), and, for the partitions owned by other
//! processes, from the stream itself, asked every [`POLL`] while any
//! projector of the process waits idle for its next event, and never
//! otherwise (a process that owns no partition asks nothing).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use infra::EventStore;
use tokio::sync::{Notify, watch};

/// How often the stream's last sequence is asked while a projector waits
/// idle: the most a partition's watermark lags behind another process's
/// write, once its own events are applied.
pub const POLL: Duration = Duration::from_millis(20);

/// The last sequence of the log seen by this process. Cheap to clone; the
/// task that asks the stream ends with the last clone.
#[derive(Debug, Clone)]
pub struct LogHead {
    seen: Arc<watch::Sender<u64>>,
    rx: watch::Receiver<u64>,
    waiting: Arc<Waiting>,
}

#[derive(Debug, Default)]
struct Waiting {
    count: AtomicUsize,
    wake: Notify,
}

impl LogHead {
    /// A head of `store`'s log, asking the stream only while someone
    /// [`LogHead::waits`].
    pub fn spawn(store: EventStore) -> Self {
        let (tx, rx) = watch::channel(0u64);
        let seen = Arc::new(tx);
        let waiting = Arc::new(Waiting::default());
        let poller = (Arc::downgrade(&seen), waiting.clone());
        tokio::spawn(async move {
            let (seen, waiting) = poller;
            loop {
                if waiting.count.load(Ordering::SeqCst) == 0 {
                    // Checked again after each wake: a permit stored by a
                    // waiter that has gone since wakes this for nothing.
                    tokio::select! {
                        _ = waiting.wake.notified() => continue,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {
                            if seen.strong_count() == 0 {
                                return;
                            }
                            continue;
                        }
                    }
                }
                let Some(tx) = seen.upgrade() else { return };
                match store.last_seq().await {
                    Ok(last) => see(&tx, last),
                    Err(e) => tracing::debug!(error = %e, "reading the end of the log failed"),
                }
                drop(tx);
                tokio::time::sleep(POLL).await;
            }
        });
        LogHead { seen, rx, waiting }
    }

    /// Records that the log reaches at least `seq`.
    pub fn see(&self, seq: u64) {
        see(&self.seen, seq);
    }

    /// The last sequence seen: the log reaches at least that far.
    pub fn seen(&self) -> u64 {
        *self.rx.borrow()
    }

    /// Waits until the log is seen past `seq`, asking the stream every
    /// [`POLL`] meanwhile. Cancel-safe.
    pub async fn past(&self, seq: u64) {
        let _waiting = self.waits();
        let mut rx = self.rx.clone();
        // The sender lives as long as `self`: the wait ends only by moving.
        let _ = rx.wait_for(|head| *head > seq).await;
    }

    /// Counts this caller among the waiting until the guard is dropped.
    fn waits(&self) -> WaitGuard<'_> {
        self.waiting.count.fetch_add(1, Ordering::SeqCst);
        self.waiting.wake.notify_one();
        WaitGuard(&self.waiting)
    }
}

struct WaitGuard<'a>(&'a Waiting);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
    }
}

fn see(tx: &watch::Sender<u64>, seq: u64) {
    tx.send_if_modified(|head| {
        let moved = seq > *head;
        if moved {
            *head = seq;
        }
        moved
    });
}
