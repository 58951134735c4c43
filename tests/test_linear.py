"""The fused-linear losses (ltkd_kernels.linear) against their definition, in float64:
``logits = hidden @ W.T + b`` then the logits loss (the reference), for the loss and the
gradients of the student's hidden states, weight and bias.

Backends (tests/conftest.py): "torch" (the reference composition itself), "torch-ops" (the
plain-torch operators of backend="auto" without kernels), "triton" (interpreted on the CPU:
small shapes), "cpu" (C++). Tolerances: conftest's rule (gradients norm-wise to 1e-5 in fp32;
bf16/fp16 inputs against float64 on the same rounded inputs); the loss to 1e-5 relative plus
1e-6 times its first-order sensitivity to the float32 rounding of the logits, which the logits
losses' tests do not have (their float32 logits are the inputs; here they are computed).
"""
import math
import os
from typing import NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as F

import ltkd_kernels as lk
from conftest import GRAD_RTOL, assert_grad_close, assert_loss_close, random_groups, with_backends
from ltkd_kernels import linear as L
from ltkd_kernels.linear_modules import (
    FusedLinearBKDLoss,
    FusedLinearDKDLoss,
    FusedLinearKDLoss,
    FusedLinearLTKDLoss,
)

FUSED = {"kd": L.fused_linear_kd_loss, "ltkd": L.fused_linear_ltkd_loss,
         "dkd": L.fused_linear_dkd_loss, "bkd": L.fused_linear_bkd_loss}
LOGITS = {"kd": lk.kd_loss, "ltkd": lk.ltkd_loss, "dkd": lk.dkd_loss, "bkd": lk.bkd_loss}


class Case(NamedTuple):
    loss: str
    options: dict
    topk: Optional[dict] = None   # topk_teacher(...) options: the teacher is a TopKTeacher


def _class_weight(vocab):
    weight = torch.rand(vocab) + 0.05
    if vocab > 2:
        weight[1] = 0.0  # a class of weight 0: no teacher probability
    return weight


def make_case(name, vocab):
    g3 = random_groups(vocab, 3)
    return {
        "kd": lambda: Case("kd", dict(temperature=2.0)),
        "ltkd": lambda: Case("ltkd", dict(groups=g3, num_groups=3, temperature=4.0, alpha=0.7,
                                          beta=1.3)),
        "ltkd_teacher_within": lambda: Case("ltkd", dict(groups=g3, num_groups=3, temperature=1.5,
                                                         rebalance=False,
                                                         within_weight="teacher")),
        "dkd": lambda: Case("dkd", dict()),
        "bkd": lambda: Case("bkd", dict(class_weight=_class_weight(vocab), temperature=3.0)),
        "bkd_ce": lambda: Case("bkd", dict(class_weight=_class_weight(vocab), temperature=3.0,
                                           ce_weight=1.0)),
        "kd_ce_half": lambda: Case("kd", dict(ce_weight=0.5)),
        "ltkd_topk": lambda: Case("ltkd", dict(groups=g3, num_groups=3, temperature=2.0),
                                  topk=dict(k=min(8, vocab), groups=g3, num_groups=3,
                                            temperature=2.0)),
        "kd_topk_bucket": lambda: Case("kd", dict(), topk=dict(k=min(5, vocab), rest="bucket")),
        # 12 groups drawn at random: the Triton launchers take the window walk (every lane
        # one group) for the chunks' compact ids, which carry the original's plan
        "ltkd_g12": lambda: Case("ltkd", dict(groups=random_groups(vocab, 12), num_groups=12,
                                              temperature=2.0)),
    }[name]()


CASE_NAMES = ["kd", "ltkd", "ltkd_teacher_within", "dkd", "bkd", "bkd_ce", "kd_ce_half",
              "ltkd_topk", "kd_topk_bucket", "ltkd_g12"]

# (leading, H, H_T, V, chunk_size): N = 1 with H = 1; N not a multiple of the chunk and
# H != H_T; a 2-D leading shape at V = 1031; chunk_size = 1 at V = 2; V = 1; the automatic chunk.
SHAPES = [((1,), 1, 1, 1031, None), ((7,), 5, 3, 37, 3), ((2, 3), 4, 6, 1031, 4),
          ((5,), 3, 2, 2, 1), ((6,), 2, 2, 1, 4), ((24,), 6, 4, 97, None)]


