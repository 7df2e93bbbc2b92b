//! The workers of one job: claiming a rank (register), binding a heartbeat stream (attach),
//! taking reports, and noticing silence (sweep). Every way a worker is lost — heartbeat timeout,
//! broken stream, exited process — ends in [`Roster::mark_lost`].

use super::job::{Job, JobState, Order, OrderKind, Telemetry};
use crate::error::CoordinatorError;
use crate::launch_plan::{self, RankDevices};
use kormlm_proto::failure::FailureKind;
use kormlm_proto::now_ms;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A job with its workers, as status shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    pub job: Job,
    pub workers: Vec<Worker>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Registered, heart-beating.
    Alive,
    /// No heartbeat within the timeout, its stream broke, or its process exited.
    Lost,
    /// Finished its part, or left after the job ended.
    Exited,
    /// Reported a failure.
    Failed,
}

/// One rank's worker, as recorded and shown.
#[derive(Debug, Clone, PartialEq)]
pub struct Worker {
    pub rank: u32,
    pub local_rank: u32,
    pub host: String,
    pub pid: u32,
    /// `cpu` or `cuda:N`.
    pub devices: Vec<String>,
    pub state: WorkerState,
    pub last_heartbeat_ms: i64,
    pub optimizer_state_bytes: u64,
    /// Why it is LOST or FAILED.
    pub reason: String,
    /// Registrations of this rank so far (1 on the first).
    pub incarnation: u32,
    /// The kind of its failure (FAILED), or PEER_LOST when the coordinator lost it.
    pub failure_kind: Option<FailureKind>,
}

/// A worker asking for a rank.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub rank: u32,
    /// `None`: the coordinator chooses.
    pub local_rank: Option<u32>,
    pub host: String,
    pub pid: u32,
    pub protocol_version: u32,
    pub cuda_device_count: u32,
    pub torch_version: String,
    /// The work the process still holds from an earlier registration: (job id, attempt);
    /// `None` for a process without work (or a build that does not say).
    pub holds: Option<(String, u32)>,
}

/// A failure a worker reported.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportedFailure {
    /// `None`: the worker did not classify it (a build from before failure kinds).
    pub kind: Option<FailureKind>,
    pub message: String,
}

/// One heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub job_id: String,
    pub rank: u32,
    pub incarnation: u32,
    /// The attempt the reporting work belongs to; reports of another attempt are not taken.
    pub attempt: u32,
    pub optimizer_state_bytes: u64,
    /// The worker has finished its part.
    pub finished: bool,
    pub failure: Option<ReportedFailure>,
    /// Rank 0's view of the job.
    pub telemetry: Telemetry,
}

/// A rank just claimed.
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    pub worker: Worker,
    pub devices: RankDevices,
}

/// How a registration stands to the rank's recorded holder.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// A new worker for a free rank, or the recorded holder coming back (it keeps its work).
    Take,
    /// A new process (holding no work) claims a rank whose recorded holder (registered with a
    /// previous coordinator process) has not come back: the attempt's group cannot be completed
    /// with it, so the attempt is replaced. Carries the reason.
    ReplacesAttempt(String),
    /// A process holding work of another attempt or job claims such a rank: refused, so stale
    /// work never ends an attempt whose holders may still come back. Carries the reason.
    Stale(String),
}

/// A worker that was alive and no longer is.
#[derive(Debug, Clone, PartialEq)]
pub struct Loss {
    pub worker: Worker,
    /// The job was still running: the loss fails the attempt.
    pub fails_the_job: bool,
}

/// A heartbeat stream of this coordinator process.
#[derive(Debug)]
struct Session {
    id: u64,
    orders: mpsc::UnboundedSender<Order>,
}

#[derive(Debug)]
struct Member {
    worker: Worker,
    /// Last sign of life seen by this process (records loaded from disk start at load time).
    last_seen: Instant,
    session: Option<Session>,
    /// Registered in this process (and not lost since); a rank held this way cannot be claimed.
    live: bool,
}

