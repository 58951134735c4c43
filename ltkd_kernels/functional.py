"""Functional API, mirroring ``torch.nn.functional``: tensors first, options keyword-only.

Every loss is one configuration of the same grouped KL (docs/design.md), computed by the
``ltkd_kernels::grouped_kl_loss`` operator: two kernel launches forward (the per-row group
states, then the finish: batch statistic, row losses, reduction), one backward. The equations
are in docs/losses.md and in :mod:`ltkd_kernels.reference`, which ``backend="torch"`` runs.

====  ========================  ==========  =============  =================
loss  groups                    rebalance   within weight  teacher shift
====  ========================  ==========  =============  =================
KD    one group                 no          1              none
LTKD  ``groups`` (V,)           yes         1 or P^T       none
DKD   {target}, {rest} per row  no          1              none
BKD   one group                 no          1              ``log w``
====  ========================  ==========  =============  =================

Options every loss takes (keyword-only):

- ``temperature``: ``T``; the loss carries the factor ``T^2``.
- ``target``: int class labels of the leading shape. Rows whose target equals
  ``ignore_index`` (default -100, the Hugging Face convention) are dropped; DKD needs it (the
  target class is its group 0). ``ce_weight`` (default 0: **no** cross-entropy is added) adds
  ``ce_weight`` times the student's cross-entropy with ``target`` at T = 1, in the same pass.
- ``sample_weight``: float of the leading shape, multiplies the row losses (a constant).
- ``mask``: bool or 0/1 integer of the leading shape; 0 drops the row (loss 0, no gradient, no
  part in LTKD's batch statistic).
- ``reduction``: ``"batchmean"`` (default: the sum over valid rows divided by their total
  ``sample_weight``, their number without weights, so SRW weights summing to 1 give
  ``sum_i w_i l_i``), ``"sum"``, or ``"none"`` (the leading shape, 0 at dropped rows).
- ``num_items_in_batch``: replaces the ``batchmean`` denominator (a number or a one-element
  tensor, as Hugging Face's trainer passes): micro-batches of an accumulated step, each divided
  by the whole step's number of valid rows, sum to the full batch's loss and gradient exactly.
- ``process_group``: data parallel. LTKD's batch statistic is taken over every rank's rows
  (one all-gather of ``2G + 2`` floats), so the result equals one process on the concatenated
  batch. ``global_batchmean=True`` also divides by every rank's valid-row weight (each rank's
  loss is then its share of the global mean: multiply by the world size under DDP's gradient
  averaging); the default divides by the local one.
- ``vocab_process_group``: vocabulary parallel (tensor-parallel LM heads): each rank passes its
  contiguous slice of the classes (in rank order) of both logits and of ``groups`` /
  ``class_weight``; ``target`` holds global class ids. The result equals one process on the
  whole vocabulary, loss and gradient, with two all-reduces of ``O(N G)`` floats per forward
  and none backward.
- ``backend``: ``"auto"`` (Triton on CUDA, C++ on CPU, the plain-torch operators where
  neither can run, the reference for float64), ``"triton"``, ``"cpu"``, ``"torch"`` (the
  reference). A named backend that cannot run raises; there is no silent fallback. The
  kernels' gradient is first-order: with ``create_graph=True`` a backward through it raises
  (use ``"torch"`` for second derivatives).

A teacher may be a :class:`ltkd_kernels.TopKTeacher` (top-k indices and log-probabilities)
wherever teacher logits are accepted (see :mod:`ltkd_kernels.topk`).
"""
from __future__ import annotations

import torch

from . import reference
from ._arguments import LossArguments, parse_loss_arguments, topk_rule
from ._validation import check_groups, check_logits_pair, check_positive
from .ops import class_order
from .ops.config import REDUCTIONS, TOPK_BUCKET, GroupedKLConfig
from .ops.distributed import group_name, vocab_layout
from .ops.grouped_kl import group_logsumexp as _group_logsumexp_op
from .ops.grouped_kl import grouped_kl_loss

__all__ = ["kd_loss", "ltkd_loss", "dkd_loss", "bkd_loss", "group_logsumexp", "run_loss"]

_INDEX_DTYPES = (torch.int32, torch.int64)


def _index(t):
    return t if t is None or t.dtype in _INDEX_DTYPES else t.long()


