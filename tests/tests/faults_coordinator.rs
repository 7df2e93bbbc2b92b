//! Faults on the coordinator's side, with real processes and signals: SIGTERM/SIGINT stop the
//! running job gracefully (KILLED at the stop step's checkpoint, exit 130/143), a rerun of the
//! same command neither starts over in the same output directory nor ignores it (--resume,
//! --overwrite_output_dir), another run's output directory is refused, a coordinator SIGKILLed
//! right after a kill finishes the stop when restarted, a partly registered job is killed at
//! once, a damaged sled record leaves the other jobs served, a rank lost for good leaves an
//! elastic job to finish on the others, and a preempted worker (SIGTERM) leaves its job KILLED
//! and resumable.

use kormlm_e2e::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A DeepSpeed config with a global batch of `train_batch_size` whose micro batch is 4: the
/// gradient accumulation is inferred for any world size that divides it.
fn config(dir: &Path, train_batch_size: u32) -> PathBuf {
    let path = dir.join(format!("ds-{train_batch_size}.json"));
    std::fs::write(
        &path,
        format!(
            r#"{{"train_batch_size": {train_batch_size}, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
            "optimizer": {{"type": "AdamW", "params": {{"lr": 1e-3, "weight_decay": 0.01}}}},
            "zero_optimization": {{"stage": 2}}}}"#
        ),
    )
    .unwrap();
    path
}

