"""Plots and the Markdown summary of a benchmark run (from the rows that ``run.py`` writes).

    python -m benchmarks.plots benchmarks/results/cpu-quick   # redraw from results.json

- ``time_vs_V.png``: full-step (forward + backward) time against V, one panel per loss, one
  line per provider (the band is the 20-80% quantiles), with the copy-bandwidth floor;
- ``memory_vs_V.png``: peak memory of the full step against V, with the size of the two
  logit tensors for scale;
- ``srw_vs_N.png``: SRW weights, time and peak memory against the batch size N.
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter, defaultdict
from typing import Dict, List

PROVIDER_ORDER = ("triton", "cpu", "torch", "eager", "compile", "liger")
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
LOSS_ORDER = ("ltkd", "kd", "dkd", "bkd", "srw")


def _providers_in(rows) -> List[str]:
    present = {r["provider"] for r in rows}
    return [p for p in PROVIDER_ORDER if p in present]


def _ok(row) -> bool:
    return row["status"] == "ok" and row["median_ms"] is not None


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
    gs = Counter(r["G"] for r in candidates)
    G = gs.most_common(1)[0][0]
    return [r for r in candidates if r["G"] == G], N, G, dtype


def _device_name(metadata) -> str:
    device = metadata.get("device", {})
    return device.get("name", device.get("type", "?"))


def write_plots(rows: List[Dict], metadata: Dict, out_dir: str) -> List[str]:
    """Write the PNG plots; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    losses = [l for l in LOSS_ORDER if l != "srw" and any(r["loss"] == l and r["V"] for r in rows)]
    device = _device_name(metadata)
    if losses:
        for quantity, file_name in (("time", "time_vs_V.png"), ("memory", "memory_vs_V.png")):
            columns = min(2, len(losses))
            nrows = (len(losses) + columns - 1) // columns
            fig, axes = plt.subplots(nrows, columns, figsize=(6.2 * columns, 4.4 * nrows),
                                     squeeze=False)
            subtitle = None
            for ax, loss in zip(axes.flat, losses):
                selected, N, G, dtype = _plot_selection(rows, loss)
                failures = []
                subtitle = f"N={N}, {dtype}"
                for provider in _providers_in(selected):
                    points = sorted((r for r in selected if r["provider"] == provider and _ok(r)),
                                    key=lambda r: r["V"])
                    failed = [r for r in selected if r["provider"] == provider and not _ok(r)]
                    style = PROVIDER_STYLE[provider]
                    label = PROVIDER_LABELS[provider]
                    if failed:
                        failures.append(f"{label}: FAIL/ERROR at {len(failed)} "
                                        f"size{'s' if len(failed) > 1 else ''}, not shown")
                    if not points:
                        ax.plot([], [], label=label, **style)
                        continue
                    V = [r["V"] for r in points]
                    if quantity == "time":
                        ax.plot(V, [r["median_ms"] for r in points], label=label, **style)
                        ax.fill_between(V, [r["p20_ms"] for r in points],
                                        [r["p80_ms"] for r in points], color=style["color"],
                                        alpha=0.15, linewidth=0)
                    else:
                        ax.plot(V, [max(r["peak_mem_mib"] or 0.0, 1e-3) for r in points],
                                label=label, **style)
                Vs = sorted({r["V"] for r in selected})
                if quantity == "time":
                    floor = {r["V"]: r["floor_ms"] for r in selected if r["floor_ms"]}
                    if floor:
                        xs = sorted(floor)
                        ax.plot(xs, [floor[v] for v in xs], color="black", linestyle="--",
                                linewidth=1, label="floor: 5 N V s bytes / copy bandwidth")
                    ax.set_ylabel("full step (forward + backward), median ms")
                else:
                    size = 4 if dtype == "float32" else 2
                    ax.plot(Vs, [2 * N * v * size / 2 ** 20 for v in Vs], color="black",
                            linestyle=":", linewidth=1, label="for scale: the two logit tensors")
                    ax.set_ylabel("peak memory of the full step, MiB")
                group_text = f", G={G}" if G is not None else ""
                ax.set_title(f"{loss.upper()}  (N={N}{group_text}, {dtype})")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("V (classes / vocabulary)")
                ax.grid(True, which="both", alpha=0.3)
                if failures:
                    ax.text(0.01, 0.99, "\n".join(failures), transform=ax.transAxes,
                            fontsize=7, va="top", color="darkred")
            for ax in list(axes.flat)[len(losses):]:
                ax.set_visible(False)
            # One legend for all panels (the same providers and line styles), under them.
            handles, labels = {}, {}
            for ax in axes.flat:
                for handle, label in zip(*ax.get_legend_handles_labels()):
                    handles.setdefault(label, handle)
                    labels.setdefault(label, label)
            what = "time" if quantity == "time" else "peak memory"
            fig.suptitle(f"{what} against V, {subtitle}; {device}; {metadata.get('date', '')[:10]}",
                         fontsize=10)
            fig.tight_layout(rect=(0, 0.07, 1, 1))
            fig.legend(list(handles.values()), list(labels.values()), loc="lower center",
                       ncol=3, fontsize=8.5, frameon=False)
            fig.savefig(os.path.join(out_dir, file_name), dpi=110)
            plt.close(fig)
            written.append(file_name)
    srw = [r for r in rows if r["loss"] == "srw"]
    if srw:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
        for provider in _providers_in(srw):
            points = sorted((r for r in srw if r["provider"] == provider and _ok(r)),
                            key=lambda r: r["N"])
            if not points:
                continue
            N = [r["N"] for r in points]
            style = PROVIDER_STYLE[provider]
            axes[0].plot(N, [r["median_ms"] for r in points], label=PROVIDER_LABELS[provider],
                         **style)
            axes[1].plot(N, [max(r["peak_mem_mib"] or 0.0, 1e-3) for r in points],
                         label=PROVIDER_LABELS[provider], **style)
        floor = sorted({(r["N"], r["floor_ms"]) for r in srw if r["floor_ms"]})
        if floor:
            axes[0].plot([n for n, _ in floor], [f for _, f in floor], color="black",
                         linestyle="--", linewidth=1, label="floor: N D s bytes / copy bandwidth")
        D = srw[0]["D"]
        axes[0].set_ylabel("SRW weights, median ms")
        axes[1].set_ylabel("peak memory, MiB")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("N (batch size)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"SRW weights (D={D}) against N; {device}; {metadata.get('date', '')[:10]}",
                     fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "srw_vs_N.png"), dpi=110)
        plt.close(fig)
        written.append("srw_vs_N.png")
    return written


