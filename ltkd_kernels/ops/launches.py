"""A count of kernel launches, for the launch-count tests and benchmarks.

Every kernel backend calls :func:`record` once per kernel it launches (a Triton kernel, one
call into the C++ extension). ATen ops are counted separately by the profiler; Triton launches
under the interpreter and calls into the extension are invisible to it, hence this counter.
Recording costs one attribute check when no counter is active. Kernels called from C++ with
no Python around them (the C++ backend's autograd node) are counted by the extension and read
through :func:`add_external_counter` when a :func:`counting` block ends.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable, Dict, Iterator, List, Optional

_active: Optional[Counter] = None

# Counters kept outside Python: functions returning ``{name: calls since the process started}``
# (the C++ backend's autograd node runs its backward kernels with no Python to call record).
# A counting block adds what they counted between its start and its end.
_external: List[Callable[[], Dict[str, int]]] = []


def add_external_counter(read: Callable[[], Dict[str, int]]) -> None:
    """Register ``read`` (see ``_external``); a module registers once, at import."""
    _external.append(read)

# A profiler scope around a Triton launch under the interpreter: the interpreter copies the
# arguments to and from numpy with ATen ops that are no GPU launch, so they are not counted.
INTERPRETER_SCOPE = "ltkd_kernels::triton_interpreter"


def active() -> bool:
    """Whether a :func:`counting` block is open."""
    return _active is not None


def record(name: str) -> None:
    """Count one launch of the kernel ``name`` (``"triton:grouped_kl_states"``, ...)."""
    if _active is not None:
        _active[name] += 1


@contextlib.contextmanager
def counting() -> Iterator[Counter]:
    """Count the launches made inside the ``with`` block: ``with counting() as launches: ...``."""
    global _active
    previous, _active = _active, Counter()
    before = {read: read() for read in _external}
    counter = _active
    try:
        yield counter
    finally:
        _active = previous
        # Readers registered inside the block (their module imported there) counted nothing
        # before it.
        for read in list(_external):
            start = before.get(read, {})
            for name, calls in read().items():
                if calls > start.get(name, 0):
                    counter[name] += calls - start.get(name, 0)


# ATen ops that allocate, alias or describe tensors: no kernel launch of their own on a GPU.
NON_COMPUTE_OPS = frozenset({
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::reshape",
    "aten::_reshape_alias", "aten::as_strided", "aten::detach", "aten::detach_", "aten::alias",
    "aten::t", "aten::transpose", "aten::permute", "aten::expand", "aten::expand_as",
    "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice", "aten::unbind",
    "aten::split", "aten::chunk", "aten::narrow", "aten::lift_fresh", "aten::resize_",
    "aten::set_", "aten::_unsafe_view", "aten::flatten", "aten::unflatten", "aten::view_as",
    "aten::result_type", "aten::is_nonzero", "aten::contiguous", "aten::to", "aten::_to_copy",
    "aten::new_empty", "aten::new_empty_strided",
})


def _inside_interpreter(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == INTERPRETER_SCOPE:
            return True
        parent = parent.cpu_parent
    return False


def count_launches(fn):
    """Run ``fn()`` and count what it launches: ``(total, details)`` where ``total`` is the
    number of leaf ATen ops that compute (fills and copies included; allocations, views and
    metadata not), plus the kernel launches :func:`record` saw (Triton kernels, calls into the
    C++ extension), and ``details`` a Counter by name. Leaf ATen ops inside the custom
    operators are counted too (the profiler sees them)."""
    from torch.profiler import ProfilerActivity, profile

    with counting() as kernels, profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    details = Counter()
    for event in prof.events():
        name = event.name
        if not name.startswith("aten::"):
            continue
        if any(child.name.startswith("aten::") for child in event.cpu_children):
            continue  # a composite: its leaves are counted
        if name in NON_COMPUTE_OPS or _inside_interpreter(event):
            continue
        details[name] += 1
    details.update(kernels)
    return sum(details.values()), details
