// The one libtorch call tch does not expose: choosing bfloat16 as CUDA autocast's dtype
// (tch's `autocast` always uses the default, float16).
#include <ATen/autocast_mode.h>

extern "C" void kormlm_autocast_cuda_bf16(int enable) {
  at::autocast::set_autocast_dtype(at::kCUDA, enable ? at::kBFloat16 : at::kHalf);
}
