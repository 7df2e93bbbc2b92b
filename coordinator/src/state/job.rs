//! A job as the coordinator tracks it — the spec it was submitted with, its life-cycle state and
//! what rank 0 reported — and the transitions between its states: submit, start, kill, fail
//! (with the restart decision), restart, shrink, settle, resume. Transitions are pure: they
//! change the `Job` and return the [`Effects`] the coordinator must carry out (persist the job,
//! tell the workers, forget the attempt's workers), so they are tested without a store or a lock.
//! The coordinator runs them on a copy and adopts it only once the copy is durable.

use crate::error::CoordinatorError;
use crate::launch_plan::{self, Placement};
use crate::store::job_id;
use kormlm_proto::augment_args::AugmentArgs;
use kormlm_proto::augment_parts;
use kormlm_proto::ds_config::Batch;
use kormlm_proto::failure::FailureKind;
use kormlm_proto::job_plan::JobPlan;
use kormlm_proto::now_ms;
use kormlm_proto::train_args::TrainArgs;
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

/// Why a STOPPING job stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// A kill (from a user, or the coordinator's own SIGINT/SIGTERM): the job ends KILLED.
    Request,
    /// A worker was preempted (SIGTERM from its environment): the job continues after an
    /// automatic restart when one is left, else ends KILLED.
    Preemption,
}

/// How the message of a job stopped by a preemption starts (for people; the persisted
/// `stop_cause` says why a STOPPING job stops).
pub const PREEMPTED: &str = "preempted: ";

/// What a STOPPING job's message adds to why it stops, by cause.
const STOPPING_FOR_REQUEST: &str = ": finishing the current step";
const STOPPING_FOR_PREEMPTION: &str = "; every rank finishes its step and checkpoints";

/// What the coordinator tells a worker over its heartbeat stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderKind {
    /// Finish the current step, checkpoint, exit.
    StopAfterStep,
    /// Abort collectives now and exit (the attempt failed).
    Abort,
    /// Exit now; the job is over.
    Shutdown,
    /// Exit the process now (`kill --force`); a worker this coordinator did not start is never
    /// signalled, so this order is how it ends.
    Terminate,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub kind: OrderKind,
    pub reason: String,
}

/// A rank lost for good (its worker LOST), with the ranks whose workers were not lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostRank {
    pub rank: u32,
    pub survivors: Vec<u32>,
}

/// Why an attempt of a job failed: the kind decides, the message is for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
    /// Set when the coordinator lost the rank itself (heartbeat, stream, process exit).
    pub lost: Option<LostRank>,
}

/// A job moved from one state to another (or, while STOPPING, changed why it stops).
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

/// An event to record besides the state change: (kind, message).
pub type Event = (&'static str, String);

/// What a transition asks of the coordinator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// The job changed state: persist it (durably) and record the event.
    pub change: Option<StateChange>,
    /// Events to record with the change (a dropped checkpoint, a shrink).
    pub events: Vec<Event>,
    /// Send this to every worker with an open heartbeat stream.
    pub order: Option<Order>,
    /// A new attempt begins: forget the workers and the rendezvous of the old one.
    pub restarted: bool,
}

/// What a failure does to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Back to PENDING for a new attempt from the latest checkpoint (an automatic restart).
    Restart,
    /// FAILED. `not_retryable`: restarts were left, but the kind fails every attempt alike.
    Fail { not_retryable: bool },
    /// KILLED: a stop was requested, or a preemption left no automatic restart.
    Kill,
    /// A running job's worker was preempted: every rank stops after its step (STOPPING), and
    /// the job restarts or ends KILLED once they have.
    Preempt,
    /// A stopping job's rank was preempted too: the job waits for its other ranks.
    Wait,
    /// The job has already ended.
    Ignore,
}

