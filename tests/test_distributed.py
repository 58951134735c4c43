"""Vocabulary-parallel and data-parallel losses on ``torch.distributed`` (gloo, CPU processes).

Each spawned group of processes runs every check on every backend that can run here (the
reference "torch", the plain-torch operators "torch-ops", Triton under the interpreter and the
C++ backend once their modules exist) and saves what it got; the tests below compare it, in the
main process, with the single-process result of the whole vocabulary (and the whole batch) in
float64: loss to 1e-5, and the gradient of every shard against the matching slice of the full
gradient. Spawning is the expensive part, so there are two spawns in all (4 processes: vocab x 4,
data x vocab 2 x 2, collective counts, the layout check; 2 processes: vocab x 2), each shared by
the tests through a module-scoped fixture.
"""
import functools
import importlib.util
import os
import traceback
from datetime import timedelta

import pytest
import torch

import ltkd_kernels as lk
from conftest import assert_grad_close, assert_loss_close

BACKENDS = ("torch", "torch-ops", "triton", "cpu")
IGNORE = -100
ROWS = 8                        # of the 4-rank problem; W + 4 rows in general
VOCAB = 1031
SIZES4 = (300, 1, 413, 317)     # uneven, with a one-class shard
SIZES2 = (600, 431)
NUM_GROUPS = 3


def _unavailable(name):
    """Why a backend cannot run in these tests (``None`` when it can)."""
    if name in ("torch", "torch-ops"):
        return None
    module = f"ltkd_kernels.{name}.grouped_kl"
    if importlib.util.find_spec(module) is None:
        return f"{module} has not landed yet"
    return lk.unavailable_reason(name, torch.device("cpu"))


_AVAILABLE = tuple(b for b in BACKENDS if _unavailable(b) is None)


def _backend_param(name):
    reason = _unavailable(name)
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


BACKEND_PARAMS = [_backend_param(b) for b in BACKENDS]


# ---------------------------------------------------------------------------------------------
# The problem: the same tensors in every process (fixed seed), sliced per rank.

def _bounds(sizes):
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return [(a, a + n) for a, n in zip(starts, sizes)]


def _num_rows(sizes):
    return len(sizes) + 4


@functools.lru_cache(maxsize=None)
def _problem(sizes):
    """Full (W + 4, VOCAB) logits and the row/class tensors, with the special cases placed on
    the shards of ``sizes``:

    - rows 0..W-1: the target lies on shard r (DKD's group 0 and the CE target on every rank;
      on the one-class shard of SIZES4 too);
    - row W: target 0 (the first class); both models ``-inf`` on the whole last shard (a shard
      that holds no valid logit of the row);
    - row W+1: target V-1 (the last class); the teacher ``-inf`` on the whole first shard;
    - row W+2: target = ignore_index; the last row is masked out;
    - groups: shard W-2 holds no class of group 2 (LTKD's G = 3);
    - class_weight: one class of weight 0.
    """
    g = torch.Generator().manual_seed(1234)
    W = len(sizes)
    rows = _num_rows(sizes)
    bounds = _bounds(sizes)
    s = torch.randn(rows, VOCAB, generator=g) * 2.0
    t = torch.randn(rows, VOCAB, generator=g) * 3.0 + 0.5
    target = torch.randint(VOCAB, (rows,), generator=g)
    for r, (lo, hi) in enumerate(bounds):
        target[r] = (lo + hi) // 2
    target[W], target[W + 1], target[W + 2] = 0, VOCAB - 1, IGNORE
    lo, hi = bounds[-1]
    s[W, lo:hi] = float("-inf")
    t[W, lo:hi] = float("-inf")
    lo, hi = bounds[0]
    t[W + 1, lo:hi] = float("-inf")
    groups = torch.randint(NUM_GROUPS, (VOCAB,), generator=g)
    lo, hi = bounds[W - 2]
    groups[lo:hi] = torch.randint(2, (hi - lo,), generator=g)
    weight = torch.rand(VOCAB, generator=g) + 0.05
    weight[5] = 0.0
    mask = torch.ones(rows, dtype=torch.bool)
    mask[-1] = False
    sample_weight = torch.rand(rows, generator=g) + 0.1
    return dict(student=s, teacher=t, target=target, groups=groups, weight=weight, mask=mask,
                sample_weight=sample_weight)


