"""The losses straight from hidden states and LM-head weights: never the ``N x V`` logits.

Language models distil through their output layer: ``logits = hidden @ W.T + b`` with ``V`` in
the tens or hundreds of thousands, so the two models' logits, their softmaxes and the logits'
gradient are each ``N x V`` (8192 tokens x 128256 classes in float32: 4.2 GB apiece). The
functions here take the hidden states and the heads' weights instead and compute, chunk of rows
by chunk of rows, the logits in float32, the chunk's loss with this package's operators (the
grouped-KL ``states``, ``finish`` and ``grad`` of docs/design.md, on the chosen backend) and
the chunk's logits gradient, which is turned at once into ``dX = dZ W`` and ``dW += dZ^T X``
and never kept::

    fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, ...)
    fused_linear_ltkd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                           groups, num_groups=None, ...)
    fused_linear_dkd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                          target, ...)
    fused_linear_bkd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                          class_weight, ...)

equal (loss and gradients, to float32 rounding) to ``logits = hidden @ W.T + b`` followed by
the logits loss of the same name (:mod:`ltkd_kernels.functional`), with every option of it but
``vocab_process_group``.

Inputs
------
- ``student_hidden``: ``(..., H)``; ``student_weight``: ``(V, H)`` as ``nn.Linear`` stores it
  (float32, bfloat16, float16; float64 runs the reference; two different dtypes are promoted,
  e.g. bf16 activations with an fp32 master weight compute in fp32); ``student_bias``:
  optional ``(V,)``. They get gradients (in their own dtypes).
- ``teacher_hidden``: ``(..., H_T)`` with the student's leading shape (``H_T`` may differ from
  ``H``) and ``teacher_weight`` ``(V, H_T)``, ``teacher_bias`` optional ``(V,)``: constants (no
  gradient, whatever their ``requires_grad``). Or ``teacher_hidden`` is a
  :class:`ltkd_kernels.TopKTeacher` (an offline top-k teacher, ``(..., k)`` entries) and
  ``teacher_weight`` is ``None``: both paths take the teacher in the same argument, and the
  top-k teacher costs no teacher matmul at all.
- ``target``: int of the leading shape. Rows whose target equals ``ignore_index`` (default
  -100, the Hugging Face convention for padding and prompt tokens) are masked: loss 0, no
  gradient, no part in LTKD's batch statistic or in the ``batchmean`` denominator.
  ``ce_weight`` (default 0.0: **no** cross-entropy is added) adds ``ce_weight`` times the
  student's hard-label cross-entropy with ``target`` (T = 1), computed in the same pass.
- ``sample_weight``, ``mask``, ``reduction``, ``num_items_in_batch``, ``process_group``,
  ``global_batchmean``, ``backend``, ``temperature``, ``alpha``, ``beta``, ``rebalance``,
  ``within_weight``: as in :mod:`ltkd_kernels.functional`. ``backend="torch"`` is the
  reference: it computes the whole logits (float32, float64 for float64 inputs) and calls the
  reference loss (``N x V`` memory; for testing).
- ``chunk_size``: rows per chunk, any ``int >= 1``; ``None`` picks (see below).

Passes and matmuls (one "matmul" is ``2 N V H`` flops for the student, ``2 N V H_T`` for the
teacher; eager is four: teacher forward, student forward, ``dX``, ``dW``):

=================================================  ==================  =====================
loss                                               forward             backward
=================================================  ==================  =====================
KD, DKD, BKD, LTKD ``rebalance=False``             4: T, S, dX, dW     0 (scales by the
(``reduction`` ``"sum"`` or ``"batchmean"``)                           upstream scalar)
LTKD ``rebalance=True``                            5: T (teacher-only  0
                                                   pass), T, S, dX, dW
``reduction="none"``, weight or bias trainable     2 (3 with LTKD's    4: T, S, dX, dW
                                                   teacher pass)       (recomputed)
``reduction="none"``, only the hidden trainable    3: T, S, dX (+1)    0 (scales by rows)
a :class:`TopKTeacher`                             the same, minus every T
no gradient needed (``torch.no_grad``, frozen)     T, S (+1 T)         -
=================================================  ==================  =====================

- LTKD's batch statistic ``pB`` needs every row's teacher group masses before any row's loss
  or gradient: a first, teacher-only pass over the chunks computes each chunk's ``(2G + 2,)``
  batch partial (``states`` with no student, ``finish(partial_only=True)``); the partials,
  stacked (and, with ``process_group``, merged and all-gathered: one collective of ``2G + 2``
  floats per rank), are every chunk's ``batch_partials`` in the main pass, so every chunk sees
  the exact global statistic. The teacher's logits are computed twice for it (the one extra
  matmul): keeping them would be ``N x V``.
- The ``batchmean`` denominator (the valid rows' total ``sample_weight``; their number without
  weights; ``num_items_in_batch`` when given; every rank's with ``global_batchmean``) is
  computed once from the row tensors, before the main pass, and given to every chunk's finish,
  so the chunks' losses and gradients add up to the whole batch's.
- ``"sum"``/``"batchmean"``: the gradients are computed in the forward, with upstream 1, and the
  backward scales them by the upstream scalar (as Liger-Kernel's fused-linear losses do), in
  place (no second ``V x H`` buffer): a second backward through the same graph
  (``retain_graph=True``) raises autograd's in-place error instead of computing twice.
  ``"none"``: the upstream gradient of each row is known only in the backward, so the backward
  recomputes both logits chunk by chunk (two more matmuls) from the per-row states saved by the
  forward (``N x (5G + 4)`` floats); when only the hidden states need a gradient (a frozen head,
  LoRA) the forward computes each row's gradient for a unit upstream instead (``N x H``) and
  the backward scales the rows. To weight rows and still pay four matmuls, pass
  ``sample_weight`` with ``"sum"`` (or ``"batchmean"``).

Memory above the inputs and the gradients: ``O(chunk_size x V)``, never ``O(N x V)``. A chunk
holds its two float32 logits ``(C, V)`` and the float32 logits gradient ``(C, V)``, plus the
backend's own temporaries (the C++ and Triton kernels: ``O(C G)``; the plain-torch fallback
operators: about ten more ``(C, V)``), and per-row vectors (``"none"``: ``N x (5G + 4)``
states). Low-precision (bfloat16/float16) heads add: the chunk's
logits gradient rounded to the weight's dtype for the ``dX``/``dW`` matmuls on CUDA (as eager
rounds the gradient of bf16 logits), and one float32 accumulator of the weight gradient
(``V x H`` floats) so that ``dW`` is rounded to the weight's dtype once, as eager rounds it,
not once per chunk.

Float32 logits from low-precision inputs: on CUDA the matmul accumulates in float32 and writes
float32 (``torch.mm(..., out_dtype=torch.float32)``; torch >= 2.8); elsewhere (the CPU, whose
``mm`` has no ``out_dtype``) the chunk's hidden states and the weight, a slice of at most
``C x V`` elements at a time, are upcast and multiplied in float32. The logits are never
rounded to bfloat16 before the loss.

Automatic chunk: ``chunk_size=None`` takes ``C`` = the largest power of two not above
``min(cap, max(16, H s / 16, 2^30 / (V H)))``, ``cap = max(16, min(4096, 2^26 / V))``, and at
most ``N``, where ``s`` is the student weight's bytes per element. That is: the chunk's float32
logits ``(C, V)`` take a quarter of the student weight's bytes (its three such buffers stay
below the size of the weight's own gradient), unless each matmul call would then do fewer than
``2^30`` multiply-adds (small heads: a matmul with few rows runs far below the machine's speed,
the weight being re-read and re-packed per call), but never more than 256 MiB per buffer nor
4096 rows. Nothing depends on ``N`` but the cap ``C <= N``: the peak memory does not grow with
``N``. Examples: ``H = 1024``, ``V = 32000``, float32: ``C = 256``; ``H = 4096``,
``V = 128256``, bfloat16: ``C = 512``; ``H = 256``, ``V = 8192``, float32: ``C = 512``. ``C``
is chosen inside the operator, so ``torch.compile`` with dynamic shapes neither specialises nor
recompiles on ``N``.

``torch.compile``: each call is one custom operator, ``ltkd_kernels::fused_linear_loss``, with
a fake implementation and its autograd registered (the ``"none"`` backward is a second one,
``ltkd_kernels::fused_linear_loss_backward``): no graph break, whatever the number of chunks.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._arguments import parse_loss_arguments
from ._validation import _dtype_name, check_chunk_size
from .functional import _index, config_from_arguments
from .ops import grouped_kl as _grouped_kl
from .ops import grouped_kl_torch as _torch_ops
from .ops.config import NUM_EXTRAS, NUM_SLOTS, REDUCE_MEAN, REDUCE_NONE, GroupedKLConfig
from .ops.distributed import gather_partials, group_name, resolve
from .topk import TopKTeacher

__all__ = ["fused_linear_kd_loss", "fused_linear_ltkd_loss", "fused_linear_dkd_loss",
           "fused_linear_bkd_loss", "auto_chunk_size"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_HIDDEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------
# The chunk rule.

def auto_chunk_size(rows: int, vocab: int, hidden: int, element_size: int) -> int:
    """Rows per chunk for ``chunk_size=None`` (module docstring): the largest power of two not
    above ``min(cap, max(16, H s / 16, 2^30 / (V H)))`` with ``cap = max(16, min(4096,
    2^26 / V))``, and at most ``N`` (and >= 1)."""
    quarter = hidden * element_size / 16.0           # fp32 (C, V) = a quarter of the weight
    work = float(2 ** 30) / max(vocab * hidden, 1)   # >= 2^30 multiply-adds per matmul call
    cap = max(16.0, min(4096.0, float(2 ** 26) / max(vocab, 1)))  # (C, V) fp32 <= 256 MiB
    wanted = min(cap, max(16.0, quarter, work))
    chunk = 1 << (int(wanted).bit_length() - 1)
    return max(1, min(rows, chunk))


# ---------------------------------------------------------------------------------------------
# One model's head: float32 logits of a chunk of rows, and the backward of a chunk.

_PROBES = {}


def _cuda_supports(kind: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``mm`` (``kind="mm"``) or in-place ``addmm`` into a float32 accumulator
    (``kind="addmm"``) with ``out_dtype=torch.float32`` runs on this CUDA device for ``dtype``
    inputs (torch >= 2.8; the float32-self form of ``addmm`` is newer). Probed once."""
    if device.type != "cuda":
        return False
    key = (kind, dtype, device.index)
    if key not in _PROBES:
        try:
            a = torch.ones(2, 2, dtype=dtype, device=device)
            if kind == "mm":
                ok = torch.ops.aten.mm.dtype(a, a, torch.float32)
                good = ok.dtype == torch.float32 and bool((ok == 2).all())
            else:
                acc = torch.ones(2, 2, dtype=torch.float32, device=device)
                torch.ops.aten.addmm.dtype_out(acc, a, a, torch.float32, out=acc)
                good = bool((acc == 3).all())
        except Exception:  # noqa: BLE001 - any failure means "use the fallback"
            good = False
        _PROBES[key] = good
    return _PROBES[key]


