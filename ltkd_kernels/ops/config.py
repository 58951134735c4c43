"""The options of the grouped-KL operators, as the kernels see them (see docs/design.md).

Every backend's ``states``, ``finish`` and ``grad`` take the same tensors and one
:class:`GroupedKLConfig` of plain numbers, so that a loss is fully described by it.
"""
from __future__ import annotations

from typing import NamedTuple

# Group rules: how class i maps to a group.
GROUP_ONE = 0      # G = 1, every class in group 0 (KD, BKD)
GROUP_CLASS = 1    # groups[i] from a (V,) tensor (LTKD)
GROUP_TARGET = 2   # group 0 = the row's target class, group 1 the rest (DKD)

# Teacher inputs.
TEACHER_DENSE = -1        # (N, V) logits
TOPK_RENORMALIZE = 0      # top-k log-probs, renormalised over the entries at T
TOPK_RESTRICT = 1         # both models restricted to the entries
TOPK_BUCKET = 2           # the entries plus one rest bucket (KD, T = 1)
TOPK_RULES = {"renormalize": TOPK_RENORMALIZE, "restrict": TOPK_RESTRICT, "bucket": TOPK_BUCKET}

# Reductions.
REDUCE_NONE = 0
REDUCE_SUM = 1
REDUCE_MEAN = 2
REDUCTIONS = {"none": REDUCE_NONE, "sum": REDUCE_SUM, "batchmean": REDUCE_MEAN}

# State slots: state[r, slot, k].
SLOT_MAX_STUDENT, SLOT_SUM_STUDENT, SLOT_MAX_TEACHER, SLOT_SUM_TEACHER, SLOT_GAP = range(5)
NUM_SLOTS = 5
# Extras slots: extras[r, slot].
EXTRA_MAX_RAW, EXTRA_SUM_RAW, EXTRA_TARGET_LOGIT, EXTRA_TARGET_FOUND = range(4)
NUM_EXTRAS = 4

# The largest number of groups any backend accepts (per-row states are 5 G floats).
MAX_GROUPS = 1024


class GroupedKLConfig(NamedTuple):
    """Everything but the tensors. ``num_groups``: G; ``temperature``: T; ``alpha``, ``beta``:
    the cross and within weights; ``rebalance``: LTKD's batch rebalancing of the teacher's group
    masses; ``within_teacher``: weight the within-group KLs by the teacher's group masses
    (else 1); ``ce_weight``: weight of the student's cross-entropy (T = 1) with ``target``;
    ``reduction``: ``REDUCE_*``; ``group_rule``: ``GROUP_*``; ``topk_rule``: ``TEACHER_DENSE``
    or ``TOPK_*``; ``vocab_offset``: the first class of this vocabulary shard (targets are
    global); ``vocab_total``: the whole vocabulary's size (0: this call's V), the bound of a
    valid target; ``ignore_index``: a target equal to it marks an invalid row (when ``target`` is
    given); ``num_items``: the ``batchmean`` denominator when > 0 (else the valid rows' weight,
    a ``num_items`` tensor argument overriding both); ``denominator_from_partials``: with
    ``batch_partials``, take that denominator from them (the global batch: data-parallel
    ``global_batchmean``, fused-linear chunks) instead of from this call's rows."""

    num_groups: int = 1
    temperature: float = 1.0
    alpha: float = 1.0
    beta: float = 1.0
    rebalance: bool = False
    within_teacher: bool = False
    ce_weight: float = 0.0
    reduction: int = REDUCE_MEAN
    group_rule: int = GROUP_ONE
    topk_rule: int = TEACHER_DENSE
    vocab_offset: int = 0
    vocab_total: int = 0
    ignore_index: int = -100
    num_items: float = 0.0
    denominator_from_partials: bool = False

    @property
    def with_ce(self) -> bool:
        return self.ce_weight != 0.0
