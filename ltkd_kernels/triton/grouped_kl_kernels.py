"""Triton kernels of the grouped KL: one machinery behind LTKD, KD, DKD and BKD.

A program handles one row of student logits ``z^S`` and teacher logits ``z^T`` (``V`` classes,
``G`` groups) and walks the vocabulary in blocks of ``BLOCK_V``, so any ``V`` runs in registers.
Within a block, per-group reductions use a ``(BLOCK_G, BLOCK_V)`` one-hot of the class groups
(``BLOCK_G`` = next power of two >= G): cheap compares and adds, one ``exp`` per element and
model. Row offsets are int64 (``row * stride`` overflows int32 beyond 2^31 elements).

How a class is assigned to a group (``GROUP_MODE``):
  0: one group (KD, BKD);
  1: ``groups[i]`` from a ``(V,)`` tensor (LTKD);
  2: group 0 is the row's ``group_target[r]``, group 1 the rest (DKD).
BKD adds a per-class ``teacher_log_weight`` (``log w``) to the teacher's scaled logits.
"""
import triton
import triton.language as tl


@triton.jit
def _class_groups(offs, in_vocab, groups_ptr, group_target, GROUP_MODE: tl.constexpr):
    """Group id of each class in ``offs`` (``-1`` past the vocabulary, so it matches no group)."""
    if GROUP_MODE == 0:
        g = tl.zeros_like(offs)
    elif GROUP_MODE == 1:
        g = tl.load(groups_ptr + offs, mask=in_vocab, other=0).to(tl.int32)
    else:
        g = tl.where(offs == group_target, 0, 1).to(tl.int32)
    return tl.where(in_vocab, g, -1)


@triton.jit
def _scaled_logits(student_row_ptr, teacher_row_ptr, teacher_log_weight_ptr, offs, in_vocab,
                   inv_temperature, HAS_TEACHER_LOG_WEIGHT: tl.constexpr):
    """Load one block of both rows as float32 ``x`` (raw student), ``b = x/T`` and ``a = z^T/T (+ log w)``."""
    x = tl.load(student_row_ptr + offs, mask=in_vocab, other=float("-inf")).to(tl.float32)
    a = tl.load(teacher_row_ptr + offs, mask=in_vocab, other=float("-inf")).to(tl.float32)
    b = x * inv_temperature
    a = a * inv_temperature
    if HAS_TEACHER_LOG_WEIGHT:
        a += tl.load(teacher_log_weight_ptr + offs, mask=in_vocab, other=0.0)
    return x, b, a


@triton.jit
def _finite_or_zero(m):
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _online_group_update(x, one_hot, group_max, group_sum):
    """One block of the per-group online log-sum-exp.

    Returns the new running max per group, the rescaled running sum, the rescale factor (for
    other sums kept at the same reference), ``exp(x_i - max_{g(i)})`` per element and the
    element's group max (``-inf`` while the group has no finite logit).
    """
    block_max = tl.max(tl.where(one_hot, x[None, :], float("-inf")), axis=1)
    new_max = tl.maximum(group_max, block_max)
    # Both -inf (no finite logit yet in the group): keep the factor finite; the sums are 0.
    rescale = tl.exp(tl.where(new_max == float("-inf"), 0.0, group_max - new_max))
    element_max = tl.sum(tl.where(one_hot, new_max[:, None], 0.0), axis=0)
    element_exp = tl.where(x == float("-inf"), 0.0, tl.exp(x - element_max))
    new_sum = group_sum * rescale + tl.sum(tl.where(one_hot, element_exp[None, :], 0.0), axis=1)
    return new_max, new_sum, rescale, element_exp, element_max


