"""Shared test set-up. It stays at the repository root: pytest (prepend import mode) puts a conftest's folder on
sys.path, so the tests in tests/ import the modules (`import hyena`) as the scripts do, from any cwd."""
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def pytest_collection_finish(session):
    """The Triton-interpreter scripts of the selected tests' modules start now, in the background
    (tests/triton_interpreter.py: start)."""
    interpreter = sys.modules.get("triton_interpreter")  # imported by the test modules that register scripts
    if interpreter and any(str(item.path.resolve()) in interpreter.MODULES for item in session.items):
        interpreter.start()


def pytest_sessionfinish(session):
    if "triton_interpreter" in sys.modules:
        sys.modules["triton_interpreter"].stop()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they lose many times over to contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



class NoHostReads(TorchDispatchMode):
    """Fails on a read of a device value back to the host (.item(), a tensor's bool): what a CUDA graph cannot
    capture. Also imported by the Triton-interpreter scripts (tests/test_step.py), which run from this folder."""
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func not in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default), func
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_host_reads():
    """NoHostReads, the context manager: `with no_host_reads(): ...`."""
    return NoHostReads
