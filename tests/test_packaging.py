"""Packaging: Triton is optional, status queries compile nothing, the build cache is keyed by
the sources, the install-time module is checked before use, and the command line. Nothing
here compiles the C++ backend (the builds are spied on or replaced)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import ltkd_kernels as lk
from ltkd_kernels import cpu
from ltkd_kernels.backends import TRITON_MISSING, resolve_backend
from ltkd_kernels.cpu import build_config
from ltkd_kernels.ops import grouped_kl as grouped_kl_ops

ROOT = Path(__file__).resolve().parent.parent


def _run_python(code, tmp_path, **env):
    """Run ``code`` in a fresh interpreter (outside the repository, importing the package as
    installed) with the given environment variables; returns its stdout."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **env})
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture
def unbuilt(monkeypatch, tmp_path):
    """The cpu module as in a fresh process where nothing is built: no installed module, an
    empty cache, nothing loaded or attempted (restored afterwards)."""
    monkeypatch.setenv("LTKD_KERNELS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LTKD_KERNELS_DISABLE_CPU", raising=False)
    monkeypatch.setattr(cpu, "_INSTALLED", "ltkd_kernels._no_such_module_for_tests")
    monkeypatch.setattr(cpu, "_module", None)
    monkeypatch.setattr(cpu, "_attempted", False)
    monkeypatch.setattr(cpu, "_reason", None)
    monkeypatch.setattr(cpu, "_info", {})
    # The op layer's cache of resolved kernel modules (a loaded backend stays loaded within a
    # process; this fixture unloads it).
    monkeypatch.setattr(grouped_kl_ops, "_RESOLVED", {})
    from ltkd_kernels.cpu import grouped_kl as cpu_ops
    monkeypatch.setattr(cpu_ops, "_ext", None)
    return tmp_path / "cache"


# ---------------------------------------------------------------------------------------------
# Triton is an optional dependency.

def test_works_without_triton(tmp_path):
    # sys.modules["triton"] = None makes every "import triton" fail, as if not installed.
    out = _run_python("""
        import sys
        sys.modules["triton"] = None
        import torch
        import ltkd_kernels as lk
        import ltkd_kernels.cpu, ltkd_kernels.cpu.grouped_kl, ltkd_kernels.linear
        s, t = torch.randn(3, 11), torch.randn(3, 11)
        ref = lk.kd_loss(s, t, temperature=2.0, backend="torch")
        auto = lk.kd_loss(s, t, temperature=2.0)  # the C++ backend is disabled: torch ops
        assert torch.allclose(ref, auto, rtol=1e-5), (ref, auto)
        lk.srw_weights(torch.randn(4, 6), backend="torch")
        assert "triton" not in lk.available_backends()
        print(lk.unavailable_reason("triton"))
        try:
            lk.kd_loss(s, t, backend="triton")
        except RuntimeError as err:
            print(err)
        else:
            raise AssertionError("backend='triton' ran without Triton")
        """, tmp_path, LTKD_KERNELS_DISABLE_CPU="1", TRITON_INTERPRET="1")
    reason, error = out.strip().splitlines()
    assert reason == TRITON_MISSING
    assert "pip install 'ltkd-kernels[triton]'" in error and "CUDA torch wheels" in error


# ---------------------------------------------------------------------------------------------
# Status queries never build.

def test_status_queries_do_not_build(unbuilt, monkeypatch):
    from torch.utils import cpp_extension

    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: calls.append(a) or 1 / 0)
    monkeypatch.setattr(cpu, "_build", lambda *a, **k: calls.append(a) or 1 / 0)
    status = cpu.status()
    buildable = status.state == "buildable"
    assert status.state in ("buildable", "unavailable"), status
    assert ("cpu" in lk.available_backends()) == buildable
    assert (lk.unavailable_reason("cpu") is None) == buildable
    assert cpu.unavailable_reason() == (None if buildable else status.detail)
    expected = "cpu" if buildable else "torch"
    assert resolve_backend("auto", torch.device("cpu")) == expected
    if buildable:
        assert "build-cpu" in status.detail and "first use" in status.detail
    assert calls == [] and cpu._module is None and not cpu._attempted
    assert not unbuilt.exists()


