"""
attention.py: causal grouped-query attention with a KV cache, global or sliding-window. Read
after model.py.

Nemotron-H's attention layers use no positional encoding at all (NoPE): the Mamba-2 layers before
them already carry order (Nemotron-H, arXiv:2504.03624, Sec. 2.1). RoPE (Su et al. 2021,
arXiv:2104.09864) is an option for models that want it; Hugging Face NemotronH has none, so a RoPE
model cannot be exported.

SWAN-GPT (Puvvada et al. 2025, arXiv:2504.08719) interleaves global NoPE layers with sliding-window
RoPE layers (pattern letter W; one global per three local in the paper, window 512) and scales the
NoPE layers' queries up with the log of the position beyond the training length (swan_scale).

GQA (Ainslie et al. 2023, arXiv:2305.13245): n_head query heads share n_kv_head key/value heads.
Shape letters: B batch, T new tokens, S keys in view (cached + new), h query heads, g kv heads,
d head dim.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# rotary position embedding (optional)


def apply_rope(x, pos0, theta):
    """Rotate pairs (i, i + d/2) of x (B, h, T, d) by angle (pos0 + t) * theta^(-2i/d)."""
    T, d = x.shape[-2], x.shape[-1]
    inv_freq = theta ** -(torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # (d/2,)
    angles = torch.outer(torch.arange(pos0, pos0 + T, device=x.device, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()  # (T, d/2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


# -----------------------------------------------------------------------------
# attention


def swan_scale(pos, train_len):
    """SWAN-GPT's dynamic attention scaling for NoPE layers beyond the training length, as we
    implement it: the query at position pos (0-based) is multiplied by
        s(pos) = max(1, log(pos + 1) / log(train_len)),
    so s = 1 up to the training length and grows with the log of the context after it, which
    keeps the softmax from flattening as more keys compete (the log-length scaling of
    Chiang & Cholak 2022, applied at inference only where SWAN-GPT applies it)."""
    return torch.clamp(torch.log(pos.float() + 1) / math.log(train_len), min=1.0)


class Attention(nn.Module):
    """Causal GQA. window=None: global attention, NoPE unless cfg.rope; window=W: sliding-window
    attention over the last W positions with RoPE (SWAN-GPT's local layers, pattern letter W),
    whose decoding cache is a ring of W + 8 entries (constant memory; the 8 spare slots let
    speculative decoding drop up to 8 new entries without losing any key still in the window)."""

    def __init__(self, cfg, window=None):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.window = window
        self.rope_theta = cfg.rope_theta if cfg.rope or window else None
        self.swan_len = cfg.swan_train_len if not self.rope_theta else None
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def new_cache(self, batch_size, max_len, device, dtype):
        """A preallocated KV cache: appending a token writes in place, no concatenation."""
        size = min(max_len, self.window + 8) if self.window else max_len
        shape = (batch_size, self.n_kv_head, size, self.head_dim)
        return {"k": torch.zeros(shape, device=device, dtype=dtype),
                "v": torch.zeros(shape, device=device, dtype=dtype), "pos": 0}

    def forward(self, x, cache=None, seq_idx=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, h, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, g, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, g, T, d)
        pos0 = 0 if cache is None else cache["pos"]
        if self.rope_theta is not None:
            q, k = apply_rope(q, pos0, self.rope_theta), apply_rope(k, pos0, self.rope_theta)
        if self.swan_len:  # NoPE layer past the training length: sharpen the queries
            q = q * swan_scale(torch.arange(pos0, pos0 + T, device=x.device), self.swan_len)[:, None].to(q.dtype)
        if self.window:
            return self.o_proj(self.local(q, k, v, pos0, cache, seq_idx))
        if cache is not None:
            if pos0 + T > cache["k"].size(2):
                raise ValueError(f"KV cache holds {cache['k'].size(2)} positions, asked for {pos0 + T}")
            cache["k"][:, :, pos0:pos0 + T] = k
            cache["v"][:, :, pos0:pos0 + T] = v
            cache["pos"] = pos0 + T
            k, v = cache["k"][:, :, :pos0 + T], cache["v"][:, :, :pos0 + T]  # (B, g, S, d)
        if seq_idx is not None:  # packed documents (training): causal within each document only
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = mask & (seq_idx[:, :, None] == seq_idx[:, None, :])  # (B, T, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
        elif pos0 == 0 or T == 1:  # causal from the start, or one query that sees every key
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
        else:  # several new queries after a cached prefix: query t sees keys 0 .. pos0 + t
            mask = torch.ones(T, pos0 + T, dtype=torch.bool, device=x.device).tril(pos0)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, h*d)
        return self.o_proj(y)

    def local(self, q, k, v, pos0, cache, seq_idx):
        """Sliding-window attention: query at position p sees keys at p - W + 1 .. p. With a cache,
        the keys in view are the ring's (slot s holds the latest position = s mod R before pos0;
        negative: empty) and the new ones, each masked by its absolute position."""
        B, _, T, _ = q.shape
        kp = torch.arange(pos0, pos0 + T, device=q.device)  # positions of the new keys (and queries)
        qp = kp
        if cache is not None:
            R = cache["k"].size(2)
            slot = torch.arange(R, device=q.device)
            kp = torch.cat([pos0 - 1 - (pos0 - 1 - slot) % R, kp])  # (R + T,)
            k_all, v_all = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)  # (B, g, R+T, d)
            keep = min(T, R)  # the newest entries go to their slots, overwriting the oldest
            idx = torch.arange(pos0 + T - keep, pos0 + T, device=q.device) % R
            cache["k"][:, :, idx], cache["v"][:, :, idx] = k[:, :, T - keep:], v[:, :, T - keep:]
            cache["pos"] = pos0 + T
            k, v = k_all, v_all
        mask = (kp[None] <= qp[:, None]) & (qp[:, None] - kp[None] < self.window) & (kp[None] >= 0)  # (T, S)
        if seq_idx is not None:  # packed documents (training, no cache): within each document only
            mask = mask & (seq_idx[:, :, None] == seq_idx[:, None, :])  # (B, T, T)
            mask = mask[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, h*d)
