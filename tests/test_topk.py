"""Top-k (sparse) teachers: every rule and every loss against float64 equations written
independently of the package (tests/equations.py), on every backend."""
import pytest
import torch

import equations as eq
import ltkd_kernels as lk
from conftest import assert_grad_close, assert_loss_close, random_groups, with_backends

NEG_INF = float("-inf")


def _topk(teacher, k, pad=False, dtype=torch.float32):
    logprobs, indices = torch.log_softmax(teacher.double(), -1).topk(k, -1)
    logprobs = logprobs.to(dtype)
    if pad and k > 2:
        indices[0, -1] = -1              # a pad by index
        logprobs[-1, -2:] = NEG_INF      # pads by log-probability
    return indices, logprobs


def _masked_teacher(teacher, indices, logprobs, T):
    """The dense teacher that the renormalize rule means: lp / T on the entries, -inf off them
    (its softmax at temperature 1 is p̂)."""
    dense = torch.full(teacher.shape, NEG_INF, dtype=torch.float64)
    for r in range(teacher.shape[0]):
        keep = (indices[r] >= 0) & (logprobs[r] > NEG_INF)
        dense[r, indices[r][keep]] = logprobs[r][keep].double() / T
    return dense


def _grad_pair(call, rows64, student):
    s = student.clone().requires_grad_()
    out = call(s)
    (out.sum() if out.dim() else out).backward()
    s64 = student.double().requires_grad_()
    ref = rows64(s64)
    ref.sum().backward()
    return out, s.grad, ref.detach(), s64.grad


@with_backends()
@pytest.mark.parametrize("rest", ["renormalize", "restrict", "bucket"])
@pytest.mark.parametrize("vocab,k", [(37, 1), (37, 8), (1031, 64), (50, 50)])
def test_kd_rules_match_their_equations(rest, vocab, k, backend):
    rows = 4
    T = 1.0 if rest == "bucket" else 2.5
    student, teacher = torch.randn(rows, vocab) * 2, torch.randn(rows, vocab) * 3
    indices, logprobs = _topk(teacher, k, pad=True)
    top = lk.TopKTeacher(indices, logprobs, rest)
    out, grad, ref, grad64 = _grad_pair(
        lambda s: lk.kd_loss(s, top, temperature=T, reduction="none", backend=backend),
        lambda s: eq.topk_rows(s, indices, logprobs, T, rest), student)
    assert_loss_close(out, ref, scale=T * T)
    assert_grad_close(grad, grad64)
    if rest == "restrict":  # the student's mass off the top-k is free: no gradient there
        off = torch.ones_like(grad, dtype=torch.bool)
        for r in range(rows):
            off[r, indices[r][indices[r] >= 0]] = False
        assert torch.equal(grad[off], torch.zeros_like(grad[off]))


@with_backends()
@pytest.mark.parametrize("confidence", [20.0, 40.0, 80.0, 200.0])
def test_bucket_with_a_confident_student(confidence, backend):
    """The student's rest mass (off the teacher's top-k) is e^-confidence of the row: far below
    the resolution of 1 - top in any float format (and at 200, below float32's range relative
    to the row's max); the rest term r^T log(r^T / r^S) is still finite and exact, not inf."""
    rows, vocab, k = 3, 300, 4
    teacher = torch.randn(rows, vocab)
    indices, logprobs = _topk(teacher, k)
    student = torch.randn(rows, vocab)
    student.scatter_(1, indices, confidence + torch.rand(rows, k))
    top = lk.TopKTeacher(indices, logprobs, "bucket")
    out, grad, ref, grad64 = _grad_pair(
        lambda s: lk.kd_loss(s, top, reduction="none", backend=backend),
        lambda s: eq.topk_rows(s, indices, logprobs, 1.0, "bucket"), student)
    assert torch.isfinite(ref).all()
    assert_loss_close(out, ref)
    assert_grad_close(grad, grad64)


