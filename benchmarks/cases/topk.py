"""Case ``topk``: KD and LTKD with a sparse teacher (:class:`ltkd_kernels.TopKTeacher`, k in
{8, 64, 256}) against the same losses with the dense teacher logits, at the same N and V.

The dense and sparse variants of a loss are timed together (one call of each in turn, so that
other load on the machine hits them alike). The sparse teacher is built once, outside the timings, with ``lk.topk_teacher(teacher, k)``
(the default ``"renormalize"`` rule; int64 indices, float32 log-probabilities), as an offline
dataset stores it. Each loss is checked against the float64 reference with the same teacher.
Bytes that must move: the dense student (forward N V s, backward 2 N V s: read, write the
gradient) plus 8 N k bytes of teacher per pass, against 5 N V s for the dense teacher.

- CPU: N = 2048, V = 32000, float32, forward and full step. ``--quick``: N = 256, k in {8, 64}.
- CUDA: N = 4096, V = 128256, bfloat16.

Targets (issue "sparse teachers", CPU): at N = 2048, V = 32000, k = 64 the full step takes at
most 0.7x the dense-teacher loss's time, and its peak memory above the inputs is the gradient.
"""
from __future__ import annotations

from ..inputs import logit_problem
from ..report import markdown_table, number
from ..sweep import Context, run_problems
from . import CaseResult, case, target

KS = (8, 64, 256)
LOSSES = ("kd", "ltkd")
CPU_SIZE = (2048, 32000, "float32")
QUICK_SIZE = (256, 32000, "float32")
CUDA_SIZE = (4096, 128256, "bfloat16")
TIME_TARGET = 0.7
TARGET_K = 64


def _size(ctx: Context):
    if ctx.device.type == "cuda":
        N, V, dtype = CUDA_SIZE
    else:
        N, V, dtype = QUICK_SIZE if ctx.quick else CPU_SIZE
    return (ctx.option("N", [N])[0], ctx.option("V", [V])[0], ctx.option("dtype", [dtype])[0])


def _annotate(rows) -> None:
    """``time_vs_dense`` (this median over the dense teacher's) and ``peak_vs_grad`` (peak
    memory over the gradient's size N V s) of every timed row."""
    dense = {(r["loss"], r["provider"], r["mode"]): r["median_ms"] for r in rows
             if r["k"] is None and r["status"] == "ok"}
    for r in rows:
        base = dense.get((r["loss"], r["provider"], r["mode"]))
        ok = r["status"] == "ok" and r["median_ms"]
        r["time_vs_dense"] = r["median_ms"] / base if ok and base else None
        grad_mib = r["N"] * r["V"] * (2 if r["dtype"] != "float32" else 4) / 2 ** 20
        r["peak_vs_grad"] = (r["peak_mem_mib"] / grad_mib if ok and r["peak_mem_mib"] is not None
                             else None)


def _targets(rows, ctx: Context):
    out = []
    for loss in LOSSES:
        row = next((r for r in rows if r["loss"] == loss and r["k"] == TARGET_K
                    and r["mode"] == "full" and r["status"] == "ok"), None)
        ratio = row and row.get("time_vs_dense")
        label = f"{loss.upper()} N={row['N'] if row else '?'} k={TARGET_K} full"
        out.append(target(f"{label}: time / dense-teacher time", ratio, f"<= {TIME_TARGET}",
                          None if ratio is None else ratio <= TIME_TARGET))
        peak = row and row.get("peak_vs_grad")
        out.append(target(f"{label}: peak memory above inputs / gradient", peak, "1 (= the gradient)",
                          None if peak is None else peak <= 1.05))
    return out


def _table(rows):
    lines = [[r["loss"].upper(), "dense" if r["k"] is None else str(r["k"]), r["mode"],
              f"{number(r['median_ms'])} ms", number(r.get("time_vs_dense")),
              number(r["peak_mem_mib"]), number(r.get("peak_vs_grad"))]
             for r in rows if r["status"] == "ok"]
    return (["## Sparse against dense teacher", "",
             "time / dense: the median over the dense teacher's (same loss, mode, provider); "
             "peak / gradient: peak memory above the inputs over N V s.", ""]
            + markdown_table(["loss", "k", "mode", "median", "time / dense", "peak MiB",
                              "peak / gradient"], lines,
                             ["---", "--:", "---", "--:", "--:", "--:", "--:"]) + [""])


@case("topk", "KD and LTKD with a top-k teacher (k 8, 64, 256) against the dense teacher: "
      "time and peak memory")
def run(ctx: Context) -> CaseResult:
    N, V, dtype = _size(ctx)
    package = "triton" if ctx.device.type == "cuda" else "cpu"
    providers = ctx.option("providers", [package])
    modes = ctx.option("modes", ["forward", "full"])
    ks = [None] + [k for k in (KS[:2] if ctx.quick else KS) if k <= V]
    rows = []
    for loss in [l for l in ctx.option("losses", list(LOSSES)) if l in LOSSES]:
        # The dense and sparse teachers of a loss are timed together, one call each in turn.
        problems = [logit_problem(loss, N, V, dtype, k=k) for k in ks]
        ctx.log(f"{problems[0].label()} and top-k {ks[1:]}")
        rows += run_problems("topk", [(p, ctx.runnable(providers, p)) for p in problems], modes, ctx)
    _annotate(rows)
    from ..plots import plot_topk

    return CaseResult(rows, targets=lambda rows: _targets(rows, ctx), sections=_table,
                      plots=plot_topk)
