//! Helpers shared by the oracle test binaries: paths, the Python oracle, logits comparison.
#![allow(dead_code)]

use kormlm_worker::model::LoadedModel;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn shared_data() -> PathBuf {
    std::env::var_os("KORMLM_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().parent().unwrap().join("shared/data"))
}

pub fn python() -> PathBuf {
    std::env::var_os("KORMLM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/kormlm/torch-2.11.0/bin/python"))
}

pub fn oracle(args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(workspace().join("tests/python/oracle.py"))
        .args(args)
        .output()
        .expect("the Python oracle runs (./test.sh installs it)");
    assert!(
        out.status.success(),
        "oracle {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn nsmc_documents(n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(shared_data().join("nsmc/ratings_test.txt")).unwrap();
    text.lines()
        .skip(1)
        .filter_map(|l| l.split('\t').nth(1))
        .filter(|d| !d.is_empty())
        .take(n)
        .map(str::to_string)
        .collect()
}

pub fn tensor_map(path: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Rust logits vs transformers' logits for the same padded batch.
pub fn logits_diff(model_dir: &Path, work: &Path, tag: &str) -> f64 {
    let sentences = work.join(format!("{tag}.sentences.txt"));
    std::fs::write(&sentences, nsmc_documents(48).join("\n") + "\n").unwrap();
    let expected_path = work.join(format!("{tag}.logits.safetensors"));
    oracle(&[
        "logits",
        model_dir.to_str().unwrap(),
        sentences.to_str().unwrap(),
        expected_path.to_str().unwrap(),
    ]);
    let expected = tensor_map(&expected_path);
    let loaded = LoadedModel::load(model_dir.to_str().unwrap(), None, Device::Cpu).unwrap();
    let ours = tch::no_grad(|| {
        loaded
            .model
            .forward(&expected["input_ids"], &expected["attention_mask"], false)
    });
    let mask = expected["attention_mask"].unsqueeze(-1).to_kind(Kind::Float);
    // Padding positions are not compared (transformers' padded rows use a different mask fill).
    max_abs_diff(&(ours * &mask), &(expected["logits"].shallow_clone() * &mask))
}

/// A temporary directory of fixtures made once per test binary.
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn s(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }
}
