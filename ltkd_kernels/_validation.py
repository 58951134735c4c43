"""Argument checks shared by every backend: clear ValueError/TypeError naming the argument.

Value checks that need the data (group ids, targets) read it on the host. For a ``groups``
tensor this is done once per tensor version (modules hold ``groups`` as a buffer, so a training
loop pays it once); under ``torch.compile`` the value checks are skipped to keep the graph whole.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

from .ops.config import MAX_GROUPS

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


# Exact builtin types pass the type checks without the (slow) abstract-base-class test.
_PLAIN_REALS = (float, int)


def is_real(value) -> bool:
    """A real number, not a bool."""
    return type(value) in _PLAIN_REALS or (not isinstance(value, bool)
                                           and isinstance(value, numbers.Real))


def is_int(value) -> bool:
    """An integer, not a bool."""
    return type(value) is int or (not isinstance(value, bool)
                                  and isinstance(value, numbers.Integral))


def check_positive(name: str, value) -> float:
    if not is_real(value):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_real(name: str, value) -> float:
    if not is_real(value):
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
    (the logits, or SRW's features). ``boolean``: a mask, bool or 0/1 integers (nonzero = keep)."""
    if value is None:
        return None
    check_tensor(name, value)
    if tuple(value.shape) != tuple(leading):
        raise ValueError(f"{name} must have the {of}' leading shape {tuple(leading)}, "
                         f"got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} must be on the {of}' device {device}, got {value.device}")
    if boolean and value.dtype != torch.bool and value.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{name} must be a bool or integer (0/1) tensor, got {_dtype_name(value.dtype)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {_dtype_name(value.dtype)}")
    return value


def check_num_groups(num_groups) -> Optional[int]:
    """``None`` or an int in ``[1, MAX_GROUPS]`` (checked before anything is allocated)."""
    if num_groups is None:
        return None
    if not is_int(num_groups):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    if not 1 <= num_groups <= MAX_GROUPS:
        raise ValueError(f"num_groups must be in [1, {MAX_GROUPS}], got {num_groups}")
    return int(num_groups)


# A checked constant tensor (groups, class weights) carries this attribute: the key of the check
# (version counter, storage address, what it was checked against) and its result. A write that
# bypasses the version counter (through .numpy() or .data) can make the cache stale: the kernels
# guard themselves against any value (docs/design.md: bad ids give ValueError on the CPU, a NaN
# row on CUDA), so a stale cache costs the clear message, never memory safety.
_CHECKED_ATTRIBUTE = "_ltkd_kernels_checked"


def _cached(tensor: torch.Tensor, key):
    cached = getattr(tensor, _CHECKED_ATTRIBUTE, None)
    full_key = (tensor._version, tensor.data_ptr(), key)
    if cached is not None and cached[0] == full_key:
        return True, cached[1]
    return False, full_key


def _remember(tensor: torch.Tensor, full_key, result) -> None:
    try:
        setattr(tensor, _CHECKED_ATTRIBUTE, (full_key, result))
    except (AttributeError, RuntimeError):  # a tensor subclass that refuses attributes
        pass


def check_groups(groups, vocab: int, num_groups, device, *, always: bool = False) -> int:
    """``groups``: integer ``(V,)`` with ids in ``[0, G)``. Returns ``G``.

    ``G`` is ``num_groups`` when given, else ``groups.max() + 1`` (one host read). The value
    check runs once per distinct tensor (``always=True``: every call, as the reference does);
    under ``torch.compile`` it is left to the kernels.
    """
    check_tensor("groups", groups)
    if groups.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"groups must be an integer tensor, got {_dtype_name(groups.dtype)}")
    if groups.dim() != 1 or groups.shape[0] != vocab:
        raise ValueError(f"groups must have shape (V,) = ({vocab},), got {tuple(groups.shape)}")
    if groups.device != device:
        raise ValueError(f"groups must be on the logits' device {device}, got {groups.device}")
    num_groups = check_num_groups(num_groups)
    if _compiling():
        if num_groups is None:
            raise ValueError("num_groups must be given under torch.compile (it sets output shapes)")
        return num_groups
    hit, key = (False, None) if always else _cached(groups, ("groups", num_groups))
    if hit:
        return key
    lo, hi = (int(v) for v in torch.aminmax(groups.long()))
    limit = num_groups if num_groups is not None else hi + 1
    if lo < 0 or hi >= limit:
        bound = f"[0, num_groups={num_groups})" if num_groups is not None else "[0, G)"
        raise ValueError(f"groups ids must lie in {bound}, got values in [{lo}, {hi}]")
    if limit > MAX_GROUPS:
        raise ValueError(f"groups ids must be < {MAX_GROUPS} (at most {MAX_GROUPS} groups), "
                         f"got a largest id of {hi}")
    if key is not None:
        _remember(groups, key, int(limit))
    return int(limit)


