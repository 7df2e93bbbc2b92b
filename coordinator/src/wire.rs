//! Conversions between the coordinator's domain types (`state`) and the `kormlm.v1` messages,
//! used only at the edges: the gRPC services, the sled records and the status view. A record
//! that cannot be a domain value is an error naming its key, never a silent default.

use crate::error::{CoordinatorError, Result};
use crate::state::job::{self, Assignment, Job, JobState, Order, OrderKind, StopCause, Telemetry};
use crate::state::rendezvous::{Arrival, Group};
use crate::state::workers::{JobView, Registration, Report, ReportedFailure, Worker, WorkerState};
use crate::store::job_key;
use kormlm_proto::ds_config::Batch;
use kormlm_proto::failure::FailureKind;
use kormlm_proto::v1;

fn job_state_to_proto(state: JobState) -> v1::JobState {
    match state {
        JobState::Pending => v1::JobState::Pending,
        JobState::Running => v1::JobState::Running,
        JobState::Stopping => v1::JobState::Stopping,
        JobState::Killed => v1::JobState::Killed,
        JobState::Failed => v1::JobState::Failed,
        JobState::Succeeded => v1::JobState::Succeeded,
    }
}

fn job_state_from_proto(value: i32) -> Option<JobState> {
    match v1::JobState::try_from(value).ok()? {
        v1::JobState::Pending => Some(JobState::Pending),
        v1::JobState::Running => Some(JobState::Running),
        v1::JobState::Stopping => Some(JobState::Stopping),
        v1::JobState::Killed => Some(JobState::Killed),
        v1::JobState::Failed => Some(JobState::Failed),
        v1::JobState::Succeeded => Some(JobState::Succeeded),
        v1::JobState::Unspecified => None,
    }
}

fn batch_to_proto(batch: Batch) -> v1::BatchSizes {
    v1::BatchSizes {
        train_batch_size: batch.train_batch_size,
        train_micro_batch_size_per_gpu: batch.train_micro_batch_size_per_gpu,
        gradient_accumulation_steps: batch.gradient_accumulation_steps,
    }
}

fn batch_from_proto(batch: v1::BatchSizes) -> Batch {
    Batch {
        train_batch_size: batch.train_batch_size,
        train_micro_batch_size_per_gpu: batch.train_micro_batch_size_per_gpu,
        gradient_accumulation_steps: batch.gradient_accumulation_steps,
    }
}

fn failure_kind_to_proto(kind: Option<FailureKind>) -> i32 {
    kind.map_or(v1::FailureKind::Unspecified, FailureKind::to_wire) as i32
}

/// An unset kind is no kind; any other value reads as [`FailureKind::from_wire`] reads it.
fn failure_kind_from_proto(value: i32) -> Option<FailureKind> {
    (value != v1::FailureKind::Unspecified as i32).then(|| FailureKind::from_wire(value))
}

/// The job's sled record (its status without workers, which are records of their own). A record
/// written before run ids and checkpoint lists gets the run id `STATE_ID/job-N` of this state
/// directory and its latest checkpoint as its list.
pub fn job_from_record(number: u64, record: v1::JobRecord, state_id: &str) -> Result<Job> {
    let damaged = |message: &str| CoordinatorError::Record {
        key: job_key(number),
        message: message.into(),
    };
    let spec = record.spec.ok_or_else(|| damaged("the job record has no spec"))?;
    let status = record.status.ok_or_else(|| damaged("the job record has no status"))?;
    let state =
        job_state_from_proto(status.state).ok_or_else(|| damaged(&format!("unknown job state {}", status.state)))?;
    let keep_checkpoints = kormlm_proto::train_args::TrainArgs::from_map(&spec.args)
        .map_err(|e| damaged(&format!("the job's flags: {e}")))?
        .keep_checkpoints;
    // A STOPPING record of a version that did not store the cause stops as requested.
    let stop_cause = (state == JobState::Stopping).then(|| match v1::StopCause::try_from(status.stop_cause) {
        Ok(v1::StopCause::StopPreempted) => StopCause::Preemption,
        _ => StopCause::Request,
    });
    let run_id = if status.run_id.is_empty() {
        job::run_id(state_id, &status.job_id)
    } else {
        status.run_id
    };
    let checkpoints = match (status.checkpoints.is_empty(), &status.latest_checkpoint) {
        (true, Some(latest)) => vec![latest.clone()],
        _ => status.checkpoints,
    };
    Ok(Job {
        number,
        id: status.job_id,
        run_id,
        spec,
        resolved_config_json: record.resolved_config_json,
        batch: batch_from_proto(status.batch.unwrap_or_default()),
        state,
        stop_cause,
        message: status.message,
        progress: status.progress.unwrap_or_default(),
        early_stop: status.early_stop.unwrap_or_default(),
        latest_checkpoint: status.latest_checkpoint,
        best_checkpoint: status.best_checkpoint,
        checkpoints,
        keep_checkpoints,
        created_unix_ms: status.created_unix_ms,
        started_unix_ms: status.started_unix_ms,
        ended_unix_ms: status.ended_unix_ms,
        restarts: status.restarts,
        automatic_restarts: status.automatic_restarts,
        shrinks: status.shrinks,
        output_dir: status.output_dir,
        record_error: None,
    })
}

