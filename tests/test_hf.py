"""
Hugging Face interop of model.py: our save_pretrained loads in transformers' NemotronHForCausalLM with
the same logits and the same greedy generation; transformers' own folders, NVIDIA's published layouts
(legacy Nemotron-H config keys, Nemotron 3 layers_block_type, per-expert tensors), sharded and bf16
folders load in ours; unsupported or broken folders raise CheckpointError naming the culprit.

Run: python -m pytest -q tests/test_hf.py      (transformers and safetensors: requirements-dev.txt)

Precision: fp32 on both sides; transformers' torch path and ours do the same maths in a slightly
different order, and the logits here are O(1-10): they agree to ~1e-6, so atol 1e-5 / rtol 1e-5.
Folders that hold the very tensors of the model they are compared with are held to the same 1e-5
(the loaded model runs the same code on the same weights). The first transformers model costs ~9 s
of imports; everything else here is well under a second.
"""

import json
import os

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import assert_close
from checkpoint import CheckpointError, save_hf
from model import Nemotron, NemotronConfig

tf.logging.set_verbosity_error()
tf.utils.logging.disable_progress_bar()

TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_config(**kw):
    args = dict(vocab_size=64, d_model=32, pattern="M*-EM*", n_head=4, n_kv_head=2, head_dim=8,
                d_ff=48, mamba_heads=4, mamba_head_dim=8, d_state=8, mamba_groups=1, d_conv=4, chunk_size=8,
                n_experts=8, top_k=2, moe_d_ff=16, shared_d_ff=24)
    args.update(kw)
    return NemotronConfig(**args)


@torch.no_grad()
def randomize(model, seed):
    """Every parameter and buffer non-trivial and O(1)-scaled, so that a tensor read into the wrong
    slot, a transposed expert or an ignored A_log / dt_bias / D / norm / correction bias changes
    the logits by far more than the tolerance."""
    g = torch.Generator().manual_seed(seed)
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        r = torch.randn(p.shape, generator=g)
        if name.endswith("A_log"):
            p.copy_(torch.empty(p.shape).uniform_(0, 2, generator=g))  # A in [-7.4, -1]
        elif name.endswith("dt_bias"):
            p.copy_(0.5 * r - 1.0)
        elif name.endswith(".D") or name.endswith("conv1d.bias"):
            p.copy_(0.5 * r)
        elif "norm" in name:
            p.copy_(1.0 + 0.2 * r)
        elif name.endswith("e_score_correction_bias"):
            p.copy_(0.3 * r)  # comparable to the sigmoid scores' spread: changes the choices
        else:
            p.copy_(r / p.shape[-1] ** 0.5)
    return model


def our_model(seed=0, **kw):
    torch.manual_seed(seed)
    return randomize(Nemotron(tiny_config(**kw)), seed).eval()


@torch.no_grad()
def logits_of(model, idx):
    if isinstance(model, Nemotron):
        return model(idx)[0].float()
    return model(idx, use_cache=False).logits.float()  # a MoE-only model has no layer to cache (see below)


def hf_load(folder, **kw):
    return tf.NemotronHForCausalLM.from_pretrained(folder, **kw).eval()


IDX = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(0))  # 19: not a chunk multiple

CONFIGS = {
    "dense": dict(pattern="M-M*-"),
    "moe": dict(pattern="M*EME", n_group=2, topk_group=1, routed_scaling_factor=2.5),
    "latent-moe": dict(pattern="ME*E", moe_latent_size=16, n_group=2, topk_group=1, routed_scaling_factor=2.5),
    "mamba-groups": dict(pattern="M*M-", mamba_groups=2),
    "tied": dict(pattern="M*-", tie_embeddings=True),
    # settings of layer kinds the pattern lacks are not checked: 4 Mamba heads in 8 groups, 6 experts
    # in 4 groups would each be refused where a layer used them
    "moe-only": dict(pattern="EE", mamba_heads=4, mamba_groups=8),
    "attention-only": dict(pattern="*-*", mamba_heads=4, mamba_groups=8, n_experts=6, n_group=4),
}