class _Head:
    """``z = x W^T + b`` in float32 for chunks ``x`` of rows, and the chunk backward
    ``dX = dZ W``, ``dW += dZ^T x``, ``db += sum dZ`` (accumulated in float32 for
    low-precision weights)."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], chunk: int,
                 grad_weight: bool = False, grad_bias: bool = False):
        self.weight = weight
        vocab, hidden = weight.shape
        self.bias32 = None if bias is None else bias.to(torch.float32)
        self.low = weight.dtype in _LOW_PRECISION
        device = weight.device
        self.native = (not self.low) or _cuda_supports("mm", weight.dtype, device)
        self.addmm_fp32 = self.low and self.native and _cuda_supports("addmm", weight.dtype, device)
        # Upcast path: weight slices of at most chunk x V elements.
        self.slice = vocab if hidden <= chunk else max(1, (chunk * vocab) // hidden)
        acc = torch.float32 if self.low else weight.dtype
        # The first chunk writes dW (no zero fill of V x H), the others add to it; the CUDA
        # low-precision path always adds (into zeros).
        self.fresh = not (self.low and self.native)
        make = torch.empty if self.fresh else torch.zeros
        self.grad_weight = make(weight.shape, dtype=acc, device=device) if grad_weight else None
        self.grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if grad_bias else None

    def _slices(self):
        vocab = self.weight.shape[0]
        for start in range(0, vocab, self.slice):
            yield slice(start, min(start + self.slice, vocab))

    def logits(self, x: Tensor) -> Tensor:
        w = self.weight
        if not self.low:
            z = torch.mm(x, w.t()) if self.bias32 is None else torch.addmm(self.bias32, x, w.t())
            return z if z.dtype == torch.float32 else z.float()
        if self.native:
            z = torch.ops.aten.mm.dtype(x, w.t(), torch.float32)
        else:
            x32 = x.float()
            if self.slice >= w.shape[0]:
                z = torch.mm(x32, w.float().t())
            else:
                z = x32.new_empty((x.shape[0], w.shape[0]))
                for part in self._slices():
                    z[:, part] = torch.mm(x32, w[part].float().t())
        if self.bias32 is not None:
            z.add_(self.bias32)
        return z

    def backward(self, dz: Tensor, x: Tensor, grad_x: Optional[Tensor]) -> None:
        """Accumulate a chunk's ``dW``, ``db``; write its ``dX`` into ``grad_x`` (if given)."""
        w, gw = self.weight, self.grad_weight
        if self.grad_bias is not None:
            self.grad_bias.add_(dz.sum(0))
        fresh, self.fresh = self.fresh, False
        if not self.low:
            if grad_x is not None:
                torch.mm(dz, w, out=grad_x)
            if gw is not None:
                if fresh:
                    torch.mm(dz.t(), x, out=gw)
                else:
                    gw.addmm_(dz.t(), x)
            return
        if self.native:
            dz_low = dz.to(w.dtype)
            if grad_x is not None:
                torch.mm(dz_low, w, out=grad_x)
            if gw is not None:
                if self.addmm_fp32:
                    torch.ops.aten.addmm.dtype_out(gw, dz_low.t(), x, torch.float32, out=gw)
                else:
                    gw.add_(torch.ops.aten.mm.dtype(dz_low.t(), x, torch.float32))
            return
        x32 = x.float() if gw is not None else None
        gx32 = dz.new_zeros((dz.shape[0], w.shape[1])) if grad_x is not None else None
        for part in self._slices():
            w32 = w[part].float()
            d = dz[:, part]
            if gx32 is not None:
                gx32.addmm_(d, w32)
            if gw is not None:
                if fresh:
                    torch.mm(d.t(), x32, out=gw[part])
                else:
                    gw[part].addmm_(d.t(), x32)
        if grad_x is not None:
            grad_x.copy_(gx32)

    def finished_grads(self, weight_dtype, bias_dtype):
        gw = self.grad_weight
        if gw is not None and self.fresh:  # no chunk at all (N = 0)
            gw.zero_()
        if gw is not None and gw.dtype != weight_dtype:
            gw = gw.to(weight_dtype)
        gb = self.grad_bias
        if gb is not None and gb.dtype != bias_dtype:
            gb = gb.to(bias_dtype)
        return gw, gb


