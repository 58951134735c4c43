"""The one-shot GPU check: the GPU tests and the GPU benchmarks, in one command, one folder.

    python -m benchmarks.gpu_check OUT_DIR

On a CUDA machine with the Python, PyTorch and Triton it already has (no install step, no
network: run it from the repository root, or with the repository on ``PYTHONPATH``), in about
8 minutes on one H100:

1. ``tests/test_gpu.py`` in a subprocess (``TRITON_INTERPRET=0``): every loss against the
   reference at V = 128256 and 256000 in bfloat16, N x V > 2^31, no host synchronisation,
   CUDA-graph capture and replay, bit-identical reruns (``OUT_DIR/test_gpu.log``, ``.xml``);
2. the benchmark cases at their GPU sizes (``OUT_DIR/bench/<case>/``: CSV, JSON, summary,
   plots): ``lm`` (every loss, this package's Triton kernels, the papers' eager code,
   ``torch.compile`` of it, Liger-Kernel where importable, at N = 4096, V = 128256 and
   N = 64, V = 256000, bfloat16: fraction of the HBM floor 5 N V 2 bytes / measured copy
   bandwidth, x eager, x compile), ``split`` (``benchmarks.split_probe`` at N = 64,
   V = 256000: V-slices per row x software-pipelined walks, and each kernel's device time:
   ``OUT_DIR/split_probe.json``), ``groups`` (LTKD with 8 and 32 groups through the walks
   of the states kernel, groups as ranges and drawn at random), ``launches``, ``topk``,
   ``srw``;
3. ``OUT_DIR/gpu_check.json`` and ``OUT_DIR/summary.md``: versions, GPU, copy bandwidth, the
   tests' outcome, the headline table, what was left out and why.

Exit status: 0 when every test passed and every case ran; 1 otherwise. **Without CUDA** it
checks nothing, says so, writes ``gpu_check.json`` with ``"status": "skipped"`` and exits 0
(``--strict``: exit 3), so that a script running it everywhere does not fail on CPU machines.
A time limit (``--time-limit``, 450 s by default) keeps the whole under 8 minutes: past it,
``torch.compile`` is left out and the remaining cases are skipped, each noted in the report.
For a shorter lease, ``--providers triton`` times this package alone (the float64 check of
each problem still runs) and ``--cases`` picks the cases.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("lm", "split", "groups", "launches", "topk", "srw")
CASE_RESERVE_S = 40  # a case is started only with at least this much of the time limit left
# torch.compile is timed for the problems that start this many seconds before the time limit
# or earlier: the lm case comes first and its compile columns are the comparison (on
# an H200 in 2026-11-27's run 3, a reserve of 150 s left it out of every problem but LTKD's).
COMPILE_RESERVE_S = 90


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                description="Run the GPU tests and the GPU benchmarks once; "
                                            "write every result into OUT_DIR.")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for the results (created)")
    p.add_argument("--time-limit", type=float, default=450.0,
                   help="seconds for the whole check (default 450)")
    p.add_argument("--test-timeout", type=float, default=270.0,
                   help="seconds for tests/test_gpu.py (default 270)")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"benchmark cases to run, in order (default {','.join(CASES)})")
    p.add_argument("--providers", default=None,
                   help="providers the benchmark cases time (default: each case's own, e.g. "
                        "triton,eager,compile,liger for lm); 'triton' alone fits a short lease")
    p.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    p.add_argument("--skip-bench", action="store_true", help="tests only")
    p.add_argument("--strict", action="store_true", help="exit 3 (not 0) without CUDA")
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    return args


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _nvidia_smi() -> Optional[str]:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                               "clocks.max.sm,clocks.max.mem,power.limit", "--format=csv"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def parse_junit(path: str) -> Dict:
    """Counts and the failed / skipped cases of a pytest JUnit XML file."""
    suite = ElementTree.parse(path).getroot()
    if suite.tag == "testsuites":
        suite = suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed, skipped = [], {}
    for case in suite.iter("testcase"):
        name = case.get("name")
        for child in case:
            message = (child.get("message") or "").strip().splitlines()[:1]
            if child.tag in ("failure", "error"):
                failed.append(dict(test=name, kind=child.tag, message=message[0][:300] if message else ""))
            elif child.tag == "skipped":
                reason = message[0][:200] if message else ""
                skipped[reason] = skipped.get(reason, 0) + 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return dict(counts=counts, failed=failed, skipped_reasons=skipped,
                seconds=float(suite.get("time", 0) or 0))


def run_tests(out_dir: str, timeout_s: float) -> Dict:
    """``tests/test_gpu.py`` in a subprocess with the compiled Triton kernels."""
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        return dict(status="not run: pytest is not installed", wall_s=0.0)
    xml_path = os.path.join(out_dir, "test_gpu.xml")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "pytest", os.path.join("tests", "test_gpu.py"), "-q", "-rfEs",
               "-p", "no:cacheprovider", "--durations=15", f"--junitxml={xml_path}"]
    start = time.monotonic()
    with open(os.path.join(out_dir, "test_gpu.log"), "w") as log:
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout_s)
            status = "passed" if done.returncode == 0 else f"failed (pytest exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout_s:.0f} s"
    result = dict(command=" ".join(command), status=status,
                  wall_s=round(time.monotonic() - start, 1))
    if os.path.exists(xml_path):
        try:
            result.update(parse_junit(xml_path))
        except (ElementTree.ParseError, OSError, IndexError, ValueError) as error:
            result["junit_error"] = f"{type(error).__name__}: {error}"
    counts = result.get("counts", {})
    if status == "passed" and counts and counts.get("passed", 0) == 0:
        result["status"] = "every test skipped"
    return result


def _bench_argv(args, out_dir: str, device: str, remaining_s: float) -> List[str]:
    argv = ["--device", device, "--out", os.path.join(out_dir, "bench"), "--reps", "5",
            "--budget", "0.2", "--time-limit", str(max(0.0, remaining_s - COMPILE_RESERVE_S))]
    if args.providers:
        argv += ["--providers", args.providers]
    if args.cpu_smoke:  # tiny sizes (by default the package's reference and eager): the flow
        argv += ["--N", "16", "--V", "64", "--reps", "2", "--budget", "0", "--no-plots"]
        if not args.providers:
            argv += ["--providers", "torch,eager"]
    return argv


def run_benchmarks(args, deadline: float, device: str) -> Dict:
    """The benchmark cases, in order, while the time limit allows."""
    from . import run as harness

    remaining = deadline - time.monotonic()
    bench_args = harness.parse_args(_bench_argv(args, args.out_dir, device, remaining))
    runner = harness.Runner(bench_args, device=device)
    known = harness.registry.load()
    report = dict(cases={}, copy_bandwidth_gb_per_s=runner.state["bandwidth"])
    for name in args.cases:
        if name == "split" and deadline - time.monotonic() >= CASE_RESERVE_S:
            report["cases"][name] = run_split_probe(args.out_dir, device, args.cpu_smoke)
        elif name == "split":
            report["cases"][name] = dict(status="skipped: time limit")
        elif name not in known:
            report["cases"][name] = dict(status="unknown case")
        elif deadline - time.monotonic() < CASE_RESERVE_S:
            report["cases"][name] = dict(status="skipped: time limit")
        else:
            start = time.monotonic()
            done = runner.run(known[name])
            report["cases"][name] = dict(
                status="ran" if done is not None else "FAILED (see the log)",
                seconds=round(time.monotonic() - start, 1),
                targets=(done[1].get("targets") if done else None),
                left_out=(done[1].get("providers_left_out") if done else None))
            if name == "lm" and done is not None:
                report["headline"] = headline(done[0])
    return report


def run_split_probe(out_dir: str, device: str, smoke: bool = False) -> Dict:
    """``benchmarks.split_probe`` at N = 64, V = 256000: V-slices x software pipelining, and
    each kernel's device time (``OUT_DIR/split_probe.json``; docs/design.md, "Few rows")."""
    from . import split_probe

    path = os.path.join(out_dir, "split_probe.json")
    argv = ["--device", device, "--out", path, "--splits", "rule,2", "--stages", "1,3"]
    argv += ["--sizes", "2x300", "--reps", "1"] if smoke else ["--sizes", "64x256000",
                                                                "--reps", "20"]
    start = time.monotonic()
    try:
        split_probe.main(argv)
        status = "ran"
    except Exception as error:  # a failed probe leaves the other cases to run
        status = f"FAILED: {type(error).__name__}: {str(error)[:300]}"
    return dict(status=status, seconds=round(time.monotonic() - start, 1))


