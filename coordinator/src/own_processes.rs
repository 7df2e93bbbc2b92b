//! The worker processes this coordinator started, the only ones it ever signals: each is
//! signalled only while it is not reaped, so its pid and process group are still its own. A
//! worker on another host is the launcher process (ssh/pdsh) started here; it is signalled on
//! its host through that launcher while the launcher's connection is up (see [`crate::remote`]).

use crate::remote::RemoteProcess;
use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A worker process this coordinator started. Its waiter reaps it only while holding `reaped`,
/// and signalling holds it too: so while it is not reaped, its pid — and the process group it
/// leads — cannot have been given to any other process.
#[derive(Debug)]
pub struct OwnProcess {
    rank: u32,
    pid: i32,
    reaped: Mutex<bool>,
    /// For a worker on another host: `pid` is its launcher's, this is the worker.
    remote: Option<RemoteProcess>,
}

impl OwnProcess {
    pub fn new(rank: u32, pid: i32) -> Self {
        Self {
            rank,
            pid,
            reaped: Mutex::new(false),
            remote: None,
        }
    }

    /// A worker on another host, whose launcher process (ssh/pdsh) is `pid`.
    pub fn remote(rank: u32, pid: i32, remote: RemoteProcess) -> Self {
        Self {
            remote: Some(remote),
            ..Self::new(rank, pid)
        }
    }

    pub fn remote_process(&self) -> Option<&RemoteProcess> {
        self.remote.as_ref()
    }

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

    /// Sends `signal` to the worker: a local one as [`OwnProcess::signal`] does; a remote one,
    /// while its launcher runs, on its host through the launcher (SIGKILL then also ends the
    /// launcher, in case the host no longer answers). Until the remote shell has named the
    /// worker's pid, the launcher itself is signalled, which ends the connection before the
    /// worker starts. False when nothing was sent.
    pub async fn stop(&self, signal: Signal) -> bool {
        let Some(remote) = &self.remote else {
            return self.signal(signal);
        };
        match remote.pid() {
            Some(pid) if !self.is_reaped() => {
                let sent = remote.signal(pid, signal).await;
                if signal == Signal::SIGKILL {
                    self.signal(signal);
                }
                sent
            }
            _ => self.signal(signal),
        }
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

    pub fn add(&self, job_id: &str, process: Arc<OwnProcess>) {
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

/// SIGTERM to every process of `processes`, then SIGKILL to those not reaped within `grace`
/// (remote workers through their launcher, see [`OwnProcess::stop`]); returns once all are
/// reaped, or `grace` + 5 s have passed (plus up to 20 s a step while a remote host does not
/// answer).
pub async fn take_down(processes: &[Arc<OwnProcess>], grace: Duration) {
    stop_all(processes, Signal::SIGTERM).await;
    let all_reaped = || processes.iter().all(|p| p.is_reaped());
    let deadline = tokio::time::Instant::now() + grace;
    while !all_reaped() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left: Vec<Arc<OwnProcess>> = processes.iter().filter(|p| !p.is_reaped()).cloned().collect();
    for (p, sent) in stop_all(&left, Signal::SIGKILL).await {
        if sent {
            tracing::warn!(
                rank = p.rank,
                pid = p.pid,
                host = p.remote.as_ref().map(|r| r.host.as_str()),
                "worker did not stop after SIGTERM; sent SIGKILL"
            );
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !all_reaped() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`OwnProcess::stop`] with `signal` for every process at once (a remote one waits on its
/// connection); which were sent.
async fn stop_all(processes: &[Arc<OwnProcess>], signal: Signal) -> Vec<(Arc<OwnProcess>, bool)> {
    let mut set = tokio::task::JoinSet::new();
    for p in processes {
        let p = p.clone();
        set.spawn(async move {
            let sent = p.stop(signal).await;
            (p, sent)
        });
    }
    set.join_all().await
}

/// Waits for `child` to exit without reaping it, then reaps it under its lock. Returns its exit
/// status as text, and whether it exited cleanly (status 0).
pub fn reap(process: &OwnProcess, mut child: std::process::Child) -> (String, bool) {
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
        Ok(s) => (s.to_string(), s.success()),
        Err(e) => (format!("unknown exit ({e})"), false),
    }
}
