"""`kclub loadgen` against a real `kclub serve` app (uvicorn on a free port, the server tests'
fixture): every streamed greedy output equals its solo run, tokens are counted from the usage
chunk, the latencies and throughput are consistent with the per-request times; the trace's
arrivals have the asked mean and burstiness; bad arguments and a missing server give a message
that names the option, not a traceback."""

import asyncio
import json

import numpy as np
import pytest
from test_serving_server import MODEL, served, solo  # noqa: F401  (served is a fixture)

from shared.cli import main as kclub
from shared.parallel.launch import free_port
from shared.serving import loadgen

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("cv", [1.0, 3.0])
def test_arrivals_have_the_asked_rate_and_burstiness(cv):
    t = loadgen.arrivals(20000, rate=5.0, burstiness=cv, seed=int(cv))
    gaps = np.diff(t)
    assert t[0] == 0 and (gaps >= 0).all()
    assert abs(gaps.mean() * 5.0 - 1) < 0.05                 # mean gap 1/rate
    assert abs(gaps.std() / gaps.mean() - cv) < 0.08 * cv   # CV: 1 Poisson, 3 bursty


def test_trace_is_seeded_and_in_range():
    a = loadgen.make_trace(30, 2.0, prompt_len=(5, 9), max_tokens=(3, 4), seed=1)
    assert a == loadgen.make_trace(30, 2.0, prompt_len=(5, 9), max_tokens=(3, 4), seed=1)
    assert a != loadgen.make_trace(30, 2.0, prompt_len=(5, 9), max_tokens=(3, 4), seed=2)
    assert all(5 <= len(r.prompt.encode()) <= 9 and 3 <= r.max_tokens <= 4 for r in a)
    assert {len(r.prompt) for r in a} == set(range(5, 10))   # both ends of the range drawn


@pytest.mark.parametrize("kwargs, name", [
    (dict(n=0, rate=1.0), "num_requests"), (dict(n=3, rate=0.0), "rate"),
    (dict(n=3, rate=1.0, burstiness=-1.0), "burstiness"),
    (dict(n=3, rate=1.0, prompt_len=(9, 2)), "prompt_len"),
    (dict(n=3, rate=1.0, max_tokens=(0, 2)), "max_tokens"),
])
def test_bad_trace_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        loadgen.make_trace(**kwargs)


def test_replay_against_the_server(served):  # noqa: F811
    _, _, port = served
    seed = int(np.random.SeedSequence().entropy % 2**31)     # a fresh trace every run
    trace = loadgen.make_trace(10, rate=40.0, burstiness=3.0, prompt_len=(4, 30),
                               max_tokens=(2, 12), seed=seed)
    summary, results = asyncio.run(loadgen.run(f"http://127.0.0.1:{port}/v1", trace,
                                               progress=False))
    assert summary["model"] == MODEL and summary["completed"] == 10 and not summary["errors"]
    for req, r in zip(trace, results, strict=True):
        want = solo(req.prompt.encode(), req.max_tokens).decode("utf-8", errors="replace")
        assert r.text == want, (seed, req)
        assert r.output_tokens == req.max_tokens            # from the usage chunk
        assert r.sent >= req.arrival - 1e-3                 # open loop: sent at its arrival
        assert 0 < r.ttft and all(g >= 0 for g in r.tbt)
    tbt = [g for r in results for g in r.tbt]
    assert len(tbt) == sum(len(r.chunk_times) - 1 for r in results)
    assert summary["tbt_ms_p50"] == pytest.approx(np.percentile(tbt, 50) * 1e3)
    assert summary["ttft_ms_p50"] <= summary["ttft_ms_p99"]
    assert summary["ttft_ms_p99"] <= max(r.ttft for r in results) * 1e3 + 1e-9
    assert summary["output_tokens"] == sum(r.max_tokens for r in trace)
    assert summary["throughput_rps"] == pytest.approx(10 / summary["duration_s"])


def test_usage_chunk_only_when_asked(served):  # noqa: F811
    _, client, _ = served
    kw = dict(model=MODEL, prompt="import os", max_tokens=5, temperature=0, stream=True)
    with_usage = list(client.completions.create(**kw, stream_options={"include_usage": True}))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in client.completions.create(**kw))


def test_kclub_loadgen_json(served, capsys):  # noqa: F811
    _, _, port = served
    rc = kclub(["loadgen", "--url", f"http://127.0.0.1:{port}/v1", "--num-requests", "4",
                "--rate", "20", "--pattern", "gamma", "--prompt-len", "4", "8",
                "--max-tokens", "3", "5", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["completed"] == 4 and len(out["per_request"]) == 4
    assert out["trace"] == {"pattern": "gamma", "burstiness": 3.0, "rate": 20.0, "seed": 0}
    assert 12 <= out["output_tokens"] <= 20


def test_kclub_loadgen_without_a_server_names_the_url(capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"             # nothing listens there
    assert kclub(["loadgen", "--url", url, "--num-requests", "2"]) == 2
    err = capsys.readouterr().err
    assert "--url" in err and url in err and "Traceback" not in err
    assert kclub(["loadgen", "--rate", "-1"]) == 2
    assert "rate" in capsys.readouterr().err
