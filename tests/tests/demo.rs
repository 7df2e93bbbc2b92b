//! The demo path of `./run.sh` on a smaller setting: vocabulary training, a random ELECTRA,
//! distributed training with two CPU workers, augmentation, and the model reloading in
//! transformers.

use kormlm_e2e::*;
use std::process::Command;

#[test]
fn vocabulary_model_training_and_augmentation_from_scratch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let corpus = std::fs::read_to_string(workspace_root().join("configs/demo/corpus.txt")).unwrap();
    let lines: Vec<&str> = corpus.lines().collect();
    assert!(lines.len() >= 2000, "the embedded corpus has a few thousand sentences");
    std::fs::write(d.join("train.txt"), lines[..800].join("\n") + "\n").unwrap();
    std::fs::write(d.join("held.txt"), lines[lines.len() - 20..].join("\n") + "\n").unwrap();
    let worker = |args: &[&str]| {
        let out = run(Command::new(binary("worker")).args(args));
        assert!(
            out.status.success(),
            "worker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let p = |name: &str| d.join(name).to_str().unwrap().to_string();
    worker(&[
        "tokenizer-train",
        "--input",
        &p("train.txt"),
        "--vocab_size",
        "800",
        "--output",
        &p("tok"),
    ]);
    let vocab = std::fs::read_to_string(d.join("tok/vocab.txt")).unwrap();
    assert_eq!(
        vocab.lines().take(5).collect::<Vec<_>>(),
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    );
    worker(&[
        "init-model",
        "--tokenizer",
        &p("tok"),
        "--output",
        &p("init"),
        "--hidden_size",
        "64",
        "--intermediate_size",
        "128",
    ]);

    let state = d.join("state");
    let out = run(Command::new(binary("coordinator"))
        .args([
            "--config",
            config("cpu-demo.json").to_str().unwrap(),
            "--num_workers",
            "2",
            "--device",
            "cpu",
        ])
        .args([
            "--exit-when-done",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state.to_str().unwrap(),
        ])
        .args([
            "--model_name_or_path",
            &p("init"),
            "--data_path",
            &p("train.txt"),
            "--output_dir",
            &p("training"),
        ])
        .args([
            "--max_seq_len",
            "32",
            "--num_train_epochs",
            "80",
            "--max_stop_number",
            "2",
        ])
        .args(["--logging_steps", "5"])
        .env("KORMLM_CACHE", d.join("cache")));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("training/summary.json")).unwrap()).unwrap();
    let history: Vec<f64> = summary["val_loss_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    // Trained until the dev loss stopped improving twice in a row, as ./run.sh does.
    assert_eq!(summary["early_stopped"], true, "{summary}");
    assert_eq!(summary["stop_count"], 2);
    let epochs = history.len();
    assert!((3..80).contains(&epochs), "{history:?}");
    let best = summary["best_val_loss"].as_f64().unwrap();
    assert!(
        best < history[0] && history[epochs - 2] >= best && history[epochs - 1] >= best,
        "{history:?}"
    );
    let png = std::fs::read(d.join("training/loss_curve.png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "a loss-curve PNG"
    );
    let log = std::fs::read_to_string(d.join("training/training_log.jsonl")).unwrap();
    let epoch_train_losses: Vec<f64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["type"] == "eval")
        .filter_map(|r| r["train_loss"].as_f64())
        .collect();
    assert_eq!(
        epoch_train_losses.len(),
        epochs,
        "every evaluation carries the epoch's train loss"
    );
    assert!(
        epoch_train_losses[epochs - 1] < epoch_train_losses[0],
        "{epoch_train_losses:?}"
    );

    let out = worker(&[
        "augment",
        "--model",
        &p("training/best"),
        "--input",
        &p("held.txt"),
        "--output",
        &p("aug.csv"),
    ]);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["sentences"], 20);

    let reload = run(Command::new(oracle_python()).args([
        "-c",
        "import sys; from transformers import AutoModelForMaskedLM, AutoTokenizer; \
         m = AutoModelForMaskedLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]); \
         print(type(m).__name__, len(t))",
        &p("training/best"),
    ]));
    assert!(reload.status.success(), "{}", String::from_utf8_lossy(&reload.stderr));
    assert!(String::from_utf8_lossy(&reload.stdout).starts_with("ElectraForMaskedLM"));
}
