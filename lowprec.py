"""
lowprec.py: the FP8 / MXFP8 / NVFP4 training recipe: precision plan, low-precision Linear and expert
GEMMs. Read after moe.py and quantize.py: the formats, QTensor and the quantizers (quantize_fp8 /
quantize_mxfp8 / quantize_nvfp4, AmaxHistory, hadamard16, rht) that this file calls are there.

Papers: Nemotron-H (arXiv:2504.03624) trains in FP8 with per-tensor current scaling; "Pretraining
LLMs with NVFP4" (NVIDIA 2025) and Nemotron 3 Super in NVFP4; MXFP8 is the OCP Microscaling (MX)
format (arXiv:2506.08027 for its scale rounding). The numerics follow TransformerEngine's.

train.py --precision calls apply_precision once, after the model is on its device: the planned
nn.Linear layers become LowPrecLinear in place, and the planned routed experts (moe.Experts) get
LowPrecGroupedMM as their grouped GEMM. Parameters and state_dict keys do not change; delayed
scaling's amax histories travel in checkpoints through amax_state / load_amax_state.
Imported by train.py, bench.py and the tests, never by quantize.py, triton_ops.py, moe.py or model.py:
this file imports them.
"""

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from expert_gemm import grouped_mm_nograd
from moe import mm_by_groups
from quantize import AmaxHistory, hadamard16, quantize_fp8, quantize_mxfp8, quantize_nvfp4, rht
from triton_ops import use_triton

# -----------------------------------------------------------------------------
# the recipe: how each GEMM operand is quantized
#
# The three GEMMs of a Linear, each quantized along its own reduction dim (M = tokens):
#   fprop  Y  = X W^T     X (M, K) and W (N, K) along K
#   dgrad  dX = dY W      dY (M, N) and W^T (K, N) along N
#   wgrad  dW = dY^T X    dY^T (N, M) and X^T (K, M) along M; NVFP4 first applies the random
#                         Hadamard transform to both along M (it cancels: (H dY)^T (H X) = dY^T X)
# The weights stay fp32 (master weights; AdamW's state too); Y and dX come out rounded to bf16,
# dW in fp32. Where torch._scaled_mm runs FP8 on tensor cores (CUDA, compute capability >= 8.9)
# the per-tensor FP8 GEMMs go through it; everything else is emulated: dequantize to fp32 and
# matmul, which differs from a tensor core's fp32 accumulation only in the order of the sums.
# The MoE's routed experts run the same three GEMMs expert by expert: LowPrecGroupedMM below.


@dataclass
class Recipe:
    """How a LowPrecLinear (or the experts' LowPrecGroupedMM) quantizes its GEMMs' operands."""
    fmt: str                  # "fp8", "mxfp8" or "nvfp4"
    fp8_recipe: str = "tensorwise"  # fp8: quantize_fp8's recipe, "tensorwise" (Nemotron-H), "delayed" or "blockwise"
    grad_fp8: str = "e4m3"    # fp8: the gradients' format (Nemotron-H: E4M3; "e5m2" as TE's HYBRID)
    history: dict = field(default_factory=dict)  # fp8 delayed: {operand key: AmaxHistory}, one dict per layer
    rht: bool = True          # nvfp4: random Hadamard transform of the wgrad GEMM's inputs
    sr: bool = True           # nvfp4: stochastic rounding of the gradients
    w2d: bool = True          # nvfp4: 16x16 weight tiles (False: 1x16, as activations)
    H: torch.Tensor = None    # nvfp4 with rht: the 16x16 transform, fixed for the run


