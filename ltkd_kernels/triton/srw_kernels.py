"""Triton kernels of SRW (sample-wise re-weighting): ``w = softmax(-avesim / tau)`` per image.

Notation (docs/losses.md): teacher features ``f`` of shape ``(B, P, D)`` (an ``(N, D)`` batch
is ``B = 1``), ``fh_i = f_i / max(||f_i||, eps)``, ``m = mean over valid i of fh_i`` (per
image), ``avesim_i = fh_i . m`` (the mean of row ``i`` of the paper's ``P x P`` cosine matrix,
which is never built), ``w = softmax over valid i of (-avesim_i / tau)``.

The patches of an image are cut into chunks of ``chunk_p`` patches; a program handles one
chunk of one image (``B * C`` programs, ``C`` = chunks per image), so one image of 10^6 rows
is spread over many programs, and every batch-wide quantity is a two-stage reduction: per-chunk
partials written by many programs, then one small combine per image. No atomics: results are
bit-identical run to run. The features are read twice in all, once per pass:

1. :func:`srw_normalised_sum_kernel`: row norms and the chunk's sum of ``fh_i`` (one read);
2. :func:`srw_mean_kernel`: ``m`` = sum of the chunk sums / number of valid patches;
3. :func:`srw_logits_kernel`: ``-avesim_i / tau`` and the chunk's online softmax statistics
   (max and sum of exp) (one read);
4. :func:`srw_softmax_normaliser_kernel`: the image's softmax max and denominator;
5. :func:`srw_normalise_kernel`: ``w_i = exp(logit_i - max) / denominator`` in place.

Row offsets are int64 (``b * stride_b + p * stride_p`` overflows int32 past 2^31 elements).
Masked patches are never loaded (they may hold anything, NaN included).
"""
import triton
import triton.language as tl


