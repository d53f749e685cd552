"""
model.py: the Nemotron hybrid Mamba-Transformer-MoE language model. Read this file first.

Papers: Nemotron-H (arXiv:2504.03624): a stack of Mamba-2, attention and MLP layers written as one
pattern string, each layer a pre-norm residual block; Nemotron 3 (NVIDIA 2025): some MLPs become
(Latent)MoE layers. The mixers live in mamba.py, attention.py and moe.py; this file wires them
together, initialises them and decodes with caches; checkpoint.py reads and writes checkpoints.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import Attention, cached_positions, star_broadcast, star_rank
from mamba import GatedRMSNorm, Mamba2Mixer, ssd_flops
from moe import MLP, MoE

# -----------------------------------------------------------------------------
# config


@dataclass
class NemotronConfig:
    vocab_size: int = 256                 # bytes by default; Nemotron's tokenizer has 131072
    d_model: int = 256                    # residual width (HF hidden_size)
    pattern: str = "M-M*M-ME"             # per layer: M mamba2, * attention, - mlp, E moe, W sliding-window attention
    norm_eps: float = 1e-5                # RMSNorm epsilon, every norm in the model
    tie_embeddings: bool = False          # share the embedding and LM head weights
    init_std: float = 0.02                # std of every linear/embedding weight at init
    # attention (*)
    n_head: int = 4                       # query heads
    n_kv_head: int = 2                    # key/value heads (GQA)
    head_dim: int = 64                    # per head
    rope: bool = False                    # Nemotron-H attention is NoPE; RoPE is opt-in
    rope_theta: float = 10000.0           # RoPE base, when rope is on (and in W layers, always)
    sliding_window: int = 512             # W layers attend to the last this many positions, with RoPE (SWAN-GPT)
    swan_train_len: int = None            # NoPE attention: scale queries by max(1, log(p+1)/log(this)) (None: off)
    # mlp (-)
    d_ff: int = 1024                      # squared-ReLU MLP width (HF intermediate_size)
    # mamba-2 (M)
    mamba_heads: int = 8                  # H; d_inner = H * P
    headdim: int = 64                     # P
    d_state: int = 64                     # N
    n_groups: int = 1                     # G: heads share B and C within a group
    d_conv: int = 4                       # K, causal depthwise conv width
    chunk_size: int = 64                  # Q of the chunked SSD
    dt_min: float = 0.001                 # dt is initialised log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4           # ... and at least this
    dt_limit: tuple = (0.001, float("inf"))  # dt is clamped to this range (see HF_CONFIG_KEYS)
    # moe (E)
    n_experts: int = 8                    # routed experts
    top_k: int = 2                        # experts per token
    moe_d_ff: int = 256                   # routed expert width
    shared_d_ff: int = 512                # the always-on shared expert's width
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
            whole(self, 1, "mamba_heads", "headdim", "d_state", "n_groups", "d_conv", "chunk_size")
            positive(self, "dt_min", "dt_max")
            lo, hi = self.dt_limit
            assert self.dt_init_floor >= 0 and 0 <= lo < hi and self.dt_min <= self.dt_max, \
                f"need dt_min <= dt_max, dt_init_floor >= 0 and 0 <= dt_limit[0] < dt_limit[1], got " \
                f"{self.dt_min}, {self.dt_max}, {self.dt_init_floor}, {self.dt_limit}"
            assert self.mamba_heads % self.n_groups == 0, "mamba_heads must be a multiple of n_groups"
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
        """Training FLOPs per token (forward + backward = 3x forward) at sequence length T:
        6 per active weight, plus attention's scores and values (the causal half of them) and the
        SSD's quadratic-in-chunk and state terms. Counted here from the module's weights;
        plan.flops_per_token counts the same per layer type from the config alone (train.py's MFU
        uses that one; tests/test_plan.py checks that the two agree)."""
        cfg = self.config
        flops = 6 * self.num_params(active=True)
        attn = 2 * 2 * cfg.n_head * cfg.head_dim * T / 2  # QK^T and AV, causal half, per token
        Wn = min(T, cfg.sliding_window)  # a W layer's query sees Wn keys, fewer in the first Wn positions
        local = 2 * 2 * cfg.n_head * cfg.head_dim * Wn * (1 - Wn / (2 * T))
        ssd = ssd_flops(cfg.mamba_heads, cfg.headdim, cfg.d_state, cfg.chunk_size)
        n_attn = cfg.pattern.count("*")
        if cfg.mtp_depth:  # every depth runs its blocks and the LM head once more per token
            per_depth = sum(p.numel() for p in self.mtp[0].parameters())
            per_depth -= cfg.mtp_pattern.count("E") * idle_expert_params(cfg)
            flops += 6 * (cfg.mtp_depth * (per_depth + self.lm_head.weight.numel())
                          - len(self.mtp) * per_depth)  # num_params counted each weight set once
            n_attn += cfg.mtp_depth * cfg.mtp_pattern.count("*")
        return flops + 3 * (n_attn * attn + cfg.pattern.count("W") * local + cfg.pattern.count("M") * ssd)

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

    # -------------------------------------------------------------------------
    # decoding

    def new_cache(self, batch_size, max_len):
        """One entry per layer: Mamba conv + SSM states (constant size), attention KV buffers."""
        p = self.lm_head.weight
        cache = []
        for block in self.backbone.layers:
            if block.kind == "M":
                cache.append(block.mixer.new_cache(batch_size, p.device, p.dtype))
            elif block.kind in "*W":
                cache.append(block.mixer.new_cache(batch_size, max_len, p.device, p.dtype))
            else:
                cache.append(None)
        return cache

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, steer=None,
                        star_block=None, star_query=1, star_group=None):
        """Yields max_new_tokens tokens of shape (B, 1): one prefill forward over the prompt
        (the chunked SSD hands its final state to the cache), then one token at a time.
        steer(token (B, 1)) -> tokens (B, m >= 1) may replace each sampled token by others, which
        are emitted and read as if sampled (a thinking budget closes its section this way).
        star_block=b: Star Attention (star_prefill below) in blocks of b tokens, the last
        star_query prompt tokens as the query; star_group: the process group of the hosts (every
        rank then emits the tokens its rank 0 sampled). None / 0: ordinary full attention."""
        if star_block:
            cache, h = star_prefill(self, idx, star_block, star_query, max_new_tokens, star_group)
            logits = self.lm_head(h[:, -1]).float()  # (B, vocab)
        else:
            cache = self.new_cache(idx.size(0), idx.size(1) + max_new_tokens)
            logits = self.lm_head(self.hidden(idx, cache)[:, -1]).float()  # (B, vocab)
        emitted = 0
        while emitted < max_new_tokens:
            nxt = sample_next(logits, temperature, top_k, top_p)  # (B, 1)
            if star_block and star_group is not None:  # one token for all hosts, whatever their RNGs
                nxt = star_broadcast(nxt, 0, star_group)
            if steer is not None:
                nxt = steer(nxt)[:, :max_new_tokens - emitted]  # (B, m)
            for i in range(nxt.size(1)):
                yield nxt[:, i:i + 1]
            emitted += nxt.size(1)
            if emitted < max_new_tokens:
                logits = self.lm_head(self.hidden(nxt, cache)[:, -1]).float()

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, speculative=0,
                 star_block=None, star_query=1, star_group=None):
        """idx (B, T) -> (B, T + max_new_tokens). temperature=0 is greedy. speculative=k drafts k
        tokens per step with the MTP depths and verifies them in one forward (batch 1): greedy
        output is the same token for token, sampled output has the same distribution.
        star_block, star_query, star_group: Star Attention, as in generate_stream."""
        if speculative and star_block:
            raise ValueError("speculative decoding and Star Attention do not combine: use one of them")
        if speculative:
            new = list(self.speculative_stream(idx, max_new_tokens, speculative, temperature, top_k, top_p))
        else:
            new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, None,
                                            star_block, star_query, star_group))
        return torch.cat([idx, *new], dim=1)

    # -------------------------------------------------------------------------
    # self-speculative decoding with the MTP depths
    #
    # Committed: the tokens t_0 .. t_n, the main model's caches through position n-1 (t_n is the
    # next input), and its final hidden states h_i. One round:
    #   1) draft: depth j = 1..k reads (h^{j-1}_i, t_{i+j}) at each position i of a short window
    #      [s, n-1] and its output at n-1 proposes d_j for t_{n+j} (t_{n+j} itself for i+j > n is a
    #      draft: d_{i+j-n}). Recomputing the window keeps each depth's attention cache exactly
    #      what training saw: entries before s read committed tokens only (drafts that were since
    #      accepted included), and are kept; s trails n by at most k-1, by less when drafts were kept.
    #   2) verify: the main model reads [t_n, d_1 .. d_k] in one forward (k+1 positions); its
    #      logits at position n+j-1 judge d_j, and the one after the last accepted draft gives a
    #      token of its own, so a round emits 1 .. k+1 tokens.
    #   3) roll back to the last accepted position: attention caches just forget the entries past
    #      it; a Mamba layer cannot un-apply its recurrence, so in this forward it runs token by
    #      token and keeps the conv window and the SSM state after every token (the k-token decode
    #      kernel's saved states on a GPU, ssd_step on a CPU), and takes back the one it needs.

    def mtp_cache(self, max_len):
        """Per MTP block: an attention KV cache, or None (MLP and MoE keep nothing)."""
        p = self.lm_head.weight
        return [b.mixer.new_cache(1, max_len, p.device, p.dtype) if b.kind == "*" else None
                for b in self.mtp[0].layers]

    def rollback(self, cache, n_new, j):
        """Keep the first j+1 of the n_new positions the last forward appended to cache."""
        for block, c in zip(self.backbone.layers, cache):
            if block.kind == "M":
                block.mixer.rollback(c, j)
            elif block.kind in "*W":  # a W layer's ring keeps 8 spare slots for this
                c["pos"] -= n_new - (j + 1)

    @torch.no_grad()
    def speculative_stream(self, idx, max_new_tokens, k, temperature=1.0, top_k=None, top_p=None, stats=None):
        """Yields max_new_tokens tokens (1, 1) as generate_stream does, drafting k tokens per round
        with the MTP depths. stats, a dict, receives "rounds", "drafted" and "accepted" per draft
        position (for the acceptance rate)."""
        cfg = self.config
        if idx.size(0) != 1:
            raise ValueError("speculative decoding runs one sequence at a time (batch 1)")
        if not cfg.mtp_depth:
            raise ValueError("speculative decoding drafts with the MTP depths: this model has none (mtp_depth=0)")
        if not 1 <= k <= (7 if cfg.mtp_share else min(7, cfg.mtp_depth)):
            raise ValueError(f"speculative={k}: 1 .. {7 if cfg.mtp_share else min(7, cfg.mtp_depth)} "
                             f"draft tokens (one per MTP depth unless mtp_share; at most 7)")
        stats = stats if stats is not None else {}
        stats.update(rounds=0, drafted=0, accepted=[0] * k)
        max_len = idx.size(1) + max_new_tokens + k + 1
        cache = self.new_cache(1, max_len)
        mtp_caches = [self.mtp_cache(max_len) for _ in range(k)]
        embed, head = self.backbone.embeddings, self.lm_head
        H = self.hidden(idx, cache)  # (1, n, d): main hidden states of the window [s, n-1]
        for c in cache:
            if c is not None and "ssm" in c:
                c["keep"] = True  # from now on, Mamba layers keep every state of a forward
        seq = torch.cat([idx, sample_next(head(H[:, -1]).float(), temperature, top_k, top_p)], dim=1)
        yield seq[:, -1:]
        # depths without attention (mtp_pattern of - and E only) act per position and keep no cache:
        # the window is then the last position alone
        per_position = "*" not in cfg.mtp_pattern
        emitted, s = 1, idx.size(1) - 1 if per_position else 0
        H = H[:, s:]
        while emitted < max_new_tokens:
            n = seq.size(1) - 1
            # 1) draft d_1 .. d_k, depth by depth over the window [s, n-1]
            h, ext, q = H, seq, []
            for j in range(1, k + 1):
                for c in mtp_caches[j - 1]:
                    if c is not None:
                        c["pos"] = s  # entries from s on are recomputed
                h = self.mtp_depth_module(j)(h, embed(ext[:, s + j:n + j]), mtp_caches[j - 1])  # (1, n-s, d)
                q.append(probabilities(head(h[:, -1]).float(), temperature, top_k, top_p))  # (1, vocab)
                ext = torch.cat([ext, pick(q[-1], temperature)], dim=1)
            drafts = ext[:, n + 1:]  # (1, k)
            # 2) verify: the main model over [t_n, d_1 .. d_k]
            hv = self.hidden(ext[:, n:], cache)  # (1, k+1, d)
            p = probabilities(head(hv[0]).float(), temperature, top_k, top_p)  # (k+1, vocab)
            j, nxt = accept(drafts[0], torch.cat(q), p, temperature)  # drafts kept, the verifier's token
            # 3) roll back to position n+j, the last accepted draft
            self.rollback(cache, k + 1, j)
            stats["rounds"] += 1
            stats["drafted"] += k
            for i in range(j):
                stats["accepted"][i] += 1
            new = torch.cat([drafts[:, :j], nxt.view(1, 1)], dim=1)  # (1, j+1)
            for i in range(min(j + 1, max_new_tokens - emitted)):
                yield new[:, i:i + 1]
            emitted += j + 1
            seq = torch.cat([seq, new], dim=1)
            H = torch.cat([H, hv[:, :j + 1]], dim=1)
            # depth i's entry at position p read the tokens through t_{p+i}: drafts past t_n, which
            # are all committed now if p + i <= n + j. Every depth keeps its entries before s_next
            s_next = n + j if per_position else max(0, n - max(0, k - 1 - j))
            H, s = H[:, s_next - s:], s_next

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


def cross_entropy(logits, targets):
    """The mean cross-entropy over the targets that are not -1 (B, T, vocab), (B, T) -> (); 0 when
    none is (a window of a loss-masked data set may hold only prompt tokens), where F.cross_entropy
    would give nan."""
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction="sum")
    return loss / (targets != -1).sum().clamp(min=1)


def probabilities(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, vocab) -> the distribution sampling draws from (B, vocab): temperature, then
    top-k and top-p filtering. temperature=0 returns the logits untouched (greedy takes argmax)."""
    if temperature == 0:
        return logits
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)))[0][:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


def pick(probs, temperature):
    """A token (B, 1) from probabilities(): argmax when greedy, else a draw."""
    return probs.argmax(-1, keepdim=True) if temperature == 0 else torch.multinomial(probs, 1)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, vocab) -> next token (B, 1): greedy, or temperature / top-k / top-p sampling."""
    return pick(probabilities(logits, temperature, top_k, top_p), temperature)


def accept(drafts, q, p, temperature):
    """Speculative acceptance of k drafts. drafts (k,), q (k, vocab) the draft distributions they
    were drawn from, p (k+1, vocab) the verifier's at the same positions and one past them.
    Returns j, the number of drafts kept, and the verifier's own next token (a tensor).
    Greedy: keep drafts while they equal the verifier's argmax, then add its argmax.
    Sampling (Leviathan et al. 2023, Chen et al. 2023): keep d_i with probability
    min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw from norm(max(p_i - q_i, 0)); if all
    are kept draw from p_k. The tokens emitted are then distributed exactly as p's own draws."""
    k = drafts.numel()
    if temperature == 0:
        target = p.argmax(-1)  # (k+1,)
        j = int((drafts == target[:k]).long().cumprod(0).sum())
        return j, target[j]
    for i in range(k):
        d = drafts[i]
        if torch.rand(()) * q[i, d] <= p[i, d]:  # accepted with probability min(1, p/q)
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        return i, torch.multinomial(residual / residual.sum(), 1)[0]
    return k, torch.multinomial(p[k], 1)[0]


