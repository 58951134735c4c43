"""Case ``srw``: SRW weights (``lk.srw_weights``) against one read of the features and the
paper's N x N code.

Providers: this package's backends (``cpu`` and the ``torch`` reference on the CPU, ``triton``
on CUDA), the eager N x N cosine matrix (up to N = 16384). Every backend's weights are checked
against the float64 reference. ``x one read``: the median over the median of
``features.sum()`` (one streaming read of the features, timed in the same case). The exact
algorithm needs the features twice (the mean of the normalised rows before any dot product),
so two reads is the floor of any exact method.

- CPU: N in {4096, 16384, 60000, 10^6}, D = 256, float32. ``--quick``: N in {4096, 60000}.
- CUDA: N in {16384, 10^6}.
"""
from __future__ import annotations

from .. import measure
from ..inputs import Problem, make_inputs
from ..sweep import Context, run_problem
from . import CaseResult, case

D = 256
CPU_N = (4096, 16384, 60000, 1_000_000)
QUICK_N = (4096, 60000)
CUDA_N = (16384, 1_000_000)


def _read_ms(problem: Problem, ctx: Context) -> float:
    """Median time of one streaming read of the features (``features.sum()``)."""
    (features,) = make_inputs(problem, ctx.device).sets[0]
    s = ctx.settings
    timing, _ = measure.time_region(lambda i: None, lambda state: features.sum(), ctx.device,
                                    warmup=1, min_reps=s.min_reps, max_reps=s.max_reps,
                                    budget_s=s.budget_s, measure_memory=False)
    return timing.median_ms


@case("srw", "SRW weights against one read of the features and the paper's N x N code")
def run(ctx: Context) -> CaseResult:
    if "srw" not in ctx.option("losses", ["srw"]):
        return CaseResult([])
    if ctx.device.type == "cuda":
        sizes, providers = CUDA_N, ["triton", "torch", "eager"]
    else:
        sizes, providers = (QUICK_N if ctx.quick else CPU_N), ["cpu", "torch", "eager"]
    providers = ctx.option("providers", providers)
    rows = []
    for N in ctx.option("N", list(sizes)):
        problem = Problem("srw", N, None, None, ctx.option("dtype", ["float32"])[0],
                          D=ctx.option("D", D))
        ctx.log(problem.label())
        problem_rows = run_problem("srw", problem, ctx.runnable(providers, problem),
                                   ["forward"], ctx)
        read_ms = _read_ms(problem, ctx)
        for row in problem_rows:
            row["read_ms"] = read_ms
            row["x_one_read"] = row["median_ms"] / read_ms if row["median_ms"] else None
        rows += problem_rows
    from ..plots import plot_srw

    return CaseResult(rows, plots=plot_srw)
