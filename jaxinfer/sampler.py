"""Vectorised per-row sampling (vLLM semantics), in two halves.

Host: `make_sampling_tensors(rows, num_rows_padded, vocab_size)` turns one `RowInfo` per scheduled sequence into
`SamplingTensors` (a pytree of numpy arrays shaped [S] / [S, X]) and a hashable `SamplingFlags` that selects one of
a few compiled variants. Padded rows are greedy with every knob off, so whatever logits they hold is harmless.

Device: `sample(logits [S, V], tensors, flags, eos_token_ids)`, traceable inside a jitted step (`sample_jit` is
the standalone jitted version). Order, as vLLM:
  1. penalties: repetition (prompt+output tokens), then frequency/presence (output token counts);
  2. min_tokens: EOS and stop_token_ids -> -inf while the row is below min_tokens;
  3. greedy rows: exact first-index argmax of those logits;
  4. temperature, then top_k, top_p (on the top_k-renormalised distribution), min_p; then one draw.
Logprobs are of the model's RAW distribution: log_softmax of the logits as given (before penalties,
suppression and temperature), vLLM's default (`logprobs_mode="raw_logprobs"`).

Vocab-parallel (tensor / pipeline parallelism): `sample` runs inside shard_map on each device's slice of the
vocabulary, `vocab=VocabShard(axes)`. Every full-vocabulary pass stays local and only per-row results cross
devices: the argmax is a max and a min-index all-reduce of [S] values, top-k / top-p thresholds gather each shard's
top candidates ([S, shards * K]), the draw gathers per-block masses ([S, V / 128]) and picks the block, then its
owner picks the token. The full vocabulary is never gathered.

Randomness is per row and batch invariant: a row's key is fold_in(key(seed), step), seed being the user's seed
or a request-level seed the engine drew once, step the index of the token being generated. Every op is row-wise,
so a row samples the same token whatever else is in the batch and wherever it sits.

Cost on a 2-core CPU (S=256, V=49152), which shaped the design: a plain reduction over [S, V] is ~3 ms, an exp
pass ~45 ms, materialising any new [S, V] array ~50 ms, random bits per logit (Gumbel) ~250 ms, a full sort ~2.5 s.
So: no per-logit randomness (an inverse-CDF draw with two uniforms per row over 128-wide blocks: a block by its
mass, then a token within it), temperature folded into the exp rather than a divided copy, every filter turned
into one per-row logit threshold, and no sort: top_k/top_p read `lax.top_k` candidates (bucketed width) and only
rows whose top_k or nucleus reaches past them pay an exact 32-step bisection, behind a `lax.cond` that is skipped
on steps where no row needs it.
"""
from __future__ import annotations

import dataclasses
import secrets
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxinfer.sampling_params import SamplingParams
from jaxinfer.vocab_parallel import WHOLE_VOCAB, VocabShard

CANDIDATE_BUCKETS = (64, 256, 1024)  # lax.top_k widths; a larger top_k is resolved by bisection
TOP_P_CANDIDATES = 256   # the nucleus usually fits; a step where one does not pays the bisection
LOGPROB_BUCKETS = (5, 20)  # top-logprob widths (requests ask for <= 20)
BLOCK = 128  # inverse-CDF / argmax block width
_U64 = (1 << 64) - 1


# ================================================================================================================
# Host side
# ================================================================================================================
def new_request_seed() -> int:
    """The request-level seed, drawn once per request (used by rows whose params.seed is None)."""
    return secrets.randbits(64)


def row_seed(params: SamplingParams, request_seed: int, index: int = 0) -> int:
    """Seed of the `index`-th of a request's n sequences: the user seed if set, else the request-level seed;
    plus `index` so the n samples differ (vLLM gives its n child requests seed + index too)."""
    base = params.seed if params.seed is not None else request_seed
    return (base + index) & _U64


