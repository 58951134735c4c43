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

Groups interleaved too finely for the ordered walk get a *window plan* (:class:`WindowPlan`,
docs/design.md "The window walk"): every lane of a program is given one group for the whole
row (lanes in proportion to the groups' sizes), and the row is walked in steps, each reading
one window of ``WINDOW_SLOTS * WINDOW_LANES`` consecutive classes densely and handing each
lane up to ``WINDOW_SLOTS`` classes of its group from it (their offsets in the window, -1
for an empty slot). A lane then walks one group, as the one-group walk does, at a cost per
element flat in G; the classes it is handed come through shared memory, not from scattered
sectors of the row.

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
# The window plan: lanes of a program (the Triton walks' 4 warps), classes handed to a lane per
# step, and the alignment of a window's first class (16 classes: 16-byte loads of fp32 rows).
WINDOW_LANES = 128
WINDOW_SLOTS = 8
WINDOW = WINDOW_LANES * WINDOW_SLOTS
WINDOW_ALIGN = 16
# Plans are made from this many groups (the CLASS walk's cost grows with G; below, within its
# budget) for groups that are not ranges, up to one lane per group.
WINDOW_MIN_GROUPS = 5


class WindowPlan(NamedTuple):
    """The window walk's plan (module docstring). ``meta`` (int32): the number of steps ``S``;
    the steps whose window lies inside the row (they come first); the group of each of the
    ``LANES`` lanes (a group's lanes consecutive, groups ascending); each of the ``G`` groups'
    last lane (-1: none); the ``S`` window starts (multiples of ``WINDOW_ALIGN``, ascending).
    ``slots`` (int16, ``(S, LANES * SLOTS)``): lane ``l``'s classes of step ``s`` are
    ``start_s + slots[s, l * SLOTS + j]``, -1 an empty slot."""
    meta: torch.Tensor
    slots: torch.Tensor
    steps: int
    fill: float                # classes / slots: the share of the walk's slots that hold one


class ClassOrder(NamedTuple):
    order: torch.Tensor        # (V,) int32: the classes sorted by group, ascending in a group
    bounds: torch.Tensor       # (G + 1,) int32: group k is order[bounds[k]:bounds[k + 1]]
    sectors: Dict[int, float]  # element size in bytes -> sectors gathered / sectors of a row
    ranges: bool = False       # every group is one range of classes (order[bounds[k]] onwards)
    windows: Optional[WindowPlan] = None  # the window walk's plan (groups interleaved)


def window_plan(order: torch.Tensor, bounds: torch.Tensor, vocab: int) -> Optional[WindowPlan]:
    """The window plan of a class order (host lists; once per distinct groups tensor), or None
    when more groups hold classes than a program has lanes.

    Lanes: one per group that holds a class, the rest in proportion to the groups' sizes
    (largest remainders). Steps, greedily: the window starts at the first class not yet
    handed out (aligned down); every group takes its next classes inside the window, up to
    its lanes' slots. Groups interleaved at random fill about 80% of the slots; groups that
    interleave class by class (``c % G``) nearly all of them."""
    import bisect

    if order.device.type == "meta":  # (the compile test's launches: shapes and dtypes only)
        steps = -(-vocab // WINDOW)
        return WindowPlan(torch.empty(2 + WINDOW_LANES + (bounds.shape[0] - 1) + steps,
                                      dtype=torch.int32, device="meta"),
                          torch.empty((steps, WINDOW), dtype=torch.int16, device="meta"), steps,
                          1.0)
    sizes = (bounds[1:] - bounds[:-1]).tolist()
    G = len(sizes)
    held = [k for k in range(G) if sizes[k] > 0]
    if not held or len(held) > WINDOW_LANES:
        return None
    spare = WINDOW_LANES - len(held)
    share = {k: sizes[k] * spare / vocab for k in held}
    lanes = {k: 1 + int(share[k]) for k in held}
    left = WINDOW_LANES - sum(lanes.values())
    for k in sorted(held, key=lambda k: (int(share[k]) - share[k], k))[:left]:
        lanes[k] += 1
    lane_group, first_lane = [], {}
    for k in held:
        first_lane[k] = len(lane_group)
        lane_group += [k] * lanes[k]
    classes = order.tolist()
    starts_of = bounds.tolist()
    # (ascending within a group; sorted again for the ids outside [0, G) that build() leaves
    # at the ends of the first and last groups' positions: handed to those groups' lanes in
    # their own windows, where the kernel's id check finds them)
    lists = {k: sorted(classes[starts_of[k]:starts_of[k + 1]]) for k in held}
    taken = {k: 0 for k in held}
    starts, rows = [], []
    while True:
        heads = [lists[k][taken[k]] for k in held if taken[k] < sizes[k]]
        if not heads:
            break
        start = min(heads) // WINDOW_ALIGN * WINDOW_ALIGN
        row = [-1] * WINDOW
        for k in held:
            p = taken[k]
            if p == sizes[k]:
                continue
            end = min(bisect.bisect_left(lists[k], start + WINDOW, p), p + lanes[k] * WINDOW_SLOTS)
            base = first_lane[k] * WINDOW_SLOTS
            row[base:base + end - p] = [c - start for c in lists[k][p:end]]
            taken[k] = end
        starts.append(start)
        rows.append(row)
    inside = sum(1 for s in starts if s + WINDOW <= vocab)
    group_last = [first_lane[k] + lanes[k] - 1 if k in lanes else -1 for k in range(G)]
    meta = torch.tensor([len(starts), inside] + lane_group + group_last + starts,
                        dtype=torch.int32)
    slots = torch.tensor(rows, dtype=torch.int16).reshape(len(starts), WINDOW)
    return WindowPlan(meta.to(order.device), slots.to(order.device), len(starts),
                      vocab / (len(starts) * WINDOW))


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
    windows = None
    if with_sectors and vocab > 0 and not ranges and num_groups >= WINDOW_MIN_GROUPS:
        windows = window_plan(order, bounds, vocab)
    return ClassOrder(order.to(torch.int32), bounds.to(torch.int32), sectors, ranges, windows)


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


__all__ = ["ClassOrder", "ORDER_MIN_GROUPS", "RANGES_MIN_GROUPS", "WindowPlan", "attach", "build",
           "cached", "remember", "remember_for_triton", "window_plan"]
