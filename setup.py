"""Build script: the metadata is in pyproject.toml; this file adds two build steps.

1. The C++ sources (``csrc/`` at the repository root) ship inside the package as
   ``ltkd_kernels/_csrc/``, where the first-use build of :mod:`ltkd_kernels.cpu` finds them.
2. The C++ CPU backend is compiled at install time, as the extension module ``ltkd_kernels._C``
   (with ``ltkd_kernels/_C_build.json`` recording the torch version, SIMD level, sources hash
   and flags), when all of these hold:

   - torch is importable in the build environment. pyproject.toml does not list torch among
     the build requirements (pip would put a multi-gigabyte CUDA torch into the isolated build
     environment), so this takes pip's ``--no-build-isolation``, with torch (and setuptools,
     ninja) installed first::

         pip install torch==2.13.0 setuptools ninja
         pip install --no-build-isolation -e ".[demo,test,bench]"    # or: pip wheel ... .

     With build isolation (a plain ``pip install .``) torch is missing, nothing is compiled,
     and the backend is compiled on first use instead;
   - a C++ compiler (``$CXX``, else ``c++``) is on PATH;
   - ``LTKD_KERNELS_BUILD_CPU`` is not ``0``.

   Otherwise nothing is compiled and one line says why. The flags and the SIMD level (this
   machine's, or ``LTKD_KERNELS_CPU_CAPABILITY``) are those of the first-use build
   (``ltkd_kernels/cpu/build_config.py``). At run time the module is used only if it matches
   the running torch, the CPU and the package's sources; otherwise the first-use build applies.
   An editable install puts ``_C*.so`` and ``_C_build.json`` into ``ltkd_kernels/`` (ignored
   by git).
"""
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
PACKAGE = "ltkd_kernels"


def _build_config():
    # By path: importing the package would import its dependencies (torch, numpy, ...).
    spec = importlib.util.spec_from_file_location(
        "_ltkd_kernels_build_config", ROOT / PACKAGE / "cpu" / "build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFIG = _build_config()


def _say(message):
    print(f"ltkd_kernels setup: {message}", file=sys.stderr)


class BuildPy(build_py):
    """Copies ``csrc/`` into the build as ``ltkd_kernels/_csrc/`` (the files the sources hash
    covers). An editable install needs no copy: the loader finds ``csrc/`` next to the package."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / PACKAGE / "_csrc"
        shutil.rmtree(target, ignore_errors=True)  # no stale files from an earlier build
        target.mkdir(parents=True)
        for source in CONFIG.source_files(CSRC):
            shutil.copy2(source, target / source.name)


def _cpu_extension():
    """``(ext_modules, cmdclass)`` for the install-time build, or ``([], {})`` and why not."""
    if os.environ.get("LTKD_KERNELS_BUILD_CPU", "").strip() == "0":
        return [], {}, "LTKD_KERNELS_BUILD_CPU=0"
    if not all((CSRC / source).is_file() for source in CONFIG.SOURCES):
        return [], {}, f"the C++ sources are missing from {CSRC}"
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        return [], {}, (f"torch is not importable in the build environment ({exc}); install "
                        "with pip's --no-build-isolation to compile at install time")
    compiler = CONFIG.compiler()
    if shutil.which(compiler) is None:
        return [], {}, f"no C++ compiler (CXX={compiler!r} is not on PATH)"

    level = CONFIG.simd_level()
    cflags, ldflags = CONFIG.compile_flags(level)
    record = {
        "module": f"{PACKAGE}._C",
        "torch": torch.__version__,
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "simd": level,
        "sources_hash": CONFIG.sources_hash(CSRC),
        "cflags": cflags,
        "ldflags": ldflags,
        "compiler": compiler,
    }

    class BuildExt(BuildExtension):
        """Announces the build and writes ``_C_build.json`` next to the module: into the build
        directory (what a wheel packs) and, for an editable install, into ``ltkd_kernels/``."""

        def build_extensions(self):
            # The interpreter's own CFLAGS (-g -DNDEBUG -Wall ... from sysconfig) are not in the
            # first-use build: drop those that change the object code or only add noise, so
            # that both builds compile alike (and -g would double the compile time).
            self.compiler.compiler_so = [flag for flag in self.compiler.compiler_so
                                         if flag not in ("-g", "-DNDEBUG", "-Wall")]
            super().build_extensions()

        def copy_extensions_to_source(self):
            # Editable install: replace the module in the source tree, never overwrite it in
            # place (a running process that has the old one mapped would crash).
            for ext in self.extensions:
                (ROOT / self.get_ext_filename(ext.name)).unlink(missing_ok=True)
            super().copy_extensions_to_source()

        def run(self):
            CONFIG.put_ninja_on_path()  # a venv's ninja, when its bin/ is not on PATH
            _say(f"compiling the C++ CPU backend ({level}) as {PACKAGE}._C; this takes about "
                 "a minute")
            started = time.perf_counter()
            super().run()
            seconds = time.perf_counter() - started
            text = json.dumps(dict(record, build_seconds=round(seconds, 1)), indent=1) + "\n"
            targets = [Path(self.build_lib) / PACKAGE]
            if self.inplace:  # editable install: the module was copied into the source tree
                targets.append(ROOT / PACKAGE)
            for directory in targets:
                directory.mkdir(parents=True, exist_ok=True)
                partial = directory / (CONFIG.INSTALLED_INFO + ".tmp")
                partial.write_text(text)
                os.replace(partial, directory / CONFIG.INSTALLED_INFO)  # atomic for readers
            _say(f"built {PACKAGE}._C in {seconds:.0f} s")

    extension = CppExtension(
        name=f"{PACKAGE}._C",
        # Relative paths: setuptools refuses absolute ones in a wheel build.
        sources=[f"csrc/{source}" for source in CONFIG.SOURCES],
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": cflags},
        extra_link_args=ldflags,
    )
    return [extension], {"build_ext": BuildExt}, None


ext_modules, cmdclass, why_not = _cpu_extension()
if why_not is not None:
    _say(f"not compiling the C++ CPU backend at install time: {why_not}; it is compiled on "
         "first use instead")

setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPy, **cmdclass})
