"""
SWAN-GPT attention (attention.py): sliding-window RoPE layers (pattern letter W) against an explicit
masked softmax (and the blockwise path of long sequences against the dense window mask), their
constant-size ring cache against the full forward (past the ring's wrap-around)
and under speculative rollback, and the dynamic query scaling of NoPE layers (of them alone, on every
attention path: W and RoPE layers are left as they are).

    python -m pytest -q tests/test_swan.py
"""
import math

import pytest
import torch
import torch.nn.functional as F

from attention import Attention, apply_rope, banded, swan_scale
from helpers import assert_close
from checkpoint import CheckpointError
from generate import KVCache, new_cache
from model import Nemotron, NemotronConfig

TINY = dict(d_model=32, n_head=4, n_kv_head=2, head_dim=8, d_ff=64, mamba_heads=2, mamba_head_dim=16, d_state=8,
            chunk_size=16, n_experts=4, moe_d_ff=16, shared_d_ff=16)


def test_sliding_window_is_a_banded_softmax():
    """Query p attends to keys p-W+1 .. p with RoPE at absolute positions: an explicit softmax."""
    torch.manual_seed(0)
    cfg = NemotronConfig(**TINY)
    att = Attention(cfg, window=5)
    x = torch.randn(2, 13, 32)
    y = att(x)
    q = apply_rope(att.q_proj(x).view(2, 13, 4, 8).transpose(1, 2), 0, cfg.rope_theta)
    k = apply_rope(att.k_proj(x).view(2, 13, 2, 8).transpose(1, 2), 0, cfg.rope_theta).repeat_interleave(2, 1)
    v = att.v_proj(x).view(2, 13, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    i, j = torch.arange(13)[:, None], torch.arange(13)[None]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~((j <= i) & (i - j < 5)), float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 13, 32)
    assert_close(y, att.o_proj(ref), "sliding-window attention", atol=1e-5)


@pytest.mark.parametrize("T, w, docs", [(37, 8, False), (64, 16, False), (50, 7, True), (9, 4, True)])
def test_banded_equals_the_dense_window_mask(T, w, docs):
    """The blockwise path of long W-layer sequences (2Tw scores) against sdpa with the whole T x T
    window mask: outputs and the gradients of q, k, v to 1e-5, with GQA, a last block cut short and
    packed documents."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, T, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, T, 8, requires_grad=True) for _ in range(2))
    seq_idx = torch.randint(0, 3, (2, T)).sort(1).values if docs else None
    p = torch.arange(T)
    mask = (p[None] <= p[:, None]) & (p[:, None] - p[None] < w)  # (T, T)
    if docs:
        mask = (mask & (seq_idx[:, :, None] == seq_idx[:, None, :]))[:, None]  # (B, 1, T, T)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out = banded(q, k, v, w, seq_idx)
    assert_close(out, ref, "banded attention", atol=1e-5)
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for name, a, b in zip("qkv", torch.autograd.grad(out.square().sum(), (q, k, v)), g_ref):
        assert_close(a, b, f"grad {name}", atol=1e-5)


@torch.no_grad()
def test_ring_cache_decodes_like_the_full_forward():
    """Prefill 9 tokens, then decode 30 one at a time through a ring of W + 8 = 12 slots (it wraps
    around twice): the logits at every position equal one forward over the whole sequence."""
    torch.manual_seed(0)
    model = Nemotron(NemotronConfig(**TINY, pattern="MW*-W", sliding_window=4)).eval()
    x = torch.randint(0, 256, (2, 39))
    full = model(x)[0]
    cache = new_cache(model, 2, 1000)
    assert all(c.k.size(2) == 12 for b, c in zip(model.backbone.layers, cache) if b.kind == "W")
    steps = [model.lm_head(model.hidden(x[:, :9], cache))]
    steps += [model.lm_head(model.hidden(x[:, t:t + 1], cache)) for t in range(9, 39)]
    assert_close(torch.cat(steps, dim=1), full, "decoded logits", atol=1e-4)


def test_speculative_decoding_with_sliding_window_layers():
    """Rolling back a W layer's ring (up to 8 dropped entries) loses no key still in the window."""
    torch.manual_seed(0)
    model = Nemotron(NemotronConfig(**TINY, pattern="MW*E", sliding_window=3, mtp_depth=1, mtp_share=True)).eval()
    with torch.no_grad():
        v = torch.randn(32)
        model.lm_head.weight.mul_(0.01)
        model.lm_head.weight[1], model.lm_head.weight[2] = v, -v
    prompt = torch.randint(0, 256, (1, 6))
    plain = model.generate(prompt, 30, temperature=0)
    for k in (2, 4):
        assert torch.equal(model.generate(prompt, 30, temperature=0, speculative=k), plain)


