//! The coordinator's state: every job with its workers and rendezvous, in memory and in sled.
//! The parts decide — [`job`] a job's life cycle, [`workers`] who holds which rank,
//! [`rendezvous`] forming the group — and this module holds the lock, carries out what they
//! return (a change is durable before anyone can observe it) and tells watchers.

pub mod job;
pub mod rendezvous;
pub mod workers;

use crate::error::{CoordinatorError, Result};
use crate::launch_plan::Placement;
use crate::store::{job_number, Store};
use job::{Assignment, AugmentMerge, Effects, Failure, Job, JobState, Order, Settled};
use kormlm_proto::failure::FailureKind;
use kormlm_proto::job_plan::JobPlan;
use kormlm_proto::v1::{EventRecord, JobRecord, JobSpec, WorkerInfo};
use kormlm_proto::{now_ms, PROTOCOL_VERSION};
use rendezvous::{Arrival, Group, Round};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use workers::{Registration, Report, Roster, Worker};

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

/// How long a failure that usually follows a peer's loss waits for that loss to be seen, so
/// the rank that caused it is the one named.
const PEER_FAILURE_GRACE: Duration = Duration::from_secs(2);

/// A job with its workers, as status shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    pub job: Job,
    pub workers: Vec<Worker>,
}

/// One job, with what this process knows about it beyond its records.
struct Entry {
    job: Job,
    workers: Roster,
    round: Option<Round>,
    /// A reported failure waiting briefly for a peer's loss (see [`job::waits_for_a_peer`]).
    held: Option<(Failure, Instant)>,
    /// The attempt whose augmentation parts are being merged.
    merging: Option<u32>,
}

impl Entry {
    fn new(job: Job, workers: Roster) -> Self {
        Self {
            job,
            workers,
            round: None,
            held: None,
            merging: None,
        }
    }

    fn view(&self) -> JobView {
        JobView {
            job: self.job.clone(),
            workers: self.workers.workers(),
        }
    }
}

struct Inner {
    jobs: BTreeMap<u64, Entry>,
    next_session: u64,
}

impl Inner {
    fn entry_mut(&mut self, job_id: &str) -> Result<&mut Entry> {
        job_number(job_id)
            .and_then(|n| self.jobs.get_mut(&n))
            .ok_or_else(|| CoordinatorError::NotFound(format!("no job `{job_id}`")))
    }

    /// The job workers register with: the oldest one that has not ended.
    fn active_mut(&mut self) -> Option<&mut Entry> {
        self.jobs.values_mut().find(|e| e.job.state.is_active())
    }
}

pub struct Coordinator {
    inner: Mutex<Inner>,
    store: Store,
    settings: Settings,
    changed: watch::Sender<u64>,
}

