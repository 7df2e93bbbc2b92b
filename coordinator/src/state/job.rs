//! A job as the coordinator tracks it — the spec it was submitted with, its life-cycle state and
//! what rank 0 reported — and the transitions between its states: submit, start, kill, fail
//! (with the restart decision), restart, settle, resume. Transitions are pure: they change the
//! `Job` and return the [`Effects`] the coordinator must carry out (persist the job, tell the
//! workers, forget the attempt's workers), so they are tested without a store or a lock.

use crate::error::CoordinatorError;
use crate::launch_plan::{self, Placement};
use crate::store::job_id;
use kormlm_proto::augment_args::AugmentArgs;
use kormlm_proto::augment_parts;
use kormlm_proto::ds_config::Batch;
use kormlm_proto::failure::FailureKind;
use kormlm_proto::job_plan::JobPlan;
use kormlm_proto::now_ms;
use kormlm_proto::v1::{CheckpointRef, DeviceKind, EarlyStopState, JobSpec, Progress, TaskKind};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Accepted and persisted; waiting for its workers to register.
    Pending,
    /// Every rank has registered.
    Running,
    /// A kill was requested; the workers finish the current step and exit.
    Stopping,
    Killed,
    Failed,
    Succeeded,
}

impl JobState {
    /// KILLED, FAILED and SUCCEEDED never change again, except through a resume.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Killed | Self::Failed | Self::Succeeded)
    }

    /// Not ended yet: the job takes workers (or still has them).
    pub fn is_active(self) -> bool {
        !self.is_terminal()
    }

    /// The name users see (as in `kormlm.proto`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Stopping => "STOPPING",
            Self::Killed => "KILLED",
            Self::Failed => "FAILED",
            Self::Succeeded => "SUCCEEDED",
        }
    }
}

/// What the coordinator tells a worker over its heartbeat stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderKind {
    /// Finish the current step, checkpoint, exit.
    StopAfterStep,
    /// Abort collectives now and exit (the attempt failed).
    Abort,
    /// Exit now; the job is over.
    Shutdown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub kind: OrderKind,
    pub reason: String,
}

/// Why an attempt of a job failed: the kind decides, the message is for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

/// A job moved from one state to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    pub from: JobState,
    pub to: JobState,
    pub message: String,
}

impl StateChange {
    /// The text of the job's `state` event.
    pub fn describe(&self) -> String {
        if self.message.is_empty() {
            format!("{} -> {}", self.from.name(), self.to.name())
        } else {
            format!("{} -> {}: {}", self.from.name(), self.to.name(), self.message)
        }
    }
}

/// What a transition asks of the coordinator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// The job changed state: persist it (durably) and record the event.
    pub change: Option<StateChange>,
    /// Send this to every worker with an open heartbeat stream.
    pub order: Option<Order>,
    /// A new attempt begins: forget the workers and the rendezvous of the old one.
    pub restarted: bool,
}

/// What a failure does to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Back to PENDING for a new attempt from the latest checkpoint.
    Restart,
    /// FAILED. `not_retryable`: restarts were left, but the kind fails every attempt alike.
    Fail { not_retryable: bool },
    /// A stop was already requested: KILLED.
    Kill,
    /// The job has already ended.
    Ignore,
}

/// The restart decision, by kind: a running job restarts while it has automatic restarts left
/// and the failure is retryable; a job still forming fails; a stopping job ends KILLED.
pub fn after_failure(state: JobState, kind: FailureKind, automatic_restarts: u32, max_restarts: u32) -> AfterFailure {
    let restarts_left = automatic_restarts < max_restarts;
    match state {
        JobState::Running if restarts_left && kind.retryable() => AfterFailure::Restart,
        JobState::Running => AfterFailure::Fail {
            not_retryable: restarts_left,
        },
        JobState::Pending => AfterFailure::Fail { not_retryable: false },
        JobState::Stopping => AfterFailure::Kill,
        JobState::Killed | JobState::Failed | JobState::Succeeded => AfterFailure::Ignore,
    }
}

/// Whether a reported failure waits briefly for a peer's loss before it counts: kinds that
/// usually follow a peer's loss do, so the lost rank is the one named. A failure without a kind
/// (from a worker build that does not classify its failures) might be one of them, so it waits
/// too.
pub fn waits_for_a_peer(kind: Option<FailureKind>) -> bool {
    kind.is_none_or(FailureKind::follows_a_peer)
}

