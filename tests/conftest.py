"""Shared test fixtures."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test's tiny models on one CPU thread, then restore the setting.

    Matrices of 32 x 64 gain nothing from intra-op threads, and on a busy 2-core machine the
    threads' spin-waiting made tiny-model training ~100x slower (50 s instead of 0.5 s).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
