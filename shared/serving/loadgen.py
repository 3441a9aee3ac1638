"""`kclub loadgen`: replay an arrival trace against an OpenAI-compatible server and report what
its clients saw — time to first token (TTFT), time between tokens (TBT) and throughput.

The trace is open-loop, as serving benchmarks run them (vLLM's benchmark_serving, Sarathi-Serve
§5): request i is sent at its arrival time whether or not earlier ones have finished, so a
server that falls behind builds a queue and its latencies show it. Gaps between arrivals are
gamma-distributed with mean 1/rate: `burstiness` is their coefficient of variation, 1 is a
Poisson process, above 1 requests come in bursts separated by lulls (shape 1/cv²).

Every request streams (`stream=True`), so TTFT is the wall time from sending to the first
chunk carrying text and TBT the gaps between such chunks: what a user watching the text would
see, network and HTTP included. Output tokens come from the stream's final usage chunk
(`stream_options={"include_usage": True}`, which `kclub serve` sends); without one, from the
number of text chunks. Prompts are windows of the Python standard library's source, the text
the tiny Llama was trained on, seeded like the arrivals.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np

PATTERNS = ("poisson", "gamma")


@dataclass(frozen=True)
class TraceRequest:
    arrival: float        # seconds after the start of the run
    prompt: str
    max_tokens: int


def arrivals(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """n arrival times (s) of a renewal process with mean gap 1/rate and gap CV `burstiness`;
    the first request arrives at 0."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_requests must be an int >= 1, got {n!r}")
    if not rate > 0 or not np.isfinite(rate):
        raise ValueError(f"rate must be a finite number > 0 (requests/s), got {rate!r}")
    if not burstiness > 0 or not np.isfinite(burstiness):
        raise ValueError(f"burstiness must be a finite number > 0, got {burstiness!r}")
    shape = 1.0 / burstiness**2                 # gamma: CV = 1/sqrt(shape), mean shape·scale
    gaps = np.random.default_rng(seed).gamma(shape, 1.0 / (rate * shape), n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def make_trace(n: int, rate: float, *, burstiness: float = 1.0, prompt_len=(16, 64),
               max_tokens=(16, 64), seed: int = 0) -> list[TraceRequest]:
    """A seeded trace: arrivals as `arrivals`, prompt bytes and max_tokens uniform in the
    inclusive ranges given."""
    for name, (lo, hi) in (("prompt_len", prompt_len), ("max_tokens", max_tokens)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name} must be a range 1 <= low <= high, got {(lo, hi)}")
    times = arrivals(n, rate, burstiness, seed)
    rng = np.random.default_rng(seed + 1)
    # ASCII only, so a window of k characters is k byte tokens and a valid string
    from shared.data import corpus_text  # here, not at the top: shared.data loads torch

    text = corpus_text(1 << 20).encode("ascii", errors="ignore").decode()
    out = []
    for t in times:
        k = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
        start = int(rng.integers(0, len(text) - k))
        out.append(TraceRequest(float(t), text[start:start + k],
                                int(rng.integers(max_tokens[0], max_tokens[1] + 1))))
    return out


@dataclass
class Result:
    """What one client saw; times in seconds of the run's clock."""
    sent: float
    chunk_times: list[float] = field(default_factory=list)   # chunks that carried text
    output_tokens: int = 0
    text: str = ""
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def tbt(self) -> list[float]:
        return list(np.diff(self.chunk_times))


async def _one(client, model: str, req: TraceRequest, t0: float, temperature: float,
               seed: int | None) -> Result:
    await asyncio.sleep(max(0.0, t0 + req.arrival - time.perf_counter()))
    res = Result(time.perf_counter() - t0)
    chunks = 0
    try:
        stream = await client.completions.create(
            model=model, prompt=req.prompt, max_tokens=req.max_tokens, temperature=temperature,
            seed=seed, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                res.chunk_times.append(time.perf_counter() - t0)
                res.text += chunk.choices[0].text
                chunks += 1
            if chunk.usage is not None:
                res.output_tokens = chunk.usage.completion_tokens
    except Exception as e:          # one failed request is a row of the report, not a crash
        res.error = f"{type(e).__name__}: {e}"
    res.output_tokens = res.output_tokens or chunks
    return res


def summarize(results: list[Result], duration_s: float) -> dict:
    """p50/p99 TTFT and TBT (ms), throughput (requests/s, output tokens/s) over the run."""
    ok = [r for r in results if r.error is None]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tbt = [g for r in ok for g in r.tbt]

    def pct(xs, q):
        return float(np.percentile(xs, q) * 1e3) if xs else None

    return {"requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
            "duration_s": duration_s,
            "throughput_rps": len(ok) / duration_s,
            "output_tokens": sum(r.output_tokens for r in ok),
            "output_tokens_per_s": sum(r.output_tokens for r in ok) / duration_s,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "tbt_ms_p50": pct(tbt, 50), "tbt_ms_p99": pct(tbt, 99),
            "errors": sorted({r.error for r in results if r.error})[:5]}


class Unreachable(Exception):
    """No server answered at the URL."""


async def run(url: str, trace: list[TraceRequest], *, model: str | None = None,
              temperature: float = 0.0, seed: int | None = None, timeout_s: float = 120.0,
              progress: bool = True) -> tuple[dict, list[Result]]:
    """Replay `trace` against the server at `url` (…/v1); -> (summary, per-request results).
    The model defaults to the server's first. Raises Unreachable if nothing answers."""
    try:
        import openai
    except ImportError as e:        # a dev dependency today: say what to install
        raise ValueError("kclub loadgen needs the openai client: pip install 'openai>=3.57'") \
            from e
    from tqdm.auto import tqdm

    client = openai.AsyncOpenAI(base_url=url, api_key="loadgen", timeout=timeout_s,
                                max_retries=0)
    async with client:
        try:
            models = [m.id async for m in client.models.list()]
        except openai.APIConnectionError as e:
            raise Unreachable(f"no server answered at --url {url} ({e}); start one with "
                              "`kclub serve` or pass the right --url") from e
        if model is None:
            if not models:
                raise ValueError(f"the server at {url} lists no models: pass --model")
            model = models[0]
        bar = tqdm(total=len(trace), unit="req", desc="loadgen", disable=not progress)

        async def tracked(req):
            r = await _one(client, model, req, t0, temperature, seed)
            bar.update()
            return r

        t0 = time.perf_counter()
        results = await asyncio.gather(*(tracked(req) for req in trace))
        duration = time.perf_counter() - t0
        bar.close()
    summary = summarize(results, duration)
    summary["model"], summary["url"] = model, url
    return summary, results


def format_summary(s: dict) -> str:
    def ms(x):
        return "-" if x is None else f"{x:.1f}"

    lines = [f"{s['completed']}/{s['requests']} requests completed in {s['duration_s']:.2f} s "
             f"({s['model']} at {s['url']})",
             f"throughput     {s['throughput_rps']:.2f} requests/s, "
             f"{s['output_tokens_per_s']:.1f} output tokens/s ({s['output_tokens']} tokens)",
             f"TTFT (ms)      p50 {ms(s['ttft_ms_p50'])}   p99 {ms(s['ttft_ms_p99'])}",
             f"TBT  (ms)      p50 {ms(s['tbt_ms_p50'])}   p99 {ms(s['tbt_ms_p99'])}"]
    lines += [f"error: {e}" for e in s["errors"]]
    return "\n".join(lines)


def main(args) -> int:
    """The `kclub loadgen` command; 2 on bad arguments or no server, 1 if a request failed."""
    import sys

    try:
        burst = 1.0 if args.pattern == "poisson" else args.burstiness
        trace = make_trace(args.num_requests, args.rate, burstiness=burst,
                           prompt_len=tuple(args.prompt_len), max_tokens=tuple(args.max_tokens),
                           seed=args.seed)
        summary, results = asyncio.run(run(args.url, trace, model=args.model,
                                           temperature=args.temperature,
                                           seed=args.sampling_seed, timeout_s=args.timeout,
                                           progress=not args.json))
    except (Unreachable, ValueError) as e:
        print(f"kclub loadgen: {e}", file=sys.stderr)
        return 2
    summary["trace"] = {"pattern": args.pattern, "burstiness": burst, "rate": args.rate,
                        "seed": args.seed}
    if args.json:
        summary["per_request"] = [asdict(r) | {"ttft": r.ttft} for r in results]
        print(json.dumps(summary, indent=1))
    else:
        print(format_summary(summary))
    return 1 if summary["failed"] else 0


def add_arguments(p) -> None:
    """The `kclub loadgen` options (shared/cli.py calls this)."""
    p.add_argument("--url", default="http://127.0.0.1:8000/v1",
                   help="the server's OpenAI base URL (default: kclub serve's)")
    p.add_argument("--model", help="default: the first model the server lists")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second")
    p.add_argument("--pattern", choices=PATTERNS, default="poisson",
                   help="poisson, or gamma gaps with CV --burstiness (bursts and lulls)")
    p.add_argument("--burstiness", type=float, default=3.0,
                   help="CV of the gaps for --pattern gamma (1 = Poisson)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"))
    p.add_argument("--max-tokens", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"))
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="seeds the trace")
    p.add_argument("--sampling-seed", type=int, help="sent as each request's seed")
    p.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    p.add_argument("--json", action="store_true", help="JSON, per request too; no progress bar")