/// What rank 0 reports about the job's progress.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Telemetry {
    pub progress: Option<Progress>,
    pub early_stop: Option<EarlyStopState>,
    /// A checkpoint every rank has written.
    pub checkpoint: Option<CheckpointRef>,
    pub best_checkpoint: Option<CheckpointRef>,
}

/// What recording telemetry changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// The global step moved: make the progress durable before anyone reads it.
    pub step_advanced: bool,
    /// A checkpoint that was not registered before.
    pub new_checkpoint: Option<CheckpointRef>,
}

/// Joining the part files of a finished augmentation attempt into its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AugmentMerge {
    pub attempt: u32,
    pub output: PathBuf,
}

impl AugmentMerge {
    /// Runs the merge (file I/O: call it without holding the state lock); the number of parts.
    pub fn run(&self) -> Result<usize, String> {
        augment_parts::merge(&augment_parts::parts_dir(&self.output), &self.output).map_err(|e| e.to_string())
    }
}

/// What settling a job whose ranks have all exited leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    Done(Effects),
    /// The parts must be merged first; [`Job::merged`] records the outcome.
    Merge(AugmentMerge),
}

/// The work one rank is given.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub job_id: String,
    pub rank: u32,
    pub local_rank: u32,
    pub world_size: u32,
    pub device: DeviceKind,
    pub cuda_devices: Vec<u32>,
    pub resolved_config_json: String,
    pub batch: Batch,
    pub args: HashMap<String, String>,
    pub task: TaskKind,
    pub heartbeat_interval: Duration,
    pub incarnation: u32,
    pub attempt: u32,
    pub output_dir: String,
    /// The checkpoint to continue from (empty: start fresh).
    pub resume_from: String,
}

/// A job: what was submitted and where it stands. Progress, early-stopping state and checkpoint
/// references are rank 0's telemetry, kept as the plain messages it sends.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub number: u64,
    pub id: String,
    /// The spec as submitted, with its task, device and output directory filled in; a resume
    /// with another world size changes its world size (and CPU placements).
    pub spec: JobSpec,
    /// The DeepSpeed config resolved for the world size, as workers receive it.
    pub resolved_config_json: String,
    pub batch: Batch,
    pub state: JobState,
    /// Why the job is in its state, for people.
    pub message: String,
    pub progress: Progress,
    pub early_stop: EarlyStopState,
    pub latest_checkpoint: Option<CheckpointRef>,
    pub best_checkpoint: Option<CheckpointRef>,
    pub created_unix_ms: i64,
    pub started_unix_ms: i64,
    pub ended_unix_ms: i64,
    /// Attempts after the first: automatic restarts and user resumes.
    pub restarts: u32,
    /// Restarts after failures (bounded by the spec's max_restarts).
    pub automatic_restarts: u32,
    pub output_dir: String,
}

impl Job {
    /// A new PENDING job from a spec and its resolution.
    pub fn submitted(number: u64, mut spec: JobSpec, plan: &JobPlan) -> Self {
        let id = job_id(number);
        spec.task = plan.task as i32;
        if spec.device == DeviceKind::Unspecified as i32 {
            spec.device = DeviceKind::Cpu as i32;
        }
        let output_dir = plan.train.output_dir_or(&id).display().to_string();
        spec.args.insert("output_dir".into(), output_dir.clone());
        let message = format!("waiting for {} worker(s) to register", spec.world_size);
        Self {
            number,
            id,
            resolved_config_json: plan.config.to_json(),
            batch: plan.config.batch,
            state: JobState::Pending,
            message,
            progress: Progress::default(),
            early_stop: EarlyStopState {
                max_stop_number: plan.train.max_stop_number,
                ..Default::default()
            },
            latest_checkpoint: None,
            best_checkpoint: None,
            created_unix_ms: now_ms(),
            started_unix_ms: 0,
            ended_unix_ms: 0,
            restarts: 0,
            automatic_restarts: 0,
            output_dir,
            spec,
        }
    }

    pub fn world_size(&self) -> u32 {
        self.spec.world_size
    }

    pub fn max_restarts(&self) -> u32 {
        self.spec.max_restarts
    }

    pub fn task(&self) -> TaskKind {
        match TaskKind::try_from(self.spec.task) {
            Ok(TaskKind::Augment) => TaskKind::Augment,
            _ => TaskKind::Train,
        }
    }

