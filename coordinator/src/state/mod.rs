//! The coordinator's state: every job with its workers and rendezvous, in memory and in sled.
//! The parts decide — [`job`] a job's life cycle, [`workers`] who holds which rank,
//! [`rendezvous`] forming the group — and this module holds the lock and carries out what they
//! return: a transition runs on a copy of the job, the copy is written (and flushed) to sled,
//! and only then does it replace the job in memory, reach the workers and the watchers.

pub mod job;
pub mod rendezvous;
pub mod workers;

use crate::error::{CoordinatorError, Result};
use crate::launch_plan::Placement;
use crate::run_dir;
use crate::store::{job_number, Store};
use job::{Assignment, AugmentMerge, Effects, Failure, Job, JobState, LostRank, Order, Settled};
use kormlm_proto::failure::FailureKind;
use kormlm_proto::job_plan::JobPlan;
use kormlm_proto::v1::{EventRecord, JobRecord, JobSpec, WorkerInfo};
use kormlm_proto::{now_ms, PROTOCOL_VERSION};
use rendezvous::{Arrival, Group, Round};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
pub use workers::JobView;
use workers::{Claim, Registration, Report, Roster, Worker, WorkerState};

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
    /// Over TLS: the CA file the workers this coordinator starts verify it with (KORMLM_TLS_CA).
    pub worker_tls_ca: Option<std::path::PathBuf>,
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
            worker_tls_ca: None,
            rendezvous_timeout: Duration::from_secs(300),
        }
    }
}

/// Extra time a restarted coordinator gives the workers it finds in its records.
const RECONNECT_GRACE: Duration = Duration::from_secs(10);

/// How long a failure that usually follows a peer's loss waits for that loss to be seen, so
/// the rank that caused it is the one named.
const PEER_FAILURE_GRACE: Duration = Duration::from_secs(2);

/// One job, with what this process knows about it beyond its records.
struct Entry {
    job: Job,
    workers: Roster,
    round: Option<Round>,
    /// A reported failure waiting briefly for a peer's loss (see [`job::waits_for_a_peer`]).
    held: Option<(Failure, Instant)>,
    /// The attempt whose augmentation parts are being merged.
    merging: Option<u32>,
    /// The last checkpoint reference of another run that rank 0 reported (recorded once).
    refused: Option<String>,
    /// Rank failures this process took for the job (reported, or a rank lost), by kind; kept
    /// across attempts, for the metrics.
    failures: HashMap<FailureKind, u64>,
}

impl Entry {
    fn new(job: Job, workers: Roster) -> Self {
        Self {
            job,
            workers,
            round: None,
            held: None,
            merging: None,
            refused: None,
            failures: HashMap::new(),
        }
    }

    fn count_failure(&mut self, kind: FailureKind) {
        *self.failures.entry(kind).or_default() += 1;
    }

    /// Every rank of the attempt is done: a running job's ranks have all finished, a stopping
    /// job's have all ended (finished, failed or lost).
    fn settles(&self) -> bool {
        let world = self.job.world_size();
        self.merging.is_none()
            && match self.job.state {
                JobState::Running => self.workers.all_exited(world),
                JobState::Stopping => self.workers.all_ended(world),
                _ => false,
            }
    }

    fn view(&self) -> JobView {
        JobView {
            job: self.job.clone(),
            workers: self.workers.workers(),
        }
    }
}

/// A job with what only this process counts about it, for the metrics.
#[derive(Debug, Clone)]
pub struct JobMetrics {
    pub view: JobView,
    /// Rank failures taken since this coordinator process started (reported by a worker, or a
    /// rank lost), by kind.
    pub failures: HashMap<FailureKind, u64>,
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
    /// This state directory's id: the first part of every run id.
    state_id: String,
    changed: watch::Sender<u64>,
    /// The worker processes this coordinator started: the only ones it ever signals.
    own_processes: crate::own_processes::OwnProcesses,
}

