"""
bench.py: speed measured side by side in one process, printed as ratios. Read after model.py.

    python bench.py            # train, decode, then moe (about 7 minutes on a 2-core CPU)
    python bench.py train      # training tokens/s: ours hybrid, ours attention-only, transformers
    python bench.py decode     # cached decoding ms/token at contexts 256 .. 8192
    python bench.py decode --init_from=out-mtp1 --speculative=2   # plain vs MTP-speculative greedy tok/s
    python bench.py kernels    # the Triton SSD vs the PyTorch reference, eager and compiled (a GPU's job)
    python bench.py moe        # one MoE layer, forward + backward tokens/s, 64 and 128 experts, top-6
    python bench.py star       # Star Attention's phase-1 prefill vs full prefill at 2K, 4K, 8K, 4 blocks;
                               # and one W layer: attention.banded vs the dense window mask
    python bench.py lowprec    # FP8 / MXFP8 / NVFP4 Linear vs bf16, forward + backward;
                               # quantizer bandwidth (a GPU's job)
    python bench.py --quick    # a tiny smoke version (tests/test_bench.py calls its functions)

The candidates take turns, one step each (a, b, c, a, b, c, ...), so that a noisy machine slows
them all alike, and each reports the median of its steps. "transformers" is NemotronHForCausalLM
loaded from our save_pretrained, so its weights are ours; on a CPU it runs its pure-PyTorch paths
(mamba_ssm and causal_conv1d are CUDA kernels). The project's targets are printed, never asserted:
benchmarks are measurements, not tests.
"""
import argparse
import copy
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import lowprec
import triton_ops
from attention import banded, visible
from generate import generate_stream, new_cache, speculative_stream, star_blocks, star_prefill
from hardware import peaks
from mamba import ssd_flops
from model import Nemotron, NemotronConfig, config_file
from moe import experts_loop

TRAIN_TARGET = 1.5    # ours / transformers training tokens/s
DECODE_TARGET = 4.0   # transformers / ours decoding ms per token, at every context
FLAT_TARGET = 1.3     # hybrid ms/token at the longest context / at the shortest
SSD_TARGET = 5.0      # compiled reference / Triton SSD forward+backward ms at length 8K
MOE_TARGET = 2.0      # ours / transformers tokens/s of one MoE layer, forward + backward
STAR_TARGET = 2.0     # full prefill / Star Attention phase-1 seconds, 8K context, 4 blocks, attention-only
FP8_TARGET = 1.3      # bf16 / FP8 Linear ms, forward + backward, on a GPU with FP8 tensor cores
QUANT_TARGET = 0.6    # quantizer bytes moved per second / HBM peak
MOE = dict(vocab_size=256, d_model=256, pattern="E", top_k=6, moe_d_ff=256, shared_d_ff=512)
# config/pycode_attention_only.py's model: RoPE attention, MLP and MoE, no Mamba
STAR = dict(vocab_size=256, d_model=128, pattern="***-*E", rope=True, n_head=8, n_kv_head=4, head_dim=32,
            d_ff=512, moe_d_ff=128, shared_d_ff=256)
# the hybrid that `python bench.py` compares (docs/bench.md's tables): twice train.py's CPU default
DEFAULT = dict(d_model=256, pattern="M-M*M-ME", head_dim=64, d_ff=1024, mamba_heads=8, mamba_head_dim=64,
               d_state=64, mamba_groups=1, chunk_size=64, moe_d_ff=256, shared_d_ff=512)
QUICK = dict(d_model=64, pattern="M-M*M-ME", n_head=2, n_kv_head=1, head_dim=32, d_ff=128, mamba_heads=2,
             mamba_head_dim=32, d_state=16, chunk_size=16, n_experts=4, moe_d_ff=32, shared_d_ff=64)

# -----------------------------------------------------------------------------
# the candidates


def attention_only(cfg):
    """Same width and depth, every Mamba layer (M) replaced by attention (*); MLP/MoE layers kept."""
    return replace(cfg, pattern=cfg.pattern.replace("M", "*"))


def hf_copy(model):
    """transformers' NemotronHForCausalLM with our model's weights, or None without transformers.
    Only a missing package gives None: an installed transformers that fails to import (say, a module
    of ours shadowing one it imports) raises, instead of dropping the peer from the bench unseen."""
    if importlib.util.find_spec("transformers") is None:
        print("transformers is not installed: the bench compares ours only (pip install transformers)")
        return None
    import transformers
    from transformers import NemotronHForCausalLM
    transformers.utils.logging.set_verbosity_error()  # its "falling back to PyTorch" notes
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return NemotronHForCausalLM.from_pretrained(tmp, dtype=torch.float32)


def candidates(cfg, hf=True):
    """name -> model: ours hybrid, ours attention-only, transformers (same weights as ours hybrid)."""
    torch.manual_seed(0)
    models = {"ours hybrid": Nemotron(cfg), "ours attention-only": Nemotron(attention_only(cfg))}
    theirs = hf_copy(models["ours hybrid"]) if hf else None
    if theirs is not None:
        models["transformers"] = theirs
    return models


def is_ours(model):
    return isinstance(model, Nemotron)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def interleaved(steppers, steps, warmup):
    """name -> median seconds of steppers[name](): the candidates take turns, one call each, so
    that a noisy machine slows them all alike; the first `warmup` rounds are not counted."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = {name: [] for name in steppers}
    for i in range(warmup + steps):
        for name, step in steppers.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


# -----------------------------------------------------------------------------
# training: forward + backward + AdamW step, fp32


def train_step(model, x, y):
    """A closure running one training step of model on (x, y): the same loss for every candidate."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        logits = model(x)[0] if is_ours(model) else model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_train(cfg, batch_size=8, seq_len=256, steps=5, warmup=2, hf=True):
    """name -> {"tok/s", "ms", "params"}: the median over `steps` interleaved steps after `warmup`."""
    models = candidates(cfg, hf)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), generator=g)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    secs = interleaved({name: train_step(m, x, y) for name, m in models.items()}, steps, warmup)
    tokens = batch_size * seq_len
    return {name: {"tok/s": tokens / t, "ms": 1000 * t, "params": n_params(models[name])} for name, t in secs.items()}


