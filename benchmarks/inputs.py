"""The benchmark problems and their inputs: one copy of every input maker.

- :class:`Problem`: one configuration (loss, N, V, G, dtype; D for SRW; k for a top-k teacher);
- :func:`long_tailed_counts`: per-class training counts of a long tail (groups, class weights);
- :func:`make_inputs`: random inputs of a problem (never zeros), rotated in distinct memory by
  :func:`rotate_sets` so that a CPU timing does not read the last call's cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

import ltkd_kernels as lk

LOGIT_LOSSES = ("ltkd", "kd", "dkd", "bkd")
LOSSES = LOGIT_LOSSES + ("srw",)
MODES = ("forward", "backward", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The options each loss is benchmarked with: the papers' defaults where they have one. BKD is
# the paper's loss, KL plus the student's cross-entropy (``ce_weight=1.0`` with ``target``).
LOSS_OPTIONS = {
    "kd": dict(temperature=2.0),
    "ltkd": dict(alpha=1.0, beta=1.0, temperature=2.0),
    "dkd": dict(alpha=1.0, beta=8.0, temperature=4.0),
    "bkd": dict(temperature=2.0, ce_weight=1.0),
    "srw": dict(tau=1.0),
}
DEFAULT_G = 3


@dataclass(frozen=True)
class Problem:
    """One configuration. ``V``/``G`` are ``None`` for SRW, ``D`` only for SRW; ``k`` (top-k
    teacher entries per row) is ``None`` for a dense teacher."""

    loss: str
    N: int
    V: Optional[int]
    G: Optional[int]
    dtype: str
    D: Optional[int] = None
    k: Optional[int] = None

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    def floor_bytes(self, mode: str) -> int:
        """Bytes that must move: each input read once per pass, the gradient written once.

        Dense teacher: forward reads both logits (2 N V s), backward reads both and writes the
        gradient (3 N V s), full is both (5 N V s). Top-k teacher: the student alone is dense
        (forward N V s, backward 2 N V s, plus 8 N k bytes of indices and log-probabilities per
        pass). SRW reads the features once (N D s).
        """
        s = self.element_size
        if self.loss == "srw":
            return self.N * self.D * s
        if self.k is None:
            return {"forward": 2, "backward": 3, "full": 5}[mode] * self.N * self.V * s
        sparse = self.N * self.k * 8
        dense = {"forward": 1, "backward": 2, "full": 3}[mode] * self.N * self.V * s
        return dense + sparse * (2 if mode == "full" else 1)

    def label(self) -> str:
        if self.loss == "srw":
            return f"srw N={self.N} D={self.D} {self.dtype}"
        g = f" G={self.G}" if self.G is not None else ""
        k = f" top-{self.k}" if self.k is not None else ""
        return f"{self.loss} N={self.N} V={self.V}{g}{k} {self.dtype}"


def logit_problem(loss: str, N: int, V: int, dtype: str = "float32", *, G: Optional[int] = None,
                  k: Optional[int] = None) -> Problem:
    """A loss problem with LTKD's group count defaulted (``None`` for the other losses)."""
    return Problem(loss, N, V, (G or DEFAULT_G) if loss == "ltkd" else None, dtype, k=k)


@dataclass
class Inputs:
    """The tensors of one problem: ``sets`` of ``(student, teacher)`` (the teacher a tensor or a
    :class:`ltkd_kernels.TopKTeacher`) or ``(features,)`` to rotate among, and the constants
    (groups, class weights, targets)."""

    sets: List[Tuple]
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def set_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in _tensors(self.sets[0]))


def _tensors(items):
    for item in items:
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, tuple):  # a TopKTeacher
            yield from (t for t in item if isinstance(t, torch.Tensor))


def long_tailed_counts(V: int) -> torch.Tensor:
    """Per-class training counts of an exponential long tail (imbalance ratio 100)."""
    ranks = torch.arange(V, dtype=torch.float64) / max(V - 1, 1)
    return torch.ceil(1000.0 * torch.pow(0.01, ranks))


