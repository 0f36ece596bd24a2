"""The benchmark's workload arithmetic against hand-computed values."""
from benchmarks.workload import Request, Workload


def test_static_row_factor_counts_padding_rows_per_batch():
    lens = [1, 3, 2, 2, 5]
    workload = Workload(tuple(Request((7,), n) for n in lens), seed=0)
    # Batches of 2 in arrival order: [1, 3] -> 2 rows x 3 steps, [2, 2] -> 2 x 2, [5] -> 1 x 5; 13 useful rows.
    assert workload.static_row_factor(2) == (6 + 4 + 5) / 13
    assert workload.static_row_factor(5) == 5 * 5 / 13
    assert workload.static_row_factor(1) == 1.0


def test_stream_timing_arithmetic():
    import pytest

    from benchmarks.workload import StreamTiming, latency_summary, summarize_streams

    # Sent at 10.0; chunks at 10.5 (1 token), 10.7 (2 tokens: the client fell behind), 11.0 (1 token).
    t = StreamTiming(10.0, (10.5, 10.7, 11.0), (1, 2, 1))
    assert t.num_tokens == 4 and t.ttft == pytest.approx(0.5) and t.e2e == pytest.approx(1.0)
    assert t.itls == pytest.approx([0.2, 0.3])
    assert t.tpot == pytest.approx(0.5 / 3)
    s = latency_summary([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["p50"] == 2.5 and s["p90"] == pytest.approx(3.7)
    summary = summarize_streams([t, StreamTiming(0.0, (1.0,), (1,))])
    assert summary["ttft"]["mean"] == pytest.approx(0.75) and summary["itl"]["p50"] == pytest.approx(0.25)
    assert summary["tpot"]["mean"] == pytest.approx(0.5 / 3)  # the one-token stream has no TPOT
