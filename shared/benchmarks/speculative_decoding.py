"""Speculative decoding: the measurements behind the lab, and `kclub bench speculative-decoding`.

On this CPU (B = 1, greedy, the paper's setting): wall-clock speed-up over the target's own
autoregressive decoding for γ = 1..8 and both drafters, beside the paper's model
(1 − α^(γ+1)) / ((1 − α)(γc + 1)) with the measured α and c; transformers' assisted generation
on the same weights and prompts. Anywhere: the sampling kernels' memory traffic, counted in
Triton's interpreter at a real vocabulary, and what it costs on named GPUs next to a forward.
On a CUDA machine the same sweep runs on the GPU with the Triton kernels.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from kernels.device import INTERPRET, gpu_available
from kernels.sampling import gumbel_sample, speculative_accept
from shared import bench, iocount, roofline
from shared.benchmarks import gpu_hardware, out_of_time, pct_of_roofline, record
from shared.data import train_val_tokens
from shared.device import pick
from shared.inference.generate import generate
from shared.inference.kv_cache import KVCache
from shared.inference.speculative import Drafter, speculative_generate
from shared.inference.stats import alpha_needed, best_gamma, expected_tokens, model_speedup
from shared.models import zoo

GAMMAS = tuple(range(1, 9))


@dataclass
class Setup:
    target: torch.nn.Module
    drafters: dict[str, Drafter]
    prompts: list[torch.Tensor]  # each int64 [1, P]
    n_new: int


def setup(n_prompts: int | None = None, prompt_len: int = 64, n_new: int | None = None) -> Setup:
    """The zoo's target and both drafters; prompts cut from held-out stdlib text."""
    device = "cuda" if gpu_available() else "cpu"
    target, draft = zoo.load("target").to(device), zoo.load("draft").to(device)
    exit_layer = zoo.RECIPES["target"][1].exit_layer
    _, val = train_val_tokens()
    val = val.to(device)
    n_prompts = n_prompts or pick(ci=3, full=8)
    stride = len(val) // n_prompts
    prompts = [val[i * stride:i * stride + prompt_len][None] for i in range(n_prompts)]
    return Setup(target, {"draft model": Drafter(draft),
                          "self-draft": Drafter(target, n_layers=exit_layer)},
                 prompts, n_new or pick(ci=96, full=160))


def cost_ratio(target, drafter: Drafter, context: int = 128, repeat: int = 40) -> dict:
    """c = (one drafter forward) / (one target forward), one token at B = 1 with a KV cache
    holding `context` tokens: the paper's cost coefficient c (§3)."""
    def step(model, n_layers):
        device = model.lm_head.weight.device
        cache = KVCache(model.config, 1, n_layers=n_layers, device=device)
        cache.set_lengths(torch.tensor([context], device=device))
        token = torch.tensor([[10]], device=device)
        return lambda: model(token, cache=cache, n_layers=n_layers)

    with torch.no_grad():
        t = bench.compare({"target": step(target, None),
                           "drafter": step(drafter.model, drafter.n_layers)}, repeat=repeat)
    return {"c": t["drafter"].p20_s / t["target"].p20_s,
            "target_ms": t["target"].p20_s * 1e3, "drafter_ms": t["drafter"].p20_s * 1e3}


def run_ar(s: Setup) -> list[torch.Tensor]:
    return [generate(s.target, p, s.n_new).tokens for p in s.prompts]


def run_spec(s: Setup, drafter: Drafter, gamma: int, temperature: float = 0.0, seed: int = 0):
    # the sampling kernels draw their uniforms on the model's device, with this generator
    gen = torch.Generator(device=s.target.lm_head.weight.device).manual_seed(seed)
    return [speculative_generate(s.target, drafter, p, s.n_new, gamma=gamma,
                                 temperature=temperature, generator=gen) for p in s.prompts]


def merged_acceptance(runs) -> tuple[float, float, float, torch.Tensor]:
    """(α measured, α predicted = mean Σmin(p,q), tokens per target call, acceptance by
    position) pooled over the prompts' runs."""
    head = runs[0]
    pooled = type(head)(tokens=head.tokens, target_calls=0, gamma=head.gamma,
                        accepted=[a for r in runs for a in r.accepted],
                        overlap=[o for r in runs for o in r.overlap],
                        active=[a for r in runs for a in r.active])
    alpha, alpha_pred = pooled.acceptance()
    return alpha, alpha_pred, pooled.tokens_per_call(), pooled.acceptance_by_position()


