"""The decode step's task graph, its validator, the worker schedule and the simulator: plain
data, checked before anything runs (shared/megakernel)."""

import copy
import json

import pytest

from shared.megakernel import simulate as sim
from shared.megakernel.graph import build_decode_graph, operators
from shared.megakernel.schedule import assign
from shared.megakernel.validate import GraphError, check_schedule, validate
from shared.models.llama import LlamaConfig

TINY = LlamaConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                   max_seq_len=80)


@pytest.fixture(params=[1, 3])
def graph(request):
    return build_decode_graph(TINY, request.param, tile=32)


def _find(g, op, layer=0):
    return next(t for t in g["tasks"] if t["op"] == op and t["layer"] == layer)


def test_graph_is_json_and_valid(graph):
    assert json.loads(json.dumps(graph)) == graph
    order = validate(graph)
    assert sorted(order) == list(range(len(graph["tasks"])))
    pos = {t: i for i, t in enumerate(order)}
    for t in graph["tasks"]:          # the order respects every wait
        for e in t["waits"]:
            for p in graph["tasks"]:
                if e in p["triggers"]:
                    assert pos[p["id"]] < pos[t["id"]]


def test_graph_counts_tiles_and_ops(graph):
    B, c = graph["batch"], TINY
    per_layer = {"rmsnorm": 2, "rope": B * c.n_kv_heads, "attention": B * c.n_kv_heads,
                 "add": 2 * 2, "swiglu": 3}   # 64 / 32 = 2 tiles per residual; 96 / 32 = 3
    for op, n in per_layer.items():
        assert sum(t["op"] == op and t["layer"] == 0 for t in graph["tasks"]) == n, op
    # ragged lm_head: vocab 100 in tiles of 32 -> 4 tiles, the last 4 wide
    head = [t for t in graph["tasks"] if t["op"] == "matmul" and t["layer"] == c.n_layers]
    assert [t["args"]["width"] for t in head] == [32, 32, 32, 4]
    # operators: embed, 10 per layer, final norm, lm_head, argmax
    assert len(operators(graph)) == 1 + 10 * c.n_layers + 3


def test_residual_tile_waits_only_for_its_own_tile(graph):
    adds = [t for t in graph["tasks"] if t["op"] == "add" and t["layer"] == 0][:2]
    o_tiles = [t for t in graph["tasks"] if t["op"] == "matmul" and t["writes"][0][0] == "o"]
    for add, o in zip(adds, o_tiles, strict=False):
        assert add["waits"] == o["triggers"]
    assert adds[0]["waits"] != adds[1]["waits"]


def test_missing_trigger_is_rejected():
    g = build_decode_graph(TINY, 2, tile=32)
    bad = copy.deepcopy(g)
    qkv = next(t for t in bad["tasks"] if t["op"] == "matmul")
    qkv["triggers"] = [_find(bad, "rope")["triggers"][0]]   # its event now fires too rarely
    with pytest.raises(GraphError, match="missing trigger"):
        validate(bad)
    bad = copy.deepcopy(g)
    bad["events"][_find(bad, "rmsnorm")["triggers"][0]]["need"] += 1   # awaits a 2nd norm
    with pytest.raises(GraphError, match="missing trigger"):
        validate(bad)


def test_cycle_is_rejected_with_its_tasks():
    g = build_decode_graph(TINY, 1, tile=32)
    embed = _find(g, "embed", -1)
    embed["waits"] = [_find(g, "rmsnorm")["triggers"][0]]    # embed now waits on the norm
    with pytest.raises(GraphError, match="cycle"):
        validate(g)


def test_dependencies_must_imply_the_data_flow():
    g = build_decode_graph(TINY, 2, tile=32)
    attn = _find(g, "attention")
    attn["waits"] = list(_find(g, "rmsnorm")["triggers"])   # skips its RoPE task: counts stay
    g["events"][_find(g, "rope")["triggers"][0]]["need"] = 1  # consistent, the flow does not
    with pytest.raises(GraphError, match="reads the write to"):
        validate(g)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="batch"):
        build_decode_graph(TINY, 0)
    with pytest.raises(ValueError, match="tile"):
        build_decode_graph(TINY, 1, tile=-4)
    with pytest.raises(TypeError, match="config"):
        build_decode_graph({"dim": 64}, 1)
    with pytest.raises(ValueError, match="workers"):
        assign(build_decode_graph(TINY, 1), 0)


def test_round_robin_schedule_never_deadlocks_and_a_bad_one_is_caught(graph):
    for workers in (1, 2, 7):
        queues = assign(graph, workers)
        assert sum(map(len, queues)) == len(graph["tasks"])
    order = validate(graph)
    with pytest.raises(GraphError, match="deadlocks"):
        check_schedule(graph, [order[::-1]])          # consumers queued before producers
    with pytest.raises(GraphError, match="each of the"):
        check_schedule(graph, [order[:-1]])


def test_simulator_bounds_and_ablations():
    g = build_decode_graph(TINY, 2, tile=32, seq_len=64)
    gpu = sim.GPUModel()
    times = sim.task_seconds(g, gpu)
    # lower bounds: the whole step cannot beat its busiest op on all SMs, nor the one launch
    serial = sum(times)
    per_op, per_op0 = sim.per_operator(g, gpu), sim.per_operator(g, sim.GPUModel(launch_s=0))
    mega = sim.persistent(g, gpu)
    assert per_op.launches == len(operators(g)) and mega.launches == 1
    assert per_op.total_s == pytest.approx(per_op0.total_s + per_op.launches * gpu.launch_s)
    assert mega.total_s >= serial / gpu.sms + gpu.launch_s
    assert mega.total_s < per_op.total_s
    for run in (per_op, mega):
        assert sorted(t for _, t, _, _ in run.spans) == list(range(len(g["tasks"])))
        assert 0 < run.busy_fraction(gpu.sms) <= 1
        by_sm = {}
        for sm, _, s, e in run.spans:                 # an SM runs one task at a time
            by_sm.setdefault(sm, []).append((s, e))
        for spans in by_sm.values():
            spans.sort()
            assert all(a[1] <= b[0] + 1e-15 for a, b in zip(spans, spans[1:], strict=False))
    start = {t: s for _, t, s, _ in mega.spans}       # and no task starts before its inputs
    end = {t: e for _, t, _, e in mega.spans}
    for t in g["tasks"]:
        for e in t["waits"]:
            for p in g["tasks"]:
                if e in p["triggers"]:
                    assert start[t["id"]] >= end[p["id"]] + gpu.event_s - 1e-15


def test_predictions_and_counted_eager_kernels():
    import torch

    from shared.benchmarks import megakernel as mk
    from shared.models.llama import Llama

    p = mk.predicted(2, 64, config=TINY)
    assert p["launches"] == 1 + 10 * TINY.n_layers + 3
    assert p["per_op_ms"] > p["per_op_no_launch_ms"] > 0 and p["persistent_ms"] > 0
    assert p["speedup"] == pytest.approx(p["launch_only_speedup"] * p["overlap_only_speedup"])
    torch.manual_seed(0)
    eager = mk.eager_kernels_per_step(Llama(TINY).eval())
    # torch eager runs at least one kernel per operator of the graph (often several)
    assert eager >= len(operators(build_decode_graph(TINY, 1))), eager
