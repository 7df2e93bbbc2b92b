//! Training faults with real processes, files and signals: a run killed and resumed equals the
//! uninterrupted one with dropout (2 workers under the coordinator, and `worker train`); an
//! output directory of another run is refused; a full disk (RLIMIT_FSIZE, EFBIG) during a
//! checkpoint or a model save leaves the previous complete checkpoint intact and registered,
//! with an error naming the file and the OS error; augmentation parts of another augmentation
//! are discarded.

use kormlm_e2e::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Training flags on the dropout model. `data`: a file of the Korean HateSpeech corpus.
fn train_flags(dir: &Path, out: &Path, data: &str, extra: &[&str]) -> Vec<String> {
    let data = shared_data().join("korean-hate-speech/labeled").join(data);
    let mut flags = strings(&[
        "--config",
        zero2_config(dir).to_str().unwrap(),
        "--model_name_or_path",
        tiny_dropout_model().to_str().unwrap(),
        "--data_path",
        data.to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
        "--max_seq_len",
        "32",
        "--seed",
        "7",
    ]);
    flags.extend(strings(extra));
    flags
}

/// `worker train FLAGS`, spawned, with a token cache of its own beside the output directory.
fn worker_train(name: &str, flags: &[String], customise: impl FnOnce(&mut Command)) -> Proc {
    let out = flags
        .iter()
        .position(|f| f == "--output_dir")
        .map(|i| PathBuf::from(&flags[i + 1]))
        .expect("an --output_dir");
    let cache = out.with_file_name("tokens");
    let mut command = Command::new(binary("worker"));
    command
        .arg("train")
        .args(flags)
        .arg("--cache_dir")
        .arg(cache)
        .stdout(std::process::Stdio::null());
    command.stderr(std::process::Stdio::piped());
    customise(&mut command);
    Proc::spawn(name, &mut command)
}

/// Runs `worker train FLAGS` to completion: (success, stderr).
fn worker_train_to_end(flags: &[String], customise: impl FnOnce(&mut Command)) -> (bool, String) {
    let proc = worker_train("worker train", flags, customise);
    let out = wait_output(proc, Duration::from_secs(600));
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Waits for a spawned process's exit and output, killing it after `timeout`.
fn wait_output(mut proc: Proc, timeout: Duration) -> std::process::Output {
    let mut stderr = proc.child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = std::io::Read::read_to_end(s, &mut text);
        }
        text
    });
    let status = proc.wait_exit(timeout);
    std::process::Output {
        status,
        stdout: Vec::new(),
        stderr: reader.join().unwrap(),
    }
}

/// Every record of `kind` by global step (each step must be logged once).
fn records(out: &Path, kind: &str) -> BTreeMap<u64, Value> {
    let mut by_step = BTreeMap::new();
    for record in training_log(out).into_iter().filter(|r| r["type"] == kind) {
        let step = record["step"].as_u64().unwrap();
        assert!(
            by_step.insert(step, record.clone()).is_none(),
            "{}: step {step} logged twice as {kind}",
            out.display()
        );
    }
    by_step
}

/// The logged train losses and eval losses of `resumed` are those of `reference`, exactly, step
/// by step; returns how many train records were compared.
fn assert_same_log(reference: &Path, resumed: &Path) -> usize {
    for (kind, key) in [("train", "loss"), ("eval", "val_loss"), ("eval", "train_loss")] {
        let (want, have) = (records(reference, kind), records(resumed, kind));
        assert_eq!(
            have.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{kind} records"
        );
        for (step, record) in &have {
            assert_eq!(
                record[key], want[step][key],
                "{kind} {key} at step {step}: resumed vs uninterrupted"
            );
        }
    }
    records(reference, "train").len()
}

fn final_weights(out: &Path) -> PathBuf {
    out.join("final/model.safetensors")
}

fn trainer_state(checkpoint: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(checkpoint.join("trainer_state.json")).unwrap()).unwrap()
}

fn coordinator_client(c: &CoordinatorProc, args: &[&str]) -> std::process::Output {
    c.client(args)
}

