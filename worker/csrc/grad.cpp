// Setting a parameter's gradient tensor (tch has no setter): the flat optimizer buffer's views
// become the gradients before the first backward, so libtorch accumulates into them in place
// and never allocates a second set of gradients.
#include <torch/torch.h>

extern "C" int kormlm_set_grad(torch::Tensor* var, const torch::Tensor* grad) {
  try {
    var->mutable_grad() = *grad;
    return 0;
  } catch (...) {
    return -1;
  }
}
