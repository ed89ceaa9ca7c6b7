"""Tests of the op's hardening (issue 13): size limits, ``spatial_scale`` as the kernels use it, float32 boxes with
float16/bfloat16 features, the coordinate-gradient dispatch by compiled architecture, a stale compiled library,
``torch.fx`` tracing and the declared Python version.

Values are checked against the float64 reference of ``reference.py`` on the inputs as the op sees them (features
rounded to their dtype, boxes in float32). Tests marked ``cuda`` run only with a GPU.
"""

import ctypes
import json
import math
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from reference import forward_backward, random_features, reference_prroi_pool

from prroi_d2 import PrRoIPool, PrRoIPool2D, _extension, prroi_pool2d, prroi_pool_levels
from prroi_d2 import functional as prroi_functional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP = torch.ops.prroi_d2.prroi_pool2d
BACKWARD_OP = torch.ops.prroi_d2._prroi_pool2d_backward
LEVELS_OP = torch.ops.prroi_d2.prroi_pool2d_levels
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
HALVES = [torch.float16, torch.bfloat16]
F64, F32 = torch.float64, torch.float32


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
# 1. Sizes the kernels index with 32-bit ints are bounded before anything is allocated
# ---------------------------------------------------------------------------------------------------------------
# name -> (call, pattern of the ValueError). `f`, `r`, `lv` make a small map, one box and its level on `dev`.
LIMIT_CASES = {
    "bins_46341_squared": ("OP(f(), r(), 46341, 46341, 1.0, False)", r"pooled_height x pooled_width"),
    "pooled_height_2_32_plus_1": ("OP(f(), r(), 2**32 + 1, 1, 1.0, False)", r"pooled_height"),
    "pooled_width_2_32_plus_1": ("OP(f(), r(), 1, 2**32 + 1, 1.0, False)", r"pooled_width"),
    "channels_times_bins": ("OP(big((1, 2**16, 4, 4)), r(), 256, 256, 1.0, False)", r"channels x pooled_height"),
    "channels": ("OP(big((1, 2**30 + 1, 1, 1)), r(), 1, 1, 1.0, False)", r"features channels"),
    "height": ("OP(big((1, 1, 2**30 + 1, 4)), r(), 1, 1, 1.0, False)", r"features height"),
    "width": ("OP(big((1, 1, 4, 2**30 + 1)), r(), 1, 1, 1.0, False)", r"features width"),
    "batch": ("OP(big((2**30 + 1, 1, 1, 1)), r(), 1, 1, 1.0, False)", r"features batch size"),
    "backward_bins": (
        "BACKWARD_OP(big((1, 1, 46341, 46341)), f(), r(), 46341, 46341, 1.0, False, True, True)",
        r"pooled_height x pooled_width",
    ),
    "levels_bins": ("LEVELS_OP([f(), f()], r(), lv(), 46341, 46341, [1.0, 0.5], False)", r"pooled_height x"),
    "levels_width": (
        "LEVELS_OP([f(), big((1, 1, 4, 2**30 + 1))], r(), lv(), 2, 2, [1.0, 0.5], False)",
        r"features width",
    ),
}

_LIMIT_SCRIPT = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # a call that allocates instead of raising fails
import torch, prroi_d2
OP, BACKWARD_OP = torch.ops.prroi_d2.prroi_pool2d, torch.ops.prroi_d2._prroi_pool2d_backward
LEVELS_OP = torch.ops.prroi_d2.prroi_pool2d_levels
dev = "cpu"
f = lambda: torch.ones(1, 1, 4, 4)
r = lambda: torch.tensor([[0.0, 0.5, 0.5, 2.5, 2.5]])
lv = lambda: torch.tensor([1])
big = lambda shape: torch.zeros((1,) * len(shape)).expand(shape)
for name, call in json.loads(sys.argv[1]).items():
    try:
        eval(call)
        result = "no error"
    except Exception as e:
        result = type(e).__name__ + ": " + str(e).splitlines()[0]
    print(json.dumps([name, result]), flush=True)
