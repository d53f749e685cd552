"""
Aux-loss-free load balancing of moe.py (DeepSeek-V3 Sec. 2.1.2): the routing statistics a router
collects in training, the bias update's direction and size, the balance metrics, and that the
update really evens out a skewed router. Then the optional sequence-wise balance loss (same
section): its value, off by default, and its gradient to the router. Then the dropless dispatch:
Experts' grouped GEMMs against the per-expert loop (experts_loop), outputs and gradients.

Run: python -m pytest -q tests/test_moe.py
"""

import pytest
import torch

from helpers import assert_close
from model import Nemotron, NemotronConfig
from moe import MoE, Router, balance_experts, balance_metrics, moe_costs, route, seq_balance_loss
from moe import Experts, experts_loop, grouped_mm_ref

CFG = NemotronConfig(d_model=16, n_experts=8, top_k=2)


def make_router(seed=0):
    torch.manual_seed(seed)
    router = Router(CFG)
    torch.nn.init.normal_(router.weight, std=0.5)
    return router


def test_stats_are_collected_in_training_only():
    router = make_router()
    u = torch.randn(50, 16)
    router.eval()
    router(u)
    assert router.stats is None
    router.train()
    _, idx = router(u)
    _, idx2 = router(u[:20])
    stats = router.take_stats()
    load = torch.bincount(torch.cat([idx, idx2]).flatten(), minlength=8).float()
    assert torch.equal(stats[:-2], load) and stats[-1] == 70  # tokens seen
    scores = torch.sigmoid(u @ router.weight.T)
    p = scores / scores.sum(-1, keepdim=True)
    entropy = -(p * p.log()).sum() + -(p[:20] * p[:20].log()).sum()
    assert_close(stats[-2], entropy, "summed router entropy", atol=1e-3, rtol=1e-5)
    assert router.stats is None  # taken
    assert torch.equal(router.take_stats(), torch.zeros(10))


def test_bias_moves_against_the_load():
    """b_i += gamma * sign(mean load - load_i): busy experts down, idle ones up, average ones stay."""
    routers = [make_router(0), make_router(1)]
    stats = torch.zeros(2, 10)
    stats[0, :8] = torch.tensor([10., 0, 5, 5, 5, 5, 5, 5])  # mean 5
    stats[1, :8] = 4.0  # perfectly balanced
    balance_experts(routers, stats, gamma=0.01)
    assert torch.equal(routers[0].e_score_correction_bias, torch.tensor([-0.01, 0.01, 0, 0, 0, 0, 0, 0]))
    assert torch.equal(routers[1].e_score_correction_bias, torch.zeros(8))


def test_bias_changes_selection_not_weights():
    scores = torch.sigmoid(torch.randn(30, 8))
    bias = torch.zeros(8)
    bias[3] = 10.0  # expert 3 is chosen by every token ...
    w, idx = route(scores, bias, 2, 1, 1, False, 1.0)
    assert (idx == 3).any(dim=1).all()
    assert_close(w, scores.gather(1, idx), "weights are the raw scores", atol=0)  # ... at its own score


def test_balance_metrics():
    stats = torch.tensor([[6., 2, 2, 2, 3.0, 3], [3., 3, 3, 3, 0.0, 3]])  # 4 experts, entropy sum, tokens
    m = balance_metrics(stats)
    assert m["load_max_over_mean"] == pytest.approx([2.0, 1.0])
    assert m["busiest_share"] == pytest.approx([0.5, 0.25])
    assert m["router_entropy"] == pytest.approx([1.0, 0.0])


