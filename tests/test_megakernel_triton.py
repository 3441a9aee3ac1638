"""The persistent Triton kernel runs a decode step's task graph: logits against a float64
model, tokens against torch eager, the same kernel launched once per operator, and a starved
wait that ends in an error instead of a hang."""

import pytest
import torch

from kernels.device import INTERPRET
from shared.inference.kv_cache import KVCache
from shared.megakernel.graph import operators
from shared.megakernel.runtime import MegakernelDecoder, eager_step
from shared.models.llama import Llama, LlamaConfig

# ragged everywhere: vocab 100 and ffn 96 are not multiples of the 64-column tiles
TINY = LlamaConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                   max_seq_len=80)
# fp32: exact in the interpreter; on a GPU tl.dot is TF32, fp16's budget (shared.check)
TOL = {torch.float32: 1e-4 if INTERPRET else 2e-3, torch.float16: 2e-2}


def _model(seed: int, dtype, device) -> Llama:
    torch.manual_seed(seed)
    m = Llama(TINY)
    for p in m.parameters():   # trained-like scales: unit norms, not the init's ones
        if p.ndim == 1:
            p.data.uniform_(0.5, 1.5)
    return m.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _prefill(model, cache, prompt):
    model(prompt, cache=cache)
    cache.lengths += prompt.shape[1]


@pytest.mark.parametrize("batch,dtype,prompt_len,seed,row_block", [
    (1, torch.float32, 1, 0, None), (3, torch.float32, 70, 1, None),
    (2, torch.float16, 9, 2, None), (3, torch.float16, 5, 6, 32)])
def test_persistent_step_matches_float64_and_eager(batch, dtype, prompt_len, seed, row_block,
                                                   device):
    model = _model(seed, dtype, device)
    ref = _model(seed, dtype, device).double()
    dec = MegakernelDecoder(model, batch, max_len=80, tile=64)
    if row_block:   # rows wider than BLOCK_R: two-pass RMSNorm, a 4-step ragged argmax
        dec.blocks["BLOCK_R"] = row_block
    caches = {"eager": KVCache(TINY, batch, max_len=80, dtype=dtype, device=device),
              "f64": KVCache(TINY, batch, max_len=80, dtype=torch.float64, device=device)}
    prompt = torch.randint(0, TINY.vocab_size, (batch, prompt_len), device=device)
    _prefill(model, dec.cache, prompt)
    _prefill(model, caches["eager"], prompt)
    _prefill(ref, caches["f64"], prompt)
    # slots past the context are poisoned: the attention task must never read them (eager
    # reads every slot and masks, so the poison goes in after its prefill)
    dec.cache.k[:, :, :, prompt_len:] = float("nan")
    dec.cache.v[:, :, :, prompt_len:] = float("nan")
    tok = prompt[:, -1]   # a strided view: the kernel must not assume contiguous tokens
    for mode in ("persistent", "per_operator"):
        logits, nxt = dec.step(tok, mode=mode)
        eager, eager_next = eager_step(model, caches["eager"], tok)
        truth, _ = eager_step(ref, caches["f64"], tok)
        err = ((logits.double() - truth).norm() / truth.norm()).item()
        assert err < TOL[dtype], (mode, err)
        assert torch.isfinite(logits).all()
        assert torch.equal(nxt, logits.argmax(-1))          # the kernel's own argmax task
        if dtype == torch.float32:                           # same rounding family as eager
            assert torch.equal(nxt, eager_next), (mode, nxt, eager_next)
        tok = nxt
    assert dec.launches == 1 + len(operators(dec.graph))


def test_per_operator_path_counts_one_launch_per_operator(device):
    dec = MegakernelDecoder(_model(3, torch.float32, device), 2, max_len=16)
    tok = torch.tensor([5, 7], device=device)
    dec.step(tok)
    assert dec.launches == 1
    dec.step(tok, mode="per_operator")
    assert dec.launches == 1 + 1 + 10 * TINY.n_layers + 3


@pytest.mark.skipif(not INTERPRET, reason="on a GPU both workers run at once and never starve")
def test_two_workers_in_the_interpreter_starve_with_an_error_not_a_hang(device):
    dec = MegakernelDecoder(_model(4, torch.float32, device), 1, max_len=16, workers=2)
    with pytest.raises(RuntimeError, match="starved"):
        dec.step(torch.tensor([1], device=device))


def test_bad_inputs(device):
    model = _model(5, torch.float32, device)
    with pytest.raises(ValueError, match="batch"):
        MegakernelDecoder(model, 17)
    with pytest.raises(ValueError, match="tile"):
        MegakernelDecoder(model, 1, tile=48)
    with pytest.raises(TypeError, match="model"):
        MegakernelDecoder(object(), 1)
    # ffn_dim 90: the down projection's K breaks the 16-byte weight alignment the kernel assumes
    odd = Llama(LlamaConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                            ffn_dim=90, max_seq_len=8))
    with pytest.raises(ValueError, match="multiples of 8"):
        MegakernelDecoder(odd.to(device), 1)
    dec = MegakernelDecoder(model, 2, max_len=4)
    with pytest.raises(ValueError, match="tokens"):
        dec.step(torch.tensor([1, 2, 3], device=device))
    with pytest.raises(ValueError, match="mode"):
        dec.step(torch.tensor([1, 2], device=device), mode="eager")
    dec.cache.lengths += 4
    with pytest.raises(ValueError, match="full"):
        dec.step(torch.tensor([1, 2], device=device))


def test_argmax_ties_go_to_the_lowest_index_across_row_steps(device):
    """The winning token's lm-head row copied to a token 40 away: equal, largest logits in
    different 32-wide argmax steps, and torch.argmax's lowest index must win."""
    model = _model(7, torch.float32, device)
    tok = torch.tensor([5], device=device)
    best = int(eager_step(model, KVCache(TINY, 1, max_len=8, device=device), tok)[1])
    twin = (best + 40) % TINY.vocab_size
    model.lm_head.weight[twin] = model.lm_head.weight[best]
    dec = MegakernelDecoder(model, 1, max_len=8, tile=64)
    dec.blocks["BLOCK_R"] = 32
    logits, nxt = dec.step(tok)
    assert logits[0, best] == logits[0, twin] == logits.max()
    assert int(nxt) == min(best, twin)