def _number(x: float) -> str:
    """3 significant digits without scientific notation for the sizes a table shows."""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def _cell(row, what: str) -> str:
    if row is None:
        return "—"
    if row["status"] == "FAIL":
        errs = [e for e in (row["loss_rel_err"], row["grad_rel_err"]) if e is not None]
        return f"FAIL (rel err {max(errs):.1e})" if errs else "FAIL"
    if row["status"] != "ok":
        return row["status"].lower()
    if what == "time":
        memory = row["peak_mem_mib"]
        mem = "" if memory is None else f" · {_number(memory)} MiB"
        return f"{_number(row['median_ms'])} ms{mem}"
    return f"{_number(row['gb_per_s'])} GB/s ({_number(100 * row['fraction_of_floor'])}%)"


def _pivot(rows, providers, mode, what) -> List[str]:
    keys = []
    for r in rows:
        key = (r["loss"], r["N"], r["V"], r["G"], r["D"], r["dtype"])
        if r["mode"] == mode and key not in keys:
            keys.append(key)
    keys.sort(key=lambda k: (LOSS_ORDER.index(k[0]), k[5], k[1], k[2] or 0, k[3] or 0))
    lines = ["| loss | N | V (D) | dtype | " + " | ".join(providers) + " |",
             "|---|--:|--:|---|" + "---|" * len(providers)]
    index = {(r["loss"], r["N"], r["V"], r["G"], r["D"], r["dtype"], r["mode"], r["provider"]): r
             for r in rows}
    for key in keys:
        loss, N, V, G, D, dtype = key
        name = loss.upper() + (f" (G={G})" if G is not None else "")
        size = f"{V:,}" if V is not None else f"({D})"
        cells = [_cell(index.get(key + (mode, p)), what) for p in providers]
        lines.append(f"| {name} | {N:,} | {size} | {dtype} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(rows: List[Dict], metadata: Dict) -> str:
    """The headline tables (full step: time and memory; bandwidth) and the run's metadata."""
    device = metadata.get("device", {})
    versions = metadata.get("versions", {})
    providers = _providers_in(rows)
    lines = [f"# Benchmark results: {metadata.get('name', '')}", ""]
    lines.append(f"- device: {_device_name(metadata)}; {device.get('logical_cpus')} logical CPUs; "
                 f"load average (1, 5, 15 min) {device.get('load_average_at_start')} at the start, "
                 f"{device.get('load_average_at_end')} at the end")
    lines.append(f"- date: {metadata.get('date')}; command: `{metadata.get('command')}`; "
                 f"wall time {metadata.get('wall_s', 0):.0f} s")
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()
                                            if v and k != "git_modified_files"))
    if versions.get("git_modified_files"):
        lines.append("- files differing from that commit when measured: "
                     + ", ".join(f"`{f}`" for f in versions["git_modified_files"]))
    lines.append(f"- copy bandwidth (bytes read + written): "
                 f"{metadata.get('copy_bandwidth_gb_per_s', 0):.2f} GB/s at the start, "
                 f"{metadata.get('copy_bandwidth_end', {}).get('gb_per_s', 0):.2f} GB/s at the end")
    probe = metadata.get("parallel_stall_probe") or {}
    if probe.get("start"):
        lines.append(f"- parallel stall probe (median of a 4 MiB `fill_` over "
                     f"{probe['start']['threads']} threads): {probe['start']['median_ms']:.3f} ms "
                     f"at the start, {probe['end']['median_ms']:.3f} ms at the end (tens of "
                     f"microseconds on an idle machine; milliseconds mean other processes held "
                     f"the cores and small ops stalled)")
    for provider, reason in metadata.get("providers_left_out", {}).items():
        lines.append(f"- `{provider}` left out: {reason}")
    if metadata.get("quick"):
        lines.append(f"- `--quick`: {metadata['quick']}")
    in_cache = {(r["loss"], r["N"], r["V"], r["G"], r["D"], r["dtype"]) for r in rows
                if r.get("inputs_fit_in_cache") in (True, "True")}
    if in_cache:
        llc = device.get("last_level_cache_bytes")
        size = f"{llc / 2 ** 20:.0f} MiB " if llc else ""
        total = len({(r["loss"], r["N"], r["V"], r["G"], r["D"], r["dtype"]) for r in rows})
        lines.append(f"- for {len(in_cache)} of {total} problems all rotated input sets together "
                     f"fit in the {size}last-level cache (column `inputs_fit_in_cache`): there "
                     f"the inputs may come from cache, while the floor uses the copy bandwidth "
                     f"of memory")
    lines += ["", "Cells: median time of one call · peak memory above the inputs (see "
              "`benchmarks/measure.py`). FAIL: the provider disagrees with the float64 reference "
              "and is not timed. —: not run for this problem.", ""]
    has = {r["mode"] for r in rows}
    if "full" in has:
        lines += ["## Full training step (forward + backward): median time · peak memory", ""]
        lines += _pivot(rows, providers, "full", "time")
        lines += ["", "## Full step: achieved GB/s (fraction of the copy-bandwidth floor)", "",
                  "Bytes that must move: 5 N V s (read both logits twice, write the gradient); "
                  "SRW: N D s. Floor = bytes / measured copy bandwidth.", ""]
        lines += _pivot(rows, providers, "full", "bandwidth")
    for mode in ("forward", "backward"):
        mode_rows = [r for r in rows if r["mode"] == mode]
        if mode_rows:
            lines += ["", f"## {mode.capitalize()} only: median time · peak memory", ""]
            lines += _pivot(mode_rows, providers, mode, "time")
    compiles, seen = [], set()
    for r in rows:
        key = (r["loss"], r["N"], r["V"], r["G"], r["D"], r["dtype"])
        if r["provider"] == "compile" and r["compile_s"] is not None and key not in seen:
            seen.add(key)
            compiles.append(r)
    if compiles:
        lines += ["", "## torch.compile: first call (compilation of forward and backward), s", "",
                  "| loss | N | V (D) | compile s |", "|---|--:|--:|--:|"]
        for r in compiles:
            size = f"{r['V']:,}" if r["V"] is not None else f"({r['D']})"
            lines.append(f"| {r['loss'].upper()} | {r['N']:,} | {size} | {r['compile_s']:.1f} |")
    if metadata.get("messages"):
        lines += ["", "## Messages of the run", ""]
        lines += [f"- {m}" for m in metadata["messages"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.plots RESULTS_FOLDER", file=sys.stderr)
        return 2
    with open(os.path.join(argv[0], "results.json")) as f:
        data = json.load(f)
    written = write_plots(data["results"], data["metadata"], argv[0])
    with open(os.path.join(argv[0], "summary.md"), "w") as f:
        f.write(summary_markdown(data["results"], data["metadata"]))
    print(f"wrote {', '.join(written + ['summary.md'])} to {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
