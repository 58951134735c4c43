"""LTKD forward + backward on the CPU: the C++ backend against eager paper-style PyTorch.

    python benchmarks/bench_cpu_ltkd.py                 # N = 2048 and 4096, V = 32000, G = 3
    python benchmarks/bench_cpu_ltkd.py --rows 256 --repeats 3   # a quick look

Providers, side by side in one run, float32 logits, ``T = 1``, default LTKD options:

- ``cpu``: ``ltkd_kernels.ltkd_loss(..., backend="cpu")`` (the fused C++ kernels);
- ``eager``: :func:`eager_ltkd_loss`, LTKD as the papers' code writes it (log_softmax, softmax,
  ``index_add_`` for the group masses, gathers back to N x V);
- ``reference`` (``--providers``): the package's pure-PyTorch reference (``backend="torch"``).

What is measured (all on the threads given by ``--threads``, default every core):

- **time**: each call timed as forward (``loss = f(...)``) and backward (``loss.backward()``);
  ``--warmup`` untimed calls, then the medians over ``--repeats`` timed calls (``perf_counter``)
  of the forward, the backward and their sum (full); also the process's user and system CPU
  time of each part (``getrusage``, all threads): system time is the OS zeroing fresh pages.
- **peak memory**: each provider runs one forward + backward in a fresh subprocess, after a
  small warm-up call: the kernel's resident high-water mark (``VmHWM``, reset to the current
  size through ``/proc/self/clear_refs`` just before the call) minus the resident size then
  (inputs allocated and touched), with glibc's mmap threshold fixed so that freed buffers
  leave the resident set. It counts every page the process touches (tensors, C++ buffers,
  allocator slack), not only tensors; reported next to the gradient's size.
- **bandwidth**: the machine's copy bandwidth (``dst.copy_(src)`` of an N x V float32 tensor,
  bytes read + written / time) and the streaming floors of the loss's own traffic: reading
  both logits (``torch.dot`` of the two flattened tensors) for the forward, and reading both
  plus writing an N x V result (``torch.add`` into a fresh tensor, as the gradient is) for
  the backward. The fused loss must move ``2 N V 4`` bytes forward and ``3 N V 4`` backward;
  achieved GB/s = those bytes / time. The cpu backend's forward time above its floor is
  computation (the exps); its backward's is mostly the OS zeroing the pages of the fresh
  N x V gradient (the system CPU time).
- **accuracy**: every provider's loss and gradient on a ``(64, V)`` batch against the
  reference evaluated in float64.

Results go to ``benchmarks/results/cpu_ltkd.json`` and ``.md`` with the date, torch version,
CPU model, thread count, load average and command.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ltkd_kernels as lk  # noqa: E402
from benchmarks import eager  # noqa: E402
from benchmarks.measure import cpu_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def eager_ltkd_loss(student, teacher, groups, num_groups=None, *, alpha=1.0, beta=1.0,
                    temperature=1.0):
    """LTKD as the papers' code writes it (``benchmarks.eager.ltkd_loss``: log_softmax,
    ``index_add_`` group sums, every intermediate N x V), with this file's call signature."""
    num_groups = int(groups.max()) + 1 if num_groups is None else num_groups
    return eager.ltkd_loss(student, teacher, groups, num_groups, alpha=alpha, beta=beta,
                           temperature=temperature)


def cpu_ltkd_loss(student, teacher, groups, num_groups=None, **options):
    return lk.ltkd_loss(student, teacher, groups, num_groups, backend="cpu", **options)


def reference_ltkd_loss(student, teacher, groups, num_groups=None, **options):
    return lk.ltkd_loss(student, teacher, groups, num_groups, backend="torch", **options)


PROVIDERS: Dict[str, Callable] = {
    "cpu": cpu_ltkd_loss,
    "eager": eager_ltkd_loss,
    "reference": reference_ltkd_loss,
}


