"""Launchers of the grouped-KL Triton kernels: the three ops of docs/design.md on CUDA tensors
(and on CPU tensors under ``TRITON_INTERPRET=1``). No autograd here.

``states``, ``finish``, ``grad`` and ``loss_forward`` take exactly the arguments of
:mod:`ltkd_kernels.ops.grouped_kl_torch` (the executable specification they are tested
against). A launcher only reads shapes, dtypes and strides, allocates, picks the
specialisation and the grid, and launches: no host synchronisation, no torch arithmetic
(but for ``forced_walk("ordered")`` on groups without an attached class order: tests; and the
compact copy of the group ids at large sizes, ``_compact_ids``: two elementwise ops).

Launches: ``states`` is one kernel, plus the slice merge when rows are split over the
vocabulary; ``finish`` and ``grad`` are one each. ``loss_forward`` is ``states`` + ``finish``
(2 launches, 3 with a split).

How blocks and warps are chosen (the rule, no autotuning):

- ``NUM_WARPS = 4`` for the walks over the vocabulary: 128 lanes, one per thread. The register
  budget is then 255 per thread for two resident blocks per SM; the kernels stay far below.
- ``VEC``: classes per lane per load = 16 bytes of the widest tensor the walk reads (logits,
  group ids, class weights), at most 8; ``UNROLL = per_lane / VEC`` loads per iteration (at
  most 4), ``per_lane`` = 8 classes for a one-group walk, 16 for the CLASS walk (its
  per-iteration rescale of 3 G sums is spread over twice as many classes). A block is
  ``128 * VEC * UNROLL`` classes (1024 or 2048 in the common cases).
- Groups: a walk over one group (``ONE``, ``TARGET``'s rest, ``BUCKET``'s rest) keeps one
  state per lane; the ``CLASS`` rule keeps ``GC = next_pow2(G)`` per lane up to
  ``GROUP_CHUNK = 16`` groups (``G_LIVE = G`` up to 8: the dead columns of a power of two cost
  nothing), and chunks of 16 groups in separate programs beyond.
- The ordered walk (``ORDER``, docs/design.md): from 5 groups, when the groups tensor carries
  its class order (``ltkd_kernels/ops/class_order.py``) and the order's gathers touch at most
  ``ORDER_MAX_SECTORS`` sectors per sector of a row, or no more than the CLASS walk's reads of
  it (one per chunk). One state per lane, one class per lane per load (``ORDER_VEC = 1``: a
  wider load of the order would need a layout conversion of every gathered tile), 8 per lane
  per iteration; one program per (row, slice) for any G. Where each group is one range of
  classes (in any order) from 2 groups: the same walk reading each range densely
  (``ORDER = 2``: the one-group walk's ``VEC`` and ``UNROLL``, bf16 pairs, no gather; ``3``
  with the compact int8 ids, checked four at a time).
- The window walk (``ORDER = 4``, docs/design.md): from 5 groups, where the ordered walk's
  gathers would touch more than ``ORDER_MAX_SECTORS`` sectors per sector and the groups
  tensor carries a window plan (up to 128 groups holding classes), for dense logits (either
  model or both; a top-k teacher renormalized), without class weights, from Triton 3.4: every lane
  one group, ``WINDOW_SLOTS`` classes per lane per step from a window of 1024 classes; one
  program per (row, slice of steps). Elsewhere the ordered walk where its gathers touch no
  more sectors than the CLASS walk's reads, else the CLASS walk. ``walk_override`` (module
  setting, or the :func:`forced_walk` context) forces the walk.
- bf16 rows with an even row stride are read as int32 pairs (``PAIRS_*``). Class weights:
  from ``COMPACT_MIN_ROWS`` rows and ``COMPACT_MIN_ELEMENTS`` elements the launchers pass
  their logs, taken once per call (``CW_LOG = 2``: no log per class and row); below, the
  kernels take the log, the hardware approximation on a GPU (``CW_LOG = 1``; the interpreter
  keeps ``tl.log``, 0). Group ids likewise: a compact copy from those sizes (``_compact_ids``).
- The gradient kernel is compiled without FMA contraction (``enable_fp_fusion=False``): its
  ``pt = exp2(fma(x / T - ref(m), log2 e, -log2 s))`` (the difference first, exact near the
  maximum; the log-sum in one explicit fma) are exactly 1 at a one-class group's maximum, as
  in the torch form. The CLASS walk reads each class's group's ``(ref(m), -log2 s)`` of both
  models and its two coefficients from a per-program table of six floats per group.
- The finish kernel is one program; its tile is ``FINISH_TILE`` (rows x next_pow2(G)) elements.
- V-split: rows are split over the vocabulary when there are fewer than ``8 * SMs`` rows, into
  as many slices as make ``8 * SMs`` programs, each at least ``MIN_SLICE_BLOCKS`` blocks.
  ``split_override`` (module setting, or the :func:`forced_splits` context) forces the count.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import ContextManager, Dict, Iterator, List, Optional

import torch
import triton

from ..ops import launches
from ..ops.config import (
    GROUP_CLASS,
    GROUP_ONE,
    GROUP_TARGET,
    REDUCE_MEAN,
    REDUCE_NONE,
    TEACHER_DENSE,
    TOPK_BUCKET,
    TOPK_RENORMALIZE,
    TOPK_RESTRICT,
    GroupedKLConfig,
)
from ..ops import class_order as _orders
from . import grouped_kl_kernels as _k

NUM_WARPS = 4
LANES = 32 * NUM_WARPS
CLASSES_PER_LANE = 8
CLASS_WALK_CLASSES_PER_LANE = 16
GROUP_CHUNK = 16
EXACT_GROUPS = 8
MIN_SLICE_BLOCKS = 4
# V-slices per row aim at this many programs per SM: at N = 64, V = 256000 on an H200 a
# forward + backward took 78.7 us with 4 (9 slices), 69.3 us with 8, 81.2 us with 16
# (benchmarks/split_probe.py; benchmarks/results/gpu/h200-2026-11-27-run4/).
PROGRAMS_PER_SM = 8
FINISH_TILE = 1024
MERGE_BLOCK_G = 1024
# The ordered walk is taken when its gathers touch at most this many sectors per sector of a
# row, or no more than the CLASS walk's reads of the row (one per chunk of groups).
ORDER_MAX_SECTORS = 1.25
ORDER_VEC = 1
# Group ids are read once per row (per program, from L2): as int64 they are 4 times the bytes
# of a bf16 row of each model, and at language-model sizes L2 then serves three times the
# bytes HBM does. From these sizes on the launchers read a compact copy (see _compact_ids).
COMPACT_MIN_ROWS = 8
COMPACT_MIN_ELEMENTS = 1 << 20

def _launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``, counted by :mod:`ltkd_kernels.ops.launches`."""
    if launches.active() and _interpreted():
        with torch.profiler.record_function(launches.INTERPRETER_SCOPE):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)
    launches.record("triton:" + kernel.fn.__name__)