class Inputs(NamedTuple):
    x: torch.Tensor
    w: torch.Tensor
    b: Optional[torch.Tensor]
    xt: torch.Tensor
    wt: torch.Tensor
    bt: Optional[torch.Tensor]
    target: torch.Tensor


def make_inputs(leading, H, Ht, V, dtype=torch.float32, bias=True, ignore_rows=1):
    """Hidden states and heads whose logits are O(3); ``ignore_rows`` targets = -100."""
    x = torch.randn(*leading, H).to(dtype)
    w = (torch.randn(V, H) * (3.0 / math.sqrt(H))).to(dtype)
    b = (torch.randn(V) * 0.5).to(dtype) if bias else None
    xt = torch.randn(*leading, Ht).to(dtype)
    wt = (torch.randn(V, Ht) * (4.0 / math.sqrt(Ht))).to(dtype)
    bt = (torch.randn(V) * 0.5 + 0.3).to(dtype) if bias else None
    target = torch.randint(V, leading)
    flat = target.view(-1)
    if flat.numel() > 2:
        flat[:ignore_rows] = -100
    return Inputs(x, w, b, xt, wt, bt, target)


def _teacher_logits(inp: Inputs, dtype):
    return F.linear(inp.xt.to(dtype), inp.wt.to(dtype), None if inp.bt is None else inp.bt.to(dtype))


def _topk(case: Case, inp: Inputs):
    return lk.topk_teacher(_teacher_logits(inp, torch.float32), **case.topk)


class Reference(NamedTuple):
    loss: torch.Tensor
    x_grad: torch.Tensor
    w_grad: torch.Tensor
    b_grad: Optional[torch.Tensor]
    condition: torch.Tensor  # per loss element: how much float32 logits may move it


def reference64(case: Case, inp: Inputs, upstream, **options) -> Reference:
    """Float64: logits = hidden @ W.T + b, the logits loss (backend="torch"), its gradients.

    ``condition``: ``sum_i |dl/dz_i| (|x| |w_i| + |b_i| + |teacher's|)`` per loss element,
    the first-order change of the loss when each logit moves by float32 matmul rounding
    (``|dz_i| <~ eps |x| |w_i|``); the loss is compared at ``1e-5 |l| + 1e-6 (1 + condition)``
    (the logits losses' rule, with the inputs' own rounding added)."""
    x = inp.x.double().requires_grad_()
    w = inp.w.double().requires_grad_()
    b = None if inp.b is None else inp.b.double().requires_grad_()
    student = F.linear(x, w, b)
    student.retain_grad()
    teacher = _topk(case, inp) if case.topk else _teacher_logits(inp, torch.float64)
    out = LOGITS[case.loss](student, teacher, **case.options, backend="torch", **options)
    (out * upstream.double()).sum().backward()
    rows = x.detach().reshape(-1, x.shape[-1]).norm(dim=-1, keepdim=True)
    reach = rows * w.detach().norm(dim=-1) + (0.0 if b is None else b.detach().abs())
    if not case.topk:  # the teacher's logits are rounded too: the same order
        t_rows = inp.xt.double().reshape(-1, inp.xt.shape[-1]).norm(dim=-1, keepdim=True)
        reach = reach + t_rows * inp.wt.double().norm(dim=-1)
    per_row = (student.grad.reshape(-1, w.shape[0]).abs() * reach).sum(-1)
    up = upstream.double().reshape(-1).abs()
    if out.dim() == 0:
        condition = per_row.sum() / up.clamp_min(1e-30).reshape(())
    else:
        condition = (per_row / up.clamp_min(1e-30)).reshape(out.shape)
    return Reference(out.detach(), x.grad, w.grad, None if b is None else b.grad, condition)


def assert_fused_loss_close(actual, ref: Reference):
    actual, expected = actual.double(), ref.loss
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), (actual, expected)
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), (actual, expected)
    finite = torch.isfinite(expected)
    err = (actual - expected).abs()[finite]
    bound = (1e-5 * expected.abs() + 1e-6 * (1.0 + ref.condition))[finite]
    assert bool((err <= bound).all()), (actual, expected, err, bound)


