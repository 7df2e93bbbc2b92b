//! The work this worker process holds, tagged with the job and attempt it was assigned for:
//! starting (rendezvous and communicator set-up on a task), running on its own thread, or ended
//! with an outcome not yet reported. Asking it to stop at the next step, and dropping it at once
//! when it is stale or the process leaves, go through here.

use crate::client::CoordinatorClient;
use crate::comm::{Collective, GroupAbort};
use crate::error::WorkerError;
use crate::job::{self, RingBind};
use crate::train::ProgressEvent;
use crate::work::{Work, WorkOutcome};
use kormlm_proto::v1::Assignment;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tch::Device;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// How the work ended: its outcome, or why it failed.
pub type Finished = Result<WorkOutcome, WorkerError>;

/// The work's thread did not end within the time it was given after being dropped.
#[derive(Debug, thiserror::Error)]
#[error("the work of {job_id} attempt {attempt} did not stop within {waited_s} s of being dropped")]
pub struct StillRunning {
    pub job_id: String,
    pub attempt: u32,
    pub waited_s: u64,
}

enum Phase {
    /// Decoding the assignment and forming the collective group.
    Starting(JoinHandle<Result<oneshot::Receiver<Finished>, WorkerError>>),
    /// On its thread; the receiver resolves when the thread ends.
    Running(oneshot::Receiver<Finished>),
    /// Ended; the outcome is not reported yet.
    Ended(Finished),
}

pub struct HeldWork {
    pub job_id: String,
    pub attempt: u32,
    stop: Arc<AtomicBool>,
    abort: GroupAbort,
    progress: watch::Receiver<Option<ProgressEvent>>,
    phase: Phase,
}

impl HeldWork {
    /// Starts the assignment's work. Checking `unchecked_device` (when the device was not
    /// checked before registering), decoding the assignment and forming the group run on a task,
    /// so the daemon keeps heart-beating meanwhile; the work itself then runs on its own thread.
    pub fn start(
        client: CoordinatorClient,
        assignment: Assignment,
        ring_bind: RingBind,
        unchecked_device: Option<Device>,
    ) -> Self {
        let (progress_tx, progress) = watch::channel(None);
        let stop = Arc::new(AtomicBool::new(false));
        let abort = GroupAbort::default();
        let (job_id, attempt) = (assignment.job_id.clone(), assignment.attempt);
        let task = {
            let (stop, abort) = (stop.clone(), abort.clone());
            tokio::spawn(async move {
                if let Some(device) = unchecked_device {
                    tokio::task::spawn_blocking(move || crate::device::check(device))
                        .await
                        .map_err(WorkerError::StartUp)??;
                }
                let mut client = client;
                start_work(&mut client, &assignment, &ring_bind, progress_tx, stop, &abort).await
            })
        };
        Self {
            job_id,
            attempt,
            stop,
            abort,
            progress,
            phase: Phase::Starting(task),
        }
    }

    /// Whether `assignment` is the one this work came from (a coordinator that restarted gives
    /// the same job and attempt back; a job that moved on gives another attempt).
    pub fn is_for(&self, assignment: &Assignment) -> bool {
        self.job_id == assignment.job_id && self.attempt == assignment.attempt
    }

    /// The work's latest progress.
    pub fn progress(&self) -> Option<ProgressEvent> {
        self.progress.borrow().clone()
    }

    /// Asks the work to stop after its current step, on the step every rank agrees on (while it
    /// is still starting: right after its first step, together with its peers).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// The outcome, once the work has ended.
    pub fn ended(&self) -> Option<&Finished> {
        match &self.phase {
            Phase::Ended(outcome) => Some(outcome),
            _ => None,
        }
    }

    pub fn into_ended(self) -> Option<Finished> {
        match self.phase {
            Phase::Ended(outcome) => Some(outcome),
            _ => None,
        }
    }

    /// Waits until the work moves on: started (or failed to start), or ended. Never resolves
    /// once it has ended. Cancel-safe.
    pub async fn advance(&mut self) {
        match &mut self.phase {
            Phase::Starting(task) => {
                self.phase = match task.await.map_err(WorkerError::StartUp).and_then(|r| r) {
                    Ok(done) => Phase::Running(done),
                    Err(e) => Phase::Ended(Err(e)),
                };
            }
            Phase::Running(done) => {
                // The work thread sends before it ends, panics included; a closed channel is a bug.
                let outcome = done
                    .await
                    .unwrap_or_else(|_| Err(WorkerError::Panicked("the work thread ended without a result".into())));
                self.phase = Phase::Ended(outcome);
            }
            Phase::Ended(_) => std::future::pending().await,
        }
    }

