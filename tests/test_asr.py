"""
tests/test_asr.py: asr.py's RNN-T loss against the sum over every alignment, enumerated by brute
force at tiny sizes; its analytic gradient against autograd through the reference; the Triton
kernel (in the interpreter here, natively on a GPU) against the reference, values and gradients.
Run: python -m pytest -q tests/test_asr.py
"""
import dataclasses, itertools, math, os, subprocess, sys

import numpy as np
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


# -----------------------------------------------------------------------------
# the fused joint, the model, decoding, the WAV front door

@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_fused_joint_equals_the_whole_logits(chunk):
    """joint_lattice (T in chunks, the backward recomputing each chunk's logits) against rnnt_lattice
    of the whole (B, T, U + 1, V) logits: the lattice and the loss's gradients to f, g, W, b, float64."""
    g_ = torch.Generator().manual_seed(chunk)
    B, T, U, J, V = 3, 7, 4, 5, 9
    f, g, w, b = (torch.randn(*s, generator=g_, dtype=torch.float64).requires_grad_()
                  for s in ((B, T, J), (B, U + 1, J), (V, J), (V,)))
    targets = torch.randint(1, V, (B, U), generator=g_)
    frames, labels = torch.tensor([7, 5, 2]), torch.tensor([4, 1, 0])
    whole = asr.rnnt_lattice(torch.tanh(f[:, :, None] + g[:, None]) @ w.t() + b, targets)
    fused = asr.joint_lattice(f, g, w, b, targets, 0, chunk)
    for x, y in zip(whole, fused):
        assert torch.allclose(x, y, atol=1e-12)
    want = torch.autograd.grad(asr.lattice_loss(*whole, frames, labels).sum(), (f, g, w, b))
    got = torch.autograd.grad(asr.lattice_loss(*fused, frames, labels).sum(), (f, g, w, b))
    for x, y in zip(want, got):
        assert torch.allclose(x, y, atol=1e-10)


def test_log_mel_features():
    """A 1 kHz tone peaks in the mel band whose centre is nearest 1 kHz; F = N // 160 + 1 frames; each
    utterance is normalised over its own frames, and zero padding after it changes nothing (the STFT
    pads with zeros too); padded frames are zero."""
    n_mels = 64
    t = torch.arange(16000) / asr.SAMPLE_RATE
    tone = 0.5 * torch.sin(2 * math.pi * 1000 * t)
    fb = asr.mel_filterbank(n_mels)
    centre = fb.argmax(0).float() * asr.SAMPLE_RATE / 512  # each band's peak frequency
    x, frames = asr.log_mel(tone[None], torch.tensor([16000]), n_mels)
    assert frames.tolist() == [101] and x.shape == (1, 101, n_mels)
    peak = x[0, 10:90].mean(0).argmax()
    assert abs(centre[peak] - 1000) <= (centre[peak + 1] - centre[peak])
    noise = torch.randn(2, 12000, generator=torch.Generator().manual_seed(0))
    noise[1, 8000:] = 0
    xs, fr = asr.log_mel(noise, torch.tensor([12000, 8000]), n_mels)
    alone, _ = asr.log_mel(noise[1:, :8000], torch.tensor([8000]), n_mels)
    assert fr.tolist() == [76, 51] and (xs[1, 51:] == 0).all()
    assert torch.allclose(xs[1, :51], alone[0], atol=1e-5)


