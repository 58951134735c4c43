"""Test configuration: Triton kernels run on the CPU through the interpreter.

TRITON_INTERPRET must be set before the kernels are first imported (triton.jit reads it then).
"""
import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import ltkd_kernels as lk  # noqa: E402


def kernel_backends():
    """Kernel backends to test here: Triton (interpreted on CPU) and the C++ CPU backend."""
    names = []
    for name in ("triton", "cpu"):
        reason = lk.unavailable_reason(name, torch.device("cpu"))
        names.append(pytest.param(name, marks=pytest.mark.skipif(
            reason is not None, reason=f"backend {name!r} unavailable: {reason}")))
    return names


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh random inputs per test, but reproducible from the test's name.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
