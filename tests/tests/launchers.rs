//! Multi-node launchers (`coordinator --hostfile … --launcher ssh|pdsh|slurm`), with stub `ssh`, `srun` and
//! `pdsh` executables (tests/stubs/) first on PATH: they record what they are given (argv and
//! environment, never stdin) and run the remote command here as sshd would (a new session), so
//! the two "hosts" of the hostfile, `node-a` and `node-b`, are CPU workers on this machine. The
//! stubs refuse what real ssh would refuse or prompt for (unknown hosts, no BatchMode).
//!
//! Checked: a job started over ssh succeeds, with the token handed over on stdin and never on a
//! recorded command line or environment; with pdsh (chosen by default when it is installed) a
//! remote rank that dies is noticed through its launcher and restarted as --max_restarts says,
//! and `kill --force` reaches a frozen remote worker through the launcher (only a signal sent on
//! its "host" can: it leads its own session).
//!
//! No test runs a real sshd: OpenSSH's server is not installed on the CI machines, and a test
//! must not install packages.

use kormlm_e2e::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

const HOSTS: [&str; 2] = ["node-a", "node-b"];

/// What one stub invocation was given.
#[derive(Debug)]
struct Invocation {
    program: String,
    argv: Vec<String>,
    env: String,
}

impl Invocation {
    /// The remote command line (the last argument).
    fn script(&self) -> &str {
        self.argv.last().map_or("", String::as_str)
    }

    fn env_var(&self, name: &str) -> Option<&str> {
        self.env.lines().find_map(|l| l.strip_prefix(&format!("{name}=")))
    }
}

/// Every invocation recorded in `record`, in no particular order.
fn invocations(record: &Path) -> Vec<Invocation> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(record).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "argv") {
            let name = path.file_stem().unwrap().to_string_lossy().to_string();
            let argv = std::fs::read_to_string(&path).unwrap();
            all.push(Invocation {
                program: name.split('-').next().unwrap().to_string(),
                argv: argv.lines().map(str::to_string).collect(),
                env: std::fs::read_to_string(path.with_extension("env")).unwrap_or_default(),
            });
        }
    }
    all
}

/// Asserts that the token appears in no recorded argv or environment.
fn assert_token_never_recorded(record: &Path, token: &str) {
    let files: Vec<PathBuf> = std::fs::read_dir(record).unwrap().flatten().map(|e| e.path()).collect();
    assert!(!files.is_empty(), "nothing was recorded in {}", record.display());
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(token), "the token is in {}:\n{text}", path.display());
    }
}

/// A hostfile of the two fake hosts, one CPU slot each.
fn hostfile(dir: &Path) -> PathBuf {
    let path = dir.join("hostfile");
    std::fs::write(
        &path,
        "# two fake hosts, run here by the stubs\nnode-a slots=1\nnode-b slots=1\n",
    )
    .unwrap();
    path
}

/// The coordinator's environment: the stubs first on PATH, where they record, which hosts
/// exist, and one CPU thread a worker (two workers share the test machine).
fn stub_env(record: &Path) -> Vec<(String, String)> {
    let stubs = workspace_root().join("tests/stubs");
    let path = format!("{}:{}", stubs.display(), std::env::var("PATH").unwrap_or_default());
    vec![
        ("PATH".into(), path),
        ("KORMLM_STUB_RECORD".into(), record.display().to_string()),
        ("KORMLM_STUB_HOSTS".into(), HOSTS.join(" ")),
        ("OMP_NUM_THREADS".into(), "1".into()),
    ]
}

/// A CPU training job of the tiny model on a Korean HateSpeech file, its ranks on the hostfile's
/// hosts.
fn job_args(dir: &Path, data: &str, epochs: u32, extra: &[&str]) -> Vec<String> {
    let data = shared_data().join("korean-hate-speech/labeled").join(data);
    let mut args: Vec<String> = [
        "--config",
        zero2_config(dir).to_str().unwrap(),
        "--device",
        "cpu",
        "--hostfile",
        hostfile(dir).to_str().unwrap(),
        "--model_name_or_path",
        tiny_model().to_str().unwrap(),
        "--data_path",
        data.to_str().unwrap(),
        "--output_dir",
        dir.join("out").to_str().unwrap(),
        "--max_seq_len",
        "32",
        "--num_train_epochs",
        &epochs.to_string(),
        "--logging_steps",
        "1",
        "--seed",
        "7",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn start(dir: &Path, args: &[String]) -> CoordinatorProc {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let env = stub_env(&dir.join("record"));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    CoordinatorProc::start_with_env(&state, &refs, &env)
}

fn worker_pid(status: &Value, rank: u64) -> Option<u32> {
    status["workers"]
        .as_array()?
        .iter()
        .find(|w| w["rank"].as_u64() == Some(rank) && w["state"] == "ALIVE")
        .and_then(|w| w["pid"].as_u64())
        .map(|p| p as u32)
}

/// The coordinator's `remote worker exited` log lines for `rank`.
fn remote_exits(log: &str, rank: u32) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("remote worker exited") && l.contains(&format!("rank={rank} ")))
        .map(str::to_string)
        .collect()
}

