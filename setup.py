"""Builds prroi_d2 and its compiled ops library ``prroi_d2._C``.

CUDA kernels are built when a CUDA toolkit is found and either a GPU is visible or ``FORCE_CUDA=1``
(``TORCH_CUDA_ARCH_LIST`` picks the architectures, e.g. ``9.0``); otherwise only the CPU kernels are built.
Build in place with ``python setup.py build_ext --inplace`` or install with ``pip install --no-build-isolation .``
(the build needs the torch it will run with).
"""

import glob
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("prroi_d2", "csrc")


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "*", "*.cpp")))
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    with_cuda = CUDA_HOME is not None and (torch.cuda.is_available() or force_cuda)
    if force_cuda and CUDA_HOME is None:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to one with nvcc")
    extra = {"cxx": ["-O3", "-fopenmp"]}
    kwargs = {"extra_link_args": ["-fopenmp"]}
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        extra["cxx"].append("-DWITH_CUDA")
        extra["nvcc"] = ["-O3", "-DWITH_CUDA", "-lineinfo"]
        return [CUDAExtension("prroi_d2._C", sources, extra_compile_args=extra, **kwargs)]
    return [CppExtension("prroi_d2._C", sources, extra_compile_args=extra, **kwargs)]


def _version():
    """``prroi_d2.__version__``, read from the source (importing the package would load torch and the ops)."""
    with open(os.path.join(HERE, "prroi_d2", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"$', f.read(), re.MULTILINE).group(1)


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="prroi_d2",
    version=_version(),
    description="Precise RoI Pooling (CPU/CUDA, differentiable in box coordinates) and IoU-Net for Detectron2",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["prroi_d2", "prroi_d2.*"]),
    package_data={"prroi_d2": ["csrc/*.h", "csrc/*/*.h", "csrc/*.cpp", "csrc/*/*.cpp", "csrc/*/*.cu", "csrc/*/*.cuh"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "detectron2": ["fvcore>=0.1.5,<0.1.6", "iopath>=0.1.7,<0.1.10", "pycocotools>=2.0.2"],
        "dev": ["pytest", "ruff", "ninja"],
    },
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    zip_safe=False,
)
