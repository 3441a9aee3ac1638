"""Expert parallelism on 4 gloo ranks: equal to one process, balancing included; a failing rank
ends it."""

import time

import pytest
import torch

from kernels.moe import load_balancing_loss
from shared.check import assert_close
from shared.parallel.expert.run import (
    EPConfig,
    build_layer,
    gather_results,
    launch,
    make_batch,
    single_process,
)

WORLD = 4


def test_expert_parallel_equals_single_process_outputs_and_gradients():
    cfg = EPConfig(experts=8, k=2, tokens=20, seed=3)
    ranks = launch(cfg, world=WORLD, timeout=240)
    got, want = gather_results(ranks), single_process(cfg, WORLD)
    # The router gradient includes the balancing loss (weight 1): a per-rank loss would differ.
    for name in ("y", "dx", "router", "w_gate_up", "w_down", "aux"):
        assert_close(got[name], want[name], tol=1e-5, what=f"expert-parallel {name}")
    assert all(torch.equal(r["aux"], ranks[0]["aux"]) for r in ranks), "one global loss"
    # ... and the global loss is not the mean of the per-rank losses (so the check can fail).
    layer = build_layer(cfg)
    x, _ = make_batch(cfg, WORLD)
    per_rank = []
    for r in range(WORLD):
        with torch.no_grad():
            route = layer.router(x[r * cfg.tokens:(r + 1) * cfg.tokens])
        per_rank.append(cfg.aux_weight * load_balancing_loss(route.probs, route.indices,
                                                             cfg.experts))
    assert abs(float(sum(per_rank)) / WORLD - float(want["aux"])) > 1e-4
    # Rows each rank sent away: every assignment to an expert it does not own.
    routing = single_process_routing(cfg)
    for r, res in enumerate(ranks):
        mine = routing[r * cfg.tokens:(r + 1) * cfg.tokens] // (cfg.experts // WORLD)
        assert res["sent_rows"] == int((mine != r).sum())


def single_process_routing(cfg):
    x, _ = make_batch(cfg, WORLD)
    return build_layer(cfg).router(x).indices


def test_bias_router_steps_from_the_global_load_on_every_rank():
    cfg = EPConfig(experts=8, k=2, tokens=20, seed=5, router="bias")
    ranks = launch(cfg, world=WORLD, timeout=240)
    got, want = gather_results(ranks), single_process(cfg, WORLD)
    for name in ("y", "dx", "router", "w_gate_up", "w_down"):
        assert_close(got[name], want[name], tol=1e-5, what=f"expert-parallel {name}")
    assert want["bias"].abs().sum() > 0, "the step moved the bias"
    for r in ranks:
        assert torch.equal(r["bias"], want["bias"]), "every rank moves the global bias"
    # A rank stepping on its own load would have moved differently (so the check can fail).
    local = [torch.sign(r["local_load"] - r["local_load"].mean()) for r in ranks]
    assert any(not torch.equal(-0.01 * s, want["bias"]) for s in local)


def test_a_failing_rank_ends_the_run_with_its_error():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 fails on purpose"):
        launch(EPConfig(fail_rank=1), world=WORLD, timeout=120)
    assert time.monotonic() - start < 120
