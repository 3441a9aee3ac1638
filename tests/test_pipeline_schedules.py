"""Pipeline schedules, validator and simulator (pure Python, no processes)."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.parallel.pipeline import Action, Schedule, make_schedule, simulate, timeline, validate
from shared.parallel.pipeline.validate import fifo_order

NAMES = ("gpipe", "1f1b", "zb-h1")


def _custom(ranks, p, m, v=1):
    return Schedule("custom", p, m, v, tuple(tuple(r) for r in ranks))


@given(p=st.integers(1, 8), m=st.integers(1, 16), name=st.sampled_from(NAMES))
def test_plain_schedules_are_valid_with_the_papers_bubble(p, m, name):
    sched = validate(make_schedule(name, p, m))
    for acts in sched.ranks:  # each rank: m forwards and m backwards
        assert sorted(a.mb for a in acts if a.kind == "F") == list(range(m))
    sim = simulate(sched)
    if name == "zb-h1":
        if m >= p:  # Qi et al. §3.1: bubble (p - 1)(f + b - w), a third of 1F1B's at f=b=w
            assert sim.makespan == pytest.approx(3 * m + (p - 1))
            one_f = simulate(make_schedule("1f1b", p, m))
            idle = lambda s: s.makespan * s.bubble_fraction
            assert idle(sim) == pytest.approx(idle(one_f) / 3)
        assert max(sim.peak_stashed) <= p
    else:  # GPipe §2.3: (p - 1)/(m + p - 1)
        assert sim.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    if name == "gpipe":
        assert sim.peak_stashed == (m,) * p
    if name == "1f1b":
        assert sim.peak_stashed == tuple(min(p - r, m) for r in range(p))


@given(p=st.integers(1, 6), k=st.integers(1, 4), v=st.integers(1, 4))
def test_interleaved_divides_the_bubble_by_v(p, k, v):
    m = k * p
    sim = simulate(make_schedule("interleaved-1f1b", p, m, chunks=v), f=1 / v, b=1 / v, w=1 / v)
    # Narayanan et al. 2021b §2.2: bubble time (p - 1)(f + b) / v per rank
    assert sim.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1))


@given(p=st.integers(1, 5), m=st.integers(1, 9), name=st.sampled_from(NAMES),
       f=st.floats(0.1, 3), b=st.floats(0.1, 3), w=st.floats(0.1, 3))
def test_simulation_respects_dependencies_and_bounds(p, m, name, f, b, w):
    sched = make_schedule(name, p, m)
    sim = simulate(sched, f=f, b=b, w=w)
    assert sim.makespan >= m * (f + b + w) - 1e-9  # every rank does m units of work
    assert 0 <= sim.bubble_fraction < 1
    end = {(a.kind, a.mb, r): e for r, spans in enumerate(sim.spans) for a, _, e in spans}
    for r, spans in enumerate(sim.spans):
        for a, s, _ in spans:
            if a.kind == "F" and r > 0:
                assert s >= end["F", a.mb, r - 1] - 1e-9
            if a.kind in ("B", "BW") and r < p - 1:
                back = end.get(("B", a.mb, r + 1), end.get(("BW", a.mb, r + 1)))
                assert s >= back - 1e-9


def test_bad_requests_get_clear_errors():
    with pytest.raises(ValueError, match="num_stages"):
        make_schedule("1f1b", 0, 4)
    with pytest.raises(ValueError, match="num_microbatches"):
        make_schedule("gpipe", 4, 0)
    with pytest.raises(ValueError, match="multiple of num_stages"):
        make_schedule("interleaved-1f1b", 4, 6, chunks=2)
    with pytest.raises(ValueError, match="chunks must be 1"):
        make_schedule("1f1b", 4, 8, chunks=2)
    with pytest.raises(ValueError, match="name must be one of"):
        make_schedule("pipedream-2bw", 4, 8)
    with pytest.raises(ValueError, match="positive duration"):
        simulate(make_schedule("1f1b", 2, 2), f=0)


def test_validator_names_what_is_wrong():
    F, BW, B, W = (lambda i, k=k: Action(k, i) for k in ("F", "BW", "B", "W"))
    with pytest.raises(ValueError, match="rank 1: forward of microbatch 1"):
        validate(_custom([[F(0), F(1), BW(0), BW(1)], [F(0), BW(0), BW(1)]], 2, 2))
    with pytest.raises(ValueError, match="appears twice"):
        validate(_custom([[F(0), F(0), BW(0)], [F(0), BW(0)]], 2, 1))
    with pytest.raises(ValueError, match="exactly one backward"):
        validate(_custom([[F(0), B(0), BW(0)], [F(0), BW(0)]], 2, 1))
    with pytest.raises(ValueError, match="exactly one backward"):
        validate(_custom([[F(0), B(0)], [F(0), BW(0)]], 2, 1))
    with pytest.raises(ValueError, match="bad action"):
        validate(_custom([[F(0), BW(0), Action("F", 3)], [F(0), BW(0)]], 2, 1))
    # rank 1 wants a backward before its forward; rank 0 waits on it: a deadlock
    with pytest.raises(ValueError, match="deadlock: rank 0 waits at BW0 .*rank 1 waits at BW0"):
        validate(_custom([[F(0), BW(0)], [BW(0), F(0)]], 2, 1))
    # W before its B on the same rank can never run
    with pytest.raises(ValueError, match="rank 0 waits at W0 for B0@stage0"):
        validate(_custom([[F(0), W(0), B(0)], [F(0), BW(0)]], 2, 1))


def test_fifo_check_catches_reordered_sends():
    F, BW = (lambda i, k=k: Action(k, i) for k in ("F", "BW"))
    # tags would match these on gloo, but NCCL matches in order: rank 1 expects 0 before 1
    sched = _custom([[F(1), F(0), BW(0), BW(1)], [F(0), F(1), BW(0), BW(1)]], 2, 2)
    with pytest.raises(ValueError, match="rank 0 sends to rank 1 in an order"):
        fifo_order(sched)
    with pytest.raises(ValueError, match="rank 0 sends to rank 1"):
        validate(sched)


def test_schedule_text_shows_actions():
    text = str(make_schedule("interleaved-1f1b", 2, 2, chunks=2))
    assert "rank 0: F0 F1 F0.1 F1.1" in text


def test_message_latency_lengthens_the_critical_path():
    # p=2, m=1: F on rank 0, message, F and BW on rank 1, message, BW on rank 0
    assert simulate(make_schedule("gpipe", 2, 1), comm=0.25).makespan == pytest.approx(6.5)
    with pytest.raises(ValueError, match="comm must be"):
        simulate(make_schedule("gpipe", 2, 1), comm=-1)


@given(p=st.integers(2, 5), m=st.integers(1, 8), name=st.sampled_from(NAMES),
       comm=st.floats(0.0, 0.5))
def test_timeline_reads_back_what_the_simulator_played(p, m, name, comm):
    """bubble, durations and message latency recovered from spans alone."""
    sched = make_schedule(name, p, m)
    sim = simulate(sched, f=1.0, b=2.0, w=0.5, comm=comm)
    assert timeline.bubble_fraction(sim.spans) == pytest.approx(sim.bubble_fraction)
    assert timeline.makespan(sim.spans) == pytest.approx(sim.makespan)
    expected = {"F": 1.0, "B": 2.0, "W": 0.5} if name == "zb-h1" else {"F": 1.0, "BW": 2.5}
    assert timeline.durations(sim.spans) == pytest.approx(expected)
    assert timeline.hop_latency(sched, sim.spans) == pytest.approx(comm)


def _torch_deviates(name, p, m):
    """Where torch.distributed.pipelining (2.13) runs a different, valid order: interleaved at
    m == p (Megatron-LM warms up with every forward then; torch does not), and its zero-bubble
    schedule with m < p (it runs the B's of a rank back to back before their W's)."""
    return (name == "interleaved-1f1b" and m == p) or (name == "zb-h1" and m < p)


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
def test_our_action_lists_are_torch_pipelinings(p):
    """GPipe, 1F1B, interleaved (v = 2, 3) and ZB-H1: every rank's list of actions equals the
    order torch.distributed.pipelining's schedule runs (replayed without a process group),
    wherever torch accepts the request; where it deviates, its order passes our validator."""
    from shared.parallel.pipeline.torch_pp import torch_actions
    compared = 0
    for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("interleaved-1f1b", 3),
                    ("zb-h1", 1)):
        for m in range(1, 13):
            if name == "interleaved-1f1b" and m % p:
                continue  # ours refuses: Megatron's ordering needs m to be a multiple of p
            ours = make_schedule(name, p, m, chunks=v)
            try:
                theirs = torch_actions(name, p, m, chunks=v)
            except ValueError as e:  # torch's own limits: 1F1B m >= p, ZB m % rounds == 0
                assert re.search("must be greater than or equal|multiple of the number", str(e))
                continue
            validate(theirs)
            if not _torch_deviates(name, p, m):
                assert theirs.ranks == ours.ranks, (name, p, m, str(theirs), str(ours))
                compared += 1
    assert compared >= 25
    if p == 4:  # the deviations exist (m == 1 or p == 1 aside, the orders may coincide)
        assert torch_actions("zb-h1", 4, 2).ranks != make_schedule("zb-h1", 4, 2).ranks
        assert torch_actions("interleaved-1f1b", 4, 4, chunks=2).ranks != \
            make_schedule("interleaved-1f1b", 4, 4, chunks=2).ranks


def test_torch_actions_rejects_bad_requests():
    from shared.parallel.pipeline.torch_pp import torch_actions
    with pytest.raises(ValueError, match="name must be one of"):
        torch_actions("pipedream-2bw", 4, 8)
    with pytest.raises(ValueError, match="chunks must be 1"):
        torch_actions("1f1b", 4, 8, chunks=2)
