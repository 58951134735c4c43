"""Pure-PyTorch reference of every loss in the package (``backend="torch"``).

Written to be read: each function is its loss's equation in plain tensor code, with the same
signature as the public function. It is the ground truth that every kernel is tested against,
and it is differentiable (``torch.autograd.gradcheck`` passes in float64). It shares no code
with the kernels or their operators. The equations are also in docs/losses.md.

Notation, per row ``r`` and temperature ``T``:

- ``b = z^S / T``, ``a = z^T / T`` (BKD adds ``log w`` to ``a``);
- ``log p = log_softmax(x)`` over the row; per group ``k``: the group mass
  ``log P_k = logsumexp_{i in k} log p_i`` (``-inf`` for a group without mass) and the
  within-group probability ``log pt_i = log p_i - log P_{g(i)}``;
- ``KL(u || v) = sum u log(u / v)`` with ``0 log 0 = 0``.

Every loss below is the grouped KL

    l_r = T^2 [ alpha KL(q_r || P^S_r) + beta sum_k c_{r,k} KL(pt^T_{r,k} || pt^S_{r,k}) ]

with a choice of groups, of the teacher's group distribution ``q`` and of the weights ``c``,
plus ``ce_weight`` times the student's cross-entropy (T = 1) when asked for. A within-group KL
whose teacher group has no mass is 0 (there is nothing to match). Everything is computed in
log space (group masses far below float32's range stay exact), in float32, or float64 for
float64 inputs. A row whose student or teacher has no distribution (all logits ``-inf``) or
holds NaN / ``+inf`` gets NaN.

Rows: ``valid_r = mask_r != 0 and target_r != ignore_index``; an invalid row has loss 0, no
gradient, and takes no part in any batch statistic. Reductions: ``"none"`` (``w_r l_r``, 0 at
invalid rows), ``"sum"``, ``"batchmean"`` (the sum over ``D``: ``num_items_in_batch`` when
given, else the valid rows' total weight, their number without ``sample_weight``; 0 when
``D = 0``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._validation import check_groups, check_logits_pair, check_positive, check_target

__all__ = ["group_logsumexp", "kd_loss", "ltkd_loss", "dkd_loss", "bkd_loss", "srw_weights"]

NEG_INF = float("-inf")
_REDUCTIONS = ("batchmean", "sum", "none")


# ---------------------------------------------------------------------------------------------
# Log-space building blocks (safe gradients: no NaN from branches that are not taken).

def _logsumexp(x: Tensor, dim: int) -> Tensor:
    """``log sum exp x`` along ``dim``; ``-inf`` (with zero gradient) over an all ``-inf`` slice."""
    m = x.detach().amax(dim, keepdim=True)
    m = torch.where(m == NEG_INF, torch.zeros_like(m), m)
    total = torch.exp(x - m).sum(dim)
    zero = total == 0
    lse = m.squeeze(dim) + torch.log(torch.where(zero, torch.ones_like(total), total))
    return torch.where(zero, torch.full_like(lse, NEG_INF), lse)


def _group_log_mass(log_p: Tensor, row_groups: Tensor, num_groups: int) -> Tensor:
    """``(N, G)``: ``log P_k = logsumexp_{i in k} log p_i``; ``row_groups`` ``(N or 1, V)``."""
    row_groups = row_groups.expand_as(log_p)
    columns = [_logsumexp(log_p.masked_fill(row_groups != k, NEG_INF), -1) for k in range(num_groups)]
    return torch.stack(columns, -1)


def _kl_terms(log_u: Tensor, log_v: Tensor) -> Tensor:
    """``u (log u - log v)`` elementwise: 0 where ``u = 0``, ``+inf`` where ``v = 0 < u``."""
    zero = log_u == NEG_INF
    safe_u = torch.where(zero, torch.zeros_like(log_u), log_u)
    safe_v = torch.where(zero, torch.zeros_like(log_v), log_v)
    return torch.where(zero, torch.zeros_like(log_u), torch.exp(safe_u) * (safe_u - safe_v))


def _within_log_prob(log_p: Tensor, log_mass: Tensor, row_groups: Tensor) -> Tensor:
    """``log pt_i = log p_i - log P_{g(i)}`` (``-inf`` where ``p_i = 0``)."""
    index = row_groups.expand_as(log_p)
    zero = log_p == NEG_INF
    mass = log_mass.gather(1, index)
    safe_mass = torch.where(zero | (mass == NEG_INF), torch.zeros_like(mass), mass)
    return torch.where(zero, log_p, log_p - safe_mass)


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ---------------------------------------------------------------------------------------------
# The grouped KL.

def _rebalanced_log_q(log_mass_teacher: Tensor, valid: Tensor, process_group) -> Tensor:
    """LTKD's rebalanced teacher group distribution, in log space:

        log pB_k = logsumexp_{valid r} log P^T_{r,k} - log n_valid      (all ranks' rows)
        log s_k  = log mean_{j: pB_j > 0} pB_j - log pB_k               (-inf for an empty group)
        log q_k  = log s_k + log P^T_k - logsumexp_j (log s_j + log P^T_j)
    """
    lp = log_mass_teacher.detach()
    lp = torch.where(valid.unsqueeze(-1), lp, torch.full_like(lp, NEG_INF))
    G = lp.shape[-1]
    top = lp.amax(0) if lp.shape[0] else torch.full((G,), NEG_INF, dtype=lp.dtype, device=lp.device)
    top = torch.where(top == NEG_INF, torch.zeros_like(top), top)
    partial = torch.cat([top, torch.exp(lp - top).sum(0), valid.sum().reshape(1).to(lp.dtype)])
    if process_group is not None:
        import torch.distributed as dist

        world = dist.get_world_size(process_group)
        everyone = partial.new_empty((world * partial.numel(),))
        from .ops.distributed import _all_gather_single

        _all_gather_single(everyone, partial, process_group)
        everyone = everyone.reshape(world, -1)
        top = everyone[:, :G].amax(0)
        total = (everyone[:, G:2 * G] * torch.exp(everyone[:, :G] - top)).sum(0)
        count = everyone[:, 2 * G].sum()
    else:
        total, count = partial[G:2 * G], partial[2 * G]
    log_pb = top + torch.log(total) - torch.log(count.clamp_min(1.0))
    nonempty = log_pb != NEG_INF
    log_mean = (_logsumexp(torch.where(nonempty, log_pb, torch.full_like(log_pb, NEG_INF)), 0)
                - torch.log(nonempty.sum().to(lp.dtype).clamp_min(1.0)))
    log_scale = torch.where(nonempty, log_mean - log_pb, torch.full_like(log_pb, NEG_INF))
    shifted = log_scale + log_mass_teacher.detach()
    return shifted - _logsumexp(shifted, -1).unsqueeze(-1)


def _grouped_kl_rows(log_p_student, log_p_teacher, row_groups, num_groups, valid, *, alpha, beta,
                     temperature, rebalance, within_teacher, group_logmass=None,
                     process_group=None):
    """``l_r = T^2 [alpha KL(q || P^S) + beta sum_k c_k KL(pt^T_k || pt^S_k)]`` per row, from
    the two models' log-probabilities over the classes. ``group_logmass`` (exact teacher group
    masses) replaces the teacher's own group masses in the cross term and in ``c``."""
    log_mass_student = _group_log_mass(log_p_student, row_groups, num_groups)
    own_log_mass_teacher = _group_log_mass(log_p_teacher, row_groups, num_groups)
    log_mass_teacher = own_log_mass_teacher if group_logmass is None else group_logmass
    log_pt_student = _within_log_prob(log_p_student, log_mass_student, row_groups)
    log_pt_teacher = _within_log_prob(log_p_teacher, own_log_mass_teacher, row_groups)
    per_class = _kl_terms(log_pt_teacher, log_pt_student)
    within = torch.zeros_like(log_mass_student).scatter_add(1, row_groups.expand_as(per_class), per_class)
    if rebalance:
        log_q = _rebalanced_log_q(log_mass_teacher, valid, process_group)
    else:
        log_q = log_mass_teacher
    cross = _kl_terms(log_q, log_mass_student).sum(-1)
    c = torch.exp(log_mass_teacher) if within_teacher else torch.ones_like(within)
    return temperature ** 2 * (alpha * cross + beta * (c * within).sum(-1))