# -----------------------------------------------------------------------------
# ours -> transformers


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ours_to_transformers(name, tmp_path):
    """save_pretrained -> NemotronHForCausalLM.from_pretrained: same logits, same greedy tokens."""
    model = our_model(**CONFIGS[name])
    ref = logits_of(model, IDX)
    assert ref.std() > 0.3, "logits too flat for the comparison to mean anything"
    model.save_pretrained(tmp_path)
    hf = hf_load(tmp_path)
    assert_close(logits_of(hf, IDX), ref, f"{name}: transformers vs ours", **TOL)
    n = 8
    ours = model.generate(IDX[:, :6], n, temperature=0)
    # transformers 5.25's cache has nothing to hold without a Mamba or attention layer, and its
    # generate fails on it ('DummyLayer' object has no attribute 'get_seq_length'): no cache there
    cached = bool(set(model.config.pattern) & set("M*"))
    theirs = hf.generate(IDX[:, :6], attention_mask=torch.ones_like(IDX[:, :6]), max_new_tokens=n,
                         do_sample=False, min_new_tokens=n, use_cache=cached)
    assert torch.equal(ours, theirs), f"{name}: greedy generation differs\n{ours}\n{theirs}"


def test_correction_bias_matters():
    """The MoE configs above would pass with the correction bias ignored if it never changed a
    choice: check that it does."""
    model = our_model(**CONFIGS["moe"])
    ref = logits_of(model, IDX)
    for b in model.buffers():
        b.zero_()
    assert (logits_of(model, IDX) - ref).abs().max() > 1e-2


# -----------------------------------------------------------------------------
# transformers -> ours


def hf_config(**kw):
    args = dict(vocab_size=64, hidden_size=32, layers_block_type=["mamba", "moe", "attention", "mlp", "mamba"],
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
                ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, conv_kernel=4,
                chunk_size=8, n_routed_experts=8, moe_intermediate_size=16,
                moe_shared_expert_intermediate_size=24, num_experts_per_tok=2, n_group=2, topk_group=1,
                routed_scaling_factor=2.5, initializer_range=0.2)
    args.update(kw)
    return tf.NemotronHConfig(**args)


@torch.no_grad()
def hf_model(seed=0, **kw):
    """A transformers model with its own random init, plus non-trivial A_log, dt_bias, D, norms and
    router correction bias (its init makes those constant)."""
    torch.manual_seed(seed)
    hf = tf.NemotronHForCausalLM(hf_config(**kw)).eval()
    for name, p in list(hf.named_parameters()) + list(hf.named_buffers()):
        if name.endswith("A_log"):
            p.copy_(torch.empty_like(p).uniform_(0, 2))
        elif name.endswith("dt_bias"):
            p.copy_(0.5 * torch.randn_like(p) - 1.0)
        elif name.endswith((".D", "conv1d.bias")) or name.endswith("e_score_correction_bias"):
            p.copy_(0.3 * torch.randn_like(p))
        elif "norm" in name:
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return hf


HF_CONFIGS = {
    "moe": dict(),
    "dense": dict(layers_block_type=["mamba", "mlp", "attention", "mamba", "mlp"], n_groups=1),
    "latent-moe": dict(moe_latent_size=16, layers_block_type=["mamba", "moe", "attention", "moe"]),
    "moe-only": dict(layers_block_type=["moe", "moe"], n_groups=8),
    "attention-only": dict(layers_block_type=["attention", "mlp", "attention"], n_groups=8, n_routed_experts=6,
                           n_group=4),
}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_transformers_to_ours(name, tmp_path):
    """hf.save_pretrained (its own key prefix, expert layout and config.json) -> ours."""
    hf = hf_model(**HF_CONFIGS[name])
    ref = logits_of(hf, IDX)
    assert ref.std() > 0.3
    hf.save_pretrained(tmp_path)
    model = Nemotron.from_pretrained(str(tmp_path))
    assert_close(logits_of(model, IDX), ref, f"{name}: ours vs transformers", **TOL)