/// The workers of one job, by rank.
#[derive(Debug, Default)]
pub struct Roster {
    members: BTreeMap<u32, Member>,
}

impl Roster {
    /// Workers found in the records of a previous coordinator process; they count as seen at
    /// `seen` (a moment in the future gives them time to register again).
    pub fn loaded(workers: Vec<Worker>, seen: Instant) -> Self {
        let members = workers
            .into_iter()
            .map(|worker| {
                (
                    worker.rank,
                    Member {
                        worker,
                        last_seen: seen,
                        session: None,
                        live: false,
                    },
                )
            })
            .collect();
        Self { members }
    }

    pub fn workers(&self) -> Vec<Worker> {
        self.members.values().map(|m| m.worker.clone()).collect()
    }

    /// How `request` stands to the holder of its rank in `job`'s current attempt. Only a
    /// running job recorded by a previous coordinator process has holders that may not come
    /// back; the holder is recognised by the work it says it holds or, for a build that does
    /// not say, by its host and pid.
    pub fn claim(&self, job: &Job, request: &Registration) -> Claim {
        let Some(holder) = self
            .members
            .get(&request.rank)
            .filter(|m| !m.live && m.worker.state == WorkerState::Alive)
        else {
            return Claim::Take;
        };
        if job.state != JobState::Running || is_holder(job, &holder.worker, request) {
            return Claim::Take;
        }
        if let Some((job_id, attempt)) = &request.holds {
            return Claim::Stale(format!(
                "rank {} of job {} attempt {} is held by pid {} on {}, registered before the coordinator \
                 restarted; this worker holds work of {job_id} attempt {attempt}, which is over",
                request.rank,
                job.id,
                job.attempt(),
                holder.worker.pid,
                holder.worker.host
            ));
        }
        Claim::ReplacesAttempt(format!(
            "rank {} registered as pid {} on {} while its holder in attempt {} (pid {} on {}) has not come back \
             since the coordinator restarted",
            request.rank,
            request.pid,
            request.host,
            job.attempt(),
            holder.worker.pid,
            holder.worker.host
        ))
    }

    /// The worker `request` would be as the holder of its rank of `job`; [`Roster::admit`] makes
    /// it one (after it is recorded).
    pub fn register(&self, job: &Job, request: &Registration) -> Result<Registered, CoordinatorError> {
        let world = job.world_size();
        if request.rank >= world {
            return Err(CoordinatorError::InvalidRequest(format!(
                "rank {} is out of range: job {} has world size {world} (ranks 0..={})",
                request.rank,
                job.id,
                world.saturating_sub(1)
            )));
        }
        let recorded = self.members.get(&request.rank);
        if let Some(held) = recorded.filter(|m| m.live && m.worker.state == WorkerState::Alive) {
            return Err(CoordinatorError::RankHeld(format!(
                "rank {} of job {} is already held by pid {} on host {}; each rank registers once \
                 (stop that worker first, or pick another --rank)",
                request.rank, job.id, held.worker.pid, held.worker.host
            )));
        }
        // A stopping job takes back the workers it had (to let them finish their stop
        // checkpoint after a coordinator restart), and no others.
        let returning =
            recorded.is_some_and(|m| m.worker.state == WorkerState::Alive && is_holder(job, &m.worker, request));
        if job.state == JobState::Stopping && !returning {
            return Err(CoordinatorError::Refused(format!(
                "job {} is stopping; it takes no new workers",
                job.id
            )));
        }
        let placement = job.placement(request.rank);
        let local_rank = match (&placement, request.local_rank) {
            (Some(p), _) => p.local_rank,
            (None, Some(l)) => l,
            (None, None) => request.rank,
        };
        let devices = launch_plan::rank_devices(job.device(), placement.as_ref(), local_rank);
        let incarnation = recorded.map_or(0, |m| m.worker.incarnation) + 1;
        let worker = Worker {
            rank: request.rank,
            local_rank,
            host: request.host.clone(),
            pid: request.pid,
            devices: devices.names.clone(),
            state: WorkerState::Alive,
            last_heartbeat_ms: now_ms(),
            optimizer_state_bytes: 0,
            reason: String::new(),
            incarnation,
            failure_kind: None,
        };
        Ok(Registered { worker, devices })
    }

