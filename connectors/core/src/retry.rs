//! The one retry policy. Every loop that retries a transient failure (the source's reconnects,
//! each target's writes, the commands' reads and writes) waits out the same jittered
//! exponential backoff, gives up after the same kind of budget (`retry_for`, counted from the
//! first failure of a run of failures), and stops waiting at once on shutdown.
//!
//! [`retry`] wraps one operation; [`Backoff`] is the same policy for loops that retry a whole
//! session (and start the budget afresh once a session got going).

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use crate::error::{action, Action, Classify};
use crate::shutdown::Shutdown;

/// How long and how fast transient failures are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Give up once a run of failures has lasted this long.
    pub retry_for: Duration,
    /// The first delay.
    pub min_delay: Duration,
    /// The longest delay between two attempts.
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// Retries for `retry_for`, starting at 100 ms and doubling up to 5 s, with jitter.
    pub fn new(retry_for: Duration) -> Self {
        RetryPolicy { retry_for, min_delay: Duration::from_millis(100), max_delay: Duration::from_secs(5) }
    }

    /// The same budget with other delays.
    pub fn with_delays(self, min_delay: Duration, max_delay: Duration) -> Self {
        RetryPolicy { min_delay, max_delay, ..self }
    }
}

/// Why [`retry`] gave up.
#[derive(Debug)]
pub enum GaveUp<E> {
    /// The last error: not transient, or still failing when the budget was spent.
    Failed {
        /// The error of the last attempt.
        error: E,
        /// True when the error was transient and the budget ran out.
        exhausted: bool,
        /// How long the run of failures lasted.
        failing_for: Duration,
    },
    /// Shutdown was requested while waiting to try again.
    Shutdown,
}

impl<E> GaveUp<E> {
    /// The error, or `None` after shutdown.
    pub fn into_error(self) -> Option<E> {
        match self {
            GaveUp::Failed { error, .. } => Some(error),
            GaveUp::Shutdown => None,
        }
    }
}

/// The backoff of one run of failures, under a [`RetryPolicy`].
#[derive(Debug)]
pub struct Backoff {
    policy: RetryPolicy,
    delays: ExponentialBackoff,
    failing_since: Option<Instant>,
    attempts: u32,
}

impl Backoff {
    /// A fresh run: the next failure is the first.
    pub fn new(policy: RetryPolicy) -> Self {
        Backoff { policy, delays: delays(&policy), failing_since: None, attempts: 0 }
    }

    /// Records a failure; returns how long to wait before trying again, or `None` once the
    /// run of failures has lasted `retry_for`.
    pub fn next_delay(&mut self) -> Option<Duration> {
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        self.attempts += 1;
        if since.elapsed() >= self.policy.retry_for {
            return None;
        }
        let remaining = self.policy.retry_for.saturating_sub(since.elapsed());
        Some(self.delays.next().unwrap_or(self.policy.max_delay).min(remaining.max(Duration::from_millis(1))))
    }

    /// Ends the run of failures (an attempt succeeded, or a session got going).
    pub fn reset(&mut self) {
        *self = Backoff::new(self.policy);
    }

    /// How long the current run of failures has lasted.
    pub fn failing_for(&self) -> Duration {
        self.failing_since.map(|since| since.elapsed()).unwrap_or_default()
    }

    /// How long this run will still be retried.
    pub fn gives_up_in(&self) -> Duration {
        self.policy.retry_for.saturating_sub(self.failing_for())
    }