def test_fresh_process_queries_and_collection_do_not_build(tmp_path):
    cache = tmp_path / "cache"
    # A capability no install-time module is built for on this machine, so that the status is
    # "buildable" (where a compiler is) even in an editable install that compiled ltkd_kernels._C.
    env = dict(LTKD_KERNELS_CACHE_DIR=str(cache), LTKD_KERNELS_CPU_CAPABILITY="DEFAULT",
               TRITON_INTERPRET="1")
    out = _run_python("""
        import sys
        import ltkd_kernels as lk
        from ltkd_kernels import cpu
        from ltkd_kernels.backends import resolve_backend
        import torch
        print(lk.available_backends(), lk.unavailable_reason("cpu"), cpu.status().state,
              resolve_backend("auto", torch.device("cpu")))
        assert "torch.utils.cpp_extension" not in sys.modules
        assert "ltkd_kernels._C" not in sys.modules and cpu._module is None
        """, tmp_path, **env)
    assert "buildable" in out or "unavailable" in out
    assert not cache.exists()
    collect = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/test_cpu_ops.py", "tests/test_api.py"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **env})
    assert collect.returncode == 0, collect.stdout[-3000:] + collect.stderr[-3000:]
    assert not cache.exists(), "collecting the tests built the C++ backend"


def test_auto_falls_back_when_the_build_fails(unbuilt, monkeypatch):
    if cpu.status().state != "buildable":
        pytest.skip(f"the C++ backend is not buildable here: {cpu.status()}")

    def failing_build(*args, **kwargs):
        raise RuntimeError("Error building extension (simulated)")

    monkeypatch.setattr(cpu, "_build", failing_build)
    s, t = torch.randn(3, 9), torch.randn(3, 9)
    auto = lk.kd_loss(s, t, temperature=2.0, backend="auto")
    torch.testing.assert_close(auto, lk.kd_loss(s, t, temperature=2.0, backend="torch"))
    assert cpu.status().state == "unavailable"
    assert "simulated" in lk.unavailable_reason("cpu")
    assert "cpu" not in lk.available_backends()
    with pytest.raises(RuntimeError, match="simulated"):
        lk.kd_loss(s, t, backend="cpu")


# ---------------------------------------------------------------------------------------------
# The first-use build cache is keyed by the sources' contents.

def test_cache_directory_follows_the_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("LTKD_KERNELS_CACHE_DIR", str(tmp_path / "cache"))
    sources = cpu.source_directory()
    assert sources is not None
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(sources, a)
    shutil.copytree(sources, b)
    entry_a, entry_b = cpu._cache_entry(a, "avx2"), cpu._cache_entry(b, "avx2")
    # Same contents elsewhere (another checkout): the same build.
    assert entry_a[:2] == entry_b[:2]
    assert entry_a[0].parent == tmp_path / "cache"
    digest = entry_a[0].name.rsplit("-", 1)[1]
    assert len(digest) == 12 and entry_a[1] == f"ltkd_kernels_cpu_{digest}"
    os.utime(b / "srw.cpp", (1, 1))  # a new time, same contents: still the same build
    assert cpu._cache_entry(b, "avx2")[:2] == entry_a[:2]
    for changed in ("srw.cpp", "simd.h"):  # a source or a header
        with open(b / changed, "a") as f:
            f.write("\n// changed\n")
        entry = cpu._cache_entry(b, "avx2")
        assert entry[0] != entry_a[0] and entry[1] != entry_a[1]
        entry_a = entry
    # Another SIMD level (other flags): another build.
    assert cpu.build_directory(a, "default") != cpu.build_directory(a, "avx2")
    assert "-avx2-" in cpu.build_directory(a, "avx2").name


