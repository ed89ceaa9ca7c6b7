import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and the CUDA kernels; skipped when no GPU is visible")
    config.addinivalue_line(
        "markers",
        "slow(seconds=10): a real training of about that many seconds on a 2-core machine; files run slowest first "
        "(-m 'not slow' leaves them out)",
    )


def pytest_collection_modifyitems(config, items):
    # Files with slow tests first, the slowest first (stable otherwise): under `-n 2 --dist loadfile
    # --no-loadscope-reorder` (the Makefile: files in this order) a long file that started last would keep one
    # worker busy after the other ran out of files.
    seconds = {}
    for item in items:
        mark = item.get_closest_marker("slow")
        if mark is not None:
            seconds[item.path] = max(seconds.get(item.path, 0), mark.kwargs.get("seconds", 10))
    items.sort(key=lambda item: -seconds.get(item.path, 0))
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="no CUDA GPU visible")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip_cuda)


def pytest_sessionstart(session):
    """Under pytest-xdist (``-n 2`` in the Makefile) each worker and the processes its tests start compute on one
    thread: two workers share the machine's cores instead of oversubscribing them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ["MKL_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