def sweep(s: Setup, gammas=GAMMAS, repeat: int | None = None) -> list[dict]:
    """Per drafter and γ: greedy output check, α, tokens per call, measured and model speed-up.
    Every γ of a drafter is timed interleaved with the autoregressive baseline. Times are the
    20th percentile of the repeats: on a shared CPU other work only ever adds time, so a low
    percentile estimates the undisturbed run better than the median."""
    repeat = repeat or pick(ci=3, full=10)
    reference = run_ar(s)
    rows = []
    with torch.no_grad():
        for name, drafter in s.drafters.items():
            c = cost_ratio(s.target, drafter)["c"]
            fns = {"ar": lambda: run_ar(s)}
            fns.update({g: (lambda g=g, d=drafter: run_spec(s, d, g)) for g in gammas})
            times = bench.compare(fns, warmup=1, repeat=repeat)
            for g in gammas:
                runs = run_spec(s, drafter, g)
                alpha, _, tpc, by_pos = merged_acceptance(runs)
                rows.append({
                    "drafter": name, "gamma": g, "c": c, "alpha": alpha,
                    "tokens_per_call": tpc, "tokens_per_call_model": expected_tokens(alpha, g),
                    "speedup": times["ar"].p20_s / times[g].p20_s,
                    "speedup_model": model_speedup(alpha, g, c),
                    "identical": all(torch.equal(r.tokens, ref)
                                     for r, ref in zip(runs, reference, strict=True)),
                    "acceptance_by_position": by_pos.tolist(),
                    "ms_per_token": times[g].p20_s * 1e3 / (s.n_new * len(s.prompts)),
                    "ar_ms_per_token": times["ar"].p20_s * 1e3 / (s.n_new * len(s.prompts)),
                })
    return rows


def sampled_acceptance(s: Setup, gamma: int, temperature: float = 1.0) -> dict[str, tuple]:
    """At T = 1 per drafter: (α measured, α predicted = E[Σ min(p, q)]) — the paper's §3."""
    out = {}
    with torch.no_grad():
        for name, drafter in s.drafters.items():
            out[name] = merged_acceptance(run_spec(s, drafter, gamma, temperature, seed=1))[:3]
    return out


def transformers_side_by_side(s: Setup, gammas: dict[str, int], repeat: int | None = None):
    """Ours vs transformers' generate() on the same weights and prompts, greedy, B = 1:
    autoregressive, and assisted generation with each drafter at its γ (constant schedule,
    no confidence cut-off, so both run the same algorithm). Returns tokens/s and whether the
    outputs are identical to our target's greedy output."""
    from transformers.utils import logging

    from shared.models.hf import to_hf

    logging.set_verbosity_error()
    repeat = repeat or pick(ci=3, full=5)
    hf_target = to_hf(s.target)
    hf_draft = to_hf(s.drafters["draft model"].model)
    exit_layer = s.drafters["self-draft"].n_layers

    def hf_run(**kw):
        outs = []
        for p in s.prompts:
            o = hf_target.generate(p, attention_mask=torch.ones_like(p), do_sample=False,
                                   max_new_tokens=s.n_new, min_new_tokens=s.n_new, **kw)
            outs.append(o[:, p.shape[1]:])
        return outs

    def assisted(name):
        kw = dict(num_assistant_tokens=gammas[name], num_assistant_tokens_schedule="constant",
                  assistant_confidence_threshold=0.0)
        if name == "draft model":
            return lambda: hf_run(assistant_model=hf_draft, **kw)
        return lambda: hf_run(assistant_early_exit=exit_layer, **kw)

    fns = {"ours autoregressive": lambda: run_ar(s), "transformers autoregressive": hf_run}
    for name, drafter in s.drafters.items():
        fns[f"ours speculative, {name}"] = (
            lambda d=drafter, g=gammas[name]: [r.tokens for r in run_spec(s, d, g)])
        fns[f"transformers assisted, {name}"] = assisted(name)
    reference = run_ar(s)
    n_tokens = s.n_new * len(s.prompts)
    rows = {}
    with torch.no_grad():
        times = bench.compare(fns, warmup=1, repeat=repeat)
        for name, fn in fns.items():
            outs = fn()
            rows[name] = {"tokens_per_s": n_tokens / times[name].p20_s,
                          "identical": all(torch.equal(o, r)
                                           for o, r in zip(outs, reference, strict=True))}
    return rows


