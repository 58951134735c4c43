"""SRW weights on the CPU: time against one read of the features at the measured bandwidth.

    python -m benchmarks.bench_srw                # N = 10^6 and 60000, D = 256, fp32
    python -m benchmarks.bench_srw --quick        # N = 60000 only

For each size and each backend that runs here at speed (the pure-PyTorch reference ``torch``;
the C++ backend ``cpu`` when built; Triton is skipped on the CPU: its interpreter is for
testing, orders of magnitude slower), the best of ``--repeat`` runs is compared with

- ``read``: ``features.sum()``, one streaming read of the features (the bandwidth floor);
- ``copy``: ``out.copy_(features)``, one read and one write.

The timings are interleaved (read, copy, each backend, then again), so that a machine shared
with other work loads every provider alike. The weights of every backend are checked against
the float64 reference (O(N D), :func:`ltkd_kernels.reference.srw_weights`) in the same run.
Results go to ``benchmarks/results/srw_cpu.json`` with the date, versions, CPU and command.

The algorithm needs the features twice (the mean of the normalised rows before any dot
product), so two reads is the floor of any exact method: "within 2x of one read" means both
passes at full bandwidth. The reference makes three passes (norms, ``r^T F``, ``F m``), each a
streaming BLAS-speed operation; the fused kernels make two.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

import ltkd_kernels as lk
from benchmarks.measure import cpu_model

RESULTS = Path(__file__).resolve().parent / "results" / "srw_cpu.json"
DIM = 256
SIZES = (1_000_000, 60_000)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def backends_here():
    """``(name, reason skipped or None)`` for every backend, on CPU tensors."""
    rows = []
    for name in ("torch", "cpu", "triton"):
        reason = lk.unavailable_reason(name, torch.device("cpu"))
        if name == "triton" and reason is None:
            reason = "Triton on CPU tensors is the interpreter (for tests), not a fast path"
        rows.append((name, reason))
    return rows


def max_relative_error(weights: torch.Tensor, expected: torch.Tensor) -> float:
    return ((weights.double() - expected).abs() / expected.abs().clamp_min(1e-300)).max().item()


def bench_size(rows: int, dim: int, repeat: int, tau: float = 1.0):
    """Time the read floor, the copy and each backend on ``(rows, dim)`` fp32 features."""
    torch.manual_seed(0)
    # An offset gives the features a shared direction, as post-ReLU features have.
    features = torch.randn(rows, dim) + 0.3
    nbytes = features.numel() * features.element_size()
    copy_target = torch.empty_like(features)
    runnable = [name for name, reason in backends_here() if reason is None]
    providers = {
        "read": lambda: features.sum(),
        "copy": lambda: copy_target.copy_(features),
    }
    for name in runnable:
        providers[name] = lambda name=name: lk.srw_weights(features, tau=tau, backend=name)
    for fn in providers.values():  # warm-up (allocations, thread pools, first-call costs)
        fn()
    times = {name: [] for name in providers}
    for _ in range(repeat):
        for name, fn in providers.items():
            times[name].append(_timed(fn))
    best = {name: min(values) for name, values in times.items()}
    median = {name: sorted(values)[len(values) // 2] for name, values in times.items()}

    expected = lk.reference.srw_weights(features.double(), tau=tau)
    result = {
        "rows": rows, "dim": dim, "dtype": "float32", "tau": tau, "bytes": nbytes,
        "read_s": best["read"], "read_GBps": nbytes / best["read"] / 1e9,
        "copy_s": best["copy"], "copy_GBps": 2 * nbytes / best["copy"] / 1e9,
        "backends": {},
    }
    for name in runnable:
        weights = lk.srw_weights(features, tau=tau, backend=name)
        result["backends"][name] = {
            "best_s": best[name],
            "median_s": median[name],
            "x_one_read": best[name] / best["read"],
            "effective_GBps": nbytes / best[name] / 1e9,
            "max_rel_err_vs_float64": max_relative_error(weights, expected),
            "sum_minus_1": abs(weights.double().sum().item() - 1.0),
        }
    return result


def print_table(result) -> None:
    print(f"\nSRW weights, N = {result['rows']}, D = {result['dim']}, fp32 "
          f"({result['bytes'] / 1e6:.0f} MB): one read {result['read_s'] * 1e3:.1f} ms "
          f"({result['read_GBps']:.1f} GB/s), copy {result['copy_s'] * 1e3:.1f} ms "
          f"({result['copy_GBps']:.1f} GB/s read+write)")
    print(f"{'backend':<8} {'best ms':>9} {'median ms':>10} {'x one read':>11} "
          f"{'max rel err':>12}")
    for name, row in result["backends"].items():
        print(f"{name:<8} {row['best_s'] * 1e3:>9.1f} {row['median_s'] * 1e3:>10.1f} "
              f"{row['x_one_read']:>11.2f} {row['max_rel_err_vs_float64']:>12.2e}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 60000 only")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per provider")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    sizes = SIZES[1:] if args.quick else SIZES
    skipped = {name: reason for name, reason in backends_here() if reason is not None}
    for name, reason in skipped.items():
        print(f"skipped backend {name!r}: {reason}")
    report = {
        "benchmark": "srw_weights on the CPU vs one read of the features",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.bench_srw"]
                            + list(argv if argv is not None else sys.argv[1:])),
        "torch": torch.__version__,
        "ltkd_kernels": lk.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "skipped_backends": skipped,
        "results": [],
    }
    for rows in sizes:
        result = bench_size(rows, DIM, args.repeat)
        print_table(result)
        report["results"].append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
