"""The three grouped-KL operators of every kernel backend against their torch form in float64.

``ltkd_kernels/ops/grouped_kl_torch.py`` is the executable form of docs/design.md; each kernel
backend (``"cpu"``: C++, ``"triton"``: interpreted on the CPU) must compute the same ``state``,
``extras``, loss, ``saved``, batch partial and gradient for every configuration of the case
table, on the same (rounded) inputs. Tolerances: the float32 kernels against float64 at
``RTOL`` relative (and ``ATOL`` absolute on values that are differences of O(1) terms).
"""
import math

import pytest
import torch

from conftest import (OP_CASES, OP_SHAPES, canonical_state, kernel_backends, make_op_inputs,
                      ops_module)
from ltkd_kernels.ops import grouped_kl_torch as torch_ops
from ltkd_kernels.ops.config import REDUCE_MEAN, REDUCE_NONE, REDUCE_SUM, TOPK_BUCKET

RTOL, ATOL = 1e-5, 1e-6


def _close(actual, expected, name, rtol=RTOL, atol=ATOL):
    actual = actual.double()
    expected = expected.double()
    same_nan = torch.isnan(actual) == torch.isnan(expected)
    assert bool(same_nan.all()), f"{name}: NaN where the reference has none (or the reverse)"
    finite = torch.isfinite(expected)
    assert bool((actual[~finite & ~torch.isnan(expected)] == expected[~finite & ~torch.isnan(expected)]).all()), \
        f"{name}: infinities differ"
    diff = (actual[finite] - expected[finite]).abs()
    bound = atol + rtol * expected[finite].abs()
    if diff.numel():
        worst = (diff / bound).max().item()
        assert worst <= 1.0, f"{name}: off by {worst:.3g} x tolerance (max abs diff {diff.max().item():.3g})"


def _grad_close(actual, expected, name, rtol):
    actual, expected = actual.double(), expected.double()
    assert bool((torch.isnan(actual) == torch.isnan(expected)).all()), f"{name}: NaN pattern differs"
    ok = ~torch.isnan(expected)
    num = (actual[ok] - expected[ok]).norm()
    den = expected[ok].norm().clamp_min(1e-12)
    assert (num / den).item() <= rtol, f"{name}: relative error {(num / den).item():.3g}"


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("shape", OP_SHAPES, ids=lambda s: f"N{s[0]}V{s[1]}")
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ops_match_torch_form(backend, shape, case, dtype):
    ops = ops_module(backend)
    inputs, cfg = make_op_inputs(case, *shape, dtype)
    if inputs is None:
        pytest.skip("case does not apply to this shape")
    reference = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                 for k, v in inputs.items()}

    state, extras = ops.states(inputs["student"], inputs["teacher"], inputs["topk_indices"],
                               inputs["topk_logprobs"], inputs["groups"], inputs["target"],
                               inputs["class_weight"], inputs["mask"], cfg)
    state64, extras64 = torch_ops.states(reference["student"], reference["teacher"],
                                         reference["topk_indices"], reference["topk_logprobs"],
                                         reference["groups"], reference["target"],
                                         reference["class_weight"], reference["mask"], cfg)
    assert state.dtype == torch.float32 and state.shape == state64.shape
    assert extras.dtype == torch.float32 and extras.shape == extras64.shape
    # A state is compared through what it means (its sums may sit at another reference point);
    # the losses below carry the real tolerance.
    mean, mean64 = canonical_state(state), canonical_state(state64)
    _close(mean[:, :2], mean64[:, :2], "log-sum-exps", atol=2e-5)
    _close(mean[:, 2], mean64[:, 2], "gap means", rtol=2e-5, atol=2e-5)
    if backend == "cpu":
        # The C++ kernels keep the torch form's reference points, each group's own maxima.
        _close(state[:, [0, 2]], state64[:, [0, 2]], "maxima")
        _close(state[:, [1, 3]], state64[:, [1, 3]], "sums", rtol=2e-5)

    for reduction in (REDUCE_NONE, REDUCE_SUM, REDUCE_MEAN):
        cfg_r = cfg._replace(reduction=reduction)
        loss, saved = ops.finish(state, extras, inputs["mask"], inputs["target"],
                                 inputs["sample_weight"], inputs["group_logmass"], None, None, cfg_r)
        loss64, saved64 = torch_ops.finish(state64, extras64, reference["mask"], reference["target"],
                                           reference["sample_weight"], reference["group_logmass"],
                                           None, None, cfg_r)
        _close(loss, loss64, f"loss[{reduction}]", atol=1e-5 * cfg.temperature ** 2)
        _close(saved, saved64, "saved", rtol=2e-5, atol=1e-5)
        grad_loss = (torch.rand(loss.shape) + 0.5) if reduction == REDUCE_NONE else torch.tensor(1.3)
        grad = ops.grad(inputs["student"], inputs["teacher"], inputs["topk_indices"],
                        inputs["topk_logprobs"], inputs["groups"], inputs["target"],
                        inputs["class_weight"], inputs["mask"], inputs["sample_weight"],
                        inputs["group_logmass"], state, extras, saved, grad_loss, cfg_r)
        grad64 = torch_ops.grad(reference["student"], reference["teacher"],
                                reference["topk_indices"], reference["topk_logprobs"],
                                reference["groups"], reference["target"], reference["class_weight"],
                                reference["mask"], reference["sample_weight"],
                                reference["group_logmass"], state64, extras64, saved64,
                                grad_loss.double(), cfg_r)
        assert grad.dtype == inputs["student"].dtype and grad.shape == inputs["student"].shape
        _grad_close(grad, grad64, f"grad[{reduction}]",
                    rtol=1e-5 if dtype == torch.float32 else 1e-2)

    partial = ops.finish(state, extras, inputs["mask"], inputs["target"], inputs["sample_weight"],
                         inputs["group_logmass"], None, None, cfg, partial_only=True)
    partial64 = torch_ops.finish(state64, extras64, reference["mask"], reference["target"],
                                 reference["sample_weight"], reference["group_logmass"], None,
                                 None, cfg, partial_only=True)
    _close(partial, partial64, "partial", rtol=2e-5)

    forward = ops.loss_forward(inputs["student"], inputs["teacher"], inputs["topk_indices"],
                               inputs["topk_logprobs"], inputs["groups"], inputs["target"],
                               inputs["class_weight"], inputs["mask"], inputs["sample_weight"],
                               inputs["group_logmass"], None, cfg)
    loss_again, _ = ops.finish(state, extras, inputs["mask"], inputs["target"],
                               inputs["sample_weight"], inputs["group_logmass"], None, None, cfg)
    assert torch.equal(forward[0], loss_again), "loss_forward must equal states + finish"


