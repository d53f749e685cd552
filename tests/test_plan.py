"""
tests/test_plan.py: the parallelism planner (plan.py): its counts, memory model, search and CLI.
Run: python -m pytest -q tests/test_plan.py        (about a minute on an idle 2-core CPU)

Covers: FLOPs per token and per layer against hand-computed values, model.py's parameter counts
from the config against its modules' weights; the memory model against PyTorch's measured peak
of small CPU training steps; collective times, a step's
tensor- and data-parallel communication and the memory by ZeRO stage against hand calculations
from the ring and ZeRO formulas, the all-to-all by placement; pruning never loses the best layouts
of a small exhaustive case; --emit's layouts (what train.py runs) and their train.py flags; the
command line, good and bad. The published runs are tests/test_planfit.py's.
"""
import itertools, json, math, os, tempfile, warnings

import pytest
import torch

import plan
import steptime
from hardware import CLUSTER_GPUS, find_gpu, peaks
from helpers import run_script
from mamba import ssd_flops
from model import Nemotron, NemotronConfig, flops_per_token, layer_params, mtp_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=10, d_model=8, n_head=2, n_kv_head=1, head_dim=4, d_ff=16, mamba_heads=2, mamba_head_dim=4,
            d_state=4, mamba_groups=1, d_conv=4, chunk_size=4, n_experts=4, top_k=2, moe_d_ff=6, shared_d_ff=12)


def meta_model(**kw):
    with torch.device("meta"):
        return Nemotron(NemotronConfig(**kw))


# -----------------------------------------------------------------------------
# counts


def test_flops_per_token_by_hand():
    """d=8, one attention block (2 heads of 4, 1 KV head) and one MLP (16 wide), vocab 10, T=6."""
    cfg = NemotronConfig(**dict(TINY, pattern="*-"))
    attention_weights = 8 + 8 * 2 * 4 + 2 * 8 * 1 * 4 + 2 * 4 * 8  # norm, q, k and v, o
    mlp_weights = 8 + 2 * 8 * 16  # norm, up, down
    head = 8 + 10 * 8  # final norm, LM head (the embedding is a lookup)
    scores = 2 * 2 * 2 * 4 * 6 / 2  # QK^T and AV: 2 FLOPs x 2 matmuls x heads x head_dim x T, causal half
    assert flops_per_token(cfg, 6) == 6 * (attention_weights + mlp_weights + head) + 3 * scores
    mamba = NemotronConfig(**dict(TINY, pattern="M"))
    d_in, conv = 2 * 4, 2 * 4 + 2 * 4
    # norm, in_proj, conv, dt/A/D, gated norm, out_proj
    weights = 8 + 8 * (2 * d_in + 2 * 4 + 2) + conv * 5 + 3 * 2 + d_in + d_in * 8
    ssd = 2 * 2 * (4 * 4 / 2 + 4 * 4 / 2 + 2 * 4 * 4)  # per head: C B^T and its product with x (causal half), states
    assert ssd == ssd_flops(2, 4, 4, 4)
    assert flops_per_token(mamba, 6) == 6 * (weights + head) + 3 * ssd


def test_mamba_saved_activations_by_hand():
    """A Mamba block's activations saved for the backward, per token at 2 bytes (TINY: d 8, 2 heads of
    4, N 4, 1 group, chunks of 4, so d_in 8, in_proj's output 2 d_in + 2 G N + H = 26, the conv's
    width 16). As mamba.py runs (Triton SSD or not): the pre-norm's input and output 2 d, in_proj's
    output, the conv's output, y and the gated norm's output 2 d_in, fp32 dt (4 H bytes) and chunk
    states (4 H P N / Q bytes). Megatron-Core's fused mamba_split_conv1d_scan_combined, then its norm
    and out_proj: 2 d, in_proj's output, the norm's input and output 2 d_in and its fp32 1/rms (4 G)."""
    cfg, seq = NemotronConfig(**dict(TINY, pattern="M")), 8
    for fused, per_token in ((False, 2 * (2 * 8 + 26 + 16 + 2 * 8) + 4 * 2 + 4 * 2 * 4 * 4 / 4),
                             (True, 2 * (2 * 8 + 26 + 2 * 8) + 4 * 1)):
        job = steptime.Job(cfg, seq, 1, 1, steptime.load_hardware("h100"), mamba_fused=fused)
        assert steptime.block_work(job, "M", 1, 1, 1, 1, False).saved == pytest.approx(per_token * seq, rel=1e-12)


def test_layer_flops_by_hand():
    """The cost model's GEMMs (layer_cost's forward FLOPs) for b=1, s=6: 2 per weight per token,
    split by tp; flash attention over the causal half; MoE counts only the top-k experts."""
    hw = dict(steptime.load_hardware("h100"))
    cfg = NemotronConfig(**dict(TINY, pattern="*-E"))
    job = steptime.Job(cfg, 6, 4, 8, hw)
    assert steptime.layer_cost(job, "-", 1, 1, 1, 1, False).flops == 2 * 6 * (2 * 8 * 16)
    assert steptime.layer_cost(job, "-", 1, 2, 1, 1, True).flops == 2 * 6 * (2 * 8 * 16) / 2
    projections = 2 * 6 * (8 * 8 + 2 * 8 * 4 + 8 * 8)
    assert steptime.layer_cost(job, "*", 1, 1, 1, 1, False).flops == projections + 4 * 2 * 6 * 6 * 4 / 2
    router, experts, shared = 2 * 6 * 8 * 4, 2 * 6 * 2 * (2 * 8 * 6), 2 * 6 * 2 * 8 * 12
    assert steptime.layer_cost(job, "E", 1, 1, 1, 1, False).flops == router + experts + shared
    assert steptime.layer_cost(job, "E", 1, 1, 1, 4, False).flops == router + experts + shared  # ep moves, not removes


