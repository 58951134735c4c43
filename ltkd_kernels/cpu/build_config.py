"""How the C++ CPU backend is compiled: sources, SIMD level, flags and the build key.

One definition for both build paths, the first-use build of :mod:`ltkd_kernels.cpu`
(``torch.utils.cpp_extension.load``) and the install-time build of ``setup.py``
(``ltkd_kernels._C``). ``setup.py`` loads this file by its path, without importing the package
(the package needs torch and its own dependencies at import): so it imports only the standard
library at module level, and torch inside the functions that need it.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

# The translation units, in link order; the headers next to them are part of the build key.
SOURCES = ("grouped_kl_args.cpp", "grouped_kl_states.cpp", "grouped_kl_finish.cpp",
           "grouped_kl_grad.cpp", "gradient_cache.cpp", "srw.cpp", "autograd.cpp",
           "bindings.cpp")
SOURCE_SUFFIXES = (".cpp", ".h")

# Ordered from the most portable: a module built for one level runs on a CPU of a higher one.
SIMD_LEVELS = ("default", "avx2", "avx512")
SIMD_FLAGS = {
    # The flags torch.compile's C++ code generator uses for the same levels.
    "avx512": ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw",
               "-mfma"],
    "avx2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "default": [],
}

# Where setup.py records how it built ltkd_kernels._C (next to the module).
INSTALLED_INFO = "_C_build.json"


def source_files(directory: Path) -> List[Path]:
    """The files of the build (sources and headers), sorted by name: what the hash covers and
    what an installed package ships in ``ltkd_kernels/_csrc``."""
    return sorted((p for p in Path(directory).iterdir()
                   if p.is_file() and p.suffix in SOURCE_SUFFIXES), key=lambda p: p.name)


def sources_hash(directory: Path) -> str:
    """SHA-256 of the names and contents of :func:`source_files` (not of their times: a
    checkout that rewrites files with the same contents keeps its build)."""
    digest = hashlib.sha256()
    for path in source_files(directory):
        data = path.read_bytes()
        digest.update(f"{path.name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def forced_simd_level() -> Optional[str]:
    """The level ``LTKD_KERNELS_CPU_CAPABILITY`` asks for (``AVX2``, ``DEFAULT``, ...), if set."""
    forced = os.environ.get("LTKD_KERNELS_CPU_CAPABILITY", "").strip().upper()
    return _level_of(forced) if forced else None


def _level_of(capability: str) -> str:
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform == "win32":
        return "default"
    if capability.startswith("AVX512"):
        return "avx512"
    if capability.startswith("AVX2"):
        return "avx2"
    return "default"


def cpu_simd_level() -> str:
    """The highest level this CPU runs, as torch sees it (``torch.backends.cpu``)."""
    import torch

    return _level_of(torch.backends.cpu.get_cpu_capability().upper())


def simd_level() -> str:
    """``"avx512"``, ``"avx2"`` or ``"default"`` (portable ``at::vec``): the level to build
    for, ``LTKD_KERNELS_CPU_CAPABILITY`` if set, else this CPU's."""
    return forced_simd_level() or cpu_simd_level()


def use_openmp() -> bool:
    # torch's Linux wheels use GNU OpenMP (libgomp.so.1): the extension links the same soname,
    # so one OpenMP runtime (and torch.set_num_threads) governs both.
    import torch

    return sys.platform.startswith("linux") and torch.backends.openmp.is_available()


def compile_flags(level: str) -> Tuple[List[str], List[str]]:
    """``(cflags, ldflags)`` added to torch's own for a build at ``level``."""
    if sys.platform == "win32":  # MSVC (untested): the portable SIMD path
        return ["/O2", "/std:c++17", "/fp:precise"], []
    # No -ffast-math (the kernels rely on IEEE inf and NaN), and no implicit FMA contraction:
    # b = x / T must round the same way in the statistics and in the gradient (explicit
    # fmadd calls stay fused).
    cflags = ["-O3", "-std=c++17", "-ffp-contract=off", *SIMD_FLAGS[level]]
    ldflags: List[str] = []
    if use_openmp():
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def compiler() -> str:
    return os.environ.get("CXX", "c++")


def build_key(directory: Path, level: str) -> Dict[str, object]:
    """Everything a build depends on that can differ between two builds on one machine: the
    sources' contents, the torch and Python versions, the SIMD level, the flags, ``$CXX``."""
    import torch

    cflags, ldflags = compile_flags(level)
    return {
        "sources_hash": sources_hash(directory),
        "torch": torch.__version__,
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "simd": level,
        "cflags": cflags,
        "ldflags": ldflags,
        "compiler": compiler(),
    }


def key_hash(key: Dict[str, object]) -> str:
    """A short stable hash of :func:`build_key` (names the cache directory and the module)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def ninja_available() -> bool:
    """Whether ninja can be found (on PATH, or as the ``ninja`` Python package) without
    running it: a cheap check for status queries."""
    if shutil.which("ninja") is not None:
        return True
    return _ninja_package_bin() is not None


def _ninja_package_bin() -> Optional[str]:
    """The directory of the ninja that ``pip install ninja`` put into this environment's
    scripts directory (older releases: inside the package), if any."""
    import importlib.util
    import sysconfig

    candidates = [sysconfig.get_path("scripts"), os.path.dirname(sys.executable)]
    spec = importlib.util.find_spec("ninja")
    if spec is not None and spec.submodule_search_locations:
        candidates += [str(Path(base) / "data" / "bin") for base in spec.submodule_search_locations]
    for candidate in candidates:
        if candidate and any((Path(candidate) / name).is_file() for name in ("ninja", "ninja.exe")):
            return candidate
    return None


def put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the pip package's binary is not there when the virtual
    environment's ``bin`` is not (``.venv/bin/python`` run without activating it)."""
    if shutil.which("ninja") is not None:
        return
    directory = _ninja_package_bin()
    if directory is not None:
        os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")
