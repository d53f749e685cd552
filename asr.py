"""
asr.py: speech recognition with transducers. Read after model.py; romanize.py holds the output side
(pinyin, the tokenizer, Roman2Char), train_asr.py trains and scores, data/speech/prepare.py makes the corpus.

Sections, in order: the RNN-Transducer loss (Graves 2012, arXiv:1211.3711, Sec. 2) with a PyTorch
reference and a Triton kernel beside it; the fused joint (the lattice without the joint's whole
logits); log-mel features; the FastConformer encoder; the prediction network with PET embeddings; the
Transducer, greedy decoding and a beam search; the command line:
    python asr.py --wav=FILE.wav --init_from=out-asr/char     # a 16 kHz mono 16-bit WAV
    python asr.py --wav=FILE.wav --init_from=out-asr/roman --beam=4

A transducer's joint network scores, for every audio frame t < T and every count u <= U of labels
already emitted, the next output: a blank (move to frame t + 1) or the label y_{u+1} (stay on frame
t). An alignment is a monotone path through that T x (U + 1) lattice from (0, 0) to (T - 1, U) and a
last blank; the loss is -log of the sum of all paths' probabilities. Only two log-probabilities per
lattice point enter it:
    blank(t, u) = log P(blank | t, u),    label(t, u) = log P(y_{u+1} | t, u)    (u < U)
so rnnt_lattice gathers those two from the joint's logits (a logsumexp and a gather; the
(B, T, U + 1, V) log-softmax is never stored), and the recursions run on (B, T, U + 1) tensors:
    alpha(t, u) = logaddexp(alpha(t-1, u) + blank(t-1, u), alpha(t, u-1) + label(t, u-1)),  alpha(0, 0) = 0
    beta(t, u)  = logaddexp(beta(t+1, u) + blank(t, u), beta(t, u+1) + label(t, u)),  beta(T-1, U) = blank(T-1, U)
    loss = -beta(0, 0) = -(alpha(T-1, U) + blank(T-1, U))
and the gradient of the loss with respect to each lattice log-probability is minus the posterior of
its edge: d loss / d blank(t, u) = -exp(alpha(t, u) + blank(t, u) + beta(t+1, u) - log Z), and the
same for label(t, u) with beta(t, u+1). Points on one anti-diagonal t + u = d depend only on the
previous one, so the kernel sweeps the diagonals with one lane per u (Sec. 2 of Graves' paper;
the wavefront order is that of Bagby et al. 2018 and of warp-transducer).
"""
import argparse, math, os, sys
import wave as wavefile
from dataclasses import dataclass

import numpy as np

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import apply_rope
import romanize
from romanize import split_syllable
from triton_ops import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the references serve wherever Triton cannot
    triton = None

NEG = -math.inf


# -----------------------------------------------------------------------------
# the lattice: blank and label log-probabilities from the joint's logits

def rnnt_lattice(logits, targets, blank=0):
    """(blank, label) log-probabilities, (B, T, U + 1) and (B, T, U), from the joint's logits
    (B, T, U + 1, V) and the targets (B, U): log-softmax at two entries per point, by a logsumexp
    over V and a gather, without a (B, T, U + 1, V) log-softmax tensor."""
    B, T, U1, V = logits.shape
    dtype = torch.promote_types(logits.dtype, torch.float32)  # at least fp32
    lse = torch.logsumexp(logits.to(dtype), dim=-1)  # (B, T, U + 1)
    blank_lp = logits[..., blank].to(dtype) - lse
    index = targets[:, None, :, None].expand(B, T, U1 - 1, 1)  # (B, T, U, 1): y_{u+1} at each (t, u)
    label_lp = logits[:, :, :-1].gather(-1, index)[..., 0].to(dtype) - lse[:, :, :-1]
    return blank_lp, label_lp


# -----------------------------------------------------------------------------
# the reference: the recursion point by point, differentiated by autograd

def rnnt_loss_ref(blank_lp, label_lp, frames, labels):
    """-log P(y | x) per sequence, (B,), by the forward recursion over every lattice point;
    frames (B,) and labels (B,) are each sequence's T_b <= T and U_b <= U."""
    losses = []
    for b in range(blank_lp.shape[0]):
        T, U = int(frames[b]), int(labels[b])
        alpha = [[None] * (U + 1) for _ in range(T)]
        for t in range(T):
            for u in range(U + 1):
                if t == 0 and u == 0:
                    alpha[t][u] = blank_lp.new_zeros(())
                    continue
                paths = []
                if t > 0:
                    paths.append(alpha[t - 1][u] + blank_lp[b, t - 1, u])
                if u > 0:
                    paths.append(alpha[t][u - 1] + label_lp[b, t, u - 1])
                alpha[t][u] = torch.logsumexp(torch.stack(paths), 0)
        losses.append(-(alpha[T - 1][U] + blank_lp[b, T - 1, U]))
    return torch.stack(losses)


