"""The C++ backend's autograd node (csrc/autograd.cpp): a plain eager call with ``backend="cpu"``
builds its graph node in C++ instead of the Python ``GroupedKLLoss`` Function of
ltkd_kernels/ops/grouped_kl.py. Both run the same kernels, so each case below compares the two
for the same bits (loss and gradient), across losses, options, upstream gradients and dtypes;
and checks which node a call gets, and what the launch counter sees of a backward the engine
runs without Python."""
import pytest
import torch

import ltkd_kernels as lk
from ltkd_kernels.ops import grouped_kl as ops_grouped_kl
from ltkd_kernels.ops.launches import counting

cpu = pytest.importorskip("ltkd_kernels.cpu")
if cpu.unavailable_reason() is not None:  # pragma: no cover - no compiler here
    pytest.skip(f"C++ backend unavailable: {cpu.unavailable_reason()}", allow_module_level=True)

from ltkd_kernels.cpu import grouped_kl as cpu_grouped_kl  # noqa: E402

V = 37
GROUPS = torch.arange(V) % 3
WEIGHTS = torch.rand(V, generator=torch.Generator().manual_seed(5)) + 0.1

LOSSES = {
    "kd": lambda s, t, y, **kw: lk.kd_loss(s, t, temperature=2.0, backend="cpu", **kw),
    "kd_ce": lambda s, t, y, **kw: lk.kd_loss(s, t, temperature=3.0, target=y, ce_weight=0.5,
                                              backend="cpu", **kw),
    "bkd": lambda s, t, y, **kw: lk.bkd_loss(s, t, WEIGHTS, temperature=2.0, backend="cpu", **kw),
    "dkd": lambda s, t, y, **kw: lk.dkd_loss(s, t, y, backend="cpu", **kw),
    "ltkd": lambda s, t, y, **kw: lk.ltkd_loss(s, t, GROUPS, temperature=2.0, backend="cpu", **kw),
    "ltkd_ce": lambda s, t, y, **kw: lk.ltkd_loss(s, t, GROUPS, within_weight="teacher",
                                                  target=y, ce_weight=1.0, backend="cpu", **kw),
}


@pytest.fixture
def python_node(monkeypatch):
    """A context in which the call takes the Python Function (the C++ module without its
    autograd entry point)."""
    class Switch:
        def __enter__(self):
            monkeypatch.delattr(cpu_grouped_kl, "loss_autograd")

        def __exit__(self, *exc):
            monkeypatch.undo()

    return Switch()


def _inputs(rows, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(rows, V, generator=g) * 3).to(dtype)
    t = torch.randn(rows, V, generator=g) * 3
    t[0, ::5] = float("-inf")
    y = torch.randint(0, V, (rows,), generator=g)
    return s, t, y


def _step(loss, s, t, y, upstream="one", **kw):
    """``(loss, gradient, node name)`` of one call and its backward."""
    student = s.clone().requires_grad_(True)
    value = LOSSES[loss](student, t, y, **kw)
    node = type(value.grad_fn).__name__ if value.grad_fn is None else value.grad_fn.name()
    if upstream == "one":
        value.sum().backward()
    elif upstream == "weighted":
        # A different upstream value per row (reduction="none"), or a scalar other than 1.
        scale = torch.linspace(-1.5, 2.0, value.numel()).reshape(value.shape)
        (value * scale).sum().backward()
    elif upstream == "strided":
        # A non-contiguous upstream gradient of one value per row.
        big = torch.randn(value.numel(), 2, generator=torch.Generator().manual_seed(3))
        torch.autograd.backward(value, big[:, 0] if value.dim() else big[0, 0])
    return value.detach(), student.grad, node


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("reduction,upstream", [("batchmean", "one"), ("batchmean", "weighted"),
                                                ("none", "one"), ("none", "weighted"),
                                                ("none", "strided"), ("sum", "one")])
@pytest.mark.parametrize("rows", [1, 6])
def test_native_node_equals_python_function(python_node, loss, reduction, upstream, rows):
    s, t, y = _inputs(rows, seed=rows)
    mask = torch.ones(rows, dtype=torch.bool)
    mask[-1] = rows == 1
    weight = torch.linspace(0.5, 2.0, rows)
    kw = dict(reduction=reduction, mask=mask, sample_weight=weight)
    value, grad, node = _step(loss, s, t, y, upstream, **kw)
    with python_node:
        ref_value, ref_grad, ref_node = _step(loss, s, t, y, upstream, **kw)
    assert "GroupedKLFunction" in node and ref_node == "GroupedKLLossBackward"
    assert torch.equal(value, ref_value)
    assert torch.equal(grad, ref_grad)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ["kd", "dkd", "ltkd"])
