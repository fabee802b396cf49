//! Retry policy: exponential backoff with jitter, and the waits servers ask
//! for (`Retry-After` in seconds or as an HTTP-date, `X-RateLimit-Reset` in
//! epoch seconds, Matrix's JSON `retry_after_ms`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use reqwest::header::HeaderMap;

/// How often and how long to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (1 = no retry).
    pub max_attempts: u32,
    /// First backoff step; doubles per attempt.
    pub base: Duration,
    /// Upper bound of one backoff step.
    pub max_backoff: Duration,
    /// Longest wait a server may ask for (`Retry-After` …); a longer one
    /// fails the request at once instead of stalling the sync.
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_wait: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// Backoff before attempt `attempt + 1` (`attempt` ≥ 1 failed so far):
    /// `base · 2^(attempt-1)`, capped, with "equal jitter" (between half and
    /// the whole step) so that parallel clients spread out.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let step = exp.min(self.max_backoff);
        let half = step / 2;
        let jitter = rand::thread_rng().gen_range(0..=half.as_millis() as u64);
        half + Duration::from_millis(jitter)
    }
}

/// Parse a `Retry-After` value: delta-seconds or an HTTP-date (IMF-fixdate,
/// also RFC 850 / asctime are not accepted; servers send IMF-fixdate).
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = v.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Some(Duration::from_secs_f64(secs));
        }
    }
    let at = DateTime::parse_from_rfc2822(v).ok()?.with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

/// Parse an `X-RateLimit-Reset` value: epoch seconds (values below 10⁹ are
/// taken as seconds from now, as some APIs send them).
pub fn parse_rate_limit_reset(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let n: f64 = value.trim().parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    if n < 1e9 {
        return Some(Duration::from_secs_f64(n));
    }
    let now_s = now.timestamp_millis() as f64 / 1000.0;
    Some(Duration::from_secs_f64((n - now_s).max(0.0)))
}

/// The wait a rate-limited or unavailable answer asks for, if any:
/// `Retry-After`, then `X-RateLimit-Reset` (only on 429), then a JSON body's
/// `retry_after_ms` (Matrix `M_LIMIT_EXCEEDED`).
pub fn server_wait(status: u16, headers: &HeaderMap, body: &[u8]) -> Option<Duration> {
    let now = Utc::now();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(d) = header("retry-after").and_then(|v| parse_retry_after(v, now)) {
        return Some(d);
    }
    if status == 429 {
        if let Some(d) = header("x-ratelimit-reset")
            .or_else(|| header("x-rate-limit-reset"))
            .and_then(|v| parse_rate_limit_reset(v, now))
        {
            return Some(d);
        }
    }
    if body.len() < 64 * 1024 && body.first().is_some_and(|b| *b == b'{') {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
            if let Some(ms) = v.get("retry_after_ms").and_then(|m| m.as_u64()) {
                return Some(Duration::from_millis(ms));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn retry_after_forms() {
        let now = Utc.with_ymd_and_hms(2015, 10, 21, 7, 28, 0).unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 3 ", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        // A date in the past: retry now.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn rate_limit_reset_forms() {
        let now = Utc.timestamp_opt(1_700_000_000, 0).unwrap();
        assert_eq!(
            parse_rate_limit_reset("1700000042", now),
            Some(Duration::from_secs(42))
        );
        assert_eq!(
            parse_rate_limit_reset("7", now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_rate_limit_reset("1600000000", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_rate_limit_reset("x", now), None);
    }

    #[test]
    fn server_wait_sources() {
        let mut h = HeaderMap::new();
        h.insert("x-rate-limit-reset", "5".parse().unwrap());
        assert_eq!(server_wait(429, &h, b""), Some(Duration::from_secs(5)));
        assert_eq!(server_wait(503, &h, b""), None);
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(server_wait(503, &h, b""), Some(Duration::from_secs(2)));
        let body = br#"{"errcode":"M_LIMIT_EXCEEDED","retry_after_ms":1500}"#;
        assert_eq!(
            server_wait(429, &HeaderMap::new(), body),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            base: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            max_wait: Duration::from_secs(1),
        };
        for _ in 0..50 {
            let b1 = p.backoff(1);
            assert!(b1 >= Duration::from_millis(50) && b1 <= Duration::from_millis(100));
            let b3 = p.backoff(3);
            assert!(b3 >= Duration::from_millis(200) && b3 <= Duration::from_millis(400));
            let b9 = p.backoff(9);
            assert!(b9 >= Duration::from_millis(500) && b9 <= Duration::from_millis(1000));
        }
    }
}
