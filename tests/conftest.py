"""Test configuration, the shared case tables and the tolerance rule.

Without a GPU, Triton kernels run on the CPU through the interpreter: TRITON_INTERPRET must be
set before the kernels are first imported (triton.jit reads it then). With a GPU it is left
alone, so that tests/test_gpu.py runs the compiled kernels.
"""
import os
import zlib
from typing import NamedTuple, Optional

import torch  # noqa: E402  (importing torch does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Fuzzing profiles (tests/test_fuzz.py): "ci", the default, fixed and small; "long" for 10^4
# examples per backend (python -m pytest tests/test_fuzz.py --hypothesis-profile=long).
settings.register_profile("ci", max_examples=150, derandomize=True, print_blob=True)
settings.register_profile("long", max_examples=10_000, derandomize=False, print_blob=True)
settings.load_profile("ci")

import ltkd_kernels as lk  # noqa: E402
from ltkd_kernels.ops.config import (  # noqa: E402
    GROUP_CLASS,
    GROUP_ONE,
    GROUP_TARGET,
    TEACHER_DENSE,
    TOPK_BUCKET,
    TOPK_RENORMALIZE,
    TOPK_RESTRICT,
    GroupedKLConfig,
)


def kernel_backends():
    """Kernel backends to test here: Triton (interpreted on CPU) and the C++ CPU backend."""
    names = []
    for name in ("triton", "cpu"):
        reason = lk.unavailable_reason(name, torch.device("cpu"))
        names.append(pytest.param(name, marks=pytest.mark.skipif(
            reason is not None, reason=f"backend {name!r} unavailable: {reason}")))
    return names


def ops_module(backend: str):
    """The module holding a kernel backend's ``states``, ``finish``, ``grad``, ``loss_forward``."""
    if backend == "triton":
        from ltkd_kernels.triton import grouped_kl as ops
        return ops
    if backend == "cpu":
        from ltkd_kernels.cpu import grouped_kl as ops
        return ops
    from ltkd_kernels.ops import grouped_kl_torch as ops
    return ops


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh random inputs per test, but reproducible from the test's name.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ---------------------------------------------------------------------------------------------
# Operator cases (tests/test_ops.py): every configuration the losses give the three operators.

class OpCase(NamedTuple):
    name: str
    cfg: GroupedKLConfig
    teacher: str = "dense"          # "dense" or "topk"
    topk: int = 0                   # entries per row (clamped to V)
    class_weight: bool = False
    target: bool = False            # pass a target (DKD groups, CE, ignore_index rows)
    ignore_rows: bool = False       # some targets equal ignore_index
    mask: Optional[torch.dtype] = None
    sample_weight: bool = False
    group_logmass: bool = False
    neg_inf: bool = False           # -inf logits at the same classes, a whole group masked
    pad: bool = False               # top-k rows padded with -1 / -inf entries
    min_vocab: int = 1


_LTKD = GroupedKLConfig(num_groups=3, temperature=4.0, alpha=0.7, beta=1.3, rebalance=True,
                        group_rule=GROUP_CLASS)