# -----------------------------------------------------------------------------
# decoding: batch 1, greedy; a prefill of the prompt (timed apart), then one token at a time


@torch.no_grad()
def hf_stream(model, idx, max_new_tokens):
    """transformers' cached decoding as a minimal loop (no generate() overhead): yields (B, 1)."""
    out = model(input_ids=idx, use_cache=True, logits_to_keep=1)
    cache = out.cache
    for i in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        yield nxt
        if i + 1 < max_new_tokens:
            out = model(input_ids=nxt, cache=cache, use_cache=True, logits_to_keep=1)


def stream(model, idx, max_new_tokens):
    if is_ours(model):
        return generate_stream(model, idx, max_new_tokens, temperature=0)
    return hf_stream(model, idx, max_new_tokens)


def bench_decode(cfg, contexts=(256, 1024, 4096, 8192), steps=32, warmup=2, hf=True, models=None):
    """{context: {name: {"ms": median ms/token, "prefill_s": seconds}}}. Each candidate prefills a
    random prompt of each context length, then all (context, candidate) pairs take turns decoding
    one token each, so that the ratios across contexts are measured side by side too."""
    models = models or candidates(cfg, hf)
    g = torch.Generator().manual_seed(0)
    gens, results = {}, {}
    for ctx in contexts:
        prompt = torch.randint(0, cfg.vocab_size, (1, ctx), generator=g)
        results[ctx] = {}
        for name, m in models.items():
            m.eval()
            gens[ctx, name] = stream(m, prompt, 1 + warmup + steps)
            t0 = time.perf_counter()
            next(gens[ctx, name])  # the prefill and the first token
            results[ctx][name] = {"prefill_s": time.perf_counter() - t0, "times": []}
    for i in range(warmup + steps):
        for (ctx, name), gen in gens.items():
            t0 = time.perf_counter()
            next(gen)
            if i >= warmup:
                results[ctx][name]["times"].append(time.perf_counter() - t0)
    for res in results.values():
        for r in res.values():
            r["ms"] = 1000 * statistics.median(r.pop("times"))
    return results


# -----------------------------------------------------------------------------
# kernels: the Triton SSD against the PyTorch reference, eager and under torch.compile

def gpu_peaks():
    """(dense bf16 FLOP/s, memory bytes/s) of this GPU (hardware.py), or (None, None)."""
    return peaks(torch.cuda.get_device_name()) if torch.cuda.is_available() else (None, None)


def timed(fn, reps):
    """Seconds of each of reps calls of fn(), synchronising the GPU around each."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def ssd_candidates(quick):
    """name -> an ssd function with mamba.ssd_ref's signature."""
    import triton_ops
    from mamba import ssd_ref
    fns = {"reference": ssd_ref}
    if not quick:  # compiling takes a minute on a CPU: not for a smoke test
        fns["compiled reference"] = torch.compile(ssd_ref, dynamic=False)
    if triton_ops.use_triton(torch.empty(0, device="cuda" if torch.cuda.is_available() else "cpu")):
        fns["triton"] = triton_ops.ssd
    return fns


def bench_ssd(lengths, batch=4, heads=64, headdim=64, groups=1, d_state=128, chunk=128,
              dtype=torch.bfloat16, reps=10, quick=False):
    """{length: {name: {"fwd_ms", "fwdbwd_ms", "first_s", "peak_mb"}}} of the chunked SSD."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fns = ssd_candidates(quick)
    results = {}
    for T in lengths:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, T, heads, headdim, generator=g).to(dev, dtype)
        dt = (torch.rand(batch, T, heads, generator=g) * 0.1 + 0.001).to(dev)
        A = (-torch.rand(heads, generator=g) * 8 - 1).to(dev)
        B, C = (torch.randn(batch, T, groups, d_state, generator=g).to(dev, dtype) for _ in range(2))
        D = torch.randn(heads, generator=g).to(dev)
        inputs = [t.requires_grad_() for t in (x, dt, A, B, C, D)]
        res = {}
        for name, fn in fns.items():
            def fwd():
                with torch.no_grad():
                    fn(x, dt, A, B, C, chunk, D=D)

            def fwdbwd():
                y, h = fn(x, dt, A, B, C, chunk, D=D)
                (y.float().sum() + h.sum()).backward()
                for t in inputs:
                    t.grad = None
            first = timed(fwd, 1)[0] + timed(fwdbwd, 1)[0]  # compiles (or JITs) both directions
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            fwd_s, fwdbwd_s = statistics.median(timed(fwd, reps)), statistics.median(timed(fwdbwd, reps))
            peak = torch.cuda.max_memory_allocated() / 2 ** 20 if dev == "cuda" else None
            res[name] = {"fwd_ms": 1000 * fwd_s, "fwdbwd_ms": 1000 * fwdbwd_s, "first_s": first, "peak_mb": peak}
        results[T] = res
    return results


def bench_decode_kernel(batch=64, heads=64, headdim=64, d_state=128, reps=50):
    """The SSD state update of one token: achieved bandwidth (bytes/s) of the Triton kernel (the state
    read and written once) and of the reference ssd_step."""
    import triton_ops
    from mamba import ssd_step
    dev = "cuda"
    h = torch.randn(batch, heads, headdim, d_state, device=dev)
    x = torch.randn(batch, 1, heads, headdim, device=dev, dtype=torch.bfloat16)
    dt = torch.rand(batch, 1, heads, device=dev) * 0.1
    A, D = -torch.rand(heads, device=dev), torch.randn(heads, device=dev)
    B, C = (torch.randn(batch, 1, 1, d_state, device=dev, dtype=torch.bfloat16) for _ in range(2))
    state_bytes = 2 * h.numel() * 4  # read and written
    kern_s = statistics.median(timed(lambda: triton_ops.ssd_update(h, x, dt, A, B, C, D), reps))
    ref_s = statistics.median(timed(lambda: ssd_step(h, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D), reps))
    return {"triton": state_bytes / kern_s, "reference": state_bytes / ref_s, "state_mb": h.numel() * 4 / 2 ** 20}


def bench_e2e(cfg, batch_size=4, seq_len=2048, steps=5, warmup=2):
    """Training tokens/s (bf16 autocast, AdamW) of cfg on this GPU with the Triton kernels and
    without them (mamba.py's PyTorch references), taking turns step by step."""
    import triton_ops
    dev = "cuda"
    torch.manual_seed(0)
    model = Nemotron(cfg).to(dev)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), device=dev)
    step = train_step(model, x[:, :-1], x[:, 1:])

    def with_kernels(use):
        def run():
            triton_ops.USE_TRITON = use
            with torch.autocast("cuda", dtype=torch.bfloat16):
                step()
        return run
    secs = interleaved({"with kernels": with_kernels(True), "without": with_kernels(False)}, steps, warmup)
    triton_ops.USE_TRITON = True
    return {name: batch_size * seq_len / t for name, t in secs.items()}


