"""Differential fuzzing: every loss on every backend against the reference in float64.

Hypothesis draws random shapes, groups (up to 40, empty ones included, in five layouts: drawn
at random, ranges ascending or descending, ``c % G``, runs), temperatures 0.05-20, logit
scales up to 1e3, confident teachers (gaps up to 200 below the head), masks, sample weights,
targets with ignore_index rows, top-k teachers, dtypes and non-contiguous layouts; Triton runs
also draw the V-slices per row (forced splits) and the states walk (forced walks); and
``group_logsumexp`` with its gradient, the same way. The oracle
is :mod:`ltkd_kernels.reference` in float64; the tolerance is the dtype's own: a backend may
be off from float64 by twice what the float32 reference is, plus 1e-5 relative (the rule
``|kernel - ref64| <= |torch_same_dtype - ref64| + tol``).

Profiles (tests/conftest.py): ``ci`` (the default: a fixed seed, a few hundred examples in
all, well under three minutes) and ``long`` (``pytest tests/test_fuzz.py
--hypothesis-profile=long``: 10^4 examples per backend, 10^3 for the Triton interpreter).
"""
import contextlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ltkd_kernels as lk
from conftest import with_backends

LOSSES = ("kd", "ltkd", "ltkd_teacher", "ltkd_plain", "dkd", "bkd", "bkd_ce",
          "topk_renormalize", "topk_restrict", "topk_bucket", "topk_ltkd_logmass")


