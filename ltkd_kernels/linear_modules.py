"""``nn.Module`` wrappers of the fused-linear losses (:mod:`ltkd_kernels.linear`): options in
``__init__`` (keyword-only, validated there), tensors in ``forward``; groups and class weights
are buffers. The heads' weights are passed to ``forward`` (they belong to the models)::

    criterion = FusedLinearLTKDLoss(groups, temperature=2.0)
    loss = criterion(student_hidden, student.lm_head.weight, teacher_hidden,
                     teacher.lm_head.weight, target=labels)
"""
from __future__ import annotations

from typing import Optional

import torch

from . import linear as L
from ._validation import check_chunk_size, check_real
from .modules import _DistillationLoss

_FORWARD = """
    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight=None, target=None,
    *, student_bias=None, teacher_bias=None, sample_weight=None, mask=None,
    num_items_in_batch=None)``: hidden states ``(..., H)`` and ``(..., H_T)``, weights
    ``(V, H)`` and ``(V, H_T)`` as ``nn.Linear`` stores them (the teacher may instead be a
    :class:`ltkd_kernels.TopKTeacher` with ``teacher_weight=None``); ``target`` int of the
    leading shape (``ignore_index`` rows are masked). Returns a float32 loss; the student's
    hidden states, weight and bias get gradients, the teacher is constant.

    Options (keyword-only) as in the logits modules, without ``vocab_process_group``, plus
    ``chunk_size`` (rows per chunk, ``None``: the rule of :mod:`ltkd_kernels.linear`).
    ``ce_weight`` defaults to 0.0: no cross-entropy is added unless asked for.
    """


class _FusedLinearLoss(_DistillationLoss):
    def _set_fused(self, temperature, ignore_index, ce_weight, reduction, process_group,
                   global_batchmean, chunk_size, backend):
        self._set_common(temperature, ignore_index, ce_weight, reduction, process_group,
                         global_batchmean, None, backend)
        self.chunk_size = check_chunk_size(chunk_size)

    def _options(self):
        options = super()._options()
        options.pop("vocab_process_group")
        options["chunk_size"] = self.chunk_size
        return options

    def _common_repr(self) -> str:
        text = super()._common_repr()
        return text + (f", chunk_size={self.chunk_size}" if self.chunk_size else "")


class FusedLinearKDLoss(_FusedLinearLoss):
    __doc__ = """:func:`ltkd_kernels.fused_linear_kd_loss` as a module.

    ``FusedLinearKDLoss(*, temperature=1.0, ignore_index=-100, ce_weight=0.0,
    reduction="batchmean", process_group=None, global_batchmean=False, chunk_size=None,
    backend="auto")``
    """ + _FORWARD

    def __init__(self, *, temperature=1.0, ignore_index=-100, ce_weight=0.0,
                 reduction="batchmean", process_group=None, global_batchmean=False,
                 chunk_size=None, backend="auto"):
        super().__init__()
        self._set_fused(temperature, ignore_index, ce_weight, reduction, process_group,
                        global_batchmean, chunk_size, backend)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight=None,
                target=None, *, student_bias=None, teacher_bias=None, sample_weight=None,
                mask=None, num_items_in_batch=None):
        return L.fused_linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight,
            student_bias=student_bias, teacher_bias=teacher_bias, target=target,
            sample_weight=sample_weight, mask=mask, num_items_in_batch=num_items_in_batch,
            **self._options())

    def extra_repr(self) -> str:
        return self._common_repr()


