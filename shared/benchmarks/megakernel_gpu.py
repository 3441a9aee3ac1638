"""The mega-kernel on a real GPU (`make gpu-check`; the issue's "when a GPU report exists"):
one greedy decode step as ONE persistent launch whose workers run concurrently and wait on
event counters, against the same task bodies launched once per operator, and against torch
eager. Two models: the shipped tiny Llama (fp16; everything launch-bound) and a Qwen3-8B-like
stack (Qwen3-8B's widths and vocabulary, random trained-scale weights, QWEN_LAYERS layers,
fp16; the task bodies' weight streaming decides it), each beside the simulator's prediction
for that graph on this card. Tokens and logits are checked against eager first, for every
worker count, since a missing wait on a GPU is a race that the one-worker interpreter run
cannot show. Step time from CUDA events, interleaved rounds (shared.bench.compare, with an
interval on each speed-up); each call includes the step's one host sync (the starvation flag),
which eager does not pay.
"""

from __future__ import annotations

import dataclasses

import torch

from shared import bench
from shared.benchmarks import out_of_time, record
from shared.benchmarks.megakernel import QWEN3_8B, predicted
from shared.inference.kv_cache import KVCache
from shared.megakernel import simulate as sim
from shared.megakernel.runtime import MegakernelDecoder, eager_step
from shared.models import zoo
from shared.models.llama import Llama

CONTEXT = 192           # tiny Llama: tokens in the cache when the timed step runs (max 256)
WORKERS = (1, 16, 132)  # 132: one per SM of an H100/H200
QWEN_CONTEXT = 512      # the Qwen3-8B-like probe's context (docs/gpu-runs/2026-11-27-h200)
QWEN_LAYERS = 2         # 2 layers: ~1.9 GB of weights a step (lm-head 1.2 GB), fits the budget


def main() -> int:
    if not torch.cuda.is_available():
        print("megakernel_gpu: no CUDA GPU; the CPU side is shared.benchmarks.megakernel")
        return 0
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    model = zoo.load("target").to(device="cuda", dtype=torch.float16).eval()
    model.requires_grad_(False)
    for batch in (1, 8):
        if not _rows(model, "tiny Llama", batch, CONTEXT, WORKERS, repeat=30):
            return 0
    del model
    # ~15 s more: a second kernel build (head_dim 128: ~7 s), ~2 GB of weights, and the B = 8
    # graph's validation (~7 s on a 2-core CPU; B = 1's under 1 s), which is checked first
    if out_of_time(reserve_s=12):
        return 0
    cfg = dataclasses.replace(QWEN3_8B, n_layers=QWEN_LAYERS, max_seq_len=QWEN_CONTEXT + 8)
    torch.manual_seed(0)
    with torch.device("cuda"):
        qwen = Llama(cfg).half().eval().requires_grad_(False)
    for p in qwen.parameters():   # trained-like norm scales; the linears keep their 1/√fan-in
        if p.ndim == 1:
            p.data.uniform_(0.5, 1.5)
    name = f"Qwen3-8B-like ({QWEN_LAYERS} layers)"
    for batch in (1, 8):
        if not _rows(qwen, name, batch, QWEN_CONTEXT, (sms,), repeat=10):
            return 0
    return 0


def _rows(model: Llama, name: str, batch: int, context: int, workers_list, *, repeat: int
          ) -> bool:
    """Check then time one (model, batch); False when out of time."""
    c = model.config
    prompt = torch.randint(0, c.vocab_size, (batch, context), device="cuda")
    eager_cache = KVCache(c, batch, max_len=context + 8, dtype=torch.float16, device="cuda")
    model(prompt, cache=eager_cache)
    eager_cache.lengths += context
    tok = prompt[:, -1].contiguous()
    want_logits, want_next = eager_step(model, eager_cache, tok)
    fns = {"eager": lambda cc=eager_cache, t=tok: _eager(model, cc, t, context)}
    for workers in workers_list:
        if out_of_time(reserve_s=10):
            return False
        dec = MegakernelDecoder(model, batch, max_len=context + 8, workers=workers)
        dec.cache.k.copy_(eager_cache.k)
        dec.cache.v.copy_(eager_cache.v)
        for mode in ("persistent", "per_operator"):
            dec.cache.lengths.fill_(context)
            logits, nxt = dec.step(tok, mode=mode)
            err = ((logits.double() - want_logits.double()).norm()
                   / want_logits.double().norm()).item()
            record(f"mega-kernel vs eager, correctness ({name}, fp16, CUDA)",
                   {"batch": batch, "workers": workers, "mode": mode, "relative error": err,
                    "same tokens": bool(torch.equal(nxt, want_next)),
                    "launches": dec.launches})
        fns[f"persistent, {workers} workers"] = (
            lambda d=dec, t=tok: _step(d, t, "persistent", context))
    fns["per operator"] = lambda d=dec, t=tok: _step(d, t, "per_operator", context)
    if out_of_time(reserve_s=5):
        return False
    t = bench.compare(fns, warmup=3, repeat=repeat)
    gpu = sim.GPUModel("H200" if "H200" in torch.cuda.get_device_name() else "H100 SXM",
                       "fp16")
    pred = predicted(batch, context, gpu, c)   # the simulator's graph: 64-column tiles, as here
    counted = sum(task["bytes"] for task in dec.graph["tasks"])   # compulsory bytes a step
    for path, tm in t.items():
        row = {"batch": batch, "context": context, "path": path,
               "median us": tm.median_s * 1e6,
               "speed-up vs eager": str(bench.ratio(t["eager"], tm)),
               "counted GB/s": counted / tm.median_s / 1e9}
        key = {f"persistent, {gpu.sms} workers": "persistent_ms",
               "per operator": "per_op_ms"}.get(path)
        if key:   # the simulator models one worker per SM
            row[f"predicted us ({gpu.hw})"] = pred[key] * 1e3
        record(f"decode step latency, {name} fp16 (CUDA events, interleaved)", row)
    return True


def _step(dec: MegakernelDecoder, tok: torch.Tensor, mode: str, context: int):
    dec.cache.lengths.fill_(context)        # the same step every round
    return dec.step(tok, mode=mode)


def _eager(model, cache: KVCache, tok: torch.Tensor, context: int):
    cache.lengths.fill_(context)
    return eager_step(model, cache, tok)


if __name__ == "__main__":
    main()
