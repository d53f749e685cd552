"""
Star Attention (attention.py, generate.star_prefill): phase 2's log-sum-exp combine against full
attention over the same keys, phase 1's blocks against the model run on [anchor, block], one block
against ordinary decoding token for token, K = 2 processes (torchrun, gloo) against the one-process
simulation through sample.py, and clear errors for bad settings.

    python -m pytest -q tests/test_star.py

Precision: fp32 on CPU. The combine reorders one softmax into per-host pieces, so outputs agree with
full attention to ~1e-7 relative; the tests use atol 1e-5 on O(1) values (1e-4 on logits, as
tests/test_model.py), far below what a wrong mask, position or weight gives (O(0.1)).
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from attention import Attention, attend, star_combine
from helpers import assert_close
from generate import KVCache, StarQueryCache, star_prefill
from model import Nemotron, NemotronConfig
from test_sample import run_sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=64, d_model=32, n_head=4, n_kv_head=2, head_dim=8, d_ff=48, mamba_heads=4, mamba_head_dim=8,
            d_state=8, mamba_groups=2, chunk_size=8, n_experts=4, top_k=2, moe_d_ff=16, shared_d_ff=24, init_std=0.1)


def tiny(pattern, seed=0, **kw):
    torch.manual_seed(seed)
    return Nemotron(NemotronConfig(**{**TINY, "pattern": pattern, **kw})).eval()


# -----------------------------------------------------------------------------
# phase 2: the exact combine


def test_combine_equals_one_softmax():
    """Keys split over 4 hosts (one of them with every key masked: it must weigh nothing): the
    combined (out, lse) equal one softmax over all keys, and its log-sum-exp."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[:, 5:9] = False  # host 1 (keys 5..9) sees nothing
    cuts = [(0, 5), (5, 9), (9, 16), (16, 20)]
    pieces = [attend(q, k[:, :, a:b], v[:, :, a:b], mask[:, a:b]) for a, b in cuts]
    out, lse = star_combine(torch.stack([o for o, _ in pieces], 1), torch.stack([l for _, l in pieces], 1))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert_close(out, ref, "combined output", atol=1e-5)
    s = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 8 ** 0.5
    assert_close(lse, s.masked_fill(~mask, float("-inf")).logsumexp(-1), "combined lse", atol=1e-5)


@pytest.mark.parametrize("kind", ["rope", "window", "swan"])
@torch.no_grad()
def test_phase2_layer_equals_full_attention(kind):
    """One attention layer: the same 10 context keys (at their global positions) held by three
    hosts, the last one short, against the ordinary KV cache holding them all; then 3 query tokens
    and 2 generated ones. RoPE, a sliding window of 6 (the first host falls out of it) and the
    SWAN query scale all use the global positions."""
    torch.manual_seed(0)
    cfg = NemotronConfig(**TINY, rope=kind == "rope", swan_train_len=4 if kind == "swan" else None)
    att = Attention(cfg, window=6 if kind == "window" else None)
    x = torch.randn(2, 15, 32)
    full = KVCache.empty(att, 2, 15, "cpu", torch.float32)  # 15 <= window + 8: the ring is in position order
    att(x[:, :10], full)
    k, v = full.k[:, :, :10].clone(), full.v[:, :, :10].clone()
    pad = lambda t: F.pad(t, (0, 0, 0, 2))  # the last host's 2 keys padded to 4
    star = StarQueryCache(k=torch.stack([k[:, :, :4], k[:, :, 4:8], pad(k[:, :, 8:])], 1),
                          v=torch.stack([v[:, :, :4], v[:, :, 4:8], pad(v[:, :, 8:])], 1),
                          kpos=torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1]]),
                          qk=torch.zeros(2, 2, 5, 8), qv=torch.zeros(2, 2, 5, 8), pos=10)
    for a, b in [(10, 13), (13, 14), (14, 15)]:
        assert_close(att(x[:, a:b], star), att(x[:, a:b], full), f"tokens {a}..{b - 1}", atol=1e-5)


# -----------------------------------------------------------------------------
# phase 1 and whole prompts


@torch.no_grad()
def test_phase1_blocks_see_the_anchor_and_themselves():
    """A NoPE hybrid (positions matter only through order): with blocks of 6 and a context of 16,
    block 0 is the model on c_0, block 1 (batched) and block 2 (short) the model on [c_0, c_i],
    Mamba states included."""
    model = tiny("M*-EM*")
    idx = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    _, h = star_prefill(model, idx, 6, query_len=4)
    assert_close(h[:, :6], model.hidden(idx[:, :6]), "anchor", atol=1e-5)
    for a, b in [(6, 12), (12, 16)]:
        ref = model.hidden(torch.cat([idx[:, :6], idx[:, a:b]], 1))[:, 6:]
        assert_close(h[:, a:b], ref, f"block {a}..{b - 1}", atol=1e-5)