def rnnt_alpha_beta(blank_lp, label_lp, frames, labels):
    """alpha and beta, (B, T, U + 1) each (-inf outside a sequence's lattice), in PyTorch for the whole
    batch a frame t at a time (what the kernel computes, in another order). Along u within a frame
    the recursion is a scan: with C_t(u) = sum_{j < u} label(t, j) and a_t(k) = alpha(t-1, k) + blank(t-1, k),
        alpha(t, u) = C_t(u) + logcumsumexp_{k <= u} (a_t(k) - C_t(k))
        beta(t, u)  = -C_t(u) + logcumsumexp_{k >= u} (b_t(k) + C_t(k)),   b_t(k) = beta(t+1, k) + blank(t, k)."""
    B, T, U1 = blank_lp.shape
    t_ = torch.arange(T, device=blank_lp.device)
    u_ = torch.arange(U1, device=blank_lp.device)
    inside = (t_[None, :, None] < frames[:, None, None]) & (u_[None, None, :] <= labels[:, None, None])  # (B, T, U + 1)
    bl = blank_lp.masked_fill(~inside, NEG)
    C = torch.nn.functional.pad(label_lp.clamp(min=-1e4).cumsum(-1), (1, 0))  # (B, T, U + 1): C_t(u)
    alpha, beta = torch.empty_like(bl), torch.empty_like(bl)
    a = torch.where(u_ == 0, 0.0, NEG).expand(B, U1)  # (B, U + 1): the start, reached at alpha(0, 0)
    for t in range(T):
        alpha[:, t] = C[:, t] + torch.logcumsumexp(a - C[:, t], -1)
        a = alpha[:, t] + bl[:, t]
    last = (t_[None, :] == frames[:, None] - 1)[..., None] & (u_ == labels[:, None])[:, None]  # (B, T, U + 1)
    after = torch.full_like(bl[:, 0], NEG)  # beta(t + 1, .): none past the end
    for t in reversed(range(T)):
        b = torch.where(last[:, t], bl[:, t], after + bl[:, t])  # the last blank ends every path
        after = -C[:, t] + torch.logcumsumexp((b + C[:, t]).flip(-1), -1).flip(-1)
        beta[:, t] = after
    return alpha.masked_fill(~inside, NEG), beta.masked_fill(~inside, NEG)


def rnnt_grads(blank_lp, label_lp, alpha, beta, frames, labels):
    """d loss / d blank and d loss / d label: minus each edge's posterior (zero outside a lattice)."""
    B, T, U1 = blank_lp.shape
    logz = beta[:, 0, 0]  # (B,)
    t = torch.arange(T, device=blank_lp.device)[None, :, None]
    u = torch.arange(U1, device=blank_lp.device)[None, None, :]
    T_b, U_b = frames[:, None, None], labels[:, None, None]
    beta_down = torch.cat([beta[:, 1:], beta.new_full((B, 1, U1), NEG)], 1)  # beta(t + 1, u)
    beta_down = torch.where((t == T_b - 1) & (u == U_b), 0.0, beta_down)  # the last blank ends the path
    g_blank = -torch.exp(alpha + blank_lp + beta_down - logz[:, None, None])
    g_blank = torch.where((t < T_b) & (u <= U_b), g_blank, 0.0)
    g_label = -torch.exp(alpha[:, :, :-1] + label_lp + beta[:, :, 1:] - logz[:, None, None])
    g_label = torch.where((t < T_b) & (u[..., :-1] < U_b), g_label, 0.0)
    return torch.nan_to_num(g_blank), torch.nan_to_num(g_label)


# -----------------------------------------------------------------------------
# the kernel: one program per sequence, one lane per u, the anti-diagonals in turn

if triton is not None:

    @triton.jit
    def _logaddexp(x, y):
        m = tl.maximum(x, y)
        empty = m == float("-inf")  # neither path reaches the point
        safe = tl.where(empty, 0.0, m)
        total = tl.where(empty, 1.0, tl.exp(x - safe) + tl.exp(y - safe))
        return tl.where(empty, m, safe + tl.log(total))

    @triton.jit
    def _rnnt_kernel(blank_ptr, label_ptr, alpha_ptr, beta_ptr, frames_ptr, labels_ptr, T_max, U_max,
                     BLOCK: tl.constexpr):
        b = tl.program_id(0)
        T = tl.load(frames_ptr + b)
        U = tl.load(labels_ptr + b)
        u = tl.arange(0, BLOCK)
        lat = b * T_max * (U_max + 1)  # blank, alpha, beta: (B, T_max, U_max + 1)
        lab = b * T_max * U_max        # label: (B, T_max, U_max)
        for d in range(0, T + U):  # alpha, diagonal d = t + u after diagonal d - 1
            t = d - u
            on = (u <= U) & (t >= 0) & (t < T)
            up = on & (t > 0)
            left = on & (u > 0)
            from_t = tl.load(alpha_ptr + lat + (t - 1) * (U_max + 1) + u, mask=up, other=float("-inf")) \
                + tl.load(blank_ptr + lat + (t - 1) * (U_max + 1) + u, mask=up, other=0.0)
            from_u = tl.load(alpha_ptr + lat + t * (U_max + 1) + u - 1, mask=left, other=float("-inf")) \
                + tl.load(label_ptr + lab + t * U_max + u - 1, mask=left, other=0.0)
            a = tl.where((t == 0) & (u == 0), 0.0, _logaddexp(from_t, from_u))
            tl.store(alpha_ptr + lat + t * (U_max + 1) + u, a, mask=on)
            tl.debug_barrier()  # the next diagonal reads what the other lanes wrote
        for i in range(0, T + U):  # beta, from the last diagonal back
            d = T + U - 1 - i
            t = d - u
            on = (u <= U) & (t >= 0) & (t < T)
            down = on & (t < T - 1)
            right = on & (u < U)
            bl = tl.load(blank_ptr + lat + t * (U_max + 1) + u, mask=on, other=0.0)
            from_t = tl.load(beta_ptr + lat + (t + 1) * (U_max + 1) + u, mask=down, other=float("-inf")) + bl
            from_u = tl.load(beta_ptr + lat + t * (U_max + 1) + u + 1, mask=right, other=float("-inf")) \
                + tl.load(label_ptr + lab + t * U_max + u, mask=right, other=0.0)
            be = tl.where((t == T - 1) & (u == U), bl, _logaddexp(from_t, from_u))
            tl.store(beta_ptr + lat + t * (U_max + 1) + u, be, mask=on)
            tl.debug_barrier()


