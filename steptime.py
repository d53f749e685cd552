"""
steptime.py: what one training step costs on one parallel layout: its duration and its memory.
plan.py searches the layouts with it; planfit.py fits its constants on published runs.

A step's duration is its computation plus its communication minus their overlap (arXiv:2501.00254),
simulated from model and hardware numbers: per layer kind, the GEMMs, the memory-bound kernels and the
collectives of one micro-batch on one GPU (block_work, layer_cost), summed per pipeline rank and
scheduled as 1F1B or interleaved 1F1B (Narayanan et al. 2021, arXiv:2104.04473), with sequence
parallelism, selective recompute and activation memory from Korthikanti et al. 2022 (arXiv:2205.05198)
and memory by ZeRO stage (arXiv:1910.02054). MoE all-to-alls by placement, FP8 / MXFP8 / NVFP4 casts
and GEMM speed, NVL72 domains and the host's launch time are priced as docs/planner.md says.
"""
import json, math, os
from dataclasses import dataclass, field, fields

from mamba import ssd_flops
from hardware import CLUSTER_GPUS, HARDWARE
from model import NemotronConfig, Params, flops_per_token, layer_params, mtp_params

# -----------------------------------------------------------------------------
# hardware (hardware.py's table), a kernel's fixed cost and a collective's latency (s), and the
# fitted efficiencies: every GPU profile carries them, so a fit (planfit.py) or a profile may set its own
GPU_DEFAULTS = dict(kernel_s=4e-6, latency_s=10e-6, host_s=20e-6)  # host_s: the CPU's time to launch a kernel
# the fitted constants, the only ones: planfit.fit_constants on every published run we have
# (tests/published_runs*.csv; docs/planner.md gives the cross-validated errors)
FIT = dict(
    gemm_eff=0.689,      # a large 16-bit GEMM's throughput over the dense peak (cuBLAS steady state)
    mem_eff=0.703,       # memory-bound kernels' bandwidth over the HBM peak
    net_eff=1.0,         # a large collective's bus bandwidth over the link's peak
    overlap=0.831,       # the share of overlappable communication that compute actually hides
    lowp_eff=0.60,       # a large FP8 / MXFP8 / NVFP4 GEMM's throughput over its own dense peak
    ssd_eff=0.0828,      # the chunked SSD's fused kernels over the 16-bit peak (chunk-sized products)
    moe_sync_s=1.94e-3,  # s per MoE layer and pass that the GPU idles while the host sizes a dropless dispatch
)
HBM_USABLE = 0.95  # not fitted: CUDA context, communication buffers and fragmentation take the rest
# not fitted: the bus bandwidth of DeepSpeed's ZeRO-3 of early 2021 (v0.3: an all-gather, a copy and a device
# sync for each parameter), ~22 GB/s a GPU even over NVLink: on 8 A100 of one node a 5.1B model's forward took
# ~470 ms under ZeRO-3 and 60 under ZeRO-2, ~410 ms for gathering its 10.2 GB of fp16 weights (DeepSpeed
# issue #1174 and PR #1188, June 2021). planfit gives it to the runs that used that DeepSpeed's ZeRO-3.
DEEPSPEED_2021_ZERO3_BW = 7 / 8 * 5.1e9 * 2 / 0.41

