"""Sparse (top-k) teachers: the teacher of each row as ``k`` classes and their log-probabilities.

Language-model distillation rarely has the teacher's full logits at training time: offline
datasets store the teacher's top-k token ids and log-probabilities per position, and served
teachers return top-k log-probs. Every loss of the package accepts a :class:`TopKTeacher`
wherever it accepts teacher logits; the student stays dense. The rule for the teacher's
probability outside its top-k (``rest``), with ``p̂`` the teacher the loss uses::

    "renormalize"  p̂_j = softmax_j(lp_j / T) over the k entries, 0 elsewhere;
                   row = T^2 sum_j p̂_j (log p̂_j - log p^S_{i_j}), p^S the student's full softmax
    "restrict"     both distributions restricted to the k classes and renormalised there:
                   row = T^2 KL(p̂ || softmax_j(z^S_{i_j} / T))  (student mass off the top-k is free)
    "bucket"       (KD only, T = 1) k + 1 categories, the k classes and one rest bucket holding
                   r^T = 1 - sum_j exp(lp_j) and r^S = 1 - sum_j p^S_{i_j}:
                   row = sum_j p^T_j log(p^T_j / p^S_{i_j}) + r^T log(r^T / r^S)

LTKD: without ``group_logmass`` the teacher's group masses and within-group distributions are
those of ``p̂``. With ``group_logmass`` (the teacher's exact log group masses at the loss's
temperature, ``(..., G)``, which an offline pipeline stores at G floats per token) the
cross-group term uses them (rebalanced as usual) and group ``k``'s within-group teacher is its
top-k entries renormalised inside the group; a group without a top-k entry adds no within term.
DKD and BKD follow from their grouped form with the teacher ``p̂`` (BKD: ``p̂_j w_{i_j}``,
renormalised). Padding: ``indices == -1`` or ``logprobs == -inf`` marks an unused entry.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._validation import check_groups, check_logits_pair, check_option, check_positive

REST_RULES = ("renormalize", "restrict", "bucket")


class TopKTeacher(NamedTuple):
    """A sparse teacher, accepted by every loss in place of ``teacher_logits``.

    - ``indices``: int ``(..., k)`` class ids (``-1`` pads);
    - ``logprobs``: float ``(..., k)`` the teacher's log-probabilities at temperature 1
      (``-inf`` pads);
    - ``rest``: ``"renormalize"`` (default), ``"restrict"`` or ``"bucket"`` (module docstring);
    - ``group_logmass``: optional float ``(..., G)``, the teacher's exact log group masses at
      the loss's temperature (LTKD; build it with :func:`topk_teacher`).
    """

    indices: Tensor
    logprobs: Tensor
    rest: str = "renormalize"
    group_logmass: Optional[Tensor] = None


@torch.no_grad()
def topk_teacher(teacher_logits: Tensor, k: int, *, groups: Optional[Tensor] = None,
                 num_groups: Optional[int] = None, temperature: float = 1.0,
                 rest: str = "renormalize") -> TopKTeacher:
    """A :class:`TopKTeacher` from full teacher logits ``(..., V)``: the ``k`` most probable
    classes and their log-probabilities at T = 1, and, with ``groups``, the exact log group
    masses ``log sum_{i in k} softmax(z^T / T)_i`` at ``temperature`` (the LTKD loss's T).

    For building offline datasets: store ``indices`` (int32 is enough below 2^31 classes),
    ``logprobs`` (float16 or bfloat16 is enough) and ``group_logmass`` per token.
    """
    check_logits_pair(teacher_logits, teacher_logits, allow_float64=True,
                      names=("teacher_logits", "teacher_logits"))
    check_option("rest", rest, REST_RULES)
    temperature = check_positive("temperature", temperature)
    vocab = teacher_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, V={vocab}], got {k!r}")
    logits = teacher_logits.float() if teacher_logits.dtype != torch.float64 else teacher_logits
    logprobs, indices = torch.log_softmax(logits, -1).topk(k, dim=-1)
    group_logmass = None
    if groups is not None:
        G = check_groups(groups, vocab, num_groups, teacher_logits.device)
        scaled = torch.log_softmax(logits / temperature, -1)
        index = groups.long().expand_as(scaled)
        top = scaled.new_full(scaled.shape[:-1] + (G,), float("-inf"))
        top = top.scatter_reduce(-1, index, scaled, "amax")
        finite_top = torch.where(top == float("-inf"), torch.zeros_like(top), top)
        summed = torch.zeros_like(top).scatter_add(-1, index, torch.exp(scaled - finite_top.gather(-1, index)))
        group_logmass = finite_top + torch.log(summed)
    return TopKTeacher(indices, logprobs, rest, group_logmass)


def repeated_in_row(indices: Tensor) -> Tensor:
    """Per row of ``(R, k)`` top-k indices: whether a class (an index >= 0) occurs twice in it
    (``-1`` pads may repeat). Bool ``(R,)`` on the indices' device."""
    idx = indices.long()
    k = idx.shape[-1]
    if k < 2:
        return torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    # The pads become distinct negatives, so that only repeated classes meet after the sort.
    ordered = torch.sort(torch.where(idx >= 0, idx, -1 - torch.arange(k, device=idx.device)),
                         dim=-1).values
    return (ordered[:, 1:] == ordered[:, :-1]).any(-1)


__all__ = ["TopKTeacher", "topk_teacher", "REST_RULES", "repeated_in_row"]
