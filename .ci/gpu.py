"""
.ci/gpu.py: the whole GPU story in one short run, `bash .ci/gpu` (which calls this file), on one
CUDA GPU in under 10 minutes. Each step runs as a subprocess with a time limit, so a step that fails
or hangs is reported and the others still run:

0. device checks (python .ci/gpu.py --checks): the chunked SSD at gpu_125m's shapes, forward and
   backward in fp32 and bf16, against mamba.ssd_ref; one forward + backward of the gpu_125m model
   under bf16 autocast with packed documents, with the kernels and without;
1. the Triton kernel and low-precision tests, on CUDA (tests/test_triton_ops.py, tests/test_lowprec.py,
   the RNN-T kernel's test of tests/test_asr.py),
   which include ssd_update past 2^31 state elements, a quantizer view past 2^31 offsets and the
   quantizers' NaN/inf probes; exact fp32 dots unless a test asks for TF32 (triton_ops.dot_kind), so a
   failure that only a tf32 test shows is TF32's;
2. bench.py kernels: the chunked SSD forward and forward + backward against the PyTorch reference
   (eager and compiled), TFLOP/s and % of the bf16 peak; the decode update's bandwidth; the
   end-to-end training tokens/s of config/gpu_125m.py with and without the kernels;
3. the MoE grouped GEMM (TFLOP/s beside a dense matmul) and bench.py lowprec (FP8 / MXFP8 / NVFP4
   Linear against bf16, quantizer bandwidth); bench.py rnnt (asr.py's RNN-T loss kernel against its
   reference, and the transducer joint's peak memory, whole logits against the fused joint);
4. 200 steps of config/gpu_125m.py on random GPT-2-vocabulary tokens with end-of-text tokens every
   ~1000 tokens (so packed-document masking runs), one micro-step per step: tokens/s and MFU.

It writes one report, gpu_report.md (the headline figures, each step's output, the nvidia-smi line,
the versions), and exits non-zero if any step failed. No network is needed: nothing is installed
or downloaded (a GPU machine brings its own torch and triton).

    bash .ci/gpu [--report=gpu_report.md]
"""
import json, os, re, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_STEPS = 200


def steps(py, data_name, out_dir):
    """(name, command, seconds allowed): the limits add up to 10 minutes."""
    return [
        ("device checks", [py, ".ci/gpu.py", "--checks"], 60),
        ("tests on CUDA", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_triton_ops.py",
                           "tests/test_lowprec.py", "tests/test_asr.py::test_kernel_equals_reference"], 110),
        ("bench.py kernels", [py, "bench.py", "kernels", "--lengths=4096,8192"], 95),
        ("grouped GEMM", [py, "-c", "import bench_kernels as k; k.report_grouped_gemm(*k.bench_grouped_gemm())"], 40),
        ("bench.py lowprec", [py, "bench.py", "lowprec"], 50),
        ("bench.py rnnt", [py, "bench.py", "rnnt"], 30),
        ("bench.py decode", [py, "bench.py", "decode"], 75),  # the compiled step under CUDA graphs
        ("bench.py serve", [py, "bench.py", "serve", "--compile"], 60),
        ("train config/gpu_125m.py", [py, "train.py", "config/gpu_125m.py", f"--dataset={data_name}",
                                      f"--out_dir={out_dir}", f"--max_iters={TRAIN_STEPS}",
                                      f"--lr_decay_iters={TRAIN_STEPS}", "--warmup_iters=20",
                                      "--gradient_accumulation_steps=1", f"--eval_interval={TRAIN_STEPS}",
                                      "--eval_iters=2", "--log_interval=10", "--sample_new_tokens=0"], 80),
    ]


# -----------------------------------------------------------------------------
# device checks: the kernels against the references on the real device, each timed and isolated