# bytes per element of activations, and per parameter of weights, gradients (reduced in this
# precision), optimizer states (Adam: fp32 master copy, m, v; plain fp32 training has no master) and
# the weights ZeRO gathers (the 16-bit copy: the low-precision ones are cast from it after the gather)
PRECISION = {"bf16": dict(act=2, w=2, g=4, opt=12, gw=2), "fp16": dict(act=2, w=2, g=2, opt=12, gw=2),
             "fp8": dict(act=2, w=3, g=4, opt=12, gw=2),  # fp8 keeps a bf16 weight and its fp8 copy
             "mxfp8": dict(act=2, w=4, g=4, opt=12, gw=2),  # ... and MXFP8 one per orientation (row- and column-wise)
             "nvfp4": dict(act=2, w=3, g=4, opt=12, gw=2),  # ... NVFP4: two 4-bit copies
             "fp32": dict(act=4, w=4, g=4, opt=8, gw=4)}
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
    """An all-to-all among n GPUs spaced stride ranks apart. nbytes is what one GPU sends, (n - 1)/n of it to
    others: the peers inside its NVLink domain get theirs over NVLink while the rest leave through
    its network link at the same time, so the slower of the two sets the time."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    local = in_domain(hw, n, stride)
    intra = (local - 1) / n * nbytes / (hw["nvlink_bw"] * hw["net_eff"])
    inter = (n - local) / n * nbytes / (hw["net_bw"] * hw["net_eff"])
    return hw["latency_s"] + max(intra, inter)


def replicas(L):
    """How many GPUs of layout L hold a copy of a dense weight (dp * cp) and of a routed expert's
    (tp * dp * cp / ep): the groups that data parallelism and ZeRO sync and shard over."""
    return L.dp * L.cp, L.tp * L.dp * L.cp // L.ep


def replica_sync(hw, L, op, dense, experts):
    """A collective over the replicas of the dense weights (tp ranks apart) and over those of the
    routed experts' (ep ranks apart); dense and experts are the bytes of each on one GPU."""
    dp_n, edp_n = replicas(L)
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
    offload: int = 0        # blocks whose activations wait in the host's memory (pp 1, no recompute)


@dataclass
class Memo:
    """A Job's memos, one per function, each keyed by the arguments its result depends on."""
    layer_cost: dict = field(default_factory=dict)    # (kind, b, tp, cp, ep (1 unless MoE), sp) -> LayerCost
    stage_groups: dict = field(default_factory=dict)  # (pp, vp) -> [StageGroup]
    rank_sums: dict = field(default_factory=dict)     # (tp, cp, ep, mbs, sp, pp, vp) -> [RankSums]
    model_totals: dict = field(default_factory=dict)  # (tp, cp, ep, mbs, sp) -> ModelTotals


@dataclass(frozen=True)
class MLA:
    """Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434; DeepSeek-V3's sizes by default),
    which the planner prices in place of an attention block's GQA: queries from a q_rank-wide latent,
    keys and values from one kv_rank-wide latent plus a rope_dim-wide rotary key, both shared by the
    heads; per head, qk_dim-wide scores (rope_dim of them rotary) and v_dim-wide values. The latents'
    down-projections are whole on every tensor-parallel rank (Megatron-Core splits the up-projections)."""
    q_rank: int = 1536
    kv_rank: int = 512
    qk_dim: int = 192
    rope_dim: int = 64
    v_dim: int = 128

    def gemms(self, t, a, d, tp):
        """(batch, m, n, k) of its five projections for t tokens, a heads, width d: q down, q up,
        kv down (with the rotary key), kv up (keys' non-rotary part and values), output."""
        kv_up = a * (self.qk_dim - self.rope_dim + self.v_dim) / tp
        return [(1, t, self.q_rank, d), (1, t, a * self.qk_dim / tp, self.q_rank),
                (1, t, self.kv_rank + self.rope_dim, d), (1, t, kv_up, self.kv_rank), (1, t, d, a * self.v_dim / tp)]

    def params(self, a, d):
        """Its weights with a heads at width d: the five projections and the two latents' norms."""
        return sum(n * k for _, _, n, k in self.gemms(1, a, d, 1)) + self.q_rank + self.kv_rank


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
    mla: MLA = None             # the attention blocks are multi-head latent attention of these sizes (None: cfg's GQA)
    fp8_gather: bool = False    # ZeRO gathers fp8 / mxfp8 weights, not 16-bit ones (Megatron's fp8_param_gather)
    mamba_fused: bool = False   # the Mamba mixers save as Megatron-Core's fused path does (False: as mamba.py's)
    zero3_bw: float = 0.0       # B/s: the framework's own ceiling on a GPU's ZeRO-3 collectives (0: the network's)

    def __post_init__(self):
        self.bytes = dict(PRECISION[self.precision], **({"g": 2} if self.grad_reduce == "bf16" else {}))
        self.low = self.precision in LOW_PRECISION  # the linear layers' GEMMs in low precision
        if self.fp8_gather and self.precision in ("fp8", "mxfp8"):
            self.bytes["gw"] = LINEAR[self.precision][1]
            # and the weights are fp8 primary weights, no 16-bit copy: TE's Float8Tensor keeps its data and
            # transpose, an MXFP8Tensor both orientations with a scale per 32
            self.bytes["w"] = 2 * LINEAR[self.precision][1]
        self.peak = self.hw["flops"][LINEAR[self.precision][0]]  # linear layers
        self.core_peak = self.hw["flops"]["bf16" if self.low else self.precision]
        self.memo = Memo()
        self.flops = flops_per_token(self.cfg, self.seq)
        self.params = {k: layer_params(self.cfg, k) for k in set(self.cfg.pattern + self.cfg.mtp_pattern)}
        if self.mla and "*" in self.params:  # MLA's weights; its FLOPs: 6 a weight, scores qk_dim and values v_dim wide
            cfg, m = self.cfg, self.mla
            n = (cfg.pattern + cfg.mtp_pattern * cfg.mtp_depth).count("*")
            gqa = self.params["*"]
            self.params["*"] = Params(cfg.d_model + m.params(cfg.n_head, cfg.d_model), 0, 0)
            scores = 3 * 2 * cfg.n_head * (m.qk_dim + m.v_dim - 2 * cfg.head_dim) * self.seq / 2
            self.flops += n * (6 * (self.params["*"].dense - gqa.dense) + scores)


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
    lin_in: float = 0.0     # of saved, the linear layers' inputs (kept in low precision under fp8 and the like)


