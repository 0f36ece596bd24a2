"""The sampler against independent numpy oracles (vLLM's sort-based semantics, float64)."""
import jax
import numpy as np
import pytest
from scipy import stats

from jaxinfer.sampler import (RowInfo, SamplingFlags, add_pending_tokens, apply_penalties, make_sampling_tensors,
                              row_seed, sample_jit)
from jaxinfer.sequence import PENDING_TOKEN
from jaxinfer.sampling_params import SamplingParams

EOS = 2


def run(logits, rows, num_rows_padded=None, eos=(EOS,)):
    logits = np.asarray(logits, np.float32)
    S = num_rows_padded or logits.shape[0]
    if logits.shape[0] < S:
        logits = np.concatenate([logits, np.zeros((S - logits.shape[0], logits.shape[1]), np.float32)])
    tensors, flags = make_sampling_tensors(rows, S, logits.shape[1])
    out = sample_jit(logits, tensors, flags, eos_token_ids=eos)
    return jax.tree.map(np.asarray, out), flags


def rows_for(params, n, seed0=0, step=0, **kw):
    return [RowInfo(params, seed=seed0 + i, step=step, **kw) for i in range(n)]


# ---- numpy oracles ----
def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def np_keep(logits, p: SamplingParams):
    """vLLM order: temperature, top_k, top_p (on the top_k-renormalised distribution), min_p."""
    x = np.asarray(logits, np.float64) / p.temperature
    keep = np.ones(x.shape, bool)
    if p.top_k > 0:
        keep &= x >= np.sort(x)[::-1][p.top_k - 1]
    if p.top_p < 1:
        probs = np_softmax(np.where(keep, x, -np.inf))
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        keep_p = np.zeros_like(keep)
        keep_p[order[before < p.top_p]] = True
        keep &= keep_p
    if p.min_p > 0:
        probs = np_softmax(np.where(keep, x, -np.inf))
        keep &= probs >= p.min_p * probs.max()
    return keep, np_softmax(np.where(keep, x, -np.inf))


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def np_penalise(logits, prompt, output, p: SamplingParams):
    x = np.array(logits, np.float64)
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    counts = np.bincount(np.asarray(output, int), minlength=x.size)
    return x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)


# ---- tests ----
def test_greedy_is_numpy_argmax_first_index():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 300)).astype(np.float32)
    logits[1, [7, 100]] = logits[1].max() + 1  # tie: the lowest index wins, like np.argmax
    rows = rows_for(SamplingParams(temperature=0), 6)
    out, flags = run(logits, rows, num_rows_padded=8)
    assert flags.all_greedy
    np.testing.assert_array_equal(out.token_ids[:6], np.argmax(logits, -1))
    # Mixed with random rows: the greedy rows are unchanged.
    mixed = [rows[i] if i % 2 == 0 else RowInfo(SamplingParams(temperature=1.0, top_p=0.5), seed=i, step=0)
             for i in range(6)]
    out2, flags2 = run(logits, mixed, num_rows_padded=8)
    assert not flags2.all_greedy
    np.testing.assert_array_equal(out2.token_ids[[0, 2, 4]], np.argmax(logits, -1)[[0, 2, 4]])


FILTER_CASES = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=0.9, min_p=0.15),
    SamplingParams(temperature=1.5, top_k=12, top_p=0.7, min_p=0.05),
]


@pytest.mark.parametrize("params", FILTER_CASES, ids=lambda p: f"T{p.temperature}k{p.top_k}p{p.top_p}m{p.min_p}")
def test_empirical_distribution_matches_filtered_softmax(params):
    V, S = 24, 1024
    logits = np.random.default_rng(1).standard_normal(V).astype(np.float32) * 1.5
    keep, probs = np_keep(logits, params)
    counts = np.zeros(V)
    for step in range(3):  # 3072 draws: every (seed, step) pair is an independent key
        out, _ = run(np.tile(logits, (S, 1)), rows_for(params, S, seed0=1000, step=step))
        assert keep[out.token_ids].all(), "sampled a token outside the allowed set"
        counts += np.bincount(out.token_ids, minlength=V)
    n = counts.sum()
    chi = stats.chisquare(counts[keep], probs[keep] * n)
    assert chi.pvalue > 1e-3, (chi, counts[keep], probs[keep] * n)


