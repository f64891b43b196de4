//! Retry helpers shared by the controller and the ingress.

use std::time::{Duration, SystemTime};

/// Exponential backoff with "equal jitter": attempt `n` (1-based) waits a random
/// time between half and all of `base * 2^(n-1)`, capped at `max`, and never less
/// than `at_least` (e.g. a `Retry-After`), which is itself capped at `max`: a
/// huge Retry-After cannot park anything for longer than the longest backoff.
pub fn backoff_delay(
    base: Duration,
    max: Duration,
    attempt: u32,
    at_least: Option<Duration>,
) -> Duration {
    let step = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(max);
    let half = step / 2;
    let jitter = Duration::from_secs_f64(half.as_secs_f64() * rand::random::<f64>());
    (half + jitter).max(at_least.unwrap_or_default().min(max))
}

/// The delay a `Retry-After` header value asks for: delay-seconds or an
/// HTTP-date (RFC 9110 §10.2.3; IMF-fixdate and the two obsolete formats
/// recipients must accept). A date in the past asks for no delay; an
/// unparsable value for nothing. Callers cap it (see [`backoff_delay`]).
pub fn retry_after(value: &str) -> Option<Duration> {
    retry_after_at(value, SystemTime::now())
}

/// [`retry_after`] as of `now`.
pub fn retry_after_at(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Longer than u64 seconds: as long as can be (capped by the caller).
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// An error and its sources, joined with ": ", for messages and logs.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_their_step() {
        let (base, max) = (Duration::from_secs(1), Duration::from_secs(30));
        for attempt in 1..10 {
            let step = (base * 2u32.pow(attempt - 1)).min(max);
            let d = backoff_delay(base, max, attempt, None);
            assert!(d >= step / 2 && d <= step, "attempt {attempt}: {d:?}");
        }
        assert_eq!(
            backoff_delay(base, max, 1, Some(Duration::from_secs(9))),
            Duration::from_secs(9)
        );
        assert_eq!(
            backoff_delay(base, max, 1, Some(Duration::from_secs(999_999_999))),
            max
        );
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        // 1994-11-06T08:49:37Z, the example date of RFC 9110.
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        let at = |v: &str| retry_after_at(v, now);
        assert_eq!(at("120"), Some(Duration::from_secs(120)));
        assert_eq!(at(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(at("0"), Some(Duration::ZERO));
        assert_eq!(
            at("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        // The three formats RFC 9110 makes recipients accept, 30 s ahead.
        for date in [
            "Sun, 06 Nov 1994 08:50:07 GMT",
            "Sunday, 06-Nov-94 08:50:07 GMT",
            "Sun Nov  6 08:50:07 1994",
        ] {
            assert_eq!(at(date), Some(Duration::from_secs(30)), "{date}");
        }
        // A date in the past: no delay.
        assert_eq!(at("Sun, 06 Nov 1994 08:00:00 GMT"), Some(Duration::ZERO));
        for bad in ["", "-1", "1.5", "soon", "Sun, 32 Nov 1994 08:50:07 GMT"] {
            assert_eq!(at(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_far_retry_after_date_is_capped_like_seconds() {
        let (base, max) = (Duration::from_secs(1), Duration::from_secs(30));
        let far = retry_after("Fri, 31 Dec 9999 23:59:59 GMT");
        assert!(far.is_some_and(|d| d > max));
        assert_eq!(backoff_delay(base, max, 1, far), max);
    }
}
