"""Timing, peak memory, copy bandwidth and the device description, for CPU and CUDA.

What each number is:

- **time**: wall time of the timed region only (forward, backward or both), per call. Each
  call gets an untimed set-up (the forward, for ``backward`` mode), so nothing needs
  ``retain_graph`` (which ``torch.compile``'s backward refuses). Warm-up calls first
  (run-time compilation, allocator growth, first-touch page faults stay out), then at least
  ``min_reps`` timed calls, more until ``budget_s`` of timed work or ``max_reps``; reported as
  the median and the 20% / 80% quantiles. The providers of one problem are timed in turn,
  one call each per round, so that other work on the machine hits them all alike. On CUDA
  each call is bracketed by CUDA events (device time) and the L2 cache is flushed in the
  set-up; on the CPU a ``perf_counter`` pair (the CPU runs the ops synchronously).
- **device time, host hidden** (CUDA): the events alone would also count the host's time
  before the region's first launch, as the device idles from the start event until work
  arrives: a call of small kernels would measure its Python. So, as in a training loop whose
  host runs ahead of the device, a spin kernel (``torch.cuda._sleep``) is queued before the
  start event, several times longer than the region's host time seen in the warm-up: the host
  queues the whole region while the device spins, and the events time the device's work
  alone. The host's own time per call (``perf_counter`` around the region, no sync) is kept
  beside it as ``host_ms``: where it exceeds the device time, a call without CUDA graphs is
  bound by the host (the report marks such rows).
- **peak memory**: the most bytes held by PyTorch tensors during one call of the region,
  above what was held just before it (the inputs, and in ``backward`` mode the forward's
  saved tensors, are not counted; the forward's output and saved tensors are). On CUDA,
  ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the start. On the CPU,
  PyTorch has no such counter: the call is run under ``torch.profiler`` with
  ``profile_memory=True``, which records every allocation and free of the CPU allocator with
  its size and time; the running sum in time order, maximised, is the same quantity. It
  counts tensors only (not the Python heap, not memory a C++ kernel takes with ``malloc``).
  The profiled call is a warm-up call (for the full step, the first call, whose result is
  also the one checked against the reference), so the profiler's overhead never enters the
  timings.
- **copy bandwidth**: a large tensor copy ``dst.copy_(src)`` (sized past the last-level
  cache), bytes read plus bytes written over the median time: the practical ceiling a
  memory-bound loss is compared with (the "floor" time is bytes that must move / this).
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    host_median_ms: Optional[float] = None  # CUDA: the host's time per call (no sync)


def quantile(sorted_values: List[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted values (as ``numpy.quantile``)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _CpuMemoryPeak:
    """Peak of tensor bytes allocated (net of frees) during the ``with`` block, on the CPU."""

    def __init__(self):
        self.peak_bytes: Optional[int] = None

    @contextlib.contextmanager
    def track(self):
        from torch.profiler import ProfilerActivity, profile

        with quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU],
                                             profile_memory=True) as prof:
            yield
        deltas = []
        for event in prof.profiler.kineto_results.events():
            if event.name() == "[memory]":
                deltas.append((event.start_ns(), event.nbytes()))
        deltas.sort(key=lambda item: item[0])
        live = peak = 0
        for _, nbytes in deltas:
            live += nbytes
            peak = max(peak, live)
        self.peak_bytes = peak


class _CudaMemoryPeak:
    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: Optional[int] = None

    @contextlib.contextmanager
    def track(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        start = torch.cuda.memory_allocated(self.device)
        yield
        torch.cuda.synchronize(self.device)
        self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - start


def memory_tracker(device: torch.device):
    return _CudaMemoryPeak(device) if device.type == "cuda" else _CpuMemoryPeak()


_L2_FLUSH = {}


def _flush_cuda_cache(device: torch.device) -> None:
    # Writing a buffer larger than the L2 cache evicts the previous call's inputs (as
    # triton.testing.do_bench does).
    if device not in _L2_FLUSH:
        _L2_FLUSH[device] = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=device)
    _L2_FLUSH[device].zero_()


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence the profiler's native log lines (written to file descriptor 2) for a moment."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# Spin cycles per millisecond for torch.cuda._sleep: a clock of 2 GHz or more (H100/H200 boost
# 1.98 GHz); a slower clock only spins longer, which hides the host all the same.
_SPIN_CYCLES_PER_MS = 2_000_000
# A region that synchronises with the device (eager code with data-dependent shapes) is not
# helped by any spin: the bound keeps such a region's wasted wall time small.
_SPIN_MAX_MS = 20.0


def _spin(device: torch.device, ms: float) -> None:
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is not None and ms > 0:
        with torch.cuda.device(device):
            sleep(int(ms * _SPIN_CYCLES_PER_MS))


def _timed_call(setup, region, index: int, device: torch.device,
                spin_ms: float = 0.0) -> Tuple[float, float]:
    """One call of ``region(setup(index))``: ``(milliseconds of the region, host milliseconds)``.

    On CUDA the first is device time between two events, with ``spin_ms`` of device spin queued
    before the first so that the host's launching stays out (see the module's docstring); the
    second is the host's time to run the region (no sync), the same on the CPU.
    """
    state = setup(index)
    if device.type == "cuda":
        _flush_cuda_cache(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _spin(device, spin_ms)
        start.record()
        start_s = time.perf_counter()
        region(state)
        host_ms = (time.perf_counter() - start_s) * 1e3
        end.record()
        end.synchronize()
        return start.elapsed_time(end), host_ms
    start_s = time.perf_counter()
    region(state)
    elapsed = (time.perf_counter() - start_s) * 1e3
    return elapsed, elapsed


def _spin_for(host_ms: float) -> float:
    """Device spin that covers a region whose host time is ``host_ms``, with a wide margin."""
    return min(max(0.5, 3.0 * host_ms + 0.2), _SPIN_MAX_MS)


def time_interleaved(candidates: Dict[str, Tuple[Callable, Callable]], device: torch.device, *,
                     warmup: int = 1, min_reps: int = 5, max_reps: int = 50,
                     budget_s: float = 1.0, measure_memory: bool = True,
                     warmed: Optional[Dict[str, Optional[int]]] = None) -> Dict[str, object]:
    """Time several ``(setup, region)`` candidates, one call of each in turn.

    Interleaving spreads whatever else the machine does over all candidates alike, instead of
    penalising the one that happened to run during it. Each candidate gets ``warmup`` untimed
    calls (the first under the memory tracker), then timed calls in rounds until it has at
    least ``min_reps`` and ``budget_s`` seconds of timed work, or ``max_reps``. Returns, per
    name, ``(Timing, peak_bytes or None)``, or the exception the candidate raised.
    ``warmed`` names candidates already warmed up by the caller, with their peak memory: they
    skip the warm-up.
    """
    warmed = warmed or {}
    results: Dict[str, object] = {}
    samples: Dict[str, List[float]] = {}
    hosts: Dict[str, List[float]] = {}
    spin: Dict[str, float] = {}
    peaks: Dict[str, Optional[int]] = {}
    for name, (setup, region) in candidates.items():
        try:
            peaks[name] = warmed.get(name)
            for i in range(0 if name in warmed else warmup):
                state = setup(i)
                if i == 0 and measure_memory:
                    tracker = memory_tracker(device)
                    with tracker.track():
                        region(state)
                    peaks[name] = tracker.peak_bytes
                else:
                    region(state)
                del state
                synchronize(device)
            # The host time of a warmed call sets the spin that hides it (CUDA): one more
            # untimed call, after the warm-up so that no run-time compilation enters it.
            spin[name] = 0.0
            if device.type == "cuda":
                spin[name] = _spin_for(_timed_call(setup, region, warmup, device)[1])
            samples[name] = []
            hosts[name] = []
        except Exception as error:  # noqa: BLE001  (reported per candidate by the caller)
            results[name] = error
    index = warmup
    while True:
        active = [name for name, times in samples.items() if name not in results
                  and len(times) < max_reps
                  and (len(times) < min_reps or sum(times) / 1e3 < budget_s)]
        if not active:
            break
        for name in active:
            setup, region = candidates[name]
            try:
                elapsed, host_ms = _timed_call(setup, region, index, device, spin[name])
                samples[name].append(elapsed)
                hosts[name].append(host_ms)
            except Exception as error:  # noqa: BLE001
                results[name] = error
        index += 1
    for name, times in samples.items():
        if name in results or not times:
            continue
        times.sort()
        results[name] = (Timing(median_ms=statistics.median(times), p20_ms=quantile(times, 0.2),
                                p80_ms=quantile(times, 0.8), reps=len(times),
                                host_median_ms=(statistics.median(hosts[name])
                                                if device.type == "cuda" else None)),
                         peaks[name])
    return {name: results[name] for name in candidates}


def time_region(setup: Callable[[int], object], region: Callable[[object], None],
                device: torch.device, **options):
    """:func:`time_interleaved` for one candidate: ``(Timing, peak_bytes or None)``."""
    result = time_interleaved({"only": (setup, region)}, device, **options)["only"]
    if isinstance(result, Exception):
        raise result
    return result


def last_level_cache_bytes() -> Optional[int]:
    """Size of the CPU's largest cache (Linux sysfs), or ``None`` when unknown."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            if not entry.startswith("index"):
                continue
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
            scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        return None
    return max(sizes) if sizes else None