#[test]
fn over_ssh_both_hosts_train_to_success_and_the_token_goes_on_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = job_args(
        d,
        "dev.tsv",
        1,
        &[
            "--launcher",
            "ssh",
            "--ssh_port",
            "2222",
            "--launcher_args",
            "-o ConnectTimeout=5",
            "--exit-when-done",
        ],
    );
    let mut c = start(d, &args);
    let exit = c.proc.wait_exit(Duration::from_secs(240));
    assert!(exit.success(), "the job did not succeed ({exit}):\n{}", c.log());
    assert!(d.join("out/final/model.safetensors").is_file(), "{}", c.log());

    // Workers still exiting when the coordinator leaves get a SIGTERM through ssh as well.
    let started: Vec<Invocation> = invocations(&d.join("record"))
        .into_iter()
        .filter(|i| !i.script().starts_with("kill "))
        .collect();
    assert_eq!(started.len(), 2, "one ssh per remote rank: {started:#?}");
    for (rank, host) in HOSTS.iter().enumerate() {
        let ssh = started
            .iter()
            .find(|i| i.argv.iter().any(|a| a == host))
            .unwrap_or_else(|| panic!("no ssh to {host}: {started:#?}"));
        assert_eq!(ssh.program, "ssh");
        eprintln!("recorded: ssh {}", ssh.argv.join(" "));
        assert_eq!(
            ssh.argv[..7],
            ["-o", "BatchMode=yes", "-p", "2222", "-o", "ConnectTimeout=5", host],
            "{ssh:#?}"
        );
        let script = ssh.script();
        for word in [
            format!("--rank {rank} --local_rank 0 --coordinator {}", c.url),
            "--token-stdin".to_string(),
            "echo kormlm-remote-pid $$".to_string(),
            "OMP_NUM_THREADS=1".to_string(),
            format!("cd {}", std::env::current_dir().unwrap().display()),
        ] {
            assert!(script.contains(&word), "{word:?} is not in {script:?}");
        }
        assert_eq!(ssh.env_var("KORMLM_TOKEN"), None, "{ssh:#?}");
        // The launcher's output is the worker's log, from the shell's pid line on.
        let log = std::fs::read_to_string(d.join(format!("state/logs/job-1/attempt-1/rank-{rank}.log"))).unwrap();
        assert!(log.starts_with("kormlm-remote-pid "), "{log}");
    }
    assert_token_never_recorded(&d.join("record"), &read_token(&c.state_dir));
    let log = c.log();
    // Each rank's end was noticed through its ssh (its status depends on whether it had left
    // before the coordinator did).
    for (rank, host) in HOSTS.iter().enumerate() {
        let exits = remote_exits(&log, rank as u32);
        assert_eq!(exits.len(), 1, "{log}");
        assert!(exits[0].contains(&format!("host={host} ")), "{}", exits[0]);
    }
}

