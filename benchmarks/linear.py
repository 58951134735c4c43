"""Benchmark: the fused-linear losses against eager ``matmul + loss``, provider by provider.

One training step of the distillation head: the student's and the teacher's logits from hidden
states and LM-head weights, the loss, and the backward of the loss and of the student's matmul
(gradients of the student's hidden states and weight; the teacher is constant). Providers:

- ``ltkd_kernels``: :func:`ltkd_kernels.linear.fused_linear_kd_loss` /
  ``fused_linear_ltkd_loss`` (``backend="auto"``: the C++ kernels on the CPU, Triton on CUDA;
  ``chunk_size=None``, the automatic chunk);
- ``eager``: ``x @ W.T`` for both models, then the papers' loss of :mod:`benchmarks.eager`
  (its ``N x V`` intermediates), autograd backward;
- ``compile``: ``torch.compile`` of that eager step (static shapes; the compile time is
  reported, not timed);
- ``liger``: Liger-Kernel's chunked ``LigerFusedLinearJSDLoss`` with ``beta=0`` (its forward
  KL; no hard loss), KD only, where importable (its Triton ``LigerFusedLinearJSD`` with
  ``jsd_beta=0`` on CUDA where the chunked one is missing). Its loss is not ``T^2``-scaled and
  its KL direction and normalisation are Liger's: it is timed and its memory measured, not
  checked against the reference.

Measured per provider (the providers of a problem interleaved, one call each per round, so
that other load on the machine hits them alike): median, 20% and 80% quantile of the step time
after one warm-up call (``perf_counter``; CUDA-synchronised on a GPU); peak memory of one
untimed step above what was allocated before it (the inputs), and above the inputs and the
gradients (``x.grad``, ``W.grad``: what every provider must return). Memory: on CUDA
``torch.cuda.max_memory_allocated``; on the CPU the profiler's allocation events
(``torch.profiler.profile(profile_memory=True)``: every tensor allocation and free, also
inside custom operators and C++ extensions, summed in time order, maximised; ``tracemalloc``
cannot see torch's allocator and resident-set deltas are blurred by the allocator's caching).
Before timing, each provider's loss and gradients are checked against the float64 reference
composition (``ltkd_kernels.reference`` on ``hidden @ W.T`` in float64) on the first
``--check-rows`` rows.

Targets of the issue (reported, not asserted): CPU float32, ``H = 1024``, ``V = 32000``, KD and
LTKD, ``N = 2048`` and ``N = 8192`` (automatic chunk): peak memory above inputs and gradients
at most 1/8 of eager's, time at most 1.3x eager's, and the peak not growing with ``N``. The
GPU case: ``BT = 8192``, ``H = 4096``, ``V = 128256``, bfloat16.

    python -m benchmarks.linear                      # the CPU targets (minutes; eager at
                                                     # N = 8192 needs several GB)
    python -m benchmarks.linear --quick              # N = 2048, H = 256, V = 8192 (4 chunks): a minute
    python -m benchmarks.linear --device cuda        # the GPU case, as is
    python -m benchmarks.linear --losses kd --N 2048 --H 1024 --V 32000 --providers ltkd_kernels,eager
    python -m benchmarks.linear --json out.json      # the rows as JSON too

It also registers the case ``linear`` of ``python -m benchmarks.run`` (:mod:`benchmarks.cases`)
when that registry is importable.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ltkd_kernels import linear as L
from ltkd_kernels import reference

from . import eager

PROVIDERS = ("ltkd_kernels", "eager", "compile", "liger")
LOSSES = ("kd", "ltkd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPTIONS = {"kd": dict(temperature=2.0), "ltkd": dict(alpha=1.0, beta=1.0, temperature=2.0)}
GROUPS = 3

CPU_PLAN = [dict(N=2048, H=1024, V=32000, dtype="float32"),
            dict(N=8192, H=1024, V=32000, dtype="float32")]
CPU_QUICK = [dict(N=2048, H=256, V=8192, dtype="float32")]
CUDA_PLAN = [dict(N=8192, H=4096, V=128256, dtype="bfloat16")]
CUDA_QUICK = [dict(N=2048, H=2048, V=32000, dtype="bfloat16")]


@dataclass(frozen=True)
class LinearProblem:
    loss: str
    N: int
    H: int
    V: int
    dtype: str
    G: Optional[int] = None

    def label(self) -> str:
        return f"{self.loss} N={self.N} H={self.H} V={self.V} {self.dtype}"


# ---------------------------------------------------------------------------------------------
# Inputs and providers.

def make_inputs(problem: LinearProblem, device: torch.device, seed: int = 0) -> dict:
    """Hidden states ``(N, H)`` and heads ``(V, H)`` whose logits have a spread of a few units
    (as a trained LM head's), the teacher's the same shapes; random token-frequency groups."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[problem.dtype]
    N, H, V = problem.N, problem.H, problem.V

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    return dict(x=rand(N, H), w=rand(V, H, scale=3.0 / math.sqrt(H)),
                xt=rand(N, H), wt=rand(V, H, scale=4.0 / math.sqrt(H)),
                groups=torch.randint(GROUPS, (V,), generator=g, device=device))


def _eager_step(problem: LinearProblem):
    options = OPTIONS[problem.loss]

    def step(x, w, xt, wt, groups):
        logits = x @ w.t()
        with torch.no_grad():
            teacher = xt @ wt.t()
        if problem.loss == "kd":
            return eager.kd_loss(logits, teacher, temperature=options["temperature"])
        return eager.ltkd_loss(logits, teacher, groups, GROUPS, **options)

    return step


def _fused_step(problem: LinearProblem, backend: str = "auto", chunk_size=None):
    options = OPTIONS[problem.loss]

    def step(x, w, xt, wt, groups):
        if problem.loss == "kd":
            return L.fused_linear_kd_loss(x, w, xt, wt, chunk_size=chunk_size, backend=backend,
                                          **options)
        return L.fused_linear_ltkd_loss(x, w, xt, wt, groups, GROUPS, chunk_size=chunk_size,
                                        backend=backend, **options)

    return step


def _liger_step(problem: LinearProblem, device: torch.device):
    """Liger-Kernel's chunked ``LigerFusedLinearJSDLoss`` (``beta=0``, no hard loss); where it
    is missing, its Triton ``LigerFusedLinearJSD`` (``jsd_beta=0``, CUDA only)."""
    if problem.loss != "kd":
        raise RuntimeError("Liger-Kernel has no fused-linear LTKD")
    temperature = OPTIONS["kd"]["temperature"]
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        LigerFusedLinearJSDLoss = None
    if LigerFusedLinearJSDLoss is not None:
        module = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0,
                                         temperature=temperature)
        labels = {}

        def step(x, w, xt, wt, groups):
            if x.shape[0] not in labels:
                labels[x.shape[0]] = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            return module(x, w, xt, wt, labels[x.shape[0]], None, None)

        return step
    if device.type != "cuda":
        raise RuntimeError("liger-kernel is not installed (or its Triton kernels need CUDA)")
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError as error:
        raise RuntimeError(f"liger-kernel is not installed ({error})") from None
    module = LigerFusedLinearJSD(jsd_beta=0.0, temperature=temperature)

    def step(x, w, xt, wt, groups):
        return module(x, w, xt, wt)

    return step


