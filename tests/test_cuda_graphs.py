"""``CUDAGraphCache``: eager on CPU, captured on the second sighting of a signature on CUDA, results equal to the
function run eagerly (gradients taken inside included), LRU eviction, failed captures fall back to eager."""

import copy
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from prroi_d2.modeling.cuda_graphs import CUDAGraphCache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ascent(x, w):
    """Two steps of gradient ascent on sum(tanh(x @ w)) with respect to x (autograd inside: as refinement does)."""
    with torch.enable_grad():
        for _ in range(2):
            point = x.detach().requires_grad_(True)
            value = torch.tanh(point @ w).sum(dim=1)
            (grad,) = torch.autograd.grad(value.sum(), point)
            x = point.detach() + 0.1 * grad
    return x, value.detach()


def test_bad_max_graphs_is_named():
    with pytest.raises(ValueError, match="max_graphs"):
        CUDAGraphCache(-1)


def test_cpu_tensors_run_eagerly_and_never_capture():
    cache = CUDAGraphCache(4)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 3, generator=g), torch.randn(3, 2, generator=g)
    for _ in range(3):
        out = cache(_ascent, [x, w], key="ascent")
        for a, b in zip(out, _ascent(x, w)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(cache) == 0


def test_copies_start_empty_and_keep_their_size():
    cache = CUDAGraphCache(3)
    for other in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert other.max_graphs == 3 and len(other) == 0


@pytest.mark.cuda
def test_cuda_capture_on_second_call_matches_eager_and_evicts_lru():
    cache = CUDAGraphCache(1)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 32, device="cuda", generator=g)
    w = torch.randn(32, 8, device="cuda", generator=g)
    expected = _ascent(x, w)
    x2 = x * 2.0
    with torch.inference_mode():  # as Detectron2 evaluates
        first = cache(_ascent, [x, w], key="ascent")
        assert len(cache) == 0  # seen once: eager
        second = cache(_ascent, [x, w], key="ascent")
        assert len(cache) == 1
        third = cache(_ascent, [x2, w], key="ascent")  # same signature, new values: the graph reads the new input
        fourth = cache(_ascent, [x * 3.0, w], key="ascent")  # an inference tensor as input
    for out in (first, second):
        for a, b in zip(out, expected):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(third, _ascent(x2, w)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(fourth, _ascent(x * 3.0, w)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert second[0].data_ptr() != third[0].data_ptr()  # outputs are clones, not the graph's buffers
    # Another shape, twice: captured, and the only graph kept (max_graphs 1) is now this one.
    y = x[:16].clone()
    cache(_ascent, [y, w], key="ascent")
    cache(_ascent, [y, w], key="ascent")
    assert len(cache) == 1
    for a, b in zip(cache(_ascent, [y, w], key="ascent"), _ascent(y, w)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
def test_cuda_capture_failure_falls_back_to_eager():
    # In a process of its own: a failed capture can leave torch's CUDA random generator unusable (torch 2.11 raises
    # "Offset increment outside graph capture" at the next random op), which must not leak into other tests.
    code = textwrap.dedent(
        """
        import warnings
        import torch
        from prroi_d2.modeling.cuda_graphs import CUDAGraphCache

        def syncs(x):
            return (x * float(x.sum()),)  # a host synchronisation: not capturable

        cache = CUDAGraphCache(2)
        x = torch.arange(6.0, device="cuda")
        cache(syncs, [x], key="syncs")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = cache(syncs, [x], key="syncs")
            again = cache(syncs, [x], key="syncs")
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "CUDA graph capture failed" in messages[0], messages
        torch.testing.assert_close(out[0], x * 15.0)
        torch.testing.assert_close(again[0], x * 15.0)
        assert len(cache) == 0
        print("fallback ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "fallback ok" in result.stdout, result.stderr[-3000:]
