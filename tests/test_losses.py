"""Every loss on every backend against the float64 equations (loss and gradient).

Backends: "torch" (the reference), "triton" (interpreted on the CPU), "cpu" (C++), each on
fresh random inputs of odd shapes. fp32 must agree with float64 to 1e-5 relative; fp16/bf16
inputs are compared with float64 on the same (rounded) inputs, so the loss keeps fp32
accuracy and the gradient is off by its own dtype's rounding only.
"""
import math

import pytest
import torch

import ltkd_kernels as lk
from conftest import kernel_backends
import equations as eq

BACKENDS = [pytest.param("torch")] + kernel_backends()

# (leading shape, V): one row, V = 1, V = 2, odd V, V past one block (2048) of the kernels.
SHAPES = [((1,), 1), ((1,), 2), ((4,), 37), ((2, 3), 1031), ((3,), 4097)]


def _groups(vocab, num_groups, empty=()):
    """Random groups (V,) in [0, G) avoiding the groups listed in ``empty``."""
    allowed = torch.tensor([k for k in range(num_groups) if k not in empty])
    return allowed[torch.randint(len(allowed), (vocab,))]


class Case:
    """A loss configuration: how to call the package and the float64 equation."""

    def __init__(self, name, call, rows64):
        self.name, self.call, self.rows64 = name, call, rows64


def _cases(vocab, n_rows):
    g3 = _groups(vocab, 3)
    g100 = _groups(vocab, 100, empty=(0, 57, 99))
    target = torch.randint(vocab, (n_rows,))
    weight = torch.rand(vocab) + 0.05
    if vocab > 2:
        weight[1] = 0.0  # a class of weight 0: no teacher probability
    return [
        Case("kd", lambda s, t, **kw: lk.kd_loss(s, t, temperature=2.0, **kw),
             lambda s, t: eq.kd_rows(s, t, 2.0)),
        Case("ltkd", lambda s, t, **kw: lk.ltkd_loss(s, t, g3, 3, temperature=4.0, alpha=0.7,
                                                     beta=1.3, **kw),
             lambda s, t: eq.ltkd_rows(s, t, g3, 3, 4.0, 0.7, 1.3)),
        Case("ltkd_teacher_within", lambda s, t, **kw: lk.ltkd_loss(
                 s, t, g3, temperature=1.5, within_weight="teacher", **kw),
             lambda s, t: eq.ltkd_rows(s, t, g3, int(g3.max()) + 1, 1.5, within_weight="teacher")),
        Case("ltkd_no_rebalance", lambda s, t, **kw: lk.ltkd_loss(s, t, g3, 3, rebalance=False, **kw),
             lambda s, t: eq.ltkd_rows(s, t, g3, 3, rebalance=False)),
        Case("ltkd_G1", lambda s, t, **kw: lk.ltkd_loss(s, t, torch.zeros(vocab, dtype=torch.long),
                                                        temperature=3.0, **kw),
             lambda s, t: eq.ltkd_rows(s, t, torch.zeros(vocab, dtype=torch.long), 1, 3.0)),
        Case("ltkd_G100_empty_groups", lambda s, t, **kw: lk.ltkd_loss(s, t, g100, 100, **kw),
             lambda s, t: eq.ltkd_rows(s, t, g100, 100)),
        Case("dkd", lambda s, t, **kw: lk.dkd_loss(s, t, target.reshape(s.shape[:-1]), **kw),
             lambda s, t: eq.dkd_rows(s, t, target)),
        Case("bkd", lambda s, t, **kw: lk.bkd_loss(s, t, weight, **kw),
             lambda s, t: eq.bkd_rows(s, t, weight)),
        Case("bkd_ce", lambda s, t, **kw: lk.bkd_loss(s, t, weight, target=target.reshape(s.shape[:-1]),
                                                      temperature=3.0, **kw),
             lambda s, t: eq.bkd_rows(s, t, weight, 3.0, target)),
    ]


CASE_NAMES = [c.name for c in _cases(8, 2)]


