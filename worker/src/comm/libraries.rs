//! The CUDA runtime and NCCL that cudarc binds, checked against the ones libtorch loaded.
//! cudarc opens libraries by name (`libnccl.so`, `libcudart.so`, …, never `libnccl.so.2`), so
//! `scripts/build.sh` links the files libtorch uses into `kormlm-libs/` beside the binaries, the
//! worker's first runpath. A CUDA job checks this before anything else and fails saying where it
//! looked; two different copies of a library in the process (a system toolkit's `libcudart.so`
//! found first) fail the same way.

use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The directory beside the binaries that holds the links.
pub const LINK_DIR: &str = "kormlm-libs";

/// What the process has mapped once cudarc has bound NCCL and the CUDA runtime.
#[derive(Debug, Clone, Serialize)]
pub struct CudaLibraries {
    pub nccl: PathBuf,
    pub cudart: PathBuf,
}

/// `kormlm-libs/` beside the running binary.
pub fn link_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(LINK_DIR)))
        .unwrap_or_else(|| PathBuf::from(LINK_DIR))
}

/// The distinct files mapped into this process whose names start with `stem` followed by `.`
/// or `-` (`libnccl.so.2`, `libcudart-1a2b.so.13`).
fn mapped(stem: &str) -> Vec<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut found: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        let path = line.split_whitespace().skip(5).collect::<Vec<_>>().join(" ");
        let path = Path::new(&path);
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let matches = name
            .strip_prefix(stem)
            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('-'));
        if path.is_absolute() && matches && !found.iter().any(|p| p == path) {
            found.push(path.to_path_buf());
        }
    }
    found
}

fn list(paths: &[PathBuf]) -> String {
    match paths {
        [] => "none".to_string(),
        _ => paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Why cudarc cannot bind `what` (`nccl` or `cudart`): the names it tried and where.
fn not_found(what: &str, stem: &str, libtorch_uses: &[PathBuf]) -> String {
    let dir = link_dir();
    let mut names = cudarc::get_lib_name_candidates(what);
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    let hint = match libtorch_uses.first() {
        Some(path) => format!(
            "; libtorch uses {}: run scripts/build.sh, or `ln -s {} {}/{stem}`",
            path.display(),
            path.display(),
            dir.display()
        ),
        None => "; libtorch loaded none (a CPU-only libtorch?)".to_string(),
    };
    format!(
        "{stem} cannot be loaded: looked for {} in {} (scripts/build.sh links it there), LD_LIBRARY_PATH={} and the \
         system loader cache{hint}",
        names.join(", "),
        dir.display(),
        std::env::var("LD_LIBRARY_PATH").unwrap_or_else(|_| "(unset)".to_string())
    )
}

fn bind() -> Result<CudaLibraries, String> {
    let torch_nccl = mapped("libnccl");
    let torch_cudart = mapped("libcudart");
    // SAFETY: is_culib_present only tries to dlopen the candidate names; culib then keeps the
    // first that opens (present, so it does not panic).
    unsafe {
        if !cudarc::nccl::sys::is_culib_present() {
            return Err(not_found("nccl", "libnccl.so", &torch_nccl));
        }
        cudarc::nccl::sys::culib();
        if !cudarc::runtime::sys::is_culib_present() {
            return Err(not_found("cudart", "libcudart.so", &torch_cudart));
        }
        cudarc::runtime::sys::culib();
    }
    let one = |stem: &str, torch: &[PathBuf]| -> Result<PathBuf, String> {
        let all = mapped(stem);
        match all.as_slice() {
            [single] => Ok(single.clone()),
            _ => Err(format!(
                "{} different {stem} libraries are loaded ({}); libtorch uses {}: cudarc must bind that one. Remove \
                 the other from LD_LIBRARY_PATH, or run scripts/build.sh, which links it into {}",
                all.len(),
                list(&all),
                list(torch),
                link_dir().display()
            )),
        }
    };
    Ok(CudaLibraries {
        nccl: one("libnccl", &torch_nccl)?,
        cudart: one("libcudart", &torch_cudart)?,
    })
}

/// Binds NCCL and the CUDA runtime through cudarc (once per process) and checks that each is
/// the one copy in the process.
pub fn check() -> Result<CudaLibraries, String> {
    static BOUND: OnceLock<Result<CudaLibraries, String>> = OnceLock::new();
    BOUND.get_or_init(bind).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_files_are_found_by_stem() {
        // The test binary itself links libc.
        let libc = mapped("libc");
        assert!(libc.iter().any(|p| p.to_string_lossy().contains("libc.so")), "{libc:?}");
        assert!(mapped("libkormlm-none").is_empty());
    }
}