/// A training command line: `workers` local CPU workers on the Korean HateSpeech dev set.
fn job_args(dir: &Path, out: &Path, workers: u32, train_batch_size: u32, epochs: u32) -> Vec<String> {
    let data = shared_data().join("korean-hate-speech/labeled/dev.tsv");
    [
        "--config",
        config(dir, train_batch_size).to_str().unwrap(),
        "--num_workers",
        &workers.to_string(),
        "--device",
        "cpu",
        "--model_name_or_path",
        tiny_model().to_str().unwrap(),
        "--data_path",
        data.to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
        "--max_seq_len",
        "32",
        "--num_train_epochs",
        &epochs.to_string(),
        "--logging_steps",
        "1",
        "--seed",
        "7",
        "--heartbeat-ms",
        "200",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn with(args: &[String], extra: &[&str]) -> Vec<String> {
    args.iter()
        .cloned()
        .chain(extra.iter().map(|s| s.to_string()))
        .collect()
}

fn start(state: &Path, args: &[String]) -> CoordinatorProc {
    std::fs::create_dir_all(state).unwrap();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    CoordinatorProc::start(state, &refs)
}

/// `coordinator ARGS --listen 127.0.0.1:0 --state-dir STATE` to completion.
fn run_coordinator(state: &Path, args: &[String]) -> Output {
    run(Command::new(binary("coordinator"))
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state))
}

fn client(c: &CoordinatorProc, args: &[&str]) -> Output {
    c.client(args)
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn wait_state(c: &CoordinatorProc, job: &str, state: &str, timeout: Duration) -> Value {
    wait_for(&format!("{job} to be {state}"), timeout, || {
        let s = c.status(Some(job));
        assert!(
            !(s["state"] == "FAILED" && state != "FAILED"),
            "{job} failed: {s}\n{}",
            c.log()
        );
        (s["state"] == state).then_some(s)
    })
}

/// Waits until job-1 has taken `steps` optimizer steps.
fn wait_steps(c: &CoordinatorProc, steps: u64) -> Value {
    wait_for(&format!("{steps} training steps"), Duration::from_secs(180), || {
        let s = c.status(Some("job-1"));
        assert_ne!(s["state"], "FAILED", "{s}\n{}", c.log());
        (s["global_step"].as_u64().unwrap_or(0) >= steps).then_some(s)
    })
}

fn worker_pids(status: &Value) -> Vec<u32> {
    status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().unwrap() as u32)
        .collect()
}

/// A coordinator without a job, serving the records of `state` (for reading them).
fn viewer(state: &Path) -> CoordinatorProc {
    CoordinatorProc::start(state, &[])
}

#[test]
fn sigterm_stops_the_job_with_a_checkpoint_and_a_rerun_resumes_or_starts_afresh_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let out = d.join("out");
    let args = job_args(d, &out, 2, 16, 10);

    let mut c = start(&state, &args);
    let running = wait_steps(&c, 3);
    let pids = worker_pids(&running);
    c.proc.signal(Signal::SIGTERM);
    let exit = c.proc.wait_exit(Duration::from_secs(120));
    assert_eq!(
        exit.code(),
        Some(143),
        "SIGTERM ends the coordinator with 143\n{}",
        c.log()
    );
    wait_for("no worker process left", Duration::from_secs(10), || {
        pids.iter().all(|p| !pid_alive(*p)).then_some(())
    });

    let v = viewer(&state);
    let killed = v.status(Some("job-1"));
    assert_eq!(killed["state"], "KILLED", "{killed}");
    assert!(
        killed["message"]
            .as_str()
            .unwrap()
            .starts_with("the coordinator received SIGTERM"),
        "{killed}"
    );
    let stopped_at = killed["global_step"].as_u64().unwrap();
    assert!(stopped_at >= 3);
    assert_eq!(
        killed["latest_checkpoint"]["global_step"].as_u64(),
        Some(stopped_at),
        "every rank checkpointed at the step it stopped at: {killed}"
    );
    let run_id = killed["run_id"].as_str().unwrap().to_string();
    assert!(run_id.ends_with("/job-1") && run_id.len() > "/job-1".len(), "{run_id}");
    assert_eq!(
        killed["checkpoints"].as_array().unwrap().last(),
        Some(&killed["latest_checkpoint"])
    );
    assert_eq!(killed["latest_checkpoint"]["run_id"], run_id.as_str());
    assert!(
        killed["total_steps"].as_u64().unwrap() > stopped_at,
        "the kill landed mid-run"
    );
    eprintln!(
        "SIGTERM: job-1 KILLED at step {stopped_at}, checkpoint {}",
        killed["latest_checkpoint"]["tag"]
    );
    drop(v);

    // The same command again does not start over in the same directory.
    let refused = run_coordinator(&state, &args);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    let err = String::from_utf8_lossy(&refused.stderr);
    for needed in [
        "job job-1",
        "KILLED",
        "--resume",
        "coordinator resume --job job-1",
        "--overwrite_output_dir",
    ] {
        assert!(err.contains(needed), "missing {needed:?}: {err}");
    }
    assert_eq!(logged_steps(&out).last(), Some(&stopped_at), "nothing was started");

    // --resume continues job-1 from its stop checkpoint.
    let resumed = run_coordinator(&state, &with(&args, &["--resume", "--exit-when-done"]));
    assert!(resumed.status.success(), "{}", text(&resumed));
    let v = viewer(&state);
    let done = v.status(Some("job-1"));
    assert_eq!(done["state"], "SUCCEEDED", "{done}");
    assert_eq!(
        (done["restarts"].as_u64(), done["automatic_restarts"].as_u64()),
        (Some(1), Some(0))
    );
    let steps = logged_steps(&out);
    let total = done["global_step"].as_u64().unwrap();
    assert_eq!(
        steps,
        (1..=total).collect::<Vec<_>>(),
        "each step logged once, the resumed run starting at step {}",
        stopped_at + 1
    );
    let jobs: Value = serde_json::from_slice(&client(&v, &["list", "--json"]).stdout).unwrap();
    assert_eq!(jobs.as_array().unwrap().len(), 1, "{jobs}");
    eprintln!("--resume: job-1 SUCCEEDED at step {total}, steps 1..={total} logged once each");
    drop(v);

    // --overwrite_output_dir starts job-2 there, as a run of its own.
    let mut c = start(&state, &with(&args, &["--overwrite_output_dir"]));
    let second = wait_for("job-2 to run", Duration::from_secs(120), || {
        let s = c.status(Some("job-2"));
        (s["state"] == "RUNNING").then_some(s)
    });
    let state_id = run_id.trim_end_matches("/job-1");
    assert_eq!(second["run_id"], format!("{state_id}/job-2").as_str());
    assert_eq!(second["output_dir"], out.to_str().unwrap());
    c.proc.signal(Signal::SIGINT);
    let exit = c.proc.wait_exit(Duration::from_secs(120));
    assert_eq!(
        exit.code(),
        Some(130),
        "SIGINT ends the coordinator with 130\n{}",
        c.log()
    );
}

/// Starts job-1 with `extra` flags, waits for it to train, freezes its workers (SIGSTOP, so no
/// graceful stop can complete) and sends the coordinator SIGTERM; returns the coordinator and
/// the worker pids.
fn stop_with_frozen_workers(d: &Path, extra: &[&str]) -> (CoordinatorProc, Vec<u32>) {
    let args = with(&job_args(d, &d.join("out"), 2, 16, 40), extra);
    let c = start(&d.join("state"), &args);
    let pids = worker_pids(&wait_steps(&c, 3));
    for pid in &pids {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), Signal::SIGSTOP).unwrap();
    }
    c.proc.signal(Signal::SIGTERM);
    wait_for("job-1 to be STOPPING", Duration::from_secs(30), || {
        (c.status(Some("job-1"))["state"] == "STOPPING").then_some(())
    });
    (c, pids)
}

