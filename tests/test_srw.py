"""SRW weights on every backend against a float64 O(N^2) evaluation of the paper's equations.

Backends: "torch" (the reference), "triton" (interpreted on the CPU), "cpu" (C++, when built).
fp32 must agree with the paper's float64 equations to 1e-5 relative, per weight; fp16/bf16
features are compared with float64 on the same (rounded) features, and since every backend
computes in float32 they are held to the same 1e-5.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are first imported

import pytest  # noqa: E402
import torch  # noqa: E402

import ltkd_kernels as lk  # noqa: E402
from conftest import kernel_backends  # noqa: E402

BACKENDS = [pytest.param("torch")] + kernel_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading shape, D): N = 1, D = 1, odd sizes; (B, P) with one patch, odd P and D; D past
# one feature tile of the Triton kernels (1024), so that pass 1 walks D twice.
SHAPES = [((1,), 1), ((1,), 7), ((2,), 3), ((13,), 37), ((70,), 45),
          ((1, 1), 5), ((3, 37), 45), ((4, 9), 130), ((2, 5), 1031)]
REL = 1e-5


def paper_weights(features, *, tau=1.0, mask=None, eps=1e-8):
    """The paper's equations in float64, per batch (image): the n x n cosine matrix of the valid
    samples, the mean of each of its rows (avesim), softmax(-avesim / tau). O(n^2), on purpose."""
    f = features.detach().double()
    batched = f if f.dim() == 3 else f.unsqueeze(0)
    if mask is None:
        valid = torch.ones(batched.shape[:-1], dtype=torch.bool)
    else:
        valid = mask if mask.dim() == 2 else mask.unsqueeze(0)
    out = torch.zeros(batched.shape[:-1], dtype=torch.float64)
    for b in range(batched.shape[0]):
        rows = batched[b][valid[b]]
        if rows.shape[0] == 0:
            continue
        normalised = rows / torch.clamp_min(rows.norm(dim=-1, keepdim=True), eps)
        cosine = normalised @ normalised.T               # (n, n)
        avesim = cosine.mean(dim=1)
        out[b, valid[b]] = torch.softmax(-avesim / tau, dim=0)
    return out.reshape(features.shape[:-1])


def assert_relative(weights, expected, rel=REL):
    """Every weight within ``rel`` of the float64 value, relative to it (exact where it is 0)."""
    assert weights.shape == expected.shape
    err = (weights.double() - expected).abs()
    bound = rel * expected.abs()
    worst = (err / expected.abs().clamp_min(1e-300)).max().item() if err.numel() else 0.0
    assert bool((err <= bound).all()), f"max relative error {worst:.3g} > {rel}"


def _features(leading, dim, dtype, offset=0.3):
    # An offset makes the features share a direction, as post-ReLU features do: the cosines
    # are then far from 0 and the weights far from uniform.
    return (torch.randn(*leading, dim) + offset).to(dtype)


def _random_mask(leading, keep=0.7):
    mask = torch.rand(leading) < keep
    mask.view(-1, leading[-1])[:, 0] = True  # at least one valid sample per image
    return mask


# --------------------------------------------------------------------------------------------
# Against the paper's equations
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("leading,dim", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_paper_equations(backend, dtype, leading, dim, masked):
    features = _features(leading, dim, dtype)
    mask = _random_mask(leading) if masked else None
    if masked:
        # Padded patches may hold anything: they must not be read.
        features[~mask] = float("nan")
    tau = 0.5
    weights = lk.srw_weights(features, tau=tau, mask=mask, backend=backend)
    assert weights.dtype == torch.float32
    assert_relative(weights, paper_weights(features, tau=tau, mask=mask))


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("leading,dim", SHAPES)
def test_reference_float64_is_the_paper(leading, dim, masked):
    features = _features(leading, dim, torch.float64)
    mask = _random_mask(leading) if masked else None
    weights = lk.reference.srw_weights(features, tau=0.7, mask=mask)
    assert weights.dtype == torch.float64
    assert_relative(weights, paper_weights(features, tau=0.7, mask=mask), rel=1e-12)


@pytest.mark.parametrize("leading,dim", [((13,), 37), ((3, 37), 45), ((2, 5), 1031)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", kernel_backends())
def test_kernel_vs_reference(backend, dtype, leading, dim):
    """``|kernel - ref64| <= |torch_same_dtype - ref64| + tol``."""
    features = _features(leading, dim, dtype)
    mask = _random_mask(leading)
    ref64 = lk.reference.srw_weights(features.double(), mask=mask, tau=0.3)
    torch_same = lk.srw_weights(features, mask=mask, tau=0.3, backend="torch").double()
    kernel = lk.srw_weights(features, mask=mask, tau=0.3, backend=backend).double()
    tol = 2e-6 * ref64.abs()
    assert bool(((kernel - ref64).abs() <= (torch_same - ref64).abs() + tol).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_over_many_chunks(backend):
    """A batch of 2500 rows: several chunks of the Triton kernels' two-stage reductions."""
    features = _features((2500,), 8, torch.float32)
    weights = lk.srw_weights(features, tau=0.2, backend=backend)
    assert_relative(weights, paper_weights(features, tau=0.2))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_of_a_million_rows(backend):
    """N = 10^6, D = 256 (the benchmark's size) against the float64 reference, which equals the
    paper's equations (test_reference_float64_is_the_paper): long fp32 sums must stay accurate."""
    if backend == "triton":
        pytest.skip("the Triton interpreter takes minutes at this size (the kernels' two-stage "
                    "sums are checked at 2500 rows and with small blocks)")
    features = _features((1_000_000,), 256, torch.float32)
    weights = lk.srw_weights(features, backend=backend)
    assert_relative(weights, lk.reference.srw_weights(features.double()))