def headline(rows: List[Dict]) -> List[Dict]:
    """Per loss and size, the full step: this package's time, fraction of the HBM floor,
    x eager, x compile, and every provider's median."""
    out = []
    for row in rows:
        if row["mode"] != "full" or row["provider"] not in ("triton", "cpu", "torch"):
            continue
        if row["provider"] == "torch" and any(r["provider"] in ("triton", "cpu") for r in rows):
            continue
        others = {r["provider"]: r["median_ms"] for r in rows if r["mode"] == "full"
                  and (r["loss"], r["N"], r["V"], r["dtype"]) == (row["loss"], row["N"], row["V"], row["dtype"])}
        out.append(dict(loss=row["loss"], N=row["N"], V=row["V"], dtype=row["dtype"],
                        provider=row["provider"], status=row["status"], median_ms=row["median_ms"],
                        host_ms=row.get("host_ms"),
                        fraction_of_floor=row["fraction_of_floor"], x_eager=row["x_eager"],
                        x_compile=row["x_compile"], medians_ms=others))
    return out


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _x(x) -> str:
    return "—" if x is None else f"{x:.2f}x"


def summary_markdown(report: Dict) -> str:
    env = report.get("environment", {})
    lines = ["# GPU check", "", f"- status: **{report.get('status', 'running')}**; "
             f"{report.get('date')}; wall time {report.get('wall_s') or 0:.0f} s",
             f"- GPU: {env.get('gpu')}; torch {env.get('torch')}; triton {env.get('triton')}; "
             f"CUDA {env.get('cuda')}; Python {env.get('python')}"]
    tests = report.get("tests")
    if tests:
        lines.append(f"- tests/test_gpu.py: {tests['status']}; {tests.get('counts')}; "
                     f"{tests['wall_s']:.0f} s (log: test_gpu.log)")
        lines += [f"  - {f['kind']}: `{f['test']}`: {f['message']}" for f in tests.get("failed", [])]
        lines += [f"  - skipped x{n}: {reason}" for reason, n in tests.get("skipped_reasons", {}).items()]
    bench = report.get("benchmarks") or {}
    if bench:
        lines.append(f"- copy bandwidth: {bench.get('copy_bandwidth_gb_per_s', 0):.0f} GB/s "
                     f"(bytes read + written)")
        lines += [f"- case `{name}`: {c['status']}" + (f" ({c['seconds']:.0f} s)" if "seconds" in c else "")
                  for name, c in bench.get("cases", {}).items()]
    if bench.get("headline"):
        lines += ["", "## Full step (forward + backward), bench/lm", "",
                  "Device time (the host's launching hidden, benchmarks/measure.py); `host ms`: "
                  "this package's host time per step, the bound of a step run without CUDA graphs.",
                  "",
                  "| loss | N | V | dtype | ms | host ms | of HBM floor | x eager | x compile | medians (ms) |",
                  "|---|--:|--:|---|--:|--:|--:|--:|--:|---|"]
        for h in bench["headline"]:
            medians = ", ".join(f"{p} {m:.3g}" for p, m in h["medians_ms"].items() if m)
            ms = "—" if h["median_ms"] is None else f"{h['median_ms']:.3g}"
            host = "—" if h.get("host_ms") is None else f"{h['host_ms']:.3g}"
            lines.append(f"| {h['loss'].upper()} | {h['N']} | {h['V']} | {h['dtype']} | {ms} | {host} | "
                         f"{_pct(h['fraction_of_floor'])} | {_x(h['x_eager'])} | "
                         f"{_x(h['x_compile'])} | {medians} |")
    return "\n".join(lines) + "\n"


