"""C++ CPU backend (``backend="cpu"``): the fused grouped-KL and SRW kernels on ATen.

The kernels (``ltkd_kernels/csrc/*.cpp``) implement the algorithms of the Triton kernels with
OpenMP threads over rows and SIMD inner loops (AVX-512 intrinsics, or ATen's portable
``at::vec`` on other CPUs); see ``csrc/grouped_kl.cpp`` and ``csrc/srw.cpp``.

How it is built: **compiled on first use** with :func:`torch.utils.cpp_extension.load` against
the torch that is installed, then loaded from a cache. Installing the package never compiles
anything (so pip never needs torch, let alone a CUDA build of it, in an isolated build
environment). Needs a C++17 compiler (``$CXX`` or ``c++``) and ``ninja`` (``pip install
ninja``); the first build takes 30 to 60 s on 2 cores and logs one line (a warning on the
``ltkd_kernels.cpu`` logger) before and after.

- Cache: ``$LTKD_KERNELS_CACHE_DIR``, else ``$TORCH_EXTENSIONS_DIR/ltkd_kernels``, else
  ``$XDG_CACHE_HOME/ltkd_kernels`` (``~/.cache/ltkd_kernels``), one directory per torch version,
  Python version and SIMD level. Changed sources are rebuilt (torch hashes them); concurrent
  first uses by several processes wait on torch's lock file there. Delete it to force a rebuild.
- SIMD level: from ``torch.backends.cpu.get_cpu_capability()`` (AVX512, AVX2, else portable);
  ``LTKD_KERNELS_CPU_CAPABILITY=AVX2`` (or ``DEFAULT``) forces a lower one.
- ``LTKD_KERNELS_DISABLE_CPU=1`` turns the backend off (``"auto"`` then uses the reference).

:func:`unavailable_reason` says why the backend cannot run (``None`` when it can); it never
raises and builds at most once per process. :func:`grouped_kl_ops` returns the
``torch.library`` operators of :mod:`ltkd_kernels.grouped_kl`; :func:`srw_weights_impl` the SRW
weights through the custom operator ``ltkd_kernels::srw_weights_cpu``.
"""
from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

__all__ = ["unavailable_reason", "grouped_kl_ops", "srw_weights_impl", "build_info",
           "build_directory", "extension"]

_LOG = logging.getLogger(__name__)
_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = ("grouped_kl.cpp", "srw.cpp", "bindings.cpp")

_lock = threading.RLock()
_loaded = False
_module = None
_reason: Optional[str] = None
_grouped_kl_ops = None
_srw_op = None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _simd_level() -> str:
    """``"avx512"``, ``"avx2"`` or ``"default"`` (portable ``at::vec``)."""
    forced = os.environ.get("LTKD_KERNELS_CPU_CAPABILITY", "").strip().upper()
    capability = forced or torch.backends.cpu.get_cpu_capability().upper()
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform == "win32":
        return "default"
    if capability.startswith("AVX512"):
        return "avx512"
    if capability.startswith("AVX2"):
        return "avx2"
    return "default"


_SIMD_FLAGS = {
    # The flags torch.compile's C++ code generator uses for the same levels.
    "avx512": ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw",
               "-mfma"],
    "avx2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "default": [],
}


def _use_openmp() -> bool:
    # torch's Linux wheels use GNU OpenMP (libgomp.so.1): the extension links the same soname,
    # so one OpenMP runtime (and torch.set_num_threads) governs both.
    return sys.platform.startswith("linux") and torch.backends.openmp.is_available()


def build_directory() -> Path:
    """Where the extension is built and cached (created on first build)."""
    base = os.environ.get("LTKD_KERNELS_CACHE_DIR")
    if base:
        root = Path(base)
    elif os.environ.get("TORCH_EXTENSIONS_DIR"):
        root = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "ltkd_kernels"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ltkd_kernels"
    torch_version = torch.__version__.replace("+", "_")
    tag = f"cpu-torch{torch_version}-py{sys.version_info[0]}{sys.version_info[1]}-{_simd_level()}"
    return root / tag


def _compiler_problem() -> Optional[str]:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found (CXX={compiler!r} is not an executable on PATH)"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja); torch needs it to build C++ extensions"
    return None


