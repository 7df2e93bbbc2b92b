//! The part files of an augmentation job: each worker writes one file per finished chunk of
//! input rows into a directory next to the output, and the coordinator concatenates them in
//! order once every worker is done.
//!
//! The directory's `manifest.json` says what the parts were made from (input and model hashes,
//! seed, window, options) and how many there are; parts are only ever kept under a manifest
//! equal to the current job's, so a part can be reused by a resumed job and the merge knows
//! when one is missing. Temporary files (hidden `.part-….tmp-PID`, see [`crate::durable`]) are
//! never taken for parts.

use crate::durable::{self, WriteError};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";

/// What a directory's parts were made from. Two augmentations with equal manifests produce
/// equal parts, so a part written under one is valid under the other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartsManifest {
    /// SHA-256 of the input file.
    pub input_sha256: String,
    /// SHA-256 over the model's weight, config and tokenizer files.
    pub model_sha256: String,
    pub seed: u64,
    pub max_seq_len: usize,
    /// Everything else that decides a part's content (input format and column, masking and
    /// filter options, output format).
    pub options: serde_json::Value,
    /// `csv` or `jsonl`: the parts' extension.
    pub format: String,
    /// Input rows per part (the last one may be shorter).
    pub chunk_rows: usize,
    /// Parts that make up the output.
    pub parts: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PartsError {
    #[error("{}: {message}", path.display())]
    Read { path: PathBuf, message: String },
    #[error("{} has no {MANIFEST}: its parts cannot be told apart from another augmentation's", dir.display())]
    NoManifest { dir: PathBuf },
    #[error("part {chunk} of {parts} of the augmentation is missing in {}", dir.display())]
    MissingPart { dir: PathBuf, chunk: usize, parts: usize },
    #[error(transparent)]
    Write(#[from] WriteError),
}

impl PartsManifest {
    /// The manifest of `dir`, if it has one.
    pub fn read(dir: &Path) -> Result<Option<Self>, PartsError> {
        let path = dir.join(MANIFEST);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(PartsError::Read {
                    path,
                    message: e.to_string(),
                })
            }
        };
        serde_json::from_str(&text).map(Some).map_err(|e| PartsError::Read {
            path,
            message: e.to_string(),
        })
    }

    /// Writes the manifest into `dir` (durably).
    pub fn write(&self, dir: &Path) -> Result<(), PartsError> {
        let text = serde_json::to_string_pretty(self).expect("a manifest serialises");
        Ok(durable::write(&dir.join(MANIFEST), text + "\n")?)
    }

    /// The fields that differ from `other`, by name (for the warning when parts are discarded).
    pub fn differences(&self, other: &Self) -> Vec<&'static str> {
        let mut fields = Vec::new();
        let mut differ = |name, d: bool| {
            if d {
                fields.push(name);
            }
        };
        differ("input", self.input_sha256 != other.input_sha256);
        differ("model", self.model_sha256 != other.model_sha256);
        differ("seed", self.seed != other.seed);
        differ("max_seq_len", self.max_seq_len != other.max_seq_len);
        differ("options", self.options != other.options);
        differ("format", self.format != other.format);
        differ("chunk_rows", self.chunk_rows != other.chunk_rows);
        differ("parts", self.parts != other.parts);
        fields
    }
}

/// Where the parts of `output` are kept until they are merged.
pub fn parts_dir(output: &Path) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    output.with_file_name(format!(".{name}.parts"))
}

/// `ext` is `csv` or `jsonl`.
pub fn part_path(dir: &Path, chunk: usize, ext: &str) -> PathBuf {
    dir.join(format!("part-{chunk:06}.{ext}"))
}

/// Whether `name` is a part file's name (`part-NNNNNN.csv` or `.jsonl`; temporary files are not).
pub fn is_part_name(name: &str) -> bool {
    name.strip_prefix("part-")
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(n, ext)| {
            n.len() == 6 && n.bytes().all(|b| b.is_ascii_digit()) && ["csv", "jsonl"].contains(&ext)
        })
}

