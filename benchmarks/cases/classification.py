"""Case ``classification``: every loss at classification sizes, this package against the
papers' eager code and ``torch.compile`` of it, forward + backward, in one run.

- sweep: V in {100, 1000, 8142} (CIFAR-100, ImageNet-1k, iNaturalist-2018) x N in
  {128, 256, 512}, float32, mode ``full`` (one training step of the loss);
- the large point N = 2048, V = 32000: modes forward, backward and full;
- ``--quick``: N = 128, V = 100 and N = 256, V = 1000 only (``torch.compile`` at the second).

Targets (issue "one launch forward, one backward"): at least 1.5x eager at N = 128, V = 100
and 4x at N = 256, V = 1000 for every loss; LTKD's full step at N = 2048, V = 32000 no slower
than 81 ms (the code before the op layer, on the 2-core CPU of the committed results).
"""
from __future__ import annotations

from typing import List

from ..inputs import LOGIT_LOSSES, logit_problem
from ..report import markdown_table
from ..sweep import Context, run_problem
from . import CaseResult, case, target

SWEEP_V = (100, 1000, 8142)
SWEEP_N = (128, 256, 512)
LARGE = (2048, 32000)
QUICK = ((128, 100), (256, 1000))
SPEEDUP_TARGETS = {(128, 100): 1.5, (256, 1000): 4.0}
LTKD_LARGE_MS = 81.0


def package_provider(ctx: Context) -> str:
    return "triton" if ctx.device.type == "cuda" else "cpu"


def _plan(ctx: Context):
    """``[(N, V, modes, providers)]`` of this run."""
    providers = ctx.option("providers", [package_provider(ctx), "eager", "compile"])
    no_compile = [p for p in providers if p != "compile"]
    Ns, Vs = ctx.option("N", None), ctx.option("V", None)
    if Ns or Vs:
        sizes = [(N, V) for V in (Vs or SWEEP_V) for N in (Ns or SWEEP_N)]
        return [(N, V, ctx.option("modes", ["full"]), providers) for N, V in sizes]
    if ctx.quick:
        return [(128, 100, ["full"], no_compile), (256, 1000, ["full"], providers)]
    plan = [(N, V, ["full"], providers) for V in SWEEP_V for N in SWEEP_N]
    return plan + [(LARGE[0], LARGE[1], ["forward", "backward", "full"], providers)]


def _find(rows, loss, N, V, provider, mode="full"):
    for r in rows:
        if (r["loss"], r["N"], r["V"], r["provider"], r["mode"]) == (loss, N, V, provider, mode):
            return r if r["status"] == "ok" else None
    return None


def _targets(rows, ctx: Context) -> List[dict]:
    package = package_provider(ctx)
    out = []
    for (N, V), wanted in SPEEDUP_TARGETS.items():
        for loss in LOGIT_LOSSES:
            row = _find(rows, loss, N, V, package)
            value = row and row.get("x_eager")
            out.append(target(f"{loss.upper()} N={N} V={V} full: {package} vs eager", value,
                              f">= {wanted}x", None if not value else value >= wanted, "x"))
    if ctx.device.type == "cpu":
        row = _find(rows, "ltkd", LARGE[0], LARGE[1], package)
        value = row and row["median_ms"]
        out.append(target(f"LTKD N={LARGE[0]} V={LARGE[1]} full: {package} time", value,
                          f"<= {LTKD_LARGE_MS:.0f} ms", None if not value else value <= LTKD_LARGE_MS,
                          " ms"))
    return out


def _speedup_table(rows, ctx: Context) -> List[str]:
    """Loss x size: the package's speed-up over eager (and over torch.compile)."""
    package = package_provider(ctx)
    sizes = sorted({(r["N"], r["V"]) for r in rows if r["mode"] == "full"},
                   key=lambda s: (s[1], s[0]))
    lines = []
    for loss in LOGIT_LOSSES:
        cells = []
        for N, V in sizes:
            row = _find(rows, loss, N, V, package)
            if row is None or row.get("x_eager") is None:
                cells.append("—")
                continue
            compiled = row.get("x_compile")
            cells.append(f"{row['x_eager']:.1f}x" + (f" ({compiled:.1f}x)" if compiled else ""))
        lines.append([loss.upper()] + cells)
    header = ["loss"] + [f"N={N} V={V}" for N, V in sizes]
    return (["## Speed-up of the full step over eager (over torch.compile in brackets)", "",
             f"`{package}` backend; median times in the tables below.", ""]
            + markdown_table(header, lines, ["---"] + ["--:"] * len(sizes)) + [""])


@case("classification", "every loss at classification sizes (V 100-8142, N 128-512, and "
      "N=2048 V=32000) against eager and torch.compile, fp32")
def run(ctx: Context) -> CaseResult:
    rows = []
    losses = ctx.option("losses", list(LOGIT_LOSSES))
    for N, V, modes, providers in _plan(ctx):
        for loss in [l for l in losses if l in LOGIT_LOSSES]:
            problem = logit_problem(loss, N, V, "float32", G=ctx.option("G", [None])[0])
            ctx.log(f"{problem.label()}")
            rows += run_problem("classification", problem, ctx.runnable(providers, problem),
                                modes, ctx)
    from ..plots import plot_speedups

    return CaseResult(rows, targets=lambda rows: _targets(rows, ctx),
                      sections=lambda rows: _speedup_table(rows, ctx), plots=plot_speedups)