def batched_speedup(s: Setup, drafter: Drafter, gamma: int, batch: int = 4,
                    repeat: int | None = None) -> dict:
    """The same at batch B: every sequence accepts its own number of drafts per round."""
    repeat = repeat or pick(ci=2, full=5)
    prompt = torch.cat([s.prompts[i % len(s.prompts)] for i in range(batch)])
    with torch.no_grad():
        ref = generate(s.target, prompt, s.n_new).tokens
        spec = speculative_generate(s.target, drafter, prompt, s.n_new, gamma=gamma)
        t = bench.compare({"ar": lambda: generate(s.target, prompt, s.n_new),
                           "spec": lambda: speculative_generate(s.target, drafter, prompt,
                                                                s.n_new, gamma=gamma)},
                          warmup=1, repeat=repeat)
    return {"batch": batch, "speedup": t["ar"].p20_s / t["spec"].p20_s,
            "identical": torch.equal(spec.tokens, ref), "alpha": spec.acceptance()[0]}


def round_costs(row: dict) -> dict:
    """Where a round's time goes, for one sweep row: measured ms per round against the model's
    (γc + 1) target forwards; the ratio is the per-round work the model leaves out (sampling,
    the rule, cache bookkeeping) plus the verify forward costing more than a one-token one."""
    actual = row["ms_per_token"] * row["tokens_per_call"]
    model = row["ar_ms_per_token"] * (row["gamma"] * row["c"] + 1)
    best = best_gamma(row["alpha"], row["c"])
    return {"round_ms": actual, "model_round_ms": model, "overhead": actual / model,
            "model_best_gamma": best, "model_best": model_speedup(row["alpha"], best, row["c"]),
            "alpha_for_2x": alpha_needed(2.0, best, row["c"])}


def memory_bound_c(drafter: Drafter, target) -> float:
    """c on a GPU decoding at small batch, where a forward costs its weight bytes: the drafter's
    parameters (embedding, its blocks, head) over the target's."""
    m = drafter.model
    blocks = m.layers if drafter.n_layers is None else m.layers[:drafter.n_layers]
    own = sum(p.numel() for p in blocks.parameters()) + m.embed.weight.numel() + \
        m.lm_head.weight.numel() + m.norm.weight.numel()
    return own / target.num_params()


def kernel_traffic(batch: int = 2, gamma: int = 4, vocab: int = 32000) -> dict:
    """Bytes the sampling kernels move at a real vocabulary (Llama 2's 32000), counted in the
    interpreter, next to the analytic count and the bytes of one 7B-parameter fp16 forward."""
    if not INTERPRET:
        raise RuntimeError("counting bytes needs Triton's interpreter: set KC_INTERPRET=1")
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(batch, gamma, vocab, generator=g), -1)
    p = torch.softmax(torch.randn(batch, gamma + 1, vocab, generator=g), -1)
    x = torch.multinomial(q.reshape(-1, vocab), 1, generator=g).reshape(batch, gamma)
    with iocount.count() as accept_io:
        n, _ = speculative_accept(x, q, p, generator=g)
    with iocount.count() as sample_io:
        gumbel_sample(torch.randn(batch, vocab), generator=g)
    # accept, per row: γ token ids (8 B) + γ gathered p, q and γ uniforms (4 B each); the p_n row
    # and the uniforms row (2V · 4 B), the q_n row only if a draft was rejected (V · 4 B); two
    # int64 outputs. Sample: logits + uniforms (2V · 4 B) + one int64 out.
    rejected = int((n < gamma).sum())
    accept_model = batch * (gamma * 20 + 2 * vocab * 4 + 16) + rejected * vocab * 4
    return {"accept_bytes": accept_io.bytes_total, "accept_bytes_model": accept_model,
            "sample_bytes": sample_io.bytes_total, "sample_bytes_model": batch * (8 * vocab + 8),
            "forward_7b_bytes": 7e9 * 2}


