"""
bench.py: speed measured side by side in one process, printed as ratios. Read after model.py.

    python bench.py            # train, decode, then moe (about 7 minutes on a 2-core CPU)
    python bench.py train      # training tokens/s: ours hybrid, ours attention-only, transformers
    python bench.py decode     # ms/token at contexts 256 .. 8192 (eager, compiled engine); batched tok/s
    python bench.py rows       # the engine's decode step: tokens/s by busy rows, eager and compiled
    python bench.py serve      # serve.py: 32 concurrent streaming clients vs one by one; time to first token
    python bench.py decode --init_from=out-mtp1 --speculative=2   # plain vs MTP-speculative greedy tok/s
    python bench.py kernels    # the Triton SSD vs the PyTorch reference, eager and compiled (a GPU's job)
    python bench.py moe        # one MoE layer, forward + backward tokens/s, 64 and 128 experts, top-6
    python bench.py star       # Star Attention's phase-1 prefill vs full prefill at 2K, 4K, 8K, 4 blocks;
                               # and one W layer: attention.banded vs the dense window mask
    python bench.py lowprec    # FP8 / MXFP8 / NVFP4 Linear vs bf16, forward + backward;
                               # quantizer bandwidth (a GPU's job)
    python bench.py rnnt       # asr.py's RNN-T loss kernel vs its reference; the joint's memory (a GPU's job)
    python bench.py --quick    # a tiny smoke version (tests/test_bench.py calls its functions)

kernels, lowprec, rnnt and (on a GPU, after moe) the grouped GEMM are bench_kernels.py's benches; they time
with the helpers here (interleaved, timed, train_step, verdict).

The candidates take turns, one step each (a, b, c, a, b, c, ...; decoding: 8 tokens each, so that
a turn's steps find their weights in the CPU's caches), so that a noisy machine slows them all
alike, and each reports the median of its steps. "transformers" is NemotronHForCausalLM
loaded from our save_pretrained, so its weights are ours; on a CPU it runs its pure-PyTorch paths
(mamba_ssm and causal_conv1d are CUDA kernels). The project's targets are printed, never asserted:
benchmarks are measurements, not tests.
"""
import argparse
import copy
import http.client
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import triton_ops
from attention import banded, visible
import generate
from generate import (Engine, Request, engine_stream, generate_batch, generate_stream, new_cache, speculative_stream,
                      star_blocks, star_prefill, step_function)
from model import Nemotron, NemotronConfig, config_file
from moe import experts_loop

TRAIN_TARGET = 1.5    # ours / transformers training tokens/s
DECODE_TARGET = 4.0   # transformers / ours decoding ms per token, at every context
COMPILED_TARGET = 3.0  # transformers / ours compiled (static-cache engine) decoding ms per token, at every context
FLOOR_TARGET = 2.0    # ours compiled ms per token at the shortest context / the matmul floor (batch 1)
BATCH_TARGET = 4.0    # ours compiled / transformers generated tokens/s, 16 greedy prompts of mixed lengths
SERVE_TARGET = 3.0    # serve.py: concurrent clients' tokens/s / the same requests one by one
FLAT_TARGET = 1.3     # hybrid ms/token at the longest context / at the shortest
MOE_TARGET = 2.0      # ours / transformers tokens/s of one MoE layer, forward + backward
STAR_TARGET = 2.0     # full prefill / Star Attention phase-1 seconds, 8K context, 4 blocks, attention-only
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