@with_backends()
@pytest.mark.parametrize("loss_name", ["kd", "ltkd", "ltkd_teacher", "dkd", "bkd"])
def test_renormalize_is_the_dense_loss_on_the_masked_teacher(loss_name, backend):
    """Renormalize = the dense loss whose teacher is -inf off the entries (every loss)."""
    rows, vocab, k, T = 5, 211, 16, 3.0
    student, teacher = torch.randn(rows, vocab) * 2, torch.randn(rows, vocab) * 3
    indices, logprobs = _topk(teacher, k, pad=True)
    dense64 = _masked_teacher(teacher, indices, logprobs, T) * T  # logits at T
    groups = random_groups(vocab, 3)
    target = torch.randint(vocab, (rows,))
    weight = torch.rand(vocab) + 0.1
    call, rows64 = {
        "kd": (lambda s, t: lk.kd_loss(s, t, temperature=T, reduction="none", backend=backend),
               lambda s: eq.kd_rows(s, dense64, T)),
        "ltkd": (lambda s, t: lk.ltkd_loss(s, t, groups, 3, temperature=T, reduction="none", backend=backend),
                 lambda s: eq.ltkd_rows(s, dense64, groups, 3, T)),
        "ltkd_teacher": (lambda s, t: lk.ltkd_loss(s, t, groups, 3, temperature=T, rebalance=False,
                                                   within_weight="teacher", reduction="none", backend=backend),
                         lambda s: eq.ltkd_rows(s, dense64, groups, 3, T, rebalance=False,
                                                within_weight="teacher")),
        "dkd": (lambda s, t: lk.dkd_loss(s, t, target, temperature=T, reduction="none", backend=backend),
                lambda s: eq.dkd_rows(s, dense64, target, T)),
        "bkd": (lambda s, t: lk.bkd_loss(s, t, weight, temperature=T, reduction="none", backend=backend),
                lambda s: eq.bkd_rows(s, dense64, weight, T)),
    }[loss_name]
    top = lk.TopKTeacher(indices, logprobs)
    out, grad, ref, grad64 = _grad_pair(lambda s: call(s, top), rows64, student)
    assert_loss_close(out, ref, scale=T * T)
    assert_grad_close(grad, grad64)


@with_backends()
@pytest.mark.parametrize("loss_name", ["kd", "ltkd", "dkd", "bkd"])
def test_k_equal_v_renormalize_is_the_dense_loss(loss_name, backend):
    rows, vocab, T = 3, 97, 2.0
    student, teacher = torch.randn(rows, vocab), torch.randn(rows, vocab) * 2
    indices, logprobs = _topk(teacher, vocab)
    groups = random_groups(vocab, 4)
    target = torch.randint(vocab, (rows,))
    weight = torch.rand(vocab) + 0.1
    call = {
        "kd": lambda t: lk.kd_loss(student, t, temperature=T, reduction="none", backend=backend),
        "ltkd": lambda t: lk.ltkd_loss(student, t, groups, 4, temperature=T, reduction="none", backend=backend),
        "dkd": lambda t: lk.dkd_loss(student, t, target, temperature=T, reduction="none", backend=backend),
        "bkd": lambda t: lk.bkd_loss(student, t, weight, temperature=T, reduction="none", backend=backend),
    }[loss_name]
    torch.testing.assert_close(call(lk.TopKTeacher(indices, logprobs)), call(teacher),
                               rtol=2e-5, atol=2e-6 * T * T)


