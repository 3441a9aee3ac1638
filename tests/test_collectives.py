"""Collectives from send/recv against gloo's and a float64 sum, on 2, 3 and 4 gloo ranks:
sizes that do not divide the world size, one element, a non-contiguous tensor, fp32 and fp16;
the bytes each rank sends, counted through comm_log; failures end the run with their error."""

import time

import pytest
import torch
import torch.distributed as dist

from shared.parallel import collectives, comm_log, launch
from shared.parallel.collectives import overlap
from shared.parallel.collectives.tree import btree, children, double_btree

ALL_REDUCE = ["ring_all_reduce", "tree_all_reduce", "double_tree_all_reduce",
              "halving_doubling_all_reduce"]
SHAPES = [(1,), (7,), (1003,), (6, 5)]
DTYPES = [torch.float32, torch.float16]
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11}


def _ring_sent(numel: int, n: int, rank: int, itemsize: int) -> tuple[int, int]:
    """Rank i sends every chunk but its own (reduce-scatter) and every chunk but i+1's
    (all-gather): 2S - c_i - c_{i+1} elements, in 2(n-1) messages."""
    c = [len(x) for x in torch.arange(numel).tensor_split(n)]
    return (2 * numel - c[rank] - c[(rank + 1) % n]) * itemsize, 2 * (n - 1)


def _tree_sent(numel, n, rank, itemsize, parents=None):
    """Up: my sum to my parent; down: the result to each child (the whole tensor each time)."""
    sent = messages = 0
    halves = [numel] if parents is None else [len(h) for h in torch.arange(numel).tensor_split(2)]
    for size, parent in zip(halves, parents or [btree(n)], strict=True):
        if size:
            k, up = len(children(parent, rank)), parent[rank] >= 0
            sent += size * itemsize * (k + up)
            messages += 2 * (k + up)
    return sent, messages


def _hd_sent(numel, n, rank, itemsize):
    """p = 2^k survivors send 2(p-1)/p of the tensor in 2k messages (a range of odd length
    halves unevenly: up to one element more per step); a folded pair adds one full tensor each
    way. Returned as the exact count when the halves are even, else checked within k elements."""
    p = 1 << (n.bit_length() - 1)
    k, folded = p.bit_length() - 1, rank < 2 * (n - p)
    if folded and rank % 2 == 0:
        return numel * itemsize, 2
    return (2 * (p - 1) * numel / p + numel * folded) * itemsize, 2 * k + 2 * folded


SENT = {"ring_all_reduce": _ring_sent, "tree_all_reduce": _tree_sent,
        "double_tree_all_reduce": lambda *a: _tree_sent(*a, parents=list(double_btree(a[1]))),
        "halving_doubling_all_reduce": _hd_sent}


def _inputs(rank: int, shape, dtype, case: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * case + rank)  # fresh per rank and case
    return torch.randn(shape, generator=g).to(dtype)


def _cases():
    return [(s, d, ncontig) for s in SHAPES for d in DTYPES for ncontig in (False, True)
            if not ncontig or len(s) == 2]


def _all_reduce_worker():
    rank = dist.get_rank()
    out = []
    for case, (shape, dtype, ncontig) in enumerate(_cases()):
        x = _inputs(rank, shape, dtype, case)
        row = {"x": x, "gloo": x.clone()}
        dist.all_reduce(row["gloo"])
        for name in ALL_REDUCE:
            t = x.clone().t() if ncontig else x.clone()  # .t(): a strided view, reduced as is
            with comm_log.recording() as log:
                ret = getattr(collectives, name)(t)
            assert ret is t
            row[name] = (t.t() if ncontig else t).clone()
            row[name + ":sent"] = log.bytes()
            row[name + ":messages"] = log.count()
        out.append(row)
    return out


def _bound(xs: torch.Tensor, n: int) -> torch.Tensor:
    """|sum error| after n-1 roundings, each at most u x |partial sum| <= u x sum|x_i|, plus one
    for converting the exact sum back to the dtype."""
    return n * UNIT_ROUNDOFF[xs.dtype] * xs.double().abs().sum(0) * 1.01


def _a2a_worker():
    rank, n = dist.get_rank(), dist.get_world_size()
    # chunk j -> rank j holds rank + j + 1 elements: uneven, which gloo's all_to_all refuses
    inputs = [_inputs(rank, (rank + j + 1,), torch.float16, j) for j in range(n)]
    outputs = [torch.full((j + rank + 1,), float("nan"), dtype=torch.float16) for j in range(n)]
    with comm_log.recording() as log:
        collectives.all_to_all(outputs, inputs)
    return {"inputs": inputs, "outputs": outputs, "sent": log.bytes(), "messages": log.count()}


