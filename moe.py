"""
moe.py: the Mixture-of-Experts layer of Nemotron 3, with LatentMoE. Read after model.py.

Papers: Nemotron 3 (NVIDIA 2025) for the layer and LatentMoE; DeepSeek-V3 (arXiv:2412.19437,
Sec. 2.1.2) for the routing it inherits: sigmoid affinities, a correction bias used only to choose
experts, group-limited top-k, selected weights normalised and scaled.

Per token u (width d):
    s        = sigmoid(u W_r^T)                      fp32 router scores, one per expert
    chosen   = top_k(s + b) within the topk_group best of n_group groups   (b: correction bias)
    g_i      = routed_scaling_factor * s_i / sum_{j in chosen} s_j          (i in chosen)
    MoE(u)   = W_up2( sum_i g_i * E_i(W_down2 u) ) + shared(u)
E_i and shared are non-gated relu^2 MLPs. With LatentMoE the routed experts read and write a
smaller latent width l through W_down2 = fc1_latent_proj (d -> l) and W_up2 = fc2_latent_proj
(l -> d); without it both are the identity. The router and the shared expert see the full width.

Shape letters: M tokens (B*T flattened), S sequences, T tokens per sequence, E routed experts,
k experts per token, F expert hidden width, l latent width, n ranks of an expert-parallel group.

The low-precision expert GEMMs (train.py --precision) live in lowprec.py, which imports this file
and hands Experts the function to call (Experts.lowprec_grouped_mm); nothing here imports lowprec.

The last section, expert parallelism, is the only code here that talks to other processes: it
takes a process group, and nothing else in the file depends on it.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import expert_gemm
import triton_ops

# -----------------------------------------------------------------------------
# routing


def route(scores, bias, top_k, n_group, topk_group, norm_topk_prob, scaling):
    """scores (M, E) sigmoid affinities, bias (E,) -> weights (M, k), expert ids (M, k)."""
    M, E = scores.shape
    choice = scores + bias  # the bias steers which experts are chosen, never the weights
    # 1) keep the topk_group groups whose two best experts score highest (one group: all of them)
    if n_group > 1:
        choice = limit_to_groups(choice, n_group, topk_group)
    # 2) top-k experts among the kept groups
    idx = choice.topk(top_k, dim=-1, sorted=False)[1]
    # 3) weights from the raw scores, normalised over the chosen experts, then scaled
    weights = scores.gather(1, idx)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, idx


def limit_to_groups(choice, n_group, topk_group):
    """Set to -inf the scores of experts outside the topk_group best of n_group groups."""
    M, E = choice.shape
    group_scores = choice.view(M, n_group, E // n_group).topk(min(2, E // n_group), dim=-1)[0].sum(-1)
    group_idx = group_scores.topk(topk_group, dim=-1, sorted=False)[1]  # (M, topk_group)
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0).bool()  # (M, n_group)
    expert_mask = group_mask[:, :, None].expand(M, n_group, E // n_group).reshape(M, E)
    return choice.masked_fill(~expert_mask, float("-inf"))


class Router(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        # not a parameter: balance_experts moves it, outside the optimizer
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_experts))
        self.cfg = cfg
        self.stats = None  # training only: [tokens per expert (E), summed router entropy, tokens]
        self.aux_loss = None  # training with moe_seq_aux_coef > 0: alpha * L_bal of the last forward

    def forward(self, u, n_seq=1):
        """u (M, d), the tokens of n_seq sequences of equal length -> weights, expert ids (M, k)."""
        c = self.cfg
        scores = torch.sigmoid(F.linear(u.float(), self.weight.float()))  # (M, E) in fp32
        weights, idx = route(scores, self.e_score_correction_bias.float(), c.top_k, c.n_group,
                             c.topk_group, c.norm_topk_prob, c.routed_scaling_factor)
        self.aux_loss = None
        if self.training and c.moe_seq_aux_coef > 0:  # train.py adds it to the loss it backpropagates
            self.aux_loss = c.moe_seq_aux_coef * seq_balance_loss(scores, idx, n_seq)
        if self.training:  # what balance_experts and balance_metrics read after the optimizer step
            with torch.no_grad():
                load = torch.bincount(idx.flatten(), minlength=c.n_experts).float()
                p = scores / scores.sum(-1, keepdim=True)  # the scores as a distribution over experts
                entropy = -(p * p.clamp_min(1e-20).log()).sum()
                stats = torch.cat([load, entropy[None], load.new_tensor([len(idx)])])
            self.stats = stats if self.stats is None else self.stats + stats
        return weights, idx

    def take_stats(self):
        """The statistics summed since the last call (zeros if the router saw no training tokens)."""
        stats, self.stats = self.stats, None
        return stats if stats is not None else self.weight.new_zeros(self.cfg.n_experts + 2, dtype=torch.float32)


def seq_balance_loss(scores, idx, n_seq):
    """DeepSeek-V3's complementary sequence-wise balance loss (Sec. 2.1.2, eqs. 17-20), before its
    factor alpha: per sequence of T tokens, f_i = E / (k T) * (copies routed to expert i) and
    P_i = the mean over its tokens of s_i / sum_j s_j; L_bal = sum_i f_i P_i, averaged over the
    n_seq sequences. 1 when balanced; only P carries a gradient (to the router weights).
    scores (M, E) sigmoid affinities, idx (M, k) the chosen experts, M = n_seq * T."""
    M, E = scores.shape
    k = idx.size(1)
    T = M // n_seq
    ones = scores.new_ones(n_seq, T * k)
    counts = scores.new_zeros(n_seq, E).scatter_add_(1, idx.view(n_seq, T * k), ones)  # (S, E), from (S, T*k) ids
    f = counts * E / (k * T)
    P = (scores / scores.sum(-1, keepdim=True)).view(n_seq, T, E).mean(1)  # (S, E)
    return (f * P).sum(1).mean()


@torch.no_grad()
def balance_experts(routers, stats, gamma):
    """Aux-loss-free load balancing (DeepSeek-V3, Sec. 2.1.2), run after each optimizer step: each
    expert's correction bias b_i moves by gamma toward balance, b_i += gamma * sign(mean load -
    load_i), so an overloaded expert is chosen less often, an idle one more. stats (layers, E+2):
    the routers' take_stats(), summed over data-parallel ranks so that every rank moves alike."""
    for router, s in zip(routers, stats):
        load = s[:-2]
        router.e_score_correction_bias += gamma * torch.sign(load.mean() - load)