def make_inputs(rows: int, vocab: int, num_groups: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    student = (2.0 * torch.randn(rows, vocab, generator=generator)).requires_grad_(True)
    teacher = 2.0 * torch.randn(rows, vocab, generator=generator)
    groups = torch.randint(0, num_groups, (vocab,), generator=generator)
    return student, teacher, groups


def _median_time(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cpu_seconds():
    """(user, system) CPU seconds of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def time_provider(loss_fn, student, teacher, groups, num_groups, warmup, repeats):
    """Medians over the timed calls, in seconds: wall time of the forward, the backward and
    their sum, and the user / system CPU time (all threads) of the forward and the backward.

    Each call is timed in two parts, ``loss = loss_fn(...)`` then ``loss.backward()``. System
    time is the kernel's: mostly first-touch page faults, zeroing fresh memory for outputs.
    """
    samples = {key: [] for key in ("forward", "backward", "full", "forward_user",
                                   "forward_system", "backward_user", "backward_system")}
    for call in range(warmup + repeats):
        cpu_start = _cpu_seconds()
        start = time.perf_counter()
        loss = loss_fn(student, teacher, groups, num_groups)
        middle = time.perf_counter()
        cpu_middle = _cpu_seconds()
        loss.backward()
        end = time.perf_counter()
        cpu_end = _cpu_seconds()
        student.grad = None
        del loss
        if call >= warmup:
            samples["forward"].append(middle - start)
            samples["backward"].append(end - middle)
            samples["full"].append(end - start)
            samples["forward_user"].append(cpu_middle[0] - cpu_start[0])
            samples["forward_system"].append(cpu_middle[1] - cpu_start[1])
            samples["backward_user"].append(cpu_end[0] - cpu_middle[0])
            samples["backward_system"].append(cpu_end[1] - cpu_middle[1])
    return {key: statistics.median(values) for key, values in samples.items()}


def copy_bandwidth(rows: int, vocab: int, repeats: int = 7) -> float:
    """Bytes read + written per second by a large float32 copy."""
    src = torch.randn(rows, vocab)
    dst = torch.empty_like(src)
    seconds = _median_time(lambda: dst.copy_(src), 2, repeats)
    return 2 * src.numel() * 4 / seconds


def streaming_floors(student, teacher, repeats: int = 7):
    """Times of the loss's bare traffic: read both logits; read both and write a fresh result."""
    s, t = student.detach(), teacher
    read_both = _median_time(lambda: torch.dot(s.view(-1), t.view(-1)), 2, repeats)
    read_write = _median_time(lambda: torch.add(s, t), 2, repeats)
    return read_both, read_write


def accuracy(loss_fn, vocab: int, num_groups: int) -> Dict[str, float]:
    """Relative errors of loss and gradient on a (64, V) batch against float64."""
    student, teacher, groups = make_inputs(64, vocab, num_groups, seed=1)
    reference_student = student.detach().double().requires_grad_(True)
    reference = lk.reference.ltkd_loss(reference_student, teacher.double(), groups, num_groups)
    (reference_grad,) = torch.autograd.grad(reference, reference_student)
    loss = loss_fn(student, teacher, groups, num_groups)
    (grad,) = torch.autograd.grad(loss, student)
    return {
        "loss_rel_err": abs(loss.item() - reference.item()) / abs(reference.item()),
        "grad_rel_err": ((grad.double() - reference_grad).abs().max()
                         / reference_grad.abs().max()).item(),
    }


# --- peak memory, one subprocess per measurement ---------------------------------------------
def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


def _reset_peak_resident() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM) to the current size (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _memory_child(provider: str, rows: int, vocab: int, num_groups: int, threads: int) -> None:
    torch.set_num_threads(threads)
    loss_fn = PROVIDERS[provider]
    small = make_inputs(8, vocab, num_groups)
    loss_fn(*small, num_groups).backward()  # loads the extension, first-call allocations
    student, teacher, groups = make_inputs(rows, vocab, num_groups)
    reset = _reset_peak_resident()
    before = _status_bytes("VmRSS")
    loss_fn(student, teacher, groups, num_groups).backward()
    # Without the reset, VmHWM may hold an earlier, higher peak (imports, input creation): the
    # difference then over-counts; it never under-counts.
    peak = _status_bytes("VmHWM")
    print(json.dumps({"resident_before": before, "peak": peak, "peak_was_reset": reset}))


def peak_memory(provider: str, rows: int, vocab: int, num_groups: int, threads: int) -> dict:
    if not sys.platform.startswith("linux"):
        return {"note": "peak memory is measured on Linux only"}
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", provider,
               "--rows", str(rows), "--vocab", str(vocab), "--groups", str(num_groups),
               "--threads", str(threads)]
    # A fixed glibc mmap threshold: every large buffer is its own mapping, returned to the
    # system when freed, so the resident size follows the live allocations (by default glibc
    # raises the threshold as buffers are freed and later calls reuse heap pages unseen).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    output = subprocess.run(command, check=True, capture_output=True, text=True,
                            env=env).stdout
    sample = json.loads(output.strip().splitlines()[-1])
    extra = sample["peak"] - sample["resident_before"]
    gradient = rows * vocab * 4
    return {"extra_bytes": extra, "gradient_bytes": gradient,
            "extra_over_gradient": extra / gradient, **sample}


