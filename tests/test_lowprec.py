"""
Low-precision training (issue 8): the FP8 / MXFP8 / NVFP4 quantizers of quantize.py against
independent references, the Triton quantize kernels against the PyTorch references bit for bit;
the recipe of lowprec.py: the low-precision Linear against a plain fp32 Linear (every format and
FP8 recipe), delayed scaling's history, the routed experts' low-precision grouped GEMM against a
per-expert loop of the Linear and against the fp32 grouped GEMM, the recipes' layer plans, and
train.py --precision=... (and --fp8_recipe=...) end to end.

Run: python -m pytest -q tests/test_lowprec.py     (2-3 minutes on the loaded 2-core CPU it was written on)
The kernel tests (test_kernel_*) need the Triton interpreter, which must be on before triton
compiles anything: test_kernels_in_interpreter re-runs them in a subprocess with TRITON_INTERPRET=1,
as tests/test_triton_ops.py does.

Tolerances: every quantizer comparison is exact (codes and scales bit for bit, values with
torch.equal). The Linear's outputs and gradients are compared with an fp32 nn.Linear by the
relative Frobenius error ||a - b|| / ||b||, measured on this test's data (2026-11-29): FP8 E4M3 and
MXFP8 0.036-0.038, NVFP4 0.14-0.17; the bounds are 0.06 and 0.25. The same bounds hold the experts'
LowPrecGroupedMM against the fp32 grouped GEMM (measured 2026-12: FP8 tensorwise/blockwise and
MXFP8 0.033-0.038, NVFP4 0.14-0.17).
"""
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import lowprec
import quantize
import triton_ops
from helpers import assert_close, run_script
from lowprec import LowPrecGroupedMM
from model import Nemotron, NemotronConfig
from moe import grouped_mm_ref

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
kernel_test = pytest.mark.skipif(not (INTERP or torch.cuda.is_available()) or triton_ops.triton is None,
                                 reason="runs in the interpreter subprocess of test_kernels_in_interpreter")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_in_interpreter():
    if INTERP or triton_ops.triton is None:
        pytest.skip("already in the interpreter, or no triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "kernel_",
                           __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int32)


def assert_same_bits(a, b, name):
    """Bit for bit, but a NaN only as a NaN: its sign bit is whatever the arithmetic that made it left
    (x86 makes -NaN of inf * 0, a GPU +NaN), and any NaN code decodes to NaN."""
    assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
    nan_a, nan_b = (t.float().isnan() if t.is_floating_point() else torch.zeros(t.shape, dtype=torch.bool)
                    for t in (a, b))
    assert torch.equal(nan_a, nan_b), f"{name}: NaN in {int(nan_a.sum())} entries against {int(nan_b.sum())}"
    diff = ((bits(a) != bits(b)) & ~nan_a).sum().item()
    assert diff == 0, f"{name}: {diff} of {a.numel()} entries differ"


# -----------------------------------------------------------------------------
# formats against independent references


def fp8_probe(fmt):
    """Every finite value of the format, the midpoints between neighbours (exact ties), points a
    quarter of the way between them, values past the largest, and fp32 subnormals."""
    values = torch.arange(256, dtype=torch.uint8).view(quantize.TORCH_FP8[fmt]).float()
    values = values[values.isfinite()].unique()  # sorted
    mids = (values[1:] + values[:-1]) / 2
    quarter = values[:-1] + (values[1:] - values[:-1]) / 4
    fmax = quantize.FP8[fmt][2]
    return torch.cat([values, mids, quarter, torch.tensor([fmax * 1.04, fmax * 2, -fmax * 3, 1e30, 1e-40, -1e-42])])


def e2m1_probe():
    g = torch.Generator().manual_seed(0)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    near = torch.cat([ties.nextafter(torch.zeros(())), ties.nextafter(torch.full((), 9.0))])
    grid = torch.tensor(quantize.E2M1_VALUES)
    v = torch.cat([ties, near, grid, torch.tensor([6.5, 7.0, 100.0, 1e-30]), torch.rand(4000, generator=g) * 7])
    return torch.cat([v, -v])


