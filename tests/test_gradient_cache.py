"""The C++ backend's cache of gradient buffers (csrc/gradient_cache.h): a freed gradient's
buffer is handed out again, never while any tensor refers to it; the values are those of a
fresh computation; the limit, empty_cache and the environment switch work; torch.profiler's
memory profiling still sees the gradient."""
import os
import subprocess
import sys

import pytest
import torch

import ltkd_kernels as lk

cpu = pytest.importorskip("ltkd_kernels.cpu")
if cpu.unavailable_reason() is not None:  # pragma: no cover - no compiler here
    pytest.skip(f"C++ backend unavailable: {cpu.unavailable_reason()}", allow_module_level=True)

# 70 x 1001 float32 = 280 KB: above the cache's 256 KiB minimum; odd V.
ROWS, VOCAB = 70, 1001
GROUPS = torch.arange(VOCAB) % 3


@pytest.fixture(autouse=True)
def fresh_cache():
    cpu.set_gradient_cache_limit(2)
    cpu.empty_cache()
    yield
    cpu.set_gradient_cache_limit(2)
    cpu.empty_cache()


def _inputs(seed, rows=ROWS, vocab=VOCAB):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=generator).requires_grad_(True)
    teacher = torch.randn(rows, vocab, generator=generator)
    return student, teacher


def _gradient(seed, backend="cpu", rows=ROWS, vocab=VOCAB):
    student, teacher = _inputs(seed, rows, vocab)
    loss = lk.ltkd_loss(student, teacher, GROUPS[:vocab], 3, temperature=2.0, rebalance=True,
                        backend=backend)
    return torch.autograd.grad(loss, student)[0]


def test_freed_gradient_buffer_is_reused_with_fresh_values():
    first = _gradient(0)
    address = first.data_ptr()
    torch.testing.assert_close(first, _gradient(0, backend="torch"), rtol=1e-5, atol=1e-7)
    del first
    hits = cpu.gradient_cache_info()["hits"]
    second = _gradient(1)
    assert second.data_ptr() == address
    assert cpu.gradient_cache_info()["hits"] == hits + 1
    # Every element rewritten: no stale value of the first gradient survives.
    torch.testing.assert_close(second, _gradient(1, backend="torch"), rtol=1e-5, atol=1e-7)


def test_live_gradient_or_view_is_never_handed_out():
    first = _gradient(0)
    kept = first.clone()
    view = first[5:]
    del first  # the view still holds the buffer
    second = _gradient(1)
    assert second.data_ptr() != view.data_ptr() - 5 * VOCAB * 4
    torch.testing.assert_close(view, kept[5:], rtol=0, atol=0)
    third = _gradient(2)  # both buffers live: a third one
    assert len({view.data_ptr() - 5 * VOCAB * 4, second.data_ptr(), third.data_ptr()}) == 3
    torch.testing.assert_close(view, kept[5:], rtol=0, atol=0)


def test_leaf_gradient_accumulates_and_frees_into_the_cache():
    student, teacher = _inputs(0)
    for _ in range(2):  # the second backward adds into .grad
        lk.kd_loss(student, teacher, temperature=2.0, backend="cpu").backward()
    want = 2 * _gradient_kd(student, teacher)
    torch.testing.assert_close(student.grad, want, rtol=1e-5, atol=1e-7)
    student.grad = None
    assert cpu.gradient_cache_info()["free_buffers"] >= 1


def _gradient_kd(student, teacher):
    s = student.detach().requires_grad_(True)
    loss = lk.kd_loss(s, teacher, temperature=2.0, backend="torch")
    return torch.autograd.grad(loss, s)[0]


def test_at_most_limit_free_buffers_and_empty_cache():
    grads = [_gradient(i) for i in range(4)]
    sizes = grads[0].numel() * 4
    del grads
    info = cpu.gradient_cache_info()
    assert info["free_buffers"] == 2 and info["free_bytes"] == 2 * sizes
    cpu.empty_cache()
    info = cpu.gradient_cache_info()
    assert info["free_buffers"] == 0 and info["free_bytes"] == 0


def test_byte_limit():
    size = ROWS * VOCAB * 4
    cpu.set_gradient_cache_limit(2, max_bytes=size + size // 2)  # room for one buffer
    grads = [_gradient(i) for i in range(3)]
    del grads
    info = cpu.gradient_cache_info()
    assert (info["free_buffers"], info["free_bytes"], info["max_bytes"]) == (1, size, size + size // 2)
    cpu.set_gradient_cache_limit(2, max_bytes=size - 1)  # no buffer fits: freed now, never kept
    assert cpu.gradient_cache_info()["free_buffers"] == 0
    _gradient(0)
    assert cpu.gradient_cache_info()["free_buffers"] == 0
    with pytest.raises(ValueError, match="max_bytes"):
        cpu.set_gradient_cache_limit(2, max_bytes=-1)


def test_limit_zero_turns_the_cache_off():
    cpu.set_gradient_cache_limit(0)
    hits = cpu.gradient_cache_info()["hits"]
    _gradient(0)  # freed at once
    grad = _gradient(1)
    torch.testing.assert_close(grad, _gradient(1, backend="torch"), rtol=1e-5, atol=1e-7)
    del grad
    info = cpu.gradient_cache_info()
    assert info["free_buffers"] == 0 and info["hits"] == hits
    with pytest.raises(ValueError, match="buffers"):
        cpu.set_gradient_cache_limit(-1)


def test_small_gradients_bypass_the_cache():
    before = cpu.gradient_cache_info()
    grad = _gradient(0, rows=3, vocab=17)
    del grad
    after = cpu.gradient_cache_info()
    assert (after["hits"], after["misses"], after["free_buffers"]) == (
        before["hits"], before["misses"], before["free_buffers"])


def test_cached_gradient_can_be_resized():
    grad = _gradient(0)
    grad.resize_(2 * ROWS, VOCAB)  # a resizable storage, like the default allocator's
    grad.fill_(1.0)
    assert grad.sum().item() == 2 * ROWS * VOCAB


def test_profiler_memory_sees_the_gradient():
    from torch.profiler import ProfilerActivity, profile

    _gradient(0)  # a free buffer in the cache: the profiled call reuses it
    student, teacher = _inputs(1)
    loss = lk.ltkd_loss(student, teacher, GROUPS, 3, backend="cpu")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        grad = torch.autograd.grad(loss, student)[0]
    sizes = [event.nbytes() for event in prof.profiler.kineto_results.events()
             if event.name() == "[memory]"]
    assert grad.numel() * 4 in sizes


def test_environment_variable_sets_the_limit():
    code = ("import ltkd_kernels.cpu as c; c.load(); print(c.gradient_cache_info()['limit'])")
    env = dict(os.environ, LTKD_KERNELS_CPU_GRAD_CACHE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "0"
