//! CUDA autocast in bfloat16: a thin FFI to `csrc/autocast.cpp`, since tch's `autocast` only
//! runs libtorch's default autocast dtype (float16).

extern "C" {
    fn kormlm_autocast_cuda_bf16(enable: i32);
}

/// Makes CUDA autocast regions (`tch::autocast(true, …)`) compute in bfloat16 (`true`) or in
/// float16 (`false`, libtorch's default).
pub fn set_cuda_autocast_bf16(enable: bool) {
    // SAFETY: the shim calls at::autocast::set_autocast_dtype with constant arguments; no
    // pointers or ownership cross the boundary.
    unsafe { kormlm_autocast_cuda_bf16(i32::from(enable)) }
}
