"""The plots of the cases (PNG, matplotlib's Agg backend), from the rows the runner writes.

    python -m benchmarks.plots benchmarks/results/cpu/lm    # redraw from results.json

- ``lm``: ``time_vs_V.png`` (full-step time against V, one panel per loss, one line per
  provider, the 20-80% band, the copy-bandwidth floor) and ``memory_vs_V.png``;
- ``classification``: ``speedup.png``, the package's speed-up over eager per loss and size;
- ``topk``: ``topk.png``, full-step time and peak memory (over the gradient) against k, the
  dense teacher as a line;
- ``srw``: ``srw_vs_N.png``, time and peak memory against N.
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter, defaultdict
from typing import Dict, List

from .report import LOSS_ORDER, PROVIDER_ORDER

PROVIDER_LABELS = {
    "triton": "ltkd_kernels (triton)",
    "cpu": "ltkd_kernels (cpu, C++)",
    "torch": "ltkd_kernels (torch reference)",
    "eager": "eager PyTorch (papers' code)",
    "compile": "torch.compile(eager)",
    "liger": "Liger-Kernel KLDiv",
}
PROVIDER_STYLE = {
    "triton": dict(color="tab:red", marker="o"),
    "cpu": dict(color="tab:red", marker="o"),
    "torch": dict(color="tab:orange", marker="s"),
    "eager": dict(color="tab:blue", marker="^"),
    "compile": dict(color="tab:green", marker="D"),
    "liger": dict(color="tab:purple", marker="v"),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _providers_in(rows) -> List[str]:
    present = {r["provider"] for r in rows}
    return [p for p in PROVIDER_ORDER if p in present]


def _ok(row) -> bool:
    return row["status"] == "ok" and row["median_ms"] is not None


def _title(what: str, metadata: Dict) -> str:
    device = metadata.get("device", {})
    name = device.get("name", device.get("type", "?"))
    return f"{what}; {name}; {str(metadata.get('date', ''))[:10]}"


def _plot_selection(rows, loss):
    """The full-mode rows of ``loss`` to plot against V: the dtype (float32 first) and the N
    with the most distinct V, so that one panel varies V alone."""
    candidates = [r for r in rows if r["loss"] == loss and r["mode"] == "full" and r["V"]]
    if not candidates:
        return [], None, None, None
    dtypes = Counter(r["dtype"] for r in candidates)
    dtype = "float32" if "float32" in dtypes else dtypes.most_common(1)[0][0]
    candidates = [r for r in candidates if r["dtype"] == dtype]
    by_n = defaultdict(set)
    for r in candidates:
        by_n[r["N"]].add(r["V"])
    N = max(by_n, key=lambda n: (len(by_n[n]), n))
    candidates = [r for r in candidates if r["N"] == N]
    G = Counter(r["G"] for r in candidates).most_common(1)[0][0]
    return [r for r in candidates if r["G"] == G], N, G, dtype


def _panel_lines(ax, selected, quantity):
    """One line per provider on ``ax``; returns the FAIL/ERROR notes."""
    failures = []
    for provider in _providers_in(selected):
        points = sorted((r for r in selected if r["provider"] == provider and _ok(r)),
                        key=lambda r: r["V"])
        failed = [r for r in selected if r["provider"] == provider and not _ok(r)]
        style, label = PROVIDER_STYLE.get(provider, {}), PROVIDER_LABELS.get(provider, provider)
        if failed:
            failures.append(f"{label}: FAIL/ERROR at {len(failed)} size(s), not shown")
        if not points:
            ax.plot([], [], label=label, **style)
            continue
        V = [r["V"] for r in points]
        if quantity == "time":
            ax.plot(V, [r["median_ms"] for r in points], label=label, **style)
            ax.fill_between(V, [r["p20_ms"] for r in points], [r["p80_ms"] for r in points],
                            color=style.get("color"), alpha=0.15, linewidth=0)
        else:
            ax.plot(V, [max(r["peak_mem_mib"] or 0.0, 1e-3) for r in points], label=label, **style)
    return failures


def _panel(ax, rows, loss, quantity) -> str:
    selected, N, G, dtype = _plot_selection(rows, loss)
    failures = _panel_lines(ax, selected, quantity)
    Vs = sorted({r["V"] for r in selected})
    if quantity == "time":
        floor = {r["V"]: r["floor_ms"] for r in selected if r["floor_ms"]}
        if floor:
            xs = sorted(floor)
            ax.plot(xs, [floor[v] for v in xs], color="black", linestyle="--", linewidth=1,
                    label="floor: 5 N V s bytes / copy bandwidth")
        ax.set_ylabel("full step (forward + backward), median ms")
    else:
        size = 4 if dtype == "float32" else 2
        ax.plot(Vs, [2 * N * v * size / 2 ** 20 for v in Vs], color="black", linestyle=":",
                linewidth=1, label="for scale: the two logit tensors")
        ax.set_ylabel("peak memory of the full step, MiB")
    ax.set_title(f"{loss.upper()}  (N={N}{f', G={G}' if G is not None else ''}, {dtype})")
    ax.set(xscale="log", yscale="log", xlabel="V (classes / vocabulary)")
    ax.grid(True, which="both", alpha=0.3)
    if failures:
        ax.text(0.01, 0.99, "\n".join(failures), transform=ax.transAxes, fontsize=7, va="top",
                color="darkred")
    return f"N={N}, {dtype}"


def _shared_legend(fig, axes) -> None:
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize=8.5,
               frameon=False)


def plot_time_vs_V(rows: List[Dict], metadata: Dict, out_dir: str) -> List[str]:
    """``time_vs_V.png`` and ``memory_vs_V.png`` (case ``lm``)."""
    losses = [l for l in LOSS_ORDER if any(r["loss"] == l and r["V"] for r in rows)]
    if not losses:
        return []
    plt = _pyplot()
    written = []
    for quantity, file_name in (("time", "time_vs_V.png"), ("memory", "memory_vs_V.png")):
        columns = min(2, len(losses))
        nrows = (len(losses) + columns - 1) // columns
        fig, axes = plt.subplots(nrows, columns, figsize=(6.2 * columns, 4.4 * nrows), squeeze=False)
        subtitle = ""
        for ax, loss in zip(axes.flat, losses):
            subtitle = _panel(ax, rows, loss, quantity)
        for ax in list(axes.flat)[len(losses):]:
            ax.set_visible(False)
        what = "time" if quantity == "time" else "peak memory"
        fig.suptitle(_title(f"{what} against V, {subtitle}", metadata), fontsize=10)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        _shared_legend(fig, axes)
        fig.savefig(os.path.join(out_dir, file_name), dpi=110)
        plt.close(fig)
        written.append(file_name)
    return written


def plot_speedups(rows: List[Dict], metadata: Dict, out_dir: str) -> List[str]:
    """``speedup.png`` (case ``classification``): per size, one bar per loss, of the package
    backend's speed-up over eager (log scale; the line at 1 is eager)."""
    package = [r for r in rows if r["provider"] in ("cpu", "triton") and r["mode"] == "full"
               and r.get("x_eager")]
    if not package:
        return []
    plt = _pyplot()
    sizes = sorted({(r["N"], r["V"]) for r in package}, key=lambda s: (s[1], s[0]))
    losses = [l for l in LOSS_ORDER if any(r["loss"] == l for r in package)]
    index = {(r["loss"], r["N"], r["V"]): r["x_eager"] for r in package}
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(sizes) + 2), 4.4))
    width = 0.8 / len(losses)
    for j, loss in enumerate(losses):
        xs = [i + (j - (len(losses) - 1) / 2) * width for i in range(len(sizes))]
        ax.bar(xs, [index.get((loss, N, V), 0.0) for N, V in sizes], width, label=loss.upper())
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels([f"N={N}\nV={V}" for N, V in sizes], fontsize=8)
    ax.set(yscale="log", ylabel="speed-up over eager (full step)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(f"{package[0]['provider']} backend vs the papers' eager code", metadata),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "speedup.png"), dpi=110)
    plt.close(fig)
    return ["speedup.png"]


def plot_topk(rows: List[Dict], metadata: Dict, out_dir: str) -> List[str]:
    """``topk.png`` (case ``topk``): full-step time against k per loss, the dense teacher's as
    a dashed line; peak memory above the inputs over the gradient's size (1 = the gradient)."""
    full = [r for r in rows if r["mode"] == "full" and _ok(r)]
    if not full:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for n, loss in enumerate(l for l in LOSS_ORDER if any(r["loss"] == l for r in full)):
        color = f"C{n}"
        mine = sorted((r for r in full if r["loss"] == loss and r["k"]), key=lambda r: r["k"])
        dense = next((r for r in full if r["loss"] == loss and r["k"] is None), None)
        for ax, field in zip(axes, ("median_ms", "peak_vs_grad")):
            ax.plot([r["k"] for r in mine], [r.get(field) or 0.0 for r in mine], marker="o",
                    color=color, label=f"{loss.upper()} top-k")
            if dense is not None and dense.get(field):
                ax.axhline(dense[field], color=color, linestyle="--", linewidth=1,
                           label=f"{loss.upper()} dense teacher")
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    ks = sorted({r["k"] for r in full if r["k"]})
    for ax, label in zip(axes, ("full step, median ms", "peak memory above inputs / gradient")):
        ax.set(xscale="log", xlabel="k (teacher entries per row)", ylabel=label)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.minorticks_off()
        ax.set_ylim(0, max(ax.get_ylim()[1], 2.0 if ax is axes[1] else 0.0))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    r = full[0]
    fig.suptitle(_title(f"top-k teacher, N={r['N']}, V={r['V']}, {r['dtype']}", metadata), fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "topk.png"), dpi=110)
    plt.close(fig)
    return ["topk.png"]


