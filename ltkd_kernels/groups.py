"""Class-count helpers: group assignment (head/medium/tail) and effective-number class weights."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._validation import check_class_counts, is_int, is_real


def groups_from_counts(class_counts, num_groups: int = 3, *, thresholds: Optional[Sequence[float]] = None):
    """Group id per class from its training-set count; int64 ``(V,)``, 0 = most frequent.

    Without ``thresholds``: classes sorted by count, descending (ties by class index), cut into
    ``num_groups`` contiguous parts whose sizes differ by at most one, larger parts first.
    With descending ``thresholds=(t_1, ..., t_m)``: group 0 is ``n > t_1``, group ``j`` is
    ``t_{j+1} <= n <= t_j``, the last is ``n < t_m`` (``(100, 20)`` gives many/medium/few-shot).
    """
    counts = check_class_counts(class_counts)
    if thresholds is not None:
        try:
            cuts = [float(t) for t in thresholds]
        except (TypeError, ValueError):
            raise TypeError(f"thresholds must be a sequence of numbers, got {thresholds!r}") from None
        if not cuts or any(b >= a for a, b in zip(cuts, cuts[1:])):
            raise ValueError(f"thresholds must be non-empty and strictly descending, got {tuple(cuts)}")
        n = counts.double()
        group = torch.zeros(counts.shape[0], dtype=torch.int64, device=counts.device)
        # Group 0: n > t_1; each later threshold t_j sends n < t_j one group further down, except
        # the first, which also sends n == t_1 (so the medium band is closed on both ends).
        group += (n <= cuts[0]).long()
        for t in cuts[1:]:
            group += (n < t).long()
        return group
    if not is_int(num_groups):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    vocab = counts.shape[0]
    if not 1 <= num_groups <= vocab:
        raise ValueError(f"num_groups must be in [1, number of classes = {vocab}], got {num_groups}")
    # Stable sort of -count gives descending counts with ties in class order.
    order = torch.sort(-counts.double(), stable=True).indices
    base, extra = divmod(vocab, num_groups)
    sizes = [base + (1 if k < extra else 0) for k in range(num_groups)]
    rank_group = torch.repeat_interleave(torch.arange(num_groups, device=counts.device),
                                         torch.tensor(sizes, device=counts.device))
    group = torch.empty(vocab, dtype=torch.int64, device=counts.device)
    group[order] = rank_group
    return group


def class_balanced_weights(class_counts, beta: float = 0.9999):
    """Effective-number class weights, float32 ``(V,)`` summing to ``V``.

    ``w_c = (1 - beta) / (1 - beta^{n_c})``, normalised so ``sum_c w_c = V``; ``beta = 0``
    gives all ones. Every count must be >= 1.
    """
    counts = check_class_counts(class_counts)
    if not is_real(beta):
        raise TypeError(f"beta must be a number in [0, 1), got {type(beta).__name__}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must lie in [0, 1), got {beta}")
    n = counts.double()
    if bool((n < 1).any()):
        raise ValueError(f"class_counts must all be >= 1, got a minimum of {n.min().item():g}")
    effective_number = (1.0 - torch.pow(float(beta), n)) / (1.0 - beta)
    weights = 1.0 / effective_number
    return (weights * (n.shape[0] / weights.sum())).float()
