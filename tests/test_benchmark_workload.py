"""The benchmark's workload arithmetic against hand-computed values."""
from benchmarks.workload import Request, Workload


def test_static_row_factor_counts_padding_rows_per_batch():
    lens = [1, 3, 2, 2, 5]
    workload = Workload(tuple(Request((7,), n) for n in lens), seed=0)
    # Batches of 2 in arrival order: [1, 3] -> 2 rows x 3 steps, [2, 2] -> 2 x 2, [5] -> 1 x 5; 13 useful rows.
    assert workload.static_row_factor(2) == (6 + 4 + 5) / 13
    assert workload.static_row_factor(5) == 5 * 5 / 13
    assert workload.static_row_factor(1) == 1.0
