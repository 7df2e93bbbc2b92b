// libtorch's default random generators (CPU, and CUDA per device) read and restored as byte
// states, as torch.get_rng_state / torch.cuda.get_rng_state do; tch 0.24 exposes neither.
// Dropout draws from these generators, so a checkpoint carries them for an exact resume.
#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>

namespace {

// device_kind: 0 = CPU, 1 = CUDA (`index` is the CUDA ordinal).
at::Generator generator(int device_kind, int index) {
  if (device_kind == 0) {
    return at::globalContext().defaultGenerator(c10::Device(c10::DeviceType::CPU));
  }
  return at::globalContext().defaultGenerator(
      c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index)));
}

void copy_message(const char* what, char* err, int64_t err_cap) {
  if (err_cap <= 0) return;
  const auto n = std::min<int64_t>(static_cast<int64_t>(std::strlen(what)), err_cap - 1);
  std::memcpy(err, what, static_cast<size_t>(n));
  err[n] = '\0';
}

}  // namespace

// Copies up to `cap` bytes of the generator's state into `out`; returns the state's full size
// (call again with a larger buffer when it exceeds `cap`), or -1 with a message in `err`.
extern "C" int64_t kormlm_rng_get_state(int device_kind, int index, uint8_t* out, int64_t cap,
                                        char* err, int64_t err_cap) {
  try {
    auto gen = generator(device_kind, index);
    at::Tensor state;
    {
      // See libtorch's Note [Acquire lock when using random generators].
      std::lock_guard<std::mutex> lock(gen.mutex());
      state = gen.get_state();
    }
    state = state.contiguous();
    const int64_t size = state.numel();
    if (size <= cap) {
      std::memcpy(out, state.data_ptr(), static_cast<size_t>(size));
    }
    return size;
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_cap);
    return -1;
  }
}

// Restores a state `kormlm_rng_get_state` returned; 0, or -1 with a message in `err` (a state of
// the wrong size or kind is refused by libtorch).
extern "C" int kormlm_rng_set_state(int device_kind, int index, const uint8_t* data, int64_t len,
                                    char* err, int64_t err_cap) {
  try {
    auto state = at::empty({len}, at::TensorOptions().dtype(at::kByte).device(at::kCPU));
    std::memcpy(state.data_ptr(), data, static_cast<size_t>(len));
    auto gen = generator(device_kind, index);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(state);
    return 0;
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_cap);
    return -1;
  }
}
