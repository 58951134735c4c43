"""Process groups as operator arguments, and the collectives of the distributed losses.

Custom operators take strings, not ``ProcessGroup`` objects: :func:`group_name` registers a
group under a name and the operators look it up with :func:`resolve`.

- **Data parallel** (``process_group``): LTKD's batch statistic and, with
  ``global_batchmean``, the ``batchmean`` denominator are over every rank's valid rows. Each rank
  computes its ``(2G + 2,)`` batch partial; one all-gather gives every rank all of them, merged
  in rank order (exact in log space, the same on every rank). No collective at all when the
  result does not depend on the other ranks (no rebalancing, and no global denominator).
- **Vocabulary parallel** (``vocab_process_group``): each rank holds a contiguous slice of the
  classes, in rank order (Megatron's layout; the slices may be uneven). The per-row states
  merge exactly (docs/design.md): one all-reduce MAX of the maxima, each rank rescales its sums
  and gaps to the global maxima, one all-reduce SUM. Every rank then holds the states of the
  whole vocabulary, so ``finish`` gives every rank the same, full loss, and the backward (the
  closed-form gradient of this rank's slice from the merged states) needs no communication.

Per forward of a vocabulary-parallel loss, with ``N`` rows, ``G`` groups and ``W`` ranks,
float32 (see :func:`communication_bytes`):

- all-reduce MAX of ``N (2G + c) + 2W + 2`` floats: ``m^S``, ``m^T`` per group, ``m^X`` when
  the cross-entropy is asked for (``c = 1``), and the layout check below;
- all-reduce SUM of ``N (3G + 2c + t)`` floats: ``s^S``, ``s^T``, ``g`` per group, ``s^X`` and
  ``x_t`` with the cross-entropy, ``found`` when a target is given (``t = 1``).

**The layout** (``vocab_offset``, ``vocab_total`` of this rank's slice) comes from one
all-gather of the slice sizes the first time a rank sees a (group, local size) pair, cached
afterwards (:func:`vocab_layout`), or from :func:`set_vocab_layout` with no communication at
all. The cache decides locally, so one group object should carry one vocabulary split: if two
heads split their vocabularies differently over the same ranks, register both layouts or give
each head its own group (``dist.new_group`` over the same ranks), since a rank whose local size
was already cached would skip the all-gather that another rank makes. Every call verifies the
layout in-band (the ``2W + 2`` floats of the MAX: each rank's claimed offset, end and total),
free of extra collectives: an inconsistent layout raises ``RuntimeError`` on every rank for CPU
tensors and makes every rank's loss NaN on a GPU (no host synchronisation), never a silently
wrong loss.
"""
from __future__ import annotations

import threading
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .config import (
    EXTRA_MAX_RAW,
    EXTRA_SUM_RAW,
    EXTRA_TARGET_FOUND,
    EXTRA_TARGET_LOGIT,
    NUM_EXTRAS,
    SLOT_GAP,
    SLOT_MAX_STUDENT,
    SLOT_MAX_TEACHER,
    SLOT_SUM_STUDENT,
    SLOT_SUM_TEACHER,
)
from .grouped_kl_torch import ref

_lock = threading.RLock()
_registered: Dict[str, object] = {}
_layouts: Dict[Tuple[str, int], Tuple[int, int]] = {}
_claims: Dict[tuple, Tensor] = {}


def _is_process_group(group) -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(group, dist.ProcessGroup)


def group_name(group, argument: str) -> str:
    """The name under which ``group`` (a ``torch.distributed.ProcessGroup`` or ``None``) is
    passed to the operators; ``""`` for ``None``. Raises ``TypeError`` naming ``argument``."""
    if group is None:
        return ""
    if not _is_process_group(group):
        raise TypeError(f"{argument} must be a torch.distributed.ProcessGroup or None, "
                        f"got {type(group).__name__}")
    name = f"pg{id(group)}"
    with _lock:
        if name not in _registered:
            _registered[name] = group
    return name


def resolve(name: str):
    """The process group registered under ``name`` (``None`` for ``""``)."""
    if not name:
        return None
    return _registered[name]