def test_reads_transformers_encoded_infinity():
    """transformers 5 writes float('inf') in config.json as {"__float__": "Infinity"} (e.g.
    time_step_limit: [0.0, {"__float__": "Infinity"}]); the loader must read it as inf.
    Regression (issue #2): float() of that dict raised TypeError, so no folder that transformers
    saved could be loaded."""
    from checkpoint import config_from_hf
    hf = hf_config().to_dict()
    hf = json.loads(json.dumps(hf, default=str))  # as a file would hold it
    hf["time_step_limit"] = [0.0, {"__float__": "Infinity"}]
    cfg = config_from_hf(hf)
    assert cfg.dt_limit[1] == float("inf")


def test_round_trip_through_transformers(tmp_path):
    """ours -> save -> transformers loads -> transformers saves -> ours loads: the logits we started
    with (and the same tensors)."""
    model = our_model(**CONFIGS["moe"])
    ref = logits_of(model, IDX)
    model.save_pretrained(tmp_path / "a")
    hf_load(tmp_path / "a").save_pretrained(tmp_path / "b")
    back = Nemotron.from_pretrained(str(tmp_path / "b"))
    assert_close(logits_of(back, IDX), ref, "round trip", **TOL)
    sd = back.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v), k


# -----------------------------------------------------------------------------
# the published checkpoint layouts, written by hand


def nvidia_tensors(model):
    """Our state dict in NVIDIA's naming: backbone.*, one module per routed expert, lm_head.weight."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith((".experts.up_proj", ".experts.down_proj")):
            base, leaf = k.rsplit(".", 1)
            for e in range(v.size(0)):
                out[f"{base}.{e}.{leaf}.weight"] = v[e].clone()
        else:
            out[k] = v.clone()
    return out


def write_folder(folder, config, tensors, shards=1):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def legacy_config(cfg, aliases=False):
    """config.json as Nemotron-H-8B-Base-8K has it (transformers 4.x era, trust_remote_code):
    hybrid_override_pattern, attention_head_dim, no head_dim / layers_block_type. With aliases,
    the mamba_* spellings transformers also accepts for the Mamba settings."""
    hf = {
        "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
        "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig",
                     "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM"},
        "attention_bias": False, "attention_dropout": 0.0, "attention_head_dim": cfg.head_dim,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "expand": 2,
        "hidden_dropout": 0.0, "hidden_size": cfg.d_model, "hybrid_override_pattern": cfg.pattern,
        "initializer_range": 0.02, "intermediate_size": cfg.d_ff, "layer_norm_epsilon": 1e-5,
        "mamba_head_dim": cfg.mamba_head_dim, "mamba_hidden_act": "silu", "mamba_num_heads": cfg.mamba_heads,
        "mamba_proj_bias": False, "max_position_embeddings": 8192, "mlp_bias": False,
        "mlp_hidden_act": "relu2", "num_attention_heads": cfg.n_head, "num_hidden_layers": cfg.n_layer,
        "num_key_value_heads": cfg.n_kv_head, "num_logits_to_keep": 1, "rescale_prenorm_residual": True,
        "residual_in_fp32": False, "sliding_window": None, "ssm_state_size": cfg.d_state,
        "tie_word_embeddings": False, "time_step_floor": 1e-4, "time_step_limit": [0.0, float("inf")],
        "time_step_max": 0.1, "time_step_min": 0.001, "torch_dtype": "float32",
        "transformers_version": "4.48.0.dev0", "use_bias": False, "use_cache": True,
        "use_conv_bias": True, "use_mamba_kernels": True, "vocab_size": cfg.vocab_size,
    }
    mamba = {"n_groups": cfg.mamba_groups, "conv_kernel": cfg.d_conv, "chunk_size": cfg.chunk_size}
    if aliases:
        mamba = {"mamba_n_groups": cfg.mamba_groups, "mamba_d_conv": cfg.d_conv, "mamba_chunk_size": cfg.chunk_size}
        hf["rms_norm_eps"] = hf.pop("layer_norm_epsilon")
    hf.update(mamba)
    return hf


def nano3_config(cfg):
    """config.json in the style of NVIDIA-Nemotron-3-Nano: layers_block_type with "mamba",
    "attention", "mlp", "moe"; routed + shared experts; router correction bias."""
    kinds = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
    return {
        "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
        "layers_block_type": [kinds[c] for c in cfg.pattern], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim, "attention_bias": False, "intermediate_size": cfg.d_ff,
        "mlp_hidden_act": "relu2", "mlp_bias": False, "mamba_num_heads": cfg.mamba_heads,
        "mamba_head_dim": cfg.mamba_head_dim, "ssm_state_size": cfg.d_state, "n_groups": cfg.mamba_groups,
        "conv_kernel": cfg.d_conv, "chunk_size": cfg.chunk_size, "mamba_hidden_act": "silu",
        "use_conv_bias": True, "use_bias": False, "mamba_proj_bias": False, "time_step_min": 0.001,
        "time_step_max": 0.1, "time_step_floor": 1e-4, "time_step_limit": [0.0, float("inf")],
        "n_routed_experts": cfg.n_experts, "num_experts_per_tok": cfg.top_k,
        "moe_intermediate_size": cfg.moe_d_ff, "moe_shared_expert_intermediate_size": cfg.shared_d_ff,
        "n_shared_experts": 1, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
        "routed_scaling_factor": cfg.routed_scaling_factor, "norm_topk_prob": True,
        "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False, "initializer_range": 0.02,
        "num_nextn_predict_layers": 0, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 0,
    }


@pytest.mark.parametrize("aliases", [False, True], ids=["8b-keys", "mamba-aliases"])
def test_legacy_nemotron_h_folder(aliases, tmp_path):
    """A Nemotron-H-8B-style folder: hybrid_override_pattern, attention_head_dim (head_dim 12 !=
    d_model / n_head, so a fallback would be caught). Not checked against transformers: its
    NemotronHConfig 5.x ignores attention_head_dim and uses head_dim's default, 128 (which is the
    8B's value, so the real checkpoint loads there)."""
    model = our_model(pattern="M-M*-", head_dim=12, mamba_groups=2, d_conv=3, chunk_size=4)
    ref = logits_of(model, IDX)
    write_folder(tmp_path, legacy_config(model.config, aliases), nvidia_tensors(model))
    loaded = Nemotron.from_pretrained(str(tmp_path))
    for f in ("pattern", "head_dim", "mamba_groups", "d_conv", "chunk_size"):
        assert getattr(loaded.config, f) == getattr(model.config, f), f
    assert_close(logits_of(loaded, IDX), ref, "legacy folder", **TOL)


