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
Then the MoE experts' grouped GEMM (forward and backward; moe.grouped_mm_ref is its reference), and
last, low precision: the FP8 / MXFP8 / NVFP4 quantizers (kernels and references, QTensor, delayed
scaling's AmaxHistory, the random Hadamard transform). The training recipe that uses them (the
low-precision Linear and expert GEMMs that train.py --precision swaps in, and which layers get them)
is lowprec.py, which imports this file; nothing here imports it.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    def _tf32(x):
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
            out = tl.dot(_tf32(a), _tf32(b), input_precision="ieee")
        else:
            out = tl.dot(a, b, input_precision=DOT)
        return out

    @triton.jit
    def _dot_acc(a, b, acc, DOT: tl.constexpr):
        # acc + a @ b with the operands as _dot takes them (bf16 inputs stay bf16 for "bf16")
        if DOT == "bf16":
            out = tl.dot(a, b, acc)
        elif DOT == "tf32-emulated":
            out = tl.dot(_tf32(a.to(tl.float32)), _tf32(b.to(tl.float32)), acc, input_precision="ieee")
        else:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT)
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


# -----------------------------------------------------------------------------
# grouped GEMM: all MoE experts in one launch
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
                           DOT: tl.constexpr, BLOCK_E: tl.constexpr,
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
        # the tile's start in int64 (row0 * s_xm passes 2^31 at a million token copies of width
        # 2688), offsets within it in int32 (int64 vectors would double their registers)
        r, cols = tl.arange(0, BLOCK_M), j * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, cmask = r < row_end - row0, cols < N
        x_ptr += row0.to(tl.int64) * s_xm
        w_ptr += g.to(tl.int64) * s_we
        # 2) accumulate over K in fp32
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + r[:, None] * s_xm + k[None, :] * s_xk,
                        mask=rmask[:, None] & (k[None, :] < K), other=0.0)  # (BLOCK_M, BLOCK_K)
            b = tl.load(w_ptr + k[:, None] * s_wk + cols[None, :] * s_wn,
                        mask=(k[:, None] < K) & cmask[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
            acc = _dot_acc(a, b, acc, DOT)
        tl.store(y_ptr + row0.to(tl.int64) * s_ym + r[:, None] * s_ym + cols[None, :] * s_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _grouped_mm_dw_kernel(x_ptr, dy_ptr, offs_ptr, dw_ptr,
                              K, N,
                              s_xm, s_xk,
                              s_dm, s_dn,
                              s_we, s_wk, s_wn,
                              DOT: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # program (g, i, j): tile (i, j) of expert g's weight gradient,
        # dw[g][ks, cols] = sum over g's rows m of x[m, ks]^T dy[m, cols]; zero for an idle expert
        g, i, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        # int64 rows: m0 * s_xm passes 2^31 at a million token copies of width 2688
        row_start = tl.load(offs_ptr + g - 1, mask=g > 0, other=0).to(tl.int64)
        row_end = tl.load(offs_ptr + g).to(tl.int64)
        ks = i * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
        kmask, cmask = ks < K, cols < N
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        r = tl.arange(0, BLOCK_M)
        for m0 in range(row_start, row_end, BLOCK_M):
            mmask = r < row_end - m0
            a = tl.load(x_ptr + m0 * s_xm + r[None, :] * s_xm + ks[:, None] * s_xk,
                        mask=kmask[:, None] & mmask[None, :], other=0.0)  # (BLOCK_K, BLOCK_M): x^T
            b = tl.load(dy_ptr + m0 * s_dm + r[:, None] * s_dm + cols[None, :] * s_dn,
                        mask=mmask[:, None] & cmask[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
            acc = _dot_acc(a, b, acc, DOT)
        tl.store(dw_ptr + g.to(tl.int64) * s_we + ks[:, None] * s_wk + cols[None, :] * s_wn,
                 acc.to(dw_ptr.dtype.element_ty), mask=kmask[:, None] & cmask[None, :])


def _gemm_config(t, dw=False):
    """Tile sizes and launch options: GPU tiles for tensor cores (bench.py moe prints the TFLOP/s
    they reach; fp32 gets half the K tile to fit shared memory, and the weight gradient, which sums
    over its rows, half the rows, or its (rows, N) tile of dy spills registers:
    tests/test_gpu_compile.py), small tiles in the interpreter (tl.dot needs 16 or more)."""
    if gpu_tiles(t):
        wide = t.element_size() == 4
        return dict(BLOCK_M=64 if wide and dw else 128, BLOCK_N=128, BLOCK_K=32 if wide else 64, num_warps=8,
                    num_stages=3)
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)


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
                             DOT=dot_kind(x), BLOCK_E=triton.next_power_of_2(E), **cfg)
    return y


def _grouped_mm_dw(x, dy, offs, w=None):
    (Nr, K), N, E = x.shape, dy.shape[1], offs.shape[0]
    assert dy.shape[0] == Nr and (w is None or w.shape == (E, K, N)) and x.dtype == dy.dtype
    # w's strides: a gradient in another layout makes the .grad update a strided copy
    dw = torch.empty_like(w) if w is not None else x.new_empty(E, K, N)
    cfg = _gemm_config(x, dw=True)
    grid = (E, triton.cdiv(K, cfg["BLOCK_K"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _grouped_mm_dw_kernel[grid](x, dy, offs, dw, K, N,
                                x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
                                dw.stride(0), dw.stride(1), dw.stride(2),
                                DOT=dot_kind(x), **cfg)
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


def grouped_mm_nograd(a, b, offs):
    """moe.mm_by_groups's two forms on the kernels, without autograd (lowprec's grouped GEMMs):
    a (N, K) @ b (E, K, n) -> (N, n), rows grouped by offs; or a (K, N) @ b (N, n) -> (E, K, n),
    the summed dimension N grouped by offs."""
    return _grouped_mm_fwd(a, b, offs) if b.dim() == 3 else _grouped_mm_dw(a.t(), b, offs)


# =============================================================================
# low precision: FP8, MXFP8 and NVFP4 quantizers (lowprec.py has the recipe that calls them: the
# low-precision Linear and expert GEMMs, and which layers get them)
#
# Papers: Nemotron-H (arXiv:2504.03624) trains in FP8 with per-tensor current scaling; "Pretraining
# LLMs with NVFP4" (NVIDIA 2025) and Nemotron 3 Super in NVFP4; MXFP8 is the OCP microscaling format
# (arXiv:2506.08027 for its scale rounding). The numerics follow TransformerEngine's.
#
# A quantized tensor is codes times scales. Every quantizer here takes a 2-D x (R, C) and cuts it
# into blocks of (br, bc) elements, blocks along the last dim, which must be the GEMM's reduction
# dim (lowprec's Linear passes a transposed view where the backward reduces over another dim: the
# kernels read it through its strides, so quantize-and-transpose is one pass). A shape that is not
# a multiple of the block is padded with zeros, which change neither an amax nor a GEMM.
#   format            codes              scale per block                   per tensor
#   fp8 tensorwise    E4M3 / E5M2        -                                 fp32 448/amax
#   fp8 delayed       E4M3 / E5M2        -                                 fp32 from an amax history
#   fp8 blockwise     E4M3 / E5M2        fp32 per 1x128 (x, dy), 128x128 (W)   -
#   mxfp8             E4M3               E8M0 (a power of two) per 1x32    -
#   nvfp4             E2M1, 2 per byte   E4M3 per 1x16 (x, dy), 16x16 (W)   fp32 S_dec
# Every cast rounds to nearest, ties to even, and saturates at the format's largest value (the
# NVFP4 gradients round stochastically instead). Each quantizer has a PyTorch reference (`_ref`)
# that the tests hold the kernel to bit for bit; the FP8 references use torch's own float8 casts,
# and E2M1's is checked against ml_dtypes.
#
# footgun: the Triton interpreter casts fp32 to fp8 without rounding or saturating, so the kernels
# round in fp32 first (_round_rne), after which the cast to fp8 is exact everywhere.

FP8 = {"e4m3": (3, -6, 448.0), "e5m2": (2, -14, 57344.0)}  # mantissa bits, smallest normal exponent, max
E2M1 = (1, 0, 6.0)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # code & 7 -> magnitude; code & 8 is the sign
FLT_MAX = torch.finfo(torch.float32).max
TORCH_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def fl32(v):
    """A Python float rounded to fp32, as a 0-d tensor (the constants of the recipes, e.g. fl32(1/6))."""
    return torch.tensor(v, dtype=torch.float32)


def spacing(a, m_bits, emin):
    """The gap between neighbouring values of a float format (m_bits mantissa bits, smallest normal
    exponent emin) at a >= 0 (fp32): 2^(max(exponent of a, emin) - m_bits), built from the bits."""
    e = ((a.view(torch.int32) >> 23) & 0xFF) - 127
    return ((e.clamp(min=emin) - m_bits + 127) << 23).view(torch.float32)


def e2m1_index(a):
    """|v| (fp32, <= 6) -> the index (0..7) in E2M1_VALUES of its nearest E2M1 value, ties to the
    even code: a count of the midpoints between neighbouring values that a is past, where a tie
    goes down at 0.25, 1.25, 2.5, 5 (> ) and up at 0.75, 1.75, 3.5 (>=)."""
    idx = (a > 0.25).to(torch.uint8)
    for mid, up in ((0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False)):
        idx += a >= mid if up else a > mid
    return idx


def to_fp8(v, fmt):
    """v (fp32) -> torch float8 codes of fmt: torch's cast (ties to even) after a clamp that saturates."""
    fmax = FP8[fmt][2]
    return v.clamp(-fmax, fmax).to(TORCH_FP8[fmt])


def round_ref(v, fmt):
    """v (fp32) to the nearest value of fmt ("e4m3", "e5m2" or "e2m1"), ties to even, saturating;
    returned as fp32. FP8 through torch's own casts; E2M1 (torch has none) by e2m1_index."""
    if fmt in FP8:
        return to_fp8(v, fmt).float()
    values = torch.tensor(E2M1_VALUES, device=v.device)
    return values[e2m1_index(v.abs().clamp(max=6.0)).long()].copysign(v)


def round_sr_ref(v, rand):
    """v (fp32, |v| <= 6) to one of its two neighbouring E2M1 values, the upper one with probability
    (distance to the lower) / spacing: unbiased. rand: uniform [0, 1) numbers, v's shape."""
    m_bits, emin, _ = E2M1
    a = v.abs()
    q = spacing(a, m_bits, emin)
    n = torch.floor(a * (1.0 / q))  # (1/q is a power of two: exact)
    up = (rand < a * (1.0 / q) - n).float()
    return ((n + up) * q).copysign(v)


def pack_nibbles(codes):
    """(R, C) 4-bit codes -> (R, C/2) bytes, element 2i in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_e2m1(data):
    """(R, C/2) bytes -> (R, C) fp32 E2M1 values, through a table of the 256 bytes' two values."""
    codes = torch.arange(16, device=data.device)
    values = torch.tensor(E2M1_VALUES, device=data.device)[codes & 7] * (1 - 2 * (codes >> 3))  # (16,)
    table = torch.stack([values.repeat(16), values.repeat_interleave(16)], dim=1)  # (256, 2): low, high nibble
    return table[data.long()].reshape(data.size(0), -1)  # (R, C) from (R, C/2, 2)


def e8m0_from_amax(amax):
    """MXFP8's block scale as TransformerEngine computes it: the biased E8M0 exponent (uint8) of
    amax * fl32(1/448), rounded up, so that amax / scale <= 448 (a subnormal at or below 2^-127
    keeps exponent 0, which stands for 2^-127)."""
    bits = (amax * fl32(1 / 448).to(amax.device)).view(torch.int32)
    e, mant = (bits >> 23) & 0xFF, bits & 0x7FFFFF
    up = (mant > 0) & (e != 254) & ~((e == 0) & (mant <= 0x400000))
    return (e + up.int()).to(torch.uint8)


def pow2(k):
    """2^k as fp32 for integer k in [-127, 127], exactly (2^-127 is a subnormal)."""
    return torch.where(k >= -126, (k + 127) << 23, 1 << 22).view(torch.float32)


def nvfp4_global(amax):
    """NVFP4's per-tensor scales from the tensor's amax: S_enc = 2688 / amax (448 * 6: the largest
    block scale times the largest element), 1 if amax or S_enc is 0, and S_dec = 1 / S_enc.
    Returns (S_enc * fl32(1/6), S_dec), the two numbers the block scales need, fp32 (2,)."""
    s_enc = (fl32(2688.0).to(amax.device) / amax).clamp(max=FLT_MAX)  # a true division (see TRITON_ON_CPU.md)
    s_enc = torch.where((amax == 0) | (s_enc == 0), torch.ones_like(s_enc), s_enc)
    return torch.stack([s_enc * fl32(1 / 6).to(amax.device), 1.0 / s_enc])


@dataclass
class QTensor:
    """A quantized 2-D tensor: codes, one scale per block of `block` elements, and for NVFP4 a
    per-tensor scale. dequantize() gives back the (R, C) values as codes times scales."""
    data: torch.Tensor        # codes: float8 (R', C'), or uint8 (R', C'/2) with two E2M1 codes per byte
    scale: torch.Tensor       # per block (R'/br, C'/bc): fp32 decode scale, E8M0 exponent (uint8), or E4M3 s_b
    fmt: str                  # "e4m3", "e5m2", "mxfp8" or "nvfp4"
    block: tuple              # (br, bc) elements per scale
    shape: tuple              # (R, C) before padding to (R', C')
    tensor_scale: torch.Tensor = None  # nvfp4: S_dec, fp32 (1, 1), or one per block where parts differ

    def dequantize(self):
        if self.fmt == "nvfp4":
            values = unpack_e2m1(self.data)
            scale = self.scale.float()
        else:
            values = self.data.float()
            scale = pow2(self.scale.int() - 127) if self.fmt == "mxfp8" else self.scale
        (Rp, Cp), (br, bc) = values.shape, self.block
        # from (R'/br, br, C'/bc, bc)
        out = values.view(Rp // br, br, Cp // bc, bc) * scale[:, None, :, None]  # (R'/br, br, C'/bc, bc)
        if self.tensor_scale is not None:
            out = out * self.tensor_scale[:, None, :, None]
        return out.view(Rp, Cp)[:self.shape[0], :self.shape[1]]


def pad_to_blocks(x, block):
    """Zeros appended to the rows and columns of x (R, C) up to multiples of block (br, bc)."""
    R, C = x.shape
    pr, pc = -R % block[0], -C % block[1]
    return F.pad(x, (0, pc, 0, pr)) if pr or pc else x


# -----------------------------------------------------------------------------
# the PyTorch references


def fp8_scale(amax, fmax):
    """Current scaling: the encode scale fmax / amax (fp32), 1 where amax is 0, at most FLT_MAX."""
    s = (torch.full_like(amax, fmax) / amax).clamp(max=FLT_MAX)
    return torch.where(amax == 0, torch.ones_like(s), s)


def quantize_tensor_ref(x, scale, fmt):
    """x (R, C) * scale (fp32 encode scale: one, or per row (R, 1) or column (1, C)) -> fp8 codes (R, C)."""
    return to_fp8(x.float() * scale, fmt)


def quantize_blocks_ref(x, fmt, block, g=None, rand=None):
    """The reference of _quantize_blocks_kernel: x (R, C), R and C multiples of block (br, bc).
    fmt "e4m3"/"e5m2" (fp8 blockwise), "mxfp8" or "nvfp4" (g: nvfp4_global's (2,), or (2, R/br or 1,
    C/bc or 1) for a tensor scale per block; rand: uniform numbers (R, C) for stochastic rounding or
    None). Returns codes and per-block scales."""
    (R, C), (br, bc) = x.shape, block
    g = g.view(2, 1, 1) if g is not None and g.dim() == 1 else g  # (2, R/br or 1, C/bc or 1)
    xb = x.float().contiguous().view(R // br, br, C // bc, bc)  # (R/br, br, C/bc, bc)
    # 1) the amax of each block
    amax = xb.abs().amax(dim=(1, 3))  # (R/br, C/bc)
    # 2) each block's scales: enc multiplies x into the format's range, scale is what is stored
    if fmt == "nvfp4":
        scale = round_ref(amax * g[0], "e4m3")  # s_b = e4m3(block_amax * (S_enc * 1/6))
        enc = (1.0 / (scale * g[1])).clamp(max=FLT_MAX)  # 1 / (s_b * S_dec); an all-zero block: 0 * FLT_MAX
    elif fmt == "mxfp8":
        scale = e8m0_from_amax(amax)
        enc = pow2(127 - scale.int())
    else:
        enc = fp8_scale(amax, FP8[fmt][2])
        scale = 1.0 / enc
    # 3) the codes
    v = (xb * enc[:, None, :, None]).view(R, C)  # from (R/br, br, C/bc, bc)
    if fmt == "nvfp4":
        v = v.clamp(-6.0, 6.0)
        idx = e2m1_index((round_sr_ref(v, rand) if rand is not None else v).abs())  # SR: an exact E2M1 value
        codes = idx.to(torch.uint8) | ((v < 0).to(torch.uint8) << 3)  # the sign in bit 3
        return pack_nibbles(codes), scale.to(torch.float8_e4m3fn)
    return to_fp8(v, "e4m3" if fmt == "mxfp8" else fmt), scale


# -----------------------------------------------------------------------------
# the Triton kernels

if triton is not None:

    @triton.jit
    def _spacing(a, M_BITS: tl.constexpr, EMIN: tl.constexpr):
        # as spacing(): 2^(max(exponent of a, EMIN) - M_BITS) from the bits of a >= 0
        e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, EMIN)
        return ((e - M_BITS + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _copysign(r, v):
        # r >= 0 with the sign bit of v (so -0.0 stays -0.0, as torch's casts keep it)
        sign = v.to(tl.uint32, bitcast=True) & 0x80000000
        return (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _round_rne(v, M_BITS: tl.constexpr, EMIN: tl.constexpr, FMAX: tl.constexpr):
        # as round_ref(): saturate, then the fp32 add of 1.5 * 2^23 * spacing rounds to even. A NaN
        # stays NaN, as in torch's clamp and cast (a GPU's min drops it: it would saturate to FMAX)
        a = tl.minimum(tl.abs(v), FMAX)
        c = _spacing(a, M_BITS, EMIN) * 12582912.0
        return tl.where(v != v, v, _copysign((a + c) - c, v))

    @triton.jit
    def _min_keep_nan(v, hi):
        # min(v, hi), NaN where v is NaN (as torch's clamp; a GPU's min, and the interpreter's,
        # return hi)
        return tl.where(v != v, v, tl.minimum(v, hi))

    @triton.jit
    def _store_fp8(ptrs, q, mask):
        # q (fp32, already rounded to the format) stored as the codes of the fp8 type ptrs point to;
        # a NaN as 0x7F, the code torch's casts give (the interpreter's cast gives a finite one)
        bits = q.to(ptrs.dtype.element_ty).to(tl.uint8, bitcast=True)
        tl.store(ptrs.to(tl.pointer_type(tl.uint8)), tl.where(q != q, 0x7F, bits), mask=mask)

    @triton.jit
    def _round_sr(v, rand):
        # as round_sr_ref(), E2M1 (|v| <= 6)
        a = tl.abs(v)
        q = _spacing(a, 1, 0)
        inv_q = (254 << 23) - q.to(tl.int32, bitcast=True)  # the bits of 1/q (q a power of two)
        t = a * inv_q.to(tl.float32, bitcast=True)
        n = tl.floor(t)
        return _copysign((n + tl.where(rand < t - n, 1.0, 0.0)) * q, v)

    @triton.jit
    def _quantize_tensor_kernel(x_ptr, scale_ptr, q_ptr, n, M_BITS: tl.constexpr, EMIN: tl.constexpr,
                                FMAX: tl.constexpr, BLOCK: tl.constexpr):
        # fp8 with one scale for the whole (contiguous) tensor: q = rne(x * scale)
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n, other=0.0).to(tl.float32)
        q = _round_rne(x * tl.load(scale_ptr), M_BITS, EMIN, FMAX)
        _store_fp8(q_ptr + i, q, i < n)

    @triton.jit
    def _quantize_blocks_kernel(x_ptr, g_ptr, q_ptr, s_ptr, R, C, s_xr, s_xc, s_g, s_gr, s_gc, seed,
                                FMT: tl.constexpr, M_BITS: tl.constexpr, EMIN: tl.constexpr,
                                FMAX: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                                TR: tl.constexpr, TC: tl.constexpr, SR: tl.constexpr):
        # program (i, j): the (TR, TC) tile at rows i*TR, columns j*TC of x (R, C), which holds
        # (TR/BR, TC/BC) whole blocks (R, C are multiples of the block); x is read through its
        # strides, so a transposed view is quantized without a copy. Steps as quantize_blocks_ref;
        # SR: stochastic rounding with tl.rand(seed, r * C + c) for element (r, c) (uniform()).
        # nvfp4's two tensor scales of block (br, bc) are at g_ptr + br * s_gr + bc * s_gc and s_g past it
        # (strides 0 for one pair for all)
        i, j = tl.program_id(0), tl.program_id(1)
        ri, ci = tl.arange(0, TR), tl.arange(0, TC)
        rows, cols = i * TR + ri, j * TC + ci
        inside = (rows[:, None] < R) & (cols[None, :] < C)
        # the tile's start in int64 (cols * s_xc passes 2^31 in large transposed views), offsets
        # within it in int32 (int64 vectors would double their registers)
        x_ptr += (i * TR).to(tl.int64) * s_xr + (j * TC).to(tl.int64) * s_xc
        x = tl.load(x_ptr + ri[:, None] * s_xr + ci[None, :] * s_xc, mask=inside, other=0.0).to(tl.float32)
        # 1) the amax of each block; NaN where the block holds one, as torch's amax (a GPU's max drops it)
        amax = tl.max(tl.max(tl.reshape(tl.abs(x), (TR // BR, BR, TC // BC, BC)), axis=3), axis=1)  # (TR/BR, TC/BC)
        nan = tl.max(tl.max(tl.reshape((x != x).to(tl.int32), (TR // BR, BR, TC // BC, BC)), axis=3), axis=1)
        amax = tl.where(nan > 0, float("nan"), amax)
        # 2) each block's scales (a block's NaN carried through: min drops it, hence _min_keep_nan)
        brow = i * (TR // BR) + tl.arange(0, TR // BR)
        bcol = j * (TC // BC) + tl.arange(0, TC // BC)
        s_mask = (brow[:, None] < R // BR) & (bcol[None, :] < C // BC)
        if FMT == "nvfp4":
            g_ptrs = g_ptr + brow[:, None] * s_gr + bcol[None, :] * s_gc
            g_enc, g_dec = tl.load(g_ptrs, mask=s_mask, other=1.0), tl.load(g_ptrs + s_g, mask=s_mask, other=1.0)
            scale = _round_rne(amax * g_enc, 3, -6, 448.0)  # s_b, an E4M3 value
            enc = _min_keep_nan(tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale * g_dec),
                                3.4028234663852886e38)
        elif FMT == "mxfp8":
            bits = (amax * 0.002232142857142857).to(tl.int32, bitcast=True)  # amax * fl32(1/448)
            e, mant = (bits >> 23) & 0xFF, bits & 0x7FFFFF
            e += ((mant > 0) & (e != 254) & ~((e == 0) & (mant <= 0x400000))).to(tl.int32)  # round up
            e = e & 0xFF  # as the uint8 it is stored as (a NaN's 255 + 1 wraps to 0, in the reference too)
            scale = e
            enc = tl.where(e < 254, (254 - e) << 23, 1 << 22).to(tl.float32, bitcast=True)  # 2^(127 - e)
        else:
            enc = tl.math.div_rn(tl.full(amax.shape, FMAX, tl.float32), amax)
            enc = tl.where(amax == 0, 1.0, _min_keep_nan(enc, 3.4028234663852886e38))
            scale = tl.math.div_rn(tl.full(enc.shape, 1.0, tl.float32), enc)
        s_ptrs = s_ptr + brow[:, None] * (C // BC) + bcol[None, :]
        if FMT == "nvfp4":
            _store_fp8(s_ptrs, scale, s_mask)
        else:
            tl.store(s_ptrs, scale.to(s_ptr.dtype.element_ty), mask=s_mask)
        # 3) the codes
        v = x * tl.reshape(tl.broadcast_to(enc[:, None, :, None], (TR // BR, BR, TC // BC, BC)), (TR, TC))
        if FMT == "nvfp4":
            v = tl.where(v != v, v, tl.minimum(tl.maximum(v, -6.0), 6.0))  # NaN stays NaN, as torch's clamp
            if SR:
                r = _round_sr(v, tl.rand(seed, rows[:, None].to(tl.int64) * C + cols[None, :]))  # as uniform()
            else:
                r = _round_rne(v, 1, 0, 6.0)
            a = tl.abs(r)  # the index of |r| in E2M1_VALUES, and the sign bit
            code = ((a >= 0.5).to(tl.int32) + (a >= 1.0).to(tl.int32) + (a >= 1.5).to(tl.int32)
                    + (a >= 2.0).to(tl.int32) + (a >= 3.0).to(tl.int32) + (a >= 4.0).to(tl.int32)
                    + (a >= 6.0).to(tl.int32) + tl.where(v < 0, 8, 0))
            lo, hi = tl.split(tl.reshape(code, (TR, TC // 2, 2)))  # elements 2i and 2i+1
            pcols = j * (TC // 2) + tl.arange(0, TC // 2)
            tl.store(q_ptr + (i * TR).to(tl.int64) * (C // 2) + ri[:, None] * (C // 2) + pcols[None, :],
                     (lo | (hi << 4)).to(tl.uint8), mask=(rows[:, None] < R) & (pcols[None, :] < C // 2))
        else:
            q = _round_rne(v, M_BITS, EMIN, FMAX)
            _store_fp8(q_ptr + (i * TR).to(tl.int64) * C + ri[:, None] * C + cols[None, :], q, inside)


def _quantize_tensor(x, scale, fmt):
    if not use_triton(x):
        return quantize_tensor_ref(x, scale, fmt)
    if scale.numel() > 1:  # a scale per row or column: multiplied in first (x * scale * 1 rounds as x * scale)
        x, scale = x.float() * scale, scale.new_ones(())
    xc = x.contiguous()
    q = torch.empty(x.shape, device=x.device, dtype=TORCH_FP8[fmt])
    BLOCK = 4096 if gpu_tiles(x) else 1 << 16
    _quantize_tensor_kernel[(triton.cdiv(x.numel(), BLOCK),)](xc, scale, q, x.numel(), *FP8[fmt], BLOCK=BLOCK)
    return q


def _quantize_blocks(x, fmt, block, g=None, seed=None):
    """Codes and block scales of x (R, C), R and C multiples of block: the kernel or the reference.
    seed (nvfp4): round stochastically, with the uniform numbers uniform(seed, R, C)."""
    if not use_triton(x):
        return quantize_blocks_ref(x, fmt, block, g, None if seed is None else uniform(seed, *x.shape, x.device))
    (R, C), (br, bc) = x.shape, block
    if fmt == "nvfp4":
        q = torch.empty(R, C // 2, device=x.device, dtype=torch.uint8)
        s = torch.empty(R // br, C // bc, device=x.device, dtype=torch.float8_e4m3fn)
    else:
        q = torch.empty(R, C, device=x.device, dtype=TORCH_FP8.get(fmt, torch.float8_e4m3fn))
        s = torch.empty(R // br, C // bc, device=x.device, dtype=torch.uint8 if fmt == "mxfp8" else torch.float32)
    TR = max(br, 16)
    TC = max(bc, 4096 // TR)  # a tile of 4096 elements, or one 128 x 128 block
    m_bits, emin, fmax = FP8.get(fmt, FP8["e4m3"])
    grid = (triton.cdiv(R, TR), triton.cdiv(C, TC))
    s_g = s_gr = s_gc = 0  # g's strides (nvfp4 only): one (2,) for all blocks, or a pair per block row / column
    if g is not None:
        g = g.view(2, 1, 1) if g.dim() == 1 else g  # (2, R/br or 1, C/bc or 1)
        s_g, s_gr, s_gc = g.stride(0), *(st if n > 1 else 0 for n, st in zip(g.shape[1:], g.stride()[1:]))
    _quantize_blocks_kernel[grid](x, g if g is not None else x, q, s, R, C, x.stride(0), x.stride(1), s_g, s_gr, s_gc,
                                  seed if seed is not None else 0, FMT=fmt, M_BITS=m_bits, EMIN=emin, FMAX=fmax,
                                  BR=br, BC=bc, TR=TR, TC=TC, SR=seed is not None,
                                  **(dict(num_warps=8) if TR * TC > 4096 and gpu_tiles(x) else {}))  # 128 x 128
    return q, s


if triton is not None:

    @triton.jit
    def _uniform_kernel(out_ptr, n, seed, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + i, tl.rand(seed, i), mask=i < n)


def uniform(seed, R, C, device="cpu"):
    """The uniform [0, 1) numbers (R, C) that stochastic rounding with this seed draws: Triton's
    Philox, tl.rand(seed, r * C + c), where Triton runs; torch.rand from a generator seeded so
    elsewhere (the same distribution, other numbers)."""
    out = torch.empty(R, C, device=device)
    if not use_triton(out):
        return torch.rand(R, C, generator=torch.Generator(device).manual_seed(seed), device=device)
    _uniform_kernel[(triton.cdiv(R * C, 1024),)](out, R * C, seed, BLOCK=1024)
    return out


# -----------------------------------------------------------------------------
# the public quantizers


class AmaxHistory:
    """Delayed scaling's state for one tensor: the amaxes of its last `length` quantizations
    (TransformerEngine keeps 1024). The scale of a quantization comes from the largest of them;
    the first one, with an empty history, uses its own amax. parts: one history for each of that
    many tensors, updated together (lowprec's grouped GEMMs: one per expert)."""

    def __init__(self, length=1024, device=None, parts=None):
        self.amax = torch.zeros(length, *([parts] if parts else []), device=device)  # (length,) or (length, parts)

    def update(self, amax):
        """The amax to scale by now, then record this quantization's amax: 0-d, or (parts,)."""
        past = self.amax.max(0).values
        self.amax = torch.roll(self.amax, 1, 0)
        self.amax[0] = amax
        return torch.where(past > 0, past, amax)


def quantize_fp8(x, recipe="tensorwise", fmt="e4m3", history=None, block=(1, 128), amax=None):
    """FP8 quantization of x (R, C), fp32 or bf16, with blocks along the last dim:
    recipe "tensorwise" (current scaling: scale = fmax / amax of x), "delayed" (scale from the
    AmaxHistory `history`, which it updates), or "blockwise" (a scale per `block`: (1, 128) for
    activations and gradients, (128, 128) for weights). fmt "e4m3" (max 448) or "e5m2" (max 57344).
    amax: what the scale comes from instead of x's amax (and the history), one per row (R, 1) or
    per column (1, C): lowprec's grouped GEMMs give each expert's rows (or token columns) their own.
    Returns a QTensor: codes (R, C) in torch's float8 dtype, fp32 decode scales (1 / scale)."""
    assert x.dim() == 2 and fmt in FP8, (x.shape, fmt)
    fmax = FP8[fmt][2]
    if recipe == "blockwise":
        q, s = _quantize_blocks(pad_to_blocks(x, block), fmt, block)
        return QTensor(q, s, fmt, block, tuple(x.shape))
    if amax is None:
        amax = x.abs().amax().float()
        if recipe == "delayed":
            amax = history.update(amax)
        else:
            assert recipe == "tensorwise", recipe
    scale = fp8_scale(amax.view(1, 1) if amax.dim() == 0 else amax, fmax)  # (1, 1), (R, 1) or (1, C)
    block = (x.size(0) // scale.size(0), x.size(1) // scale.size(1))  # (R, C), (1, C) or (R, 1)
    return QTensor(_quantize_tensor(x, scale, fmt), 1.0 / scale, fmt, block, tuple(x.shape))


def quantize_mxfp8(x):
    """MXFP8 of x (R, C): E4M3 codes, one E8M0 scale (a power of two, stored as its biased
    exponent, uint8) per 32 elements along the last dim. Returns a QTensor."""
    assert x.dim() == 2, x.shape
    q, s = _quantize_blocks(pad_to_blocks(x, (1, 32)), "mxfp8", (1, 32))
    return QTensor(q, s, "mxfp8", (1, 32), tuple(x.shape))


def quantize_nvfp4(x, tile=(1, 16), stochastic=False, generator=None, amax=None):
    """NVFP4 of x (R, C): E2M1 codes two per byte (element 2i in the low nibble), an E4M3 scale per
    tile along the last dim ((1, 16) activations and gradients, (16, 16) weights: W and W^T then
    quantize alike) and an fp32 tensor scale from the global amax. stochastic: round each element
    up or down at random, unbiased (gradients), with the uniform numbers of a seed drawn from
    generator (torch's default one if None: a run's RNG state makes it reproducible).
    amax: what the tensor scale comes from instead of x's amax, one per row (R, 1) or per column
    (1, C), alike within a tile: lowprec's grouped GEMMs give each expert's rows (or token columns)
    their own. Returns a QTensor."""
    assert x.dim() == 2 and tile in ((1, 16), (16, 16)), (x.shape, tile)
    xp = pad_to_blocks(x, tile)
    if amax is None:
        g = nvfp4_global(x.abs().amax().float()).view(2, 1, 1)
    else:  # a tensor scale per part: per row (R, 1) or per column (1, C), whole tiles, so one per tile
        g = nvfp4_global(amax.float())[:, ::tile[0], ::tile[1]]  # (2, R/br or 1, C/bc or 1)
    seed = int(torch.randint(0, 2 ** 31 - 1, (), generator=generator)) if stochastic else None
    q, s = _quantize_blocks(xp, "nvfp4", tile, g, seed)
    return QTensor(q, s, "nvfp4", tile, tuple(x.shape), tensor_scale=g[1])


def hadamard16(signs):
    """The 16x16 random Hadamard transform H16 diag(signs) / 4 (Sylvester's H16, signs (16,) of
    +-1): orthogonal, so it cancels out of a product of two transformed operands."""
    H = torch.ones(1, 1)
    for _ in range(4):
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)  # Sylvester: H_2n = [[H, H], [H, -H]]
    return H * signs.float()[None, :] / 4


def rht(x, H):
    """x (R, C) with each run of 16 elements along the last dim transformed by H (C padded to 16)."""
    x = pad_to_blocks(x, (1, 16))
    R, C = x.shape
    return (x.float().reshape(R, C // 16, 16) @ H.T).view(R, C)  # from (R, C/16, 16)
