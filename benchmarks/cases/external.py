"""Adapters for benchmark modules written outside the registry: a module of
:data:`benchmarks.cases.EXTERNAL_MODULES` that registers no case of its own gets one here,
around its public ``run`` function. (``benchmarks/linear.py`` registers itself; this module
wraps ``benchmarks/distributed.py`` as the case ``distributed`` until it does the same.)
"""
from __future__ import annotations

from typing import Dict, List

from ..report import FIELDS
from . import REGISTRY, CaseResult, case

DISTRIBUTED_WAYS = {
    "vocab": "vocab-parallel",      # vocab_process_group on the package's kernels
    "gather": "gather-logits",      # the reference: all-gathers both models' logits
    "single": "single-process",     # one process on the whole vocabulary, no communication
}


def _distributed_rows(raw: List[Dict]) -> List[Dict]:
    """One row per problem and way (``median_ms``; bytes and collectives per step and rank)."""
    rows = []
    for r in raw:
        for way, provider in DISTRIBUTED_WAYS.items():
            if r.get(f"{way}_ms") is None:
                continue
            row = {name: None for name in FIELDS}
            row.update(case="distributed", loss=r["loss"], provider=provider, mode="full",
                       N=r["N"], V=r["V"], G=None, dtype="float32", status="ok",
                       median_ms=r[f"{way}_ms"], note="")
            row.update(world=r.get("world"), V_local=r.get("V_local"),
                       bytes_per_step=r.get(f"{way}_bytes"),
                       collectives=r.get(f"{way}_collectives"),
                       predicted_bytes=r.get("predicted_bytes") if way == "vocab" else None)
            rows.append(row)
    return rows


def register_distributed(module) -> None:
    """The case ``distributed`` around ``benchmarks.distributed.run`` (2 gloo processes)."""
    if "distributed" in REGISTRY or not hasattr(module, "run"):
        return

    @case("distributed", "vocabulary-parallel losses on 2 gloo CPU processes: bytes per step "
          "and time, against gathering the logits and one process (benchmarks/distributed.py)",
          devices=("cpu",))
    def run(ctx):
        losses = [l for l in ctx.option("losses", ["kd", "ltkd", "dkd"]) if l in module.LOSSES]
        Vs = ctx.option("V", [32000] if ctx.quick else [32000, 128256])
        problems = [(loss, N, V) for loss in losses for N in ctx.option("N", [64]) for V in Vs]
        ctx.log(f"distributed: {len(problems)} problems on 2 gloo processes")
        raw = module.run(problems, world=2, backend="auto", reps=3 if ctx.quick else 5, threads=1)
        formatted = getattr(module, "_format", None)
        sections = (["## Communication and time per training step", ""]
                    + ([formatted(raw)] if formatted else []) + [""])
        return CaseResult(_distributed_rows(raw), sections=lambda _rows: sections,
                          metadata=dict(distributed_rows=raw))


ADAPTERS = {"benchmarks.distributed": register_distributed}
