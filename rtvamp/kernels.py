"""Numba kernels of the iterative masked sampler (see `rtvamp.sampler` for the algorithm).

Every kernel is `@numba.njit(nogil=True, cache=True)` (rule 2 of docs/realtime.md: a kernel that
may run in the audio process must release the GIL) and works on caller-provided buffers only; the
only sorts are in-place sorts of scratch buffers.

Terms: V = vocabulary size (tokens), Cp = predicted codebooks, T = frames, L = T·Cp positions of
one batch item in upstream's flat (t, c) order: position p = t·Cp + c.

Floating point, chosen to follow upstream's float32 torch code where a decision depends on it:
* the schedule (r, γ(r), ⌊γ·N0⌋) and the noise scale τ = mask_temperature·(1 − r) are float32;
* logits / temperature is a float32 division; exponentials and normalisers are float64 (summed
  sequentially in vocabulary order); a token's probability p_sel is rounded to float32, its log is
  taken in float64 and rounded to float32, and confidence = ln(p_sel) + τ·g is float32 arithmetic;
* cumulative sums (top-p, typical) accumulate float32 probabilities in float64 and compare the
  float32-rounded sum, like torch's CPU cumsum.
"""

from __future__ import annotations

import math

import numba
import numpy as np

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
def _choose_token(x, temperature, sample, u, weights):
    """Sample (inverse CDF of u) or take the argmax of logits x; returns (token, float32 p_sel).

    probs = softmax(x / temperature) (plain softmax when temperature ≤ 0); `weights` float64 [V]
    receives exp(x/T − max). Greedy takes the first maximum of x itself.
    """
    v = x.shape[0]
    t32 = np.float32(temperature)
    scaled = temperature > 0.0
    m = np.float32(-np.inf)
    best = 0
    for j in range(v):
        s = x[j] / t32 if scaled else x[j]
        if s > m:
            m = s
        if x[j] > x[best]:
            best = j
    z = 0.0
    last_positive = 0
    for j in range(v):
        s = x[j] / t32 if scaled else x[j]
        w = 0.0 if s == -np.inf else math.exp(np.float64(s) - np.float64(m))  # filtered tokens
        weights[j] = w
        z += w
        if w > 0.0:
            last_positive = j
    token = best
    if sample:
        target = u * z
        token = last_positive
        acc = 0.0
        for j in range(v):
            acc += weights[j]
            if acc > target:
                token = j
                break
    return token, np.float32(weights[token] / z)


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
def masked_step(logits, codes, n_cond, mask_id, uniforms, gumbel, n0, step, steps, final, sample,
                temperature, mask_temperature, top_k, top_p, typical_mass, typical_min_tokens,
                sampled, conf, row, weights, scratch, d, keys, sort_buf):
    """One step of upstream `VampNet.generate`, updating `codes` [B, C, T] in place.

    logits float32 [B, Cp, T, V]; uniforms float64 [B, ≥L] (the first L are the sampling uniforms
    of positions p = t·Cp + c); gumbel float32 [B, L]; n0 int64 [B] (initial masked count used by
    the schedule). Filters are off when top_k ≤ 0, top_p ∉ (0, 1), typical_mass ≤ 0. Scratch:
    sampled int64 [B, L], conf float32 [B, L], row/scratch/d float32 [V], weights float64 [V],
    keys int64 [V], sort_buf float32 [L]. Only masked positions are sampled (a fixed position has
    confidence +inf upstream and keeps its token). Afterwards the remask_count(...) least
    confident of them hold `mask_id` again and the others their sampled token.
    """
    n_batch, cp, n_frames, _ = logits.shape
    tau = noise_scale(step, steps, mask_temperature)
    filtering = top_k > 0 or 0.0 < top_p < 1.0 or typical_mass > 0.0
    for b in range(n_batch):
        n_masked = 0
        for t in range(n_frames):
            for c in range(cp):
                p = t * cp + c
                if codes[b, n_cond + c, t] != mask_id:
                    conf[b, p] = np.inf
                    continue
                if filtering:
                    row[:] = logits[b, c, t]
                    _filter_row(row, top_k, top_p, typical_mass, typical_min_tokens, scratch, d, keys)
                    token, p_sel = _choose_token(row, temperature, sample, uniforms[b, p], weights)
                else:
                    token, p_sel = _choose_token(logits[b, c, t], temperature, sample, uniforms[b, p], weights)
                confidence = np.float32(math.log(np.float64(p_sel))) + tau * gumbel[b, p]
                sampled[b, p] = token
                conf[b, p] = confidence
                sort_buf[n_masked] = confidence
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
