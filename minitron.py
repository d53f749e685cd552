"""
minitron.py: structured pruning of a trained hybrid (Minitron, arXiv:2407.14679; Minitron-SSM,
arXiv:2504.11409), the pieces prune.py searches with. Read after model.py, mamba.py and distill.py.

1) importance from activations on calibration batches (the model in eval mode, no gradients):
   - embedding channels: mean |x| of every RMSNorm's output (each block's and the final one), summed;
   - MLP neurons (and the shared expert's): mean |relu(W_up x)^2|, down_proj's input;
   - attention: each query head's mean |output|, summed over the heads of a KV group (whole groups go);
   - Mamba heads: mean |y| of the head's channels at out_proj's input (after the gated norm), and
     head channels: the same, summed over the heads (one set of P' channels kept in every head);
   - routed experts: the routing weight each receives, summed over the tokens; their neurons: mean
     |relu(W_up x)^2| over the tokens routed to each expert;
   - depth: the increase of the LM loss when the layer is skipped (its block made the identity).
2) a Plan: how many of each to keep (uniform per layer kind, so the result is a plain NemotronConfig
   that transformers' NemotronH also loads) and which layers stay; plan_config gives its config.
3) prune(model, plan, scores): the smaller model with the most important parts' weights copied.
   Mamba heads, group-aware (Minitron-SSM): the same number of heads kept in each of the G groups,
   so the B and C projections of every group stay whole and each kept head keeps its own group;
   "naive" keeps the most important heads anywhere and renumbers them into groups in order, so a
   head may meet another group's B and C (the ablation). in_proj's z, x, B, C and dt rows, the
   conv's x channels, dt_bias, A_log, D, the gated norm's weight and out_proj's columns follow.
   Routed experts: the most used kept, with their router rows and correction biases, each keeping
   its own most active neurons (moe_d_ff, uniform); their d_model side follows the embedding
   channels. MTP depths are not pruned (a model with them is refused).
"""
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from model import Nemotron, NemotronConfig, RMSNorm


@dataclass(frozen=True)
class Plan:
    d_model: int          # embedding channels kept
    d_ff: int             # neurons of each MLP layer (-)
    shared_d_ff: int      # neurons of each MoE layer's shared expert
    mamba_heads: int      # heads of each Mamba layer (a multiple of mamba_groups)
    n_kv_head: int        # KV groups of each attention layer (their query heads go with them)
    layers: tuple         # indices of the layers kept, in order
    n_experts: int = 0    # routed experts of each MoE layer (0: all)
    mamba_head_dim: int = 0  # channels of each Mamba head, P (0: all)
    moe_d_ff: int = 0     # neurons of each routed expert (0: all)


def full_plan(cfg):
    return Plan(cfg.d_model, cfg.d_ff, cfg.shared_d_ff, cfg.mamba_heads, cfg.n_kv_head, tuple(range(cfg.n_layer)),
                cfg.n_experts, cfg.mamba_head_dim, cfg.moe_d_ff)


def plan_config(cfg, plan):
    """The NemotronConfig of the pruned model."""
    q_per_kv = cfg.n_head // cfg.n_kv_head
    return replace(cfg, d_model=plan.d_model, d_ff=plan.d_ff, shared_d_ff=plan.shared_d_ff,
                   mamba_heads=plan.mamba_heads, n_kv_head=plan.n_kv_head, n_head=plan.n_kv_head * q_per_kv,
                   pattern="".join(cfg.pattern[i] for i in plan.layers), n_experts=plan.n_experts or cfg.n_experts,
                   mamba_head_dim=plan.mamba_head_dim or cfg.mamba_head_dim, moe_d_ff=plan.moe_d_ff or cfg.moe_d_ff)


def num_params(cfg):
    """Parameters of a model of config cfg (as Nemotron.num_params), without building its weights."""
    with torch.device("meta"):
        return Nemotron(cfg).num_params()