def test_seq_balance_loss_value():
    """L_bal = sum_i f_i P_i per sequence, averaged over sequences, against DeepSeek-V3's eqs.
    17-20 written out as loops; and exactly 1 when balanced."""
    g = torch.Generator().manual_seed(0)
    S, T, E, k = 3, 10, 8, 2
    scores = torch.sigmoid(torch.randn(S * T, E, generator=g))
    _, idx = route(scores, torch.zeros(E), k, 1, 1, True, 1.0)
    expected = 0.0
    for s in range(S):
        for i in range(E):
            tokens = range(s * T, (s + 1) * T)
            f = E / (k * T) * sum(i in idx[t].tolist() for t in tokens)
            P = sum(scores[t, i] / scores[t].sum() for t in tokens) / T
            expected += f * P / S
    assert_close(seq_balance_loss(scores, idx, S), expected, "L_bal", atol=1e-6, rtol=1e-6)
    # every expert chosen equally often, all scores equal: f_i = 1, P_i = 1/E
    cycle = torch.arange(E).view(E // k, k).repeat(2, 1)  # (8, 2): 8 tokens, each expert twice
    assert_close(seq_balance_loss(torch.full((8, E), 0.5), cycle, 1), 1.0, "balanced L_bal", atol=1e-6)


def test_seq_balance_loss_off_by_default():
    """moe_seq_aux_coef = 0 (the default): nothing is computed, in training or not."""
    assert NemotronConfig().moe_seq_aux_coef == 0.0
    torch.manual_seed(0)
    model = Nemotron(NemotronConfig(d_model=16, pattern="E-E", d_ff=16, moe_d_ff=8, shared_d_ff=8)).train()
    model(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8)))
    assert all(m.gate.aux_loss is None for m in model.modules() if isinstance(m, MoE))


def test_seq_balance_loss_in_the_router():
    """With moe_seq_aux_coef = alpha, a router in training keeps alpha * L_bal of the batch's
    sequences (MoE tells it how many), its gradient reaches the router weights, and eval mode
    computes none."""
    cfg = NemotronConfig(d_model=16, n_experts=8, top_k=2, moe_d_ff=8, shared_d_ff=8, moe_seq_aux_coef=0.1)
    torch.manual_seed(0)
    moe = MoE(cfg).train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    u = torch.randn(3, 10, 16)  # (B, T, d)
    moe(u)
    aux = moe.gate.aux_loss
    scores = torch.sigmoid(u.view(30, 16) @ moe.gate.weight.T)  # (B*T, E)
    _, idx = route(scores, torch.zeros(8), 2, 1, 1, True, 1.0)
    assert_close(aux, 0.1 * seq_balance_loss(scores, idx, 3), "alpha * L_bal", atol=1e-7, rtol=1e-6)
    aux.backward()
    grad = moe.gate.weight.grad
    assert grad is not None and grad.abs().max() > 0
    assert all(p.grad is None for n, p in moe.named_parameters() if not n.startswith("gate."))
    moe.eval()
    moe(u)
    assert moe.gate.aux_loss is None


def test_moe_costs():
    """A LatentMoE layer's share of FLOPs counts its router, shared expert, latent projections and
    k of its E experts; its share of memory all of them (embeddings in the denominator)."""
    cfg = NemotronConfig(d_model=16, pattern="-E", d_ff=32, n_experts=8, top_k=2, moe_d_ff=12,
                         shared_d_ff=20, moe_latent_size=4)
    model = Nemotron(cfg)
    d, l, F, E, k = 16, 4, 12, 8, 2
    active = E * d + 2 * d * 20 + 2 * d * l + k * 2 * l * F
    total = E * d + 2 * d * 20 + 2 * d * l + E * 2 * l * F
    costs = moe_costs(model, T=64)
    assert costs["moe_flops_share"] == pytest.approx(6 * active / model.flops_per_token(64))
    assert costs["moe_param_share"] == pytest.approx(total / sum(p.numel() for p in model.parameters()))


def test_balancing_evens_out_a_skewed_router():
    """A router that sends every token to expert 0 (4x the mean load): 300 steps of the bias
    update, no training, bring the busiest expert within 1.3x of the mean load. (Two experts with
    identical preferences would instead trade the same tokens back and forth: the sign rule moves
    both biases by gamma every step.)"""
    router = make_router(2)
    with torch.no_grad():
        router.weight[0] += 1.5  # expert 0 attracts every token
    router.train()
    g = torch.Generator().manual_seed(0)
    for step in range(300):
        router(torch.randn(256, 16, generator=g) + 1.0)  # inputs with a mean that row 0 matches
        stats = router.take_stats()[None]
        if step == 0:
            before = balance_metrics(stats)["load_max_over_mean"][0]
        balance_experts([router], stats, gamma=0.01)
    router(torch.randn(2048, 16, generator=g) + 1.0)
    after = balance_metrics(router.take_stats()[None])["load_max_over_mean"][0]
    assert before > 3.5 and after < 1.3, (before, after)