@pytest.mark.parametrize("n", [1, 159, 160, 4000, 16001])
def test_subsampling_shapes(n):
    """8x subsampling: (B, F, n_mels) -> (B, ceil(F / 8)-ish, d) with the frame counts the three
    stride-2 convolutions give, equal to the tensor's length for the longest row."""
    cfg = asr.ASRConfig(vocab_size=10, n_layers=1, d_model=32, n_heads=2, sub_channels=8)
    model = asr.Encoder(cfg)
    wave = torch.randn(2, n)
    enc, frames = model(wave, torch.tensor([n, max(1, n // 2)]))
    F_ = n // 160 + 1
    for _ in range(3):
        F_ = (F_ - 1) // 2 + 1
    assert enc.shape == (2, F_, 32) and frames[0] == F_ and frames[1] <= F_


def test_pet_with_the_token_alone_is_a_plain_embedding():
    """PET's E(v) = E_token(v) + sum_f E_f(f(v)): with no feature on it is nn.Embedding; with features
    on it is that sum, two homophones (same syllable and tone) differ by their token rows alone, and a
    token without a reading (English) gets its token row alone."""
    tokens = ["", "green", "他", "她", "吃"]
    reading = {"他": "ta1", "她": "ta1", "吃": "chi1"}.get
    y = torch.tensor([[0, 1, 2, 3, 4, 2]])
    plain = asr.PETEmbedding(5, 8)
    assert torch.equal(plain(y), torch.nn.functional.embedding(y, plain.token.weight))
    features = asr.token_features(tokens, reading)
    assert features.values[0] == [0, 0, 1, 1, 2]  # syllable: ta, ta, chi
    assert features.values[1] == [0, 0, 1, 1, 1]  # tone 1 for all three
    pet = asr.PETEmbedding(5, 8, features)
    e = pet(y)[0]
    want = pet.token.weight[4] + sum(t.weight[m[4]] for t, m in zip(pet.tables, pet.maps))
    assert torch.allclose(e[4], want)
    assert torch.allclose(e[2] - pet.token.weight[2], e[3] - pet.token.weight[3])
    assert torch.allclose(e[1], pet.token.weight[1])


def test_pet_share_sets_how_alike_homophones_start():
    """pet_share s: each of the F feature tables starts at N(0, s / F), so that two tokens sharing every
    feature start at cosine s / (1 + s) (0 at s = 0, where the tables are zero); the draws leave the random
    state, and so the rest of the model's initialisation, where zero-started tables leave it."""
    tokens = ["", "green"] + ["他", "她"] * 50
    features = asr.token_features(tokens, {"他": "ta1", "她": "ta1"}.get)
    cfg = asr.ASRConfig(vocab_size=len(tokens), d_model=16, n_heads=2, n_layers=1, sub_channels=8, pred_dim=4096,
                        joint_dim=8, dropout=0.0, pet=features.names)
    models = {}
    for share in (0.0, 1.0, 3.0):
        torch.manual_seed(0)
        models[share] = asr.Transducer(dataclasses.replace(cfg, pet_share=share), features)
    torch.manual_seed(0)
    asr.PETEmbedding(len(tokens), 8, features, share=2.0)
    after = torch.get_rng_state()
    torch.manual_seed(0)
    [torch.nn.Embedding(n, 8) for n in [len(tokens)] + features.sizes]  # the draws of zero-started tables
    assert torch.equal(after, torch.get_rng_state())
    assert all(t.weight.abs().max() == 0 for t in models[0.0].predictor.embed.tables)
    for share in (1.0, 3.0):
        embed = models[share].predictor.embed
        e = embed(torch.tensor([[2, 3]]))[0]  # two homophones: every feature shared
        shared = e[0] - embed.token.weight[2]
        assert abs(shared.var().item() - share) < 0.1 * share
        assert abs(torch.cosine_similarity(e[0], e[1], dim=0).item() - share / (1 + share)) < 0.05
        assert all(t.weight[0].abs().max() == 0 for t in embed.tables)  # "no such feature" stays zero
        for (name, p), q in zip(models[share].named_parameters(), models[0.0].parameters(), strict=True):
            assert ".tables." in name or torch.equal(p, q), name


def tiny_set(n=4, seed=0):
    """Utterances of tone sequences, one label per 0.2 s tone (label k at 300 + 150 k Hz)."""
    g = torch.Generator().manual_seed(seed)
    waves, labels = [], []
    for _ in range(n):
        y = torch.randint(1, 6, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
        t = torch.arange(3200) / asr.SAMPLE_RATE
        waves.append(torch.cat([0.3 * torch.sin(2 * math.pi * (300 + 150 * int(k)) * t) for k in y]))
        labels.append(y)
    lengths = torch.tensor([len(w) for w in waves])
    wave = torch.zeros(n, int(lengths.max()))
    targets = torch.zeros(n, max(map(len, labels)), dtype=torch.long)
    for i, (w, y) in enumerate(zip(waves, labels)):
        wave[i, :len(w)], targets[i, :len(y)] = w, y
    return wave, lengths, targets, torch.tensor([len(y) for y in labels])


@pytest.mark.parametrize("pred_context, ctc_weight", [(0, 0.0), (2, 0.3)])
def test_training_lowers_the_loss_and_greedy_decodes_what_it_learned(pred_context, ctc_weight):
    """AdamW steps on four tone utterances lower the loss several times over; the fused and the whole
    joint give the same loss and gradients; greedy decoding then returns the labels. With the LSTM
    prediction network, and with the stateless one plus the encoder's CTC loss."""
    torch.manual_seed(0)
    cfg = asr.ASRConfig(vocab_size=6, d_model=48, n_heads=2, n_layers=1, sub_channels=16, pred_dim=32,
                        joint_dim=32, dropout=0.0, pred_context=pred_context, ctc_weight=ctc_weight)
    model = asr.Transducer(cfg)
    wave, lengths, targets, labels = tiny_set()
    whole = model(wave, lengths, targets, labels)
    fused = model(wave, lengths, targets, labels, chunk=2)
    assert torch.allclose(whole, fused, atol=1e-5)
    gw = torch.autograd.grad(whole.sum(), model.joint_out.weight)[0]
    gf = torch.autograd.grad(fused.sum(), model.joint_out.weight)[0]
    assert torch.allclose(gw, gf, atol=1e-4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(250):
        loss = model(wave, lengths, targets, labels, chunk=2).mean()
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 5
    model.eval()
    hyps = asr.greedy_decode(model, wave, lengths)
    assert hyps == [targets[i, :labels[i]].tolist() for i in range(4)]
    assert asr.beam_decode(model, wave, lengths, beam=4) == hyps


@pytest.mark.parametrize("pred_context", [0, 1, 3])
def test_prediction_net_label_by_label_equals_the_whole(pred_context):
    """Greedy decoding feeds the prediction network one label at a time with its state (the LSTM's, or
    the stateless net's last labels): the same g_u as the whole sequence at once."""
    torch.manual_seed(0)
    cfg = asr.ASRConfig(vocab_size=9, pred_dim=16, dropout=0.0, pred_context=pred_context)
    net = asr.PredictionNet(cfg).eval()
    y = torch.randint(1, 9, (2, 5))
    y[:, 0] = asr.BLANK
    whole, _ = net(y)
    state, steps = None, []
    for u in range(5):
        g, state = net(y[:, u:u + 1], state)
        steps.append(g)
    assert torch.allclose(torch.cat(steps, 1), whole, atol=1e-6)


@pytest.mark.parametrize("pred_context", [0, 2])
def test_beam_search_without_pruning_is_the_most_probable_labels(pred_context):
    """With a beam wide enough to keep every hypothesis, beam_decode returns the label sequence of
    highest probability summed over all its alignments of at most T labels (max_symbols=1), found here
    by enumerating every such alignment of an untrained model (334 for T = 3 frames and 3 labels)."""
    torch.manual_seed(1)
    cfg = asr.ASRConfig(vocab_size=4, d_model=16, n_heads=2, n_layers=1, sub_channels=8, pred_dim=8, joint_dim=8,
                        dropout=0.0, pred_context=pred_context)
    model = asr.Transducer(cfg).eval()
    with torch.no_grad():
        model.joint_out.weight.mul_(4)  # peaked distributions: a clear winner
        model.joint_out.bias[asr.BLANK] = -2.0  # labels likelier than blanks: several a frame
    wave, lengths = 0.1 * torch.randn(2, 3000), torch.tensor([3000, 2000])
    best = []
    with torch.no_grad():
        enc, frames = model.encoder(wave, lengths)
        f = model.joint_enc(enc)

        def alignments(b, t, y, score, totals):  # every path from (t, y) to the end, summed by its labels
            if t == int(frames[b]):
                totals[tuple(y)] = float(np.logaddexp(totals.get(tuple(y), -np.inf), score))
                return
            g, _ = model.predictor(torch.tensor([[asr.BLANK] + y]))
            logp = model.joint(f[b, t], model.joint_pred(g[0, -1])).log_softmax(-1)
            alignments(b, t + 1, y, score + float(logp[asr.BLANK]), totals)  # a blank: the next frame
            if len(y) < int(frames[b]):
                for v in (1, 2, 3):  # a label: the same frame
                    alignments(b, t, y + [v], score + float(logp[v]), totals)

        for b in range(2):
            totals = {}
            alignments(b, 0, [], 0.0, totals)
            best.append(list(max(totals, key=totals.get)))
    assert int(frames[0]) == 3 and int(frames[1]) == 2 and len(best[0]) >= 2
    assert asr.beam_decode(model, wave, lengths, beam=10 ** 4, max_symbols=1) == best


def test_greedy_decode_fed_the_reference():
    """With feed, the prediction network is given the reference's n-th label when the decoder emits its
    n-th (its own label past the reference's end), and the emitted labels are still the decoder's; fed
    its own greedy labels, it decodes them again."""
    torch.manual_seed(1)
    cfg = asr.ASRConfig(vocab_size=5, d_model=16, n_heads=2, n_layers=1, sub_channels=8, pred_dim=8, joint_dim=8,
                        dropout=0.0)
    model = asr.Transducer(cfg).eval()
    with torch.no_grad():
        model.joint_out.weight.mul_(4)
        model.joint_out.bias[asr.BLANK] = -2.0  # several labels a frame
    wave, lengths = 0.1 * torch.randn(2, 6000), torch.tensor([6000, 4000])
    hyps = asr.greedy_decode(model, wave, lengths)
    assert min(map(len, hyps)) >= 3
    own = torch.zeros(2, max(map(len, hyps)), dtype=torch.long)
    for b, y in enumerate(hyps):
        own[b, :len(y)] = torch.tensor(y)
    assert asr.greedy_decode(model, wave, lengths, feed=(own, torch.tensor([len(y) for y in hyps]))) == hyps
    given = []
    model.predictor.register_forward_hook(lambda m, args, out: given.append(args[0][0, 0].item()))
    reference = torch.tensor([[4, 4, 1]])  # shorter than what the decoder emits
    fed = asr.greedy_decode(model, wave[:1], lengths[:1], feed=(reference, torch.tensor([3])))[0]
    assert given[0] == asr.BLANK and len(given) == len(fed) + 1  # the start, then one call a label (one row)
    assert given[1:] == [4, 4, 1] + fed[3:]
