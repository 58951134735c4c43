"""The class order of a groups tensor: its classes sorted by group, for the Triton walk that
takes one group at a time (docs/design.md, "The ordered walk").

With many groups the CLASS walk's work per element grows with G (each group costs a compare
and three predicated sums per element); walking the groups one by one through the class order
costs the same per element for any G, but gathers the logits. Whether the gathers move more
memory than the CLASS walk depends on how the groups interleave; ``sectors`` measures it: the
32-byte sectors the gathers of all groups touch, relative to one dense read of the row (1 for
groups that are ranges of classes; about ``G (1 - (1 - 1/G)^16)`` for bf16 logits whose groups
are drawn at random). Groups that are each one range of classes, in any order (a long tail
whose classes are numbered by frequency, either way round) need no gather at all: each
group's range is read densely, one group after the other, at any G from 2.

The order is computed where the groups' values are already checked (once per distinct tensor,
:mod:`ltkd_kernels._arguments`), with the same key (version counter, storage address, G), and
attached to the tensor: the launchers only look it up (no host synchronisation per call). A
write that bypasses the version counter (``.data``, numpy) leaves a stale order: the kernel
checks every class's id against its position's group, and a mismatch gives a NaN row, never a
wrong value.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch

from .._validation import _compiling

# The gathering ordered walk is considered from this many groups (below, the CLASS walk's cost
# per element is within its budget: docs/design.md).
ORDER_MIN_GROUPS = 5
# The order is computed from this many groups: groups that are each one range of classes are
# walked group by group with dense reads at any G >= 2.
RANGES_MIN_GROUPS = 2
SECTOR_BYTES = 32
_ATTRIBUTE = "_ltkd_kernels_class_order"


class ClassOrder(NamedTuple):
    order: torch.Tensor        # (V,) int32: the classes sorted by group, ascending in a group
    bounds: torch.Tensor       # (G + 1,) int32: group k is order[bounds[k]:bounds[k + 1]]
    sectors: Dict[int, float]  # element size in bytes -> sectors gathered / sectors of a row
    ranges: bool = False       # every group is one range of classes (order[bounds[k]] onwards)


def build(groups: torch.Tensor, num_groups: int, with_sectors: bool = True) -> ClassOrder:
    """The class order of ``groups`` (ids outside ``[0, G)`` land in the first or last group's
    positions, where the kernel's per-element check finds them). ``with_sectors`` reads the
    sector counts and whether every group is one range of classes back to the host (one
    synchronisation)."""
    ids = groups.long()
    vocab = ids.shape[0]
    order = torch.argsort(ids, stable=True)
    bounds = torch.searchsorted(ids[order], torch.arange(num_groups + 1, device=ids.device))
    bounds[0] = 0
    bounds[num_groups] = vocab
    sectors: Dict[int, float] = {}
    ranges = False
    if with_sectors and vocab > 0:
        classes = torch.arange(vocab, device=ids.device)
        for itemsize in (2, 4):
            per_sector = SECTOR_BYTES // itemsize
            row_sectors = -(-vocab // per_sector)
            touched = torch.unique(ids.clamp(-1, num_groups) * row_sectors
                                   + classes // per_sector).numel()
            sectors[itemsize] = touched / row_sectors
        # (within a group the order ascends: one range iff its last class - first = size - 1)
        sizes = bounds[1:] - bounds[:-1]
        held = sizes > 0
        first = order[bounds[:-1].clamp(max=vocab - 1)]
        last = order[(bounds[1:] - 1).clamp(min=0)]
        ranges = bool(((last - first == sizes - 1) | ~held).all())
    return ClassOrder(order.to(torch.int32), bounds.to(torch.int32), sectors, ranges)


def _key(groups: torch.Tensor, num_groups: int):
    return (groups._version, groups.data_ptr(), groups.shape[0], num_groups)


def cached(groups: Optional[torch.Tensor], num_groups: int) -> Optional[ClassOrder]:
    """The order attached to ``groups`` for ``num_groups``, if still current."""
    held = getattr(groups, _ATTRIBUTE, None)
    if held is not None and held[0] == _key(groups, num_groups):
        return held[1]
    return None


def attach(groups: torch.Tensor, num_groups: int, order: ClassOrder) -> None:
    """Attach ``order`` to ``groups`` (a copy of the ids it was computed from: the Triton
    launchers' compact ids) under the copy's own key."""
    try:
        setattr(groups, _ATTRIBUTE, (_key(groups, num_groups), order))
    except (AttributeError, RuntimeError):  # a tensor subclass that refuses attributes
        pass


def remember(groups: torch.Tensor, num_groups: int) -> Optional[ClassOrder]:
    """Compute (once per distinct tensor and G) and attach the class order of ``groups``."""
    if num_groups < RANGES_MIN_GROUPS or groups.device.type == "meta":
        return None
    found = cached(groups, num_groups)
    if found is not None:
        return found
    found = build(groups, num_groups)
    attach(groups, num_groups, found)
    return found


def remember_for_triton(groups: torch.Tensor, num_groups: int, backend: str) -> None:
    """:func:`remember` where the Triton walk may run (a CUDA tensor, or ``backend="triton"``),
    outside ``torch.compile`` (whose graphs cannot take the host read)."""
    if (num_groups >= RANGES_MIN_GROUPS and (groups.device.type == "cuda" or backend == "triton")
            and not _compiling()):
        remember(groups, num_groups)


__all__ = ["ClassOrder", "ORDER_MIN_GROUPS", "RANGES_MIN_GROUPS", "attach", "build", "cached",
           "remember", "remember_for_triton"]