def _logits(shape, dtype):
    student = torch.randn(shape) * 2.0
    teacher = torch.randn(shape) * 3.0 + 0.5
    return student.to(dtype), teacher.to(dtype)


def _grad_tolerance(dtype):
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def _check_against_float64(case, backend, leading, vocab, s_dtype, t_dtype):
    student, teacher = _logits((*leading, vocab), s_dtype)[0], _logits((*leading, vocab), t_dtype)[1]
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
    torch.testing.assert_close(rows.double().reshape(-1), rows64.detach(), rtol=1e-5, atol=1e-6)
    assert_grad_close(s.grad.reshape(n_rows, vocab), s64.grad, _grad_tolerance(s_dtype))


def assert_grad_close(grad, grad64, rtol=1e-5):
    """Norm-wise relative error ||g - g64|| / ||g64|| (METHOD.md); exact zeros stay zeros."""
    grad = grad.double()
    assert torch.equal(torch.isfinite(grad), torch.isfinite(grad64))
    err = torch.linalg.vector_norm(grad - grad64).item()
    scale = torch.linalg.vector_norm(grad64).item()
    assert err <= rtol * scale + 1e-12, f"gradient error {err:.3g} vs norm {scale:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("leading,vocab", SHAPES)
@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_fp32_matches_float64(case_name, leading, vocab, backend):
    case = next(c for c in _cases(vocab, math.prod(leading)) if c.name == case_name)
    _check_against_float64(case, backend, leading, vocab, torch.float32, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s_dtype,t_dtype", [(torch.float16, torch.float16),
                                             (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.bfloat16),
                                             (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("case_name", ["kd", "ltkd", "dkd", "bkd_ce"])
def test_half_dtypes_match_float64(case_name, s_dtype, t_dtype, backend):
    leading, vocab = (3,), 1031
    case = next(c for c in _cases(vocab, 3) if c.name == case_name)
    _check_against_float64(case, backend, leading, vocab, s_dtype, t_dtype)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_kernel_matches_reference(case_name, backend):
    """Kernel vs the reference in fp32: |kernel - ref64| <= |reference - ref64| + tol."""
    leading, vocab = (5,), 613
    case = next(c for c in _cases(vocab, 5) if c.name == case_name)
    student, teacher = _logits((*leading, vocab), torch.float32)
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_mask_sample_weight_and_reductions(backend, reduction):
    """Masked rows: loss 0, gradient exactly 0 (even with NaN logits), out of pB."""
    n, vocab = 6, 301
    groups = _groups(vocab, 4)
    student, teacher = _logits((n, vocab), torch.float32)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_masked_gives_zero(backend):
    student, teacher = _logits((3, 50), torch.float32)
    s = student.clone().requires_grad_()
    loss = lk.ltkd_loss(s, teacher, _groups(50, 3), 3, mask=torch.zeros(3, dtype=torch.bool),
                        backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s.grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows(backend):
    s = torch.randn(0, 17, requires_grad=True)
    loss = lk.ltkd_loss(s, torch.randn(0, 17), _groups(17, 3), 3, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and s.grad.shape == (0, 17)
    assert lk.kd_loss(s, torch.randn(0, 17), reduction="none", backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_name", ["kd", "ltkd", "ltkd_G100_empty_groups", "dkd", "bkd_ce"])
def test_masked_vocabulary_neg_inf(case_name, backend):
    """-inf logits at the same classes of both models (a masked vocabulary): finite, exact,
    zero gradient at the masked classes (a target on a masked class makes CE infinite)."""
    n, vocab = 3, 523
    case = next(c for c in _cases(vocab, n) if c.name == case_name)
    student, teacher = _logits((n, vocab), torch.float32)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_group_masked(backend):
    """A group whose classes are -inf in both models: its within KL is 0, its pB is 0."""
    n, vocab = 4, 97
    groups = _groups(vocab, 3)
    student, teacher = _logits((n, vocab), torch.float32)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_neg_inf_where_teacher_has_mass_is_inf(backend):
    student, teacher = _logits((2, 40), torch.float32)
    student[0, 3] = float("-inf")
    groups = _groups(40, 3)
    assert lk.kd_loss(student, teacher, reduction="none", backend=backend)[0] == float("inf")
    rows = lk.ltkd_loss(student, teacher, groups, 3, reduction="none", backend=backend)
    assert rows[0] == float("inf") and torch.isfinite(rows[1])
    student[1, groups == 2] = float("-inf")  # a whole student group empty, the teacher's not
    rows = lk.ltkd_loss(student, teacher, groups, 3, reduction="none", backend=backend)
    assert rows[1] == float("inf")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_gives_nan_out(backend):
    student, teacher = _logits((3, 70), torch.float32)
    student[1, 10] = float("nan")
    rows = lk.ltkd_loss(student, teacher, _groups(70, 3), 3, reduction="none", backend=backend)
    assert torch.isnan(rows[1])
    assert torch.isnan(lk.kd_loss(student, teacher, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_identity(backend):
    """SPEC §2: rebalance=False, within_weight="teacher", alpha=beta=1 is KD."""
    student, teacher = _logits((5, 211), torch.float32)
    groups = _groups(211, 5)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_ltkd_gradient_equation(backend):
    """The closed-form gradient of SPEC §2 (batchmean over N rows):
    dl_r/dz_i = T [alpha (p^S_k - q_k) pt^S_i + beta c_k (pt^S_i - pt^T_i)] / N."""
    n, vocab, num_groups, T, alpha, beta = 4, 129, 3, 2.0, 0.6, 1.7
    groups = _groups(vocab, num_groups)
    student, teacher = _logits((n, vocab), torch.float32)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_logsumexp(backend):
    logits = torch.randn(2, 3, 1031) * 4
    groups = _groups(1031, 7, empty=(4,))
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_no_modification(backend):
    wide_s, wide_t = _logits((5, 400), torch.float32)
    student = wide_s[:, 7:330]  # row stride 400, unit stride along V
    teacher = wide_t.t().contiguous().t()[:, 7:330]  # unit stride along rows: must be copied
    groups = _groups(323, 3)
    before = (wide_s.clone(), wide_t.clone(), groups.clone())
    s = student.clone().requires_grad_()
    loss = lk.ltkd_loss(student, teacher, groups, 3, backend=backend)
    loss_contig = lk.ltkd_loss(student.contiguous(), teacher.contiguous(), groups, 3, backend=backend)
    assert torch.equal(loss, loss_contig)
    lk.bkd_loss(s, teacher, torch.rand(323), target=torch.zeros(5, dtype=torch.long),
                backend=backend).backward()
    assert torch.equal(wide_s, before[0]) and torch.equal(wide_t, before[1])
    assert torch.equal(groups, before[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_name", ["ltkd", "dkd", "bkd_ce"])
def test_bit_identical_reruns(case_name, backend):
    vocab = 777
    case = next(c for c in _cases(vocab, 4) if c.name == case_name)
    student, teacher = _logits((4, vocab), torch.bfloat16)
    outs = []
    for _ in range(2):
        s = student.clone().requires_grad_()
        loss = case.call(s, teacher, backend=backend)
        loss.backward()
        outs.append((loss, s.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_gradient(backend):
    student, teacher = _logits((3, 64), torch.float32)
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_()
    lk.ltkd_loss(s, t, _groups(64, 3), 3, backend=backend).backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [2, 37])
@pytest.mark.parametrize("where", ["first", "last"])
def test_dkd_bkd_target_on_edge_classes(where, vocab, backend):
    """One row, the target on the first or the last class (the DKD group-0 edge cases)."""
    target = torch.tensor([0 if where == "first" else vocab - 1])
    student, teacher = _logits((1, vocab), torch.float32)
    weight = torch.rand(vocab) + 0.1
    cases = [
        (lambda s: lk.dkd_loss(s, teacher, target, backend=backend),
         lambda s: eq.dkd_rows(s, teacher.double(), target)),
        (lambda s: lk.bkd_loss(s, teacher, weight, target=target, backend=backend),
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
