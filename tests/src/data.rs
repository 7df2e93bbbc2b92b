//! Where the tests' inputs live: the workspace, its configs, the shared corpora, and temporary
//! fixture directories.

use std::path::{Path, PathBuf};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

pub fn config(name: &str) -> PathBuf {
    workspace_root().join("configs").join(name)
}

/// Writes `DIR/ds.json`, the DeepSpeed config the fault tests train with: ZeRO-2, AdamW, WarmupLR
/// (linear, 8 steps), gradient clipping, 16 samples a step.
pub fn zero2_config(dir: &Path) -> PathBuf {
    let path = dir.join("ds.json");
    std::fs::write(
        &path,
        r#"{"train_batch_size": 16, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.99], "eps": 1e-6, "weight_decay": 0.01}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3, "warmup_num_steps": 8, "warmup_type": "linear"}},
            "zero_optimization": {"stage": 2}}"#,
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

/// The shared corpora (`../shared/data`, or `KORMLM_SHARED_DATA`).
pub fn shared_data() -> PathBuf {
    std::env::var_os("KORMLM_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace_root()
                .parent()
                .expect("a parent directory")
                .join("shared/data")
        })
}

/// A path as the text a flag or a `TrainArgs` field carries (test paths are UTF-8).
pub fn text(path: &Path) -> String {
    path.to_str()
        .unwrap_or_else(|| panic!("{} is not UTF-8", path.display()))
        .to_string()
}

/// The first `n` non-empty documents of the NSMC test set.
pub fn nsmc_documents(n: usize) -> Vec<String> {
    nsmc_documents_where("ratings_test.txt", n, |d| !d.is_empty())
}

/// The first `n` documents of `nsmc/FILE` (the `document` column) that `keep` accepts.
pub fn nsmc_documents_where(file: &str, n: usize, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let path = shared_data().join("nsmc").join(file);
    let table = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    table
        .lines()
        .skip(1)
        .filter_map(|l| l.split('\t').nth(1))
        .filter(|d| keep(d))
        .take(n)
        .map(str::to_string)
        .collect()
}

/// A temporary directory of fixtures, removed when dropped (a test binary keeps one in a
/// `OnceLock` to make its models once).
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `path(name)` as text, for flags.
    pub fn s(&self, name: &str) -> String {
        text(&self.path(name))
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}