# --- the run ----------------------------------------------------------------------------------
def machine_description(threads: int) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = os.getloadavg()
    if lk.unavailable_reason("cpu") is None:
        from ltkd_kernels import cpu

        info["cpu_backend"] = cpu.build_info()
    return info


def run(rows_list: List[int], vocab: int, num_groups: int, providers: List[str], threads: int,
        warmup: int, repeats: int, eager_repeats: int, measure_memory: bool) -> dict:
    torch.set_num_threads(threads)
    result = {"machine": machine_description(threads), "vocab": vocab, "num_groups": num_groups,
              "dtype": "float32", "cases": []}
    result["machine"]["copy_bandwidth_GBps"] = copy_bandwidth(max(rows_list), vocab) / 1e9
    result["accuracy"] = {name: accuracy(PROVIDERS[name], vocab, num_groups) for name in providers}
    for rows in rows_list:
        student, teacher, groups = make_inputs(rows, vocab, num_groups)
        logits_bytes = rows * vocab * 4
        forward_bytes, backward_bytes = 2 * logits_bytes, 3 * logits_bytes
        read_both, read_write = streaming_floors(student, teacher)
        case = {"rows": rows, "bytes_forward": forward_bytes, "bytes_backward": backward_bytes,
                "floor_read_both_ms": read_both * 1e3, "floor_read_both_write_ms": read_write * 1e3,
                "providers": {}}
        for name in providers:
            reps = eager_repeats if name != "cpu" else repeats
            times = time_provider(PROVIDERS[name], student, teacher, groups, num_groups,
                                  warmup, reps)
            forward, backward, full = times["forward"], times["backward"], times["full"]
            entry = {"forward_ms": forward * 1e3, "backward_ms": backward * 1e3,
                     "full_ms": full * 1e3, "repeats": reps,
                     "cpu_time_ms": {key: value * 1e3 for key, value in times.items()
                                     if key.endswith(("_user", "_system"))},
                     "forward_GBps": forward_bytes / forward / 1e9,
                     "backward_GBps": backward_bytes / backward / 1e9,
                     "full_GBps": (forward_bytes + backward_bytes) / full / 1e9}
            if measure_memory:
                entry["peak_memory"] = peak_memory(name, rows, vocab, num_groups, threads)
            case["providers"][name] = entry
            print(f"N={rows} {name:9s} forward {forward * 1e3:8.1f} ms  full {full * 1e3:8.1f} ms",
                  flush=True)
        if "cpu" in case["providers"] and "eager" in case["providers"]:
            case["speedup_full_cpu_vs_eager"] = (case["providers"]["eager"]["full_ms"]
                                                 / case["providers"]["cpu"]["full_ms"])
        result["cases"].append(case)
        del student, teacher
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_at_end"] = os.getloadavg()
    return result


def _rounded(values) -> tuple:
    return tuple(round(x, 2) for x in values)