def test_sliding_window_respects_documents():
    torch.manual_seed(0)
    model = Nemotron(NemotronConfig(**TINY, pattern="W-W", sliding_window=6)).eval()
    a, b = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (1, 9))
    seq_idx = torch.tensor([[0] * 7 + [1] * 9])
    packed = model(torch.cat([a, b], 1), seq_idx=seq_idx)[0]
    assert_close(packed[:, 7:], model(b)[0], "second document alone", atol=1e-5)


def test_swan_scale_formula_and_nope_layers():
    """s(p) = max(1, log(p+1)/log(L)): 1 within the training length, log-growing beyond; applied to
    NoPE layers only, so logits change only past position L-1."""
    s = swan_scale(torch.tensor([0, 63, 64, 255, 4095]), 64)
    assert_close(s, torch.tensor([1.0, 1.0, math.log(65) / math.log(64), math.log(256) / math.log(64), 2.0]),
                 "scale", atol=1e-6)
    torch.manual_seed(0)
    big = dict(TINY, init_std=0.3)  # sharp enough attention for the scale to show
    plain = Nemotron(NemotronConfig(**big, pattern="W*W-")).eval()
    scaled = Nemotron(NemotronConfig(**big, pattern="W*W-", swan_train_len=16)).eval()
    scaled.load_state_dict(plain.state_dict())
    x = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        a, b = plain(x)[0], scaled(x)[0]
    assert_close(a[:, :16], b[:, :16], "within the training length", atol=1e-6)
    assert (a[:, 16:] - b[:, 16:]).abs().amax() > 1e-2


def test_w_layers_cannot_go_to_hugging_face(tmp_path):
    with pytest.raises(CheckpointError, match="sliding-window"):
        Nemotron(NemotronConfig(**TINY, pattern="MW")).save_pretrained(tmp_path)


def attention_paths(att, x, seq_idx):
    """One attention layer's outputs (B, T, d_model) for x (B, T, d_model), T = 40, along each path the
    query scale is applied on: "forward" (no cache; for a W layer with window 6 the banded path),
    "short" (the first 10 tokens: a W layer's masked path, T <= 2W), "documents" (packed, seq_idx),
    "decode" (a cache: prefill 9, single tokens to 30, a 5-token chunk after the cached prefix, single
    tokens to 40; a W layer's ring wraps)."""
    with torch.no_grad():
        out = {"forward": att(x), "short": att(x[:, :10]), "documents": att(x, seq_idx=seq_idx)}
        cache = KVCache.empty(att, x.size(0), x.size(1), x.device, x.dtype)
        cuts = [0, 9, *range(10, 31), 35, *range(36, 41)]
        out["decode"] = torch.cat([att(x[:, a:b], cache) for a, b in zip(cuts, cuts[1:])], dim=1)
    return out


def test_swan_scale_reaches_only_nope_global_layers():
    """swan_train_len = 4 against None, the same weights, positions 0 .. 39 (s(39) = 2.7): a W layer and
    a RoPE * layer give the same outputs along every path (forward, banded and masked, packed
    documents, cached decoding), to 1e-6 (the same arithmetic: no scale should be applied at all);
    the NoPE * layer the same up to position 3 (s = 1) and outputs differing by > 1e-2 beyond (the
    scale is there), and its cached decoding equals its own forward to 1e-5 (fp32, a different
    summation order), so decoding scales by the absolute position. init_std 0.3: attention sharp
    enough for the scale to show."""
    big = dict(TINY, init_std=0.3, sliding_window=6)
    layers = {}
    for swan in (None, 4):
        torch.manual_seed(0)  # the same weights with and without the scale
        local_nope = Nemotron(NemotronConfig(**big, pattern="W*", swan_train_len=swan)).backbone.layers
        torch.manual_seed(1)
        rope = Nemotron(NemotronConfig(**big, pattern="*", rope=True, swan_train_len=swan)).backbone.layers
        layers[swan] = {"W": local_nope[0].mixer, "RoPE *": rope[0].mixer, "NoPE *": local_nope[1].mixer}
    torch.manual_seed(2)
    x = torch.randn(2, 40, 32)
    seq_idx = torch.tensor([[0] * 40, [0] * 13 + [1] * 27])
    for kind in ("W", "RoPE *", "NoPE *"):
        plain, scaled = (attention_paths(layers[s][kind], x, seq_idx) for s in (None, 4))
        for path in plain:
            name = f"{kind} layer, {path}, swan_train_len=4 vs None"
            if kind != "NoPE *":
                assert_close(scaled[path], plain[path], name, atol=1e-6)
            else:
                assert_close(scaled[path][:, :4], plain[path][:, :4], name + " within the training length", atol=1e-6)
                assert (scaled[path][:, 4:] - plain[path][:, 4:]).abs().amax() > 1e-2, name + ": no scale"
        assert_close(scaled["decode"], scaled["forward"], f"{kind} layer, decode vs forward", atol=1e-5)
