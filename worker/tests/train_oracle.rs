//! Oracle tests of the training engine: one AdamW step against PyTorch on the transformers
//! model, schedules and the loss scaler against DeepSpeed, and real training runs.

mod common;

use common::{logits_diff, max_abs_diff, tensor_map};
use kormlm_e2e::{
    assert_early_stopped, nsmc_documents, oracle, oracle_vocabulary, shared_data, text, val_loss_history, Fixture,
};
use kormlm_proto::ds_config::{DsConfig, Fp16Config, ResolvedConfig, SchedulerConfig, WarmupType};
use kormlm_proto::train_args::TrainArgs;
use kormlm_worker::batch::MaskedBatch;
use kormlm_worker::comm::SingleRank;
use kormlm_worker::dataset::TokenizedSet;
use kormlm_worker::masking::{Masker, IGNORE};
use kormlm_worker::model::LoadedModel;
use kormlm_worker::optim::loss_scale::DynamicLossScaler;
use kormlm_worker::optim::schedule::Schedule;
use kormlm_worker::train::trainer::Trainer;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use tch::{Device, Tensor};

/// A vocabulary and a tiny model without dropout, made once per test binary.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let f = Fixture::new();
        oracle_vocabulary(&f.path("tok"), 6000);
        oracle(&[
            "model",
            &f.s("tiny"),
            "--tokenizer",
            &f.s("tok"),
            "--dropout",
            "0",
            "--seed",
            "11",
        ]);
        f
    })
}

fn resolved(json: &str) -> ResolvedConfig {
    DsConfig::parse(json, "test.json")
        .unwrap()
        .config
        .resolve(1, "test.json")
        .unwrap()
}

/// Builds masked micro-batches in Rust, runs one kormlm step and one PyTorch AdamW step from the
/// same weights, and returns the largest weight difference. `l2`: DeepSpeed's `Adam` with
/// `adam_w_mode: false`, against `torch.optim.Adam`.
fn step_difference(micro_batches: usize, clip: f64, tag: &str, l2: bool) -> f64 {
    step_with(micro_batches, clip, tag, l2, false).0
}

/// [`step_difference`]'s step, in bf16 autocast on both sides when `bf16`; also returns the
/// mean masked-token loss of kormlm's and of PyTorch's forward passes.
fn step_with(micro_batches: usize, clip: f64, tag: &str, l2: bool, bf16: bool) -> (f64, f64, f64) {
    let f = fixture();
    let loaded = LoadedModel::load(&f.s("tiny"), None, Device::Cpu).unwrap();
    let docs = nsmc_documents(16);
    let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
    let ids = loaded.tokenizer.encode_batch(&refs, Some(32)).unwrap();
    let set = TokenizedSet::from_samples(&ids);
    let masker = Masker {
        special: loaded.tokenizer.special(),
        vocab_size: loaded.tokenizer.vocab_size() as u32,
        probability: 0.15,
        seed: 3,
    };
    let samples: Vec<_> = (0..set.len()).map(|i| masker.mask(set.get(i), 0, i as u64)).collect();
    let per = samples.len() / micro_batches;
    let total: usize = samples.iter().map(|s| s.masked_count()).sum();
    let pad = loaded.tokenizer.special().pad;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut batches = Vec::new();
    for k in 0..micro_batches {
        let chunk = &samples[k * per..(k + 1) * per];
        let batch = MaskedBatch::from_samples(chunk, pad, Device::Cpu);
        let width = batch.input_ids.size()[1] as usize;
        let mut labels = vec![IGNORE; chunk.len() * width];
        for (r, s) in chunk.iter().enumerate() {
            labels[r * width..r * width + s.labels.len()].copy_from_slice(&s.labels);
        }
        tensors.push((format!("input_ids_{k}"), batch.input_ids.shallow_clone()));
        tensors.push((format!("attention_mask_{k}"), batch.attention_mask.shallow_clone()));
        tensors.push((
            format!("labels_{k}"),
            Tensor::from_slice(&labels).view([chunk.len() as i64, width as i64]),
        ));
        batches.push(batch);
    }
    let batch_path = f.path(&format!("{tag}.batches.safetensors"));
    Tensor::write_safetensors(&tensors, &batch_path).unwrap();
    let expected_path = f.path(&format!("{tag}.expected.safetensors"));
    let (clip_text, tiny) = (clip.to_string(), f.s("tiny"));
    let mut oracle_args = vec![
        "train-step",
        &tiny,
        batch_path.to_str().unwrap(),
        expected_path.to_str().unwrap(),
        "--lr",
        "1e-3",
        "--clip",
        &clip_text,
    ];
    if bf16 {
        oracle_args.push("--bf16");
    }
    let optimizer = if l2 {
        // A large decay, so the L2 term matters in the comparison.
        oracle_args.extend(["--l2", "--weight_decay", "0.5"]);
        r#""type": "Adam", "params": {"lr": 1e-3, "betas": [0.9, 0.99], "eps": 1e-6, "weight_decay": 0.5, "adam_w_mode": false}"#
    } else {
        r#""type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.99], "eps": 1e-6, "weight_decay": 0.01}"#
    };
    let printed = oracle(&oracle_args);
    let theirs: Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();

    let config = resolved(&format!(
        r#"{{"train_batch_size": 16, "gradient_clipping": {clip}, "optimizer": {{{optimizer}}}, "bf16": {{"enabled": {bf16}}}}}"#
    ));
    let mut trainer = Trainer::new(loaded, &config, &TrainArgs::default(), 1, &SingleRank).unwrap();
    let mut loss_sum = 0.0;
    for batch in &batches {
        loss_sum += trainer.backward(batch, total as f64);
    }
    let report = trainer.step(&mut SingleRank).unwrap();
    assert!(!report.skipped);
    let expected = tensor_map(&expected_path);
    let mut worst: f64 = 0.0;
    for slot in &trainer.flat.slots {
        let ours = trainer
            .flat
            .params
            .narrow(0, slot.offset, slot.numel)
            .view(slot.shape.as_slice());
        let theirs = expected
            .get(&slot.name)
            .unwrap_or_else(|| panic!("{} missing from the oracle", slot.name));
        worst = worst.max(max_abs_diff(&ours, theirs));
    }
    assert_eq!(trainer.flat.slots.len(), expected.len());
    (worst, loss_sum / total as f64, theirs["loss"].as_f64().unwrap())
}

