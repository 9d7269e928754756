//! The shape of this host's background workers (announcer, session-reaper,
//! repair, copy-dropper, gc, return, scrub): each does one step at a time,
//! says how long to wait before the next, and runs until the host stops.
//! A failing step is logged and retried after a growing back-off; the
//! worker's state line, if it shows one in `fsctl status`, says so.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::lock::lock;

/// A background job: one step at a time, for as long as the host runs.
pub(crate) trait Worker: Send + Sync + 'static {
    /// Its name in the logs.
    fn name(&self) -> &'static str;

    /// Does one step; returns how long to wait before the next.
    fn step(&self) -> impl Future<Output = anyhow::Result<Duration>> + Send;

    /// The line `fsctl status` shows for it, if any.
    fn state(&self) -> Option<&WorkerState> {
        None
    }
}

/// What a worker is doing, in a few words ("idle", "repairing 12 blocks").
pub(crate) struct WorkerState(Mutex<String>);

impl WorkerState {
    pub(crate) fn new(initial: &str) -> WorkerState {
        WorkerState(Mutex::new(initial.into()))
    }

    pub(crate) fn set(&self, s: impl Into<String>) {
        *lock(&self.0) = s.into();
    }

    pub(crate) fn get(&self) -> String {
        lock(&self.0).clone()
    }
}

/// Tells the workers to stop; they stop between steps or while waiting,
/// and a step under way is dropped.
pub(crate) struct Shutdown(watch::Sender<bool>);

impl Shutdown {
    pub(crate) fn new() -> Shutdown {
        Shutdown(watch::channel(false).0)
    }

    /// Runs `worker` on a task of its own until `stop` is called.
    pub(crate) fn spawn<W: Worker>(&self, worker: Arc<W>) -> JoinHandle<()> {
        let mut stop = self.0.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                () = run(&*worker) => {}
                _ = stop.wait_for(|stopped| *stopped) => {}
            }
        })
    }

    /// Stops every worker spawned here and waits for them to finish.
    pub(crate) async fn stop(self, workers: Vec<JoinHandle<()>>) {
        let _ = self.0.send(true);
        for w in workers {
            let _ = w.await;
        }
    }
}

/// The pause after `failures` failed steps in a row: a quarter second more
/// for each, up to two seconds.
fn back_off(failures: u32) -> Duration {
    Duration::from_millis(250 * u64::from(failures.min(8)))
}

/// Whether the `failures`th failure in a row is worth a log line: the first
/// few, then one in twenty.
fn worth_logging(failures: u32) -> bool {
    failures <= 3 || failures.is_multiple_of(20)
}

async fn run<W: Worker>(worker: &W) {
    let mut failures = 0u32;
    loop {
        let pause = match worker.step().await {
            Ok(next) => {
                failures = 0;
                next
            }
            Err(e) => {
                failures += 1;
                let error = format!("{e:#}");
                if worth_logging(failures) {
                    tracing::warn!(worker = worker.name(), %error, "worker step failed");
                }
                if let Some(state) = worker.state() {
                    state.set(format!("error: {error}"));
                }
                back_off(failures)
            }
        };
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Flaky {
        steps: AtomicU32,
        state: WorkerState,
    }

    impl Worker for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }

        async fn step(&self) -> anyhow::Result<Duration> {
            let n = self.steps.fetch_add(1, Ordering::SeqCst);
            anyhow::ensure!(n % 2 == 1, "step {n} failed");
            self.state.set("fine");
            Ok(Duration::from_secs(1))
        }

        fn state(&self) -> Option<&WorkerState> {
            Some(&self.state)
        }
    }

    #[test]
    fn failures_back_off_up_to_two_seconds_and_are_logged_sparingly() {
        assert_eq!(back_off(1), Duration::from_millis(250));
        assert_eq!(back_off(100), Duration::from_secs(2));
        let logged: Vec<u32> = (1..=60).filter(|&f| worth_logging(f)).collect();
        assert_eq!(logged, vec![1, 2, 3, 20, 40, 60]);
    }

    #[tokio::test]
    async fn a_worker_steps_backs_off_on_errors_and_stops_when_told() {
        tokio::time::pause();
        let w = Arc::new(Flaky {
            steps: AtomicU32::new(0),
            state: WorkerState::new("starting"),
        });
        let shutdown = Shutdown::new();
        let handle = shutdown.spawn(w.clone());
        // Step 0 fails: its error is the state until step 1, a back-off later.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(w.steps.load(Ordering::SeqCst), 1);
        assert_eq!(w.state.get(), "error: step 0 failed");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(w.steps.load(Ordering::SeqCst), 2);
        assert_eq!(w.state.get(), "fine");
        shutdown.stop(vec![handle]).await;
        let after = w.steps.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(w.steps.load(Ordering::SeqCst), after, "stopped");
    }
}
