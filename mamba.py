"""
mamba.py: the Mamba-2 mixer in plain PyTorch. Read after model.py.

Paper: Dao & Gu 2024, "Transformers are SSMs" (arXiv:2405.21060): Sec. 6 and Listing 1 for the
chunked SSD algorithm, Sec. 7 for the Mamba-2 block. Nemotron-H (arXiv:2504.03624) uses the block
as is, with a gated RMSNorm normalised per group of heads before out_proj.

The selective state space model, per head, with a scalar decay a_t = exp(dt_t * A):
    h_t = a_t * h_{t-1} + dt_t * x_t B_t^T        (h_t: P x N)
    y_t = h_t C_t + D * x_t
ssd_ref() computes it for a whole sequence with matmuls (the training path); ssd_scan_ref()
runs the recurrence one step at a time and is the ground truth the tests compare against;
ssd_step() is one step of it; ssd_steps() runs k steps in place and keeps every state, for
O(1)-per-token decoding and speculative decoding's verification.

Shape letters: B batch, T length, H heads, P head dim (mamba_head_dim), N state size (d_state),
G groups of heads sharing B and C (mamba_groups), Q chunk length (chunk_size), c number of chunks,
K conv width (d_conv).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import triton_ops

# -----------------------------------------------------------------------------
# the SSD maths


def segsum(x_cs):
    """x_cs (..., Q) cumulative sums -> (..., Q, Q) with out[i, j] = x_cs[i] - x_cs[j] =
    x[j+1] + ... + x[i] for j <= i, and -inf above the diagonal (so that exp() gives 0 there).
    A difference of cumsums, as the mamba_ssm kernels compute it; masked before exp, so that no
    inf ever meets a zero gradient."""
    Q = x_cs.size(-1)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x_cs.device).tril()
    return (x_cs[..., :, None] - x_cs[..., None, :]).masked_fill(~causal, -torch.inf)


def ssd_ref(x, dt, A, B, C, chunk_size, D=None, initial_state=None, seq_idx=None):
    """The chunked SSD algorithm of Mamba-2 (Listing 1 of the paper), in fp32.

    x (B, T, H, P), dt (B, T, H) already softplus'ed, A (H,) negative, B and C (B, T, G, N),
    D (H,) or None, initial_state (B, H, P, N) or None, seq_idx (B, T) nondecreasing document
    ids of packed sequences or None: the state starts from zero at each new document (the initial
    state belongs to the first one), so no token sees another document.
    Returns y (B, T, H, P) and the final state (B, H, P, N). Any T: the sequence is padded with
    dt = 0 (no decay, no input) up to a multiple of chunk_size, which leaves the state unchanged.
    """
    Bsz, T, H, P = x.shape
    G, N, Q = B.shape[2], B.shape[3], chunk_size
    R = H // G  # heads per group: head h = g * R + r reads the B and C of group g
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()
    pad = (-T) % Q
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c = (T + pad) // Q
    if seq_idx is not None:  # padding continues the last document
        doc = torch.cat([seq_idx, seq_idx[:, -1:].expand(Bsz, pad)], dim=1).view(Bsz, c, Q)
    x_dt = (x * dt[..., None]).view(Bsz, c, Q, G, R, P)  # the input term dt_t * x_t, by chunk
    B, C = B.view(Bsz, c, Q, G, N), C.view(Bsz, c, Q, G, N)
    dA = (dt * A).view(Bsz, c, Q, H).permute(0, 3, 1, 2)  # (B, H, c, Q): log of the decay a_t
    dA_cs = torch.cumsum(dA, dim=-1)  # (B, H, c, Q)

    # 1) intra-chunk outputs (the diagonal blocks): a masked "attention" C_l B_s^T L_ls inside
    # each chunk; C B^T is shared by the R heads of a group, the decays L are per head
    L = torch.exp(segsum(dA_cs)).view(Bsz, G, R, c, Q, Q)  # decay from position s to l
    if seq_idx is not None:  # nothing decays across a document boundary: L = 0 there
        L = L * (doc[:, :, :, None] == doc[:, :, None, :])[:, None, None]
    CB = torch.einsum("bclgn,bcsgn->bgcls", C, B)  # (B, G, c, Q, Q)
    Y_diag = torch.einsum("bgrcls,bcsgrp->bclgrp", CB[:, :, None] * L, x_dt)  # (B, c, Q, G, R, P)

    # 2) the state each chunk would end in, starting from zero (the B terms of the off-diagonal blocks)
    decay_states = torch.exp(dA_cs[..., -1:] - dA_cs)  # (B, H, c, Q): decay from l to the chunk's end
    if seq_idx is not None:  # only the chunk's last document reaches its end state
        decay_states = decay_states * (doc == doc[..., -1:])[:, None]
    x_decayed = x_dt * decay_states.permute(0, 2, 3, 1).view(Bsz, c, Q, G, R, 1)
    states = torch.einsum("bclgn,bclgrp->bcgrpn", B, x_decayed).reshape(Bsz, c, H, P, N)

    # 3) inter-chunk recurrence: pass the states across chunk boundaries (the A terms)
    if initial_state is None:
        initial_state = torch.zeros_like(states[:, 0])
    states = torch.cat([initial_state.float()[:, None], states], dim=1)  # (B, c+1, H, P, N)
    decay_chunk = torch.exp(segsum(F.pad(dA_cs[..., -1].cumsum(-1), (1, 0))))  # (B, H, c+1, c+1)
    if seq_idx is not None:  # boundary z holds the document of the token before it (z = 0: the first)
        doc_z = torch.cat([doc[:, :1, 0], doc[:, :, -1]], dim=1)  # (B, c+1)
        decay_chunk = decay_chunk * (doc_z[:, :, None] == doc_z[:, None, :])[:, None]
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)  # state at the start of each chunk
    states, final_state = states[:, :-1], states[:, -1]

    # 4) state -> output: what the carried-in state contributes inside each chunk (the C terms)
    Y_off = torch.einsum("bclgn,bcgrpn->bclgrp", C, states.view(Bsz, c, G, R, P, N))
    decay_out = torch.exp(dA_cs)  # (B, H, c, Q): decay from the chunk's start to l
    if seq_idx is not None:  # the carried-in state reaches only its own document
        decay_out = decay_out * (doc == doc_z[:, :-1, None])[:, None]
    Y_off = Y_off * decay_out.permute(0, 2, 3, 1).view(Bsz, c, Q, G, R, 1)

    y = (Y_diag + Y_off).reshape(Bsz, c * Q, H, P)[:, :T]  # (B, T, H, P)
    if D is not None:
        y = y + x[:, :T] * D.float()[:, None]
    return y, final_state


def ssd_flops(H, P, N, Q):
    """Forward FLOPs per token of the chunked SSD's matmuls: C B^T and (C B^T . L) x over the
    causal half of a chunk, the chunk states and the state-to-output product (the backward is
    counted as twice the forward, as for every matmul)."""
    return 2 * H * (Q * N / 2 + Q * P / 2 + 2 * N * P)


def ssd_step(h, x, dt, A, B, C, D=None):
    """One step of the recurrence. h (B, H, P, N) fp32, x (B, H, P), dt (B, H), B and C (B, G, N).
    Returns y (B, H, P) and the new state."""
    Bsz, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    x, dt = x.float(), dt.float()
    dA = torch.exp(dt * A.float()).view(Bsz, G, H // G, 1, 1)  # the decay a_t, heads by group
    dBx = (dt[..., None] * x).view(Bsz, G, H // G, P, 1) * B.float().view(Bsz, G, 1, 1, N)
    h = h.view(Bsz, G, H // G, P, N) * dA + dBx  # h_t = a_t h_{t-1} + dt_t x_t B_t^T
    y = (h @ C.float().view(Bsz, G, 1, N, 1)).view(Bsz, H, P)  # y_t = h_t C_t
    if D is not None:
        y = y + x * D.float()[:, None]
    return y, h.view(Bsz, H, P, N)


def ssd_steps(h, x, dt, A, B, C, D=None):
    """k tokens of the recurrence from the state h, keeping every intermediate state (what the
    k-token decode kernel does, and speculative decoding needs):
        h_t = a_t h_{t-1} + dt_t x_t B_t^T,    y_t = h_t C_t + D x_t,    a_t = exp(dt_t A)
    h (B, H, P, N) fp32, x (B, k, H, P), dt (B, k, H), B and C (B, k, G, N).
    Returns y (B, k, H, P) and the states (B, k, H, P, N). A loop of k fused multiply-adds: at
    decode sizes a handful of element-wise ops beats the closed form's k x k matmuls on a CPU."""
    Bsz, k, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    x, dt = x.float(), dt.float()
    a = torch.exp(dt * A.float()).view(Bsz, k, G, R, 1, 1)  # the decay a_t, heads by group
    dBx = (dt[..., None] * x).view(Bsz, k, G, R, P, 1) * B.float().view(Bsz, k, G, 1, 1, N)  # (B, k, G, R, P, N)
    states = torch.empty_like(dBx)
    prev = h.view(Bsz, G, R, P, N)
    for t in range(k):  # h_t = a_t h_{t-1} + dt_t x_t B_t^T, written in place into states[:, t]
        prev = torch.addcmul(dBx[:, t], prev, a[:, t], out=states[:, t])
    y = (states * C.float().view(Bsz, k, G, 1, 1, N)).sum(-1).view(Bsz, k, H, P)  # y_t = h_t C_t
    if D is not None:
        y = torch.addcmul(y, x, D.float()[:, None])  # + D x_t
    return y, states.view(Bsz, k, H, P, N)