def test_mla_by_hand():
    """Multi-head latent attention priced with DeepSeek-V3's shapes (its config.json: 128 heads, q and
    kv latents 1536 and 512, scores 128 + 64 rotary wide, values 128): 187.1M weights a layer; the
    forward of s=6 tokens: 2 FLOPs a weight a token (the down-projections whole under tp = 2), and
    flash attention's scores and values 192 and 128 wide; Job.flops counts the same per token (and
    its norms, as flops_per_token does)."""
    hw = dict(steptime.load_hardware("h100"))
    cfg = plan.transformer(2, 7168, 128, 18432, 1000)
    job, mla = steptime.Job(cfg, 6, 4, 8, hw, mla=steptime.MLA()), steptime.MLA()
    weights = 7168 * 1536 + 1536 * 128 * 192 + 7168 * (512 + 64) + 512 * 128 * (128 + 128) + 128 * 128 * 7168
    assert mla.params(128, 7168) == weights + 1536 + 512 and round(weights / 1e5) == 1871
    assert job.params["*"].dense == 7168 + weights + 1536 + 512
    scores = 2 * 128 * 6 * 6 * (192 + 128) / 2
    assert steptime.layer_cost(job, "*", 1, 1, 1, 1, False).flops == 2 * 6 * weights + scores
    down = 7168 * 1536 + 7168 * 576  # replicated on both tp ranks
    assert steptime.layer_cost(job, "*", 1, 2, 1, 1, True).flops == 2 * 6 * (down + (weights - down) / 2) + scores / 2
    gqa = steptime.Job(cfg, 6, 4, 8, hw)
    per_token = lambda j: sum(3 * steptime.layer_cost(j, k, 1, 1, 1, 1, False).flops / 6 for k in "*-")
    norms = 6 * (1536 + 512)  # flops_per_token's 6 a weight counts the latents' norms too
    assert job.flops - gqa.flops == 2 * (per_token(job) - per_token(gqa) + norms)  # two layers


def test_head_dim_apart_from_hidden():
    """Qwen3's heads are 128 wide at hidden 2048 with 32 of them: the q, k, v and o projections and the
    scores follow head_dim, and plan.py takes --head_dim (without it, hidden must divide by heads)."""
    cfg = plan.transformer(1, 2048, 32, 768, 1000, kv_heads=4, head_dim=128)
    assert cfg.head_dim == 128 and plan.transformer(1, 2048, 32, 768, 1000).head_dim == 64
    job = steptime.Job(cfg, 6, 4, 8, dict(steptime.load_hardware("h100")))
    projections = 2 * 6 * (2048 * (32 + 2 * 4) * 128 + 32 * 128 * 2048)
    assert steptime.layer_cost(job, "*", 1, 1, 1, 1, False).flops == projections + 2 * 32 * 6 * 6 * 2 * 128 / 2
    flags = ["--layers=2", "--hidden=100", "--heads=3", "--ffn=64", "--vocab=64", "--gbs=8", "--seq_len=64"]
    assert plan.make_job(plan.parse_flags(flags + ["--head_dim=32"]))[0].cfg.head_dim == 32
    with pytest.raises(ValueError, match="--head_dim"):
        plan.make_job(plan.parse_flags(flags))


def test_find_gpu_reads_device_names():
    """hardware.find_gpu: CUDA's device names and the published runs' GPU column, each to its own
    row of the table (GB200 is no B200, A100 no A10, L40S no L4); an unknown GPU has no peaks."""
    names = {"NVIDIA H100 80GB HBM3": "h100", "NVIDIA A100-SXM4-80GB": "a100", "NVIDIA A10": "a10",
             "NVIDIA GB200": "gb200", "NVIDIA B200": "b200", "NVIDIA L40S": "l40s", "NVIDIA L4": "l4",
             "NVIDIA GeForce RTX 4090": "rtx4090", "H800 SXM": "h800", "Tesla T4": None,
             "GB300 (NVL72)": "gb300", "NVIDIA B300 SXM6 AC": "b300", "A800-SXM4-80GB": "a800"}
    assert {n: find_gpu(n) for n in names} == names
    assert peaks("NVIDIA H200") == (989e12, 4.8e12) and peaks("Tesla T4") == (None, None)
    assert "l4" not in CLUSTER_GPUS and {"h800", "a800", "b300", "gb300"} <= set(CLUSTER_GPUS)


@pytest.mark.parametrize("kw", [dict(pattern="M*-E"), dict(pattern="M*E-E", moe_latent_size=4),
                                dict(pattern="*-*E", tie_embeddings=True), dict(pattern="M*-E", mtp_depth=2),
                                dict(pattern="M*-E", mtp_depth=3, mtp_share=True, mtp_pattern="*-E")])
def test_counts_agree_with_model(kw):
    """model.py's counts from the config (layer_params, mtp_params: what flops_per_token and this
    planner use) against the modules' own weights: per block, per MTP depth, active parameters
    (num_params(active=True): the top_k experts), and a pipeline stage's parameters in all."""
    model, cfg = meta_model(**dict(TINY, **kw)), NemotronConfig(**dict(TINY, **kw))
    for block in model.backbone.layers:
        p = layer_params(cfg, block.kind)
        assert p.dense + p.experts == sum(w.numel() for w in block.parameters()), block.kind
    active = sum(layer_params(cfg, k).dense + layer_params(cfg, k).active for k in cfg.pattern)
    active += cfg.d_model + cfg.vocab_size * cfg.d_model  # final norm, LM head
    if cfg.mtp_depth:
        p = mtp_params(cfg)
        assert p.dense + p.experts == sum(w.numel() for w in model.mtp[0].parameters())
        active += len(model.mtp) * (p.dense + p.active)  # num_params counts each set of weights once
    assert active == model.num_params(active=True)
    job = steptime.Job(cfg, 8, 1, 1, steptime.load_hardware("h100"))
    dense, experts = steptime.stage_params(job, 0, steptime.stage_groups(job, 1, 1)[0].counts, 1)
    assert dense + experts == sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# memory: the model against PyTorch's own account of a training step on this CPU


