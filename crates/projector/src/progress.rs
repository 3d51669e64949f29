//! How far a rebuild or a replay has come, for whoever shows it.
//!
//! The work only reports numbers; drawing a bar or printing lines is the
//! caller's business (the `ymera` command). A watch channel keeps the two
//! apart: reporting never waits for the display, and a display that looks
//! late sees the latest figures, never a backlog.

use tokio::sync::watch;

/// Events applied so far, of how many there are to apply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    /// Grows during a rebuild, which follows a live projection that moves
    /// on; never below `done`.
    pub total: u64,
}

/// The reporting end, handed to [`rebuild`](crate::rebuild::rebuild) and
/// [`replay`](crate::rebuild::replay). Dropping it ends the display.
#[derive(Debug)]
pub struct Reporter(watch::Sender<Progress>);

/// A reporter and the receiving end a display watches.
pub fn channel() -> (Reporter, watch::Receiver<Progress>) {
    let (tx, rx) = watch::channel(Progress::default());
    (Reporter(tx), rx)
}

impl Reporter {
    /// A reporter nobody watches, for callers that show nothing.
    pub fn silent() -> Self {
        channel().0
    }

    /// `done` events are applied.
    pub fn done(&self, done: u64) {
        self.0.send_if_modified(|p| {
            let before = *p;
            p.done = done;
            p.total = p.total.max(done);
            *p != before
        });
    }

    /// There are at least `total` events to apply.
    pub fn total_at_least(&self, total: u64) {
        self.0.send_if_modified(|p| {
            let grows = total > p.total;
            p.total = p.total.max(total);
            grows
        });
    }
}
