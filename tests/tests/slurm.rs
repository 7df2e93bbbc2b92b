//! The Slurm batch script `scripts/slurm/kormlm.sbatch`, run for real with bash on this machine
//! (no Slurm, no GPU): stub `scontrol` and `srun` executables on PATH stand in for Slurm. The stub
//! srun starts $SLURM_NTASKS copies of its command here with SLURM_PROCID/SLURM_LOCALID set, so
//! the script's coordinator (listening on 0.0.0.0 with a token) and its two workers train the tiny
//! model on CPU.

use kormlm_e2e::*;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// `scontrol show hostnames LIST`: the comma-separated names of LIST, one a line.
const SCONTROL: &str = r#"#!/usr/bin/env bash
if [ "$#" -eq 3 ] && [ "$1" = show ] && [ "$2" = hostnames ]; then
    tr ',' '\n' <<<"$3"
    exit 0
fi
echo "stub scontrol: unsupported: $*" >&2
exit 1
"#;

/// `srun [--opt=value ...] COMMAND ARGS...`: $SLURM_NTASKS copies of COMMAND on this host, each
/// with its log in $SRUN_STUB_DIR/task-K.log; fails if any copy fails. The options and the command
/// are recorded in $SRUN_STUB_DIR/options and …/command. With $SRUN_STUB_GATE it first waits for
/// that file to exist.
const SRUN: &str = r#"#!/usr/bin/env bash
set -u
: >"$SRUN_STUB_DIR/options"
while [ "$#" -gt 0 ] && [ "${1#-}" != "$1" ]; do
    printf '%s\n' "$1" >>"$SRUN_STUB_DIR/options"
    shift
done
printf '%s\n' "$@" >"$SRUN_STUB_DIR/command"
if [ -n "${SRUN_STUB_GATE:-}" ]; then
    for _ in $(seq 1200); do
        [ -e "$SRUN_STUB_GATE" ] && break
        sleep 0.1
    done
fi
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
for ((k = 0; k < SLURM_NTASKS; k++)); do
    SLURM_PROCID=$k SLURM_LOCALID=$k SLURM_NODEID=0 "$@" >"$SRUN_STUB_DIR/task-$k.log" 2>&1 &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do
    wait "$pid" || rc=1
done
exit "$rc"
"#;

/// The batch script's bash and everything it starts (one process group), killed when dropped.
struct Batch {
    child: Child,
    log: PathBuf,
}