def check_target(name: str, target, leading: torch.Size, vocab: int, device, *,
                 ignore_index: Optional[int] = None, values: bool = False) -> torch.Tensor:
    """Class indices of the logits' leading shape. With ``values``: each in ``[0, V)`` or equal
    to ``ignore_index`` (one host read; the kernels' own rule covers the fast path)."""
    check_tensor(name, target)
    if target.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of class indices, "
                        f"got {_dtype_name(target.dtype)}")
    if tuple(target.shape) != tuple(leading):
        raise ValueError(f"{name} must have the logits' leading shape {tuple(leading)}, "
                         f"got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"{name} must be on the logits' device {device}, got {target.device}")
    if values and target.numel() and not _compiling():
        t = target.long()
        if ignore_index is not None:
            t = t[t != ignore_index]
        if t.numel():
            lo, hi = (int(v) for v in torch.aminmax(t))
            if lo < 0 or hi >= vocab:
                ignored = "" if ignore_index is None else f" (or ignore_index={ignore_index})"
                raise ValueError(f"{name} must hold class indices in [0, V={vocab}){ignored}, "
                                 f"got values in [{lo}, {hi}]")
    return target


def check_class_weight(class_weight, vocab: int, device, *, always: bool = False) -> torch.Tensor:
    """Non-negative finite float ``(V,)`` class weights, not all zero (values checked once per
    distinct tensor; a bad value that slips past gives NaN in the kernels, never a crash)."""
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
    if _compiling():
        return class_weight.detach()
    hit, key = (False, None) if always else _cached(class_weight, "class_weight")
    if not hit:
        if not bool(torch.isfinite(class_weight).all()) or bool((class_weight < 0).any()):
            raise ValueError("class_weight must be finite and >= 0")
        if not bool((class_weight > 0).any()):
            raise ValueError("class_weight must have at least one positive entry")
        if key is not None:
            _remember(class_weight, key, True)
    return class_weight.detach()


def check_num_items(value, device):
    """``num_items_in_batch``: ``None``, a number > 0, or a one-element tensor on the logits'
    device (Hugging Face passes either). Returns ``(float or 0.0, tensor or None)``."""
    if value is None:
        return 0.0, None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, "
                             f"got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"num_items_in_batch must be on the logits' device {device}, "
                             f"got {value.device}")
        return 0.0, value.detach().reshape(())
    if not is_real(value):
        raise TypeError(f"num_items_in_batch must be a number or a tensor, got {type(value).__name__}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"num_items_in_batch must be a finite number > 0, got {value}")
    return float(value), None


def check_int(name: str, value) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def check_chunk_size(chunk_size) -> Optional[int]:
    """``None`` or an int >= 1 (the fused linear losses' rows per chunk)."""
    if chunk_size is not None and (not is_int(chunk_size) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    return None if chunk_size is None else int(chunk_size)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_class_counts(class_counts) -> torch.Tensor:
    """Per-class sample counts: a 1-D sequence or tensor of integers >= 1... (>= 0 allowed by caller)."""
    if isinstance(class_counts, torch.Tensor):
        counts = class_counts.detach().cpu()
    else:
        try:
            counts = torch.as_tensor(list(class_counts), device="cpu")
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
