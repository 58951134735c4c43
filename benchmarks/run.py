"""Benchmark runner: every loss, every provider, side by side, in one run.

    python -m benchmarks.run --quick                       # < 2 minutes on 2 CPU cores
    python -m benchmarks.run                               # the full sweep (long on a CPU)
    python -m benchmarks.run --losses ltkd,kd --V 32000,128256 --N 256 --dtype float32,bfloat16
    python -m benchmarks.run --device cuda --out benchmarks/results/h100

For each problem (loss, N, V, G, dtype; N and D for SRW) and each provider (this package's
backends that can run and be timed here, the papers' eager code, ``torch.compile`` of it,
Liger-Kernel's KL divergence for KD on CUDA): one first call (forward + backward; its wall
time is the compile time for ``torch.compile``) whose loss and gradient are checked against
``ltkd_kernels.reference`` in float64 on the same inputs; a provider that disagrees is
reported FAIL and not timed. Then each mode (forward, backward, full) is timed (median and
20/80% quantiles, see :mod:`benchmarks.measure`) with its peak memory, achieved GB/s over the
bytes that must move, and the fraction of the bandwidth floor (those bytes over the copy
bandwidth measured at the start of the same run).

Writes ``results.csv``, ``results.json`` (rows plus device, versions, date, command, copy
bandwidth, skipped providers and why), ``summary.md`` and PNG plots into ``--out``.

Sweeps: given any of ``--V``, ``--N``, ``--G``, ``--dtype``, the run is their Cartesian
product (the others at their base value: N=256, V=32000, G=3, float32). Given none, the
default sweep is the union of one-dimensional sweeps around that base point (V from 1K to
256K, N, G for LTKD, dtype) rather than their product.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

import ltkd_kernels as lk

from . import measure
from .providers import (
    DTYPES,
    LOGIT_LOSSES,
    LOSSES,
    MODES,
    PROVIDERS,
    Problem,
    Unavailable,
    build,
    check,
    make_inputs,
    provider_unavailable_reason,
    reference_values,
    tolerances,
)

BASE = dict(N=256, V=32000, G=3, dtype="float32")
FULL_V = (1024, 4096, 16384, 32000, 65536, 128256, 151936, 262144)
FULL_N = (64, 256, 1024, 2048)
FULL_G = (2, 3, 8, 32)
FULL_DTYPE_V = (32000, 128256)
SRW_N = (1024, 4096, 16384, 65536, 262144)
SRW_D = 512
# The eager SRW builds the N x N similarity matrix: 4 N^2 bytes (1 GiB at N = 16384).
SRW_EAGER_MAX_N = 16384
# Float64 reference checks on at most this many logits (N x V); larger problems are checked
# on their first rows (the provider rerun on those rows): the float64 reference holds ~20
# N x V float64 tensors at its peak.
CHECK_MAX_ELEMENTS = 2 ** 25

QUICK_N = 64
QUICK_V = (1024, 32000, 128256)
QUICK_DETAIL_V = 32000  # the one size timed in every mode and with torch.compile
QUICK_SRW_N = (1024, 4096)

RESULT_FIELDS = (
    "loss", "provider", "mode", "N", "V", "G", "D", "dtype", "status", "median_ms", "p20_ms",
    "p80_ms", "reps", "peak_mem_mib", "floor_bytes", "floor_ms", "gb_per_s", "fraction_of_floor",
    "loss_rel_err", "grad_rel_err", "check_rows", "compile_s", "input_sets",
    "inputs_fit_in_cache", "note",
)


@dataclass
class Task:
    """One problem with the modes and providers to run on it."""

    problem: Problem
    modes: Sequence[str]
    providers: Sequence[str]


@dataclass
class Settings:
    warmup: int = 1
    min_reps: int = 5
    max_reps: int = 50
    budget_s: float = 1.0
    check_max_elements: int = CHECK_MAX_ELEMENTS
    progress: bool = True


def _csv_list(text: str, cast=str) -> List:
    return [cast(item.strip()) for item in text.split(",") if item.strip()]


def _size(text: str) -> int:
    """``32000``, ``32K`` (= 32 * 1024), ``1e6``."""
    text = text.strip()
    scale = {"K": 1024, "M": 1024 ** 2}.get(text[-1:].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def plan(args, device: torch.device) -> List[Task]:
    """The list of tasks for the command line (``--quick``, explicit lists, or the default)."""
    losses = args.losses
    providers = args.providers
    modes = args.modes
    tasks: List[Task] = []

    def add(problem: Problem, task_modes=None, task_providers=None):
        if problem.loss not in losses:
            return
        task_modes = [m for m in (task_modes or modes) if m in modes]
        if problem.loss == "srw":
            task_modes = ["forward"]  # SRW's weights carry no gradient
        task_providers = [p for p in (task_providers or providers) if p in providers]
        if task_modes and task_providers:
            tasks.append(Task(problem, task_modes, task_providers))

    explicit = any(x is not None for x in (args.V, args.N, args.G, args.dtype))
    if args.quick and not explicit:
        no_compile = [p for p in providers if p != "compile"]
        for loss in LOGIT_LOSSES:
            for V in QUICK_V:
                problem = Problem(loss, QUICK_N, V, 3 if loss == "ltkd" else None, "float32")
                if V == QUICK_DETAIL_V:
                    add(problem, MODES, providers)
                else:
                    add(problem, ["full"], no_compile)
        for N in QUICK_SRW_N:
            add(Problem("srw", N, None, None, "float32", D=args.D or SRW_D))
        return tasks
    if explicit:
        Vs = args.V or [BASE["V"]]
        Ns = args.N or [BASE["N"]]
        Gs = args.G or [BASE["G"]]
        dtypes = args.dtype or [BASE["dtype"]]
        seen = set()
        for loss in LOSSES:
            for dtype in dtypes:
                for N in Ns:
                    if loss == "srw":
                        problem = Problem("srw", N, None, None, dtype, D=args.D or SRW_D)
                        if problem not in seen:
                            seen.add(problem)
                            add(problem)
                        continue
                    for V in Vs:
                        for G in (Gs if loss == "ltkd" else [None]):
                            problem = Problem(loss, N, V, G, dtype)
                            if problem not in seen:
                                seen.add(problem)
                                add(problem)
        return tasks
    # The default sweep: one-dimensional sweeps around the base point, without repeats.
    seen = set()

    def add_once(problem):
        if problem not in seen:
            seen.add(problem)
            add(problem)

    for loss in LOGIT_LOSSES:
        G = BASE["G"] if loss == "ltkd" else None
        for V in FULL_V:
            add_once(Problem(loss, BASE["N"], V, G, BASE["dtype"]))
        for N in FULL_N:
            add_once(Problem(loss, N, BASE["V"], G, BASE["dtype"]))
        if loss == "ltkd":
            for G_ in FULL_G:
                add_once(Problem(loss, BASE["N"], BASE["V"], G_, BASE["dtype"]))
        for dtype in DTYPES:
            for V in FULL_DTYPE_V:
                add_once(Problem(loss, BASE["N"], V, G, dtype))
    for N in SRW_N:
        add_once(Problem("srw", N, None, None, "float32", D=args.D or SRW_D))
    return tasks


def _empty_row(problem: Problem, provider: str, mode: str) -> Dict:
    row = {name: None for name in RESULT_FIELDS}
    row.update(loss=problem.loss, provider=provider, mode=mode, N=problem.N, V=problem.V,
               G=problem.G, D=problem.D, dtype=problem.dtype, note="")
    return row


def _rotated_sets(inputs, count: int):
    """``count`` input sets in distinct memory: set 0 and row-rolled copies of it (cheap to
    make; the values are real data, only their row order differs)."""
    first = inputs.sets[0]
    sets = [first]
    for i in range(1, count):
        shift = (i * first[0].shape[0]) // count
        sets.append(tuple(t.roll(shift, dims=0).contiguous() for t in first))
    inputs.sets = sets


def _input_set_count(inputs, device: torch.device) -> int:
    """On the CPU, enough input sets to pass twice the last-level cache, at most 8 (on CUDA
    the timer flushes the L2 cache instead)."""
    if device.type == "cuda":
        return 1
    llc = measure.last_level_cache_bytes() or 0
    return max(1, min(8, math.ceil(2 * llc / max(inputs.set_bytes, 1))))


def _check_subset(problem: Problem, inputs, rows: int):
    """The first ``rows`` rows of ``problem``'s inputs (set 0), as a problem of its own."""
    from .providers import Inputs

    sub_problem = Problem(problem.loss, rows, problem.V, problem.G, problem.dtype, problem.D)
    extras = dict(inputs.extras)
    if "target" in extras:
        extras["target"] = extras["target"][:rows]
    return sub_problem, Inputs(sets=[tuple(t[:rows] for t in inputs.sets[0])], extras=extras)


