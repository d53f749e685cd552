"""
Tests for model.py and moe.py: cached decoding against the full forward, generation and sampling,
config validation, initialisation, parameter / FLOP counts, LatentMoE, routing and the expert loop.

Run: python -m pytest -q tests/test_model.py

Precision: everything is fp32 on CPU. Cached decoding and the full forward compute the same maths
in a different order (the recurrence vs the chunked SSD, a masked vs a one-query attention), and
the logits here are O(1-10), so they agree to ~1e-6 relative; the tests use atol 1e-4 / rtol 1e-5,
which still catches any real error (a wrong position, a stale cache entry is O(0.1-1)).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from generate import MambaCache, new_cache
from model import Nemotron, NemotronConfig, config_file
from moe import MoE, route

LOGIT_TOL = dict(atol=1e-4, rtol=1e-5)


def tiny_config(**kw):
    args = dict(vocab_size=64, d_model=32, pattern="M*-EM*", n_head=4, n_kv_head=2, head_dim=8,
                d_ff=48, mamba_heads=4, mamba_head_dim=8, d_state=8, mamba_groups=2, d_conv=4, chunk_size=8,
                n_experts=4, top_k=2, moe_d_ff=16, shared_d_ff=24, init_std=0.1)
    args.update(kw)
    return NemotronConfig(**args)


def tiny_model(seed=0, **kw):
    """A tiny model whose logits vary by O(1) with the input (init_std 0.1, non-trivial norms, D
    and correction bias), so that a wrong position or a stale cache shows up."""
    torch.manual_seed(seed)
    model = Nemotron(tiny_config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith(".D"):
                p.normal_()
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    return model.eval()


def full_logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def decode_logits(model, idx, prefill_sizes):
    """Logits at every position of idx computed with a cache: the prompt in pieces of the given
    sizes, then the rest one token at a time."""
    cache = new_cache(model, idx.size(0), idx.size(1))
    out, t = [], 0
    with torch.no_grad():
        for n in prefill_sizes + [1] * (idx.size(1) - sum(prefill_sizes)):
            out.append(model.lm_head(model.hidden(idx[:, t:t + n], cache)).float())
            t += n
    return torch.cat(out, dim=1)


# -----------------------------------------------------------------------------
# cached decoding == full forward


@pytest.mark.parametrize("prefill_sizes", [[11], [5, 6], [1], [3, 1, 7]],
                         ids=["one-prefill", "two-piece-prefill", "no-prefill", "mixed"])
def test_cached_decode_matches_forward(prefill_sizes):
    """Prefill (whole, or in pieces of > 1 token: the attention mask path with a cached prefix and
    Mamba's conv/SSM cache for T > 1), then one token at a time: same logits as the full forward
    at every position. 20 tokens with chunk_size 8: the prefix crosses chunk boundaries."""
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    ref = full_logits(model, idx)
    assert ref.std() > 0.3, "logits too flat for the comparison to mean anything"
    assert_close(decode_logits(model, idx, prefill_sizes), ref, f"cached logits {prefill_sizes}", **LOGIT_TOL)


def test_rope_cached_decode_matches_forward():
    """With RoPE on, the cached path rotates new tokens by their absolute position."""
    model = tiny_model(rope=True)
    idx = torch.randint(0, 64, (2, 15), generator=torch.Generator().manual_seed(2))
    ref = full_logits(model, idx)
    assert_close(decode_logits(model, idx, [4, 5]), ref, "rope cached logits", **LOGIT_TOL)
    # and RoPE does change the model (same weights, rope off)
    nope = Nemotron(tiny_config(rope=False))
    nope.load_state_dict(model.state_dict())
    assert (full_logits(nope.eval(), idx) - ref).abs().max() > 1e-3


def test_kv_cache_overflow_raises():
    model = tiny_model()
    cache = new_cache(model, 1, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache"):
        model.hidden(torch.zeros(1, 5, dtype=torch.long), cache)


def test_mamba_cache_is_constant_size():
    """The Mamba conv and SSM states do not grow with the context: same shapes (and the same
    whatever max_len is) after a prefill and after many decoded tokens; only attention preallocates
    max_len positions."""
    model = tiny_model(pattern="M*M")
    small, big = new_cache(model, 1, 8), new_cache(model, 1, 500)
    for a, b in zip(small, big):
        if isinstance(a, MambaCache):
            assert a.conv.shape == b.conv.shape and a.ssm.shape == b.ssm.shape
    cache = big
    shapes = lambda: [(c.conv.shape, c.ssm.shape) for c in cache if isinstance(c, MambaCache)]
    with torch.no_grad():
        model.hidden(torch.randint(0, 64, (1, 13)), cache)
        after_prefill = shapes()
        for t in range(40):
            model.hidden(torch.randint(0, 64, (1, 1)), cache)
    assert shapes() == after_prefill
    conv, ssm = after_prefill[0]
    assert conv.numel() == model.backbone.layers[0].mixer.conv_dim * 3 and ssm == (1, 4, 8, 8)
    assert cache[1].k.shape == (1, 2, 500, 8) and cache[1].pos == 53


@torch.no_grad()
def test_cache_select_rows_continues_each_row():
    """Prefill 3 rows, keep rows 2 and 0 (select), decode 3 more tokens: each row's logits are those
    of decoding it alone (a global, a sliding-window ring and Mamba layers)."""
    model = tiny_model(pattern="M*WM", sliding_window=4)
    idx = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(3))
    cache = new_cache(model, 3, 12)
    model.hidden(idx[:, :6], cache)
    kept = [c if c is None else c.select([2, 0]) for c in cache]
    got = torch.cat([model.hidden(idx[[2, 0], t:t + 1], kept) for t in range(6, 9)], dim=1)  # (2, 3, d)
    for row, r in ((0, 2), (1, 0)):
        alone = new_cache(model, 1, 12)
        model.hidden(idx[r:r + 1, :6], alone)
        want = torch.cat([model.hidden(idx[r:r + 1, t:t + 1], alone) for t in range(6, 9)], dim=1)
        assert_close(got[row:row + 1], want, f"row {r} after select", atol=1e-5)


@torch.no_grad()
def test_cache_roll_back_refuses_what_it_cannot_undo():
    """A global cache rolls back to any earlier position, a ring only by its 8 spare slots, and a
    Mamba state only to a state it kept (keep_states)."""
    model = tiny_model(pattern="M*W", sliding_window=4)
    cache = new_cache(model, 1, 40)
    model.hidden(torch.randint(0, 64, (1, 30)), cache)
    mamba, glob, ring = cache
    glob.truncate(3)
    assert glob.pos == 3
    with pytest.raises(ValueError, match="roll"):
        ring.truncate(21)  # position 17, in 21's window, was overwritten by 29
    ring.truncate(23)
    ring.truncate(22)  # 30 - 8: still the oldest it can return to, whatever came in between
    with pytest.raises(ValueError, match="roll"):
        ring.truncate(21)
    with pytest.raises(ValueError, match="keep_states"):
        mamba.rollback(0)


# -----------------------------------------------------------------------------
# generation and sampling


def test_generate_greedy_matches_rerun_forward():
    """generate(temperature=0) == argmax of the full forward re-run on the growing sequence."""
    model = tiny_model(seed=3)
    idx = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    out = model.generate(idx, 10, temperature=0)
    seq = idx
    for _ in range(10):
        seq = torch.cat([seq, full_logits(model, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.shape == (2, 17)
    assert torch.equal(out, seq)


def test_sampling_limits_equal_greedy():
    """top_k=1 and a tiny top_p leave only the argmax, whatever the temperature; a seeded
    temperature sample is reproducible and stays in the vocabulary."""
    model = tiny_model(seed=4)
    idx = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    greedy = model.generate(idx, 8, temperature=0)
    torch.manual_seed(0)
    assert torch.equal(model.generate(idx, 8, temperature=1.0, top_k=1), greedy)
    assert torch.equal(model.generate(idx, 8, temperature=1.5, top_p=1e-6), greedy)
    torch.manual_seed(123)
    a = model.generate(idx, 8, temperature=0.9, top_k=20, top_p=0.9)
    torch.manual_seed(123)
    b = model.generate(idx, 8, temperature=0.9, top_k=20, top_p=0.9)
    assert torch.equal(a, b) and torch.equal(a[:, :5], idx)
    assert ((a >= 0) & (a < 64)).all()


def test_sample_next_filters():
    """top_k keeps exactly the k largest logits; top_p keeps the smallest prefix reaching p."""
    from generate import sample_next
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    draws = torch.cat([sample_next(logits, 1.0, top_k=2) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}
    draws = torch.cat([sample_next(logits, 1.0, top_p=0.7) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    draws = torch.cat([sample_next(logits, 1.0, top_p=0.45) for _ in range(100)])
    assert set(draws.flatten().tolist()) == {0}  # the top token alone already reaches p


# -----------------------------------------------------------------------------
# config, init, counts


@pytest.mark.parametrize("kw", [dict(pattern="M*X"), dict(pattern=""), dict(n_head=3, n_kv_head=2),
                                dict(mamba_heads=4, mamba_groups=3), dict(n_experts=6, n_group=4)])
def test_config_validation(kw):
    with pytest.raises((AssertionError, ValueError)):
        tiny_config(**kw)


def test_init_weights():
    """Nemotron-H / Megatron init: D = 1, A = -exp(A_log) in [-16, -1], softplus(dt_bias) within
    [dt_min, dt_max], norms 1, correction bias 0, std init_std for most weights and
    init_std / sqrt(2 n_layer) for the projections into the residual stream. Measured at
    d_model 256 so each matrix has >= 30k samples: the sample std is within ~1% of the true std,
    and the 10% tolerance separates the two stds (ratio sqrt(2 * 4) = 2.8)."""
    torch.manual_seed(0)
    cfg = NemotronConfig(vocab_size=256, d_model=256, pattern="M*-E", n_experts=4, top_k=2,
                         moe_d_ff=128, shared_d_ff=256, moe_latent_size=128, dt_min=0.002, dt_max=0.05)
    model = Nemotron(cfg)
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layer)
    residual = ("out_proj.weight", "o_proj.weight", "down_proj.weight", "experts.down_proj",
                "fc2_latent_proj.weight")
    plain = ("embeddings.weight", "in_proj.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight",
             "up_proj.weight", "experts.up_proj", "gate.weight", "fc1_latent_proj.weight", "lm_head.weight")
    seen = set()
    for name, p in model.named_parameters():
        want = out_std if name.endswith(residual) else std if name.endswith(plain) else None
        if want is not None:
            seen.add(name.rsplit("layers.", 1)[-1].split(".", 1)[-1])
            assert abs(p.std().item() - want) < 0.1 * want, f"{name}: std {p.std().item():.4g}, want {want:.4g}"
            assert abs(p.mean().item()) < 0.1 * want, name
    assert len(seen) >= 14, seen  # every kind of weight above was measured
    for block in model.backbone.layers:
        assert torch.equal(block.norm.weight, torch.ones(256))
        if block.kind == "M":
            m = block.mixer
            assert torch.equal(m.D, torch.ones_like(m.D))
            A = -torch.exp(m.A_log)
            assert ((A >= -16 - 1e-4) & (A <= -1 + 1e-6)).all(), A
            dt = F.softplus(m.dt_bias)
            assert ((dt >= cfg.dt_min * (1 - 1e-4)) & (dt <= cfg.dt_max * (1 + 1e-4))).all(), dt
            assert torch.equal(m.norm.weight, torch.ones_like(m.norm.weight))
        if block.kind == "E":
            assert torch.equal(block.mixer.gate.e_score_correction_bias, torch.zeros(4))


def test_tie_embeddings_shares_storage():
    model = tiny_model(tie_embeddings=True)
    assert model.lm_head.weight is model.backbone.embeddings.weight
    assert model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr()
    untied = tiny_model(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.backbone.embeddings.weight.data_ptr()


def test_config_file_is_the_model_train_py_trains(tmp_path):
    """config_file: NemotronConfig's defaults (train.py's model flags) with a config/ file's
    assignments, and every assignment of the file; old field names (RENAMED) still read."""
    cfg, assigned = config_file("config/gpu_125m.py")
    assert cfg.d_model == 768 and cfg.chunk_size == 128 and cfg.pattern.count("M") == 10
    assert assigned["block_size"] == 2048
    cfg, _ = config_file("config/star_copy.py")  # sets no width: the defaults'
    assert cfg.d_model == 128 and cfg.n_head == 4 and cfg.pattern == "W-*-W-*-" and cfg.sliding_window == 16
    old = tmp_path / "old.py"
    old.write_text("headdim = 16\nn_groups = 4\nmamba_heads = 8\n")
    cfg, _ = config_file(str(old))
    assert (cfg.mamba_head_dim, cfg.mamba_groups) == (16, 4)
    saved = dict(NemotronConfig().to_dict(), headdim=16, n_groups=4)  # a checkpoint's model_config of before
    del saved["mamba_head_dim"], saved["mamba_groups"]
    assert NemotronConfig.from_dict(saved) == NemotronConfig(mamba_head_dim=16, mamba_groups=4)


def test_checkpoint_of_old_field_names_loads(tmp_path):
    """A ckpt.pt whose model_config spells the Mamba fields headdim / n_groups loads as the same model."""
    model = tiny_model()
    config = model.config.to_dict()
    config["headdim"], config["n_groups"] = config.pop("mamba_head_dim"), config.pop("mamba_groups")
    torch.save({"model": model.state_dict(), "model_config": config}, tmp_path / "ckpt.pt")
    loaded = Nemotron.from_pretrained(str(tmp_path / "ckpt.pt"))
    assert loaded.config == model.config
    idx = torch.randint(0, 64, (1, 9))
    assert torch.equal(full_logits(loaded.eval(), idx), full_logits(model, idx))


def test_num_params_and_flops():
    moe = tiny_model(pattern="M*E-E")
    dense = tiny_model(pattern="M*--")
    cfg = moe.config
    inactive = 2 * (cfg.n_experts - cfg.top_k) * 2 * cfg.d_model * cfg.moe_d_ff  # 2 MoE layers
    assert moe.num_params(active=True) == moe.num_params() - inactive < moe.num_params()
    assert dense.num_params(active=True) == dense.num_params()
    emb = cfg.vocab_size * cfg.d_model
    assert dense.num_params() == sum(p.numel() for p in dense.parameters()) - emb
    latent = tiny_model(pattern="ME", moe_latent_size=8)
    assert latent.num_params() - latent.num_params(active=True) == (4 - 2) * 2 * 8 * 16
    for m in (moe, dense):
        f1, f2 = m.flops_per_token(16), m.flops_per_token(1024)
        assert 6 * m.num_params(active=True) < f1 < f2  # attention's cost grows with T
    no_attn = tiny_model(pattern="M-")
    assert 0 < no_attn.flops_per_token(16) == no_attn.flops_per_token(1024)


# -----------------------------------------------------------------------------
# MoE: LatentMoE, routing, the expert loop


def test_latent_moe_shapes():
    model = tiny_model(pattern="ME", moe_latent_size=8)
    moe = model.backbone.layers[1].mixer
    assert moe.experts.up_proj.shape == (4, 16, 8) and moe.experts.down_proj.shape == (4, 8, 16)
    assert moe.fc1_latent_proj.weight.shape == (8, 32) and moe.fc2_latent_proj.weight.shape == (32, 8)
    assert moe.shared_experts.up_proj.weight.shape == (24, 32)  # the shared expert sees the full width
    plain = tiny_model(pattern="ME").backbone.layers[1].mixer
    assert plain.experts.up_proj.shape == (4, 16, 32) and not hasattr(plain, "fc1_latent_proj")


def test_route_normalised_weights():
    torch.manual_seed(0)
    scores = torch.rand(50, 8)
    bias = torch.randn(8) * 0.1
    w, idx = route(scores, bias, top_k=3, n_group=1, topk_group=1, norm_topk_prob=True, scaling=2.5)
    assert w.shape == idx.shape == (50, 3)
    assert_close(w.sum(-1), torch.full((50,), 2.5), "weights sum", atol=1e-6)
    assert (idx.sort(-1)[0].diff(dim=-1) > 0).all(), "an expert chosen twice"
    # the weights come from the raw scores of the chosen experts, never the biased ones
    raw = scores.gather(1, idx)
    assert_close(w, 2.5 * raw / raw.sum(-1, keepdim=True), "weights from raw scores", atol=1e-6)
    # the choice is the top-k of scores + bias
    assert torch.equal(idx.sort(-1)[0], (scores + bias).topk(3, dim=-1)[1].sort(-1)[0])
    w2, _ = route(scores, bias, 3, 1, 1, norm_topk_prob=False, scaling=2.5)
    assert_close(w2, 2.5 * raw, "unnormalised weights", atol=1e-6)


def test_route_correction_bias_moves_choice_not_weights():
    """A bias on one expert pulls it into every token's choice; the experts chosen with and without
    the bias keep exactly the weight they had (norm_topk_prob off: weight = scaling * score)."""
    torch.manual_seed(1)
    scores = torch.rand(40, 8)
    w0, i0 = route(scores, torch.zeros(8), 2, 1, 1, norm_topk_prob=False, scaling=1.5)
    bias = torch.zeros(8)
    bias[5] = 2.0  # larger than any score gap: expert 5 is always chosen
    w1, i1 = route(scores, bias, 2, 1, 1, norm_topk_prob=False, scaling=1.5)
    assert (i1 == 5).any(-1).all()
    assert not torch.equal(i0.sort(-1)[0], i1.sort(-1)[0]), "the bias changed nothing"
    common = 0
    for m in range(40):
        for j in range(2):
            hit = (i1[m] == i0[m, j]).nonzero()
            if len(hit):
                assert w1[m, hit[0, 0]] == w0[m, j]
                common += 1
    assert common > 0
    assert_close(w1, 1.5 * scores.gather(1, i1), "weight of expert 5 is its raw score", atol=0)


def test_route_group_limited():
    """With n_group=4, topk_group=2 every chosen expert lies in one of the 2 groups whose two best
    (biased) scores sum highest, and the choice is the top-k within those groups."""
    torch.manual_seed(2)
    M, E, n_group, topk_group, k = 200, 16, 4, 2, 3
    scores = torch.rand(M, E)
    bias = torch.randn(E) * 0.1
    _, idx = route(scores, bias, k, n_group, topk_group, True, 1.0)
    choice = (scores + bias).view(M, n_group, E // n_group)
    best_groups = choice.topk(2, dim=-1)[0].sum(-1).topk(topk_group, dim=-1)[1]  # (M, topk_group)
    groups = idx // (E // n_group)
    assert (groups[:, :, None] == best_groups[:, None, :]).any(-1).all(), "expert outside the best groups"
    allowed = torch.zeros(M, n_group, dtype=torch.bool).scatter_(1, best_groups, True)
    masked = choice.masked_fill(~allowed[:, :, None], float("-inf")).view(M, E)
    assert torch.equal(idx.sort(-1)[0], masked.topk(k, -1)[1].sort(-1)[0])
    # a constructed token: the single best expert (0) sits in a group whose pair-sum is lowest
    s = torch.full((1, 16), 0.5)
    s[0, 0], s[0, 1:4] = 0.99, 0.0  # group 0's pair-sum 0.99 < 1.0 of every other group
    _, i = route(s, torch.zeros(16), 2, 4, 1, True, 1.0)
    assert 0 not in i.tolist()[0]


def dense_moe_reference(moe, u):
    """Every expert on every token, weighted by a dense (M, E) matrix built from the routing."""
    x = u.reshape(-1, u.size(-1))
    w, idx = moe.gate(x)
    W = torch.zeros(x.size(0), moe.experts.up_proj.size(0), dtype=w.dtype).scatter(1, idx, w)  # (M, E)
    h = moe.fc1_latent_proj(x) if moe.latent else x
    act = F.relu(torch.einsum("ml,efl->mef", h, moe.experts.up_proj)).square()  # (M, E, F)
    per_expert = torch.einsum("mef,elf->mel", act, moe.experts.down_proj)  # (M, E, l)
    y = (W[:, :, None] * per_expert).sum(1)
    y = moe.fc2_latent_proj(y) if moe.latent else y
    return (y + moe.shared_experts(x)).view(u.shape)


@pytest.mark.parametrize("latent", [None, 8], ids=["moe", "latent-moe"])
def test_expert_loop_matches_dense(latent):
    """MoE.forward (a loop over the experts that got tokens) == the dense reference, forward and
    gradients w.r.t. the input and every parameter; an expert that gets no token has zero grads.
    fp32, outputs O(1-10) summed in a different order (the loop adds k expert outputs per token,
    the reference sums all E with zeros): atol 1e-5 / rtol 1e-5 forward; gradients, which sum
    over tokens too, 1e-4 / 1e-4."""
    cfg = tiny_config(pattern="E", n_experts=8, top_k=2, n_group=2, topk_group=2, moe_latent_size=latent,
                      routed_scaling_factor=2.5)
    torch.manual_seed(5)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.15)
        moe.gate.e_score_correction_bias.normal_(0, 0.05)
        moe.gate.e_score_correction_bias[7] = -10.0  # expert 7 is never chosen
    u = torch.randn(2, 5, 32)
    ua, ub = u.clone().requires_grad_(True), u.clone().requires_grad_(True)
    ya = moe(ua)
    grads_a = torch.autograd.grad((ya * ya.detach().sin()).sum(), [ua, *moe.parameters()])
    yb = dense_moe_reference(moe, ub)
    grads_b = torch.autograd.grad((yb * yb.detach().sin()).sum(), [ub, *moe.parameters()])
    assert_close(ya, yb, "moe forward", atol=1e-5, rtol=1e-5)
    names = ["input"] + [n for n, _ in moe.named_parameters()]
    for n, ga, gb in zip(names, grads_a, grads_b):
        assert_close(ga, gb, f"grad {n}", atol=1e-4, rtol=1e-4)
    assert (moe.experts.up_proj.grad is None) and grads_a[names.index("experts.up_proj")][7].abs().max() == 0
    assert grads_a[names.index("gate.weight")].abs().max() > 0, "no gradient reaches the router"


def test_packed_documents_match_separate_forwards():
    """forward(idx, seq_idx=...) on packed documents == each document's own forward: Mamba state
    and conv restart, attention masks other documents (issue 3's packed sequences)."""
    torch.manual_seed(0)
    cfg = NemotronConfig(d_model=32, pattern="M*-EM", mamba_heads=4, mamba_head_dim=8, d_state=16, mamba_groups=2,
                         chunk_size=8, n_head=2, n_kv_head=1, head_dim=16, d_ff=64, moe_d_ff=16,
                         shared_d_ff=32, n_experts=4, init_std=0.2)
    model = Nemotron(cfg).eval()
    lens = [[5, 13, 3], [21], [1, 8, 12]]
    idx = torch.randint(0, 256, (3, 21))
    seq_idx = torch.tensor([sum(([d] * n for d, n in enumerate(row)), []) for row in lens])
    with torch.no_grad():
        packed, _ = model(idx, seq_idx=seq_idx)
        for b, row in enumerate(lens):
            pos = 0
            for n in row:
                alone, _ = model(idx[b:b + 1, pos:pos + n])
                assert_close(packed[b, pos:pos + n], alone[0], f"row {b} document at {pos}", atol=1e-5, rtol=1e-5)
                pos += n