@pytest.mark.parametrize("leading,dim,masked", [((1, 203), 45, False), ((3, 37), 45, True),
                                                ((2, 70), 9, True)])
def test_triton_small_blocks(leading, dim, masked):
    """Tiny blocks: many chunks, several tiles a chunk, the walk over D in pass 1, and the
    combines looping over more chunks than one block holds."""
    if lk.unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip("Triton unavailable")
    from ltkd_kernels.triton.srw_launchers import srw_weights_impl

    features = _features(leading, dim, torch.float32)
    mask = _random_mask(leading) if masked else None
    weights = srw_weights_impl(features, mask, 0.5, 1e-8, block_p=4, block_d=16,
                               tiles_per_chunk=2, block_c=2)
    assert_relative(weights, paper_weights(features, tau=0.5, mask=mask))


# --------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_image_gets_zero_weights(backend):
    """Documented choice: an image (or batch) with every patch masked gets all-zero weights;
    the other images are unaffected."""
    features = _features((3, 11), 6, torch.float32)
    mask = _random_mask((3, 11))
    mask[1] = False
    weights = lk.srw_weights(features, mask=mask, backend=backend)
    assert torch.equal(weights[1], torch.zeros(11))
    assert_relative(weights, paper_weights(features, mask=mask))
    assert torch.allclose(weights.sum(-1), torch.tensor([1.0, 0.0, 1.0]))
    flat = lk.srw_weights(features[0], mask=torch.zeros(11, dtype=torch.bool), backend=backend)
    assert torch.equal(flat, torch.zeros(11))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_feature_has_cosine_zero(backend):
    """A zero feature has the cosine 0 with everything (not NaN): its avesim is 0, so with
    tau = 1, ``log(w_j / w_zero) = -avesim_j`` for every other sample ``j``."""
    features = _features((9,), 20, torch.float32)
    features[4] = 0.0
    weights = lk.srw_weights(features, backend=backend)
    assert torch.isfinite(weights).all()
    assert_relative(weights, paper_weights(features))
    f = features.double()
    normalised = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    avesim = (normalised @ normalised.T).mean(dim=1)
    assert avesim[4].item() == 0.0
    log_ratio = torch.log(weights.double() / weights[4].double())
    assert torch.allclose(log_ratio, -avesim, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["zeros", "constant", "scaled"])
