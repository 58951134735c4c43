"""The grouped-KL operators and their autograd: one machinery behind LTKD, KD, DKD and BKD.

Every kernel backend provides two functions with the same arguments:

``grouped_kl_stats(student, teacher, groups, group_target, teacher_log_weight, ce_target,
row_valid, num_groups, temperature) -> (lse_student, lse_teacher, within_kl, ce, lse_raw)``
    One read of each ``(N, V)`` logits tensor. ``lse_*``: ``(N, G)`` group log-sum-exps of
    ``b = z^S / T`` and ``a = z^T / T (+ log w)``; ``within_kl``: ``(N, G)``
    ``KL(pt^T_k || pt^S_k)`` (0 where the teacher's group has no mass); ``ce``: ``(N,)``
    ``logsumexp(z^S) - z^S_t`` and ``lse_raw``: ``(N,)`` ``logsumexp(z^S)`` when ``ce_target``
    is given, else empty. Rows with ``row_valid`` false are skipped and get zeros.

``grouped_kl_grad(same arguments, lse_student, lse_teacher, coef_student, coef_teacher,
lse_raw, grad_ce) -> grad_student``
    One more read of each logits tensor and one write of the ``(N, V)`` gradient in the
    student's dtype: ``(coef^S_{g(i)} pt^S_i - coef^T_{g(i)} pt^T_i) / T
    + grad_ce (softmax(z^S)_i - [i = t])``; zero on rows with ``row_valid`` false.

How a class maps to a group: ``groups`` ``(V,)`` given: ``groups[i]``; else ``group_target``
``(N,)`` given: group 0 is the row's target class, group 1 the rest; else one group.

:func:`define_grouped_kl_ops` wraps a backend's pair into ``torch.library`` custom operators
(so they work under ``torch.compile``) whose autograd is the chain rule through the
statistics: ``d lse^S_k / d b_i = pt^S_i`` and ``d KL_k / d b_i = pt^S_i - pt^T_i`` for ``i`` in
group ``k`` (0 for a massless teacher group, whose KL is defined as 0), and
``d ce / d z_i = softmax(z)_i - [i = t]``. Only the ``(N, G)`` statistics are saved between
forward and backward, never ``N x V`` probabilities. The teacher is a constant.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor


class GroupedKLOps(NamedTuple):
    """The two custom operators of one backend."""

    stats: Callable
    grad: Callable


def _stats_fake(student, teacher, groups, group_target, teacher_log_weight, ce_target, row_valid,
                num_groups, temperature):
    rows = student.shape[0]
    stat = student.new_empty((rows, num_groups), dtype=torch.float32)
    ce_rows = rows if ce_target is not None else 0
    ce = student.new_empty((ce_rows,), dtype=torch.float32)
    return stat, torch.empty_like(stat), torch.empty_like(stat), ce, torch.empty_like(ce)


def _grad_fake(student, *args):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def define_grouped_kl_ops(backend: str, stats_impl: Callable, grad_impl: Callable) -> GroupedKLOps:
    """Register ``ltkd_kernels::grouped_kl_stats_<backend>`` and ``..._grad_<backend>``."""
    stats_name = f"ltkd_kernels::grouped_kl_stats_{backend}"
    grad_name = f"ltkd_kernels::grouped_kl_grad_{backend}"

    @torch.library.custom_op(stats_name, mutates_args=())
    def stats_op(student: Tensor, teacher: Tensor, groups: Optional[Tensor],
                 group_target: Optional[Tensor], teacher_log_weight: Optional[Tensor],
                 ce_target: Optional[Tensor], row_valid: Optional[Tensor], num_groups: int,
                 temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return tuple(stats_impl(student, teacher, groups, group_target, teacher_log_weight,
                                ce_target, row_valid, num_groups, temperature))

    @torch.library.custom_op(grad_name, mutates_args=())
    def grad_op(student: Tensor, teacher: Tensor, groups: Optional[Tensor],
                group_target: Optional[Tensor], teacher_log_weight: Optional[Tensor],
                ce_target: Optional[Tensor], row_valid: Optional[Tensor], num_groups: int,
                temperature: float, lse_student: Tensor, lse_teacher: Tensor,
                coef_student: Tensor, coef_teacher: Tensor, lse_raw: Tensor,
                grad_ce: Tensor) -> Tensor:
        return grad_impl(student, teacher, groups, group_target, teacher_log_weight, ce_target,
                         row_valid, num_groups, temperature, lse_student, lse_teacher,
                         coef_student, coef_teacher, lse_raw, grad_ce)

    stats_op.register_fake(_stats_fake)
    grad_op.register_fake(_grad_fake)

    def setup_context(ctx, inputs, output):
        (student, teacher, groups, group_target, teacher_log_weight, ce_target, row_valid,
         num_groups, temperature) = inputs
        lse_student, lse_teacher, _, _, lse_raw = output
        ctx.save_for_backward(student, teacher, groups, group_target, teacher_log_weight,
                              ce_target, row_valid, lse_student, lse_teacher, lse_raw)
        ctx.num_groups = num_groups
        ctx.temperature = temperature
        ctx.mark_non_differentiable(lse_teacher, lse_raw)

    def backward(ctx, grad_lse_student, grad_lse_teacher, grad_within, grad_ce, grad_lse_raw):
        (student, teacher, groups, group_target, teacher_log_weight, ce_target, row_valid,
         lse_student, lse_teacher, lse_raw) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        zeros = torch.zeros_like(lse_student)
        grad_lse_student = zeros if grad_lse_student is None else grad_lse_student.float()
        grad_within = zeros if grad_within is None else grad_within.float()
        # A massless teacher group has KL defined as 0: no gradient from it.
        grad_within = torch.where(lse_teacher == float("-inf"), zeros, grad_within)
        if ce_target is not None:
            grad_ce = torch.zeros_like(lse_raw) if grad_ce is None else grad_ce.float().contiguous()
        else:
            grad_ce = lse_raw  # empty, unread
        grad_student = grad_op(student, teacher, groups, group_target, teacher_log_weight,
                               ce_target, row_valid, ctx.num_groups, ctx.temperature,
                               lse_student, lse_teacher,
                               (grad_lse_student + grad_within).contiguous(),
                               grad_within.contiguous(), lse_raw, grad_ce)
        return (grad_student,) + (None,) * 8

    stats_op.register_autograd(backward, setup_context=setup_context)
    return GroupedKLOps(stats_op, grad_op)