    pub fn device(&self) -> DeviceKind {
        match DeviceKind::try_from(self.spec.device) {
            Ok(DeviceKind::Cuda) => DeviceKind::Cuda,
            _ => DeviceKind::Cpu,
        }
    }

    /// Where the launch flags put the ranks (empty: workers place themselves).
    pub fn placements(&self) -> Vec<Placement> {
        self.spec.placements.iter().map(Placement::from).collect()
    }

    pub fn placement(&self, rank: u32) -> Option<Placement> {
        self.spec
            .placements
            .iter()
            .find(|p| p.rank == rank)
            .map(Placement::from)
    }

    /// The attempt the workers run now (1 for the first).
    pub fn attempt(&self) -> u32 {
        self.restarts + 1
    }

    /// A new attempt continues from the latest checkpoint; the first starts fresh.
    pub fn resume_from(&self) -> String {
        match (&self.latest_checkpoint, self.restarts) {
            (Some(c), restarts) if restarts > 0 => c.path.clone(),
            _ => String::new(),
        }
    }

    /// What rank `rank` is to do in this attempt.
    pub fn assignment(
        &self,
        rank: u32,
        local_rank: u32,
        cuda_devices: Vec<u32>,
        incarnation: u32,
        heartbeat_interval: Duration,
    ) -> Assignment {
        Assignment {
            job_id: self.id.clone(),
            rank,
            local_rank,
            world_size: self.world_size(),
            device: self.device(),
            cuda_devices,
            resolved_config_json: self.resolved_config_json.clone(),
            batch: self.batch,
            args: self.spec.args.clone(),
            task: self.task(),
            heartbeat_interval,
            incarnation,
            attempt: self.attempt(),
            output_dir: self.output_dir.clone(),
            resume_from: self.resume_from(),
        }
    }

    fn set_state(&mut self, to: JobState, message: String) -> Option<StateChange> {
        let from = self.state;
        if from == to {
            return None;
        }
        self.state = to;
        self.message = message.clone();
        if to == JobState::Running && self.started_unix_ms == 0 {
            self.started_unix_ms = now_ms();
        }
        if to.is_terminal() {
            self.ended_unix_ms = now_ms();
        }
        Some(StateChange { from, to, message })
    }

    fn change(&mut self, to: JobState, message: String) -> Effects {
        Effects {
            change: self.set_state(to, message),
            ..Effects::default()
        }
    }

    /// Every rank has registered: PENDING → RUNNING.
    pub fn start(&mut self) -> Effects {
        if self.state != JobState::Pending {
            return Effects::default();
        }
        let message = format!("all {} worker(s) registered", self.world_size());
        self.change(JobState::Running, message)
    }

    /// Stops the job: gracefully (workers finish the step and exit) or at once. Workers whose
    /// heartbeat stream is not attached yet hear of the stop when it attaches, so only a job
    /// without live workers ends at once.
    pub fn kill(&mut self, force: bool, live_workers: usize) -> Result<Effects, CoordinatorError> {
        if self.state.is_terminal() {
            return Err(CoordinatorError::Refused(format!(
                "job {} already ended ({})",
                self.id,
                self.state.name()
            )));
        }
        let order = if force {
            Order {
                kind: OrderKind::Shutdown,
                reason: "killed on request (--force)".into(),
            }
        } else {
            Order {
                kind: OrderKind::StopAfterStep,
                reason: "kill requested: finishing the current step".into(),
            }
        };
        let to = if force || live_workers == 0 {
            JobState::Killed
        } else {
            JobState::Stopping
        };
        Ok(Effects {
            change: self.set_state(to, order.reason.clone()),
            order: Some(order),
            restarted: false,
        })
    }

    /// An attempt failed: every connected worker aborts, and the job restarts, fails or ends
    /// killed as [`after_failure`] decides.
    pub fn fail(&mut self, failure: &Failure) -> Effects {
        let reason = failure.message.clone();
        let mut effects = match after_failure(self.state, failure.kind, self.automatic_restarts, self.max_restarts()) {
            AfterFailure::Restart => {
                self.automatic_restarts += 1;
                let message = format!(
                    "{reason}; restart {} of {} from the latest checkpoint",
                    self.automatic_restarts,
                    self.max_restarts()
                );
                self.restart(message)
            }
            AfterFailure::Fail { not_retryable: true } => self.change(
                JobState::Failed,
                format!(
                    "{reason}; not restarted: a {} failure fails every attempt the same way",
                    failure.kind
                ),
            ),
            AfterFailure::Fail { not_retryable: false } => self.change(JobState::Failed, reason.clone()),
            AfterFailure::Kill => self.change(JobState::Killed, format!("killed; {reason}")),
            AfterFailure::Ignore => Effects::default(),
        };
        effects.order = Some(Order {
            kind: OrderKind::Abort,
            reason,
        });
        effects
    }

