"""
attention.py: causal grouped-query attention with a KV cache, global or sliding-window. Read
after model.py.

Nemotron-H's attention layers use no positional encoding at all (NoPE): the Mamba-2 layers before
them already carry order (Nemotron-H, arXiv:2504.03624, Sec. 2.1). RoPE (Su et al. 2021,
arXiv:2104.09864) is an option for models that want it; Hugging Face NemotronH has none, so a RoPE
model cannot be exported.

Star Attention (Acharya et al. 2024, arXiv:2411.17116) splits a long context into blocks that hosts
encode independently, then lets the query and generated tokens attend to every host's keys through
an exact log-sum-exp combine; the model-level flow is star_prefill in generate.py, the attention side
(and the only torch.distributed code of this file, in a marked section) is at the end of this file.

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
from torch.nn.attention.bias import causal_lower_right

# -----------------------------------------------------------------------------
# rotary position embedding (optional)


def apply_rope(x, pos0, theta):
    """Rotate pairs (i, i + d/2) of x (B, h, T, d) by angle p_t * theta^(-2i/d), where p_t = pos0 + t
    for an int pos0, or pos0 itself: a tensor of positions (T,), or (B, 1, T) for one row each."""
    T, d = x.shape[-2], x.shape[-1]
    inv_freq = theta ** -(torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # (d/2,)
    pos = torch.arange(pos0, pos0 + T, device=x.device) if isinstance(pos0, int) else pos0
    angles = pos.float()[..., None] * inv_freq  # (..., T, d/2)
    cos, sin = angles.cos(), angles.sin()
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
    attention over the last W positions with RoPE (SWAN-GPT's local layers, pattern letter W).
    forward's cache, when decoding: a generate.KVCache (a ring of W + 8 slots for a W layer), a
    generate.StaticKVCache (batched decoding, cache.per_row), or Star Attention's
    generate.StarContextCache / StarQueryCache (cache.star_phase)."""

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

    def forward(self, x, cache=None, seq_idx=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, h, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, g, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, g, T, d)
        if cache is not None and cache.star_phase:  # Star Attention: keys held by hosts (see below)
            return self.o_proj(self.star(q, k, v, cache))
        if cache is not None and cache.per_row:  # a static cache: each row at its own position
            return self.o_proj(self.rows(q, k, v, cache))
        pos0 = 0 if cache is None else cache.pos
        q, k = self.at(q, k, torch.arange(pos0, pos0 + T, device=x.device))
        if self.window:
            return self.o_proj(self.local(q, k, v, pos0, cache, seq_idx))
        if cache is not None:
            cache.append(k, v)
            k, v = cache.k[:, :, :pos0 + T], cache.v[:, :, :pos0 + T]  # (B, g, S, d)
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

    def at(self, q, k, pos):
        """q (B, h, T, d) and k (B, g, T, d) placed at positions pos: (T,), or one row each (B, 1, T).
        RoPE rotates both where the layer has it; on a NoPE layer SWAN's scale sharpens the queries
        past the training length."""
        if self.rope_theta is not None:
            q, k = apply_rope(q, pos, self.rope_theta), apply_rope(k, pos, self.rope_theta)
        if self.swan_len:
            q = q * swan_scale(pos, self.swan_len)[..., None].to(q.dtype)
        return q, k

    def local(self, q, k, v, pos0, cache, seq_idx):
        """Sliding-window attention: query at position p sees keys at p - W + 1 .. p. With a cache,
        the keys in view are the ring's (cache.positions(): slot s holds the latest position = s mod
        R before pos0; negative: empty) and the new ones, each masked by its absolute position."""
        B, _, T, _ = q.shape
        qp = torch.arange(pos0, pos0 + T, device=q.device)  # positions of the new queries (and keys)
        kp, k_all, v_all = qp, k, v  # the keys in view and their positions
        band = pos0 == 0 and T > 2 * self.window  # a long sequence from the start: banded(), no ring in view
        if cache is not None:
            if not band:  # the ring as it was, then the new keys
                kp = torch.cat([cache.positions(), qp])  # (R + T,)
                k_all, v_all = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)  # (B, g, R+T, d)
            cache.append(k, v)
        if band:
            y = banded(q, k, v, self.window, seq_idx)  # (B, h, T, d)
        else:
            mask = visible(qp, kp, self.window)  # (T, S)
            if seq_idx is not None:  # packed documents (training, no cache): within each document only
                mask = mask & (seq_idx[:, :, None] == seq_idx[:, None, :])  # (B, T, T)
                mask = mask[:, None]
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=True)
        return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, h*d)

    def rows(self, q, k, v, cache):
        """Attention over a generate.StaticKVCache (batched decoding): row b's new tokens are at
        positions cache.pos[b] + t; their keys go to slots position mod S (S slots: a ring for a W
        layer), and each query masks all S slots by the positions they hold. The shapes do not
        depend on the positions, so a compiled step is compiled once."""
        B, _, T, _ = q.shape
        qpos = cache.pos[:, None] + torch.arange(T, device=q.device)  # (B, T)
        q, k = self.at(q, k, qpos[:, None])
        cache.write(k, v, qpos)
        mask = visible(qpos, cache.positions(qpos[:, -1:] + 1), self.window)  # (B, T, S)
        y = F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=mask[:, None], enable_gqa=True)
        return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, h*d)

    def star(self, q, k, v, cache):
        """Star Attention, either phase (cache layouts below): rotate and scale at the tokens'
        global positions, then attend as phase 1 or phase 2 does."""
        if cache.star_phase == 1:
            qpos = cache.qpos[:, None]  # (R, 1, T): each row (block) has its own positions
        else:
            qpos = torch.arange(cache.pos, cache.pos + q.size(2), device=q.device)  # (T,)
        q, k = self.at(q, k, qpos)
        y = self.star_context(q, k, v, cache) if cache.star_phase == 1 else self.star_query(q, k, v, qpos, cache)
        B, _, T, _ = y.shape
        return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, h*d)

    def star_context(self, q, k, v, cache):
        """Phase 1 for m blocks at once (R = m*B rows, block-major): each block's queries see the
        anchor's keys and, causally, their own block's; the block's keys/values go to cache.new."""
        R, B = q.size(0), cache.k.size(0)
        cache.new = (k, v)
        ak = cache.k.expand(R // B, *cache.k.shape).reshape(R, *cache.k.shape[1:])  # (R, g, A, d)
        av = cache.v.expand(R // B, *cache.v.shape).reshape(R, *cache.v.shape[1:])  # (R, g, A, d)
        T, A = q.size(2), ak.size(2)
        k, v = torch.cat([ak, k], dim=2), torch.cat([av, v], dim=2)  # (R, g, A + T, d)
        gap = cache.qpos[:, 0] - A  # (R,): where each block starts past the anchor (positions 0 .. A-1)
        if self.window and T > 2 * self.window and ((gap == 0) | (gap >= self.window - 1)).all():
            # W layer, long blocks: banded over [anchor, block], positions as one run (RoPE is already
            # applied at the global ones, and the window only looks at differences). A block right after
            # the anchor sees its end; a later one is out of its window: there the anchor is a document
            # of its own. The anchor's rows get zero queries and are dropped.
            doc = (gap > 0)[:, None] & (torch.arange(A + T, device=q.device) >= A)  # (R, A + T)
            q = torch.cat([q.new_zeros(R, q.size(1), A, q.size(3)), q], dim=2)  # (R, h, A + T, d)
            return banded(q, k, v, self.window, doc.long())[:, :, A:]  # (R, h, T, d)
        if not self.window:  # the whole anchor, then causal: a lower-right causal mask, which the
            mask = causal_lower_right(T, A + T)  # kernel uses to skip the masked tiles
        else:  # the window cuts by global positions, different in each row
            kpos = torch.cat([cache.kpos.expand(R, -1), cache.qpos], dim=1)  # (R, A + T)
            mask = visible(cache.qpos, kpos, self.window)[:, None]  # (R, 1, T, A + T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def star_query(self, q, k, v, qpos, cache):
        """Phase 2: every host its local (out, lse) over the keys it holds, then the exact combine.
        The query host appends the new tokens' keys/values to its buffer first."""
        outs, lses = [], []
        if cache.k is not None:  # context blocks held here, one host each: (B, n, g, L, d)
            mask = visible(qpos, cache.kpos, self.window)  # (n, T, L)
            o, l = attend(q[:, None], cache.k, cache.v, mask[:, None])  # (B, n, h, T, d), (B, n, h, T)
            outs.append(o)
            lses.append(l)
        T, f = q.size(2), cache.fill
        if cache.qk is not None:  # the query host
            if f + T > cache.qk.size(2):
                raise ValueError(f"Star Attention's query buffer holds {cache.qk.size(2)} tokens, asked for {f + T}")
            cache.qk[:, :, f:f + T], cache.qv[:, :, f:f + T] = k, v
            cache.fill = f + T
            kpos = torch.arange(cache.pos - f, cache.pos + T, device=q.device)  # (f + T,)
            o, l = attend(q, cache.qk[:, :, :f + T], cache.qv[:, :, :f + T], visible(qpos, kpos, self.window))
            outs.append(o[:, None])  # (B, 1, h, T, d)
            lses.append(l[:, None])  # (B, 1, h, T)
        cache.pos += T
        if outs:
            out, lse = star_combine(torch.cat(outs, dim=1), torch.cat(lses, dim=1))
        else:  # a host with no keys (more hosts than blocks): weighs nothing
            out = q.new_zeros(q.shape, dtype=torch.float32)  # (B, h, T, d)
            lse = q.new_full(q.shape[:-1], -math.inf, dtype=torch.float32)  # (B, h, T)
        if cache.group is not None:
            out = star_exchange(out, lse, cache.group)
        return out.to(q.dtype)  # (B, h, T, d)


# -----------------------------------------------------------------------------
# Star Attention (Acharya et al. 2024, arXiv:2411.17116), the attention side. generate.star_prefill
# splits the prompt and runs the two phases; an attention layer's cache then says which one:
#   phase 1, context encoding (generate.StarContextCache): each of R = m*B rows (m blocks,
#     block-major) sees the anchor's keys and, causally, its own block's; the block's keys/values
#     are left in cache.new for its host to keep.
#   phase 2, query encoding and generation (generate.StarQueryCache): the new tokens attend to the
#     blocks this process holds and, on the query host, to the query's and generated tokens' keys,
#     which that host appends to its buffer; then every host's result goes into one exact softmax.
# Phase 2's exact softmax over all hosts' keys from the hosts' local softmaxes: host h returns
#     out_h = softmax(s_h) V_h   and   lse_h = log sum_j exp(s_hj)   (s_h: its scores, scaled),
#     lse = log sum_h exp(lse_h),   out = sum_h exp(lse_h - lse) out_h,
# since exp(lse_h - lse) is the share of the total softmax mass that host h's keys carry.


def banded(q, k, v, window, seq_idx=None):
    """Sliding-window attention of T queries over the T keys at the same positions 0 .. T-1, in
    blocks of w = window queries: block i attends to key blocks i-1 and i only, 2Tw scores in place
    of the T x T that a full mask would cost (and sdpa's math path would materialise). q (B, h, T, d),
    k and v (B, g, T, d), seq_idx (B, T) or None: packed documents -> (B, h, T, d)."""
    B, h, T, d = q.shape
    w, n = window, -(-T // window)  # block size, blocks
    pad = n * w - T
    qb = F.pad(q, (0, 0, 0, pad)).view(B, h, n, w, d).transpose(1, 2)  # (B, n, h, w, d)
    # keys: one block of padding in front, then windows of 2w keys with stride w: block i-1 and i
    kb, vb = (F.pad(t, (0, 0, w, pad)).unfold(2, 2 * w, w).permute(0, 2, 1, 4, 3) for t in (k, v))  # (B, n, g, 2w, d)
    # query j of block i sits at i*w + j, key m of its window at (i-1)*w + m: in view iff
    # 0 <= (w + j - m) < w, and the key is no padding (block 0's first w keys are)
    j, m = torch.arange(w, device=q.device)[:, None], torch.arange(2 * w, device=q.device)[None]
    kpos = torch.arange(-w, n * w, device=q.device).unfold(0, 2 * w, w)  # (n, 2w): the keys' positions
    mask = ((m > j) & (m <= j + w))[None] & (kpos >= 0)[:, None, :]  # (n, w, 2w)
    mask = mask[None, :, None]  # (1, n, 1, w, 2w)
    if seq_idx is not None:  # packed documents: within each document only
        sq = F.pad(seq_idx, (0, pad), value=-1).view(B, n, w)  # (B, n, w); padding queries see padding keys
        sk = F.pad(seq_idx, (w, pad), value=-1).unfold(1, 2 * w, w)  # (B, n, 2w)
        mask = mask & (sq[..., :, None] == sk[..., None, :])[:, :, None]  # (B, n, 1, w, 2w)
    y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=True)  # (B, n, h, w, d)
    return y.transpose(1, 2).reshape(B, h, n * w, d)[:, :, :T]  # (B, h, T, d)


def visible(qpos, kpos, window):
    """Whether the key at kpos is in view of the query at qpos: (..., T, S) bool from qpos (..., T)
    and kpos (..., S): causal, within the window (W layers), and not padding (kpos < 0)."""
    qp, kp = qpos[..., :, None], kpos[..., None, :]
    seen = (kp <= qp) & (kp >= 0)
    return seen & (qp - kp < window) if window else seen


def attend(q, k, v, mask):
    """Softmax attention that also returns the log-sum-exp of each query's scores, in fp32.
    q (..., h, T, d), k and v (..., g, S, d), mask broadcastable to (..., h, T, S), True = in view.
    Returns out (..., h, T, d) and lse (..., h, T); a query with no key in view gets out 0 and
    lse -inf, so that it weighs nothing in star_combine."""
    h, g = q.size(-3), k.size(-3)
    k = k.float().repeat_interleave(h // g, dim=-3)  # (..., h, S, d)
    v = v.float().repeat_interleave(h // g, dim=-3)  # (..., h, S, d)
    s = (q.float() @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))  # (..., h, T, S)
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, dim=-1)  # (..., h, T)
    p = torch.exp(s - lse.masked_fill(lse == -math.inf, 0)[..., None])  # softmax; 0 where nothing is in view
    return p @ v, lse


def star_combine(out, lse, dim=1):
    """The exact softmax over several hosts' keys from their local results: out (..., n, ..., d)
    and lse (..., n, ...) with the n hosts along dim. Returns the combined out and lse (dim gone)."""
    total = torch.logsumexp(lse, dim=dim)
    w = torch.exp(lse - total.masked_fill(total == -math.inf, 0).unsqueeze(dim))  # host shares, sum to 1
    return (w[..., None] * out).sum(dim), total


# ---- Star Attention's host exchange: the only torch.distributed code in this file. group is the
# process group whose ranks are the hosts; gloo (CPU) and NCCL (GPU) both do these collectives.


def star_rank(group):
    """(this host's rank, number of hosts) in group; (0, 1) for None (one process)."""
    if group is None:
        return 0, 1
    import torch.distributed as dist
    return dist.get_rank(group), dist.get_world_size(group)


def star_exchange(out, lse, group):
    """Phase 2's one message per attention layer: every host's (out, lse) for the new tokens go to
    every host (one all_gather), which all combine them in the same order, to the same result."""
    import torch.distributed as dist
    piece = torch.cat([out, lse[..., None]], dim=-1).contiguous()  # (B, h, T, d + 1)
    pieces = [torch.empty_like(piece) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, piece, group=group)
    pieces = torch.stack(pieces, dim=1)  # (B, K, h, T, d + 1)
    return star_combine(pieces[..., :-1], pieces[..., -1])[0]


def star_broadcast(t, src, group):
    """t from host src (a rank of group) to every host, in place; returns t."""
    import torch.distributed as dist
    dist.broadcast(t, src=dist.get_global_rank(group, src), group=group)
    return t
