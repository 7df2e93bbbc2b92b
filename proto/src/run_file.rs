//! Which run an output directory belongs to: `kormlm_run.json` (`run_id`, `job_id`,
//! `created_unix_ms`), written by rank 0 before anything else and read by the coordinator when
//! it decides whether a job may take or continue in a directory. One definition for both sides.

use serde::{Deserialize, Serialize};
use std::path::Path;

pub const RUN_FILE: &str = "kormlm_run.json";

/// Everything a training run writes into its output directory, the run file first. Only these
/// (and their temporary names) are ever removed by `--overwrite_output_dir`.
pub const RUN_OUTPUTS: [&str; 8] = [
    RUN_FILE,
    "training_log.jsonl",
    "checkpoints",
    "params.json",
    "summary.json",
    "best",
    "final",
    "loss_curve.png",
];

/// The contents of `kormlm_run.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunIdentity {
    pub run_id: String,
    /// The coordinator's job (none for `worker train`).
    #[serde(default)]
    pub job_id: Option<String>,
    #[serde(default)]
    pub created_unix_ms: i64,
}

impl RunIdentity {
    pub fn new(run_id: String, job_id: Option<String>) -> Self {
        Self {
            run_id,
            job_id,
            created_unix_ms: crate::now_ms(),
        }
    }

    /// The run file's text, or why it is not one.
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        let run: Self = serde_json::from_slice(text).map_err(|e| format!("not a kormlm run file: {e}"))?;
        if run.run_id.is_empty() {
            return Err("`run_id` is empty".into());
        }
        Ok(run)
    }

    /// The run file's text.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a run file serialises") + "\n"
    }

    /// How a message names the run.
    pub fn describe(&self) -> String {
        match &self.job_id {
            Some(job) => format!("run {} of job {job}", self.run_id),
            None => format!("run {} (worker train)", self.run_id),
        }
    }
}

/// What an output directory holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Nothing of any run (or no directory yet).
    Nothing,
    Run(RunIdentity),
    /// Files a run writes (these names), but no run file naming the run.
    Unnamed(Vec<&'static str>),
    /// A run file that cannot be read: the file and why.
    Unreadable(String),
}

/// The run outputs present in `dir`, by name, in [`RUN_OUTPUTS`] order.
pub fn outputs_in(dir: &Path) -> Vec<&'static str> {
    RUN_OUTPUTS
        .iter()
        .copied()
        .filter(|name| dir.join(name).exists())
        .collect()
}

/// Reads what `dir` holds.
pub fn holder(dir: &Path) -> Holder {
    let path = dir.join(RUN_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => match RunIdentity::parse(&bytes) {
            Ok(run) => Holder::Run(run),
            Err(why) => Holder::Unreadable(format!("{}: {why}", path.display())),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match outputs_in(dir) {
            present if present.is_empty() => Holder::Nothing,
            present => Holder::Unnamed(present),
        },
        Err(e) => Holder::Unreadable(format!("{}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_file_of_either_side_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(holder(dir.path()), Holder::Nothing);
        for job in [Some("job-3".to_string()), None] {
            let run = RunIdentity::new("aaaa/job-3".into(), job);
            std::fs::write(dir.path().join(RUN_FILE), run.to_json()).unwrap();
            assert_eq!(holder(dir.path()), Holder::Run(run));
        }
        assert_eq!(RunIdentity::new("r".into(), None).describe(), "run r (worker train)");
        assert_eq!(
            RunIdentity::new("r".into(), Some("job-1".into())).describe(),
            "run r of job job-1"
        );
    }

    #[test]
    fn damaged_run_files_and_unnamed_outputs_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("training_log.jsonl"), "").unwrap();
        std::fs::create_dir(dir.path().join("checkpoints")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "the user's").unwrap();
        assert_eq!(
            holder(dir.path()),
            Holder::Unnamed(vec!["training_log.jsonl", "checkpoints"])
        );
        std::fs::write(dir.path().join(RUN_FILE), r#"{"run_id": ""}"#).unwrap();
        let Holder::Unreadable(why) = holder(dir.path()) else {
            panic!("an empty run id is not a run")
        };
        assert!(why.ends_with("kormlm_run.json: `run_id` is empty"), "{why}");
        std::fs::write(dir.path().join(RUN_FILE), "{not json").unwrap();
        let Holder::Unreadable(why) = holder(dir.path()) else {
            panic!("damaged JSON is not a run")
        };
        assert!(why.contains("not a kormlm run file") && why.contains("line 1"), "{why}");
    }
}