def _alpha_beta_triton(blank_lp, label_lp, frames, labels):
    B, T, U1 = blank_lp.shape
    blank_lp, label_lp = blank_lp.float().contiguous(), label_lp.float().contiguous()
    alpha = blank_lp.new_full((B, T, U1), NEG)
    beta = blank_lp.new_full((B, T, U1), NEG)
    frames = frames.to(device=blank_lp.device, dtype=torch.int32).contiguous()
    labels = labels.to(device=blank_lp.device, dtype=torch.int32).contiguous()
    _rnnt_kernel[(B,)](blank_lp, label_lp, alpha, beta, frames, labels, T, U1 - 1, BLOCK=triton.next_power_of_2(U1))
    return alpha, beta


class _RNNTLoss(torch.autograd.Function):
    """-log P(y | x) per sequence from the lattice; the backward is the edges' posteriors."""

    @staticmethod
    def forward(ctx, blank_lp, label_lp, frames, labels):
        run = _alpha_beta_triton if use_triton(blank_lp) else rnnt_alpha_beta
        alpha, beta = run(blank_lp.detach(), label_lp.detach(), frames, labels)
        ctx.save_for_backward(blank_lp, label_lp, alpha, beta, frames, labels)
        return -beta[:, 0, 0]

    @staticmethod
    def backward(ctx, grad):
        blank_lp, label_lp, alpha, beta, frames, labels = ctx.saved_tensors
        g_blank, g_label = rnnt_grads(blank_lp.to(alpha.dtype), label_lp.to(alpha.dtype), alpha, beta,
                                      frames.to(alpha.device), labels.to(alpha.device))
        g = grad[:, None, None]
        return (g * g_blank).to(blank_lp.dtype), (g * g_label).to(label_lp.dtype), None, None


def rnnt_loss(logits, targets, frames, labels, blank=0):
    """The RNN-T loss of each sequence, (B,): the joint's logits (B, T, U + 1, V), targets (B, U)
    (padding past labels[b] is ignored), frames and labels (B,) the lengths T_b and U_b."""
    if logits.dim() != 4 or logits.shape[2] != targets.shape[1] + 1:
        raise ValueError(f"logits {tuple(logits.shape)} must be (B, T, U + 1, V) for targets {tuple(targets.shape)}")
    blank_lp, label_lp = rnnt_lattice(logits, targets.clamp(min=0), blank)
    return lattice_loss(blank_lp, label_lp, frames, labels)


def lattice_loss(blank_lp, label_lp, frames, labels):
    """The RNN-T loss of each sequence, (B,), from the lattice: blank_lp (B, T, U + 1), label_lp (B, T, U)."""
    B, T, U1 = blank_lp.shape
    if frames.shape != (B,) or labels.shape != (B,) or frames.min() < 1 or frames.max() > T \
            or labels.min() < 0 or labels.max() > U1 - 1:
        raise ValueError(f"frames must be (B,) in [1, {T}] and labels (B,) in [0, {U1 - 1}]")
    return _RNNTLoss.apply(blank_lp, label_lp, frames, labels)


# -----------------------------------------------------------------------------
# the fused joint: the lattice from the joint's inputs, the (B, T, U + 1, V) logits never whole
# The joint is z = W tanh(f_t + g_u) + b. The lattice needs only blank(t, u) and label(t, u), so the
# frames go through in chunks of c: one chunk's logits (B, c, U + 1, V) exist at a time, and the
# backward recomputes them, chunk by chunk, from f, g, W and b (all that is saved). With the
# gradients of the loss with respect to the lattice, d_blank and d_label, the logits' gradient is
#     d z_v = d_blank * (1[v = blank] - p_v) + d_label * (1[v = y_{u+1}] - p_v),   p = softmax(z)
# and it flows back through tanh into f (summed over u), g (summed over t), W and b.

