"""Numba kernels of the iterative masked sampler (see `rtvamp.sampler` for the algorithm).

Every kernel is `@numba.njit(nogil=True, cache=True)` (rule 2 of docs/realtime.md: a kernel that
may run in the audio process must release the GIL) and works on caller-provided buffers only; the
only sorts are in-place sorts of scratch buffers.

Terms: V = vocabulary size (tokens), Cp = predicted codebooks, T = frames, L = T·Cp positions of
one batch item in upstream's flat (t, c) order: position p = t·Cp + c.

Floating point, chosen to follow upstream's float32 torch code where a decision depends on it:
* the schedule (r, γ(r), ⌊γ·N0⌋) and the noise scale τ = mask_temperature·(1 − r) are float32;
* token choice (`_choose_token`, the hot loop: every masked position, V logits): s = logits /
  temperature is a float32 division (skipped at temperature 1, where it is exact); the softmax
  weights w = e^(s − max s) are float32 (`exp32_diff`, a vectorised polynomial, relative error
  < 1.5e-7), summed in float32 per block of BLOCK tokens and the block sums in float64; greedy
  takes the argmax of the logits themselves (exact); p_sel = w_token / z is rounded to float32,
  its log is taken in float64 and rounded to float32, and confidence = ln(p_sel) + τ·g is float32
  arithmetic. The NumPy reference (`rtvamp.sampler_numpy`) computes the softmax in float64: its
  p_sel agrees to ~3e-7 relative, so both choose the same tokens except where a sampling uniform
  or two confidences lie within that noise of each other (the upstream fixtures still match
  exactly: their decisions are far from float noise);
* the filters (typical, top-k, top-p) follow the reference bit for bit: float64 exponentials and
  normalisers (summed sequentially in vocabulary order); their cumulative sums accumulate float32
  probabilities in float64 and compare the float32-rounded sum, like torch's CPU cumsum.

Speed: fast-math flags only where harmless, in two small kernels (`contract` in the exponential,
`reassoc`/`nsz` in the block sums), so that LLVM vectorises the loops over V (AVX2: 8 lanes);
maxima are taken on order-preserving integer keys, which vectorise without fast-math.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

GUMBEL_U_MIN = 1e-20
"""Lower clamp of the Gumbel uniforms (upstream draws `uniform_(1e-20, 1)`)."""

_INDEX_BITS = np.int64(0xFFFFFFFF)


@numba.njit(nogil=True, cache=True)
def schedule_ratio(step, steps):
    """r = (step + 1) / steps as float32, like upstream's `torch.tensor((i + 1) / S)`."""
    return np.float32((step + 1) / steps)


@numba.njit(nogil=True, cache=True)
def schedule_count(step, steps, n0):
    """⌊γ(r)·N0⌋ in float32 (quirk Q6): γ(r) = cos(r·π/2) clamped to [1e-10, 1].

    r·π and /2 are each rounded to float32; the cosine is evaluated in float64 and rounded to
    float32; the product with float32(N0) is float32. Returns a count of tokens.
    """
    half_angle = (schedule_ratio(step, steps) * np.float32(math.pi)) / np.float32(2.0)
    gamma = np.float32(math.cos(np.float64(half_angle)))
    gamma = min(max(gamma, np.float32(1e-10)), np.float32(1.0))
    return np.int64(math.floor(gamma * np.float32(n0)))


@numba.njit(nogil=True, cache=True)
def remask_count(step, steps, n0, n_masked, final):
    """Number of positions to leave masked after this step (tokens).

    Not final: max(1, min(n_masked − 1, ⌊γ(r)·N0⌋)). Final (the last step, or a step made final
    by a deadline): 0, i.e. commit everything (upstream's last step gives ⌊1e-10·N0⌋ = 0).
    """
    if final:
        return np.int64(0)
    return max(np.int64(1), min(np.int64(n_masked - 1), schedule_count(step, steps, n0)))


@numba.njit(nogil=True, cache=True)
def noise_scale(step, steps, mask_temperature):
    """τ = mask_temperature·(1 − r) in float32, the scale of the Gumbel confidence noise."""
    return np.float32(mask_temperature) * (np.float32(1.0) - schedule_ratio(step, steps))


