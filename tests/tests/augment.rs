//! `worker augment` on hand-written tricky inputs: row counts, labels, determinism, the tail of
//! a long line, and clear errors.

use kormlm_e2e::*;
use kormlm_proto::augment_args::AugmentArgs;
use kormlm_proto::train_args::TrainArgs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The tiny model with `seed` and `max_seq_len`: what an augmentation runs with.
fn tiny_run(seed: u64, max_seq_len: u32) -> TrainArgs {
    TrainArgs {
        model_name_or_path: text(&tiny_model()),
        seed,
        max_seq_len,
        ..Default::default()
    }
}

/// `input` to `output` with a threshold and masking rate at which the random tiny model
/// replaces tokens; the rest at the defaults.
fn options(input: &Path, output: &Path) -> AugmentArgs {
    AugmentArgs {
        input: Some(input.to_path_buf()),
        output: Some(output.to_path_buf()),
        threshold: 0.3,
        mlm_prob: 0.3,
        ..Default::default()
    }
}

/// `worker augment`.
fn augment(run_with: &TrainArgs, options: &AugmentArgs) -> std::process::Output {
    run(Command::new(binary("worker"))
        .arg("augment")
        .args(worker_augment_flags(run_with, options)))
}

fn csv_rows(path: &Path) -> Vec<Vec<String>> {
    let mut reader = csv::ReaderBuilder::new().has_headers(false).from_path(path).unwrap();
    reader
        .records()
        .map(|r| r.unwrap().iter().map(str::to_string).collect())
        .collect()
}

#[test]
fn tricky_lines_keep_their_rows_and_long_lines_keep_their_tail() {
    let dir = tempfile::tempdir().unwrap();
    let long_tail = "꼬리 부분은 그대로 남아야 한다";
    let long = format!("{} {long_tail}", "영화 정말 재밌다 배우 연기 최고 ".repeat(20));
    let input = dir.path().join("tricky.txt");
    std::fs::write(&input, format!("\n?!...\n😂😂😂\n굿\n{long}\n").as_bytes()).unwrap();
    let output = dir.path().join("out.csv");
    let out = augment(
        &tiny_run(42, 32),
        &AugmentArgs {
            num_augmentations: 3,
            ..options(&input, &output)
        },
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["sentences"], 5);
    let rows = csv_rows(&output);
    assert_eq!(rows[0], vec!["text", "augmented_1", "augmented_2", "augmented_3"]);
    assert_eq!(rows.len(), 6, "one output row per input row");
    assert_eq!(rows[1], vec!["", "", "", ""], "an empty line passes through");
    assert!(
        rows[3][1..].iter().all(|v| v == "😂😂😂"),
        "only emoji: nothing to mask ({:?})",
        rows[3]
    );
    for variant in &rows[5][1..] {
        assert!(
            variant.ends_with(long_tail),
            "the tail beyond the window is kept: {variant}"
        );
    }
    assert!(
        rows[5][1..].iter().any(|v| *v != long),
        "the window itself is augmented"
    );
}

#[test]
fn same_seed_same_bytes_and_labels_stay_with_their_rows() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("labeled.csv");
    let mut text = String::from("id,comments,label\n");
    for (i, doc) in nsmc_docs(40).iter().enumerate() {
        let doc = if i == 3 {
            format!("\"따옴표 \"\"안\"\"\t탭, 쉼표 {doc}\"")
        } else {
            format!("\"{}\"", doc.replace('"', "\"\""))
        };
        text.push_str(&format!("{i},{doc},{}\n", i % 2));
    }
    std::fs::write(&input, text).unwrap();
    let (a, b, c) = (
        dir.path().join("a.csv"),
        dir.path().join("b.csv"),
        dir.path().join("c.csv"),
    );
    let two = |output: &Path| AugmentArgs {
        num_augmentations: 2,
        ..options(&input, output)
    };
    for (path, seed) in [(&a, 1), (&b, 1), (&c, 2)] {
        let out = augment(&tiny_run(seed, 128), &two(path));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "same seed, same bytes"
    );
    assert_ne!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&c).unwrap(),
        "another seed, other variants"
    );
    let rows = csv_rows(&a);
    assert_eq!(rows.len(), 41);
    for (i, row) in rows[1..].iter().enumerate() {
        assert_eq!(row[0], i.to_string());
        assert_eq!(row[2], (i % 2).to_string(), "label of row {i}");
    }
    assert!(rows[4][1].contains("따옴표 \"안\"\t탭, 쉼표"));
    let changed = rows[1..].iter().filter(|r| r[3] != r[1]).count();
    assert!(changed > 20, "most sentences get a new variant ({changed} of 40)");
    // JSONL output carries every column plus the variants.
    let jsonl = dir.path().join("a.jsonl");
    let out = augment(&tiny_run(1, 128), &two(&jsonl));
    assert!(out.status.success());
    let first: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&jsonl).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(first["label"], "0");
    assert_eq!(first["augmented"].as_array().unwrap().len(), 2);
    // The same seed gives the same variants whatever the output format.
    assert_eq!(first["id"], rows[1][0]);
    assert_eq!(first["comments"], rows[1][1]);
    assert_eq!(first["augmented"], serde_json::json!([rows[1][3], rows[1][4]]));
}

