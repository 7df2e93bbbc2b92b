//! The Python oracle (`tests/python/oracle.py` on torch + transformers): reference results, and
//! the tiny random model most end-to-end tests train.

use crate::command::run;
use crate::data::{shared_data, text, workspace_root};
use kormlm_proto::train_args::TrainArgs;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python interpreter with torch and the test oracle (set by ./test.sh).
pub fn oracle_python() -> PathBuf {
    std::env::var_os("KORMLM_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        home.join(".cache/kormlm/torch-2.11.0/bin/python")
    })
}

/// Runs `tests/python/oracle.py ARGS` with the oracle interpreter; returns stdout.
pub fn oracle(args: &[&str]) -> String {
    python_script("oracle.py", args)
}

/// Runs `tests/python/classify_oracle.py ARGS` (the sequence-classification oracle); returns stdout.
pub fn classify_oracle(args: &[&str]) -> String {
    python_script("classify_oracle.py", args)
}

fn python_script(script: &str, args: &[&str]) -> String {
    let out = run(Command::new(oracle_python())
        .arg(workspace_root().join("tests/python").join(script))
        .args(args));
    assert!(
        out.status.success(),
        "oracle {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A WordPiece vocabulary of `size` tokens trained by the `tokenizers` library on the shared
/// corpora, saved as a tokenizer directory `out`.
pub fn oracle_vocabulary(out: &Path, size: usize) {
    oracle(&[
        "vocab",
        &text(out),
        "--data",
        &text(&shared_data()),
        "--size",
        &size.to_string(),
    ]);
}

/// Checks the masked-token accuracy of a `worker augment-report` (run with `run`'s seed and
/// window on the first `limit` texts of `tsv`'s `comments`) against transformers on the same
/// sentences, masked by the oracle's own implementation of the rule; returns
/// (correct, masked) as transformers counts them.
pub fn assert_report_accuracy(report: &Value, model: &Path, tsv: &Path, limit: usize, run: &TrainArgs) -> (u64, u64) {
    let expected: Value = serde_json::from_str(&oracle(&[
        "mlm-accuracy",
        &text(model),
        &text(tsv),
        "--limit",
        &limit.to_string(),
        "--max_len",
        &run.max_seq_len.to_string(),
        "--seed",
        &run.seed.to_string(),
    ]))
    .expect("mlm-accuracy prints JSON");
    assert_eq!(report["sentences"], expected["sentences"], "{report} vs {expected}");
    assert_eq!(report["masked_tokens"], expected["masked"], "{report} vs {expected}");
    let (correct, masked) = (
        expected["correct"].as_u64().expect("a count"),
        expected["masked"].as_u64().expect("a count"),
    );
    let accuracy = report["masked_token_top1_accuracy"].as_f64().expect("an accuracy");
    assert!(
        (accuracy - correct as f64 / masked as f64).abs() <= 1e-12,
        "accuracy {accuracy}, transformers {correct} of {masked}"
    );
    (correct, masked)
}

/// A tiny random ELECTRA (no dropout) with a WordPiece vocabulary trained on the shared
/// corpora, created once per test binary.
pub fn tiny_model() -> PathBuf {
    static MODEL: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let tok = text(&dir.path().join("tok"));
            let model = dir.path().join("tiny");
            oracle(&["vocab", &tok, "--data", &text(&shared_data()), "--size", "4000"]);
            oracle(&[
                "model",
                &text(&model),
                "--tokenizer",
                &tok,
                "--dropout",
                "0",
                "--seed",
                "5",
            ]);
            (dir, model)
        })
        .1
        .clone()
}

/// A tiny random ELECTRA like `tiny_model()` (same vocabulary) but with dropout 0.1 (the
/// transformers default), created once per test binary.
pub fn tiny_dropout_model() -> PathBuf {
    static MODEL: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            let tok = tiny_model().with_file_name("tok");
            let dir = tempfile::tempdir().unwrap();
            let model = dir.path().join("tiny-dropout");
            oracle(&[
                "model",
                model.to_str().unwrap(),
                "--tokenizer",
                tok.to_str().unwrap(),
                "--dropout",
                "0.1",
                "--seed",
                "5",
            ]);
            (dir, model)
        })
        .1
        .clone()
}