def config_from_arguments(args: LossArguments) -> GroupedKLConfig:
    """The operators' configuration of a validated call."""
    rule = topk_rule(args)
    vocab_offset = vocab_total = 0
    if args.vocab_process_group is not None:
        vocab_offset, vocab_total = vocab_layout(args.student.shape[-1], args.vocab_process_group)
    return GroupedKLConfig(
        num_groups=2 if rule == TOPK_BUCKET else args.num_groups,
        temperature=args.temperature, alpha=args.alpha, beta=args.beta,
        rebalance=args.rebalance and args.num_groups > 1, within_teacher=args.within_teacher,
        ce_weight=args.ce_weight, reduction=REDUCTIONS[args.reduction], group_rule=args.group_rule,
        topk_rule=rule, vocab_offset=vocab_offset, vocab_total=vocab_total,
        ignore_index=args.ignore_index, num_items=args.num_items)


def run_loss(args: LossArguments) -> torch.Tensor:
    """The loss of a validated call, on the backend it names (the reference for ``"torch"``)."""
    if args.backend == "torch":
        return reference.loss_from_arguments(args)
    group_logmass = args.group_logmass
    if group_logmass is not None and group_logmass.dtype != torch.float32:
        group_logmass = group_logmass.float()
    loss = grouped_kl_loss(
        args.student, args.teacher, _index(args.topk_indices), args.topk_logprobs,
        _index(args.groups), _index(args.target), args.class_weight, args.mask,
        args.sample_weight, group_logmass, args.num_items_tensor, config_from_arguments(args),
        args.backend, group_name(args.process_group, "process_group"),
        group_name(args.vocab_process_group, "vocab_process_group"), args.global_batchmean)
    if args.reduction == "none" and loss.shape != args.leading:
        return loss.reshape(args.leading)
    return loss


def kd_loss(student_logits, teacher_logits, *, temperature=1.0, target=None, ignore_index=-100,
            ce_weight=0.0, sample_weight=None, mask=None, reduction="batchmean",
            num_items_in_batch=None, process_group=None, global_batchmean=False,
            vocab_process_group=None, backend="auto"):
    """KD: ``l_r = T^2 KL(softmax(z^T_r / T) || softmax(z^S_r / T))``.

    ``student_logits``: ``(..., V)`` float32/float16/bfloat16; ``teacher_logits``: the same
    shape (any of those dtypes) or a :class:`ltkd_kernels.TopKTeacher`. Returns float32 (the
    gradient has the student's dtype). The options are in this module's docstring.
    """
    return run_loss(parse_loss_arguments(
        "kd", student_logits, teacher_logits, temperature=temperature, target=target,
        ignore_index=ignore_index, ce_weight=ce_weight, sample_weight=sample_weight, mask=mask,
        reduction=reduction, num_items_in_batch=num_items_in_batch, process_group=process_group,
        global_batchmean=global_batchmean, vocab_process_group=vocab_process_group,
        backend=backend))


def ltkd_loss(student_logits, teacher_logits, groups, num_groups=None, *, alpha=1.0, beta=1.0,
              temperature=1.0, rebalance=True, within_weight="uniform", target=None,
              ignore_index=-100, ce_weight=0.0, sample_weight=None, mask=None,
              reduction="batchmean", num_items_in_batch=None, process_group=None,
              global_batchmean=False, vocab_process_group=None, backend="auto"):
    """LTKD: ``l_r = T^2 [alpha KL(q_r || P^S_r) + beta sum_k c_{r,k} KL(pt^T_{r,k} || pt^S_{r,k})]``.

    ``groups``: int ``(V,)`` class groups in ``[0, G)`` (``G = num_groups`` or
    ``groups.max() + 1``; at most 1024). ``q`` is the teacher's group mass ``P^T`` rebalanced
    by the batch statistic ``pB`` (``rebalance=True``): ``s_k = mean_j pB_j / pB_k``,
    ``q_k ∝ s_k P^T_k``; ``c = 1`` (``within_weight="uniform"``, the paper's LTKD) or
    ``c = P^T`` (``"teacher"``: with ``rebalance=False, alpha=beta=1`` this is KD exactly).
    The other options are in this module's docstring.
    """
    return run_loss(parse_loss_arguments(
        "ltkd", student_logits, teacher_logits, groups=groups, num_groups=num_groups,
        alpha=alpha, beta=beta, temperature=temperature, rebalance=rebalance,
        within_weight=within_weight, target=target, ignore_index=ignore_index,
        ce_weight=ce_weight, sample_weight=sample_weight, mask=mask, reduction=reduction,
        num_items_in_batch=num_items_in_batch, process_group=process_group,
        global_batchmean=global_batchmean, vocab_process_group=vocab_process_group,
        backend=backend))