def provider_step(name: str, problem: LinearProblem, device: torch.device) -> Callable:
    """``step(x, w, xt, wt, groups) -> loss`` of a provider; raises ``RuntimeError`` saying why
    it cannot run here."""
    if name == "ltkd_kernels":
        return _fused_step(problem)
    if name == "eager":
        return _eager_step(problem)
    if name == "compile":
        return torch.compile(_eager_step(problem), dynamic=False)
    if name == "liger":
        return _liger_step(problem, device)
    raise ValueError(f"unknown provider {name!r}")


# ---------------------------------------------------------------------------------------------
# Measurement.

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _leaves(inputs):
    x = inputs["x"].detach().requires_grad_()
    w = inputs["w"].detach().requires_grad_()
    return x, w


def full_step(step, inputs, x, w):
    """Forward and backward of one step; the gradients land in ``x.grad``, ``w.grad``."""
    x.grad = w.grad = None
    loss = step(x, w, inputs["xt"], inputs["wt"], inputs["groups"])
    loss.backward()
    return loss


@contextlib.contextmanager
def _quiet_stderr():
    """The CPU profiler prints start/stop lines on the native stderr: silence fd 2."""
    import os

    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """The most tensor bytes held at once during ``fn()`` above those held before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return peak


def check_against_reference(step, problem: LinearProblem, inputs, rows: int) -> Dict[str, float]:
    """Relative errors of the loss and of ``x.grad``, ``W.grad`` against the float64 reference
    (``hidden @ W.T`` in float64, then ``ltkd_kernels.reference``) on the first ``rows`` rows."""
    sub = dict(inputs, x=inputs["x"][:rows], xt=inputs["xt"][:rows])
    x, w = _leaves(sub)
    loss = full_step(step, sub, x, w)
    x64 = sub["x"].double().requires_grad_()
    w64 = sub["w"].double().requires_grad_()
    student = x64 @ w64.t()
    teacher = sub["xt"].double() @ sub["wt"].double().t()
    options = OPTIONS[problem.loss]
    if problem.loss == "kd":
        want = reference.kd_loss(student, teacher, **options)
    else:
        want = reference.ltkd_loss(student, teacher, sub["groups"], GROUPS, **options)
    want.backward()

    def rel(a, b):
        return (torch.linalg.vector_norm(a.double() - b) / torch.linalg.vector_norm(b)).item()

    return dict(loss_rel_err=abs(loss.item() - want.item()) / abs(want.item()),
                grad_rel_err=max(rel(x.grad, x64.grad), rel(w.grad, w64.grad)))


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run_problem(problem: LinearProblem, providers: Sequence[str], device: torch.device, *,
                reps: int = 5, check_rows: int = 64, log: Callable[[str], None] = print) -> List[dict]:
    """One row per provider: time, memory, errors, or why it did not run."""
    inputs = make_inputs(problem, device)
    element = torch.empty((), dtype=DTYPES[problem.dtype]).element_size()
    grad_bytes = (inputs["x"].numel() + inputs["w"].numel()) * element
    chunk = L.auto_chunk_size(problem.N, problem.V, problem.H, element)
    rows, steps = {}, {}
    for name in providers:
        row = dict(asdict(problem), provider=name, status="ok", median_ms=None, p20_ms=None,
                   p80_ms=None, reps=0, peak_mib=None, peak_above_grads_mib=None,
                   loss_rel_err=None, grad_rel_err=None, compile_s=None,
                   chunk=chunk if name == "ltkd_kernels" else None, note="")
        rows[name] = row
        try:
            step = provider_step(name, problem, device)
            if name == "compile":  # compile (and warm) once, untimed
                begin = time.perf_counter()
                x, w = _leaves(inputs)
                full_step(step, inputs, x, w)
                _sync(device)
                row["compile_s"] = time.perf_counter() - begin
            if name != "liger":
                errors = check_against_reference(step, problem, inputs,
                                                 min(check_rows, problem.N))
                row.update(errors)
                tolerance = 1e-4 if problem.dtype == "float32" else 2e-2
                if errors["loss_rel_err"] > tolerance or errors["grad_rel_err"] > tolerance:
                    row["status"] = "FAIL"
                    row["note"] = f"disagrees with the float64 reference (tolerance {tolerance})"
                    log(f"  {name}: FAIL {errors}")
                    continue
            else:
                row["note"] = "Liger JSD beta=0: timed, not checked"
            steps[name] = step
        except Exception as error:  # noqa: BLE001 - a provider that cannot run is reported
            row["status"] = "unavailable"
            row["note"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            log(f"  {name}: left out: {row['note']}")
    # Peak memory: one untimed step each (after a warm-up step).
    for name, step in steps.items():
        x, w = _leaves(inputs)
        full_step(step, inputs, x, w)
        x, w = _leaves(inputs)
        peak = peak_bytes(lambda: full_step(step, inputs, x, w), device)
        rows[name]["peak_mib"] = peak / 2 ** 20
        rows[name]["peak_above_grads_mib"] = (peak - grad_bytes) / 2 ** 20
        del x, w
    # Time: interleaved rounds, one call per provider per round, after one warm-up round.
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for round_index in range(reps + 1 if reps > 0 else 0):  # reps = 0: memory only
        for name, step in steps.items():
            x, w = _leaves(inputs)
            _sync(device)
            begin = time.perf_counter()
            full_step(step, inputs, x, w)
            _sync(device)
            if round_index > 0:
                times[name].append((time.perf_counter() - begin) * 1e3)
            del x, w
    for name, values in times.items():
        if not values:
            continue
        rows[name].update(median_ms=statistics.median(values), p20_ms=quantile(values, 0.2),
                          p80_ms=quantile(values, 0.8), reps=len(values))
    for name in providers:
        row = rows[name]
        if row["status"] == "ok":
            timed = "   (untimed)" if row["median_ms"] is None else f"{row['median_ms']:9.1f} ms"
            log(f"  {name:>12}: {timed}  peak {row['peak_mib']:8.1f} MiB "
                f"(above grads {row['peak_above_grads_mib']:8.1f} MiB)"
                + (f"  chunk {row['chunk']}" if row["chunk"] else ""))
    return list(rows.values())


# ---------------------------------------------------------------------------------------------
# Targets and the report.

def targets(rows: List[dict]) -> List[dict]:
    """The issue's targets per (loss, N): memory above inputs and gradients <= 1/8 of eager's,
    time <= 1.3x eager's; and ours not growing with N."""
    out = []
    index = {(r["loss"], r["N"], r["H"], r["V"], r["dtype"], r["provider"]): r for r in rows
             if r["status"] == "ok"}
    for (loss, N, H, V, dtype, provider), mine in sorted(index.items()):
        if provider != "ltkd_kernels":
            continue
        base = index.get((loss, N, H, V, dtype, "eager"))
        if base is None:
            continue
        memory = mine["peak_above_grads_mib"] / max(base["peak_above_grads_mib"], 1e-9)
        label = f"{loss} N={N} H={H} V={V} {dtype}"
        out.append(dict(name=f"{label}: peak above inputs+grads vs eager", value=memory,
                        target="<= 0.125", met=memory <= 0.125))
        if mine["median_ms"] and base["median_ms"]:
            speed = mine["median_ms"] / base["median_ms"]
            out.append(dict(name=f"{label}: time vs eager", value=speed, target="<= 1.3",
                            met=speed <= 1.3))
    by_loss: Dict[tuple, List[dict]] = {}
    for (loss, N, H, V, dtype, provider), mine in index.items():
        if provider == "ltkd_kernels":
            by_loss.setdefault((loss, H, V, dtype), []).append(mine)
    for (loss, H, V, dtype), mine in by_loss.items():
        if len(mine) > 1:
            mine.sort(key=lambda r: r["N"])
            growth = mine[-1]["peak_above_grads_mib"] / max(mine[0]["peak_above_grads_mib"], 1e-9)
            out.append(dict(name=f"{loss} H={H} V={V} {dtype}: peak above inputs+grads at "
                                 f"N={mine[-1]['N']} vs N={mine[0]['N']}", value=growth,
                            target="<= 1.1 (does not grow with N)", met=growth <= 1.1))
    return out