def _all_gather_single(output: Tensor, tensor: Tensor, group) -> None:
    """``torch.distributed.all_gather_single``, or its older name ``all_gather_into_tensor``
    (deprecated by the torch versions that have the new one)."""
    import torch.distributed as dist

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def gather_partials(partial: Tensor, group) -> Tensor:
    """All ranks' ``(2G + 2,)`` batch partials as ``(world, 2G + 2)``, in rank order."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    gathered = partial.new_empty((world * partial.numel(),))
    _all_gather_single(gathered, partial.contiguous(), group)
    return gathered.reshape(world, partial.numel())


# ---------------------------------------------------------------------------------------------
# The vocabulary layout.

def _collective_device(group) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def set_vocab_layout(group, sizes: Sequence[int]) -> Tuple[int, int]:
    """Register the vocabulary split of ``group``: ``sizes[r]`` classes on rank ``r`` of the
    group (contiguous slices in rank order), so that no call ever all-gathers them. Megatron's
    padded, even split: ``set_vocab_layout(tp_group, [padded_vocab // tp] * tp)``. Call it with
    the same sizes on every rank. Returns this rank's ``(vocab_offset, vocab_total)``."""
    import torch.distributed as dist

    sizes = [int(s) for s in sizes]
    world = dist.get_world_size(group)
    if len(sizes) != world or any(s < 1 for s in sizes):
        raise ValueError(f"set_vocab_layout needs one size >= 1 per rank of the group "
                         f"({world}), got {sizes}")
    rank = dist.get_rank(group)
    layout = (sum(sizes[:rank]), sum(sizes))
    key = (group_name(group, "group"), sizes[rank])
    with _lock:
        _layouts[key] = layout
    return layout


def vocab_layout(local_vocab: int, group) -> Tuple[int, int]:
    """``(vocab_offset, vocab_total)`` of this rank's contiguous class slice: the slices are in
    rank order (Megatron's layout). One all-gather of the slice sizes the first time a
    (group, local size) pair is seen, cached afterwards (or registered by
    :func:`set_vocab_layout`: no communication)."""
    import torch.distributed as dist

    key = (group_name(group, "vocab_process_group"), int(local_vocab))
    with _lock:
        cached = _layouts.get(key)
    if cached is not None:
        return cached
    size = torch.tensor([local_vocab], dtype=torch.int64, device=_collective_device(group))
    sizes = size.new_empty((dist.get_world_size(group),))
    _all_gather_single(sizes, size, group)
    sizes = sizes.tolist()
    rank = dist.get_rank(group)
    layout = (int(sum(sizes[:rank])), int(sum(sizes)))
    with _lock:
        _layouts[key] = layout
    return layout


def _layout_claims(layout: Tuple[int, int, int], rank: int, world: int, dtype, device) -> Tensor:
    """This rank's ``(2W + 2,)`` part of the MAX all-reduce that checks the layout: its offset
    and end at its own slot of two ``(W,)`` vectors (``-inf`` elsewhere), then ``total`` and
    ``-total``. (Integers below 2^24 are exact in float32; equal integers always compare equal,
    so the check never fires on a consistent layout.) Built on the device with scalar fills (no
    host-to-device copy, so no synchronisation) and cached: it is only ever read."""
    key = (layout, rank, world, dtype, device)
    with _lock:
        cached = _claims.get(key)
    if cached is not None:
        return cached
    offset, local, total = layout
    claims = torch.full((2 * world + 2,), float("-inf"), dtype=dtype, device=device)
    claims[rank] = float(offset)
    claims[world + rank] = float(offset + local)
    claims[2 * world] = float(total)
    claims[2 * world + 1] = -float(total)
    with _lock:
        _claims[key] = claims
    return claims


def _layout_consistent(reduced: Tensor, world: int) -> Tensor:
    """From the reduced claims: every offset is the previous rank's end, the first is 0, and
    every rank's total is the last end. A 0-dim bool tensor (no host read)."""
    offsets, ends = reduced[:world], reduced[world:2 * world]
    top, neg_bottom = reduced[2 * world], reduced[2 * world + 1]
    ok = (offsets[0] == 0) & (top == -neg_bottom) & (ends[-1] == top)
    if world > 1:
        ok = ok & (offsets[1:] == ends[:-1]).all()
    return ok


def _raise_inconsistent(reduced: Tensor, world: int, layout: Tuple[int, int, int]) -> None:
    offsets = [int(v) for v in reduced[:world].tolist()]
    ends = [int(v) for v in reduced[world:2 * world].tolist()]
    sizes = [e - o for o, e in zip(offsets, ends)]
    raise RuntimeError(
        f"vocab_process_group: the ranks disagree on the vocabulary layout (slice sizes in "
        f"rank order {sizes}, claimed offsets {offsets}, totals from "
        f"{-int(reduced[2 * world + 1])} to {int(reduced[2 * world])}; this rank used offset "
        f"{layout[0]}, total {layout[2]}). A group carries one vocabulary split: register it with "
        f"ltkd_kernels.ops.distributed.set_vocab_layout, or use one group object per split.")


# ---------------------------------------------------------------------------------------------
# The exact merge of vocabulary shards.

def merge_vocab_shards(state: Tensor, extras: Tensor, group, *, with_ce: bool = True,
                       with_target: bool = True,
                       layout: Optional[Tuple[int, int, int]] = None) -> Tuple[Tensor, Tensor]:
    """The states ``(N, 5, G)`` and extras ``(N, 4)`` of the whole vocabulary from this rank's
    shard states: exact (the merge of docs/design.md), the same bits on every rank, two
    collectives (all-reduce MAX, then all-reduce SUM).

    ``with_ce``: merge the cross-entropy extras ``m^X, s^X, x_t`` (else they stay 0, as
    ``states`` leaves them without a cross-entropy); ``with_target``: sum ``found`` (a valid row
    whose target no rank holds then has ``found = 0``: its loss is NaN). ``layout``:
    ``(vocab_offset, local_vocab, vocab_total)`` this rank's states were computed with, checked
    in-band against every other rank's (see the module docstring); ``None`` skips the check.
    Every rank of ``group`` must make the call with the same ``N``, ``G``, flags and ``layout``
    presence (the collectives' sizes depend on them).
    """
    import torch.distributed as dist

    rows, _, G = state.shape
    dtype, device = state.dtype, state.device
    world = dist.get_world_size(group)
    maxima = [state[:, SLOT_MAX_STUDENT], state[:, SLOT_MAX_TEACHER]]
    if with_ce:
        maxima.append(extras[:, EXTRA_MAX_RAW:EXTRA_MAX_RAW + 1])
    reduced = torch.cat(maxima, 1).reshape(-1)
    if layout is not None:
        claims = _layout_claims(layout, dist.get_rank(group), world, dtype, device)
        reduced = torch.cat([reduced, claims])
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=group)
    consistent = None
    if layout is not None:
        tail = reduced[rows * (2 * G + int(with_ce)):]
        consistent = _layout_consistent(tail, world)
        if device.type == "cpu" and not bool(consistent):
            # Every rank reads the same reduced claims: all raise, none waits in the SUM.
            _raise_inconsistent(tail, world, layout)
    global_max = reduced[:rows * (2 * G + int(with_ce))].reshape(rows, 2 * G + int(with_ce))
    m_s, m_t = global_max[:, :G], global_max[:, G:2 * G]

    def rescaled(s, m_local, m_global):
        return torch.where(s == 0, torch.zeros_like(s), s * torch.exp(ref(m_local) - ref(m_global)))

    m_s_local, m_t_local = state[:, SLOT_MAX_STUDENT], state[:, SLOT_MAX_TEACHER]
    s_t_local = state[:, SLOT_SUM_TEACHER]
    drift = (ref(m_s) - ref(m_s_local)) - (ref(m_t) - ref(m_t_local))
    moved = (state[:, SLOT_GAP] + s_t_local * drift) * torch.exp(ref(m_t_local) - ref(m_t))
    gap = torch.where(s_t_local == 0, torch.zeros_like(s_t_local), moved)
    sums = [rescaled(state[:, SLOT_SUM_STUDENT], m_s_local, m_s),
            rescaled(s_t_local, m_t_local, m_t), gap]
    if with_ce:
        m_x = global_max[:, 2 * G]
        sums.append(rescaled(extras[:, EXTRA_SUM_RAW], extras[:, EXTRA_MAX_RAW], m_x).unsqueeze(1))
        sums.append(extras[:, EXTRA_TARGET_LOGIT:EXTRA_TARGET_LOGIT + 1])
    if with_target:
        sums.append(extras[:, EXTRA_TARGET_FOUND:EXTRA_TARGET_FOUND + 1])
    sums = torch.cat(sums, 1)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)

    merged = torch.stack([m_s, sums[:, :G], m_t, sums[:, G:2 * G], sums[:, 2 * G:3 * G]], 1)
    merged_extras = torch.zeros((rows, NUM_EXTRAS), dtype=extras.dtype, device=device)
    column = 3 * G
    if with_ce:
        merged_extras[:, EXTRA_MAX_RAW] = m_x
        merged_extras[:, EXTRA_SUM_RAW] = sums[:, column]
        merged_extras[:, EXTRA_TARGET_LOGIT] = sums[:, column + 1]
        column += 2
    if with_target:
        merged_extras[:, EXTRA_TARGET_FOUND] = sums[:, column]
    if consistent is not None and device.type != "cpu":
        nan = torch.full((), float("nan"), dtype=dtype, device=device)
        merged = torch.where(consistent, merged, nan)
        merged_extras = torch.where(consistent, merged_extras, nan)
    return merged.contiguous(), merged_extras