def block_work(job, kind, b, tp, cp, ep, sp):
    """What one block of `kind` ('M', '*', '-', 'E'; 'embed': the lookup; 'head': final norm, LM
    head and loss) does for a micro-batch of b sequences on one GPU, counted once for every use, as
    a BlockWork. The core is the attention core or the SSD: what selective recompute repeats."""
    cfg, s, d, act = job.cfg, job.seq, job.cfg.d_model, job.bytes["act"]
    t = b * s // cp         # tokens on this GPU
    ew = tp if sp else 1    # sequence parallelism splits the d-wide elementwise work and its activations
    # the pre-norm (read, write) and the residual add (2 reads, 1 write); the norm's input and output saved
    w = BlockWork(mem=5 * t * d / ew * act, kernels=2, saved=2 * t * d / ew * act, lin_in=t * d / ew * act)
    if kind in "*W":  # W: sliding-window attention, RoPE always, each query against at most a window of keys
        a, g, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qk, v = hd, hd  # per head, the width of the scores' product and of the values
        if job.mla and kind == "*":
            m, qk, v = job.mla, job.mla.qk_dim, job.mla.v_dim
            w.lin += m.gemms(t, a, d, tp)
            # the two latents (normed), q, k, v; the output for o_proj
            w.saved += t * (m.q_rank + m.kv_rank + m.rope_dim + a * (2 * qk + 2 * v) / tp) * act
            w.lin_in += t * (m.q_rank + m.kv_rank + a * v / tp) * act  # the latents, the output
            w.mem, w.kernels = w.mem + 4 * t * (a / tp + 1) * m.rope_dim * act, w.kernels + 1  # RoPE
            w.cp = t * a * (qk + v) / tp * act  # the K and V this GPU passes along the ring
        else:
            w.lin += [(1, t, (a + 2 * g) * hd / tp, d), (1, t, d, a * hd / tp)]
            w.saved += t * (a + 2 * g) * hd / tp * act + t * a * hd / tp * act  # q, k, v; the output for o_proj
            w.lin_in += t * a * hd / tp * act
            w.cp = t * 2 * g * hd / tp * act  # the K and V this GPU passes along the ring
            if cfg.rope or kind == "W":
                w.mem, w.kernels = w.mem + 4 * t * (a + g) * hd / tp * act, w.kernels + 1
        heads, q = b * a / tp, s / cp  # each GPU: its heads, its queries against all s keys (a ring under cp)
        if kind == "W":  # the same causal-half count over an effective length 2W(1 - W/2s) instead of s
            window = min(s, cfg.sliding_window)
            s = 2 * window * (1 - window / (2 * s))
        if job.attention == "flash":  # one fused kernel over the causal half; backward 2.5x (recomputes scores)
            w.core_flops, w.core_kernels = 2 * heads * q * s * (qk + v) / 2, 1
            w.saved += t * a / tp * 4  # the softmax statistics (fp32)
        else:  # Megatron before FlashAttention: full s x s scores written, softmaxed, dropped out, read back
            w.core_mm, w.core_kernels = [(heads, q, s, qk), (heads, q, v, s)], 2
            # per score, 9 B at 16 bit: softmax in and out, dropout in, out and mask
            w.core_bytes = 9 * heads * q * s * act / 2
            w.core_saved = 5 * heads * q * s * act / 2  # softmax output, dropout mask and output (Korthikanti's 5as)
    elif kind == "-":
        w.lin += [(1, t, cfg.d_ff / tp, d), (1, t, d, cfg.d_ff / tp)]
        w.mem, w.kernels = w.mem + 2 * t * cfg.d_ff / tp * act, w.kernels + 1  # the activation function
        w.saved += 2 * t * cfg.d_ff / tp * act  # its input and output
        w.lin_in += t * cfg.d_ff / tp * act
    elif kind == "M":
        H, P, N, G, Q = cfg.mamba_heads / tp, cfg.mamba_head_dim, cfg.d_state, cfg.mamba_groups / tp, cfg.chunk_size
        d_in, conv = H * P, H * P + 2 * G * N
        w.lin += [(1, t, 2 * d_in + 2 * G * N + H, d), (1, t, d, d_in)]
        # the chunked SSD: its chunk products (mamba.ssd_flops) or its traffic (x, B, C in, y out,
        # fp32 dt and chunk states), whichever takes longer; the conv (read, write); the gated norm (y, z, out)
        w.core_flops, w.core_kernels = t * ssd_flops(H, P, N, Q), 5
        w.core_bytes = t * (2 * d_in + 2 * G * N) * act + t * H * 8 + t / Q * H * P * N * 8
        w.mem, w.kernels = w.mem + (2 * conv + 3 * d_in) * t * act, w.kernels + 2
        w.lin_in += t * d_in * act  # the gated norm's output for out_proj
        # either way: in_proj's output, the gated norm's input (y) and output
        w.saved += t * (2 * d_in + 2 * G * N + H + 2 * d_in) * act
        if job.mamba_fused:  # mamba_split_conv1d_scan_combined recomputes the conv and y from in_proj's output;
            w.saved += t * G * 4  # the norm keeps its fp32 1/rms per group
        else:  # as mamba.py runs: the conv's output, fp32 dt and chunk states as well
            w.saved += t * conv * act + t * H * 4 + t / Q * H * P * N * 4
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
        # the permuted tokens and the activations' outputs into the experts' GEMMs, the shared expert's;
        # the norm's output feeds the 16-bit router too
        w.lin_in += (routed * k * (l + F) + t * cfg.shared_d_ff / tp) * act - t * d / ew * act
    elif kind == "embed":  # the lookup
        w.mem, w.kernels, w.saved, w.lin_in = t * d / ew * act, 1, 0.0, 0.0
    elif kind == "head":  # final norm, LM head, cross-entropy over fp32 logits (vocab split over tp)
        V = cfg.vocab_size
        w.mm += [(1, t, V / tp, d)]
        w.mem, w.kernels = 2 * t * d / ew * act + t * V / tp * (act + 8), 4
        w.saved, w.lin_in = 2 * t * d / ew * act + t * V / tp * (act + 4), 0.0  # the LM head stays in 16 bit
    w.act_full = t * d / ew * act  # what full recompute keeps: the block's input
    if job.low:  # Transformer Engine keeps a linear layer's input as its quantized copy for the wgrad GEMM
        w.saved -= w.lin_in * (1 - LINEAR[job.precision][1] / act)
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
    # Megatron-Core (0.10 on: MoE parallel folding, arXiv:2504.14960) lays the experts' ranks out
    # on their own grid, expert-TP fastest, then ep: with the experts whole on each GPU (expert-TP 1,
    # as block_work prices them) a GPU's expert-parallel peers are adjacent ranks, whatever tp and cp
    a2a = 2 * all_to_all_time(hw, w.a2a, ep, 1)
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
    offload: float          # s per micro-batch: exposed copies of offloaded activations to the host and back
    dp: float               # s per step: exposed gradient (and ZeRO-1/2 weight) sync after the last micro-batch
    optimizer: float        # s per step: the Adam update of the weights held here

    @property
    def micro_batch(self):  # s: the rank's pace, one micro-batch with its communication
        return self.compute + self.tp + self.ep + self.cp + self.p2p + self.fsdp + self.offload


