"""``nn.Module`` wrappers: options in ``__init__`` (keyword-only, validated there), tensors in
``forward``; groups and class weights are buffers (``.to(device)`` moves them, and their value
check runs once)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as F
from ._arguments import BACKENDS
from ._validation import (
    check_bool,
    check_class_weight,
    check_groups,
    check_int,
    check_option,
    check_positive,
    check_real,
)
from .ops.config import REDUCTIONS
from .ops.distributed import group_name

_COMMON_OPTIONS = """
    Common options (keyword-only):

    - ``temperature`` (float > 0): ``T``; the loss carries the factor ``T^2``.
    - ``ignore_index`` (int, default -100): rows whose ``target`` equals it are dropped.
    - ``ce_weight`` (float, default 0.0: no cross-entropy is added): adds ``ce_weight`` times
      the student's cross-entropy with ``target`` (T = 1), computed in the same pass.
    - ``reduction``: ``"batchmean"`` (sum over valid rows / their total ``sample_weight``, or
      their number), ``"sum"`` or ``"none"`` (the leading shape).
    - ``process_group``: data parallel; LTKD's batch statistic over every rank's rows.
      ``global_batchmean`` (bool): divide ``batchmean`` by every rank's valid rows.
    - ``vocab_process_group``: vocabulary parallel; each rank passes its slice of the classes.
    - ``backend``: ``"auto"``, ``"triton"``, ``"cpu"`` or ``"torch"`` (the reference).

    ``forward(student_logits, teacher_logits, target=None, *, sample_weight=None, mask=None,
    num_items_in_batch=None)``: logits ``(..., V)`` (the teacher may be a
    :class:`ltkd_kernels.TopKTeacher`); ``target`` int of the leading shape; ``sample_weight``
    float, ``mask`` bool or 0/1 int of the leading shape; ``num_items_in_batch`` replaces the
    ``batchmean`` denominator (gradient accumulation). Returns a float32 loss.
    """


class _DistillationLoss(nn.Module):
    _loss = ""

    def _set_common(self, temperature, ignore_index, ce_weight, reduction, process_group,
                    global_batchmean, vocab_process_group, backend):
        self.temperature = check_positive("temperature", temperature)
        self.ignore_index = check_int("ignore_index", ignore_index)
        self.ce_weight = check_real("ce_weight", ce_weight)
        check_option("reduction", reduction, tuple(REDUCTIONS))
        self.reduction = reduction
        group_name(process_group, "process_group")
        group_name(vocab_process_group, "vocab_process_group")
        self.process_group, self.vocab_process_group = process_group, vocab_process_group
        self.global_batchmean = check_bool("global_batchmean", global_batchmean)
        check_option("backend", backend, BACKENDS)
        self.backend = backend

    def _set_ltkd_constants(self, groups, num_groups, alpha, beta, rebalance, within_weight):
        """LTKD's constants, checked once: ``groups`` becomes a buffer."""
        groups = torch.as_tensor(groups)
        self.num_groups = check_groups(groups, groups.shape[0] if groups.dim() == 1 else -1,
                                       num_groups, groups.device, always=True)
        self.register_buffer("groups", groups.long().clone())
        self.alpha, self.beta = check_real("alpha", alpha), check_real("beta", beta)
        self.rebalance = check_bool("rebalance", rebalance)
        check_option("within_weight", within_weight, ("uniform", "teacher"))
        self.within_weight = within_weight

    def _set_class_weight(self, class_weight):
        """BKD's class weights, checked once, as a float32 buffer."""
        class_weight = torch.as_tensor(class_weight)
        if class_weight.dim() != 1:
            raise ValueError(f"class_weight must be 1-D (V,), got shape {tuple(class_weight.shape)}")
        check_class_weight(class_weight, class_weight.shape[0], class_weight.device, always=True)
        self.register_buffer("class_weight", class_weight.float().clone())

    def _ltkd_repr(self) -> str:
        return (f"num_groups={self.num_groups}, alpha={self.alpha}, beta={self.beta}, "
                f"rebalance={self.rebalance}, within_weight={self.within_weight!r}, "
                + self._common_repr())

    def _options(self):
        return dict(temperature=self.temperature, ignore_index=self.ignore_index,
                    ce_weight=self.ce_weight, reduction=self.reduction,
                    process_group=self.process_group, global_batchmean=self.global_batchmean,
                    vocab_process_group=self.vocab_process_group, backend=self.backend)

    def _common_repr(self) -> str:
        text = f"temperature={self.temperature}, reduction={self.reduction!r}"
        if self.ce_weight:
            text += f", ce_weight={self.ce_weight}"
        return text + f", backend={self.backend!r}"


class KDLoss(_DistillationLoss):
    __doc__ = """:func:`ltkd_kernels.kd_loss` as a module:
    ``l_r = T^2 KL(softmax(z^T_r / T) || softmax(z^S_r / T))``.

    ``KDLoss(*, temperature=1.0, ignore_index=-100, ce_weight=0.0, reduction="batchmean",
    process_group=None, global_batchmean=False, vocab_process_group=None, backend="auto")``
    """ + _COMMON_OPTIONS

    def __init__(self, *, temperature=1.0, ignore_index=-100, ce_weight=0.0,
                 reduction="batchmean", process_group=None, global_batchmean=False,
                 vocab_process_group=None, backend="auto"):
        super().__init__()
        self._set_common(temperature, ignore_index, ce_weight, reduction, process_group,
                         global_batchmean, vocab_process_group, backend)

    def forward(self, student_logits, teacher_logits, target=None, *, sample_weight=None,
                mask=None, num_items_in_batch=None):
        return F.kd_loss(student_logits, teacher_logits, target=target,
                         sample_weight=sample_weight, mask=mask,
                         num_items_in_batch=num_items_in_batch, **self._options())

    def extra_repr(self) -> str:
        return self._common_repr()