def random_logits(N: int, V: int, generator: torch.Generator):
    """``(student, teacher)`` float32 logits: teacher ``3 randn``, student a noisy copy."""
    teacher = 3.0 * torch.randn(N, V, generator=generator)
    student = 0.7 * teacher + 2.0 * torch.randn(N, V, generator=generator)
    return student, teacher


def random_features(N: int, D: int, generator: torch.Generator) -> torch.Tensor:
    """SRW features with a shared direction (an offset), as post-ReLU features have."""
    return torch.randn(N, D, generator=generator) + 0.5


def _extras(problem: Problem, generator: torch.Generator, device) -> Dict[str, torch.Tensor]:
    extras = {}
    counts = long_tailed_counts(problem.V)
    if problem.loss == "ltkd":
        extras["groups"] = lk.groups_from_counts(counts, problem.G).to(device)
    if problem.loss == "bkd":
        extras["class_weight"] = lk.class_balanced_weights(counts).to(device)
    if problem.loss in ("dkd", "bkd"):
        extras["target"] = torch.randint(0, problem.V, (problem.N,), generator=generator).to(device)
    return extras


def make_inputs(problem: Problem, device, *, seed: int = 0) -> Inputs:
    """Random inputs of ``problem`` on ``device`` (one set; :func:`rotate_sets` adds more).

    A top-k problem's teacher is ``lk.topk_teacher(teacher_logits, k)`` of the dense teacher
    (int64 indices, float32 log-probabilities at T = 1, the default ``"renormalize"`` rule).
    """
    generator = torch.Generator().manual_seed(seed)
    dtype = DTYPES[problem.dtype]
    if problem.loss == "srw":
        features = random_features(problem.N, problem.D, generator)
        return Inputs(sets=[(features.to(device=device, dtype=dtype),)])
    student, teacher = random_logits(problem.N, problem.V, generator)
    student = student.to(device=device, dtype=dtype)
    teacher = teacher.to(device=device, dtype=dtype)
    if problem.k is not None:
        teacher = lk.topk_teacher(teacher, problem.k)
    return Inputs(sets=[(student, teacher)], extras=_extras(problem, generator, device))


def _rolled(item, shift: int):
    if isinstance(item, torch.Tensor):
        return item.roll(shift, dims=0).contiguous()
    return type(item)(*(_rolled(x, shift) if isinstance(x, torch.Tensor) else x for x in item))


def rotate_sets(inputs: Inputs, count: int) -> None:
    """``count`` input sets in distinct memory: set 0 and row-rolled copies of it (cheap; the
    values are real data, only their row order differs; the constants stay those of set 0)."""
    first = inputs.sets[0]
    rows = next(_tensors(first)).shape[0]
    inputs.sets = [first] + [tuple(_rolled(t, (i * rows) // count) for t in first)
                             for i in range(1, count)]


def input_set_count(inputs: Inputs, device, llc_bytes: Optional[int]) -> int:
    """On the CPU, enough input sets to pass twice the last-level cache, at most 8 (on CUDA the
    timer flushes the L2 cache instead)."""
    if torch.device(device).type == "cuda":
        return 1
    return max(1, min(8, math.ceil(2 * (llc_bytes or 0) / max(inputs.set_bytes, 1))))


def first_rows(problem: Problem, inputs: Inputs, rows: int):
    """The first ``rows`` rows of set 0, as a problem of its own (for the float64 check)."""
    sub = Problem(problem.loss, rows, problem.V, problem.G, problem.dtype, problem.D, problem.k)
    extras = dict(inputs.extras)
    if "target" in extras:
        extras["target"] = extras["target"][:rows]
    cut = tuple(t[:rows] if isinstance(t, torch.Tensor) else type(t)(
        *(x[:rows] if isinstance(x, torch.Tensor) else x for x in t)) for t in inputs.sets[0])
    return sub, Inputs(sets=[cut], extras=extras)
