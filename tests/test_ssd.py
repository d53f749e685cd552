"""
Tests for the SSD maths of mamba.py: the chunked algorithm against the sequential recurrence
(outputs, final state and gradients), state hand-off across calls, segsum, the mixer's O(1)
step() against its forward(), and its clamp of dt to dt_limit (every path) against a hand-written mixer.

Run: python -m pytest -q tests/test_ssd.py

Precision: ssd_ref, ssd_step and ssd_scan_ref all upcast to fp32 (they call .float()), so the
comparisons are fp32 against fp32 with different summation orders. Inputs are O(1), T <= 64, so the
outputs agree to a few ulps of their magnitude times the number of terms summed: atol 2e-5 /
rtol 1e-4 for outputs and states. Gradients go through exp(segsum) and sums over every later
position, and their magnitudes reach ~10-100, so they get 10x looser: atol 2e-4 / rtol 1e-3.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from generate import MambaCache
from mamba import Mamba2Mixer, segsum, ssd_ref, ssd_scan_ref, ssd_step, ssd_steps
from model import Nemotron, NemotronConfig

OUT_TOL = dict(atol=2e-5, rtol=1e-4)
GRAD_TOL = dict(atol=2e-4, rtol=1e-3)


def make_inputs(T, G, with_init, with_D, seed, Bsz=2, H=4, P=3, N=5):
    """Random SSD inputs with decays spanning ~0.01 .. 1 per step, so both the intra-chunk decay
    and the carried state matter. Odd P and N catch reshapes that mix up dims."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return dict(
        x=r(Bsz, T, H, P),
        dt=F.softplus(r(Bsz, T, H) - 1.0),  # (0, ~3): dt is softplus'ed in the mixer
        A=-torch.exp(torch.rand(H, generator=g) * 1.5),  # [-4.5, -1]
        B=r(Bsz, T, G, N),
        C=r(Bsz, T, G, N),
        D=r(H) if with_D else None,
        initial_state=r(Bsz, H, P, N) if with_init else None,
    )


def leaves(inp):
    """Clones of the inputs that require grad (None stays None)."""
    return {k: None if v is None else v.clone().requires_grad_(True) for k, v in inp.items()}


# every chunk size x length x mamba_groups; the four (initial_state, D) combinations rotate through them
# so that each appears with every chunk size and every length (the full product costs 4x the time)
CASES = [(Q, T, G, *[(False, False), (True, True), (True, False), (False, True)][(i + j + G) % 4])
         for i, Q in enumerate([4, 8, 16, 64]) for j, T in enumerate([1, 7, 37, 64]) for G in (1, 2)]


@pytest.mark.parametrize("chunk_size,T,G,with_init,with_D", CASES)
def test_chunked_matches_scan(chunk_size, T, G, with_init, with_D):
    """ssd_ref == ssd_scan_ref: y, final state, and the gradients w.r.t. every input."""
    inp = make_inputs(T, G, with_init, with_D, seed=1000 * chunk_size + 10 * T + G)
    a, b = leaves(inp), leaves(inp)
    y1, h1 = ssd_ref(a["x"], a["dt"], a["A"], a["B"], a["C"], chunk_size, D=a["D"],
                         initial_state=a["initial_state"])
    y2, h2 = ssd_scan_ref(b["x"], b["dt"], b["A"], b["B"], b["C"], D=b["D"], initial_state=b["initial_state"])
    assert y1.shape == inp["x"].shape and h1.shape == h2.shape == (2, 4, 3, 5)
    assert_close(y1, y2, "y", **OUT_TOL)
    assert_close(h1, h2, "final state", **OUT_TOL)
    # a loss that weights every output and the final state differently
    g = torch.Generator().manual_seed(7)
    wy, wh = torch.randn(y1.shape, generator=g), torch.randn(h1.shape, generator=g)
    ((y1 * wy).sum() + (h1 * wh).sum()).backward()
    ((y2 * wy).sum() + (h2 * wh).sum()).backward()
    for k in a:
        if a[k] is not None:
            assert a[k].grad is not None, f"no gradient for {k}"
            assert_close(a[k].grad, b[k].grad, f"grad {k}", **GRAD_TOL)