def copy_bandwidth(device: torch.device, *, reps: int = 5, nbytes: Optional[int] = None):
    """Measured copy bandwidth in GB/s (1e9 bytes/s), counting bytes read plus bytes written.

    The source is sized past the last-level cache (at least 256 MiB, at most 1 GiB on the
    CPU; 1 GiB on CUDA), filled with non-zero values so that every page is really touched.
    Returns ``(gb_per_s, details dict)``.
    """
    if nbytes is None:
        if device.type == "cuda":
            nbytes = 2 ** 30
        else:
            llc = last_level_cache_bytes() or 0
            nbytes = int(min(max(256 * 2 ** 20, 2 * llc), 2 ** 30))
    numel = nbytes // 4
    src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.5)
    dst = torch.empty_like(src).fill_(-2.5)
    timing, _ = time_region(lambda i: None, lambda state: dst.copy_(src), device, warmup=1,
                            min_reps=reps, max_reps=reps, budget_s=0.0, measure_memory=False)
    moved = 2 * numel * 4
    gb_per_s = moved / (timing.median_ms / 1e3) / 1e9
    details = dict(copy_source_bytes=numel * 4, bytes_moved_per_copy=moved, reps=timing.reps,
                   median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                   gb_per_s=gb_per_s)
    del src, dst
    return gb_per_s, details


