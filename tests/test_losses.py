"""Every loss on every backend against the float64 equations (loss and gradient).

Backends (tests/conftest.py): "torch" (the reference), "torch-ops" (the plain-torch operators
of backend="auto" without kernels), "triton" (interpreted on the CPU), "cpu" (C++), each on
fresh random inputs of odd shapes. The tolerance rule is conftest's: fp32 agrees with float64
to 1e-5 relative; fp16/bf16 inputs are compared with float64 on the same (rounded) inputs.
"""
import math

import pytest
import torch

import equations as eq
import ltkd_kernels as lk
from conftest import (
    GRAD_RTOL,
    LOSS_CASE_NAMES,
    LOSS_SHAPES,
    assert_grad_close,
    assert_loss_close,
    loss_cases,
    make_logits,
    random_groups,
    with_backends,
)


def _case(name, vocab, rows):
    return next(c for c in loss_cases(vocab, rows) if c.name == name)


def _check_against_float64(case, backend, leading, vocab, s_dtype, t_dtype):
    student, teacher = make_logits((*leading, vocab), s_dtype)[0], make_logits((*leading, vocab), t_dtype)[1]
    n_rows = math.prod(leading)
    s = student.clone().requires_grad_()
    rows = case.call(s, teacher, reduction="none", backend=backend)
    assert rows.dtype == torch.float32 and rows.shape == leading
    upstream = torch.rand(leading) + 0.5  # the per-row upstream gradient of reduction="none"
    rows.backward(upstream)
    assert s.grad.dtype == s_dtype and s.grad.shape == s.shape

    s64 = student.double().reshape(n_rows, vocab).requires_grad_()
    rows64 = case.rows64(s64, teacher.double().reshape(n_rows, vocab))
    rows64.backward(upstream.double().reshape(-1))
    assert_loss_close(rows.reshape(-1), rows64.detach())
    assert_grad_close(s.grad.reshape(n_rows, vocab), s64.grad, GRAD_RTOL[s_dtype])


@with_backends()
@pytest.mark.parametrize("leading,vocab", LOSS_SHAPES)
@pytest.mark.parametrize("case_name", LOSS_CASE_NAMES)
def test_fp32_matches_float64(case_name, leading, vocab, backend):
    case = _case(case_name, vocab, math.prod(leading))
    _check_against_float64(case, backend, leading, vocab, torch.float32, torch.float32)


