"""Speculative decoding: the measurements behind the lab, and `kclub bench speculative-decoding`.

Greedy, the paper's setting, on the zoo's models and prompts cut from held-out stdlib text
(shipped with the checkpoints, so any Python runs it):
1. the choosing pass (`sweep`): one profiled run per drafter and γ, beside the autoregressive
   baseline. It measures α, tokens per call and the cost ratio c inside the real loops (the
   time of one drafter step in the speculative loop over one step of the autoregressive loop),
   and picks each drafter's γ;
2. the measurement pass (`measure`): fresh runs of the chosen γ against the baseline,
   interleaved round by round; each speed-up is a bootstrap interval (bench.ratio). Choosing
   on one pass and judging on another keeps the choice's luck out of the verdict.
Also: the sampled acceptance rate against E[Σ min(p, q)], and transformers' generate() on the
same weights. The GPU side (the sampling
kernels' traffic, compiled occupancy, roofline) is in speculative_gpu.py.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from dataclasses import dataclass

import torch

from kernels.device import INTERPRET, gpu_available
from shared import bench
from shared.benchmarks import gpu_hardware, out_of_time, pct_of_roofline, record
from shared.device import pick
from shared.inference.generate import Phases, generate
from shared.inference.speculative import Drafter, speculative_generate
from shared.inference.stats import expected_tokens, model_speedup
from shared.models import zoo

GAMMAS = tuple(range(1, 9))


@dataclass
class Setup:
    target: torch.nn.Module
    drafters: dict[str, Drafter]
    prompts: list[torch.Tensor]  # each int64 [1, P]
    n_new: int


def setup(n_prompts: int | None = None, prompt_len: int = 48, n_new: int | None = None) -> Setup:
    """The zoo's target and both drafters; `n_prompts` (1, 2, 4 or 8) prompts spread over the
    split both checkpoints were validated on, read from the held-out sample shipped with them
    (zoo.held_out_prompts), so they are the same, and held out, under any Python."""
    device = "cuda" if gpu_available() else "cpu"
    target, draft = zoo.load("target").to(device), zoo.load("draft").to(device)
    exit_layer = zoo.RECIPES["target"][1].exit_layer
    prompts = [p.to(device)[None] for p in zoo.held_out_prompts(
        n_prompts or pick(ci=2, full=8), prompt_len, "target", "draft")]
    return Setup(target, {"draft model": Drafter(draft),
                          "self-draft": Drafter(target, n_layers=exit_layer)},
                 prompts, n_new or pick(ci=48, full=160))


def run_ar(s: Setup, profile: Phases | None = None, prompts=None) -> list[torch.Tensor]:
    return [generate(s.target, p, s.n_new, profile=profile).tokens
            for p in (prompts or s.prompts)]


def run_spec(s: Setup, drafter: Drafter, gamma: int, temperature: float = 0.0, seed: int = 0,
             profile: Phases | None = None, prompts=None):
    # the sampling kernels draw their uniforms on the model's device, with this generator
    gen = torch.Generator(device=s.target.lm_head.weight.device).manual_seed(seed)
    return [speculative_generate(s.target, drafter, p, s.n_new, gamma=gamma,
                                 temperature=temperature, generator=gen, profile=profile)
            for p in (prompts or s.prompts)]


def merged_acceptance(runs) -> dict:
    """α measured (accepted / tried), α predicted (mean Σ min(p, q) over the tried drafts),
    tokens per target call, acceptance by position and the number of tried drafts, pooled
    over the prompts' runs."""
    head = runs[0]
    pooled = type(head)(tokens=head.tokens, target_calls=0, gamma=head.gamma,
                        accepted=[a for r in runs for a in r.accepted],
                        overlap=[o for r in runs for o in r.overlap],
                        active=[a for r in runs for a in r.active])
    alpha, alpha_pred = pooled.acceptance()
    n = torch.stack(pooled.accepted)[torch.stack(pooled.active)]  # [active rounds]
    tried = int((torch.arange(head.gamma, device=n.device) <= n[:, None]).sum())
    return {"alpha": alpha, "alpha_pred": alpha_pred, "tokens_per_call": pooled.tokens_per_call(),
            "by_position": pooled.acceptance_by_position().tolist(), "tried": tried}


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def sweep(s: Setup, gammas=None) -> list[dict]:
    """The choosing pass: per drafter and γ one profiled greedy run over the prompts, beside
    one profiled autoregressive run. c is measured in situ: a drafter step inside the
    speculative loop (its forward and token choice) over a step of the autoregressive loop
    (the target's one-token forward and token choice), medians over the runs' steps. The
    round's other costs are measured too, in the same unit: the verify forward (c_verify) and
    the rule and cache roll-back (`other`). `speedup` is the run's whole-call time ratio (one
    run: the plot); `speedup_phases` is tokens per call over the round's cost in steps, from
    the medians (what `choose` reads). Neither is ever the verdict."""
    gammas = gammas or pick(ci=(1, 2, 3, 4, 6, 8), full=GAMMAS)
    with torch.no_grad():
        run_ar(s)  # warm-up: first calls allocate
        ar = Phases()
        reference, t_ar = _timed(lambda: run_ar(s, ar))
        t_tok = ar.median("forward") + ar.median("choose")
        rows = []
        for name, drafter in s.drafters.items():
            run_spec(s, drafter, gammas[0])
            for g in gammas:
                ph = Phases()
                runs, t = _timed(lambda d=drafter, g=g, ph=ph: run_spec(s, d, g, profile=ph))
                acc = merged_acceptance(runs)
                c, c_verify = ph.median("draft") / t_tok, ph.median("verify") / t_tok
                other = (ph.median("rule") + ph.median("bookkeeping")) / t_tok
                rows.append({
                    "drafter": name, "gamma": g, "alpha": acc["alpha"], "c": c,
                    "c_verify": c_verify, "other": other,
                    "speedup_phases": acc["tokens_per_call"] / (g * c + c_verify + other),
                    "tokens_per_call": acc["tokens_per_call"],
                    "tokens_per_call_model": expected_tokens(acc["alpha"], g),
                    "speedup": t_ar / t, "speedup_model": model_speedup(acc["alpha"], g, c),
                    "identical": all(torch.equal(r.tokens, ref)
                                     for r, ref in zip(runs, reference, strict=True)),
                    "acceptance_by_position": acc["by_position"], "t_token_ms": t_tok * 1e3})
    return rows


