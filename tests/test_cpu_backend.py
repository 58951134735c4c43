"""The C++ CPU backend (``backend="cpu"``) against the reference and float64.

Every loss and ``group_logsumexp``, loss and gradient, in float32/float16/bfloat16 on odd shapes,
with the STYLE.md tolerance: ``|cpu - ref64| <= |torch_same_dtype - ref64| + rtol |ref64|``
(norm-wise), where ``torch_same_dtype`` is ``backend="torch"`` on the same inputs and ``ref64``
the reference evaluated in float64 on the same (rounded) inputs. Then the options (masks,
sample weights, reductions, -inf logits), layouts (leading shapes, strided rows), determinism
(reruns, thread counts), the vectorised exp, SRW, direct-operator errors, and the fallback when
the extension cannot be built.

The backend tests skip (with the loader's reason) when the extension is not available here;
its first build takes about a minute and is cached (see ``ltkd_kernels/cpu``).
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import ltkd_kernels as lk

REASON = lk.unavailable_reason("cpu")
requires_cpu = pytest.mark.skipif(REASON is not None,
                                  reason=f"C++ CPU backend unavailable: {REASON}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading shape, V): V = 1 and 2, one row, V past one 1024-class block with a 7-class tail,
# a leading shape of two dimensions, V past four blocks.
SHAPES = [((1,), 1), ((3,), 2), ((1,), 1031), ((4,), 1031), ((2, 3), 257), ((2,), 4100)]
# Norm-wise relative tolerance on top of the reference's own error.
RTOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _groups(vocab, num_groups, empty=()):
    allowed = torch.tensor([k for k in range(num_groups) if k not in empty])
    return allowed[torch.randint(len(allowed), (vocab,))]


def _logits(shape, dtype=torch.float32):
    student = torch.randn(shape) * 2.0
    teacher = torch.randn(shape) * 3.0 + 0.5
    return student.to(dtype), teacher.to(dtype)


def _loss_calls(vocab, leading):
    """name -> call(student, teacher, backend, **options); float64 inputs give the float64
    reference through backend="torch"."""
    rows = math.prod(leading)
    g3 = _groups(vocab, 3)
    g8 = _groups(vocab, 8)
    g9 = _groups(vocab, 9)
    g100 = _groups(vocab, 100, empty=(0, 41, 99))
    target = torch.randint(vocab, leading)
    weight = torch.rand(vocab) + 0.05
    if vocab > 2:
        weight[1] = 0.0
    zeros = torch.zeros(vocab, dtype=torch.long)
    return {
        "kd": lambda s, t, backend, **kw: lk.kd_loss(s, t, temperature=2.0, backend=backend, **kw),
        "ltkd_G3": lambda s, t, backend, **kw: lk.ltkd_loss(
            s, t, g3, 3, alpha=0.7, beta=1.3, temperature=4.0, backend=backend, **kw),
        "ltkd_teacher_within": lambda s, t, backend, **kw: lk.ltkd_loss(
            s, t, g3, 3, rebalance=False, within_weight="teacher", temperature=1.5,
            backend=backend, **kw),
        "ltkd_G1": lambda s, t, backend, **kw: lk.ltkd_loss(s, t, zeros, 1, temperature=3.0,
                                                           backend=backend, **kw),
        # the largest vectorised group count, and the first on the scalar path
        "ltkd_G8": lambda s, t, backend, **kw: lk.ltkd_loss(s, t, g8, 8, backend=backend, **kw),
        "ltkd_G9": lambda s, t, backend, **kw: lk.ltkd_loss(s, t, g9, 9, within_weight="teacher",
                                                           backend=backend, **kw),
        "ltkd_G100_empty": lambda s, t, backend, **kw: lk.ltkd_loss(s, t, g100, 100,
                                                                   backend=backend, **kw),
        "dkd": lambda s, t, backend, **kw: lk.dkd_loss(s, t, target, backend=backend, **kw),
        "bkd": lambda s, t, backend, **kw: lk.bkd_loss(s, t, weight, backend=backend, **kw),
        "bkd_ce": lambda s, t, backend, **kw: lk.bkd_loss(s, t, weight, target=target,
                                                          temperature=3.0, backend=backend, **kw),
    }


LOSS_NAMES = list(_loss_calls(8, (2,)))


def assert_as_accurate(kernel, reference, exact, rtol):
    """``|kernel - exact| <= |reference - exact| + rtol |exact|`` norm-wise over the finite
    entries; the non-finite entries equal exactly."""
    kernel, reference, exact = kernel.double(), reference.double(), exact.double()
    assert kernel.shape == exact.shape
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(kernel), finite)
    assert torch.equal(kernel[~finite], exact[~finite])
    err_kernel = torch.linalg.vector_norm(kernel[finite] - exact[finite]).item()
    err_reference = torch.linalg.vector_norm(reference[finite] - exact[finite]).item()
    scale = torch.linalg.vector_norm(exact[finite]).item()
    assert err_kernel <= err_reference + rtol * scale + 1e-12, (
        f"cpu error {err_kernel:.3g}, reference error {err_reference:.3g}, norm {scale:.3g}")


def _run(call, student, teacher, backend, upstream=None, **options):
    """Output and student gradient of one call (backward of ``sum(out * upstream)``)."""
    s = student.clone().requires_grad_()
    out = call(s, teacher, backend, **options)
    weights = torch.ones_like(out) if upstream is None else upstream
    (out * weights.to(out.dtype)).sum().backward()
    return out.detach(), s.grad


def _compare(call, student, teacher, dtype, **options):
    """cpu vs torch-same-dtype vs float64 reference, output and gradient."""
    probe = call(student, teacher, "torch", **options)
    upstream = torch.rand(probe.shape) + 0.5
    out, grad = _run(call, student, teacher, "cpu", upstream, **options)
    out_ref, grad_ref = _run(call, student, teacher, "torch", upstream, **options)
    out64, grad64 = _run(call, student.double(), teacher.double(), "torch", upstream.double(),
                         **options)
    assert out.dtype == torch.float32 and grad.dtype == student.dtype
    assert grad.shape == student.shape and grad.is_contiguous()
    assert_as_accurate(out, out_ref, out64, RTOL[dtype])
    assert_as_accurate(grad, grad_ref, grad64, GRAD_RTOL[dtype])
    return out, grad


# The G = 100 reference loops over its groups: keep it to V <= 1031 (the scalar path's long
# rows are covered by G = 9).
LOSS_SHAPES = [(name, leading, vocab) for name in LOSS_NAMES for leading, vocab in SHAPES
               if not (name == "ltkd_G100_empty" and vocab > 1031)]


@requires_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,leading,vocab", LOSS_SHAPES)
def test_losses_match_reference_and_float64(name, leading, vocab, dtype):
    call = _loss_calls(vocab, leading)[name]
    student, teacher = _logits((*leading, vocab), dtype)
    out, _ = _compare(call, student, teacher, dtype, reduction="none")
    assert out.shape == leading


@requires_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("leading,vocab,num_groups",
                         [((1,), 1, 1), ((3,), 2, 3), ((2, 3), 1031, 7), ((2,), 4100, 100)])
def test_group_logsumexp(leading, vocab, num_groups, dtype):
    groups = _groups(vocab, num_groups, empty=(num_groups - 1,) if num_groups > 3 else ())

    def call(x, _unused, backend):
        return lk.group_logsumexp(x, groups, num_groups, temperature=1.7, backend=backend)

    logits = (torch.randn(*leading, vocab) * 4).to(dtype)
    out, _ = _compare(call, logits, logits, dtype)
    assert out.shape == (*leading, num_groups)


@requires_cpu
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
@pytest.mark.parametrize("name", ["kd", "ltkd_G3", "ltkd_G100_empty", "dkd", "bkd_ce"])
def test_mask_sample_weight_reductions(name, reduction):
    leading, vocab = (2, 4), 300
    call = _loss_calls(vocab, leading)[name]
    student, teacher = _logits((*leading, vocab))
    mask = torch.rand(leading) < 0.7
    mask[0, 0], mask[1, 1] = False, True
    student[~mask] = float("nan")  # a masked row's content never matters
    weight = torch.rand(leading) + 0.1
    out, grad = _compare(call, student, teacher, torch.float32, mask=mask, sample_weight=weight,
                         reduction=reduction)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    if reduction == "none":
        assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))


@requires_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_neg_inf_logits_at_the_same_classes(name, dtype):
    leading, vocab = (3,), 1031
    call = _loss_calls(vocab, leading)[name]
    student, teacher = _logits((*leading, vocab), dtype)
    masked = torch.rand(vocab) < 0.3
    masked[:5] = True  # the first chunk too
    student[:, masked] = float("-inf")
    teacher[:, masked] = float("-inf")
    out, grad = _compare(call, student, teacher, dtype, reduction="none")
    if bool(torch.isfinite(out).all()):
        assert torch.equal(grad[:, masked], torch.zeros_like(grad[:, masked]))


@requires_cpu
def test_student_neg_inf_where_teacher_has_mass():
    student, teacher = _logits((2, 100))
    student[0, 3] = float("-inf")
    groups = _groups(100, 3)
    rows = lk.ltkd_loss(student, teacher, groups, 3, reduction="none", backend="cpu")
    assert rows[0] == float("inf") and torch.isfinite(rows[1])
    assert lk.kd_loss(student, teacher, reduction="none", backend="cpu")[0] == float("inf")


@requires_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_leading_shape_and_strided_rows(dtype):
    """Rows that are a slice of wider rows are read in place; the result is bit-identical to
    the contiguous copy's, and matches the reference."""
    vocab = 1031
    wide_student, wide_teacher = _logits((2, 3, vocab + 45), dtype)
    student, teacher = wide_student[..., 9:9 + vocab], wide_teacher[..., :vocab]
    assert not student.is_contiguous() and student.stride(-1) == 1
    for name in ("ltkd_G3", "dkd", "bkd_ce"):
        call = _loss_calls(vocab, (2, 3))[name]
        out, grad = _compare(call, student, teacher, dtype, reduction="none")
        out_contiguous, grad_contiguous = _run(call, student.contiguous(), teacher.contiguous(),
                                               "cpu", torch.ones(2, 3), reduction="none")
        _, grad_ones = _run(call, student, teacher, "cpu", torch.ones(2, 3), reduction="none")
        assert torch.equal(out, out_contiguous)
        assert torch.equal(grad_ones, grad_contiguous)