def quantize_operand(t, kind, recipe, key=None, amax=None):
    """One GEMM operand t (rows, reduction) quantized as the recipe says for its kind: "x"
    (activations), "w" (weights) or "g" (gradients). key names the operand (which GEMM, which
    side, which expert) for delayed scaling, which keeps one AmaxHistory per key. amax (fp8
    tensorwise or delayed, nvfp4): the amax to scale by, per row (R, 1) or column (1, C), instead
    of t's own (and the history's): qdq_experts gives each expert's part its own."""
    if recipe.fmt == "fp8":
        # TE keeps an amax history per tensor; here each GEMM operand has its own (x for fprop, x^T
        # for wgrad, ...), which a training step updates with the same amax, so they scale alike.
        # footgun: an eval forward records into the forward operands' histories only, and a
        # recomputed forward (--recompute) records twice
        delayed = recipe.fp8_recipe == "delayed"
        history = recipe.history.setdefault(key, AmaxHistory(device=t.device)) if delayed and amax is None else None
        block = (128, 128) if kind == "w" else (1, 128)  # blockwise as DeepSeek-V3
        return quantize_fp8(t, recipe.fp8_recipe, recipe.grad_fp8 if kind == "g" else "e4m3", history, block, amax)
    if recipe.fmt == "mxfp8":
        return quantize_mxfp8(t)
    tile = (16, 16) if kind == "w" and recipe.w2d else (1, 16)
    return quantize_nvfp4(t, tile, stochastic=kind == "g" and recipe.sr, amax=amax)


def scaled_mm_runs(t):
    """Whether FP8 GEMMs on t's device run on tensor cores through torch._scaled_mm."""
    return t.is_cuda and torch.cuda.get_device_capability(t.device) >= (8, 9)


def lowprec_mm(a, b, kinds, recipe, out_dtype=torch.float32):
    """a (m, k) @ b (n, k)^T -> (m, n) in out_dtype, both operands quantized along k."""
    qa, qb = quantize_operand(a, kinds[0], recipe, (kinds, 0)), quantize_operand(b, kinds[1], recipe, (kinds, 1))
    per_tensor = recipe.fmt == "fp8" and recipe.fp8_recipe != "blockwise"
    if per_tensor and scaled_mm_runs(a) and a.size(1) % 16 == 0 and a.size(0) % 16 == 0 and b.size(0) % 16 == 0:
        # codes row-major (m, k) times column-major (k, n), times the two decode scales
        return torch._scaled_mm(qa.data.contiguous(), qb.data.contiguous().t(), qa.scale.view(()), qb.scale.view(()),
                                out_dtype=out_dtype)
    return (qa.dequantize() @ qb.dequantize().t()).to(out_dtype)


# -----------------------------------------------------------------------------
# the low-precision Linear: Y = X W^T with every GEMM on quantized operands


class LowPrecLinearFn(torch.autograd.Function):
    # saves x and the fp32 weight, as nn.Linear does; the backward quantizes them again along
    # the dims its GEMMs reduce over (a GPU implementation would save the quantized copies)
    # custom_fwd: under autocast (CUDA's, or the CPU's with train.py --dtype=bfloat16) the emulated
    # GEMM must not run in bf16 (it would round the dequantized operands, codes times fp32 scales):
    # inputs in fp32 and autocast off inside
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, x, w, recipe):
        ctx.save_for_backward(x, w)
        ctx.recipe = recipe
        x2 = x.reshape(-1, x.size(-1))  # (M, K)
        y = lowprec_mm(x2, w, "xw", recipe, torch.bfloat16)  # (M, N)
        return y.to(x.dtype).view(*x.shape[:-1], w.size(0))  # (..., N): bf16 values in x's dtype

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        recipe = ctx.recipe
        x2, dy2 = x.reshape(-1, x.size(-1)), dy.reshape(-1, dy.size(-1))  # (M, K), (M, N)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dgrad: dX = dY W, over N
            dx = lowprec_mm(dy2, w.t(), "gw", recipe, torch.bfloat16).to(x.dtype).view(x.shape)
        if ctx.needs_input_grad[1]:  # wgrad: dW = dY^T X, over M (the tokens)
            a, b = dy2.t(), x2.t()  # (N, M), (K, M)
            if recipe.fmt == "nvfp4" and recipe.rht:
                a, b = rht(a, recipe.H), rht(b, recipe.H)
            dw = lowprec_mm(a, b, "gx", recipe).to(w.dtype)
        return dx, dw, None


