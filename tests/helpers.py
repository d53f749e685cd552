"""Shared test helpers. Not a test file: imported by tests/test_*.py (the repo root and tests/ are on
sys.path through tests/conftest.py and pytest's rootdir insertion)."""

import io
import os
import runpy
import subprocess
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args):
    """`python script *args` from the repo root, run in this process (runpy): what a subprocess
    would return (exit code, stdout, stderr, a traceback on stderr for an uncaught exception) without
    a second torch import, 3-5 s less per run on a 2-core CPU. As the subprocesses it replaces (run
    with OMP_NUM_THREADS=1): one thread. The working directory, sys.argv, the thread count and
    torch's RNG state are restored afterwards. Not for torchrun: that needs processes."""
    saved = sys.argv, os.getcwd(), torch.get_num_threads(), torch.get_rng_state()
    out, err, rc = io.StringIO(), io.StringIO(), 0
    try:
        sys.argv = [script, *args]
        os.chdir(REPO)
        torch.set_num_threads(1)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                runpy.run_path(os.path.join(REPO, script), run_name="__main__")
            except SystemExit as e:  # sys.exit(code) or sys.exit("message"), as the interpreter reports them
                rc = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                rc = 1
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        torch.set_num_threads(saved[2])
        torch.set_rng_state(saved[3])
    return subprocess.CompletedProcess([script, *args], rc, out.getvalue(), err.getvalue())


def assert_close(a, b, name, atol, rtol=0.0):
    """Assert |a - b| <= atol + rtol * |b| elementwise; on failure report the max and mean absolute
    difference, where the worst element sits, and the shapes, so a tolerance miss is diagnosable."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.equal(a64.isnan(), b64.isnan()), f"{name}: NaNs in different places"
    diff = (a64 - b64).abs()
    diff = torch.where((a64 == b64) | a64.isnan(), torch.zeros_like(diff), diff)  # equal infs, NaN pairs
    bad = diff > atol + rtol * b64.abs()
    if bad.any():
        worst = int((diff - rtol * b64.abs()).argmax())  # the element furthest out of tolerance
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{diff.numel()} elements out of tolerance (atol={atol:g}, "
            f"rtol={rtol:g}); max abs diff {diff.max().item():.3e}, mean abs diff "
            f"{diff.mean().item():.3e}, max |b| {b64.abs().max().item():.3e}; worst at {where}: "
            f"{a64.flatten()[worst].item():.8g} vs {b64.flatten()[worst].item():.8g}")
