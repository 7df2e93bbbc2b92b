//! The demo path of `./run.sh` on a smaller setting: vocabulary training, a random ELECTRA,
//! distributed training with two CPU workers, augmentation, and the model reloading in
//! transformers.

use kormlm_e2e::*;
use kormlm_proto::augment_args::AugmentArgs;
use kormlm_proto::train_args::TrainArgs;
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
    // Sentences training never saw, as a TSV (the corpus has neither tabs nor quotes).
    let unseen = &lines[800..1400];
    std::fs::write(d.join("unseen.tsv"), format!("comments\n{}\n", unseen.join("\n"))).unwrap();
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
    let training = TrainArgs {
        model_name_or_path: p("init"),
        data_path: p("train.txt"),
        output_dir: Some(p("training")),
        max_seq_len: 32,
        num_train_epochs: 80,
        max_stop_number: 2,
        logging_steps: 5,
        ..Default::default()
    };
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
        .args(training.to_argv())
        .env("KORMLM_CACHE", d.join("cache")));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("training/summary.json")).unwrap()).unwrap();
    let history = val_loss_history(&summary);
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
    assert_early_stopped(&summary, 2);
    let png = std::fs::read(d.join("training/loss_curve.png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "a loss-curve PNG"
    );
    // Both curves are drawn: pixels of the train colour and of the dev colour.
    let (train_pixels, dev_pixels) = curve_pixels(&png);
    assert!(
        train_pixels > 200 && dev_pixels > 200,
        "train {train_pixels} and dev {dev_pixels} curve pixels"
    );
    let epoch_train_losses: Vec<f64> = logged_records(&d.join("training"), "eval")
        .iter()
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

    let best_model = TrainArgs {
        model_name_or_path: p("training/best"),
        ..Default::default()
    };
    let augmentation = AugmentArgs {
        input: Some(d.join("held.txt")),
        output: Some(d.join("aug.csv")),
        ..Default::default()
    };
    let flags = worker_augment_flags(&best_model, &augmentation);
    let out = worker(&[vec!["augment".to_string()], flags].concat());
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["sentences"], 20);

    // The trained model predicts masked tokens of unseen sentences; transformers, masking by
    // an independent implementation of the same rule, counts the same hits.
    let report_input = AugmentArgs {
        input: Some(d.join("unseen.tsv")),
        ..Default::default()
    };
    let flags = worker_augment_flags(&best_model, &report_input);
    let report_flags = ["--limit", "600", "--mlm_probs", "0.15", "--thresholds", "0.5"].map(String::from);
    let out = worker(&[vec!["augment-report".to_string()], flags, report_flags.to_vec()].concat());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["sentences"], 600);
    let (correct, masked) = assert_report_accuracy(
        &report,
        &d.join("training/best"),
        &d.join("unseen.tsv"),
        600,
        &best_model,
    );
    eprintln!("trained demo model: masked-token top-1 accuracy {correct} of {masked}, as transformers");
    assert!(correct > 0, "the trained model gets some masked tokens right");

    let reload = run(Command::new(oracle_python()).args([
        "-c",
        "import sys; from transformers import AutoModelForMaskedLM, AutoTokenizer; \
         m = AutoModelForMaskedLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]); \
         print(type(m).__name__, len(t))",
        &p("training/best"),
    ]));
    assert!(reload.status.success(), "{}", String::from_utf8_lossy(&reload.stderr));
    assert!(String::from_utf8_lossy(&reload.stdout).starts_with("ElectraForMaskedLM"));
    assert_eq!(
        String::from_utf8_lossy(&reload.stdout).trim(),
        format!("ElectraForMaskedLM {}", vocab.lines().count()),
        "transformers sees the whole vocabulary"
    );
}

/// `worker ARGS`, which must succeed.
fn worker<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> std::process::Output {
    let out = run(Command::new(binary("worker")).args(args));
    assert!(
        out.status.success(),
        "worker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Pixels of the train curve's colour and of the dev curve's (those of `worker::train::plot`).
fn curve_pixels(png: &[u8]) -> (usize, usize) {
    let mut reader = png::Decoder::new(png).read_info().expect("a decodable PNG");
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).expect("a PNG frame");
    let step = match frame.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("the loss curve is {other:?}, not RGB"),
    };
    let rgb: Vec<&[u8]> = pixels[..frame.buffer_size()]
        .chunks_exact(step)
        .map(|p| &p[..3])
        .collect();
    let count = |color: [u8; 3]| rgb.iter().filter(|p| **p == color).count();
    (count([31, 119, 180]), count([214, 39, 40]))
}
