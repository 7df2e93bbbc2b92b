//! `worker --rank K --coordinator URL`: register, check the assigned device, heart-beat, obey
//! the coordinator's commands, stop on SIGTERM/SIGINT, and register again when the heartbeat
//! stream breaks. Registering again names the work this process holds: given the same job and
//! attempt back (a coordinator that restarted) it keeps running; given another, the stale work
//! is dropped — stopped, its collectives aborted — before the new assignment starts.

mod held;
mod session;
mod signals;

use crate::cli::DaemonArgs;
use crate::client::CoordinatorClient;
use crate::device::{self, DeviceInfo};
use crate::error::WorkerError;
use crate::work::assigned_device;
use held::{HeldWork, StillRunning};
use kormlm_proto::auth::TokenInterceptor;
use kormlm_proto::secret::{self, SecretError};
use kormlm_proto::tls::{self, ClientTlsArgs};
use kormlm_proto::v1::worker_service_client::WorkerServiceClient;
use kormlm_proto::v1::{Assignment, RegisterRequest};
use kormlm_proto::PROTOCOL_VERSION;
use session::SessionEnd;
use signals::Signals;
pub use signals::StopSignal;
use std::time::{Duration, Instant};
use tch::Device;
use tonic::Code;

/// How long stale work may take to end once its group is aborted before the worker gives up on
/// it and exits (its thread may be inside a step or a checkpoint write; collectives and set-up
/// end at once).
const STALE_WORK_DEADLINE: Duration = Duration::from_secs(30);

/// How long work still held when the daemon leaves may take to finish a write it is in.
const EXIT_DRAIN: Duration = Duration::from_secs(5);

/// After a stop signal, how long held work may take to stop at its next agreed step when the
/// daemon leaves without the coordinator (well inside Slurm's `--signal=B:TERM@120`).
const SIGNAL_STOP_WITHIN: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq)]
pub struct DaemonOptions {
    pub rank: u32,
    pub local_rank: Option<u32>,
    pub coordinator: String,
    pub token: Option<String>,
    /// How to reach an https:// coordinator.
    pub tls: ClientTlsArgs,
    /// Give up when the coordinator stays unreachable this long.
    pub reconnect_timeout: Duration,
    /// The CPU ring's listening address (`--ring-bind`); `None`: the interface towards the
    /// coordinator.
    pub ring_bind: Option<std::net::IpAddr>,
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
    #[error("the token: {0}")]
    Token(#[from] SecretError),
    #[error("the daemon needs --rank K and --coordinator URL (or a subcommand; see `worker --help`)")]
    Usage,
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot install the SIGTERM/SIGINT handlers: {0}")]
    Signals(std::io::Error),
    /// Stale work did not stop: this process leaves, so that a fresh worker can take the rank.
    #[error("{0}; exiting so that a fresh worker can take this rank")]
    StaleWork(#[from] StillRunning),
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
        let token = match args.token_stdin {
            true => Some(secret::read_token_line(
                std::io::stdin().lock(),
                "--token-stdin (stdin)",
            )?),
            false => secret::client_token(args.token.as_deref(), args.token_file.as_deref(), None)?.map(|t| t.token),
        };
        Ok(Self {
            rank,
            local_rank: args.local_rank,
            coordinator,
            token,
            tls: args.tls,
            reconnect_timeout: Duration::from_secs(args.reconnect_timeout_s),
            ring_bind: args.ring_bind,
        })
    }
}

/// How the daemon ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The job ended or the coordinator told this worker to stop.
    Done,
    /// A stop signal came before the work's last report: the work was stopped at a step every
    /// rank agreed on, checkpointed, and reported (PREEMPTED when it stopped early).
    Stopped(StopSignal),
}

impl Outcome {
    /// The process's exit status: 0, or 128 + the signal's number (143 for SIGTERM, 130 for
    /// SIGINT), as if the signal had ended it.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Done => 0,
            Self::Stopped(signal) => signal.exit_code(),
        }
    }
}

/// Ends the process now with `code`, after flushing stdout and stderr, without running exit
/// handlers: libtorch's static destructors must not run under a work thread that was given up
/// on and may still be inside libtorch, and no thread of this process outlives it.
pub fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit ends the process and touches no Rust state; the output was flushed above.
    unsafe { nix::libc::_exit(code) }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// A registration's answer.
#[allow(clippy::large_enum_variant)] // one per registration, matched at once
enum Registration {
    Assigned(CoordinatorClient, Assignment),
    /// A stop signal came while no work was held.
    Stopped(StopSignal),
}

/// How long a registration already sent may still take to answer after a stop signal.
const REGISTRATION_AFTER_SIGNAL: Duration = Duration::from_secs(10);

