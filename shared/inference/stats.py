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


def chi_square(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0):
    """Pearson's goodness-of-fit test of `counts` [K] against `probs` [K] -> (statistic, dof,
    p-value). Categories expected fewer than `min_expected` times are pooled into one, as the
    χ² approximation needs; a count in a category of probability 0 gives p-value 0."""
    counts = counts.detach().double().flatten().cpu()  # a host-side statistic, after the run
    probs = probs.detach().double().flatten().cpu()
    if counts.shape != probs.shape:
        raise ValueError(f"counts {tuple(counts.shape)} and probs {tuple(probs.shape)} differ")
    n = counts.sum()
    if (counts[probs == 0] > 0).any():
        return float("inf"), 0, 0.0
    expected = probs / probs.sum() * n
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = int(obs.numel()) - 1
    if dof < 1:
        raise ValueError("need at least two categories with enough expected counts")
    # P(χ²_dof > stat) = Q(dof/2, stat/2), the regularised upper incomplete gamma function
    p_value = torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2)
    return stat.item(), dof, p_value.item()


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
