//! Augmentation in fixed chunks of input rows, the unit of distribution and of resumption:
//! chunk c always covers rows [c·CHUNK_ROWS, (c+1)·CHUNK_ROWS) and uses those global row indices
//! for its seeds, so any split across workers produces the single-process output. Each finished
//! chunk is written as its own part file (durably). The parts directory's manifest
//! ([`PartsManifest`]: input and model hashes, seed, window, options, part count) decides
//! whether the parts already there can be reused: a resumed job with the same manifest skips
//! them, any other augmentation discards them first (with a warning).

use super::io::{write_output, OutputFormat, Table};
use super::{AugmentError, AugmentOptions, AugmentSummary, Augmenter};
use kormlm_proto::augment_args::AugmentArgs;
pub use kormlm_proto::augment_parts::PartsManifest;
use kormlm_proto::augment_parts::{is_part_name, MANIFEST};
use kormlm_proto::durable::is_temp_name;
use sha2::{Digest, Sha256};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const CHUNK_ROWS: usize = 512;

pub fn chunk_count(rows: usize) -> usize {
    rows.div_ceil(CHUNK_ROWS)
}

/// The chunks rank `rank` of `world` processes.
pub fn rank_chunks(rows: usize, rank: usize, world: usize) -> Range<usize> {
    let chunks = chunk_count(rows);
    rank * chunks / world..(rank + 1) * chunks / world
}

pub use kormlm_proto::augment_parts::parts_dir;

pub fn part_path(dir: &Path, chunk: usize, format: OutputFormat) -> PathBuf {
    kormlm_proto::augment_parts::part_path(dir, chunk, extension(format))
}

fn extension(format: OutputFormat) -> &'static str {
    match format {
        OutputFormat::Csv => "csv",
        OutputFormat::Jsonl => "jsonl",
    }
}

/// Where and how parts are written.
pub struct PartsOutput<'a> {
    pub dir: &'a Path,
    pub format: OutputFormat,
    pub num_augmentations: usize,
    /// What the parts are made from (see [`manifest`]).
    pub manifest: &'a PartsManifest,
}

/// The manifest of an augmentation of `args.input` (`rows` rows) by `model` (a directory or hub
/// id at `revision`) with `options`, written as `format`.
pub fn manifest(
    model: &str,
    revision: Option<&str>,
    args: &AugmentArgs,
    options: &AugmentOptions,
    format: OutputFormat,
    rows: usize,
) -> Result<PartsManifest, AugmentError> {
    let input = args.input.clone().ok_or(AugmentError::MissingFlag {
        flag: "--input",
        purpose: "the file to augment",
    })?;
    let model_dir = crate::model::hub::resolve(model, revision)?;
    Ok(PartsManifest {
        input_sha256: sha256_of(&[input])?,
        model_sha256: sha256_of(&model_files(&model_dir)?)?,
        seed: options.seed,
        max_seq_len: options.max_seq_len,
        options: serde_json::json!({
            "format": args.format,
            "column": args.column,
            "num_augmentations": options.num_augmentations,
            "mlm_prob": options.mlm_prob,
            "k": options.k,
            "threshold": options.threshold,
            "dtype": options.precision.name(),
            "batch_size": options.batch_size,
            "require_change_retries": options.require_change_retries,
        }),
        format: extension(format).to_string(),
        chunk_rows: CHUNK_ROWS,
        parts: chunk_count(rows),
    })
}

/// The files that decide a model's predictions: its weights, config and tokenizer files.
fn model_files(dir: &Path) -> Result<Vec<PathBuf>, AugmentError> {
    let mut files = match crate::model::weights::WeightFiles::find(dir)? {
        crate::model::weights::WeightFiles::Safetensors(p) | crate::model::weights::WeightFiles::PytorchBin(p) => {
            vec![p]
        }
        crate::model::weights::WeightFiles::Sharded { index, shards } => std::iter::once(index).chain(shards).collect(),
    };
    let listing = std::fs::read_dir(dir).map_err(|error| AugmentError::Output {
        path: dir.to_path_buf(),
        error,
    })?;
    let mut small: Vec<PathBuf> = listing
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "json" || e == "txt"))
        .filter(|p| !files.contains(p))
        .collect();
    small.sort();
    files.extend(small);
    Ok(files)
}