/// The daemon's state across registrations.
struct Daemon {
    options: DaemonOptions,
    info: DeviceInfo,
    checked_device: Option<Device>,
    /// The work this process holds, from its latest assignment.
    held: Option<HeldWork>,
    signals: Signals,
    /// The stop signal acted on, once one came.
    stopped_by: Option<StopSignal>,
    /// An assignment came before: a later registration rejoins, and a signal then means leave.
    assigned_before: bool,
}

impl Daemon {
    /// Acts on the first stop signal: the held work stops at the next agreed step. Returns
    /// whether there is work to wait for. A signalled worker never registers again (it would
    /// take a rank of an attempt it is about to leave).
    fn on_signal(&mut self, signal: StopSignal) -> bool {
        self.stopped_by = Some(signal);
        match &self.held {
            Some(held) => {
                held.request_stop();
                true
            }
            None => false,
        }
    }

    /// Connects and registers, naming the work held, retrying while the coordinator is
    /// unreachable.
    async fn register(&mut self) -> Result<Registration, DaemonError> {
        let url = tls::normalise_url(&self.options.coordinator);
        let endpoint = tls::endpoint(&url, &self.options.tls).map_err(|e| DaemonError::BadUrl {
            url: url.clone(),
            message: e.to_string(),
        })?;
        let interceptor = TokenInterceptor::new(self.options.token.as_deref()).map_err(|e| DaemonError::BadUrl {
            url: url.clone(),
            message: format!("KORMLM_TOKEN / --token-file: {e}"),
        })?;
        let hint = tls::connect_hint(&url);
        let (current_job_id, current_attempt) = self
            .held
            .as_ref()
            .map_or((String::new(), 0), |h| (h.job_id.clone(), h.attempt));
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            let (options, info) = (&self.options, &self.info);
            let request = RegisterRequest {
                rank: options.rank,
                local_rank: options.local_rank.map_or(-1, |l| l as i32),
                host: hostname(),
                pid: std::process::id(),
                protocol_version: PROTOCOL_VERSION,
                cuda_device_count: info.cuda_device_count,
                torch_version: info.torch_version.to_string(),
                nccl_version: info.nccl_version.unwrap_or(0),
                current_job_id: current_job_id.clone(),
                current_attempt,
            };
            let attempt = async {
                let channel = endpoint
                    .clone()
                    .connect_timeout(Duration::from_secs(5))
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(20))
                    .connect()
                    .await
                    .map_err(|e| tonic::Status::unavailable(format!("{}; {}", tls::error_chain(&e), hint)))?;
                let mut client = WorkerServiceClient::with_interceptor(channel, interceptor.clone());
                let assignment = client.register(request).await?.into_inner();
                Ok::<_, tonic::Status>((client, assignment))
            };
            tokio::pin!(attempt);
            let signalled = self.stopped_by.is_some();
            let signals = &mut self.signals;
            let result = tokio::select! {
                result = &mut attempt => result,
                signal = signals.wait(), if !signalled => {
                    self.on_signal(signal);
                    if self.assigned_before {
                        // A rejoin: the signal (e.g. the coordinator taking down an attempt
                        // that is over) means leave, never take a rank of a new attempt.
                        return Ok(Registration::Stopped(signal));
                    }
                    // The first registration: the coordinator may already have given this
                    // process a rank. Finish it, so that the rank is not abandoned with its
                    // peers waiting for it (the work then stops right after its first step).
                    return Ok(match tokio::time::timeout(REGISTRATION_AFTER_SIGNAL, &mut attempt).await {
                        Ok(Ok((client, assignment))) => Registration::Assigned(client, assignment),
                        _ => Registration::Stopped(signal),
                    });
                }
            };
            match result {
                Ok((client, assignment)) => return Ok(Registration::Assigned(client, assignment)),
                // Connection-level failures (a coordinator going down or coming back mid-call
                // surfaces as Unknown "transport error") are retried; the coordinator's own
                // refusals use other codes.
                Err(status)
                    if matches!(
                        status.code(),
                        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
                    ) =>
                {
                    if started.elapsed() >= self.options.reconnect_timeout {
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
                    // Not retried, but a plaintext worker talking to a TLS coordinator (an h2
                    // protocol error) is told about the URL's scheme.
                    let message = match tls::is_connection_failure(&status) {
                        true => format!("{}; {hint}", status.message()),
                        false => status.message().to_string(),
                    };
                    return Err(DaemonError::Refused {
                        rank: self.options.rank,
                        message,
                    });
                }
            }
        }
    }

    /// Registration, then heartbeat sessions, until the job ends for this rank.
    async fn serve(&mut self) -> Result<Outcome, DaemonError> {
        loop {
            let (mut client, assignment) = match self.register().await? {
                Registration::Assigned(client, assignment) => (client, assignment),
                Registration::Stopped(signal) => return Ok(Outcome::Stopped(signal)),
            };
            self.assigned_before = true;
            let device = assigned_device(&assignment);
            let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
            device::check_visibility(
                &assignment.cuda_devices,
                &assignment.physical_cuda_devices,
                visible.as_deref(),
            )?;
            // A device not checked before registering is checked as the work starts, while the
            // session heart-beats: a slow first CUDA context cannot outlast the worker timeout.
            let unchecked = (self.checked_device != Some(device)).then_some(device);
            self.checked_device = Some(device);
            tracing::info!(
                job_id = %assignment.job_id,
                attempt = assignment.attempt,
                rank = assignment.rank,
                local_rank = assignment.local_rank,
                world_size = assignment.world_size,
                device = ?device,
                physical_gpus = ?assignment.physical_cuda_devices,
                incarnation = assignment.incarnation,
                "registered"
            );
            if let Some(stale) = self.held.take_if(|held| !held.is_for(&assignment)) {
                tracing::warn!(
                    held_job_id = %stale.job_id,
                    held_attempt = stale.attempt,
                    "the job moved on: dropping the stale work before taking the new assignment"
                );
                stale.release(Duration::ZERO, STALE_WORK_DEADLINE).await?;
            }
            if self.held.is_none() {
                let ring_bind = crate::job::RingBind {
                    explicit: self.options.ring_bind,
                    coordinator_url: self.options.coordinator.clone(),
                };
                let held = HeldWork::start(client.clone(), assignment.clone(), ring_bind, unchecked);
                if self.stopped_by.is_some() {
                    // Signalled while registering: the work stops after its first step.
                    held.request_stop();
                }
                self.held = Some(held);
            }
            match self.session(&mut client, &assignment).await? {
                SessionEnd::Done(outcome) => return Ok(outcome),
                SessionEnd::Disconnected(reason) => match self.stopped_by {
                    Some(signal) => {
                        tracing::warn!(%reason, "lost the coordinator after a stop signal; leaving");
                        return Ok(Outcome::Stopped(signal));
                    }
                    None => tracing::warn!(%reason, "lost the coordinator; registering again"),
                },
            }
        }
    }
}

