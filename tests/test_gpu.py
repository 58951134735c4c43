"""GPU-only cases: compiled Triton kernels on CUDA at realistic sizes. Skipped without CUDA.

Not run in CI (no GPU there); run them on a GPU machine with ``python -m pytest tests/test_gpu.py``.
"""
import pytest
import torch

import ltkd_kernels as lk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _rel(a, b):
    return (torch.linalg.vector_norm((a.double() - b.double()).flatten())
            / torch.linalg.vector_norm(b.double().flatten())).item()


@pytest.mark.parametrize("vocab", [1, 1031, 32000, 128256, 256000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["kd", "ltkd", "dkd", "bkd"])
def test_triton_cuda_matches_reference(loss, dtype, vocab):
    n = 64
    s = (torch.randn(n, vocab, device="cuda") * 3).to(dtype)
    t = (torch.randn(n, vocab, device="cuda") * 3).to(dtype)
    groups = torch.randint(0, 3, (vocab,), device="cuda")
    target = torch.randint(vocab, (n,), device="cuda")
    weight = torch.rand(vocab, device="cuda") + 0.05
    calls = {
        "kd": lambda x, b: lk.kd_loss(x, t, temperature=2.0, backend=b),
        "ltkd": lambda x, b: lk.ltkd_loss(x, t, groups, 3, temperature=4.0, backend=b),
        "dkd": lambda x, b: lk.dkd_loss(x, t, target, backend=b),
        "bkd": lambda x, b: lk.bkd_loss(x, t, weight, target=target, backend=b),
    }
    out = {}
    for backend in ("torch", "triton"):
        x = s.clone().requires_grad_()
        value = calls[loss](x, backend)
        value.backward()
        out[backend] = (value, x.grad)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _rel(out["triton"][0], out["torch"][0]) <= 1e-5
    assert _rel(out["triton"][1], out["torch"][1]) <= tol


def test_int64_offsets_past_2_pow_31_elements():
    """N x V > 2^31 elements: row offsets must be int64 (bf16 keeps this at ~9 GB)."""
    n, vocab = 16800, 128256  # 2.15e9 elements
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * vocab * 2 + (1 << 30):
        pytest.skip("not enough GPU memory for a 2^31-element case")
    s = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16)
    rows = lk.kd_loss(s, t, reduction="none", backend="triton")
    last = slice(n - 2, n)
    expected = lk.kd_loss(s[last], t[last], reduction="none", backend="torch")
    torch.testing.assert_close(rows[last], expected, rtol=1e-5, atol=1e-6)


def test_no_host_sync_in_ltkd_forward_backward():
    """With the groups already checked (as a module's buffer is), the loss never syncs."""
    s = torch.randn(256, 32000, device="cuda", requires_grad=True)
    t = torch.randn(256, 32000, device="cuda")
    criterion = lk.LTKDLoss(torch.randint(0, 3, (32000,)), num_groups=3).cuda()
    criterion(s, t).backward()  # first call checks the groups buffer once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        criterion(s, t).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
