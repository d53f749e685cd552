"""
plan.py: the parallelism planner. Read after model.py and train.py.

Given a model, a GPU type, a GPU count and a global batch, it prices one training step for every
parallel layout (tensor, pipeline, data, context and expert parallel sizes, virtual pipeline stages,
micro-batch, activation recompute, sequence parallelism, ZeRO stage, activations offloaded to the
host) with steptime.py's cost model,
drops the layouts that do not fit in memory, and ranks the rest by throughput:
    python plan.py --model=nemotron-h-8b --gpu=h100 --gpus=64 --gbs=768
    python plan.py --model=gpt3-175b --gpu=a100 --gpus=1024 --gbs=1536 --tp=8 --json
    python plan.py --model=config/tiny_cpu.py --gpu=cpu.json --gpus=2 --gbs=32 --precision=fp32 --emit
    python plan.py --calibrate --out=cpu.json          # measure this machine, write a hardware profile
    python plan.py --validate=tests/published_runs.csv,tests/published_runs_more.csv --cv=True
                                                       # predicted vs measured published runs (planfit.py)

Paper: "Automatically Planning Optimal Parallel Strategy for Large Language Models" (arXiv:2501.00254):
each candidate layout is simulated from model and hardware numbers (steptime.py), the candidate space
pruned by rules that never drop a layout that could rank. Nothing here runs a model: it is arithmetic
on a CPU.
"""
import contextlib, functools, json, math, os, sys, time
from dataclasses import asdict, fields, replace

from checkpoint import config_from_hf
from configurator import die
from model import NemotronConfig, config_file
from steptime import (HBM_USABLE, LINEAR, MLA, PRECISION, Job, Layout, compute_bound, evaluate, load_hardware,
                      memory, replicas, sync_bound)

# -----------------------------------------------------------------------------
# models: a NemotronConfig describes any stack (pattern of M mamba2, * attention, - mlp, E moe).
# A Transformer is "*-" per layer; a gated (SwiGLU) MLP of width f has the parameters and FLOPs of
# a two-matrix MLP of width 1.5 f, which is how it is written here.