def rank_time(job, L, g):
    """The RankTime of the pipeline ranks of RankSums g under layout L."""
    cfg, hw, nb, total = job.cfg, job.hw, job.bytes, g.total
    m = job.gbs // (L.dp * L.mbs)  # micro-batches per step on each pipeline
    full, sel = L.recompute == "full", L.recompute == "selective"
    dp_n, _ = replicas(L)
    sync = lambda op, nbytes: replica_sync(hw, L, op, g.dense * nbytes, g.experts * nbytes)
    recompute = total.fwd if full else total.core if sel else 0.0
    passes = 3 if full else 2  # forward, backward, and the forward again under full recompute
    back = total.bwd + recompute  # the window in which gradients appear
    fsdp = dp_t = 0.0
    if L.zero == 3:  # every micro-batch gathers the weights (forward, again backward), scatters gradients,
        # tensor by tensor (about 4 a block: two matrices, a bias, a norm), each ring's latency n - 1 hops
        ring = 4 * g.blocks * (dp_n - 1) * hw["latency_s"]
        gather, scatter = sync("all_gather", nb["gw"]) + ring, sync("reduce_scatter", nb["g"]) + ring
        if job.zero3_bw:  # a framework that moves them slower than the network (DEEPSPEED_2021_ZERO3_BW)
            edp_n = replicas(L)[1]
            cap = lambda b: (g.dense * (dp_n - 1) / dp_n + g.experts * (edp_n - 1) / edp_n) * b / job.zero3_bw
            gather, scatter = max(gather, cap(nb["gw"])), max(scatter, cap(nb["g"]))
        fsdp = hidden(hw, gather, total.fwd) + hidden(hw, (1 + full) * gather + scatter, back)
    elif L.zero == 0:  # DDP: all-reduce the gradients under the last micro-batch's backward
        dp_t = hidden(hw, sync("all_reduce", nb["g"]), back)
    else:  # reduce-scatter gradients (ZeRO-2: every micro-batch's), gather new weights under the next forward
        dp_t = hidden(hw, sync("reduce_scatter", nb["g"]), back) * (m if L.zero == 2 else 1) \
            + hidden(hw, sync("all_gather", nb["gw"]), total.fwd)
    if cfg.tie_embeddings and L.pp > 1 and g.rank in (0, L.pp - 1):  # the shared embedding's gradient, first <-> last
        dp_t += comm_time(hw, "all_reduce", cfg.vocab_size * cfg.d_model / L.tp * nb["g"], 2, 1)
    # offloaded activations go to the host under the forward and come back under the backward
    copy = offloaded(job, L) / (hw["host_bw"] * hw["net_eff"]) if L.offload else 0.0
    offload = hidden(hw, copy, total.fwd) + hidden(hw, copy, back)
    local = held(g, L, 1)  # the weights whose optimizer states are held here
    # Adam reads and writes every local master weight, gradient and moment (30 B; 28 B without a master copy)
    optimizer = mem_time(hw, (30 if nb["opt"] == 12 else 28) * local, 8)
    return RankTime(g.n_ranks, compute=total.fwd + total.bwd + recompute, recompute=recompute, tp=total.tp * passes,
                    ep=total.ep * passes, cp=total.cp_fwd * (1 + full) + total.cp_bwd, p2p=pipeline_p2p(job, L),
                    fsdp=fsdp, offload=offload, dp=dp_t, optimizer=optimizer)


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
                 "pp_p2p": m * slow.p2p, "pp_bubble": bubble, "fsdp_comm": m * slow.fsdp, "offload": m * slow.offload,
                 "dp_comm": tail.dp, "optimizer": tail.optimizer}
    step = sum(breakdown.values())
    tokens, peak = job.gbs * job.seq, memory(job, L)
    model_flops = job.flops * tokens / step / job.gpus
    return dict(layout=L, step_time_s=step, tokens_per_s_per_gpu=tokens / step / job.gpus,
                model_tflops_per_gpu=model_flops / 1e12, mfu=model_flops / job.peak,
                memory_gib_per_gpu=peak / 2**30, fits=peak <= HBM_USABLE * job.hw["hbm_gb"] * 1e9, breakdown=breakdown)


