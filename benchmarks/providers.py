"""The providers: each one way a user could compute a loss, and the float64 check.

- ``torch``, ``cpu``, ``triton``: this package's backends (``backend=...``), each where it can
  run and where timing it means something (Triton on CUDA only: on the CPU it runs under
  the interpreter, which is for testing, not timing; the ``launches`` case counts it there);
- ``eager``: the papers' code (:mod:`benchmarks.eager`);
- ``compile``: ``torch.compile`` of that eager code (static shapes, compiled afresh for each
  problem; the compile time is reported, never timed);
- ``liger``: Liger-Kernel's KL divergence, for KD only, where installed and on CUDA. Its input
  is log-probabilities, so the student's ``log_softmax`` (and the teacher's ``softmax``) are
  part of its time, as in a user's code.

Every provider returns a scalar loss (a weight vector for SRW) from ``fn(student, teacher)``
(``fn(features)`` for SRW); the teacher may be a :class:`ltkd_kernels.TopKTeacher` for the
package's backends. The float64 reference (``ltkd_kernels.reference``) is the ground truth.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

import ltkd_kernels as lk

from . import eager
from .inputs import DTYPES, LOSS_OPTIONS, Inputs, Problem
from .measure import relative_error, synchronize

PACKAGE_BACKENDS = ("torch", "cpu", "triton")
PROVIDERS = PACKAGE_BACKENDS + ("eager", "compile", "liger")


class Unavailable(Exception):
    """A provider that cannot run this problem here; the message says why."""


def package_fn(problem: Problem, extras, backend: Optional[str]) -> Callable:
    """``lk.<loss>_loss(..., backend=backend)``; ``backend=None`` is ``lk.reference``."""
    api = lk.reference if backend is None else lk
    kw = {} if backend is None else dict(backend=backend)
    options = LOSS_OPTIONS[problem.loss]
    if problem.loss == "kd":
        return lambda s, t: api.kd_loss(s, t, **options, **kw)
    if problem.loss == "ltkd":
        groups = extras["groups"]
        return lambda s, t: api.ltkd_loss(s, t, groups, problem.G, **options, **kw)
    if problem.loss == "dkd":
        target = extras["target"]
        return lambda s, t: api.dkd_loss(s, t, target, **options, **kw)
    if problem.loss == "bkd":
        class_weight, target = extras["class_weight"], extras["target"]
        return lambda s, t: api.bkd_loss(s, t, class_weight, target=target, **options, **kw)
    if problem.loss == "srw":
        return lambda f: api.srw_weights(f, **options, **kw)
    raise ValueError(f"unknown loss {problem.loss!r}")


def eager_fn(problem: Problem, extras) -> Callable:
    """The papers' code for ``problem.loss`` (:mod:`benchmarks.eager`)."""
    options = dict(LOSS_OPTIONS[problem.loss])
    if problem.loss == "kd":
        return lambda s, t: eager.kd_loss(s, t, **options)
    if problem.loss == "ltkd":
        groups = extras["groups"]
        return lambda s, t: eager.ltkd_loss(s, t, groups, problem.G, **options)
    if problem.loss == "dkd":
        target = extras["target"]
        return lambda s, t: eager.dkd_loss(s, t, target, **options)
    if problem.loss == "bkd":
        class_weight, target = extras["class_weight"], extras["target"]
        options.pop("ce_weight")  # the paper's BKD always adds the cross-entropy
        return lambda s, t: eager.bkd_loss(s, t, class_weight, target, **options)
    if problem.loss == "srw":
        return lambda f: eager.srw_weights(f, **options)
    raise ValueError(f"unknown loss {problem.loss!r}")


def _liger_kd_fn() -> Callable:
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except Exception as error:  # noqa: BLE001  (absent or broken install)
        raise Unavailable(f"Liger-Kernel is not importable ({type(error).__name__}: {error})")
    kl_div = LigerKLDIVLoss(reduction="batchmean")
    T = LOSS_OPTIONS["kd"]["temperature"]

    def liger_kd(s, t):
        log_p_student = torch.log_softmax(s.float() / T, dim=-1)
        p_teacher = torch.softmax(t.float() / T, dim=-1)
        return kl_div(log_p_student, p_teacher) * (T * T)

    return liger_kd


def _liger_reason(loss: str, device: torch.device) -> Optional[str]:
    if loss != "kd":
        return "Liger-Kernel has a KL divergence (KD) only"
    if device.type != "cuda":
        return "Liger-Kernel's kernels are Triton kernels for CUDA"
    try:
        import liger_kernel  # noqa: F401
    except Exception as error:  # noqa: BLE001
        return f"Liger-Kernel is not installed ({type(error).__name__})"
    return None