class LowPrecLinear(nn.Linear):
    """An nn.Linear whose GEMMs run in low precision (self.recipe); apply_precision turns chosen
    nn.Linear modules into it in place, so parameters and state_dict keys do not change."""
    recipe: Recipe

    def forward(self, x):
        y = LowPrecLinearFn.apply(x, self.weight, self.recipe)
        return y if self.bias is None else y + self.bias


# -----------------------------------------------------------------------------
# the routed experts' low-precision grouped GEMM (moe.Experts calls it when apply_precision set it)


class LowPrecGroupedMM(torch.autograd.Function):
    # moe.GroupedMM with every GEMM on quantized operands: the recipe of LowPrecLinearFn with each
    # expert quantized on its own (its own tensor scales and amax histories), as TransformerEngine's
    # GroupedLinear, and without a host sync: the experts' token counts never leave the device.
    # - fprop and dgrad quantize the sorted token rows along K or n: no block spans two rows, so only
    #   the per-tensor scales (fp8's, NVFP4's S_enc) depend on the experts: one amax per expert, from
    #   the rows' amaxes, handed back to each row (qdq_experts);
    # - wgrad reduces over the tokens: each expert's rows move to a start at a whole block
    #   (pad_experts: zero rows between experts in a buffer of a static size), so no block, and no
    #   16-run of the Hadamard transform, spans two experts; the tensor scales are then per column;
    # - the weights are quantized expert by expert (E launches, no sync).
    # Emulated: dequantized to fp32, then one grouped GEMM (Triton's on a GPU).
    # x (N, K): the sorted token copies; w (E, n, K): the experts' weights as nn.Linear holds them;
    # name: which projection, to key the amax histories. Saves x and w, as LowPrecLinearFn.
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # as LowPrecLinearFn
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, x, w, offs, recipe, name):
        ctx.save_for_backward(x, w, offs)
        ctx.recipe, ctx.name = recipe, name
        xq = qdq_experts(x, "x", recipe, (name, "xw", 0), expert_of(offs, x.size(0)), w.size(0), 0)  # (N, K)
        wq = torch.stack([qdq(wg, "w", recipe, (name, g, "xw", 1)) for g, wg in enumerate(w)])  # (E, n, K)
        return group_mm(xq, wq.transpose(1, 2), offs).bfloat16().to(x.dtype)  # (N, n): bf16 values

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        recipe, name, (E, N) = ctx.recipe, ctx.name, (w.size(0), x.size(0))
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dgrad: dX_g = dY_g W_g, over n
            dyq = qdq_experts(dy, "g", recipe, (name, "gw", 0), expert_of(offs, N), E, 0)  # (N, n)
            wq = torch.stack([qdq(w[g].t(), "w", recipe, (name, g, "gw", 1)) for g in range(E)])  # (E, K, n)
            dx = group_mm(dyq, wq.transpose(1, 2), offs).bfloat16().to(x.dtype)  # (N, K)
        if ctx.needs_input_grad[1]:  # wgrad: dW_g = dY_g^T X_g, over the expert's own tokens
            # every expert's tokens start at a whole block of the token dim (rht's 16 for NVFP4)
            (dyp, xp), ends = pad_experts(offs, token_block(recipe), dy, x)
            a, b = dyp.t(), xp.t()  # (n, L), (K, L)
            if recipe.fmt == "nvfp4" and recipe.rht:
                a, b = rht(a, recipe.H), rht(b, recipe.H)  # the padding, no longer zero once transformed, stays
            expert = expert_of(ends, a.size(1))  # (L,): each token column's expert
            aq = qdq_experts(a, "g", recipe, (name, "gx", 0), expert, E, 1)
            bq = qdq_experts(b, "x", recipe, (name, "gx", 1), expert, E, 1)
            dw = group_mm(aq, bq.t(), ends).to(w.dtype)  # (E, n, K): the k-grouped form
        return dx, dw, None, None, None


def expert_of(ends, n):
    """(n,) int64: the expert of each of n rows sorted by expert, expert e's ending at ends[e]."""
    return torch.searchsorted(ends, torch.arange(n, device=ends.device, dtype=ends.dtype), right=True)