def test_degenerate_features_give_uniform_weights(backend, kind):
    """All-zero features (every cosine 0), one feature repeated (every cosine 1) and positive
    multiples of one feature (every cosine 1): every sample alike, uniform weights."""
    n, dim = 7, 33
    if kind == "zeros":
        features = torch.zeros(2, n, dim)
    elif kind == "constant":
        features = torch.full((2, n, dim), 0.25)
    else:
        features = torch.randn(2, 1, dim) * torch.rand(2, n, 1).add(0.5)
    weights = lk.srw_weights(features, tau=0.1, backend=backend)
    assert_relative(weights, torch.full((2, n), 1.0 / n, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_sample(backend):
    assert lk.srw_weights(torch.randn(1, 5), backend=backend).tolist() == [1.0]
    assert lk.srw_weights(torch.zeros(1, 5), backend=backend).tolist() == [1.0]
    assert lk.srw_weights(torch.randn(4, 1, 3), backend=backend).tolist() == [[1.0]] * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    assert lk.srw_weights(torch.randn(0, 5), backend=backend).shape == (0,)
    assert lk.srw_weights(torch.randn(2, 0, 5), backend=backend).shape == (2, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_feature_gives_nan(backend):
    features = _features((2, 6), 5, torch.float32)
    features[0, 2, 1] = float("nan")
    weights = lk.srw_weights(features, backend=backend)
    assert torch.isnan(weights[0]).all()
    assert_relative(weights[1], paper_weights(features[1]))


# --------------------------------------------------------------------------------------------
# Guarantees: sums, no gradient, inputs untouched, strides, determinism, compile
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_sum_to_one_without_gradient(backend):
    features = _features((4, 19), 10, torch.float32).requires_grad_()
    mask = _random_mask((4, 19))
    before = features.detach().clone()
    mask_before = mask.clone()
    weights = lk.srw_weights(features, mask=mask, backend=backend)
    assert not weights.requires_grad and weights.grad_fn is None
    assert torch.allclose(weights.sum(-1), torch.ones(4), atol=1e-6)
    assert (weights[~mask] == 0).all() and (weights[mask] > 0).all()
    assert torch.equal(features.detach(), before) and torch.equal(mask, mask_before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base = _features((6, 23), 40, torch.float32)
    features = base.transpose(0, 1).contiguous().transpose(0, 1)   # (6, 23, 40), odd strides
    strided_d = torch.randn(6, 23, 80)[..., ::2]                      # stride 2 along D
    mask = _random_mask((23, 6)).T                                   # non-contiguous mask
    for f in (features, strided_d):
        expected = lk.srw_weights(f.contiguous(), mask=mask.contiguous(), backend=backend)
        assert torch.equal(lk.srw_weights(f, mask=mask, backend=backend), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    features = _features((2500,), 8, torch.float32)
    first = lk.srw_weights(features, backend=backend)
    assert torch.equal(first, lk.srw_weights(features, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile(backend):
    """Custom operators: one graph, no break (fullgraph) for "torch" and "triton". The C++
    backend's operator is created on its first call, so for "cpu" only the result is checked."""
    features = _features((3, 10), 12, torch.float32)
    mask = _random_mask((3, 10))
    torch._dynamo.reset()
    compiled = torch.compile(lambda f, m: lk.srw_weights(f, mask=m, tau=0.5, backend=backend),
                             backend="aot_eager", fullgraph=backend != "cpu")
    assert torch.equal(compiled(features, mask),
                       lk.srw_weights(features, mask=mask, tau=0.5, backend=backend))


def test_auto_backend_and_float64():
    features = _features((5, 7), 9, torch.float32)
    expected_backend = "cpu" if lk.unavailable_reason("cpu") is None else "torch"
    assert torch.equal(lk.srw_weights(features),
                       lk.srw_weights(features, backend=expected_backend))
    f64 = features.double()
    assert lk.srw_weights(f64).dtype == torch.float64   # "auto" keeps float64 exact
    if lk.unavailable_reason("triton", torch.device("cpu")) is None:
        with pytest.raises(TypeError, match="float64"):
            lk.srw_weights(f64, backend="triton")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,error,match", [
    (lambda: lk.srw_weights([[1.0, 2.0]]), TypeError, "features"),
    (lambda: lk.srw_weights(torch.ones(3, 4, dtype=torch.int64)), TypeError, "features"),
    (lambda: lk.srw_weights(torch.ones(3)), ValueError, "features"),
    (lambda: lk.srw_weights(torch.ones(2, 3, 4, 5)), ValueError, "features"),
    (lambda: lk.srw_weights(torch.ones(3, 0)), ValueError, "features"),
    (lambda: lk.srw_weights(torch.ones(3, 4), tau=0.0), ValueError, "tau"),
    (lambda: lk.srw_weights(torch.ones(3, 4), tau=-1.0), ValueError, "tau"),
    (lambda: lk.srw_weights(torch.ones(3, 4), tau="1"), TypeError, "tau"),
    (lambda: lk.srw_weights(torch.ones(3, 4), eps=0.0), ValueError, "eps"),
    (lambda: lk.srw_weights(torch.ones(3, 4), mask=torch.ones(4, dtype=torch.bool)),
     ValueError, "mask"),
    (lambda: lk.srw_weights(torch.ones(2, 3, 4), mask=torch.ones(2, 3)), TypeError, "mask"),
    (lambda: lk.srw_weights(torch.ones(2, 3, 4), mask=torch.ones(6, dtype=torch.bool)),
     ValueError, "mask"),
    (lambda: lk.srw_weights(torch.ones(3, 4), mask=[True] * 3), TypeError, "mask"),
    (lambda: lk.srw_weights(torch.ones(3, 4), backend="gpu"), ValueError, "backend"),
    (lambda: lk.SRWeighting(tau=0), ValueError, "tau"),
    (lambda: lk.SRWeighting(backend="fast"), ValueError, "backend"),
])
def test_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_unavailable_backend_raises_with_reason():
    reason = lk.unavailable_reason("cpu")
    if reason is None:
        pytest.skip("the C++ CPU backend is available here")
    with pytest.raises(RuntimeError, match="cpu"):
        lk.srw_weights(torch.ones(3, 4), backend="cpu")


# --------------------------------------------------------------------------------------------
# The module and the intended use: L = sum_i w_i l_i with every loss
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_functional(backend):
    srw = lk.SRWeighting(tau=0.4, backend=backend)
    assert "tau=0.4" in repr(srw)
    features = _features((3, 8), 16, torch.float32)
    mask = _random_mask((3, 8))
    assert torch.equal(srw(features, mask),
                       lk.srw_weights(features, tau=0.4, mask=mask, backend=backend))
    assert torch.equal(srw(features[0]), lk.srw_weights(features[0], tau=0.4, backend=backend))


def _loss_calls(vocab, rows):
    groups = torch.randint(3, (vocab,))
    target = torch.randint(vocab, (rows,))
    class_weight = lk.class_balanced_weights(torch.randint(1, 500, (vocab,)))
    return {
        "kd": lambda s, t, **kw: lk.kd_loss(s, t, temperature=2.0, **kw),
        "ltkd": lambda s, t, **kw: lk.ltkd_loss(s, t, groups, 3, temperature=2.0, **kw),
        "dkd": lambda s, t, **kw: lk.dkd_loss(s, t, target, **kw),
        "bkd": lambda s, t, **kw: lk.bkd_loss(s, t, class_weight, target=target, **kw),
    }


@pytest.mark.parametrize("loss", ["kd", "ltkd", "dkd", "bkd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_intended_use_with_every_loss(backend, loss):
    """``loss_fn(..., sample_weight=w, reduction="sum") == sum_i w_i l_i``, the student gets a
    gradient and the weights none."""
    rows, vocab = 6, 37
    student = torch.randn(rows, vocab, requires_grad=True)
    teacher = torch.randn(rows, vocab)
    teacher_features = _features((rows,), 24, torch.float32)
    call = _loss_calls(vocab, rows)[loss]
    srw = lk.SRWeighting(tau=0.5, backend=backend)
    weights = srw(teacher_features)
    weighted = call(student, teacher, sample_weight=weights, reduction="sum", backend=backend)
    row_losses = call(student, teacher, reduction="none", backend=backend)
    expected = (weights.double() * row_losses.detach().double()).sum()
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    weighted.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert not weights.requires_grad
