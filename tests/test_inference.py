"""Decoding: speculative greedy == target greedy token for token (batched, both drafters, all
γ), the sampled output follows the target's distribution (χ², and a wrong rule fails it), the
measured acceptance agrees with the paper's α, the Triton and reference paths agree, and the
decode loop reads nothing back to the host beyond its documented once-per-round check.
Everything runs on the `device` fixture's device, generators included."""

import math
import warnings

import pytest
import torch

from kernels.sampling import speculative_accept, speculative_accept_reference
from kernels.sampling.checks import check_generator
from shared.bench import one_thread
from shared.data import ByteTokenizer
from shared.inference.generate import Phases, generate
from shared.inference.kv_cache import KVCache
from shared.inference.speculative import Drafter, speculative_generate
from shared.inference.stats import (
    chi_square_power,
    expected_tokens,
    model_speedup,
    two_token_p_values,
    two_token_power,
)
from shared.inference.wrong_rules import (
    FLAWS,
    exact_two_tokens,
    first_two,
    first_two_distributions,
    flawed_accept,
    pair_counts,
    rule,
)
from shared.models import Llama, LlamaConfig, zoo

TINY = LlamaConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=48,
                   max_seq_len=48)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def peaky(seed, config=TINY, scale=40.0, device="cpu"):
    """A random model whose next-token distributions have a few likely tokens (not ~uniform)."""
    torch.manual_seed(seed)
    model = Llama(config).eval().requires_grad_(False)
    model.lm_head.weight.mul_(scale)
    return model.to(device)


def prompts(B, P, V=256, text=None, device="cpu"):
    if text is not None:
        ids = torch.tensor(ByteTokenizer().encode(text))
        return torch.stack([ids[i * 7:i * 7 + P] for i in range(B)]).to(device)
    gen = torch.Generator(device=device).manual_seed(B * P)
    return torch.randint(0, V, (B, P), generator=gen, device=device)


def seeded(seed, device):
    return torch.Generator(device=device).manual_seed(seed)


def test_greedy_speculative_equals_target_greedy_trained_models(device):
    target = zoo.load("target", train_if_missing=False).to(device)
    draft = zoo.load("draft").to(device)
    text = "import os\nimport sys\n\n\ndef main(argv=None):\n    parser = argparse.ArgumentPar"
    prompt = prompts(3, 24, text=text, device=device)
    ref = generate(target, prompt, 40).tokens
    for drafter in (Drafter(draft), Drafter(target, n_layers=2)):
        for gamma in (1, 4, 7):
            out = speculative_generate(target, drafter, prompt, 40, gamma=gamma)
            assert torch.equal(out.tokens, ref), (drafter.name, gamma)
            measured, predicted = out.acceptance()
            assert measured == pytest.approx(predicted, abs=1e-6)  # greedy: β_i is 0 or 1
            assert out.target_calls < 40  # something was accepted
            counts = torch.stack(out.accepted)[torch.stack(out.active)]
            assert (counts == gamma).any() and (counts < gamma).any()  # both paths ran


def test_greedy_speculative_equals_target_greedy_random_models(device):
    target = peaky(0, device=device)
    draft = peaky(1, LlamaConfig(64, 16, 1, 2, 1, 32, 48), device=device)
    prompt = prompts(4, 5, V=64, device=device)
    ref = generate(target, prompt, 30).tokens
    for drafter in (Drafter(draft), Drafter(target, n_layers=1), Drafter(target)):
        for gamma in (1, 3, 8):
            out = speculative_generate(target, drafter, prompt, 30, gamma=gamma)
            assert torch.equal(out.tokens, ref), (drafter.name, gamma)
    out = speculative_generate(target, Drafter(target), prompt, 30, gamma=3)
    assert out.tokens_per_call() == 4.0  # the target drafting for itself: α = 1
    # the general rule on one-hot p, q (what the greedy fast path short-cuts) agrees too
    for accept in (speculative_accept, speculative_accept_reference):
        out = speculative_generate(target, Drafter(draft), prompt, 30, gamma=4, accept=accept)
        assert torch.equal(out.tokens, ref)


