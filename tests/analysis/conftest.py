"""Analysis tests run their small tensors on one thread: on a shared, busy machine two OpenMP threads make
microsecond ops take tens of milliseconds (measured), which says nothing about the code under test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