def report_kernels(res, shape, decode=None, e2e=None):
    peak, hbm = gpu_peaks()
    b, H, P, G, N, Q, dtype = shape
    flops_tok = ssd_flops(H, P, N, Q)
    print(f"\n== kernels: chunked SSD, batch {b}, heads {H}, head dim {P}, groups {G}, state {N}, "
          f"chunk {Q}, {dtype}; median ms (first call's s: compile + run, both directions)")
    print(f"TFLOP/s counts {flops_tok / 1e6:.2f} MFLOP per token forward (mamba.ssd_flops), backward = 2x forward"
          + (f"; % of the {peak / 1e12:.0f} TFLOP/s dense bf16 peak" if peak else ""))
    print(f"{'length':>7} {'candidate':<20}{'fwd ms':>9}{'fwd+bwd ms':>12}{'TFLOP/s':>9}{'% peak':>8}"
          f"{'first s':>9}{'peak MB':>9}")
    for T, by_name in res.items():
        for name, r in by_name.items():
            tflops = 3 * flops_tok * b * T / (r["fwdbwd_ms"] / 1000) / 1e12
            pct = f"{100 * tflops * 1e12 / peak:>7.1f}%" if peak else f"{'n/a':>8}"
            mem = f"{r['peak_mb']:>9.0f}" if r["peak_mb"] is not None else f"{'n/a':>9}"
            print(f"{T:>7} {name:<20}{r['fwd_ms']:>9.2f}{r['fwdbwd_ms']:>12.2f}{tflops:>9.2f}{pct}"
                  f"{r['first_s']:>9.1f}{mem}")
        if "triton" in by_name and "compiled reference" in by_name:
            ratio = by_name["compiled reference"]["fwdbwd_ms"] / by_name["triton"]["fwdbwd_ms"]
            print(f"{'':>8}triton vs compiled reference, fwd+bwd: {ratio:.2f}x faster (target >= {SSD_TARGET}x at 8K)")
    if "triton" not in next(iter(res.values())):
        print("no Triton candidate: its speed needs a GPU (the interpreter's timings measure Python, not the kernel)")
    if decode is not None:
        pct = f" = {100 * decode['triton'] / hbm:.0f}% of {hbm / 1e12:.2f} TB/s HBM" if hbm else ""
        print(f"decode state update ({decode['state_mb']:.0f} MB fp32 state): triton {decode['triton'] / 1e9:.0f} GB/s"
              f"{pct} (target >= 50%), reference {decode['reference'] / 1e9:.0f} GB/s")
    if e2e is not None:
        print(f"end-to-end training, {e2e['config']}: {e2e['with kernels']:,.0f} tok/s with the kernels, "
              f"{e2e['without']:,.0f} without ({e2e['with kernels'] / e2e['without']:.2f}x)")
# one MoE layer: router, routed experts, shared expert; forward + backward, fp32


def moe_candidates(cfg, hf=True):
    """name -> (the layer, or None for the dense stand-in): ours (grouped GEMMs), ours with the
    per-expert loop, and transformers' NemotronHMoE with our weights, with the experts
    implementation its from_pretrained picks (grouped_mm with this torch) and with "eager"."""
    torch.manual_seed(0)
    model = Nemotron(cfg)
    ours = model.backbone.layers[0].mixer
    loop = copy.deepcopy(ours)
    loop.experts.forward = lambda x, weights, idx: experts_loop(x, weights, idx, loop.experts.up_proj,
                                                                loop.experts.down_proj)
    layers = {"ours: grouped GEMM": ours, "ours: per-expert loop": loop}
    theirs = hf_copy(model) if hf else None
    if theirs is not None:
        layers[f"transformers: {theirs.config._experts_implementation}"] = theirs.model.layers[0].mixer
        if theirs.config._experts_implementation != "eager":
            eager = copy.deepcopy(theirs)
            eager.set_experts_implementation("eager")
            layers["transformers: eager"] = eager.model.layers[0].mixer
    layers["dense matmuls, same FLOPs"] = None
    return layers


