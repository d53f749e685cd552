"""
plan.py: the parallelism planner. Read after model.py and train.py.

Given a model, a GPU type, a GPU count and a global batch, it predicts the duration of one training
step for every parallel layout (tensor, pipeline, data, context and expert parallel sizes, virtual
pipeline stages, micro-batch, activation recompute, sequence parallelism, ZeRO stage), drops the
layouts that do not fit in memory, and ranks the rest by throughput:
    python plan.py --model=nemotron-h-8b --gpu=h100 --gpus=64 --gbs=768
    python plan.py --model=gpt3-175b --gpu=a100 --gpus=1024 --gbs=1536 --tp=8 --json
    python plan.py --model=config/tiny_cpu.py --gpu=cpu.json --gpus=2 --gbs=32 --precision=fp32 --emit
    python plan.py --calibrate --out=cpu.json          # measure this machine, write a hardware profile
    python plan.py --validate=tests/published_runs.csv,tests/published_runs_more.csv --cv=True
                                                       # predicted vs measured published runs (planfit.py)

Paper: "Automatically Planning Optimal Parallel Strategy for Large Language Models" (arXiv:2501.00254):
a step's duration is its computation plus its communication minus their overlap, simulated for each
candidate layout from model and hardware numbers, with the candidate space pruned. The terms follow
Narayanan et al. 2021 (arXiv:2104.04473, PTD-P: 1F1B and interleaved pipelines), Korthikanti et al.
2022 (arXiv:2205.05198: sequence parallelism, selective recompute, activation memory) and ZeRO
(arXiv:1910.02054: memory by stage); MoE all-to-alls by placement, FP8 / MXFP8 / NVFP4 casts and
GEMM speed, NVL72 domains and the host's launch time are priced as docs/planner.md says, with the
constants planfit.py fits on published runs. Nothing here runs a model: it is arithmetic on a CPU.
"""
import contextlib, functools, json, math, os, sys, time
from dataclasses import asdict, dataclass, field, fields, replace

from mamba import ssd_flops
from checkpoint import config_from_hf
from configurator import die
from hardware import CLUSTER_GPUS, HARDWARE
from model import NemotronConfig, config_file, flops_per_token, layer_params, mtp_params

# -----------------------------------------------------------------------------
# hardware (hardware.py's table), a kernel's fixed cost and a collective's latency (s), and the
# fitted efficiencies: every GPU profile carries them, so a fit (planfit.py) or a profile may set its own
GPU_DEFAULTS = dict(kernel_s=4e-6, latency_s=10e-6, host_s=20e-6)  # host_s: the CPU's time to launch a kernel
# the fitted constants, the only ones: planfit.fit_constants on every published run we have
# (tests/published_runs*.csv; docs/planner.md gives the cross-validated errors)
FIT = dict(
    gemm_eff=0.689,      # a large 16-bit GEMM's throughput over the dense peak (cuBLAS steady state)
    mem_eff=0.802,       # memory-bound kernels' bandwidth over the HBM peak
    net_eff=0.90,        # a large collective's bus bandwidth over the link's peak
    overlap=0.55,        # the share of overlappable communication that compute actually hides
    lowp_eff=0.60,       # a large FP8 / MXFP8 / NVFP4 GEMM's throughput over its own dense peak
    ssd_eff=0.112,       # the chunked SSD's fused kernels over the 16-bit peak (chunk-sized products)
    moe_sync_s=1.78e-3,  # s per MoE layer and pass that the GPU idles while the host sizes a dropless dispatch
)
HBM_USABLE = 0.95  # not fitted: CUDA context, communication buffers and fragmentation take the rest

# bytes per element of activations, and per parameter of weights, gradients (reduced in this
# precision) and optimizer states (Adam: fp32 master copy, m, v; plain fp32 training has no master)
PRECISION = {"bf16": dict(act=2, w=2, g=4, opt=12), "fp16": dict(act=2, w=2, g=2, opt=12),
             "fp8": dict(act=2, w=3, g=4, opt=12),  # fp8 keeps a bf16 weight and its fp8 copy
             "mxfp8": dict(act=2, w=4, g=4, opt=12),  # ... and MXFP8 one per orientation (row- and column-wise)
             "nvfp4": dict(act=2, w=3, g=4, opt=12),  # ... NVFP4: two 4-bit copies
             "fp32": dict(act=4, w=4, g=4, opt=8)}
# the peak the linear layers' GEMMs run at, by precision (the rest stays in 16 bit: attention and
# SSD cores, router, LM head, embedding, norms), and the bytes per element of their operands
LOW_PRECISION = ("fp8", "mxfp8", "nvfp4")  # the precisions whose linear layers run in low precision
LINEAR = {"bf16": ("bf16", 2), "fp16": ("fp16", 2), "fp32": ("fp32", 4), "fp8": ("fp8", 1),
          "mxfp8": ("fp8", 1 + 1 / 32), "nvfp4": ("fp4", 0.5 + 1 / 16)}


def quantize_bytes(precision, elements, act):
    """HBM bytes that quantizing one GEMM operand of this many 16-bit elements moves (Transformer
    Engine's recipes; lowprec.py implements the same ones): FP8 with per-tensor current scaling reads
    it once for the amax and again to write an FP8 copy and its transpose (Hopper's FP8 GEMMs take
    K-major operands only); MXFP8 writes row- and column-wise copies with a scale per 32 in one pass;
    NVFP4 the same with 4-bit values and a scale per 16, plus the random Hadamard transform of the
    wgrad operands (a 16-bit read and write). 0 for the 16-bit precisions."""
    return elements * {"fp8": 2 * act + 2, "mxfp8": act + 2 * (1 + 1 / 32),
                       "nvfp4": act + 2 * (0.5 + 1 / 16) + 2 * act}.get(precision, 0)


def load_hardware(gpu, **overrides):
    """A preset name or a JSON profile (what --calibrate writes), with overrides applied."""
    if gpu in CLUSTER_GPUS:
        hw = dict(GPU_DEFAULTS, **FIT, name=gpu, **HARDWARE[gpu])
    elif os.path.isfile(gpu):
        with open(gpu) as f:
            try:
                hw = {**GPU_DEFAULTS, **FIT, "name": os.path.basename(gpu), **json.load(f)}  # a profile may set them
            except (ValueError, TypeError) as e:
                raise ValueError(f"{gpu}: not a hardware profile ({e})") from None
        needed = ("flops", "hbm_gb", "hbm_bw", "nvlink_bw", "net_bw", "gpus_per_node", "sms")
        missing = [k for k in needed if k not in hw]
        if missing or not isinstance(hw["flops"], dict):
            raise ValueError(f"{gpu}: a hardware profile needs {', '.join(missing or ['flops'])} "
                             '(flops a dict such as {"bf16": 989e12})')
    else:
        raise ValueError(f"unknown gpu '{gpu}': one of {', '.join(CLUSTER_GPUS)}, or the path of a JSON profile "
                         '({"flops": {"bf16": FLOP/s}, "hbm_gb": GB, "hbm_bw": B/s, "nvlink_bw": B/s, "net_bw": B/s, '
                         '"gpus_per_node": n, "sms": n}; python plan.py --calibrate writes one for this machine)')
    hw.update({k: v for k, v in overrides.items() if v is not None})
    return hw


# -----------------------------------------------------------------------------
# models: a NemotronConfig describes any stack (pattern of M mamba2, * attention, - mlp, E moe).
# A Transformer is "*-" per layer; a gated (SwiGLU) MLP of width f has the parameters and FLOPs of
# a two-matrix MLP of width 1.5 f, which is how it is written here.

def transformer(layers, hidden, heads, ffn, vocab, kv_heads=None, gated=False, experts=0, topk=2,
                expert_ffn=None, shared_experts=0, moe_every=1, tie=False, first_dense=0):
    """A NemotronConfig for a dense or MoE Transformer given by its usual hyperparameters (MoE every
    moe_every layers after the first_dense dense ones)."""
    w = 1.5 if gated else 1
    moe = [experts > 0 and i >= first_dense and (i - first_dense) % moe_every == 0 for i in range(layers)]
    return NemotronConfig(
        vocab_size=vocab, d_model=hidden, pattern="".join("*E" if e else "*-" for e in moe),
        n_head=heads, n_kv_head=kv_heads or heads, head_dim=hidden // heads, d_ff=int(w * ffn),
        n_experts=max(experts, 1), top_k=min(topk, max(experts, 1)), moe_d_ff=int(w * (expert_ffn or ffn)),
        shared_d_ff=int(w * (expert_ffn or ffn) * shared_experts), tie_embeddings=tie)