OP_CASES = [
    OpCase("kd", GroupedKLConfig(temperature=2.0)),
    OpCase("ltkd", _LTKD),
    OpCase("ltkd_teacher_within", _LTKD._replace(rebalance=False, within_teacher=True,
                                                 temperature=1.5)),
    OpCase("ltkd_G8_masked_rows", _LTKD._replace(num_groups=8, temperature=0.5),
           mask=torch.bool, sample_weight=True),
    OpCase("ltkd_G100_empty", _LTKD._replace(num_groups=100, temperature=1.0)),
    OpCase("ltkd_neg_inf", _LTKD, neg_inf=True, min_vocab=6),
    OpCase("dkd", GroupedKLConfig(num_groups=2, temperature=4.0, beta=8.0,
                                  group_rule=GROUP_TARGET), target=True),
    OpCase("dkd_shard", GroupedKLConfig(num_groups=2, temperature=4.0, beta=8.0,
                                        group_rule=GROUP_TARGET, vocab_offset=7), target=True),
    OpCase("bkd_ce_ignore", GroupedKLConfig(temperature=3.0, ce_weight=1.0), class_weight=True,
           target=True, ignore_rows=True, mask=torch.int64, sample_weight=True),
    OpCase("kd_ce_half", GroupedKLConfig(temperature=1.0, ce_weight=0.5), target=True),
    OpCase("topk_ltkd", _LTKD._replace(topk_rule=TOPK_RENORMALIZE), teacher="topk", topk=8,
           pad=True),
    OpCase("topk_ltkd_logmass", _LTKD._replace(topk_rule=TOPK_RENORMALIZE, within_teacher=True),
           teacher="topk", topk=8, group_logmass=True),
    OpCase("topk_kd_restrict", GroupedKLConfig(temperature=2.0, topk_rule=TOPK_RESTRICT),
           teacher="topk", topk=5, pad=True),
    OpCase("topk_kd_bucket", GroupedKLConfig(num_groups=2, topk_rule=TOPK_BUCKET),
           teacher="topk", topk=6, pad=True, min_vocab=2),
    OpCase("topk_dkd", GroupedKLConfig(num_groups=2, temperature=4.0, beta=8.0,
                                       group_rule=GROUP_TARGET, topk_rule=TOPK_RENORMALIZE),
           teacher="topk", topk=8, target=True),
    OpCase("topk_dkd_restrict", GroupedKLConfig(num_groups=2, temperature=4.0, beta=8.0,
                                                group_rule=GROUP_TARGET, topk_rule=TOPK_RESTRICT),
           teacher="topk", topk=8, target=True, pad=True),
    OpCase("topk_bkd", GroupedKLConfig(temperature=2.0, topk_rule=TOPK_RENORMALIZE),
           teacher="topk", topk=8, class_weight=True),
]

# (N, V): one row and V = 1; odd sizes that are not block multiples; past one 2048 block.
OP_SHAPES = [(1, 1), (3, 37), (4, 1031), (2, 4099)]


def make_op_inputs(case: OpCase, rows: int, vocab: int, dtype):
    """Random inputs of a case at ``(rows, vocab)`` (None when the case needs a larger V)."""
    if vocab < case.min_vocab:
        return None, None
    cfg = case.cfg
    student = (torch.randn(rows, vocab) * 2.0).to(dtype)
    teacher = (torch.randn(rows, vocab) * 3.0 + 0.5).to(dtype)
    inputs = dict(student=student, teacher=None, topk_indices=None, topk_logprobs=None,
                  groups=None, target=None, class_weight=None, mask=None, sample_weight=None,
                  group_logmass=None)
    if cfg.group_rule == GROUP_CLASS:
        groups = torch.randint(cfg.num_groups, (vocab,))
        if cfg.num_groups >= 100:
            groups = torch.where(groups == 57, torch.ones_like(groups), groups)  # an empty group
        inputs["groups"] = groups.to(torch.int32 if vocab % 2 else torch.int64)
    if case.neg_inf:
        student[:, :3] = float("-inf")
        teacher[:, :3] = float("-inf")
        inputs["groups"][:3] = 2  # group 2 may hold only -inf classes
    if case.target:
        target = torch.randint(vocab, (rows,)) + cfg.vocab_offset
        if case.ignore_rows and rows > 1:
            target[0] = cfg.ignore_index
        inputs["target"] = target
    if case.class_weight:
        weight = torch.rand(vocab) + 0.05
        if vocab > 2:
            weight[1] = 0.0
        inputs["class_weight"] = weight
    if case.mask is not None:
        mask = torch.rand(rows) > 0.3
        mask[-1] = True
        inputs["mask"] = mask.to(case.mask)
    if case.sample_weight:
        inputs["sample_weight"] = torch.rand(rows) + 0.1
    if case.teacher == "dense":
        inputs["teacher"] = teacher
    else:
        k = min(case.topk, vocab)
        full = torch.log_softmax(teacher.float() * (1.0 if cfg.topk_rule == TOPK_BUCKET else 1.0), -1)
        values, indices = full.topk(k, -1)
        if case.pad and k > 1:
            indices[0, -1] = -1
            if rows > 1:
                values[1, -1] = float("-inf")
        inputs["topk_indices"] = indices
        inputs["topk_logprobs"] = values
        if case.group_logmass:
            scaled = teacher.float() / cfg.temperature
            lse = torch.stack([torch.logsumexp(scaled.masked_fill(inputs["groups"].long() != k_, float("-inf")), -1)
                               for k_ in range(cfg.num_groups)], -1)
            inputs["group_logmass"] = lse - torch.logsumexp(scaled, -1, keepdim=True)
    return inputs, cfg


