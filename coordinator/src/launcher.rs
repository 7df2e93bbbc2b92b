//! Starts local worker processes, each in its own process group, and takes them down again.
//! Signals go only to processes started here, and only while they are not reaped: a pid a
//! worker reports about itself is never signalled (see [`OwnProcess`]).

use crate::error::{CoordinatorError, Result};
use crate::state::Coordinator;
use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// After `kill --force`: how long the workers this coordinator started get between SIGTERM and
/// SIGKILL.
const FORCE_GRACE: Duration = Duration::from_secs(5);
/// After `kill --force`: how long any worker gets to exit before it is reported as still there.
pub const TERMINATE_DEADLINE: Duration = Duration::from_secs(10);

/// A worker process this coordinator started. Its waiter reaps it only while holding `reaped`,
/// and signalling holds it too: so while it is not reaped, its pid — and the process group it
/// leads — cannot have been given to any other process.
#[derive(Debug)]
pub struct OwnProcess {
    rank: u32,
    pid: i32,
    reaped: Mutex<bool>,
}

impl OwnProcess {
    fn reaped(&self) -> std::sync::MutexGuard<'_, bool> {
        self.reaped.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn is_reaped(&self) -> bool {
        *self.reaped()
    }

    /// Sends `signal` to the process group it leads (to the process alone when it left the
    /// group); false when it has been reaped and nothing was sent.
    pub fn signal(&self, signal: Signal) -> bool {
        let reaped = self.reaped();
        if *reaped || self.pid <= 1 {
            return false;
        }
        let pid = Pid::from_raw(self.pid);
        killpg(pid, signal).or_else(|_| kill(pid, signal)).is_ok()
    }
}

/// Every worker process this coordinator started that is not reaped yet, by job: the only
/// processes `kill --force` signals.
#[derive(Debug, Default)]
pub struct OwnProcesses {
    processes: Mutex<Vec<(String, Arc<OwnProcess>)>>,
}

impl OwnProcesses {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Arc<OwnProcess>)>> {
        self.processes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn add(&self, job_id: &str, process: Arc<OwnProcess>) {
        let mut processes = self.lock();
        processes.retain(|(_, p)| !p.is_reaped());
        processes.push((job_id.to_string(), process));
    }

    /// The job's processes still running (or not yet reaped).
    pub fn of_job(&self, job_id: &str) -> Vec<Arc<OwnProcess>> {
        self.lock()
            .iter()
            .filter(|(job, p)| job == job_id && !p.is_reaped())
            .map(|(_, p)| p.clone())
            .collect()
    }
}

/// SIGTERM to every process of `processes`, then SIGKILL to those not reaped within `grace`;
/// returns once all are reaped, or `grace` + 5 s have passed.
async fn take_down(processes: &[Arc<OwnProcess>], grace: Duration) {
    for p in processes {
        p.signal(Signal::SIGTERM);
    }
    let all_reaped = || processes.iter().all(|p| p.is_reaped());
    let deadline = tokio::time::Instant::now() + grace;
    while !all_reaped() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for p in processes {
        if p.signal(Signal::SIGKILL) {
            tracing::warn!(
                rank = p.rank,
                pid = p.pid,
                "worker did not stop after SIGTERM; sent SIGKILL"
            );
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !all_reaped() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for `child` to exit without reaping it, then reaps it under its lock.
fn reap(process: &OwnProcess, mut child: std::process::Child) -> String {
    loop {
        match waitid(
            Id::Pid(Pid::from_raw(process.pid)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        ) {
            Ok(_) => break,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!(pid = process.pid, error = %e, "cannot wait for a worker's exit; reaping it");
                break;
            }
        }
    }
    let mut reaped = process.reaped();
    let status = child.wait();
    *reaped = true;
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("unknown exit ({e})"),
    }
}

/// One worker process to start.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    pub rank: u32,
    pub local_rank: u32,
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
            if let Some(n) = threads {
                command.env("OMP_NUM_THREADS", n.to_string());
            }
            let child = command.spawn().map_err(|e| spawn_err(e.to_string()))?;
            let pid = child.id() as i32;
            tracing::info!(rank = slot.rank, pid, log = %log_path.display(), "started worker");
            let process = Arc::new(OwnProcess {
                rank: slot.rank,
                pid,
                reaped: Mutex::new(false),
            });
            coordinator.own_processes().add(job_id, process.clone());
            workers.processes.push(process.clone());
            let coordinator = coordinator.clone();
            let job_id = job_id.to_string();
            let rank = slot.rank;
            workers.waiters.push(tokio::task::spawn_blocking(move || {
                let text = reap(&process, child);
                tracing::info!(rank, pid, status = %text, "worker process exited");
                coordinator.process_exited(
                    &job_id,
                    attempt,
                    rank,
                    pid as u32,
                    &format!("worker process {pid} {text}; see {}", log_path.display()),
                );
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