def test_e2m1_rounding_matches_ml_dtypes():
    """Ties to even (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4), saturation at 6."""
    import ml_dtypes
    v = e2m1_probe()
    ref = torch.from_numpy(v.numpy().astype(ml_dtypes.float4_e2m1fn).astype(np.float32))
    assert torch.equal(quantize.round_ref(v, "e2m1"), ref)
    assert quantize.round_ref(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]), "e2m1").tolist() == \
        [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_fp8_rounding_matches_ml_dtypes():
    """round_ref's FP8 (torch's cast after the clamp that saturates) against ml_dtypes' casts."""
    import ml_dtypes
    for fmt, np_fmt in (("e4m3", ml_dtypes.float8_e4m3fn), ("e5m2", ml_dtypes.float8_e5m2)):
        v = fp8_probe(fmt)
        fmax = quantize.FP8[fmt][2]
        ref = torch.from_numpy(v.clamp(-fmax, fmax).numpy().astype(np_fmt).astype(np.float32))
        assert torch.equal(quantize.round_ref(v, fmt), ref), fmt


def test_stochastic_rounding_is_unbiased():
    """Each value goes to one of its two E2M1 neighbours; over 20000 draws the mean error is within
    4 standard errors of 0, for values across every spacing and sign."""
    g = torch.Generator().manual_seed(0)
    v = torch.tensor([0.1, 0.3, 0.7, 1.2, 1.9, 2.2, 2.9, 3.3, 4.5, 5.9, -0.4, -2.6, -5.0, 6.0, 0.0])
    draws = 20000
    rand = torch.rand(draws, len(v), generator=g)
    r = quantize.round_sr_ref(v.expand(draws, -1), rand)  # (draws, len(v))
    values = torch.tensor(quantize.E2M1_VALUES)
    assert torch.isin(r.abs(), values).all()
    lo = values[(values[None, :] <= v.abs()[:, None]).sum(1) - 1]  # the neighbour below |v|
    assert ((r.abs() - lo).abs() <= 2.0 + 1e-6).all() and (r.abs() >= lo - 1e-6).all()
    err = r - v
    se = err.std(0) / draws ** 0.5
    assert (err.mean(0).abs() <= 4 * se + 1e-7).all(), (err.mean(0), se)
    assert torch.equal(quantize.round_sr_ref(values, torch.rand(8, generator=g)), values)  # exact stays exact


def test_rht_is_orthogonal():
    signs = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(3)) * 2 - 1
    H = quantize.hadamard16(signs)
    assert_close(H @ H.T, torch.eye(16), "H H^T", atol=1e-6)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 40, generator=g), torch.randn(7, 40, generator=g)  # 40 tokens: padded to 48
    assert_close(quantize.rht(a, H) @ quantize.rht(b, H).T, a @ b.T, "wgrad through the RHT", atol=1e-5)


def test_nvfp4_numerics_by_hand():
    """An outlier sets S_enc = 2688 / 2688 = 1; a block of amax 6 gets s_b = 1, so its values are
    quantized as they are (the ties round to even); a block of amax 3 gets s_b = 0.5; a zero
    block stays zero; two codes per byte, element 2i in the low nibble."""
    x = torch.zeros(1, 64)
    x[0, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -6.0, 0, 0, 0, 0, 0])
    x[0, 16:20] = torch.tensor([3.0, 1.0, 0.3, -1.5])
    x[0, 48] = 2688.0
    q = quantize.quantize_nvfp4(x)
    assert q.tensor_scale.item() == 1.0
    assert q.scale.float().tolist() == [[1.0, 0.5, 0.0, 448.0]]
    d = q.dequantize()
    assert d[0, :11].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0, -1.0, -6.0]
    assert d[0, 16:20].tolist() == [3.0, 1.0, 0.25, -1.5]
    assert torch.equal(d[0, 32:48], torch.zeros(16)) and d[0, 48].item() == 2688.0
    assert q.data[0, 0].item() == 0x20 and q.data[0, 3].item() == 0x76  # (0, 1.0): codes 0, 2; (4.0, 6.0): 6, 7
    assert torch.equal(quantize.quantize_nvfp4(torch.zeros(3, 16)).dequantize(), torch.zeros(3, 16))


def test_mxfp8_scale_is_rounded_up():
    """The E8M0 scale is the smallest power of two >= block amax * fl32(1/448) (2^-127 at least), and
    the block's values are its E4M3 codes times it."""
    g = torch.Generator().manual_seed(0)
    amax = torch.cat([torch.tensor([448.0, 448.0 * 2, 447.0, 1.0, 1e-38, 3e38]), torch.rand(1000, generator=g) * 1e4])
    x = torch.zeros(len(amax), 32)
    x[:, 5] = amax
    q = quantize.quantize_mxfp8(x)
    scale = quantize.pow2(q.scale.int() - 127)[:, 0]
    target = amax * quantize.fl32(1 / 448)
    assert (scale >= target).all() and ((scale / 2 < target) | (scale == 2.0 ** -127)).all()  # E8M0's smallest
    assert torch.equal(q.dequantize()[:, 5], quantize.round_ref(amax / scale, "e4m3") * scale)