class FusedLinearLTKDLoss(_FusedLinearLoss):
    __doc__ = """:func:`ltkd_kernels.fused_linear_ltkd_loss` as a module; ``groups`` (int
    ``(V,)``) is a buffer.

    ``FusedLinearLTKDLoss(groups, num_groups=None, *, alpha=1.0, beta=1.0, temperature=1.0,
    rebalance=True, within_weight="uniform", ...common options)``
    """ + _FORWARD

    def __init__(self, groups: torch.Tensor, num_groups: Optional[int] = None, *, alpha=1.0,
                 beta=1.0, temperature=1.0, rebalance=True, within_weight="uniform",
                 ignore_index=-100, ce_weight=0.0, reduction="batchmean", process_group=None,
                 global_batchmean=False, chunk_size=None, backend="auto"):
        super().__init__()
        self._set_ltkd_constants(groups, num_groups, alpha, beta, rebalance, within_weight)
        self._set_fused(temperature, ignore_index, ce_weight, reduction, process_group,
                        global_batchmean, chunk_size, backend)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight=None,
                target=None, *, student_bias=None, teacher_bias=None, sample_weight=None,
                mask=None, num_items_in_batch=None):
        return L.fused_linear_ltkd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, self.groups,
            self.num_groups, student_bias=student_bias, teacher_bias=teacher_bias,
            alpha=self.alpha, beta=self.beta, rebalance=self.rebalance,
            within_weight=self.within_weight, target=target, sample_weight=sample_weight,
            mask=mask, num_items_in_batch=num_items_in_batch, **self._options())

    extra_repr = _DistillationLoss._ltkd_repr


class FusedLinearDKDLoss(_FusedLinearLoss):
    __doc__ = """:func:`ltkd_kernels.fused_linear_dkd_loss` as a module (``forward`` needs
    ``target``).

    ``FusedLinearDKDLoss(*, alpha=1.0, beta=8.0, temperature=4.0, ...common options)``
    """ + _FORWARD

    def __init__(self, *, alpha=1.0, beta=8.0, temperature=4.0, ignore_index=-100,
                 ce_weight=0.0, reduction="batchmean", process_group=None,
                 global_batchmean=False, chunk_size=None, backend="auto"):
        super().__init__()
        self.alpha, self.beta = check_real("alpha", alpha), check_real("beta", beta)
        self._set_fused(temperature, ignore_index, ce_weight, reduction, process_group,
                        global_batchmean, chunk_size, backend)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight=None,
                target=None, *, student_bias=None, teacher_bias=None, sample_weight=None,
                mask=None, num_items_in_batch=None):
        return L.fused_linear_dkd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, target,
            student_bias=student_bias, teacher_bias=teacher_bias, alpha=self.alpha,
            beta=self.beta, sample_weight=sample_weight, mask=mask,
            num_items_in_batch=num_items_in_batch, **self._options())

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, " + self._common_repr()


class FusedLinearBKDLoss(_FusedLinearLoss):
    __doc__ = """:func:`ltkd_kernels.fused_linear_bkd_loss` as a module; ``class_weight``
    (float ``(V,)``) is a buffer.

    ``FusedLinearBKDLoss(class_weight, *, temperature=2.0, ce_weight=0.0, ...common options)``
    """ + _FORWARD

    def __init__(self, class_weight: torch.Tensor, *, temperature=2.0, ignore_index=-100,
                 ce_weight=0.0, reduction="batchmean", process_group=None,
                 global_batchmean=False, chunk_size=None, backend="auto"):
        super().__init__()
        self._set_class_weight(class_weight)
        self._set_fused(temperature, ignore_index, ce_weight, reduction, process_group,
                        global_batchmean, chunk_size, backend)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight=None,
                target=None, *, student_bias=None, teacher_bias=None, sample_weight=None,
                mask=None, num_items_in_batch=None):
        return L.fused_linear_bkd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, self.class_weight,
            student_bias=student_bias, teacher_bias=teacher_bias, target=target,
            sample_weight=sample_weight, mask=mask, num_items_in_batch=num_items_in_batch,
            **self._options())

    def extra_repr(self) -> str:
        return self._common_repr()


__all__ = ["FusedLinearKDLoss", "FusedLinearLTKDLoss", "FusedLinearDKDLoss", "FusedLinearBKDLoss"]
