#!/usr/bin/env python3
"""Install Detectron2 for prroi_d2.

Detectron2 is not published on PyPI, so this script picks one of three routes:

1. Already installed: if the target Python can import a working Detectron2 (detectron2, its config,
   modeling and model_zoo modules), print which one and stop. A second run is therefore a no-op.
   --force skips this check.
2. --source SRC: ``pip install --no-build-isolation SRC`` for a local checkout/sdist or a git URL such as
   git+https://github.com/facebookresearch/detectron2.git. This is upstream's full build with its compiled
   C++/CUDA ops; it needs torch importable while building, hence no build isolation.
3. Default, the pb1 route: the pb1-detectron2 0.6 sdist on PyPI republishes upstream Detectron2 v0.6's
   Python sources without their C++ sources, and its setup.py cannot build. This script takes the sdist
   (--sdist FILE, or ``pip download``), extracts it, applies two compatibility fixes for current libraries
   (Pillow's removed Image.LINEAR, NumPy's removed np.bool/np.int/np.float aliases), writes a placeholder
   detectron2/_C.py in place of the compiled ops, replaces setup.py with a pure-Python one
   (distribution pb1-detectron2, version 0.6+pure) and pip-installs the result, so that ``pip show`` and
   ``pip uninstall pb1-detectron2`` work. It runs offline from a local sdist.

   Without compiled ops, rotated boxes, ROIAlignRotated, deformable convolution and the fast COCO evaluator
   are unavailable: they raise a RuntimeError saying so (use COCOEvaluator(..., use_fast_impl=False)).
   Configs, the model zoo and the standard R-CNN models (built on torchvision ops) work.

pip runs as ``PY -m pip`` for the target interpreter (--python, default: the one running this script) with
pip's own configuration left as it is. With --target DIR, pip installs into DIR (replacing an earlier copy)
and every import check puts DIR first on PYTHONPATH. Every route ends by importing Detectron2 in a
subprocess of the target Python. Expected failures print one line naming the failed step and what to do
(after the tail of pip's output) and exit with status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PB1_NAME = "pb1-detectron2"
PB1_VERSION = "0.6"
PB1_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
LOCAL_LABEL = "pure"
UPSTREAM_GIT = "git+https://github.com/facebookresearch/detectron2.git"
BUILD_HINT = f"prroi_d2's tools/install_detectron2.py --force --source {UPSTREAM_GIT}"
TAIL_LINES = 15

# Runtime requirements declared by Detectron2 v0.6, minus black (its 21.4b2 pin breaks with current click),
# future and pydot (caffe2 export only) and dataclasses (Python < 3.7 only).
REQUIREMENTS = (
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
)

# Projects that upstream installs as detectron2.projects.<name> (only those present in the sources are used).
PROJECTS = {
    "detectron2.projects.point_rend": "projects/PointRend/point_rend",
    "detectron2.projects.deeplab": "projects/DeepLab/deeplab",
    "detectron2.projects.panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}

# Paths the pb1 route relies on; a sdist without them has a layout this script does not know.
REQUIRED_PATHS = (
    "detectron2/__init__.py",
    "detectron2/layers/rotated_boxes.py",
    "detectron2/model_zoo/model_zoo.py",
    "detectron2/model_zoo/configs",
    "detectron2/utils/collect_env.py",
    "detectron2/data/transforms/transform.py",
)

# Imported in the target Python to decide whether Detectron2 works; prints one JSON line.
CHECK_CODE = r"""
import json, os
try:
    import detectron2
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2 import model_zoo
    from detectron2 import _C
except Exception as exc:
    print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
    raise SystemExit(0)
try:
    from importlib.metadata import packages_distributions, version
    names = sorted(set(packages_distributions().get("detectron2", [])))
    dist = ", ".join(f"{name} {version(name)}" for name in names) or "none"
except Exception:
    dist = "unknown"
print(json.dumps({
    "ok": True,
    "version": getattr(detectron2, "__version__", "unknown"),
    "path": os.path.dirname(os.path.abspath(detectron2.__file__)),
    "placeholder": getattr(_C, "PLACEHOLDER", False) is True,
    "dist": dist,
}))
"""

SETUP_PY = '''\
"""Pure-Python build of Detectron2 {version} from the pb1-detectron2 sdist.

