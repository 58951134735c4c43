"""``nn.Module`` wrappers: options in ``__init__``, tensors in ``forward``, groups and class
weights held as buffers (so ``.to(device)`` moves them and their range check runs once)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as F


class KDLoss(nn.Module):
    """:func:`ltkd_kernels.kd_loss` as a module."""

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean", backend: str = "auto"):
        super().__init__()
        self.temperature, self.reduction, self.backend = temperature, reduction, backend

    def forward(self, student_logits, teacher_logits, *, sample_weight=None, mask=None):
        return F.kd_loss(student_logits, teacher_logits, temperature=self.temperature,
                         sample_weight=sample_weight, mask=mask, reduction=self.reduction,
                         backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, backend={self.backend!r}"


class LTKDLoss(nn.Module):
    """:func:`ltkd_kernels.ltkd_loss` as a module; ``groups`` (int ``(V,)``) is a buffer.

    Example::

        groups = lk.groups_from_counts(train_class_counts, num_groups=3)
        criterion = lk.LTKDLoss(groups, temperature=4.0)
        loss = ce + criterion(student_logits, teacher_logits)
    """

    def __init__(self, groups: torch.Tensor, num_groups: Optional[int] = None, *, alpha=1.0,
                 beta=1.0, temperature=1.0, rebalance=True, within_weight="uniform",
                 reduction="batchmean", process_group=None, backend="auto"):
        super().__init__()
        groups = torch.as_tensor(groups)
        if groups.is_floating_point() or groups.dim() != 1:
            raise ValueError(f"groups must be a 1-D integer tensor, got {groups.dtype} "
                             f"of shape {tuple(groups.shape)}")
        self.register_buffer("groups", groups.long().clone())
        self.num_groups = int(groups.max()) + 1 if num_groups is None else num_groups
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.rebalance, self.within_weight = rebalance, within_weight
        self.reduction, self.process_group, self.backend = reduction, process_group, backend

    def forward(self, student_logits, teacher_logits, *, sample_weight=None, mask=None):
        return F.ltkd_loss(student_logits, teacher_logits, self.groups, self.num_groups,
                           alpha=self.alpha, beta=self.beta, temperature=self.temperature,
                           rebalance=self.rebalance, within_weight=self.within_weight,
                           sample_weight=sample_weight, mask=mask, reduction=self.reduction,
                           process_group=self.process_group, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_groups={self.num_groups}, alpha={self.alpha}, beta={self.beta}, "
                f"temperature={self.temperature}, rebalance={self.rebalance}, "
                f"within_weight={self.within_weight!r}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")


class DKDLoss(nn.Module):
    """:func:`ltkd_kernels.dkd_loss` as a module (defaults ``alpha=1, beta=8, T=4``)."""

    def __init__(self, alpha=1.0, beta=8.0, temperature=4.0, reduction="batchmean", backend="auto"):
        super().__init__()
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.reduction, self.backend = reduction, backend

    def forward(self, student_logits, teacher_logits, target, *, sample_weight=None, mask=None):
        return F.dkd_loss(student_logits, teacher_logits, target, alpha=self.alpha, beta=self.beta,
                          temperature=self.temperature, sample_weight=sample_weight, mask=mask,
                          reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


class BKDLoss(nn.Module):
    """:func:`ltkd_kernels.bkd_loss` as a module; ``class_weight`` (float ``(V,)``) is a buffer.

    Build the weights with :func:`ltkd_kernels.class_balanced_weights`. ``forward``'s
    ``target``, when given, adds the cross-entropy of the student (computed in the same pass).
    """

    def __init__(self, class_weight: torch.Tensor, temperature=2.0, reduction="batchmean",
                 backend="auto"):
        super().__init__()
        class_weight = torch.as_tensor(class_weight)
        if not class_weight.is_floating_point() or class_weight.dim() != 1:
            raise ValueError(f"class_weight must be a 1-D float tensor, got {class_weight.dtype} "
                             f"of shape {tuple(class_weight.shape)}")
        self.register_buffer("class_weight", class_weight.float().clone())
        self.temperature, self.reduction, self.backend = temperature, reduction, backend

    def forward(self, student_logits, teacher_logits, target=None, *, sample_weight=None, mask=None):
        return F.bkd_loss(student_logits, teacher_logits, self.class_weight,
                          temperature=self.temperature, target=target, sample_weight=sample_weight,
                          mask=mask, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, backend={self.backend!r}"
