"""
The GPU check (.ci/gpu, .ci/gpu.py) where no GPU is: it refuses with one clear line; the report it
writes, from fake step results and a fake training log, carries the figures, the machine and every
failure; the random-token data set it trains on is what train.py expects, and its training command,
shrunk to a CPU size by later flags, runs and logs what the report reads.

    python -m pytest -q tests/test_gpu_check.py
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import REPO, run_script

spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(REPO, ".ci", "gpu.py"))
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, .ci/gpu runs the whole check")
def test_refuses_without_cuda(tmp_path):
    report = tmp_path / "report.md"
    p = subprocess.run(["bash", os.path.join(REPO, ".ci", "gpu"), f"--report={report}"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0
    assert "CUDA" in p.stderr and "bash .ci/run" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not report.exists()


def fake_step(name, output, rc=0, timed_out=False, seconds=12.0):
    return dict(name=name, cmd=f"python {name}", rc=rc, timed_out=timed_out, seconds=seconds, output=output)


def test_report_from_fake_figures(tmp_path):
    log = tmp_path / "log.jsonl"
    # 8 logged steps: the first 2 (a quarter: compilation, warm-up) are left out of the medians
    rows = [dict(step=10 * i, loss=9.0 - i, **{"tok/s": t, "mfu": m})
            for i, (t, m) in enumerate([(10, 0.01), (20, 0.02), (100, 0.30), (300, 0.40), (200, 0.35),
                                         (400, 0.45), (250, 0.38), (350, 0.42)])]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"step": 70, "val": 3.0}) + "\n")
    train = gpu_check.train_figures(str(log))
    assert train == {"steps": 71, "tok/s": 275.0, "mfu": pytest.approx(0.39), "loss": 2.0}
    assert gpu_check.train_figures(str(tmp_path / "missing.jsonl")) is None

    results = [
        fake_step("tests on CUDA", "....F..\nFAILED tests/test_x.py::test_y\n1 failed, 40 passed in 61.2s", rc=1),
        fake_step("bench.py kernels", "== kernels\n8192 triton  1.00 3.00 250.00 25.3%\n"
                  "        triton vs compiled reference, fwd+bwd: 6.10x faster (target >= 5.0x at 8K)\n"
                  "decode state update (128 MB fp32 state): triton 2900 GB/s = 60% of 4.80 TB/s HBM (target >= 50%)"),
        fake_step("grouped GEMM", "== grouped GEMM\ngrouped GEMM 610 TFLOP/s; one dense bf16 matmul 700 TFLOP/s"),
        fake_step("bench.py lowprec", "partial output", rc=None, timed_out=True, seconds=50.4),
    ]
    machine = {"date": "2026-12-05 12:00 UTC", "nvidia_smi": "NVIDIA H100 80GB HBM3, 580.159.04, 81559 MiB",
               "versions": "python 3.12.3, torch 2.11.0 (CUDA 13.0), triton 3.6.0"}
    path = tmp_path / "gpu_report.md"
    gpu_check.write_report(str(path), machine, results, train)
    text = path.read_text()
    assert "NVIDIA H100 80GB HBM3, 580.159.04" in text and "torch 2.11.0 (CUDA 13.0)" in text
    assert "| tests on CUDA | failed (exit 1) | 12 | 1 failed, 40 passed in 61.2s |" in text
    assert "6.10x faster (target >= 5.0x at 8K)" in text and "60% of 4.80 TB/s HBM (target >= 50%)" in text
    assert "grouped GEMM 610 TFLOP/s" in text
    assert "| bench.py lowprec | timed out after 50 s |" in text and "partial output" in text
    assert "median 275 tok/s, MFU 39.0%" in text and "FAILED tests/test_x.py::test_y" in text
    gpu_check.write_report(str(path), machine, results[:1], None)
    assert "wrote no log" in path.read_text()


def test_training_step_runs_shrunk_on_cpu(tmp_path):
    """The GPU run's data set and train.py command, with later flags shrinking the model and batch
    to a CPU size: train.py takes every flag, reads the data set, and logs what train_figures reads."""
    name = "gpu_check_test"
    data_dir = os.path.join(REPO, "data", name)
    try:
        gpu_check.write_random_tokens(data_dir)
        meta = json.load(open(os.path.join(data_dir, "meta.json")))
        train = np.fromfile(os.path.join(data_dir, "train.bin"), dtype=np.uint32)
        assert meta["eot"] == 50256 and train.max() <= 50256 and 1800 < (train == 50256).sum() < 20000
        cmd = dict((s[0], s[1]) for s in gpu_check.steps("python", name, str(tmp_path)))["train config/gpu_125m.py"]
        assert cmd[1] == "train.py"
        shrink = ["--device=cpu", "--dtype=float32", "--batch_size=2", "--block_size=64", "--d_model=64",
                  "--n_head=2", "--n_kv_head=1", "--head_dim=32", "--d_ff=64", "--mamba_heads=2", "--mamba_head_dim=32",
                  "--d_state=16", "--mamba_groups=1", "--chunk_size=16", "--max_iters=3", "--log_interval=1",
                  "--eval_interval=3"]
        p = run_script("train.py", *cmd[2:], *shrink)
        assert p.returncode == 0, p.stderr[-3000:]
        figures = gpu_check.train_figures(str(tmp_path / "log.jsonl"))
        assert figures["steps"] == 3 and figures["tok/s"] > 0
        assert figures["mfu"] is None  # a CPU has no entry in train.py's peak table
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def test_device_checks_run_in_the_interpreter():
    """The two device checks of .ci/gpu.py --checks at a CPU's size, in the Triton interpreter (a
    subprocess: the interpreter must be on before triton compiles anything): they run and pass, so
    the one GPU run does not find their bugs."""
    code = ("import sys, torch; sys.path[:0] = ['.ci', '.']; import gpu\n"
            "for ok, what in (gpu.check_ssd(torch.float32, 1e-3, 'cpu', T=80, H=4, P=16, G=2, N=16, Q=32),\n"
            "                 gpu.check_model('config/tiny_cpu.py', 'cpu', batch=2, T=48, chunk_size=16)):\n"
            "    print(ok, what)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("True ") for line in lines), p.stdout


def test_grouped_gemm_step_runs_in_the_interpreter():
    """The grouped GEMM step's own `python -c` code, its bench shrunk to a CPU's size and run in the
    Triton interpreter: the functions it names exist (they moved from bench.py to bench_kernels.py)
    and print the line the report reads."""
    cmd = dict((s[0], s[1]) for s in gpu_check.steps("python", "data", "out"))["grouped GEMM"]
    shrink = ("import functools, bench_kernels\n"
              "bench_kernels.bench_grouped_gemm = functools.partial(bench_kernels.bench_grouped_gemm, n_experts=4,\n"
              "    tokens=16, top_k=2, K=32, N=16, steps=1, device='cpu')\n")
    assert cmd[1] == "-c"
    p = subprocess.run([sys.executable, "-c", shrink + cmd[2]], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "grouped GEMM on cpu" in p.stdout and "TFLOP/s" in p.stdout, p.stdout
