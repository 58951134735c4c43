"""Rows, speed-ups, the console table, and the files of a case: CSV, JSON and ``summary.md``.

A row is one (case, problem, provider, mode) measurement (:data:`FIELDS`; a case may add
columns of its own, written after these). ``x_eager`` / ``x_compile`` are the speed-ups over
the eager (papers') code and over ``torch.compile`` of it on the same problem and mode
(their median time over this row's).
"""
from __future__ import annotations

import csv
import json
import os
import sys
from typing import Dict, Iterable, List, Optional, Sequence

FIELDS = (
    "case", "loss", "provider", "mode", "N", "V", "G", "D", "k", "dtype", "status", "median_ms",
    "p20_ms", "p80_ms", "reps", "host_ms", "peak_mem_mib", "floor_bytes", "floor_ms", "gb_per_s",
    "fraction_of_floor", "x_eager", "x_compile", "loss_rel_err", "grad_rel_err", "check_rows",
    "compile_s", "input_sets", "inputs_fit_in_cache", "note",
)
PROVIDER_ORDER = ("triton", "cpu", "torch", "eager", "compile", "liger")
LOSS_ORDER = ("ltkd", "kd", "dkd", "bkd", "srw")


def new_row(case: str, problem, provider: str, mode: str, **values) -> Dict:
    row = {name: None for name in FIELDS}
    row.update(case=case, loss=problem.loss, provider=provider, mode=mode, N=problem.N,
               V=problem.V, G=problem.G, D=problem.D, k=problem.k, dtype=problem.dtype, note="")
    row.update(values)
    return row