@numba.njit(nogil=True, cache=True)
def gumbel_from_uniforms(uniforms, out):
    """out[b, p] = float32(−ln(−ln(max(u, 1e-20)))) for uniforms u in [0, 1) (float64 [B, L])."""
    for b in range(uniforms.shape[0]):
        for p in range(uniforms.shape[1]):
            u = max(uniforms[b, p], GUMBEL_U_MIN)
            out[b, p] = np.float32(-math.log(-math.log(u)))


@numba.njit(nogil=True, cache=True)
def prepare_codes(codes, mask, n_cond, vocab_size, mask_id, out, n_masked):
    """Write the masked start codes into `out` [B, C, T] and count masked positions per item.

    Conditioning codebooks (< n_cond) are copied unmasked whatever `mask` says. In predicted
    codebooks a position is generated where mask != 0 or the code already is `mask_id` (upstream
    `masked_fill`). n_masked[b] receives the count (tokens). Returns 0, or 1 if a code is outside
    [0, vocab_size) ∪ {mask_id}, or 2 if a conditioning codebook holds `mask_id`.
    """
    n_batch, n_codebooks, n_frames = codes.shape
    for b in range(n_batch):
        count = 0
        for c in range(n_codebooks):
            for t in range(n_frames):
                code = codes[b, c, t]
                if code != mask_id and (code < 0 or code >= vocab_size):
                    return 1
                if c < n_cond:
                    if code == mask_id:
                        return 2
                    out[b, c, t] = code
                elif mask[b, c, t] != 0 or code == mask_id:
                    out[b, c, t] = mask_id
                    count += 1
                else:
                    out[b, c, t] = code
        n_masked[b] = count
    return 0


@numba.njit(nogil=True, cache=True)
def _max(x):
    """Largest logit of x."""
    m = x[0]
    for j in range(1, x.shape[0]):
        if x[j] > m:
            m = x[j]
    return m


BLOCK = 64
"""Tokens per block of the softmax weights' partial sums (`_block_sums`, inverse-CDF scan)."""

_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)  # ln 2 = _LN2_HI + _LN2_LO, _LN2_HI with 8 significant bits
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_P0 = np.float32(1.9875691500e-4)
_EXP_P1 = np.float32(1.3981999507e-3)
_EXP_P2 = np.float32(8.3334519073e-3)
_EXP_P3 = np.float32(4.1665795894e-2)
_EXP_P4 = np.float32(1.6666665459e-1)
_EXP_P5 = np.float32(5.0000001201e-1)
_EXP_MIN = np.float32(-87.33654)  # ≈ ln(smallest normal float32): below, exp32 returns 0


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose IEEE-754 bits are the int32 `bits` (a bit cast)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@numba.njit(nogil=True, cache=True, fastmath={"contract"})
def exp32_diff(a, b):
    """float32 e^(a − b) of float32 a ≤ b, as if a − b were exact: relative error < 1.5e-7.

    0 where a − b < −87.34 (the float32 normal range ends) or a = −inf. Cephes expf on the
    rounded difference d = fl(a − b), whose rounding error e = (a − b) − d (TwoSum, exact) joins
    the reduced argument: n = ⌊d·log2 e + ½⌋, r = d − n·ln 2 + e (two-part ln 2), e^r by a degree-7
    minimax polynomial, times 2^n built from its exponent bits. Branch-free float32 arithmetic,
    so that loops calling it vectorise (8 lanes with AVX2). The only fast-math flag is `contract`
    (a·b + c may become one fused multiply-add, which only rounds less); reassociation would undo
    TwoSum and the two-part reduction. Deterministic on a given CPU; CPUs without FMA may differ
    in the last bit.
    """
    d = a - b
    b_virtual = d - a
    e = (a - (d - b_virtual)) - (b + b_virtual)
    dc = max(d, _EXP_MIN)
    n = np.floor(dc * _LOG2E + np.float32(0.5))
    r = dc - n * _LN2_HI
    r = (r - n * _LN2_LO) + e
    y = ((((_EXP_P0 * r + _EXP_P1) * r + _EXP_P2) * r + _EXP_P3) * r + _EXP_P4) * r + _EXP_P5
    y = y * (r * r) + r + np.float32(1.0)
    scale = _f32_from_bits(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))
    return np.float32(0.0) if d < _EXP_MIN else y * scale