def test_triton_and_reference_paths_agree_when_sampling(device):
    target = peaky(2, device=device)
    draft = peaky(3, LlamaConfig(64, 16, 1, 2, 1, 32, 48), device=device)
    prompt = prompts(2, 4, V=64, device=device)
    outs = [speculative_generate(target, Drafter(draft), prompt, 12, gamma=3, temperature=1.0,
                                 generator=seeded(11, device), impl=impl).tokens
            for impl in ("triton", "reference")]
    assert torch.equal(*outs)
    ar = [generate(target, prompt, 8, temperature=0.7, impl=impl,
                   generator=seeded(5, device)).tokens
          for impl in ("triton", "reference")]
    assert torch.equal(*ar)


def first_two_sampled(accept, device, n=1500, seed=21):
    """n samples of the first two new tokens after one fixed prompt at T = 1, γ = 1, counted
    as pairs [V, V], and the models' distributions that decide them."""
    target = peaky(4, scale=10.0, device=device)  # broad: several tokens matter (max p ≈ 0.17)
    draft = peaky(5, LlamaConfig(64, 16, 1, 2, 1, 32, 48), scale=10.0, device=device)
    prompt = prompts(1, 6, V=64, device=device)
    tokens = first_two(target, Drafter(draft), prompt, n, accept=accept, seed=seed)
    assert tokens.shape == (n, 2)
    return pair_counts(tokens, 64), first_two_distributions(target, Drafter(draft), prompt)


def test_sampled_tokens_follow_target_and_every_wrong_rule_fails(device):
    n = 1500
    counts, dists = first_two_sampled(None, device, n=n)
    exact = exact_two_tokens(**dists)
    assert counts.sum() == n
    assert torch.allclose(exact, dists["p1"][:, None] * dists["p2"], atol=1e-12)  # p1·p2
    assert (two_token_p_values(counts, exact) > 1e-3).all()
    assert two_token_power(exact, exact, n, 1e-3, sims=200) < 0.02  # its size: rarely wrong
    for flaw in FLAWS:
        wrong = exact_two_tokens(**dists, flaw=flaw)
        # the setting has the power to see this bug (so the rejection below is not luck) ...
        assert two_token_power(exact, wrong, n, 1e-3, sims=200) > 0.99, flaw
        bad, _ = first_two_sampled(rule(flaw), device, n=n)
        # ... and the test of the loop's real output rejects it
        assert two_token_p_values(bad, exact)[3] < 1e-3, flaw
        # while the output follows the distribution derived for the flawed rule
        assert two_token_p_values(bad, wrong)[3] > 1e-4, flaw


def test_sampled_acceptance_matches_the_papers_alpha(device):
    target = peaky(4, scale=10.0, device=device)
    draft = peaky(5, LlamaConfig(64, 16, 1, 2, 1, 32, 48), scale=10.0, device=device)
    out = speculative_generate(target, Drafter(draft), prompts(1, 6, V=64, device=device)
                               .expand(600, -1), 4, gamma=2, temperature=1.0,
                               generator=seeded(3, device))
    measured, predicted = out.acceptance()
    n, act = torch.stack(out.accepted), torch.stack(out.active)
    tried = ((torch.arange(2, device=device) <= n[..., None]) & act[..., None]).sum().item()
    sigma = (predicted * (1 - predicted) / tried) ** 0.5
    assert abs(measured - predicted) < 4 * sigma + 1e-3, (measured, predicted, sigma)


def test_the_bonus_bug_is_invisible_to_the_first_token(device):
    """Why the test needs t2 and the pairs: the bonus bug leaves t1 alone and moves t2."""
    _, dists = first_two_sampled(None, device, n=2)
    exact = exact_two_tokens(**dists)
    wrong = exact_two_tokens(**dists, flaw="bonus from p_γ")
    assert torch.allclose(wrong.sum(1), exact.sum(1), atol=1e-12)
    assert (wrong.sum(0) - exact.sum(0)).abs().sum() > 0.05
    assert chi_square_power(exact.sum(1), wrong.sum(1), 1500, 1e-3, sims=200) < 0.01


