"""Regression tests of the wrong answers a differential fuzz found (one test per finding).

Each failed on the code before the (N, G) arithmetic moved into log space and the kernels; the
numbers in the docstrings are what that code returned.
"""
import numpy as np
import pytest
import torch

import equations as eq
import ltkd_kernels as lk
from conftest import assert_grad_close, assert_loss_close, with_backends


@with_backends()
@pytest.mark.parametrize("gap", [100.0, 110.0, 200.0])
def test_rebalancing_with_group_masses_below_float32_range(gap, backend):
    """1. A teacher group mass of e^-100 underflowed float32: pB_k was 0 (an "empty" group) or
    1/pB_k overflowed. Old fp32 result at gap 100: [0.0, -0.1796] (a negative KL); the true
    values are [0.5503, 0.4913] (rebalancing makes them independent of a common shift)."""
    groups = torch.tensor([0, 1, 2])
    student = torch.tensor([[0.0, -1.0, -2.0], [0.5, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, -gap, -20.0], [0.0, -gap - 5.0, -25.0]])
    rows = lk.ltkd_loss(student, teacher, groups, reduction="none", backend=backend)
    rows64 = eq.ltkd_rows(student.double(), teacher.double(), groups, 3)
    torch.testing.assert_close(rows64, torch.tensor([0.5503, 0.4913], dtype=torch.float64),
                               rtol=2e-4, atol=0)
    assert_loss_close(rows, rows64)
    s = student.clone().requires_grad_()
    lk.ltkd_loss(s, teacher, groups, backend=backend).backward()
    s64 = student.double().requires_grad_()
    eq.ltkd_rows(s64, teacher.double(), groups, 3).mean().backward()
    assert_grad_close(s.grad, s64.grad)


@with_backends()
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_teacher_gives_nan(bad, backend):
    """2. One NaN teacher logit gave that row a KD loss of 0.0; an all-NaN batch gave 0.0;
    LTKD gave finite values (and changed the other rows through pB)."""
    student, teacher = torch.randn(3, 20), torch.randn(3, 20)
    teacher[1, 4] = bad
    kd = lk.kd_loss(student, teacher, reduction="none", backend=backend)
    assert torch.isnan(kd[1]) and torch.isfinite(kd[[0, 2]]).all()
    assert torch.isnan(lk.kd_loss(student, torch.full_like(teacher, bad), backend=backend))
    groups = torch.arange(20) % 3
    # Rebalancing carries the teacher's NaN into pB, so into every row (as the equations do).
    assert torch.isnan(lk.ltkd_loss(student, teacher, groups, reduction="none", backend=backend)).all()
    plain = lk.ltkd_loss(student, teacher, groups, rebalance=False, reduction="none", backend=backend)
    assert torch.isnan(plain[1]) and torch.isfinite(plain[[0, 2]]).all()
    s = student.clone()
    s[2, 0] = bad
    assert torch.isnan(lk.dkd_loss(s, torch.randn(3, 20), torch.tensor([0, 1, 2]),
                                   reduction="none", backend=backend)[2])


@with_backends()
def test_group_ids_written_behind_the_check_never_reach_memory(backend, request):
    """3. The range check was cached on the tensor's version counter, which a write through
    .numpy() does not bump: the Triton backend then read past the (N, G) statistics."""
    groups = torch.arange(30) % 3
    student, teacher = torch.randn(2, 30), torch.randn(2, 30)
    lk.ltkd_loss(student, teacher, groups, 3, backend=backend)  # checked (and cached)
    groups.numpy()[5] = 1000
    if "triton" in request.node.callspec.id:
        assert torch.isnan(lk.ltkd_loss(student, teacher, groups, 3, backend=backend))
    else:
        with pytest.raises(ValueError, match="groups"):
            lk.ltkd_loss(student, teacher, groups, 3, backend=backend)


@with_backends()
def test_num_groups_has_a_bound(backend):
    """4. G > 65536 failed inside the Triton interpreter, G >= 2^24 raised from C++, and the
    reference hung for minutes at G = 2^24."""
    student, teacher = torch.randn(2, 5), torch.randn(2, 5)
    groups = torch.tensor([0, 1, 0, 1, 0])
    for bad in (2 ** 16 + 1, 2 ** 24):
        with pytest.raises(ValueError, match="num_groups"):
            lk.ltkd_loss(student, teacher, groups, bad, backend=backend)
    with pytest.raises(ValueError, match="groups"):
        lk.ltkd_loss(student, teacher, groups * 5000, backend=backend)


@with_backends()
def test_bkd_when_the_teachers_top_class_has_weight_zero(backend):
    """5. The reference computed w * softmax(z^T / T) in float32: with the top class at weight
    0 and the rest underflowing, the loss was 0 (true: 0.73 here)."""
    student = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    teacher = torch.tensor([[300.0, 0.0, 1.0, -2.0]])
    weight = torch.tensor([0.0, 1.0, 1.0, 1.0])
    loss = lk.bkd_loss(student, teacher, weight, backend=backend)
    expected = eq.bkd_rows(student.double(), teacher.double(), weight)
    assert float(expected) > 0.5  # the old float32 reference: 0.0
    assert_loss_close(loss.reshape(1), expected, scale=4.0)