@numba.njit(nogil=True, cache=True)
def exp32(x):
    """float32 e^x for float32 x ≤ 0 (`exp32_diff(x, 0)`): relative error < 1.5e-7."""
    return exp32_diff(x, np.float32(0.0))


@numba.njit(nogil=True, cache=True)
def _order_key(bits):
    """Order-preserving int32 key of a float32's IEEE bits (negative floats: magnitude flipped).

    Its own inverse. Integer max reductions vectorise where float ones (NaN rules) do not.
    """
    return np.int32(bits ^ ((bits >> np.int32(31)) & np.int32(0x7FFFFFFF)))


@numba.njit(nogil=True, cache=True)
def _max_f32(x):
    """Largest value of a NaN-free float32 row x."""
    bits = x.view(np.int32)
    best = np.int32(-2147483648)
    for j in range(bits.shape[0]):
        best = max(best, _order_key(bits[j]))
    return _f32_from_bits(_order_key(best))


@numba.njit(nogil=True, cache=True)
def _argmax_f32(x, block_keys):
    """(first index of the largest value, that value) of a NaN-free float32 row x.

    The key maxima of blocks of BLOCK tokens go to `block_keys` int32 [⌈V/BLOCK⌉]; only the first
    block holding the overall maximum is searched.
    """
    v = x.shape[0]
    bits = x.view(np.int32)
    n_blocks = (v + BLOCK - 1) // BLOCK
    best = np.int32(-2147483648)
    for k in range(n_blocks):
        block_best = np.int32(-2147483648)
        for j in range(k * BLOCK, min(v, (k + 1) * BLOCK)):
            block_best = max(block_best, _order_key(bits[j]))
        block_keys[k] = block_best
        best = max(best, block_best)
    x_max = _f32_from_bits(_order_key(best))
    if x_max == 0.0:  # −0.0 and +0.0 have distinct keys but are equal maxima
        token = 0
        while x[token] != x_max:
            token += 1
        return token, x_max
    token = 0
    for k in range(n_blocks):
        if block_keys[k] == best:
            token = k * BLOCK
            while _order_key(bits[token]) != best:
                token += 1
            break
    return token, x_max


@numba.njit(nogil=True, cache=True)
def _exp_weights(x, t32, scaled, m, weights):
    """weights[j] = e^(x[j]/t32 − m), or e^(x[j] − m) when not scaled, by `exp32_diff` (float32)."""
    if scaled:
        for j in range(x.shape[0]):
            weights[j] = exp32_diff(x[j] / t32, m)
    else:
        for j in range(x.shape[0]):
            weights[j] = exp32_diff(x[j], m)


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "nsz"})
def _block_sums(weights, block_sums):
    """block_sums[k] = float32 sum of weights[k·BLOCK : (k+1)·BLOCK]; returns the block count.

    Fast-math reassociation (this kernel only) lets LLVM add 8 lanes at a time; the order of
    additions inside a block is LLVM's, i.e. fixed for a given build.
    """
    v = weights.shape[0]
    n_blocks = (v + BLOCK - 1) // BLOCK
    for k in range(n_blocks):
        s = np.float32(0.0)
        for j in range(k * BLOCK, min(v, (k + 1) * BLOCK)):
            s += weights[j]
        block_sums[k] = s
    return n_blocks


@numba.njit(nogil=True, cache=True)
def _max_and_norm(x):
    """(max of x, Σ exp(x − max) summed in vocabulary order in float64)."""
    m = _max(x)
    z = 0.0
    for j in range(x.shape[0]):
        z += math.exp(np.float64(x[j]) - np.float64(m))
    return m, z