    /// Gives the work up without waiting for it (the process ends now): it is asked to stop and
    /// its group is aborted, so its peers see the connections close.
    pub fn abandon(&self) {
        self.request_stop();
        self.abort.abort();
    }

    /// Lets the work go: asks it to stop and gives it `stop_within` to end by itself (at the next
    /// step every rank agrees on, checkpointed); then aborts its group — a set-up or collective
    /// it is blocked in returns at once — and waits at most `drain` more for its thread (a file
    /// it is writing gets finished). Its outcome is discarded, never reported.
    pub async fn release(mut self, stop_within: Duration, drain: Duration) -> Result<(), StillRunning> {
        self.request_stop();
        if !stop_within.is_zero() && tokio::time::timeout(stop_within, self.until_ended()).await.is_ok() {
            return Ok(());
        }
        self.abandon();
        if let Phase::Starting(task) = &self.phase {
            // The rendezvous is cancelled here; a set-up on a blocking thread sees the abort.
            task.abort();
        }
        let (job_id, attempt) = (self.job_id.clone(), self.attempt);
        tokio::time::timeout(drain, self.until_ended())
            .await
            .map_err(|_| StillRunning {
                job_id,
                attempt,
                waited_s: (stop_within + drain).as_secs(),
            })
    }

    async fn until_ended(&mut self) {
        loop {
            if let Some(outcome) = self.ended() {
                if let Err(e) = outcome {
                    tracing::info!(job_id = %self.job_id, attempt = self.attempt, error = %e, "released work ended");
                }
                return;
            }
            self.advance().await;
        }
    }
}

/// Runs `run` on a new thread named `name`; its outcome (a panic as an error) goes to `done`,
/// and only then is `group` dropped: a failing rank hands its report to the daemon first, and
/// dropping the group aborts it on a detached thread (never the collective destroy), so nothing
/// between the failure and the report waits for a peer.
fn spawn_work_thread(
    name: &str,
    run: impl FnOnce() -> (Finished, Option<Box<dyn Collective + Send>>) + Send + 'static,
    done: oneshot::Sender<Finished>,
) -> Result<(), WorkerError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let (outcome, group) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
                .unwrap_or_else(|payload| (Err(WorkerError::from_panic(payload.as_ref())), None));
            if let Err(e) = &outcome {
                tracing::error!(error = %e, kind = %e.kind(), "work failed");
            }
            let _ = done.send(outcome);
            drop(group);
        })
        .map(drop)
        .map_err(WorkerError::Thread)
}

/// Decodes the assignment and starts its work on its own thread: training (after forming the
/// collective group) or this rank's chunks of an augmentation. Returns what resolves when the
/// thread ends.
async fn start_work(
    client: &mut CoordinatorClient,
    assignment: &Assignment,
    ring_bind: &RingBind,
    progress: watch::Sender<Option<ProgressEvent>>,
    stop: Arc<AtomicBool>,
    abort: &GroupAbort,
) -> Result<oneshot::Receiver<Finished>, WorkerError> {
    let (done_tx, done) = oneshot::channel();
    match Work::from_assignment(assignment)? {
        Work::Train(job) => {
            let group = job::form_group(client, assignment, job.device, ring_bind, abort).await?;
            let run = move || {
                let mut group = group;
                let trained = job::run_training(&job, group.as_mut(), progress, stop);
                (trained.map(WorkOutcome::Train).map_err(WorkerError::from), Some(group))
            };
            spawn_work_thread("train", run, done_tx)?;
        }
        Work::Classify(job) => {
            let group = job::form_group(client, assignment, job.train.device, ring_bind, abort).await?;
            let run = move || {
                let mut group = group;
                let trained = job::run_classifier_training(&job, group.as_mut(), progress, stop);
                (trained.map(WorkOutcome::Classify), Some(group))
            };
            spawn_work_thread("classify", run, done_tx)?;
        }
        Work::Augment(job) => {
            let ranks = (assignment.rank as usize, assignment.world_size as usize);
            let run = move || {
                let augmented = job::run_augmentation(&job, ranks, progress, stop);
                (augmented.map(WorkOutcome::Augment), None)
            };
            spawn_work_thread("augment", run, done_tx)?;
        }
        Work::AugmentEval(job) => {
            let ranks = (assignment.rank as usize, assignment.world_size as usize);
            let run = move || {
                let evaluated = job::run_augment_eval(&job, ranks, progress, stop);
                (evaluated.map(WorkOutcome::AugmentEval), None)
            };
            spawn_work_thread("augment-eval", run, done_tx)?;
        }
    }
    Ok(done)
}