impl Coordinator {
    /// Loads every job and worker record from the store.
    pub fn load(store: Store, settings: Settings) -> Result<Arc<Self>> {
        let mut jobs = BTreeMap::new();
        // Workers of a previous coordinator get extra time to notice the restart and register
        // again (they back off up to 2 s between attempts) before the timeout applies.
        let seen = Instant::now() + RECONNECT_GRACE;
        for (number, record) in store.jobs()? {
            let job = crate::wire::job_from_record(number, record)?;
            let workers = store.workers(number)?.into_iter().map(Worker::from).collect();
            jobs.insert(number, Entry::new(job, Roster::loaded(workers, seen)));
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

    fn persist(&self, job: &Job) -> Result<()> {
        self.store.put_job(job.number, &JobRecord::from(job))
    }

    fn persist_worker(&self, job: &Job, worker: &Worker) -> Result<()> {
        self.store.put_worker(job.number, &WorkerInfo::from(worker))
    }

    fn event(&self, job: &Job, kind: &str, message: String) -> Result<()> {
        tracing::info!(job_id = %job.id, kind, "{message}");
        self.store.append_event(
            job.number,
            &EventRecord {
                unix_ms: now_ms(),
                job_id: job.id.clone(),
                kind: kind.into(),
                message,
            },
        )
    }

    /// Carries out what a transition returned: the change durable (fsync) first, then the
    /// orders to the workers, then the old attempt's workers and rendezvous forgotten.
    fn apply(&self, entry: &mut Entry, effects: Effects) -> Result<()> {
        if let Some(change) = &effects.change {
            self.persist(&entry.job)?;
            self.event(&entry.job, "state", change.describe())?;
        }
        if effects.restarted {
            self.store.clear_workers(entry.job.number)?;
        }
        if effects.change.is_some() || effects.restarted {
            self.store.flush()?;
        }
        if let Some(order) = &effects.order {
            entry.workers.send(order);
        }
        if effects.restarted {
            entry.workers.clear();
            entry.round = None;
            entry.held = None;
            entry.merging = None;
        }
        if effects.change.is_some_and(|c| c.to.is_terminal()) {
            entry.round = None;
        }
        Ok(())
    }

    /// Resolves and records a new job; returns its id and the config warnings.
    pub fn submit(&self, spec: JobSpec) -> Result<(String, Vec<String>)> {
        let plan = JobPlan::resolve(&spec, spec.world_size)?;
        for warning in &plan.warnings {
            tracing::warn!("{warning}");
        }
        let number = self.store.next_job_number()?;
        let job = Job::submitted(number, spec, &plan);
        let id = job.id.clone();
        let mut inner = self.lock();
        self.persist(&job)?;
        self.event(&job, "state", "submitted -> PENDING".into())?;
        self.store.flush()?;
        inner.jobs.insert(number, Entry::new(job, Roster::default()));
        drop(inner);
        self.notify();
        Ok((id, plan.warnings))
    }

    /// The job with this id, or the newest job when `job_id` is empty.
    pub fn status(&self, job_id: &str) -> Result<JobView> {
        let inner = self.lock();
        let entry = if job_id.is_empty() {
            inner.jobs.values().next_back()
        } else {
            job_number(job_id).and_then(|n| inner.jobs.get(&n))
        };
        match entry {
            Some(entry) => Ok(entry.view()),
            None if job_id.is_empty() => Err(CoordinatorError::NotFound(
                "no job has been submitted to this coordinator yet".into(),
            )),
            None => Err(CoordinatorError::NotFound(format!(
                "no job `{job_id}` (ids look like job-1)"
            ))),
        }
    }

    pub fn list(&self) -> Vec<JobView> {
        self.lock().jobs.values().map(Entry::view).collect()
    }

    /// Claims a rank of the active job for a worker.
    pub fn register(&self, request: Registration) -> Result<Assignment> {
        if request.protocol_version != PROTOCOL_VERSION {
            return Err(CoordinatorError::Refused(format!(
                "worker speaks protocol version {}, this coordinator speaks {PROTOCOL_VERSION}; use matching kormlm builds",
                request.protocol_version
            )));
        }
        let mut inner = self.lock();
        let entry = inner
            .active_mut()
            .ok_or_else(|| CoordinatorError::Refused("no job is waiting for workers on this coordinator".into()))?;
        let registered = entry.workers.register(&entry.job, &request)?;
        let worker = &registered.worker;
        self.persist_worker(&entry.job, worker)?;
        self.event(
            &entry.job,
            "worker",
            format!(
                "rank {} registered: pid {} on {} (incarnation {}, torch {}, {} CUDA device(s))",
                worker.rank,
                worker.pid,
                worker.host,
                worker.incarnation,
                request.torch_version,
                request.cuda_device_count
            ),
        )?;
        if entry.workers.all_alive(entry.job.world_size()) {
            let effects = entry.job.start();
            self.apply(entry, effects)?;
        }
        self.store.flush()?;
        let assignment = entry.job.assignment(
            worker.rank,
            worker.local_rank,
            registered.devices.cuda.clone(),
            worker.incarnation,
            self.settings.heartbeat_interval,
        );
        drop(inner);
        self.notify();
        Ok(assignment)
    }

    /// Binds a heartbeat stream to a registered worker; returns the session id and the
    /// receiving end of its orders.
    pub fn attach(&self, job_id: &str, rank: u32, incarnation: u32) -> Result<(u64, mpsc::UnboundedReceiver<Order>)> {
        let mut inner = self.lock();
        let session = inner.next_session;
        inner.next_session += 1;
        let entry = inner.entry_mut(job_id)?;
        let orders = entry.workers.attach(&entry.job, rank, incarnation, session)?;
        Ok((session, orders))
    }

    /// Records one heartbeat report. When it completes an augmentation, the parts are merged
    /// here, outside the state lock, before the job is recorded SUCCEEDED.
    pub async fn report(&self, session: u64, report: Report) -> Result<()> {
        let merge = self.record_report(session, report)?;
        self.notify();
        if let Some((number, merge)) = merge {
            let task = merge.clone();
            let outcome = tokio::task::spawn_blocking(move || task.run())
                .await
                .unwrap_or_else(|e| Err(format!("the merge task failed: {e}")));
            self.record_merge(number, &merge, outcome);
        }
        Ok(())
    }

    fn record_report(&self, session: u64, report: Report) -> Result<Option<(u64, AugmentMerge)>> {
        let mut inner = self.lock();
        let entry = inner.entry_mut(&report.job_id)?;
        let rank = report.rank;
        let worker = entry.workers.report(session, &report)?;
        self.persist_worker(&entry.job, &worker)?;
        if rank == 0 {
            if let Some(observed) = entry.job.observe(report.telemetry) {
                self.persist(&entry.job)?;
                // Progress is durable before anyone can read it back.
                if observed.step_advanced {
                    self.store.flush()?;
                }
                if let Some(c) = observed.new_checkpoint {
                    let message = format!("checkpoint {} at step {} ({})", c.tag, c.global_step, c.path);
                    self.event(&entry.job, "checkpoint", message)?;
                    self.store.flush()?;
                }
            }
        }
        if let Some(reported) = report.failure {
            let message = format!("rank {rank} failed: {}", reported.message);
            self.event(&entry.job, "failure", message.clone())?;
            let failure = Failure {
                kind: reported.kind.unwrap_or(FailureKind::Internal),
                message,
            };
            if job::waits_for_a_peer(reported.kind) {
                // The first such failure is kept: later ones are usually its consequences.
                entry.held.get_or_insert((failure, Instant::now()));
            } else {
                let effects = entry.job.fail(&failure);
                self.apply(entry, effects)?;
            }
        } else if report.finished {
            self.event(&entry.job, "worker", format!("rank {rank} finished"))?;
            if entry.merging.is_none() && entry.workers.all_exited(entry.job.world_size()) {
                match entry.job.settle() {
                    Settled::Done(effects) => self.apply(entry, effects)?,
                    Settled::Merge(merge) => {
                        entry.merging = Some(merge.attempt);
                        return Ok(Some((entry.job.number, merge)));
                    }
                }
            }
        }
        Ok(None)
    }

    fn record_merge(&self, number: u64, merge: &AugmentMerge, outcome: std::result::Result<usize, String>) {
        let mut inner = self.lock();
        let Some(entry) = inner.jobs.get_mut(&number) else {
            return;
        };
        if entry.merging == Some(merge.attempt) {
            entry.merging = None;
        }
        let effects = entry.job.merged(merge, outcome);
        if let Err(e) = self.apply(entry, effects) {
            tracing::error!(error = %e, "cannot record the augmentation's outcome");
        }
        drop(inner);
        self.notify();
    }

    /// Every loss of a worker goes through here: the worker is recorded LOST and, while the job
    /// runs, the attempt fails with PEER_LOST.
    fn mark_lost(&self, entry: &mut Entry, rank: u32, reason: &str) -> Result<()> {
        let Some(loss) = entry.workers.mark_lost(rank, reason, entry.job.state.is_terminal()) else {
            return Ok(());
        };
        self.persist_worker(&entry.job, &loss.worker)?;
        if !loss.fails_the_job {
            return Ok(());
        }
        let message = format!("rank {rank} lost: {reason}");
        self.event(&entry.job, "failure", message.clone())?;
        if matches!(entry.job.state, JobState::Running | JobState::Stopping) {
            let effects = entry.job.fail(&Failure {
                kind: FailureKind::PeerLost,
                message,
            });
            self.apply(entry, effects)?;
        }
        self.store.flush()
    }

    /// A heartbeat stream ended (worker exit, crash or network failure).
    pub fn detach(&self, job_id: &str, rank: u32, session: u64, reason: &str) {
        let mut inner = self.lock();
        let Ok(entry) = inner.entry_mut(job_id) else {
            return;
        };
        if !entry.workers.is_current(rank, session) {
            return;
        }
        if let Err(e) = self.mark_lost(entry, rank, reason) {
            tracing::error!(error = %e, "cannot record a lost worker");
        }
        drop(inner);
        self.notify();
    }

    /// A worker process this coordinator started has exited.
    pub fn process_exited(&self, job_id: &str, attempt: u32, rank: u32, pid: u32, description: &str) {
        let mut inner = self.lock();
        let Ok(entry) = inner.entry_mut(job_id) else {
            return;
        };
        if entry.job.attempt() != attempt {
            // A process of an earlier attempt; the job has moved on.
            return;
        }
        let result = if entry.workers.is_alive_in(rank, pid) {
            self.mark_lost(entry, rank, description)
        } else if entry.job.state == JobState::Pending && !entry.workers.contains(rank) {
            let effects = entry.job.fail(&Failure {
                kind: FailureKind::PeerLost,
                message: format!("rank {rank} exited before registering: {description}"),
            });
            self.apply(entry, effects)
        } else {
            Ok(())
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot record a worker exit");
        }
        drop(inner);
        self.notify();
    }

    /// Fails jobs whose held-back failure found no lost peer in time, and marks workers without
    /// a heartbeat for longer than the timeout as LOST.
    pub fn sweep(&self) {
        let timeout = self.settings.worker_timeout;
        let mut inner = self.lock();
        let mut changed = false;
        for entry in inner.jobs.values_mut() {
            if entry.job.state.is_terminal() {
                continue;
            }
            let expired = entry
                .held
                .as_ref()
                .is_some_and(|(_, at)| at.elapsed() >= PEER_FAILURE_GRACE);
            if let Some((failure, _)) = entry.held.take_if(|_| expired) {
                if matches!(entry.job.state, JobState::Running | JobState::Stopping) {
                    let effects = entry.job.fail(&failure);
                    if let Err(e) = self.apply(entry, effects) {
                        tracing::error!(error = %e, "cannot record a failed job");
                    }
                    changed = true;
                }
            }
            for (rank, silent) in entry.workers.silent(timeout) {
                let reason = format!(
                    "no heartbeat for {} ms (timeout {} ms)",
                    silent.as_millis(),
                    timeout.as_millis()
                );
                if let Err(e) = self.mark_lost(entry, rank, &reason) {
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
    pub fn kill(&self, job_id: &str, force: bool) -> Result<JobView> {
        let mut inner = self.lock();
        let entry = inner.entry_mut(job_id)?;
        if entry.merging.is_some() {
            // Every worker has finished; only the merge is left, and it ends the job shortly.
            return Err(CoordinatorError::Refused(format!(
                "job {} is merging its augmentation parts; it ends in a moment",
                entry.job.id
            )));
        }
        let effects = entry.job.kill(force, entry.workers.live_count())?;
        self.apply(entry, effects)?;
        let view = entry.view();
        drop(inner);
        self.notify();
        Ok(view)
    }

    /// Continues a KILLED or FAILED job from its latest checkpoint, optionally with another
    /// world size.
    pub fn resume(&self, job_id: &str, world_size: u32) -> Result<JobView> {
        let mut inner = self.lock();
        let active = inner.active_mut().map(|e| e.job.id.clone());
        let entry = inner.entry_mut(job_id)?;
        let effects = entry.job.resume(world_size, active.as_deref())?;
        self.apply(entry, effects)?;
        let view = entry.view();
        drop(inner);
        self.notify();
        Ok(view)
    }

    /// Joins the rendezvous of an attempt; resolves when every rank has joined.
    pub async fn rendezvous(&self, arrival: Arrival) -> Result<Group> {
        let done = {
            let mut inner = self.lock();
            let entry = inner.entry_mut(&arrival.job_id)?;
            if !entry.job.state.is_active() {
                return Err(CoordinatorError::Refused(format!(
                    "job {} is not running",
                    arrival.job_id
                )));
            }
            rendezvous::arrive(&mut entry.round, entry.job.world_size() as usize, &arrival)?
        };
        rendezvous::wait(done, self.settings.rendezvous_timeout, arrival.attempt).await
    }

    /// Jobs waiting for workers that this coordinator should start: (job id, attempt, placements).
    pub fn pending_launches(&self) -> Vec<(String, u32, Vec<Placement>)> {
        self.lock()
            .jobs
            .values()
            .filter(|e| e.job.state == JobState::Pending && !e.job.spec.placements.is_empty())
            .map(|e| (e.job.id.clone(), e.job.attempt(), e.job.placements()))
            .collect()
    }

    /// Hosts and pids of a job's workers, for signalling on a forced kill.
    pub fn worker_pids(&self, job_id: &str) -> Vec<(String, u32)> {
        self.lock()
            .entry_mut(job_id)
            .map(|e| e.workers.pids())
            .unwrap_or_default()
    }

    /// The job workers would join now: the oldest that has not ended.
    pub fn active_job_id(&self) -> Option<String> {
        self.lock().active_mut().map(|e| e.job.id.clone())
    }

    /// The state of a job, if it exists.
    pub fn job_state(&self, job_id: &str) -> Option<JobState> {
        self.lock().entry_mut(job_id).ok().map(|e| e.job.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use job::OrderKind;
    use kormlm_proto::v1::TaskKind;
    use workers::{ReportedFailure, WorkerState};

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

    fn register(rank: u32) -> Registration {
        Registration {
            rank,
            local_rank: None,
            host: "h".into(),
            pid: 100 + rank,
            protocol_version: PROTOCOL_VERSION,
            cuda_device_count: 0,
            torch_version: String::new(),
        }
    }

    fn report(id: &str, rank: u32) -> Report {
        Report {
            job_id: id.into(),
            rank,
            incarnation: 1,
            optimizer_state_bytes: 0,
            finished: false,
            failure: None,
            telemetry: Default::default(),
        }
    }

    fn failed(id: &str, rank: u32, kind: FailureKind) -> Report {
        Report {
            failure: Some(ReportedFailure {
                kind: Some(kind),
                message: format!("{kind} on rank {rank}"),
            }),
            ..report(id, rank)
        }
    }

    fn code(error: CoordinatorError) -> (tonic::Code, String) {
        let status = tonic::Status::from(error);
        (status.code(), status.message().to_string())
    }

    #[test]
    fn job_runs_when_all_ranks_register() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let (id, _) = c.submit(spec(2)).unwrap();
        assert_eq!(c.status(&id).unwrap().job.state, JobState::Pending);
        let a = c.register(register(1)).unwrap();
        assert_eq!((a.rank, a.world_size, a.batch.train_batch_size), (1, 2, 8));
        c.register(register(0)).unwrap();
        let status = c.status(&id).unwrap();
        assert_eq!(status.job.state, JobState::Running);
        assert_eq!(status.workers.len(), 2);
    }

    #[test]
    fn duplicate_and_out_of_range_ranks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        c.submit(spec(2)).unwrap();
        c.register(register(0)).unwrap();
        let (code_, message) = code(c.register(register(0)).unwrap_err());
        assert_eq!(code_, tonic::Code::AlreadyExists);
        assert!(message.contains("already held by pid 100"), "{message}");
        let (code_, message) = code(c.register(register(2)).unwrap_err());
        assert_eq!(code_, tonic::Code::InvalidArgument);
        assert!(message.contains("rank 2 is out of range"), "{message}");
    }

    #[test]
    fn bad_config_is_refused_with_the_deepspeed_message() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let mut s = spec(2);
        s.ds_config_json = r#"{"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}"#.into();
        s.ds_config_path = "cfg.json".into();
        let (code_, message) = code(c.submit(s).unwrap_err());
        assert_eq!(code_, tonic::Code::InvalidArgument);
        assert!(message.contains("30 != 4 * 3 * 2"), "{message}");
    }

    #[test]
    fn a_kill_before_the_heartbeats_attach_waits_for_the_workers() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let (id, _) = c.submit(spec(2)).unwrap();
        let a0 = c.register(register(0)).unwrap();
        c.register(register(1)).unwrap();
        c.kill(&id, false).unwrap();
        assert_eq!(c.status(&id).unwrap().job.state, JobState::Stopping);
        let (_, mut orders) = c.attach(&id, 0, a0.incarnation).unwrap();
        assert_eq!(orders.try_recv().unwrap().kind, OrderKind::StopAfterStep);
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
            c.attach(&id, 0, a0.incarnation).unwrap()
        };
        let (session, _rx) = fail_rank_0();
        c.kill(&id, false).unwrap();
        c.detach(&id, 0, session, "stream closed");
        assert_eq!(c.status(&id).unwrap().job.state, JobState::Killed);
        c.resume(&id, 0).unwrap();
        let (session, _rx) = fail_rank_0();
        c.detach(&id, 0, session, "stream closed");
        let status = c.status(&id).unwrap().job;
        assert_eq!(status.state, JobState::Pending, "{}", status.message);
        assert_eq!((status.restarts, status.automatic_restarts), (2, 1));
        let (session, _rx) = fail_rank_0();
        c.detach(&id, 0, session, "stream closed");
        assert_eq!(c.status(&id).unwrap().job.state, JobState::Failed);
    }

    #[test]
    fn a_lost_worker_fails_a_running_job_and_frees_its_rank() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let (id, _) = c.submit(spec(2)).unwrap();
        let a0 = c.register(register(0)).unwrap();
        c.register(register(1)).unwrap();
        let (session, _rx) = c.attach(&id, 0, a0.incarnation).unwrap();
        c.detach(&id, 0, session, "stream closed");
        let status = c.status(&id).unwrap();
        assert_eq!(status.job.state, JobState::Failed);
        assert!(status.job.message.contains("rank 0 lost"), "{}", status.job.message);
        assert_eq!(status.workers[0].state, WorkerState::Lost);
        assert_eq!(status.workers[0].failure_kind, Some(FailureKind::PeerLost));
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
        assert_eq!(status.job.state, JobState::Running);
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
        let request = |rank: u32| Arrival {
            job_id: id.clone(),
            rank,
            attempt: 1,
            nccl_unique_id: if rank == 0 { vec![7; 128] } else { vec![] },
            ring_address: format!("127.0.0.1:{}", 9000 + rank),
        };
        let (a, b) = tokio::join!(c.rendezvous(request(1)), c.rendezvous(request(0)));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a, b);
        assert_eq!(a.nccl_unique_id, vec![7; 128]);
        assert_eq!(a.ring_addresses, vec!["127.0.0.1:9000", "127.0.0.1:9001"]);
    }

    /// Submits a two-rank job with restarts to spare, registers and attaches both ranks.
    fn running_pair(c: &Coordinator) -> (String, Vec<(u64, mpsc::UnboundedReceiver<Order>)>) {
        let (id, _) = c
            .submit(JobSpec {
                max_restarts: 3,
                ..spec(2)
            })
            .unwrap();
        let sessions = (0..2)
            .map(|rank| {
                let a = c.register(register(rank)).unwrap();
                c.attach(&id, rank, a.incarnation).unwrap()
            })
            .collect();
        (id, sessions)
    }

    #[tokio::test]
    async fn bad_input_fails_the_job_at_once_even_with_restarts_left() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let (id, mut sessions) = running_pair(&c);
        c.report(sessions[1].0, failed(&id, 1, FailureKind::BadInput))
            .await
            .unwrap();
        let status = c.status(&id).unwrap();
        assert_eq!(status.job.state, JobState::Failed, "{}", status.job.message);
        assert_eq!(status.job.automatic_restarts, 0);
        assert!(status.job.message.contains("not restarted"), "{}", status.job.message);
        assert_eq!(status.workers[1].failure_kind, Some(FailureKind::BadInput));
        assert_eq!(sessions[0].1.try_recv().unwrap().kind, OrderKind::Abort);
    }

