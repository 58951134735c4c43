"""Case ``lm``: every loss at language-model vocabularies, every provider side by side.

Providers: this package's backends (``cpu`` and the ``torch`` reference on the CPU,
``triton`` on CUDA), the papers' eager code, ``torch.compile`` of it, Liger-Kernel's KL
divergence (KD, CUDA, where installed). Each problem is checked against the float64 reference,
then timed mode by mode; the fraction of the floor is the bytes that must move (5 N V s for a
full step) over this run's copy bandwidth (HBM on a GPU).

- CPU: N = 64, V in {1024, 32000, 128256}, G = 3, float32; every mode and ``torch.compile``
  at V = 32000, the full step elsewhere. ``--quick``: V in {1024, 32000}, full step, no
  ``torch.compile``.
- CUDA: N = 4096, V = 128256 and N = 64, V = 256000, bfloat16, every mode.
- ``--V``, ``--N``, ``--G``, ``--dtype``: the Cartesian product of the lists given (the
  others at N = 256, V = 32000, G = 3, float32), every mode.
"""
from __future__ import annotations

from ..inputs import LOGIT_LOSSES, MODES, logit_problem
from ..providers import PROVIDERS
from ..sweep import Context, run_problem
from . import CaseResult, case

CPU_N = 64
CPU_V = (1024, 32000, 128256)
CPU_DETAIL_V = 32000  # the one CPU size timed in every mode and with torch.compile
CUDA_SIZES = ((4096, 128256), (64, 256000))
BASE = dict(N=256, V=32000, dtype="float32")


def _default_providers(ctx: Context):
    if ctx.device.type == "cuda":
        return ["triton", "eager", "compile", "liger"]
    return ["cpu", "torch", "eager", "compile"]


def _plan(ctx: Context):
    """``[(N, V, G, dtype, modes, providers)]``."""
    providers = ctx.option("providers", _default_providers(ctx))
    no_compile = [p for p in providers if p != "compile"]
    modes = ctx.option("modes", list(MODES))
    Gs = ctx.option("G", [None])
    if any(getattr(ctx.options, name, None) for name in ("V", "N", "G", "dtype")):
        return [(N, V, G, dtype, modes, providers)
                for dtype in ctx.option("dtype", [BASE["dtype"]])
                for N in ctx.option("N", [BASE["N"]]) for V in ctx.option("V", [BASE["V"]])
                for G in Gs]
    if ctx.device.type == "cuda":
        return [(N, V, None, "bfloat16", modes, providers) for N, V in CUDA_SIZES]
    if ctx.quick:
        return [(CPU_N, V, None, "float32", ["full"], no_compile) for V in CPU_V[:2]]
    return [(CPU_N, V, None, "float32", modes if V == CPU_DETAIL_V else ["full"],
             providers if V == CPU_DETAIL_V else no_compile) for V in CPU_V]


@case("lm", "every loss and provider at language-model vocabularies (CPU: N=64, V to 128256 "
      "fp32; CUDA: N=4096 V=128256 and N=64 V=256000 bf16), fraction of the bandwidth floor")
def run(ctx: Context) -> CaseResult:
    rows = []
    losses = [l for l in ctx.option("losses", list(LOGIT_LOSSES)) if l in LOGIT_LOSSES]
    for N, V, G, dtype, modes, providers in _plan(ctx):
        for loss in losses:
            problem = logit_problem(loss, N, V, dtype, G=G)
            ctx.log(problem.label())
            wanted = [p for p in providers if p in PROVIDERS]
            rows += run_problem("lm", problem, ctx.runnable(wanted, problem), modes, ctx)
    from ..plots import plot_time_vs_V

    return CaseResult(rows, plots=plot_time_vs_V)