/// Concatenates the parts `0..parts` the manifest of `dir` lists into `output` (a CSV header
/// is kept once), written durably, then removes the directory. A missing part or manifest is
/// an error: the output is never written short.
pub fn merge(dir: &Path, output: &Path) -> Result<usize, PartsError> {
    let manifest = PartsManifest::read(dir)?.ok_or_else(|| PartsError::NoManifest { dir: dir.to_path_buf() })?;
    let parts: Vec<PathBuf> = (0..manifest.parts)
        .map(|chunk| part_path(dir, chunk, &manifest.format))
        .collect();
    if let Some(chunk) = parts.iter().position(|p| !p.is_file()) {
        return Err(PartsError::MissingPart {
            dir: dir.to_path_buf(),
            chunk,
            parts: manifest.parts,
        });
    }
    let read_error =
        |path: &Path, e: std::io::Error| std::io::Error::new(e.kind(), format!("reading {}: {e}", path.display()));
    durable::write_with(output, |out| {
        for (i, path) in parts.iter().enumerate() {
            let mut reader = std::io::BufReader::new(std::fs::File::open(path).map_err(|e| read_error(path, e))?);
            if i > 0 && manifest.format == "csv" {
                let mut header = Vec::new();
                reader.read_until(b'\n', &mut header).map_err(|e| read_error(path, e))?;
            }
            std::io::copy(&mut reader, out)?;
        }
        out.flush()
    })?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(parts.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(parts: usize) -> PartsManifest {
        PartsManifest {
            input_sha256: "in".into(),
            model_sha256: "model".into(),
            seed: 5,
            max_seq_len: 64,
            options: serde_json::json!({"mlm_prob": 0.3}),
            format: "csv".into(),
            chunk_rows: 512,
            parts,
        }
    }

    #[test]
    fn parts_merge_in_order_with_one_header_and_temporary_files_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("out.csv");
        let parts = parts_dir(&output);
        std::fs::create_dir_all(&parts).unwrap();
        manifest(2).write(&parts).unwrap();
        std::fs::write(part_path(&parts, 1, "csv"), "text\nb\n").unwrap();
        std::fs::write(part_path(&parts, 0, "csv"), "text\na\n").unwrap();
        // A crashed writer's temporary file, under the old and the current naming.
        std::fs::write(parts.join("part-000002.tmp-77"), "text\nhalf").unwrap();
        std::fs::write(durable::temp_path(&part_path(&parts, 2, "csv")), "text\nhalf").unwrap();
        assert!(!is_part_name("part-000002.tmp-77") && !is_part_name(".part-000002.csv.tmp-7"));
        assert!(is_part_name("part-000002.csv"));
        assert_eq!(merge(&parts, &output).unwrap(), 2);
        assert_eq!(std::fs::read_to_string(&output).unwrap(), "text\na\nb\n");
        assert!(!parts.exists());
    }

    #[test]
    fn a_missing_part_or_manifest_is_a_named_error_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("out.csv");
        let parts = parts_dir(&output);
        std::fs::create_dir_all(&parts).unwrap();
        std::fs::write(part_path(&parts, 0, "csv"), "text\na\n").unwrap();
        let err = merge(&parts, &output).unwrap_err();
        assert!(matches!(err, PartsError::NoManifest { .. }), "{err}");
        // The last part missing: contiguous numbering alone would not notice.
        manifest(2).write(&parts).unwrap();
        let err = merge(&parts, &output).unwrap_err();
        assert!(
            matches!(err, PartsError::MissingPart { chunk: 1, parts: 2, .. }),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!("part 1 of 2 of the augmentation is missing in {}", parts.display())
        );
        assert!(!output.exists());
        assert!(part_path(&parts, 0, "csv").is_file(), "the parts stay for a resume");
    }

    #[test]
    fn manifests_round_trip_and_name_their_differences() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(PartsManifest::read(dir.path()).unwrap(), None);
        let m = manifest(3);
        m.write(dir.path()).unwrap();
        assert_eq!(PartsManifest::read(dir.path()).unwrap(), Some(m.clone()));
        let other = PartsManifest {
            seed: 6,
            model_sha256: "other".into(),
            ..m.clone()
        };
        assert_eq!(m.differences(&other), vec!["model", "seed"]);
        std::fs::write(dir.path().join(MANIFEST), "{").unwrap();
        let err = PartsManifest::read(dir.path()).unwrap_err().to_string();
        assert!(
            err.starts_with(&dir.path().join(MANIFEST).display().to_string()),
            "{err}"
        );
    }
}