class _JointLattice(torch.autograd.Function):

    @staticmethod
    def forward(ctx, f, g, weight, bias, targets, blank, chunk):
        B, T, _ = f.shape
        U1 = g.shape[1]
        dtype = torch.promote_types(f.dtype, torch.float32)
        blank_lp, label_lp = f.new_empty(B, T, U1, dtype=dtype), f.new_empty(B, T, U1 - 1, dtype=dtype)
        for t0 in range(0, T, chunk):
            c = min(chunk, T - t0)
            z = torch.tanh(f[:, t0:t0 + c, None] + g[:, None]) @ weight.t() + bias  # (B, c, U + 1, V)
            blank_lp[:, t0:t0 + c], label_lp[:, t0:t0 + c] = rnnt_lattice(z, targets, blank)
        ctx.save_for_backward(f, g, weight, bias, targets)
        ctx.blank, ctx.chunk = blank, chunk
        return blank_lp, label_lp

    @staticmethod
    def backward(ctx, d_blank, d_label):
        f, g, weight, bias, targets = ctx.saved_tensors
        B, T, _ = f.shape
        U1 = g.shape[1]
        df, dg, dw, db = torch.zeros_like(f), torch.zeros_like(g), torch.zeros_like(weight), torch.zeros_like(bias)
        next_label = torch.cat([targets, targets.new_full((B, 1), ctx.blank)], 1)  # (B, U + 1); u = U is unused
        for t0 in range(0, T, ctx.chunk):
            c = min(ctx.chunk, T - t0)
            h = torch.tanh(f[:, t0:t0 + c, None] + g[:, None])  # (B, c, U + 1, J)
            p = torch.softmax((h @ weight.t() + bias).to(d_blank.dtype), -1)  # (B, c, U + 1, V)
            d_b = d_blank[:, t0:t0 + c]  # (B, c, U + 1)
            d_l = torch.nn.functional.pad(d_label[:, t0:t0 + c], (0, 1))  # (B, c, U + 1): none at u = U
            dz = -p * (d_b + d_l)[..., None]
            dz[..., ctx.blank] += d_b
            dz.scatter_add_(-1, next_label[:, None, :, None].expand(B, c, U1, 1), d_l[..., None])
            dz = dz.to(h.dtype)
            dw += dz.flatten(0, 2).t() @ h.flatten(0, 2)  # (V, B c (U + 1)) @ (B c (U + 1), J)
            db += dz.sum((0, 1, 2))
            dh = (dz @ weight) * (1 - h * h)  # through W, then tanh
            df[:, t0:t0 + c] = dh.sum(2)
            dg += dh.sum(1)
        return df, dg, dw, db, None, None, None


def joint_lattice(f, g, weight, bias, targets, blank=0, chunk=4):
    """(blank, label) log-probabilities, (B, T, U + 1) and (B, T, U), of the joint W tanh(f + g) + b
    with f (B, T, J) and g (B, U + 1, J) already projected: rnnt_lattice(joint logits) without the
    logits, `chunk` frames at a time."""
    return _JointLattice.apply(f, g, weight, bias, targets.clamp(min=0), blank, chunk)


def joint_loss(f, g, weight, bias, targets, frames, labels, chunk=None, blank=0):
    """The RNN-T loss of each sequence (B,) through the joint W tanh(f + g) + b: by joint_lattice, `chunk`
    frames at a time, or through the whole (B, T, U + 1, V) logits when chunk is None (or 0)."""
    if chunk:
        lattice = joint_lattice(f, g, weight, bias, targets, blank, chunk)
    else:
        lattice = rnnt_lattice(F.linear(torch.tanh(f[:, :, None] + g[:, None]), weight, bias), targets.clamp(min=0),
                               blank)
    return lattice_loss(*lattice, frames, labels)


# -----------------------------------------------------------------------------
# features: log-mel filterbanks (NeMo's AudioToMelSpectrogramPreprocessor, in torch.stft)

SAMPLE_RATE = 16000


@dataclass
class ASRConfig:
    vocab_size: int = 128     # output tokens, the blank (id 0) included
    n_mels: int = 64          # mel bands, from a 512-point FFT of 25 ms windows every 10 ms
    d_model: int = 96         # the encoder's width
    n_heads: int = 4
    n_layers: int = 3         # Conformer blocks
    conv_kernel: int = 9      # the convolution module's depthwise kernel (FastConformer's 9)
    sub_channels: int = 64    # channels of the 8x subsampling convolutions
    pred_dim: int = 128       # the prediction network's embedding and LSTM width
    pred_context: int = 0     # 0: an LSTM prediction network; k > 0: stateless, the last k labels
    joint_dim: int = 128
    dropout: float = 0.1
    pet: tuple = ()           # PET's features beside the token: a subset of PET_FEATURES
    pet_share: float = 0.0    # PET's feature rows start with this share of the token rows' variance (0: at zero)
    ctc_weight: float = 0.0   # an auxiliary CTC loss on the encoder, weighted (NeMo's hybrid Transducer-CTC)


def mel_filterbank(n_mels, n_fft=512, sample_rate=SAMPLE_RATE):
    """(n_fft / 2 + 1, n_mels) triangular filters, equally spaced on the HTK mel scale 2595 log10(1 + f / 700)."""
    mel = torch.linspace(0, 2595 * math.log10(1 + sample_rate / 2 / 700), n_mels + 2, dtype=torch.float64)
    hz = 700 * (10 ** (mel / 2595) - 1)  # (n_mels + 2,) band edges
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)[:, None]
    rising = (freqs - hz[:-2]) / (hz[1:-1] - hz[:-2])  # (n_fft / 2 + 1, n_mels)
    falling = (hz[2:] - freqs) / (hz[2:] - hz[1:-1])
    return torch.minimum(rising, falling).clamp(min=0).float()


