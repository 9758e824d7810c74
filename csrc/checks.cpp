// Argument checks shared by the op files (declared in ops.h, namespace internal). The Python layer
// has validated its calls already; these guard direct calls of torch.ops.gmem.*.
#include "ops.h"

namespace gmem {
namespace internal {

at::Tensor empty_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), ", expected ",
              like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", expected ", like.device());
}

// gamma/beta [*style] (one task) or [T, *style].
StyleInfo check_styles(const char* op, const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& like,
                       at::IntArrayRef style) {
  check_same(op, "gamma", gamma, like);
  check_same(op, "beta", beta, like);
  const int64_t k = static_cast<int64_t>(style.size());
  const bool stacked = gamma.dim() == k + 1;
  TORCH_CHECK((gamma.dim() == k || stacked) && gamma.sizes().slice(gamma.dim() - k) == style, op,
              ": gamma must be ", style, " or [T, ", style, "], got ", gamma.sizes());
  TORCH_CHECK(beta.sizes() == gamma.sizes(), op, ": beta must have the shape of gamma ", gamma.sizes(), ", got ",
              beta.sizes());
  return {stacked ? gamma.size(0) : 1, stacked};
}

// Contiguous int64 task ids [N], or an undefined tensor for a single-task call.
at::Tensor check_task_ids(const char* op, const std::optional<at::Tensor>& task_ids, bool stacked, int64_t n,
                          const at::Tensor& like) {
  if (!stacked) {
    TORCH_CHECK(!task_ids.has_value(), op, ": task_ids given but gamma is a single style set");
    return at::Tensor();
  }
  TORCH_CHECK(task_ids.has_value(), op, ": gamma is stacked [T, ...]: task_ids [N] is required");
  const at::Tensor& ids = *task_ids;
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": task_ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == n, op, ": task_ids must be [", n, "], got ", ids.sizes());
  TORCH_CHECK(ids.device() == like.device(), op, ": task_ids is on ", ids.device(), ", expected ", like.device());
  return ids.contiguous();
}

// Bias as a contiguous [T, O] table (T = 1 for one task), or undefined.
at::Tensor check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t num_tasks, bool stacked,
                      int64_t out_features, const at::Tensor& like) {
  if (!bias.has_value()) return at::Tensor();
  const at::Tensor& b = *bias;
  check_same(op, "bias", b, like);
  if (stacked) {
    TORCH_CHECK(b.dim() == 2 && b.size(0) == num_tasks && b.size(1) == out_features, op, ": bias must be [",
                num_tasks, ", ", out_features, "] for stacked styles, got ", b.sizes());
  } else {
    TORCH_CHECK(b.dim() == 1 && b.size(0) == out_features, op, ": bias must be [", out_features, "], got ",
                b.sizes());
  }
  return b.reshape({num_tasks, out_features}).contiguous();  // an expanded [T, O] view gets materialised
}

}  // namespace internal
}  // namespace gmem