Written by prroi_d2's tools/install_detectron2.py. No C++/CUDA ops are compiled: detectron2/_C.py is a
placeholder whose ops raise RuntimeError. The version's local label "+{label}" marks this modified build.
"""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECTS = {{name: path for name, path in {projects!r}.items() if os.path.isdir(os.path.join(HERE, path))}}


def model_zoo_configs():
    """The model zoo's YAML and Python configs, relative to the detectron2.model_zoo package."""
    package_dir = os.path.join(HERE, "detectron2", "model_zoo")
    found = []
    for folder, _, files in os.walk(os.path.join(package_dir, "configs")):
        found += [os.path.relpath(os.path.join(folder, f), package_dir) for f in files if f.endswith((".yaml", ".py"))]
    return sorted(found)


setup(
    name="{name}",
    version="{version}+{label}",
    author="FAIR",
    url="https://github.com/facebookresearch/detectron2",
    description="Detectron2 v{version} Python sources (pb1-detectron2), installed without compiled ops",
    license="Apache-2.0",
    packages=find_packages(include=["detectron2", "detectron2.*"]) + sorted(PROJECTS),
    package_dir=PROJECTS,
    package_data={{"detectron2.model_zoo": model_zoo_configs()}},
    python_requires=">=3.7",
    install_requires={requirements!r},
)
'''

PYPROJECT_TOML = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"
"""

PLACEHOLDER_PY = '''\
"""Placeholder for Detectron2's compiled extension ``detectron2._C``.

This Detectron2 ({name} {version}) was installed by prroi_d2's tools/install_detectron2.py from the
pb1-detectron2 sdist, which carries upstream Detectron2's Python sources but not its C++/CUDA sources, so no
ops were compiled. This module stands in for the extension: importing it works (detectron2.layers,
detectron2.evaluation and detectron2.utils.collect_env import it), and calling any op raises a RuntimeError
that names the op. Affected: rotated boxes (box_iou_rotated), ROIAlignRotated, deformable convolution and
the fast COCO evaluator. Build Detectron2 from source to get them:

    {hint}
"""

# Marks this module as the placeholder (install_detectron2.py checks it after installing).
PLACEHOLDER = True

_NO_OPS = "none (Python-only install, no compiled ops)"

# The fast COCO evaluator (detectron2/evaluation/fast_eval_api.py) needs _C.COCOevalEvaluateImages and
# _C.COCOevalAccumulate: with this placeholder, disable it with COCOEvaluator(..., use_fast_impl=False).


def get_compiler_version():
    """No compiler was used: this is a Python-only install."""
    return _NO_OPS


def get_cuda_version():
    """No CUDA compiler was used: this is a Python-only install."""
    return _NO_OPS


def has_cuda():
    """False: no CUDA kernels (this also makes collect_env_info() skip probing this file's arch flags)."""
    return False


def __getattr__(name):
    """Return, for any public name, a stand-in op that raises RuntimeError when called."""
    if name.startswith("_"):
        raise AttributeError(f"module {{__name__!r}} has no attribute {{name!r}}")

    def unavailable(*args, **kwargs):
        raise RuntimeError(
            f"detectron2._C.{{name}} is unavailable: this Detectron2 ({name} {version}, Python sources only) "
            "was installed without compiled ops. Build Detectron2 from source for it: {hint}"
        )

    unavailable.__name__ = unavailable.__qualname__ = name
    return unavailable