@dataclasses.dataclass(frozen=True)
class RowInfo:
    """What the sampler needs about one scheduled sequence this step.

    seed: the resolved seed (`row_seed`). step: index of the token being generated, i.e. the number of output
    tokens the sequence already has. prompt_token_ids / output_token_ids (lists or arrays): only read, and then
    required, when `params.has_penalties`.
    """
    params: SamplingParams
    seed: int
    step: int
    prompt_token_ids: Sequence[int] | None = None
    output_token_ids: Sequence[int] | None = None
    # Async scheduling: the last output token is still on the device, in this row of the previous step's sampled
    # ids (`sample`'s prev_token_ids); -1 = every output token is known. Only penalties need it.
    pending_row: int = -1

    @property
    def suppress_stop(self) -> bool:
        """min_tokens not reached: EOS (unless ignore_eos) and stop_token_ids must not be sampled."""
        return self.step < self.params.min_tokens


class SamplingFlags(NamedTuple):
    """Static, hashable switches: each distinct value is one compiled variant, so they are coarse.

    all_greedy: no random row: no uniforms, thresholds or exp pass, just the argmax.
    num_candidates: 0 = no random row uses top_k/top_p; else the lax.top_k width (a CANDIDATE_BUCKETS value or V).
    any_penalties / any_min_tokens: some row edits its logits (an edit copies [S, V], so only when needed).
    num_logprobs: -1 = no row wants logprobs; 0 = sampled-token logprob only; else a LOGPROB_BUCKETS width.
    """
    all_greedy: bool = True
    num_candidates: int = 0
    any_penalties: bool = False
    any_min_tokens: bool = False
    num_logprobs: int = -1


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PenaltyTensors:
    repetition: np.ndarray     # [S] f32, 1 = off
    presence: np.ndarray       # [S] f32
    frequency: np.ndarray      # [S] f32
    token_ids: np.ndarray      # [S, U] int32: distinct tokens of prompt+output, -1 padded; U a power of two
    output_counts: np.ndarray  # [S, U] f32: occurrences of each in the output (0: prompt only)
    pending_row: np.ndarray    # [S] int32: row of prev_token_ids holding one more output token, -1 = none


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingTensors:
    temperature: np.ndarray   # [S] f32 (1 for greedy rows: they take the argmax before it applies)
    greedy: np.ndarray        # [S] bool
    top_k: np.ndarray         # [S] int32, 0 = off
    top_p: np.ndarray         # [S] f32, 1 = off
    min_p: np.ndarray         # [S] f32, 0 = off
    key_data: np.ndarray      # [S, 2] uint32: threefry key data of the row's seed (as jax.random.key(seed))
    step: np.ndarray          # [S] int32: folded into the key
    suppress_eos: np.ndarray  # [S] bool: under min_tokens and not ignore_eos: the static EOS ids -> -inf
    stop_ids: np.ndarray      # [S, NS] int32: stop_token_ids of rows under min_tokens, -1 padded (NS may be 0)
    penalties: PenaltyTensors | None  # None unless flags.any_penalties: no history crosses to the device


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


def _bucket(n: int, buckets: Sequence[int]) -> int:
    return next((b for b in buckets if b >= n), buckets[-1])


