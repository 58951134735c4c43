"""Triton kernels of the grouped KL: the three operators of docs/design.md.

One idea per kernel:

- :func:`grouped_kl_states_kernel` (op 1): one read of a V-slice of a row of each logits tensor
  -> the slice's per-group state ``[m^S, s^S, m^T, s^T, g]`` (and the cross-entropy extras).
  One program per (row, V-slice, chunk of groups).
- :func:`grouped_kl_merge_kernel`: the exact merge (docs/design.md) of the V-slices' partial
  states of each row, in slice order (only when rows are split over several programs).
- :func:`grouped_kl_finish_kernel` (op 2): one program over all rows in a fixed order: group
  masses, the batch statistic ``pB``, the row losses, the reduction and ``saved``.
- :func:`grouped_kl_grad_kernel` (op 3): one more read of a V-slice of each logits row and one
  write of the gradient; the per-group coefficients are recomputed in the program from the
  state, ``saved`` and the upstream gradient.

How the states kernel walks a V-slice (the per-element cost is what bounds it):

- A program has ``LANES = 32 * num_warps`` lanes, one per thread. Each iteration a lane loads
  ``VEC`` contiguous classes (16 bytes of the widest tensor; bf16 rows as int32 pairs, widened
  by one integer instruction per class) ``UNROLL`` times: 8 classes per lane for a one-group
  walk, 16 for the CLASS walk. A lane keeps, across iterations, its own partial state of every
  group of the program's chunk (``[GC, LANES]`` registers): the raw maxima of both models
  (up to 4 groups) and the sums ``sum exp(b - R)``, ``sum exp(a - R')``, ``sum exp(a - R') d``
  relative to the lane's running maxima ``R``, ``R'`` over *all* its classes (one ``exp`` per
  element and model, not one per group). An element updates only its own group's registers:
  ``where(group == k, ...)`` compiles to a compare and five predicated instructions per group
  (about 6 G + 17 per element); nothing else depends on G. With more than 4 groups
  (``SHARED_WALK``) no per-group maxima are kept: a compare and three predicated sums per
  group (about 4 G + 20), and two bit masks per lane of the groups it holds, once and more
  than once. The lane maxima come from the iteration's tile maximum; when they rise, the sums
  are rescaled once per iteration. Lanes are merged once per program; without per-group
  maxima each group at the largest lane maximum among the lanes holding it: the state's ``m``
  is then that reference, not the group's own maximum (docs/design.md allows either).
- One-group walks (``ONE``; ``TARGET``'s rest; ``BUCKET``'s rest) take every exponent as a
  difference first (``(x - R) c``: exactly 0 at the maximum, so a one-class row has ``s = 1``
  and ``g = 0`` exactly, as in the torch form) and ``d`` relative to the references. The CLASS
  walk takes one FFMA per exponent (its references are shared by the groups, so that
  exactness is not available there anyway) and ``d = a - b``.
- Shared maxima keep the loop cheap but can make a tail group's sum lose precision or
  underflow when it lies far below the lane's maximum. Without per-group maxima, a held group
  whose merged sum is below ``2^-60`` (or 0, or not finite; likewise a reference or gap that
  is not finite), or that has a single class in the slice (its probability within the group
  is then 1 up to a rounding, not up to its distance from the lanes' maxima), makes the
  program walk its slice again keeping per-group maxima (one class per lane per step); there,
  a lane's group maximum more than 50 nats below the lane's, while within 30 nats of the
  group's maximum over the program (so its terms matter), makes it walk the slice a third
  time, every element relative to its own group's (now known, exact) maximum. A state from
  such a walk has each group's own maxima. Above ``2^-60`` what a lane dropped or rounded
  against its larger maximum (below ``2^-126`` of the reference per class) is below
  ``2^-66`` of the group's sum per class. Cost of the rescue: rows with a group that is
  all ``-inf`` (or so far below the others, or of one class) read their slice two or three
  times.
- More than ``GC = 16`` groups: chunks of 16 groups in separate programs (each reads the slice
  and ignores the other chunks' classes): registers stay bounded for any G up to MAX_GROUPS.
- ``ORDER`` (the ordered walk, docs/design.md): the CLASS rule's groups one at a time, each a
  one-group walk over its positions of the class order (the classes sorted by group), the
  logits gathered; work per element flat in G, each group's state at its own maxima. Every
  gathered class's group id is compared with the walked group (a stale order, a bad id: NaN).
  ``ORDER == 2``, groups that are each one range of classes (in any order): the same walk
  without the gather, each group's range (``order[bounds[k]]`` onwards) read densely like a
  one-group row (wide aligned loads after one masked sub-tile at the range's start), its ids
  still checked; ``ORDER == 3`` the same with int8 ids (4-byte aligned) checked four at a
  time, as int32 words equal to the group's id in every byte.
- ``ORDER == 4`` (the window walk, docs/design.md): groups interleaved finely. Every lane
  walks one group (the plan's, for the whole row) as a one-group walk; each step reads a
  window of ``LANES * VEC`` classes densely and gathers each lane's ``VEC`` slots of the
  plan from it through shared memory (an empty slot: ``-inf``). Each group's state is the
  exact merge of its lanes' (its own maxima), all groups in one segmented scan over the
  lanes. Every class handed to a lane has its id compared with the lane's group (a stale
  plan, a bad id: NaN).
- Excluded classes: TARGET's target (its group 1 is the rest) and BUCKET's valid top-k entries
  (its group 1 is the classes off the entries, summed directly). The full blocks holding one
  are left out of the fast loop and walked with masks; the fast loop has no per-element test.
- Top-k entries: sorted once (repeated indices make the row NaN); the teacher slots and ``g``
  come from the entries (split 0), relative to the slice's student maxima: the merge of the
  slices is exact whatever the reference.

Row offsets are int64 (``row * stride`` overflows int32 past 2^31 elements). Invalid rows
(mask 0, target == ignore_index) are never read. Bad indices (a group id outside ``[0, G)``, a
top-k index outside ``[-1, V)`` or repeated, a target outside its range) never reach memory:
addresses are clamped and the row's state becomes NaN. Every cross-row and cross-lane sum runs
in a fixed order: reruns are bit-identical.
"""
import re

import triton
import triton.language as tl
from triton.language.extra import libdevice

# Group rules, top-k rules, reductions: the values of ltkd_kernels/ops/config.py.
GROUP_ONE = tl.constexpr(0)
GROUP_CLASS = tl.constexpr(1)
GROUP_TARGET = tl.constexpr(2)
TEACHER_DENSE = tl.constexpr(-1)
TOPK_RENORMALIZE = tl.constexpr(0)
TOPK_RESTRICT = tl.constexpr(1)
TOPK_BUCKET = tl.constexpr(2)
REDUCE_NONE = tl.constexpr(0)
REDUCE_SUM = tl.constexpr(1)
REDUCE_MEAN = tl.constexpr(2)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# A lane's group sum is trusted when its maximum lies at most 50 nats (in log2 units) below the
# lane's running maximum: its terms down to 30 nats below its own maximum stay normal floats.
PRONE_LOG2 = tl.constexpr(72.13475204444817)
# ... and it matters when its maximum is within 30 nats of the group's maximum over the program
# (beyond, its whole contribution is below 1e-13 relative).
RELEVANT_LOG2 = tl.constexpr(43.280851226668897)
# The CLASS walk keeps no per-group maxima: a group's sums at the lanes' shared maxima are
# trusted when at least 2^-60 (else the slice is walked again with the groups' own maxima).
SHARED_MIN_SUM = tl.constexpr(8.673617379884035e-19)


# ---------------------------------------------------------------------------------------------
# Small helpers.

# tl.gather (the window walk's) came with Triton 3.3. Its only caller is this wrapper, so that
# under Triton 3.2 no kernel source names it (Triton's dependency walk of a kernel resolves
# every name its helpers use, taken or not). Triton 3.3 compiles the walk's gathers to local
# memory (8.7 KB of stack per thread, 2052 instructions per class at G = 32), 3.4 on through
# shared memory (49.1): the launchers take the walk from 3.4 on (WINDOW_WALK).
HAS_GATHER = hasattr(tl, "gather")


def _release(version: str):
    """``(major, minor)`` of a version string (``"3.4.0"``, ``"3.6.0+git1234"``)."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else (0, 0)


WINDOW_WALK = HAS_GATHER and _release(triton.__version__) >= (3, 4)
if HAS_GATHER:
    @triton.jit
    def _gather(src, index, axis: tl.constexpr):
        return tl.gather(src, index, axis)
else:
    @triton.jit
    def _gather(src, index, axis: tl.constexpr):
        tl.static_assert(False, "the window walk needs Triton >= 3.3 (tl.gather)")
        return src

@triton.jit
def _ref(m):
    """The reference point of a group: its maximum, or 0 while it has no finite logit."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _log_weight(ptr, mask, CW_LOG: tl.constexpr):
    """``log w`` of the class weights at ``ptr`` (``mask``: 0 where False). ``CW_LOG``: 0 the
    weights, ``tl.log`` (the interpreter); 1 the weights, the hardware approximation (a GPU);
    2 the weights' logs, taken by the launcher once per call (large sizes: no log per class
    and row, which on a GPU would be one more transcendental per element)."""
    if mask is None:
        w = tl.load(ptr).to(tl.float32)
    else:
        w = tl.load(ptr, mask=mask, other=0.0 if CW_LOG == 2 else 1.0).to(tl.float32)
    if CW_LOG == 2:
        return w
    elif CW_LOG == 1:
        return libdevice.fast_logf(w)
    else:
        return tl.log(w)


@triton.jit
def _halves(x):
    """``[L, 2m]`` -> the even and the odd columns, two ``[L, m]`` (in-thread, no data move)."""
    return tl.split(tl.reshape(x, [x.shape[0], x.shape[1] // 2, 2]))


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


# Helpers that take a tile's elements one at a time split it in halves, level by level: one
# function per level (_held_bits2 calls _held_bit twice, _held_bits4 _held_bits2, ...), not a
# recursive one, whose JIT dependency walk Triton 3.2-3.4 cannot end.

@triton.jit
def _held_bit(bits, seen, twice):
    """:func:`_held_bits` of one element per lane (``[LANES, 1]``)."""
    b = tl.reshape(bits, [bits.shape[0]])
    twice = twice | (seen & b)
    seen = seen | b
    return seen, twice


@triton.jit
def _held_bits2(bits, seen, twice):
    b0, b1 = _halves(bits)
    seen, twice = _held_bit(b0, seen, twice)
    return _held_bit(b1, seen, twice)


@triton.jit
def _held_bits4(bits, seen, twice):
    b0, b1 = _halves(bits)
    seen, twice = _held_bits2(b0, seen, twice)
    return _held_bits2(b1, seen, twice)


@triton.jit
def _held_bits8(bits, seen, twice):
    b0, b1 = _halves(bits)
    seen, twice = _held_bits4(b0, seen, twice)
    return _held_bits4(b1, seen, twice)


@triton.jit
def _held_bits(bits, seen, twice, E: tl.constexpr):
    """``seen |= bit``, ``twice |= bit`` already in ``seen``, for the ``[LANES, E]`` elements'
    group bits in turn: ``twice`` marks the groups a lane holds more than once."""
    if E == 1:
        seen, twice = _held_bit(bits, seen, twice)
    elif E == 2:
        seen, twice = _held_bits2(bits, seen, twice)
    elif E == 4:
        seen, twice = _held_bits4(bits, seen, twice)
    elif E == 8:
        seen, twice = _held_bits8(bits, seen, twice)
    else:
        tl.static_assert(E == 16, "E: 1 to 16 elements per lane")
        b0, b1 = _halves(bits)
        seen, twice = _held_bits8(b0, seen, twice)
        seen, twice = _held_bits8(b1, seen, twice)
    return seen, twice


@triton.jit
def _rescaled(s, m_old, m_new):
    """``s exp(ref(m_old) - ref(m_new))``, 0 for ``s == 0`` (keeps ``0 * inf`` out)."""
    return tl.where(s == 0, 0.0, s * tl.exp(_ref(m_old) - _ref(m_new)))


@triton.jit
def _log1p(u):
    """``log(1 + u)`` accurate for small ``u`` (Goldberg: ``log(w) u / (w - 1)``)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * u / tl.where(w == 1.0, 1.0, w - 1.0))


@triton.jit
def _expm1(x):
    """``exp(x) - 1`` accurate for small ``x`` (Kahan: ``(y - 1) x / log(y)``)."""
    y = tl.exp(x)
    lg = tl.log(y)
    small = (y == 1.0) | (lg == 0.0)
    r = tl.where(small, x, (y - 1.0) * x / tl.where(small, 1.0, lg))
    return tl.where(y == 0.0, -1.0, tl.where(x == float("inf"), float("inf"), r))


@triton.jit
def _log1mexp(x):
    """``log(1 - exp(x))`` for ``x <= 0`` (clamped), accurate at both ends."""
    x = tl.minimum(x, 0.0)
    return tl.where(x > -LN2, tl.log(-_expm1(x)), _log1p(-tl.exp(x)))


@triton.jit
def _row_valid(row, mask_ptr, target_ptr, ignore_index, HAS_MASK: tl.constexpr,
               HAS_TARGET: tl.constexpr):
    """``(mask[row] != 0) & (target[row] != ignore_index)`` (each factor only when given)."""
    valid = row >= 0
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + row) != 0)
    if HAS_TARGET:
        valid = valid & (tl.load(target_ptr + row).to(tl.int64) != ignore_index)
    return valid


# ---------------------------------------------------------------------------------------------
# The states kernel: the dense walk over a V-slice.

@triton.jit
def _lanes(x3):
    """``[UNROLL, LANES, VEC]`` -> ``[LANES, UNROLL * VEC]``: a lane's classes side by side
    (in-thread: each thread already holds all of its lane's)."""
    x = tl.permute(x3, (1, 0, 2))
    return tl.reshape(x, [x.shape[0], x.shape[1] * x.shape[2]])


@triton.jit
def _load_bf16_pairs(row, start, pair3, SHIFT: tl.constexpr):
    """A bf16 tile ``start + SHIFT + ...`` read as int32 pairs ``[1, LANES, VEC / 2]`` and
    widened with one integer instruction per class (``<< 16`` and ``& 0xffff0000``), as
    ``[LANES, VEC]``."""
    w = tl.load(row.to(tl.pointer_type(tl.int32)) + start // 2 + pair3 + SHIFT // 2)
    lo = (w << 16).to(tl.float32, bitcast=True)
    hi = (w & -65536).to(tl.float32, bitcast=True)
    x3 = tl.reshape(tl.join(lo, hi), [w.shape[0], w.shape[1], w.shape[2] * 2])
    return _lanes(x3)


@triton.jit
def _columns(a, b):
    """Two ``[L, m]`` tiles as one ``[L, 2m]``, ``a`` the even columns and ``b`` the odd ones
    (in-thread; :func:`_halves` gives them back)."""
    return tl.reshape(tl.join(a, b), [a.shape[0], a.shape[1] * 2])


@triton.jit
def _unit_columns2(cols, SUB: tl.constexpr):
    return _columns(cols, cols + SUB)


@triton.jit
def _unit_columns4(cols, SUB: tl.constexpr):
    return _columns(_unit_columns2(cols, SUB), _unit_columns2(cols + 2 * SUB, SUB))


@triton.jit
def _unit_columns(cols, SUB: tl.constexpr, U: tl.constexpr):
    """``[LANES, U * VEC]``: unit 0's classes ``cols`` (``[LANES, VEC]``) and the next
    ``U - 1`` units' (``+ SUB`` each), in the column order of :func:`_load_tile`."""
    if U == 1:
        out = cols
    elif U == 2:
        out = _unit_columns2(cols, SUB)
    elif U == 4:
        out = _unit_columns4(cols, SUB)
    else:
        tl.static_assert(U == 8, "U: 1 to 8 units")
        out = _columns(_unit_columns4(cols, SUB), _unit_columns4(cols + 4 * SUB, SUB))
    return out


@triton.jit
def _load_tile(srow, trow, groups_ptr, order_ptr, cw_ptr, start, offs3, pair3, hi, gbase,
               LOAD_S: tl.constexpr, DENSE_T: tl.constexpr, CLASS: tl.constexpr,
               HAS_CW: tl.constexpr, MASKED: tl.constexpr, PAIRS_S: tl.constexpr,
               PAIRS_T: tl.constexpr, CW_LOG: tl.constexpr, ORDER: tl.constexpr,
               U: tl.constexpr, SUB: tl.constexpr, SHIFT: tl.constexpr = 0):
    """One iteration's classes: ``U`` units of ``start + offs3`` (``[1, LANES, VEC]``), unit
    ``u`` at ``+ SHIFT + u * SUB``, as ``[LANES, U * VEC]`` tiles (columns in the order of
    :func:`_unit_columns`): raw student ``x``, raw teacher ``t`` (``-inf`` past ``hi``), group
    ids ``g``, log class weights ``lw``. Unused ones are placeholders the compiler drops.
    ``PAIRS_*``: bf16 rows read as int32 pairs (unmasked tiles only). ``ORDER``: the positions
    are positions of the class order (the classes sorted by group): the classes are
    ``order[start + offs3]`` (gathered; ``ORDER >= 2``: the group is one range, ``start``
    and ``hi`` are classes, read densely), and ``g`` is their group ids (``gbase`` past
    ``hi``).

    Each unit is its own load of ``[1, LANES, VEC]``: one ``[U, LANES, VEC]`` load would tie
    its first two dimensions for the coalescing pass, which Triton 3.6 breaks towards the
    units (threads across units, then a shared-memory conversion of every tile: 2.4 times the
    instructions); one load per unit is laid out lanes-first by every version. A unit's
    constant shift is added to the pointers last (an immediate of the load instruction)."""
    if ORDER == 4:
        x, t, g, lw = _window_tile(srow, trow, groups_ptr, order_ptr, start, hi, gbase, LOAD_S,
                                   DENSE_T, MASKED, SUB * U)
    elif U == 1:
        x, t, g, lw = _load_unit(srow, trow, groups_ptr, order_ptr, cw_ptr, start, offs3, pair3,
                                 hi, gbase, LOAD_S, DENSE_T, CLASS, HAS_CW, MASKED, PAIRS_S,
                                 PAIRS_T, CW_LOG, ORDER, SHIFT)
    elif U == 2:
        x, t, g, lw = _load_units2(srow, trow, groups_ptr, order_ptr, cw_ptr, start, offs3,
                                   pair3, hi, gbase, LOAD_S, DENSE_T, CLASS, HAS_CW, MASKED,
                                   PAIRS_S, PAIRS_T, CW_LOG, ORDER, SUB, SHIFT)
    elif U == 4:
        x, t, g, lw = _load_units4(srow, trow, groups_ptr, order_ptr, cw_ptr, start, offs3,
                                   pair3, hi, gbase, LOAD_S, DENSE_T, CLASS, HAS_CW, MASKED,
                                   PAIRS_S, PAIRS_T, CW_LOG, ORDER, SUB, SHIFT)
    else:
        tl.static_assert(U == 8, "U: 1 to 8 units")
        x0, t0, g0, w0 = _load_units4(srow, trow, groups_ptr, order_ptr, cw_ptr, start, offs3,
                                      pair3, hi, gbase, LOAD_S, DENSE_T, CLASS, HAS_CW, MASKED,
                                      PAIRS_S, PAIRS_T, CW_LOG, ORDER, SUB, SHIFT)
        x1, t1, g1, w1 = _load_units4(srow, trow, groups_ptr, order_ptr, cw_ptr, start, offs3,
                                      pair3, hi, gbase, LOAD_S, DENSE_T, CLASS, HAS_CW, MASKED,
                                      PAIRS_S, PAIRS_T, CW_LOG, ORDER, SUB, SHIFT + 4 * SUB)
        x, t, g, lw = _columns(x0, x1), _columns(t0, t1), _columns(g0, g1), _columns(w0, w1)
    return x, t, g, lw


@triton.jit
def _load_units2(srow, trow, groups_ptr, order_ptr, cw_ptr, start, offs3, pair3, hi, gbase,
                 LOAD_S: tl.constexpr, DENSE_T: tl.constexpr, CLASS: tl.constexpr,
                 HAS_CW: tl.constexpr, MASKED: tl.constexpr, PAIRS_S: tl.constexpr,
                 PAIRS_T: tl.constexpr, CW_LOG: tl.constexpr, ORDER: tl.constexpr,
                 SUB: tl.constexpr, SHIFT: tl.constexpr):
    """Two units of :func:`_load_tile` (at ``SHIFT`` and ``SHIFT + SUB``), columns joined."""
    x0, t0, g0, w0 = _load_unit(srow, trow, groups_ptr, order_ptr, cw_ptr, start, offs3, pair3,
                                hi, gbase, LOAD_S, DENSE_T, CLASS, HAS_CW, MASKED, PAIRS_S,
                                PAIRS_T, CW_LOG, ORDER, SHIFT)
    x1, t1, g1, w1 = _load_unit(srow, trow, groups_ptr, order_ptr, cw_ptr, start, offs3, pair3,
                                hi, gbase, LOAD_S, DENSE_T, CLASS, HAS_CW, MASKED, PAIRS_S,
                                PAIRS_T, CW_LOG, ORDER, SHIFT + SUB)
    return _columns(x0, x1), _columns(t0, t1), _columns(g0, g1), _columns(w0, w1)


@triton.jit
def _load_units4(srow, trow, groups_ptr, order_ptr, cw_ptr, start, offs3, pair3, hi, gbase,
                 LOAD_S: tl.constexpr, DENSE_T: tl.constexpr, CLASS: tl.constexpr,
                 HAS_CW: tl.constexpr, MASKED: tl.constexpr, PAIRS_S: tl.constexpr,
                 PAIRS_T: tl.constexpr, CW_LOG: tl.constexpr, ORDER: tl.constexpr,
                 SUB: tl.constexpr, SHIFT: tl.constexpr):
    """Four units of :func:`_load_tile` (two pairs), columns joined."""
    x0, t0, g0, w0 = _load_units2(srow, trow, groups_ptr, order_ptr, cw_ptr, start, offs3,
                                  pair3, hi, gbase, LOAD_S, DENSE_T, CLASS, HAS_CW, MASKED,
                                  PAIRS_S, PAIRS_T, CW_LOG, ORDER, SUB, SHIFT)
    x1, t1, g1, w1 = _load_units2(srow, trow, groups_ptr, order_ptr, cw_ptr, start, offs3,
                                  pair3, hi, gbase, LOAD_S, DENSE_T, CLASS, HAS_CW, MASKED,
                                  PAIRS_S, PAIRS_T, CW_LOG, ORDER, SUB, SHIFT + 2 * SUB)
    return _columns(x0, x1), _columns(t0, t1), _columns(g0, g1), _columns(w0, w1)


@triton.jit
def _window_tile(srow, trow, groups_ptr, slots_row, start, hi, lane_group, LOAD_S: tl.constexpr,
                 DENSE_T: tl.constexpr, MASKED: tl.constexpr, W: tl.constexpr):
    """The window walk's step (``ORDER == 4``): classes ``[start, start + W)`` read densely
    (``MASKED``: those below ``hi``), then each lane's slots of the plan (``slots_row``:
    ``[LANES * E]`` window offsets, -1 an empty slot) gathered from them through shared memory,
    as ``[LANES, E]``: raw student ``x``, teacher ``t`` (``-inf`` in an empty slot) and ``g``,
    1 where a class's id is not its lane's group (a stale plan, a bad id). Both models' logits
    of a class in the same 16-bit type travel as one 32-bit word (one shared-memory read per
    class for the two)."""
    E: tl.constexpr = W // lane_group.shape[0]
    offs = start + tl.arange(0, W)
    slot = tl.load(slots_row + tl.arange(0, W)).to(tl.int32)
    empty = tl.reshape(slot < 0, [lane_group.shape[0], E])
    pick = slot & (W - 1)  # (in range whatever the plan holds: -1 -> W - 1, an empty slot)
    if MASKED:
        inside = offs < hi
    HALF_S: tl.constexpr = srow.dtype.element_ty.primitive_bitwidth == 16
    if ((LOAD_S and DENSE_T) and HALF_S) and (trow.dtype.element_ty == srow.dtype.element_ty):
        if MASKED:
            xw = tl.load(srow + offs, mask=inside, other=float("-inf"))
            tw = tl.load(trow + offs, mask=inside, other=float("-inf"))
        else:
            xw = tl.load(srow + offs)
            tw = tl.load(trow + offs)
        word = ((xw.to(tl.int16, bitcast=True).to(tl.int32) & 65535)
                | (tw.to(tl.int16, bitcast=True).to(tl.int32) << 16))
        pw = tl.reshape(_gather(word, pick, 0), empty.shape)
        if srow.dtype.element_ty == tl.bfloat16:
            x = (pw << 16).to(tl.float32, bitcast=True)
            t = (pw & -65536).to(tl.float32, bitcast=True)
        else:
            x = pw.to(tl.int16).to(srow.dtype.element_ty, bitcast=True).to(tl.float32)
            t = (pw >> 16).to(tl.int16).to(srow.dtype.element_ty, bitcast=True).to(tl.float32)
        x = tl.where(empty, float("-inf"), x)
        t = tl.where(empty, float("-inf"), t)
    else:
        if LOAD_S:
            if MASKED:
                xw = tl.load(srow + offs, mask=inside, other=float("-inf")).to(tl.float32)
            else:
                xw = tl.load(srow + offs).to(tl.float32)
            x = tl.where(empty, float("-inf"), tl.reshape(_gather(xw, pick, 0), empty.shape))
        else:
            x = tl.zeros(empty.shape, tl.float32)
        if DENSE_T:
            if MASKED:
                tw = tl.load(trow + offs, mask=inside, other=float("-inf")).to(tl.float32)
            else:
                tw = tl.load(trow + offs).to(tl.float32)
            t = tl.where(empty, float("-inf"), tl.reshape(_gather(tw, pick, 0), empty.shape))
        else:
            t = x
    if MASKED:
        gw = tl.load(groups_ptr + offs, mask=inside, other=-1).to(tl.int32)
    else:
        gw = tl.load(groups_ptr + offs).to(tl.int32)
    gid = tl.reshape(_gather(gw, pick, 0), empty.shape)
    g = ((gid != lane_group[:, None]) & ~empty).to(tl.int32)
    return x, t, g, x


@triton.jit
def _load_unit(srow, trow, groups_ptr, order_ptr, cw_ptr, start, offs3, pair3, hi, gbase,
               LOAD_S: tl.constexpr, DENSE_T: tl.constexpr, CLASS: tl.constexpr,
               HAS_CW: tl.constexpr, MASKED: tl.constexpr, PAIRS_S: tl.constexpr,
               PAIRS_T: tl.constexpr, CW_LOG: tl.constexpr, ORDER: tl.constexpr,
               SHIFT: tl.constexpr):
    """One unit of :func:`_load_tile`: the classes ``start + offs3 + SHIFT``, as
    ``[LANES, VEC]`` (``SHIFT`` is 0 for a masked unit)."""
    offs = start + offs3
    # The pointers' constant part (the class order's positions under ORDER == 1, else the
    # classes; under ORDER >= 2 the walk is over the group's range of classes).
    C: tl.constexpr = 0 if ORDER == 1 else SHIFT
    if MASKED:
        inside = offs < hi
    if ORDER == 1:
        # (the scalar start first: the positions are then constant offsets from one address)
        positions = (order_ptr + start) + offs3 + SHIFT
        if MASKED:
            offs = tl.load(positions, mask=inside, other=0)
        else:
            offs = tl.load(positions)
    if LOAD_S:
        if MASKED:
            x = _lanes(tl.load(srow + offs, mask=inside, other=float("-inf")).to(tl.float32))
        elif PAIRS_S:
            x = _load_bf16_pairs(srow, start, pair3, SHIFT)
        else:
            x = _lanes(tl.load(srow + offs + C).to(tl.float32))
    else:
        x = _lanes(tl.zeros(offs.shape, tl.float32))
    if DENSE_T:
        if MASKED:
            t = _lanes(tl.load(trow + offs, mask=inside, other=float("-inf")).to(tl.float32))
        elif PAIRS_T:
            t = _load_bf16_pairs(trow, start, pair3, SHIFT)
        else:
            t = _lanes(tl.load(trow + offs + C).to(tl.float32))
    else:
        t = x
    if ORDER == 3 and not MASKED:
        # int8 ids checked four at a time: a word of the walked group's id in every byte (its
        # id check then sees gbase, else gbase + 1: one entry per word, not per class).
        W: tl.constexpr = offs3.shape[2] // 4
        words3 = tl.arange(0, offs3.shape[1])[None, :, None] * W + tl.arange(0, W)[None, None, :]
        w = tl.load(groups_ptr.to(tl.pointer_type(tl.int32)) + start // 4 + words3 + SHIFT // 4)
        g = _lanes(tl.where(w == gbase * 16843009, gbase, gbase + 1))
    elif ORDER or CLASS:
        if MASKED:
            # (past hi: group 0, or under ORDER the walked group, which its id check expects)
            past = gbase if ORDER else 0
            g = _lanes(tl.load(groups_ptr + offs, mask=inside, other=past).to(tl.int32))
        else:
            g = _lanes(tl.load(groups_ptr + offs + C).to(tl.int32))
    else:
        g = _lanes(tl.zeros(offs.shape, tl.int32))
    if HAS_CW:
        if MASKED:
            lw = _lanes(_log_weight(cw_ptr + offs, inside, CW_LOG))
        else:
            lw = _lanes(_log_weight(cw_ptr + offs + C, None, CW_LOG))
    else:
        lw = x
    return x, t, g, lw


@triton.jit
def _sum_elem(x, t, g, lw, mS, mT, sS, sT, h, sX, bad, gk, live, G, RS, RT, RX, refS, refT,
              c_s, c_t, inv_t, CLASS: tl.constexpr, DENSE_S: tl.constexpr,
              DENSE_T: tl.constexpr, WITH_H: tl.constexpr, HAS_CW: tl.constexpr,
              CE_SEP: tl.constexpr, EXACT: tl.constexpr, BAD_OR: tl.constexpr,
              TRACK: tl.constexpr):
    """:func:`_sum_elems` of one element per lane (``[LANES, 1]`` tiles)."""
    x = tl.reshape(x, [x.shape[0]])
    t = tl.reshape(t, [t.shape[0]])
    g = tl.reshape(g, [g.shape[0]])
    lw = tl.reshape(lw, [lw.shape[0]])
    if CLASS:
        p = (g[None, :] == gk[:, None]) & live[:, None]
        if not EXACT:
            if BAD_OR:
                bad = bad | g
            else:
                bad = bad | (g.to(tl.uint32, bitcast=True) >= G).to(tl.int32)
            if DENSE_S and TRACK:
                mS = tl.where(p, tl.maximum(mS, x[None, :]), mS)
        if EXACT:
            rS = tl.sum(tl.where(p, refS[:, None], 0.0), axis=0)
        else:
            rS = RS
    else:
        rS = RS
        xs = x - rS
    if DENSE_S:
        if CLASS:
            eS = tl.math.exp2(x * c_s - rS)
        else:
            eS = tl.math.exp2(xs * c_s)
        if CLASS:
            sS = tl.where(p, sS + eS[None, :], sS)
        else:
            sS = sS + eS[None, :]
    if DENSE_T:
        if HAS_CW:
            tv = t * inv_t + lw
        else:
            tv = t
        if CLASS:
            if (not EXACT) and TRACK:
                mT = tl.where(p, tl.maximum(mT, tv[None, :]), mT)
            if EXACT:
                rT = tl.sum(tl.where(p, refT[:, None], 0.0), axis=0)
            else:
                rT = RT
            eT = tl.math.exp2(tv * c_t - rT)
        else:
            ts = tv - RT
            eT = tl.math.exp2(ts * c_t)
        if CLASS:
            sT = tl.where(p, sT + eT[None, :], sT)
        else:
            sT = sT + eT[None, :]
        if WITH_H:
            if CLASS:
                if HAS_CW:
                    d = tv - x * inv_t
                else:
                    d = tv - x
            else:
                if HAS_CW:
                    d = ts - xs * inv_t
                else:
                    d = ts - xs
            # A masked teacher class adds nothing: 0 * (a - b) would be NaN at a = -inf
            # (d = -inf, or NaN where b = -inf too); the NaN-ignoring max makes d finite
            # there and keeps d = +inf (a student -inf under teacher mass: g = +inf). A NaN
            # logit still reaches the sums through its exp.
            d = tl.maximum(d, -3.4028234663852886e38)
            if CLASS:
                h = tl.where(p, h + eT[None, :] * d[None, :], h)
            else:
                h = h + eT[None, :] * d[None, :]
    if CE_SEP:
        if CLASS:
            sX = sX + tl.math.exp2(x * LOG2E - RX)
        else:
            sX = sX + tl.math.exp2((x - RX) * LOG2E)
    return mS, mT, sS, sT, h, sX, bad


@triton.jit
def _sum_elems2(x, t, g, lw, mS, mT, sS, sT, h, sX, bad, gk, live, G, RS, RT, RX, refS, refT,
                c_s, c_t, inv_t, CLASS: tl.constexpr, DENSE_S: tl.constexpr,
                DENSE_T: tl.constexpr, WITH_H: tl.constexpr, HAS_CW: tl.constexpr,
                CE_SEP: tl.constexpr, EXACT: tl.constexpr, BAD_OR: tl.constexpr,
                TRACK: tl.constexpr):
    """Two elements per lane, one after the other."""
    x0, x1 = _halves(x)
    t0, t1 = _halves(t)
    g0, g1 = _halves(g)
    w0, w1 = _halves(lw)
    mS, mT, sS, sT, h, sX, bad = _sum_elem(
        x0, t0, g0, w0, mS, mT, sS, sT, h, sX, bad, gk, live, G, RS, RT, RX, refS, refT,
        c_s, c_t, inv_t, CLASS, DENSE_S, DENSE_T, WITH_H, HAS_CW, CE_SEP, EXACT, BAD_OR, TRACK)
    return _sum_elem(
        x1, t1, g1, w1, mS, mT, sS, sT, h, sX, bad, gk, live, G, RS, RT, RX, refS, refT,
        c_s, c_t, inv_t, CLASS, DENSE_S, DENSE_T, WITH_H, HAS_CW, CE_SEP, EXACT, BAD_OR, TRACK)


@triton.jit
def _sum_elems4(x, t, g, lw, mS, mT, sS, sT, h, sX, bad, gk, live, G, RS, RT, RX, refS, refT,
                c_s, c_t, inv_t, CLASS: tl.constexpr, DENSE_S: tl.constexpr,
                DENSE_T: tl.constexpr, WITH_H: tl.constexpr, HAS_CW: tl.constexpr,
                CE_SEP: tl.constexpr, EXACT: tl.constexpr, BAD_OR: tl.constexpr,
                TRACK: tl.constexpr):
    """Four elements per lane (two halves)."""
    x0, x1 = _halves(x)
    t0, t1 = _halves(t)
    g0, g1 = _halves(g)
    w0, w1 = _halves(lw)
    mS, mT, sS, sT, h, sX, bad = _sum_elems2(
        x0, t0, g0, w0, mS, mT, sS, sT, h, sX, bad, gk, live, G, RS, RT, RX, refS, refT,
        c_s, c_t, inv_t, CLASS, DENSE_S, DENSE_T, WITH_H, HAS_CW, CE_SEP, EXACT, BAD_OR, TRACK)
    return _sum_elems2(
        x1, t1, g1, w1, mS, mT, sS, sT, h, sX, bad, gk, live, G, RS, RT, RX, refS, refT,
        c_s, c_t, inv_t, CLASS, DENSE_S, DENSE_T, WITH_H, HAS_CW, CE_SEP, EXACT, BAD_OR, TRACK)


@triton.jit
def _sum_elems8(x, t, g, lw, mS, mT, sS, sT, h, sX, bad, gk, live, G, RS, RT, RX, refS, refT,
                c_s, c_t, inv_t, CLASS: tl.constexpr, DENSE_S: tl.constexpr,
                DENSE_T: tl.constexpr, WITH_H: tl.constexpr, HAS_CW: tl.constexpr,
                CE_SEP: tl.constexpr, EXACT: tl.constexpr, BAD_OR: tl.constexpr,
                TRACK: tl.constexpr):
    """Eight elements per lane (two halves)."""
    x0, x1 = _halves(x)
    t0, t1 = _halves(t)
    g0, g1 = _halves(g)
    w0, w1 = _halves(lw)
    mS, mT, sS, sT, h, sX, bad = _sum_elems4(
        x0, t0, g0, w0, mS, mT, sS, sT, h, sX, bad, gk, live, G, RS, RT, RX, refS, refT,
        c_s, c_t, inv_t, CLASS, DENSE_S, DENSE_T, WITH_H, HAS_CW, CE_SEP, EXACT, BAD_OR, TRACK)
    return _sum_elems4(
        x1, t1, g1, w1, mS, mT, sS, sT, h, sX, bad, gk, live, G, RS, RT, RX, refS, refT,
        c_s, c_t, inv_t, CLASS, DENSE_S, DENSE_T, WITH_H, HAS_CW, CE_SEP, EXACT, BAD_OR, TRACK)


@triton.jit
def _sum_elems(x, t, g, lw, mS, mT, sS, sT, h, sX, bad, gk, live, G, RS, RT, RX, refS, refT,
               c_s, c_t, inv_t, CLASS: tl.constexpr, DENSE_S: tl.constexpr,
               DENSE_T: tl.constexpr, WITH_H: tl.constexpr, HAS_CW: tl.constexpr,
               CE_SEP: tl.constexpr, EXACT: tl.constexpr, BAD_OR: tl.constexpr,
               TRACK: tl.constexpr, VEC: tl.constexpr):
    """The elements of a ``[LANES, VEC]`` sub-tile, one at a time. Each raises its own
    group's maxima (CLASS with ``TRACK``; raw student ``x``, teacher value ``v``: raw ``t``, or
    ``a`` with class weights) and adds ``exp(b - R)``, ``exp(a - R')`` and ``exp(a - R') d`` to
    its own group's sums, ``R``, ``R'`` the lane's running maxima (with ``EXACT`` the element's own
    group's maxima ``refS``, ``refT``), and ``exp(x - RX)`` to the cross-entropy sum.

    One-group walks take every exponent as a difference first (exactly 0 at the maximum: a
    one-class row gets ``s = 1``, ``g = 0`` exactly) and ``d = (a - R') - (b - R)``; the CLASS
    walk (its references are shared by the groups, so that exactness is not available
    anyway) takes one FFMA per exponent (``RS``, ``RT``, ``refS``, ``refT`` pre-scaled by
    ``c``) and ``d = a - b``. ``h`` is in raw units (``a``-units with class weights). Group
    ids outside ``[0, G)`` are flagged (``BAD_OR``: the ids' OR is kept, for a power-of-two
    G). Each group costs a compare and three predicated operations per element (five with
    ``TRACK``)."""
    if VEC == 1:
        mS, mT, sS, sT, h, sX, bad = _sum_elem(
            x, t, g, lw, mS, mT, sS, sT, h, sX, bad, gk, live, G, RS, RT, RX, refS, refT,
            c_s, c_t, inv_t, CLASS, DENSE_S, DENSE_T, WITH_H, HAS_CW, CE_SEP, EXACT, BAD_OR,
            TRACK)
    elif VEC == 2:
        mS, mT, sS, sT, h, sX, bad = _sum_elems2(
            x, t, g, lw, mS, mT, sS, sT, h, sX, bad, gk, live, G, RS, RT, RX, refS, refT,
            c_s, c_t, inv_t, CLASS, DENSE_S, DENSE_T, WITH_H, HAS_CW, CE_SEP, EXACT, BAD_OR,
            TRACK)
    elif VEC == 4:
        mS, mT, sS, sT, h, sX, bad = _sum_elems4(
            x, t, g, lw, mS, mT, sS, sT, h, sX, bad, gk, live, G, RS, RT, RX, refS, refT,
            c_s, c_t, inv_t, CLASS, DENSE_S, DENSE_T, WITH_H, HAS_CW, CE_SEP, EXACT, BAD_OR,
            TRACK)
    elif VEC == 8:
        mS, mT, sS, sT, h, sX, bad = _sum_elems8(
            x, t, g, lw, mS, mT, sS, sT, h, sX, bad, gk, live, G, RS, RT, RX, refS, refT,
            c_s, c_t, inv_t, CLASS, DENSE_S, DENSE_T, WITH_H, HAS_CW, CE_SEP, EXACT, BAD_OR,
            TRACK)
    else:
        tl.static_assert(VEC == 16, "VEC: 1 to 16 elements per lane")
        x0, x1 = _halves(x)
        t0, t1 = _halves(t)
        g0, g1 = _halves(g)
        w0, w1 = _halves(lw)
        mS, mT, sS, sT, h, sX, bad = _sum_elems8(
            x0, t0, g0, w0, mS, mT, sS, sT, h, sX, bad, gk, live, G, RS, RT, RX, refS, refT,
            c_s, c_t, inv_t, CLASS, DENSE_S, DENSE_T, WITH_H, HAS_CW, CE_SEP, EXACT, BAD_OR,
            TRACK)
        mS, mT, sS, sT, h, sX, bad = _sum_elems8(
            x1, t1, g1, w1, mS, mT, sS, sT, h, sX, bad, gk, live, G, RS, RT, RX, refS, refT,
            c_s, c_t, inv_t, CLASS, DENSE_S, DENSE_T, WITH_H, HAS_CW, CE_SEP, EXACT, BAD_OR,
            TRACK)
    return mS, mT, sS, sT, h, sX, bad


@triton.jit
def _ce_sums(x, sX, RX, VEC: tl.constexpr):
    """``sX += exp(x - RX)`` for every element of a ``[LANES, VEC]`` sub-tile."""
    return sX + tl.sum(tl.math.exp2((x - RX[:, None]) * LOG2E), axis=1)


@triton.jit
def _excluded_at(excl_ptr, q, pend, t_local, EXCL: tl.constexpr):
    """The ``q``-th excluded class of the slice (ascending), or 2^31 - 1 past the last."""
    if EXCL == 1:
        c = tl.where(q < pend, t_local, 2147483647)
    else:
        c = tl.load(excl_ptr + q, mask=q < pend, other=2147483647)
    return c


@triton.jit
def _excluded_mask(excl_ptr, p, pend, t_local, start, end, offs, EXCL: tl.constexpr):
    """The excluded classes among ``start + offs`` (``[LANES, E]``) below ``end``, consumed
    from the ascending list (returns the mask and the next position)."""
    o = start + offs
    m = o < 0
    c = _excluded_at(excl_ptr, p, pend, t_local, EXCL)
    while c < end:
        m = m | (o == c)
        p += 1
        c = _excluded_at(excl_ptr, p, pend, t_local, EXCL)
    return m, p


@triton.jit
def _dense_step(srow, trow, groups_ptr, order_ptr, cw_ptr, start, hi, offs3, pair3, ex,
                mS, mT, sS, sT, h, LX, LT, LA, sX, bad, seen, twice,
                gk, live, G, gbase, inv_t, c_s, c_t, refS, refT,
                CLASS: tl.constexpr, DENSE_S: tl.constexpr, DENSE_T: tl.constexpr,
                WITH_H: tl.constexpr, HAS_CW: tl.constexpr, CE_SEP: tl.constexpr,
                EXACT: tl.constexpr, SHARED: tl.constexpr, MASKED: tl.constexpr,
                EXCL: tl.constexpr,
                HAS_EX: tl.constexpr, BAD_OR: tl.constexpr, PAIRS_S: tl.constexpr,
                PAIRS_T: tl.constexpr, CW_LOG: tl.constexpr, ORDER: tl.constexpr,
                E: tl.constexpr):
    """One iteration over ``E // VEC`` units of classes ``start + offs3`` (``[1, LANES, VEC]``;
    see :func:`_load_tile`), ``E`` per lane.

    Lane state: ``mS``, ``mT`` ``[GC, LANES]`` raw group maxima; ``sS``, ``sT``, ``h``
    ``[GC, LANES]`` sums relative to the lane maxima ``LX`` (student), ``LT`` (teacher value);
    ``LA``, ``sX`` ``[LANES]``: the lane's raw all-class maximum and ``sum exp(x - LA)`` (CE).
    ``ex`` (``HAS_EX``, ``[LANES, E]``): the walk's excluded classes in this block, left out of
    the walked group (``EXCL == 1``: the TARGET rule's target; ``EXCL == 2``: BUCKET's
    entries, so the walked group is the rest); the cross-entropy always sees every class.
    ``SHARED`` (CLASS): no per-group maxima (``mS``, ``mT`` stay as given); ``seen``
    ``[LANES]`` collects bit ``k`` of each group ``gbase + k`` the lane holds, ``twice`` those it
    holds more than once (ids clamped to bit 31: the bits past the chunk are never read).
    ``ORDER`` (a one-group walk over positions of the class order, the walked group ``gbase``):
    a class whose id is not ``gbase`` (a stale order, or a bad id) sets ``bad``."""
    LOAD_S: tl.constexpr = DENSE_S or CE_SEP
    x, t, g, lw = _load_tile(srow, trow, groups_ptr, order_ptr, cw_ptr, start, offs3, pair3, hi,
                             gbase, LOAD_S, DENSE_T, CLASS, HAS_CW, MASKED, PAIRS_S, PAIRS_T,
                             CW_LOG, ORDER, E // offs3.shape[2], offs3.shape[1] * offs3.shape[2])
    if ORDER == 4:
        bad = bad | tl.max(g, axis=1)
    elif ORDER:
        bad = bad | tl.max((g != gbase).to(tl.int32), axis=1)
        if ORDER == 3:
            g = t  # (one entry per word: not a per-class tile; unused past the check)
    if SHARED:
        bit = tl.minimum((g - gbase).to(tl.uint32, bitcast=True), 31)
        bits = (tl.full(bit.shape, 1, tl.uint32) << bit).to(tl.int32, bitcast=True)
        if MASKED:
            bits = tl.where(_lanes(start + offs3 < hi), bits, 0)
        seen, twice = _held_bits(bits, seen, twice, E)
    # The cross-entropy over every class of the lane, kept at the lane's own maximum.
    CE_APART: tl.constexpr = CE_SEP and (((EXCL != 0) or (not DENSE_S)) or EXACT)
    if CE_APART:
        newA = tl.maximum(LA, tl.max(x, axis=1))
        RX = _ref(newA)
        sX = sX * tl.where(LA == float("-inf"), 0.0, tl.math.exp2((_ref(LA) - RX) * LOG2E))
        LA = newA
        sX = _ce_sums(x, sX, RX, E)
    if HAS_EX:
        x = tl.where(ex, float("-inf"), x)
        t = tl.where(ex, float("-inf"), t)
    if EXACT:
        RS = LX
        RT = LT
    else:
        # The lane's running maxima over all its classes, raised by this iteration's.
        newX = tl.maximum(LX, tl.max(x, axis=1))
        if HAS_CW:
            newT = tl.maximum(LT, tl.max(t * inv_t + lw, axis=1))
        else:
            newT = tl.maximum(LT, tl.max(t, axis=1))
        if not CLASS:
            mS = newX[None, :]
            mT = newT[None, :]
        # Move the sums to the raised maxima (a factor 0 while a lane had no finite value: its
        # sums are 0, or NaN, which stays NaN); the gap's terms shift by the references' drift.
        RS = _ref(newX)
        RT = _ref(newT)
        dS = _ref(LX) - RS
        if DENSE_S:
            sS = sS * tl.where(LX == float("-inf"), 0.0, tl.math.exp2(dS * c_s))[None, :]
        if DENSE_T:
            dT = _ref(LT) - RT
            fT = tl.where(LT == float("-inf"), 0.0, tl.math.exp2(dT * c_t))[None, :]
            if WITH_H:
                if CLASS:
                    h = h * fT
                else:
                    # Its terms are relative to the references: they shift with them. (The
                    # drift is scaled by fT first: a lane whose sums were at a reference far
                    # below, finfo.min logits say, has fT = 0 and a huge drift: 0, not NaN. In
                    # a-units the drift is clamped finite: the student's part, scaled by 1 / T,
                    # overflows for such logits, or for a lane's first finite ones.)
                    if HAS_CW:
                        drift = tl.minimum(tl.maximum(dT - dS * inv_t, -3.4028234663852886e38),
                                           3.4028234663852886e38)
                    else:
                        drift = dT - dS
                    h = h * fT + sT * (drift * fT)
            sT = sT * fT
        LX = newX
        LT = newT
        if CLASS:
            # The CLASS walk's exponents are single FFMAs: references pre-scaled, 0 where the
            # scaled maximum is -inf (z / T overflowed, finfo.min logits): its classes then add
            # exp2(-inf) = 0, as the torch form's ref() makes them (never -inf - -inf).
            RS = _ref(RS * c_s)
            RT = _ref(RT * c_t)
    CE_WITH: tl.constexpr = CE_SEP and not CE_APART
    if CE_WITH:
        # The walked student's lane maximum is the all-class one: the CE shares it.
        RX = _ref(LX)
        sX = sX * tl.where(LA == float("-inf"), 0.0, tl.math.exp2((_ref(LA) - RX) * LOG2E))
        LA = LX
    if not CE_SEP:
        RX = LA
    CE_IN: tl.constexpr = CE_WITH
    if CE_IN and CLASS:
        RX = _ref(RX * LOG2E)
    TRACK: tl.constexpr = not SHARED
    mS, mT, sS, sT, h, sX, bad = _sum_elems(
        x, t, g, lw, mS, mT, sS, sT, h, sX, bad, gk, live, G, RS, RT, RX, refS, refT, c_s, c_t,
        inv_t, CLASS, DENSE_S, DENSE_T, WITH_H, HAS_CW, CE_IN, EXACT, BAD_OR, TRACK, E)
    return mS, mT, sS, sT, h, LX, LT, LA, sX, bad, seen, twice


@triton.jit
def _dense_pass(srow, trow, groups_ptr, order_ptr, cw_ptr, excl_ptr, lo, hi, t_local, p0, pend,
                gbase, G, inv_t, refS, refT, CLASS: tl.constexpr, DENSE_S: tl.constexpr,
                DENSE_T: tl.constexpr, WITH_H: tl.constexpr, HAS_CW: tl.constexpr,
                CE_SEP: tl.constexpr, EXACT: tl.constexpr, SHARED: tl.constexpr,
                EXCL: tl.constexpr, BAD_OR: tl.constexpr, PAIRS_S: tl.constexpr,
                PAIRS_T: tl.constexpr, CW_LOG: tl.constexpr, ORDER: tl.constexpr,
                GC: tl.constexpr, G_LIVE: tl.constexpr, VEC: tl.constexpr,
                UNROLL: tl.constexpr, LANES: tl.constexpr, STAGES: tl.constexpr = 1):
    """Walk classes ``[lo, hi)``: full blocks of ``LANES * VEC * UNROLL`` unmasked, then the
    remainder one masked ``[LANES, VEC]`` sub-tile at a time. With excluded classes (``EXCL``:
    positions ``p0 .. pend`` of an ascending list), the full blocks holding one are left out of
    the fast loop and taken with masks. ``ORDER``: ``[lo, hi)`` are positions of the class order
    (one group's classes, see :func:`_load_tile`); for a group that is one range of classes
    (``ORDER >= 2``: ``[lo, hi)`` are its classes) the range starts anywhere, so the classes
    up to the next multiple of ``LANES * VEC`` are one masked sub-tile first, and the fast
    loop's loads stay aligned. ``STAGES > 1``: the unmasked loop software-pipelined by the
    compiler (``tl.range(num_stages=STAGES)``: the next blocks' loads in flight through
    shared memory while a block is summed; see :func:`grouped_kl_states_kernel`). Returns the
    lane state (see :func:`_dense_step`)."""
    SUB: tl.constexpr = LANES * VEC
    BLOCK: tl.constexpr = SUB * UNROLL
    E: tl.constexpr = VEC * UNROLL
    HALF: tl.constexpr = (VEC + 1) // 2
    kk = tl.arange(0, GC)
    gk = gbase + kk
    live = kk < G_LIVE
    l3 = tl.arange(0, LANES)[None, :, None]
    offs3 = l3 * VEC + tl.arange(0, VEC)[None, None, :]     # unit 0 (and the tail's sub-tile)
    pair3 = l3 * HALF + tl.arange(0, HALF)[None, None, :]
    tail = _lanes(offs3)
    offs = _unit_columns(tail, SUB, UNROLL)                # [LANES, E] (exclusion masks)
    c_s = inv_t * LOG2E
    if HAS_CW:
        c_t = LOG2E + 0.0 * inv_t
    else:
        c_t = inv_t * LOG2E
    mS = tl.full([GC, LANES], float("-inf"), tl.float32)
    mT = tl.full([GC, LANES], float("-inf"), tl.float32)
    sS = tl.zeros([GC, LANES], tl.float32)
    sT = tl.zeros([GC, LANES], tl.float32)
    h = tl.zeros([GC, LANES], tl.float32)
    LX = tl.full([LANES], float("-inf"), tl.float32)
    LT = tl.full([LANES], float("-inf"), tl.float32)
    if EXACT:
        LX = tl.zeros([LANES], tl.float32)
        LT = tl.zeros([LANES], tl.float32)
    LA = tl.full([LANES], float("-inf"), tl.float32)
    sX = tl.zeros([LANES], tl.float32)
    bad = tl.zeros([LANES], tl.int32)
    seen = tl.zeros([LANES], tl.int32)
    twice = tl.zeros([LANES], tl.int32)
    no_ex = offs < 0
    if ORDER >= 2:
        # (a multiple of SUB by construction: the compiler sees the alignment of the loads)
        up = ((lo + (SUB - 1)) // SUB) * SUB
        head_end = tl.minimum(up, hi)
        if lo < head_end:
            mS, mT, sS, sT, h, LX, LT, LA, sX, bad, seen, twice = _dense_step(
                srow, trow, groups_ptr, order_ptr, cw_ptr, lo, head_end, offs3, offs3,
                tail < 0, mS, mT, sS, sT, h, LX, LT, LA, sX, bad, seen, twice, gk, live, G,
                gbase, inv_t, c_s, c_t, refS, refT, CLASS, DENSE_S, DENSE_T, WITH_H, HAS_CW,
                CE_SEP, EXACT, SHARED, True, EXCL, False, BAD_OR, False, False, CW_LOG, ORDER,
                VEC)
        lo = up
        nfull = (tl.maximum(hi - lo, 0).to(tl.uint32) // BLOCK).to(tl.int32)
    else:
        # (Non-negative: divided as unsigned, a shift without a sign fix-up to keep alive.)
        nfull = ((hi - lo).to(tl.uint32) // BLOCK).to(tl.int32)
    p = p0
    if EXCL == 0:
        # (num_stages=1: the plain loop, the same code as range())
        for i in tl.range(0, nfull, num_stages=STAGES):
            mS, mT, sS, sT, h, LX, LT, LA, sX, bad, seen, twice = _dense_step(
                srow, trow, groups_ptr, order_ptr, cw_ptr, lo + i * BLOCK, hi, offs3, pair3,
                no_ex, mS, mT, sS, sT, h, LX, LT, LA, sX, bad, seen, twice, gk, live, G, gbase,
                inv_t, c_s, c_t, refS, refT, CLASS, DENSE_S, DENSE_T, WITH_H, HAS_CW, CE_SEP, EXACT,
                SHARED, False, EXCL, False, BAD_OR, PAIRS_S, PAIRS_T, CW_LOG, ORDER, E)
    else:
        blk = 0
        while blk < nfull:
            # Fast blocks up to the next one holding an excluded class.
            c = _excluded_at(excl_ptr, p, pend, t_local, EXCL)
            nxt = tl.minimum(((tl.maximum(c, lo) - lo).to(tl.uint32) // BLOCK).to(tl.int32),
                             nfull)
            for i in range(blk, nxt):
                mS, mT, sS, sT, h, LX, LT, LA, sX, bad, seen, twice = _dense_step(
                    srow, trow, groups_ptr, order_ptr, cw_ptr, lo + i * BLOCK, hi, offs3, pair3,
                    no_ex, mS, mT, sS, sT, h, LX, LT, LA, sX, bad, seen, twice, gk, live, G, gbase,
                    inv_t, c_s, c_t, refS, refT, CLASS, DENSE_S, DENSE_T, WITH_H, HAS_CW, CE_SEP,
                    EXACT, SHARED, False, EXCL, False, BAD_OR, PAIRS_S, PAIRS_T, CW_LOG, ORDER, E)
            if nxt < nfull:
                start = lo + nxt * BLOCK
                ex, p = _excluded_mask(excl_ptr, p, pend, t_local, start, start + BLOCK, offs,
                                       EXCL)
                mS, mT, sS, sT, h, LX, LT, LA, sX, bad, seen, twice = _dense_step(
                    srow, trow, groups_ptr, order_ptr, cw_ptr, start, hi, offs3, pair3, ex,
                    mS, mT, sS, sT, h, LX, LT, LA, sX, bad, seen, twice, gk, live, G, gbase,
                    inv_t, c_s, c_t, refS, refT, CLASS, DENSE_S, DENSE_T, WITH_H, HAS_CW, CE_SEP,
                    EXACT, SHARED, False, EXCL, True, BAD_OR, PAIRS_S, PAIRS_T, CW_LOG, ORDER, E)
            blk = nxt + 1
    # The remainder, one masked sub-tile at a time (a fraction of the loop's code).
    no_ex_tail = tail < 0
    for start in range(lo + nfull * BLOCK, hi, SUB):
        if EXCL == 0:
            ex = no_ex_tail
        else:
            ex, p = _excluded_mask(excl_ptr, p, pend, t_local, start, start + SUB, tail, EXCL)
        mS, mT, sS, sT, h, LX, LT, LA, sX, bad, seen, twice = _dense_step(
            srow, trow, groups_ptr, order_ptr, cw_ptr, start, hi, offs3, offs3, ex,
            mS, mT, sS, sT, h, LX, LT, LA, sX, bad, seen, twice, gk, live, G, gbase, inv_t,
            c_s, c_t, refS, refT, CLASS, DENSE_S, DENSE_T, WITH_H, HAS_CW, CE_SEP, EXACT, SHARED,
            True, EXCL, EXCL != 0, BAD_OR, False, False, CW_LOG, ORDER, VEC)
    return mS, mT, sS, sT, h, LX, LT, LA, sX, bad, seen, twice


@triton.jit
def _window_pass(srow, trow, groups_ptr, plan_ptr, slots_ptr, lo, hi, V, G, lane_group, inv_t,
                 DENSE_S: tl.constexpr, DENSE_T: tl.constexpr, WITH_H: tl.constexpr,
                 CE_SEP: tl.constexpr, CW_LOG: tl.constexpr, VEC: tl.constexpr,
                 UNROLL: tl.constexpr, LANES: tl.constexpr):
    """The window walk (``ORDER == 4``) over steps ``[lo, hi)`` of the plan ``plan_ptr`` /
    ``slots_ptr`` (:class:`ltkd_kernels.ops.class_order.WindowPlan`): each lane a one-group
    walk over the classes of its group ``lane_group`` the steps hand it. The steps whose window
    lies inside the row come first, unmasked. Returns the lane state (see :func:`_dense_step`)."""
    W: tl.constexpr = LANES * VEC * UNROLL
    E: tl.constexpr = VEC * UNROLL
    l3 = tl.arange(0, LANES)[None, :, None]
    offs3 = l3 * VEC + tl.arange(0, VEC)[None, None, :]
    no_ex = _lanes(offs3) < 0
    if UNROLL > 1:
        no_ex = _unit_columns(no_ex, LANES * VEC, UNROLL)
    gk = tl.zeros([1], tl.int32)
    live = gk == 0
    no_ref = tl.zeros([1], tl.float32)
    c_s = inv_t * LOG2E
    c_t = inv_t * LOG2E
    mS = tl.full([1, LANES], float("-inf"), tl.float32)
    mT = tl.full([1, LANES], float("-inf"), tl.float32)
    sS = tl.zeros([1, LANES], tl.float32)
    sT = tl.zeros([1, LANES], tl.float32)
    h = tl.zeros([1, LANES], tl.float32)
    LX = tl.full([LANES], float("-inf"), tl.float32)
    LT = tl.full([LANES], float("-inf"), tl.float32)
    LA = tl.full([LANES], float("-inf"), tl.float32)
    sX = tl.zeros([LANES], tl.float32)
    bad = tl.zeros([LANES], tl.int32)
    seen = tl.zeros([LANES], tl.int32)
    twice = tl.zeros([LANES], tl.int32)
    inside = tl.load(plan_ptr + 1)
    starts = plan_ptr + 2 + LANES + G
    for step in range(lo, tl.minimum(hi, inside)):
        start = tl.multiple_of(tl.load(starts + step), 16)
        mS, mT, sS, sT, h, LX, LT, LA, sX, bad, seen, twice = _dense_step(
            srow, trow, groups_ptr, slots_ptr + step * W, srow, start, V, offs3, offs3, no_ex,
            mS, mT, sS, sT, h, LX, LT, LA, sX, bad, seen, twice, gk, live, G, lane_group,
            inv_t, c_s, c_t, no_ref, no_ref, False, DENSE_S, DENSE_T, WITH_H, False, CE_SEP,
            False, False, False, 0, False, False, False, False, CW_LOG, 4, E)
    for step in range(tl.maximum(lo, inside), hi):
        start = tl.multiple_of(tl.load(starts + step), 16)
        mS, mT, sS, sT, h, LX, LT, LA, sX, bad, seen, twice = _dense_step(
            srow, trow, groups_ptr, slots_ptr + step * W, srow, start, V, offs3, offs3, no_ex,
            mS, mT, sS, sT, h, LX, LT, LA, sX, bad, seen, twice, gk, live, G, lane_group,
            inv_t, c_s, c_t, no_ref, no_ref, False, DENSE_S, DENSE_T, WITH_H, False, CE_SEP,
            False, False, True, 0, False, False, False, False, CW_LOG, 4, E)
    return mS, mT, sS, sT, h, LX, LT, LA, sX, bad


@triton.jit
def _window_combine(ka, ca, xa, sa, ta, ua, ha, kb, cb, xb, sb, tb, ub, hb):
    """The window walk's segmented merge of lane states ``(group, c, X, sS, T, sT, h)``
    (:func:`_window_pass`'s, sums relative to ``ref(X)``, ``ref(T)``, ``c`` the exponent scale):
    the exact merge of ``a`` and ``b`` when they hold the same group, else ``b`` (a group's
    lanes are consecutive: a scan restarts at each group's first lane)."""
    X = tl.maximum(xa, xb)
    T = tl.maximum(ta, tb)
    rX = _ref(X)
    rT = _ref(T)
    fSa = tl.where(xa == float("-inf"), 0.0, tl.math.exp2((_ref(xa) - rX) * ca))
    fSb = tl.where(xb == float("-inf"), 0.0, tl.math.exp2((_ref(xb) - rX) * ca))
    fTa = tl.where(ta == float("-inf"), 0.0, tl.math.exp2((_ref(ta) - rT) * ca))
    fTb = tl.where(tb == float("-inf"), 0.0, tl.math.exp2((_ref(tb) - rT) * ca))
    s = tl.where(sa == 0, 0.0, sa * fSa) + tl.where(sb == 0, 0.0, sb * fSb)
    u = tl.where(ua == 0, 0.0, ua * fTa) + tl.where(ub == 0, 0.0, ub * fTb)
    # (h is relative to each side's references: it shifts with them, as in _dense_step)
    h = (tl.where(ua == 0, 0.0, (ha + ua * ((_ref(ta) - rT) - (_ref(xa) - rX))) * fTa)
         + tl.where(ub == 0, 0.0, (hb + ub * ((_ref(tb) - rT) - (_ref(xb) - rX))) * fTb))
    same = ka == kb
    return (kb, cb, tl.where(same, X, xb), tl.where(same, s, sb), tl.where(same, T, tb),
            tl.where(same, u, ub), tl.where(same, h, hb))


@triton.jit
def _merge_window_lanes(lane_group, group_last, X, sS, T, sT, h, inv_t):
    """Lanes -> the per-group state ``(m^S, s^S, m^T, s^T, g)`` ``[BLOCK_G]`` of the window
    walk: one segmented scan over the lanes (each group's lanes consecutive), read at each
    group's last lane ``group_last`` (-1: the group has none, an empty state). Work per
    program independent of G."""
    c = tl.zeros_like(X) + inv_t * LOG2E
    _, _, mX, mS, mT, mST, mH = tl.associative_scan(
        (lane_group, c, X, sS, T, sT, h), 0, _window_combine)
    held = group_last >= 0
    at = tl.maximum(group_last, 0)
    m_s = tl.where(held, _gather(mX, at, 0) * inv_t, float("-inf"))
    s_s = tl.where(held, _gather(mS, at, 0), 0.0)
    m_t = tl.where(held, _gather(mT, at, 0) * inv_t, float("-inf"))
    s_t = tl.where(held, _gather(mST, at, 0), 0.0)
    g = tl.where(held, _gather(mH, at, 0) * inv_t, 0.0)
    return m_s, s_s, m_t, s_t, g


@triton.jit
def _merge_lanes(mS, mT, sS, sT, h, LX, LT, inv_t, CLASS: tl.constexpr, DENSE_S: tl.constexpr,
                 DENSE_T: tl.constexpr, WITH_H: tl.constexpr, HAS_CW: tl.constexpr):
    """Lanes -> the program's per-group state ``(m^S, s^S, m^T, s^T, g)`` ``[GC]`` (b and a
    units), the raw group maxima, and whether a lane's sum of a relevant group may have lost
    precision against the lane's shared maximum (CLASS)."""
    c_s = inv_t * LOG2E
    if HAS_CW:
        t_scale = 1.0 + 0.0 * inv_t
    else:
        t_scale = inv_t
    c_t = t_scale * LOG2E
    MS = tl.max(mS, axis=1)                        # raw
    MT = tl.max(mT, axis=1)                        # raw teacher (a with class weights)
    RS = _ref(LX)[None, :]                         # the lanes' references
    RT = _ref(LT)[None, :]
    rS = _ref(MS)[:, None]                         # the groups' own
    rT = _ref(MT)[:, None]
    m_s = MS * inv_t
    m_t = MT * t_scale
    # A lane's group whose maximum lies far below the lane's reference: its sum is not
    # trusted. Irrelevant ones (far below the group's maximum) are dropped; relevant ones
    # make the program redo its slice exactly.
    proneS = (mS > float("-inf")) & ((mS - RS) * c_s < -PRONE_LOG2)
    proneT = (mT > float("-inf")) & ((mT - RT) * c_t < -PRONE_LOG2)
    redo = tl.zeros([mS.shape[0], mS.shape[1]], tl.int1)
    if CLASS:
        redo = (proneS & ((mS - rS) * c_s > -RELEVANT_LOG2)) | (
            proneT & ((mT - rT) * c_t > -RELEVANT_LOG2))
    s_s = tl.zeros_like(MS)
    s_t = tl.zeros_like(MS)
    g = tl.zeros_like(MS)
    if DENSE_S:
        termS = tl.where((sS == 0) | (proneS & (sS == sS)), 0.0,
                         sS * tl.math.exp2((RS - rS) * c_s))
        s_s = tl.sum(termS, axis=1)
    if DENSE_T:
        fT = tl.math.exp2((RT - rT) * c_t)
        # A lane whose factor is 0 (its reference lies far below the group's: finfo.min
        # logits) adds nothing; its drift may be infinite (0 * inf). NaN sums stay.
        dropT = (sT == 0) | ((proneT | (fT == 0)) & (sT == sT))
        s_t = tl.sum(tl.where(dropT, 0.0, sT * fT), axis=1)
        if WITH_H:
            if HAS_CW:
                hn = h
            else:
                hn = h * inv_t
            if CLASS:
                # d = a - b: g over the lane = e^{R' - m^T} [h + s^T (m^S - m^T)].
                drift = (_ref(m_s) - _ref(m_t))[:, None]
            else:
                # d relative to the lane's references:
                # g = e^{R' - m^T} [h + s^T ((R' - m^T) - (R - m^S))], natural units.
                drift = (RT - rT) * t_scale - (RS - rS) * inv_t
            g = tl.sum(tl.where(dropT, 0.0, (hn + sT * drift) * fT), axis=1)
    return m_s, s_s, m_t, s_t, g, MS, MT, tl.max(tl.max(redo.to(tl.int32), axis=1), axis=0) > 0


@triton.jit
def _weak_groups(held, single, live, m_s, s_s, m_t, s_t, g, DENSE_S: tl.constexpr,
                 DENSE_T: tl.constexpr, WITH_H: tl.constexpr):
    """Whether a group the program holds has one class only (``single``), a sum below
    ``2^-60`` (or 0, or NaN) or an infinite reference or gap: states taken at shared
    references are trusted only without.
    Above ``2^-60`` the terms a lane dropped or rounded against its larger maximum (each below
    ``2^-126`` of the reference) are below ``2^-66`` of the group's sum per class."""
    ok = held == held
    if DENSE_S:
        ok = ok & (s_s >= SHARED_MIN_SUM) & (tl.abs(m_s) < float("inf"))
    if DENSE_T:
        ok = ok & (s_t >= SHARED_MIN_SUM) & (tl.abs(m_t) < float("inf"))
        if WITH_H:
            ok = ok & (tl.abs(g) < float("inf"))
    return tl.max((held & live & (single | ~ok)).to(tl.int32), axis=0) > 0


@triton.jit
def _merge_lanes_exact(sS, sT, h, m_s, m_t, inv_t, DENSE_S: tl.constexpr,
                       DENSE_T: tl.constexpr, WITH_H: tl.constexpr, HAS_CW: tl.constexpr):
    """Lanes -> state, when every lane's sums are relative to the groups' own maxima."""
    s_s = tl.zeros_like(m_s)
    s_t = tl.zeros_like(m_s)
    g = tl.zeros_like(m_s)
    if DENSE_S:
        s_s = tl.sum(sS, axis=1)
    if DENSE_T:
        s_t = tl.sum(sT, axis=1)
        if WITH_H:
            # (the CLASS walk: d = a - b, every lane at the groups' own maxima)
            if HAS_CW:
                hn = tl.sum(h, axis=1)
            else:
                hn = tl.sum(h, axis=1) * inv_t
            g = hn + s_t * (_ref(m_s) - _ref(m_t))
    return s_s, s_t, g


@triton.jit
def _scaled_limits(m_s, s_s, m_t, s_t, g, DENSE_S: tl.constexpr, DENSE_T: tl.constexpr,
                   WITH_H: tl.constexpr):
    """The state the torch form (and the C++ kernels) give a group whose scaled maximum is
    infinite: logits that overflow float32 when divided by T. The walks take raw differences
    ``x - R`` before scaling, so they never see ``b = z / T = +-inf``; the torch form scales
    first. ``b = +inf`` (or ``a``): ``m = +inf``, ``s = exp(inf - inf) = NaN``, ``g`` NaN: the
    row is NaN. Every ``b`` of the group ``-inf``: no finite value, ``s = 0`` (a NaN sum stays
    NaN); ``g = 0`` without a finite teacher value, ``+inf`` with one (a student ``-inf``
    under teacher mass). ``m`` is the scaled maximum (raw group maximum times ``1 / T``)."""
    if DENSE_S:
        s_s = tl.where(m_s == float("-inf"), s_s * 0.0, s_s)
        s_s = tl.where(m_s == float("inf"), float("nan"), s_s)
    if DENSE_T:
        s_t = tl.where(m_t == float("-inf"), s_t * 0.0, s_t)
        s_t = tl.where(m_t == float("inf"), float("nan"), s_t)
        if WITH_H:
            g = tl.where(m_t == float("-inf"), s_t, g)
            g = tl.where((m_s == float("-inf")) & (s_t > 0), g + float("inf"), g)
            g = tl.where((m_s == float("inf")) | (m_t == float("inf")), float("nan"), g)
    return s_s, s_t, g


@triton.jit
def _put_column(col, dm_s, ds_s, dm_t, ds_t, dg, m_s, s_s, m_t, s_t, g, DENSE_S: tl.constexpr,
                DENSE_T: tl.constexpr):
    """A one-group walk's merged state (``[1]`` each) into column ``col`` of the row's."""
    if DENSE_S:
        m_s = tl.where(col, tl.max(dm_s, axis=0), m_s)
        s_s = tl.where(col, tl.sum(ds_s, axis=0), s_s)
    if DENSE_T:
        m_t = tl.where(col, tl.max(dm_t, axis=0), m_t)
        s_t = tl.where(col, tl.sum(ds_t, axis=0), s_t)
        g = tl.where(col, tl.sum(dg, axis=0), g)
    return m_s, s_s, m_t, s_t, g


@triton.jit
def _merge_lanes_single(LX, sX):
    """Lanes -> ``(max, sum exp(x - ref(max)))`` of the cross-entropy sums ``sX`` kept at the
    lanes' own raw maxima ``LX``."""
    M = tl.max(LX, axis=0)
    f = tl.math.exp2((_ref(LX) - _ref(M)) * LOG2E)
    return M, tl.sum(tl.where(sX == 0, 0.0, sX * f), axis=0)


# ---------------------------------------------------------------------------------------------
# The states kernel: the top-k entries.

@triton.jit
def _entries(idx_row, lp_row, srow, groups_ptr, cw_ptr, K, V, G, inv_t, t_local, gbase, kk, refS,
             TOPK: tl.constexpr, GROUP_RULE: tl.constexpr, HAS_S: tl.constexpr,
             HAS_CW: tl.constexpr, CW_LOG: tl.constexpr, BLOCK_K: tl.constexpr):
    """The row's top-k entries -> per group of the chunk ``[GC]``: teacher slots and ``g``
    (relative to the student reference ``refS``: the slice's student maxima, or, with
    RESTRICT, the entries' own), the student slots over the entries (RESTRICT, BUCKET's top),
    the bucket's teacher top log-sum pieces, and a flag of bad or repeated indices."""
    j = tl.arange(0, BLOCK_K)
    in_k = j < K
    idx = tl.load(idx_row + j, mask=in_k, other=-1).to(tl.int64)
    lp = tl.load(lp_row + j, mask=in_k, other=float("-inf")).to(tl.float32)
    bad = tl.max((in_k & ((idx < -1) | (idx >= V))).to(tl.int32), axis=0) > 0
    # Repeated indices: sort (pads get distinct negative keys); sorted keys minus their rank
    # never decrease exactly when no index repeats.
    in_range = in_k & (idx >= 0) & (idx < V)
    key = tl.where(in_range, idx, -1 - j.to(tl.int64)).to(tl.int32)
    ordered = tl.sort(key)
    slope = ordered - j
    bad = bad | (tl.max((slope < tl.associative_scan(slope, 0, _max_combine)).to(tl.int32),
                        axis=0) > 0)
    valid = in_k & (idx >= 0) & (lp != float("-inf"))
    sidx = tl.minimum(tl.maximum(idx, 0), tl.maximum(V - 1, 0))
    a = lp * inv_t
    if HAS_CW:
        a += _log_weight(cw_ptr + sidx, in_k, CW_LOG)
    a = tl.where(valid, a, float("-inf"))
    if HAS_S:
        b = tl.load(srow + sidx, mask=valid, other=float("-inf")).to(tl.float32) * inv_t
        b = tl.where(valid, b, float("-inf"))
    else:
        b = tl.zeros_like(a)
    if TOPK == TOPK_BUCKET:
        gid = tl.zeros_like(j)
    elif GROUP_RULE == GROUP_CLASS:
        gid = tl.load(groups_ptr + sidx, mask=in_k, other=0).to(tl.int32)
        bad = bad | (tl.max((in_k & (gid.to(tl.uint32, bitcast=True) >= G)).to(tl.int32),
                            axis=0) > 0)
    elif GROUP_RULE == GROUP_TARGET:
        gid = (sidx != t_local).to(tl.int32)
    else:
        gid = tl.zeros_like(j)
    onehot = (gid[None, :] == (gbase + kk)[:, None]) & valid[None, :]
    m_t = tl.max(tl.where(onehot, a[None, :], float("-inf")), axis=1)
    rt = _ref(m_t)
    shifted_a = a[None, :] - rt[:, None]
    e_t = tl.where(onehot, tl.exp(shifted_a), 0.0)
    s_t = tl.sum(e_t, axis=1)
    m_s = tl.max(tl.where(onehot, b[None, :], float("-inf")), axis=1)
    rs = _ref(m_s)
    s_s = tl.sum(tl.where(onehot, tl.exp(b[None, :] - rs[:, None]), 0.0), axis=1)
    if (TOPK == TOPK_RESTRICT) or (TOPK == TOPK_BUCKET):
        ref_student = rs
    else:
        ref_student = _ref(refS)
    gap = tl.where(onehot & (a[None, :] > float("-inf")),
                   e_t * (shifted_a - (b[None, :] - ref_student[:, None])), 0.0)
    g = tl.sum(gap, axis=1)
    # BUCKET's teacher top log-sum: lp_max + log1p(sum_{j != max} exp(lp_j - lp_max)).
    lp_max = tl.max(a, axis=0)
    others = tl.sum(tl.where(valid, tl.exp(a - _ref(lp_max)), 0.0), axis=0) - 1.0
    log_top = lp_max + _log1p(tl.maximum(others, -1.0))
    n_valid = tl.sum(valid.to(tl.int32), axis=0)
    return m_s, s_s, m_t, s_t, g, bad, log_top, n_valid


@triton.jit
def grouped_kl_states_kernel(
    student_ptr,      # (N, V) fp32/fp16/bf16 student logits z^S, unit stride along V (HAS_S)
    teacher_ptr,      # (N, V) fp32/fp16/bf16 teacher logits z^T, unit stride along V (DENSE_T)
    topk_idx_ptr,     # (N, K) int32/int64 top-k class indices, unit stride along K (TOPK >= 0)
    topk_lp_ptr,      # (N, K) float top-k teacher log-probs, unit stride along K (TOPK >= 0)
    groups_ptr,       # (V,) int32/int64 group of each class (GROUP_RULE == CLASS)
    order_ptr,        # (V,) int32 the classes sorted by group, ascending within a group (ORDER);
                      #   ORDER == 4: the window plan's slots (S, LANES * VEC) int16
    bounds_ptr,       # (G + 1,) int32: group k's classes are order[bounds[k]:bounds[k + 1]];
                      #   ORDER == 4: the plan's meta (S, steps inside, lane groups, each
                      #   group's last lane, window starts)
    target_ptr,       # (N,) int32/int64 target class of each row, global id (HAS_TARGET)
    cw_ptr,           # (V,) float class weights w, or their logs (CW_LOG = 2): a = z^T / T + log w (HAS_CW)
    mask_ptr,         # (N,) bool/int row mask, nonzero = valid (HAS_MASK)
    state_ptr,        # out (S, N, 5, G) fp32: per V-slice partial states (S = 1: the state)
    extras_ptr,       # out (S, N, 4) fp32: per V-slice partial extras [m^X, s^X, x_t, found]
    excl_ptr,         # scratch (N * S, BLOCK_K) int32: a program's valid top-k entries in
                      #   ascending order (BUCKET: excluded from the rest's sum)
    N,                # rows
    V,                # classes of this call (its vocabulary shard)
    K,                # top-k entries per row
    G,                # groups
    stride_s,         # row stride of student (elements)
    stride_t,         # row stride of teacher (elements)
    stride_i,         # row stride of topk_idx (elements)
    stride_l,         # row stride of topk_lp (elements)
    inv_t,            # 1 / temperature
    vocab_offset,     # first class of this shard: local target = target - vocab_offset
    target_lo,        # valid targets (global): [target_lo, target_hi) or ignore_index
    target_hi,
    ignore_index,     # target value of an ignored (invalid) row
    slice_len,        # classes per V-slice (a multiple of LANES * VEC * UNROLL; ORDER == 4: steps)
    num_splits,       # S: V-slices per row
    num_chunks,       # C: chunks of GC groups (> 1 only for the CLASS rule with G > GC)
    GROUP_RULE: tl.constexpr,   # GROUP_ONE / GROUP_CLASS / GROUP_TARGET
    TOPK: tl.constexpr,         # TEACHER_DENSE or a TOPK_* rule
    HAS_S: tl.constexpr,        # a student is given
    DENSE_T: tl.constexpr,      # a dense teacher is given
    HAS_TARGET: tl.constexpr,   # target is given (validity, found, CE, TARGET rule)
    WITH_CE: tl.constexpr,      # cross-entropy extras asked for
    CE_SEP: tl.constexpr,       # CE sums by their own exp (T != 1, or the student slots are
                                #   not over all classes, or groups are chunked)
    HAS_CW: tl.constexpr,       # class weights given
    HAS_MASK: tl.constexpr,     # row mask given
    GC: tl.constexpr,           # groups per chunk (power of two; 1 for one-group walks)
    G_LIVE: tl.constexpr,       # groups of a chunk that can occur (G when one chunk, else GC)
    VEC: tl.constexpr,          # contiguous classes per lane per load (16 bytes of the widest)
    UNROLL: tl.constexpr,       # loads of VEC classes per lane per iteration
    BLOCK_K: tl.constexpr,      # power of two >= K (TOPK >= 0)
    BLOCK_G: tl.constexpr,      # columns of the output tile (GC; 2 for TARGET and BUCKET)
    BAD_OR: tl.constexpr,       # G is G_LIVE, a power of two: bad ids found by OR-ing the ids
    PAIRS_S: tl.constexpr,      # student bf16 with even row stride: read as int32 pairs
    PAIRS_T: tl.constexpr,      # teacher bf16 with even row stride: read as int32 pairs
    CW_LOG: tl.constexpr,       # class weights: 0 tl.log, 1 hardware log, 2 given as logs
    ORDER: tl.constexpr,        # CLASS rule: walk the groups one by one through the class
                                #   order (1: gathered; 2: each group one range, read densely;
                                #   3: the same, int8 ids checked four at a time); 4: the
                                #   window walk (every lane one group)
    LANES: tl.constexpr,        # 32 * num_warps: one lane per thread
    STAGES: tl.constexpr,       # > 1: the unmasked walks software-pipelined (loads in flight
                                #   through shared memory); 1: plain loops
):
    """Op 1 on one (row, V-slice, chunk of groups): the slice's per-group state and extras.

    Writes ``state[split, row, :, chunk's groups]`` and (chunk 0) ``extras[split, row]``. An
    invalid row gets zeros; a row with a bad index a NaN state. The program id enumerates
    (row, split, chunk) with the chunk fastest, so the programs reading the same slice run
    together (the slice is read from L2 by all but the first)."""
    pid = tl.program_id(0)
    chunk = pid % num_chunks
    rest = pid // num_chunks
    split = rest % num_splits
    row = (rest // num_splits).to(tl.int64)
    DENSE_S: tl.constexpr = HAS_S and (TOPK != TOPK_RESTRICT)
    CLASS_WALK: tl.constexpr = ((((GROUP_RULE == GROUP_CLASS) and (TOPK != TOPK_BUCKET))
                                 and (DENSE_S or DENSE_T)) and not ORDER)
    WITH_H: tl.constexpr = HAS_S and DENSE_T
    # More than 4 groups: the CLASS walk keeps no per-group maxima in its loop (see above).
    SHARED_WALK: tl.constexpr = CLASS_WALK and (G_LIVE > 4)
    if TOPK == TOPK_BUCKET:
        EXCL: tl.constexpr = 2
    elif GROUP_RULE == GROUP_TARGET:
        EXCL: tl.constexpr = 1
    else:
        EXCL: tl.constexpr = 0
    RUN_DENSE: tl.constexpr = (DENSE_S or DENSE_T) or CE_SEP
    WALK_COL: tl.constexpr = 1 if (GROUP_RULE == GROUP_TARGET) or (TOPK == TOPK_BUCKET) else 0
    lo = split * slice_len
    hi = tl.minimum(lo + slice_len, V)
    gbase = chunk * GC
    kk = tl.arange(0, BLOCK_G)
    cols = gbase + kk
    out_cols = cols < G
    state_row = state_ptr + (split.to(tl.int64) * N + row) * 5 * G + cols
    extras_row = extras_ptr + (split.to(tl.int64) * N + row) * 4
    valid = _row_valid(row, mask_ptr, target_ptr, ignore_index, HAS_MASK, HAS_TARGET)
    zeros = tl.zeros([BLOCK_G], tl.float32)
    if valid:
        srow = student_ptr + row * stride_s
        trow = teacher_ptr + row * stride_t
        bad = row < 0
        t_local = lo - 1
        if HAS_TARGET:
            target = tl.load(target_ptr + row).to(tl.int64)
            bad = bad | (target < target_lo) | (target >= target_hi)
            # Clamped into [-1, V] before narrowing: outside [0, V) it matches no class.
            t_local = tl.minimum(tl.maximum(target - vocab_offset, -1), V).to(tl.int32)
        if ORDER:
            # The slices are ranges of positions of the class order (or steps of the window
            # plan): the first one owns the target's logit.
            in_slice = (split == 0) & (t_local >= 0) & (t_local < V)
        else:
            in_slice = (t_local >= lo) & (t_local < hi)
        t_safe = tl.minimum(tl.maximum(t_local, 0), tl.maximum(V - 1, 0))
        m_s = tl.where(kk >= 0, float("-inf"), 0.0)
        s_s = zeros
        m_t = m_s
        s_t = zeros
        g = zeros
        LA = tl.full([LANES], float("-inf"), tl.float32)
        sX = tl.zeros([LANES], tl.float32)
        # The walk's excluded classes: TARGET's target; BUCKET's valid entries (the walked
        # group is then the rest bucket), sorted into this program's scratch row.
        p0 = t_local * 0
        pend = in_slice.to(tl.int32)
        excl_row = excl_ptr + pid.to(tl.int64) * BLOCK_K
        if EXCL == 2:
            jk = tl.arange(0, BLOCK_K)
            in_k = jk < K
            e_idx = tl.load(topk_idx_ptr + row * stride_i + jk, mask=in_k, other=-1).to(tl.int64)
            e_lp = tl.load(topk_lp_ptr + row * stride_l + jk, mask=in_k, other=float("-inf"))
            e_ok = in_k & (e_idx >= 0) & (e_idx < V) & (e_lp.to(tl.float32) != float("-inf"))
            e_sorted = tl.sort(tl.where(e_ok, e_idx, 2147483647).to(tl.int32))
            tl.store(excl_row + jk, e_sorted)
            p0 = tl.sum((e_sorted < lo).to(tl.int32), axis=0)
            pend = tl.sum((e_sorted < hi).to(tl.int32), axis=0)
            tl.debug_barrier()
        if ORDER == 4:
            # The window walk: every lane walks one group (the plan's), the steps [lo, hi)
            # of this split; then each group's state is the exact merge of its lanes'.
            lane_group = tl.load(bounds_ptr + 2 + tl.arange(0, LANES))
            group_last = tl.load(bounds_ptr + 2 + LANES + kk, mask=kk < G, other=-1)
            s_lo = split * slice_len
            s_hi = tl.minimum(s_lo + slice_len, tl.load(bounds_ptr))
            mS, mT, sS, sT, h, LX, LT, LA, sX, bad_lanes = _window_pass(
                srow, trow, groups_ptr, bounds_ptr, order_ptr, s_lo, s_hi, V, G, lane_group,
                inv_t, DENSE_S, DENSE_T, WITH_H, CE_SEP, CW_LOG, VEC, UNROLL, LANES)
            dm_s, ds_s, dm_t, ds_t, dg = _merge_window_lanes(
                lane_group, group_last, LX, tl.reshape(sS, [LANES]), LT,
                tl.reshape(sT, [LANES]), tl.reshape(h, [LANES]), inv_t)
            ds_s, ds_t, dg = _scaled_limits(dm_s, ds_s, dm_t, ds_t, dg, DENSE_S, DENSE_T, WITH_H)
            # (a model not walked keeps empty columns: a top-k teacher's come from its entries
            # below)
            if DENSE_S:
                m_s, s_s = dm_s, ds_s
            if DENSE_T:
                m_t, s_t, g = dm_t, ds_t, dg
            bad = bad | (tl.max(bad_lanes, axis=0) > 0)
            bad = bad | (tl.max(((lane_group < 0) | (lane_group >= G)).to(tl.int32), axis=0) > 0)
        elif ORDER:
            # One group at a time, each a one-group walk over its classes (gathered through
            # the class order) in this slice of positions: per-element work flat in G, and
            # every group's state at its own maxima (exact, as the one-group walk).
            no_ref = tl.zeros([1], tl.float32)
            bad_lanes = tl.zeros([LANES], tl.int32)
            for k in range(0, G):
                glo = tl.maximum(tl.load(bounds_ptr + k), lo)
                ghi = tl.minimum(tl.load(bounds_ptr + k + 1), hi)
                if glo < ghi:
                    if ORDER >= 2:
                        # The group is one range of classes: positions [glo, ghi) are the
                        # classes from order[glo] on (clamped to V: a groups tensor that is
                        # not ranges then fails the id check, never reads out of bounds).
                        first = tl.load(order_ptr + glo)
                        ghi = tl.minimum(first + (ghi - glo), V)
                        glo = first
                    mS, mT, sS, sT, h, LX, LT, LA_k, sX_k, bad_k, seen, twice = _dense_pass(
                        srow, trow, groups_ptr, order_ptr, cw_ptr, excl_row, glo, ghi, t_local,
                        p0, pend, k, G, inv_t, no_ref, no_ref, False, DENSE_S, DENSE_T, WITH_H,
                        HAS_CW, CE_SEP, False, False, 0, False, PAIRS_S, PAIRS_T, CW_LOG, ORDER,
                        1, 1, VEC, UNROLL, LANES, STAGES)
                    bad_lanes = bad_lanes | bad_k
                    dm_s, ds_s, dm_t, ds_t, dg, raw_s, raw_t, redo = _merge_lanes(
                        mS, mT, sS, sT, h, LX, LT, inv_t, False, DENSE_S, DENSE_T, WITH_H, HAS_CW)
                    ds_s, ds_t, dg = _scaled_limits(dm_s, ds_s, dm_t, ds_t, dg, DENSE_S, DENSE_T,
                                                    WITH_H)
                    m_s, s_s, m_t, s_t, g = _put_column(
                        kk == k, dm_s, ds_s, dm_t, ds_t, dg, m_s, s_s, m_t, s_t, g, DENSE_S,
                        DENSE_T)
                    if CE_SEP:
                        LA_new = tl.maximum(LA, LA_k)
                        sX = _rescaled(sX, LA, LA_new) + _rescaled(sX_k, LA_k, LA_new)
                        LA = LA_new
            # A class in another group than its position says (a stale order, a bad id), or
            # positions outside the bounds: the row is NaN.
            bad = bad | (tl.max(bad_lanes, axis=0) > 0)
            bad = bad | (tl.load(bounds_ptr) != 0) | (tl.load(bounds_ptr + G) != V)
        elif RUN_DENSE:
            no_ref = tl.zeros([GC], tl.float32)
            mS, mT, sS, sT, h, LX, LT, LA, sX, bad_gid, seen, twice = _dense_pass(
                srow, trow, groups_ptr, order_ptr, cw_ptr, excl_row, lo, hi, t_local, p0, pend,
                gbase, G, inv_t, no_ref, no_ref, CLASS_WALK, DENSE_S, DENSE_T, WITH_H, HAS_CW,
                CE_SEP, False, SHARED_WALK, EXCL, BAD_OR, PAIRS_S, PAIRS_T, CW_LOG, False, GC,
                G_LIVE, VEC, UNROLL, LANES, STAGES)
            if BAD_OR:
                bad = bad | (tl.max(bad_gid, axis=0).to(tl.uint32, bitcast=True) >= G)
            else:
                bad = bad | (tl.max(bad_gid, axis=0) > 0)
            if SHARED_WALK:
                # No per-group maxima were kept: a group's reference is the largest running
                # maximum among the lanes that hold it (its sums are relative to it).
                gbits = tl.arange(0, GC)[:, None]
                held = ((seen[None, :] >> gbits) & 1) != 0
                mS = tl.where(held, LX[None, :], float("-inf"))
                mT = tl.where(held, LT[None, :], float("-inf"))
            dm_s, ds_s, dm_t, ds_t, dg, raw_s, raw_t, redo = _merge_lanes(
                mS, mT, sS, sT, h, LX, LT, inv_t, CLASS_WALK, DENSE_S, DENSE_T, WITH_H, HAS_CW)
            if SHARED_WALK:
                lanes_held = tl.sum(held.to(tl.int32), axis=1)
                repeated = tl.max((((twice[None, :] >> gbits) & 1) != 0).to(tl.int32), axis=1)
                weak = _weak_groups(lanes_held > 0, (lanes_held == 1) & (repeated == 0),
                                    tl.arange(0, GC) < G_LIVE, dm_s, ds_s, dm_t, ds_t, dg,
                                    DENSE_S, DENSE_T, WITH_H)
                if weak:
                    # A held group's sum fell below 2^-60 of its reference (it may have lost
                    # precision, or underflowed to 0: a group far below the others, or one
                    # with no finite logit), or is not finite, or the group has one class in
                    # the slice (whose within-group probability must come out 1, as from its
                    # own maximum): walk the slice again keeping each group's own maxima (one
                    # class per lane per step: small code).
                    mS, mT, sS, sT, h, LX, LT, LA2, sX2, bad_gid, seen, twice = _dense_pass(
                        srow, trow, groups_ptr, order_ptr, cw_ptr, excl_row, lo, hi, t_local, p0,
                        pend, gbase, G, inv_t, no_ref, no_ref, CLASS_WALK, DENSE_S, DENSE_T,
                        WITH_H, HAS_CW, False, False, False, EXCL, BAD_OR, False, False, CW_LOG,
                        False, GC, G_LIVE, 1, 1, LANES)
                    dm_s, ds_s, dm_t, ds_t, dg, raw_s, raw_t, redo = _merge_lanes(
                        mS, mT, sS, sT, h, LX, LT, inv_t, CLASS_WALK, DENSE_S, DENSE_T, WITH_H,
                        HAS_CW)
            if CLASS_WALK:
                if redo:
                    # Some lane's sum of a relevant group lost precision against the lane's
                    # shared maximum: walk the slice again, each element relative to its own
                    # group's maximum (known now).
                    # (Rare: one class per lane per step keeps this walk's code small.)
                    if HAS_CW:
                        c_ta = LOG2E + 0.0 * inv_t
                    else:
                        c_ta = inv_t * LOG2E
                    mS, mT, sS, sT, h, LX, LT, LA2, sX2, bad_gid, seen, twice = _dense_pass(
                        srow, trow, groups_ptr, order_ptr, cw_ptr, excl_row, lo, hi, t_local, p0,
                        pend, gbase, G, inv_t, _ref(raw_s * (inv_t * LOG2E)), _ref(raw_t * c_ta),
                        CLASS_WALK, DENSE_S, DENSE_T, WITH_H, HAS_CW, False, True, False, EXCL,
                        BAD_OR, False, False, CW_LOG, False, GC, G_LIVE, 1, 1, LANES)
                    ds_s, ds_t, dg = _merge_lanes_exact(sS, sT, h, dm_s, dm_t, inv_t, DENSE_S,
                                                        DENSE_T, WITH_H, HAS_CW)
            ds_s, ds_t, dg = _scaled_limits(dm_s, ds_s, dm_t, ds_t, dg, DENSE_S, DENSE_T, WITH_H)
            if CLASS_WALK:
                if DENSE_S:
                    m_s = dm_s
                    s_s = ds_s
                if DENSE_T:
                    m_t = dm_t
                    s_t = ds_t
                    g = dg
            else:
                # One group walked: TARGET's rest and BUCKET's all-class group are column 1,
                # ONE's column 0.
                m_s, s_s, m_t, s_t, g = _put_column(
                    kk == WALK_COL, dm_s, ds_s, dm_t, ds_t, dg, m_s, s_s, m_t, s_t, g, DENSE_S,
                    DENSE_T)
        if GROUP_RULE == GROUP_TARGET:
            if TOPK != TOPK_BUCKET:
                # Group 0: the target class alone, when it lies in this slice. (RESTRICT's
                # student is its entries alone: the first slice takes them, the target's
                # among them; another slice's target must add nothing.)
                zero = kk == 0
                if DENSE_S:
                    b_t = tl.load(srow + t_safe, mask=in_slice, other=float("-inf")).to(tl.float32)
                    b_t = tl.where(in_slice, b_t * inv_t, float("-inf"))
                    m_s = tl.where(zero, b_t, m_s)
                    s_s = tl.where(zero, tl.exp(b_t - _ref(b_t)), s_s)
                if DENSE_T:
                    a_t = tl.load(trow + t_safe, mask=in_slice, other=float("-inf")).to(tl.float32)
                    a_t = a_t * inv_t
                    if HAS_CW:
                        a_t += _log_weight(cw_ptr + t_safe, None, CW_LOG)
                    a_t = tl.where(in_slice, a_t, float("-inf"))
                    m_t = tl.where(zero, a_t, m_t)
                    s_t = tl.where(zero, tl.exp(a_t - _ref(a_t)), s_t)
                    if DENSE_S:
                        g0 = tl.where(a_t == float("-inf"), 0.0, tl.exp(a_t - _ref(a_t)) * (
                            (a_t - _ref(a_t)) - (b_t - _ref(b_t))))
                        g = tl.where(zero, g0, g)
        # Cross-entropy extras (chunk 0 only writes them).
        if WITH_CE:
            if CE_SEP:
                m_x, s_x = _merge_lanes_single(LA, sX)
            else:
                # T = 1 and the student slots cover every class: merge the groups' own.
                m_x = tl.max(tl.where(out_cols, m_s, float("-inf")), axis=0)
                s_x = tl.sum(tl.where(out_cols, _rescaled(s_s, m_s, m_x), 0.0), axis=0)
            x_t = tl.load(srow + t_safe, mask=in_slice, other=0.0).to(tl.float32)
            x_t = tl.where(in_slice, x_t, 0.0)
        if TOPK != TEACHER_DENSE:
            if split == 0:
                idx_row = topk_idx_ptr + row * stride_i
                lp_row = topk_lp_ptr + row * stride_l
                em_s, es_s, em_t, es_t, eg, ebad, log_top, n_valid = _entries(
                    idx_row, lp_row, srow, groups_ptr, cw_ptr, K, V, G, inv_t, t_local, gbase, kk,
                    m_s, TOPK, GROUP_RULE, HAS_S, HAS_CW, CW_LOG, BLOCK_K)
                bad = bad | ebad
                if TOPK == TOPK_BUCKET:
                    zero = kk == 0
                    m_s = tl.where(zero, tl.max(tl.where(zero, em_s, float("-inf")), axis=0), m_s)
                    s_s = tl.where(zero, tl.sum(tl.where(zero, es_s, 0.0), axis=0), s_s)
                    no_rest = n_valid == V
                    log_rest = tl.where(no_rest, float("-inf"), _log1mexp(log_top))
                    m_t = tl.where(zero, em_t, log_rest)
                    s_t = tl.where(zero, es_t, tl.where(no_rest, 1.0, 0.0))
                    g = tl.where(zero, eg, 0.0)
                else:
                    if HAS_S:
                        if TOPK == TOPK_RESTRICT:
                            m_s = em_s
                            s_s = es_s
                        m_t = em_t
                        s_t = es_t
                        g = eg
                    else:
                        m_s = zeros
                        s_s = zeros
                        m_t = em_t
                        s_t = es_t
                        g = zeros
            else:
                if TOPK == TOPK_BUCKET:
                    one = kk == 1
                    m_t = tl.where(one, float("-inf"), m_t)
                else:
                    if not HAS_S:
                        m_s = zeros
        else:
            if not HAS_S:
                m_s = zeros
                s_s = zeros
                g = zeros
            if not DENSE_T:
                m_t = zeros
                s_t = zeros
                g = zeros
        nan_fill = tl.where(bad, float("nan"), 0.0)
        tl.store(state_row, m_s + nan_fill, mask=out_cols)
        tl.store(state_row + G, s_s + nan_fill, mask=out_cols)
        tl.store(state_row + 2 * G, m_t + nan_fill, mask=out_cols)
        tl.store(state_row + 3 * G, s_t + nan_fill, mask=out_cols)
        tl.store(state_row + 4 * G, g + nan_fill, mask=out_cols)
        if chunk == 0:
            if WITH_CE:
                tl.store(extras_row, m_x)
                tl.store(extras_row + 1, s_x)
                tl.store(extras_row + 2, x_t)
            else:
                tl.store(extras_row, 0.0)
                tl.store(extras_row + 1, 0.0)
                tl.store(extras_row + 2, 0.0)
            if HAS_TARGET:
                tl.store(extras_row + 3, in_slice.to(tl.float32))
            else:
                tl.store(extras_row + 3, 0.0)
    else:
        for slot in tl.static_range(5):
            tl.store(state_row + slot * G, zeros, mask=out_cols)
        if chunk == 0:
            for slot in tl.static_range(4):
                tl.store(extras_row + slot, 0.0)


# ---------------------------------------------------------------------------------------------
# Merging V-slices.

@triton.jit
def _merge_pair(m_s1, s_s1, m_t1, s_t1, g1, m_s2, s_s2, m_t2, s_t2, g2):
    """The exact merge of two states over disjoint class sets (docs/design.md)."""
    m_s = tl.maximum(m_s1, m_s2, propagate_nan=tl.PropagateNan.ALL)
    m_t = tl.maximum(m_t1, m_t2, propagate_nan=tl.PropagateNan.ALL)
    s_s = _rescaled(s_s1, m_s1, m_s) + _rescaled(s_s2, m_s2, m_s)
    s_t = _rescaled(s_t1, m_t1, m_t) + _rescaled(s_t2, m_t2, m_t)
    d1 = (_ref(m_s) - _ref(m_s1)) - (_ref(m_t) - _ref(m_t1))
    d2 = (_ref(m_s) - _ref(m_s2)) - (_ref(m_t) - _ref(m_t2))
    g = (tl.where(s_t1 == 0, 0.0, (g1 + s_t1 * d1) * tl.exp(_ref(m_t1) - _ref(m_t)))
         + tl.where(s_t2 == 0, 0.0, (g2 + s_t2 * d2) * tl.exp(_ref(m_t2) - _ref(m_t))))
    return m_s, s_s, m_t, s_t, g


@triton.jit
def grouped_kl_merge_kernel(
    part_state_ptr,   # (S, N, 5, G) fp32 partial states of the V-slices
    part_extras_ptr,  # (S, N, 4) fp32 partial extras of the V-slices
    state_ptr,        # out (N, 5, G) fp32 merged state
    extras_ptr,       # out (N, 4) fp32 merged extras
    N,                # rows
    G,                # groups
    S,                # V-slices per row
    BLOCK_G: tl.constexpr,  # groups per step (power of two)
):
    """One program per row: fold the row's S partial states and extras in slice order."""
    row = tl.program_id(0).to(tl.int64)
    for gstart in range(0, G, BLOCK_G):
        cols = gstart + tl.arange(0, BLOCK_G)
        in_g = cols < G
        src = part_state_ptr + row * 5 * G + cols
        m_s = tl.load(src, mask=in_g, other=0.0)
        s_s = tl.load(src + G, mask=in_g, other=0.0)
        m_t = tl.load(src + 2 * G, mask=in_g, other=0.0)
        s_t = tl.load(src + 3 * G, mask=in_g, other=0.0)
        g = tl.load(src + 4 * G, mask=in_g, other=0.0)
        for split in range(1, S):
            src = part_state_ptr + (split * N + row) * 5 * G + cols
            m_s, s_s, m_t, s_t, g = _merge_pair(
                m_s, s_s, m_t, s_t, g,
                tl.load(src, mask=in_g, other=0.0), tl.load(src + G, mask=in_g, other=0.0),
                tl.load(src + 2 * G, mask=in_g, other=0.0),
                tl.load(src + 3 * G, mask=in_g, other=0.0),
                tl.load(src + 4 * G, mask=in_g, other=0.0))
        dst = state_ptr + row * 5 * G + cols
        tl.store(dst, m_s, mask=in_g)
        tl.store(dst + G, s_s, mask=in_g)
        tl.store(dst + 2 * G, m_t, mask=in_g)
        tl.store(dst + 3 * G, s_t, mask=in_g)
        tl.store(dst + 4 * G, g, mask=in_g)
    four = tl.arange(0, 4)
    e = tl.load(part_extras_ptr + row * 4 + four)
    for split in range(1, S):
        e2 = tl.load(part_extras_ptr + (split * N + row) * 4 + four)
        m1 = tl.sum(tl.where(four == 0, e, 0.0), axis=0)
        m2 = tl.sum(tl.where(four == 0, e2, 0.0), axis=0)
        m = tl.maximum(m1, m2, propagate_nan=tl.PropagateNan.ALL)
        s = (_rescaled(tl.sum(tl.where(four == 1, e, 0.0), axis=0), m1, m)
             + _rescaled(tl.sum(tl.where(four == 1, e2, 0.0), axis=0), m2, m))
        e = tl.where(four == 0, m, tl.where(four == 1, s, e + e2))
    tl.store(extras_ptr + row * 4 + four, e)


# ---------------------------------------------------------------------------------------------
# The finish kernel.

@triton.jit
def _log_group_mass(m, s, cols_ok, ONE_GROUP: tl.constexpr):
    """``log p_k`` per row of ``[R, BG]`` ``(m, s)``: ``lse_k - logsumexp_j lse_j``."""
    if ONE_GROUP:
        return tl.log(s / s)
    r = _ref(m)
    top = _ref(tl.max(tl.where((s != 0) & cols_ok, r, float("-inf")), axis=1))
    shift = r - top[:, None]
    weighted = tl.where((s == 0) | (~cols_ok), 0.0, s * tl.exp(shift))
    return shift + tl.log(s) - tl.log(tl.sum(weighted, axis=1))[:, None]


@triton.jit
def _log_ratio(n, d):
    """``log(n / d)`` of two positive sums: ``log1p`` of the relative difference when they are
    close (a near-identical pair of distributions), the difference of logarithms otherwise."""
    close = (n >= 0.5 * d) & (n <= 2.0 * d)
    near = _log1p((n - d) / tl.where(close, d, 1.0))
    return tl.where(close, near, tl.log(n) - tl.log(d))


@triton.jit
def _kl_terms(lq, lp):
    """``q (log q - log p)`` with ``0 log 0 = 0``, ``+inf`` where ``p = 0 < q``, NaN kept."""
    base = tl.exp(lq) * (lq - lp)
    base = tl.where((lp == float("-inf")) & (lq > float("-inf")), float("inf"), base)
    return tl.where(lq == float("-inf"), 0.0, base)


@triton.jit
def _teacher_masses(m_t, s_t, glm, cols, cols_ok, ONE_GROUP: tl.constexpr, HAS_GLM: tl.constexpr,
                    BUCKET: tl.constexpr):
    """``log p^T`` per row and group: from the state, ``group_logmass``, or BUCKET's
    ``[ref(m^T_0) + log s^T_0, log r^T]``."""
    if BUCKET:
        return tl.where(cols == 0, _ref(m_t) + tl.log(s_t), m_t)
    if HAS_GLM:
        return glm
    return _log_group_mass(m_t, s_t, cols_ok, ONE_GROUP)


@triton.jit
def _lse_rows(v, cols_ok):
    """``logsumexp`` over the groups of each row (``-inf`` for an all ``-inf`` row)."""
    top = tl.max(tl.where(cols_ok, v, float("-inf")), axis=1)
    total = tl.sum(tl.where(cols_ok, tl.exp(v - _ref(top)[:, None]), 0.0), axis=1)
    return _ref(top) + tl.log(total)


@triton.jit
def _load_rows(state_ptr, extras_ptr, mask_ptr, target_ptr, sw_ptr, glm_ptr, stride_glm,
               rows, cols, N, G, ignore_index, HAS_MASK: tl.constexpr, HAS_TARGET: tl.constexpr,
               HAS_SW: tl.constexpr, HAS_GLM: tl.constexpr):
    """A tile of rows: validity, weight, state slots, group_logmass and extras."""
    in_n = rows < N
    cols_ok = cols[None, :] < G
    ok = in_n[:, None] & cols_ok
    valid = in_n
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + rows, mask=in_n, other=0) != 0)
    if HAS_TARGET:
        valid = valid & (tl.load(target_ptr + rows, mask=in_n, other=0).to(tl.int64) != ignore_index)
    if HAS_SW:
        w = tl.load(sw_ptr + rows, mask=in_n, other=0.0).to(tl.float32)
    else:
        w = tl.where(in_n, 1.0, 0.0)
    base = state_ptr + rows.to(tl.int64)[:, None] * 5 * G + cols[None, :]
    m_s = tl.load(base, mask=ok, other=float("-inf"))
    s_s = tl.load(base + G, mask=ok, other=0.0)
    m_t = tl.load(base + 2 * G, mask=ok, other=float("-inf"))
    s_t = tl.load(base + 3 * G, mask=ok, other=0.0)
    g = tl.load(base + 4 * G, mask=ok, other=0.0)
    if HAS_GLM:
        glm = tl.load(glm_ptr + rows.to(tl.int64)[:, None] * stride_glm + cols[None, :], mask=ok,
                      other=float("-inf")).to(tl.float32)
    else:
        glm = m_t
    e = extras_ptr + rows.to(tl.int64) * 4
    ex_m = tl.load(e, mask=in_n, other=0.0)
    ex_s = tl.load(e + 1, mask=in_n, other=0.0)
    ex_t = tl.load(e + 2, mask=in_n, other=0.0)
    ex_f = tl.load(e + 3, mask=in_n, other=0.0)
    return valid, w, cols_ok, m_s, s_s, m_t, s_t, g, glm, ex_m, ex_s, ex_t, ex_f


@triton.jit
def grouped_kl_finish_kernel(
    state_ptr,        # (N, 5, G) fp32 merged states
    extras_ptr,       # (N, 4) fp32 extras [m^X, s^X, x_t, found]
    mask_ptr,         # (N,) bool/int row mask (HAS_MASK)
    target_ptr,       # (N,) int32/int64 targets: validity (HAS_TARGET)
    sw_ptr,           # (N,) float sample weights w_r (HAS_SW)
    glm_ptr,          # (N, G) fp32 teacher group log-masses replacing the state's (HAS_GLM)
    bp_ptr,           # (P, 2G + 2) fp32 batch partials to merge in order (HAS_BP)
    num_items_ptr,    # () any dtype: the MEAN denominator (HAS_NUM_ITEMS)
    loss_ptr,         # out: (N,) fp32 (REDUCTION == NONE) or () fp32
    saved_ptr,        # out (G + 1,) fp32: [log s_0 .. log s_{G-1}, D]
    partial_ptr,      # out (2G + 2,) fp32: this row set's batch partial (PARTIAL_ONLY)
    N,                # rows
    G,                # groups
    P,                # batch partials (HAS_BP)
    stride_glm,       # row stride of group_logmass (elements)
    stride_bp,        # row stride of batch_partials (elements)
    T2,               # temperature squared
    alpha,            # weight of the cross-group KL
    beta,             # weight of the within-group KLs
    ce_weight,        # weight of the cross-entropy
    ignore_index,     # target of an ignored row
    cfg_num_items,    # MEAN denominator when > 0 (without a num_items tensor)
    HAS_MASK: tl.constexpr, HAS_TARGET: tl.constexpr, HAS_SW: tl.constexpr,
    HAS_GLM: tl.constexpr, HAS_BP: tl.constexpr, HAS_NUM_ITEMS: tl.constexpr,
    REBALANCE: tl.constexpr,       # LTKD batch rebalancing of the teacher's group masses
    WITHIN_TEACHER: tl.constexpr,  # within-group KLs weighted by p^T_k
    WITH_CE: tl.constexpr,         # add ce_weight * cross-entropy
    REDUCTION: tl.constexpr,       # REDUCE_NONE / REDUCE_SUM / REDUCE_MEAN
    BUCKET: tl.constexpr,          # top-k BUCKET rule
    ONE_GROUP: tl.constexpr,       # G == 1 without group_logmass: the cross term is 0
    DEN_FROM_PARTIALS: tl.constexpr,  # MEAN denominator from the merged batch partials
    PARTIAL_ONLY: tl.constexpr,    # only write this row set's batch partial
    BLOCK_R: tl.constexpr,         # rows per step
    BLOCK_G: tl.constexpr,         # power of two >= G
):
    """Op 2 in one program: every cross-row sum runs in the same order each time."""
    cols = tl.arange(0, BLOCK_G)
    col_ok = cols < G
    # Pass 1: this row set's batch partial [max_r log p^T, sum_r exp(log p^T - ref(max)), n, sum w].
    top = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    count = 0.0
    wsum = 0.0
    for start in range(0, N, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        valid, w, cols_ok, m_s, s_s, m_t, s_t, g, glm, ex_m, ex_s, ex_t, ex_f = _load_rows(
            state_ptr, extras_ptr, mask_ptr, target_ptr, sw_ptr, glm_ptr, stride_glm, rows, cols,
            N, G, ignore_index, HAS_MASK, HAS_TARGET, HAS_SW, HAS_GLM)
        lpT = _teacher_masses(m_t, s_t, glm, cols[None, :], cols_ok, ONE_GROUP, HAS_GLM, BUCKET)
        lpT = tl.where(valid[:, None], lpT, float("-inf"))
        new_top = tl.maximum(top, tl.max(lpT, axis=0))
        total = (tl.where(total == 0, 0.0, total * tl.exp(_ref(top) - _ref(new_top)))
                 + tl.sum(tl.exp(lpT - _ref(new_top)[None, :]), axis=0))
        top = new_top
        count += tl.sum(valid.to(tl.float32), axis=0)
        wsum += tl.sum(tl.where(valid, w, 0.0), axis=0)
    if PARTIAL_ONLY:
        tl.store(partial_ptr + cols, top, mask=col_ok)
        tl.store(partial_ptr + G + cols, total, mask=col_ok)
        tl.store(partial_ptr + 2 * G, count)
        tl.store(partial_ptr + 2 * G + 1, wsum)
    else:
        if HAS_BP:
            # The given partials replace this pass: merged in order (max, rescaled sums, counts).
            top = tl.full([BLOCK_G], float("-inf"), tl.float32)
            for p in range(0, P):
                top = tl.maximum(top, tl.load(bp_ptr + p * stride_bp + cols, mask=col_ok,
                                              other=float("-inf")))
            total = tl.zeros([BLOCK_G], tl.float32)
            count = 0.0
            wsum = 0.0
            for p in range(0, P):
                row_p = bp_ptr + p * stride_bp
                top_p = tl.load(row_p + cols, mask=col_ok, other=float("-inf"))
                total_p = tl.load(row_p + G + cols, mask=col_ok, other=0.0)
                total += tl.where(total_p == 0, 0.0, total_p * tl.exp(_ref(top_p) - _ref(top)))
                count += tl.load(row_p + 2 * G)
                wsum += tl.load(row_p + 2 * G + 1)
        if REBALANCE and not BUCKET:
            log_pb = _ref(top) + tl.log(total) - tl.log(tl.maximum(count, 1.0))
            nonempty = (log_pb != float("-inf")) & col_ok
            pb_top = tl.max(tl.where(nonempty, log_pb, float("-inf")), axis=0)
            lse = _ref(pb_top) + tl.log(tl.sum(tl.where(nonempty, tl.exp(log_pb - _ref(pb_top)),
                                                       0.0), axis=0))
            n_ne = tl.maximum(tl.sum(nonempty.to(tl.float32), axis=0), 1.0)
            log_scale = tl.where(nonempty, (lse - tl.log(n_ne)) - log_pb, float("-inf"))
        else:
            log_scale = tl.zeros([BLOCK_G], tl.float32)
        # Pass 2: the row losses and the reduction (and this row set's weight sum again, so
        # that no scalar lives across the loop).
        acc = 0.0
        own_wsum = 0.0
        for start in range(0, N, BLOCK_R):
            rows = start + tl.arange(0, BLOCK_R)
            valid, w, cols_ok, m_s, s_s, m_t, s_t, g, glm, ex_m, ex_s, ex_t, ex_f = _load_rows(
                state_ptr, extras_ptr, mask_ptr, target_ptr, sw_ptr, glm_ptr, stride_glm, rows,
                cols, N, G, ignore_index, HAS_MASK, HAS_TARGET, HAS_SW, HAS_GLM)
            lpS = _log_group_mass(m_s, s_s, cols_ok, ONE_GROUP and not BUCKET)
            lpT = _teacher_masses(m_t, s_t, glm, cols[None, :], cols_ok, ONE_GROUP, HAS_GLM, BUCKET)
            inner = g / s_t + _log_ratio(s_s, s_t)
            inner = tl.where((s_s == 0) & (s_t > 0), float("inf"), inner)
            within = tl.where(s_t == 0, 0.0, inner)
            if BUCKET:
                cross = tl.sum(tl.where(cols_ok, _kl_terms(lpT, lpS), 0.0), axis=1)
                kl = cross + tl.sum(tl.where(cols[None, :] == 0, tl.exp(lpT) * within, 0.0), axis=1)
            elif ONE_GROUP:
                kl = T2 * beta * tl.sum(tl.where(cols_ok, within, 0.0), axis=1) + tl.sum(
                    tl.where(cols_ok, lpS + lpT, 0.0), axis=1)
            else:
                if REBALANCE:
                    shifted = log_scale[None, :] + lpT
                    lq = shifted - _lse_rows(shifted, cols_ok)[:, None]
                else:
                    lq = lpT
                cross = tl.sum(tl.where(cols_ok, _kl_terms(lq, lpS), 0.0), axis=1)
                if WITHIN_TEACHER:
                    cw = tl.exp(lpT) * within
                else:
                    cw = within
                kl = T2 * (alpha * cross + beta * tl.sum(tl.where(cols_ok, cw, 0.0), axis=1))
            if HAS_TARGET:
                kl = tl.where(ex_f == 1.0, kl, float("nan"))
            if WITH_CE:
                kl += ce_weight * (_ref(ex_m) + tl.log(ex_s) - ex_t)
            contribution = tl.where(valid, w * kl, 0.0)
            own_wsum += tl.sum(tl.where(valid, w, 0.0), axis=0)
            if REDUCTION == REDUCE_NONE:
                tl.store(loss_ptr + rows, contribution, mask=rows < N)
            else:
                acc += tl.sum(contribution, axis=0)
        # (The denominator is read only now: nothing long-lived crosses the loop above.)
        if REDUCTION == REDUCE_MEAN:
            if HAS_NUM_ITEMS:
                den = tl.load(num_items_ptr).to(tl.float32)
            elif cfg_num_items > 0:
                den = cfg_num_items + 0.0
            elif HAS_BP and DEN_FROM_PARTIALS:
                den = 0.0
                for p in range(0, P):
                    den += tl.load(bp_ptr + p * stride_bp + 2 * G + 1)
            else:
                den = own_wsum
        else:
            den = 1.0
        if REDUCTION == REDUCE_SUM:
            tl.store(loss_ptr, acc)
        if REDUCTION == REDUCE_MEAN:
            tl.store(loss_ptr, tl.where(den != 0, acc / tl.where(den != 0, den, 1.0), 0.0))
        tl.store(saved_ptr + cols, log_scale, mask=col_ok)
        tl.store(saved_ptr + G, den)


# ---------------------------------------------------------------------------------------------
# The gradient kernel.
#
# A within-group probability pt_i = exp(b_i - ref(m) - log s) is formed as
# exp2(fma(b_i - ref(m), log2 e, -log2 s)) (:func:`_pt`): the difference with the group's maximum
# first (exact by Sterbenz near the maximum, where the terms that matter are; exactly 0 at it),
# then the log-sum, rounded once. Adding ``ref(m) + log s`` first would round that offset at the
# logits' magnitude (half an ulp of 715 is 3e-5: a 3e-5 relative error in every pt at
# |z / T| ~ 700). Each group therefore carries, per model, ``(ref(m), -log2 s)``, and the cost
# per class is what it was with one offset: a multiply, a subtraction and an explicit fma (the
# kernel is compiled without FMA contraction, so that ``x / T - ref(m)`` is exactly 0 at the
# maximum: pt^S = pt^T = 1 exactly in a one-class group, as in the torch form).

@triton.jit
def _pt(b, r, n):
    """``exp(b - r) 2^n`` as ``exp2(fma(b - r, log2 e, n))``: a within-group probability with
    ``r = ref(m)``, ``n = -log2 s`` (exactly 1 at a one-class group's maximum)."""
    return tl.math.exp2(tl.fma(b - r, LOG2E, n))


@triton.jit
def _neg_log2(s):
    """``-log2 s`` of a group's sum; 0 for an empty group (``s = 0``: its classes are all
    ``-inf``, and ``exp2(-inf + 0) = 0`` weighs them). NaN stays NaN."""
    return tl.where(s == 0, 0.0, -tl.log2(s))


@triton.jit
def _unpair(v):
    """An int64 read from two fp32 stored side by side -> the two fp32 (no data move)."""
    lo = (v & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
    hi = (v >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _grad_values(x, t, lw, rS, nS, c1, rT, nT, c2, rX, nX, cX, inv_t, DENSE_T: tl.constexpr,
                 TOPK: tl.constexpr, HAS_CW: tl.constexpr, WITH_CE: tl.constexpr):
    """The generic gradient of classes with raw student ``x`` (teacher ``t``): dense teacher
    ``c1 pt^S + c2 (pt^S - pt^T)``; top-k off the entries ``c1 pt^S`` (RENORMALIZE, BUCKET)
    or 0 (RESTRICT); plus ``cX softmax(x)`` (CE). Each ``pt`` is :func:`_pt` of the class's
    group's ``(ref(m), -log2 s)`` (``rS, nS``; ``rT, nT``; the CE's ``rX, nX``)."""
    if TOPK == TOPK_RESTRICT:
        val = tl.zeros_like(x)
    else:
        pS = _pt(x * inv_t, rS, nS)
        if DENSE_T:
            if HAS_CW:
                pT = _pt(t * inv_t + lw, rT, nT)
            else:
                pT = _pt(t * inv_t, rT, nT)
            val = c1 * pS + c2 * (pS - pT)
        else:
            val = c1 * pS
    if WITH_CE:
        val += cX * _pt(x, rX, nX)
    return val


@triton.jit
def _table_gather(table_row, g, DENSE_T: tl.constexpr):
    """The CLASS walk's per-group table, six fp32 per group ``[ref(m^S), -log2 s^S, c1, c2,
    ref(m^T), -log2 s^T]``, at group ids ``g`` (clamped): 8-byte loads at one address and its
    constant offsets (three per class; two without a dense teacher)."""
    at = table_row.to(tl.pointer_type(tl.int64)) + 3 * g.to(tl.int64)
    rS, nS = _unpair(tl.load(at))
    c1, c2 = _unpair(tl.load(at + 1))
    if DENSE_T:
        rT, nT = _unpair(tl.load(at + 2))
    else:
        rT = rS
        nT = nS
    return rS, nS, c1, rT, nT, c2


@triton.jit
def _grad_fixups(srow, trow, groups_ptr, cw_ptr, grow, table_row, pos, lp, is_entry, sel, t_local,
                 G, inv_t, rS, nS, c1, rT, nT, c2, c_top, u, rX, nX, cX, cols,
                 GROUP_RULE: tl.constexpr, TOPK: tl.constexpr, DENSE_T: tl.constexpr,
                 HAS_CW: tl.constexpr, WITH_CE: tl.constexpr, CLASS: tl.constexpr,
                 CW_LOG: tl.constexpr, BLOCK_G: tl.constexpr):
    """The whole gradient at the classes ``pos`` (where ``sel``): top-k entries (``is_entry``,
    teacher log-prob ``lp``) and the target (the ``-[i = t]`` cross-entropy term; group 0 of
    the TARGET rule). Addresses are clamped; nothing is written where ``sel`` is false."""
    safe = tl.where(sel, pos, 0)

    x = tl.load(srow + safe, mask=sel, other=float("-inf")).to(tl.float32)
    if CLASS:
        k = tl.load(groups_ptr + safe, mask=sel, other=0).to(tl.int32)
        k = tl.minimum(tl.maximum(k, 0), G - 1)
        kSr, kSn, kS1, kTr, kTn, kT1 = _table_gather(table_row, k, True)
    else:
        if GROUP_RULE == GROUP_TARGET:
            k = (safe != t_local).to(tl.int32)
        elif TOPK == TOPK_BUCKET:
            k = tl.zeros_like(safe).to(tl.int32) + 1
        else:
            k = tl.zeros_like(safe).to(tl.int32)
        hot = cols[:, None] == k[None, :]
        kSr = tl.sum(tl.where(hot, rS[:, None], 0.0), axis=0)
        kSn = tl.sum(tl.where(hot, nS[:, None], 0.0), axis=0)
        kS1 = tl.sum(tl.where(hot, c1[:, None], 0.0), axis=0)
        kTr = tl.sum(tl.where(hot, rT[:, None], 0.0), axis=0)
        kTn = tl.sum(tl.where(hot, nT[:, None], 0.0), axis=0)
        kT1 = tl.sum(tl.where(hot, c2[:, None], 0.0), axis=0)
    b = x * inv_t
    pS = _pt(b, kSr, kSn)
    if HAS_CW:
        lw = _log_weight(cw_ptr + safe, sel, CW_LOG)
    else:
        lw = tl.zeros_like(x)
    if TOPK == TEACHER_DENSE:
        t = tl.load(trow + safe, mask=sel, other=float("-inf")).to(tl.float32)
        if HAS_CW:
            pT = _pt(t * inv_t + lw, kTr, kTn)
        else:
            pT = _pt(t * inv_t, kTr, kTn)
        val = kS1 * pS + kT1 * (pS - pT)
    elif TOPK == TOPK_BUCKET:
        # pS here is pt^rest (column 1); an entry's is p^S = exp(b - ref(m_0) - log s_0 +
        # log P^S_0) (column 0's pair).
        r_all = tl.sum(tl.where(cols == 0, rS, 0.0), axis=0)
        n_all = tl.sum(tl.where(cols == 0, nS, 0.0), axis=0)
        p_all = _pt(b, r_all, n_all)
        val = tl.where(is_entry, c_top * p_all - u * tl.exp(lp), kS1 * pS)
    else:
        pT = _pt(lp * inv_t + lw, kTr, kTn)
        if TOPK == TOPK_RENORMALIZE:
            val = tl.where(is_entry, kS1 * pS - kT1 * pT, kS1 * pS)
        else:
            val = tl.where(is_entry, kS1 * pS + kT1 * (pS - pT), 0.0)
    if WITH_CE:
        val += cX * _pt(x, rX, nX) - tl.where(pos == t_local, cX, 0.0)
    tl.store(grow + safe, val.to(grow.dtype.element_ty), mask=sel)



@triton.jit
def _grad_step(srow, trow, groups_ptr, cw_ptr, grow, table_row, start, hi, lane_offs, G,
               wSr, wSn, wS1, wTr, wTn, wT1, rX, nX, cX, inv_t, DENSE_T: tl.constexpr,
               TOPK: tl.constexpr, HAS_CW: tl.constexpr, WITH_CE: tl.constexpr,
               CLASS: tl.constexpr, MASKED: tl.constexpr, CW_LOG: tl.constexpr,
               VEC: tl.constexpr, UNROLL: tl.constexpr, LANES: tl.constexpr):
    """One iteration of the gradient walk: ``UNROLL`` sub-tiles of ``[LANES, VEC]`` classes.
    ``w*``: the walked group's ``(ref(m), -log2 s, c)`` of each model (one-group walks)."""
    for u_ in tl.static_range(UNROLL):
        offs = start + u_ * (LANES * VEC) + lane_offs
        if MASKED:
            inside = offs < hi
            x = tl.load(srow + offs, mask=inside, other=float("-inf")).to(tl.float32)
        else:
            x = tl.load(srow + offs).to(tl.float32)
        if DENSE_T:
            if MASKED:
                t = tl.load(trow + offs, mask=inside, other=float("-inf")).to(tl.float32)
            else:
                t = tl.load(trow + offs).to(tl.float32)
        else:
            t = x
        if HAS_CW and DENSE_T:
            if MASKED:
                lw = _log_weight(cw_ptr + offs, inside, CW_LOG)
            else:
                lw = _log_weight(cw_ptr + offs, None, CW_LOG)
        else:
            lw = x
        if CLASS:
            if MASKED:
                g = tl.load(groups_ptr + offs, mask=inside, other=0).to(tl.int32)
            else:
                g = tl.load(groups_ptr + offs).to(tl.int32)
            # Bad ids (the row is NaN through its state) read a valid table entry: one
            # unsigned minimum (a negative id is above G - 1 as unsigned).
            g = tl.minimum(g.to(tl.uint32, bitcast=True), G - 1)
            kSr, kSn, kS1, kTr, kTn, kT1 = _table_gather(table_row, g, DENSE_T)
        else:
            kSr = wSr
            kSn = wSn
            kS1 = wS1
            kTr = wTr
            kTn = wTn
            kT1 = wT1
        val = _grad_values(x, t, lw, kSr, kSn, kS1, kTr, kTn, kT1, rX, nX, cX, inv_t, DENSE_T,
                           TOPK, HAS_CW, WITH_CE)
        if MASKED:
            tl.store(grow + offs, val.to(grow.dtype.element_ty), mask=inside)
        else:
            tl.store(grow + offs, val.to(grow.dtype.element_ty))



@triton.jit
def grouped_kl_grad_kernel(
    student_ptr,      # (N, V) fp32/fp16/bf16 student logits, unit stride along V
    teacher_ptr,      # (N, V) teacher logits, unit stride along V (DENSE_T)
    topk_idx_ptr,     # (N, K) int32/int64 top-k indices (TOPK >= 0)
    topk_lp_ptr,      # (N, K) float top-k log-probs (TOPK >= 0)
    groups_ptr,       # (V,) int32/int64 class groups (GROUP_RULE == CLASS)
    target_ptr,       # (N,) int32/int64 targets (HAS_TARGET)
    cw_ptr,           # (V,) float class weights (HAS_CW)
    mask_ptr,         # (N,) bool/int row mask (HAS_MASK)
    sw_ptr,           # (N,) float sample weights (HAS_SW)
    glm_ptr,          # (N, G) fp32 teacher group log-masses (HAS_GLM)
    state_ptr,        # (N, 5, G) fp32 merged states
    extras_ptr,       # (N, 4) fp32 extras
    saved_ptr,        # (G + 1,) fp32 [log s_k, D] from the finish
    grad_loss_ptr,    # (N,) fp32 (REDUCTION == NONE) or () fp32 upstream gradient
    grad_ptr,         # out (N, V) contiguous, the student's dtype
    table_ptr,        # scratch (N * S, G, 6) fp32: per program and group
                      #   [ref(m^S), -log2 s^S, c1, c2, ref(m^T), -log2 s^T] (CLASS)
    N, V, K, G,
    stride_s,         # row stride of student (elements)
    stride_t,         # row stride of teacher (elements)
    stride_i,         # row stride of topk_idx (elements)
    stride_l,         # row stride of topk_lp (elements)
    stride_glm,       # row stride of group_logmass (elements)
    inv_t,            # 1 / T
    T,                # temperature
    alpha,            # cross weight
    beta,             # within weight
    ce_weight,        # cross-entropy weight
    vocab_offset,     # local target = target - vocab_offset
    ignore_index,     # target of an ignored row
    slice_len,        # classes per V-slice
    num_splits,       # V-slices per row
    GROUP_RULE: tl.constexpr, TOPK: tl.constexpr, DENSE_T: tl.constexpr,
    HAS_TARGET: tl.constexpr, WITH_CE: tl.constexpr, HAS_CW: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_SW: tl.constexpr, HAS_GLM: tl.constexpr,
    REBALANCE: tl.constexpr, WITHIN_TEACHER: tl.constexpr, REDUCTION: tl.constexpr,
    ONE_GROUP: tl.constexpr,    # G == 1 without group_logmass (cross term 0)
    VEC: tl.constexpr,          # contiguous classes per lane per load
    UNROLL: tl.constexpr,       # loads per lane per iteration
    LANES: tl.constexpr,        # 32 * num_warps
    BLOCK_G: tl.constexpr,      # power of two >= G
    BLOCK_K: tl.constexpr,      # power of two >= K
    CW_LOG: tl.constexpr,       # class weights: 0 tl.log, 1 hardware log, 2 given as logs
    STAGES: tl.constexpr,       # > 1: the unmasked walk software-pipelined; 1: a plain loop
):
    """Op 3 on one (row, V-slice): the row's coefficients from its state (and ``saved``,
    the upstream gradient), then one walk writing ``d loss / d x_i``, then the classes whose
    gradient has more terms (top-k entries, the target) rewritten whole."""
    pid = tl.program_id(0)
    split = pid % num_splits
    row = (pid // num_splits).to(tl.int64)
    BUCKET: tl.constexpr = TOPK == TOPK_BUCKET
    CLASS: tl.constexpr = (GROUP_RULE == GROUP_CLASS) and not BUCKET
    BLOCK: tl.constexpr = LANES * VEC * UNROLL
    WALK_COL: tl.constexpr = 1 if (GROUP_RULE == GROUP_TARGET) or BUCKET else 0
    lo = split * slice_len
    hi = tl.minimum(lo + slice_len, V)
    grow = grad_ptr + row * V
    lane_offs = tl.arange(0, LANES)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    valid = _row_valid(row, mask_ptr, target_ptr, ignore_index, HAS_MASK, HAS_TARGET)
    if valid:
        srow = student_ptr + row * stride_s
        trow = teacher_ptr + row * stride_t
        # Upstream gradient of this row's loss.
        if REDUCTION == REDUCE_NONE:
            u = tl.load(grad_loss_ptr + row).to(tl.float32)
        else:
            u = tl.load(grad_loss_ptr).to(tl.float32)
        if HAS_SW:
            u = u * tl.load(sw_ptr + row).to(tl.float32)
        if REDUCTION == REDUCE_MEAN:
            den = tl.load(saved_ptr + G)
            u = tl.where(den != 0, u / tl.where(den != 0, den, 1.0), 0.0)
        # The row's per-group coefficients.
        cols = tl.arange(0, BLOCK_G)
        col_ok = cols < G
        base = state_ptr + row * 5 * G + cols
        m_s = tl.load(base, mask=col_ok, other=float("-inf"))
        s_s = tl.load(base + G, mask=col_ok, other=0.0)
        m_t = tl.load(base + 2 * G, mask=col_ok, other=float("-inf"))
        s_t = tl.load(base + 3 * G, mask=col_ok, other=0.0)
        m_s2 = m_s[None, :]
        s_s2 = s_s[None, :]
        ok2 = col_ok[None, :]
        lpS = tl.sum(_log_group_mass(m_s2, s_s2, ok2, ONE_GROUP and not BUCKET), axis=0)
        if HAS_GLM:
            glm = tl.load(glm_ptr + row * stride_glm + cols, mask=col_ok,
                          other=float("-inf")).to(tl.float32)
        else:
            glm = m_t
        lpT = tl.sum(_teacher_masses(m_t[None, :], s_t[None, :], glm[None, :], cols[None, :],
                                     ok2, ONE_GROUP, HAS_GLM, BUCKET), axis=0)
        # pt = exp(b - ref(m) - log s): each group's (ref(m), -log2 s) of each model (_pt).
        rS = _ref(m_s)
        nS = _neg_log2(s_s)
        rT = _ref(m_t)
        nT = _neg_log2(s_t)
        scale = u * T
        if BUCKET:
            # At the entries u (P p^S_i - p^T_i); off them u (P r^S - r^T) pt^rest_i, pt^rest
            # the student's distribution within the rest group; P = 1 + max(0, P^T_top - 1)
            # with a rest bucket, P^T_top without one.
            lpS0 = tl.sum(tl.where(cols == 0, lpS, 0.0), axis=0)
            lpS1 = tl.sum(tl.where(cols == 1, lpS, 0.0), axis=0)
            lpT0 = tl.sum(tl.where(cols == 0, lpT, 0.0), axis=0)
            lpT1 = tl.sum(tl.where(cols == 1, lpT, 0.0), axis=0)
            has_rest = lpT1 != float("-inf")
            excess = _expm1(lpT0)
            excess = tl.where(has_rest, tl.maximum(excess, 0.0), excess)
            # r^S - r^T from the larger of the two, without cancellation or overflow.
            rest_gap = tl.where(lpS1 >= lpT1, -tl.exp(lpS1) * _expm1(lpT1 - lpS1),
                                tl.exp(lpT1) * _expm1(lpS1 - lpT1))
            rest_gap = tl.where(has_rest | (lpS1 != float("-inf")), rest_gap, 0.0)
            c_rest = u * (tl.exp(lpS1) * excess + rest_gap)
            c_top = u * (1.0 + excess)
            # Column 1 (the rest): the walk's pt^rest and its coefficient; column 0 holds the
            # entries' p^S = exp(b - ref(m_0) - log s_0 + log P^S_0): its -log2 s_0 moved by
            # log2 P^S_0 (never ref(m_0) + log s_0 - log P^S_0, rounded at the logits' size).
            nS0 = tl.sum(tl.where(cols == 0, nS, 0.0), axis=0)
            c1 = tl.where(cols == 1, c_rest, 0.0)
            nS = tl.where(cols == 1, nS, tl.fma(lpS0, LOG2E, nS0))
            c2 = tl.zeros_like(nS)
        else:
            has = s_t != 0
            if ONE_GROUP:
                cross = tl.zeros_like(nS)
                within = tl.where(has, beta, 0.0)
            else:
                if REBALANCE:
                    ls = tl.load(saved_ptr + cols, mask=col_ok, other=float("-inf"))
                    shifted = ls + lpT
                    lq = shifted - tl.sum(_lse_rows(shifted[None, :], ok2), axis=0)
                else:
                    lq = lpT
                if WITHIN_TEACHER:
                    c = tl.exp(lpT)
                else:
                    c = tl.full([BLOCK_G], 1.0, tl.float32)
                cross = alpha * (tl.exp(lpS) - tl.exp(lq))
                within = beta * c * tl.where(has, 1.0, 0.0)
            if TOPK == TOPK_RENORMALIZE:
                c1 = scale * (cross + within)
            else:
                c1 = scale * cross
            c2 = scale * within
            c_top = u
        if WITH_CE:
            ex = extras_ptr + row * 4
            rX = _ref(tl.load(ex))
            nX = _neg_log2(tl.load(ex + 1))
            cX = u * ce_weight
        else:
            rX = 0.0
            nX = 0.0
            cX = 0.0
        if CLASS:
            table_row = table_ptr + pid.to(tl.int64) * G * 6
            tcols = table_row + cols * 6
            tl.store(tcols, rS, mask=col_ok)
            tl.store(tcols + 1, nS, mask=col_ok)
            tl.store(tcols + 2, c1, mask=col_ok)
            tl.store(tcols + 3, c2, mask=col_ok)
            tl.store(tcols + 4, rT, mask=col_ok)
            tl.store(tcols + 5, nT, mask=col_ok)
            tl.debug_barrier()
            wSr = 0.0
            wSn = 0.0
            wS1 = 0.0
            wTr = 0.0
            wTn = 0.0
            wT1 = 0.0
        else:
            table_row = table_ptr
            # One group walked (ONE; TARGET's rest, group 1; BUCKET's off-top): scalars.
            last = cols == WALK_COL
            wSr = tl.sum(tl.where(last, rS, 0.0), axis=0)
            wSn = tl.sum(tl.where(last, nS, 0.0), axis=0)
            wS1 = tl.sum(tl.where(last, c1, 0.0), axis=0)
            wTr = tl.sum(tl.where(last, rT, 0.0), axis=0)
            wTn = tl.sum(tl.where(last, nT, 0.0), axis=0)
            wT1 = tl.sum(tl.where(last, c2, 0.0), axis=0)
        nfull = ((hi - lo).to(tl.uint32) // BLOCK).to(tl.int32)
        # (num_stages=1: the plain loop, the same code as range())
        for i in tl.range(0, nfull, num_stages=STAGES):
            _grad_step(srow, trow, groups_ptr, cw_ptr, grow, table_row, lo + i * BLOCK, hi,
                       lane_offs, G, wSr, wSn, wS1, wTr, wTn, wT1, rX, nX, cX, inv_t,
                       DENSE_T, TOPK, HAS_CW, WITH_CE, CLASS, False, CW_LOG, VEC, UNROLL, LANES)
        if lo + nfull * BLOCK < hi:
            _grad_step(srow, trow, groups_ptr, cw_ptr, grow, table_row, lo + nfull * BLOCK, hi,
                       lane_offs, G, wSr, wSn, wS1, wTr, wTn, wT1, rX, nX, cX, inv_t,
                       DENSE_T, TOPK, HAS_CW, WITH_CE, CLASS, True, CW_LOG, VEC, UNROLL, LANES)
        # The classes with more terms (top-k entries, the target), rewritten whole once every
        # lane's writes above are done.
        t_local = lo - 1
        if HAS_TARGET:
            target = tl.load(target_ptr + row).to(tl.int64)
            t_local = tl.minimum(tl.maximum(target - vocab_offset, -1), V).to(tl.int32)
        FIX_TARGET: tl.constexpr = HAS_TARGET and (WITH_CE or (GROUP_RULE == GROUP_TARGET))
        if (TOPK != TEACHER_DENSE) or FIX_TARGET:
            tl.debug_barrier()
            j = tl.arange(0, BLOCK_K)
            trow_tbl = table_row
            if TOPK != TEACHER_DENSE:
                in_k = j < K
                idx = tl.load(topk_idx_ptr + row * stride_i + j, mask=in_k, other=-1).to(tl.int64)
                lp = tl.load(topk_lp_ptr + row * stride_l + j, mask=in_k,
                             other=float("-inf")).to(tl.float32)
                ok = in_k & (idx >= 0) & (idx < V) & (lp != float("-inf"))
                entry_is_target = tl.max((ok & (idx == t_local)).to(tl.int32), axis=0) > 0
                sel = ok & (idx >= lo) & (idx < hi)
                _grad_fixups(srow, trow, groups_ptr, cw_ptr, grow, trow_tbl, idx, lp, ok, sel,
                             t_local, G, inv_t, rS, nS, c1, rT, nT, c2, c_top, u, rX, nX,
                             cX, cols, GROUP_RULE, TOPK, DENSE_T, HAS_CW, WITH_CE, CLASS, CW_LOG,
                             BLOCK_G)
            else:
                entry_is_target = t_local < -1
            if FIX_TARGET:
                pos = tl.zeros([BLOCK_K], tl.int64) + t_local
                # (Vector operands throughout: the interpreter mis-types bool vector & scalar.)
                not_entry = (tl.zeros([BLOCK_K], tl.int32) + entry_is_target.to(tl.int32)) == 0
                sel = (j == 0) & (pos >= lo) & (pos < hi) & not_entry
                no_lp = tl.zeros([BLOCK_K], tl.float32)
                _grad_fixups(srow, trow, groups_ptr, cw_ptr, grow, trow_tbl, pos, no_lp, j < 0,
                             sel, t_local, G, inv_t, rS, nS, c1, rT, nT, c2, c_top, u, rX,
                             nX, cX, cols, GROUP_RULE, TOPK, DENSE_T, HAS_CW, WITH_CE, CLASS,
                             CW_LOG, BLOCK_G)
    else:
        zeros = tl.zeros([LANES, VEC], tl.float32).to(grad_ptr.dtype.element_ty)
        for start in range(lo, hi, LANES * VEC):
            offs = start + lane_offs
            tl.store(grow + offs, zeros, mask=offs < hi)