def parallel_stall_probe(device: torch.device, reps: int = 30) -> Optional[dict]:
    """How long a small parallel op takes now, on the CPU: a busy machine shows here first.

    ``fill_`` of 4 MiB runs as an OpenMP region over all of torch's threads; when another
    process holds a core, the region waits for the thread the scheduler has not run, and the
    op takes tens of milliseconds instead of tens of microseconds. Reported with the results
    so that timings taken on a busy machine say so. ``None`` on CUDA.
    """
    if device.type != "cpu":
        return None
    buffer = torch.empty(2 ** 20, dtype=torch.float32)
    timing, _ = time_region(lambda i: None, lambda state: buffer.fill_(1.5), device, warmup=3,
                            min_reps=reps, max_reps=reps, budget_s=0.0, measure_memory=False)
    return dict(op="fill_ of 2^20 float32", threads=torch.get_num_threads(),
                median_ms=round(timing.median_ms, 4), p80_ms=round(timing.p80_ms, 4))


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    """What the results were measured on: CPU model, cores, threads, caches, load; the GPU."""
    info = dict(
        type=device.type,
        cpu_model=cpu_model(),
        logical_cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        last_level_cache_bytes=last_level_cache_bytes(),
        platform=platform.platform(),
    )
    try:
        with open("/proc/meminfo") as f:
            info["memory_total_kib"] = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, gpu_capability=f"{props.major}.{props.minor}",
                    gpu_memory_bytes=props.total_memory, cuda_version=torch.version.cuda)
        info["name"] = props.name
    else:
        info["name"] = f"{info['cpu_model']} ({info['torch_threads']} threads)"
    return info


def versions() -> dict:
    """Versions of Python, PyTorch, Triton, NumPy, this package and any installed peer."""
    import sys

    out = dict(python=sys.version.split()[0], torch=torch.__version__)
    for name in ("triton", "numpy", "ltkd_kernels", "liger_kernel"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "installed")
        except Exception:  # noqa: BLE001  (absent or broken: say so, never fail)
            out[name] = None
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        # Tracked files that differ from the commit (earlier results excepted): the code
        # measured is the commit plus these.
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                 ".", ":(exclude)benchmarks/results"],
                                cwd=root, capture_output=True, text=True, timeout=10).stdout
        out["git_commit"] = commit or None
        out["git_modified_files"] = [line[3:] for line in status.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` in float64 (NaN if either has a NaN or an
    infinity): the one error measure of every check in the benchmarks."""
    value = value.detach().double().reshape(-1).cpu()
    reference = reference.detach().double().reshape(-1).cpu()
    if not bool(torch.isfinite(value).all()) or not bool(torch.isfinite(reference).all()):
        return float("nan")
    denominator = reference.norm().item()
    difference = (value - reference).norm().item()
    return difference / denominator if denominator > 0 else difference
