"""Functional API, mirroring ``torch.nn.functional``: tensors first, options keyword-only.

Each loss validates its arguments, chooses a backend (:mod:`ltkd_kernels.backends`), gets the
per-row ``(N, G)`` grouped-KL statistics from that backend's kernels in one read of the logits,
turns them into row losses with the shared ``(N, G)`` arithmetic of
:func:`ltkd_kernels.reference.grouped_kl_row_losses`, and reduces. ``backend="torch"`` runs
:mod:`ltkd_kernels.reference` instead. The equations are in the reference's docstrings and in
SPEC.md; every loss here is one configuration of the same grouped KL:

====  ========================  ==========  =============  =================
loss  groups                    rebalance   within weight  teacher shift
====  ========================  ==========  =============  =================
KD    one group                 no          1              none
LTKD  ``groups`` (V,)           yes         1 or p^T       none
DKD   {target}, {rest} per row  no          1              none
BKD   one group                 no          1              ``log w`` (+ CE)
====  ========================  ==========  =============  =================
"""
from __future__ import annotations


import torch

from . import reference
from ._validation import (
    check_class_weight,
    check_groups,
    check_logits_pair,
    check_option,
    check_positive,
    check_real,
    check_row_tensor,
    check_target,
)
from .backends import grouped_kl_ops, resolve_backend
from .reference import grouped_kl_row_losses, reduce_row_losses

_REDUCTIONS = ("batchmean", "sum", "none")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(..., V)`` as ``(N, V)`` rows with unit stride along V (copied only if it must be)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def _grouped_kl_loss(student_logits, teacher_logits, *, backend, temperature, sample_weight, mask,
                     reduction, alpha=1.0, beta=1.0, rebalance=False, within_weight="uniform",
                     groups=None, num_groups=1, group_target=None, teacher_log_weight=None,
                     ce_target=None, process_group=None):
    """The one kernel path behind every grouped-KL loss (arguments already validated)."""
    leading = student_logits.shape[:-1]
    student = _rows(student_logits)
    teacher = _rows(teacher_logits.detach())
    valid_rows = None if mask is None else mask.reshape(-1).contiguous()
    stats_op = grouped_kl_ops(backend).stats
    lse_student, lse_teacher, within, ce, _ = stats_op(
        student, teacher, groups, group_target, teacher_log_weight, ce_target, valid_rows,
        num_groups, float(temperature))
    valid = (torch.ones(student.shape[0], dtype=torch.bool, device=student.device)
             if valid_rows is None else valid_rows)
    row_loss = grouped_kl_row_losses(lse_student, lse_teacher, within, valid, alpha=alpha,
                                     beta=beta, temperature=temperature, rebalance=rebalance,
                                     within_weight=within_weight, process_group=process_group)
    if ce_target is not None:
        row_loss = row_loss + ce
    weight = None if sample_weight is None else sample_weight.reshape(-1).detach()
    out = reduce_row_losses(row_loss, weight, valid, reduction)
    return out.reshape(leading) if reduction == "none" else out


def _check_common(student_logits, teacher_logits, backend, temperature, sample_weight, mask,
                  reduction):
    """Checks every loss shares; returns the resolved backend."""
    check_logits_pair(student_logits, teacher_logits, allow_float64=True)
    resolved = resolve_backend(backend, student_logits.device)
    if resolved != "torch" and torch.float64 in (student_logits.dtype, teacher_logits.dtype):
        raise TypeError(f"float64 logits are supported by backend='torch' only (the kernels "
                        f"compute in float32); got backend={backend!r} -> {resolved!r}")
    check_positive("temperature", temperature)
    check_option("reduction", reduction, _REDUCTIONS)
    leading = student_logits.shape[:-1]
    device = student_logits.device
    check_row_tensor("sample_weight", sample_weight, leading, device, floating=True)
    check_row_tensor("mask", mask, leading, device, boolean=True)
    return resolved


def group_logsumexp(logits, groups, num_groups=None, *, temperature=1.0, backend="auto"):
    """Per-row group log-sum-exps ``lse_k = log sum_{i: g(i)=k} exp(z_i / T)``.

    ``logits``: ``(..., V)``; ``groups``: int ``(V,)`` in ``[0, G)``. Returns float32
    ``(..., G)``, ``-inf`` for a group with no class. Differentiable in ``logits``.
    """
    check_logits_pair(logits, logits, allow_float64=True, names=("logits", "logits"))
    resolved = resolve_backend(backend, logits.device)
    if resolved == "torch" or logits.dtype == torch.float64:
        return reference.group_logsumexp(logits, groups, num_groups, temperature=temperature)
    check_positive("temperature", temperature)
    num_groups = check_groups(groups, logits.shape[-1], num_groups, logits.device)
    rows = _rows(logits)
    # The stats kernel reads a teacher too; passing the logits again costs a second read.
    lse, _, _, _, _ = grouped_kl_ops(resolved).stats(
        rows, rows.detach(), groups.contiguous(), None, None, None, None, num_groups,
        float(temperature))
    return lse.reshape(*logits.shape[:-1], num_groups)