fn wait_job(c: &CoordinatorProc, state: &str, timeout: Duration) -> Value {
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

#[test]
fn a_job_killed_mid_epoch_and_resumed_equals_the_uninterrupted_run_with_dropout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // train.tsv has ~490 steps an epoch: every step before the limit is mid-epoch.
    let job = |out: &Path| {
        let mut flags = train_flags(
            d,
            out,
            "train.tsv",
            &["--max_steps", "200", "--logging_steps", "10", "--num_train_epochs", "1"],
        );
        flags.extend(strings(&["--num_workers", "2", "--device", "cpu"]));
        flags
    };

    let reference = d.join("reference");
    let mut flags = job(&reference);
    flags.extend(strings(&["--exit-when-done", "--listen", "127.0.0.1:0", "--state-dir"]));
    flags.push(d.join("ref-state").display().to_string());
    let out = run(Command::new(binary("coordinator")).args(&flags));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let resumed = d.join("resumed");
    let state = d.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let flags = job(&resumed);
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let c = CoordinatorProc::start(&state, &refs);
    wait_for("60 steps", Duration::from_secs(300), || {
        (c.status(Some("job-1"))["global_step"].as_u64().unwrap_or(0) >= 60).then_some(())
    });
    let kill = coordinator_client(&c, &["kill", "--job", "job-1"]);
    assert!(kill.status.success(), "{}", String::from_utf8_lossy(&kill.stderr));
    let killed = wait_job(&c, "KILLED", Duration::from_secs(120));
    let stopped_at = killed["global_step"].as_u64().unwrap();
    assert!(
        killed["epoch"] == 0 && (60..200).contains(&stopped_at),
        "the kill landed mid-epoch: {killed}"
    );
    let checkpoint = PathBuf::from(killed["latest_checkpoint"]["path"].as_str().unwrap());
    assert_eq!(killed["latest_checkpoint"]["global_step"], stopped_at);
    let saved = trainer_state(&checkpoint);
    assert_eq!(saved["version"], 2);
    assert_eq!(saved["next_step"], stopped_at, "mid-epoch: the next step of epoch 0");
    assert_eq!(
        saved["rng_states"],
        serde_json::json!([{"rank": 0, "file": "rng-rank0.safetensors"}, {"rank": 1, "file": "rng-rank1.safetensors"}])
    );
    assert_eq!(saved["log_window"]["last_logged_step"], stopped_at / 10 * 10);
    let mid_window = !stopped_at.is_multiple_of(10);
    if mid_window {
        assert!(saved["log_window"]["masked"].as_f64().unwrap() > 0.0, "{saved}");
    }

    let resume = coordinator_client(&c, &["resume", "--job", "job-1"]);
    assert!(resume.status.success(), "{}", String::from_utf8_lossy(&resume.stderr));
    wait_job(&c, "SUCCEEDED", Duration::from_secs(300));
    let starts: Vec<Value> = training_log(&resumed)
        .into_iter()
        .filter(|r| r["type"] == "start")
        .collect();
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_eq!(starts[1]["step"], stopped_at);
    assert_eq!(starts[1]["checkpoint"], checkpoint.display().to_string());
    let compared = assert_same_log(&reference, &resumed);
    let diff = max_weight_diff(&final_weights(&reference), &final_weights(&resumed));
    eprintln!(
        "2 workers, dropout 0.1: killed at step {stopped_at} (mid-window: {mid_window}), resumed: {compared} train \
         losses equal, max abs weight diff {diff:e}"
    );
    assert!(diff <= 1e-5, "{diff}");
}

