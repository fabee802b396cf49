//! A token bucket: at most `rate` requests per second on average, bursts of
//! up to `burst`. One per connector instance (shared by all its requests).

use std::time::{Duration, Instant};

/// The bucket. [`TokenBucket::acquire`] reserves a token and sleeps until it
/// is due, so concurrent callers are spaced in arrival order.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: std::sync::Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// `rate` tokens per second (> 0), at most `burst` (≥ 1) stored; starts full.
    pub fn new(rate: f64, burst: u32) -> TokenBucket {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: if rate.is_finite() && rate > 0.0 {
                rate
            } else {
                1.0
            },
            burst,
            state: std::sync::Mutex::new((burst, Instant::now())),
        }
    }

    /// Reserve one token; returns how long the caller must wait for it.
    pub fn reserve(&self) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.rate).min(self.burst);
        s.1 = now;
        s.0 -= 1.0;
        if s.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.0 / self.rate)
        }
    }

    /// Wait for a token.
    pub async fn acquire(&self) {
        let wait = self.reserve();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}
