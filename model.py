"""
model.py: the Nemotron hybrid Mamba-Transformer-MoE language model. Read this file first.

Papers: Nemotron-H (arXiv:2504.03624): a stack of Mamba-2, attention and MLP layers written as one
pattern string, each layer a pre-norm residual block; Nemotron 3 (NVIDIA 2025): some MLPs become
(Latent)MoE layers. The mixers live in mamba.py, attention.py and moe.py; this file wires them
together, initialises them and computes the loss; generate.py decodes with caches, checkpoint.py
reads and writes checkpoints.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import Attention
from mamba import GatedRMSNorm, Mamba2Mixer, ssd_flops
from moe import MLP, MoE

# -----------------------------------------------------------------------------
# config


@dataclass
class NemotronConfig:
    """The model, one field per setting. The defaults are the 0.9M-parameter hybrid that
    `python train.py` trains on a laptop CPU in minutes (train.py's model flags are these fields)."""
    vocab_size: int = 256                 # bytes by default (train.py: the data set's); Nemotron's tokenizer has 131072
    d_model: int = 128                    # residual width (HF hidden_size)
    pattern: str = "M*M-ME"               # per layer: M mamba2, * attention, - mlp, E moe, W sliding-window attention
    norm_eps: float = 1e-5                # RMSNorm epsilon, every norm in the model
    tie_embeddings: bool = False          # share the embedding and LM head weights
    init_std: float = 0.02                # std of every linear/embedding weight at init
    # attention (*)
    n_head: int = 4                       # query heads
    n_kv_head: int = 2                    # key/value heads (GQA)
    head_dim: int = 32                    # per head
    rope: bool = False                    # Nemotron-H attention is NoPE; RoPE is opt-in
    rope_theta: float = 10000.0           # RoPE base, when rope is on (and in W layers, always)
    sliding_window: int = 512             # W layers attend to the last this many positions, with RoPE (SWAN-GPT)
    swan_train_len: int = None            # NoPE attention: scale queries by max(1, log(p+1)/log(this)) (None: off)
    # mlp (-)
    d_ff: int = 512                       # squared-ReLU MLP width (HF intermediate_size)
    # mamba-2 (M)
    mamba_heads: int = 4                  # H; d_inner = H * P (here 2 * d_model, Mamba-2's expansion)
    mamba_head_dim: int = 64              # P
    d_state: int = 32                     # N
    mamba_groups: int = 2                 # G: heads share B and C within a group (2: every size --tp=2 splits divides)
    d_conv: int = 4                       # K, causal depthwise conv width
    chunk_size: int = 32                  # Q of the chunked SSD
    dt_min: float = 0.001                 # dt is initialised log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4           # ... and at least this
    dt_limit: tuple = (0.001, float("inf"))  # dt is clamped to this range (see checkpoint.HF_CONFIG_KEYS)
    # moe (E)
    n_experts: int = 8                    # routed experts
    top_k: int = 2                        # experts per token
    moe_d_ff: int = 128                   # routed expert width
    shared_d_ff: int = 256                # the always-on shared expert's width (0: none)
    moe_latent_size: int = None           # LatentMoE width l for routed experts; None = off
    n_group: int = 1                      # expert groups for group-limited routing
    topk_group: int = 1                   # groups a token may route into
    routed_scaling_factor: float = 1.0    # multiplies the normalised routing weights
    norm_topk_prob: bool = True           # normalise the chosen weights to sum to one
    moe_seq_aux_coef: float = 0.0         # alpha of DeepSeek-V3's sequence-wise balance loss (training only); 0 = off
    # multi-token prediction (MTP): depth k at position i predicts token i+k+1
    mtp_depth: int = 0                    # D, the number of MTP depths trained (0: none)
    mtp_pattern: str = "*E"               # each depth's block stack: attention, MLP, MoE (no Mamba)
    mtp_share: bool = False               # one set of MTP weights for every depth (and any draft length)
    mtp_loss_weight: float = 0.3          # lambda: training loss = main + lambda * mean of the D MTP losses

    def __post_init__(self):
        self.dt_limit = tuple(self.dt_limit)  # a list after JSON / ckpt round trips
        bad = set(self.pattern) - set("M*-EW")
        assert self.pattern and not bad, f"pattern {self.pattern!r}: unknown layer kinds {sorted(bad)}"
        bad = set(self.mtp_pattern) - set("*-E")
        assert self.mtp_depth == 0 or (self.mtp_pattern and not bad), \
            f"mtp_pattern {self.mtp_pattern!r}: MTP blocks are attention (*), MLP (-) or MoE (E)"
        whole(self, 1, "vocab_size", "d_model")
        whole(self, 0, "mtp_depth")
        positive(self, "norm_eps", "rope_theta")
        assert self.init_std >= 0 and self.mtp_loss_weight >= 0, "init_std and mtp_loss_weight must be >= 0"
        # each rule only where a layer uses the setting: a model of MoE layers alone may carry Mamba
        # settings no layer reads (transformers' defaults in its config.json), and still load
        kinds = set(self.pattern) | (set(self.mtp_pattern) if self.mtp_depth else set())
        if kinds & set("*W"):
            whole(self, 1, "n_head", "n_kv_head", "head_dim", *(("sliding_window",) if "W" in kinds else ()))
            assert self.swan_train_len is None or whole(self, 1, "swan_train_len")
            assert self.n_head % self.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
            assert not (self.rope or "W" in kinds) or self.head_dim % 2 == 0, "RoPE needs an even head_dim"
        if "-" in kinds:
            whole(self, 1, "d_ff")
        if "M" in kinds:
            whole(self, 1, "mamba_heads", "mamba_head_dim", "d_state", "mamba_groups", "d_conv", "chunk_size")
            positive(self, "dt_min", "dt_max")
            lo, hi = self.dt_limit
            assert self.dt_init_floor >= 0 and 0 <= lo < hi and self.dt_min <= self.dt_max, \
                f"need dt_min <= dt_max, dt_init_floor >= 0 and 0 <= dt_limit[0] < dt_limit[1], got " \
                f"{self.dt_min}, {self.dt_max}, {self.dt_init_floor}, {self.dt_limit}"
            assert self.mamba_heads % self.mamba_groups == 0, "mamba_heads must be a multiple of mamba_groups"
        if "E" in kinds:
            whole(self, 1, "n_experts", "top_k", "moe_d_ff", "n_group", "topk_group")
            whole(self, 0, "shared_d_ff")  # 0: no shared expert (Mixtral, Qwen3-MoE)
            assert self.moe_latent_size is None or whole(self, 1, "moe_latent_size")
            positive(self, "routed_scaling_factor")
            assert self.moe_seq_aux_coef >= 0, f"moe_seq_aux_coef must be >= 0, got {self.moe_seq_aux_coef}"
            assert self.n_experts % self.n_group == 0, "n_experts must be a multiple of n_group"
            assert self.topk_group <= self.n_group and self.top_k <= self.n_experts, \
                "top_k must be at most n_experts and topk_group at most n_group"
            assert self.top_k <= self.topk_group * self.n_experts // self.n_group, "too few experts in reach"
        self.n_layer = len(self.pattern)

    def to_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d):
        """A config from to_dict()'s output, also one saved under the fields' old names (RENAMED)."""
        return cls(**{RENAMED.get(k, k): v for k, v in d.items()})