#[test]
fn worker_train_killed_or_stopped_and_resumed_equals_the_uninterrupted_run_with_dropout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // dev.tsv: under 30 steps an epoch; checkpoints every 23 steps land mid-epoch and, with a
    // record every 10 steps, mid-window.
    let flags = |out: &Path| {
        train_flags(
            d,
            out,
            "dev.tsv",
            &[
                "--num_train_epochs",
                "6",
                "--max_steps",
                "150",
                "--logging_steps",
                "10",
                "--checkpoint_steps",
                "23",
                "--keep_checkpoints",
                "20",
            ],
        )
    };
    let reference = d.join("reference");
    let (ok, stderr) = worker_train_to_end(&flags(&reference), |_| {});
    assert!(ok, "{stderr}");

    let resumed = d.join("resumed");
    let mut proc = worker_train("worker train", &flags(&resumed), |c| {
        c.stderr(std::process::Stdio::null());
    });
    let checkpoint = resumed.join("checkpoints/step-46");
    wait_for(
        "the step-46 checkpoint and a step past it",
        Duration::from_secs(300),
        || {
            let log = std::fs::read_to_string(resumed.join("training_log.jsonl")).unwrap_or_default();
            (checkpoint.join("trainer_state.json").is_file() && log.contains("\"step\":50")).then_some(())
        },
    );
    proc.signal(Signal::SIGKILL);
    let status = proc.wait_exit(Duration::from_secs(30));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "killed, not finished"
    );
    let saved = trainer_state(&checkpoint);
    let steps_per_epoch = *records(&reference, "eval").keys().next().unwrap();
    assert!(
        46 % steps_per_epoch != 0,
        "step 46 is mid-epoch ({steps_per_epoch} steps an epoch)"
    );
    assert_eq!(
        (saved["epoch"].as_u64(), saved["next_step"].as_u64()),
        (Some(46 / steps_per_epoch), Some(46 % steps_per_epoch))
    );
    assert_eq!(saved["log_window"]["last_logged_step"], 40);
    assert!(saved["log_window"]["samples"].as_u64().unwrap() == 6 * 16, "{saved}");

    let mut resume = flags(&resumed);
    resume.extend(strings(&["--resume_from", checkpoint.to_str().unwrap()]));
    let (ok, stderr) = worker_train_to_end(&resume, |_| {});
    assert!(ok, "{stderr}");
    let compared = assert_same_log(&reference, &resumed);
    let diff = max_weight_diff(&final_weights(&reference), &final_weights(&resumed));
    eprintln!("worker train, dropout 0.1: SIGKILL past step 50, resumed from step 46: {compared} train losses equal, max abs weight diff {diff:e}");
    assert!(diff <= 1e-5, "{diff}");
    // The log lists every checkpoint once, as the uninterrupted run's does.
    let listed = records(&resumed, "checkpoint");
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        records(&reference, "checkpoint").keys().collect::<Vec<_>>()
    );
    assert!(listed.contains_key(&23) && listed.contains_key(&46) && listed.contains_key(&150));
    for (step, record) in &listed {
        let path = PathBuf::from(record["path"].as_str().unwrap());
        assert_eq!(path, resumed.join(format!("checkpoints/step-{step}")));
        assert_complete(&path);
    }
    // Its checkpoints name one run; the second attempt is 2.
    let run: Value = serde_json::from_str(&std::fs::read_to_string(resumed.join("kormlm_run.json")).unwrap()).unwrap();
    let last = trainer_state(&resumed.join("checkpoints/step-150"));
    assert_eq!(last["run_id"], run["run_id"]);
    assert_eq!(
        (saved["attempt"].as_u64(), last["attempt"].as_u64()),
        (Some(1), Some(2))
    );

    // SIGTERM instead of SIGKILL: the run stops after its step with a checkpoint there and
    // exits 143, naming the checkpoint; resumed from it, it ends like the uninterrupted run.
    let stopped = d.join("stopped");
    let proc = worker_train("worker train (SIGTERM)", &flags(&stopped), |_| {});
    wait_for("a step past 30", Duration::from_secs(300), || {
        let log = std::fs::read_to_string(stopped.join("training_log.jsonl")).unwrap_or_default();
        log.contains("\"step\":30").then_some(())
    });
    proc.signal(Signal::SIGTERM);
    let out = wait_output(proc, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("worker: stopped by SIGTERM after step "))
        .unwrap_or_else(|| panic!("no stop line: {stderr}"));
    let (step, path) = line
        .split_once("; continue with --resume_from ")
        .unwrap_or_else(|| panic!("no checkpoint named: {line}"));
    let step: u64 = step.parse().unwrap();
    assert!((30..150).contains(&step), "{line}");
    let stop_checkpoint = PathBuf::from(path);
    assert_eq!(stop_checkpoint, stopped.join(format!("checkpoints/step-{step}")));
    assert_complete(&stop_checkpoint);
    let mut resume = flags(&stopped);
    resume.extend(strings(&["--resume_from", path]));
    let (ok, stderr) = worker_train_to_end(&resume, |_| {});
    assert!(ok, "{stderr}");
    let compared = assert_same_log(&reference, &stopped);
    let diff = max_weight_diff(&final_weights(&reference), &final_weights(&stopped));
    eprintln!("worker train, dropout 0.1: SIGTERM, stopped at step {step}, resumed: {compared} train losses equal, max abs weight diff {diff:e}");
    assert!(diff <= 1e-5, "{diff}");
}

