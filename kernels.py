"""
kernels.py: Triton kernels for the hot paths, each beside the PyTorch reference it must match.
Read after mamba.py.

So far: decoding a few tokens (k <= 8) of a Mamba-2 layer. Paper: Dao & Gu 2024 (arXiv:2405.21060),
the recurrence of Sec. 3 that mamba.ssd_step runs one token at a time:
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,    y_t = h_t C_t + D x_t
and the depthwise causal conv's update of its last K-1 inputs. One program per (batch, head,
block of head dims) keeps its slice of h in registers across the k tokens, so h is read and
written once per call, whatever k is: the kernel is bound by memory, as decoding is.

Layering per op: @triton.jit _x_kernel -> _x_fwd (checks, allocates, launches) -> public x().
These are inference-only (no autograd). mamba.py calls them when USE_TRITON is on and the tensors
are on a GPU, or on the CPU under TRITON_INTERPRET=1 (the tests); elsewhere it runs the references.
Without triton installed (macOS, Windows) the module still imports, with USE_TRITON off.
At the end of the file, the MoE experts' grouped GEMM is the exception that trains: it has an autograd
Function, and moe.py calls it under the same switch (moe.grouped_mm_ref is its reference).
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch references serve wherever Triton cannot
    triton = None

USE_TRITON = triton is not None  # the one switch; tests flip it
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # CPU tensors run in the Triton interpreter


def use_triton(t):
    """Whether tensor t takes the Triton path."""
    return USE_TRITON and (t.is_cuda or INTERPRET)


if triton is not None:

    # -------------------------------------------------------------------------
    # SSD state update for k tokens

    @triton.jit
    def _ssd_update_kernel(h_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr, hs_ptr,
                           K, H, G, P, N,
                           s_hb, s_hh, s_hp,
                           s_xb, s_xk, s_xh,
                           s_db, s_dk,
                           s_bb, s_bk, s_bg,
                           s_yb, s_yk, s_yh,
                           s_sb, s_sk, s_sh, s_sp,
                           HAS_D: tl.constexpr, SAVE_STATES: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        b, hd, pb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        g = hd // (H // G)  # the group whose B and C this head reads
        p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        pm, nm = p < P, n < N
        hmask = pm[:, None] & nm[None, :]
        h_ptrs = h_ptr + b * s_hb + hd * s_hh + p[:, None] * s_hp + n[None, :]
        h = tl.load(h_ptrs, mask=hmask, other=0.0)  # (BLOCK_P, BLOCK_N) fp32, kept in registers
        A = tl.load(A_ptr + hd).to(tl.float32)
        if HAS_D:
            D = tl.load(D_ptr + hd).to(tl.float32)
        for t in range(K):
            # every load is converted to fp32 first (the interpreter mistreats bf16 arithmetic)
            x = tl.load(x_ptr + b * s_xb + t * s_xk + hd * s_xh + p, mask=pm, other=0.0).to(tl.float32)
            dt = tl.load(dt_ptr + b * s_db + t * s_dk + hd).to(tl.float32)
            Bv = tl.load(B_ptr + b * s_bb + t * s_bk + g * s_bg + n, mask=nm, other=0.0).to(tl.float32)
            Cv = tl.load(C_ptr + b * s_bb + t * s_bk + g * s_bg + n, mask=nm, other=0.0).to(tl.float32)
            # 1) h_t = exp(dt A) h_{t-1} + (dt x_t) B_t^T
            h = h * tl.exp(dt * A) + (dt * x)[:, None] * Bv[None, :]
            # 2) y_t = h_t C_t + D x_t
            y = tl.sum(h * Cv[None, :], axis=1)
            if HAS_D:
                y += D * x
            tl.store(y_ptr + b * s_yb + t * s_yk + hd * s_yh + p, y.to(y_ptr.dtype.element_ty), mask=pm)
            if SAVE_STATES:  # every intermediate state, for speculative decoding to roll back to
                tl.store(hs_ptr + b * s_sb + t * s_sk + hd * s_sh + p[:, None] * s_sp + n[None, :], h,
                         mask=hmask)
        tl.store(h_ptrs, h, mask=hmask)

    # -------------------------------------------------------------------------
    # causal depthwise conv update for k tokens

    @triton.jit
    def _conv_update_kernel(state_ptr, x_ptr, w_ptr, bias_ptr, out_ptr, new_state_ptr,
                            T, C,
                            s_sb, s_sc,
                            s_xb, s_xt,
                            s_ob, s_ot,
                            KW: tl.constexpr, BLOCK_C: tl.constexpr):
        # the k new inputs extend the K-1 cached ones: s = [state_0 .. state_{K-2}, x_0 .. x_{T-1}],
        # out_t = silu(bias + sum_j w_j s_{t+j}), and the new state is the last K-1 entries of s
        b, cb = tl.program_id(0), tl.program_id(1)
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        bias = tl.load(bias_ptr + c, mask=cm, other=0.0).to(tl.float32)
        for t in range(T):
            acc = bias
            for j in tl.static_range(KW):
                i = t + j  # index into s
                if i < KW - 1:
                    v = tl.load(state_ptr + b * s_sb + c * s_sc + i, mask=cm, other=0.0)
                else:
                    v = tl.load(x_ptr + b * s_xb + (i - (KW - 1)) * s_xt + c, mask=cm, other=0.0)
                w = tl.load(w_ptr + c * KW + j, mask=cm, other=0.0)
                acc += v.to(tl.float32) * w.to(tl.float32)
            out = acc / (1.0 + tl.exp(-acc))  # silu
            tl.store(out_ptr + b * s_ob + t * s_ot + c, out.to(out_ptr.dtype.element_ty), mask=cm)
        for j in tl.static_range(KW - 1):
            i = T + j
            if i < KW - 1:
                v = tl.load(state_ptr + b * s_sb + c * s_sc + i, mask=cm, other=0.0)
            else:
                v = tl.load(x_ptr + b * s_xb + (i - (KW - 1)) * s_xt + c, mask=cm, other=0.0)
            tl.store(new_state_ptr + b * s_sb + c * s_sc + j, v, mask=cm)


def _ssd_update_fwd(h, x, dt, A, B, C, D, save_states):
    Bsz, K, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    assert h.shape == (Bsz, H, P, N) and h.dtype == torch.float32 and h.is_contiguous()
    assert dt.shape == (Bsz, K, H) and A.shape == (H,) and B.shape == C.shape == (Bsz, K, G, N)
    assert H % G == 0 and 1 <= K <= 8, "a few tokens at a time (k <= 8)"
    x, dt, B, C = x.contiguous(), dt.contiguous(), B.contiguous(), C.contiguous()
    y = torch.empty(x.shape, device=x.device, dtype=torch.float32)  # fp32, as mamba.ssd_step's
    hs = torch.empty(Bsz, K, H, P, N, device=h.device, dtype=torch.float32) if save_states else h
    s_hs = hs.stride()[:4] if save_states else (0, 0, 0, 0)  # unused without save_states
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_P = min(triton.next_power_of_2(P), max(1, 4096 // BLOCK_N))  # a tile of <= 4096 states
    grid = (Bsz, H, triton.cdiv(P, BLOCK_P))
    _ssd_update_kernel[grid](h, x, dt, A, B, C, D if D is not None else A, y, hs,
                             K, H, G, P, N,
                             h.stride(0), h.stride(1), h.stride(2),
                             x.stride(0), x.stride(1), x.stride(2),
                             dt.stride(0), dt.stride(1),
                             B.stride(0), B.stride(1), B.stride(2),
                             y.stride(0), y.stride(1), y.stride(2),
                             *s_hs,
                             HAS_D=D is not None, SAVE_STATES=save_states, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N)
    return y, (hs if save_states else None)


def ssd_update(h, x, dt, A, B, C, D=None, save_states=False):
    """Advance the SSM state h over k <= 8 tokens, in place. h (B, H, P, N) fp32, x (B, k, H, P),
    dt (B, k, H) after softplus, A (H,), B and C (B, k, G, N), D (H,) or None.
    Returns y (B, k, H, P) in fp32 and, with save_states, the state after each token
    (B, k, H, P, N); h itself ends as the state after the last token."""
    return _ssd_update_fwd(h, x, dt, A, B, C, D, save_states)


def _conv_update_fwd(state, x, weight, bias):
    Bsz, T, Cn = x.shape
    KW = weight.shape[-1]
    assert state.shape == (Bsz, Cn, KW - 1) and weight.shape == (Cn, 1, KW) and bias.shape == (Cn,)
    assert 1 <= T <= 8, "a few tokens at a time (k <= 8)"
    state, x, weight = state.contiguous(), x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    new_state = torch.empty_like(state)
    BLOCK_C = min(1024, triton.next_power_of_2(Cn))
    grid = (Bsz, triton.cdiv(Cn, BLOCK_C))
    _conv_update_kernel[grid](state, x, weight, bias, out, new_state, T, Cn,
                              state.stride(0), state.stride(1), x.stride(0), x.stride(1),
                              out.stride(0), out.stride(1), KW=KW, BLOCK_C=BLOCK_C)
    return out, new_state


def conv_update(state, x, weight, bias):
    """Causal depthwise conv + SiLU over k <= 8 new inputs. state (B, C, K-1) holds the last K-1
    inputs, x (B, k, C), weight (C, 1, K) as nn.Conv1d keeps it, bias (C,).
    Returns out (B, k, C) and the new state (B, C, K-1)."""
    return _conv_update_fwd(state, x, weight, bias)


# -----------------------------------------------------------------------------
# grouped GEMM: all MoE experts in one launch (issue 4, "MoE at scale")
#
# The token copies arrive sorted by expert: rows offs[g-1]:offs[g] of x belong to expert g
# (offs[-1] = number of rows). y = x @ w[g] on each expert's rows, with a dropless row count per
# expert that only the GPU knows: the grid is sized by an upper bound, sum_g cdiv(n_g, BLOCK_M)
# <= cdiv(N, BLOCK_M) + E, and each program finds its expert from offs, so nothing waits on the
# host. The backward: dx = dy @ w[g]^T is the same kernel on the transposed weights;
# dw[g] = x_g^T dy_g sums over the expert's rows, a second kernel with one program per tile of dw.

if triton is not None:

    @triton.jit
    def _grouped_mm_kernel(x_ptr, w_ptr, offs_ptr, y_ptr,
                           E, K, N,
                           s_xm, s_xk,
                           s_we, s_wk, s_wn,
                           s_ym, s_yn,
                           FP32_DOT: tl.constexpr, BLOCK_E: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # program (t, j): row tile t of all experts' row tiles, numbered expert after expert,
        # times column tile j: y[rows, cols] = x[rows, :] @ w[g][:, cols]
        t, j = tl.program_id(0), tl.program_id(1)
        # 1) the expert g of row tile t, from the row tiles of every expert
        e = tl.arange(0, BLOCK_E)
        end = tl.load(offs_ptr + e, mask=e < E, other=0)
        start = tl.load(offs_ptr + e - 1, mask=(e > 0) & (e < E), other=0)
        tiles = tl.cdiv(end - start, BLOCK_M)  # (BLOCK_E,), 0 for an expert without tokens
        g = tl.sum((tl.cumsum(tiles, 0) <= t).to(tl.int32))
        if g >= E:  # past the last row tile: the grid is an upper bound
            return
        first = tl.sum(tl.where(e < g, tiles, 0))  # row tiles of the experts before g
        row0 = tl.sum(tl.where(e == g, start, 0)) + (t - first) * BLOCK_M
        row_end = tl.sum(tl.where(e == g, end, 0))
        rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, cmask = rows < row_end, cols < N
        # 2) accumulate over K in fp32
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        w_g = w_ptr + g.to(tl.int64) * s_we
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + rows[:, None] * s_xm + k[None, :] * s_xk,
                        mask=rmask[:, None] & (k[None, :] < K), other=0.0)  # (BLOCK_M, BLOCK_K)
            b = tl.load(w_g + k[:, None] * s_wk + cols[None, :] * s_wn,
                        mask=(k[:, None] < K) & cmask[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
            if FP32_DOT:  # the interpreter mistreats bf16 products: exact fp32 operands there
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        tl.store(y_ptr + rows[:, None] * s_ym + cols[None, :] * s_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _grouped_mm_dw_kernel(x_ptr, dy_ptr, offs_ptr, dw_ptr,
                              K, N,
                              s_xm, s_xk,
                              s_dm, s_dn,
                              s_we, s_wk, s_wn,
                              FP32_DOT: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # program (g, i, j): tile (i, j) of expert g's weight gradient,
        # dw[g][ks, cols] = sum over g's rows m of x[m, ks]^T dy[m, cols]; zero for an idle expert
        g, i, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        row_start = tl.load(offs_ptr + g - 1, mask=g > 0, other=0)
        row_end = tl.load(offs_ptr + g)
        ks = i * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
        kmask, cmask = ks < K, cols < N
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for m0 in range(row_start, row_end, BLOCK_M):
            m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            mmask = m < row_end
            a = tl.load(x_ptr + m[None, :] * s_xm + ks[:, None] * s_xk,
                        mask=kmask[:, None] & mmask[None, :], other=0.0)  # (BLOCK_K, BLOCK_M): x^T
            b = tl.load(dy_ptr + m[:, None] * s_dm + cols[None, :] * s_dn,
                        mask=mmask[:, None] & cmask[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
            if FP32_DOT:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        tl.store(dw_ptr + g.to(tl.int64) * s_we + ks[:, None] * s_wk + cols[None, :] * s_wn,
                 acc.to(dw_ptr.dtype.element_ty), mask=kmask[:, None] & cmask[None, :])


def _gemm_config(t):
    """Tile sizes and launch options: GPU tiles for tensor cores (untuned: bench.py moe prints the
    TFLOP/s they reach; fp32 gets half the K tile to fit shared memory), small tiles in the
    interpreter (tl.dot needs 16 or more)."""
    if t.is_cuda:
        BLOCK_K = 64 if t.element_size() == 2 else 32
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=BLOCK_K, num_warps=8, num_stages=3)
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)


def _fp32_dot(t):
    # fp32 operands: in the interpreter always (bf16 dots are wrong there); on a GPU only for fp32
    # inputs, which tl.dot then runs in TF32 (torch's fp32 matmuls do so only with allow_tf32)
    return INTERPRET or t.dtype == torch.float32


def _grouped_mm_fwd(x, w, offs):
    Nr, K = x.shape
    E, N = w.shape[0], w.shape[2]
    assert w.shape[1] == K and offs.shape == (E,) and x.dtype == w.dtype, (x.shape, x.dtype, w.shape, w.dtype)
    y = torch.empty(Nr, N, device=x.device, dtype=x.dtype)
    cfg = _gemm_config(x)
    grid = (triton.cdiv(Nr, cfg["BLOCK_M"]) + E, triton.cdiv(N, cfg["BLOCK_N"]))
    _grouped_mm_kernel[grid](x, w, offs, y, E, K, N,
                             x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
                             y.stride(0), y.stride(1),
                             FP32_DOT=_fp32_dot(x), BLOCK_E=triton.next_power_of_2(E), **cfg)
    return y


def _grouped_mm_dw(x, dy, offs, w):
    (Nr, K), N, E = x.shape, dy.shape[1], offs.shape[0]
    assert dy.shape[0] == Nr and w.shape == (E, K, N) and x.dtype == dy.dtype
    dw = torch.empty_like(w)  # w's strides: a gradient in another layout makes the .grad update a strided copy
    cfg = _gemm_config(x)
    grid = (E, triton.cdiv(K, cfg["BLOCK_K"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _grouped_mm_dw_kernel[grid](x, dy, offs, dw, K, N,
                                x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
                                dw.stride(0), dw.stride(1), dw.stride(2),
                                FP32_DOT=_fp32_dot(x), **cfg)
    return dw


class GroupedMMFn(torch.autograd.Function):
    # saves x and w (the weight gradient needs x, the input gradient w); nothing is recomputed
    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return _grouped_mm_fwd(x, w, offs)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        dy = dy.to(x.dtype)
        dx = _grouped_mm_fwd(dy, w.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
        dw = _grouped_mm_dw(x, dy, offs, w) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_mm(x, w, offs):
    """All experts' GEMMs in one launch. x (N, K): the token copies sorted by expert, offs (E,)
    int32: the end row of each expert's copies (offs[-1] = N, an expert without tokens repeats
    the previous end), w (E, K, n), any strides, same dtype as x (fp32 or bf16).
    Returns y (N, n) in x's dtype, accumulated in fp32: y[offs[g-1]:offs[g]] = x[offs[g-1]:offs[g]] @ w[g].
    Differentiable in x and w. moe.grouped_mm_ref is the PyTorch reference."""
    return GroupedMMFn.apply(x, w, offs)