def environment() -> Dict:
    import torch

    from . import measure

    env = dict(measure.versions(), cuda=torch.version.cuda, nvidia_smi=_nvidia_smi())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   capability=f"{props.major}.{props.minor}")
    return env


def write_report(out_dir: str, report: Dict) -> None:
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
        f.write("\n")
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(report))


def _status(report: Dict) -> str:
    tests = report.get("tests")
    bench = report.get("benchmarks")
    problems = []
    if tests is not None and tests["status"] != "passed":
        problems.append(f"tests {tests['status']}")
    for name, case in ((bench or {}).get("cases") or {}).items():
        if case["status"] != "ran":
            problems.append(f"{name} {case['status']}")
    return "ok" if not problems else "; ".join(problems)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.time_limit
    os.makedirs(args.out_dir, exist_ok=True)
    import torch

    report = dict(date=_now(), command="python -m benchmarks.gpu_check " + " ".join(
        sys.argv[1:] if argv is None else argv))
    if not torch.cuda.is_available() and not args.cpu_smoke:
        report.update(status="skipped", reason="no CUDA device (torch.cuda.is_available() is "
                      f"False; torch {torch.__version__}): nothing was checked")
        write_report(args.out_dir, report)
        print(f"gpu_check: SKIPPED: {report['reason']}; wrote {args.out_dir}/gpu_check.json")
        return 3 if args.strict else 0
    report["environment"] = environment()
    if not args.skip_tests:
        print(f"gpu_check: tests/test_gpu.py (at most {args.test_timeout:.0f} s) ...", flush=True)
        report["tests"] = run_tests(args.out_dir, min(args.test_timeout, deadline - time.monotonic()))
        print(f"gpu_check: tests {report['tests']['status']} {report['tests'].get('counts')}", flush=True)
        write_report(args.out_dir, report)  # kept even if the benchmarks break
    if not args.skip_bench:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        report["benchmarks"] = run_benchmarks(args, deadline, device)
    report.update(status=_status(report), wall_s=round(time.monotonic() - start, 1))
    write_report(args.out_dir, report)
    print(summary_markdown(report))
    print(f"gpu_check: {report['status']}; wrote {args.out_dir}")
    return 0 if report["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