def routing_step(routers, gamma):
    """After each optimizer step: the step's routing statistics (layers, E+2) of every router
    (take_stats), summed over the ranks when torch.distributed runs, the correction biases moved by
    balance_experts when gamma > 0; returns the stats for balance_metrics (None without routers)."""
    if not routers:
        return None
    stats = torch.stack([r.take_stats() for r in routers])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    if gamma > 0:
        balance_experts(routers, stats, gamma)
    return stats


def balance_metrics(stats):
    """Per MoE layer, from stats (layers, E+2): busiest expert's load over the mean load, its share
    of the token copies, and the mean entropy of the router's score distribution (nats)."""
    load = stats[:, :-2]
    busiest = load.max(dim=1).values
    return {"load_max_over_mean": (busiest / load.mean(dim=1).clamp_min(1e-20)).tolist(),
            "busiest_share": (busiest / load.sum(dim=1).clamp_min(1e-20)).tolist(),
            "router_entropy": (stats[:, -2] / stats[:, -1].clamp_min(1)).tolist()}


# -----------------------------------------------------------------------------
# experts


class MLP(nn.Module):
    """Non-gated squared-ReLU MLP (Nemotron-H's feed-forward and the MoE's shared expert)."""

    def __init__(self, d_model, d_ff):
        super().__init__()
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.relu(self.up_proj(x)).square())


def experts_loop(x, weights, idx, up_proj, down_proj):
    """The reference the dispatch below must match (tests, bench.py moe): the same maths with a
    Python loop over experts. x (M, l), weights and idx (M, k), up_proj (E, F, l), down_proj
    (E, l, F) -> (M, l)."""
    M, k = idx.shape
    order = idx.flatten().argsort(stable=True)  # (M*k,): copy m*k + j of token m is its j-th choice
    counts = torch.bincount(idx.flatten(), minlength=up_proj.size(0)).tolist()
    token = order // k  # (M*k,): the token of each sorted copy
    xs = x[token].split(counts)  # per expert: the tokens it serves
    # unbind once: indexing up_proj[e] per expert would make autograd write E full-size grads
    up, down = up_proj.unbind(0), down_proj.unbind(0)
    ys = [F.linear(F.relu(F.linear(xe, up[e])).square(), down[e]) for e, xe in enumerate(xs) if len(xe)]
    ys = torch.cat(ys).float() * weights.flatten()[order, None]  # (M*k, l), summed in fp32
    return torch.zeros_like(x, dtype=torch.float32).index_add_(0, token, ys).to(x.dtype)


DECODE_ROWS = 64  # at most this many tokens, compiled, no autograd: Experts.forward takes experts_static


