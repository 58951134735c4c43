"""Benchmarks of ltkd_kernels against eager PyTorch, ``torch.compile`` and installed peers.

``python -m benchmarks.run --quick`` runs the provider comparison (see ``benchmarks/run.py``);
``pytest benchmarks/`` runs the pytest-benchmark microbenchmarks. Neither is part of the
default ``pytest`` run (``pyproject.toml`` sets ``testpaths = ["tests"]``).
"""
