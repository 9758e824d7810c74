// Autograd of gmem_ext::madafm_weight in C++, for every device (the Autograd alias key).
//
// Why here and not in Python: the weight build is a few microseconds of memory traffic, and a
// Python autograd node (torch.autograd.Function) adds ~10 us per forward+backward, which is most of
// the call at GP-GAN layer sizes. gmem/ops/library.py calls this op directly in eager mode for the
// backends that declare it (CppBackend.native_autograd); under torch.compile the public custom op
// gmem::madafm_weight is used as for every other backend.
//
// The backward follows the same rule as the Python layer: first-order gradients come from the fused
// reduction kernel; when autograd records the backward itself (create_graph, e.g. an R1 penalty) it
// uses differentiable ATen formulas instead, so double backward works.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace gmem_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class MadafmWeightFunction : public torch::autograd::Function<MadafmWeightFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight_norm, const at::Tensor& gamma,
                            const at::Tensor& beta) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("gmem_ext::madafm_weight", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
    ctx->save_for_backward({weight_norm});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(weight_norm, gamma, beta);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor weight_norm = ctx->get_saved_variables()[0];
    const at::Tensor grad = grads[0];
    if (at::GradMode::is_enabled()) {  // double backward: differentiable window sums
      return {at::Tensor(), (grad * weight_norm).sum({-2, -1}), grad.sum({-2, -1})};
    }
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("gmem_ext::madafm_weight_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>();
    auto [dgamma, dbeta] = op.call(grad.contiguous(), weight_norm);
    return {at::Tensor(), dgamma, dbeta};
  }
};

at::Tensor madafm_weight_autograd(const at::Tensor& weight_norm, const at::Tensor& gamma, const at::Tensor& beta) {
  return MadafmWeightFunction::apply(weight_norm, gamma, beta);
}

}  // namespace
}  // namespace gmem_ext

TORCH_LIBRARY_IMPL(gmem_ext, Autograd, m) { m.impl("madafm_weight", gmem_ext::madafm_weight_autograd); }
