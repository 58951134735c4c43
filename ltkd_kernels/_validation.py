"""Argument checks shared by every backend: clear ValueError/TypeError naming the argument.

Value checks that need the data (group ids, targets) read it on the host. For a ``groups``
tensor this is done once per tensor version (modules hold ``groups`` as a buffer, so a training
loop pays it once); under ``torch.compile`` the value checks are skipped to keep the graph whole.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # older torch
        return False


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_option(name: str, value, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if value != value or abs(value) == float("inf"):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_logits_pair(student, teacher, *, allow_float64: bool = False,
                      names=("student_logits", "teacher_logits")) -> None:
    """Both logits: tensors of shape ``(..., V)``, V >= 1, the same shape and device, float dtype."""
    allowed = LOGIT_DTYPES + ((torch.float64,) if allow_float64 else ())
    for name, x in zip(names, (student, teacher)):
        check_tensor(name, x)
        if x.dtype not in allowed:
            raise TypeError(f"{name} must have dtype in {[_dtype_name(d) for d in allowed]}, "
                            f"got {_dtype_name(x.dtype)}")
        if x.dim() < 1 or x.shape[-1] < 1:
            raise ValueError(f"{name} must have shape (..., V) with V >= 1, got {tuple(x.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.device != teacher.device:
        raise ValueError(f"{names[0]} and {names[1]} must be on the same device, got "
                         f"{student.device} and {teacher.device}")


def check_row_tensor(name: str, value, leading: torch.Size, device, *, floating=False,
                     boolean=False, of: str = "logits") -> Optional[torch.Tensor]:
    """An optional per-row tensor (``sample_weight``, ``mask``) of the leading shape of ``of``
    (the logits, or SRW's features)."""
    if value is None:
        return None
    check_tensor(name, value)
    if tuple(value.shape) != tuple(leading):
        raise ValueError(f"{name} must have the {of}' leading shape {tuple(leading)}, "
                         f"got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} must be on the {of}' device {device}, got {value.device}")
    if boolean and value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {_dtype_name(value.dtype)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {_dtype_name(value.dtype)}")
    return value


# A checked groups tensor carries this attribute: (its version counter and num_groups at the
# check, the number of groups). An in-place change bumps the version and forces a new check.
_CHECKED_ATTRIBUTE = "_ltkd_kernels_checked"


def check_groups(groups, vocab: int, num_groups, device) -> int:
    """``groups``: integer ``(V,)`` with ids in ``[0, G)``. Returns ``G``.

    ``G`` is ``num_groups`` when given, else ``groups.max() + 1`` (one host read).
    """
    check_tensor("groups", groups)
    if groups.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"groups must be an integer tensor, got {_dtype_name(groups.dtype)}")
    if groups.dim() != 1 or groups.shape[0] != vocab:
        raise ValueError(f"groups must have shape (V,) = ({vocab},), got {tuple(groups.shape)}")
    if groups.device != device:
        raise ValueError(f"groups must be on the logits' device {device}, got {groups.device}")
    if num_groups is not None:
        if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
            raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if _compiling():
        if num_groups is None:
            raise ValueError("num_groups must be given under torch.compile (it sets output shapes)")
        return int(num_groups)
    key = (groups._version, num_groups)
    cached = getattr(groups, _CHECKED_ATTRIBUTE, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    lo, hi = (int(v) for v in torch.aminmax(groups.long()))
    limit = num_groups if num_groups is not None else hi + 1
    if lo < 0 or hi >= limit:
        bound = f"[0, num_groups={num_groups})" if num_groups is not None else "[0, G)"
        raise ValueError(f"groups ids must lie in {bound}, got values in [{lo}, {hi}]")
    setattr(groups, _CHECKED_ATTRIBUTE, (key, int(limit)))
    return int(limit)


def check_target(name: str, target, leading: torch.Size, vocab: int, device) -> torch.Tensor:
    """Class indices of the logits' leading shape, each in ``[0, V)``; returned as int64."""
    check_tensor(name, target)
    if target.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of class indices, "
                        f"got {_dtype_name(target.dtype)}")
    if tuple(target.shape) != tuple(leading):
        raise ValueError(f"{name} must have the logits' leading shape {tuple(leading)}, "
                         f"got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"{name} must be on the logits' device {device}, got {target.device}")
    if target.numel() and not _compiling():
        lo, hi = (int(v) for v in torch.aminmax(target.long()))
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name} must hold class indices in [0, V={vocab}), "
                             f"got values in [{lo}, {hi}]")
    return target.long()


