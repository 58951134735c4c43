"""The grouped-KL operators in plain torch: the executable form of docs/design.md.

``states``, ``finish`` and ``grad`` here compute exactly what the Triton and C++ kernels compute,
with the same arguments and the same conventions (NaN and ``-inf`` rules, invalid rows, bad
indices), on ``(N, V)`` tensors at once. They serve as the backend of ``backend="auto"`` where
no kernel can run, as the place where the state algebra (``merge_states``,
``merge_partials``) is written for the distributed paths, and as the specification that the
kernels are tested against. They are not the reference of the losses (that is
:mod:`ltkd_kernels.reference`, written from the losses' equations, differentiable by autograd).

All arithmetic is float32 (float64 when a logits input is float64).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..topk import repeated_in_row
from .config import (
    GROUP_CLASS,
    GROUP_ONE,
    GROUP_TARGET,
    NUM_EXTRAS,
    NUM_SLOTS,
    REDUCE_MEAN,
    REDUCE_NONE,
    TEACHER_DENSE,
    TOPK_BUCKET,
    TOPK_RESTRICT,
    GroupedKLConfig,
)

NEG_INF = float("-inf")


def ref(m: Tensor) -> Tensor:
    """The reference point of a group: its maximum, or 0 while it has no finite logit."""
    return torch.where(m == NEG_INF, torch.zeros_like(m), m)


def _compute_dtype(*tensors) -> torch.dtype:
    present = [t for t in tensors if t is not None]
    return torch.float64 if any(t.dtype == torch.float64 for t in present) else torch.float32


def row_valid(rows: int, mask: Optional[Tensor], target: Optional[Tensor],
              ignore_index: int, device) -> Tensor:
    """``(mask != 0) & (target != ignore_index)``, each factor only where given."""
    valid = torch.ones(rows, dtype=torch.bool, device=device)
    if mask is not None:
        valid = valid & (mask.reshape(-1) != 0)
    if target is not None:
        valid = valid & (target.reshape(-1) != ignore_index)
    return valid


def _class_groups(columns: Tensor, groups: Optional[Tensor], target: Optional[Tensor],
                  cfg: GroupedKLConfig) -> Tuple[Tensor, Tensor]:
    """Group of each class in ``columns`` (``(N, C)`` or ``(1, C)`` class indices) and a per-row
    flag of ids outside ``[0, G)``. Bad ids are clamped to 0 (the row's state becomes NaN)."""
    if cfg.group_rule == GROUP_ONE:
        return torch.zeros_like(columns), torch.zeros(columns.shape[0], dtype=torch.bool,
                                                      device=columns.device)
    if cfg.group_rule == GROUP_CLASS:
        ids = groups.long()[columns.clamp(0, groups.shape[0] - 1)]
        bad = (ids < 0) | (ids >= cfg.num_groups)
        return torch.where(bad, torch.zeros_like(ids), ids), bad.any(-1)
    if cfg.group_rule == GROUP_TARGET:
        local = (target.long() - cfg.vocab_offset).reshape(-1, 1)
        ids = (columns != local).long()
        return ids, torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    raise ValueError(f"unknown group rule {cfg.group_rule}")


def _group_state(b: Tensor, a: Optional[Tensor], ids: Tensor, num_groups: int,
                 student_max: Optional[Tensor] = None):
    """``(m^S, s^S, m^T, s^T, g)`` per group from values ``b`` (student) and ``a`` (teacher)
    of shape ``(N, C)`` with group ids ``ids``. ``a = None``: teacher slots 0. With
    ``student_max`` given, ``g`` is taken relative to it instead of the maxima of ``b``."""
    rows, dtype, device = b.shape[0], b.dtype, b.device
    ids = ids.expand_as(b)

    # The sums are accumulated in float64: scatter_add adds in sequence, and the within-group
    # KL of near-identical distributions is a small difference of the sums' logarithms.
    wide = torch.float64

    def max_and_sum(x):
        m = torch.full((rows, num_groups), NEG_INF, dtype=dtype, device=device)
        m = m.scatter_reduce(1, ids, x, "amax", include_self=True)
        terms = torch.exp(x - ref(m).gather(1, ids)).to(wide)
        s = torch.zeros(m.shape, dtype=wide, device=device).scatter_add(1, ids, terms)
        return m, s.to(dtype)

    m_s, s_s = max_and_sum(b)
    zeros = torch.zeros_like(m_s)
    if a is None:
        return m_s, s_s, zeros, zeros, zeros
    m_t, s_t = max_and_sum(a)
    reference_student = ref(m_s if student_max is None else student_max).gather(1, ids)
    shifted_a = a - ref(m_t).gather(1, ids)
    terms = (torch.exp(shifted_a) * (shifted_a - (b - reference_student))).to(wide)
    terms = torch.where(a == NEG_INF, torch.zeros_like(terms), terms)
    g = torch.zeros(m_s.shape, dtype=wide, device=device).scatter_add(1, ids, terms)
    return m_s, s_s, m_t, s_t, g.to(dtype)


def _topk_entries(topk_indices: Tensor, topk_logprobs: Tensor, vocab: int, dtype):
    """Valid entries, safe (clamped) indices and a per-row flag of bad or repeated indices."""
    idx = topk_indices.long()
    lp = topk_logprobs.to(dtype)
    valid = (idx >= 0) & (lp != NEG_INF)
    bad = ((idx < -1) | (idx >= vocab)).any(-1) | repeated_in_row(idx)
    return valid, idx.clamp(0, max(vocab - 1, 0)), lp, bad


def _raise_on_host(bad: Tensor, name: str, what: str) -> None:
    """On CPU tensors a bad index raises ``ValueError`` (reading it costs nothing); on a GPU the
    row's state becomes NaN instead, as in the Triton kernels (no host synchronisation)."""
    if bad.device.type == "cpu" and bool(bad.any()):
        raise ValueError(f"{name} {what}")


def states(student: Optional[Tensor], teacher: Optional[Tensor], topk_indices: Optional[Tensor],
           topk_logprobs: Optional[Tensor], groups: Optional[Tensor], target: Optional[Tensor],
           class_weight: Optional[Tensor], mask: Optional[Tensor],
           cfg: GroupedKLConfig) -> Tuple[Tensor, Tensor]:
    """Op 1 of docs/design.md: ``(state (N, 5, G), extras (N, 4))``."""
    present = student if student is not None else (teacher if teacher is not None else topk_logprobs)
    rows = present.shape[0]
    device = present.device
    dtype = _compute_dtype(student, teacher)
    if student is not None:
        vocab = student.shape[1]
    elif teacher is not None:
        vocab = teacher.shape[1]
    else:
        vocab = groups.shape[0] if groups is not None else class_weight.shape[0]
    G = cfg.num_groups
    inv_t = 1.0 / cfg.temperature
    columns = torch.arange(vocab, device=device).unsqueeze(0)
    ids, bad = _class_groups(columns, groups, target, cfg)
    log_weight = None if class_weight is None else torch.log(class_weight.to(dtype))
    if cfg.group_rule == GROUP_TARGET:
        bad = bad.expand(rows) if bad.shape[0] == 1 else bad
    b = None if student is None else student.to(dtype) * inv_t

    if cfg.topk_rule == TEACHER_DENSE:
        a = None
        if teacher is not None:
            a = teacher.to(dtype) * inv_t
            if log_weight is not None:
                a = a + log_weight
        if b is None:  # teacher only: its slots, student slots 0
            m_t, s_t, _, _, _ = _group_state(a, None, ids, G)
            zeros = torch.zeros_like(m_t)
            state = torch.stack([zeros, zeros, m_t, s_t, zeros], 1)
        else:
            state = torch.stack(_group_state(b, a, ids, G), 1)
    else:
        valid_entry, idx, lp, bad_entry = _topk_entries(topk_indices, topk_logprobs, vocab, dtype)
        bad = bad_entry | (bad if bad.shape[0] == rows else bad.expand(rows))
        a = lp * inv_t
        if log_weight is not None:
            a = a + log_weight[idx]
        a = torch.where(valid_entry, a, torch.full_like(a, NEG_INF))
        entry_ids, entry_bad = _class_groups(idx, groups, target, cfg)
        bad = bad | entry_bad
        if b is None:
            m_t, s_t, _, _, _ = _group_state(a, None, entry_ids, G)
            zeros = torch.zeros_like(m_t)
            state = torch.stack([zeros, zeros, m_t, s_t, zeros], 1)
        else:
            b_entry = torch.where(valid_entry, b.gather(1, idx), torch.full_like(a, NEG_INF))
            if cfg.topk_rule == TOPK_BUCKET:
                state = _bucket_state(b, b_entry, a, valid_entry, idx, vocab)
            elif cfg.topk_rule == TOPK_RESTRICT:
                state = torch.stack(_group_state(b_entry, a, entry_ids, G), 1)
            else:
                m_s, s_s, _, _, _ = _group_state(b, None, ids, G)
                _, _, m_t, s_t, g = _group_state(b_entry, a, entry_ids, G, student_max=m_s)
                state = torch.stack([m_s, s_s, m_t, s_t, g], 1)

    extras = torch.zeros(rows, NUM_EXTRAS, dtype=dtype, device=device)
    valid = row_valid(rows, mask, target, cfg.ignore_index, device)
    _raise_on_host(bad & valid if bad.shape[0] == rows else bad, "groups / teacher_logits.indices",
                   f"hold a group id outside [0, {G}) or a top-k index outside [-1, V={vocab}) "
                   "or repeated in a row")
    if target is not None:
        local = target.long().reshape(-1) - cfg.vocab_offset
        found = (local >= 0) & (local < vocab)
        if cfg.vocab_total == 0:
            _raise_on_host(valid & ~found, "target", f"must hold class indices in [0, V={vocab}) "
                           f"(or ignore_index={cfg.ignore_index})")
        extras[:, 3] = found.to(dtype)
        if cfg.with_ce:
            x = student.to(dtype)
            m_x = x.amax(-1) if vocab > 0 else torch.full((rows,), NEG_INF, dtype=dtype, device=device)
            extras[:, 0] = m_x
            extras[:, 1] = torch.exp(x - ref(m_x).unsqueeze(-1)).sum(-1)
            x_t = x.gather(1, local.clamp(0, vocab - 1).unsqueeze(-1)).squeeze(-1)
            extras[:, 2] = torch.where(found, x_t, torch.zeros_like(x_t))
    state = torch.where(bad.reshape(-1, 1, 1), torch.full_like(state, float("nan")), state)
    state = torch.where(valid.reshape(-1, 1, 1), state, torch.zeros_like(state))
    extras = torch.where(valid.reshape(-1, 1), extras, torch.zeros_like(extras))
    return state.to(_state_dtype(dtype)), extras.to(_state_dtype(dtype))


def _state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_states(first: Tensor, second: Tensor) -> Tensor:
    """The exact merge of two states ``(N, 5, G)`` over disjoint class sets."""
    m_s1, s_s1, m_t1, s_t1, g1 = first.unbind(1)
    m_s2, s_s2, m_t2, s_t2, g2 = second.unbind(1)
    m_s, m_t = torch.maximum(m_s1, m_s2), torch.maximum(m_t1, m_t2)

    def rescaled(s, m_old, m_new):
        return torch.where(s == 0, torch.zeros_like(s), s * torch.exp(ref(m_old) - ref(m_new)))

    def gap(g_j, s_t_j, m_s_j, m_t_j):
        drift = (ref(m_s) - ref(m_s_j)) - (ref(m_t) - ref(m_t_j))
        moved = torch.where(s_t_j == 0, torch.zeros_like(g_j),
                            (g_j + s_t_j * drift) * torch.exp(ref(m_t_j) - ref(m_t)))
        return moved

    return torch.stack([
        m_s, rescaled(s_s1, m_s1, m_s) + rescaled(s_s2, m_s2, m_s),
        m_t, rescaled(s_t1, m_t1, m_t) + rescaled(s_t2, m_t2, m_t),
        gap(g1, s_t1, m_s1, m_t1) + gap(g2, s_t2, m_s2, m_t2),
    ], 1)


def merge_extras(first: Tensor, second: Tensor) -> Tensor:
    """The merge of two extras ``(N, 4)`` over disjoint class sets."""
    m = torch.maximum(first[:, 0], second[:, 0])
    s = sum(torch.where(e[:, 1] == 0, torch.zeros_like(m), e[:, 1] * torch.exp(ref(e[:, 0]) - ref(m)))
            for e in (first, second))
    return torch.stack([m, s, first[:, 2] + second[:, 2], first[:, 3] + second[:, 3]], 1)


def log_group_mass(m: Tensor, s: Tensor) -> Tensor:
    """``log p_k = lse_k - logsumexp_j lse_j`` from ``(m, s)``, keeping maxima and sums apart."""
    if m.shape[-1] == 1:
        # 0, or NaN when the row has no finite logit (s = 0: no distribution) or a NaN / inf sum.
        return torch.log(s / s)
    r = ref(m)
    top = torch.where(s != 0, r, torch.full_like(r, NEG_INF)).amax(-1, keepdim=True)
    top = ref(top)
    shift = r - top
    weighted = torch.where(s == 0, torch.zeros_like(s), s * torch.exp(shift))
    return shift + torch.log(s) - torch.log(weighted.sum(-1, keepdim=True))


def log_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``log(numerator / denominator)`` of two positive sums: ``log1p`` of their relative
    difference when they are close (the within-group KL of near-identical distributions is a
    small difference of these logarithms), the difference of logarithms otherwise."""
    close = (numerator >= 0.5 * denominator) & (numerator <= 2.0 * denominator)
    near = torch.log1p((numerator - denominator) / denominator)
    return torch.where(close, near, torch.log(numerator) - torch.log(denominator))


def within_kl(state: Tensor) -> Tensor:
    """``KL(pt^T_k || pt^S_k)`` per group: 0 for a massless teacher group, ``+inf`` where the
    student group has no mass but the teacher's has."""
    _, s_s, _, s_t, g = state.unbind(1)
    inner = g / s_t + log_ratio(s_s, s_t)
    inner = torch.where((s_s == 0) & (s_t > 0), torch.full_like(inner, float("inf")), inner)
    return torch.where(s_t == 0, torch.zeros_like(inner), inner)


def _kl_terms(log_q: Tensor, log_p: Tensor) -> Tensor:
    """``q (log q - log p)`` with ``0 log 0 = 0``, ``+inf`` where ``p = 0 < q``, NaN kept."""
    base = torch.exp(log_q) * (log_q - log_p)
    base = torch.where((log_p == NEG_INF) & (log_q > NEG_INF), torch.full_like(base, float("inf")), base)
    return torch.where(log_q == NEG_INF, torch.zeros_like(base), base)


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0`` (clamped), accurate at both ends."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _bucket_state(b: Tensor, b_entry: Tensor, lp: Tensor, valid_entry: Tensor, indices: Tensor,
                  vocab: int) -> Tensor:
    """BUCKET's G = 2 state: group 0 the top-k entries (both models), group 1 the rest.

    The rest masses are the small differences ``1 - top``, so they are formed where they do
    not cancel: the student's ``s_rest``, the sum of ``exp(b_i - ref(m_all))`` over the classes
    off the entries (directly, never as ``s_all - s_top``), the teacher's
    ``log r^T = log(1 - sum_j exp(lp_j))`` with the top's
    log-sum taken as ``lp_max + log1p(sum_{j != max} exp(lp_j - lp_max))``. Group 1 holds
    ``[m_all, s_rest, log r^T, no_rest, 0]``, ``no_rest = 1`` when the entries cover all V
    classes (no rest bucket for either model)."""
    wide = torch.float64
    top = _group_state(b_entry, lp, torch.zeros_like(b_entry, dtype=torch.long), 1)
    # The classes off the entries form the rest group, with its own max like any group: a
    # confident student's rest mass (e^-40, e^-200 of the row) is beyond the resolution of
    # 1 - top in any float format, and beyond float32's range relative to the row's max.
    rows = b.shape[0]
    off_entries = torch.ones(rows, vocab + 1, dtype=torch.bool, device=b.device)
    column = torch.where(valid_entry, indices, torch.full_like(indices, vocab))
    off_entries = off_entries.scatter(1, column, False)[:, :vocab]
    b_rest = torch.where(off_entries, b, torch.full_like(b, NEG_INF))
    m_rest = b_rest.amax(-1, keepdim=True)
    terms = torch.where(off_entries, torch.exp(b_rest - ref(m_rest)), torch.zeros_like(b))
    s_rest = terms.to(wide).sum(-1, keepdim=True)
    lp_max = lp.amax(-1, keepdim=True)
    others = torch.exp((lp - ref(lp_max)).to(wide)).sum(-1, keepdim=True) - 1.0
    log_top_teacher = lp_max.to(wide) + torch.log1p(others.clamp_min(-1.0))
    no_rest = valid_entry.sum(-1, keepdim=True) == vocab
    log_rest_teacher = torch.where(no_rest, torch.full_like(log_top_teacher, NEG_INF),
                                   _log1mexp(log_top_teacher))
    s_rest = torch.where(no_rest, torch.zeros_like(s_rest), s_rest)
    m_rest = torch.where(no_rest, torch.full_like(m_rest, NEG_INF), m_rest)
    dtype = b.dtype
    rest = (m_rest, s_rest.to(dtype), log_rest_teacher.to(dtype), no_rest.to(dtype),
            torch.zeros_like(m_rest))
    return torch.stack([torch.cat([x, y], 1) for x, y in zip(top, rest)], 1)