@requires_cpu
def test_inputs_not_modified():
    student, teacher = _logits((5, 1031), torch.bfloat16)
    student[0, 2] = float("-inf")
    teacher[0, 2] = float("-inf")
    groups = _groups(1031, 3)
    weight = torch.rand(1031)
    target = torch.randint(1031, (5,))
    mask = torch.tensor([True, False, True, True, True])
    originals = [x.clone() for x in (student, teacher, groups, weight, target, mask)]
    s = student.clone().requires_grad_()
    lk.ltkd_loss(s, teacher, groups, 3, mask=mask, backend="cpu").backward()
    lk.bkd_loss(s, teacher, weight, target=target, backend="cpu").backward()
    lk.dkd_loss(s, teacher, target, backend="cpu").backward()
    assert torch.equal(s.detach(), student)
    for before, after in zip(originals, (student, teacher, groups, weight, target, mask)):
        assert torch.equal(before, after)


def _results(name, student, teacher, vocab, leading):
    call = _loss_calls(vocab, leading)[name]
    return _run(call, student, teacher, "cpu", reduction="none")


@requires_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["ltkd_G3", "ltkd_G9", "dkd", "bkd_ce"])
def test_bit_identical_reruns_and_thread_counts(name, dtype):
    """Rows are split into many tasks here (V = 1031: 63 rows a task); the reduction order
    within a row is fixed, so 1 and 2 threads give the same bits, run after run."""
    leading, vocab = (300,), 1031
    torch.manual_seed(0)
    student, teacher = _logits((*leading, vocab), dtype)
    threads = torch.get_num_threads()
    try:
        torch.manual_seed(1)
        first = _results(name, student, teacher, vocab, leading)
        torch.manual_seed(1)
        again = _results(name, student, teacher, vocab, leading)
        torch.set_num_threads(1)
        torch.manual_seed(1)
        single = _results(name, student, teacher, vocab, leading)
        torch.set_num_threads(max(2, threads))
        torch.manual_seed(1)
        multi = _results(name, student, teacher, vocab, leading)
    finally:
        torch.set_num_threads(threads)
    for other in (again, single, multi):
        assert torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])


