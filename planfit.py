"""
planfit.py: the planner against published training runs. Read after plan.py.

Each row of a published-runs CSV (../shared/planner/published_runs*.csv, copied to tests/) becomes a
steptime.Job with the layout the run used and its measured step time; the planner predicts it. This file
reports the error by subset (dense, FP8, MoE, Blackwell, hybrid), checks that layouts of one model
on one cluster are ordered as measured, and fits steptime.FIT's constants with leave-one-source-out
cross-validation, so that the published figures are for sources the constants never saw:
    python plan.py --validate=tests/published_runs.csv,tests/published_runs_more.csv             # steptime.FIT
    python plan.py --validate=tests/published_runs.csv,tests/published_runs_more.csv --cv=True   # + the folds
It also holds plan.py --calibrate: this machine's speeds as a hardware profile.
"""
import csv, itertools, json, math, os, re, time
from dataclasses import dataclass, field

import plan
import steptime
from hardware import CLUSTER_GPUS, find_gpu
from model import flops_per_token

LAYOUT_SIZES = ("tp", "pp", "dp", "cp", "ep", "vp", "mbs")
GATED = r"llama|qwen|mixtral|deepseek|grok|gpt-oss"  # the families with a gated (SwiGLU-like) MLP
HEAD_DIM = {"qwen3": 128, "gpt-oss": 64}  # the families whose heads are not hidden / heads wide (their HF configs)
# the published recipes (model, GPU) whose expert all-to-alls overlap another micro-batch's compute:
# Megatron-Bridge's Qwen3-235B-A22B on H100 at TP=2 PP=8 VP=4 EP=32 sets moe_a2a_overlap=True
# (scripts/performance/configs/qwen/qwen3_workload_base_configs.py); its other MoE recipes that
# these rows use set it False or dispatch with DeepEP / HybridEP instead
A2A_OVERLAP = {("qwen3-235b-a22b", "h100")}
# the published FSDP recipes (model, GPU) that keep some layers' activations in the host's memory,
# as (Megatron layers offloaded, micro-batch): Megatron-Bridge's Llama-3 70B FP8 with use_megatron_fsdp
# sets cpu_offloading_num_layers to 40 of its 80 layers at micro-batch 2 on GB200, and 5 at the
# default micro-batch 1 on B200 (scripts/performance/configs/llama/llama3_workload_base_configs.py);
# no other row's recipe offloads
OFFLOAD = {("llama3.1-70b", "gb200"): (40, 2), ("llama3.1-70b", "b200"): (5, 1)}
BLACKWELL = ("b200", "gb200", "b300", "gb300")


# -----------------------------------------------------------------------------
# a published run: its job, the layout it fixes, what it measured

@dataclass
class Run:
    id: str
    source: str             # "S1", "S8", ...: the publication (leave-one-source-out folds by it)
    model: str
    cfg: object             # the model's NemotronConfig
    seq: int
    gbs: int
    gpus: int
    gpu: str                # a hardware.HARDWARE key
    precision: str          # a steptime.PRECISION key
    attention: str          # 'flash' or 'materialized'
    grad_reduce: str        # 'fp32', or 'bf16' in NVIDIA's performance recipes
    fixed: dict             # the layout fields the row gives (the planner searches the rest)
    measured: float         # s per step; None (priced, not scored) with no throughput or not_as_described
    pair_group: str         # rows of one model on one cluster under other layouts or precisions, or ""
    subsets: list           # the subsets it belongs to: dense, fp8, moe, blackwell, hybrid
    notes: list = field(default_factory=list)  # what was read into the row (a derived dp, an assumed batch)
    mla: steptime.MLA = None  # the attention is multi-head latent attention (DeepSeek-V3's), or None
    a2a_overlap: bool = False  # the recipe overlaps the expert all-to-alls (A2A_OVERLAP)
    fp8_gather: bool = False   # the recipe's ZeRO gathers fp8 weights (NVIDIA's performance recipes)
    mamba_fused: bool = False  # Megatron-Core's fused Mamba path (its default, use_mem_eff_path)
    zero3_bw: float = 0.0      # B/s: its framework's ceiling on ZeRO-3 collectives (DeepSpeed's of 2021), or 0

    def job(self, fit=None):
        """The steptime.Job of this run on its GPU, with these fitted constants (steptime.FIT's by default)."""
        return steptime.Job(self.cfg, self.seq, self.gbs, self.gpus, steptime.load_hardware(self.gpu, **(fit or {})),
                            self.precision, self.attention, a2a_overlap=self.a2a_overlap, grad_reduce=self.grad_reduce,
                            mla=self.mla, fp8_gather=self.fp8_gather, mamba_fused=self.mamba_fused,
                            zero3_bw=self.zero3_bw)


