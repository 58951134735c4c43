"""GPU-only cases: the compiled Triton kernels on CUDA at realistic sizes. Skipped without CUDA.

Not run in CI (no GPU there). On a GPU machine::

    TRITON_INTERPRET=0 python -m pytest tests/test_gpu.py

(``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` unless it is set: these cases need the
compiled kernels and skip, saying so, under the interpreter), or ``python -m
benchmarks.gpu_check OUT_DIR``, which runs them and the GPU benchmarks in one go.

What they check, for every loss (KD, LTKD, DKD, BKD):

- agreement with the reference (``backend="torch"``) at V up to 256000, float32 and bfloat16,
  and with a top-k teacher; LTKD with 3 to 300 groups in every walk (ranges, ordered, CLASS);
- N x V > 2^31 elements (int64 offsets): the last rows' losses and gradients;
- no host synchronisation in a forward + backward (``torch.cuda.set_sync_debug_mode("error")``),
  plain and with mask, sample weights and ``num_items_in_batch``;
- CUDA-graph capture and replay of a forward + backward step, on new inputs;
- determinism: two runs on the same inputs give bit-identical losses and gradients.
"""
import os

import pytest
import torch

import ltkd_kernels as lk

LOSSES = ("kd", "ltkd", "dkd", "bkd")
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(_INTERPRETED, reason="TRITON_INTERPRET is set (tests/conftest.py sets it "
                       "by default): these cases need the compiled Triton kernels; run "
                       "TRITON_INTERPRET=0 python -m pytest tests/test_gpu.py"),
]


def _rel(a, b):
    """``||a - b|| / ||b||`` (``||a - b||`` where ``b`` is 0, e.g. every loss at V = 1)."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    norm = torch.linalg.vector_norm(b).item()
    difference = torch.linalg.vector_norm(a - b).item()
    return difference / norm if norm > 0 else difference


def _constants(vocab, rows, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return dict(groups=torch.randint(0, 3, (vocab,), device="cuda", generator=g),
                target=torch.randint(0, vocab, (rows,), device="cuda", generator=g),
                weight=torch.rand(vocab, device="cuda", generator=g) + 0.05)


def _call(loss, c, **options):
    """``f(student, teacher, backend) -> loss`` of one loss with the constants ``c``."""
    calls = {
        "kd": lambda x, t, b: lk.kd_loss(x, t, temperature=2.0, backend=b, **options),
        "ltkd": lambda x, t, b: lk.ltkd_loss(x, t, c["groups"], 3, temperature=4.0, backend=b,
                                             **options),
        "dkd": lambda x, t, b: lk.dkd_loss(x, t, c["target"], backend=b, **options),
        "bkd": lambda x, t, b: lk.bkd_loss(x, t, c["weight"], target=c["target"], ce_weight=1.0,
                                           backend=b, **options),
    }
    return calls[loss]


def _logits(rows, vocab, dtype, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = torch.randn(rows, vocab, device="cuda", generator=g) * 3
    s = 0.7 * t + 2 * torch.randn(rows, vocab, device="cuda", generator=g)
    return s.to(dtype), t.to(dtype)


def _step(fn, s, t, backend):
    x = s.detach().clone().requires_grad_()
    value = fn(x, t, backend)
    value.backward()
    return value.detach(), x.grad


def _double(teacher):
    if isinstance(teacher, torch.Tensor):
        return teacher.double()
    return teacher._replace(logprobs=teacher.logprobs.double())


def _reference_step(fn, s, t):
    """The reference's loss and gradient in float64 on the same (rounded) inputs."""
    return _step(fn, s.double(), _double(t), "torch")