/// The coordinator has exited 143 with job-1 KILLED at once (`by` says what forced it) and no
/// worker process left.
fn forced(mut c: CoordinatorProc, pids: &[u32], by: &str, started: Instant) {
    let exit = c.proc.wait_exit(Duration::from_secs(60));
    assert_eq!(exit.code(), Some(143), "{}", c.log());
    eprintln!("forced by {by}: coordinator exited 143 after {:?}", started.elapsed());
    for pid in pids {
        assert!(!pid_alive(*pid), "worker {pid} outlived the coordinator");
    }
    let v = viewer(&c.state_dir);
    let job = v.status(Some("job-1"));
    assert_eq!(job["state"], "KILLED", "{job}");
    let message = job["message"].as_str().unwrap();
    assert!(
        message.starts_with("the coordinator received SIGTERM; stopped at once after") && message.contains(by),
        "{message}"
    );
}

#[test]
fn a_second_signal_forces_the_stop_and_leaves_no_worker_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (c, pids) = stop_with_frozen_workers(dir.path(), &[]);
    let started = Instant::now();
    c.proc.signal(Signal::SIGTERM);
    forced(c, &pids, "a second signal (SIGTERM)", started);
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
}

#[test]
fn the_graceful_stop_has_a_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (c, pids) = stop_with_frozen_workers(dir.path(), &["--stop-timeout-s", "3"]);
    forced(c, &pids, "--stop-timeout-s 3", started);
}

#[test]
fn an_output_directory_holding_another_run_is_refused_unless_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("kormlm_run.json"),
        r#"{"run_id": "feedface00000000/job-9", "job_id": "job-9", "created_unix_ms": 1}"#,
    )
    .unwrap();
    // External workers (none started): the job waits, PENDING.
    let args: Vec<String> = [
        "--config",
        config(d, 16).to_str().unwrap(),
        "--world_size",
        "2",
        "--device",
        "cpu",
        "--output_dir",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let refused = run_coordinator(&d.join("a"), &args);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("holds run `feedface00000000/job-9` (job-9 of another coordinator's state directory)")
            && err.contains("--overwrite_output_dir"),
        "{err}"
    );
    // A directory with a run's files but no run file (an older version) is refused too.
    let older = d.join("older");
    std::fs::create_dir_all(older.join("checkpoints/step-4")).unwrap();
    let mut older_args = args.clone();
    let at = older_args.iter().position(|a| a == "--output_dir").unwrap();
    older_args[at + 1] = older.to_str().unwrap().into();
    let refused = run_coordinator(&d.join("b"), &older_args);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("holds checkpoints of a run that left no kormlm_run.json"),
        "{}",
        text(&refused)
    );

    // Overwritten on request: the job starts; SIGTERM ends the waiting job at once (KILLED).
    let state = d.join("c");
    let mut c = start(&state, &with(&args, &["--overwrite_output_dir"]));
    assert_eq!(c.status(Some("job-1"))["state"], "PENDING");
    let started = Instant::now();
    c.proc.signal(Signal::SIGTERM);
    assert_eq!(
        c.proc.wait_exit(Duration::from_secs(30)).code(),
        Some(143),
        "{}",
        c.log()
    );
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    let v = viewer(&state);
    let job = v.status(Some("job-1"));
    assert_eq!(job["state"], "KILLED", "{job}");
    assert!(
        job["message"].as_str().unwrap().contains("while waiting for workers"),
        "{job}"
    );
}

