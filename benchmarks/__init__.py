"""Benchmarks of ltkd_kernels against eager PyTorch, ``torch.compile`` and installed peers.

``python -m benchmarks.run`` runs the cases of :mod:`benchmarks.cases` (``--list``; see
``benchmarks/README.md``); ``python -m benchmarks.gpu_check OUT_DIR`` is the one-shot GPU
check; ``pytest benchmarks/`` runs the pytest-benchmark microbenchmarks. None is part of the
default ``pytest`` run (``pyproject.toml`` sets ``testpaths = ["tests"]``).
"""
