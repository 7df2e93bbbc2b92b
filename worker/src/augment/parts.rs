//! Augmentation in fixed chunks of input rows, the unit of distribution and of resumption:
//! chunk c always covers rows [c·CHUNK_ROWS, (c+1)·CHUNK_ROWS) and uses those global row indices
//! for its seeds, so any split across workers produces the single-process output. Each finished
//! chunk is written as its own part file (atomically); a resumed job skips parts that exist.

use super::io::{write_output, OutputFormat, Table};
use super::{AugmentError, AugmentSummary, Augmenter};
use std::ops::Range;
use std::path::{Path, PathBuf};

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
    let ext = match format {
        OutputFormat::Csv => "csv",
        OutputFormat::Jsonl => "jsonl",
    };
    kormlm_proto::augment_parts::part_path(dir, chunk, ext)
}

/// Where and how parts are written.
pub struct PartsOutput<'a> {
    pub dir: &'a Path,
    pub format: OutputFormat,
    pub num_augmentations: usize,
}

/// Augments `chunks` of `table`, one part file each; returns the totals of the chunks done now
/// and how many were already there. Stops between chunks when `should_stop` says so.
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
    } = *out;
    std::fs::create_dir_all(dir).map_err(|error| AugmentError::Output {
        path: dir.to_path_buf(),
        error,
    })?;
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
