"""Tests of the op's hardening (issue 13): a stale compiled library, ``torch.fx`` tracing and the declared Python
version.
"""

import math
import os
import re
import sys
import warnings

import pytest
import torch

from prroi_d2 import PrRoIPool, PrRoIPool2D, _extension
from prroi_d2 import functional as prroi_functional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP = torch.ops.prroi_d2.prroi_pool2d
BACKWARD_OP = torch.ops.prroi_d2._prroi_pool2d_backward
LEVELS_OP = torch.ops.prroi_d2.prroi_pool2d_levels
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
HALVES = [torch.float16, torch.bfloat16]
F64, F32 = torch.float64, torch.float32


def features_of(shape, dtype=F64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64).to(dtype=dtype, device=device)


def boxes_of(count, batch, height, width, seed, dtype=F32, device="cpu"):
    """(count, 5) rois with fractional corners, from sub-pixel to larger than the map, some partly outside."""
    g = torch.Generator().manual_seed(seed)
    size = torch.exp(torch.empty(count, 2, dtype=F64).uniform_(math.log(0.4), math.log(1.5 * width), generator=g))
    corner = torch.rand(count, 2, generator=g, dtype=F64) * torch.tensor([width + 2.0, height + 2.0]) - 2.0
    index = torch.randint(0, batch, (count, 1), generator=g).to(F64)
    return torch.cat([index, corner, corner + size], dim=1).to(dtype=dtype, device=device)


def expanded(shape, dtype=F32, device="cpu"):
    """A zero-stride tensor of any size: no memory behind it."""
    return torch.zeros((1,) * len(shape), dtype=dtype, device=device).expand(shape)


# ---------------------------------------------------------------------------------------------------------------
# 5. A compiled library older than its sources
# ---------------------------------------------------------------------------------------------------------------
def _fake_checkout(tmp_path, checkout=True):
    package = tmp_path / "prroi_d2"
    (package / "csrc" / "cuda").mkdir(parents=True)
    library = package / "_C.cpython-test.so"
    library.write_bytes(b"")
    sources = [package / "csrc" / "prroi_pool.cpp", package / "csrc" / "cuda" / "kernel_common.cuh"]
    for s in sources:
        s.write_text("// source\n")
    if checkout:
        (tmp_path / "setup.py").write_text("# setup\n")
    for path in [library] + sources:
        os.utime(path, (1_000_000, 1_000_000))
    return package, library, sources


def test_stale_library_in_a_source_checkout_warns(tmp_path):
    package, library, sources = _fake_checkout(tmp_path)
    os.utime(sources[1], (1_000_100, 1_000_100))  # a header edited after the build
    with pytest.warns(UserWarning, match="older than its source") as record:
        _extension.warn_if_stale(str(library), str(package))
    message = str(record[0].message)
    assert str(library) in message and "kernel_common.cuh" in message
    assert "python setup.py build_ext --inplace" in message


def test_fresh_library_or_installed_package_is_quiet(tmp_path):
    package, library, sources = _fake_checkout(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _extension.warn_if_stale(str(library), str(package))  # built after every source
        os.utime(sources[0], (1_000_100, 1_000_100))
        (tmp_path / "setup.py").unlink()  # an installed package: its file times say nothing about builds
        _extension.warn_if_stale(str(library), str(package))


def test_load_checks_the_prebuilt_library(tmp_path, monkeypatch):
    """load() runs the check on the library it loads (the loading itself is stubbed: no build, no reload)."""
    package, library, sources = _fake_checkout(tmp_path)
    os.utime(sources[0], (1_000_100, 1_000_100))
    loaded = []
    monkeypatch.setattr(_extension, "_loaded", False)
    monkeypatch.setattr(_extension, "_PACKAGE_DIR", str(package))
    monkeypatch.setattr(_extension, "_prebuilt_library", lambda: str(library))
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    with pytest.warns(UserWarning, match="prroi_pool.cpp"):
        _extension.load()
    assert loaded == [str(library)]


# ---------------------------------------------------------------------------------------------------------------
# 6. torch.fx
# ---------------------------------------------------------------------------------------------------------------
class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.pool = PrRoIPool((3, 2), 0.5, aligned=True)
        self.pool2d = PrRoIPool2D(2, 2, 0.5)

    def forward(self, x, rois):
        y = self.conv(x)
        a = self.pool(y, rois).flatten(1)
        b = self.pool2d(y, rois).flatten(1)
        c = prroi_functional.prroi_pool(y, rois, 2, 0.5).flatten(1)
        d = prroi_functional.prroi_pool_levels([y], rois, torch.zeros_like(rois[:, 0]).long(), 1, [0.5]).flatten(1)
        return torch.cat([a, b, c, d], dim=1)


class _ListHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = PrRoIPool(2, 0.5)

    def forward(self, x, boxes0, boxes1):
        return self.pool(x, [boxes0, boxes1])


def test_fx_symbolic_trace_of_modules_and_functions():
    torch.manual_seed(17)
    head = _Head().double()
    x = features_of((2, 3, 10, 12), seed=18)
    rois = boxes_of(7, 2, 20, 24, seed=19, dtype=F64)
    traced = torch.fx.symbolic_trace(head)
    targets = {getattr(n.target, "__name__", None) for n in traced.graph.nodes if n.op == "call_function"}
    assert {"prroi_pool2d", "prroi_pool", "prroi_pool_levels"} <= targets
    assert torch.equal(traced(x, rois), head(x, rois))
    list_head = _ListHead()
    traced_list = torch.fx.symbolic_trace(list_head)
    boxes = [rois[:3, 1:], rois[3:, 1:]]
    assert torch.equal(traced_list(x, *boxes), list_head(x, *boxes))


# ---------------------------------------------------------------------------------------------------------------
# 7. Declared Python version
# ---------------------------------------------------------------------------------------------------------------
def test_declared_python_version_matches_what_the_code_needs():
    """The tests (itertools.pairwise, PEP 604 unions) and the package need Python 3.10; setup.py and ruff say so."""
    with open(os.path.join(REPO, "setup.py")) as f:
        setup_py = f.read()
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        pyproject = f.read()
    (requires,) = re.findall(r'python_requires=">=(\d+)\.(\d+)"', setup_py)
    (target,) = re.findall(r'target-version = "py(\d)(\d+)"', pyproject)
    assert tuple(map(int, requires)) == tuple(map(int, target)) == (3, 10)
    assert sys.version_info >= (3, 10)
