"""Modules, backend selection, torch.compile and data-parallel LTKD."""
import os
import subprocess
import sys

import pytest
import torch

import ltkd_kernels as lk
from conftest import kernel_backends

BACKENDS = [pytest.param("torch")] + kernel_backends()


def test_available_backends_and_auto():
    names = lk.available_backends()
    assert "torch" in names
    assert ("triton" in names) == (lk.unavailable_reason("triton") is None)
    for name in ("triton", "cpu"):
        reason = lk.unavailable_reason(name)
        assert reason is None or (isinstance(reason, str) and reason)
    # "auto" on a CPU tensor: the C++ backend when it is available, else the reference.
    from ltkd_kernels.backends import resolve_backend

    expected = "cpu" if "cpu" in names else "torch"
    assert resolve_backend("auto", torch.device("cpu")) == expected


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        lk.kd_loss(torch.randn(2, 5), torch.randn(2, 5), backend="triton")
    # the other backends are unaffected
    lk.kd_loss(torch.randn(2, 5), torch.randn(2, 5), backend="torch")


def test_import_needs_no_gpu_and_no_triton_kernels():
    code = ("import sys, ltkd_kernels; "
            "assert 'ltkd_kernels.triton' not in sys.modules; "
            "assert 'triton' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_match_functional(backend):
    s, t = torch.randn(2, 3, 40), torch.randn(2, 3, 40)
    counts = torch.randint(1, 300, (40,))
    groups = lk.groups_from_counts(counts, 3)
    target = torch.randint(40, (2, 3))
    weight = lk.class_balanced_weights(counts)
    pairs = [
        (lk.KDLoss(temperature=2.0, backend=backend), lambda: lk.kd_loss(s, t, temperature=2.0, backend=backend), ()),
        (lk.LTKDLoss(groups, temperature=4.0, backend=backend),
         lambda: lk.ltkd_loss(s, t, groups, 3, temperature=4.0, backend=backend), ()),
        (lk.DKDLoss(backend=backend), lambda: lk.dkd_loss(s, t, target, backend=backend), (target,)),
        (lk.BKDLoss(weight, backend=backend),
         lambda: lk.bkd_loss(s, t, weight, target=target, backend=backend), (target,)),
    ]
    for module, functional, extra in pairs:
        assert torch.equal(module(s, t, *extra), functional())
        assert backend in repr(module)
    ltkd = lk.LTKDLoss(groups, backend=backend)
    assert torch.equal(ltkd.groups, groups) and "groups" in dict(ltkd.named_buffers())
    mask = torch.tensor([[True, False, True], [True, True, False]])
    out = lk.LTKDLoss(groups, reduction="none", backend=backend)(s, t, mask=mask)
    assert out.shape == (2, 3) and (out[~mask] == 0).all()


def test_ltkd_module_state_dict_round_trip():
    groups = torch.tensor([0, 1, 2, 1, 0])
    m = lk.LTKDLoss(groups)
    m2 = lk.LTKDLoss(torch.zeros(5, dtype=torch.long), num_groups=3)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.groups, groups)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile(backend):
    """The kernels are custom ops: a compiled loss matches eager, forward and backward."""
    groups = torch.tensor([0, 1, 2] * 7)

    def step(s, t):
        return lk.ltkd_loss(s, t, groups, 3, temperature=2.0, backend=backend)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=False)
    s, t = torch.randn(4, 21), torch.randn(4, 21)
    a = s.clone().requires_grad_()
    b = s.clone().requires_grad_()
    eager_loss = step(a, t)
    eager_loss.backward()
    compiled_loss = compiled(b, t)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-8)


def _data_parallel_worker(rank, world, init_file, backend, out_dir):
    import torch.distributed as dist

    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    s, t, mask, groups = _data_parallel_batch()
    rows = slice(rank * 4, rank * 4 + 4)
    local = s[rows].clone().requires_grad_()
    out = lk.ltkd_loss(local, t[rows], groups, 4, mask=mask[rows], reduction="sum",
                       process_group=dist.group.WORLD, backend=backend)
    out.backward()
    torch.save((out.detach(), local.grad), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _data_parallel_batch():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 33, generator=g), torch.randn(8, 33, generator=g) * 2
    mask = torch.ones(8, dtype=torch.bool)
    mask[5] = False
    return s, t, mask, torch.arange(33) % 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_process_group_equals_concatenated_batch(tmp_path, backend):
    """pB all-reduced over 2 processes (gloo): the shards' losses and gradients equal a single
    process on the concatenated batch (reduction="sum", so the shards add up)."""
    import torch.multiprocessing as mp

    mp.spawn(_data_parallel_worker, args=(2, str(tmp_path / "init"), backend, str(tmp_path)),
             nprocs=2, join=True)
    shards = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    s, t, mask, groups = _data_parallel_batch()
    full = s.clone().requires_grad_()
    total = lk.ltkd_loss(full, t, groups, 4, mask=mask, reduction="sum", backend=backend)
    total.backward()
    torch.testing.assert_close(shards[0][0] + shards[1][0], total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat([shards[0][1], shards[1][1]]), full.grad, rtol=1e-6, atol=1e-7)
