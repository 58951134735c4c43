"""The C++ backend's fused forward + gradient (KD, BKD, DKD: csrc/grouped_kl_grad.cpp,
``grouped_kl_loss_forward_grad``): the gradient written in the forward's pass from the exps of
the states walk must be the gradient the backward kernel computes.

Each case runs the same call twice, fused (the default) and with
``ltkd_kernels.ops.grouped_kl.FUSED_CPU_GRADIENT = False`` (the loss's forward, then the
backward kernel): the loss must be the same bits; the gradient the same bits where the row's
maxima never moved after its first block (every row of at most 1024 classes; with DKD's
cross-entropy, unless the target is the student's maximum) and the upstream gradient is 1,
else within a few float32 roundings (the exps rescaled from an earlier maximum, or the
upstream applied after the gradient's rounding)."""
import pytest
import torch

import ltkd_kernels as lk
from ltkd_kernels.ops import grouped_kl as ops_grouped_kl
from ltkd_kernels.ops.launches import counting

cpu = pytest.importorskip("ltkd_kernels.cpu")
if cpu.unavailable_reason() is not None:  # pragma: no cover - no compiler here
    pytest.skip(f"C++ backend unavailable: {cpu.unavailable_reason()}", allow_module_level=True)


@pytest.fixture
def unfused(monkeypatch):
    """A context in which the gradient comes from the backward kernel."""
    class Switch:
        def __enter__(self):
            monkeypatch.setattr(ops_grouped_kl, "FUSED_CPU_GRADIENT", False)

        def __exit__(self, *exc):
            monkeypatch.setattr(ops_grouped_kl, "FUSED_CPU_GRADIENT", True)

    return Switch()


def _logits(rows, vocab, seed, kind="random"):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, vocab, generator=g) * 3
    t = torch.randn(rows, vocab, generator=g) * 3
    if kind == "rising":
        # The maxima rise in every later block: several epochs per row.
        ramp = torch.linspace(0, 12, vocab)
        s, t = s + ramp, t + 0.5 * ramp
    elif kind == "staircase":
        # A new record in every chunk of the second block: more epochs than the capture holds.
        s = torch.arange(vocab, dtype=torch.float32).repeat(rows, 1) * 0.01 + s * 1e-3
        t = torch.arange(vocab, dtype=torch.float32).repeat(rows, 1) * 0.02 + t * 1e-3
    elif kind == "neg_inf":
        s[:, ::7] = float("-inf")
        t[:, 3::5] = float("-inf")
        t[0] = float("-inf")  # a row the teacher masks entirely
        t[0, 1] = 0.0
    return s, t


LOSSES = {
    "kd": lambda s, t, y, w, **kw: lk.kd_loss(s, t, temperature=2.0, backend="cpu", **kw),
    "kd_ce": lambda s, t, y, w, **kw: lk.kd_loss(s, t, temperature=3.0, target=y, ce_weight=0.5,
                                                 backend="cpu", **kw),
    "bkd": lambda s, t, y, w, **kw: lk.bkd_loss(s, t, w, temperature=2.0, backend="cpu", **kw),
    "bkd_ce": lambda s, t, y, w, **kw: lk.bkd_loss(s, t, w, target=y, ce_weight=1.0,
                                                   temperature=4.0, backend="cpu", **kw),
    "dkd": lambda s, t, y, w, **kw: lk.dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=4.0,
                                                backend="cpu", **kw),
    "dkd_ce": lambda s, t, y, w, **kw: lk.dkd_loss(s, t, y, alpha=0.5, beta=2.0, temperature=2.0,
                                                   ce_weight=1.0, backend="cpu", **kw),
}


def _run(loss, s, t, y, w, upstream=None, **kw):
    student = s.clone().requires_grad_(True)
    value = LOSSES[loss](student, t, y, w, **kw)
    if upstream is None:
        (value if value.dim() == 0 else value.sum()).backward()
    else:
        (value * upstream).sum().backward()
    return value.detach(), student.grad


def _compare(loss, s, t, y, w, unfused, exact, upstream=None, **kw):
    fused_loss, fused_grad = _run(loss, s, t, y, w, upstream, **kw)
    with unfused:
        ref_loss, ref_grad = _run(loss, s, t, y, w, upstream, **kw)
    assert torch.equal(fused_loss, ref_loss)
    if exact:
        assert torch.equal(fused_grad, ref_grad), (fused_grad - ref_grad).abs().max()
    else:
        scale = ref_grad.abs().max()
        torch.testing.assert_close(fused_grad, ref_grad, rtol=4e-6, atol=4e-7 * float(scale))


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("rows,vocab", [(1, 1), (5, 37), (33, 1000), (3, 1024)])
@pytest.mark.parametrize("options", ["plain", "mask_weight", "sum", "none", "num_items"])
def test_fused_gradient_is_the_backward_kernels(loss, rows, vocab, options, unfused):
    s, t = _logits(rows, vocab, seed=rows * 7 + vocab)
    y = torch.randint(vocab, (rows,), generator=torch.Generator().manual_seed(1))
    w = torch.rand(vocab, generator=torch.Generator().manual_seed(2)) + 0.1
    kw = {}
    if options == "mask_weight":
        kw = dict(mask=torch.arange(rows) % 3 != 1, sample_weight=torch.rand(rows) + 0.5)
    elif options == "sum":
        kw = dict(reduction="sum")
    elif options == "none":
        kw = dict(reduction="none")
    elif options == "num_items":
        kw = dict(num_items_in_batch=torch.tensor(rows + 2))
    # DKD's cross-entropy: a row whose target (left out of the walk) is the student's maximum
    # has its cross-entropy exps rescaled to it: within roundings, not the same bits.
    _compare(loss, s, t, y, w, unfused, exact=loss != "dkd_ce", **kw)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("kind,vocab", [("rising", 3000), ("random", 5000), ("staircase", 1700),
                                        ("neg_inf", 2100), ("neg_inf", 999), ("random", 400003)])