#[test]
fn over_pdsh_a_lost_remote_rank_is_restarted_and_kill_force_reaches_a_frozen_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // No --launcher: pdsh (the stub) is installed, so it is the default, as for deepspeed.
    let args = job_args(d, "train.tsv", 100, &["--max_restarts", "1"]);
    let c = start(d, &args);
    let record = d.join("record");
    let first = wait_for("both ranks training", Duration::from_secs(120), || {
        let s = c.status(Some("job-1"));
        assert_ne!(s["state"], "FAILED", "{s}\n{}", c.log());
        (s["global_step"].as_u64().unwrap_or(0) >= 1 && worker_pid(&s, 1).is_some()).then_some(s)
    });
    let lost = worker_pid(&first, 1).unwrap();
    let pdsh: Vec<Invocation> = invocations(&record);
    assert_eq!(pdsh.len(), 2, "{pdsh:#?}");
    let token_file = c.state_dir.join("token");
    for p in &pdsh {
        assert_eq!(p.program, "pdsh");
        assert_eq!(p.argv[..4], ["-S", "-f", "1024", "-w"], "{p:#?}");
        assert_eq!(p.env_var("PDSH_RCMD_TYPE"), Some("ssh"));
        assert_eq!(p.env_var("PDSH_SSH_ARGS_APPEND"), Some("-o BatchMode=yes"));
        let expected = format!("--token-file {}", token_file.display());
        assert!(p.script().contains(&expected), "{expected:?} is not in {p:#?}");
    }

    // Rank 1 dies on node-b: its pdsh ends, the coordinator takes the rank for lost and, with a
    // restart left, starts attempt 2 through pdsh again.
    kill(Pid::from_raw(lost as i32), Signal::SIGKILL).unwrap();
    let restarted = wait_for("the restarted attempt", Duration::from_secs(120), || {
        let s = c.status(Some("job-1"));
        assert_ne!(s["state"], "FAILED", "{s}\n{}", c.log());
        let pid = worker_pid(&s, 1).filter(|p| *p != lost);
        (s["restarts"] == 1 && s["state"] == "RUNNING" && pid.is_some() && worker_pid(&s, 0).is_some()).then_some(s)
    });
    let log = c.log();
    let exits = remote_exits(&log, 1);
    assert!(
        exits
            .first()
            .is_some_and(|l| l.contains("host=node-b") && l.contains(&format!("pid={lost} "))),
        "the launcher did not notice rank 1's end: {exits:?}\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("rank 1 lost") && l.contains("restart 1 of 1")),
        "{log}"
    );

    // Frozen, rank 1 answers no order; only a SIGKILL sent on its host ends it.
    let frozen = worker_pid(&restarted, 1).unwrap();
    let rank0 = worker_pid(&restarted, 0).unwrap();
    kill(Pid::from_raw(frozen as i32), Signal::SIGSTOP).unwrap();
    let out = c.client(&["kill", "--job", "job-1", "--force"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("the frozen remote worker to be killed", Duration::from_secs(60), || {
        (!pid_alive(frozen) && !pid_alive(rank0)).then_some(())
    });
    assert_eq!(c.status(Some("job-1"))["state"], "KILLED");
    let kills: Vec<Invocation> = invocations(&record)
        .into_iter()
        .filter(|i| i.script().starts_with("kill "))
        .collect();
    for k in &kills {
        eprintln!("recorded: pdsh {}", k.argv.join(" "));
    }
    let sigkill = format!("kill -KILL -- -{frozen} ");
    assert!(
        kills
            .iter()
            .any(|k| k.script().starts_with(&sigkill) && k.argv[..5] == ["-S", "-f", "1024", "-w", "node-b"]),
        "no pdsh -w node-b {sigkill:?}…: {kills:#?}"
    );
    assert_token_never_recorded(&record, &c.token);
}

#[test]
fn over_srun_inside_an_allocation_both_hosts_train_to_success_and_the_token_goes_on_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = job_args(
        d,
        "dev.tsv",
        1,
        &[
            "--launcher",
            "slurm",
            "--launcher_args",
            "--partition=debug",
            "--exit-when-done",
        ],
    );
    // Outside an allocation srun has nothing to start steps in: refused before anything starts.
    let outside = run(std::process::Command::new(binary("coordinator"))
        .args(&args)
        .arg("--dry-run")
        .env_remove("SLURM_JOB_ID"));
    let stderr = String::from_utf8_lossy(&outside.stderr);
    assert!(!outside.status.success(), "{stderr}");
    assert!(
        stderr.contains("--launcher") && stderr.contains("SLURM_JOB_ID is not set"),
        "{stderr}"
    );

    let state = d.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut env = stub_env(&d.join("record"));
    env.push(("SLURM_JOB_ID".into(), "4242".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut c = CoordinatorProc::start_with_env(&state, &refs, &env);
    let exit = c.proc.wait_exit(Duration::from_secs(240));
    assert!(exit.success(), "the job did not succeed ({exit}):\n{}", c.log());
    assert!(d.join("out/final/model.safetensors").is_file(), "{}", c.log());

    let started: Vec<Invocation> = invocations(&d.join("record"))
        .into_iter()
        .filter(|i| !i.script().starts_with("kill "))
        .collect();
    assert_eq!(started.len(), 2, "one srun step per remote rank: {started:#?}");
    for (rank, host) in HOSTS.iter().enumerate() {
        let nodelist = format!("--nodelist={host}");
        let srun = started
            .iter()
            .find(|i| i.argv.contains(&nodelist))
            .unwrap_or_else(|| panic!("no srun step on {host}: {started:#?}"));
        assert_eq!(srun.program, "srun");
        eprintln!("recorded: srun {}", srun.argv.join(" "));
        assert_eq!(
            srun.argv[..8],
            [
                "--nodes=1",
                "--ntasks=1",
                "--overlap",
                "--quiet",
                nodelist.as_str(),
                "--partition=debug",
                "sh",
                "-c"
            ],
            "{srun:#?}"
        );
        let script = srun.script();
        for word in [
            format!("--rank {rank} --local_rank 0 --coordinator {}", c.url),
            "--token-stdin".to_string(),
            "echo kormlm-remote-pid $$".to_string(),
        ] {
            assert!(script.contains(&word), "{word:?} is not in {script:?}");
        }
        assert_eq!(srun.env_var("KORMLM_TOKEN"), None, "{srun:#?}");
    }
    assert_token_never_recorded(&d.join("record"), &read_token(&c.state_dir));
    let log = c.log();
    for (rank, host) in HOSTS.iter().enumerate() {
        let exits = remote_exits(&log, rank as u32);
        assert_eq!(exits.len(), 1, "{log}");
        assert!(exits[0].contains(&format!("host={host} ")), "{}", exits[0]);
    }
}