# -----------------------------------------------------------------------------
# timing: the candidates take turns, a GPU synchronised around each call (bench_kernels.py uses these too)


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
    8 tokens each, so that the ratios across contexts are measured side by side too. Besides
    models' streams, the hybrid's static-cache engine (generate.engine_stream: eager, and compiled
    during the warm-up)."""
    models = models or candidates(cfg, hf)
    streams = {name: (lambda p, n, m=m: stream(m.eval(), p, n)) for name, m in models.items()}
    for name, compile in (("ours static (eager)", False), ("ours compiled", True)):
        streams[name] = lambda p, n, c=compile: engine_stream(models["ours hybrid"].eval(), p[0].tolist(), n,
                                                              temperature=0, compile=c)
    if not next(models["ours hybrid"].parameters()).is_cuda:  # the same step compiled without the C++ wrapper
        # each (bucket, wrapper) is one more compiled graph of generate.decode_step: room for both wrappers
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(contexts) + 8)
        streams["ours compiled, py wrap"] = lambda p, n: python_wrapper(
            engine_stream(models["ours hybrid"].eval(), p[0].tolist(), n, temperature=0, compile=True))
    g = torch.Generator().manual_seed(0)
    gens, results = {}, {}
    for ctx in contexts:
        prompt = torch.randint(0, cfg.vocab_size, (1, ctx), generator=g)
        results[ctx] = {}
        for name, make in streams.items():
            gens[ctx, name] = make(prompt, 1 + warmup + steps)
            t0 = time.perf_counter()
            next(gens[ctx, name])  # the prefill and the first token
            results[ctx][name] = {"prefill_s": time.perf_counter() - t0, "times": []}
    block = 8  # tokens per turn: the step after another candidate's turn finds the caches cold
    for i in range(0, warmup + steps, block):
        for (ctx, name), gen in gens.items():
            for j in range(i, min(i + block, warmup + steps)):
                t0 = time.perf_counter()
                next(gen)
                if j >= warmup:
                    results[ctx][name]["times"].append(time.perf_counter() - t0)
    for res in results.values():
        for r in res.values():
            r["ms"] = 1000 * statistics.median(r.pop("times"))
    return results


def python_wrapper(tokens):
    """A compiled-engine stream whose step inductor compiles (on first use) and runs with its Python
    wrapper: generate.CPU_COMPILE without cpp_wrapper while each token is made."""
    options, off = generate.CPU_COMPILE, {**generate.CPU_COMPILE, "cpp_wrapper": False}
    while True:
        generate.CPU_COMPILE = off
        try:
            token = next(tokens, None)
        finally:
            generate.CPU_COMPILE = options
        if token is None:
            return
        yield token


def matmul_floor(model, reps=100):
    """Seconds of the matrix multiplies one decoded token needs at batch 1, as bare torch matmuls back to back
    (median of reps): (1, in) @ (in, out) for every nn.Linear of the layers (shared experts included) and the LM
    head; per MoE layer the router (1, d) @ (d, E) and top_k routed experts' up (1, l) @ (l, F), down (1, F) @ (F, l).
    Left out: the SSD recurrence, attention over the cache, the causal conv, norms, embedding, routing, elementwise."""
    linears = [m for m in model.backbone.layers.modules() if isinstance(m, torch.nn.Linear)] + [model.lm_head]
    shapes = [(m.in_features, m.out_features) for m in linears]
    for block in model.backbone.layers:
        if block.kind == "E":
            E, Fe, l = block.mixer.experts.up_proj.shape  # (E, F, l)
            shapes += [(model.config.d_model, E)] + [(l, Fe), (Fe, l)] * model.config.top_k
    p = model.lm_head.weight
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(1, i, generator=g).to(p), torch.randn(i, o, generator=g).to(p)) for i, o in shapes]
    run = lambda: [torch.mm(x, w) for x, w in pairs]
    run()
    return statistics.median(timed(run, reps))


def bench_batch(models, n_prompts=16, lengths=(64, 512), new_tokens=64, rounds=3):
    """name -> {"tok/s", "same"}: n_prompts greedy prompts of lengths drawn from `lengths` (seeded), new_tokens
    each; generated tokens/s with the prefills (median of `rounds` taking turns, after one untimed round that
    compiles ours' bucket) of generate.generate_batch, compiled and eager, and of transformers' generate() on
    the prompts left-padded with token 0 and a mask. "same": rows whose tokens equal ours compiled's."""
    hybrid = models["ours hybrid"].eval()
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(lengths[0], lengths[1] + 1, (n_prompts,), generator=g).tolist()
    prompts = [torch.randint(0, hybrid.config.vocab_size, (n,), generator=g) for n in lens]
    outs, steppers = {}, {}  # outs: name -> each row's new tokens, from its last round
    for name, compile in (("ours compiled", True), ("ours static (eager)", False)):
        steppers[name] = lambda name=name, c=compile: outs.update({name: [r.tokens for r in generate_batch(
            hybrid, prompts, new_tokens, temperature=0, max_batch=16, compile=c)]})
    theirs, T = models.get("transformers"), max(lens)
    if theirs is not None:
        ids = torch.stack([F.pad(p, (T - len(p), 0)) for p in prompts])  # (n_prompts, T), left-padded with 0
        mask = (torch.arange(T) >= T - torch.tensor(lens)[:, None]).long()  # (n_prompts, T): 1 on the prompt
        steppers["transformers"] = lambda: outs.update({"transformers": theirs.eval().generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
            pad_token_id=0)[:, T:].tolist()})
    for name, step in list(steppers.items()):  # the untimed round
        try:
            step()
        except Exception as e:
            if name != "transformers":
                raise
            print(f"transformers' batched generate failed, skipped: {type(e).__name__}: {' '.join(str(e).split())}")
            del steppers[name]
    secs = interleaved(steppers, rounds, 0)
    same = lambda name: sum(a == b for a, b in zip(outs[name], outs["ours compiled"]))
    return {name: {"tok/s": n_prompts * new_tokens / t, "same": same(name)} for name, t in secs.items()}


