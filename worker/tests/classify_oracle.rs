//! Oracle tests of sequence classification against transformers' `ElectraForSequenceClassification`
//! (tests/python/classify_oracle.py): the keys a checkpoint lacks or leaves unused, the logits of
//! a saved classifier loaded by `AutoModelForSequenceClassification` with its label maps, and one
//! AdamW step with transformers' loss for single-label and multi-label classification, within the
//! masked-LM oracle tests' bounds (logits 1e-4, weights after a step 1e-5, loss 1e-5 relative).

#[allow(dead_code)] // the helpers the masked-LM oracle tests use too
mod common;

use common::{max_abs_diff, tensor_map};
use kormlm_e2e::{classify_oracle, nsmc_documents, oracle, text, tiny_model, Fixture};
use kormlm_proto::ds_config::{DsConfig, ResolvedConfig};
use kormlm_proto::train_args::TrainArgs;
use kormlm_worker::classify::data::Targets;
use kormlm_worker::classify::infer;
use kormlm_worker::comm::SingleRank;
use kormlm_worker::model::sequence_classification::{Labels, ProblemType};
use kormlm_worker::model::LoadedClassifier;
use kormlm_worker::train::trainer::Trainer;
use serde_json::Value;
use std::path::Path;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(Fixture::new)
}

fn single() -> Labels {
    Labels {
        names: vec!["none".into(), "offensive".into(), "hate".into()],
        problem_type: ProblemType::SingleLabel,
    }
}

fn multi() -> Labels {
    Labels {
        names: vec!["여성/가족".into(), "남성".into(), "clean".into(), "악플/욕설".into()],
        problem_type: ProblemType::MultiLabel,
    }
}

/// A classifier made by kormlm from the tiny MLM (head newly initialised), saved under `tag`.
fn saved_classifier(labels: Labels, tag: &str) -> (LoadedClassifier, std::path::PathBuf) {
    let loaded = LoadedClassifier::load(&text(&tiny_model()), None, Some(labels), Device::Cpu, 7).unwrap();
    let dir = fixture().path(tag);
    loaded.save(&dir).unwrap();
    (loaded, dir)
}

fn loading_info(model: &Path, labels: &Labels) -> Value {
    let n = labels.len().to_string();
    let mut args = vec!["loading-info", model.to_str().unwrap(), "--num_labels", &n];
    if labels.problem_type == ProblemType::MultiLabel {
        args.push("--multi_label");
    }
    serde_json::from_str(classify_oracle(&args).trim()).unwrap()
}

#[test]
fn newly_initialized_and_unused_keys_are_those_transformers_lists() {
    let tok = tiny_model().with_file_name("tok");
    let discriminator = fixture().path("discriminator");
    oracle(&[
        "model",
        &text(&discriminator),
        "--tokenizer",
        &text(&tok),
        "--kind",
        "discriminator",
        "--dropout",
        "0",
    ]);
    for (model, labels) in [(tiny_model(), single()), (discriminator, multi())] {
        let loaded = LoadedClassifier::load(&text(&model), None, Some(labels.clone()), Device::Cpu, 1).unwrap();
        let theirs = loading_info(&model, &labels);
        let as_strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect()
        };
        eprintln!("{}: ours {:?}, transformers {theirs}", model.display(), loaded.report);
        assert_eq!(loaded.report.newly_initialized, as_strings(&theirs["missing"]));
        assert_eq!(loaded.report.unused, as_strings(&theirs["unexpected"]));
        // `_init_weights`: N(0, initializer_range) weights, zero biases.
        let vars: std::collections::HashMap<String, Tensor> = loaded.vs.variables().into_iter().collect();
        for bias in ["classifier.dense.bias", "classifier.out_proj.bias"] {
            assert_eq!(vars[bias].abs().max().double_value(&[]), 0.0, "{bias}");
        }
        let weight = &vars["classifier.dense.weight"];
        let (std, mean) = (
            weight.std(true).double_value(&[]),
            weight.mean(Kind::Float).double_value(&[]),
        );
        assert!(
            (std - 0.02).abs() < 0.002 && mean.abs() < 0.002,
            "dense std {std}, mean {mean}"
        );
    }
}

/// kormlm's logits on the NSMC sentences, and transformers' from the saved directory.
fn assert_logits_match_after_saving(labels: Labels, tag: &str) {
    let (loaded, dir) = saved_classifier(labels.clone(), tag);
    let f = fixture();
    let sentences = f.path(&format!("{tag}.sentences.txt"));
    std::fs::write(&sentences, nsmc_documents(48).join("\n") + "\n").unwrap();
    let expected_path = f.path(&format!("{tag}.logits.safetensors"));
    let printed = classify_oracle(&["logits", &text(&dir), &text(&sentences), &text(&expected_path)]);
    let config: Value = serde_json::from_str(printed.trim()).unwrap();
    let expected = tensor_map(&expected_path);
    let ours = tch::no_grad(|| {
        loaded
            .model
            .forward(&expected["input_ids"], &expected["attention_mask"], false)
    });
    let diff = max_abs_diff(&ours, &expected["logits"]);
    eprintln!("{tag}: max abs logit diff {diff:e}; transformers loaded {config}");
    assert!(diff <= 1e-4, "max abs diff {diff}");
    assert_eq!(config["class"], "ElectraForSequenceClassification");
    assert_eq!(
        config["architectures"],
        serde_json::json!(["ElectraForSequenceClassification"])
    );
    assert_eq!(config["num_labels"], labels.len());
    assert_eq!(config["problem_type"], labels.problem_type.as_str());
    for (i, name) in labels.names.iter().enumerate() {
        assert_eq!(config["id2label"][i.to_string()], name.as_str());
        assert_eq!(config["label2id"][name], i);
    }
    // The saved directory loads back in kormlm with the same label space and logits.
    let back = LoadedClassifier::load(&text(&dir), None, None, Device::Cpu, 0).unwrap();
    assert_eq!(back.model.labels(), &labels);
    assert!(back.report.newly_initialized.is_empty() && back.report.unused.is_empty());
    let again = tch::no_grad(|| {
        back.model
            .forward(&expected["input_ids"], &expected["attention_mask"], false)
    });
    assert_eq!(max_abs_diff(&again, &ours), 0.0);
}

