"""The grouped-KL custom operators: defined once with ``torch.library``, a kernel per device.

- ``ltkd_kernels::grouped_kl_loss(student, teacher?, ..., <GroupedKLConfig>, backend,
  process_group, vocab_process_group, global_batchmean) -> (loss, state, extras, saved)``:
  the forward of every loss (``states`` + ``finish`` of docs/design.md, with the collectives of
  the distributed modes in between).
- ``ltkd_kernels::grouped_kl_loss_backward(grad_loss, ..., state, extras, saved, ...) -> grad``:
  one kernel, the closed-form gradient with respect to the student logits.
- ``ltkd_kernels::group_logsumexp(logits, groups, num_groups, temperature, backend)``:
  ``(lse, ref(m), log s)``.

The CPU kernel is the C++ extension (``backend="cpu"`` or ``"auto"``) or, under
``TRITON_INTERPRET=1``, the Triton kernels (``backend="triton"``, for testing); the CUDA kernel
is Triton. ``"auto"`` without a usable kernel on the device runs the same operators in plain
torch (:mod:`ltkd_kernels.ops.grouped_kl_torch`). Fake implementations make every operator
traceable by ``torch.compile`` with no graph break; autograd is registered once, here.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor
from torch.utils import _python_dispatch

from . import distributed
from . import grouped_kl_torch
from .config import NUM_EXTRAS, NUM_SLOTS, REDUCE_MEAN, REDUCE_NONE, REDUCE_SUM, GroupedKLConfig

_LIB = torch.library.Library("ltkd_kernels", "DEF")  # noqa: TOR901 - the package's own namespace

_TENSORS = ("student", "teacher", "topk_indices", "topk_logprobs", "groups", "target",
            "class_weight", "mask", "sample_weight", "group_logmass")
_CONFIG_FIELDS = GroupedKLConfig._fields
_NUM_CONFIG = len(_CONFIG_FIELDS)


def _scalar_type(value) -> str:
    if isinstance(value, bool):
        return "bool"
    return "int" if isinstance(value, int) else "float"


_CONFIG_SCHEMA = ", ".join(f"{_scalar_type(default)} {name}" for name, default in
                           zip(_CONFIG_FIELDS, GroupedKLConfig._field_defaults.values()))
_TENSOR_SCHEMA = "Tensor student, " + ", ".join(f"Tensor? {name}" for name in _TENSORS[1:])

_LIB.define(f"grouped_kl_loss({_TENSOR_SCHEMA}, Tensor? num_items_tensor, {_CONFIG_SCHEMA}, "
            "str backend, str process_group, str vocab_process_group, bool global_batchmean) "
            "-> (Tensor, Tensor, Tensor, Tensor)")
_LIB.define(f"grouped_kl_loss_backward(Tensor grad_loss, {_TENSOR_SCHEMA}, Tensor state, "
            f"Tensor extras, Tensor saved, {_CONFIG_SCHEMA}, str backend) -> Tensor")
_LIB.define("group_logsumexp(Tensor logits, Tensor groups, int num_groups, float temperature, "
            "str backend) -> (Tensor, Tensor, Tensor)")


# ---------------------------------------------------------------------------------------------
# Which kernels run a call.

def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_module():
    from ..triton import grouped_kl

    return grouped_kl


def _cpu_module():
    from ..cpu import grouped_kl

    return grouped_kl


# (backend, device type) -> the kernel module, once resolved to a loaded C++ backend or to
# Triton on CUDA (neither changes within a process): the resolution costs tens of microseconds,
# a large part of a call at classification sizes. The interpreter and the reference are not
# cached (the tests switch them).
_RESOLVED = {}


def kernel_module(backend: str, device: torch.device):
    """The module whose ``states``, ``finish``, ``grad`` and ``loss_forward`` run ``backend`` on
    ``device``. Raises ``RuntimeError`` (saying why) for a named backend that cannot run."""
    module = _RESOLVED.get((backend, device.type))
    if module is not None:
        return module
    from ..backends import resolve_backend

    # build=True: a kernel runs next, so a C++ backend that is only buildable is compiled now;
    # "auto" falls back to the plain-torch operators if that fails.
    resolved = resolve_backend(backend, device, build=True)
    if resolved == "triton":
        module = _triton_module()
        if device.type == "cuda":
            _RESOLVED[(backend, device.type)] = module
    elif resolved == "cpu":
        module = _RESOLVED[(backend, device.type)] = _cpu_module()
    else:
        module = grouped_kl_torch
    return module


# ---------------------------------------------------------------------------------------------
# Forward and backward implementations (the same Python function for CPU and CUDA tensors).

def _split(args):
    tensors = args[:len(_TENSORS)]
    num_items = args[len(_TENSORS)]
    cfg = GroupedKLConfig(*args[len(_TENSORS) + 1:len(_TENSORS) + 1 + _NUM_CONFIG])
    rest = args[len(_TENSORS) + 1 + _NUM_CONFIG:]
    return tensors, num_items, cfg, rest


def _loss_impl(*args):
    tensors, num_items, cfg, (backend, process_group, vocab_group, global_batchmean) = _split(args)
    return _forward(tensors, num_items, cfg, backend, process_group, vocab_group, global_batchmean)


def _forward(tensors, num_items, cfg, backend, process_group, vocab_group, global_batchmean):
    """The operator's forward on its arguments in groups: ``(loss, state, extras, saved)``."""
    (student, teacher, topk_indices, topk_logprobs, groups, target, class_weight, mask,
     sample_weight, group_logmass) = tensors
    ops = kernel_module(backend, student.device)
    data_group = distributed.resolve(process_group)
    vocab_group = distributed.resolve(vocab_group)
    if data_group is None and vocab_group is None:
        return ops.loss_forward(student, teacher, topk_indices, topk_logprobs, groups, target,
                                class_weight, mask, sample_weight, group_logmass, num_items, cfg)
    state, extras = ops.states(student, teacher, topk_indices, topk_logprobs, groups, target,
                               class_weight, mask, cfg)
    if vocab_group is not None:
        # Every rank of the vocabulary group now holds the whole vocabulary's states (the
        # same bits everywhere): finish gives each the full loss; the backward is local.
        layout = (cfg.vocab_offset, student.shape[1], cfg.vocab_total) if cfg.vocab_total else None
        state, extras = distributed.merge_vocab_shards(
            state, extras, vocab_group, with_ce=cfg.with_ce, with_target=target is not None,
            layout=layout)
    partials = None
    global_denominator = (global_batchmean and cfg.reduction == REDUCE_MEAN
                          and num_items is None and cfg.num_items <= 0)
    if data_group is not None and (cfg.rebalance or global_denominator):
        own = ops.finish(state, extras, mask, target, sample_weight, group_logmass, None, None,
                         cfg, partial_only=True)
        partials = distributed.gather_partials(own, data_group)
        cfg = cfg._replace(denominator_from_partials=bool(global_batchmean))
    loss, saved = ops.finish(state, extras, mask, target, sample_weight, group_logmass, partials,
                             num_items, cfg)
    return loss, state, extras, saved


