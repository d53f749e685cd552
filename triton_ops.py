"""
triton_ops.py: Triton kernels for the hot paths, each beside the PyTorch reference it must match.
Read after mamba.py and moe.py. (Not `kernels.py`: that import name belongs to the Hugging Face Hub's
`kernels` package, which transformers imports, and `triton_kernels` to the `triton-kernels` package;
a top-level file of ours under either name would shadow it. tests/test_imports.py guards this.)

Paper: Dao & Gu 2024 (arXiv:2405.21060). The recurrence of Sec. 3, which mamba.ssd_step runs one
token at a time,
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,    y_t = h_t C_t + D x_t
runs here as the chunked SSD of Sec. 6 (forward and backward: the autograd Function _SSD, public op
ssd), and for decoding a few tokens (k <= 8) as ssd_update and conv_update (no autograd): one
program per (batch, head, block of head dims) keeps its slice of h in registers across the k tokens,
so h is read and written once per call, whatever k is.

Layering per op: @triton.jit _x_kernel -> _x_fwd (checks, allocates, launches) -> autograd Function
where the op trains -> public x(). mamba.py and moe.py call them when USE_TRITON is on and the
tensors are on a GPU, or on the CPU under TRITON_INTERPRET=1 (the tests); elsewhere they run the
references. Without triton installed (macOS, Windows) the module still imports, with USE_TRITON off.
The MoE experts' grouped GEMM (expert_gemm.py) and the FP8 / MXFP8 / NVFP4 quantizers (quantize.py)
are Triton kernels of their own files, under the same switch.
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
    """Whether tensor t takes the Triton path: on a GPU, in the interpreter on a CPU, or for a meta
    tensor (tests/test_gpu_compile.py records the launches a GPU would get, without one)."""
    return USE_TRITON and (gpu_tiles(t) or INTERPRET)


def gpu_tiles(t):
    """Whether the kernels for t take a GPU's tiles and launch options, not the interpreter's."""
    return t.device.type in ("cuda", "meta") and not INTERPRET


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
    def tf32(x):
        # x with the low 13 of its 23 mantissa bits cleared: TF32's 10, as a GPU's tensor cores read
        # an fp32 operand (truncation: the larger of the errors the hardware may make)
        return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)

    @triton.jit
    def _dot(a, b, DOT: tl.constexpr):
        # the accumulator is fp32; the operands (dot_kind() picks): "bf16" for bf16 inputs on a GPU
        # (tensor cores at full rate), else fp32 in "tf32" or "ieee" as torch's allow_tf32 says,
        # or "tf32-emulated": the interpreter, exact otherwise, rounding the operands as TF32 does
        if DOT == "bf16":
            out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        elif DOT == "tf32-emulated":
            out = tl.dot(tf32(a), tf32(b), input_precision="ieee")
        else:
            out = tl.dot(a, b, input_precision=DOT)
        return out

    # Addresses: each program computes the int64 start of its (chunk, head or group) once, a scalar,
    # and the tiles it reads are int32 offsets from there (r: positions within the chunk, rows of
    # `stride` elements): int64 offset vectors take twice the registers, and registers are what
    # these kernels run short of (tests/test_gpu_compile.py).

    @triton.jit
    def _tile(ptr, r, cols, n_rows, n_cols, stride, DOT: tl.constexpr):
        # the (len(r), len(cols)) tile at rows r, columns cols of rows of `stride` elements from the
        # scalar pointer ptr; zeros past n_rows and n_cols. In the inputs' dtype where the dots take
        # bf16 (half the registers; arithmetic with fp32 promotes it), else fp32 (the interpreter
        # mistreats bf16)
        t = tl.load(ptr + r[:, None] * stride + cols[None, :], mask=(r[:, None] < n_rows) & (cols[None, :] < n_cols),
                    other=0.0)
        if DOT != "bf16":
            t = t.to(tl.float32)
        return t

    @triton.jit
    def _doc_edges(doc, c, lim, Q: tl.constexpr):
        # doc: the document ids of chunk c from its start (a scalar pointer), lim: its positions
        # inside T. The document of the token before the chunk (the first token's for c = 0), whose
        # state the chunk inherits, and the document of its last token, the only one reaching its end
        before = tl.load(doc - tl.minimum(c, 1))
        last = tl.load(doc + tl.minimum(lim, Q) - 1)
        return before, last

    @triton.jit
    def _chunk_cumsum_kernel(dt_ptr, A_ptr, a_ptr, T, H, Q: tl.constexpr):
        # step 0: a_t = sum of dt_s A over s <= t in the chunk, the log of the decay from the
        # chunk's start to t (a is nonincreasing: dt > 0, A < 0)
        b, h, c = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        l = tl.arange(0, Q)
        dt = tl.load(dt_ptr + (b * T + c * Q) * H + h + l * H, mask=l < T - c * Q, other=0.0)
        a = tl.cumsum(dt * tl.load(A_ptr + h), axis=0)
        tl.store(a_ptr + ((b * H + h) * tl.num_programs(2) + c) * Q + l, a)

    @triton.jit
    def _chunk_cb_kernel(C_ptr, B_ptr, cb_ptr, T, G, N, Q: tl.constexpr, BLOCK: tl.constexpr,
                         BLOCK_N: tl.constexpr, DOT: tl.constexpr):
        # CB[l, s] = C_l . B_s within a chunk, the "attention scores" of the diagonal block, one
        # (BLOCK, BLOCK) tile of them, once per group (all its heads share them). Only tiles on or
        # below the diagonal: every read of CB is masked to l >= s
        bc, g, tile = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        lb, sb = tile // (Q // BLOCK), tile % (Q // BLOCK)
        if sb > lb:
            return
        nc = tl.cdiv(T, Q)
        b, c = bc // nc, bc % nc
        lim = T - c * Q
        start = ((b * T + c * Q) * G + g) * N
        l, s = lb * BLOCK + tl.arange(0, BLOCK), sb * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            acc += _dot(_tile(C_ptr + start, l, n, lim, N, G * N, DOT),
                        tl.trans(_tile(B_ptr + start, s, n, lim, N, G * N, DOT)), DOT)
        tl.store(cb_ptr + (bc * G + g) * Q * Q + l[:, None] * Q + s[None, :], acc)

    @triton.jit
    def _chunk_state_kernel(X_ptr, dt_ptr, V_ptr, a_ptr, doc_ptr, out_ptr, T, H, G, P, N,
                            Q: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
                            BLOCK_N: tl.constexpr, TO_END: tl.constexpr, HAS_DOC: tl.constexpr,
                            DOT: tl.constexpr):
        # out = sum_l w_l X_l V_l^T over one chunk of one head, a (P, N) matrix, one (P, BLOCK_N)
        # tile of it per program:
        #   TO_END (step 2): X = x, V = B, w_l = dt_l exp(a_end - a_l): the state the chunk ends
        #     in when it starts from zero
        #   else (backward of step 4): X = dy, V = C, w_l = exp(a_l): dL/dS, the gradient of the
        #     state the chunk starts from, through the chunk's own outputs
        bc, h, nb = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        nc = tl.cdiv(T, Q)
        b, c, g = bc // nc, bc % nc, h // (H // G)
        lim = T - c * Q
        p, n = tl.arange(0, BLOCK_P), nb * BLOCK_N + tl.arange(0, BLOCK_N)
        a_ptr += ((b * H + h) * nc + c) * Q
        X_ptr += ((b * T + c * Q) * H + h) * P
        V_ptr += ((b * T + c * Q) * G + g) * N
        dt_ptr += (b * T + c * Q) * H + h
        doc_ptr += b * T + c * Q
        a_end = tl.load(a_ptr + Q - 1)
        if HAS_DOC:
            before, last = _doc_edges(doc_ptr, c, lim, Q)
            if TO_END:
                doc_ref = last
            else:
                doc_ref = before
        acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        for l0 in range(0, Q, BLOCK_Q):
            l = l0 + tl.arange(0, BLOCK_Q)
            a_l = tl.load(a_ptr + l)
            if TO_END:
                w = tl.load(dt_ptr + l * H, mask=l < lim, other=0.0) * tl.exp(a_end - a_l)
            else:
                w = tl.exp(a_l)
            if HAS_DOC:
                w = tl.where(tl.load(doc_ptr + l, mask=l < lim, other=-1) == doc_ref, w, 0.0)
            Xv = _tile(X_ptr, l, p, lim, P, H * P, DOT)
            Vv = _tile(V_ptr, l, n, lim, N, G * N, DOT)
            acc += _dot(tl.trans(Xv * w[:, None]), Vv, DOT)
        tl.store(out_ptr + (bc * H + h) * P * N + p[:, None] * N + n[None, :], acc,
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
                before, last = _doc_edges(doc_ptr + b * T + c * Q, c, T - c * Q, Q)
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
                before, last = _doc_edges(doc_ptr + b * T + c * Q, c, T - c * Q, Q)
                keep = tl.where(before == last, keep, 0.0)
            S = tl.load(S_ptr + ((b * nc + c) * H + h) * PN + i, mask=i < PN, other=0.0)
            tl.store(dend_ptr + ((b * H + h) * nc + c) * tl.num_programs(2) + blk, keep * tl.sum(gs * S))
            gs = d_own + keep * gs
        tl.store(dinit_ptr + (b * H + h) * PN + i, gs, mask=i < PN)

    @triton.jit
    def _chunk_scan_kernel(x_ptr, dt_ptr, a_ptr, cb_ptr, C_ptr, S_ptr, D_ptr, doc_ptr, y_ptr,
                           T, H, G, P, N, Q: tl.constexpr, BLOCK_L: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_D: tl.constexpr,
                           HAS_DOC: tl.constexpr, DOT: tl.constexpr):
        # the outputs of a block of positions l of one chunk and head:
        #   y_l = exp(a_l) S_c C_l                                (step 4: the carried-in state)
        #       + sum_{s <= l} CB[l, s] exp(a_l - a_s) dt_s x_s   (step 1: the diagonal block)
        #       + D x_l
        bc, h, lb = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        nc = tl.cdiv(T, Q)
        b, c, g = bc // nc, bc % nc, h // (H // G)
        lim = T - c * Q
        l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
        p = tl.arange(0, BLOCK_P)
        a_ptr += ((b * H + h) * nc + c) * Q
        xh = ((b * T + c * Q) * H + h) * P  # this chunk's first x (and y) of head h
        C_ptr += ((b * T + c * Q) * G + g) * N
        S_ptr += (bc * H + h) * P * N
        cb_ptr += (bc * G + g) * Q * Q
        dt_ptr += (b * T + c * Q) * H + h
        doc_ptr += b * T + c * Q
        a_l = tl.load(a_ptr + l)
        decay_l = tl.exp(a_l)
        if HAS_DOC:
            before, last = _doc_edges(doc_ptr, c, lim, Q)
            doc_l = tl.load(doc_ptr + l, mask=l < lim, other=-1)
            decay_l = tl.where(doc_l == before, decay_l, 0.0)
        acc = tl.zeros((BLOCK_L, BLOCK_P), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):  # C_l S_c^T over the state dim, a tile at a time
            n = n0 + tl.arange(0, BLOCK_N)
            S_T = tl.load(S_ptr + p[None, :] * N + n[:, None], mask=(n[:, None] < N) & (p[None, :] < P),
                          other=0.0)  # (BLOCK_N, BLOCK_P): S_c^T
            acc += _dot(_tile(C_ptr, l, n, lim, N, G * N, DOT), S_T, DOT)
        acc = acc * decay_l[:, None]  # (BLOCK_L, BLOCK_P)
        for s0 in range(0, (lb + 1) * BLOCK_L, BLOCK_L):  # only blocks on or below the diagonal
            s = s0 + tl.arange(0, BLOCK_L)
            cb = tl.load(cb_ptr + l[:, None] * Q + s[None, :])
            a_s = tl.load(a_ptr + s)
            dt_s = tl.load(dt_ptr + s * H, mask=s < lim, other=0.0)
            keep = l[:, None] >= s[None, :]
            if HAS_DOC:
                keep &= doc_l[:, None] == tl.load(doc_ptr + s, mask=s < lim, other=-2)[None, :]
            # min(., 0): above the diagonal a_l - a_s > 0 could overflow before the mask drops it
            w = tl.where(keep, cb * tl.exp(tl.minimum(a_l[:, None] - a_s[None, :], 0.0)) * dt_s[None, :], 0.0)
            acc += _dot(w, _tile(x_ptr + xh, s, p, lim, P, H * P, DOT), DOT)
        xl = l[:, None] * (H * P) + p[None, :]
        lm = (l[:, None] < lim) & (p[None, :] < P)
        if HAS_D:
            acc += tl.load(D_ptr + h) * tl.load(x_ptr + xh + xl, mask=lm, other=0.0).to(tl.float32)
        tl.store(y_ptr + xh + xl, acc.to(y_ptr.dtype.element_ty), mask=lm)

    # The backward of steps 1 and 2 within each chunk, for a head h of group g, with u_s = dt_s x_s,
    # dSt = dL/dst (the gradient of the chunk's end state, from step 3's backward), S = S_c,
    # w_s = exp(a_end - a_s), L[l, s] = exp(a_l - a_s) for l >= s, e_l = exp(a_l), and
    # dCB[l, s] = L[l, s] dy_l . u_s:
    #   du_s = w_s dSt B_s + sum_{l >= s} CB[l, s] L[l, s] dy_l,   dx_s = dt_s du_s + D dy_s,
    #   ddt_s = x_s . du_s,   dB_s = sum_h (w_s dSt^T u_s + sum_{l >= s} dCB[l, s] C_l),
    #   dC_l = sum_h (e_l S^T dy_l + sum_{s <= l} dCB[l, s] B_s),
    #   da_t += e_t dy_t . S C_t - m_t - sum_l CB[l, t] dCB[l, t] + sum_s CB[t, s] dCB[t, s],
    # and a_end += sum_s m_s, m_s = w_s u_s . dSt B_s (on the host). Three kernels, in this order:
    # dx (per head: dx, ddt, m and da's -m), dB and dC (per group and tile of N, summing the group's
    # heads in a loop: no per-head copy of B's or C's gradient; their first tiles add da's other
    # terms: the sums of CB dCB, which need dCB as they do, and e dy . S C, to the dC kernel).

    @triton.jit
    def _chunk_scan_bwd_dx_kernel(x_ptr, dt_ptr, a_ptr, cb_ptr, B_ptr, dy_ptr, dSt_ptr, D_ptr,
                                  doc_ptr, dx_ptr, ddt_ptr, da_ptr, m_ptr, T, H, G, P, N,
                                  Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
                                  BLOCK_N: tl.constexpr, HAS_D: tl.constexpr, HAS_DOC: tl.constexpr,
                                  DOT: tl.constexpr):
        # du_s, dx_s, ddt_s, m_s and da_s's term -m_s, for a block of positions s of one head.
        # x_s and dy_s are read again where needed rather than held through the loops (registers)
        bc, h, sb = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        nc = tl.cdiv(T, Q)
        b, c, g = bc // nc, bc % nc, h // (H // G)
        lim = T - c * Q
        s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
        p = tl.arange(0, BLOCK_P)
        ah = ((b * H + h) * nc + c) * Q  # this head's a (and da, m) in this chunk
        xh = ((b * T + c * Q) * H + h) * P  # its first x (and dy, dx)
        BC_g = ((b * T + c * Q) * G + g) * N  # the group's first B (and C)
        Sh = (bc * H + h) * P * N  # its dSt
        dt_ptr += (b * T + c * Q) * H + h
        doc_ptr += b * T + c * Q
        a_s = tl.load(a_ptr + ah + s)
        dt_s = tl.load(dt_ptr + s * H, mask=s < lim, other=0.0)
        xs = s[:, None] * (H * P) + p[None, :]
        sm = (s[:, None] < lim) & (p[None, :] < P)
        w = tl.exp(tl.load(a_ptr + ah + Q - 1) - a_s)
        if HAS_DOC:
            before, last = _doc_edges(doc_ptr, c, lim, Q)
            doc_s = tl.load(doc_ptr + s, mask=s < lim, other=-1)
            w = tl.where(doc_s == last, w, 0.0)
        du = tl.zeros((BLOCK_S, BLOCK_P), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):  # dSt B_s over the state dim, a tile at a time
            n = n0 + tl.arange(0, BLOCK_N)
            dSt = tl.load(dSt_ptr + Sh + p[:, None] * N + n[None, :], mask=(p[:, None] < P) & (n[None, :] < N),
                          other=0.0)
            du += _dot(_tile(B_ptr + BC_g, s, n, lim, N, G * N, DOT), tl.trans(dSt), DOT)
        du = du * w[:, None]  # (BLOCK_S, BLOCK_P)
        m = tl.sum(du * tl.load(x_ptr + xh + xs, mask=sm, other=0.0).to(tl.float32), axis=1) * dt_s  # w u . dSt B
        da = -m
        for l0 in range(sb * BLOCK_S, Q, BLOCK_S):  # only blocks on or below the diagonal
            l = l0 + tl.arange(0, BLOCK_S)
            keep = l[:, None] >= s[None, :]
            if HAS_DOC:
                keep &= tl.load(doc_ptr + l, mask=l < lim, other=-2)[:, None] == doc_s[None, :]
            cb = tl.load(cb_ptr + (bc * G + g) * Q * Q + l[:, None] * Q + s[None, :])  # (l, s)
            w_ls = tl.where(keep, cb * tl.exp(tl.minimum(tl.load(a_ptr + ah + l)[:, None] - a_s[None, :], 0.0)), 0.0)
            du += _dot(tl.trans(w_ls), _tile(dy_ptr + xh, l, p, lim, P, H * P, DOT), DOT)
        dx = du * dt_s[:, None]
        if HAS_D:
            dx += tl.load(D_ptr + h) * tl.load(dy_ptr + xh + xs, mask=sm, other=0.0).to(tl.float32)
        tl.store(dx_ptr + xh + xs, dx, mask=sm)
        ddt = tl.sum(du * tl.load(x_ptr + xh + xs, mask=sm, other=0.0).to(tl.float32), axis=1)
        tl.store(ddt_ptr + (b * T + c * Q) * H + h + s * H, ddt, mask=s < lim)
        tl.store(da_ptr + ah + s, da)
        tl.store(m_ptr + ah + s, m)

    @triton.jit
    def _chunk_scan_bwd_db_kernel(x_ptr, dt_ptr, a_ptr, cb_ptr, C_ptr, dy_ptr, dSt_ptr, doc_ptr, dB_ptr, da_ptr,
                                  T, H, G, P, N, Q: tl.constexpr, BLOCK_S: tl.constexpr,
                                  BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOC: tl.constexpr,
                                  DOT: tl.constexpr):
        # dB_s for a block of positions s and a tile of N of one group, summed over its heads; the
        # first tile also subtracts sum_l CB[l, s] dCB[l, s] from each head's da
        bc, g, tile = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        sb, nb = tile // tl.cdiv(N, BLOCK_N), tile % tl.cdiv(N, BLOCK_N)
        nc = tl.cdiv(T, Q)
        b, c, hpg = bc // nc, bc % nc, H // G
        lim = T - c * Q
        s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
        p, n = tl.arange(0, BLOCK_P), nb * BLOCK_N + tl.arange(0, BLOCK_N)
        BC_g = ((b * T + c * Q) * G + g) * N
        cb_ptr += (bc * G + g) * Q * Q
        doc_ptr += b * T + c * Q
        if HAS_DOC:
            before, last = _doc_edges(doc_ptr, c, lim, Q)
            doc_s = tl.load(doc_ptr + s, mask=s < lim, other=-1)
        acc = tl.zeros((BLOCK_S, BLOCK_N), dtype=tl.float32)
        for hh in range(hpg):
            h = g * hpg + hh
            ah = ((b * H + h) * nc + c) * Q  # this head's a (and da) in this chunk
            xh = ((b * T + c * Q) * H + h) * P
            a_s = tl.load(a_ptr + ah + s)
            dt_s = tl.load(dt_ptr + (b * T + c * Q) * H + h + s * H, mask=s < lim, other=0.0)
            u_s = _tile(x_ptr + xh, s, p, lim, P, H * P, DOT) * dt_s[:, None]  # (BLOCK_S, BLOCK_P)
            w = tl.exp(tl.load(a_ptr + ah + Q - 1) - a_s)
            if HAS_DOC:
                w = tl.where(doc_s == last, w, 0.0)
            dSt = tl.load(dSt_ptr + (bc * H + h) * P * N + p[:, None] * N + n[None, :],
                          mask=(p[:, None] < P) & (n[None, :] < N), other=0.0)  # (BLOCK_P, BLOCK_N)
            acc += _dot(u_s * w[:, None], dSt, DOT)
            da = tl.zeros((BLOCK_S,), dtype=tl.float32)
            for l0 in range(sb * BLOCK_S, Q, BLOCK_S):
                l = l0 + tl.arange(0, BLOCK_S)
                keep = l[:, None] >= s[None, :]
                if HAS_DOC:
                    keep &= tl.load(doc_ptr + l, mask=l < lim, other=-2)[:, None] == doc_s[None, :]
                L = tl.where(keep, tl.exp(tl.minimum(tl.load(a_ptr + ah + l)[:, None] - a_s[None, :], 0.0)), 0.0)
                dcb = L * _dot(_tile(dy_ptr + xh, l, p, lim, P, H * P, DOT), tl.trans(u_s), DOT)  # (l, s)
                acc += _dot(tl.trans(dcb), _tile(C_ptr + BC_g, l, n, lim, N, G * N, DOT), DOT)
                if nb == 0:
                    da -= tl.sum(tl.where(keep, tl.load(cb_ptr + l[:, None] * Q + s[None, :]), 0.0) * dcb, axis=0)
            if nb == 0:
                tl.store(da_ptr + ah + s, tl.load(da_ptr + ah + s) + da)
        tl.store(dB_ptr + BC_g + s[:, None] * (G * N) + n[None, :], acc, mask=(s[:, None] < lim) & (n[None, :] < N))

    @triton.jit
    def _chunk_scan_bwd_dc_kernel(x_ptr, dt_ptr, a_ptr, cb_ptr, B_ptr, C_ptr, dy_ptr, S_ptr, doc_ptr,
                                  dC_ptr, da_ptr, T, H, G, P, N, Q: tl.constexpr,
                                  BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
                                  BLOCK_N: tl.constexpr, HAS_DOC: tl.constexpr, DOT: tl.constexpr):
        # dC_l for a block of outputs l and a tile of N of one group, summed over its heads; the
        # first tile also adds da's other terms, e_l dy_l . S C_l (over all of N) and
        # sum_s CB[l, s] dCB[l, s], to each head's da
        bc, g, tile = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        lb, nb = tile // tl.cdiv(N, BLOCK_N), tile % tl.cdiv(N, BLOCK_N)
        nc = tl.cdiv(T, Q)
        b, c, hpg = bc // nc, bc % nc, H // G
        lim = T - c * Q
        l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
        p, n = tl.arange(0, BLOCK_P), nb * BLOCK_N + tl.arange(0, BLOCK_N)
        BC_g = ((b * T + c * Q) * G + g) * N
        cb_ptr += (bc * G + g) * Q * Q
        doc_ptr += b * T + c * Q
        if HAS_DOC:
            before, last = _doc_edges(doc_ptr, c, lim, Q)
            doc_l = tl.load(doc_ptr + l, mask=l < lim, other=-1)
        acc = tl.zeros((BLOCK_L, BLOCK_N), dtype=tl.float32)
        for hh in range(hpg):
            h = g * hpg + hh
            ah = ((b * H + h) * nc + c) * Q  # this head's a (and da) in this chunk
            xh = ((b * T + c * Q) * H + h) * P
            a_l = tl.load(a_ptr + ah + l)
            decay_l = tl.exp(a_l)
            if HAS_DOC:
                decay_l = tl.where(doc_l == before, decay_l, 0.0)
            dy_l = _tile(dy_ptr + xh, l, p, lim, P, H * P, DOT)
            S = tl.load(S_ptr + (bc * H + h) * P * N + p[:, None] * N + n[None, :],
                        mask=(p[:, None] < P) & (n[None, :] < N), other=0.0)  # (BLOCK_P, BLOCK_N)
            acc += _dot(dy_l * decay_l[:, None], S, DOT)
            da = tl.zeros((BLOCK_L,), dtype=tl.float32)
            if nb == 0:
                for n0 in range(0, N, BLOCK_N):  # e_l dy_l . S C_l = e_l sum_n (S^T dy_l)_n C_ln, a tile at a time
                    n_all = n0 + tl.arange(0, BLOCK_N)
                    S_n = tl.load(S_ptr + (bc * H + h) * P * N + p[:, None] * N + n_all[None, :],
                                  mask=(p[:, None] < P) & (n_all[None, :] < N), other=0.0)
                    da += tl.sum(_dot(dy_l, S_n, DOT) * _tile(C_ptr + BC_g, l, n_all, lim, N, G * N, DOT), axis=1)
                da = da * decay_l
            for s0 in range(0, (lb + 1) * BLOCK_L, BLOCK_L):
                s = s0 + tl.arange(0, BLOCK_L)
                a_s = tl.load(a_ptr + ah + s)
                dt_s = tl.load(dt_ptr + (b * T + c * Q) * H + h + s * H, mask=s < lim, other=0.0)
                keep = l[:, None] >= s[None, :]
                if HAS_DOC:
                    keep &= doc_l[:, None] == tl.load(doc_ptr + s, mask=s < lim, other=-2)[None, :]
                L = tl.where(keep, tl.exp(tl.minimum(a_l[:, None] - a_s[None, :], 0.0)), 0.0)
                u_s = _tile(x_ptr + xh, s, p, lim, P, H * P, DOT) * dt_s[:, None]
                dcb = L * _dot(dy_l, tl.trans(u_s), DOT)  # (BLOCK_L, BLOCK_L)
                acc += _dot(dcb, _tile(B_ptr + BC_g, s, n, lim, N, G * N, DOT), DOT)
                if nb == 0:
                    da += tl.sum(tl.where(keep, tl.load(cb_ptr + l[:, None] * Q + s[None, :]), 0.0) * dcb, axis=1)
            if nb == 0:
                tl.store(da_ptr + ah + l, tl.load(da_ptr + ah + l) + da)
        tl.store(dC_ptr + BC_g + l[:, None] * (G * N) + n[None, :], acc, mask=(l[:, None] < lim) & (n[None, :] < N))

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
        # int64 starts: b * s_hb and the like pass 2^31 once B*H*P*N does (a large batch of long
        # states); int32 offsets within the tile (int64 vectors would double their registers)
        b, hd, pb = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2)
        g = hd // (H // G)  # the group whose B and C this head reads
        p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        pm, nm = p < P, n < N
        hmask = pm[:, None] & nm[None, :]
        pn, pn_s = p[:, None] * s_hp + n[None, :], p[:, None] * s_sp + n[None, :]
        h_ptr += b * s_hb + hd * s_hh
        h = tl.load(h_ptr + pn, mask=hmask, other=0.0)  # (BLOCK_P, BLOCK_N) fp32, kept in registers
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
                tl.store(hs_ptr + (b * s_sb + t * s_sk + hd * s_sh) + pn_s, h, mask=hmask)
        tl.store(h_ptr + pn, h, mask=hmask)

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
        b, cb = tl.program_id(0).to(tl.int64), tl.program_id(1)
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


def dot_kind(t):
    """The one TF32 policy of the kernels' tl.dot, for inputs like t: "bf16" operands for bf16
    inputs on a GPU; fp32 operands otherwise (the interpreter mistreats bf16), in TF32 where torch's
    own fp32 matmuls are (torch.backends.cuda.matmul.allow_tf32: train.py turns it on; off by
    default, so tests compare exact fp32), else "ieee". The interpreter computes TF32 exactly, so
    there "tf32-emulated" truncates the operands to TF32 first, as a GPU reads them."""
    if t.dtype != torch.float32 and not INTERPRET:
        return "bf16"
    if not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32-emulated" if INTERPRET else "tf32"


# (positions per block, state entries per tile of N, warps, pipeline stages) of each SSD kernel on a
# GPU, chosen with tests/test_gpu_compile.py: each compiles for sm_90 (and sm_100 in bf16) within the
# shared memory, with no register spills and with tensor-core dots, at mamba_head_dim 64, d_state 128 and
# 256, chunk 128 and 256, bf16 and TF32, with and without documents. Not tuned for speed: no GPU yet
SSD_TILES = {"cb": (64, 64, 8, 2), "state": (64, 64, 8, 2), "scan": (64, 64, 8, 2),
             "dx": (32, 64, 8, 2), "db": (32, 64, 8, 1), "dc": (32, 32, 8, 1)}


def ssd_tiles(x):
    """SSD_TILES for a GPU's inputs; in the interpreter blocks of 64 and whole N, the fewest
    programs (each costs ~0.5 ms of Python there). Tests swap in small tiles to run the GPU's
    tiling (several N tiles, blocks smaller than a chunk) in the interpreter."""
    return SSD_TILES if gpu_tiles(x) else {k: (64, 1 << 30, None, None) for k in SSD_TILES}


def _ssd_meta(x, B, Q):
    """Launch parameters of the SSD kernels: for each, its block of positions (at most the chunk),
    its tile of N and its launch options, from ssd_tiles."""
    P, N = x.shape[3], B.shape[3]
    BLOCK_P, BLOCK_N = max(16, triton.next_power_of_2(P)), max(16, triton.next_power_of_2(N))
    meta = dict(Q=Q, BLOCK_P=BLOCK_P, DOT=dot_kind(x))
    for k, (block, tile_n, warps, stages) in ssd_tiles(x).items():
        launch = dict(num_warps=warps, num_stages=stages) if warps else {}
        meta[k] = (min(block, Q), min(tile_n, BLOCK_N), launch)
    return meta


def _ssd_states(x, dt, A, B, C, initial_state, seq_idx, meta):
    """Steps 0, 2 and 3, and the C B^T of step 1: a (B, H, c*Q), CB (B, c, G, Q, Q), the states
    S (B, c, H, P, N) at each chunk's start, and the final state (B, H, P, N)."""
    Bsz, T, H, P = x.shape
    G, N, Q = B.shape[2], B.shape[3], meta["Q"]
    nc = triton.cdiv(T, Q)
    doc = seq_idx if seq_idx is not None else dt  # a dummy pointer when there are no documents
    a = torch.empty(Bsz, H, nc * Q, device=x.device, dtype=torch.float32)
    _chunk_cumsum_kernel[(Bsz, H, nc)](dt, A, a, T, H, Q=Q)
    CB = torch.empty(Bsz, nc, G, Q, Q, device=x.device, dtype=torch.float32)  # tiles above the diagonal unset
    BLOCK, TILE_N, launch = meta["cb"]
    _chunk_cb_kernel[(Bsz * nc, G, (Q // BLOCK) ** 2)](C, B, CB, T, G, N, Q=Q, BLOCK=BLOCK, BLOCK_N=TILE_N,
                                                       DOT=meta["DOT"], **launch)
    S = torch.empty(Bsz, nc, H, P, N, device=x.device, dtype=torch.float32)
    BLOCK, TILE_N, launch = meta["state"]
    _chunk_state_kernel[(Bsz * nc, H, triton.cdiv(N, TILE_N))](
        x, dt, B, a, doc, S, T, H, G, P, N, Q=Q, BLOCK_Q=BLOCK, BLOCK_P=meta["BLOCK_P"], BLOCK_N=TILE_N,
        TO_END=True, HAS_DOC=seq_idx is not None, DOT=meta["DOT"], **launch)
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
        BLOCK, TILE_N, launch = meta["scan"]
        _chunk_scan_kernel[(Bsz * triton.cdiv(T, Q), H, Q // BLOCK)](
            x, dt, a, CB, C, S, D if D is not None else A, seq_idx if seq_idx is not None else dt, y,
            T, H, G, P, N, Q=Q, BLOCK_L=BLOCK, BLOCK_P=meta["BLOCK_P"], BLOCK_N=TILE_N,
            HAS_D=D is not None, HAS_DOC=seq_idx is not None, DOT=meta["DOT"], **launch)
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
        BLOCK, TILE_N, launch = meta["state"]
        _chunk_state_kernel[(Bsz * nc, H, triton.cdiv(N, TILE_N))](
            dy, dt, C, a, doc, dS, T, H, G, P, N, Q=Q, BLOCK_Q=BLOCK, BLOCK_P=meta["BLOCK_P"], BLOCK_N=TILE_N,
            TO_END=False, HAS_DOC=seq_idx is not None, DOT=meta["DOT"], **launch)
        PN_BLOCK = min(1024, triton.next_power_of_2(P * N))
        nblk = triton.cdiv(P * N, PN_BLOCK)
        dinit = torch.empty(Bsz, H, P, N, **f32)
        dend = torch.empty(Bsz, H, nc, nblk, **f32)
        _state_passing_bwd_kernel[(Bsz, H, nblk)](
            dS, S, a, dfinal.float().contiguous() if dfinal is not None else dS, dinit, dend, doc, T, H, P * N,
            Q=Q, BLOCK=PN_BLOCK, HAS_DFINAL=dfinal is not None, HAS_DOC=seq_idx is not None)
        # 3) through steps 1 and 2, within each chunk: dx, ddt (its x part) and da per head; dB and dC
        # per group (the kernels sum the group's heads)
        dx = torch.empty(Bsz, T, H, P, **f32)
        ddt = torch.empty(Bsz, T, H, **f32)
        dB = torch.empty(Bsz, T, G, N, **f32)
        dC = torch.empty(Bsz, T, G, N, **f32)
        da = torch.empty(Bsz, H, nc * Q, **f32)
        m = torch.empty(Bsz, H, nc * Q, **f32)
        common = dict(Q=Q, BLOCK_P=meta["BLOCK_P"], HAS_DOC=seq_idx is not None, DOT=meta["DOT"])
        BLOCK, TILE_N, launch = meta["dx"]
        _chunk_scan_bwd_dx_kernel[(Bsz * nc, H, Q // BLOCK)](
            x, dt, a, CB, B, dy, dS, D if D is not None else A, doc, dx, ddt, da, m, T, H, G, P, N,
            BLOCK_S=BLOCK, BLOCK_N=TILE_N, HAS_D=D is not None, **common, **launch)
        BLOCK, TILE_N, launch = meta["db"]
        _chunk_scan_bwd_db_kernel[(Bsz * nc, G, Q // BLOCK * triton.cdiv(N, TILE_N))](
            x, dt, a, CB, C, dy, dS, doc, dB, da, T, H, G, P, N, BLOCK_S=BLOCK, BLOCK_N=TILE_N, **common, **launch)
        BLOCK, TILE_N, launch = meta["dc"]
        _chunk_scan_bwd_dc_kernel[(Bsz * nc, G, Q // BLOCK * triton.cdiv(N, TILE_N))](
            x, dt, a, CB, B, C, dy, S, doc, dC, da, T, H, G, P, N, BLOCK_L=BLOCK, BLOCK_N=TILE_N, **common, **launch)
        # 4) a_end of each chunk gets the terms that the kernels left to the host, then the
        # backward of step 0: dL/d(dt_t A) is the sum of da over positions >= t in its chunk
        da = da.view(Bsz, H, nc, Q)  # (B, H, c, Q)
        da[..., -1] += m.view(Bsz, H, nc, Q).sum(-1) + dend.sum(-1)
        ddA = da.flip(-1).cumsum(-1).flip(-1).view(Bsz, H, nc * Q)[:, :, :T].transpose(1, 2)  # (B, T, H)
        ddt = ddt + ddA * A
        dA = (ddA * dt).sum((0, 1))
        dD = torch.einsum("bthp,bthp->h", dy.float(), x.float()) if D is not None else None
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
    launch = dict(num_warps=8) if gpu_tiles(x) else {}  # 16 states per thread: none spilled (test_gpu_compile.py)
    _ssd_update_kernel[grid](h, x, dt, A, B, C, D if D is not None else A, y, hs,
                             K, H, G, P, N,
                             h.stride(0), h.stride(1), h.stride(2),
                             x.stride(0), x.stride(1), x.stride(2),
                             dt.stride(0), dt.stride(1),
                             B.stride(0), B.stride(1), B.stride(2),
                             y.stride(0), y.stride(1), y.stride(2),
                             *s_hs,
                             HAS_D=D is not None, SAVE_STATES=save_states, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, **launch)
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
