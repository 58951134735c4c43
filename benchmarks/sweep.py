"""Check, then time, every provider of a problem side by side (the engine of the cases):
:func:`run_problem` for one problem, :func:`run_problems` for several timed together.

For each problem: inputs (rotated in distinct memory on the CPU), the float64 reference (on
the first rows of a large problem), then per provider one first call (forward + backward;
SRW: forward) whose loss and gradient are checked against the reference: a provider that
disagrees is reported FAIL and not timed. The first call runs under the peak-memory tracker
(except ``torch.compile``'s, which compiles and is timed as the compile time). Then each mode
is timed with every provider that passed, one call of each in turn
(:func:`benchmarks.measure.time_interleaved`).
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import measure
from .inputs import MODES, Problem, first_rows, input_set_count, make_inputs, rotate_sets
from .providers import (Unavailable, build, check, compare, first_call, reference_values,
                        unavailable_reason)
from .report import error_text, new_row

CHECK_MAX_ELEMENTS = 2 ** 25  # float64 reference on at most this many logits (first rows)
SRW_EAGER_MAX_N = 16384  # the eager SRW's N x N matrix: 4 N^2 bytes (1 GiB here)


@dataclass
class Settings:
    warmup: int = 1
    min_reps: int = 5
    max_reps: int = 50
    budget_s: float = 1.0
    check_max_elements: int = CHECK_MAX_ELEMENTS
    deadline: Optional[float] = None  # time.monotonic(): past it, torch.compile is left out


@dataclass
class Context:
    """What a case runs with: device, timing settings, the copy bandwidth of this run (GB/s),
    a logger, the command-line options, and messages kept for the results file."""

    device: torch.device
    settings: Settings
    bandwidth_gbps: float
    log: Callable[[str], None] = print
    options: object = None
    quick: bool = False
    messages: List[str] = field(default_factory=list)
    left_out: Dict[str, str] = field(default_factory=dict)

    def note(self, message: str) -> None:
        self.messages.append(message.strip())
        self.log(message)

    def option(self, name: str, default):
        """The command-line value of ``name`` when given, else the case's ``default``."""
        value = getattr(self.options, name, None)
        return default if value is None else value

    def runnable(self, providers: Sequence[str], problem: Problem) -> List[str]:
        """The providers that can run ``problem`` here; the others are recorded (once per
        provider and reason) in :attr:`left_out` and said."""
        out = []
        for provider in providers:
            reason = unavailable_reason(provider, problem, self.device)
            if reason is None:
                out.append(provider)
                continue
            key = f"{provider} ({problem.loss}{', top-k teacher' if problem.k else ''})"
            if key not in self.left_out:
                self.left_out[key] = reason
                self.note(f"provider {key}: left out: {reason}")
        return out


def leaves(problem: Problem, inputs) -> Optional[list]:
    """Per input set, the student logits as a leaf that requires grad (shared by providers:
    each call resets its gradient)."""
    if problem.loss == "srw":
        return None
    return [s[0].detach().clone().requires_grad_(True) for s in inputs.sets]


def mode_callables(fn, problem: Problem, inputs, set_leaves, mode: str):
    """``(setup, region)`` of ``mode`` for :func:`measure.time_interleaved`."""
    sets = inputs.sets
    if problem.loss == "srw":
        return (lambda i: sets[i % len(sets)]), (lambda state: fn(state[0]))

    def pick(i):
        k = i % len(sets)
        set_leaves[k].grad = None  # a fresh gradient each call, as in a training step
        return set_leaves[k], sets[k][1]

    if mode == "forward":
        return pick, (lambda state: fn(*state))
    if mode == "full":
        return pick, (lambda state: fn(*state).backward())
    return (lambda i: fn(*pick(i))), (lambda loss: loss.backward())