@with_backends()
def test_empty_batch_with_zero_strides(backend):
    """6a. torch.from_numpy of an empty (0, V) array has zero strides: the C++ backend raised."""
    student = torch.from_numpy(np.empty((0, 7), np.float32))
    teacher = torch.from_numpy(np.empty((0, 7), np.float32))
    assert lk.kd_loss(student, teacher, backend=backend).item() == 0.0
    assert lk.ltkd_loss(student, teacher, torch.arange(7) % 2, reduction="none",
                        backend=backend).shape == (0,)


@with_backends()
def test_logits_that_overflow_after_dividing_by_t_give_nan(backend):
    """6b. fp32 logits that overflow to inf after dividing by T returned 0.0."""
    student = torch.tensor([[3e38, 0.0, -1.0]])
    teacher = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.isnan(lk.kd_loss(student, teacher, temperature=0.05, backend=backend))


@with_backends()
def test_gradient_at_large_scaled_logits(backend):
    """6c. At |z/T| ~ 700 the C++ gradient at the arg-max was exactly 0 (a float32 LSE),
    0.52 relative error against 0.06 for the float32 reference."""
    g = torch.Generator().manual_seed(3)
    student = 700.0 + 5.0 * torch.randn(4, 300, generator=g)
    teacher = student + torch.randn(4, 300, generator=g)
    errors = {}
    for name in (backend, "torch"):
        s = student.clone().requires_grad_()
        lk.kd_loss(s, teacher, backend=name).backward()
        errors[name] = s.grad
    s64 = student.double().requires_grad_()
    eq.kd_rows(s64, teacher.double(), 1.0).mean().backward()
    err = (errors[backend].double() - s64.grad).norm() / s64.grad.norm()
    err_reference = (errors["torch"].double() - s64.grad).norm() / s64.grad.norm()
    assert err <= 2 * err_reference + 1e-5, (float(err), float(err_reference))


@with_backends()
def test_near_identical_tiny_logits_within_group_kl(backend):
    """6d. For near-identical tiny logits with G = 8, the C++ within-group KL cancelled (2%
    error against 0.13% for the float32 reference)."""
    g = torch.Generator().manual_seed(5)
    student = torch.randn(6, 1000, generator=g) * 0.1
    teacher = student + torch.randn(6, 1000, generator=g) * 0.01
    groups = torch.arange(1000) % 8
    rows = {name: lk.ltkd_loss(student, teacher, groups, 8, reduction="none", backend=name)
            for name in (backend, "torch")}
    rows64 = eq.ltkd_rows(student.double(), teacher.double(), groups, 8)
    err = ((rows[backend].double() - rows64).abs() / rows64.abs()).max()
    err_reference = ((rows["torch"].double() - rows64).abs() / rows64.abs()).max()
    assert err <= 2 * err_reference + 1e-4, (float(err), float(err_reference))


@pytest.mark.parametrize("teacher_kind", ["dense", "topk", "topk_restrict"])
@with_backends()
def test_no_tensor_made_on_the_default_device(backend, teacher_kind):
    """7. On a GPU, the top-k teacher's value check built ``torch.arange(k)`` on the CPU next
    to CUDA indices: every loss with a top-k teacher raised (the first GPU run, 2026-11-27).
    Here the default device is ``meta``: a tensor made without ``device=`` lands there and
    meets the CPU inputs (forward and backward, and SRW's weights)."""
    vocab, rows = 50, 6
    student = torch.randn(rows, vocab, requires_grad=True)
    dense = torch.randn(rows, vocab)
    teacher = {"dense": dense, "topk": lk.topk_teacher(dense, 8),
               "topk_restrict": lk.topk_teacher(dense, 8, rest="restrict")}[teacher_kind]
    groups, target = torch.randint(0, 3, (vocab,)), torch.randint(0, vocab, (rows,))
    weight = torch.rand(vocab) + 0.1
    with torch.device("meta"):
        losses = [lk.kd_loss(student, teacher, backend=backend),
                  lk.ltkd_loss(student, teacher, groups, 3, backend=backend),
                  lk.dkd_loss(student, teacher, target, backend=backend),
                  lk.bkd_loss(student, teacher, weight, target=target, ce_weight=1.0,
                              backend=backend)]
        sum(losses).backward()
        weights = lk.srw_weights(torch.randn(20, 16, device="cpu"), backend=backend)
    assert student.grad.device.type == "cpu" and torch.isfinite(student.grad).all()
    assert weights.device.type == "cpu"