def markdown(rows: List[dict], device: torch.device) -> List[str]:
    lines = [f"Fused linear + loss, one training step (forward + backward of loss and matmuls), "
             f"{device.type}, torch {torch.__version__}, {torch.get_num_threads()} threads.", "",
             "| problem | provider | median ms (p20-p80) | peak above inputs MiB | above inputs+grads MiB | loss err | grad err | note |",
             "|---|---|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        problem = f"{r['loss']} N={r['N']} H={r['H']} V={r['V']} {r['dtype']}"
        if r["status"] != "ok":
            lines.append(f"| {problem} | {r['provider']} | {r['status']} | | | | | {r['note']} |")
            continue
        note = r["note"] + (f"chunk={r['chunk']}" if r["chunk"] else "") + (
            f"compile {r['compile_s']:.0f} s" if r["compile_s"] else "")
        err = lambda v: "" if v is None else f"{v:.1e}"  # noqa: E731
        timed = "untimed" if r["median_ms"] is None else (
            f"{r['median_ms']:.0f} ({r['p20_ms']:.0f}-{r['p80_ms']:.0f})")
        lines.append(f"| {problem} | {r['provider']} | {timed} | {r['peak_mib']:.0f} | "
                     f"{r['peak_above_grads_mib']:.0f} | {err(r['loss_rel_err'])} | "
                     f"{err(r['grad_rel_err'])} | {note} |")
    lines += ["", "| target | measured | wanted | met |", "|---|--:|---|---|"]
    for t in targets(rows):
        lines.append(f"| {t['name']} | {t['value']:.3g} | {t['target']} | {'yes' if t['met'] else 'NO'} |")
    return lines


def plan(device: torch.device, quick: bool, losses, N=None, H=None, V=None, dtype=None):
    sizes = (CUDA_QUICK if quick else CUDA_PLAN) if device.type == "cuda" else (
        CPU_QUICK if quick else CPU_PLAN)
    if any(v is not None for v in (N, H, V, dtype)):
        base = sizes[0]
        sizes = [dict(N=n, H=h, V=v, dtype=d)
                 for n in (N or [base["N"]]) for h in (H or [base["H"]])
                 for v in (V or [base["V"]]) for d in (dtype or [base["dtype"]])]
    return [LinearProblem(loss, s["N"], s["H"], s["V"], s["dtype"],
                          GROUPS if loss == "ltkd" else None) for s in sizes for loss in losses]


def run_benchmark(device: torch.device, *, quick=False, losses=LOSSES, providers=PROVIDERS,
                  reps=None, check_rows=64, N=None, H=None, V=None, dtype=None,
                  log: Callable[[str], None] = print) -> List[dict]:
    reps = (3 if quick else 5) if reps is None else reps
    rows = []
    for problem in plan(device, quick, losses, N, H, V, dtype):
        log(f"{problem.label()}:")
        rows += run_problem(problem, providers, device, reps=reps, check_rows=check_rows, log=log)
    return rows


def _csv(text, cast=str):
    return [cast(item) for item in text.split(",") if item]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.linear", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    p.add_argument("--losses", type=_csv, default=list(LOSSES), help="kd,ltkd")
    p.add_argument("--providers", type=_csv, default=list(PROVIDERS),
                   help=",".join(PROVIDERS))
    p.add_argument("--N", type=lambda s: _csv(s, int), default=None)
    p.add_argument("--H", type=lambda s: _csv(s, int), default=None)
    p.add_argument("--V", type=lambda s: _csv(s, int), default=None)
    p.add_argument("--dtype", type=_csv, default=None, help=",".join(DTYPES))
    p.add_argument("--reps", type=int, default=None, help="timed calls per provider (default 5, "
                   "3 with --quick; 0: peak memory only)")
    p.add_argument("--check-rows", type=int, default=64,
                   help="rows checked against the float64 reference")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default=None, help="also write the rows and targets here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = run_benchmark(device, quick=args.quick, losses=args.losses, providers=args.providers,
                         reps=args.reps, check_rows=args.check_rows, N=args.N, H=args.H, V=args.V,
                         dtype=args.dtype)
    print()
    print("\n".join(markdown(rows, device)))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(device=str(device), torch=torch.__version__, command=sys.argv,
                           threads=torch.get_num_threads(), rows=rows, targets=targets(rows)),
                      handle, indent=1)
    return 0


