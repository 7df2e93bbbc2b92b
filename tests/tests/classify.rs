//! `worker classify train|eval|predict` end to end on samples of the real corpora with the tiny
//! model: a few training steps, the training log's records, the saved classifier, and the
//! metrics `eval` reports recomputed by scikit-learn from the predictions `predict` saved.

use kormlm_e2e::*;
use kormlm_proto::train_args::TrainArgs;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// The header and the first `rows` data lines of a shared-corpus file, as a new file.
fn sample(corpus_file: &str, rows: usize, out: &Path) -> PathBuf {
    let path = shared_data().join(corpus_file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let lines: Vec<&str> = text.lines().take(rows + 1).collect();
    std::fs::write(out, lines.join("\n") + "\n").unwrap();
    out.to_path_buf()
}

/// A small DeepSpeed config: 16 texts a step in micro-batches of 8, AdamW at `lr`, clipping.
fn ds_config(dir: &Path, lr: f64) -> PathBuf {
    let path = dir.join("ds.json");
    std::fs::write(
        &path,
        format!(
            r#"{{"train_batch_size": 16, "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0,
                "optimizer": {{"type": "AdamW", "params": {{"lr": {lr}, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}}}}}}"#
        ),
    )
    .unwrap();
    path
}

fn worker(args: &[String]) -> Output {
    run(Command::new(binary("worker")).arg("classify").args(args))
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The gold labels of a labelled TSV sample, as the oracle's GOLD.json wants them: the label
/// column's values, or for multi-label the names of the columns holding 1.
fn gold(tsv: &Path, label_column: Option<&str>, text_column: &str, quoting: bool) -> Vec<Value> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .quoting(quoting)
        .from_path(tsv)
        .unwrap();
    let headers: Vec<String> = reader.headers().unwrap().iter().map(str::to_string).collect();
    reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            match label_column {
                Some(column) => json!(r[headers.iter().position(|h| h == column).unwrap()].to_string()),
                None => json!(headers
                    .iter()
                    .zip(r.iter())
                    .filter(|(h, v)| h.as_str() != text_column && *v == "1")
                    .map(|(h, _)| h.clone())
                    .collect::<Vec<_>>()),
            }
        })
        .collect()
}