/// SHA-256 over the files' contents, in order, as hex.
fn sha256_of(files: &[PathBuf]) -> Result<String, AugmentError> {
    let mut hasher = Sha256::new();
    for path in files {
        let mut file = std::fs::File::open(path).map_err(|error| AugmentError::Output {
            path: path.clone(),
            error,
        })?;
        std::io::copy(&mut file, &mut hasher).map_err(|error| AugmentError::Output {
            path: path.clone(),
            error,
        })?;
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// How long a rank waits for another one checking the parts directory.
const LOCK_TIMEOUT: Duration = Duration::from_secs(120);

/// Makes `dir` hold only parts made under `manifest`: under a lock shared by the ranks, parts
/// of any other manifest (or of none) are removed, then the manifest is written. The parts
/// left are the ones a resumed job reuses.
pub fn prepare_dir(dir: &Path, manifest: &PartsManifest) -> Result<(), AugmentError> {
    let output_error = |path: &Path, error| AugmentError::Output {
        path: path.to_path_buf(),
        error,
    };
    std::fs::create_dir_all(dir).map_err(|e| output_error(dir, e))?;
    let lock_path = dir.join(".lock");
    let lock = std::fs::File::create(&lock_path).map_err(|e| output_error(&lock_path, e))?;
    let deadline = Instant::now() + LOCK_TIMEOUT;
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(output_error(
                    &lock_path,
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("another worker held the lock for {LOCK_TIMEOUT:?}"),
                    ),
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(output_error(&lock_path, e)),
        }
    }
    let found = PartsManifest::read(dir)?;
    if found.as_ref() == Some(manifest) {
        return Ok(());
    }
    // Stale parts go before the new manifest is written, so no crash leaves them under it.
    let stale: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| output_error(dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            is_part_name(&name) || is_temp_name(&name)
        })
        .map(|e| e.path())
        .collect();
    let parts = stale
        .iter()
        .filter(|p| p.file_name().is_some_and(|n| is_part_name(&n.to_string_lossy())))
        .count();
    if parts > 0 {
        let changed = match &found {
            Some(old) => format!("its {} differ", old.differences(manifest).join(", ")),
            None => format!("they have no {MANIFEST}"),
        };
        tracing::warn!(dir = %dir.display(), parts, "discarding the parts of another augmentation: {changed}");
    }
    let manifest_path = dir.join(MANIFEST);
    if found.is_some() {
        std::fs::remove_file(&manifest_path).map_err(|e| output_error(&manifest_path, e))?;
    }
    for path in stale {
        std::fs::remove_file(&path).map_err(|e| output_error(&path, e))?;
    }
    manifest.write(dir)?;
    Ok(())
}

