"""Loads the compiled ``prroi_d2._C`` library that registers ``torch.ops.prroi_d2.*``.

A prebuilt library (``pip install .``, ``python setup.py build_ext --inplace``) is loaded when present. In a source
checkout without one, the sources are compiled on first import with ninja (``torch.utils.cpp_extension.load``), with
CUDA kernels when a GPU and a CUDA toolkit are present; a failed build raises with the compiler's own output.
"""

import glob
import importlib.machinery
import os

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_loaded = False


def _prebuilt_library():
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_PACKAGE_DIR, "_C" + suffix)
        if os.path.exists(path):
            return path
    return None


def sources(with_cuda: bool):
    """The C++ (and CUDA) source files of the extension."""
    csrc = os.path.join(_PACKAGE_DIR, "csrc")
    files = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "*", "*.cpp")))
    if with_cuda:
        files += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    return files


def _jit_build():
    from torch.utils import cpp_extension

    with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    defines = ["-DWITH_CUDA"] if with_cuda else []
    cpp_extension.load(
        name="prroi_d2_C",
        sources=sources(with_cuda),
        extra_cflags=["-O3", "-fopenmp"] + defines,
        extra_cuda_cflags=["-O3"] + defines if with_cuda else None,
        extra_ldflags=["-fopenmp"],
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("PRROI_D2_VERBOSE_BUILD", "0") == "1",
    )


def load() -> None:
    """Register the ops once per process; idempotent."""
    global _loaded
    if _loaded:
        return
    path = _prebuilt_library()
    if path is not None:
        torch.ops.load_library(path)
    else:
        _jit_build()
    from prroi_d2 import _fake_kernels  # noqa: F401  (fake/meta kernels for torch.compile)

    _loaded = True


def cuda_version() -> int:
    """CUDA version the kernels were built with (e.g. 13020), or 0 for a CPU-only build."""
    load()
    return torch.ops.prroi_d2._cuda_version()