def dense_moe_step(cfg, tokens):
    """The layer's FLOPs as plain matmuls, forward + backward: router, one matmul per expert
    projection over all tokens*top_k rows, and the shared expert; no routing, no activations
    (and no LatentMoE projections: the bench's layer has none)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).mul_(0.02).requires_grad_()
    d, k = cfg.d_model, cfg.top_k
    u, xs = r(tokens, d), r(tokens * k, d)
    router, up, down = r(d, cfg.n_experts), r(d, cfg.moe_d_ff), r(cfg.moe_d_ff, d)
    shared_up, shared_down = r(d, cfg.shared_d_ff), r(cfg.shared_d_ff, d)
    dy, dys, dyr = torch.randn(tokens * k, d), torch.randn(tokens, d), torch.randn(tokens, cfg.n_experts)

    def step():
        torch.autograd.backward([xs @ up @ down, u @ shared_up @ shared_down, u @ router], [dy, dys, dyr])

    return step


def bench_moe(n_experts=(64, 128), tokens=4096, steps=5, warmup=2, hf=True, cfg_kw=MOE):
    """{E: {name: {"ms", "tok/s"}}}: one MoE layer, forward + backward on `tokens` random inputs,
    the median of `steps` interleaved steps after `warmup`."""
    results = {}
    for E in n_experts:
        cfg = NemotronConfig(**{**cfg_kw, "n_experts": E})
        g = torch.Generator().manual_seed(0)
        u, dy = torch.randn(1, tokens, cfg.d_model, generator=g), torch.randn(1, tokens, cfg.d_model, generator=g)
        steppers = {}
        for name, layer in moe_candidates(cfg, hf).items():
            if layer is None:
                steppers[name] = dense_moe_step(cfg, tokens)
                continue
            layer.train()
            steppers[name] = lambda layer=layer: layer(u.clone().requires_grad_()).backward(dy)
        secs = interleaved(steppers, steps, warmup)
        results[E] = {name: {"ms": 1000 * t, "tok/s": tokens / t} for name, t in secs.items()}
    return results


def bench_grouped_gemm(n_experts=128, tokens=16384, top_k=6, K=2688, N=1856, steps=20, device="cuda"):
    """On a GPU: achieved TFLOP/s of triton_ops.grouped_mm, forward + backward (y, dx, dw: three
    GEMMs), bf16, random dropless routing, beside one dense bf16 matmul of the same total rows.
    The default sizes are Nemotron 3 Nano's expert up-projection (d 2688, expert d_ff 1856)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    bf16 = torch.bfloat16
    idx = torch.randint(0, n_experts, (tokens * top_k,), device=device)
    offs = torch.bincount(idx, minlength=n_experts).cumsum(0).to(torch.int32)
    x = torch.randn(tokens * top_k, K, device=device, dtype=bf16, requires_grad=True)
    w = torch.randn(n_experts, K, N, device=device, dtype=bf16).mul_(0.02).requires_grad_()
    w0 = w[0].detach().clone().requires_grad_()
    dy = torch.randn(tokens * top_k, N, device=device, dtype=bf16)
    # autograd.grad, not backward: no gradient accumulation inside the timed step
    candidates = {"grouped_mm": lambda: torch.autograd.grad(triton_ops.grouped_mm(x, w, offs), (x, w), dy),
                  "dense mm": lambda: torch.autograd.grad(x @ w0, (x, w0), dy)}
    res = {}
    for name, step in candidates.items():
        times = []
        for i in range(3 + steps):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            if i >= 3:
                times.append(time.perf_counter() - t0)
        res[name] = 3 * 2 * tokens * top_k * K * N / statistics.median(times) / 1e12
    name = torch.cuda.get_device_name() if device == "cuda" else device
    return res, dict(device=name, n_experts=n_experts, tokens=tokens, top_k=top_k, K=K, N=N)


# -----------------------------------------------------------------------------
# low precision: the low-precision Linear against bf16, and the quantizers' bandwidth


