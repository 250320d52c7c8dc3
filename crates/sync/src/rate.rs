//! A bandwidth cap: a token bucket shared by every stream of one client.
//!
//! A fleet-wide rollout must not flatten a branch office's WAN link, so a point can
//! cap its transfer rate (`--max-rate`). Every body chunk sent or received takes its
//! size in tokens; the bucket refills at `rate` bytes per second and holds at most
//! a quarter of a second's worth, so short bursts pass and the average holds. Taking
//! more than is there goes into debt and sleeps it off; for downloads that delay
//! stops reading the socket, and TCP's flow control slows the sender.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct RateLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// A cap of `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64) -> RateLimiter {
        let rate = bytes_per_sec.max(1) as f64;
        let burst = (rate / 4.0).max(16.0 * 1024.0);
        RateLimiter {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// Account for `n` bytes, waiting as long as the cap requires.
    pub async fn take(&self, n: usize) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
            s.0 = (s.0 + refill).min(self.burst) - n as f64;
            s.1 = now;
            if s.0 < 0.0 {
                Duration::from_secs_f64(-s.0 / self.rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}
