//! The coordinator's job and worker bookkeeping: one in-memory mirror of the sled records,
//! changed only through the methods here, each of which persists before it returns.

use crate::error::{CoordinatorError, Result};
use crate::store::{job_id, job_number, Store};
use kormlm_proto::ds_config::DsConfig;
use kormlm_proto::train_args::TrainArgs;
use kormlm_proto::v1::{
    Assignment, BatchSizes, CommandKind, CoordinatorCommand, DeviceKind, EarlyStopState, EventRecord, JobRecord,
    JobSpec, JobState, JobStatus, Progress, RegisterRequest, RendezvousInfo, RendezvousRequest, TaskKind, WorkerInfo,
    WorkerReport, WorkerState,
};
use kormlm_proto::{now_ms, PROTOCOL_VERSION};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tonic::Status;

/// Tunables of the coordinator.
#[derive(Debug, Clone)]
pub struct Settings {
    pub heartbeat_interval: Duration,
    /// A worker without a heartbeat for this long is LOST.
    pub worker_timeout: Duration,
    /// Shared secret required from workers and for mutating calls; `None`: open.
    pub token: Option<String>,
    /// With a token: read-only calls (status, watch, list) need no token.
    pub open_status: bool,
    /// How long a rendezvous waits for all ranks.
    pub rendezvous_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(1000),
            worker_timeout: Duration::from_millis(5000),
            token: None,
            open_status: false,
            rendezvous_timeout: Duration::from_secs(300),
        }
    }
}

/// Extra time a restarted coordinator gives the workers it finds in its records.
const RECONNECT_GRACE: Duration = Duration::from_secs(10);

/// How long a reported collective failure waits for the loss of the peer that caused it.
const COLLECTIVE_FAILURE_GRACE: Duration = Duration::from_secs(2);

/// A heartbeat stream of this coordinator process.
struct Session {
    id: u64,
    commands: mpsc::UnboundedSender<CoordinatorCommand>,
}

struct Worker {
    info: WorkerInfo,
    /// Last sign of life seen by this process (records loaded from disk start at load time).
    last_seen: Instant,
    session: Option<Session>,
    /// Registered in this process (and not yet lost); a rank held this way cannot be claimed.
    live: bool,
}

struct Round {
    attempt: u32,
    nccl_unique_id: Vec<u8>,
    addresses: Vec<String>,
    arrived: Vec<bool>,
    done: watch::Sender<Option<RendezvousInfo>>,
}

struct Job {
    number: u64,
    record: JobRecord,
    workers: BTreeMap<u32, Worker>,
    round: Option<Round>,
    /// A collective failure reported by a rank, held back briefly: when a peer died, its loss
    /// is usually seen a moment later and is the better reason to name.
    pending_failure: Option<(String, Instant)>,
}

impl Job {
    fn status(&self) -> &JobStatus {
        self.record.status.as_ref().expect("job records always carry a status")
    }

    fn status_mut(&mut self) -> &mut JobStatus {
        self.record.status.get_or_insert_with(Default::default)
    }

    fn spec(&self) -> &JobSpec {
        self.record.spec.as_ref().expect("job records always carry a spec")
    }

    fn state(&self) -> JobState {
        JobState::try_from(self.status().state).unwrap_or(JobState::Unspecified)
    }

    fn is_active(&self) -> bool {
        matches!(self.state(), JobState::Pending | JobState::Running | JobState::Stopping)
    }

    fn full_status(&self) -> JobStatus {
        let mut status = self.status().clone();
        status.workers = self.workers.values().map(|w| w.info.clone()).collect();
        status
    }
}

struct Inner {
    jobs: BTreeMap<u64, Job>,
    next_session: u64,
}

pub struct Coordinator {
    inner: Mutex<Inner>,
    store: Store,
    settings: Settings,
    changed: watch::Sender<u64>,
}

fn is_terminal(state: JobState) -> bool {
    matches!(state, JobState::Killed | JobState::Failed | JobState::Succeeded)
}

fn state_name(state: JobState) -> &'static str {
    state.as_str_name()
}

fn store_status(e: CoordinatorError) -> Status {
    tracing::error!(error = %e, "state store failure");
    Status::internal(e.to_string())
}

impl Coordinator {
    /// Loads every job and worker record from the store.
    pub fn load(store: Store, settings: Settings) -> Result<Arc<Self>> {
        let mut jobs = BTreeMap::new();
        // Workers of a previous coordinator get extra time to notice the restart and register
        // again (they back off up to 2 s between attempts) before the timeout applies.
        let started = Instant::now() + RECONNECT_GRACE;
        for (number, record) in store.jobs()? {
            let workers = store
                .workers(number)?
                .into_iter()
                .map(|info| {
                    (
                        info.rank,
                        Worker {
                            info,
                            last_seen: started,
                            session: None,
                            live: false,
                        },
                    )
                })
                .collect();
            jobs.insert(
                number,
                Job {
                    number,
                    record,
                    workers,
                    round: None,
                    pending_failure: None,
                },
            );
        }
        let (changed, _) = watch::channel(0);
        Ok(Arc::new(Self {
            inner: Mutex::new(Inner { jobs, next_session: 1 }),
            store,
            settings,
            changed,
        }))
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// A receiver that changes whenever any job or worker does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn persist_job(&self, job: &Job) -> Result<()> {
        self.store.put_job(job.number, &job.record)
    }