def make_sampling_tensors(rows: Sequence[RowInfo], num_rows_padded: int,
                          vocab_size: int) -> tuple[SamplingTensors, SamplingFlags]:
    """Host arrays for one step: row i of the output is rows[i]; rows len(rows).. are inert padding."""
    S = num_rows_padded
    if len(rows) > S:
        raise ValueError(f"{len(rows)} rows do not fit num_rows_padded={S}")
    temperature = np.ones(S, np.float32)
    greedy = np.ones(S, bool)
    top_k = np.zeros(S, np.int32)
    top_p = np.ones(S, np.float32)
    min_p = np.zeros(S, np.float32)
    key_data = np.zeros((S, 2), np.uint32)
    step = np.zeros(S, np.int32)
    suppress_eos = np.zeros(S, bool)
    stop_lists: list[tuple[int, tuple[int, ...]]] = []
    need_candidates, any_penalties, any_min_tokens, num_logprobs = 0, False, False, -1

    for i, r in enumerate(rows):
        p = r.params
        seed = r.seed & _U64
        key_data[i] = (seed >> 32, seed & 0xFFFFFFFF)
        step[i] = r.step
        if not p.is_greedy:
            # Filters only matter for random rows; greedy rows keep them off so they never cost a variant.
            greedy[i] = False
            temperature[i] = p.temperature
            if 0 < p.top_k < vocab_size:
                top_k[i] = p.top_k
                need_candidates = max(need_candidates, p.top_k)
            if p.top_p < 1.0:
                top_p[i] = p.top_p
                need_candidates = max(need_candidates, TOP_P_CANDIDATES)
            min_p[i] = p.min_p
        if r.suppress_stop:
            any_min_tokens = True
            suppress_eos[i] = not p.ignore_eos
            if p.stop_token_ids:
                stop_lists.append((i, p.stop_token_ids))
        any_penalties |= p.has_penalties
        if p.logprobs is not None:
            num_logprobs = max(num_logprobs, p.logprobs)

    ns = _pow2_at_least(max(len(ids) for _, ids in stop_lists), 4) if stop_lists else 0
    stop_ids = np.full((S, ns), -1, np.int32)
    for i, ids in stop_lists:
        stop_ids[i, :len(ids)] = ids

    flags = SamplingFlags(
        all_greedy=bool(greedy.all()),
        num_candidates=min(_bucket(need_candidates, CANDIDATE_BUCKETS), vocab_size) if need_candidates else 0,
        any_penalties=any_penalties,
        any_min_tokens=any_min_tokens,
        num_logprobs=num_logprobs if num_logprobs <= 0 else _bucket(num_logprobs, LOGPROB_BUCKETS))
    tensors = SamplingTensors(temperature, greedy, top_k, top_p, min_p, key_data, step, suppress_eos, stop_ids,
                              _make_penalties(rows, S) if any_penalties else None)
    return tensors, flags


def _make_penalties(rows: Sequence[RowInfo], S: int) -> PenaltyTensors:
    """Distinct history tokens and their output counts, found here (np.unique, tens of us per row) so that the
    device gathers/scatters [S, U] entries instead of building [S, V] count and mask arrays."""
    rep = np.ones(S, np.float32)
    pres = np.zeros(S, np.float32)
    freq = np.zeros(S, np.float32)
    pending_row = np.full(S, -1, np.int32)
    per_row = []
    for i, r in enumerate(rows):
        p = r.params
        if not p.has_penalties:
            continue  # inert row: no tokens, neutral penalties
        if r.prompt_token_ids is None or r.output_token_ids is None:
            raise ValueError(f"row {i} has penalties but no prompt_token_ids/output_token_ids history")
        prompt = np.asarray(r.prompt_token_ids, np.int64).reshape(-1)
        output = np.asarray(r.output_token_ids, np.int64).reshape(-1)
        output = output[output >= 0]
        rep[i], pres[i], freq[i] = p.repetition_penalty, p.presence_penalty, p.frequency_penalty
        pending_row[i] = r.pending_row
        ids = np.unique(np.concatenate([prompt[prompt >= 0], output]))
        out_ids, out_counts = np.unique(output, return_counts=True)
        counts = np.zeros(ids.size, np.float32)
        counts[np.searchsorted(ids, out_ids)] = out_counts
        per_row.append((i, ids, counts))
    U = _pow2_at_least(max(ids.size for _, ids, _ in per_row), 16)  # bucketed: few shapes, few compiles
    token_ids = np.full((S, U), -1, np.int32)
    output_counts = np.zeros((S, U), np.float32)
    for i, ids, counts in per_row:
        token_ids[i, :ids.size] = ids
        output_counts[i, :ids.size] = counts
    return PenaltyTensors(rep, pres, freq, token_ids, output_counts, pending_row)


# ================================================================================================================
# Device side
# ================================================================================================================
class SamplerOutput(NamedTuple):
    token_ids: jax.Array     # [S] int32
    logprob: jax.Array       # [S] f32: raw logprob of the sampled token (0 when flags.num_logprobs == -1)
    top_ids: jax.Array       # [S, K] int32, K = max(flags.num_logprobs, 0); descending logprob
    top_logprobs: jax.Array  # [S, K] f32


