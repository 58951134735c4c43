"""Ahead-of-time compile of every Triton kernel specialisation for real GPUs, on a machine without one.

Each kernel the launchers can launch (the grouped-KL ops of ``ltkd_kernels/triton/grouped_kl.py``
and the SRW weights of ``ltkd_kernels/triton/srw_launchers.py``) is compiled for sm_80, sm_90
and sm_100 with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, and its
cubin inspected with the ``cuobjdump`` shipped in the Triton wheel:

- it compiles; no local memory (spills) and no stack;
- registers within the budget that keeps two blocks resident per SM
  (``65536 / (2 * 32 * num_warps)``, at most 255: 8 warps -> 128);
- on sm_90, the instructions per element of the main vocabulary loop (found by its backward
  branch: the innermost loop holding a global load; its static instruction count divided by
  the classes one thread takes per iteration; times the number of group chunks reading the
  row): the grouped-KL forward walk at most 40 for G <= 3, 60 for G <= 8, 120 for G <= 32; the
  gradient walk at most 55. Specialisations that miss their budget are listed in
  ``KNOWN_OVER_BUDGET`` with the reason (reported, not failed).

The specialisations are not listed here: the launchers themselves are run on ``meta``-device
tensors for a table of *situations* (losses, dtypes, options) with the kernels replaced by
recorders, and each recorded launch is typed exactly as the JIT would type it
(``native_specialize_impl``: pointers and multiples of 16 get divisibility hints, ints equal to
1 become constants). A launcher that picks a new specialisation is thereby compiled here.

Run in a subprocess without ``TRITON_INTERPRET`` (two worker processes). The default pytest
compiles the ``CORE_SITUATIONS`` (every kernel, each main flag, the G <= 3 and G = 8
budgets, the ordered walk at G = 32) for sm_80 and sm_90; the whole matrix (every situation,
three targets, ~100 launches) is marked ``slow`` (CI runs it: about 15 minutes of CPU cold on 2 cores). Triton
caches every compiled kernel and this test caches each cubin's ``cuobjdump`` metrics by its
hash next to Triton's cache: with both warm (kernels unchanged since the last run on the
machine) each takes seconds.
``LTKD_COMPILE_ARCHS=90`` restricts the targets of the whole matrix. The table:

    python -m tests.test_compile_targets            # print the table
    python -m tests.test_compile_targets --write    # and write benchmarks/results/compile_table.md
    python -m tests.test_compile_targets --walk     # every kernel's JIT dependency walk only

The Triton 3.6 table (torch 2.11 brings that version; from an environment with
``triton==3.6.0``): ``python -m tests.test_compile_targets --core --arch 90 --write --out
benchmarks/results/compile_table_triton3.6.md``.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "benchmarks" / "results" / "compile_table.md"
ARCHS = tuple(int(a) for a in os.environ.get("LTKD_COMPILE_ARCHS", "80,90,100").split(","))
BUDGET_ARCH = 90
# Forward walks measured over their budget, by the number of groups: (lowest G, highest G) ->
# why. Reported in the table (and in the test's output), not failed.
KNOWN_OVER_BUDGET: Dict[tuple, str] = {
    (17, 32): "the CLASS walk: about 4 G + 20 per chunk of 16 groups, each chunk reading the "
              "row: 2 x (4 x 16 + 23) at G = 32 (a compare and three predicated sums per group "
              "and element). For groups that are ranges (the 'ranges' rows), or that gather "
              "cheaply (the 'ordered' rows), or are interleaved finer (the window walk, the "
              "'ORDER=4' rows: 47.8 at G = 32) the launcher takes a walk flat in G; the CLASS "
              "walk is left for calls without a plan (torch.compile's graphs), Triton 3.3 "
              "and older, and class weights with interleaved groups (no public loss)",
}


def _triton_bin(name: str) -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else shutil.which(name)


@functools.lru_cache(maxsize=None)
def drawn_window_fill(groups: int, vocab: int = 32768) -> float:
    """The share of the window walk's slots that hold a class, for ``groups`` drawn at random
    over ``vocab`` classes (seed 0): its instructions per class are those per slot over it."""
    import torch

    from ltkd_kernels.ops import class_order

    drawn = torch.randint(groups, (vocab,), generator=torch.Generator().manual_seed(0))
    return class_order.build(drawn, groups).windows.fill


def states_budget(groups: int) -> Optional[float]:
    """Instructions per element of the forward walk (sm_90, bf16): by the number of groups."""
    if groups <= 3:
        return 40.0
    if groups <= 8:
        return 60.0
    if groups <= 32:
        return 120.0
    return None


GRAD_BUDGET = 55.0
# Shared memory a launch may ask for and keep two blocks resident per SM (half of what one SM
# gives a block: 164 KB on sm_80, 228 KB on sm_90 and sm_100, less 1 KB reserved per block).
SHARED_BUDGET = {80: 81 * 1024, 90: 113 * 1024, 100: 113 * 1024}

# Documented exceptions to "no local memory": (kernel, arch, config text fragment) -> why.
KNOWN_SPILLS: Dict[tuple, str] = {
    ("grouped_kl_states_kernel", 90, "BLOCK_G=16 HAS_S DENSE_T BAD_OR "): (
        "sm_90, exactly 16 groups (one chunk, ids checked by OR), since the walk keeps no "
        "per-group maxima (2026-11-27): 8 bytes of stack, no local memory; which value ptxas "
        "parks there was not examined (G = 32, the same walk in two chunks, has none); with "
        "int32 ids (VEC=4 UNROLL=4) and with the compact int8 ids (VEC=8 UNROLL=2) alike"),
    ("grouped_kl_states_kernel", 80, "VEC=8 UNROLL=2 BLOCK_G=16 HAS_S DENSE_T BAD_OR "): (
        "sm_80, exactly 16 groups with the compact int8 ids (2026-11-27): 8 bytes of stack, no "
        "local memory, as sm_90's at 16 groups (above); the int32-id walk (VEC=4) has none "
        "on sm_80"),
    ("grouped_kl_states_kernel", 80, "GC=4 G_LIVE=4 VEC=4 UNROLL=4 BLOCK_G=4 HAS_S DENSE_T "
     "BAD_OR PAIRS_S PAIRS_T "): (
        "sm_80, 4 groups, since each unit is its own load (2026-11-27): one 64-bit value "
        "stored before the main loop and loaded back at its head (one 8-byte load from L1 per "
        "16 classes of a thread)"),
    ("grouped_kl_states_kernel", 100, "GC=2 G_LIVE=2 VEC=4 UNROLL=4 BLOCK_G=2 HAS_S DENSE_T "
     "BAD_OR PAIRS_S PAIRS_T "): (
        "sm_100, 2 groups, since each unit is its own load (2026-11-27): as the sm_80 one "
        "at 4 groups (one 8-byte reload per iteration)"),
    ("grouped_kl_states_kernel", 80, "TOPK=0 GC=1 G_LIVE=1 VEC=8 UNROLL=1 BLOCK_G=32 HAS_S "
     "ORDER=4 "): (
        "sm_80, the window walk with a renormalized top-k teacher (2026-11-28): one register "
        "stored to the stack after the main loop and loaded back once, both outside it (the "
        "top-k entries' code; sm_90 and sm_100 have none)"),
    ("grouped_kl_states_kernel", 90, "GC=8 G_LIVE=8 VEC=4 UNROLL=4 BLOCK_G=8 HAS_S DENSE_T "
     "HAS_MASK BAD_OR "): (
        "Triton 3.6 only (the CI's Triton-3.6 step), 8 groups with a row mask: one register "
        "stored to the stack and loaded back once, both outside the main loop (the loop and "
        "its 52.7 instructions per element are those of Triton 3.9, which has no spill)"),
}


# ---------------------------------------------------------------------------------------------
# Situations: the launchers' inputs whose launches are recorded.

def _situations():
    """``(label, groups, run)``: ``run()`` calls the launchers on meta tensors."""
    import torch

    from ltkd_kernels.ops.config import (GROUP_CLASS, GROUP_TARGET, REDUCE_MEAN, REDUCE_NONE,
                                         REDUCE_SUM, TOPK_BUCKET, TOPK_RENORMALIZE, TOPK_RESTRICT,
                                         GroupedKLConfig)
    from ltkd_kernels.triton import grouped_kl as ops

    meta = torch.device("meta")
    rows, vocab = 1024, 32768

    def tensor(shape, dtype):
        return torch.empty(shape, dtype=dtype, device=meta)

    def case(cfg, dtype=torch.bfloat16, teacher_dtype=None, topk=0, groups_dtype=torch.int32,
             target=False, mask=None, cw=False, sw=False, glm=False, student=True, n=rows,
             teacher=True, reductions=(REDUCE_MEAN,), partial=False, bp=False, num_items=False,
             grad=True, ordered=False, ranges=False, windows=False, stages=None):
        def run():
            with ops.forced_walk("windows" if windows else "ranges" if ranges
                                 else "ordered" if ordered else "class"), \
                    ops.forced_stages(stages):
                walk()

        def walk():
            s = tensor((n, vocab), dtype) if student else None
            t = None
            idx = lp = None
            if topk:
                idx = tensor((n, topk), torch.int64)
                lp = tensor((n, topk), torch.float32)
            elif teacher:
                t = tensor((n, vocab), teacher_dtype or dtype)
            g = tensor((vocab,), groups_dtype) if cfg.group_rule == GROUP_CLASS else None
            tg = tensor((n,), torch.int64) if target else None
            m = tensor((n,), mask) if mask is not None else None
            w = tensor((vocab,), torch.float32) if cw else None
            sample = tensor((n,), torch.float32) if sw else None
            lm = tensor((n, cfg.num_groups), torch.float32) if glm else None
            state, extras = ops.states(s, t, idx, lp, g, tg, w, m, cfg)
            for red in reductions:
                c = cfg._replace(reduction=red)
                bpart = tensor((4, 2 * cfg.num_groups + 2), torch.float32) if bp else None
                items = tensor((), torch.int64) if num_items else None
                loss, saved = ops.finish(state, extras, m, tg, sample, lm, bpart, items, c)
                if partial:
                    ops.finish(state, extras, m, tg, sample, lm, None, None, c, partial_only=True)
                if grad and s is not None:
                    gl = tensor((n,) if red == REDUCE_NONE else (), torch.float32)
                    ops.grad(s, t, idx, lp, g, tg, w, m, sample, lm, state, extras, saved, gl, c)
        return run

    ltkd = GroupedKLConfig(num_groups=3, temperature=4.0, alpha=0.7, beta=1.3, rebalance=True,
                           group_rule=GROUP_CLASS)
    kd = GroupedKLConfig(temperature=2.0)
    dkd = GroupedKLConfig(num_groups=2, temperature=4.0, beta=8.0, group_rule=GROUP_TARGET)
    out = [
        ("kd bf16", 1, case(kd, reductions=(REDUCE_MEAN, REDUCE_SUM, REDUCE_NONE))),
        ("kd fp16", 1, case(kd, torch.float16)),
        ("kd fp32", 1, case(kd, torch.float32)),
        ("kd bf16 student, fp32 teacher", 1, case(kd, teacher_dtype=torch.float32)),
        ("kd bf16 T=1 + CE, bool mask", 1, case(kd._replace(temperature=1.0, ce_weight=0.5),
                                                  target=True, mask=torch.bool)),
        ("bkd bf16 CE, class weights, int mask, sample weights", 1,
         case(kd._replace(temperature=3.0, ce_weight=1.0), target=True, mask=torch.int64,
              cw=True, sw=True, reductions=(REDUCE_MEAN, REDUCE_NONE))),
        ("dkd bf16", 2, case(dkd, target=True)),
        ("ltkd bf16 G=2", 2, case(ltkd._replace(num_groups=2))),
        ("ltkd bf16 G=3", 3, case(ltkd, reductions=(REDUCE_MEAN, REDUCE_NONE), partial=True)),
        ("ltkd fp32 G=3", 3, case(ltkd, torch.float32)),
        ("ltkd fp16 G=3, int64 groups", 3, case(ltkd, torch.float16, groups_dtype=torch.int64)),
        ("ltkd bf16 G=3 within_teacher", 3, case(ltkd._replace(rebalance=False, within_teacher=True))),
        ("ltkd bf16 G=3 + CE (T=4)", 3, case(ltkd._replace(ce_weight=0.5), target=True)),
        ("ltkd bf16 G=4", 4, case(ltkd._replace(num_groups=4))),
        ("ltkd bf16 G=8", 8, case(ltkd._replace(num_groups=8), mask=torch.bool, sw=True)),
        ("ltkd bf16 G=16", 16, case(ltkd._replace(num_groups=16))),
        ("ltkd bf16 G=32", 32, case(ltkd._replace(num_groups=32))),
        ("ltkd bf16 G=100, partials in", 100, case(ltkd._replace(num_groups=100,
                                                                 denominator_from_partials=True),
                                                   bp=True, num_items=False)),
        ("ltkd bf16 G=1024", 1024, case(ltkd._replace(num_groups=1024), num_items=True)),
        ("ltkd bf16 G=8, ordered", 8, case(ltkd._replace(num_groups=8), ordered=True)),
        ("ltkd bf16 G=32, ordered", 32, case(ltkd._replace(num_groups=32), ordered=True)),
        ("ltkd fp32 G=32, ordered, within_teacher + CE (T=4)", 32,
         case(ltkd._replace(num_groups=32, rebalance=False, within_teacher=True, ce_weight=0.5),
              torch.float32, target=True, ordered=True)),
        ("ltkd bf16 G=1024, ordered", 1024, case(ltkd._replace(num_groups=1024), ordered=True)),
        ("topk renormalize ltkd G=32, ordered", 32,
         case(ltkd._replace(num_groups=32, topk_rule=TOPK_RENORMALIZE), topk=64, ordered=True)),
        ("ltkd bf16 G=3, ranges", 3, case(ltkd, ranges=True)),
        ("ltkd fp32 G=3, ranges, within_teacher + CE (T=4)", 3,
         case(ltkd._replace(rebalance=False, within_teacher=True, ce_weight=0.5),
              torch.float32, target=True, ranges=True)),
        ("ltkd bf16 G=32, ranges", 32, case(ltkd._replace(num_groups=32),
                                            ranges=True)),
        ("ltkd bf16 G=32, windows", 32, case(ltkd._replace(num_groups=32), windows=True)),
        ("ltkd bf16 G=8, windows, int8 ids, bool mask, sample weights", 8,
         case(ltkd._replace(num_groups=8), groups_dtype=torch.int8, mask=torch.bool, sw=True,
              windows=True)),
        ("ltkd fp32 G=32, windows, within_teacher + CE (T=4)", 32,
         case(ltkd._replace(num_groups=32, rebalance=False, within_teacher=True, ce_weight=0.5),
              torch.float32, target=True, windows=True)),
        ("ltkd bf16 G=100, windows", 100, case(ltkd._replace(num_groups=100), windows=True,
                                               reductions=())),
        ("ltkd bf16 G=32, windows, teacher only", 32,
         case(ltkd._replace(num_groups=32), student=False, grad=False, windows=True)),
        ("topk renormalize ltkd G=32, windows", 32,
         case(ltkd._replace(num_groups=32, topk_rule=TOPK_RENORMALIZE), topk=64, windows=True)),
        ("ltkd bf16 G=3, 8 rows (V-split)", 3, case(ltkd, n=8)),
        # Software-pipelined walks (forced_stages: no rule takes them yet; benchmarks.split_probe
        # times them on a GPU)
        ("kd bf16, 8 rows (V-split), 3 stages", 1, case(kd, n=8, stages=3)),
        ("ltkd bf16 G=3, 8 rows (V-split), 3 stages", 3, case(ltkd, n=8, stages=3)),
        ("ltkd bf16 G=3, ranges, 8 rows, 3 stages", 3, case(ltkd, n=8, ranges=True, stages=3)),
        ("ltkd bf16 G=3, teacher only", 3, case(ltkd, student=False, grad=False)),
        ("kd bf16 student only (group logsumexp)", 1, case(kd, teacher=False, grad=False)),
        ("topk renormalize ltkd G=3, group_logmass", 3,
         case(ltkd._replace(topk_rule=TOPK_RENORMALIZE, within_teacher=True), topk=64, glm=True)),
        ("topk restrict kd + CE", 1, case(kd._replace(topk_rule=TOPK_RESTRICT, ce_weight=1.0),
                                           topk=64, target=True)),
        ("topk bucket kd", 2, case(GroupedKLConfig(num_groups=2, topk_rule=TOPK_BUCKET), topk=64)),
        ("topk dkd", 2, case(dkd._replace(topk_rule=TOPK_RENORMALIZE), topk=64, target=True)),
    ]
    # The finish's block configurations: one per power of two of G.
    for log_g in range(0, 11):
        G = 1 << log_g
        cfg = ltkd._replace(num_groups=G) if G > 1 else kd
        out.append((f"finish tile G={G}", G, case(cfg, grad=False, n=8)))
    return out


def _srw_situations():
    import torch

    from ltkd_kernels.triton import srw_launchers

    meta = torch.device("meta")

    def case(batch, patches, dim, dtype, mask):
        def run():
            feats = torch.empty((batch, patches, dim), dtype=dtype, device=meta)
            m = torch.empty((batch, patches), dtype=torch.bool, device=meta) if mask else None
            srw_launchers.srw_weights_impl(feats, m, 0.5, 1e-8)
        return run

    return [
        ("srw bf16 D=256", 0, case(8, 4096, 256, torch.bfloat16, False)),
        ("srw fp16 D=768 mask", 0, case(8, 4096, 768, torch.float16, True)),
        ("srw fp32 D=4096 (two walks over D)", 0, case(2, 1000, 4096, torch.float32, True)),
        ("srw fp32 (N, D) batch", 0, case(1, 100000, 64, torch.float32, False)),
    ]


class _Recorder:
    def __init__(self, fn, sink, label):
        self.fn, self.sink, self.label = fn, sink, label

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.label, self.fn, args, kwargs))
        return launch


# The default test's subset: every kernel, each main flag once, the G <= 3 budgets. The slow test
# (and ``--write``) compile every situation.
CORE_SITUATIONS = frozenset({
    "kd bf16", "kd fp32", "kd bf16 T=1 + CE, bool mask",
    "bkd bf16 CE, class weights, int mask, sample weights", "dkd bf16", "ltkd bf16 G=3",
    "ltkd bf16 G=8", "ltkd bf16 G=32, ordered", "ltkd bf16 G=3, 8 rows (V-split)",
    "ltkd bf16 G=3, ranges", "ltkd bf16 G=32, windows", "kd bf16, 8 rows (V-split), 3 stages",
    "topk bucket kd",
    "topk renormalize ltkd G=3, group_logmass", "srw bf16 D=256", "srw fp16 D=768 mask"})
CORE_ARCHS = (80, 90)


def collect_launches(core: bool = False) -> List[tuple]:
    """Every launch of the situations: ``(situation, groups, kernel, args, kwargs)``; with
    ``core``, of the situations in ``CORE_SITUATIONS`` only."""
    from ltkd_kernels.triton import grouped_kl_kernels, srw_launchers

    launches = []
    patched = []
    kernels = {name: getattr(grouped_kl_kernels, name) for name in dir(grouped_kl_kernels)
               if name.startswith("grouped_kl_") and name.endswith("_kernel")}
    srw = {name: getattr(srw_launchers, name) for name in dir(srw_launchers)
           if name.startswith("srw_") and name.endswith("_kernel")}
    sink: List[tuple] = []
    try:
        for module, table in ((grouped_kl_kernels, kernels), (srw_launchers, srw)):
            for name, fn in table.items():
                setattr(module, name, _Recorder(fn, sink, name))
                patched.append((module, name, fn))
        for label, groups, run in _situations() + _srw_situations():
            if core and label not in CORE_SITUATIONS:
                continue
            sink.clear()
            run()
            for kernel_name, fn, args, kwargs in sink:
                launches.append((label, groups, kernel_name, fn, args, kwargs))
    finally:
        for module, name, fn in patched:
            setattr(module, name, fn)
    return launches


# ---------------------------------------------------------------------------------------------
# Compiling one launch.

OPTION_KEYS = ("num_warps", "num_stages", "enable_fp_fusion", "num_ctas", "maxnreg")


def _spec(fn, args, kwargs, arch):
    """``(ASTSource, options)`` of a recorded launch, typed as the JIT types it."""
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    try:
        from triton.runtime.jit import native_specialize_impl
    except ImportError:  # Triton 3.3-3.5: the same typing, from Python
        from triton.runtime import jit as _jit

        try:
            _typed = _jit.create_specialize_impl(BaseBackend.get_arg_specialization)  # 3.4-3.5
        except TypeError:  # 3.3: the backend's hook is an argument of each call
            _plain = _jit.create_specialize_impl()

            def _typed(arg, is_const=False, specialize_value=True, align=True):
                return _plain(arg, BaseBackend.get_arg_specialization, is_const,
                              specialize_value, align)

        def native_specialize_impl(_backend, arg, is_const, specialize_value, align):
            return _typed(arg, is_const, specialize_value, align)

    backend = CUDABackend(GPUTarget("cuda", arch, 32))
    names = fn.arg_names
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k not in OPTION_KEYS})
    constexprs, signature, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = values[name]
        if i in fn.constexprs:
            constexprs[name] = value
            signature[name] = "constexpr"
            continue
        ty, key = native_specialize_impl(BaseBackend, value, False, True, True)
        if ty == "constexpr":
            constexprs[name] = key
            signature[name] = "constexpr"
            continue
        signature[name] = ty
        if isinstance(key, str) and key:
            attrs[(i,)] = backend.parse_attr(key)
    options = {k: v for k, v in kwargs.items() if k in OPTION_KEYS}
    return ASTSource(fn, signature, constexprs, attrs), options


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;")
_BRANCH = re.compile(r"\bBRA(?:\.[A-Z]+)*\s+(?:!?U?P[T0-9]+\s*,\s*)?(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))")
_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def main_loop(sass: str):
    """``(instructions, first, last)`` of the innermost loop holding a global load (first in
    address order), or None."""
    instrs = [(int(m.group(1), 16), m.group(2)) for m in _INSTR.finditer(sass)]
    loops = []
    for addr, text in instrs:
        m = _BRANCH.search(text)
        if m and m.group(1):
            target = int(m.group(1), 16)
            if target <= addr:
                body = [t for a, t in instrs if target <= a <= addr]
                if any(t.split()[0].lstrip("@!P0123456789T ").startswith("LDG") or " LDG" in t
                       for t in body):
                    loops.append((target, addr, len(body)))
    inner = [l for l in loops if not any(o is not l and l[0] <= o[0] and o[1] <= l[1]
                                         and (o[0], o[1]) != (l[0], l[1]) for o in loops)]
    if not inner:
        return None
    first = min(inner, key=lambda l: l[0])
    return first[2], first[0], first[1]


def compile_one(fn, args, kwargs, arch) -> dict:
    """Compile a recorded launch for ``arch``; resources and the main loop's length."""
    import triton

    src, options = _spec(fn, args, kwargs, arch)
    from triton.backends.compiler import GPUTarget

    t0 = time.time()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    seconds = time.time() - t0
    metrics = _cubin_metrics(compiled.asm["cubin"])
    # (the shared memory a launch asks for: the kernel's scratch and pipeline buffers; the
    # cubin's own count is the static part only)
    return dict(metrics, launch_shared=int(compiled.metadata.shared),
                num_warps=options.get("num_warps", 4), seconds=round(seconds, 2))


