"""Modules, backend selection, torch.compile, launch counts, host synchronisation, the options
of a training loop (ignore_index, integer masks, gradient accumulation, weighted means) and
data-parallel LTKD."""
import os
import subprocess
import sys

import pytest
import torch

import ltkd_kernels as lk
from conftest import with_backends
from ltkd_kernels.ops.launches import count_launches


def test_available_backends_and_auto():
    names = lk.available_backends()
    assert "torch" in names
    assert ("triton" in names) == (lk.unavailable_reason("triton") is None)
    for name in ("triton", "cpu"):
        reason = lk.unavailable_reason(name)
        assert reason is None or (isinstance(reason, str) and reason)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        lk.kd_loss(torch.randn(2, 5), torch.randn(2, 5), backend="triton")
    lk.kd_loss(torch.randn(2, 5), torch.randn(2, 5), backend="torch")


def test_import_needs_no_gpu_and_no_triton_kernels():
    code = ("import sys, ltkd_kernels; "
            "assert 'ltkd_kernels.triton' not in sys.modules; "
            "assert 'triton' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def _modules_and_calls(backend, groups, weight):
    """Each loss as a module and as the functional call it wraps."""
    return [
        (lk.KDLoss(temperature=2.0, backend=backend),
         lambda s, t, y: lk.kd_loss(s, t, temperature=2.0, backend=backend), False),
        (lk.LTKDLoss(groups, temperature=4.0, backend=backend),
         lambda s, t, y: lk.ltkd_loss(s, t, groups, 3, temperature=4.0, backend=backend), False),
        (lk.DKDLoss(backend=backend), lambda s, t, y: lk.dkd_loss(s, t, y, backend=backend), True),
        (lk.BKDLoss(weight, ce_weight=1.0, backend=backend),
         lambda s, t, y: lk.bkd_loss(s, t, weight, target=y, ce_weight=1.0, backend=backend), True),
    ]


@with_backends()
def test_modules_match_functional(backend):
    s, t = torch.randn(2, 3, 40), torch.randn(2, 3, 40)
    counts = torch.randint(1, 300, (40,))
    groups = lk.groups_from_counts(counts, 3)
    target = torch.randint(40, (2, 3))
    for module, functional, needs_target in _modules_and_calls(backend, groups,
                                                                lk.class_balanced_weights(counts)):
        out = module(s, t, target) if needs_target else module(s, t)
        assert torch.equal(out, functional(s, t, target))
        assert backend in repr(module)
    ltkd = lk.LTKDLoss(groups, backend=backend)
    assert torch.equal(ltkd.groups, groups) and "groups" in dict(ltkd.named_buffers())
    mask = torch.tensor([[True, False, True], [True, True, False]])
    out = lk.LTKDLoss(groups, reduction="none", backend=backend)(s, t, mask=mask)
    assert out.shape == (2, 3) and (out[~mask] == 0).all()


def test_module_options_are_keyword_only_and_checked_at_construction():
    groups = torch.tensor([0, 1, 2, 1])
    for make in (lambda: lk.KDLoss(4.0), lambda: lk.DKDLoss(4.0),
                 lambda: lk.LTKDLoss(groups, 3, 4.0), lambda: lk.BKDLoss(torch.ones(4), 2.0)):
        with pytest.raises(TypeError):
            make()
    with pytest.raises(ValueError, match="temperature"):
        lk.LTKDLoss(groups, temperature=-1.0)
    with pytest.raises(ValueError, match="groups"):
        lk.LTKDLoss(groups - 1)
    with pytest.raises(ValueError, match="class_weight"):
        lk.BKDLoss(-torch.ones(4))
    with pytest.raises(ValueError, match="reduction"):
        lk.KDLoss(reduction="mean")
    with pytest.raises(ValueError, match="backend"):
        lk.DKDLoss(backend="gpu")


@pytest.mark.parametrize("module", [lk.KDLoss, lk.LTKDLoss, lk.DKDLoss, lk.BKDLoss])
def test_help_documents_every_option(module):
    import inspect

    doc = module.__doc__
    for name, parameter in inspect.signature(module.__init__).parameters.items():
        if name != "self":
            assert name in doc, f"{module.__name__}'s docstring does not mention {name}"
    for name in ("sample_weight", "mask", "num_items_in_batch", "target"):
        assert name in doc


def test_ltkd_module_state_dict_round_trip():
    groups = torch.tensor([0, 1, 2, 1, 0])
    m = lk.LTKDLoss(groups)
    m2 = lk.LTKDLoss(torch.zeros(5, dtype=torch.long), num_groups=3)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.groups, groups)


