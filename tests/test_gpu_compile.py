"""
Every Triton kernel compiled on this CPU for an H100 (sm_90) and, where this Triton can, a B200
(sm_100), at the shapes of config/gpu_125m.py, config/nano_h100.py, Nemotron-H 8B and 56B and
Nemotron 3 Nano, and held to what a GPU enforces before the first one is lent: shared memory within
a block's 227 KB, no register spills in the SSD and decode kernels (ALLOWED_SPILLS for the others),
and tl.dot on tensor cores (wgmma or mma on sm_90, tcgen05 or mma on sm_100).

How: each public op runs on meta tensors (shapes only: the host code chooses tiles and launches,
nothing is computed) while every _*_kernel of triton_ops, expert_gemm, quantize and asr is swapped for a
recorder of its launches; each distinct (kernel, argument types, constexprs, warps, stages) is then compiled by
triton.compile for the target, and ptxas -v reports its registers and spills. fp32 inputs are
checked as train.py runs them: TF32 dots (torch.backends.cuda.matmul.allow_tf32 on).

    python -m pytest -q tests/test_gpu_compile.py     (about 3 minutes on 2 cores)
    python tests/test_gpu_compile.py                  # the resource table (docs/triton.md), sm_90
"""
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import asr  # noqa: E402
import expert_gemm  # noqa: E402
import moe  # noqa: E402
import quantize  # noqa: E402
import triton_ops  # noqa: E402

MODULES = (triton_ops, expert_gemm, quantize, asr)  # where the kernels live

SHARED_LIMIT = 227 * 1024  # bytes of shared memory a block may use on an H100 and a B200
# spills allowed outside the SSD and decode kernels (bytes stored per thread), none so far
ALLOWED_SPILLS = {}
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
         torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8", torch.float8_e4m3fn: "fp8e4nv",
         torch.float8_e5m2: "fp8e5"}

# (H, P, G, N, Q) of the Mamba-2 layers: heads, head dim, groups, state, chunk
SSD_SHAPES = {"gpu_125m / nano_h100": (24, 64, 8, 128, 128), "Nemotron-H 8B": (128, 64, 8, 128, 128),
              "Nemotron-H 56B": (256, 64, 8, 256, 128), "Nemotron 3 Nano": (64, 64, 8, 128, 128),
              "chunk 256": (24, 64, 8, 128, 256), "chunk 256, state 256": (24, 64, 8, 256, 256)}

# -----------------------------------------------------------------------------
# capturing the launches


class Recorder:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **kw: self.log.append((self.name, args, kw))


def captured(run):
    """[(kernel name, args, kwargs)] of every kernel launch that run() makes."""
    log = []
    names = [(m, n) for m in MODULES for n in dir(m) if n.startswith("_") and n.endswith("_kernel")]
    saved = {(m, n): getattr(m, n) for m, n in names}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py trains
        for m, n in names:
            setattr(m, n, Recorder(n, log))
        run()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for (m, n), k in saved.items():
            setattr(m, n, k)
    return log


def kernel_of(name):
    return next(getattr(m, name) for m in MODULES if hasattr(m, name))