def held(g, L, stage):
    """Parameters of RankSums g whose copy of a state one GPU holds when ZeRO shards that state from
    `stage` on (1: optimizer states, 2: gradients, 3: weights): a dense weight's over its dp * cp
    replicas, a routed expert's over its tp * dp * cp / ep."""
    dp_n, edp_n = replicas(L)
    return g.dense / (dp_n if L.zero >= stage else 1) + g.experts / (edp_n if L.zero >= stage else 1)


def offloaded(job, L):
    """Activation bytes per micro-batch that layout L keeps in the host's memory: L.offload blocks of
    the average block's (Megatron-Core's cpu_offloading_num_layers; it allows pp 1 only, so the
    whole model is on the rank)."""
    if not L.offload:
        return 0.0
    t, cfg = model_totals(job, L), job.cfg
    return L.offload * (t.total.act - t.ends.act) / (len(cfg.pattern) + len(cfg.mtp_pattern) * cfg.mtp_depth)


def memory(job, L):
    """Peak bytes per GPU of layout L: weights, gradients and optimizer states by ZeRO stage, the
    activations of the micro-batches in flight (1F1B: pp - rank of them; interleaved: Korthikanti et
    al.'s count) less those offloaded to the host (one block's stays in flight, double-buffered),
    and the working set of the block being recomputed and differentiated."""
    nb, m, full, sel = job.bytes, job.gbs // (L.dp * L.mbs), L.recompute == "full", L.recompute == "selective"
    peak = 0.0
    for g in rank_sums(job, L):
        in_flight = min(m, L.pp - g.rank) if L.vp == 1 else \
            min(m * L.vp, 2 * (L.pp - g.rank - 1) + (L.vp - 1) * L.pp + 1)
        per_chunk = (g.total.act_full if full else g.total.act_selective if sel else g.total.act) / L.vp
        per_chunk -= offloaded(job, L) * (1 - 1 / L.offload) if L.offload else 0.0
        # sharded gradients (weights) exist whole for the block at work, before its reduce-scatter (after its gather)
        working = g.working + g.biggest * (nb["g"] * (L.zero >= 2) + nb["w"] * (L.zero == 3))
        states = nb["w"] * held(g, L, 3) + nb["g"] * held(g, L, 2) + nb["opt"] * held(g, L, 1)
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
    if replicas(L) == (1, 1):
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
             1: hidden(hw, sync("reduce_scatter", nb["g"]), back) + hidden(hw, sync("all_gather", nb["gw"]), fwd),
             3: m * (1 - hw["overlap"]) * (2 * sync("all_gather", nb["gw"]) + sync("reduce_scatter", nb["g"]))}
    least[2] = least[1]
    return min(least[z] for z in stages)
