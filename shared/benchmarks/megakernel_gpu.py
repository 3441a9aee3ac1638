"""The mega-kernel on a real GPU (`make gpu-check`; the issue's "when a GPU report exists"):
one greedy decode step of the shipped tiny Llama (fp16) as ONE persistent launch whose workers
run concurrently and wait on event counters, against the same task bodies launched once per
operator, and against torch eager. Tokens and logits are checked against eager first, for every
worker count, since a missing wait on a GPU is a race that the one-worker interpreter run
cannot show. Step time from CUDA events, interleaved rounds (shared.bench.compare); each call
includes the step's one host sync (the starvation flag), which eager does not pay.
"""

from __future__ import annotations

import torch

from shared import bench
from shared.benchmarks import out_of_time, record
from shared.inference.kv_cache import KVCache
from shared.megakernel.runtime import MegakernelDecoder, eager_step
from shared.models import zoo

CONTEXT = 192           # tokens in the cache when the timed step runs (the model's max is 256)
WORKERS = (1, 16, 132)  # 132: one per SM of an H100/H200


def main() -> int:
    if not torch.cuda.is_available():
        print("megakernel_gpu: no CUDA GPU; the CPU side is shared.benchmarks.megakernel")
        return 0
    model = zoo.load("target").to(device="cuda", dtype=torch.float16).eval()
    model.requires_grad_(False)
    c = model.config
    for batch in (1, 8):
        prompt = torch.randint(0, c.vocab_size, (batch, CONTEXT), device="cuda")
        eager_cache = KVCache(c, batch, max_len=CONTEXT + 8, dtype=torch.float16, device="cuda")
        model(prompt, cache=eager_cache)
        eager_cache.lengths += CONTEXT
        tok = prompt[:, -1].contiguous()
        want_logits, want_next = eager_step(model, eager_cache, tok)
        fns = {"eager": lambda c=eager_cache, t=tok: _eager(model, c, t)}
        for workers in WORKERS:
            if out_of_time(reserve_s=10):
                return 0
            dec = MegakernelDecoder(model, batch, max_len=CONTEXT + 8, workers=workers)
            dec.cache.k.copy_(eager_cache.k)
            dec.cache.v.copy_(eager_cache.v)
            for mode in ("persistent", "per_operator"):
                dec.cache.lengths.fill_(CONTEXT)
                logits, nxt = dec.step(tok, mode=mode)
                err = ((logits.double() - want_logits.double()).norm()
                       / want_logits.double().norm()).item()
                record("mega-kernel vs eager, correctness (fp16, CUDA)",
                       {"batch": batch, "workers": workers, "mode": mode,
                        "relative error": err, "same tokens": bool(torch.equal(nxt, want_next)),
                        "launches": dec.launches})
            fns[f"persistent, {workers} workers"] = lambda d=dec, t=tok: _step(d, t, "persistent")
        fns["per operator"] = lambda d=dec, t=tok: _step(d, t, "per_operator")
        t = bench.compare(fns, warmup=3, repeat=30)
        for name, tm in t.items():
            record("decode step latency, tiny Llama fp16 (CUDA events, interleaved)",
                   {"batch": batch, "context": CONTEXT, "path": name,
                    "median us": tm.median_s * 1e6,
                    "speed-up vs eager": str(bench.ratio(t["eager"], tm))})
    return 0


def _step(dec: MegakernelDecoder, tok: torch.Tensor, mode: str):
    dec.cache.lengths.fill_(CONTEXT)        # the same step every round
    return dec.step(tok, mode=mode)


def _eager(model, cache: KVCache, tok: torch.Tensor):
    cache.lengths.fill_(CONTEXT)
    return eager_step(model, cache, tok)


if __name__ == "__main__":
    main()