def ssd_scan_ref(x, dt, A, B, C, D=None, initial_state=None, seq_idx=None):
    """Sequential-recurrence reference of ssd_ref (same arguments but no chunk size)."""
    Bsz, T, H, P = x.shape
    h = initial_state.float() if initial_state is not None else \
        x.new_zeros(Bsz, H, P, B.shape[-1], dtype=torch.float32)
    ys = []
    for t in range(T):
        if seq_idx is not None and t > 0:  # a new document starts from the zero state
            h = h * (seq_idx[:, t] == seq_idx[:, t - 1]).view(Bsz, 1, 1, 1)
        y, h = ssd_step(h, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    return torch.stack(ys, dim=1), h


def run_ssd(x, dt, A, B, C, chunk_size, D=None, initial_state=None, seq_idx=None):
    """The SSD the mixer runs: y (B, T, H, P), final_state (B, H, P, N). The Triton kernels
    (triton_ops.ssd) where triton_ops.use_triton(x) says so (a GPU, or the interpreter in tests), the
    PyTorch reference ssd_ref elsewhere. y is fp32 from ssd_ref, in x's dtype from the kernels."""
    if triton_ops.use_triton(x):
        return triton_ops.ssd(x, dt, A, B, C, chunk_size, D, initial_state, seq_idx)
    return ssd_ref(x, dt, A, B, C, chunk_size, D, initial_state, seq_idx)


# -----------------------------------------------------------------------------
# the Mamba-2 mixer


def packed_conv(x, weight, bias, seq_idx):
    """The causal depthwise conv of packed documents: x (B, C, K-1+T) left-padded, weight
    (C, 1, K), seq_idx (B, T). Output t sums only the inputs of its own document, so each
    document starts as if from zeros: K shifted multiply-adds, each masked."""
    K = weight.size(-1)
    T = x.size(-1) - (K - 1)
    doc = F.pad(seq_idx, (K - 1, 0), value=-1)  # (B, K-1+T): the padding is no document
    y = bias[:, None]
    for k in range(K):
        same = (doc[:, k:k + T] == seq_idx)[:, None]  # (B, 1, T)
        y = y + weight[:, 0, k, None] * x[:, :, k:k + T] * same
    # in x's dtype, as F.conv1d gives under autocast: fp32 weights times bf16 x would otherwise
    # hand fp32 to the SSD kernels, whose bf16 path (and shared-memory budget) is for bf16 inputs
    return y.to(x.dtype)  # (B, C, T)


class GatedRMSNorm(nn.Module):
    """norm(y * silu(z)), normalised over groups of group_size channels (one group per mamba_groups)."""

    def __init__(self, dim, group_size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, y, z):
        dtype = y.dtype
        y = y.float() * F.silu(z.float())
        yg = y.view(*y.shape[:-1], -1, self.group_size)  # (..., G, d_inner / G)
        yg = F.rms_norm(yg, (self.group_size,), eps=self.eps)  # y / sqrt(mean(y^2) + eps) per group
        return self.weight * yg.view(y.shape).to(dtype)


class Mamba2Mixer(nn.Module):
    """The Mamba-2 block's mixer (in_proj -> conv -> SSD -> gated norm -> out_proj). forward's
    cache, when decoding: a generate.MambaCache (conv window and SSM state), updated in place."""

    def __init__(self, cfg):
        super().__init__()
        self.H, self.P, self.N, self.G = cfg.mamba_heads, cfg.mamba_head_dim, cfg.d_state, cfg.mamba_groups
        self.K, self.chunk_size, self.dt_limit = cfg.d_conv, cfg.chunk_size, cfg.dt_limit
        self.d_inner = self.H * self.P
        self.conv_dim = self.d_inner + 2 * self.G * self.N  # x, B and C go through the conv together
        self.in_proj = nn.Linear(cfg.d_model, self.d_inner + self.conv_dim + self.H, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.K, groups=self.conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.H))
        self.A_log = nn.Parameter(torch.empty(self.H))
        self.D = nn.Parameter(torch.empty(self.H))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.G, cfg.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=False)

    def discretize(self, dt):
        """dt > 0 within the configured limits (fp32, dt's shape), and A = -exp(A_log) < 0 (H,)."""
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)
        return dt, -torch.exp(self.A_log.float())

    def forward(self, u, cache=None, seq_idx=None):
        Bsz, T, _ = u.shape
        if cache is not None and (T == 1 or cache.keep_states):
            return self.step(u, cache)
        assert seq_idx is None or cache is None, "packed documents are for training, not decoding"
        zxbcdt = self.in_proj(u)  # (B, T, d_inner + conv_dim + H)
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.H], dim=-1)
        # 1) depthwise causal conv over time: left-pad with the cached inputs (zeros at the start)
        xBC = xBC.transpose(1, 2)  # (B, conv_dim, T)
        past = cache.conv if cache is not None else xBC.new_zeros(Bsz, self.conv_dim, self.K - 1)
        xBC = torch.cat([past, xBC], dim=-1)  # (B, conv_dim, K-1+T)
        if cache is not None and cache.lengths is None:
            cache.conv = xBC[:, :, -(self.K - 1):].clone()
        elif cache is not None:  # right-padded prompts: row b's window ends at its last token, lengths[b] - 1
            last = cache.lengths[:, None] + torch.arange(self.K - 1, device=u.device)  # (B, K-1): K-1+t is token t
            cache.conv = xBC.gather(2, last[:, None, :].expand(-1, self.conv_dim, -1))  # (B, conv_dim, K-1)
        if seq_idx is None:
            xBC = F.conv1d(xBC, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)
        else:
            xBC = packed_conv(xBC, self.conv1d.weight, self.conv1d.bias, seq_idx)
        xBC = F.silu(xBC).transpose(1, 2)  # (B, T, conv_dim)
        x, B, C = xBC.split([self.d_inner, self.G * self.N, self.G * self.N], dim=-1)
        # 2) discretisation parameters: dt > 0 within the configured limits, A < 0
        dt, A = self.discretize(dt)  # (B, T, H), (H,)
        if cache is not None and cache.lengths is not None:  # padding: dt = 0, the state holds (no decay, no input)
            dt = dt * (torch.arange(T, device=u.device) < cache.lengths[:, None])[..., None]
        # 3) the SSD over the whole sequence, starting from the cached state when decoding
        y, h = run_ssd(x.reshape(Bsz, T, self.H, self.P), dt, A,
                   B.reshape(Bsz, T, self.G, self.N), C.reshape(Bsz, T, self.G, self.N),
                   self.chunk_size, D=self.D, initial_state=None if cache is None else cache.ssm,
                   seq_idx=seq_idx)
        if cache is not None:
            cache.ssm = h.contiguous()  # the decode kernel updates it in place
        # 4) gated norm, then back to the model width
        y = self.norm(y.reshape(Bsz, T, self.d_inner), z)  # (B, T, d_inner)
        return self.out_proj(y.to(u.dtype))

    def step(self, u, cache):
        """k <= 8 tokens (B, k, d_model) from the cache in O(k): extend the conv window, run the
        recurrence (ssd_steps, or the k-token kernel). With cache.keep_states set (speculative
        decoding), the conv window and the state after every token are kept in cache.history, so
        that cache.rollback() can return to any of them."""
        Bsz, k, _ = u.shape
        zxbcdt = self.in_proj(u)  # (B, k, d_inner + conv_dim + H)
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.H], dim=-1)
        fast, keep = triton_ops.use_triton(u), cache.keep_states
        window = torch.cat([cache.conv, xBC.transpose(1, 2)], dim=-1) if keep or not fast else None
        # the cache's tensors are updated in place: a static cache (generate.StaticCache) keeps its buffers
        if fast:
            xBC, conv = triton_ops.conv_update(cache.conv, xBC, self.conv1d.weight, self.conv1d.bias)
            cache.conv.copy_(conv)
        else:  # (B, conv_dim, k, K) windows, one per new token, times the (conv_dim, 1, K) kernel
            xBC = (window.unfold(2, self.K, 1) * self.conv1d.weight).sum(-1)  # (B, conv_dim, k)
            xBC = F.silu(xBC.transpose(1, 2) + self.conv1d.bias)  # (B, k, conv_dim)
            cache.conv.copy_(window[:, :, k:])
        x, B, C = xBC.split([self.d_inner, self.G * self.N, self.G * self.N], dim=-1)
        dt, A = self.discretize(dt)  # (B, k, H), (H,)
        x, B, C = x.view(Bsz, k, self.H, self.P), B.view(Bsz, k, self.G, self.N), C.view(Bsz, k, self.G, self.N)
        if fast:  # updates cache.ssm in place
            y, states = triton_ops.ssd_update(cache.ssm, x, dt, A, B, C, self.D, save_states=keep)
        else:  # the recurrence, token by token (k = 1 in plain decoding)
            y, states = ssd_steps(cache.ssm, x, dt, A, B, C, self.D)
            cache.ssm.copy_(states[:, -1])
        if keep:
            cache.history = (window, states)
        y = self.norm(y.reshape(Bsz, k, self.d_inner), z)  # (B, k, d_inner)
        return self.out_proj(y.to(u.dtype))
