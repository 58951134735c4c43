"""End-to-end long-tailed distillation demo: ``python -m ltkd_kernels demo``.

What it does, on the CPU and with nothing downloaded:

1. **Data** (:func:`make_long_tailed_data`): a synthetic ``C``-class problem in a
   ``input_dim``-dimensional space, made from a seed. Classes come in superclasses of five (as
   in CIFAR-100), each class a mixture of a few Gaussian modes around a class centre that lies
   near its superclass centre, so that classes of one superclass overlap and a teacher has
   "dark knowledge" to pass on. The training set is long-tailed with the CIFAR-100-LT profile
   ``n_c = n_max * (1 / imbalance)^(c / (C - 1))`` (class 0 the most frequent); the test set is
   balanced. Superclasses are assigned at random, so head and tail classes share superclasses.
2. **Teacher**: a larger MLP trained with cross-entropy on the long-tailed set (the LTKD
   paper's setting: the teacher sees the same long-tailed data).
3. **Students**: one smaller MLP per method, all from the same initial weights and seeing the
   same batches, trained with cross-entropy alone (``ce``) or cross-entropy plus one of this
   package's losses: ``kd`` (:class:`~ltkd_kernels.KDLoss`), ``dkd``
   (:class:`~ltkd_kernels.DKDLoss`), ``bkd`` (:class:`~ltkd_kernels.BKDLoss` with
   :func:`~ltkd_kernels.class_balanced_weights`), ``ltkd`` (:class:`~ltkd_kernels.LTKDLoss`
   with :func:`~ltkd_kernels.groups_from_counts`) and ``ltkd+srw`` (LTKD with the sample
   weights of ``SRWeighting`` on the teacher's penultimate features, ``reduction="sum"``).
4. **Evaluation**: accuracy on the balanced test set per class group (head / medium / tail
   for three groups, from :func:`~ltkd_kernels.groups_from_counts` on the training counts)
   and overall, plus the distillation loss's share of the training step time.

Timing (the ``loss %`` column): each training step is timed as a whole (batch gather,
teacher forward, student forward, losses, backward, optimizer step). Inside it, the
distillation loss's forward (SRW weights included for ``ltkd+srw``) and its backward are
timed on their own: the backward is ``torch.autograd.grad(kd_term, student_logits)``, which
runs the loss's part of the graph only, and the gradient at the logits is then pushed through
the student with ``student_logits.backward(...)``. ``loss %`` is the sum of those two times
over the whole sum of step times. The cross-entropy is not counted as distillation loss.

Determinism: every random draw comes from a ``torch.Generator`` seeded from ``seed``; the
number of CPU threads is fixed (``threads``) and ``torch.use_deterministic_algorithms`` is on
while the demo runs, so the same seed (and thread count, on one machine) gives bit-identical
accuracies. The timing columns are measurements and vary run to run.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

import ltkd_kernels as lk
from ltkd_kernels.backends import resolve_backend

#: Method names in the order they are run and shown (the ``--methods`` vocabulary).
METHODS: Tuple[str, ...] = ("ce", "kd", "dkd", "bkd", "ltkd", "ltkd+srw")
#: Loss backends the demo can use (it runs on the CPU; Triton there is only an interpreter).
BACKENDS: Tuple[str, ...] = ("auto", "cpu", "torch")
METHOD_LABELS = {"ce": "CE", "kd": "KD", "dkd": "DKD", "bkd": "BKD", "ltkd": "LTKD",
                 "ltkd+srw": "LTKD+SRW"}


class DemoConfigError(ValueError):
    """A bad :class:`DemoConfig` value; ``field`` names it (the CLI flag is ``--field``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass
class DemoConfig:
    """Everything that defines a demo run; the defaults are ``python -m ltkd_kernels demo``.

    Values are checked on construction (:class:`DemoConfigError` names the bad field).
    """

    classes: int = 100            # number of classes C
    imbalance: float = 100.0      # n_max / n_min of the training set
    groups: int = 3               # class groups for the table and for LTKD
    epochs: int = 24              # student epochs (per method)
    teacher_epochs: int = 24      # teacher epochs
    seed: int = 0
    methods: Tuple[str, ...] = METHODS
    out: str = "demo_output"
    max_per_class: int = 500      # n_max: training samples of the most frequent class
    test_per_class: int = 100     # balanced test set
    input_dim: int = 32
    teacher_hidden: int = 512     # two hidden layers
    student_hidden: int = 64      # one hidden layer
    batch_size: int = 128
    lr: float = 0.05
    threads: int = 1              # tiny matrices: more threads cost more than they give
    backend: str = "auto"         # the losses' backend: "auto" (C++ if it builds), "cpu", "torch"
    progress: bool = True
    chart: bool = True

    def __post_init__(self):
        if isinstance(self.methods, str):
            self.methods = tuple(m.strip() for m in self.methods.split(",") if m.strip())
        # Keep the order given, drop repeats.
        self.methods = tuple(dict.fromkeys(str(m).strip().lower() for m in self.methods))
        _check_config(self)


def _check_int(cfg, name: str, low: int, high: Optional[int] = None):
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DemoConfigError(name, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise DemoConfigError(name, f"must be an integer {bound}, got {value}")


def _check_config(cfg: DemoConfig) -> None:
    _check_int(cfg, "classes", 2, 100_000)
    imbalance = cfg.imbalance
    if isinstance(imbalance, bool) or not isinstance(imbalance, (int, float)) \
            or not math.isfinite(imbalance) or imbalance < 1:
        raise DemoConfigError("imbalance", f"must be a finite number >= 1 (n_max / n_min), "
                                           f"got {imbalance!r}")
    if isinstance(cfg.groups, int) and not isinstance(cfg.groups, bool) \
            and cfg.groups > cfg.classes:
        raise DemoConfigError("groups", f"must be at most the number of classes "
                                        f"({cfg.classes}), got {cfg.groups}")
    _check_int(cfg, "groups", 1, cfg.classes)
    _check_int(cfg, "epochs", 1)
    _check_int(cfg, "teacher_epochs", 1)
    _check_int(cfg, "seed", 0, 2**31 - 1)
    if not cfg.methods:
        raise DemoConfigError("methods", f"must name at least one of {', '.join(METHODS)}")
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise DemoConfigError("methods", f"unknown method(s) {', '.join(map(repr, unknown))}; "
                                         f"choose from {', '.join(METHODS)}")
    if not isinstance(cfg.out, str) or not cfg.out:
        raise DemoConfigError("out", f"must be a folder path, got {cfg.out!r}")
    _check_int(cfg, "max_per_class", 1)
    _check_int(cfg, "test_per_class", 1)
    _check_int(cfg, "input_dim", 1)
    _check_int(cfg, "teacher_hidden", 1)
    _check_int(cfg, "student_hidden", 1)
    _check_int(cfg, "batch_size", 1)
    _check_int(cfg, "threads", 1)
    if cfg.backend not in BACKENDS:
        raise DemoConfigError("backend", f"must be one of {', '.join(BACKENDS)} (the demo runs "
                                         f"on the CPU), got {cfg.backend!r}")
    if not isinstance(cfg.lr, (int, float)) or not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise DemoConfigError("lr", f"must be a finite number > 0, got {cfg.lr!r}")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def long_tailed_counts(num_classes: int, max_count: int, imbalance: float) -> List[int]:
    """CIFAR-100-LT counts ``n_c = floor(n_max * (1 / imbalance)^(c / (C - 1)))``, at least 1."""
    if num_classes == 1:
        return [max_count]
    return [max(1, int(max_count * (1.0 / imbalance) ** (c / (num_classes - 1))))
            for c in range(num_classes)]


@dataclass
class LongTailedData:
    x_train: torch.Tensor   # (N_train, D) float32
    y_train: torch.Tensor   # (N_train,) int64
    x_test: torch.Tensor    # (N_test, D) float32, balanced
    y_test: torch.Tensor    # (N_test,) int64
    counts: List[int]       # training count per class


# Geometry of the synthetic task (in units of the per-mode noise std). Chosen so that a
# two-layer MLP trained on the long-tailed set is decent overall but clearly worse on the tail.
_SUPERCLASS_SIZE = 5
_SUPERCLASS_SPREAD = 1.0   # std of superclass centres
_CLASS_SPREAD = 0.5        # std of class centres around their superclass centre
_MODE_SPREAD = 0.3         # std of a class's modes around its centre
_MODES_PER_CLASS = 3


def make_long_tailed_data(cfg: DemoConfig) -> LongTailedData:
    """The long-tailed training set and the balanced test set, deterministic from ``cfg.seed``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    num_classes, dim = cfg.classes, cfg.input_dim
    num_super = max(1, math.ceil(num_classes / _SUPERCLASS_SIZE))
    super_centres = _SUPERCLASS_SPREAD * torch.randn(num_super, dim, generator=gen)
    # A random superclass per class (balanced), so frequency and superclass are unrelated.
    superclass = torch.randperm(num_classes, generator=gen) % num_super
    class_centres = super_centres[superclass] + _CLASS_SPREAD * torch.randn(
        num_classes, dim, generator=gen)
    modes = class_centres[:, None, :] + _MODE_SPREAD * torch.randn(
        num_classes, _MODES_PER_CLASS, dim, generator=gen)

    def sample(per_class: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        labels = torch.repeat_interleave(torch.arange(num_classes), torch.tensor(per_class))
        mode = torch.randint(_MODES_PER_CLASS, (labels.numel(),), generator=gen)
        noise = torch.randn(labels.numel(), dim, generator=gen)
        return modes[labels, mode] + noise, labels

    counts = long_tailed_counts(num_classes, cfg.max_per_class, cfg.imbalance)
    x_train, y_train = sample(counts)
    x_test, y_test = sample([cfg.test_per_class] * num_classes)
    # Standardise with the training statistics (as one would with real features).
    mean, std = x_train.mean(0), x_train.std(0)
    return LongTailedData((x_train - mean) / std, y_train, (x_test - mean) / std, y_test, counts)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

class MLP(nn.Module):
    """``depth`` hidden ReLU layers of width ``hidden``, then a linear classifier."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int, depth: int):
        super().__init__()
        layers: List[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(logits, penultimate features)``."""
        features = self.body(x)
        return self.head(features), features


def _seeded_model(seed: int, *args) -> MLP:
    # nn.Linear draws its initial weights from the global generator: fork it so that the
    # demo neither depends on nor disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(*args)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

class _Progress:
    """Progress on stderr: a per-epoch tqdm bar on a terminal (when tqdm is installed), and a
    one-line summary per trained model in any case (so logs stay short)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.enabled, self.bar = enabled, None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=desc, unit="epoch", leave=False,
                                file=sys.stderr, dynamic_ncols=True)
            else:
                self.total, self.desc, self.done = total, desc, 0

    def update(self, **info):
        if not self.enabled or not sys.stderr.isatty():
            return
        if self.bar is not None:
            self.bar.set_postfix(info, refresh=False)
            self.bar.update(1)
        else:
            self.done += 1
            details = " ".join(f"{k}={v}" for k, v in info.items())
            print(f"\r{self.desc}: epoch {self.done}/{self.total} {details}   ", end="",
                  file=sys.stderr, flush=True)

    def close(self, summary: str = ""):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        elif sys.stderr.isatty():
            print("\r" + " " * 79 + "\r", end="", file=sys.stderr)
        if summary:
            print(summary, file=sys.stderr, flush=True)


def _optimizer(model: nn.Module, cfg: DemoConfig, steps: int):
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps)))
    return opt, sched