def test_paper_formulas_and_bad_arguments():
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 1) == pytest.approx(1.5)
    assert model_speedup(0.8, 4, 0.05) == pytest.approx((1 - 0.8**5) / 0.2 / 1.2)
    target = peaky(0)
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(target, Drafter(target, 1), prompts(1, 4, 64), 4, gamma=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        speculative_generate(target, Drafter(target, 1), prompts(1, 4, 64), 40, gamma=8)
    with pytest.raises(ValueError, match="prompt"):
        generate(target, prompts(1, 4, 64)[0], 4)
    with pytest.raises(TypeError, match="generator"):
        generate(target, prompts(1, 4, 64), 4, temperature=1.0, generator=1)
    # A generator on another device than the model: named, with the fix, before any draw.
    with pytest.raises(ValueError, match=r"generator is on cpu .* torch.Generator\(device="):
        check_generator(torch.Generator(), "cuda")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator is on"):
            generate(target.cuda(), prompts(1, 4, 64), 4, temperature=1.0,
                     generator=torch.Generator())


# Python-level ways to read a tensor's value back to the host: each is a device sync on a GPU.
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture
def host_reads(monkeypatch, device):
    """Counts host reads of tensor values. On CUDA, torch's sync debug mode also counts the
    syncs torch itself makes in C++ (boolean indexing, one_hot, ...), which no patch sees."""
    counts = {"python": 0, "cuda": 0}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counts["python"] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    if device != "cuda":
        yield counts
        return
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield counts
    finally:
        torch.cuda.set_sync_debug_mode("default")
    counts["cuda"] = sum("synchroniz" in str(w.message) for w in caught)


def checked_rounds(out, n_new):
    """The loop's documented host reads: one per round test from the first round that could
    be the last (ceil(n_new / (γ+1))), none at the test that stops on the round cap."""
    rounds = len(out.accepted)
    first = math.ceil(n_new / (out.gamma + 1))
    return max(0, rounds - first + 1) - (rounds == n_new)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_decoding_reads_nothing_back_per_layer_or_token(device, host_reads, temperature):
    deep = peaky(6, LlamaConfig(64, 32, 6, 4, 2, 48, 48), device=device)
    shallow = peaky(7, LlamaConfig(64, 16, 1, 2, 1, 32, 48), device=device)
    prompt = prompts(3, 5, V=64, device=device)
    with torch.no_grad():  # warm up: first calls may set things up
        generate(deep, prompt, 2, temperature=temperature, generator=seeded(0, device))
    start = dict(host_reads)
    for model in (shallow, deep):  # 1 and 6 layers, 20 tokens each: none at all
        generate(model, prompt, 20, temperature=temperature, generator=seeded(1, device))
    assert host_reads == start, host_reads
    for drafter, gamma in ((Drafter(shallow), 3), (Drafter(deep, n_layers=2), 4),
                           (Drafter(deep), 4)):
        before = dict(host_reads)
        out = speculative_generate(deep, drafter, prompt, 20, gamma=gamma,
                                   temperature=temperature, generator=seeded(2, device))
        for kind in ("python", "cuda"):
            if kind == "python" or device == "cuda":
                assert host_reads[kind] - before[kind] == checked_rounds(out, 20), (
                    drafter.name, kind, host_reads, len(out.accepted))
    assert checked_rounds(out, 20) == 1  # the target drafting for itself: one read in all


def test_debug_flag_turns_the_value_checks_on(device, host_reads, monkeypatch):
    """KC_DEBUG=1: the checks that read values back run (and catch a bad cache length given
    on the device, which the normal path leaves to the rotary-table lookup)."""
    target = peaky(8, device=device)
    prompt = prompts(2, 5, V=64, device=device)
    monkeypatch.setenv("KC_DEBUG", "1")
    before = host_reads["python"]
    out = speculative_generate(target, Drafter(target, n_layers=1), prompt, 8, gamma=2,
                               temperature=1.0, generator=seeded(3, device))
    assert host_reads["python"] - before > checked_rounds(out, 8) + len(out.accepted)
    cache = KVCache(TINY, 2, device=device)
    with pytest.raises(ValueError, match="lengths"):
        cache.set_lengths(torch.tensor([3, TINY.max_seq_len + 1], device=device))


def test_profile_counts_the_phases_and_changes_nothing(device):
    target = peaky(9, device=device)
    draft = peaky(10, LlamaConfig(64, 16, 1, 2, 1, 32, 48), device=device)
    prompt = prompts(2, 5, V=64, device=device)
    ar = Phases()
    assert torch.equal(generate(target, prompt, 12, profile=ar).tokens,
                       generate(target, prompt, 12).tokens)
    assert (ar.calls["prefill"], ar.calls["forward"], ar.calls["choose"]) == (1, 11, 12)
    spec = Phases()
    out = speculative_generate(target, Drafter(draft), prompt, 12, gamma=3, profile=spec)
    assert torch.equal(out.tokens, generate(target, prompt, 12).tokens)
    rounds = len(out.accepted)
    assert spec.calls["verify"] == spec.calls["rule"] == rounds
    assert spec.calls["draft"] == 3 * rounds and out.draft_calls == 3 * rounds + 1
    assert all(spec.seconds[k] > 0 for k in ("prefill", "draft", "verify", "rule"))
    with pytest.raises(TypeError, match="profile"):
        generate(target, prompt, 4, profile={})
    with pytest.raises(ValueError, match="never ran"):
        Phases().per_call("draft")


def test_bad_flaw_and_fingerprint_mismatch_are_named(monkeypatch):
    with pytest.raises(ValueError, match="flaw"):
        rule("off by one")
    x = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="flaw"):
        flawed_accept(x, torch.full((1, 2, 4), 0.25), torch.full((1, 3, 4), 0.25), flaw="typo")
    assert len(zoo.held_out_tokens("target", "draft")) > 1000  # this machine's corpus matches
    monkeypatch.setattr(zoo, "corpus_fingerprint", lambda: "0123456789ab")
    with pytest.raises(ValueError, match="fingerprint 0123456789ab .* differs"):
        zoo.held_out_tokens("target")
    with pytest.raises(ValueError, match="names"):
        zoo.held_out_tokens()


