"""
Triton kernels (triton_ops.py, expert_gemm.py) against the PyTorch references: the chunked SSD (outputs, final state
and the gradients of every input) against mamba.ssd_ref, the SSD state update over k tokens
against ssd_step run k times, the conv update against a full causal conv, a Mamba-2 mixer training
and decoding with the kernels against the same mixer without them, speculative decoding through
the k-token kernels; and the MoE grouped GEMM, forward and backward, against moe.grouped_mm_ref,
with the experts running on it against the per-expert loop.

Run: python -m pytest -q tests/test_triton_ops.py
Without a GPU the kernels run in the Triton interpreter, which must be switched on before triton
compiles anything: the outer test re-runs this file in a subprocess with TRITON_INTERPRET=1 (the
variable would otherwise send every other test file's CPU decoding through the interpreter too).
Tolerance: fp32 on both sides. The decode kernels run the same operations in the same order up to
the sum over the state (atol 1e-5). The chunked SSD sums in a different order (and its gradients
through longer chains), so it is compared relative to each tensor's largest entry: 1e-4 with exact
fp32 dots, which the kernels use wherever torch's fp32 matmuls do (triton_ops.dot_kind: TF32 only
with torch.backends.cuda.matmul.allow_tf32, off by default, so on a GPU too). The tests marked
tf32 turn it on, as train.py does, and hold the kernels to TF32_TOL: on a GPU the dots run in TF32,
in the interpreter their operands are truncated to TF32 first, so a tolerance that a GPU would break
breaks here. bf16 inputs are compared after the same rounding, with bf16's 2^-8 relative step where
a result is stored in bf16. The grouped GEMM's tolerances are stated at its tests.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
import triton_ops
from helpers import assert_close
from generate import MambaCache
from mamba import Mamba2Mixer, ssd_ref, ssd_step
from model import Nemotron, NemotronConfig
from moe import Experts, experts_loop, grouped_mm_ref, grouped_mm_triton

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


SSD_TOL = 1e-4
# TF32 keeps 10 mantissa bits (2^-11 relative rounding per operand, 2^-10 truncated); the SSD's
# outputs and gradients sum many such products along chains of decays: up to 1.5e-3 of each
# tensor's largest entry in test_ssd_with_tf32_dots (the interpreter's emulation), so 1e-2
TF32_TOL = 1e-2


@pytest.fixture
def tf32():
    """torch.backends.cuda.matmul.allow_tf32 on for one test (train.py's setting), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def ssd_case(Bsz, T, H, P, G, N, docs=False, dtype=torch.float32, seed=0):
    """Inputs of the chunked SSD, all requiring grad; with docs, document ids whose boundaries fall
    inside a chunk, on a chunk edge (t = 16) and around a one-token document (t = 17)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    case = dict(x=r(Bsz, T, H, P).to(dtype), dt=torch.rand(Bsz, T, H, generator=g) * 0.5 + 0.05,
                A=-torch.rand(H, generator=g) * 2 - 0.1, B=r(Bsz, T, G, N).to(dtype),
                C=r(Bsz, T, G, N).to(dtype), D=r(H), initial_state=r(Bsz, H, P, N))
    case = {k: v.to(DEV).requires_grad_() for k, v in case.items()}
    seq_idx = None
    if docs:
        edges = torch.tensor([5, 16, 17, 30, 150])  # every row starts documents at these positions
        seq_idx = (torch.arange(T)[:, None] >= edges).sum(1).expand(Bsz, T).clone()
        seq_idx[1:, :12] = 0  # the other rows start their second document later
        seq_idx = seq_idx.to(DEV)
    return case, seq_idx


def ssd_grads(fn, case, seq_idx, chunk_size, with_D, with_init):
    """y, final state, and the gradients of sum(y * gy) + sum(final * gh) for every input."""
    a = {k: v.detach().clone().requires_grad_() for k, v in case.items()}
    y, h = fn(a["x"], a["dt"], a["A"], a["B"], a["C"], chunk_size, D=a["D"] if with_D else None,
              initial_state=a["initial_state"] if with_init else None, seq_idx=seq_idx)
    g = torch.Generator().manual_seed(7)
    # bf16-exact upstream gradients: the kernel's bf16 y hands back a bf16 gradient, unrounded so
    gy = torch.randn(y.shape, generator=g).to(DEV).bfloat16().float()
    gh = torch.randn(h.shape, generator=g).to(DEV)
    ((y.float() * gy).sum() + (h * gh).sum()).backward()
    used = [k for k in a if (k != "D" or with_D) and (k != "initial_state" or with_init)]
    return y.float(), h, {k: a[k].grad.float() for k in used}


def compare_ssd(case, seq_idx, chunk_size, with_D=True, with_init=True, rel=SSD_TOL):
    out = ssd_grads(triton_ops.ssd, case, seq_idx, chunk_size, with_D, with_init)
    ref = ssd_grads(ssd_ref, case, seq_idx, chunk_size, with_D, with_init)
    for name, a, b in [("y", out[0], ref[0]), ("final state", out[1], ref[1]),
                       *[(f"d{k}", out[2][k], ref[2][k]) for k in ref[2]]]:
        tol = rel * b.abs().max().item()
        assert_close(a, b, name, atol=tol, rtol=rel)


@inside
@pytest.mark.parametrize("Bsz,T,H,P,G,N,Q,with_D,with_init,docs", [
    (2, 40, 4, 8, 2, 16, 16, True, True, False),    # T not a multiple of the chunk, 2 groups
    (2, 32, 2, 16, 1, 16, 16, False, False, False),  # whole chunks, no D, no initial state
    (1, 24, 4, 8, 4, 8, 16, True, True, False),     # a group per head, N below the tile
    (2, 40, 4, 8, 2, 16, 16, True, True, True),     # packed documents
    (1, 200, 2, 16, 1, 16, 128, True, True, True),  # two tiles per chunk, documents across them
    (2, 20, 2, 8, 1, 16, 8, True, False, False),    # chunk_size 8: the kernels round it up to 16
])
def test_ssd_matches_reference(Bsz, T, H, P, G, N, Q, with_D, with_init, docs):
    case, seq_idx = ssd_case(Bsz, T, H, P, G, N, docs=docs)
    compare_ssd(case, seq_idx, Q, with_D, with_init)


@inside
def test_ssd_with_gpu_tiling(monkeypatch):
    """The GPU's tiling run in the interpreter: blocks of 16 positions in chunks of 64 (several per
    chunk, tiles of CB above the diagonal never computed), tiles of 16 of a state of 40 (three, the
    last partial), for every kernel, with documents."""
    monkeypatch.setattr(triton_ops, "ssd_tiles", lambda x: {k: (16, 16, None, None) for k in triton_ops.SSD_TILES})
    case, seq_idx = ssd_case(2, 150, 4, 16, 2, 40, docs=True)
    compare_ssd(case, seq_idx, 64)


@inside
def test_ssd_with_tf32_dots(tf32):
    """With TF32 dots (train.py's setting) the SSD stays within TF32_TOL of the exact reference, and
    the dots are TF32's (the error is above exact fp32's, 1e-5): in the interpreter their operands
    are truncated to TF32, as a GPU reads them."""
    case, seq_idx = ssd_case(2, 150, 4, 16, 2, 40, docs=True)
    assert triton_ops.dot_kind(case["x"]) == ("tf32" if DEV == "cuda" else "tf32-emulated")
    compare_ssd(case, seq_idx, 64, rel=TF32_TOL)
    y = ssd_grads(triton_ops.ssd, case, seq_idx, 64, True, True)[0]
    ref = ssd_grads(ssd_ref, case, seq_idx, 64, True, True)[0]
    assert (y - ref).abs().max() > 1e-5 * ref.abs().max(), "TF32 made no difference: are the dots TF32?"


@inside
def test_ssd_bf16_inputs():
    """bf16 x, B, C: fp32 states and sums, y and dx, dB, dC rounded to bf16 once at the end."""
    case, seq_idx = ssd_case(2, 40, 4, 16, 2, 16, docs=True, dtype=torch.bfloat16)
    compare_ssd(case, seq_idx, 16, rel=max(SSD_TOL, 2 ** -7))


@inside
def test_mixer_trains_the_same_with_kernels():
    """Forward and backward of a Mamba-2 mixer on packed documents, through mamba.ssd's switch."""
    cfg = NemotronConfig(d_model=32, mamba_heads=4, mamba_head_dim=8, d_state=16, mamba_groups=2, chunk_size=16)
    torch.manual_seed(0)
    mixer = Mamba2Mixer(cfg).to(DEV)
    for p in mixer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    u = torch.randn(2, 37, 32, device=DEV)
    seq_idx = (torch.arange(37, device=DEV) >= 20).long().expand(2, 37)
    outs = {}
    for use in (False, True):
        triton_ops.USE_TRITON = use
        mixer.zero_grad()
        y = mixer(u, seq_idx=seq_idx)
        y.square().sum().backward()
        outs[use] = [y.detach()] + [p.grad.clone() for p in mixer.parameters()]
    triton_ops.USE_TRITON = True
    names = ["y"] + [n for n, _ in mixer.named_parameters()]
    for name, a, b in zip(names, outs[True], outs[False]):
        assert_close(a, b, name, atol=SSD_TOL * b.abs().max().item(), rtol=SSD_TOL)


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
    y, hs = triton_ops.ssd_update(h, x, dt, A, B, C, D, save_states=True)
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
    y, _ = triton_ops.ssd_update(h, x, dt, A, B, C, D)
    ref_h = h0.clone()
    for t in range(2):
        ref_y, ref_h = ssd_step(ref_h, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
    assert_close(y[:, -1], ref_y, "y", atol=1e-4, rtol=1e-5)
    assert_close(h, ref_h, "state", atol=1e-4, rtol=1e-5)


def gpu_with(free_gb):
    return torch.cuda.is_available() and torch.cuda.mem_get_info()[0] > free_gb * 2 ** 30


@pytest.mark.skipif(not gpu_with(12), reason="a GPU with 12 GB free (the state alone is 8 GB)")
def test_ssd_update_past_2_31_elements():
    """A state of more than 2^31 elements (B H P N = 2^31 + 2^17): the last batch row's offsets pass
    int32, which the kernel computes in int64. Its update equals ssd_step's on that row."""
    H, P, N = 8, 64, 128
    Bsz = 2 ** 31 // (H * P * N) + 2
    h = torch.zeros(Bsz, H, P, N, device="cuda")
    h[-1] = torch.randn(H, P, N, device="cuda")
    x, B, C = (torch.randn(Bsz, 1, *s, device="cuda") for s in ((H, P), (1, N), (1, N)))
    dt, A = torch.rand(Bsz, 1, H, device="cuda") * 0.5, -torch.rand(H, device="cuda")
    ref_y, ref_h = ssd_step(h[-1:].clone(), x[-1:, 0], dt[-1:, 0], A, B[-1:, 0], C[-1:, 0], None)
    y, _ = triton_ops.ssd_update(h, x, dt, A, B, C)
    assert_close(y[-1:, 0], ref_y, "y of the last row", atol=1e-5, rtol=1e-5)
    assert_close(h[-1:], ref_h, "state of the last row", atol=1e-5, rtol=1e-5)


@inside
@pytest.mark.parametrize("T,Cn,KW", [(1, 40, 4), (3, 33, 4), (8, 16, 4), (2, 8, 2)])
def test_conv_update_matches_full_conv(T, Cn, KW):
    g = torch.Generator().manual_seed(1)
    state, x = torch.randn(2, Cn, KW - 1, generator=g), torch.randn(2, T, Cn, generator=g)
    w, b = torch.randn(Cn, 1, KW, generator=g), torch.randn(Cn, generator=g)
    state, x, w, b = (t.to(DEV) for t in (state, x, w, b))
    out, new_state = triton_ops.conv_update(state, x, w, b)
    seq = torch.cat([state, x.transpose(1, 2)], dim=-1)  # (B, C, K-1+T)
    ref = F.silu(F.conv1d(seq, w, b, groups=Cn)).transpose(1, 2)  # (B, T, C)
    assert_close(out, ref, "conv out", atol=1e-5, rtol=1e-5)
    assert torch.equal(new_state, seq[:, :, -(KW - 1):])


@inside
def test_mixer_decodes_the_same_with_kernels():
    cfg = NemotronConfig(d_model=32, mamba_heads=4, mamba_head_dim=8, d_state=16, mamba_groups=2, chunk_size=8)
    torch.manual_seed(0)
    mixer = Mamba2Mixer(cfg).to(DEV)
    for p in mixer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    u = torch.randn(2, 12, 32, device=DEV)
    outs = {}
    for use in (False, True):
        triton_ops.USE_TRITON = use
        cache = MambaCache.empty(mixer, 2, DEV, torch.float32)
        with torch.no_grad():
            first = mixer(u[:, :5], cache)  # prefill: the chunked SSD hands over its state
            steps = [mixer(u[:, t:t + 1], cache) for t in range(5, 12)]
        outs[use] = (torch.cat([first, *steps], dim=1), cache.ssm.clone(), cache.conv.clone())
    triton_ops.USE_TRITON = True
    for i, name in enumerate(("outputs", "ssm state", "conv state")):
        assert_close(outs[True][i], outs[False][i], name, atol=1e-5, rtol=1e-5)


@inside
def test_speculative_decoding_with_kernels_matches_plain_greedy():
    """The verification forward through the k-token kernels (conv and SSD states saved per token)
    rolls back as the reference does: speculative greedy output == plain greedy output."""
    cfg = NemotronConfig(d_model=32, pattern="M*E", n_head=2, n_kv_head=1, head_dim=16, mamba_heads=2,
                         mamba_head_dim=16, d_state=16, n_experts=4, moe_d_ff=16, shared_d_ff=16, chunk_size=16,
                         mtp_depth=1, mtp_share=True)
    torch.manual_seed(0)
    model = Nemotron(cfg).to(DEV).eval()
    with torch.no_grad():  # a head choosing between two tokens, so that some drafts are kept
        v = torch.randn(32, device=DEV)
        model.lm_head.weight.mul_(0.01)
        model.lm_head.weight[1], model.lm_head.weight[2] = v, -v
    prompt = torch.randint(0, 256, (1, 7), device=DEV)
    triton_ops.USE_TRITON = True
    plain = model.generate(prompt, 12, temperature=0)
    assert torch.equal(model.generate(prompt, 12, temperature=0, speculative=3), plain)
    triton_ops.USE_TRITON = False
    assert torch.equal(model.generate(prompt, 12, temperature=0, speculative=3), plain)
    triton_ops.USE_TRITON = True
# -----------------------------------------------------------------------------
# MoE grouped GEMM


@inside
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_matches_ref(dtype):
    """Experts with 0, 1, 16 and 37 rows (tiles of 16 rows in the interpreter), K and n not
    multiples of the tiles, w a transposed view as moe.py passes it. The reference runs in fp32 on
    the same (rounded) inputs. fp32: atol 1e-4 (the TF32 of tl.dot on a GPU: 5e-2); bf16: the
    kernel rounds (the interpreter truncates) its bf16 output once, 2e-2 relative (exact fp32 dots:
    the TF32 policy; test_grouped_mm_with_tf32_dots has TF32's)."""
    g = torch.Generator().manual_seed(0)
    counts = [5, 0, 37, 16, 0, 1]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).to(DEV)
    x = torch.randn(sum(counts), 48, generator=g).to(DEV, dtype).requires_grad_()
    w = torch.randn(6, 40, 48, generator=g).to(DEV, dtype).transpose(1, 2).detach().requires_grad_()  # (E, K, n)
    dy = torch.randn(sum(counts), 40, generator=g).to(DEV, dtype)
    y = grouped_mm_triton(x, w, offs)
    y.backward(dy)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = grouped_mm_ref(x32, w32, offs)
    ref.backward(dy.float())
    assert y.dtype == dtype
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4)
    assert_close(y.float(), ref, "y", **tol)
    assert_close(x.grad.float(), x32.grad, "dx", **tol)
    assert_close(w.grad.float(), w32.grad, "dw", **tol)
    assert w.grad[[1, 4]].abs().sum() == 0  # experts without rows