# ---------------------------------------------------------------------------------------------
# Loss cases (tests/test_losses.py and others): the public functions on every backend against
# the float64 equations of tests/equations.py.

# "torch": the reference; "torch-ops": the plain-torch operators that backend="auto" uses
# where no kernel can run; then the two kernel backends.
LOSS_BACKENDS = [pytest.param("torch"), pytest.param("torch-ops")] + kernel_backends()


@pytest.fixture
def backend(request, monkeypatch):
    """The ``backend=`` value of a test parametrized with ``LOSS_BACKENDS`` (indirectly)."""
    name = request.param
    if name == "torch-ops":
        from ltkd_kernels.ops import grouped_kl as ops
        from ltkd_kernels.ops import grouped_kl_torch

        monkeypatch.setattr(ops, "kernel_module", lambda backend, device: grouped_kl_torch)
        return "auto"
    return name


def with_backends(names=None, slow=()):
    """``@with_backends()``: parametrize a test's ``backend`` fixture over LOSS_BACKENDS (or
    the given names); the backends in ``slow`` are marked ``slow`` (run by ``pytest -m slow``,
    as CI does, not by the default ``pytest``)."""
    params = LOSS_BACKENDS if names is None else [p for p in LOSS_BACKENDS if p.values[0] in names]
    params = [pytest.param(*p.values, marks=(*p.marks, pytest.mark.slow), id=p.id)
              if p.values[0] in slow else p for p in params]
    return pytest.mark.parametrize("backend", params, indirect=True)


def random_groups(vocab, num_groups, empty=()):
    """Random groups (V,) in [0, G) avoiding the groups listed in ``empty``."""
    allowed = torch.tensor([k for k in range(num_groups) if k not in empty])
    return allowed[torch.randint(len(allowed), (vocab,))]


class LossCase(NamedTuple):
    """A loss configuration: how to call the package and its float64 equation (per row)."""

    name: str
    call: object      # call(student, teacher, **options) -> loss
    rows64: object    # rows64(student64, teacher64) -> (N,) float64 row losses


def loss_cases(vocab, rows):
    """Every loss configuration at ``(rows, vocab)``, with its own random groups / targets."""
    import equations as eq

    g3 = random_groups(vocab, 3)
    g100 = random_groups(vocab, 100, empty=(0, 57, 99))
    target = torch.randint(vocab, (rows,))
    weight = torch.rand(vocab) + 0.05
    if vocab > 2:
        weight[1] = 0.0  # a class of weight 0: no teacher probability
    lead = lambda s: target.reshape(s.shape[:-1])  # noqa: E731
    return [
        LossCase("kd", lambda s, t, **kw: lk.kd_loss(s, t, temperature=2.0, **kw),
                 lambda s, t: eq.kd_rows(s, t, 2.0)),
        LossCase("ltkd", lambda s, t, **kw: lk.ltkd_loss(s, t, g3, 3, temperature=4.0, alpha=0.7,
                                                         beta=1.3, **kw),
                 lambda s, t: eq.ltkd_rows(s, t, g3, 3, 4.0, 0.7, 1.3)),
        LossCase("ltkd_teacher_within", lambda s, t, **kw: lk.ltkd_loss(
                     s, t, g3, temperature=1.5, within_weight="teacher", **kw),
                 lambda s, t: eq.ltkd_rows(s, t, g3, int(g3.max()) + 1, 1.5, within_weight="teacher")),
        LossCase("ltkd_no_rebalance", lambda s, t, **kw: lk.ltkd_loss(s, t, g3, 3, rebalance=False, **kw),
                 lambda s, t: eq.ltkd_rows(s, t, g3, 3, rebalance=False)),
        LossCase("ltkd_G1", lambda s, t, **kw: lk.ltkd_loss(s, t, torch.zeros(vocab, dtype=torch.long),
                                                            temperature=3.0, **kw),
                 lambda s, t: eq.ltkd_rows(s, t, torch.zeros(vocab, dtype=torch.long), 1, 3.0)),
        LossCase("ltkd_G100_empty_groups", lambda s, t, **kw: lk.ltkd_loss(s, t, g100, 100, **kw),
                 lambda s, t: eq.ltkd_rows(s, t, g100, 100)),
        LossCase("dkd", lambda s, t, **kw: lk.dkd_loss(s, t, lead(s), **kw),
                 lambda s, t: eq.dkd_rows(s, t, target)),
        LossCase("bkd", lambda s, t, **kw: lk.bkd_loss(s, t, weight, **kw),
                 lambda s, t: eq.bkd_rows(s, t, weight)),
        LossCase("bkd_ce", lambda s, t, **kw: lk.bkd_loss(s, t, weight, target=lead(s), ce_weight=1.0,
                                                          temperature=3.0, **kw),
                 lambda s, t: eq.bkd_rows(s, t, weight, 3.0, target)),
        LossCase("kd_ce_half", lambda s, t, **kw: lk.kd_loss(s, t, target=lead(s), ce_weight=0.5, **kw),
                 lambda s, t: eq.kd_rows(s, t, 1.0) + 0.5 * eq.ce_rows(s, target)),
    ]