@torch.no_grad()
def bench_prefill(model, lengths, n_prompts=16, rounds=3):
    """ms of the prefill of n_prompts prompts of lengths drawn from `lengths` (seeded): one by one,
    right-padded into one batch (what Engine.add_many does for prompts of one length group), and as
    one packed sequence of all their tokens, the compute floor (rounds taking turns, after one)."""
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(lengths[0], lengths[1] + 1, (n_prompts,), generator=g).tolist()
    ps = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in lens]
    T = max(lens)
    padded = torch.stack([F.pad(p, (0, T - len(p))) for p in ps])  # (n_prompts, T)
    forms = {"one by one": lambda: [model.hidden(p[None], new_cache(model, 1, len(p))) for p in ps],
             "padded batch": lambda: model.hidden(padded, new_cache(model, n_prompts, T)),
             "one packed sequence": lambda: model.hidden(torch.cat(ps)[None], new_cache(model, 1, sum(lens)))}
    return {name: ms * 1000 for name, ms in interleaved(forms, rounds, 1).items()}, sum(lens), T * n_prompts


@torch.no_grad()
def bench_rows(model, rows=(1, 2, 4, 8, 16, 32), max_len=320, steps=16, warmup=2):
    """{"eager"|"compiled": {n: generated tokens/s}}: the engine's decode step alone (no prefill,
    no sampling) with n busy rows at position ~100, the two forms taking turns per row count."""
    res = {"eager": {}, "compiled": {}}
    for n in rows:
        engines = {}
        for form in res:
            e = engines[form] = Engine(model, n, max_len, compile=form == "compiled")
            for _ in range(n):
                e.add(Request(list(range(100)), max_len - 100, temperature=0))
        step = lambda e: step_function(model, n, max_len, e.compile)(model, *e.first(n))
        secs = interleaved({form: (lambda e=e: step(e)) for form, e in engines.items()}, steps, warmup)
        for form, t in secs.items():
            res[form][n] = n / t
    return res


def report_rows(res, steps):
    print(f"\n== the engine's decode step alone: generated tok/s by busy rows (median of {steps} steps, "
          f"{torch.get_num_threads()} threads)")
    print(f"{'rows':>6}" + "".join(f"{form:>12}" for form in res))
    for n in res["eager"]:
        print(f"{n:>6}" + "".join(f"{res[form][n]:>12,.0f}" for form in res))


# -----------------------------------------------------------------------------
# serving: serve.py under many concurrent streaming clients, against the same requests one by one