def check_ssd(dtype, tol, device="cuda", T=2048, H=24, P=64, G=8, N=128, Q=128):
    """The SSD at gpu_125m's shapes (2 x 2048 tokens, 24 heads of 64, 8 groups, state 128, chunk 128,
    packed documents), forward and backward: the largest error of each output relative to its
    largest entry, against ssd_ref in fp32 on the same inputs."""
    import torch
    import triton_ops
    from mamba import ssd_ref
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=device)
    x, B, C = r(2, T, H, P).to(dtype), r(2, T, G, N).to(dtype), r(2, T, G, N).to(dtype)
    dt = torch.rand(2, T, H, generator=g, device=device) * 0.1 + 0.001
    A, D = -torch.rand(H, generator=g, device=device) * 8 - 1, r(H)
    seq_idx = (torch.arange(T, device=device) >= T // 3).long().expand(2, T).contiguous()
    gy = r(2, T, H, P)
    out = {}
    for name, fn in (("triton", triton_ops.ssd), ("reference", ssd_ref)):
        ins = [t.detach().float().requires_grad_() if name == "reference" else t.detach().requires_grad_()
               for t in (x, dt, A, B, C, D)]
        y, h = fn(*ins[:5], Q, D=ins[5], seq_idx=seq_idx)
        ((y.float() * gy).sum() + h.sum()).backward()
        out[name] = [y.float(), h] + [t.grad.float() for t in ins]
    worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(out["triton"], out["reference"]))
    return worst <= tol, f"largest error / largest entry {worst:.2e} (tolerance {tol:g})"


def check_model(config=os.path.join(ROOT, "config", "gpu_125m.py"), device="cuda", batch=4, T=2048, **override):
    """config/gpu_125m.py's model (4 sequences of 2048 tokens, 3 documents each), one forward and
    backward under bf16 autocast with and without the kernels: the loss and the gradients' cosine."""
    import dataclasses
    import torch
    import triton_ops
    from model import Nemotron, config_file
    cfg = dataclasses.replace(config_file(config)[0], **override)
    torch.manual_seed(0)
    model = Nemotron(cfg).to(device)
    idx = torch.randint(0, cfg.vocab_size, (batch, T + 1), device=device)
    seq_idx = (torch.arange(T, device=device)[None] // (T // 3 + 1)).expand(batch, T).contiguous()
    res = {}
    for use in (True, False):
        triton_ops.USE_TRITON = use
        model.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(idx[:, :-1], idx[:, 1:], seq_idx=seq_idx)[1]
        loss.backward()
        res[use] = loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters()])
    triton_ops.USE_TRITON = True
    cos = float(torch.nn.functional.cosine_similarity(res[True][1], res[False][1], dim=0))
    ok = abs(res[True][0] - res[False][0]) < 1e-2 * res[False][0] and cos > 0.99
    return ok, f"loss {res[True][0]:.4f} with the kernels, {res[False][0]:.4f} without; gradients' cosine {cos:.4f}"


def device_checks():
    import torch
    sys.path.insert(0, ROOT)
    checks = [("SSD fp32 vs ssd_ref", lambda: check_ssd(torch.float32, 1e-3)),
              ("SSD bf16 vs ssd_ref", lambda: check_ssd(torch.bfloat16, 3e-2)),
              ("gpu_125m forward + backward, bf16 autocast, documents", check_model)]
    failed = 0
    for name, check in checks:
        t0 = time.time()
        try:
            ok, what = check()
        except Exception as e:  # one failure does not hide the rest
            ok, what = False, f"{type(e).__name__}: {str(e)[:300]}"
        failed += not ok
        print(f"{'ok    ' if ok else 'FAILED'} {name}: {what} ({time.time() - t0:.1f} s)", flush=True)
    sys.exit(1 if failed else 0)


