"""Smoke test of ``python -m ltkd_kernels demo`` in its ``--quick`` configuration (seconds).

The demo's losses run on ``--backend torch`` here so that the test needs no compiler; the
kernels' agreement with the reference is the business of the loss tests.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from ltkd_kernels import demo
from ltkd_kernels.__main__ import main

QUICK = ["demo", "--quick", "--backend", "torch", "--no-progress"]
LABELS = [demo.METHOD_LABELS[m] for m in demo.METHODS]


def _run(capsys, out, *extra):
    assert main(QUICK + ["--out", str(out), *extra]) == 0
    return capsys.readouterr().out


def _table_rows(stdout):
    """``label -> [accuracy columns]`` of the printed table (timing columns dropped)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("method"))
    header = lines[start].split()
    num_acc = header.index("all")  # accuracy columns: the groups, then "all"
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        label, _, rest = line.partition("  ")
        values = rest.split()
        rows[label.strip()] = [float(v) for v in values[:num_acc]]
    return header, rows


def test_counts_follow_cifar100_lt():
    counts = demo.long_tailed_counts(100, 500, 100)
    assert counts[0] == 500 and counts[-1] == 5 and sum(counts) == 10847  # CIFAR-100-LT size
    assert all(a >= b for a, b in zip(counts, counts[1:]))


def test_quick_demo_prints_table_writes_chart_and_is_reproducible(tmp_path, capsys):
    threads = torch.get_num_threads()
    first = _run(capsys, tmp_path / "a")
    header, rows = _table_rows(first)
    assert header[1:5] == ["head", "medium", "tail", "all"]
    assert list(rows) == ["teacher (CE)"] + LABELS
    for values in rows.values():
        assert len(values) == 4 and all(0.0 <= v <= 100.0 for v in values)

    files = {name: tmp_path / "a" / name for name in ("results.json", "results.csv")}
    for path in files.values():
        assert path.stat().st_size > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        png = tmp_path / "a" / "accuracy.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(files["results.json"].read_text())
    assert [s["method"] for s in saved["students"]] == list(demo.METHODS)
    for s in saved["students"]:
        assert (s["loss_share"] is None) == (s["method"] == "ce")
        if s["loss_share"] is not None:
            assert 0.0 < s["loss_share"] < 1.0

    # Same seed: the same accuracies, bit for bit; another seed: another task.
    second = _run(capsys, tmp_path / "b")
    assert _table_rows(second)[1] == rows
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert again["teacher_accuracy"] == saved["teacher_accuracy"]
    assert [s["accuracy"] for s in again["students"]] == [s["accuracy"] for s in saved["students"]]
    other = _run(capsys, tmp_path / "c", "--seed", "1", "--methods", "ce", "--no-chart")
    assert _table_rows(other)[1]["teacher (CE)"] != rows["teacher (CE)"]
    assert not (tmp_path / "c" / "accuracy.png").exists()

    # The demo gives back the process's torch settings.
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


def test_group_count_and_method_subset(tmp_path, capsys):
    out = _run(capsys, tmp_path, "--groups", "4", "--methods", "ltkd,ce", "--no-chart")
    header, rows = _table_rows(out)
    assert header[1:6] == ["g0", "g1", "g2", "g3", "all"]
    assert list(rows) == ["teacher (CE)", "LTKD", "CE"]


@pytest.mark.parametrize("flag, value, expected", [
    ("--classes", "1", "--classes: must be an integer in [2"),
    ("--classes", "many", "--classes: invalid int value"),
    ("--imbalance", "0.5", "--imbalance: must be a finite number >= 1"),
    ("--imbalance", "inf", "--imbalance: must be a finite number >= 1"),
    ("--groups", "0", "--groups: must be an integer in [1"),
    ("--groups", "21", "--groups: must be at most the number of classes (20)"),
    ("--epochs", "0", "--epochs: must be an integer >= 1"),
    ("--teacher-epochs", "-3", "--teacher-epochs: must be an integer >= 1"),
    ("--seed", "-1", "--seed: must be an integer in [0"),
    ("--methods", "ce,ltkdd", "--methods: unknown method(s) 'ltkdd'"),
    ("--methods", ",", "--methods: must name at least one of"),
    ("--samples-per-class", "0", "--samples-per-class: must be an integer >= 1"),
    ("--backend", "triton", "--backend: invalid choice"),
])
def test_bad_flag_values_exit_2_naming_the_flag(tmp_path, capsys, flag, value, expected):
    with pytest.raises(SystemExit) as exc:
        main(QUICK + ["--out", str(tmp_path), f"{flag}={value}"])
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # nothing ran, nothing written


def test_config_errors_name_the_field():
    with pytest.raises(demo.DemoConfigError, match="imbalance") as exc:
        demo.DemoConfig(imbalance=0)
    assert exc.value.field == "imbalance"
    with pytest.raises(ValueError, match="methods"):
        demo.DemoConfig(methods="ce,unknown")


def test_no_command_asks_for_one(capsys):
    assert main([]) == 2
    assert "python -m ltkd_kernels demo" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ltkd_kernels"] + QUICK
        + ["--methods", "ce,ltkd", "--no-chart", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert list(_table_rows(proc.stdout)[1]) == ["teacher (CE)", "CE", "LTKD"]
