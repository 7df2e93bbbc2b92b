//! Starts worker processes, each in its own process group — on this host, or on another host of
//! the hostfile through its launcher (ssh/pdsh, see [`crate::remote`]) — and takes them down
//! again. Signals go only to processes started here, and only while they are not reaped: a pid
//! a worker reports about itself is never signalled (see [`crate::own_processes`]).

use crate::error::{CoordinatorError, Result};
use crate::own_processes::{reap, take_down, OwnProcess};
use crate::remote::{self, RemoteLaunch, RemoteProcess};
use crate::state::Coordinator;
use std::io::{BufRead, Write};
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
    /// Another host of the hostfile, where the launcher starts it; `None`: this host.
    pub host: Option<String>,
    /// How many workers its host runs (they share its cores).
    pub host_slots: usize,
}

/// How this coordinator starts its workers.
#[derive(Debug, Clone)]
pub struct Launch {
    pub worker_binary: PathBuf,
    /// The URL the workers on this host reach the coordinator on.
    pub local_url: String,
    /// How workers on other hosts are started (`None`: they are not started here).
    pub remote: Option<RemoteLaunch>,
}

/// Worker processes started by this coordinator for one attempt of a job: on this host, and
/// the launcher processes of those on other hosts.
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

/// How long the exit of a remote worker waits for the last of its launcher's output (which
/// names the worker's pid).
const OUTPUT_GRACE: Duration = Duration::from_secs(5);

/// A started process and what its waiter needs.
struct Started {
    child: std::process::Child,
    process: Arc<OwnProcess>,
    /// Ends when the launcher's output is read to the end (remote workers).
    output_done: Option<std::sync::mpsc::Receiver<()>>,
}