def choose(rows: list[dict]) -> dict[str, dict]:
    """Each drafter's row whose round, as measured in phases, pays best: tokens per call over
    the round's cost in autoregressive steps (γ·c + c_verify + other). Those are medians over
    the run's rounds, so they pick γ more steadily than the run's one whole-call time."""
    return {name: max((r for r in rows if r["drafter"] == name), key=lambda r: r["speedup_phases"])
            for name in dict.fromkeys(r["drafter"] for r in rows)}


def measure(s: Setup, gammas: dict[str, int], *, batch: int = 1,
            repeat: int | None = None) -> dict[str, dict]:
    """The measurement pass: the autoregressive baseline and every drafter at its chosen γ,
    interleaved round by round over `repeat` fresh rounds; per drafter the speed-up as a
    bench.Ratio (median of AR time / speculative time, bootstrap 95% interval over the
    rounds), α and whether the output equals the baseline's. `batch` > 1 decodes the prompts
    (cycled) as one batch, each sequence accepting its own number of drafts per round.

    On a CPU each call also times its prefill (Phases: a clock read, no sync), so `decode` is
    the same ratio over the decoding alone, prompt processing taken out of both sides: what
    Theorem 3.8 models. On a GPU that would add a sync per phase; `decode` is None there."""
    repeat = repeat or pick(ci=6, full=10)
    warmup = 1
    prompts = s.prompts if batch == 1 else [
        torch.cat([s.prompts[i % len(s.prompts)] for i in range(batch)])]
    profile = not gpu_available()
    prefill: dict[str, list[float]] = {}

    def timed(key, run):
        def call():
            ph = Phases() if profile else None
            out = run(ph)
            prefill.setdefault(key, []).append(ph.seconds["prefill"] if ph else 0.0)
            return out
        return call

    fns = {"ar": timed("ar", lambda ph: run_ar(s, ph, prompts=prompts))}
    fns.update({name: timed(name, lambda ph, d=s.drafters[name], g=g:
                            run_spec(s, d, g, profile=ph, prompts=prompts))
                for name, g in gammas.items()})
    out = {}
    with torch.no_grad():
        times = bench.compare(fns, warmup=warmup, repeat=repeat)
        decode = {k: [t - p for t, p in zip(times[k].samples, prefill[k][warmup:], strict=True)]
                  for k in fns}
        reference = run_ar(s, prompts=prompts)
        for name, g in gammas.items():
            runs = run_spec(s, s.drafters[name], g, prompts=prompts)
            out[name] = {"gamma": g, "speedup": bench.ratio(times["ar"], times[name]),
                         "decode": bench.ratio(decode["ar"], decode[name]) if profile else None,
                         **merged_acceptance(runs),
                         "identical": all(torch.equal(r.tokens, ref)
                                          for r, ref in zip(runs, reference, strict=True))}
    return out


