// Entry points of the C++ CPU backend (bound to Python in bindings.cpp).
//
// The grouped-KL operators have the argument lists of ltkd_kernels/ops/grouped_kl_torch.py
// (docs/design.md); `opt` is the GroupedKLConfig of ltkd_kernels/ops/config.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

#include "grouped_kl.h"

namespace ltkd {

// Op 1: (state (N, 5, G), extras (N, 4)), float32.
std::tuple<at::Tensor, at::Tensor> grouped_kl_states(
    const std::optional<at::Tensor>& student, const std::optional<at::Tensor>& teacher,
    const std::optional<at::Tensor>& topk_indices, const std::optional<at::Tensor>& topk_logprobs,
    const std::optional<at::Tensor>& groups, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& class_weight, const std::optional<at::Tensor>& mask,
    const gkl::Options& opt);

// Op 2: (loss (0-d, or (N,) for REDUCE_NONE), saved (G + 1,)), float32.
std::tuple<at::Tensor, at::Tensor> grouped_kl_finish(
    const at::Tensor& state, const at::Tensor& extras, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& sample_weight,
    const std::optional<at::Tensor>& group_logmass,
    const std::optional<at::Tensor>& batch_partials, const std::optional<at::Tensor>& num_items,
    const gkl::Options& opt);

// Op 2 with partial_only: this row set's batch partial (2G + 2,), float32.
at::Tensor grouped_kl_partial(const at::Tensor& state, const at::Tensor& extras,
                              const std::optional<at::Tensor>& mask,
                              const std::optional<at::Tensor>& target,
                              const std::optional<at::Tensor>& sample_weight,
                              const std::optional<at::Tensor>& group_logmass,
                              const gkl::Options& opt);

// Ops 1 + 2 in one call: (loss, state, extras, saved).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_kl_loss_forward(
    const std::optional<at::Tensor>& student, const std::optional<at::Tensor>& teacher,
    const std::optional<at::Tensor>& topk_indices, const std::optional<at::Tensor>& topk_logprobs,
    const std::optional<at::Tensor>& groups, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& class_weight, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& sample_weight,
    const std::optional<at::Tensor>& group_logmass, const std::optional<at::Tensor>& num_items,
    const gkl::Options& opt);

// Ops 1 + 2 and, for the upstream gradient 1, op 3 in one pass over the rows (the one-group or
// the TARGET rule, a dense teacher, a float32 student: KD, BKD, DKD; grouped_kl_grad.cpp):
// (loss, state, extras, saved, grad); grad is undefined where the pass does not apply (then
// ops 1 + 2 alone).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
grouped_kl_loss_forward_grad(
    const at::Tensor& student, const std::optional<at::Tensor>& teacher,
    const std::optional<at::Tensor>& topk_indices, const std::optional<at::Tensor>& topk_logprobs,
    const std::optional<at::Tensor>& groups, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& class_weight, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& sample_weight,
    const std::optional<at::Tensor>& group_logmass, const std::optional<at::Tensor>& num_items,
    const gkl::Options& opt);

// grad *= grad_loss in place (one value, or one per row of grad): the fused forward's gradient
// for the actual upstream gradient. Nothing is done for one value equal to 1.
void grouped_kl_scale_grad(const at::Tensor& grad, const at::Tensor& grad_loss);

// Op 3: the (N, V) gradient with respect to the student logits, contiguous, in their dtype.
at::Tensor grouped_kl_grad(
    const at::Tensor& student, const std::optional<at::Tensor>& teacher,
    const std::optional<at::Tensor>& topk_indices, const std::optional<at::Tensor>& topk_logprobs,
    const std::optional<at::Tensor>& groups, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& class_weight, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& sample_weight,
    const std::optional<at::Tensor>& group_logmass, const at::Tensor& state,
    const at::Tensor& extras, const at::Tensor& saved, const at::Tensor& grad_loss,
    const gkl::Options& opt);

// The loss with its autograd node in C++ (autograd.cpp): forward grouped_kl_loss_forward_grad
// (`fused`) or grouped_kl_loss_forward; backward grouped_kl_scale_grad of the fused gradient or
// grouped_kl_grad. For plain eager calls (ltkd_kernels/ops/grouped_kl.py decides).
at::Tensor grouped_kl_loss_autograd(
    const at::Tensor& student, const std::optional<at::Tensor>& teacher,
    const std::optional<at::Tensor>& topk_indices, const std::optional<at::Tensor>& topk_logprobs,
    const std::optional<at::Tensor>& groups, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& class_weight, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& sample_weight,
    const std::optional<at::Tensor>& group_logmass, const std::optional<at::Tensor>& num_items,
    const gkl::Options& opt, bool fused);

// How many times the backward node called (scale_grad, grad) since the process started.
std::tuple<int64_t, int64_t> grouped_kl_backward_calls();

// SRW weights (B, P) float32 from features (B, P, D); see srw.cpp.
at::Tensor srw_weights(const at::Tensor& features, const std::optional<at::Tensor>& mask,
                       double tau, double eps);

// How this build was compiled: SIMD path, lane count, OpenMP.
std::string build_info();

}  // namespace ltkd