def train_teacher(data: LongTailedData, cfg: DemoConfig) -> MLP:
    """The larger MLP, cross-entropy on the long-tailed training set."""
    teacher = _seeded_model(cfg.seed + 1, cfg.input_dim, cfg.teacher_hidden, cfg.classes, 2)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    n = data.y_train.numel()
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    opt, sched = _optimizer(teacher, cfg, cfg.teacher_epochs * steps_per_epoch)
    progress = _Progress(cfg.teacher_epochs, "teacher", cfg.progress)
    start = time.perf_counter()
    for _ in range(cfg.teacher_epochs):
        total = 0.0
        for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
            logits, _ = teacher(data.x_train[idx])
            loss = F.cross_entropy(logits, data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * idx.numel()
        progress.update(loss=f"{total / n:.3f}")
    progress.close(f"teacher trained in {time.perf_counter() - start:.1f} s")
    teacher.eval()
    return teacher


# Hyperparameters from the methods' papers: KD T=4 (CIFAR setting), DKD alpha=1 beta=8 T=4,
# BKD T=2 with effective-number weights, LTKD T=4. Every distillation term is added to the
# cross-entropy with weight 1 (the losses carry their own T^2 factor).
LTKD_ALPHA, LTKD_BETA, LTKD_TEMPERATURE = 1.0, 1.0, 4.0
SRW_TAU = 1.0


def make_criterion(method: str, counts: Sequence[int], groups: torch.Tensor, num_groups: int,
                   backend: str = "auto"):
    """The distillation term for ``method`` (``None`` for ``ce``), as a callable
    ``(student_logits, teacher_logits, target, teacher_features) -> loss``."""
    if method == "ce":
        return None
    if method == "kd":
        loss = lk.KDLoss(temperature=4.0, backend=backend)
        return lambda s, t, y, f: loss(s, t)
    if method == "dkd":
        loss = lk.DKDLoss(alpha=1.0, beta=8.0, temperature=4.0, backend=backend)
        return lambda s, t, y, f: loss(s, t, y)
    if method == "bkd":
        loss = lk.BKDLoss(lk.class_balanced_weights(counts), temperature=2.0, backend=backend)
        return lambda s, t, y, f: loss(s, t)
    if method == "ltkd":
        loss = lk.LTKDLoss(groups, num_groups, alpha=LTKD_ALPHA, beta=LTKD_BETA,
                           temperature=LTKD_TEMPERATURE, backend=backend)
        return lambda s, t, y, f: loss(s, t)
    if method == "ltkd+srw":
        srw = lk.SRWeighting(tau=SRW_TAU, backend=backend)
        loss = lk.LTKDLoss(groups, num_groups, alpha=LTKD_ALPHA, beta=LTKD_BETA,
                           temperature=LTKD_TEMPERATURE, backend=backend)
        # "batchmean" with sample weights is the weighted mean sum_i w_i l_i / sum_i w_i: with
        # SRW's weights (summing to 1) the paper's sum_i w_i l_i, on LTKD's scale.
        return lambda s, t, y, f: loss(s, t, sample_weight=srw(f))
    raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


@dataclass
class StudentRun:
    method: str
    accuracy: Dict[str, float]     # group name (and "all") -> accuracy in %
    step_seconds: float            # sum over all steps
    loss_forward_seconds: float
    loss_backward_seconds: float
    steps: int

    @property
    def loss_share(self) -> float:
        return (self.loss_forward_seconds + self.loss_backward_seconds) / self.step_seconds


def train_student(method: str, data: LongTailedData, teacher: MLP, groups: torch.Tensor,
                  group_names: Sequence[str], cfg: DemoConfig) -> StudentRun:
    """One student, cross-entropy plus ``method``'s distillation term; returns its scores."""
    # Same initial weights and same batch order for every method: a paired comparison.
    student = _seeded_model(cfg.seed + 3, cfg.input_dim, cfg.student_hidden, cfg.classes, 1)
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    criterion = make_criterion(method, data.counts, groups, len(group_names), cfg.backend)
    n = data.y_train.numel()
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    opt, sched = _optimizer(student, cfg, cfg.epochs * steps_per_epoch)
    step_time = loss_fwd_time = loss_bwd_time = 0.0
    steps = 0
    progress = _Progress(cfg.epochs, f"student {METHOD_LABELS[method]:<8}", cfg.progress)
    clock = time.perf_counter
    for _ in range(cfg.epochs):
        total = 0.0
        for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
            t_step = clock()
            x, y = data.x_train[idx], data.y_train[idx]
            with torch.no_grad():
                teacher_logits, teacher_features = teacher(x)
            logits, _ = student(x)
            ce = F.cross_entropy(logits, y)
            if criterion is None:
                grad_logits, = torch.autograd.grad(ce, logits)
                loss_value = ce.item()
            else:
                t0 = clock()
                kd_term = criterion(logits, teacher_logits, y, teacher_features)
                t1 = clock()
                grad_kd, = torch.autograd.grad(kd_term, logits)
                t2 = clock()
                loss_fwd_time += t1 - t0
                loss_bwd_time += t2 - t1
                grad_ce, = torch.autograd.grad(ce, logits)
                grad_logits = grad_ce + grad_kd
                loss_value = ce.item() + kd_term.item()
            opt.zero_grad(set_to_none=True)
            logits.backward(grad_logits)
            opt.step()
            sched.step()
            step_time += clock() - t_step
            steps += 1
            total += loss_value * idx.numel()
        progress.update(loss=f"{total / n:.3f}")
    accuracy = evaluate(student, data, groups, group_names)
    progress.close(f"student {METHOD_LABELS[method]:<8} " + "  ".join(
        f"{k} {v:5.1f}" for k, v in accuracy.items()))
    return StudentRun(method, accuracy, step_time, loss_fwd_time, loss_bwd_time, steps)


@torch.no_grad()
def evaluate(model: MLP, data: LongTailedData, groups: torch.Tensor,
             group_names: Sequence[str]) -> Dict[str, float]:
    """Accuracy (%) on the balanced test set per class group of the true label, and overall."""
    model.eval()
    logits, _ = model(data.x_test)
    correct = (logits.argmax(-1) == data.y_test).double()
    test_group = groups[data.y_test]
    accuracy = {name: 100.0 * correct[test_group == k].mean().item()
                for k, name in enumerate(group_names)}
    accuracy["all"] = 100.0 * correct.mean().item()
    return accuracy


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def group_names_for(num_groups: int) -> List[str]:
    """``head / medium / tail`` for three groups, ``head / tail`` for two, else ``g0 .. gk``."""
    if num_groups == 3:
        return ["head", "medium", "tail"]
    if num_groups == 2:
        return ["head", "tail"]
    return [f"g{k}" for k in range(num_groups)]


@dataclass
class DemoResult:
    config: DemoConfig
    counts: List[int]
    group_names: List[str]
    group_classes: List[int]        # classes per group
    group_train_counts: List[int]   # training samples per group
    teacher: Dict[str, float]
    students: List[StudentRun] = field(default_factory=list)
    backend: str = "torch"
    seconds: float = 0.0

    def accuracy_rows(self) -> List[Tuple[str, List[float]]]:
        """``(label, [acc per group..., all])`` for the teacher and every student."""
        cols = self.group_names + ["all"]
        rows = [("teacher (CE)", [self.teacher[c] for c in cols])]
        rows += [(METHOD_LABELS[r.method], [r.accuracy[c] for c in cols]) for r in self.students]
        return rows


def format_table(result: DemoResult) -> str:
    """The results table: accuracy per group and overall, loss share and time per step."""
    cols = result.group_names + ["all"]
    label_width = max(12, *(len(METHOD_LABELS[r.method]) for r in result.students)) \
        if result.students else 12
    header = (f"{'method':<{label_width}}" + "".join(f"{c:>8}" for c in cols)
              + f"{'loss %':>9}{'ms/step':>9}")
    lines = [header, "-" * len(header)]
    for label, values in result.accuracy_rows():
        line = f"{label:<{label_width}}" + "".join(f"{v:8.1f}" for v in values)
        run = next((r for r in result.students if METHOD_LABELS[r.method] == label), None)
        if run is None or run.method == "ce":
            line += f"{'-':>9}"
        else:
            line += f"{100.0 * run.loss_share:8.1f}%"
        line += f"{1000.0 * run.step_seconds / run.steps:9.2f}" if run is not None else f"{'-':>9}"
        lines.append(line)
    return "\n".join(lines)


def _describe(result: DemoResult) -> str:
    cfg = result.config
    groups = ", ".join(f"{name} {k} classes / {n} samples" for name, k, n in
                       zip(result.group_names, result.group_classes, result.group_train_counts))
    return (f"{cfg.classes} classes, imbalance {cfg.imbalance:g} "
            f"(train {sum(result.counts)} samples, {max(result.counts)} -> {min(result.counts)} "
            f"per class; test {cfg.test_per_class} per class); groups: {groups}; "
            f"seed {cfg.seed}; loss backend {result.backend!r}")


def write_outputs(result: DemoResult, command: Optional[str] = None) -> Dict[str, str]:
    """``results.json``, ``results.csv`` and (when matplotlib is installed) ``accuracy.png``."""
    cfg = result.config
    os.makedirs(cfg.out, exist_ok=True)
    paths = {"json": os.path.join(cfg.out, "results.json"),
             "csv": os.path.join(cfg.out, "results.csv")}
    cols = result.group_names + ["all"]
    payload = {
        "config": {**asdict(cfg), "methods": list(cfg.methods)},
        "class_counts": result.counts,
        "groups": {name: {"classes": k, "train_samples": n} for name, k, n in
                   zip(result.group_names, result.group_classes, result.group_train_counts)},
        "teacher_accuracy": result.teacher,
        "students": [{"method": r.method, "accuracy": r.accuracy, "steps": r.steps,
                      "step_seconds": r.step_seconds,
                      "loss_forward_seconds": r.loss_forward_seconds,
                      "loss_backward_seconds": r.loss_backward_seconds,
                      "loss_share": None if r.method == "ce" else r.loss_share}
                     for r in result.students],
        "environment": {"torch": torch.__version__, "ltkd_kernels": lk.__version__,
                        "python": platform.python_version(), "machine": platform.machine(),
                        "loss_backend": result.backend, "threads": cfg.threads,
                        "cpu_count": os.cpu_count(),
                        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "seconds": result.seconds,
        "command": command,
    }
    with open(paths["json"], "w") as f:
        json.dump(payload, f, indent=2)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method"] + cols + ["loss_share", "ms_per_step"])
        writer.writerow(["teacher"] + [f"{result.teacher[c]:.2f}" for c in cols] + ["", ""])
        for r in result.students:
            writer.writerow([r.method] + [f"{r.accuracy[c]:.2f}" for c in cols]
                            + ["" if r.method == "ce" else f"{r.loss_share:.4f}",
                               f"{1000.0 * r.step_seconds / r.steps:.3f}"])
    if cfg.chart:
        chart = write_chart(result, os.path.join(cfg.out, "accuracy.png"))
        if chart:
            paths["png"] = chart
    return paths


def write_chart(result: DemoResult, path: str) -> Optional[str]:
    """Grouped bar chart: one group of bars per class group (and "all"), one bar per method."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no chart was drawn "
              "(pip install matplotlib); the table is in results.csv", file=sys.stderr)
        return None
    cols = result.group_names + ["all"]
    rows = [(label, values) for label, values in result.accuracy_rows()]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(cols) + 0.3 * len(rows)), 4.2))
    for i, (label, values) in enumerate(rows):
        xs = [c + (i - (len(rows) - 1) / 2) * width for c in range(len(cols))]
        bars = ax.bar(xs, values, width, label=label,
                      color="0.75" if i == 0 else None, edgecolor="0.3" if i == 0 else None)
        if len(rows) * len(cols) <= 40:
            ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols)
    ax.set_ylabel("test accuracy (%)")
    cfg = result.config
    ax.set_title(f"Long-tailed distillation demo: {cfg.classes} classes, imbalance "
                 f"{cfg.imbalance:g}, seed {cfg.seed}", fontsize=10)
    ax.set_ylim(0, 100)
    # Below the axes, so that no bar is hidden behind it.
    ax.legend(fontsize=7, ncol=min(7, len(rows)), loc="upper center",
              bbox_to_anchor=(0.5, -0.08), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def run_demo(cfg: DemoConfig) -> DemoResult:
    """Train the teacher and one student per method on the CPU; return the scores."""
    start = time.perf_counter()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        data = make_long_tailed_data(cfg)
        groups = lk.groups_from_counts(data.counts, cfg.groups)
        group_names = group_names_for(cfg.groups)
        counts = torch.tensor(data.counts)
        result = DemoResult(
            config=cfg, counts=data.counts, group_names=group_names,
            group_classes=[int((groups == k).sum()) for k in range(cfg.groups)],
            group_train_counts=[int(counts[groups == k].sum()) for k in range(cfg.groups)],
            teacher={}, backend=resolve_backend(cfg.backend, torch.device("cpu"), build=True))
        teacher = train_teacher(data, cfg)
        result.teacher = evaluate(teacher, data, groups, group_names)
        if cfg.progress:
            print(f"{'teacher (CE)':<17}" + "  ".join(
                f"{k} {v:5.1f}" for k, v in result.teacher.items()), file=sys.stderr)
        for method in cfg.methods:
            result.students.append(train_student(method, data, teacher, groups, group_names, cfg))
        result.seconds = time.perf_counter() - start
        return result
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def format_report(result: DemoResult, paths: Dict[str, str]) -> str:
    """What the CLI prints: the setting, the table, how ``loss %`` is measured, the files."""
    lines = [_describe(result), "", format_table(result), ""]
    lines.append("accuracy: % of the balanced test set, per group of the true class. loss %: the "
                 "distillation loss's forward + backward time as a share of the training step "
                 "(batch, teacher forward, student forward and backward, optimizer step).")
    lines.append(f"wrote {', '.join(paths.values())} in {result.seconds:.0f} s")
    return "\n".join(lines)