# fields renamed since checkpoints were first written: {old name: new name}
RENAMED = {"headdim": "mamba_head_dim", "n_groups": "mamba_groups"}


def config_file(path):
    """A config/ file's model and assignments: (NemotronConfig, {name: value}). The model is what
    `python train.py path` trains (these defaults, with the file's assignments to the fields; where
    the file sets no vocab_size, train.py takes the data set's); the dict holds everything the file
    assigns (block_size and the other training settings too)."""
    scope = {}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), scope)
    names = {f.name for f in fields(NemotronConfig)} | set(RENAMED)
    model = NemotronConfig.from_dict({k: v for k, v in scope.items() if k in names})
    return model, {k: v for k, v in scope.items() if not k.startswith("_")}


def whole(cfg, low, *names):
    """Assert that each named field of cfg is a whole number >= low (True, for use in asserts)."""
    for name in names:
        v = getattr(cfg, name)
        assert isinstance(v, int) and not isinstance(v, bool) and v >= low, \
            f"{name} must be a whole number >= {low}, got {v!r}"
    return True


def positive(cfg, *names):
    for name in names:
        v = getattr(cfg, name)
        assert isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, f"{name} must be > 0, got {v!r}"


# -----------------------------------------------------------------------------
# the model


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # weight * x / sqrt(mean(x^2) + eps) in fp32, one fused op
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).to(x.dtype)


