//! Background tasks (event consumers, schedules, repairs) that outlive a panic.
//!
//! A panic in a spawned task ends only that task: the process goes on serving, health stays
//! SERVING, and the work the task did (consuming a stream, expiring points) silently stops.
//! [`supervise`] starts the task again after a pause, logs the panic and counts it in
//! `loyalty_background_task_restarts_total{task}`.

use std::future::Future;
use std::time::Duration;

/// The pause before a panicked task starts again.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// Runs `make()` as a task, and again after each panic, until a run returns.
pub fn supervise<F, Fut>(task: &'static str, make: F) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    supervise_with_pause(task, RESTART_PAUSE, make)
}

fn supervise_with_pause<F, Fut>(
    task: &'static str,
    pause: Duration,
    make: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match tokio::spawn(make()).await {
                Ok(()) => return,
                Err(e) if e.is_panic() => {
                    tracing::error!(
                        task,
                        pause_ms = pause.as_millis() as u64,
                        "a background task panicked; starting it again"
                    );
                    metrics::counter!("loyalty_background_task_restarts_total", "task" => task)
                        .increment(1);
                    tokio::time::sleep(pause).await;
                }
                // Cancelled: the runtime is shutting down.
                Err(_) => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_panicked_task_runs_again_until_it_returns() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let handle = supervise_with_pause("test", Duration::from_millis(1), move || {
            let runs = counted.clone();
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("boom");
                }
            }
        });
        handle.await.unwrap();
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "two panics, then a clean return"
        );
    }
}