def test_fp8_recipes():
    """Tensorwise: scale 448 / amax, codes equal to torch's cast of x * scale. Delayed: the first
    call uses its own amax, later ones the largest in the history. Blockwise: one scale per block."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 300, generator=g)
    q = quantize.quantize_fp8(x, "tensorwise", "e4m3")
    scale = torch.tensor(448.0) / x.abs().amax()
    assert_same_bits(q.data, (x * scale).to(torch.float8_e4m3fn), "tensorwise codes")
    assert q.scale.item() == (1 / scale).item()
    hist = quantize.AmaxHistory(length=4)
    quantize.quantize_fp8(x * 10, "delayed", "e5m2", history=hist)
    q2 = quantize.quantize_fp8(x, "delayed", "e5m2", history=hist)
    assert q2.scale.item() == (1 / (torch.tensor(57344.0) / (x * 10).abs().amax())).item()
    assert hist.amax[:2].tolist() == [x.abs().amax().item(), (x * 10).abs().amax().item()]
    for block in ((1, 128), (128, 128)):
        qb = quantize.quantize_fp8(x, "blockwise", "e4m3", block=block)
        assert qb.scale.shape == (-(-40 // block[0]), 3) and qb.dequantize().shape == x.shape
        assert_close(qb.dequantize(), x, f"blockwise {block}", atol=1e-4, rtol=2 ** -4)


@pytest.mark.parametrize("quantize", [
    lambda x: quantize.quantize_fp8(x, "tensorwise", "e4m3"),
    lambda x: quantize.quantize_fp8(x, "blockwise", "e5m2"),
    lambda x: quantize.quantize_mxfp8(x),
    lambda x: quantize.quantize_nvfp4(x, (16, 16)),
], ids=["fp8", "fp8-block", "mxfp8", "nvfp4"])
def test_bf16_inputs_quantize_like_their_fp32_values(quantize):
    x = torch.randn(33, 70, generator=torch.Generator().manual_seed(1)).bfloat16()
    a, b = quantize(x), quantize(x.float())
    assert_same_bits(a.data, b.data, "codes")
    assert torch.equal(a.dequantize(), b.dequantize())


# -----------------------------------------------------------------------------
# the Triton kernels (interpreter on CPU): bit for bit against the references


def probe_matrix(R, C, dtype, seed=0):
    """Random rows spanning 12 decades, an outlier, an all-zero corner, a row of tiny (subnormal)
    values, and a row of exact E2M1 ties in a block of amax 6 under a tensor amax of 2688."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, C, generator=g) * torch.logspace(-6, 6, C)[torch.randperm(C, generator=g)]
    x = x / x.abs().amax() * 1000.0
    x[:16, :32] = 0.0
    x[1, 40:] = 1e-39 if dtype == torch.float32 else 1e-37  # footgun: the interpreter misreads bf16 subnormals
    x[2, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0,
                              -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, -6])
    x[3, 5] = 2688.0  # the tensor's amax: S_enc = 1, and the tie row's s_b = 1
    return x.to(dtype).to(DEV)


FORMATS = [("e4m3", (1, 128)), ("e5m2", (1, 128)), ("e4m3", (128, 128)), ("mxfp8", (1, 32)),
           ("nvfp4", (1, 16)), ("nvfp4", (16, 16))]


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,block", FORMATS)
def test_kernel_blocks_match_reference(fmt, block, dtype):
    """Rows and columns that are not multiples of the block (padded), the transposed view (read
    through its strides), NaN and inf in some blocks, and for NVFP4 stochastic rounding with the
    kernel's own random numbers (tl.rand, through quantize.uniform)."""
    # (150, 200): padded to the blocks; the transposed view of a (160, 256) matrix: read through strides
    for name, t in (("x", probe_matrix(150, 200, dtype)), ("x^T", probe_matrix(160, 256, dtype).t())):
        g = quantize.nvfp4_global(t.abs().amax().float()) if fmt == "nvfp4" else None
        t = t.clone()
        t[3, 5], t[40, 70], t[41, 150] = float("nan"), float("inf"), -float("inf")  # a block each
        tp = quantize.pad_to_blocks(t, block)
        for seed in ([None, 1234] if fmt == "nvfp4" else [None]):
            q, s = quantize._quantize_blocks(tp, fmt, block, g, seed)
            rand = None if seed is None else quantize.uniform(seed, *tp.shape, device=DEV)
            q_ref, s_ref = quantize.quantize_blocks_ref(tp, fmt, block, g, rand)
            what = f"{fmt} {block} {dtype} {name}{' SR' if seed is not None else ''}"
            assert_same_bits(q, q_ref, what + " codes")
            assert_same_bits(s, s_ref, what + " scales")


