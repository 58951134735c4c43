"""Process groups as operator arguments, and the collectives of the distributed losses.

Custom operators take strings, not ``ProcessGroup`` objects: :func:`group_name` registers a
group under a name and the operators look it up with :func:`resolve`.

- **Data parallel** (``process_group``): LTKD's batch statistic and, with
  ``global_batchmean``, the ``batchmean`` denominator are over every rank's valid rows. Each rank
  computes its ``(2G + 2,)`` batch partial; one all-gather gives every rank all of them, merged
  in rank order (exact in log space, the same on every rank).
- **Vocabulary parallel** (``vocab_process_group``): each rank holds a contiguous slice of the
  classes, in rank order. The per-row states merge exactly (docs/design.md): one all-reduce MAX
  of the maxima, each rank rescales its sums and gaps to the global maxima, one all-reduce SUM.
  The backward needs no communication.
"""
from __future__ import annotations

import threading
from typing import Dict, Tuple

import torch
from torch import Tensor

from .config import NUM_SLOTS, SLOT_GAP, SLOT_MAX_STUDENT, SLOT_MAX_TEACHER, SLOT_SUM_STUDENT, SLOT_SUM_TEACHER
from .grouped_kl_torch import ref

_lock = threading.Lock()
_registered: Dict[str, object] = {}
_layouts: Dict[Tuple[str, int], Tuple[int, int]] = {}


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


def gather_partials(partial: Tensor, group) -> Tensor:
    """All ranks' ``(2G + 2,)`` batch partials as ``(world, 2G + 2)``, in rank order."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    gathered = partial.new_empty((world * partial.numel(),))
    dist.all_gather_into_tensor(gathered, partial.contiguous(), group=group)
    return gathered.reshape(world, partial.numel())


def vocab_layout(local_vocab: int, group) -> Tuple[int, int]:
    """``(vocab_offset, vocab_total)`` of this rank's contiguous class slice: the slices are in
    rank order (Megatron's layout). One all-gather of the slice sizes the first time a
    (group, local size) pair is seen, cached afterwards."""
    import torch.distributed as dist

    key = (group_name(group, "vocab_process_group"), local_vocab)
    with _lock:
        cached = _layouts.get(key)
    if cached is not None:
        return cached
    device = torch.device("cuda", torch.cuda.current_device()) if (
        dist.get_backend(group) == "nccl") else torch.device("cpu")
    size = torch.tensor([local_vocab], dtype=torch.int64, device=device)
    sizes = size.new_empty((dist.get_world_size(group),))
    dist.all_gather_into_tensor(sizes, size, group=group)
    sizes = sizes.tolist()
    rank = dist.get_rank(group)
    layout = (int(sum(sizes[:rank])), int(sum(sizes)))
    with _lock:
        _layouts[key] = layout
    return layout


def merge_vocab_shards(state: Tensor, extras: Tensor, group) -> Tuple[Tensor, Tensor]:
    """The states of the whole vocabulary from each rank's shard states: exact, two collectives."""
    import torch.distributed as dist

    rows, _, G = state.shape
    local_max = torch.cat([state[:, SLOT_MAX_STUDENT], state[:, SLOT_MAX_TEACHER],
                           extras[:, :1]], 1)
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    m_s, m_t, m_x = global_max[:, :G], global_max[:, G:2 * G], global_max[:, 2 * G]

    def rescaled(s, m_local, m_global):
        return torch.where(s == 0, torch.zeros_like(s), s * torch.exp(ref(m_local) - ref(m_global)))

    s_t_local = state[:, SLOT_SUM_TEACHER]
    drift = (ref(m_s) - ref(state[:, SLOT_MAX_STUDENT])) - (ref(m_t) - ref(state[:, SLOT_MAX_TEACHER]))
    gap = torch.where(s_t_local == 0, torch.zeros_like(s_t_local),
                      (state[:, SLOT_GAP] + s_t_local * drift)
                      * torch.exp(ref(state[:, SLOT_MAX_TEACHER]) - ref(m_t)))
    sums = torch.cat([rescaled(state[:, SLOT_SUM_STUDENT], state[:, SLOT_MAX_STUDENT], m_s),
                      rescaled(s_t_local, state[:, SLOT_MAX_TEACHER], m_t), gap,
                      rescaled(extras[:, 1], extras[:, 0], m_x).unsqueeze(1), extras[:, 2:4]], 1)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    merged = torch.stack([m_s, sums[:, :G], m_t, sums[:, G:2 * G], sums[:, 2 * G:3 * G]], 1)
    merged_extras = torch.cat([m_x.unsqueeze(1), sums[:, 3 * G:]], 1)
    assert merged.shape[1] == NUM_SLOTS
    return merged.contiguous(), merged_extras.contiguous()


def communication_bytes(rows: int, num_groups: int, world: int, *, vocab_parallel: bool,
                        data_parallel: bool) -> int:
    """Bytes each rank sends into the collectives of one forward (for the benchmarks)."""
    total = 0
    if vocab_parallel:
        total += 4 * rows * (2 * num_groups + 1) + 4 * rows * (3 * num_groups + 3)
    if data_parallel:
        total += 4 * (2 * num_groups + 2)
    return total


__all__ = ["group_name", "resolve", "gather_partials", "vocab_layout", "merge_vocab_shards",
           "communication_bytes"]
