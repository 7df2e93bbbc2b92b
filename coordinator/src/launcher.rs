//! Starts local worker processes, each in its own process group, and takes them down again.
//! Signals go only to processes started here, and only while they are not reaped: a pid a
//! worker reports about itself is never signalled (see [`crate::own_processes`]).

use crate::error::{CoordinatorError, Result};
use crate::own_processes::{reap, take_down, OwnProcess};
use crate::state::Coordinator;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// After `kill --force`: how long the workers this coordinator started get between SIGTERM and
/// SIGKILL.
const FORCE_GRACE: Duration = Duration::from_secs(5);
/// After `kill --force`: how long any worker gets to exit before it is reported as still there.
pub const TERMINATE_DEADLINE: Duration = Duration::from_secs(10);

/// One worker process to start.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    pub rank: u32,
    pub local_rank: u32,
    /// The GPUs this worker sees (its host's selection, as `deepspeed` sets them); `None` keeps
    /// the coordinator's environment (CPU workers).
    pub cuda_visible_devices: Option<String>,
}

/// Worker processes started by this coordinator for one attempt of a job.
pub struct LocalWorkers {
    processes: Vec<Arc<OwnProcess>>,
    waiters: Vec<tokio::task::JoinHandle<()>>,
}

/// The `worker` binary next to the running `coordinator`, unless overridden.
pub fn default_worker_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("worker")))
        .unwrap_or_else(|| PathBuf::from("worker"))
}

/// How long a worker's clean exit waits before it counts, for its last report to arrive first.
const CLEAN_EXIT_GRACE: Duration = Duration::from_secs(2);

impl LocalWorkers {
    /// Starts `worker --rank K --local_rank L --coordinator URL` for every slot. Output goes to
    /// `log_dir/rank-K.log`. When a process exits, the coordinator hears of it at once.
    pub fn spawn(
        coordinator: Arc<Coordinator>,
        job_id: &str,
        attempt: u32,
        worker_binary: &Path,
        coordinator_url: &str,
        slots: &[Slot],
        log_dir: &Path,
    ) -> Result<Self> {
        std::fs::create_dir_all(log_dir).map_err(|e| CoordinatorError::Spawn {
            what: format!("logs in {}", log_dir.display()),
            message: e.to_string(),
        })?;
        let mut workers = LocalWorkers {
            processes: Vec::new(),
            waiters: Vec::new(),
        };
        let threads = threads_per_worker(slots.len());
        if let Some(n) = threads {
            tracing::info!(
                threads = n,
                workers = slots.len(),
                "OMP_NUM_THREADS={n} for each worker (set OMP_NUM_THREADS to choose)"
            );
        }
        for slot in slots {
            let log_path = log_dir.join(format!("rank-{}.log", slot.rank));
            let spawn_err = |message: String| CoordinatorError::Spawn {
                what: format!("rank {} ({})", slot.rank, worker_binary.display()),
                message,
            };
            let log =
                std::fs::File::create(&log_path).map_err(|e| spawn_err(format!("{}: {e}", log_path.display())))?;
            let log_err = log.try_clone().map_err(|e| spawn_err(e.to_string()))?;
            let mut command = std::process::Command::new(worker_binary);
            command
                .arg("--rank")
                .arg(slot.rank.to_string())
                .arg("--local_rank")
                .arg(slot.local_rank.to_string())
                .arg("--coordinator")
                .arg(coordinator_url)
                .stdin(std::process::Stdio::null())
                .stdout(log)
                .stderr(log_err)
                .process_group(0);
            if let Some(token) = &coordinator.settings().token {
                command.env("KORMLM_TOKEN", token);
            }
            if let Some(ca) = &coordinator.settings().worker_tls_ca {
                command.env("KORMLM_TLS_CA", ca);
            }
            if let Some(n) = threads {
                command.env("OMP_NUM_THREADS", n.to_string());
            }
            if let Some(devices) = &slot.cuda_visible_devices {
                command.env("CUDA_VISIBLE_DEVICES", devices);
            }
            let child = command.spawn().map_err(|e| spawn_err(e.to_string()))?;
            let pid = child.id() as i32;
            tracing::info!(rank = slot.rank, pid, log = %log_path.display(), "started worker");
            let process = Arc::new(OwnProcess::new(slot.rank, pid));
            coordinator.own_processes().add(job_id, process.clone());
            workers.processes.push(process.clone());
            let coordinator = coordinator.clone();
            let job_id = job_id.to_string();
            let rank = slot.rank;
            workers.waiters.push(tokio::task::spawn_blocking(move || {
                let (text, clean) = reap(&process, child);
                tracing::info!(rank, pid, status = %text, "worker process exited");
                let description = format!("worker process {pid} {text}; see {}", log_path.display());
                let exited = move || coordinator.process_exited(&job_id, attempt, rank, pid as u32, &description);
                if clean {
                    // A clean exit follows the worker's last report, which may still wait unread
                    // in its heartbeat stream (a coordinator that was frozen or busy): let the
                    // report land first, so a finished worker is not taken for a lost one. The
                    // waiter itself ends now: the process is reaped.
                    tokio::spawn(async move {
                        tokio::time::sleep(CLEAN_EXIT_GRACE).await;
                        exited();
                    });
                } else {
                    exited();
                }
            }));
        }
        Ok(workers)
    }

    /// SIGTERM to the process group of every worker still running, then SIGKILL to those still
    /// there after `grace`; returns once every process is reaped (at most `grace` + 5 s) and
    /// its exit recorded.
    pub async fn terminate(self, grace: Duration) {
        take_down(&self.processes, grace).await;
        for waiter in self.waiters {
            let _ = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        }
    }

    /// Waits until every worker process has exited.
    pub async fn wait_all(&mut self) {
        for waiter in &mut self.waiters {
            let _ = waiter.await;
        }
        self.waiters.clear();
        self.processes.clear();
    }
}

/// `kill --force` of `job_id`, after the job was ended and its workers ordered to terminate:
/// SIGTERM, then SIGKILL after [`FORCE_GRACE`], to the process groups of the job's workers this
/// coordinator started — never to a pid a worker reported. Workers still there after
/// [`TERMINATE_DEADLINE`] (those started elsewhere, which only the order can end) are reported.
pub async fn force_stop(coordinator: Arc<Coordinator>, job_id: String) {
    let started = tokio::time::Instant::now();
    let own = coordinator.own_processes().of_job(&job_id);
    take_down(&own, FORCE_GRACE).await;
    tokio::time::sleep_until(started + TERMINATE_DEADLINE).await;
    coordinator.report_lingering(&job_id, TERMINATE_DEADLINE);
}

/// The intra-op threads each of `workers` local processes gets: this machine's cores shared out,
/// as torchrun does, because libtorch's default (every core, in every process) oversubscribes
/// the CPU and its spinning threads slow CPU training down many times. `None` when the user
/// set `OMP_NUM_THREADS` (it is inherited unchanged).
pub fn threads_per_worker(workers: usize) -> Option<usize> {
    if std::env::var_os("OMP_NUM_THREADS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((cores / workers.max(1)).max(1))
}