    /// Makes a registered worker the holder of its rank.
    pub fn admit(&mut self, worker: Worker) {
        self.members.insert(
            worker.rank,
            Member {
                worker,
                last_seen: Instant::now(),
                session: None,
                live: true,
            },
        );
    }

    /// Whether every rank of `0..world` is held by a live worker.
    pub fn all_alive(&self, world: u32) -> bool {
        (0..world).all(|r| {
            self.members
                .get(&r)
                .is_some_and(|m| m.live && m.worker.state == WorkerState::Alive)
        })
    }

    /// Whether every rank of `0..world` has finished.
    pub fn all_exited(&self, world: u32) -> bool {
        (0..world).all(|r| {
            self.members
                .get(&r)
                .is_some_and(|m| m.worker.state == WorkerState::Exited)
        })
    }

    /// Whether every rank of `0..world` has ended its part (finished, failed or lost).
    pub fn all_ended(&self, world: u32) -> bool {
        (0..world).all(|r| {
            self.members
                .get(&r)
                .is_some_and(|m| m.worker.state != WorkerState::Alive)
        })
    }

    pub fn live_count(&self) -> usize {
        self.members.values().filter(|m| m.live).count()
    }

    /// Workers alive or expected back (recorded ALIVE by a previous coordinator process).
    pub fn alive_count(&self) -> usize {
        self.members
            .values()
            .filter(|m| m.worker.state == WorkerState::Alive)
            .count()
    }

    /// Whether `rank` is held by a worker registered with this process and alive.
    pub fn is_live(&self, rank: u32) -> bool {
        self.members
            .get(&rank)
            .is_some_and(|m| m.live && m.worker.state == WorkerState::Alive)
    }

    /// The ranks of `0..world` whose workers were not lost (their processes are still there).
    pub fn survivors(&self, world: u32) -> Vec<u32> {
        (0..world)
            .filter(|r| self.members.get(r).is_none_or(|m| m.worker.state != WorkerState::Lost))
            .collect()
    }

    pub fn contains(&self, rank: u32) -> bool {
        self.members.contains_key(&rank)
    }

    /// Whether `rank` is alive in process `pid`.
    pub fn is_alive_in(&self, rank: u32, pid: u32) -> bool {
        self.members
            .get(&rank)
            .is_some_and(|m| m.worker.state == WorkerState::Alive && m.worker.pid == pid)
    }

    /// Whether `session` is the heartbeat stream `rank` is bound to now.
    pub fn is_current(&self, rank: u32, session: u64) -> bool {
        self.members
            .get(&rank)
            .and_then(|m| m.session.as_ref())
            .is_some_and(|s| s.id == session)
    }

    /// Binds heartbeat stream `session` to a registered worker; returns the receiving end of its
    /// orders. A worker that attaches late still hears of a stop that was already ordered.
    pub fn attach(
        &mut self,
        job: &Job,
        rank: u32,
        incarnation: u32,
        session: u64,
    ) -> Result<mpsc::UnboundedReceiver<Order>, CoordinatorError> {
        let member = self
            .members
            .get_mut(&rank)
            .filter(|m| m.worker.incarnation == incarnation && m.live)
            .ok_or_else(|| {
                CoordinatorError::Refused(format!(
                    "rank {rank} incarnation {incarnation} of {} is not registered with this coordinator; register again",
                    job.id
                ))
            })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = if job.state.is_terminal() {
            Some(Order {
                kind: OrderKind::Shutdown,
                reason: format!("job {} has ended", job.id),
            })
        } else if job.state == JobState::Stopping {
            Some(Order {
                kind: OrderKind::StopAfterStep,
                reason: "kill requested: finishing the current step".into(),
            })
        } else {
            None
        };
        if let Some(order) = pending {
            let _ = tx.send(order);
        }
        member.session = Some(Session {
            id: session,
            orders: tx,
        });
        member.last_seen = Instant::now();
        Ok(rx)
    }

