"""The α-β model, busbw, the link predictions and the DDP bucket plan (no ranks needed)."""

import math

import pytest

from shared.parallel.collectives import cost, overlap


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 13, 16])
def test_paths_match_the_algorithms(n):
    m, b = cost.path("ring", n, 1000.0)
    assert m == 2 * (n - 1) and math.isclose(b, 2 * (n - 1) / n * 1000)
    m, b = cost.path("halving_doubling", n, 1000.0)
    p = 1 << (n.bit_length() - 1)
    assert m == 2 * math.log2(p) + 2 * (n != p)
    assert cost.tree_messages(n) >= 2 * math.ceil(math.log2(n))  # down and up the depth


def test_tree_messages_by_hand():
    # btree(4): 0 <- 2 <- {1, 3}. Up: 2 takes 1 then 3 (2 messages), then 2 -> 0 (3).
    # Down: 0 -> 2 (1), 2 -> 1 (2), 2 -> 3 (3). Six, like the ring's 2(n-1): no crossover.
    assert cost.tree_messages(4) == 6
    assert cost.crossover("tree", "ring", 4, 1e-5, 1e-9) is None
    assert cost.crossover("tree", "ring", 8, 1e-5, 1e-9) > 0


def test_fit_recovers_alpha_and_beta():
    alpha, beta = 30e-6, 1 / 2e9
    pts = [(a, n, s, cost.path(a, n, s)[0] * alpha + cost.path(a, n, s)[1] * beta)
           for a in ("ring", "tree") for n in (2, 4) for s in cost.log_sizes(4, 2**22)]
    f = cost.fit(pts)
    assert math.isclose(f.alpha_s, alpha, rel_tol=1e-6)
    assert math.isclose(f.beta_s_per_b, beta, rel_tol=1e-6) and f.rel_rms < 1e-9
    s = cost.crossover("tree", "ring", 16, alpha, beta)
    assert math.isclose(f.predict("tree", 16, s), f.predict("ring", 16, s), rel_tol=1e-9)
    with pytest.raises(ValueError, match="points"):
        cost.fit(pts[:1])


def test_busbw_factors_and_errors():
    assert cost.busbw("all_reduce", 8, 1e9, 1.0) == pytest.approx(1e9 * 2 * 7 / 8)
    assert cost.busbw("all_gather", 4, 1e9, 1.0) == pytest.approx(0.75e9)
    assert cost.busbw("broadcast", 4, 1e9, 2.0) == pytest.approx(0.5e9)
    with pytest.raises(ValueError, match="op"):
        cost.busbw("gather", 4, 1.0, 1.0)
    with pytest.raises(ValueError, match="algo"):
        cost.path("mesh", 4, 1.0)


def test_link_predictions_are_bandwidth_bound_when_large():
    t = cost.link_time("ring", 8, 2**30, "H100 NVLink4")
    bw_only = 2 * 7 / 8 * 2**30 / cost.LINKS["H100 NVLink4"].bandwidth
    assert bw_only < t < 1.01 * bw_only


def test_bucket_plan_last_layer_first():
    assert overlap.bucket_plan([4, 4, 4, 4, 4], 8) == [[4, 3], [2, 1], [0]]
    assert overlap.bucket_plan([10, 1, 1], 5) == [[2, 1, 0]]
    with pytest.raises(ValueError, match="bucket_elems"):
        overlap.bucket_plan([1], 0)


def test_overlap_prediction():
    # 4 layers of 1 s, buckets of 2 layers, each all-reduce 1.5 s: the first bucket leaves at 2
    # and ends at 3.5, the second leaves at 4 and ends at 5.5; without overlap 4 + 3 = 7.
    p = overlap.predict(1.0, [[3, 2], [1, 0]], [1.5, 1.5])
    assert p == {"no overlap": 7.0, "overlap": 5.5}
