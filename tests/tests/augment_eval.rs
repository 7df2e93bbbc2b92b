//! `augment-eval` end to end with the tiny model on a small sample of Korean HateSpeech: both
//! conditions, two seeds, two training fractions. The same experiment runs in one process
//! (`worker augment-eval`) and as a coordinator job on two workers that is killed after its first
//! runs and resumed; both must give the same predictions, the resumed job must not redo a
//! finished run, and every number of the report must follow from the saved predictions
//! (macro-F1 and accuracy recomputed by scikit-learn) and from the runs' results.

use kormlm_e2e::*;
use kormlm_proto::augment_args::AugmentArgs;
use kormlm_proto::augment_eval_args::AugmentEvalArgs;
use kormlm_proto::classify_args::ClassifyArgs;
use kormlm_proto::train_args::TrainArgs;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

const SEEDS: u64 = 2;
const FRACTIONS: [f64; 2] = [0.5, 1.0];

/// The header and data lines `rows` of a shared-corpus file, as a new file.
fn sample(corpus_file: &str, rows: std::ops::Range<usize>, out: &Path) -> PathBuf {
    let path = shared_data().join(corpus_file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    let mut kept = vec![lines[0]];
    kept.extend(&lines[1 + rows.start..1 + rows.end]);
    std::fs::write(out, kept.join("\n") + "\n").unwrap();
    out.to_path_buf()
}

struct Experiment {
    config: PathBuf,
    train: PathBuf,
    test: PathBuf,
}

impl Experiment {
    fn new(dir: &Path) -> Self {
        let config = dir.join("ds.json");
        std::fs::write(
            &config,
            r#"{"train_batch_size": 16, "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0,
                "optimizer": {"type": "AdamW", "params": {"lr": 5e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}}}"#,
        )
        .unwrap();
        Self {
            config,
            train: sample("korean-hate-speech/labeled/train.tsv", 0..80, &dir.join("train.tsv")),
            test: sample("korean-hate-speech/labeled/dev.tsv", 0..40, &dir.join("test.tsv")),
        }
    }

    /// The flags of the experiment writing to `output`.
    fn flags(&self, output: &Path) -> Vec<String> {
        self.flags_with(output, |_, _, _| {})
    }

    /// The flags of the experiment writing to `output`, changed by `change`.
    fn flags_with(
        &self,
        output: &Path,
        change: impl FnOnce(&mut TrainArgs, &mut AugmentArgs, &mut AugmentEvalArgs),
    ) -> Vec<String> {
        let mut train = TrainArgs {
            model_name_or_path: text(&tiny_model()),
            output_dir: Some(text(output)),
            max_seq_len: 32,
            // Enough steps per run that the job can be caught between its first and last run.
            num_train_epochs: 8,
            max_stop_number: 100,
            logging_steps: 4,
            eval_batch_size: 16,
            seed: 7,
            ..Default::default()
        };
        // Settings at which the random tiny model changes tokens.
        let mut augment = AugmentArgs {
            num_augmentations: 2,
            threshold: 0.3,
            mlm_prob: 0.3,
            ..Default::default()
        };
        let mut eval = AugmentEvalArgs {
            data: ClassifyArgs {
                train_file: Some(self.train.clone()),
                dataset: Some("khs-hate".into()),
                ..Default::default()
            },
            test_file: Some(self.test.clone()),
            dev_split: 0.2,
            augment_model: Some(text(&tiny_model())),
            seeds: SEEDS as u32,
            train_fractions: "0.5,1".into(),
            bootstrap_samples: 300,
            ..Default::default()
        };
        change(&mut train, &mut augment, &mut eval);
        let mut flags = vec!["--config".to_string(), text(&self.config)];
        flags.extend(eval.to_argv());
        flags.extend(train.to_argv());
        flags.extend(augment.to_argv());
        flags
    }
}

/// Every run's directory name.
fn run_ids() -> Vec<String> {
    let mut ids = Vec::new();
    for fraction in FRACTIONS {
        for seed in 7..7 + SEEDS {
            for condition in ["original", "augmented"] {
                ids.push(format!("f{fraction}-s{seed}-{condition}"));
            }
        }
    }
    ids
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The texts of a TSV sample's `comments` column.
fn comments(tsv: &Path) -> Vec<String> {
    let mut reader = csv::ReaderBuilder::new().delimiter(b'\t').from_path(tsv).unwrap();
    reader.records().map(|r| r.unwrap()[0].to_string()).collect()
}

fn close(a: &Value, b: f64, what: &str) {
    let a = a.as_f64().unwrap_or_else(|| panic!("{what}: {a} is not a number"));
    assert!((a - b).abs() <= 1e-12, "{what}: {a} vs {b}");
}

fn sample_std(values: &[f64]) -> f64 {
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (values.len() - 1) as f64).sqrt()
}