def test_sampled_ids_inside_allowed_set_mixed_rows_and_fallbacks():
    """Rows with different knobs in one batch; V > candidate widths, flat logits, so top_k > 1024 and nuclei
    wider than the candidates take the bisection paths."""
    rng = np.random.default_rng(2)
    V = 4096
    params = [SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=0.5, top_k=2000),
              SamplingParams(temperature=2.0, top_k=1500, top_p=0.5), SamplingParams(temperature=1.0, top_k=3),
              SamplingParams(temperature=0.8, top_p=0.3, min_p=0.5), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0, min_p=0.9), SamplingParams(temperature=1.0, top_k=40, top_p=0.95)]
    for trial in range(3):
        logits = (rng.standard_normal((len(params), V)) * (0.3 if trial == 0 else 3.0)).astype(np.float32)
        rows = [RowInfo(p, seed=trial * 100 + i, step=trial) for i, p in enumerate(params)]
        out, flags = run(logits, rows)
        assert flags.num_candidates == 1024
        for i, p in enumerate(params):
            if p.is_greedy:
                assert out.token_ids[i] == np.argmax(logits[i])
                continue
            keep, _ = np_keep(logits[i], p)
            assert keep[out.token_ids[i]], (trial, i, p)


def test_filter_threshold_matches_numpy_keep_set_exactly():
    """Every allowed token is reachable: sample many times from a 2-token-wide window to see both ends."""
    from jaxinfer import sampler as sm
    rng = np.random.default_rng(3)
    V = 2048
    params = [SamplingParams(top_p=0.9), SamplingParams(top_k=1100), SamplingParams(top_k=300, top_p=0.6),
              SamplingParams(top_p=0.2, min_p=0.3), SamplingParams(top_k=7)]
    logits = (rng.standard_normal((len(params), V)) * 0.7).astype(np.float32)
    tensors, flags = make_sampling_tensors([RowInfo(p, 0, 0) for p in params], len(params), V)
    x = jax.numpy.asarray(logits)
    m = x.max(-1)
    thr = sm._top_k_top_p_threshold(x, m, 1.0 / tensors.temperature, tensors, flags.num_candidates)
    with np.errstate(divide="ignore"):  # log(0) = -inf: min_p off
        thr = np.maximum(np.asarray(thr), np.asarray(m) + tensors.temperature * np.log(tensors.min_p))
    for i, p in enumerate(params):
        keep, _ = np_keep(logits[i], p)
        np.testing.assert_array_equal(logits[i] >= thr[i], keep, err_msg=str(p))


def test_penalties_match_numpy():
    rng = np.random.default_rng(4)
    V = 64
    logits = rng.standard_normal((3, V)).astype(np.float32) * 2
    params = [SamplingParams(temperature=0, repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.3),
              SamplingParams(temperature=0, repetition_penalty=0.6, frequency_penalty=-1.0),
              SamplingParams(temperature=0)]  # no penalties: untouched, needs no history
    prompts = [[1, 5, 5, 9, 63], [0, 2, 4], None]
    outputs = [[5, 7, 7, 7, 30], [4, 4, 11], None]
    rows = [RowInfo(p, seed=0, step=3, prompt_token_ids=pr, output_token_ids=o)
            for p, pr, o in zip(params, prompts, outputs)]
    tensors, flags = make_sampling_tensors(rows, 4, V)
    assert flags.any_penalties and tensors.penalties.token_ids.shape == (4, 16)
    got = np.asarray(apply_penalties(jax.numpy.asarray(np.vstack([logits, logits[:1]])), tensors.penalties))
    for i in range(2):
        np.testing.assert_allclose(got[i], np_penalise(logits[i], prompts[i], outputs[i], params[i]), rtol=1e-6)
    np.testing.assert_array_equal(got[2:3], logits[2:3])
    # End to end: greedy picks the argmax of the penalised logits.
    boosted = logits.copy()
    boosted[0, 7] = 50.0  # the most repeated output token; 50/1.7 - 0.9 - 0.5 still wins
    out, _ = run(boosted, rows, num_rows_padded=4)
    for i in range(2):
        assert out.token_ids[i] == np.argmax(np_penalise(boosted[i], prompts[i], outputs[i], params[i]))
    with pytest.raises(ValueError, match="history"):
        make_sampling_tensors([RowInfo(params[0], seed=0, step=0)], 1, V)


def test_pending_output_token_counts_like_a_known_one():
    """Async scheduling: a row's last output token is still on device (PENDING_TOKEN on the host, its id in the
    previous step's sampled ids). Penalties must treat it exactly as if it were known: as one more occurrence
    of a token already in the history (row 0) or as a new token (row 1)."""
    rng = np.random.default_rng(5)
    V = 64
    logits = jax.numpy.asarray(rng.standard_normal((3, V)).astype(np.float32))
    p = SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=0.4, frequency_penalty=0.7)
    prompts, outputs, pending = [[1, 5], [3, 4], [8]], [[5, 7], [9], [2]], [7, 40, None]
    prev_token_ids = jax.numpy.asarray([0, pending[0], 0, pending[1]], jax.numpy.int32)  # rows 1 and 3 hold them
    known = [RowInfo(p, seed=0, step=3, prompt_token_ids=pr, output_token_ids=o + ([t] if t is not None else []))
             for pr, o, t in zip(prompts, outputs, pending)]
    in_flight = [RowInfo(p, seed=0, step=3, prompt_token_ids=pr, output_token_ids=o + [PENDING_TOKEN],
                         pending_row=row) for pr, o, row in zip(prompts[:2], outputs[:2], (1, 3))] + known[2:]
    want = apply_penalties(logits, make_sampling_tensors(known, 3, V)[0].penalties)
    pen = add_pending_tokens(make_sampling_tensors(in_flight, 3, V)[0].penalties, prev_token_ids)
    np.testing.assert_array_equal(np.asarray(apply_penalties(logits, pen)), np.asarray(want))