# -----------------------------------------------------------------------------
# Star Attention (Acharya et al. 2024, arXiv:2411.17116): a long prompt prefilled in blocks.
#
# The prompt idx (B, T) is a context, its first Tc = T - query_len tokens, then a query, the last
# query_len (our choice of split: the caller says where the question starts; sample.py's default is
# the last token). The context is cut into n = ceil(Tc / b) blocks c_0 .. c_{n-1} of b tokens (the
# last one may be shorter), block i on host i. One process simulates all hosts; under a process
# group of K ranks, rank r holds the blocks i with i * K // n == r (contiguous), so the rank with the
# last block, the query host, is the last one that has any.
#   1) context encoding: the anchor c_0 alone; every later block c_i with the anchor prepended,
#      [c_0, c_i], at the global positions of both (RoPE and W windows, swan_scale); then the
#      anchor's keys/values are dropped, and each host keeps only those of its own block. The
#      anchor's hidden states are the same in front of every block (causal), so a process runs the
#      anchor once, and its other blocks as one batch of rows over the anchor's cache.
#   2) query encoding and generation: the query tokens, then each generated token, attend to all
#      cached keys: each host computes its local (out, lse), the exact global softmax combines them
#      (attention.py), and the query host appends their keys/values.
# Mamba layers (ours: the paper's models have none). In phase 1 a block's Mamba layers start from
# the state after the anchor, which the anchor-prepended sequence gives, so each block sees the
# anchor and itself through Mamba as through attention, and the blocks stay independent. Phase 2
# carries on from the last block's final states (the anchor, then the last block): the query host
# has them and broadcasts them once (constant size), so every host computes the same hidden states.
# What the middle blocks say reaches the query through the attention layers' keys only, never
# through a Mamba state: that is the hybrid's extra approximation (LOG.md measures it).
# MLP and MoE layers act per token, as always. W (sliding-window) layers keep their blocks' keys and
# go through the same combine with the window mask: in phase 2 only the last `window` positions are
# in view (of the last block, and of the one before when the last is shorter); in phase 1 a block's
# first tokens lose the keys of the block before (the anchor is usually out of the window).


