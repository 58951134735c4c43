"""Launchers of the grouped-KL Triton kernels: allocate outputs, pick blocks, launch. No autograd.

Both launchers take the argument list of the ``grouped_kl_stats`` / ``grouped_kl_grad`` ops
(see :mod:`ltkd_kernels.grouped_kl`), shared with the C++ CPU backend.
"""
from __future__ import annotations

import torch
import triton

from .grouped_kl_kernels import grouped_kl_grad_kernel, grouped_kl_stats_kernel

# One-hot tiles of BLOCK_G x BLOCK_V elements: keep them at most this many so that a program's
# temporaries stay in registers for any G (G = 3: 2048 classes a block; G = 128: 64).
_MAX_TILE = 8192
_MAX_BLOCK_V = 2048
_GRAD_BLOCK_V = 2048


def _group_mode(groups, group_target) -> int:
    if groups is not None:
        return 1
    return 2 if group_target is not None else 0


def _pointers(placeholder, *tensors):
    """Optional tensor arguments as kernel pointers: a missing one gets a valid tensor, which
    the kernel's constexpr flags keep unread."""
    return [placeholder if t is None else t for t in tensors]


def _stats_blocks(vocab: int, num_groups: int):
    block_g = triton.next_power_of_2(num_groups)
    block_v = min(_MAX_BLOCK_V, max(16, _MAX_TILE // block_g), triton.next_power_of_2(vocab))
    return block_v, block_g


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def launch_grouped_kl_stats(student, teacher, groups, group_target, teacher_log_weight, ce_target,
                            row_valid, num_groups, temperature):
    """Returns ``(lse_student, lse_teacher, within_kl, ce, lse_raw)``; the last two are empty
    ``(0,)`` tensors without ``ce_target``."""
    rows, vocab = student.shape
    block_v, block_g = _stats_blocks(vocab, num_groups)
    stat_shape = (rows, num_groups)
    lse_student = student.new_empty(stat_shape, dtype=torch.float32)
    lse_teacher = student.new_empty(stat_shape, dtype=torch.float32)
    within_kl = student.new_empty(stat_shape, dtype=torch.float32)
    ce_rows = rows if ce_target is not None else 0
    ce = student.new_empty((ce_rows,), dtype=torch.float32)
    lse_raw = student.new_empty((ce_rows,), dtype=torch.float32)
    if rows == 0:
        return lse_student, lse_teacher, within_kl, ce, lse_raw
    grouped_kl_stats_kernel[(rows,)](
        student, teacher,
        *_pointers(lse_student, groups, group_target, teacher_log_weight, ce_target, row_valid),
        lse_student, lse_teacher, within_kl, ce, lse_raw,
        student.stride(0), teacher.stride(0), vocab, num_groups, 1.0 / temperature,
        GROUP_MODE=_group_mode(groups, group_target),
        HAS_TEACHER_LOG_WEIGHT=teacher_log_weight is not None,
        HAS_CE=ce_target is not None,
        HAS_ROW_MASK=row_valid is not None,
        BLOCK_V=block_v, BLOCK_G=block_g,
        num_warps=_num_warps(block_v * block_g // 4),
    )
    return lse_student, lse_teacher, within_kl, ce, lse_raw


def launch_grouped_kl_grad(student, teacher, groups, group_target, teacher_log_weight, ce_target,
                           row_valid, num_groups, temperature, lse_student, lse_teacher,
                           coef_student, coef_teacher, lse_raw, grad_ce):
    """Returns the ``(N, V)`` gradient with respect to the student logits, in their dtype."""
    rows, vocab = student.shape
    grad_student = student.new_empty((rows, vocab))
    if rows == 0:
        return grad_student
    block_v = min(_GRAD_BLOCK_V, triton.next_power_of_2(vocab))
    grouped_kl_grad_kernel[(rows,)](
        student, teacher,
        *_pointers(lse_student, groups, group_target, teacher_log_weight, ce_target, row_valid),
        lse_student, lse_teacher, coef_student, coef_teacher,
        *_pointers(lse_student, lse_raw, grad_ce),
        grad_student,
        student.stride(0), teacher.stride(0), vocab, num_groups, 1.0 / temperature,
        GROUP_MODE=_group_mode(groups, group_target),
        HAS_TEACHER_LOG_WEIGHT=teacher_log_weight is not None,
        HAS_CE=ce_target is not None,
        HAS_ROW_MASK=row_valid is not None,
        BLOCK_V=block_v,
        num_warps=_num_warps(block_v),
    )
    return grad_student