def fused(case: Case, inp: Inputs, upstream, backend, chunk_size=None, *, hidden_grad=True,
          weight_grad=True, **options):
    x = inp.x.clone().requires_grad_(hidden_grad)
    w = inp.w.clone().requires_grad_(weight_grad)
    b = None if inp.b is None else inp.b.clone().requires_grad_(weight_grad)
    if case.topk:
        teacher_hidden, teacher_weight, teacher_bias = _topk(case, inp), None, None
    else:
        teacher_hidden, teacher_weight, teacher_bias = inp.xt, inp.wt, inp.bt
    out = FUSED[case.loss](x, w, teacher_hidden, teacher_weight, student_bias=b,
                           teacher_bias=teacher_bias, chunk_size=chunk_size, backend=backend,
                           **case.options, **options)
    assert out.dtype == torch.float32
    if hidden_grad or weight_grad:
        (out * upstream).sum().backward()
    return out.detach(), x.grad, w.grad, None if b is None else b.grad


def _upstream(reduction, leading):
    return torch.rand(leading) + 0.5 if reduction == "none" else torch.tensor(1.7)


def check(case, inp, backend, reduction, chunk_size=None, dtype=torch.float32, **options):
    upstream = _upstream(reduction, inp.x.shape[:-1])
    got = fused(case, inp, upstream, backend, chunk_size, reduction=reduction, **options)
    want = reference64(case, inp, upstream, reduction=reduction, **options)
    assert_fused_loss_close(got[0], want)
    for name, g, g64 in zip(("hidden", "weight", "bias"), got[1:], want[1:]):
        if g64 is None:
            assert g is None, name
            continue
        assert g is not None, name
        assert g.dtype == dtype, name
        assert_grad_close(g, g64, GRAD_RTOL[dtype])


# ---------------------------------------------------------------------------------------------
# Loss and gradients against float64, every loss, odd shapes.

@with_backends(slow=("triton",))  # the interpreter: 144 cases, minutes
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
@pytest.mark.parametrize("leading,H,Ht,V,chunk_size", SHAPES)
@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_fp32_matches_float64(case_name, leading, H, Ht, V, chunk_size, reduction, backend):
    case = make_case(case_name, V)
    inp = make_inputs(leading, H, Ht, V)
    check(case, inp, backend, reduction, chunk_size, target=inp.target)


ROW_OPTIONS = ["sum", "mask_weight_mean", "int_mask_sum", "num_items_tensor", "num_items_number",
               "weight_none", "no_bias", "no_target"]


@with_backends(slow=("triton",))
@pytest.mark.parametrize("case_name,option", [
    (case_name, option) for case_name in ("kd", "ltkd", "dkd", "bkd_ce", "ltkd_topk")
    for option in ROW_OPTIONS
    if not (option == "no_target" and case_name in ("dkd", "bkd_ce"))])  # these need target
def test_row_options(case_name, option, backend):
    leading, H, Ht, V, chunk = (9,), 4, 3, 53, 4
    case = make_case(case_name, V)
    inp = make_inputs(leading, H, Ht, V, bias=option != "no_bias")
    mask = torch.rand(leading) > 0.3
    mask[-1] = True
    weight = torch.rand(leading) + 0.1
    options = dict(target=inp.target)
    reduction = "batchmean"
    if option == "sum":
        reduction = "sum"
    elif option == "mask_weight_mean":
        options.update(mask=mask, sample_weight=weight)
    elif option == "int_mask_sum":
        options.update(mask=mask.long())
        reduction = "sum"
    elif option == "num_items_tensor":
        options.update(num_items_in_batch=torch.tensor(11.0))
    elif option == "num_items_number":
        options.update(num_items_in_batch=7.5, mask=mask)
    elif option == "weight_none":
        options.update(sample_weight=weight, mask=mask)
        reduction = "none"
    elif option == "no_target":
        options.pop("target")
    check(case, inp, backend, reduction, chunk, **options)