/// Runs the daemon until the job ends for this rank. Work still held when it leaves (aborted,
/// refused, the coordinator unreachable, a stop signal without the coordinator) is released
/// first.
pub async fn run(options: DaemonOptions) -> Result<Outcome, DaemonError> {
    let signals = Signals::install().map_err(DaemonError::Signals)?;
    let info = DeviceInfo::probe();
    tracing::info!(
        rank = options.rank,
        coordinator = %options.coordinator,
        cuda_devices = info.cuda_device_count,
        nccl = ?info.nccl_version,
        "worker starting"
    );
    // CUDA context creation and the first kernels can take seconds on a loaded host: done before
    // registering, they cannot delay the first heartbeat past the coordinator's worker timeout.
    let mut checked_device = None;
    if info.cuda_device_count > 0 {
        let device = tch::Device::Cuda(options.local_rank.unwrap_or(0) as usize);
        match device::check(device) {
            Ok(()) => checked_device = Some(device),
            Err(e) => tracing::warn!(error = %e, "the GPU check before registering failed; the assignment decides"),
        }
    }
    let mut daemon = Daemon {
        options,
        info,
        checked_device,
        held: None,
        signals,
        stopped_by: None,
        assigned_before: false,
    };
    let result = daemon.serve().await;
    if let Some(held) = daemon.held.take() {
        let stop_within = match daemon.stopped_by {
            Some(_) => SIGNAL_STOP_WITHIN,
            None => Duration::ZERO,
        };
        if let Err(e) = held.release(stop_within, EXIT_DRAIN).await {
            tracing::warn!(error = %e, "leaving anyway");
        }
    }
    result
}

/// `worker --rank K --coordinator URL`: runs the daemon on its own async runtime. A task still
/// blocked when it ends (a communicator set-up given up on) is not waited for.
pub fn run_blocking(args: DaemonArgs) -> Result<Outcome, DaemonError> {
    let options = DaemonOptions::from_args(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    let result = runtime.block_on(run(options));
    runtime.shutdown_timeout(Duration::from_millis(500));
    result
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
            token_file: None,
            token_stdin: false,
            tls: Default::default(),
            reconnect_timeout_s: 60,
            ring_bind: None,
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