#[test]
fn single_label_logits_match_transformers_after_saving() {
    assert_logits_match_after_saving(single(), "single");
}

#[test]
fn multi_label_logits_match_transformers_after_saving() {
    assert_logits_match_after_saving(multi(), "multi");
}

fn resolved(json: &str) -> ResolvedConfig {
    DsConfig::parse(json, "test.json")
        .unwrap()
        .config
        .resolve(1, "test.json")
        .unwrap()
}

/// Targets for `n` texts: label ids cycling through the labels, or flags from a fixed pattern.
fn targets(labels: &Labels, n: usize) -> Targets {
    match labels.problem_type {
        ProblemType::SingleLabel => Targets::Single((0..n).map(|i| (i * 7 + 1) % labels.len()).collect()),
        ProblemType::MultiLabel => Targets::Multi(
            (0..n)
                .map(|i| (0..labels.len()).map(|l| (i * 3 + l * 5) % 4 == 0).collect())
                .collect(),
        ),
    }
}

/// One kormlm AdamW step over `micro_batches` micro-batches of 16 NSMC texts against
/// transformers' model and loss with `torch.optim.AdamW`; returns the largest weight
/// difference and both losses.
fn step_difference(labels: Labels, micro_batches: usize, clip: f64, tag: &str) -> (f64, f64, f64) {
    let (loaded, dir) = saved_classifier(labels.clone(), tag);
    let docs = nsmc_documents(16);
    let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
    let ids = loaded.tokenizer.encode_batch(&refs, Some(32)).unwrap();
    let all = targets(&labels, ids.len());
    let pad = loaded.tokenizer.special().pad;
    let per = ids.len() / micro_batches;
    let mut tensors = Vec::new();
    let mut batches = Vec::new();
    for k in 0..micro_batches {
        let rows: Vec<usize> = (k * per..(k + 1) * per).collect();
        let batch: Vec<&[u32]> = rows.iter().map(|&r| ids[r].as_slice()).collect();
        let (input_ids, attention_mask) = infer::inputs(&batch, pad, Device::Cpu);
        let target = infer::targets_tensor(&all, &rows, Device::Cpu);
        tensors.push((format!("input_ids_{k}"), input_ids.shallow_clone()));
        tensors.push((format!("attention_mask_{k}"), attention_mask.shallow_clone()));
        tensors.push((format!("labels_{k}"), target.shallow_clone()));
        batches.push((input_ids, attention_mask, target));
    }
    let f = fixture();
    let batch_path = f.path(&format!("{tag}.batches.safetensors"));
    Tensor::write_safetensors(&tensors, &batch_path).unwrap();
    let expected_path = f.path(&format!("{tag}.expected.safetensors"));
    let clip_text = clip.to_string();
    let printed = classify_oracle(&[
        "train-step",
        &text(&dir),
        &text(&batch_path),
        &text(&expected_path),
        "--lr",
        "1e-3",
        "--clip",
        &clip_text,
    ]);
    let theirs: Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    assert_eq!(theirs["problem_type"], labels.problem_type.as_str());

    let config = resolved(&format!(
        r#"{{"train_batch_size": 16, "gradient_clipping": {clip}, "optimizer": {{"type": "AdamW", "params": {{"lr": 1e-3, "betas": [0.9, 0.99], "eps": 1e-6, "weight_decay": 0.01}}}}}}"#
    ));
    let mut trainer = Trainer::new(loaded, &config, &TrainArgs::default(), 1, &SingleRank).unwrap();
    let divisor = trainer.loaded.model.loss_count(ids.len()) as f64;
    let mut loss_sum = 0.0;
    for (input_ids, attention_mask, target) in &batches {
        loss_sum += trainer.backward_loss(divisor, |loaded| {
            let logits = loaded.model.forward(input_ids, attention_mask, true);
            loaded.model.loss_sum(&logits, target)
        });
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
    (worst, loss_sum / divisor, theirs["loss"].as_f64().unwrap())
}

fn assert_step_matches(labels: Labels, micro_batches: usize, clip: f64, tag: &str) {
    let (diff, ours, theirs) = step_difference(labels, micro_batches, clip, tag);
    eprintln!("{tag}: max abs weight diff {diff:e}; loss kormlm {ours}, transformers {theirs}");
    assert!(diff <= 1e-5, "max abs weight diff {diff}");
    assert!((ours - theirs).abs() <= 1e-5 * theirs.abs(), "loss {ours} vs {theirs}");
}

#[test]
fn single_label_adamw_step_matches_transformers() {
    assert_step_matches(single(), 1, 0.0, "step-single");
}

#[test]
fn single_label_step_with_accumulation_and_clipping_matches_transformers() {
    assert_step_matches(single(), 2, 0.05, "step-single-accum");
}

#[test]
fn multi_label_adamw_step_matches_transformers() {
    assert_step_matches(multi(), 1, 0.0, "step-multi");
}

#[test]
fn multi_label_step_with_accumulation_and_clipping_matches_transformers() {
    assert_step_matches(multi(), 2, 0.05, "step-multi-accum");
}
