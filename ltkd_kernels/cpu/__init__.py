"""C++ CPU backend (``backend="cpu"``): the fused grouped-KL and SRW kernels on ATen.

The kernels (``csrc/*.cpp`` at the repository root) implement the three grouped-KL operators
of ``docs/design.md`` (``states``, ``finish``, ``grad``; Python signatures in
:mod:`ltkd_kernels.cpu.grouped_kl`) and SRW, with OpenMP threads over rows and SIMD inner loops
(AVX-512 intrinsics, or ATen's portable ``at::vec`` on other CPUs).

Sources: ``csrc/`` next to the ``ltkd_kernels`` package (a source checkout), else
``ltkd_kernels/_csrc/`` inside it (where an installed package ships them).

Where the module comes from, in this order (flags, SIMD level and the build key in
:mod:`ltkd_kernels.cpu.build_config`, shared by both builds):

1. **Built at install time**: ``pip install --no-build-isolation ...`` with torch and a C++
   compiler in the environment compiles ``ltkd_kernels._C`` and records how in
   ``ltkd_kernels/_C_build.json`` (see ``setup.py``). It is used when the recorded torch version
   is the running one, its SIMD level runs on this CPU, and its sources hash is that of the
   sources the package has; otherwise (and when it fails to import: an ABI mismatch) the loader
   logs why and goes on to 2. A plain ``pip install`` (build isolation: no torch in the build
   environment) and ``LTKD_KERNELS_BUILD_CPU=0`` compile nothing at install time.
2. **Compiled on first use** with :func:`torch.utils.cpp_extension.load` against the installed
   torch, then loaded from a cache: by the first kernel call or ``python -m ltkd_kernels
   build-cpu``, never by a status query. Needs a C++17 compiler (``$CXX`` or ``c++``) and ninja
   (``pip install ninja``); takes about a minute on 2 cores (more on a busy machine). Every
   compilation logs a warning on the ``ltkd_kernels.cpu`` logger before (where it goes) and
   after (how long it took).

- Cache: ``$LTKD_KERNELS_CACHE_DIR``, else ``$TORCH_EXTENSIONS_DIR/ltkd_kernels``, else
  ``$XDG_CACHE_HOME/ltkd_kernels`` (``~/.cache/ltkd_kernels``); one directory per build key (a
  hash of the sources' contents, the torch and Python versions, SIMD level, flags and ``$CXX``,
  also in the module's name), so checkouts with different sources keep their own builds and
  identical ones share one. A completed build is imported directly (no ninja run); concurrent
  first builds by several processes wait on torch's lock file. Delete a directory (or run
  ``build-cpu --force``) to force a rebuild.
- SIMD level: from ``torch.backends.cpu.get_cpu_capability()`` (AVX512, AVX2, else portable);
  ``LTKD_KERNELS_CPU_CAPABILITY=AVX2`` (or ``DEFAULT``) forces a lower one.
- ``LTKD_KERNELS_DISABLE_CPU=1`` turns the backend off (``"auto"`` then uses the reference).

:func:`status` says, cheaply and without building, whether the module is ``"loaded"``,
``"built"`` (installed or cached), ``"buildable"`` or ``"unavailable"`` (and why);
:func:`unavailable_reason` is ``None`` for all but the last. :func:`load` imports or builds
the module (once per process; never raises). :func:`extension` returns the loaded module (its
grouped-KL functions are wrapped by :mod:`ltkd_kernels.cpu.grouped_kl`); :func:`srw_weights_impl`
the SRW weights through the custom operator ``ltkd_kernels::srw_weights_cpu``.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import build_config

__all__ = ["status", "Status", "unavailable_reason", "load", "load_info", "srw_weights_impl",
           "build_info", "build_directory", "extension", "source_directory", "empty_cache",
           "gradient_cache_info", "set_gradient_cache_limit"]

_LOG = logging.getLogger(__name__)
_PACKAGE = Path(__file__).resolve().parent.parent  # ltkd_kernels/
_INSTALLED = __name__.rpartition(".")[0] + "._C"  # "ltkd_kernels._C", built by setup.py
_SOURCES = build_config.SOURCES
_LIB_EXT = ".pyd" if sys.platform == "win32" else ".so"  # what cpp_extension.load writes
_MARKER = "build.json"  # written into a cache directory once its build is complete
BUILDABLE = ("not built yet: compiled on first use (about a minute) or by "
             "`python -m ltkd_kernels build-cpu`")

_lock = threading.RLock()
_attempted = False  # load() ran in this process (it does not retry a failure)
_module = None
_reason: Optional[str] = None
_info: Dict[str, object] = {}
_srw_op = None


class Status(NamedTuple):
    """The backend's state: ``"loaded"`` (imported in this process), ``"built"`` (an installed
    or cached module is ready to import), ``"buildable"`` (the first use compiles it) or
    ``"unavailable"``; ``detail`` says where the module is or why it cannot be."""

    state: str
    detail: str

    def __str__(self) -> str:
        return f"{self.state}: {self.detail}"


def source_directory() -> Optional[Path]:
    """Where the C++ sources are: ``csrc/`` at the repository root (the parent directory of the
    ``ltkd_kernels`` package), else ``ltkd_kernels/_csrc/``; ``None`` when neither has them."""
    for candidate in (_PACKAGE.parent / "csrc", _PACKAGE / "_csrc"):
        if all((candidate / source).is_file() for source in _SOURCES):
            return candidate
    return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _cache_root() -> Path:
    base = os.environ.get("LTKD_KERNELS_CACHE_DIR")
    if base:
        return Path(base)
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "ltkd_kernels"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ltkd_kernels"


def _cache_entry(sources: Path, level: Optional[str] = None) -> Tuple[Path, str, Dict]:
    """``(directory, module name, build key)`` of the first-use build of ``sources``."""
    level = level or build_config.simd_level()
    key = build_config.build_key(sources, level)
    digest = build_config.key_hash(key)
    torch_version = torch.__version__.replace("+", "_")
    tag = (f"cpu-torch{torch_version}-py{sys.version_info[0]}{sys.version_info[1]}-{level}"
           f"-{digest}")
    return _cache_root() / tag, f"ltkd_kernels_cpu_{digest}", key


def build_directory(sources: Optional[Path] = None, level: Optional[str] = None) -> Path:
    """Where the first-use build of ``sources`` (default: :func:`source_directory`) at ``level``
    (default: this machine's) is cached; the name ends with the build key's hash."""
    sources = sources or source_directory()
    if sources is None:
        raise FileNotFoundError(_missing_sources())
    return _cache_entry(Path(sources), level)[0]


def _missing_sources() -> str:
    return (f"the C++ sources are in neither {_PACKAGE.parent / 'csrc'} nor "
            f"{_PACKAGE / '_csrc'}")


def _compiler_problem() -> Optional[str]:
    """Cheap (nothing is run): a missing compiler or ninja."""
    compiler = build_config.compiler()
    if shutil.which(compiler) is None:
        return f"no C++ compiler found (CXX={compiler!r} is not an executable on PATH)"
    if not build_config.ninja_available():
        return "ninja is not installed (pip install ninja); torch needs it to build C++ extensions"
    return None


def _installed() -> Tuple[Optional[str], Optional[str], Dict]:
    """``(path of ltkd_kernels._C or None, why it cannot be used or None, its build record)``.

    Reads ``_C_build.json`` and hashes the sources; imports nothing."""
    try:
        spec = importlib.util.find_spec(_INSTALLED)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return None, None, {}
    origin = spec.origin
    record_path = Path(origin).parent / build_config.INSTALLED_INFO
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as exc:
        return origin, f"its build record {record_path} is unreadable ({exc})", {}
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    level = record.get("simd")
    if record.get("torch") != torch.__version__:
        return origin, f"built for torch {record.get('torch')}, running {torch.__version__}", record
    if record.get("python") != python:
        return origin, f"built for Python {record.get('python')}, running {python}", record
    if level not in build_config.SIMD_LEVELS:
        return origin, f"unknown SIMD level {level!r} in {record_path}", record
    forced = build_config.forced_simd_level()
    if forced is not None and forced != level:
        # An explicit level (to test the portable path, say) wants that build, not another.
        return origin, f"built for {level}, LTKD_KERNELS_CPU_CAPABILITY asks for {forced}", record
    cpu_level = build_config.cpu_simd_level()
    if build_config.SIMD_LEVELS.index(level) > build_config.SIMD_LEVELS.index(cpu_level):
        return origin, f"built for {level}, this CPU runs {cpu_level}", record
    sources = source_directory()
    # Without sources (a package stripped of _csrc) there is nothing to compare or to build.
    if sources is not None and build_config.sources_hash(sources) != record.get("sources_hash"):
        return origin, f"the sources in {sources} changed since it was built", record
    return origin, None, record


def status() -> Status:
    """Where the backend stands, without building or importing anything (reads the build
    records and hashes the sources: milliseconds). See :class:`Status`."""
    if _module is not None:
        return Status("loaded", f"{_info['origin']} module {_info['path']} ({_info['simd']})")
    if _attempted and _reason is not None:
        return Status("unavailable", _reason)
    if _env_flag("LTKD_KERNELS_DISABLE_CPU"):
        return Status("unavailable",
                      "disabled by the environment variable LTKD_KERNELS_DISABLE_CPU")
    try:
        origin, problem, record = _installed()
        if origin is not None and problem is None:
            return Status("built", f"installed module {origin} ({record.get('simd')}, "
                                   "built at install time)")
        sources = source_directory()
        if sources is None:
            return Status("unavailable", _missing_sources())
        directory, name, _ = _cache_entry(sources)
        library = directory / f"{name}{_LIB_EXT}"
        if (directory / _MARKER).is_file() and library.is_file():
            return Status("built", f"cached build {library}")
        missing = _compiler_problem()
        if missing is not None:
            return Status("unavailable", missing)
        stale = f" (the installed module is not used: {problem})" if problem else ""
        return Status("buildable", BUILDABLE + stale)
    except Exception as exc:  # an unreadable cache directory, ...; status never raises
        return Status("unavailable", f"{type(exc).__name__}: {exc}")


def unavailable_reason() -> Optional[str]:
    """Why the C++ backend cannot run here, or ``None`` when it can: loaded, built, or
    buildable (then the first kernel call compiles it, and a failure of that build makes this
    return the failure). Cheap: never builds, never raises."""
    current = status()
    return current.detail if current.state == "unavailable" else None


def load(force: bool = False) -> Optional[str]:
    """Import the installed module, else the cached build, else compile it; ``None`` when the
    module is loaded, else why not (also logged). Once per process: a failure is not retried.
    ``force`` ignores the installed module and the cache and compiles afresh (for a process
    that has not loaded the module yet: ``python -m ltkd_kernels build-cpu --force``)."""
    global _attempted, _module, _reason
    with _lock:
        if (_module is not None or _attempted) and not force:
            return _reason
        _attempted = True
        _reason = None
        try:
            if _env_flag("LTKD_KERNELS_DISABLE_CPU"):
                _reason = "disabled by the environment variable LTKD_KERNELS_DISABLE_CPU"
                return _reason
            note = None
            if not force:
                origin, problem, record = _installed()
                if origin is not None and problem is None:
                    started = time.perf_counter()
                    try:
                        _module = importlib.import_module(_INSTALLED)
                        _info.update(origin="installed", path=origin, simd=record.get("simd"),
                                     compiled=False, seconds=time.perf_counter() - started)
                        return None
                    except Exception as exc:  # an ABI mismatch: undefined symbols, ...
                        problem = f"importing it failed ({type(exc).__name__}: {exc})"
                        _LOG.warning("ltkd_kernels: the installed module %s is not used: %s",
                                     origin, problem)
                if origin is not None:
                    # Also named in the announcement of the compilation, if one follows.
                    note = f"the installed module {origin} is not used: {problem}"
                    _LOG.info("ltkd_kernels: %s", note)
            sources = source_directory()
            if sources is None:
                raise FileNotFoundError(_missing_sources())
            _reason = _compiler_problem()
            if _reason is None:
                _module = _build(sources, force, note)
        except Exception as exc:  # a build error, a missing header, a failed import, ...
            _module = None
            _reason = _describe_failure(exc)
        if _reason is not None:
            _LOG.warning("ltkd_kernels: the C++ CPU backend is unavailable: %s", _reason)
        return _reason


def load_info() -> Dict[str, object]:
    """How the loaded module was obtained: ``origin`` (``"installed"`` or ``"cache"``),
    ``path``, ``simd``, ``compiled`` (compiled by this process) and ``seconds`` (of loading,
    compilation included); empty before :func:`load` succeeds."""
    return dict(_info) if _module is not None else {}


def _import_file(name: str, path: Path):
    """Import a built extension from its file (what ``cpp_extension.load`` does after ninja)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(sources: Path, force: bool, note: Optional[str]):
    """The cached build of ``sources``, compiled first when missing; returns the module."""
    level = build_config.simd_level()
    directory, name, key = _cache_entry(sources, level)
    library = directory / f"{name}{_LIB_EXT}"
    marker = directory / _MARKER
    started = time.perf_counter()
    if force:
        shutil.rmtree(directory, ignore_errors=True)
    elif marker.is_file() and library.is_file():
        # The directory is keyed by the sources' contents, so a completed build is current:
        # import it without asking ninja (which would rebuild after a mere touch of a source).
        try:
            module = _import_file(name, library)
            _info.update(origin="cache", path=str(library), simd=level, compiled=False,
                         seconds=time.perf_counter() - started)
            return module
        except Exception as exc:
            _LOG.warning("ltkd_kernels: the cached build %s failed to import (%s); rebuilding",
                         library, exc)
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    cflags, ldflags = build_config.compile_flags(level)
    _LOG.warning("ltkd_kernels: compiling the C++ CPU backend (%s) into %s%s; this takes about "
                 "a minute", level, directory, f" ({note})" if note else "")
    build_config.put_ninja_on_path()
    module = cpp_extension.load(
        name=name,
        sources=[str(sources / source) for source in _SOURCES],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        extra_include_paths=[str(sources)],
        build_directory=str(directory),
        verbose=False,
    )
    seconds = time.perf_counter() - started
    record = dict(key, module=library.name, sources=str(sources), build_seconds=round(seconds, 1),
                  built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    partial = marker.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, marker)  # atomic: a reader sees no record or a whole one
    _info.update(origin="cache", path=str(library), simd=level, compiled=True, seconds=seconds)
    _LOG.warning("ltkd_kernels: built the C++ CPU backend in %.0f s: %s", seconds, library)
    return module


def _describe_failure(exc: BaseException) -> str:
    message = str(exc).strip() or type(exc).__name__
    log_path = None
    try:
        try:
            directory = build_directory()
        except Exception:
            directory = _cache_root()
        directory.mkdir(parents=True, exist_ok=True)
        log_path = directory / "build_error.log"
        log_path.write_text(f"{type(exc).__name__}: {message}\n")
    except OSError:
        pass
    first_line = message.splitlines()[0][:300]
    where = f"; full log in {log_path}" if log_path is not None else ""
    return f"building the C++ CPU extension failed ({type(exc).__name__}: {first_line}){where}"


def _module_or_raise():
    reason = load()
    if reason is not None:
        raise RuntimeError(f"the C++ CPU backend is not available: {reason}")
    return _module


def extension():
    """The loaded extension module (``grouped_kl_states``, ``grouped_kl_finish``,
    ``grouped_kl_partial``, ``grouped_kl_loss_forward``, ``grouped_kl_grad``, ``srw_weights``,
    ``build_info``, ``vector_exp``), built first if needed; raises ``RuntimeError`` when the
    backend is missing."""
    return _module_or_raise()


def build_info() -> str:
    """How the loaded extension was compiled (SIMD path, lanes, OpenMP) and where it lives."""
    module = _module_or_raise()
    return f"{module.build_info()} {_info['origin']}={_info['path']}"


def empty_cache() -> None:
    """Return the free gradient buffers the C++ backend keeps for reuse to the OS (as
    ``torch.cuda.empty_cache`` does for CUDA memory). Buffers in live tensors are untouched.

    Why there is a cache: the backward's ``(N, V)`` gradient is a fresh allocation each call,
    and on a fresh mapping the OS faults and zeroes every page on first write, which at large
    sizes costs more than the gradient kernel itself. Gradients of 256 KiB and more are taken
    from a small cache instead: a buffer is reused only after every tensor that referred to it
    has been freed (normally by the model's backward, before the next step's). At most two free
    buffers and 1 GiB are kept (:func:`set_gradient_cache_limit`; the environment variable
    ``LTKD_KERNELS_CPU_GRAD_CACHE`` sets the count at start-up, ``0`` turns the cache off).
    A no-op when the extension is not loaded."""
    if _module is not None:
        _module.gradient_cache_release()


def gradient_cache_info() -> Dict[str, int]:
    """The gradient cache's state: ``free_buffers`` and ``free_bytes`` (kept for reuse),
    ``live_bytes`` (in tensors now), ``hits`` / ``misses`` (requests served from the cache /
    by a new buffer since start), ``limit`` and ``max_bytes`` (most free buffers and bytes
    kept). Loads the extension."""
    return dict(_module_or_raise().gradient_cache_info())


def set_gradient_cache_limit(buffers: int, max_bytes: int = 1 << 30) -> None:
    """Keep at most ``buffers`` free gradient buffers of at most ``max_bytes`` in all (default
    1 GiB: a buffer held between steps adds to the peak memory of what runs then; larger
    gradients are returned to the OS). ``buffers=0`` turns the cache off and frees what it
    holds. Loads the extension."""
    for name, value in (("buffers", buffers), ("max_bytes", max_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    _module_or_raise().gradient_cache_set_limit(buffers, max_bytes)


def _define_srw_op():
    @torch.library.custom_op("ltkd_kernels::srw_weights_cpu", mutates_args=())
    def srw_weights_cpu(features: Tensor, mask: Optional[Tensor], tau: float,
                        eps: float) -> Tensor:
        return _module.srw_weights(features, mask, tau, eps)

    @srw_weights_cpu.register_fake
    def _(features, mask, tau, eps):
        return features.new_empty(features.shape[:2], dtype=torch.float32)

    return srw_weights_cpu


def srw_weights_impl(features: Tensor, mask: Optional[Tensor], tau: float, eps: float) -> Tensor:
    """SRW weights ``(B, P)`` float32 from ``features`` ``(B, P, D)`` (unit stride along D).

    Per image: ``fh_i = f_i / max(||f_i||, eps)``, ``m`` = mean of ``fh`` over unmasked
    patches, ``w = softmax(-(fh_i . m) / tau)`` over unmasked patches; masked patches get 0 and
    an image with every patch masked gets all zeros. Float32 accumulation, deterministic; no
    gradient (the weights are constants). Raises ``RuntimeError`` when the backend is missing.
    """
    global _srw_op
    _module_or_raise()
    with _lock:
        if _srw_op is None:
            _srw_op = _define_srw_op()
    return _srw_op(features, mask, float(tau), float(eps))