def test_cached_build_is_reported_without_importing(unbuilt, monkeypatch):
    directory, name, _ = cpu._cache_entry(cpu.source_directory())
    directory.mkdir(parents=True)
    (directory / f"{name}{cpu._LIB_EXT}").write_bytes(b"")
    assert cpu.status().state != "built"  # no record: an interrupted build
    (directory / cpu._MARKER).write_text("{}")
    status = cpu.status()
    assert status.state == "built" and name in status.detail and cpu._module is None


# ---------------------------------------------------------------------------------------------
# The install-time module is used only when it matches.

def _fake_installed(monkeypatch, tmp_path, **changes):
    library = tmp_path / "_C.cpython-fake.so"
    library.write_bytes(b"")
    sources = cpu.source_directory()
    record = dict(module="ltkd_kernels._C", torch=torch.__version__,
                  python=f"{sys.version_info[0]}.{sys.version_info[1]}", simd="default",
                  sources_hash=build_config.sources_hash(sources), cflags=[], ldflags=[],
                  compiler="c++")
    record.update(changes)
    (tmp_path / build_config.INSTALLED_INFO).write_text(json.dumps(record))
    real_find_spec = cpu.importlib.util.find_spec

    def find_spec(name, *args):
        if name == cpu._INSTALLED:
            return types.SimpleNamespace(origin=str(library))
        return real_find_spec(name, *args)

    monkeypatch.setattr(cpu.importlib.util, "find_spec", find_spec)
    return library


@pytest.mark.parametrize("changes, problem", [
    ({}, None),
    ({"torch": "1.0.0"}, "built for torch 1.0.0"),
    ({"python": "2.7"}, "built for Python 2.7"),
    ({"sources_hash": "0" * 64}, "sources"),
    ({"simd": "avx9000"}, "unknown SIMD level"),
])
def test_installed_module_is_checked(unbuilt, monkeypatch, tmp_path, changes, problem):
    monkeypatch.setattr(cpu, "_INSTALLED", "ltkd_kernels._C")
    monkeypatch.delenv("LTKD_KERNELS_CPU_CAPABILITY", raising=False)
    library = _fake_installed(monkeypatch, tmp_path, **changes)
    origin, found, _ = cpu._installed()
    assert origin == str(library)
    if problem is None:
        assert found is None
        assert cpu.status().state == "built" and "installed" in cpu.status().detail
    else:
        assert problem in found
        assert cpu.status().state in ("buildable", "unavailable")


def test_installed_module_simd_level(unbuilt, monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "_INSTALLED", "ltkd_kernels._C")
    monkeypatch.delenv("LTKD_KERNELS_CPU_CAPABILITY", raising=False)
    monkeypatch.setattr(build_config, "cpu_simd_level", lambda: "avx2")
    _fake_installed(monkeypatch, tmp_path, simd="avx512")
    assert "this CPU runs avx2" in cpu._installed()[1]
    _fake_installed(monkeypatch, tmp_path, simd="default")
    assert cpu._installed()[1] is None  # a lower level runs
    monkeypatch.setenv("LTKD_KERNELS_CPU_CAPABILITY", "AVX2")
    assert "asks for avx2" in cpu._installed()[1]  # unless another one is asked for


# ---------------------------------------------------------------------------------------------
# Command line.

def test_info_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ltkd_kernels", "info"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120,
                         env={**os.environ, "LTKD_KERNELS_CACHE_DIR": str(tmp_path / "c")})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("ltkd_kernels ") and any(line.startswith("cpu:") for line in lines)
    assert not (tmp_path / "c").exists()


def test_build_cpu_command_fails_cleanly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ltkd_kernels", "build-cpu"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**os.environ, "LTKD_KERNELS_DISABLE_CPU": "1"})
    assert out.returncode == 1
    assert "LTKD_KERNELS_DISABLE_CPU" in out.stderr


# ---------------------------------------------------------------------------------------------
# Benchmarks leave the checkout clean unless told where to write.

def test_benchmarks_without_out_leave_git_status_clean():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")

    def status():
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout

    before = status()
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--case", "launches", "--quick", "--losses", "kd",
         "--providers", "eager", "--no-plots"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert str(Path("benchmarks", "results", "tmp")) in run.stdout
    assert status() == before


