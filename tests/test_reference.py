"""The reference itself: gradcheck in float64, and the count-based helpers against their formulas."""
import pytest
import torch

import ltkd_kernels as lk
from ltkd_kernels import reference as ref


def _inputs(n=3, vocab=11):
    s = (torch.randn(n, vocab, dtype=torch.float64) * 2).requires_grad_()
    t = torch.randn(n, vocab, dtype=torch.float64) * 2
    return s, t


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_gradcheck_reference_losses(reduction):
    s, t = _inputs()
    groups = torch.tensor([0, 1, 2, 0, 1, 2, 2, 2, 1, 0, 2])
    target = torch.tensor([0, 5, 10])
    weight = torch.rand(11, dtype=torch.float64) + 0.1
    mask = torch.tensor([True, False, True])
    sw = torch.rand(3, dtype=torch.float64)
    topk = lk.topk_teacher(t, 4)
    topk_groups = lk.topk_teacher(t, 4, groups=groups, num_groups=3, temperature=2.0)
    calls = [
        lambda x: ref.kd_loss(x, t, temperature=2.0, reduction=reduction),
        lambda x: ref.ltkd_loss(x, t, groups, temperature=3.0, alpha=0.5, beta=2.0, reduction=reduction),
        lambda x: ref.ltkd_loss(x, t, groups, within_weight="teacher", mask=mask, sample_weight=sw,
                                reduction=reduction),
        lambda x: ref.dkd_loss(x, t, target, reduction=reduction),
        lambda x: ref.bkd_loss(x, t, weight, target=target, ce_weight=1.0, reduction=reduction),
        lambda x: ref.kd_loss(x, t, target=torch.tensor([0, -100, 10]), ce_weight=0.5,
                              sample_weight=sw, reduction=reduction),
        lambda x: ref.ltkd_loss(x, t, groups, mask=torch.tensor([1, 1, 0]), num_items_in_batch=5,
                                reduction=reduction),
        lambda x: ref.kd_loss(x, topk, temperature=2.0, reduction=reduction),
        lambda x: ref.kd_loss(x, lk.TopKTeacher(topk.indices, topk.logprobs, "restrict"),
                              temperature=2.0, reduction=reduction),
        lambda x: ref.kd_loss(x, lk.TopKTeacher(topk.indices, topk.logprobs, "bucket"),
                              reduction=reduction),
        lambda x: ref.ltkd_loss(x, topk_groups, groups, 3, temperature=2.0, reduction=reduction),
        # group 3 is empty: its -inf column has no finite differences, so it is left out
        lambda x: ref.group_logsumexp(x, groups, 4, temperature=0.7)[..., :3],
    ]
    for call in calls:
        assert torch.autograd.gradcheck(call, (s,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_with_masked_vocabulary():
    s, t = _inputs(2, 9)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2])
    s.data[:, [2, 3, 4]] = float("-inf")  # a whole group masked in both models
    t[:, [2, 3, 4, 7]] = float("-inf")
    s.data[:, 7] = float("-inf")
    fn = lambda x: ref.ltkd_loss(x, t, groups, temperature=2.0)  # noqa: E731
    out = fn(s)
    assert torch.isfinite(out)
    out.backward()
    assert torch.isfinite(s.grad).all() and (s.grad[:, [2, 3, 4, 7]] == 0).all()


def test_groups_from_counts_equal_parts():
    counts = torch.tensor([5, 100, 7, 100, 30, 1, 60])
    groups = lk.groups_from_counts(counts, 3)
    # Descending by count, ties by index: 1 (100), 3 (100), 6 (60), 4 (30), 2 (7), 0 (5), 5 (1);
    # sizes 3, 2, 2.
    assert groups.dtype == torch.int64
    assert groups.tolist() == [2, 0, 1, 0, 1, 2, 0]
    assert lk.groups_from_counts([3, 2, 1], 1).tolist() == [0, 0, 0]
    assert lk.groups_from_counts([3, 2, 1], 3).tolist() == [0, 1, 2]
    sizes = torch.bincount(lk.groups_from_counts(torch.randint(1, 500, (101,)), 4))
    assert sizes.tolist() == [26, 25, 25, 25]


def test_groups_from_counts_thresholds():
    counts = [150, 101, 100, 20, 19, 0, 55]
    assert lk.groups_from_counts(counts, thresholds=(100, 20)).tolist() == [0, 0, 1, 1, 2, 2, 1]
    four = lk.groups_from_counts(counts, thresholds=(100, 50, 20))
    assert four.tolist() == [0, 0, 1, 2, 3, 3, 1]


@pytest.mark.parametrize("beta", [0.9999, 0.999, 0.0])
def test_class_balanced_weights_effective_number(beta):
    counts = torch.tensor([5000, 1200, 300, 40, 7, 1])
    w = lk.class_balanced_weights(counts, beta)
    n = counts.double()
    expected = (1 - beta) / (1 - beta ** n)
    expected = expected * len(counts) / expected.sum()
    assert w.dtype == torch.float32 and w.shape == (6,)
    torch.testing.assert_close(w.double(), expected, rtol=1e-6, atol=0)
    assert abs(w.sum().item() - 6) < 1e-5
    if beta == 0.0:
        assert torch.equal(w, torch.ones(6))
    else:
        assert (w[1:] > w[:-1]).all()  # rarer classes weigh more
