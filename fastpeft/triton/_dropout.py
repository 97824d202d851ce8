"""The seeded dropout keep-mask, regenerated inside kernels (never stored).

It follows the spec in :mod:`fastpeft.reference` bit for bit (the oracle is
``reference.dropout_keep_mask``): for the input viewed as ``(T, K)``, element
``(t, k)`` uses the 64-bit counter ``c = t * ceil(K / 4) + k // 4`` and lane ``k % 4``
of ``Philox4x32-10(counter=(c_lo, c_hi, 0, 0), key=seed)``; it is kept when that
uint32 word is ``>= threshold = floor(p * 2**32)``. One Philox call serves the four
neighbouring columns ``4g .. 4g + 3``, so a ``(BM, BN)`` tile costs ``BM * BN / 4``
calls. Every kernel that touches the dropped tensor (forward down-projection, dx
epilogue, dA, the int8 LoRA kernels) calls :func:`dropout_keep_mask` with the same
``(seed, rows, cols, K, threshold)`` and therefore sees the same mask.
"""

import triton
import triton.language as tl


@triton.jit
def dropout_keep_mask(seed, rows, cols, K, threshold):
    """Keep-mask ``(BM, BN)`` (bool) of the elements ``(rows[i], cols[j])``.

    seed: int64 scalar (``tl.load`` of the 1-element seed tensor; negative seeds are
    reinterpreted as uint64, like the reference). rows: (BM,) int row indices.
    cols: (BN,) int column indices, consecutive and starting at a multiple of 4, with
    BN a multiple of 4 (any tile ``start + tl.arange(0, BN)`` with ``start % 4 == 0``).
    K: the row length of the ``(T, K)`` view. threshold: ``floor(p * 2**32)`` as an int.
    Rows/cols past the tensor's end get a well-defined but meaningless value; the
    caller masks them.
    """
    BM: tl.constexpr = rows.shape[0]
    BN: tl.constexpr = cols.shape[0]
    tl.static_assert(BN % 4 == 0, "dropout_keep_mask: the column tile must be a multiple of 4")
    # Group index k // 4 of each run of 4 columns: (BN // 4,). Reduced on the 1-D index
    # vector, so it costs nothing next to the (BM, BN // 4) Philox tile.
    groups = tl.min(tl.reshape(cols, (BN // 4, 4)), axis=1) // 4
    groups_per_row = tl.cdiv(K, 4)
    # 64-bit counter: t * ceil(K/4) overflows int32 for large activations.
    counter = rows.to(tl.int64)[:, None] * groups_per_row + groups.to(tl.int64)[None, :]
    c_lo = counter.to(tl.uint32)  # int64 -> uint32 truncates: the low word
    c_hi = (counter >> 32).to(tl.uint32)
    zero = c_lo * 0
    w0, w1, w2, w3 = tl.random.philox(seed, c_lo, c_hi, zero, zero)
    # Interleave the lanes so column 4g + l holds word l: join(join(w0, w2), join(w1, w3))
    # has shape (BM, BN/4, 2, 2) with [.., i, j] = w[2i + j], which reshapes row-major
    # to (BM, BN) in lane order.
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BM, BN))
    # Compare by value in int64: uint32 words are zero-extended, and threshold may
    # arrive as int32, uint32 or int64 (Triton types int arguments by magnitude).
    return words.to(tl.int64) >= threshold
