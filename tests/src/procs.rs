//! Processes under test: the binaries, child processes killed when dropped, a running
//! coordinator with its workers, and deadlines on every wait.

use crate::command::run;
use crate::data::{config, text, workspace_root};
use crate::flags::busy_training_flags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin_dir() -> PathBuf {
    let dir = std::env::var_os("KORMLM_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release"));
    for name in ["coordinator", "worker"] {
        assert!(
            dir.join(name).is_file(),
            "{} is missing: build the binaries first (scripts/build.sh, or ./test.sh does it)",
            dir.join(name).display()
        );
    }
    dir
}

pub fn binary(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, command: &mut Command) -> Self {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            child,
            name: name.to_string(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), signal);
    }

    /// Waits for the exit status, failing the test after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let name = self.name.clone();
        wait_for(&format!("{name} to exit"), timeout, || {
            self.child.try_wait().ok().flatten()
        })
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.is_running() {
            self.signal(Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// A running coordinator with its state directory.
pub struct CoordinatorProc {
    pub proc: Proc,
    pub url: String,
    pub state_dir: PathBuf,
    /// The token the coordinator requires (read from `STATE_DIR/token`, where it writes it).
    pub token: String,
    /// What its clients and workers get in their environment: `KORMLM_TOKEN`, and over TLS
    /// `KORMLM_TLS_CA` (see [`CoordinatorProc::with_client_env`]).
    pub client_env: Vec<(String, String)>,
}

impl CoordinatorProc {
    /// Starts `coordinator --listen 127.0.0.1:0 --state-dir DIR ARGS…` and waits until it listens.
    pub fn start(state_dir: &Path, args: &[&str]) -> Self {
        Self::start_listening(state_dir, "127.0.0.1:0", args)
    }

    /// A coordinator on `DIR/state` with the CPU demo config, `args`, and the busy training job
    /// of `busy_training_flags` (output `DIR/out`): a job that runs until the test acts on it.
    pub fn start_busy(dir: &Path, args: &[&str]) -> Self {
        let state = dir.join("state");
        std::fs::create_dir_all(&state).unwrap_or_else(|e| panic!("{}: {e}", state.display()));
        let cpu_demo = text(&config("cpu-demo.json"));
        let flags = busy_training_flags(&dir.join("out"));
        let mut all = vec!["--config", cpu_demo.as_str()];
        all.extend(args);
        all.extend(flags.iter().map(String::as_str));
        Self::start(&state, &all)
    }

    /// Like `start`, on a given address (a restarted coordinator keeps its address).
    pub fn start_listening(state_dir: &Path, listen: &str, args: &[&str]) -> Self {
        Self::start_full(state_dir, listen, args, &[])
    }

    /// Like `start`, with extra environment variables for the coordinator and the workers it
    /// starts (never `std::env::set_var`: tests of one binary run in parallel).
    pub fn start_with_env(state_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_full(state_dir, "127.0.0.1:0", args, env)
    }

    /// `start_listening` with `start_with_env`'s environment (a restarted coordinator whose
    /// workers need the same environment).
    pub fn start_listening_with_env(state_dir: &Path, listen: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_full(state_dir, listen, args, env)
    }

    fn start_full(state_dir: &Path, listen: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let addr_file = state_dir.join("coordinator.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::File::create(state_dir.with_extension("coordinator.log")).ok();
        let mut command = Command::new(binary("coordinator"));
        command
            .args(["--listen", listen, "--state-dir"])
            .arg(state_dir)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null());
        if let Some(log) = log {
            command.stderr(log);
        }
        let mut proc = Proc::spawn("coordinator", &mut command);
        let url = wait_for("the coordinator to listen", Duration::from_secs(20), || {
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!("coordinator exited early with {status}; log: {}", read_log(state_dir));
            }
            std::fs::read_to_string(&addr_file).ok().map(|s| s.trim().to_string())
        });
        let token = read_token(state_dir);
        Self {
            proc,
            url,
            state_dir: state_dir.to_path_buf(),
            client_env: vec![("KORMLM_TOKEN".to_string(), token.clone())],
            token,
        }
    }

    /// Adds an environment variable for the clients and workers this harness starts.
    pub fn with_client_env(mut self, key: &str, value: &str) -> Self {
        self.client_env.push((key.to_string(), value.to_string()));
        self
    }

    /// `coordinator` (for a client subcommand) with the token (and TLS settings) in its
    /// environment; the caller adds the subcommand and `--addr`.
    pub fn client_command(&self) -> Command {
        let mut command = Command::new(binary("coordinator"));
        command.envs(self.client_env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// `coordinator ARGS… --addr URL`, run to completion as an authenticated client.
    pub fn client(&self, args: &[&str]) -> Output {
        run(self.client_command().args(args).args(["--addr", &self.url]))
    }

    pub fn log(&self) -> String {
        read_log(&self.state_dir)
    }

    /// `coordinator status --addr URL --json [--job ID]`, parsed.
    pub fn status(&self, job: Option<&str>) -> Value {
        let mut args = vec!["status", "--addr", &self.url, "--json"];
        if let Some(job) = job {
            args.extend(["--job", job]);
        }
        let out = run(self.client_command().args(&args));
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
    }

    pub fn worker(&self, rank: u32) -> Proc {
        self.worker_with(rank, &[])
    }

    pub fn worker_with(&self, rank: u32, extra: &[&str]) -> Proc {
        self.worker_with_env(rank, extra, &[])
    }

    /// Like `worker_with`, with extra environment variables for the worker.
    pub fn worker_with_env(&self, rank: u32, extra: &[&str], env: &[(&str, &str)]) -> Proc {
        self.worker_customised(rank, extra, |command| {
            command.envs(env.iter().copied());
        })
    }

    /// Like `worker_with`, with the command changed by `customise` first (e.g. a resource limit).
    pub fn worker_customised(&self, rank: u32, extra: &[&str], customise: impl FnOnce(&mut Command)) -> Proc {
        let log = std::fs::File::create(self.worker_log_path(rank)).ok();
        let mut command = Command::new(binary("worker"));
        command
            .args(["--rank", &rank.to_string(), "--coordinator", &self.url])
            .args(extra)
            .envs(self.client_env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null());
        if let Some(log) = log {
            command.stderr(log);
        }
        customise(&mut command);
        Proc::spawn(&format!("worker rank {rank}"), &mut command)
    }

    /// Where `worker`/`worker_with`/`worker_with_env` write rank `rank`'s log.
    pub fn worker_log_path(&self, rank: u32) -> PathBuf {
        self.state_dir.with_extension(format!("worker-{rank}.log"))
    }

    /// The log of a worker this harness started for rank `rank`.
    pub fn worker_log(&self, rank: u32) -> String {
        std::fs::read_to_string(self.worker_log_path(rank)).unwrap_or_default()
    }
}

/// The token a coordinator wrote to `STATE_DIR/token` (before it listens).
pub fn read_token(state_dir: &Path) -> String {
    let path = state_dir.join("token");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.trim().to_string()
}

/// The coordinator's log, then the last lines of every worker log it started (for failures).
fn read_log(state_dir: &Path) -> String {
    let mut text = std::fs::read_to_string(state_dir.with_extension("coordinator.log")).unwrap_or_default();
    let mut logs = Vec::new();
    let mut dirs = vec![state_dir.join("logs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "log") {
                logs.push(path);
            }
        }
    }
    logs.sort();
    for path in logs {
        let content = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = content.lines().collect();
        let tail = &lines[lines.len().saturating_sub(25)..];
        text += &format!(
            "\n--- {} (last {} lines)\n{}\n",
            path.display(),
            tail.len(),
            tail.join("\n")
        );
    }
    text
}

pub fn worker_state(status: &Value, rank: u64) -> Option<String> {
    status["workers"]
        .as_array()?
        .iter()
        .find(|w| w["rank"].as_u64() == Some(rank))
        .and_then(|w| w["state"].as_str())
        .map(str::to_string)
}

/// True when a process with this pid still exists (and is not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// The parent pid of a running process, from `/proc/PID/stat` (None once it is gone).
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the `(name)` field come the state, then the parent pid.
    stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()
}

/// Makes the process `command` starts unable to grow any file past `bytes` (RLIMIT_FSIZE, as
/// `ulimit -f`): writes beyond fail with EFBIG ("File too large"), like a full disk for the
/// files that reach the limit. SIGXFSZ is ignored, so the process gets the error instead of
/// being killed by the signal.
pub fn limit_file_size(command: &mut Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls setrlimit and
    // signal, both async-signal-safe; it allocates nothing and touches no lock.
    unsafe {
        command.pre_exec(move || {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_FSIZE, bytes, bytes)?;
            nix::sys::signal::signal(Signal::SIGXFSZ, nix::sys::signal::SigHandler::SigIgn)?;
            Ok(())
        });
    }
}