def star_blocks(model, idx, starts, length, anchor):
    """Phase 1 for the blocks of `length` tokens at positions starts, one batch over the anchor's
    cache. Returns the hidden states (m, B, length, d) and the batch's cache (each attention
    layer's block keys in "new", each Mamba layer's final states per row)."""
    B, m = idx.size(0), len(starts)
    x = torch.cat([idx[:, s:s + length] for s in starts])  # (m*B, length), block-major
    qpos = torch.tensor(starts, device=idx.device)[:, None] + torch.arange(length, device=idx.device)  # (m, length)
    cache = []
    for block, c in zip(model.backbone.layers, anchor):
        if block.kind == "M":  # every block starts from the state after the anchor
            cache.append({key: t.repeat(m, *[1] * (t.dim() - 1)) for key, t in c.items()})  # (m*B, ...)
        elif block.kind in "*W":
            cache.append({"star": 1, "k": c["k"], "v": c["v"], "kpos": cached_positions(c),
                          "qpos": qpos.repeat_interleave(B, dim=0)})  # (m*B, length)
        else:
            cache.append(None)
    h = model.hidden(x, cache)  # (m*B, length, d)
    return h.view(m, B, length, -1), cache


@torch.no_grad()
def star_prefill(model, idx, block, query_len=1, max_new_tokens=0, group=None, mamba="anchor"):
    """Star Attention's prefill of idx (B, T): phase 1 over the context idx[:, :T - query_len] in
    blocks of `block` tokens, phase 2 over the query idx[:, T - query_len:]. group: a
    torch.distributed process group whose ranks are the hosts (every rank passes the same idx),
    None: this process simulates all of them. Returns (cache, h): the decoding cache, with which
    model.hidden(tokens, cache) runs phase 2 for up to max_new_tokens more tokens, and the final
    hidden states h (B, T, d) of the query (phase 2) and of the context blocks this process holds
    (phase 1; zero where another rank's blocks are). mamba="anchor": each block's Mamba layers
    start from the state after the anchor (the default, see above); "chain": from the state the
    block before ended in, which is exact for the Mamba recurrence but runs the blocks one after
    the other (one process only: an experiment to measure what "anchor" costs)."""
    B, T = idx.shape
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"star_block={block!r}: a block size in tokens >= 1")
    if isinstance(query_len, bool) or not isinstance(query_len, int) or not 1 <= query_len <= T:
        raise ValueError(f"star_query={query_len!r}: the query is 1 .. {T} tokens (the prompt's last ones)")
    if mamba not in ("anchor", "chain") or (mamba == "chain" and group is not None):
        raise ValueError(f"mamba={mamba!r}: 'anchor', or 'chain' in one process (no group)")
    Tc = T - query_len
    n = -(-Tc // block)
    rank, K = star_rank(group)
    mine = [i for i in range(n) if i * K // n == rank]
    query_host = (n - 1) * K // n if n else K - 1
    layers = model.backbone.layers
    h = torch.zeros(B, T, model.config.d_model, device=idx.device, dtype=model.lm_head.weight.dtype)
    held = [[] for _ in layers]  # per attention layer: (k, v, kpos) of each block held here
    last = model.new_cache(B, 1)  # Mamba states after the last block (zero with no context)
    # 1) context encoding
    if mine:
        A = min(block, Tc)
        anchor = model.new_cache(B, A)
        h[:, :A] = model.hidden(idx[:, :A], anchor)
        if mine[0] == 0:  # host 0 keeps the anchor's keys as its block's
            for i, (b, c) in enumerate(zip(layers, anchor)):
                if b.kind in "*W":
                    held[i].append((c["k"], c["v"], cached_positions(c)))
            last = anchor
        rest = [i for i in mine if i > 0]
        full = [i * block for i in rest if (i + 1) * block <= Tc]  # starts of the full blocks
        short = [(i * block, Tc - i * block) for i in rest if (i + 1) * block > Tc]  # the shorter last one
        groups = ([(full, block)] if full else []) + [([s], L) for s, L in short]
        if mamba == "chain":  # one block at a time, each from the states the one before ended in
            groups = [([s], length) for starts, length in groups for s in starts]
        start_from = anchor
        for starts, length in groups:
            hb, cb = star_blocks(model, idx, starts, length, start_from)
            if mamba == "chain":
                start_from = [cb[i] if b.kind == "M" else anchor[i] for i, b in enumerate(layers)]
            for j, s in enumerate(starts):
                h[:, s:s + length] = hb[j]
            for i, (b, c) in enumerate(zip(layers, cb)):
                if b.kind in "*W":
                    k, v = (t.view(len(starts), B, *t.shape[1:]) for t in c["new"])  # (m, B, g, length, d)
                    held[i] += [(k[j], v[j], c["qpos"][j * B]) for j in range(len(starts))]
            if starts[-1] + length == Tc:  # the last block: its final Mamba states carry on
                last = [{key: t.view(len(starts), B, *t.shape[1:])[-1] for key, t in c.items()}
                        if b.kind == "M" else None for b, c in zip(layers, cb)]
    # 2) query encoding: the caches of phase 2, then the query through them
    cache = star_cache(model, held, last, B, Tc, query_len + max_new_tokens, query_host, group)
    h[:, Tc:] = model.hidden(idx[:, Tc:], cache)
    return cache, h


def star_cache(model, held, last, B, Tc, room, query_host, group):
    """Phase 2's cache: per attention layer the blocks held here, padded to one length (position
    -1: no key), one host each, and on the query host a buffer of `room` new tokens; per Mamba
    layer the states after the last block (the query host's, broadcast to all hosts)."""
    rank, _ = star_rank(group)
    cache = []
    for i, b in enumerate(model.backbone.layers):
        if b.kind == "M":
            c = {"conv": last[i]["conv"].contiguous(), "ssm": last[i]["ssm"].contiguous()}
            if group is not None:
                c = {key: star_broadcast(t, query_host, group) for key, t in c.items()}
            cache.append(c)
        elif b.kind in "*W":
            c = {"star": 2, "k": None, "v": None, "kpos": None, "qk": None, "qv": None, "fill": 0,
                 "pos": Tc, "group": group}
            if held[i]:
                L = max(k.size(2) for k, _, _ in held[i])
                pad = lambda t: F.pad(t, (0, 0, 0, L - t.size(2)))  # (B, g, L, d)
                c["k"] = torch.stack([pad(k) for k, _, _ in held[i]], dim=1)  # (B, n, g, L, d)
                c["v"] = torch.stack([pad(v) for _, v, _ in held[i]], dim=1)  # (B, n, g, L, d)
                c["kpos"] = torch.stack([F.pad(p, (0, L - p.numel()), value=-1) for _, _, p in held[i]])  # (n, L)
            if rank == query_host:
                p = model.lm_head.weight
                shape = (B, b.mixer.n_kv_head, room, b.mixer.head_dim)
                c["qk"] = torch.zeros(shape, device=p.device, dtype=p.dtype)  # (B, g, room, d)
                c["qv"] = torch.zeros_like(c["qk"])
            cache.append(c)
        else:
            cache.append(None)
    return cache