"""


@pytest.fixture(scope="module")
def cpu_limit_results():
    """Every CPU case in one child process (one import of torch) under a 6 GiB address-space limit: a regression
    that allocates fails, one that crashes leaves its case and the later ones without a result."""
    calls = {name: call for name, (call, _) in LIMIT_CASES.items()}
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", _LIMIT_SCRIPT, json.dumps(calls)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    results = dict(json.loads(line) for line in proc.stdout.splitlines() if line.startswith("["))
    return results, proc.stderr[-2000:]


@pytest.mark.parametrize("name", sorted(LIMIT_CASES))
def test_cpu_sizes_beyond_the_limits_raise_before_allocating(cpu_limit_results, name):
    results, stderr = cpu_limit_results
    assert name in results, "the child process died before this case: " + stderr
    assert re.match(r"ValueError: .*" + LIMIT_CASES[name][1], results[name]), results[name]


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(LIMIT_CASES))
def test_cuda_sizes_beyond_the_limits_raise_before_allocating(name):
    dev = "cuda"
    f = lambda: torch.ones(1, 1, 4, 4, device=dev)  # noqa: F841  (names of the case's expression)
    r = lambda: torch.tensor([[0.0, 0.5, 0.5, 2.5, 2.5]], device=dev)  # noqa: F841
    lv = lambda: torch.tensor([1], device=dev)  # noqa: F841
    big = lambda shape: expanded(shape, device=dev)  # noqa: F841
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.max_memory_allocated()
    with pytest.raises(ValueError, match=LIMIT_CASES[name][1]):
        eval(LIMIT_CASES[name][0])
    assert torch.cuda.max_memory_allocated() - before < (1 << 20)


@pytest.mark.parametrize("name", sorted(LIMIT_CASES))
def test_fake_kernels_bound_the_sizes_too(name):
    """The fake (meta) kernels that torch.compile traces with raise the same ValueError."""
    f = lambda: torch.empty(1, 1, 4, 4, device="meta")  # noqa: F841
    r = lambda: torch.empty(1, 5, device="meta")  # noqa: F841
    lv = lambda: torch.empty(1, dtype=torch.long, device="meta")  # noqa: F841
    big = lambda shape: torch.empty(shape, device="meta")  # noqa: F841
    with pytest.raises(ValueError, match=LIMIT_CASES[name][1]):
        eval(LIMIT_CASES[name][0])


@pytest.mark.parametrize("device", DEVICES)
def test_sizes_at_the_limits_work(device):
    """The limits themselves are allowed (with no channels or no boxes, so that nothing large is allocated)."""
    rois = torch.tensor([[0.0, 0.5, 0.5, 2.5, 2.5]], device=device)
    out = OP(torch.zeros(1, 0, 4, 4, device=device), rois, 1 << 15, 1 << 15, 1.0, False)
    assert out.shape == (1, 0, 1 << 15, 1 << 15)
    out = OP(expanded((1, 1 << 10, 1, 1), device=device), rois[:0], 1 << 10, 1 << 10, 1.0, False)
    assert out.shape == (0, 1 << 10, 1 << 10, 1 << 10)


# ---------------------------------------------------------------------------------------------------------------
# 2. spatial_scale is checked in the type the kernels use
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32] + HALVES)
@pytest.mark.parametrize("scale", [1e300, 1e-46, -1e-46, 3.5e38])
def test_spatial_scale_out_of_float32_range_raises(device, dtype, scale):
    assert not (math.isfinite(ctypes.c_float(scale).value) and ctypes.c_float(scale).value > 0)
    features = random_features((1, 2, 5, 5), dtype=dtype, device=device)
    rois = torch.tensor([[0.0, 0.5, 0.5, 2.5, 2.5]], device=device)
    with pytest.raises(ValueError, match=r"spatial_scale must be finite and > 0 in float32.*got"):
        prroi_pool2d(features, rois, 2, 2, scale)
    with pytest.raises(ValueError, match=r"spatial_scales\[1\] must be finite and > 0 in float32"):
        prroi_pool_levels([features, features], rois, torch.tensor([0], device=device), 2, [0.5, scale])
    meta = (features.to("meta"), rois.to("meta"))
    with pytest.raises(ValueError, match=r"spatial_scale must be finite and > 0 in float32"):
        OP(*meta, 2, 2, scale, False)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_features_keep_float64_scales(device):
    """float64 features pool with float64 boxes and scales: 1e-46 is a usable scale there."""
    features = torch.ones(1, 1, 5, 5, dtype=F64, device=device)
    rois = torch.tensor([[0.0, 1e46, 1e46, 3e46, 3e46]], dtype=F64, device=device)
    out = prroi_pool2d(features, rois, 2, 2, 1e-46)
    torch.testing.assert_close(out, torch.ones_like(out), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# 4. float16/bfloat16 features with float32 boxes
# ---------------------------------------------------------------------------------------------------------------
HALF_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # output rounding (2^-11, 2^-8) plus float32 accumulation


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("aligned", [False, True])
def test_half_features_with_float32_rois_match_reference(device, dtype, aligned):
    """Forward against the float64 reference of the rounded features and the float32 boxes (relative tolerance
    HALF_TOL of the largest value); gradients against the float64 op on the same inputs."""
    features = random_features((2, 12, 13, 18), dtype=dtype, device=device, seed=1)
    rois = boxes_of(40, 2, 13, 18, seed=2, device=device) * torch.tensor([1, 2, 2, 2, 2.0], device=device)
    grad_out = random_features((40, 12, 3, 4), dtype=dtype, device=device, seed=3)
    fn = lambda f, r: prroi_pool2d(f, r, 3, 4, 0.5, aligned)
    out, gf, gr = forward_backward(fn, features, rois, grad_out)
    assert out.dtype == dtype and gf.dtype == dtype and gr.dtype == F32
    expected = reference_prroi_pool(features.double(), rois.double(), 3, 4, 0.5, aligned)
    rel = HALF_TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), expected, rtol=rel, atol=rel * expected.abs().max().item())
    _, want_gf, want_gr = forward_backward(fn, features.double(), rois.double(), grad_out.double())
    torch.testing.assert_close(gf.double(), want_gf, rtol=2 * rel, atol=2 * rel * want_gf.abs().max().item())
    # the coordinate gradient is accumulated in float32 from float32 boxes: float32 accuracy but for the features'
    # and output gradient's rounding, which enter linearly (compared in norm: it jumps where bin edges cross pixels)
    assert torch.linalg.norm(gr.double() - want_gr) <= 2 * rel * torch.linalg.norm(want_gr)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALVES)
def test_half_features_keep_box_coordinates(device, dtype):
    """Issue 13's example: a box at x = 1300.7 .. 1302.7 over a map whose value is x - 1300 pools to 1.7 (its
    centre); rounded to float16 the box would start at 1301 (pooling 2.0), in bfloat16 at 1304 (zero width)."""
    columns = torch.arange(1310, dtype=F64) - 1300
    features = columns.expand(1, 2, 3, 1310).to(dtype=dtype, device=device).contiguous()
    rois = torch.tensor([[0.0, 1300.7, 0.5, 1302.7, 1.5]], device=device, requires_grad=True)
    out = prroi_pool2d(features, rois, 1, 1, 1.0)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float().cpu(), torch.full((1, 2, 1, 1), 1.7), rtol=0, atol=1e-2)
    out.sum().backward()
    assert rois.grad.dtype == F32
    # d out / d x0 = d out / d x1 = 1/2 on a linear ramp of slope 1, for each of the 2 channels
    torch.testing.assert_close(rois.grad.cpu(), torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]]), rtol=0, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_features_pool_batch_index_257(device):
    """Issue 13's example: batch index 257 is exact in float32 boxes (bfloat16 would round it to 256)."""
    values = torch.arange(258, dtype=F32) % 100  # image n holds n % 100 everywhere (exact in bfloat16)
    features = values.view(258, 1, 1, 1).expand(258, 1, 4, 4).to(torch.bfloat16).to(device)
    rois = torch.tensor([[257.0, 0.0, 0.0, 3.0, 3.0], [256.0, 0.0, 0.0, 3.0, 3.0]], device=device)
    out = prroi_pool2d(features, rois, 2, 2, 1.0)
    assert out.dtype == torch.bfloat16
    assert out[0].float().cpu().unique().tolist() == [57.0] and out[1].float().cpu().unique().tolist() == [56.0]


