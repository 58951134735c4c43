"""The benchmark problems (inputs, reference values) and the providers that compute them.

A *provider* is one way a user could compute a loss:

- ``torch``, ``cpu``, ``triton``: this package's backends (``backend=...``), each where it can
  run and where timing it means something (Triton on CUDA only: on the CPU it runs under
  the interpreter, which is for testing, not timing);
- ``eager``: the papers' code (:mod:`benchmarks.eager`);
- ``compile``: ``torch.compile`` of that eager code (static shapes, compiled afresh for each
  problem; the compile time is reported, never timed);
- ``liger``: Liger-Kernel's KL divergence, for KD only, where installed and on CUDA. Its input
  is log-probabilities, so the student's ``log_softmax`` (and the teacher's ``softmax``) are
  part of its time, as in a user's code.

Every provider returns a scalar loss (a weight vector for SRW) from ``fn(student, teacher)``
(``fn(features)`` for SRW), so the runner times and checks them all alike.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

import ltkd_kernels as lk

from . import eager

LOSSES = ("ltkd", "kd", "dkd", "bkd", "srw")
LOGIT_LOSSES = ("ltkd", "kd", "dkd", "bkd")
PACKAGE_BACKENDS = ("torch", "cpu", "triton")
PROVIDERS = PACKAGE_BACKENDS + ("eager", "compile", "liger")
MODES = ("forward", "backward", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The options each loss is benchmarked with: the papers' defaults where they have one.
LOSS_OPTIONS = {
    "kd": dict(temperature=2.0),
    "ltkd": dict(alpha=1.0, beta=1.0, temperature=2.0),
    "dkd": dict(alpha=1.0, beta=8.0, temperature=4.0),
    "bkd": dict(temperature=2.0),
    "srw": dict(tau=1.0),
}


class Unavailable(Exception):
    """A provider that cannot run this problem here; the message says why."""


@dataclass(frozen=True)
class Problem:
    """One benchmark configuration. ``V``/``G`` are ``None`` for SRW, ``D`` only for SRW."""

    loss: str
    N: int
    V: Optional[int]
    G: Optional[int]
    dtype: str
    D: Optional[int] = None

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    def floor_bytes(self, mode: str) -> int:
        """Bytes that must move: each input read once, the gradient written once.

        Forward reads both logits (2 N V s), backward reads both and writes the gradient
        (3 N V s), full is both (5 N V s). SRW reads the features once (N D s).
        """
        s = self.element_size
        if self.loss == "srw":
            return self.N * self.D * s
        return {"forward": 2, "backward": 3, "full": 5}[mode] * self.N * self.V * s

    def label(self) -> str:
        if self.loss == "srw":
            return f"srw N={self.N} D={self.D} {self.dtype}"
        g = f" G={self.G}" if self.G is not None else ""
        return f"{self.loss} N={self.N} V={self.V}{g} {self.dtype}"


@dataclass
class Inputs:
    """The tensors of one problem: ``sets`` of (student, teacher) or (features,) to rotate
    among, and the per-problem constants (groups, class weights, targets)."""

    sets: List[Tuple[torch.Tensor, ...]]
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def set_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sets[0])


def long_tailed_counts(V: int) -> torch.Tensor:
    """Per-class training counts of an exponential long tail (imbalance ratio 100)."""
    ranks = torch.arange(V, dtype=torch.float64) / max(V - 1, 1)
    return torch.ceil(1000.0 * torch.pow(0.01, ranks))


def make_inputs(problem: Problem, device: torch.device, *, num_sets: int = 1,
                seed: int = 0) -> Inputs:
    """Random inputs (never zeros): teacher logits ``3 randn``, student a noisy copy."""
    generator = torch.Generator().manual_seed(seed)
    dtype = DTYPES[problem.dtype]
    sets = []
    for _ in range(num_sets):
        if problem.loss == "srw":
            features = torch.randn(problem.N, problem.D, generator=generator) + 0.5
            sets.append((features.to(device=device, dtype=dtype),))
            continue
        teacher = 3.0 * torch.randn(problem.N, problem.V, generator=generator)
        student = 0.7 * teacher + 2.0 * torch.randn(problem.N, problem.V, generator=generator)
        sets.append((student.to(device=device, dtype=dtype), teacher.to(device=device, dtype=dtype)))
    extras = {}
    if problem.loss in LOGIT_LOSSES:
        counts = long_tailed_counts(problem.V)
        if problem.loss == "ltkd":
            extras["groups"] = lk.groups_from_counts(counts, problem.G).to(device)
        if problem.loss == "bkd":
            extras["class_weight"] = lk.class_balanced_weights(counts).to(device)
        if problem.loss in ("dkd", "bkd"):
            extras["target"] = torch.randint(0, problem.V, (problem.N,),
                                             generator=generator).to(device)
    return Inputs(sets=sets, extras=extras)


def reference_fn(problem: Problem, extras: Dict[str, torch.Tensor]) -> Callable:
    """The package's pure-PyTorch reference (``ltkd_kernels.reference``), the ground truth."""
    return _package_fn(problem, extras, None)


def _package_fn(problem: Problem, extras, backend: Optional[str]) -> Callable:
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
        srw = getattr(api, "srw_weights", None)
        if srw is None:
            raise Unavailable("ltkd_kernels has no srw_weights in this build")
        return lambda f: srw(f, **options, **kw)
    raise ValueError(f"unknown loss {problem.loss!r}")