#[test]
fn a_missing_column_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.tsv");
    std::fs::write(&input, "문장\t라벨\n안녕\t1\n").unwrap();
    let out = augment(
        &tiny_run(TrainArgs::default().seed, TrainArgs::default().max_seq_len),
        &AugmentArgs {
            column: Some("text".into()),
            ..options(&input, &dir.path().join("o.csv"))
        },
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no column `text`") && err.contains("문장"), "{err}");
}

/// NSMC test documents of three words or more without a quote.
fn nsmc_docs(n: usize) -> Vec<String> {
    nsmc_documents_where("ratings_test.txt", n, |d| {
        d.split_whitespace().count() >= 3 && !d.contains('"')
    })
}

/// The first `n` NSMC train documents, one a line.
fn write_docs(path: &Path, n: usize) {
    let docs = nsmc_documents_where("ratings_train.txt", n, |_| true);
    std::fs::write(path, docs.join("\n") + "\n").unwrap();
}

/// What the distributed augmentation and its one-process reference run with.
fn job_run() -> TrainArgs {
    tiny_run(5, 64)
}

fn job_options(input: &Path, output: &Path) -> AugmentArgs {
    AugmentArgs {
        num_augmentations: 2,
        ..options(input, output)
    }
}

fn augment_job(state: &Path, input: &Path, output: &Path) -> CoordinatorProc {
    std::fs::create_dir_all(state).unwrap();
    let mut args = vec!["--task", "augment", "--num_workers", "2", "--device", "cpu"];
    let flags = [job_run().to_argv(), job_options(input, output).to_argv()].concat();
    args.extend(flags.iter().map(String::as_str));
    CoordinatorProc::start(state, &args)
}

#[test]
fn a_distributed_augmentation_job_equals_worker_augment_and_survives_kill_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("docs.txt");
    write_docs(&input, 6000);
    let reference = dir.path().join("reference.csv");
    let out = augment(&job_run(), &job_options(&input, &reference));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Straight through.
    let straight = dir.path().join("straight.csv");
    let c = augment_job(&dir.path().join("state-a"), &input, &straight);
    wait_for("the augmentation job", Duration::from_secs(300), || {
        let s = c.status(Some("job-1"));
        assert_ne!(s["state"], "FAILED", "{s}");
        (s["state"] == "SUCCEEDED").then_some(())
    });
    same_file(&straight, &reference);

    // Killed after some parts, resumed: no row lost or duplicated.
    let resumed = dir.path().join("resumed.csv");
    let c = augment_job(&dir.path().join("state-b"), &input, &resumed);
    let parts = kormlm_proto::augment_parts::parts_dir(&resumed);
    wait_for("a first part", Duration::from_secs(120), || {
        std::fs::read_dir(&parts)
            .map(|d| d.count() > 0)
            .unwrap_or(false)
            .then_some(())
    });
    let kill = c.client(&["kill", "--job", "job-1"]);
    assert!(kill.status.success(), "{}", String::from_utf8_lossy(&kill.stderr));
    wait_for("KILLED", Duration::from_secs(120), || {
        (c.status(Some("job-1"))["state"] == "KILLED").then_some(())
    });
    let resume = c.client(&["resume", "--job", "job-1"]);
    assert!(resume.status.success(), "{}", String::from_utf8_lossy(&resume.stderr));
    wait_for("SUCCEEDED after resume", Duration::from_secs(300), || {
        let s = c.status(Some("job-1"));
        assert_ne!(s["state"], "FAILED", "{s}");
        (s["state"] == "SUCCEEDED").then_some(())
    });
    same_file(&resumed, &reference);
    assert_eq!(csv_rows(&resumed).len(), 6001);
}

/// Byte-identical files, reporting the first differing line otherwise.
fn same_file(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read_to_string(a).unwrap(), std::fs::read_to_string(b).unwrap());
    if x != y {
        let (line, (p, q)) = x
            .lines()
            .zip(y.lines())
            .enumerate()
            .find(|(_, (p, q))| p != q)
            .unwrap_or((0, ("", "")));
        panic!(
            "{} differs from {} at line {}:\n{p}\n{q}\n({} vs {} lines)",
            a.display(),
            b.display(),
            line + 1,
            x.lines().count(),
            y.lines().count()
        );
    }
}

#[test]
fn the_quality_report_covers_the_grid() {
    let dev = shared_data().join("korean-hate-speech/labeled/dev.tsv");
    let run_with = tiny_run(42, 128);
    let out = run(Command::new(binary("worker"))
        .arg("augment-report")
        .args(worker_augment_flags(
            &run_with,
            &AugmentArgs {
                input: Some(dev.clone()),
                ..Default::default()
            },
        ))
        .args(["--limit", "60", "--mlm_probs", "0.1,0.3", "--thresholds", "0.5,0.9"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["sentences"], 60);
    // transformers on the same sentences, masked by an independent implementation of the rule
    // (15 % of the non-special tokens, one SplitMix64 draw a position, seeded per sentence).
    let (correct, masked) = assert_report_accuracy(&report, &tiny_model(), &dev, 60, &run_with);
    eprintln!("masked-token top-1 accuracy: {correct} of {masked}, as transformers");
    let grid = report["grid"].as_array().unwrap();
    assert_eq!(grid.len(), 4);
    for point in grid {
        let histogram: u64 = point["edits_histogram"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(histogram, 60);
    }
    let mean = |p: f64| {
        grid.iter()
            .filter(|g| g["mlm_prob"] == p)
            .map(|g| g["mean_tokens_changed"].as_f64().unwrap())
            .sum::<f64>()
    };
    assert!(mean(0.3) > mean(0.1), "masking more replaces more");
}