@with_backends(slow=("triton",))
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("trainable", ["hidden", "head"])
@pytest.mark.parametrize("case_name", ["kd", "ltkd"])
def test_frozen_head_or_frozen_hidden(case_name, trainable, reduction, backend):
    """A frozen head (LoRA; reduction="none" then needs no recompute) or frozen hidden states."""
    leading, H, Ht, V = (8,), 5, 4, 61
    case = make_case(case_name, V)
    inp = make_inputs(leading, H, Ht, V)
    upstream = _upstream(reduction, leading)
    got = fused(case, inp, upstream, backend, 3, hidden_grad=trainable == "hidden",
                weight_grad=trainable == "head", reduction=reduction, target=inp.target)
    want = reference64(case, inp, upstream, reduction=reduction, target=inp.target)
    assert_fused_loss_close(got[0], want)
    if trainable == "hidden":
        assert got[2] is None and got[3] is None
        assert_grad_close(got[1], want[1])
    else:
        assert got[1] is None
        assert_grad_close(got[2], want[2])
        assert_grad_close(got[3], want[3])


@with_backends(slow=("triton",))
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
@pytest.mark.parametrize("case_name", ["kd", "ltkd", "dkd", "bkd_ce"])
def test_every_row_ignored(case_name, reduction, backend):
    """Every target is ignore_index (a batch of padding): loss 0, gradients 0, no NaN."""
    leading, H, Ht, V = (5,), 3, 2, 29
    case = make_case(case_name, V)
    inp = make_inputs(leading, H, Ht, V)
    target = torch.full(leading, -100)
    got = fused(case, inp, _upstream(reduction, leading), backend, 2, reduction=reduction,
                target=target)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    for g in got[1:]:
        assert torch.equal(g, torch.zeros_like(g))


@with_backends()
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_empty_batch(reduction, backend):
    """No rows at all: a zero loss of the right shape and zero gradients."""
    x = torch.randn(0, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    out = L.fused_linear_ltkd_loss(x, w, torch.randn(0, 3), torch.randn(9, 3), torch.arange(9) % 3,
                                   reduction=reduction, backend=backend)
    assert out.shape == ((0,) if reduction == "none" else ())
    out.sum().backward()
    assert float(out.detach().sum()) == 0.0 and x.grad.shape == (0, 4)
    assert torch.equal(w.grad, torch.zeros_like(w))


@with_backends(slow=("triton",))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case_name", ["kd", "ltkd", "dkd", "bkd_ce"])
def test_half_inputs_match_float64(case_name, dtype, backend):
    """bf16/fp16 hidden states and heads: float32 logits (not rounded to the input dtype),
    gradients in the input dtype, against float64 on the same rounded inputs."""
    leading, H, Ht, V = (6,), 16, 8, 1031
    case = make_case(case_name, V)
    inp = make_inputs(leading, H, Ht, V, dtype=dtype)
    for reduction in ("batchmean", "none"):
        check(case, inp, backend, reduction, 4, dtype=dtype, target=inp.target)


def test_logits_are_not_rounded_to_bfloat16():
    """Logits of O(100) with differences of O(0.01): bf16 logits (3 significant digits) would
    be off by ~0.5, which a KD loss sees; float32 logits agree with float64 to 1e-5."""
    torch.manual_seed(0)
    N, H, V = 4, 32, 300
    x = torch.randn(N, H).bfloat16()
    w = torch.randn(V, H).bfloat16()
    b = torch.full((V,), 100.0).bfloat16()
    xt = torch.randn(N, H).bfloat16()
    out = L.fused_linear_kd_loss(x, w, xt, w, student_bias=b, teacher_bias=b, chunk_size=2,
                                 backend="auto")
    want = lk.kd_loss(F.linear(x.double(), w.double(), b.double()),
                      F.linear(xt.double(), w.double(), b.double()), backend="torch")
    assert_loss_close(out, want)


# ---------------------------------------------------------------------------------------------
# The teacher is constant; the chunk never changes the result; validation; modules.

@with_backends(("torch-ops", "cpu"))
def test_teacher_gets_no_gradient_and_chunks_agree(backend):
    leading, H, Ht, V = (13,), 4, 3, 71
    inp = make_inputs(leading, H, Ht, V)
    g = random_groups(V, 4)
    xt = inp.xt.clone().requires_grad_()
    wt = inp.wt.clone().requires_grad_()
    results = []
    for chunk in (1, 3, 13, 100, None):
        x = inp.x.clone().requires_grad_()
        out = L.fused_linear_ltkd_loss(x, inp.w, xt, wt, g, 4, target=inp.target,
                                       chunk_size=chunk, backend=backend)
        out.backward()
        results.append((out.detach(), x.grad))
    assert xt.grad is None and wt.grad is None
    for out, grad in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-5, atol=1e-7)