'''


class InstallError(Exception):
    """An expected failure: the step that failed, what to do, and optional output to show."""

    def __init__(self, step: str, message: str, detail: str = ""):
        super().__init__(f"{step}: {message}")
        self.step, self.message, self.detail = step, message, detail


class CompatFix:
    """A regex rewrite of the sources for a newer library; ``replacements`` maps group 1 to the new text."""

    def __init__(self, description: str, pattern: str, replacements: dict[str, str]):
        self.description = description
        self.pattern = re.compile(pattern)
        self.replacements = replacements

    def apply(self, text: str) -> tuple[str, int]:
        """Return the fixed text and the number of replacements."""
        return self.pattern.subn(lambda m: self.replacements[m.group(1)], text)


COMPAT_FIXES = (
    CompatFix(
        "Pillow 10 removed Image.LINEAR/CUBIC/ANTIALIAS",
        r"\bImage\.(LINEAR|CUBIC|ANTIALIAS)\b",
        {"LINEAR": "Image.BILINEAR", "CUBIC": "Image.BICUBIC", "ANTIALIAS": "Image.LANCZOS"},
    ),
    CompatFix(
        "NumPy 1.24 removed the np.bool/np.int/np.float/... aliases of builtins",
        r"(?<![\w.])(?:np|numpy)\.(bool|int|float|complex|object|str|long|unicode)\b",
        {
            "bool": "bool",
            "int": "int",
            "float": "float",
            "complex": "complex",
            "object": "object",
            "str": "str",
            "long": "int",
            "unicode": "str",
        },
    ),
)


def say(message: str) -> None:
    """Print a progress line."""
    print(f"[install_detectron2] {message}", flush=True)


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last non-empty lines of ``text``, indented."""
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join("    " + line for line in kept)


def last_line(text: str) -> str:
    """The last non-empty line of ``text``, stripped."""
    return (tail(text, 1) or "").strip()


def one_line(text: str) -> str:
    """``text`` with all whitespace runs collapsed to single spaces."""
    return " ".join(text.split())


def run_command(cmd: list[str], step: str, env: dict[str, str] | None = None, cwd: str | None = None):
    """Run ``cmd`` capturing its output; a missing executable is an InstallError."""
    try:
        return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise InstallError(step, f"cannot run {cmd[0]!r} ({exc}); pass an existing interpreter with --python") from exc


def pip(python: str, args: list[str], step: str, hint: str) -> str:
    """Run ``python -m pip args`` (pip's configuration untouched) and return its stdout; failure raises."""
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    cmd = [python, "-m", "pip", *args]
    say("$ " + " ".join(cmd))
    result = run_command(cmd, step, env=env)
    if result.returncode != 0:
        detail = tail(result.stderr) or tail(result.stdout)
        raise InstallError(step, f"pip exited with status {result.returncode}; {hint}", detail)
    return result.stdout


def check_detectron2(python: str, target: str | None) -> dict:
    """Import Detectron2 in a subprocess of ``python`` (``target`` first on its path); return the JSON report."""
    env = dict(os.environ)
    if target:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(target), env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="install_detectron2_check_") as cwd:  # no stray ./detectron2
        result = run_command([python, "-c", CHECK_CODE], "check", env=env, cwd=cwd)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"ok": False, "error": f"the check exited with status {result.returncode}\n{tail(result.stderr)}"}


def describe(report: dict) -> str:
    """One line describing a working Detectron2 from a check report."""
    ops = "placeholder _C, no compiled ops" if report["placeholder"] else "compiled ops"
    return f"detectron2 {report['version']} at {report['path']} ({ops}; distribution: {report['dist']})"


def verify(python: str, target: str | None, want_placeholder: bool) -> dict:
    """Check the new install: importable (from ``target`` if given) and, for the pb1 route, the placeholder."""
    report = check_detectron2(python, target)
    if not report["ok"]:
        raise InstallError("verify", "pip succeeded but Detectron2 does not import: " + report["error"].split("\n")[0])
    if target and not is_inside(report["path"], target):
        raise InstallError("verify", f"installed into {target} but {python} imports detectron2 from {report['path']}")
    if want_placeholder and not report["placeholder"]:
        raise InstallError("verify", "detectron2._C is not the placeholder: another Detectron2 shadows this one")
    return report


def is_inside(path: str, folder: str) -> bool:
    """Whether ``path`` lies in ``folder`` (symlinks resolved)."""
    return os.path.commonpath([os.path.realpath(path), os.path.realpath(folder)]) == os.path.realpath(folder)


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_sdist(python: str, into: Path) -> Path:
    """Fetch the pb1-detectron2 sdist with ``pip download`` into ``into``."""
    pip(
        python,
        ["download", "--no-deps", "--no-build-isolation", "--no-binary", ":all:", f"{PB1_NAME}=={PB1_VERSION}"]
        + ["-d", str(into)],
        "download",
        "check network access to the package index, or pass a local copy with --sdist FILE",
    )
    found = sorted(into.glob("*.tar.gz"))
    if not found:
        raise InstallError("download", f"pip reported success but left no sdist in {into}; pass --sdist FILE")
    return found[0]


def report_sdist(sdist: Path) -> None:
    """Say whether ``sdist`` is the published pb1-detectron2 sdist (another one is used, with a note)."""
    digest = sha256(sdist)
    if digest == PB1_SHA256:
        say(f"sdist {sdist}: sha256 matches the published {PB1_NAME} {PB1_VERSION}")
    else:
        say(f"note: sdist {sdist} (sha256 {digest[:16]}) is not the published {PB1_NAME} {PB1_VERSION}; using it")


def extract_sdist(sdist: Path, into: Path) -> Path:
    """Extract ``sdist`` safely into ``into`` and return its top folder (the one holding detectron2/)."""
    try:
        with tarfile.open(sdist) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(into, filter="data")
            else:  # Python without extraction filters: refuse absolute paths, '..' and links
                for member in tar.getmembers():
                    if (
                        member.name.startswith("/")
                        or ".." in Path(member.name).parts
                        or member.issym()
                        or member.islnk()
                    ):
                        raise InstallError("extract", f"{sdist} has an unsafe member {member.name!r}")
                tar.extractall(into)
    except (tarfile.TarError, OSError) as exc:
        raise InstallError("extract", f"cannot extract {sdist} ({exc}); pass a .tar.gz sdist with --sdist") from exc
    tops = [
        init.parent.parent
        for pattern in ("detectron2/__init__.py", "*/detectron2/__init__.py")
        for init in into.glob(pattern)
    ]
    if len(tops) != 1:
        raise InstallError("extract", f"{sdist} does not look like a Detectron2 sdist (no single detectron2/ package)")
    return tops[0]


def check_layout(root: Path) -> str:
    """Verify the sources have the expected layout; return Detectron2's ``__version__``."""
    missing = [rel for rel in REQUIRED_PATHS if not (root / rel).exists()]
    if missing:
        raise InstallError("layout", f"unexpected sdist layout, missing {', '.join(missing)}; use --source instead")
    match = re.search(
        r"^__version__\s*=\s*[\"']([^\"']+)[\"']", (root / "detectron2/__init__.py").read_text(), re.MULTILINE
    )
    if not match:
        raise InstallError("layout", "no __version__ in detectron2/__init__.py; use --source instead")
    if (root / "detectron2/layers/csrc").is_dir():
        say("note: these sources include the C++ ops, which this route does not build (use --source to build them)")
    return match.group(1)


def python_sources(root: Path) -> list[Path]:
    """The Python files of the detectron2 package and the bundled projects."""
    return sorted(p for folder in ("detectron2", "projects") for p in (root / folder).rglob("*.py"))


def apply_compat_fixes(root: Path) -> None:
    """Apply COMPAT_FIXES to the sources, report each changed file, and verify nothing is left to fix."""
    for fix in COMPAT_FIXES:
        total = 0
        for path in python_sources(root):
            text = path.read_text(encoding="utf-8")
            fixed, count = fix.apply(text)
            if count:
                path.write_text(fixed, encoding="utf-8")
                say(f"  {path.relative_to(root)}: {count} replacement(s)")
                total += count
        say(f"{fix.description}: {total} replacement(s)" + ("" if total else " (pattern absent, nothing to change)"))
    left = [
        f"{path.relative_to(root)}: {m.group(0)}"
        for path in python_sources(root)
        for fix in COMPAT_FIXES
        for m in fix.pattern.finditer(path.read_text(encoding="utf-8"))
    ]
    if left:
        raise InstallError("patch", "compatibility fixes left unfixed uses: " + "; ".join(left[:5]))


def write_pure_build(root: Path, version: str) -> None:
    """Write the placeholder _C.py and a pure-Python setup.py; drop the sdist's stale metadata."""
    fields = {"name": PB1_NAME, "version": version, "hint": BUILD_HINT}
    (root / "detectron2/_C.py").write_text(PLACEHOLDER_PY.format(**fields), encoding="utf-8")
    setup_py = SETUP_PY.format(
        name=PB1_NAME, version=version, label=LOCAL_LABEL, projects=PROJECTS, requirements=list(REQUIREMENTS)
    )
    (root / "setup.py").write_text(setup_py, encoding="utf-8")
    (root / "pyproject.toml").write_text(PYPROJECT_TOML, encoding="utf-8")
    for stale in [*root.glob("*.egg-info"), root / "PKG-INFO"]:
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    say(f"wrote detectron2/_C.py (placeholder) and setup.py ({PB1_NAME} {version}+{LOCAL_LABEL})")


def require_setuptools(python: str) -> None:
    """--no-build-isolation builds with the target Python's own setuptools: fail early without it."""
    result = run_command([python, "-c", "import setuptools"], "build setup")
    if result.returncode != 0:
        raise InstallError(
            "build setup", f"setuptools is not importable in {python}; install it (pip install setuptools) first"
        )


def install_args(args: argparse.Namespace) -> list[str]:
    """pip install options shared by both install routes."""
    options = ["install", "--no-build-isolation"]
    if args.no_deps:
        options.append("--no-deps")
    if args.target:
        options += ["--target", args.target, "--upgrade"]  # --upgrade replaces an existing copy in the target
    return options


def install_from_source(args: argparse.Namespace) -> dict:
    """Route 2: pip install --no-build-isolation SRC (upstream build, compiled ops included)."""
    require_setuptools(args.python)
    say(f"building Detectron2 from {args.source} (compiles C++/CUDA ops; this can take several minutes)")
    out = pip(args.python, [*install_args(args), args.source], "pip install", "see pip's output above")
    say(last_line(out))
    return verify(args.python, args.target, want_placeholder=False)


def install_pb1(args: argparse.Namespace) -> dict:
    """Route 3: pure-Python install of the pb1-detectron2 sdist with the compatibility fixes."""
    with tempfile.TemporaryDirectory(prefix="install_detectron2_") as tmp:
        tmp_dir = Path(tmp)
        if args.sdist:
            sdist = Path(args.sdist)
        else:
            say(f"downloading the {PB1_NAME}=={PB1_VERSION} sdist")
            sdist = download_sdist(args.python, tmp_dir / "download")
        report_sdist(sdist)
        root = extract_sdist(sdist, tmp_dir / "src")
        version = check_layout(root)
        apply_compat_fixes(root)
        write_pure_build(root, version)
        require_setuptools(args.python)
        out = pip(args.python, [*install_args(args), str(root)], "pip install", "see pip's output above")
        say(last_line(out))
    report = verify(args.python, args.target, want_placeholder=True)
    if report["dist"] not in ("unknown", "none") and f"{PB1_NAME} {version}+{LOCAL_LABEL}" not in report["dist"]:
        raise InstallError("verify", f"pip's record of the install is unexpected: {report['dist']}")
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line; the module docstring is the help text."""
    parser = argparse.ArgumentParser(
        prog="install_detectron2.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  python tools/install_detectron2.py                  # into the running Python's environment\n"
            "  python tools/install_detectron2.py --sdist pb1-detectron2-0.6.tar.gz --target /tmp/site --no-deps\n"
            f"  python tools/install_detectron2.py --force --source {UPSTREAM_GIT}"
        ),
    )
    route = parser.add_mutually_exclusive_group()
    route.add_argument("--source", metavar="SRC", help="build upstream Detectron2 from a checkout, sdist or git URL")
    route.add_argument("--sdist", metavar="FILE", help="local pb1-detectron2 sdist (default: pip download it)")
    parser.add_argument("--target", metavar="DIR", help="pip install --target DIR (use it via PYTHONPATH=DIR)")
    parser.add_argument("--no-deps", action="store_true", help="do not install Detectron2's dependencies")
    parser.add_argument("--python", metavar="PY", default=sys.executable, help="interpreter to install for")
    parser.add_argument("--force", action="store_true", help="install even if a working Detectron2 is importable")
    args = parser.parse_args(argv)
    if args.target:
        args.target = os.path.abspath(args.target)
    return args


def check_inputs(args: argparse.Namespace) -> None:
    """Fail early on a local --sdist/--source path that does not exist."""
    if args.sdist and not os.path.isfile(args.sdist):
        raise InstallError("sdist", f"{args.sdist} not found; pass an existing pb1-detectron2 sdist with --sdist")
    is_url = "://" in (args.source or "") or (args.source or "").startswith("git+")
    if args.source and not is_url and not os.path.exists(args.source):
        raise InstallError("source", f"{args.source} does not exist; pass a checkout, an sdist or a git URL")


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit status."""
    args = parse_args(argv)
    try:
        check_inputs(args)
        if not args.force:
            report = check_detectron2(args.python, args.target)
            if report["ok"]:
                say(f"already installed, nothing to do: {describe(report)}")
                return 0
            say("no working Detectron2 yet: " + report["error"].split("\n")[0])
        report = install_from_source(args) if args.source else install_pb1(args)
    except InstallError as exc:
        if exc.detail:
            print(exc.detail, file=sys.stderr)
        print(f"install_detectron2: error: step '{exc.step}' failed: {one_line(exc.message)}", file=sys.stderr)
        return 1
    say(f"installed: {describe(report)}")
    if args.target:
        say(f"use it with PYTHONPATH={os.path.abspath(args.target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