/// Trains on `train`, evaluates and predicts on `dev`, and checks the run's files and that the
/// metrics `eval` printed are scikit-learn's on the saved predictions.
fn train_eval_predict(
    dir: &Path,
    lr: f64,
    (train, dev): (&Path, &Path),
    columns: &[String],
    gold_labels: Vec<Value>,
) -> Value {
    let output = dir.join("run");
    let args = TrainArgs {
        model_name_or_path: text(&tiny_model()),
        output_dir: Some(text(&output)),
        max_seq_len: 32,
        num_train_epochs: 2,
        logging_steps: 1,
        eval_batch_size: 16,
        ..Default::default()
    };
    let mut argv = strings(&["train", "--config"]);
    argv.push(text(&ds_config(dir, lr)));
    argv.extend(["--train_file".into(), text(train), "--dev_file".into(), text(dev)]);
    argv.extend(columns.iter().cloned());
    argv.extend(args.to_argv());
    let summary: Value = serde_json::from_str(ok(&worker(&argv), "classify train").trim()).unwrap();
    eprintln!("summary: {summary}");
    let trains = logged_records(&output, "train");
    let evals = logged_records(&output, "eval");
    let rows = std::fs::read_to_string(train).unwrap().lines().count() - 1;
    let steps = 2 * rows.div_ceil(16) as u64;
    assert_eq!(summary["global_steps"], steps, "{summary}");
    assert_eq!(trains.len() as u64, steps);
    assert!(trains.iter().all(|r| r["loss"].as_f64().is_some_and(f64::is_finite)));
    assert_eq!(evals.len(), 2, "one evaluation per epoch: {evals:?}");
    let best = evals
        .iter()
        .map(|e| e["val_macro_f1"].as_f64().unwrap())
        .fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(summary["best_val_macro_f1"].as_f64(), Some(best));
    for model in ["best", "final"] {
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(output.join(model).join("config.json")).unwrap()).unwrap();
        assert_eq!(config["architectures"], json!(["ElectraForSequenceClassification"]));
        assert_eq!(
            config["id2label"].as_object().unwrap().len(),
            summary["labels"].as_array().unwrap().len()
        );
    }
    assert_eq!(
        summary["newly_initialized"],
        json!([
            "classifier.dense.bias",
            "classifier.dense.weight",
            "classifier.out_proj.bias",
            "classifier.out_proj.weight"
        ])
    );

    let final_model = text(&output.join("final"));
    let mut eval_argv = strings(&["eval", "--model", &final_model, "--input", &text(dev), "--json"]);
    eval_argv.extend(columns.iter().cloned());
    eval_argv.extend(strings(&["--max_seq_len", "32"]));
    let evaluation: Value = serde_json::from_str(ok(&worker(&eval_argv), "classify eval").trim()).unwrap();
    eprintln!("eval: {evaluation}");
    // The final model on the dev set is the training's last evaluation.
    let last = evals.last().unwrap();
    assert!((evaluation["macro_f1"].as_f64().unwrap() - last["val_macro_f1"].as_f64().unwrap()).abs() <= 1e-12);
    assert!((evaluation["accuracy"].as_f64().unwrap() - last["val_accuracy"].as_f64().unwrap()).abs() <= 1e-12);

    let predictions = dir.join("predictions.jsonl");
    let mut predict_argv = strings(&["predict", "--model", &final_model, "--input", &text(dev), "--json"]);
    predict_argv.extend([
        "--output".into(),
        text(&predictions),
        "--max_seq_len".into(),
        "32".into(),
    ]);
    predict_argv.extend(columns.iter().cloned());
    let printed: Value = serde_json::from_str(ok(&worker(&predict_argv), "classify predict").trim()).unwrap();
    assert_eq!(printed["predictions"], gold_labels.len());
    let gold_path = dir.join("gold.json");
    std::fs::write(
        &gold_path,
        json!({"labels": evaluation["labels"], "problem_type": evaluation["problem_type"], "gold": gold_labels})
            .to_string(),
    )
    .unwrap();
    let sklearn: Value =
        serde_json::from_str(classify_oracle(&["sklearn-metrics", &text(&predictions), &text(&gold_path)]).trim())
            .unwrap();
    eprintln!("scikit-learn on the predictions: {sklearn}");
    assert_eq!(sklearn["examples"], evaluation["examples"]);
    for key in ["accuracy", "macro_f1"] {
        let (ours, theirs) = (evaluation[key].as_f64().unwrap(), sklearn[key].as_f64().unwrap());
        assert!(
            (ours - theirs).abs() <= 1e-12,
            "{key}: worker {ours}, scikit-learn {theirs}"
        );
    }
    for (label, theirs) in sklearn["per_label_f1"].as_object().unwrap() {
        let ours = evaluation["per_label_f1"][label].as_f64().unwrap();
        assert!(
            (ours - theirs.as_f64().unwrap()).abs() <= 1e-12,
            "F1 of {label}: {ours} vs {theirs}"
        );
    }
    evaluation
}

