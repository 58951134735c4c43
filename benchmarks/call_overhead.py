"""Where the host time of one small loss call goes: ``python -m benchmarks.call_overhead``.

At N = 1, V = 2 a forward + backward moves a few bytes: its time is the host's. Per loss,
on the Triton backend (CUDA; on a CPU machine under ``TRITON_INTERPRET=1`` the numbers are
the interpreter's, only the flow is checked), this prints and writes (``--out FILE``, JSON):

- ``step_us``: the median forward + backward (``loss.backward()``, then a device sync);
- ``python_us``: the same with the kernel launches replaced by nothing (this package's
  Python, autograd and the torch ops around the kernels);
- ``launch_us``: per kernel of the step, the median host time of launching it again with the
  same arguments (``kernel[grid](...)``: Triton's argument binding and launcher), and their sum;
- a ``cProfile`` of LTKD's step, the 25 functions of most own time;
- a ``torch.profiler`` table of LTKD's steps (host, and device on CUDA), the 30 entries of
  most own host time: what the two numbers above leave out (on an H200 about half of a step,
  ``benchmarks/results/gpu/h200-2026-11-27-run2/``) shows there.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch


def _losses(device):
    import ltkd_kernels as lk

    s = torch.randn(1, 2, device=device, requires_grad=True)
    t = torch.randn(1, 2, device=device)
    groups = torch.tensor([0, 1], device=device)
    target = torch.tensor([1], device=device)
    weight = torch.rand(2, device=device) + 0.1
    return s, {
        "kd": lambda: lk.kd_loss(s, t, backend="triton"),
        "ltkd": lambda: lk.ltkd_loss(s, t, groups, 2, backend="triton"),
        "dkd": lambda: lk.dkd_loss(s, t, target, backend="triton"),
        "bkd": lambda: lk.bkd_loss(s, t, weight, target=target, ce_weight=1.0, backend="triton"),
    }


def _median_us(fn: Callable[[], None], sync: Callable[[], None], reps: int) -> float:
    for _ in range(max(3, reps // 10)):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def measure(device: torch.device, reps: int) -> Dict:
    from ltkd_kernels.triton import grouped_kl as ops

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    student, calls = _losses(device)
    out: Dict = {}
    original = ops._launch
    for name, call in calls.items():
        def step():
            student.grad = None
            call().backward()

        row = dict(step_us=_median_us(step, sync, reps))
        recorded: List[tuple] = []

        def record(kernel, grid, *args, **meta):
            recorded.append((kernel, grid, args, meta))
            original(kernel, grid, *args, **meta)

        ops._launch = record
        try:
            step()
        finally:
            ops._launch = original
        sync()
        ops._launch = lambda kernel, grid, *args, **meta: None
        try:
            row["python_us"] = _median_us(step, sync, reps)
        finally:
            ops._launch = original
        launches = {}
        for kernel, grid, args, meta in recorded:
            def again(kernel=kernel, grid=grid, args=args, meta=meta):
                kernel[grid](*args, **meta)
            launches[kernel.fn.__name__] = _median_us(again, lambda: None, reps)
        sync()
        row["launch_us"] = launches
        row["launches_sum_us"] = sum(launches.values())
        out[name] = row
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(reps):
        student.grad = None
        calls["ltkd"]().backward()
    sync()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    out["ltkd_profile"] = text.getvalue()
    out["ltkd_torch_profile"] = _torch_profile(calls["ltkd"], student, sync, device,
                                               max(5, reps // 10))
    return out


def _torch_profile(call, student, sync, device: torch.device, steps: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            student.grad = None
            call().backward()
        sync()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.call_overhead", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--out", help="JSON file for the numbers")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    result = measure(device, args.reps)
    import triton

    result["environment"] = dict(torch=torch.__version__, triton=triton.__version__,
                                 device=(torch.cuda.get_device_name() if device.type == "cuda"
                                         else "cpu"), python=sys.version.split()[0])
    print(result.pop("ltkd_profile") if not args.out else result["ltkd_profile"])
    print(result.pop("ltkd_torch_profile") if not args.out else result["ltkd_torch_profile"])
    print("loss  step_us  python_us  launches_sum_us  per kernel")
    for name in ("kd", "ltkd", "dkd", "bkd"):
        row = result[name]
        kernels = ", ".join(f"{k} {v:.0f}" for k, v in row["launch_us"].items())
        print(f"{name:5s} {row['step_us']:8.0f} {row['python_us']:10.0f} "
              f"{row['launches_sum_us']:16.0f}  {kernels}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