def sse_request(port, prompt, max_tokens):
    """One streaming completion over raw HTTP: (seconds to the first token, seconds in all, finish)."""
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    c.request("POST", "/v1/completions", body, {"Content-Length": str(len(body))})
    first, finish = None, None
    for line in c.getresponse():
        if line.startswith(b"data: {"):
            first = first or time.perf_counter() - t0
            finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
    return first, time.perf_counter() - t0, finish


def bench_serve(cfg, clients=32, max_tokens=64, lengths=(16, 256), compile=False):
    """serve.py on a checkpoint of cfg's model (a subprocess, this process's thread count): the
    same `clients` greedy streaming requests, all at once and then one after another. Returns
    {"concurrent", "sequential"}: {"tok/s", "ttft" (seconds, sorted), "complete"}."""
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (clients,), generator=g).tolist()
    prompts = ["".join(chr(32 + c) for c in torch.randint(0, 95, (n,), generator=g).tolist()) for n in sizes]
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        torch.save({"model": Nemotron(cfg).state_dict(), "model_config": cfg.to_dict(), "config": {}},
                   os.path.join(folder, "ckpt.pt"))
        with open(os.path.join(folder, "meta.json"), "w") as f:
            json.dump({"tokenizer": "bytes", "vocab_size": 256}, f)
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        flags = [f"--init_from={folder}", "--port=0", f"--device={device}", f"--max_batch={clients}",
                 f"--queue_size={clients}", f"--max_len={lengths[1] + max_tokens}", f"--compile={compile}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        server = subprocess.Popen([sys.executable, script, *flags], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, env=env)
        try:
            port = next(int(line.split(":")[-1].split()[0]) for line in server.stdout if line.startswith("serving"))
            sse_request(port, prompts[0], 2)  # warm-up (a compiled step compiles here)
            res = {}
            for mode in ("concurrent", "sequential"):
                got = [None] * clients
                ask = lambda i: got.__setitem__(i, sse_request(port, prompts[i], max_tokens))
                t0 = time.perf_counter()
                threads = [threading.Thread(target=ask, args=(i,)) for i in range(clients)]
                for t in threads:  # concurrent: all started, then all joined; sequential: one at a time
                    t.start()
                    if mode == "sequential":
                        t.join()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                done = [r for r in got if r is not None and r[2] == "length"]
                res[mode] = {"tok/s": len(done) * max_tokens / wall, "ttft": sorted(r[0] for r in done),
                             "complete": len(done)}
            return res
        finally:
            server.kill()
            server.wait()


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
        secs = interleaved(steppers, steps, warmup)
        results[E] = {name: {"ms": 1000 * t, "tok/s": tokens / t} for name, t in secs.items()}
    return results


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


def report_decode(res, steps, warmup, floor=None):
    names = list(next(iter(res.values())))
    print(f"\n== decode: batch 1, greedy, ms/token = median of {steps} steps after a prefill and {warmup} "
          f"warm-up steps, every context and candidate taking turns (prefill seconds in brackets), "
          f"{torch.get_num_threads()} threads; ours static: generate.Engine, one row (compiled in the warm-up)")
    head = "".join(f"{n:>24}" for n in names)
    has_hf = "transformers" in names
    print(f"{'context':>8}{head}" + (f"{'transformers/ours':>19}{'transformers/compiled':>23}" if has_hf else ""))
    ratios, compiled = [], []
    for ctx, r in res.items():
        cells = "".join(f"{r[n]['ms']:>12.2f} ({r[n]['prefill_s']:>7.2f}s)" for n in names)
        line = f"{ctx:>8}{cells}"
        if has_hf:
            ratios.append(r["transformers"]["ms"] / r["ours hybrid"]["ms"])
            compiled.append(r["transformers"]["ms"] / r["ours compiled"]["ms"])
            line += f"{ratios[-1]:>18.2f}x{compiled[-1]:>22.2f}x"
        print(line)
    lo, hi = min(res), max(res)
    if has_hf:
        print(f"transformers / ours ms/token: {min(ratios):.2f}x at worst "
              f"(target >= {DECODE_TARGET}x at every context: {verdict(min(ratios) >= DECODE_TARGET)})")
        print(f"transformers / ours compiled ms/token: {min(compiled):.2f}x at worst "
              f"(target >= {COMPILED_TARGET}x at every context: {verdict(min(compiled) >= COMPILED_TARGET)})")
    if floor is not None:  # matmul_floor(): one token's bare matmuls
        ms, ratio = 1000 * floor, res[lo]["ours compiled"]["ms"] / (1000 * floor)
        print(f"matmul floor ms/token: {ms:.3f}; ours compiled / floor: {ratio:.2f}x at {lo} (target <= "
              f"{FLOOR_TARGET}x: {verdict(ratio <= FLOOR_TARGET)}), {res[hi]['ours compiled']['ms'] / ms:.2f}x at {hi}")
    if "ours compiled, py wrap" in names:
        wrapper = [r["ours compiled, py wrap"]["ms"] / r["ours compiled"]["ms"] for r in res.values()]
        print(f"the compiled step with inductor's Python wrapper / with its C++ wrapper: "
              f"{min(wrapper):.2f}x to {max(wrapper):.2f}x")
    flat = res[hi]["ours hybrid"]["ms"] / res[lo]["ours hybrid"]["ms"]
    print(f"ours hybrid ms/token at {hi} / at {lo}: {flat:.2f} "
          f"(target <= {FLAT_TARGET}: {verdict(flat <= FLAT_TARGET)})")
    attn = res[hi]["ours attention-only"]["ms"] / res[lo]["ours attention-only"]["ms"]
    print(f"ours attention-only ms/token at {hi} / at {lo}: {attn:.2f} (expected to grow with the KV cache)")
    if has_hf:
        hf_flat = res[hi]["transformers"]["ms"] / res[lo]["transformers"]["ms"]
        print(f"transformers ms/token at {hi} / at {lo}: {hf_flat:.2f}")


def report_batch(res, n_prompts, lengths, new_tokens, rounds):
    print(f"\n== batched decoding: {n_prompts} greedy prompts of {lengths[0]}..{lengths[1]} tokens, {new_tokens} "
          f"new tokens each; generated tok/s, prefills included, median of {rounds} rounds taking turns after "
          f"an untimed one, {torch.get_num_threads()} threads")
    for name, r in res.items():
        print(f"{name:<22}{r['tok/s']:>10,.1f} tok/s  ({r['same']}/{n_prompts} rows give ours compiled's tokens)")
    ratio = res["ours compiled"]["tok/s"] / res["transformers"]["tok/s"] if "transformers" in res else None
    print(f"ours compiled / transformers tok/s: {ratio:.2f}x (target >= {BATCH_TARGET}x: "
          f"{verdict(ratio >= BATCH_TARGET)})" if ratio else "transformers skipped or failed: no peer to compare with")


def report_prefill(res, tokens, padded, lengths):
    print(f"\n== prefill of 16 prompts of {lengths[0]}..{lengths[1]} tokens ({tokens:,} tokens; padded: "
          f"{padded:,}), ms")
    for name, ms in res.items():
        print(f"{name:<22}{ms:>10,.1f} ms")


def report_serve(res, clients, max_tokens, lengths, compile):
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]
    print(f"\n== serving: serve.py, {clients} greedy streaming clients, prompts of {lengths[0]}..{lengths[1]} "
          f"bytes, {max_tokens} tokens each, compile={compile}, {torch.get_num_threads()} threads")
    for mode, r in res.items():
        print(f"{mode:<11} {r['tok/s']:>9,.1f} tok/s  {r['complete']}/{clients} complete  time to first token "
              f"p50 {pct(r['ttft'], 0.5):.3f} s, p99 {pct(r['ttft'], 0.99):.3f} s")
    ratio = res["concurrent"]["tok/s"] / res["sequential"]["tok/s"]
    print(f"concurrent / one by one tok/s: {ratio:.2f}x (target >= {SERVE_TARGET}x: {verdict(ratio >= SERVE_TARGET)})")


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