def plot_srw(rows: List[Dict], metadata: Dict, out_dir: str) -> List[str]:
    """``srw_vs_N.png`` (case ``srw``): time and peak memory against N, with the floor."""
    srw = [r for r in rows if r["loss"] == "srw"]
    if not srw:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for provider in _providers_in(srw):
        points = sorted((r for r in srw if r["provider"] == provider and _ok(r)), key=lambda r: r["N"])
        style, label = PROVIDER_STYLE.get(provider, {}), PROVIDER_LABELS.get(provider, provider)
        if points:
            N = [r["N"] for r in points]
            axes[0].plot(N, [r["median_ms"] for r in points], label=label, **style)
            axes[1].plot(N, [max(r["peak_mem_mib"] or 0.0, 1e-3) for r in points], label=label, **style)
    floor = sorted({(r["N"], r["floor_ms"]) for r in srw if r["floor_ms"]})
    if floor:
        axes[0].plot([n for n, _ in floor], [f for _, f in floor], color="black", linestyle="--",
                     linewidth=1, label="floor: N D s bytes / copy bandwidth")
    axes[0].set_ylabel("SRW weights, median ms")
    axes[1].set_ylabel("peak memory, MiB")
    for ax in axes:
        ax.set(xscale="log", yscale="log", xlabel="N (batch size)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(f"SRW weights (D={srw[0]['D']}) against N", metadata), fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "srw_vs_N.png"), dpi=110)
    plt.close(fig)
    return ["srw_vs_N.png"]


PLOTS = {"lm": plot_time_vs_V, "classification": plot_speedups, "topk": plot_topk,
         "srw": plot_srw}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.plots RESULTS_FOLDER_OF_ONE_CASE", file=sys.stderr)
        return 2
    with open(os.path.join(argv[0], "results.json")) as f:
        data = json.load(f)
    plot = PLOTS.get(data["metadata"].get("case"))
    if plot is None:
        print(f"no plots for case {data['metadata'].get('case')!r}", file=sys.stderr)
        return 2
    written = plot(data["results"], data["metadata"], argv[0])
    print(f"wrote {', '.join(written) or 'nothing'} to {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