#[test]
fn single_label_korean_hatespeech_trains_evaluates_and_predicts() {
    let dir = tempfile::tempdir().unwrap();
    let train = sample(
        "korean-hate-speech/labeled/train.tsv",
        64,
        &dir.path().join("train.tsv"),
    );
    let dev = sample("korean-hate-speech/labeled/dev.tsv", 48, &dir.path().join("dev.tsv"));
    let columns = strings(&["--dataset", "khs-hate"]);
    let gold_labels = gold(&dev, Some("hate"), "comments", true);
    let evaluation = train_eval_predict(dir.path(), 5e-4, (&train, &dev), &columns, gold_labels);
    assert!(evaluation["accuracy"].as_f64().unwrap() > 0.0, "{evaluation}");
    assert_eq!(evaluation["labels"], json!(["hate", "none", "offensive"]));
    assert_eq!(evaluation["problem_type"], "single_label_classification");
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(dir.path().join("predictions.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let total: f64 = first["probabilities"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p.as_f64().unwrap())
        .sum();
    assert!((total - 1.0).abs() < 1e-5, "softmax probabilities sum to {total}");

    // Bad input: errors name the file, line or column and what is accepted.
    let bad_dev = dir.path().join("bad.tsv");
    std::fs::write(&bad_dev, "comments\thate\n좋아요\tnone\n싫어요\tangry\n").unwrap();
    let config = text(&ds_config(dir.path(), 5e-4));
    let mut argv = strings(&[
        "train",
        "--config",
        &config,
        "--train_file",
        &text(&train),
        "--dev_file",
    ]);
    argv.push(text(&bad_dev));
    argv.extend(columns.clone());
    argv.extend(["--model_name_or_path".into(), text(&tiny_model())]);
    argv.extend(["--output_dir".into(), text(&dir.path().join("bad-run"))]);
    let out = worker(&argv);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("bad.tsv")
            && stderr.contains("line 3")
            && stderr.contains("\"angry\"")
            && stderr.contains("hate, none, offensive"),
        "{stderr}"
    );
    let mut argv = strings(&[
        "eval",
        "--model",
        &text(&dir.path().join("run/final")),
        "--input",
        &text(&dev),
    ]);
    argv.extend(strings(&["--label_column", "hatred"]));
    let out = worker(&argv);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("dev.tsv")
            && stderr.contains("no label column `hatred`")
            && stderr.contains("comments, contain_gender_bias, bias, hate"),
        "{stderr}"
    );
}

#[test]
fn multi_label_unsmile_trains_evaluates_and_predicts() {
    let dir = tempfile::tempdir().unwrap();
    let train = sample(
        "korean_unsmile_dataset/unsmile_train_v1.0.tsv",
        32,
        &dir.path().join("unsmile_train.tsv"),
    );
    let dev = sample(
        "korean_unsmile_dataset/unsmile_valid_v1.0.tsv",
        48,
        &dir.path().join("unsmile_valid.tsv"),
    );
    let columns = strings(&["--dataset", "unsmile"]);
    // A small learning rate keeps the head's logits near 0, so the sigmoid probabilities fall
    // on both sides of 0.5 and the recomputed metrics are not those of empty predictions.
    let gold_labels = gold(&dev, None, "문장", false);
    let evaluation = train_eval_predict(dir.path(), 1e-5, (&train, &dev), &columns, gold_labels);
    let per_label = evaluation["per_label_f1"].as_object().unwrap();
    assert!(per_label.values().any(|f| f.as_f64().unwrap() > 0.0), "{evaluation}");
    assert_eq!(evaluation["problem_type"], "multi_label_classification");
    assert_eq!(evaluation["labels"].as_array().unwrap().len(), 11);
    assert_eq!(evaluation["labels"][0], "여성/가족");
}

/// Every record of `kind` in a run's log by global step (each step logged once).
fn records_by_step(out: &Path, kind: &str) -> std::collections::BTreeMap<u64, Value> {
    let mut by_step = std::collections::BTreeMap::new();
    for record in logged_records(out, kind) {
        let step = record["step"].as_u64().unwrap();
        assert!(
            by_step.insert(step, record).is_none(),
            "{}: step {step} logged twice as {kind}",
            out.display()
        );
    }
    by_step
}

