"""The serving engine: each request's greedy output equals generate() on it alone, however the
scheduler batches, chunks, preempts and hits the prefix cache (a property over random arrival
traces); no block leaks; Sarathi's no-stall rule, with prefill-first as the control that
breaks it; exact per-step counts; streaming; stops; sampling; bad input.

The model is the shipped one-block draft in float64, so batched and solo runs agree to ~1e-16
and a greedy tie cannot flip a token between them.
"""

import functools
from collections import Counter

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from shared.inference.generate import generate
from shared.models import zoo
from shared.serving import Engine, SamplingParams, SchedulerConfig
from shared.serving.sampler import filter_logits


@functools.cache
def model():
    return zoo.load("draft", train_if_missing=False).double()


@functools.cache
def solo(prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    """The request alone, through shared/inference/generate.py's contiguous cache."""
    return generate(model(), torch.tensor([prompt]), max_tokens).tokens[0].tolist()


def run(trace, **config):
    engine = Engine(model(), SchedulerConfig(**config))
    events = []
    for e in engine.replay(trace):            # tokens come as each step ends
        engine.scheduler.check()              # the allocator and tree invariants, mid-trace
        events.append(e)
    engine.check()
    return engine, events


@st.composite
def traces(draw):
    """Requests sharing prefixes of a common base, arriving at random steps, on a small pool
    and a small budget (so chunks, preemptions, evictions and cache hits all happen)."""
    base = draw(st.lists(st.integers(0, 255), min_size=24, max_size=24))
    trace = []
    for _ in range(draw(st.integers(1, 6))):
        shared = draw(st.sampled_from([0, 3, 8, 13, 24]))
        own = draw(st.lists(st.integers(0, 255), min_size=max(0, 2 - shared), max_size=12))
        params = SamplingParams(max_tokens=draw(st.integers(1, 10)))
        trace.append((base[:shared] + own, params, float(draw(st.integers(0, 5)))))
    block_size = draw(st.sampled_from([2, 4, 8]))
    need = max(-(-(len(p) + sp.max_tokens) // block_size) for p, sp, _ in trace)
    budget = draw(st.integers(2, 16))
    config = dict(block_size=block_size, num_blocks=need + draw(st.integers(0, 2)),
                  token_budget=budget, max_num_seqs=draw(st.integers(1, budget)),
                  prefix_caching=draw(st.booleans()))
    return trace, config


@settings(max_examples=20)
@given(traces())
def test_every_greedy_output_equals_its_solo_run(case):
    trace, config = case
    engine, events = run(trace, **config)
    for i, (prompt, params, _) in enumerate(trace):
        r = engine.requests[i]
        assert r.output == solo(tuple(prompt), params.max_tokens), (i, config)
        assert [e.token for e in events if e.request_id == i] == r.output   # all streamed
    event(f"preempted: {any(s.preempted for s in engine.history)}")   # coverage, shown by
    event(f"cache hit: {any(s.cached_tokens for s in engine.history)}")  # --hypothesis-show-
    prefills = Counter(r.request_id for s in engine.history for r, _, k in s.items
                       if k == "prefill")
    event(f"prefill in chunks: {any(n > 1 for n in prefills.values())}")
    for s in engine.history:                                             # statistics
        assert s.decode_stalls == 0                       # Sarathi: no decode left out
        assert s.decode_tokens + s.prefill_tokens <= config["token_budget"]
        assert len(s.items) <= config["max_num_seqs"]


def test_preemption_and_cache_hits_happen_and_outputs_still_match():
    """A fixed tight trace, so the property above is known to cover recompute and hits."""
    g = torch.Generator().manual_seed(3)
    system = torch.randint(0, 256, (16,), generator=g).tolist()
    trace = [(system + torch.randint(0, 256, (5 + i,), generator=g).tolist(),
              SamplingParams(max_tokens=12), float(i)) for i in range(5)]
    engine, _ = run(trace, block_size=4, num_blocks=12, token_budget=8, max_num_seqs=4)
    assert sum(len(s.preempted) for s in engine.history) > 0
    assert sum(s.cached_tokens for s in engine.history) >= 4 * 16
    assert sum(s.evicted_blocks for s in engine.history) > 0
    for i, (prompt, params, _) in enumerate(trace):
        assert engine.requests[i].output == solo(tuple(prompt), params.max_tokens)
    # no leaks: every block is free, or held by the prefix cache alone
    m = engine.scheduler.manager
    assert m.num_free + engine.scheduler.cache.num_blocks == m.num_blocks
    assert all(c == h for c, h in zip(m.ref_counts, m.held, strict=True))


def test_without_prefix_caching_every_block_returns_to_the_free_list():
    trace = [(list(range(10 + i)), SamplingParams(max_tokens=6), float(i)) for i in range(4)]
    engine, _ = run(trace, block_size=4, num_blocks=8, token_budget=6, max_num_seqs=3,
                    prefix_caching=False)
    assert engine.scheduler.manager.num_free == 8


def _long_decode_and_late_prefill():
    return [(list(range(5)), SamplingParams(max_tokens=20), 0.0),
            (list(range(100, 140)), SamplingParams(max_tokens=2), 4.0)]


def test_sarathi_rule_no_decode_skips_a_step_while_a_prefill_runs():
    engine, _ = run(_long_decode_and_late_prefill(), block_size=4, num_blocks=32,
                    token_budget=8, max_num_seqs=2)
    a = engine.requests[0]
    assert sum(s.decode_stalls for s in engine.history) == 0
    assert a.token_times == [float(t) for t in range(1, 21)]     # one token every step
    assert any(s.prefill_tokens and s.decode_tokens for s in engine.history)   # mixed


def test_prefill_first_stalls_decodes_and_the_counter_sees_it():
    """The control: vLLM v0's prefill-first policy pauses A for B's 40-token prompt."""
    engine, _ = run(_long_decode_and_late_prefill(), block_size=4, num_blocks=32,
                    token_budget=8, max_num_seqs=2, policy="prefill_first")
    assert sum(s.decode_stalls for s in engine.history) == 5     # ceil(40 / 8) prefill steps
    assert engine.requests[0].output == solo(tuple(range(5)), 20)


def test_exact_counts_per_step():
    trace = [(list(range(10)), SamplingParams(max_tokens=3), 0.0),
             (list(range(50, 55)), SamplingParams(max_tokens=2), 1.0)]
    engine, _ = run(trace, block_size=4, num_blocks=10, token_budget=8, max_num_seqs=2)
    got = [([(r.request_id, n, kind) for r, n, kind in s.items], s.used_blocks,
            s.cache_only_blocks) for s in engine.history]
    assert got == [
        ([(0, 8, "prefill")], 2, 0),                        # A's first chunk: the budget
        ([(0, 2, "prefill"), (1, 5, "prefill")], 5, 0),     # A's rest, then B arrives
        ([(0, 1, "decode"), (1, 1, "decode")], 5, 0),       # B's 2nd token: B done
        ([(0, 1, "decode")], 4, 1),                         # B's full block stays cached
    ]
    assert [s.kv_utilisation for s in engine.history] == [0.2, 0.5, 0.5, 0.3]
    assert [(s.running, s.waiting) for s in engine.history] == [(1, 0), (2, 0), (2, 0),
                                                                (1, 0)]


def test_static_batching_waits_for_the_longest_member():
    trace = [(list(range(6)), SamplingParams(max_tokens=8), 0.0),
             (list(range(20, 26)), SamplingParams(max_tokens=2), 0.0),
             (list(range(40, 46)), SamplingParams(max_tokens=2), 1.0)]
    engine, _ = run(trace, block_size=4, num_blocks=16, token_budget=32, max_num_seqs=2,
                    policy="static")
    first, late = engine.requests[0], engine.requests[2]
    assert late.token_times[0] > first.token_times[-1]          # admitted after all finished
    for i, (prompt, params, _) in enumerate(trace):
        assert engine.requests[i].output == solo(tuple(prompt), params.max_tokens)
    cont, _ = run(trace, block_size=4, num_blocks=16, token_budget=32, max_num_seqs=2)
    assert cont.requests[2].token_times[0] < first.token_times[-1]   # continuous: joins


def test_static_batch_is_admitted_whole_even_past_the_token_budget():
    """The batch forms when the last one is done, not just the members the budget reaches in
    one step: the others join with no tokens and prefill in the next steps."""
    trace = [(list(range(k, k + 10)), SamplingParams(max_tokens=3), 0.0) for k in (0, 50, 100)]
    engine, _ = run(trace, block_size=4, num_blocks=32, token_budget=12, max_num_seqs=3,
                    policy="static")
    assert engine.history[0].running == 3 and engine.history[0].waiting == 0
    assert [(r.request_id, n) for r, n, _ in engine.history[0].items] == [(0, 10), (1, 2)]
    for i, (prompt, params, _) in enumerate(trace):
        assert engine.requests[i].output == solo(tuple(prompt), params.max_tokens)


def test_tokens_stream_as_they_are_produced():
    seen = []
    engine = Engine(model(), SchedulerConfig(block_size=4, num_blocks=16, token_budget=32))
    engine.add_request(list(range(8)), SamplingParams(max_tokens=2),
                       on_token=lambda r, t: seen.append((r.request_id, len(engine.history))))
    long = engine.add_request(list(range(9)), SamplingParams(max_tokens=9))
    engine.step()
    assert seen == [(0, 0)] and len(long.output) == 1           # before anything finished
    while engine.has_unfinished():
        engine.step()
    assert seen == [(0, 0), (0, 1)] and len(long.output) == 9
    engine.check()


def test_stop_token_and_stop_string():
    prompt = tuple(range(30, 42))
    ref = solo(prompt, 12)
    stop_id = ref[4]
    engine = Engine(model(), SchedulerConfig(block_size=4, num_blocks=16, token_budget=16))
    a = engine.add_request(prompt, SamplingParams(max_tokens=12, stop_token_ids=(stop_id,)))
    b = engine.add_request(prompt, SamplingParams(max_tokens=12, stop=[bytes(ref[2:4])]))
    c = engine.add_request(prompt, SamplingParams(max_tokens=3))
    while engine.has_unfinished():
        engine.step()
    cut = ref.index(stop_id)
    assert a.output == ref[:cut + 1] and a.text == bytes(ref[:cut]) and a.finish_reason == "stop"
    k = bytes(ref).find(bytes(ref[2:4])) + 2
    assert b.output == ref[:k] and b.text == bytes(ref[:k - 2]) and b.finish_reason == "stop"
    assert c.output == ref[:3] and c.finish_reason == "length"
    engine.check()


def test_abort_frees_the_blocks_and_spares_the_others():
    engine = Engine(model(), SchedulerConfig(block_size=4, num_blocks=16, token_budget=16,
                                             prefix_caching=False))
    gone = engine.add_request(list(range(11)), SamplingParams(max_tokens=20))
    stay = engine.add_request(list(range(60, 67)), SamplingParams(max_tokens=6))
    engine.step()
    engine.step()
    assert engine.scheduler.manager.num_free < 16
    engine.abort(gone.request_id)
    assert gone.finish_reason == "abort"
    while engine.has_unfinished():
        engine.step()
    assert stay.output == solo(tuple(range(60, 67)), 6)
    assert engine.scheduler.manager.num_free == 16
    engine.check()
    with pytest.raises(ValueError, match="request_id"):
        engine.abort("nobody")


def test_wall_clock_and_the_triton_sampling_kernel():
    """clock="wall" stamps tokens in seconds; impl="triton" draws through kernels/sampling's
    Triton kernel (the interpreter here) and, equally seeded, picks what the reference picks."""
    params = SamplingParams(max_tokens=4, temperature=1.0, top_k=40, seed=3)
    outs = []
    for impl in ("triton", "reference"):
        engine = Engine(model(), SchedulerConfig(block_size=4, num_blocks=8), clock="wall",
                        impl=impl)
        r = engine.add_request(list(range(7)), params)
        while engine.has_unfinished():
            engine.step()
        assert 0 < r.token_times[0] <= r.token_times[-1] < 60
        outs.append(r.output)
    assert outs[0] == outs[1]
    with pytest.raises(ValueError, match="clock"):
        Engine(model(), clock="sundial")


def test_seeded_sampling_does_not_depend_on_the_batch():
    params = SamplingParams(max_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    alone, _ = run([(list(range(9)), params, 0.0)], block_size=4, num_blocks=16)
    busy, _ = run([(list(range(100, 120)), SamplingParams(max_tokens=9), 0.0),
                   (list(range(9)), params, 1.0)], block_size=2, num_blocks=40, token_budget=4,
                  max_num_seqs=2)
    assert alone.requests[0].output == busy.requests[1].output
    other, _ = run([(list(range(9)), SamplingParams(**{**params.__dict__, "seed": 8}), 0.0)],
                   block_size=4, num_blocks=16)
    assert other.requests[0].output != alone.requests[0].output


def test_top_k_and_top_p_masks():
    logits = torch.tensor([0.1, 0.4, 0.15, 0.3, 0.05]).log()
    kept = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(
        temperature=1.0, **kw))).nonzero().flatten().tolist()
    assert kept(top_k=2) == [1, 3]
    assert kept(top_p=0.65) == [1, 3]           # 0.4 + 0.3 is past 0.65: 0.15 goes
    assert kept(top_p=0.75) == [1, 2, 3]
    assert kept(top_p=0.01) == [1]              # the most likely token always stays
    assert kept(top_k=3, top_p=0.5) == [1, 3]


@pytest.mark.parametrize("kwargs, name", [
    (dict(prompt=[]), "prompt"), (dict(prompt=b""), "prompt"),
    (dict(prompt=[1, 256]), "prompt"), (dict(prompt=list(range(256))), "prompt"),
    (dict(params=SamplingParams(max_tokens=250)), "max_tokens"),
    (dict(prompt=list(range(100)), params=SamplingParams(max_tokens=100)), "num_blocks"),
])
def test_bad_requests_name_the_argument(kwargs, name):
    engine = Engine(model(), SchedulerConfig(block_size=4, num_blocks=32))
    kwargs = {"prompt": list(range(10)), **kwargs}
    with pytest.raises(ValueError, match=name):
        engine.add_request(**kwargs)
    assert not engine.has_unfinished()


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-1), "max_tokens"),
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(stop=[b""]), "stop"), (dict(seed=1.5), "seed"),
])
def test_bad_sampling_params_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_blocks=0), "num_blocks"), (dict(block_size=-4), "block_size"),
    (dict(token_budget=4, max_num_seqs=8), "max_num_seqs"), (dict(policy="sjf"), "policy"),
])
def test_bad_scheduler_config_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SchedulerConfig(**kwargs)


def test_history_is_bounded_when_asked():
    engine = Engine(model(), SchedulerConfig(block_size=4, num_blocks=16, token_budget=8,
                                             max_num_seqs=4), history_limit=3)
    engine.add_request(list(range(5)), SamplingParams(max_tokens=12))
    steps = []
    while engine.has_unfinished():
        steps.append(engine.step())
    assert len(steps) > 6 and 3 <= len(engine.history) <= 6    # trimmed in halves
    assert engine.history == steps[-len(engine.history):]       # the latest ones kept
    with pytest.raises(ValueError, match="history_limit"):
        Engine(model(), history_limit=0)