# ---------------------------------------------------------------------------------------------
# The case "linear" of python -m benchmarks.run (where that registry exists).

def _register_case():
    try:
        from .cases import CaseResult, case, target
        from .report import FIELDS
    except ImportError:
        return

    @case("linear", "fused linear + loss against eager matmul + loss (CPU: N=2048 and 8192, "
          "H=1024, V=32000 fp32, KD and LTKD; CUDA: BT=8192, H=4096, V=128256 bf16)",
          devices=("cpu", "cuda"))
    def run(ctx):
        names = {"ltkd_kernels": "cpu" if ctx.device.type == "cpu" else "triton"}
        losses = [l for l in ctx.option("losses", list(LOSSES)) if l in LOSSES]
        providers = [p for p in ctx.option("providers", list(PROVIDERS))
                     if p in PROVIDERS or p in ("cpu", "triton")]
        providers = ["ltkd_kernels" if p in ("cpu", "triton") else p for p in providers]
        raw = run_benchmark(ctx.device, quick=ctx.quick, losses=losses,
                            providers=list(dict.fromkeys(providers)), N=ctx.option("N", None),
                            V=ctx.option("V", None), dtype=ctx.option("dtype", None), log=ctx.log)
        rows = []
        for r in raw:
            row = {name: None for name in FIELDS}
            row.update(case="linear", loss=r["loss"], provider=names.get(r["provider"], r["provider"]),
                       mode="full", N=r["N"], V=r["V"], G=r["G"], dtype=r["dtype"],
                       status=r["status"], median_ms=r["median_ms"], p20_ms=r["p20_ms"],
                       p80_ms=r["p80_ms"], reps=r["reps"], peak_mem_mib=r["peak_mib"],
                       loss_rel_err=r["loss_rel_err"], grad_rel_err=r["grad_rel_err"],
                       compile_s=r["compile_s"], note=r["note"])
            row.update(H=r["H"], chunk=r["chunk"], peak_above_grads_mib=r["peak_above_grads_mib"])
            rows.append(row)
        return CaseResult(rows, targets=lambda _rows: [target(t["name"], t["value"], t["target"],
                                                               t["met"]) for t in targets(raw)],
                          sections=lambda _rows: markdown(raw, ctx.device))


_register_case()


if __name__ == "__main__":
    sys.exit(main())
