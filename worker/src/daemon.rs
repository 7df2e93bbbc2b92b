//! `worker --rank K --coordinator URL`: register, check the assigned device, heart-beat, obey
//! the coordinator's commands, and re-register when the coordinator comes back after a crash.

use crate::cli::DaemonArgs;
use crate::device::{self, DeviceInfo};
use crate::error::WorkerError;
use crate::job;
use crate::train::ProgressEvent;
use crate::work::{assigned_device, Work, WorkOutcome};
use kormlm_proto::auth::TokenInterceptor;
use kormlm_proto::v1::worker_service_client::WorkerServiceClient;
use kormlm_proto::v1::{Assignment, CheckpointRef, CommandKind, RegisterRequest, WorkerReport};
use kormlm_proto::{now_ms, PROTOCOL_VERSION};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

/// The worker's client of the coordinator; every call carries the token in its metadata.
pub type CoordinatorClient = WorkerServiceClient<InterceptedService<Channel, TokenInterceptor>>;

#[derive(Debug, Clone, PartialEq)]
pub struct DaemonOptions {
    pub rank: u32,
    pub local_rank: Option<u32>,
    pub coordinator: String,
    pub token: Option<String>,
    /// Give up when the coordinator stays unreachable this long.
    pub reconnect_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("coordinator {url} unreachable for {waited_s} s: {message}")]
    Unreachable {
        url: String,
        waited_s: u64,
        message: String,
    },
    #[error("registration of rank {rank} refused: {message}")]
    Refused { rank: u32, message: String },
    #[error(transparent)]
    Device(#[from] device::DeviceError),
    #[error("job aborted by the coordinator: {0}")]
    Aborted(String),
    #[error("--coordinator {url}: {message}")]
    BadUrl { url: String, message: String },
    #[error("the daemon needs --rank K and --coordinator URL (or a subcommand; see `worker --help`)")]
    Usage,
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// The assigned work failed to start or failed while running.
    #[error(transparent)]
    Work(#[from] WorkerError),
}

impl DaemonOptions {
    /// The daemon's options from its flags; the rank and the coordinator are required.
    pub fn from_args(args: DaemonArgs) -> Result<Self, DaemonError> {
        let (Some(rank), Some(coordinator)) = (args.rank, args.coordinator) else {
            return Err(DaemonError::Usage);
        };
        Ok(Self {
            rank,
            local_rank: args.local_rank,
            coordinator,
            token: args.token,
            reconnect_timeout: Duration::from_secs(args.reconnect_timeout_s),
        })
    }
}

/// How the daemon ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The job ended or the coordinator told this worker to stop.
    Done,
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

fn normalise_url(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

/// Connects and registers, retrying while the coordinator is unreachable.
async fn register(options: &DaemonOptions, info: &DeviceInfo) -> Result<(CoordinatorClient, Assignment), DaemonError> {
    let url = normalise_url(&options.coordinator);
    let endpoint = Channel::from_shared(url.clone()).map_err(|e| DaemonError::BadUrl {
        url: url.clone(),
        message: e.to_string(),
    })?;
    let interceptor = TokenInterceptor::new(options.token.as_deref()).map_err(|e| DaemonError::BadUrl {
        url: url.clone(),
        message: format!("--token / KORMLM_TOKEN: {e}"),
    })?;
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        let attempt = async {
            let channel = endpoint
                .clone()
                .connect_timeout(Duration::from_secs(5))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(20))
                .connect()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let mut client = WorkerServiceClient::with_interceptor(channel, interceptor.clone());
            let assignment = client
                .register(RegisterRequest {
                    rank: options.rank,
                    local_rank: options.local_rank.map_or(-1, |l| l as i32),
                    host: hostname(),
                    pid: std::process::id(),
                    protocol_version: PROTOCOL_VERSION,
                    cuda_device_count: info.cuda_device_count,
                    torch_version: info.torch_version.to_string(),
                    nccl_version: info.nccl_version.unwrap_or(0),
                    // Filled in by the stale-rejoin handling (issue #13).
                    current_job_id: String::new(),
                    current_attempt: 0,
                })
                .await?
                .into_inner();
            Ok::<_, tonic::Status>((client, assignment))
        };
        match attempt.await {
            Ok(result) => return Ok(result),
            // Connection-level failures (a coordinator going down or coming back mid-call
            // surfaces as Unknown "transport error") are retried; the coordinator's own refusals
            // use other codes.
            Err(status)
                if matches!(
                    status.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
                ) =>
            {
                if started.elapsed() >= options.reconnect_timeout {
                    return Err(DaemonError::Unreachable {
                        url,
                        waited_s: started.elapsed().as_secs(),
                        message: status.message().to_string(),
                    });
                }
                tracing::debug!(error = status.message(), "coordinator not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(status) => {
                return Err(DaemonError::Refused {
                    rank: options.rank,
                    message: status.message().to_string(),
                })
            }
        }
    }
}

/// Why one heartbeat session ended.
enum SessionEnd {
    /// The coordinator went away; register again.
    Disconnected(String),
    Finished,
}

/// How the work ended: its outcome, or why it failed.
type Finished = Result<WorkOutcome, WorkerError>;

/// Work running on its own thread while the daemon heart-beats.
struct RunningWork {
    progress: tokio::sync::watch::Receiver<Option<ProgressEvent>>,
    /// Resolves once, when the work ends.
    done: tokio::sync::oneshot::Receiver<Finished>,
    stop: Arc<AtomicBool>,
}

fn checkpoint_ref((path, step): &(String, u64), assignment: &Assignment, val_loss: Option<f64>) -> CheckpointRef {
    CheckpointRef {
        tag: format!("step-{step}"),
        path: path.clone(),
        global_step: *step,
        world_size: assignment.world_size,
        val_loss,
        created_unix_ms: now_ms(),
        run_id: assignment.run_id.clone(),
        attempt: assignment.attempt,
    }
}

async fn heartbeat_session(
    client: &mut CoordinatorClient,
    assignment: &Assignment,
    work: &mut Option<RunningWork>,
    starting: &mut Option<tokio::task::JoinHandle<Result<RunningWork, WorkerError>>>,
) -> Result<SessionEnd, DaemonError> {
    let interval = Duration::from_millis(u64::from(assignment.heartbeat_interval_ms.max(10)));
    let (tx, rx) = tokio::sync::mpsc::channel::<WorkerReport>(8);
    let report = |work: &Option<RunningWork>, finished: bool, failure: Option<&WorkerError>| {
        let event = work.as_ref().and_then(|w| w.progress.borrow().clone());
        let (progress, early_stop) = match &event {
            Some(e) => {
                let (p, s) = e.to_proto();
                (Some(p), Some(s))
            }
            None => (None, None),
        };
        WorkerReport {
            job_id: assignment.job_id.clone(),
            rank: assignment.rank,
            incarnation: assignment.incarnation,
            attempt: assignment.attempt,
            sent_unix_ms: now_ms(),
            progress,
            optimizer_state_bytes: event.as_ref().map_or(0, |e| e.optimizer_state_bytes),
            finished,
            failure: failure.map(ToString::to_string).unwrap_or_default(),
            failure_kind: failure.map_or(0, |e| e.kind().to_wire() as i32),
            early_stop,
            checkpoint: event
                .as_ref()
                .and_then(|e| e.checkpoint.as_ref())
                .map(|c| checkpoint_ref(c, assignment, None)),
            best_checkpoint: event.as_ref().and_then(|e| {
                e.best_checkpoint
                    .as_ref()
                    .map(|c| checkpoint_ref(c, assignment, e.best_val_loss))
            }),
        }
    };
    tx.send(report(work, false, None)).await.expect("the channel is open");
    let mut commands = match client.heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Ok(SessionEnd::Disconnected(status.message().to_string())),
    };
    let mut tick = tokio::time::interval(interval);
    let mut stop_when_started = false;
    loop {
        let finished = async {
            match work.as_mut() {
                Some(w) => (&mut w.done).await,
                None => std::future::pending().await,
            }
        };
        let started = async {
            match starting.as_mut() {
                Some(handle) => handle.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            joined = started => {
                *starting = None;
                match joined.map_err(WorkerError::StartUp).and_then(|r| r) {
                    Ok(w) => {
                        if stop_when_started {
                            w.stop.store(true, Ordering::SeqCst);
                        }
                        *work = Some(w);
                    }
                    Err(e) => {
                        // Tell the coordinator why, then give up.
                        let _ = tx.send(report(work, false, Some(&e))).await;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        return Err(e.into());
                    }
                }
            }
            _ = tick.tick() => {
                if tx.send(report(work, false, None)).await.is_err() {
                    return Ok(SessionEnd::Disconnected("heartbeat stream closed".into()));
                }
            }
            outcome = finished => {
                // The work thread sends before it ends, panics included; a closed channel is a bug.
                let outcome = outcome
                    .unwrap_or_else(|_| Err(WorkerError::Panicked("the work thread ended without a result".into())));
                match outcome {
                    Ok(outcome) => {
                        tracing::info!(summary = %outcome, "work finished");
                        let _ = tx.send(report(work, true, None)).await;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        return Ok(SessionEnd::Finished);
                    }
                    Err(e) => {
                        let _ = tx.send(report(work, false, Some(&e))).await;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        return Err(e.into());
                    }
                }
            }
            command = commands.message() => match command {
                Ok(Some(command)) => match CommandKind::try_from(command.kind) {
                    Ok(CommandKind::StopAfterStep) => {
                        tracing::info!(reason = %command.reason, "stopping after the current step");
                        match work {
                            Some(w) => w.stop.store(true, Ordering::SeqCst),
                            // Still starting: the work stops after its first step, together with
                            // its peers, instead of leaving them alone in a collective.
                            None if starting.is_some() => stop_when_started = true,
                            None => {
                                let _ = tx.send(report(work, true, None)).await;
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                return Ok(SessionEnd::Finished);
                            }
                        }
                    }
                    Ok(CommandKind::Shutdown) => {
                        tracing::info!(reason = %command.reason, "shutting down on the coordinator's request");
                        let _ = tx.send(report(work, true, None)).await;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        return Ok(SessionEnd::Finished);
                    }
                    Ok(CommandKind::Abort) => return Err(DaemonError::Aborted(command.reason)),
                    _ => {}
                },
                Ok(None) => return Ok(SessionEnd::Disconnected("the coordinator closed the stream".into())),
                Err(status) => return Ok(SessionEnd::Disconnected(status.message().to_string())),
            }
        }
    }
}

/// Runs `run` on a new thread named `name`; its outcome (a panic as an error) goes to `done`.
fn spawn_work_thread(
    name: &str,
    run: impl FnOnce() -> Result<WorkOutcome, WorkerError> + Send + 'static,
    done: tokio::sync::oneshot::Sender<Finished>,
) -> Result<(), WorkerError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
                .unwrap_or_else(|payload| Err(WorkerError::from_panic(payload.as_ref())));
            if let Err(e) = &outcome {
                tracing::error!(error = %e, kind = %e.kind(), "work failed");
            }
            let _ = done.send(outcome);
        })
        .map(drop)
        .map_err(WorkerError::Thread)
}