# ---------------------------------------------------------------------------------------------
# The custom operators.

_LIB = torch.library.Library("ltkd_kernels", "FRAGMENT")  # noqa: TOR901 - the package's namespace

_TENSORS = ("student_hidden", "student_weight", "student_bias", "teacher_hidden",
            "teacher_weight", "teacher_bias", "topk_indices", "topk_logprobs", "groups",
            "target", "class_weight", "mask", "sample_weight", "group_logmass",
            "num_items_tensor")
_NUM_TENSORS = len(_TENSORS)
_NUM_CONFIG = len(GroupedKLConfig._fields)
_TENSOR_SCHEMA = ", ".join(("Tensor " if i < 2 else "Tensor? ") + name
                           for i, name in enumerate(_TENSORS))
_FLAGS_SCHEMA = ("int chunk_size, bool need_hidden_grad, bool need_weight_grad, "
                 "bool need_bias_grad, str backend")

_LIB.define(f"fused_linear_loss({_TENSOR_SCHEMA}, {_grouped_kl._CONFIG_SCHEMA}, {_FLAGS_SCHEMA}, "
            "str process_group, bool global_batchmean) "
            "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_LIB.define(f"fused_linear_loss_backward(Tensor grad_loss, {_TENSOR_SCHEMA}, Tensor state, "
            f"Tensor extras, Tensor saved, {_grouped_kl._CONFIG_SCHEMA}, {_FLAGS_SCHEMA}) "
            "-> (Tensor, Tensor, Tensor)")


def _part(t: Optional[Tensor], start: int, stop: int) -> Optional[Tensor]:
    return None if t is None else t[start:stop]


def _recompute_in_backward(cfg: GroupedKLConfig, need_weight: bool, need_bias: bool) -> bool:
    return cfg.reduction == REDUCE_NONE and (need_weight or need_bias)


def _read_once(ops, groups, num_groups: int, rows: int):
    """The group ids the chunks' kernels read: the Triton launchers' compact copy made once
    for all chunks (each chunk's call would make its own; ltkd_kernels/triton/grouped_kl.py,
    ``compact_ids``), else ``groups``."""
    compact = getattr(ops, "compact_ids", None)
    return groups if compact is None else compact(groups, num_groups, rows)


def _chunk_rows(chunk_size: int, student_hidden: Tensor, student_weight: Tensor) -> int:
    rows = student_hidden.shape[0]
    if chunk_size > 0:
        return chunk_size
    vocab, hidden = student_weight.shape
    return auto_chunk_size(rows, vocab, hidden, student_weight.element_size())


def _denominator(cfg, mask, target, sample_weight, num_items_tensor, rows, device,
                 data_group, global_batchmean, gathered) -> Optional[Tensor]:
    """The ``batchmean`` denominator of the whole batch, as the finish's ``num_items``."""
    if cfg.reduction != REDUCE_MEAN:
        return None
    if num_items_tensor is not None:
        return num_items_tensor.reshape(()).to(torch.float32)
    if cfg.num_items > 0:
        return None  # the finish takes cfg.num_items
    valid = _torch_ops.row_valid(rows, mask, target, cfg.ignore_index, device)
    weight = (torch.ones(rows, dtype=torch.float32, device=device) if sample_weight is None
              else sample_weight.reshape(-1).to(torch.float32))
    count = valid.sum().to(torch.float32)
    total = torch.where(valid, weight, torch.zeros_like(weight)).sum()
    if data_group is None or not global_batchmean:
        return total
    if gathered is None:  # no batch statistic: gather the denominators alone
        G = cfg.num_groups
        own = torch.cat([torch.full((G,), float("-inf"), device=device),
                         torch.zeros(G, device=device), count.reshape(1), total.reshape(1)])
        gathered = gather_partials(own, data_group)
    return gathered[:, -1].sum()


def _forward_impl(*args):
    tensors = args[:_NUM_TENSORS]
    cfg = GroupedKLConfig(*args[_NUM_TENSORS:_NUM_TENSORS + _NUM_CONFIG])
    (chunk_size, need_hidden, need_weight, need_bias, backend, process_group,
     global_batchmean) = args[_NUM_TENSORS + _NUM_CONFIG:]
    (x, w, b, xt, wt, bt, topk_indices, topk_logprobs, groups, target, class_weight, mask,
     sample_weight, group_logmass, num_items_tensor) = tensors
    ops = _grouped_kl.kernel_module(backend, x.device)
    rows, device, G = x.shape[0], x.device, cfg.num_groups
    groups = _read_once(ops, groups, G, rows)
    chunk = _chunk_rows(chunk_size, x, w)
    bounds = [(s, min(s + chunk, rows)) for s in range(0, rows, chunk)]
    data_group = resolve(process_group)
    none = cfg.reduction == REDUCE_NONE
    recompute = _recompute_in_backward(cfg, need_weight, need_bias)
    with_grads = (need_hidden or need_weight or need_bias) and not recompute
    student = _Head(w, b, chunk, grad_weight=with_grads and need_weight,
                    grad_bias=with_grads and need_bias)
    teacher = None if wt is None else _Head(wt, bt, chunk)

    # 1. LTKD's batch statistic: a teacher-only pass (the partial of each chunk).
    partials = gathered = None
    if cfg.rebalance:
        teacher_cfg = cfg._replace(ce_weight=0.0)
        own = []
        for s, e in bounds:
            zt = None if teacher is None else teacher.logits(xt[s:e])
            state, extras = ops.states(None, zt, _part(topk_indices, s, e),
                                       _part(topk_logprobs, s, e), groups, _part(target, s, e),
                                       class_weight, _part(mask, s, e), teacher_cfg)
            own.append(ops.finish(state, extras, _part(mask, s, e), _part(target, s, e),
                                  _part(sample_weight, s, e), _part(group_logmass, s, e), None,
                                  None, teacher_cfg, partial_only=True).to(torch.float32))
            del zt, state, extras
        if not own:  # no rows: the neutral partial
            own.append(torch.cat([torch.full((G,), float("-inf"), device=device),
                                  torch.zeros(G + 2, device=device)]))
        partials = torch.stack(own)
        if data_group is not None:
            gathered = gather_partials(_torch_ops.merge_partials(partials), data_group)
            partials = gathered
    num_items = _denominator(cfg, mask, target, sample_weight, num_items_tensor, rows, device,
                             data_group, global_batchmean, gathered)

    # 2. The main pass: logits, states, finish (the global statistic and denominator), grad.
    loss = torch.zeros((rows,) if none else (), dtype=torch.float32, device=device)
    state_out = x.new_zeros((rows if none else 0, NUM_SLOTS, G), dtype=torch.float32)
    extras_out = x.new_zeros((rows if none else 0, NUM_EXTRAS), dtype=torch.float32)
    saved = torch.cat([torch.zeros(G, device=device), torch.ones(1, device=device)])
    # Every row belongs to a chunk, which writes its rows of dX (zeros at invalid rows).
    grad_hidden = torch.empty_like(x, memory_format=torch.contiguous_format) if (
        need_hidden and not recompute) else x.new_empty((0,))
    unit = torch.ones((), dtype=torch.float32, device=device)
    for s, e in bounds:
        xs = x[s:e]
        zs = student.logits(xs)
        zt = None if teacher is None else teacher.logits(xt[s:e])
        m, y, sw = _part(mask, s, e), _part(target, s, e), _part(sample_weight, s, e)
        idx, lp, glm = _part(topk_indices, s, e), _part(topk_logprobs, s, e), _part(group_logmass, s, e)
        state, extras = ops.states(zs, zt, idx, lp, groups, y, class_weight, m, cfg)
        part_loss, saved = ops.finish(state, extras, m, y, sw, glm, partials, num_items, cfg)
        if none:
            loss[s:e] = part_loss
            state_out[s:e] = state
            extras_out[s:e] = extras
        else:
            loss += part_loss
        if with_grads:
            upstream = torch.ones(e - s, dtype=torch.float32, device=device) if none else unit
            dz = ops.grad(zs, zt, idx, lp, groups, y, class_weight, m, sw, glm, state, extras,
                          saved, upstream, cfg)
            del zs, zt
            student.backward(dz, xs, grad_hidden[s:e] if need_hidden else None)
            del dz
        else:
            del zs, zt
    grad_weight, grad_bias = student.finished_grads(w.dtype, None if b is None else b.dtype)
    return (loss, grad_hidden,
            grad_weight if grad_weight is not None else w.new_empty((0,)),
            grad_bias if grad_bias is not None else w.new_empty((0,)),
            state_out, extras_out, saved.to(torch.float32))


def _forward_fake(*args):
    tensors = args[:_NUM_TENSORS]
    cfg = GroupedKLConfig(*args[_NUM_TENSORS:_NUM_TENSORS + _NUM_CONFIG])
    _, need_hidden, need_weight, need_bias = args[_NUM_TENSORS + _NUM_CONFIG:][:4]
    x, w, b = tensors[:3]
    rows, G = x.shape[0], cfg.num_groups
    none = cfg.reduction == REDUCE_NONE
    recompute = _recompute_in_backward(cfg, need_weight, need_bias)
    with_grads = (need_hidden or need_weight or need_bias) and not recompute
    f32 = dict(dtype=torch.float32)
    return (x.new_empty((rows,) if none else (), **f32),
            x.new_empty(x.shape) if need_hidden and not recompute else x.new_empty((0,)),
            w.new_empty(w.shape) if need_weight and with_grads else w.new_empty((0,)),
            w.new_empty(b.shape, dtype=b.dtype) if (b is not None and need_bias and with_grads)
            else w.new_empty((0,)),
            x.new_empty((rows if none else 0, NUM_SLOTS, G), **f32),
            x.new_empty((rows if none else 0, NUM_EXTRAS), **f32),
            x.new_empty((G + 1,), **f32))


def _backward_impl(grad_loss, *args):
    """``"none"`` with a trainable head: recompute both logits per chunk, ``grad`` with each
    row's upstream, and the chunk's ``dX``, ``dW``, ``db``."""
    tensors = args[:_NUM_TENSORS]
    state, extras, saved = args[_NUM_TENSORS:_NUM_TENSORS + 3]
    cfg = GroupedKLConfig(*args[_NUM_TENSORS + 3:_NUM_TENSORS + 3 + _NUM_CONFIG])
    chunk_size, need_hidden, need_weight, need_bias, backend = args[_NUM_TENSORS + 3 + _NUM_CONFIG:]
    (x, w, b, xt, wt, bt, topk_indices, topk_logprobs, groups, target, class_weight, mask,
     sample_weight, group_logmass, _) = tensors
    ops = _grouped_kl.kernel_module(backend, x.device)
    rows = x.shape[0]
    groups = _read_once(ops, groups, cfg.num_groups, rows)
    chunk = _chunk_rows(chunk_size, x, w)
    student = _Head(w, b, chunk, grad_weight=need_weight, grad_bias=need_bias and b is not None)
    teacher = None if wt is None else _Head(wt, bt, chunk)
    grad_hidden = (torch.empty_like(x, memory_format=torch.contiguous_format) if need_hidden
                   else x.new_empty((0,)))
    grad_loss = grad_loss.reshape(-1).to(torch.float32)
    for s in range(0, rows, chunk):
        e = min(s + chunk, rows)
        xs = x[s:e]
        zs = student.logits(xs)
        zt = None if teacher is None else teacher.logits(xt[s:e])
        dz = ops.grad(zs, zt, _part(topk_indices, s, e), _part(topk_logprobs, s, e), groups,
                      _part(target, s, e), class_weight, _part(mask, s, e),
                      _part(sample_weight, s, e), _part(group_logmass, s, e), state[s:e],
                      extras[s:e], saved, grad_loss[s:e], cfg)
        del zs, zt
        student.backward(dz, xs, grad_hidden[s:e] if need_hidden else None)
        del dz
    grad_weight, grad_bias = student.finished_grads(w.dtype, None if b is None else b.dtype)
    return (grad_hidden,
            grad_weight if grad_weight is not None else w.new_empty((0,)),
            grad_bias if grad_bias is not None else w.new_empty((0,)))


def _backward_fake(grad_loss, *args):
    x, w, b = args[:3]
    need_hidden, need_weight, need_bias = args[_NUM_TENSORS + 3 + _NUM_CONFIG:][1:4]
    return (x.new_empty(x.shape) if need_hidden else x.new_empty((0,)),
            w.new_empty(w.shape) if need_weight else w.new_empty((0,)),
            w.new_empty(b.shape, dtype=b.dtype) if (b is not None and need_bias)
            else w.new_empty((0,)))


for _key in ("CPU", "CUDA"):
    _LIB.impl("fused_linear_loss", _forward_impl, _key)
    _LIB.impl("fused_linear_loss_backward", _backward_impl, _key)
torch.library.register_fake("ltkd_kernels::fused_linear_loss", _forward_fake, lib=_LIB)
torch.library.register_fake("ltkd_kernels::fused_linear_loss_backward", _backward_fake, lib=_LIB)

_NUM_INPUTS = _NUM_TENSORS + _NUM_CONFIG + 7


def _setup_context(ctx, inputs, output):
    tensors = inputs[:_NUM_TENSORS]
    config = inputs[_NUM_TENSORS:_NUM_TENSORS + _NUM_CONFIG]
    flags = inputs[_NUM_TENSORS + _NUM_CONFIG:_NUM_TENSORS + _NUM_CONFIG + 5]
    _, grad_hidden, grad_weight, grad_bias, state, extras, saved = output
    ctx.mark_non_differentiable(grad_hidden, grad_weight, grad_bias, state, extras, saved)
    # The other outputs get no upstream gradient: not a zero-filled (N, H) and (V, H) each.
    ctx.set_materialize_grads(False)
    cfg = GroupedKLConfig(*config)
    ctx.none = cfg.reduction == REDUCE_NONE
    ctx.recompute = _recompute_in_backward(cfg, flags[2], flags[3])
    ctx.config, ctx.flags = tuple(config), tuple(flags)
    if ctx.recompute:
        ctx.save_for_backward(*tensors, state, extras, saved)
    else:
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)


