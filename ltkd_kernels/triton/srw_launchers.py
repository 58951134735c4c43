"""Launcher of the SRW Triton kernels: allocate outputs, pick blocks and grids, launch. No autograd.

:func:`srw_weights_impl` has the argument list shared with the C++ CPU backend
(``ltkd_kernels.cpu.srw_weights_impl``); validation is done by :func:`ltkd_kernels.srw_weights`.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from .srw_kernels import (
    srw_logits_kernel,
    srw_mean_kernel,
    srw_normalise_kernel,
    srw_normalised_sum_kernel,
    srw_softmax_normaliser_kernel,
)

# Row tiles of at most _MAX_TILE elements stay in registers; up to _MAX_ONE_TILE_D features a
# row tile covers the whole feature vector and pass 1 reads it once (else it walks D twice,
# the second time from cache).
_MAX_TILE = 8192
_MAX_ONE_TILE_D = 1024
# Tiles per chunk: a chunk of 32 tiles is 1024 patches at D = 256, so 10^6 rows of one image
# make ~1000 programs, and the (B, C, D) chunk sums stay ~1/1000 of the features.
_TILES_PER_CHUNK = 32
_BLOCK_C = 128
_NORMALISE_BLOCK = 1024
_MEAN_BLOCK_D = 256


def _num_warps(tile: int) -> int:
    return 8 if tile >= 4096 else 4


def srw_weights_impl(features: torch.Tensor, mask: Optional[torch.Tensor], tau: float,
                     eps: float, *, block_p: Optional[int] = None,
                     block_d: Optional[int] = None, tiles_per_chunk: Optional[int] = None,
                     block_c: Optional[int] = None) -> torch.Tensor:
    """SRW weights ``(B, P)`` float32 of ``features`` ``(B, P, D)`` (unit stride along D).

    Per image ``b``: ``fh_i = f_i / max(||f_i||, eps)``, ``m`` = mean of ``fh`` over the valid
    patches, ``w = softmax over valid i of (-fh_i . m / tau)``; masked patches (``mask`` false)
    get 0, an image with no valid patch gets all zeros.

    The keyword-only block sizes override the defaults (powers of two); tests use small ones to
    exercise the chunked reductions and the walk over D on small inputs.
    """
    batch, patches, dim = features.shape
    weights = torch.empty((batch, patches), dtype=torch.float32, device=features.device)
    if weights.numel() == 0:
        return weights
    if dim == 0:
        raise ValueError("features must have D >= 1")
    if features.stride(-1) != 1:
        features = features.contiguous()
    block_d = block_d or min(triton.next_power_of_2(dim), _MAX_ONE_TILE_D)
    block_p = block_p or max(1, min(_MAX_TILE // block_d, triton.next_power_of_2(patches)))
    tiles_per_chunk = tiles_per_chunk or _TILES_PER_CHUNK
    block_c = block_c or _BLOCK_C
    one_tile = dim <= block_d
    chunk_p = block_p * min(tiles_per_chunk, triton.cdiv(patches, block_p))
    num_chunks = triton.cdiv(patches, chunk_p)

    device = features.device
    inv_norm = torch.empty((batch, patches), dtype=torch.float32, device=device)
    # Accumulated in place when a row does not fit one tile; written whole otherwise.
    new_chunk_sum = torch.empty if one_tile else torch.zeros
    chunk_sum = new_chunk_sum((batch, num_chunks, dim), dtype=torch.float32, device=device)
    chunk_count = torch.empty((batch, num_chunks), dtype=torch.int32, device=device)
    mean = torch.empty((batch, dim), dtype=torch.float32, device=device)
    chunk_max = torch.empty((batch, num_chunks), dtype=torch.float32, device=device)
    chunk_sum_exp = torch.empty((batch, num_chunks), dtype=torch.float32, device=device)
    image_max = torch.empty((batch,), dtype=torch.float32, device=device)
    image_sum_exp = torch.empty((batch,), dtype=torch.float32, device=device)
    has_mask = mask is not None
    # Unused pointer arguments get a valid tensor; HAS_MASK keeps it unread.
    mask_arg = mask.contiguous() if has_mask else weights
    warps = _num_warps(block_p * block_d)
    chunk_grid = (batch * num_chunks,)

    srw_normalised_sum_kernel[chunk_grid](
        features, mask_arg, inv_norm, chunk_sum, chunk_count,
        features.stride(0), features.stride(1), patches, dim, num_chunks, chunk_p, float(eps),
        HAS_MASK=has_mask, ONE_TILE=one_tile, BLOCK_P=block_p, BLOCK_D=block_d,
        num_warps=warps,
    )
    mean_block_d = min(_MEAN_BLOCK_D, triton.next_power_of_2(dim))
    srw_mean_kernel[(batch, triton.cdiv(dim, mean_block_d))](
        chunk_sum, chunk_count, mean, dim, num_chunks,
        BLOCK_C=min(block_c, triton.next_power_of_2(num_chunks)), BLOCK_D=mean_block_d,
    )
    srw_logits_kernel[chunk_grid](
        features, mask_arg, inv_norm, mean, weights, chunk_max, chunk_sum_exp,
        features.stride(0), features.stride(1), patches, dim, num_chunks, chunk_p,
        1.0 / float(tau),
        HAS_MASK=has_mask, BLOCK_P=block_p, BLOCK_D=block_d,
        num_warps=warps,
    )
    srw_softmax_normaliser_kernel[(batch,)](
        chunk_max, chunk_sum_exp, image_max, image_sum_exp, num_chunks,
        BLOCK_C=min(block_c, triton.next_power_of_2(num_chunks)),
    )
    normalise_block = min(_NORMALISE_BLOCK, triton.next_power_of_2(patches))
    blocks_per_image = triton.cdiv(patches, normalise_block)
    srw_normalise_kernel[(batch * blocks_per_image,)](
        weights, image_max, image_sum_exp, patches, blocks_per_image, BLOCK=normalise_block,
    )
    return weights