fn job_status(job: &Job, workers: Vec<v1::WorkerInfo>) -> v1::JobStatus {
    v1::JobStatus {
        job_id: job.id.clone(),
        state: job_state_to_proto(job.state) as i32,
        task: job.task() as i32,
        world_size: job.world_size(),
        batch: Some(batch_to_proto(job.batch)),
        progress: Some(job.progress),
        early_stop: Some(job.early_stop.clone()),
        latest_checkpoint: job.latest_checkpoint.clone(),
        best_checkpoint: job.best_checkpoint.clone(),
        workers,
        message: job.message.clone(),
        stop_cause: match job.stop_cause {
            None => v1::StopCause::Unspecified,
            Some(StopCause::Request) => v1::StopCause::StopRequested,
            Some(StopCause::Preemption) => v1::StopCause::StopPreempted,
        } as i32,
        created_unix_ms: job.created_unix_ms,
        started_unix_ms: job.started_unix_ms,
        ended_unix_ms: job.ended_unix_ms,
        restarts: job.restarts,
        max_restarts: job.max_restarts(),
        output_dir: job.output_dir.clone(),
        automatic_restarts: job.automatic_restarts,
        run_id: job.run_id.clone(),
        checkpoints: job.checkpoints.clone(),
        shrinks: job.shrinks,
    }
}

impl From<&Job> for v1::JobRecord {
    fn from(job: &Job) -> Self {
        Self {
            spec: Some(job.spec.clone()),
            status: Some(job_status(job, Vec::new())),
            resolved_config_json: job.resolved_config_json.clone(),
        }
    }
}

impl From<&JobView> for v1::JobStatus {
    fn from(view: &JobView) -> Self {
        job_status(&view.job, view.workers.iter().map(v1::WorkerInfo::from).collect())
    }
}

impl From<&Worker> for v1::WorkerInfo {
    fn from(w: &Worker) -> Self {
        let state = match w.state {
            WorkerState::Alive => v1::WorkerState::Alive,
            WorkerState::Lost => v1::WorkerState::Lost,
            WorkerState::Exited => v1::WorkerState::Exited,
            WorkerState::Failed => v1::WorkerState::WorkerFailed,
        };
        Self {
            rank: w.rank,
            local_rank: w.local_rank,
            host: w.host.clone(),
            pid: w.pid,
            devices: w.devices.clone(),
            state: state as i32,
            last_heartbeat_ms: w.last_heartbeat_ms,
            optimizer_state_bytes: w.optimizer_state_bytes,
            reason: w.reason.clone(),
            incarnation: w.incarnation,
            failure_kind: failure_kind_to_proto(w.failure_kind),
        }
    }
}

impl From<v1::WorkerInfo> for Worker {
    fn from(w: v1::WorkerInfo) -> Self {
        let state = match v1::WorkerState::try_from(w.state) {
            Ok(v1::WorkerState::Alive) => WorkerState::Alive,
            Ok(v1::WorkerState::Exited) => WorkerState::Exited,
            Ok(v1::WorkerState::WorkerFailed) => WorkerState::Failed,
            // Never written; a worker in an unknown state is not counted on.
            Ok(v1::WorkerState::Lost | v1::WorkerState::Unspecified) | Err(_) => WorkerState::Lost,
        };
        Self {
            rank: w.rank,
            local_rank: w.local_rank,
            host: w.host,
            pid: w.pid,
            devices: w.devices,
            state,
            last_heartbeat_ms: w.last_heartbeat_ms,
            optimizer_state_bytes: w.optimizer_state_bytes,
            reason: w.reason,
            incarnation: w.incarnation,
            failure_kind: failure_kind_from_proto(w.failure_kind),
        }
    }
}

/// The token travels in metadata, where the authentication layer checks it. Held work is
/// named by its job id (an empty one: the worker holds none, or does not say).
impl From<v1::RegisterRequest> for Registration {
    fn from(r: v1::RegisterRequest) -> Self {
        Self {
            holds: (!r.current_job_id.is_empty()).then(|| (r.current_job_id.clone(), r.current_attempt)),
            rank: r.rank,
            local_rank: u32::try_from(r.local_rank).ok(),
            host: r.host,
            pid: r.pid,
            protocol_version: r.protocol_version,
            cuda_device_count: r.cuda_device_count,
            torch_version: r.torch_version,
        }
    }
}