def test_groups_case_runs_under_the_interpreter(tmp_path):
    """The CUDA-only ``groups`` benchmark (the walks of many groups), run as a smoke test:
    tiny sizes under the Triton interpreter, every row timed, the rule's walk marked."""
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--case", "groups", "--device", "cpu", "--N", "2",
         "--V", "700", "--G", "8", "--reps", "1", "--budget", "0", "--no-plots", "--out",
         str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads((tmp_path / "groups" / "results.json").read_text())["results"]
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert sum("(the rule's)" in r["note"] for r in rows) == 2
    assert any(r["note"].startswith("ranges") and "ranges walk (the rule's)" in r["note"]
               for r in rows)
    assert any(r["note"].startswith("drawn") and "windows walk (the rule's)" in r["note"]
               for r in rows)


def test_call_overhead_runs_under_the_interpreter(tmp_path):
    """``python -m benchmarks.call_overhead`` (the host time of a tiny call, made for a GPU),
    run as a smoke test: every loss, the three numbers and a kernel per launch."""
    out = tmp_path / "overhead.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.call_overhead", "--device", "cpu", "--reps", "2",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(out.read_text())
    for loss in ("kd", "ltkd", "dkd", "bkd"):
        row = result[loss]
        assert row["step_us"] > 0 and row["python_us"] > 0
        assert set(row["launch_us"]) == {"grouped_kl_states_kernel", "grouped_kl_finish_kernel",
                                         "grouped_kl_grad_kernel"}
    assert "Self CPU" in result["ltkd_torch_profile"]


def test_split_probe_runs_under_the_interpreter(tmp_path):
    """``python -m benchmarks.split_probe`` (V-slices per row, made for a GPU), run as a smoke
    test at a tiny size: the rule's count and a forced multiple, each with plain and
    software-pipelined loops, for KD and LTKD."""
    out = tmp_path / "splits.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.split_probe", "--device", "cpu", "--sizes", "2x300",
         "--splits", "rule,2", "--stages", "1,3", "--reps", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["loss"], r["rule"], r["stages"]) for r in rows] == [
        (loss, rule, stages) for loss in ("kd", "ltkd") for rule in (True, False)
        for stages in (1, 3)]
    assert all(r["median_ms"] > 0 for r in rows) and rows[2]["splits"] == 2 * rows[0]["splits"]


def test_gpu_check_without_cuda(tmp_path):
    """``python -m benchmarks.gpu_check`` on a machine without CUDA: checks nothing, says so,
    writes ``"status": "skipped"`` and exits 0 (3 with ``--strict``); ``--cpu-smoke`` runs its
    flow (benchmark case, report, headline table) at tiny sizes on the CPU, with the providers
    given."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    for strict, code in ((False, 0), (True, 3)):
        run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", str(tmp_path / "skip")]
                             + (["--strict"] if strict else []),
                             cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == code, run.stdout[-2000:] + run.stderr[-2000:]
        assert "SKIPPED" in run.stdout
        report = json.loads((tmp_path / "skip" / "gpu_check.json").read_text())
        assert report["status"] == "skipped"
    out = tmp_path / "smoke"
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", str(out), "--cpu-smoke",
                          "--skip-tests", "--cases", "lm,split", "--providers", "torch"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["status"] == "ok" and report["benchmarks"]["cases"]["lm"]["status"] == "ran"
    assert report["benchmarks"]["cases"]["split"]["status"] == "ran"
    assert len(json.loads((out / "split_probe.json").read_text())["rows"]) == 8
    assert {h["loss"] for h in report["benchmarks"]["headline"]} == {"ltkd", "kd", "dkd", "bkd"}
    # --providers reaches the harness: the smoke's default would time eager too
    assert all(set(h["medians_ms"]) == {"torch"} for h in report["benchmarks"]["headline"])
    assert "## Full step" in (out / "summary.md").read_text()