def _overlap_worker():
    """DDP buckets, overlapped and not: both give the average of every rank's gradients."""
    rank, n = dist.get_rank(), dist.get_world_size()
    acts = [_inputs(rank, (5, 7), torch.float32, 50 + i) for i in range(5)]
    douts = [_inputs(rank, (5, 7), torch.float32, 60 + i) for i in range(5)]
    buckets = overlap.bucket_plan([49] * 5, 98)
    out = {}
    for mode in (False, True):
        grads, spans = overlap.backward_step(acts, douts, buckets, 0.002, n, overlap=mode)
        out[mode] = (grads, spans)
    return {"acts": acts, "douts": douts, "runs": out, "buckets": buckets}


def _subgroup_worker():
    """Even and odd ranks as two groups (every rank creates both, as new_group requires)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    groups = {p: dist.new_group([r for r in range(n) if r % 2 == p]) for p in (0, 1)}
    x = _inputs(rank, (11,), torch.float32, 77)
    out = {"x": x}
    for name in ALL_REDUCE:
        t = x.clone()
        getattr(collectives, name)(t, group=groups[rank % 2])
        out[name] = t
    return out


def _worker():
    return {"all_reduce": _all_reduce_worker(), "rs_ag": _rs_ag_worker(),
            "a2a": _a2a_worker(), "overlap": _overlap_worker(), "groups": _subgroup_worker()}


@pytest.fixture(scope="module", params=[2, 3, 4])
def ranks(request):
    """(n, each rank's results): one spawn per world size serves every test below (starting
    ranks costs seconds; the cases cost milliseconds)."""
    n = request.param
    return n, launch.spawn(_worker, n, timeout_s=300)


def test_all_reduce_matches_gloo_and_float64(ranks):
    n, res = ranks
    res = [r["all_reduce"] for r in res]
    for case, (shape, dtype, _) in enumerate(_cases()):
        xs = torch.stack([r[case]["x"] for r in res])
        ref, bound = xs.double().sum(0), _bound(xs, n)
        gloo_err = (res[0][case]["gloo"].double() - ref).abs()
        assert (gloo_err <= bound).all(), "the bound must hold for gloo too"
        for name in ALL_REDUCE:
            outs = [r[case][name] for r in res]
            for rank, o in enumerate(outs):
                assert o.dtype == dtype and o.shape == shape
                err = (o.double() - ref).abs()
                assert (err <= bound).all(), (name, n, shape, dtype, rank, err.max().item())
                # every rank must hold the same bits: the sum was computed once per chunk
                assert torch.equal(o, outs[0]), (name, rank)
                sent, messages = SENT[name](xs[0].numel(), n, rank, xs.element_size())
                slack = (n.bit_length() * xs.element_size()
                         if name.startswith("halving") else 0)  # uneven halves, see _hd_sent
                assert abs(res[rank][case][name + ":sent"] - sent) <= slack, (name, n, rank)
                assert res[rank][case][name + ":messages"] == messages


def _rs_ag_worker():
    rank, n = dist.get_rank(), dist.get_world_size()
    # input_list[j] holds j+1 elements: chunks differ per rank, the first is one element
    inputs = [_inputs(rank, (j + 1,), torch.float32, j) for j in range(n)]
    out = torch.full((rank + 1,), float("nan"))
    with comm_log.recording() as log:
        collectives.ring_reduce_scatter(out, inputs)
    rs_sent = log.bytes()
    mine = _inputs(rank, (3, 5), torch.float16, 99)
    gathered = [torch.full((3, 5), float("nan"), dtype=torch.float16) for _ in range(n)]
    with comm_log.recording() as log:
        collectives.ring_all_gather(gathered, mine)
    return {"inputs": inputs, "rs": out, "rs_sent": rs_sent, "mine": mine,
            "ag": gathered, "ag_sent": log.bytes(), "ag_received": log.bytes(received=True)}


def test_reduce_scatter_and_all_gather(ranks):
    n, res = ranks
    res = [r["rs_ag"] for r in res]
    for rank, r in enumerate(res):
        ref = sum(res[j]["inputs"][rank].double() for j in range(n))
        assert r["rs"].shape == (rank + 1,)
        assert ((r["rs"].double() - ref).abs() <= _bound(
            torch.stack([res[j]["inputs"][rank] for j in range(n)]), n)).all()
        # every chunk but my own leaves me once, forwarded along the ring
        assert r["rs_sent"] == 4 * sum(j + 1 for j in range(n) if j != rank)
        for j in range(n):  # all-gather copies bits: exact
            assert torch.equal(r["ag"][j], res[j]["mine"])
        assert r["ag_sent"] == r["ag_received"] == (n - 1) * 15 * 2


def test_all_to_all_moves_each_chunk_once(ranks):
    n, res = ranks
    res = [r["a2a"] for r in res]
    for rank, r in enumerate(res):
        for j in range(n):
            assert torch.equal(r["outputs"][j], res[j]["inputs"][rank])
        assert r["messages"] == n - 1
        assert r["sent"] == 2 * sum(rank + j + 1 for j in range(n) if j != rank)


def test_bucketed_backward_averages_gradients(ranks):
    n, res = ranks
    res = [r["overlap"] for r in res]
    want = [sum(r["acts"][i].double().T @ r["douts"][i].double() for r in res) / n
            for i in range(5)]
    for r in res:
        for mode, (grads, spans) in r["runs"].items():
            for g, w in zip(grads, want, strict=True):
                assert (g.double() - w).abs().max() < 1e-5 * w.abs().max(), mode
            comm = sorted(s for s in spans if s[0] == "comm")
            assert [b for _, b, _, _ in comm] == list(range(len(r["buckets"])))
            last_compute = max(e for k, _, _, e in spans if k == "compute")
            ready = sorted(s for k, _, s, _ in spans if k == "ready")
            assert len(ready) == len(r["buckets"]) and min(s for _, _, s, _ in comm) >= ready[0]
            # overlap: the first bucket is handed over before the backward ends; without: after.
            # (Handed over, not started: on a loaded CPU the communication thread may wake late.)
            assert (ready[0] < last_compute) == mode, (mode, ready[0], last_compute)


def test_all_reduce_within_a_subgroup(ranks):
    n, res = ranks
    res = [r["groups"] for r in res]
    for rank, r in enumerate(res):
        members = [j for j in range(n) if j % 2 == rank % 2]
        want = sum(res[j]["x"].double() for j in members)
        for name in ALL_REDUCE:
            assert (r[name].double() - want).abs().max() < 1e-5, (name, n, rank)


def test_double_tree_leaves_of_one_are_interior_in_the_other():
    for n in range(2, 17):
        for parent in (btree(n), *double_btree(n)):
            assert sum(p < 0 for p in parent) == 1
            assert all(len(children(parent, r)) <= 2 for r in range(n))
            for r in range(n):  # every rank reaches the root within ceil(log2 n) + 1 hops
                hops = 0
                while parent[r] >= 0:
                    r, hops = parent[r], hops + 1
                assert hops <= n.bit_length()
        t1, t2 = double_btree(n)
        both = {r for r in range(n) if children(t1, r) and children(t2, r)}
        assert len(both) <= n % 2, (n, both)  # odd n: one rank is interior in both (§3)


def _raise_mid_ring():
    if dist.get_rank() == 1:
        raise ValueError("rank 1 gave up")
    collectives.ring_all_reduce(torch.ones(10))


def _die_mid_ring():
    if dist.get_rank() == 1:
        import os
        os._exit(3)  # no Python exception, no traceback: the process is simply gone
    launch.TIMEOUT_S = 5.0
    collectives.ring_all_reduce(torch.ones(10))


def _hang_mid_ring():
    if dist.get_rank() == 1:
        time.sleep(600)
    launch.TIMEOUT_S = 2.0  # this rank's waits (comm_log reads it at each call)
    collectives.ring_all_reduce(torch.ones(10))


def test_a_failing_rank_ends_the_ring_with_its_error():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 failed first(.|\n)*rank 1 gave up"):
        launch.spawn(_raise_mid_ring, 2, timeout_s=120)
    assert time.monotonic() - start < 100  # ended by the failure, not the deadline


def test_a_dying_rank_ends_the_ring():
    """A rank that vanishes (no traceback) ends the run at once, and is named: its peer's
    receive fails with the lost connection, and launch says which rank left without one."""
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 died|rank 1 exited (.|\n)*without a "
                       "traceback(.|\n)*rank 0 failed first(.|\n)*"
                       "(Connection reset|Connection closed|TimeoutError)"):
        launch.spawn(_die_mid_ring, 2, timeout_s=120)
    assert time.monotonic() - start < 100


def test_a_hung_rank_times_out_its_peers():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="failed first(.|\n)*TimeoutError"):
        launch.spawn(_hang_mid_ring, 2, timeout_s=120)
    assert time.monotonic() - start < 100


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="t must be a torch.Tensor"):
        collectives.ring_all_reduce([1.0, 2.0])
    with pytest.raises(TypeError, match="floating point"):
        collectives.ring_all_reduce(torch.ones(3, dtype=torch.int64))