LOSS_CASE_NAMES = [c.name for c in loss_cases(8, 2)]
# (leading shape, V): one row, V = 1, V = 2, odd V, V past one 2048-wide block.
LOSS_SHAPES = [((1,), 1), ((1,), 2), ((4,), 37), ((2, 3), 1031), ((3,), 4097)]


def make_logits(shape, dtype):
    student = torch.randn(shape) * 2.0
    teacher = torch.randn(shape) * 3.0 + 0.5
    return student.to(dtype), teacher.to(dtype)


# The tolerance rule, relative to float64: fp32 losses at 1e-5 relative (1e-6 absolute), the
# gradient norm-wise at 1e-5; fp16/bf16 inputs are compared with float64 on the same rounded
# inputs, so the loss keeps fp32 accuracy and the gradient is off by its own dtype's rounding.
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_loss_close(actual, expected, *, scale=1.0):
    """``actual`` (any float) against float64 ``expected``: same NaN/inf pattern, then
    ``|a - e| <= 1e-5 |e| + 1e-6 scale`` elementwise."""
    actual = actual.double()
    expected = expected.double()
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), (actual, expected)
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), (actual, expected)
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-5, atol=1e-6 * scale)


def assert_grad_close(grad, grad64, rtol=1e-5):
    """Norm-wise relative error ``||g - g64|| / ||g64||``; non-finite entries must match."""
    grad = grad.double()
    assert torch.equal(torch.isfinite(grad), torch.isfinite(grad64))
    err = torch.linalg.vector_norm(grad - grad64).item()
    scale = torch.linalg.vector_norm(grad64).item()
    assert err <= rtol * scale + 1e-12, f"gradient error {err:.3g} vs norm {scale:.3g}"


def canonical_state(state, student=True, teacher=True):
    """What a ``(N, 5, G)`` state means whatever reference point its sums are taken at
    (docs/design.md: the torch and C++ forms take each group's maximum, the Triton walk may take
    a larger one): ``(N, 3, G)`` float64 ``[log sum exp b, log sum exp a, E_pT[a - b]]`` per
    group (``-inf`` for a group with no finite value; the gap mean is ``g`` itself where the
    teacher's sum is 0, or where the state has only one model: its slots are zeros)."""
    m_s, s_s, m_t, s_t, g = state.double().unbind(1)

    def ref(m):
        return torch.where(m == float("-inf"), torch.zeros_like(m), m)

    lse_s = ref(m_s) + s_s.log()
    lse_t = ref(m_t) + s_t.log()
    if not (student and teacher):
        return torch.stack([lse_s, lse_t, g], 1)
    gap = torch.where(s_t == 0, g, g / s_t + ref(m_t) - ref(m_s))
    return torch.stack([lse_s, lse_t, gap], 1)
