//! Capped exponential backoff with jitter, so that a thousand agents that lost etcd, a module
//! server or their collector at the same moment do not come back in step.

use std::time::Duration;

/// Delays between retries: each is a random point in the upper half of a window that doubles
/// from `base` up to `cap`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The delay before the next retry.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let window = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = window / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// Call after a success: the next failure starts from `base` again.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..30 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(5) && d >= Duration::from_millis(50));
        }
        let late: Vec<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(late.iter().all(|d| *d >= Duration::from_millis(2500)));
        assert!(late.windows(2).any(|w| w[0] != w[1]), "jittered");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