# Forces the number of V-slices per row (tests); None: the rule above.
split_override: Optional[int] = None
# Forces the CLASS rule's walk (tests): "ordered", "ranges", "windows", "class", or None: the
# rule above.
walk_override: Optional[str] = None
# Forces the software pipelining of the states and grad walks (benchmarks.split_probe, the GPU
# tests): the compiler's ``num_stages`` of their unmasked loops; None: 1, plain loops. Not
# taken by any rule yet: a measurement on a GPU decides (docs/design.md, "Few rows").
stages_override: Optional[int] = None


@contextlib.contextmanager
def _overridden(setting: str, value) -> Iterator[None]:
    """This module's ``setting`` set to ``value`` inside the block, restored after it."""
    previous = globals()[setting]
    globals()[setting] = value
    try:
        yield
    finally:
        globals()[setting] = previous


def forced_splits(count: Optional[int]) -> ContextManager[None]:
    """``with forced_splits(3): ...`` splits every row into (up to) 3 V-slices."""
    return _overridden("split_override", count)


def forced_walk(name: Optional[str]) -> ContextManager[None]:
    """``with forced_walk("ordered"): ...`` walks every CLASS-rule row group by group,
    gathering through the class order (built on the spot when none is attached);
    ``"ranges"`` the same, taking each group as one range of classes read densely (groups
    that are not ranges give NaN rows, by the walk's id check); ``"windows"`` the window
    walk (its plan made on the spot when none is attached; where the walk does not apply,
    the CLASS walk); ``"class"`` never walks group by group."""
    return _overridden("walk_override", name)