def _build():
    """Compile (or load from the cache) the extension; returns the module or raises."""
    from torch.utils import cpp_extension

    level = _simd_level()
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    name = f"ltkd_kernels_cpu_{level}"
    # No -ffast-math (the kernels rely on IEEE inf and NaN), and no implicit FMA contraction:
    # b = x / T must round the same way in the statistics and in the gradient (explicit
    # fmadd calls stay fused).
    cflags = ["-O3", "-std=c++17", "-ffp-contract=off", *_SIMD_FLAGS[level]]
    ldflags = []
    if sys.platform == "win32":  # MSVC (untested): the portable SIMD path
        cflags = ["/O2", "/std:c++17", "/fp:precise"]
    elif _use_openmp():
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    fresh = not any(directory.glob(f"{name}*.so")) and not any(directory.glob(f"{name}*.pyd"))
    if fresh:
        _LOG.warning("ltkd_kernels: compiling the C++ CPU backend (%s) in %s; the first build "
                     "takes 30 to 60 s", level, directory)
    started = time.perf_counter()
    module = cpp_extension.load(
        name=name,
        sources=[str(_CSRC / source) for source in _SOURCES],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        extra_include_paths=[str(_CSRC)],
        build_directory=str(directory),
        verbose=False,
    )
    if fresh:
        _LOG.warning("ltkd_kernels: built the C++ CPU backend in %.0f s",
                     time.perf_counter() - started)
    return module


def _load() -> None:
    """Set ``_module`` or ``_reason``, once."""
    global _loaded, _module, _reason
    with _lock:
        if _loaded:
            return
        try:
            if _env_flag("LTKD_KERNELS_DISABLE_CPU"):
                _reason = "disabled by the environment variable LTKD_KERNELS_DISABLE_CPU"
                return
            _reason = _compiler_problem()
            if _reason is not None:
                return
            _module = _build()
        except Exception as exc:  # a build error, a missing header, a failed import, ...
            _module = None
            _reason = _describe_failure(exc)
        finally:
            _loaded = True


def _describe_failure(exc: BaseException) -> str:
    message = str(exc).strip() or type(exc).__name__
    log_path = None
    try:
        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        log_path = directory / "build_error.log"
        log_path.write_text(f"{type(exc).__name__}: {message}\n")
    except OSError:
        pass
    first_line = message.splitlines()[0][:300]
    where = f"; full log in {log_path}" if log_path is not None else ""
    return f"building the C++ CPU extension failed ({type(exc).__name__}: {first_line}){where}"


def unavailable_reason() -> Optional[str]:
    """Why the C++ backend cannot run here, or ``None`` when it is built and loaded.

    The first call builds the extension (or loads it from the cache); the result is cached.
    Never raises.
    """
    _load()
    return _reason


def _module_or_raise():
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the C++ CPU backend is not available: {reason}")
    return _module


def extension():
    """The loaded extension module (``grouped_kl_stats``, ``grouped_kl_grad``, ``srw_weights``,
    ``build_info``, ``vector_exp``); raises ``RuntimeError`` when the backend is missing."""
    return _module_or_raise()


def build_info() -> str:
    """How the loaded extension was compiled (SIMD path, lanes, OpenMP) and where it lives."""
    module = _module_or_raise()
    return f"{module.build_info()} cache={build_directory()}"


def _stats_impl(student, teacher, groups, group_target, teacher_log_weight, ce_target, row_valid,
                num_groups, temperature):
    return _module.grouped_kl_stats(student, teacher, groups, group_target, teacher_log_weight,
                                    ce_target, row_valid, num_groups, temperature)


def _grad_impl(student, teacher, groups, group_target, teacher_log_weight, ce_target, row_valid,
               num_groups, temperature, lse_student, lse_teacher, coef_student, coef_teacher,
               lse_raw, grad_ce):
    return _module.grouped_kl_grad(student, teacher, groups, group_target, teacher_log_weight,
                                   ce_target, row_valid, num_groups, temperature, lse_student,
                                   lse_teacher, coef_student, coef_teacher, lse_raw, grad_ce)


def grouped_kl_ops():
    """The ``ltkd_kernels::grouped_kl_{stats,grad}_cpu`` operators (created once).

    Raises ``RuntimeError`` with the reason when the backend is not available.
    """
    global _grouped_kl_ops
    _module_or_raise()
    with _lock:
        if _grouped_kl_ops is None:
            from ..grouped_kl import define_grouped_kl_ops

            _grouped_kl_ops = define_grouped_kl_ops("cpu", _stats_impl, _grad_impl)
        return _grouped_kl_ops


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