#[test]
fn a_coordinator_sigkilled_right_after_a_kill_finishes_the_stop_when_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let out = d.join("out");
    let args = with(&job_args(d, &out, 2, 16, 40), &["--checkpoint_steps", "1000"]);
    let mut c = start(&state, &args);
    let running = wait_steps(&c, 3);
    let pids = worker_pids(&running);
    // The workers are held (SIGSTOP) until the kill is acknowledged and let go right before the
    // coordinator is SIGKILLed, so none can finish its stop step before the coordinator dies.
    // (A worker still stopped when its parent dies would get SIGHUP: its process group is
    // orphaned.)
    let signal_workers = |signal: Signal| {
        for pid in &pids {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), signal).unwrap();
        }
    };
    signal_workers(Signal::SIGSTOP);
    let kill = client(&c, &["kill", "--job", "job-1", "--json"]);
    signal_workers(Signal::SIGCONT);
    c.proc.signal(Signal::SIGKILL);
    assert!(kill.status.success(), "{}", text(&kill));
    let acknowledged: Value = serde_json::from_slice(&kill.stdout).unwrap();
    assert_eq!(acknowledged["state"], "STOPPING", "{acknowledged}");
    c.proc.wait_exit(Duration::from_secs(10));
    // The stop was persisted before the kill was acknowledged.
    let listen = c.url.trim_start_matches("http://").to_string();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut restarted = CoordinatorProc::start_listening(&state, &listen, &refs);
    let killed = wait_state(&restarted, "job-1", "KILLED", Duration::from_secs(120));
    let step = killed["global_step"].as_u64().unwrap();
    eprintln!(
        "coordinator SIGKILLed after the kill (at step {}): restarted, job-1 KILLED at step {step}",
        running["global_step"]
    );
    assert!(step >= 3, "{killed}");
    assert_eq!(
        killed["latest_checkpoint"]["global_step"].as_u64(),
        Some(step),
        "the stop checkpoint is registered: {killed}\n{}",
        restarted.log()
    );
    assert_eq!(killed["restarts"], 0, "{killed}");
    assert!(
        killed["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["state"] == "EXITED" && w["incarnation"].as_u64() == Some(2)),
        "both workers came back and finished: {killed}"
    );
    wait_for("the workers to exit", Duration::from_secs(20), || {
        pids.iter().all(|p| !pid_alive(*p)).then_some(())
    });
    assert_eq!(logged_steps(&out).last(), Some(&step));
    restarted.proc.signal(Signal::SIGTERM);
    assert!(
        restarted.proc.wait_exit(Duration::from_secs(20)).success(),
        "nothing was running: exit 0"
    );
}

#[test]
fn a_graceful_kill_of_a_partly_registered_job_ends_it_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let data = shared_data().join("korean-hate-speech/labeled/dev.tsv");
    let c = CoordinatorProc::start(
        &state,
        &[
            "--config",
            config(d, 16).to_str().unwrap(),
            "--world_size",
            "2",
            "--device",
            "cpu",
            "--model_name_or_path",
            tiny_model().to_str().unwrap(),
            "--data_path",
            data.to_str().unwrap(),
            "--output_dir",
            d.join("out").to_str().unwrap(),
        ],
    );
    let mut rank0 = c.worker(0);
    wait_for("rank 0 to register", Duration::from_secs(60), || {
        (worker_state(&c.status(Some("job-1")), 0).as_deref() == Some("ALIVE")).then_some(())
    });
    let started = Instant::now();
    let kill = client(&c, &["kill", "--job", "job-1"]);
    assert!(kill.status.success(), "{}", text(&kill));
    let killed = wait_state(&c, "job-1", "KILLED", Duration::from_secs(10));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        killed["message"]
            .as_str()
            .unwrap()
            .contains("while waiting for workers"),
        "{killed}"
    );
    rank0.wait_exit(Duration::from_secs(10));
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
}