def _scaled(grad: Tensor, grad_loss: Tensor, rows: bool) -> Tensor:
    """``grad`` times the upstream scalar, in place (the forward's gradient is used once: no
    second ``V x H`` buffer in the backward), or, per row, times each row's upstream."""
    if rows:
        return (grad * grad_loss.reshape(-1, 1)).to(grad.dtype)
    return grad.mul_(grad_loss)


def _backward(ctx, grad_loss, *_unused):
    none_grads = [None] * _NUM_INPUTS
    if grad_loss is None:
        return tuple(none_grads)
    need = ctx.needs_input_grad
    if ctx.recompute:
        saved_tensors = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = torch.ops.ltkd_kernels.fused_linear_loss_backward(
            grad_loss.contiguous(), *saved_tensors, *ctx.config, *ctx.flags)
    else:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        grad_hidden = _scaled(grad_hidden, grad_loss, ctx.none) if need[0] else None
        grad_weight = _scaled(grad_weight, grad_loss, False) if need[1] else None
        grad_bias = _scaled(grad_bias, grad_loss, False) if need[2] else None
    none_grads[0] = grad_hidden if need[0] else None
    none_grads[1] = grad_weight if need[1] else None
    none_grads[2] = grad_bias if need[2] else None
    return tuple(none_grads)