@numba.njit(nogil=True, cache=True)
def _typical_filter(x, mass, min_tokens, d, keys):
    """Locally typical filtering of logits x (float32 [V]) in place: the intended upstream filter.

    d_j = |−ln p_j − H| (float32); tokens sorted by d ascending (ties by id); the prefix whose
    cumulative probability stays below `mass`, plus the first token reaching it and at least
    `min_tokens` tokens, is kept; the rest is set to −inf. `d` float32 [V], `keys` int64 [V].
    """
    v = x.shape[0]
    m, z = _max_and_norm(x)
    log_z = math.log(z)
    plogp = 0.0
    for j in range(v):
        lp = (np.float64(x[j]) - np.float64(m)) - log_z
        if lp > -math.inf:
            plogp += lp * math.exp(lp)
    entropy = -plogp
    bits = d.view(np.uint32)
    for j in range(v):
        lp = (np.float64(x[j]) - np.float64(m)) - log_z
        d[j] = np.float32(abs(-lp - entropy))
        keys[j] = (np.int64(bits[j]) << 32) | np.int64(j)
    keys.sort()
    mass32 = np.float32(mass)
    cum = 0.0
    last = 0
    while last < v - 1:
        j = keys[last] & _INDEX_BITS
        cum += np.float32(math.exp((np.float64(x[j]) - np.float64(m)) - log_z))
        if not np.float32(cum) < mass32:
            break
        last += 1
    d_cut = d[keys[last] & _INDEX_BITS]
    for q in range(min_tokens, v):
        j = keys[q] & _INDEX_BITS
        if d[j] > d_cut:
            x[j] = -np.inf


@numba.njit(nogil=True, cache=True)
def _top_k_filter(x, k, scratch):
    """Set logits below the k-th largest to −inf in place (ties with it are kept); scratch [V]."""
    v = x.shape[0]
    if k >= v:
        return
    s = scratch[:v]
    s[:] = x
    s.sort()
    kth = s[v - k]
    for j in range(v):
        if x[j] < kth:
            x[j] = -np.inf


@numba.njit(nogil=True, cache=True)
def _nucleus_cut(x, m, z, top_p32, bound, scratch):
    """Smallest logit of the nucleus among logits ≥ bound, or NaN if their mass never exceeds top_p."""
    n = 0
    for j in range(x.shape[0]):
        if x[j] >= bound:
            scratch[n] = x[j]
            n += 1
    s = scratch[:n]
    s.sort()
    cum = 0.0
    for q in range(n - 1, -1, -1):
        cum += np.float32(math.exp(np.float64(s[q]) - np.float64(m)) / z)
        if np.float32(cum) > top_p32:
            return np.float64(s[q])
    return math.nan


@numba.njit(nogil=True, cache=True)
def _norm_and_nucleus_bound(x, m, top_p):
    """(z = Σ exp(x − m) in vocabulary order, a logit bound for the nucleus search).

    The tokens ≥ bound (a prefix of the sorted order) must hold more than top_p of the mass: the
    first of m − 1, m − 2, m − 4, …, m − 32 that does (with a 1e-4 margin), else the bound
    p ≥ (1 − top_p)/(2V), which contains the nucleus since every kept token has
    p ≥ (1 − top_p)/V. Only the speed of `_top_p_filter` depends on the bound, never its result.
    """
    m64 = np.float64(m)
    z = mass1 = mass2 = mass4 = mass8 = mass16 = mass32 = 0.0
    for j in range(x.shape[0]):
        gap = m64 - np.float64(x[j])
        e = math.exp(-gap)
        z += e
        if gap <= 32.0:
            mass32 += e
            if gap <= 16.0:
                mass16 += e
                if gap <= 8.0:
                    mass8 += e
                    if gap <= 4.0:
                        mass4 += e
                        if gap <= 2.0:
                            mass2 += e
                            if gap <= 1.0:
                                mass1 += e
    need = (top_p + 1e-4) * z
    gap = 1.0
    for mass in (mass1, mass2, mass4, mass8, mass16, mass32):
        if mass > need:
            return z, m64 - gap
        gap *= 2.0
    return z, m64 + math.log(0.5 * (1.0 - top_p) / x.shape[0] * z)