def test_kernel_and_reference_per_part_tensor_scales():
    """quantize_fp8 / quantize_nvfp4 with amax given per row or per column (lowprec's experts, each
    with its own tensor scale) == each part quantized on its own, bit for bit after dequantizing:
    parts of rows 0:10, 10:30, 30:48 and of columns 0:16, 16:48, 48:64 (whole NVFP4 tiles), scaled
    1, 100 and 1e-3 apart. Runs the references here and the kernels in the interpreter subprocess."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 64, generator=g)
    for dim, cuts in ((0, (0, 10, 30, 48)), (1, (0, 16, 48, 64))):
        parts = [slice(a, b) for a, b in zip(cuts, cuts[1:])]
        y = x.clone()
        for part, scale in zip(parts, (1.0, 100.0, 1e-3)):
            (y[part] if dim == 0 else y[:, part]).mul_(scale)
        y = y.to(DEV)
        amax = torch.zeros_like(y[:, :1] if dim == 0 else y[:1])  # (48, 1) or (1, 64)
        pieces = [y[part] if dim == 0 else y[:, part] for part in parts]
        for part, piece in zip(parts, pieces):
            (amax[part] if dim == 0 else amax[:, part]).fill_(piece.abs().max().item())
        for name, fn in (("fp8", lambda t, a=None: quantize.quantize_fp8(t, amax=a)),
                         ("nvfp4", lambda t, a=None: quantize.quantize_nvfp4(t, amax=a))):
            ours = fn(y, amax).dequantize()
            alone = torch.cat([fn(piece).dequantize() for piece in pieces], dim)
            assert torch.equal(ours, alone), (name, dim, (ours - alone).abs().max())


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.mem_get_info()[0] > 10 * 2 ** 30),
                    reason="a GPU with 10 GB free")
def test_quantize_transposed_view_past_2_31_elements():
    """x^T of a (2^20, 2^11 + 128) bf16 matrix, as the backward quantizes it: column offsets times
    the row stride pass 2^31, which the kernel computes in int64. The last rows of codes and scales
    equal the reference's on a copy of those rows."""
    x = torch.randn(2 ** 20, 2 ** 11 + 128, device="cuda", dtype=torch.bfloat16)
    q, s = quantize._quantize_blocks(x.t(), "e4m3", (1, 128))
    tail = x.t()[-4:].contiguous()  # the last 4 rows of x^T: 2^20 columns each
    q_ref, s_ref = quantize.quantize_blocks_ref(tail, "e4m3", (1, 128))
    assert_same_bits(q[-4:], q_ref, "codes of the last rows")
    assert_same_bits(s[-4:], s_ref, "scales of the last rows")


@kernel_test
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_kernel_fp8_cast_equals_torch_cast(fmt):
    """The kernel's own rounding (_round_rne) at scale 1 against torch's float8 cast of the value
    clamped to the format's range: every value, every tie, saturation, subnormals, and NaN kept as
    NaN, infinities saturated (a GPU's min would drop the NaN and store the largest value)."""
    v = torch.cat([fp8_probe(fmt), torch.tensor([float("nan"), float("inf"), -float("inf")])]).to(DEV)
    fmax = quantize.FP8[fmt][2]
    q = quantize._quantize_tensor(v, torch.ones((), device=DEV), fmt)
    assert_same_bits(q, v.clamp(-fmax, fmax).to(quantize.TORCH_FP8[fmt]), fmt)


