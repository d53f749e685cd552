"""
asr.py: speech recognition with transducers. Read after model.py.

So far: the RNN-Transducer loss (Graves 2012, arXiv:1211.3711, Sec. 2), a PyTorch reference and a
Triton kernel beside it.

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
import math

import torch

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
    """alpha and beta, (B, T, U + 1) each (-inf outside a sequence's lattice), diagonal by diagonal
    in PyTorch: what the Triton kernel computes."""
    B, T, U1 = blank_lp.shape
    alpha = blank_lp.new_full((B, T, U1), NEG)
    beta = blank_lp.new_full((B, T, U1), NEG)
    for b in range(B):
        Tb, Ub = int(frames[b]), int(labels[b])
        bl, la = blank_lp[b, :Tb, :Ub + 1], label_lp[b, :Tb, :Ub]
        a, be = alpha[b, :Tb, :Ub + 1], beta[b, :Tb, :Ub + 1]
        label_at = lambda t, u: la[t, u.clamp(0, Ub - 1)] if Ub else torch.full(u.shape, NEG)  # label(t, u)
        for d in range(Tb + Ub):
            u = torch.arange(max(0, d - Tb + 1), min(d, Ub) + 1)  # the points t + u = d inside
            t = d - u
            from_t = torch.where(t > 0, a[(t - 1).clamp(min=0), u] + bl[(t - 1).clamp(min=0), u], NEG)
            from_u = torch.where(u > 0, a[t, (u - 1).clamp(min=0)] + label_at(t, u - 1), NEG)
            a[t, u] = torch.where((t == 0) & (u == 0), 0.0, torch.logaddexp(from_t, from_u))
        for d in reversed(range(Tb + Ub)):
            u = torch.arange(max(0, d - Tb + 1), min(d, Ub) + 1)
            t = d - u
            down = torch.where(t < Tb - 1, be[(t + 1).clamp(max=Tb - 1), u] + bl[t, u], NEG)
            right = torch.where(u < Ub, be[t, (u + 1).clamp(max=Ub)] + label_at(t, u), NEG)
            be[t, u] = torch.where((t == Tb - 1) & (u == Ub), bl[t, u], torch.logaddexp(down, right))
    return alpha, beta


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
    B, T, U1, _ = logits.shape
    if frames.shape != (B,) or labels.shape != (B,) or frames.min() < 1 or frames.max() > T \
            or labels.min() < 0 or labels.max() > U1 - 1:
        raise ValueError(f"frames must be (B,) in [1, {T}] and labels (B,) in [0, {U1 - 1}]")
    blank_lp, label_lp = rnnt_lattice(logits, targets.clamp(min=0), blank)
    return _RNNTLoss.apply(blank_lp, label_lp, frames, labels)