def job(name, args, kw):
    """What triton.compile needs: (kernel name, signature, constexprs, options), all plain values."""
    kernel = kernel_of(name)
    values = dict(zip([p.name for p in kernel.params], args))
    values.update({k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")})
    sig, const = {}, {}
    for p in kernel.params:
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name], const[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + TYPES[v.dtype]
        else:
            sig[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
    options = tuple(sorted((k, kw[k]) for k in ("num_warps", "num_stages") if k in kw))
    return name, tuple(sig.items()), tuple(const.items()), options


def meta(*shape, dtype=torch.float32, grad=True):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


def ssd_launches(H, P, G, N, Q, dtype, doc=True, T=512):
    """The SSD's forward and backward at these sizes (batch and length do not change any kernel)."""
    x, dt, A, B, C, D = meta(1, T, H, P, dtype=dtype), meta(1, T, H), meta(H), meta(1, T, G, N, dtype=dtype), \
        meta(1, T, G, N, dtype=dtype), meta(H)
    seq_idx = meta(1, T, dtype=torch.int32, grad=False) if doc else None

    def run():
        y, h = triton_ops.ssd(x, dt, A, B, C, Q, D, None, seq_idx)
        (y.float().sum() + h.sum()).backward()
    return captured(run)


def decode_launches(H, P, G, N, dtype, K):
    B, conv = 8, H * P + 2 * G * N
    return captured(lambda: (
        triton_ops.ssd_update(meta(B, H, P, N, grad=False), meta(B, K, H, P, dtype=dtype, grad=False),
                              meta(B, K, H, grad=False), meta(H, grad=False), meta(B, K, G, N, dtype=dtype, grad=False),
                              meta(B, K, G, N, dtype=dtype, grad=False), meta(H, grad=False), save_states=K > 1),
        triton_ops.conv_update(meta(B, conv, 3, dtype=dtype, grad=False), meta(B, K, conv, dtype=dtype, grad=False),
                               meta(conv, 1, 4, dtype=dtype, grad=False), meta(conv, dtype=dtype, grad=False))))


def moe_launches(dtype, E=128, K=2688, N=1856, rows=4096):
    x, w = meta(rows, K, dtype=dtype), meta(E, K, N, dtype=dtype)
    offs = meta(E, dtype=torch.int32, grad=False)
    return captured(lambda: moe.grouped_mm_triton(x, w, offs).sum().backward())


def quantizer_launches():
    x = meta(4096, 4096, dtype=torch.bfloat16, grad=False)

    def run():
        for fmt, block in (("e4m3", (1, 128)), ("e5m2", (128, 128)), ("mxfp8", (1, 32)), ("nvfp4", (1, 16)),
                           ("nvfp4", (16, 16))):
            g = meta(2, grad=False) if fmt == "nvfp4" else None
            quantize._quantize_blocks(x, fmt, block, g)
            quantize._quantize_blocks(x.t(), fmt, block, g, seed=7 if fmt == "nvfp4" else None)
        quantize._quantize_tensor(x, meta((), grad=False), "e4m3")
        quantize.uniform(7, 64, 64, device="meta")
    return captured(run)


def rnnt_launches(B=8, T=500, U=255):
    """asr's RNN-T kernel at 500 frames and 255 labels (a lane block of 256)."""
    lattice = meta(B, T, U + 1, grad=False), meta(B, T, U, grad=False)
    lengths = torch.full((B,), T, dtype=torch.int32), torch.full((B,), U, dtype=torch.int32)
    return captured(lambda: asr._alpha_beta_triton(*lattice, *lengths))


LOWPREC_RECIPES = [("fp8", "tensorwise"), ("fp8", "delayed"), ("fp8", "blockwise"), ("mxfp8", None), ("nvfp4", None)]


def lowprec_expert_launches(fmt, fp8_recipe, E=128, K=2688, N=1856, rows=4096):
    """lowprec.LowPrecGroupedMM forward and backward: on meta tensors any host sync (.tolist(),
    .item(), int() of a device tensor) raises, so getting through proves there is none."""
    import lowprec
    recipe = lowprec.Recipe(fmt, fp8_recipe or "tensorwise", H=quantize.hadamard16(torch.ones(16)).to("meta"))
    x, w, offs = meta(rows, K), meta(E, N, K), meta(E, dtype=torch.int32, grad=False)
    return captured(lambda: lowprec.LowPrecGroupedMM.apply(x, w, offs, recipe, "up_proj").sum().backward())


@pytest.mark.parametrize("fmt,fp8_recipe", LOWPREC_RECIPES)
def test_lowprec_experts_without_host_sync(fmt, fp8_recipe):
    names = {launch[0] for launch in lowprec_expert_launches(fmt, fp8_recipe)}
    assert {"_grouped_mm_kernel", "_grouped_mm_dw_kernel"} <= names, names  # the GEMMs on the kernels


def all_jobs():
    """{job: [where it comes from]} for every launch of the shapes above."""
    found = {}

    def add(launches, where):
        for launch in launches:
            found.setdefault(job(*launch), []).append(where)
    for name, (H, P, G, N, Q) in SSD_SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            add(ssd_launches(H, P, G, N, Q, dtype), f"ssd {name} {TYPES[dtype]}")
    add(ssd_launches(*SSD_SHAPES["gpu_125m / nano_h100"], torch.bfloat16, doc=False), "ssd gpu_125m bf16 no documents")
    for N in (128, 256):
        for dtype in (torch.float32, torch.bfloat16):
            for K in (1, 8):
                add(decode_launches(128, 64, 8, N, dtype, K), f"decode state {N} {TYPES[dtype]} k={K}")
    for dtype in (torch.float32, torch.bfloat16):
        add(moe_launches(dtype), f"grouped GEMM {TYPES[dtype]}")
    add(quantizer_launches(), "quantizers")
    for fmt, fp8_recipe in LOWPREC_RECIPES:
        add(lowprec_expert_launches(fmt, fp8_recipe), f"low-precision experts {fmt} {fp8_recipe or ''}")
    add(rnnt_launches(), "RNN-T loss")
    return found

# -----------------------------------------------------------------------------
# compiling


def compile_job(j, arch=90):
    """Shared bytes, registers, spill bytes and the tensor-core instruction of one compiled job."""
    name, sig, const, options = j
    src = ASTSource(fn=kernel_of(name), signature=dict(sig), constexprs=dict(const))
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(options))
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:  # triton's own ptxas and flags, with -v
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}a",
                              os.path.join(d, "k.ptx"), "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log)[1])
    spills = int(re.search(r"(\d+) bytes spill stores", log)[1])
    tc = next((i for i in ("tcgen05", "wgmma", "mma.sync") if i in ptx), None)
    return dict(shared=k.metadata.shared, regs=regs, spills=spills, tensor_cores=tc,
                warps=k.metadata.num_warps, stages=k.metadata.num_stages)


def compile_all(jobs, arch):
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip(jobs, pool.map(compile_job, jobs, [arch] * len(jobs))))