def token_block(recipe):
    """The block along the tokens of the wgrad operands (and of rht): where each expert's tokens
    must start so that no block holds two experts' tokens."""
    if recipe.fmt == "fp8":
        return 128 if recipe.fp8_recipe == "blockwise" else 1
    return 32 if recipe.fmt == "mxfp8" else 16


def pad_experts(offs, b, *ts):
    """Tensors ts (N, C_i), rows sorted by expert (expert e's end at offs[e]) -> ([(L, C_i)], ends):
    each expert's rows moved to start at a multiple of b, zeros between, and the experts' new ends
    (E,) int32. L is the static bound N + E (b - 1), rounded up to b, so nothing waits for the
    counts; the zero tail counts as the last expert's."""
    if b == 1:
        return list(ts), offs
    N, E = ts[0].size(0), offs.size(0)
    L = -(-(N + E * (b - 1)) // b) * b
    counts = torch.diff(offs, prepend=offs.new_zeros(1)).long()  # (E,)
    padded = (counts + b - 1) // b * b  # (E,)
    ends = padded.cumsum(0)  # (E,)
    shift = (ends - padded) - (offs.long() - counts)  # (E,): new start - old start
    rows = torch.arange(N, device=offs.device) + shift[expert_of(offs, N)]  # (N,): where each row goes
    ends[-1] = L
    return [t.new_zeros(L, t.size(1)).index_copy_(0, rows, t) for t in ts], ends.to(torch.int32)


def qdq_experts(t, kind, recipe, key, expert, E, dim):
    """t (R, C) holding E experts' operands, expert (R,) of each row (dim 0) or (C,) of each column
    (dim 1), quantized as qdq quantizes each expert's part on its own and dequantized: the tensor
    scales (fp8's and NVFP4's) and fp8 delayed scaling's histories are per expert; the blocks
    never hold two experts' elements, so those need nothing more."""
    if not t.numel() or recipe.fmt == "mxfp8" or (recipe.fmt == "fp8" and recipe.fp8_recipe == "blockwise"):
        return qdq(t, kind, recipe, key)
    amax = t.abs().amax(dim=1 - dim).float()  # (R,) or (C,)
    amax = amax.new_zeros(E).scatter_reduce(0, expert, amax, "amax")  # (E,): each expert's
    if recipe.fmt == "fp8" and recipe.fp8_recipe == "delayed":  # one history for all experts, per expert
        amax = recipe.history.setdefault(key, AmaxHistory(device=t.device, parts=E)).update(amax)
    return quantize_operand(t, kind, recipe, key, amax[expert].unsqueeze(1 - dim)).dequantize()


def group_mm(a, b, offs):
    """moe.mm_by_groups (both forms) on the Triton kernels where they run: the padded bmm's size,
    the largest group, would be a host sync."""
    return grouped_mm_nograd(a, b, offs) if use_triton(a) else mm_by_groups(a, b, offs)


def qdq(t, kind, recipe, key):
    """t (rows, reduction) quantized by quantize_operand and dequantized (fp32): an emulated GEMM's
    operand. No tokens at all: nothing to quantize."""
    return quantize_operand(t, kind, recipe, key).dequantize() if t.numel() else t.float()


# -----------------------------------------------------------------------------
# the precision plan: which layers train in which format, and their state in checkpoints


def precision_plan(model, precision, bf16_ends=True):
    """{module name: "fp8" | "mxfp8" | "nvfp4"} for the nn.Linear layers and the MoE's routed
    experts (mixer.experts: their grouped GEMMs) of model's blocks that train in low precision
    under `precision`; every other GEMM stays in high precision:
    - fp8 (Nemotron-H) and mxfp8: every Linear and the experts of the blocks, but the first and
      last blocks with bf16_ends;
    - nvfp4 (Nemotron 3 Super, NVFP4 pretraining): the blocks' Linears and experts but the last
      ~15% of the blocks, attention's q/k/v/o projections and LatentMoE's latent projections;
      Mamba's out_proj in MXFP8.
    The embeddings, LM head, MTP layers and router never are."""
    layers = model.backbone.layers
    L = len(layers)
    plan = {}
    for i, block in enumerate(layers):
        for name, m in block.named_modules():
            if not (isinstance(m, nn.Linear) or name == "mixer.experts"):
                continue
            if precision in ("fp8", "mxfp8"):
                if not (bf16_ends and i in (0, L - 1)):
                    plan[f"backbone.layers.{i}.{name}"] = precision
            elif precision == "nvfp4":
                if i >= L - max(1, round(0.15 * L)) or block.kind in "*W" or "latent_proj" in name:
                    continue
                mx = block.kind == "M" and name == "mixer.out_proj"
                plan[f"backbone.layers.{i}.{name}"] = "mxfp8" if mx else "nvfp4"
    return plan


def apply_precision(model, precision, bf16_ends=True, rht=True, sr=True, w2d=True, seed=0, fp8_recipe="tensorwise"):
    """Turn the Linear layers of precision_plan into LowPrecLinear and give the planned experts
    (moe.Experts) LowPrecGroupedMM and their recipe, which their forward then runs (in place, after
    the model is on its device). rht, sr, w2d: the NVFP4 ablations; seed: the RHT's one sign vector
    for the run; fp8_recipe: quantize_fp8's recipe for fp8. Returns the plan."""
    plan = precision_plan(model, precision, bf16_ends)
    signs = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    H = hadamard16(signs).to(model.lm_head.weight.device)
    recipes = {"fp8": Recipe("fp8", fp8_recipe), "mxfp8": Recipe("mxfp8"),
               "nvfp4": Recipe("nvfp4", rht=rht, sr=sr, w2d=w2d, H=H)}
    for name, fmt in plan.items():
        m = model.get_submodule(name)
        if isinstance(m, nn.Linear):
            m.__class__ = LowPrecLinear  # same parameters and buffers: only forward changes
        else:  # moe.Experts, which does not import this file: it calls what it is given
            m.lowprec_grouped_mm = LowPrecGroupedMM.apply
        m.recipe = replace(recipes[fmt], history={})  # delayed scaling's amax histories: this layer's own
    return plan


def amax_state(model):
    """Delayed scaling's amax histories of every low-precision layer of model, as plain tensors
    {"<module>|<operand key>": amax (length,) or (length, experts)}: what a checkpoint keeps, so that a resumed run
    scales its FP8 operands as the run it continues would have (the histories are not parameters
    or buffers: the state_dict does not hold them)."""
    state = {}
    for name, m in model.named_modules():
        recipe = getattr(m, "recipe", None)  # LowPrecLinear, and moe.Experts (None unless planned)
        if recipe is not None:
            state.update({f"{name}|{'/'.join(map(str, key))}": h.amax for key, h in recipe.history.items()})
    return state


def load_amax_state(model, state):
    """Put the histories of amax_state(...) back into model's recipes (after apply_precision).
    Checkpoints from before the experts' activations and gradients shared one history of all
    experts kept one per expert ("up_proj/3/gx/0"): those are stacked into it."""
    per_expert = {}
    for full, amax in state.items():
        name, key = full.split("|")
        key = tuple(int(k) if k.isdigit() else k for k in key.split("/"))  # ("xw", 0), ("up_proj", "gx", 1)
        recipe = model.get_submodule(name).recipe
        if len(key) == 4 and key[2][key[3]] != "w":  # (projection, expert, kinds, i): the old layout
            per_expert.setdefault((name, key[0], *key[2:]), {})[key[1]] = amax
            continue
        recipe.history[key] = AmaxHistory(len(amax), amax.device)
        recipe.history[key].amax = amax.clone()
    for (name, *key), amaxes in per_expert.items():
        experts = model.get_submodule(name)
        columns = [amaxes.get(e, torch.zeros_like(next(iter(amaxes.values())))) for e in range(experts.up_proj.size(0))]
        experts.recipe.history[tuple(key)] = history = AmaxHistory(len(columns[0]), columns[0].device)
        history.amax = torch.stack(columns, 1)  # (length, E)