def _metrics_dir() -> Path:
    """Where a cubin's metrics are kept, by the cubin's hash: next to Triton's own cache (a
    warm run then costs no ``cuobjdump`` calls, ~0.5 s each)."""
    try:
        import triton
        base = Path(triton.knobs.cache.dir)
    except Exception:
        base = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    return base / "ltkd_compile_metrics"


def _cubin_metrics(cubin: bytes) -> dict:
    import hashlib
    import tempfile

    digest = hashlib.sha256(cubin).hexdigest()
    cached = _metrics_dir() / f"{digest}.json"
    if cached.exists():
        try:
            return json.loads(cached.read_text())
        except ValueError:
            pass
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        dump = subprocess.run([_triton_bin("cuobjdump"), "-res-usage", "-sass", path],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    m = _RESOURCE.search(dump)
    loop = main_loop(dump)
    metrics = dict(regs=int(m.group(1)), stack=int(m.group(2)), shared=int(m.group(3)),
                   local=int(m.group(4)), loop=None if loop is None else loop[0])
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(metrics))
        tmp.replace(cached)
    except OSError:
        pass
    return metrics


# ---------------------------------------------------------------------------------------------
# The whole table (run in a subprocess without TRITON_INTERPRET).

def _key(fn, args, kwargs, arch):
    src, options = _spec(fn, args, kwargs, arch)
    return (fn.__name__, arch, json.dumps(src.signature, sort_keys=True),
            json.dumps({str(k): str(v) for k, v in src.constants.items()}, sort_keys=True),
            json.dumps({str(k): v for k, v in src.attrs.items()}, sort_keys=True),
            json.dumps(options, sort_keys=True))


