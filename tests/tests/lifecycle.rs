//! Job life cycle with real processes: kill and resume (also onto another world size and past a
//! damaged checkpoint), a coordinator killed and restarted, a worker killed with restarts left,
//! and an early-stopped job that stays finished.

use kormlm_e2e::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn job_args(dir: &Path, out: &Path, workers: u32, epochs: u32) -> Vec<String> {
    job_args_on(dir, out, workers, epochs, "dev.tsv")
}

/// `job_args` on another file of the Korean HateSpeech corpus.
fn job_args_on(dir: &Path, out: &Path, workers: u32, epochs: u32, data: &str) -> Vec<String> {
    let data = shared_data().join("korean-hate-speech/labeled").join(data);
    [
        "--config",
        zero2_config(dir).to_str().unwrap(),
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
        "--max_stop_number",
        "10",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn start(state: &Path, args: &[String]) -> CoordinatorProc {
    std::fs::create_dir_all(state).unwrap();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    CoordinatorProc::start(state, &refs)
}

/// `value` by `key` from the training log's records of `kind` (the last record wins when a key
/// was logged twice, as after a resume).
fn log_values(out: &Path, kind: &str, key: &str, value: &str) -> BTreeMap<u64, f64> {
    logged_records(out, kind)
        .iter()
        .map(|r| (r[key].as_u64().unwrap(), r[value].as_f64().unwrap()))
        .collect()
}

/// Loss per global step.
fn losses(out: &Path) -> BTreeMap<u64, f64> {
    log_values(out, "train", "step", "loss")
}

/// Mean training loss per epoch, from the evaluation records.
fn epoch_train_losses(out: &Path) -> BTreeMap<u64, f64> {
    log_values(out, "eval", "epoch", "train_loss")
}

fn wait_state(c: &CoordinatorProc, state: &str, timeout: Duration) -> Value {
    wait_for(&format!("job-1 to be {state}"), timeout, || {
        let s = c.status(Some("job-1"));
        assert!(
            !(s["state"] == "FAILED" && state != "FAILED"),
            "job failed: {s}\n{}",
            c.log()
        );
        (s["state"] == state).then_some(s)
    })
}

fn client(c: &CoordinatorProc, args: &[&str]) -> std::process::Output {
    c.client(args)
}

/// Steps per epoch of a job (its total over its epochs).
fn steps_per_epoch(status: &Value, epochs: u32) -> u64 {
    status["total_steps"].as_u64().unwrap() / u64::from(epochs)
}

/// The `start` records of a run's training log (one per attempt), in order.
fn starts(out: &Path) -> Vec<Value> {
    training_log(out).into_iter().filter(|r| r["type"] == "start").collect()
}

/// The first `train` record after the last `start` record: where the last attempt went on.
fn first_step_of_last_attempt(out: &Path) -> u64 {
    let log = training_log(out);
    let last_start = log.iter().rposition(|r| r["type"] == "start").unwrap();
    log[last_start..]
        .iter()
        .find(|r| r["type"] == "train")
        .and_then(|r| r["step"].as_u64())
        .unwrap()
}

/// Kills job-1 (of `epochs` epochs) after its first evaluation, early in an epoch so the stop
/// lands mid-epoch (asserted); returns the status it was KILLED with.
fn kill_mid_epoch(c: &CoordinatorProc, epochs: u32) -> Value {
    // The wait lasts while the job makes progress (a loaded machine only slows it down); a job
    // that stalls, or ends before the window, fails the test at once with what was seen.
    const STALLED: Duration = Duration::from_secs(60);
    const AT_MOST: Duration = Duration::from_secs(600);
    let started = Instant::now();
    let (mut last_step, mut last_change) = (0, Instant::now());
    let mut seen = Vec::new();
    loop {
        let s = c.status(Some("job-1"));
        let evaluated = s["val_loss_history"].as_array().is_some_and(|h| !h.is_empty());
        let step = s["global_step"].as_u64().unwrap_or(0);
        let per_epoch = steps_per_epoch(&s, epochs).max(1);
        if seen.len() == 40 {
            seen.remove(0);
        }
        seen.push(format!("{} step {step} evaluated {evaluated}", s["state"]));
        // Early in the epoch: the kill takes a few steps to land, well before its end.
        let early = (2..=per_epoch / 3).contains(&(step % per_epoch));
        if evaluated && step >= 32 && early {
            break;
        }
        assert!(
            s["state"] == "RUNNING" || s["state"] == "PENDING",
            "job-1 ended before a kill could land early in an epoch after its first evaluation: {s}\nlast statuses: {seen:?}\n{}",
            c.log()
        );
        if step != last_step {
            (last_step, last_change) = (step, Instant::now());
        }
        assert!(
            last_change.elapsed() < STALLED && started.elapsed() < AT_MOST,
            "no kill window after {:?} (no progress for {:?}): {s}\nlast statuses: {seen:?}\n{}",
            started.elapsed(),
            last_change.elapsed(),
            c.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = client(c, &["kill", "--job", "job-1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = wait_state(c, "KILLED", Duration::from_secs(60));
    let checkpoint = &status["latest_checkpoint"];
    let path = checkpoint["path"].as_str();
    assert!(path.is_some(), "a checkpoint is registered: {status}");
    let stopped_at = status["global_step"].as_u64().unwrap();
    assert_eq!(checkpoint["global_step"], stopped_at, "{status}");
    assert_ne!(
        stopped_at % steps_per_epoch(&status, epochs),
        0,
        "the kill landed mid-epoch: {status}"
    );
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(path.unwrap()).join("trainer_state.json")).unwrap())
            .unwrap();
    assert_ne!(state["next_step"], 0, "the stop checkpoint is mid-epoch: {state}");
    status
}

#[test]
fn kill_and_resume_continue_exactly_also_on_one_worker_and_past_a_damaged_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // train.tsv: epochs of ~490 steps, so a kill sent early in an epoch lands mid-epoch although
    // a status poll takes longer than a dev.tsv epoch.
    let epochs = 2;
    let job_args = |d: &Path, out: &Path, workers, epochs| job_args_on(d, out, workers, epochs, "train.tsv");

    // The uninterrupted reference.
    let reference = d.join("reference");
    let mut args = job_args(d, &reference, 2, epochs);
    args.push("--exit-when-done".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(Command::new(binary("coordinator")).args(&refs).args([
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        d.join("ref-state").to_str().unwrap(),
    ]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let expected = losses(&reference);

    // Killed mid-epoch, resumed with the same two workers.
    let resumed = d.join("resumed");
    let c = start(&d.join("state-a"), &job_args(d, &resumed, 2, epochs));
    let stopped_at = kill_mid_epoch(&c, epochs)["global_step"].as_u64().unwrap();
    assert!(stopped_at < *expected.keys().last().unwrap());
    let before = c.status(Some("job-1"));
    let out = client(&c, &["resume", "--job", "job-1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // `watch` follows the job live (JSON lines) and returns when it ends.
    let out = client(&c, &["watch", "--job", "job-1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let updates: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(updates.last().unwrap()["state"], "SUCCEEDED", "{updates:?}");
    let done = wait_state(&c, "SUCCEEDED", Duration::from_secs(120));
    assert_eq!(done["restarts"], 1);
    assert_eq!(
        done["automatic_restarts"], 0,
        "a user resume is not an automatic restart"
    );
    let out = client(&c, &["list", "--json"]);
    let jobs: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(jobs.as_array().unwrap().len(), 1);
    assert_eq!(jobs[0]["job_id"], "job-1");
    assert_eq!(jobs[0]["state"], "SUCCEEDED");
    // The early-stop counters and history carried over.
    let history = done["val_loss_history"].as_array().unwrap();
    assert_eq!(history.len(), epochs as usize);
    assert_eq!(history[0], before["val_loss_history"][0]);
    let got = losses(&resumed);
    assert_eq!(got.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
    for (step, loss) in &got {
        let diff = (loss - expected[step]).abs();
        assert!(
            diff <= 1e-5,
            "step {step}: loss {loss} vs {} uninterrupted",
            expected[step]
        );
    }
    // The epoch means include the steps before the kill (their sums are in the checkpoint).
    let (want, have) = (epoch_train_losses(&reference), epoch_train_losses(&resumed));
    assert_eq!(want.len(), epochs as usize);
    assert_eq!(have.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (epoch, loss) in &have {
        assert!(
            (loss - want[epoch]).abs() <= 1e-5,
            "epoch {epoch}: train loss {loss} vs {}",
            want[epoch]
        );
    }
    assert!(resumed.join("loss_curve.png").is_file());
    // The resume continued from the stop checkpoint, at the step after it.
    let resumed_starts = starts(&resumed);
    assert_eq!(resumed_starts.len(), 2, "{resumed_starts:?}");
    assert_eq!(resumed_starts[1]["step"], stopped_at);
    assert_eq!(first_step_of_last_attempt(&resumed), stopped_at + 1);
    let diff = max_weight_diff(
        &reference.join("final/model.safetensors"),
        &resumed.join("final/model.safetensors"),
    );
    eprintln!("kill at step {stopped_at} + resume (2 workers): max abs weight diff {diff:e}");
    assert!(diff <= 1e-5, "{diff}");

    // Killed mid-epoch, its newest checkpoint damaged, resumed on ONE worker.
    let other = d.join("other");
    let c2 = start(&d.join("state-b"), &job_args(d, &other, 2, epochs));
    let killed = kill_mid_epoch(&c2, epochs);
    let stopped_at = killed["global_step"].as_u64().unwrap();
    // The previous complete checkpoint: the one of the last evaluated epoch's end.
    let evaluated = killed["val_loss_history"].as_array().unwrap().len() as u64;
    let previous_step = evaluated * steps_per_epoch(&killed, epochs);
    assert!(previous_step < stopped_at);
    let latest = PathBuf::from(killed["latest_checkpoint"]["path"].as_str().unwrap());
    let previous = latest.with_file_name(format!("step-{previous_step}"));
    assert!(previous.join("trainer_state.json").is_file(), "{}", previous.display());
    let optim = latest.join("optim-rank1.safetensors");
    let bytes = std::fs::read(&optim).unwrap();
    std::fs::write(&optim, &bytes[..bytes.len() / 2]).unwrap();
    let out = client(&c2, &["resume", "--job", "job-1", "--world_size", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let done = wait_state(&c2, "SUCCEEDED", Duration::from_secs(180));
    assert_eq!(done["world_size"], 1);
    assert_eq!(done["workers"].as_array().unwrap().len(), 1);
    // The damaged checkpoint failed its attempt (CHECKPOINT_UNREADABLE); the coordinator then
    // assigned the previous complete one, and the run went on from the step after it.
    let other_starts = starts(&other);
    let used = other_starts.last().unwrap();
    assert_eq!(used["checkpoint"], previous.display().to_string(), "{other_starts:?}");
    assert_eq!(used["step"], previous_step);
    assert_eq!(used["world_size"], 1);
    assert_eq!(first_step_of_last_attempt(&other), previous_step + 1);
    eprintln!(
        "damaged {} (step {stopped_at}): resumed from {} (step {previous_step})",
        latest.display(),
        previous.display()
    );
    let diff = max_weight_diff(
        &reference.join("final/model.safetensors"),
        &other.join("final/model.safetensors"),
    );
    eprintln!("kill at step {stopped_at}, damaged checkpoint, resume on 1 worker: max abs weight diff {diff:e}");
    // One rank sums the gradients in another order than two, so the runs agree to rounding at
    // first and drift apart after (Adam amplifies the 1e-7 differences chaotically: the final
    // weights have differed by 6e-4 to 9e-3 from run to run). The first steps after the resume
    // are compared tightly (a lost or misplaced optimizer partition shows at once), the end by
    // its dev loss.
    let got = losses(&other);
    let after: Vec<(&u64, &f64)> = got.range(previous_step + 1..).take(10).collect();
    assert_eq!(after.len(), 10);
    for (step, loss) in after {
        let d = (loss - expected[step]).abs();
        assert!(
            d <= 1e-5,
            "step {step} after the resume on 1 worker: loss {loss} vs {}",
            expected[step]
        );
    }
    let dev_loss = |out: &Path| *log_values(out, "eval", "epoch", "val_loss").values().last().unwrap();
    let (want, have) = (dev_loss(&reference), dev_loss(&other));
    eprintln!("final dev loss: {have} resumed on 1 worker, {want} uninterrupted");
    assert!((have - want).abs() <= 1e-3 * want, "dev loss {have} vs {want}");
}

#[test]
fn a_coordinator_killed_and_restarted_finds_its_job_and_finishes_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let args = job_args(d, &d.join("out"), 2, 40);
    let mut c = start(&state, &args);
    let before = wait_for("training progress", Duration::from_secs(120), || {
        let s = c.status(Some("job-1"));
        (s["global_step"].as_u64().unwrap_or(0) >= 5).then_some(s)
    });
    c.proc.signal(Signal::SIGKILL);
    c.proc.wait_exit(Duration::from_secs(10));
    let listen = c.url.trim_start_matches("http://").to_string();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let restarted = CoordinatorProc::start_listening(&state, &listen, &refs);
    let status = restarted.status(Some("job-1"));
    assert!(status["global_step"].as_u64().unwrap() >= before["global_step"].as_u64().unwrap());
    let done = wait_state(&restarted, "SUCCEEDED", Duration::from_secs(180));
    assert_eq!(done["restarts"], 0, "the workers carried on; nothing was restarted");
    assert!(done["workers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|w| w["incarnation"].as_u64().unwrap() >= 2));
}

#[test]
fn a_killed_worker_is_restarted_from_the_latest_checkpoint_when_restarts_remain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut args = job_args(d, &d.join("out"), 2, 12);
    args.extend([
        "--max_restarts".to_string(),
        "1".to_string(),
        "--checkpoint_steps".to_string(),
        "5".to_string(),
    ]);
    let out = d.join("out");
    let c = start(&d.join("state"), &args);
    let running = wait_for("a checkpoint", Duration::from_secs(120), || {
        let s = c.status(Some("job-1"));
        s["latest_checkpoint"]["path"].as_str().is_some().then_some(s)
    });
    let registered_before = running["latest_checkpoint"]["global_step"].as_u64().unwrap();
    assert!(registered_before > 0);
    let pid = running["workers"][1]["pid"].as_u64().unwrap() as i32;
    // Local workers share the cores instead of each taking all of them (libtorch's default).
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let threads = environ.split(|b| *b == 0).find_map(|v| {
        v.strip_prefix(b"OMP_NUM_THREADS=")
            .map(|n| String::from_utf8_lossy(n).to_string())
    });
    let cores = std::thread::available_parallelism().unwrap().get();
    let expected = std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| (cores / 2).max(1).to_string());
    assert_eq!(threads.as_deref(), Some(expected.as_str()));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let done = wait_state(&c, "SUCCEEDED", Duration::from_secs(180));
    assert_eq!(done["restarts"], 1, "{done}");
    // The restart continued from a registered checkpoint (not from scratch), at the step after it.
    let attempts = starts(&out);
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    let restart = &attempts[1];
    let checkpoint_step = restart["step"].as_u64().unwrap();
    assert!(checkpoint_step >= registered_before, "{restart}");
    assert_eq!(restart["attempt"], 2, "{restart}");
    assert_eq!(
        restart["checkpoint"],
        out.join(format!("checkpoints/step-{checkpoint_step}"))
            .display()
            .to_string()
    );
    assert_eq!(first_step_of_last_attempt(&out), checkpoint_step + 1);
}

#[test]
fn an_early_stopped_job_stays_succeeded_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut args = job_args(d, &d.join("out"), 1, 40);
    let patience = args.iter().position(|a| a == "--max_stop_number").unwrap();
    args[patience + 1] = "1".into();
    let lr = args.iter().position(|a| a == "--config").unwrap();
    let hot = d.join("hot.json");
    std::fs::write(
        &hot,
        r#"{"train_batch_size": 16, "optimizer": {"type": "AdamW", "params": {"lr": 3e-2, "weight_decay": 0.0}}}"#,
    )
    .unwrap();
    args[lr + 1] = hot.to_str().unwrap().into();
    let c = start(&d.join("state"), &args);
    let done = wait_state(&c, "SUCCEEDED", Duration::from_secs(300));
    assert_eq!(done["early_stopped"], true, "{done}");
    assert_eq!(done["stop_count"], 1);
    let out = client(&c, &["resume", "--job", "job-1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already SUCCEEDED (early stopped)"));
    assert_eq!(c.status(Some("job-1"))["state"], "SUCCEEDED");
}