# -----------------------------------------------------------------------------
# 1) importance


@torch.no_grad()
def importance(model, batches):
    """{"emb": (d_model,), "ffn": {layer: (d_ff,)}, "shared": {layer: (shared_d_ff,)}, "attn": {layer: (n_kv_head,)},
    "mamba": {layer: (H,)}, "mamba_dim": {layer: (P,)}, "experts": {layer: (E,)}, "expert_ffn": {layer: (E, moe_d_ff)},
    "depth": (n_layer,)} from batches [(x, y)] of token ids (B, T) and targets."""
    model.eval()
    cfg, layers = model.config, model.backbone.layers
    s = {"emb": torch.zeros(cfg.d_model), "ffn": {}, "shared": {}, "attn": {}, "mamba": {}, "mamba_dim": {},
         "experts": {}, "expert_ffn": {}}
    hooks = []

    def add(store, i, v):  # the calibration batches' scores summed
        store[i] = store.get(i, 0) + v.cpu()

    def on_input(store, i, reduce):  # adds reduce(input) to store[i]
        return lambda module, args: add(store, i, reduce(args[0].detach().float()))

    channels = lambda a: a.abs().mean(dim=tuple(range(a.dim() - 1)))  # (..., C) -> (C,)

    def on_norm(module, args, out):  # (a hook that returned a value would replace the output)
        s["emb"].add_(channels(out.float()).cpu())

    def on_experts(i):  # Experts' inputs (x, weights, idx): each expert's hidden |relu^2|, per neuron (E, F)
        def hook(module, args):
            x, _, idx = args
            act = torch.zeros(module.up_proj.shape[:2])
            for e in range(module.up_proj.size(0)):
                rows = (idx == e).any(1)  # the tokens routed to expert e
                if rows.any():
                    act[e] = F.relu(x[rows].float() @ module.up_proj[e].float().t()).square().mean(0).cpu()
            add(s["expert_ffn"], i, act)
        return hook

    def on_routing(i):  # the router's (weights, idx) (M, k): each expert's share of the routing
        def hook(module, args, out):
            weights, idx = out
            add(s["experts"], i, torch.zeros(cfg.n_experts, device=idx.device).index_add_(
                0, idx.flatten(), weights.flatten().float()))
        return hook
    for m in model.modules():
        if isinstance(m, RMSNorm):
            hooks.append(m.register_forward_hook(on_norm))
    for i, block in enumerate(layers):
        mixer = block.mixer
        if block.kind == "-":
            hooks.append(mixer.down_proj.register_forward_pre_hook(on_input(s["ffn"], i, channels)))
        elif block.kind == "E":
            if cfg.shared_d_ff:
                shared = mixer.shared_experts.down_proj
                hooks.append(shared.register_forward_pre_hook(on_input(s["shared"], i, channels)))
            hooks.append(mixer.gate.register_forward_hook(on_routing(i)))
            hooks.append(mixer.experts.register_forward_pre_hook(on_experts(i)))
        elif block.kind in "*W":
            per_group = lambda a: channels(a).view(cfg.n_kv_head, -1).sum(1)  # (n_head * hd,) -> (n_kv_head,)
            hooks.append(mixer.o_proj.register_forward_pre_hook(on_input(s["attn"], i, per_group)))
        elif block.kind == "M":
            per_head = lambda a: channels(a).view(cfg.mamba_heads, -1).mean(1)  # (H * P,) -> (H,)
            per_dim = lambda a: channels(a).view(cfg.mamba_heads, -1).sum(0)  # (H * P,) -> (P,)
            hooks.append(mixer.out_proj.register_forward_pre_hook(on_input(s["mamba"], i, per_head)))
            hooks.append(mixer.out_proj.register_forward_pre_hook(on_input(s["mamba_dim"], i, per_dim)))
    loss = lambda: sum(model(x, y)[1].item() for x, y in batches) / len(batches)  # the mean LM loss
    try:
        base = loss()
    finally:
        for h in hooks:
            h.remove()
    depth = []
    for block in layers:  # the loss without the layer: its block the identity for a moment
        block.forward = lambda x, cache=None, seq_idx=None: x
        try:
            depth.append(loss() - base)
        finally:
            del block.forward  # the class's forward again
    s["depth"] = torch.tensor(depth)
    return s


