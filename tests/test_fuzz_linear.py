"""Differential fuzzing of the fused-linear losses (ltkd_kernels.linear) against float64.

Hypothesis draws the loss (KD, LTKD with uniform or teacher within-weights, rebalanced or not,
DKD, BKD with and without the cross-entropy, top-k teachers of every rest rule), the leading
shape (1-D or 2-D), hidden sizes of student and teacher, V, the chunk size (automatic, 1, or
not dividing the rows), bias or none, temperatures 0.1-10, the reduction, masks, sample
weights, ignored targets, G up to 40 in the group layouts of tests/test_fuzz.py, and the
upstream gradient. The oracle is tests/test_linear.py's ``reference64``: the logits
``hidden @ W.T + b`` and the logits loss of the torch reference in float64, with the loss's
sensitivity to the float32 rounding of the computed logits in its tolerance; the gradients
of the student's hidden states, weight and bias norm-wise to 1e-5 (float32 inputs), plus twice
the error of the same composition in float32 (``F.linear`` then the reference loss): a
gradient that is a small difference of large terms (a bias summed over rows that cancel) is
ill-conditioned for any float32 computation. The losses' own arithmetic is the logits losses'
(float32 per-group states): tests/test_fuzz.py's absolute terms apply to the logits, 1e-6
``T^2 (1 + max|z| / T)`` to a loss element and 1e-7 ``T sqrt(N) (1 + max|z| / T)`` to the
logits' gradient, carried to the hidden states, weight and bias through the matmuls' norms.

Profiles as tests/test_fuzz.py's (``ci``, the default, a fixed seed; ``long``).
"""
import math

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ltkd_kernels as lk
from conftest import with_backends
from test_fuzz import GROUP_LAYOUTS, _group_ids
from test_linear import (LOGITS, Case, Inputs, _topk, _upstream, assert_fused_loss_close, fused,
                         reference64)

LOSSES = ("kd", "ltkd", "ltkd_teacher", "ltkd_plain", "dkd", "bkd", "bkd_ce", "kd_ce",
          "topk_renormalize", "topk_restrict", "topk_bucket", "topk_ltkd")


@st.composite
def problems(draw, max_rows=9, max_vocab=120):
    """A random fused-linear loss call: ``(case, inputs, reduction, chunk_size, options)``."""
    loss = draw(st.sampled_from(LOSSES))
    leading = draw(st.sampled_from([(draw(st.integers(1, max_rows)),),
                                    (draw(st.integers(1, 3)), draw(st.integers(1, 3)))]))
    rows = math.prod(leading)
    H = draw(st.integers(1, 12))
    Ht = draw(st.integers(1, 12))
    vocab = draw(st.integers(2 if loss.startswith(("dkd", "topk")) else 1, max_vocab))
    num_groups = draw(st.one_of(st.integers(1, 6), st.integers(7, 40)))
    layout = draw(st.sampled_from(GROUP_LAYOUTS))
    temperature = 1.0 if loss == "topk_bucket" else math.exp(draw(st.floats(math.log(0.1),
                                                                             math.log(10.0))))
    scale = draw(st.sampled_from([0.3, 1.0, 3.0, 10.0]))  # the logits' size
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*leading, H, generator=g)
    w = torch.randn(vocab, H, generator=g) * (scale / math.sqrt(H))
    xt = torch.randn(*leading, Ht, generator=g)
    wt = torch.randn(vocab, Ht, generator=g) * (scale * 1.3 / math.sqrt(Ht))
    b = torch.randn(vocab, generator=g) * 0.5 if bias else None
    bt = torch.randn(vocab, generator=g) * 0.5 + 0.3 if bias else None
    target = torch.randint(vocab, leading, generator=g)
    if draw(st.booleans()):
        target[torch.rand(leading, generator=g) < 0.25] = -100
    inputs = Inputs(x, w, b, xt, wt, bt, target)
    groups = _group_ids(layout, vocab, num_groups, g)
    weight = torch.rand(vocab, generator=g) + 0.01
    T = temperature
    k = draw(st.integers(1, vocab))
    case = {
        "kd": lambda: Case("kd", dict(temperature=T)),
        "kd_ce": lambda: Case("kd", dict(temperature=T, ce_weight=0.5)),
        "ltkd": lambda: Case("ltkd", dict(groups=groups, num_groups=num_groups, temperature=T,
                                          alpha=0.7, beta=1.3)),
        "ltkd_teacher": lambda: Case("ltkd", dict(groups=groups, num_groups=num_groups,
                                                  temperature=T, within_weight="teacher")),
        "ltkd_plain": lambda: Case("ltkd", dict(groups=groups, num_groups=num_groups,
                                                temperature=T, rebalance=False)),
        "dkd": lambda: Case("dkd", dict(temperature=T)),
        "bkd": lambda: Case("bkd", dict(class_weight=weight, temperature=T)),
        "bkd_ce": lambda: Case("bkd", dict(class_weight=weight, temperature=T, ce_weight=1.0)),
        "topk_renormalize": lambda: Case("kd", dict(temperature=T), topk=dict(k=k,
                                                                              temperature=T)),
        "topk_restrict": lambda: Case("kd", dict(temperature=T),
                                      topk=dict(k=k, rest="restrict", temperature=T)),
        "topk_bucket": lambda: Case("kd", dict(), topk=dict(k=k, rest="bucket")),
        "topk_ltkd": lambda: Case("ltkd", dict(groups=groups, num_groups=num_groups,
                                               temperature=T),
                                  topk=dict(k=k, groups=groups, num_groups=num_groups,
                                            temperature=T)),
    }[loss]()
    options = {}
    if loss in ("dkd", "bkd_ce", "kd_ce") or draw(st.booleans()):
        options["target"] = target
    if draw(st.booleans()):
        options["mask"] = torch.rand(leading, generator=g) > 0.3
    if draw(st.booleans()):
        options["sample_weight"] = torch.rand(leading, generator=g) + 0.05
    reduction = draw(st.sampled_from(["batchmean", "sum", "none"]))
    chunk_size = draw(st.sampled_from([None, 1, 2, 3, max(1, rows - 1), rows + 5]))
    return case, inputs, reduction, chunk_size, options


