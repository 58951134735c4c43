"""Triton backend: kernels (``*_kernels.py``), launchers (``*_launchers.py``) and their ops.

Imported lazily by :mod:`ltkd_kernels.backends`: importing the package never needs Triton.
On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (set before first use).
"""
from ..grouped_kl import define_grouped_kl_ops
from .grouped_kl_launchers import launch_grouped_kl_grad, launch_grouped_kl_stats

grouped_kl_ops = define_grouped_kl_ops("triton", launch_grouped_kl_stats, launch_grouped_kl_grad)