@pytest.mark.parametrize("backend", kernel_backends())
def test_finish_with_batch_partials_is_exact(backend):
    """Two halves' partials, merged, give the same pB (and denominator) as the whole batch."""
    ops = ops_module(backend)
    case = next(c for c in OP_CASES if c.name == "ltkd")
    inputs, cfg = make_op_inputs(case, 6, 37, torch.float32)
    state, extras = ops.states(inputs["student"], inputs["teacher"], None, None, inputs["groups"],
                               None, None, None, cfg)
    cfg = cfg._replace(denominator_from_partials=True)
    whole, saved = ops.finish(state, extras, None, None, None, None, None, None, cfg)
    halves = [ops.finish(state[i:i + 3], extras[i:i + 3], None, None, None, None, None, None, cfg,
                         partial_only=True) for i in (0, 3)]
    partials = torch.stack(halves)
    parts = [ops.finish(state[i:i + 3], extras[i:i + 3], None, None, None, None, partials, None,
                        cfg)[0] for i in (0, 3)]
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", kernel_backends())
def test_rebalancing_far_below_float32_range(backend):
    """The fuzzing issue's case: teacher group masses of e^-100 (below float32's range)."""
    ops = ops_module(backend)
    from ltkd_kernels.ops.config import GROUP_CLASS, GroupedKLConfig
    student = torch.tensor([[0.0, -1.0, -2.0], [0.5, 0.0, -1.0]])
    groups = torch.tensor([0, 1, 2])
    cfg = GroupedKLConfig(num_groups=3, rebalance=True, group_rule=GROUP_CLASS,
                          reduction=REDUCE_NONE)
    # Rebalancing makes the loss independent of a shift common to a group's masses.
    for gap, expected in ((100, [0.5503, 0.4913]), (110, [0.5503, 0.4913]), (200, [0.5503, 0.4913])):
        teacher = torch.tensor([[0.0, -gap, -20.0], [0.0, -gap - 5, -25.0]])
        loss, _, _, _ = ops.loss_forward(student, teacher, None, None, groups, None, None, None,
                                         None, None, None, cfg)
        torch.testing.assert_close(loss, torch.tensor(expected), rtol=2e-4, atol=0)


def test_merge_is_exact_on_any_split():
    """Merging the states of two V-slices gives the state of the whole row (torch form)."""
    from ltkd_kernels.ops.config import GROUP_CLASS, GroupedKLConfig
    s = torch.randn(4, 50, dtype=torch.float64) * 5
    t = torch.randn(4, 50, dtype=torch.float64) * 5
    s[0, :30] = float("-inf")
    t[1, 10:40] = float("-inf")
    groups = torch.randint(4, (50,))
    groups[:25] = 3
    cfg = GroupedKLConfig(num_groups=5, group_rule=GROUP_CLASS, temperature=0.7)
    whole, _ = torch_ops.states(s, t, None, None, groups, None, None, None, cfg)
    for cut in (1, 13, 25, 49):
        left, _ = torch_ops.states(s[:, :cut], t[:, :cut], None, None, groups[:cut], None, None, None, cfg)
        right, _ = torch_ops.states(s[:, cut:], t[:, cut:], None, None, groups[cut:], None, None, None, cfg)
        merged = torch_ops.merge_states(left, right)
        torch.testing.assert_close(merged, whole, rtol=1e-12, atol=1e-12)
