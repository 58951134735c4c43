"""pytest-benchmark microbenchmarks of every loss, provider and mode.

    pytest benchmarks/                                  # all cases
    pytest benchmarks/ -k "ltkd and full"               # a subset
    pytest benchmarks/ --benchmark-json=bench.json      # keep the numbers
    LTKD_BENCH_N=256 LTKD_BENCH_V=128256 pytest benchmarks/

Not part of the default ``pytest`` run (``testpaths = ["tests"]`` in ``pyproject.toml``).
Each case first checks the provider against ``ltkd_kernels.reference`` in float64 on the same
inputs (a provider that disagrees fails its case instead of being timed), then times one mode
with ``benchmark.pedantic``: the set-up (a fresh gradient; the forward, for ``backward``) is
untimed, every round is one call. A provider that cannot run here is skipped with the reason.
``extra_info`` holds the bytes that must move, the achieved GB/s and the check's errors.
The side-by-side harness with the bandwidth floor, CSV and plots is ``python -m benchmarks.run``;
these cases are the same providers and checks (:mod:`benchmarks.providers`) in pytest-benchmark's
format, for comparing runs with ``--benchmark-compare``.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

from .inputs import LOSSES, MODES, Problem, logit_problem, make_inputs
from .providers import PROVIDERS, build, check, reference_values, unavailable_reason
from .sweep import leaves, mode_callables

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device(os.environ.get("LTKD_BENCH_DEVICE",
                                     "cuda" if torch.cuda.is_available() else "cpu"))
N = int(os.environ.get("LTKD_BENCH_N", "64"))
V = int(os.environ.get("LTKD_BENCH_V", "32000"))
SRW_N = int(os.environ.get("LTKD_BENCH_SRW_N", "4096"))
DTYPE = os.environ.get("LTKD_BENCH_DTYPE", "float32")
ROUNDS = int(os.environ.get("LTKD_BENCH_ROUNDS", "5"))

_problems = {}
_built = {}


def _problem_data(loss):
    """Inputs and float64 reference of ``loss``, made once per session."""
    if loss not in _problems:
        if loss == "srw":
            problem = Problem("srw", SRW_N, None, None, DTYPE, D=256)
        else:
            problem = logit_problem(loss, N, V, DTYPE)
        inputs = make_inputs(problem, DEVICE)
        _problems[loss] = (problem, inputs, reference_values(problem, inputs), leaves(problem, inputs))
    return _problems[loss]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("loss", LOSSES)
def test_bench(benchmark, loss, provider, mode):
    if loss == "srw" and mode != "forward":
        pytest.skip("SRW weights carry no gradient: forward only")
    problem, inputs, reference, set_leaves = _problem_data(loss)
    reason = unavailable_reason(provider, problem, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    key = (loss, provider)
    if key not in _built:
        built = build(provider, problem, inputs.extras, DEVICE)
        ok, loss_err, grad_err, seconds = check(built.fn, problem, inputs, reference, DEVICE)
        _built[key] = (built, ok, loss_err, grad_err, seconds)
    built, ok, loss_err, grad_err, seconds = _built[key]
    assert ok, (f"{provider} disagrees with the float64 reference on {problem.label()}: "
                f"loss rel err {loss_err:.2e}, grad rel err {grad_err}")
    setup, region = mode_callables(built.fn, problem, inputs, set_leaves, mode)
    counter = itertools.count()

    def pedantic_setup():
        return (setup(next(counter)),), {}

    def timed(state):
        region(state)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    benchmark.group = f"{problem.label()} {mode}"
    benchmark.extra_info.update(loss=loss, provider=provider, mode=mode, N=problem.N, V=problem.V,
                                D=problem.D, dtype=problem.dtype,
                                floor_bytes=problem.floor_bytes(mode), loss_rel_err=loss_err,
                                grad_rel_err=grad_err, first_call_s=seconds)
    benchmark.pedantic(timed, setup=pedantic_setup, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info["gb_per_s"] = problem.floor_bytes(mode) / median_s / 1e9