#[test]
fn another_runs_output_directory_is_refused_naming_it_unless_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    let flags = train_flags(d, &out, "dev.tsv", &["--max_steps", "3", "--logging_steps", "1"]);
    let (ok, stderr) = worker_train_to_end(&flags, |_| {});
    assert!(ok, "{stderr}");
    let first: Value = serde_json::from_str(&std::fs::read_to_string(out.join("kormlm_run.json")).unwrap()).unwrap();
    let first_id = first["run_id"].as_str().unwrap().to_string();
    assert_eq!(first["job_id"], Value::Null);
    let log_before = std::fs::read(out.join("training_log.jsonl")).unwrap();

    // A second, unrelated run into the same directory.
    let (ok, stderr) = worker_train_to_end(&flags, |_| {});
    assert!(!ok);
    assert!(
        stderr.contains(&format!("holds the output of run {first_id} (worker train)"))
            && stderr.contains("--overwrite_output_dir"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(out.join("training_log.jsonl")).unwrap(),
        log_before,
        "nothing touched"
    );

    // The same run resumed from its own checkpoint appends to its log.
    let mut resume = train_flags(d, &out, "dev.tsv", &["--max_steps", "5", "--logging_steps", "1"]);
    resume.extend(strings(&[
        "--resume_from",
        out.join("checkpoints/step-3").to_str().unwrap(),
    ]));
    let (ok, stderr) = worker_train_to_end(&resume, |_| {});
    assert!(ok, "{stderr}");
    let log = training_log(&out);
    let before = training_log_records(&log_before);
    assert_eq!(before.last().unwrap()["type"], "summary");
    assert!(log.starts_with(&before[..before.len() - 1]), "{log:?}");
    let steps: Vec<u64> = log
        .iter()
        .filter(|r| r["type"] == "train")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5]);

    // --overwrite_output_dir removes that run's files (and only those) and starts afresh.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let mut overwrite = flags.clone();
    overwrite.push("--overwrite_output_dir".into());
    let (ok, stderr) = worker_train_to_end(&overwrite, |_| {});
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains(&format!("removed the files of run {first_id}")),
        "{stderr}"
    );
    let second: Value = serde_json::from_str(&std::fs::read_to_string(out.join("kormlm_run.json")).unwrap()).unwrap();
    assert_ne!(second["run_id"], first_id.as_str());
    let steps: Vec<u64> = training_log(&out)
        .iter()
        .filter(|r| r["type"] == "train")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3]);
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
    let checkpoints: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(checkpoints, vec!["step-3"], "the first run's step-5 is gone");
    assert_eq!(
        trainer_state(&out.join("checkpoints/step-3"))["run_id"],
        second["run_id"]
    );
}