    fn event(&self, job: &Job, kind: &str, message: String) -> Result<()> {
        tracing::info!(job_id = %job.status().job_id, kind, "{message}");
        self.store.append_event(
            job.number,
            &EventRecord {
                unix_ms: now_ms(),
                job_id: job.status().job_id.clone(),
                kind: kind.into(),
                message,
            },
        )
    }

    /// Moves a job to `state`, persisting it (with fsync) before anyone can observe it.
    fn set_state(&self, job: &mut Job, state: JobState, message: String) -> Result<()> {
        let from = job.state();
        if from == state {
            return Ok(());
        }
        let status = job.status_mut();
        status.state = state as i32;
        status.message = message.clone();
        if state == JobState::Running && status.started_unix_ms == 0 {
            status.started_unix_ms = now_ms();
        }
        if is_terminal(state) {
            status.ended_unix_ms = now_ms();
            job.round = None;
        }
        self.persist_job(job)?;
        let text = if message.is_empty() {
            format!("{} -> {}", state_name(from), state_name(state))
        } else {
            format!("{} -> {}: {message}", state_name(from), state_name(state))
        };
        self.event(job, "state", text)?;
        self.store.flush()?;
        Ok(())
    }

    /// Validates and records a new job; returns its id and the config warnings.
    pub fn submit(&self, spec: JobSpec) -> Result<(String, Vec<String>), Status> {
        let source = if spec.ds_config_path.is_empty() {
            "ds_config".to_string()
        } else {
            spec.ds_config_path.clone()
        };
        if spec.world_size == 0 {
            return Err(Status::invalid_argument("world_size must be at least 1"));
        }
        let parsed =
            DsConfig::parse(&spec.ds_config_json, &source).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let resolved = parsed
            .config
            .resolve(spec.world_size, &source)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let args = TrainArgs::from_map(&spec.args).map_err(Status::invalid_argument)?;
        for warning in &parsed.warnings {
            tracing::warn!("{warning}");
        }
        let mut spec = spec;
        if spec.task == TaskKind::Unspecified as i32 {
            spec.task = TaskKind::Train as i32;
        }
        if spec.device == DeviceKind::Unspecified as i32 {
            spec.device = DeviceKind::Cpu as i32;
        }
        let number = self.store.next_job_number().map_err(store_status)?;
        let id = job_id(number);
        let output_dir = args
            .output_dir
            .clone()
            .unwrap_or_else(|| std::path::Path::new(&args.model_dir).join(&id).display().to_string());
        spec.args.insert("output_dir".into(), output_dir.clone());
        let batch = resolved.batch;
        let status = JobStatus {
            job_id: id.clone(),
            state: JobState::Pending as i32,
            task: spec.task,
            world_size: spec.world_size,
            batch: Some(BatchSizes {
                train_batch_size: batch.train_batch_size,
                train_micro_batch_size_per_gpu: batch.train_micro_batch_size_per_gpu,
                gradient_accumulation_steps: batch.gradient_accumulation_steps,
            }),
            progress: Some(Progress::default()),
            early_stop: Some(EarlyStopState {
                max_stop_number: args.max_stop_number,
                ..Default::default()
            }),
            message: format!("waiting for {} worker(s) to register", spec.world_size),
            created_unix_ms: now_ms(),
            max_restarts: spec.max_restarts,
            output_dir,
            ..Default::default()
        };
        let job = Job {
            number,
            record: JobRecord {
                spec: Some(spec),
                status: Some(status),
                resolved_config_json: resolved.to_json(),
            },
            workers: BTreeMap::new(),
            round: None,
            pending_failure: None,
        };
        let mut inner = self.lock();
        self.persist_job(&job).map_err(store_status)?;
        self.event(&job, "state", "submitted -> PENDING".into())
            .map_err(store_status)?;
        self.store.flush().map_err(store_status)?;
        inner.jobs.insert(number, job);
        drop(inner);
        self.notify();
        Ok((id, parsed.warnings))
    }

    /// The job with this id, or the newest job when `job_id` is empty.
    pub fn status(&self, job_id: &str) -> Result<JobStatus, Status> {
        let inner = self.lock();
        let job = if job_id.is_empty() {
            inner.jobs.values().next_back()
        } else {
            job_number(job_id).and_then(|n| inner.jobs.get(&n))
        };
        match job {
            Some(job) => Ok(job.full_status()),
            None if job_id.is_empty() => Err(Status::not_found("no job has been submitted to this coordinator yet")),
            None => Err(Status::not_found(format!("no job `{job_id}` (ids look like job-1)"))),
        }
    }

    pub fn list(&self) -> Vec<JobStatus> {
        self.lock().jobs.values().map(Job::full_status).collect()
    }

    /// The job workers register with: the oldest one that is not finished.
    fn active_job(inner: &mut Inner) -> Option<&mut Job> {
        inner.jobs.values_mut().find(|j| j.is_active())
    }

    /// Read-only calls need the token too, unless the coordinator runs with --open-status.
    pub fn check_read_token(&self, token: &str) -> Result<(), Status> {
        if self.settings.open_status {
            return Ok(());
        }
        self.check_token(token)
    }

