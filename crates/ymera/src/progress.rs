//! Showing how far a rebuild or a replay has come, without garbling the
//! log lines.
//!
//! On a terminal, an `indicatif` bar on stderr; otherwise (a pipe, a CI
//! log, a file) a plain line every few seconds, named for the command
//! ("rebuild: …", "replay: …"). The log lines of the process go through
//! [`log_writer`], which takes the bar off the screen while a line is
//! written and draws it again below, so a log line never lands in the
//! middle of the bar.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use projector::progress::{self, Progress, Reporter};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

/// The bar on screen, if any: log lines are written around it.
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// How often the plain lines come, when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

/// The writer for the process's log lines (stdout), aware of the bar.
pub fn log_writer() -> BoxMakeWriter {
    BoxMakeWriter::new(LogLines)
}

#[derive(Debug, Clone, Copy)]
struct LogLines;

impl<'a> MakeWriter<'a> for LogLines {
    type Writer = LogLines;

    fn make_writer(&'a self) -> LogLines {
        LogLines
    }
}

impl Write for LogLines {
    /// The log layer writes each line whole, in one call.
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let bar = BAR.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match bar {
            Some(bar) => bar.suspend(|| std::io::stdout().write_all(line))?,
            None => std::io::stdout().write_all(line)?,
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// A reporter for a command named `label`, and the task that shows its
/// progress until the reporter is dropped (await it before printing the
/// outcome, so the last progress line comes first).
pub fn show(label: &'static str) -> (Reporter, JoinHandle<()>) {
    let (reporter, updates) = progress::channel();
    let shown = if std::io::stderr().is_terminal() {
        tokio::spawn(bar(label, updates))
    } else {
        tokio::spawn(plain(label, updates))
    };
    (reporter, shown)
}

async fn bar(label: &'static str, mut updates: watch::Receiver<Progress>) {
    // Drawn from the first figures on: nothing to show before.
    if updates.changed().await.is_err() {
        return;
    }
    let style = ProgressStyle::with_template(
        "{prefix}: [{bar:25}] {percent:>3}% {human_pos}/{human_len} events, {eta} left",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        .with_style(style)
        .with_prefix(label);
    *BAR.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar.clone());
    loop {
        let p = *updates.borrow_and_update();
        bar.set_length(p.total);
        bar.set_position(p.done);
        if updates.changed().await.is_err() {
            break;
        }
    }
    bar.finish();
    *BAR.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

async fn plain(label: &'static str, mut updates: watch::Receiver<Progress>) {
    let started = Instant::now();
    let mut ticks = tokio::time::interval(PLAIN_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shown = None;
    loop {
        tokio::select! {
            changed = updates.changed() => if changed.is_err() { break },
            _ = ticks.tick() => {
                let p = *updates.borrow();
                if shown != Some(p) && p.total > 0 {
                    line(label, p, started);
                    shown = Some(p);
                }
            }
        }
    }
    let p = *updates.borrow();
    if shown != Some(p) {
        line(label, p, started);
    }
}

fn line(label: &str, p: Progress, started: Instant) {
    let rate = p.done as f64 / started.elapsed().as_secs_f64().max(1e-3);
    let total = p.total.max(1);
    let left = if rate > 0.0 {
        (p.total - p.done) as f64 / rate
    } else {
        0.0
    };
    eprintln!(
        "{label}: {}/{} events ({:.1}%), {rate:.0} events/s, about {left:.0}s left",
        p.done,
        p.total,
        p.done as f64 * 100.0 / total as f64,
    );
}