def top(score, k):
    """The indices of the k largest scores, in ascending index order (the kept parts keep their order)."""
    return torch.topk(score, k).indices.sort().values


def mamba_heads_kept(score, H, G, k, group_aware=True):
    """Indices of the k heads kept of H (G groups of H/G consecutive heads): group-aware, the k/G best of
    each group; naive, the k best anywhere."""
    if not group_aware:
        return top(score, k)
    per = H // G
    return torch.cat([g * per + top(score[g * per:(g + 1) * per], k // G) for g in range(G)])

# -----------------------------------------------------------------------------
# 3) pruning


@torch.no_grad()
def prune(model, plan, scores, group_aware=True):
    """A new Nemotron at plan_config(model.config, plan), every weight taken from model's at the kept
    indices (no masks: a plain smaller model)."""
    cfg = model.config
    assert not cfg.mtp_depth, "pruning a model with MTP depths is not supported"
    new_cfg = plan_config(cfg, plan)
    new = Nemotron(new_cfg)
    emb = top(scores["emb"], plan.d_model)  # (d_model',) kept channels
    old_sd, sd = model.state_dict(), {}
    sd["backbone.embeddings.weight"] = old_sd["backbone.embeddings.weight"][:, emb]
    sd["backbone.norm_f.weight"] = old_sd["backbone.norm_f.weight"][emb]
    sd["lm_head.weight"] = old_sd["lm_head.weight"][:, emb]
    for j, i in enumerate(plan.layers):
        kind, src, dst = cfg.pattern[i], f"backbone.layers.{i}.", f"backbone.layers.{j}."
        w = {k[len(src):]: v for k, v in old_sd.items() if k.startswith(src)}
        out = {"norm.weight": w["norm.weight"][emb]}
        if kind == "-":
            keep = top(scores["ffn"][i], plan.d_ff)
            out["mixer.up_proj.weight"] = w["mixer.up_proj.weight"][keep][:, emb]
            out["mixer.down_proj.weight"] = w["mixer.down_proj.weight"][emb][:, keep]
        elif kind in "*W":
            groups = top(scores["attn"][i], plan.n_kv_head)
            q_per_kv, hd = cfg.n_head // cfg.n_kv_head, cfg.head_dim
            kv_rows = (groups[:, None] * hd + torch.arange(hd)).flatten()  # (n_kv' * hd,)
            q_heads = (groups[:, None] * q_per_kv + torch.arange(q_per_kv)).flatten()
            q_rows = (q_heads[:, None] * hd + torch.arange(hd)).flatten()  # (n_head' * hd,)
            out["mixer.q_proj.weight"] = w["mixer.q_proj.weight"][q_rows][:, emb]
            out["mixer.k_proj.weight"] = w["mixer.k_proj.weight"][kv_rows][:, emb]
            out["mixer.v_proj.weight"] = w["mixer.v_proj.weight"][kv_rows][:, emb]
            out["mixer.o_proj.weight"] = w["mixer.o_proj.weight"][emb][:, q_rows]
        elif kind == "M":
            heads = mamba_heads_kept(scores["mamba"][i], cfg.mamba_heads, cfg.mamba_groups, plan.mamba_heads,
                                     group_aware)
            dims = top(scores["mamba_dim"][i], plan.mamba_head_dim or cfg.mamba_head_dim)
            out.update(prune_mamba(w, cfg, emb, heads, dims))
        elif kind == "E":
            experts = top(scores["experts"][i], plan.n_experts or cfg.n_experts)
            neurons = torch.stack([top(scores["expert_ffn"][i][e], plan.moe_d_ff or cfg.moe_d_ff) for e in experts])
            out.update(prune_moe(w, cfg, emb, top(scores["shared"][i], plan.shared_d_ff) if cfg.shared_d_ff else None,
                                 experts, neurons))
        sd.update({dst + k: v for k, v in out.items()})
    new.load_state_dict(sd)
    if new_cfg.tie_embeddings:
        new.lm_head.weight = new.backbone.embeddings.weight
    return new


def prune_mamba(w, cfg, emb, heads, dims):
    """A Mamba-2 mixer's weights (names below its block) with heads (H',), their channels dims (P',)
    and the embedding channels emb kept."""
    H, P, G, N = cfg.mamba_heads, cfg.mamba_head_dim, cfg.mamba_groups, cfg.d_state
    d_inner = H * P
    ch = (heads[:, None] * P + dims).flatten()  # (H' P',): the kept heads' kept channels
    bc = torch.arange(2 * G * N)  # B and C of every group: kept whole
    # in_proj rows: z (d_inner), then xBC = x (d_inner), B (G N), C (G N), then dt (H)
    rows = torch.cat([ch, d_inner + ch, 2 * d_inner + bc, 2 * d_inner + 2 * G * N + heads])
    conv = torch.cat([ch, d_inner + bc])  # the conv runs over x, B and C
    return {"mixer.in_proj.weight": w["mixer.in_proj.weight"][rows][:, emb],
            "mixer.conv1d.weight": w["mixer.conv1d.weight"][conv], "mixer.conv1d.bias": w["mixer.conv1d.bias"][conv],
            "mixer.dt_bias": w["mixer.dt_bias"][heads], "mixer.A_log": w["mixer.A_log"][heads],
            "mixer.D": w["mixer.D"][heads], "mixer.norm.weight": w["mixer.norm.weight"][ch],
            "mixer.out_proj.weight": w["mixer.out_proj.weight"][emb][:, ch]}


def prune_moe(w, cfg, emb, shared, experts, neurons):
    """A MoE mixer's weights: the routed experts `experts` (with their router rows and biases), each
    with its neurons neurons[j] (E', F'), their d_model side at emb; the shared expert's neurons at
    shared (None: it has none)."""
    out = {"mixer.gate.weight": w["mixer.gate.weight"][experts][:, emb],
           "mixer.gate.e_score_correction_bias": w["mixer.gate.e_score_correction_bias"][experts]}
    up, down = w["mixer.experts.up_proj"][experts], w["mixer.experts.down_proj"][experts]  # (E', F, l), (E', l, F)
    up = torch.gather(up, 1, neurons[:, :, None].expand(-1, -1, up.size(2)))  # (E', F', l)
    down = torch.gather(down, 2, neurons[:, None, :].expand(-1, down.size(1), -1))  # (E', l, F')
    if cfg.moe_latent_size:  # the latent projections take the d_model side; the experts work in the latent width
        out["mixer.fc1_latent_proj.weight"] = w["mixer.fc1_latent_proj.weight"][:, emb]
        out["mixer.fc2_latent_proj.weight"] = w["mixer.fc2_latent_proj.weight"][emb]
        out["mixer.experts.up_proj"], out["mixer.experts.down_proj"] = up, down
    else:
        out["mixer.experts.up_proj"] = up[:, :, emb]  # (E', F, d')
        out["mixer.experts.down_proj"] = down[:, emb]  # (E', d', F)
    if shared is not None:
        out["mixer.shared_experts.up_proj.weight"] = w["mixer.shared_experts.up_proj.weight"][shared][:, emb]
        out["mixer.shared_experts.down_proj.weight"] = w["mixer.shared_experts.down_proj.weight"][emb][:, shared]
    return out