def sample(logits: jax.Array, tensors: SamplingTensors, flags: SamplingFlags,
           eos_token_ids: tuple[int, ...] = (), prev_token_ids: jax.Array | None = None,
           vocab: VocabShard = WHOLE_VOCAB) -> SamplerOutput:
    """One token per row of `logits` [S, V] (this shard's [S, V / shards] under shard_map with `vocab`). `flags`
    and `eos_token_ids` must be static under jit. prev_token_ids: the previous step's sampled ids, which
    penalties' pending_row entries read."""
    raw = logits.astype(jnp.float32)
    S, local = raw.shape
    V, offset = vocab.size(local), vocab.offset(local)
    x = raw
    if flags.any_penalties:
        pen = tensors.penalties
        if prev_token_ids is not None:
            pen = add_pending_tokens(pen, prev_token_ids)
        x = apply_penalties(x, pen, offset)
    if flags.any_min_tokens:
        x = _suppress_stop_tokens(x, tensors, eos_token_ids, offset)

    greedy_tokens, m = _first_argmax(x, vocab)
    if flags.all_greedy:
        tokens = greedy_tokens
    else:
        # Greedy rows have temperature 1 and no filters; their draw is discarded for the argmax.
        m = jnp.where(jnp.isfinite(m), m, 0.0)  # an all -inf row must not turn into NaN
        t = tensors.temperature
        # Each filter keeps {x >= threshold}, in logit space (temperature preserves order). min_p drops
        # p_i < min_p * p_max, i.e. (x_i - m) / T < log(min_p); log(0) = -inf keeps all. The filters only
        # intersect, so one max of thresholds equals applying them one after another in vLLM's order.
        thr = m + t * jnp.log(tensors.min_p)
        if flags.num_candidates:
            thr = jnp.maximum(thr, _top_k_top_p_threshold(x, m, 1.0 / t, tensors, min(flags.num_candidates, V),
                                                          vocab))
        sampled = _inverse_cdf(x, m, 1.0 / t, thr, _row_uniforms(tensors), vocab)
        tokens = jnp.where(tensors.greedy, greedy_tokens, sampled)

    if flags.num_logprobs < 0:
        return SamplerOutput(tokens, jnp.zeros((S,), jnp.float32), jnp.zeros((S, 0), jnp.int32),
                             jnp.zeros((S, 0), jnp.float32))
    return SamplerOutput(tokens, *compute_logprobs(raw, tokens, flags.num_logprobs, vocab))


sample_jit = jax.jit(sample, static_argnames=("flags", "eos_token_ids"))


def compute_logprobs(logits: jax.Array, token_ids: jax.Array, k: int, vocab: VocabShard = WHOLE_VOCAB):
    """(logprob [N] at token_ids, top-k ids [N, k], top-k logprobs [N, k]) of log_softmax(logits [N, V]),
    descending. Also what prompt logprobs need."""
    logits = logits.astype(jnp.float32)
    n, local = logits.shape
    token_ids = token_ids.astype(jnp.int32)
    if not vocab.axes:
        lse = jax.nn.logsumexp(logits, axis=-1)
        chosen = jnp.take_along_axis(logits, token_ids[:, None], axis=-1)[:, 0] - lse
    else:  # log-sum-exp from per-shard partial sums; the chosen logit from the shard that owns the id
        m = vocab.max(logits)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        lse = m + jnp.log(vocab.sum(jnp.exp(logits - m[:, None])))
        ids = token_ids - vocab.offset(local)
        own = (ids >= 0) & (ids < local)
        mine = jnp.take_along_axis(logits, jnp.where(own, ids, 0)[:, None], axis=-1)[:, 0]
        chosen = vocab.psum(jnp.where(own, mine, 0.0)) - lse
    if k <= 0:
        return chosen, jnp.zeros((n, 0), jnp.int32), jnp.zeros((n, 0), jnp.float32)
    vals, ids = jax.lax.top_k(logits, min(k, local))
    if vocab.axes:  # each shard's top k, gathered ([N, shards * k]), then the top k of those: exact
        vals, ids = vocab.gather(vals), vocab.gather(ids.astype(jnp.int32) + vocab.offset(local))
        vals, pos = jax.lax.top_k(vals, k)
        ids = jnp.take_along_axis(ids, pos, axis=-1)
    return chosen, ids.astype(jnp.int32), vals - lse[:, None]