class Block(nn.Module):
    """Pre-norm residual block around one mixer: x + mixer(norm(x))."""

    def __init__(self, cfg, kind):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if kind == "M":
            self.mixer = Mamba2Mixer(cfg)
        elif kind == "*":
            self.mixer = Attention(cfg)
        elif kind == "W":
            self.mixer = Attention(cfg, window=cfg.sliding_window)
        elif kind == "-":
            self.mixer = MLP(cfg.d_model, cfg.d_ff)
        elif kind == "E":
            self.mixer = MoE(cfg)

    def forward(self, x, cache=None, seq_idx=None):
        h = self.norm(x)
        h = self.mixer(h, cache, seq_idx) if self.kind in "M*W" else self.mixer(h)
        return x + h


def idle_expert_params(cfg):
    """Parameters of one MoE layer that a token does not use: its n_experts - top_k unchosen experts."""
    return (cfg.n_experts - cfg.top_k) * 2 * (cfg.moe_latent_size or cfg.d_model) * cfg.moe_d_ff


class MTPDepth(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3, arXiv:2412.19437 Sec. 2.2; Nemotron 3):
        h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h_i)])    (2d -> d; the embedding comes first,
                                                              as NVIDIA's checkpoints and vLLM read it)
        h^k_i = final_layernorm(blocks(h'_i))                (blocks given by mtp_pattern)
    h_i is the previous depth's output (the main model's final hidden state for k = 1); the
    model's embedding and LM head are shared, so depth k's logits are lm_head(h^k_i)."""

    def __init__(self, cfg):
        super().__init__()
        self.enorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.layers = nn.ModuleList(Block(cfg, kind) for kind in cfg.mtp_pattern)
        self.final_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, h, emb, cache=None, seq_idx=None):
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))  # (B, T, d)
        for i, block in enumerate(self.layers):
            x = block(x, None if cache is None else cache[i], seq_idx)
        return self.final_layernorm(x)


class Nemotron(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.backbone = nn.ModuleDict(dict(  # named as in NVIDIA's checkpoints
            embeddings=nn.Embedding(config.vocab_size, config.d_model),
            layers=nn.ModuleList(Block(config, kind) for kind in config.pattern),
            norm_f=RMSNorm(config.d_model, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.mtp_depth:  # one set of weights per depth, or one shared by all
            self.mtp = nn.ModuleList(MTPDepth(config) for _ in range(1 if config.mtp_share else config.mtp_depth))
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Initialisation as Nemotron-H / Megatron-LM do it, all in one place:
        - linear and embedding weights, router and experts: N(0, init_std);
        - the projections that write into the residual stream (Mamba out_proj, attention o_proj,
          MLP/expert down_proj, fc2_latent_proj): N(0, init_std / sqrt(2 * n_layer)), GPT-2 style;
        - Mamba-2: A = -exp(A_log) with A ~ U[1, 16]; dt_bias = softplus^-1(dt) for dt log-uniform
          in [dt_min, dt_max] (floored at dt_init_floor), so the initial steps span two decades;
          D = 1; the conv keeps PyTorch's default init, as in the Mamba-2 code;
        - norms 1, biases 0, the MoE correction bias 0."""
        cfg = self.config
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layer)
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith(("out_proj.weight", "o_proj.weight", "down_proj.weight", "down_proj",
                              "fc2_latent_proj.weight")):
                nn.init.normal_(p, 0.0, out_std)
            elif "conv1d" in name or "norm" in name or leaf in ("A_log", "dt_bias", "D"):
                continue  # below
            else:
                nn.init.normal_(p, 0.0, std)
        for m in self.modules():
            if isinstance(m, (RMSNorm, GatedRMSNorm)):
                nn.init.ones_(m.weight)
            if isinstance(m, Mamba2Mixer):
                m.conv1d.reset_parameters()
                m.A_log.copy_(torch.empty_like(m.A_log).uniform_(1, 16).log())
                log_dt = torch.rand_like(m.dt_bias) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                dt = torch.exp(log_dt + math.log(cfg.dt_min)).clamp(min=cfg.dt_init_floor)
                m.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
                m.D.fill_(1.0)
        for b in self.buffers():
            b.zero_()

    def num_params(self, active=False):
        """Parameters without the embedding table; active=True counts only the top_k routed
        experts each token uses (the MoE's compute, not its memory)."""
        cfg = self.config
        n = sum(p.numel() for p in self.parameters()) - self.backbone.embeddings.weight.numel()
        if cfg.tie_embeddings:
            n += self.lm_head.weight.numel()  # the head still computes
        if active:
            n_moe = cfg.pattern.count("E") + (len(self.mtp) * cfg.mtp_pattern.count("E") if cfg.mtp_depth else 0)
            n -= n_moe * idle_expert_params(cfg)
        return n

    def flops_per_token(self, T):
        """Training FLOPs per token at sequence length T: flops_per_token(self.config, T) below."""
        return flops_per_token(self.config, T)

    def hidden(self, idx, cache=None, seq_idx=None):
        x = self.backbone.embeddings(idx)  # (B, T, d)
        for i, block in enumerate(self.backbone.layers):
            x = block(x, None if cache is None else cache[i], seq_idx)
        return self.backbone.norm_f(x)

    def forward(self, idx, targets=None, seq_idx=None):
        """idx (B, T) -> logits (B, T, vocab), and the mean cross-entropy if targets are given.
        seq_idx (B, T): document ids of packed sequences; no token then sees another document.
        With MTP depths and in training mode, the loss is main + mtp_loss_weight * mean of the
        depths' losses, and self.mtp_losses holds the D depth losses (detached) for the log; in
        eval mode it is the main model's loss alone."""
        h = self.hidden(idx, seq_idx=seq_idx)  # (B, T, d)
        logits = self.lm_head(h).float()  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = cross_entropy(logits, targets)
            if self.config.mtp_depth and self.training:
                mtp = self.mtp_loss(h, idx, targets, seq_idx)
                self.mtp_losses = [l.detach() for l in mtp]
                loss = loss + self.config.mtp_loss_weight * torch.stack(mtp).mean()
        return logits, loss

    def mtp_depth_module(self, k):
        """The weights of depth k (1-based): its own, or the one shared set."""
        return self.mtp[0] if self.config.mtp_share else self.mtp[k - 1]

    def mtp_loss(self, h, idx, targets, seq_idx=None):
        """The cross-entropy of each MTP depth k = 1..D: at position i it reads the previous
        depth's h_i and the embedding of t_{i+k} (= idx[i+k]) and predicts t_{i+k+1} (=
        targets[i+k]), so depth k covers the first T-k positions."""
        T, losses = idx.size(1), []
        for k in range(1, min(self.config.mtp_depth, T - 1) + 1):
            emb = self.backbone.embeddings(idx[:, k:])  # (B, T-k, d)
            h = self.mtp_depth_module(k)(h[:, :T - k], emb, seq_idx=None if seq_idx is None else seq_idx[:, :T - k])
            logits = self.lm_head(h).float()  # (B, T-k, vocab)
            losses.append(cross_entropy(logits, targets[:, k:]))
        return losses

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, speculative=0,
                 star_block=None, star_query=1, star_group=None, compile=False):
        """idx (B, T) -> (B, T + max_new_tokens). temperature=0 is greedy. Prefill once, then one
        token at a time with caches (generate.py). speculative=k drafts k tokens per step with the
        MTP depths and verifies them in one forward (batch 1): greedy output is the same token for
        token, sampled output has the same distribution. star_block=b prefills with Star Attention
        in blocks of b tokens, the last star_query prompt tokens as the query; star_group: the
        process group of its hosts (None: this process simulates them all). compile=True decodes
        over static caches with the one-token step compiled (generate.generate_batch, which also
        takes prompts of different lengths)."""
        from generate import generate  # generate.py imports this file: import it when called
        return generate(self, idx, max_new_tokens, temperature, top_k, top_p, speculative,
                        star_block, star_query, star_group, compile)

    # -------------------------------------------------------------------------
    # checkpoints: ours and Hugging Face NemotronH

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu"):
        """A Hugging Face NemotronH folder, a train.py out_dir, or a ckpt.pt of ours. Never
        touches the network. dtype=None keeps the checkpoint's dtype. (checkpoint.py reads it.)"""
        from checkpoint import load_model  # checkpoint.py imports this file: import it when called
        return load_model(path, dtype, device)

    def save_pretrained(self, folder):
        from checkpoint import save_hf
        save_hf(self, folder)