impl From<Assignment> for v1::Assignment {
    fn from(a: Assignment) -> Self {
        let device = match a.device {
            v1::DeviceKind::Cuda => v1::DeviceKind::Cuda,
            _ => v1::DeviceKind::Cpu,
        };
        Self {
            job_id: a.job_id,
            rank: a.rank,
            local_rank: a.local_rank,
            world_size: a.world_size,
            device: device as i32,
            cuda_devices: a.cuda_devices,
            physical_cuda_devices: a.physical_cuda_devices,
            resolved_config_json: a.resolved_config_json,
            batch: Some(batch_to_proto(a.batch)),
            args: a.args,
            task: a.task as i32,
            heartbeat_interval_ms: u32::try_from(a.heartbeat_interval.as_millis()).unwrap_or(u32::MAX),
            incarnation: a.incarnation,
            attempt: a.attempt,
            output_dir: a.output_dir,
            resume_from: a.resume_from,
            run_id: a.run_id,
        }
    }
}

impl From<v1::WorkerReport> for Report {
    fn from(r: v1::WorkerReport) -> Self {
        let failure = (!r.failure.is_empty()).then(|| ReportedFailure {
            kind: failure_kind_from_proto(r.failure_kind),
            message: r.failure,
        });
        Self {
            job_id: r.job_id,
            rank: r.rank,
            incarnation: r.incarnation,
            attempt: r.attempt,
            optimizer_state_bytes: r.optimizer_state_bytes,
            finished: r.finished,
            failure,
            telemetry: Telemetry {
                progress: r.progress,
                early_stop: r.early_stop,
                checkpoint: r.checkpoint,
                best_checkpoint: r.best_checkpoint,
            },
        }
    }
}

impl From<&Order> for v1::CoordinatorCommand {
    fn from(order: &Order) -> Self {
        let kind = match order.kind {
            OrderKind::StopAfterStep => v1::CommandKind::StopAfterStep,
            OrderKind::Abort => v1::CommandKind::Abort,
            OrderKind::Shutdown => v1::CommandKind::Shutdown,
            OrderKind::Terminate => v1::CommandKind::Terminate,
        };
        Self {
            kind: kind as i32,
            reason: order.reason.clone(),
        }
    }
}

impl From<v1::RendezvousRequest> for Arrival {
    fn from(r: v1::RendezvousRequest) -> Self {
        Self {
            job_id: r.job_id,
            rank: r.rank,
            attempt: r.attempt,
            nccl_unique_id: r.nccl_unique_id,
            ring_address: r.ring_address,
        }
    }
}