@with_backends(("torch-ops", "cpu"))
def test_backward_scales_the_forward_gradients_once(backend):
    """sum/batchmean: the forward's gradients are scaled in place by the upstream scalar (no
    second V x H buffer); a second backward through the graph raises, never doubles."""
    inp = make_inputs((6,), 4, 3, 19)
    x = inp.x.clone().requires_grad_()
    w = inp.w.clone().requires_grad_()
    out = L.fused_linear_kd_loss(x, w, inp.xt, inp.wt, chunk_size=4, backend=backend)
    (out * 3.0).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        out.backward()


def test_auto_chunk_rule():
    assert L.auto_chunk_size(2048, 32000, 1024, 4) == 256
    assert L.auto_chunk_size(8192, 32000, 1024, 4) == 256      # does not grow with N
    assert L.auto_chunk_size(8192, 128256, 4096, 2) == 512
    assert L.auto_chunk_size(100, 32000, 1024, 4) == 100       # at most N
    assert L.auto_chunk_size(10 ** 5, 8192, 256, 4) == 512     # >= 2^30 multiply-adds per call
    assert L.auto_chunk_size(10 ** 5, 1031, 1, 4) == 4096      # at most 4096
    assert L.auto_chunk_size(10 ** 5, 2 ** 20, 2, 2) == 64     # (C, V) fp32 <= 256 MiB
    assert L.auto_chunk_size(10 ** 6, 1000, 10 ** 6, 4) == 4096  # at most 4096
    assert L.auto_chunk_size(10 ** 6, 2 ** 24, 8192, 2) == 16  # 2^26 / V caps it, then 16


def test_argument_errors():
    x, w, xt, wt = torch.randn(3, 4), torch.randn(10, 4), torch.randn(3, 5), torch.randn(10, 5)
    with pytest.raises(ValueError, match="student_weight must have shape"):
        L.fused_linear_kd_loss(x, torch.randn(10, 3), xt, wt)
    with pytest.raises(ValueError, match="teacher_weight must have the student's V"):
        L.fused_linear_kd_loss(x, w, xt, torch.randn(11, 5))
    with pytest.raises(ValueError, match="leading shape"):
        L.fused_linear_kd_loss(x, w, torch.randn(4, 5), wt)
    with pytest.raises(ValueError, match="student_bias must have shape"):
        L.fused_linear_kd_loss(x, w, xt, wt, student_bias=torch.randn(9))
    with pytest.raises(ValueError, match="teacher_weight"):
        L.fused_linear_kd_loss(x, w, xt, None)
    topk = lk.topk_teacher(torch.randn(3, 10), 4)
    with pytest.raises(ValueError, match="TopKTeacher"):
        L.fused_linear_kd_loss(x, w, topk, wt)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            L.fused_linear_kd_loss(x, w, xt, wt, chunk_size=bad)
    with pytest.raises(ValueError, match="reduction"):
        L.fused_linear_kd_loss(x, w, xt, wt, reduction="mean")
    with pytest.raises(ValueError, match="needs target"):
        L.fused_linear_dkd_loss(x, w, xt, wt, None)
    with pytest.raises(TypeError, match="float64"):
        L.fused_linear_kd_loss(x.double(), w.double(), xt, wt, backend="cpu")
    # float64 with "auto" runs the reference
    out = L.fused_linear_kd_loss(x.double(), w.double(), xt.double(), wt.double())
    assert out.dtype == torch.float64


@with_backends(("torch-ops", "cpu"))
def test_mixed_dtypes_are_promoted(backend):
    """bf16 activations with an fp32 master weight (autocast training): computed in fp32, the
    hidden states' gradient in bf16, the weight's in fp32."""
    leading, H, Ht, V = (6,), 8, 4, 77
    inp = make_inputs(leading, H, Ht, V)
    x = inp.x.bfloat16().requires_grad_()
    w = inp.w.clone().requires_grad_()
    out = L.fused_linear_kd_loss(x, w, inp.xt.bfloat16(), inp.wt, chunk_size=4, backend=backend)
    out.backward()
    x32 = x.detach().float().requires_grad_()
    w32 = inp.w.clone().requires_grad_()
    want = L.fused_linear_kd_loss(x32, w32, inp.xt.bfloat16().float(), inp.wt, chunk_size=4,
                                  backend=backend)
    want.backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x32.grad.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(w.grad, w32.grad, rtol=0, atol=0)


