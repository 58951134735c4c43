"""One validation and dispatch entry point for every loss: :func:`parse_loss_arguments`.

The functional API, the modules and the reference all call it once per call; it checks every
argument (clear ``TypeError``/``ValueError`` naming it), decides whether the kernels or the
reference run the call, and returns the arguments flattened to rows, ready for either.

One float64 rule everywhere: the reference accepts float64 logits (and ``backend="auto"``
sends them to it); a named kernel backend given float64 raises, saying why.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._validation import (
    LOGIT_DTYPES,
    _INTEGER_DTYPES,
    _dtype_name,
    check_bool,
    check_class_weight,
    check_groups,
    check_int,
    check_num_groups,
    check_num_items,
    check_option,
    check_positive,
    check_real,
    check_row_tensor,
    check_target,
    check_tensor,
)
from .ops import class_order
from .ops.config import (
    GROUP_CLASS,
    GROUP_ONE,
    GROUP_TARGET,
    REDUCTIONS,
    TEACHER_DENSE,
    TOPK_RULES,
)
from .ops.distributed import group_name
from .topk import REST_RULES, TopKTeacher, repeated_in_row

BACKENDS = ("auto", "triton", "cpu", "torch")
_KERNEL_DEVICES = ("cpu", "cuda")


class LossArguments(NamedTuple):
    """Validated arguments of one loss call, flattened to ``N`` rows."""

    loss: str                         # "kd", "ltkd", "dkd", "bkd"
    leading: torch.Size               # the logits' leading shape (for reduction="none")
    student: Tensor                   # (N, V), unit stride along V
    teacher: Optional[Tensor]         # (N, V) dense teacher logits, detached
    topk_indices: Optional[Tensor]    # (N, k)
    topk_logprobs: Optional[Tensor]   # (N, k), detached
    rest: str                         # top-k rest rule
    group_logmass: Optional[Tensor]   # (N, G), detached
    groups: Optional[Tensor]          # (V,)
    num_groups: int
    group_rule: int
    class_weight: Optional[Tensor]    # (V,), detached
    target: Optional[Tensor]          # (N,)
    mask: Optional[Tensor]            # (N,) bool or integer
    sample_weight: Optional[Tensor]   # (N,), detached
    alpha: float
    beta: float
    temperature: float
    rebalance: bool
    within_teacher: bool
    ce_weight: float
    reduction: str
    ignore_index: int
    num_items: float                  # > 0 when given as a number
    num_items_tensor: Optional[Tensor]
    process_group: object
    global_batchmean: bool
    vocab_process_group: object
    backend: str                      # "torch" (the reference) or a kernel backend / "auto"


def _rows(x: Tensor) -> Tensor:
    """``(..., V)`` as ``(N, V)`` rows with unit stride along V (copied only if it must be).
    A 2-D tensor is used as it is: a reshape would still be a view op and, for a student that
    requires grad, one more autograd node per step."""
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def _flat(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else (x if x.dim() == 1 else x.reshape(-1))


def check_student(student_logits) -> None:
    check_tensor("student_logits", student_logits)
    allowed = LOGIT_DTYPES + (torch.float64,)
    if student_logits.dtype not in allowed:
        raise TypeError(f"student_logits must have dtype in {[_dtype_name(d) for d in allowed]}, "
                        f"got {_dtype_name(student_logits.dtype)}")
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ValueError(f"student_logits must have shape (..., V) with V >= 1, "
                         f"got {tuple(student_logits.shape)}")


def _check_dense_teacher(teacher: Tensor, student: Tensor) -> None:
    allowed = LOGIT_DTYPES + (torch.float64,)
    if teacher.dtype not in allowed:
        raise TypeError(f"teacher_logits must have dtype in {[_dtype_name(d) for d in allowed]}, "
                        f"got {_dtype_name(teacher.dtype)}")
    if teacher.shape != student.shape:
        raise ValueError(f"student_logits and teacher_logits must have the same shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"student_logits and teacher_logits must be on the same device, got "
                         f"{student.device} and {teacher.device}")


def _check_topk_teacher(teacher: TopKTeacher, student: Tensor, loss: str, temperature: float,
                        num_groups: Optional[int]) -> None:
    indices, logprobs, rest, group_logmass = teacher
    leading = tuple(student.shape[:-1])
    check_tensor("teacher_logits.indices", indices)
    check_tensor("teacher_logits.logprobs", logprobs)
    if indices.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"teacher_logits.indices must be an integer tensor, got {_dtype_name(indices.dtype)}")
    if not logprobs.is_floating_point():
        raise TypeError(f"teacher_logits.logprobs must be a float tensor, got {_dtype_name(logprobs.dtype)}")
    if indices.dim() < 1 or tuple(indices.shape[:-1]) != leading or indices.shape[-1] < 1:
        raise ValueError(f"teacher_logits.indices must have shape (..., k) with the student's "
                         f"leading shape {leading} and k >= 1, got {tuple(indices.shape)}")
    if logprobs.shape != indices.shape:
        raise ValueError(f"teacher_logits.logprobs must have the shape of its indices "
                         f"{tuple(indices.shape)}, got {tuple(logprobs.shape)}")
    for name, t in (("indices", indices), ("logprobs", logprobs)):
        if t.device != student.device:
            raise ValueError(f"teacher_logits.{name} must be on the student's device "
                             f"{student.device}, got {t.device}")
    check_option("teacher_logits.rest", rest, REST_RULES)
    if rest == "bucket":
        if loss != "kd":
            raise ValueError(f"teacher_logits.rest='bucket' is defined for kd_loss only, "
                             f"not {loss}_loss")
        if temperature != 1.0:
            raise ValueError("teacher_logits.rest='bucket' needs temperature=1.0: the rest "
                             "mass cannot be re-tempered without the teacher's full normaliser")
    if group_logmass is not None:
        check_tensor("teacher_logits.group_logmass", group_logmass)
        if loss != "ltkd":
            raise ValueError(f"teacher_logits.group_logmass is for ltkd_loss, not {loss}_loss")
        if rest == "restrict":
            raise ValueError("teacher_logits.group_logmass cannot be combined with rest='restrict'")
        if not group_logmass.is_floating_point():
            raise TypeError("teacher_logits.group_logmass must be a float tensor")
        if group_logmass.device != student.device:
            raise ValueError(f"teacher_logits.group_logmass must be on the student's device "
                             f"{student.device}, got {group_logmass.device}")
        if group_logmass.dim() < 1 or tuple(group_logmass.shape[:-1]) != leading or (
                num_groups is not None and group_logmass.shape[-1] != num_groups):
            raise ValueError(f"teacher_logits.group_logmass must have shape (..., G) with the "
                             f"student's leading shape {leading}, got {tuple(group_logmass.shape)}")


def check_topk_values(indices: Tensor, vocab: int) -> None:
    """Every top-k index in ``[-1, V)`` and no class twice in a row (a host read: used by the
    reference; the kernels apply their own rule without a host synchronisation)."""
    if indices.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(indices.long()))
    if lo < -1 or hi >= vocab:
        raise ValueError(f"teacher_logits.indices must lie in [-1, V={vocab}) (-1 pads), "
                         f"got values in [{lo}, {hi}]")
    if bool(repeated_in_row(indices.reshape(-1, indices.shape[-1])).any()):
        raise ValueError("teacher_logits.indices must not repeat a class within a row")


def _use_reference(backend: str, student: Tensor, teacher_dtype) -> bool:
    float64 = torch.float64 in (student.dtype, teacher_dtype)
    if backend == "torch":
        return True
    if backend == "auto":
        return float64 or student.device.type not in _KERNEL_DEVICES
    if float64:
        raise TypeError(f"float64 logits are supported by backend='torch' (or 'auto') only: the "
                        f"kernels compute in float32; got backend={backend!r}")
    return False


def parse_loss_arguments(loss: str, student_logits, teacher_logits, *, groups=None,
                         num_groups=None, class_weight=None, target=None, alpha=1.0, beta=1.0,
                         temperature=1.0, rebalance=False, within_weight="uniform",
                         ce_weight=0.0, ignore_index=-100, sample_weight=None, mask=None,
                         reduction="batchmean", num_items_in_batch=None, process_group=None,
                         global_batchmean=False, vocab_process_group=None, backend="auto",
                         reference=False) -> LossArguments:
    """Validate one loss call (``reference=True``: every value check runs, as the reference
    always does; else constants are value-checked once per tensor and per-step indices are left
    to the kernels' documented rule). Returns :class:`LossArguments`."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    check_student(student_logits)
    temperature = check_positive("temperature", temperature)
    num_groups = check_num_groups(num_groups)
    topk = isinstance(teacher_logits, TopKTeacher)
    if topk:
        _check_topk_teacher(teacher_logits, student_logits, loss, temperature, num_groups)
        teacher_dtype = teacher_logits.logprobs.dtype
    else:
        check_tensor("teacher_logits", teacher_logits)
        _check_dense_teacher(teacher_logits, student_logits)
        teacher_dtype = teacher_logits.dtype
    use_reference = reference or _use_reference(backend, student_logits, teacher_dtype)
    check_option("reduction", reduction, tuple(REDUCTIONS))
    alpha, beta = check_real("alpha", alpha), check_real("beta", beta)
    ce_weight = check_real("ce_weight", ce_weight)
    ignore_index = check_int("ignore_index", ignore_index)
    rebalance = check_bool("rebalance", rebalance)
    global_batchmean = check_bool("global_batchmean", global_batchmean)
    check_option("within_weight", within_weight, ("uniform", "teacher"))
    leading = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    device = student_logits.device
    if loss == "dkd" and target is None:
        raise ValueError("dkd_loss needs target (the class of each row)")
    if ce_weight != 0.0 and target is None:
        raise ValueError("ce_weight != 0 needs target (the labels of the cross-entropy)")
    if target is not None:
        check_target("target", target, leading, vocab, device, ignore_index=ignore_index,
                     values=use_reference and vocab_process_group is None)
    check_row_tensor("sample_weight", sample_weight, leading, device, floating=True)
    check_row_tensor("mask", mask, leading, device, boolean=True)
    num_items, num_items_tensor = check_num_items(num_items_in_batch, device)
    if loss == "ltkd":
        if vocab_process_group is not None and num_groups is None:
            # Each rank sees its own slice of groups: G inferred from it could differ by rank.
            raise ValueError("num_groups must be given with vocab_process_group (a rank's slice "
                             "of groups need not hold the largest group id)")
        num_groups = check_groups(groups, vocab, num_groups, device, always=use_reference)
        group_rule = GROUP_CLASS
        if not use_reference:
            # Where the values were just checked (once per distinct tensor): the class order
            # the Triton walk may take with many groups (ltkd_kernels/ops/class_order.py).
            class_order.remember_for_triton(groups, num_groups, backend)
    elif loss == "dkd":
        num_groups, group_rule = 2, GROUP_TARGET
    else:
        num_groups, group_rule = 1, GROUP_ONE
    if class_weight is not None:
        class_weight = check_class_weight(class_weight, vocab, device, always=use_reference)
    if topk and teacher_logits.group_logmass is not None and teacher_logits.group_logmass.shape[-1] != num_groups:
        raise ValueError(f"teacher_logits.group_logmass must have G = {num_groups} groups, "
                         f"got {teacher_logits.group_logmass.shape[-1]}")
    if topk and use_reference:
        check_topk_values(teacher_logits.indices, vocab)
    if topk and vocab_process_group is not None:
        raise ValueError("a TopKTeacher cannot be combined with vocab_process_group (its "
                         "indices are global classes); gather the student's logits instead")
    if use_reference:
        # The reference takes the process groups themselves; check their type here.
        group_name(process_group, "process_group")
        group_name(vocab_process_group, "vocab_process_group")
    student = _rows(student_logits)
    if topk:
        k = teacher_logits.indices.shape[-1]
        teacher, rest = None, teacher_logits.rest
        topk_indices = teacher_logits.indices.reshape(-1, k)
        topk_logprobs = _rows(teacher_logits.logprobs.detach())
        group_logmass = teacher_logits.group_logmass
        if group_logmass is not None:
            group_logmass = group_logmass.detach().reshape(-1, num_groups)
        if topk_indices.stride(-1) != 1:
            topk_indices = topk_indices.contiguous()
    else:
        # (detach only what autograd tracks: detach is itself a dispatched op)
        teacher = teacher_logits.detach() if teacher_logits.requires_grad else teacher_logits
        teacher, rest = _rows(teacher), "renormalize"
        topk_indices = topk_logprobs = group_logmass = None
    return LossArguments(
        loss, leading, student, teacher, topk_indices, topk_logprobs, rest, group_logmass,
        None if groups is None else (groups if groups.is_contiguous() else groups.contiguous()),
        num_groups, group_rule,
        None if class_weight is None else (class_weight if class_weight.is_contiguous() else class_weight.contiguous()),
        _flat(target), _flat(mask), None if sample_weight is None else sample_weight.detach().reshape(-1),
        alpha, beta, temperature, rebalance, within_weight == "teacher", ce_weight, reduction,
        ignore_index, num_items, num_items_tensor, process_group, global_batchmean,
        vocab_process_group, "torch" if use_reference else backend)


def topk_rule(args: LossArguments) -> int:
    return TEACHER_DENSE if args.teacher is not None else TOPK_RULES[args.rest]


__all__ = ["LossArguments", "parse_loss_arguments", "check_student", "check_topk_values",
           "topk_rule", "BACKENDS"]