def markdown(result: dict) -> str:
    machine = result["machine"]
    lines = [
        "# LTKD forward + backward on the CPU",
        "",
        f"{machine['date']}, torch {machine['torch']}, {machine['cpu_model']}, "
        f"{machine['threads']} threads, float32, V = {result['vocab']}, "
        f"G = {result['num_groups']}. "
        f"Copy bandwidth {machine['copy_bandwidth_GBps']:.1f} GB/s (read + write). "
        f"Load average at start {_rounded(machine.get('load_average_at_start', ()))}, "
        f"at end {_rounded(machine.get('load_average_at_end', ()))}.",
        "",
        f"Command: `{machine['command']}`",
        "",
        "| N | provider | forward ms | backward ms | full ms | full GB/s | speed-up vs eager "
        "| peak extra memory (x gradient) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in result["cases"]:
        eager = case["providers"].get("eager")
        for name, entry in case["providers"].items():
            speedup = f"{eager['full_ms'] / entry['full_ms']:.1f}x" if eager else ""
            memory = entry.get("peak_memory", {})
            mem = (f"{memory['extra_bytes'] / 2**20:.0f} MiB ({memory['extra_over_gradient']:.2f})"
                   if "extra_bytes" in memory else "")
            lines.append(f"| {case['rows']} | {name} | {entry['forward_ms']:.1f} | "
                         f"{entry['backward_ms']:.1f} | {entry['full_ms']:.1f} | "
                         f"{entry['full_GBps']:.1f} | {speedup} | {mem} |")
    lines += ["", "Streaming floors (the loss's own traffic, no arithmetic):", "",
              "| N | read both logits ms | read both + write N x V ms |", "|---|---|---|"]
    for case in result["cases"]:
        lines.append(f"| {case['rows']} | {case['floor_read_both_ms']:.1f} | "
                     f"{case['floor_read_both_write_ms']:.1f} |")
    bandwidth = machine["copy_bandwidth_GBps"] * 1e9
    lines += ["", "Where the cpu backend's time goes (floors: the bytes it must move at the copy "
              "bandwidth; CPU time summed over threads, system = page faults zeroing the fresh "
              "gradient):", "",
              "| N | forward ms (floor) | forward user / sys CPU ms | backward ms (floor) "
              "| backward user / sys CPU ms |", "|---|---|---|---|---|"]
    for case in result["cases"]:
        entry = case["providers"].get("cpu")
        if entry is None:
            continue
        cpu_ms = entry["cpu_time_ms"]
        floor_forward = case["bytes_forward"] / bandwidth * 1e3
        floor_backward = case["bytes_backward"] / bandwidth * 1e3
        lines.append(
            f"| {case['rows']} | {entry['forward_ms']:.1f} ({floor_forward:.1f}) | "
            f"{cpu_ms['forward_user']:.0f} / {cpu_ms['forward_system']:.0f} | "
            f"{entry['backward_ms']:.1f} ({floor_backward:.1f}) | "
            f"{cpu_ms['backward_user']:.0f} / {cpu_ms['backward_system']:.0f} |")
    lines += ["", "Accuracy on a (64, V) batch, relative to the float64 reference:", "",
              "| provider | loss | gradient (max abs / max abs ref) |", "|---|---|---|"]
    for name, errors in result["accuracy"].items():
        lines.append(f"| {name} | {errors['loss_rel_err']:.1e} | {errors['grad_rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--groups", type=int, default=3)
    parser.add_argument("--providers", nargs="+", default=["cpu", "eager"],
                        choices=sorted(PROVIDERS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15, help="timed calls of the cpu backend")
    parser.add_argument("--eager-repeats", type=int, default=5,
                        help="timed calls of the (slow) PyTorch providers")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_ltkd.json")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    if args.memory_child:
        _memory_child(args.memory_child, args.rows[0], args.vocab, args.groups, args.threads)
        return {}
    if "cpu" in args.providers and lk.unavailable_reason("cpu") is not None:
        raise SystemExit(f"the C++ CPU backend is unavailable: {lk.unavailable_reason('cpu')}")
    result = run(args.rows, args.vocab, args.groups, args.providers, args.threads, args.warmup,
                 args.repeats, args.eager_repeats, not args.no_memory)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