@with_backends(("torch", "torch-ops", "cpu"))
def test_modules_match_functional(backend):
    leading, H, Ht, V = (2, 3), 4, 5, 40
    inp = make_inputs(leading, H, Ht, V)
    groups = random_groups(V, 3)
    weight = torch.rand(V) + 0.1
    pairs = [
        (FusedLinearKDLoss(temperature=2.0, chunk_size=4, backend=backend),
         lambda *a, **k: L.fused_linear_kd_loss(*a, temperature=2.0, chunk_size=4,
                                                backend=backend, **k)),
        (FusedLinearLTKDLoss(groups, 3, temperature=3.0, backend=backend),
         lambda *a, **k: L.fused_linear_ltkd_loss(*a, groups, 3, temperature=3.0,
                                                  backend=backend, **k)),
        (FusedLinearDKDLoss(backend=backend),
         lambda *a, **k: L.fused_linear_dkd_loss(*a, k.pop("target"), backend=backend, **k)),
        (FusedLinearBKDLoss(weight, ce_weight=1.0, backend=backend),
         lambda *a, **k: L.fused_linear_bkd_loss(*a, weight, ce_weight=1.0, backend=backend,
                                                 **k)),
    ]
    for module, call in pairs:
        got = module(inp.x, inp.w, inp.xt, inp.wt, inp.target, student_bias=inp.b,
                     teacher_bias=inp.bt)
        want = call(inp.x, inp.w, inp.xt, inp.wt, target=inp.target, student_bias=inp.b,
                    teacher_bias=inp.bt)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert "backend" in repr(module)
    with pytest.raises(TypeError):
        FusedLinearKDLoss(2.0)  # options are keyword-only
    with pytest.raises(ValueError, match="chunk_size"):
        FusedLinearKDLoss(chunk_size=0)


# ---------------------------------------------------------------------------------------------
# torch.compile: one graph, no recompilation when N changes.

