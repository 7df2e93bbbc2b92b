// The libtorch calls tch does not expose for mixed precision: autocast on a chosen device type
// with a chosen dtype (tch's `autocast` only enables CUDA autocast in its default float16), and
// the CPU capabilities that say whether bfloat16 runs in hardware (AVX-512 BF16, AMX).
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/cpu/Utils.h>

#include <string>

namespace {
at::DeviceType device_type(int cuda) { return cuda ? at::kCUDA : at::kCPU; }
}  // namespace

// Enters an autocast region on the CPU (cuda == 0) or CUDA computing in bfloat16 (bf16 != 0)
// or float16. Writes the previous enabled flag and dtype for kormlm_autocast_exit. Returns 0,
// or -1 when libtorch threw.
extern "C" int kormlm_autocast_enter(int cuda, int bf16, int* prev_enabled, int* prev_dtype) {
  try {
    auto type = device_type(cuda);
    *prev_enabled = at::autocast::is_autocast_enabled(type) ? 1 : 0;
    *prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(type));
    at::autocast::set_autocast_enabled(type, true);
    at::autocast::set_autocast_dtype(type, bf16 ? at::kBFloat16 : at::kHalf);
    at::autocast::increment_nesting();
    return 0;
  } catch (...) {
    return -1;
  }
}

// Leaves the region entered by kormlm_autocast_enter, restoring the previous state; the cast
// cache is cleared when the outermost region ends (as torch.autocast's __exit__ does).
extern "C" int kormlm_autocast_exit(int cuda, int prev_enabled, int prev_dtype) {
  try {
    auto type = device_type(cuda);
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(type, prev_enabled != 0);
    at::autocast::set_autocast_dtype(type, static_cast<at::ScalarType>(prev_dtype));
    return 0;
  } catch (...) {
    return -1;
  }
}

// 1 when libtorch's cpuinfo reports the CPU capability `name` (e.g. "avx512_bf16",
// "amx_bf16"), 0 when it does not, -1 when it is unknown.
extern "C" int kormlm_cpu_capability(const char* name) {
  try {
    auto caps = at::cpu::get_cpu_capabilities();
    auto it = caps.find(std::string(name));
    if (it == caps.end() || !it->second.isBool()) {
      return -1;
    }
    return it->second.toBool() ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// TF32 for fp32 matmuls (cuBLAS) and convolutions (cuDNN) on CUDA, set as the Hugging Face
// Trainer's tf32 does on torch >= 2.9 (`torch.backends.cuda.matmul.fp32_precision` and
// `torch.backends.cudnn.conv.fp32_precision` = "tf32" or "ieee"). Returns 0, or -1 when
// libtorch threw.
extern "C" int kormlm_set_cuda_tf32(int enabled) {
  try {
    auto precision = enabled ? at::Float32Precision::TF32 : at::Float32Precision::IEEE;
    at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, precision);
    at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::CONV, precision);
    return 0;
  } catch (...) {
    return -1;
  }
}

// 1 when fp32 matmuls on CUDA may use TF32 (cuBLAS), 0 when not, -1 when libtorch threw.
extern "C" int kormlm_cuda_matmul_tf32() {
  try {
    // The new API only: libtorch refuses to answer the legacy allowTF32CuBLAS() once the
    // precision was set through the new one.
    auto precision = at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL);
    return precision == at::Float32Precision::TF32 ? 1 : 0;
  } catch (...) {
    return -1;
  }
}