def measured_peak(cfg, B, T):
    """Peak bytes of live tensors in one AdamW training step (the second: Adam's states exist),
    from PyTorch's profiler memory timeline of the CPU allocator: weights, gradients, optimizer
    states, activations and temporaries, as PyTorch allocated them."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    model = Nemotron(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = (torch.randint(0, cfg.vocab_size, (B, T)) for _ in range(2))

    def step():
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the timeline export is marked deprecated in favour of CUDA-only tools
        prof.export_memory_timeline(os.path.join(d, "t.json"), device="cpu")
        with open(os.path.join(d, "t.json")) as f:
            _, sizes = json.load(f)
    return max(sum(s) for s in sizes)


@pytest.mark.parametrize("pattern", ["*-*-", "*E*E", "M*-E"])
def test_memory_model_against_measured_peak(pattern):
    """Within 30% of the measured peak for dense, MoE and hybrid stacks. (A pure Mamba stack on
    this CPU runs mamba.ssd_ref, which keeps (Q x Q) decay matrices the fused kernels recompute:
    the model, which follows the kernels, reads 0.62x its peak; see docs/planner.md.)"""
    cfg = NemotronConfig(vocab_size=256, d_model=128, pattern=pattern, n_head=4, n_kv_head=2, head_dim=32, d_ff=512,
                         mamba_heads=8, mamba_head_dim=32, d_state=32, chunk_size=32, n_experts=8, top_k=2,
                         moe_d_ff=256, shared_d_ff=256)
    hw = dict(steptime.load_hardware("a100"), flops={"fp32": 1e11})
    job = steptime.Job(cfg, 256, 8, 1, hw, "fp32")
    predicted = steptime.evaluate(job, steptime.Layout(mbs=8))["memory_gib_per_gpu"] * 2**30
    measured = measured_peak(cfg, 8, 256)
    assert abs(predicted / measured - 1) < 0.3, (predicted / 2**20, measured / 2**20)


# -----------------------------------------------------------------------------
# communication and ZeRO memory: hand calculations from the ring and ZeRO formulas

# a dense Transformer layer small enough to count by hand: d=16, 4 heads of 4 (4 KV heads), MLP 64
# wide, vocab 100, untied. Parameters: attention 16 + 4 * 16 * 16 = 1040 (norm; q, k, v, o), MLP
# 16 + 2 * 16 * 64 = 2064 (norm; up, down), final norm 16, embedding and LM head 2 * 100 * 16 = 3200
DENSE = NemotronConfig(vocab_size=100, d_model=16, pattern="*-", n_head=4, n_kv_head=4, head_dim=4, d_ff=64)
DENSE_PARAMS, DENSE_MLP = 1040 + 2064 + 16 + 3200, 2064  # 6320; the largest block's


def ideal_gpu(bus_intra, bus_inter, latency):
    """A GPU whose compute takes no time (1e30 FLOP/s and B/s, no kernel cost), so nothing hides a
    collective and a step's communication terms are the collectives' times alone; its collectives
    run at bus bandwidths bus_intra inside a node of 8 and bus_inter per GPU across nodes (B/s,
    after steptime.FIT's net_eff), with this latency (s); launching kernels takes the host no time."""
    net_eff = steptime.FIT["net_eff"]
    return dict(steptime.FIT, name="ideal", flops={p: 1e30 for p in ("bf16", "fp16", "fp8", "fp4", "fp32")}, hbm_gb=80,
                hbm_bw=1e30, sms=1, nvlink_bw=bus_intra / net_eff, net_bw=bus_inter / net_eff,
                gpus_per_node=8, kernel_s=0.0, latency_s=latency, host_s=0.0)


def test_collective_times_by_hand():
    """steptime.comm_time against the ring algorithms' volumes (Patarasuk & Yuan 2009; NCCL's bus
    bandwidth convention): of an n-byte buffer over p ranks, each rank sends 2(p-1)/p n in an
    all-reduce, (p-1)/p n in an all-gather or a reduce-scatter, n in a point-to-point; time =
    latency + bytes / bus bandwidth. 1 GB at 100 GB/s inside a node, 25 GB/s per GPU across; a group
    spanning nodes with `local` members in each gets local x 25 GB/s (NCCL runs a ring per network
    link), at most NVLink's 100. 10 us latency. Exact up to float rounding (rel 1e-9)."""
    hw, GB = ideal_gpu(100e9, 25e9, 10e-6), 1e9
    for op, p, local, seconds in [
            ("all_reduce", 2, 2, 0.01001),        # 10 us + 2 * 1/2 * 1 GB / 100 GB/s = 10 us + 10 ms
            ("all_reduce", 8, 8, 0.01751),        # 10 us + 2 * 7/8 * 1 GB / 100 GB/s = 10 us + 17.5 ms
            ("all_reduce", 16, 1, 0.07501),       # one a node: 10 us + 2 * 15/16 * 1 GB / 25 GB/s = 10 us + 75 ms
            ("all_reduce", 16, 2, 0.037510),      # two a node: 50 GB/s
            ("all_reduce", 16, 8, 0.018760),      # eight a node: min(8 x 25, 100) = 100 GB/s
            ("all_gather", 8, 8, 0.00876),        # 10 us + 7/8 * 1 GB / 100 GB/s = 10 us + 8.75 ms
            ("reduce_scatter", 8, 8, 0.00876),
            ("reduce_scatter", 16, 1, 0.03751),   # 10 us + 15/16 * 1 GB / 25 GB/s = 10 us + 37.5 ms
            ("p2p", 2, 1, 0.04001)]:              # 10 us + 1 GB / 25 GB/s = 10 us + 40 ms
        assert steptime.comm_time(hw, op, GB, p, local) == pytest.approx(seconds, rel=1e-9), (op, p, local)
    # a ring all-reduce is a reduce-scatter then an all-gather, one latency fewer; one rank or no bytes: free
    for p, local in ((2, 2), (8, 8), (16, 1)):
        both = (steptime.comm_time(hw, "reduce_scatter", GB, p, local)
                + steptime.comm_time(hw, "all_gather", GB, p, local))
        assert steptime.comm_time(hw, "all_reduce", GB, p, local) == pytest.approx(both - 10e-6, rel=1e-12)
    assert steptime.comm_time(hw, "all_reduce", GB, 1, 1) == steptime.comm_time(hw, "all_reduce", 0, 8, 8) == 0
    domains = [steptime.in_domain(hw, n, stride) for n, stride in ((4, 1), (16, 1), (16, 2), (16, 8), (16, 16))]
    assert domains == [4, 8, 4, 1, 1]


def test_all_to_all_by_placement():
    """steptime.all_to_all_time: a GPU sends (n-1)/n of its n bytes to its n-1 peers; those in its NVLink
    domain (8 / stride of them, itself included) over NVLink, the rest over its network link at the
    same time, so the slower part sets the time. 1 GB, 100 GB/s NVLink, 25 GB/s network, 10 us."""
    hw, GB = ideal_gpu(100e9, 25e9, 10e-6), 1e9
    for n, stride, seconds in [
            (8, 1, 0.00876),    # all 8 in the node: 10 us + 7/8 GB / 100 GB/s
            (16, 1, 0.02001),   # 8 a node: max(7/16 GB / 100, 8/16 GB / 25 GB/s) = 20 ms
            (8, 2, 0.02001),    # stride 2 (tp = 2): 4 a node, max(3/8 GB / 100, 4/8 GB / 25) = 20 ms
            (64, 8, 0.03939),   # one a node: 63/64 GB / 25 GB/s = 39.375 ms
            (1, 1, 0.0)]:
        assert steptime.all_to_all_time(hw, GB, n, stride) == pytest.approx(seconds, rel=1e-3), (n, stride)


@pytest.mark.parametrize("tp, recompute, sp, seconds", [
    (2, "none", False, 0.048768),  # (1 ms + 2 * 1/2 * 2048 B / 1 MB/s) x 2 micro-batches x 2 passes x 4 = 3.048 ms x 16
    (4, "none", True, 0.065152),   # (1 ms + 2 * 3/4 * 2048 B / 1 MB/s) x 16 = 4.072 ms x 16
    (2, "full", False, 0.073152),  # 3.048 ms x 2 micro-batches x 3 passes x 4
])
def test_tensor_parallel_all_reduce_by_hand(tp, recompute, sp, seconds):
    """The step's tp_comm against Megatron's count (Shoeybi et al. 2019; Korthikanti et al. 2022 for
    sp): per micro-batch and pass (forward, backward, and under full recompute the forward again),
    one all-reduce of the b x s x d activations, 1 x 64 x 16 x 2 B = 2048 B in bf16, after each
    block (attention, MLP) and for the vocab-parallel embedding and LM head (steptime.layer_cost's
    convention): 4 per pass; with sp an all-gather and a reduce-scatter of the same bytes, the same
    time. Ideal GPU, 1 MB/s bus bandwidth, 1 ms latency, 2 micro-batches: exact (rel 1e-9)."""
    job = steptime.Job(DENSE, 64, 2, tp, ideal_gpu(1e6, 0.25e6, 1e-3))
    breakdown = steptime.evaluate(job, steptime.Layout(tp=tp, mbs=1, recompute=recompute, sp=sp))["breakdown"]
    assert breakdown["tp_comm"] == pytest.approx(seconds, rel=1e-9)


@pytest.mark.parametrize("dp, zero, dp_comm, fsdp_comm", [
    # DDP: an all-reduce of the fp32 gradients, 6320 x 4 B = 25280 B, after the last micro-batch
    (2, 0, 0.02628, 0),   # 1 ms + 2 * 1/2 * 25280 B / 1 MB/s = 1 ms + 25.28 ms
    (8, 0, 0.04524, 0),   # 1 ms + 2 * 7/8 * 25280 B / 1 MB/s = 1 ms + 44.24 ms
    # across two nodes, 8 of the 16 in each: 8 x 0.1 MB/s = 0.8 MB/s of bus bandwidth
    (16, 0, 0.06025, 0),  # 1 ms + 2 * 15/16 * 25280 B / 0.8 MB/s = 1 ms + 59.25 ms
    # ZeRO-1: a reduce-scatter of the gradients, an all-gather of the bf16 weights (6320 x 2 B = 12640 B)
    (8, 1, 0.03518, 0),   # (1 ms + 7/8 * 25280 B / 1 MB/s) + (1 ms + 7/8 * 12640 B / 1 MB/s) = 23.12 + 12.06 ms
    (16, 1, 0.0464375, 0),  # (1 ms + 15/16 * 25280 / 0.8e6) + (1 ms + 15/16 * 12640 / 0.8e6) = 30.625 + 15.8125 ms
    # ZeRO-2: the reduce-scatter after every micro-batch (16 / dp of them), one all-gather
    (2, 2, 0.11644, 0),   # 8 x (1 ms + 1/2 * 25280 / 1e6) + (1 ms + 1/2 * 12640 / 1e6) = 8 x 13.64 + 7.32 ms
    (8, 2, 0.0583, 0),    # 2 x 23.12 ms + 12.06 ms
    # ZeRO-3: per micro-batch the weights gathered for the forward and the backward, the gradients
    # reduce-scattered, tensor by tensor: each collective + 4 tensors x 2 blocks x (dp - 1) hops x 1 ms
    (8, 3, 0, 0.43048),   # 2 micro-batches x (2 x (12.06 + 56) ms + (23.12 + 56) ms)
    (16, 3, 0, 0.42225),  # 1 x (2 x (15.8125 + 120) ms + (30.625 + 120) ms)
])
def test_data_parallel_sync_by_hand(dp, zero, dp_comm, fsdp_comm):
    """The step's dp_comm and fsdp_comm against ZeRO's communication (Rajbhandari et al. 2020,
    Sec. 7: DDP and stages 1-2 move 2 buffers' worth, stage 3 three) with the ring volumes of
    test_collective_times_by_hand, for DENSE (6320 parameters) in bf16 (gradients reduced in fp32,
    4 B; weights gathered in bf16, 2 B), a global batch of 16 sequences of 1 token. Ideal GPU (no
    compute window hides anything), 1 MB/s bus bandwidth in a node of 8, 0.1 MB/s per GPU across,
    1 ms latency: exact (rel 1e-9)."""
    job = steptime.Job(DENSE, 1, 16, dp, ideal_gpu(1e6, 0.1e6, 1e-3))
    breakdown = steptime.evaluate(job, steptime.Layout(dp=dp, mbs=1, zero=zero))["breakdown"]
    assert breakdown["dp_comm"] == pytest.approx(dp_comm, rel=1e-9, abs=1e-20)
    assert breakdown["fsdp_comm"] == pytest.approx(fsdp_comm, rel=1e-9, abs=1e-20)


@pytest.mark.parametrize("dp, fsdp_comm", [
    # the ceiling 0.1 MB/s of bus bandwidth, under the ring's 1 MB/s: every gather 7/8 x 12640 B / 0.1 MB/s
    # = 110.6 ms, every scatter 7/8 x 25280 B / 0.1 MB/s = 221.2 ms, their latency inside the ceiling
    (8, 0.8848),    # 2 micro-batches x (2 x 110.6 + 221.2) ms
    # across two nodes: 15/16 x 12640 / 0.1e6 = 118.5 ms under the ring's 135.8125 ms (15.8125 + 120): that
    # stays; 15/16 x 25280 / 0.1e6 = 237 ms over its 150.625 ms
    (16, 0.508625),  # 1 x (2 x 135.8125 + 237) ms
])
def test_zero3_framework_ceiling_by_hand(dp, fsdp_comm):
    """Job.zero3_bw (DeepSpeed's ZeRO-3 of 2021, steptime.DEEPSPEED_2021_ZERO3_BW): each ZeRO-3 gather and
    scatter takes its bytes' ring share over the ceiling where that is slower than the network's ring
    (test_data_parallel_sync_by_hand's cases at zero 3). Exact (rel 1e-9)."""
    job = steptime.Job(DENSE, 1, 16, dp, ideal_gpu(1e6, 0.1e6, 1e-3), zero3_bw=0.1e6)
    breakdown = steptime.evaluate(job, steptime.Layout(dp=dp, mbs=1, zero=3))["breakdown"]
    assert breakdown["fsdp_comm"] == pytest.approx(fsdp_comm, rel=1e-9)
    assert steptime.DEEPSPEED_2021_ZERO3_BW == pytest.approx(21.8e9, rel=0.01)  # 7/8 x 10.2 GB in 0.41 s


def test_zero_memory_by_hand():
    """steptime.memory's weights, gradients and optimizer states against ZeRO (Rajbhandari et al. 2020,
    Sec. 5, Fig. 1) for DENSE's 6320 parameters in bf16, with steptime.py's bytes per parameter: 2 B
    weights, 4 B gradients (reduced in fp32), 12 B Adam states (fp32 master, m, v); 18 B in all.
    Stage 1 divides the optimizer states by N_d, stage 2 also the gradients, stage 3 also the
    weights. steptime.memory adds, from stage 2 (3), the whole gradient (weight) of the block at work, before
    its reduce-scatter (after its gather): the largest block's, the MLP's 2064 parameters x 4 B
    (+ x 2 B). Sequences of one token, pp = 1 (one micro-batch in flight whatever dp): the
    activations are the same in every layout, read once at dp = 1 ZeRO-0 and bounded by 2% of the
    states (one token's: 1856 B, 1.6%); the rest is exact (rel 1e-12: float rounding)."""
    job = steptime.Job(DENSE, 1, 16, 8, ideal_gpu(1e6, 1e6, 1e-3))
    acts = steptime.memory(job, steptime.Layout()) - 18 * DENSE_PARAMS
    assert 0 < acts < 0.02 * 18 * DENSE_PARAMS, acts
    expected = {  # (dp, ZeRO stage): bytes of weights + gradients + optimizer states (+ the block at work)
        (1, 0): 113760, (1, 1): 113760,   # 18 x 6320; nothing to shard over one rank
        (1, 2): 122016, (1, 3): 126144,   # 113760 + 4 x 2064; + 6 x 2064
        (2, 0): 113760,
        (2, 1): 75840,                    # 6 x 6320 + 12 x 6320 / 2 = 37920 + 37920
        (2, 2): 71456,                    # 2 x 6320 + 16 x 6320 / 2 + 4 x 2064 = 12640 + 50560 + 8256
        (2, 3): 69264,                    # 18 x 6320 / 2 + 6 x 2064 = 56880 + 12384
        (8, 0): 113760,
        (8, 1): 47400,                    # 37920 + 12 x 6320 / 8 = 37920 + 9480
        (8, 2): 33536,                    # 12640 + 16 x 6320 / 8 + 8256 = 12640 + 12640 + 8256
        (8, 3): 26604,                    # 18 x 6320 / 8 + 12384 = 14220 + 12384
    }
    for (dp, zero), states in expected.items():
        memory = steptime.memory(job, steptime.Layout(dp=dp, zero=zero))
        assert memory == pytest.approx(states + acts, rel=1e-12), (dp, zero)


# DENSE twice over: four blocks. Per token of a bf16 micro-batch (tp 1), steptime.block_work saves in
# the attention block the norm's input and output (2 x 16 x 2 B), q, k, v (12 x 4 x 2 B), the output
# for o_proj (16 x 2 B) and the fp32 softmax statistics (4 heads x 4 B): 208 B; in the MLP the norm's
# two (64 B) and the activation's input and output (2 x 64 x 2 B): 320 B. Of these the linear layers'
# inputs are the norm's output and o_proj's input (64 B), the norm's output and fc2's input (160 B).
DENSE4 = NemotronConfig(vocab_size=100, d_model=16, pattern="*-*-", n_head=4, n_kv_head=4, head_dim=4, d_ff=64)


def test_offloaded_activations_by_hand():
    """Activation offloading (Megatron-Core's cpu_offloading_num_layers) of k of DENSE4's blocks:
    k times the average block's activations, (208 + 320) / 2 = 264 B a token, go to the host under
    the forward and come back under the backward. The GPU keeps one of them in flight, so its peak
    falls by (k - 1) x 264 B a token; on a GPU whose compute takes no time nothing hides the copies:
    2 per micro-batch at the host link's rate. 64 tokens, 2 micro-batches: exact (rel 1e-9)."""
    hw = dict(ideal_gpu(1e6, 1e6, 1e-3), host_bw=1e6)
    job = steptime.Job(DENSE4, 64, 2, 1, hw)
    base = steptime.memory(job, steptime.Layout(mbs=1))
    for k in (1, 2, 3):
        L = steptime.Layout(mbs=1, offload=k)
        assert steptime.offloaded(job, L) == pytest.approx(k * 264 * 64, rel=1e-12)
        assert steptime.memory(job, L) == pytest.approx(base - (k - 1) * 264 * 64, rel=1e-12), k
        seconds = 2 * 2 * k * 264 * 64 / (1e6 * hw["net_eff"])
        assert steptime.evaluate(job, L)["breakdown"]["offload"] == pytest.approx(seconds, rel=1e-9), k


def test_offload_rules_and_search():
    """Megatron-Core offloads activations with pp 1 and no recompute only, fewer blocks than the
    model has, and the planner needs the host link's figure. Where nothing fits without recompute
    (Llama-3 70B at micro-batch 2, FSDP, one GB200), the search offloads the fewest blocks that fit."""
    job = steptime.Job(DENSE4, 64, 8, 2, dict(ideal_gpu(1e6, 1e6, 1e-3), host_bw=1e6))
    assert "pp 1 and no recompute" in plan.broken_rule(job, steptime.Layout(pp=2, offload=1))
    assert "pp 1 and no recompute" in plan.broken_rule(job, steptime.Layout(dp=2, recompute="full", offload=1))
    assert "less one" in plan.broken_rule(job, steptime.Layout(dp=2, offload=4))
    assert plan.broken_rule(job, steptime.Layout(dp=2, offload=3)) is None
    job.hw.pop("host_bw")
    assert "host_bw" in plan.broken_rule(job, steptime.Layout(dp=2, offload=3))
    cfg, seq = plan.PRESETS["llama3-70b"]
    job = steptime.Job(cfg, seq, 256, 64, steptime.load_hardware("gb200"), "fp8")
    fixed = dict(tp=1, pp=1, cp=1, mbs=2, zero=3, recompute="none")
    results, _, _ = plan.search(job, fixed, top=3)
    best = results[0]["layout"]
    cap = steptime.HBM_USABLE * job.hw["hbm_gb"] * 1e9
    assert best.offload > 1 and steptime.memory(job, best) <= cap
    fewer = [steptime.Layout(**dict(vars(best), offload=k)) for k in (0, best.offload - 1)]
    assert all(steptime.memory(job, L) > cap for L in fewer)


def test_low_precision_activations_and_gathers():
    """Under fp8 Transformer Engine keeps a linear layer's input as its 1-byte copy: DENSE4's
    attention block saves 64 / 2 B a token less, its MLP 160 / 2 B. With Megatron's fp8_param_gather
    ZeRO gathers 1-byte weights: ZeRO-1 on 8 GPUs of test_data_parallel_sync_by_hand's ideal GPU,
    DENSE's reduce-scatter of 4-byte gradients, 23.12 ms, and the all-gather of 6320 x 1 B,
    1 ms + 7/8 x 6320 B / 1 MB/s = 6.53 ms (12.06 ms at 2 B)."""
    hw = ideal_gpu(1e6, 0.1e6, 1e-3)
    bf16, fp8 = (steptime.Job(DENSE4, 64, 2, 1, hw, p) for p in ("bf16", "fp8"))
    for kind, saved in (("*", 32 * 64), ("-", 80 * 64)):
        act = [steptime.layer_cost(job, kind, 1, 1, 1, 1, False).act for job in (bf16, fp8)]
        drop = act[0] - act[1]
        assert drop == pytest.approx(saved, rel=1e-12), kind
    for gather, seconds in ((False, 0.03518), (True, 0.02965)):
        job = steptime.Job(DENSE, 1, 16, 8, hw, "fp8", fp8_gather=gather)
        dp = steptime.evaluate(job, steptime.Layout(dp=8, mbs=1, zero=1))["breakdown"]["dp_comm"]
        assert dp == pytest.approx(seconds, rel=1e-9), gather


@pytest.mark.parametrize("precision, fp8_gather, w, g, opt", [
    ("fp16", False, 2, 2, 12),  # ZeRO's own mixed precision: 2 + 2 + K = 12 (the paper's 16 B per parameter)
    ("fp32", False, 4, 4, 8),   # no master copy: Adam's m and v
    ("fp8", False, 3, 4, 12),   # a bf16 weight and its fp8 copy; gradients and states as bf16's
    ("fp8", True, 2, 4, 12),    # fp8 primary weights (Megatron's fp8_param_gather): the fp8 data and its transpose
    ("mxfp8", True, 2 + 2 / 32, 4, 12),  # both orientations of MXFP8, a scale per 32
])
def test_zero_memory_other_precisions(precision, fp8_gather, w, g, opt):
    """test_zero_memory_by_hand at dp = 8 in steptime.py's other precisions (its PRECISION table's bytes
    per parameter, written out here): (w + g + opt) P whole, then opt, g and w divided by 8 stage by
    stage, plus the block at work. Activations as there, bounded by 5% (fp32's 4 B ones: 3.7%);
    the rest exact."""
    P, mlp = DENSE_PARAMS, DENSE_MLP
    job = steptime.Job(DENSE, 1, 16, 8, ideal_gpu(1e6, 1e6, 1e-3), precision, fp8_gather=fp8_gather)
    acts = steptime.memory(job, steptime.Layout()) - (w + g + opt) * P
    assert 0 < acts < 0.05 * (w + g + opt) * P, acts
    for zero, states in ((0, (w + g + opt) * P), (1, (w + g) * P + opt * P / 8),
                         (2, w * P + (g + opt) * P / 8 + g * mlp), (3, (w + g + opt) * P / 8 + (g + w) * mlp)):
        assert steptime.memory(job, steptime.Layout(dp=8, zero=zero)) == pytest.approx(states + acts, rel=1e-12), zero


# -----------------------------------------------------------------------------
# the search


def exhaustive(job):
    """Every layout the rules allow, evaluated: the fitting ones, fastest first."""
    n_layers, out = len(job.cfg.pattern), []
    for tp, cp, pp, ep, vp, mbs, recompute, sp, zero in itertools.product(
            plan.powers_of_two(job.gpus), plan.powers_of_two(job.gpus), range(1, n_layers + 1),
            range(1, job.cfg.n_experts + 1), range(1, n_layers + 1), range(1, job.gbs + 1),
            ("none", "selective", "full"), (False, True), range(4)):
        if job.gpus % (tp * cp * pp):
            continue
        L = steptime.Layout(tp, pp, job.gpus // (tp * cp * pp), cp, ep, vp, mbs, recompute, sp, zero)
        if plan.broken_rule(job, L) is None:
            r = steptime.evaluate(job, L)
            if r["fits"]:
                out.append(r)
    return sorted(out, key=lambda r: r["step_time_s"])


@pytest.mark.parametrize("pattern, attention, hbm", [("*-*-*-*-", "materialized", 0.4), ("M*-EM-ME", "flash", 0.5)])
def test_pruning_keeps_the_best(pattern, attention, hbm):
    """On 8 GPUs (4 per node, memory tight enough that many layouts fail), the pruned search finds
    the fastest of all layouts the rules allow, with and without dimensions fixed; what it ranks
    below is in the exhaustive list too (minus layouts it proves dominated)."""
    cfg = NemotronConfig(vocab_size=32000, d_model=1024, pattern=pattern, n_head=8, n_kv_head=4, head_dim=128,
                         d_ff=4096, mamba_heads=32, mamba_head_dim=64, d_state=64, mamba_groups=4, chunk_size=128,
                         n_experts=8, top_k=2, moe_d_ff=1024, shared_d_ff=1024)
    hw = dict(steptime.load_hardware("a100"), gpus_per_node=4, hbm_gb=hbm)
    job = steptime.Job(cfg, 1024, 16, 8, hw, "bf16", attention)
    every = exhaustive(job)
    found, counts, _ = plan.search(job, top=5)
    assert len(every) > 50 and counts["timed"] < counts["valid"] / 4, (len(every), counts)
    assert found[0]["step_time_s"] == pytest.approx(every[0]["step_time_s"], rel=1e-12)
    times = {r["layout"]: r["step_time_s"] for r in every}
    assert all(times[r["layout"]] == r["step_time_s"] for r in found)
    for L, keys in ((every[len(every) // 2]["layout"], ("tp", "zero")), (every[-1]["layout"], ("pp", "mbs")),
                    (every[len(every) // 3]["layout"], ("recompute", "cp", "sp"))):
        fix = {k: getattr(L, k) for k in keys}
        best = min(r["step_time_s"] for r in every if all(getattr(r["layout"], k) == v for k, v in fix.items()))
        assert plan.search(job, fix, top=1)[0][0]["step_time_s"] == pytest.approx(best, rel=1e-12), fix


def test_emit_plans_what_train_py_runs():
    """--emit searches only what train.py runs (plan.train_py_refuses): no pipeline or context
    parallelism, DDP or FSDP (ZeRO 0 or 3), recompute none or full. An 8B hybrid does not fit on
    80 GB GPUs with DDP alone (weights, fp32 gradients and Adam: 18 B per parameter); FSDP does."""
    cfg, seq = plan.load_model(os.path.join(ROOT, "config", "nano_h100.py"))
    job = steptime.Job(cfg, seq, 64, 8, steptime.load_hardware("h100"))
    results, _, _ = plan.search_train_py(job, {}, top=10)
    assert results and all(plan.train_py_refuses(job, r["layout"]) is None for r in results)
    assert {r["layout"].zero for r in results} == {0, 3} and any(r["layout"].ep > 1 for r in results)
    job = steptime.Job(plan.PRESETS["nemotron-h-8b"][0], 8192, 256, 64, steptime.load_hardware("h100"))
    ddp = dict(tp=1, pp=1, cp=1, ep=1, vp=1, sp=False, zero=0, recompute="none")
    assert plan.search(job, ddp)[0] == []
    best = plan.search_train_py(job, {}, top=1)[0][0]["layout"]
    assert best.zero == 3 and best.pp == best.cp == 1 and best.offload == 0


@pytest.mark.parametrize("layout, flags", [
    (dict(dp=8), []),
    (dict(dp=8, zero=3, recompute="full"), ["--fsdp=True", "--recompute=True"]),
    (dict(tp=2, dp=4, sp=True, zero=3), ["--tp=2", "--sp=True", "--fsdp=True"]),
    (dict(tp=4, dp=2, sp=False, zero=3), ["--tp=4", "--fsdp=True"]),
    (dict(tp=4, dp=2, sp=True, zero=3, recompute="full"), ["--tp=4", "--sp=True", "--fsdp=True", "--recompute=True"]),
    (dict(dp=8, ep=4), ["--ep=4"]),
    (dict(dp=8, ep=8, zero=3), ["--ep=8", "--fsdp=True"]),
])
def test_emit_layout_flags(layout, flags):
    """The command --emit prints carries the layout's train.py flags, and only those."""
    cfg, seq = plan.load_model(os.path.join(ROOT, "config", "nano_h100.py"))
    job, L = steptime.Job(cfg, seq, 64, 8, steptime.load_hardware("h100")), steptime.Layout(mbs=2, **layout)
    assert plan.broken_rule(job, L) is None and plan.train_py_refuses(job, L) is None
    cmd = plan.train_py_command(job, "config/nano_h100.py", {"layout": L}).split()
    assert cmd[:5] == ["torchrun", "--standalone", "--nproc_per_node=8", "train.py", "config/nano_h100.py"]
    assert [f for f in cmd if f.split("=")[0] in ("--tp", "--sp", "--ep", "--fsdp", "--recompute", "--pp")] == flags
    assert "--batch_size=2" in cmd and "--gradient_accumulation_steps=32" in cmd


def test_emit_refuses_what_train_py_cannot_run():
    cfg, seq = plan.load_model(os.path.join(ROOT, "config", "nano_h100.py"))
    job = steptime.Job(cfg, seq, 64, 8, steptime.load_hardware("h100"))
    for layout, words in [(dict(pp=2, dp=4), "pipeline parallelism"), (dict(cp=2, dp=4), "context parallelism"),
                          (dict(dp=8, zero=1), "ZeRO-1"), (dict(dp=8, recompute="selective"), "selective recompute"),
                          (dict(tp=2, dp=4), "DDP replicas"), (dict(tp=2, dp=4, ep=2, zero=3), "ep=2 with tp=2"),
                          (dict(dp=8, ep=2, zero=3), "over their 4 replicas")]:
        assert words in (plan.train_py_refuses(job, steptime.Layout(**layout)) or ""), layout


# -----------------------------------------------------------------------------
# command line


def cli(*args):
    return run_script("plan.py", *args)


def test_cli_table_json_and_fixed_layouts():
    base = ["--model=nemotron-3-nano", "--gpu=h100", "--gpus=64", "--gbs=256"]
    p = cli(*base, "--top=3")
    assert p.returncode == 0, p.stderr
    assert "candidates:" in p.stdout and "tok/s/GPU" in p.stdout and "pp_bubble" in p.stdout
    p = cli(*base, "--json", "--tp=2")
    layouts = json.loads(p.stdout)  # only JSON on stdout
    assert layouts and all(r["tp"] == 2 for r in layouts)
    assert [r["step_time_s"] for r in layouts] == sorted(r["step_time_s"] for r in layouts)
    for key in ("step_time_s", "tokens_per_s_per_gpu", "model_tflops_per_gpu", "mfu", "memory_gib_per_gpu",
                "tp", "pp", "dp", "cp", "ep", "vp", "mbs", "recompute", "sp", "zero", "breakdown"):
        assert key in layouts[0]
    assert math.isclose(sum(layouts[0]["breakdown"].values()), layouts[0]["step_time_s"])
    one = ["--tp=2", "--pp=2", "--dp=8", "--cp=2", "--ep=8", "--vp=1", "--mbs=1", "--recompute=full", "--sp=True",
           "--zero=1"]
    p = cli(*base, "--json", *one)
    (r,) = json.loads(p.stdout)
    assert ((r["tp"], r["pp"], r["dp"], r["cp"], r["ep"], r["mbs"], r["recompute"], r["zero"])
            == (2, 2, 8, 2, 8, 1, "full", 1))


def test_cli_plain_flags_and_emit():
    p = cli("--layers=24", "--hidden=2048", "--heads=16", "--ffn=8192", "--vocab=50304", "--seq_len=2048",
            "--gpus=16", "--gbs=256", "--gpu=a100", "--emit")
    assert p.returncode == 0, p.stderr
    cmd = p.stdout.strip()
    assert cmd.startswith("torchrun --nnodes=2 --nproc_per_node=8") and " train.py " in cmd
    assert "--batch_size=" in cmd and "--gradient_accumulation_steps=" in cmd and "--block_size=2048" in cmd
    assert "--pattern='*-*-" in cmd
    p = cli("--model=config/tiny_cpu.py", "--gpu=a100", "--gpus=2", "--gbs=32", "--emit")
    assert p.returncode == 0 and p.stdout.startswith(
        "torchrun --standalone --nproc_per_node=2 train.py config/tiny_cpu.py")
    p = cli("--model=config/nano_h100.py", "--gpu=h100", "--gpus=8", "--gbs=64", "--precision=fp8", "--emit")
    assert (p.returncode == 0 and p.stdout.strip().endswith("--dtype=bfloat16 --precision=fp8")
            and "--tp=" not in p.stdout)


@pytest.mark.parametrize("args, words", [
    (["--gpuz=h100"], ["unknown config key 'gpuz'"]),
    (["--model=gpt3-175b", "--gpus=lots", "--gbs=8"], ["gpus"]),
    (["--model=gpt3-175b", "--gpus=8"], ["--gbs"]),
    (["--model=gpt-5", "--gbs=8"], ["unknown model 'gpt-5'"]),
    (["--model=gpt3-175b", "--gpu=tpu", "--gbs=8"], ["unknown gpu 'tpu'"]),
    (["--model=gpt3-175b", "--gpu=a100", "--gbs=8", "--precision=fp8"], ["a100 has no fp8"]),
    (["--model=gpt3-175b", "--gbs=64", "--gpus=8", "--tp=8", "--pp=1", "--dp=1", "--cp=1", "--ep=1", "--vp=1",
      "--mbs=3", "--recompute=none", "--sp=True", "--zero=0"], ["gbs=64 must be a multiple of dp*mbs"]),
    (["--model=gpt3-175b", "--gbs=64", "--tp=3"], ["tp*pp*cp = 3 does not divide the 8 GPUs"]),
    (["--model=gpt3-175b", "--gbs=64", "--gpus=16", "--tp=16"], ["tp=16", "one NVLink domain (8 GPUs)"]),
    (["--model=llama3-70b", "--gbs=64", "--tp=16", "--gpu=gb200", "--gpus=64"], ["tp=16 must divide", "KV heads (8)"]),
    (["--model=gpt3-175b", "--gbs=0"], ["gbs"]), (["--model=gpt3-175b", "--gbs=8", "--gpus=-8"], ["gpus"]),
    (["--model=gpt3-175b", "--gbs=8", "--seq_len=2k"], ["seq_len"]),
    (["--model=nemotron-3-nano", "--gbs=8", "--moe_imbalance=0.5"], ["moe_imbalance"]),
    (["--model=gpt3-175b", "--gbs=8", "--gpu=tpu"], ["a100", "gb300", "JSON profile", "--calibrate"]),
    (["--model=gpt3-175b", "--gbs=8", "--gpu=README.md"], ["README.md: not a hardware profile"]),
    (["--validate=README.md"], ["README.md: not a published-runs CSV"]),
    (["--validate=no_such.csv"], ["no_such.csv"]),
    (["--model=gpt3-175b", "--gbs=64", "--pp=2", "--emit"], ["train.py cannot run pipeline parallelism"]),
    (["--layers=4", "--hidden=64", "--gbs=8"], ["--heads --ffn --vocab"]),
])
def test_cli_bad_input_exits_cleanly(args, words):
    p = cli(*args)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in p.stderr, p.stderr


def test_calibrate_writes_a_usable_profile(tmp_path):
    """--calibrate: 2 gloo processes measure matmul, copy, kernel and all-reduce speeds; the JSON
    it writes is a --gpu profile."""
    out = str(tmp_path / "cpu.json")
    p = cli("--calibrate", f"--out={out}")
    assert p.returncode == 0, p.stderr
    with open(out) as f:
        hw = json.load(f)
    assert hw["flops"]["fp32"] > 0 and hw["hbm_bw"] > 0 and hw["net_bw"] > 0 and hw["latency_s"] > 0
    p = cli("--model=config/tiny_cpu.py", f"--gpu={out}", "--gpus=2", "--gbs=32", "--precision=fp32", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)[0]["step_time_s"] > 0
