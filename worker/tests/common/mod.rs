//! What the oracle test binaries add to the harness (`kormlm-e2e`): tensors through tch, and
//! kormlm's logits against transformers' for the same batch.

use kormlm_e2e::{nsmc_documents, oracle, text};
use kormlm_worker::model::LoadedModel;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

pub fn tensor_map(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Rust logits vs transformers' logits for the same padded batch.
pub fn logits_diff(model_dir: &Path, work: &Path, tag: &str) -> f64 {
    let sentences = work.join(format!("{tag}.sentences.txt"));
    std::fs::write(&sentences, nsmc_documents(48).join("\n") + "\n").unwrap();
    let expected_path = work.join(format!("{tag}.logits.safetensors"));
    oracle(&["logits", &text(model_dir), &text(&sentences), &text(&expected_path)]);
    let expected = tensor_map(&expected_path);
    let loaded = LoadedModel::load(&text(model_dir), None, Device::Cpu).unwrap();
    let ours = tch::no_grad(|| {
        loaded
            .model
            .forward(&expected["input_ids"], &expected["attention_mask"], false)
    });
    let mask = expected["attention_mask"].unsqueeze(-1).to_kind(Kind::Float);
    // Padding positions are not compared (transformers' padded rows use a different mask fill).
    max_abs_diff(&(ours * &mask), &(expected["logits"].shallow_clone() * &mask))
}
