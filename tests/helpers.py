"""Shared test helpers. Not a test file: imported by tests/test_*.py (the repo root and tests/ are on
sys.path through tests/conftest.py and pytest's rootdir insertion)."""

import os
import runpy
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_inline(capsys, monkeypatch, *args, script="sample.py"):
    """A script of the repo run in this process (runpy: no second torch import), as if from the
    command line with args: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    rc = 0
    try:
        runpy.run_path(os.path.join(REPO, script), run_name="__main__")
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


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