def unavailable_reason(provider: str, problem: Problem, device: torch.device) -> Optional[str]:
    """Why ``provider`` is left out for ``problem`` on ``device`` (``None``: it runs)."""
    if provider in PACKAGE_BACKENDS:
        if provider == "triton" and device.type != "cuda":
            return ("Triton on the CPU runs under the interpreter (TRITON_INTERPRET=1), which is "
                    "for testing, not timing: left out on the CPU")
        return lk.unavailable_reason(provider, device)
    if problem.k is not None:
        return "the papers' code and its peers take dense teacher logits only"
    if provider == "liger":
        return _liger_reason(problem.loss, device)
    if provider in ("eager", "compile"):
        return None
    raise ValueError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")


@dataclass
class Built:
    fn: Callable
    compile_s: Optional[float] = None  # torch.compile: wall time of the first (compiling) call


def build(provider: str, problem: Problem, extras, device: torch.device) -> Built:
    """The callable of ``provider`` for ``problem``; raises :class:`Unavailable`."""
    reason = unavailable_reason(provider, problem, device)
    if reason is not None:
        raise Unavailable(reason)
    if provider in PACKAGE_BACKENDS:
        return Built(package_fn(problem, extras, provider))
    if provider == "eager":
        return Built(eager_fn(problem, extras))
    if provider == "compile":
        # A fresh compile per problem: static shapes, as a training loop with fixed shapes
        # gets, and no recompile limit reached across a sweep. The first call compiles.
        torch._dynamo.reset()
        return Built(torch.compile(eager_fn(problem, extras), dynamic=False))
    if provider == "liger":
        return Built(_liger_kd_fn())
    raise ValueError(f"unknown provider {provider!r}")


def tolerances(dtype: str) -> Tuple[float, float]:
    """``(loss, gradient)`` relative tolerances against the float64 reference.

    Every provider accumulates in float32 from the same (rounded) inputs as the reference, so
    the loss is held to float32 accuracy (1e-4; 1e-3 for half-precision inputs, whose losses
    go through more rounding in the papers' code). The gradient is returned in the logits'
    dtype, so it may carry that dtype's rounding: ``max(1e-4, eps(dtype))``.
    """
    eps = torch.finfo(DTYPES[dtype]).eps
    return (1e-4 if dtype == "float32" else 1e-3), max(1e-4, eps)


def _double(teacher):
    if isinstance(teacher, torch.Tensor):
        return teacher.detach().double()
    return teacher._replace(logprobs=teacher.logprobs.double())


def reference_values(problem: Problem, inputs: Inputs) -> dict:
    """Float64 reference loss and gradient (SRW: weights) on input set 0."""
    tensors = inputs.sets[0]
    if problem.loss == "srw":
        weights = lk.reference.srw_weights(tensors[0].double(), **LOSS_OPTIONS["srw"])
        return dict(weights=weights)
    student = tensors[0].detach().double().requires_grad_(True)
    loss = package_fn(problem, inputs.extras, None)(student, _double(tensors[1]))
    loss.backward()
    return dict(loss=loss.detach(), grad=student.grad)


def compare(problem: Problem, output, grad, reference) -> Tuple[bool, float, Optional[float]]:
    """``(ok, loss_rel_err, grad_rel_err)`` of one call's output (SRW: weights, no gradient)."""
    loss_tol, grad_tol = tolerances(problem.dtype)
    if problem.loss == "srw":
        err = relative_error(output, reference["weights"])
        return (not math.isnan(err) and err <= loss_tol), err, None
    loss_err = relative_error(output, reference["loss"])
    grad_err = relative_error(grad, reference["grad"])
    ok = (not math.isnan(loss_err) and not math.isnan(grad_err)
          and loss_err <= loss_tol and grad_err <= grad_tol)
    return ok, loss_err, grad_err


def first_call(fn: Callable, problem: Problem, inputs: Inputs, device: torch.device,
               tracker=None):
    """One call on set 0 (forward and backward; SRW: forward), under ``tracker`` (a
    :func:`benchmarks.measure.memory_tracker`) when given. Returns ``(seconds, output, grad)``;
    for ``torch.compile`` the seconds are its compile time."""
    tensors = inputs.sets[0]
    student = None
    if problem.loss != "srw":  # the leaf is made before the tracked region: an input
        student = tensors[0].detach().clone().requires_grad_(True)
    with (tracker.track() if tracker is not None else contextlib.nullcontext()):
        start = time.perf_counter()
        if student is None:
            output = fn(tensors[0])
        else:
            output = fn(student, tensors[1])
            output.backward()
        synchronize(device)
        seconds = time.perf_counter() - start
    return seconds, output.detach(), (None if student is None else student.grad)


def check(fn: Callable, problem: Problem, inputs: Inputs, reference, device: torch.device):
    """Run ``fn`` once on set 0 and compare with the reference: ``(ok, loss_rel_err,
    grad_rel_err, seconds)`` (the seconds are the compile time for ``torch.compile``)."""
    seconds, output, grad = first_call(fn, problem, inputs, device)
    return compare(problem, output, grad, reference) + (seconds,)