/// One kormlm step ends within 1e-5 of PyTorch's (`reference`) weights.
fn assert_step_matches(micro_batches: usize, clip: f64, tag: &str, l2: bool, reference: &str) {
    let diff = step_difference(micro_batches, clip, tag, l2);
    eprintln!("{tag} step vs {reference}: max abs weight diff {diff:e}");
    assert!(diff <= 1e-5, "max abs weight diff {diff}");
}

#[test]
fn adamw_step_matches_pytorch() {
    assert_step_matches(1, 0.0, "plain", false, "torch.optim.AdamW");
}

#[test]
fn adamw_step_with_clipping_matches_pytorch() {
    assert_step_matches(1, 0.05, "clip", false, "torch.optim.AdamW");
}

#[test]
fn adamw_step_with_accumulation_and_clipping_matches_pytorch() {
    assert_step_matches(2, 0.05, "accum", false, "torch.optim.AdamW");
}

#[test]
fn adam_with_l2_decay_matches_pytorch_adam() {
    assert_step_matches(
        1,
        0.0,
        "adam-l2",
        true,
        "torch.optim.Adam (DeepSpeed Adam, adam_w_mode false)",
    );
}

/// bf16 on the CPU (AVX-512 BF16/AMX): kormlm's autocast forward gives PyTorch's
/// `torch.autocast("cpu", dtype=torch.bfloat16)` loss. A loss computed from bfloat16 logits carries
/// an error of the order of bfloat16's unit roundoff (2⁻⁸ ≈ 0.4 %) that depends on the order of
/// operations, so the two implementations may differ by that much; the bound is 1 % (2.5
/// roundoffs), while both must differ from the fp32 loss (autocast really ran on both sides).
#[test]
fn bf16_cpu_autocast_losses_match_pytorch() {
    if !kormlm_worker::autocast::CpuBf16::probe().supported() {
        eprintln!("this CPU has no bfloat16 instructions; the refusal is tested in the worker's unit tests");
        return;
    }
    let (_, ours_fp32, theirs_fp32) = step_with(2, 0.0, "bf16-ref", false, false);
    let (_, ours, theirs) = step_with(2, 0.0, "bf16", false, true);
    eprintln!("loss: kormlm bf16 {ours}, torch bf16 {theirs}, kormlm fp32 {ours_fp32}, torch fp32 {theirs_fp32}");
    assert!(
        (ours_fp32 - theirs_fp32).abs() <= 1e-5 * theirs_fp32,
        "fp32 losses agree"
    );
    assert!(
        (ours - theirs).abs() <= 1e-2 * theirs,
        "bf16 losses within 1 %: {ours} vs {theirs}"
    );
    assert!(
        ours != ours_fp32 && theirs != theirs_fp32,
        "autocast changed both losses"
    );
}

