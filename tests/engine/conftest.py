"""Fixtures shared by the engine tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    # tiny matmuls: torch's thread pool only adds latency, and on a shared 2-core box its barriers
    # stall for tens of milliseconds per op when other processes hold the cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