/// Augments `chunks` of `table`, one part file each, after [`prepare_dir`]; returns the totals
/// of the chunks done now and how many were already there (under the same manifest). Stops
/// between chunks when `should_stop` says so.
pub fn run_parts(
    augmenter: &Augmenter<'_>,
    table: &Table,
    chunks: Range<usize>,
    out: &PartsOutput<'_>,
    should_stop: &dyn Fn() -> bool,
    on_chunk: &mut dyn FnMut(usize),
) -> Result<(AugmentSummary, usize), AugmentError> {
    let PartsOutput {
        dir,
        format,
        num_augmentations,
        manifest,
    } = *out;
    prepare_dir(dir, manifest)?;
    let texts = table.texts();
    let mut summary = AugmentSummary::default();
    let mut reused = 0;
    for chunk in chunks {
        if should_stop() {
            break;
        }
        let path = part_path(dir, chunk, format);
        if path.is_file() {
            reused += 1;
            on_chunk(chunk);
            continue;
        }
        let rows = chunk * CHUNK_ROWS..((chunk + 1) * CHUNK_ROWS).min(texts.len());
        let results = augmenter.augment(&texts[rows.clone()], rows.start as u64)?;
        let mut variants = Vec::with_capacity(results.len());
        for (text, result) in texts[rows.clone()].iter().zip(results) {
            summary.add(text, &result);
            variants.push(result.variants);
        }
        let part = Table {
            headers: table.headers.clone(),
            rows: table.rows[rows].to_vec(),
            text_column: table.text_column,
        };
        write_output(&path, format, &part, &variants, num_augmentations).map_err(|error| AugmentError::Output {
            path: path.clone(),
            error,
        })?;
        on_chunk(chunk);
    }
    Ok((summary, reused))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(seed: u64) -> PartsManifest {
        PartsManifest {
            input_sha256: "in".into(),
            model_sha256: "model".into(),
            seed,
            max_seq_len: 64,
            options: serde_json::json!({}),
            format: "csv".into(),
            chunk_rows: CHUNK_ROWS,
            parts: 3,
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn parts_are_kept_under_the_same_manifest_and_discarded_under_another() {
        let dir = tempfile::tempdir().unwrap();
        let parts = dir.path().join(".out.csv.parts");
        prepare_dir(&parts, &manifest(1)).unwrap();
        assert_eq!(PartsManifest::read(&parts).unwrap(), Some(manifest(1)));
        std::fs::write(part_path(&parts, 0, OutputFormat::Csv), "text\na\n").unwrap();
        let temp = kormlm_proto::durable::temp_path(&part_path(&parts, 1, OutputFormat::Csv));
        std::fs::write(&temp, "text\nhal").unwrap();
        // A resumed job (another rank, the same manifest) keeps everything.
        prepare_dir(&parts, &manifest(1)).unwrap();
        assert!(part_path(&parts, 0, OutputFormat::Csv).is_file() && temp.is_file());
        // Another seed: the old part and the leftover temporary file go.
        prepare_dir(&parts, &manifest(2)).unwrap();
        assert_eq!(names(&parts), vec![".lock", MANIFEST]);
        assert_eq!(PartsManifest::read(&parts).unwrap(), Some(manifest(2)));
        // Parts without a manifest (an older worker's) are not trusted either.
        std::fs::remove_file(parts.join(MANIFEST)).unwrap();
        std::fs::write(part_path(&parts, 2, OutputFormat::Csv), "text\nc\n").unwrap();
        prepare_dir(&parts, &manifest(2)).unwrap();
        assert_eq!(names(&parts), vec![".lock", MANIFEST]);
    }

    #[test]
    fn the_model_hash_covers_weights_config_and_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path();
        std::fs::write(model.join("model.safetensors"), "weights").unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        std::fs::write(model.join("vocab.txt"), "[PAD]").unwrap();
        std::fs::write(model.join("README.md"), "notes").unwrap();
        let files = model_files(model).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, vec!["model.safetensors", "config.json", "vocab.txt"]);
        let before = sha256_of(&files).unwrap();
        std::fs::write(model.join("vocab.txt"), "[UNK]").unwrap();
        assert_ne!(sha256_of(&files).unwrap(), before);
        // SHA-256 of the empty input, as `sha256sum` prints it.
        std::fs::write(model.join("empty"), "").unwrap();
        assert_eq!(
            sha256_of(&[model.join("empty")]).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn chunks_cover_every_row_once_for_any_world() {
        for rows in [0, 1, 511, 512, 513, 5000] {
            for world in 1..=4 {
                let mut all = Vec::new();
                for rank in 0..world {
                    all.extend(rank_chunks(rows, rank, world));
                }
                assert_eq!(
                    all,
                    (0..chunk_count(rows)).collect::<Vec<_>>(),
                    "rows {rows} world {world}"
                );
            }
        }
    }
}
