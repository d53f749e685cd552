"""
bench_kernels.py: the GPU kernels' speed, each beside its PyTorch reference: the Triton SSD (chunked
forward + backward, the decode update, a model's training end to end), the MoE grouped GEMM, and the
FP8 / MXFP8 / NVFP4 Linear and quantizers. Read after bench.py, whose timing helpers it uses; its
command line runs these:

    python bench.py kernels    # the Triton SSD vs the PyTorch reference, eager and compiled; the decode
                               # update's bandwidth; config/gpu_125m.py's training tok/s, kernels on and off
    python bench.py kernels --lengths=4096,8192   # other sequence lengths
    python bench.py lowprec    # FP8 / MXFP8 / NVFP4 Linear vs bf16, forward + backward; quantizer bandwidth
    python bench.py moe        # on a GPU, after the MoE layer: the grouped GEMM beside one dense matmul
    python bench.py rnnt       # the RNN-T loss kernel vs its reference; the joint's memory, whole vs fused

These are a GPU's job: on a CPU they time the references, and the Triton path only under the
interpreter (TRITON_INTERPRET=1), whose timings measure Python, not the kernels. As in bench.py,
the targets are printed, never asserted.
"""
import os
import statistics
import time

import torch
import torch.nn.functional as F

import lowprec
import quantize
import triton_ops
from asr import joint_loss, lattice_loss
from bench import interleaved, timed, train_step, verdict
from hardware import peaks
from mamba import ssd_flops, ssd_ref, ssd_step
from model import Nemotron, config_file
from moe import grouped_mm_triton

SSD_TARGET = 5.0      # compiled reference / Triton SSD forward+backward ms at length 8K
FP8_TARGET = 1.3      # bf16 / FP8 Linear ms, forward + backward, on a GPU with FP8 tensor cores
QUANT_TARGET = 0.6    # quantizer bytes moved per second / HBM peak


def gpu_peaks():
    """(dense bf16 FLOP/s, memory bytes/s) of this GPU (hardware.py), or (None, None)."""
    return peaks(torch.cuda.get_device_name()) if torch.cuda.is_available() else (None, None)


# -----------------------------------------------------------------------------
# the chunked SSD: Triton against the PyTorch reference, eager and under torch.compile


def ssd_candidates(quick):
    """name -> an ssd function with mamba.ssd_ref's signature."""
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


def with_and_without_kernels(step, names, steps, warmup):
    """interleaved() seconds of step() with the Triton kernels (names[0]) and with the PyTorch
    references (names[1]), taking turns; triton_ops' switch is left as it was."""
    saved = triton_ops.USE_TRITON

    def run(use):
        def turn():
            triton_ops.USE_TRITON = use
            step()
        return turn
    try:
        return interleaved({names[0]: run(True), names[1]: run(False)}, steps, warmup)
    finally:
        triton_ops.USE_TRITON = saved


def bench_e2e(cfg, batch_size=4, seq_len=2048, steps=5, warmup=2):
    """Training tokens/s (bf16 autocast, AdamW) of cfg on this GPU with the Triton kernels and
    without them (mamba.py's PyTorch references), taking turns step by step."""
    dev = "cuda"
    torch.manual_seed(0)
    model = Nemotron(cfg).to(dev)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), device=dev)
    step = train_step(model, x[:, :-1], x[:, 1:].contiguous())

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            step()
    secs = with_and_without_kernels(run, ("with kernels", "without"), steps, warmup)
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


# -----------------------------------------------------------------------------
# the MoE grouped GEMM: moe.grouped_mm_triton beside one dense matmul