# ---------------------------------------------------------------------------------------------
# torch.compile: a training step with every loss module, fullgraph, the first call included.

@with_backends()
@pytest.mark.parametrize("loss_name", ["kd", "ltkd", "dkd", "bkd"])
def test_torch_compile_fullgraph_training_step(loss_name, backend):
    torch._dynamo.reset()
    vocab = 21
    groups = torch.arange(vocab) % 3
    criterion = {
        "kd": lambda: lk.KDLoss(temperature=2.0, backend=backend),
        "ltkd": lambda: lk.LTKDLoss(groups, temperature=2.0, backend=backend),
        "dkd": lambda: lk.DKDLoss(backend=backend),
        "bkd": lambda: lk.BKDLoss(torch.rand(vocab) + 0.1, ce_weight=1.0, backend=backend),
    }[loss_name]()
    head = torch.nn.Linear(8, vocab)

    def step(x, teacher_logits, y):
        return criterion(head(x), teacher_logits, y)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x, t, y = torch.randn(4, 8), torch.randn(4, vocab), torch.randint(vocab, (4,))
    eager_loss = step(x, t, y)
    eager_grad = torch.autograd.grad(eager_loss, head.weight)[0]
    compiled_loss = compiled(x, t, y)  # the first call: fullgraph=True raises on a graph break
    compiled_grad = torch.autograd.grad(compiled_loss, head.weight)[0]
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Launches per call and host synchronisation.

def _loss_calls(backend, vocab=100, rows=128):
    groups = torch.arange(vocab) % 3
    weight = torch.rand(vocab) + 0.1
    target = torch.randint(vocab, (rows,))
    return {
        "kd": lambda s, t, **kw: lk.kd_loss(s, t, temperature=2.0, backend=backend, **kw),
        "ltkd": lambda s, t, **kw: lk.ltkd_loss(s, t, groups, 3, temperature=4.0, backend=backend, **kw),
        "dkd": lambda s, t, **kw: lk.dkd_loss(s, t, target, backend=backend, **kw),
        "bkd": lambda s, t, **kw: lk.bkd_loss(s, t, weight, target=target, ce_weight=1.0,
                                              backend=backend, **kw),
    }


@with_backends(("triton", "cpu"))
@pytest.mark.parametrize("options", ["plain", "mask_weight", "none"])
@pytest.mark.parametrize("loss_name", ["kd", "ltkd", "dkd", "bkd"])
def test_launches_per_call(loss_name, options, backend):
    """Forward <= 3 and backward <= 2 launches (leaf ATen ops that compute, in the custom ops
    too, plus Triton kernels and calls into the C++ extension; the backward's count includes
    autograd's seed gradient). The count does not depend on N: the interpreter gets fewer rows."""
    rows, vocab = (16 if backend == "triton" else 128), 100
    call = _loss_calls(backend, vocab, rows)[loss_name]
    kwargs = {}
    if options == "mask_weight":
        kwargs = dict(mask=torch.rand(rows) > 0.2, sample_weight=torch.rand(rows))
    elif options == "none":
        kwargs = dict(reduction="none")
    s = torch.randn(rows, vocab, requires_grad=True)
    t = torch.randn(rows, vocab)
    call(s, t, **kwargs).sum().backward()  # warm-up: constants are checked once per tensor
    s.grad = None
    results = {}
    forward, forward_ops = count_launches(lambda: results.setdefault("loss", call(s, t, **kwargs)))
    total = results["loss"] if results["loss"].dim() == 0 else results["loss"].sum()
    backward, backward_ops = count_launches(total.backward)
    assert forward <= 3, f"forward launches {forward}: {dict(forward_ops)}"
    assert backward <= 2, f"backward launches {backward}: {dict(backward_ops)}"


_SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@with_backends(("triton",))
@pytest.mark.parametrize("loss_name", ["kd", "ltkd", "dkd", "bkd"])
def test_no_host_synchronisation(loss_name, backend, monkeypatch):
    """The Triton path reads no tensor value on the host (no .item(), .tolist(), bool(tensor),
    ...) in any loss, forward or backward, after constants were checked once: on a GPU each
    would be a synchronisation. The interpreter itself runs outside the patched region."""
    from ltkd_kernels.triton import grouped_kl as triton_ops

    call = _loss_calls(backend, 50, 6)[loss_name]
    s = torch.randn(6, 50, requires_grad=True)
    t = torch.randn(6, 50)
    mask = torch.tensor([1, 1, 0, 1, 1, 1])
    call(s, t, mask=mask).backward()  # warm-up
    reads = []

    def forbid(name):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, **kwargs):
            if not _in_kernel[0]:
                reads.append(name)
            return original(self, *args, **kwargs)
        return guarded

    _in_kernel = [False]
    # Triton's interpreter converts tensors with such calls: launches are exempt, the rest not.
    for name in dir(triton_ops):
        kernel = getattr(triton_ops, name)
        if hasattr(kernel, "__getitem__") and hasattr(kernel, "run"):
            monkeypatch.setattr(triton_ops, name, _ExemptLaunch(kernel, _in_kernel))
    for name in _SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    s.grad = None
    call(s, t, mask=mask).backward()
    assert not reads, f"host reads in the loss path: {reads}"


