"""Loads the compiled ``prroi_d2._C`` library that registers ``torch.ops.prroi_d2.*``.

A prebuilt library (``pip install .``, ``python setup.py build_ext --inplace``) is loaded when present. In a source
checkout without one, the sources are compiled on first import with ninja (``torch.utils.cpp_extension.load``), with
CUDA kernels when a GPU and a CUDA toolkit are present; a failed build raises with the compiler's own output.

A prebuilt library older than one of its sources (``csrc``: ``.cpp``, ``.h``, ``.cu``, ``.cuh``) in a source checkout
(a ``setup.py`` beside the package) is still loaded, with a ``UserWarning`` naming the library, the newest source and
the command that rebuilds it. It is not rebuilt on import: a rebuild of the CUDA kernels takes minutes, needs the
toolchain the library was built with (``tools/dev_env.sh`` sets it up, with nvcc and the CUDA architectures), and
would race with other processes importing the package; the warning says what to run instead. In an installed package
(no ``setup.py`` beside it) file times say nothing about the build and are not compared.
"""

import glob
import importlib.machinery
import os
import warnings
from typing import Optional

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


REBUILD_COMMAND = "python setup.py build_ext --inplace (or bash tools/dev_env.sh for the development environment)"


def _newest_source(package_dir: str) -> Optional[str]:
    """The most recently modified source file (sources and headers) under ``package_dir/csrc``, or None."""
    paths = (
        os.path.join(root, name)
        for root, _, names in os.walk(os.path.join(package_dir, "csrc"))
        for name in names
        if name.endswith((".cpp", ".h", ".cu", ".cuh"))
    )
    return max(paths, key=os.path.getmtime, default=None)


def warn_if_stale(library: str, package_dir: str) -> None:
    """Warn when ``library`` is older than a source under ``package_dir/csrc`` in a source checkout (a ``setup.py``
    in the folder above ``package_dir``)."""
    if not os.path.exists(os.path.join(os.path.dirname(package_dir), "setup.py")):
        return
    newest = _newest_source(package_dir)
    if newest is not None and os.path.getmtime(newest) > os.path.getmtime(library):
        warnings.warn(
            "prroi_d2: the compiled library {} is older than its source {}; it is loaded as it is, so the ops may "
            "not match the sources. Rebuild it in {} with: {}".format(
                library,
                os.path.relpath(newest, os.path.dirname(package_dir)),
                os.path.dirname(package_dir),
                REBUILD_COMMAND,
            ),
            UserWarning,
            stacklevel=3,
        )


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
        warn_if_stale(path, _PACKAGE_DIR)
        torch.ops.load_library(path)
    else:
        _jit_build()
    from prroi_d2 import _fake_kernels  # noqa: F401  (fake/meta kernels for torch.compile)

    _loaded = True


def cuda_version() -> int:
    """CUDA version the kernels were built with (e.g. 13020), or 0 for a CPU-only build."""
    load()
    return torch.ops.prroi_d2._cuda_version()