    /// Failures recorded in this run.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

fn delays(policy: &RetryPolicy) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(policy.min_delay)
        .with_max_delay(policy.max_delay)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Runs `attempt` until it succeeds, retrying transient errors under `policy` (a warning
/// naming `what`, the error, the delay and how long it will keep trying, and `on_retry`, for
/// each retry). Stops at the first error that is not transient, once the budget is spent, or
/// when `shutdown` is requested during a wait.
pub async fn retry<T, E, F, Fut>(
    policy: RetryPolicy,
    shutdown: &Shutdown,
    what: &str,
    mut attempt: F,
    mut on_retry: impl FnMut(&E),
) -> Result<T, GaveUp<E>>
where
    E: Classify + Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(policy);
    let mut shutdown = shutdown.clone();
    loop {
        let error = match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        if action(error.kind()) != Action::Retry {
            return Err(GaveUp::Failed { error, exhausted: false, failing_for: backoff.failing_for() });
        }
        let Some(delay) = backoff.next_delay() else {
            return Err(GaveUp::Failed { error, exhausted: true, failing_for: backoff.failing_for() });
        };
        on_retry(&error);
        tracing::warn!(
            error = %error,
            retry_in_ms = delay.as_millis() as u64,
            gives_up_in_s = backoff.gives_up_in().as_secs(),
            attempt = backoff.attempts(),
            "{what} failed; retrying"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.requested() => return Err(GaveUp::Shutdown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use std::cell::Cell;

    #[derive(Debug)]
    struct Failure(ErrorKind);

    impl Display for Failure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }

    impl Classify for Failure {
        fn kind(&self) -> ErrorKind {
            self.0
        }
    }

    fn quick(retry_for: Duration) -> RetryPolicy {
        RetryPolicy::new(retry_for).with_delays(Duration::from_millis(1), Duration::from_millis(2))
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success() {
        let calls = Cell::new(0);
        let mut retries = 0;
        let result = retry(
            quick(Duration::from_secs(10)),
            &Shutdown::never(),
            "test",
            || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move {
                    if n < 4 {
                        Err(Failure(ErrorKind::Transient))
                    } else {
                        Ok(n)
                    }
                }
            },
            |_| retries += 1,
        )
        .await;
        assert_eq!(result.unwrap(), 4);
        assert_eq!(retries, 3);
    }

    #[tokio::test]
    async fn poison_and_fatal_errors_are_not_retried() {
        for kind in [ErrorKind::Poison, ErrorKind::Fatal] {
            let calls = Cell::new(0);
            let result: Result<(), _> = retry(
                quick(Duration::from_secs(10)),
                &Shutdown::never(),
                "test",
                || {
                    calls.set(calls.get() + 1);
                    async move { Err(Failure(kind)) }
                },
                |_| {},
            )
            .await;
            assert!(matches!(result, Err(GaveUp::Failed { exhausted: false, .. })));
            assert_eq!(calls.get(), 1);
        }
    }

    #[tokio::test]
    async fn a_spent_budget_returns_the_last_error() {
        let result: Result<(), _> = retry(
            quick(Duration::from_millis(30)),
            &Shutdown::never(),
            "test",
            || async { Err(Failure(ErrorKind::Transient)) },
            |_| {},
        )
        .await;
        match result {
            Err(GaveUp::Failed { error, exhausted, failing_for }) => {
                assert_eq!(error.0, ErrorKind::Transient);
                assert!(exhausted);
                assert!(failing_for >= Duration::from_millis(30));
            }
            other => panic!("expected the budget to run out, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn shutdown_stops_the_wait() {
        let (trigger, shutdown) = Shutdown::new();
        let policy = RetryPolicy::new(Duration::from_secs(3600))
            .with_delays(Duration::from_secs(600), Duration::from_secs(600));
        let started = Instant::now();
        let waiting = retry(
            policy,
            &shutdown,
            "test",
            || async { Err::<(), _>(Failure(ErrorKind::Transient)) },
            |_| {},
        );
        let (result, ()) = tokio::join!(waiting, async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            trigger.trigger();
        });
        assert!(matches!(result, Err(GaveUp::Shutdown)));
        assert!(started.elapsed() < Duration::from_secs(60));
    }

    #[test]
    fn backoff_delays_stay_within_the_policy() {
        let policy = RetryPolicy::new(Duration::from_secs(60))
            .with_delays(Duration::from_millis(100), Duration::from_secs(1));
        let mut backoff = Backoff::new(policy);
        for _ in 0..20 {
            let delay = backoff.next_delay().unwrap();
            // Jitter adds up to one more delay.
            assert!(delay <= Duration::from_secs(2), "{delay:?}");
        }
        assert_eq!(backoff.attempts(), 20);
        backoff.reset();
        assert_eq!(backoff.attempts(), 0);
    }
}