def _group_masses(state: Tensor, group_logmass: Optional[Tensor], cfg: GroupedKLConfig):
    """``(log p^S, log p^T)`` per row and group (BUCKET: over ``[top-k, rest]``)."""
    m_s, s_s, m_t, s_t, _ = state.unbind(1)
    if cfg.topk_rule == TOPK_BUCKET:
        # [top-k, rest]: the teacher's top mass is the entries' own (at T = 1 their log-probs
        # are exact), the rest is 1 minus it (0 if rounding puts the top above 1); the student's
        # top mass is its entries' share of the whole row. Entries covering all V classes leave
        # no rest for either model.
        log_p_student = log_group_mass(m_s, s_s)
        log_top_teacher = ref(m_t[:, :1]) + torch.log(s_t[:, :1])
        return log_p_student, torch.cat([log_top_teacher, m_t[:, 1:]], 1)
    log_p_student = log_group_mass(m_s, s_s)
    log_p_teacher = log_group_mass(m_t, s_t) if group_logmass is None else group_logmass.to(state.dtype)
    return log_p_student, log_p_teacher


def batch_partial(log_p_teacher: Tensor, valid: Tensor, weight: Tensor) -> Tensor:
    """``[max_r log p^T_{r,k}, sum_r exp(log p^T_{r,k} - ref(max)), n_valid, sum_valid w]``."""
    lp = torch.where(valid.unsqueeze(-1), log_p_teacher, torch.full_like(log_p_teacher, NEG_INF))
    if lp.shape[0] == 0:
        top = torch.full((lp.shape[1],), NEG_INF, dtype=lp.dtype, device=lp.device)
    else:
        top = lp.amax(0)
    total = torch.exp(lp - ref(top)).sum(0)
    count = valid.sum().to(lp.dtype).reshape(1)
    weight_sum = torch.where(valid, weight, torch.zeros_like(weight)).sum().reshape(1)
    return torch.cat([top, total, count, weight_sum])