impl Coordinator {
    /// Loads every job and worker record from the store. A job whose records cannot be read is
    /// kept as a FAILED entry naming the record and the error; the others are served.
    pub fn load(store: Store, settings: Settings) -> Result<Arc<Self>> {
        let state_id = store.state_id()?;
        let mut jobs = BTreeMap::new();
        // Workers of a previous coordinator get extra time to notice the restart and register
        // again (they back off up to 2 s between attempts) before the timeout applies.
        let seen = Instant::now() + RECONNECT_GRACE;
        for (number, record) in store.jobs()? {
            let loaded = record
                .and_then(|record| crate::wire::job_from_record(number, record, &state_id))
                .and_then(|job| Ok((job, store.workers(number)?)));
            let entry = match loaded {
                Ok((job, workers)) => {
                    let workers = workers.into_iter().map(Worker::from).collect();
                    Entry::new(job, Roster::loaded(workers, seen))
                }
                Err(e) => {
                    tracing::error!(job = number, error = %e, "a job's records cannot be read; it is listed as FAILED");
                    Entry::new(Job::unreadable(number, e.to_string()), Roster::default())
                }
            };
            jobs.insert(number, entry);
        }
        let (changed, _) = watch::channel(0);
        Ok(Arc::new(Self {
            inner: Mutex::new(Inner { jobs, next_session: 1 }),
            store,
            settings,
            state_id,
            changed,
            own_processes: Default::default(),
        }))
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The worker processes this coordinator started.
    pub fn own_processes(&self) -> &crate::own_processes::OwnProcesses {
        &self.own_processes
    }

    /// This state directory's id (`STATE_ID` in every run id `STATE_ID/job-N`).
    pub fn state_id(&self) -> &str {
        &self.state_id
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
        if let Some(error) = &job.record_error {
            // The damaged record stays as it is, for whoever looks into it.
            return Err(CoordinatorError::Refused(format!(
                "job {} is not writable: {error}",
                job.id
            )));
        }
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

    /// Runs a transition on a copy of the entry's job and carries out what it returned.
    fn transition(&self, entry: &mut Entry, step: impl FnOnce(&mut Job) -> Result<Effects>) -> Result<()> {
        let mut next = entry.job.clone();
        let effects = step(&mut next)?;
        self.apply(entry, next, effects)
    }

    /// Carries out a transition: the new job and its events durable (fsync) first, then the
    /// job replaced in memory, the orders sent, the old attempt's workers and rendezvous
    /// forgotten. Nothing changes in memory when writing fails.
    fn apply(&self, entry: &mut Entry, next: Job, effects: Effects) -> Result<()> {
        let changed = next != entry.job;
        if changed {
            self.persist(&next)?;
        }
        if let Some(change) = &effects.change {
            self.event(&next, "state", change.describe())?;
        }
        for (kind, message) in &effects.events {
            self.event(&next, kind, message.clone())?;
        }
        if effects.restarted {
            self.store.clear_workers(next.number)?;
        }
        if changed || effects.restarted || !effects.events.is_empty() {
            self.store.flush()?;
        }
        entry.job = next;
        if let Some(order) = &effects.order {
            entry.workers.send(order);
        }
        if effects.restarted {
            entry.workers.clear();
            entry.round = None;
            entry.held = None;
            entry.merging = None;
            entry.refused = None;
        }
        if effects.change.is_some_and(|c| c.to.is_terminal()) {
            // Ends the rendezvous: ranks still waiting in it are woken with an error.
            entry.round = None;
        }
        Ok(())
    }

    /// Resolves and records a new job; returns its id and the config warnings. Refused when its
    /// output directory holds another run, unless the spec says `--overwrite_output_dir`.
    pub fn submit(&self, spec: JobSpec) -> Result<(String, Vec<String>)> {
        let plan = JobPlan::resolve(&spec, spec.world_size)?;
        let overwrite = plan.train.overwrite_output_dir;
        let own_job = |id: &str| self.what_became_of(id);
        if let Some(dir) = &plan.train.output_dir {
            run_dir::check_new(std::path::Path::new(dir), &self.state_id, overwrite, &own_job)?;
        }
        for warning in &plan.warnings {
            tracing::warn!("{warning}");
        }
        let number = self.store.next_job_number()?;
        let job = Job::submitted(number, spec, &plan, &self.state_id);
        if plan.train.output_dir.is_none() {
            run_dir::check_new(
                std::path::Path::new(&job.output_dir),
                &self.state_id,
                overwrite,
                &own_job,
            )?;
        }
        let id = job.id.clone();
        let mut inner = self.lock();
        self.persist(&job)?;
        self.event(
            &job,
            "state",
            format!("submitted -> PENDING (run {}, output {})", job.run_id, job.output_dir),
        )?;
        self.store.flush()?;
        inner.jobs.insert(number, Entry::new(job, Roster::default()));
        drop(inner);
        self.notify();
        Ok((id, plan.warnings))
    }

    /// What became of job `job_id`, for a message about the output directory it holds.
    fn what_became_of(&self, job_id: &str) -> String {
        let inner = self.lock();
        match job_number(job_id).and_then(|n| inner.jobs.get(&n)).map(|e| e.job.state) {
            Some(state @ (JobState::Killed | JobState::Failed)) => format!(
                "it is {}: continue it with `coordinator resume --job {job_id}`, or this command with --resume",
                state.name()
            ),
            Some(state) => format!("it is {}", state.name()),
            None => "no such job is recorded any more".into(),
        }
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

    /// Every job as the metrics show it, copied under the lock (the caller renders it after).
    pub fn metrics_snapshot(&self) -> Vec<JobMetrics> {
        self.lock()
            .jobs
            .values()
            .map(|entry| JobMetrics {
                view: entry.view(),
                failures: entry.failures.clone(),
            })
            .collect()
    }

    /// Claims a rank of the active job for a worker. A worker that says it holds work of an
    /// earlier attempt gets the current one (it drops the old work first); a new process for a
    /// rank of a running attempt whose workers have not come back after a coordinator restart
    /// starts a new attempt.
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
        match entry.workers.claim(&entry.job, &request) {
            Claim::Take => {}
            Claim::Stale(why) => return Err(CoordinatorError::Refused(why)),
            Claim::ReplacesAttempt(why) => self.transition(entry, |job| Ok(job.replace_attempt(&why)))?,
        }
        let registered = entry.workers.register(&entry.job, &request)?;
        let worker = registered.worker.clone();
        self.persist_worker(&entry.job, &worker)?;
        let held = match &request.holds {
            Some((job_id, attempt)) if *job_id != entry.job.id || *attempt != entry.job.attempt() => {
                format!("; it held work of {job_id} attempt {attempt}, which it drops")
            }
            Some(_) => "; it keeps the work it holds".to_string(),
            None => String::new(),
        };
        self.event(
            &entry.job,
            "worker",
            format!(
                "rank {} registered for attempt {}: pid {} on {} (incarnation {}, torch {}, {} CUDA device(s)){held}",
                worker.rank,
                entry.job.attempt(),
                worker.pid,
                worker.host,
                worker.incarnation,
                request.torch_version,
                request.cuda_device_count
            ),
        )?;
        self.store.flush()?;
        entry.workers.admit(worker.clone());
        if entry.workers.all_alive(entry.job.world_size()) {
            self.transition(entry, |job| Ok(job.start()))?;
        }
        let assignment = entry.job.assignment(
            worker.rank,
            worker.local_rank,
            &registered.devices,
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
        if report.attempt != entry.job.attempt() {
            // Work of an attempt that is over (a worker that was frozen or partitioned): it must
            // not move the current attempt, nor count as a sign of life of its rank.
            tracing::warn!(
                job_id = %entry.job.id,
                rank = report.rank,
                attempt = report.attempt,
                current = entry.job.attempt(),
                "report of another attempt ignored"
            );
            return Ok(None);
        }
        let rank = report.rank;
        let worker = entry.workers.report(session, &report)?;
        let ended = worker.state != WorkerState::Alive;
        self.persist_worker(&entry.job, &worker)?;
        if ended {
            self.store.flush()?;
        }
        entry.workers.record(worker);
        if rank == 0 {
            self.observe(entry, report.telemetry)?;
        }
        if let Some(reported) = report.failure {
            let kind = reported.kind.unwrap_or(FailureKind::Internal);
            let message = match kind {
                FailureKind::Preempted => format!("rank {rank}: {}", reported.message),
                _ => format!("rank {rank} failed: {}", reported.message),
            };
            self.event(&entry.job, "failure", message.clone())?;
            entry.count_failure(kind);
            let failure = Failure {
                kind,
                message,
                lost: None,
            };
            if job::waits_for_a_peer(reported.kind) {
                // The first such failure is kept: later ones are usually its consequences.
                entry.held.get_or_insert((failure, Instant::now()));
            } else {
                self.transition(entry, |job| Ok(job.fail(&failure)))?;
            }
        } else if report.finished {
            self.event(&entry.job, "worker", format!("rank {rank} finished"))?;
        }
        if entry.settles() {
            let mut next = entry.job.clone();
            match next.settle() {
                Settled::Done(effects) => self.apply(entry, next, effects)?,
                Settled::Merge(merge) => {
                    entry.merging = Some(merge.attempt);
                    return Ok(Some((entry.job.number, merge)));
                }
            }
        }
        Ok(None)
    }

    /// Takes rank 0's telemetry: progress durable before anyone can read it back, a new
    /// checkpoint recorded with an event, another run's checkpoint refused (said once).
    fn observe(&self, entry: &mut Entry, telemetry: job::Telemetry) -> Result<()> {
        let mut next = entry.job.clone();
        let Some(observed) = next.observe(telemetry) else {
            return Ok(());
        };
        if next != entry.job {
            self.persist(&next)?;
        }
        if let Some(c) = &observed.new_checkpoint {
            let message = format!("checkpoint {} at step {} ({})", c.tag, c.global_step, c.path);
            self.event(&next, "checkpoint", message)?;
        }
        if observed.step_advanced || observed.new_checkpoint.is_some() {
            self.store.flush()?;
        }
        entry.job = next;
        if let Some((path, why)) = observed.refused {
            if entry.refused.as_ref() != Some(&path) {
                tracing::warn!(job_id = %entry.job.id, "{why}");
                self.event(&entry.job, "checkpoint", why)?;
                entry.refused = Some(path);
            }
        }
        Ok(())
    }

    fn record_merge(&self, number: u64, merge: &AugmentMerge, outcome: std::result::Result<usize, String>) {
        let mut inner = self.lock();
        let Some(entry) = inner.jobs.get_mut(&number) else {
            return;
        };
        if entry.merging == Some(merge.attempt) {
            entry.merging = None;
        }
        if let Err(e) = self.transition(entry, |job| Ok(job.merged(merge, outcome))) {
            tracing::error!(error = %e, "cannot record the augmentation's outcome");
        }
        drop(inner);
        self.notify();
    }

    /// Every loss of a worker goes through here: the worker is recorded LOST and, while the job
    /// runs or stops, the attempt fails with PEER_LOST (naming the ranks that survive, for an
    /// elastic continuation).
    fn mark_lost(&self, entry: &mut Entry, rank: u32, reason: &str) -> Result<()> {
        let Some(loss) = entry.workers.mark_lost(rank, reason, entry.job.state.is_terminal()) else {
            return Ok(());
        };
        self.persist_worker(&entry.job, &loss.worker)?;
        self.store.flush()?;
        entry.workers.record(loss.worker);
        entry.workers.forget_session(rank);
        if !loss.fails_the_job {
            return Ok(());
        }
        let message = format!("rank {rank} lost: {reason}");
        self.event(&entry.job, "failure", message.clone())?;
        entry.count_failure(FailureKind::PeerLost);
        if matches!(entry.job.state, JobState::Running | JobState::Stopping) {
            let failure = Failure {
                kind: FailureKind::PeerLost,
                message,
                lost: Some(LostRank {
                    rank,
                    survivors: entry.workers.survivors(entry.job.world_size()),
                }),
            };
            self.transition(entry, |job| Ok(job.fail(&failure)))?;
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
            entry.count_failure(FailureKind::PeerLost);
            let failure = Failure {
                kind: FailureKind::PeerLost,
                message: format!("rank {rank} exited before registering: {description}"),
                lost: None,
            };
            self.transition(entry, |job| Ok(job.fail(&failure)))
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
                if let Err(e) = self.transition(entry, |job| Ok(job.fail(&failure))) {
                    tracing::error!(error = %e, "cannot record a failed job");
                }
                changed = true;
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

    /// Stops a job because of `why` (e.g. "kill requested"): gracefully (workers finish the
    /// step, checkpoint and exit) or at once.
    pub fn kill(&self, job_id: &str, force: bool, why: &str) -> Result<JobView> {
        let mut inner = self.lock();
        let entry = inner.entry_mut(job_id)?;
        if entry.merging.is_some() {
            // Every worker has finished; only the merge is left, and it ends the job shortly.
            return Err(CoordinatorError::Refused(format!(
                "job {} is merging its augmentation parts; it ends in a moment",
                entry.job.id
            )));
        }
        let alive = entry.workers.alive_count();
        self.transition(entry, |job| job.kill(force, alive, why))?;
        let view = entry.view();
        drop(inner);
        self.notify();
        Ok(view)
    }

    /// Continues a KILLED or FAILED job from its latest checkpoint, optionally with another
    /// world size; refused when another run has taken its output directory since.
    pub fn resume(&self, job_id: &str, world_size: u32) -> Result<JobView> {
        let (id, run_id, output_dir) = {
            let mut inner = self.lock();
            let job = &inner.entry_mut(job_id)?.job;
            (job.id.clone(), job.run_id.clone(), job.output_dir.clone())
        };
        if !output_dir.is_empty() {
            run_dir::check_own(std::path::Path::new(&output_dir), &id, &run_id)?;
        }
        let mut inner = self.lock();
        let active = inner.active_mut().map(|e| e.job.id.clone());
        let entry = inner.entry_mut(job_id)?;
        self.transition(entry, |job| job.resume(world_size, active.as_deref()))?;
        let view = entry.view();
        drop(inner);
        self.notify();
        Ok(view)
    }

    /// Joins the rendezvous of an attempt; resolves when every rank has joined. Only ranks
    /// registered (with this coordinator process) for the job's current attempt take part, so a
    /// worker of an attempt that is over cannot join or complete the current group.
    pub async fn rendezvous(&self, arrival: Arrival) -> Result<Group> {
        let done = {
            let mut inner = self.lock();
            let entry = inner.entry_mut(&arrival.job_id)?;
            let job = &entry.job;
            if !job.state.is_active() {
                return Err(CoordinatorError::Refused(format!(
                    "job {} is not running",
                    arrival.job_id
                )));
            }
            if arrival.attempt != job.attempt() {
                return Err(CoordinatorError::Refused(format!(
                    "rendezvous attempt {} of job {} is over; the job runs attempt {}",
                    arrival.attempt,
                    job.id,
                    job.attempt()
                )));
            }
            if !entry.workers.is_live(arrival.rank) {
                return Err(CoordinatorError::Refused(format!(
                    "rank {} is not registered for attempt {} of job {}; register first",
                    arrival.rank,
                    job.attempt(),
                    job.id
                )));
            }
            rendezvous::arrive(&mut entry.round, job.world_size() as usize, &arrival)?
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

    /// After `kill --force`: records and logs every worker of the ended job still alive (still
    /// heart-beating) `waited` after it was told to terminate. The coordinator never signals a
    /// process it did not start, so such a worker must be stopped by whoever started it.
    pub fn report_lingering(&self, job_id: &str, waited: Duration) -> Vec<Worker> {
        let mut inner = self.lock();
        let Ok(entry) = inner.entry_mut(job_id) else {
            return Vec::new();
        };
        let lingering: Vec<Worker> = entry
            .workers
            .workers()
            .into_iter()
            .filter(|w| w.state == WorkerState::Alive)
            .map(|mut w| {
                w.reason = format!(
                    "still running {} s after kill --force told it to terminate; the coordinator signals only workers it started itself: stop pid {} on {} where it was started",
                    waited.as_secs(),
                    w.pid,
                    w.host
                );
                w
            })
            .collect();
        for worker in &lingering {
            tracing::warn!(job_id, rank = worker.rank, "{}", worker.reason);
            let recorded = self
                .persist_worker(&entry.job, worker)
                .and_then(|()| self.event(&entry.job, "worker", format!("rank {}: {}", worker.rank, worker.reason)));
            if let Err(e) = recorded {
                tracing::error!(error = %e, "cannot record a worker that did not terminate");
            }
            entry.workers.record(worker.clone());
        }
        drop(inner);
        if !lingering.is_empty() {
            self.notify();
        }
        lingering
    }

    /// The job workers would join now: the oldest that has not ended.
    pub fn active_job_id(&self) -> Option<String> {
        self.lock().active_mut().map(|e| e.job.id.clone())
    }

    /// Every job that has not ended.
    pub fn active_job_ids(&self) -> Vec<String> {
        self.lock()
            .jobs
            .values()
            .filter(|e| e.job.state.is_active())
            .map(|e| e.job.id.clone())
            .collect()
    }

    /// The newest KILLED or FAILED job that writes where a job of this command line would
    /// (`dir_for(job id)`), with its state and message: the job a rerun of the same command
    /// would continue.
    pub fn resumable_for(&self, dir_for: impl Fn(&str) -> String) -> Option<(String, JobState, String)> {
        self.lock()
            .jobs
            .values()
            .rev()
            .filter(|e| matches!(e.job.state, JobState::Killed | JobState::Failed) && e.job.record_error.is_none())
            .find(|e| run_dir::same_dir(&e.job.output_dir, &dir_for(&e.job.id)))
            .map(|e| (e.job.id.clone(), e.job.state, e.job.message.clone()))
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
    use workers::ReportedFailure;

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
            holds: None,
        }
    }

    fn report(id: &str, rank: u32) -> Report {
        Report {
            job_id: id.into(),
            rank,
            incarnation: 1,
            attempt: 1,
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
        c.kill(&id, false, "kill requested").unwrap();
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
        c.kill(&id, false, "kill requested").unwrap();
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
    async fn a_forced_kill_orders_every_worker_to_terminate_and_reports_those_still_there() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let (id, mut sessions) = running_pair(&c);
        c.kill(&id, true, "kill requested").unwrap();
        for (_, orders) in &mut sessions {
            assert_eq!(orders.try_recv().unwrap().kind, OrderKind::Terminate);
        }
        // Rank 0 obeys (its last report says it finished); rank 1 keeps heart-beating.
        c.report(
            sessions[0].0,
            Report {
                finished: true,
                ..report(&id, 0)
            },
        )
        .await
        .unwrap();
        c.report(sessions[1].0, report(&id, 1)).await.unwrap();
        let lingering = c.report_lingering(&id, Duration::from_secs(10));
        assert_eq!(lingering.iter().map(|w| w.rank).collect::<Vec<_>>(), vec![1]);
        let status = c.status(&id).unwrap();
        let rank1 = &status.workers[1];
        assert_eq!(
            rank1.reason,
            "still running 10 s after kill --force told it to terminate; the coordinator signals only workers it started itself: stop pid 101 on h where it was started"
        );
        assert!(events(&c, &id)
            .iter()
            .any(|e| e.starts_with("worker: rank 1: still running 10 s")));
        assert_eq!(status.workers[0].state, WorkerState::Exited);
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
    async fn the_metrics_count_failures_by_kind_across_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let (id, sessions) = running_pair(&c);
        c.report(sessions[0].0, failed(&id, 0, FailureKind::OutOfMemory))
            .await
            .unwrap();
        let sessions: Vec<_> = (0..2)
            .map(|rank| {
                let a = c.register(register(rank)).unwrap();
                assert_eq!(a.attempt, 2);
                c.attach(&id, rank, a.incarnation).unwrap()
            })
            .collect();
        c.detach(&id, 1, sessions[1].0, "heartbeat stream closed");
        let jobs = c.metrics_snapshot();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].view.job.automatic_restarts, 2);
        assert_eq!(jobs[0].failures.get(&FailureKind::OutOfMemory), Some(&1));
        assert_eq!(jobs[0].failures.get(&FailureKind::PeerLost), Some(&1));
        let text = crate::metrics::render(crate::metrics::Snapshot { jobs, now_ms: now_ms() }).unwrap();
        for line in [
            "kormlm_jobs{state=\"PENDING\"} 1",
            "kormlm_job_state{job=\"job-1\",state=\"PENDING\"} 1",
            "kormlm_job_automatic_restarts_total{job=\"job-1\"} 2",
            "kormlm_job_failures_total{job=\"job-1\",kind=\"OUT_OF_MEMORY\"} 1",
            "kormlm_job_failures_total{job=\"job-1\",kind=\"PEER_LOST\"} 1",
            "kormlm_job_failures_total{job=\"job-1\",kind=\"BAD_INPUT\"} 0",
            "# TYPE kormlm_job_failures_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // Nothing reported yet: no loss series, and a new attempt has no workers.
        assert!(!text.contains("kormlm_job_train_loss"), "{text}");
        assert!(!text.contains("kormlm_worker_"), "{text}");
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
    async fn a_held_failure_of_a_forming_job_fails_it_once_no_peer_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let (id, _) = c.submit(spec(2)).unwrap();
        let a0 = c.register(register(0)).unwrap();
        let (session, _orders) = c.attach(&id, 0, a0.incarnation).unwrap();
        c.report(session, failed(&id, 0, FailureKind::CollectiveTimeout))
            .await
            .unwrap();
        assert_eq!(c.status(&id).unwrap().job.state, JobState::Pending, "held back");
        std::thread::sleep(PEER_FAILURE_GRACE + Duration::from_millis(100));
        c.sweep();
        let status = c.status(&id).unwrap().job;
        assert_eq!(status.state, JobState::Failed, "{}", status.message);
        let reported = format!("{} on rank 0", FailureKind::CollectiveTimeout);
        assert!(status.message.contains(&reported), "{}", status.message);
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

    fn events(c: &Coordinator, id: &str) -> Vec<String> {
        c.store
            .events(job_number(id).unwrap())
            .unwrap()
            .into_iter()
            .map(|e| format!("{}: {}", e.kind, e.message))
            .collect()
    }

    #[test]
    fn a_damaged_record_makes_its_job_an_error_entry_and_the_others_are_served() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = coordinator(dir.path());
            for world in [1, 1, 2] {
                c.submit(spec(world)).unwrap();
            }
            c.register(register(0)).unwrap();
            c.kill("job-1", true, "kill requested").unwrap();
            c.store
                .put_raw("job/000000000001", &[crate::store::RECORD_VERSION, 0xff, 0xff])
                .unwrap();
            c.store.put_raw("worker/000000000002/00000000", &[7]).unwrap();
            c.store.flush().unwrap();
        }
        let c = coordinator(dir.path());
        let jobs = c.list();
        assert_eq!(jobs.len(), 3);
        let damaged = &jobs[0].job;
        assert_eq!((damaged.id.as_str(), damaged.state), ("job-1", JobState::Failed));
        assert!(
            damaged
                .message
                .contains("state record `job/000000000001` cannot be read: invalid record body"),
            "{}",
            damaged.message
        );
        let worker_damaged = &jobs[1].job;
        assert_eq!(worker_damaged.state, JobState::Failed);
        assert!(
            worker_damaged
                .message
                .contains("`worker/000000000002/00000000` cannot be read: record version 7"),
            "{}",
            worker_damaged.message
        );
        assert!(c
            .resume("job-1", 0)
            .unwrap_err()
            .to_string()
            .contains("cannot be resumed"));
        // job-3 is served: workers register with it and it runs.
        c.register(register(0)).unwrap();
        c.register(register(1)).unwrap();
        assert_eq!(c.status("job-3").unwrap().job.state, JobState::Running);
        // The damaged bytes are left as they were.
        let again = c.store.jobs().unwrap();
        assert!(again[0].1.is_err());
    }

    #[test]
    fn a_failed_write_changes_nothing_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let (id, _) = c.submit(spec(2)).unwrap();
        c.register(register(0)).unwrap();
        c.register(register(1)).unwrap();
        let before = c.status(&id).unwrap();
        c.store.fail_writes(true);
        let err = c.kill(&id, false, "kill requested").unwrap_err().to_string();
        assert!(err.contains("No space left on device"), "{err}");
        assert_eq!(
            c.status(&id).unwrap(),
            before,
            "the kill is not applied unless it is durable"
        );
        c.store.fail_writes(false);
        c.kill(&id, false, "kill requested").unwrap();
        assert_eq!(c.status(&id).unwrap().job.state, JobState::Stopping);
    }

    #[tokio::test]
    async fn reports_of_another_attempt_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let (id, sessions) = running_pair(&c);
        let stale = Report {
            attempt: 7,
            telemetry: job::Telemetry {
                progress: Some(kormlm_proto::v1::Progress {
                    global_step: 99,
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..failed(&id, 0, FailureKind::Io)
        };
        c.report(sessions[0].0, stale).await.unwrap();
        let status = c.status(&id).unwrap();
        assert_eq!(
            (status.job.state, status.job.progress.global_step),
            (JobState::Running, 0)
        );
        assert_eq!(status.workers[0].state, workers::WorkerState::Alive);
    }

    #[tokio::test]
    async fn rendezvous_takes_only_registered_ranks_of_the_current_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let (id, _) = c.submit(spec(2)).unwrap();
        c.register(register(0)).unwrap();
        let arrival = |rank: u32, attempt: u32| Arrival {
            job_id: id.clone(),
            rank,
            attempt,
            nccl_unique_id: vec![],
            ring_address: format!("127.0.0.1:{}", 9000 + rank),
        };
        let err = c.rendezvous(arrival(1, 1)).await.unwrap_err().to_string();
        assert_eq!(
            err,
            "rank 1 is not registered for attempt 1 of job job-1; register first"
        );
        let err = c.rendezvous(arrival(0, 2)).await.unwrap_err().to_string();
        assert_eq!(err, "rendezvous attempt 2 of job job-1 is over; the job runs attempt 1");
    }

    #[tokio::test]
    async fn killing_a_partly_registered_job_ends_it_and_wakes_the_rendezvous() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let (id, _) = c.submit(spec(2)).unwrap();
        let a0 = c.register(register(0)).unwrap();
        let (_, mut orders) = c.attach(&id, 0, a0.incarnation).unwrap();
        let waiting = {
            let c = c.clone();
            let id = id.clone();
            tokio::spawn(async move {
                c.rendezvous(Arrival {
                    job_id: id,
                    rank: 0,
                    attempt: 1,
                    nccl_unique_id: vec![],
                    ring_address: "127.0.0.1:9000".into(),
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        c.kill(&id, false, "kill requested").unwrap();
        let err = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, CoordinatorError::Aborted(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(c.status(&id).unwrap().job.state, JobState::Killed);
        assert_eq!(orders.try_recv().unwrap().kind, OrderKind::Shutdown);
    }

    #[test]
    fn a_stopping_job_takes_its_workers_back_after_a_coordinator_restart() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let c = coordinator(dir.path());
            let (id, _) = c.submit(spec(2)).unwrap();
            c.register(register(0)).unwrap();
            c.register(register(1)).unwrap();
            c.kill(&id, false, "kill requested").unwrap();
            id
        };
        let c = coordinator(dir.path());
        assert_eq!(c.status(&id).unwrap().job.state, JobState::Stopping);
        let stranger = Registration {
            pid: 4242,
            ..register(1)
        };
        let err = c.register(stranger).unwrap_err().to_string();
        assert!(err.contains("is stopping; it takes no new workers"), "{err}");
        for rank in 0..2 {
            let a = c.register(register(rank)).unwrap();
            assert_eq!(a.incarnation, 2);
            let (_, mut orders) = c.attach(&id, rank, a.incarnation).unwrap();
            assert_eq!(orders.try_recv().unwrap().kind, OrderKind::StopAfterStep);
        }
    }

    #[test]
    fn new_processes_for_a_running_attempt_whose_workers_are_gone_start_a_new_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let c = coordinator(dir.path());
            let (id, _) = c.submit(spec(2)).unwrap();
            c.register(register(0)).unwrap();
            c.register(register(1)).unwrap();
            id
        };
        let c = coordinator(dir.path());
        let new_process = |rank: u32| Registration {
            pid: 5000 + rank,
            ..register(rank)
        };
        let a = c.register(new_process(0)).unwrap();
        assert_eq!((a.attempt, a.incarnation), (2, 1));
        let status = c.status(&id).unwrap().job;
        assert_eq!(
            (status.state, status.restarts, status.automatic_restarts),
            (JobState::Pending, 1, 0)
        );
        assert!(
            status.message.contains("rank 0 registered as pid 5000"),
            "{}",
            status.message
        );
        c.register(new_process(1)).unwrap();
        assert_eq!(c.status(&id).unwrap().job.state, JobState::Running);
        // A holder of attempt 1's work is refused now that attempt 2 runs with live holders.
        let late = Registration {
            holds: Some((id.clone(), 1)),
            ..register(1)
        };
        assert!(matches!(c.register(late), Err(CoordinatorError::RankHeld(_))));
    }

    #[tokio::test]
    async fn a_lost_rank_lets_an_elastic_job_continue_on_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let (id, _) = c
            .submit(JobSpec {
                min_workers: 2,
                ..spec(3)
            })
            .unwrap();
        let mut sessions = Vec::new();
        for rank in 0..3 {
            let a = c.register(register(rank)).unwrap();
            sessions.push(c.attach(&id, rank, a.incarnation).unwrap());
        }
        c.detach(&id, 1, sessions[1].0, "heartbeat stream closed");
        let status = c.status(&id).unwrap().job;
        assert_eq!(
            (status.state, status.world_size(), status.shrinks),
            (JobState::Pending, 2, 1)
        );
        assert_eq!(status.batch.train_batch_size, 8);
        assert_eq!(sessions[0].1.try_recv().unwrap().kind, OrderKind::Abort);
        assert!(events(&c, &id).iter().any(|e| e.starts_with("shrink: rank 1 lost")));
        let a = c.register(register(1)).unwrap();
        assert_eq!((a.world_size, a.attempt), (2, 2));
        assert!(c.register(register(2)).is_err(), "rank 2 is out of range now");
    }

    #[tokio::test]
    async fn an_unreadable_checkpoint_restarts_from_the_one_before_and_other_runs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path());
        let (id, sessions) = running_pair(&c);
        let run_id = c.status(&id).unwrap().job.run_id;
        assert_eq!(run_id, format!("{}/job-1", c.state_id()));
        let with_checkpoint = |step: u64, run_id: &str| Report {
            telemetry: job::Telemetry {
                progress: Some(kormlm_proto::v1::Progress {
                    global_step: step,
                    ..Default::default()
                }),
                early_stop: Some(Default::default()),
                checkpoint: Some(kormlm_proto::v1::CheckpointRef {
                    tag: format!("step-{step}"),
                    path: format!("/o/step-{step}"),
                    global_step: step,
                    run_id: run_id.into(),
                    attempt: 1,
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..report(&id, 0)
        };
        for step in [4, 8] {
            c.report(sessions[0].0, with_checkpoint(step, &run_id)).await.unwrap();
        }
        for _ in 0..2 {
            c.report(sessions[0].0, with_checkpoint(12, "elsewhere/job-1"))
                .await
                .unwrap();
        }
        let refusals = events(&c, &id)
            .into_iter()
            .filter(|e| e.contains("was not taken"))
            .count();
        assert_eq!(refusals, 1, "said once");
        assert_eq!(c.status(&id).unwrap().job.latest_checkpoint.unwrap().tag, "step-8");
        // The attempt fails; the next resumes from step-8, which cannot be read.
        c.report(sessions[1].0, failed(&id, 1, FailureKind::Io)).await.unwrap();
        let mut sessions = Vec::new();
        for rank in 0..2 {
            let a = c.register(register(rank)).unwrap();
            assert_eq!((a.attempt, a.resume_from.as_str()), (2, "/o/step-8"));
            sessions.push(c.attach(&id, rank, a.incarnation).unwrap());
        }
        let unreadable = Report {
            attempt: 2,
            ..failed(&id, 1, FailureKind::CheckpointUnreadable)
        };
        c.report(sessions[1].0, unreadable).await.unwrap();
        let status = c.status(&id).unwrap().job;
        assert_eq!(
            (status.state, status.restarts, status.automatic_restarts),
            (JobState::Pending, 2, 1)
        );
        assert_eq!(status.latest_checkpoint.unwrap().tag, "step-4");
        let a = c.register(register(0)).unwrap();
        assert_eq!(a.resume_from, "/o/step-4");
        assert!(events(&c, &id)
            .iter()
            .any(|e| e.contains("checkpoint step-8 (/o/step-8) cannot be read")));
    }

    #[test]
    fn a_job_is_refused_where_another_run_writes_and_told_what_became_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(&dir.path().join("state"));
        let out = dir.path().join("out");
        let mut with_out = spec(1);
        with_out.args.insert("output_dir".into(), out.display().to_string());
        let (id, _) = c.submit(with_out.clone()).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        let run_file = format!(r#"{{"run_id": "{}/{id}", "job_id": "{id}"}}"#, c.state_id());
        std::fs::write(out.join(run_dir::RUN_FILE), run_file).unwrap();
        c.kill(&id, true, "kill requested").unwrap();
        let err = c.submit(with_out.clone()).unwrap_err().to_string();
        assert!(
            err.contains(
                "(job-1 of this state directory; it is KILLED: continue it with `coordinator resume --job job-1`"
            ),
            "{err}"
        );
        assert_eq!(c.list().len(), 1, "nothing was recorded");
        with_out.args.insert("overwrite_output_dir".into(), "true".into());
        let (second, _) = c.submit(with_out).unwrap();
        assert_eq!(c.status(&second).unwrap().job.run_id, format!("{}/job-2", c.state_id()));
        // job-1's directory is job-2's now: job-1 cannot be resumed into it.
        let run_file = format!(r#"{{"run_id": "{}/{second}", "job_id": "{second}"}}"#, c.state_id());
        std::fs::write(out.join(run_dir::RUN_FILE), run_file).unwrap();
        c.kill(&second, true, "kill requested").unwrap();
        let err = c.resume(&id, 0).unwrap_err().to_string();
        assert!(err.contains("now holds run") && err.contains("job-2"), "{err}");
    }
}