@triton.jit
def _chunk_of_program(num_chunks, chunk_p, P):
    """The image ``b`` (int64), chunk index ``c`` and patch range ``[start, end)`` of this program."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // num_chunks
    c = pid % num_chunks
    start = c * chunk_p
    end = tl.minimum(start + chunk_p, P)
    return b, c, start, end


@triton.jit
def _valid_patches(mask_ptr, b, offs_p, end, P, HAS_MASK: tl.constexpr):
    """Patches of the tile inside the chunk and not masked out."""
    in_chunk = offs_p < end
    if HAS_MASK:
        keep = tl.load(mask_ptr + b * P + offs_p, mask=in_chunk, other=0) != 0
        in_chunk = in_chunk & keep
    return in_chunk


@triton.jit
def srw_normalised_sum_kernel(
    features_ptr,       # (B, P, D) fp32/fp16/bf16 teacher features, unit stride along D
    mask_ptr,           # (B, P) bool, contiguous: True = valid patch (HAS_MASK)
    inv_norm_ptr,       # out (B, P) fp32: 1 / max(||f_i||, eps); 0 at masked patches
    chunk_sum_ptr,      # out (B, C, D) fp32: sum of fh_i over the chunk's valid patches
                        #   (zero-initialised by the launcher when not ONE_TILE: accumulated)
    chunk_count_ptr,    # out (B, C) int32: number of valid patches in the chunk
    stride_b,           # features stride between images (elements)
    stride_p,           # features stride between patches (elements)
    P,                  # patches per image
    D,                  # feature dimension
    num_chunks,         # C = cdiv(P, chunk_p)
    chunk_p,            # patches per chunk, a multiple of BLOCK_P
    eps,                # norm floor: a zero feature gets fh = 0 (cosine 0 with everything)
    HAS_MASK: tl.constexpr,
    ONE_TILE: tl.constexpr,   # D <= BLOCK_D: a row tile is loaded once and kept in registers
    BLOCK_P: tl.constexpr,    # patches per tile
    BLOCK_D: tl.constexpr,    # features per tile
):
    """Pass 1 (one read of the chunk): ``inv_norm_i`` and ``sum_{i in chunk, valid} fh_i``."""
    b, c, start, end = _chunk_of_program(num_chunks, chunk_p, P)
    image_ptr = features_ptr + b * stride_b
    offs_d = tl.arange(0, BLOCK_D)
    chunk_sum_row = chunk_sum_ptr + (b * num_chunks + c) * D
    count = tl.zeros([BLOCK_P], tl.int32)
    if ONE_TILE:
        in_d = offs_d < D
        acc = tl.zeros([BLOCK_D], tl.float32)
    for tile_start in range(start, end, BLOCK_P):
        offs_p = tile_start + tl.arange(0, BLOCK_P)
        valid = _valid_patches(mask_ptr, b, offs_p, end, P, HAS_MASK)
        count += valid.to(tl.int32)
        row_ptrs = image_ptr + offs_p.to(tl.int64)[:, None] * stride_p
        if ONE_TILE:
            x = tl.load(row_ptrs + offs_d[None, :], mask=valid[:, None] & in_d[None, :],
                        other=0.0).to(tl.float32)
            inv_norm = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)
            inv_norm = tl.where(valid, inv_norm, 0.0)
            acc += tl.sum(x * inv_norm[:, None], axis=0)
        else:
            squares = tl.zeros([BLOCK_P], tl.float32)
            for d_start in range(0, D, BLOCK_D):
                in_d = d_start + offs_d < D
                x = tl.load(row_ptrs + d_start + offs_d[None, :],
                            mask=valid[:, None] & in_d[None, :], other=0.0).to(tl.float32)
                squares += tl.sum(x * x, axis=1)
            inv_norm = 1.0 / tl.maximum(tl.sqrt(squares), eps)
            inv_norm = tl.where(valid, inv_norm, 0.0)
            # The tile was just read: this second walk over D is served from cache. The (D,)
            # sum does not fit in registers, so it is accumulated in this program's own row
            # of chunk_sum (no other program touches it).
            for d_start in range(0, D, BLOCK_D):
                in_d = d_start + offs_d < D
                x = tl.load(row_ptrs + d_start + offs_d[None, :],
                            mask=valid[:, None] & in_d[None, :], other=0.0).to(tl.float32)
                partial = tl.load(chunk_sum_row + d_start + offs_d, mask=in_d, other=0.0)
                partial += tl.sum(x * inv_norm[:, None], axis=0)
                tl.store(chunk_sum_row + d_start + offs_d, partial, mask=in_d)
        tl.store(inv_norm_ptr + b * P + offs_p, inv_norm, mask=offs_p < end)
    if ONE_TILE:
        tl.store(chunk_sum_row + offs_d, acc, mask=in_d)
    tl.store(chunk_count_ptr + b * num_chunks + c, tl.sum(count, axis=0))


@triton.jit
def srw_mean_kernel(
    chunk_sum_ptr,      # (B, C, D) fp32 from pass 1
    chunk_count_ptr,    # (B, C) int32 from pass 1
    mean_ptr,           # out (B, D) fp32: m = mean of fh_i over the image's valid patches
    D,                  # feature dimension
    num_chunks,         # C
    BLOCK_C: tl.constexpr,  # chunks summed per step
    BLOCK_D: tl.constexpr,  # features per program
):
    """Second stage of the mean: one program per (image, block of D) sums the C chunk sums.

    ``m = 0`` for an image with no valid patch (its weights are all 0 anyway).
    """
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    acc = tl.zeros([BLOCK_D], tl.float32)
    count = tl.zeros([BLOCK_C], tl.int32)
    for c_start in range(0, num_chunks, BLOCK_C):
        offs_c = c_start + tl.arange(0, BLOCK_C)
        in_c = offs_c < num_chunks
        rows = (b * num_chunks + offs_c.to(tl.int64)) * D
        sums = tl.load(chunk_sum_ptr + rows[:, None] + offs_d[None, :],
                       mask=in_c[:, None] & in_d[None, :], other=0.0)
        acc += tl.sum(sums, axis=0)
        count += tl.load(chunk_count_ptr + b * num_chunks + offs_c, mask=in_c, other=0)
    total = tl.maximum(tl.sum(count, axis=0), 1).to(tl.float32)
    tl.store(mean_ptr + b * D + offs_d, acc / total, mask=in_d)


@triton.jit
def srw_logits_kernel(
    features_ptr,       # (B, P, D) teacher features, unit stride along D
    mask_ptr,           # (B, P) bool (HAS_MASK)
    inv_norm_ptr,       # (B, P) fp32 from pass 1
    mean_ptr,           # (B, D) fp32 m from srw_mean_kernel
    logits_ptr,         # out (B, P) fp32: -avesim_i / tau; -inf at masked patches
    chunk_max_ptr,      # out (B, C) fp32: max of the chunk's logits (-inf: no valid patch)
    chunk_sum_exp_ptr,  # out (B, C) fp32: sum of exp(logit - chunk max) over the chunk
    stride_b,
    stride_p,
    P,
    D,
    num_chunks,
    chunk_p,
    inv_tau,            # 1 / tau
    HAS_MASK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Pass 2 (one read of the chunk): ``avesim_i = (f_i . m) inv_norm_i = fh_i . m`` and the
    chunk's online softmax statistics of ``logit_i = -avesim_i / tau``."""
    b, c, start, end = _chunk_of_program(num_chunks, chunk_p, P)
    image_ptr = features_ptr + b * stride_b
    offs_d = tl.arange(0, BLOCK_D)
    running_max = float("-inf")
    running_sum = 0.0
    for tile_start in range(start, end, BLOCK_P):
        offs_p = tile_start + tl.arange(0, BLOCK_P)
        valid = _valid_patches(mask_ptr, b, offs_p, end, P, HAS_MASK)
        row_ptrs = image_ptr + offs_p.to(tl.int64)[:, None] * stride_p
        dots = tl.zeros([BLOCK_P], tl.float32)
        for d_start in range(0, D, BLOCK_D):
            in_d = d_start + offs_d < D
            x = tl.load(row_ptrs + d_start + offs_d[None, :], mask=valid[:, None] & in_d[None, :],
                        other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + b * D + d_start + offs_d, mask=in_d, other=0.0)
            dots += tl.sum(x * mean[None, :], axis=1)
        inv_norm = tl.load(inv_norm_ptr + b * P + offs_p, mask=valid, other=0.0)
        logit = tl.where(valid, -(dots * inv_norm) * inv_tau, float("-inf"))
        tl.store(logits_ptr + b * P + offs_p, logit, mask=offs_p < end)
        new_max = tl.maximum(running_max, tl.max(logit, axis=0))
        # Both -inf (no valid patch yet): keep the rescale finite; the sums are 0.
        reference = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - reference) + tl.sum(
            tl.exp(logit - reference), axis=0)
        running_max = new_max
    tl.store(chunk_max_ptr + b * num_chunks + c, running_max)
    tl.store(chunk_sum_exp_ptr + b * num_chunks + c, running_sum)