def experts_static(x, weights, idx, up_proj, down_proj):
    """The experts for a few tokens (decoding) in shapes fixed by M, k and E alone, for a compiled
    decode step: each token copy gathers its expert's weights, no sort and no counts (bincount's
    length is data, which torch.compile cannot trace). Compiled, the gather fuses into the matmul
    and nothing is copied (0.15 against 0.48 ms for every expert mixed by the routing weights, 16
    tokens, 8 experts; LOG.md); eager, it copies the weights, which is why Experts.forward calls
    it only when compiling. Same arguments and result as experts_loop."""
    M, k = idx.shape
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    xs = x.to(dtype).repeat_interleave(k, dim=0)[:, :, None]  # (M*k, l, 1): copy m*k + j of token m
    h = F.relu(torch.bmm(up_proj.to(dtype)[idx.flatten()], xs)).square()  # (M*k, F, 1)
    y = torch.bmm(down_proj.to(dtype)[idx.flatten()], h)[:, :, 0].float()  # (M*k, l)
    return (y.view(M, k, -1) * weights[:, :, None]).sum(1).to(x.dtype)  # (M, l), summed in fp32


def grouped_mm_ref(x, w, offs):
    """Grouped GEMM, the PyTorch reference of grouped_mm_triton. x (N, K) holds the rows of E
    groups one after another, offs (E,) int32 the end row of each (offs[-1] = N), w (E, K, n):
    rows offs[g-1]:offs[g] of the result (N, n) are those rows of x times w[g]. Differentiable."""
    return GroupedMM.apply(x, w, offs, mm_by_groups)


def grouped_mm_triton(x, w, offs):
    """grouped_mm_ref on expert_gemm's Triton kernels: all experts' GEMMs in one launch, x and w of one
    dtype (fp32 or bf16, any strides), accumulated in fp32; offs may repeat (an expert without rows)."""
    return GroupedMM.apply(x, w, offs, expert_gemm.grouped_mm_nograd)