@pytest.mark.parametrize("device", DEVICES)
def test_float64_rois_with_float32_features(device):
    """float64 boxes with float32 features are used as float32 boxes; their gradient comes back in float64."""
    features = random_features((2, 5, 9, 11), dtype=F32, device=device, seed=4)
    rois64 = boxes_of(12, 2, 9, 11, seed=5, dtype=F64, device=device)
    rois32 = rois64.float()
    grad_out = random_features((12, 5, 2, 3), dtype=F32, device=device, seed=6)
    fn = lambda f, r: prroi_pool2d(f, r, 2, 3, 1.0, True)
    out64, gf64, gr64 = forward_backward(fn, features, rois64, grad_out)
    out32, gf32, gr32 = forward_backward(fn, features, rois32, grad_out)
    assert out64.dtype == F32 and gf64.dtype == F32 and gr64.dtype == F64
    assert torch.equal(out64, out32) and torch.equal(gf64, gf32) and torch.equal(gr64, gr32.double())


@pytest.mark.parametrize("device", DEVICES)
def test_levels_half_features_with_float32_rois(device):
    """The multi-level op takes the same dtype pairs and pools every box as the single-level op does."""
    scales = [1 / 4, 1 / 8]
    features = [
        random_features((2, 6, 20, 26), torch.bfloat16, device, 7),
        random_features((2, 6, 10, 13), torch.bfloat16, device, 8),
    ]
    rois = boxes_of(30, 2, 80, 104, seed=9, device=device)
    levels = torch.randint(0, 2, (30,), generator=torch.Generator().manual_seed(10)).to(device)
    features = [f.requires_grad_(True) for f in features]
    rois.requires_grad_(True)
    out = prroi_pool_levels(features, rois, levels, 3, scales, True)
    assert out.dtype == torch.bfloat16
    single = torch.cat(
        [prroi_pool2d(features[lv], rois[k : k + 1], 3, 3, scales[lv], True) for k, lv in enumerate(levels.tolist())]
    )
    torch.testing.assert_close(out, single, rtol=1e-2, atol=1e-2 * single.abs().max().item())
    out.float().sum().backward()
    assert rois.grad.dtype == F32 and all(f.grad.dtype == torch.bfloat16 for f in features)