def test_no_penalty_history_crosses_when_off():
    tensors, flags = make_sampling_tensors(rows_for(SamplingParams(top_p=0.5), 3), 4, 100)
    assert tensors.penalties is None and not flags.any_penalties
    assert all(leaf.shape[0] == 4 for leaf in jax.tree.leaves(tensors))


def test_min_tokens_suppresses_eos_and_stop_ids():
    V = 32
    logits = np.zeros((4, V), np.float32)
    logits[:, EOS] = 10.0
    logits[:, 9] = 9.0
    logits[:, 3] = 8.0
    greedy = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[9])
    ignore = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[9], ignore_eos=True)
    rows = [RowInfo(greedy, 0, step=0), RowInfo(greedy, 0, step=3), RowInfo(ignore, 0, step=1),
            RowInfo(SamplingParams(temperature=0), 0, step=0)]
    out, flags = run(logits, rows)
    assert flags.any_min_tokens
    assert list(out.token_ids) == [3, EOS, EOS, EOS]
    # Random rows under min_tokens never draw EOS even when it dominates.
    logits = np.zeros((256, V), np.float32)
    logits[:, EOS] = 3.0
    out, _ = run(logits, rows_for(SamplingParams(temperature=1.0, min_tokens=5), 256, step=4))
    assert EOS not in out.token_ids
    out, _ = run(logits, rows_for(SamplingParams(temperature=1.0, min_tokens=5), 256, step=5))
    assert (out.token_ids == EOS).mean() > 0.2


def test_logprobs_are_raw_log_softmax_and_top_ids():
    rng = np.random.default_rng(5)
    V = 200
    logits = rng.standard_normal((5, V)).astype(np.float32) * 3
    params = [SamplingParams(temperature=0.7, logprobs=3, repetition_penalty=1.3, top_k=20),
              SamplingParams(temperature=0, logprobs=0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=1.0, top_p=0.5, logprobs=1), SamplingParams(temperature=0, logprobs=5)]
    rows = [RowInfo(p, seed=i, step=0, prompt_token_ids=[1, 2, 3], output_token_ids=[4]) for i, p in
            enumerate(params)]
    out, flags = run(logits, rows, num_rows_padded=8)
    assert flags.num_logprobs == 5 and out.top_ids.shape == (8, 5) and out.top_logprobs.shape == (8, 5)
    ref = np_log_softmax(logits)
    np.testing.assert_allclose(out.logprob[:5], ref[np.arange(5), out.token_ids[:5]], atol=1e-5)
    np.testing.assert_array_equal(out.top_ids[:5], np.argsort(-ref, axis=-1, kind="stable")[:, :5])
    np.testing.assert_allclose(out.top_logprobs[:5], np.sort(ref, -1)[:, ::-1][:, :5], atol=1e-5)
    out, flags = run(logits[:2], rows_for(SamplingParams(temperature=0, logprobs=0), 2))
    assert flags == SamplingFlags(all_greedy=True, num_logprobs=0) and out.top_ids.shape == (2, 0)
    np.testing.assert_allclose(out.logprob, ref[np.arange(2), np.argmax(logits[:2], -1)], atol=1e-5)
    out, flags = run(logits[:2], rows_for(SamplingParams(temperature=0), 2))
    assert flags.num_logprobs == -1 and out.top_logprobs.shape == (2, 0) and not out.logprob.any()