def sampled_acceptance(s: Setup, gamma: int, temperature: float = 1.0) -> dict[str, dict]:
    """At T = 1 per drafter: α measured against E[Σ min(p, q)] (the paper's §3)."""
    with torch.no_grad():
        return {name: merged_acceptance(run_spec(s, d, gamma, temperature, seed=1))
                for name, d in s.drafters.items()}


def transformers_side_by_side(s: Setup, gammas: dict[str, int], repeat: int | None = None,
                              n_prompts: int | None = None) -> dict:
    """Ours vs transformers' generate() on the same weights and prompts, greedy, B = 1:
    autoregressive, and assisted generation with each drafter at its γ (constant schedule, no
    confidence cut-off, so both run the same algorithm), interleaved. Per contender tokens/s
    and whether its output equals our target's greedy output; `ratios`: ours over theirs as
    bench.Ratio, for the autoregressive loop and for each drafter."""
    from transformers.utils import logging

    from shared.models.hf import to_hf

    logging.set_verbosity_error()
    repeat = repeat or pick(ci=3, full=5)
    prompts = s.prompts[:n_prompts or pick(ci=1, full=len(s.prompts))]
    hf_target = to_hf(s.target)
    hf_draft = to_hf(s.drafters["draft model"].model)
    exit_layer = s.drafters["self-draft"].n_layers

    def hf_run(**kw):
        return [hf_target.generate(p, attention_mask=torch.ones_like(p), do_sample=False,
                                   max_new_tokens=s.n_new, min_new_tokens=s.n_new,
                                   **kw)[:, p.shape[1]:] for p in prompts]

    def assisted(name):
        kw = dict(num_assistant_tokens=gammas[name], num_assistant_tokens_schedule="constant",
                  assistant_confidence_threshold=0.0)
        if name == "draft model":
            return lambda: hf_run(assistant_model=hf_draft, **kw)
        return lambda: hf_run(assistant_early_exit=exit_layer, **kw)

    fns = {"ours autoregressive": lambda: run_ar(s, prompts=prompts),
           "transformers autoregressive": hf_run}
    for name, drafter in s.drafters.items():
        fns[f"ours speculative, {name}"] = (
            lambda d=drafter, g=gammas[name]: [r.tokens for r in
                                                run_spec(s, d, g, prompts=prompts)])
        fns[f"transformers assisted, {name}"] = assisted(name)
    n_tokens = s.n_new * len(prompts)
    rows = {}
    with torch.no_grad():
        reference = run_ar(s, prompts=prompts)
        times = bench.compare(fns, warmup=1, repeat=repeat)
        for name, fn in fns.items():
            rows[name] = {"tokens_per_s": n_tokens / times[name].median_s,
                          "identical": all(torch.equal(o, r)
                                           for o, r in zip(fn(), reference, strict=True))}
    ratios = {"autoregressive": bench.ratio(times["transformers autoregressive"],
                                            times["ours autoregressive"])}
    ratios.update({name: bench.ratio(times[f"transformers assisted, {name}"],
                                     times[f"ours speculative, {name}"])
                   for name in s.drafters})
    return {"rows": rows, "ratios": ratios}