def test_fused_gradient_when_the_maxima_move(loss, kind, vocab, unfused):
    """Rows of several blocks whose maxima rise (the exps rescaled per epoch), more epochs than
    the capture holds (those rows take the backward kernel's row function), -inf logits; rows
    so long that the capture buffer is the call's own (over 2^20 floats with the
    cross-entropy's third stream)."""
    rows = 6 if vocab < 100000 else 2
    s, t = _logits(rows, vocab, seed=vocab, kind=kind)
    y = torch.randint(vocab, (rows,), generator=torch.Generator().manual_seed(3))
    w = torch.rand(vocab, generator=torch.Generator().manual_seed(4)) + 0.1
    _compare(loss, s, t, y, w, unfused, exact=vocab <= 1024 or kind == "staircase")


@pytest.mark.parametrize("loss", ["kd", "bkd_ce", "dkd"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_fused_gradient_with_an_upstream_gradient(loss, reduction, unfused):
    """The backward scales the fused gradient by the upstream (one value, or one per row)."""
    rows, vocab = 9, 300
    s, t = _logits(rows, vocab, seed=11)
    y = torch.randint(vocab, (rows,), generator=torch.Generator().manual_seed(5))
    w = torch.rand(vocab, generator=torch.Generator().manual_seed(6)) + 0.1
    upstream = torch.tensor(0.37) if reduction == "batchmean" else torch.rand(rows) - 0.5
    _compare(loss, s, t, y, w, unfused, exact=False, upstream=upstream, reduction=reduction)
    # An expanded upstream (rows.sum() of reduction="none") and a zero upstream.
    _compare(loss, s, t, y, w, unfused, exact=True, reduction="none")
    _compare(loss, s, t, y, w, unfused, exact=True, upstream=torch.tensor(0.0))


def test_fused_gradient_retain_graph_and_accumulation(unfused):
    """A second backward of the same graph (retain_graph) computes the gradient afresh, and
    gradients accumulate into .grad as autograd's do."""
    s, t = _logits(4, 500, seed=12)
    student = s.clone().requires_grad_(True)
    loss = lk.kd_loss(student, t, temperature=2.0, backend="cpu")
    loss.backward(retain_graph=True)
    first = student.grad.clone()
    loss.backward()
    torch.testing.assert_close(student.grad, 2 * first, rtol=1e-6, atol=0)
    (0.5 * lk.kd_loss(student, t, temperature=2.0, backend="cpu")).backward()
    torch.testing.assert_close(student.grad, 2.5 * first, rtol=1e-6, atol=0)
    with unfused:
        _, ref = _run("kd", s, t, None, None)
    assert torch.equal(first, ref)


def test_fused_gradient_launches_and_inputs():
    """Fused: one call into the extension forward, one (the upstream scale) backward; without a
    gradient to compute (no_grad, a student that needs none) the plain forward runs; the
    inputs are not modified."""
    s, t = _logits(8, 100, seed=13)
    student = s.clone().requires_grad_(True)
    before = (student.detach().clone(), t.clone())
    with counting() as calls:
        loss = lk.kd_loss(student, t, backend="cpu")
    assert dict(calls) == {"cpu:loss_forward_grad": 1}
    with counting() as calls:
        loss.backward()
    assert dict(calls) == {"cpu:scale_grad": 1}
    with counting() as calls, torch.no_grad():
        lk.kd_loss(student, t, backend="cpu")
    assert dict(calls) == {"cpu:loss_forward": 1}
    with counting() as calls:
        lk.kd_loss(s, t, backend="cpu")
    assert dict(calls) == {"cpu:loss_forward": 1}
    assert torch.equal(student.detach(), before[0]) and torch.equal(t, before[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_gradient_not_used_for_half_students(dtype):
    """A bfloat16/float16 gradient would be rounded twice by a later upstream scale: those
    students take the backward kernel."""
    s, t = _logits(4, 200, seed=14)
    student = s.to(dtype).requires_grad_(True)
    with counting() as calls:
        loss = lk.kd_loss(student, t, backend="cpu")
        loss.backward()
    assert dict(calls) == {"cpu:loss_forward": 1, "cpu:grad": 1}
    assert student.grad.dtype == dtype


def test_fused_gradient_under_forced_scalar_kernels(unfused):
    """With the scalar kernels forced (testing), the extension declines the fused pass and the
    backward kernel computes the gradient."""
    s, t = _logits(3, 70, seed=15)
    ext = cpu.extension()
    ext.set_force_scalar(True)
    try:
        student = s.clone().requires_grad_(True)
        with counting() as calls:
            LOSSES["kd"](student, t, None, None).backward()
        scalar_grad = student.grad
    finally:
        ext.set_force_scalar(False)
    assert dict(calls) == {"cpu:loss_forward_grad": 1, "cpu:grad": 1}
    with unfused:
        _, ref = _run("kd", s, t, None, None)
    torch.testing.assert_close(scalar_grad, ref, rtol=2e-6, atol=1e-9)