/// bf16 training reaches the dev loss of fp32 training after the same steps within 2 %.
#[test]
fn bf16_training_reaches_the_fp32_dev_loss() {
    if !kormlm_worker::autocast::CpuBf16::probe().supported() {
        eprintln!("this CPU has no bfloat16 instructions");
        return;
    }
    let f = fixture();
    let data = shared_data().join("korean-hate-speech/labeled/dev.tsv");
    let config = |bf16: bool| {
        format!(
            r#"{{"train_micro_batch_size_per_gpu": 16, "bf16": {{"enabled": {bf16}}},
            "optimizer": {{"type": "AdamW", "params": {{"lr": 2e-3, "betas": [0.9, 0.99], "eps": 1e-6, "weight_decay": 0.01}}}}}}"#
        )
    };
    let mut losses = Vec::new();
    for (bf16, out) in [(false, "fp32-run"), (true, "bf16-run")] {
        let args = TrainArgs {
            num_train_epochs: 2,
            max_seq_len: 48,
            ..training(f, out, &data)
        };
        let summary = run_train(f, &args, &config(bf16));
        let history = val_loss_history(&summary);
        let log = std::fs::read_to_string(f.path(&format!("{out}/training_log.jsonl"))).unwrap();
        let start: Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
        assert_eq!(start["precision"], if bf16 { "bf16" } else { "fp32" }, "{start}");
        losses.push(*history.last().unwrap());
        assert!(history[1] < history[0], "{out}: the dev loss falls: {history:?}");
    }
    let (fp32, bf16) = (losses[0], losses[1]);
    eprintln!(
        "dev loss after 2 epochs: fp32 {fp32}, bf16 {bf16} ({:+.2} %)",
        (bf16 / fp32 - 1.0) * 100.0
    );
    assert!((bf16 - fp32).abs() <= 0.02 * fp32, "bf16 {bf16} vs fp32 {fp32}");
}

