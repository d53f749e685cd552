"""Shared pytest setup: the repo root on sys.path (tests import the flat modules by name), the
versions of the packages the results hang on printed first (CI installs the newest releases, so a
break shows which release brought it), and one torch thread per test: tiny shapes run fastest on
one thread, and on a shared 2-core machine intra-op threads spin-wait on each other (a 2x32 matmul
took 2 ms instead of 15 us)."""
import importlib.metadata, os, sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_sessionstart(session):
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    line = ", ".join(f"{name} {version(name)}" for name in ("torch", "triton", "transformers", "numpy"))
    session.config.pluginmanager.get_plugin("terminalreporter").write_line(f"versions: {line}")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
