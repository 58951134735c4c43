"""Case ``launches``: kernel launches per call, and the Python overhead per call.

- **Launches** of one forward and of one backward (``loss.backward()``, autograd's seed
  gradient included) of every loss at N = 128, V = 100, counted with
  :func:`ltkd_kernels.ops.launches.count_launches`: leaf ATen ops that compute (fills and
  copies included; allocations, views and metadata not) plus Triton launches and calls into
  the C++ extension. Providers: this package's ``cpu`` and ``triton`` backends (Triton under
  its interpreter on the CPU, in a subprocess with ``TRITON_INTERPRET=1``: the same launches
  as on a GPU; at N = 16 with ``--quick``: the interpreter runs each program in numpy) and the
  papers' eager code. The design's count is 2 forward, 1 backward.
- **Overhead**: the median time of one forward + backward at N = 1, V = 2 (G = 2), where the
  arithmetic is nothing and the time is the Python, dispatch and launch path, for each
  backend (``cpu``, ``triton``, the ``torch`` reference) and eager. Triton's is measured on
  CUDA only (the interpreter's time on the CPU says nothing about a GPU's launch cost).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List

import torch

import ltkd_kernels as lk

from .. import measure
from ..inputs import LOGIT_LOSSES, logit_problem, make_inputs
from ..providers import PACKAGE_BACKENDS, Unavailable, build, package_fn
from ..report import error_text, markdown_table, new_row
from ..sweep import Context
from . import CaseResult, case

COUNT_SIZE = (128, 100)
QUICK_INTERPRETER_N = 16  # --quick: the interpreter runs every program in numpy (~15 s a call at N = 128)
OVERHEAD_SIZE = (1, 2)
COUNT_PROVIDERS = ("cpu", "triton", "eager")
OVERHEAD_PROVIDERS = ("cpu", "triton", "torch", "eager")


def _fn(provider: str, problem, extras, device: torch.device):
    """The provider's callable; a package backend wherever it can run (Triton under the
    interpreter too: counting launches needs no timing)."""
    if provider in PACKAGE_BACKENDS:
        reason = lk.unavailable_reason(provider, device)
        if reason is not None:
            raise Unavailable(reason)
        return package_fn(problem, extras, provider)
    return build(provider, problem, extras, device).fn


def _details(counter) -> str:
    return ", ".join(f"{name.replace('aten::', '')}={n}" for name, n in sorted(counter.items()))


def count_rows(provider: str, loss: str, device: torch.device,
               rows: int = COUNT_SIZE[0]) -> List[Dict]:
    """Forward and backward launch counts of one provider and loss (after one warm-up call:
    constants are checked once per tensor)."""
    from ltkd_kernels.ops.launches import count_launches

    problem = logit_problem(loss, rows, COUNT_SIZE[1])
    inputs = make_inputs(problem, device)
    fn = _fn(provider, problem, inputs.extras, device)
    student = inputs.sets[0][0].detach().clone().requires_grad_(True)
    teacher = inputs.sets[0][1]
    fn(student, teacher).backward()
    student.grad = None
    out = {}
    with measure.quiet_native_stderr():
        forward, forward_ops = count_launches(lambda: out.setdefault("loss", fn(student, teacher)))
        backward, backward_ops = count_launches(lambda: out["loss"].backward())
    return [new_row("launches", problem, provider, mode, status="ok", launches=n,
                    kernels=_kernels(provider, n, ops), launch_details=_details(ops))
            for mode, n, ops in (("forward", forward, forward_ops),
                                 ("backward", backward, backward_ops))]


def _kernels(provider: str, total: int, ops) -> int:
    """The package's own kernels among the launches (Triton kernels, calls into the C++
    extension); every launch for the eager code."""
    if provider not in PACKAGE_BACKENDS:
        return total
    return sum(n for name, n in ops.items() if name.startswith(("triton:", "cpu:")))


def overhead_row(provider: str, loss: str, device: torch.device, budget_s: float) -> Dict:
    """The median forward + backward time at N = 1, V = 2 (in ``median_ms``; ``overhead_us``)."""
    problem = logit_problem(loss, *OVERHEAD_SIZE, G=2)
    inputs = make_inputs(problem, device)
    fn = _fn(provider, problem, inputs.extras, device)
    student = inputs.sets[0][0].detach().clone().requires_grad_(True)
    teacher = inputs.sets[0][1]

    def setup(i):
        student.grad = None

    timing, _ = measure.time_region(setup, lambda state: fn(student, teacher).backward(), device,
                                    warmup=5, min_reps=50, max_reps=5000, budget_s=budget_s,
                                    measure_memory=False)
    return new_row("launches", problem, provider, "full", status="ok", median_ms=timing.median_ms,
                   p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, reps=timing.reps,
                   overhead_us=timing.median_ms * 1e3)


def measure_provider(provider: str, losses, device: torch.device, budget_s: float,
                     count_n: int = COUNT_SIZE[0]) -> List[Dict]:
    """Every row of one provider (an error becomes an ERROR row)."""
    rows = []
    for loss in losses:
        jobs = [("full", lambda: [overhead_row(provider, loss, device, budget_s)])]
        if provider == "triton" and device.type == "cpu":
            jobs = []  # the interpreter's time is no launch cost: counts only
        if provider in COUNT_PROVIDERS:
            jobs.insert(0, ("forward", lambda: count_rows(provider, loss, device, count_n)))
        for mode, job in jobs:
            try:
                rows += job()
            except Unavailable as reason:
                rows.append(new_row("launches", logit_problem(loss, *COUNT_SIZE), provider,
                                    mode, status="unavailable", note=str(reason)))
            except Exception as error:  # noqa: BLE001
                rows.append(new_row("launches", logit_problem(loss, *COUNT_SIZE), provider,
                                    mode, status="ERROR", note=error_text(error)[:300]))
    return rows


def _triton_interpreted(losses, budget_s: float, ctx: Context, count_n: int) -> List[Dict]:
    """The Triton rows on the CPU: a subprocess with ``TRITON_INTERPRET=1`` (set before the
    kernels are imported; never in this process, whose other cases must not see it)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "benchmarks.cases.launches", "--child", "triton",
               ",".join(losses), str(budget_s), str(count_n)]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        ctx.note(f"  triton (interpreter) subprocess failed: {tail}")
        return [new_row("launches", logit_problem(l, *COUNT_SIZE), "triton", "forward",
                        status="ERROR", note=tail[:300]) for l in losses]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    for row in rows:
        row["note"] = ((row.get("note") or "") + f" Triton interpreter (CPU), N={count_n}").strip()
    return rows


