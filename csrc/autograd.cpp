// The grouped-KL loss's autograd as a C++ Function, for plain eager calls on the CPU backend.
//
// Why: at classification sizes (N = 128-512, V = 100-1000) a step's kernels take tens of
// microseconds and the Python around them as long again. The Python autograd Function of
// ltkd_kernels/ops/grouped_kl.py costs a Python context, a Python backward called back from the
// autograd engine (the GIL taken on its thread) and the re-reading of its saved state; this
// node does the same work in C++: its forward is one call of the loss kernels (with the
// gradient in the same pass where it applies) and its backward scales that gradient or runs
// the gradient kernel, without Python. Same kernels, same results, bit for bit.
//
// The Python Function stays for every other call (torch.compile tracing, dispatch modes, the
// distributed modes, the Triton and torch backends): ltkd_kernels/ops/grouped_kl.py decides.
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/extension.h>

#include <array>
#include <atomic>

#include "ltkd_cpu.h"

namespace ltkd {
namespace {

using OptTensor = std::optional<at::Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The eleven tensor arguments, the options and the fused flag: the backward returns one entry
// per forward argument.
constexpr size_t kForwardArguments = 13;
constexpr size_t kSavedInputs = 10;  // student .. group_logmass

// Calls the backward node makes into the kernels, by kind (the launch counter of
// ltkd_kernels/ops/launches.py reads them: a backward run by the engine has no Python to count it).
std::array<std::atomic<int64_t>, 2> backward_calls{};  // [scale_grad, grad]

// The options travel in the context as doubles (every integer field is far below 2^53).
c10::List<double> pack(const gkl::Options& o) {
  return c10::List<double>({static_cast<double>(o.num_groups), o.temperature, o.alpha, o.beta,
                            o.rebalance ? 1.0 : 0.0, o.within_teacher ? 1.0 : 0.0, o.ce_weight,
                            static_cast<double>(o.reduction), static_cast<double>(o.group_rule),
                            static_cast<double>(o.topk_rule), static_cast<double>(o.vocab_offset),
                            static_cast<double>(o.vocab_total),
                            static_cast<double>(o.ignore_index), o.num_items,
                            o.denominator_from_partials ? 1.0 : 0.0});
}

gkl::Options unpack(const c10::List<double>& v) {
  gkl::Options o;
  o.num_groups = static_cast<int64_t>(v[0]);
  o.temperature = v[1];
  o.alpha = v[2];
  o.beta = v[3];
  o.rebalance = v[4] != 0.0;
  o.within_teacher = v[5] != 0.0;
  o.ce_weight = v[6];
  o.reduction = static_cast<int64_t>(v[7]);
  o.group_rule = static_cast<int64_t>(v[8]);
  o.topk_rule = static_cast<int64_t>(v[9]);
  o.vocab_offset = static_cast<int64_t>(v[10]);
  o.vocab_total = static_cast<int64_t>(v[11]);
  o.ignore_index = static_cast<int64_t>(v[12]);
  o.num_items = v[13];
  o.denominator_from_partials = v[14] != 0.0;
  return o;
}

OptTensor optional(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The kernels' gradient is not differentiable again. Under create_graph=True it is returned
// with an error node as its grad_fn, so that a backward through it (a gradient penalty, a
// second derivative) raises instead of treating it as a constant.
constexpr const char* kNotTwice =
    "ltkd_kernels: the gradient of a loss on the 'cpu' or 'triton' backend cannot be "
    "differentiated again (create_graph=True); use backend='torch' (the reference) for "
    "second derivatives";

at::Tensor not_differentiable_again(const at::Tensor& grad) {
  if (!at::GradMode::is_enabled()) return grad;
  at::Tensor alias = grad.detach();
  alias.set_requires_grad(true);
  return torch::autograd::DelayedError(kNotTwice, 1).apply({alias})[0];
}

at::Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }

struct GroupedKLFunction : public torch::autograd::Function<GroupedKLFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student,
                            const OptTensor& teacher, const OptTensor& topk_indices,
                            const OptTensor& topk_logprobs, const OptTensor& groups,
                            const OptTensor& target, const OptTensor& class_weight,
                            const OptTensor& mask, const OptTensor& sample_weight,
                            const OptTensor& group_logmass, const OptTensor& num_items,
                            gkl::Options opt, bool fused) {
    at::Tensor loss, state, extras, saved, grad;
    if (fused) {
      std::tie(loss, state, extras, saved, grad) = grouped_kl_loss_forward_grad(
          student, teacher, topk_indices, topk_logprobs, groups, target, class_weight, mask,
          sample_weight, group_logmass, num_items, opt);
    } else {
      std::tie(loss, state, extras, saved) = grouped_kl_loss_forward(
          student, teacher, topk_indices, topk_logprobs, groups, target, class_weight, mask,
          sample_weight, group_logmass, num_items, opt);
    }
    ctx->save_for_backward({student, or_undefined(teacher), or_undefined(topk_indices),
                            or_undefined(topk_logprobs), or_undefined(groups),
                            or_undefined(target), or_undefined(class_weight), or_undefined(mask),
                            or_undefined(sample_weight), or_undefined(group_logmass), state,
                            extras, saved});
    ctx->saved_data["opt"] = pack(opt);
    // The gradient for the upstream 1 (where the pass computed one), taken by the backward.
    if (grad.defined()) ctx->saved_data["fused"] = grad;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list out(kForwardArguments);
    if (!ctx->needs_input_grad(0) || !grad_outputs[0].defined()) return out;
    at::Tensor grad_loss = grad_outputs[0];
    gkl::Options opt = unpack(ctx->saved_data["opt"].toDoubleList());
    if (grad_loss.dim() == 1 && grad_loss.numel() > 1 && grad_loss.stride(0) == 0) {
      // The expanded gradient of rows.sum(): one upstream value for every row is the "sum"
      // reduction's backward with one scalar (a view, no copy).
      grad_loss = grad_loss.select(0, 0);
      opt.reduction = gkl::kReduceSum;
    } else if (grad_loss.dim() == 1 && grad_loss.numel() > 1 && grad_loss.stride(0) != 1) {
      grad_loss = grad_loss.contiguous();
    }
    auto fused = ctx->saved_data.find("fused");
    if (fused != ctx->saved_data.end()) {
      // Taken once, and out of the context so that the engine can hand the buffer to .grad
      // without a copy; a second backward (retain_graph) computes the gradient afresh.
      at::Tensor grad = fused->second.toTensor();
      ctx->saved_data.erase(fused);
      backward_calls[0].fetch_add(1, std::memory_order_relaxed);
      grouped_kl_scale_grad(grad, grad_loss);
      out[0] = not_differentiable_again(grad);
      return out;
    }
    const variable_list saved = ctx->get_saved_variables();
    backward_calls[1].fetch_add(1, std::memory_order_relaxed);
    out[0] = grouped_kl_grad(saved[0], optional(saved[1]), optional(saved[2]),
                             optional(saved[3]), optional(saved[4]), optional(saved[5]),
                             optional(saved[6]), optional(saved[7]), optional(saved[8]),
                             optional(saved[9]), saved[kSavedInputs], saved[kSavedInputs + 1],
                             saved[kSavedInputs + 2], grad_loss, opt);
    out[0] = not_differentiable_again(out[0]);
    return out;
  }
};

}  // namespace

at::Tensor grouped_kl_loss_autograd(
    const at::Tensor& student, const OptTensor& teacher, const OptTensor& topk_indices,
    const OptTensor& topk_logprobs, const OptTensor& groups, const OptTensor& target,
    const OptTensor& class_weight, const OptTensor& mask, const OptTensor& sample_weight,
    const OptTensor& group_logmass, const OptTensor& num_items, const gkl::Options& opt,
    bool fused) {
  return GroupedKLFunction::apply(student, teacher, topk_indices, topk_logprobs, groups, target,
                                  class_weight, mask, sample_weight, group_logmass, num_items,
                                  opt, fused);
}

std::tuple<int64_t, int64_t> grouped_kl_backward_calls() {
  return {backward_calls[0].load(std::memory_order_relaxed),
          backward_calls[1].load(std::memory_order_relaxed)};
}

}  // namespace ltkd