fn training_log_records(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The `step-N` directories under `root`, and whatever else is there, sorted.
fn entries(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

/// Every file a checkpoint's state lists is there and whole.
fn assert_complete(checkpoint: &Path) {
    let state = trainer_state(checkpoint);
    let mut files: Vec<PathBuf> = state["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| checkpoint.join(format!("optim-rank{}.safetensors", p["rank"])))
        .collect();
    files.extend(
        state["rng_states"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| checkpoint.join(r["file"].as_str().unwrap())),
    );
    files.push(checkpoint.join("model/model.safetensors"));
    for file in files {
        let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
}

/// Below the size of an optimizer partition or the model file (~0.9 MB each for the tiny
/// model), above everything else a run writes (log, state, run file, generator states).
const SMALL_DISK: u64 = 512 * 1024;

#[test]
fn a_full_disk_during_a_checkpoint_or_a_model_save_keeps_the_previous_complete_ones() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    let flags = |extra: &[&str]| train_flags(d, &out, "dev.tsv", &[&["--logging_steps", "5"], extra].concat());
    // A first run to step 10 (its epoch-0 end at step 10 evaluates, saves best/ and a checkpoint).
    let (ok, stderr) = worker_train_to_end(&flags(&["--max_steps", "10"]), |_| {});
    assert!(ok, "{stderr}");
    let previous = out.join("checkpoints/step-10");
    assert_complete(&previous);
    let best_before = std::fs::read(out.join("best/model.safetensors")).unwrap();

    // Resumed on a "full disk": its first periodic checkpoint (step 12) cannot be written.
    let mut resume = flags(&["--max_steps", "40", "--checkpoint_steps", "3"]);
    resume.extend(strings(&["--resume_from", previous.to_str().unwrap()]));
    let (ok, stderr) = worker_train_to_end(&resume, |c| limit_file_size(c, SMALL_DISK));
    assert!(!ok, "{stderr}");
    let failed = out.join("checkpoints/step-12");
    assert!(
        stderr.contains(&format!("checkpoint {} not written: rank 0 failed", failed.display()))
            && stderr.contains(".step-12.tmp/optim-rank0.safetensors")
            && stderr.contains("File too large (os error 27)"),
        "{stderr}"
    );
    assert_eq!(
        entries(&out.join("checkpoints")),
        vec!["best", "step-10"],
        "nothing half-written"
    );
    assert_complete(&previous);
    // The log is whole (every line parses) and stops before the failed step's record.
    let log = training_log(&out);
    assert_eq!(log.iter().filter_map(|r| r["step"].as_u64()).max(), Some(10));

    // The best model's save at the end of the next epoch fails the same way; best/ stays.
    let mut resume = flags(&["--max_steps", "40"]);
    resume.extend(strings(&["--resume_from", previous.to_str().unwrap()]));
    let (ok, stderr) = worker_train_to_end(&resume, |c| limit_file_size(c, SMALL_DISK));
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("/.best.tmp-") && stderr.contains("model.safetensors: File too large (os error 27)"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(out.join("best/model.safetensors")).unwrap(), best_before);
    let leftovers: Vec<String> = entries(&out).into_iter().filter(|n| n.starts_with('.')).collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    assert_complete(&previous);

    // With room again, the run resumes from the intact checkpoint and finishes.
    let (ok, stderr) = worker_train_to_end(&resume, |_| {});
    assert!(ok, "{stderr}");
    assert!(final_weights(&out).is_file());
}

#[test]
fn a_rank_that_cannot_write_its_part_fails_the_checkpoint_for_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    let state = d.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut flags = train_flags(
        d,
        &out,
        "train.tsv",
        &[
            "--max_steps",
            "300",
            "--logging_steps",
            "5",
            "--num_train_epochs",
            "1",
            "--checkpoint_steps",
            "7",
        ],
    );
    flags.extend(strings(&["--world_size", "2"]));
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let c = CoordinatorProc::start(&state, &refs);
    let mut workers = [c.worker(0), c.worker(1)];
    wait_for("a registered checkpoint", Duration::from_secs(300), || {
        c.status(Some("job-1"))["latest_checkpoint"]["path"]
            .as_str()
            .map(|_| ())
    });
    let kill = coordinator_client(&c, &["kill", "--job", "job-1"]);
    assert!(kill.status.success(), "{}", String::from_utf8_lossy(&kill.stderr));
    let killed = wait_job(&c, "KILLED", Duration::from_secs(120));
    let registered = killed["latest_checkpoint"].clone();
    let previous = PathBuf::from(registered["path"].as_str().unwrap());
    assert_complete(&previous);

    // The workers leave with their job. It resumes with rank 1 on a full disk, where its next
    // checkpoint fails.
    for worker in &mut workers {
        worker.wait_exit(Duration::from_secs(60));
    }
    let resume = coordinator_client(&c, &["resume", "--job", "job-1"]);
    assert!(resume.status.success(), "{}", String::from_utf8_lossy(&resume.stderr));
    let _rank0 = c.worker(0);
    let _rank1 = c.worker_customised(1, &[], |command| limit_file_size(command, SMALL_DISK));
    let failed = wait_job(&c, "FAILED", Duration::from_secs(300));
    let message = failed["message"].as_str().unwrap_or_default();
    assert!(message.contains("not written: rank 1 failed"), "{failed}");
    assert_eq!(
        failed["latest_checkpoint"], registered,
        "the previous complete checkpoint stays registered"
    );
    let root = out.join("checkpoints");
    let steps: Vec<String> = entries(&root).into_iter().filter(|n| n.contains("step-")).collect();
    let newest = steps
        .iter()
        .filter_map(|n| n.strip_prefix("step-")?.parse::<u64>().ok())
        .max();
    assert_eq!(
        newest,
        registered["global_step"].as_u64(),
        "no newer checkpoint: {steps:?}"
    );
    assert!(
        steps.iter().all(|n| !n.starts_with('.')),
        "no temporary directory left: {steps:?}"
    );
    assert_complete(&previous);
    let rank1_log = std::fs::read_to_string(state.with_extension("worker-1.log")).unwrap_or_default();
    assert!(rank1_log.contains("File too large (os error 27)"), "{rank1_log}");
}

#[test]
fn worker_augment_on_a_full_disk_fails_naming_the_output_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("docs.txt");
    let corpus = std::fs::read_to_string(shared_data().join("korean-hate-speech/labeled/train.tsv")).unwrap();
    let docs: Vec<&str> = corpus
        .lines()
        .skip(1)
        .filter_map(|l| l.split('\t').next())
        .take(800)
        .collect();
    std::fs::write(&input, docs.join("\n") + "\n").unwrap();
    let output = dir.path().join("out.csv");
    let mut command = Command::new(binary("worker"));
    command
        .args(["augment", "--model", tiny_model().to_str().unwrap()])
        .args([
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--num_augmentations",
            "2",
        ]);
    limit_file_size(&mut command, 16 * 1024);
    let out = run(&mut command);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&output.display().to_string()) && stderr.contains("File too large (os error 27)"),
        "{stderr}"
    );
    assert_eq!(entries(dir.path()), vec!["docs.txt"], "no output, no temporary file");
}

