//! Starts local worker processes, each in its own process group, and takes them down again.

use crate::error::{CoordinatorError, Result};
use crate::state::Coordinator;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// One worker process to start.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    pub rank: u32,
    pub local_rank: u32,
    /// The GPUs this worker sees (its host's selection, as `deepspeed` sets them); `None` keeps
    /// the coordinator's environment (CPU workers).
    pub cuda_visible_devices: Option<String>,
}

/// Worker processes started by this coordinator.
pub struct LocalWorkers {
    pids: Vec<(u32, i32)>,
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
            pids: Vec::new(),
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
            if let Some(devices) = &slot.cuda_visible_devices {
                command.env("CUDA_VISIBLE_DEVICES", devices);
            }
            let child = tokio::process::Command::from(command)
                .spawn()
                .map_err(|e| spawn_err(e.to_string()))?;
            let pid = child.id().unwrap_or(0) as i32;
            tracing::info!(rank = slot.rank, pid, log = %log_path.display(), "started worker");
            workers.pids.push((slot.rank, pid));
            let coordinator = coordinator.clone();
            let job_id = job_id.to_string();
            let rank = slot.rank;
            let mut child = child;
            workers.waiters.push(tokio::spawn(async move {
                let status = child.wait().await;
                let text = match status {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("unknown exit ({e})"),
                };
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
    /// there after `grace`; returns once every process is reaped (at most `grace` + 5 s). A
    /// worker already reaped is not signalled: its group id may belong to someone else by now.
    pub async fn terminate(self, grace: Duration) {
        let running: Vec<(u32, i32)> = self
            .pids
            .iter()
            .zip(&self.waiters)
            .filter(|(_, waiter)| !waiter.is_finished())
            .map(|(pid, _)| *pid)
            .collect();
        for (_, pid) in &running {
            let _ = killpg(Pid::from_raw(*pid), Signal::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        for waiter in &self.waiters {
            while !waiter.is_finished() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        for ((rank, pid), waiter) in self.pids.iter().zip(&self.waiters) {
            if !waiter.is_finished() && killpg(Pid::from_raw(*pid), Signal::SIGKILL).is_ok() {
                tracing::warn!(rank, pid, "worker did not stop after SIGTERM; sent SIGKILL");
            }
        }
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
        self.pids.clear();
    }
}

/// `--force`: SIGTERM to each local worker's process group (or the process itself when it
/// leads none), then SIGKILL to whatever is left after a grace period.
pub async fn force_stop(workers: Vec<(String, u32)>) {
    let local: Vec<i32> = workers
        .into_iter()
        .filter(|(host, pid)| *pid > 0 && (crate::launch_plan::is_local(host)))
        .map(|(_, pid)| pid as i32)
        .collect();
    let signal_all = |signal: Signal| {
        for pid in &local {
            if killpg(Pid::from_raw(*pid), signal).is_err() {
                let _ = nix::sys::signal::kill(Pid::from_raw(*pid), signal);
            }
        }
    };
    signal_all(Signal::SIGTERM);
    tokio::time::sleep(Duration::from_secs(5)).await;
    signal_all(Signal::SIGKILL);
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
