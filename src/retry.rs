//! Retry helpers shared by the controller and the ingress.

use std::time::Duration;

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
}
