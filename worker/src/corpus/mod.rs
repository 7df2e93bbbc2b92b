//! Training corpora: a spec lists sources; sentences are read (one reader per format),
//! optionally cleaned, exact-deduplicated and split into train/dev by a stable hash unless dev
//! sources are given.

pub mod normalize;
pub mod readers;

pub use readers::Format;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("{path} line {line}: {message}")]
    Row { path: String, line: usize, message: String },
    #[error("{path}: no column `{column}` (columns: {})", found.join(", "))]
    Column {
        path: String,
        column: String,
        found: Vec<String>,
    },
    #[error("{path}: invalid corpus spec: {message}")]
    Spec { path: String, message: String },
    #[error("--data_path {path}: {message}")]
    DataPath { path: String, message: String },
}

/// One input file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub path: PathBuf,
    /// Inferred from the file name when absent.
    #[serde(default)]
    pub format: Option<Format>,
    /// Text column of delimited formats (default `comments`, or `문장` for UnSmile).
    #[serde(default)]
    pub column: Option<String>,
}

fn default_dev_ratio() -> f64 {
    0.05
}

fn default_true() -> bool {
    true
}

/// What to train on (`--data_path corpus.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusSpec {
    pub train: Vec<Source>,
    /// Explicit dev sources; when empty, dev is split off train by hash.
    #[serde(default)]
    pub dev: Vec<Source>,
    #[serde(default = "default_dev_ratio")]
    pub dev_ratio: f64,
    /// Apply the KcELECTRA cleaning recipe.
    #[serde(default)]
    pub normalize: bool,
    #[serde(default = "default_true")]
    pub dedup: bool,
}