def bench_lowprec_linear(M, K, N, steps=10, warmup=3, device="cpu"):
    """name -> median seconds of one Linear forward + backward (y, dx, dw) on x (M, K), an fp32
    master weight (N, K) and dy (M, N): "bf16" (F.linear on the weight cast to bf16 on a GPU, as
    autocast does; fp32 on a CPU) and lowprec.LowPrecLinearFn for each recipe (FP8 through
    torch._scaled_mm where it runs, everything else emulated)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(N, K, device=device) * 0.02).requires_grad_()
    dy = torch.randn(M, N, device=device, dtype=dtype)
    H = triton_ops.hadamard16(torch.ones(16)).to(device)
    steppers = {"bf16": lambda: torch.autograd.grad(F.linear(x, w.to(dtype)), (x, w), dy)}
    for fmt in ("fp8", "mxfp8", "nvfp4"):
        recipe = lowprec.Recipe(fmt, H=H)
        steppers[fmt] = lambda r=recipe: torch.autograd.grad(lowprec.LowPrecLinearFn.apply(x, w, r), (x, w), dy)
    return interleaved(steppers, steps, warmup)


def bench_quantizers(R, C, reps=20, device="cpu"):
    """name -> (median seconds, bytes moved) of each quantizer on a bf16 (R, C) tensor. Bytes are
    the least any implementation must move: the input read once, the codes and scales written
    (the per-tensor recipes read the input a second time for the amax; not counted)."""
    x = torch.randn(R, C, device=device, dtype=torch.bfloat16)
    n = R * C
    cands = {"fp8 tensorwise": (lambda: triton_ops.quantize_fp8(x), 2 * n + n),
             "fp8 blockwise 1x128": (lambda: triton_ops.quantize_fp8(x, "blockwise"), 2 * n + n + 4 * n // 128),
             "mxfp8 1x32": (lambda: triton_ops.quantize_mxfp8(x), 2 * n + n + n // 32),
             "nvfp4 1x16": (lambda: triton_ops.quantize_nvfp4(x), 2 * n + n // 2 + n // 16),
             "nvfp4 16x16": (lambda: triton_ops.quantize_nvfp4(x, (16, 16)), 2 * n + n // 2 + n // 256),
             "nvfp4 1x16 SR": (lambda: triton_ops.quantize_nvfp4(x, stochastic=True), 2 * n + n // 2 + n // 16)}
    res = {}
    for name, (fn, nbytes) in cands.items():
        fn()
        res[name] = (statistics.median(timed(fn, reps)), nbytes)
    return res


def run_lowprec(quick):
    """bench.py lowprec: the shapes of real layers on a GPU; on a CPU a small emulated comparison."""
    gpu = torch.cuda.is_available()
    if quick:
        (M, K, N), (R, C), steps = (64, 64, 128), (64, 256), 1
    elif gpu:
        (M, K, N), (R, C), steps = (4096, 4096, 16384), (16384, 8192), 10
    else:
        (M, K, N), (R, C), steps = (1024, 512, 2048), (1024, 1024), 3
    device = "cuda" if gpu else "cpu"
    lin = bench_lowprec_linear(M, K, N, steps=steps, warmup=1 if quick else 3, device=device)
    quant = bench_quantizers(R, C, reps=2 if quick else 20, device=device)
    report_lowprec(lin, (M, K, N), quant, (R, C))


# -----------------------------------------------------------------------------
# reports


# -----------------------------------------------------------------------------
# Star Attention: phase 1 (context encoding in blocks) against full prefill


def bench_star(contexts=(2048, 4096, 8192), n_blocks=4, steps=3, warmup=1, cfg_kw=STAR):
    """context -> median seconds of three prefills of one prompt (the context, then 1 query token):
    "full" attention; "star", Star Attention's phase 1 with n_blocks blocks and the query, every
    host in this process (the anchor once, the other blocks as one batch); "one host", the phase 1
    of one host holding one block (the anchor, then its block), which is the phase's wall time
    when each block has a host of its own (phase 1 exchanges nothing)."""
    torch.manual_seed(0)
    model = Nemotron(NemotronConfig(**cfg_kw)).eval()
    res = {}
    for T in contexts:
        idx = torch.randint(0, model.config.vocab_size, (1, T + 1))
        b = T // n_blocks

        @torch.no_grad()
        def full():
            model.hidden(idx, new_cache(model, 1, T + 1))

        @torch.no_grad()
        def one_host():
            anchor = new_cache(model, 1, b)
            model.hidden(idx[:, :b], anchor)
            star_blocks(model, idx, [T - b], b, anchor)

        res[T] = interleaved({"full": full, "star": lambda: star_prefill(model, idx, b), "one host": one_host},
                             steps, warmup)
    return res


def report_star(res, n_blocks, steps, warmup, cfg_kw=STAR):
    print(f"\n== Star Attention phase 1: prefill seconds of a context + 1 query token, {n_blocks} blocks, "
          f"attention-only pattern {cfg_kw['pattern']!r} d_model={cfg_kw['d_model']}, median of {steps} "
          f"interleaved rounds after {warmup} warm-up, {torch.get_num_threads()} threads")
    print(f"{'context':>8} {'full':>8} {'star':>8} {'full/star':>10} {'one host':>9} {'full/host':>10}")
    for T, r in res.items():
        print(f"{T:>8} {r['full']:>8.3f} {r['star']:>8.3f} {r['full'] / r['star']:>10.2f} "
              f"{r['one host']:>9.3f} {r['full'] / r['one host']:>10.2f}")
    T = max(res)
    r = res[T]
    print(f"target: full / Star phase 1 >= {STAR_TARGET} at {T} tokens with {n_blocks} blocks: "
          f"all hosts in one process {r['full'] / r['star']:.2f} {verdict(r['full'] / r['star'] >= STAR_TARGET)}; "
          f"hosts in parallel (one host's share) {r['full'] / r['one host']:.2f} "
          f"{verdict(r['full'] / r['one host'] >= STAR_TARGET)}")


def bench_window(contexts=(2048, 4096, 8192), window=128, steps=3, warmup=1, heads=4, kv_heads=2, head_dim=32):
    """context -> median seconds of one sliding-window attention (batch 1, GQA): "dense", sdpa with
    the whole T x T window mask (what W layers ran before attention.banded), and "banded"."""
    g = torch.Generator().manual_seed(0)
    res = {}
    for T in contexts:
        q = torch.randn(1, heads, T, head_dim, generator=g)
        k, v = (torch.randn(1, kv_heads, T, head_dim, generator=g) for _ in range(2))
        p = torch.arange(T)
        mask = visible(p, p, window)  # (T, T)
        dense = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        res[T] = interleaved({"dense": dense, "banded": lambda: banded(q, k, v, window)}, steps, warmup)
    return res


def report_window(res, window):
    print(f"\n== one sliding-window attention (W layer), window {window}, batch 1, 4 heads: seconds, dense T x T "
          f"mask vs attention.banded")
    print(f"{'context':>8} {'dense':>8} {'banded':>8} {'dense/banded':>13}")
    for T, r in res.items():
        print(f"{T:>8} {r['dense']:>8.3f} {r['banded']:>8.3f} {r['dense'] / r['banded']:>13.2f}")


def verdict(ok):
    return "PASS" if ok else "FAIL"


def report_train(res, cfg, batch_size, seq_len, steps, warmup):
    print(f"\n== train: fp32, batch {batch_size} x {seq_len} tokens, forward + backward + AdamW, "
          f"median of {steps} interleaved steps after {warmup} warm-up, {torch.get_num_threads()} threads")
    print(f"attention-only: the pattern {cfg.pattern!r} with every M replaced by * "
          f"({attention_only(cfg).pattern!r}), MLP/MoE layers kept")
    print(f"{'model':<22}{'pattern':<12}{'params':>10}{'ms/step':>10}{'tok/s':>10}")
    for name, r in res.items():
        pattern = attention_only(cfg).pattern if "attention-only" in name else cfg.pattern
        print(f"{name:<22}{pattern:<12}{r['params']:>10,}{r['ms']:>10.1f}{r['tok/s']:>10,.0f}")
    ours = res["ours hybrid"]["tok/s"]
    print(f"attention-only / hybrid tok/s: {res['ours attention-only']['tok/s'] / ours:.2f}x")
    if "transformers" in res:
        ratio = ours / res["transformers"]["tok/s"]
        print(f"ours / transformers tok/s: {ratio:.2f}x (target >= {TRAIN_TARGET}x: {verdict(ratio >= TRAIN_TARGET)})")
    else:
        print("transformers is not installed: no peer to compare with")


def report_decode(res, steps, warmup):
    names = list(next(iter(res.values())))
    print(f"\n== decode: batch 1, greedy, ms/token = median of {steps} steps after a prefill and {warmup} "
          f"warm-up steps, every context and candidate taking turns (prefill seconds in brackets), "
          f"{torch.get_num_threads()} threads")
    head = "".join(f"{n:>24}" for n in names)
    has_hf = "transformers" in names
    print(f"{'context':>8}{head}" + (f"{'transformers/ours':>19}" if has_hf else ""))
    ratios = []
    for ctx, r in res.items():
        cells = "".join(f"{r[n]['ms']:>12.2f} ({r[n]['prefill_s']:>7.2f}s)" for n in names)
        line = f"{ctx:>8}{cells}"
        if has_hf:
            ratios.append(r["transformers"]["ms"] / r["ours hybrid"]["ms"])
            line += f"{ratios[-1]:>18.2f}x"
        print(line)
    lo, hi = min(res), max(res)
    if has_hf:
        print(f"transformers / ours ms/token: {min(ratios):.2f}x at worst "
              f"(target >= {DECODE_TARGET}x at every context: {verdict(min(ratios) >= DECODE_TARGET)})")
    flat = res[hi]["ours hybrid"]["ms"] / res[lo]["ours hybrid"]["ms"]
    print(f"ours hybrid ms/token at {hi} / at {lo}: {flat:.2f} "
          f"(target <= {FLAT_TARGET}: {verdict(flat <= FLAT_TARGET)})")
    attn = res[hi]["ours attention-only"]["ms"] / res[lo]["ours attention-only"]["ms"]
    print(f"ours attention-only ms/token at {hi} / at {lo}: {attn:.2f} (expected to grow with the KV cache)")
    if has_hf:
        hf_flat = res[hi]["transformers"]["ms"] / res[lo]["transformers"]["ms"]
        print(f"transformers ms/token at {hi} / at {lo}: {hf_flat:.2f}")


def bench_speculative(model, prompts, max_new_tokens=128, k=2, rounds=2):
    """Greedy decoding of each prompt, plain and with speculative=k, side by side after one untimed
    warm-up of each: {"plain", "speculative"}: tokens/s over all prompts and rounds (prefill
    included, as a user waits for it), "ratios": speculative / plain per (round, prompt) pair, timed
    back to back in alternating order, and "stats": drafts kept per verification (first round)."""
    model.eval()
    run = lambda name, p, n, st=None: list(generate_stream(model, p, n, temperature=0)) if name == "plain" else \
        list(speculative_stream(model, p, n, k, temperature=0, stats=st))
    for name in ("plain", "speculative"):
        run(name, prompts[0], 32)
    secs, ratios = {"plain": 0.0, "speculative": 0.0}, []
    stats = {"rounds": 0, "accepted": [0] * k}
    for r in range(rounds):
        for i, p in enumerate(prompts):
            pair = {}
            for name in ("plain", "speculative") if (r + i) % 2 == 0 else ("speculative", "plain"):
                st = {}
                t0 = time.perf_counter()
                out = run(name, p, max_new_tokens, st)
                pair[name] = time.perf_counter() - t0
                assert len(out) == max_new_tokens
                if name == "speculative" and r == 0:
                    stats["rounds"] += st["rounds"]
                    stats["accepted"] = [a + b for a, b in zip(stats["accepted"], st["accepted"])]
            ratios.append(pair["plain"] / pair["speculative"])
            for name in pair:
                secs[name] += pair[name]
    tokens = rounds * len(prompts) * max_new_tokens
    return {"plain": tokens / secs["plain"], "speculative": tokens / secs["speculative"],
            "ratios": sorted(ratios), "stats": stats}


def report_speculative(res, k, n_prompts, max_new_tokens):
    st = res["stats"]
    per_round = 1 + sum(st["accepted"]) / max(st["rounds"], 1)
    print(f"\n== speculative decoding: greedy, batch 1, {n_prompts} prompts x {max_new_tokens} new tokens, "
          f"k = {k} drafts per verification, {torch.get_num_threads()} threads")
    print(f"plain {res['plain']:.1f} tok/s, speculative {res['speculative']:.1f} tok/s: "
          f"{res['speculative'] / res['plain']:.2f}x (target >= 1.4x at k = 2)")
    r = res["ratios"]
    print(f"speedup per prompt, timed back to back: median {r[len(r) // 2]:.2f}x, range {r[0]:.2f}-{r[-1]:.2f}x "
          f"over {len(r)} pairs")
    print(f"tokens per verification {per_round:.2f} (target >= 2.0 at k = 2); kept by draft position: "
          + " ".join(f"{a / max(st['rounds'], 1):.2f}" for a in st["accepted"]))


def val_prompts(model, data_dir, n=4, length=64):
    """n prompts of `length` tokens from evenly spaced places of data_dir/val.bin."""
    import numpy as np
    data = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint32, mode="r")
    starts = [i * (len(data) - length) // n for i in range(n)]
    return [torch.from_numpy(data[s:s + length].astype(np.int64))[None] for s in starts]


def run_kernels(quick, lengths=None):
    """bench.py kernels: realistic shapes on a GPU; on a CPU only the reference (eager and compiled)
    at a smaller size, and with --quick a smoke test (the Triton path too under TRITON_INTERPRET=1).
    lengths: the sequence lengths to time instead of the defaults (each compiles the reference anew)."""
    gpu = torch.cuda.is_available()
    if quick:
        shape, default, reps = (1, 4, 16, 1, 16, 16, torch.float32), (40,), 1
    elif gpu:
        shape, default, reps = (4, 64, 64, 1, 128, 128, torch.bfloat16), (2048, 4096, 8192, 16384), 10
    else:
        shape, default, reps = (1, 8, 64, 1, 64, 64, torch.float32), (1024, 4096), 3
    lengths = lengths or default
    b, H, P, G, N, Q, dtype = shape
    res = bench_ssd(lengths, batch=b, heads=H, headdim=P, groups=G, d_state=N, chunk=Q, dtype=dtype,
                    reps=reps, quick=quick)
    decode = bench_decode_kernel() if gpu and not quick else None
    e2e = None
    if gpu and not quick:
        e2e = bench_e2e(config_file(os.path.join(os.path.dirname(__file__), "config", "gpu_125m.py"))[0])
        e2e["config"] = "config/gpu_125m.py, batch 4 x 2048, bf16 autocast"
    report_kernels(res, shape, decode, e2e)
def report_moe(res, tokens, steps, warmup, cfg_kw=MOE):
    c = NemotronConfig(**{**cfg_kw, "n_experts": max(res)})
    print(f"\n== moe: one MoE layer (router, top-{c.top_k} routed experts, shared expert), fp32, {tokens} tokens, "
          f"d_model {c.d_model}, expert d_ff {c.moe_d_ff}, shared d_ff {c.shared_d_ff}; forward + backward, "
          f"median of {steps} interleaved steps after {warmup} warm-up, {torch.get_num_threads()} threads")
    print(f"{'experts':>8}  {'candidate':<32}{'ms/step':>10}{'tok/s':>10}")
    for E, r in res.items():
        for i, (name, v) in enumerate(r.items()):
            print(f"{E if i == 0 else '':>8}  {name:<32}{v['ms']:>10.1f}{v['tok/s']:>10,.0f}")
    print("ceiling: transformers' time / the dense matmuls' time, "
          "the most that removing all routing overhead could give")
    for E, r in res.items():
        ours, dense = r["ours: grouped GEMM"]["ms"], r["dense matmuls, same FLOPs"]["ms"]
        print(f"E={E}: ours grouped / ours loop tok/s: {r['ours: per-expert loop']['ms'] / ours:.2f}x; "
              f"dense matmuls take {dense / ours:.2f} of ours' time")
        for name in (n for n in r if n.startswith("transformers")):
            ratio, ceiling = r[name]["ms"] / ours, r[name]["ms"] / dense
            print(f"E={E}: ours / {name} tok/s: {ratio:.2f}x (ceiling {ceiling:.2f}x; target >= {MOE_TARGET}x: "
                  f"{verdict(ratio >= MOE_TARGET)})")
    if not any(n.startswith("transformers") for r in res.values() for n in r):
        print("transformers is skipped or not installed: no peer to compare with")


def report_grouped_gemm(res, shape):
    print(f"\n== grouped GEMM on {shape['device']}: triton_ops.grouped_mm, bf16, forward + backward "
          f"(y, dx, dw), {shape['n_experts']} experts, {shape['tokens']} tokens x top-{shape['top_k']}, "
          f"K={shape['K']}, N={shape['N']}")
    print(f"grouped GEMM {res['grouped_mm']:.0f} TFLOP/s; one dense bf16 matmul of the same rows "
          f"{res['dense mm']:.0f} TFLOP/s; ratio {res['grouped_mm'] / res['dense mm']:.2f}")


def report_lowprec(lin, shape, quant, qshape):
    gpu = torch.cuda.is_available()
    M, K, N = shape
    fp8_hw = gpu and lowprec.scaled_mm_runs(torch.empty(0, device="cuda"))
    print(f"\n== low-precision Linear, forward + backward (y, dx, dw), M x K x N = {M} x {K} x {N}, "
          f"{torch.cuda.get_device_name() if gpu else 'CPU'}; median of interleaved steps")
    print("fp8: per-tensor E4M3 on " + ("torch._scaled_mm (FP8 tensor cores)" if fp8_hw else "the emulation")
          + "; mxfp8, nvfp4: emulated (quantize, dequantize, matmul) everywhere")
    base = lin["bf16"]
    print(f"{'recipe':<10}{'ms':>10}{'bf16 / recipe':>16}")
    for name, t in lin.items():
        print(f"{name:<10}{1000 * t:>10.2f}{base / t:>15.3f}x")
    if fp8_hw:
        r = base / lin["fp8"]
        print(f"bf16 / FP8 Linear: {r:.2f}x (target >= {FP8_TARGET}x: {verdict(r >= FP8_TARGET)})")
    else:
        print(f"FP8 speed-up (target >= {FP8_TARGET}x) and HBM bandwidth (target >= {QUANT_TARGET:.0%}) "
              "need a GPU with FP8 tensor cores: the figures above are the emulation's overhead on this machine")
    hbm = gpu_peaks()[1]
    where = ("Triton kernels" if triton_ops.use_triton(torch.empty(0, device="cuda" if gpu else "cpu")) and gpu
             else "PyTorch references")
    print(f"\n== quantizers on a bf16 {qshape[0]} x {qshape[1]} tensor ({where}); "
          "bytes = input read + codes and scales written")
    print(f"{'quantizer':<22}{'ms':>9}{'GB/s':>9}" + (f"{'of HBM peak':>13}" if hbm else ""))
    for name, (t, nbytes) in quant.items():
        line = f"{name:<22}{1000 * t:>9.3f}{nbytes / t / 1e9:>9.2f}"
        if hbm:
            frac = nbytes / t / hbm
            line += f"{frac:>12.0%} (target >= {QUANT_TARGET:.0%}: {verdict(frac >= QUANT_TARGET)})"
        print(line)


def main():
    parser = argparse.ArgumentParser(description="side-by-side speed of ours vs transformers' NemotronH")
    parser.add_argument("what", nargs="?", default="all",
                        choices=["all", "train", "decode", "moe", "kernels", "star", "lowprec"],
                        help="all = train + decode + moe; kernels (the Triton SSD), "
                             "star and lowprec (FP8/NVFP4 Linear) run only when named")
    parser.add_argument("--quick", action="store_true", help="tiny config and few steps: a smoke test")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no_hf", action="store_true", help="skip transformers")
    parser.add_argument("--init_from", default=None,
                        help="decode: a trained out_dir with MTP depths, to time --speculative on real text")
    parser.add_argument("--speculative", type=int, default=2, help="drafts per verification with --init_from")
    parser.add_argument("--dataset", default="pycode", help="where --init_from's prompts come from (val.bin)")
    parser.add_argument("--lengths", default=None, type=lambda v: tuple(int(n) for n in v.split(",")),
                        help="kernels: sequence lengths, comma-separated (default 2048,4096,8192,16384 on a GPU)")
    parser.add_argument("--config", default=None,
                        help="star: time this config/ file's model instead of the attention-only default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = NemotronConfig(**(QUICK if args.quick else DEFAULT))
    train_kw = dict(batch_size=2, seq_len=32, steps=2, warmup=1) if args.quick else \
        dict(batch_size=8, seq_len=256, steps=5, warmup=2)
    decode_kw = dict(contexts=(64, 128), steps=4, warmup=1) if args.quick else \
        dict(contexts=(256, 1024, 4096, 8192), steps=32, warmup=2)
    moe_kw = dict(n_experts=(8, 16), tokens=128, steps=2, warmup=1, cfg_kw={**MOE, **QUICK, "pattern": "E"}) \
        if args.quick else dict(n_experts=(64, 128), tokens=4096, steps=5, warmup=2, cfg_kw=MOE)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"bench: torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load:.1f}"
          + ("" if args.what in ("kernels", "star", "lowprec") or args.init_from else
             f", config d_model={cfg.d_model} pattern={cfg.pattern!r} vocab={cfg.vocab_size}"))
    if load > (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        print("note: the machine is busy (load > CPUs): threads that wait on each other make timings noisy; "
              "--threads=1 is steadier")
    t0 = time.time()
    if args.what in ("all", "train"):
        res = bench_train(cfg, hf=not args.no_hf, **train_kw)
        report_train(res, cfg, **train_kw)
    if args.what == "decode" and args.init_from:  # a trained MTP model: plain vs speculative greedy decoding
        model = Nemotron.from_pretrained(args.init_from)
        n, new_tokens = (2, 16) if args.quick else (4, 256)
        prompts = val_prompts(model, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", args.dataset), n)
        res = bench_speculative(model, prompts, new_tokens, args.speculative, rounds=1 if args.quick else 3)
        report_speculative(res, args.speculative, n, new_tokens)
    elif args.what in ("all", "decode"):
        res = bench_decode(cfg, hf=not args.no_hf, **decode_kw)
        report_decode(res, decode_kw["steps"], decode_kw["warmup"])
    if args.what == "kernels":
        run_kernels(args.quick, args.lengths)
    if args.what == "star":
        star_kw = dict(contexts=(128, 256), steps=1, warmup=0, cfg_kw={**STAR, **QUICK, "pattern": "**-*E"}) \
            if args.quick else dict(contexts=(2048, 4096, 8192), steps=3, warmup=1)
        if args.config:  # a config/ file's model, e.g. config/star_copy.py (SWAN-style W and * layers)
            star_kw["cfg_kw"] = {**config_file(args.config)[0].to_dict(), "vocab_size": 256}
        report_star(bench_star(**star_kw), 4, star_kw["steps"], star_kw["warmup"], star_kw.get("cfg_kw", STAR))
        window = 8 if args.quick else star_kw.get("cfg_kw", {}).get("sliding_window", 128)
        report_window(bench_window(star_kw["contexts"], window, star_kw["steps"], star_kw["warmup"]), window)
    if args.what == "lowprec":
        run_lowprec(args.quick)
    if args.what in ("all", "moe"):
        res = bench_moe(hf=not args.no_hf, **moe_kw)
        report_moe(res, moe_kw["tokens"], moe_kw["steps"], moe_kw["warmup"], moe_kw["cfg_kw"])
        if torch.cuda.is_available() and triton_ops.use_triton(torch.empty(0, device="cuda")):
            report_grouped_gemm(*bench_grouped_gemm(**({} if not args.quick else
                                                       dict(n_experts=8, tokens=256, K=128, N=64, steps=2))))
    print(f"\n(bench took {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