    /// The worker as a heartbeat from stream `session` leaves it; [`Roster::record`] makes it so
    /// (after it is recorded).
    pub fn report(&self, session: u64, report: &Report) -> Result<Worker, CoordinatorError> {
        let member = self
            .members
            .get(&report.rank)
            .ok_or_else(|| CoordinatorError::Refused(format!("rank {} is not registered", report.rank)))?;
        if member.session.as_ref().map(|s| s.id) != Some(session) {
            return Err(CoordinatorError::Refused(
                "this heartbeat stream was replaced by a newer registration".into(),
            ));
        }
        let mut worker = member.worker.clone();
        worker.last_heartbeat_ms = now_ms();
        worker.optimizer_state_bytes = report.optimizer_state_bytes;
        if let Some(failure) = &report.failure {
            worker.state = WorkerState::Failed;
            worker.reason = failure.message.clone();
            worker.failure_kind = Some(failure.kind.unwrap_or(FailureKind::Internal));
        } else if report.finished {
            worker.state = WorkerState::Exited;
        }
        Ok(worker)
    }

    /// Adopts a worker's new record (from [`Roster::report`] or [`Roster::mark_lost`]): a sign of
    /// life while it is alive; once it is not, its rank can be claimed again, and a lost
    /// worker's stream is forgotten.
    pub fn record(&mut self, worker: Worker) {
        let Some(member) = self.members.get_mut(&worker.rank) else {
            return;
        };
        match worker.state {
            WorkerState::Alive => member.last_seen = Instant::now(),
            WorkerState::Lost => {
                member.live = false;
                member.session = None;
            }
            WorkerState::Exited | WorkerState::Failed => member.live = false,
        }
        member.worker = worker;
    }

    /// The one path for losing a worker: what losing it means. Only an ALIVE worker can be
    /// lost; after the job ended a worker leaving is no failure and is recorded as EXITED.
    /// [`Roster::record`] adopts the loss (after it is recorded).
    pub fn mark_lost(&self, rank: u32, reason: &str, job_ended: bool) -> Option<Loss> {
        let member = self
            .members
            .get(&rank)
            .filter(|m| m.worker.state == WorkerState::Alive)?;
        let mut worker = member.worker.clone();
        if job_ended {
            worker.state = WorkerState::Exited;
            worker.reason = format!("left after the job ended ({reason})");
        } else {
            worker.state = WorkerState::Lost;
            worker.reason = reason.to_string();
            worker.failure_kind = Some(FailureKind::PeerLost);
        }
        Some(Loss {
            worker,
            fails_the_job: !job_ended,
        })
    }

    /// Alive workers silent for longer than `timeout`, with how long each has been silent.
    pub fn silent(&self, timeout: Duration) -> Vec<(u32, Duration)> {
        self.members
            .iter()
            .filter(|(_, m)| m.worker.state == WorkerState::Alive && m.last_seen.elapsed() > timeout)
            .map(|(rank, m)| (*rank, m.last_seen.elapsed()))
            .collect()
    }

    /// Sends `order` to every worker with an open heartbeat stream.
    pub fn send(&self, order: &Order) {
        for session in self.members.values().filter_map(|m| m.session.as_ref()) {
            let _ = session.orders.send(order.clone());
        }
    }

    /// Stops being the holder's stream after a loss; also ends the stream of a worker recorded
    /// EXITED after the job ended.
    pub fn forget_session(&mut self, rank: u32) {
        if let Some(member) = self.members.get_mut(&rank) {
            member.live = false;
            member.session = None;
        }
    }

    /// Forgets every worker (a new attempt gets new ones).
    pub fn clear(&mut self) {
        self.members.clear();
    }
}