def merge_partials(partials: Tensor) -> Tensor:
    """Merge ``(P, 2G + 2)`` batch partials in order into one ``(2G + 2,)``."""
    G = (partials.shape[1] - 2) // 2
    top_each, total_each = partials[:, :G], partials[:, G:2 * G]
    top = top_each.amax(0)
    rescaled = torch.where(total_each == 0, torch.zeros_like(total_each),
                           total_each * torch.exp(ref(top_each) - ref(top)))
    return torch.cat([top, rescaled.sum(0), partials[:, 2 * G:].sum(0)])


def log_rebalance_scale(partial: Tensor, num_groups: int) -> Tensor:
    """``log s_k = log mean_{nonempty j} pB_j - log pB_k`` (``-inf`` for an empty group)."""
    G = num_groups
    count = partial[2 * G]
    log_pb = ref(partial[:G]) + torch.log(partial[G:2 * G]) - torch.log(count.clamp_min(1.0))
    nonempty = log_pb != NEG_INF
    log_mean = (torch.logsumexp(torch.where(nonempty, log_pb, torch.full_like(log_pb, NEG_INF)), 0)
                - torch.log(nonempty.sum().to(log_pb.dtype).clamp_min(1.0)))
    return torch.where(nonempty, log_mean - log_pb, torch.full_like(log_pb, NEG_INF))