def _calls(p, lo, hi, rows=slice(None)):
    """Every loss configuration on the class slice ``[lo, hi)`` and the row slice ``rows``:
    ``name -> call(student, teacher, **options)``."""
    g, w = p["groups"][lo:hi], p["weight"][lo:hi]
    y, m, sw = p["target"][rows], p["mask"][rows], p["sample_weight"][rows]
    return {
        "kd": lambda s, t, **kw: lk.kd_loss(s, t, temperature=2.0, **kw),
        "kd_ce_weighted": lambda s, t, **kw: lk.kd_loss(
            s, t, temperature=2.0, target=y, ce_weight=0.5, sample_weight=sw, mask=m, **kw),
        "ltkd": lambda s, t, **kw: lk.ltkd_loss(
            s, t, g, NUM_GROUPS, temperature=4.0, alpha=0.7, beta=1.3, mask=m, **kw),
        "ltkd_teacher_within": lambda s, t, **kw: lk.ltkd_loss(
            s, t, g, NUM_GROUPS, rebalance=False, within_weight="teacher", temperature=1.5,
            sample_weight=sw, **kw),
        "dkd": lambda s, t, **kw: lk.dkd_loss(s, t, y, mask=m, **kw),
        "bkd_ce": lambda s, t, **kw: lk.bkd_loss(
            s, t, w, temperature=3.0, target=y, ce_weight=1.0, sample_weight=sw, **kw),
    }


CASES = list(_calls(_problem(SIZES2), 0, VOCAB))
VARIANTS = {
    "batchmean": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "num_items": {"num_items_in_batch": 5.0},
    "num_items_tensor": {"num_items_in_batch": torch.tensor(7.0)},
}
# Data x vocab: (case, variant, global_batchmean); the per-rank losses add up to the full one.
DATA_VOCAB_CHECKS = [("ltkd", "sum", False), ("ltkd", "batchmean", True),
                     ("dkd", "batchmean", True), ("kd_ce_weighted", "batchmean", True),
                     ("bkd_ce", "none", False)]
# Triton runs under its interpreter here (about a second per call and process): every case
# once on 2 ranks, a few on the 4 uneven ranks and on 2 x 2; its collectives are those of the
# op layer, counted on the other backends.
TRITON_PLAN = {
    "vocab2": [(case, "batchmean") for case in CASES],
    "vocab4": [("dkd", "sum"), ("bkd_ce", "none")],
    "data_vocab": [("ltkd", "batchmean")],
}


def _planned(backend, tag, case, variant):
    """Whether ``backend`` runs ``case`` x ``variant`` in the checks named ``tag``."""
    return backend != "triton" or (case, variant) in TRITON_PLAN[tag]


# ---------------------------------------------------------------------------------------------
# In the workers.

_NEW_NAMES = {"all_gather_into_tensor": "all_gather_single"}
_OUTPUT_FIRST = ("all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
                 "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather_object",
                 "all_gather_object")
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
                "reduce_scatter",
                "reduce_scatter_tensor", "broadcast", "all_to_all", "all_to_all_single", "reduce",
                "gather", "scatter", "send", "recv", "isend", "irecv", "barrier",
                "all_gather_object", "broadcast_object_list")