/// Whether `request` comes from the process recorded as `holder` of its rank in `job`'s current
/// attempt: it says it holds that attempt's work, or (a build that does not say) it is the same
/// process.
fn is_holder(job: &Job, holder: &Worker, request: &Registration) -> bool {
    match &request.holds {
        Some((job_id, attempt)) => *job_id == job.id && *attempt == job.attempt(),
        None => holder.host == request.host && holder.pid == request.pid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kormlm_proto::job_plan::JobPlan;
    use kormlm_proto::v1::JobSpec;

    fn job(world: u32) -> Job {
        let spec = JobSpec {
            ds_config_json: r#"{"train_micro_batch_size_per_gpu": 4}"#.into(),
            world_size: world,
            ..Default::default()
        };
        let plan = JobPlan::resolve(&spec, world).unwrap();
        Job::submitted(1, spec, &plan, "5eed")
    }

    fn registration(rank: u32) -> Registration {
        Registration {
            rank,
            local_rank: None,
            host: "h".into(),
            pid: 100 + rank,
            protocol_version: kormlm_proto::PROTOCOL_VERSION,
            cuda_device_count: 0,
            torch_version: String::new(),
            holds: None,
        }
    }

    /// Registers and admits, as the coordinator does.
    fn take(roster: &mut Roster, j: &Job, request: &Registration) -> Result<Registered, CoordinatorError> {
        let registered = roster.register(j, request)?;
        roster.admit(registered.worker.clone());
        Ok(registered)
    }

    fn report(rank: u32) -> Report {
        Report {
            job_id: "job-1".into(),
            rank,
            incarnation: 1,
            attempt: 1,
            optimizer_state_bytes: 0,
            finished: false,
            failure: None,
            telemetry: Telemetry::default(),
        }
    }

    #[test]
    fn a_lost_worker_is_peer_lost_and_frees_its_rank() {
        let j = job(2);
        let mut roster = Roster::default();
        take(&mut roster, &j, &registration(0)).unwrap();
        assert!(matches!(
            roster.register(&j, &registration(0)),
            Err(CoordinatorError::RankHeld(_))
        ));
        let loss = roster.mark_lost(0, "heartbeat stream closed", false).unwrap();
        roster.record(loss.worker.clone());
        assert!(loss.fails_the_job);
        assert_eq!(
            (loss.worker.state, loss.worker.failure_kind),
            (WorkerState::Lost, Some(FailureKind::PeerLost))
        );
        assert_eq!(
            roster.mark_lost(0, "again", false),
            None,
            "only an alive worker is lost"
        );
        let again = take(&mut roster, &j, &registration(0)).unwrap();
        assert_eq!(again.worker.incarnation, 2);
        let left = roster.mark_lost(0, "stream closed", true).unwrap();
        assert!(!left.fails_the_job);
        assert_eq!(left.worker.state, WorkerState::Exited);
        assert_eq!(left.worker.failure_kind, None);
    }

    #[test]
    fn reports_record_the_failure_kind() {
        let j = job(1);
        let mut roster = Roster::default();
        take(&mut roster, &j, &registration(0)).unwrap();
        let mut failed = report(0);
        failed.failure = Some(ReportedFailure {
            kind: Some(FailureKind::BadInput),
            message: "no such corpus".into(),
        });
        assert!(roster.report(7, &failed).is_err(), "an unattached stream is refused");
        let _orders = roster.attach(&j, 0, 1, 7).unwrap();
        let worker = roster.report(7, &failed).unwrap();
        assert_eq!(roster.live_count(), 1, "nothing changes before the report is recorded");
        roster.record(worker.clone());
        assert_eq!(
            (worker.state, worker.failure_kind, worker.reason.as_str()),
            (WorkerState::Failed, Some(FailureKind::BadInput), "no such corpus")
        );
        assert_eq!(roster.live_count(), 0);
    }

    #[test]
    fn devices_come_from_the_placement() {
        let mut j = job(2);
        j.spec.device = kormlm_proto::v1::DeviceKind::Cuda as i32;
        j.spec.placements = vec![kormlm_proto::v1::Placement {
            rank: 1,
            local_rank: 0,
            host: "h".into(),
            cuda_devices: vec![3],
        }];
        let mut roster = Roster::default();
        let placed = take(&mut roster, &j, &registration(1)).unwrap();
        assert_eq!(
            (placed.worker.local_rank, placed.devices.cuda, placed.devices.physical),
            (0, vec![0], vec![3])
        );
        assert_eq!(placed.worker.devices, vec!["cuda:0 (GPU 3)"]);
        let free = take(&mut roster, &j, &registration(0)).unwrap();
        assert_eq!(free.worker.devices, vec!["cuda:0"]);
    }

    fn recorded(workers: Vec<Worker>) -> Roster {
        Roster::loaded(workers, Instant::now())
    }

    fn alive(rank: u32, pid: u32) -> Worker {
        Worker {
            rank,
            local_rank: rank,
            host: "h".into(),
            pid,
            devices: vec!["cpu".into()],
            state: WorkerState::Alive,
            last_heartbeat_ms: 1,
            optimizer_state_bytes: 0,
            reason: String::new(),
            incarnation: 1,
            failure_kind: None,
        }
    }

    #[test]
    fn after_a_coordinator_restart_holders_come_back_and_others_replace_the_attempt() {
        let mut j = job(2);
        j.start();
        let roster = recorded(vec![alive(0, 100), alive(1, 101)]);
        // The same process (a build that does not say what it holds), or one that says it holds
        // this attempt's work, takes its rank back.
        assert_eq!(roster.claim(&j, &registration(0)), Claim::Take);
        let holding = Registration {
            pid: 555,
            holds: Some(("job-1".into(), 1)),
            ..registration(1)
        };
        assert_eq!(roster.claim(&j, &holding), Claim::Take);
        // Another process cannot join the running attempt: it replaces it; one holding older
        // work is refused.
        let stranger = Registration {
            pid: 777,
            ..registration(1)
        };
        let Claim::ReplacesAttempt(why) = roster.claim(&j, &stranger) else {
            panic!("a new process cannot complete the attempt's group")
        };
        assert!(
            why.contains("rank 1 registered as pid 777 on h while its holder in attempt 1 (pid 101 on h)"),
            "{why}"
        );
        let stale = Registration {
            holds: Some(("job-1".into(), 0)),
            ..registration(1)
        };
        let Claim::Stale(why) = roster.claim(&j, &stale) else {
            panic!("stale work does not end the attempt")
        };
        assert!(why.contains("holds work of job-1 attempt 0, which is over"), "{why}");
        // A stopping job takes back its holders only.
        j.kill(false, 2, "kill requested").unwrap();
        assert!(roster.register(&j, &registration(0)).is_ok());
        let err = roster.register(&j, &stranger).unwrap_err().to_string();
        assert_eq!(err, "job job-1 is stopping; it takes no new workers");
        // A pending job's ranks are free.
        let pending = job(2);
        assert_eq!(roster.claim(&pending, &stranger), Claim::Take);
    }

    #[test]
    fn ended_and_surviving_ranks() {
        let j = job(3);
        let mut roster = Roster::default();
        for rank in 0..3 {
            take(&mut roster, &j, &registration(rank)).unwrap();
        }
        assert!(!roster.all_ended(3));
        let loss = roster.mark_lost(1, "gone", false).unwrap();
        roster.record(loss.worker);
        assert_eq!(roster.survivors(3), vec![0, 2]);
        assert_eq!(
            (roster.alive_count(), roster.is_live(1), roster.is_live(2)),
            (2, false, true)
        );
        for rank in [0, 2] {
            assert!(roster.report(0, &report(rank)).is_err(), "no stream attached yet");
            let _orders = roster.attach(&j, rank, 1, 10 + u64::from(rank)).unwrap();
            let mut finished = report(rank);
            finished.finished = true;
            let worker = roster.report(10 + u64::from(rank), &finished).unwrap();
            roster.record(worker);
        }
        assert!(roster.all_ended(3) && !roster.all_exited(3));
    }
}