def test_nano3_folder(tmp_path):
    """A Nemotron-3-Nano-style folder: layers_block_type names, per-expert tensors."""
    model = our_model(pattern="MEM*E-", routed_scaling_factor=2.5)
    ref = logits_of(model, IDX)
    tensors = nvidia_tensors(model)
    assert "backbone.layers.1.mixer.experts.7.down_proj.weight" in tensors
    assert "backbone.layers.1.mixer.gate.e_score_correction_bias" in tensors
    write_folder(tmp_path, nano3_config(model.config), tensors)
    loaded = Nemotron.from_pretrained(str(tmp_path))
    assert loaded.config.pattern == "MEM*E-"
    assert_close(logits_of(loaded, IDX), ref, "nano3 folder", **TOL)


def test_hand_sharded_folder(tmp_path):
    """An index + 3 shards, with experts of one layer spread over several files."""
    model = our_model(pattern="ME*E")
    write_folder(tmp_path, nano3_config(model.config), nvidia_tensors(model), shards=3)
    assert_close(logits_of(Nemotron.from_pretrained(str(tmp_path)), IDX), logits_of(model, IDX),
                 "hand-sharded folder", **TOL)


def test_save_sharded(tmp_path):
    """save_hf with a small max_shard_bytes writes an index and several shards; ours and
    transformers both load them."""
    model = our_model(**CONFIGS["moe"])
    ref = logits_of(model, IDX)
    save_hf(model, str(tmp_path), max_shard_bytes=40_000)
    with open(tmp_path / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
    assert len(files) >= 3 and not (tmp_path / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(files + ["config.json", "model.safetensors.index.json"])
    for fname in files:  # every shard holds what the index says, and is under the limit (or one tensor)
        with safe_open(str(tmp_path / fname), "pt") as f:
            keys = set(f.keys())
        assert keys == {k for k, v in weight_map.items() if v == fname}
        assert os.path.getsize(tmp_path / fname) < 40_000 + 10_000 or len(keys) == 1
    assert_close(logits_of(Nemotron.from_pretrained(str(tmp_path)), IDX), ref, "sharded, ours", **TOL)
    assert_close(logits_of(hf_load(tmp_path), IDX), ref, "sharded, transformers", **TOL)


def test_bf16_folder(tmp_path):
    """A bf16 folder loads as bf16 by default (the checkpoint's dtype) and as fp32 on request;
    either way the weights are the saved ones."""
    model = our_model(**CONFIGS["moe"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    b = Nemotron.from_pretrained(str(tmp_path))
    assert {p.dtype for p in b.parameters()} == {torch.bfloat16}
    f = Nemotron.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert {p.dtype for p in f.parameters()} == {torch.float32}
    sd_b, sd_f = b.state_dict(), f.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(sd_b[k], v) and torch.equal(sd_f[k], v.float()), k
    # bf16 weights upcast exactly, so the fp32 load is the fp32 model of those weights
    ref = logits_of(model.float(), IDX)
    assert_close(logits_of(f, IDX), ref, "bf16 folder loaded as fp32", **TOL)


@pytest.mark.parametrize("name", ["moe", "tied"])
def test_loader_allocates_once(name, tmp_path):
    """from_pretrained builds on the meta device and hands each parameter its tensor from disk:
    nothing is left on meta, and the storages hold exactly the parameters' bytes (no second copy,
    no tensor that is a view into a bigger buffer); tied weights share one storage."""
    model = our_model(**CONFIGS[name])
    model.save_pretrained(tmp_path)
    loaded = Nemotron.from_pretrained(str(tmp_path))
    tensors = list(loaded.parameters()) + list(loaded.buffers())  # parameters() dedups tied ones
    assert not any(t.is_meta for t in tensors)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    assert len(storages) == len(tensors), "two tensors share a storage"
    assert sum(storages.values()) == sum(t.numel() * t.element_size() for t in tensors)
    if name == "tied":
        assert loaded.lm_head.weight is loaded.backbone.embeddings.weight


# -----------------------------------------------------------------------------
# what the loader refuses


def good_folder(tmp_path, **kw):
    model = our_model(**{**CONFIGS["moe"], **kw})
    model.save_pretrained(tmp_path)
    return tmp_path


def edit_config(folder, fn):
    with open(folder / "config.json") as f:
        hf = json.load(f)
    fn(hf)
    with open(folder / "config.json", "w") as f:
        json.dump(hf, f)


def edit_tensors(folder, fn):
    tensors = load_file(str(folder / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def drop_pattern(hf):
    hf.pop("layers_block_type", None)
    hf.pop("hybrid_override_pattern", None)


@pytest.mark.parametrize("edit,key", [
    (lambda hf: hf.update(mlp_hidden_act="silu"), "mlp_hidden_act"),
    (lambda hf: hf.update(attention_bias=True), "attention_bias"),
    (lambda hf: hf["layers_block_type"].__setitem__(1, "cross_attention"), "cross_attention"),
    (drop_pattern, "layers_block_type"),
], ids=["silu", "attention-bias", "cross-attention", "no-pattern"])
def test_unsupported_config(edit, key, tmp_path):
    folder = good_folder(tmp_path)
    edit_config(folder, edit)
    with pytest.raises(CheckpointError, match=key):
        Nemotron.from_pretrained(str(folder))


def test_settings_of_absent_layer_kinds_are_not_checked(tmp_path):
    """A MoE-only folder whose Mamba settings break our rules (heads not a multiple of groups, an
    activation we lack) loads, as in transformers; the same settings with a Mamba layer are refused."""
    from checkpoint import config_from_hf
    hf = hf_config(layers_block_type=["moe", "mlp"], mamba_num_heads=4, n_groups=8).to_dict()
    hf.update(mamba_hidden_act="gelu", use_conv_bias=False)
    cfg = config_from_hf(hf)
    assert cfg.pattern == "E-" and (cfg.mamba_heads, cfg.mamba_groups) == (4, 8)
    with pytest.raises(CheckpointError, match="use_conv_bias.*mamba_hidden_act"):
        config_from_hf({**hf, "layers_block_type": ["mamba", "moe"]})
    with pytest.raises(CheckpointError, match="multiple of mamba_groups"):
        config_from_hf({**hf, "layers_block_type": ["mamba", "moe"], "mamba_hidden_act": "silu",
                        "use_conv_bias": True})
    with pytest.raises(AssertionError, match="multiple of n_group"):
        NemotronConfig(pattern="*E", n_experts=6, n_group=4)


def test_missing_weights_file(tmp_path):
    folder = good_folder(tmp_path)
    os.remove(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Nemotron.from_pretrained(str(folder))


@pytest.mark.parametrize("key,named", [
    ("backbone.layers.0.mixer.A_log", "A_log"),
    ("backbone.layers.2.mixer.gate.weight", "gate.weight"),
    ("backbone.layers.2.mixer.experts.5.up_proj.weight", "experts.up_proj"),
    ("lm_head.weight", "lm_head"),
])
def test_missing_tensor(key, named, tmp_path):
    folder = good_folder(tmp_path)
    edit_tensors(folder, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        Nemotron.from_pretrained(str(folder))


@pytest.mark.parametrize("key,shape", [
    ("backbone.layers.0.mixer.in_proj.weight", (10, 32)),
    ("backbone.norm_f.weight", (31,)),
    ("backbone.layers.2.mixer.experts.3.up_proj.weight", (16, 31)),
    ("backbone.layers.2.mixer.experts.3.down_proj.weight", (1, 16)),  # would broadcast into (32, 16)
], ids=["in_proj", "norm", "expert", "expert-broadcastable"])
def test_wrong_shape(key, shape, tmp_path):
    """Regression (issue #2): a per-expert tensor of the wrong shape raised RuntimeError, or was
    silently broadcast into its slot, instead of a CheckpointError naming it."""
    folder = good_folder(tmp_path)
    edit_tensors(folder, lambda t: t.__setitem__(key, torch.zeros(shape)))
    with pytest.raises(CheckpointError, match=key.rsplit(".", 2)[-2]):
        Nemotron.from_pretrained(str(folder))


def test_unexpected_tensor(tmp_path):
    folder = good_folder(tmp_path)
    edit_tensors(folder, lambda t: t.__setitem__("backbone.layers.0.mixer.bogus.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="bogus"):
        Nemotron.from_pretrained(str(folder))


def test_expert_index_out_of_range(tmp_path):
    """Regression (issue #2): experts.8.* with 8 experts raised IndexError, not CheckpointError."""
    folder = good_folder(tmp_path)
    edit_tensors(folder, lambda t: t.__setitem__("backbone.layers.2.mixer.experts.8.up_proj.weight",
                                                 torch.zeros(16, 32)))
    with pytest.raises(CheckpointError, match="experts"):
        Nemotron.from_pretrained(str(folder))


def test_missing_keys_take_transformers_defaults():
    """A config.json that leaves a key out gets what transformers' NemotronHConfig defaults it to
    (e.g. ssm_state_size 128, chunk_size 128, head_dim 128), not our NemotronConfig defaults."""
    from checkpoint import HF_CONFIG_KEYS, config_from_hf
    hf = {"hybrid_override_pattern": "M*-", "hidden_size": 256, "num_attention_heads": 4,
          "num_key_value_heads": 2, "mamba_num_heads": 8, "n_groups": 2}
    ours = config_from_hf(hf)
    theirs = tf.NemotronHConfig(**hf)
    for field, (key, _, _) in HF_CONFIG_KEYS.items():
        assert getattr(ours, field) == getattr(theirs, key), f"{field} vs {key}"