class _ExemptLaunch:
    """Wraps a Triton kernel so that host reads inside its (interpreted) launch are allowed."""

    def __init__(self, kernel, flag):
        self.kernel, self.flag = kernel, flag

    def __getitem__(self, grid):
        launcher = self.kernel[grid]

        def run(*args, **kwargs):
            self.flag[0] = True
            try:
                return launcher(*args, **kwargs)
            finally:
                self.flag[0] = False
        return run


# ---------------------------------------------------------------------------------------------
# Padding, accumulation and weighted means (the options of a training loop).

@with_backends()
@pytest.mark.parametrize("loss_name", ["kd", "ltkd", "dkd", "bkd"])
def test_ignore_index_and_integer_masks(loss_name, backend):
    """Hugging Face shapes: logits (B, T, V), labels (B, T) with -100 at padding. Rows whose
    target is ignore_index are dropped exactly as a bool mask drops them; 0/1 integer masks
    act as bool masks."""
    B, L, V = 2, 5, 33
    s, t = torch.randn(B, L, V), torch.randn(B, L, V) * 2
    labels = torch.randint(V, (B, L))
    labels[0, 3:] = -100
    labels[1, 0] = -100
    keep = labels != -100
    clean = torch.where(keep, labels, torch.zeros_like(labels))
    groups = torch.arange(V) % 3
    weight = torch.rand(V) + 0.1
    fn = {
        "kd": lambda **kw: lk.kd_loss(s, t, backend=backend, **kw),
        "ltkd": lambda **kw: lk.ltkd_loss(s, t, groups, 3, backend=backend, **kw),
        "dkd": lambda **kw: lk.dkd_loss(s, t, kw.pop("target", clean), backend=backend, **kw),
        "bkd": lambda **kw: lk.bkd_loss(s, t, weight, backend=backend, **kw),
    }[loss_name]
    by_ignore = fn(target=labels)
    if loss_name == "dkd":
        by_mask = fn(target=clean, mask=keep)
        by_int_mask = fn(target=clean, mask=keep.long())
    else:
        by_mask, by_int_mask = fn(mask=keep), fn(mask=keep.to(torch.uint8))
    torch.testing.assert_close(by_ignore, by_mask, rtol=1e-6, atol=1e-7)
    assert torch.equal(by_mask, by_int_mask)
    if loss_name == "bkd":  # with the cross-entropy: ignore_index rows add no CE either
        with_ce = lk.bkd_loss(s, t, weight, target=labels, ce_weight=1.0, reduction="none", backend=backend)
        assert (with_ce[~keep] == 0).all() and torch.isfinite(with_ce).all()