@st.composite
def problems(draw, max_rows=6, max_vocab=300):
    """A random loss call: its name, inputs and options."""
    loss = draw(st.sampled_from(LOSSES))
    rows = draw(st.integers(1, max_rows))
    vocab = draw(st.integers(2 if loss.startswith(("dkd", "topk")) else 1, max_vocab))
    # Up to 8 groups mostly; up to 40 at times (the CLASS walk's chunks of 16, the window walk)
    num_groups = draw(st.one_of(st.integers(1, 8), st.integers(9, 40)))
    layout = draw(st.sampled_from(GROUP_LAYOUTS))
    temperature = 1.0 if loss == "topk_bucket" else math.exp(draw(st.floats(math.log(0.05), math.log(20.0))))
    scale = 10 ** draw(st.floats(-3, 3))
    gap = draw(st.sampled_from([0.0, 0.0, 30.0, 90.0, 200.0]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=g) * scale
    teacher = torch.randn(rows, vocab, generator=g) * scale
    groups = _group_ids(layout, vocab, num_groups, g)
    if gap:  # a confident teacher: some groups far below the head
        far = groups >= max(1, num_groups // 2)
        teacher = teacher - gap * temperature * far.float()
    if dtype == torch.float16:  # keep fp16 inputs finite
        student, teacher = student.clamp(-6e4, 6e4), teacher.clamp(-6e4, 6e4)
    options = {}
    if draw(st.booleans()):
        options["mask"] = torch.rand(rows, generator=g) > 0.3
    if draw(st.booleans()):
        options["sample_weight"] = torch.rand(rows, generator=g) + 0.05
    options["reduction"] = draw(st.sampled_from(["batchmean", "sum", "none"]))
    target = torch.randint(vocab, (rows,), generator=g)
    if draw(st.booleans()):
        target[torch.rand(rows, generator=g) < 0.25] = -100
    strided = draw(st.booleans())
    return dict(loss=loss, student=student.to(dtype), teacher=teacher.to(dtype), groups=groups,
                num_groups=num_groups, temperature=temperature, target=target,
                weight=torch.rand(vocab, generator=g) + 0.01, options=options, strided=strided,
                k=draw(st.integers(1, vocab)), layout=layout,
                splits=draw(st.sampled_from([None, None, 2, 3, 7])),
                walk=draw(st.sampled_from(WALKS[layout])))


# How the classes fall into groups: each layout takes another walk of the Triton states kernel
# (ltkd_kernels/triton/grouped_kl.py, ``_class_order``): drawn at random (the CLASS, ordered or
# window walk), each group one range of classes ascending or descending (the ranges walk),
# class by class ``c % G`` (the window walk), runs of random length (the ordered walk).
GROUP_LAYOUTS = ("random", "random", "ranges", "ranges_desc", "interleaved", "runs")
# The walks a Triton run may be forced to (None: the launcher's rule); "ranges" only where
# every group is one range (elsewhere it gives NaN rows by design).
WALKS = {layout: (None, None, "class", "ordered", "windows") for layout in GROUP_LAYOUTS}
WALKS.update(ranges=(None, None, "class", "ordered", "windows", "ranges"),
             ranges_desc=(None, None, "class", "ordered", "windows", "ranges"))


def _group_ids(layout, vocab, num_groups, g):
    """``(V,)`` int64 group ids in ``[0, num_groups)`` laid out as ``layout`` (some groups
    may be empty in every layout)."""
    if layout == "random":
        return torch.randint(num_groups, (vocab,), generator=g)
    if layout in ("ranges", "ranges_desc"):
        ids = torch.randint(num_groups, (vocab,), generator=g).sort().values
        return ids.flip(0) if layout == "ranges_desc" else ids
    if layout == "interleaved":
        return torch.arange(vocab) % num_groups
    lengths = torch.randint(1, 24, (vocab,), generator=g)  # runs of 1..23 classes
    run_ids = torch.randint(num_groups, (vocab,), generator=g)
    return run_ids.repeat_interleave(lengths)[:vocab]


def _call(problem, student, teacher, backend):
    p = problem
    T = p["temperature"]
    o = dict(p["options"], backend=backend)
    name = p["loss"]
    if name == "kd":
        return lk.kd_loss(student, teacher, temperature=T, **o)
    if name == "ltkd":
        return lk.ltkd_loss(student, teacher, p["groups"], p["num_groups"], temperature=T, **o)
    if name == "ltkd_teacher":
        return lk.ltkd_loss(student, teacher, p["groups"], p["num_groups"], temperature=T,
                            within_weight="teacher", alpha=0.5, beta=2.0, **o)
    if name == "ltkd_plain":
        return lk.ltkd_loss(student, teacher, p["groups"], p["num_groups"], temperature=T,
                            rebalance=False, **o)
    if name == "dkd":
        target = torch.where(p["target"] < 0, torch.zeros_like(p["target"]), p["target"])
        return lk.dkd_loss(student, teacher, target, temperature=T, **o)
    if name == "bkd":
        return lk.bkd_loss(student, teacher, p["weight"], temperature=T, **o)
    if name == "bkd_ce":
        return lk.bkd_loss(student, teacher, p["weight"], temperature=T, target=p["target"],
                           ce_weight=1.0, **o)
    top = p["topk"]
    logprobs = top.logprobs.to(teacher.dtype) if teacher.dtype == torch.float64 else top.logprobs
    top = lk.TopKTeacher(top.indices, logprobs, top.rest, top.group_logmass)
    if name == "topk_ltkd_logmass":
        return lk.ltkd_loss(student, top, p["groups"], p["num_groups"], temperature=T, **o)
    return lk.kd_loss(student, top, temperature=T, **o)


def _topk(p):
    """The problem's top-k teacher, its log-probs in the teacher's dtype: every run (the
    float64 oracle included) sees the same rounded entries."""
    rest = {"topk_renormalize": "renormalize", "topk_restrict": "restrict",
            "topk_bucket": "bucket", "topk_ltkd_logmass": "renormalize"}[p["loss"]]
    logmass = p["loss"] == "topk_ltkd_logmass"
    full = lk.topk_teacher(p["teacher"].float(), p["k"], groups=p["groups"] if logmass else None,
                           num_groups=p["num_groups"], temperature=p["temperature"], rest=rest)
    return lk.TopKTeacher(full.indices, full.logprobs.to(p["teacher"].dtype), rest,
                          full.group_logmass)


def _forced(problem, backend):
    """On Triton, the problem's drawn V-slices per row and states walk, forced; elsewhere
    nothing."""
    forced = contextlib.ExitStack()
    if backend == "triton":
        from ltkd_kernels.triton import grouped_kl as triton_ops
        forced.enter_context(triton_ops.forced_splits(problem["splits"]))
        forced.enter_context(triton_ops.forced_walk(problem["walk"]))
    return forced


def _run(problem, backend, dtype=None):
    student = problem["student"] if dtype is None else problem["student"].to(dtype)
    teacher = problem["teacher"] if dtype is None else problem["teacher"].to(dtype)
    if problem["strided"] and dtype is None:
        student = torch.cat([student, student], -1)[:, : student.shape[-1]]  # row stride 2V
    s = student.detach().clone().requires_grad_() if not problem["strided"] else student.detach().requires_grad_()
    with _forced(problem, backend):
        out = _call(problem, s, teacher, backend)
        out.sum().backward() if out.dim() else out.backward()
    return out.detach().double(), s.grad.double()


def _check(problem, backend):
    p = dict(problem)
    if p["loss"].startswith("topk"):
        p["topk"] = _topk(p)
    # The oracle sees the kernel's (rounded) inputs in float64.
    loss64, grad64 = _run(p, "torch", torch.float64)
    loss32, grad32 = _run(p, "torch", torch.float32)
    loss, grad = _run(p, backend)
    nan64 = torch.isnan(loss64)
    assert torch.equal(torch.isnan(loss), nan64), (loss, loss64)
    finite = torch.isfinite(loss64)
    assert torch.equal(torch.isinf(loss), torch.isinf(loss64)), (loss, loss64)
    scale = p["temperature"] ** 2
    # Scaling the logits (z / T in float32) rounds each by ~6e-8 of its size: on logits far
    # from 0 in units of T that is a perturbation the float64 oracle does not see.
    logit_scale = max(float(p["student"].float().abs().nan_to_num(0, 0, 0).max()),
                      float(p["teacher"].float().abs().nan_to_num(0, 0, 0).max())) / p["temperature"]
    scale = scale * (1.0 + logit_scale)
    err = (loss - loss64)[finite].abs()
    # Where the float32 reference itself fails (NaN, inf), it gives no slack.
    err32 = (loss32 - loss64)[finite].abs().nan_to_num(nan=0.0, posinf=0.0)
    bound = 2 * err32 + 1e-5 * loss64[finite].abs() + 1e-6 * scale
    if p["student"].dtype != torch.float32:
        bound = bound + 1e-5 * scale * (1 + loss64[finite].abs())
    assert bool((err <= bound).all()), f"loss {loss} vs float64 {loss64} (fp32 reference {loss32})"
    if bool(torch.isfinite(loss64).all()) and bool(torch.isfinite(grad64).all()):
        rel = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[p["student"].dtype]
        norm = grad64.norm()
        # The gradient's terms are probabilities (each rounded at ~6e-8 in float32) times T and
        # the upstream per row: a floor for gradients that are tiny differences of such terms.
        rows = p["student"].shape[0]
        upstream = 1.0 / rows if p["options"]["reduction"] == "batchmean" else 1.0
        floor = 1e-7 * p["temperature"] * math.sqrt(rows) * upstream * (1.0 + logit_scale)
        if p["student"].dtype == torch.float16:  # the gradient is stored in float16: its
            floor += 3e-8 * math.sqrt(grad.numel())  # subnormals are spaced 6e-8 apart
        slack = (grad32 - grad64).norm().nan_to_num(nan=0.0, posinf=0.0)
        assert (grad - grad64).norm() <= 2 * slack + rel * norm + floor, \
            f"gradient error {(grad - grad64).norm():.3g} (fp32 reference {(grad32 - grad64).norm():.3g}, norm {norm:.3g})"


_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                    HealthCheck.function_scoped_fixture])
# The active profile's example count (ci: 150, long: 10^4); the interpreter gets a tenth.
EXAMPLES = settings.default.max_examples