def test_gpu_prediction_helpers_read_the_compile_report():
    """compiled_table names the launcher's blocks (either keying of the report); the accept
    kernel's Little's-law time is latency bound at small batch and capped by occupancy only
    past the resident batch."""
    from shared import roofline
    from shared.benchmarks import speculative_gpu as sg

    census = {k: 0 for k in ("mma.sync", "wgmma", "ldmatrix", "cp.async", "cp.async.bulk",
                             "ex2.approx")}
    row = {"status": "ok", "kernel": "speculative_accept_kernel", "case": "accept V=32000",
           "target": "sm_90", "dtype": "fp32", "registers": 160, "spill_bytes": 0,
           "shared_bytes": 16, "shared_limit": 232448, "occupancy": 0.1875, "num_warps": 4,
           "num_stages": 3, "census": census}
    by_name = sg.compiled_table([row | {"constexprs": {"BLOCK_G": 4, "BLOCK_V": 4096}}])[0]
    assert by_name["BLOCK_V"] == 4096 and by_name["BLOCK_G"] == 4
    with pytest.raises(ValueError, match="not a compiled sampling kernel"):
        sg.compiled_table([row | {"status": "FAIL: spills", "constexprs": {}}])
    h100 = roofline.hardware("H100 SXM")
    small = sg.accept_prediction(by_name, 1, gamma=4, vocab=32000)
    in_flight = 12 * 4096 / 4  # p, q (fp32) and uniforms tiles over 4 warps
    assert small["bandwidth"] == pytest.approx(4 * in_flight / h100.mem_latency_s)
    assert small["time_us"] > 10 * small["datasheet_us"] and not small["occupancy_limited"]
    cap = small["max_resident_batch"]
    assert cap == int(0.1875 * h100.max_warps_per_sm * h100.sms // 4)
    assert sg.accept_prediction(by_name, cap + 1, 4, 32000)["occupancy_limited"]
    assert sg.accept_bytes(2, 4, 32000, rejected=1) == 2 * (80 + 8 * 32000 + 16) + 4 * 32000
