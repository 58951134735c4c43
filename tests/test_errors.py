"""Every bad input raises ValueError/TypeError naming the argument, on every backend."""
import pytest
import torch

import ltkd_kernels as lk
from conftest import with_backends
S, T = torch.randn(4, 10), torch.randn(4, 10)
GROUPS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
TOPK_L, TOPK_I = torch.log_softmax(T, -1).topk(3, -1)


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
        ("mask", TypeError, lambda b: lk.kd_loss(S, T, mask=torch.ones(4, dtype=torch.complex64), backend=b)),
        ("ignore_index", TypeError, lambda b: lk.kd_loss(S, T, ignore_index=1.5, backend=b)),
        ("ce_weight", ValueError, lambda b: lk.kd_loss(S, T, ce_weight=1.0, backend=b)),
        ("ce_weight", ValueError, lambda b: lk.kd_loss(S, T, ce_weight=float("nan"), target=target, backend=b)),
        ("num_items_in_batch", ValueError, lambda b: lk.kd_loss(S, T, num_items_in_batch=0, backend=b)),
        ("num_items_in_batch", TypeError, lambda b: lk.kd_loss(S, T, num_items_in_batch="4", backend=b)),
        ("num_items_in_batch", ValueError, lambda b: lk.kd_loss(S, T, num_items_in_batch=torch.ones(2), backend=b)),
        ("process_group", TypeError, lambda b: lk.ltkd_loss(S, T, GROUPS, process_group="world", backend=b)),
        ("vocab_process_group", TypeError, lambda b: lk.kd_loss(S, T, vocab_process_group=1, backend=b)),
        ("global_batchmean", TypeError, lambda b: lk.kd_loss(S, T, global_batchmean=1, backend=b)),
        ("num_groups", ValueError, lambda b: lk.ltkd_loss(S, T, GROUPS, 2 ** 16 + 1, backend=b)),
        ("num_groups", ValueError, lambda b: lk.ltkd_loss(S, T, GROUPS, 2 ** 24, backend=b)),
        ("groups", ValueError, lambda b: lk.ltkd_loss(S, T, GROUPS * 1000, backend=b)),
        ("teacher_logits.indices", ValueError, lambda b: lk.kd_loss(S, lk.TopKTeacher(TOPK_I[:3], TOPK_L[:3]), backend=b)),
        ("teacher_logits.indices", TypeError, lambda b: lk.kd_loss(S, lk.TopKTeacher(TOPK_I.float(), TOPK_L), backend=b)),
        ("teacher_logits.logprobs", ValueError, lambda b: lk.kd_loss(S, lk.TopKTeacher(TOPK_I, TOPK_L[:, :2]), backend=b)),
        ("teacher_logits.rest", ValueError, lambda b: lk.kd_loss(S, lk.TopKTeacher(TOPK_I, TOPK_L, "drop"), backend=b)),
        ("temperature=1.0", ValueError, lambda b: lk.kd_loss(S, lk.TopKTeacher(TOPK_I, TOPK_L, "bucket"), temperature=2.0, backend=b)),
        ("kd_loss only", ValueError, lambda b: lk.ltkd_loss(S, lk.TopKTeacher(TOPK_I, TOPK_L, "bucket"), GROUPS, backend=b)),
        ("group_logmass", ValueError, lambda b: lk.ltkd_loss(S, lk.TopKTeacher(TOPK_I, TOPK_L, group_logmass=torch.zeros(4, 2)), GROUPS, backend=b)),
        ("mask", ValueError, lambda b: lk.kd_loss(S, T, mask=torch.ones(5, dtype=torch.bool), backend=b)),
        ("groups", TypeError, lambda b: lk.ltkd_loss(S, T, GROUPS.float(), backend=b)),
        ("groups", ValueError, lambda b: lk.ltkd_loss(S, T, GROUPS[:9], backend=b)),
        ("groups", ValueError, lambda b: lk.ltkd_loss(S, T, GROUPS - 1, backend=b)),
        ("groups", ValueError, lambda b: lk.ltkd_loss(S, T, GROUPS, 2, backend=b)),
        ("num_groups", ValueError, lambda b: lk.ltkd_loss(S, T, GROUPS, 0, backend=b)),
        ("within_weight", ValueError, lambda b: lk.ltkd_loss(S, T, GROUPS, within_weight="x", backend=b)),
        ("alpha", TypeError, lambda b: lk.ltkd_loss(S, T, GROUPS, alpha=None, backend=b)),
        ("target", TypeError, lambda b: lk.dkd_loss(S, T, target.float(), backend=b)),
        ("target", ValueError, lambda b: lk.dkd_loss(S, T, target[:3], backend=b)),
        ("class_weight", ValueError, lambda b: lk.bkd_loss(S, T, w[:9], backend=b)),
        ("class_weight", ValueError, lambda b: lk.bkd_loss(S, T, -w, backend=b)),
        ("class_weight", ValueError, lambda b: lk.bkd_loss(S, T, torch.zeros(10), backend=b)),
        ("class_weight", TypeError, lambda b: lk.bkd_loss(S, T, torch.ones(10, dtype=torch.long), backend=b)),
        ("backend", ValueError, lambda b: lk.kd_loss(S, T, backend="cuda")),
    ]


def _bad_index_values():
    """Per-step indices with bad values: ValueError on the CPU backends (checked in the C++
    kernel and in the plain-torch operators without extra ops); the Triton kernels, which
    cannot raise without a host synchronisation, make the row's loss NaN (docs/design.md)."""
    target = torch.tensor([0, 1, 2, 3])
    w = torch.rand(10)
    topk_l, topk_i = TOPK_L.clone(), TOPK_I.clone()
    topk_i[2, 1] = 10
    dup_l, dup_i = TOPK_L.clone(), TOPK_I.clone()
    dup_i[1, 2] = dup_i[1, 0]
    return [
        ("target", lambda b: lk.kd_loss(S, T, target=target * 10, reduction="none", backend=b)),
        ("target", lambda b: lk.dkd_loss(S, T, target + 7, reduction="none", backend=b)),
        ("target", lambda b: lk.dkd_loss(S, T, target - 1, reduction="none", backend=b)),
        ("target", lambda b: lk.bkd_loss(S, T, w, target=target * 10, ce_weight=1.0,
                                         reduction="none", backend=b)),
        ("indices", lambda b: lk.kd_loss(S, lk.TopKTeacher(topk_i, topk_l), reduction="none", backend=b)),
        ("indices", lambda b: lk.kd_loss(S, lk.TopKTeacher(dup_i, dup_l), reduction="none", backend=b)),
    ]


@with_backends()
@pytest.mark.parametrize("index", range(len(_bad_index_values())))
def test_bad_index_values(index, backend, request):
    name, call = _bad_index_values()[index]
    if "triton" in request.node.callspec.id:
        rows = call(backend)
        assert bool(torch.isnan(rows).any()), "a bad index must give NaN on Triton"
    else:
        with pytest.raises(ValueError, match=name):
            call(backend)


@with_backends()
@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input_raises_naming_argument(index, backend):
    name, error, call = _bad_calls()[index]
    with pytest.raises(error, match=name):
        call(backend)


@with_backends(("triton", "cpu"))
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