/// Checks an experiment's output: every run's files, its scores against scikit-learn on its
/// saved predictions, no augmented copy from outside the training rows, and the report's
/// numbers against the runs'.
fn check_output(output: &Path, experiment: &Experiment) -> Value {
    let test_texts = comments(&experiment.test);
    let train_texts = comments(&experiment.train);
    let gold: Vec<Value> = {
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(b'\t')
            .from_path(&experiment.test)
            .unwrap();
        reader.records().map(|r| json!(r.unwrap()[3].to_string())).collect()
    };
    let report = read_json(&output.join("report.json"));
    assert_eq!(report["labels"], json!(["hate", "none", "offensive"]));
    assert_eq!(report["seeds"], json!([7, 8]));
    assert_eq!(
        (report["train_pool_rows"].as_u64(), report["dev_rows"].as_u64()),
        (Some(64), Some(16))
    );
    assert_eq!(report["test_rows"], 40);
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(
        runs.iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>(),
        run_ids()
    );
    let gold_path = output.join("gold.json");
    std::fs::write(
        &gold_path,
        json!({"labels": report["labels"], "problem_type": "single_label_classification", "gold": gold}).to_string(),
    )
    .unwrap();
    let mut args = vec!["sklearn-metrics-many".to_string(), text(&gold_path)];
    args.extend(runs.iter().map(|r| {
        text(
            &output
                .join("items")
                .join(r["id"].as_str().unwrap())
                .join("test_predictions.jsonl"),
        )
    }));
    let sklearn: Vec<Value> =
        serde_json::from_str(classify_oracle(&args.iter().map(String::as_str).collect::<Vec<_>>()).trim()).unwrap();
    let mut by_id = BTreeMap::new();
    for run in runs {
        let id = run["id"].as_str().unwrap();
        let dir = output.join("items").join(id);
        assert_eq!(
            &read_json(&dir.join("result.json")),
            run,
            "{id}: result.json and the report differ"
        );
        let predictions = dir.join("test_predictions.jsonl");
        let records = lines(&predictions);
        assert_eq!(records.len(), 40, "{id}");
        for (record, (text, gold)) in records.iter().zip(test_texts.iter().zip(&gold)) {
            assert_eq!((&record["text"], &record["gold"]), (&json!(text), gold), "{id}");
        }
        let sklearn = &sklearn[by_id.len()];
        close(&run["test"]["macro_f1"], sklearn["macro_f1"].as_f64().unwrap(), id);
        close(&run["test"]["accuracy"], sklearn["accuracy"].as_f64().unwrap(), id);
        let fraction = run["fraction"].as_f64().unwrap();
        let rows = (64.0 * fraction).round() as u64;
        assert_eq!(run["train_rows"], rows, "{id}");
        let augmented = dir.join("augmented.jsonl");
        if run["condition"] == "augmented" {
            let copies = lines(&augmented);
            assert_eq!(copies.len() as u64, run["augmented_rows"].as_u64().unwrap(), "{id}");
            assert_eq!(
                run["augmented_rows"].as_u64().unwrap() + run["unchanged_copies"].as_u64().unwrap(),
                2 * rows
            );
            assert!(
                copies.len() as u64 > rows / 2,
                "{id}: only {} changed copies",
                copies.len()
            );
            for copy in &copies {
                let original = copy["original"].as_str().unwrap();
                assert!(
                    train_texts.iter().any(|t| t == original),
                    "{id}: {original} is not a training row"
                );
                assert!(
                    !test_texts.iter().any(|t| t == original),
                    "{id}: a test row was augmented"
                );
                assert_ne!(copy["augmented"], copy["original"]);
            }
        } else {
            assert!(!augmented.exists(), "{id}: the original condition augmented");
            assert_eq!(run["augmented_rows"], 0);
        }
        assert!(
            !dir.join("run/best").exists(),
            "{id}: the models are removed without --keep_models"
        );
        by_id.insert(id.to_string(), run.clone());
    }
    let fractions = report["fractions"].as_array().unwrap();
    assert_eq!(fractions.len(), 2);
    for f in fractions {
        let fraction = f["fraction"].as_f64().unwrap();
        let mut per_condition = BTreeMap::new();
        for condition in ["original", "augmented"] {
            let scores: Vec<(f64, f64)> = (7..7 + SEEDS)
                .map(|seed| {
                    let run = &by_id[&format!("f{fraction}-s{seed}-{condition}")];
                    (
                        run["test"]["macro_f1"].as_f64().unwrap(),
                        run["test"]["accuracy"].as_f64().unwrap(),
                    )
                })
                .collect();
            let f1: Vec<f64> = scores.iter().map(|s| s.0).collect();
            let accuracy: Vec<f64> = scores.iter().map(|s| s.1).collect();
            let c = &f[condition];
            assert_eq!(c["runs"], SEEDS);
            assert_eq!(c["macro_f1_per_seed"], json!(f1));
            close(&c["macro_f1"]["mean"], f1.iter().sum::<f64>() / 2.0, "mean macro-F1");
            close(&c["macro_f1"]["std"], sample_std(&f1), "std macro-F1");
            close(
                &c["accuracy"]["mean"],
                accuracy.iter().sum::<f64>() / 2.0,
                "mean accuracy",
            );
            close(&c["accuracy"]["std"], sample_std(&accuracy), "std accuracy");
            per_condition.insert(condition, f1);
        }
        let d = &f["difference_macro_f1"];
        let paired: Vec<f64> = per_condition["augmented"]
            .iter()
            .zip(&per_condition["original"])
            .map(|(a, o)| a - o)
            .collect();
        assert_eq!(d["per_seed"], json!(paired));
        close(&d["mean"], paired.iter().sum::<f64>() / 2.0, "mean difference");
        let (low, high) = (d["ci_low"].as_f64().unwrap(), d["ci_high"].as_f64().unwrap());
        assert!(
            low <= high && (-1.0..=1.0).contains(&low) && (-1.0..=1.0).contains(&high),
            "{d}"
        );
        let not_better = d["resamples_not_better"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&not_better), "{d}");
    }
    let png = std::fs::File::open(output.join("report.png")).unwrap();
    let info = png::Decoder::new(std::io::BufReader::new(png)).read_info().unwrap();
    assert_eq!((info.info().width, info.info().height), (900, 540));
    let table = std::fs::read_to_string(output.join("report.md")).unwrap();
    assert_eq!(table.matches("| **difference** |").count(), 2, "{table}");
    report
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path).and_then(|m| m.modified()).unwrap()
}