# -----------------------------------------------------------------------------
# speculative decoding (decode --init_from): plain vs MTP-speculative greedy on real text


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


@torch.no_grad()
def bench_models(models, prompts, max_new_tokens, rounds=3):
    """name -> greedy decoding tokens/s of each model (a teacher and its compressed students), batch 1,
    prefill included, the models taking turns (median of `rounds` after one untimed)."""
    steppers = {name: lambda m=m: [m.generate(p, max_new_tokens, temperature=0) for p in prompts]
                for name, m in models.items()}
    return {name: len(prompts) * max_new_tokens / t for name, t in interleaved(steppers, rounds, 1).items()}


def val_prompts(data_dir, n=4, length=64):
    """n prompts of `length` tokens from evenly spaced places of data_dir/val.bin."""
    import numpy as np
    data = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint32, mode="r")
    starts = [i * (len(data) - length) // n for i in range(n)]
    return [torch.from_numpy(data[s:s + length].astype(np.int64))[None] for s in starts]


def main():
    parser = argparse.ArgumentParser(description="side-by-side speed of ours vs transformers' NemotronH")
    parser.add_argument("what", nargs="?", default="all",
                        choices=["all", "train", "decode", "batch", "rows", "serve", "moe", "kernels", "star",
                                 "lowprec", "rnnt"],
                        help="all = train + decode (+ its batch) + moe; batch (16 prompts together), rows, serve, "
                             "kernels (the Triton SSD), star, lowprec (FP8/NVFP4 Linear) and rnnt (the RNN-T loss) "
                             "run only when named")
    parser.add_argument("--quick", action="store_true", help="tiny config and few steps: a smoke test")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no_hf", action="store_true", help="skip transformers")
    parser.add_argument("--compile", action="store_true", help="serve: the server's decode step compiled")
    parser.add_argument("--json", default=None, help="rows: also write the table to this JSON file (plot.py rows)")
    parser.add_argument("--init_from", default=None,
                        help="decode: a trained out_dir with MTP depths, to time --speculative on real text; or "
                             "several, comma-separated (a teacher, its compressed students), timed side by side")
    parser.add_argument("--speculative", type=int, default=2, help="drafts per verification with --init_from")
    parser.add_argument("--dataset", default="pycode", help="where --init_from's prompts come from (val.bin)")
    parser.add_argument("--lengths", default=None, type=lambda v: tuple(int(n) for n in v.split(",")),
                        help="kernels: sequence lengths, comma-separated (default 2048,4096,8192,16384 on a GPU)")
    parser.add_argument("--config", default=None,
                        help="star: time this config/ file's model instead of the attention-only default")
    args = parser.parse_args()
    import bench_kernels  # here, not at the top: it imports this file (run as a script, a second copy: `bench`)
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
          + ("" if args.what in ("kernels", "star", "lowprec", "rnnt") or args.init_from else
             f", config d_model={cfg.d_model} pattern={cfg.pattern!r} vocab={cfg.vocab_size}"))
    if load > (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        print("note: the machine is busy (load > CPUs): threads that wait on each other make timings noisy; "
              "--threads=1 is steadier")
    t0 = time.time()
    if args.what in ("all", "train"):
        res = bench_train(cfg, hf=not args.no_hf, **train_kw)
        report_train(res, cfg, **train_kw)
    if args.what == "decode" and args.init_from and "," in args.init_from:  # models side by side
        models = {path: Nemotron.from_pretrained(path).eval() for path in args.init_from.split(",")}
        n, new_tokens = (2, 16) if args.quick else (4, 256)
        prompts = val_prompts(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", args.dataset), n)
        res = bench_models(models, prompts, new_tokens, rounds=1 if args.quick else 3)
        print(f"\n== greedy decoding, batch 1, {n} prompts x {new_tokens} new tokens, prefill included, taking turns")
        first = next(iter(res))
        for path, tps in res.items():
            print(f"{path:<30}{models[path].num_params():>12,} params {tps:>10,.1f} tok/s  {tps / res[first]:.2f}x")
    elif args.what == "decode" and args.init_from:  # a trained MTP model: plain vs speculative greedy decoding
        model = Nemotron.from_pretrained(args.init_from)
        n, new_tokens = (2, 16) if args.quick else (4, 256)
        prompts = val_prompts(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", args.dataset), n)
        res = bench_speculative(model, prompts, new_tokens, args.speculative, rounds=1 if args.quick else 3)
        report_speculative(res, args.speculative, n, new_tokens)
    elif args.what in ("all", "decode", "batch"):
        models = candidates(cfg, hf=not args.no_hf)
        if args.what != "batch":
            res = bench_decode(cfg, models=models, **decode_kw)
            report_decode(res, decode_kw["steps"], decode_kw["warmup"], matmul_floor(models["ours hybrid"]))
        batch_kw = dict(n_prompts=4, lengths=(8, 32), new_tokens=8, rounds=1) if args.quick else \
            dict(n_prompts=16, lengths=(64, 512), new_tokens=64, rounds=3)
        report_batch(bench_batch(models, **batch_kw), **batch_kw)
        if args.what == "batch":  # where the batched time goes: the prefill, by how it is batched
            for lengths in ((4, 8), (8, 16)) if args.quick else (batch_kw["lengths"], (8, 32)):
                report_prefill(*bench_prefill(models["ours hybrid"].eval(), lengths, rounds=batch_kw["rounds"]),
                               lengths)
    if args.what == "rows":
        rows_kw = dict(rows=(1, 2), max_len=128, steps=2) if args.quick else {}
        res = bench_rows(Nemotron(cfg).eval(), **rows_kw)
        report_rows(res, rows_kw.get("steps", 16))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"threads": torch.get_num_threads(), **res}, f)
    if args.what == "serve":
        serve_kw = dict(clients=4, max_tokens=8, lengths=(8, 32)) if args.quick else \
            dict(clients=32, max_tokens=64, lengths=(16, 256))
        report_serve(bench_serve(cfg, compile=args.compile, **serve_kw), compile=args.compile, **serve_kw)
    if args.what == "kernels":
        bench_kernels.run_kernels(args.quick, args.lengths)
    if args.what == "star":
        star_kw = dict(contexts=(128, 256), steps=1, warmup=0, cfg_kw={**STAR, **QUICK, "pattern": "**-*E"}) \
            if args.quick else dict(contexts=(2048, 4096, 8192), steps=3, warmup=1)
        if args.config:  # a config/ file's model, e.g. config/star_copy.py (SWAN-style W and * layers)
            star_kw["cfg_kw"] = {**config_file(args.config)[0].to_dict(), "vocab_size": 256}
        report_star(bench_star(**star_kw), 4, star_kw["steps"], star_kw["warmup"], star_kw.get("cfg_kw", STAR))
        window = 8 if args.quick else star_kw.get("cfg_kw", {}).get("sliding_window", 128)
        report_window(bench_window(star_kw["contexts"], window, star_kw["steps"], star_kw["warmup"]), window)
    if args.what == "lowprec":
        bench_kernels.run_lowprec(args.quick)
    if args.what == "rnnt":
        bench_kernels.run_rnnt(args.quick)
    if args.what in ("all", "moe"):
        res = bench_moe(hf=not args.no_hf, **moe_kw)
        report_moe(res, moe_kw["tokens"], moe_kw["steps"], moe_kw["warmup"], moe_kw["cfg_kw"])
        if torch.cuda.is_available() and triton_ops.use_triton(torch.empty(0, device="cuda")):
            gemm_kw = dict(n_experts=8, tokens=256, K=128, N=64, steps=2) if args.quick else {}
            bench_kernels.report_grouped_gemm(*bench_kernels.bench_grouped_gemm(**gemm_kw))
    print(f"\n(bench took {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