class GroupedMM(torch.autograd.Function):
    # torch._grouped_mm has an autograd formula, but in torch 2.13 on CPU it fails on gradients
    # that are not plain row-major (e.g. the stride-0 gradient of a .sum()), so the backward is
    # written out: dx is again a grouped GEMM, against the transposed weights, and dw[g] = x_g^T dy_g
    # is the "k-grouped" form of the same op (groups along the summed dimension). mm is the op in
    # both forms: mm_by_groups, or expert_gemm.grouped_mm_nograd on the kernels.
    @staticmethod
    def forward(ctx, x, w, offs, mm):
        ctx.save_for_backward(x, w, offs)
        ctx.mm = mm
        return mm(x, w, offs)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        mm, dy = ctx.mm, dy.to(x.dtype).contiguous()
        dx = mm(dy, w.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:  # in w's own layout: another would make the .grad update a strided copy
            dw = mm(dy.t(), x, offs).transpose(1, 2) if w.stride(1) == 1 else mm(x.t(), dy, offs)
        return dx, dw, None, None


def mm_by_groups(a, b, offs):
    """a (N, K) @ b (E, K, n) -> (N, n), rows grouped by offs; or a (K, N) @ b (N, n) -> (E, K, n),
    the summed dimension N grouped by offs. torch._grouped_mm where it runs, else padded bmm."""
    if grouped_mm_runs(a, b):
        return torch._grouped_mm(a, b, offs=offs)
    if b.dim() == 3:  # a's rows padded per group to the largest group, one bmm, padding dropped
        a_pad, group, slot = pad_groups(a, offs)  # (E, C, K)
        return torch.bmm(a_pad, b)[group, slot]  # (N, n)
    a_pad = pad_groups(a.t(), offs)[0]  # (E, C, K)
    return torch.bmm(a_pad.transpose(1, 2), pad_groups(b, offs)[0])  # (E, K, n)


def grouped_mm_runs(a, b):
    """Whether torch._grouped_mm takes these operands. Measured on torch 2.13's CPU kernel: fp32,
    bf16 or fp16 only, and every stride but the unit one a multiple of 16 bytes. On a GPU the
    Triton kernel is the fast path and the padded bmm serves as the debug path, so CPU only."""
    def ok(t):
        aligned = all(s * t.element_size() % 16 == 0 for s in t.stride() if s != 1)
        return t.dtype in (torch.float32, torch.bfloat16, torch.float16) and aligned

    return hasattr(torch, "_grouped_mm") and a.device.type == "cpu" and ok(a) and ok(b)


def pad_groups(t, offs):
    """Rows of t (N, K), grouped by offs -> (E, C, K) zero-padded to the largest group C, and the
    (group, slot) of each row."""
    counts = torch.diff(offs, prepend=offs.new_zeros(1))  # (E,)
    group = torch.repeat_interleave(torch.arange(len(offs), device=t.device), counts)  # (N,)
    slot = torch.arange(len(group), device=t.device) - (offs - counts)[group]  # (N,)
    padded = t.new_zeros(len(offs), int(counts.max()), t.size(1))
    padded[group, slot] = t
    return padded, group, slot


class Experts(nn.Module):
    """E routed relu^2 experts stored as two stacked weights, as transformers' NemotronH does."""

    def __init__(self, n_experts, d_in, d_ff):
        super().__init__()
        self.up_proj = nn.Parameter(torch.empty(n_experts, d_ff, d_in))  # (E, F, l)
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_in, d_ff))  # (E, l, F)
        # set by lowprec.apply_precision (train.py --precision), which imports this file (never the other
        # way): the grouped GEMM on quantized operands, lowprec_grouped_mm(x, w, offs, recipe, name), and
        # its recipe. None: the GEMMs run in high precision. Neither is in the state_dict.
        self.lowprec_grouped_mm = None
        self.recipe = None

    def forward(self, x, weights, idx):
        """x (M, l), weights and idx (M, k) -> (M, l). Dropless: every token copy is served, by one
        grouped GEMM per projection over all experts (on expert_gemm's kernels on a GPU)."""
        M, k = idx.shape
        if M <= DECODE_ROWS and torch.compiler.is_compiling() and not torch.is_grad_enabled():
            return experts_static(x, weights, idx, self.up_proj, self.down_proj)  # a compiled decode step
        # 1) sort the M*k token copies by expert; expert e serves sorted rows offs[e-1]:offs[e]
        order = idx.flatten().argsort(stable=True)  # (M*k,): copy m*k + j of token m is its j-th choice
        token = order // k  # (M*k,): the token of each sorted copy
        offs = torch.bincount(idx.flatten(), minlength=self.up_proj.size(0)).cumsum(0).to(torch.int32)  # (E,)
        # 2) the experts' relu^2 MLPs as two grouped GEMMs, in autocast's dtype where it is on, or
        # on quantized operands (train.py --precision: what lowprec.apply_precision set, see __init__)
        if self.lowprec_grouped_mm is not None:
            mm = self.lowprec_grouped_mm
            h = mm(x[token], self.up_proj, offs, self.recipe, "up_proj")  # (M*k, F)
            y = mm(F.relu(h).square(), self.down_proj, offs, self.recipe, "down_proj")  # (M*k, l)
        else:
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            mm = grouped_mm_triton if triton_ops.use_triton(x) else grouped_mm_ref
            h = mm(x[token].to(dtype), self.up_proj.to(dtype).transpose(1, 2), offs)  # (M*k, F)
            y = mm(F.relu(h).square(), self.down_proj.to(dtype).transpose(1, 2), offs)  # (M*k, l)
        # 3) weight each copy's output and add it to its token, in fp32
        y = y.float() * weights.flatten()[order, None]
        return torch.zeros_like(x, dtype=torch.float32).index_add_(0, token, y).to(x.dtype)


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        latent = cfg.moe_latent_size
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_experts, latent or cfg.d_model, cfg.moe_d_ff)
        self.shared_experts = MLP(cfg.d_model, cfg.shared_d_ff)
        if latent is not None:  # LatentMoE: routed experts live in width l < d
            self.fc1_latent_proj = nn.Linear(cfg.d_model, latent, bias=False)
            self.fc2_latent_proj = nn.Linear(latent, cfg.d_model, bias=False)
        self.latent = latent is not None
        self.ep_group = None  # set by shard_experts: this layer holds E/n experts, dispatches by all-to-all

    def forward(self, u):
        shape = u.shape
        u = u.reshape(-1, shape[-1])  # (M, d)
        weights, idx = self.gate(u, n_seq=shape[0] if len(shape) == 3 else 1)  # (M, k) each
        x = self.fc1_latent_proj(u) if self.latent else u  # (M, l)
        if self.ep_group is None:
            y = self.experts(x, weights, idx)  # (M, l)
        else:
            y = dispatch_experts(self.experts, x, weights, idx, self.ep_group)  # (M, l)
        y = self.fc2_latent_proj(y) if self.latent else y  # (M, d)
        return (y + self.shared_experts(u)).view(shape)