def _loss_fake(*args):
    tensors, _, cfg, _ = _split(args)
    student = tensors[0]
    rows = student.shape[0]
    G = cfg.num_groups
    f32 = dict(dtype=torch.float32)
    loss = student.new_empty((rows,) if cfg.reduction == REDUCE_NONE else (), **f32)
    return (loss, student.new_empty((rows, NUM_SLOTS, G), **f32),
            student.new_empty((rows, NUM_EXTRAS), **f32), student.new_empty((G + 1,), **f32))


def _backward_impl(grad_loss, *args):
    tensors = args[:len(_TENSORS)]
    state, extras, saved = args[len(_TENSORS):len(_TENSORS) + 3]
    cfg = GroupedKLConfig(*args[len(_TENSORS) + 3:len(_TENSORS) + 3 + _NUM_CONFIG])
    return _gradient(grad_loss, tensors, state, extras, saved, cfg, args[-1])


def _gradient(grad_loss, tensors, state, extras, saved, cfg, backend):
    """The backward operator on its arguments in groups: the student's gradient."""
    (student, teacher, topk_indices, topk_logprobs, groups, target, class_weight, mask,
     sample_weight, group_logmass) = tensors
    ops = kernel_module(backend, student.device)
    return ops.grad(student, teacher, topk_indices, topk_logprobs, groups, target, class_weight,
                    mask, sample_weight, group_logmass, state, extras, saved, grad_loss, cfg)