@triton.jit
def grouped_kl_stats_kernel(
    student_ptr,             # (N, V) student logits, fp32/fp16/bf16, unit stride along V
    teacher_ptr,             # (N, V) teacher logits, fp32/fp16/bf16, unit stride along V
    groups_ptr,              # (V,) int32/int64 class group ids (GROUP_MODE 1)
    group_target_ptr,        # (N,) int64 per-row class of group 0 (GROUP_MODE 2)
    teacher_log_weight_ptr,  # (V,) fp32 log class weight added to a (HAS_TEACHER_LOG_WEIGHT)
    ce_target_ptr,           # (N,) int64 cross-entropy target (HAS_CE)
    row_valid_ptr,           # (N,) bool; an invalid row is skipped (HAS_ROW_MASK)
    lse_student_ptr,         # out (N, G) fp32: lse_k of b = z^S / T
    lse_teacher_ptr,         # out (N, G) fp32: lse_k of a
    within_kl_ptr,           # out (N, G) fp32: KL(pt^T_k || pt^S_k), 0 for a massless teacher group
    ce_ptr,                  # out (N,) fp32: logsumexp(z^S) - z^S_t (HAS_CE)
    lse_raw_ptr,             # out (N,) fp32: logsumexp(z^S) at T = 1, saved for backward (HAS_CE)
    stride_student,          # row stride of student (elements)
    stride_teacher,          # row stride of teacher (elements)
    V,                       # number of classes
    G,                       # number of groups
    inv_temperature,         # 1 / T
    GROUP_MODE: tl.constexpr,
    HAS_TEACHER_LOG_WEIGHT: tl.constexpr,
    HAS_CE: tl.constexpr,
    HAS_ROW_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Per row, in one read of each logits tensor: the group LSEs ``lse_k = m_k + log s_k``
    (running max ``m_k``, sum ``s_k = sum_{i in k} exp(x_i - m_k)``) of both models and the
    within-group KLs

        KL_k = sum_{i in k} pt^T_i [(a_i - m^T_k) - (b_i - m^S_k)] + log s^S_k - log s^T_k,

    whose sum is accumulated online at the running maxes (shifted when a max moves). Working
    relative to the maxes keeps the terms small: a one-class group gives exactly 0."""
    row = tl.program_id(0).to(tl.int64)
    group_ids = tl.arange(0, BLOCK_G)
    out_group = row * G + group_ids
    in_groups = group_ids < G
    valid = True
    if HAS_ROW_MASK:
        valid = tl.load(row_valid_ptr + row) != 0
    if valid:
        student_row_ptr = student_ptr + row * stride_student
        teacher_row_ptr = teacher_ptr + row * stride_teacher
        group_target = 0
        if GROUP_MODE == 2:
            group_target = tl.load(group_target_ptr + row)
        max_student = tl.full([BLOCK_G], float("-inf"), tl.float32)
        sum_student = tl.zeros([BLOCK_G], tl.float32)
        max_teacher = tl.full([BLOCK_G], float("-inf"), tl.float32)
        sum_teacher = tl.zeros([BLOCK_G], tl.float32)
        # sum_{i in k} exp(a_i - m^T_k) [(a_i - m^T_k) - (b_i - m^S_k)], -inf maxes read as 0
        teacher_weighted_gap = tl.zeros([BLOCK_G], tl.float32)
        raw_max = float("-inf")
        raw_sum = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            in_vocab = offs < V
            g = _class_groups(offs, in_vocab, groups_ptr, group_target, GROUP_MODE)
            one_hot = g[None, :] == group_ids[:, None]
            x, b, a = _scaled_logits(student_row_ptr, teacher_row_ptr, teacher_log_weight_ptr,
                                     offs, in_vocab, inv_temperature, HAS_TEACHER_LOG_WEIGHT)
            previous_max_student = _finite_or_zero(max_student)
            previous_max_teacher = _finite_or_zero(max_teacher)
            max_student, sum_student, _, _, element_max_student = _online_group_update(
                b, one_hot, max_student, sum_student)
            previous_sum_teacher = sum_teacher
            max_teacher, sum_teacher, rescale_teacher, exp_teacher, element_max_teacher = (
                _online_group_update(a, one_hot, max_teacher, sum_teacher))
            # Earlier terms were taken at the previous maxes: move them to the new ones.
            drift = (_finite_or_zero(max_student) - previous_max_student) - (
                _finite_or_zero(max_teacher) - previous_max_teacher)
            gap = (a - _finite_or_zero(element_max_teacher)) - (b - _finite_or_zero(element_max_student))
            # 0 * gap stays 0 where the teacher has no mass, even when the gap is inf or NaN.
            gap = tl.where(exp_teacher > 0, exp_teacher * gap, 0.0)
            teacher_weighted_gap = rescale_teacher * (teacher_weighted_gap + previous_sum_teacher * drift) + tl.sum(
                tl.where(one_hot, gap[None, :], 0.0), axis=1)
            if HAS_CE:
                new_raw_max = tl.maximum(raw_max, tl.max(x, axis=0))
                raw_rescale = tl.exp(tl.where(new_raw_max == float("-inf"), 0.0, raw_max - new_raw_max))
                raw_exp = tl.where(x == float("-inf"), 0.0, tl.exp(x - new_raw_max))
                raw_sum = raw_sum * raw_rescale + tl.sum(raw_exp, axis=0)
                raw_max = new_raw_max
        lse_student = max_student + tl.log(sum_student)
        lse_teacher = max_teacher + tl.log(sum_teacher)
        within = teacher_weighted_gap / sum_teacher + tl.log(sum_student) - tl.log(sum_teacher)
        # A student group with no mass where the teacher has some: the KL is +inf.
        within = tl.where(lse_student == float("-inf"), float("inf"), within)
        within = tl.where(sum_teacher > 0, within, 0.0)
        tl.store(lse_student_ptr + out_group, lse_student, mask=in_groups)
        tl.store(lse_teacher_ptr + out_group, lse_teacher, mask=in_groups)
        tl.store(within_kl_ptr + out_group, within, mask=in_groups)
        if HAS_CE:
            target = tl.load(ce_target_ptr + row)
            target_logit = tl.load(student_ptr + row * stride_student + target).to(tl.float32)
            lse_raw = raw_max + tl.log(raw_sum)
            tl.store(ce_ptr + row, lse_raw - target_logit)
            tl.store(lse_raw_ptr + row, lse_raw)
    else:
        # Neutral statistics for a masked row: finite, so nothing downstream turns into NaN.
        zeros = tl.zeros([BLOCK_G], tl.float32)
        tl.store(lse_student_ptr + out_group, zeros, mask=in_groups)
        tl.store(lse_teacher_ptr + out_group, zeros, mask=in_groups)
        tl.store(within_kl_ptr + out_group, zeros, mask=in_groups)
        if HAS_CE:
            tl.store(ce_ptr + row, 0.0)
            tl.store(lse_raw_ptr + row, 0.0)


@triton.jit
def grouped_kl_grad_kernel(
    student_ptr,             # (N, V) student logits
    teacher_ptr,             # (N, V) teacher logits
    groups_ptr,              # (V,) class group ids (GROUP_MODE 1)
    group_target_ptr,        # (N,) class of group 0 (GROUP_MODE 2)
    teacher_log_weight_ptr,  # (V,) fp32 log w (HAS_TEACHER_LOG_WEIGHT)
    ce_target_ptr,           # (N,) cross-entropy target (HAS_CE)
    row_valid_ptr,           # (N,) bool; an invalid row gets a zero gradient (HAS_ROW_MASK)
    lse_student_ptr,         # (N, G) fp32 from the stats kernel
    lse_teacher_ptr,         # (N, G) fp32 from the stats kernel
    coef_student_ptr,        # (N, G) fp32: weight of pt^S_i in d loss / d b_i
    coef_teacher_ptr,        # (N, G) fp32: weight of pt^T_i in d loss / d b_i (subtracted)
    lse_raw_ptr,             # (N,) fp32 logsumexp(z^S) (HAS_CE)
    grad_ce_ptr,             # (N,) fp32 upstream gradient of the cross-entropy (HAS_CE)
    grad_student_ptr,        # out (N, V), the student's dtype, contiguous
    stride_student,
    stride_teacher,
    V,
    G,
    inv_temperature,
    GROUP_MODE: tl.constexpr,
    HAS_TEACHER_LOG_WEIGHT: tl.constexpr,
    HAS_CE: tl.constexpr,
    HAS_ROW_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """``d/dz^S_i = (coef^S_{g(i)} pt^S_i - coef^T_{g(i)} pt^T_i) / T + gce (softmax(z^S)_i - [i = t])``:
    one read of each logits tensor and one write of the gradient per row."""
    row = tl.program_id(0).to(tl.int64)
    grad_row_ptr = grad_student_ptr + row * V
    valid = True
    if HAS_ROW_MASK:
        valid = tl.load(row_valid_ptr + row) != 0
    if valid:
        student_row_ptr = student_ptr + row * stride_student
        teacher_row_ptr = teacher_ptr + row * stride_teacher
        group_target = 0
        if GROUP_MODE == 2:
            group_target = tl.load(group_target_ptr + row)
        if HAS_CE:
            ce_target = tl.load(ce_target_ptr + row)
            lse_raw = tl.load(lse_raw_ptr + row)
            grad_ce = tl.load(grad_ce_ptr + row)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            in_vocab = offs < V
            g = _class_groups(offs, in_vocab, groups_ptr, group_target, GROUP_MODE)
            stat = row * G + tl.where(in_vocab, g, 0)
            # Gathers of per-row (N, G) statistics: G values per row, served from cache.
            lse_student = tl.load(lse_student_ptr + stat, mask=in_vocab, other=0.0)
            lse_teacher = tl.load(lse_teacher_ptr + stat, mask=in_vocab, other=0.0)
            coef_student = tl.load(coef_student_ptr + stat, mask=in_vocab, other=0.0)
            coef_teacher = tl.load(coef_teacher_ptr + stat, mask=in_vocab, other=0.0)
            x, b, a = _scaled_logits(student_row_ptr, teacher_row_ptr, teacher_log_weight_ptr,
                                     offs, in_vocab, inv_temperature, HAS_TEACHER_LOG_WEIGHT)
            pt_student = tl.where(b == float("-inf"), 0.0, tl.exp(b - lse_student))
            pt_teacher = tl.where(a == float("-inf"), 0.0, tl.exp(a - lse_teacher))
            grad = (coef_student * pt_student - coef_teacher * pt_teacher) * inv_temperature
            if HAS_CE:
                softmax_raw = tl.where(x == float("-inf"), 0.0, tl.exp(x - lse_raw))
                grad += grad_ce * (softmax_raw - tl.where(offs == ce_target, 1.0, 0.0))
            tl.store(grad_row_ptr + offs, grad.to(grad_student_ptr.dtype.element_ty), mask=in_vocab)
    else:
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            zeros = tl.zeros([BLOCK_V], tl.float32)
            tl.store(grad_row_ptr + offs, zeros.to(grad_student_ptr.dtype.element_ty), mask=offs < V)
