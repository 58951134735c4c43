"""Pure-PyTorch reference of every loss in the package (``backend="torch"``).

Written to be read: each function is the equation of SPEC.md in plain tensor code, with the
same signature as the public function. It is the ground truth that every kernel is tested
against, and it is differentiable (``torch.autograd.gradcheck`` passes in float64).

Notation (SPEC.md section 1), per row ``r`` and temperature ``T``:

- ``b = z^S / T``, ``a = z^T / T`` (BKD adds ``log w`` to ``a``);
- ``lse_k = log sum_{i in k} exp(x_i)`` per group ``k`` (``-inf`` for a group with no class);
- group mass ``p_k = exp(lse_k - lse)``, within-group probability ``pt_i = exp(x_i - lse_{g(i)})``;
- ``KL(u || v) = sum u log(u / v)`` with ``0 log 0 = 0``.

Every loss below is the grouped KL

    l_r = T^2 [ alpha KL(q_r || p^S_r) + beta sum_k c_{r,k} KL(pt^T_{r,k} || pt^S_{r,k}) ]

with a choice of groups, of the teacher's group distribution ``q`` and of the weights ``c``.
A within-group KL whose teacher group has no mass is 0 (there is nothing to match).
Computation is in float32, or float64 for float64 inputs.
"""
from __future__ import annotations

import torch

from ._validation import (
    check_class_weight,
    check_groups,
    check_logits_pair,
    check_option,
    check_positive,
    check_row_tensor,
    check_target,
)
from .groups import class_balanced_weights, groups_from_counts  # noqa: F401  (re-exported)

__all__ = [
    "group_logsumexp",
    "kd_loss",
    "ltkd_loss",
    "dkd_loss",
    "bkd_loss",
    "class_balanced_weights",
    "groups_from_counts",
    "srw_weights",
    "reduce_row_losses",
]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _safe_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp that is ``-inf`` (with zero gradient, not NaN) over an all ``-inf`` slice."""
    m = x.detach().amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum(dim)
    positive = s > 0
    lse = m.squeeze(dim) + torch.log(torch.where(positive, s, torch.ones_like(s)))
    return torch.where(positive, lse, torch.full_like(lse, float("-inf")))


def _group_lse(x: torch.Tensor, row_groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``(N, G)`` log-sum-exp of ``x`` over the classes of each group.

    ``row_groups`` is ``(V,)`` (the same groups for every row) or ``(N, V)`` (per-row groups).
    """
    row_groups = row_groups.expand_as(x)
    columns = []
    for k in range(num_groups):
        masked = x.masked_fill(row_groups != k, float("-inf"))
        columns.append(_safe_logsumexp(masked, dim=-1))
    return torch.stack(columns, dim=-1)