@torch.no_grad()
def test_phase1_window_layers_see_the_anchor_only_next_to_it():
    """Sliding-window layers only (RoPE is relative, window 3 < block 8, so phase 1 takes the banded
    path): block 1 is the model on [c_0, c_1], each later block the model on itself alone."""
    model = tiny("W-W", sliding_window=3)
    idx = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(2))
    _, h = star_prefill(model, idx, 8, query_len=4)
    assert_close(h[:, 8:16], model.hidden(idx[:, :16])[:, 8:], "block 1", atol=1e-5)
    for a, b in [(16, 24), (24, 26)]:
        assert_close(h[:, a:b], model.hidden(idx[:, a:b]), f"block {a}..{b - 1}", atol=1e-5)


@torch.no_grad()
def test_chain_is_exact_for_mamba_layers():
    """mamba="chain" hands each block the states the block before ended in: a model without
    attention then computes exactly its full forward; mamba="anchor" (the default) does not."""
    model = tiny("M-ME")
    idx = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(1))
    full = model.hidden(idx)
    assert_close(star_prefill(model, idx, 8, query_len=3, mamba="chain")[1], full, "chain", atol=1e-5)
    assert (star_prefill(model, idx, 8, query_len=3)[1][:, 8:] - full[:, 8:]).abs().amax() > 1e-2


@pytest.mark.parametrize("pattern", ["M*-EM*", "**-W"], ids=["hybrid", "attention-only"])
@pytest.mark.parametrize("temperature", [0, 0.8])
def test_one_block_is_ordinary_decoding(pattern, temperature):
    """star_block >= the prompt: one block, the anchor alone, so Star Attention is ordinary decoding
    (the query through phase 2's combine): the same tokens, greedy or sampled with the same seed."""
    model = tiny(pattern, rope=True, sliding_window=4)
    idx = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    ref = model.generate(idx, 16, temperature)
    for block, query in [(13, 1), (100, 5), (12, 1)]:  # the last: a context of 12 in one block of 12
        torch.manual_seed(3)
        assert torch.equal(model.generate(idx, 16, temperature, star_block=block, star_query=query), ref)


def test_generate_rejects_bad_settings():
    model = tiny("M*")
    idx = torch.zeros(1, 5, dtype=torch.long)
    for kw, match in [(dict(star_block=-2), "star_block"), (dict(star_block=2.5), "star_block"),
                      (dict(star_block=2, star_query=0), "star_query"),
                      (dict(star_block=2, star_query=6), "star_query"),
                      (dict(star_block=2, speculative=1), "do not combine")]:
        with pytest.raises(ValueError, match=match):
            model.generate(idx, 2, **kw)


# -----------------------------------------------------------------------------
# sample.py: one process against two (torchrun, gloo), and bad flags


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """A tiny hybrid with every layer kind (W too) as an out_dir, and a config file for sample.py
    (torchrun would read --start= as its own --start-method: a config file avoids that)."""
    root = tmp_path_factory.mktemp("star")
    torch.manual_seed(0)
    cfg = NemotronConfig(**{**TINY, "vocab_size": 256, "pattern": "M*-EW*", "sliding_window": 8})
    (root / "out").mkdir()
    torch.save({"model": Nemotron(cfg).state_dict(), "model_config": cfg.to_dict(), "config": {"dataset": "none"}},
               root / "out" / "ckpt.pt")
    (root / "out" / "meta.json").write_text('{"tokenizer": "bytes", "vocab_size": 256}')
    (root / "star.py").write_text(f"init_from = {str(root / 'out')!r}\nstart = 'The quick brown fox jumps over "
                                  f"the lazy dog; the end.'\nstar_block = 8\nstar_query = 4\nmax_new_tokens = 24\n"
                                  f"device = 'cpu'\nnum_samples = 2\n")
    return root


def test_two_processes_sample_what_one_process_simulates(out_dir):
    """7 context blocks over 2 ranks (4 + 3), sampled at temperature 0.8 with the same seed: the
    same text as the one-process simulation."""
    rc, one, err = run_sample(str(out_dir / "star.py"))
    assert rc == 0, err
    assert "7 block(s) of 8" in err
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(REPO, "sample.py"), str(out_dir / "star.py")],
                       capture_output=True, cwd=REPO, env=env, timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    assert "2 host process(es)" in p.stderr.decode()
    assert p.stdout.decode("utf-8") == one  # rank 0 prints (the config echo, then the samples)


@pytest.mark.parametrize("bad, message, code", [
    ("--star_block=-1", "star_block=-1", 2), ("--star_query=0", "star_query=0", 2),
    ("--star_query=99", "the prompt has only", 1), ("--speculative=1", "do not combine", 1)])
def test_bad_star_flags_exit_with_a_message(out_dir, bad, message, code):
    rc, _, err = run_sample(str(out_dir / "star.py"), bad)
    assert rc == code and message in err and "Traceback" not in err, err