#[test]
fn an_experiment_job_on_two_workers_killed_and_resumed_equals_one_process_and_its_report_follows_from_its_predictions()
{
    let dir = tempfile::tempdir().unwrap();
    let experiment = Experiment::new(dir.path());

    // In one process.
    let local = dir.path().join("local");
    let out = run(Command::new(binary("worker"))
        .arg("augment-eval")
        .args(experiment.flags(&local)));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("| 0.5 | augmented |"), "{printed}");
    let local_report = check_output(&local, &experiment);

    // As a job on two workers, killed after its first finished run and resumed.
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let job = dir.path().join("job");
    let mut args = vec![
        "--task".to_string(),
        "augment-eval".into(),
        "--num_workers".into(),
        "2".into(),
        "--device".into(),
        "cpu".into(),
    ];
    args.extend(experiment.flags(&job));
    let c = CoordinatorProc::start(&state, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let results = |dir: &Path| -> Vec<PathBuf> {
        run_ids()
            .iter()
            .map(|id| dir.join("items").join(id).join("result.json"))
            .filter(|p| p.exists())
            .collect()
    };
    let first = wait_for("a first finished run", Duration::from_secs(300), || {
        let s = c.status(Some("job-1"));
        let state = s["state"].as_str().unwrap_or_default();
        assert!(
            state == "PENDING" || state == "RUNNING",
            "the job ended before it could be killed: {s}"
        );
        let done = results(&job);
        (!done.is_empty()).then_some(done)
    });
    let kill = c.client(&["kill", "--job", "job-1"]);
    assert!(kill.status.success(), "{}", String::from_utf8_lossy(&kill.stderr));
    let killed = wait_for("KILLED", Duration::from_secs(120), || {
        let s = c.status(Some("job-1"));
        (s["state"] == "KILLED").then_some(s)
    });
    assert_eq!(killed["task"], "AUGMENT_EVAL", "{killed}");
    let before: Vec<(PathBuf, SystemTime)> = results(&job).into_iter().map(|p| (p.clone(), modified(&p))).collect();
    assert!(
        before.len() >= first.len() && before.len() < 8,
        "{} of 8 runs done at the kill",
        before.len()
    );
    assert!(!job.join("report.json").exists());
    let resume = c.client(&["resume", "--job", "job-1"]);
    assert!(resume.status.success(), "{}", String::from_utf8_lossy(&resume.stderr));
    let done = wait_for("SUCCEEDED after resume", Duration::from_secs(600), || {
        let s = c.status(Some("job-1"));
        assert_ne!(s["state"], "FAILED", "{s}");
        (s["state"] == "SUCCEEDED").then_some(s)
    });
    assert!(done["message"].as_str().unwrap().contains("report.json"), "{done}");
    for (path, time) in &before {
        assert_eq!(
            modified(path),
            *time,
            "{} was run again after the resume",
            path.display()
        );
    }
    let job_report = check_output(&job, &experiment);

    // One process and two workers, interrupted or not: the same predictions (the probabilities
    // to float rounding: the processes run with different thread counts), the same report.
    for id in run_ids() {
        let predictions = |root: &Path| lines(&root.join("items").join(&id).join("test_predictions.jsonl"));
        for (a, b) in predictions(&local).iter().zip(&predictions(&job)) {
            assert_eq!(
                (&a["text"], &a["label"], &a["gold"]),
                (&b["text"], &b["label"], &b["gold"]),
                "{id}"
            );
            for (label, p) in a["probabilities"].as_object().unwrap() {
                let q = b["probabilities"][label].as_f64().unwrap();
                assert!((p.as_f64().unwrap() - q).abs() < 1e-5, "{id} {label}: {p} vs {q}");
            }
        }
    }
    for key in ["fractions", "seeds", "labels"] {
        let strip = |v: &Value| {
            let mut v = v.clone();
            for f in v.as_array_mut().into_iter().flatten() {
                for c in ["original", "augmented"] {
                    if let Some(c) = f.get_mut(c).and_then(Value::as_object_mut) {
                        for timing in ["augment_s", "train_s", "test_s"] {
                            c.remove(timing);
                        }
                    }
                }
            }
            v
        };
        assert_eq!(strip(&local_report[key]), strip(&job_report[key]), "{key} differs");
    }
}