@with_backends()
@pytest.mark.parametrize("s_dtype,t_dtype", [(torch.float16, torch.float16),
                                             (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.bfloat16),
                                             (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("case_name", ["kd", "ltkd", "dkd", "bkd_ce"])
def test_half_dtypes_match_float64(case_name, s_dtype, t_dtype, backend):
    leading, vocab = (3,), 1031
    case = _case(case_name, vocab, 3)
    _check_against_float64(case, backend, leading, vocab, s_dtype, t_dtype)


@with_backends(("triton", "cpu"))
@pytest.mark.parametrize("case_name", LOSS_CASE_NAMES)
def test_kernel_matches_reference(case_name, backend):
    """Kernel vs the reference in fp32: |kernel - ref64| <= |reference - ref64| + tol."""
    leading, vocab = (5,), 613
    case = _case(case_name, vocab, 5)
    student, teacher = make_logits((*leading, vocab), torch.float32)
    results = {}
    for name in ("torch", backend):
        s = student.clone().requires_grad_()
        loss = case.call(s, teacher, backend=name)
        loss.backward()
        results[name] = (loss.double(), s.grad.double())
    s64 = student.double().requires_grad_()
    loss64 = eq.reduce(case.rows64(s64, teacher.double()))
    loss64.backward()
    for i, ref64 in enumerate((loss64.detach(), s64.grad)):
        err_kernel = torch.linalg.vector_norm(results[backend][i] - ref64)
        err_reference = torch.linalg.vector_norm(results["torch"][i] - ref64)
        assert err_kernel <= err_reference + 1e-6 * torch.linalg.vector_norm(ref64) + 1e-12


@with_backends()
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_mask_sample_weight_and_reductions(backend, reduction):
    """Masked rows: loss 0, gradient exactly 0 (even with NaN logits), out of pB."""
    n, vocab = 6, 301
    groups = random_groups(vocab, 4)
    student, teacher = make_logits((n, vocab), torch.float32)
    mask = torch.tensor([True, False, True, True, False, True])
    student[1, 5] = float("nan")  # a masked row's garbage must not leak
    teacher[4] = float("nan")
    weight = torch.rand(n) + 0.1
    s = student.clone().requires_grad_()
    out = lk.ltkd_loss(s, teacher, groups, 4, temperature=2.0, sample_weight=weight, mask=mask,
                       reduction=reduction, backend=backend)
    out.sum().backward()
    s64 = student.double().requires_grad_()
    rows64 = eq.ltkd_rows(torch.where(mask[:, None], s64, 0.0), teacher.double().nan_to_num(0.0),
                          groups, 4, 2.0, valid=mask)
    ref = eq.reduce(rows64, mask, weight, reduction)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(s.grad[~mask], torch.zeros_like(s.grad[~mask]))
    assert_grad_close(s.grad.double(), s64.grad)
    if reduction == "none":
        assert torch.equal(out[~mask], torch.zeros(2))


@with_backends()
def test_all_rows_masked_gives_zero(backend):
    student, teacher = make_logits((3, 50), torch.float32)
    s = student.clone().requires_grad_()
    loss = lk.ltkd_loss(s, teacher, random_groups(50, 3), 3, mask=torch.zeros(3, dtype=torch.bool),
                        backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s.grad))


@with_backends()
def test_no_rows(backend):
    s = torch.randn(0, 17, requires_grad=True)
    loss = lk.ltkd_loss(s, torch.randn(0, 17), random_groups(17, 3), 3, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and s.grad.shape == (0, 17)
    assert lk.kd_loss(s, torch.randn(0, 17), reduction="none", backend=backend).shape == (0,)


@with_backends()
@pytest.mark.parametrize("case_name", ["kd", "ltkd", "ltkd_G100_empty_groups", "dkd", "bkd_ce"])
def test_masked_vocabulary_neg_inf(case_name, backend):
    """-inf logits at the same classes of both models (a masked vocabulary): finite, exact,
    zero gradient at the masked classes (a target on a masked class makes CE infinite)."""
    n, vocab = 3, 523
    case = _case(case_name, vocab, n)
    student, teacher = make_logits((n, vocab), torch.float32)
    masked = torch.rand(vocab) < 0.3
    student[:, masked] = float("-inf")
    teacher[:, masked] = float("-inf")
    s = student.clone().requires_grad_()
    rows = case.call(s, teacher, reduction="none", backend=backend)
    s64 = student.double().requires_grad_()
    rows64 = case.rows64(s64, teacher.double())
    finite = torch.isfinite(rows64.detach())
    assert torch.equal(torch.isfinite(rows), finite)
    torch.testing.assert_close(rows.double()[finite], rows64.detach()[finite], rtol=1e-5, atol=1e-6)
    if bool(finite.all()):
        rows.sum().backward()
        rows64.sum().backward()
        assert torch.equal(s.grad[:, masked], torch.zeros_like(s.grad[:, masked]))
        assert_grad_close(s.grad.double(), s64.grad)


@with_backends()
def test_whole_group_masked(backend):
    """A group whose classes are -inf in both models: its within KL is 0, its pB is 0."""
    n, vocab = 4, 97
    groups = random_groups(vocab, 3)
    student, teacher = make_logits((n, vocab), torch.float32)
    student[:, groups == 1] = float("-inf")
    teacher[:, groups == 1] = float("-inf")
    s = student.clone().requires_grad_()
    loss = lk.ltkd_loss(s, teacher, groups, 3, temperature=2.0, backend=backend)
    loss.backward()
    s64 = student.double().requires_grad_()
    loss64 = eq.reduce(eq.ltkd_rows(s64, teacher.double(), groups, 3, 2.0))
    loss64.backward()
    torch.testing.assert_close(loss.double(), loss64.detach(), rtol=1e-5, atol=1e-6)
    assert_grad_close(s.grad.double(), s64.grad)


@with_backends()
def test_student_neg_inf_where_teacher_has_mass_is_inf(backend):
    student, teacher = make_logits((2, 40), torch.float32)
    student[0, 3] = float("-inf")
    groups = random_groups(40, 3)
    assert lk.kd_loss(student, teacher, reduction="none", backend=backend)[0] == float("inf")
    rows = lk.ltkd_loss(student, teacher, groups, 3, reduction="none", backend=backend)
    assert rows[0] == float("inf") and torch.isfinite(rows[1])
    student[1, groups == 2] = float("-inf")  # a whole student group empty, the teacher's not
    rows = lk.ltkd_loss(student, teacher, groups, 3, reduction="none", backend=backend)
    assert rows[1] == float("inf")


@with_backends()
def test_nan_in_gives_nan_out(backend):
    student, teacher = make_logits((3, 70), torch.float32)
    student[1, 10] = float("nan")
    rows = lk.ltkd_loss(student, teacher, random_groups(70, 3), 3, reduction="none", backend=backend)
    assert torch.isnan(rows[1])
    assert torch.isnan(lk.kd_loss(student, teacher, backend=backend))


@with_backends()
def test_kd_identity(backend):
    """docs/losses.md: rebalance=False, within_weight="teacher", alpha=beta=1 is KD."""
    student, teacher = make_logits((5, 211), torch.float32)
    groups = random_groups(211, 5)
    grads = []
    losses = []
    for fn in (lambda s: lk.kd_loss(s, teacher, temperature=3.0, backend=backend),
               lambda s: lk.ltkd_loss(s, teacher, groups, 5, temperature=3.0, rebalance=False,
                                      within_weight="teacher", backend=backend)):
        s = student.clone().requires_grad_()
        loss = fn(s)
        loss.backward()
        losses.append(loss)
        grads.append(s.grad)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5 * grads[0].abs().max().item())


@with_backends()
def test_ltkd_gradient_equation(backend):
    """The closed-form gradient of docs/losses.md (batchmean over N rows):
    dl_r/dz_i = T [alpha (p^S_k - q_k) pt^S_i + beta c_k (pt^S_i - pt^T_i)] / N."""
    n, vocab, num_groups, T, alpha, beta = 4, 129, 3, 2.0, 0.6, 1.7
    groups = random_groups(vocab, num_groups)
    student, teacher = make_logits((n, vocab), torch.float32)
    s = student.clone().requires_grad_()
    lk.ltkd_loss(s, teacher, groups, num_groups, alpha=alpha, beta=beta, temperature=T,
                 backend=backend).backward()
    ps = torch.softmax(student.double() / T, -1)
    pt = torch.softmax(teacher.double() / T, -1)
    onehot = torch.nn.functional.one_hot(groups, num_groups).double()
    mass_s, mass_t = ps @ onehot, pt @ onehot
    pb = mass_t.mean(0)
    q = (pb.mean() / pb) * mass_t
    q = q / q.sum(-1, keepdim=True)
    pt_s, pt_t = ps / mass_s[:, groups], pt / mass_t[:, groups]
    expected = T * (alpha * (mass_s - q)[:, groups] * pt_s + beta * (pt_s - pt_t)) / n
    torch.testing.assert_close(s.grad.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@with_backends()
def test_group_logsumexp(backend):
    logits = torch.randn(2, 3, 1031) * 4
    groups = random_groups(1031, 7, empty=(4,))
    out = lk.group_logsumexp(logits, groups, 7, temperature=1.7, backend=backend)
    assert out.shape == (2, 3, 7) and out.dtype == torch.float32
    x = logits.double() / 1.7
    expected = torch.stack([x[..., groups == k].logsumexp(-1) if (groups == k).any()
                            else torch.full(x.shape[:-1], float("-inf"), dtype=torch.float64)
                            for k in range(7)], -1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    x = logits.clone().requires_grad_()
    lk.group_logsumexp(x, groups, 7, backend=backend)[..., 2].sum().backward()
    expected_grad = torch.where(groups == 2, torch.softmax(logits.masked_fill(groups != 2, float("-inf")), -1), 0.0)
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-5, atol=1e-6)


@with_backends()
def test_non_contiguous_inputs_and_no_modification(backend):
    wide_s, wide_t = make_logits((5, 400), torch.float32)
    student = wide_s[:, 7:330]  # row stride 400, unit stride along V
    teacher = wide_t.t().contiguous().t()[:, 7:330]  # unit stride along rows: must be copied
    groups = random_groups(323, 3)
    before = (wide_s.clone(), wide_t.clone(), groups.clone())
    s = student.clone().requires_grad_()
    loss = lk.ltkd_loss(student, teacher, groups, 3, backend=backend)
    loss_contig = lk.ltkd_loss(student.contiguous(), teacher.contiguous(), groups, 3, backend=backend)
    assert torch.equal(loss, loss_contig)
    lk.bkd_loss(s, teacher, torch.rand(323), target=torch.zeros(5, dtype=torch.long),
                ce_weight=1.0, backend=backend).backward()
    assert torch.equal(wide_s, before[0]) and torch.equal(wide_t, before[1])
    assert torch.equal(groups, before[2])


@with_backends()
@pytest.mark.parametrize("case_name", ["ltkd", "dkd", "bkd_ce"])
def test_bit_identical_reruns(case_name, backend):
    vocab = 777
    case = _case(case_name, vocab, 4)
    student, teacher = make_logits((4, vocab), torch.bfloat16)
    outs = []
    for _ in range(2):
        s = student.clone().requires_grad_()
        loss = case.call(s, teacher, backend=backend)
        loss.backward()
        outs.append((loss, s.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@with_backends()
def test_teacher_gets_no_gradient(backend):
    student, teacher = make_logits((3, 64), torch.float32)
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_()
    lk.ltkd_loss(s, t, random_groups(64, 3), 3, backend=backend).backward()
    assert t.grad is None and s.grad is not None


@with_backends()
@pytest.mark.parametrize("vocab", [2, 37])
@pytest.mark.parametrize("where", ["first", "last"])
def test_dkd_bkd_target_on_edge_classes(where, vocab, backend):
    """One row, the target on the first or the last class (the DKD group-0 edge cases)."""
    target = torch.tensor([0 if where == "first" else vocab - 1])
    student, teacher = make_logits((1, vocab), torch.float32)
    weight = torch.rand(vocab) + 0.1
    cases = [
        (lambda s: lk.dkd_loss(s, teacher, target, backend=backend),
         lambda s: eq.dkd_rows(s, teacher.double(), target)),
        (lambda s: lk.bkd_loss(s, teacher, weight, target=target, ce_weight=1.0, backend=backend),
         lambda s: eq.bkd_rows(s, teacher.double(), weight, 2.0, target)),
    ]
    # With two classes the KL is a small difference of O(1) terms scaled by T^2 (16 for DKD):
    # fp32 rounding of those terms bounds the absolute error, so atol is in units of T^2.
    for (call, rows64), temperature in zip(cases, (4.0, 2.0)):
        s = student.clone().requires_grad_()
        loss = call(s)
        loss.backward()
        s64 = student.double().requires_grad_()
        loss64 = rows64(s64).sum()
        loss64.backward()
        torch.testing.assert_close(loss.double(), loss64.detach(), rtol=1e-5,
                                   atol=1e-6 * temperature ** 2)
        assert_grad_close(s.grad, s64.grad)