@with_backends(("torch-ops", "cpu", "triton"), slow=("triton",))
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_torch_compile_fullgraph_dynamic_rows(reduction, backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    H, Ht, V = 6, 4, 45
    groups = random_groups(V, 3)
    head = torch.nn.Linear(H, V)
    teacher = torch.nn.Linear(Ht, V).requires_grad_(False)

    def step(x, xt, y):
        rows = L.fused_linear_ltkd_loss(x, head.weight, xt, teacher.weight, groups, 3,
                                        student_bias=head.bias, teacher_bias=teacher.bias,
                                        target=y, temperature=2.0, chunk_size=4,
                                        reduction=reduction, backend=backend)
        return rows.sum() if reduction == "none" else rows

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    first = None
    for rows in (7, 11, 13):  # (not H = 6: duck sizing would tie N to H on the first call)
        x, xt, y = torch.randn(rows, H), torch.randn(rows, Ht), torch.randint(V, (rows,))
        y[0] = -100
        loss = step(x, xt, y)
        grads = torch.autograd.grad(loss, (head.weight, head.bias))
        compiled_loss = compiled(x, xt, y)
        first = counter.frame_count if first is None else first
        compiled_grads = torch.autograd.grad(compiled_loss, (head.weight, head.bias))
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-6, atol=1e-7)
        for got, want in zip(compiled_grads, grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # (The first call may count two compiler calls: dynamo restarts once to specialise the
    # float options under dynamic=True.) A new N compiles nothing.
    assert counter.frame_count == first, "a new N recompiled"


# ---------------------------------------------------------------------------------------------
# Memory: the peak above the inputs and the gradients is O(chunk x V), not O(N x V).

def _peak_bytes(fn):
    """The most tensor bytes held at once during ``fn()`` (allocations net of frees, as the
    profiler records them on the CPU), above what was held before."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.slow  # large inputs: half a minute each
@with_backends(("torch-ops", "cpu"))
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("loss_name", ["kd", "ltkd"])
def test_peak_memory_is_chunk_times_vocab(loss_name, reduction, backend):
    """Forward and backward of the loss and the matmuls: the peak above the gradients does
    not grow with N beyond per-row vectors (``(N, 5G + 4)`` states, ``(N,)`` losses), and with
    the C++ kernels it is about three ``(C, V)`` float32 buffers. (The plain-torch fallback
    operators hold more ``(C, V)`` temporaries, still independent of N.)"""
    H, Ht, V, chunk = 8, 8, 1031, 32
    groups = random_groups(V, 3)
    w = torch.randn(V, H, requires_grad=True)
    wt = torch.randn(V, Ht)
    per_row = 256  # bytes: the row's states and extras (5G + 4 floats), loss, upstream (x2)
    chunk_logits = chunk * V * 4
    peaks = {}
    for rows in (256, 1024):
        x = torch.randn(rows, H, requires_grad=True)
        xt = torch.randn(rows, Ht)
        extra = dict(groups=groups, num_groups=3) if loss_name == "ltkd" else {}

        def step():
            out = FUSED[loss_name](x, w, xt, wt, chunk_size=chunk, reduction=reduction,
                                   backend=backend, **extra)
            out.sum().backward()

        step()  # warm-up (first-use allocations)
        x.grad = w.grad = None
        peaks[rows] = _peak_bytes(step) - (rows * H + V * H) * 4  # above the gradients
        x.grad = w.grad = None
        if backend == "cpu":
            assert peaks[rows] <= 4 * chunk_logits + rows * per_row, (rows, peaks[rows])
            assert peaks[rows] < rows * V * 4 / 2  # less than half of one N x V logits
    assert peaks[1024] - peaks[256] <= (1024 - 256) * per_row, peaks


# ---------------------------------------------------------------------------------------------
# Data parallel: two processes equal one process on the concatenated batch.

def _dp_batch():
    g = torch.Generator().manual_seed(0)
    H, Ht, V = 5, 4, 33
    x = torch.randn(10, H, generator=g)
    xt = torch.randn(10, Ht, generator=g)
    w = torch.randn(V, H, generator=g)
    wt = torch.randn(V, Ht, generator=g) * 2
    target = torch.randint(V, (10,), generator=g)
    target[3] = -100
    return x, xt, w, wt, target, torch.arange(V) % 4


def _dp_worker(rank, world, init_file, backend, out_dir):
    import torch.distributed as dist

    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, xt, w, wt, target, groups = _dp_batch()
    rows = slice(rank * 5, rank * 5 + 5)
    results = []
    for reduction, global_batchmean in (("sum", False), ("batchmean", True)):
        local_x = x[rows].clone().requires_grad_()
        local_w = w.clone().requires_grad_()
        out = L.fused_linear_ltkd_loss(local_x, local_w, xt[rows], wt, groups, 4,
                                       target=target[rows], reduction=reduction, chunk_size=2,
                                       process_group=dist.group.WORLD,
                                       global_batchmean=global_batchmean, backend=backend)
        out.backward()
        results.append((out.detach(), local_x.grad, local_w.grad))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    # Every rank done before any tears its connections down (gloo may abort a peer
    # whose connection closes under it).
    dist.barrier()
    dist.destroy_process_group()


@with_backends(("cpu", "triton"), slow=("triton",))
def test_process_group_equals_concatenated_batch(tmp_path, backend):
    import torch.multiprocessing as mp

    mp.spawn(_dp_worker, args=(2, str(tmp_path / "init"), backend, str(tmp_path)), nprocs=2,
             join=True)
    shards = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, xt, w, wt, target, groups = _dp_batch()
    for i, reduction in enumerate(("sum", "batchmean")):
        full_x = x.clone().requires_grad_()
        full_w = w.clone().requires_grad_()
        total = L.fused_linear_ltkd_loss(full_x, full_w, xt, wt, groups, 4, target=target,
                                         reduction=reduction, backend=backend)
        total.backward()
        torch.testing.assert_close(shards[0][i][0] + shards[1][i][0], total, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.cat([shards[0][i][1], shards[1][i][1]]), full_x.grad,
                                   rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(shards[0][i][2] + shards[1][i][2], full_w.grad,
                                   rtol=1e-5, atol=1e-6)