    pub fn check_token(&self, token: &str) -> Result<(), Status> {
        match &self.settings.token {
            Some(expected) if expected != token => Err(Status::unauthenticated(
                "this coordinator requires a token: pass --token or set KORMLM_TOKEN to the coordinator's secret",
            )),
            _ => Ok(()),
        }
    }

    /// Claims a rank of the active job for a worker.
    pub fn register(&self, request: RegisterRequest) -> Result<Assignment, Status> {
        self.check_token(&request.token)?;
        if request.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "worker speaks protocol version {}, this coordinator speaks {PROTOCOL_VERSION}; use matching kormlm builds",
                request.protocol_version
            )));
        }
        let mut inner = self.lock();
        let job = Self::active_job(&mut inner)
            .ok_or_else(|| Status::failed_precondition("no job is waiting for workers on this coordinator"))?;
        let world = job.spec().world_size;
        let id = job.status().job_id.clone();
        if request.rank >= world {
            return Err(Status::invalid_argument(format!(
                "rank {} is out of range: job {id} has world size {world} (ranks 0..={})",
                request.rank,
                world - 1
            )));
        }
        if job.state() == JobState::Stopping {
            return Err(Status::failed_precondition(format!(
                "job {id} is stopping; it takes no new workers"
            )));
        }
        if let Some(existing) = job.workers.get(&request.rank) {
            if existing.live && existing.info.state == WorkerState::Alive as i32 {
                return Err(Status::already_exists(format!(
                    "rank {} of job {id} is already held by pid {} on host {}; each rank registers once \
                     (stop that worker first, or pick another --rank)",
                    request.rank, existing.info.pid, existing.info.host
                )));
            }
        }
        let placement = job.spec().placements.iter().find(|p| p.rank == request.rank).cloned();
        let local_rank = match (&placement, request.local_rank) {
            (Some(p), _) => p.local_rank,
            (None, l) if l >= 0 => l as u32,
            (None, _) => request.rank,
        };
        let device = DeviceKind::try_from(job.spec().device).unwrap_or(DeviceKind::Cpu);
        let (devices, cuda_devices) = match (device, placement) {
            (DeviceKind::Cuda, Some(p)) if !p.cuda_devices.is_empty() => (
                p.cuda_devices.iter().map(|d| format!("cuda:{d}")).collect(),
                p.cuda_devices,
            ),
            (DeviceKind::Cuda, _) => (vec![format!("cuda:{local_rank}")], vec![local_rank]),
            _ => (vec!["cpu".to_string()], vec![]),
        };
        let incarnation = job.workers.get(&request.rank).map_or(0, |w| w.info.incarnation) + 1;
        let info = WorkerInfo {
            rank: request.rank,
            local_rank,
            host: request.host.clone(),
            pid: request.pid,
            devices,
            state: WorkerState::Alive as i32,
            last_heartbeat_ms: now_ms(),
            optimizer_state_bytes: 0,
            reason: String::new(),
            incarnation,
            failure_kind: 0,
        };
        self.store.put_worker(job.number, &info).map_err(store_status)?;
        self.event(
            job,
            "worker",
            format!(
                "rank {} registered: pid {} on {} (incarnation {incarnation}, torch {}, {} CUDA device(s))",
                request.rank, request.pid, request.host, request.torch_version, request.cuda_device_count
            ),
        )
        .map_err(store_status)?;
        job.workers.insert(
            request.rank,
            Worker {
                info,
                last_seen: Instant::now(),
                session: None,
                live: true,
            },
        );
        let all_alive = (0..world).all(|r| {
            job.workers
                .get(&r)
                .is_some_and(|w| w.live && w.info.state == WorkerState::Alive as i32)
        });
        if all_alive && job.state() == JobState::Pending {
            self.set_state(job, JobState::Running, format!("all {world} worker(s) registered"))
                .map_err(store_status)?;
        }
        self.store.flush().map_err(store_status)?;
        let spec = job.spec();
        let batch = job.status().batch.unwrap_or_default();
        let assignment = Assignment {
            job_id: id,
            rank: request.rank,
            local_rank,
            world_size: world,
            device: device as i32,
            cuda_devices,
            resolved_config_json: job.record.resolved_config_json.clone(),
            batch: Some(batch),
            args: spec.args.clone(),
            task: spec.task,
            heartbeat_interval_ms: self.settings.heartbeat_interval.as_millis() as u32,
            incarnation,
            attempt: job.status().restarts + 1,
            output_dir: job.status().output_dir.clone(),
            resume_from: if job.status().restarts > 0 {
                job.status()
                    .latest_checkpoint
                    .as_ref()
                    .map(|c| c.path.clone())
                    .unwrap_or_default()
            } else {
                String::new()
            },
        };
        drop(inner);
        self.notify();
        Ok(assignment)
    }

    /// Binds a heartbeat stream to a registered worker; returns the session id and the
    /// receiving end of its command channel.
    pub fn attach(
        &self,
        job_id: &str,
        rank: u32,
        incarnation: u32,
    ) -> Result<(u64, mpsc::UnboundedReceiver<CoordinatorCommand>), Status> {
        let mut inner = self.lock();
        let session_id = inner.next_session;
        inner.next_session += 1;
        let job = job_number(job_id)
            .and_then(|n| inner.jobs.get_mut(&n))
            .ok_or_else(|| Status::not_found(format!("no job `{job_id}`")))?;
        let state = job.state();
        let worker = job
            .workers
            .get_mut(&rank)
            .filter(|w| w.info.incarnation == incarnation && w.live)
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "rank {rank} incarnation {incarnation} of {job_id} is not registered with this coordinator; register again"
                ))
            })?;
        let (tx, rx) = mpsc::unbounded_channel();
        // A worker that attaches late must still hear about a stop that was already ordered.
        if is_terminal(state) {
            let _ = tx.send(CoordinatorCommand {
                kind: CommandKind::Shutdown as i32,
                reason: format!("job {job_id} has ended"),
            });
        } else if state == JobState::Stopping {
            let _ = tx.send(CoordinatorCommand {
                kind: CommandKind::StopAfterStep as i32,
                reason: "kill requested: finishing the current step".into(),
            });
        }
        worker.session = Some(Session {
            id: session_id,
            commands: tx,
        });
        worker.last_seen = Instant::now();
        Ok((session_id, rx))
    }

    /// Records one heartbeat report.
    pub fn report(&self, session_id: u64, report: WorkerReport) -> Result<(), Status> {
        let mut inner = self.lock();
        let job = job_number(&report.job_id)
            .and_then(|n| inner.jobs.get_mut(&n))
            .ok_or_else(|| Status::not_found(format!("no job `{}`", report.job_id)))?;
        let number = job.number;
        let Some(worker) = job.workers.get_mut(&report.rank) else {
            return Err(Status::failed_precondition(format!(
                "rank {} is not registered",
                report.rank
            )));
        };
        if worker.session.as_ref().map(|s| s.id) != Some(session_id) {
            return Err(Status::failed_precondition(
                "this heartbeat stream was replaced by a newer registration",
            ));
        }
        worker.last_seen = Instant::now();
        worker.info.last_heartbeat_ms = now_ms();
        worker.info.optimizer_state_bytes = report.optimizer_state_bytes;
        let rank = report.rank;
        let mut failure = None;
        if !report.failure.is_empty() {
            worker.info.state = WorkerState::WorkerFailed as i32;
            worker.info.reason = report.failure.clone();
            worker.live = false;
            failure = Some(report.failure.clone());
        } else if report.finished {
            worker.info.state = WorkerState::Exited as i32;
            worker.live = false;
        }
        let info = worker.info.clone();
        self.store.put_worker(number, &info).map_err(store_status)?;
        if rank == 0 && (report.progress.is_some() || report.early_stop.is_some()) {
            let status = job.status_mut();
            let previous_step = status.progress.map_or(0, |p| p.global_step);
            if let Some(progress) = report.progress {
                status.progress = Some(progress);
            }
            if let Some(mut early) = report.early_stop {
                early.max_stop_number = status.early_stop.as_ref().map_or(0, |e| e.max_stop_number);
                status.early_stop = Some(early);
            }
            let new_checkpoint = report
                .checkpoint
                .as_ref()
                .is_some_and(|c| status.latest_checkpoint.as_ref().map(|l| &l.path) != Some(&c.path));
            if report.checkpoint.is_some() {
                status.latest_checkpoint = report.checkpoint.clone();
            }
            if report.best_checkpoint.is_some() {
                status.best_checkpoint = report.best_checkpoint.clone();
            }
            let step = status.progress.map_or(0, |p| p.global_step);
            self.persist_job(job).map_err(store_status)?;
            // Progress is durable before anyone can read it back.
            if step != previous_step {
                self.store.flush().map_err(store_status)?;
            }
            if new_checkpoint {
                let c = report.checkpoint.expect("checked above");
                self.event(
                    job,
                    "checkpoint",
                    format!("checkpoint {} at step {} ({})", c.tag, c.global_step, c.path),
                )
                .map_err(store_status)?;
                self.store.flush().map_err(store_status)?;
            }
        }
        if let Some(reason) = failure {
            self.event(job, "failure", format!("rank {rank} failed: {reason}"))
                .map_err(store_status)?;
            if reason.contains("collective") {
                job.pending_failure = Some((format!("rank {rank} failed: {reason}"), Instant::now()));
            } else {
                self.fail_job(job, format!("rank {rank} failed: {reason}"))
                    .map_err(store_status)?;
            }
        } else if report.finished {
            self.event(job, "worker", format!("rank {rank} finished"))
                .map_err(store_status)?;
            self.settle_if_all_exited(job).map_err(store_status)?;
        }
        drop(inner);
        self.notify();
        Ok(())
    }

    /// When every rank has exited cleanly: STOPPING → KILLED, RUNNING → SUCCEEDED.
    fn settle_if_all_exited(&self, job: &mut Job) -> Result<()> {
        let world = job.spec().world_size;
        let all_exited = (0..world).all(|r| {
            job.workers
                .get(&r)
                .is_some_and(|w| w.info.state == WorkerState::Exited as i32)
        });
        if !all_exited {
            return Ok(());
        }
        match job.state() {
            JobState::Stopping => self.set_state(job, JobState::Killed, "killed on request; all workers exited".into()),
            JobState::Running if job.spec().task == TaskKind::Augment as i32 => {
                // Every worker wrote its parts; join them in input order.
                let output = kormlm_proto::augment_args::AugmentArgs::from_map(&job.spec().args)
                    .ok()
                    .and_then(|a| a.output)
                    .unwrap_or_default();
                match kormlm_proto::augment_parts::merge(&kormlm_proto::augment_parts::parts_dir(&output), &output) {
                    Ok(parts) => self.set_state(
                        job,
                        JobState::Succeeded,
                        format!("all workers finished; {parts} part(s) merged into {}", output.display()),
                    ),
                    Err(e) => self.set_state(job, JobState::Failed, format!("merging the augmentation parts: {e}")),
                }
            }
            JobState::Running => self.set_state(job, JobState::Succeeded, "all workers finished".into()),
            _ => Ok(()),
        }
    }

    /// Fails the job (unless it already ended) and tells every connected worker to abort; with
    /// restarts left, the job goes back to PENDING to continue from its latest checkpoint.
    fn fail_job(&self, job: &mut Job, reason: String) -> Result<()> {
        for worker in job.workers.values() {
            if let Some(session) = &worker.session {
                let _ = session.commands.send(CoordinatorCommand {
                    kind: CommandKind::Abort as i32,
                    reason: reason.clone(),
                });
            }
        }
        match job.state() {
            JobState::Running if job.status().automatic_restarts < job.spec().max_restarts => {
                job.status_mut().automatic_restarts += 1;
                let restarts = job.status().automatic_restarts;
                self.restart(
                    job,
                    format!(
                        "{reason}; restart {restarts} of {} from the latest checkpoint",
                        job.spec().max_restarts
                    ),
                )
            }
            JobState::Running | JobState::Pending => self.set_state(job, JobState::Failed, reason),
            JobState::Stopping => self.set_state(job, JobState::Killed, format!("killed; {reason}")),
            _ => Ok(()),
        }
    }

    /// Back to PENDING for a new attempt: new workers, a new rendezvous, the latest checkpoint.
    fn restart(&self, job: &mut Job, reason: String) -> Result<()> {
        job.status_mut().restarts += 1;
        job.status_mut().ended_unix_ms = 0;
        job.workers.clear();
        job.round = None;
        job.pending_failure = None;
        self.store.clear_workers(job.number)?;
        self.set_state(job, JobState::Pending, reason)
    }

    /// Continues a KILLED or FAILED job from its latest checkpoint, optionally with another
    /// world size (the optimizer state is re-partitioned by the workers).
    pub fn resume(&self, job_id: &str, world_size: u32, token: &str) -> Result<JobStatus, Status> {
        self.check_token(token)?;
        let mut inner = self.lock();
        let active = Self::active_job(&mut inner).map(|j| j.status().job_id.clone());
        let job = job_number(job_id)
            .and_then(|n| inner.jobs.get_mut(&n))
            .ok_or_else(|| Status::not_found(format!("no job `{job_id}`")))?;
        match job.state() {
            JobState::Killed | JobState::Failed => {}
            JobState::Succeeded => {
                let early = job.status().early_stop.as_ref().is_some_and(|e| e.early_stopped);
                return Err(Status::failed_precondition(format!(
                    "job {job_id} already SUCCEEDED{}; there is nothing to resume",
                    if early { " (early stopped)" } else { "" }
                )));
            }
            other => {
                return Err(Status::failed_precondition(format!(
                    "job {job_id} is {}; only KILLED or FAILED jobs can be resumed",
                    other.as_str_name()
                )))
            }
        }
        if let Some(active) = active {
            return Err(Status::failed_precondition(format!(
                "job {active} is still active; resume {job_id} after it ends"
            )));
        }
        if world_size != 0 && world_size != job.spec().world_size {
            let spec = job.spec().clone();
            let source = if spec.ds_config_path.is_empty() {
                "ds_config".to_string()
            } else {
                spec.ds_config_path.clone()
            };
            let parsed =
                DsConfig::parse(&spec.ds_config_json, &source).map_err(|e| Status::invalid_argument(e.to_string()))?;
            let resolved = parsed
                .config
                .resolve(world_size, &source)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let cpu_only = spec.placements.iter().all(|p| p.cuda_devices.is_empty());
            if !spec.placements.is_empty() && !cpu_only {
                return Err(Status::invalid_argument(
                    "changing the world size of a GPU job needs new launch flags; start a coordinator with them instead",
                ));
            }
            let record_spec = job.record.spec.as_mut().expect("jobs have a spec");
            record_spec.world_size = world_size;
            if !record_spec.placements.is_empty() {
                record_spec.placements = (0..world_size)
                    .map(|rank| kormlm_proto::v1::Placement {
                        rank,
                        local_rank: rank,
                        host: "localhost".into(),
                        cuda_devices: vec![],
                    })
                    .collect();
            }
            job.record.resolved_config_json = resolved.to_json();
            let status = job.status_mut();
            status.world_size = world_size;
            status.batch = Some(BatchSizes {
                train_batch_size: resolved.batch.train_batch_size,
                train_micro_batch_size_per_gpu: resolved.batch.train_micro_batch_size_per_gpu,
                gradient_accumulation_steps: resolved.batch.gradient_accumulation_steps,
            });
        }
        let from = job
            .status()
            .latest_checkpoint
            .as_ref()
            .map_or("the beginning (no checkpoint yet)".to_string(), |c| c.tag.clone());
        self.restart(job, format!("resumed from {from}"))
            .map_err(store_status)?;
        let status = job.full_status();
        drop(inner);
        self.notify();
        Ok(status)
    }

    /// Jobs waiting for workers that this coordinator should start: (job id, attempt, placements).
    pub fn pending_launches(&self) -> Vec<(String, u32, Vec<kormlm_proto::v1::Placement>)> {
        let inner = self.lock();
        inner
            .jobs
            .values()
            .filter(|j| j.state() == JobState::Pending && !j.spec().placements.is_empty())
            .map(|j| {
                (
                    j.status().job_id.clone(),
                    j.status().restarts + 1,
                    j.spec().placements.clone(),
                )
            })
            .collect()
    }

    /// Hosts and pids of a job's workers, for signalling on a forced kill.
    pub fn worker_pids(&self, job_id: &str) -> Vec<(String, u32)> {
        let inner = self.lock();
        job_number(job_id)
            .and_then(|n| inner.jobs.get(&n))
            .map(|j| j.workers.values().map(|w| (w.info.host.clone(), w.info.pid)).collect())
            .unwrap_or_default()
    }

    fn mark_lost(&self, job: &mut Job, rank: u32, reason: String) -> Result<()> {
        let number = job.number;
        let Some(worker) = job.workers.get_mut(&rank) else {
            return Ok(());
        };
        if worker.info.state != WorkerState::Alive as i32 {
            return Ok(());
        }
        if is_terminal(job.record.status.as_ref().map_or(JobState::Unspecified, |s| {
            JobState::try_from(s.state).unwrap_or(JobState::Unspecified)
        })) {
            // The job already ended; a worker leaving now is not a failure.
            worker.info.state = WorkerState::Exited as i32;
            worker.info.reason = format!("left after the job ended ({reason})");
            worker.live = false;
            worker.session = None;
            let info = worker.info.clone();
            return self.store.put_worker(number, &info);
        }
        worker.info.state = WorkerState::Lost as i32;
        worker.info.reason = reason.clone();
        worker.live = false;
        worker.session = None;
        let info = worker.info.clone();
        self.store.put_worker(number, &info)?;
        self.event(job, "failure", format!("rank {rank} lost: {reason}"))?;
        if matches!(job.state(), JobState::Running | JobState::Stopping) {
            self.fail_job(job, format!("rank {rank} lost: {reason}"))?;
        }
        self.store.flush()
    }

    /// A heartbeat stream ended (worker exit, crash or network failure).
    pub fn detach(&self, job_id: &str, rank: u32, session_id: u64, reason: String) {
        let mut inner = self.lock();
        let Some(job) = job_number(job_id).and_then(|n| inner.jobs.get_mut(&n)) else {
            return;
        };
        let current = job
            .workers
            .get(&rank)
            .and_then(|w| w.session.as_ref())
            .is_some_and(|s| s.id == session_id);
        if !current {
            return;
        }
        if let Err(e) = self.mark_lost(job, rank, reason) {
            tracing::error!(error = %e, "cannot record a lost worker");
        }
        drop(inner);
        self.notify();
    }

    /// A worker process this coordinator started has exited.
    pub fn process_exited(&self, job_id: &str, attempt: u32, rank: u32, pid: u32, description: &str) {
        let mut inner = self.lock();
        let Some(job) = job_number(job_id).and_then(|n| inner.jobs.get_mut(&n)) else {
            return;
        };
        if job.status().restarts + 1 != attempt {
            // A process of an earlier attempt; the job has moved on.
            return;
        }
        let alive = job
            .workers
            .get(&rank)
            .is_some_and(|w| w.info.state == WorkerState::Alive as i32 && w.info.pid == pid);
        let result = if alive {
            self.mark_lost(job, rank, description.to_string())
        } else if job.state() == JobState::Pending && !job.workers.contains_key(&rank) {
            self.fail_job(job, format!("rank {rank} exited before registering: {description}"))
                .and_then(|_| self.store.flush())
        } else {
            Ok(())
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot record a worker exit");
        }
        drop(inner);
        self.notify();
    }

    /// Marks workers without a heartbeat for longer than the timeout as LOST.
    pub fn sweep(&self) {
        let timeout = self.settings.worker_timeout;
        let mut inner = self.lock();
        let mut changed = false;
        for job in inner.jobs.values_mut() {
            if is_terminal(job.state()) {
                continue;
            }
            if let Some((reason, at)) = job.pending_failure.take() {
                if at.elapsed() < COLLECTIVE_FAILURE_GRACE {
                    job.pending_failure = Some((reason, at));
                } else if matches!(job.state(), JobState::Running | JobState::Stopping) {
                    if let Err(e) = self.fail_job(job, reason).and_then(|_| self.store.flush()) {
                        tracing::error!(error = %e, "cannot record a failed job");
                    }
                    changed = true;
                }
            }
            let late: Vec<(u32, Duration)> = job
                .workers
                .iter()
                .filter(|(_, w)| w.info.state == WorkerState::Alive as i32 && w.last_seen.elapsed() > timeout)
                .map(|(rank, w)| (*rank, w.last_seen.elapsed()))
                .collect();
            for (rank, silent) in late {
                let reason = format!(
                    "no heartbeat for {} ms (timeout {} ms)",
                    silent.as_millis(),
                    timeout.as_millis()
                );
                if let Err(e) = self.mark_lost(job, rank, reason) {
                    tracing::error!(error = %e, "cannot record a lost worker");
                }
                changed = true;
            }
        }
        drop(inner);
        if changed {
            self.notify();
        }
    }

    /// Stops a job: gracefully (workers finish the step and exit) or at once.
    pub fn kill(&self, job_id: &str, force: bool, token: &str) -> Result<JobStatus, Status> {
        self.check_token(token)?;
        let mut inner = self.lock();
        let job = job_number(job_id)
            .and_then(|n| inner.jobs.get_mut(&n))
            .ok_or_else(|| Status::not_found(format!("no job `{job_id}`")))?;
        let state = job.state();
        if is_terminal(state) {
            return Err(Status::failed_precondition(format!(
                "job {job_id} already ended ({})",
                state_name(state)
            )));
        }
        // Registered workers whose heartbeat stream is not attached yet hear of the stop when it
        // attaches (`attach`), so only a job without live workers ends at once.
        let live = job.workers.values().filter(|w| w.live).count();
        let (command, reason) = if force {
            (CommandKind::Shutdown, "killed on request (--force)".to_string())
        } else {
            (
                CommandKind::StopAfterStep,
                "kill requested: finishing the current step".to_string(),
            )
        };
        if force || live == 0 {
            self.set_state(job, JobState::Killed, reason.clone())
                .map_err(store_status)?;
        } else {
            self.set_state(job, JobState::Stopping, reason.clone())
                .map_err(store_status)?;
        }
        for worker in job.workers.values() {
            if let Some(session) = &worker.session {
                let _ = session.commands.send(CoordinatorCommand {
                    kind: command as i32,
                    reason: reason.clone(),
                });
            }
        }
        let status = job.full_status();
        drop(inner);
        self.notify();
        Ok(status)
    }

    /// Joins the rendezvous of `attempt`; resolves when every rank has joined.
    pub async fn rendezvous(&self, request: RendezvousRequest) -> Result<RendezvousInfo, Status> {
        let mut done = {
            let mut inner = self.lock();
            let job = job_number(&request.job_id)
                .and_then(|n| inner.jobs.get_mut(&n))
                .ok_or_else(|| Status::not_found(format!("no job `{}`", request.job_id)))?;
            let world = job.spec().world_size as usize;
            if request.rank as usize >= world {
                return Err(Status::invalid_argument(format!(
                    "rank {} is out of range",
                    request.rank
                )));
            }
            if !job.is_active() {
                return Err(Status::failed_precondition(format!(
                    "job {} is not running",
                    request.job_id
                )));
            }
            let stale = job.round.as_ref().is_none_or(|r| r.attempt < request.attempt);
            if stale {
                let (done, _) = watch::channel(None);
                job.round = Some(Round {
                    attempt: request.attempt,
                    nccl_unique_id: Vec::new(),
                    addresses: vec![String::new(); world],
                    arrived: vec![false; world],
                    done,
                });
            }
            let round = job.round.as_mut().expect("set above");
            if round.attempt != request.attempt {
                return Err(Status::failed_precondition(format!(
                    "rendezvous attempt {} is over; the group is forming attempt {}",
                    request.attempt, round.attempt
                )));
            }
            if request.rank == 0 && !request.nccl_unique_id.is_empty() {
                round.nccl_unique_id = request.nccl_unique_id.clone();
            }
            round.addresses[request.rank as usize] = request.ring_address.clone();
            round.arrived[request.rank as usize] = true;
            if round.arrived.iter().all(|a| *a) {
                let result = RendezvousInfo {
                    attempt: round.attempt,
                    nccl_unique_id: round.nccl_unique_id.clone(),
                    ring_addresses: round.addresses.clone(),
                };
                round.done.send_replace(Some(result));
            }
            round.done.subscribe()
        };
        let wait = async move { done.wait_for(|r| r.is_some()).await.map(|r| r.clone()) };
        match tokio::time::timeout(self.settings.rendezvous_timeout, wait).await {
            Ok(Ok(result)) => Ok(result.expect("waited for Some")),
            Ok(Err(_)) => Err(Status::aborted(
                "the job ended while its workers were forming the group",
            )),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "not every rank joined rendezvous attempt {} within {} s",
                request.attempt,
                self.settings.rendezvous_timeout.as_secs()
            ))),
        }
    }

    /// The job workers would join now: the oldest that has not ended.
    pub fn active_job_id(&self) -> Option<String> {
        let mut inner = self.lock();
        Self::active_job(&mut inner).map(|j| j.status().job_id.clone())
    }

    /// The state of a job, if it exists.
    pub fn job_state(&self, job_id: &str) -> Option<JobState> {
        let inner = self.lock();
        job_number(job_id).and_then(|n| inner.jobs.get(&n)).map(Job::state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coordinator(dir: &std::path::Path) -> Arc<Coordinator> {
        Coordinator::load(Store::open(dir).unwrap(), Settings::default()).unwrap()
    }

    fn spec(world: u32) -> JobSpec {
        JobSpec {
            ds_config_json: r#"{"train_micro_batch_size_per_gpu": 4}"#.into(),
            world_size: world,
            ..Default::default()
        }
    }

    fn register(rank: u32) -> RegisterRequest {
        RegisterRequest {
            rank,
            local_rank: -1,
            host: "h".into(),
            pid: 100 + rank,
            protocol_version: PROTOCOL_VERSION,
            ..Default::default()
        }
    }

    #[test]
    fn job_runs_when_all_ranks_register() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let (id, _) = c.submit(spec(2)).unwrap();
        assert_eq!(c.status(&id).unwrap().state, JobState::Pending as i32);
        let a = c.register(register(1)).unwrap();
        assert_eq!((a.rank, a.world_size, a.batch.unwrap().train_batch_size), (1, 2, 8));
        c.register(register(0)).unwrap();
        let status = c.status(&id).unwrap();
        assert_eq!(status.state, JobState::Running as i32);
        assert_eq!(status.workers.len(), 2);
    }

    #[test]
    fn duplicate_and_out_of_range_ranks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        c.submit(spec(2)).unwrap();
        c.register(register(0)).unwrap();
        let err = c.register(register(0)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::AlreadyExists);
        assert!(err.message().contains("already held by pid 100"), "{}", err.message());
        let err = c.register(register(2)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("rank 2 is out of range"), "{}", err.message());
    }

    #[test]
    fn bad_config_is_refused_with_the_deepspeed_message() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let mut s = spec(2);
        s.ds_config_json = r#"{"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}"#.into();
        s.ds_config_path = "cfg.json".into();
        let err = c.submit(s).unwrap_err();
        assert!(err.message().contains("30 != 4 * 3 * 2"), "{}", err.message());
    }

    #[test]
    fn a_kill_before_the_heartbeats_attach_waits_for_the_workers() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let (id, _) = c.submit(spec(2)).unwrap();
        let a0 = c.register(register(0)).unwrap();
        c.register(register(1)).unwrap();
        c.kill(&id, false, "").unwrap();
        assert_eq!(c.status(&id).unwrap().state, JobState::Stopping as i32);
        let (_, mut commands) = c.attach(&id, 0, a0.incarnation).unwrap();
        assert_eq!(commands.try_recv().unwrap().kind, CommandKind::StopAfterStep as i32);
    }

    #[test]
    fn a_user_resume_does_not_use_up_the_automatic_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let (id, _) = c
            .submit(JobSpec {
                max_restarts: 1,
                ..spec(2)
            })
            .unwrap();
        let fail_rank_0 = || {
            let a0 = c.register(register(0)).unwrap();
            c.register(register(1)).unwrap();
            let (session, _rx) = c.attach(&id, 0, a0.incarnation).unwrap();
            (session, _rx)
        };
        let (session, _rx) = fail_rank_0();
        c.kill(&id, false, "").unwrap();
        c.detach(&id, 0, session, "stream closed".into());
        assert_eq!(c.status(&id).unwrap().state, JobState::Killed as i32);
        c.resume(&id, 0, "").unwrap();
        let (session, _rx) = fail_rank_0();
        c.detach(&id, 0, session, "stream closed".into());
        let status = c.status(&id).unwrap();
        assert_eq!(status.state, JobState::Pending as i32, "{}", status.message);
        assert_eq!((status.restarts, status.automatic_restarts), (2, 1));
        let (session, _rx) = fail_rank_0();
        c.detach(&id, 0, session, "stream closed".into());
        assert_eq!(c.status(&id).unwrap().state, JobState::Failed as i32);
    }

    #[test]
    fn a_lost_worker_fails_a_running_job_and_frees_its_rank() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let (id, _) = c.submit(spec(2)).unwrap();
        let a0 = c.register(register(0)).unwrap();
        c.register(register(1)).unwrap();
        let (session, _rx) = c.attach(&id, 0, a0.incarnation).unwrap();
        c.detach(&id, 0, session, "stream closed".into());
        let status = c.status(&id).unwrap();
        assert_eq!(status.state, JobState::Failed as i32);
        assert!(status.message.contains("rank 0 lost"), "{}", status.message);
        assert_eq!(status.workers[0].state, WorkerState::Lost as i32);
    }

    #[test]
    fn records_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let c = coordinator(dir.path());
            let (id, _) = c.submit(spec(1)).unwrap();
            c.register(register(0)).unwrap();
            id
        };
        let c = coordinator(dir.path());
        let status = c.status(&id).unwrap();
        assert_eq!(status.state, JobState::Running as i32);
        assert_eq!(status.workers[0].pid, 100);
        // The rank's holder belonged to the previous process, so it may register again.
        let again = c.register(register(0)).unwrap();
        assert_eq!(again.incarnation, 2);
    }

    #[tokio::test]
    async fn rendezvous_waits_for_every_rank() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let (id, _) = c.submit(spec(2)).unwrap();
        c.register(register(0)).unwrap();
        c.register(register(1)).unwrap();
        let request = |rank: u32| RendezvousRequest {
            job_id: id.clone(),
            rank,
            attempt: 1,
            nccl_unique_id: if rank == 0 { vec![7; 128] } else { vec![] },
            ring_address: format!("127.0.0.1:{}", 9000 + rank),
            token: String::new(),
        };
        let (a, b) = tokio::join!(c.rendezvous(request(1)), c.rendezvous(request(0)));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a, b);
        assert_eq!(a.nccl_unique_id, vec![7; 128]);
        assert_eq!(a.ring_addresses, vec!["127.0.0.1:9000", "127.0.0.1:9001"]);
    }
}
