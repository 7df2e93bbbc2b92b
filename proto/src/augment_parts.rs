//! The part files of an augmentation job: each worker writes one file per finished chunk of
//! input rows next to the output, and the coordinator concatenates them in order once every
//! worker is done.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

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

/// Concatenates the parts `0..` found in `dir` into `output` (a CSV header is kept once), via a
/// temporary file, then removes the parts. Fails when the parts are not numbered contiguously.
pub fn merge(dir: &Path, output: &Path) -> Result<usize, String> {
    let mut parts: Vec<(usize, PathBuf, String)> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let (stem, ext) = name.strip_prefix("part-")?.split_once('.')?;
            Some((stem.parse().ok()?, e.path(), ext.to_string()))
        })
        .collect();
    parts.sort();
    if let Some(gap) = parts.iter().enumerate().find(|(i, (n, _, _))| i != n) {
        return Err(format!(
            "part {} of the augmentation is missing in {}",
            gap.0,
            dir.display()
        ));
    }
    let err = |e: std::io::Error, p: &Path| format!("{}: {e}", p.display());
    let tmp = output.with_extension(format!("tmp-{}", std::process::id()));
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| err(e, &tmp))?);
        for (i, (_, path, ext)) in parts.iter().enumerate() {
            let mut reader = std::io::BufReader::new(std::fs::File::open(path).map_err(|e| err(e, path))?);
            if i > 0 && ext == "csv" {
                let mut header = Vec::new();
                reader.read_until(b'\n', &mut header).map_err(|e| err(e, path))?;
            }
            std::io::copy(&mut reader, &mut out).map_err(|e| err(e, path))?;
        }
        out.flush().map_err(|e| err(e, &tmp))?;
        out.get_ref().sync_all().map_err(|e| err(e, &tmp))?;
    }
    std::fs::rename(&tmp, output).map_err(|e| err(e, output))?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(parts.len())
}