_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                       HealthCheck.data_too_large,
                                                       HealthCheck.function_scoped_fixture])
EXAMPLES = settings.default.max_examples


def composed32(case: Case, inp: Inputs, upstream, **options):
    """The loss and gradients of the plain float32 composition: ``F.linear``, then the logits
    loss of the torch reference (the yardstick of float32 rounding)."""
    x = inp.x.float().clone().requires_grad_()
    w = inp.w.float().clone().requires_grad_()
    b = None if inp.b is None else inp.b.float().clone().requires_grad_()
    student = F.linear(x, w, b)
    if case.topk:
        teacher = _topk(case, inp)
    else:
        teacher = F.linear(inp.xt.float(), inp.wt.float(), None if inp.bt is None else inp.bt.float())
    out = LOGITS[case.loss](student, teacher, **case.options, backend="torch", **options)
    (out * upstream).sum().backward()
    return out.detach(), x.grad, w.grad, None if b is None else b.grad


def _logit_floors(case: Case, inp: Inputs, upstream, reduction):
    """The logits fuzz's absolute terms (tests/test_fuzz.py): ``(loss element, gradient of
    the logits)``."""
    T = case.options.get("temperature", 1.0)
    rows = inp.x.reshape(-1, inp.x.shape[-1]).shape[0]
    z = F.linear(inp.x.double(), inp.w.double(), None if inp.b is None else inp.b.double())
    zt = F.linear(inp.xt.double(), inp.wt.double(), None if inp.bt is None else inp.bt.double())
    logit_scale = max(float(z.abs().max()), float(zt.abs().max())) / T
    per_row = float(upstream.abs().max()) / (rows if reduction == "batchmean" else 1)
    return (1e-6 * T ** 2 * (1 + logit_scale),
            1e-7 * T * math.sqrt(rows) * per_row * (1 + logit_scale))


def check(case, inp, backend, reduction, chunk_size, **options):
    upstream = _upstream(reduction, inp.x.shape[:-1])
    got = fused(case, inp, upstream, backend, chunk_size, reduction=reduction, **options)
    want = reference64(case, inp, upstream, reduction=reduction, **options)
    plain = composed32(case, inp, upstream, reduction=reduction, **options)
    loss_floor, logit_grad_floor = _logit_floors(case, inp, upstream, reduction)
    slack = (plain[0].double() - want.loss).abs().nan_to_num(nan=0.0, posinf=0.0)
    # (the loss's bound is 1e-5 |l| + 1e-6 (1 + condition): this adds twice the float32
    # composition's error and the logits losses' absolute term)
    assert_fused_loss_close(got[0], want._replace(
        condition=want.condition + 1e6 * (2 * slack + loss_floor)))
    carried = {"hidden": float(inp.w.double().norm()), "weight": float(inp.x.double().norm()),
               "bias": 1.0}
    for name, g, g64, g32 in zip(("hidden", "weight", "bias"), got[1:], want[1:], plain[1:]):
        if g64 is None:
            assert g is None, name
            continue
        assert g is not None and g.dtype == torch.float32, name
        assert torch.equal(torch.isfinite(g), torch.isfinite(g64)), name
        ok = torch.isfinite(g64)
        error = (g.double() - g64)[ok].norm()
        error32 = (g32.double() - g64)[ok].norm().nan_to_num(nan=0.0, posinf=0.0)
        bound = 2 * error32 + 1e-5 * g64[ok].norm() + logit_grad_floor * carried[name] + 1e-12
        assert error <= bound, f"{name}: gradient error {error:.3g} > {bound:.3g} " \
            f"(float32 composition {error32:.3g}, norm {g64[ok].norm():.3g})"


@with_backends(("torch-ops", "cpu"))
@settings(max_examples=max(EXAMPLES // 3, 40), **_SETTINGS)
@given(problem=problems())
def test_fused_linear_fuzz_against_float64(problem, backend):
    case, inputs, reduction, chunk_size, options = problem
    check(case, inputs, backend, reduction, chunk_size, **options)


@with_backends(("triton",))
@settings(max_examples=max(EXAMPLES // 20, 15), **_SETTINGS)
@given(problem=problems(max_rows=5, max_vocab=70))
def test_fused_linear_fuzz_triton_against_float64(problem, backend):
    case, inputs, reduction, chunk_size, options = problem
    check(case, inputs, backend, reduction, chunk_size, **options)


def test_topk_teacher_rules_are_drawn():
    """The strategy reaches every loss (a guard against a silently narrowed fuzz)."""
    seen = set()

    @settings(max_examples=300, database=None, derandomize=True, **_SETTINGS)
    @given(problem=problems())
    def collect(problem):
        case = problem[0]
        seen.add((case.loss, None if case.topk is None else case.topk.get("rest", "renormalize")))

    collect()
    assert {("kd", None), ("ltkd", None), ("dkd", None), ("bkd", None), ("kd", "renormalize"),
            ("kd", "restrict"), ("kd", "bucket"), ("ltkd", "renormalize")} <= seen, seen