def _log_q(log_p_teacher: Tensor, log_scale: Tensor, rebalance: bool) -> Tensor:
    if not rebalance:
        return log_p_teacher
    shifted = log_scale + log_p_teacher
    return shifted - torch.logsumexp(shifted, -1, keepdim=True)


def _weights(sample_weight: Optional[Tensor], rows: int, dtype, device) -> Tensor:
    if sample_weight is None:
        return torch.ones(rows, dtype=dtype, device=device)
    return sample_weight.reshape(-1).to(dtype)


def _target_found_ok(extras: Tensor, target: Optional[Tensor], cfg: GroupedKLConfig) -> Optional[Tensor]:
    """A valid row's target must be a class of the (whole) vocabulary: else its loss is NaN."""
    if target is None:
        return None
    return extras[:, 3] == 1


def row_losses(state: Tensor, extras: Tensor, target: Optional[Tensor],
               group_logmass: Optional[Tensor], log_scale: Tensor, cfg: GroupedKLConfig) -> Tensor:
    """``row_r = kl_r + ce_weight ce_r`` of every row (valid or not)."""
    T2 = cfg.temperature ** 2
    log_p_student, log_p_teacher = _group_masses(state, group_logmass, cfg)
    within = within_kl(state)
    if cfg.topk_rule == TOPK_BUCKET:
        cross = _kl_terms(log_p_teacher, log_p_student).sum(-1)
        kl = cross + torch.exp(log_p_teacher[:, 0]) * within[:, 0]
    elif state.shape[-1] == 1 and group_logmass is None:
        # One group: both group masses are 1 (log 0, or NaN for a row with no distribution),
        # the cross term is 0 and c = 1.
        kl = T2 * cfg.beta * within[:, 0] + (log_p_student[:, 0] + log_p_teacher[:, 0])
    else:
        log_q = _log_q(log_p_teacher, log_scale, cfg.rebalance)
        cross = _kl_terms(log_q, log_p_student).sum(-1)
        c = torch.exp(log_p_teacher) if cfg.within_teacher else torch.ones_like(within)
        kl = T2 * (cfg.alpha * cross + cfg.beta * (c * within).sum(-1))
    found_ok = _target_found_ok(extras, target, cfg)
    if found_ok is not None:
        kl = torch.where(found_ok, kl, torch.full_like(kl, float("nan")))
    if cfg.with_ce:
        ce = ref(extras[:, 0]) + torch.log(extras[:, 1]) - extras[:, 2]
        kl = kl + cfg.ce_weight * ce
    return kl


