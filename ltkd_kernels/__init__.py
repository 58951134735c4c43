"""ltkd_kernels: fused kernels for knowledge-distillation losses under long-tailed data.

Functional API (``torch.nn.functional`` style) and modules for LTKD, KD, DKD, BKD and SRW,
with Triton kernels (CUDA, or the CPU under ``TRITON_INTERPRET=1``), a C++ CPU backend and a
pure-PyTorch reference (:mod:`ltkd_kernels.reference`). Importing needs no GPU and no compiler.
"""
from . import reference
from .backends import available_backends, unavailable_reason
from .functional import bkd_loss, dkd_loss, group_logsumexp, kd_loss, ltkd_loss
from .groups import class_balanced_weights, groups_from_counts
from .linear import (fused_linear_bkd_loss, fused_linear_dkd_loss, fused_linear_kd_loss,
                     fused_linear_ltkd_loss)
from .linear_modules import (FusedLinearBKDLoss, FusedLinearDKDLoss, FusedLinearKDLoss,
                             FusedLinearLTKDLoss)
from .modules import BKDLoss, DKDLoss, KDLoss, LTKDLoss
from .srw import SRWeighting, srw_weights
from .ops.distributed import set_vocab_layout
from .topk import TopKTeacher, topk_teacher

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "unavailable_reason",
    "group_logsumexp",
    "kd_loss",
    "ltkd_loss",
    "dkd_loss",
    "bkd_loss",
    "class_balanced_weights",
    "groups_from_counts",
    "KDLoss",
    "LTKDLoss",
    "DKDLoss",
    "BKDLoss",
    "fused_linear_kd_loss",
    "fused_linear_ltkd_loss",
    "fused_linear_dkd_loss",
    "fused_linear_bkd_loss",
    "FusedLinearKDLoss",
    "FusedLinearLTKDLoss",
    "FusedLinearDKDLoss",
    "FusedLinearBKDLoss",
    "srw_weights",
    "SRWeighting",
    "set_vocab_layout",
    "TopKTeacher",
    "topk_teacher",
    "reference",
]