def moe_costs(model, T):
    """The MoE layers' share of a Nemotron's training FLOPs per token at sequence length T (6 per
    active weight, as model.flops_per_token counts them: the router, the shared expert, the latent
    projections and k routed experts; the top-k and the scatter are not counted) and of its
    parameter memory (embeddings included). Call it on the whole model, before any sharding."""
    cfg, moes = model.config, [m for m in model.modules() if isinstance(m, MoE)]
    params = sum(p.numel() for m in moes for p in m.parameters())
    per_expert = sum(p[0].numel() for m in moes[:1] for p in m.experts.parameters())
    active = params - len(moes) * (cfg.n_experts - cfg.top_k) * per_expert
    return {"moe_flops_share": 6 * active / model.flops_per_token(T),
            "moe_param_share": params / sum(p.numel() for p in model.parameters())}


# -----------------------------------------------------------------------------
# expert parallelism (distributed): every function below takes a process group
#
# The n ranks of an EP group split each MoE layer's routed experts: group rank r holds experts
# [r*E/n, (r+1)*E/n). The router, shared expert and latent projections stay whole on every rank.
# After routing, each token copy travels to the rank of its expert and its result comes back, by
# two all-to-alls with uneven splits. Every rank of the group must run the same MoE layers the
# same number of times (forward and backward), or the collectives wait forever.


def all_to_all(x, out_splits, in_splits, group):
    """Rows x[sum(in_splits[:j]) : sum(in_splits[:j+1])] go to rank j; rank j's rows for us
    arrive as out_splits[j] rows, in rank order."""
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """all_to_all with a gradient: the backward sends each row's gradient back where it came from."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def dispatch_experts(experts, x, weights, idx, group):
    """Expert-parallel Experts.forward: x (M, l), weights and idx (M, k) with global expert ids
    -> (M, l), what all E experts in one process would give. experts holds this rank's E/n."""
    M, k = idx.shape
    n, E_local = dist.get_world_size(group), experts.up_proj.size(0)
    # 1) sort the token copies by expert: the copies bound for each rank are one contiguous run
    order = idx.flatten().argsort()  # (M*k,): copy m*k + j of token m is its j-th choice
    token = order // k  # (M*k,): the token of each sorted copy
    counts = torch.bincount(idx.flatten(), minlength=n * E_local)  # (E,)
    # 2) exchange the counts: recv[j, e] = copies rank j sends to our local expert e
    recv = all_to_all(counts, [E_local] * n, [E_local] * n, group).view(n, E_local)  # (n, E/n)
    send_splits = counts.view(n, E_local).sum(1).tolist()  # (n,): copies we send to each rank
    recv_splits = recv.sum(1).tolist()  # (n,): copies each rank sends us
    # 3) the copies travel to their experts' ranks and arrive grouped by source rank, then expert
    xr = AllToAll.apply(x[token], recv_splits, send_splits, group)  # (R, l), R copies received
    local = torch.repeat_interleave(torch.arange(E_local, device=x.device).repeat(n), recv.flatten())  # (R,)
    # each received copy runs through its one expert at weight 1: the routing weights are applied
    # at home, where the router's gradient is. footgun: a rank may receive no copies at all and
    # must still take part in both backward all-to-alls: the empty input passes through as is,
    # which keeps its gradient path to x (the loop over experts would fail on it anyway)
    yr = experts(xr, xr.new_ones(len(local), 1), local[:, None]) if len(local) else xr  # (R, l)
    # 4) the results travel back by the reverse all-to-all, in the sorted order of step 1
    y = AllToAll.apply(yr, send_splits, recv_splits, group)  # (M*k, l)
    y = y.float() * weights.flatten()[order, None]  # summed in fp32, as Experts.forward does
    return torch.zeros_like(x, dtype=torch.float32).index_add_(0, token, y).to(x.dtype)


def shard_experts(moe, group):
    """Keep only this rank's E/n routed experts of an MoE layer, which from now on dispatches
    its token copies over group."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    for name in ("up_proj", "down_proj"):
        full = getattr(moe.experts, name)
        setattr(moe.experts, name, nn.Parameter(full.detach().chunk(n)[r].clone()))  # (E/n, ...)
    moe.ep_group = group


def gather_experts(t, group):
    """The full (E, ...) tensor from the shards t (E/n, ...) that the ranks of group hold."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def unshard_experts(moe):
    """The reverse of shard_experts: every rank holds all E experts again and routes locally."""
    for name in ("up_proj", "down_proj"):
        shard = getattr(moe.experts, name)
        setattr(moe.experts, name, nn.Parameter(gather_experts(shard.detach(), moe.ep_group)))
    moe.ep_group = None