@pytest.mark.parametrize("as_list", [False, True])
def test_group_helpers_ignore_the_default_device(as_list):
    """7b. ``groups_from_counts`` and ``class_balanced_weights`` made some of their tensors on
    the default device: under ``torch.device("cuda")`` (or ``meta`` here) the thresholds form
    raised and the other returned a tensor on that device. Both return CPU tensors."""
    counts = torch.randint(1, 200, (30,))
    given = counts.tolist() if as_list else counts
    expected = (lk.groups_from_counts(counts, 3), lk.groups_from_counts(counts, thresholds=(100, 20)),
                lk.class_balanced_weights(counts, beta=0.99))
    with torch.device("meta"):
        got = (lk.groups_from_counts(given, 3), lk.groups_from_counts(given, thresholds=(100, 20)),
               lk.class_balanced_weights(given, beta=0.99))
    for value, reference in zip(got, expected):
        assert value.device.type == "cpu"
        torch.testing.assert_close(value, reference, rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [0.135, 0.5])
@with_backends()
def test_renormalized_topk_teacher_at_low_temperature(temperature, backend):
    """8. With a renormalized top-k teacher the C++ gap of each group mixed the exact logit
    difference with maxima of the rounded ``lp / T``: off by ``|lp / T| * 6e-8`` per entry, a
    one-class group's gap was 1.3e-6 instead of 0, and LTKD with its group masses (9 groups,
    T = 0.135, logits of size 0.01) was 2.8e-5 off in relative terms against 1.1e-6 for the
    float32 reference (found by the differential fuzz, 2026-11-28)."""
    g = torch.Generator().manual_seed(11)
    vocab, rows, num_groups = 32, 3, 9
    student = 0.01 * torch.randn(rows, vocab, generator=g)
    dense = 0.01 * torch.randn(rows, vocab, generator=g)
    groups = torch.randint(num_groups, (vocab,), generator=g)
    groups[:2] = torch.tensor([num_groups, num_groups + 1])  # two one-class groups
    num_groups += 2
    errors = {}
    for k in (vocab, vocab // 2):
        teacher = lk.topk_teacher(dense, k, groups=groups, num_groups=num_groups,
                                  temperature=temperature)
        teacher64 = lk.TopKTeacher(teacher.indices, teacher.logprobs.double(), teacher.rest,
                                   teacher.group_logmass.double())
        rows64 = lk.ltkd_loss(student.double(), teacher64, groups, num_groups,
                              temperature=temperature, reduction="none", backend="torch")
        for name in (backend, "torch"):
            got = lk.ltkd_loss(student, teacher, groups, num_groups, temperature=temperature,
                               reduction="none", backend=name)
            errors[name] = ((got.double() - rows64).abs() / rows64.abs()).max().item()
        assert errors[backend] <= 2 * errors["torch"] + 2e-6, (k, errors)


@with_backends()
@pytest.mark.parametrize("temperature", [0.3, 2.8045693562372267])
def test_group_logsumexp_gradient_at_large_scaled_logits(temperature, backend):
    """9. ``group_logsumexp``'s backward divided the logits by T where the kernels' forward
    multiplies them by 1 / T: 1 ulp apart, so at ``|z / T| ~ 2e5`` a one-class group's
    within-group probability ``exp(b - lse)`` was 1.016 instead of 1 (0.998 at T = 2.8),
    on the C++ and Triton backends (found by a fuzz of group_logsumexp, 2026-11-28)."""
    logits = torch.tensor([[-60000.0, 3.0, -2.0], [5.0e4, 1.0, 2.0]])
    groups = torch.tensor([0, 1, 1])
    x = logits.clone().requires_grad_()
    lse = lk.group_logsumexp(x, groups, 2, temperature=temperature, backend=backend)
    lse.sum().backward()
    x64 = logits.double().requires_grad_()
    lk.group_logsumexp(x64, groups, 2, temperature=temperature, backend="torch").sum().backward()
    # (the one-class group's gradient is 1 / T exactly up to float32's 1 / T)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-6, atol=0)


@with_backends()
def test_group_logsumexp_gradient_of_large_log_sum_exps(backend):
    """10. ``group_logsumexp``'s backward took each class's probability as ``exp(b - lse)``
    from the float32-rounded ``lse``: off by up to ``|lse| * 6e-8`` relative (here, lse ~ 404:
    1.2e-5, the float32 reference 1e-7). It now takes ``exp((b - ref(m)) - log s)`` from the
    state's reference and log-sum (found by the fuzz of group_logsumexp, 2026-11-28)."""
    g = torch.Generator().manual_seed(1)
    logits = 400.0 + 3.0 * torch.randn(4, 300, generator=g)  # |lse| ~ 404, many classes near it
    groups = torch.randint(0, 3, (300,), generator=g)
    upstream = torch.randn(4, 3, generator=g)
    grads = {}
    for name, dtype in ((backend, torch.float32), ("torch", torch.float32), ("torch", torch.float64)):
        x = logits.to(dtype).clone().requires_grad_()
        (lk.group_logsumexp(x, groups, 3, backend=name) * upstream.to(dtype)).sum().backward()
        grads[name, dtype] = x.grad.double()
    exact = grads["torch", torch.float64]
    err = (grads[backend, torch.float32] - exact).norm() / exact.norm()
    err_reference = (grads["torch", torch.float32] - exact).norm() / exact.norm()
    assert err <= 2 * err_reference + 1e-6, (float(err), float(err_reference))