def log_mel(wave, lengths, n_mels, hop=160):
    """Features (B, F, n_mels) and frame counts (B,) from waveforms (B, N) in [-1, 1] with lengths (B,):
    pre-emphasis 0.97, |STFT|^2, mel filters, log, then each utterance's bands normalised to zero mean
    and unit variance over its own frames; frames past an utterance's end are zero. The features of
    an utterance do not depend on the padding after it."""
    wave = torch.cat([wave[:, :1], wave[:, 1:] - 0.97 * wave[:, :-1]], 1)
    wave = wave.masked_fill(torch.arange(wave.shape[1], device=wave.device) >= lengths[:, None], 0.0)  # (B, N)
    window = torch.hann_window(400, device=wave.device)
    spec = torch.stft(wave, n_fft=512, hop_length=hop, win_length=400, window=window, center=True,
                      pad_mode="constant", return_complex=True)  # (B, 257, F); zeros past the ends, as padding is
    x = torch.log(spec.abs().pow(2).transpose(1, 2) @ mel_filterbank(n_mels).to(wave.device) + 2 ** -24)
    frames = lengths // hop + 1
    on = (torch.arange(x.shape[1], device=x.device) < frames[:, None])[..., None]  # (B, F, 1)
    n = frames[:, None, None].to(x.dtype)
    mean = (x * on).sum(1, keepdim=True) / n
    std = (((x - mean) * on).pow(2).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
    return ((x - mean) / (std + 1e-5)).masked_fill(~on, 0.0), frames


# -----------------------------------------------------------------------------
# the encoder: FastConformer (Rekesh et al. 2023, arXiv:2305.05084): 8x depthwise-separable
# subsampling, then Conformer blocks (Gulati et al. 2020, arXiv:2005.08100)

class Subsampling(nn.Module):
    """8x in time (10 ms -> 80 ms frames) and in frequency: a 3x3 stride-2 convolution, then two
    depthwise-separable ones (depthwise 3x3 stride 2, pointwise 1x1), ReLU after each, then a linear map."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.sub_channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, C, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(C, C, 3, 2, 1, groups=C), nn.Conv2d(C, C, 1), nn.ReLU(),
            nn.Conv2d(C, C, 3, 2, 1, groups=C), nn.Conv2d(C, C, 1), nn.ReLU())
        bands = cfg.n_mels
        for _ in range(3):
            bands = (bands - 1) // 2 + 1
        self.out = nn.Linear(C * bands, cfg.d_model)

    def forward(self, x, frames):
        x = self.conv(x[:, None])  # (B, 1, F, n_mels) -> (B, C, F / 8, n_mels / 8)
        B, C, T, M = x.shape
        x = self.out(x.transpose(1, 2).reshape(B, T, C * M))  # (B, T, C, M) -> (B, T, C M) -> (B, T, d)
        return x, self.frames(frames)

    @staticmethod
    def frames(frames):
        """The frame counts after the three convolutions (kernel 3, stride 2, padding 1 each)."""
        for _ in range(3):
            frames = (frames - 1) // 2 + 1
        return frames


def feed_forward(d, dropout):
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.SiLU(), nn.Dropout(dropout), nn.Linear(4 * d, d),
                         nn.Dropout(dropout))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the valid frames. Positions enter as rotary embeddings (relative,
    as FastConformer's Transformer-XL encodings are, in fewer lines)."""

    def __init__(self, cfg):
        super().__init__()
        self.h = cfg.n_heads
        self.norm = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, on):
        B, T, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, T, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, d/h)
        q, k = apply_rope(q, 0, 10000.0), apply_rope(k, 0, 10000.0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=on[:, None, None, :],
                                           dropout_p=self.drop.p if self.training else 0.0)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, d)))  # (B, h, T, d/h) -> (B, T, d)


class ConvModule(nn.Module):
    """Pointwise conv to 2d, GLU, depthwise conv over time, norm, SiLU, pointwise conv. LayerNorm where
    the paper has BatchNorm, so that padded frames never enter the statistics."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.d_model
        self.norm = nn.LayerNorm(d)
        self.expand = nn.Conv1d(d, 2 * d, 1)
        self.depthwise = nn.Conv1d(d, d, cfg.conv_kernel, padding=cfg.conv_kernel // 2, groups=d)
        self.mid_norm = nn.LayerNorm(d)
        self.project = nn.Conv1d(d, d, 1)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, on):
        y = self.norm(x).masked_fill(~on[..., None], 0.0).transpose(1, 2)  # (B, d, T)
        y = F.glu(self.expand(y), dim=1).masked_fill(~on[:, None], 0.0)  # (B, 2d, T) -> (B, d, T)
        y = F.silu(self.mid_norm(self.depthwise(y).transpose(1, 2))).transpose(1, 2)  # (B, d, T)
        return self.drop(self.project(y).transpose(1, 2))  # (B, T, d)


class ConformerBlock(nn.Module):
    """x + FF/2, + MHSA, + Conv, + FF/2, LayerNorm: the macaron sandwich of Gulati et al., Sec. 2."""

    def __init__(self, cfg):
        super().__init__()
        self.ff1, self.ff2 = feed_forward(cfg.d_model, cfg.dropout), feed_forward(cfg.d_model, cfg.dropout)
        self.attn, self.conv = SelfAttention(cfg), ConvModule(cfg)
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x, on):
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn(x, on)
        x = x + self.conv(x, on)
        x = x + 0.5 * self.ff2(x)
        return self.norm(x)


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.subsample = Subsampling(cfg)
        self.blocks = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.n_layers))

    def forward(self, wave, lengths):
        """Encoder states (B, T, d) at 80 ms and their counts (B,), from waveforms (B, N) and lengths (B,)."""
        x, frames = log_mel(wave, lengths, self.cfg.n_mels)
        x, frames = self.subsample(x, frames)
        on = torch.arange(x.shape[1], device=x.device) < frames[:, None]  # (B, T)
        for block in self.blocks:
            x = block(x, on)
        return x, frames


# -----------------------------------------------------------------------------
# the prediction network, with PET: Pronunciation-aware Embeddings (Hu et al. 2024, arXiv:2404.04295)
# A token's embedding is the sum of its features' embeddings, E(v) = sum_f E_f(f(v)), f over the
# token itself and, for a Mandarin character, its syllable without tone, its tone, its initial and
# its final (Sec. 3): characters that sound alike share most of their embedding. Feature value 0
# means "none" (an English token has no tone) and embeds to zero.

PET_FEATURES = ("syllable", "tone", "initial", "final")


@dataclass
class TokenFeatures:
    """f(v) for each PET feature f and every output token v (0: none), and each feature's value count."""
    names: tuple
    values: list   # values[i][v] = f_i(v), a list of vocab_size ints per feature
    sizes: list    # sizes[i] = number of values of f_i, the "none" 0 included