def forced_stages(count: Optional[int]) -> ContextManager[None]:
    """``with forced_stages(3): ...`` software-pipelines the unmasked loops of the states and
    grad kernels over 3 stages (the loads of the next two blocks in flight while one is
    summed). The interpreter runs the same loops (it ignores the stages)."""
    return _overridden("stages_override", count)


def _staged(meta: Dict) -> Dict:
    return meta if stages_override is None else dict(meta, STAGES=max(1, int(stages_override)))


@functools.lru_cache(maxsize=None)
def _sm_count(device_type: str, index: Optional[int]) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index or 0).multi_processor_count
    return 132  # the interpreter: an H100's


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _read_per_call(rows: int, classes: int) -> bool:
    """Whether a per-class constant read once per row is worth a per-call copy the kernels read
    instead (the compact ids, the weights' logs): from ``COMPACT_MIN_ROWS`` rows and
    ``COMPACT_MIN_ELEMENTS`` classes x rows."""
    return rows >= COMPACT_MIN_ROWS and rows * classes >= COMPACT_MIN_ELEMENTS


def _compact_ids(groups, num_groups: int, rows: int):
    """The group ids the walks read: ``groups`` itself, or from ``COMPACT_MIN_ROWS`` rows and
    ``COMPACT_MIN_ELEMENTS`` classes x rows a copy in the narrowest integer type that holds
    ``[-1, G]`` (int8 up to 126 groups), made on every call (two elementwise ops; a copy kept
    across calls could go stale under a write that bypasses the version counter). Ids outside
    ``[0, G)`` are clamped to -1 or G, which the kernels' id check rejects as it does the
    originals (a NaN row), so the copy never turns a bad id into a valid one."""
    if groups is None or not _read_per_call(rows, groups.shape[0]):
        return groups
    for narrow in (torch.int8, torch.int16, torch.int32):
        if num_groups < torch.iinfo(narrow).max:
            break
    if groups.dtype.itemsize <= narrow.itemsize:
        return groups
    compact = groups.clamp(-1, num_groups).to(narrow)
    order = _orders.cached(groups, num_groups)
    if order is not None:  # (the copy walks as the original would: the fused linear loss)
        _orders.attach(compact, num_groups, order)
    return compact


compact_ids = _compact_ids  # (public: the fused linear loss makes it once for its chunks)


def _log_class_weights(class_weight, rows: int):
    """``(weights the kernels read, whether they are the logs)``: from the same sizes as
    :func:`_compact_ids`, ``log w`` in float32 taken once per call (one op), so that the walks
    take no log per class and row; below, the weights (the kernels take their log)."""
    if class_weight is None or not _read_per_call(rows, class_weight.shape[0]):
        return class_weight, False
    return torch.log(class_weight.to(torch.float32)), True


def _cw_log_mode(cw_log: bool) -> int:
    """The kernels' ``CW_LOG``: 2 the weights' logs are given; else 1 (the hardware log, a GPU)
    or 0 (``tl.log``, the interpreter)."""
    return 2 if cw_log else (0 if _interpreted() else 1)


def _pairs(t) -> bool:
    """A bf16 row the walk may read as int32 pairs (even row stride, 4-byte aligned)."""
    return (t is not None and t.dtype == torch.bfloat16 and t.stride(0) % 2 == 0
            and t.data_ptr() % 4 == 0)


def _packed_ids(groups) -> bool:
    """int8 group ids the ranges walk may check four at a time (int32 words: 4-byte aligned)."""
    return groups is not None and groups.dtype == torch.int8 and groups.data_ptr() % 4 == 0


def _itemsize(dtype: Optional[torch.dtype]) -> int:
    return 0 if dtype is None else dtype.itemsize


