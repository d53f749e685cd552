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
    # chunked SSD (training and prefill), Sec. 6 of the paper
    #
    # Every tensor is contiguous (the host makes it so), and a kernel computes offsets from the
    # sizes: x, dy (B, T, H, P); dt (B, T, H) fp32; B, C (B, T, G, N); seq_idx (B, T) int32.
    # T is cut into c = ceil(T/Q) chunks; positions past T read as x = dt = 0 (no input, no decay),
    # so a partial last chunk needs no padding in memory. The intermediates, all fp32:
    # a (B, H, c*Q), CB (B, c, G, Q, Q), S (B, c, H, P, N). Programs along axis 0 cover
    # (batch, chunk) pairs bc = b * c + chunk. With seq_idx, nothing crosses a document boundary:
    # a decay between two positions (or a position and a chunk edge) of different documents is 0.

    @triton.jit
    def _dot(a, b, LOWP: tl.constexpr):
        # fp32 operands (exact in the interpreter, TF32 on a GPU), or bf16 operands when the inputs
        # are bf16 (tensor cores at full rate); the accumulator is fp32 either way
        if LOWP:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        return tl.dot(a, b)

    @triton.jit
    def _rows(ptr, b, t, T, X, x, cols, W):
        # the (len(t), len(cols)) tile of a contiguous (B, T, X, W) tensor at batch b, positions t,
        # slot x (a head or a group), columns cols; zeros past T and W, in fp32
        return tl.load(ptr + ((b * T + t[:, None]) * X + x) * W + cols[None, :],
                       mask=(t[:, None] < T) & (cols[None, :] < W), other=0.0).to(tl.float32)

    @triton.jit
    def _doc_edges(doc_ptr, b, c, T, Q: tl.constexpr):
        # the document of the token before chunk c (the first token's for c = 0), whose state the
        # chunk inherits, and the document of its last token, the only one that reaches its end
        before = tl.load(doc_ptr + b * T + tl.maximum(c * Q - 1, 0))
        last = tl.load(doc_ptr + b * T + tl.minimum(c * Q + Q, T) - 1)
        return before, last

    @triton.jit
    def _chunk_cumsum_kernel(dt_ptr, A_ptr, a_ptr, T, H, Q: tl.constexpr):
        # step 0: a_t = sum of dt_s A over s <= t in the chunk, the log of the decay from the
        # chunk's start to t (a is nonincreasing: dt > 0, A < 0)
        b, h, c = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        t = c * Q + tl.arange(0, Q)
        dt = tl.load(dt_ptr + (b * T + t) * H + h, mask=t < T, other=0.0)
        a = tl.cumsum(dt * tl.load(A_ptr + h), axis=0)
        tl.store(a_ptr + (b * H + h) * tl.num_programs(2) * Q + t, a)

    @triton.jit
    def _chunk_cb_kernel(C_ptr, B_ptr, cb_ptr, T, G, N, Q: tl.constexpr, BLOCK_N: tl.constexpr,
                         LOWP: tl.constexpr):
        # CB[l, s] = C_l . B_s within a chunk: the "attention scores" of the diagonal block, once
        # per group (all its heads share them)
        bc, g = tl.program_id(0).to(tl.int64), tl.program_id(1)
        b, c = bc // tl.cdiv(T, Q), bc % tl.cdiv(T, Q)
        t = c * Q + tl.arange(0, Q)
        acc = tl.zeros((Q, Q), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            acc += _dot(_rows(C_ptr, b, t, T, G, g, n, N), tl.trans(_rows(B_ptr, b, t, T, G, g, n, N)), LOWP)
        q = tl.arange(0, Q)
        tl.store(cb_ptr + ((bc * G + g) * Q + q[:, None]) * Q + q[None, :], acc)

    @triton.jit
    def _chunk_state_kernel(X_ptr, dt_ptr, V_ptr, a_ptr, doc_ptr, out_ptr, T, H, G, P, N,
                            Q: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
                            BLOCK_N: tl.constexpr, TO_END: tl.constexpr, HAS_DOC: tl.constexpr,
                            LOWP: tl.constexpr):
        # out = sum_l w_l X_l V_l^T over one chunk of one head, a (P, N) matrix:
        #   TO_END (step 2): X = x, V = B, w_l = dt_l exp(a_end - a_l): the state the chunk ends
        #     in when it starts from zero
        #   else (backward of step 4): X = dy, V = C, w_l = exp(a_l): dL/dS, the gradient of the
        #     state the chunk starts from, through the chunk's own outputs
        bc, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
        nc = tl.cdiv(T, Q)
        b, c, g = bc // nc, bc % nc, h // (H // G)
        p, n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
        a_ptr += (b * H + h) * nc * Q + c * Q
        a_end = tl.load(a_ptr + Q - 1)
        if HAS_DOC:
            before, last = _doc_edges(doc_ptr, b, c, T, Q)
            if TO_END:
                doc_ref = last
            else:
                doc_ref = before
        acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        for l0 in range(0, Q, BLOCK_Q):
            l = l0 + tl.arange(0, BLOCK_Q)
            t = c * Q + l
            a_l = tl.load(a_ptr + l)
            if TO_END:
                w = tl.load(dt_ptr + (b * T + t) * H + h, mask=t < T, other=0.0) * tl.exp(a_end - a_l)
            else:
                w = tl.exp(a_l)
            if HAS_DOC:
                w = tl.where(tl.load(doc_ptr + b * T + t, mask=t < T, other=-1) == doc_ref, w, 0.0)
            Xv = _rows(X_ptr, b, t, T, H, h, p, P)
            Vv = _rows(V_ptr, b, t, T, G, g, n, N)
            acc += _dot(tl.trans(Xv * w[:, None]), Vv, LOWP)
        tl.store(out_ptr + ((bc * H + h) * P + p[:, None]) * N + n[None, :], acc,
                 mask=(p[:, None] < P) & (n[None, :] < N))

    @triton.jit
    def _state_passing_kernel(S_ptr, a_ptr, init_ptr, final_ptr, doc_ptr, T, H, PN,
                              Q: tl.constexpr, BLOCK: tl.constexpr, HAS_INIT: tl.constexpr,
                              HAS_DOC: tl.constexpr):
        # step 3: S_{c+1} = exp(a_end(c)) S_c + st_c, sequential over the chunks, one program per
        # (batch, head, block of the P*N state entries). In place: chunk c's slot of S holds st_c
        # (from step 2) on entry and S_c, the state at the chunk's start, on exit.
        b, h, i = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
        nc = tl.cdiv(T, Q)
        if HAS_INIT:
            s = tl.load(init_ptr + (b * H + h) * PN + i, mask=i < PN, other=0.0)
        else:
            s = tl.zeros((BLOCK,), dtype=tl.float32)
        for c in range(nc):
            ptrs = S_ptr + ((b * nc + c) * H + h) * PN + i
            st = tl.load(ptrs, mask=i < PN, other=0.0)
            tl.store(ptrs, s, mask=i < PN)
            keep = tl.exp(tl.load(a_ptr + (b * H + h) * nc * Q + c * Q + Q - 1))
            if HAS_DOC:  # a new document inside chunk c: the carried state stops there
                before, last = _doc_edges(doc_ptr, b, c, T, Q)
                keep = tl.where(before == last, keep, 0.0)
            s = keep * s + st
        tl.store(final_ptr + (b * H + h) * PN + i, s, mask=i < PN)

    @triton.jit
    def _state_passing_bwd_kernel(dS_ptr, S_ptr, a_ptr, dfinal_ptr, dinit_ptr, dend_ptr, doc_ptr,
                                  T, H, PN, Q: tl.constexpr, BLOCK: tl.constexpr,
                                  HAS_DFINAL: tl.constexpr, HAS_DOC: tl.constexpr):
        # backward of step 3, from the last chunk to the first. With G_c = dL/dS_c, G_c =
        # dS_c (through chunk c's outputs) + keep_c G_{c+1}, and G_{c count} = dL/dfinal:
        #   dL/dst_c = G_{c+1},  dL/da_end(c) = keep_c <G_{c+1}, S_c>,  dL/dinitial = G_0.
        # In place: chunk c's slot of dS holds dS_c on entry and dL/dst_c on exit; dend gets one
        # partial sum of the inner product per block (the host adds them up).
        b, h, blk = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        i = blk * BLOCK + tl.arange(0, BLOCK)
        nc = tl.cdiv(T, Q)
        if HAS_DFINAL:
            gs = tl.load(dfinal_ptr + (b * H + h) * PN + i, mask=i < PN, other=0.0)
        else:
            gs = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in range(nc):
            c = nc - 1 - k
            ptrs = dS_ptr + ((b * nc + c) * H + h) * PN + i
            d_own = tl.load(ptrs, mask=i < PN, other=0.0)
            tl.store(ptrs, gs, mask=i < PN)
            keep = tl.exp(tl.load(a_ptr + (b * H + h) * nc * Q + c * Q + Q - 1))
            if HAS_DOC:
                before, last = _doc_edges(doc_ptr, b, c, T, Q)
                keep = tl.where(before == last, keep, 0.0)
            S = tl.load(S_ptr + ((b * nc + c) * H + h) * PN + i, mask=i < PN, other=0.0)
            tl.store(dend_ptr + ((b * H + h) * nc + c) * tl.num_programs(2) + blk, keep * tl.sum(gs * S))
            gs = d_own + keep * gs
        tl.store(dinit_ptr + (b * H + h) * PN + i, gs, mask=i < PN)

    @triton.jit
    def _chunk_scan_kernel(x_ptr, dt_ptr, a_ptr, cb_ptr, C_ptr, S_ptr, D_ptr, doc_ptr, y_ptr,
                           T, H, G, P, N, Q: tl.constexpr, BLOCK_L: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_D: tl.constexpr,
                           HAS_DOC: tl.constexpr, LOWP: tl.constexpr):
        # the outputs of a block of positions l of one chunk and head:
        #   y_l = exp(a_l) S_c C_l                                (step 4: the carried-in state)
        #       + sum_{s <= l} CB[l, s] exp(a_l - a_s) dt_s x_s   (step 1: the diagonal block)
        #       + D x_l
        bc, h, lb = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        nc = tl.cdiv(T, Q)
        b, c, g = bc // nc, bc % nc, h // (H // G)
        l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
        t_l = c * Q + l
        p, n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
        a_ptr += (b * H + h) * nc * Q + c * Q
        a_l = tl.load(a_ptr + l)
        decay_l = tl.exp(a_l)
        if HAS_DOC:
            before, last = _doc_edges(doc_ptr, b, c, T, Q)
            doc_l = tl.load(doc_ptr + b * T + t_l, mask=t_l < T, other=-1)
            decay_l = tl.where(doc_l == before, decay_l, 0.0)
        C_l = _rows(C_ptr, b, t_l, T, G, g, n, N)
        S_T = tl.load(S_ptr + ((bc * H + h) * P + p[None, :]) * N + n[:, None],
                      mask=(n[:, None] < N) & (p[None, :] < P), other=0.0)  # (BLOCK_N, BLOCK_P): S_c^T
        acc = _dot(C_l, S_T, LOWP) * decay_l[:, None]  # (BLOCK_L, BLOCK_P)
        for s0 in range(0, (lb + 1) * BLOCK_L, BLOCK_L):  # only blocks on or below the diagonal
            s = s0 + tl.arange(0, BLOCK_L)
            t_s = c * Q + s
            cb = tl.load(cb_ptr + ((bc * G + g) * Q + l[:, None]) * Q + s[None, :])
            a_s = tl.load(a_ptr + s)
            dt_s = tl.load(dt_ptr + (b * T + t_s) * H + h, mask=t_s < T, other=0.0)
            keep = l[:, None] >= s[None, :]
            if HAS_DOC:
                keep &= doc_l[:, None] == tl.load(doc_ptr + b * T + t_s, mask=t_s < T, other=-2)[None, :]
            # min(., 0): above the diagonal a_l - a_s > 0 could overflow before the mask drops it
            w = tl.where(keep, cb * tl.exp(tl.minimum(a_l[:, None] - a_s[None, :], 0.0)) * dt_s[None, :], 0.0)
            x_s = _rows(x_ptr, b, t_s, T, H, h, p, P)
            acc += _dot(w, x_s, LOWP)
        xl_ptrs = ((b * T + t_l[:, None]) * H + h) * P + p[None, :]
        lm = (t_l[:, None] < T) & (p[None, :] < P)
        if HAS_D:
            acc += tl.load(D_ptr + h) * tl.load(x_ptr + xl_ptrs, mask=lm, other=0.0).to(tl.float32)
        tl.store(y_ptr + xl_ptrs, acc.to(y_ptr.dtype.element_ty), mask=lm)

    @triton.jit
    def _chunk_scan_bwd_dx_kernel(x_ptr, dt_ptr, a_ptr, cb_ptr, B_ptr, C_ptr, dy_ptr, dSt_ptr, D_ptr,
                                  doc_ptr, dx_ptr, ddt_ptr, dB_ptr, da_ptr, m_ptr,
                                  T, H, G, P, N, Q: tl.constexpr, BLOCK_S: tl.constexpr,
                                  BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_D: tl.constexpr,
                                  HAS_DOC: tl.constexpr, LOWP: tl.constexpr):
        # the gradients through the input term dt_s x_s B_s^T of a block of positions s, with
        # u_s = dt_s x_s and dSt = dL/dst, the gradient of the chunk's end state (from step 3):
        #   into the end state (step 2), w_s = exp(a_end - a_s):
        #     du_s += w_s dSt B_s,   dB_s += w_s dSt^T u_s,   m_s = w_s u_s . dSt B_s
        #   into the chunk's later outputs (step 1), over l >= s, L[l, s] = exp(a_l - a_s):
        #     du_s += sum_l CB[l, s] L[l, s] dy_l,   dCB[l, s] = L[l, s] dy_l . u_s,
        #     dB_s += sum_l dCB[l, s] C_l,   da_s -= sum_l CB[l, s] dCB[l, s]
        # then dx_s = dt_s du_s + D dy_s and ddt_s = x_s . du_s. dB is per head (the host sums
        # the heads of a group); da_s gets -m_s here and a_end gets sum_s m_s on the host.
        bc, h, sb = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        nc = tl.cdiv(T, Q)
        b, c, g = bc // nc, bc % nc, h // (H // G)
        s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
        t_s = c * Q + s
        p, n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
        a_ptr += (b * H + h) * nc * Q + c * Q
        a_s = tl.load(a_ptr + s)
        dt_s = tl.load(dt_ptr + (b * T + t_s) * H + h, mask=t_s < T, other=0.0)
        xs_ptrs = ((b * T + t_s[:, None]) * H + h) * P + p[None, :]
        sm = (t_s[:, None] < T) & (p[None, :] < P)
        x_s = tl.load(x_ptr + xs_ptrs, mask=sm, other=0.0).to(tl.float32)
        u_s = x_s * dt_s[:, None]  # (BLOCK_S, BLOCK_P)
        B_s = _rows(B_ptr, b, t_s, T, G, g, n, N)
        w = tl.exp(tl.load(a_ptr + Q - 1) - a_s)
        if HAS_DOC:
            before, last = _doc_edges(doc_ptr, b, c, T, Q)
            doc_s = tl.load(doc_ptr + b * T + t_s, mask=t_s < T, other=-1)
            w = tl.where(doc_s == last, w, 0.0)
        dSt = tl.load(dSt_ptr + ((bc * H + h) * P + p[:, None]) * N + n[None, :],
                      mask=(p[:, None] < P) & (n[None, :] < N), other=0.0)  # (BLOCK_P, BLOCK_N)
        du = _dot(B_s, tl.trans(dSt), LOWP) * w[:, None]  # (BLOCK_S, BLOCK_P)
        dB = _dot(u_s, dSt, LOWP) * w[:, None]  # (BLOCK_S, BLOCK_N)
        m = tl.sum(du * u_s, axis=1)
        da = -m
        for l0 in range(sb * BLOCK_S, Q, BLOCK_S):  # only blocks on or below the diagonal
            l = l0 + tl.arange(0, BLOCK_S)
            t_l = c * Q + l
            a_l = tl.load(a_ptr + l)
            cb = tl.load(cb_ptr + ((bc * G + g) * Q + l[:, None]) * Q + s[None, :])  # (BLOCK_S l, BLOCK_S s)
            keep = l[:, None] >= s[None, :]
            if HAS_DOC:
                keep &= tl.load(doc_ptr + b * T + t_l, mask=t_l < T, other=-2)[:, None] == doc_s[None, :]
            L = tl.where(keep, tl.exp(tl.minimum(a_l[:, None] - a_s[None, :], 0.0)), 0.0)
            dy_l = _rows(dy_ptr, b, t_l, T, H, h, p, P)
            C_l = _rows(C_ptr, b, t_l, T, G, g, n, N)
            du += _dot(tl.trans(cb * L), dy_l, LOWP)
            dcb = L * _dot(dy_l, tl.trans(u_s), LOWP)
            dB += _dot(tl.trans(dcb), C_l, LOWP)
            da -= tl.sum(cb * dcb, axis=0)
        dx = du * dt_s[:, None]
        if HAS_D:
            dx += tl.load(D_ptr + h) * tl.load(dy_ptr + xs_ptrs, mask=sm, other=0.0).to(tl.float32)
        tl.store(dx_ptr + xs_ptrs, dx, mask=sm)
        tl.store(ddt_ptr + (b * T + t_s) * H + h, tl.sum(du * x_s, axis=1), mask=t_s < T)
        tl.store(dB_ptr + ((b * T + t_s[:, None]) * H + h) * N + n[None, :], dB,
                 mask=(t_s[:, None] < T) & (n[None, :] < N))
        tl.store(da_ptr + (b * H + h) * nc * Q + c * Q + s, da)
        tl.store(m_ptr + (b * H + h) * nc * Q + c * Q + s, m)

    @triton.jit
    def _chunk_scan_bwd_dc_kernel(x_ptr, dt_ptr, a_ptr, cb_ptr, B_ptr, C_ptr, dy_ptr, S_ptr, doc_ptr,
                                  dC_ptr, da_ptr, T, H, G, P, N, Q: tl.constexpr,
                                  BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
                                  BLOCK_N: tl.constexpr, HAS_DOC: tl.constexpr, LOWP: tl.constexpr):
        # the gradients through C_l and a_l of a block of outputs l (run after the dx kernel,
        # whose da it adds to):
        #   carried-in state (step 4), e_l = exp(a_l):  dC_l += e_l S_c^T dy_l,
        #     da_l += e_l dy_l . S_c C_l
        #   diagonal block (step 1), over s <= l:  dC_l += sum_s dCB[l, s] B_s,
        #     da_l += sum_s CB[l, s] dCB[l, s]
        bc, h, lb = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        nc = tl.cdiv(T, Q)
        b, c, g = bc // nc, bc % nc, h // (H // G)
        l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
        t_l = c * Q + l
        p, n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
        a_ptr += (b * H + h) * nc * Q + c * Q
        a_l = tl.load(a_ptr + l)
        decay_l = tl.exp(a_l)
        if HAS_DOC:
            before, last = _doc_edges(doc_ptr, b, c, T, Q)
            doc_l = tl.load(doc_ptr + b * T + t_l, mask=t_l < T, other=-1)
            decay_l = tl.where(doc_l == before, decay_l, 0.0)
        dy_l = _rows(dy_ptr, b, t_l, T, H, h, p, P)
        C_l = _rows(C_ptr, b, t_l, T, G, g, n, N)
        S = tl.load(S_ptr + ((bc * H + h) * P + p[:, None]) * N + n[None, :],
                    mask=(p[:, None] < P) & (n[None, :] < N), other=0.0)  # (BLOCK_P, BLOCK_N)
        dC = _dot(dy_l, S, LOWP) * decay_l[:, None]  # (BLOCK_L, BLOCK_N)
        da = decay_l * tl.sum(dy_l * _dot(C_l, tl.trans(S), LOWP), axis=1)
        for s0 in range(0, (lb + 1) * BLOCK_L, BLOCK_L):
            s = s0 + tl.arange(0, BLOCK_L)
            t_s = c * Q + s
            a_s = tl.load(a_ptr + s)
            dt_s = tl.load(dt_ptr + (b * T + t_s) * H + h, mask=t_s < T, other=0.0)
            cb = tl.load(cb_ptr + ((bc * G + g) * Q + l[:, None]) * Q + s[None, :])
            keep = l[:, None] >= s[None, :]
            if HAS_DOC:
                keep &= doc_l[:, None] == tl.load(doc_ptr + b * T + t_s, mask=t_s < T, other=-2)[None, :]
            L = tl.where(keep, tl.exp(tl.minimum(a_l[:, None] - a_s[None, :], 0.0)), 0.0)
            u_s = _rows(x_ptr, b, t_s, T, H, h, p, P) * dt_s[:, None]
            B_s = _rows(B_ptr, b, t_s, T, G, g, n, N)
            dcb = L * _dot(dy_l, tl.trans(u_s), LOWP)  # (BLOCK_L, BLOCK_L)
            dC += _dot(dcb, B_s, LOWP)
            da += tl.sum(cb * dcb, axis=1)
        tl.store(dC_ptr + ((b * T + t_l[:, None]) * H + h) * N + n[None, :], dC,
                 mask=(t_l[:, None] < T) & (n[None, :] < N))
        da_ptrs = da_ptr + (b * H + h) * nc * Q + c * Q + l
        tl.store(da_ptrs, tl.load(da_ptrs) + da)

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


# -----------------------------------------------------------------------------
# chunked SSD: host side and autograd


def _ssd_prepare(x, dt, A, B, C, Q, D, initial_state, seq_idx):
    Bsz, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    assert dt.shape == (Bsz, T, H) and A.shape == (H,) and B.shape == C.shape == (Bsz, T, G, N)
    assert H % G == 0, "heads must split evenly into groups"
    assert initial_state is None or initial_state.shape == (Bsz, H, P, N)
    x, B, C = x.contiguous(), B.contiguous(), C.contiguous()
    dt, A = dt.float().contiguous(), A.float().contiguous()
    D = D.float().contiguous() if D is not None else None
    initial_state = initial_state.float().contiguous() if initial_state is not None else None
    seq_idx = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    return x, dt, A, B, C, D, initial_state, seq_idx


def _ssd_meta(x, B, Q):
    """Launch parameters shared by the SSD kernels."""
    P, N = x.shape[3], B.shape[3]
    # bf16 dot operands on a GPU for bf16 inputs; fp32 in the interpreter, which mistreats bf16
    lowp = x.dtype != torch.float32 and not INTERPRET
    return dict(Q=Q, BLOCK_P=max(16, triton.next_power_of_2(P)), BLOCK_N=max(16, triton.next_power_of_2(N)),
                BLOCK=min(Q, 64), LOWP=lowp)


def _ssd_states(x, dt, A, B, C, initial_state, seq_idx, meta):
    """Steps 0, 2 and 3, and the C B^T of step 1: a (B, H, c*Q), CB (B, c, G, Q, Q), the states
    S (B, c, H, P, N) at each chunk's start, and the final state (B, H, P, N)."""
    Bsz, T, H, P = x.shape
    G, N, Q = B.shape[2], B.shape[3], meta["Q"]
    nc = triton.cdiv(T, Q)
    doc = seq_idx if seq_idx is not None else dt  # a dummy pointer when there are no documents
    a = torch.empty(Bsz, H, nc * Q, device=x.device, dtype=torch.float32)
    _chunk_cumsum_kernel[(Bsz, H, nc)](dt, A, a, T, H, Q=Q)
    CB = torch.empty(Bsz, nc, G, Q, Q, device=x.device, dtype=torch.float32)
    _chunk_cb_kernel[(Bsz * nc, G)](C, B, CB, T, G, N, Q=Q, BLOCK_N=min(meta["BLOCK_N"], 64), LOWP=meta["LOWP"])
    S = torch.empty(Bsz, nc, H, P, N, device=x.device, dtype=torch.float32)
    _chunk_state_kernel[(Bsz * nc, H)](x, dt, B, a, doc, S, T, H, G, P, N, Q=Q, BLOCK_Q=meta["BLOCK"],
                                       BLOCK_P=meta["BLOCK_P"], BLOCK_N=meta["BLOCK_N"], TO_END=True,
                                       HAS_DOC=seq_idx is not None, LOWP=meta["LOWP"])
    final = torch.empty(Bsz, H, P, N, device=x.device, dtype=torch.float32)
    BLOCK = min(1024, triton.next_power_of_2(P * N))
    _state_passing_kernel[(Bsz, H, triton.cdiv(P * N, BLOCK))](
        S, a, initial_state if initial_state is not None else S, final, doc, T, H, P * N, Q=Q, BLOCK=BLOCK,
        HAS_INIT=initial_state is not None, HAS_DOC=seq_idx is not None)
    return a, CB, S, final


class _SSD(torch.autograd.Function):
    # Saved for the backward: the inputs only. The backward recomputes a (a cumsum), CB (one
    # small matmul per chunk and group) and the chunk states S (one pass over x): S alone is
    # c*H*P*N fp32 numbers, as much memory as x in fp32 when N = Q, and recomputing all three
    # costs a fraction of the backward's own work.

    @staticmethod
    def forward(ctx, x, dt, A, B, C, Q, D, initial_state, seq_idx):
        x, dt, A, B, C, D, initial_state, seq_idx = _ssd_prepare(x, dt, A, B, C, Q, D, initial_state, seq_idx)
        Bsz, T, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        meta = _ssd_meta(x, B, Q)
        a, CB, S, final = _ssd_states(x, dt, A, B, C, initial_state, seq_idx, meta)
        y = torch.empty_like(x)  # in x's dtype, as the mixer's next op (the gated norm) reads it
        _chunk_scan_kernel[(Bsz * triton.cdiv(T, Q), H, Q // meta["BLOCK"])](
            x, dt, a, CB, C, S, D if D is not None else A, seq_idx if seq_idx is not None else dt, y,
            T, H, G, P, N, Q=Q, BLOCK_L=meta["BLOCK"], BLOCK_P=meta["BLOCK_P"], BLOCK_N=meta["BLOCK_N"],
            HAS_D=D is not None, HAS_DOC=seq_idx is not None, LOWP=meta["LOWP"])
        ctx.save_for_backward(x, dt, A, B, C, D, initial_state, seq_idx)
        ctx.Q = Q
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, initial_state, seq_idx = ctx.saved_tensors
        Q = ctx.Q
        Bsz, T, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        nc = triton.cdiv(T, Q)
        meta = _ssd_meta(x, B, Q)
        f32 = dict(device=x.device, dtype=torch.float32)
        doc = seq_idx if seq_idx is not None else dt
        dy = dy.contiguous() if dy is not None else torch.zeros_like(x)
        # 1) recompute the forward's intermediates
        a, CB, S, _ = _ssd_states(x, dt, A, B, C, initial_state, seq_idx, meta)
        # 2) dL/dS_c through each chunk's own outputs (backward of step 4), then back through the
        # state passing (step 3): dS becomes dL/dst_c, the gradient of each chunk's end state
        dS = torch.empty(Bsz, nc, H, P, N, **f32)
        _chunk_state_kernel[(Bsz * nc, H)](dy, dt, C, a, doc, dS, T, H, G, P, N, Q=Q, BLOCK_Q=meta["BLOCK"],
                                           BLOCK_P=meta["BLOCK_P"], BLOCK_N=meta["BLOCK_N"], TO_END=False,
                                           HAS_DOC=seq_idx is not None, LOWP=meta["LOWP"])
        BLOCK = min(1024, triton.next_power_of_2(P * N))
        nblk = triton.cdiv(P * N, BLOCK)
        dinit = torch.empty(Bsz, H, P, N, **f32)
        dend = torch.empty(Bsz, H, nc, nblk, **f32)
        _state_passing_bwd_kernel[(Bsz, H, nblk)](
            dS, S, a, dfinal.float().contiguous() if dfinal is not None else dS, dinit, dend, doc, T, H, P * N,
            Q=Q, BLOCK=BLOCK, HAS_DFINAL=dfinal is not None, HAS_DOC=seq_idx is not None)
        # 3) through steps 1 and 2, within each chunk: dx, ddt (its x part), dB and dC per head, da
        dx = torch.empty(Bsz, T, H, P, **f32)
        ddt = torch.empty(Bsz, T, H, **f32)
        dB = torch.empty(Bsz, T, H, N, **f32)
        dC = torch.empty(Bsz, T, H, N, **f32)
        da = torch.empty(Bsz, H, nc * Q, **f32)
        m = torch.empty(Bsz, H, nc * Q, **f32)
        grid = (Bsz * nc, H, Q // meta["BLOCK"])
        common = dict(Q=Q, BLOCK_P=meta["BLOCK_P"], BLOCK_N=meta["BLOCK_N"], HAS_DOC=seq_idx is not None,
                      LOWP=meta["LOWP"])
        _chunk_scan_bwd_dx_kernel[grid](x, dt, a, CB, B, C, dy, dS, D if D is not None else A, doc,
                                        dx, ddt, dB, da, m, T, H, G, P, N, BLOCK_S=meta["BLOCK"],
                                        HAS_D=D is not None, **common)
        _chunk_scan_bwd_dc_kernel[grid](x, dt, a, CB, B, C, dy, S, doc, dC, da, T, H, G, P, N,
                                        BLOCK_L=meta["BLOCK"], **common)
        # 4) a_end of each chunk gets the terms that the kernels left to the host, then the
        # backward of step 0: dL/d(dt_t A) is the sum of da over positions >= t in its chunk
        da = da.view(Bsz, H, nc, Q)  # (B, H, c, Q)
        da[..., -1] += m.view(Bsz, H, nc, Q).sum(-1) + dend.sum(-1)
        ddA = da.flip(-1).cumsum(-1).flip(-1).view(Bsz, H, nc * Q)[:, :, :T].transpose(1, 2)  # (B, T, H)
        ddt = ddt + ddA * A
        dA = (ddA * dt).sum((0, 1))
        dD = torch.einsum("bthp,bthp->h", dy.float(), x.float()) if D is not None else None
        dB = dB.view(Bsz, T, G, H // G, N).sum(3)  # (B, T, G, N): the heads of a group share B
        dC = dC.view(Bsz, T, G, H // G, N).sum(3)
        return (dx.to(x.dtype), ddt, dA, dB.to(B.dtype), dC.to(C.dtype), None, dD,
                dinit if initial_state is not None else None, None)


def ssd(x, dt, A, B, C, chunk_size, D=None, initial_state=None, seq_idx=None):
    """The chunked SSD of Mamba-2 as Triton kernels, forward and backward; mamba.ssd_ref is the
    PyTorch reference with the same signature. x (B, T, H, P) bf16 or fp32, dt (B, T, H) after
    softplus, A (H,) negative, B and C (B, T, G, N), D (H,) or None, initial_state (B, H, P, N)
    or None, seq_idx (B, T) nondecreasing document ids of packed sequences (the state restarts
    from zero at each new document) or None. chunk_size is rounded up to a power of two >= 16 (the
    chunked algorithm is exact for any chunk length; only the rounding of the sums changes).
    Returns y (B, T, H, P) in x's dtype and the final state (B, H, P, N) in fp32; states and
    accumulation are fp32 throughout."""
    Q = max(16, triton.next_power_of_2(chunk_size))  # the kernels' tile: the maths holds for any Q
    return _SSD.apply(x, dt, A, B, C, Q, D, initial_state, seq_idx)


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