def token_features(tokens, reading, names=PET_FEATURES):
    """TokenFeatures for output tokens (strings, one per id) from reading(token): the token's tonal
    syllable ('xiang1') or None; the values of each feature numbered in order of first appearance."""
    parts = [split_syllable(reading(tok)) if reading(tok) else None for tok in tokens]
    values, sizes = [], []
    for name in names:
        ids = {}
        values.append([ids.setdefault(getattr(p, FEATURE_OF[name]), len(ids) + 1) if p else 0 for p in parts])
        sizes.append(len(ids) + 1)
    return TokenFeatures(tuple(names), values, sizes)


FEATURE_OF = {"syllable": "toneless", "tone": "tone", "initial": "initial", "final": "final"}


class PETEmbedding(nn.Module):
    """E(v) = E_token(v) + sum_f E_f(f(v)) over the features on; a plain embedding with none. With share 0
    the feature tables start at zero, so that PET starts as the plain embedding and each shared row learns
    from the summed gradients of the tokens that share it; with share s each of the F tables starts at
    N(0, s / F), so that two tokens sharing every feature start at cosine s / (1 + s)."""

    def __init__(self, vocab_size, d, features=None, share=0.0):
        super().__init__()
        self.token = nn.Embedding(vocab_size, d)  # N(0, 1)
        features = features or TokenFeatures((), [], [])
        self.tables = nn.ModuleList(nn.Embedding(n, d, padding_idx=0) for n in features.sizes)
        with torch.random.fork_rng():  # the draws below leave the rest of the model's initialisation as it was
            for table in self.tables:
                nn.init.normal_(table.weight, std=math.sqrt(share / len(self.tables)))
                table.weight.data[0] = 0  # row 0 stays zero: the token has no such feature
        maps = torch.tensor(features.values, dtype=torch.long).view(len(features.sizes), vocab_size)  # (F, V)
        self.register_buffer("maps", maps)

    def forward(self, y):  # (B, U) -> (B, U, d)
        e = self.token(y)
        for table, f in zip(self.tables, self.maps):
            e = e + table(f[y])
        return e


class PredictionNet(nn.Module):
    """The transducer's label model g_u (B, U + 1, H): the previous labels' embeddings through an LSTM
    (pred_context 0), or stateless (Ghodsi et al. 2020, arXiv:2002.02562): a linear map of the last
    pred_context labels' embeddings, so that it cannot learn the whole sentence and leave the audio unheard."""

    def __init__(self, cfg, features=None):
        super().__init__()
        self.context = cfg.pred_context
        self.embed = PETEmbedding(cfg.vocab_size, cfg.pred_dim, features, cfg.pet_share)
        if self.context:
            self.mix = nn.Linear(self.context * cfg.pred_dim, cfg.pred_dim)
        else:
            self.lstm = nn.LSTM(cfg.pred_dim, cfg.pred_dim, batch_first=True)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, y, state=None):
        """y (B, U) labels (the blank first as the start symbol) -> (B, U, H) and the state after them: the
        LSTM's (h, c), or the stateless net's last pred_context - 1 labels (B, k - 1)."""
        if not self.context:
            g, state = self.lstm(self.drop(self.embed(y)), state)
            return self.drop(g), state
        k = self.context
        ids = torch.cat([y.new_full((y.shape[0], k - 1), BLANK) if state is None else state, y], 1)  # (B, k - 1 + U)
        windows = self.drop(self.embed(ids)).unfold(1, k, 1)  # (B, U, d, k): labels u - k + 1 .. u
        g = torch.relu(self.mix(windows.transpose(2, 3).flatten(2)))  # (B, U, k, d) -> (B, U, k d) -> (B, U, H)
        return self.drop(g), ids[:, ids.shape[1] - (k - 1):]

    def choose(self, take, new, old):
        """The state of each row: new where take (B,) is True, else old."""
        if self.context:
            return torch.where(take[:, None], new, old)
        return tuple(torch.where(take[None, :, None], n, o) for n, o in zip(new, old))

    def pick(self, state, rows):
        """The state of these rows (N,), in this order (a beam's surviving hypotheses)."""
        return state[rows] if self.context else tuple(s[:, rows] for s in state)