torch.library.register_autograd("ltkd_kernels::fused_linear_loss", _backward,
                                setup_context=_setup_context, lib=_LIB)


# ---------------------------------------------------------------------------------------------
# Validation and the public functions.

def _check_head(prefix: str, hidden, weight, bias, leading=None, vocab=None, device=None):
    """``(rows, H, V)`` of one model's hidden states and head; raises naming the argument."""
    for name, value in ((f"{prefix}_hidden", hidden), (f"{prefix}_weight", weight)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype not in _HIDDEN_DTYPES:
            raise TypeError(f"{name} must have dtype in {[_dtype_name(d) for d in _HIDDEN_DTYPES]}, "
                            f"got {_dtype_name(value.dtype)}")
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{prefix}_hidden must have shape (..., H) with H >= 1, got "
                         f"{tuple(hidden.shape)}")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] < 1:
        raise ValueError(f"{prefix}_weight must have shape (V, H) with H = {H} (the last "
                         f"dimension of {prefix}_hidden, as nn.Linear stores it), got "
                         f"{tuple(weight.shape)}")
    V = weight.shape[0]
    if vocab is not None and V != vocab:
        raise ValueError(f"{prefix}_weight must have the student's V = {vocab} rows, got {V}")
    device = hidden.device if device is None else device
    for name, value in ((f"{prefix}_hidden", hidden), (f"{prefix}_weight", weight)):
        if value.device != device:
            raise ValueError(f"{name} must be on the student's device {device}, got {value.device}")
    if leading is not None and tuple(hidden.shape[:-1]) != tuple(leading):
        raise ValueError(f"{prefix}_hidden must have the student's leading shape "
                         f"{tuple(leading)}, got {tuple(hidden.shape[:-1])}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"{prefix}_bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if not bias.is_floating_point():
            raise TypeError(f"{prefix}_bias must be a floating-point tensor, got {_dtype_name(bias.dtype)}")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"{prefix}_bias must have shape (V,) = ({V},), got {tuple(bias.shape)}")
        if bias.device != device:
            raise ValueError(f"{prefix}_bias must be on the student's device {device}, got {bias.device}")
    return H, V


