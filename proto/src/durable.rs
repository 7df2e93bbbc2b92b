//! Files that are either complete or absent: written under a hidden temporary name in the same
//! directory (`.NAME.tmp-PID`, never taken for a part, a checkpoint or the file itself), flushed
//! to disk, renamed into place, and the directory flushed, so a crash or a full disk never
//! leaves a half-written file under the real name (and `remove_if_present` removes an output,
//! file or tree, whatever it is). On failure the temporary file is removed and
//! the error names the file and the OS error.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Writing `path` failed: the OS error, e.g. `File too large (os error 27)` or `No space left on
/// device (os error 28)`.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}: {error}", path.display())]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub error: std::io::Error,
}

/// The hidden temporary name `path` is written under.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Whether `name` is a temporary name of [`temp_path`] (a leftover of a crash).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp")
}

/// The directory `path` is in (`.` for a bare name).
fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Flushes a directory's entries (a rename into it, a new file) to disk.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Renames `from` to `to` and flushes the directory, so the rename survives a crash.
pub fn rename(from: &Path, to: &Path) -> Result<(), WriteError> {
    let failed = |error| WriteError {
        path: to.to_path_buf(),
        error,
    };
    std::fs::rename(from, to).map_err(failed)?;
    sync_dir(parent(to)).map_err(failed)
}

/// Writes `path` through `write` (given a buffered writer) under a temporary name, then
/// flushes and renames it into place.
pub fn write_with(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<(), WriteError> {
    write_by_path(path, |tmp| {
        let mut out = BufWriter::new(File::create(tmp)?);
        write(&mut out)?;
        out.flush()
    })
}

/// Like [`write_with`] for writers that create the file themselves from a path (a library's
/// `serialize_to_file`): `write` creates the temporary path it is given, which is then flushed
/// to disk and renamed into place.
pub fn write_by_path(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<(), WriteError> {
    let tmp = temp_path(path);
    let result = write(&tmp).and_then(|()| File::open(&tmp)?.sync_all());
    if let Err(error) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(WriteError {
            path: path.to_path_buf(),
            error,
        });
    }
    rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Writes `bytes` to `path` durably (see [`write_with`]).
pub fn write(path: &Path, bytes: impl AsRef<[u8]>) -> Result<(), WriteError> {
    write_with(path, |out| out.write_all(bytes.as_ref()))
}

/// Removes the file or directory tree at `path` (a symbolic link itself, not what it points to);
/// an absent path is not an error.
pub fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_trees_and_absent_paths_are_removed_alike() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::fs::write(tree.join("a/b/f"), "x").unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        for path in [&tree, &file, &dir.path().join("absent")] {
            remove_if_present(path).unwrap();
            assert!(!path.exists(), "{}", path.display());
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_file_is_replaced_whole_and_no_temporary_file_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write(&path, "one").unwrap();
        write(&path, "two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
        assert!(is_temp_name(&temp_path(&path).file_name().unwrap().to_string_lossy()));
        assert!(!is_temp_name("state.json"));
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_removes_the_temporary_one_and_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write(&path, "complete").unwrap();
        let err = write_with(&path, |out| {
            out.write_all(b"half")?;
            Err(std::io::Error::from_raw_os_error(27))
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot write {}: File too large (os error 27)", path.display())
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "complete");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let err = write(&dir.path().join("no/such/dir/f"), "x").unwrap_err();
        assert!(
            err.to_string().contains("no/such/dir/f: No such file or directory"),
            "{err}"
        );
    }
}
