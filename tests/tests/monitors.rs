//! The DeepSpeed config's monitors end to end: `worker train` with `tensorboard` (a relative
//! `output_path`, resolved against the worker's working directory) and `csv_monitor`, killed
//! (SIGKILL) after it logged steps past its last checkpoint, and resumed from that checkpoint.
//! TensorBoard's own reader (`EventAccumulator`, `EventFileLoader`, from the `tensorboard`
//! package) reads the event files back: every scalar (tag, x in global samples, value) is
//! checked against `training_log.jsonl` and DeepSpeed's WarmupLR schedule, and the steps the
//! killed attempt wrote after its checkpoint are purged by the resumed run's `SessionLog` START.
//! The CSV files are checked the same way, byte for byte in DeepSpeed's layout (a second header
//! from the resumed run; Python `str()` numbers).

use kormlm_e2e::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Samples an optimizer step: DeepSpeed's x advances by this much per step.
const TRAIN_BATCH: u64 = 16;
const WARMUP_STEPS: u64 = 8;
const MAX_LR: f64 = 1e-3;
const JOB_NAME: &str = "tiny-mlm";

const LR: &str = "Train/Samples/lr";
const TRAIN_LOSS: &str = "Train/Samples/train_loss";
const EVAL_LOSS: &str = "Train/Samples/eval_loss";
const EVAL_ACCURACY: &str = "Train/Samples/eval_accuracy";

