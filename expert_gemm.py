"""
expert_gemm.py: the MoE experts' grouped GEMM as Triton kernels, all experts in one launch, forward and
backward. moe.GroupedMM is their autograd Function (moe.grouped_mm_triton), moe.grouped_mm_ref the
PyTorch reference. Read after moe.py and triton_ops.py, whose switch (use_triton) and dot helpers it
shares.

The token copies arrive sorted by expert: rows offs[g-1]:offs[g] of x belong to expert g
(offs[-1] = number of rows). y = x @ w[g] on each expert's rows, with a dropless row count per
expert that only the GPU knows: the grid is sized by an upper bound, sum_g cdiv(n_g, BLOCK_M)
<= cdiv(N, BLOCK_M) + E, and each program finds its expert from offs, so nothing waits on the
host. The backward: dx = dy @ w[g]^T is the same kernel on the transposed weights;
dw[g] = x_g^T dy_g sums over the expert's rows, a second kernel with one program per tile of dw.
"""
import torch

from triton_ops import dot_kind, gpu_tiles, triton

if triton is not None:
    import triton.language as tl

    from triton_ops import tf32  # an fp32 operand rounded as TF32's tensor cores read it

    @triton.jit
    def _dot_acc(a, b, acc, DOT: tl.constexpr):
        # acc + a @ b with the operands as triton_ops' _dot takes them (bf16 inputs stay bf16 for "bf16")
        if DOT == "bf16":
            out = tl.dot(a, b, acc)
        elif DOT == "tf32-emulated":
            out = tl.dot(tf32(a.to(tl.float32)), tf32(b.to(tl.float32)), acc, input_precision="ieee")
        else:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT)
        return out

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


def _grouped_mm_dw(x, dy, offs):
    (Nr, K), N, E = x.shape, dy.shape[1], offs.shape[0]
    assert dy.shape[0] == Nr and x.dtype == dy.dtype
    dw = x.new_empty(E, K, N)
    cfg = _gemm_config(x, dw=True)
    grid = (E, triton.cdiv(K, cfg["BLOCK_K"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _grouped_mm_dw_kernel[grid](x, dy, offs, dw, K, N,
                                x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
                                dw.stride(0), dw.stride(1), dw.stride(2),
                                DOT=dot_kind(x), **cfg)
    return dw


def grouped_mm_nograd(a, b, offs):
    """moe.mm_by_groups's two forms on the kernels, without autograd (moe.GroupedMM's and lowprec's):
    a (N, K) @ b (E, K, n) -> (N, n), rows grouped by offs; or a (K, N) @ b (N, n) -> (E, K, n),
    the summed dimension N grouped by offs."""
    return _grouped_mm_fwd(a, b, offs) if b.dim() == 3 else _grouped_mm_dw(a.t(), b, offs)
