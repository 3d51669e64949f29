//! Rate limits: per user on the API (per client address before login), and
//! on login attempts (per client address, then per valid username).
//!
//! Per user, not per token: a login mints a new token, so a limit per
//! token would give one account as many allowances as it cares to log in
//! for (sixty more a minute under the login limit). The user is who an
//! operator thinks of as "a client", and every token of theirs shares one
//! allowance; a load run gives each simulated user an account of its own.
//!
//! The buckets are `governor`'s (GCRA, the token bucket without a timer),
//! kept in this process, so with N copies of an API behind a balancer a
//! client gets up to N times the limit; that is a deliberate trade for no
//! shared state on the hot path. Every limiter's table is bounded whatever
//! clients send (see [`BoundedStore`]).
//!
//! Every limited response carries the `RateLimit-Limit`,
//! `RateLimit-Remaining` and `RateLimit-Reset` headers (IETF draft); a
//! refusal is a 429 problem with `Retry-After`.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::Quota;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;

use super::ApiError;
use crate::auth::{Auth, Username};
use crate::config::HttpConfig;
use crate::http::auth;

static LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Each limiter's table is split in this many shards, each behind its own
/// lock, so that concurrent requests rarely wait on one another.
const SHARDS: usize = 16;

/// The verdict on one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    /// The burst size.
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until a request would be allowed again (0 when allowed) or,
    /// when allowed, until the bucket is full.
    pub reset_secs: u64,
}

/// A limiter's table: each key's GCRA state (the "theoretical arrival
/// time" of its next request), under a keyed 64-bit hash of the key.
///
/// Bounded by construction: a client's key costs 8 bytes whatever its
/// length (and a client cannot aim collisions at another's bucket without
/// the process's random hash key), and at most `max_keys` are kept
/// (`YMERA_RATE_LIMIT_MAX_KEYS`). A shard that is full drops the entries
/// with the earliest arrival times: first those whose buckets have refilled
/// to the brim (they say nothing a fresh bucket would not), then those
/// nearest to it, which during a flood of distinct keys are the keys used
/// once; those start again with a full burst, the price of a bounded table.
/// Busy (drained) buckets are the last to go. Each clean-up leaves a
/// quarter of the shard free, so its cost is spread over many requests.
#[derive(Debug)]
pub struct BoundedStore {
    shard_capacity: usize,
    shards: Box<[Mutex<HashMap<u64, Nanos>>]>,
}