def transformer(layers, hidden, heads, ffn, vocab, kv_heads=None, gated=False, experts=0, topk=2,
                expert_ffn=None, shared_experts=0, moe_every=1, tie=False, first_dense=0, head_dim=None):
    """A NemotronConfig for a dense or MoE Transformer given by its usual hyperparameters (MoE every
    moe_every layers after the first_dense dense ones; heads hidden / heads wide unless head_dim says)."""
    w = 1.5 if gated else 1
    moe = [experts > 0 and i >= first_dense and (i - first_dense) % moe_every == 0 for i in range(layers)]
    return NemotronConfig(
        vocab_size=vocab, d_model=hidden, pattern="".join("*E" if e else "*-" for e in moe),
        n_head=heads, n_kv_head=kv_heads or heads, head_dim=head_dim or hidden // heads, d_ff=int(w * ffn),
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
    if L.offload and (L.pp > 1 or L.recompute != "none"):  # Megatron-Core's TransformerConfig refuses both
        return f"offload={L.offload}: activations are offloaded with pp 1 and no recompute only"
    if not 0 <= L.offload < len(cfg.pattern):
        return f"offload={L.offload}: 0 up to the {len(cfg.pattern)} blocks, less one"
    if L.offload and "host_bw" not in job.hw:
        return f"offload={L.offload}: the GPU profile gives no host link (host_bw, bytes/s each way)"
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
      3. memory: if nothing fits at some micro-batch, nothing fits at a larger one. Activation
         offloading (pp 1, no recompute) is tried where nothing fits without recompute, with the
         fewest blocks that fit (each more only adds copies); it and recompute do not dominate
         each other.
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
                                       fixed.get("sp", tp > 1), fixed.get("zero", 0), fixed.get("offload", 0))
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
    sharded = replicas(L) != (1, 1)
    selective = job.attention != "flash" and "*" in job.cfg.pattern  # else it has nothing to drop
    levels = ["none", "selective", "full"] if selective else ["none", "full"]
    levels = [fixed["recompute"]] if "recompute" in fixed else ["none"] if L.offload else levels
    stages = [fixed["zero"]] if "zero" in fixed else [0, 1, 2, 3] if sharded else [0]
    cap = HBM_USABLE * job.hw["hbm_gb"] * 1e9

    def need(recompute, zero, offload=L.offload):  # bytes per GPU
        counts["checked"] += 1
        return memory(job, replace(L, recompute=recompute, zero=zero, offload=offload))
    # offloading where nothing fits without recompute: memory() falls with each block offloaded after
    # the first (one stays in flight), so the fewest blocks that fit are found by bisection on it
    spill, most = [], len(job.cfg.pattern) - 1  # rule 4: fewer blocks than the model has
    if "offload" not in fixed and L.pp == 1 and levels[0] == "none" and "host_bw" in job.hw:
        for zero in stages:
            fits = lambda k: need("none", zero, k) <= cap
            if fits(0) or most < 2 or not fits(most):
                continue
            lo, hi = 1, most  # offloading one block saves nothing: fits(1) is fits(0), False; fits(most) is True
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if fits(mid) else (mid, hi)
            spill.append(replace(L, offload=hi, zero=zero))
    for S in spill:
        if compute_bound(job, S) + sync_bound(job, S, [S.zero]) <= bar:
            results.append(evaluate(job, S))
            counts["timed"] += 1
    # the heaviest recompute takes the least memory at each ZeRO stage (ZeRO-3 need not take less than
    # ZeRO-2: it gathers a whole block at a time); if none of those fits, nothing does
    floor, floor_zero = min((need(levels[-1], zero), zero) for zero in stages)  # (bytes, ZeRO stage)
    if floor > cap:
        return bool(spill), (floor / 2**30, replace(L, recompute=levels[-1], zero=floor_zero))
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
    if L.offload:
        return f"activation offloading (offload={L.offload})"
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
            only = dict(fixed, pp=1, cp=1, vp=1, zero=zero, recompute=recompute, offload=0)
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
    **{k: None for k in LAYOUT_KEYS},  # --tp --pp --dp --cp --ep --vp --mbs --recompute --sp --zero --offload: fix them
    layers=None, hidden=None, heads=None, kv_heads=None, ffn=None, vocab=None,  # a Transformer without --model
    head_dim=None,       # ... with heads this wide (default hidden / heads; Qwen3's are 128)
    experts=0, topk=2, expert_ffn=None, shared_experts=0, moe_every=1,  # ... with MoE layers
    gated=False,         # ... with a gated (SwiGLU) MLP of width ffn
    mla=False,           # price the attention blocks as multi-head latent attention of DeepSeek-V3's sizes
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
    fp8_gather=False,    # ZeRO gathers fp8 / mxfp8 weights, not 16-bit ones (Megatron's fp8_param_gather)
    mamba_fused=False,   # Mamba activations as Megatron-Core's fused path keeps them (False: as mamba.py's)
)
# the valid range of each numeric flag, checked by configurator.py before any work (exit 2)
RANGES = {**{k: "int [1, inf)" for k in ("gpus", "gbs", "seq_len", "tp", "pp", "dp", "cp", "ep", "vp", "mbs", "layers",
                                          "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab", "topk",
                                          "expert_ffn", "moe_every", "gpus_per_node", "top")},
          "experts": "int [0, inf)", "shared_experts": "int [0, inf)", "zero": "int [0, 3]", "offload": "int [0, inf)",
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
        if a["hidden"] % a["heads"] and a["head_dim"] is None:
            raise ValueError(f"--hidden={a['hidden']} must be a multiple of --heads={a['heads']} (or give --head_dim)")
        if a["heads"] % (a["kv_heads"] or a["heads"]):
            raise ValueError(f"--heads={a['heads']} must be a multiple of --kv_heads={a['kv_heads']}")
        cfg, seq = transformer(a["layers"], a["hidden"], a["heads"], a["ffn"], a["vocab"], a["kv_heads"], a["gated"],
                               a["experts"], a["topk"], a["expert_ffn"], a["shared_experts"], a["moe_every"],
                               head_dim=a["head_dim"]), None
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
    if a["grad_reduce"] not in ("fp32", "bf16"):
        raise ValueError(f"--grad_reduce={a['grad_reduce']}: fp32 or bf16")
    return Job(cfg, seq, a["gbs"], a["gpus"], hw, a["precision"], a["attention"], a["moe_imbalance"],
               a["a2a_overlap"], a["grad_reduce"], MLA() if a["mla"] else None, a["fp8_gather"],
               a["mamba_fused"]), fixed


def report(job, results, counts, seconds, top):
    lines = [f"{job.gpus} x {job.hw['name']}, {job.precision}, gbs {job.gbs} x {job.seq} tokens, "
             f"{job.flops / 1e9:.4g} GFLOP per token (6 x {job.flops / 6e9:.3g}B), pattern "
             f"{job.cfg.pattern if len(job.cfg.pattern) <= 60 else job.cfg.pattern[:57] + '...'}",
             f"candidates: {counts['grid']:,} in the grid, {counts['valid']:,} pass the divisibility and placement "
             f"rules, {counts['checked']:,} checked against memory after dominance and bound pruning, "
             f"{counts['timed']:,} fit and timed ({seconds:.2f} s)"]
    keys = list(results[0]["breakdown"])
    head = f"{'#':>3} {'tp':>2} {'pp':>3} {'dp':>5} {'cp':>2} {'ep':>3} {'vp':>2} {'mbs':>3} {'recomp':>9} {'sp':>2} " \
           f"{'zero':>4} {'off':>3} {'step s':>9} {'tok/s/GPU':>9} {'TFLOP/s':>7} {'MFU':>5} {'GiB':>6} |" + \
           "".join(f" {k.replace('_comm', ''):>9}" for k in keys)
    lines += [head + "   (breakdown, s)", "-" * len(head)]
    for i, r in enumerate(results[:top]):
        L = r["layout"]
        lines.append(f"{i + 1:>3} {L.tp:>2} {L.pp:>3} {L.dp:>5} {L.cp:>2} {L.ep:>3} {L.vp:>2} {L.mbs:>3} "
                     f"{L.recompute:>9} {'y' if L.sp else 'n':>2} {L.zero:>4} {L.offload:>3} {r['step_time_s']:>9.4g} "
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
