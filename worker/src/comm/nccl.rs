//! Thin FFI layer over NCCL through cudarc's dynamically loaded bindings.

/// The NCCL version as NCCL encodes it (2.28.9 → 22809), or `None` when `libnccl.so` cannot be
/// loaded (no CUDA wheel, or `scripts/build.sh` did not link it).
pub fn version() -> Option<i32> {
    // SAFETY: is_culib_present only tries to dlopen the library and never panics.
    let present = unsafe { cudarc::nccl::sys::is_culib_present() };
    if !present {
        return None;
    }
    cudarc::nccl::result::get_nccl_version().ok()
}