def _promoted(hidden: Tensor, weight: Tensor):
    """Hidden states and weight in one dtype (``torch.promote_types``): bf16 activations with
    an fp32 master weight (autocast training) compute in fp32 through a cast of the ``(N, H)``
    hidden states, whose backward autograd takes care of."""
    if hidden.dtype == weight.dtype:
        return hidden, weight
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(dtype), weight.to(dtype)


def _phantom_logits(leading, vocab: int, dtype: torch.dtype, device) -> Tensor:
    """A ``(..., V)`` stand-in for logits that are never materialised: one row of storage,
    expanded (stride 0) over the rows, so that the logits API's one validation entry point
    checks every other argument against the right shapes."""
    return torch.empty(vocab, dtype=dtype, device=device).expand(*leading, vocab)


def _logit_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _reference_loss(args, x, w, b, xt, wt, bt) -> Tensor:
    """``backend="torch"``: the whole logits, then the reference loss (for testing)."""
    dtype = _logit_dtype(x, w)
    student = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).to(dtype), w.to(dtype),
                                         None if b is None else b.to(dtype))
    teacher = None
    if args.teacher is not None:
        t_dtype = _logit_dtype(xt, wt)
        with torch.no_grad():
            teacher = torch.nn.functional.linear(xt.reshape(-1, xt.shape[-1]).to(t_dtype),
                                                 wt.to(t_dtype), None if bt is None else bt.to(t_dtype))
    return reference.loss_from_arguments(args._replace(student=student, teacher=teacher))


