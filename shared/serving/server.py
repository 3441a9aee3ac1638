"""`kclub serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on the serving engine.

One background task owns the engine: it runs `Engine.step` in a worker thread (so the event loop
keeps answering HTTP while the model computes) under a lock that request handlers also take to
add a request, so the engine is never touched by two threads at once. Each request gets an
asyncio queue; the engine's `on_token` callback (called in the worker thread) hands every token
to the loop with call_soon_threadsafe. A client that goes away mid-stream has its request aborted
between two steps, which frees its blocks.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, with `stream` as
server-sent events in OpenAI's chunk format. Supported fields: max_tokens (default 16),
temperature (default 1, OpenAI's), top_p, seed, stop, and `top_k` as an extension; n must be 1.

Tokens are bytes (the tiny Llama's vocabulary is 256), decoded as UTF-8 with replacement. The
model was trained only on the Python standard library's source, so there is no real chat
format: the chat template writes each message as a Python comment line `# <role>: <content>`
and leaves the model to continue after `# assistant:`. It is a demonstration, not an assistant.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import json
import signal
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from shared.models.llama import Llama
from shared.serving.engine import Engine
from shared.serving.request import SamplingParams
from shared.serving.scheduler import SchedulerConfig

# Room for 16 full-context requests of 256 tokens at once before preemption starts.
DEFAULT_CONFIG = SchedulerConfig(num_blocks=256, block_size=16, token_budget=128,
                                 max_num_seqs=32)


# Steps kept in engine.history for inspection: a server runs forever, its history must not grow.
HISTORY_STEPS = 4096


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param=None, code=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": kind, "param": param, "code": code}})


class _Body(BaseModel):
    """What completions and chat completions share: the model and how to sample."""
    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None   # {"include_usage": true}: a last chunk with usage
    n: int = 1


class CompletionBody(_Body):
    prompt: str | list[int]
    max_tokens: int | None = 16


class Message(BaseModel):
    role: str
    content: str


class ChatBody(_Body):
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None   # the newer name for the same limit


def chat_prompt(messages: list[Message]) -> str:
    return "".join(f"# {m.role}: {m.content}\n" for m in messages) + "# assistant:"


class EngineServer:
    """The engine behind a lock, stepped by one background task; see the module docstring."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.retired: collections.deque = collections.deque(maxlen=1024)  # for inspection
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._aborts: set = set()

    async def run(self) -> None:
        engine = self.engine
        while True:
            for rid in self._aborts:      # between steps: no step is running now
                if rid in engine.requests and not engine.requests[rid].finished:
                    engine.abort(rid)
            self._aborts.clear()
            self._retire()
            if not engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            async with self._lock:
                step = await asyncio.to_thread(engine.step)
            if step is None:              # arrivals are stamped "now": only the next step
                await asyncio.sleep(0.001)

    def _retire(self) -> None:
        """Finished requests leave engine.requests (which would otherwise grow forever)."""
        done = [rid for rid, r in self.engine.requests.items() if r.finished]
        for rid in done:
            self.retired.append(self.engine.requests.pop(rid))

    async def submit(self, prompt, params: SamplingParams):
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        rid = f"cmpl-{uuid.uuid4().hex}"

        def on_token(r, token):           # worker thread: r.finished is already final here
            loop.call_soon_threadsafe(queue.put_nowait, (token, r.finished))

        async with self._lock:
            try:
                r = self.engine.add_request(prompt, params, request_id=rid, on_token=on_token)
            except (ValueError, TypeError) as e:
                raise APIError(400, str(e), "prompt") from e
        self._wake.set()
        return r, queue

    def abort(self, rid) -> None:
        self._aborts.add(rid)
        self._wake.set()


def holdback(out: bytes, stops: tuple[bytes, ...]) -> int:
    """Bytes at the end of `out` that may be the start of a stop sequence: not yet sent."""
    return max((k for s in stops for k in range(1, len(s)) if out.endswith(s[:k])), default=0)


async def text_pieces(server: EngineServer, r, queue):
    """The request's text as it grows, stops cut (OpenAI does not return the stop sequence);
    aborts the request if the consumer goes away first."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out, sent = bytearray(), 0
    try:
        while True:
            token, finished = await queue.get()
            out.append(token)
            end = len(r.text) if finished else len(out) - holdback(bytes(out), r.params.stop)
            if end > sent:
                piece = decoder.decode(bytes(out[sent:end]), final=finished)
                sent = end
            else:
                piece = decoder.decode(b"", final=finished)
            if piece or finished:
                yield piece, finished
            if finished:
                return
    finally:
        if not r.finished:
            server.abort(r.request_id)


def sampling_params(body, max_tokens: int) -> SamplingParams:
    if body.n != 1:
        raise APIError(400, f"n must be 1, got {body.n}", "n")
    stop = () if body.stop is None else (body.stop,) if isinstance(body.stop, str) else body.stop
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                              top_p=body.top_p, top_k=body.top_k, stop=tuple(stop),
                              seed=body.seed)
    except ValueError as e:
        raise APIError(400, str(e), str(e).split()[0]) from e


def create_app(model: Llama, model_name: str, config: SchedulerConfig | None = None) -> FastAPI:
    server = EngineServer(Engine(model, config or DEFAULT_CONFIG, clock="wall",
                                 history_limit=HISTORY_STEPS))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        task = asyncio.create_task(server.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = FastAPI(title="kclub serve", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:])
        return error_response(400, f"{where}: {first['msg']}", where or None)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "kernel-club"}]}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server has "
                           f"{model_name!r}", "model", "model_not_found")

    async def respond(body, prompt, max_tokens, chat: bool):
        check_model(body.model)
        r, queue = await server.submit(prompt, sampling_params(body, max_tokens))
        created, obj = int(time.time()), "chat.completion" if chat else "text_completion"
        head = {"id": r.request_id, "created": created, "model": model_name}

        def choice(text, reason):
            if chat:
                return {"index": 0, "message": {"role": "assistant", "content": text},
                        "finish_reason": reason}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}

        def usage():
            return {"prompt_tokens": len(r.prompt), "completion_tokens": len(r.output),
                    "total_tokens": len(r.prompt) + len(r.output)}

        if not body.stream:
            pieces = [p async for p, _ in text_pieces(server, r, queue)]
            return {**head, "object": obj, "choices": [choice("".join(pieces),
                                                              r.finish_reason)],
                    "usage": usage()}

        def chunk(text, reason, first=False):
            if chat:
                delta = ({"role": "assistant", "content": text} if first
                         else {"content": text} if text else {})
                c = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                c = choice(text, reason)
            data = {**head, "object": obj + (".chunk" if chat else ""), "choices": [c]}
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            if chat:
                yield chunk("", None, first=True)
            async for piece, finished in text_pieces(server, r, queue):
                if piece:
                    yield chunk(piece, None)
                if finished:
                    yield chunk("", r.finish_reason)
            if (body.stream_options or {}).get("include_usage"):   # OpenAI's last usage chunk
                data = {**head, "object": obj + (".chunk" if chat else ""), "choices": [],
                        "usage": usage()}
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        return await respond(body, body.prompt, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        limit = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
        return await respond(body, chat_prompt(body.messages), 16 if limit is None else limit,
                             chat=True)

    return app


def serve(host: str = "127.0.0.1", port: int = 8000, model: str = "target") -> int:
    import uvicorn

    from shared.models import zoo

    app = create_app(zoo.load(model, train_if_missing=False), model)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port,
                                           timeout_graceful_shutdown=5))
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal against the
    # handlers it found; no-op handlers make that re-raise harmless, so a clean stop exits 0.
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
    server.run()
    return 0