def test_fixed_seed_is_batch_invariant_and_reproducible():
    rng = np.random.default_rng(6)
    V = 1500
    row_logits = rng.standard_normal(V).astype(np.float32) * 2
    for p in [SamplingParams(temperature=0.9, seed=123), SamplingParams(top_p=0.9, top_k=1200, min_p=0.01, seed=7)]:
        for step in range(2):
            seed = row_seed(p, request_seed=999)
            assert seed == p.seed
            alone, _ = run(row_logits[None], [RowInfo(p, seed, step)], num_rows_padded=2)
            again, _ = run(row_logits[None], [RowInfo(p, seed, step)], num_rows_padded=2)
            assert alone.token_ids[0] == again.token_ids[0]
            # Same row at index 5 of 16, among random rows with other knobs (other flags / compiled variant).
            others = rng.standard_normal((16, V)).astype(np.float32) * 3
            others[5] = row_logits
            kinds = [SamplingParams(temperature=0.5, top_p=0.3), SamplingParams(temperature=0, logprobs=4),
                     SamplingParams(repetition_penalty=1.5, top_k=3), SamplingParams(min_tokens=4, top_k=1100)]
            rows = [RowInfo(kinds[i % 4], seed=int(rng.integers(1 << 40)), step=i, prompt_token_ids=[1],
                            output_token_ids=[2, 3]) for i in range(14)]
            rows.insert(5, RowInfo(p, seed, step))
            mixed, _ = run(others, rows, num_rows_padded=16)
            assert mixed.token_ids[5] == alone.token_ids[0], (p, step)


def test_seeds_and_steps_give_different_draws():
    logits = np.zeros((64, 1000), np.float32)
    out0, _ = run(logits, rows_for(SamplingParams(), 64, seed0=0, step=0))
    out1, _ = run(logits, rows_for(SamplingParams(), 64, seed0=0, step=1))
    assert len(set(out0.token_ids)) > 50 and (out0.token_ids != out1.token_ids).mean() > 0.9
    # Unseeded rows: seed from the request-level seed; n > 1 siblings get distinct seeds.
    p = SamplingParams()
    assert row_seed(p, 5, 0) != row_seed(p, 5, 1) and row_seed(p, 2**64 - 1, 1) == 0
    assert row_seed(SamplingParams(seed=3), 5, 1) == 4


def test_key_is_jax_random_key_of_seed():
    seeds = (0, 1, 2**31 - 1, 2**40 + 3)
    tensors, _ = make_sampling_tensors([RowInfo(SamplingParams(), seed=s, step=0) for s in seeds], 4, 10)
    for i, s in enumerate(seeds[:3]):  # jax.random.key truncates seeds to 32 bits without x64
        ref = np.asarray(jax.random.key_data(jax.random.key(s, impl="threefry2x32")))
        np.testing.assert_array_equal(tensors.key_data[i], ref)
    np.testing.assert_array_equal(tensors.key_data[3], [2**8, 3])  # all 64 bits kept: [hi, lo]


def test_padded_rows_are_harmless():
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((3, 300)).astype(np.float32)
    rows = [RowInfo(SamplingParams(top_p=0.8, seed=1), 1, 0), RowInfo(SamplingParams(temperature=0), 2, 0),
            RowInfo(SamplingParams(top_k=4, logprobs=2), 3, 0)]
    ref, _ = run(logits, rows, num_rows_padded=13)  # zero padding
    garbage = np.vstack([logits, np.full((5, 300), np.nan, np.float32), np.full((5, 300), 1e30, np.float32)])
    out, _ = run(garbage, rows, num_rows_padded=13)
    np.testing.assert_array_equal(out.token_ids[:3], ref.token_ids[:3])
    np.testing.assert_array_equal(out.logprob[:3], ref.logprob[:3])
    np.testing.assert_array_equal(out.top_ids[:3], ref.top_ids[:3])
    assert ((out.token_ids >= 0) & (out.token_ids < 300)).all()


def test_flags_are_bucketed():
    V = 49152
    mk = lambda ps: make_sampling_tensors([RowInfo(p, 0, 0) for p in ps], 8, V)[1]  # noqa: E731
    assert mk([SamplingParams(temperature=0, top_k=5)]) == SamplingFlags()
    assert mk([SamplingParams(top_k=50)]).num_candidates == 64
    assert mk([SamplingParams(top_k=100), SamplingParams(top_p=0.9)]).num_candidates == 256
    assert mk([SamplingParams(top_k=9000)]).num_candidates == 1024  # beyond: bisection
    assert mk([SamplingParams(top_k=V)]).num_candidates == 0  # top_k >= V is off
    assert mk([SamplingParams(logprobs=1)]).num_logprobs == 5
    assert mk([SamplingParams(logprobs=7)]).num_logprobs == 20
    assert make_sampling_tensors([RowInfo(SamplingParams(top_p=0.5), 0, 0)], 2, 30)[1].num_candidates == 30


def test_bisection_kth_largest_handles_negatives_inf_and_ties():
    from jaxinfer import sampler as sm
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 3000)).astype(np.float32) * 5
    x[1, :100] = -np.inf
    x[2, 10:20] = 7.0  # ties
    x[3] = np.round(x[3])  # many ties, negative and positive
    k = np.array([1, 2950, 1500, 777], np.int32)
    got = np.asarray(sm._kth_largest(jax.numpy.asarray(x), jax.numpy.asarray(k)))
    np.testing.assert_array_equal(got, [np.sort(x[i])[::-1][k[i] - 1] for i in range(4)])
