"""Shared test set-up. It stays at the repository root: pytest (prepend import mode) puts a conftest's folder on
sys.path, so the tests in tests/ import the modules (`import hyena`) as the scripts do, from any cwd."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they lose many times over to contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

