"""Expert parallelism on 4 gloo ranks: equal to one process; a failing rank ends it."""

import time

import pytest

from shared.check import assert_close
from shared.parallel.expert.run import EPConfig, gather_results, launch, single_process

WORLD = 4


def test_expert_parallel_equals_single_process_outputs_and_gradients():
    cfg = EPConfig(experts=8, k=2, tokens=20, seed=3)
    ranks = launch(cfg, world=WORLD, timeout=240)
    got, want = gather_results(ranks), single_process(cfg, WORLD)
    for name in ("y", "dx", "router", "w_gate_up", "w_down"):
        assert_close(got[name], want[name], tol=1e-5, what=f"expert-parallel {name}")
    # Rows each rank sent away: every assignment to an expert it does not own.
    routing = single_process_routing(cfg)
    for r, res in enumerate(ranks):
        mine = routing[r * cfg.tokens:(r + 1) * cfg.tokens] // (cfg.experts // WORLD)
        assert res["sent_rows"] == int((mine != r).sum())


def single_process_routing(cfg):
    from shared.parallel.expert.run import build_layer, make_batch

    x, _ = make_batch(cfg, WORLD)
    return build_layer(cfg).router(x).indices


def test_a_failing_rank_ends_the_run_with_its_error():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 fails on purpose"):
        launch(EPConfig(fail_rank=1), world=WORLD, timeout=120)
    assert time.monotonic() - start < 120