/// The restart decision, by kind: a running job restarts while it has automatic restarts left
/// and the failure is retryable; a job still forming fails; a stopping job ends KILLED, unless
/// it stops for a preemption and may restart. A preemption stops a job (it is resumable).
pub fn after_failure(
    state: JobState,
    stop: Option<StopCause>,
    kind: FailureKind,
    automatic_restarts: u32,
    max_restarts: u32,
) -> AfterFailure {
    let restarts_left = automatic_restarts < max_restarts;
    match (state, kind) {
        (JobState::Killed | JobState::Failed | JobState::Succeeded, _) => AfterFailure::Ignore,
        (JobState::Running, FailureKind::Preempted) => AfterFailure::Preempt,
        (JobState::Stopping, FailureKind::Preempted) => AfterFailure::Wait,
        (JobState::Pending, FailureKind::Preempted) if restarts_left => AfterFailure::Restart,
        (JobState::Pending, FailureKind::Preempted) => AfterFailure::Kill,
        (JobState::Stopping, _) if stop == Some(StopCause::Preemption) && restarts_left && kind.retryable() => {
            AfterFailure::Restart
        }
        (JobState::Stopping, _) => AfterFailure::Kill,
        (JobState::Running, _) if restarts_left && kind.retryable() => AfterFailure::Restart,
        (JobState::Running, _) => AfterFailure::Fail {
            not_retryable: restarts_left,
        },
        (JobState::Pending, _) => AfterFailure::Fail { not_retryable: false },
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
    /// A checkpoint reference of another run, which was not taken (its path and why).
    pub refused: Option<(String, String)>,
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
    pub run_id: String,
    pub rank: u32,
    pub local_rank: u32,
    pub world_size: u32,
    pub device: DeviceKind,
    pub cuda_devices: Vec<u32>,
    /// The physical GPU ids behind `cuda_devices`.
    pub physical_cuda_devices: Vec<u32>,
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
    /// `STATE_ID/job-N`: the run this job is, in every checkpoint and in the output directory.
    pub run_id: String,
    /// The spec as submitted, with its task, device and output directory filled in; a resume
    /// with another world size, or a shrink, changes its world size (and placements).
    pub spec: JobSpec,
    /// The DeepSpeed config resolved for the world size, as workers receive it.
    pub resolved_config_json: String,
    pub batch: Batch,
    pub state: JobState,
    /// Why a STOPPING job stops (`None` in every other state).
    pub stop_cause: Option<StopCause>,
    /// Why the job is in its state, for people.
    pub message: String,
    pub progress: Progress,
    pub early_stop: EarlyStopState,
    /// The newest complete checkpoint of this run (the last of `checkpoints`).
    pub latest_checkpoint: Option<CheckpointRef>,
    pub best_checkpoint: Option<CheckpointRef>,
    /// Complete checkpoints of this run, oldest first: the newest `keep_checkpoints` and the best.
    pub checkpoints: Vec<CheckpointRef>,
    /// `--keep_checkpoints` of the job's flags.
    pub keep_checkpoints: usize,
    pub created_unix_ms: i64,
    pub started_unix_ms: i64,
    pub ended_unix_ms: i64,
    /// Attempts after the first: automatic restarts, user resumes, shrinks.
    pub restarts: u32,
    /// Restarts after failures (bounded by the spec's max_restarts).
    pub automatic_restarts: u32,
    /// Continuations on fewer ranks after a rank was lost for good.
    pub shrinks: u32,
    pub output_dir: String,
    /// Set when the job's records could not be read: the job is shown FAILED with this message
    /// and is never written back or resumed.
    pub record_error: Option<String>,
}

impl Job {
    /// A new PENDING job from a spec and its resolution; `state_id` names the state directory.
    pub fn submitted(number: u64, mut spec: JobSpec, plan: &JobPlan, state_id: &str) -> Self {
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
            run_id: run_id(state_id, &id),
            id,
            resolved_config_json: plan.config.to_json(),
            batch: plan.config.batch,
            state: JobState::Pending,
            stop_cause: None,
            message,
            progress: Progress::default(),
            early_stop: EarlyStopState {
                max_stop_number: plan.train.max_stop_number,
                ..Default::default()
            },
            latest_checkpoint: None,
            best_checkpoint: None,
            checkpoints: Vec::new(),
            keep_checkpoints: plan.train.keep_checkpoints,
            created_unix_ms: now_ms(),
            started_unix_ms: 0,
            ended_unix_ms: 0,
            restarts: 0,
            automatic_restarts: 0,
            shrinks: 0,
            output_dir,
            spec,
            record_error: None,
        }
    }

    /// The entry for job `number` whose records cannot be read: FAILED, with the error as its
    /// message, so the other jobs are still served.
    pub fn unreadable(number: u64, error: String) -> Self {
        Self {
            number,
            id: job_id(number),
            run_id: String::new(),
            spec: JobSpec::default(),
            resolved_config_json: String::new(),
            batch: Batch {
                train_batch_size: 0,
                train_micro_batch_size_per_gpu: 0,
                gradient_accumulation_steps: 0,
            },
            state: JobState::Failed,
            stop_cause: None,
            message: error.clone(),
            progress: Progress::default(),
            early_stop: EarlyStopState::default(),
            latest_checkpoint: None,
            best_checkpoint: None,
            checkpoints: Vec::new(),
            keep_checkpoints: 0,
            created_unix_ms: 0,
            started_unix_ms: 0,
            ended_unix_ms: 0,
            restarts: 0,
            automatic_restarts: 0,
            shrinks: 0,
            output_dir: String::new(),
            record_error: Some(error),
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
            Ok(TaskKind::AugmentEval) => TaskKind::AugmentEval,
            Ok(TaskKind::Classify) => TaskKind::Classify,
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

    /// The checkpoint this attempt continues from: the newest one an earlier attempt wrote (so
    /// every rank of the attempt gets the same one, also a rank that registers late). The first
    /// attempt starts fresh.
    pub fn resume_point(&self) -> Option<&CheckpointRef> {
        if self.restarts == 0 {
            return None;
        }
        let attempt = self.attempt();
        self.checkpoints.iter().rev().find(|c| c.attempt < attempt)
    }

    /// [`Job::resume_point`]'s path, empty for a fresh start.
    pub fn resume_from(&self) -> String {
        self.resume_point().map(|c| c.path.clone()).unwrap_or_default()
    }

    /// What rank `rank` is to do in this attempt.
    pub fn assignment(
        &self,
        rank: u32,
        local_rank: u32,
        devices: &launch_plan::RankDevices,
        incarnation: u32,
        heartbeat_interval: Duration,
    ) -> Assignment {
        Assignment {
            job_id: self.id.clone(),
            run_id: self.run_id.clone(),
            rank,
            local_rank,
            world_size: self.world_size(),
            device: self.device(),
            cuda_devices: devices.cuda.clone(),
            physical_cuda_devices: devices.physical.clone(),
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
        if to != JobState::Stopping {
            self.stop_cause = None;
        }
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

    /// Stops the job, because of `why` (e.g. "kill requested"): gracefully (every rank finishes
    /// its step and checkpoints; STOPPING until they have exited) or, with `force`, at once. A
    /// job still waiting for its workers has nothing to checkpoint and ends at once, its
    /// registered workers told to shut down; so does a job without workers. `alive_workers`
    /// counts the workers that are alive or expected back (recorded by a previous coordinator).
    pub fn kill(&mut self, force: bool, alive_workers: usize, why: &str) -> Result<Effects, CoordinatorError> {
        if self.state.is_terminal() {
            return Err(CoordinatorError::Refused(format!(
                "job {} already ended ({})",
                self.id,
                self.state.name()
            )));
        }
        let at_once = if force {
            Some(why.to_string())
        } else if self.state == JobState::Pending {
            Some(format!("{why} while waiting for workers (nothing to checkpoint)"))
        } else if alive_workers == 0 {
            Some(format!("{why}; no worker was alive"))
        } else {
            None
        };
        if let Some(message) = at_once {
            let kind = if force {
                OrderKind::Terminate
            } else {
                OrderKind::Shutdown
            };
            return Ok(Effects {
                order: Some(Order {
                    kind,
                    reason: message.clone(),
                }),
                ..self.change(JobState::Killed, message)
            });
        }
        let message = format!("{why}{STOPPING_FOR_REQUEST}");
        let order = Some(Order {
            kind: OrderKind::StopAfterStep,
            reason: message.clone(),
        });
        let change = if self.state == JobState::Stopping {
            // Already stopping (for a preemption, or an earlier kill): now it ends KILLED.
            self.message = message.clone();
            Some(StateChange {
                from: JobState::Stopping,
                to: JobState::Stopping,
                message,
            })
        } else {
            self.set_state(JobState::Stopping, message)
        };
        self.stop_cause = Some(StopCause::Request);
        Ok(Effects {
            change,
            order,
            ..Effects::default()
        })
    }

    /// An attempt failed: the job restarts, fails, ends killed or stops for a preemption as
    /// [`after_failure`] decides; every connected worker aborts unless the job only stops. A
    /// checkpoint the workers cannot read is dropped and the attempt restarts from the one
    /// before (a fresh start when none is left); a rank lost for good may leave the job to
    /// continue on the others ([`Job::shrink`]).
    pub fn fail(&mut self, failure: &Failure) -> Effects {
        let reason = failure.message.clone();
        let mut events = Vec::new();
        if failure.kind == FailureKind::CheckpointUnreadable && self.state.is_active() {
            if let Some(dropped) = self.drop_resume_point() {
                events.push((
                    "checkpoint",
                    format!(
                        "checkpoint {} ({}) cannot be read: {reason}; dropped from the job's checkpoints",
                        dropped.tag, dropped.path
                    ),
                ));
                if self.state != JobState::Stopping {
                    let message = format!(
                        "{reason}; checkpoint {} dropped, restarting from {}",
                        dropped.tag,
                        self.latest_name()
                    );
                    return Effects {
                        events,
                        order: Some(abort(&reason)),
                        ..self.restart(message)
                    };
                }
            }
        }
        let decision = after_failure(
            self.state,
            self.stop_cause,
            failure.kind,
            self.automatic_restarts,
            self.max_restarts(),
        );
        let preempted = failure.kind == FailureKind::Preempted || self.stop_cause == Some(StopCause::Preemption);
        let mut effects = match decision {
            AfterFailure::Restart => {
                self.automatic_restarts += 1;
                let cause = match self.state {
                    JobState::Stopping => format!("{}; {reason}", self.stopping_reason()),
                    _ if preempted => format!("{PREEMPTED}{reason}"),
                    _ => reason.clone(),
                };
                let message = format!(
                    "{cause}; restart {} of {} from {}",
                    self.automatic_restarts,
                    self.max_restarts(),
                    self.latest_name()
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
            AfterFailure::Fail { not_retryable: false } => match (&failure.lost, self.spec.min_workers) {
                (Some(lost), min) if min > 0 && self.state == JobState::Running => {
                    match self.shrink(&lost.survivors, &reason) {
                        Ok(effects) => effects,
                        Err(why) => self.change(
                            JobState::Failed,
                            format!("{reason}; not continued on the other ranks: {why}"),
                        ),
                    }
                }
                _ => self.change(JobState::Failed, reason.clone()),
            },
            AfterFailure::Kill if self.stop_cause == Some(StopCause::Preemption) => {
                let message = format!("{}; {reason}", self.stopping_reason());
                self.change(JobState::Killed, message)
            }
            AfterFailure::Kill if preempted => self.change(JobState::Killed, format!("{PREEMPTED}{reason}")),
            AfterFailure::Kill => self.change(JobState::Killed, format!("killed; {reason}")),
            AfterFailure::Preempt => {
                let message = format!("{PREEMPTED}{reason}{STOPPING_FOR_PREEMPTION}");
                let mut effects = self.change(JobState::Stopping, message.clone());
                self.stop_cause = Some(StopCause::Preemption);
                effects.order = Some(Order {
                    kind: OrderKind::StopAfterStep,
                    reason: message,
                });
                effects.events = events;
                return effects;
            }
            AfterFailure::Wait => {
                return Effects {
                    events,
                    ..Effects::default()
                }
            }
            AfterFailure::Ignore => Effects::default(),
        };
        effects.events.splice(0..0, events);
        effects.order = Some(abort(&reason));
        effects
    }

    /// Takes the checkpoint this attempt resumed from out of the list (it cannot be read), so
    /// the next attempt resumes from the one before; `None` when the attempt started fresh.
    fn drop_resume_point(&mut self) -> Option<CheckpointRef> {
        let path = self.resume_point()?.path.clone();
        let index = self.checkpoints.iter().position(|c| c.path == path)?;
        let dropped = self.checkpoints.remove(index);
        if self.best_checkpoint.as_ref().is_some_and(|b| b.path == dropped.path) {
            self.best_checkpoint = None;
        }
        self.latest_checkpoint = self.checkpoints.last().cloned();
        Some(dropped)
    }

    /// Why a STOPPING job stops, without what it is doing about it.
    fn stopping_reason(&self) -> &str {
        self.message
            .trim_end_matches(STOPPING_FOR_REQUEST)
            .trim_end_matches(STOPPING_FOR_PREEMPTION)
    }

    /// The newest complete checkpoint by tag, for messages.
    fn latest_name(&self) -> String {
        self.checkpoints.last().map_or_else(
            || "the beginning (no complete checkpoint)".to_string(),
            |c| c.tag.clone(),
        )
    }

    /// Back to PENDING for a new attempt: new workers, a new rendezvous, the latest checkpoint.
    fn restart(&mut self, reason: String) -> Effects {
        self.restarts += 1;
        self.ended_unix_ms = 0;
        let from = self.state;
        self.stop_cause = None;
        // A job still PENDING changes attempt all the same: record it as a change.
        self.message = reason.clone();
        let change = self.set_state(JobState::Pending, reason.clone()).or(Some(StateChange {
            from,
            to: JobState::Pending,
            message: reason,
        }));
        Effects {
            change,
            restarted: true,
            ..Effects::default()
        }
    }

    /// Continues on the ranks in `survivors` (old numbers) after a rank was lost for good, when
    /// at least `min_workers` survive and DeepSpeed's batch rule holds for their number: the
    /// ranks are renumbered 0..M-1, the batch triple is resolved again from the job's config,
    /// and a new attempt resumes from the latest checkpoint (the optimizer state re-partitions).
    /// Otherwise says why not.
    pub fn shrink(&mut self, survivors: &[u32], reason: &str) -> Result<Effects, String> {
        let (world, min) = (self.world_size(), self.spec.min_workers);
        let left = survivors.len() as u32;
        if min == 0 {
            return Err("elastic continuation is off (--min_workers 0)".into());
        }
        if left < min.max(1) || left >= world {
            return Err(format!("{left} of {world} rank(s) left, --min_workers is {min}"));
        }
        let plan = JobPlan::resolve(&self.spec, left)
            .map_err(|e| format!("DeepSpeed's batch rule does not hold for {left} rank(s): {e}"))?;
        self.spec.world_size = left;
        if !self.spec.placements.is_empty() {
            self.spec.placements = launch_plan::renumbered(&self.placements(), survivors)
                .iter()
                .map(Placement::to_proto)
                .collect();
        }
        self.resolved_config_json = plan.config.to_json();
        self.batch = plan.config.batch;
        self.shrinks += 1;
        let message = format!(
            "{reason}; continuing on {left} of {world} ranks (--min_workers {min}, shrink {}) from {}, \
             train_batch_size {} = {} x {} x {left}",
            self.shrinks,
            self.latest_name(),
            self.batch.train_batch_size,
            self.batch.train_micro_batch_size_per_gpu,
            self.batch.gradient_accumulation_steps,
        );
        let mut effects = self.restart(message.clone());
        effects.events.push(("shrink", message));
        Ok(effects)
    }

    /// A new attempt because the workers of this one are gone and others take their ranks (a
    /// worker process that is not the rank's recorded holder registered after the coordinator
    /// restarted). Counts as no automatic restart; every attached worker aborts.
    pub fn replace_attempt(&mut self, reason: &str) -> Effects {
        let message = format!(
            "{reason}; attempt {} resumes from {}",
            self.attempt() + 1,
            self.latest_name()
        );
        Effects {
            order: Some(abort(reason)),
            ..self.restart(message)
        }
    }

    /// Every rank of the attempt has ended: STOPPING → KILLED (or, stopped for a preemption with
    /// an automatic restart left, a new attempt), RUNNING → SUCCEEDED (an augmentation job only
    /// once its parts are merged).
    pub fn settle(&mut self) -> Settled {
        match self.state {
            JobState::Stopping if self.stop_cause == Some(StopCause::Preemption) => {
                if self.automatic_restarts < self.max_restarts() {
                    self.automatic_restarts += 1;
                    let message = format!(
                        "{}; restart {} of {} from {}",
                        self.stopping_reason(),
                        self.automatic_restarts,
                        self.max_restarts(),
                        self.latest_name()
                    );
                    Settled::Done(self.restart(message))
                } else {
                    let message = format!(
                        "{}; stopped at {} (resume with `coordinator resume --job {}`)",
                        self.stopping_reason(),
                        self.latest_name(),
                        self.id
                    );
                    Settled::Done(self.change(JobState::Killed, message))
                }
            }
            JobState::Stopping => {
                let message = format!("{}; all workers exited", self.stopping_reason());
                Settled::Done(self.change(JobState::Killed, message))
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
            JobState::Running if self.task() == TaskKind::AugmentEval => {
                let output = TrainArgs::from_map(&self.spec.args)
                    .ok()
                    .and_then(|a| a.output_dir)
                    .unwrap_or_default();
                let message = format!("all workers finished; the report is in {output}/report.json");
                Settled::Done(self.change(JobState::Succeeded, message))
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
        if let Some(error) = &self.record_error {
            return Err(CoordinatorError::Refused(format!(
                "job {} cannot be resumed: {error}",
                self.id
            )));
        }
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
        let message = format!("resumed from {}", self.latest_name());
        Ok(self.restart(message))
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

    /// Records rank 0's telemetry; `None` when the report carried none. Checkpoint references
    /// of another run are not taken (a job only reports checkpoints it wrote); a new checkpoint
    /// joins the list, which is pruned as the directories are: the newest `--keep_checkpoints`
    /// and the best are kept.
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
        let mut refused = None;
        let mut own = |c: Option<CheckpointRef>| match c {
            Some(c) if c.run_id != self.run_id => {
                let why = format!(
                    "checkpoint {} ({}) was not taken: it belongs to run `{}`, this job is run `{}`",
                    c.tag,
                    c.path,
                    if c.run_id.is_empty() { "(none)" } else { &c.run_id },
                    self.run_id
                );
                refused = Some((c.path, why));
                None
            }
            other => other,
        };
        let checkpoint = own(telemetry.checkpoint);
        let best = own(telemetry.best_checkpoint);
        if best.is_some() {
            self.best_checkpoint = best;
        }
        let new_checkpoint = checkpoint.filter(|c| !self.checkpoints.iter().any(|k| k.path == c.path));
        if let Some(c) = &new_checkpoint {
            self.checkpoints.push(c.clone());
            self.prune_checkpoints();
            self.latest_checkpoint = self.checkpoints.last().cloned();
        }
        Some(Observed {
            step_advanced: self.progress.global_step != previous_step,
            new_checkpoint,
            refused,
        })
    }

    /// Keeps the newest `keep_checkpoints` (at least one) and the best, as the workers prune
    /// the directories.
    fn prune_checkpoints(&mut self) {
        let cut = self.checkpoints.len().saturating_sub(self.keep_checkpoints.max(1));
        let best = self.best_checkpoint.as_ref().map(|b| b.path.clone());
        let mut index = 0;
        self.checkpoints.retain(|c| {
            let keep = index >= cut || best.as_ref() == Some(&c.path);
            index += 1;
            keep
        });
    }
}

/// `STATE_ID/job-N`.
pub fn run_id(state_id: &str, job_id: &str) -> String {
    format!("{state_id}/{job_id}")
}

fn abort(reason: &str) -> Order {
    Order {
        kind: OrderKind::Abort,
        reason: reason.to_string(),
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
        Job::submitted(1, spec, &plan, "5eed")
    }

    fn failure(kind: FailureKind) -> Failure {
        Failure {
            kind,
            message: "rank 1 failed: boom".into(),
            lost: None,
        }
    }

    fn checkpoint(j: &Job, step: u64) -> CheckpointRef {
        CheckpointRef {
            tag: format!("step-{step}"),
            path: format!("/o/checkpoints/step-{step}"),
            global_step: step,
            run_id: j.run_id.clone(),
            attempt: j.attempt(),
            ..Default::default()
        }
    }

    /// Rank 0's report of a checkpoint at `step`.
    fn report_checkpoint(j: &mut Job, c: CheckpointRef) -> Observed {
        j.observe(Telemetry {
            progress: Some(Progress {
                global_step: c.global_step,
                ..Default::default()
            }),
            early_stop: Some(EarlyStopState::default()),
            checkpoint: Some(c),
            best_checkpoint: None,
        })
        .unwrap()
    }

    #[test]
    fn a_submitted_job_is_pending_with_its_output_dir_batch_and_run_id() {
        let j = job(2, 0);
        assert_eq!(
            (j.id.as_str(), j.state, j.batch.train_batch_size),
            ("job-1", JobState::Pending, 8)
        );
        assert_eq!(j.run_id, "5eed/job-1");
        assert_eq!(j.output_dir, "./model/job-1");
        assert_eq!(j.spec.args["output_dir"], "./model/job-1");
        assert_eq!((j.task(), j.device()), (TaskKind::Train, DeviceKind::Cpu));
        assert_eq!(j.early_stop.max_stop_number, 5);
        assert_eq!(j.keep_checkpoints, 2);
        assert_eq!(j.message, "waiting for 2 worker(s) to register");
        let a = j.assignment(
            0,
            0,
            &launch_plan::rank_devices(kormlm_proto::v1::DeviceKind::Cpu, None, 0),
            1,
            Duration::from_secs(1),
        );
        assert_eq!(
            (a.run_id.as_str(), a.attempt, a.resume_from.as_str()),
            ("5eed/job-1", 1, "")
        );
    }

    #[test]
    fn the_restart_decision_goes_by_kind() {
        use AfterFailure::*;
        let request = Some(StopCause::Request);
        let preemption = Some(StopCause::Preemption);
        for kind in FailureKind::ALL {
            let running = match kind {
                FailureKind::BadInput => Fail { not_retryable: true },
                FailureKind::Preempted => Preempt,
                _ => Restart,
            };
            assert_eq!(after_failure(JobState::Running, None, kind, 0, 1), running, "{kind}");
            let exhausted = if kind == FailureKind::Preempted {
                Preempt
            } else {
                Fail { not_retryable: false }
            };
            assert_eq!(after_failure(JobState::Running, None, kind, 1, 1), exhausted, "{kind}");
            let pending = if kind == FailureKind::Preempted {
                (Restart, Kill)
            } else {
                (Fail { not_retryable: false }, Fail { not_retryable: false })
            };
            assert_eq!(
                (
                    after_failure(JobState::Pending, None, kind, 0, 1),
                    after_failure(JobState::Pending, None, kind, 1, 1)
                ),
                pending,
                "{kind}"
            );
            let stopping = |stop, used| after_failure(JobState::Stopping, stop, kind, used, 1);
            let (on_request, preempted_with_restart, preempted_without) = match kind {
                FailureKind::Preempted => (Wait, Wait, Wait),
                FailureKind::BadInput => (Kill, Kill, Kill),
                _ => (Kill, Restart, Kill),
            };
            assert_eq!(stopping(request, 0), on_request, "{kind}");
            assert_eq!(stopping(preemption, 0), preempted_with_restart, "{kind}");
            assert_eq!(stopping(preemption, 1), preempted_without, "{kind}");
            for ended in [JobState::Failed, JobState::Killed, JobState::Succeeded] {
                assert_eq!(after_failure(ended, None, kind, 0, 1), Ignore);
            }
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
            FailureKind::Preempted,
            FailureKind::CheckpointUnreadable,
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
            "rank 1 failed: boom; restart 1 of 1 from the beginning (no complete checkpoint)"
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
        let effects = j.kill(false, 2, "kill requested").unwrap();
        assert_eq!(effects.order.unwrap().kind, OrderKind::StopAfterStep);
        assert_eq!((j.state, j.stop_cause), (JobState::Stopping, Some(StopCause::Request)));
        assert_eq!(j.message, "kill requested: finishing the current step");
        assert_eq!(
            j.fail(&failure(FailureKind::PeerLost)).change.unwrap().to,
            JobState::Killed
        );
        assert_eq!(j.stop_cause, None);
        let err = j.kill(true, 0, "kill requested").unwrap_err().to_string();
        assert_eq!(err, "job job-1 already ended (KILLED)");
        // Every rank stopped after its step: KILLED, saying why.
        let mut j = job(2, 0);
        j.start();
        j.kill(false, 2, "the coordinator received SIGTERM").unwrap();
        let Settled::Done(effects) = j.settle() else {
            panic!("a training job settles at once")
        };
        assert_eq!(effects.change.unwrap().to, JobState::Killed);
        assert_eq!(j.message, "the coordinator received SIGTERM; all workers exited");
    }

    #[test]
    fn a_kill_of_a_job_still_waiting_for_workers_ends_it_at_once() {
        let mut j = job(2, 0);
        let effects = j.kill(false, 1, "kill requested").unwrap();
        assert_eq!(effects.change.unwrap().to, JobState::Killed);
        let order = effects.order.unwrap();
        assert_eq!(order.kind, OrderKind::Shutdown, "registered workers leave at once");
        assert!(order.reason.contains("while waiting for workers"), "{}", order.reason);
        // A running job whose workers are all gone ends at once too; --force always does.
        let mut j = job(2, 0);
        j.start();
        assert_eq!(
            j.kill(false, 0, "kill requested").unwrap().change.unwrap().to,
            JobState::Killed
        );
        let mut j = job(2, 0);
        j.start();
        let effects = j.kill(true, 2, "kill requested").unwrap();
        assert_eq!(
            (effects.change.unwrap().to, effects.order.unwrap().kind),
            (JobState::Killed, OrderKind::Terminate),
            "--force tells every worker to exit its process now"
        );
    }

    #[test]
    fn a_preempted_worker_stops_the_job_which_restarts_while_restarts_are_left() {
        let preempted = Failure {
            kind: FailureKind::Preempted,
            message: "rank 1: SIGTERM; checkpointed".into(),
            lost: None,
        };
        let mut j = job(2, 1);
        j.start();
        let effects = j.fail(&preempted);
        assert!(!effects.restarted);
        assert_eq!(
            effects.order.unwrap().kind,
            OrderKind::StopAfterStep,
            "no abort: the others checkpoint"
        );
        assert_eq!(
            (j.state, j.stop_cause),
            (JobState::Stopping, Some(StopCause::Preemption))
        );
        assert!(j.message.starts_with("preempted: rank 1: SIGTERM"), "{}", j.message);
        // Another rank preempted too: wait for the rest.
        assert_eq!(j.fail(&preempted), Effects::default());
        // Every rank has ended: the job continues from the stop checkpoint.
        let c = checkpoint(&j, 12);
        report_checkpoint(&mut j, c);
        let Settled::Done(effects) = j.settle() else { panic!() };
        assert!(effects.restarted);
        assert_eq!((j.state, j.automatic_restarts, j.restarts), (JobState::Pending, 1, 1));
        assert_eq!(j.resume_from(), "/o/checkpoints/step-12");
        assert_eq!(
            j.message,
            "preempted: rank 1: SIGTERM; checkpointed; restart 1 of 1 from step-12"
        );
        // Preempted again with no restart left: KILLED, resumable, saying so.
        j.start();
        j.fail(&preempted);
        let Settled::Done(effects) = j.settle() else { panic!() };
        assert_eq!(effects.change.unwrap().to, JobState::Killed);
        assert_eq!(
            j.message,
            "preempted: rank 1: SIGTERM; checkpointed; stopped at step-12 (resume with `coordinator resume --job job-1`)"
        );
        assert!(j.resume(0, None).is_ok());
    }

    #[test]
    fn a_preemption_before_the_group_formed_or_a_kill_meanwhile_ends_killed() {
        let preempted = Failure {
            kind: FailureKind::Preempted,
            message: "rank 0: SIGTERM".into(),
            lost: None,
        };
        let mut j = job(2, 0);
        let effects = j.fail(&preempted);
        assert_eq!(effects.change.unwrap().to, JobState::Killed);
        assert_eq!(j.message, "preempted: rank 0: SIGTERM");
        // A user's kill while stopping for a preemption: no restart afterwards.
        let mut j = job(2, 3);
        j.start();
        j.fail(&preempted);
        let effects = j.kill(false, 2, "kill requested").unwrap();
        assert_eq!(
            effects.change.unwrap().to,
            JobState::Stopping,
            "the cause change is recorded"
        );
        assert_eq!(j.stop_cause, Some(StopCause::Request));
        let Settled::Done(effects) = j.settle() else { panic!() };
        assert_eq!(effects.change.unwrap().to, JobState::Killed);
        assert_eq!(j.automatic_restarts, 0);
        // A rank lost while stopping for a preemption: restart if one is left.
        let mut j = job(2, 1);
        j.start();
        j.fail(&preempted);
        let effects = j.fail(&failure(FailureKind::PeerLost));
        assert!(effects.restarted);
        assert!(
            j.message
                .starts_with("preempted: rank 0: SIGTERM; rank 1 failed: boom; restart 1 of 1"),
            "{}",
            j.message
        );
    }

    #[test]
    fn an_unreadable_checkpoint_is_dropped_and_the_one_before_is_used_never_in_a_loop() {
        let mut j = job(2, 0);
        j.start();
        for step in [5, 10] {
            let c = checkpoint(&j, step);
            report_checkpoint(&mut j, c);
        }
        j.kill(false, 2, "kill requested").unwrap();
        j.settle();
        j.resume(0, None).unwrap();
        assert_eq!(j.resume_from(), "/o/checkpoints/step-10");
        j.start();
        let unreadable = Failure {
            kind: FailureKind::CheckpointUnreadable,
            message: "rank 1 failed: optim-rank1.safetensors is truncated".into(),
            lost: None,
        };
        let effects = j.fail(&unreadable);
        assert!(effects.restarted);
        assert_eq!(effects.order.unwrap().kind, OrderKind::Abort);
        assert_eq!(effects.events.len(), 1);
        assert!(effects.events[0]
            .1
            .contains("checkpoint step-10 (/o/checkpoints/step-10) cannot be read"));
        assert_eq!(j.state, JobState::Pending);
        assert_eq!(
            (j.automatic_restarts, j.restarts),
            (0, 2),
            "no automatic restart is used up"
        );
        assert_eq!(j.resume_from(), "/o/checkpoints/step-5");
        assert_eq!(j.latest_checkpoint.as_ref().unwrap().tag, "step-5");
        assert!(
            j.message
                .ends_with("checkpoint step-10 dropped, restarting from step-5"),
            "{}",
            j.message
        );
        j.start();
        j.fail(&unreadable);
        assert_eq!(j.resume_from(), "", "none left: a fresh start");
        assert!(j.checkpoints.is_empty() && j.latest_checkpoint.is_none());
        assert!(
            j.message
                .ends_with("restarting from the beginning (no complete checkpoint)"),
            "{}",
            j.message
        );
        // A fresh start has no checkpoint to drop: the failure counts as any other.
        j.start();
        let effects = j.fail(&unreadable);
        assert!(!effects.restarted);
        assert_eq!(j.state, JobState::Failed);
    }

    #[test]
    fn checkpoints_of_other_runs_are_refused_and_the_list_is_pruned_like_the_directories() {
        let mut j = job(1, 0);
        j.start();
        let mut foreign = checkpoint(&j, 3);
        foreign.run_id = "0ther/job-1".into();
        let observed = report_checkpoint(&mut j, foreign);
        assert_eq!(observed.new_checkpoint, None);
        let (path, why) = observed.refused.unwrap();
        assert_eq!(path, "/o/checkpoints/step-3");
        assert!(
            why.contains("belongs to run `0ther/job-1`, this job is run `5eed/job-1`"),
            "{why}"
        );
        assert!(j.latest_checkpoint.is_none() && j.checkpoints.is_empty());
        let best = checkpoint(&j, 4);
        j.observe(Telemetry {
            progress: Some(Progress::default()),
            best_checkpoint: Some(best.clone()),
            checkpoint: Some(best.clone()),
            ..Default::default()
        });
        for step in [8, 12, 16] {
            let c = checkpoint(&j, step);
            let observed = report_checkpoint(&mut j, c.clone());
            assert_eq!(observed.new_checkpoint, Some(c));
        }
        let tags: Vec<&str> = j.checkpoints.iter().map(|c| c.tag.as_str()).collect();
        assert_eq!(tags, ["step-4", "step-12", "step-16"], "the newest 2 and the best");
        assert_eq!(j.latest_checkpoint.as_ref().unwrap().tag, "step-16");
        let same = checkpoint(&j, 16);
        let again = report_checkpoint(&mut j, same);
        assert!(again.new_checkpoint.is_none() && !again.step_advanced);
    }

    #[test]
    fn an_attempt_resumes_from_a_checkpoint_of_an_earlier_attempt_only() {
        let mut j = job(1, 1);
        j.start();
        let c = checkpoint(&j, 5);
        report_checkpoint(&mut j, c);
        assert_eq!(j.resume_from(), "", "the first attempt starts fresh");
        j.fail(&failure(FailureKind::Io));
        j.start();
        let c = checkpoint(&j, 9);
        report_checkpoint(&mut j, c);
        assert_eq!(j.latest_checkpoint.as_ref().unwrap().tag, "step-9");
        assert_eq!(
            j.resume_from(),
            "/o/checkpoints/step-5",
            "a rank joining attempt 2 late gets what its peers got"
        );
    }

    fn lost(rank: u32, survivors: &[u32]) -> Failure {
        Failure {
            kind: FailureKind::PeerLost,
            message: format!("rank {rank} lost: heartbeat stream closed"),
            lost: Some(LostRank {
                rank,
                survivors: survivors.to_vec(),
            }),
        }
    }

    fn elastic(min_workers: u32, config: &str) -> Job {
        let spec = JobSpec {
            ds_config_json: config.into(),
            world_size: 3,
            min_workers,
            placements: launch_plan::cpu_plan(3).iter().map(Placement::to_proto).collect(),
            ..Default::default()
        };
        let plan = JobPlan::resolve(&spec, 3).unwrap();
        let mut j = Job::submitted(1, spec, &plan, "5eed");
        j.start();
        j
    }

    #[test]
    fn a_rank_lost_for_good_leaves_the_job_to_continue_on_the_others() {
        let mut j = elastic(2, r#"{"train_batch_size": 24, "train_micro_batch_size_per_gpu": 4}"#);
        let c = checkpoint(&j, 7);
        report_checkpoint(&mut j, c);
        let effects = j.fail(&lost(1, &[0, 2]));
        assert!(effects.restarted);
        assert_eq!(effects.order.unwrap().kind, OrderKind::Abort);
        assert_eq!(effects.events[0].0, "shrink");
        assert_eq!(
            (j.state, j.world_size(), j.shrinks, j.automatic_restarts),
            (JobState::Pending, 2, 1, 0)
        );
        assert_eq!(j.placements(), launch_plan::cpu_plan(2));
        assert_eq!(
            (j.batch.train_batch_size, j.batch.gradient_accumulation_steps),
            (24, 3),
            "the global batch is kept, the accumulation inferred"
        );
        assert_eq!(j.resume_from(), "/o/checkpoints/step-7");
        assert_eq!(
            j.message,
            "rank 1 lost: heartbeat stream closed; continuing on 2 of 3 ranks (--min_workers 2, shrink 1) \
             from step-7, train_batch_size 24 = 4 x 3 x 2"
        );
        // Below the minimum: FAILED, saying why.
        j.start();
        j.fail(&lost(0, &[1]));
        assert_eq!(j.state, JobState::Failed);
        assert!(
            j.message
                .ends_with("not continued on the other ranks: 1 of 2 rank(s) left, --min_workers is 2"),
            "{}",
            j.message
        );
    }

    #[test]
    fn no_shrink_when_the_batch_rule_fails_or_elasticity_is_off() {
        let mut j = elastic(2, r#"{"train_batch_size": 12, "train_micro_batch_size_per_gpu": 4}"#);
        j.fail(&lost(2, &[0, 1]));
        assert_eq!(j.state, JobState::Failed);
        assert!(
            j.message.contains("DeepSpeed's batch rule does not hold for 2 rank(s)"),
            "{}",
            j.message
        );
        let mut j = elastic(0, r#"{"train_micro_batch_size_per_gpu": 4}"#);
        j.fail(&lost(2, &[0, 1]));
        assert_eq!(
            (j.state, j.message.as_str()),
            (JobState::Failed, "rank 2 lost: heartbeat stream closed")
        );
    }

    #[test]
    fn a_replaced_attempt_resumes_without_using_up_restarts() {
        let mut j = job(2, 0);
        j.start();
        let c = checkpoint(&j, 4);
        report_checkpoint(&mut j, c);
        let effects = j.replace_attempt("rank 0 registered as a new process");
        assert!(effects.restarted);
        assert_eq!(effects.order.unwrap().kind, OrderKind::Abort);
        assert_eq!((j.state, j.restarts, j.automatic_restarts), (JobState::Pending, 1, 0));
        assert_eq!(
            j.message,
            "rank 0 registered as a new process; attempt 2 resumes from step-4"
        );
        assert_eq!(j.resume_from(), "/o/checkpoints/step-4");
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
        j.kill(true, 0, "kill requested").unwrap();
        assert_eq!(j.merged(&merge, Ok(1)), Effects::default());
        assert_eq!(j.state, JobState::Killed);
    }

    #[test]
    fn resume_refuses_running_succeeded_and_unreadable_jobs() {
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
        let mut damaged = Job::unreadable(4, "state record `job/000000000004` cannot be read: empty record".into());
        assert_eq!((damaged.id.as_str(), damaged.state), ("job-4", JobState::Failed));
        let err = damaged.resume(0, None).unwrap_err().to_string();
        assert!(
            err.starts_with("job job-4 cannot be resumed: state record `job/000000000004`"),
            "{err}"
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
        assert_eq!(j.message, "resumed from the beginning (no complete checkpoint)");
        assert_eq!((j.restarts, j.automatic_restarts), (1, 0));
    }

    #[test]
    fn telemetry_registers_new_checkpoints_once() {
        let mut j = job(1, 0);
        assert_eq!(j.observe(Telemetry::default()), None);
        let checkpoint = checkpoint(&j, 5);
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
        assert_eq!(j.resume_from(), "/o/checkpoints/step-5");
    }
}
