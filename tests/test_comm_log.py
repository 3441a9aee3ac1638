"""comm_log: records, nesting, the ring volume formula, and the logged wrappers on 3 gloo ranks
(values equal the unlogged torch.distributed calls; bytes are what each op moves). A peer that
never answers: tests/test_collectives.py (the same wait, through sendrecv)."""

import threading

import pytest
import torch
import torch.distributed as dist

from shared.parallel import comm_log, launch


def test_recording_counts_bytes_and_nests():
    with comm_log.recording() as outer:
        comm_log.record("send", 40, 0, 1, 2, 40)
        with comm_log.recording() as inner:
            comm_log.record("recv", 0, 24, 1, 2, 24)
            comm_log.record("send", 8, 0, 0, 2, 8)
    comm_log.record("send", 99, 0, 1, 2, 99)  # no recorder open: counted nowhere
    assert outer.count() == 3 and inner.count() == 2
    assert outer.count("send") == 2 and outer.bytes("send") == 48
    assert outer.bytes() == 48 and outer.bytes(received=True) == 24
    assert inner.bytes("recv", received=True) == 24 and inner.peers() == {0, 1}


def test_recording_from_threads_counts_every_message_once():
    def work():
        for _ in range(500):
            comm_log.record("send", 4, 0, 1, 2, 4)

    with comm_log.recording() as log:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert log.count("send") == 2000 and log.bytes() == 8000


def test_bad_op_is_a_value_error():
    with pytest.raises(ValueError, match="op"):
        comm_log.record("allreduce", 1, 1, None, 2, 1)
    with comm_log.recording() as log, pytest.raises(ValueError, match="op"):
        log.count("gather")
    with pytest.raises(ValueError, match="op"):
        comm_log.ring_volume("gather", 8, 2, 4)
    with pytest.raises(ValueError, match="world"):
        comm_log.ring_volume("all_reduce", 8, 0, 4)


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_ring_volume_is_the_bandwidth_lower_bound(n):
    # Patarasuk & Yuan §2: an all-reduce must send at least 2(n-1)/n of the data per rank.
    numel = 24 * 7
    assert comm_log.ring_volume("all_reduce", numel, n, 2) == (2 * (n - 1) * numel * 2 // n,) * 2
    assert comm_log.ring_volume("all_gather", numel, n, 4)[0] == (n - 1) * numel * 4 // n


def _wrappers():
    rank, n = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(5, 3, generator=g)
    out = {}
    with comm_log.recording() as log:
        a = x.clone()
        comm_log.all_reduce(a)
        out["all_reduce"] = a
        gathered = [torch.full_like(x, float("nan")) for _ in range(n)]
        comm_log.all_gather(gathered, x)
        out["all_gather"] = torch.stack(gathered)
        rs = torch.full((4,), float("nan"))
        comm_log.reduce_scatter(rs, [x.reshape(-1)[4 * j:4 * j + 4] * (j + 1) for j in range(n)])
        out["reduce_scatter"] = rs
        b = x.clone()
        comm_log.broadcast(b, src=1)
        out["broadcast"] = b
        a2a = [torch.full((2,), float("nan")) for j in range(n)]  # gloo: equal chunks
        comm_log.all_to_all(a2a, [torch.full((2,), float(10 * rank + j)) for j in range(n)])
        out["all_to_all"] = torch.cat(a2a)
        if rank == 0:
            comm_log.send(x, 1, tag=7)
        elif rank == 1:
            got = torch.full_like(x, float("nan"))
            comm_log.recv(got, 0, tag=7)
            out["recv"] = got
    out["records"] = log.records
    out["x"] = x
    return out


def test_logged_wrappers_match_torch_and_count_bytes():
    n = 3
    res = launch.spawn(_wrappers, n, timeout_s=120)
    xs = torch.stack([r["x"] for r in res])
    for rank, r in enumerate(res):
        torch.testing.assert_close(r["all_reduce"], xs.sum(0))
        torch.testing.assert_close(r["all_gather"], xs)
        want = sum(xs[j].reshape(-1)[4 * rank:4 * rank + 4] * (rank + 1) for j in range(n))
        torch.testing.assert_close(r["reduce_scatter"], want)
        torch.testing.assert_close(r["broadcast"], xs[1])
        assert r["all_to_all"].tolist() == [float(10 * j + rank) for j in range(n)
                                             for _ in range(2)]
        ops = {c.op: c for c in r["records"]}
        assert [c.op for c in r["records"]] == (
            ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all"]
            + {0: ["send"], 1: ["recv"]}.get(rank, []))
        assert ops["all_reduce"].sent == 2 * (n - 1) * 15 * 4 // n  # 15 fp32 elements
        assert ops["all_gather"].received == (n - 1) * 15 * 4
        assert ops["broadcast"].sent == (60 if rank == 1 else 0)
        assert ops["all_to_all"].sent == ops["all_to_all"].received == (n - 1) * 2 * 4
        assert all(c.group_size == n for c in r["records"])
    torch.testing.assert_close(res[1]["recv"], xs[0], rtol=0, atol=0)
    assert res[0]["records"][-1].sent == 60 and res[0]["records"][-1].peer == 1
    assert res[1]["records"][-1].received == 60 and res[1]["records"][-1].peer == 0