class Transducer(nn.Module):
    """FastConformer encoder, prediction network and joint z = W tanh(W_f f_t + W_g g_u) + b (Graves 2012)."""

    def __init__(self, cfg, features=None):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.predictor = PredictionNet(cfg, features)
        self.joint_enc = nn.Linear(cfg.d_model, cfg.joint_dim)
        self.joint_pred = nn.Linear(cfg.pred_dim, cfg.joint_dim, bias=False)
        self.joint_out = nn.Linear(cfg.joint_dim, cfg.vocab_size)
        self.ctc_head = nn.Linear(cfg.d_model, cfg.vocab_size) if cfg.ctc_weight else None

    def joint(self, f, g):
        """Logits (..., V) from projected encoder and prediction states that broadcast together."""
        return self.joint_out(torch.tanh(f + g))

    def forward(self, wave, lengths, targets, labels, chunk=None):
        """The RNN-T loss of each utterance (B,) for targets (B, U) (ids >= 1, padding past labels[b]):
        through joint_lattice, `chunk` frames at a time, or through the whole logits when chunk is None;
        plus ctc_weight times a CTC loss of the encoder alone, which trains the encoder to hear faster."""
        enc, frames = self.encoder(wave, lengths)
        g, _ = self.predictor(F.pad(targets.clamp(min=0), (1, 0), value=BLANK))  # (B, U + 1, H)
        f, g = self.joint_enc(enc), self.joint_pred(g)  # (B, T, J), (B, U + 1, J)
        loss = joint_loss(f, g, self.joint_out.weight, self.joint_out.bias, targets, frames, labels, chunk, BLANK)
        if self.ctc_head is not None:
            lp = self.ctc_head(enc).log_softmax(-1).transpose(0, 1)  # (B, T, V) -> (T, B, V)
            ctc = F.ctc_loss(lp.float(), targets.clamp(min=0), frames, labels, blank=BLANK, reduction="none",
                             zero_infinity=True)
            loss = loss + self.cfg.ctc_weight * ctc
        return loss


BLANK = 0


@torch.no_grad()
def greedy_decode(model, wave, lengths, max_symbols=4, feed=None):
    """Each utterance's best-first labels (a list of id lists), all rows a frame at a time: at each
    frame a row emits its argmax label and stays, up to max_symbols, until the argmax is the blank.
    feed: (targets (B, U), labels (B,)) to give the prediction network the reference's n-th label when a
    row emits its n-th (n < labels), not the label emitted: decoding with the right context, so that
    an error cannot lead to the next through the prediction network (a diagnostic of error chains)."""
    enc, frames = model.encoder(wave, lengths)
    f = model.joint_enc(enc)  # (B, T, J)
    B = f.shape[0]
    g, state = model.predictor(torch.full((B, 1), BLANK, dtype=torch.long, device=f.device))
    g = model.joint_pred(g[:, 0])  # (B, J)
    hyps, emitted = [[] for _ in range(B)], torch.zeros(B, dtype=torch.long, device=f.device)
    y, labels = feed if feed is not None else (None, None)  # the reference (B, U) and its lengths (B,)
    for t in range(f.shape[1]):
        active = t < frames  # (B,)
        for _ in range(max_symbols):
            k = model.joint(f[:, t], g).argmax(-1)  # (B,)
            emit = active & (k != BLANK)
            if not emit.any():
                break
            given = k
            if y is not None:  # the reference's label where the row still has one
                n = emitted.clamp(max=y.shape[1] - 1)
                given = torch.where(emitted < labels, y.gather(1, n[:, None])[:, 0], k)  # (B,)
            g_new, state_new = model.predictor(given[:, None], state)
            g = torch.where(emit[:, None], model.joint_pred(g_new[:, 0]), g)
            state = model.predictor.choose(emit, state_new, state)
            for b in emit.nonzero()[:, 0].tolist():
                hyps[b].append(int(k[b]))
            emitted, active = emitted + emit, emit
    return hyps