def error_text(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def problem_key(row: Dict) -> tuple:
    return tuple(row.get(name) for name in ("case", "loss", "N", "V", "G", "D", "k", "dtype", "mode"))


def add_speedups(rows: List[Dict]) -> None:
    """``x_eager`` and ``x_compile`` of every timed row (``None`` where either is missing)."""
    timed = {(problem_key(r), r["provider"]): r["median_ms"] for r in rows
             if r.get("status") == "ok" and r.get("median_ms")}
    for row in rows:
        mine = timed.get((problem_key(row), row["provider"]))
        for field, baseline in (("x_eager", "eager"), ("x_compile", "compile")):
            other = timed.get((problem_key(row), baseline))
            row[field] = other / mine if mine and other else None


def _fmt(value, spec: str) -> str:
    return "" if value is None or value == "" else format(value, spec)


def number(x: Optional[float]) -> str:
    """3 significant digits without scientific notation for the sizes a table shows."""
    if x is None:
        return ""
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def _max_err(row) -> str:
    errs = [e for e in (row.get("loss_rel_err"), row.get("grad_rel_err")) if e is not None]
    return f"{max(errs):.1e}" if errs else ""


def _speedup(value) -> str:
    return "" if value is None else f"{value:.2f}x"


# (header, cell, right-aligned): the console table's columns; empty columns are dropped.
COLUMNS = (
    ("loss", lambda r: r["loss"], False),
    ("N", lambda r: str(r["N"]), True),
    ("V/D", lambda r: str(r["V"] if r["V"] is not None else r["D"]), True),
    ("G", lambda r: _fmt(r["G"], "d"), True),
    ("k", lambda r: _fmt(r["k"], "d"), True),
    ("dtype", lambda r: r["dtype"], False),
    ("mode", lambda r: r["mode"], False),
    ("provider", lambda r: r["provider"], False),
    ("status", lambda r: r["status"] or "", False),
    ("median ms", lambda r: _fmt(r["median_ms"], ".3f"), True),
    ("20-80% ms", lambda r: "" if r["p20_ms"] is None else f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}", True),
    ("host ms", lambda r: _fmt(r.get("host_ms"), ".3f"), True),
    ("peak MiB", lambda r: _fmt(r["peak_mem_mib"], ".1f"), True),
    ("floor", lambda r: "" if r["fraction_of_floor"] is None else f"{100 * r['fraction_of_floor']:.1f}%", True),
    ("x eager", lambda r: _speedup(r.get("x_eager")), True),
    ("x compile", lambda r: _speedup(r.get("x_compile")), True),
    ("max rel err", _max_err, True),
    ("launches", lambda r: _fmt(r.get("launches"), "d"), True),
    ("kernels", lambda r: _fmt(r.get("kernels"), "d"), True),
    ("time/dense", lambda r: _fmt(r.get("time_vs_dense"), ".2f"), True),
    ("peak/grad", lambda r: _fmt(r.get("peak_vs_grad"), ".2f"), True),
    ("x one read", lambda r: _fmt(r.get("x_one_read"), ".2f"), True),
    ("bytes/step", lambda r: _fmt(r.get("bytes_per_step"), ",d"), True),
)


def format_table(rows: Sequence[Dict], columns=COLUMNS) -> str:
    """A plain-text table of ``rows`` (the columns with at least one value)."""
    cells = [[cell(r) for _, cell, _ in columns] for r in rows]
    keep = [i for i in range(len(columns)) if any(line[i] for line in cells)]
    header = [columns[i][0] for i in keep]
    table = [header] + [[line[i] for i in keep] for line in cells]
    widths = [max(len(line[j]) for line in table) for j in range(len(keep))]
    out = []
    for n, line in enumerate(table):
        out.append("  ".join(cell.rjust(w) if columns[keep[j]][2] else cell.ljust(w)
                             for j, (cell, w) in enumerate(zip(line, widths))).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def print_table(rows: Sequence[Dict], stream=sys.stdout) -> None:
    stream.write(format_table(rows) + "\n")


def _fieldnames(rows: Iterable[Dict]) -> List[str]:
    names = list(FIELDS)
    for row in rows:
        names += [name for name in row if name not in names]
    return names


def write_results(out_dir: str, rows: List[Dict], metadata: Dict) -> None:
    """``results.csv`` (one line per row) and ``results.json`` (metadata and rows)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_fieldnames(rows))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(metadata=metadata, results=rows), f, indent=1, default=str)
        f.write("\n")


def markdown_table(header: Sequence[str], lines: Iterable[Sequence[str]], align=None) -> List[str]:
    align = align or ["---"] * len(header)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return out


def cell(row: Optional[Dict], what: str = "time") -> str:
    """A summary cell: median time · peak memory, or GB/s (fraction of the floor)."""
    if row is None:
        return "—"
    if row["status"] == "FAIL":
        err = _max_err(row)
        return f"FAIL (rel err {err})" if err else "FAIL"
    if row["status"] != "ok":
        return (row["status"] or "?").lower()
    if what == "time":
        memory = row["peak_mem_mib"]
        return f"{number(row['median_ms'])} ms" + ("" if memory is None else f" · {number(memory)} MiB")
    if what == "host":
        return f"{number(row['host_ms'])} ms"
    if what == "speedup":
        return _speedup(row.get("x_eager")) or "—"
    return f"{number(row['gb_per_s'])} GB/s ({number(100 * row['fraction_of_floor'])}%)"


def _problem_label(key) -> tuple:
    loss, N, V, G, D, k, dtype = key
    name = loss.upper() + (f" (G={G})" if G is not None else "") + (f" top-{k}" if k else "")
    return name, f"{N:,}", (f"{V:,}" if V is not None else f"({D})"), dtype


def pivot(rows: Sequence[Dict], mode: str, what: str = "time") -> List[str]:
    """A Markdown table: one line per problem, one column per provider, of one mode."""
    present = {r["provider"] for r in rows if r["mode"] == mode}
    providers = [p for p in PROVIDER_ORDER if p in present] + sorted(present - set(PROVIDER_ORDER))
    index = {}
    for r in rows:
        if r["mode"] == mode:
            index[(r["loss"], r["N"], r["V"], r["G"], r["D"], r["k"], r["dtype"], r["provider"])] = r
    keys = sorted({key[:7] for key in index},
                  key=lambda k: (LOSS_ORDER.index(k[0]) if k[0] in LOSS_ORDER else 9, k[6],
                                 k[5] or 0, k[1], k[2] or 0, k[3] or 0))
    lines = [list(_problem_label(key)) + [cell(index.get(key + (p,)), what) for p in providers]
             for key in keys]
    return markdown_table(["loss", "N", "V (D)", "dtype"] + providers, lines,
                          ["---", "--:", "--:", "---"] + ["--:"] * len(providers))


def metadata_lines(metadata: Dict) -> List[str]:
    """The run's description, as Markdown bullets."""
    device, versions = metadata.get("device", {}), metadata.get("versions", {})
    lines = [f"- device: {device.get('name', device.get('type', '?'))}; "
             f"{device.get('logical_cpus')} logical CPUs; load average (1, 5, 15 min) "
             f"{device.get('load_average_at_start')} at the start, "
             f"{device.get('load_average_at_end')} at the end",
             f"- date: {metadata.get('date')}; command: `{metadata.get('command')}`; "
             f"wall time {metadata.get('wall_s') or 0:.0f} s",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()
                                       if v and k != "git_modified_files")]
    if versions.get("git_modified_files"):
        lines.append("- files differing from that commit when measured: "
                     + ", ".join(f"`{f}`" for f in versions["git_modified_files"]))
    bandwidth = metadata.get("copy_bandwidth", {})
    lines.append(f"- copy bandwidth (bytes read + written): {bandwidth.get('start_gb_per_s', 0):.2f}"
                 f" GB/s at the start, {bandwidth.get('end_gb_per_s') or 0:.2f} GB/s at the end")
    probe = metadata.get("parallel_stall_probe") or {}
    if probe.get("start"):
        end = (probe.get("end") or {}).get("median_ms")
        lines.append(f"- parallel stall probe (median of a 4 MiB `fill_` over "
                     f"{probe['start']['threads']} threads): {probe['start']['median_ms']:.3f} ms "
                     f"at the start, {_fmt(end, '.3f') or '?'} ms at the end (tens of microseconds "
                     f"on an idle machine; milliseconds: other processes held the cores)")
    for provider, reason in (metadata.get("providers_left_out") or {}).items():
        lines.append(f"- `{provider}` left out: {reason}")
    return lines


def targets_lines(targets: Sequence[Dict]) -> List[str]:
    """The case's targets (the issues' numbers), met or not."""
    if not targets:
        return []
    lines = [(t["name"], t["measured"], t["target"], "met" if t["met"] else
              ("not measured" if t["met"] is None else "**missed**")) for t in targets]
    return ["## Targets", ""] + markdown_table(("target", "measured", "wanted", ""), lines) + [""]