# -----------------------------------------------------------------------------
# dropless dispatch: one grouped GEMM per projection == a loop over experts


def dispatch_inputs(M, E, k, l, F, idle=(1, 5), dtype=torch.float32, seed=0):
    """Experts with random weights, and random routing that never picks the `idle` experts."""
    g = torch.Generator().manual_seed(seed)
    experts = Experts(E, l, F)
    with torch.no_grad():
        experts.up_proj.normal_(0, 0.3, generator=g)
        experts.down_proj.normal_(0, 0.3, generator=g)
    busy = torch.tensor([e for e in range(E) if e not in idle])
    idx = busy[torch.rand(M, len(busy), generator=g).argsort(-1)[:, :k]]  # (M, k) distinct experts
    weights, x = torch.rand(M, k, generator=g), torch.randn(M, l, generator=g)
    return experts.to(dtype), x.to(dtype), weights, idx


def outputs_and_grads(fn, experts, x, weights, idx, dy):
    x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    y = fn(x, weights, idx)
    y.backward(dy)
    return [y, x.grad, weights.grad, experts.up_proj.grad, experts.down_proj.grad]


@pytest.mark.parametrize("M,l,F,dtype", [(40, 16, 32, torch.float32),  # torch._grouped_mm
                                         (40, 6, 10, torch.float32),   # widths it rejects: padded bmm
                                         (1, 16, 32, torch.float32),   # fewer tokens than experts
                                         (40, 16, 32, torch.bfloat16)])
def test_dispatch_matches_expert_loop(M, l, F, dtype):
    """Output and gradients of x, weights, up_proj, down_proj, with experts 1 and 5 (and, at M=1,
    most others) receiving no token. fp32: the same products summed per expert, atol 1e-5; bf16:
    the same bf16 GEMMs on both sides, a few bf16 ulps (2e-2 relative)."""
    experts, x, weights, idx = dispatch_inputs(M, E=8, k=3, l=l, F=F, dtype=dtype)
    dy = torch.randn(M, l, generator=torch.Generator().manual_seed(1)).to(dtype)
    loop = lambda x, w, i: experts_loop(x, w, i, experts.up_proj, experts.down_proj)
    ours = outputs_and_grads(experts, experts, x, weights, idx, dy)
    ref = outputs_and_grads(loop, experts, x, weights, idx, dy)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for name, a, b in zip(["y", "dx", "dweights", "dup_proj", "ddown_proj"], ours, ref):
        assert_close(a.float(), b.float(), name, **tol)
    assert ours[3][[1, 5]].abs().sum() == 0 and ours[4][[1, 5]].abs().sum() == 0  # idle experts


def test_grouped_mm_ref_backward_takes_a_broadcast_gradient():
    """Regression (issue 4): torch._grouped_mm's own backward fails in torch 2.13 on CPU when the
    incoming gradient has stride 0, as the gradient of y.sum() has; grouped_mm_ref's does not."""
    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 4]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(12, 8, generator=g, requires_grad=True)
    w = torch.randn(4, 8, 16, generator=g, requires_grad=True)
    grouped_mm_ref(x, w, offs).sum().backward()
    dx = torch.cat([w[e].sum(1).expand(c, 8) for e, c in enumerate(counts)])  # d/dx of sum(x_g @ w[g])
    dw = torch.stack([xg.sum(0)[:, None].expand(8, 16) for xg in x.split(counts)])
    assert_close(x.grad, dx, "dx", atol=1e-5, rtol=1e-5)
    assert_close(w.grad, dw, "dw", atol=1e-5, rtol=1e-5)