#[test]
fn a_damaged_job_record_is_listed_failed_and_the_other_jobs_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    std::fs::create_dir_all(&state).unwrap();
    // Two jobs waiting for external workers, each stopped by SIGTERM (KILLED).
    for out in ["out-1", "out-2"] {
        let args: Vec<String> = [
            "--config",
            config(d, 16).to_str().unwrap(),
            "--world_size",
            "2",
            "--device",
            "cpu",
            "--output_dir",
            d.join(out).to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut c = start(&state, &args);
        c.proc.signal(Signal::SIGTERM);
        assert_eq!(c.proc.wait_exit(Duration::from_secs(30)).code(), Some(143));
    }
    {
        let db = sled::open(state.join("state.sled")).unwrap();
        db.insert("job/000000000001", vec![1u8, 0xff, 0xff, 0xff]).unwrap();
        db.flush().unwrap();
    }
    let c = viewer(&state);
    let out = client(&c, &["list", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let jobs: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(jobs[0]["job_id"], "job-1");
    assert_eq!(jobs[0]["state"], "FAILED");
    let message = jobs[0]["message"].as_str().unwrap();
    assert!(
        message.contains("state record `job/000000000001` cannot be read: invalid record body"),
        "{message}"
    );
    assert_eq!(jobs[1]["state"], "KILLED", "{jobs}");
    let refused = client(&c, &["resume", "--job", "job-1"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("cannot be resumed"),
        "{}",
        text(&refused)
    );
    let resumed = client(&c, &["resume", "--job", "job-2", "--json"]);
    assert!(resumed.status.success(), "{}", text(&resumed));
    assert_eq!(c.status(Some("job-2"))["state"], "PENDING");
}

#[test]
fn a_rank_lost_for_good_leaves_an_elastic_job_to_finish_on_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    // 24 = 4 x 2 x 3 = 4 x 3 x 2: the global batch holds on 3 ranks and on 2.
    let args = with(
        &job_args(d, &out, 3, 24, 8),
        &["--min_workers", "2", "--max_restarts", "0", "--checkpoint_steps", "3"],
    );
    let c = start(&d.join("state"), &args);
    let running = wait_for("a checkpoint", Duration::from_secs(240), || {
        let s = c.status(Some("job-1"));
        assert_ne!(s["state"], "FAILED", "{s}\n{}", c.log());
        s["latest_checkpoint"]["global_step"].as_u64().is_some().then_some(s)
    });
    let victim = running["workers"][2]["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    let done = wait_state(&c, "job-1", "SUCCEEDED", Duration::from_secs(600));
    assert_eq!(
        (
            done["shrinks"].as_u64(),
            done["world_size"].as_u64(),
            done["restarts"].as_u64()
        ),
        (Some(1), Some(2), Some(1)),
        "{done}"
    );
    assert_eq!(done["automatic_restarts"], 0);
    assert_eq!(done["workers"].as_array().unwrap().len(), 2, "{done}");
    assert_eq!(
        (
            done["train_batch_size"].as_u64(),
            done["gradient_accumulation_steps"].as_u64()
        ),
        (Some(24), Some(3))
    );
    // The shrunk job resumed from a checkpoint, not from the start: the coordinator named one,
    // the new rank 0 loaded it, and the log continues after it (steps between the checkpoint
    // and the loss are logged again).
    let log = c.log();
    let shrink = log
        .lines()
        .find(|l| l.contains("continuing on 2 of 3 ranks"))
        .unwrap_or_else(|| panic!("no shrink in the log: {log}"));
    let from = shrink
        .split(" from step-")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("the shrink names no checkpoint: {shrink}"));
    let rank0 = std::fs::read_to_string(d.join("state/logs/job-1/attempt-2/rank-0.log")).unwrap();
    assert!(
        rank0.contains("resuming") && rank0.contains(&format!("step-{from}")),
        "{rank0}"
    );
    let steps = logged_steps(&out);
    let continued = steps.windows(2).position(|w| w[1] <= w[0]).map(|i| steps[i + 1]);
    if let Some(first) = continued {
        assert_eq!(first, from + 1, "{steps:?}");
    }
    let mut distinct = steps.clone();
    distinct.dedup();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct,
        (1..=done["global_step"].as_u64().unwrap()).collect::<Vec<_>>()
    );
    eprintln!(
        "elastic: rank 2 SIGKILLed after checkpoint {}; continued on 2 ranks from step-{from}, SUCCEEDED at step {}",
        running["latest_checkpoint"]["tag"], done["global_step"]
    );
}

/// Needs the worker side of issue #13 (a worker that gets SIGTERM finishes its step with its
/// peers, checkpoints and reports PREEMPTED): with earlier workers SIGTERM ends the process and
/// the job fails with the rank lost.
#[test]
fn a_preempted_worker_leaves_its_job_killed_at_its_checkpoint_and_resumable() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    let args = with(&job_args(d, &out, 2, 16, 3), &["--checkpoint_steps", "1000"]);
    let c = start(&d.join("state"), &args);
    let running = wait_steps(&c, 3);
    let pid = running["workers"][1]["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    let killed = wait_state(&c, "job-1", "KILLED", Duration::from_secs(120));
    assert!(
        killed["message"].as_str().unwrap().starts_with("preempted: "),
        "{killed}"
    );
    let step = killed["global_step"].as_u64().unwrap();
    assert_eq!(
        killed["latest_checkpoint"]["global_step"].as_u64(),
        Some(step),
        "{killed}"
    );
    let resumed = client(&c, &["resume", "--job", "job-1"]);
    assert!(resumed.status.success(), "{}", text(&resumed));
    wait_state(&c, "job-1", "SUCCEEDED", Duration::from_secs(300));
    let steps = logged_steps(&out);
    assert_eq!(steps, (1..=*steps.last().unwrap()).collect::<Vec<_>>());
}
