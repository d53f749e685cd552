"""
bench.py: speed measured side by side in one process, printed as ratios. Read after model.py.

    python bench.py            # train, decode, then moe (about 7 minutes on a 2-core CPU)
    python bench.py train      # training tokens/s: ours hybrid, ours attention-only, transformers
    python bench.py decode     # cached decoding ms/token at contexts 256 .. 8192
    python bench.py moe        # one MoE layer, forward + backward tokens/s, 64 and 128 experts, top-6
    python bench.py --quick    # a tiny smoke version (tests/test_bench.py calls its functions)

The candidates take turns, one step each (a, b, c, a, b, c, ...), so that a noisy machine slows
them all alike, and each reports the median of its steps. "transformers" is NemotronHForCausalLM
loaded from our save_pretrained, so its weights are ours; on a CPU it runs its pure-PyTorch paths
(mamba_ssm and causal_conv1d are CUDA kernels). The project's targets are printed, never asserted:
benchmarks are measurements, not tests.
"""
import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import kernels
from model import Nemotron, NemotronConfig
from moe import experts_loop

TRAIN_TARGET = 1.5    # ours / transformers training tokens/s
DECODE_TARGET = 4.0   # transformers / ours decoding ms per token, at every context
FLAT_TARGET = 1.3     # hybrid ms/token at the longest context / at the shortest
MOE_TARGET = 2.0      # ours / transformers tokens/s of one MoE layer, forward + backward
MOE = dict(vocab_size=256, d_model=256, pattern="E", top_k=6, moe_d_ff=256, shared_d_ff=512)
QUICK = dict(d_model=64, pattern="M-M*M-ME", n_head=2, n_kv_head=1, head_dim=32, d_ff=128, mamba_heads=2,
             headdim=32, d_state=16, chunk_size=16, n_experts=4, moe_d_ff=32, shared_d_ff=64)

# -----------------------------------------------------------------------------
# the candidates


def attention_only(cfg):
    """Same width and depth, every Mamba layer (M) replaced by attention (*); MLP/MoE layers kept."""
    return replace(cfg, pattern=cfg.pattern.replace("M", "*"))


def hf_copy(model):
    """transformers' NemotronHForCausalLM with our model's weights, or None without transformers."""
    try:
        import transformers
        from transformers import NemotronHForCausalLM
    except ImportError:
        return None
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
    steppers = {name: train_step(m, x, y) for name, m in models.items()}
    times = {name: [] for name in models}
    for i in range(warmup + steps):
        for name, step in steppers.items():
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    tokens = batch_size * seq_len
    return {name: {"tok/s": tokens / statistics.median(t), "ms": 1000 * statistics.median(t),
                   "params": n_params(models[name])} for name, t in times.items()}


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
        return model.generate_stream(idx, max_new_tokens, temperature=0)
    return hf_stream(model, idx, max_new_tokens)


def bench_decode(cfg, contexts=(256, 1024, 4096, 8192), steps=32, warmup=2, hf=True, models=None):
    """{context: {name: {"ms": median ms/token, "prefill_s": seconds}}}. Each candidate prefills a
    random prompt of `context` tokens, then they take turns decoding one token each."""
    models = models or candidates(cfg, hf)
    g = torch.Generator().manual_seed(0)
    results = {}
    for ctx in contexts:
        prompt = torch.randint(0, cfg.vocab_size, (1, ctx), generator=g)
        gens, res = {}, {}
        for name, m in models.items():
            m.eval()
            gens[name] = stream(m, prompt, 1 + warmup + steps)
            t0 = time.perf_counter()
            next(gens[name])  # the prefill and the first token
            res[name] = {"prefill_s": time.perf_counter() - t0, "times": []}
        for i in range(warmup + steps):
            for name, gen in gens.items():
                t0 = time.perf_counter()
                next(gen)
                if i >= warmup:
                    res[name]["times"].append(time.perf_counter() - t0)
        for r in res.values():
            r["ms"] = 1000 * statistics.median(r.pop("times"))
        results[ctx] = res
        gens.clear()  # frees the KV caches before the next, longer context
    return results


# -----------------------------------------------------------------------------
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
        times = {name: [] for name in steppers}
        for i in range(warmup + steps):
            for name, step in steppers.items():
                t0 = time.perf_counter()
                step()
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
        results[E] = {name: {"ms": 1000 * statistics.median(t), "tok/s": tokens / statistics.median(t)}
                      for name, t in times.items()}
    return results