def bench_grouped_gemm(n_experts=128, tokens=16384, top_k=6, K=2688, N=1856, steps=20, device="cuda"):
    """On a GPU: achieved TFLOP/s of moe.grouped_mm_triton, forward + backward (y, dx, dw: three
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
    candidates = {"grouped_mm": lambda: torch.autograd.grad(grouped_mm_triton(x, w, offs), (x, w), dy),
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


def report_grouped_gemm(res, shape):
    print(f"\n== grouped GEMM on {shape['device']}: moe.grouped_mm_triton, bf16, forward + backward "
          f"(y, dx, dw), {shape['n_experts']} experts, {shape['tokens']} tokens x top-{shape['top_k']}, "
          f"K={shape['K']}, N={shape['N']}")
    print(f"grouped GEMM {res['grouped_mm']:.0f} TFLOP/s; one dense bf16 matmul of the same rows "
          f"{res['dense mm']:.0f} TFLOP/s; ratio {res['grouped_mm'] / res['dense mm']:.2f}")


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
    H = quantize.hadamard16(torch.ones(16)).to(device)
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
    cands = {"fp8 tensorwise": (lambda: quantize.quantize_fp8(x), 2 * n + n),
             "fp8 blockwise 1x128": (lambda: quantize.quantize_fp8(x, "blockwise"), 2 * n + n + 4 * n // 128),
             "mxfp8 1x32": (lambda: quantize.quantize_mxfp8(x), 2 * n + n + n // 32),
             "nvfp4 1x16": (lambda: quantize.quantize_nvfp4(x), 2 * n + n // 2 + n // 16),
             "nvfp4 16x16": (lambda: quantize.quantize_nvfp4(x, (16, 16)), 2 * n + n // 2 + n // 256),
             "nvfp4 1x16 SR": (lambda: quantize.quantize_nvfp4(x, stochastic=True), 2 * n + n // 2 + n // 16)}
    res = {}
    for name, (fn, nbytes) in cands.items():
        fn()
        res[name] = (statistics.median(timed(fn, reps)), nbytes)
    return res


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
# the RNN-T loss (asr.py): the Triton kernel beside its PyTorch reference, and the joint's peak memory
# with its whole (B, T, U + 1, V) logits beside joint_lattice's chunks


def bench_rnnt_loss(B, T, U, steps=10, warmup=2, device="cuda"):
    """ms of one forward + backward of the loss from a (B, T, U + 1) lattice: kernel and reference."""
    g = torch.Generator().manual_seed(0)
    blank_lp = F.logsigmoid(torch.randn(B, T, U + 1, generator=g)).to(device).requires_grad_()
    label_lp = F.logsigmoid(torch.randn(B, T, U, generator=g)).to(device).requires_grad_()
    frames, labels = torch.full((B,), T, device=device), torch.full((B,), U, device=device)

    secs = with_and_without_kernels(lambda: lattice_loss(blank_lp, label_lp, frames, labels).sum().backward(),
                                    ("Triton kernel", "PyTorch reference"), steps, warmup)
    return {name: 1000 * t for name, t in secs.items()}


def joint_peak_mb(B, T, U, V, J, chunk, device="cuda"):
    """MB the GPU allocates above its inputs for one forward + backward of the joint and the loss:
    the whole logits (chunk 0) or joint_lattice, chunk frames at a time."""
    g = torch.Generator().manual_seed(0)
    f, pred = (torch.randn(B, n, J, generator=g).to(device).requires_grad_() for n in (T, U + 1))
    w = (0.05 * torch.randn(V, J, generator=g)).to(device).requires_grad_()
    b = torch.zeros(V, device=device, requires_grad=True)
    y = torch.randint(1, V, (B, U), generator=g).to(device)
    frames, labels = torch.full((B,), T, device=device), torch.full((B,), U, device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    joint_loss(f, pred, w, b, y, frames, labels, chunk).sum().backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_rnnt(quick):
    """bench.py rnnt: on a GPU an ASR batch's lattice (16 utterances, 250 frames, 60 labels) and the
    joint's memory at vocabularies of 1K to 8K; on a CPU the reference (and, under TRITON_INTERPRET=1,
    the kernel in the interpreter) at a smaller size, without the memory table."""
    gpu = torch.cuda.is_available()
    B, T, U = (2, 8, 3) if quick else (16, 250, 60) if gpu else (8, 60, 20)
    device = "cuda" if gpu else "cpu"
    ms = bench_rnnt_loss(B, T, U, steps=1 if quick else 10, warmup=0 if quick else 2, device=device)
    where = "" if gpu else " (CPU: the kernel only under TRITON_INTERPRET=1, timing Python)"
    print(f"\nRNN-T loss, forward + backward, B={B} T={T} U={U}{where}")
    for name, t in ms.items():
        print(f"  {name:<18}{t:>9.3f} ms")
    print(f"  reference / kernel: {ms['PyTorch reference'] / ms['Triton kernel']:.1f}x")
    if gpu:
        J = 640
        print(f"\njoint + loss peak memory above the inputs, B={B} T={T} U={U} J={J} (MB)")
        print(f"{'V':>6}{'whole logits':>14}{'fused, 4 frames':>17}{'ratio':>8}")
        for V in ((1024,) if quick else (1024, 4096, 8192)):
            whole, fused = (joint_peak_mb(B, T, U, V, J, chunk) for chunk in (0, 4))
            print(f"{V:>6}{whole:>14,.0f}{fused:>17,.0f}{whole / fused:>7.1f}x")
