"""
tests/test_asr.py: asr.py's RNN-T loss against the sum over every alignment, enumerated by brute
force at tiny sizes; its analytic gradient against autograd through the reference; the Triton
kernel (in the interpreter here, natively on a GPU) against the reference, values and gradients.
Run: python -m pytest -q tests/test_asr.py
"""
import itertools, os, subprocess, sys

import pytest
import torch

import asr

INSIDE = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
inside = pytest.mark.skipif(not INSIDE, reason="runs in the interpreter subprocess of test_kernel_in_interpreter")


def brute_force(blank_lp, label_lp, T, U):
    """-log of the sum over every alignment: each order of T - 1 blank moves and U label moves from
    (0, 0) to (T - 1, U), then the last blank."""
    paths = []
    for labels_at in itertools.combinations(range(T - 1 + U), U):
        t = u = 0
        lp = blank_lp.new_zeros(())
        for step in range(T - 1 + U):
            if step in labels_at:
                lp, u = lp + label_lp[t, u], u + 1
            else:
                lp, t = lp + blank_lp[t, u], t + 1
        paths.append(lp + blank_lp[T - 1, U])
    return -torch.logsumexp(torch.stack(paths), 0)


def lattice(B=3, T=5, U=3, V=6, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, U + 1, V, generator=g, dtype=dtype).to(device).requires_grad_()
    targets = torch.randint(1, V, (B, U), generator=g).to(device)
    return logits, targets


@pytest.mark.parametrize("T, U", [(1, 0), (1, 2), (2, 1), (3, 2), (4, 3), (5, 0)])
def test_reference_is_the_sum_over_all_alignments(T, U):
    """rnnt_loss_ref and rnnt_alpha_beta (alpha's end and beta's start) against brute force, to
    float64 rounding."""
    logits, targets = lattice(B=1, T=T, U=U)
    blank_lp, label_lp = asr.rnnt_lattice(logits, targets)
    want = brute_force(blank_lp[0], label_lp[0], T, U)
    frames, labels = torch.tensor([T]), torch.tensor([U])
    assert asr.rnnt_loss_ref(blank_lp, label_lp, frames, labels)[0].item() == pytest.approx(want.item(), abs=1e-12)
    alpha, beta = asr.rnnt_alpha_beta(blank_lp.detach(), label_lp.detach(), frames, labels)
    assert -beta[0, 0, 0].item() == pytest.approx(want.item(), abs=1e-12)
    assert -(alpha[0, T - 1, U] + blank_lp[0, T - 1, U]).item() == pytest.approx(want.item(), abs=1e-12)


def test_lattice_is_the_log_softmax_at_two_entries():
    logits, targets = lattice()
    blank_lp, label_lp = asr.rnnt_lattice(logits, targets)
    full = logits.log_softmax(-1)
    assert torch.allclose(blank_lp, full[..., 0], atol=1e-12)
    want = full[:, :, :-1].gather(-1, targets[:, None, :, None].expand(-1, 5, -1, 1))[..., 0]
    assert torch.allclose(label_lp, want, atol=1e-12)


def test_gradient_is_the_edges_posterior():
    """rnnt_loss's analytic backward (minus each edge's posterior) against autograd through the
    point-by-point reference, to the logits, with ragged lengths (one sequence with no labels)."""
    logits, targets = lattice(B=4, T=6, U=4)
    frames, labels = torch.tensor([6, 3, 1, 5]), torch.tensor([4, 2, 0, 4])
    loss = asr.rnnt_loss(logits, targets, frames, labels)
    blank_lp, label_lp = asr.rnnt_lattice(logits, targets)
    ref = asr.rnnt_loss_ref(blank_lp, label_lp, frames, labels)
    assert torch.allclose(loss, ref, atol=1e-12)
    got, = torch.autograd.grad(loss.sum(), logits)
    want, = torch.autograd.grad(ref.sum(), logits)
    assert torch.allclose(got, want, atol=1e-12)


def test_bad_shapes():
    logits, targets = lattice()
    with pytest.raises(ValueError, match="must be"):
        asr.rnnt_loss(logits[:, :, :-1], targets, torch.tensor([5] * 3), torch.tensor([3] * 3))
    for frames, labels in (([6, 5, 5], [3, 3, 3]), ([0, 5, 5], [3, 3, 3]), ([5, 5, 5], [4, 3, 3]), ([5, 5], [3, 3])):
        with pytest.raises(ValueError, match="frames must be"):
            asr.rnnt_loss(logits, targets, torch.tensor(frames), torch.tensor(labels))


def test_kernel_in_interpreter():
    if INSIDE:
        pytest.skip("already in the interpreter (or on a GPU)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "kernel"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@inside
@pytest.mark.parametrize("B, T, U", [(1, 1, 0), (4, 7, 5), (3, 20, 9)])
def test_kernel_equals_reference(B, T, U):
    """The Triton kernel's alpha and beta (the anti-diagonal sweep) against rnnt_alpha_beta, and the
    loss and its gradient through it against the reference, fp32 (1e-5 of the largest value)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits, targets = lattice(B=B, T=T, U=U, dtype=torch.float32, seed=B + T)
    frames = torch.tensor([T] + [max(1, T - 2 * i) for i in range(1, B)])
    labels = torch.tensor([U] + [max(0, U - i) for i in range(1, B)])
    blank_lp, label_lp = asr.rnnt_lattice(logits, targets)
    want = asr.rnnt_alpha_beta(blank_lp.detach(), label_lp.detach(), frames, labels)
    got = asr._alpha_beta_triton(blank_lp.detach().to(device), label_lp.detach().to(device), frames, labels)
    for w, g in zip(want, got):
        g = g.cpu()
        assert torch.equal(torch.isfinite(w), torch.isfinite(g))
        assert torch.allclose(g[torch.isfinite(w)], w[torch.isfinite(w)], atol=1e-5 * w[torch.isfinite(w)].abs().max())
    x = logits.detach().to(device).requires_grad_()
    loss = asr.rnnt_loss(x, targets.to(device), frames, labels)
    ref = asr.rnnt_loss_ref(blank_lp, label_lp, frames, labels)
    assert torch.allclose(loss.cpu(), ref, rtol=1e-5)
    got, = torch.autograd.grad(loss.sum(), x)
    want, = torch.autograd.grad(ref.sum(), logits)
    assert torch.allclose(got.cpu(), want, atol=1e-5)