@with_backends()
@pytest.mark.parametrize("loss_name", ["kd", "ltkd", "dkd", "bkd"])
def test_gradient_accumulation_with_num_items_in_batch(loss_name, backend):
    """Micro-batches with unequal numbers of valid rows, each divided by the whole batch's
    count, sum to the full batch's loss and gradient (LTKD without rebalancing: its batch
    statistic is per call by definition)."""
    N, V = 10, 29
    s, t = torch.randn(N, V), torch.randn(N, V) * 2
    labels = torch.randint(V, (N,))
    labels[[1, 2, 3, 8]] = -100  # micro-batch 1 keeps 4 of 7 rows, micro-batch 2 keeps 2 of 3
    groups = torch.arange(V) % 4
    weight = torch.rand(V) + 0.1
    fn = {
        "kd": lambda x, y, **kw: lk.kd_loss(x, t[y[1]], target=y[0], backend=backend, **kw),
        "ltkd": lambda x, y, **kw: lk.ltkd_loss(x, t[y[1]], groups, 4, rebalance=False,
                                                target=y[0], backend=backend, **kw),
        "dkd": lambda x, y, **kw: lk.dkd_loss(x, t[y[1]], y[0], backend=backend, **kw),
        "bkd": lambda x, y, **kw: lk.bkd_loss(x, t[y[1]], weight, target=y[0], ce_weight=1.0,
                                              backend=backend, **kw),
    }[loss_name]
    full = s.clone().requires_grad_()
    loss_full = fn(full, (labels, slice(None)))
    loss_full.backward()
    count = int((labels != -100).sum())
    micro = s.clone().requires_grad_()
    total = 0.0
    for part in (slice(0, 7), slice(7, N)):
        piece = fn(micro[part], (labels[part], part), num_items_in_batch=count)
        piece.backward()
        total = total + piece.detach()
    torch.testing.assert_close(total, loss_full.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(micro.grad, full.grad, rtol=1e-5, atol=1e-8)
    # A tensor normaliser (as the Hugging Face trainer passes) gives the same.
    tensor_count = fn(s, (labels, slice(None)), num_items_in_batch=torch.tensor(count))
    torch.testing.assert_close(tensor_count, loss_full.detach(), rtol=1e-6, atol=1e-7)


@with_backends()
def test_batchmean_with_sample_weight_is_the_weighted_mean(backend):
    """SRW weights (summing to 1) with the default reduction give sum_i w_i l_i: batchmean
    divides by the valid rows' total weight (torch.nn.functional's weighted-mean convention)."""
    N, V = 12, 40
    s, t = torch.randn(N, V), torch.randn(N, V)
    weights = lk.srw_weights(torch.randn(N, 16), backend="torch")
    rows = lk.kd_loss(s, t, reduction="none", backend=backend)
    mean = lk.kd_loss(s, t, sample_weight=weights, backend=backend)
    torch.testing.assert_close(mean, (weights * rows).sum(), rtol=1e-5, atol=1e-7)
    arbitrary = torch.rand(N) * 3
    mask = torch.rand(N) > 0.3
    weighted = lk.kd_loss(s, t, sample_weight=arbitrary, mask=mask, backend=backend)
    expected = (arbitrary * rows)[mask].sum() / arbitrary[mask].sum()
    torch.testing.assert_close(weighted, expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Data parallel.

def _data_parallel_worker(rank, world, init_file, backend, out_dir):
    import faulthandler

    import torch.distributed as dist

    # A rare SIGABRT ("terminate called without an active exception") has killed this worker
    # early twice (CI and a local run of 2026-11-27, both the cpu backend, not reproduced in
    # 100 runs since): the Python stack of the next one goes to the test's captured stderr.
    faulthandler.enable()

    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    s, t, mask, groups = _data_parallel_batch()
    rows = slice(rank * 4, rank * 4 + 4)
    results = []
    for reduction, global_batchmean in (("sum", False), ("batchmean", True)):
        local = s[rows].clone().requires_grad_()
        out = lk.ltkd_loss(local, t[rows], groups, 4, mask=mask[rows], reduction=reduction,
                           process_group=dist.group.WORLD, global_batchmean=global_batchmean,
                           backend=backend)
        out.backward()
        results.append((out.detach(), local.grad))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    # Every rank done before any tears its connections down (gloo may abort a peer
    # whose connection closes under it).
    dist.barrier()
    dist.destroy_process_group()


def _data_parallel_batch():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 33, generator=g), torch.randn(8, 33, generator=g) * 2
    t[1, :8] -= 120.0  # a group mass far below float32's range on one rank
    mask = torch.ones(8, dtype=torch.bool)
    mask[5] = False
    return s, t, mask, torch.arange(33) % 4


@with_backends(("torch", "triton", "cpu"))
def test_process_group_equals_concatenated_batch(tmp_path, backend):
    """pB gathered over 2 processes (gloo): the shards' losses and gradients equal a single
    process on the concatenated batch ("sum" adds up; "batchmean" with global_batchmean is
    each rank's share of the global mean)."""
    import torch.multiprocessing as mp

    mp.spawn(_data_parallel_worker, args=(2, str(tmp_path / "init"), backend, str(tmp_path)),
             nprocs=2, join=True)
    shards = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    s, t, mask, groups = _data_parallel_batch()
    for i, reduction in enumerate(("sum", "batchmean")):
        full = s.clone().requires_grad_()
        total = lk.ltkd_loss(full, t, groups, 4, mask=mask, reduction=reduction, backend=backend)
        total.backward()
        torch.testing.assert_close(shards[0][i][0] + shards[1][i][0], total, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.cat([shards[0][i][1], shards[1][i][1]]), full.grad,
                                   rtol=1e-5, atol=1e-7)