/// WarmupLR (linear) with the monitors on: TensorBoard under `tb/` relative to the working
/// directory, CSV under the absolute `csv_root`.
fn write_config(dir: &Path, csv_root: &Path) -> PathBuf {
    let path = dir.join("ds.json");
    let config = serde_json::json!({
        "train_batch_size": TRAIN_BATCH,
        "optimizer": {"type": "AdamW", "params": {"lr": MAX_LR, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0, "warmup_max_lr": MAX_LR, "warmup_num_steps": WARMUP_STEPS, "warmup_type": "linear"}},
        "tensorboard": {"enabled": true, "output_path": "tb", "job_name": JOB_NAME},
        "csv_monitor": {"enabled": true, "output_path": text(csv_root), "job_name": JOB_NAME},
        "wandb": {"enabled": false},
    });
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

/// DeepSpeed's WarmupLR `get_lr()` after `k` optimizer steps (`last_batch_iteration` = k - 1).
fn warmup_lr_after(k: u64) -> f64 {
    let iteration = k.saturating_sub(1);
    let gamma = if iteration < WARMUP_STEPS {
        iteration as f64 / WARMUP_STEPS as f64
    } else {
        1.0
    };
    MAX_LR * gamma
}

/// `worker train FLAGS` started in `work_dir`, its stderr going to `log`.
fn worker_train(work_dir: &Path, flags: &[String], log: &Path) -> Proc {
    let stderr = std::fs::File::create(log).unwrap();
    let mut command = Command::new(binary("worker"));
    command
        .current_dir(work_dir)
        .arg("train")
        .args(flags)
        .stdout(Stdio::null())
        .stderr(stderr);
    Proc::spawn("worker train", &mut command)
}

/// TensorBoard's and Python's reading of the monitors' output (`tests/python/tensorboard_reader.py`).
fn read_back(tb_dir: &Path, csv_dir: &Path) -> Value {
    let out = run(Command::new(oracle_python())
        .arg(workspace_root().join("tests/python/tensorboard_reader.py"))
        .arg(tb_dir)
        .arg(csv_dir));
    assert!(out.status.success(), "reader: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The log's last checkpoint step and last train step.
fn last_checkpoint_and_step(out: &Path) -> (Option<u64>, Option<u64>) {
    let text = std::fs::read_to_string(out.join("training_log.jsonl")).unwrap_or_default();
    let (mut checkpoint, mut step) = (None, None);
    for record in text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
        match record["type"].as_str() {
            Some("checkpoint") => checkpoint = record["step"].as_u64(),
            Some("train") => step = record["step"].as_u64(),
            _ => {}
        }
    }
    (checkpoint, step)
}

/// Every `kind` record's `key` by step (each step logged once).
fn logged(out: &Path, kind: &str, key: &str) -> BTreeMap<u64, f64> {
    let mut by_step = BTreeMap::new();
    for record in logged_records(out, kind) {
        let step = record["step"].as_u64().unwrap();
        let value = record[key].as_f64().unwrap_or_else(|| panic!("{key} in {record}"));
        assert!(
            by_step.insert(step, value).is_none(),
            "step {step} logged twice as {kind}"
        );
    }
    by_step
}

/// `(x, value)` pairs of a tag as TensorBoard shows it.
fn shown(read: &Value, tag: &str) -> Vec<(u64, f64)> {
    read["scalars"][tag]
        .as_array()
        .unwrap_or_else(|| panic!("no {tag} in {}", read["scalars"]))
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect()
}

/// What TensorBoard must show for `values` by step: x = step × train_batch_size, the value
/// as the f32 an event stores.
fn expected(values: &BTreeMap<u64, f64>) -> Vec<(u64, f64)> {
    values
        .iter()
        .map(|(&step, &v)| (step * TRAIN_BATCH, f64::from(v as f32)))
        .collect()
}

/// A CSV file's rows, split at the headers: one `Vec` of (x, value) per run that wrote it.
fn csv_runs(read: &Value, tag: &str) -> Vec<Vec<(u64, f64)>> {
    let name = format!("{}.csv", tag.replace('/', "_"));
    let table = &read["csv"][&name];
    assert_eq!(
        table["not_python_str"],
        serde_json::json!([]),
        "{name}: numbers as Python prints them"
    );
    let header = serde_json::json!(["step", tag.rsplit('/').next().unwrap()]);
    let mut runs: Vec<Vec<(u64, f64)>> = Vec::new();
    for row in table["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("no {name}: {}", read["csv"]))
    {
        if *row == header {
            runs.push(Vec::new());
            continue;
        }
        let cell = |i: usize| row[i].as_str().unwrap();
        let run = runs
            .last_mut()
            .unwrap_or_else(|| panic!("{name}: a row before the header"));
        run.push((cell(0).parse().unwrap(), cell(1).parse().unwrap()));
    }
    runs
}

#[test]
fn tensorboard_and_csv_monitors_match_the_training_log_across_a_kill_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let work = d.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let csv_root = d.join("csv");
    let config = write_config(d, &csv_root);
    let out = d.join("run");
    // About 37 steps an epoch: short, and still long enough to be caught past a checkpoint on a
    // fast machine (8 steps an epoch once ended before the first look).
    let data = d.join("sentences.txt");
    std::fs::write(&data, nsmc_documents(600).join("\n") + "\n").unwrap();
    let mut flags = vec![
        "--config".to_string(),
        text(&config),
        "--cache_dir".into(),
        text(&d.join("tokens")),
    ];
    flags.extend(
        kormlm_proto::train_args::TrainArgs {
            num_train_epochs: 2,
            logging_steps: 1,
            checkpoint_steps: 3,
            seed: 3,
            ..tiny_training(&data, &out)
        }
        .to_argv(),
    );

    // The first attempt, frozen once it has logged a step past its newest checkpoint, then killed.
    let first_log = d.join("first.log");
    let mut first = worker_train(&work, &flags, &first_log);
    let (checkpoint, killed_at) = wait_for("a logged step past a checkpoint", Duration::from_secs(300), || {
        assert!(
            first.is_running(),
            "the first attempt ended before it could be killed:\n{}",
            std::fs::read_to_string(&first_log).unwrap_or_default()
        );
        let (checkpoint, step) = last_checkpoint_and_step(&out);
        let (Some(c), Some(s)) = (checkpoint, step) else {
            return None;
        };
        if s <= c {
            return None;
        }
        first.signal(Signal::SIGSTOP);
        // Read again: the process may have gone on between the look and the stop.
        match last_checkpoint_and_step(&out) {
            (Some(c), Some(s)) if s > c => Some((c, s)),
            _ => {
                first.signal(Signal::SIGCONT);
                None
            }
        }
    });
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(30));
    let checkpoint_dir = out.join(format!("checkpoints/step-{checkpoint}"));
    let mut resume = flags.clone();
    resume.extend(["--resume_from".to_string(), text(&checkpoint_dir)]);
    let resumed_log = d.join("resumed.log");
    let status = worker_train(&work, &resume, &resumed_log).wait_exit(Duration::from_secs(300));
    assert!(
        status.success(),
        "the resumed run failed:\n{}",
        std::fs::read_to_string(&resumed_log).unwrap_or_default()
    );

    let tb_dir = work.join("tb").join(JOB_NAME);
    let csv_dir = csv_root.join(JOB_NAME);
    let read = read_back(&tb_dir, &csv_dir);

    // The log after the resume: the first attempt's records up to the checkpoint, then the
    // resumed run's.
    let losses = logged(&out, "train", "loss");
    let used_lr = logged(&out, "train", "lr");
    let eval_losses = logged(&out, "eval", "val_loss");
    let eval_accuracies = logged(&out, "eval", "val_accuracy");
    let last_step = *losses.keys().last().unwrap();
    assert_eq!(
        losses.keys().copied().collect::<Vec<_>>(),
        (1..=last_step).collect::<Vec<_>>(),
        "a train record every step"
    );
    assert_eq!(eval_losses.len(), 2, "one evaluation an epoch: {eval_losses:?}");

    // Two files, one per process start, each opening with the file version; the resumed one
    // tells TensorBoard to drop what the first attempt wrote from its first x on.
    let files = read["files"].as_array().unwrap();
    assert_eq!(
        files.len(),
        2,
        "{:?}",
        files.iter().map(|f| &f["name"]).collect::<Vec<_>>()
    );
    for file in files {
        let first_event = &file["events"][0];
        assert_eq!(first_event["file_version"], "brain.Event:2", "{}", file["name"]);
        let name = file["name"].as_str().unwrap();
        let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
        assert!(name.contains(&format!(".{host}.")), "{name}");
    }
    let (killed, resumed) = (&files[0]["events"], &files[1]["events"]);
    let purge_x = (checkpoint + 1) * TRAIN_BATCH;
    assert_eq!(resumed[1]["what"], "session_log", "{}", resumed[1]);
    assert_eq!(
        (resumed[1]["status"].as_i64(), resumed[1]["step"].as_u64()),
        (Some(1), Some(purge_x))
    );
    assert!(killed.as_array().unwrap().iter().all(|e| e["what"] != "session_log"));
    // The killed attempt flushed every step it logged, past the checkpoint: the orphans.
    let killed_xs: Vec<u64> = killed
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["what"] == "summary")
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert!(
        killed_xs.contains(&(killed_at * TRAIN_BATCH)),
        "{killed_xs:?} lacks step {killed_at}"
    );
    let orphans = killed_xs.iter().filter(|&&x| x >= purge_x).count();
    assert!(orphans > 0, "the killed attempt wrote past its checkpoint");
    for event in killed.as_array().unwrap().iter().chain(resumed.as_array().unwrap()) {
        for value in event["values"].as_array().into_iter().flatten() {
            assert_eq!(value[1], "simple_value", "{event}");
        }
    }

    // What TensorBoard shows: every step once, from the log.
    assert_eq!(shown(&read, TRAIN_LOSS), expected(&losses), "{TRAIN_LOSS}");
    assert_eq!(shown(&read, EVAL_LOSS), expected(&eval_losses), "{EVAL_LOSS}");
    assert_eq!(
        shown(&read, EVAL_ACCURACY),
        expected(&eval_accuracies),
        "{EVAL_ACCURACY}"
    );
    // lr: the optimizer's rate after each step — DeepSpeed's schedule, and the rate the log
    // says the next step used.
    let schedule: BTreeMap<u64, f64> = (1..=last_step).map(|k| (k, warmup_lr_after(k))).collect();
    assert_eq!(shown(&read, LR), expected(&schedule), "{LR} against WarmupLR");
    for (step, lr) in used_lr.range(2..) {
        assert_eq!(*lr as f32, schedule[&(step - 1)] as f32, "the log's lr of step {step}");
    }
    let tags: Vec<&String> = read["scalars"].as_object().unwrap().keys().collect();
    assert_eq!(tags.len(), 4, "no loss_scale without fp16: {tags:?}");
    let (x, value) = shown(&read, TRAIN_LOSS)[checkpoint as usize];
    eprintln!(
        "TensorBoard EventAccumulator: {TRAIN_LOSS} at x={x} is {value} (training_log step {}: {}); killed at step \
         {killed_at} after checkpoint step {checkpoint}, {orphans} orphaned events purged by SessionLog START at x={purge_x}",
        checkpoint + 1,
        losses[&(checkpoint + 1)]
    );

    // The CSV files: the first attempt's rows (orphans included: DeepSpeed's CSV monitor appends
    // and never purges), a second header, the resumed run's rows; values exactly the log's.
    let exact = |values: &BTreeMap<u64, f64>| -> Vec<(u64, f64)> {
        values.iter().map(|(&s, &v)| (s * TRAIN_BATCH, v)).collect()
    };
    for (tag, values) in [
        (TRAIN_LOSS, &losses),
        (LR, &schedule),
        (EVAL_LOSS, &eval_losses),
        (EVAL_ACCURACY, &eval_accuracies),
    ] {
        let runs = csv_runs(&read, tag);
        let want = exact(values);
        if tag == EVAL_LOSS || tag == EVAL_ACCURACY {
            // The first evaluation (end of epoch 0) may come before or after the kill.
            let joined: Vec<(u64, f64)> = runs.concat();
            let mut last_by_x = BTreeMap::new();
            for (x, v) in joined {
                last_by_x.insert(x, v);
            }
            assert_eq!(last_by_x.into_iter().collect::<Vec<_>>(), want, "{tag}");
            continue;
        }
        assert_eq!(runs.len(), 2, "{tag}: a header per run");
        let (before, after) = (&runs[0], &runs[1]);
        let resumed_from = want.iter().position(|&(x, _)| x >= purge_x).unwrap();
        assert_eq!(
            &before[..resumed_from],
            &want[..resumed_from],
            "{tag}: the first attempt's rows"
        );
        assert!(
            before.len() > resumed_from,
            "{tag}: the first attempt's orphaned rows stay"
        );
        assert_eq!(after[..], want[resumed_from..], "{tag}: the resumed run's rows");
    }
    let raw = std::fs::read_to_string(csv_dir.join("Train_Samples_lr.csv")).unwrap();
    assert!(raw.starts_with(&format!("step,lr\r\n{TRAIN_BATCH},0.0\r\n")), "{raw:?}");
}