BAD_DTYPE_PAIRS = [
    (F32, torch.float16),  # half rois with float32 features
    (F64, F32),  # float32 rois with float64 features
    (torch.float16, torch.bfloat16),
    (torch.bfloat16, F64),
    (F32, torch.int64),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("features_dtype, rois_dtype", BAD_DTYPE_PAIRS)
def test_other_dtype_pairs_raise_type_error(device, features_dtype, rois_dtype):
    features = torch.ones(1, 1, 4, 4, dtype=features_dtype, device=device)
    rois = torch.tensor([[0, 0.5, 0.5, 2.5, 2.5]], device=device).to(rois_dtype)
    for call in (
        lambda: prroi_pool2d(features, rois, 2, 2, 1.0),
        lambda: prroi_pool_levels([features], rois, torch.zeros(1, dtype=torch.long, device=device), 2, [1.0]),
        lambda: OP(features.to("meta"), rois.to("meta"), 2, 2, 1.0, False),
    ):
        with pytest.raises(TypeError, match=r"rois dtype .* does not go with features dtype"):
            call()


def test_float8_features_raise_type_error():
    features = torch.ones(1, 1, 4, 4).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="features must be float16, bfloat16, float32 or float64"):
        prroi_pool2d(features, torch.tensor([[0, 0.5, 0.5, 2.5, 2.5]]), 2, 2, 1.0)