class LTKDLoss(_DistillationLoss):
    __doc__ = """:func:`ltkd_kernels.ltkd_loss` as a module; ``groups`` (int ``(V,)``) is a buffer.

    ``LTKDLoss(groups, num_groups=None, *, alpha=1.0, beta=1.0, temperature=1.0,
    rebalance=True, within_weight="uniform", ...common options)``:
    ``l_r = T^2 [alpha KL(q_r || P^S_r) + beta sum_k c_{r,k} KL(pt^T_{r,k} || pt^S_{r,k})]``,
    ``q`` the teacher's group masses rebalanced by the batch statistic (``rebalance``), ``c = 1``
    (``within_weight="uniform"``) or the teacher's group masses (``"teacher"``).

    Example::

        groups = lk.groups_from_counts(train_class_counts, num_groups=3)
        criterion = lk.LTKDLoss(groups, temperature=4.0)
        loss = ce + criterion(student_logits, teacher_logits)
    """ + _COMMON_OPTIONS

    def __init__(self, groups: torch.Tensor, num_groups: Optional[int] = None, *, alpha=1.0,
                 beta=1.0, temperature=1.0, rebalance=True, within_weight="uniform",
                 ignore_index=-100, ce_weight=0.0, reduction="batchmean", process_group=None,
                 global_batchmean=False, vocab_process_group=None, backend="auto"):
        super().__init__()
        self._set_ltkd_constants(groups, num_groups, alpha, beta, rebalance, within_weight)
        self._set_common(temperature, ignore_index, ce_weight, reduction, process_group,
                         global_batchmean, vocab_process_group, backend)

    def forward(self, student_logits, teacher_logits, target=None, *, sample_weight=None,
                mask=None, num_items_in_batch=None):
        return F.ltkd_loss(student_logits, teacher_logits, self.groups, self.num_groups,
                           alpha=self.alpha, beta=self.beta, rebalance=self.rebalance,
                           within_weight=self.within_weight, target=target,
                           sample_weight=sample_weight, mask=mask,
                           num_items_in_batch=num_items_in_batch, **self._options())

    extra_repr = _DistillationLoss._ltkd_repr


class DKDLoss(_DistillationLoss):
    __doc__ = """:func:`ltkd_kernels.dkd_loss` as a module: ``l_r = T^2 (alpha TCKD + beta NCKD)``.

    ``DKDLoss(*, alpha=1.0, beta=8.0, temperature=4.0, ...common options)`` (the paper's
    defaults; at T = 4 the beta = 8 term is large, about 30x a cross-entropy: mind the learning
    rate). ``forward`` needs ``target``.
    """ + _COMMON_OPTIONS

    def __init__(self, *, alpha=1.0, beta=8.0, temperature=4.0, ignore_index=-100,
                 ce_weight=0.0, reduction="batchmean", process_group=None,
                 global_batchmean=False, vocab_process_group=None, backend="auto"):
        super().__init__()
        self.alpha, self.beta = check_real("alpha", alpha), check_real("beta", beta)
        self._set_common(temperature, ignore_index, ce_weight, reduction, process_group,
                         global_batchmean, vocab_process_group, backend)

    def forward(self, student_logits, teacher_logits, target=None, *, sample_weight=None,
                mask=None, num_items_in_batch=None):
        return F.dkd_loss(student_logits, teacher_logits, target, alpha=self.alpha,
                          beta=self.beta, sample_weight=sample_weight, mask=mask,
                          num_items_in_batch=num_items_in_batch, **self._options())

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, " + self._common_repr()


class BKDLoss(_DistillationLoss):
    __doc__ = """:func:`ltkd_kernels.bkd_loss` as a module; ``class_weight`` (float ``(V,)``) is a
    buffer. Build it with :func:`ltkd_kernels.class_balanced_weights`.

    ``BKDLoss(class_weight, *, temperature=2.0, ce_weight=0.0, ...common options)``:
    ``l_r = T^2 KL(softmax(z^T_r / T + log w) || softmax(z^S_r / T))``. The paper's loss adds
    the student's cross-entropy: ``ce_weight=1.0`` and a ``target`` in ``forward`` (a target
    alone only drops ``ignore_index`` rows: no cross-entropy is counted twice by accident).
    """ + _COMMON_OPTIONS

    def __init__(self, class_weight: torch.Tensor, *, temperature=2.0, ignore_index=-100,
                 ce_weight=0.0, reduction="batchmean", process_group=None,
                 global_batchmean=False, vocab_process_group=None, backend="auto"):
        super().__init__()
        self._set_class_weight(class_weight)
        self._set_common(temperature, ignore_index, ce_weight, reduction, process_group,
                         global_batchmean, vocab_process_group, backend)

    def forward(self, student_logits, teacher_logits, target=None, *, sample_weight=None,
                mask=None, num_items_in_batch=None):
        return F.bkd_loss(student_logits, teacher_logits, self.class_weight, target=target,
                          sample_weight=sample_weight, mask=mask,
                          num_items_in_batch=num_items_in_batch, **self._options())

    def extra_repr(self) -> str:
        return self._common_repr()


__all__ = ["KDLoss", "LTKDLoss", "DKDLoss", "BKDLoss"]