#[test]
fn an_augmentation_job_discards_the_parts_of_another_augmentation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = d.join("docs.txt");
    let corpus = std::fs::read_to_string(shared_data().join("korean-hate-speech/labeled/train.tsv")).unwrap();
    let docs: Vec<&str> = corpus
        .lines()
        .skip(1)
        .filter_map(|l| l.split('\t').next())
        .take(1100)
        .collect();
    std::fs::write(&input, docs.join("\n") + "\n").unwrap();
    let model = tiny_model();
    let common = ["--seed", "5", "--max_seq_len", "64", "--num_augmentations", "2"];
    let reference = d.join("reference.csv");
    let out = run(Command::new(binary("worker"))
        .args([
            "augment",
            "--model",
            model.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
        ])
        .args(["--output", reference.to_str().unwrap()])
        .args(common));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // What an augmentation with another seed left: a manifest, parts, a crashed writer's temp file.
    let output = d.join("out.csv");
    let parts = kormlm_proto::augment_parts::parts_dir(&output);
    std::fs::create_dir_all(&parts).unwrap();
    let stale = kormlm_proto::augment_parts::PartsManifest {
        input_sha256: "0".repeat(64),
        model_sha256: "0".repeat(64),
        seed: 6,
        max_seq_len: 64,
        options: serde_json::json!({}),
        format: "csv".into(),
        chunk_rows: 512,
        parts: 3,
    };
    stale.write(&parts).unwrap();
    for chunk in 0..3 {
        std::fs::write(
            kormlm_proto::augment_parts::part_path(&parts, chunk, "csv"),
            "text,augmented_1,augmented_2\nstale,stale,stale\n",
        )
        .unwrap();
    }
    std::fs::write(parts.join(".part-000001.csv.tmp-99"), "text\nhalf").unwrap();

    let state = d.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let c = CoordinatorProc::start(
        &state,
        &[
            "--task",
            "augment",
            "--num_workers",
            "2",
            "--device",
            "cpu",
            "--model_name_or_path",
            model.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--seed",
            "5",
            "--max_seq_len",
            "64",
            "--num_augmentations",
            "2",
        ],
    );
    wait_job(&c, "SUCCEEDED", Duration::from_secs(300));
    assert_eq!(
        std::fs::read_to_string(&output).unwrap(),
        std::fs::read_to_string(&reference).unwrap()
    );
    assert!(!parts.exists(), "the parts are merged and removed");
    let logs = worker_logs(&state);
    assert!(logs.contains("discarding the parts of another augmentation"), "{logs}");
}

/// Everything the workers a coordinator started wrote to their logs (`STATE/logs/…`).
fn worker_logs(state: &Path) -> String {
    let mut text = String::new();
    let mut dirs = vec![state.join("logs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                text += &std::fs::read_to_string(&path).unwrap_or_default();
            }
        }
    }
    text
}
