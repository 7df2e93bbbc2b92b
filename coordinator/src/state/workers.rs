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

    /// Claims a rank of `job` for a worker.
    pub fn register(&mut self, job: &Job, request: &Registration) -> Result<Registered, CoordinatorError> {
        let world = job.world_size();
        if request.rank >= world {
            return Err(CoordinatorError::InvalidRequest(format!(
                "rank {} is out of range: job {} has world size {world} (ranks 0..={})",
                request.rank,
                job.id,
                world.saturating_sub(1)
            )));
        }
        if job.state == JobState::Stopping {
            return Err(CoordinatorError::Refused(format!(
                "job {} is stopping; it takes no new workers",
                job.id
            )));
        }
        if let Some(held) = self
            .members
            .get(&request.rank)
            .filter(|m| m.live && m.worker.state == WorkerState::Alive)
        {
            return Err(CoordinatorError::RankHeld(format!(
                "rank {} of job {} is already held by pid {} on host {}; each rank registers once \
                 (stop that worker first, or pick another --rank)",
                request.rank, job.id, held.worker.pid, held.worker.host
            )));
        }
        let placement = job.placement(request.rank);
        let local_rank = match (&placement, request.local_rank) {
            (Some(p), _) => p.local_rank,
            (None, Some(l)) => l,
            (None, None) => request.rank,
        };
        let devices = launch_plan::rank_devices(job.device(), placement.as_ref(), local_rank);
        let incarnation = self.members.get(&request.rank).map_or(0, |m| m.worker.incarnation) + 1;
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
        self.members.insert(
            request.rank,
            Member {
                worker: worker.clone(),
                last_seen: Instant::now(),
                session: None,
                live: true,
            },
        );
        Ok(Registered { worker, devices })
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

    pub fn live_count(&self) -> usize {
        self.members.values().filter(|m| m.live).count()
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

    /// Records a heartbeat from stream `session`; returns the worker as it now stands.
    pub fn report(&mut self, session: u64, report: &Report) -> Result<Worker, CoordinatorError> {
        let member = self
            .members
            .get_mut(&report.rank)
            .ok_or_else(|| CoordinatorError::Refused(format!("rank {} is not registered", report.rank)))?;
        if member.session.as_ref().map(|s| s.id) != Some(session) {
            return Err(CoordinatorError::Refused(
                "this heartbeat stream was replaced by a newer registration".into(),
            ));
        }
        member.last_seen = Instant::now();
        let worker = &mut member.worker;
        worker.last_heartbeat_ms = now_ms();
        worker.optimizer_state_bytes = report.optimizer_state_bytes;
        if let Some(failure) = &report.failure {
            worker.state = WorkerState::Failed;
            worker.reason = failure.message.clone();
            worker.failure_kind = Some(failure.kind.unwrap_or(FailureKind::Internal));
            member.live = false;
        } else if report.finished {
            worker.state = WorkerState::Exited;
            member.live = false;
        }
        Ok(member.worker.clone())
    }

    /// The one path for losing a worker. Only an ALIVE worker can be lost; after the job ended a
    /// worker leaving is no failure and is recorded as EXITED.
    pub fn mark_lost(&mut self, rank: u32, reason: &str, job_ended: bool) -> Option<Loss> {
        let member = self
            .members
            .get_mut(&rank)
            .filter(|m| m.worker.state == WorkerState::Alive)?;
        member.live = false;
        member.session = None;
        let worker = &mut member.worker;
        if job_ended {
            worker.state = WorkerState::Exited;
            worker.reason = format!("left after the job ended ({reason})");
        } else {
            worker.state = WorkerState::Lost;
            worker.reason = reason.to_string();
            worker.failure_kind = Some(FailureKind::PeerLost);
        }
        Some(Loss {
            worker: worker.clone(),
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

    /// Hosts and pids of the workers, for signalling on a forced kill.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.members
            .values()
            .map(|m| (m.worker.host.clone(), m.worker.pid))
            .collect()
    }

    /// Forgets every worker (a new attempt gets new ones).
    pub fn clear(&mut self) {
        self.members.clear();
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
        Job::submitted(1, spec, &plan)
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
        }
    }

    fn report(rank: u32) -> Report {
        Report {
            job_id: "job-1".into(),
            rank,
            incarnation: 1,
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
        roster.register(&j, &registration(0)).unwrap();
        assert!(matches!(
            roster.register(&j, &registration(0)),
            Err(CoordinatorError::RankHeld(_))
        ));
        let loss = roster.mark_lost(0, "heartbeat stream closed", false).unwrap();
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
        let again = roster.register(&j, &registration(0)).unwrap();
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
        roster.register(&j, &registration(0)).unwrap();
        let mut failed = report(0);
        failed.failure = Some(ReportedFailure {
            kind: Some(FailureKind::BadInput),
            message: "no such corpus".into(),
        });
        assert!(roster.report(7, &failed).is_err(), "an unattached stream is refused");
        let _orders = roster.attach(&j, 0, 1, 7).unwrap();
        let worker = roster.report(7, &failed).unwrap();
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
        let placed = roster.register(&j, &registration(1)).unwrap();
        assert_eq!((placed.worker.local_rank, placed.devices.cuda), (0, vec![3]));
        assert_eq!(placed.worker.devices, vec!["cuda:3"]);
        let free = roster.register(&j, &registration(0)).unwrap();
        assert_eq!(free.worker.devices, vec!["cuda:0"]);
    }
}