def add_pending_tokens(pen: PenaltyTensors, prev_token_ids: jax.Array) -> PenaltyTensors:
    """Count each row's pending output token (known only on device): one more occurrence of a listed token, or
    a new entry in one extra column."""
    rows = pen.pending_row
    token = jnp.where(rows >= 0, prev_token_ids[jnp.maximum(rows, 0)], -1)
    match = (pen.token_ids == token[:, None]) & (token[:, None] >= 0)
    new_id = jnp.where(match.any(axis=1), -1, token)[:, None]
    return dataclasses.replace(
        pen, token_ids=jnp.concatenate([pen.token_ids, new_id], axis=1),
        output_counts=jnp.concatenate([pen.output_counts + match, (new_id >= 0).astype(jnp.float32)], axis=1))


def apply_penalties(logits: jax.Array, pen: PenaltyTensors, offset=0) -> jax.Array:
    """vLLM: repetition on tokens seen in prompt or output (positive logits divided, the others multiplied), then
    frequency * output count and presence * (output count > 0) subtracted. Touches only the U distinct tokens.
    `offset`: the first vocabulary id of these logits (a vocab-parallel shard edits the ids it holds)."""
    S, V = logits.shape
    ids = pen.token_ids - offset
    valid = (pen.token_ids >= 0) & (ids >= 0) & (ids < V)
    cur = jnp.take_along_axis(logits, jnp.where(valid, ids, 0), axis=1)
    rep = pen.repetition[:, None]
    cnt = pen.output_counts
    new = (jnp.where(cur > 0, cur / rep, cur * rep)
           - pen.frequency[:, None] * cnt - pen.presence[:, None] * (cnt > 0))
    rows = jnp.broadcast_to(jnp.arange(S)[:, None], ids.shape)
    # -1 padding would wrap to V-1 under negative indexing: send it out of range, where mode="drop" skips it.
    return logits.at[rows, jnp.where(valid, ids, V)].set(new, mode="drop")


def _suppress_stop_tokens(x, tensors: SamplingTensors, eos_token_ids, offset=0):
    """-inf at EOS / stop ids of rows under min_tokens: a scatter of S*(E+NS) entries, not an [S, V] mask."""
    S, V = x.shape
    parts = []
    if eos_token_ids:
        parts.append(jnp.where(tensors.suppress_eos[:, None], jnp.asarray(eos_token_ids, jnp.int32)[None, :], -1))
    if tensors.stop_ids.shape[1]:
        parts.append(tensors.stop_ids)
    if not parts:
        return x
    ids = jnp.concatenate(parts, axis=1)
    local = ids - offset
    ids = jnp.where((ids >= 0) & (local >= 0) & (local < V), local, V)
    rows = jnp.broadcast_to(jnp.arange(S)[:, None], ids.shape)
    return x.at[rows, ids].set(-jnp.inf, mode="drop")  # id V (= not suppressed) is dropped