    #[tokio::test]
    async fn a_retryable_failure_restarts_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let (id, sessions) = running_pair(&c);
        c.report(sessions[0].0, failed(&id, 0, FailureKind::OutOfMemory))
            .await
            .unwrap();
        let status = c.status(&id).unwrap();
        assert_eq!(status.job.state, JobState::Pending, "{}", status.job.message);
        assert_eq!((status.job.restarts, status.job.automatic_restarts), (1, 1));
        assert!(status.workers.is_empty(), "a new attempt gets new workers");
    }

    #[tokio::test]
    async fn a_peer_failure_waits_so_the_lost_rank_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let (id, sessions) = running_pair(&c);
        c.report(sessions[0].0, failed(&id, 0, FailureKind::PeerLost))
            .await
            .unwrap();
        assert_eq!(c.status(&id).unwrap().job.state, JobState::Running, "held back");
        c.detach(&id, 1, sessions[1].0, "heartbeat stream closed");
        let status = c.status(&id).unwrap().job;
        assert_eq!(status.state, JobState::Pending);
        assert!(status.message.starts_with("rank 1 lost"), "{}", status.message);
    }

    #[tokio::test]
    async fn an_augmentation_succeeds_once_its_parts_are_merged() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("out.csv");
        let parts = kormlm_proto::augment_parts::parts_dir(&output);
        std::fs::create_dir_all(&parts).unwrap();
        kormlm_proto::augment_parts::PartsManifest {
            input_sha256: String::new(),
            model_sha256: String::new(),
            seed: 0,
            max_seq_len: 0,
            options: serde_json::Value::Null,
            format: "csv".into(),
            chunk_rows: 1,
            parts: 2,
        }
        .write(&parts)
        .unwrap();
        std::fs::write(kormlm_proto::augment_parts::part_path(&parts, 0, "csv"), "text\na\n").unwrap();
        std::fs::write(kormlm_proto::augment_parts::part_path(&parts, 1, "csv"), "text\nb\n").unwrap();
        let c = coordinator(&dir.path().join("state"));
        let mut augment = spec(1);
        augment.task = TaskKind::Augment as i32;
        augment
            .args
            .insert("augment.output".into(), output.display().to_string());
        let (id, _) = c.submit(augment).unwrap();
        let a = c.register(register(0)).unwrap();
        let (session, _rx) = c.attach(&id, 0, a.incarnation).unwrap();
        let finished = Report {
            finished: true,
            ..report(&id, 0)
        };
        c.report(session, finished).await.unwrap();
        let status = c.status(&id).unwrap().job;
        assert_eq!(status.state, JobState::Succeeded, "{}", status.message);
        assert_eq!(std::fs::read_to_string(&output).unwrap(), "text\na\nb\n");
        assert!(status.message.contains("2 part(s) merged"), "{}", status.message);
    }
}
