//! Distributed training with real coordinator and worker processes on loopback (CPU ring).

use kormlm_e2e::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn config(dir: &Path, name: &str, stage: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            r#"{{"train_batch_size": 16, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
                "optimizer": {{"type": "AdamW", "params": {{"lr": 1e-3, "betas": [0.9, 0.99], "eps": 1e-6, "weight_decay": 0.01}}}},
                "scheduler": {{"type": "WarmupLR", "params": {{"warmup_min_lr": 0, "warmup_max_lr": 1e-3, "warmup_num_steps": 4, "warmup_type": "linear"}}}},
                "zero_optimization": {{"stage": {stage}}}}}"#
        ),
    )
    .unwrap();
    path
}

/// Runs one job to completion with `--exit-when-done`; returns (output dir, final status).
fn run_job(dir: &Path, tag: &str, config: &Path, workers: u32, extra: &[&str]) -> (PathBuf, Value) {
    let state = dir.join(format!("{tag}-state"));
    let out = dir.join(format!("{tag}-out"));
    let model = tiny_model();
    let data = shared_data().join("korean-hate-speech/labeled/dev.tsv");
    let mut command = Command::new(binary("coordinator"));
    command
        .args([
            "--config",
            config.to_str().unwrap(),
            "--num_workers",
            &workers.to_string(),
            "--device",
            "cpu",
        ])
        .args([
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state.to_str().unwrap(),
            "--exit-when-done",
        ])
        .args([
            "--model_name_or_path",
            model.to_str().unwrap(),
            "--data_path",
            data.to_str().unwrap(),
        ])
        .args([
            "--output_dir",
            out.to_str().unwrap(),
            "--max_seq_len",
            "32",
            "--num_train_epochs",
            "1",
        ])
        .args(["--max_steps", "6", "--seed", "3", "--logging_steps", "1"])
        .args(extra)
        .env("KORMLM_CACHE", dir.join("cache"));
    let output = run(&mut command);
    let logs = std::fs::read_dir(state.join("logs/job-1/attempt-1"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default();
    assert!(
        output.status.success(),
        "{tag}: coordinator exited {:?}\n{}\nworker logs:\n{logs}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // The coordinator has exited; a viewer on the same state directory shows what it recorded.
    let viewer = CoordinatorProc::start(&state, &[]);
    let status = viewer.status(Some("job-1"));
    (out, status)
}

#[test]
fn two_workers_match_one_worker_and_zero2_matches_stage0() {
    let dir = tempfile::tempdir().unwrap();
    let zero2 = config(dir.path(), "zero2.json", 2);
    let stage0 = config(dir.path(), "stage0.json", 0);
    let (one, status_one) = run_job(dir.path(), "one", &zero2, 1, &[]);
    let (two, status_two) = run_job(dir.path(), "two", &zero2, 2, &[]);
    let (plain, status_plain) = run_job(dir.path(), "plain", &stage0, 2, &[]);
    for status in [&status_one, &status_two, &status_plain] {
        assert_eq!(status["state"], "SUCCEEDED", "{status}");
        assert_eq!(status["global_step"], 6);
        for w in status["workers"].as_array().unwrap() {
            assert_eq!(w["state"], "EXITED");
            assert!(
                !pid_alive(w["pid"].as_u64().unwrap() as u32),
                "worker {w} is still running"
            );
        }
    }
    let diff = max_weight_diff(
        &one.join("final/model.safetensors"),
        &two.join("final/model.safetensors"),
    );
    eprintln!("1 worker vs 2 workers (ZeRO-2): max abs weight diff {diff:e}");
    assert!(diff <= 1e-5, "1 vs 2 workers differ by {diff}");
    let diff = max_weight_diff(
        &two.join("final/model.safetensors"),
        &plain.join("final/model.safetensors"),
    );
    eprintln!("ZeRO-2 vs stage 0 (2 workers): max abs weight diff {diff:e}");
    assert!(diff <= 1e-5, "ZeRO-2 vs stage 0 differ by {diff}");

    // ZeRO-2 halves the optimizer state per rank (up to padding); stage 0 keeps it whole.
    let bytes = |s: &Value| -> Vec<u64> {
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["optimizer_state_bytes"].as_u64().unwrap())
            .collect()
    };
    let single = bytes(&status_one)[0];
    eprintln!(
        "optimizer_state_bytes: 1 worker {single}, 2 workers {:?}, stage 0 {:?}",
        bytes(&status_two),
        bytes(&status_plain)
    );
    for b in bytes(&status_two) {
        let half = single as f64 / 2.0;
        assert!((b as f64 - half).abs() <= 12.0 * 128.0, "{b} is not half of {single}");
    }
    assert!(bytes(&status_plain).iter().all(|b| *b >= single));
    assert!(two.join("training_log.jsonl").is_file() && two.join("best/model.safetensors").is_file());
}

#[test]
fn a_killed_worker_fails_the_job_naming_its_rank_and_nothing_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let zero2 = config(dir.path(), "zero2.json", 2);
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let model = tiny_model();
    let data = shared_data().join("korean-hate-speech/labeled/train.tsv");
    let out = dir.path().join("out");
    let c = CoordinatorProc::start_with_env(
        &state,
        &[
            "--config",
            zero2.to_str().unwrap(),
            "--num_workers",
            "2",
            "--device",
            "cpu",
            "--model_name_or_path",
            model.to_str().unwrap(),
            "--data_path",
            data.to_str().unwrap(),
            "--output_dir",
            out.to_str().unwrap(),
            "--max_seq_len",
            "32",
            "--num_train_epochs",
            "50",
            "--logging_steps",
            "1",
        ],
        &[("KORMLM_COLLECTIVE_TIMEOUT_S", "10")],
    );
    let progress = wait_for("training progress in status", Duration::from_secs(120), || {
        let s = c.status(None);
        (s["global_step"].as_u64().unwrap_or(0) >= 3).then_some(s)
    });
    assert!(progress["samples_per_s"].as_f64().unwrap() > 0.0, "{progress}");
    let pids: Vec<u32> = progress["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().unwrap() as u32)
        .collect();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[1] as i32), Signal::SIGKILL).unwrap();
    let status = wait_for("the job to fail", Duration::from_secs(30), || {
        let s = c.status(None);
        (s["state"] == "FAILED").then_some(s)
    });
    assert!(status["message"].as_str().unwrap().contains("rank 1"), "{status}");
    wait_for("rank 0 to exit", Duration::from_secs(30), || {
        (!pid_alive(pids[0])).then_some(())
    });
    // The status showed rank 0's figures of that step, as its training log recorded them.
    let step = progress["global_step"].as_u64().unwrap();
    let record = logged_records(&out, "train")
        .into_iter()
        .find(|r| r["step"] == step)
        .unwrap_or_else(|| panic!("no train record of step {step}"));
    for (in_status, in_log) in [("samples_per_s", "samples_per_s"), ("train_loss", "loss")] {
        let (shown, logged) = (progress[in_status].as_f64().unwrap(), record[in_log].as_f64().unwrap());
        assert!(
            (shown - logged).abs() <= 1e-9 * logged.abs(),
            "{in_status}: status {shown}, log {logged}: {record}"
        );
    }
}