    /// Back to PENDING for a new attempt: new workers, a new rendezvous, the latest checkpoint.
    fn restart(&mut self, reason: String) -> Effects {
        self.restarts += 1;
        self.ended_unix_ms = 0;
        Effects {
            change: self.set_state(JobState::Pending, reason),
            order: None,
            restarted: true,
        }
    }

    /// Every rank has exited cleanly: STOPPING → KILLED, RUNNING → SUCCEEDED (an augmentation
    /// job only once its parts are merged).
    pub fn settle(&mut self) -> Settled {
        match self.state {
            JobState::Stopping => {
                Settled::Done(self.change(JobState::Killed, "killed on request; all workers exited".into()))
            }
            JobState::Running if self.task() == TaskKind::Augment => {
                let output = AugmentArgs::from_map(&self.spec.args)
                    .ok()
                    .and_then(|a| a.output)
                    .unwrap_or_default();
                Settled::Merge(AugmentMerge {
                    attempt: self.attempt(),
                    output,
                })
            }
            JobState::Running => Settled::Done(self.change(JobState::Succeeded, "all workers finished".into())),
            _ => Settled::Done(Effects::default()),
        }
    }

    /// Records the outcome of an augmentation merge, unless the job moved on meanwhile (killed,
    /// or resumed into another attempt).
    pub fn merged(&mut self, merge: &AugmentMerge, outcome: Result<usize, String>) -> Effects {
        if self.state != JobState::Running || self.attempt() != merge.attempt {
            return Effects::default();
        }
        match outcome {
            Ok(parts) => self.change(
                JobState::Succeeded,
                format!(
                    "all workers finished; {parts} part(s) merged into {}",
                    merge.output.display()
                ),
            ),
            Err(e) => self.change(JobState::Failed, format!("merging the augmentation parts: {e}")),
        }
    }

    /// Continues a KILLED or FAILED job from its latest checkpoint, optionally with another world
    /// size (the workers re-partition the optimizer state). `active`: the job that still holds
    /// the coordinator's workers, if any.
    pub fn resume(&mut self, world_size: u32, active: Option<&str>) -> Result<Effects, CoordinatorError> {
        match self.state {
            JobState::Killed | JobState::Failed => {}
            JobState::Succeeded => {
                return Err(CoordinatorError::Refused(format!(
                    "job {} already SUCCEEDED{}; there is nothing to resume",
                    self.id,
                    if self.early_stop.early_stopped {
                        " (early stopped)"
                    } else {
                        ""
                    }
                )));
            }
            other => {
                return Err(CoordinatorError::Refused(format!(
                    "job {} is {}; only KILLED or FAILED jobs can be resumed",
                    self.id,
                    other.name()
                )));
            }
        }
        if let Some(active) = active {
            return Err(CoordinatorError::Refused(format!(
                "job {active} is still active; resume {} after it ends",
                self.id
            )));
        }
        if world_size != 0 && world_size != self.world_size() {
            self.resize(world_size)?;
        }
        let from = self
            .latest_checkpoint
            .as_ref()
            .map_or("the beginning (no checkpoint yet)".to_string(), |c| c.tag.clone());
        Ok(self.restart(format!("resumed from {from}")))
    }

    fn resize(&mut self, world_size: u32) -> Result<(), CoordinatorError> {
        let plan = JobPlan::resolve(&self.spec, world_size)?;
        let placed = !self.spec.placements.is_empty();
        if placed && self.spec.placements.iter().any(|p| !p.cuda_devices.is_empty()) {
            return Err(CoordinatorError::InvalidRequest(
                "changing the world size of a GPU job needs new launch flags; start a coordinator with them instead"
                    .into(),
            ));
        }
        self.spec.world_size = world_size;
        if placed {
            self.spec.placements = launch_plan::cpu_plan(world_size)
                .iter()
                .map(Placement::to_proto)
                .collect();
        }
        self.resolved_config_json = plan.config.to_json();
        self.batch = plan.config.batch;
        Ok(())
    }