_JOBS: List[tuple] = []


def _run_job(i):
    fn, args, kwargs, arch = _JOBS[i]
    try:
        return compile_one(fn, args, kwargs, arch)
    except Exception as exc:  # reported as a failure row
        return dict(error=f"{type(exc).__name__}: {exc}"[:2000])


def build_table(archs=ARCHS, workers: Optional[int] = None, core: bool = False) -> List[dict]:
    """Compile every distinct launch for every arch; one row per (situation, kernel, arch)."""
    import multiprocessing

    launches = collect_launches(core)
    rows, jobs, index = [], [], {}
    for label, groups, kernel_name, fn, args, kwargs in launches:
        for arch in archs:
            key = _key(fn, args, kwargs, arch)
            if key not in index:
                index[key] = len(jobs)
                jobs.append((fn, args, kwargs, arch))
            values = dict(zip(fn.arg_names, args))
            values.update(kwargs)
            per_thread = values.get("VEC", 1) * values.get("UNROLL", 1)
            if kernel_name == "grouped_kl_states_kernel" and values.get("ORDER") == 4:
                # The window walk's slots per class: those of groups drawn at random.
                per_thread *= drawn_window_fill(groups)
            chunks = values.get("num_chunks", 1) if kernel_name == "grouped_kl_states_kernel" else 1
            rows.append(dict(situation=label, groups=groups, kernel=kernel_name, arch=arch,
                             job=index[key], per_thread=per_thread, chunks=chunks,
                             config=_config_text(kernel_name, values)))
    _JOBS[:] = jobs
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(_run_job, range(len(jobs)), chunksize=1)
    else:
        results = [_run_job(i) for i in range(len(jobs))]
    for row in rows:
        row.update(results[row["job"]])
        row.pop("job")
        _judge(row)
    # A distinct specialisation is listed once per (kernel, arch, config): the first situation.
    seen, unique = set(), []
    for row in rows:
        key = (row["kernel"], row["arch"], row["config"], row["groups"] if row["kernel"] ==
               "grouped_kl_states_kernel" else 0)
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def _config_text(kernel, v) -> str:
    keys = [k for k in ("GROUP_RULE", "TOPK", "GC", "G_LIVE", "VEC", "UNROLL", "BLOCK_G", "BLOCK_R",
                        "REDUCTION", "ONE_TILE", "BLOCK_P", "BLOCK_D", "BLOCK_C", "BLOCK")
            if k in v]
    flags = [k for k, x in v.items() if isinstance(x, bool) and x and k.isupper()]
    tail = [f"CW_LOG={v['CW_LOG']}"] if v.get("HAS_CW") and "CW_LOG" in v else []
    # The walk through the class order: gathered (ORDER) or each group one range (ORDER=2; 3:
    # with int8 ids checked four at a time).
    order = {1: ["ORDER"], 2: ["ORDER=2"], 3: ["ORDER=3"], 4: ["ORDER=4"]}.get(v.get("ORDER"), [])
    staged = [f"STAGES={v['STAGES']}"] if v.get("STAGES", 1) > 1 else []
    return " ".join([f"{k}={v[k]}" for k in keys] + flags + order + tail + staged
                    + [f"w{v.get('num_warps', 4)}"])