# ---------------------------------------------------------------------------------------------
# From validated arguments to the loss (shared by the public reference functions below and by
# backend="torch" of the functional API, which validates once).

class _GatherVocabulary(torch.autograd.Function):
    """All-gather of the vocabulary slices whose backward keeps this rank's slice of the
    gradient, with no communication (Megatron's ``gather_from_tensor_model_parallel_region``).
    Every rank computes the same loss from the gathered logits, so the gradient with respect to
    this rank's slice is that slice of the full gradient. (``torch.distributed.nn``'s
    ``all_gather`` would instead sum the identical gradients of all ranks: W times too large.)"""

    @staticmethod
    def forward(ctx, x, group, sizes, rank):
        import torch.distributed as dist

        padded = torch.nn.functional.pad(x, (0, max(sizes) - x.shape[-1])).contiguous()
        pieces = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(pieces, padded, group=group)
        ctx.bounds = (sum(sizes[:rank]), sum(sizes[:rank + 1]))
        return torch.cat([piece[..., :n] for piece, n in zip(pieces, sizes)], -1)

    @staticmethod
    def backward(ctx, grad):
        start, stop = ctx.bounds
        return grad[..., start:stop], None, None, None


def _gather_vocabulary(x: Tensor, group, differentiable: bool) -> Tensor:
    """The whole vocabulary from each rank's contiguous slice along the last dimension
    (slices in rank order; uneven slices padded for the collective, then cut back). With
    ``differentiable``, the gradient flows back to this rank's slice only (see
    :class:`_GatherVocabulary`)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    size = torch.tensor([x.shape[-1]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    if differentiable:
        return _GatherVocabulary.apply(x, group, sizes, dist.get_rank(group))
    with torch.no_grad():
        return _GatherVocabulary.apply(x, group, sizes, dist.get_rank(group))


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def loss_from_arguments(args) -> Tensor:
    """The loss of a validated call (:class:`ltkd_kernels._arguments.LossArguments`)."""
    dtype = _compute_dtype(args.student, args.teacher, args.topk_logprobs)
    student, teacher = args.student, args.teacher
    groups, class_weight = args.groups, args.class_weight
    if args.vocab_process_group is not None:
        group = args.vocab_process_group
        student = _gather_vocabulary(student, group, differentiable=True)
        teacher = _gather_vocabulary(teacher.to(dtype), group, differentiable=False)
        if groups is not None:
            groups = _gather_vocabulary(groups, group, differentiable=False)
        if class_weight is not None:
            class_weight = _gather_vocabulary(class_weight, group, differentiable=False)
    rows, vocab = student.shape
    device = student.device
    T = args.temperature
    valid = torch.ones(rows, dtype=torch.bool, device=device)
    if args.mask is not None:
        valid = valid & (args.mask != 0)
    target = None
    if args.target is not None:
        valid = valid & (args.target != args.ignore_index)
        # An invalid row's target (ignore_index) is replaced by a harmless class.
        target = torch.where(valid, args.target.long(), torch.zeros_like(args.target.long()))
    if target is not None and args.vocab_process_group is not None:
        check_target("target", target, target.shape, vocab, device, values=True)
    keep = valid.unsqueeze(-1)
    # An invalid row takes no part at all: whatever it holds (NaN included) never reaches a
    # loss, a batch statistic or a gradient.
    x = torch.where(keep, student.to(dtype), torch.zeros((), dtype=dtype, device=device))
    b = x / T
    log_p_student = torch.log_softmax(b, -1)
    log_weight = None if class_weight is None else torch.log(class_weight.to(dtype))

    if args.loss == "ltkd":
        row_groups, num_groups = groups.long().unsqueeze(0), args.num_groups
    elif args.loss == "dkd":
        row_groups = (torch.arange(vocab, device=device).unsqueeze(0) != target.unsqueeze(-1)).long()
        num_groups = 2
    else:
        row_groups, num_groups = torch.zeros(1, vocab, dtype=torch.long, device=device), 1

    if teacher is not None:
        a = torch.where(keep, teacher.to(dtype), torch.zeros((), dtype=dtype, device=device)) / T
        if log_weight is not None:
            a = a + log_weight
        log_p_teacher = torch.log_softmax(a, -1)
        row = None
    else:
        row, log_p_student, log_p_teacher = _topk_log_probs(args, log_p_student, b, keep,
                                                            log_weight, dtype)
    if row is None:
        group_logmass = None
        if args.group_logmass is not None:
            group_logmass = torch.where(keep, args.group_logmass.to(dtype), torch.zeros((), dtype=dtype, device=device))
        row = _grouped_kl_rows(
            log_p_student, log_p_teacher, row_groups, num_groups, valid,
            alpha=args.alpha, beta=args.beta,
            temperature=T, rebalance=args.rebalance, within_teacher=args.within_teacher,
            group_logmass=group_logmass, process_group=args.process_group)
    if args.ce_weight != 0.0:
        cross_entropy = torch.logsumexp(x, -1) - x.gather(1, target.unsqueeze(-1)).squeeze(-1)
        row = row + args.ce_weight * cross_entropy
    return _reduce(row, valid, args, dtype)


def _topk_log_probs(args, log_p_student, b, keep, log_weight, dtype):
    """The teacher of a TopKTeacher as log-probabilities over the V classes (``-inf`` off the
    entries); ``restrict`` restricts the student too; ``bucket`` returns its row losses."""
    rows, vocab = b.shape
    device = b.device
    k = args.topk_indices.shape[-1]
    pad = torch.cat([torch.zeros(1, dtype=torch.long, device=device),
                     torch.full((k - 1,), -1, dtype=torch.long, device=device)])
    indices = torch.where(keep, args.topk_indices.long(), pad)
    logprobs = torch.where(keep, args.topk_logprobs.to(dtype),
                           torch.where(pad == 0, 0.0, NEG_INF).to(dtype))
    entry = (indices >= 0) & (logprobs != NEG_INF)
    # Pads go to an extra column V that is cut off after the scatter.
    column = torch.where(entry, indices, torch.full_like(indices, vocab))
    safe = torch.where(entry, indices, torch.zeros_like(indices))

    def dense(values):
        full = torch.full((rows, vocab + 1), NEG_INF, dtype=dtype, device=device)
        return full.scatter(1, column, torch.where(entry, values, torch.full_like(values, NEG_INF)))[:, :vocab]

    if args.rest == "bucket":  # KD, T = 1
        log_p_student_entries = torch.where(entry, log_p_student.gather(1, safe),
                                            torch.full_like(logprobs, NEG_INF))
        log_teacher = torch.where(entry, logprobs, torch.full_like(logprobs, NEG_INF))
        # The rest masses, formed where they do not cancel: the student's as a log-sum over the
        # classes off the entries, the teacher's as 1 - exp(top) with the top's log-sum taken
        # as lp_max + log1p(sum of the others). Entries covering all V classes leave no rest
        # bucket; a top above 1 (rounded log-probs) leaves a teacher rest of 0.
        off_entries = torch.ones(rows, vocab + 1, dtype=torch.bool, device=device)
        off_entries = off_entries.scatter(1, column, False)[:, :vocab]
        log_rest_student = _logsumexp(log_p_student.masked_fill(~off_entries, NEG_INF), -1)
        lp_max = log_teacher.amax(-1, keepdim=True)
        others = torch.exp(log_teacher - lp_max).sum(-1) - 1.0
        log_rest_teacher = _log1mexp(lp_max.squeeze(-1) + torch.log1p(others))
        rest = _kl_terms(log_rest_teacher, log_rest_student)
        no_rest = entry.sum(-1) == vocab
        row = (_kl_terms(log_teacher, log_p_student_entries).sum(-1)
               + torch.where(no_rest, torch.zeros_like(rest), rest))
        return row, None, None
    a = logprobs / args.temperature
    if log_weight is not None:
        a = a + log_weight[safe]
    a = torch.where(entry, a, torch.full_like(a, NEG_INF))
    log_p_teacher = dense(a - _logsumexp(a, -1).unsqueeze(-1))
    if args.rest == "restrict":
        b_entries = torch.where(entry, b.gather(1, safe), torch.full_like(a, NEG_INF))
        log_p_student = dense(b_entries - _logsumexp(b_entries, -1).unsqueeze(-1))
    return None, log_p_student, log_p_teacher


def _reduce(row: Tensor, valid: Tensor, args, dtype) -> Tensor:
    weight = torch.ones_like(row) if args.sample_weight is None else args.sample_weight.to(dtype)
    contribution = torch.where(valid, weight * row, torch.zeros_like(row))
    if args.reduction == "none":
        return contribution.reshape(args.leading)
    total = contribution.sum()
    if args.reduction == "sum":
        return total
    if args.num_items_tensor is not None:
        denominator = args.num_items_tensor.to(dtype)
    elif args.num_items > 0:
        denominator = torch.tensor(args.num_items, dtype=dtype, device=row.device)
    else:
        denominator = torch.where(valid, weight, torch.zeros_like(weight)).sum()
        if args.global_batchmean and args.process_group is not None:
            import torch.distributed as dist

            denominator = denominator.detach().clone()
            dist.all_reduce(denominator, group=args.process_group)
    safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator != 0, total / safe, torch.zeros_like(total))


# ---------------------------------------------------------------------------------------------
# The public reference functions: the signatures of the functional API.

def _loss(loss, student_logits, teacher_logits, **options):
    from ._arguments import parse_loss_arguments

    options.pop("backend", None)
    return loss_from_arguments(parse_loss_arguments(loss, student_logits, teacher_logits,
                                                    reference=True, **options))


def kd_loss(student_logits, teacher_logits, *, temperature=1.0, target=None, ignore_index=-100,
            ce_weight=0.0, sample_weight=None, mask=None, reduction="batchmean",
            num_items_in_batch=None, process_group=None, global_batchmean=False,
            vocab_process_group=None, backend="torch"):
    """KD: ``l_r = T^2 KL(softmax(z^T_r / T) || softmax(z^S_r / T))`` (+ ``ce_weight`` CE)."""
    return _loss("kd", student_logits, teacher_logits, temperature=temperature, target=target,
                 ignore_index=ignore_index, ce_weight=ce_weight, sample_weight=sample_weight,
                 mask=mask, reduction=reduction, num_items_in_batch=num_items_in_batch,
                 process_group=process_group, global_batchmean=global_batchmean,
                 vocab_process_group=vocab_process_group)


def ltkd_loss(student_logits, teacher_logits, groups, num_groups=None, *, alpha=1.0, beta=1.0,
              temperature=1.0, rebalance=True, within_weight="uniform", target=None,
              ignore_index=-100, ce_weight=0.0, sample_weight=None, mask=None,
              reduction="batchmean", num_items_in_batch=None, process_group=None,
              global_batchmean=False, vocab_process_group=None, backend="torch"):
    """LTKD: the rebalanced cross-group KL plus within-group KLs.

    ``pB_k = mean_{valid r} P^T_{r,k}`` (over every rank of ``process_group``),
    ``s_k = mean_j(pB_j) / pB_k`` (mean over non-empty groups; 0 for an empty one),
    ``q_{r,k} = s_k P^T_{r,k} / sum_j s_j P^T_{r,j}``, all in log space, and

        l_r = T^2 [ alpha KL(q_r || P^S_r) + beta sum_k c_{r,k} KL(pt^T_{r,k} || pt^S_{r,k}) ]

    with ``c = 1`` (``within_weight="uniform"``) or ``c = P^T_{r,k}`` (``"teacher"``); with
    ``rebalance=False`` the cross term uses ``P^T_r``. ``rebalance=False,
    within_weight="teacher", alpha=beta=1`` is exactly KD.
    """
    return _loss("ltkd", student_logits, teacher_logits, groups=groups, num_groups=num_groups,
                 alpha=alpha, beta=beta, temperature=temperature, rebalance=rebalance,
                 within_weight=within_weight, target=target, ignore_index=ignore_index,
                 ce_weight=ce_weight, sample_weight=sample_weight, mask=mask,
                 reduction=reduction, num_items_in_batch=num_items_in_batch,
                 process_group=process_group, global_batchmean=global_batchmean,
                 vocab_process_group=vocab_process_group)


def dkd_loss(student_logits, teacher_logits, target, *, alpha=1.0, beta=8.0, temperature=4.0,
             ignore_index=-100, ce_weight=0.0, sample_weight=None, mask=None,
             reduction="batchmean", num_items_in_batch=None, process_group=None,
             global_batchmean=False, vocab_process_group=None, backend="torch"):
    """DKD: ``l_r = T^2 (alpha TCKD + beta NCKD)``.

    ``TCKD = KL([p^T_t, 1 - p^T_t] || [p^S_t, 1 - p^S_t])`` and ``NCKD`` is the KL between the
    teacher's and the student's softmax over the non-target classes: the grouped KL with per-row
    groups ``{t_r}`` (group 0) and the rest (group 1), no rebalancing, uniform within weights.
    """
    return _loss("dkd", student_logits, teacher_logits, target=target, alpha=alpha, beta=beta,
                 temperature=temperature, ignore_index=ignore_index, ce_weight=ce_weight,
                 sample_weight=sample_weight, mask=mask, reduction=reduction,
                 num_items_in_batch=num_items_in_batch, process_group=process_group,
                 global_batchmean=global_batchmean, vocab_process_group=vocab_process_group)


def bkd_loss(student_logits, teacher_logits, class_weight, *, temperature=2.0, target=None,
             ignore_index=-100, ce_weight=0.0, sample_weight=None, mask=None,
             reduction="batchmean", num_items_in_batch=None, process_group=None,
             global_batchmean=False, vocab_process_group=None, backend="torch"):
    """BKD: ``l_r = T^2 KL(qhat_r || softmax(z^S_r / T))`` (+ ``ce_weight`` CE with ``target``).

    ``qhat_r = normalize(w * softmax(z^T_r / T)) = softmax(z^T_r / T + log w)`` in log space; a
    class with weight 0 gets probability 0. The paper's loss adds the student's unweighted
    cross-entropy (T = 1): ``ce_weight=1.0`` with ``target``.
    """
    return _loss("bkd", student_logits, teacher_logits, class_weight=class_weight,
                 temperature=temperature, target=target, ignore_index=ignore_index,
                 ce_weight=ce_weight, sample_weight=sample_weight, mask=mask,
                 reduction=reduction, num_items_in_batch=num_items_in_batch,
                 process_group=process_group, global_batchmean=global_batchmean,
                 vocab_process_group=vocab_process_group)


def group_logsumexp(logits, groups, num_groups=None, *, temperature=1.0, backend="torch"):
    """``lse_k = log sum_{i: g(i)=k} exp(z_i / T)`` per row: ``(..., G)``, ``-inf`` for an empty
    group; float32 (float64 for float64 logits)."""
    check_logits_pair(logits, logits, allow_float64=True, names=("logits", "logits"))
    temperature = check_positive("temperature", temperature)
    num_groups = check_groups(groups, logits.shape[-1], num_groups, logits.device, always=True)
    x = logits.reshape(-1, logits.shape[-1]).to(_compute_dtype(logits)) / temperature
    index = groups.long().unsqueeze(0).expand_as(x)
    columns = [_logsumexp(x.masked_fill(index != k, NEG_INF), -1) for k in range(num_groups)]
    return torch.stack(columns, -1).reshape(*logits.shape[:-1], num_groups)


# --- SRW: sample-wise re-weighting (its own section; see ltkd_kernels/srw.py) ---
from ._validation import check_srw_arguments  # noqa: E402  (kept inside the SRW section)


def srw_weights(features, *, tau=1.0, mask=None, eps=1e-8, backend="torch"):
    """SRW weights ``w = softmax(-avesim / tau)`` from teacher features, in O(N D).

    ``features``: ``(N, D)`` (one batch; returns ``(N,)``) or ``(B, P, D)`` (each image on its
    own over its patches; returns ``(B, P)``). ``mask``: optional bool of the leading shape,
    True = valid; the sums below run over the valid samples ``j`` only (``n`` of them)::

        fh_i     = f_i / max(||f_i||, eps)                 (a zero feature: fh_i = 0)
        avesim_i = (1/n) sum_j fh_i . fh_j = fh_i . m,     m = (1/n) sum_j fh_j
        w_i      = exp(-avesim_i / tau) / sum_j exp(-avesim_j / tau)

    The paper's mean over the ``n x n`` cosine matrix is never built: with
    ``r_i = 1 / max(||f_i||, eps)``, ``m = (1/n) r^T F`` (a ``1 x n`` by ``n x D`` product) and
    ``avesim_i = r_i (F m)_i`` (``n x D`` by ``D``), so no normalised copy of ``F`` is made and
    ``F`` is read three times (norms, ``r^T F``, ``F m``), each a streaming BLAS-speed pass.

    Masked samples get weight 0 (their values are never used, NaN included); an image (or
    batch) with no valid sample gets all-zero weights. Weights sum to 1 per image otherwise,
    carry no gradient, and are meant for ``L = sum_i w_i l_i``:
    ``loss_fn(..., sample_weight=w, reduction="sum")``. Computed in float64 for float64
    features (and returned as float64), in float32 otherwise.
    """
    tau, eps = check_srw_arguments(features, tau, mask, eps)
    dtype = _compute_dtype(features)
    with torch.no_grad():
        f = features.detach()
        f = (f if f.dim() == 3 else f.unsqueeze(0)).to(dtype)                 # (B, P, D)
        invalid = None if mask is None else ~(mask if mask.dim() == 2 else mask.unsqueeze(0))
        if invalid is not None:
            # Padded patches may hold anything (NaN): zero them so that 0 * NaN cannot leak
            # into the sums.
            f = f.masked_fill(invalid.unsqueeze(-1), 0.0)
        # Few, large operations (in place where the tensor is new): each is one pass.
        inv_norm = torch.linalg.vector_norm(f, dim=-1).clamp_min_(eps).reciprocal_()  # r
        if invalid is None:
            count = float(f.shape[1])
        else:
            inv_norm.masked_fill_(invalid, 0.0)
            count = (~invalid).sum(-1, keepdim=True).clamp_min_(1).to(dtype).unsqueeze(-1)
        mean = torch.bmm(inv_norm.unsqueeze(1), f).div_(count)                # (B, 1, D): m
        avesim = torch.bmm(f, mean.transpose(1, 2)).squeeze(-1).mul_(inv_norm)  # fh_i . m
        logits = avesim.mul_(-1.0 / tau)
        if invalid is not None:
            logits.masked_fill_(invalid, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        if invalid is not None:
            # An image with no valid patch: softmax of all -inf is NaN; its weights are 0.
            weights = torch.where(invalid.all(-1, keepdim=True), 0.0, weights)
    return weights.reshape(features.shape[:-1])
# --- end SRW ---