/// The train losses and the eval records of `run` against those of `reference`: the same steps,
/// each value within `tolerance` (relative); returns how many values were compared.
fn assert_same_training(reference: &Path, run: &Path, tolerance: f64) -> usize {
    let mut compared = 0;
    for (kind, keys) in [
        ("train", &["loss"][..]),
        ("eval", &["val_loss", "val_accuracy", "val_macro_f1", "train_loss"][..]),
    ] {
        let (want, have) = (records_by_step(reference, kind), records_by_step(run, kind));
        assert_eq!(
            have.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{kind} records of {}",
            run.display()
        );
        for (step, record) in &have {
            for key in keys {
                let (a, b) = (record[key].as_f64().unwrap(), want[step][key].as_f64().unwrap());
                assert!(
                    (a - b).abs() <= tolerance * b.abs().max(1e-12),
                    "{kind} {key} at step {step}: {a} in {} vs {b} uninterrupted on one process",
                    run.display()
                );
                compared += 1;
            }
        }
    }
    compared
}

#[test]
fn classifier_training_stopped_or_killed_and_resumed_equals_the_uninterrupted_run_alone_and_as_a_two_worker_job() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let train = sample("korean-hate-speech/labeled/train.tsv", 256, &d.join("train.tsv"));
    let dev = sample("korean-hate-speech/labeled/dev.tsv", 48, &d.join("dev.tsv"));
    let config = ds_config(d, 5e-4);
    // 16 steps an epoch, 4 epochs; a checkpoint every 5 steps lands mid-epoch.
    let flags = |out: &Path| -> Vec<String> {
        let args = TrainArgs {
            model_name_or_path: text(&tiny_model()),
            output_dir: Some(text(out)),
            max_seq_len: 32,
            num_train_epochs: 4,
            logging_steps: 1,
            eval_batch_size: 16,
            checkpoint_steps: 5,
            keep_checkpoints: 20,
            seed: 11,
            ..Default::default()
        };
        let mut flags = vec!["--config".to_string(), text(&config)];
        flags.extend(["--train_file".into(), text(&train), "--dev_file".into(), text(&dev)]);
        flags.extend(strings(&["--dataset", "khs-hate"]));
        flags.extend(args.to_argv());
        flags
    };

    // Uninterrupted, in one process.
    let reference = d.join("reference");
    let mut argv = strings(&["train"]);
    argv.extend(flags(&reference));
    let summary: Value = serde_json::from_str(ok(&worker(&argv), "classify train").trim()).unwrap();
    assert_eq!(summary["global_steps"], 64, "{summary}");
    assert_eq!(summary["stopped_by_request"], false);
    assert_eq!(
        records_by_step(&reference, "checkpoint").len(),
        16,
        "every 5 steps and every epoch end"
    );

    // `worker classify train` stopped by SIGTERM mid-epoch, continued with --resume_from.
    let stopped = d.join("stopped");
    let stderr_path = d.join("stopped.stderr");
    let mut proc = Proc::spawn(
        "worker classify train",
        Command::new(binary("worker"))
            .arg("classify")
            .arg("train")
            .args(flags(&stopped))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap()),
    );
    wait_for("step 7 in the log", Duration::from_secs(300), || {
        let log = std::fs::read_to_string(stopped.join("training_log.jsonl")).unwrap_or_default();
        log.contains("\"step\":7,").then_some(())
    });
    proc.signal(nix::sys::signal::Signal::SIGTERM);
    let status = proc.wait_exit(Duration::from_secs(60));
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert_eq!(status.code(), Some(143), "{stderr}");
    let (_, resume) = stderr
        .split_once("continue with --resume_from ")
        .unwrap_or_else(|| panic!("no resume hint: {stderr}"));
    let checkpoint = PathBuf::from(resume.lines().next().unwrap().trim());
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("trainer_state.json")).unwrap()).unwrap();
    let stopped_at = state["steps"].as_u64().unwrap();
    assert!((7..64).contains(&stopped_at), "{state}");
    let mut argv = strings(&["train"]);
    argv.extend(flags(&stopped));
    argv.extend(["--resume_from".into(), text(&checkpoint)]);
    let resumed: Value = serde_json::from_str(ok(&worker(&argv), "classify train --resume_from").trim()).unwrap();
    assert_eq!(resumed["global_steps"], 64, "{resumed}");
    let compared = assert_same_training(&reference, &stopped, 0.0);
    let alone_diff = max_weight_diff(
        &reference.join("final/model.safetensors"),
        &stopped.join("final/model.safetensors"),
    );
    assert!(alone_diff <= 1e-6, "{alone_diff}");

    // As a coordinator job on two workers (ZeRO-2 over the ring), killed and resumed.
    let job = d.join("job");
    let state_dir = d.join("state");
    std::fs::create_dir_all(&state_dir).unwrap();
    let mut args = strings(&["--task", "classify", "--num_workers", "2", "--device", "cpu"]);
    args.extend(flags(&job));
    let mut zero2 = config.clone();
    zero2.set_file_name("ds-zero2.json");
    let mut ds: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    ds["zero_optimization"] = json!({"stage": 2});
    std::fs::write(&zero2, ds.to_string()).unwrap();
    let at = args.iter().position(|a| a == "--config").unwrap();
    args[at + 1] = text(&zero2);
    let c = CoordinatorProc::start(&state_dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
    wait_for("step 7 of the job", Duration::from_secs(300), || {
        let s = c.status(Some("job-1"));
        assert!(
            s["state"] == "PENDING" || s["state"] == "RUNNING",
            "the job ended before it could be killed: {s}"
        );
        (s["global_step"].as_u64().unwrap_or(0) >= 7).then_some(())
    });
    let kill = c.client(&["kill", "--job", "job-1"]);
    assert!(kill.status.success(), "{}", String::from_utf8_lossy(&kill.stderr));
    let killed = wait_for("KILLED", Duration::from_secs(120), || {
        let s = c.status(Some("job-1"));
        (s["state"] == "KILLED").then_some(s)
    });
    assert_eq!(killed["task"], "CLASSIFY", "{killed}");
    let killed_at = killed["global_step"].as_u64().unwrap();
    assert!((7..64).contains(&killed_at), "{killed}");
    assert_eq!(killed["latest_checkpoint"]["global_step"], killed_at, "{killed}");
    let resume = c.client(&["resume", "--job", "job-1"]);
    assert!(resume.status.success(), "{}", String::from_utf8_lossy(&resume.stderr));
    let done = wait_for("SUCCEEDED after resume", Duration::from_secs(300), || {
        let s = c.status(Some("job-1"));
        assert_ne!(s["state"], "FAILED", "{s}");
        (s["state"] == "SUCCEEDED").then_some(s)
    });
    assert_eq!(done["global_step"], 64, "{done}");
    let starts: Vec<Value> = logged_records(&job, "start");
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_eq!(
        (starts[0]["world_size"].as_u64(), starts[1]["step"].as_u64()),
        (Some(2), Some(killed_at))
    );
    let job_summary: Value = serde_json::from_str(&std::fs::read_to_string(job.join("summary.json")).unwrap()).unwrap();
    assert_eq!(job_summary["labels"], summary["labels"]);
    assert_eq!(job_summary["global_steps"], 64);
    // Two ranks sum the same gradients in another order: equal to float rounding.
    let job_compared = assert_same_training(&reference, &job, 1e-3);
    let job_diff = max_weight_diff(
        &reference.join("final/model.safetensors"),
        &job.join("final/model.safetensors"),
    );
    assert!(
        job_diff <= 1e-4,
        "1 process vs 2 workers: max abs weight diff {job_diff}"
    );
    eprintln!(
        "classify: SIGTERM at step {stopped_at} + --resume_from: {compared} values equal, weight diff {alone_diff:e}; \
         2-worker job killed at step {killed_at} + resume: {job_compared} values within 1e-3, weight diff {job_diff:e}"
    );
}