@numba.njit(nogil=True, cache=True)
def _top_p_filter(x, top_p, scratch):
    """Nucleus filter of logits x (float32 [V]) in place, HF/upstream semantics (at temperature 1).

    Sorted descending, the first token whose float32 cumulative probability exceeds top_p is the
    last one kept; lower logits become −inf. Only the tokens above the bound of
    `_norm_and_nucleus_bound` are sorted; if their cumulative probability never exceeds top_p,
    all tokens are.
    """
    v = x.shape[0]
    m = _max(x)
    z, bound = _norm_and_nucleus_bound(x, m, top_p)
    top_p32 = np.float32(top_p)
    cut = _nucleus_cut(x, m, z, top_p32, bound, scratch)
    if math.isnan(cut):
        cut = _nucleus_cut(x, m, z, top_p32, -math.inf, scratch)
    if math.isnan(cut):
        return
    for j in range(v):
        if x[j] < cut:
            x[j] = -np.inf


@numba.njit(nogil=True, cache=True)
def _choose_token(x, temperature, sample, u, weights, block_sums):
    """Sample (inverse CDF of u) or take the argmax of logits x; returns (token, float32 p_sel).

    probs = softmax(x / temperature) (plain softmax when temperature ≤ 0): m = max(x)/T in float32
    (= max(x/T), rounding being monotone), `weights` float32 [V] receives w_j = e^(x_j/T − m) by
    `exp32_diff` (0 for filtered tokens), `block_sums` float32 [⌈V/BLOCK⌉] their sums per block of
    BLOCK tokens (before that, viewed as int32, it is `_argmax_f32`'s scratch), z = Σ block sums in
    float64. Greedy takes the first maximum of x itself (its weight is e^0 = 1). Sampling takes the
    first token whose float64 running sum of weights exceeds u·z, scanning block sums first, then
    the tokens of the block; a token of weight 0 is never chosen. p_sel = float32(w_token / z).
    """
    v = x.shape[0]
    t32 = np.float32(temperature)
    scaled = temperature > 0.0 and t32 != np.float32(1.0)  # x / 1 is x
    if sample:
        token, x_max = 0, _max_f32(x)
    else:
        token, x_max = _argmax_f32(x, block_sums.view(np.int32))
    m = x_max / t32 if scaled else x_max
    _exp_weights(x, t32, scaled, m, weights)
    n_blocks = _block_sums(weights, block_sums)
    z = 0.0
    for k in range(n_blocks):
        z += np.float64(block_sums[k])
    if not sample:
        return token, np.float32(np.float64(weights[token]) / z)
    target = u * z
    acc = 0.0
    start = 0
    for k in range(n_blocks):
        s = np.float64(block_sums[k])
        if acc + s > target:
            break
        acc += s
        start += BLOCK
    for j in range(start, v):  # within the block (and beyond it, should rounding demand it)
        acc += np.float64(weights[j])
        if acc > target:
            return j, np.float32(np.float64(weights[j]) / z)
    token = v - 1
    while token > 0 and not weights[token] > 0.0:  # u·z not reached by rounding: last possible
        token -= 1
    return token, np.float32(np.float64(weights[token]) / z)


@numba.njit(nogil=True, cache=True)
def _filter_row(row, top_k, top_p, typical_mass, typical_min_tokens, scratch, d, keys):
    """Apply the enabled filters to a logits row copy in upstream order: typical, top-k, top-p."""
    if typical_mass > 0.0:
        _typical_filter(row, typical_mass, typical_min_tokens, d, keys)
    if top_k > 0:
        _top_k_filter(row, top_k, scratch)
    if 0.0 < top_p < 1.0:
        _top_p_filter(row, top_p, scratch)