def gpu_prediction(traffic: dict, hw: str = "H100 SXM") -> dict:
    """Roofline time of the accept kernel and of a memory-bound 7B fp16 decode step."""
    accept = roofline.predict(0.0, traffic["accept_bytes"], hw, "fp16")
    forward = roofline.predict(2 * 7e9, traffic["forward_7b_bytes"], hw, "fp16")
    return {"hardware": hw, "accept_us": accept.time_s * 1e6, "forward_ms": forward.time_s * 1e3,
            "accept_fraction": accept.time_s / forward.time_s}


def gpu_main(repeat: int = 3) -> int:
    """On a CUDA GPU, greedy, B = 1: per drafter, γ chosen by the paper's model from α and c
    measured in a separate pass, then ours speculative against our autoregressive decoding,
    interleaved; tokens/s and the % of the memory roofline (every weight read once per target
    call). Then transformers' generate on the same weights, when transformers is installed."""
    s = setup()
    hw, n_tokens = gpu_hardware(), s.n_new * len(s.prompts)
    weight_bytes = 4 * s.target.num_params()   # fp32 weights, read once per target call
    gammas = {}
    with torch.no_grad():
        for name, drafter in s.drafters.items():
            if out_of_time(reserve_s=20):
                break
            c = cost_ratio(s.target, drafter)["c"]
            alpha = merged_acceptance(run_spec(s, drafter, 4))[0]      # the choosing pass
            gammas[name] = g = best_gamma(alpha, c)
            t = bench.compare({"ar": lambda: run_ar(s),
                               "spec": lambda d=drafter, g=g: run_spec(s, d, g)},
                              warmup=1, repeat=repeat)
            runs = run_spec(s, drafter, g)                               # the measured pass
            _, _, tpc, _ = merged_acceptance(runs)
            calls = n_tokens / tpc                                       # target calls made
            record("speculative decoding, greedy, B = 1 (CUDA)", {
                "drafter": name, "gamma": g, "alpha": alpha, "c": c,
                "ar tokens/s": n_tokens / t["ar"].p20_s,
                "spec tokens/s": n_tokens / t["spec"].p20_s,
                "speedup": t["ar"].p20_s / t["spec"].p20_s,
                "model speedup": model_speedup(alpha, g, c),
                "ar % roofline": pct_of_roofline(t["ar"].p20_s / n_tokens, 0.0, weight_bytes,
                                                 hw, "fp32"),
                "spec % roofline": pct_of_roofline(t["spec"].p20_s / calls, 0.0, weight_bytes,
                                                   hw, "fp32"),
                "hardware": hw})
    if importlib.util.find_spec("transformers") is None:
        print("note: transformers is not installed: no generate() side by side")
    elif len(gammas) == len(s.drafters) and not out_of_time(reserve_s=30):
        for name, r in transformers_side_by_side(s, gammas, repeat=2).items():
            record("ours vs transformers generate(), greedy, B = 1 (CUDA)",
                   {"impl": name, **r})
    return 0


def main() -> int:
    if gpu_available() and not INTERPRET:
        return gpu_main()
    torch.set_num_threads(1)  # decode-sized matmuls: threads add only spin-wait noise on a CPU
    s = setup()
    print(f"{len(s.prompts)} prompts × {s.n_new} new tokens, greedy, B = 1")
    rows = sweep(s)
    for r in rows:
        record("speculative decoding sweep, greedy, B = 1 (CPU wall clock)",
               {k: v for k, v in r.items() if k != "acceptance_by_position"})
    best = {name: max((r for r in rows if r["drafter"] == name), key=lambda r: r["speedup"])
            for name in s.drafters}
    if out_of_time():
        return 0
    side = transformers_side_by_side(s, {n: b["gamma"] for n, b in best.items()})
    for name, r in side.items():
        record("ours vs transformers generate(), greedy, B = 1 (CPU)", {"impl": name, **r})
    if INTERPRET:
        traffic = kernel_traffic()
        record("sampling kernels' traffic, counted", {**traffic, **gpu_prediction(traffic)})
    return 0


if __name__ == "__main__":
    main()
