"""Command line: ``python -m ltkd_kernels COMMAND`` (also installed as ``ltkd-kernels``).

``info`` prints the backends' status (cheap: compiles nothing). ``build-cpu`` compiles the C++
CPU backend now, or finds the installed or cached module (``--force``: compile afresh), and
says where it is; exit status 1 when it cannot be built.

``demo`` runs the end-to-end long-tailed distillation demo of :mod:`ltkd_kernels.demo` on
the CPU: a teacher and one student per method (CE, KD, DKD, BKD, LTKD, LTKD+SRW), then a
table of head / medium / tail / all accuracy and a bar chart. Bad flag values exit with
status 2 and a message naming the flag.
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import List, Optional

# --quick: a configuration small enough for CI (seconds), still every method and the chart.
QUICK = dict(classes=20, imbalance=10.0, epochs=6, teacher_epochs=10, max_per_class=200,
             test_per_class=50, teacher_hidden=128)


def _add_demo_parser(subparsers) -> argparse.ArgumentParser:
    from . import demo

    d = demo.DemoConfig  # the defaults
    p = subparsers.add_parser(
        "demo", help="long-tailed distillation demo: per-group accuracy of CE/KD/DKD/BKD/LTKD",
        description="Train a teacher MLP on a synthetic long-tailed classification task "
                    "(CIFAR-100-LT count profile, made from the seed, nothing downloaded), then "
                    "one student per method with this package's losses, and print head / "
                    "medium / tail / all accuracy on a balanced test set, with the loss's share "
                    "of the step time. Writes results.json, results.csv and accuracy.png.",
        allow_abbrev=False)
    # Flags that --quick changes default to None here and are filled in by _run_demo.
    p.add_argument("--classes", type=int, help=f"number of classes, >= 2 (default {d.classes})")
    p.add_argument("--imbalance", type=float,
                   help=f"imbalance factor n_max / n_min, >= 1; CIFAR-100-LT uses 10 to 100 "
                        f"(default {d.imbalance:g})")
    p.add_argument("--groups", type=int, default=d.groups,
                   help="class groups by training count, for the table and for LTKD, in "
                        f"[1, classes]; 3 gives head / medium / tail (default {d.groups})")
    p.add_argument("--epochs", type=int, help=f"epochs of each student, >= 1 (default {d.epochs})")
    p.add_argument("--teacher-epochs", type=int,
                   help=f"epochs of the teacher, >= 1 (default {d.teacher_epochs})")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the data, the weights and the batch order, >= 0 "
                        f"(default {d.seed})")
    p.add_argument("--methods", default="all",
                   help=f"comma-separated subset of {','.join(demo.METHODS)} (default all)")
    p.add_argument("--out", default=d.out,
                   help="folder for results.json, results.csv and accuracy.png, created if "
                        f"missing (default {d.out})")
    p.add_argument("--samples-per-class", type=int, dest="max_per_class",
                   help=f"training samples of the most frequent class n_max, >= 1 "
                        f"(default {d.max_per_class})")
    p.add_argument("--test-per-class", type=int,
                   help=f"test samples per class (balanced), >= 1 (default {d.test_per_class})")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="CPU threads for torch, >= 1; the same seed gives the same accuracies "
                        f"for a fixed value on one machine (default {d.threads})")
    p.add_argument("--backend", default=d.backend, choices=demo.BACKENDS,
                   help="the losses' backend: auto = the C++ kernels when they build here, else "
                        "the pure-PyTorch reference (torch) (default auto)")
    p.add_argument("--quick", action="store_true",
                   help="tiny configuration for a smoke test (" + ", ".join(
                       f"{k}={v:g}" for k, v in QUICK.items()) + "); explicit flags still apply")
    p.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    p.add_argument("--no-chart", action="store_true", help="do not draw accuracy.png")
    p.set_defaults(handler=functools.partial(_run_demo, parser=p))
    return p


# Config field -> flag, for error messages.
_FLAG_OF = {"classes": "--classes", "imbalance": "--imbalance", "groups": "--groups",
            "epochs": "--epochs", "teacher_epochs": "--teacher-epochs", "seed": "--seed",
            "methods": "--methods", "out": "--out", "max_per_class": "--samples-per-class",
            "test_per_class": "--test-per-class", "threads": "--threads",
            "backend": "--backend"}


def _run_demo(args: argparse.Namespace, argv: List[str], parser: argparse.ArgumentParser) -> int:
    from . import demo

    fields = dict(groups=args.groups, seed=args.seed, out=args.out, threads=args.threads,
                  backend=args.backend,
                  progress=not args.no_progress, chart=not args.no_chart)
    # A flag given on the command line wins; then --quick; then the DemoConfig default.
    for name in ("classes", "imbalance", "epochs", "teacher_epochs", "max_per_class",
                 "test_per_class"):
        value = getattr(args, name)
        if value is None and args.quick:
            value = QUICK[name]
        if value is not None:
            fields[name] = value
    if args.quick:
        fields["teacher_hidden"] = QUICK["teacher_hidden"]
    methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    fields["methods"] = demo.METHODS if methods == ["all"] else tuple(methods)
    try:
        cfg = demo.DemoConfig(**fields)
    except demo.DemoConfigError as err:
        parser.error(f"argument {_FLAG_OF.get(err.field, err.field)}: {err.message}")
    if cfg.backend != "auto":
        from .backends import unavailable_reason

        reason = unavailable_reason(cfg.backend)
        if reason is not None:
            parser.error(f"argument --backend: {cfg.backend!r} cannot run here: {reason}")
    result = demo.run_demo(cfg)
    paths = demo.write_outputs(result, command=" ".join(["python -m ltkd_kernels"] + argv))
    print(demo.format_report(result, paths))
    return 0


def _run_info(args: argparse.Namespace, argv: List[str]) -> int:
    import platform

    import torch

    from . import __version__, cpu
    from .backends import unavailable_reason

    cuda = "available" if torch.cuda.is_available() else "not available"
    print(f"ltkd_kernels {__version__}; torch {torch.__version__}; Python "
          f"{platform.python_version()}; CUDA {cuda}")
    print("torch:  available (the pure-PyTorch reference)")
    print(f"cpu:    {cpu.status()}")
    triton = unavailable_reason("triton")
    print(f"triton: {'available' if triton is None else 'unavailable: ' + triton}")
    return 0


def _run_build_cpu(args: argparse.Namespace, argv: List[str]) -> int:
    import logging
    import time

    from . import cpu
    from .cpu import build_config

    # The build's announcements (warnings on the ltkd_kernels.cpu logger) go to stderr.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    started = time.perf_counter()
    reason = cpu.load(force=args.force)
    seconds = time.perf_counter() - started
    if reason is not None:
        print(f"the C++ CPU backend cannot be built: {reason}", file=sys.stderr)
        return 1
    info = cpu.load_info()
    origin = {"installed": "the module built at install time",
              "cache": "the first-use build cache"}[info["origin"]]
    action = "compiled" if info["compiled"] else "found"
    print(f"{action} the C++ CPU backend in {seconds:.1f} s: {info['path']}")
    print(f"from: {origin}; SIMD level: {info['simd']} (this CPU: "
          f"{build_config.cpu_simd_level()})")
    print(f"build: {cpu.extension().build_info()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ltkd_kernels",
        description="ltkd_kernels: fused kernels for long-tailed knowledge-distillation losses.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo_parser(subparsers)
    p = subparsers.add_parser(
        "info", help="which backends can run here (compiles nothing)",
        description="Print the versions and each backend's status: the C++ CPU backend as "
                    "loaded, built (installed or cached), buildable (compiled on first use) "
                    "or unavailable, with the reason.")
    p.set_defaults(handler=_run_info)
    p = subparsers.add_parser(
        "build-cpu", help="compile the C++ CPU backend now (or find it) and say where it is",
        description="Load the C++ CPU backend as a kernel call would: the module built at "
                    "install time if it matches this torch, CPU and sources, else the "
                    "first-use build cache, compiling it there if needed (about a minute). "
                    "Prints where it is, where it came from, its SIMD level and the seconds "
                    "taken. Exit status 1 when it cannot be built.")
    p.add_argument("--force", action="store_true",
                   help="ignore the installed module and the cache: compile afresh")
    p.set_defaults(handler=_run_build_cpu)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m ltkd_kernels`` and the ``ltkd-kernels`` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        print("\nerror: name a command, e.g. `python -m ltkd_kernels demo`", file=sys.stderr)
        return 2
    return args.handler(args, argv)


if __name__ == "__main__":
    sys.exit(main())