impl From<Group> for v1::RendezvousInfo {
    fn from(g: Group) -> Self {
        Self {
            attempt: g.attempt,
            nccl_unique_id: g.nccl_unique_id,
            ring_addresses: g.ring_addresses,
            ring_secret: g.ring_secret.into_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kormlm_proto::v1::{CheckpointRef, EarlyStopState, JobSpec, Progress, TaskKind};

    /// A record as the coordinator before the domain types wrote it.
    fn record() -> v1::JobRecord {
        v1::JobRecord {
            spec: Some(JobSpec {
                task: TaskKind::Train as i32,
                ds_config_json: "{}".into(),
                world_size: 2,
                device: v1::DeviceKind::Cpu as i32,
                max_restarts: 1,
                ..Default::default()
            }),
            status: Some(v1::JobStatus {
                job_id: "job-3".into(),
                state: v1::JobState::Running as i32,
                task: TaskKind::Train as i32,
                world_size: 2,
                batch: Some(v1::BatchSizes {
                    train_batch_size: 8,
                    train_micro_batch_size_per_gpu: 4,
                    gradient_accumulation_steps: 1,
                }),
                progress: Some(Progress {
                    global_step: 7,
                    ..Default::default()
                }),
                early_stop: Some(EarlyStopState {
                    max_stop_number: 5,
                    ..Default::default()
                }),
                latest_checkpoint: Some(CheckpointRef {
                    tag: "step-5".into(),
                    run_id: "5eed/job-3".into(),
                    ..Default::default()
                }),
                checkpoints: vec![CheckpointRef {
                    tag: "step-5".into(),
                    run_id: "5eed/job-3".into(),
                    ..Default::default()
                }],
                run_id: "5eed/job-3".into(),
                shrinks: 1,
                message: "all 2 worker(s) registered".into(),
                created_unix_ms: 1,
                started_unix_ms: 2,
                restarts: 1,
                max_restarts: 1,
                output_dir: "out".into(),
                automatic_restarts: 1,
                ..Default::default()
            }),
            resolved_config_json: "{\"world_size\":2}".into(),
        }
    }

    #[test]
    fn a_job_record_reads_back_unchanged() {
        let job = job_from_record(3, record(), "other").unwrap();
        assert_eq!(
            (job.state, job.progress.global_step, job.attempt(), job.shrinks),
            (JobState::Running, 7, 2, 1)
        );
        assert_eq!(
            (job.run_id.as_str(), job.keep_checkpoints, job.stop_cause),
            ("5eed/job-3", 2, None)
        );
        assert_eq!(v1::JobRecord::from(&job), record());
    }

    #[test]
    fn an_older_record_gets_a_run_id_and_its_checkpoint_list() {
        let mut r = record();
        let status = r.status.as_mut().unwrap();
        status.run_id.clear();
        status.checkpoints.clear();
        let job = job_from_record(3, r, "5eed").unwrap();
        assert_eq!(job.run_id, "5eed/job-3");
        assert_eq!(job.checkpoints.len(), 1);
        assert_eq!(v1::JobRecord::from(&job), record());
    }

    #[test]
    fn a_stopping_record_says_why_it_stops() {
        let mut r = record();
        let status = r.status.as_mut().unwrap();
        status.state = v1::JobState::Stopping as i32;
        status.message = "preempted: rank 1: SIGTERM; every rank finishes its step and checkpoints".into();
        status.stop_cause = v1::StopCause::StopPreempted as i32;
        let job = job_from_record(3, r.clone(), "x").unwrap();
        assert_eq!(job.stop_cause, Some(StopCause::Preemption));
        assert_eq!(v1::JobRecord::from(&job), r, "the cause is stored with the job");
        // The cause, not the text, decides: a record without one stops as requested.
        r.status.as_mut().unwrap().stop_cause = v1::StopCause::Unspecified as i32;
        assert_eq!(
            job_from_record(3, r.clone(), "x").unwrap().stop_cause,
            Some(StopCause::Request)
        );
        let status = r.status.as_mut().unwrap();
        status.message = "kill requested: finishing the current step".into();
        status.stop_cause = v1::StopCause::StopRequested as i32;
        assert_eq!(job_from_record(3, r, "x").unwrap().stop_cause, Some(StopCause::Request));
    }

    #[test]
    fn a_damaged_job_record_names_its_key() {
        let mut r = record();
        r.status.as_mut().unwrap().state = 0;
        let err = job_from_record(3, r, "x").unwrap_err().to_string();
        assert!(
            err.contains("job/000000000003") && err.contains("unknown job state 0"),
            "{err}"
        );
        let r = v1::JobRecord { spec: None, ..record() };
        assert!(job_from_record(3, r, "x").unwrap_err().to_string().contains("no spec"));
    }

    #[test]
    fn worker_records_keep_their_failure_kind() {
        let info = v1::WorkerInfo {
            rank: 1,
            state: v1::WorkerState::WorkerFailed as i32,
            failure_kind: v1::FailureKind::BadInput as i32,
            devices: vec!["cpu".into()],
            ..Default::default()
        };
        let worker = Worker::from(info.clone());
        assert_eq!(
            (worker.state, worker.failure_kind),
            (WorkerState::Failed, Some(FailureKind::BadInput))
        );
        assert_eq!(v1::WorkerInfo::from(&worker), info);
        assert_eq!(Worker::from(v1::WorkerInfo::default()).failure_kind, None);
    }

    #[test]
    fn registrations_say_what_work_they_hold() {
        let r = Registration::from(v1::RegisterRequest {
            current_job_id: "job-2".into(),
            current_attempt: 3,
            ..Default::default()
        });
        assert_eq!(r.holds, Some(("job-2".into(), 3)));
        assert_eq!(Registration::from(v1::RegisterRequest::default()).holds, None);
        let report = Report::from(v1::WorkerReport {
            attempt: 4,
            ..Default::default()
        });
        assert_eq!(report.attempt, 4);
    }

    #[test]
    fn reports_without_a_kind_say_so() {
        let report = Report::from(v1::WorkerReport {
            failure: "boom".into(),
            ..Default::default()
        });
        assert_eq!(report.failure.unwrap().kind, None);
        let report = Report::from(v1::WorkerReport {
            failure: "gone".into(),
            failure_kind: v1::FailureKind::PeerLost as i32,
            ..Default::default()
        });
        assert_eq!(report.failure.unwrap().kind, Some(FailureKind::PeerLost));
        assert!(Report::from(v1::WorkerReport::default()).failure.is_none());
    }
}