def _backward_fake(grad_loss, student, *args):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


for _key in ("CPU", "CUDA"):
    _LIB.impl("grouped_kl_loss", _loss_impl, _key)
    _LIB.impl("grouped_kl_loss_backward", _backward_impl, _key)
torch.library.register_fake("ltkd_kernels::grouped_kl_loss", _loss_fake, lib=_LIB)
torch.library.register_fake("ltkd_kernels::grouped_kl_loss_backward", _backward_fake, lib=_LIB)


def _direct(tensor: Tensor) -> bool:
    """Whether a call can skip the operator's dispatch and run its implementation directly: a
    plain eager call (not traced by ``torch.compile``, no dispatch mode such as a fake-tensor
    or profiling mode, no tensor subclass). Dispatching the ~30 schema arguments of the
    operator costs tens of microseconds per call, the whole loss at classification sizes."""
    return (type(tensor) in _PLAIN_TENSORS and not torch.compiler.is_compiling()
            and _current_dispatch_mode() is None)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_current_dispatch_mode = _python_dispatch._get_current_dispatch_mode


# The C++ backend's KD, BKD and DKD compute the gradient in the forward's pass over the rows when the
# student needs one (ltkd_kernels.cpu.grouped_kl.loss_forward_grad); False (or the environment's
# LTKD_KERNELS_CPU_FUSED_GRAD=0 at import): in the backward, as every other loss and backend.
FUSED_CPU_GRADIENT = os.environ.get("LTKD_KERNELS_CPU_FUSED_GRAD", "1").strip() != "0"


_NOT_TWICE = (b"ltkd_kernels: the gradient of a loss on the 'cpu' or 'triton' backend cannot be "
              b"differentiated again (create_graph=True); use backend='torch' (the reference) "
              b"for second derivatives")


def _not_differentiable_again(grad: Tensor) -> Tensor:
    """``grad`` (a kernel's, not differentiable again), under ``create_graph=True`` with an error
    node as its grad_fn: a backward through it raises instead of treating it as a constant. Eager
    calls only (a traced backward keeps the plain gradient)."""
    if not torch.is_grad_enabled():
        return grad
    return torch._C._functions.DelayedError(_NOT_TWICE, 1)(grad.detach().requires_grad_(True))