def kd_loss(student_logits, teacher_logits, *, temperature=1.0, sample_weight=None, mask=None,
            reduction="batchmean", backend="auto"):
    """KD: ``l_r = T^2 KL(softmax(z^T_r / T) || softmax(z^S_r / T))``.

    ``student_logits``, ``teacher_logits``: ``(..., V)`` float32/float16/bfloat16 (they may
    differ). ``sample_weight`` (leading shape) multiplies the row losses; ``mask`` (bool,
    leading shape) drops rows. ``reduction``: ``"batchmean"`` (sum / valid rows), ``"sum"`` or
    ``"none"`` (leading shape). Returns float32; the gradient has the student's dtype.
    """
    resolved = _check_common(student_logits, teacher_logits, backend, temperature,
                             sample_weight, mask, reduction)
    if resolved == "torch":
        return reference.kd_loss(student_logits, teacher_logits, temperature=temperature,
                                 sample_weight=sample_weight, mask=mask, reduction=reduction)
    return _grouped_kl_loss(student_logits, teacher_logits, backend=resolved,
                            temperature=temperature, sample_weight=sample_weight, mask=mask,
                            reduction=reduction)


def ltkd_loss(student_logits, teacher_logits, groups, num_groups=None, *, alpha=1.0, beta=1.0,
              temperature=1.0, rebalance=True, within_weight="uniform", sample_weight=None,
              mask=None, reduction="batchmean", process_group=None, backend="auto"):
    """LTKD: ``l_r = T^2 [alpha KL(q_r || p^S_r) + beta sum_k c_{r,k} KL(pt^T_{r,k} || pt^S_{r,k})]``.

    ``groups``: int ``(V,)`` class groups in ``[0, G)`` (``G = num_groups`` or
    ``groups.max() + 1``). ``q`` is the teacher's group mass rebalanced by the batch statistic
    ``pB`` (``rebalance=True``; ``pB`` all-reduced over ``process_group`` when given);
    ``c = 1`` (``within_weight="uniform"``) or the teacher's group mass (``"teacher"``).
    See :func:`ltkd_kernels.reference.ltkd_loss` and :func:`kd_loss` for the other options.
    """
    resolved = _check_common(student_logits, teacher_logits, backend, temperature,
                             sample_weight, mask, reduction)
    check_option("within_weight", within_weight, ("uniform", "teacher"))
    if not isinstance(rebalance, bool):
        raise TypeError(f"rebalance must be a bool, got {type(rebalance).__name__}")
    alpha, beta = check_real("alpha", alpha), check_real("beta", beta)
    options = dict(alpha=alpha, beta=beta, temperature=temperature, rebalance=rebalance,
                   within_weight=within_weight, sample_weight=sample_weight, mask=mask,
                   reduction=reduction, process_group=process_group)
    if resolved == "torch":
        return reference.ltkd_loss(student_logits, teacher_logits, groups, num_groups, **options)
    num_groups = check_groups(groups, student_logits.shape[-1], num_groups, student_logits.device)
    return _grouped_kl_loss(student_logits, teacher_logits, backend=resolved,
                            groups=groups.contiguous(), num_groups=num_groups, **options)


def dkd_loss(student_logits, teacher_logits, target, *, alpha=1.0, beta=8.0, temperature=4.0,
             sample_weight=None, mask=None, reduction="batchmean", backend="auto"):
    """DKD: ``l_r = T^2 (alpha TCKD + beta NCKD)`` with the row's target class ``target``.

    ``TCKD = KL([p^T_t, 1 - p^T_t] || [p^S_t, 1 - p^S_t])``; ``NCKD`` is the KL of the
    teachers' and students' softmax over the non-target classes. The grouped KL with per-row
    groups ``{t}`` and the rest, no rebalancing, uniform within weights. ``target``: int,
    the logits' leading shape, values in ``[0, V)``.
    """
    resolved = _check_common(student_logits, teacher_logits, backend, temperature,
                             sample_weight, mask, reduction)
    alpha, beta = check_real("alpha", alpha), check_real("beta", beta)
    options = dict(alpha=alpha, beta=beta, temperature=temperature, sample_weight=sample_weight,
                   mask=mask, reduction=reduction)
    if resolved == "torch":
        return reference.dkd_loss(student_logits, teacher_logits, target, **options)
    target = check_target("target", target, student_logits.shape[:-1], student_logits.shape[-1],
                          student_logits.device)
    return _grouped_kl_loss(student_logits, teacher_logits, backend=resolved, num_groups=2,
                            group_target=target.reshape(-1).contiguous(), **options)


def bkd_loss(student_logits, teacher_logits, class_weight, *, temperature=2.0, target=None,
             sample_weight=None, mask=None, reduction="batchmean", backend="auto"):
    """BKD: ``l_r = T^2 KL(normalize(w * softmax(z^T_r / T)) || softmax(z^S_r / T))``.

    ``class_weight``: float ``(V,)``, ``>= 0`` (see :func:`class_balanced_weights`); the
    teacher's distribution is ``softmax(z^T / T + log w)``, computed as the teacher block is
    loaded. With ``target``, the unweighted cross-entropy of the raw student logits (T = 1) is
    added, computed in the same read of the student logits.
    """
    resolved = _check_common(student_logits, teacher_logits, backend, temperature,
                             sample_weight, mask, reduction)
    options = dict(temperature=temperature, sample_weight=sample_weight, mask=mask,
                   reduction=reduction)
    if resolved == "torch":
        return reference.bkd_loss(student_logits, teacher_logits, class_weight, target=target,
                                  **options)
    weight = check_class_weight(class_weight, student_logits.shape[-1], student_logits.device)
    ce_target = None
    if target is not None:
        ce_target = check_target("target", target, student_logits.shape[:-1],
                                 student_logits.shape[-1], student_logits.device)
        ce_target = ce_target.reshape(-1).contiguous()
    # log 0 = -inf: a class of weight 0 gets no teacher probability.
    teacher_log_weight = torch.log(weight.float()).contiguous()
    return _grouped_kl_loss(student_logits, teacher_logits, backend=resolved,
                            teacher_log_weight=teacher_log_weight, ce_target=ce_target, **options)
