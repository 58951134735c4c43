"""Case ``groups`` (CUDA): LTKD with many groups through the walks of the Triton states kernel.

With 5 groups or more the launcher picks the walk by how the groups lie over the classes
(docs/design.md, "The ordered walk", "The window walk"): groups that are each one range of
classes are read densely group after group (``ranges``); groups whose gathers touch few
32-byte sectors are walked one by one through the classes sorted by group (``ordered``);
groups interleaved more finely are walked in windows, every lane one group (``windows``);
the CLASS walk (work per element growing with G) is left for the calls no plan serves. That
rule was set from instruction counts and sector counts, without a GPU; this case measures it.
For G in {8, 32} and two layouts of the groups, ``ranges`` (contiguous classes: one sector
per sector of a row) and ``drawn`` (each class's group at random: about 12.7 sectors per
sector at G = 32 in bf16), it times LTKD's full step (forward + backward) at N = 1024,
V = 128256, bfloat16, with each walk forced, and marks the one the rule takes. The floor is
the full step's bytes (5 N V x 2) over this run's copy bandwidth.

``--N``, ``--V``, ``--G`` replace the size and the group counts. On the CPU it runs only under
``TRITON_INTERPRET=1`` (a smoke run of the code, as tests/test_packaging.py does).
"""
from __future__ import annotations

import os
from typing import List

import torch

import ltkd_kernels as lk
from ltkd_kernels.ops.config import GROUP_CLASS, GroupedKLConfig

from .. import measure
from ..inputs import logit_problem, random_logits
from ..report import markdown_table, new_row
from ..sweep import Context, fill_timing
from . import CaseResult, case, target

SIZE = (1024, 128256)
GROUP_COUNTS = (8, 32)
LAYOUTS = ("ranges", "drawn")
# The walks timed per layout (the rule's first).
WALKS = {"ranges": ("ranges", "ordered", "class"), "drawn": ("windows", "ordered", "class")}


def group_ids(layout: str, num_groups: int, vocab: int, device) -> torch.Tensor:
    if layout == "ranges":
        return (torch.arange(vocab) * num_groups // vocab).to(device)
    generator = torch.Generator().manual_seed(num_groups)
    return torch.randint(0, num_groups, (vocab,), generator=generator).to(device)


@case("groups", "LTKD with many groups (CUDA, N=1024 V=128256 bf16, G in {8, 32}): the ranges, "
      "ordered, window and CLASS walks on ranges and on drawn groups", devices=("cuda",))
def run(ctx: Context) -> CaseResult:
    from ltkd_kernels.ops import class_order
    from ltkd_kernels.triton import grouped_kl as ops

    if ctx.device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            ctx.note("case groups: CUDA only (it times the compiled Triton kernels); nothing run")
            return CaseResult([])
        ctx.note("case groups: the Triton interpreter on the CPU (a smoke run: its times say "
                 "nothing about a GPU's)")
    N = ctx.option("N", [SIZE[0]])[0]
    V = ctx.option("V", [SIZE[1]])[0]
    student, teacher = random_logits(N, V, torch.Generator().manual_seed(0))
    student = student.to(ctx.device, torch.bfloat16).requires_grad_()
    teacher = teacher.to(ctx.device, torch.bfloat16)
    rows: List[dict] = []
    for G in ctx.option("G", list(GROUP_COUNTS)):
        problem = logit_problem("ltkd", N, V, "bfloat16", G=G)
        for layout in LAYOUTS:
            groups = group_ids(layout, G, V, ctx.device)
            sectors = class_order.remember(groups, G).sectors[2]
            cfg = GroupedKLConfig(num_groups=G, group_rule=GROUP_CLASS)
            chosen = ops._class_order(cfg, groups, student, teacher, None, False)[1] or "class"
            ctx.log(f"{problem.label()} {layout} groups: {sectors:.2f} sectors per sector, the "
                    f"rule takes the {chosen} walk")
            for walk in WALKS[layout]:
                def setup(i):
                    student.grad = None
                    return student

                def region(x, walk=walk, groups=groups, G=G):
                    with ops.forced_walk(walk):
                        lk.ltkd_loss(x, teacher, groups, G, temperature=2.0,
                                     backend="triton").backward()

                try:
                    result = measure.time_region(setup, region, ctx.device,
                                                 warmup=ctx.settings.warmup,
                                                 min_reps=ctx.settings.min_reps,
                                                 max_reps=ctx.settings.max_reps,
                                                 budget_s=ctx.settings.budget_s)
                except Exception as error:  # noqa: BLE001  (reported in the row)
                    result = error
                note = (f"{layout} groups ({sectors:.2f} sectors per sector), {walk} walk"
                        + (" (the rule's)" if walk == chosen else ""))
                # (one provider name per layout and walk: the summary's tables pivot on it)
                row = new_row("groups", problem, f"triton {layout}/{walk}", "full", note=note)
                rows.append(fill_timing(row, result, problem.floor_bytes("full"), ctx))
    return CaseResult(rows, targets=_targets, sections=_sections)


def _targets(rows) -> List[dict]:
    """Per G and layout: the fastest other walk's time over the rule's (at least 1: the rule is
    right)."""
    out = []
    for G in sorted({r["G"] for r in rows}):
        for layout in LAYOUTS:
            mine = [r for r in rows if r["G"] == G and r["note"].startswith(layout)]
            rule = next((r for r in mine if "(the rule's)" in r["note"]), None)
            others = [r["median_ms"] for r in mine
                      if "(the rule's)" not in r["note"] and r["median_ms"]]
            value = None
            if rule and others and rule["median_ms"]:
                value = min(others) / rule["median_ms"]
            walk = "—" if rule is None else rule["provider"].split("/")[-1]
            out.append(target(f"G={G} {layout} groups: the fastest other walk's time over the "
                              f"rule's ({walk})", value, ">= 1",
                              None if value is None else value >= 1, "x"))
    return out


def _sections(rows) -> List[str]:
    header = ["G", "groups, walk", "median ms", "fraction of floor"]
    body = [[r["G"], r["note"], "—" if r["median_ms"] is None else f"{r['median_ms']:.3f}",
             "—" if r["fraction_of_floor"] is None else f"{100 * r['fraction_of_floor']:.1f}%"]
            for r in rows]
    return ["## The walks of many groups", ""] + markdown_table(header, body) + [""]
