//! Harness for end-to-end tests: starts the real `coordinator` and `worker` binaries as
//! separate processes on loopback and talks to them through their command lines and gRPC.
//!
//! The binaries come from `KORMLM_BIN_DIR`, else `target/release` of this workspace
//! (`./test.sh` builds them first).

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

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

pub fn config(name: &str) -> PathBuf {
    workspace_root().join("configs").join(name)
}

/// The Python interpreter with torch and the test oracle (set by ./test.sh).
pub fn oracle_python() -> PathBuf {
    std::env::var_os("KORMLM_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        home.join(".cache/kormlm/torch-2.11.0/bin/python")
    })
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
}

impl CoordinatorProc {
    /// Starts `coordinator --listen 127.0.0.1:0 --state-dir DIR ARGS…` and waits until it listens.
    pub fn start(state_dir: &Path, args: &[&str]) -> Self {
        Self::start_listening(state_dir, "127.0.0.1:0", args)
    }

    /// Like `start`, on a given address (a restarted coordinator keeps its address).
    pub fn start_listening(state_dir: &Path, listen: &str, args: &[&str]) -> Self {
        let addr_file = state_dir.join("coordinator.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::File::create(state_dir.with_extension("coordinator.log")).ok();
        let mut command = Command::new(binary("coordinator"));
        command
            .args(["--listen", listen, "--state-dir"])
            .arg(state_dir)
            .args(args)
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
        Self {
            proc,
            url,
            state_dir: state_dir.to_path_buf(),
        }
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
        let out = run(Command::new(binary("coordinator")).args(&args));
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
        self.worker_customised(rank, extra, |_| {})
    }

    /// Like `worker_with`, with the command changed by `customise` first (e.g. a resource limit).
    pub fn worker_customised(&self, rank: u32, extra: &[&str], customise: impl FnOnce(&mut Command)) -> Proc {
        let log = std::fs::File::create(self.state_dir.with_extension(format!("worker-{rank}.log"))).ok();
        let mut command = Command::new(binary("worker"));
        command
            .args(["--rank", &rank.to_string(), "--coordinator", &self.url])
            .args(extra)
            .stdout(Stdio::null());
        if let Some(log) = log {
            command.stderr(log);
        }
        customise(&mut command);
        Proc::spawn(&format!("worker rank {rank}"), &mut command)
    }
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

/// Runs a command to completion and captures its output.
pub fn run(command: &mut Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
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

/// The shared corpora (`../shared/data`, or `KORMLM_SHARED_DATA`).
pub fn shared_data() -> PathBuf {
    std::env::var_os("KORMLM_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace_root()
                .parent()
                .expect("a parent directory")
                .join("shared/data")
        })
}

/// Runs `tests/python/oracle.py ARGS` with the oracle interpreter; returns stdout.
pub fn oracle(args: &[&str]) -> String {
    let out = run(Command::new(oracle_python())
        .arg(workspace_root().join("tests/python/oracle.py"))
        .args(args));
    assert!(
        out.status.success(),
        "oracle {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A tiny random ELECTRA (no dropout) with a WordPiece vocabulary trained on the shared
/// corpora, created once per test binary.
pub fn tiny_model() -> PathBuf {
    static MODEL: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let tok = dir.path().join("tok");
            let model = dir.path().join("tiny");
            oracle(&[
                "vocab",
                tok.to_str().unwrap(),
                "--data",
                shared_data().to_str().unwrap(),
                "--size",
                "4000",
            ]);
            oracle(&[
                "model",
                model.to_str().unwrap(),
                "--tokenizer",
                tok.to_str().unwrap(),
                "--dropout",
                "0",
                "--seed",
                "5",
            ]);
            (dir, model)
        })
        .1
        .clone()
}

/// Every tensor of a safetensors file as f32 values.
pub fn read_weights(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, values)
        })
        .collect()
}

/// Largest absolute difference between two weight sets with the same names and shapes.
pub fn max_weight_diff(a: &Path, b: &Path) -> f64 {
    let (a, b) = (read_weights(a), read_weights(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut worst: f64 = 0.0;
    for (name, x) in &a {
        let y = &b[name];
        assert_eq!(x.len(), y.len(), "{name}");
        for (p, q) in x.iter().zip(y) {
            worst = worst.max(f64::from((p - q).abs()));
        }
    }
    worst
}

/// Training flags for a long-running job on the tiny model (Korean HateSpeech train set, many
/// epochs), so a test can act on a job that is busy.
pub fn busy_training_flags(output_dir: &Path) -> Vec<String> {
    let data = shared_data().join("korean-hate-speech/labeled/train.tsv");
    [
        "--model_name_or_path",
        tiny_model().to_str().unwrap(),
        "--data_path",
        data.to_str().unwrap(),
        "--output_dir",
        output_dir.to_str().unwrap(),
        "--max_seq_len",
        "32",
        "--num_train_epochs",
        "100",
        "--logging_steps",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A tiny random ELECTRA like `tiny_model()` (same vocabulary) but with dropout 0.1 (the
/// transformers default), created once per test binary.
pub fn tiny_dropout_model() -> PathBuf {
    static MODEL: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            let tok = tiny_model().with_file_name("tok");
            let dir = tempfile::tempdir().unwrap();
            let model = dir.path().join("tiny-dropout");
            oracle(&[
                "model",
                model.to_str().unwrap(),
                "--tokenizer",
                tok.to_str().unwrap(),
                "--dropout",
                "0.1",
                "--seed",
                "5",
            ]);
            (dir, model)
        })
        .1
        .clone()
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

/// The records of `OUTPUT_DIR/training_log.jsonl`.
pub fn training_log(output_dir: &Path) -> Vec<Value> {
    let path = output_dir.join("training_log.jsonl");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}