def problems(j, r):
    name, sig, const, _ = j
    const = dict(const)
    out = []
    if r["shared"] > SHARED_LIMIT:
        out.append(f"shared memory {r['shared'] / 1024:.1f} KB > {SHARED_LIMIT / 1024:.0f} KB")
    if r["spills"] > ALLOWED_SPILLS.get(name, 0):
        out.append(f"{r['spills']} bytes of register spills")
    if const.get("DOT") in ("bf16", "tf32") and r["tensor_cores"] is None:
        out.append("tl.dot not on tensor cores")
    return out


@pytest.fixture(scope="module")
def jobs():
    return all_jobs()


@pytest.mark.parametrize("arch", [90, 100])
def test_every_kernel_fits(jobs, arch):
    """sm_90 for every job; sm_100 for the bf16 SSD and the kernels outside the SSD (fp32 SSD jobs
    are the same code at other types: compiling them twice would double the test's time)."""
    todo = list(jobs) if arch == 90 else [j for j in jobs if not any("fp32" in w and "ssd" in w for w in jobs[j])]
    results = compile_all(todo, arch)
    bad = {f"{j[0]} {dict(j[2])} {dict(j[3])} ({'; '.join(jobs[j][:2])})": p
           for j, r in results.items() if (p := problems(j, r))}
    assert not bad, "\n".join(f"{k}: {', '.join(v)}" for k, v in bad.items())
    names = {j[0] for j in results}
    assert {"_chunk_scan_bwd_dx_kernel", "_ssd_update_kernel", "_grouped_mm_dw_kernel",
            "_quantize_blocks_kernel", "_rnnt_kernel"} <= names, names  # the capture reached every family


def table():
    """Markdown rows: each kernel at gpu_125m's shapes, sm_90."""
    jobs = {}
    for dtype in (torch.bfloat16, torch.float32):
        for launch in ssd_launches(*SSD_SHAPES["gpu_125m / nano_h100"], dtype):
            jobs.setdefault(job(*launch), TYPES[dtype])
    for launch in decode_launches(24, 64, 8, 128, torch.bfloat16, 1):
        jobs.setdefault(job(*launch), "bf16")
    results = compile_all(list(jobs), 90)
    rows = ["| kernel | inputs | tiles | warps, stages | shared KB | registers | spills | tensor cores |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for j, r in results.items():
        tiles = ", ".join(f"{k}={v}" for k, v in j[2] if k.startswith("BLOCK") or k == "TO_END")
        rows.append(f"| `{j[0][1:-7]}` | {jobs[j]} | {tiles} | {r['warps']}, {r['stages']} | "
                    f"{r['shared'] / 1024:.1f} | {r['regs']} | {r['spills']} | {r['tensor_cores'] or '-'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