def documents(Bsz, T, seed):
    """seq_idx (B, T) of packed documents: random boundaries, some inside chunks, some on chunk
    edges, a one-token document, and a row that is one single document."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(Bsz, T, generator=g) < 0.15
    starts[:, 0] = False
    starts[0, min(8, T - 1)] = T > 8  # a boundary exactly on a chunk edge (chunk sizes 4, 8)
    starts[-1] = False  # one document
    return starts.long().cumsum(1)


@pytest.mark.parametrize("chunk_size,T,G", [(4, 37, 2), (8, 64, 1), (16, 7, 1), (8, 50, 2)])
def test_chunked_matches_scan_with_documents(chunk_size, T, G):
    """seq_idx: the state restarts from zero at each document (the initial state belongs to the
    first); chunked == recurrence, outputs, final state and gradients."""
    inp = make_inputs(T, G, True, True, seed=T + G, Bsz=3)
    seq_idx = documents(3, T, seed=T)
    a, b = leaves(inp), leaves(inp)
    y1, h1 = ssd_ref(a["x"], a["dt"], a["A"], a["B"], a["C"], chunk_size, D=a["D"],
                         initial_state=a["initial_state"], seq_idx=seq_idx)
    y2, h2 = ssd_scan_ref(b["x"], b["dt"], b["A"], b["B"], b["C"], D=b["D"],
                          initial_state=b["initial_state"], seq_idx=seq_idx)
    assert_close(y1, y2, "y", **OUT_TOL)
    assert_close(h1, h2, "final state", **OUT_TOL)
    (y1.square().sum() + h1.sum()).backward()
    (y2.square().sum() + h2.sum()).backward()
    for k in a:
        assert_close(a[k].grad, b[k].grad, f"grad {k}", **GRAD_TOL)


def test_documents_are_independent():
    """A packed row gives each document exactly what it gets alone (the first one with the
    initial state, the others from zero): the recurrence reference, by construction of a reset."""
    inp = make_inputs(20, 2, True, True, seed=3, Bsz=1)
    seq_idx = torch.tensor([[0] * 6 + [1] * 9 + [2] * 5])
    y, _ = ssd_ref(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 4, D=inp["D"],
                       initial_state=inp["initial_state"], seq_idx=seq_idx)
    for lo, hi in [(0, 6), (6, 15), (15, 20)]:
        part = {k: v[:, lo:hi] if k in ("x", "dt", "B", "C") else v for k, v in inp.items()}
        alone, _ = ssd_ref(part["x"], part["dt"], part["A"], part["B"], part["C"], 4, D=part["D"],
                               initial_state=inp["initial_state"] if lo == 0 else None)
        assert_close(y[:, lo:hi], alone, f"document {lo}:{hi}", **OUT_TOL)


@pytest.mark.parametrize("chunk_size", [4, 16])
@pytest.mark.parametrize("T,split", [(37, 13), (37, 16), (20, 1), (9, 8)])
def test_state_handoff(chunk_size, T, split):
    """Running [0, split) and then [split, T) from the first half's final state == running [0, T)
    (split points inside and on chunk boundaries, and length-1 halves)."""
    inp = make_inputs(T, 2, with_init=True, with_D=True, seed=T + split)
    x, dt, A, B, C, D, h0 = (inp[k] for k in ("x", "dt", "A", "B", "C", "D", "initial_state"))
    y, h = ssd_ref(x, dt, A, B, C, chunk_size, D=D, initial_state=h0)
    s = slice(0, split), slice(split, T)
    ya, ha = ssd_ref(x[:, s[0]], dt[:, s[0]], A, B[:, s[0]], C[:, s[0]], chunk_size, D=D, initial_state=h0)
    yb, hb = ssd_ref(x[:, s[1]], dt[:, s[1]], A, B[:, s[1]], C[:, s[1]], chunk_size, D=D, initial_state=ha)
    assert_close(torch.cat([ya, yb], dim=1), y, "y split vs whole", **OUT_TOL)
    assert_close(hb, h, "final state split vs whole", **OUT_TOL)


def test_padding_leaves_state_unchanged():
    """dt = 0 steps (what ssd_ref pads with) neither decay nor feed the state."""
    inp = make_inputs(5, 1, with_init=True, with_D=False, seed=3)
    inp["dt"][:, 2:] = 0.0
    _, h_full = ssd_scan_ref(**inp)
    short = {k: (v[:, :2] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    _, h_short = ssd_scan_ref(**short)
    assert_close(h_full, h_short, "state after dt=0 steps", atol=0, rtol=0)


def test_segsum():
    """segsum(cumsum(x))[i, j] = x[j+1] + ... + x[i] below the diagonal, 0 on it, -inf above;
    so exp(segsum) is the decay from j to i, and it composes: s[i, k] = s[i, j] + s[j, k]."""
    torch.manual_seed(0)
    x = torch.randn(3, 9, dtype=torch.float64)
    s = segsum(x.cumsum(-1))
    assert s.shape == (3, 9, 9) and s.dtype == torch.float64
    cs = x.cumsum(-1)
    ref = cs[..., :, None] - cs[..., None, :]  # cs[i] - cs[j]
    lower = torch.ones(9, 9, dtype=torch.bool).tril()
    assert_close(s[..., lower], ref[..., lower], "segsum lower triangle", atol=1e-12)
    assert (s.diagonal(dim1=-2, dim2=-1) == 0).all()
    assert torch.isneginf(s[..., ~lower]).all()
    assert_close(s[:, 7, 2], s[:, 7, 4] + s[:, 4, 2], "segsum composes", atol=1e-12)
    # gradients are finite despite the -inf entries (exp(-inf) = 0 has zero derivative)
    xr = x.clone().requires_grad_(True)
    torch.exp(segsum(xr.cumsum(-1))).sum().backward()
    assert torch.isfinite(xr.grad).all()


# -----------------------------------------------------------------------------
# the mixer: O(1) step() == forward()


def make_mixer(G=2, K=4, chunk_size=8, seed=0, **cfg_kw):
    cfg = NemotronConfig(vocab_size=16, d_model=16, pattern="M", mamba_heads=4, mamba_head_dim=6, d_state=5,
                         mamba_groups=G, d_conv=K, chunk_size=chunk_size, init_std=0.2, **cfg_kw)
    torch.manual_seed(seed)
    mixer = Nemotron(cfg).backbone.layers[0].mixer
    assert isinstance(mixer, Mamba2Mixer)
    with torch.no_grad():  # make D, the gated norm and the conv bias matter
        mixer.D.normal_()
        mixer.norm.weight.add_(0.3 * torch.randn_like(mixer.norm.weight))
        mixer.conv1d.bias.normal_(0, 0.3)
    return mixer.eval()


@pytest.mark.parametrize("G,K", [(1, 4), (2, 4), (2, 2)])
def test_mixer_step_matches_forward(G, K):
    """Feeding tokens one at a time through step() with a cache == forward() over the sequence,
    and the cache then holds the same state as a prefill forward with a cache."""
    mixer = make_mixer(G=G, K=K)
    torch.manual_seed(1)
    u = torch.randn(2, 19, 16)  # 19: not a multiple of chunk_size 8
    with torch.no_grad():
        y_full = mixer(u)
        cache = MambaCache.empty(mixer, 2, u.device, u.dtype)
        y_step = torch.cat([mixer.step(u[:, t:t + 1], cache) for t in range(u.size(1))], dim=1)
        cache_pf = MambaCache.empty(mixer, 2, u.device, u.dtype)
        y_pf = mixer(u, cache_pf)
    # fp32 throughout, different summation order (recurrence vs chunked matmuls): outputs O(0.1-1)
    assert_close(y_step, y_full, "step vs forward", atol=1e-5, rtol=1e-4)
    assert_close(y_pf, y_full, "forward with cache vs without", atol=1e-6, rtol=1e-5)
    assert_close(cache.ssm, cache_pf.ssm, "ssm state step vs prefill", atol=1e-5, rtol=1e-4)
    # the same in_proj rows, computed as a (B, d) vs a (B, T, d) matmul: a few ulps apart
    assert_close(cache.conv, cache_pf.conv, "conv state step vs prefill", atol=1e-6, rtol=1e-6)
    assert cache.conv.numel() == 2 * mixer.conv_dim * (K - 1)  # the last K-1 conv inputs (any layout)


@pytest.mark.parametrize("pieces", [[2, 1, 1, 5, 1], [1, 1, 9, 3], [11, 1]])
def test_mixer_prefill_pieces(pieces):
    """A cache filled by forward() on pieces of any length (shorter than the conv window too),
    mixed with single steps, gives the whole-sequence forward."""
    mixer = make_mixer(G=2, K=4)
    torch.manual_seed(2)
    u = torch.randn(1, sum(pieces), 16)
    with torch.no_grad():
        y_full = mixer(u)
        cache = MambaCache.empty(mixer, 1, u.device, u.dtype)
        outs, t = [], 0
        for n in pieces:
            outs.append(mixer(u[:, t:t + n], cache))  # T == 1 goes through step()
            t += n
    assert_close(torch.cat(outs, dim=1), y_full, "pieces vs whole", atol=1e-5, rtol=1e-4)


def test_mixer_dt_limit():
    """dt is clamped to dt_limit in both paths: with a huge lower limit every dt equals it, which
    the step and the forward must agree on."""
    mixer = make_mixer()
    mixer.dt_limit = (0.5, 0.5)
    torch.manual_seed(3)
    u = torch.randn(1, 6, 16)
    with torch.no_grad():
        y_full = mixer(u)
        cache = MambaCache.empty(mixer, 1, u.device, u.dtype)
        y_step = torch.cat([mixer.step(u[:, t:t + 1], cache) for t in range(6)], dim=1)
    assert_close(y_step, y_full, "step vs forward at clamped dt", atol=1e-5, rtol=1e-4)
    assert math.isclose(mixer.dt_limit[0], 0.5)


def mixer_ref(mixer, u, dt_limit):
    """The mixer's output written out from its weights, the clamp of dt to dt_limit done by hand:
    in_proj, the causal depthwise conv from zeros, silu, dt = min(max(softplus(dt + dt_bias), lo), hi),
    then the sequential recurrence ssd_scan_ref, the gated norm and out_proj."""
    Bsz, T, _ = u.shape
    H, P, G, N = mixer.H, mixer.P, mixer.G, mixer.N
    z, xBC, dt = mixer.in_proj(u).split([mixer.d_inner, mixer.conv_dim, H], dim=-1)
    xBC = F.conv1d(F.pad(xBC.transpose(1, 2), (mixer.K - 1, 0)), mixer.conv1d.weight, mixer.conv1d.bias,
                   groups=mixer.conv_dim)
    x, B, C = F.silu(xBC).transpose(1, 2).split([mixer.d_inner, G * N, G * N], dim=-1)
    lo, hi = dt_limit
    dt = torch.minimum(torch.maximum(F.softplus(dt + mixer.dt_bias), torch.tensor(lo)), torch.tensor(hi))
    y, _ = ssd_scan_ref(x.reshape(Bsz, T, H, P), dt, -torch.exp(mixer.A_log), B.reshape(Bsz, T, G, N),
                        C.reshape(Bsz, T, G, N), D=mixer.D)
    return mixer.out_proj(mixer.norm(y.reshape(Bsz, T, mixer.d_inner), z))


def test_mixer_clamps_dt_at_both_ends():
    """dt_limit = (0.05, 1.5) with dt_bias -30 / +30 / 0 / 0.5 per head, so softplus gives dt ~1e-13
    (far below the limit), ~30 (far above) and values on both sides of it: forward() (no cache,
    and a prefill with a cache), step() one token at a time (ssd_steps, k = 1) and step() on 4-token
    chunks (cache.keep_states: speculative decoding's ssd_steps, k = 4) each equal mixer_ref, whose clamp
    is written out. fp32 throughout, chunked or stepped against the sequential recurrence, outputs
    O(0.1-1): atol 1e-5 / rtol 1e-4, as test_mixer_step_matches_forward; an unclamped dt moves the
    outputs by > 1e-2 at either end (asserted, so the test can tell)."""
    limit = (0.05, 1.5)
    mixer = make_mixer(dt_limit=limit)
    assert mixer.dt_limit == limit
    with torch.no_grad():
        mixer.dt_bias.copy_(torch.tensor([-30.0, 30.0, 0.0, 0.5]))
    torch.manual_seed(4)
    u = torch.randn(2, 19, 16)  # 19: not a multiple of chunk_size 8
    with torch.no_grad():
        raw = F.softplus(mixer.in_proj(u)[..., -4:] + mixer.dt_bias)  # (B, T, H): dt before the clamp
        assert raw.min() < limit[0] / 100 and raw.max() > 10 * limit[1]
        assert ((raw[..., 2:] < limit[0]) | (raw[..., 2:] > limit[1])).any()  # heads 2, 3 clamped at times
        ref = mixer_ref(mixer, u, limit)
        for lo_hi in [(0.0, limit[1]), (limit[0], float("inf"))]:  # one end unclamped: the test can see it
            assert (mixer_ref(mixer, u, lo_hi) - ref).abs().amax() > 1e-2, f"dt_limit {lo_hi} changes nothing"
        outs = {"forward": mixer(u)}
        cache = MambaCache.empty(mixer, 2, u.device, u.dtype)
        outs["forward with a cache"] = mixer(u, cache)
        cache = MambaCache.empty(mixer, 2, u.device, u.dtype)
        outs["step"] = torch.cat([mixer.step(u[:, t:t + 1], cache) for t in range(19)], dim=1)
        cache = MambaCache.empty(mixer, 2, u.device, u.dtype)
        pieces = [mixer(u[:, :3], cache)]  # a 3-token prefill, then step() on 4 tokens at a time
        cache.keep_states = True
        pieces += [mixer(u[:, t:t + 4], cache) for t in range(3, 19, 4)]
        outs["4-token steps"] = torch.cat(pieces, dim=1)
    for name, y in outs.items():
        assert_close(y, ref, f"{name} vs mixer_ref at dt_limit {limit}", atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k,G", [(1, 1), (3, 2), (8, 1)])
def test_ssd_steps_keeps_every_state_of_the_recurrence(k, G):
    """ssd_steps (k tokens at once, decoding and speculative decoding's verification) == ssd_step
    run k times, every output and every intermediate state, and == the chunked ssd_ref from the
    same initial state (outputs and final state); fp32, atol 1e-5."""
    g = torch.Generator().manual_seed(k)
    H, P, N = 4, 8, 6
    x, B, C = (torch.randn(2, k, H, P, generator=g), torch.randn(2, k, G, N, generator=g),
               torch.randn(2, k, G, N, generator=g))
    dt, A, D = torch.rand(2, k, H, generator=g), -torch.rand(H, generator=g) * 3, torch.randn(H, generator=g)
    h0 = torch.randn(2, H, P, N, generator=g)
    y, states = ssd_steps(h0, x, dt, A, B, C, D)
    h = h0
    for t in range(k):
        y_t, h = ssd_step(h, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        assert_close(y[:, t], y_t, f"y[{t}]", atol=1e-5, rtol=1e-5)
        assert_close(states[:, t], h, f"state after token {t}", atol=1e-5, rtol=1e-5)
    y_ref, h_ref = ssd_ref(x, dt, A, B, C, 4, D=D, initial_state=h0)
    assert_close(y, y_ref, "y vs ssd_ref", atol=1e-5, rtol=1e-5)
    assert_close(states[:, -1], h_ref, "final state vs ssd_ref", atol=1e-5, rtol=1e-5)
