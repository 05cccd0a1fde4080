import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """These models are tiny: one thread is faster than two fighting other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