def finish(state: Tensor, extras: Tensor, mask: Optional[Tensor], target: Optional[Tensor],
           sample_weight: Optional[Tensor], group_logmass: Optional[Tensor],
           batch_partials: Optional[Tensor], num_items: Optional[Tensor],
           cfg: GroupedKLConfig, partial_only: bool = False):
    """Op 2 of docs/design.md: ``(loss, saved (G + 1,))``, or the ``(2G + 2,)`` batch partial."""
    rows, G = state.shape[0], state.shape[-1]
    dtype, device = state.dtype, state.device
    valid = row_valid(rows, mask, target, cfg.ignore_index, device)
    weight = _weights(sample_weight, rows, dtype, device)
    _, log_p_teacher = _group_masses(state, group_logmass, cfg)
    if partial_only:
        return batch_partial(log_p_teacher, valid, weight)
    own = batch_partial(log_p_teacher, valid, weight)
    partial = own if batch_partials is None else merge_partials(batch_partials.to(dtype))
    if cfg.rebalance and cfg.topk_rule != TOPK_BUCKET:
        log_scale = log_rebalance_scale(partial, G)
    else:
        log_scale = torch.zeros(log_p_teacher.shape[1], dtype=dtype, device=device)
    row = row_losses(state, extras, target, group_logmass, log_scale, cfg)
    contribution = torch.where(valid, weight * row, torch.zeros_like(row))
    denominator = _denominator(own, partial, batch_partials, num_items, cfg, dtype, device)
    if cfg.reduction == REDUCE_NONE:
        loss = contribution
    else:
        total = contribution.sum()
        loss = total if cfg.reduction != REDUCE_MEAN else torch.where(
            denominator != 0, total / torch.where(denominator != 0, denominator, 1.0),
            torch.zeros_like(total))
    saved = torch.cat([log_scale.reshape(-1), denominator.reshape(1)]).to(torch.float32 if dtype != torch.float64 else dtype)
    return loss.to(_state_dtype(dtype)), saved