class GroupedKLLoss(torch.autograd.Function):
    """The autograd of ``grouped_kl_loss``: forward is the operator, backward the backward
    operator (one kernel). An ``autograd.Function`` rather than ``register_autograd``: the
    latter re-binds the operator's ~30 schema arguments in Python on every call (about 2 ms
    per call in torch 2.13). Its arguments are the eleven tensors and one tuple of the
    constants, and its one output is the loss (the statistics are saved, not returned): each
    argument and output costs autograd time per call, which is most of a call at
    classification sizes. ``torch.compile`` traces it."""

    @staticmethod
    def forward(ctx, student, teacher, topk_indices, topk_logprobs, groups, target,
                class_weight, mask, sample_weight, group_logmass, num_items, constants):
        tensors = (student, teacher, topk_indices, topk_logprobs, groups, target, class_weight,
                   mask, sample_weight, group_logmass)
        cfg, backend, process_group, vocab_group, global_batchmean, wants_grad = constants
        ctx.fused_grad = None
        if _direct(student):
            ops = kernel_module(backend, student.device)
            if (wants_grad and FUSED_CPU_GRADIENT and not process_group
                    and not vocab_group and hasattr(ops, "loss_forward_grad")
                    and ops.fuses_gradient(student, teacher, topk_indices, group_logmass, cfg)):
                # The gradient for the upstream 1 comes with the loss (the backward scales it).
                loss, state, extras, saved, ctx.fused_grad = ops.loss_forward_grad(
                    *tensors, num_items, cfg)
            else:
                loss, state, extras, saved = _forward(tensors, num_items, cfg, backend,
                                                      process_group, vocab_group,
                                                      global_batchmean)
        else:
            loss, state, extras, saved = torch.ops.ltkd_kernels.grouped_kl_loss(
                *tensors, num_items, *cfg, backend, process_group, vocab_group, global_batchmean)
        ctx.save_for_backward(*tensors, state, extras, saved)
        ctx.constants = constants
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        nothing = (None,) * 11
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return (None,) + nothing
        cfg, backend = ctx.constants[0], ctx.constants[1]
        if grad_loss.dim() == 1 and grad_loss.numel() > 1 and grad_loss.stride(0) == 0:
            # The expanded gradient of rows.sum(): the same upstream for every row is the "sum"
            # reduction's backward with one scalar (a view, no copy).
            grad_loss = grad_loss[0]
            cfg = cfg._replace(reduction=REDUCE_SUM)
        elif grad_loss.dim() == 1 and grad_loss.numel() > 1 and grad_loss.stride(0) != 1:
            grad_loss = grad_loss.contiguous()
        fused, ctx.fused_grad = ctx.fused_grad, None
        if fused is not None:
            # Taken once: a second backward (retain_graph) computes the gradient afresh.
            kernel_module(backend, fused.device).scale_grad(fused, grad_loss)
            return (_not_differentiable_again(fused),) + nothing
        saved_tensors = ctx.saved_tensors
        if _direct(grad_loss):
            tensors = saved_tensors[:len(_TENSORS)]
            state, extras, saved = saved_tensors[len(_TENSORS):]
            grad_student = _not_differentiable_again(
                _gradient(grad_loss, tensors, state, extras, saved, cfg, backend))
        else:
            grad_student = torch.ops.ltkd_kernels.grouped_kl_loss_backward(
                grad_loss, *saved_tensors, *cfg, backend)
        return (grad_student,) + nothing


# ---------------------------------------------------------------------------------------------
# group_logsumexp: the student slots of the states, lse_k = ref(m_k) + log s_k.

def _group_logsumexp_impl(logits, groups, num_groups, temperature, backend):
    """``(lse, ref(m), log s)``, each ``(N, G)`` float32: the backward takes the last two
    (``exp((b - ref(m)) - log s)`` is exact to float32 at any ``|lse|``; from the rounded
    ``lse``, ``exp(b - lse)`` is off by ``|lse| * 6e-8`` relative)."""
    from .config import GROUP_CLASS

    ops = kernel_module(backend, logits.device)
    cfg = GroupedKLConfig(num_groups=num_groups, temperature=temperature, group_rule=GROUP_CLASS)
    state, _ = ops.states(logits, None, None, None, groups, None, None, None, cfg)
    reference, log_sum = grouped_kl_torch.ref(state[:, 0]), torch.log(state[:, 1])
    return reference + log_sum, reference, log_sum


def _group_logsumexp_fake(logits, groups, num_groups, temperature, backend):
    return tuple(logits.new_empty((logits.shape[0], num_groups), dtype=torch.float32)
                 for _ in range(3))


for _key in ("CPU", "CUDA"):
    _LIB.impl("group_logsumexp", _group_logsumexp_impl, _key)
