"""The sampling kernels: Triton == reference on the same random draws, the right distributions
(χ² at fixed seeds, strong enough to reject a wrong acceptance rule), and clear input errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.sampling import (
    gumbel_sample,
    gumbel_sample_reference,
    speculative_accept,
    speculative_accept_reference,
)
from shared.check import fresh_seed, kernel_device
from shared.inference.stats import chi_square
from shared.inference.wrong_rules import FLAWS, rule

DEVICE = kernel_device()  # the `device` fixture's value, for helpers called outside tests


def gen(seed, device=DEVICE):
    """A generator on the kernels' device: the kernels draw their uniforms with it there."""
    return torch.Generator(device=device).manual_seed(seed)


def randn(*shape, g):
    return torch.randn(shape, generator=g, device=g.device)


def chi2(counts, probs):
    """chi_square on the host (it is statistics, not a kernel)."""
    return chi_square(counts.cpu(), probs.cpu())


def random_case(B, gamma, V, seed, dtype=torch.float32, sharp=2.0):
    """Draft/target distributions, and drafts x_i ~ q_i, on the kernels' device."""
    g = gen(seed)
    q = torch.softmax(sharp * randn(B, gamma, V, g=g), -1)
    p = torch.softmax(sharp * randn(B, gamma + 1, V, g=g), -1)
    mix = torch.rand(B, gamma + 1, 1, generator=g, device=g.device)  # long accepted runs
    p[:, :gamma] = mix[:, :gamma] * q + (1 - mix[:, :gamma]) * p[:, :gamma]
    x = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, gamma)
    return x, q.to(dtype), p.to(dtype)


@settings(max_examples=8)
@given(B=st.integers(1, 5), V=st.sampled_from([1, 7, 257, 4099]),
       temperature=st.sampled_from([0.0, 0.3, 1.0, 2.5]),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_gumbel_sample_matches_reference(B, V, temperature, dtype, device):
    seed = fresh_seed()
    logits = (3 * randn(B, V, g=gen(seed, device))).to(dtype)
    out = gumbel_sample(logits, temperature=temperature, generator=gen(seed + 1, device))
    ref = gumbel_sample_reference(logits.double(), temperature=temperature,
                                  generator=gen(seed + 1, device))
    assert out.dtype == torch.int64 and out.shape == (B,)
    assert torch.equal(out, ref), (seed, out, ref)


def test_greedy_is_first_argmax_across_tiles(device):
    logits = torch.zeros(3, 5000, device=device)
    logits[0, [10, 4500]] = 2.0  # tie across two tiles: the first wins, as torch.argmax
    logits[1, 4098] = 1.0  # max in the ragged last tile
    logits[2] = -1.0  # all equal: index 0
    out = gumbel_sample(logits, temperature=0.0)
    assert out.tolist() == [10, 4098, 0] == logits.argmax(-1).tolist()


def test_gumbel_sample_distribution(device):
    """600 draws (Triton), 40000 (reference, the same function of the draws) against softmax."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2], device=device)
    for T, fn, n in [(1.0, gumbel_sample, 600), (0.5, gumbel_sample_reference, 40000)]:
        draws = fn(logits.expand(n, -1), temperature=T, generator=gen(1234, device))
        _, _, pval = chi2(torch.bincount(draws, minlength=8), torch.softmax(logits / T, 0))
        assert pval > 1e-3, (T, pval)
        # the test has power: the untempered distribution is rejected
        if T != 1.0:
            _, _, bad = chi2(torch.bincount(draws, minlength=8), torch.softmax(logits, 0))
            assert bad < 1e-9


@settings(max_examples=6)
@given(B=st.integers(1, 3), gamma=st.integers(1, 6), V=st.sampled_from([2, 33, 300, 4500]),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_speculative_accept_matches_reference(B, gamma, V, dtype, device):
    seed = fresh_seed()
    x, q, p = random_case(B, gamma, V, seed, dtype)
    n, nxt = speculative_accept(x, q, p, generator=gen(seed + 1, device))
    n_ref, nxt_ref = speculative_accept_reference(x, q.double(), p.double(),
                                                  generator=gen(seed + 1, device))
    assert n.dtype == nxt.dtype == torch.int64
    assert torch.equal(n, n_ref) and torch.equal(nxt, nxt_ref), (seed, n, n_ref, nxt, nxt_ref)
    assert ((0 <= n) & (n <= gamma)).all() and ((0 <= nxt) & (nxt < V)).all()


def test_accept_all_when_draft_equals_target_and_none_when_disjoint(device):
    B, gamma, V = 4, 3, 50
    x, q, p = random_case(B, gamma, V, 0)
    p[:, :gamma] = q  # p = q: min(1, p/q) = 1
    n, nxt = speculative_accept(x, q, p, generator=gen(1, device))
    assert (n == gamma).all()
    assert torch.equal(nxt, speculative_accept_reference(x, q, p, generator=gen(1, device))[1])
    # target gives the drafted token probability 0: rejected at once, resampled elsewhere
    p0 = p.clone()
    p0[:, 0] = torch.softmax(randn(B, V, g=gen(3, device)), -1)
    p0[torch.arange(B, device=device), 0, x[:, 0]] = 0
    p0[:, 0] /= p0[:, 0].sum(-1, keepdim=True)
    n, nxt = speculative_accept(x, q, p0, generator=gen(2, device))
    assert (n == 0).all() and (nxt != x[:, 0]).all()


def test_greedy_rule_on_one_hot_distributions(device):
    """At temperature 0 p, q are one-hot: accept while the target's argmax equals the draft."""
    V = 20
    drafts = torch.tensor([[3, 4, 5, 6], [1, 1, 1, 1]], device=device)
    target_argmax = torch.tensor([[3, 4, 9, 6, 7], [1, 1, 1, 1, 2]], device=device)
    q = torch.nn.functional.one_hot(drafts, V).float()
    p = torch.nn.functional.one_hot(target_argmax, V).float()
    n, nxt = speculative_accept(drafts, q, p, generator=gen(0, device))
    assert n.tolist() == [2, 4] and nxt.tolist() == [9, 2]


def first_token_counts(accept, x, q, p, seed):
    n, nxt = accept(x, q, p, generator=gen(seed))
    first = torch.where(n > 0, x[:, 0], nxt)  # the first token the round emits
    return torch.bincount(first, minlength=q.shape[-1])


def test_accept_output_is_target_distributed_and_wrong_rules_are_caught(device):
    """One fixed (p, q) pair repeated N times: the first emitted token must follow p, and each
    flawed rule that touches it must fail the same test (the bonus bug is tested below)."""
    V, gamma = 10, 2
    g = gen(7, device)
    q1 = torch.softmax(1.5 * randn(V, g=g), 0)
    p1 = torch.softmax(1.5 * randn(V, g=g), 0)

    def batch(n):
        q = q1.expand(n, gamma, V).contiguous()
        p = p1.expand(n, gamma + 1, V).contiguous()
        x = torch.multinomial(q1, n * gamma, replacement=True,
                              generator=gen(8, device)).reshape(n, gamma)
        return x, q, p

    for accept, n in [(speculative_accept, 600), (speculative_accept_reference, 40000)]:
        counts = first_token_counts(accept, *batch(n), seed=9)
        _, _, pval = chi2(counts, p1)
        assert pval > 1e-3, (accept.__name__, pval)
    for flaw in [f for f in FLAWS if f != "bonus from p_γ"]:
        _, _, pval_wrong = chi2(first_token_counts(rule(flaw), *batch(4000), 9), p1)
        assert pval_wrong < 1e-6, (flaw, pval_wrong)


def test_bonus_token_comes_from_the_last_target_row(device):
    """Every draft accepted (p_i = q_i): the extra token must follow p_{γ+1}; the bonus bug
    draws it from p_γ and is caught."""
    V, gamma, n = 12, 3, 3000
    g = gen(17, device)
    q = torch.softmax(1.5 * randn(gamma, V, g=g), -1)
    last = torch.softmax(1.5 * randn(V, g=g), 0)
    p = torch.cat([q, last[None]]).expand(n, -1, -1).contiguous()
    x = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=g)
                     for i in range(gamma)], 1)
    q = q.expand(n, -1, -1).contiguous()
    for accept in (speculative_accept_reference, rule("bonus from p_γ")):
        k, nxt = accept(x, q, p, generator=gen(18, device))
        assert (k == gamma).all()
        _, _, pval = chi2(torch.bincount(nxt, minlength=V), last)
        assert (pval > 1e-3) if accept is speculative_accept_reference else (pval < 1e-6)