@requires_cpu
def test_vectorised_exp_accuracy():
    """The kernels' exp: under 2 ulp (2.4e-7 relative) over the normal range; -inf -> 0,
    NaN -> NaN, overflow -> inf, exp(0) = 1 exactly. Run on whichever SIMD path was built
    (LTKD_KERNELS_CPU_CAPABILITY=AVX2 or DEFAULT builds the portable one)."""
    from ltkd_kernels import cpu

    vector_exp = cpu.extension().vector_exp
    x = torch.cat([torch.linspace(-87.0, 88.0, 200_003), torch.randn(10_001)])
    got = vector_exp(x).double()
    exact = torch.exp(x.double())
    relative = ((got - exact).abs() / exact).max().item()
    assert relative < 2.4e-7, relative
    special = torch.tensor([float("-inf"), float("nan"), float("inf"), 0.0, -200.0, 100.0, -0.0])
    got = vector_exp(special)
    assert got[0] == 0.0 and torch.isnan(got[1]) and got[2] == float("inf")
    assert got[3] == 1.0 and got[4] == 0.0 and got[5] == float("inf") and got[6] == 1.0
    # Below ln(FLT_MIN) the result is a denormal (AVX-512 path) or flushed to 0 (portable
    # path): within the smallest normal float either way.
    tiny = vector_exp(torch.tensor([-88.0, -95.0, -100.0])).double()
    exact_tiny = torch.exp(torch.tensor([-88.0, -95.0, -100.0], dtype=torch.float64))
    assert bool(((tiny - exact_tiny).abs() <= torch.finfo(torch.float32).tiny).all())