class _CollectiveLog:
    """Wraps every collective of ``torch.distributed`` (module attribute and c10d's) to record
    ``(name, op, bytes of the tensor argument)`` of the outermost call (a deprecated name that
    forwards to its new one counts once, under the new name)."""

    def __init__(self):
        self.records = []
        self.depth = 0
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for module in (dist, c10d):
            for name in _COLLECTIVES:
                original = getattr(module, name, None)
                if original is not None and not getattr(original, "_counted", False):
                    setattr(module, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            # What this rank contributes: the input of a gather (its second argument), else
            # the (first) tensor argument.
            position = 1 if name in _OUTPUT_FIRST else 0
            tensor = args[position] if len(args) > position else None
            if isinstance(tensor, (list, tuple)):
                tensor = tensor[0] if tensor else None
            size = tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0
            op = kwargs.get("op", args[1] if name == "all_reduce" and len(args) > 1 else None)
            if self.depth == 0:
                self.records.append((_NEW_NAMES.get(name, name),
                                     None if op is None else str(op).split(".")[-1], size))
            self.depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= 1

        counted._counted = True
        return counted

    def take(self):
        out, self.records = self.records, []
        return out


def _use_backend(name):
    """Set up the backend ``name`` in this process; returns the ``backend=`` value."""
    from ltkd_kernels.ops import grouped_kl as ops
    from ltkd_kernels.ops import grouped_kl_torch

    if not hasattr(ops, "_original_kernel_module"):
        ops._original_kernel_module = ops.kernel_module
    if name == "torch-ops":
        ops.kernel_module = lambda backend, device: grouped_kl_torch
        return "auto"
    ops.kernel_module = ops._original_kernel_module
    return name


def _attempt(results, key, fn):
    try:
        results[key] = fn()
    except Exception:  # noqa: BLE001 - reported by the test that reads it
        results[key] = {"error": traceback.format_exc()}


def _run_vocab_checks(results, tag, p, sizes, rank, group, backends):
    """Every case x variant on this rank's class slice; saves loss and the slice's gradient."""
    lo, hi = _bounds(sizes)[rank]
    for backend in backends:
        name = _use_backend(backend)
        calls = _calls(p, lo, hi)
        for case, call in calls.items():
            for variant in VARIANTS:
                if not _planned(backend, tag, case, variant):
                    continue

                def check(call=call, variant=variant):
                    s = p["student"][:, lo:hi].clone().requires_grad_()
                    loss = call(s, p["teacher"][:, lo:hi], vocab_process_group=group,
                                backend=name, **VARIANTS[variant])
                    loss.sum().backward() if loss.dim() else loss.backward()
                    return {"loss": loss.detach(), "grad": s.grad}
                _attempt(results, (tag, backend, case, variant), check)


def _run_data_vocab_checks(results, p, d, v, data_group, vocab_group, backends):
    lo, hi = _bounds(SIZES2)[v]
    half = _num_rows(SIZES2) // 2
    rows = slice(d * half, (d + 1) * half)
    for backend in backends:
        name = _use_backend(backend)
        calls = _calls(p, lo, hi, rows)
        for case, variant, global_batchmean in DATA_VOCAB_CHECKS:
            if not _planned(backend, "data_vocab", case, variant):
                continue

            def check(call=calls[case], variant=variant, global_batchmean=global_batchmean):
                s = p["student"][rows, lo:hi].clone().requires_grad_()
                loss = call(s, p["teacher"][rows, lo:hi], vocab_process_group=vocab_group,
                            process_group=data_group, global_batchmean=global_batchmean,
                            backend=name, **VARIANTS[variant])
                loss.sum().backward() if loss.dim() else loss.backward()
                return {"loss": loss.detach(), "grad": s.grad}
            _attempt(results, ("data_vocab", backend, case, variant), check)


def _run_counts(results, log, p, rank, vocab_group, pair_vocab_group, data_group, v, backends):
    """The collectives of the first and second forward and of a backward."""
    lo, hi = _bounds(SIZES4)[rank]
    for backend in backends:
        if backend in ("torch", "triton"):
            # The reference gathers the logits (the baseline, not the contract); Triton's
            # collectives are the op layer's, counted here on the other kernel backends.
            continue
        name = _use_backend(backend)
        calls = _calls(p, lo, hi)
        for case in ("kd", "ltkd", "kd_ce_weighted", "dkd"):
            def count(call=calls[case]):
                s = p["student"][:, lo:hi].clone().requires_grad_()
                log.take()
                out = {}
                for i in range(2):
                    loss = call(s, p["teacher"][:, lo:hi], vocab_process_group=vocab_group,
                                backend=name)
                    out[f"forward{i}"] = log.take()
                loss.backward()
                out["backward"] = log.take()
                return out
            _attempt(results, ("count", backend, case), count)
        # data x vocab (2 x 2): LTKD's batch statistic adds one all-gather of the partials.
        lo2, hi2 = _bounds(SIZES2)[v]

        def count_data(call=_calls(p, lo2, hi2, slice(0, ROWS // 2))["ltkd"]):
            s = p["student"][:ROWS // 2, lo2:hi2].clone().requires_grad_()
            call(s, p["teacher"][:ROWS // 2, lo2:hi2], vocab_process_group=pair_vocab_group,
                 process_group=data_group, backend=name)
            log.take()
            loss = call(s, p["teacher"][:ROWS // 2, lo2:hi2], vocab_process_group=pair_vocab_group,
                        process_group=data_group, backend=name)
            forward = log.take()
            loss.backward()
            return {"forward": forward, "backward": log.take()}
        _attempt(results, ("count_data_vocab", backend), count_data)


def _run_edge_checks(results, p, sizes, rank, group, backends):
    """A target outside the whole vocabulary; a student ``-inf`` where the teacher has mass;
    a layout that one rank gets wrong."""
    import torch.distributed as dist

    from ltkd_kernels.ops.distributed import set_vocab_layout

    lo, hi = _bounds(sizes)[rank]
    s, t = p["student"][:, lo:hi], p["teacher"][:, lo:hi]
    outside = p["target"].clone()
    outside[1] = VOCAB
    inf_student = s.clone()
    if rank == 0:
        inf_student[3, :] = float("-inf")   # teacher finite there: KL = +inf for row 3
    if rank == 2:
        inf_student[0, 7] = float("nan")    # NaN on one shard: NaN for row 0 on every rank
    # One group per layout: rank W-1 registers sizes with its own size right but a wrong
    # offset and total (as if another split had been cached).
    wrong = dist.new_group(list(range(len(sizes))))
    claimed = list(sizes)
    if rank == len(sizes) - 1:
        claimed[-2] += 1
    set_vocab_layout(wrong, claimed)
    for backend in backends:
        name = _use_backend(backend)
        _attempt(results, ("edge_outside", backend), lambda: {"loss": lk.dkd_loss(
            s, t, outside, vocab_process_group=group, reduction="none", backend=name)})
        if backend == "triton":
            # The layout check is the op layer's (run on the other backends); the -inf rows
            # (both models -inf on a whole shard) are in Triton's checks on 2 and 4 ranks.
            continue
        _attempt(results, ("edge_inf", backend), lambda: {"loss": lk.kd_loss(
            inf_student, t, vocab_process_group=group, reduction="none", backend=name)})
        if backend != "torch":
            _attempt(results, ("edge_layout", backend), lambda: {"loss": lk.kd_loss(
                s, t, vocab_process_group=wrong, backend=name)})


def _worker(rank, world, init_file, out_dir, backends):
    import torch.distributed as dist

    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=90))
    results = {}
    try:
        if world == 4:
            p4 = _problem(SIZES4)
            log = _CollectiveLog()
            # Orthogonal 2 x 2 groups, rank = 2 d + v: vocab groups {0, 1}, {2, 3}; data
            # groups {0, 2}, {1, 3}. Every rank creates every group, in the same order.
            vocab_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            data_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
            d, v = divmod(rank, 2)
            _run_counts(results, log, p4, rank, dist.group.WORLD, vocab_groups[d], data_groups[v],
                        v, backends)
            _run_vocab_checks(results, "vocab4", p4, SIZES4, rank, dist.group.WORLD, backends)
            _run_data_vocab_checks(results, _problem(SIZES2), d, v, data_groups[v],
                                   vocab_groups[d], backends)
            _run_edge_checks(results, p4, SIZES4, rank, dist.group.WORLD, backends)
        else:
            _run_vocab_checks(results, "vocab2", _problem(SIZES2), SIZES2, rank,
                              dist.group.WORLD, backends)
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Every rank done before any tears its connections down (gloo may abort a peer
        # whose connection closes under it).
        dist.barrier()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def _spawned(tmp_path_factory):
    """Both groups of processes (4 and 2), started at once: they overlap their start-up (the
    imports) and their waits in the collectives. Joined at the end of the module whatever ran."""
    import torch.multiprocessing as mp

    started = {}
    for world in (4, 2):
        directory = tmp_path_factory.mktemp(f"world{world}")
        context = mp.start_processes(
            _worker, args=(world, str(directory / "init"), str(directory), _AVAILABLE),
            nprocs=world, join=False, start_method="spawn")
        started[world] = (context, directory)
    yield started
    for context, _ in started.values():
        for process in context.processes:
            process.join(timeout=120)
            if process.is_alive():
                process.terminate()


def _results(started, world):
    context, directory = started[world]
    while not context.join():
        pass
    return [torch.load(directory / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def world4(_spawned):
    return _results(_spawned, 4)


@pytest.fixture(scope="module")
def world2(_spawned):
    return _results(_spawned, 2)


# ---------------------------------------------------------------------------------------------
# The single-process float64 results.

@functools.lru_cache(maxsize=None)
def _expected(sizes, case, variant):
    """Loss and gradient of the whole vocabulary and batch of ``_problem(sizes)``, float64."""
    p = _problem(sizes)
    s = p["student"].double().requires_grad_()
    loss = _calls(p, 0, VOCAB)[case](s, p["teacher"].double(), backend="torch",
                                     **VARIANTS[variant])
    loss.sum().backward() if loss.dim() else loss.backward()
    return loss.detach(), s.grad


def _get(shard, key):
    out = shard.get(key)
    assert out is not None, f"{key} was not run"
    if "error" in out:
        pytest.fail(f"{key} raised in a worker:\n{out['error']}")
    return out


def _check_vocab_parallel(shards, tag, sizes, backend, case, variant):
    loss64, grad64 = _expected(sizes, case, variant)
    got = [_get(shard, (tag, backend, case, variant)) for shard in shards]
    for r, out in enumerate(got):
        # Every rank holds the full loss, the same bits on each.
        assert torch.equal(out["loss"], got[0]["loss"]), (r, out["loss"], got[0]["loss"])
        assert_loss_close(out["loss"], loss64, scale=float(loss64.abs().max()))
        lo, hi = _bounds(sizes)[r]
        assert out["grad"].shape == (_num_rows(sizes), hi - lo)
    # Each shard's gradient is its slice of the full one: their concatenation in rank order
    # against the full float64 gradient, norm-wise (the rule of tests/conftest.py).
    assert_grad_close(torch.cat([out["grad"] for out in got], 1), grad64)


# ---------------------------------------------------------------------------------------------
# The tests.

def _params(tag, checks):
    """``(backend, *check)`` for every backend and the checks it runs under ``tag``."""
    out = []
    for backend in BACKENDS:
        reason = _unavailable(backend)
        marks = pytest.mark.skipif(reason is not None, reason=str(reason))
        for check in checks:
            if _planned(backend, tag, check[0], check[1]):
                out.append(pytest.param(backend, *check, marks=marks,
                                        id="-".join([backend] + [str(c) for c in check])))
    return out


_VOCAB_CHECKS = [(case, variant) for case in CASES for variant in VARIANTS]


@pytest.mark.parametrize("backend, case, variant", _params("vocab4", _VOCAB_CHECKS))
def test_vocab_parallel_4_ranks_equals_single_process(world4, backend, case, variant):
    """V = 1031 over 4 ranks (300, 1, 413, 317): loss and every shard's gradient equal the
    single process on the whole vocabulary (targets on every shard, a shard without group 2,
    a row with no valid logit on the last shard, masks, weights, every reduction)."""
    _check_vocab_parallel(world4, "vocab4", SIZES4, backend, case, variant)


@pytest.mark.parametrize("backend, case, variant", _params("vocab2", _VOCAB_CHECKS))
def test_vocab_parallel_2_ranks_equals_single_process(world2, backend, case, variant):
    _check_vocab_parallel(world2, "vocab2", SIZES2, backend, case, variant)


@pytest.mark.parametrize("backend, case, variant, global_batchmean",
                         _params("data_vocab", DATA_VOCAB_CHECKS))
def test_data_parallel_times_vocab_parallel(world4, backend, case, variant, global_batchmean):
    """4 ranks as 2 data x 2 vocab: each data rank's rows, each vocab rank's classes. The data
    ranks' losses add up to the single-process loss of the whole batch (``sum``; ``batchmean``
    with ``global_batchmean``) or concatenate to it (``none``); LTKD's batch statistic is over
    both data ranks; every rank's gradient is its block of the full one."""
    loss64, grad64 = _expected(SIZES2, case, variant)
    got = [_get(shard, ("data_vocab", backend, case, variant)) for shard in world4]
    for d in range(2):
        assert torch.equal(got[2 * d]["loss"], got[2 * d + 1]["loss"])  # both vocab ranks
    if variant == "none":
        total = torch.cat([got[0]["loss"], got[2]["loss"]])
    else:
        total = got[0]["loss"] + got[2]["loss"]
    assert_loss_close(total, loss64, scale=float(loss64.abs().max()))
    full = torch.cat([torch.cat([got[2 * d]["grad"], got[2 * d + 1]["grad"]], 1) for d in range(2)])
    assert full.shape == grad64.shape
    assert_grad_close(full, grad64)


def _reduce_records(records):
    return [(name, op) for name, op, _ in records]


COUNTED = [p for p in BACKEND_PARAMS if p.values[0] not in ("torch", "triton")]


@pytest.mark.parametrize("case", ["kd", "ltkd", "kd_ce_weighted", "dkd"])
@pytest.mark.parametrize("backend", COUNTED)
def test_collectives_per_call(world4, backend, case):
    """Per forward exactly one all-reduce MAX and one all-reduce SUM of O(N G) floats (the
    first call on a group also all-gathers the slice sizes, once); none in the backward."""
    from ltkd_kernels.ops.distributed import communication_bytes

    G = {"kd": 1, "kd_ce_weighted": 1, "ltkd": NUM_GROUPS, "dkd": 2}[case]
    ce = case == "kd_ce_weighted"
    target = case in ("kd_ce_weighted", "dkd")
    expected = communication_bytes(ROWS, G, 4, with_ce=ce, with_target=target)
    # The sizes, written out: MAX of N (2G + ce) maxima + the 2W + 2 layout claims; SUM of
    # N (3G + 2 ce + target) sums.
    assert expected["all_reduce_max"] == 4 * (ROWS * (2 * G + ce) + 10)
    assert expected["all_reduce_sum"] == 4 * ROWS * (3 * G + 2 * ce + target)
    steady = [("all_reduce", "MAX", expected["all_reduce_max"]),
              ("all_reduce", "SUM", expected["all_reduce_sum"])]
    for rank, shard in enumerate(world4):
        out = _get(shard, ("count", backend, case))
        first = out["forward0"]
        # The layout all-gather at most once per (group, local size) and process, first.
        assert first in (steady, [("all_gather_single", None, 8)] + steady), (rank, first)
        assert out["forward1"] == steady, (rank, out["forward1"])
        assert out["backward"] == [], (rank, out["backward"])


@pytest.mark.parametrize("backend", COUNTED)
def test_collectives_data_times_vocab(world4, backend):
    """LTKD on 2 data x 2 vocab ranks: MAX and SUM over the vocab group, then one all-gather
    of the (2G + 2) batch partials over the data group; nothing in the backward."""
    from ltkd_kernels.ops.distributed import communication_bytes

    G = NUM_GROUPS
    for rank, shard in enumerate(world4):
        out = _get(shard, ("count_data_vocab", backend))
        assert _reduce_records(out["forward"]) == [
            ("all_reduce", "MAX"), ("all_reduce", "SUM"), ("all_gather_single", None)]
        sizes = [size for _, _, size in out["forward"]]
        # MAX: (N/2) 2G maxima + 2W + 2 = 6 layout claims (W = 2); SUM: (N/2) 3G; the partial.
        assert sizes == [4 * (ROWS // 2 * 2 * G + 6), 4 * ROWS // 2 * 3 * G, 4 * (2 * G + 2)]
        predicted = communication_bytes(ROWS // 2, G, 2, data_parallel=True)
        assert sum(sizes) == predicted["total"]
        assert out["backward"] == []


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_target_outside_the_whole_vocabulary(world4, backend):
    """A valid row whose target no shard holds: NaN (the merged ``found`` is 0) where the
    backend's rule is NaN; ``ValueError`` on every rank where it raises (the reference, the
    C++ backend)."""
    outs = [shard[("edge_outside", backend)] for shard in world4]
    if backend in ("torch", "cpu"):
        for out in outs:
            assert "error" in out and "ValueError" in out["error"], out
        return
    raised = all("error" in out and "ValueError" in out["error"] for out in outs)
    if backend == "torch-ops" and raised:
        return  # the plain-torch operators may apply the CPU rule (raise) once they check V_total
    p = _problem(SIZES4)
    for out in (_get(shard, ("edge_outside", backend)) for shard in world4):
        loss = out["loss"]
        assert torch.isnan(loss[1]), loss
        others = torch.ones(_num_rows(SIZES4), dtype=torch.bool)
        others[1] = False
        expected = lk.dkd_loss(p["student"].double(), p["teacher"].double(), p["target"],
                               reduction="none", backend="torch")
        assert_loss_close(loss[others], expected[others], scale=float(expected.abs().max()))


@pytest.mark.parametrize("backend", [p for p in BACKEND_PARAMS if p.values[0] != "triton"])
def test_non_finite_student_on_one_shard(world4, backend):
    """The student ``-inf`` on a whole shard of one row while the teacher has mass there: that
    row's KL is ``+inf``; a NaN logit on one shard: NaN for its row, on every rank (the MAX
    may drop a NaN, the rescaled sums carry it). The other rows are unchanged."""
    p = _problem(SIZES4)
    s = p["student"].clone()
    lo, hi = _bounds(SIZES4)[0]
    s[3, lo:hi] = float("-inf")
    s[0, _bounds(SIZES4)[2][0] + 7] = float("nan")
    expected = lk.kd_loss(s.double(), p["teacher"].double(), reduction="none", backend="torch")
    assert torch.isinf(expected[3]) and torch.isnan(expected[0])
    for shard in world4:
        assert_loss_close(_get(shard, ("edge_inf", backend))["loss"], expected,
                          scale=float(expected[torch.isfinite(expected)].abs().max()))


@pytest.mark.parametrize("backend", COUNTED)
def test_inconsistent_layout_raises_on_every_rank(world4, backend):
    """One rank with a stale layout (right local size, wrong offset and total): the in-band
    check of the MAX all-reduce makes every rank raise (CPU tensors), none hangs."""
    for shard in world4:
        out = shard[("edge_layout", backend)]
        assert "error" in out and "disagree on the vocabulary layout" in out["error"], out


def test_communication_is_independent_of_the_vocabulary():
    """The bytes per call depend on N, G and the world size only, never on V."""
    from ltkd_kernels.ops.distributed import communication_bytes

    small = communication_bytes(64, 3, 8, with_ce=True, with_target=True)
    assert small["total"] == 4 * (64 * 7 + 18) + 4 * 64 * 12
    logits = 64 * 128256 * 4 * 2   # both models' float32 logits of a 128K vocabulary
    assert small["total"] < logits / 1000