def bench_grouped_gemm(n_experts=128, tokens=16384, top_k=6, K=2688, N=1856, steps=20, device="cuda"):
    """On a GPU: achieved TFLOP/s of kernels.grouped_mm, forward + backward (y, dx, dw: three
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
    candidates = {"grouped_mm": lambda: torch.autograd.grad(kernels.grouped_mm(x, w, offs), (x, w), dy),
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
# reports


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
    print(f"\n== decode: batch 1, greedy, ms/token = median of {steps} interleaved steps after a prefill "
          f"and {warmup} warm-up steps (prefill seconds in brackets), {torch.get_num_threads()} threads")
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
    print(f"ours hybrid ms/token at {hi} / at {lo}: {flat:.2f} (target <= {FLAT_TARGET}: {verdict(flat <= FLAT_TARGET)})")
    attn = res[hi]["ours attention-only"]["ms"] / res[lo]["ours attention-only"]["ms"]
    print(f"ours attention-only ms/token at {hi} / at {lo}: {attn:.2f} (expected to grow with the KV cache)")
    if has_hf:
        hf_flat = res[hi]["transformers"]["ms"] / res[lo]["transformers"]["ms"]
        print(f"transformers ms/token at {hi} / at {lo}: {hf_flat:.2f}")


def report_moe(res, tokens, steps, warmup, cfg_kw=MOE):
    c = NemotronConfig(**{**cfg_kw, "n_experts": max(res)})
    print(f"\n== moe: one MoE layer (router, top-{c.top_k} routed experts, shared expert), fp32, {tokens} tokens, "
          f"d_model {c.d_model}, expert d_ff {c.moe_d_ff}, shared d_ff {c.shared_d_ff}; forward + backward, "
          f"median of {steps} interleaved steps after {warmup} warm-up, {torch.get_num_threads()} threads")
    print(f"{'experts':>8}  {'candidate':<32}{'ms/step':>10}{'tok/s':>10}")
    for E, r in res.items():
        for i, (name, v) in enumerate(r.items()):
            print(f"{E if i == 0 else '':>8}  {name:<32}{v['ms']:>10.1f}{v['tok/s']:>10,.0f}")
    print("ceiling: transformers' time / the dense matmuls' time, the most that removing all routing overhead could give")
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
    print(f"\n== grouped GEMM on {shape['device']}: kernels.grouped_mm, bf16, forward + backward "
          f"(y, dx, dw), {shape['n_experts']} experts, {shape['tokens']} tokens x top-{shape['top_k']}, "
          f"K={shape['K']}, N={shape['N']}")
    print(f"grouped GEMM {res['grouped_mm']:.0f} TFLOP/s; one dense bf16 matmul of the same rows "
          f"{res['dense mm']:.0f} TFLOP/s; ratio {res['grouped_mm'] / res['dense mm']:.2f}")


def main():
    parser = argparse.ArgumentParser(description="side-by-side speed of ours vs transformers' NemotronH")
    parser.add_argument("what", nargs="?", default="all", choices=["all", "train", "decode", "moe"])
    parser.add_argument("--quick", action="store_true", help="tiny config and few steps: a smoke test")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no_hf", action="store_true", help="skip transformers")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = NemotronConfig(**QUICK) if args.quick else NemotronConfig()
    train_kw = dict(batch_size=2, seq_len=32, steps=2, warmup=1) if args.quick else \
        dict(batch_size=8, seq_len=256, steps=5, warmup=2)
    decode_kw = dict(contexts=(64, 128), steps=4, warmup=1) if args.quick else \
        dict(contexts=(256, 1024, 4096, 8192), steps=32, warmup=2)
    moe_kw = dict(n_experts=(8, 16), tokens=128, steps=2, warmup=1, cfg_kw={**MOE, **QUICK, "pattern": "E"}) \
        if args.quick else dict(n_experts=(64, 128), tokens=4096, steps=5, warmup=2, cfg_kw=MOE)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"bench: torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load:.1f}, "
          f"config d_model={cfg.d_model} pattern={cfg.pattern!r} vocab={cfg.vocab_size}")
    if load > (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        print("note: the machine is busy (load > CPUs): threads that wait on each other make timings noisy; "
              "--threads=1 is steadier")
    t0 = time.time()
    if args.what in ("all", "train"):
        res = bench_train(cfg, hf=not args.no_hf, **train_kw)
        report_train(res, cfg, **train_kw)
    if args.what in ("all", "decode"):
        res = bench_decode(cfg, hf=not args.no_hf, **decode_kw)
        report_decode(res, decode_kw["steps"], decode_kw["warmup"])
    if args.what in ("all", "moe"):
        res = bench_moe(hf=not args.no_hf, **moe_kw)
        report_moe(res, moe_kw["tokens"], moe_kw["steps"], moe_kw["warmup"], moe_kw["cfg_kw"])
        if torch.cuda.is_available() and kernels.use_triton(torch.empty(0, device="cuda")):
            report_grouped_gemm(*bench_grouped_gemm(**({} if not args.quick else
                                                       dict(n_experts=8, tokens=256, K=128, N=64, steps=2))))
    print(f"\n(bench took {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
