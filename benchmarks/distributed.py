"""Vocabulary-parallel losses on 2 CPU processes (gloo): communication per call and time.

    python -m benchmarks.distributed                       # N=64, V in {32000, 128256}, kd/ltkd/dkd
    python -m benchmarks.distributed --N 256 --V 151936 --losses ltkd --world 2 --reps 10
    python -m benchmarks.distributed --modes vocab,single        # without the slow gather baseline
    python -m benchmarks.distributed --json out.json

For each problem (loss, N, V) the vocabulary is split over ``--world`` processes in rank order
(uneven when V is not a multiple). Every process counts, inside its own ``torch.distributed``
(each collective wrapped), the bytes it contributes to the collectives of one training step
of the loss (forward and backward), and times the step (median of ``--reps`` after warm-up,
rank 0's ``perf_counter``; the collectives synchronise the ranks). Three ways are measured:

- ``vocab``: ``vocab_process_group`` on the package's kernels (``--backend``, default
  ``"auto"``): per step one all-reduce MAX and one all-reduce SUM of O(N G) floats, nothing
  in the backward, whatever V is;
- ``gather``: the same call with ``backend="torch"`` (the reference), which all-gathers both
  models' logits (O(N V) per rank) and computes the loss on the whole vocabulary;
- ``single``: one process on the whole vocabulary with the same thread count, no
  communication (rank 0, after the others; the time a rank would take alone).

Reported per problem: bytes per step and rank of ``vocab`` and ``gather``, the predicted
bytes of :func:`ltkd_kernels.ops.distributed.communication_bytes`, the local logits' size
(``N V_local`` floats of each model) and the ratio of bytes sent to it, and the three times.
Threads per process: ``--threads`` (default 1: two processes on two cores).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Sequence

import torch

LOSSES = ("kd", "ltkd", "dkd", "bkd")
NUM_GROUPS = 3


def _bounds(vocab: int, world: int):
    """``torch.chunk``'s split of ``vocab`` classes over ``world`` ranks (uneven at the end)."""
    step = -(-vocab // world)
    return [(min(r * step, vocab), min((r + 1) * step, vocab)) for r in range(world)]


def _inputs(loss: str, rows: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=g) * 2.0
    teacher = torch.randn(rows, vocab, generator=g) * 3.0
    extra = {}
    if loss == "ltkd":
        extra["groups"] = torch.randint(NUM_GROUPS, (vocab,), generator=g)
    if loss == "dkd":
        extra["target"] = torch.randint(vocab, (rows,), generator=g)
    if loss == "bkd":
        extra["class_weight"] = torch.rand(vocab, generator=g) + 0.05
    return student, teacher, extra


def _call(loss: str, student, teacher, extra, lo: int, hi: int, **options):
    import ltkd_kernels as lk

    if loss == "kd":
        return lk.kd_loss(student, teacher, temperature=2.0, **options)
    if loss == "ltkd":
        return lk.ltkd_loss(student, teacher, extra["groups"][lo:hi], NUM_GROUPS,
                            temperature=4.0, **options)
    if loss == "dkd":
        return lk.dkd_loss(student, teacher, extra["target"], **options)
    return lk.bkd_loss(student, teacher, extra["class_weight"][lo:hi], **options)


class _ByteCounter:
    """Wraps ``torch.distributed``'s collectives; counts the bytes this rank contributes (the
    input of a gather, the buffer of an all-reduce) and the calls, outermost calls only."""

    _NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
              "reduce_scatter_tensor", "broadcast", "all_to_all_single")
    _OUTPUT_FIRST = ("all_gather", "all_gather_into_tensor", "all_gather_single",
                     "reduce_scatter_tensor", "all_to_all_single")

    def __init__(self):
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        self.bytes = 0
        self.calls = 0
        self._depth = 0
        for module in (dist, c10d):
            for name in self._NAMES:
                original = getattr(module, name, None)
                if original is not None and not getattr(original, "_counted", False):
                    setattr(module, name, self._wrap(name, original))

    def _wrap(self, name, original):
        position = 1 if name in self._OUTPUT_FIRST else 0

        def counted(*args, **kwargs):
            if self._depth == 0:
                tensor = args[position] if len(args) > position else None
                if isinstance(tensor, (list, tuple)):
                    tensor = tensor[0] if tensor else None
                if isinstance(tensor, torch.Tensor):
                    self.bytes += tensor.numel() * tensor.element_size()
                self.calls += 1
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        counted._counted = True
        return counted

    def reset(self):
        self.bytes = self.calls = 0


def _step(loss, student, teacher, extra, lo, hi, **options):
    s = student.clone().requires_grad_()
    out = _call(loss, s, teacher, extra, lo, hi, **options)
    out.backward()
    return out