torch.library.register_fake("ltkd_kernels::group_logsumexp", _group_logsumexp_fake, lib=_LIB)


class GroupLogSumExp(torch.autograd.Function):
    """``d lse_k / d z_i = pt_i / T`` for ``i`` in group ``k``."""

    @staticmethod
    def forward(ctx, logits, groups, num_groups, temperature, backend):
        lse, reference, log_sum = torch.ops.ltkd_kernels.group_logsumexp(
            logits, groups, num_groups, temperature, backend)
        ctx.save_for_backward(logits, groups, reference, log_sum)
        ctx.mark_non_differentiable(reference, log_sum)
        ctx.set_materialize_grads(False)  # (no zero-filled gradients of those two: launches)
        ctx.temperature = temperature
        return lse, reference, log_sum

    @staticmethod
    def backward(ctx, grad_lse, _grad_reference, _grad_log_sum):
        if grad_lse is None:  # (gradients are not materialized: none reached lse)
            return None, None, None, None, None
        logits, groups, reference, log_sum = ctx.saved_tensors
        index = groups.long().clamp(0, log_sum.shape[1] - 1).unsqueeze(0).expand(logits.shape[0], -1)
        # b as the kernels form it (times 1 / T in float32, not divided by T: 1 ulp apart,
        # which at |z / T| ~ 2e5 moved a one-class group's exp(b - lse) from 1 to 1.016), and
        # taken from the group's reference before its log-sum (b - ref(m) is exact near the
        # maximum: no rounding of lse, of |lse| * 6e-8, enters the probabilities)
        b = logits.float() * (1.0 / ctx.temperature)
        within = torch.exp((b - reference.gather(1, index)) - log_sum.gather(1, index))
        within = torch.where(b == float("-inf"), torch.zeros_like(within), within)
        grad = grad_lse.float().gather(1, index) * within / ctx.temperature
        return grad.to(logits.dtype), None, None, None, None


def grouped_kl_loss(student: Tensor, teacher: Optional[Tensor], topk_indices: Optional[Tensor],
                    topk_logprobs: Optional[Tensor], groups: Optional[Tensor],
                    target: Optional[Tensor], class_weight: Optional[Tensor], mask: Optional[Tensor],
                    sample_weight: Optional[Tensor], group_logmass: Optional[Tensor],
                    num_items: Optional[Tensor], cfg: GroupedKLConfig, backend: str,
                    process_group: str = "", vocab_process_group: str = "",
                    global_batchmean: bool = False) -> Tensor:
    """The loss (float32; ``(N,)`` for ``REDUCE_NONE``), differentiable in ``student``."""
    # Whether autograd will ask for the student's gradient (inside the Function's forward,
    # grad mode is off and needs_input_grad ignores torch.no_grad()).
    wants_grad = student.requires_grad and torch.is_grad_enabled()
    if not process_group and not vocab_process_group and _direct(student):
        ops = kernel_module(backend, student.device)
        native = getattr(ops, "loss_autograd", None)
        if native is not None:
            # The C++ backend's own autograd node (csrc/autograd.cpp): the same kernels as
            # GroupedKLLoss below, without a Python forward and backward around them.
            fused = (wants_grad and FUSED_CPU_GRADIENT
                     and ops.fuses_gradient(student, teacher, topk_indices, group_logmass, cfg))
            return native(student, teacher, topk_indices, topk_logprobs, groups, target,
                          class_weight, mask, sample_weight, group_logmass, num_items, cfg, fused)
    return GroupedKLLoss.apply(
        student, teacher, topk_indices, topk_logprobs, groups, target, class_weight, mask,
        sample_weight, group_logmass, num_items,
        (cfg, backend, process_group, vocab_process_group, global_batchmean, wants_grad))


def group_logsumexp(logits: Tensor, groups: Tensor, num_groups: int, temperature: float,
                    backend: str) -> Tensor:
    return GroupLogSumExp.apply(logits, groups, num_groups, temperature, backend)[0]
