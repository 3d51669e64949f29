//! Load generation: a closed loop of N clients for a fixed time, and the
//! latency figures taken from it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What a timed run of operations gave.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// Operations completed in the measured window (after the warm-up).
    pub ops: u64,
    /// Units of work done in the window (events, rows); `ops` unless an
    /// operation does many.
    pub units: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub secs: f64,
    /// Latency of each measured operation, in microseconds, sorted.
    pub latencies_us: Vec<u32>,
}

impl Run {
    pub fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.units as f64 / self.secs
        } else {
            0.0
        }
    }

    /// The `q` quantile of latency in milliseconds (0 without samples).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        quantile_ms(&self.latencies_us, q)
    }

    /// An error when every operation failed or more than 1% did: the
    /// figures would not mean what they say.
    pub fn check(&self, what: &str) -> anyhow::Result<()> {
        let total = self.ops + self.errors;
        if self.errors > 0 && (self.ops == 0 || self.errors * 100 > total) {
            anyhow::bail!(
                "{what}: {} of {total} operations failed; first: {}",
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            );
        }
        Ok(())
    }
}

pub fn quantile_ms(sorted_us: &[u32], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let k = ((sorted_us.len() as f64 * q).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    f64::from(sorted_us[k]) / 1000.0
}

/// Runs `op` from `clients` concurrent loops: `warmup` unmeasured, then
/// `measure` measured. `op(client, n)` returns how many units it did.
pub async fn closed_loop<F, Fut>(clients: usize, warmup: Duration, measure: Duration, op: F) -> Run
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<u64>> + Send,
{
    let op = Arc::new(op);
    let counter = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let from = start + warmup;
    let until = from + measure;
    let mut tasks = Vec::with_capacity(clients);
    for client in 0..clients {
        let op = op.clone();
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let mut part = Run::default();
            loop {
                let began = Instant::now();
                if began >= until {
                    break;
                }
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let result = op(client, n).await;
                let ended = Instant::now();
                // Only operations that started and ended inside the window
                // count, so the window's rate is not padded by the edges.
                let counted = began >= from && ended <= until;
                match result {
                    Ok(units) if counted => {
                        part.ops += 1;
                        part.units += units;
                        let us = (ended - began).as_micros().min(u128::from(u32::MAX)) as u32;
                        part.latencies_us.push(us);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        part.errors += 1;
                        if part.first_error.is_none() {
                            part.first_error = Some(format!("{e:#}"));
                        }
                        // Do not spin on a dead dependency.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            part
        }));
    }
    let mut run = Run {
        secs: measure.as_secs_f64(),
        ..Run::default()
    };
    for t in tasks {
        match t.await {
            Ok(part) => {
                run.ops += part.ops;
                run.units += part.units;
                run.errors += part.errors;
                if run.first_error.is_none() {
                    run.first_error = part.first_error;
                }
                run.latencies_us.extend(part.latencies_us);
            }
            Err(e) => {
                run.errors += 1;
                run.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    run.latencies_us.sort_unstable();
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_pick_the_nearest_rank() {
        let v: Vec<u32> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(quantile_ms(&v, 0.5), 50.0);
        assert_eq!(quantile_ms(&v, 0.99), 99.0);
        assert_eq!(quantile_ms(&v, 1.0), 100.0);
        assert_eq!(quantile_ms(&[], 0.5), 0.0);
    }
}

/// What an open loop gathered: each operation's result, and the errors.
#[derive(Debug)]
pub struct Gathered<T> {
    pub results: Vec<T>,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// Starts `op(n)` `rate` times a second for `secs`, open loop: each on a
/// task of its own, never waiting for the ones before (a slow answer does
/// not slow the load down). Waits for all of them.
pub async fn open_loop<T, F, Fut>(rate: f64, secs: Duration, mut op: F) -> Gathered<T>
where
    T: Send + 'static,
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut tasks = vec![];
    let mut n = 0;
    while started.elapsed() < secs {
        ticker.tick().await;
        tasks.push(tokio::spawn(op(n)));
        n += 1;
    }
    let mut gathered = Gathered {
        results: Vec::with_capacity(tasks.len()),
        errors: 0,
        first_error: None,
    };
    for t in tasks {
        let outcome = t
            .await
            .map_err(anyhow::Error::from)
            .and_then(|result| result);
        match outcome {
            Ok(result) => gathered.results.push(result),
            Err(e) => {
                gathered.errors += 1;
                gathered.first_error.get_or_insert(format!("{e:#}"));
            }
        }
    }
    gathered
}
