"""The tiny Llama on the paged KV cache: the same greedy tokens as on its contiguous cache, and
the paged_attention kernel over the model's blocks equal to attention over the gathered keys."""

import torch

from shared.inference.kv_cache import KVCache
from shared.inference.paged_cache import PagedKVCache
from shared.models import zoo


def _greedy(model, prompt, n_new, cache):
    logits = model(prompt, cache=cache)[:, -1]
    cache.advance(prompt.shape[1])
    out = []
    for _ in range(n_new):
        out.append(logits.argmax(-1))
        logits = model(out[-1][:, None], cache=cache)[:, -1]
        cache.advance(1)
    return torch.stack(out, 1)


def test_same_tokens_as_the_contiguous_cache():
    model = zoo.load("draft", train_if_missing=False)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (3, 11), generator=g)
    n_new = 12
    with torch.no_grad():
        want = _greedy(model, prompt, n_new, KVCache(model.config, 3, max_len=11 + n_new))
        paged = PagedKVCache(model.config, 3, num_blocks=18, block_size=4)
        got = _greedy(model, prompt, n_new, paged)
    assert torch.equal(got, want)
    # 23 tokens in blocks of 4: 6 blocks per sequence, none held beyond the last
    assert paged.reserved_slots() == 3 * 24
    paged.manager.check()


def test_decode_attention_reads_the_models_blocks():
    model = zoo.load("draft", train_if_missing=False)
    cfg = model.config
    cache = PagedKVCache(cfg, 2, num_blocks=8, block_size=4)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (2, 9)), cache=cache)
    lens = torch.tensor([9, 9])
    q = torch.randn(2, cfg.n_heads, cfg.head_dim)
    out = cache.decode_attention(0, q, lens)
    k = cache.k[0][cache.slot_mapping(torch.arange(9).expand(2, 9))]   # [B, 9, Hkv, hd]
    v = cache.v[0][cache.slot_mapping(torch.arange(9).expand(2, 9))]
    rep = cfg.n_heads // cfg.n_kv_heads
    s = torch.einsum("bhd,bnhd->bhn", q, k.repeat_interleave(rep, 2)) / cfg.head_dim ** 0.5
    want = torch.einsum("bhn,bnhd->bhd", s.softmax(-1), v.repeat_interleave(rep, 2))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
