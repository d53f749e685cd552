"""Shared pytest setup: the repo root on sys.path (tests import the flat modules by name), and one
torch thread per test: tiny shapes run fastest on one thread, and on a shared 2-core machine
intra-op threads spin-wait on each other (a 2x32 matmul took 2 ms instead of 15 us)."""
import os, sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