def number(text):
    """The leading number of a cell ("8 (uncertain)" -> 8, "~1024 (2M tokens)" -> 1024), or None."""
    m = re.match(r"\s*~?\s*([0-9]+(?:\.[0-9]+)?)", text or "")
    return float(m.group(1)) if m else None


def model_flops(row, seq):
    """Model FLOPs per token as Megatron-LM, NeMo and the papers that report MFU count them (when a
    row gives only TFLOP/s): every GEMM forward and backward, no recompute (conventions_and_hardware.md,
    Sec. 0): per layer 12 h^2 (1 + g/a) for the projections + 12 s h for the scores (half that,
    causal, in Megatron-Bridge's counter), 18 h f for a SwiGLU MLP (12 h f plain; the top-k routed
    and the shared experts' for MoE) and 6 h V for the LM head."""
    n = lambda k: number(row.get(k))
    h, L, a, V, f = n("hidden"), n("layers"), n("heads"), n("vocab"), n("ffn")
    g = n("kv_heads") or a
    gated = 18 if re.search(GATED, row["model"], re.I) else 12
    if n("moe_experts"):
        f = ((n("moe_topk") or 2) + (n("moe_shared_experts") or 0)) * (n("moe_expert_ffn") or f)
    scores = 6 if "bridge" in (row["ref"] + row["tflops_basis"]).lower() else 12
    return L * (12 * h * h * (1 + g / a) + scores * seq * h + gated * h * f) + 6 * h * V


def eq3_flops(row, B):
    """Narayanan et al. 2021, Eq. 3: FLOPs per step of B sequences, with the forward pass that full
    recompute repeats."""
    s, l, h, V = (number(row[k]) for k in ("seq_len", "layers", "hidden", "vocab"))
    return 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))


def precision_of(text):
    """steptime.PRECISION's name for a row's precision: FP8 with current or delayed scaling, MXFP8, NVFP4, 16 bit."""
    text = text.upper()
    if "NVFP4" in text or "FP4" in text:
        return "nvfp4"
    if "FP8-MX" in text or "MXFP8" in text:
        return "mxfp8"
    return "fp8" if "FP8" in text else "fp16" if text.startswith("FP16") else "bf16"


def zero_of(text):
    """The ZeRO stage a row's sharding text names, or None: Megatron's distributed optimizer shards the
    optimizer states and reduce-scatters gradients once a step (ZeRO-1 traffic); FSDP that keeps the
    weights gathered after the forward is ZeRO-2; full FSDP is ZeRO-3."""
    text = text.lower()
    if not text:
        return None
    if "distributed optimizer" in text or "zero-1" in text:
        return 1
    if "not resharded" in text or "zero-2" in text:
        return 2
    return 3 if "fsdp" in text or "zero-3" in text else 0


def row_model(row):
    """The NemotronConfig of a row: a preset where the name is one, else a Transformer of the row's
    shape (SwiGLU where the family uses it, its head width; the first k layers dense where the source
    says so)."""
    name = row["model"].lower().replace("-", "").replace(" ", "")
    preset = next((p for p in plan.PRESETS if p.replace("-", "") in name), None)
    if preset:
        return plan.PRESETS[preset][0]
    n = lambda k: int(number(row.get(k)) or 0)
    if not all(n(k) for k in ("layers", "hidden", "heads", "ffn", "vocab")):
        raise ValueError("no model shape given")
    dense = re.search(r"first (\d+) layers dense", row["model"] + row["notes"] + row["arch_source"])
    return plan.transformer(n("layers"), n("hidden"), n("heads"), n("ffn"), n("vocab"), kv_heads=n("kv_heads") or None,
                            gated=bool(re.search(GATED, row["model"], re.I)),
                            experts=n("moe_experts"), topk=n("moe_topk") or 2, expert_ffn=n("moe_expert_ffn") or None,
                            shared_experts=n("moe_shared_experts"), tie="gpt" in name and "oss" not in name,
                            first_dense=int(dense.group(1)) if dense else 0,
                            head_dim=next((hd for f, hd in HEAD_DIM.items() if f.replace("-", "") in name), None))