/// A coordinator job resolves a relative monitor path once, against the coordinator's working
/// directory, and hands the workers the absolute path (what `--dry-run` shows is what they
/// receive); `wandb` enabled is refused before anything starts, naming the key.
#[test]
fn coordinator_jobs_get_absolute_monitor_paths_and_wandb_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let work = d.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let config = write_config(d, &d.join("csv"));
    let out = run(Command::new(binary("coordinator"))
        .current_dir(&work)
        .args([
            "--config",
            &text(&config),
            "--num_workers",
            "2",
            "--device",
            "cpu",
            "--dry-run",
        ])
        .args(["--data_path", "data.txt", "--model_name_or_path", "model"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let resolved = &plan["job"]["config"];
    assert_eq!(
        resolved["tensorboard"]["output_path"],
        text(&work.join("tb")),
        "{resolved}"
    );
    assert_eq!(resolved["tensorboard"]["job_name"], JOB_NAME);
    assert_eq!(resolved["csv_monitor"]["output_path"], text(&d.join("csv")));

    let wandb = d.join("wandb.json");
    std::fs::write(
        &wandb,
        r#"{"train_batch_size": 16, "wandb": {"enabled": true, "project": "kormlm"}}"#,
    )
    .unwrap();
    let out = run(Command::new(binary("worker")).current_dir(&work).args([
        "train",
        "--config",
        &text(&wandb),
        "--data_path",
        "data.txt",
        "--model_name_or_path",
        "model",
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "{}: key `wandb.enabled`: Weights & Biases needs a network connection",
            text(&wandb)
        )),
        "{stderr}"
    );
    assert!(stderr.contains("`tensorboard` or `csv_monitor`"), "{stderr}");
    assert!(
        !work.join("tb").exists() && !d.join("csv").exists(),
        "nothing written by the refused runs"
    );
}