@pytest.mark.parametrize("vocab", [1, 1031, 32000, 128256, 256000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", LOSSES)
def test_triton_cuda_matches_reference(loss, dtype, vocab):
    rows = 64
    s, t = _logits(rows, vocab, dtype)
    fn = _call(loss, _constants(vocab, rows))
    value, grad = _step(fn, s, t, "triton")
    expected_value, expected_grad = _reference_step(fn, s, t)
    assert _rel(value, expected_value) <= 1e-5
    assert _rel(grad, expected_grad) <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("loss", LOSSES)
def test_software_pipelined_walks_match_reference(loss, stages):
    """The states and grad walks software-pipelined by the compiler (``forced_stages``: loads
    through shared memory, which the interpreter cannot check; no rule takes it yet) at few
    rows (V-slices) and at V = 256000 bf16, against the reference."""
    from ltkd_kernels.triton import grouped_kl as ops

    rows, vocab = 64, 256000
    s, t = _logits(rows, vocab, torch.bfloat16)
    fn = _call(loss, _constants(vocab, rows))
    expected_value, expected_grad = _reference_step(fn, s, t)
    with ops.forced_stages(stages):
        value, grad = _step(fn, s, t, "triton")
    assert _rel(value, expected_value) <= 1e-5
    assert _rel(grad, expected_grad) <= 1e-2


@pytest.mark.parametrize("layout", ["ranges", "reversed_ranges", "drawn"])
@pytest.mark.parametrize("num_groups", [3, 8, 32, 300])
def test_many_groups_ordered_and_class_walks(num_groups, layout):
    """LTKD with 3 to 300 groups at V = 128256 bf16: groups that are each one range of classes
    (in group order or reversed) take the dense ranges walk (int8 ids checked four at a time
    up to 126 groups), groups drawn at random the window walk from 5 groups (the CLASS walk
    below, and at 300 groups: more than a program's 128 lanes; docs/design.md); all against
    the reference, and each forced the other ways (the gathering ordered walk, the window
    walk, the CLASS walk)."""
    from ltkd_kernels.triton import grouped_kl as ops

    rows, vocab = 64, 128256
    s, t = _logits(rows, vocab, torch.bfloat16)
    if layout.endswith("ranges"):
        groups = torch.arange(vocab, device="cuda") * num_groups // vocab
        if layout == "reversed_ranges":
            groups = num_groups - 1 - groups
    else:
        groups = torch.randint(0, num_groups, (vocab,), device="cuda",
                               generator=torch.Generator(device="cuda").manual_seed(3))

    def fn(x, teacher, backend):
        return lk.ltkd_loss(x, teacher, groups, num_groups, temperature=2.0, backend=backend)

    expected_value, expected_grad = _reference_step(fn, s, t)
    for walk in (None, "ordered", "windows", "class"):
        with ops.forced_walk(walk):
            value, grad = _step(fn, s, t, "triton")
        assert _rel(value, expected_value) <= 1e-5, walk
        assert _rel(grad, expected_grad) <= 1e-2, walk


@pytest.mark.parametrize("rest", ["renormalize", "restrict"])
@pytest.mark.parametrize("loss", LOSSES)
def test_topk_teacher_matches_reference(loss, rest):
    rows, vocab = 64, 128256
    s, t = _logits(rows, vocab, torch.bfloat16)
    teacher = lk.topk_teacher(t, 64, rest=rest)
    fn = _call(loss, _constants(vocab, rows))
    value, grad = _step(fn, s, teacher, "triton")
    expected_value, expected_grad = _reference_step(fn, s, teacher)
    assert _rel(value, expected_value) <= 1e-5
    assert _rel(grad, expected_grad) <= 1e-2


@pytest.mark.parametrize("loss", LOSSES)
def test_int64_offsets_past_2_pow_31_elements(loss):
    """N x V > 2^31 elements: row offsets must be int64 (bf16 keeps this near 13 GB). The last
    rows' losses and gradients against the reference on those rows alone (LTKD without the
    batch rebalancing, so that a row's loss depends on that row only)."""
    rows, vocab = 16800, 128256  # 2.15e9 elements
    free, _ = torch.cuda.mem_get_info()
    if free < 4 * rows * vocab * 2 + (2 << 30):
        pytest.skip("not enough GPU memory for a 2^31-element case")
    torch.manual_seed(0)
    s = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    options = dict(reduction="none", rebalance=False) if loss == "ltkd" else dict(reduction="none")
    c = _constants(vocab, rows)
    x = s.requires_grad_()
    out = _call(loss, c, **options)(x, t, "triton")
    out.sum().backward()
    last = slice(rows - 2, rows)
    y = s[last].detach().double().requires_grad_()
    expected = _call(loss, dict(c, target=c["target"][last]), **options)(y, t[last].double(), "torch")
    expected.sum().backward()
    torch.testing.assert_close(out[last].detach().double(), expected.detach(), rtol=1e-5, atol=1e-6)
    assert _rel(x.grad[last], y.grad) <= 1e-2


def _with_options(rows):
    g = torch.Generator(device="cuda").manual_seed(3)
    return dict(mask=torch.rand(rows, device="cuda", generator=g) > 0.2,
                sample_weight=torch.rand(rows, device="cuda", generator=g),
                num_items_in_batch=torch.tensor(float(rows), device="cuda"))


@pytest.mark.parametrize("options", ["plain", "mask_weight_items"])
@pytest.mark.parametrize("loss", LOSSES)
def test_no_host_sync_forward_backward(loss, options):
    """After one warm-up call (constants are value-checked once per tensor), a forward +
    backward never synchronises with the host."""
    rows, vocab = 256, 32000
    s, t = _logits(rows, vocab, torch.bfloat16)
    fn = _call(loss, _constants(vocab, rows), **(_with_options(rows) if options != "plain" else {}))
    _step(fn, s, t, "triton")
    x = s.detach().clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(x, t, "triton").backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad.float()).all()


def test_no_host_sync_in_ltkd_module():
    """The module (its groups a checked buffer) never syncs after its first call."""
    s = torch.randn(256, 32000, device="cuda", requires_grad=True)
    t = torch.randn(256, 32000, device="cuda")
    criterion = lk.LTKDLoss(torch.randint(0, 3, (32000,)), num_groups=3).cuda()
    criterion(s, t).backward()  # first call checks the groups buffer once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        criterion(s, t).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("loss", LOSSES)
def test_cuda_graph_capture_and_replay(loss):
    """A forward + backward step captured in a CUDA graph, replayed on new inputs copied into
    the static tensors, gives the loss and gradient of an uncaptured call."""
    rows, vocab = 128, 32000
    fn = _call(loss, _constants(vocab, rows))
    s0, t0 = _logits(rows, vocab, torch.bfloat16, seed=1)
    x = s0.detach().clone().requires_grad_()
    static_t = t0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile the kernels, check the constants
        for _ in range(3):
            x.grad = None
            fn(x, static_t, "triton").backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        static_loss = fn(x, static_t, "triton")
        static_loss.backward()
    s1, t1 = _logits(rows, vocab, torch.bfloat16, seed=2)
    with torch.no_grad():
        x.copy_(s1)
        static_t.copy_(t1)
    graph.replay()
    torch.cuda.synchronize()
    expected_value, expected_grad = _step(fn, s1, t1, "triton")
    assert torch.equal(static_loss, expected_value)
    assert torch.equal(x.grad, expected_grad)


@pytest.mark.parametrize("shape", [(512, 128256), (8, 256000)])
@pytest.mark.parametrize("loss", LOSSES)
def test_deterministic_reruns(loss, shape):
    """The same inputs give bit-identical losses and gradients (no atomics in any sum)."""
    rows, vocab = shape
    s, t = _logits(rows, vocab, torch.bfloat16)
    fn = _call(loss, _constants(vocab, rows))
    first = _step(fn, s, t, "triton")
    second = _step(fn, s, t, "triton")
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1], second[1])


def test_srw_weights_match_reference():
    features = torch.randn(100_000, 256, device="cuda") + 0.3
    weights = lk.srw_weights(features, backend="triton")
    expected = lk.srw_weights(features.double(), backend="torch")
    assert _rel(weights, expected) <= 1e-5