impl LocalWorkers {
    /// Starts `worker --rank K --local_rank L --coordinator URL` for every slot: here, or on
    /// its host through the launcher. Output goes to `log_dir/rank-K.log`. When a process (or a
    /// remote worker's launcher) exits, the coordinator hears of it at once.
    pub fn spawn(
        coordinator: Arc<Coordinator>,
        job_id: &str,
        attempt: u32,
        launch: &Launch,
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
        let here = slots.iter().filter(|s| s.host.is_none()).count();
        let threads = threads_per_worker(here);
        if let Some(n) = threads.filter(|_| here > 0) {
            tracing::info!(
                threads = n,
                workers = here,
                "OMP_NUM_THREADS={n} for each worker (set OMP_NUM_THREADS to choose)"
            );
        }
        for slot in slots {
            let log_path = log_dir.join(format!("rank-{}.log", slot.rank));
            let spawn_err = |message: String| CoordinatorError::Spawn {
                what: format!("rank {} ({})", slot.rank, launch.worker_binary.display()),
                message,
            };
            let log =
                std::fs::File::create(&log_path).map_err(|e| spawn_err(format!("{}: {e}", log_path.display())))?;
            let started = match (&slot.host, &launch.remote) {
                (Some(host), Some(remote)) => spawn_remote(&coordinator, remote, launch, slot, host, log)?,
                _ => spawn_here(&coordinator, launch, slot, threads, log)?,
            };
            let Started {
                child,
                process,
                output_done,
            } = started;
            let pid = child.id() as i32;
            match &slot.host {
                Some(host) => {
                    tracing::info!(rank = slot.rank, host, launcher_pid = pid, log = %log_path.display(), "started worker on {host}")
                }
                None => tracing::info!(rank = slot.rank, pid, log = %log_path.display(), "started worker"),
            }
            coordinator.own_processes().add(job_id, process.clone());
            workers.processes.push(process.clone());
            let coordinator = coordinator.clone();
            let job_id = job_id.to_string();
            let rank = slot.rank;
            workers.waiters.push(tokio::task::spawn_blocking(move || {
                let (text, clean) = reap(&process, child);
                if let Some(done) = output_done {
                    let _ = done.recv_timeout(OUTPUT_GRACE);
                }
                let (worker_pid, description) = match process.remote_process() {
                    Some(remote) => {
                        let via = remote.shell.via.name();
                        let worker = remote.pid().map_or("unknown".to_string(), |p| p.to_string());
                        tracing::info!(rank, host = %remote.host, pid = %worker, launcher_pid = pid, status = %text, "remote worker exited ({via} ended)");
                        (
                            remote.pid().unwrap_or(pid as u32),
                            format!(
                                "worker process {worker} on {} {text} ({via} ended); see {}",
                                remote.host,
                                log_path.display()
                            ),
                        )
                    }
                    None => {
                        tracing::info!(rank, pid, status = %text, "worker process exited");
                        (pid as u32, format!("worker process {pid} {text}; see {}", log_path.display()))
                    }
                };
                let exited = move || coordinator.process_exited(&job_id, attempt, rank, worker_pid, &description);
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

fn worker_args(slot: &Slot, url: &str) -> Vec<String> {
    vec![
        "--rank".into(),
        slot.rank.to_string(),
        "--local_rank".into(),
        slot.local_rank.to_string(),
        "--coordinator".into(),
        url.into(),
    ]
}

/// A worker on this host, with the token in its environment.
fn spawn_here(
    coordinator: &Coordinator,
    launch: &Launch,
    slot: &Slot,
    threads: Option<usize>,
    log: std::fs::File,
) -> Result<Started> {
    let spawn_err = |message: String| CoordinatorError::Spawn {
        what: format!("rank {} ({})", slot.rank, launch.worker_binary.display()),
        message,
    };
    let log_err = log.try_clone().map_err(|e| spawn_err(e.to_string()))?;
    let mut command = std::process::Command::new(&launch.worker_binary);
    command
        .args(worker_args(slot, &launch.local_url))
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
    let process = Arc::new(OwnProcess::new(slot.rank, child.id() as i32));
    Ok(Started {
        child,
        process,
        output_done: None,
    })
}

/// A worker on `host`, through the launcher: the token goes to the session's stdin (ssh) or the
/// worker reads the shared 0600 token file (pdsh); the launcher's output goes to the log, and
/// its first line names the worker's pid there.
fn spawn_remote(
    coordinator: &Coordinator,
    remote: &RemoteLaunch,
    launch: &Launch,
    slot: &Slot,
    host: &str,
    log: std::fs::File,
) -> Result<Started> {
    let via = remote.shell.via.name();
    let spawn_err = |message: String| CoordinatorError::Spawn {
        what: format!("rank {} on {host} ({via})", slot.rank),
        message,
    };
    let log_err = log.try_clone().map_err(|e| spawn_err(e.to_string()))?;
    let mut args = worker_args(slot, &remote.url);
    let token = coordinator.settings().token.clone();
    let on_stdin = remote.shell.forwards_stdin();
    if token.is_some() {
        if on_stdin {
            args.push("--token-stdin".into());
        } else {
            args.extend(["--token-file".into(), remote.token_file.display().to_string()]);
        }
    }
    let mut env = remote::exported_env();
    if let Some(devices) = &slot.cuda_visible_devices {
        env.push(("CUDA_VISIBLE_DEVICES".into(), devices.clone()));
    }
    if let Some(ca) = &coordinator.settings().worker_tls_ca {
        env.push(("KORMLM_TLS_CA".into(), ca.display().to_string()));
    }
    let script = remote::worker_script(&remote.cwd, &env, slot.host_slots, &launch.worker_binary, &args);
    let mut command = remote.shell.command(host, &script);
    command
        .stdin(if on_stdin {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(log_err)
        .process_group(0);
    let mut child = command.spawn().map_err(|e| {
        spawn_err(match e.kind() {
            std::io::ErrorKind::NotFound => format!("{via} is not installed (not on PATH): {e}"),
            _ => e.to_string(),
        })
    })?;
    let process = Arc::new(OwnProcess::remote(
        slot.rank,
        child.id() as i32,
        RemoteProcess::new(remote.shell.clone(), host),
    ));
    if let (Some(mut stdin), Some(token)) = (child.stdin.take(), token.filter(|_| on_stdin)) {
        // A launcher that fails before reading it ends by itself, and that exit is reported.
        if let Err(e) = stdin.write_all(format!("{token}\n").as_bytes()) {
            tracing::warn!(rank = slot.rank, host, error = %e, "cannot hand the token to {via}");
        }
    }
    let stdout = child.stdout.take().ok_or_else(|| spawn_err("no stdout".into()))?;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let reader_process = process.clone();
    std::thread::spawn(move || {
        let mut log = log;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let (Some(pid), Some(remote)) = (remote::remote_pid(&line), reader_process.remote_process()) {
                remote.set_pid(pid);
            }
            let _ = writeln!(log, "{line}");
        }
        let _ = done_tx.send(());
    });
    Ok(Started {
        child,
        process,
        output_done: Some(done_rx),
    })
}