def test_bad_inputs_are_named(device):
    x, q, p = random_case(2, 3, 11, 0)
    cases = [
        ((x[:, :2], q, p), "draft_probs"),
        ((x, q, p[:, :3]), "target_probs"),
        ((x, q[..., :10], p), "target_probs"),
        ((x + 11, q, p), "draft_tokens"),
        ((x.float(), q, p), "draft_tokens"),
        ((x, q * 2, p), "draft_probs"),
        ((x, q, -p), "target_probs"),
        ((x, q, p * float("nan")), "target_probs"),
        ((x, q.int(), p), "draft_probs"),
        ((x[0], q, p), "draft_tokens"),
    ]
    for fn in (speculative_accept, speculative_accept_reference):
        for args, name in cases:
            with pytest.raises((ValueError, TypeError), match=name):
                fn(*args)
    q0 = q.clone()
    q0[0, 0] = 0
    q0[0, 0, (x[0, 0] + 1) % 11] = 1
    with pytest.raises(ValueError, match="probability 0"):
        speculative_accept(x, q0, p)
    for fn in (gumbel_sample, gumbel_sample_reference):
        with pytest.raises(ValueError, match="temperature"):
            fn(torch.randn(2, 5, device=device), temperature=-1.0)
        with pytest.raises(ValueError, match="temperature"):
            fn(torch.randn(2, 5, device=device), temperature=float("nan"))
        with pytest.raises(ValueError, match="logits"):
            fn(torch.randn(5, device=device))
        with pytest.raises(TypeError, match="logits"):
            fn(torch.randn(2, 5, device=device).long())


@pytest.mark.interpreter
def test_kernels_move_the_analytic_bytes():
    """Each probability row is read once; q_n only when a draft was rejected (iocount)."""
    from shared import iocount

    B, gamma, V = 3, 4, 700
    x, q, p = random_case(B, gamma, V, 5)
    p[1, :gamma] = q[1]  # row 1 accepts everything: its q_n row must not be read
    with iocount.count() as io:
        n, _ = speculative_accept(x, q, p, generator=gen(0))
    rejected = int((n < gamma).sum())
    assert n[1] == gamma and rejected >= 1
    assert io.bytes_total == B * (gamma * 20 + 2 * V * 4 + 16) + rejected * V * 4
    with iocount.count() as io:
        gumbel_sample(randn(B, V, g=gen(1)), generator=gen(0))
    assert io.bytes_total == B * (2 * V * 4 + 8)
    with iocount.count() as io:
        gumbel_sample(randn(B, V, g=gen(2)), temperature=0.0)
    assert io.bytes_total == B * (V * 4 + 8)  # greedy reads no noise