def _judge(row):
    problems = []
    if "error" in row:
        row["status"] = "FAIL: does not compile"
        return
    budget_regs = min(255, 65536 // (2 * 32 * row["num_warps"]))
    row["reg_budget"] = budget_regs
    if row["regs"] > budget_regs:
        problems.append(f"{row['regs']} registers > {budget_regs}")
    budget_shared = SHARED_BUDGET.get(row["arch"], SHARED_BUDGET[80])
    if row["launch_shared"] > budget_shared:
        problems.append(f"{row['launch_shared']} B of shared memory > {budget_shared}")
    known_spill = next((why for (kernel, arch, fragment), why in KNOWN_SPILLS.items()
                        if row["kernel"] == kernel and row["arch"] == arch
                        and fragment in row["config"] + " "), None)
    if (row["local"] or row["stack"]) and not known_spill:
        problems.append(f"local memory {row['local']} B, stack {row['stack']} B")
    per_elem = None
    budget = None
    if row["loop"] is not None and row["kernel"] in ("grouped_kl_states_kernel",
                                                      "grouped_kl_grad_kernel"):
        per_elem = row["loop"] / row["per_thread"] * row["chunks"]
        if row["kernel"] == "grouped_kl_states_kernel":
            budget = states_budget(row["groups"])
        else:
            budget = GRAD_BUDGET
    row["per_elem"] = None if per_elem is None else round(per_elem, 1)
    row["budget"] = budget
    note = ""
    if row["arch"] == BUDGET_ARCH and budget is not None and per_elem is not None and per_elem > budget:
        known = next((why for (low, high), why in KNOWN_OVER_BUDGET.items()
                      if row["kernel"] == "grouped_kl_states_kernel" and low <= row["groups"] <= high),
                     None)
        if known:
            note = "over budget (known, see KNOWN_OVER_BUDGET)"
        else:
            problems.append(f"{per_elem:.1f} instructions/element > {budget:g}")
    if known_spill and (row["local"] or row["stack"]):
        note = (note + "; " if note else "") + "spill (known, see KNOWN_SPILLS)"
    row["status"] = "FAIL: " + "; ".join(problems) if problems else ("ok" + (f", {note}" if note else ""))


def format_table(rows: List[dict], archs=ARCHS) -> str:
    lines = ["| kernel | situation | arch | config | regs (budget) | local/stack | smem | "
             "loop instrs | instr/elem (budget) | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['situation']} | sm_{r['arch']} | {r['config']} | "
                         f"- | - | - | - | - | {r['status']}: {r['error'][:200]} |")
            continue
        pe = "" if r["per_elem"] is None else f"{r['per_elem']}"
        if r["budget"] is not None and r["arch"] == BUDGET_ARCH:
            pe += f" ({r['budget']:g})"
        lines.append(f"| {r['kernel'].replace('grouped_kl_', '').replace('_kernel', '')} | "
                     f"{r['situation']} | sm_{r['arch']} | {r['config']} | {r['regs']} "
                     f"({r['reg_budget']}) | {r['local']}/{r['stack']} | {r['launch_shared']} | "
                     f"{'' if r['loop'] is None else r['loop']} | {pe} | {r['status']} |")
    return "\n".join(lines)


def _write_markdown(rows, seconds, path=TABLE):
    import triton
    header = f"""# Ahead-of-time compile of the Triton kernels

Written by `python -m tests.test_compile_targets --write` (triton {triton.__version__}, ptxas and
cuobjdump from the wheel; no GPU). One row per distinct specialisation the launchers pick for
the situations of `tests/test_compile_targets.py`, per target. `instr/elem`: static SASS
instructions of the main vocabulary loop (innermost loop with a global load, found by its
backward branch) divided by the classes one thread takes per iteration, times the number of
group chunks that read the row; budgets (sm_90): forward 40 (G <= 3), 60 (G <= 8), 120
(G <= 32); gradient 55. Registers: budget for two resident blocks per SM. `smem`: the shared
memory a launch asks for (the kernel's scratch and, with `STAGES`, its pipeline buffers; since
2026-11-28, before which the column held the cubin's static count), within half an SM's for
two resident blocks (81 KB on sm_80, 113 KB on sm_90 and sm_100). Compile time of the
table: {seconds:.0f} s (2 processes; cached kernels reused).

Before (the two-op kernels this replaced, same count, from the issue): forward 66 (G = 1), 189
(G = 3), 420 (G = 8), 3622 (G = 32); backward 54. With per-group maxima in the CLASS walk's
loop at every G (until 2026-11-27; G <= 4 keep them, about 6 G + 17): 64.8 (G = 8), 256.9
(G = 32); without them (G > 4) about 4 G + 20. The ordered walk (rows marked `ordered`,
since 2026-11-27: the groups one by one through the class order, the logits gathered) costs
the same per element for any G; the launcher takes it from 5 groups where its gathers move no
more sectors than the CLASS walk (docs/design.md). Rows marked `ranges` (`ORDER=3`, since
2026-11-27): groups that are each one range of classes, read densely one group after the
other at any G from 2 (the one-group walk plus an id check of the int8 ids four at a time;
class by class, `ORDER=2`, where the ids are wider or unaligned: 28.1 per element on sm_90).
Rows marked `ORDER=4` (the window walk, since 2026-11-28): groups interleaved finely, every
lane one group, its classes handed to it per window of 1024 through shared memory; its
instructions per class are those per slot over the share of slots that hold a class, the
share of groups drawn at random over the situation's 32768 classes (0.80 at G = 32; 0.54
at G = 100). Known miss (see `KNOWN_OVER_BUDGET`): the CLASS walk at G = 17..32 (about
4 G + 20 per chunk of 16 groups, each chunk reading the row), now taken for finely
interleaved groups only where the window walk does not apply (no plan: graphs traced by
`torch.compile`; Triton 3.3 and older; class weights). Known spills (see `KNOWN_SPILLS`), 8
bytes of stack each: sm_90 at exactly 16 groups (and sm_80 there with the compact ids);
sm_80 at 4 groups and sm_100 at 2 groups (one reload per iteration of the main loop, since
each unit is its own load); sm_80's window walk with a top-k teacher (once, outside the
loop). The sm_80 spill of 16-group chunks before 2026-11-27 is gone. Rows marked `STAGES=3`
(since 2026-11-28): the walks' loops software-pipelined by the compiler, which
`forced_stages` asks for and no rule yet takes (docs/design.md, "Few rows").

The situations take 1024 rows of 32768 classes unless their label says otherwise: from 8 rows
and 2^20 elements the launchers read the group ids as an int8 copy (`VEC=8` for bf16 logits)
and the class weights as logs taken once per call (`CW_LOG=2`; 1 is the kernels' own hardware
log, at smaller sizes), since 2026-11-27 (docs/design.md, "What the walks read besides the
logits").

Under Triton 3.6 (torch 2.11's; `benchmarks/results/compile_table_triton3.6.md`, the default
suite's situations for sm_90) the states kernel compiled to 82.5 (G = 3) and 102.4 (G = 8)
per element until the walk loaded each unit of an iteration on its own (docs/design.md, "One
load per unit"); since then both versions give the same loops.

"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + format_table(rows) + "\n")


def dependency_walks() -> List[str]:
    """Every kernel's JIT dependency walk (``cache_key``: Triton resolves each helper the kernel
    source names, taken or not), as a launch on a GPU does first: ``"name key"`` per kernel.
    Triton 3.2 to 3.4 never end the walk of a recursive helper, and 3.2 has no ``tl.gather``
    (``--walk`` runs this under the installed Triton; CI under Triton 3.2)."""
    from ltkd_kernels.triton import grouped_kl_kernels, srw_kernels

    out = []
    for module, prefix in ((grouped_kl_kernels, "grouped_kl_"), (srw_kernels, "srw_")):
        for name in sorted(dir(module)):
            if name.startswith(prefix) and name.endswith("_kernel"):
                out.append(f"{name} {getattr(module, name).cache_key[:16]}")
    return out


def _jit_functions():
    """``(file name, source, node)`` of every ``@triton.jit`` function of the package."""
    import ast

    root = Path(__file__).resolve().parent.parent / "ltkd_kernels" / "triton"
    for path in sorted(root.glob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and any(
                    getattr(d, "attr", getattr(d, "id", "")) == "jit" for d in node.decorator_list):
                yield path.name, source, node


def recursive_jit_functions() -> List[str]:
    """The ``@triton.jit`` functions of the package that call themselves by name."""
    import ast

    found = []
    for name, _, node in _jit_functions():
        called = {n.func.id for n in ast.walk(node)
                  if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        if node.name in called:
            found.append(f"{name}:{node.name}")
    return found


def chained_boolean_operators() -> List[str]:
    """``A and B and C`` (one operator over three operands) in ``@triton.jit`` functions:
    Triton 3.2-3.3 reject it (``(A and B) and C`` is two)."""
    import ast

    return [f"{name}:{node.name}:{b.lineno}" for name, _, node in _jit_functions()
            for b in ast.walk(node) if isinstance(b, ast.BoolOp) and len(b.values) > 2]


def _main(argv):
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import warnings
    warnings.filterwarnings("ignore")
    if "--walk" in argv:
        import triton
        walks = dependency_walks()
        print("\n".join(walks))
        print(f"triton {triton.__version__}: {len(walks)} kernels' dependency walks end")
        return 0
    t0 = time.time()
    core = "--core" in argv
    archs = CORE_ARCHS if core else ARCHS
    if "--arch" in argv:
        archs = tuple(int(a) for a in argv[argv.index("--arch") + 1].split(","))
    rows = build_table(archs, core=core)
    seconds = time.time() - t0
    if "--json" in argv:
        print(json.dumps(rows))
        return 0
    print(format_table(rows, archs))
    print(f"\n{len(rows)} rows, {time.time() - t0:.0f} s")
    if "--write" in argv:
        out = argv[argv.index("--out") + 1] if "--out" in argv else TABLE
        _write_markdown(rows, seconds, out)
        print(f"written {out}")
    return 0 if all(r["status"].startswith("ok") for r in rows) else 1


# ---------------------------------------------------------------------------------------------
# The pytest entry point.

def _compile_and_check(core: bool):
    import pytest

    if _triton_bin("ptxas") is None or _triton_bin("cuobjdump") is None:
        pytest.skip("ptxas / cuobjdump not found (the Triton wheel ships them under "
                    "triton/backends/nvidia/bin)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "tests.test_compile_targets", "--json"]
    done = subprocess.run(command + (["--core"] if core else []),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    print("\n" + format_table(rows))
    failures = [f"{r['kernel']} [{r['situation']}] sm_{r['arch']}: {r['status']}"
                for r in rows if not r["status"].startswith("ok")]
    assert not failures, "\n".join(failures)
    kernels = {r["kernel"] for r in rows}
    assert {"grouped_kl_states_kernel", "grouped_kl_merge_kernel", "grouped_kl_finish_kernel",
            "grouped_kl_grad_kernel"} <= kernels
    if not core:
        assert sum(k.startswith("srw_") for k in kernels) == 5


def test_no_recursive_jit_helpers():
    """Triton 3.2-3.4 (torch 2.6-2.8) never end the dependency walk of a helper that calls
    itself: every launch would fail there (a RecursionError). Helpers that split a tile level
    by level have one function per level."""
    assert recursive_jit_functions() == []


def test_no_chained_boolean_operators_in_kernels():
    """Triton 3.3 (torch 2.7) refuses ``A and B and C`` in a kernel ("chained boolean
    operators are not supported"): the states kernel did not compile there."""
    assert chained_boolean_operators() == []


def test_core_specialisations_compile_within_budgets():
    """Every kernel, each main flag, the G <= 3 budgets, for sm_80 and sm_90 (about a minute
    cold on 2 cores, seconds with Triton's cache warm)."""
    _compile_and_check(core=True)


def test_every_specialisation_compiles_within_budgets():
    """The whole matrix: every situation, sm_80, sm_90 and sm_100 (about 15 minutes of CPU
    cold)."""
    _compile_and_check(core=False)


# Marked here, not in a decorator above, so that the module stays importable without pytest.
def _mark_slow():
    try:
        import pytest
    except ImportError:  # pragma: no cover
        return
    globals()["test_every_specialisation_compiles_within_budgets"] = pytest.mark.slow(
        test_every_specialisation_compiles_within_budgets)


_mark_slow()


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
