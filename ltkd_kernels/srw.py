"""SRW (sample-wise re-weighting): per-sample loss weights from the teacher's features.

Samples whose teacher feature is least similar to the rest of the batch get the largest
weight. From teacher features ``f`` (docs/losses.md), over the valid samples ``j`` of a
batch (``n`` of them), or of one image's patches::

    fh_i     = f_i / max(||f_i||, eps)
    avesim_i = (1/n) sum_j fh_i . fh_j = fh_i . m,   m = (1/n) sum_j fh_j
    w_i      = softmax over the batch (image) of (-avesim_i / tau)

``avesim_i`` is the mean of row ``i`` of the paper's ``n x n`` cosine matrix, computed as one
dot product with the mean normalised feature: O(N D) time on every backend, never the
``n x n`` matrix. The weights sum to 1 per batch (image), carry no gradient,
and are used as ``L = sum_i w_i l_i``::

    w = lk.srw_weights(teacher_features)                       # (N,)
    loss = lk.kd_loss(student_logits, teacher_logits, sample_weight=w, reduction="sum")

Backends: ``"triton"`` (two-stage reductions over chunks of rows: two reads of the features),
``"cpu"`` (C++, when built), ``"torch"`` (:func:`ltkd_kernels.reference.srw_weights`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import reference
from ._validation import check_positive, check_srw_arguments
from .backends import BACKENDS, resolve_backend

__all__ = ["srw_weights", "SRWeighting"]


def _triton_srw_weights_impl(features, mask, tau, eps):
    # Imported on first call: registering the operator below needs no Triton.
    from .triton.srw_launchers import srw_weights_impl

    return srw_weights_impl(features, mask, tau, eps)


@torch.library.custom_op("ltkd_kernels::srw_weights_triton", mutates_args=())
def _srw_weights_triton(features: Tensor, mask: Optional[Tensor], tau: float, eps: float) -> Tensor:
    """The Triton ``srw_weights_impl`` as a custom operator, registered when this module is
    imported, so that :func:`srw_weights` works under ``torch.compile`` without graph breaks."""
    return _triton_srw_weights_impl(features, mask, tau, eps)


@_srw_weights_triton.register_fake
def _(features, mask, tau, eps):
    return features.new_empty(features.shape[:-1], dtype=torch.float32)


def _srw_weights_kernel(backend: str):
    """The backend's ``srw_weights_impl(features (B, P, D), mask (B, P) or None, tau, eps)
    -> (B, P) float32``. The C++ backend's is its own custom operator
    (``ltkd_kernels::srw_weights_cpu``, see :mod:`ltkd_kernels.cpu`)."""
    if backend == "triton":
        return _srw_weights_triton
    from . import cpu

    return cpu.srw_weights_impl


def srw_weights(features, *, tau=1.0, mask=None, eps=1e-8, backend="auto"):
    """SRW weights ``w = softmax(-avesim / tau)`` of teacher features, in O(N D).

    Args:
        features: teacher features, ``(N, D)`` (one batch) or ``(B, P, D)`` (``B`` images of
            ``P`` patches; each image is weighted on its own over its patches); float32,
            float16 or bfloat16 (float64 on ``backend="torch"``). Never modified; any strides.
        tau: softmax temperature, ``> 0``; smaller makes the weights more peaked.
        mask: optional bool tensor of the leading shape (``(N,)`` or ``(B, P)``), True = valid.
            A masked (padded) sample gets weight 0 and takes no part in the means; its feature
            values are never used. An image with no valid patch gets all-zero weights.
        eps: floor of the feature norm: a zero feature gets the cosine 0 with everything.
        backend: ``"auto"``, ``"triton"``, ``"cpu"`` or ``"torch"`` (see
            :func:`ltkd_kernels.available_backends`).

    Returns:
        float32 weights of the leading shape (float64 for float64 features), summing to 1 over
        each batch (image), without gradient. Intended use, ``L = sum_i w_i l_i``::

            loss = lk.kd_loss(s, t, sample_weight=lk.srw_weights(feats), reduction="sum")

    See :func:`ltkd_kernels.reference.srw_weights` for the equations.
    """
    tau, eps = check_srw_arguments(features, tau, mask, eps)
    if backend == "auto" and features.dtype == torch.float64:
        resolved = "torch"  # the kernels compute in float32; float64 stays exact
    else:
        resolved = resolve_backend(backend, features.device, build=True)
    if resolved == "torch":
        return reference.srw_weights(features, tau=tau, mask=mask, eps=eps)
    if features.dtype == torch.float64:
        raise TypeError(f"float64 features are supported by backend='torch' only (the kernels "
                        f"compute in float32); got backend={backend!r} -> {resolved!r}")
    batched = features.detach()
    batched = batched if batched.dim() == 3 else batched.unsqueeze(0)
    if batched.stride(-1) != 1:
        batched = batched.contiguous()
    batched_mask = None
    if mask is not None:
        batched_mask = (mask if mask.dim() == 2 else mask.unsqueeze(0)).contiguous()
    with torch.no_grad():
        weights = _srw_weights_kernel(resolved)(batched, batched_mask, tau, eps)
    return weights.reshape(features.shape[:-1])


class SRWeighting(nn.Module):
    """:func:`srw_weights` as a module: ``forward(features, mask=None)`` returns the weights.

    Example (one line in a training loop)::

        srw = lk.SRWeighting(tau=1.0)
        kd = lk.KDLoss(temperature=4.0, reduction="sum")
        for images, labels in loader:
            with torch.no_grad():
                teacher_features, teacher_logits = teacher(images)
            student_logits = student(images)
            loss = F.cross_entropy(student_logits, labels) + kd(
                student_logits, teacher_logits, sample_weight=srw(teacher_features))
    """

    def __init__(self, tau: float = 1.0, *, eps: float = 1e-8, backend: str = "auto"):
        super().__init__()
        self.tau = check_positive("tau", tau)
        self.eps = check_positive("eps", eps)
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; "
                             f"got {backend!r}")
        self.backend = backend

    def forward(self, features: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return srw_weights(features, tau=self.tau, mask=mask, eps=self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, eps={self.eps}, backend={self.backend!r}"