COLUMNS = {"id", "source", "model", "gpu", "gpu_count", "precision", "seq_len", "gbs_seqs", "step_time_s",
           "tflops_per_gpu", "tflops_basis", "pair_group", *LAYOUT_SIZES}


def read_runs(paths):
    """The Runs of these CSVs, and [(id, why)] of the rows that cannot be priced at all."""
    rows = []
    for path in paths:
        with open(path) as f:
            table = csv.DictReader(f)
            missing = COLUMNS - set(table.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: not a published-runs CSV (no column {', '.join(sorted(missing))})")
            rows += [{k: v or "" for k, v in r.items() if k is not None} for r in table]
    runs, skipped = [], []
    for row in rows:
        try:
            runs.append(read_run(row, rows))
        except ValueError as e:
            skipped.append((row["id"], str(e)))
    return runs, skipped


def closest(row, rows, gpu, keep):
    """Of the rows that pass keep, the one most like row (on `gpu`): the same GPU first, then the same
    generation (Blackwell or not), then the same precision; None if none passes."""
    blackwell = lambda r: find_gpu(r["gpu"]) in BLACKWELL
    return min((r for r in rows if keep(r)), default=None, key=lambda r: (
        find_gpu(r["gpu"]) != gpu, blackwell(r) != blackwell(row), r["precision"] != row["precision"]))


def read_run(row, rows):
    """One row as a Run (ValueError: why it cannot be priced). Layout fields the row leaves empty are
    searched, as the planner does for a user; what had to be read into the row is kept in Run.notes."""
    n = lambda k: number(row.get(k))
    cfg, notes = row_model(row), []
    gpu = find_gpu(row["gpu"])
    if gpu not in CLUSTER_GPUS:
        raise ValueError(f"no hardware preset for GPU '{row['gpu']}'")
    year = min(int(y) for y in re.findall(r"20[0-9]{2}", row["source"] + row["framework"]) or ["2025"])
    gpus, seq = int(n("gpu_count") or 0), int(n("seq_len") or 0)
    if not gpus or not seq:
        raise ValueError("no GPU count or sequence length given")
    fixed = {k: int(n(k)) for k in LAYOUT_SIZES if n(k)}
    fixed.setdefault("cp", 1)  # the sources name context parallelism where they use it
    if "E" not in cfg.pattern:
        fixed["ep"] = 1
    tp, pp, cp = fixed.get("tp"), fixed.get("pp"), fixed["cp"]
    if tp and pp:
        if gpus % (tp * pp * cp):
            raise ValueError(f"tp*pp*cp = {tp * pp * cp} does not divide the {gpus} GPUs")
        if fixed.get("dp") != gpus // (tp * pp * cp):
            if "dp" in fixed:  # NVIDIA's tables give dp = GPUs / (the recipe's smallest scale), MaxText FSDP x DP
                notes.append(f"dp {fixed['dp']} -> {gpus // (tp * pp * cp)} (tp*pp*dp*cp must be the GPUs)")
            fixed["dp"] = gpus // (tp * pp * cp)
    bridge, zero = "bridge" in row["framework"].lower(), zero_of(row["zero_or_fsdp"])
    recipe = bridge and zero == 3 and OFFLOAD.get((row["model"].lower(), gpu))
    if recipe:  # Megatron layers -> our blocks (a Transformer layer is two: attention, MLP)
        fixed["offload"] = recipe[0] * len(cfg.pattern) // int(n("layers") or len(cfg.pattern))
        if "mbs" not in fixed:
            fixed["mbs"] = recipe[1]
            notes.append(f"mbs {recipe[1]} and {recipe[0]} layers offloaded, from the recipe")
    fixed.setdefault("offload", 0)
    gbs = n("gbs_seqs") or (n("tokens_per_batch") and n("tokens_per_batch") / seq)
    if not gbs:  # the batch of the same model on as many GPUs, from the run this one reproduces
        twin = closest(row, rows, gpu, lambda r: r["model"] == row["model"] and r["gpu_count"] == row["gpu_count"]
                       and number(r["gbs_seqs"]))
        if twin is None:
            raise ValueError("no global batch given, nor one of the same model on as many GPUs")
        gbs = number(twin["gbs_seqs"])
        fixed.setdefault("mbs", int(number(twin["mbs"]) or 1))
        notes.append(f"gbs {gbs:.0f} from {twin['id']}")
    gbs = int(gbs)
    step = fixed.get("dp", 1) * fixed.get("mbs", 1)
    if "~" in row["gbs_seqs"] and gbs % step:  # an approximate batch: the nearest whole number of micro-batches
        notes.append(f"gbs ~{gbs} -> {max(1, round(gbs / step)) * step}")
        gbs = max(1, round(gbs / step)) * step
    megatron = bool(re.search(r"megatron|nemo", row["framework"], re.I))
    if zero is None and megatron:  # their default: from 2022 on,
        zero = 0 if year < 2022 else 1  # the distributed optimizer (NeMo's recipes turn it on)
    if zero is not None:
        fixed["zero"] = zero
    recompute = row["recompute"].lower()  # unstated: the frameworks' default, none
    fixed["recompute"] = "full" if recompute.startswith("full") else \
        "selective" if recompute.startswith("selective") else "none"
    sp = row["seq_parallel"].lower()
    if year < 2022 or sp == "no":
        fixed["sp"] = False
    elif sp == "yes":
        fixed["sp"] = True
    precision = precision_of(row["precision"])
    # FlashAttention reached Megatron-LM in 2023: before, the s x s scores were materialized
    attention = "materialized" if year <= 2022 else "flash"
    # NVIDIA's performance recipes (dgxc-benchmarking, the NeMo and Megatron-Bridge tables) keep and
    # reduce gradients in bf16 (their configs set grad_reduce_in_fp32 = False) and gather fp8 weights
    # (Megatron-Bridge's FP8 and MXFP8 precision recipes set fp8_param_gather = True)
    nvidia = bool(re.search(r"dgxc|perf", row["source"], re.I))
    grads = "bf16" if nvidia else "fp32"
    run = Run(row["id"], re.match(r"S\d+", row["source"]).group(0), row["model"], cfg, seq, gbs, gpus, gpu, precision,
              attention, grads, fixed, None, row.get("pair_group") or "", [], notes,
              steptime.MLA() if re.search(r"\bMLA\b", row.get("arch_source") or "") else None,
              bridge and (row["model"].lower(), gpu) in A2A_OVERLAP, nvidia,
              mamba_fused=megatron)  # Megatron-Core's MambaMixer trains on the fused path by default
    if zero == 3 and "deepspeed" in row["zero_or_fsdp"].lower() and year <= 2021:
        run.zero3_bw = steptime.DEEPSPEED_2021_ZERO3_BW
    arch = row.get("arch_type") or ("moe" if "E" in cfg.pattern else "hybrid" if "M" in cfg.pattern else "dense")
    counter = None  # a MoE or hybrid row's TFLOP/s alone: the FLOPs a token by its source's counter, from a twin
    if arch != "dense" and n("tflops_per_gpu") and not n("step_time_s") and not n("tokens_per_s_per_gpu"):
        twin = closest(row, rows, gpu, lambda r: r["model"] == row["model"] and r["seq_len"] == row["seq_len"]
                       and bridge == ("bridge" in r["framework"].lower())
                       and number(r["tokens_per_s_per_gpu"]) and number(r["tflops_per_gpu"]))
        if twin:
            counter = number(twin["tflops_per_gpu"]) * 1e12 / number(twin["tokens_per_s_per_gpu"])
            notes.append(f"{counter / 1e9:.1f} GFLOP a token by the counter of {twin['id']}")
    run.measured = measured(row, run, counter)
    why = not_as_described(run)
    if why and run.measured:  # it cannot have run as the row says: priced, not scored
        run.notes.append(why)
        run.measured = None
    run.subsets = [s for s, inside in [
        ("dense", arch == "dense" and precision in ("bf16", "fp16") and gpu in ("a100", "h100")),
        ("fp8", precision in steptime.LOW_PRECISION), ("moe", arch == "moe"),
        ("blackwell", gpu in BLACKWELL), ("hybrid", arch == "hybrid")] if inside]
    return run


def not_as_described(run):
    """Why the layout a row states cannot be the one that ran, or None. Where the row fixes tp, pp,
    ep and the ZeRO stage, each GPU holds its share of the weights and of the gradients whatever the
    rest; at one byte a weight and two a gradient (FP8 weights, bf16 gradients: the least any
    recipe behind these rows keeps) that share alone must fit in the GPU's memory."""
    f = run.fixed
    if not {"tp", "pp", "dp", "ep", "zero"} <= f.keys():
        return None
    L = steptime.Layout(f["tp"], f["pp"], f["dp"], f["cp"], f["ep"], f.get("vp", 1), zero=f["zero"])
    job = run.job()
    least = max(steptime.held(g, L, 3) + 2 * steptime.held(g, L, 2) for g in steptime.rank_sums(job, L))
    if least <= job.hw["hbm_gb"] * 1e9:
        return None
    return (f"not scored: at tp {L.tp} pp {L.pp} ZeRO-{L.zero} a GPU would hold {least / 1e9:.0f} GB of weights "
            f"and gradients alone (1 and 2 bytes each) on a {job.hw['hbm_gb']:.0f} GB GPU")


def measured(row, run, counter=None):
    """The run's step time (s): published, or from tokens/s per GPU, or from TFLOP/s per GPU by the
    FLOP count its source uses (Narayanan et al.'s Eq. 3 with recompute; Megatron's and NeMo's model
    FLOPs, or `counter`, the FLOPs a token their counter gives this model; else the FLOPs the model
    executes); None where the row gives no throughput."""
    n = lambda k: number(row.get(k))
    tokens = run.gbs * run.seq
    if n("step_time_s"):
        return n("step_time_s")
    if n("tokens_per_s_per_gpu"):
        return tokens / (n("tokens_per_s_per_gpu") * run.gpus)
    if not n("tflops_per_gpu"):
        return None
    basis = row["tflops_basis"].lower()
    if "eq.3" in basis or "recompute" in basis:
        flops = eq3_flops(row, run.gbs)
    elif re.search(r"megatron|nemo|megascale", row["framework"] + basis, re.I):  # their count, non-causal
        flops = (counter or model_flops(row, run.seq)) * tokens
    else:  # a count the source does not give (Llama 3, OPT): the FLOPs the model executes, causal
        flops = flops_per_token(run.cfg, run.seq) * tokens
    return flops / (n("tflops_per_gpu") * 1e12 * run.gpus)


# -----------------------------------------------------------------------------
# predicted vs measured

@dataclass
class Prediction:
    run: Run
    result: dict            # steptime.evaluate's dict of the layout the planner chose within what the run fixes
    fits: bool              # whether it fits in memory (a published layout the model thinks too big is still priced)

    @property
    def error(self):        # predicted / measured - 1, or None for a run without a measurement
        return self.result["step_time_s"] / self.run.measured - 1 if self.run.measured else None


def predict(run, fit=None):
    """The fastest layout within what the run fixes that fits in memory, as the planner would choose
    it for a user; where none fits (a miss of the memory model: the run ran), the fastest memory
    aside. ValueError names the rule that refuses the run's layout."""
    job = run.job(fit)
    results, _, smallest = plan.search(job, run.fixed, top=1)
    if results:
        return Prediction(run, results[0], True)
    if smallest is None:
        raise ValueError(f"run {run.id}: {plan.why_none(job, run.fixed)}")
    # it ran, so it fitted: the memory model missed; the fastest layout it allows, memory aside
    job.hw["hbm_gb"] = math.inf
    results, _, _ = plan.search(job, run.fixed, top=1)
    return Prediction(run, results[0], False)


SUBSETS = ("dense", "fp8", "moe", "blackwell", "hybrid")


def summary(predictions):
    """{subset: (runs, mean |error|, max |error|)} over the predictions with a measurement, 'all' first."""
    scored = [p for p in predictions if p.error is not None]
    out = {}
    for name in ("all",) + SUBSETS:
        errors = [abs(p.error) for p in scored if name == "all" or name in p.run.subsets]
        if errors:
            out[name] = (len(errors), sum(errors) / len(errors), max(errors))
    return out


def pairs(predictions):
    """Every two scored runs of one pair_group: how many the planner orders as measured, how many it
    can tell apart, how many it cannot, and the [(id, id)] it orders wrong. Two
    runs with the same inputs (MegaScale's ablation steps, which change only the framework) cannot
    be told apart by any planner that reads these columns: they are counted apart."""
    groups = {}
    for p in predictions:
        if p.run.pair_group and p.error is not None:
            groups.setdefault(p.run.pair_group, []).append(p)
    right = total = same = 0
    wrong = []
    for ps in groups.values():
        for a, b in itertools.combinations(ps, 2):
            if inputs(a.run) == inputs(b.run):
                same += 1
                continue
            total += 1
            good = (a.run.measured < b.run.measured) == (a.result["step_time_s"] < b.result["step_time_s"])
            right += good
            if not good:
                wrong.append((a.run.id, b.run.id))
    return right, total, same, wrong


def inputs(run):
    """What the planner reads of a run."""
    return (run.cfg, run.seq, run.gbs, run.gpus, run.gpu, run.precision, run.attention, run.grad_reduce,
            sorted(run.fixed.items()))


# -----------------------------------------------------------------------------
# the fit: a coordinate search of steptime.FIT's constants, and leave-one-source-out cross-validation

# where the search starts (the values before any fit: 70% of peak for a large GEMM, 90% of HBM,
# 85% of a link, 80% of overlappable communication hidden, FP8 60% of its peak, the SSD at half a
# GEMM's rate, 1 ms a dropless MoE layer's sync) and the range it may move each constant in
START = dict(gemm_eff=0.70, mem_eff=0.90, net_eff=0.85, overlap=0.80, lowp_eff=0.60, ssd_eff=0.35, moe_sync_s=1e-3)
BOUNDS = dict(gemm_eff=(0.3, 1.0), mem_eff=(0.3, 1.0), net_eff=(0.2, 1.0), overlap=(0.0, 1.0), lowp_eff=(0.2, 1.0),
              ssd_eff=(0.05, 1.0), moe_sync_s=(0.0, 0.01))


def loss(runs, fit):
    """What the fit minimises: the mean |error| over all runs plus that of each subset they cover
    (so that a subset of three runs is not drowned by sixty dense ones)."""
    table = summary([predict(r, fit) for r in runs])
    return sum(mean for _, mean, _ in table.values()) / len(table)


def fit_constants(runs, rounds=4):
    """steptime.FIT's constants that minimise loss on these runs, from START: each constant in turn
    tried at 9 points across a window around its value (clipped to BOUNDS), the window halving each
    round; the result rounded to 3 significant digits (as steptime.FIT writes them)."""
    fit = dict(START)
    scored = [r for r in runs if r.measured]
    best = loss(scored, fit)
    width = {k: (hi - lo) / 2 for k, (lo, hi) in BOUNDS.items()}
    for _ in range(rounds):
        for k, (lo, hi) in BOUNDS.items():
            for v in [min(hi, max(lo, fit[k] + width[k] * (i / 4 - 1))) for i in range(9)]:
                trial = loss(scored, dict(fit, **{k: v}))
                if trial < best - 1e-9:
                    best, fit = trial, dict(fit, **{k: v})
            width[k] /= 2
    fit = {k: float(f"{v:.3g}") for k, v in fit.items()}
    return fit, loss(scored, fit)


def cross_validate(runs, workers=2):
    """Leave one source out: for each source, the constants fitted on the others predict its runs
    (the folds fitted in `workers` processes). Returns the held-out predictions (every scored run
    once) and {source: fitted constants}."""
    import concurrent.futures, multiprocessing
    sources = sorted({r.source for r in runs if r.measured}, key=lambda s: int(s[1:]))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        fitted = pool.map(fit_constants, [[r for r in runs if r.source != s] for s in sources])
        fits = {s: fit for s, (fit, _) in zip(sources, fitted)}
    return [predict(r, fits[r.source]) for r in runs if r.source in fits], fits


# -----------------------------------------------------------------------------
# the report: plan.py --validate=FILES [--cv=True]

def subset_table(predictions, title):
    lines = [f"{title}: mean |error| of the step time by subset, then by source (runs, mean, max)"]
    scored = [p for p in predictions if p.error is not None]
    by_source = {s: [abs(p.error) for p in scored if p.run.source == s]
                 for s in sorted({p.run.source for p in scored}, key=lambda s: int(s[1:]))}
    for name, (n, mean, worst) in list(summary(predictions).items()) + [
            (s, (len(e), sum(e) / len(e), max(e))) for s, e in by_source.items()]:
        lines.append(f"  {name:<10} {n:>4} {mean * 100:>6.1f}% {worst * 100:>6.1f}%")
    right, total, same, wrong = pairs(predictions)
    lines.append(f"  layout pairs ordered as measured: {right} of {total}"
                 + (f" ({right / total * 100:.0f}%)" if total else "") + f"; wrong: {wrong or 'none'}; "
                 f"{same} more pairs have the same inputs (framework changes only): no planner can order them")
    return "\n".join(lines)


def report(paths, cv=False):
    """Print every run predicted (with steptime.FIT) against its measurement, the subset table, the
    pair check and the memory model's misses; with cv, the same for leave-one-source-out fits."""
    runs, skipped = read_runs(paths)
    predictions = [predict(r) for r in runs]
    print(f"{'id':<5} {'source':<4} {'model':<22} {'GPU':<5} {'prec':<5} {'GPUs':>5}  tp·pp·dp·cp·ep vp mbs "
          f"{'recomp':<9} zero {'step s':>7} {'pred s':>7} {'error':>7}")
    for p in predictions:
        r, L = p.run, p.result["layout"]
        sizes = f"{L.tp}·{L.pp}·{L.dp}·{L.cp}·{L.ep}"
        print(f"{r.id:<5} {r.source:<4} {r.model[:22]:<22} {r.gpu:<5} {r.precision:<5} {r.gpus:>5}  {sizes:<14} "
              f"{L.vp:>2} {L.mbs:>3} {L.recompute:<9} {L.zero:>4} {r.measured or float('nan'):>7.2f} "
              f"{p.result['step_time_s']:>7.2f} {'' if p.error is None else f'{p.error * 100:+6.1f}%':>7}"
              + ("" if p.fits else "  (memory model: does not fit)") + "".join(f"  [{n}]" for n in r.notes))
    for id, why in skipped:
        print(f"{id:<5} not priced: {why}")
    misses = [p.run.id for p in predictions if not p.fits]
    print(f"memory model: {len(misses)} of {len(predictions)} published layouts predicted not to fit: "
          + " ".join(misses))
    print(subset_table(predictions, "fitted on all of them (steptime.FIT)"))
    if cv:
        held, fits = cross_validate(runs)
        for source, fit in fits.items():
            print(f"  without {source:<4}" + " ".join(f"{k}={v:.3g}" for k, v in fit.items()))
        print(subset_table(held, "each source predicted by constants fitted on the others"))


# -----------------------------------------------------------------------------
# calibration: this machine's matmul, memory and collective speeds, as a hardware profile (plan.py --calibrate)

def _calibrate_rank(rank, port, queue):
    import torch, torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as torchrun runs each process (OMP_NUM_THREADS=1)
    dist.init_process_group("gloo", rank=rank, world_size=2)

    def timed(fn, reps):  # median seconds of fn, both processes running it at once, as in training
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[reps // 2]

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    matmul = 2 * 1024 ** 3 / timed(lambda: a @ b, 15)
    x, y = torch.randn(2 ** 23), torch.empty(2 ** 23)  # 32 MB each
    copy = 2 * x.numel() * 4 / timed(lambda: y.copy_(x), 15)
    one = torch.ones(1)
    kernel = timed(lambda: [one.add(one) for _ in range(1000)], 9) / 1000
    small, large = torch.ones(16), torch.ones(2 ** 22)  # 64 B and 16 MB
    latency = timed(lambda: dist.all_reduce(small), 21)
    bus = large.numel() * 4 / (timed(lambda: dist.all_reduce(large), 9) - latency)  # 2(n-1)/n = 1 for n = 2
    if rank == 0:
        queue.put(dict(matmul=matmul, copy=copy, kernel=kernel, latency=latency, bus=bus))
    dist.destroy_process_group()


def calibrate(out):
    """Measure this CPU with 2 processes (gloo, one thread each, as torchrun runs train.py) and write
    a hardware profile to out. Peaks are the measured speeds divided by the efficiencies the cost
    model applies, so that the model reproduces what was measured for a large GEMM, a large copy
    and a large all-reduce."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_calibrate_rank, args=(port, queue), nprocs=2)
    m = queue.get()
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    profile = dict(flops={"fp32": m["matmul"] / steptime.FIT["gemm_eff"]}, hbm_gb=ram_gb / 2,
                   hbm_bw=m["copy"] / steptime.FIT["mem_eff"],
                   nvlink_bw=m["bus"] / steptime.FIT["net_eff"], net_bw=m["bus"] / steptime.FIT["net_eff"],
                   gpus_per_node=2,
                   sms=1, kernel_s=m["kernel"], latency_s=m["latency"], host_s=0.0, measured=m)  # the CPU is the host
    with open(out, "w") as f:
        json.dump(profile, f, indent=2)
    return profile