#[test]
fn bad_experiments_are_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let experiment = Experiment::new(dir.path());
    let output = dir.path().join("out");
    let worker = |flags: Vec<String>| run(Command::new(binary("worker")).arg("augment-eval").args(flags));
    let refused = |flags: Vec<String>, expected: &str| {
        let out = worker(flags);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(expected),
            "expected {expected:?}: {stderr}"
        );
    };
    refused(
        experiment.flags_with(&output, |_, _, e| e.train_fractions = "0.5,2".into()),
        "--train_fractions: 2 is outside (0, 1]",
    );
    refused(
        experiment.flags_with(&output, |_, _, e| e.seeds = 0),
        "--seeds must be at least 1",
    );
    refused(
        experiment.flags_with(&output, |_, _, e| e.data.dataset = Some("imdb".into())),
        "--dataset imdb: accepted are nsmc, khs-hate, khs-bias, unsmile",
    );
    refused(
        experiment.flags_with(&output, |t, _, _| t.data_path = "x".into()),
        "--data_path is a masked-LM training flag",
    );
    refused(
        experiment.flags_with(&output, |_, a, _| a.input = Some("x.txt".into())),
        "--input/--output",
    );
    // A different experiment in the same directory is not mixed in.
    let small = |t: &mut TrainArgs, e: &mut AugmentEvalArgs| {
        e.seeds = 1;
        e.train_fractions = "1".into();
        t.num_train_epochs = 1;
    };
    let out = worker(experiment.flags_with(&output, |t, _, e| small(t, e)));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    refused(
        experiment.flags_with(&output, |t, _, e| {
            small(t, e);
            t.num_train_epochs = 2;
        }),
        "holds another experiment",
    );
    // The coordinator's own check: an experiment needs the classifiers' config.
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let out = run(Command::new(binary("coordinator"))
        .args(["--task", "augment-eval", "--world_size", "1", "--state-dir"])
        .arg(&state)
        .args(["--output_dir", "x"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--task augment-eval") && stderr.contains("--config"),
        "{stderr}"
    );
}