def _denominator(own, partial, batch_partials, num_items, cfg, dtype, device) -> Tensor:
    if cfg.reduction != REDUCE_MEAN:
        return torch.ones((), dtype=dtype, device=device)
    if num_items is not None:
        return num_items.reshape(()).to(dtype)
    if cfg.num_items > 0:
        return torch.full((), cfg.num_items, dtype=dtype, device=device)
    source = partial if (batch_partials is not None and cfg.denominator_from_partials) else own
    return source[-1]


def grad(student: Tensor, teacher: Optional[Tensor], topk_indices: Optional[Tensor],
         topk_logprobs: Optional[Tensor], groups: Optional[Tensor], target: Optional[Tensor],
         class_weight: Optional[Tensor], mask: Optional[Tensor], sample_weight: Optional[Tensor],
         group_logmass: Optional[Tensor], state: Tensor, extras: Tensor, saved: Tensor,
         grad_loss: Tensor, cfg: GroupedKLConfig) -> Tensor:
    """Op 3 of docs/design.md: the gradient with respect to ``student``, in its dtype."""
    rows, vocab = student.shape
    G = state.shape[-1]
    dtype = state.dtype
    device = student.device
    valid = row_valid(rows, mask, target, cfg.ignore_index, device)
    weight = _weights(sample_weight, rows, dtype, device)
    log_scale, denominator = saved[:G].to(dtype), saved[G].to(dtype)
    upstream = grad_loss.to(dtype).reshape(-1) if cfg.reduction == REDUCE_NONE else grad_loss.to(dtype).reshape(())
    upstream = upstream * weight
    if cfg.reduction == REDUCE_MEAN:
        upstream = torch.where(denominator != 0, upstream / torch.where(denominator != 0, denominator, 1.0),
                               torch.zeros_like(upstream))
    upstream = torch.where(valid, upstream, torch.zeros_like(upstream)).unsqueeze(-1)

    T = cfg.temperature
    inv_t = 1.0 / T
    b = student.to(dtype) * inv_t
    m_s, s_s, m_t, s_t, _ = state.unbind(1)
    log_p_student, log_p_teacher = _group_masses(state, group_logmass, cfg)
    has_teacher = s_t != 0

    columns = torch.arange(vocab, device=device).unsqueeze(0)
    ids, _ = _class_groups(columns, groups, target, cfg)
    ids = ids.expand(rows, vocab)

    def within_probability(x, m, s, group_ids):
        shifted = x - ref(m).gather(1, group_ids) - torch.log(s).gather(1, group_ids)
        return torch.where(x == NEG_INF, torch.zeros_like(x), torch.exp(shifted))

    if cfg.topk_rule == TOPK_BUCKET:
        # At the entries: u (P p^S_i - p^T_i). Off them: u (P r^S - r^T) pt^rest_i, with
        # pt^rest the student's distribution within the rest group (never r^T / r^S, which
        # overflows when r^S is tiny). P = P^T_top + r^T: 1 + max(0, P^T_top - 1) with a rest
        # bucket (exactly 1 unless rounded log-probs put the top above 1), P^T_top without one.
        has_rest = log_p_teacher[:, 1] != NEG_INF
        excess = torch.expm1(log_p_teacher[:, 0])
        excess = torch.where(has_rest, excess.clamp_min(0.0), excess)
        total = 1.0 + excess
        log_r_t, log_r_s = log_p_teacher[:, 1], log_p_student[:, 1]
        # r^S - r^T, from the larger of the two without cancellation or overflow
        rest_gap = torch.where(log_r_s >= log_r_t,
                               -torch.exp(log_r_s) * torch.expm1(log_r_t - log_r_s),
                               torch.exp(log_r_t) * torch.expm1(log_r_s - log_r_t))
        rest_gap = torch.where(has_rest | (log_r_s != NEG_INF), rest_gap, torch.zeros_like(rest_gap))
        coef_rest = torch.exp(log_r_s) * excess + rest_gap
        pt_rest = within_probability(b, m_s[:, 1:], s_s[:, 1:], torch.zeros_like(ids))
        out = coef_rest.unsqueeze(-1) * pt_rest
        # p^S_i = pt^S_i (within the top, its own max) times P^S_top, for every class.
        log_all = (ref(m_s[:, :1]) + torch.log(s_s[:, :1])) - log_p_student[:, :1]
        p_student = torch.where(b == NEG_INF, torch.zeros_like(b), torch.exp(b - log_all))
        valid_entry, idx, lp, _ = _topk_entries(topk_indices, topk_logprobs, vocab, dtype)
        at_entries = (total.unsqueeze(-1) * p_student.gather(1, idx)
                      - torch.where(valid_entry, torch.exp(lp), torch.zeros_like(lp)))
        # Overwrite the entries' columns; pads go to an extra column that is cut off.
        column = torch.where(valid_entry, idx, torch.full_like(idx, vocab))
        out = torch.cat([out, torch.zeros_like(out[:, :1])], 1).scatter(1, column, at_entries)[:, :vocab]
        out = upstream * out
    else:
        # d row / d b_i = cross_k pt^S_i + within_k (pt^S_i - pt^T_i): the within part as a
        # difference of probabilities, exact where they agree (a one-class group).
        if state.shape[-1] == 1 and group_logmass is None and cfg.topk_rule != TOPK_BUCKET:
            coef_cross = torch.zeros_like(log_p_student)
            coef_within = cfg.beta * has_teacher.to(dtype)
        else:
            log_q = _log_q(log_p_teacher, log_scale, cfg.rebalance)
            c = torch.exp(log_p_teacher) if cfg.within_teacher else torch.ones_like(log_p_teacher)
            coef_cross = cfg.alpha * (torch.exp(log_p_student) - torch.exp(log_q))
            coef_within = cfg.beta * c * has_teacher.to(dtype)
        scale = upstream * T
        if cfg.topk_rule == TEACHER_DENSE:
            a = teacher.to(dtype) * inv_t
            if class_weight is not None:
                a = a + torch.log(class_weight.to(dtype))
            pt_s = within_probability(b, m_s, s_s, ids)
            pt_t = within_probability(a, m_t, s_t, ids)
            out = scale * (coef_cross.gather(1, ids) * pt_s
                           + coef_within.gather(1, ids) * (pt_s - pt_t))
        else:
            valid_entry, idx, lp, _ = _topk_entries(topk_indices, topk_logprobs, vocab, dtype)
            a = lp * inv_t
            if class_weight is not None:
                a = a + torch.log(class_weight.to(dtype))[idx]
            a = torch.where(valid_entry, a, torch.full_like(a, NEG_INF))
            entry_ids, _ = _class_groups(idx, groups, target, cfg)
            pt_t = within_probability(a, m_t, s_t, entry_ids)
            teacher_part = coef_within.gather(1, entry_ids) * pt_t
            if cfg.topk_rule == TOPK_RESTRICT:
                b_entry = torch.where(valid_entry, b.gather(1, idx), torch.full_like(a, NEG_INF))
                pt_s = within_probability(b_entry, m_s, s_s, entry_ids)
                entries = scale * (coef_cross.gather(1, entry_ids) * pt_s
                                   + coef_within.gather(1, entry_ids) * (pt_s - pt_t))
                entries = torch.where(valid_entry, entries, torch.zeros_like(entries))
                out = torch.zeros_like(b).scatter_add(1, idx, entries)
            else:
                # Dense student part everywhere, then the teacher's part at the entries.
                pt_s = within_probability(b, m_s, s_s, ids)
                out = scale * (coef_cross + coef_within).gather(1, ids) * pt_s
                entries = torch.where(valid_entry, scale * teacher_part, torch.zeros_like(teacher_part))
                out = out.scatter_add(1, idx, -entries)
    if cfg.with_ce and target is not None:
        x = student.to(dtype)
        softmax = torch.exp(x - ref(extras[:, :1]) - torch.log(extras[:, 1:2]))
        softmax = torch.where(x == NEG_INF, torch.zeros_like(softmax), softmax)
        local = target.long().reshape(-1, 1) - cfg.vocab_offset
        hit = (columns == local).to(dtype)
        out = out + upstream * cfg.ce_weight * (softmax - hit)
    out = torch.where(valid.unsqueeze(-1), out, torch.zeros_like(out))
    return out.to(student.dtype)


def loss_forward(student, teacher, topk_indices, topk_logprobs, groups, target, class_weight, mask,
                 sample_weight, group_logmass, num_items, cfg: GroupedKLConfig):
    """``states`` then ``finish``: ``(loss, state, extras, saved)`` (one process, one shard)."""
    state, extras = states(student, teacher, topk_indices, topk_logprobs, groups, target,
                           class_weight, mask, cfg)
    loss, saved = finish(state, extras, mask, target, sample_weight, group_logmass, None,
                         num_items, cfg)
    return loss, state, extras, saved


__all__ = ["states", "finish", "grad", "loss_forward", "merge_states", "merge_extras",
           "merge_partials", "batch_partial", "log_group_mass", "within_kl", "row_losses",
           "log_rebalance_scale", "row_valid", "ref", "NUM_SLOTS"]
