"""A count of kernel launches, for the launch-count tests and benchmarks.

Every kernel backend calls :func:`record` once per kernel it launches (a Triton kernel, one
call into the C++ extension). ATen ops are counted separately by the profiler; Triton launches
under the interpreter and calls into the extension are invisible to it, hence this counter.
Recording costs one attribute check when no counter is active.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator, Optional

_active: Optional[Counter] = None


def record(name: str) -> None:
    """Count one launch of the kernel ``name`` (``"triton:grouped_kl_states"``, ...)."""
    if _active is not None:
        _active[name] += 1


@contextlib.contextmanager
def counting() -> Iterator[Counter]:
    """Count the launches made inside the ``with`` block: ``with counting() as launches: ...``."""
    global _active
    previous, _active = _active, Counter()
    try:
        yield _active
    finally:
        _active = previous
