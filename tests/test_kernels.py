"""
Triton decode kernels (kernels.py) against the PyTorch references of mamba.py: the SSD state
update over k tokens against ssd_step run k times, the conv update against a full causal conv, and
a Mamba-2 mixer decoding with the kernels against the same mixer without them. The MoE grouped
GEMM, forward and backward, against moe.grouped_mm_ref, and the experts running on it against
the per-expert loop.

Run: python -m pytest -q tests/test_kernels.py
Without a GPU the kernels run in the Triton interpreter, which must be switched on before triton
compiles anything: the outer test re-runs this file in a subprocess with TRITON_INTERPRET=1 (the
variable would otherwise send every other test file's CPU decoding through the interpreter too).
Tolerance: fp32 on both sides, the same operations in the same order up to the sum over the state
(atol 1e-5); bf16 inputs are compared after the same rounding.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
import kernels
from helpers import assert_close
from mamba import Mamba2Mixer, ssd_step
from model import NemotronConfig
from moe import Experts, experts_loop, grouped_mm_ref

INSIDE = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
inside = pytest.mark.skipif(not INSIDE, reason="runs in the interpreter subprocess of test_in_interpreter")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_in_interpreter():
    if INSIDE:
        pytest.skip("already in the interpreter (or on a GPU)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def inputs(Bsz, K, H, P, G, N, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    x, B, C = r(Bsz, K, H, P), r(Bsz, K, G, N), r(Bsz, K, G, N)
    dt = torch.rand(Bsz, K, H, generator=g) * 0.5
    A, D, h0 = -torch.rand(H, generator=g) * 4, r(H), r(Bsz, H, P, N)
    to = lambda t: t.to(DEV, dtype)
    return to(x), dt.to(DEV), A.to(DEV), to(B), to(C), D.to(DEV), h0.to(DEV)


@inside
@pytest.mark.parametrize("K,H,P,G,N", [(1, 4, 8, 1, 16), (3, 4, 12, 2, 10), (8, 2, 64, 1, 32)])
@pytest.mark.parametrize("with_D", [True, False])
def test_ssd_update_matches_steps(K, H, P, G, N, with_D):
    x, dt, A, B, C, D, h0 = inputs(2, K, H, P, G, N)
    D = D if with_D else None
    h = h0.clone()
    y, hs = kernels.ssd_update(h, x, dt, A, B, C, D, save_states=True)
    ref_h = h0.clone()
    for t in range(K):
        ref_y, ref_h = ssd_step(ref_h, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        assert_close(y[:, t], ref_y, f"y[{t}]", atol=1e-5, rtol=1e-5)
        assert_close(hs[:, t], ref_h, f"state after token {t}", atol=1e-5, rtol=1e-5)
    assert_close(h, ref_h, "final state, in place", atol=1e-5, rtol=1e-5)


@inside
def test_ssd_update_bf16_inputs():
    """bf16 x, B, C (the model's dtype on a GPU), fp32 state and output, as ssd_step computes them."""
    x, dt, A, B, C, D, h0 = inputs(2, 2, 4, 16, 2, 16, dtype=torch.bfloat16)
    h = h0.clone()
    y, _ = kernels.ssd_update(h, x, dt, A, B, C, D)
    ref_h = h0.clone()
    for t in range(2):
        ref_y, ref_h = ssd_step(ref_h, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
    assert_close(y[:, -1], ref_y, "y", atol=1e-4, rtol=1e-5)
    assert_close(h, ref_h, "state", atol=1e-4, rtol=1e-5)


@inside
@pytest.mark.parametrize("T,Cn,KW", [(1, 40, 4), (3, 33, 4), (8, 16, 4), (2, 8, 2)])
def test_conv_update_matches_full_conv(T, Cn, KW):
    g = torch.Generator().manual_seed(1)
    state, x = torch.randn(2, Cn, KW - 1, generator=g), torch.randn(2, T, Cn, generator=g)
    w, b = torch.randn(Cn, 1, KW, generator=g), torch.randn(Cn, generator=g)
    state, x, w, b = (t.to(DEV) for t in (state, x, w, b))
    out, new_state = kernels.conv_update(state, x, w, b)
    seq = torch.cat([state, x.transpose(1, 2)], dim=-1)  # (B, C, K-1+T)
    ref = F.silu(F.conv1d(seq, w, b, groups=Cn)).transpose(1, 2)  # (B, T, C)
    assert_close(out, ref, "conv out", atol=1e-5, rtol=1e-5)
    assert torch.equal(new_state, seq[:, :, -(KW - 1):])


@inside
def test_mixer_decodes_the_same_with_kernels():
    cfg = NemotronConfig(d_model=32, mamba_heads=4, headdim=8, d_state=16, n_groups=2, chunk_size=8)
    torch.manual_seed(0)
    mixer = Mamba2Mixer(cfg).to(DEV)
    for p in mixer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    u = torch.randn(2, 12, 32, device=DEV)
    outs = {}
    for use in (False, True):
        kernels.USE_TRITON = use
        cache = mixer.new_cache(2, DEV, torch.float32)
        with torch.no_grad():
            first = mixer(u[:, :5], cache)  # prefill: the chunked SSD hands over its state
            steps = [mixer(u[:, t:t + 1], cache) for t in range(5, 12)]
        outs[use] = (torch.cat([first, *steps], dim=1), cache["ssm"].clone(), cache["conv"].clone())
    kernels.USE_TRITON = True
    for i, name in enumerate(("outputs", "ssm state", "conv state")):
        assert_close(outs[True][i], outs[False][i], name, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# MoE grouped GEMM


@inside
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_matches_ref(dtype):
    """Experts with 0, 1, 16 and 37 rows (tiles of 16 rows in the interpreter), K and n not
    multiples of the tiles, w a transposed view as moe.py passes it. The reference runs in fp32 on
    the same (rounded) inputs. fp32: atol 1e-4 (the TF32 of tl.dot on a GPU: 5e-2); bf16: the
    kernel rounds (the interpreter truncates) its bf16 output once, 2e-2 relative."""
    g = torch.Generator().manual_seed(0)
    counts = [5, 0, 37, 16, 0, 1]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).to(DEV)
    x = torch.randn(sum(counts), 48, generator=g).to(DEV, dtype).requires_grad_()
    w = torch.randn(6, 40, 48, generator=g).to(DEV, dtype).transpose(1, 2).detach().requires_grad_()  # (E, K, n)
    dy = torch.randn(sum(counts), 40, generator=g).to(DEV, dtype)
    y = kernels.grouped_mm(x, w, offs)
    y.backward(dy)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = grouped_mm_ref(x32, w32, offs)
    ref.backward(dy.float())
    assert y.dtype == dtype
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=5e-2 if DEV == "cuda" else 1e-4)
    assert_close(y.float(), ref, "y", **tol)
    assert_close(x.grad.float(), x32.grad, "dx", **tol)
    assert_close(w.grad.float(), w32.grad, "dw", **tol)
    assert w.grad[[1, 4]].abs().sum() == 0  # experts without rows


@inside
def test_experts_on_the_kernel_match_the_loop():
    """moe.Experts through kernels.grouped_mm (the switch on) == experts_loop, fp32, with two
    experts idle: outputs and gradients of x, weights, up_proj, down_proj (atol 1e-4)."""
    g = torch.Generator().manual_seed(0)
    M, E, k, l, F_ = 24, 6, 2, 32, 16
    experts = Experts(E, l, F_).to(DEV)
    with torch.no_grad():
        experts.up_proj.normal_(0, 0.3, generator=g)
        experts.down_proj.normal_(0, 0.3, generator=g)
    idx = torch.rand(M, 4, generator=g).argsort(-1)[:, :k].to(DEV)  # experts 4 and 5 idle
    x, weights = torch.randn(M, l, generator=g).to(DEV), torch.rand(M, k, generator=g).to(DEV)
    assert kernels.use_triton(x)
    loop = lambda x, w, i: experts_loop(x, w, i, experts.up_proj, experts.down_proj)
    res = []
    for fn in (experts, loop):
        experts.zero_grad(set_to_none=True)
        x_, w_ = x.clone().requires_grad_(), weights.clone().requires_grad_()
        y = fn(x_, w_, idx)
        y.square().sum().backward()
        res.append([y, x_.grad, w_.grad, experts.up_proj.grad, experts.down_proj.grad])
    for name, a, b in zip(["y", "dx", "dweights", "dup_proj", "ddown_proj"], *res):
        assert_close(a, b, name, atol=5e-2 if DEV == "cuda" else 1e-4, rtol=1e-4)