def test_native_node_dtypes(python_node, loss, dtype):
    """A half student takes the gradient kernel in the backward (no fused gradient)."""
    s, t, y = _inputs(5, dtype, seed=7)
    value, grad, _ = _step(loss, s, t, y, "weighted", reduction="none")
    with python_node:
        ref_value, ref_grad, _ = _step(loss, s, t, y, "weighted", reduction="none")
    assert grad.dtype == dtype
    assert torch.equal(value, ref_value) and torch.equal(grad, ref_grad)


def test_native_node_retain_graph_and_accumulation():
    """A second backward through the same node computes the gradient afresh (the fused one was
    taken by the first), and gradients accumulate into .grad."""
    s, t, y = _inputs(4, seed=9)
    for loss in ("kd", "ltkd"):
        student = s.clone().requires_grad_(True)
        value = LOSSES[loss](student, t, y)
        value.backward(retain_graph=True)
        first = student.grad.clone()
        value.backward()
        torch.testing.assert_close(student.grad, 2 * first, rtol=1e-6, atol=0)


def test_native_node_launches_and_inputs():
    """Forward: one call into the extension; backward: one, counted by the extension (the
    engine runs it without Python); inputs unmodified; the node saves its inputs, so an
    in-place change before the backward is an error, not a wrong gradient."""
    s, t, y = _inputs(3, seed=11)
    student = s.clone().requires_grad_(True)
    before = (student.detach().clone(), t.clone())
    with counting() as calls:
        value = lk.ltkd_loss(student, t, GROUPS, backend="cpu")
    assert dict(calls) == {"cpu:loss_forward": 1}
    with counting() as calls:
        value.backward()
    assert dict(calls) == {"cpu:grad": 1}
    with counting() as calls:
        lk.kd_loss(student, t, backend="cpu").backward()
    assert dict(calls) == {"cpu:loss_forward_grad": 1, "cpu:scale_grad": 1}
    assert torch.equal(student.detach(), before[0]) and torch.equal(t, before[1])
    leaf = s.clone().requires_grad_(True)
    other = leaf * 1.0
    value = lk.ltkd_loss(other, t, GROUPS, backend="cpu")
    with torch.no_grad():
        other.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        value.backward()


def test_python_function_where_the_node_does_not_apply():
    """torch.compile tracing, dispatch modes and no-grad calls: the Python Function (or no
    node at all)."""
    s, t, y = _inputs(2, seed=13)
    with torch.no_grad():
        assert lk.kd_loss(s.clone().requires_grad_(True), t, backend="cpu").grad_fn is None
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    student = s.clone().requires_grad_(True)
    with Passthrough():
        value = lk.kd_loss(student, t, backend="cpu")
    assert value.grad_fn.name() == "GroupedKLLossBackward"


@pytest.mark.parametrize("node", ["native", "python"])
@pytest.mark.parametrize("loss", ["kd", "ltkd"])
def test_gradient_is_not_silently_differentiated_twice(python_node, node, loss):
    """The kernels' gradient is not differentiable again: under create_graph=True a backward
    through it raises (never a penalty silently treated as a constant); first-order results
    are unchanged. The reference (backend="torch") differentiates twice."""
    s, t, y = _inputs(3, seed=17)
    student = s.clone().requires_grad_(True)

    def first_order():
        value = LOSSES[loss](student, t, y)
        (g,) = torch.autograd.grad(value, student, create_graph=True)
        return g

    if node == "python":
        with python_node:
            g = first_order()
    else:
        g = first_order()
    (plain,) = torch.autograd.grad(LOSSES[loss](student, t, y), student)
    assert torch.equal(g.detach(), plain)
    other = (student * 2.0).sum()
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        ((g ** 2).sum() + other).backward()
    x = s.double().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(lk.kd_loss(x, t.double(), temperature=2.0, backend="torch"),
                                   x, create_graph=True)
    (g_ref ** 2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