def gpu_main(repeat: int = 3) -> int:
    """On a CUDA GPU, greedy, B = 1: the choosing pass picks each drafter's γ, the measurement
    pass times it against our autoregressive decoding (fresh, interleaved); tokens/s and the %
    of the memory roofline (every weight read once per target call). Then transformers'
    generate on the same weights, when transformers is installed."""
    s = setup()
    hw, n_tokens = gpu_hardware(), s.n_new * len(s.prompts)
    weight_bytes = 4 * s.target.num_params()   # fp32 weights, read once per target call
    best = choose(sweep(s, gammas=(1, 2, 4, 6, 8)))
    if out_of_time(reserve_s=20):
        return 0
    measured = measure(s, {name: b["gamma"] for name, b in best.items()}, repeat=repeat)
    for name, m in measured.items():
        r, b = m["speedup"], best[name]
        spec_s = statistics.median(r.b)  # the speculative rounds' median, seconds
        record("speculative decoding, greedy, B = 1 (CUDA)", {
            "drafter": name, "gamma": m["gamma"], "alpha": m["alpha"], "c in situ": b["c"],
            "speedup": r.median, "speedup low": r.low, "speedup high": r.high,
            "model speedup": b["speedup_model"], "identical": m["identical"],
            "spec % roofline": pct_of_roofline(
                spec_s / (n_tokens / m["tokens_per_call"]), 0.0, weight_bytes, hw, "fp32"),
            "hardware": hw})
    if importlib.util.find_spec("transformers") is None:
        print("note: transformers is not installed: no generate() side by side")
    elif not out_of_time(reserve_s=30):
        side = transformers_side_by_side(s, {n: b["gamma"] for n, b in best.items()}, repeat=2)
        for name, r in side["rows"].items():
            record("ours vs transformers generate(), greedy, B = 1 (CUDA)", {"impl": name, **r})
    return 0


def main() -> int:
    if gpu_available() and not INTERPRET:
        return gpu_main()
    from shared.benchmarks.speculative_gpu import gpu_prediction, kernel_traffic

    torch.set_num_threads(1)  # decode-sized matmuls: threads add only spin-wait noise on a CPU
    s = setup()
    print(f"{len(s.prompts)} prompts × {s.n_new} new tokens, greedy, B = 1")
    rows = sweep(s)
    for r in rows:
        record("choosing pass, greedy, B = 1 (CPU wall clock, single runs)",
               {k: v for k, v in r.items() if k != "acceptance_by_position"})
    best = choose(rows)
    for name, m in measure(s, {n: b["gamma"] for n, b in best.items()}).items():
        record("measurement pass, greedy, B = 1 (CPU wall clock, interleaved)",
               {"drafter": name, "gamma": m["gamma"], "speedup": str(m["speedup"]),
                "alpha": m["alpha"], "identical": m["identical"]})
    if out_of_time():
        return 0
    side = transformers_side_by_side(s, {n: b["gamma"] for n, b in best.items()})
    for name, r in side["rows"].items():
        record("ours vs transformers generate(), greedy, B = 1 (CPU)", {"impl": name, **r})
    if INTERPRET:
        traffic = kernel_traffic()
        record("sampling kernels' traffic, counted", {**traffic, **gpu_prediction(traffic)})
    return 0


if __name__ == "__main__":
    main()