@triton.jit
def srw_softmax_normaliser_kernel(
    chunk_max_ptr,      # (B, C) fp32 from pass 2
    chunk_sum_exp_ptr,  # (B, C) fp32 from pass 2
    image_max_ptr,      # out (B,) fp32: max logit of the image (-inf: no valid patch)
    image_sum_exp_ptr,  # out (B,) fp32: sum of exp(logit - image max) (0: no valid patch)
    num_chunks,         # C
    BLOCK_C: tl.constexpr,
):
    """Second stage of the softmax: one program per image combines its chunks' (max, sum)."""
    b = tl.program_id(0).to(tl.int64)
    running_max = float("-inf")
    running_sum = 0.0
    for c_start in range(0, num_chunks, BLOCK_C):
        offs_c = c_start + tl.arange(0, BLOCK_C)
        in_c = offs_c < num_chunks
        chunk_max = tl.load(chunk_max_ptr + b * num_chunks + offs_c, mask=in_c,
                            other=float("-inf"))
        chunk_sum = tl.load(chunk_sum_exp_ptr + b * num_chunks + offs_c, mask=in_c, other=0.0)
        new_max = tl.maximum(running_max, tl.max(chunk_max, axis=0))
        reference = tl.where(new_max == float("-inf"), 0.0, new_max)
        # A chunk with no valid patch has max -inf and sum 0: it adds 0 * exp(-inf) = 0.
        running_sum = running_sum * tl.exp(running_max - reference) + tl.sum(
            chunk_sum * tl.exp(chunk_max - reference), axis=0)
        running_max = new_max
    tl.store(image_max_ptr + b, running_max)
    tl.store(image_sum_exp_ptr + b, running_sum)


@triton.jit
def srw_normalise_kernel(
    weights_ptr,        # in (B, P) fp32 logits, out: the weights, in place
    image_max_ptr,      # (B,) fp32
    image_sum_exp_ptr,  # (B,) fp32
    P,
    blocks_per_image,   # cdiv(P, BLOCK): the grid is 1-D, B * blocks_per_image programs
    BLOCK: tl.constexpr,
):
    """``w_i = exp(logit_i - max) / sum_exp``; an image with no valid patch gets all zeros.

    Masked patches have ``logit = -inf`` and get 0. A NaN logit makes the sum NaN, so NaN
    features give NaN weights (never a silent 0).
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // blocks_per_image
    offs = (pid % blocks_per_image) * BLOCK + tl.arange(0, BLOCK)
    in_image = offs < P
    image_max = tl.load(image_max_ptr + b)
    image_sum = tl.load(image_sum_exp_ptr + b)
    logit = tl.load(weights_ptr + b * P + offs, mask=in_image, other=float("-inf"))
    reference = tl.where(image_max == float("-inf"), 0.0, image_max)
    # No valid patch: every logit is -inf, so exp gives 0; divide by 1 rather than 0.
    weight = tl.exp(logit - reference) / tl.where(image_sum == 0.0, 1.0, image_sum)
    tl.store(weights_ptr + b * P + offs, weight, mask=in_image)
