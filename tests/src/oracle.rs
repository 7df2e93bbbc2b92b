//! The Python oracle (`tests/python/oracle.py` on torch + transformers): reference results, and
//! the tiny random model most end-to-end tests train.

use crate::data::{shared_data, text, workspace_root};
use crate::procs::run;
use std::path::PathBuf;
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
    let out = run(Command::new(oracle_python())
        .arg(workspace_root().join("tests/python/oracle.py"))
        .args(args));
    assert!(
        out.status.success(),
        "oracle {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
