"""The paper's formulas and the statistics that check them.

Leviathan et al. 2023, §3: with acceptance rate α (the expected Σ_v min(p(v), q(v))), γ drafts
per round and c = (time of one drafter forward) / (time of one target forward):
    E[tokens per target call] = (1 − α^(γ+1)) / (1 − α)                          (eq. 1)
    speed-up over autoregressive = (1 − α^(γ+1)) / ((1 − α)(γc + 1))            (Theorem 3.8)
"""

from __future__ import annotations

import torch


def expected_tokens(alpha: float, gamma: int) -> float:
    """E[new tokens per target forward] = (1 − α^(γ+1)) / (1 − α); γ + 1 at α = 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 1.0:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def model_speedup(alpha: float, gamma: int, c: float) -> float:
    """The paper's walltime improvement: E[tokens] / (γc + 1)."""
    if c < 0:
        raise ValueError(f"c must be >= 0, got {c}")
    return expected_tokens(alpha, gamma) / (gamma * c + 1)


def best_gamma(alpha: float, c: float, gammas=range(1, 9)) -> int:
    return max(gammas, key=lambda g: model_speedup(alpha, g, c))


def _pooled(counts: torch.Tensor, expected: torch.Tensor, small: torch.Tensor):
    """Counts [..., K] and expected [K] with the `small` categories pooled into one."""
    obs = torch.cat([counts[..., ~small], counts[..., small].sum(-1, keepdim=True)], -1)
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    return obs[..., keep], exp[keep]


def _p_value(stat: torch.Tensor, dof: int) -> torch.Tensor:
    # P(χ²_dof > stat) = Q(dof/2, stat/2), the regularised upper incomplete gamma function
    return torch.special.gammaincc(torch.full_like(stat, dof / 2.0), stat / 2)


def chi_square(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0):
    """Pearson's goodness-of-fit test of `counts` [K] against `probs` [K] -> (statistic, dof,
    p-value). Categories expected fewer than `min_expected` times are pooled into one, as the
    χ² approximation needs; a count in a category of probability 0 gives p-value 0."""
    counts = counts.detach().double().flatten().cpu()  # a host-side statistic, after the run
    probs = probs.detach().double().flatten().cpu()
    if counts.shape != probs.shape:
        raise ValueError(f"counts {tuple(counts.shape)} and probs {tuple(probs.shape)} differ")
    if (counts[probs == 0] > 0).any():
        return float("inf"), 0, 0.0
    expected = probs / probs.sum() * counts.sum()
    obs, exp = _pooled(counts, expected, expected < min_expected)
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = int(obs.numel()) - 1
    if dof < 1:
        raise ValueError("need at least two categories with enough expected counts")
    return stat.item(), dof, _p_value(stat, dof).item()


def _p_values(counts: torch.Tensor, probs: torch.Tensor, min_expected: float) -> torch.Tensor:
    """chi_square's p-value for every row of counts [S, K] against probs [K] (vectorised)."""
    expected = probs / probs.sum() * counts[0].sum()
    obs, exp = _pooled(counts, expected, expected < min_expected)
    if obs.shape[-1] < 2:
        raise ValueError("need at least two categories with enough expected counts")
    p = _p_value(((obs - exp) ** 2 / exp).sum(-1), obs.shape[-1] - 1)
    return torch.where((counts[:, probs == 0] > 0).any(-1), 0.0, p)


def _draw(probs: torch.Tensor, n: int, sims: int, seed: int) -> torch.Tensor:
    """sims multinomial samples of n draws from probs [K] -> counts [sims, K] (float64)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(probs.expand(sims, -1), n, replacement=True, generator=g)
    return torch.zeros(sims, probs.numel(), dtype=torch.float64).scatter_add_(
        1, idx, torch.ones_like(idx, dtype=torch.float64))


def _host64(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().double().cpu() for t in ts]


def _check_power_args(null, alternative, n, level, sims) -> None:
    if null.shape != alternative.shape:
        raise ValueError(f"null {tuple(null.shape)} and alternative "
                         f"{tuple(alternative.shape)} differ")
    if not 0 < level < 1 or n < 1 or sims < 1:
        raise ValueError(f"need 0 < level < 1, n >= 1, sims >= 1; got {level=} {n=} {sims=}")


def chi_square_power(null: torch.Tensor, alternative: torch.Tensor, n: int, level: float, *,
                     sims: int = 400, seed: int = 0, min_expected: float = 5.0) -> float:
    """The chance that `chi_square` of n draws from `alternative` against `null` gives a
    p-value below `level`: its power against that alternative (its size when the two are
    equal). Monte Carlo over `sims` seeded multinomial samples, the test's own pooling."""
    null, alternative = (t.flatten() for t in _host64(null, alternative))
    _check_power_args(null, alternative, n, level, sims)
    counts = _draw(alternative, n, sims, seed)
    return (_p_values(counts, null, min_expected) < level).double().mean().item()


def two_token_p_values(counts: torch.Tensor, exact: torch.Tensor,
                       min_expected: float = 5.0) -> torch.Tensor:
    """The lab's test of the first two sampled tokens: counts [..., V, V] of (t1, t2) pairs
    against the exact joint [V, V] -> p-values [..., 4]: t1's marginal, t2's marginal, the
    joint (pairs), and the three combined (Bonferroni: 3 × the smallest, capped at 1). The
    marginals see a bug in one token with few categories; the joint sees a bug in how t2
    depends on t1, which neither marginal shows, but spreads its counts over V² cells."""
    counts, exact = _host64(counts, exact)
    V = exact.shape[-1]
    if exact.shape != (V, V) or counts.shape[-2:] != (V, V):
        raise ValueError(f"counts [..., V, V] and exact [V, V] expected, got "
                         f"{tuple(counts.shape)} and {tuple(exact.shape)}")
    flat = counts.reshape(-1, V, V)
    p = torch.stack([_p_values(flat.sum(2), exact.sum(1), min_expected),
                     _p_values(flat.sum(1), exact.sum(0), min_expected),
                     _p_values(flat.reshape(-1, V * V), exact.flatten(), min_expected)], -1)
    p = torch.cat([p, (3 * p.amin(-1, keepdim=True)).clamp(max=1)], -1)
    return p.reshape(*counts.shape[:-2], 4)


def two_token_power(exact: torch.Tensor, alternative: torch.Tensor, n: int, level: float, *,
                    sims: int = 400, seed: int = 0) -> float:
    """Power of the combined two_token_p_values test at `level` against `alternative` [V, V],
    with n sampled pairs (Monte Carlo; its size when alternative is exact)."""
    exact, alternative = _host64(exact, alternative)
    _check_power_args(exact, alternative, n, level, sims)
    counts = _draw(alternative.flatten(), n, sims, seed).reshape(sims, *exact.shape)
    return (two_token_p_values(counts, exact)[:, 3] < level).double().mean().item()


def alpha_needed(speedup: float, gamma: int, c: float) -> float:
    """The smallest α whose model speed-up at (γ, c) reaches `speedup` (bisection; the model
    grows with α); 1.0 if even α = 1 falls short: then only a cheaper drafter helps."""
    if model_speedup(1.0, gamma, c) < speedup:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if model_speedup(mid, gamma, c) < speedup else (lo, mid)
    return hi