@with_backends()
@pytest.mark.parametrize("within_weight", ["uniform", "teacher"])
def test_group_logmass_gives_the_exact_cross_term(within_weight, backend):
    """With the teacher's exact log group masses, LTKD from the top-k equals the dense LTKD
    when the entries hold every class with mass; with fewer entries, the cross term keeps the
    exact masses and each group's within term uses its entries renormalised in the group."""
    rows, vocab, T = 4, 120, 2.0
    student, teacher = torch.randn(rows, vocab) * 2, torch.randn(rows, vocab) * 3
    groups = random_groups(vocab, 3)
    options = dict(temperature=T, within_weight=within_weight, reduction="none", backend=backend)
    full = lk.topk_teacher(teacher, vocab, groups=groups, num_groups=3, temperature=T)
    torch.testing.assert_close(lk.ltkd_loss(student, full, groups, 3, **options),
                               lk.ltkd_loss(student, teacher, groups, 3, **options),
                               rtol=2e-5, atol=2e-6 * T * T)
    # Fewer entries: the float64 equation of the rule, written out here.
    k = 20
    part = lk.topk_teacher(teacher, k, groups=groups, num_groups=3, temperature=T)
    s = student.clone().requires_grad_()
    out = lk.ltkd_loss(s, part, groups, 3, **options)
    out.sum().backward()
    s64 = student.double().requires_grad_()
    expected = _group_logmass_rows(s64, part, groups, T, within_weight)
    expected.sum().backward()
    assert_loss_close(out, expected.detach(), scale=T * T)
    assert_grad_close(s.grad, s64.grad)


def _group_logmass_rows(s64, top, groups, T, within_weight):
    """LTKD with exact teacher group masses P (rebalanced) and per-group renormalised top-k
    entries as the within-group teachers, from probabilities."""
    rows, vocab = s64.shape
    G = 3
    ps = torch.softmax(s64 / T, -1)
    onehot = torch.nn.functional.one_hot(groups, G).double()
    mass_s = ps @ onehot
    mass_t = torch.exp(top.group_logmass.double())
    pb = mass_t.mean(0)
    scale = pb.mean() / pb
    q = scale * mass_t
    q = q / q.sum(-1, keepdim=True)
    cross = (q * torch.log(q / mass_s)).sum(-1)
    within = torch.zeros(rows, G, dtype=torch.float64)
    for r in range(rows):
        p_hat = torch.softmax(top.logprobs[r].double() / T, -1)
        for k in range(G):
            entries = groups[top.indices[r]] == k
            if not bool(entries.any()):
                continue
            pt = p_hat[entries] / p_hat[entries].sum()
            in_k = groups == k
            ps_k = ps[r][in_k] / ps[r][in_k].sum()
            position = torch.cumsum(in_k.long(), 0) - 1
            log_ps = torch.log(ps_k[position[top.indices[r][entries]]])
            within[r, k] = (pt * (torch.log(pt) - log_ps)).sum()
    c = torch.ones_like(mass_t) if within_weight == "uniform" else mass_t
    return T * T * (cross + (c * within).sum(-1))


@with_backends()
def test_topk_helper_and_bf16_logprobs(backend):
    """topk_teacher keeps the k most probable classes; bf16 log-probs (as an offline dataset
    stores them) give the loss of the rounded teacher."""
    student, teacher = torch.randn(3, 300), torch.randn(3, 300) * 2
    top = lk.topk_teacher(teacher, 32)
    expected = torch.log_softmax(teacher, -1).topk(32, -1)
    assert torch.equal(top.indices, expected.indices)
    torch.testing.assert_close(top.logprobs, expected.values)
    rounded = lk.TopKTeacher(top.indices.int(), top.logprobs.bfloat16())
    out = lk.kd_loss(student, rounded, reduction="none", backend=backend)
    ref = eq.topk_rows(student.double(), rounded.indices, rounded.logprobs.double(), 1.0)
    assert_loss_close(out, ref)


@with_backends(("triton", "cpu"))
def test_no_dense_teacher_is_built(backend):
    """The teacher costs N x k: nothing of N x V is allocated in the forward but what the
    caller passes (the gradient is the backward's)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    rows, vocab, k = 8, 4096, 16
    student, teacher = torch.randn(rows, vocab), torch.randn(rows, vocab)
    top = lk.topk_teacher(teacher, k)
    sizes = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.is_view:  # a view of the caller's tensor allocates nothing
                return out
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    sizes.append(t.numel())
            return out

    lk.kd_loss(student, top, backend=backend)  # warm-up
    with Allocations():
        lk.kd_loss(student, top, backend=backend)
    assert max(sizes, default=0) < rows * vocab // 4, max(sizes)