impl BoundedStore {
    fn new(max_keys: usize) -> Self {
        BoundedStore {
            shard_capacity: max_keys.div_ceil(SHARDS).max(4),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Brings a full shard down to three quarters of its capacity, keeping
    /// the latest arrival times.
    fn make_room(&self, shard: &mut HashMap<u64, Nanos>) {
        let keep = self.shard_capacity * 3 / 4;
        let mut arrivals: Vec<Nanos> = shard.values().copied().collect();
        let evicted = arrivals.len().saturating_sub(keep);
        if evicted == 0 {
            return;
        }
        let (_, cutoff, _) = arrivals.select_nth_unstable(evicted - 1);
        let cutoff = *cutoff;
        shard.retain(|_, tat| *tat > cutoff);
    }

    /// How many keys are kept now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

impl StateStore for BoundedStore {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut shard = self.shards[(key % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (outcome, tat) = f(shard.get(key).copied())?;
        if shard.len() >= self.shard_capacity && !shard.contains_key(key) {
            self.make_room(&mut shard);
        }
        shard.insert(*key, tat);
        Ok(outcome)
    }
}

/// Buckets by key: `per_sec` sustained, `burst` at once; `governor`'s
/// keyed limiter over a [`BoundedStore`].
#[derive(Debug)]
pub struct RateLimiter<C: Clock = DefaultClock> {
    per_sec: f64,
    burst: u32,
    keys: RandomState,
    limiter: governor::RateLimiter<u64, BoundedStore, C, StateInformationMiddleware>,
}

impl RateLimiter {
    /// `None` when `per_sec` is 0: no limit. At most `max_keys` buckets.
    pub fn new(per_sec: f64, burst: u32, max_keys: usize) -> Option<Self> {
        Self::with_clock(per_sec, burst, max_keys, DefaultClock::default())
    }
}

impl<C: Clock> RateLimiter<C> {
    fn with_clock(per_sec: f64, burst: u32, max_keys: usize, clock: C) -> Option<Self> {
        if per_sec <= 0.0 {
            return None;
        }
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(Duration::from_secs_f64(1.0 / per_sec))?.allow_burst(burst);
        Some(RateLimiter {
            per_sec,
            burst: burst.get(),
            keys: RandomState::new(),
            limiter: governor::RateLimiter::new(quota, BoundedStore::new(max_keys), clock),
        })
    }

    pub fn check(&self, key: impl Hash) -> Decision {
        let key = self.keys.hash_one(key);
        let limit = u64::from(self.burst);
        match self.limiter.check_key(&key) {
            Ok(state) => {
                let remaining = u64::from(state.remaining_burst_capacity());
                let until_full = (limit - remaining.min(limit)) as f64 / self.per_sec;
                Decision {
                    allowed: true,
                    limit,
                    remaining,
                    reset_secs: until_full.ceil() as u64,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.limiter.clock().now());
                Decision {
                    allowed: false,
                    limit,
                    remaining: 0,
                    reset_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                }
            }
        }
    }
}

impl Decision {
    fn write(&self, headers: &mut HeaderMap) {
        headers.insert(LIMIT.clone(), HeaderValue::from(self.limit));
        headers.insert(REMAINING.clone(), HeaderValue::from(self.remaining));
        headers.insert(RESET.clone(), HeaderValue::from(self.reset_secs));
    }

    /// The 429 for a refused request.
    pub fn refusal(&self) -> Response {
        let mut response = ApiError::RateLimited {
            retry_after_secs: self.reset_secs.max(1),
        }
        .into_response();
        self.write(response.headers_mut());
        response
    }
}

/// The API's request limits.
#[derive(Debug)]
pub struct Limits {
    auth: Arc<Auth>,
    per_user: Option<RateLimiter>,
    per_ip: Option<RateLimiter>,
    login_per_ip: Option<RateLimiter>,
    login_per_user: Option<RateLimiter>,
    trust_forwarded_for: bool,
}

impl Limits {
    pub fn new(auth: Arc<Auth>, cfg: &HttpConfig) -> Self {
        let per_min = cfg.login_attempts_per_minute;
        let max_keys = cfg.rate_limit_max_keys;
        let login = || RateLimiter::new(f64::from(per_min) / 60.0, per_min, max_keys);
        // Bursts of twice the rate per second.
        let api = |per_sec: u32| {
            RateLimiter::new(f64::from(per_sec), per_sec.saturating_mul(2), max_keys)
        };
        Limits {
            auth,
            per_user: api(cfg.rate_limit_per_user),
            per_ip: api(cfg.rate_limit_per_ip),
            login_per_ip: login(),
            login_per_user: login(),
            trust_forwarded_for: cfg.trust_forwarded_for,
        }
    }

    /// A login attempt (or another password check) from `client`: the
    /// refusal when that address has used up its attempts. Checked first,
    /// before anything the client sent is looked at, so that a refused
    /// client costs nothing more.
    pub fn login_from(&self, client: &str) -> Option<Decision> {
        let limiter = self.login_per_ip.as_ref()?;
        Some(limiter.check(client)).filter(|d| !d.allowed)
    }

    /// A password check for `username`: the refusal when that user's
    /// attempts are used up. Takes a [`Username`] only: a name that is not
    /// valid never becomes a key.
    pub fn login_as(&self, username: &Username) -> Option<Decision> {
        let limiter = self.login_per_user.as_ref()?;
        Some(limiter.check(username.as_str())).filter(|d| !d.allowed)
    }
}

impl Limits {
    /// The client's address: the peer's, or behind a trusted reverse proxy
    /// (`YMERA_TRUST_FORWARDED_FOR`), the last address of
    /// `X-Forwarded-For`: the one that proxy saw (earlier entries are the
    /// client's own say and can be forged).
    pub fn client_address(
        &self,
        extensions: &axum::http::Extensions,
        headers: &HeaderMap,
    ) -> String {
        if self.trust_forwarded_for
            && let Some(ip) = headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit(',').next())
                .and_then(|v| v.trim().parse::<std::net::IpAddr>().ok())
        {
            return ip.to_string();
        }
        extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or_else(|| "unknown".to_owned(), |c| c.0.ip().to_string())
    }
}

/// Middleware: limits each user, whichever of their tokens they send (or,
/// without a valid token, each address).
/// With no limit set it leaves the token alone: the handler's extractor
/// verifies it if the route needs one.
pub async fn rate_limit(State(limits): State<Arc<Limits>>, req: Request, next: Next) -> Response {
    if limits.per_user.is_none() && limits.per_ip.is_none() {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let decision = match auth::authenticate(&mut parts, &limits.auth).await {
        Ok(claims) => limits
            .per_user
            .as_ref()
            .map(|l| l.check(claims.sub.as_str())),
        Err(_) => limits
            .per_ip
            .as_ref()
            .map(|l| l.check(limits.client_address(&parts.extensions, &parts.headers))),
    };
    let req = Request::from_parts(parts, body);
    match decision {
        None => next.run(req).await,
        Some(d) if !d.allowed => d.refusal(),
        Some(d) => {
            let mut response = next.run(req).await;
            d.write(response.headers_mut());
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn limiter(
        per_sec: f64,
        burst: u32,
        max_keys: usize,
    ) -> (RateLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let l = RateLimiter::with_clock(per_sec, burst, max_keys, clock.clone()).unwrap();
        (l, clock)
    }

    #[test]
    fn buckets_allow_a_burst_then_refill() {
        let (l, clock) = limiter(2.0, 4, 100);
        for i in 0..4 {
            let d = l.check("k");
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 3 - i);
        }
        let refused = l.check("k");
        assert!(!refused.allowed);
        assert_eq!(refused.reset_secs, 1);
        assert!(l.check("other").allowed, "keys are independent");
        clock.advance(Duration::from_millis(600));
        assert!(l.check("k").allowed, "refilled at 2/s");
        assert!(RateLimiter::new(0.0, 10, 100).is_none(), "0 means no limit");
    }

    #[test]
    fn the_table_stays_bounded_and_keeps_the_busiest_buckets() {
        let (l, _clock) = limiter(1.0, 2, 1_600);
        // A drained bucket.
        for _ in 0..3 {
            l.check("victim");
        }
        for i in 0..100_000u32 {
            l.check(i);
        }
        assert!(
            !l.check("victim").allowed,
            "a drained bucket survives a flood of others"
        );
        let kept = l.limiter.into_state_store().len();
        assert!(kept <= 1_600, "{kept} buckets");
    }
}