@with_backends(("torch-ops", "cpu"))
@settings(max_examples=EXAMPLES, **_SETTINGS)
@given(problem=problems())
def test_fuzz_against_float64(problem, backend):
    _check(problem, backend)


@with_backends(("triton",))
@settings(max_examples=max(EXAMPLES // 10, 40), **_SETTINGS)
@given(problem=problems(max_rows=4, max_vocab=80))
def test_fuzz_triton_against_float64(problem, backend):
    _check(problem, backend)


@settings(max_examples=max(EXAMPLES // 2, 50), **_SETTINGS)
@given(problem=problems())
def test_fuzz_reference_float32_against_float64(problem):
    """The reference itself in float32 (the yardstick of the others) stays sane: finite where
    float64 is finite, NaN where it is NaN."""
    problem = dict(problem)
    if problem["loss"].startswith("topk"):
        problem["topk"] = _topk(problem)
    loss64, _ = _run(problem, "torch", torch.float64)
    loss32, _ = _run(problem, "torch", torch.float32)
    assert torch.equal(torch.isnan(loss32), torch.isnan(loss64))
    finite = torch.isfinite(loss64)
    assert bool(torch.isfinite(loss32[finite]).all())


@st.composite
def logsumexp_problems(draw, max_rows=5, max_vocab=400):
    """A random ``group_logsumexp`` call: logits (with ``-inf`` classes at times), groups in
    the layouts above, temperature, the upstream gradient, and (Triton) V-slices and walk."""
    rows = draw(st.integers(1, max_rows))
    vocab = draw(st.integers(1, max_vocab))
    num_groups = draw(st.one_of(st.integers(1, 8), st.integers(9, 40)))
    layout = draw(st.sampled_from(GROUP_LAYOUTS))
    temperature = math.exp(draw(st.floats(math.log(0.05), math.log(20.0))))
    scale = 10 ** draw(st.floats(-3, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    logits = torch.randn(rows, vocab, generator=g) * scale
    if draw(st.booleans()):
        logits[torch.rand(rows, vocab, generator=g) < 0.1] = float("-inf")
    if dtype == torch.float16:
        logits = logits.clamp(-6e4, 6e4)
    return dict(logits=logits.to(dtype), groups=_group_ids(layout, vocab, num_groups, g),
                num_groups=num_groups, temperature=temperature,
                upstream=torch.randn(rows, num_groups, generator=g),
                splits=draw(st.sampled_from([None, None, 2, 3, 7])),
                walk=draw(st.sampled_from(WALKS[layout])))


def _logsumexp_run(p, backend, dtype=None):
    logits = (p["logits"] if dtype is None else p["logits"].to(dtype)).clone().requires_grad_()
    with _forced(p, backend):
        lse = lk.group_logsumexp(logits, p["groups"], p["num_groups"],
                                 temperature=p["temperature"], backend=backend)
        upstream = torch.where(torch.isfinite(lse), p["upstream"].to(lse.dtype), 0.0)
        (lse.nan_to_num(0.0, 0.0, 0.0) * upstream).sum().backward()
    return lse.detach().double(), logits.grad.double()


def _check_logsumexp(p, backend):
    lse64, grad64 = _logsumexp_run(p, "torch", torch.float64)
    lse32, grad32 = _logsumexp_run(p, "torch", torch.float32)
    lse, grad = _logsumexp_run(p, backend)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse64)), (lse, lse64)
    finite = torch.isfinite(lse64)
    logit_scale = float(p["logits"].float().abs().nan_to_num(0, 0, 0).max()) / p["temperature"]
    err32 = (lse32 - lse64)[finite].abs()
    bound = 2 * err32 + 1e-5 * lse64[finite].abs() + 1e-6 * (1 + logit_scale)
    assert bool(((lse - lse64)[finite].abs() <= bound).all()), (lse, lse64)
    rel = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[p["logits"].dtype]
    error, error32 = (grad - grad64).norm(), (grad32 - grad64).norm()
    floor = 1e-12
    if p["logits"].dtype == torch.float16:  # the gradient is stored in float16: its
        floor += 3e-8 * math.sqrt(grad.numel())  # subnormals are spaced 6e-8 apart
    assert error <= 2 * error32 + rel * grad64.norm() + floor, \
        f"gradient error {error:.3g} (fp32 reference {error32:.3g}, norm {grad64.norm():.3g})"


@with_backends(("torch-ops", "cpu"))
@settings(max_examples=EXAMPLES, **_SETTINGS)
@given(problem=logsumexp_problems())
def test_fuzz_group_logsumexp_against_float64(problem, backend):
    """``group_logsumexp`` and its gradient (a fuzz of it found regressions 9 and 10)."""
    _check_logsumexp(problem, backend)


@with_backends(("triton",))
@settings(max_examples=max(EXAMPLES // 10, 20), **_SETTINGS)
@given(problem=logsumexp_problems(max_rows=3, max_vocab=120))
def test_fuzz_group_logsumexp_triton_against_float64(problem, backend):
    _check_logsumexp(problem, backend)