#[test]
fn schedules_match_deepspeed_and_transformers() {
    let expected: Value = serde_json::from_str(oracle(&["schedules", "--n", "200"]).lines().last().unwrap()).unwrap();
    let cases = [
        (
            "warmup_log",
            Schedule::from_config(
                Some(&SchedulerConfig::WarmupLR {
                    warmup_min_lr: 0.0,
                    warmup_max_lr: Some(2e-4),
                    warmup_num_steps: 100,
                    warmup_type: WarmupType::Log,
                }),
                1e-3,
            ),
        ),
        (
            "warmup_linear",
            Schedule::from_config(
                Some(&SchedulerConfig::WarmupLR {
                    warmup_min_lr: 1e-5,
                    warmup_max_lr: Some(2e-4),
                    warmup_num_steps: 50,
                    warmup_type: WarmupType::Linear,
                }),
                1e-3,
            ),
        ),
        (
            "warmup_decay",
            Schedule::from_config(
                Some(&SchedulerConfig::WarmupDecayLR {
                    warmup_min_lr: 0.0,
                    warmup_max_lr: Some(3e-4),
                    warmup_num_steps: 40,
                    warmup_type: WarmupType::Linear,
                    total_num_steps: 150,
                }),
                1e-3,
            ),
        ),
        (
            "warmup_cosine",
            Schedule::from_config(
                Some(&SchedulerConfig::WarmupCosineLR {
                    total_num_steps: 160,
                    warmup_min_ratio: 0.1,
                    warmup_num_steps: 30,
                    cos_min_ratio: 0.01,
                    warmup_type: WarmupType::Log,
                }),
                1e-3,
            ),
        ),
        (
            "linear",
            Schedule::Linear {
                base_lr: 2e-4,
                warmup_steps: 20,
                total_steps: 180,
            },
        ),
    ];
    for (name, schedule) in cases {
        let values = expected[name].as_array().unwrap();
        for (k, v) in values.iter().enumerate() {
            let want = v.as_f64().unwrap();
            let got = schedule.lr(k as u64);
            assert!(
                (got - want).abs() <= 1e-12 + 1e-9 * want.abs(),
                "{name} step {k}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn loss_scaler_matches_deepspeed() {
    for (pattern, consecutive) in [
        ("0001000010110000000001111000000000", false),
        ("0110100000001010000000011", true),
    ] {
        let mut args = vec![
            "loss-scale",
            pattern,
            "--power",
            "8",
            "--window",
            "4",
            "--hysteresis",
            "2",
        ];
        if consecutive {
            args.push("--consecutive");
        }
        let expected: Vec<f64> = serde_json::from_str(oracle(&args).lines().last().unwrap()).unwrap();
        let mut scaler = DynamicLossScaler::from_config(&Fp16Config {
            initial_scale_power: 8,
            loss_scale_window: 4,
            hysteresis: 2,
            consecutive_hysteresis: consecutive,
            ..Fp16Config::default()
        });
        let ours: Vec<f64> = pattern
            .chars()
            .map(|c| {
                scaler.update_scale(c == '1').unwrap();
                scaler.cur_scale
            })
            .collect();
        assert_eq!(ours, expected, "pattern {pattern}");
    }
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// Training of the fixture's tiny model on `data_path` into the fixture's `out`, every other
/// flag at its default.
fn training(f: &Fixture, out: &str, data_path: &Path) -> TrainArgs {
    TrainArgs {
        model_name_or_path: f.s("tiny"),
        data_path: text(data_path),
        output_dir: Some(f.s(out)),
        ..Default::default()
    }
}

/// `worker train` with `args` and the DeepSpeed config `config`; returns the summary it prints.
fn run_train(f: &Fixture, args: &TrainArgs, config: &str) -> Value {
    let out = args.output_dir.as_deref().expect("a test names its output directory");
    let config_path = Path::new(out).with_extension("ds.json");
    std::fs::write(&config_path, config).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["train", "--config", &text(&config_path), "--cache_dir", &f.s("cache")])
        .args(args.to_argv())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn training_lowers_dev_loss_and_the_best_model_reloads_in_transformers() {
    let f = fixture();
    let data = shared_data().join("korean-hate-speech/labeled/train.tsv");
    let config = r#"{"train_micro_batch_size_per_gpu": 32, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.99], "eps": 1e-6, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3, "warmup_num_steps": 20, "warmup_type": "linear"}}}"#;
    let args = TrainArgs {
        num_train_epochs: 3,
        max_seq_len: 64,
        logging_steps: 20,
        ..training(f, "falls", &data)
    };
    let summary = run_train(f, &args, config);
    let history = val_loss_history(&summary);
    assert_eq!(history.len(), 3);
    assert!(
        history.windows(2).all(|w| w[1] < w[0]) && history[2] < history[0] - 0.1,
        "dev loss should fall: {history:?}"
    );
    let log = std::fs::read_to_string(f.path("falls/training_log.jsonl")).unwrap();
    let records: Vec<Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let train = records.iter().find(|r| r["type"] == "train").unwrap();
    for key in [
        "epoch",
        "step",
        "lr",
        "loss",
        "samples_per_s",
        "tokens_per_s",
        "mfu",
        "elapsed_s",
    ] {
        assert!(!train[key].is_null(), "train record lacks {key}: {train}");
    }
    let mfu = train["mfu"].as_f64().unwrap();
    assert!(
        mfu > 0.0 && mfu < 1.0,
        "model-FLOPs utilisation is a share of the peak: {train}"
    );
    let eval = records.iter().find(|r| r["type"] == "eval").unwrap();
    for key in ["val_loss", "val_accuracy", "best_val_loss", "stop_count"] {
        assert!(!eval[key].is_null(), "eval record lacks {key}: {eval}");
    }
    // The records hold what the run did, by the documented rules rather than by presence:
    // a train record every 20 steps and at each epoch's end, with the learning rate of
    // DeepSpeed's linear WarmupLR (0 to 1e-3 over 20 iterations) at the step taken.
    let global_steps = summary["global_steps"].as_u64().unwrap();
    assert_eq!(global_steps % 3, 0, "3 epochs of equal length: {summary}");
    let per_epoch = global_steps / 3;
    let mut expected_steps: Vec<u64> = (1..=global_steps / 20).map(|k| 20 * k).collect();
    expected_steps.extend([per_epoch, 2 * per_epoch, global_steps]);
    expected_steps.sort_unstable();
    expected_steps.dedup();
    let trains: Vec<&Value> = records.iter().filter(|r| r["type"] == "train").collect();
    let steps: Vec<u64> = trains.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, expected_steps);
    let mut last_elapsed = 0.0;
    for r in &trains {
        let step = r["step"].as_u64().unwrap();
        // Step g (from 1) runs at DeepSpeed's scheduler iteration g - 2 (iteration -1 is the
        // constructor's), as the schedule test above shows against DeepSpeed itself.
        let lr = 1e-3 * ((step - 2) as f64 / 20.0).min(1.0);
        assert!((r["lr"].as_f64().unwrap() - lr).abs() <= 1e-12, "step {step}: {r}");
        let epoch = r["epoch"].as_u64().unwrap();
        assert_eq!(epoch, (step - 1) / per_epoch, "{r}");
        let tokens_per_sample = r["tokens_per_s"].as_f64().unwrap() / r["samples_per_s"].as_f64().unwrap();
        assert!(
            (2.0..=64.0).contains(&tokens_per_sample),
            "[CLS] + [SEP] at least, --max_seq_len 64 at most: {r}"
        );
        let elapsed = r["elapsed_s"].as_f64().unwrap();
        assert!(elapsed > last_elapsed, "{r}");
        last_elapsed = elapsed;
    }
    // One evaluation per epoch, each the history's entry, the best the minimum so far.
    let evals: Vec<&Value> = records.iter().filter(|r| r["type"] == "eval").collect();
    assert_eq!(evals.len(), 3);
    for (i, r) in evals.iter().enumerate() {
        assert_eq!(r["val_loss"].as_f64(), Some(history[i]), "{r}");
        let best = history[..=i].iter().copied().fold(f64::INFINITY, f64::min);
        assert_eq!(r["best_val_loss"].as_f64(), Some(best), "{r}");
        assert_eq!(r["stop_count"], 0, "the dev loss fell every epoch: {r}");
    }
    let accuracy = |r: &Value| r["val_accuracy"].as_f64().unwrap();
    assert!(
        accuracy(evals[2]) > accuracy(evals[0]),
        "a falling dev loss comes with a rising masked-token accuracy: {evals:?}"
    );
    let diff = logits_diff(&f.path("falls/best"), f.dir.path(), "best");
    assert!(diff <= 1e-4, "best model logits differ from transformers by {diff}");
}

#[test]
fn early_stopping_fires_when_the_model_overfits() {
    let f = fixture();
    let docs = nsmc_documents(400);
    write_lines(&f.path("overfit-train.txt"), &docs[..48]);
    write_lines(&f.path("overfit-dev.txt"), &docs[200..300]);
    let spec = f.path("overfit.json");
    std::fs::write(
        &spec,
        r#"{"train": [{"path": "overfit-train.txt"}], "dev": [{"path": "overfit-dev.txt"}]}"#,
    )
    .unwrap();
    let config = r#"{"train_micro_batch_size_per_gpu": 16,
        "optimizer": {"type": "AdamW", "params": {"lr": 5e-3, "betas": [0.9, 0.99], "eps": 1e-6, "weight_decay": 0.0}}}"#;
    let args = TrainArgs {
        num_train_epochs: 60,
        max_seq_len: 48,
        max_stop_number: 3,
        ..training(f, "overfit", &spec)
    };
    let summary = run_train(f, &args, config);
    assert_eq!(summary["early_stopped"], true, "{summary}");
    assert!(summary["epochs_run"].as_u64().unwrap() < 60);
    assert_eq!(summary["stop_count"], 3);
    let history = val_loss_history(&summary);
    let best = summary["best_val_loss"].as_f64().unwrap();
    assert!(history[history.len() - 3..].iter().all(|v| *v >= best));
    assert_early_stopped(&summary, 3);
}

#[test]
fn max_steps_stops_training() {
    let f = fixture();
    let data = shared_data().join("korean-hate-speech/labeled/dev.tsv");
    let config = r#"{"train_micro_batch_size_per_gpu": 8}"#;
    let args = TrainArgs {
        num_train_epochs: 5,
        max_steps: 7,
        max_seq_len: 32,
        ..training(f, "maxsteps", &data)
    };
    let summary = run_train(f, &args, config);
    assert_eq!(summary["global_steps"], 7);
    assert_eq!(summary["epochs_run"], 1);
}
