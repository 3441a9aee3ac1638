"""`kclub serve` end to end with the official openai client against a real uvicorn server on
127.0.0.1 and a port picked at run time: plain and streaming completions and chat; 16
concurrent greedy requests equal their solo runs (generate() alone); a client that disconnects
mid-stream frees its blocks; bad requests get a 4xx with a message and the server stays up;
max_tokens, stop, seed; SIGTERM to a `kclub serve` process exits 0.

The model is the shipped one-block draft in float64 (as in test_serving_engine.py), so batched
and solo runs agree to ~1e-16 and a greedy tie cannot flip a token between them.
"""

import asyncio
import functools
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import openai
import pytest
import torch
import uvicorn

from shared.inference.generate import generate
from shared.models import zoo
from shared.parallel.launch import free_port
from shared.serving.server import create_app

pytestmark = pytest.mark.timeout(120)
MODEL = "draft-f64"


@functools.cache
def model():
    return zoo.load("draft", train_if_missing=False).double()


def solo(prompt: bytes, max_tokens: int) -> bytes:
    return bytes(generate(model(), torch.tensor([list(prompt)]), max_tokens).tokens[0].tolist())


def wait_for(cond, deadline_s: float, what: str) -> None:
    end = time.monotonic() + deadline_s
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def served():
    app = create_app(model(), MODEL)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "the server to start")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=30,
                           max_retries=0)
    yield app, client, port
    server.should_exit = True
    thread.join(timeout=10)
    assert not thread.is_alive(), "the server did not shut down"


def engine_idle(app) -> bool:
    """No request in flight and every block free or held by the prefix cache (none leaked)."""
    engine = app.state.server.engine
    m, cache = engine.scheduler.manager, engine.scheduler.cache
    cached = cache.num_blocks if cache is not None else 0
    return not engine.has_unfinished() and m.num_free + cached == m.num_blocks and not m.seqs


def test_models_plain_and_streaming_completion(served):
    app, client, _ = served
    assert [m.id for m in client.models.list().data] == [MODEL]
    prompt = b"def __init__(self"
    want = solo(prompt, 12).decode("utf-8", errors="replace")
    plain = client.completions.create(model=MODEL, prompt=prompt.decode(), max_tokens=12,
                                      temperature=0)
    assert plain.choices[0].text == want
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 12
    chunks = list(client.completions.create(model=MODEL, prompt=prompt.decode(), max_tokens=12,
                                            temperature=0, stream=True))
    assert len(chunks) > 2                                 # streamed, not one block
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": "import"}])
    want = solo(b"# user: import\n# assistant:", 8).decode("utf-8", errors="replace")
    assert chat.choices[0].message.content == want
    streamed = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                              stream=True,
                                              messages=[{"role": "user", "content": "import"}])
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want
    wait_for(lambda: engine_idle(app), 10, "the engine to go idle")


def test_sixteen_concurrent_requests_equal_their_solo_runs(served):
    app, _, port = served
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    # printable ASCII so every prompt is a valid str; odd lengths, some sharing a prefix
    prompts = [bytes((torch.randint(32, 127, (int(n),), generator=gen)).tolist())
               for n in torch.randint(3, 40, (16,), generator=gen)]
    prompts[1] = prompts[0] + b"x = 1"
    lengths = [int(n) for n in torch.randint(4, 12, (16,), generator=gen)]

    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                                    timeout=60, max_retries=0)
        async with client:
            return await asyncio.gather(*(client.completions.create(
                model=MODEL, prompt=p.decode(), max_tokens=n, temperature=0)
                for p, n in zip(prompts, lengths, strict=True)))

    history = len(app.state.server.engine.history)
    outs = asyncio.run(all_at_once())
    for p, n, out in zip(prompts, lengths, outs, strict=True):
        assert out.choices[0].text == solo(p, n).decode("utf-8", errors="replace"), p
    # they were really batched together: some step ran more than one request
    assert max(len(s.items) for s in app.state.server.engine.history[history:]) > 1
    wait_for(lambda: engine_idle(app), 10, "the engine to go idle")


def test_disconnect_mid_stream_aborts_and_frees_blocks(served):
    app, client, _ = served
    stream = client.completions.create(model=MODEL, prompt="class Foo:", max_tokens=200,
                                       temperature=0, stream=True)
    first = next(iter(stream))
    stream.close()                                         # the client goes away
    server = app.state.server
    wait_for(lambda: any(r.request_id == first.id for r in server.retired), 10,
             "the request to be aborted")
    r = next(r for r in server.retired if r.request_id == first.id)
    assert r.finish_reason == "abort" and len(r.output) < 200
    wait_for(lambda: engine_idle(app), 10, "its blocks to be freed")


@pytest.mark.parametrize("kwargs, status, words", [
    (dict(model="no-such-model"), 404, "does not exist"),
    (dict(max_tokens=-1), 400, "max_tokens"),
    (dict(prompt="x" * 300), 400, "context"),
])
def test_bad_requests_get_4xx_and_the_server_stays_up(served, kwargs, status, words):
    app, client, _ = served
    args = dict(model=MODEL, prompt="import os", max_tokens=4, temperature=0) | kwargs
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(**args)
    assert err.value.status_code == status
    assert words in err.value.body["message"]
    ok = client.completions.create(model=MODEL, prompt="import os", max_tokens=3,
                                   temperature=0)
    assert len(ok.choices[0].text.encode()) == 3   # ASCII here: one byte, one character


def test_max_tokens_stop_and_seed(served):
    _, client, _ = served
    prompt = b"    def "
    greedy = solo(prompt, 24)
    stop = greedy[5:7].decode()                            # occurs in the greedy output
    cut = greedy.decode()[:greedy.decode().index(stop)]
    for stream in (False, True):
        res = client.completions.create(model=MODEL, prompt=prompt.decode(), max_tokens=24,
                                        temperature=0, stop=[stop], stream=stream)
        chunks = list(res) if stream else [res]
        assert "".join(c.choices[0].text for c in chunks) == cut
        assert chunks[-1].choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model=MODEL, prompt="import ", max_tokens=16,
                                         temperature=1.0, top_p=0.9, seed=s).choices[0].text
               for s in (7, 7, 8)]
    assert sampled[0] == sampled[1]                        # the seed fixes the draws
    assert sampled[0] != sampled[2]      # another seed, other draws (16 bytes at ~1.5 nats)


def test_kclub_serve_exits_0_on_sigterm():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "serve", "--port", str(port),
                             "--model", "draft"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        def up():
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                    return True
            except OSError:
                return False
        wait_for(up, 60, "kclub serve to answer")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
