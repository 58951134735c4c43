"""Every bad input raises ValueError/TypeError naming the argument, on every backend."""
import pytest
import torch

import ltkd_kernels as lk
from conftest import kernel_backends

BACKENDS = [pytest.param("torch")] + kernel_backends()
S, T = torch.randn(4, 10), torch.randn(4, 10)
GROUPS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])


def _bad_calls():
    target = torch.tensor([0, 1, 2, 3])
    w = torch.rand(10)
    return [
        ("student_logits", TypeError, lambda b: lk.kd_loss(S.numpy(), T, backend=b)),
        ("student_logits", TypeError, lambda b: lk.kd_loss(S.long(), T, backend=b)),
        ("same shape", ValueError, lambda b: lk.kd_loss(S, T[:, :9], backend=b)),
        ("V >= 1", ValueError, lambda b: lk.kd_loss(S[:, :0], T[:, :0], backend=b)),
        ("temperature", ValueError, lambda b: lk.kd_loss(S, T, temperature=-1.0, backend=b)),
        ("temperature", ValueError, lambda b: lk.kd_loss(S, T, temperature=0.0, backend=b)),
        ("temperature", TypeError, lambda b: lk.kd_loss(S, T, temperature="2", backend=b)),
        ("reduction", ValueError, lambda b: lk.kd_loss(S, T, reduction="mean", backend=b)),
        ("sample_weight", ValueError, lambda b: lk.kd_loss(S, T, sample_weight=torch.ones(3), backend=b)),
        ("sample_weight", TypeError, lambda b: lk.kd_loss(S, T, sample_weight=torch.ones(4, dtype=torch.long), backend=b)),
        ("mask", TypeError, lambda b: lk.kd_loss(S, T, mask=torch.ones(4), backend=b)),
        ("mask", ValueError, lambda b: lk.kd_loss(S, T, mask=torch.ones(5, dtype=torch.bool), backend=b)),
        ("groups", TypeError, lambda b: lk.ltkd_loss(S, T, GROUPS.float(), backend=b)),
        ("groups", ValueError, lambda b: lk.ltkd_loss(S, T, GROUPS[:9], backend=b)),
        ("groups", ValueError, lambda b: lk.ltkd_loss(S, T, GROUPS - 1, backend=b)),
        ("groups", ValueError, lambda b: lk.ltkd_loss(S, T, GROUPS, 2, backend=b)),
        ("num_groups", ValueError, lambda b: lk.ltkd_loss(S, T, GROUPS, 0, backend=b)),
        ("within_weight", ValueError, lambda b: lk.ltkd_loss(S, T, GROUPS, within_weight="x", backend=b)),
        ("alpha", TypeError, lambda b: lk.ltkd_loss(S, T, GROUPS, alpha=None, backend=b)),
        ("target", ValueError, lambda b: lk.dkd_loss(S, T, target + 7, backend=b)),
        ("target", ValueError, lambda b: lk.dkd_loss(S, T, target - 1, backend=b)),
        ("target", TypeError, lambda b: lk.dkd_loss(S, T, target.float(), backend=b)),
        ("target", ValueError, lambda b: lk.dkd_loss(S, T, target[:3], backend=b)),
        ("target", ValueError, lambda b: lk.bkd_loss(S, T, w, target=target * 10, backend=b)),
        ("class_weight", ValueError, lambda b: lk.bkd_loss(S, T, w[:9], backend=b)),
        ("class_weight", ValueError, lambda b: lk.bkd_loss(S, T, -w, backend=b)),
        ("class_weight", ValueError, lambda b: lk.bkd_loss(S, T, torch.zeros(10), backend=b)),
        ("class_weight", TypeError, lambda b: lk.bkd_loss(S, T, torch.ones(10, dtype=torch.long), backend=b)),
        ("backend", ValueError, lambda b: lk.kd_loss(S, T, backend="cuda")),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input_raises_naming_argument(index, backend):
    name, error, call = _bad_calls()[index]
    with pytest.raises(error, match=name):
        call(backend)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if getattr(b, "values", [b])[0] != "torch"])
def test_float64_needs_the_reference(backend):
    with pytest.raises(TypeError, match="float64"):
        lk.kd_loss(S.double(), T.double(), backend=backend)
    assert torch.isfinite(lk.kd_loss(S.double(), T.double(), backend="torch"))


def test_count_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="class_counts"):
        lk.class_balanced_weights([3, 0, 2])
    with pytest.raises(ValueError, match="beta"):
        lk.class_balanced_weights([3, 2], beta=1.0)
    with pytest.raises(ValueError, match="class_counts"):
        lk.groups_from_counts([])
    with pytest.raises(ValueError, match="num_groups"):
        lk.groups_from_counts([3, 2], 3)
    with pytest.raises(ValueError, match="thresholds"):
        lk.groups_from_counts([3, 2], thresholds=(2, 5))
    with pytest.raises(TypeError, match="class_counts"):
        lk.groups_from_counts("abc")


def test_groups_checked_again_after_in_place_change():
    groups = GROUPS.clone()
    lk.ltkd_loss(S, T, groups, backend="torch")
    groups[0] = 7
    lk.ltkd_loss(S, T, groups, backend="torch")  # now G = 8: still valid without num_groups
    with pytest.raises(ValueError, match="groups"):
        lk.ltkd_loss(S, T, groups, 3, backend="torch")