def _leaves(problem: Problem, inputs):
    """Per input set, the student logits as a leaf that requires grad (shared by providers:
    each call resets its gradient)."""
    if problem.loss == "srw":
        return None
    return [s[0].detach().clone().requires_grad_(True) for s in inputs.sets]


def _mode_callables(fn, problem: Problem, inputs, leaves, mode: str):
    """``(setup, region)`` for :func:`measure.time_interleaved`."""
    sets = inputs.sets

    if problem.loss == "srw":
        def setup(i):
            return sets[i % len(sets)]

        def region(state):
            fn(state[0])

        return setup, region

    def pick(i):
        k = i % len(sets)
        leaves[k].grad = None  # a fresh gradient each call, as in a training step
        return leaves[k], sets[k][1]

    if mode == "forward":
        def region(state):
            fn(*state)
        return pick, region
    if mode == "full":
        def region(state):
            fn(*state).backward()
        return pick, region

    def setup_backward(i):
        student, teacher = pick(i)
        return fn(student, teacher)

    def region_backward(loss):
        loss.backward()

    return setup_backward, region_backward


def _first_call_mode(problem: Problem) -> str:
    return "forward" if problem.loss == "srw" else "full"


def _error_text(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _first_call(fn, problem: Problem, inputs, device: torch.device, track_memory: bool):
    """The first call (forward and backward; SRW: forward) on set 0.

    Returns ``(seconds, peak_bytes or None, loss or weights, grad)``. With ``track_memory`` the
    call runs under the memory tracker (the seconds then include the tracker's overhead), so
    it doubles as the warm-up of mode ``full`` (SRW: ``forward``).
    """
    tensors = inputs.sets[0]
    student = None if problem.loss == "srw" else tensors[0].detach().clone().requires_grad_(True)
    tracker = measure.memory_tracker(device)
    start = time.perf_counter()
    with (tracker.track() if track_memory else contextlib.nullcontext()):
        if problem.loss == "srw":
            out = fn(tensors[0])
        else:
            out = fn(student, tensors[1])
            out.backward()
        measure.synchronize(device)
    seconds = time.perf_counter() - start
    return (seconds, tracker.peak_bytes if track_memory else None, out.detach(),
            None if student is None else student.grad)


def run_task(task: Task, device: torch.device, settings: Settings, bandwidth_gbps: float,
             log) -> List[Dict]:
    """All providers and modes of one problem; one row per (provider, mode)."""
    from .providers import relative_error

    problem = task.problem
    rows: List[Dict] = []
    inputs = make_inputs(problem, device)
    _rotated_sets(inputs, _input_set_count(inputs, device))
    llc = measure.last_level_cache_bytes()
    fits_in_cache = (device.type == "cpu" and llc is not None
                     and inputs.set_bytes * len(inputs.sets) <= llc)
    elements = problem.N * (problem.V or problem.D)
    check_rows = problem.N
    if problem.loss != "srw" and elements > settings.check_max_elements:
        check_rows = max(1, settings.check_max_elements // problem.V)
    if check_rows < problem.N:
        check_problem, check_inputs = _check_subset(problem, inputs, check_rows)
    else:
        check_problem, check_inputs = problem, inputs
    reference = reference_values(check_problem, check_inputs)
    loss_tol, grad_tol = tolerances(problem.dtype)

    # Every provider is built and checked first; those that agree with the reference are then
    # timed together, mode by mode, one call of each in turn (measure.time_interleaved).
    checked = {}
    first_call_peaks = {}  # the first call warmed mode "full" (SRW: "forward") up
    for provider in task.providers:
        base = dict(check_rows=check_rows, input_sets=len(inputs.sets),
                    inputs_fit_in_cache=fits_in_cache)
        if (problem.loss == "srw" and provider in ("eager", "compile")
                and problem.N > SRW_EAGER_MAX_N):
            # Not a failure: the paper's N x N matrix would not fit in a sane budget.
            log(f"  {problem.label()}: {provider} left out (N x N matrix, N > {SRW_EAGER_MAX_N})")
            continue
        try:
            if check_problem is not problem:
                # Checked on the first rows first, so that a compiled provider's timed shape
                # is compiled last (and its compile time measured) below.
                checker = build(provider, check_problem, check_inputs.extras, device)
                ok, loss_err, grad_err, _ = check(checker.fn, check_problem, check_inputs,
                                                  reference, device)
                del checker
            built = build(provider, problem, inputs.extras, device)
            # The first call of torch.compile compiles: timed, so not under the tracker.
            seconds, first_peak, out, grad = _first_call(built.fn, problem, inputs, device,
                                                         track_memory=provider != "compile")
            if check_problem is problem:
                if problem.loss == "srw":
                    loss_err, grad_err = relative_error(out, reference["weights"]), None
                    ok = not math.isnan(loss_err) and loss_err <= loss_tol
                else:
                    loss_err = relative_error(out, reference["loss"])
                    grad_err = relative_error(grad, reference["grad"])
                    ok = (not math.isnan(loss_err) and not math.isnan(grad_err)
                          and loss_err <= loss_tol and grad_err <= grad_tol)
            del out, grad
        except Unavailable as reason:
            log(f"  {problem.label()}: {provider} unavailable: {reason}")
            continue
        except Exception as error:  # noqa: BLE001  (report the failure, go on with the rest)
            message = _error_text(error)
            log(f"  {problem.label()}: {provider} ERROR {message}")
            for mode in task.modes:
                row = _empty_row(problem, provider, mode)
                row.update(base, status="ERROR", note=message[:300])
                rows.append(row)
            continue
        compile_s = seconds if provider == "compile" else None
        if not ok:
            log(f"  {problem.label()}: {provider} FAIL loss rel err {loss_err:.2e}"
                + (f", grad rel err {grad_err:.2e}" if grad_err is not None else "")
                + f" (tolerances {loss_tol:.0e}, {grad_tol:.0e}): not timed")
            for mode in task.modes:
                row = _empty_row(problem, provider, mode)
                row.update(base, status="FAIL", loss_rel_err=loss_err, grad_rel_err=grad_err,
                           compile_s=compile_s,
                           note="disagrees with the float64 reference: not timed")
                rows.append(row)
            continue
        checked[provider] = (built, dict(base, loss_rel_err=loss_err, grad_rel_err=grad_err,
                                         compile_s=compile_s))
        if provider != "compile":
            first_call_peaks[provider] = first_peak

    leaves = _leaves(problem, inputs)
    for mode in task.modes:
        candidates = {provider: _mode_callables(built.fn, problem, inputs, leaves, mode)
                      for provider, (built, _) in checked.items()}
        results = measure.time_interleaved(
            candidates, device, warmup=settings.warmup, min_reps=settings.min_reps,
            max_reps=settings.max_reps, budget_s=settings.budget_s,
            warmed=first_call_peaks if mode == _first_call_mode(problem) else None)
        for provider, result in results.items():
            row = _empty_row(problem, provider, mode)
            row.update(checked[provider][1])
            if isinstance(result, Exception):
                message = _error_text(result)
                log(f"  {problem.label()}: {provider} {mode} ERROR {message}")
                row.update(status="ERROR", note=message[:300])
                rows.append(row)
                continue
            timing, peak = result
            floor_bytes = problem.floor_bytes(mode)
            floor_ms = floor_bytes / (bandwidth_gbps * 1e9) * 1e3
            row.update(status="ok", median_ms=timing.median_ms, p20_ms=timing.p20_ms,
                       p80_ms=timing.p80_ms, reps=timing.reps,
                       peak_mem_mib=None if peak is None else peak / 2 ** 20,
                       floor_bytes=floor_bytes, floor_ms=floor_ms,
                       gb_per_s=floor_bytes / (timing.median_ms / 1e3) / 1e9,
                       fraction_of_floor=floor_ms / timing.median_ms)
            rows.append(row)
        del candidates, results
    del checked, leaves, inputs, reference
    gc.collect()
    order = {p: i for i, p in enumerate(task.providers)}
    rows.sort(key=lambda r: (order[r["provider"]], MODES.index(r["mode"])))
    return rows


def _format(value, spec):
    return "" if value is None else format(value, spec)


def print_table(rows: List[Dict], stream=sys.stdout) -> None:
    """A plain-text table of every row (the last thing a run prints)."""
    header = ("loss", "N", "V/D", "G", "dtype", "mode", "provider", "status", "median ms",
              "20%-80% ms", "peak MiB", "GB/s", "floor", "max rel err")
    table = [header]
    for r in rows:
        errs = [e for e in (r["loss_rel_err"], r["grad_rel_err"]) if e is not None]
        table.append((
            r["loss"], str(r["N"]), str(r["V"] if r["V"] is not None else r["D"]),
            "" if r["G"] is None else str(r["G"]), r["dtype"], r["mode"], r["provider"],
            r["status"], _format(r["median_ms"], ".3f"),
            "" if r["p20_ms"] is None else f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}",
            _format(r["peak_mem_mib"], ".1f"), _format(r["gb_per_s"], ".2f"),
            "" if r["fraction_of_floor"] is None else f"{100 * r['fraction_of_floor']:.1f}%",
            f"{max(errs):.1e}" if errs else "",
        ))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for k, line in enumerate(table):
        stream.write("  ".join(cell.rjust(w) if 7 < i < 14 or i in (1, 2, 3) else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(line, widths))).rstrip() + "\n")
        if k == 0:
            stream.write("  ".join("-" * w for w in widths) + "\n")


