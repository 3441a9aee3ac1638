"""The continuous-batching lab's machinery: the model-free simulator makes the engine's schedule
step for step (preemptions included); step work is counted as written out by hand; the
step-time fit recovers known coefficients; latencies on the step clock and priced in seconds
agree with the token times; multi-turn chat gives every turn its solo output and hits the
cache."""

import numpy as np
import pytest
import torch

from shared.benchmarks import continuous_batching as cb
from shared.inference.generate import generate
from shared.serving import SchedulerConfig
from shared.serving.scheduler import Step
from shared.serving.simulate import ModelShape, simulate, step_work

pytestmark = pytest.mark.timeout(120)


def solo(prompt: bytes, n: int) -> list[int]:
    return generate(cb.model(), torch.tensor([list(prompt)]), n).tokens[0].tolist()


def test_simulator_makes_the_engines_schedule():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    reqs = cb.trace(10, 0.4, prompt_len=(3, 40), max_tokens=(2, 16), seed=seed)
    for cfg in (SchedulerConfig(num_blocks=14, block_size=8, token_budget=24, max_num_seqs=6),
                SchedulerConfig(num_blocks=40, block_size=4, token_budget=16, max_num_seqs=4,
                                policy="static")):
        run = cb.replay(reqs, cfg)
        sim = simulate([(list(p), sp.max_tokens, a) for p, sp, a in reqs], cfg, lambda s: 1.0)
        key = lambda steps: [[(r.request_id, n, k) for r, n, k in s.items] for s in steps]  # noqa: E731
        assert key(sim.steps) == key(run.steps), seed
        assert [s.starts for s in sim.steps] == [s.starts for s in run.steps]
        assert [r.token_times for r in sim.requests] == \
            [run.engine.requests[i].token_times for i in range(len(reqs))]
        for i, (p, sp, _) in enumerate(reqs):                  # and the tokens are right
            assert run.engine.requests[i].output == solo(p, sp.max_tokens)


def test_step_work_is_counted_as_written():
    shape = ModelShape("toy", n_layers=2, dim=8, n_heads=2, n_kv_heads=1, head_dim=4,
                       ffn_dim=16, vocab_size=10, bytes_per_param=2)
    step = Step(0, items=[(None, 1, "decode"), (None, 3, "prefill")], starts=[9, 2])
    assert step.kv_tokens == 10 + 5
    assert step.attention_pairs == 10 + (3 * 2 + 6)           # rows see 3, 4 and 5 keys
    per_layer = 2 * 8 * 8 + 2 * 8 * 4 + 3 * 8 * 16            # q,o + k,v + SwiGLU
    assert shape.layer_params == 2 * per_layer
    flops, nbytes = step_work(shape, step)
    assert flops == 2 * 2 * per_layer * 4 + 2 * 8 * 10 * 2 + 4 * 2 * 2 * 4 * 22
    assert nbytes == (2 * per_layer + 80) * 2 + 2 * 2 * 1 * 4 * 2 * (15 + 4)


def test_step_time_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    steps = [Step(i, items=[(None, int(p), "prefill")] + [(None, 1, "decode")] * int(d),
                  starts=[int(s)] + [int(k)] * int(d))     # 0-4 decodes: not the intercept
             for i, (p, s, k, d) in enumerate(zip(*rng.integers(1, 60, size=(3, 40)),
                                                  rng.integers(0, 5, 40), strict=True))]
    coef = np.array([2e-3, 5e-5, 3e-4, 1e-6])
    y = cb.features(steps) @ coef
    fit = cb.fit_step_time(steps, y)
    assert np.allclose(fit.coef, coef) and fit.r2(steps, y) == pytest.approx(1.0)
    noisy = y + rng.normal(0, 1e-3, len(y))
    assert 0 < cb.fit_step_time(steps, noisy).r2(steps, noisy) < 1


def test_latencies_on_both_clocks():
    reqs = cb.trace(6, 0.5, prompt_len=(4, 30), max_tokens=(2, 8), seed=1)
    run = cb.replay(reqs, SchedulerConfig(num_blocks=32, block_size=8, token_budget=16,
                                          max_num_seqs=4))
    lat = run.latencies()
    rs = list(run.engine.requests.values())
    assert np.allclose(lat["ttft_steps"], [r.token_times[0] - r.arrival for r in rs])
    assert len(lat["tbt_steps"]) == sum(len(r.output) - 1 for r in rs)
    run.cpu = np.ones_like(run.cpu)            # one second a step: seconds = steps run
    lat = run.latencies()
    ran = [np.searchsorted(run.clock, r.token_times[0], side="right")
           - np.searchsorted(run.clock, r.arrival, side="right") for r in rs]
    assert np.allclose(lat["ttft_s"], ran) and (lat["ttft_s"] >= 1).all()
    s = run.summary()
    assert s["tokens"] == sum(sp.max_tokens for _, sp, _ in reqs)
    assert s["cpu_s"] == len(run.steps)


def test_multi_turn_chat_hits_the_cache_and_each_turn_equals_its_solo_run():
    cfg = SchedulerConfig(num_blocks=48, block_size=8, token_budget=32, max_num_seqs=4)
    run = cb.chat(cfg, conversations=2, turns=3, max_tokens=6, seed=2)
    reqs = run.engine.requests
    assert sorted(reqs) == [(c, t) for c in range(2) for t in range(3)]
    for (c, t), r in reqs.items():
        assert r.output == solo(bytes(r.prompt), 6)
        if t:                                  # the whole previous turn opens this prompt
            prev = reqs[c, t - 1]
            assert r.prompt[:len(prev.tokens)] == tuple(prev.tokens)
            assert r.arrival >= prev.token_times[-1]
            assert r.num_cached >= (len(prev.tokens) // 8 - 1) * 8   # its full blocks hit
    assert run.summary()["cached_tokens"] > 0


def test_hit_ceiling_counts_full_blocks_of_the_longest_earlier_prefix():
    from shared.serving.request import Request, SamplingParams

    def req(i, prompt, out=()):
        r = Request(i, tuple(prompt), SamplingParams(), float(i))
        r.output = list(out)
        return r

    a = req(0, range(10), out=[50, 51, 52, 53])           # 10 prompt tokens, then its answer
    b = req(1, list(range(10)) + [50, 51, 52, 7, 8])      # shares 13 with a's tokens
    c = req(2, range(9))                                   # all of it is a prefix of a
    # blocks of 4: b hits 12 (13 floored); c hits 8 (its last token must run, 8 floored)
    assert cb.hit_ceiling([a, b, c], 4) == (12 + 8) / (10 + 15 + 9)