/// Counts for the user, per source and overall.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CorpusReport {
    pub sources: Vec<SourceReport>,
    pub duplicates_removed: usize,
    pub emptied_by_normalization: usize,
    pub train_sentences: usize,
    pub dev_sentences: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceReport {
    pub path: String,
    pub format: Format,
    pub rows: usize,
    pub empty: usize,
    pub nan: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Corpus {
    pub train: Vec<String>,
    pub dev: Vec<String>,
    pub report: CorpusReport,
}

/// FNV-1a, 64 bit: a hash that never changes between runs, machines or Rust versions.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Puts a sentence in dev when its hash falls in the first `ratio` of the hash space.
pub fn is_dev(sentence: &str, ratio: f64) -> bool {
    (stable_hash(sentence.as_bytes()) % 1_000_000) < (ratio.clamp(0.0, 1.0) * 1_000_000.0) as u64
}

impl CorpusSpec {
    /// Interprets `--data_path`: a corpus spec (`.json`), a directory with the original
    /// project's `mlm_train.csv` / `mlm_dev.csv`, a directory laid out like the shared corpora,
    /// or a single file of any known format.
    pub fn from_data_path(data_path: &str) -> Result<Self, CorpusError> {
        let path = Path::new(data_path);
        let fail = |message: String| CorpusError::DataPath {
            path: data_path.to_string(),
            message,
        };
        let source = |p: PathBuf| Source {
            path: p,
            format: None,
            column: None,
        };
        if path.is_file() && path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
            let mut spec: CorpusSpec = serde_json::from_str(&text).map_err(|e| CorpusError::Spec {
                path: data_path.to_string(),
                message: format!("line {}, column {}: {e}", e.line(), e.column()),
            })?;
            let base = path.parent().unwrap_or(Path::new("."));
            for s in spec.train.iter_mut().chain(spec.dev.iter_mut()) {
                if s.path.is_relative() {
                    s.path = base.join(&s.path);
                }
            }
            if spec.train.is_empty() {
                return Err(CorpusError::Spec {
                    path: data_path.to_string(),
                    message: "`train` lists no source".into(),
                });
            }
            return Ok(spec);
        }
        if path.is_file() {
            return Ok(CorpusSpec {
                train: vec![source(path.to_path_buf())],
                dev: vec![],
                dev_ratio: default_dev_ratio(),
                normalize: false,
                dedup: true,
            });
        }
        if path.join("mlm_train.csv").is_file() {
            let dev = path.join("mlm_dev.csv");
            return Ok(CorpusSpec {
                train: vec![source(path.join("mlm_train.csv"))],
                dev: if dev.is_file() { vec![source(dev)] } else { vec![] },
                dev_ratio: default_dev_ratio(),
                normalize: false,
                dedup: true,
            });
        }
        let shared = [
            "nsmc/ratings_train.txt",
            "nsmc/ratings_test.txt",
            "korean-hate-speech/labeled/train.tsv",
            "korean-hate-speech/labeled/dev.tsv",
            "korean-hate-speech/test.no_label.tsv",
            "korean-hate-speech/unlabeled/unlabeled_comments_5.txt",
            "korean_unsmile_dataset/unsmile_train_v1.0.tsv",
            "korean_unsmile_dataset/unsmile_valid_v1.0.tsv",
        ];
        let found: Vec<PathBuf> = shared.iter().map(|r| path.join(r)).filter(|p| p.is_file()).collect();
        if path.is_dir() && !found.is_empty() {
            return Ok(CorpusSpec {
                train: found.into_iter().map(source).collect(),
                dev: vec![],
                dev_ratio: default_dev_ratio(),
                normalize: false,
                dedup: true,
            });
        }
        Err(fail(
            "not found or not understood; give a corpus spec (.json), a directory with mlm_train.csv, the shared \
             corpora directory, or a text/CSV/TSV file"
                .into(),
        ))
    }

    /// Reads every source and builds the train/dev split.
    pub fn load(&self) -> Result<Corpus, CorpusError> {
        let mut report = CorpusReport::default();
        let read_all = |sources: &[Source], report: &mut CorpusReport| -> Result<Vec<String>, CorpusError> {
            let mut texts = Vec::new();
            for s in sources {
                let format = s.format.unwrap_or_else(|| Format::infer(&s.path));
                let r = readers::read(&s.path, format, s.column.as_deref())?;
                if r.empty + r.nan > 0 {
                    tracing::info!(path = %s.path.display(), empty = r.empty, nan = r.nan, "rows without text skipped");
                }
                report.sources.push(SourceReport {
                    path: s.path.display().to_string(),
                    format,
                    rows: r.rows,
                    empty: r.empty,
                    nan: r.nan,
                });
                texts.extend(r.texts);
            }
            Ok(texts)
        };
        let train_raw = read_all(&self.train, &mut report)?;
        let dev_raw = read_all(&self.dev, &mut report)?;
        let mut seen = HashSet::new();
        let mut prepare = |texts: Vec<String>, report: &mut CorpusReport| -> Vec<String> {
            let mut out = Vec::with_capacity(texts.len());
            for t in texts {
                let t = if self.normalize { normalize::clean(&t) } else { t };
                if t.trim().is_empty() {
                    report.emptied_by_normalization += 1;
                    continue;
                }
                if self.dedup && !seen.insert(t.clone()) {
                    report.duplicates_removed += 1;
                    continue;
                }
                out.push(t);
            }
            out
        };
        let (train, dev) = if self.dev.is_empty() {
            let all = prepare(train_raw, &mut report);
            all.into_iter().partition(|t| !is_dev(t, self.dev_ratio))
        } else {
            // Dev first, so a train sentence that also occurs in dev is dropped from train.
            let dev = prepare(dev_raw, &mut report);
            (prepare(train_raw, &mut report), dev)
        };
        report.train_sentences = train.len();
        report.dev_sentences = dev.len();
        Ok(Corpus { train, dev, report })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_stable_and_near_the_ratio() {
        let sentences: Vec<String> = (0..20_000).map(|i| format!("문장 {i}")).collect();
        let dev = sentences.iter().filter(|s| is_dev(s, 0.1)).count();
        assert!((1_700..2_300).contains(&dev), "{dev}");
        assert_eq!(stable_hash(b"kormlm"), stable_hash(b"kormlm"));
        assert_eq!(stable_hash(b""), 0xcbf29ce484222325);
    }

    #[test]
    fn spec_from_files_dedups_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "하나\n둘\n하나\n\nnan\nㅋㅋㅋㅋ\n").unwrap();
        std::fs::write(dir.path().join("dev.txt"), "둘\n셋\n").unwrap();
        let spec_path = dir.path().join("corpus.json");
        std::fs::write(
            &spec_path,
            r#"{"train": [{"path": "a.txt"}], "dev": [{"path": "dev.txt", "format": "text"}], "normalize": true}"#,
        )
        .unwrap();
        let spec = CorpusSpec::from_data_path(spec_path.to_str().unwrap()).unwrap();
        let corpus = spec.load().unwrap();
        assert_eq!(corpus.dev, vec!["둘", "셋"]);
        assert_eq!(corpus.train, vec!["하나", "ㅋㅋ"]);
        assert_eq!(corpus.report.duplicates_removed, 2);
        assert_eq!((corpus.report.sources[0].empty, corpus.report.sources[0].nan), (1, 1));
        std::fs::write(&spec_path, r#"{"train": [{"path": "a.txt", "fromat": "text"}]}"#).unwrap();
        let err = CorpusSpec::from_data_path(spec_path.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `fromat`"), "{err}");
    }
}
