"""The grouped-KL operators of docs/design.md on the C++ CPU backend.

Same signatures and results as :mod:`ltkd_kernels.ops.grouped_kl_torch` (the executable
specification): ``states``, ``finish``, ``grad`` and ``loss_forward`` (``states`` + ``finish``
in one call into the extension). Each function is one call into the extension (counted by
:func:`ltkd_kernels.ops.launches.record` as ``"cpu:<function>"``); inside it, no ATen operator
runs but the allocation of the outputs. The extension is built on first use (see
:mod:`ltkd_kernels.cpu`); these functions raise ``RuntimeError`` when it cannot be.

Inputs as the op layer passes them: logits ``(N, V)`` float32/float16/bfloat16 with unit
stride along V (any row stride); index tensors of any integer dtype; weights of any float
dtype; ``mask`` bool or integer. Bad indices raise ``ValueError`` naming the argument.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops.config import GROUP_ONE, GROUP_TARGET, GroupedKLConfig
from ..ops.launches import add_external_counter, record

__all__ = ["states", "finish", "grad", "loss_forward", "loss_forward_grad", "scale_grad",
           "fuses_gradient", "loss_autograd", "backward_calls"]

# The extension reads the config as a tuple of these fields, in this order.
_FIELDS = ("num_groups", "temperature", "alpha", "beta", "rebalance", "within_teacher",
           "ce_weight", "reduction", "group_rule", "topk_rule", "vocab_offset", "vocab_total",
           "ignore_index", "num_items", "denominator_from_partials")
if GroupedKLConfig._fields != _FIELDS:  # pragma: no cover - a change to ops/config.py
    raise ImportError("ltkd_kernels.cpu.grouped_kl: GroupedKLConfig's fields changed; update the "
                      "extension's parse_config (csrc/bindings.cpp) and _FIELDS")

_ext = None


def _extension():
    global _ext
    if _ext is None:
        from . import extension

        _ext = extension()
    return _ext


def states(student: Optional[Tensor], teacher: Optional[Tensor], topk_indices: Optional[Tensor],
           topk_logprobs: Optional[Tensor], groups: Optional[Tensor], target: Optional[Tensor],
           class_weight: Optional[Tensor], mask: Optional[Tensor],
           cfg: GroupedKLConfig) -> Tuple[Tensor, Tensor]:
    """Op 1: ``(state (N, 5, G), extras (N, 4))``, float32."""
    ext = _ext or _extension()
    record("cpu:states")
    return ext.grouped_kl_states(student, teacher, topk_indices, topk_logprobs, groups, target,
                                 class_weight, mask, cfg)


def finish(state: Tensor, extras: Tensor, mask: Optional[Tensor], target: Optional[Tensor],
           sample_weight: Optional[Tensor], group_logmass: Optional[Tensor],
           batch_partials: Optional[Tensor], num_items: Optional[Tensor],
           cfg: GroupedKLConfig, partial_only: bool = False):
    """Op 2: ``(loss, saved (G + 1,))``, or with ``partial_only`` the ``(2G + 2,)`` partial."""
    ext = _ext or _extension()
    record("cpu:finish")
    if partial_only:
        return ext.grouped_kl_partial(state, extras, mask, target, sample_weight, group_logmass,
                                      cfg)
    return ext.grouped_kl_finish(state, extras, mask, target, sample_weight, group_logmass,
                                 batch_partials, num_items, cfg)


def grad(student: Tensor, teacher: Optional[Tensor], topk_indices: Optional[Tensor],
         topk_logprobs: Optional[Tensor], groups: Optional[Tensor], target: Optional[Tensor],
         class_weight: Optional[Tensor], mask: Optional[Tensor], sample_weight: Optional[Tensor],
         group_logmass: Optional[Tensor], state: Tensor, extras: Tensor, saved: Tensor,
         grad_loss: Tensor, cfg: GroupedKLConfig) -> Tensor:
    """Op 3: the gradient with respect to ``student``, ``(N, V)`` contiguous, its dtype."""
    ext = _ext or _extension()
    record("cpu:grad")
    return ext.grouped_kl_grad(student, teacher, topk_indices, topk_logprobs, groups, target,
                               class_weight, mask, sample_weight, group_logmass, state, extras,
                               saved, grad_loss, cfg)


def loss_forward(student: Tensor, teacher: Optional[Tensor], topk_indices: Optional[Tensor],
                 topk_logprobs: Optional[Tensor], groups: Optional[Tensor],
                 target: Optional[Tensor], class_weight: Optional[Tensor],
                 mask: Optional[Tensor], sample_weight: Optional[Tensor],
                 group_logmass: Optional[Tensor], num_items: Optional[Tensor],
                 cfg: GroupedKLConfig):
    """``states`` then ``finish`` in one call: ``(loss, state, extras, saved)``."""
    ext = _ext or _extension()
    record("cpu:loss_forward")
    return ext.grouped_kl_loss_forward(student, teacher, topk_indices, topk_logprobs, groups,
                                       target, class_weight, mask, sample_weight, group_logmass,
                                       num_items, cfg)


def fuses_gradient(student: Tensor, teacher: Optional[Tensor], topk_indices: Optional[Tensor],
                   group_logmass: Optional[Tensor], cfg: GroupedKLConfig) -> bool:
    """Whether :func:`loss_forward_grad` computes the gradient with the loss: the one-group rule
    (KD, BKD) or the TARGET rule without rebalancing (DKD), a dense teacher, a float32 student,
    no sharded vocabulary (the extension decides the rest: the vectorised kernels, not the
    forced scalar ones)."""
    rule_ok = ((cfg.group_rule == GROUP_ONE and cfg.num_groups == 1)
               or (cfg.group_rule == GROUP_TARGET and cfg.num_groups == 2 and not cfg.rebalance))
    return (rule_ok and teacher is not None and topk_indices is None and group_logmass is None
            and cfg.vocab_total == 0 and student.dtype == torch.float32)


def loss_forward_grad(student: Tensor, teacher: Optional[Tensor], topk_indices: Optional[Tensor],
                      topk_logprobs: Optional[Tensor], groups: Optional[Tensor],
                      target: Optional[Tensor], class_weight: Optional[Tensor],
                      mask: Optional[Tensor], sample_weight: Optional[Tensor],
                      group_logmass: Optional[Tensor], num_items: Optional[Tensor],
                      cfg: GroupedKLConfig):
    """``states``, ``finish`` and ``grad`` for the upstream gradient 1, in one pass over the rows:
    ``(loss, state, extras, saved, grad)``, ``grad`` None where the pass does not apply (see
    :func:`fuses_gradient`; csrc/grouped_kl_grad.cpp). The gradient rows are written from the
    exps of the states walk while the row is in cache: no second read of the logits, no exp."""
    ext = _ext or _extension()
    record("cpu:loss_forward_grad")
    return ext.grouped_kl_loss_forward_grad(student, teacher, topk_indices, topk_logprobs, groups,
                                            target, class_weight, mask, sample_weight,
                                            group_logmass, num_items, cfg)


def loss_autograd(student: Tensor, teacher: Optional[Tensor], topk_indices: Optional[Tensor],
                  topk_logprobs: Optional[Tensor], groups: Optional[Tensor],
                  target: Optional[Tensor], class_weight: Optional[Tensor],
                  mask: Optional[Tensor], sample_weight: Optional[Tensor],
                  group_logmass: Optional[Tensor], num_items: Optional[Tensor],
                  cfg: GroupedKLConfig, fused: bool) -> Tensor:
    """The loss with its autograd node in C++ (csrc/autograd.cpp): the forward is
    :func:`loss_forward_grad` (``fused``; :func:`fuses_gradient`) or :func:`loss_forward`, the
    backward :func:`scale_grad` of that gradient or :func:`grad`, run by the autograd engine
    without Python (counted by :func:`backward_calls`)."""
    ext = _ext or _extension()
    record("cpu:loss_forward_grad" if fused else "cpu:loss_forward")
    return ext.grouped_kl_loss_autograd(student, teacher, topk_indices, topk_logprobs, groups,
                                        target, class_weight, mask, sample_weight, group_logmass,
                                        num_items, cfg, fused)


def backward_calls() -> dict:
    """The calls the C++ backward node made since the process started, as launch names (read
    by :func:`ltkd_kernels.ops.launches.counting`; zeros before the extension is loaded)."""
    if _ext is None:
        return {}
    scales, grads = _ext.grouped_kl_backward_calls()
    return {"cpu:scale_grad": scales, "cpu:grad": grads}


def scale_grad(grad: Tensor, grad_loss: Tensor) -> None:
    """``grad *= grad_loss`` in place (one value, or one per row); nothing for the value 1."""
    ext = _ext or _extension()
    record("cpu:scale_grad")
    ext.grouped_kl_scale_grad(grad, grad_loss)


add_external_counter(backward_calls)