def _fused_linear_loss(loss_name, student_hidden, student_weight, teacher_hidden, teacher_weight,
                       *, student_bias, teacher_bias, chunk_size, **options) -> Tensor:
    H, V = _check_head("student", student_hidden, student_weight, student_bias)
    leading, device = student_hidden.shape[:-1], student_hidden.device
    topk = isinstance(teacher_hidden, TopKTeacher)
    if topk:
        if teacher_weight is not None or teacher_bias is not None:
            raise ValueError("with a TopKTeacher as teacher_hidden, teacher_weight and "
                             "teacher_bias must be None (the top-k teacher has no head)")
        teacher_phantom = teacher_hidden
    else:
        if teacher_weight is None:
            raise ValueError("teacher_weight (V, H_T) is needed with dense teacher hidden "
                             "states (or pass a TopKTeacher as teacher_hidden)")
        _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, leading, V, device)
        teacher_phantom = _phantom_logits(leading, V, _logit_dtype(teacher_hidden, teacher_weight),
                                          device)
    check_chunk_size(chunk_size)
    student_phantom = _phantom_logits(leading, V, _logit_dtype(student_hidden, student_weight),
                                      device)
    args = parse_loss_arguments(loss_name, student_phantom, teacher_phantom, **options)
    if args.backend == "torch":
        return _reference_loss(args, student_hidden, student_weight, student_bias,
                               None if topk else teacher_hidden, teacher_weight, teacher_bias)
    cfg = config_from_arguments(args)
    grad_on = torch.is_grad_enabled()
    need_hidden = grad_on and student_hidden.requires_grad
    need_weight = grad_on and student_weight.requires_grad
    need_bias = grad_on and student_bias is not None and student_bias.requires_grad
    student_hidden, student_weight = _promoted(student_hidden, student_weight)
    x = student_hidden.reshape(-1, H)
    xt = None
    if not topk:
        teacher_hidden, teacher_weight = _promoted(teacher_hidden.detach(), teacher_weight.detach())
        xt = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    group_logmass = args.group_logmass
    if group_logmass is not None and group_logmass.dtype != torch.float32:
        group_logmass = group_logmass.float()
    outputs = torch.ops.ltkd_kernels.fused_linear_loss(
        x, student_weight, student_bias, xt, teacher_weight,
        None if (topk or teacher_bias is None) else teacher_bias.detach(),
        _index(args.topk_indices), args.topk_logprobs, _index(args.groups), _index(args.target),
        args.class_weight, args.mask, args.sample_weight, group_logmass, args.num_items_tensor,
        *cfg, int(chunk_size or 0), need_hidden, need_weight, need_bias, args.backend,
        group_name(args.process_group, "process_group"), args.global_batchmean)
    loss = outputs[0]
    return loss.reshape(args.leading) if args.reduction == "none" else loss


def fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight=None, *,
                         student_bias=None, teacher_bias=None, temperature=1.0, target=None,
                         ignore_index=-100, ce_weight=0.0, sample_weight=None, mask=None,
                         reduction="batchmean", num_items_in_batch=None, process_group=None,
                         global_batchmean=False, chunk_size=None, backend="auto"):
    """:func:`ltkd_kernels.kd_loss` of ``student_hidden @ student_weight.T + student_bias``
    against the teacher's logits, without the ``N x V`` logits (module docstring):
    ``l_r = T^2 KL(softmax(z^T_r / T) || softmax(z^S_r / T))``. Four matmuls with gradients,
    as eager. ``teacher_hidden`` may be a :class:`ltkd_kernels.TopKTeacher` (then
    ``teacher_weight=None``); ``target`` with ``ignore_index`` masks rows; ``ce_weight``
    (default 0.0: none) adds the student's cross-entropy with ``target``.
    """
    return _fused_linear_loss(
        "kd", student_hidden, student_weight, teacher_hidden, teacher_weight,
        student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=chunk_size,
        temperature=temperature, target=target, ignore_index=ignore_index, ce_weight=ce_weight,
        sample_weight=sample_weight, mask=mask, reduction=reduction,
        num_items_in_batch=num_items_in_batch, process_group=process_group,
        global_batchmean=global_batchmean, backend=backend)


def fused_linear_ltkd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, groups,
                           num_groups=None, *, student_bias=None, teacher_bias=None, alpha=1.0,
                           beta=1.0, temperature=1.0, rebalance=True, within_weight="uniform",
                           target=None, ignore_index=-100, ce_weight=0.0, sample_weight=None,
                           mask=None, reduction="batchmean", num_items_in_batch=None,
                           process_group=None, global_batchmean=False, chunk_size=None,
                           backend="auto"):
    """:func:`ltkd_kernels.ltkd_loss` from hidden states and LM-head weights (module docstring).

    ``groups``: int ``(V,)`` class groups (e.g. token-frequency groups from
    :func:`ltkd_kernels.groups_from_counts`). With ``rebalance=True`` (the default) the batch
    statistic ``pB`` is exact over all rows (and all ranks with ``process_group``): a
    teacher-only pass first, so five matmuls with gradients against eager's four (four with a
    :class:`ltkd_kernels.TopKTeacher`, whose group masses come from its entries or from its
    ``group_logmass``).
    """
    return _fused_linear_loss(
        "ltkd", student_hidden, student_weight, teacher_hidden, teacher_weight,
        student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=chunk_size,
        groups=groups, num_groups=num_groups, alpha=alpha, beta=beta, temperature=temperature,
        rebalance=rebalance, within_weight=within_weight, target=target,
        ignore_index=ignore_index, ce_weight=ce_weight, sample_weight=sample_weight, mask=mask,
        reduction=reduction, num_items_in_batch=num_items_in_batch, process_group=process_group,
        global_batchmean=global_batchmean, backend=backend)


def fused_linear_dkd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, target,
                          *, student_bias=None, teacher_bias=None, alpha=1.0, beta=8.0,
                          temperature=4.0, ignore_index=-100, ce_weight=0.0, sample_weight=None,
                          mask=None, reduction="batchmean", num_items_in_batch=None,
                          process_group=None, global_batchmean=False, chunk_size=None,
                          backend="auto"):
    """:func:`ltkd_kernels.dkd_loss` from hidden states and LM-head weights (module
    docstring): ``target`` (int, the leading shape) is each row's target token, its group 0;
    rows whose target is ``ignore_index`` are masked. Four matmuls with gradients, as eager.
    """
    return _fused_linear_loss(
        "dkd", student_hidden, student_weight, teacher_hidden, teacher_weight,
        student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=chunk_size,
        target=target, alpha=alpha, beta=beta, temperature=temperature,
        ignore_index=ignore_index, ce_weight=ce_weight, sample_weight=sample_weight, mask=mask,
        reduction=reduction, num_items_in_batch=num_items_in_batch, process_group=process_group,
        global_batchmean=global_batchmean, backend=backend)


def fused_linear_bkd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                          class_weight, *, student_bias=None, teacher_bias=None, temperature=2.0,
                          target=None, ignore_index=-100, ce_weight=0.0, sample_weight=None,
                          mask=None, reduction="batchmean", num_items_in_batch=None,
                          process_group=None, global_batchmean=False, chunk_size=None,
                          backend="auto"):
    """:func:`ltkd_kernels.bkd_loss` from hidden states and LM-head weights (module
    docstring): the teacher softmax reweighted by ``class_weight`` ``(V,)``. The paper adds the
    student's cross-entropy: ``target`` and ``ce_weight=1.0`` (computed in the same pass).
    Four matmuls with gradients, as eager.
    """
    return _fused_linear_loss(
        "bkd", student_hidden, student_weight, teacher_hidden, teacher_weight,
        student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=chunk_size,
        class_weight=class_weight, temperature=temperature, target=target,
        ignore_index=ignore_index, ce_weight=ce_weight, sample_weight=sample_weight, mask=mask,
        reduction=reduction, num_items_in_batch=num_items_in_batch, process_group=process_group,
        global_batchmean=global_batchmean, backend=backend)