def eager_fn(problem: Problem, extras) -> Callable:
    """The papers' code for ``problem.loss`` (:mod:`benchmarks.eager`)."""
    options = LOSS_OPTIONS[problem.loss]
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
        return lambda s, t: eager.bkd_loss(s, t, class_weight, target, **options)
    if problem.loss == "srw":
        return lambda f: eager.srw_weights(f, **options)
    raise ValueError(f"unknown loss {problem.loss!r}")


def _liger_kd_fn(problem: Problem) -> Callable:
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


def provider_unavailable_reason(provider: str, loss: str, device: torch.device) -> Optional[str]:
    """Why ``provider`` is left out for ``loss`` on ``device`` (``None``: it runs)."""
    if provider in PACKAGE_BACKENDS:
        if provider == "triton" and device.type != "cuda":
            return ("Triton on the CPU runs under the interpreter (TRITON_INTERPRET=1), which is "
                    "for testing, not timing: left out on the CPU")
        return lk.unavailable_reason(provider, device)
    if provider == "liger":
        if loss != "kd":
            return "Liger-Kernel has a KL divergence (KD) only"
        if device.type != "cuda":
            return "Liger-Kernel's kernels are Triton kernels for CUDA"
        try:
            import liger_kernel  # noqa: F401
        except Exception as error:  # noqa: BLE001
            return f"Liger-Kernel is not installed ({type(error).__name__})"
        return None
    if provider in ("eager", "compile"):
        return None
    raise ValueError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")


@dataclass
class Built:
    fn: Callable
    compile_s: Optional[float] = None  # torch.compile: wall time of the first (compiling) call
    note: str = ""


def build(provider: str, problem: Problem, extras, device: torch.device) -> Built:
    """The callable of ``provider`` for ``problem``; raises :class:`Unavailable`."""
    reason = provider_unavailable_reason(provider, problem.loss, device)
    if reason is not None:
        raise Unavailable(reason)
    if provider in PACKAGE_BACKENDS:
        return Built(_package_fn(problem, extras, provider))
    if provider == "eager":
        return Built(eager_fn(problem, extras))
    if provider == "compile":
        # A fresh compile per problem: static shapes, as a training loop with fixed shapes
        # gets, and no recompile limit reached across a sweep. The first call compiles.
        torch._dynamo.reset()
        return Built(torch.compile(eager_fn(problem, extras), dynamic=False))
    if provider == "liger":
        return Built(_liger_kd_fn(problem))
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


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` in float64 (NaN if either has a NaN)."""
    value = value.detach().double().reshape(-1)
    reference = reference.detach().double().reshape(-1)
    if not bool(torch.isfinite(value).all()) or not bool(torch.isfinite(reference).all()):
        return float("nan")
    denominator = reference.norm().item()
    difference = (value - reference).norm().item()
    return difference / denominator if denominator > 0 else difference


def reference_values(problem: Problem, inputs: Inputs):
    """Float64 reference loss and gradient (SRW: weights) on input set 0.

    SRW: ``ltkd_kernels.reference.srw_weights`` in float64 where the package has it, else the
    paper's N x N formula in float64 (and the result says which).
    """
    tensors = inputs.sets[0]
    if problem.loss == "srw":
        (features,) = tensors
        try:
            weights = lk.reference.srw_weights(features.double(), **LOSS_OPTIONS["srw"])
            source = "ltkd_kernels.reference.srw_weights (float64)"
        except NotImplementedError:
            normalized = torch.nn.functional.normalize(features.double(), dim=1)
            weights = torch.softmax(-(normalized @ normalized.mean(0)) / LOSS_OPTIONS["srw"]["tau"], 0)
            source = ("ltkd_kernels.reference.srw_weights is not implemented yet: the SRW "
                      "formula fh_i . mean_j fh_j in float64 instead")
        return dict(weights=weights, source=source)
    student = tensors[0].detach().double().requires_grad_(True)
    teacher = tensors[1].detach().double()
    loss = reference_fn(problem, inputs.extras)(student, teacher)
    loss.backward()
    return dict(loss=loss.detach(), grad=student.grad, source="ltkd_kernels.reference (float64)")


def check(fn: Callable, problem: Problem, inputs: Inputs, reference, device: torch.device):
    """Run ``fn`` once (forward and backward) on input set 0 and compare with the reference.

    Returns ``(ok, loss_rel_err, grad_rel_err, seconds)``: the relative errors of the loss and
    of the gradient (``None`` for SRW's weights, which carry no gradient; SRW's weight error is
    returned as the loss error), and the wall time of the call (the compile time, for
    ``torch.compile``: its first call compiles the forward and the backward).
    """
    loss_tol, grad_tol = tolerances(problem.dtype)
    tensors = inputs.sets[0]
    if problem.loss == "srw":
        start = time.perf_counter()
        weights = fn(tensors[0])
        torch.cuda.synchronize() if device.type == "cuda" else None
        seconds = time.perf_counter() - start
        err = relative_error(weights, reference["weights"])
        return (not math.isnan(err) and err <= loss_tol), err, None, seconds
    student = tensors[0].detach().clone().requires_grad_(True)
    start = time.perf_counter()
    loss = fn(student, tensors[1])
    loss.backward()
    torch.cuda.synchronize() if device.type == "cuda" else None
    seconds = time.perf_counter() - start
    loss_err = relative_error(loss, reference["loss"])
    grad_err = relative_error(student.grad, reference["grad"])
    ok = (not math.isnan(loss_err) and not math.isnan(grad_err)
          and loss_err <= loss_tol and grad_err <= grad_tol)
    return ok, loss_err, grad_err, seconds
