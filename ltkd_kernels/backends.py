"""Which backends can run here, and the choice behind ``backend="auto"``.

- ``"triton"``: the fused Triton kernels; CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` (the interpreter: for testing, slow).
- ``"cpu"``: the fused C++ kernels (``csrc/``, see :mod:`ltkd_kernels.cpu`), CPU tensors.
- ``"torch"``: the pure-PyTorch reference, anywhere.

``"auto"`` picks Triton for CUDA tensors, the C++ backend for CPU tensors when it is built or
can be built (the first kernel call then compiles it, with a logged warning; if that fails,
``"auto"`` uses the reference from then on), and the reference otherwise. A named backend that
cannot run raises; it never falls back silently.

The queries here (:func:`available_backends`, :func:`unavailable_reason`, resolving
``"auto"``) never compile anything; only a kernel call does (or ``python -m ltkd_kernels
build-cpu``).
"""
from __future__ import annotations

import importlib.util
import os
from typing import List, Optional

import torch

BACKENDS = ("auto", "triton", "cpu", "torch")
# Triton is an optional dependency (the "triton" extra); CUDA builds of torch depend on it.
TRITON_MISSING = ("Triton is not installed: pip install 'ltkd-kernels[triton]' (CUDA torch "
                  "wheels already include it)")


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(backend: str, device: Optional[torch.device] = None) -> Optional[str]:
    """Why ``backend`` cannot run (on ``device`` when given); ``None`` when it can.

    For ``"cpu"``, ``None`` also when the C++ backend is not compiled yet but can be (the first
    kernel call compiles it; :func:`ltkd_kernels.cpu.status` tells the two apart). Never builds.
    """
    if backend == "torch":
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return TRITON_MISSING
        if device is None:
            if torch.cuda.is_available() or _triton_interpret():
                return None
            return "no CUDA device, and TRITON_INTERPRET=1 is not set for CPU tensors"
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            return None if _triton_interpret() else (
                "Triton runs CPU tensors only under TRITON_INTERPRET=1 (the interpreter, for "
                "testing); use backend='cpu' or 'torch' for speed on the CPU")
        return f"Triton cannot run tensors on device {device}"
    if backend == "cpu":
        if device is not None and device.type != "cpu":
            return f"the C++ CPU backend needs CPU tensors, got device {device}"
        from . import cpu

        return cpu.unavailable_reason()
    raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")


def available_backends() -> List[str]:
    """Names of the backends that can run here, e.g. ``["torch", "cpu"]``.

    ``"cpu"`` is listed when the C++ backend is loaded, built (installed or cached) or
    buildable: this query compiles nothing, the first kernel call does (``python -m
    ltkd_kernels build-cpu`` compiles it ahead). ``unavailable_reason(name)`` says why one is
    missing; ``python -m ltkd_kernels info`` prints them all.
    """
    return [name for name in ("torch", "cpu", "triton") if unavailable_reason(name) is None]


def _cpu_load() -> Optional[str]:
    from . import cpu

    return cpu.load()


def resolve_backend(backend, device: torch.device, *, build: bool = False) -> str:
    """The backend to use for tensors on ``device``: ``"auto"`` resolved, a named one checked.

    Without ``build`` this compiles nothing (a buildable C++ backend counts as available). With
    ``build`` (the caller runs a kernel next), a C++ backend that is not loaded yet is loaded or
    compiled first: ``"auto"`` then gives ``"torch"`` if that fails, ``"cpu"`` raises.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and unavailable_reason("triton", device) is None:
            return "triton"
        if device.type == "cpu" and unavailable_reason("cpu", device) is None:
            # A failed build is logged by cpu.load, and "auto" keeps to the reference after it.
            if not build or _cpu_load() is None:
                return "cpu"
        return "torch"
    reason = unavailable_reason(backend, device)
    if reason is None and build and backend == "cpu":
        reason = _cpu_load()
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run here: {reason}")
    return backend