def _xlogy_ratio(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``p (log p - log q)`` with ``0 log 0 = 0`` and no NaN gradient where ``p = 0``."""
    positive = p > 0
    safe_log_p = torch.where(positive, log_p, torch.zeros_like(log_p))
    safe_log_q = torch.where(positive, log_q, torch.zeros_like(log_q))
    return torch.where(positive, p * (safe_log_p - safe_log_q), torch.zeros_like(p))


def _grouped_kl_statistics(b, a, row_groups, num_groups):
    """Per-row statistics of the grouped KL from scaled logits ``b`` (student), ``a`` (teacher).

    Returns ``(lse_student, lse_teacher, within)``, each ``(N, G)``: the group LSEs of both
    models and ``within[r, k] = KL(pt^T_{r,k} || pt^S_{r,k})`` (0 where the teacher's group has
    no mass). These are exactly what the kernels compute in their one read of the logits.
    """
    lse_student = _group_lse(b, row_groups, num_groups)
    lse_teacher = _group_lse(a, row_groups, num_groups)
    idx = row_groups.expand_as(b)
    neg_inf = torch.full_like(b, float("-inf"))
    # A -inf logit has within-group probability 0 even when its whole group is -inf.
    log_pt_student = torch.where(b == float("-inf"), neg_inf, b - torch.gather(lse_student, 1, idx))
    log_pt_teacher = torch.where(a == float("-inf"), neg_inf, a - torch.gather(lse_teacher, 1, idx))
    per_class = _xlogy_ratio(torch.exp(log_pt_teacher), log_pt_teacher, log_pt_student)
    within = torch.zeros_like(lse_student).scatter_add(1, idx, per_class)
    return lse_student, lse_teacher, within


def _rebalanced_teacher_mass(p_teacher, batch_mass):
    """``q_{r,k} = s_k p^T_{r,k} / sum_j s_j p^T_{r,j}`` with ``s_k = mean_j(pB_j) / pB_k``.

    The mean is over non-empty groups (``pB_k > 0``); an empty group gets ``s_k = 0``.
    """
    nonempty = batch_mass > 0
    # Empty groups hold no mass, so the sum over all groups is the sum over non-empty ones.
    mean_mass = batch_mass.sum() / nonempty.sum().clamp_min(1)
    scale = torch.where(nonempty, mean_mass / torch.where(nonempty, batch_mass, 1.0), 0.0)
    unnormalised = scale * p_teacher
    total = unnormalised.sum(-1, keepdim=True)
    return unnormalised / torch.where(total > 0, total, torch.ones_like(total))


def batch_group_mass(p_teacher, valid, process_group=None):
    """``pB_k = mean over valid rows of p^T_{r,k}``, over all processes of ``process_group``.

    Computed on the device (no host synchronisation); with a process group, the per-group
    mass sums and the valid-row count are all-reduced, so every process gets the statistic of
    the concatenated batch. 0 when no row is valid.
    """
    # where, not a product: a masked row may hold NaN, and NaN * 0 is NaN.
    valid_mass = torch.where(valid.unsqueeze(-1), p_teacher.detach(), torch.zeros_like(p_teacher))
    count = valid.sum().to(p_teacher.dtype).reshape(1)
    packed = torch.cat([valid_mass.sum(0), count])
    if process_group is not None:
        import torch.distributed as dist

        dist.all_reduce(packed, group=process_group)
    return packed[:-1] / packed[-1].clamp_min(1.0)


def grouped_kl_row_losses(lse_student, lse_teacher, within, valid, *, alpha, beta, temperature,
                          rebalance, within_weight, process_group=None):
    """``l_r = T^2 [ alpha KL(q_r || p^S_r) + beta sum_k c_{r,k} within_{r,k} ]`` from ``(N, G)``
    statistics: ``log p_k = lse_k - logsumexp_j lse_j``; ``q`` is the rebalanced teacher group
    mass (``rebalance=True``, LTKD) or ``p^T`` itself; ``c = 1`` or ``c = p^T``.

    Shared by the reference and every kernel backend: the kernels produce the statistics, this
    (N, G) arithmetic turns them into row losses, and autograd carries the gradient back to the
    statistics (and from there, through the kernels' backward, to the logits).
    """
    if lse_student.shape[-1] == 1:
        # One group (KD, BKD): the group masses are both 1, so the cross term is 0 and c = 1.
        within_sum = torch.where(valid, within[:, 0], torch.zeros_like(within[:, 0]))
        return temperature ** 2 * beta * within_sum
    log_p_student = lse_student - _safe_logsumexp(lse_student, dim=-1).unsqueeze(-1)
    log_p_teacher = lse_teacher - _safe_logsumexp(lse_teacher, dim=-1).unsqueeze(-1)
    p_teacher = log_p_teacher.exp().detach()
    if rebalance:
        q = _rebalanced_teacher_mass(p_teacher, batch_group_mass(p_teacher, valid, process_group))
    else:
        q = p_teacher
    cross = _xlogy_ratio(q, torch.log(q), log_p_student).sum(-1)
    c = torch.ones_like(within) if within_weight == "uniform" else p_teacher
    # Masked rows hold arbitrary statistics: zero their within terms before any product so that
    # their (discarded) loss cannot send NaN into the gradient of valid rows.
    within_sum = torch.where(valid, (c * within).sum(-1), torch.zeros_like(cross))
    cross = torch.where(valid, cross, torch.zeros_like(cross))
    return temperature ** 2 * (alpha * cross + beta * within_sum)


def reduce_row_losses(row_loss, sample_weight, valid, reduction):
    """Apply ``sample_weight``, zero masked rows, then ``"batchmean"``, ``"sum"`` or ``"none"``.

    ``"batchmean"`` divides the sum by the number of valid rows (0 when none is valid).
    ``row_loss`` and ``valid`` are flat ``(N,)``; ``"none"`` returns the flat ``(N,)`` losses.
    """
    if sample_weight is not None:
        row_loss = row_loss * sample_weight.to(row_loss.dtype)
    row_loss = torch.where(valid, row_loss, torch.zeros_like(row_loss))
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(total.dtype)


def _prepare(student_logits, teacher_logits, sample_weight, mask, reduction, temperature):
    """Validate the common arguments; flatten to ``(N, V)`` rows."""
    check_logits_pair(student_logits, teacher_logits, allow_float64=True)
    check_positive("temperature", temperature)
    check_option("reduction", reduction, ("batchmean", "sum", "none"))
    leading = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    dtype = _compute_dtype(student_logits, teacher_logits)
    b = student_logits.reshape(-1, vocab).to(dtype) / temperature
    a = teacher_logits.reshape(-1, vocab).to(dtype).detach() / temperature
    sw = check_row_tensor("sample_weight", sample_weight, leading, student_logits.device, floating=True)
    mk = check_row_tensor("mask", mask, leading, student_logits.device, boolean=True)
    valid = torch.ones(b.shape[0], dtype=torch.bool, device=b.device) if mk is None else mk.reshape(-1)
    if mk is not None:
        # A masked row takes no part at all: whatever it holds (NaN included) never reaches a
        # loss, a batch statistic or a gradient.
        b = torch.where(valid.unsqueeze(-1), b, torch.zeros_like(b))
        a = torch.where(valid.unsqueeze(-1), a, torch.zeros_like(a))
    sw = None if sw is None else sw.reshape(-1).detach()
    return leading, b, a, sw, valid


def _finish(row_loss, sw, valid, reduction, leading):
    out = reduce_row_losses(row_loss, sw, valid, reduction)
    return out.reshape(leading) if reduction == "none" else out


def group_logsumexp(logits, groups, num_groups=None, *, temperature=1.0):
    """``(N, G)`` float32 ``lse_k = log sum_{i: g(i)=k} exp(z_i / T)``; ``-inf`` for an empty group.

    ``logits`` has shape ``(..., V)``; the result has shape ``(..., G)``.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    check_logits_pair(logits, logits, allow_float64=True, names=("logits", "logits"))
    check_positive("temperature", temperature)
    num_groups = check_groups(groups, logits.shape[-1], num_groups, logits.device)
    x = logits.reshape(-1, logits.shape[-1]).to(_compute_dtype(logits)) / temperature
    out = _group_lse(x, groups.long(), num_groups)
    return out.reshape(*logits.shape[:-1], num_groups)


def kd_loss(student_logits, teacher_logits, *, temperature=1.0, sample_weight=None, mask=None,
            reduction="batchmean", backend="torch"):
    """KD: ``l_r = T^2 KL(softmax(z^T_r / T) || softmax(z^S_r / T))``."""
    leading, b, a, sw, valid = _prepare(student_logits, teacher_logits, sample_weight, mask,
                                        reduction, temperature)
    log_q_student = torch.log_softmax(b, -1)
    log_q_teacher = torch.log_softmax(a, -1)
    row_loss = _xlogy_ratio(log_q_teacher.exp(), log_q_teacher, log_q_student).sum(-1)
    return _finish(temperature ** 2 * row_loss, sw, valid, reduction, leading)


def ltkd_loss(student_logits, teacher_logits, groups, num_groups=None, *, alpha=1.0, beta=1.0,
              temperature=1.0, rebalance=True, within_weight="uniform", sample_weight=None,
              mask=None, reduction="batchmean", process_group=None, backend="torch"):
    """LTKD: the rebalanced cross-group KL plus within-group KLs.

    ``pB_k = mean_{valid r} p^T_{r,k}`` (all-reduced over ``process_group``),
    ``s_k = mean_j(pB_j) / pB_k``, ``q_{r,k} = s_k p^T_{r,k} / sum_j s_j p^T_{r,j}``,

        l_r = T^2 [ alpha KL(q_r || p^S_r) + beta sum_k c_{r,k} KL(pt^T_{r,k} || pt^S_{r,k}) ]

    with ``c = 1`` (``within_weight="uniform"``) or ``c = p^T_{r,k}`` (``"teacher"``); with
    ``rebalance=False`` the cross term uses ``p^T_r``. ``rebalance=False,
    within_weight="teacher", alpha=beta=1`` is exactly KD.
    """
    check_option("within_weight", within_weight, ("uniform", "teacher"))
    leading, b, a, sw, valid = _prepare(student_logits, teacher_logits, sample_weight, mask,
                                        reduction, temperature)
    num_groups = check_groups(groups, b.shape[-1], num_groups, b.device)
    stats = _grouped_kl_statistics(b, a, groups.long(), num_groups)
    row_loss = grouped_kl_row_losses(*stats, valid, alpha=alpha, beta=beta, temperature=temperature,
                                     rebalance=rebalance, within_weight=within_weight,
                                     process_group=process_group)
    return _finish(row_loss, sw, valid, reduction, leading)


def dkd_loss(student_logits, teacher_logits, target, *, alpha=1.0, beta=8.0, temperature=4.0,
             sample_weight=None, mask=None, reduction="batchmean", backend="torch"):
    """DKD: ``l_r = T^2 (alpha TCKD + beta NCKD)``.

    ``TCKD = KL([p^T_t, 1 - p^T_t] || [p^S_t, 1 - p^S_t])`` and ``NCKD`` is the KL between the
    teacher's and the student's softmax over the non-target classes: the grouped KL with per-row
    groups ``{t_r}`` (group 0) and the rest (group 1), no rebalancing, uniform within weights.
    """
    leading, b, a, sw, valid = _prepare(student_logits, teacher_logits, sample_weight, mask,
                                        reduction, temperature)
    t = check_target("target", target, leading, b.shape[-1], b.device).reshape(-1, 1)
    row_groups = (torch.arange(b.shape[-1], device=b.device).unsqueeze(0) != t).long()
    stats = _grouped_kl_statistics(b, a, row_groups, 2)
    row_loss = grouped_kl_row_losses(*stats, valid, alpha=alpha, beta=beta, temperature=temperature,
                                     rebalance=False, within_weight="uniform")
    return _finish(row_loss, sw, valid, reduction, leading)


def bkd_loss(student_logits, teacher_logits, class_weight, *, temperature=2.0, target=None,
             sample_weight=None, mask=None, reduction="batchmean", backend="torch"):
    """BKD: ``l_r = T^2 KL(qhat_r || softmax(z^S_r / T))`` (+ ``CE(z^S_r, t_r)`` with ``target``).

    ``qhat_r = normalize(w * softmax(z^T_r / T)) = softmax(z^T_r / T + log w)``; a class with
    weight 0 gets probability 0. The cross-entropy is unweighted, of the raw logits (T = 1).
    """
    leading, b, a, sw, valid = _prepare(student_logits, teacher_logits, sample_weight, mask,
                                        reduction, temperature)
    w = check_class_weight(class_weight, b.shape[-1], b.device).to(b.dtype)
    teacher_prob = torch.softmax(a, -1) * w
    qhat = teacher_prob / teacher_prob.sum(-1, keepdim=True)
    log_q_student = torch.log_softmax(b, -1)
    row_loss = temperature ** 2 * _xlogy_ratio(qhat, torch.log(qhat), log_q_student).sum(-1)
    if target is not None:
        t = check_target("target", target, leading, b.shape[-1], b.device).reshape(-1, 1)
        raw = student_logits.reshape(-1, b.shape[-1]).to(b.dtype)
        raw = torch.where(valid.unsqueeze(-1), raw, torch.zeros_like(raw))
        row_loss = row_loss + (torch.logsumexp(raw, -1) - raw.gather(1, t).squeeze(1))
    return _finish(row_loss, sw, valid, reduction, leading)


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
