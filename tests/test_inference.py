"""Decoding: speculative greedy == target greedy token for token (batched, both drafters, all
γ), the sampled output follows the target's distribution (χ², and a wrong rule fails it), the
measured acceptance agrees with the paper's α, and the Triton and reference paths agree."""

import pytest
import torch

from kernels.sampling import speculative_accept, speculative_accept_reference
from shared.data import ByteTokenizer
from shared.inference.generate import generate
from shared.inference.speculative import Drafter, accept_if_p_ge_q, speculative_generate
from shared.inference.stats import chi_square, expected_tokens, model_speedup
from shared.models import Llama, LlamaConfig, zoo

TINY = LlamaConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=48,
                   max_seq_len=48)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def peaky(seed, config=TINY, scale=40.0):
    """A random model whose next-token distributions have a few likely tokens (not ~uniform)."""
    torch.manual_seed(seed)
    model = Llama(config).eval().requires_grad_(False)
    model.lm_head.weight.mul_(scale)
    return model


def prompts(B, P, V=256, text=None):
    if text is not None:
        ids = torch.tensor(ByteTokenizer().encode(text))
        return torch.stack([ids[i * 7:i * 7 + P] for i in range(B)])
    return torch.randint(0, V, (B, P), generator=torch.Generator().manual_seed(B * P))


def test_greedy_speculative_equals_target_greedy_trained_models():
    target, draft = zoo.load("target", train_if_missing=False), zoo.load("draft")
    text = "import os\nimport sys\n\n\ndef main(argv=None):\n    parser = argparse.ArgumentPar"
    prompt = prompts(3, 24, text=text)
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


def test_greedy_speculative_equals_target_greedy_random_models():
    target, draft = peaky(0), peaky(1, LlamaConfig(64, 16, 1, 2, 1, 32, 48))
    prompt = prompts(4, 5, V=64)
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


def test_triton_and_reference_paths_agree_when_sampling():
    target, draft = peaky(2), peaky(3, LlamaConfig(64, 16, 1, 2, 1, 32, 48))
    prompt = prompts(2, 4, V=64)
    outs = [speculative_generate(target, Drafter(draft), prompt, 12, gamma=3, temperature=1.0,
                                 generator=torch.Generator().manual_seed(11), impl=impl).tokens
            for impl in ("triton", "reference")]
    assert torch.equal(*outs)
    ar = [generate(target, prompt, 8, temperature=0.7, impl=impl,
                   generator=torch.Generator().manual_seed(5)).tokens
          for impl in ("triton", "reference")]
    assert torch.equal(*ar)


def sampled_vs_exact(accept, n=1500, gamma=2):
    """n samples of the first two new tokens after one fixed prompt, and their exact
    distributions under the target: p(t1 | prompt) and Σ_t1 p(t1 | prompt) p(t2 | prompt, t1).
    Both tokens are decided by the acceptance rule (the first round scores p(· | prompt))."""
    target = peaky(4, scale=10.0)  # broad enough that several tokens matter (max p ≈ 0.17)
    draft = peaky(5, LlamaConfig(64, 16, 1, 2, 1, 32, 48), scale=10.0)
    prompt = prompts(1, 6, V=64)
    out = speculative_generate(target, Drafter(draft), prompt.expand(n, -1), 2, gamma=gamma,
                               temperature=1.0, generator=torch.Generator().manual_seed(21),
                               accept=accept)
    with torch.no_grad():
        p1 = torch.softmax(target(prompt)[0, -1].double(), -1)  # [V]
        firsts = torch.arange(64)[:, None]
        p2 = torch.softmax(target(torch.cat([prompt.expand(64, -1), firsts], 1))[:, -1]
                           .double(), -1)  # [V(t1), V(t2)]
    return out, p1, p1 @ p2


def test_sampled_tokens_follow_target_and_wrong_rule_fails():
    out, p1, p2 = sampled_vs_exact(None)
    for i, exact in enumerate((p1, p2)):
        _, _, pval = chi_square(torch.bincount(out.tokens[:, i], minlength=64), exact)
        assert pval > 1e-3, (i, pval)
    measured, predicted = out.acceptance()
    tried = (torch.arange(2) <= torch.stack(out.accepted)[..., None]).sum().item()
    sigma = (predicted * (1 - predicted) / tried) ** 0.5
    assert abs(measured - predicted) < 4 * sigma + 1e-3, (measured, predicted, sigma)
    wrong, p1, _ = sampled_vs_exact(accept_if_p_ge_q)
    _, _, pval_wrong = chi_square(torch.bincount(wrong.tokens[:, 0], minlength=64), p1)
    assert pval_wrong < 1e-6, pval_wrong


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