@inside
def test_experts_on_the_kernel_match_the_loop():
    """moe.Experts through moe.grouped_mm_triton (the switch on) == experts_loop, fp32, with two
    experts idle: outputs and gradients of x, weights, up_proj, down_proj (atol 1e-4)."""
    g = torch.Generator().manual_seed(0)
    M, E, k, l, F_ = 24, 6, 2, 32, 16
    experts = Experts(E, l, F_).to(DEV)
    with torch.no_grad():
        experts.up_proj.normal_(0, 0.3, generator=g)
        experts.down_proj.normal_(0, 0.3, generator=g)
    idx = torch.rand(M, 4, generator=g).argsort(-1)[:, :k].to(DEV)  # experts 4 and 5 idle
    x, weights = torch.randn(M, l, generator=g).to(DEV), torch.rand(M, k, generator=g).to(DEV)
    assert triton_ops.use_triton(x)
    loop = lambda x, w, i: experts_loop(x, w, i, experts.up_proj, experts.down_proj)
    res = []
    for fn in (experts, loop):
        experts.zero_grad(set_to_none=True)
        x_, w_ = x.clone().requires_grad_(), weights.clone().requires_grad_()
        y = fn(x_, w_, idx)
        y.square().sum().backward()
        res.append([y, x_.grad, w_.grad, experts.up_proj.grad, experts.down_proj.grad])
    for name, a, b in zip(["y", "dx", "dweights", "dup_proj", "ddown_proj"], *res):
        assert_close(a, b, name, atol=1e-4, rtol=1e-4)


@inside
def test_grouped_mm_with_tf32_dots(tf32):
    """TF32 dots (operands with 10 mantissa bits) in the grouped GEMM of fp32 inputs: each output
    within the worst case of truncating both operands, 2^-9 of sum_k |x_k w_k|, and not exact."""
    g = torch.Generator().manual_seed(1)
    counts = [7, 0, 33]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).to(DEV)
    x = torch.randn(sum(counts), 64, generator=g).to(DEV)
    w = torch.randn(3, 64, 48, generator=g).to(DEV)
    assert triton_ops.dot_kind(x) == ("tf32" if DEV == "cuda" else "tf32-emulated")
    y, ref = grouped_mm_triton(x, w, offs), grouped_mm_ref(x, w, offs)
    bound = grouped_mm_ref(x.abs(), w.abs(), offs) * 2 ** -9 + 1e-6  # each operand off by < 2^-10 of itself
    assert ((y - ref).abs() <= bound).all(), ((y - ref).abs() / bound).max()
    assert (y - ref).abs().max() > 1e-6, "TF32 made no difference: are the dots TF32?"
