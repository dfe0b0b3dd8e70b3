//! Bounded retries for state that converges (linkerd's `assert_eventually!`).

use std::future::Future;
use std::time::Duration;

use anyhow::{Result, anyhow};
use tokio::time::Instant;

/// How long [`eventually`] sleeps between attempts.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// Runs `attempt` until it succeeds or `timeout` has passed, returning the first success or the
/// last error. Each attempt is itself cut off at the deadline, so a hanging attempt cannot stretch
/// the bound.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let error = match tokio::time::timeout_at(deadline, attempt()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(err)) => err,
            Err(_) => anyhow!("attempt still running at the deadline"),
        };
        if Instant::now() + RETRY_INTERVAL >= deadline {
            return Err(error.context(format!(
                "still failing after {timeout:?} ({attempts} attempts)"
            )));
        }
        tokio::time::sleep(RETRY_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn returns_the_first_success() {
        let calls = AtomicU32::new(0);
        let value = eventually(Duration::from_secs(5), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            if n < 3 {
                Err(anyhow!("not yet"))
            } else {
                Ok(n)
            }
        })
        .await
        .expect("converges");
        assert_eq!(value, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_with_the_last_error() {
        let err = eventually(Duration::from_secs(1), || async {
            Err::<(), _>(anyhow!("never"))
        })
        .await
        .expect_err("times out");
        let text = format!("{err:#}");
        assert!(
            text.contains("never") && text.contains("still failing after 1s"),
            "{text}"
        );
    }
}