    /// Records rank 0's telemetry; `None` when the report carried none.
    pub fn observe(&mut self, telemetry: Telemetry) -> Option<Observed> {
        if telemetry.progress.is_none() && telemetry.early_stop.is_none() {
            return None;
        }
        let previous_step = self.progress.global_step;
        if let Some(progress) = telemetry.progress {
            self.progress = progress;
        }
        if let Some(mut early) = telemetry.early_stop {
            early.max_stop_number = self.early_stop.max_stop_number;
            self.early_stop = early;
        }
        let new_checkpoint = telemetry
            .checkpoint
            .as_ref()
            .filter(|c| self.latest_checkpoint.as_ref().map(|l| &l.path) != Some(&c.path))
            .cloned();
        if telemetry.checkpoint.is_some() {
            self.latest_checkpoint = telemetry.checkpoint;
        }
        if telemetry.best_checkpoint.is_some() {
            self.best_checkpoint = telemetry.best_checkpoint;
        }
        Some(Observed {
            step_advanced: self.progress.global_step != previous_step,
            new_checkpoint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(world: u32, max_restarts: u32) -> Job {
        let spec = JobSpec {
            ds_config_json: r#"{"train_micro_batch_size_per_gpu": 4}"#.into(),
            world_size: world,
            max_restarts,
            ..Default::default()
        };
        let plan = JobPlan::resolve(&spec, world).unwrap();
        Job::submitted(1, spec, &plan)
    }

    fn failure(kind: FailureKind) -> Failure {
        Failure {
            kind,
            message: "rank 1 failed: boom".into(),
        }
    }

    #[test]
    fn a_submitted_job_is_pending_with_its_output_dir_and_batch() {
        let j = job(2, 0);
        assert_eq!(
            (j.id.as_str(), j.state, j.batch.train_batch_size),
            ("job-1", JobState::Pending, 8)
        );
        assert_eq!(j.output_dir, "./model/job-1");
        assert_eq!(j.spec.args["output_dir"], "./model/job-1");
        assert_eq!((j.task(), j.device()), (TaskKind::Train, DeviceKind::Cpu));
        assert_eq!(j.early_stop.max_stop_number, 5);
        assert_eq!(j.message, "waiting for 2 worker(s) to register");
    }

    #[test]
    fn the_restart_decision_goes_by_kind() {
        use AfterFailure::*;
        for kind in FailureKind::ALL {
            let expected = if kind == FailureKind::BadInput {
                Fail { not_retryable: true }
            } else {
                Restart
            };
            assert_eq!(after_failure(JobState::Running, kind, 0, 1), expected, "{kind}");
            assert_eq!(
                after_failure(JobState::Running, kind, 1, 1),
                Fail { not_retryable: false },
                "{kind}: no restarts left"
            );
            assert_eq!(
                after_failure(JobState::Pending, kind, 0, 1),
                Fail { not_retryable: false }
            );
            assert_eq!(after_failure(JobState::Stopping, kind, 0, 1), Kill);
            assert_eq!(after_failure(JobState::Failed, kind, 0, 1), Ignore);
        }
    }

    #[test]
    fn only_failures_that_follow_a_peer_wait_for_it() {
        assert!(waits_for_a_peer(Some(FailureKind::PeerLost)));
        assert!(waits_for_a_peer(Some(FailureKind::CollectiveTimeout)));
        assert!(waits_for_a_peer(None));
        for kind in [
            FailureKind::BadInput,
            FailureKind::Io,
            FailureKind::OutOfMemory,
            FailureKind::Internal,
        ] {
            assert!(!waits_for_a_peer(Some(kind)), "{kind}");
        }
    }

    #[test]
    fn a_retryable_failure_restarts_a_running_job() {
        let mut j = job(2, 1);
        j.start();
        let effects = j.fail(&failure(FailureKind::OutOfMemory));
        assert!(effects.restarted);
        assert_eq!(effects.order.unwrap().kind, OrderKind::Abort);
        assert_eq!(j.state, JobState::Pending);
        assert_eq!((j.restarts, j.automatic_restarts, j.attempt()), (1, 1, 2));
        assert_eq!(
            j.message,
            "rank 1 failed: boom; restart 1 of 1 from the latest checkpoint"
        );
        // The next failure finds no restart left.
        j.start();
        let effects = j.fail(&failure(FailureKind::OutOfMemory));
        assert!(!effects.restarted);
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.message, "rank 1 failed: boom");
    }

    #[test]
    fn bad_input_fails_at_once_and_says_why() {
        let mut j = job(2, 3);
        j.start();
        let effects = j.fail(&failure(FailureKind::BadInput));
        assert!(!effects.restarted);
        assert_eq!(effects.change.unwrap().to, JobState::Failed);
        assert_eq!(j.automatic_restarts, 0);
        assert!(
            j.message.contains("boom") && j.message.contains("not restarted: a BAD_INPUT failure"),
            "{}",
            j.message
        );
    }

    #[test]
    fn kill_is_graceful_with_live_workers_and_refused_after_the_end() {
        let mut j = job(2, 0);
        j.start();
        let effects = j.kill(false, 2).unwrap();
        assert_eq!(effects.order.unwrap().kind, OrderKind::StopAfterStep);
        assert_eq!(j.state, JobState::Stopping);
        assert_eq!(
            j.fail(&failure(FailureKind::PeerLost)).change.unwrap().to,
            JobState::Killed
        );
        let err = j.kill(true, 0).unwrap_err().to_string();
        assert_eq!(err, "job job-1 already ended (KILLED)");
        let mut j = job(2, 0);
        assert_eq!(j.kill(false, 0).unwrap().change.unwrap().to, JobState::Killed);
    }

    #[test]
    fn an_augmentation_succeeds_only_after_its_merge() {
        let mut j = job(1, 0);
        j.spec.task = TaskKind::Augment as i32;
        j.spec.args.insert("augment.output".into(), "/tmp/out.csv".into());
        j.start();
        let Settled::Merge(merge) = j.settle() else {
            panic!("an augmentation merges first")
        };
        assert_eq!(j.state, JobState::Running);
        assert_eq!(merge.output, PathBuf::from("/tmp/out.csv"));
        j.merged(&merge, Ok(3));
        assert_eq!(j.state, JobState::Succeeded);
        assert!(j.message.contains("3 part(s) merged"), "{}", j.message);
        // A merge of an attempt the job has left behind changes nothing.
        let mut j = job(1, 0);
        j.start();
        j.kill(true, 0).unwrap();
        assert_eq!(j.merged(&merge, Ok(1)), Effects::default());
        assert_eq!(j.state, JobState::Killed);
    }

    #[test]
    fn resume_refuses_running_and_succeeded_jobs() {
        let mut j = job(2, 0);
        let err = j.resume(0, None).unwrap_err().to_string();
        assert!(err.contains("only KILLED or FAILED"), "{err}");
        j.start();
        j.settle();
        j.early_stop.early_stopped = true;
        let err = j.resume(0, None).unwrap_err().to_string();
        assert_eq!(
            err,
            "job job-1 already SUCCEEDED (early stopped); there is nothing to resume"
        );
    }

    #[test]
    fn resume_with_another_world_size_resolves_the_batch_again() {
        let mut j = job(2, 0);
        j.start();
        j.fail(&failure(FailureKind::Internal));
        let err = j.resume(0, Some("job-2")).unwrap_err().to_string();
        assert_eq!(err, "job job-2 is still active; resume job-1 after it ends");
        let effects = j.resume(3, None).unwrap();
        assert!(effects.restarted);
        assert_eq!((j.world_size(), j.batch.train_batch_size), (3, 12));
        assert_eq!(j.message, "resumed from the beginning (no checkpoint yet)");
        assert_eq!((j.restarts, j.automatic_restarts), (1, 0));
    }

    #[test]
    fn telemetry_registers_new_checkpoints_once() {
        let mut j = job(1, 0);
        assert_eq!(j.observe(Telemetry::default()), None);
        let checkpoint = CheckpointRef {
            tag: "step-5".into(),
            path: "/o/step-5".into(),
            global_step: 5,
            ..Default::default()
        };
        let telemetry = Telemetry {
            progress: Some(Progress {
                global_step: 5,
                ..Default::default()
            }),
            early_stop: Some(EarlyStopState::default()),
            checkpoint: Some(checkpoint.clone()),
            best_checkpoint: None,
        };
        let observed = j.observe(telemetry.clone()).unwrap();
        assert!(observed.step_advanced);
        assert_eq!(observed.new_checkpoint, Some(checkpoint));
        assert_eq!(j.early_stop.max_stop_number, 5, "the job's patience is kept");
        let again = j.observe(telemetry).unwrap();
        assert!(!again.step_advanced && again.new_checkpoint.is_none());
        j.restarts = 1;
        assert_eq!(j.resume_from(), "/o/step-5");
    }
}
