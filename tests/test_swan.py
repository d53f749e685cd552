"""
SWAN-GPT attention (attention.py): sliding-window RoPE layers (pattern letter W) against an explicit
masked softmax (and the blockwise path of long sequences against the dense window mask), their
constant-size ring cache against the full forward (past the ring's wrap-around)
and under speculative rollback, and the dynamic query scaling of NoPE layers.

    python -m pytest -q tests/test_swan.py
"""
import math

import pytest
import torch
import torch.nn.functional as F

from attention import Attention, apply_rope, banded, swan_scale
from helpers import assert_close
from model import CheckpointError, Nemotron, NemotronConfig

TINY = dict(d_model=32, n_head=4, n_kv_head=2, head_dim=8, d_ff=64, mamba_heads=2, headdim=16, d_state=8,
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
    cache = model.new_cache(2, 1000)
    assert all(c["k"].size(2) == 12 for b, c in zip(model.backbone.layers, cache) if b.kind == "W")
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