@requires_cpu
def test_direct_operator_misuse_raises_instead_of_crashing():
    ops = lk.backends.grouped_kl_ops("cpu")
    student, teacher = _logits((3, 20))
    groups = _groups(20, 3)
    with pytest.raises(RuntimeError, match="groups"):
        ops.stats(student, teacher, groups + 5, None, None, None, None, 3, 1.0)
    with pytest.raises(RuntimeError, match="ce_target"):
        ops.stats(student, teacher, None, None, None, torch.tensor([0, 1, 20]), None, 1, 1.0)
    with pytest.raises(RuntimeError, match="float32"):
        ops.stats(student.double(), teacher.double(), None, None, None, None, None, 1, 1.0)
    with pytest.raises(RuntimeError, match="unit stride"):
        ops.stats(student.t(), teacher.t(), None, None, None, None, None, 1, 1.0)
    with pytest.raises(RuntimeError, match="statistics"):
        ops.grad(student, teacher, None, None, None, None, None, 1, 1.0, torch.zeros(3, 2),
                 torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(0),
                 torch.zeros(0))


# --------------------------------------------------------------------------------------------
# SRW
# --------------------------------------------------------------------------------------------

def _srw_float64(features, mask, tau, eps):
    """SPEC's SRW per image in float64, straight from the equations (the P x P mean included)."""
    f = features.double()
    weights = torch.zeros(f.shape[:2], dtype=torch.float64)
    for b in range(f.shape[0]):
        used = torch.ones(f.shape[1], dtype=torch.bool) if mask is None else mask[b]
        if not bool(used.any()):
            continue
        fh = f[b][used] / f[b][used].norm(dim=-1, keepdim=True).clamp_min(eps)
        avesim = (fh @ fh.T).mean(-1)
        weights[b, used] = torch.softmax(-avesim / tau, -1)
    return weights


