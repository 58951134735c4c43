"""The losses as the methods' papers and repositories write them: eager PyTorch, one op per line.

These are the baselines a user would otherwise run (and what ``torch.compile`` is given); the
package call each one equals is in :data:`benchmarks.inputs.LOSS_OPTIONS` and
:func:`benchmarks.providers.package_fn`. They are deliberately not the package's reference
(``ltkd_kernels.reference``, which the benchmarks check every provider against in float64):
they are the code found in the papers' repositories, with its N x V intermediates (softmax,
log-softmax, masks, products).

Low-precision logits are cast to float32 first, as ``torch.autocast`` does for ``softmax``,
``log_softmax`` and ``kl_div`` in mixed-precision training; the gradient comes back in the
logits' dtype through the cast's backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits, teacher_logits, temperature=2.0):
    """Hinton et al.: ``T^2 KL(softmax(z^T/T) || softmax(z^S/T))``, batch mean."""
    T = temperature
    log_p_student = F.log_softmax(student_logits.float() / T, dim=1)
    p_teacher = F.softmax(teacher_logits.float() / T, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * (T * T)


def ltkd_loss(student_logits, teacher_logits, groups, num_groups, alpha=1.0, beta=1.0,
              temperature=2.0):
    """LTKD: rebalanced cross-group KL plus the within-group KLs (uniform within weights).

    Group masses by ``index_add_`` of the softmax over each group's classes; the batch
    statistic ``pB`` is the teacher's mean group mass, ``q = normalize(mean(pB) / pB * p^T_G)``.
    With uniform weights the sum of within-group KLs is one KL over all classes between the
    within-group distributions ``pt = p / p_{g(i)}``.
    """
    T = temperature
    n = student_logits.shape[0]
    log_p_student = F.log_softmax(student_logits.float() / T, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / T, dim=1)
    group_p_student = log_p_student.new_zeros(n, num_groups).index_add_(1, groups,
                                                                      log_p_student.exp())
    group_p_teacher = log_p_teacher.new_zeros(n, num_groups).index_add_(1, groups,
                                                                      log_p_teacher.exp())
    batch_mass = group_p_teacher.mean(0)
    q = group_p_teacher * (batch_mass.mean() / batch_mass)
    q = q / q.sum(1, keepdim=True)
    cross = F.kl_div(group_p_student.log(), q, reduction="batchmean")
    log_pt_student = log_p_student - group_p_student.log()[:, groups]
    log_pt_teacher = log_p_teacher - group_p_teacher.log()[:, groups]
    within = F.kl_div(log_pt_student, log_pt_teacher, reduction="batchmean", log_target=True)
    return (alpha * cross + beta * within) * (T * T)


def _get_gt_mask(logits, target):
    target = target.reshape(-1)
    return torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), 1).bool()


def _get_other_mask(logits, target):
    target = target.reshape(-1)
    return torch.ones_like(logits).scatter_(1, target.unsqueeze(1), 0).bool()


def cat_mask(t, mask1, mask2):
    t1 = (t * mask1).sum(dim=1, keepdims=True)
    t2 = (t * mask2).sum(1, keepdims=True)
    return torch.cat([t1, t2], dim=1)


def dkd_loss(student_logits, teacher_logits, target, alpha=1.0, beta=8.0, temperature=4.0):
    """DKD as in the authors' repository (mdistiller ``dkd_loss``): gt/other masks, ``cat_mask``
    for the binary target/non-target distributions, and ``- 1000 * gt_mask`` to drop the target
    class from the non-target softmax."""
    logits_student = student_logits.float()
    logits_teacher = teacher_logits.float()
    gt_mask = _get_gt_mask(logits_student, target)
    other_mask = _get_other_mask(logits_student, target)
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = (F.kl_div(log_pred_student, pred_teacher, reduction="sum")
                 * (temperature ** 2) / target.shape[0])
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = (F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
                 * (temperature ** 2) / target.shape[0])
    return alpha * tckd_loss + beta * nckd_loss


def bkd_loss(student_logits, teacher_logits, class_weight, target, temperature=2.0):
    """BKD as in the authors' code: cross-entropy plus the KL to the class-weighted teacher
    softmax, renormalised per row (``pred_t * weight / sum``), times ``T^2``.

    The package's equal: ``lk.bkd_loss(s, t, class_weight, target=target, ce_weight=1.0,
    temperature=T)`` (its ``target`` alone adds no cross-entropy; ``ce_weight=1.0`` does)."""
    T = temperature
    out_s = student_logits.float()
    pred_t = F.softmax(teacher_logits.float() / T, dim=1)
    pred_t = pred_t * class_weight
    pred_t = pred_t / pred_t.sum(1)[:, None]
    kd = F.kl_div(F.log_softmax(out_s / T, dim=1), pred_t, reduction="none").mean(dim=0)
    kd_loss = kd.sum() * T * T
    return F.cross_entropy(out_s, target) + kd_loss


def srw_weights(features, tau=1.0):
    """SRW as the paper writes it: the N x N cosine-similarity matrix of the teacher's features,
    its row means, then ``softmax(-avesim / tau)``. O(N^2 D) time and O(N^2) memory (the
    package computes the same in O(N D) as ``fh_i . mean_j fh_j``)."""
    normalized = F.normalize(features.float(), dim=1)
    similarity = normalized @ normalized.t()
    avesim = similarity.mean(dim=1)
    return F.softmax(-avesim / tau, dim=0)
