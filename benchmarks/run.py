"""The benchmark harness: every case, every provider, side by side, in one run.

    python -m benchmarks.run --quick                    # every case, small; < 3 min on 2 cores
    python -m benchmarks.run --out benchmarks/results/cpu   # every case: the committed results
    python -m benchmarks.run --case classification --out benchmarks/results/cpu
    python -m benchmarks.run --case lm --losses ltkd,kd --V 32000,128256 --N 256 --dtype bfloat16
    python -m benchmarks.run --list                     # the cases and what each measures

Cases (:mod:`benchmarks.cases`; ``--list``): ``classification``, ``lm``, ``topk``,
``launches``, ``srw``, and the fused-linear and distributed benchmarks where present. Each
writes ``<out>/<case>/results.csv``, ``results.json`` (rows plus device, versions, git commit,
date, command, copy bandwidth, stall probe, providers left out and why), ``summary.md``
(targets, the case's tables, median time · peak memory per provider, speed-ups) and its
plots. Without ``--out`` the run writes under ``benchmarks/results/tmp/`` (ignored by git).

Every provider of a problem is first checked against ``ltkd_kernels.reference`` in float64
(a provider that disagrees is reported FAIL, not timed), then timed (see
:mod:`benchmarks.measure` and :mod:`benchmarks.sweep`).
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
import traceback
from typing import Dict, List

import torch

import ltkd_kernels as lk
from ltkd_kernels import cpu as ltkd_cpu

from . import cases as registry
from . import measure
from .inputs import DTYPES, LOSSES, MODES
from .providers import PROVIDERS, tolerances
from .report import (add_speedups, format_table, metadata_lines, pivot, targets_lines,
                     write_results)
from .sweep import Context, Settings

HERE = os.path.dirname(os.path.abspath(__file__))


def _csv_list(text: str, cast=str) -> List:
    return [cast(item.strip()) for item in text.split(",") if item.strip()]


def _size(text: str) -> int:
    """``32000``, ``32K`` (= 32 * 1024), ``1e6``."""
    text = text.strip()
    scale = {"K": 1024, "M": 1024 ** 2}.get(text[-1:].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                description="Benchmark the package's losses against eager "
                                            "PyTorch, torch.compile and peers, case by case.")
    p.add_argument("--case", type=_csv_list, default=None,
                   help="comma-separated cases (default: every case for the device; --list)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--quick", action="store_true", help="each case's small plan (minutes)")
    p.add_argument("--out", default=None, help="output folder, one sub-folder per case (default "
                   "benchmarks/results/tmp/<device>-<quick|full>, ignored by git)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--losses", type=_csv_list, default=None, help=f"subset of {','.join(LOSSES)}")
    p.add_argument("--providers", type=_csv_list, default=None,
                   help=f"subset of {','.join(PROVIDERS)} (default: each case's own)")
    p.add_argument("--modes", type=_csv_list, default=None, help="subset of forward,backward,full")
    p.add_argument("--V", type=lambda s: _csv_list(s, _size), default=None,
                   help="vocabulary sizes, e.g. 1024,32000,128256 (32K = 32768)")
    p.add_argument("--N", type=lambda s: _csv_list(s, _size), default=None, help="rows per batch")
    p.add_argument("--G", type=lambda s: _csv_list(s, int), default=None, help="LTKD group counts")
    p.add_argument("--dtype", type=_csv_list, default=None, help=f"subset of {','.join(DTYPES)}")
    p.add_argument("--D", type=int, default=None, help="SRW feature size (default 256)")
    p.add_argument("--reps", type=int, default=None, help="minimum timed calls per measurement "
                   "(default 3 with --quick, else 5)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed calls per "
                   "measurement after the minimum (default 0.1 with --quick, else 1.0)")
    p.add_argument("--check-max-elements", type=int, default=None,
                   help="float64 check on all rows up to this N x V, on the first rows above")
    p.add_argument("--time-limit", type=float, default=None, help="seconds from the start after "
                   "which torch.compile is left out of the remaining problems")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def parse_args(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    checks = (("losses", LOSSES), ("providers", PROVIDERS), ("modes", MODES),
              ("dtype", tuple(DTYPES)))
    for name, allowed in checks:
        unknown = [x for x in (getattr(args, name) or []) if x not in allowed]
        if unknown:
            parser.error(f"--{name}: unknown {unknown}; expected a subset of {','.join(allowed)}")
    known = registry.load()
    unknown = [c for c in (args.case or []) if c not in known]
    if unknown:
        parser.error(f"--case: unknown {unknown}; expected some of {','.join(known)}")
    return args


def select_cases(args, device: torch.device) -> List[registry.Case]:
    known = registry.load()
    if args.case:
        return [known[name] for name in args.case]
    return [c for c in known.values() if c.default and device.type in c.devices]


def make_settings(args, start: float) -> Settings:
    settings = Settings(warmup=1, min_reps=args.reps or (3 if args.quick else 5),
                        max_reps=20 if args.quick else 50,
                        budget_s=args.budget if args.budget is not None else
                        (0.1 if args.quick else 1.0))
    if args.check_max_elements:
        settings.check_max_elements = args.check_max_elements
    if args.time_limit is not None:
        settings.deadline = start + args.time_limit
    return settings


def environment(device: torch.device) -> Dict:
    """The state of the machine now: stall probe and copy bandwidth (GB/s, details)."""
    probe = measure.parallel_stall_probe(device)
    bandwidth, details = measure.copy_bandwidth(device)
    return dict(probe=probe, bandwidth=bandwidth, details=details)


def _metadata(case, ctx: Context, run: Dict, before: Dict, after: Dict, wall_s: float) -> Dict:
    info = dict(run["device_info"])
    info["load_average_at_end"] = ([round(x, 2) for x in os.getloadavg()]
                                   if hasattr(os, "getloadavg") else None)
    return dict(
        name=case.name, case=case.name, summary=case.summary, quick=ctx.quick,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=run["command"], device=info, versions=run["versions"],
        copy_bandwidth=dict(start_gb_per_s=before["bandwidth"], end_gb_per_s=after["bandwidth"],
                            start=before["details"], end=after["details"]),
        parallel_stall_probe=dict(start=before["probe"], end=after["probe"]),
        floor="bytes that must move (dense teacher: forward 2 N V s, backward 3 N V s, full "
              "5 N V s; s = bytes per logit; SRW: N D s) / copy bandwidth at the case's start",
        timing=dict(vars(ctx.settings), statistic="median and 20%/80% quantiles of per-call times"),
        peak_memory=("CUDA: max_memory_allocated - memory_allocated at the start of one call"
                     if ctx.device.type == "cuda" else
                     "CPU: peak of the running sum of tensor allocations and frees recorded by "
                     "torch.profiler (profile_memory=True) during one untimed call, above what "
                     "was held before it; tensors only"),
        check=dict(reference="ltkd_kernels.reference in float64 on the same inputs",
                   tolerances={d: dict(zip(("loss", "grad"), tolerances(d))) for d in DTYPES}),
        providers_left_out=ctx.left_out, cpu_backend=run["cpu_backend"], messages=ctx.messages,
        wall_s=wall_s)


def summary_markdown(result, rows: List[Dict], metadata: Dict) -> str:
    """``summary.md`` of one case: the run, the targets, the case's sections, then per mode
    the median time · peak memory of every provider and (full) the fraction of the floor."""
    lines = [f"# {metadata['case']}: {metadata['summary']}", ""] + metadata_lines(metadata) + [""]
    lines += targets_lines(result.targets(rows) if result.targets else [])
    lines += list(result.sections(rows)) if result.sections else []
    timed = [r for r in rows if r.get("median_ms") is not None or r["status"] in ("FAIL", "ERROR")]
    for mode in MODES:
        mode_rows = [r for r in timed if r["mode"] == mode]
        if mode_rows:
            lines += [f"## {mode}: median time · peak memory above the inputs", ""]
            lines += pivot(mode_rows, mode) + [""]
    full = [r for r in timed if r["mode"] == "full" and r.get("fraction_of_floor")]
    if full:
        lines += ["## full: achieved GB/s (fraction of the copy-bandwidth floor)", ""]
        lines += pivot(full, "full", "bandwidth") + [""]
    hosted = [r for r in timed if r["mode"] == "full" and r.get("host_ms") is not None]
    if hosted:
        lines += ["## full: host time per call (the bound of a step run without CUDA graphs)", "",
                  "The times above are the device's, the host's launching hidden by a spin "
                  "queued before each call (benchmarks/measure.py); this is the host's.", ""]
        lines += pivot(hosted, "full", "host") + [""]
    if metadata.get("messages"):
        lines += ["## Messages of the run", ""] + [f"- {m}" for m in metadata["messages"]]
    return "\n".join(lines) + "\n"


def run_case(case, ctx: Context, out_dir: str, run: Dict, before: Dict, no_plots: bool):
    """Run one case and write its files; returns ``(rows, metadata, environment after it)``."""
    start = time.perf_counter()
    result = case.run(ctx)
    rows = result.rows
    add_speedups(rows)
    after = environment(ctx.device)
    metadata = _metadata(case, ctx, run, before, after, time.perf_counter() - start)
    metadata.update(result.metadata)
    if result.targets:
        metadata["targets"] = result.targets(rows)
    write_results(out_dir, rows, metadata)  # first, so that a failing plot loses nothing
    written = ["results.csv", "results.json", "summary.md"]
    if result.plots and rows and not no_plots:
        try:
            written += result.plots(rows, metadata, out_dir)
        except Exception as error:  # noqa: BLE001  (a plot never loses the numbers)
            ctx.note(f"plots failed: {type(error).__name__}: {error}")
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(result, rows, metadata))
    print_case(case, rows, metadata, written, out_dir)
    return rows, metadata, after


def print_case(case, rows, metadata, written, out_dir) -> None:
    print(f"\n=== {case.name}: {case.summary}")
    if rows:
        print(format_table(rows))
    for t in metadata.get("targets", []):
        state = "met" if t["met"] else ("not measured" if t["met"] is None else "MISSED")
        print(f"target {t['name']}: {t['measured']} (wanted {t['target']}): {state}")
    print(f"wrote {', '.join(written)} to {out_dir}  ({metadata['wall_s']:.0f} s)")


def _run_info(args, argv, device) -> Dict:
    build_start = time.perf_counter()
    # Load (or compile) the C++ backend now, outside the timed cases: status queries such as
    # lk.unavailable_reason never build it.
    cpu_reason = ltkd_cpu.load() if device.type == "cpu" else "CUDA run"
    first_use_s = time.perf_counter() - build_start
    command = "python -m benchmarks.run " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    return dict(command=command.strip(), device_info=measure.device_info(device),
                versions=measure.versions(),
                cpu_backend=dict(unavailable_reason=cpu_reason, first_use_s=round(first_use_s, 2),
                                 note="the C++ backend compiles on first use, then loads from "
                                      "its cache; first_use_s is that step in this run"))


class Runner:
    """One run: the device, the run's description, the machine's state between cases."""

    def __init__(self, args, argv=None, device=None):
        self.args = args
        self.start = time.monotonic()
        self.device = torch.device(device or args.device
                                   or ("cuda" if torch.cuda.is_available() else "cpu"))
        if args.threads:
            torch.set_num_threads(args.threads)
        self.out_root = args.out or os.path.join(
            HERE, "results", "tmp", f"{self.device.type}-{'quick' if args.quick else 'full'}")
        self.info = _run_info(args, argv, self.device)
        backend = self.info["cpu_backend"]
        print(f"device: {self.info['device_info']['name']}; torch {torch.__version__}; C++ "
              f"backend: {backend['unavailable_reason'] or 'ready'} ({backend['first_use_s']:.1f} s)")
        self.state = environment(self.device)
        print(f"copy bandwidth {self.state['bandwidth']:.2f} GB/s (bytes read + written)")
        probe = self.state["probe"]
        if probe is not None and probe["median_ms"] > 1.0:
            print(f"warning: the machine is busy (a 4 MiB fill_ takes {probe['median_ms']:.1f} ms, "
                  f"tens of microseconds when idle): timings will say more about the load")

    def run(self, case):
        """Run one case (its failure is printed, not raised): ``(rows, metadata)`` or ``None``."""
        ctx = Context(self.device, make_settings(self.args, self.start), self.state["bandwidth"],
                      print, self.args, self.args.quick)
        try:
            rows, metadata, self.state = run_case(case, ctx, os.path.join(self.out_root, case.name),
                                                  self.info, self.state, self.args.no_plots)
        except Exception:  # noqa: BLE001  (one broken case never loses the others)
            traceback.print_exc()
            print(f"case {case.name} FAILED (traceback above); going on with the others")
            return None
        return rows, metadata


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for c in registry.load().values():
            print(f"{c.name:16s} {'/'.join(c.devices):9s} {c.summary}")
        for module, error in registry.LOAD_ERRORS.items():
            print(f"(not loaded: {module}: {error})")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    runner = Runner(args, argv)
    failed = [case.name for case in select_cases(args, runner.device) if runner.run(case) is None]
    print(f"\nwall time {time.monotonic() - runner.start:.0f} s; results under {runner.out_root}")
    if failed:
        print(f"cases that failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