def communication_bytes(rows: int, num_groups: int, world: int, *, vocab_parallel: bool = True,
                        data_parallel: bool = False, with_ce: bool = False,
                        with_target: bool = False, layout_check: bool = True) -> Dict[str, int]:
    """Bytes each rank contributes to the collectives of one forward (float32 buffers; a ring
    all-reduce moves about twice that over the wire): ``{"all_reduce_max", "all_reduce_sum",
    "all_gather", "total"}``. ``world``: the vocabulary group's size; ``data_parallel``: the
    all-gather of the ``(2G + 2,)`` batch partial is made (LTKD's rebalancing, or
    ``global_batchmean``). None of it depends on the vocabulary's size."""
    G, ce, target = num_groups, int(with_ce), int(with_target)
    out = {"all_reduce_max": 0, "all_reduce_sum": 0, "all_gather": 0}
    if vocab_parallel:
        out["all_reduce_max"] = 4 * (rows * (2 * G + ce) + (2 * world + 2 if layout_check else 0))
        out["all_reduce_sum"] = 4 * rows * (3 * G + 2 * ce + target)
    if data_parallel:
        out["all_gather"] = 4 * (2 * G + 2)
    out["total"] = sum(out.values())
    return out


__all__ = ["group_name", "resolve", "gather_partials", "set_vocab_layout", "vocab_layout",
           "merge_vocab_shards", "communication_bytes"]