def write_random_tokens(data_dir, seed=0):
    """A data set of uniform random GPT-2 token ids with an end-of-text token ending each document
    (lengths 200-2000): what the GPU run trains on, without the network FineWeb-Edu would need."""
    import numpy as np
    sys.path.insert(0, ROOT)
    from data.tokenizer import write_dataset
    rng = np.random.default_rng(seed)
    eot = 50256

    def tokens(n):
        t = rng.integers(0, eot, n, dtype=np.uint32)
        ends = np.cumsum(rng.integers(200, 2000, n // 200))  # more document ends than n needs
        t[ends[ends < n]] = eot
        return t
    write_dataset(data_dir, tokens(4_000_000), tokens(200_000),
                  {"tokenizer": "tiktoken", "encoding": "gpt2", "vocab_size": 50257, "eot": eot})


def run_step(name, cmd, limit):
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
        rc, out, timed_out = p.returncode, p.stdout + p.stderr, False
    except subprocess.TimeoutExpired as e:
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        rc, timed_out = None, True
    return dict(name=name, cmd=" ".join(cmd), rc=rc, timed_out=timed_out, seconds=time.time() - t0,
                output=out.replace("\r", "\n"))


# -----------------------------------------------------------------------------
# figures out of each step's output


def headline(step):
    """The lines of a step's output that carry its figures: pytest's summary, the benches' target
    verdicts and TFLOP/s lines."""
    pattern = {"tests on CUDA": r"\d+ (passed|failed)|error", "device checks": r"^(ok|FAILED) ",
               "grouped GEMM": r"TFLOP/s",
               "bench.py kernels": r"target|end-to-end|faster",
               "bench.py rnnt": r"reference / kernel|^\s*\d+\s+[\d,]+\s+[\d,]+"}.get(step["name"], r"target")
    return [line.strip() for line in step["output"].splitlines() if re.search(pattern, line)]


def train_figures(log_path, skip=0.25):
    """Median tokens/s and MFU of a train.py log.jsonl, leaving out the first `skip` of the logged
    steps (kernel compilation, warm-up); None where the log is missing or empty."""
    if not os.path.exists(log_path):
        return None
    with open(log_path) as f:
        rows = [r for r in map(json.loads, f) if "tok/s" in r]
    if not rows:
        return None
    rows = rows[int(len(rows) * skip):] or rows[-1:]
    mfu = [r["mfu"] for r in rows if r.get("mfu") is not None]
    return {"steps": rows[-1]["step"] + 1, "tok/s": statistics.median(r["tok/s"] for r in rows),
            "mfu": statistics.median(mfu) if mfu else None, "loss": rows[-1]["loss"]}


def status(step):
    if step["timed_out"]:
        return f"timed out after {step['seconds']:.0f} s"
    return "ok" if step["rc"] == 0 else f"failed (exit {step['rc']})"


def write_report(path, machine, results, train):
    """gpu_report.md: the machine, a summary table, the training figures, then each step's output."""
    lines = ["# GPU check (.ci/gpu)", "", f"- date: {machine['date']}", f"- nvidia-smi: {machine['nvidia_smi']}",
             f"- versions: {machine['versions']}", "",
             "| step | status | seconds | figures |", "| --- | --- | --- | --- |"]
    for step in results:
        figures = "<br>".join(headline(step)[-6:]).replace("|", "/")
        lines.append(f"| {step['name']} | {status(step)} | {step['seconds']:.0f} | {figures} |")
    lines.append("")
    if train:
        mfu = "n/a (GPU not in train.py's peak table)" if train["mfu"] is None else f"{100 * train['mfu']:.1f}%"
        lines += [f"Training config/gpu_125m.py, {train['steps']} steps: median {train['tok/s']:,.0f} tok/s, "
                  f"MFU {mfu}, last loss {train['loss']:.3f} (random tokens: the loss means nothing).", ""]
    else:
        lines += ["Training config/gpu_125m.py wrote no log: see its output below.", ""]
    for step in results:
        tail = "\n".join(step["output"].strip().splitlines()[-60:])
        lines += [f"## {step['name']}: {status(step)}", "", f"`{step['cmd']}`", "", "```", tail, "```", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def machine_facts():
    import importlib.metadata
    import torch

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    smi = shutil.which("nvidia-smi")
    line = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
                           "--format=csv,noheader"], capture_output=True, text=True).stdout.strip() if smi else ""
    versions = (f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
                + ", ".join(f"{n} {version(n)}" for n in ("triton", "transformers", "numpy")))
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "nvidia_smi": line or "n/a", "versions": versions}


def main():
    report = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--report=")), "gpu_report.md")
    try:
        import torch
    except ImportError:
        sys.exit("error: .ci/gpu needs torch with CUDA, and this Python has no torch")
    if not torch.cuda.is_available():
        sys.exit("error: .ci/gpu checks a CUDA GPU, and torch sees none on this machine "
                 "(torch.cuda.is_available() is False). The CPU test suite is: bash .ci/run")
    if "--checks" in sys.argv[1:]:
        return device_checks()
    py, data_name = sys.executable, "gpu_check"
    data_dir = os.path.join(ROOT, "data", data_name)
    write_random_tokens(data_dir)
    out_dir = tempfile.mkdtemp(prefix="gpu-check-")
    results = []
    for name, cmd, limit in steps(py, data_name, out_dir):
        print(f"[.ci/gpu] {name} (at most {limit} s) ...", flush=True)
        results.append(run_step(name, cmd, limit))
        print(f"[.ci/gpu] {name}: {status(results[-1])}", flush=True)
    train = train_figures(os.path.join(out_dir, "log.jsonl"))
    write_report(report, machine_facts(), results, train)
    for folder in (out_dir, data_dir):
        shutil.rmtree(folder, ignore_errors=True)
    print(open(report).read())
    sys.exit(0 if all(s["rc"] == 0 for s in results) else 1)


if __name__ == "__main__":
    main()