@requires_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("images,patches,dim,masked",
                         [(1, 1, 1, False), (2, 5, 37, False), (3, 70, 64, True),
                          (1, 300, 16, True)])
def test_srw_weights_impl_matches_float64(images, patches, dim, masked, dtype):
    from ltkd_kernels import cpu

    features = (torch.randn(images, patches, dim) + 0.3).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(images, patches) < 0.8
        mask[0, 0] = False
        if images > 2:
            mask[2] = False  # an image with every patch masked: all zeros
        features[~mask] = float("nan")  # masked patches are never read
    weights = cpu.srw_weights_impl(features, mask, 0.5, 1e-8)
    assert weights.dtype == torch.float32 and weights.shape == (images, patches)
    expected = _srw_float64(features, mask, 0.5, 1e-8)
    # fp16/bf16: the features are rounded before both; the float32 computation keeps ~1e-6.
    torch.testing.assert_close(weights.double(), expected, rtol=2e-5, atol=0.0)
    if mask is not None:
        assert torch.equal(weights[~mask], torch.zeros_like(weights[~mask]))


@requires_cpu
def test_srw_strided_patches_zero_features_and_threads():
    from ltkd_kernels import cpu

    wide = torch.randn(4, 500, 40)
    features = wide[:, :, 3:35]  # unit stride along D, patch stride 40
    features[1, 7] = 0.0  # a zero feature: fh = 0
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = cpu.srw_weights_impl(features, None, 1.3, 1e-8)
        torch.set_num_threads(max(2, threads))
        multi = cpu.srw_weights_impl(features, None, 1.3, 1e-8)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, multi)
    assert torch.equal(single, cpu.srw_weights_impl(features.contiguous(), None, 1.3, 1e-8))
    torch.testing.assert_close(single.double(), _srw_float64(features, None, 1.3, 1e-8),
                               rtol=2e-5, atol=0.0)
    assert hasattr(torch.ops.ltkd_kernels, "srw_weights_cpu")


# --------------------------------------------------------------------------------------------
# The loader: a backend that cannot be built is left out, with its reason
# --------------------------------------------------------------------------------------------

_PROBE = """
import torch, ltkd_kernels as lk
reason = lk.unavailable_reason("cpu")
assert reason is not None, "cpu should be unavailable"
assert "cpu" not in lk.available_backends()
loss = lk.kd_loss(torch.randn(2, 5), torch.randn(2, 5))  # "auto" falls back to the reference
try:
    lk.kd_loss(torch.randn(2, 5), torch.randn(2, 5), backend="cpu")
    raise SystemExit("backend='cpu' did not raise")
except RuntimeError as error:
    assert reason in str(error)
print(reason)
"""


@pytest.mark.parametrize("environment,expected", [
    ({"LTKD_KERNELS_DISABLE_CPU": "1"}, "LTKD_KERNELS_DISABLE_CPU"),
    ({"CXX": "/nonexistent/c++"}, "no C++ compiler"),
    ({"CXX": "/bin/false"}, "build_error.log"),  # a compiler that fails: the build error
])
def test_unavailable_backend_is_left_out_with_its_reason(tmp_path, environment, expected):
    from torch.utils.cpp_extension import is_ninja_available

    if environment.get("CXX") == "/bin/false" and not is_ninja_available():
        expected = "ninja"  # the loader stops before building
    env = {key: value for key, value in os.environ.items()
           if key not in ("LTKD_KERNELS_DISABLE_CPU", "CXX")}
    env.update(LTKD_KERNELS_CACHE_DIR=str(tmp_path), **environment)
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout
