"""The Triton kernels behind `cdm.precompute.radix_topk` (imported only when that module builds it: importing Triton
costs time and, on a CPU, must come after TRITON_INTERPRET is chosen)."""

import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


def radix_topk_rows(x_ptr, row_stride, vals_ptr, ids_ptr, n_cols, kk,
                    ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    """Program `row`: write the row's kk largest entries (values, int64 ids; in id order, not sorted) to row `row`
    of the [rows, kk] outputs. Keys are the fp32 bits of the value (+0.0 for -0.0) mapped to unsigned integers of
    the same order; the kk-th key is found digit by digit, most significant first."""
    row = tl.program_id(0).to(tl.int64)
    src = x_ptr + row * row_stride
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)
    prefix = tl.full([], 0, tl.uint32)  # the digits of the kk-th key found so far
    remaining = tl.full([], 0, tl.int32) + kk  # how many entries to take among those matching `prefix`
    for r in tl.static_range(ROUNDS):
        hist = tl.zeros([256], dtype=tl.int32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            inside = cols < n_cols
            bits = (tl.load(src + cols, mask=inside, other=0.0).to(tl.float32) + 0.0).to(tl.uint32, bitcast=True)
            key = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
            digit = ((key >> (24 - 8 * r)) & 0xFF).to(tl.int32)
            if r == 0:
                match = inside
            else:
                match = inside & ((key >> (32 - 8 * r)) == prefix)
            hist += tl.histogram(255 - digit, 256, mask=match)  # bin 0 = the largest digit
        cum = tl.cumsum(hist, 0)
        b = tl.sum((cum < remaining).to(tl.int32), 0)  # the bin holding the remaining-th largest entry
        remaining -= tl.sum(tl.where(bins < b, hist, 0), 0)
        prefix = (prefix << 8) | (255 - b).to(tl.uint32)
    # collect: every entry above the kk-th key, then the first `remaining` entries equal to it in id order
    dst = row * kk
    taken = tl.full([], 0, tl.int32)
    tied_before = tl.full([], 0, tl.int32)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        inside = cols < n_cols
        x = tl.load(src + cols, mask=inside, other=0.0)
        bits = (x.to(tl.float32) + 0.0).to(tl.uint32, bitcast=True)
        key = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
        high = key >> (32 - 8 * ROUNDS)
        above = inside & (high > prefix)
        tied = inside & (high == prefix)
        tie_rank = tied_before + tl.cumsum(tied.to(tl.int32), 0)  # 1-based among the row's ties so far
        take = above | (tied & (tie_rank <= remaining))
        pos = taken + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(vals_ptr + dst + pos, x, mask=take)
        tl.store(ids_ptr + dst + pos, cols.to(tl.int64), mask=take)
        taken += tl.sum(take.to(tl.int32), 0)
        tied_before += tl.sum(tied.to(tl.int32), 0)


def blockmax_topk_rows(x_ptr, row_stride, maxima_ptr, count_ptr, cand_vals_ptr, cand_ids_ptr, vals_ptr,
                       ids_ptr, overflow_ptr, lse_ptr, entropy_ptr, n_cols, kk, BLOCK: tl.constexpr,
                       TB: tl.constexpr, NB: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr,
                       STATS: tl.constexpr):
    """Program `row`: the row's kk largest entries, sorted by (value desc, id asc), via block maxima in one kernel.

    Pass 1 writes the maximum of each BLOCK-sized block to scratch; t = the kk-th largest maximum, so at least kk
    entries are >= t and every top-kk entry is. Pass 2 compacts the entries >= t (up to CAP) into scratch, counting
    them in `count_ptr` (zeroed by the caller); pass 3 keeps the top kk of them by a bitonic top-KP on
    (order key << 32 | ~id). A row with more than CAP candidates (heavy ties at t) is flagged in `overflow` for an
    exact fix-up; its outputs are then unspecified (in bounds) except the first value, the row's maximum.
    With STATS, pass 1 also accumulates the row's log-sum-exp and entropy online (`row_stats_reference`'s values,
    so the chunk needs no second read of the logits for them): a running maximum m, z = sum exp(x - m) and
    s = sum exp(x - m) (x - m), rescaled when m grows to m' (s <- a (s + (m - m') z), z <- a z, a = exp(m - m')),
    kept per block lane and combined the same way at the end; log-sum-exp = m + log z, entropy = log z - s / z."""
    row = tl.program_id(0).to(tl.int64)
    src = x_ptr + row * row_stride
    maxima = maxima_ptr + row * NB
    n_blocks = tl.cdiv(n_cols, BLOCK)
    blocks = tl.arange(0, TB)
    within = tl.arange(0, BLOCK)
    # STATS: per block lane b (one per row of the [TB, BLOCK] tile) a running maximum m_b, z_b = sum 2^(y - m_b) and
    # s_b = sum 2^(y - m_b) (y - m_b) over that lane's blocks, in base 2 (y = x log2 e: one FFMA and one MUFU.EX2 per
    # entry), rescaled when m_b grows; no cross-thread reduction per tile beyond the block maxima's own; the lanes are
    # combined once at the end. Differences below -200 are clamped there (2^-200 is 0 in fp32, so an entry of -inf
    # adds 0 and not 0 * -inf); NaN propagates through the clamp, so a row holding one gets NaN statistics.
    m_acc = tl.full([TB], float("-inf"), tl.float32)
    z_acc = tl.zeros([TB], dtype=tl.float32)
    s_acc = tl.zeros([TB], dtype=tl.float32)
    for b0 in range(0, n_blocks, TB):
        blk = b0 + blocks
        cols = blk[:, None] * BLOCK + within[None, :]
        x = tl.load(src + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, axis=1)
        tl.store(maxima + blk, block_max, mask=blk < n_blocks)
        if STATS:
            m_new = tl.maximum(m_acc, block_max * LOG2E)
            shift = tl.where(m_new > float("-inf"), m_new, 0.0)  # a lane of only -inf so far: z = s = 0
            had = m_acc > float("-inf")
            step = tl.where(had, m_acc - shift, 0.0)
            scale = tl.where(had, tl.exp2(step), 0.0)
            s_acc = scale * (s_acc + step * z_acc)
            z_acc = scale * z_acc
            d = tl.maximum(x * LOG2E - shift[:, None], -200.0, propagate_nan=tl.PropagateNan.ALL)
            e = tl.exp2(d)
            z_acc += tl.sum(e, axis=1)
            s_acc += tl.sum(e * d, axis=1)
            m_acc = m_new
    if STATS:
        m = tl.max(m_acc, axis=0)
        has = m_acc > float("-inf")
        step = tl.where(has, m_acc - tl.where(m > float("-inf"), m, 0.0), 0.0)
        w = tl.where(has, tl.exp2(step), 0.0)
        z = tl.sum(w * z_acc, axis=0)
        s = tl.sum(w * (s_acc + step * z_acc), axis=0)
        ok = z > 0  # false for a row of only -inf entries, or a NaN one: both stored as NaN (refused at resolve)
        safe_z = tl.where(ok, z, 1.0)
        log2_z = tl.log2(safe_z)
        tl.store(lse_ptr + row, tl.where(ok, (m + log2_z) * LN2, float("nan")))
        tl.store(entropy_ptr + row, tl.where(ok, (log2_z - s / safe_z) * LN2, float("nan")))
    tl.debug_barrier()  # the scratch maxima written by every thread of the program, read back whole
    b = tl.arange(0, NB)
    top_maxima = tl.topk(tl.load(maxima + b, mask=b < n_blocks, other=float("-inf")), KP)  # descending
    t = tl.max(tl.where(tl.arange(0, KP) == kk - 1, top_maxima, float("-inf")), axis=0)
    # pass 2: compact the candidates (>= t); slots come from an atomic counter (candidates are a few per thousand, so
    # this is far cheaper than a prefix sum over every tile), their order does not matter: pass 3 sorts them
    cand_vals = cand_vals_ptr + row * CAP
    cand_ids = cand_ids_ptr + row * CAP
    counter = count_ptr + row
    offs = tl.arange(0, TB * BLOCK)
    for start in range(0, n_cols, TB * BLOCK):
        cols = start + offs
        x = tl.load(src + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        sel = (cols < n_cols) & (x >= t)
        pos = tl.atomic_add(counter + offs * 0, 1, mask=sel, sem="relaxed")
        keep = sel & (pos < CAP)
        tl.store(cand_vals + pos, x, mask=keep)
        tl.store(cand_ids + pos, cols, mask=keep)
    tl.debug_barrier()
    count = tl.atomic_add(counter, 0, sem="relaxed")  # the final count, read where the atomics were done
    # pass 3: exact top-kk of the candidates, ties by ascending id
    c = tl.arange(0, CAP)
    valid = c < tl.minimum(count, CAP)
    v = tl.load(cand_vals + c, mask=valid, other=0.0) + 0.0  # -0.0 -> +0.0: equal values, one key
    i = tl.load(cand_ids + c, mask=valid, other=0)
    bits = v.to(tl.int32, bitcast=True)
    okey = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed integers in the order of the values
    key = (okey.to(tl.int64) << 32) | (4294967295 - i.to(tl.int64))
    key = tl.where(valid, key, -9223372036854775808)
    top = tl.topk(key, KP)
    ids = 4294967295 - (top & 4294967295)
    out = tl.arange(0, KP)
    ok = (out < kk) & (ids < n_cols)
    vals = tl.load(src + ids, mask=ok, other=0.0)
    # an overflowing row still reports its maximum first (the largest block maximum, a value of the row): the
    # statistics may use it as the row's shift before the fix-up replaces the row's ids and log-probs
    row_max = tl.max(top_maxima, axis=0).to(vals.dtype)
    vals = tl.where((out == 0) & (count > CAP), row_max, vals)
    tl.store(ids_ptr + row * kk + out, tl.where(ok, ids, 0), mask=out < kk)  # in range even for a NaN row
    tl.store(vals_ptr + row * kk + out, vals, mask=(out < kk))
    tl.store(overflow_ptr + row, (count > CAP).to(tl.int8))