@kernel_test
def test_kernel_e2m1_rounding_equals_reference():
    """_round_rne on E2M1 (the spacing trick) against round_ref's count of midpoints, through NVFP4
    with S_enc = 1 and every block's amax 6 (so s_b = 1: the values are rounded as they are)."""
    v = e2m1_probe()
    v = v[v.abs() <= 6.0]
    v = v[: len(v) // 15 * 15].view(-1, 15)
    x = torch.cat([v, torch.full((len(v), 1), 6.0)], dim=1)  # (n, 16): amax 6 in every block
    x[0, 0] = 2688.0  # the tensor amax: S_enc = 1 (that block's own values get another scale)
    q = quantize.quantize_nvfp4(x.to(DEV))
    assert torch.equal(q.dequantize()[1:].cpu(), quantize.round_ref(x[1:], "e2m1"))


@kernel_test
def test_kernel_public_quantizers_match_reference_path():
    x = probe_matrix(70, 90, torch.float32)
    for fn in (lambda t: quantize.quantize_fp8(t, "tensorwise", "e5m2"), quantize.quantize_mxfp8,
               lambda t: quantize.quantize_nvfp4(t, (16, 16))):
        a = fn(x)
        triton_ops.USE_TRITON = False
        b = fn(x)
        triton_ops.USE_TRITON = True
        assert_same_bits(a.data, b.data, "codes")
        assert torch.equal(a.dequantize(), b.dequantize())


# -----------------------------------------------------------------------------
# the low-precision Linear


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# relative Frobenius error of each format's GEMMs against fp32: (floor, bound). The floor is what the
# format's rounding cannot avoid (measured 2026-12 on the inputs of the two tests below: fp8 and mxfp8
# 0.033-0.038, nvfp4 0.14-0.18), far above what a path that silently fell back to bf16 gives (0.003) or, for nvfp4, to
# fp8: a test that only bounded the error from above would pass such a fallback
ERROR = {"fp8": (0.02, 0.06), "mxfp8": (0.02, 0.06), "nvfp4": (0.08, 0.25)}


@pytest.mark.parametrize("fmt,fp8_recipe", [("fp8", "tensorwise"), ("fp8", "delayed"), ("fp8", "blockwise"),
                                            ("mxfp8", None), ("nvfp4", None)])
def test_lowprec_linear_close_to_fp32_linear(fmt, fp8_recipe):
    """y, dx and dw of a LowPrecLinear (M = 148 tokens, K = 72, N = 580: not multiples of the
    blocks) against an fp32 nn.Linear with the same weights; relative Frobenius error between the
    format's floor and bound (ERROR). Delayed scaling first runs a step on inputs and gradients 3x
    larger, so its scales are stale."""
    g = torch.Generator().manual_seed(0)
    ref = torch.nn.Linear(72, 580, bias=False)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(580, 72, generator=g) * 0.05)
    x = torch.randn(4, 37, 72, generator=g)
    dy = torch.randn(4, 37, 580, generator=g)
    recipe = lowprec.Recipe(fmt, fp8_recipe or "tensorwise", H=quantize.hadamard16(torch.ones(16)))
    lp = torch.nn.Linear(72, 580, bias=False)
    lp.load_state_dict(ref.state_dict())
    lp.__class__, lp.recipe = lowprec.LowPrecLinear, recipe
    if fp8_recipe == "delayed":
        lp((x * 3).requires_grad_()).backward(dy * 3)
        assert len(recipe.history) == 6  # x, W for fprop; dY, W^T for dgrad; dY^T, X^T for wgrad
        lp.weight.grad = None
    outs = []
    for m in (lp, ref):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(dy)
        outs.append((y, xi.grad, m.weight.grad))
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = outs
    assert y.dtype == dx.dtype == dw.dtype == torch.float32  # fp32 master weights, activations in x's dtype
    assert torch.equal(y, y.bfloat16().float()) and torch.equal(dx, dx.bfloat16().float())  # bf16 outputs
    floor, bound = ERROR[fmt]
    for name, a, b in (("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)):
        assert floor <= rel_err(a, b) <= bound, (fmt, name, rel_err(a, b))


def test_nvfp4_ablations_change_the_backward_only():
    """Each NVFP4 ablation changes exactly the GEMMs its technique touches, with the same random
    numbers for stochastic rounding on both sides (seeded before each backward):
    - no RHT (the transform is applied to the wgrad GEMM's inputs only): y and dx equal, dw differs;
    - no SR (stochastic rounding of the gradients, which the dgrad and wgrad GEMMs read): y equal,
      dx and dw differ;
    - 1x16 weight tiles instead of 16x16 (the weights, which fprop and dgrad read): y and dx
      differ, dw equal (wgrad reads no weights)."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(48, 64, generator=g) * 0.05
    x0, dy = torch.randn(40, 64, generator=g), torch.randn(40, 48, generator=g)
    H = quantize.hadamard16(torch.ones(16))

    def run(**kw):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = lowprec.LowPrecLinearFn.apply(x, w, lowprec.Recipe("nvfp4", H=H, **kw))
        torch.manual_seed(7)  # stochastic rounding draws from the global generator
        y.backward(dy)
        return y, x.grad, w.grad

    base = run()
    for kw, changed in ((dict(rht=False), {"dw"}), (dict(sr=False), {"dx", "dw"}), (dict(w2d=False), {"y", "dx"})):
        for name, a, b in zip(("y", "dx", "dw"), run(**kw), base):
            assert torch.equal(a, b) == (name not in changed), (kw, name)


def test_delayed_scaling_scales_by_earlier_amaxes():
    """Step 1 on 5x and step 2 on 1x the inputs and gradients: step 1 has an empty history and
    scales as current scaling; step 2's x and dY operands are scaled by 448 / (the amax of step 1),
    not by their own amax (the factor 5 is not a power of two, so the codes differ), and its y and
    dx equal that computed by hand."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g) * 0.1
    x, dy = torch.randn(40, 64, generator=g), torch.randn(40, 24, generator=g)
    delayed, current = lowprec.Recipe("fp8", "delayed"), lowprec.Recipe("fp8")

    def step(recipe, s):
        xi, wi = (x * s).requires_grad_(), w.clone().requires_grad_()
        y = lowprec.LowPrecLinearFn.apply(xi, wi, recipe)
        y.backward(dy * s)
        return y, xi.grad

    assert all(torch.equal(a, b) for a, b in zip(step(delayed, 5.0), step(current, 5.0)))
    y, dx = step(delayed, 1.0)
    assert quantize.AmaxHistory().amax.numel() == 1024  # the history length, as TransformerEngine
    assert delayed.history[("xw", 0)].amax[:3].tolist() == [x.abs().amax().item(), (5 * x).abs().amax().item(), 0.0]

    def by_hand(t, amax):  # fp8 E4M3 at the encode scale 448 / amax, decoded
        s = torch.tensor(448.0) / amax
        return (t * s).to(torch.float8_e4m3fn).float() * (1 / s)

    wq = by_hand(w, w.abs().amax())
    assert_close(y, (by_hand(x, 5 * x.abs().amax()) @ wq.t()).bfloat16().float(), "delayed y", atol=1e-6, rtol=2 ** -8)
    assert_close(dx, (by_hand(dy, 5 * dy.abs().amax()) @ wq).bfloat16().float(), "delayed dx", atol=1e-6, rtol=2 ** -8)
    y_now, dx_now = step(current, 1.0)
    assert rel_err(y, y_now) > 1e-3 and rel_err(dx, dx_now) > 1e-3  # not what current scaling gives


# -----------------------------------------------------------------------------
# the routed experts' low-precision grouped GEMM (lowprec.LowPrecGroupedMM)

GROUPED_RECIPES = [("fp8", "tensorwise"), ("fp8", "delayed"), ("fp8", "blockwise"), ("mxfp8", None),
                   ("nvfp4", None), ("nvfp4-no-rht", None)]


def grouped_inputs(seed=0):
    """5 experts getting 0, 21, 16, 40 and 5 token copies (an idle expert, counts that are not
    multiples of 16); K = 40, n = 24."""
    g = torch.Generator().manual_seed(seed)
    counts = [0, 21, 16, 40, 5]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x, dy = torch.randn(sum(counts), 40, generator=g), torch.randn(sum(counts), 24, generator=g)
    return counts, offs, x, torch.randn(5, 24, 40, generator=g) * 0.1, dy


def make_recipe(fmt, fp8_recipe):
    return lowprec.Recipe(fmt.split("-")[0], fp8_recipe or "tensorwise", rht="no-rht" not in fmt,
                          H=quantize.hadamard16(torch.tensor([1, -1] * 8)))


def grads(fn, x, w, dy, seed):
    """fn(x, w) and the gradients of x and w for the incoming gradient dy; stochastic rounding
    draws from the global generator, seeded here."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w)
    torch.manual_seed(seed)
    y.backward(dy)
    return y, x.grad, w.grad


@pytest.mark.parametrize("fmt,fp8_recipe", GROUPED_RECIPES, ids=["-".join(filter(None, r)) for r in GROUPED_RECIPES])
def test_grouped_mm_equals_per_expert_linear(fmt, fp8_recipe):
    """LowPrecGroupedMM == a loop of LowPrecLinearFn, one Linear (and one recipe, with its own amax
    histories) per expert: y, dx and dw, over two steps (5x and 1x the inputs, so delayed scaling
    reads its history). Per-expert quantization and zero-padding of each expert's tokens to the
    NVFP4/RHT blocks are the same on both sides (NVFP4 rounds to nearest here: stochastic rounding
    draws one seed per GEMM operand, the loop one per expert; test_grouped_mm_close_to_high_precision
    has it on); only the fp32 summation order of the grouped GEMM may differ: y and dx within one
    bf16 ulp (rtol 2^-7) in at most 1% of the entries, dw within 1e-5 or 1e-6 of its largest entry
    (measured 2026-12: bit for bit equal on this CPU, every recipe; 9e-5 of 660 at most in the
    Triton interpreter, whose tl.dot sums in another order)."""
    counts, offs, x, w, dy = grouped_inputs()
    grouped_recipe, loop_recipes = make_recipe(fmt, fp8_recipe), [make_recipe(fmt, fp8_recipe) for _ in counts]
    for recipe in [grouped_recipe, *loop_recipes]:
        recipe.sr = False

    for s, seed in ((5.0, 1), (1.0, 2)):
        ours = grads(lambda x, w: LowPrecGroupedMM.apply(x, w, offs, grouped_recipe, "up_proj"), x * s, w, dy * s, seed)
        ref = per_expert_grads(loop_recipes, counts, x * s, w, dy * s, seed)
        for name, a, b in zip(("y", "dx"), ours, ref):  # bf16 values: at most one ulp apart, in few entries
            what = f"{fmt} {fp8_recipe} x{s} {name}"
            assert_close(a, b, what, atol=0.0, rtol=2 ** -7)
            assert (a != b).float().mean() <= 0.01, what
        scale = ref[2].abs().max().item()  # fp32 summation order (Triton's tl.dot in the interpreter)
        assert_close(ours[2], ref[2], f"{fmt} {fp8_recipe} x{s} dw", atol=1e-6 * scale, rtol=1e-5)
        assert torch.equal(ours[2][0], torch.zeros(24, 40))  # the idle expert


def per_expert_grads(recipes, counts, x, w, dy, seed):
    """y, dx, dw of a loop over experts of LowPrecLinearFn, each expert's forward and backward in
    turn."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    ys = [lowprec.LowPrecLinearFn.apply(xg, w[e], recipes[e]) if len(xg) else None
          for e, xg in enumerate(x.split(counts))]
    torch.manual_seed(seed)
    for y, dyg in zip(ys, dy.split(counts)):
        if y is not None:
            y.backward(dyg)
    return torch.cat([y for y in ys if y is not None]).detach(), x.grad, w.grad


@pytest.mark.parametrize("fmt,fp8_recipe", [("fp8", "tensorwise"), ("fp8", "blockwise"), ("mxfp8", None),
                                            ("nvfp4", None)])
def test_grouped_mm_close_to_high_precision(fmt, fp8_recipe):
    """y, dx and dw of LowPrecGroupedMM against the fp32 grouped GEMM (moe.grouped_mm_ref) on the
    same operands: relative Frobenius error between the floor and bound of the Linear's test."""
    counts, offs, x, w, dy = grouped_inputs(seed=3)
    recipe = make_recipe(fmt, fp8_recipe)
    ours = grads(lambda x, w: LowPrecGroupedMM.apply(x, w, offs, recipe, "up_proj"), x, w, dy, 0)
    ref = grads(lambda x, w: grouped_mm_ref(x, w.transpose(1, 2), offs), x, w, dy, 0)
    floor, bound = ERROR[fmt]
    for name, a, b in zip(("y", "dx", "dw"), ours, ref):
        assert floor <= rel_err(a, b) <= bound, (fmt, name, rel_err(a, b))


def test_scaled_mm_agrees_with_the_emulation():
    """torch._scaled_mm (the FP8 tensor-core path, which also runs on a CPU for per-tensor scales)
    on the codes and decode scales == dequantize + fp32 matmul, to fp32 summation order."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 64, generator=g), torch.randn(48, 64, generator=g) * 3
    qa, qb = quantize.quantize_fp8(a, fmt="e4m3"), quantize.quantize_fp8(b, fmt="e5m2")
    out = torch._scaled_mm(qa.data, qb.data.t(), qa.scale.view(()), qb.scale.view(()), out_dtype=torch.float32)
    assert_close(out, qa.dequantize() @ qb.dequantize().t(), "scaled_mm", atol=1e-4, rtol=1e-5)


CFG = NemotronConfig(vocab_size=256, d_model=32, pattern="M*M-ME", n_head=2, n_kv_head=1, head_dim=16, d_ff=64,
                     mamba_heads=2, mamba_head_dim=32, d_state=16, chunk_size=16, n_experts=4, moe_d_ff=32,
                     shared_d_ff=32, moe_latent_size=16)


def test_amax_state_round_trip_with_experts():
    """Delayed scaling's histories of a model with routed experts through amax_state and
    load_amax_state: the experts' activations and gradients keep one (length, E) history per
    operand, their weights one per expert; a checkpoint written when every expert had its own
    history ("up_proj/2/gx/0") loads into the stacked ones."""
    torch.manual_seed(0)
    model = Nemotron(dataclasses.replace(CFG, pattern="MEM*ME"))
    lowprec.apply_precision(model, "fp8", fp8_recipe="delayed")
    idx = torch.randint(0, 256, (2, 40))
    model(idx, idx)[1].backward()
    state = lowprec.amax_state(model)
    experts = "backbone.layers.1.mixer.experts"
    assert state[f"{experts}|up_proj/gx/0"].shape == (1024, 4) and state[f"{experts}|up_proj/gx/0"][0].gt(0).any()
    assert state[f"{experts}|up_proj/2/xw/1"].shape == (1024,)
    old = {k: v for k, v in state.items() if not k.startswith(experts) or k.count("/") == 3}
    for k, v in state.items():
        if k.startswith(experts) and k.count("/") == 2:  # the old layout: one history per expert
            name, (proj, kinds, i) = k.split("|")[0], k.split("|")[1].split("/")
            old.update({f"{name}|{proj}/{e}/{kinds}/{i}": v[:, e] for e in range(v.size(1))})
    for saved in (state, old):
        fresh = Nemotron(dataclasses.replace(CFG, pattern="MEM*ME"))
        lowprec.apply_precision(fresh, "fp8", fp8_recipe="delayed")
        lowprec.load_amax_state(fresh, saved)
        loaded = lowprec.amax_state(fresh)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_precision_plans():
    model = Nemotron(CFG)
    fp8 = lowprec.precision_plan(model, "fp8")
    assert {n.split(".")[2] for n in fp8} == {"1", "2", "3", "4"}  # the first and last blocks in BF16
    all_blocks = lowprec.precision_plan(model, "fp8", bf16_ends=False)
    assert len(all_blocks) == len(fp8) + 2 + 5  # M: 2, E: shared 2 + latent 2 + experts
    nv = lowprec.precision_plan(model, "nvfp4")
    assert nv == {"backbone.layers.0.mixer.in_proj": "nvfp4", "backbone.layers.0.mixer.out_proj": "mxfp8",
                  "backbone.layers.2.mixer.in_proj": "nvfp4", "backbone.layers.2.mixer.out_proj": "mxfp8",
                  "backbone.layers.3.mixer.up_proj": "nvfp4", "backbone.layers.3.mixer.down_proj": "nvfp4",
                  "backbone.layers.4.mixer.in_proj": "nvfp4", "backbone.layers.4.mixer.out_proj": "mxfp8"}
    moe = Nemotron(dataclasses.replace(CFG, pattern="MEM*MM"))  # the MoE block early: in NVFP4
    assert {n: f for n, f in lowprec.precision_plan(moe, "nvfp4").items() if ".1." in n} == {
        "backbone.layers.1.mixer.experts": "nvfp4", "backbone.layers.1.mixer.shared_experts.up_proj": "nvfp4",
        "backbone.layers.1.mixer.shared_experts.down_proj": "nvfp4"}  # not the latent projections, nor the router


def test_apply_precision_keeps_state_dict_and_trains():
    torch.manual_seed(0)
    model = Nemotron(CFG)
    keys = list(model.state_dict())
    idx = torch.randint(0, 256, (2, 40))
    _, loss_ref = model(idx, idx)
    lowprec.apply_precision(model, "nvfp4")
    assert list(model.state_dict()) == keys
    assert isinstance(model.backbone.layers[0].mixer.in_proj, lowprec.LowPrecLinear)
    assert type(model.backbone.layers[1].mixer.q_proj) is torch.nn.Linear
    _, loss = model(idx, idx)
    loss.backward()
    assert abs(loss.item() - loss_ref.item()) < 0.05 * loss_ref.item()
    assert all(p.grad is not None and p.grad.isfinite().all() for n, p in model.named_parameters()
               if "layers.0" in n and p.requires_grad)


def test_moe_model_trains_in_nvfp4():
    """A tiny MoE model ("ME*-": the MoE block is not in the last 15%) under nvfp4: the routed
    experts are in the plan and run LowPrecGroupedMM, the state_dict keys do not change, and 12
    AdamW steps on one batch bring the loss down."""
    torch.manual_seed(0)
    model = Nemotron(dataclasses.replace(CFG, pattern="ME*-", moe_latent_size=None))
    keys = list(model.state_dict())
    plan = lowprec.apply_precision(model, "nvfp4")
    experts = model.backbone.layers[1].mixer.experts
    assert plan["backbone.layers.1.mixer.experts"] == "nvfp4" and experts.recipe.fmt == "nvfp4"
    assert experts.lowprec_grouped_mm == LowPrecGroupedMM.apply  # what Experts.forward calls
    assert list(model.state_dict()) == keys
    idx = torch.randint(0, 256, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        _, loss = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        assert experts.up_proj.grad.isfinite().all() and experts.up_proj.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_model_files_do_not_import_lowprec():
    """lowprec.py imports moe.py, quantize.py and triton_ops.py, never the reverse (moe.Experts is handed
    its low-precision grouped GEMM by apply_precision): importing the model leaves lowprec unloaded."""
    code = "import sys, model, moe, quantize, triton_ops; assert 'lowprec' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# -----------------------------------------------------------------------------
# train.py end to end

TINY = ['--d_model=32', '--pattern=M*-E', '--n_head=2', '--n_kv_head=1', '--head_dim=16', '--d_ff=64',
        '--mamba_heads=2', '--mamba_head_dim=32', '--d_state=16', '--chunk_size=16', '--n_experts=4', '--top_k=2',
        '--moe_d_ff=32', '--shared_d_ff=32', '--block_size=32', '--batch_size=4', '--eval_iters=1',
        '--log_interval=1', '--sample_new_tokens=0', '--device=cpu', '--dtype=float32', '--max_iters=2',
        '--eval_interval=2']


@pytest.mark.parametrize("flags", [["--precision=bf16"], ["--precision=fp8"], ["--precision=mxfp8"],
                                   ["--precision=nvfp4", "--nvfp4_rht=False", "--nvfp4_2d=False"],
                                   ["--precision=nvfp4", "--bf16_ends=False", "--nvfp4_sr=False"],
                                   ["--precision=nvfp4", "--pattern=ME*-"],
                                   ["--precision=fp8", "--fp8_recipe=delayed", "--bf16_ends=False"],
                                   ["--precision=fp8", "--fp8_recipe=blockwise"]])
def test_train_runs_each_precision(tmp_path, flags):
    """Every precision and fp8 recipe; the routed experts are converted where the plan reaches the
    MoE block (nvfp4 with it early, fp8 without bf16_ends)."""
    proc = run_script('train.py', f'--out_dir={tmp_path}', *TINY, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final val loss" in proc.stdout
    if flags[0] != "--precision=bf16":
        assert f"precision {flags[0].split('=')[1]}:" in proc.stdout
    if flags[1:2] in (["--pattern=ME*-"], ["--fp8_recipe=delayed"]):
        assert f"mixer.experts {flags[0].split('=')[1]}" in proc.stdout


def test_delayed_scaling_resumes_exactly(tmp_path):
    """fp8 delayed scaling keeps an amax history per operand (no parameter or buffer): the checkpoint
    carries them, so 3 steps, a checkpoint and 3 resumed steps end with the very weights of 6 straight
    steps (the experts' grouped GEMMs included: bf16_ends off). Without the histories the resumed
    steps would scale by their own amaxes at first, and the weights would differ."""
    flags = [*TINY, "--precision=fp8", "--fp8_recipe=delayed", "--bf16_ends=False", "--eval_interval=3"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    for out, more in ((straight, ["--max_iters=6"]), (split, ["--max_iters=3"]),
                      (split, ["--max_iters=6", "--init_from=resume"])):
        proc = run_script("train.py", f"--out_dir={out}", *flags, *more)
        assert proc.returncode == 0 and "starts afresh" not in proc.stdout, proc.stderr[-3000:]
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (straight, split))
    assert any(k.startswith("backbone.layers.3.mixer.experts|up_proj/") for k in a["amax"])
    assert a["amax"].keys() == b["amax"].keys() and all(torch.equal(a["amax"][k], b["amax"][k]) for k in a["amax"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize("flag,message",
                         [("--precision=fp4", "precision must be"),
                          ("--fp8_recipe=hybrid", "fp8_recipe must be 'tensorwise', 'delayed' or 'blockwise'")])
def test_train_rejects_bad_precision_flags(tmp_path, flag, message):
    proc = run_script('train.py', f'--out_dir={tmp_path}', *TINY, '--precision=fp8', flag)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