def dkd_loss(student_logits, teacher_logits, target, *, alpha=1.0, beta=8.0, temperature=4.0,
             ignore_index=-100, ce_weight=0.0, sample_weight=None, mask=None,
             reduction="batchmean", num_items_in_batch=None, process_group=None,
             global_batchmean=False, vocab_process_group=None, backend="auto"):
    """DKD: ``l_r = T^2 (alpha TCKD + beta NCKD)`` with the row's target class ``t``:
    ``TCKD = KL([p^T_t, 1 - p^T_t] || [p^S_t, 1 - p^S_t])``, ``NCKD`` the KL of the two softmaxes
    over the non-target classes. Defaults of the paper: ``alpha=1, beta=8, T=4`` (its warm-up
    schedule is the caller's: scale the loss). Rows whose target is ``ignore_index`` are dropped.
    """
    return run_loss(parse_loss_arguments(
        "dkd", student_logits, teacher_logits, target=target, alpha=alpha, beta=beta,
        temperature=temperature, ignore_index=ignore_index, ce_weight=ce_weight,
        sample_weight=sample_weight, mask=mask, reduction=reduction,
        num_items_in_batch=num_items_in_batch, process_group=process_group,
        global_batchmean=global_batchmean, vocab_process_group=vocab_process_group,
        backend=backend))


def bkd_loss(student_logits, teacher_logits, class_weight, *, temperature=2.0, target=None,
             ignore_index=-100, ce_weight=0.0, sample_weight=None, mask=None,
             reduction="batchmean", num_items_in_batch=None, process_group=None,
             global_batchmean=False, vocab_process_group=None, backend="auto"):
    """BKD: ``l_r = T^2 KL(qhat_r || softmax(z^S_r / T))``, ``qhat_r = softmax(z^T_r / T + log w)``
    (``= normalize(w * softmax(z^T_r / T))``; build ``w`` with
    :func:`ltkd_kernels.class_balanced_weights`). The paper's loss also adds the student's
    cross-entropy: pass ``target`` and ``ce_weight=1.0`` (``target`` alone adds nothing; it only
    drops ``ignore_index`` rows).
    """
    return run_loss(parse_loss_arguments(
        "bkd", student_logits, teacher_logits, class_weight=class_weight,
        temperature=temperature, target=target, ignore_index=ignore_index, ce_weight=ce_weight,
        sample_weight=sample_weight, mask=mask, reduction=reduction,
        num_items_in_batch=num_items_in_batch, process_group=process_group,
        global_batchmean=global_batchmean, vocab_process_group=vocab_process_group,
        backend=backend))


def group_logsumexp(logits, groups, num_groups=None, *, temperature=1.0, backend="auto"):
    """Per-row group log-sum-exps ``lse_k = log sum_{i: g(i)=k} exp(z_i / T)``.

    ``logits``: ``(..., V)``; ``groups``: int ``(V,)`` in ``[0, G)``. Returns float32
    ``(..., G)`` (float64 for float64 logits, through the reference), ``-inf`` for a group with
    no class. Differentiable in ``logits``.
    """
    from ._arguments import BACKENDS, _use_reference

    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    check_logits_pair(logits, logits, allow_float64=True, names=("logits", "logits"))
    if _use_reference(backend, logits, logits.dtype):
        return reference.group_logsumexp(logits, groups, num_groups, temperature=temperature)
    temperature = check_positive("temperature", temperature)
    num_groups = check_groups(groups, logits.shape[-1], num_groups, logits.device)
    rows = logits.reshape(-1, logits.shape[-1])
    if rows.stride(-1) != 1 and rows.shape[-1] > 1:
        rows = rows.contiguous()
    index = _index(groups if groups.is_contiguous() else groups.contiguous())
    if index is groups:  # (an order on a per-call copy would be built on every call)
        class_order.remember_for_triton(groups, num_groups, backend)
    lse = _group_logsumexp_op(rows, index, num_groups, temperature, backend)
    return lse.reshape(*logits.shape[:-1], num_groups)