def _table(rows) -> List[str]:
    index = {(r["loss"], r["provider"], r["mode"]): r for r in rows}
    providers = [p for p in OVERHEAD_PROVIDERS if any(r["provider"] == p for r in rows)]
    lines = []
    for loss in LOGIT_LOSSES:
        for provider in providers:
            f, b, o = (index.get((loss, provider, m)) for m in ("forward", "backward", "full"))
            if not any((f, b, o)):
                continue
            lines.append([loss.upper(), provider, _launches(f), _launches(b),
                          "" if not o or o.get("overhead_us") is None else f"{o['overhead_us']:.0f}"])
    return (["## Launches per call and overhead", "",
             f"Launches at N={COUNT_SIZE[0]}, V={COUNT_SIZE[1]} (`count_launches`: leaf ATen ops "
             f"that compute, autograd's own included, plus the package's kernels, in brackets "
             f"where they differ; the launch_details column of results.csv names each). On the "
             f"CPU the Triton rows are the interpreter's launches (its own copies to and from "
             f"numpy are not counted: no GPU launch). Overhead: median forward + backward at N={OVERHEAD_SIZE[0]}, "
             f"V={OVERHEAD_SIZE[1]}, microseconds.", ""]
            + markdown_table(["loss", "provider", "forward launches", "backward launches",
                              "overhead us"], lines, ["---", "---", "--:", "--:", "--:"]) + [""])


def _launches(row) -> str:
    if row is None:
        return "—"
    if row.get("launches") is None:
        return row["status"] or ""
    kernels = row.get("kernels")
    return f"{row['launches']}" + ("" if kernels in (None, row["launches"]) else f" ({kernels})")


@case("launches", "kernel launches per forward and backward of every loss, and the Python "
      "overhead per call (N=1, V=2), per backend and eager")
def run(ctx: Context) -> CaseResult:
    losses = [l for l in ctx.option("losses", list(LOGIT_LOSSES)) if l in LOGIT_LOSSES]
    budget_s = 0.1 if ctx.quick else 0.5
    rows = []
    for provider in ctx.option("providers", list(OVERHEAD_PROVIDERS)):
        if provider not in OVERHEAD_PROVIDERS:
            continue
        ctx.log(f"launches and overhead: {provider}")
        if provider == "triton" and ctx.device.type == "cpu":
            rows += _triton_interpreted(losses, budget_s, ctx,
                                        QUICK_INTERPRETER_N if ctx.quick else COUNT_SIZE[0])
        else:
            rows += measure_provider(provider, losses, ctx.device, budget_s)
    return CaseResult(rows, sections=_table)


def _child(argv) -> int:
    provider, losses, budget_s, count_n = argv[0], argv[1].split(","), float(argv[2]), int(argv[3])
    rows = measure_provider(provider, losses, torch.device("cpu"), budget_s, count_n)
    sys.stdout.write("\n" + json.dumps(rows, default=str) + "\n")
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    sys.exit(_child(sys.argv[2:]))
