//! Link settings for libtorch that tch's own build script cannot pass on (tch-rs#980):
//! * an rpath to the libtorch directory, so `worker` runs without LD_LIBRARY_PATH;
//! * `libtorch_cuda` linked with `--no-as-needed`, so CUDA is detected when present even though
//!   no symbol of it is referenced directly;
//! * a first runpath `$ORIGIN/kormlm-libs`, where `scripts/build.sh` links `libnccl.so` and
//!   `libcudart.so` to the files libtorch loads (cudarc opens them by those names; see
//!   `comm::libraries`).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        // doc-only builds of torch-sys export no library directory.
        return;
    };
    let lib_dir = PathBuf::from(lib_dir);
    compile_shims(&lib_dir);
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/kormlm-libs");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib_dir.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// Compiles the libtorch calls tch does not expose (`csrc/autocast.cpp`: CPU/CUDA autocast and
/// CPU capabilities; `csrc/rng.cpp`: the random generators' states; `csrc/grad.cpp`: setting a
/// parameter's gradient) against the same headers tch uses.
fn compile_shims(lib_dir: &std::path::Path) {
    const SOURCES: [&str; 3] = ["csrc/autocast.cpp", "csrc/rng.cpp", "csrc/grad.cpp"];
    for source in SOURCES {
        println!("cargo:rerun-if-changed={source}");
    }
    let Some(torch_dir) = lib_dir.parent() else {
        return;
    };
    let include = torch_dir.join("include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .files(SOURCES)
        .compile("kormlm_shims");
}