def _time(fn, reps: int, warmup: int = 2) -> List[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _worker(rank, world, init_file, out_file, problems, backend, reps, threads, modes):
    import torch.distributed as dist

    from ltkd_kernels.ops.distributed import communication_bytes

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    counter = _ByteCounter()
    group = dist.group.WORLD
    rows_out = []
    for loss, rows, vocab in problems:
        student, teacher, extra = _inputs(loss, rows, vocab)
        lo, hi = _bounds(vocab, world)[rank]
        s_local, t_local = student[:, lo:hi].contiguous(), teacher[:, lo:hi].contiguous()
        row = dict(loss=loss, N=rows, V=vocab, world=world, V_local=hi - lo, backend=backend)
        for mode, name in (("vocab", backend), ("gather", "torch")):
            if mode not in modes:
                continue

            def step(name=name):
                return _step(loss, s_local, t_local, extra, lo, hi, vocab_process_group=group,
                             backend=name)
            step()  # the first call (the layout all-gather of the kernels' path, once)
            counter.reset()
            step()
            row[f"{mode}_bytes"] = counter.bytes
            row[f"{mode}_collectives"] = counter.calls
            times = _time(step, reps)
            row[f"{mode}_ms"] = 1e3 * statistics.median(times)
        G = {"ltkd": NUM_GROUPS, "dkd": 2}.get(loss, 1)
        row["predicted_bytes"] = communication_bytes(
            rows, G, world, with_target=loss == "dkd")["total"]
        row["logits_bytes_local"] = 2 * rows * (hi - lo) * 4
        if "vocab_bytes" in row:
            row["vocab_bytes_over_logits"] = row["vocab_bytes"] / row["logits_bytes_local"]
        dist.barrier()
        if rank == 0 and "single" in modes:
            times = _time(lambda: _step(loss, student, teacher, extra, 0, vocab, backend=backend),
                          reps)
            row["single_ms"] = 1e3 * statistics.median(times)
        dist.barrier()
        rows_out.append(row)
    if rank == 0:
        torch.save(rows_out, out_file)
    dist.destroy_process_group()


MODES = ("vocab", "gather", "single")


def run(problems: Sequence[tuple], *, world: int = 2, backend: str = "auto", reps: int = 5,
        threads: int = 1, modes: Sequence[str] = MODES) -> List[Dict]:
    """Spawn ``world`` gloo processes and measure every ``(loss, N, V)`` of ``problems`` in
    each of ``modes`` (``"vocab"``, ``"gather"``, ``"single"``); returns one dict per problem
    (the fields of the module docstring; a mode left out leaves its fields out)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as directory:
        out_file = os.path.join(directory, "rows.pt")
        mp.spawn(_worker, args=(world, os.path.join(directory, "init"), out_file, list(problems),
                                backend, reps, threads, tuple(modes)), nprocs=world, join=True)
        return torch.load(out_file)


def format_table(rows: List[Dict]) -> str:
    columns = [("loss", "loss", "{}"), ("N", "N", "{}"), ("V", "V", "{}"),
               ("V_local", "V_local", "{}"), ("vocab: bytes/step", "vocab_bytes", "{:,}"),
               ("collectives", "vocab_collectives", "{}"), ("predicted", "predicted_bytes", "{:,}"),
               ("bytes / local logits", "vocab_bytes_over_logits", "{:.2e}"),
               ("gather: bytes/step", "gather_bytes", "{:,}"),
               ("collectives", "gather_collectives", "{}"), ("vocab ms", "vocab_ms", "{:.2f}"),
               ("gather ms", "gather_ms", "{:.2f}"), ("single ms", "single_ms", "{:.2f}")]
    columns = [c for c in columns if any(c[1] in r for r in rows)]
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for r in rows:
        cells = [fmt.format(r[key]) if key in r else "" for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--N", default="64", help="rows, comma-separated")
    parser.add_argument("--V", default="32000,128256", help="vocabulary sizes, comma-separated")
    parser.add_argument("--losses", default="kd,ltkd,dkd", help=f"some of {','.join(LOSSES)}")
    parser.add_argument("--world", type=int, default=2, help="processes (gloo, CPU)")
    parser.add_argument("--backend", default="auto",
                        help="the kernels' backend (auto, cpu, triton)")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="some of vocab,gather,single (gather: the reference, slow)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    losses = [name for name in args.losses.split(",") if name]
    unknown = set(losses) - set(LOSSES)
    if unknown:
        parser.error(f"unknown losses {sorted(unknown)}; choose from {LOSSES}")
    problems = [(loss, int(n), int(v)) for loss in losses for n in args.N.split(",")
                for v in args.V.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(set(modes) - set(MODES))}; choose from {MODES}")
    rows = run(problems, world=args.world, backend=args.backend, reps=args.reps,
               threads=args.threads, modes=modes)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