# ---- blocked scans: one fused read of [S, V], then small [S, V/BLOCK] and [S, BLOCK] work ----
def _blocks(x):
    S, V = x.shape
    nb = -(-V // BLOCK)
    if nb * BLOCK != V:  # odd vocab sizes pay one padded copy
        x = jnp.pad(x, ((0, 0), (0, nb * BLOCK - V)), constant_values=-jnp.inf)
    return x.reshape(S, nb, BLOCK)


def _first_true(mask):
    n = mask.shape[-1]
    iota = jax.lax.broadcasted_iota(jnp.int32, mask.shape, mask.ndim - 1)
    return jnp.minimum(jnp.min(jnp.where(mask, iota, n), axis=-1), n - 1)


def _first_argmax(x, vocab: VocabShard = WHOLE_VOCAB):
    """(lowest index of the row max, row max), as jnp.argmax, via block maxima: XLA CPU's variadic argmax and
    a full-width where/min-index pass both cost ~10x a plain max. Vocab-parallel: the global max, then the
    lowest id among the shards that hold it (two all-reduces of [S])."""
    xb = _blocks(x)
    bmax = jnp.max(xb, axis=-1)
    m = jnp.max(bmax, axis=-1)
    b = _first_true(bmax == m[:, None])
    inner = jnp.take_along_axis(xb, b[:, None, None], axis=1)[:, 0]
    j = _first_true(inner == m[:, None])  # NaN rows match nothing -> clipped, harmless
    local = x.shape[1]
    idx = jnp.minimum(b * BLOCK + j, local - 1).astype(jnp.int32)
    if not vocab.axes:
        return idx, m
    top = vocab.pmax(m)
    idx = lax.pmin(jnp.where(m == top, idx + vocab.offset(local), jnp.iinfo(jnp.int32).max), vocab.axes)
    return jnp.minimum(idx, vocab.size(local) - 1).astype(jnp.int32), top


def _row_uniforms(tensors: SamplingTensors) -> jax.Array:
    """[S, 2] uniforms in [0, 1): row i's depend only on (its seed, its step)."""
    keys = jax.random.wrap_key_data(tensors.key_data, impl="threefry2x32")

    def one(key, step):
        return jax.random.uniform(jax.random.fold_in(key, step), (2,), jnp.float32)

    return jax.vmap(one)(keys, tensors.step)


def _inverse_cdf(x, m, inv_t, thr, u, vocab: VocabShard = WHOLE_VOCAB):
    """Draw i with probability w_i / sum(w), w = exp((x - m) / T) where x >= thr else 0: a block by its mass with
    u[:, 0], then a token in it with u[:, 1] (P = M_b/Z * w_i/M_b, each level float32-exact at its own scale).
    w is recomputed from x rather than stored, so the block sums fuse into one read of x. Clamping to the last
    non-empty block/token guards the float round-up of r * total. Vocab-parallel: the block masses of all shards
    are gathered (in vocabulary order, so the same block is drawn as on one device when a shard holds whole
    blocks), and the shard that owns the block picks the token."""
    def weights(xs, shape):
        return jnp.where(xs >= thr.reshape(shape), jnp.exp((xs - m.reshape(shape)) * inv_t.reshape(shape)), 0.0)

    def pick(w, r):  # first j with cumsum(w)_j > r * sum(w); w [S, n] >= 0
        c = jnp.cumsum(w, axis=-1)
        j = jnp.sum(c <= (r * c[:, -1])[:, None], axis=-1)
        iota = jax.lax.broadcasted_iota(jnp.int32, w.shape, 1)
        return jnp.minimum(j, jnp.max(jnp.where(w > 0, iota, 0), axis=-1)).astype(jnp.int32)

    xb = _blocks(x)
    b = pick(vocab.gather(jnp.sum(weights(xb, (-1, 1, 1)), axis=-1)), u[:, 0])
    if not vocab.axes:
        inner = jnp.take_along_axis(xb, b[:, None, None], axis=1)[:, 0]
        return b * BLOCK + pick(weights(inner, (-1, 1)), u[:, 1])
    per_shard = xb.shape[1]
    owner, local_b = b // per_shard, b % per_shard
    inner = jnp.take_along_axis(xb, local_b[:, None, None], axis=1)[:, 0]
    token = vocab.offset(x.shape[1]) + local_b * BLOCK + pick(weights(inner, (-1, 1)), u[:, 1])
    return vocab.psum(jnp.where(owner == lax.axis_index(vocab.axes), token, 0))


# ---- top_k / top_p thresholds ----
def _top_k_top_p_threshold(x, m, inv_t, tensors: SamplingTensors, K: int, vocab: VocabShard = WHOLE_VOCAB):
    """Per-row logit threshold for top_k, then top_p on the top_k-renormalised distribution; exact and
    tie-inclusive like vLLM's sort-based version: top_k keeps x >= the k-th largest; top_p keeps the tokens
    whose descending-order mass before them is < top_p (so at least the max)."""
    S, local = x.shape
    V = vocab.size(local)
    vals, _ = jax.lax.top_k(x, min(K, local))  # [S, K] descending
    if vocab.axes:  # the global top K lie among the shards' top K
        vals, _ = jax.lax.top_k(vocab.gather(vals), K)
    k, p = tensors.top_k, tensors.top_p
    exact = K >= V  # the candidates are the whole vocab

    t_k = jnp.where(k > 0, jnp.take_along_axis(vals, jnp.clip(k - 1, 0, K - 1)[:, None], axis=1)[:, 0], -jnp.inf)
    if not exact:
        far_k = k > K
        t_k = jax.lax.cond(jnp.any(far_k), lambda: jnp.where(far_k, _kth_largest(x, k, vocab), t_k), lambda: t_k)

    want_p = p < 1.0
    ce = jnp.cumsum(jnp.where(vals >= t_k[:, None], jnp.exp((vals - m[:, None]) * inv_t[:, None]), 0.0), axis=-1)
    z = ce[:, -1]  # total mass of the top_k set when it lies inside the candidates
    if not exact:
        # Otherwise (no top_k, or a tie at the k-th value that may run past the candidates) one exp pass.
        # (min, not vals[:, K-1]: XLA CPU rewrites a static slice of top_k into a full sort, ~4 s here.)
        full = want_p & ~((k > 0) & (jnp.min(vals, axis=-1) < t_k))
        z = jax.lax.cond(jnp.any(full), lambda: jnp.where(full, _mass_at_least(x, m, inv_t, t_k, vocab), z),
                         lambda: z)
    target = p * z
    j = jnp.sum(ce < target[:, None], axis=-1)  # first candidate whose inclusive mass reaches the target
    found = j < K
    t_p = jnp.take_along_axis(vals, jnp.minimum(j, K - 1)[:, None], axis=1)[:, 0]
    t_p = jnp.where(want_p & found, t_p, -jnp.inf)  # (exact and not found: float shortfall, keep all)
    if not exact:
        far_p = want_p & ~found  # the nucleus reaches past the candidates
        t_p = jax.lax.cond(jnp.any(far_p),
                           lambda: jnp.where(far_p, _nucleus_threshold(x, m, inv_t, t_k, target, vocab), t_p),
                           lambda: t_p)
    return jnp.maximum(t_k, t_p)


def _mass_at_least(x, m, inv_t, t, vocab: VocabShard = WHOLE_VOCAB):
    return vocab.sum(jnp.where(x >= t[:, None], jnp.exp((x - m[:, None]) * inv_t[:, None]), 0.0))


def _bisect_min_true(pred, num_rows: int):
    """Per row, the smallest uint32 t with pred(t) true (pred monotone, taken false at 0, true at 2^32-1).
    32 halvings of the uint32 range: exact, but each reads [S, V], hence only behind a lax.cond."""
    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = pred(mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    init = (jnp.zeros((num_rows,), jnp.uint32), jnp.full((num_rows,), 0xFFFFFFFF, jnp.uint32))
    return jax.lax.fori_loop(0, 32, body, init)[1]


def _kth_largest(x, k, vocab: VocabShard = WHOLE_VOCAB):
    """k-th largest value per row: the smallest key t with count(x > value(t)) < k is that value's key. keys
    are a monotone float32 -> uint32 map (negative floats reversed); the predicate compares floats, which XLA CPU
    vectorises better than uint32."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    keys = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))

    def pred(t):  # t clamped to [key(-inf), key(+inf)] so that it never decodes to a NaN
        t = jnp.clip(t, jnp.uint32(0x007FFFFF), jnp.uint32(0xFF800000))
        tf = jax.lax.bitcast_convert_type(jnp.where(t >> 31 == 1, t ^ jnp.uint32(0x80000000), ~t), jnp.float32)
        return vocab.sum(x > tf[:, None]) < k

    t = _bisect_min_true(pred, x.shape[0])
    return vocab.min(jnp.where(keys >= t[:, None], x, jnp.inf))


def _nucleus_threshold(x, m, inv_t, t_k, target, vocab: VocabShard = WHOLE_VOCAB):
    """The smallest weight w (within top_k) with mass(w' > w) < target, as a logit threshold. w >= 0, so its
    float bits are already monotone (and <= +inf's never decode to a NaN)."""
    w = jnp.where(x >= t_k[:, None], jnp.exp((x - m[:, None]) * inv_t[:, None]), 0.0)

    def pred(t):
        tf = jax.lax.bitcast_convert_type(jnp.minimum(t, jnp.uint32(0x7F800000)), jnp.float32)
        return vocab.sum(jnp.where(w > tf[:, None], w, 0.0)) < target

    t = _bisect_min_true(pred, x.shape[0])
    bits = jax.lax.bitcast_convert_type(w, jnp.uint32)
    return vocab.min(jnp.where(bits >= t[:, None], x, jnp.inf))