@numba.njit(nogil=True, cache=True)
def _choose_positions(logits, codes, n_cond, mask_id, uniforms, gumbel, tau, sample, temperature,
                      top_k, top_p, typical_mass, typical_min_tokens, sampled, conf, row, weights,
                      block_sums, scratch, d, keys):
    """Token (`sampled`) and confidence ln(p_sel) + τ·g (`conf`, float32) of every masked position.

    Positions are visited in the logits' memory order (b, c, t); each result depends on its own
    position only.
    """
    n_batch, cp, n_frames, _ = logits.shape
    filtering = top_k > 0 or 0.0 < top_p < 1.0 or typical_mass > 0.0
    for b in range(n_batch):
        for c in range(cp):
            for t in range(n_frames):
                if codes[b, n_cond + c, t] != mask_id:
                    continue
                p = t * cp + c
                if filtering:
                    row[:] = logits[b, c, t]
                    _filter_row(row, top_k, top_p, typical_mass, typical_min_tokens, scratch, d, keys)
                    token, p_sel = _choose_token(row, temperature, sample, uniforms[b, p], weights,
                                                 block_sums)
                else:  # a separate call: logits may be read-only, row is not
                    token, p_sel = _choose_token(logits[b, c, t], temperature, sample, uniforms[b, p],
                                                 weights, block_sums)
                sampled[b, p] = token
                conf[b, p] = np.float32(math.log(np.float64(p_sel))) + tau * gumbel[b, p]


@numba.njit(nogil=True, cache=True)
def _remask(codes, n_cond, mask_id, n0, step, steps, final, sampled, conf, sort_buf):
    """Commit the masked positions' sampled tokens except the remask_count(...) least confident."""
    n_batch, n_codebooks, n_frames = codes.shape
    cp = n_codebooks - n_cond
    for b in range(n_batch):
        n_masked = 0
        for t in range(n_frames):
            for c in range(cp):
                if codes[b, n_cond + c, t] == mask_id:
                    sort_buf[n_masked] = conf[b, t * cp + c]
                    n_masked += 1
        n_keep = remask_count(step, steps, n0[b], n_masked, final)
        ordered = sort_buf[:n_masked]
        ordered.sort()
        cut = ordered[n_keep] if n_keep < n_masked else np.float32(np.inf)
        for t in range(n_frames):
            for c in range(cp):
                p = t * cp + c
                if codes[b, n_cond + c, t] == mask_id and not conf[b, p] < cut:
                    codes[b, n_cond + c, t] = sampled[b, p]


@numba.njit(nogil=True, cache=True)
def masked_step(logits, codes, n_cond, mask_id, uniforms, gumbel, n0, step, steps, final, sample,
                temperature, mask_temperature, top_k, top_p, typical_mass, typical_min_tokens,
                sampled, conf, row, weights, block_sums, scratch, d, keys, sort_buf):
    """One step of upstream `VampNet.generate`, updating `codes` [B, C, T] in place.

    logits float32 [B, Cp, T, V]; uniforms float64 [B, ≥L] (the first L are the sampling uniforms
    of positions p = t·Cp + c); gumbel float32 [B, L]; n0 int64 [B] (initial masked count used by
    the schedule). Filters are off when top_k ≤ 0, top_p ∉ (0, 1), typical_mass ≤ 0. Scratch:
    sampled int64 [B, L], conf float32 [B, L], row/weights/scratch/d float32 [V], block_sums
    float32 [⌈V/BLOCK⌉], keys int64 [V], sort_buf float32 [L]. Only masked positions are sampled
    (a fixed position has confidence +inf upstream and keeps its token). Afterwards the
    remask_count(...) least confident of them hold `mask_id` again and the others their sampled
    token.

    Single-threaded on purpose: a prange version (numba parallel=True, positions split among 2
    threads, same tokens) was slower on the 2-core target machine while other processes ran, and
    its waiting OpenMP threads slowed the single-threaded work that followed it.
    """
    tau = noise_scale(step, steps, mask_temperature)
    _choose_positions(logits, codes, n_cond, mask_id, uniforms, gumbel, tau, sample, temperature,
                      top_k, top_p, typical_mass, typical_min_tokens, sampled, conf, row, weights,
                      block_sums, scratch, d, keys)
    _remask(codes, n_cond, mask_id, n0, step, steps, final, sampled, conf, sort_buf)
