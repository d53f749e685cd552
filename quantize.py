"""
quantize.py: the FP8, MXFP8 and NVFP4 quantizers, each a Triton kernel beside the PyTorch reference it
must match bit for bit: the formats, QTensor, delayed scaling's AmaxHistory, the random Hadamard
transform. Read after triton_ops.py, whose switch (USE_TRITON, use_triton) they obey; lowprec.py holds
the training recipe that calls them (the low-precision Linear and expert GEMMs, and which layers get
them) and imports this file; nothing here imports it.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from triton_ops import gpu_tiles, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch references serve wherever Triton cannot
    triton = None

# -----------------------------------------------------------------------------
# the formats
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