NEMOTRON_H = dict(vocab_size=131072, n_kv_head=8, head_dim=128, mamba_head_dim=64, mamba_groups=8, chunk_size=128)
PRESETS = {  # name: (config, training sequence length)
    # Brown et al. 2020 (arXiv:2005.14165) Table 2.1: 96 x 12288, 96 heads, GPT-2 vocabulary, tied
    "gpt3-175b": (transformer(96, 12288, 96, 49152, 50257, tie=True), 2048),
    # Llama 3 (arXiv:2407.21783) Table 3: SwiGLU, GQA with 8 KV heads, 128K vocabulary, 8K context
    "llama3-70b": (transformer(80, 8192, 64, 28672, 128256, kv_heads=8, gated=True), 8192),
    "llama3-405b": (transformer(126, 16384, 128, 53248, 128256, kv_heads=8, gated=True), 8192),
    # Nemotron-H (arXiv:2504.03624) and its released configs (Megatron-Bridge's NemotronH providers)
    "nemotron-h-8b": (NemotronConfig(d_model=4096, d_ff=21504, n_head=32, mamba_heads=128, d_state=128,
                      pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-", **NEMOTRON_H), 8192),
    "nemotron-h-56b": (NemotronConfig(d_model=8192, d_ff=32768, n_head=64, mamba_heads=256, d_state=256,
                       pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-"
                               "M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-", **NEMOTRON_H), 8192),
    # Nemotron 3 Nano 30B-A3B (NVIDIA 2025; its HF config / Megatron-Bridge provider): 128 experts,
    # top-6, one shared expert of twice the width, 2 KV heads; 8K sequences here (it trains longer later)
    "nemotron-3-nano": (NemotronConfig(**dict(NEMOTRON_H, n_kv_head=2), d_model=2688, n_head=32,
                        mamba_heads=64, d_state=128, n_experts=128, top_k=6, moe_d_ff=1856,
                        shared_d_ff=3712, routed_scaling_factor=2.5,
                        pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"), 8192),
}


def load_model(spec):
    """(NemotronConfig, default sequence length or None) from a preset name, an HF config.json (or
    its folder), or a train.py config file (model globals as plain assignments)."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ValueError(f"unknown model '{spec}': a preset ({', '.join(PRESETS)}), an HF config.json "
                         "or folder, or a train.py config file")
    if path.endswith(".json"):
        with open(path) as f:
            return config_from_hf(json.load(f)), None
    # a train.py config file: its assignments over NemotronConfig's defaults (train.py's model flags)
    model, assigned = config_file(path)
    return model, assigned.get("block_size")


# -----------------------------------------------------------------------------
# per layer type, counted once: parameters and FLOPs per token come from model.py (layer_params,
# flops_per_token); layer_cost adds the bytes that memory-bound kernels move, saved activations
# and communication volumes

# -----------------------------------------------------------------------------
# time of a kernel and of a collective on one GPU

def gemm_time(hw, peak, batch, m, n, k, nbytes, eff):
    """A (batch of) m x k @ k x n GEMM at this fraction of the peak: its output tiles (128 x 128) run
    in waves over the SMs, a partial tile as a whole one (a grouped GEMM's few rows per expert) and a
    last partial wave idling SMs; a GEMM with little reuse is bound by HBM instead (roofline)."""
    tm, tn = math.ceil(m / 128), math.ceil(n / 128)
    tiles = batch * tm * tn
    util = tiles / (math.ceil(tiles / hw["sms"]) * hw["sms"])
    compute = 2 * batch * (128 * tm) * (128 * tn) * k / (peak * eff * util)
    memory = batch * (m * k + k * n + m * n) * nbytes / (hw["hbm_bw"] * hw["mem_eff"])
    return max(compute, memory) + hw["kernel_s"]


def mem_time(hw, nbytes, kernels):
    return nbytes / (hw["hbm_bw"] * hw["mem_eff"]) + kernels * hw["kernel_s"]


def comm_time(hw, op, nbytes, n, local):
    """Ring collectives over n GPUs, `local` of them in each NVLink domain (n: all in one): nbytes is
    the full buffer (all-reduce, the gathered result, the scattered input, a point-to-point message).
    Inside a domain at NVLink speed. Across domains, a domain's `local` members send over their own
    network links at once (NCCL runs a ring per link), so the bus bandwidth is local times the GPU's
    share of the scale-out network, at most NVLink's."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    share = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
             "p2p": 1.0}[op]
    bw = hw["nvlink_bw"] if local >= n else min(hw["nvlink_bw"], local * hw["net_bw"])
    return hw["latency_s"] + share * nbytes / (bw * hw["net_eff"])


def in_domain(hw, n, stride):
    """How many of a group of n GPUs, stride ranks apart, share an NVLink domain."""
    return max(1, min(n, hw["gpus_per_node"] // stride))


def all_to_all_time(hw, nbytes, n, stride):
    """An all-to-all among n GPUs spaced stride ranks apart (Megatron orders ranks tp, cp, ep, dp, pp:
    a GPU's expert-parallel peers are tp * cp apart). nbytes is what one GPU sends, (n - 1)/n of it to
    others: the peers inside its NVLink domain get theirs over NVLink while the rest leave through
    its network link at the same time, so the slower of the two sets the time."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    local = in_domain(hw, n, stride)
    intra = (local - 1) / n * nbytes / (hw["nvlink_bw"] * hw["net_eff"])
    inter = (n - local) / n * nbytes / (hw["net_bw"] * hw["net_eff"])
    return hw["latency_s"] + max(intra, inter)


def replica_sync(hw, L, op, dense, experts):
    """A collective over the replicas of the dense weights (dp * cp of them, tp ranks apart) and
    over those of the routed experts' (tp * dp * cp / ep, ep ranks apart); dense and experts are
    the bytes of each on one GPU."""
    dp_n, edp_n = L.dp * L.cp, L.tp * L.dp * L.cp // L.ep
    return comm_time(hw, op, dense, dp_n, in_domain(hw, dp_n, L.tp)) \
        + comm_time(hw, op, experts, edp_n, in_domain(hw, edp_n, L.ep))


def hidden(hw, comm, window):
    """The exposed part of communication that may overlap a compute window."""
    return comm - hw["overlap"] * min(comm, window)


# -----------------------------------------------------------------------------
# one layer on one GPU: the job, the layout, and the cost of each layer kind

@dataclass(frozen=True)
class Layout:
    tp: int = 1             # tensor parallel (Megatron column/row split), inside a node
    pp: int = 1             # pipeline stages
    dp: int = 1             # data parallel replicas
    cp: int = 1             # context parallel: the sequence split, attention as a ring
    ep: int = 1             # expert parallel: routed experts split over ep of the tp*cp*dp ranks
    vp: int = 1             # virtual stages per pipeline rank (interleaved 1F1B); 1 = plain 1F1B
    mbs: int = 1            # micro-batch, sequences
    recompute: str = "none"  # 'none', 'selective' (attention scores) or 'full' (each layer from its input)
    sp: bool = False        # sequence parallel: norms and residuals split over the tp ranks
    zero: int = 0           # 0 DDP, 1 optimizer states, 2 + gradients, 3 + weights sharded (FSDP)


@dataclass
class Memo:
    """A Job's memos, one per function, each keyed by the arguments its result depends on."""
    layer_cost: dict = field(default_factory=dict)    # (kind, b, tp, cp, ep (1 unless MoE), sp) -> LayerCost
    stage_groups: dict = field(default_factory=dict)  # (pp, vp) -> [StageGroup]
    rank_sums: dict = field(default_factory=dict)     # (tp, cp, ep, mbs, sp, pp, vp) -> [RankSums]
    model_totals: dict = field(default_factory=dict)  # (tp, cp, ep, mbs, sp) -> ModelTotals


@dataclass
class Job:
    cfg: NemotronConfig
    seq: int                # tokens per sequence
    gbs: int                # sequences per step
    gpus: int
    hw: dict
    precision: str = "bf16"
    attention: str = "flash"  # 'flash' (fused, causal half) or 'materialized' (scores in HBM: before FlashAttention)
    moe_imbalance: float = 1.0  # the busiest expert-parallel rank's routed tokens over the mean (1: balanced)
    a2a_overlap: bool = False   # the expert all-to-alls overlap other micro-batches' compute (Megatron-Bridge)
    grad_reduce: str = "fp32"   # the gradients' buffer and reduction: 'fp32', or 'bf16' (NVIDIA's performance recipes)

    def __post_init__(self):
        self.bytes = dict(PRECISION[self.precision], **({"g": 2} if self.grad_reduce == "bf16" else {}))
        self.low = self.precision in LOW_PRECISION  # the linear layers' GEMMs in low precision
        self.peak = self.hw["flops"][LINEAR[self.precision][0]]  # linear layers
        self.core_peak = self.hw["flops"]["bf16" if self.low else self.precision]
        self.memo = Memo()
        self.flops = flops_per_token(self.cfg, self.seq)
        self.params = {k: layer_params(self.cfg, k) for k in set(self.cfg.pattern + self.cfg.mtp_pattern)}


@dataclass
class BlockWork:
    mem: float              # bytes its memory-bound kernels move (norms, residual add, activation functions, ...)
    kernels: int            # how many memory-bound kernels it launches
    saved: float            # activation bytes kept for the backward
    lin: list = field(default_factory=list)      # linear-layer GEMMs (fp8 under --precision=fp8): (batch, m, n, k)
    mm: list = field(default_factory=list)       # other GEMMs (router, LM head), in 16 bit: (batch, m, n, k)
    core_mm: list = field(default_factory=list)  # the core's GEMMs (materialized attention): (batch, m, n, k)
    core_flops: float = 0.0  # the core's fused-kernel FLOPs (flash attention, the SSD), run at GEMM speed
    core_bytes: float = 0.0  # bytes the core's fused kernels move (they are bound by this when it takes longer)
    core_kernels: int = 0   # the core's kernels
    core_saved: float = 0.0  # of saved, the core's bytes (what selective recompute drops)
    cp: float = 0.0         # bytes this GPU sends per context-parallel ring step (K and V; the SSM state)
    a2a: float = 0.0        # bytes this GPU sends per expert all-to-all (dispatch; combine sends as many)
    act_full: float = 0.0   # bytes full recompute keeps: the block's input


def block_work(job, kind, b, tp, cp, ep, sp):
    """What one block of `kind` ('M', '*', '-', 'E'; 'embed': the lookup; 'head': final norm, LM
    head and loss) does for a micro-batch of b sequences on one GPU, counted once for every use, as
    a BlockWork. The core is the attention core or the SSD: what selective recompute repeats."""
    cfg, s, d, act = job.cfg, job.seq, job.cfg.d_model, job.bytes["act"]
    t = b * s // cp         # tokens on this GPU
    ew = tp if sp else 1    # sequence parallelism splits the d-wide elementwise work and its activations
    # the pre-norm (read, write) and the residual add (2 reads, 1 write); the norm's input and output saved
    w = BlockWork(mem=5 * t * d / ew * act, kernels=2, saved=2 * t * d / ew * act)
    if kind in "*W":  # W: sliding-window attention, RoPE always, each query against at most a window of keys
        a, g, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        w.lin += [(1, t, (a + 2 * g) * hd / tp, d), (1, t, d, a * hd / tp)]
        w.saved += t * (a + 2 * g) * hd / tp * act + t * a * hd / tp * act  # q, k, v; the output for o_proj
        if cfg.rope or kind == "W":
            w.mem, w.kernels = w.mem + 4 * t * (a + g) * hd / tp * act, w.kernels + 1
        heads, q = b * a / tp, s / cp  # each GPU: its heads, its queries against all s keys (a ring under cp)
        if kind == "W":  # the same causal-half count over an effective length 2W(1 - W/2s) instead of s
            window = min(s, cfg.sliding_window)
            s = 2 * window * (1 - window / (2 * s))
        if job.attention == "flash":  # one fused kernel over the causal half; backward 2.5x (recomputes scores)
            w.core_flops, w.core_kernels = 4 * heads * q * s * hd / 2, 1
            w.saved += t * a / tp * 4  # the softmax statistics (fp32)
        else:  # Megatron before FlashAttention: full s x s scores written, softmaxed, dropped out, read back
            w.core_mm, w.core_kernels = [(heads, q, s, hd), (heads, q, hd, s)], 2
            # per score, 9 B at 16 bit: softmax in and out, dropout in, out and mask
            w.core_bytes = 9 * heads * q * s * act / 2
            w.core_saved = 5 * heads * q * s * act / 2  # softmax output, dropout mask and output (Korthikanti's 5as)
        w.cp = t * 2 * g * hd / tp * act  # the K and V this GPU passes along the ring
    elif kind == "-":
        w.lin += [(1, t, cfg.d_ff / tp, d), (1, t, d, cfg.d_ff / tp)]
        w.mem, w.kernels = w.mem + 2 * t * cfg.d_ff / tp * act, w.kernels + 1  # the activation function
        w.saved += 2 * t * cfg.d_ff / tp * act  # its input and output
    elif kind == "M":
        H, P, N, G, Q = cfg.mamba_heads / tp, cfg.mamba_head_dim, cfg.d_state, cfg.mamba_groups / tp, cfg.chunk_size
        d_in, conv = H * P, H * P + 2 * G * N
        w.lin += [(1, t, 2 * d_in + 2 * G * N + H, d), (1, t, d, d_in)]
        # the chunked SSD: its chunk products (mamba.ssd_flops) or its traffic (x, B, C in, y out,
        # fp32 dt and chunk states), whichever takes longer; the conv (read, write); the gated norm (y, z, out)
        w.core_flops, w.core_kernels = t * ssd_flops(H, P, N, Q), 5
        w.core_bytes = t * (2 * d_in + 2 * G * N) * act + t * H * 8 + t / Q * H * P * N * 8
        w.mem, w.kernels = w.mem + (2 * conv + 3 * d_in) * t * act, w.kernels + 2
        w.saved += t * (2 * d_in + 2 * G * N + H + conv + 2 * d_in) * act + t * H * 4 + t / Q * H * P * N * 4
        w.cp = b * H * P * N * 4  # under cp each GPU passes its final SSM state on
    elif kind == "E":
        E, k, F, l = cfg.n_experts, cfg.top_k, cfg.moe_d_ff, cfg.moe_latent_size or d
        routed = t / tp  # each tp rank routes its sequence-parallel share of the tokens
        w.mm += [(1, routed, E, d)]  # the router
        if cfg.moe_latent_size:
            w.lin += [(1, routed, l, d), (1, routed, d, l)]
        # tokens per local expert on the busiest expert-parallel rank (with ep > 1 it sets the pace)
        rows = routed * k * ep / E * (job.moe_imbalance if ep > 1 else 1)
        w.lin += [(E / ep, rows, F, l), (E / ep, rows, l, F)]  # grouped GEMMs of the E/ep local experts
        if cfg.shared_d_ff:
            w.lin += [(1, t, cfg.shared_d_ff / tp, d), (1, t, d, cfg.shared_d_ff / tp)]
        w.mem += (4 * routed * k * l + 2 * routed * k * F + 2 * t * cfg.shared_d_ff / tp) * act + routed * E * 8
        w.kernels += 6  # router top-k, permute, two activations, unpermute, combine
        w.saved += (2 * routed * k * l + 2 * routed * k * F + 2 * t * cfg.shared_d_ff / tp
                    + (2 * routed * l if cfg.moe_latent_size else 0)) * act + routed * E * 4
        w.a2a = rows * E / ep * l * act  # dispatch (and the same back to combine): what the busiest rank receives
    elif kind == "embed":  # the lookup
        w.mem, w.kernels, w.saved = t * d / ew * act, 1, 0.0
    elif kind == "head":  # final norm, LM head, cross-entropy over fp32 logits (vocab split over tp)
        V = cfg.vocab_size
        w.mm += [(1, t, V / tp, d)]
        w.mem, w.kernels = 2 * t * d / ew * act + t * V / tp * (act + 8), 4
        w.saved = 2 * t * d / ew * act + t * V / tp * (act + 4)
    w.act_full = t * d / ew * act  # what full recompute keeps: the block's input
    return w


@dataclass
class LayerCost:
    fwd: float              # s: forward compute (GEMMs, memory-bound kernels, the core)
    bwd: float              # s: backward compute (dgrad and wgrad GEMMs, kernels twice, the core 2 or 2.5x)
    core: float             # s: the core's forward that selective recompute repeats (materialized attention; else 0)
    tp: float               # s per pass: tensor-parallel all-reduce (with sp: all-gather and reduce-scatter)
    ep: float               # s per pass: expert all-to-alls, dispatch and combine
    cp_fwd: float           # s: context-parallel communication exposed under the forward core
    cp_bwd: float           # s: the same under the backward core
    act: float              # bytes: activations saved for the backward without recompute
    act_selective: float    # bytes: the same under selective recompute (the core's dropped)
    act_full: float         # bytes: the same under full recompute (the block's input)
    flops: float            # forward FLOPs: every GEMM and the core


def cost_sum(costs, counts):
    """The LayerCost of counts[kind] blocks of each kind, field by field."""
    return LayerCost(*(sum(n * getattr(costs[k], f.name) for k, n in counts.items()) for f in fields(LayerCost)))


def layer_cost(job, kind, b, tp, cp, ep, sp):
    """block_work in seconds on job.hw, as a LayerCost: forward and backward, the core's forward
    (what selective recompute repeats), communication per pass (tp; ep; cp exposed under the core),
    saved activation bytes by recompute level, forward FLOPs."""
    key = (kind, b, tp, cp, ep if kind == "E" else 1, sp)  # only MoE blocks depend on ep
    if key in job.memo.layer_cost:
        return job.memo.layer_cost[key]
    w, hw, act = block_work(job, kind, b, tp, cp, ep, sp), job.hw, job.bytes["act"]
    t = b * job.seq // cp
    fwd = bwd = 0.0
    mem, launches = w.mem, w.kernels + w.core_kernels + len(w.core_mm)  # kernels of the forward
    for batch, m, n, k, linear in [g + (True,) for g in w.lin] + [g + (False,) for g in w.mm]:
        low = job.low and linear
        peak, nbytes = (job.peak, LINEAR[job.precision][1]) if low else (job.core_peak, act)
        eff = hw["lowp_eff"] if low else hw["gemm_eff"]  # low-precision GEMMs reach less of their peak
        fwd += gemm_time(hw, peak, batch, m, n, k, nbytes, eff)
        bwd += gemm_time(hw, peak, batch, m, k, n, nbytes, eff) + gemm_time(hw, peak, batch, n, k, m, nbytes, eff)
        launches += (batch if kind == "E" and linear else 1) * (1 + low)  # a GEMM (and a cast) per local expert
        if low:  # quantize the input before the forward, the output's gradient before the backward
            mem += quantize_bytes(job.precision, batch * m * k, act)
            bwd += mem_time(hw, quantize_bytes(job.precision, batch * m * n, act), 1)
    # the core: its GEMMs, then its fused kernels at GEMM speed (the SSD's at its own) or bound by
    # their traffic, whichever is longer
    fused = job.core_peak * hw["ssd_eff" if kind == "M" else "gemm_eff"]
    core = sum(gemm_time(hw, job.core_peak, *g, act, hw["gemm_eff"]) for g in w.core_mm) \
        + w.core_kernels * hw["kernel_s"] + max(w.core_flops / fused, w.core_bytes / (hw["hbm_bw"] * hw["mem_eff"]))
    fwd += mem_time(hw, mem, w.kernels) + core
    bwd += mem_time(hw, 2 * mem, 2 * w.kernels) + (2.5 if kind in "*W" else 2) * core
    # the host launches every kernel (host_s each, PyTorch eager): a pass takes the longer of the two;
    # dropless MoE routing makes the host wait for the tokens per expert before it can size the
    # all-to-all and the grouped GEMMs, and the GPU idles while it catches up (moe_sync_s a pass)
    sync = hw["moe_sync_s"] if kind == "E" else 0.0
    fwd, bwd = max(fwd, launches * hw["host_s"]) + sync, max(bwd, 2 * launches * hw["host_s"]) + sync
    # tensor parallel: per pass one all-reduce of the block's output (or, with sp, an all-gather and a
    # reduce-scatter: the same bytes); the vocab-parallel embedding and head need one too. The expert
    # all-to-alls are exposed, or with a2a_overlap (Megatron-Bridge's 1F1B overlap: one micro-batch's
    # dispatch and combine beside another's compute) hidden under a forward's worth of compute
    tp_comm = comm_time(hw, "all_reduce", t * job.cfg.d_model * act, tp, tp)
    a2a = 2 * all_to_all_time(hw, w.a2a, ep, tp * cp)
    cp_comm = comm_time(hw, "all_gather", w.cp * cp, cp, in_domain(hw, cp, tp)) if kind == "M" else \
        comm_time(hw, "p2p", w.cp * (cp - 1), cp, in_domain(hw, cp, tp))
    flops = sum(2 * bt * m * n * k for bt, m, n, k in w.lin + w.mm + w.core_mm) + w.core_flops
    cost = LayerCost(fwd=fwd, bwd=bwd, core=core if kind in "*W" and job.attention != "flash" else 0.0, tp=tp_comm,
                     ep=hidden(hw, a2a, fwd) if job.a2a_overlap else a2a, cp_fwd=hidden(hw, cp_comm, core),
                     cp_bwd=hidden(hw, 2 * cp_comm, 2.5 * core), act=w.saved,
                     act_selective=w.saved - w.core_saved, act_full=w.act_full, flops=flops)
    job.memo.layer_cost[key] = cost
    return cost


# -----------------------------------------------------------------------------
# one layout: step time, its breakdown, memory per GPU

@dataclass
class StageGroup:
    rank: int               # the group's lowest pipeline rank, the one with the most micro-batches in flight
    counts: dict            # blocks it holds: {kind: count}, with 'embed' and 'head' on the first and last ranks
    n_ranks: int            # pipeline ranks in the group (they hold the same blocks)


def stage_groups(job, pp, vp):
    """The pipeline ranks as StageGroups, grouped where they hold the same blocks. The pattern is
    cut into pp*vp chunks as even as they go (the first ranks take one block more where they do not
    divide), chunk j on rank j % pp (the interleaved schedule of Narayanan et al. 2021); the first
    rank adds the embedding, the last the head and the MTP depths."""
    key = (pp, vp)
    if key not in job.memo.stage_groups:
        cfg, groups = job.cfg, {}
        cuts = [round(j * len(cfg.pattern) / (pp * vp) + 0.49) for j in range(pp * vp + 1)]
        for r in range(pp):
            counts = {}
            for k in "".join(cfg.pattern[cuts[j]:cuts[j + 1]] for j in range(r, pp * vp, pp)):
                counts[k] = counts.get(k, 0) + 1
            if r == 0:
                counts["embed"] = 1
            if r == pp - 1:
                for k in cfg.mtp_pattern * cfg.mtp_depth:
                    counts[k] = counts.get(k, 0) + 1
                counts["head"] = 1 + cfg.mtp_depth
            sig = (r == 0, r == pp - 1, tuple(sorted(counts.items())))
            groups.setdefault(sig, StageGroup(r, counts, 0)).n_ranks += 1
        job.memo.stage_groups[key] = list(groups.values())
    return job.memo.stage_groups[key]


def stage_params(job, r, counts, pp):
    """(dense, routed-expert) parameters of pipeline rank r, before any splitting."""
    cfg, blocks = job.cfg, [k for k in counts if k not in ("embed", "head")]
    dense = sum(counts[k] * job.params[k].dense for k in blocks)
    experts = sum(counts[k] * job.params[k].experts for k in blocks)
    if r == pp - 1 and cfg.mtp_depth:  # the depths' blocks were counted per depth above: count weight sets
        sets, mtp = (1 if cfg.mtp_share else cfg.mtp_depth), mtp_params(cfg)
        blocks = [job.params[k] for k in cfg.mtp_pattern * cfg.mtp_depth]
        dense += sets * mtp.dense - sum(p.dense for p in blocks)
        experts += sets * mtp.experts - sum(p.experts for p in blocks)
    tables = (r == 0) + (r == pp - 1 and (not cfg.tie_embeddings or pp > 1))  # embedding, LM head
    return dense + cfg.d_model * (r == pp - 1) + tables * cfg.vocab_size * cfg.d_model, experts


@dataclass
class RankSums:
    rank: int               # a StageGroup's lowest pipeline rank
    n_ranks: int            # pipeline ranks in its group
    total: LayerCost        # layer_cost summed over the rank's blocks, per micro-batch
    dense: float            # dense parameters on one GPU (split over tp)
    experts: float          # routed-expert parameters on one GPU (split over ep)
    working: float          # bytes: the largest block's saved activations (the block at work)
    biggest: float          # the largest block's parameters on one GPU
    blocks: int = 0         # blocks it holds (embedding and head aside)


def rank_sums(job, L):
    """Per group of pipeline ranks, what does not depend on recompute or ZeRO, as RankSums."""
    key = (L.tp, L.cp, L.ep, L.mbs, L.sp, L.pp, L.vp)
    if key not in job.memo.rank_sums:
        out = []
        for g in stage_groups(job, L.pp, L.vp):
            cost = {k: layer_cost(job, k, L.mbs, L.tp, L.cp, L.ep, L.sp) for k in g.counts}
            dense, experts = stage_params(job, g.rank, g.counts, L.pp)
            blocks = [k for k in g.counts if k not in ("embed", "head")]
            biggest = max(job.params[k].dense / L.tp + job.params[k].experts / L.ep for k in blocks)
            out.append(RankSums(g.rank, g.n_ranks, cost_sum(cost, g.counts), dense / L.tp, experts / L.ep,
                                max(cost[k].act for k in g.counts), biggest, sum(g.counts[k] for k in blocks)))
        job.memo.rank_sums[key] = out
    return job.memo.rank_sums[key]


def pipeline_p2p(job, L):
    """Point-to-point seconds per micro-batch on a pipeline rank: each tp rank sends its 1/tp of the
    activations forward and their gradients back, once per chunk."""
    if L.pp == 1:
        return 0.0
    message = L.mbs * job.seq / L.cp * job.cfg.d_model * job.bytes["act"] / L.tp
    return 2 * L.vp * comm_time(job.hw, "p2p", message, 2, in_domain(job.hw, 2, L.tp * L.cp * L.dp))


@dataclass
class RankTime:
    n_ranks: int            # pipeline ranks like this one
    compute: float          # s per micro-batch: forward, backward and recompute
    recompute: float        # s per micro-batch: of compute, the forward work recompute repeats
    tp: float               # s per micro-batch: tensor-parallel communication, every pass
    ep: float               # s per micro-batch: expert all-to-alls, every pass
    cp: float               # s per micro-batch: exposed context-parallel communication
    p2p: float              # s per micro-batch: pipeline point-to-point
    fsdp: float             # s per micro-batch: exposed ZeRO-3 weight gathers and gradient reduce-scatters
    dp: float               # s per step: exposed gradient (and ZeRO-1/2 weight) sync after the last micro-batch
    optimizer: float        # s per step: the Adam update of the weights held here

    @property
    def micro_batch(self):  # s: the rank's pace, one micro-batch with its communication
        return self.compute + self.tp + self.ep + self.cp + self.p2p + self.fsdp


def rank_time(job, L, g):
    """The RankTime of the pipeline ranks of RankSums g under layout L."""
    cfg, hw, nb, total = job.cfg, job.hw, job.bytes, g.total
    m = job.gbs // (L.dp * L.mbs)  # micro-batches per step on each pipeline
    full, sel = L.recompute == "full", L.recompute == "selective"
    dp_n, edp_n = L.dp * L.cp, L.tp * L.dp * L.cp // L.ep  # replicas of a dense / a routed-expert weight
    sync = lambda op, nbytes: replica_sync(hw, L, op, g.dense * nbytes, g.experts * nbytes)
    recompute = total.fwd if full else total.core if sel else 0.0
    passes = 3 if full else 2  # forward, backward, and the forward again under full recompute
    back = total.bwd + recompute  # the window in which gradients appear
    fsdp = dp_t = 0.0
    if L.zero == 3:  # every micro-batch gathers the weights (forward, again backward), scatters gradients,
        # tensor by tensor (about 4 a block: two matrices, a bias, a norm), each ring's latency n - 1 hops
        ring = 4 * g.blocks * (dp_n - 1) * hw["latency_s"]
        gather, scatter = sync("all_gather", nb["w"]) + ring, sync("reduce_scatter", nb["g"]) + ring
        fsdp = hidden(hw, gather, total.fwd) + hidden(hw, (1 + full) * gather + scatter, back)
    elif L.zero == 0:  # DDP: all-reduce the gradients under the last micro-batch's backward
        dp_t = hidden(hw, sync("all_reduce", nb["g"]), back)
    else:  # reduce-scatter gradients (ZeRO-2: every micro-batch's), gather new weights under the next forward
        dp_t = hidden(hw, sync("reduce_scatter", nb["g"]), back) * (m if L.zero == 2 else 1) \
            + hidden(hw, sync("all_gather", nb["w"]), total.fwd)
    if cfg.tie_embeddings and L.pp > 1 and g.rank in (0, L.pp - 1):  # the shared embedding's gradient, first <-> last
        dp_t += comm_time(hw, "all_reduce", cfg.vocab_size * cfg.d_model / L.tp * nb["g"], 2, 1)
    local = g.dense / (dp_n if L.zero else 1) + g.experts / (edp_n if L.zero else 1)  # optimizer states held here
    # Adam reads and writes every local master weight, gradient and moment (30 B; 28 B without a master copy)
    optimizer = mem_time(hw, (30 if nb["opt"] == 12 else 28) * local, 8)
    return RankTime(g.n_ranks, compute=total.fwd + total.bwd + recompute, recompute=recompute, tp=total.tp * passes,
                    ep=total.ep * passes, cp=total.cp_fwd * (1 + full) + total.cp_bwd, p2p=pipeline_p2p(job, L),
                    fsdp=fsdp, dp=dp_t, optimizer=optimizer)


def evaluate(job, L):
    """Predicted step time (s) of layout L, its breakdown (s; the terms sum to the step time), the
    throughput figures and the peak memory per GPU, as a dict."""
    m = job.gbs // (L.dp * L.mbs)  # micro-batches per step on each pipeline
    ranks = [rank_time(job, L, g) for g in rank_sums(job, L)]
    # the pipeline: m micro-batches at the pace of the slowest rank, plus the fill and drain
    # bubble of (pp - 1) / vp average micro-batch times (Narayanan et al. 2021, Sec. 2.2)
    slow = max(ranks, key=lambda x: x.micro_batch)
    bubble = (L.pp - 1) / L.vp * sum(x.n_ranks * x.micro_batch for x in ranks) / L.pp
    tail = max(ranks, key=lambda x: x.dp + x.optimizer)
    breakdown = {"compute": m * (slow.compute - slow.recompute), "recompute": m * slow.recompute,
                 "tp_comm": m * slow.tp, "ep_comm": m * slow.ep, "cp_comm": m * slow.cp,
                 "pp_p2p": m * slow.p2p, "pp_bubble": bubble, "fsdp_comm": m * slow.fsdp,
                 "dp_comm": tail.dp, "optimizer": tail.optimizer}
    step = sum(breakdown.values())
    tokens, peak = job.gbs * job.seq, memory(job, L)
    model_flops = job.flops * tokens / step / job.gpus
    return dict(layout=L, step_time_s=step, tokens_per_s_per_gpu=tokens / step / job.gpus,
                model_tflops_per_gpu=model_flops / 1e12, mfu=model_flops / job.peak,
                memory_gib_per_gpu=peak / 2**30, fits=peak <= HBM_USABLE * job.hw["hbm_gb"] * 1e9, breakdown=breakdown)


def memory(job, L):
    """Peak bytes per GPU of layout L: weights, gradients and optimizer states by ZeRO stage, the
    activations of the micro-batches in flight (1F1B: pp - rank of them; interleaved: Korthikanti et
    al.'s count), and the working set of the block being recomputed and differentiated."""
    nb, m, full, sel = job.bytes, job.gbs // (L.dp * L.mbs), L.recompute == "full", L.recompute == "selective"
    dp_n, edp_n = L.dp * L.cp, L.tp * L.dp * L.cp // L.ep
    peak = 0.0
    for g in rank_sums(job, L):
        shard = lambda stage: g.dense / (dp_n if L.zero >= stage else 1) + g.experts / (edp_n if L.zero >= stage else 1)
        in_flight = min(m, L.pp - g.rank) if L.vp == 1 else \
            min(m * L.vp, 2 * (L.pp - g.rank - 1) + (L.vp - 1) * L.pp + 1)
        per_chunk = (g.total.act_full if full else g.total.act_selective if sel else g.total.act) / L.vp
        # sharded gradients (weights) exist whole for the block at work, before its reduce-scatter (after its gather)
        working = g.working + g.biggest * (nb["g"] * (L.zero >= 2) + nb["w"] * (L.zero == 3))
        states = nb["w"] * shard(3) + nb["g"] * shard(2) + nb["opt"] * shard(1)
        peak = max(peak, states + in_flight * per_chunk + working)
    return peak


@dataclass
class ModelTotals:
    total: LayerCost        # layer_cost summed over every block of the model, the embedding and heads included
    ends: LayerCost         # of total, the embedding's and the heads'
    longest: LayerCost      # field by field, the largest of the pattern's blocks
    dense: int              # the pattern's dense parameters (no embedding, head or MTP depths)
    experts: int            # the pattern's routed-expert parameters


def model_totals(job, L):
    """The ModelTotals of layout L's sizes."""
    key = (L.tp, L.cp, L.ep, L.mbs, L.sp)
    if key not in job.memo.model_totals:
        cfg = job.cfg
        counts = {k: (cfg.pattern + cfg.mtp_pattern * cfg.mtp_depth).count(k) for k in job.params}
        counts.update(embed=1, head=1 + cfg.mtp_depth)
        cost = {k: layer_cost(job, k, L.mbs, L.tp, L.cp, L.ep, L.sp) for k in counts}
        kinds = dict.fromkeys(cfg.pattern)  # each kind once, in the pattern's order
        longest = LayerCost(*(max(getattr(cost[k], f.name) for k in kinds) for f in fields(LayerCost)))
        job.memo.model_totals[key] = ModelTotals(
            cost_sum(cost, counts), cost_sum(cost, {"embed": 1, "head": counts["head"]}), longest,
            sum(job.params[k].dense for k in cfg.pattern), sum(job.params[k].experts for k in cfg.pattern))
    return job.memo.model_totals[key]


def compute_bound(job, L):
    """No layout with L's sizes and recompute level runs a step faster than this: every
    micro-batch's compute and tensor, expert and context communication on a rank with the average
    share of the blocks, its point-to-point, and the bubble of such ranks."""
    t = model_totals(job, L).total
    full, sel = L.recompute == "full", L.recompute == "selective"
    per_mb = t.fwd + t.bwd + 2 * t.tp + 2 * t.ep + t.cp_fwd + t.cp_bwd
    per_mb += t.fwd + t.tp + t.ep + t.cp_fwd if full else t.core if sel else 0.0
    m = job.gbs // (L.dp * L.mbs)
    return (m + (L.pp - 1) / L.vp) * per_mb / L.pp + m * pipeline_p2p(job, L)


def sync_bound(job, L, stages):
    """The least exposed data-parallel communication of any of these ZeRO stages on a rank with the
    average share of the weights, under a window no longer than the longest block times the blocks
    per rank plus the embedding and heads. Added to compute_bound, a lower bound of the step."""
    if L.dp * L.cp == 1 and L.tp * L.dp * L.cp // L.ep == 1:
        return 0.0
    totals = model_totals(job, L)
    ends, longest = totals.ends, totals.longest
    full, sel = L.recompute == "full", L.recompute == "selective"
    m, hw, nb = job.gbs // (L.dp * L.mbs), job.hw, job.bytes
    per_rank = len(job.cfg.pattern) / L.pp
    fwd = per_rank * longest.fwd + ends.fwd
    back = per_rank * (longest.bwd + (longest.fwd if full else longest.core if sel else 0)) + ends.bwd \
        + (ends.fwd if full else 0)
    tables = 1 + (not job.cfg.tie_embeddings or L.pp > 1)  # the embedding and the LM head (MTP weights left out)
    dense, experts = (totals.dense + tables * job.cfg.vocab_size * job.cfg.d_model) / L.pp / L.tp, \
        totals.experts / L.pp / L.ep
    sync = lambda op, nbytes: replica_sync(hw, L, op, dense * nbytes, experts * nbytes)
    least = {0: hidden(hw, sync("all_reduce", nb["g"]), back),
             1: hidden(hw, sync("reduce_scatter", nb["g"]), back) + hidden(hw, sync("all_gather", nb["w"]), fwd),
             3: m * (1 - hw["overlap"]) * (2 * sync("all_gather", nb["w"]) + sync("reduce_scatter", nb["g"]))}
    least[2] = least[1]
    return min(least[z] for z in stages)


# -----------------------------------------------------------------------------
# the search

@functools.cache
def divisors(n):
    return [i for i in range(1, n + 1) if n % i == 0]


def powers_of_two(n):
    return [2 ** i for i in range(n.bit_length()) if 2 ** i <= n]


def broken_rule(job, L):
    """Why layout L cannot run (a divisibility or placement rule), or None."""
    cfg, gpn, n_layers = job.cfg, job.hw["gpus_per_node"], len(job.cfg.pattern)
    kinds = cfg.pattern + cfg.mtp_pattern * cfg.mtp_depth
    if L.tp * L.pp * L.dp * L.cp != job.gpus:
        return f"tp*pp*dp*cp = {L.tp * L.pp * L.dp * L.cp}, not the {job.gpus} GPUs"
    if L.tp > gpn:
        return f"tp={L.tp}: tensor parallelism stays inside one NVLink domain ({gpn} GPUs)"
    if "*" in kinds and (cfg.n_head % L.tp or cfg.n_kv_head % L.tp):
        return f"tp={L.tp} must divide the attention heads ({cfg.n_head}) and KV heads ({cfg.n_kv_head})"
    if "M" in kinds and (cfg.mamba_heads % L.tp or cfg.mamba_groups % L.tp):
        return f"tp={L.tp} must divide the Mamba heads ({cfg.mamba_heads}) and groups ({cfg.mamba_groups})"
    if "-" in kinds and cfg.d_ff % L.tp:
        return f"tp={L.tp} must divide d_ff ({cfg.d_ff})"
    if L.ep > 1 and ("E" not in kinds or cfg.n_experts % L.ep or (L.tp * L.dp * L.cp) % L.ep):
        return f"ep={L.ep} must divide the routed experts ({cfg.n_experts if 'E' in kinds else 0}) and tp*dp*cp"
    if L.pp * L.vp > n_layers:
        return f"pp*vp = {L.pp * L.vp}: more pipeline chunks than the {n_layers} layers"
    if L.vp > 1 and L.pp == 1:
        return "virtual stages (vp > 1) need pipeline parallelism"
    if job.gbs % (L.dp * L.mbs):
        return f"gbs={job.gbs} must be a multiple of dp*mbs = {L.dp * L.mbs}"
    if L.vp > 1 and (job.gbs // (L.dp * L.mbs)) % L.pp:
        return "the interleaved schedule (vp > 1) needs a multiple of pp micro-batches"
    if L.cp > 1 and job.seq % (2 * L.cp):
        return f"seq_len={job.seq} must split into 2*cp = {2 * L.cp} chunks (causal load balancing)"
    if L.sp and L.tp == 1:
        return "sequence parallelism needs tp > 1"
    if L.recompute not in ("none", "selective", "full"):
        return f"recompute={L.recompute!r}: none, selective or full"
    if L.zero not in (0, 1, 2, 3):
        return f"zero={L.zero}: 0, 1, 2 or 3"
    return None


def why_none(job, fixed):
    """The rule that leaves no layout with these fixed dimensions: the one the layout they name
    (dp from the GPU count, the rest at their least) breaks first."""
    L = Layout(**{k: v for k, v in fixed.items() if k != "dp"})
    if job.gpus % (L.tp * L.pp * L.cp):
        return f"tp*pp*cp = {L.tp * L.pp * L.cp} does not divide the {job.gpus} GPUs"
    L = replace(L, dp=fixed.get("dp", job.gpus // (L.tp * L.pp * L.cp)))
    return broken_rule(job, L) or f"no layout satisfies the rules with {fixed}"


def search(job, fixed=None, top=10, refuse=None):
    """The `top` fastest layouts of job.gpus GPUs that fit in memory (the dimensions in `fixed`
    held, and none that refuse(job, L) names a reason against), best first; the candidate counts;
    and, when none fits, (GiB, layout) of the one that comes closest. Pruning, each rule never
    dropping a layout that could rank:
      1. divisibility and placement (broken_rule): tp*pp*dp*cp = GPUs; tp inside a node and
         dividing heads, groups and widths; ep the experts; the batch dividing into micro-batches
         (a multiple of pp of them when interleaved); the sequence into 2*cp chunks; at least a
         layer per chunk (chunks as even as they go where pp*vp does not divide the layers).
      2. dominated choices, never faster with the other dimensions equal: sequence parallelism
         off when tp > 1 (same communication, more work and memory); selective recompute with
         flash attention (nothing to drop); a heavier recompute at a ZeRO stage a lighter one
         fitted with; ZeRO-2 or -3 where a lower stage >= 1 fits (more communication, no less work).
      3. memory: if nothing fits at some micro-batch, nothing fits at a larger one.
      4. bound: candidates are evaluated in order of lower_bound, until it exceeds the top-th
         step time found."""
    fixed = fixed or {}
    cfg, N, gbs = job.cfg, job.gpus, job.gbs
    n_layers, moe = len(cfg.pattern), "E" in cfg.pattern
    opts = lambda key, values: [fixed[key]] if key in fixed else values
    grid = dict(tp=powers_of_two(N), cp=powers_of_two(N), pp=range(1, n_layers + 1),
                ep=range(1, cfg.n_experts + 1) if moe else [1], vp=range(1, n_layers + 1),
                mbs=range(1, gbs + 1), recompute=range(3), sp=range(2), zero=range(4))
    counts = dict(grid=math.prod(1 if k in fixed else len(v) for k, v in grid.items()), valid=0, checked=0, timed=0)
    candidates = []
    for tp in opts("tp", powers_of_two(min(N, job.hw["gpus_per_node"]))):
        for cp in opts("cp", powers_of_two(N // tp)):
            for pp in opts("pp", [p for p in divisors(N // tp // cp) if p <= n_layers]):
                dp = N // (tp * cp * pp)
                if dp * tp * cp * pp != N:
                    continue
                if fixed.get("dp", dp) != dp or gbs % dp:
                    continue
                eps = [e for e in divisors(cfg.n_experts) if (tp * dp * cp) % e == 0] if moe else [1]
                for ep in opts("ep", eps):
                    for vp in opts("vp", range(1, n_layers // pp + 1) if pp > 1 else [1]):
                        for mbs in opts("mbs", divisors(gbs // dp)):
                            L = Layout(tp, pp, dp, cp, ep, vp, mbs, fixed.get("recompute", "none"),
                                       fixed.get("sp", tp > 1), fixed.get("zero", 0))
                            if broken_rule(job, L) or (refuse and refuse(job, L)):
                                continue
                            counts["valid"] += (1 if "recompute" in fixed else 3) * (1 if "zero" in fixed else 4) \
                                * (1 if "sp" in fixed or tp == 1 else 2)
                            candidates.append((compute_bound(job, L), mbs, L))
    candidates.sort(key=lambda c: (c[0], c[1]))
    results, smallest, too_big = [], None, {}  # too_big: (sizes but mbs) -> smallest mbs where nothing fit
    stages = [fixed["zero"]] if "zero" in fixed else (0, 1, 2, 3)
    for bound, mbs, L in candidates:
        bar = results[top - 1]["step_time_s"] if len(results) >= top else math.inf
        if bound > bar:
            break  # rule 4: this and every later candidate is slower than the top found
        sizes = replace(L, mbs=1)
        if mbs >= too_big.get(sizes, math.inf) or bound + sync_bound(job, L, stages) > bar:
            continue  # rules 3 and 4
        any_fit, least = explore(job, L, fixed, counts, results, bar)
        if not any_fit:
            too_big[sizes] = mbs
            smallest = min(smallest or least, least, key=lambda x: x[0])
        results.sort(key=lambda r: r["step_time_s"])
        del results[top:]
    return results, counts, smallest


def explore(job, L, fixed, counts, results, bar):
    """The recompute levels and ZeRO stages of one layout worth timing (rules 2 and 4): those that
    fit in memory are evaluated into results. Returns (whether any fits, (GiB, layout) of the least
    memory-hungry one when none does)."""
    sharded = L.dp * L.cp > 1 or L.tp * L.dp * L.cp // L.ep > 1
    selective = job.attention != "flash" and "*" in job.cfg.pattern  # else it has nothing to drop
    levels = ["none", "selective", "full"] if selective else ["none", "full"]
    levels = [fixed["recompute"]] if "recompute" in fixed else levels
    stages = [fixed["zero"]] if "zero" in fixed else [0, 1, 2, 3] if sharded else [0]
    cap = HBM_USABLE * job.hw["hbm_gb"] * 1e9

    def need(recompute, zero):  # bytes per GPU
        counts["checked"] += 1
        return memory(job, replace(L, recompute=recompute, zero=zero))
    # the heaviest recompute takes the least memory at each ZeRO stage (ZeRO-3 need not take less than
    # ZeRO-2: it gathers a whole block at a time); if none of those fits, nothing does
    floor, floor_zero = min((need(levels[-1], zero), zero) for zero in stages)  # (bytes, ZeRO stage)
    if floor > cap:
        return False, (floor / 2**30, replace(L, recompute=levels[-1], zero=floor_zero))
    fitted = set()
    for recompute in levels:
        R = replace(L, recompute=recompute)
        if compute_bound(job, R) + sync_bound(job, R, stages) > bar:
            break  # rule 4: it cannot rank, nor can a heavier recompute
        for zero in stages:
            if zero in fitted or any(1 <= z < zero for z in fitted):
                continue  # dominated: a lighter recompute fitted at this stage, or a lower stage >= 1 fitted
            if need(recompute, zero) <= cap:
                results.append(evaluate(job, replace(R, zero=zero)))
                counts["timed"] += 1
                fitted.add(zero)
                if zero >= 1:
                    break
    return True, None


# -----------------------------------------------------------------------------
# what train.py runs (--tp, --sp, --ep, --fsdp, --recompute): --emit plans within it


def train_py_refuses(job, L):
    """Why train.py cannot run layout L, or None: it has no pipeline or context parallelism,
    shards all of the weights, gradients and AdamW moments (--fsdp: ZeRO-3) or none (DDP), and
    recomputes whole blocks (--recompute: full) or nothing."""
    if L.pp > 1 or L.vp > 1:
        return f"pipeline parallelism (pp={L.pp}, vp={L.vp})"
    if L.cp > 1:
        return f"context parallelism (cp={L.cp})"
    if L.zero in (1, 2):
        return f"ZeRO-{L.zero} (it runs DDP, or --fsdp: ZeRO-3)"
    if L.recompute == "selective":
        return "selective recompute (--recompute recomputes whole blocks: full)"
    if L.ep > 1 and L.tp > 1:
        return f"ep={L.ep} with tp={L.tp}"
    if L.tp > 1 and L.dp > 1 and L.zero != 3:
        return f"tp={L.tp} with {L.dp} DDP replicas (TP replicas take --fsdp: ZeRO-3)"
    if L.ep > 1 and L.zero == 3 and L.dp > L.ep:  # the planner's ZeRO-3 would count them sharded over dp/ep
        return f"ZeRO-3 of the routed experts over their {L.dp // L.ep} replicas (--fsdp leaves the EP shards whole)"
    if L.sp and job.seq % L.tp:
        return f"sequence parallelism of seq_len={job.seq} over tp={L.tp}"
    if job.low and L.tp > 1:  # its low-precision GEMMs take whole weights
        return f"{job.precision} with tp={L.tp}"
    return None


def search_train_py(job, fixed, top=10):
    """search() within what train.py runs: ZeRO 0 or 3 and recompute none or full, each searched
    apart (search's dominance rules would drop ZeRO-3 where ZeRO-1 fits), best first."""
    results, counts, smallest = [], {}, None
    for zero in [fixed["zero"]] if "zero" in fixed else (0, 3):
        for recompute in [fixed["recompute"]] if "recompute" in fixed else ("none", "full"):
            only = dict(fixed, pp=1, cp=1, vp=1, zero=zero, recompute=recompute)
            found, n, least = search(job, only, top, refuse=train_py_refuses)
            results += found
            counts = {k: counts.get(k, 0) + v for k, v in n.items()}
            if least and (smallest is None or least[0] < smallest[0]):
                smallest = least
    return sorted(results, key=lambda r: r["step_time_s"])[:top], counts, smallest


# -----------------------------------------------------------------------------
# command line: nanoGPT-style --key=value flags, parsed by configurator.py

LAYOUT_KEYS = [f.name for f in fields(Layout)]
FLAGS = dict(
    model=None,          # a preset (gpt3-175b, llama3-70b, ...), an HF config.json / folder, or a train.py config file
    seq_len=None,        # tokens per sequence (default: the preset's, or the config file's block_size)
    gpu="h100",          # a100 a800 h100 h800 h200 b200 gb200 b300 gb300, or a JSON profile (--calibrate writes one)
    gpus=8,              # GPUs in the job
    gbs=None,            # global batch, sequences per step
    precision="bf16",    # bf16, fp8 / mxfp8 / nvfp4 (the linear layers' GEMMs), fp16, fp32
    attention="flash",   # flash, or materialized (s x s scores in memory, as before FlashAttention)
    **{k: None for k in LAYOUT_KEYS},  # --tp --pp --dp --cp --ep --vp --mbs --recompute --sp --zero: fix them
    layers=None, hidden=None, heads=None, kv_heads=None, ffn=None, vocab=None,  # a Transformer without --model
    experts=0, topk=2, expert_ffn=None, shared_experts=0, moe_every=1,  # ... with MoE layers
    gated=False,         # ... with a gated (SwiGLU) MLP of width ffn
    peak_tflops=None, hbm_gb=None, hbm_tbs=None,  # override the --gpu profile: peak at --precision, HBM GB and TB/s,
    nvlink_gbs=None, net_gbs=None, gpus_per_node=None,  # link GB/s per direction in and out of a node, node size
    top=10,              # rows of the table
    json=False,          # print the ranked layouts as JSON instead
    emit=False,          # print the train.py command of the best layout train.py can run
    calibrate=False,     # measure this machine and write --out
    out="hardware.json",  # where --calibrate writes
    validate=None,       # published-runs CSVs (comma-separated): predicted vs measured, by subset; layout pairs
    cv=False,            # with --validate: fit the constants leaving one source out at a time (minutes)
    moe_imbalance=1.0,   # the busiest expert-parallel rank's routed tokens over the mean (1: balanced routing)
    a2a_overlap=False,   # the expert all-to-alls overlap another micro-batch's compute (Megatron-Bridge's EP overlap)
    grad_reduce="fp32",  # gradients accumulated and reduced in fp32, or bf16 (Megatron's grad_reduce_in_fp32=False)
)
# the valid range of each numeric flag, checked by configurator.py before any work (exit 2)
RANGES = {**{k: "int [1, inf)" for k in ("gpus", "gbs", "seq_len", "tp", "pp", "dp", "cp", "ep", "vp", "mbs", "layers",
                                          "hidden", "heads", "kv_heads", "ffn", "vocab", "topk", "expert_ffn",
                                          "moe_every", "gpus_per_node", "top")},
          "experts": "int [0, inf)", "shared_experts": "int [0, inf)", "zero": "int [0, 3]",
          "moe_imbalance": "[1, inf)",
          **{k: "(0, inf)" for k in ("peak_tflops", "hbm_gb", "hbm_tbs", "nvlink_gbs", "net_gbs")}}


def parse_flags(argv):
    scope = dict(FLAGS, config_keys=list(FLAGS), config_ranges=RANGES)
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its "Overriding: ..." echo must not mix with --json
            exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read(), scope)
    finally:
        sys.argv = saved
    return {k: scope[k] for k in FLAGS}


def make_job(a):
    """The Job and the layout dimensions the flags fix; ValueError names a bad flag (their ranges are
    configurator.py's to check)."""
    if a["gbs"] is None:
        raise ValueError("--gbs (global batch, sequences per step) is required")
    if a["precision"] not in PRECISION:
        raise ValueError(f"--precision={a['precision']}: one of {', '.join(PRECISION)}")
    if a["attention"] not in ("flash", "materialized"):
        raise ValueError(f"--attention={a['attention']}: flash or materialized")
    if a["model"] is not None:
        cfg, seq = load_model(a["model"])
    elif a["layers"] is not None:
        need = [k for k in ("hidden", "heads", "ffn", "vocab") if a[k] is None]
        if need:
            raise ValueError(f"a Transformer from flags needs --{' --'.join(need)}")
        if a["hidden"] % a["heads"]:
            raise ValueError(f"--hidden={a['hidden']} must be a multiple of --heads={a['heads']}")
        if a["heads"] % (a["kv_heads"] or a["heads"]):
            raise ValueError(f"--heads={a['heads']} must be a multiple of --kv_heads={a['kv_heads']}")
        cfg, seq = transformer(a["layers"], a["hidden"], a["heads"], a["ffn"], a["vocab"], a["kv_heads"], a["gated"],
                               a["experts"], a["topk"], a["expert_ffn"], a["shared_experts"], a["moe_every"]), None
    else:
        raise ValueError("give --model=... (a preset, an HF config or a train.py config) or --layers --hidden "
                         "--heads --ffn --vocab")
    seq = a["seq_len"] or seq
    if seq is None:
        raise ValueError("--seq_len is required for this model (a config file may give it as block_size)")
    hw = load_hardware(a["gpu"], hbm_gb=a["hbm_gb"], gpus_per_node=a["gpus_per_node"],
                       hbm_bw=a["hbm_tbs"] and a["hbm_tbs"] * 1e12, nvlink_bw=a["nvlink_gbs"] and a["nvlink_gbs"] * 1e9,
                       net_bw=a["net_gbs"] and a["net_gbs"] * 1e9)
    peak = LINEAR[a["precision"]][0]  # the peak its linear layers run at
    if a["peak_tflops"]:
        hw["flops"] = dict(hw["flops"], **{peak: a["peak_tflops"] * 1e12})
    if peak not in hw["flops"] or (peak != a["precision"] and "bf16" not in hw["flops"]):
        raise ValueError(f"{hw['name']} has no {a['precision']} peak (it has {', '.join(hw['flops'])}): "
                         f"use --precision={next(iter(hw['flops']))} or --peak_tflops")
    fixed = {k: a[k] for k in LAYOUT_KEYS if a[k] is not None}
    if "sp" in fixed and type(fixed["sp"]) is not bool:
        raise ValueError(f"--sp must be True or False, got {fixed['sp']!r}")
    if fixed.get("recompute", "none") not in ("none", "selective", "full") or fixed.get("zero", 0) not in (0, 1, 2, 3):
        raise ValueError(f"--recompute is none, selective or full and --zero 0, 1, 2 or 3, got "
                         f"{fixed.get('recompute', 'none')!r} and {fixed.get('zero', 0)!r}")
    if type(a["a2a_overlap"]) is not bool:
        raise ValueError(f"--a2a_overlap must be True or False, got {a['a2a_overlap']!r}")
    if a["grad_reduce"] not in ("fp32", "bf16"):
        raise ValueError(f"--grad_reduce={a['grad_reduce']}: fp32 or bf16")
    return Job(cfg, seq, a["gbs"], a["gpus"], hw, a["precision"], a["attention"], a["moe_imbalance"],
               a["a2a_overlap"], a["grad_reduce"]), fixed


def report(job, results, counts, seconds, top):
    lines = [f"{job.gpus} x {job.hw['name']}, {job.precision}, gbs {job.gbs} x {job.seq} tokens, "
             f"{job.flops / 1e9:.4g} GFLOP per token (6 x {job.flops / 6e9:.3g}B), pattern "
             f"{job.cfg.pattern if len(job.cfg.pattern) <= 60 else job.cfg.pattern[:57] + '...'}",
             f"candidates: {counts['grid']:,} in the grid, {counts['valid']:,} pass the divisibility and placement "
             f"rules, {counts['checked']:,} checked against memory after dominance and bound pruning, "
             f"{counts['timed']:,} fit and timed ({seconds:.2f} s)"]
    keys = list(results[0]["breakdown"])
    head = f"{'#':>3} {'tp':>2} {'pp':>3} {'dp':>5} {'cp':>2} {'ep':>3} {'vp':>2} {'mbs':>3} {'recomp':>9} {'sp':>2} " \
           f"{'zero':>4} {'step s':>9} {'tok/s/GPU':>9} {'TFLOP/s':>7} {'MFU':>5} {'GiB':>6} |" + \
           "".join(f" {k.replace('_comm', ''):>9}" for k in keys)
    lines += [head + "   (breakdown, s)", "-" * len(head)]
    for i, r in enumerate(results[:top]):
        L = r["layout"]
        lines.append(f"{i + 1:>3} {L.tp:>2} {L.pp:>3} {L.dp:>5} {L.cp:>2} {L.ep:>3} {L.vp:>2} {L.mbs:>3} "
                     f"{L.recompute:>9} {'y' if L.sp else 'n':>2} {L.zero:>4} {r['step_time_s']:>9.4g} "
                     f"{r['tokens_per_s_per_gpu']:>9.4g} {r['model_tflops_per_gpu']:>7.3g} {r['mfu'] * 100:>4.1f}% "
                     f"{r['memory_gib_per_gpu']:>6.1f} |" + "".join(f" {r['breakdown'][k]:>9.3g}" for k in keys)
                     + ("" if r["fits"] else "  does not fit"))
    return "\n".join(lines)


def as_json(r):
    return dict(asdict(r["layout"]), **{k: v for k, v in r.items() if k != "layout"})


def train_py_command(job, spec, r):
    """The torchrun command that runs layout r with train.py."""
    gpn = job.hw["gpus_per_node"]
    nodes = math.ceil(job.gpus / gpn)
    if job.gpus % nodes:
        raise ValueError(f"{job.gpus} GPUs do not split evenly over {nodes} nodes of {gpn}")
    launch = f"torchrun --standalone --nproc_per_node={job.gpus}" if nodes == 1 else \
        f"torchrun --nnodes={nodes} --nproc_per_node={job.gpus // nodes} --rdzv_backend=c10d --rdzv_endpoint=HOST:29500"
    # fp8 as Nemotron-H: the Linear layers' GEMMs in FP8, the rest in bf16 (train.py --precision=fp8)
    dtype = "bfloat16" if job.low else {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[job.precision]
    cfg, kinds = job.cfg, set(job.cfg.pattern + job.cfg.mtp_pattern * job.cfg.mtp_depth)
    if spec and spec.endswith(".py"):
        model = [spec]  # the config file carries the model; only the batch changes
    else:
        keys = ["vocab_size", "d_model", "pattern", "tie_embeddings"] + \
            ["n_head", "n_kv_head", "head_dim", "rope"] * ("*" in kinds) + ["d_ff"] * ("-" in kinds) + \
            ["mamba_heads", "mamba_head_dim", "d_state", "mamba_groups", "d_conv", "chunk_size"] * ("M" in kinds) + \
            ["n_experts", "top_k", "moe_d_ff", "shared_d_ff", "moe_latent_size", "n_group", "topk_group",
             "routed_scaling_factor"] * ("E" in kinds) + ["mtp_depth", "mtp_pattern", "mtp_share"] * (cfg.mtp_depth > 0)
        model = [f"--{k}={getattr(cfg, k)}" if type(getattr(cfg, k)) is not str else f"--{k}='{getattr(cfg, k)}'"
                 for k in keys if getattr(cfg, k) is not None]
    L = r["layout"]
    layout = [f"--tp={L.tp}"] * (L.tp > 1) + ["--sp=True"] * L.sp + [f"--ep={L.ep}"] * (L.ep > 1) + \
        ["--fsdp=True"] * (L.zero == 3) + ["--recompute=True"] * (L.recompute == "full")
    return " ".join([launch, "train.py", *model, *layout, f"--batch_size={L.mbs}", f"--block_size={job.seq}",
                     f"--gradient_accumulation_steps={job.gbs // L.mbs}", f"--dtype={dtype}"] +
                    [f"--precision={job.precision}"] * job.low)


def main(argv):
    a = parse_flags(argv)
    try:
        if a["calibrate"] or a["validate"]:
            import planfit  # measured speeds: this machine's, the published runs'
            if a["calibrate"]:
                profile = planfit.calibrate(a["out"])
                print(f"wrote {a['out']}: " + json.dumps(profile["measured"]))
            else:
                planfit.report(a["validate"].split(","), cv=a["cv"])
            return
        job, fixed = make_job(a)
        why = a["emit"] and train_py_refuses(job, Layout(**fixed))
        if why:
            raise ValueError(f"train.py cannot run {why}: --emit plans within its --tp, --sp, --ep, --fsdp and "
                             "--recompute")
        t0 = time.perf_counter()
        if all(k in fixed for k in LAYOUT_KEYS):  # one layout: predict it
            L = Layout(**fixed)
            why = broken_rule(job, L)
            if why:
                raise ValueError(why)
            results, counts = [evaluate(job, L)], dict(grid=1, valid=1, checked=1, timed=1)
        else:
            results, counts, smallest = (search_train_py if a["emit"] else search)(job, fixed, top=a["top"])
            if not results:
                raise ValueError(why_none(job, fixed) if smallest is None else
                                 f"no layout fits in {job.hw['hbm_gb']} GB per GPU: the smallest needs "
                                 f"{smallest[0]:.1f} GiB ({smallest[1]})")
        seconds = time.perf_counter() - t0
        if a["emit"]:
            print(train_py_command(job, a["model"], results[0]))
        elif a["json"]:
            print(json.dumps([as_json(r) for r in results[:a["top"]]], indent=1))
        else:
            print(report(job, results, counts, seconds, a["top"]))
    except (ValueError, OSError) as e:
        die(str(e), 2)


if __name__ == "__main__":
    main(sys.argv[1:])