impl Batch {
    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the batch script did not finish within {timeout:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes the stubs into DIR/bin and returns the PATH that finds them first.
fn stub_path(dir: &Path) -> String {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for (name, text) in [("scontrol", SCONTROL), ("srun", SRUN)] {
        let path = bin.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default())
}

/// `bash scripts/slurm/kormlm.sbatch ARGS…` inside a fake two-task allocation on `localhost`.
fn sbatch(dir: &Path, port: u16, env: &[(&str, &Path)], args: &[&str]) -> Batch {
    let log = dir.join("sbatch.log");
    let stdout = std::fs::File::create(&log).unwrap();
    let stderr = stdout.try_clone().unwrap();
    let srun_dir = dir.join("srun");
    std::fs::create_dir_all(&srun_dir).unwrap();
    let mut command = Command::new("bash");
    command
        .arg(workspace_root().join("scripts/slurm/kormlm.sbatch"))
        .args(args)
        .current_dir(dir)
        .env("PATH", stub_path(dir))
        .env("SLURM_JOB_ID", "4242")
        .env("SLURM_JOB_NODELIST", "localhost")
        .env("SLURM_NNODES", "1")
        .env("SLURM_NTASKS", "2")
        .env("SLURM_NTASKS_PER_NODE", "2")
        .env("SLURM_CPUS_PER_TASK", "1")
        .env("SLURM_SUBMIT_DIR", dir)
        .env("SRUN_STUB_DIR", &srun_dir)
        .env("KORMLM_BIN_DIR", bin_dir())
        .env("KORMLM_PORT", port.to_string())
        .env("KORMLM_STATE_DIR", dir.join("state"))
        .env("KORMLM_CACHE", dir.join("cache"))
        .env("KORMLM_GRACE_S", "20")
        .env_remove("KORMLM_TOKEN")
        .env_remove("KORMLM_COORDINATOR")
        .env_remove("KORMLM_ADDR")
        .env_remove("SLURMD_NODENAME")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    for (name, value) in env {
        command.env(name, value);
    }
    let child = command.spawn().expect("bash runs the batch script");
    Batch { child, log }
}

fn status(url: &str, token: Option<&str>) -> std::process::Output {
    let mut command = Command::new(binary("coordinator"));
    command
        .args(["status", "--addr", url, "--json"])
        .env_remove("KORMLM_TOKEN");
    if let Some(token) = token {
        command.env("KORMLM_TOKEN", token);
    }
    run(&mut command)
}

/// Command lines of all processes that contain `needle`.
fn command_lines_containing(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

fn task_logs(dir: &Path) -> String {
    (0..2)
        .map(|k| {
            let log = std::fs::read_to_string(dir.join(format!("srun/task-{k}.log"))).unwrap_or_default();
            format!("--- task {k} ---\n{log}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_batch_script_runs_a_two_rank_job_with_a_token_on_all_interfaces() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    let gate = d.join("go");
    let port = free_port();
    let model = tiny_model();
    let data = shared_data().join("korean-hate-speech/labeled/dev.tsv");
    let mut batch = sbatch(
        d,
        port,
        &[
            ("KORMLM_CONFIG", &config("cpu-demo.json")),
            ("KORMLM_DEVICE", Path::new("cpu")),
            ("SRUN_STUB_GATE", &gate),
        ],
        &[
            "--model_name_or_path",
            model.to_str().unwrap(),
            "--data_path",
            data.to_str().unwrap(),
            "--output_dir",
            out.to_str().unwrap(),
            "--max_seq_len",
            "32",
            "--num_train_epochs",
            "1",
            "--max_steps",
            "4",
            "--logging_steps",
            "1",
            "--seed",
            "3",
        ],
    );

    // The coordinator listens before srun starts the workers (held back by the gate).
    let state = d.join("state");
    wait_for("the coordinator to listen", Duration::from_secs(30), || {
        if let Ok(Some(status)) = batch.child.try_wait() {
            panic!("the batch script exited early with {status}:\n{}", batch.output());
        }
        std::fs::metadata(state.join("coordinator.addr")).is_ok().then_some(())
    });
    let token = std::fs::read_to_string(state.join("token")).unwrap().trim().to_string();
    assert_eq!(token.len(), 32, "a random 128-bit hex token: {token:?}");
    let mode = std::fs::metadata(state.join("token")).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "the token file is private: {mode:o}");
    // It listens on 0.0.0.0, so the token is required.
    let url = format!("http://127.0.0.1:{port}");
    let refused = status(&url, None);
    assert!(!refused.status.success(), "status without the token must be refused");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("token"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let wrong = status(&url, Some("not-the-token"));
    assert!(!wrong.status.success(), "status with a wrong token must be refused");
    let pending = status(&url, Some(&token));
    assert!(pending.status.success(), "{}", String::from_utf8_lossy(&pending.stderr));
    let pending: serde_json::Value = serde_json::from_slice(&pending.stdout).unwrap();
    assert_eq!(pending["state"], "PENDING", "{pending}");
    assert_eq!(pending["world_size"], 2, "{pending}");
    // The coordinator got the token from the environment, not on its command line.
    let listen = format!("0.0.0.0:{port}");
    let coordinators = command_lines_containing(&listen);
    assert!(
        coordinators
            .iter()
            .any(|c| c.contains("--world_size 2") && c.contains("--exit-when-done")),
        "the coordinator's command line: {coordinators:?}"
    );
    let leaks = command_lines_containing(&token);
    assert!(leaks.is_empty(), "the token is on a command line: {leaks:?}");

    std::fs::write(&gate, "").unwrap();
    // While the two workers run (each lives for a second at least: loading libtorch, the model
    // and the corpus), no process shows the token on its command line. /proc is polled directly,
    // so the workers are seen however short the job is.
    let worker_marker = format!("--coordinator http://localhost:{port}");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && seen.len() < 2 && batch.child.try_wait().unwrap().is_none() {
        for line in command_lines_containing(&worker_marker) {
            if line.contains("/worker --rank") && !seen.contains(&line) {
                assert!(!line.contains(&token), "the token is on a command line: {line}");
                seen.push(line);
            }
        }
        let leaks = command_lines_containing(&token);
        assert!(leaks.is_empty(), "the token is on a command line: {leaks:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        seen.len(),
        2,
        "both workers were seen running: {seen:?}\n{}",
        batch.output()
    );
    for rank in 0..2 {
        assert!(
            seen.iter()
                .any(|l| l.contains(&format!("--rank {rank} --local_rank {rank}"))),
            "{seen:?}"
        );
    }

    let exit = batch.wait(Duration::from_secs(240));
    let output = batch.output();
    eprintln!("batch script output:\n{output}");
    assert!(
        exit.success(),
        "the batch script exited with {exit}:\n{output}\n{}",
        task_logs(d)
    );
    assert!(output.contains("coordinator exited with status 0"), "{output}");
    assert!(
        !output.contains("but srun exited with status"),
        "every worker exits 0: {output}\n{}",
        task_logs(d)
    );

    // srun got one task per rank and the whole environment (the token travels there), and a
    // command without the token.
    let options = std::fs::read_to_string(d.join("srun/options")).unwrap();
    let options: Vec<&str> = options.lines().collect();
    for expected in ["--ntasks=2", "--export=ALL", "--cpus-per-task=1"] {
        assert!(options.contains(&expected), "srun options {options:?}");
    }
    let task = std::fs::read_to_string(d.join("srun/command")).unwrap();
    assert!(task.contains("scripts/slurm/kormlm-task.sh"), "{task}");
    assert!(!task.contains(&token), "{task}");
    for k in 0..2 {
        let log = std::fs::read_to_string(d.join(format!("srun/task-{k}.log"))).unwrap();
        assert!(log.contains(&format!("coordinator=http://localhost:{port}")), "{log}");
    }

    // The run's outputs.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["global_steps"], 4, "{summary}");
    assert_eq!(summary["stopped_by_request"], false, "{summary}");
    assert_eq!(
        summary["val_loss_history"].as_array().map(Vec::len),
        summary["epochs_run"].as_u64().map(|n| n as usize),
        "one evaluation per epoch: {summary}"
    );
    assert!(out.join("best/model.safetensors").is_file());
    assert!(out.join("best/config.json").is_file());

    // What the coordinator recorded: two ranks, both on CPU, both exited; the job succeeded.
    let viewer = CoordinatorProc::start(&state, &[]);
    let job = viewer.status(Some("job-1"));
    assert_eq!(job["state"], "SUCCEEDED", "{job}");
    assert_eq!(job["world_size"], 2, "{job}");
    assert_eq!(job["global_step"], 4, "{job}");
    let workers = job["workers"].as_array().unwrap();
    let mut ranks: Vec<u64> = workers.iter().map(|w| w["rank"].as_u64().unwrap()).collect();
    ranks.sort_unstable();
    assert_eq!(ranks, [0, 1], "{job}");
    for w in workers {
        assert_eq!(w["state"], "EXITED", "{w}");
        assert_eq!(w["devices"], serde_json::json!(["cpu"]), "{w}");
        assert_eq!(w["local_rank"], w["rank"], "SLURM_LOCALID is the local rank: {w}");
    }
}

#[test]
fn a_config_that_does_not_fit_the_task_count_stops_before_srun() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // configs/ds_config.json: 128 = 32 × 1 × 4 ranks, not 2.
    let mut batch = sbatch(
        d,
        free_port(),
        &[("KORMLM_DEVICE", Path::new("cpu"))],
        &["--output_dir", d.join("out").to_str().unwrap()],
    );
    let exit = batch.wait(Duration::from_secs(30));
    let output = batch.output();
    assert!(!exit.success(), "{output}");
    assert!(output.contains("128 != 32 * 1 * 2"), "{output}");
    assert!(output.contains("before it listened"), "{output}");
    assert!(
        !d.join("srun/options").exists(),
        "srun must not run when the coordinator cannot start"
    );
}

#[test]
fn a_signal_stops_the_batch_job_with_a_checkpoint_and_a_requeue_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    let state = d.join("state");
    // A token file left world-readable by someone: rewritten private.
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("token"), "old\n").unwrap();
    std::fs::set_permissions(state.join("token"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let model = tiny_model();
    let data = shared_data().join("korean-hate-speech/labeled/dev.tsv");
    let args = [
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--data_path",
        data.to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
        "--max_seq_len",
        "32",
        "--num_train_epochs",
        "8",
        "--logging_steps",
        "1",
        "--seed",
        "3",
    ];
    let env = |restarts: &'static str| {
        [
            ("KORMLM_CONFIG", config("cpu-demo.json")),
            ("KORMLM_DEVICE", PathBuf::from("cpu")),
            ("KORMLM_COORDINATOR_FLAGS", PathBuf::from("--heartbeat-ms 200")),
            ("SLURM_RESTART_COUNT", PathBuf::from(restarts)),
        ]
    };
    let first_env = env("0");
    let refs: Vec<(&str, &Path)> = first_env.iter().map(|(k, v)| (*k, v.as_path())).collect();
    let port = free_port();
    let mut batch = sbatch(d, port, &refs, &args);
    let url = format!("http://127.0.0.1:{port}");
    let training = wait_for("job-1 to train", Duration::from_secs(180), || {
        if let Ok(Some(status)) = batch.child.try_wait() {
            panic!("the batch script exited early with {status}:\n{}", batch.output());
        }
        let token = std::fs::read_to_string(state.join("token")).ok()?;
        let out = status(&url, Some(token.trim()));
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (s["global_step"].as_u64().unwrap_or(0) >= 3).then_some(s)
    });
    let mode = std::fs::metadata(state.join("token")).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o077,
        0,
        "the token file is private even though it existed: {mode:o}"
    );
    // SIGTERM to the batch shell only, as `--signal=B:TERM@120` sends it.
    nix::sys::signal::kill(Pid::from_raw(batch.child.id() as i32), Signal::SIGTERM).unwrap();
    let exit = batch.wait(Duration::from_secs(120));
    let output = batch.output();
    assert_eq!(exit.code(), Some(143), "{output}\n{}", task_logs(d));
    assert!(output.contains("the job is resumable from its checkpoint"), "{output}");
    assert!(
        !output.contains("but srun exited") && !output.contains("workers still run"),
        "the workers exited when told: {output}"
    );
    drop(batch);

    let viewer = CoordinatorProc::start(&state, &[]);
    let killed = viewer.status(Some("job-1"));
    assert_eq!(killed["state"], "KILLED", "{killed}");
    let stopped_at = killed["global_step"].as_u64().unwrap();
    assert!(stopped_at >= training["global_step"].as_u64().unwrap());
    assert!(stopped_at < killed["total_steps"].as_u64().unwrap(), "{killed}");
    assert_eq!(
        killed["latest_checkpoint"]["global_step"].as_u64(),
        Some(stopped_at),
        "{killed}"
    );
    drop(viewer);

    // Slurm runs the script again under the same job id: the job continues.
    let second_env = env("1");
    let refs: Vec<(&str, &Path)> = second_env.iter().map(|(k, v)| (*k, v.as_path())).collect();
    let mut batch = sbatch(d, free_port(), &refs, &args);
    let exit = batch.wait(Duration::from_secs(300));
    let output = batch.output();
    assert!(exit.success(), "{output}\n{}", task_logs(d));
    assert!(
        output.contains("requeued (SLURM_RESTART_COUNT=1): continuing the job"),
        "{output}"
    );
    let viewer = CoordinatorProc::start(&state, &[]);
    let done = viewer.status(Some("job-1"));
    assert_eq!(done["state"], "SUCCEEDED", "{done}");
    assert_eq!(done["restarts"], 1, "{done}");
    let total = done["global_step"].as_u64().unwrap();
    assert_eq!(
        logged_steps(&out),
        (1..=total).collect::<Vec<_>>(),
        "resumed at step {}",
        stopped_at + 1
    );
    eprintln!("batch job stopped by SIGTERM at step {stopped_at}; the requeued run finished at step {total}");
}
