"""Triton backend: kernels (``*_kernels.py``) and their launchers (``grouped_kl.py``,
``srw_launchers.py``).

Imported lazily by :mod:`ltkd_kernels.ops.grouped_kl`: importing the package never needs Triton.
On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (set before first use).
"""
