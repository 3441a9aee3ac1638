"""Speculative decoding (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023, Algorithm 2).

Each round, per sequence of the batch:
  1. the drafter proposes γ tokens x_1..x_γ ~ q autoregressively (γ cheap forwards);
  2. the target scores [last, x_1..x_γ] in ONE forward: p_1..p_{γ+1};
  3. speculative_accept keeps x_i while u_i < p_i(x_i)/q_i(x_i), and adds one token drawn from
     norm(max(0, p − q)) at the first rejection (or from p_{γ+1} if none): n + 1 tokens, n ≤ γ.
  4. both KV caches roll back to the kept prefix (their own length per sequence).
Host syncs: one per round, to learn whether every sequence is done, and only from the first
round that could be the last (a round yields 1 to γ+1 tokens per sequence). Nothing else
reads the device back, unless KC_DEBUG=1 turns on the rule's input checks.
The drafter is a separate small model, or the target's own first k blocks + its head
(LayerSkip self-speculation, Elhoushi et al. 2024): ``Drafter(target, n_layers=k)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.sampling.checks import check_generator
from shared.inference.generate import (
    Generation,
    Phases,
    check_prompt,
    model_device,
    next_token,
    ops,
    phase_timer,
    probs,
)
from shared.inference.kv_cache import KVCache
from shared.models.llama import Llama, debug_checks


@dataclass(frozen=True)
class Drafter:
    """A model that drafts: `model` run through its first `n_layers` blocks (None: all)."""

    model: Llama
    n_layers: int | None = None

    @property
    def name(self) -> str:
        if self.n_layers is None:
            return f"draft model ({self.model.config.n_layers} layers)"
        return f"self-draft (first {self.n_layers} of {self.model.config.n_layers} layers)"


@dataclass
class SpecGeneration(Generation):
    gamma: int = 0
    accepted: list[torch.Tensor] = field(default_factory=list)  # per round: n accepted [B]
    overlap: list[torch.Tensor] = field(default_factory=list)  # per round: Σ min(p_i,q_i) [B, γ]
    active: list[torch.Tensor] = field(default_factory=list)  # per round: still generating [B]

    def acceptance(self) -> tuple[float, float]:
        """(measured α, predicted α): accepted / tried drafts, and the mean of the expected
        acceptance β_i = Σ_v min(p_i(v), q_i(v)) (Leviathan et al. §3) over the same tried drafts.
        A draft is tried if every draft before it in its round was accepted."""
        n = torch.stack(self.accepted)  # [R, B]
        act = torch.stack(self.active)  # [R, B]
        beta = torch.stack(self.overlap)  # [R, B, γ]
        idx = torch.arange(self.gamma, device=n.device)
        tried = (idx <= n[..., None]) & act[..., None]  # [R, B, γ]
        accepted = (idx < n[..., None]) & act[..., None]
        return (accepted.sum() / tried.sum()).item(), beta[tried].mean().item()

    def acceptance_by_position(self) -> torch.Tensor:
        """P(draft i accepted | drafts before it accepted), i = 1..γ: [γ]."""
        n = torch.stack(self.accepted)[torch.stack(self.active)]  # [rounds × active B]
        idx = torch.arange(self.gamma, device=n.device)
        return (n[:, None] > idx).sum(0) / (n[:, None] >= idx).sum(0).clamp(min=1)

    def tokens_per_call(self) -> float:
        """New tokens per target forward, the prefill not counted (paper's E[#tokens])."""
        n = torch.stack(self.accepted)[torch.stack(self.active)]
        return (n + 1).float().mean().item()


@torch.no_grad()
def speculative_generate(target: Llama, drafter: Drafter, prompt: torch.Tensor,
                         max_new_tokens: int, *, gamma: int, temperature: float = 0.0,
                         generator: torch.Generator | None = None, impl: str | None = None,
                         accept=None, profile: Phases | None = None) -> SpecGeneration:
    """prompt int64 [B, P] -> SpecGeneration with tokens [B, max_new_tokens].

    ``accept`` overrides the acceptance rule (same signature as speculative_accept): the tests
    plug wrong rules in (shared/inference/wrong_rules.py) to show the distribution test
    catches them. Inputs to the rule are built here from softmaxes, so its
    (host-synchronising) input checks run only under KC_DEBUG=1. `generator`, when given,
    must be on the target's device. `profile` (a Phases) collects the time of each phase:
    prefill, draft (per drafter step), verify (per target forward), rule, bookkeeping.
    """
    if not isinstance(gamma, int) or isinstance(gamma, bool) or gamma < 1:
        raise ValueError(f"gamma must be an int >= 1, got {gamma!r}")
    check_prompt(target, prompt, max_new_tokens, extra=gamma + 1)
    sample, default_accept = ops(impl)
    greedy = temperature == 0 and accept is None  # an overridden rule always runs as given
    accept = accept or default_accept
    dmodel, k = drafter.model, drafter.n_layers
    dtype, device = target.lm_head.weight.dtype, model_device(target)
    if model_device(dmodel) != device:
        raise ValueError(f"drafter is on {model_device(dmodel)} but target is on {device}")
    check_generator(generator, device)
    timer = phase_timer(profile, device)
    prompt = prompt.to(device)
    B, P = prompt.shape
    size = P + max_new_tokens + gamma + 1
    tcache = KVCache(target.config, B, max_len=size, dtype=dtype, device=device)
    dcache = KVCache(dmodel.config, B, n_layers=k, max_len=size, dtype=dtype, device=device)
    rows, idx = torch.arange(B, device=device), torch.arange(gamma, device=device)

    # Prefill the caches on all but the prompt's last token: the first round then scores
    # p(· | prompt) itself, so every new token, the first included, passes the rule.
    with timer("prefill"):
        target(prompt[:, :-1], cache=tcache)
        tcache.advance(P - 1)
        if P > 2:
            dmodel(prompt[:, :-2], cache=dcache, n_layers=k)
    # New tokens; the last column is a dump for the writes a round does not keep (step 4).
    out = torch.zeros(B, max_new_tokens + gamma + 2, dtype=torch.long, device=device)
    dump = out.shape[1] - 1
    count = torch.zeros(B, dtype=torch.long, device=device)  # new tokens so far
    prev = prompt[:, -2]  # token before `last`: the draft cache may lack it (see step 1)
    last = prompt[:, -1]  # newest token: in neither cache yet
    result = SpecGeneration(tokens=out, target_calls=1, draft_calls=int(P > 2), gamma=gamma)
    rounds = 0
    # Every active sequence gains >= 1 token a round, at most γ+1: no sequence can be done
    # before round ceil(max_new / (γ+1)), and all are after max_new rounds. Only in between
    # is the device asked (the one host sync per round).
    while rounds < max_new_tokens and (rounds * (gamma + 1) < max_new_tokens
                                       or bool((count < max_new_tokens).any())):
        rounds += 1
        active = count < max_new_tokens
        # 1. Draft γ tokens. The first step re-feeds `prev`: after a round where all γ drafts
        #    were accepted, the drafter never saw x_γ; rewriting a cached entry is harmless.
        # Finished sequences ride along (their outputs are dropped); park them at position 1
        # so their wasted work never runs past max_seq_len.
        start = torch.where(active, tcache.lengths, 1)  # position of `last`, per sequence
        tcache.set_lengths(start)
        dcache.set_lengths(start - 1)
        x_in = torch.stack([prev, last], 1)  # [B, 2]
        drafts, draft_logits = [], []
        with timer("draft", calls=gamma):
            for _ in range(gamma):
                logits = dmodel(x_in, cache=dcache, n_layers=k)[:, -1]  # [B, V]
                dcache.advance(x_in.shape[1])
                draft_logits.append(logits)
                # the token choice the autoregressive loop makes, so c compares like with like
                drafts.append(next_token(logits, temperature, generator, sample))
                x_in = drafts[-1][:, None]
            drafts_t = torch.stack(drafts, 1)  # [B, γ]
        # 2. The target scores last + γ drafts in one forward: p_1..p_{γ+1}.
        with timer("verify"):
            tokens = torch.cat([last[:, None], drafts_t], 1)  # [B, γ+1]
            target_logits = target(tokens, cache=tcache)  # [B, γ+1, V]
        # 3. The rule (Alg. 1): n accepted drafts + one token from the residual or p_{γ+1}.
        with timer("rule"):
            if greedy:
                # p, q one-hot: accept while the draft is the target's argmax; the residual is
                # the target's argmax at the first mismatch (the rule's T -> 0 limit, tested).
                best = target_logits.argmax(-1)  # [B, γ+1]
                match = drafts_t == best[:, :gamma]
                n = torch.where(match, gamma, idx).amin(1)
                nxt = best[rows, n]
                overlap = match.float()  # Σ min(p, q) of one-hot p, q
            else:
                q_t = probs(torch.stack(draft_logits, 1), temperature)  # [B, γ, V]
                p_t = probs(target_logits, temperature)  # [B, γ+1, V]
                n, nxt = accept(drafts_t, q_t, p_t, generator=generator,
                                check_inputs=debug_checks())
                overlap = torch.minimum(p_t[:, :gamma], q_t).sum(-1)  # [B, γ]
        with timer("bookkeeping"):
            result.accepted.append(n)
            result.active.append(active)
            result.overlap.append(overlap)
            # 4. Keep x_1..x_n and the new token; roll the target cache back to last + x_1..x_n.
            j = torch.arange(gamma + 1, device=device)
            new = torch.where(j < n[:, None], torch.cat([drafts_t, drafts_t[:, :1]], 1),
                              nxt[:, None])  # [B, γ+1]: x_1..x_n, next, (ignored)
            keep = (j <= n[:, None]) & active[:, None]
            # A scatter, not out[mask] = ...: boolean indexing counts the mask on the host.
            out.scatter_(1, torch.where(keep, count[:, None] + j, dump), new)
            count = count + torch.where(active, n + 1, 0)
            tcache.set_lengths(start + torch.where(active, n + 1, 0))
            prev = torch.where(active, torch.where(n > 0, drafts_t[rows, (n - 1).clamp(min=0)],
                                                   last), prev)
            last = torch.where(active, nxt, last)
        result.target_calls += 1
        result.draft_calls += gamma
    result.tokens = out[:, :max_new_tokens]
    return result