def write_results(out_dir: str, rows: List[Dict], metadata: Dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(metadata=metadata, results=rows), f, indent=1, default=str)
        f.write("\n")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Time LTKD, KD, DKD, BKD and SRW for every provider side by side.")
    parser.add_argument("--quick", action="store_true",
                        help=f"small sweep (N={QUICK_N}, V in {list(QUICK_V)}, G=3, float32; every "
                             f"mode and torch.compile at V={QUICK_DETAIL_V} only; SRW at N in "
                             f"{list(QUICK_SRW_N)}); under 2 minutes on 2 CPU cores")
    parser.add_argument("--losses", type=_csv_list, default=list(LOSSES),
                        help=f"comma-separated subset of {','.join(LOSSES)}")
    parser.add_argument("--providers", type=_csv_list, default=list(PROVIDERS),
                        help=f"comma-separated subset of {','.join(PROVIDERS)} (those that cannot "
                             f"run here are left out and the run says why)")
    parser.add_argument("--modes", type=_csv_list, default=list(MODES),
                        help="comma-separated subset of forward,backward,full")
    parser.add_argument("--V", type=lambda s: _csv_list(s, _size), default=None,
                        help="vocabulary sizes, e.g. 1024,32000,128256,151936 (32K = 32768)")
    parser.add_argument("--N", type=lambda s: _csv_list(s, _size), default=None,
                        help="rows (tokens / samples) per batch; for SRW the batch size")
    parser.add_argument("--G", type=lambda s: _csv_list(s, int), default=None,
                        help="LTKD group counts")
    parser.add_argument("--dtype", type=_csv_list, default=None,
                        help=f"logit dtypes: {','.join(DTYPES)}")
    parser.add_argument("--D", type=int, default=None, help=f"SRW feature size (default {SRW_D})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--out", default=None,
                        help="output folder (default benchmarks/results/<device>-<quick|full>)")
    parser.add_argument("--reps", type=int, default=None,
                        help="minimum timed calls per measurement (default 3 quick, 5 otherwise)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed calls per measurement before stopping (after the "
                             "minimum; default 0.1 quick, 1.0 otherwise)")
    parser.add_argument("--check-max-elements", type=int, default=CHECK_MAX_ELEMENTS,
                        help="check against the float64 reference on all rows up to this N x V; "
                             "larger problems are checked on their first rows")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: torch's own choice)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name, allowed in (("losses", LOSSES), ("providers", PROVIDERS), ("modes", MODES)):
        unknown = [x for x in getattr(args, name) if x not in allowed]
        if unknown:
            parser.error(f"--{name}: unknown {unknown}; expected a subset of {','.join(allowed)}")
    if args.dtype:
        unknown = [x for x in args.dtype if x not in DTYPES]
        if unknown:
            parser.error(f"--dtype: unknown {unknown}; expected a subset of {','.join(DTYPES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start_wall = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    name = f"{device.type}-{'quick' if args.quick else 'full'}"
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    settings = Settings(
        warmup=1,
        min_reps=args.reps or (3 if args.quick else 5),
        max_reps=20 if args.quick else 50,
        budget_s=args.budget if args.budget is not None else (0.1 if args.quick else 1.0),
        check_max_elements=args.check_max_elements,
        progress=not args.no_progress,
    )
    tasks = plan(args, device)
    if not tasks:
        print("nothing to run for these options", file=sys.stderr)
        return 2

    if args.threads:
        torch.set_num_threads(args.threads)
    # The C++ backend compiles itself on first use (then loads from a cache): pay and report
    # that once here, outside every timing.
    build_start = time.perf_counter()
    cpu_reason = lk.unavailable_reason("cpu") if "cpu" in args.providers else "not requested"
    cpu_first_use_s = time.perf_counter() - build_start
    skipped: Dict[str, str] = {}
    losses = sorted({t.problem.loss for t in tasks}, key=LOSSES.index)
    for provider in args.providers:
        reasons = {loss: provider_unavailable_reason(provider, loss, device) for loss in losses}
        if all(r is not None for r in reasons.values()):
            skipped[provider] = "; ".join(sorted(set(reasons.values())))
        else:
            for loss, reason in reasons.items():
                if reason is not None:
                    skipped[f"{provider} ({loss})"] = reason
    for provider, reason in skipped.items():
        print(f"provider {provider}: left out: {reason}")
    for task in tasks:
        task.providers = [p for p in task.providers
                          if p not in skipped and f"{p} ({task.problem.loss})" not in skipped]

    info = measure.device_info(device)
    print(f"device: {info['name']}; torch {torch.__version__}; {len(tasks)} problems; "
          f"C++ backend first use {cpu_first_use_s:.1f} s")
    probe_start = measure.parallel_stall_probe(device)
    if probe_start is not None and probe_start["median_ms"] > 1.0:
        print(f"warning: the machine is busy: a 4 MiB fill_ over {probe_start['threads']} threads "
              f"takes {probe_start['median_ms']:.1f} ms (tens of microseconds when idle); small "
              f"ops will stall and the timings will say more about the load than the code")
    bandwidth, bandwidth_details = measure.copy_bandwidth(device)
    print(f"copy bandwidth: {bandwidth:.2f} GB/s (bytes read + written, "
          f"{bandwidth_details['copy_source_bytes'] / 2 ** 20:.0f} MiB copy, median of "
          f"{bandwidth_details['reps']})")

    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is optional
        tqdm = None
    bar = (tqdm(total=sum(len(t.providers) for t in tasks), unit="provider", dynamic_ncols=True)
           if tqdm is not None and settings.progress else None)
    log = bar.write if bar is not None else print
    messages: List[str] = []

    def log_and_keep(message):
        messages.append(message.strip())
        log(message)

    rows: List[Dict] = []
    task_seconds = []
    for task in tasks:
        if bar is not None:
            bar.set_description(task.problem.label())
        task_start = time.perf_counter()
        rows.extend(run_task(task, device, settings, bandwidth, log_and_keep))
        task_seconds.append(dict(problem=task.problem.label(),
                                 seconds=round(time.perf_counter() - task_start, 2)))
        if bar is not None:
            bar.update(len(task.providers))
    if bar is not None:
        bar.close()

    bandwidth_end, bandwidth_end_details = measure.copy_bandwidth(device)
    probe_end = measure.parallel_stall_probe(device)
    wall_s = time.perf_counter() - start_wall
    info["load_average_at_end"] = ([round(x, 2) for x in os.getloadavg()]
                                   if hasattr(os, "getloadavg") else None)
    metadata = dict(
        name=os.path.basename(os.path.normpath(out_dir)),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python -m benchmarks.run " + " ".join(shlex.quote(a) for a in
                                                       (sys.argv[1:] if argv is None else argv)),
        device=info,
        versions=measure.versions(),
        copy_bandwidth_gb_per_s=bandwidth,
        copy_bandwidth_start=bandwidth_details,
        copy_bandwidth_end=bandwidth_end_details,
        parallel_stall_probe=dict(start=probe_start, end=probe_end,
                                  note="median time of a 4 MiB fill_ (an OpenMP region over "
                                       "all threads): tens of microseconds on an idle machine, "
                                       "milliseconds when other processes hold the cores"),
        floor="bytes that must move: forward 2 N V s, backward 3 N V s, full 5 N V s "
              "(s = bytes per logit); SRW N D s. floor_ms = bytes / copy bandwidth at the start",
        timing=dict(warmup=settings.warmup, min_reps=settings.min_reps,
                    max_reps=settings.max_reps, budget_s=settings.budget_s,
                    statistic="median and 20%/80% quantiles of per-call times"),
        peak_memory=("CUDA: max_memory_allocated - memory_allocated at the start of one call"
                     if device.type == "cuda" else
                     "CPU: peak of the running sum of tensor allocations and frees recorded by "
                     "torch.profiler (profile_memory=True) during one warm-up call, above what "
                     "was held before it; tensors only"),
        check=dict(reference="ltkd_kernels.reference in float64 on the same inputs",
                   tolerances={d: dict(zip(("loss", "grad"), tolerances(d))) for d in DTYPES},
                   check_max_elements=settings.check_max_elements),
        providers_left_out=skipped,
        cpu_backend=dict(unavailable_reason=cpu_reason,
                         first_use_s=round(cpu_first_use_s, 2),
                         note="ltkd_kernels' C++ backend compiles on first use, then loads "
                              "from its cache; first_use_s is that step in this run"),
        task_seconds=task_seconds,
        messages=messages,
        wall_s=wall_s,  # from the start of main() to the last file written
    )
    if args.quick:
        metadata["quick"] = (f"N={QUICK_N}, V in {list(QUICK_V)}, G=3, float32, mode full; "
                             f"forward and backward, and torch.compile, at V={QUICK_DETAIL_V} "
                             f"only; SRW at N in {list(QUICK_SRW_N)}, D={args.D or SRW_D}")
    write_results(out_dir, rows, metadata)  # first, so that a failing plot loses nothing
    from . import plots

    written = ["results.csv", "results.json", "summary.md"]
    if not args.no_plots:
        written += plots.write_plots(rows, metadata, out_dir)
    metadata["wall_s"] = wall_s = time.perf_counter() - start_wall
    write_results(out_dir, rows, metadata)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(plots.summary_markdown(rows, metadata))
    print()
    print_table(rows)
    print(f"\ncopy bandwidth {bandwidth:.2f} GB/s at the start, {bandwidth_end:.2f} GB/s at the end")
    if probe_start is not None:
        print(f"parallel stall probe (4 MiB fill_): {probe_start['median_ms']:.3f} ms at the start, "
              f"{probe_end['median_ms']:.3f} ms at the end; load average "
              f"{info.get('load_average_at_start')} -> {info.get('load_average_at_end')}")
    print(f"wrote {', '.join(written)} to {out_dir}")
    print(f"wall time {wall_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