def check_class_weight(class_weight, vocab: int, device) -> torch.Tensor:
    """Non-negative finite float ``(V,)`` class weights, not all zero."""
    check_tensor("class_weight", class_weight)
    if not class_weight.is_floating_point():
        raise TypeError(f"class_weight must be a floating-point tensor, "
                        f"got {_dtype_name(class_weight.dtype)}")
    if class_weight.dim() != 1 or class_weight.shape[0] != vocab:
        raise ValueError(f"class_weight must have shape (V,) = ({vocab},), "
                         f"got {tuple(class_weight.shape)}")
    if class_weight.device != device:
        raise ValueError(f"class_weight must be on the logits' device {device}, "
                         f"got {class_weight.device}")
    if not _compiling():
        if not bool(torch.isfinite(class_weight).all()) or bool((class_weight < 0).any()):
            raise ValueError("class_weight must be finite and >= 0")
        if not bool((class_weight > 0).any()):
            raise ValueError("class_weight must have at least one positive entry")
    return class_weight.detach()


def check_class_counts(class_counts) -> torch.Tensor:
    """Per-class sample counts: a 1-D sequence or tensor of integers >= 1... (>= 0 allowed by caller)."""
    if isinstance(class_counts, torch.Tensor):
        counts = class_counts.detach().cpu()
    else:
        try:
            counts = torch.as_tensor(list(class_counts))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"class_counts must be a 1-D sequence of numbers: {exc}") from None
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be 1-D and non-empty, got shape {tuple(counts.shape)}")
    if counts.dtype == torch.bool or not (counts.is_floating_point() or counts.dtype in _INTEGER_DTYPES):
        raise TypeError(f"class_counts must hold numbers, got {_dtype_name(counts.dtype)}")
    if not bool(torch.isfinite(counts.double()).all()):
        raise ValueError("class_counts must be finite")
    return counts


def check_features(features) -> torch.Tensor:
    """SRW teacher features: float ``(N, D)`` or ``(B, P, D)``."""
    check_tensor("features", features)
    if features.dtype not in LOGIT_DTYPES + (torch.float64,):
        raise TypeError(f"features must be float32, float16, bfloat16 or float64, "
                        f"got {_dtype_name(features.dtype)}")
    if features.dim() not in (2, 3):
        raise ValueError(f"features must have shape (N, D) or (B, P, D), got {tuple(features.shape)}")
    return features


def check_feature_mask(mask, features: torch.Tensor) -> Optional[torch.Tensor]:
    """SRW ``mask``: bool of the features' leading shape (``(N,)`` or ``(B, P)``), True = valid."""
    return check_row_tensor("mask", mask, features.shape[:-1], features.device, boolean=True,
                            of="features")


def check_srw_arguments(features, tau, mask, eps):
    """SRW's arguments: ``features`` (``(N, D)`` or ``(B, P, D)``, D >= 1), ``tau > 0``,
    ``eps > 0``, ``mask`` (see :func:`check_feature_mask`). Returns ``(tau, eps)`` as floats."""
    check_features(features)
    if features.shape[-1] < 1:
        raise ValueError(f"features must have a feature dimension D >= 1, "
                         f"got shape {tuple(features.shape)}")
    tau = check_positive("tau", tau)
    eps = check_positive("eps", eps)
    check_feature_mask(mask, features)
    return tau, eps