@torch.no_grad()
def beam_decode(model, wave, lengths, beam=4, max_symbols=4):
    """Each utterance's most probable labels under an alignment-length synchronous beam search (ALSD,
    Saon et al., ICASSP 2020) of `beam` hypotheses. Step i holds hypotheses y at frame t = i - |y|, so
    that all have made i moves through the T x U lattice and compare fairly: each proposes itself
    closed by a blank (y moves to frame t + 1; past the last frame it is finished) and y + v for each
    label v (same frame); proposals with the same labels are one hypothesis scored by the log-sum of
    theirs (two alignments of one label sequence); the best `beam` go on. At most max_symbols * T
    labels in all (greedy_decode: max_symbols a frame)."""
    def merge(into, y, s, parent, label):  # two alignments of labels y are one hypothesis: their log-sum
        if y in into:
            into[y][0] = float(np.logaddexp(into[y][0], s))
        else:
            into[y] = [s, parent, label]

    enc, frames = model.encoder(wave, lengths)
    f = model.joint_enc(enc)  # (B, T, J)
    pred, out = model.predictor, []
    for b in range(f.shape[0]):
        T = int(frames[b])
        # 1. the start: the empty hypothesis, the prediction network after the start symbol (blank)
        g, state = pred(torch.full((1, 1), BLANK, dtype=torch.long, device=f.device))
        hyps, score, g = [()], f.new_zeros(1), model.joint_pred(g[:, 0])  # N hypotheses: (N,), (N, J)
        finished = {}  # labels -> [log-probability summed over the alignments that ended, ...]
        for i in range(T + max_symbols * T):
            u = torch.tensor([len(y) for y in hyps], device=f.device)  # (N,)
            logp = model.joint(f[b, i - u], g).log_softmax(-1)  # (N, V): each at its own frame
            # 2. the blank: y at its next frame, or finished after the last
            proposals = {}  # labels -> [score, parent, label or BLANK]
            for n, (y, s) in enumerate(zip(hyps, (score + logp[:, BLANK]).tolist())):
                merge(finished if i - len(y) + 1 == T else proposals, y, s, n, BLANK)
            # 3. the best `beam` extensions by one label
            ext = score[:, None] + logp
            ext[:, BLANK] = -math.inf
            ext[u >= max_symbols * T] = -math.inf
            top = ext.flatten().topk(min(beam, ext.numel()))
            for s, k in zip(top.values.tolist(), top.indices.tolist()):
                n, v = divmod(k, ext.shape[1])
                if s > -math.inf:
                    merge(proposals, hyps[n] + (v,), s, n, v)
            if not proposals:
                break
            # 4. the best `beam` proposals go on; an extension steps its parent's prediction network
            hyps = sorted(proposals, key=lambda y: proposals[y][0], reverse=True)[:beam]
            parent = torch.tensor([proposals[y][1] for y in hyps], device=f.device)
            label = torch.tensor([proposals[y][2] for y in hyps], device=f.device)
            emit, old = label != BLANK, pred.pick(state, parent)
            g_new, state_new = pred(label[:, None], old)
            g = torch.where(emit[:, None], model.joint_pred(g_new[:, 0]), g[parent])
            state, score = pred.choose(emit, state_new, old), f.new_tensor([proposals[y][0] for y in hyps])
        out.append(list(max(finished, key=lambda y: finished[y][0])) if finished else [])
    return out

# -----------------------------------------------------------------------------
# use: python asr.py --wav=FILE.wav --init_from=DIR (a folder train_asr.py wrote)

def read_wav(path):
    """The samples (N,) int16 of a 16 kHz mono 16-bit PCM WAV file; ValueError saying what is wrong otherwise."""
    try:
        with wavefile.open(path, "rb") as w:
            rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            data = w.readframes(w.getnframes())
    except (wavefile.Error, EOFError) as e:
        raise ValueError(f"{path} is not a WAV file ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    if channels != 1:
        raise ValueError(f"{path} has {channels} channels; a mono file is needed (sox {path} -c 1 mono.wav)")
    if rate != SAMPLE_RATE:
        raise ValueError(f"{path} is sampled at {rate} Hz; {SAMPLE_RATE} Hz is needed (sox {path} -r 16000 out.wav)")
    if width != 2:
        raise ValueError(f"{path} has {8 * width}-bit samples; 16-bit PCM is needed")
    return np.frombuffer(data, dtype="<i2")


def load_transducer(folder):
    """The Transducer, its tokenizer and, for a romanized run, its Roman2Char, from folder/ckpt.pt."""
    ckpt = torch.load(os.path.join(folder, "ckpt.pt"), map_location="cpu", weights_only=True)
    cfg = ASRConfig(**{**ckpt["config"], "pet": tuple(ckpt["config"]["pet"])})
    features = TokenFeatures(**ckpt["features"]) if ckpt["features"] else None
    model = Transducer(cfg, features)
    model.load_state_dict(ckpt["model"])
    r2c = romanize.from_state(ckpt["roman2char"]) if ckpt["roman2char"] else None
    return model.eval(), romanize.ConcatTokenizer.from_dict(ckpt["tokenizer"]), r2c


def transcribe(model, tok, r2c, wave, lengths, beam=0, feed=None):
    """Each utterance's units (Mandarin characters and English words) from waveforms (B, N) in [-1, 1],
    decoded greedily (beam 0) or by a beam search of `beam` hypotheses; feed as greedy_decode's."""
    ids = beam_decode(model, wave, lengths, beam) if beam else greedy_decode(model, wave, lengths, feed=feed)
    units = [tok.decode(y) for y in ids]
    return romanize.to_chars_batch(r2c, units) if r2c is not None else units


def main(argv):
    parser = argparse.ArgumentParser(description="Transcribe a 16 kHz mono WAV file with a transducer.")
    parser.add_argument("--wav", required=True, help="the audio: 16 kHz, mono, 16-bit PCM")
    parser.add_argument("--init_from", default="out-asr/char", help="a folder with train_asr.py's ckpt.pt")
    parser.add_argument("--beam", type=int, default=0, help="0: greedy decoding; k: a beam search of k hypotheses")
    args = parser.parse_args(argv)
    if args.beam < 0:
        sys.exit(f"error: --beam={args.beam}: 0 (greedy) or a number of hypotheses")
    try:
        samples = read_wav(args.wav)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not os.path.exists(os.path.join(args.init_from, "ckpt.pt")):
        sys.exit(f"error: {args.init_from}/ckpt.pt not found: train one with python train_asr.py")
    model, tok, r2c = load_transducer(args.init_from)
    wave = torch.from_numpy(samples.astype(np.float32) / 32768)[None]  # (1, N)
    units = transcribe(model, tok, r2c, wave, torch.tensor([wave.shape[1]]), args.beam)[0]
    print(" ".join(units))


if __name__ == "__main__":
    main(sys.argv[1:])