# Plain integer helpers: ``triton.next_power_of_2`` and ``triton.cdiv`` are constexpr functions
# in recent Triton, each call several microseconds of a launch's host time.
def _pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _vec(*dtypes) -> int:
    """Classes per lane per load: 16 bytes of the widest dtype read by the walk (max 8)."""
    widest = max([_itemsize(d) for d in dtypes] + [1])
    return max(1, min(CLASSES_PER_LANE, 16 // widest))


def _group_layout(cfg: GroupedKLConfig):
    """``(GC, G_LIVE, BLOCK_G, chunks)`` of the states kernel."""
    G = cfg.num_groups
    if cfg.group_rule == GROUP_CLASS and cfg.topk_rule != TOPK_BUCKET:
        if G <= GROUP_CHUNK:
            gc = _pow2(G)
            live = G if G <= EXACT_GROUPS else gc
            return gc, live, gc, 1
        return GROUP_CHUNK, GROUP_CHUNK, GROUP_CHUNK, _cdiv(G, GROUP_CHUNK)
    return 1, 1, _pow2(G), 1


def states_meta(cfg: GroupedKLConfig, student_dtype, teacher_dtype, groups_dtype, cw_dtype,
                has_topk: bool, has_target: bool, has_mask: bool, topk_k: int = 0,
                pairs_s: bool = False, pairs_t: bool = False, ordered: bool = False,
                cw_log: bool = False, ranges: bool = False,
                packed_ids: bool = False, windows: bool = False) -> Dict:
    """``(constexprs and warps of grouped_kl_states_kernel, chunks of groups)`` for these
    inputs (dtypes and flags only: shared with the compile test's listing). ``ordered``: the
    CLASS rule's groups walked one by one through the class order (when the walk is a CLASS
    walk at all); ``ranges``: each group is one range of classes (read densely);
    ``packed_ids``: int8 ids, 4-byte aligned (checked four at a time there); ``windows``: the
    window walk (``ordered`` and the order's window plan). ``cw_log``: the class weights are
    given as their logs."""
    gc, live, block_g, chunks = _group_layout(cfg)
    has_s = student_dtype is not None
    dense_t = teacher_dtype is not None and not has_topk
    topk = cfg.topk_rule if has_topk else TEACHER_DENSE
    with_ce = cfg.with_ce and has_target and has_s
    dense_s = has_s and topk != TOPK_RESTRICT
    class_walk = cfg.group_rule == GROUP_CLASS and topk != TOPK_BUCKET and (dense_s or dense_t)
    by_group = class_walk and ordered
    # The CE sums come from the groups' own when the student's groups cover every class at
    # T = 1 exactly; else each element adds its own exp (BUCKET's rest leaves the entries out;
    # a walk group by group sums the groups' own whatever the chunks).
    ce_sep = with_ce and (cfg.temperature != 1.0 or not dense_s
                          or (not by_group and (chunks > 1 or topk == TOPK_BUCKET)))
    vec = _vec(student_dtype if (dense_s or ce_sep) else None,
               teacher_dtype if dense_t else None, groups_dtype if class_walk else None,
               cw_dtype if dense_t else None)
    if by_group:
        # One group at a time: one state per lane, at the group's own maxima; each group's
        # range read as a one-group row is (ranges: wide loads, bf16 pairs), or its classes
        # gathered (one load per class and tensor, one position of the order per lane per
        # load).
        gc, live, block_g, chunks, bad_or = 1, 1, _pow2(cfg.num_groups), 1, False
        if windows:
            # Every lane one group; the plan hands a lane WINDOW_SLOTS classes per step.
            vec, order, pairs_s, pairs_t = _orders.WINDOW_SLOTS, 4, False, False
        elif ranges:
            order = 3 if packed_ids and groups_dtype == torch.int8 and vec % 4 == 0 else 2
        else:
            vec, order, pairs_s, pairs_t = ORDER_VEC, 1, False, False
        unroll = 1 if windows else max(1, CLASSES_PER_LANE // vec)
    else:
        # A lane takes 16 classes per iteration in a CLASS walk (its per-iteration rescale of
        # 3 G sums is then spread over twice as many), 8 otherwise.
        per_lane = CLASS_WALK_CLASSES_PER_LANE if class_walk else CLASSES_PER_LANE
        unroll = max(1, per_lane // vec)
        bad_or = class_walk and chunks == 1 and live == gc == cfg.num_groups
        order = 0
    return dict(GROUP_RULE=cfg.group_rule, TOPK=topk, HAS_S=has_s, DENSE_T=dense_t,
                HAS_TARGET=has_target, WITH_CE=with_ce, CE_SEP=ce_sep,
                HAS_CW=cw_dtype is not None, HAS_MASK=has_mask, GC=gc, G_LIVE=live,
                VEC=vec, UNROLL=unroll,
                BLOCK_K=_pow2(max(topk_k, 1)), BLOCK_G=block_g, BAD_OR=bad_or,
                PAIRS_S=pairs_s and (dense_s or ce_sep), PAIRS_T=pairs_t and dense_t,
                CW_LOG=_cw_log_mode(cw_log), ORDER=order, LANES=LANES, STAGES=1,
                num_warps=NUM_WARPS), chunks


def _class_order(cfg: GroupedKLConfig, groups, student, teacher, class_weight, has_topk: bool):
    """``(class order, walk)`` of the states walk: ``(None, None)`` the CLASS walk, else
    ``"ranges"`` (groups that are each one range of classes, from 2 groups), ``"ordered"``
    (gathers touching at most ORDER_MAX_SECTORS sectors per sector of a row), ``"windows"``
    (the order's window plan: dense logits of either model or both, or a dense student with
    a renormalized top-k teacher; no class weights; Triton 3.4 on), ``"ordered"`` again where
    the gathers touch no more sectors than the CLASS walk's reads of the row."""
    if groups is None or cfg.group_rule != GROUP_CLASS or walk_override == "class":
        return None, None
    if has_topk and cfg.topk_rule == TOPK_BUCKET:
        return None, None
    G = cfg.num_groups
    found = _orders.cached(groups, G)
    # (the window walk: dense logits, of one model or both, or a dense student with a
    # renormalized top-k teacher)
    windows_ok = (_k.WINDOW_WALK and class_weight is None
                  and ((not has_topk and (student is not None or teacher is not None))
                       or (has_topk and student is not None
                           and cfg.topk_rule == TOPK_RENORMALIZE)))
    if walk_override in ("ordered", "ranges"):
        if found is None:
            found = _orders.build(groups, G, with_sectors=False)
        return found._replace(ranges=walk_override == "ranges"), walk_override
    if walk_override == "windows":
        if found is None:
            found = _orders.build(groups, G, with_sectors=False)
        if found.windows is None:
            found = found._replace(windows=_orders.window_plan(found.order, found.bounds,
                                                               groups.shape[0]))
        return (found, "windows") if windows_ok and found.windows is not None else (None, None)
    if found is None:  # (orders are remembered from RANGES_MIN_GROUPS on)
        return None, None
    if found.ranges and G >= _orders.RANGES_MIN_GROUPS:
        return found, "ranges"
    if G < _orders.ORDER_MIN_GROUPS or not found.sectors:
        return None, None
    itemsize = max(_itemsize(_dtype(student)), _itemsize(None if has_topk else _dtype(teacher)))
    ratio = found.sectors.get(itemsize)
    if ratio is not None and ratio <= ORDER_MAX_SECTORS:
        return found, "ordered"
    if windows_ok and found.windows is not None:
        return found, "windows"
    reads = _group_layout(cfg)[3]
    return (found, "ordered") if ratio is not None and ratio <= reads else (None, None)


def merge_meta(cfg: GroupedKLConfig) -> Dict:
    return dict(BLOCK_G=min(MERGE_BLOCK_G, _pow2(cfg.num_groups)), num_warps=4)


def finish_meta(cfg: GroupedKLConfig, has_mask: bool, has_target: bool, has_sw: bool,
                has_glm: bool, has_bp: bool, has_num_items: bool, partial_only: bool) -> Dict:
    block_g = _pow2(cfg.num_groups)
    bucket = cfg.topk_rule == TOPK_BUCKET
    return dict(HAS_MASK=has_mask, HAS_TARGET=has_target, HAS_SW=has_sw, HAS_GLM=has_glm,
                HAS_BP=has_bp, HAS_NUM_ITEMS=has_num_items, REBALANCE=cfg.rebalance,
                WITHIN_TEACHER=cfg.within_teacher, WITH_CE=cfg.with_ce and has_target,
                REDUCTION=cfg.reduction, BUCKET=bucket,
                ONE_GROUP=cfg.num_groups == 1 and not has_glm and not bucket,
                DEN_FROM_PARTIALS=cfg.denominator_from_partials, PARTIAL_ONLY=partial_only,
                BLOCK_R=max(1, min(128, FINISH_TILE // block_g)), BLOCK_G=block_g, num_warps=4)


def grad_meta(cfg: GroupedKLConfig, student_dtype, teacher_dtype, groups_dtype, cw_dtype,
              has_topk: bool, has_target: bool, has_mask: bool, has_sw: bool, has_glm: bool,
              topk_k: int = 0, cw_log: bool = False) -> Dict:
    topk = cfg.topk_rule if has_topk else TEACHER_DENSE
    dense_t = teacher_dtype is not None and not has_topk
    bucket = topk == TOPK_BUCKET
    class_walk = cfg.group_rule == GROUP_CLASS and not bucket
    vec = _vec(student_dtype, teacher_dtype if dense_t else None,
               groups_dtype if class_walk else None, cw_dtype if dense_t else None)
    return dict(GROUP_RULE=cfg.group_rule, TOPK=topk, DENSE_T=dense_t, HAS_TARGET=has_target,
                WITH_CE=cfg.with_ce and has_target, HAS_CW=cw_dtype is not None,
                HAS_MASK=has_mask, HAS_SW=has_sw, HAS_GLM=has_glm, REBALANCE=cfg.rebalance,
                WITHIN_TEACHER=cfg.within_teacher, REDUCTION=cfg.reduction,
                ONE_GROUP=cfg.num_groups == 1 and not has_glm and not bucket,
                VEC=vec, UNROLL=max(1, CLASSES_PER_LANE // vec), LANES=LANES,
                BLOCK_G=_pow2(cfg.num_groups),
                BLOCK_K=_pow2(max(topk_k, 1)), CW_LOG=_cw_log_mode(cw_log), STAGES=1,
                num_warps=NUM_WARPS,
                # Without FMA contraction every pt (x / T - ref(m) first) is exactly 1 at a
                # one-class group's maximum (the gradient's exact zeros of the torch form).
                enable_fp_fusion=False)


def _splits(rows: int, vocab: int, block: int, device: torch.device):
    """``(S, slice_len)``: V-slices per row and classes per slice (a multiple of ``block``)."""
    if split_override is not None:
        wanted = max(1, int(split_override))
    else:
        programs = PROGRAMS_PER_SM * _sm_count(device.type, device.index)
        wanted = 1 if rows >= programs else min(_cdiv(programs, max(rows, 1)),
                                                max(1, vocab // (MIN_SLICE_BLOCKS * block)))
    slice_len = max(block, _cdiv(_cdiv(max(vocab, 1), wanted), block) * block)
    return max(1, _cdiv(vocab, slice_len)), slice_len


def _memoised(meta_fn):
    """``meta_fn`` with its results kept per arguments (and per interpreter switch): the same
    dict (read-only) for every call with the same dtypes and flags."""
    cached = functools.lru_cache(maxsize=4096)(
        lambda interpreted, args, kwargs: meta_fn(*args, **dict(kwargs)))

    @functools.wraps(meta_fn)
    def wrapper(*args, **kwargs):
        try:
            return cached(_interpreted(), args, tuple(sorted(kwargs.items())))
        except TypeError:  # an unhashable argument: computed afresh
            return meta_fn(*args, **kwargs)
    return wrapper


states_meta = _memoised(states_meta)
finish_meta = _memoised(finish_meta)
grad_meta = _memoised(grad_meta)


def _target_range(cfg: GroupedKLConfig, vocab: int):
    if cfg.vocab_total > 0:
        return 0, cfg.vocab_total
    return cfg.vocab_offset, cfg.vocab_offset + vocab


def _vocab(student, teacher, groups, class_weight) -> int:
    for t in (student, teacher):
        if t is not None:
            return t.shape[1]
    return groups.shape[0] if groups is not None else class_weight.shape[0]


def _stride(t, dim=0) -> int:
    return 0 if t is None else t.stride(dim)


def _dtype(t):
    return None if t is None else t.dtype


def states(student, teacher, topk_indices, topk_logprobs, groups, target, class_weight, mask,
           cfg: GroupedKLConfig):
    """Op 1: ``(state (N, 5, G), extras (N, 4))`` float32."""
    present = student if student is not None else (teacher if teacher is not None else topk_logprobs)
    rows, device = present.shape[0], present.device
    vocab = _vocab(student, teacher, groups, class_weight)
    G = cfg.num_groups
    state = torch.empty((rows, 5, G), dtype=torch.float32, device=device)
    extras = torch.empty((rows, 4), dtype=torch.float32, device=device)
    if rows == 0:
        return state, extras
    has_topk = cfg.topk_rule != TEACHER_DENSE and topk_indices is not None
    k = topk_indices.shape[1] if has_topk else 0
    order, walk = _class_order(cfg, groups, student, teacher, class_weight, has_topk)
    groups = _compact_ids(groups, G, rows)  # (after the order: it is attached to the original)
    class_weight, cw_log = _log_class_weights(class_weight, rows)
    meta, chunks = states_meta(cfg, _dtype(student), _dtype(teacher), _dtype(groups),
                               _dtype(class_weight), has_topk, target is not None,
                               mask is not None, k, _pairs(student), _pairs(teacher),
                               order is not None, cw_log=cw_log, ranges=walk == "ranges",
                               packed_ids=_packed_ids(groups), windows=walk == "windows")
    meta = _staged(meta)
    if not meta["ORDER"]:
        order = None
    if meta["ORDER"] == 4:
        # The window walk: the plan's meta and slots stand for the bounds and the order, and
        # the slices are ranges of its steps.
        plan = order.windows
        order = _orders.ClassOrder(plan.slots, plan.meta, {})
        num_splits, slice_len = _splits(rows, plan.steps, 1, device)
    else:
        block = LANES * meta["VEC"] * meta["UNROLL"]
        num_splits, slice_len = _splits(rows, vocab, block, device)
    if num_splits > 1:
        out_state = torch.empty((num_splits, rows, 5, G), dtype=torch.float32, device=device)
        out_extras = torch.empty((num_splits, rows, 4), dtype=torch.float32, device=device)
    else:
        out_state, out_extras = state, extras
    lo, hi = _target_range(cfg, vocab)
    dummy = state
    bucket = has_topk and cfg.topk_rule == TOPK_BUCKET
    excl = torch.empty((rows * num_splits * chunks if bucket else 1, meta["BLOCK_K"]),
                       dtype=torch.int32, device=device)
    _launch(_k.grouped_kl_states_kernel, (rows * num_splits * chunks,),
        dummy if student is None else student, dummy if teacher is None else teacher,
        topk_indices if has_topk else dummy, topk_logprobs if has_topk else dummy,
        dummy if groups is None else groups, dummy if order is None else order.order,
        dummy if order is None else order.bounds, dummy if target is None else target,
        dummy if class_weight is None else class_weight, dummy if mask is None else mask,
        out_state, out_extras, excl,
        rows, vocab, k, G, _stride(student), _stride(teacher),
        _stride(topk_indices) if has_topk else 0, _stride(topk_logprobs) if has_topk else 0,
        1.0 / cfg.temperature, cfg.vocab_offset, lo, hi, cfg.ignore_index, slice_len,
        num_splits, chunks, **meta)
    if num_splits > 1:
        _launch(_k.grouped_kl_merge_kernel, (rows,), out_state, out_extras, state, extras, rows,
                G, num_splits, **merge_meta(cfg))
    return state, extras


def finish(state, extras, mask, target, sample_weight, group_logmass, batch_partials, num_items,
           cfg: GroupedKLConfig, partial_only: bool = False):
    """Op 2: ``(loss, saved (G + 1,))``, or with ``partial_only`` the ``(2G + 2,)`` partial."""
    rows, G = state.shape[0], state.shape[-1]
    device = state.device
    meta = finish_meta(cfg, mask is not None, target is not None, sample_weight is not None,
                       group_logmass is not None, batch_partials is not None,
                       num_items is not None, partial_only)
    saved = torch.empty((G + 1,), dtype=torch.float32, device=device)
    partial = torch.empty((2 * G + 2,), dtype=torch.float32, device=device)
    if cfg.reduction == REDUCE_NONE:
        loss = torch.empty((rows,), dtype=torch.float32, device=device)
    else:
        loss = torch.empty((), dtype=torch.float32, device=device)
    dummy = saved
    _launch(_k.grouped_kl_finish_kernel, (1,),
        state, extras, dummy if mask is None else mask, dummy if target is None else target,
        dummy if sample_weight is None else sample_weight,
        dummy if group_logmass is None else group_logmass,
        dummy if batch_partials is None else batch_partials,
        dummy if num_items is None else num_items,
        loss, saved, partial, rows, G,
        0 if batch_partials is None else batch_partials.shape[0],
        _stride(group_logmass), _stride(batch_partials),
        float(cfg.temperature) ** 2, float(cfg.alpha), float(cfg.beta), float(cfg.ce_weight),
        cfg.ignore_index, float(cfg.num_items), **meta)
    if partial_only:
        return partial
    return loss, saved


def grad(student, teacher, topk_indices, topk_logprobs, groups, target, class_weight, mask,
         sample_weight, group_logmass, state, extras, saved, grad_loss, cfg: GroupedKLConfig):
    """Op 3: ``d loss / d student`` ``(N, V)``, contiguous, in the student's dtype."""
    rows, vocab = student.shape
    G = cfg.num_groups
    out = torch.empty((rows, vocab), dtype=student.dtype, device=student.device)
    if rows == 0 or vocab == 0:
        return out
    groups = _compact_ids(groups, G, rows)
    class_weight, cw_log = _log_class_weights(class_weight, rows)
    has_topk = cfg.topk_rule != TEACHER_DENSE and topk_indices is not None
    k = topk_indices.shape[1] if has_topk else 0
    meta = grad_meta(cfg, student.dtype, _dtype(teacher), _dtype(groups), _dtype(class_weight),
                     has_topk, target is not None, mask is not None, sample_weight is not None,
                     group_logmass is not None, k, cw_log=cw_log)
    meta = _staged(meta)
    block = LANES * meta["VEC"] * meta["UNROLL"]
    num_splits, slice_len = _splits(rows, vocab, block, student.device)
    class_walk = cfg.group_rule == GROUP_CLASS and not (has_topk and cfg.topk_rule == TOPK_BUCKET)
    table = torch.empty((rows * num_splits if class_walk else 1, G, 6), dtype=torch.float32,
                        device=student.device)
    dummy = table
    _launch(_k.grouped_kl_grad_kernel, (rows * num_splits,),
        student, dummy if teacher is None else teacher, topk_indices if has_topk else dummy,
        topk_logprobs if has_topk else dummy, dummy if groups is None else groups,
        dummy if target is None else target, dummy if class_weight is None else class_weight,
        dummy if mask is None else mask, dummy if sample_weight is None else sample_weight,
        dummy if group_logmass is None else group_logmass, state, extras, saved, grad_loss, out,
        table, rows, vocab, k, G, student.stride(0), _stride(teacher),
        _stride(topk_indices) if has_topk else 0, _stride(topk_logprobs) if has_topk else 0,
        _stride(group_logmass), 1.0 / cfg.temperature, float(cfg.temperature), float(cfg.alpha),
        float(cfg.beta), float(cfg.ce_weight), cfg.vocab_offset, cfg.ignore_index, slice_len,
        num_splits, **meta)
    return out


def loss_forward(student, teacher, topk_indices, topk_logprobs, groups, target, class_weight, mask,
                 sample_weight, group_logmass, num_items, cfg: GroupedKLConfig):
    """``states`` then ``finish``: ``(loss, state, extras, saved)``."""
    state, extras = states(student, teacher, topk_indices, topk_logprobs, groups, target,
                           class_weight, mask, cfg)
    loss, saved = finish(state, extras, mask, target, sample_weight, group_logmass, None,
                         num_items, cfg)
    return loss, state, extras, saved


__all__ = ["states", "finish", "grad", "loss_forward", "compact_ids", "forced_splits",
           "split_override", "forced_stages", "stages_override",
           "forced_walk", "walk_override",
           "states_meta", "finish_meta", "grad_meta", "merge_meta"]
