"""How many V-slices per row when rows are few: ``python -m benchmarks.split_probe`` (CUDA).

The launchers split a row over the vocabulary when there are fewer rows than
``PROGRAMS_PER_SM * SMs`` programs (``ltkd_kernels/triton/grouped_kl.py``, ``_splits``). This
times a forward + backward (device time, the host hidden: ``benchmarks/measure.py``) of KD and
LTKD (G = 3) at few rows with the rule's count and with forced counts, each with the walks'
loops plain and software-pipelined (``--stages``: ``forced_stages``, no rule takes it yet;
docs/design.md, "Few rows"), so that the rule's constants are chosen from measurements. Then
one profile per (loss, size) at the rule's count: each kernel's device time, to tell the
launches' fixed cost from the walks'. Prints one line per (loss, N, V, splits, stages);
``--out`` writes them as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.split_probe", description=__doc__)
    p.add_argument("--sizes", default="64x256000,16x128256,256x128256",
                   help="NxV pairs, comma-separated")
    p.add_argument("--splits", default="rule,2,4", help="'rule', or multiples of the rule's count")
    p.add_argument("--stages", default="1,3", help="software-pipelining stages of the walks' "
                   "loops to time (1: plain loops, the default of every rule)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out")
    p.add_argument("--device", default="cuda", help="cuda; cpu (TRITON_INTERPRET=1, tiny "
                   "sizes) checks the flow only")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("split_probe: no CUDA device; nothing measured")
        return 0
    import ltkd_kernels as lk
    from ltkd_kernels.triton import grouped_kl as ops

    from . import measure

    device = torch.device(args.device)
    bandwidth, _ = measure.copy_bandwidth(device)
    rows_out, profiles = [], []
    for size in args.sizes.split(","):
        n, v = (int(x) for x in size.split("x"))
        gen = torch.Generator(device=device).manual_seed(0)
        teacher = (torch.randn(n, v, device=device, generator=gen) * 3).to(torch.bfloat16)
        student = (torch.randn(n, v, device=device, generator=gen) * 2).to(torch.bfloat16)
        groups = torch.randint(0, 3, (v,), device=device, generator=gen)
        rule = ops._splits(n, v, ops.LANES * 8, device)[0]
        losses = {"kd": lambda s: lk.kd_loss(s, teacher, temperature=2.0, backend="triton"),
                  "ltkd": lambda s: lk.ltkd_loss(s, teacher, groups, 3, temperature=2.0,
                                                 backend="triton")}
        floor_ms = 5 * n * v * 2 / (bandwidth * 1e9) * 1e3
        for name, loss in losses.items():
            def setup(i):
                return student.detach().clone().requires_grad_()

            for choice in args.splits.split(","):
                count = None if choice == "rule" else rule * int(choice)
                for stages in (int(x) for x in args.stages.split(",")):
                    def region(s, loss=loss, count=count, stages=stages):
                        with ops.forced_splits(count), ops.forced_stages(stages):
                            loss(s).backward()

                    timing, _ = measure.time_region(setup, region, device, warmup=2,
                                                    min_reps=args.reps, max_reps=args.reps,
                                                    budget_s=0.0, measure_memory=False)
                    row = dict(loss=name, N=n, V=v, splits=count or rule, rule=count is None,
                               stages=stages, median_ms=timing.median_ms,
                               p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                               host_ms=timing.host_median_ms,
                               of_floor=floor_ms / timing.median_ms)
                    rows_out.append(row)
                    print(f"{name:5s} N={n:5d} V={v:7d} splits={row['splits']:4d}"
                          f"{' (rule)' if row['rule'] else '       '} stages={stages} "
                          f"{timing.median_ms * 1e3:8.1f} us "
                          f"({timing.p20_ms * 1e3:.1f}-{timing.p80_ms * 1e3:.1f}) "
                          f"{100 * row['of_floor']:5.1f}% of the floor", flush=True)
            if device.type == "cuda":
                kernels = kernel_times(lambda s, loss=loss: loss(s).backward(), setup)
                profiles.append(dict(loss=name, N=n, V=v, splits=rule, kernels_us=kernels))
                print(f"{name:5s} N={n:5d} V={v:7d} per kernel (us, the rule): "
                      + ", ".join(f"{k} {t:.1f}" for k, t in kernels.items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(copy_bandwidth_gb_per_s=bandwidth, rows=rows_out,
                           kernel_profiles=profiles, versions=measure.versions()), f, indent=1)
    return 0


def kernel_times(step, setup, reps: int = 10) -> dict:
    """Mean device time per step of each kernel ``step(setup(i))`` launches, in microseconds,
    from ``torch.profiler`` (warmed first): the walks against the small kernels and fills."""
    from torch.profiler import ProfilerActivity, profile

    for i in range(2):
        step(setup(i))
    torch.cuda.synchronize()
    inputs = [setup(i) for i in range(reps)]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for s in inputs:
            step(s)
        torch.cuda.synchronize()
    totals: dict = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "cuda_time_total", 0.0)
        if device_us > 0:
            totals[event.key[:60]] = device_us / reps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


if __name__ == "__main__":
    sys.exit(main())