# -----------------------------------------------------------------------------
# counts from the config: parameters per block and training FLOPs per token


@dataclass(frozen=True)
class Params:
    dense: int              # parameters every token uses: projections, norms, router, shared expert
    experts: int            # routed-expert parameters, all E experts
    active: int             # of those, the top_k experts one token runs through


def layer_params(cfg, kind):
    """The Params of one block of this kind, from the config alone (plan.py sizes models it never
    builds); tests check them against the modules' own weights."""
    d = cfg.d_model
    if kind == "M":
        d_in, gn = cfg.mamba_heads * cfg.mamba_head_dim, cfg.mamba_groups * cfg.d_state
        conv = d_in + 2 * gn
        return Params(d + d * (2 * d_in + 2 * gn + cfg.mamba_heads) + conv * (cfg.d_conv + 1) + 3 * cfg.mamba_heads
                      + d_in + d_in * d, 0, 0)
    if kind in "*W":  # global or sliding-window attention: the same weights
        return Params(d + 2 * d * (cfg.n_head + cfg.n_kv_head) * cfg.head_dim, 0, 0)
    if kind == "-":
        return Params(d + 2 * d * cfg.d_ff, 0, 0)
    latent = cfg.moe_latent_size
    expert = 2 * (latent or d) * cfg.moe_d_ff
    dense = d + cfg.n_experts * d + 2 * d * cfg.shared_d_ff + (2 * d * latent if latent else 0)
    return Params(dense, cfg.n_experts * expert, cfg.top_k * expert)


