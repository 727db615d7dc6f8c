"""An autouse fixture for test modules that run tiny networks: one torch thread while the module runs
(its module-scoped fixtures included).

Import it into a test module (`from tests.torch_threads import one_torch_thread`). On the 2 shared cores of
the CI machine, a tiny network's forward pass took 150 ms with torch's default 2 threads (they spin while
other processes hold the cores) and 1.3 ms with one.
"""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
