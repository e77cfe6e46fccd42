//! Pauses for background loops that must outlive an outage (the worker's queue poll, the
//! webhook event processor): after each failure in a row the pause doubles, with jitter so that
//! many processes do not hammer a recovering database in step, up to a ceiling that bounds how
//! long after the dependency's return the loop notices; one success resets it.
//!
//! The delays come from `backon` (the crate the Label Studio client retries with); this type
//! only keeps the state across iterations of a loop that never gives up.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// The growing pause of a loop whose passes fail in a row.
#[derive(Debug)]
pub struct LoopBackoff {
    builder: ExponentialBuilder,
    current: Option<ExponentialBackoff>,
    ceiling: Duration,
    failures: u64,
}

impl LoopBackoff {
    /// Pauses from `first` doubling up to `ceiling` (both jittered upwards by at most their own
    /// length by backon).
    pub fn new(first: Duration, ceiling: Duration) -> LoopBackoff {
        LoopBackoff {
            builder: ExponentialBuilder::default()
                .with_min_delay(first)
                .with_max_delay(ceiling.max(first))
                .with_jitter()
                .without_max_times(),
            current: None,
            ceiling: ceiling.max(first),
            failures: 0,
        }
    }

    /// A pass failed: how long to wait before the next one.
    pub fn failed(&mut self) -> Duration {
        self.failures += 1;
        let builder = self.builder;
        self.current
            .get_or_insert_with(|| builder.build())
            .next()
            // Never reached: the builder has no limit on attempts.
            .unwrap_or(self.ceiling)
    }

    /// A pass succeeded: the next failure starts again from the first pause.
    pub fn succeeded(&mut self) {
        self.current = None;
        self.failures = 0;
    }

    /// Failures since the last success (0 when the loop is healthy).
    pub fn failures(&self) -> u64 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_the_ceiling_and_reset_after_a_success() {
        let mut b = LoopBackoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let pauses: Vec<Duration> = (0..8).map(|_| b.failed()).collect();
        assert_eq!(b.failures(), 8);
        // Jitter adds at most the pause itself: the first is in [100 ms, 200 ms].
        assert!(pauses[0] >= Duration::from_millis(100) && pauses[0] <= Duration::from_millis(200));
        // Without jitter the fifth would be 1.6 s; with it never under that.
        assert!(pauses[4] >= Duration::from_millis(1600), "{pauses:?}");
        // Capped: never more than twice the ceiling (jitter included), whatever the count.
        assert!(
            pauses.iter().all(|p| *p <= Duration::from_secs(4)),
            "{pauses:?}"
        );
        b.succeeded();
        assert_eq!(b.failures(), 0);
        assert!(b.failed() <= Duration::from_millis(200));
    }
}