def mtp_params(cfg):
    """The Params of one MTP depth's weights: enorm, hnorm, eh_proj, blocks, final norm."""
    per_block = [layer_params(cfg, k) for k in cfg.mtp_pattern]
    return Params(3 * cfg.d_model + 2 * cfg.d_model ** 2 + sum(p.dense for p in per_block),
                  sum(p.experts for p in per_block), sum(p.active for p in per_block))


def flops_per_token(cfg, T):
    """Training FLOPs per token (forward + backward = 3x forward) at sequence length T, the one
    count that train.py's MFU, bench.py and plan.py use: 6 per active weight (the embedding table
    is a lookup, the LM head a matmul), plus attention's scores and values over the causal half
    (a W layer's query sees at most sliding_window keys), plus the SSD's chunk products
    (mamba.ssd_flops). MTP depths run their blocks and the head once more per token."""
    head = cfg.vocab_size * cfg.d_model
    blocks = [layer_params(cfg, k) for k in cfg.pattern]
    active = sum(p.dense + p.active for p in blocks) + cfg.d_model + head
    kinds = cfg.pattern
    if cfg.mtp_depth:
        mtp = mtp_params(cfg)
        active += cfg.mtp_depth * (mtp.dense + mtp.active + head)
        kinds += cfg.mtp_pattern * cfg.mtp_depth
    attention = 2 * 2 * cfg.n_head * cfg.head_dim * T / 2
    window = min(T, cfg.sliding_window)  # a W layer's query sees this many keys, fewer early on
    local = 2 * 2 * cfg.n_head * cfg.head_dim * window * (1 - window / (2 * T))
    ssd = ssd_flops(cfg.mamba_heads, cfg.mamba_head_dim, cfg.d_state, cfg.chunk_size)
    return 6 * active + 3 * (kinds.count("*") * attention + kinds.count("W") * local + kinds.count("M") * ssd)


def cross_entropy(logits, targets):
    """The mean cross-entropy over the targets that are not -1 (B, T, vocab), (B, T) -> (); 0 when
    none is (a window of a loss-masked data set may hold only prompt tokens), where F.cross_entropy
    would give nan."""
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction="sum")
    return loss / (targets != -1).sum().clamp(min=1)