def test_mixed_dtype_opcheck():
    """Schema, fake kernel, autograd registration and dynamic-shape tracing agree for bfloat16 features with float32
    boxes (the CPU kernels)."""
    features = random_features((2, 3, 6, 7), torch.bfloat16, seed=11).requires_grad_(True)
    rois = torch.tensor([[0, 1.3, 0.7, 4.6, 3.9], [1, 0.2, 2.3, 5.1, 5.2]], requires_grad=True)
    torch.library.opcheck(OP.default, (features, rois, 2, 3, 0.5, True))


def _ops_called(fn):
    """The aten ops (and their input shapes) that fn() dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            calls.append((str(func), shapes))
            return func(*args, **(kwargs or {}))

    with Record():
        result = fn()
    return result, calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALVES)
def test_autocast_keeps_half_features_and_casts_rois_to_float32(device, dtype):
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("CPU autocast runs in bfloat16")
    features = random_features((2, 4, 9, 12), dtype=dtype, device=device, seed=12)
    rois = boxes_of(6, 2, 9, 12, seed=13, device=device).to(dtype)
    with torch.autocast(device, dtype=dtype):
        out, calls = _ops_called(lambda: prroi_pool2d(features, rois, 2, 3, 1.0))
    assert out.dtype == dtype
    copies = [shapes for name, shapes in calls if "_to_copy" in name]
    assert copies == [[tuple(rois.shape)]], calls  # the rois are cast to float32, the features left as they are
    assert torch.equal(out, prroi_pool2d(features, rois.float(), 2, 3, 1.0))
    with torch.autocast(device, dtype=dtype):
        levels_out = prroi_pool_levels([features], rois, torch.zeros(6, dtype=torch.long, device=device), (2, 3), [1.0])
    assert levels_out.dtype == dtype
    torch.testing.assert_close(levels_out, out, rtol=1e-2, atol=1e-2 * out.abs().max().item())


# ---------------------------------------------------------------------------------------------------------------
# 3. Thread-block clusters only where the kernels were compiled for them
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_reports_the_architecture_the_kernels_run_as():
    arch = torch.ops.prroi_d2._cuda_kernel_arch(torch.cuda.current_device())
    major, minor = torch.cuda.get_device_capability()
    assert 0 < arch <= 10 * major + minor  # the PTX architecture: 90 for an sm_90 build, 80 for "8.0+PTX"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32] + HALVES)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("levels", [False, True])
def test_cuda_coordinate_gradient_of_boxes_split_over_blocks(dtype, deterministic, levels):
    """Few boxes with many (channel group, bin) items: each box's coordinate gradient is split over several blocks,
    combined by clusters (deterministic, kernels built for sm_90 or later), by the one-block-per-box kernel (an older
    build, e.g. TORCH_CUDA_ARCH_LIST="8.0+PTX") or by atomics. Checked against the float64 CPU op."""
    features = random_features((2, 64, 30, 34), dtype=dtype, seed=14)
    rois = boxes_of(3, 2, 30, 34, seed=15) * torch.tensor([1, 2, 2, 2, 2.0])
    grad_out = random_features((3, 64, 14, 14), dtype=dtype, seed=16)
    if levels:
        fn = lambda f, r: prroi_pool_levels([f], r, torch.zeros(3, dtype=torch.long, device=r.device), 14, [0.5])
    else:
        fn = lambda f, r: prroi_pool2d(f, r, 14, 14, 0.5)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        got = forward_backward(fn, features.cuda(), rois.cuda(), grad_out.cuda())
        again = forward_backward(fn, features.cuda(), rois.cuda(), grad_out.cuda())
    finally:
        torch.use_deterministic_algorithms(previous)
    torch.cuda.synchronize()
    want = forward_backward(fn, features.double(), rois.double(), grad_out.double())
    gr, want_gr = got[2].cpu().double(), want[2]
    assert got[2].dtype == F32 and want_gr[:, 1:].abs().sum() > 0
    # the same rounded inputs in both: only float32 accumulation differs (and a bin edge rounded across a pixel)
    assert torch.linalg.norm(gr - want_gr) <= 1e-3 * torch.linalg.norm(want_gr)
    if deterministic:
        assert torch.equal(got[2], again[2])


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
    x = random_features((2, 3, 10, 12), seed=18)
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
