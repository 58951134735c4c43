"""Float64 evaluations of the equations of docs/losses.md, written independently of the package.

Each function works row by row and class by class from softmax probabilities, exactly as the
equations read (no log-sum-exp tricks, no shared code with ltkd_kernels), and is differentiable
with torch autograd so that gradients can be checked too. Returns per-row losses ``(N,)``.
"""
import torch


def _kl(p, q):
    """sum p log(p / q) with 0 log 0 = 0 (inf where q = 0 < p)."""
    pos = p > 0
    return torch.where(pos, p * (torch.log(torch.where(pos, p, 1.0)) - torch.log(torch.where(pos, q, 1.0))),
                       torch.zeros_like(p)).sum(-1)


def kd_rows(zs, zt, T):
    ps = torch.softmax(zs.double() / T, -1)
    pt = torch.softmax(zt.double() / T, -1)
    return T * T * _kl(pt, ps)


def grouped_rows(zs, zt, row_groups, G, T, alpha, beta, rebalance, within_weight, valid=None,
                 teacher_weight=None):
    """The grouped KL of docs/losses.md for every row; ``row_groups``: (N, V) group of each class."""
    zs, zt = zs.double(), zt.double()
    n, v = zs.shape
    ps = torch.softmax(zs / T, -1)
    pt = torch.softmax(zt.detach() / T, -1)
    if teacher_weight is not None:
        pt = pt * teacher_weight.double()
        pt = pt / pt.sum(-1, keepdim=True)
    onehot = torch.nn.functional.one_hot(row_groups, G).double()  # (N, V, G)
    mass_s = torch.einsum("nv,nvg->ng", ps, onehot)
    mass_t = torch.einsum("nv,nvg->ng", pt, onehot)
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool)
    if rebalance:
        pb = mass_t[valid].mean(0) if valid.any() else torch.zeros(G, dtype=torch.float64)
        nonempty = pb > 0
        s = torch.where(nonempty, pb[nonempty].mean() / torch.where(nonempty, pb, 1.0), 0.0)
        q = s * mass_t
        q = q / q.sum(-1, keepdim=True)
    else:
        q = mass_t
    cross = _kl(q, mass_s)
    within = []
    for k in range(G):
        in_k = row_groups == k
        sk = torch.where(in_k, ps, 0.0)
        tk = torch.where(in_k, pt, 0.0)
        ms, mt = mass_s[:, k:k + 1], mass_t[:, k:k + 1]
        kl = _kl(torch.where(mt > 0, tk / torch.where(mt > 0, mt, 1.0), 0.0),
                 torch.where(ms > 0, sk / torch.where(ms > 0, ms, 1.0), 0.0))
        within.append(torch.where(mt.squeeze(1) > 0, kl, torch.zeros_like(kl)))
    within = torch.stack(within, -1)
    c = torch.ones_like(within) if within_weight == "uniform" else mass_t
    return T * T * (alpha * cross + beta * (c * within).sum(-1))


def ltkd_rows(zs, zt, groups, G, T=1.0, alpha=1.0, beta=1.0, rebalance=True,
              within_weight="uniform", valid=None):
    row_groups = groups.long().expand(zs.shape[0], -1)
    return grouped_rows(zs, zt, row_groups, G, T, alpha, beta, rebalance, within_weight, valid)


def dkd_rows(zs, zt, target, T=4.0, alpha=1.0, beta=8.0):
    """TCKD over [p_t, 1 - p_t] plus NCKD over the non-target classes, straight from DKD."""
    zs, zt = zs.double(), zt.double()
    ps = torch.softmax(zs / T, -1)
    pt = torch.softmax(zt / T, -1)
    gt = torch.nn.functional.one_hot(target, zs.shape[-1]).bool()
    b_s = torch.stack([(ps * gt).sum(-1), (ps * ~gt).sum(-1)], -1)
    b_t = torch.stack([(pt * gt).sum(-1), (pt * ~gt).sum(-1)], -1)
    tckd = _kl(b_t, b_s)
    nt_s = torch.where(gt, 0.0, ps) / b_s[:, 1:].clamp_min(1e-300)
    nt_t = torch.where(gt, 0.0, pt) / b_t[:, 1:].clamp_min(1e-300)
    nckd = _kl(nt_t, nt_s)
    return T * T * (alpha * tckd + beta * nckd)


def bkd_rows(zs, zt, class_weight, T=2.0, target=None, ce_weight=1.0):
    """BKD; with ``target``, plus ``ce_weight`` times the student's cross-entropy (the paper: 1)."""
    zs, zt = zs.double(), zt.double()
    q = torch.softmax(zt / T, -1) * class_weight.double()
    q = q / q.sum(-1, keepdim=True)
    loss = T * T * _kl(q, torch.softmax(zs / T, -1))
    if target is not None:
        loss = loss + ce_weight * ce_rows(zs, target)
    return loss


def ce_rows(zs, target):
    """The student's cross-entropy at T = 1, from its softmax."""
    p = torch.softmax(zs.double(), -1)
    return -torch.log(p.gather(1, target.reshape(-1, 1))).squeeze(1)


def topk_rows(zs, indices, logprobs, T=1.0, rest="renormalize"):
    """KD against a top-k teacher, written from the rules' definitions (probabilities, not
    log-sum-exps): renormalize, restrict (both restricted to the entries) and bucket (T = 1)."""
    zs = zs.double()
    rows = []
    for r in range(zs.shape[0]):
        keep = (indices[r] >= 0) & (logprobs[r] > float("-inf"))
        idx, lp = indices[r][keep].long(), logprobs[r][keep].double()
        p_hat = torch.softmax(lp / T, -1)
        if rest == "renormalize":
            log_ps = torch.log_softmax(zs[r] / T, -1)[idx]
            rows.append(T * T * (p_hat * (torch.log(p_hat) - log_ps)).sum())
        elif rest == "restrict":
            log_ps = torch.log_softmax(zs[r][idx] / T, -1)
            rows.append(T * T * (p_hat * (torch.log(p_hat) - log_ps)).sum())
        else:
            p_t = torch.exp(lp)
            p_all = torch.softmax(zs[r], -1)
            p_s = p_all[idx]
            off = torch.ones_like(p_all, dtype=torch.bool)
            off[idx] = False
            r_t, r_s = (1 - p_t.sum()).clamp_min(0), p_all[off].sum()
            covers_all = len(idx) == zs.shape[-1]  # no rest bucket at all
            rest_term = (r_t * torch.log(r_t / r_s) if r_t > 0 and not covers_all
                         else torch.zeros((), dtype=zs.dtype))
            rows.append((p_t * torch.log(p_t / p_s)).sum() + rest_term)
    return torch.stack(rows)


def reduce(rows, valid=None, sample_weight=None, reduction="batchmean", num_items=None):
    """``none`` / ``sum`` / ``batchmean``: the weighted sum over valid rows divided by their total
    weight (their number without weights) or by ``num_items``."""
    weight = torch.ones_like(rows) if sample_weight is None else sample_weight.double()
    if valid is None:
        valid = torch.ones(rows.shape[0], dtype=torch.bool)
    rows = torch.where(valid, rows * weight, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    denominator = float(num_items) if num_items is not None else float(weight[valid].sum())
    return total / denominator if denominator != 0 else total * 0