/// Decodes the assignment and starts its work on its own thread: training (after forming the
/// collective group) or this rank's chunks of an augmentation.
async fn start_work(
    client: &mut CoordinatorClient,
    assignment: &Assignment,
    coordinator_url: &str,
) -> Result<RunningWork, WorkerError> {
    let (progress_tx, progress) = tokio::sync::watch::channel(None);
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = stop.clone();
    match Work::from_assignment(assignment)? {
        Work::Train(job) => {
            let group = job::form_group(client, assignment, job.device, coordinator_url).await?;
            let run = move || {
                job::run_training(&job, group, progress_tx, thread_stop)
                    .map(WorkOutcome::Train)
                    .map_err(WorkerError::from)
            };
            spawn_work_thread("train", run, done_tx)?;
        }
        Work::Augment(job) => {
            let ranks = (assignment.rank as usize, assignment.world_size as usize);
            let run = move || job::run_augmentation(&job, ranks, progress_tx, thread_stop).map(WorkOutcome::Augment);
            spawn_work_thread("augment", run, done_tx)?;
        }
    }
    Ok(RunningWork { progress, done, stop })
}

/// Runs the daemon until the job ends for this rank.
pub async fn run(options: DaemonOptions) -> Result<Outcome, DaemonError> {
    let info = DeviceInfo::probe();
    tracing::info!(
        rank = options.rank,
        coordinator = %options.coordinator,
        cuda_devices = info.cuda_device_count,
        nccl = ?info.nccl_version,
        "worker starting"
    );
    let mut checked_device = None;
    let mut work: Option<RunningWork> = None;
    let mut starting: Option<tokio::task::JoinHandle<Result<RunningWork, WorkerError>>> = None;
    loop {
        let (mut client, assignment) = register(&options, &info).await?;
        let device = assigned_device(&assignment);
        if checked_device != Some(device) {
            device::check(device)?;
            checked_device = Some(device);
        }
        tracing::info!(
            job_id = %assignment.job_id,
            rank = assignment.rank,
            local_rank = assignment.local_rank,
            world_size = assignment.world_size,
            device = ?device,
            incarnation = assignment.incarnation,
            "registered"
        );
        if work.is_none() && starting.is_none() {
            let (client, assignment, url) = (client.clone(), assignment.clone(), options.coordinator.clone());
            starting = Some(tokio::spawn(async move {
                let mut client = client;
                start_work(&mut client, &assignment, &url).await
            }));
        }
        match heartbeat_session(&mut client, &assignment, &mut work, &mut starting).await? {
            SessionEnd::Finished => return Ok(Outcome::Done),
            SessionEnd::Disconnected(reason) => {
                tracing::warn!(%reason, "lost the coordinator; registering again");
            }
        }
    }
}

/// `worker --rank K --coordinator URL`: runs the daemon on its own async runtime.
pub fn run_blocking(args: DaemonArgs) -> Result<Outcome, DaemonError> {
    let options = DaemonOptions::from_args(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(run(options))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemon_needs_a_rank_and_a_coordinator() {
        let args = |rank: Option<u32>, coordinator: Option<&str>| DaemonArgs {
            rank,
            local_rank: Some(1),
            coordinator: coordinator.map(str::to_string),
            token: None,
            reconnect_timeout_s: 60,
        };
        let options = DaemonOptions::from_args(args(Some(2), Some("http://c:1"))).unwrap();
        assert_eq!((options.rank, options.local_rank), (2, Some(1)));
        assert_eq!(options.reconnect_timeout, Duration::from_secs(60));
        assert!(matches!(
            DaemonOptions::from_args(args(Some(2), None)),
            Err(DaemonError::Usage)
        ));
        assert!(matches!(
            DaemonOptions::from_args(args(None, Some("http://c:1"))),
            Err(DaemonError::Usage)
        ));
    }
}
