"""The case registry of ``python -m benchmarks.run``: one entry per kind of measurement.

A case is a function ``run(ctx) -> CaseResult`` (``ctx``: :class:`benchmarks.sweep.Context`:
the device, the timing settings, the copy bandwidth, the command-line options, ``quick``),
registered under a name with :func:`case`::

    from benchmarks.cases import CaseResult, case

    @case("linear", "fused linear + loss against eager matmul + loss", devices=("cpu", "cuda"))
    def run(ctx):
        rows = ...  # dicts with at least the columns of benchmarks.report.FIELDS
        return CaseResult(rows, targets=lambda rows: [target(...), ...],
                          sections=lambda rows: [...Markdown lines...])

The runner writes each case's rows to ``<out>/<name>/results.csv``, ``results.json`` and
``summary.md`` (with the speed-up columns, the targets and the case's own sections) and
draws its plots (``CaseResult.plots``). The cases of this package are the modules below;
:data:`EXTERNAL_MODULES` (the fused-linear and distributed benchmarks) are imported when
they exist and register themselves the same way, or get an adapter in
:mod:`benchmarks.cases.external` (``distributed``, around its ``run`` function).
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

BUILTIN_MODULES = ("classification", "lm", "topk", "launches", "srw", "groups")
EXTERNAL_MODULES = ("benchmarks.linear", "benchmarks.distributed")


@dataclass
class CaseResult:
    """What a case returns. ``targets`` and ``sections`` are called with the rows once the
    runner has added the speed-up columns (``x_eager``, ``x_compile``)."""

    rows: List[dict]
    targets: Optional[Callable] = None   # targets(rows) -> [target(...)]
    sections: Optional[Callable] = None  # sections(rows) -> Markdown lines for summary.md
    plots: Optional[Callable] = None     # plots(rows, metadata, out_dir) -> file names
    metadata: Dict = field(default_factory=dict)  # merged into results.json's metadata


@dataclass
class Case:
    name: str
    summary: str
    run: Callable
    devices: Tuple[str, ...] = ("cpu", "cuda")
    default: bool = True  # run by ``python -m benchmarks.run`` without ``--case``


REGISTRY: Dict[str, Case] = {}
LOAD_ERRORS: Dict[str, str] = {}


def case(name: str, summary: str, *, devices: Sequence[str] = ("cpu", "cuda"),
         default: bool = True):
    """Register the decorated ``run(ctx) -> CaseResult`` as the case ``name``."""
    def register(run):
        REGISTRY[name] = Case(name, summary, run, tuple(devices), default)
        return run
    return register


def target(name: str, measured: Optional[float], wanted: str, met: Optional[bool],
           unit: str = "") -> dict:
    """One target of an issue, as the summary reports it (``met=None``: not measured)."""
    text = "—" if measured is None else f"{measured:.3g}{unit}"
    return dict(name=name, measured=text, value=measured, target=wanted, met=met)


def load() -> Dict[str, Case]:
    """Import every case module (the external ones where present; an import error of one is
    recorded in :data:`LOAD_ERRORS`, not raised)."""
    for module in BUILTIN_MODULES:
        importlib.import_module(f"{__name__}.{module}")
    from .external import ADAPTERS

    for module in EXTERNAL_MODULES:
        try:
            if importlib.util.find_spec(module) is None:
                continue
            imported = importlib.import_module(module)
            if module in ADAPTERS:  # registers a case only where the module did not
                ADAPTERS[module](imported)
        except Exception as error:  # noqa: BLE001  (another author's module: report it)
            LOAD_ERRORS[module] = f"{type(error).__name__}: {error}"
    return REGISTRY