def _checked_problem(problem: Problem, inputs, settings: Settings):
    rows = problem.N
    if problem.loss != "srw" and problem.N * problem.V > settings.check_max_elements:
        rows = max(1, settings.check_max_elements // problem.V)
    if rows < problem.N:
        return (rows,) + first_rows(problem, inputs, rows)
    return rows, problem, inputs


def _skip_reason(provider: str, problem: Problem, settings: Settings) -> Optional[str]:
    if problem.loss == "srw" and provider in ("eager", "compile") and problem.N > SRW_EAGER_MAX_N:
        return f"N x N matrix, N > {SRW_EAGER_MAX_N}"
    if provider == "compile" and settings.deadline is not None and time.monotonic() > settings.deadline:
        return "time budget of the run spent"
    return None


def _first_call(fn, problem: Problem, inputs, device, track: bool):
    """The first call on set 0 under the memory tracker (``track``): ``(s, peak, out, grad)``."""
    tracker = measure.memory_tracker(device) if track else None
    seconds, output, grad = first_call(fn, problem, inputs, device, tracker)
    return seconds, (tracker.peak_bytes if track else None), output, grad


def check_provider(provider: str, problem: Problem, inputs, checked, reference, ctx: Context,
                   eager_outputs=None):
    """Build and check one provider. Returns ``(built, row fields, peak of the first call,
    (output, grad) of the first call)``; raises :class:`Unavailable` or the provider's error.

    A problem too large for the float64 reference is checked on its first rows (a provider
    built for that shape). ``torch.compile`` is instead compared with the eager code's
    full-size output when there is one (``eager_outputs``): one compile, not two."""
    check_rows, check_problem, check_inputs = checked
    note = ""
    against_eager = provider == "compile" and eager_outputs is not None
    if check_problem is not problem and not against_eager:
        # Checked on the first rows first, so that a compiled provider's timed shape is
        # compiled last (and its compile time measured) below.
        checker = build(provider, check_problem, check_inputs.extras, ctx.device)
        ok, loss_err, grad_err, _ = check(checker.fn, check_problem, check_inputs, reference,
                                          ctx.device)
        del checker
    built = build(provider, problem, inputs.extras, ctx.device)
    seconds, peak, output, grad = _first_call(built.fn, problem, inputs, ctx.device,
                                              track=provider != "compile")
    if check_problem is problem:
        ok, loss_err, grad_err = compare(problem, output, grad, reference)
    elif against_eager:
        ok, loss_err, grad_err = compare(problem, output, grad,
                                         dict(loss=eager_outputs[0], grad=eager_outputs[1]))
        check_rows, note = problem.N, "checked against eager's output (full size)"
    fields = dict(loss_rel_err=loss_err, grad_rel_err=grad_err, check_rows=check_rows,
                  compile_s=seconds if provider == "compile" else None, ok=ok, note=note)
    return built, fields, peak, (output, grad)


def _timed_rows(case: str, groups: List[dict], modes, ctx: Context) -> List[dict]:
    """Time every candidate of every group (a problem, its inputs, its checked providers),
    mode by mode, one call of each in turn."""
    rows = []
    s = ctx.settings
    for mode in modes:
        timers, warmed = {}, {}
        for i, group in enumerate(groups):
            problem = group["problem"]
            for provider, c in group["candidates"].items():
                timers[i, provider] = mode_callables(c["built"].fn, problem, group["inputs"],
                                                     group["leaves"], mode)
                # The first call (under the memory tracker) warmed this mode up.
                if mode == ("forward" if problem.loss == "srw" else "full") and provider != "compile":
                    warmed[i, provider] = c["peak"]
        results = measure.time_interleaved(timers, ctx.device, warmup=s.warmup,
                                           min_reps=s.min_reps, max_reps=s.max_reps,
                                           budget_s=s.budget_s, warmed=warmed)
        for (i, provider), result in results.items():
            problem = groups[i]["problem"]
            row = new_row(case, problem, provider, mode, **groups[i]["candidates"][provider]["fields"])
            rows.append(fill_timing(row, result, problem.floor_bytes(mode), ctx))
    return rows


def fill_timing(row: dict, result, floor_bytes: Optional[int], ctx: Context) -> dict:
    """A row's timing columns from ``(Timing, peak)`` or the exception of the candidate."""
    if isinstance(result, Exception):
        message = error_text(result)
        ctx.note(f"  {row['provider']} {row['mode']} ERROR {message}")
        row.update(status="ERROR", note=message[:300])
        return row
    timing, peak = result
    row.update(status="ok", median_ms=timing.median_ms, p20_ms=timing.p20_ms,
               p80_ms=timing.p80_ms, reps=timing.reps, host_ms=timing.host_median_ms,
               peak_mem_mib=None if peak is None else peak / 2 ** 20)
    if floor_bytes:
        floor_ms = floor_bytes / (ctx.bandwidth_gbps * 1e9) * 1e3
        row.update(floor_bytes=floor_bytes, floor_ms=floor_ms,
                   gb_per_s=floor_bytes / (timing.median_ms / 1e3) / 1e9,
                   fraction_of_floor=floor_ms / timing.median_ms)
    return row


def _candidates(case, problem, providers, modes, inputs, ctx: Context, rows: List[dict]):
    """Build and check every provider; those that agree with the reference are returned, the
    others become FAIL / ERROR rows."""
    checked = _checked_problem(problem, inputs, ctx.settings)
    reference = reference_values(checked[1], checked[2])
    candidates, eager_outputs = {}, None
    for provider in providers:
        reason = _skip_reason(provider, problem, ctx.settings)
        if reason is not None:
            ctx.note(f"  {problem.label()}: {provider} left out ({reason})")
            continue
        try:
            built, fields, peak, outputs = check_provider(provider, problem, inputs, checked,
                                                          reference, ctx, eager_outputs)
        except Unavailable as reason:
            ctx.note(f"  {problem.label()}: {provider} unavailable: {reason}")
            continue
        except Exception as error:  # noqa: BLE001  (report the failure, go on with the rest)
            message = error_text(error)
            ctx.note(f"  {problem.label()}: {provider} ERROR {message}")
            rows += [new_row(case, problem, provider, m, status="ERROR", note=message[:300])
                     for m in modes]
            continue
        if not fields.pop("ok"):
            ctx.note(f"  {problem.label()}: {provider} FAIL: loss rel err "
                     f"{fields['loss_rel_err']:.2e}, grad rel err {fields['grad_rel_err']}")
            rows += [new_row(case, problem, provider, m, status="FAIL", **fields) for m in modes]
            continue
        if provider == "eager" and checked[1] is not problem:
            eager_outputs = outputs
        del outputs
        candidates[provider] = dict(built=built, fields=fields, peak=peak)
    return candidates


def _prepared(case: str, problem: Problem, providers, modes, ctx: Context, rows: List[dict]):
    """Inputs (rotated on the CPU) and the checked providers of one problem."""
    inputs = make_inputs(problem, ctx.device)
    llc = measure.last_level_cache_bytes()
    rotate_sets(inputs, input_set_count(inputs, ctx.device, llc))
    fits = ctx.device.type == "cpu" and llc is not None and inputs.set_bytes * len(inputs.sets) <= llc
    candidates = _candidates(case, problem, providers, modes, inputs, ctx, rows)
    for candidate in candidates.values():
        candidate["fields"].update(input_sets=len(inputs.sets), inputs_fit_in_cache=fits)
    return dict(problem=problem, inputs=inputs, candidates=candidates,
                leaves=leaves(problem, inputs))


def run_problems(case: str, plan: Sequence[Tuple[Problem, Sequence[str]]], modes: Sequence[str],
                 ctx: Context) -> List[dict]:
    """Several problems (each with its providers), checked one by one, then timed together:
    one call of every provider of every problem in turn, so that other load on the machine
    hits them alike (the ``topk`` case compares a sparse and a dense teacher so)."""
    if any(problem.loss == "srw" for problem, _ in plan):
        modes = ["forward"]  # SRW's weights carry no gradient
    rows: List[dict] = []
    groups = [_prepared(case, problem, providers, modes, ctx, rows) for problem, providers in plan]
    rows += _timed_rows(case, groups, modes, ctx)
    del groups
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()  # the next problem's providers start from a clean pool
    order = {(problem, p): (i, j) for i, (problem, providers) in enumerate(plan)
             for j, p in enumerate(providers)}
    problems = {problem: i for i, (problem, _) in enumerate(plan)}
    rows.sort(key=lambda r: order.get((_problem_of(r, plan), r["provider"]),
                                      (problems.get(_problem_of(r, plan), 0), 99))
              + (MODES.index(r["mode"]),))
    return rows


def _problem_of(row: dict, plan) -> Optional[Problem]:
    for problem, _ in plan:
        if (problem.loss, problem.N, problem.V, problem.G, problem.D, problem.k, problem.dtype) == (
                row["loss"], row["N"], row["V"], row["G"], row["D"], row["k"], row["dtype"]):
            return problem
    return None


def run_problem(case: str, problem: Problem, providers: Sequence[str], modes: Sequence[str],
                ctx: Context) -> List[dict]:
    """Every provider and mode of one problem: one row per (provider, mode)."""
    return run_problems(case, [(problem, providers)], modes, ctx)
