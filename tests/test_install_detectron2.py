"""Tests of tools/install_detectron2.py with real pip and the real pb1-detectron2 sdist (no mocks).

Installs go to temporary --target folders or a throwaway venv, never into the Python running the tests, so the
tests hold whether or not that Python already has Detectron2. The sdist is ``$PRROI_D2_DETECTRON2_SDIST`` if set, else
the one tools/dev_env.sh keeps in the environment running the tests (``<venv>/downloads/pb1-detectron2-0.6.tar.gz``);
tests that need it are skipped, saying where it was looked for, only when it could not be fetched.
"""

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALLER = REPO / "tools" / "install_detectron2.py"
SDIST = Path(
    os.environ.get("PRROI_D2_DETECTRON2_SDIST") or Path(sys.prefix) / "downloads" / "pb1-detectron2-0.6.tar.gz"
)
DIST_INFO = "pb1_detectron2-0.6+pure.dist-info"
ERROR_PREFIX = "install_detectron2: error: step "

NO_SDIST = f"pb1-detectron2 sdist not found at {SDIST} (tools/dev_env.sh keeps it; or set PRROI_D2_DETECTRON2_SDIST)"
needs_sdist = pytest.mark.skipif(not SDIST.is_file(), reason=NO_SDIST)

# Run in a subprocess with the installed Detectron2 first on the path; prints one JSON line of facts.
PROBE = r"""
import json, pickle
import numpy as np, torch
from PIL import Image
import detectron2
from detectron2 import _C, model_zoo
from detectron2.config import get_cfg
from detectron2.data.transforms import ExtentTransform
from detectron2.modeling import build_model
from detectron2.structures import RotatedBoxes, pairwise_iou_rotated
from detectron2.structures.masks import polygons_to_bitmask
from detectron2.utils.collect_env import collect_env_info

def error_of(fn):
    try:
        fn()
    except Exception as exc:
        return [type(exc).__name__, str(exc)]
    return None

extent = ExtentTransform((0, 0, 30, 20), (10, 15))
boxes = RotatedBoxes(torch.rand(2, 5))
empty = polygons_to_bitmask([], 4, 5)
square = polygons_to_bitmask([np.array([0.0, 0, 3, 0, 3, 3, 0, 3])], 4, 5)
cfg = get_cfg()
cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
cfg.MODEL.DEVICE = "cpu"
model = build_model(cfg).eval()
with torch.no_grad():
    instances = model([{"image": torch.zeros(3, 64, 96)}])[0]["instances"]
print(json.dumps({
    "file": detectron2.__file__,
    "version": detectron2.__version__,
    "config_file": model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"),
    "extent_interp_is_bilinear": extent.interp == Image.BILINEAR,
    "extent_shape": list(extent.apply_image(np.zeros((20, 30, 3), np.uint8)).shape),
    "empty_bitmask": [str(empty.dtype), list(empty.shape)],
    "square_bitmask": [str(square.dtype), int(square.sum())],
    "instances_size": list(instances.image_size),
    "collect_env": collect_env_info(),
    "has_cuda": _C.has_cuda(),
    "compiler": _C.get_compiler_version(),
    "cuda_compiler": _C.get_cuda_version(),
    "placeholder_flag": _C.PLACEHOLDER,
    "nms_rotated_error": error_of(lambda: _C.nms_rotated(torch.zeros(1, 5), torch.zeros(1), 0.5)),
    "rotated_iou_error": error_of(lambda: pairwise_iou_rotated(boxes, boxes)),
    "private_attrs": [hasattr(_C, "_private"), hasattr(_C, "__wrapped__")],
    "pickled_fn_works": pickle.loads(pickle.dumps(_C.has_cuda))() is False,
}))
"""


def run_installer(*args, python=None) -> subprocess.CompletedProcess:
    """Run the installer script (as the project would) and capture its output."""
    extra = ["--python", str(python)] if python else []
    cmd = [sys.executable, str(INSTALLER), *map(str, args), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)


def run_python(code: str, pythonpath=None, python=sys.executable, cwd=None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter, ``pythonpath`` first on its path."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=600, check=False
    )


def snapshot(folder: Path) -> dict:
    """Every path under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def read_metadata(dist_info: Path) -> dict:
    """Name, Version and Requires-Dist entries of a dist-info's METADATA."""
    fields = {"Requires-Dist": []}
    for line in (dist_info / "METADATA").read_text().splitlines():
        key, _, value = line.partition(": ")
        if key == "Requires-Dist":
            fields[key].append(value)
        elif key in ("Name", "Version"):
            fields[key] = value
    return fields


def load_installer():
    """The installer as a module, for preparing sources with its own steps."""
    spec = importlib.util.spec_from_file_location("install_detectron2", INSTALLER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The pb1 route run once: --sdist into a fresh --target folder; returns (target, installer stdout)."""
    if not SDIST.is_file():
        pytest.skip(NO_SDIST)
    target = tmp_path_factory.mktemp("d2site")
    result = run_installer("--sdist", SDIST, "--target", target, "--no-deps", "--force")
    assert result.returncode == 0, result.stdout + result.stderr
    return target, result.stdout


@pytest.fixture(scope="module")
def probe(site, tmp_path_factory):
    """Facts about the installed Detectron2, gathered in one subprocess with the target first on the path."""
    target, _ = site
    result = run_python(PROBE, pythonpath=target, cwd=tmp_path_factory.mktemp("probe_cwd"))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_sdist_route_reports_fixes_and_build(site):
    _, out = site
    assert "sha256 matches the published pb1-detectron2 0.6" in out
    assert "detectron2/data/transforms/transform.py: 1 replacement(s)" in out
    for path in ("detectron2/structures/masks.py", "detectron2/evaluation/sem_seg_evaluation.py"):
        assert f"{path}: " in out
    assert "--no-build-isolation --no-deps --target" in out
    assert "installed: detectron2 0.6 at" in out and "placeholder _C" in out


def test_sdist_install_imports_from_target(site, probe):
    target, _ = site
    assert Path(probe["file"]).resolve() == (target / "detectron2" / "__init__.py").resolve()
    assert probe["version"] == "0.6"
    config = Path(probe["config_file"])
    assert config.is_file() and config.resolve().is_relative_to(target.resolve())
    assert probe["instances_size"] == [64, 96]


def test_compat_fixes_work(probe):
    assert probe["extent_interp_is_bilinear"] is True
    assert probe["extent_shape"] == [10, 15, 3]
    assert probe["empty_bitmask"] == ["bool", [4, 5]]
    assert probe["square_bitmask"][0] == "bool" and probe["square_bitmask"][1] > 0


def test_collect_env_info(site, probe):
    target, _ = site
    env = probe["collect_env"]
    assert f"0.6 @{target.resolve() / 'detectron2'}" in env or f"0.6 @{target / 'detectron2'}" in env
    assert "none (Python-only install, no compiled ops)" in env
    assert "detectron2 arch flags" not in env


def test_placeholder_ops(probe):
    assert probe["placeholder_flag"] is True
    assert probe["has_cuda"] is False
    assert isinstance(probe["compiler"], str) and "no compiled ops" in probe["compiler"]
    assert isinstance(probe["cuda_compiler"], str) and "no compiled ops" in probe["cuda_compiler"]
    kind, message = probe["nms_rotated_error"]
    assert kind == "RuntimeError"
    assert message.startswith("detectron2._C.nms_rotated is unavailable")
    assert "without compiled ops" in message and "--source" in message
    kind, message = probe["rotated_iou_error"]
    assert kind == "RuntimeError" and "box_iou_rotated" in message
    assert probe["private_attrs"] == [False, False]
    assert probe["pickled_fn_works"] is True


def test_dist_info_records_the_install(site):
    target, _ = site
    dist_info = target / DIST_INFO
    assert dist_info.is_dir(), sorted(p.name for p in target.iterdir())
    meta = read_metadata(dist_info)
    assert meta["Name"] == "pb1-detectron2" and meta["Version"] == "0.6+pure"
    requires = {r.split(";")[0].split("<")[0].split(">")[0].split("=")[0].strip() for r in meta["Requires-Dist"]}
    assert {"fvcore", "iopath", "pycocotools", "omegaconf", "hydra-core", "Pillow"} <= requires
    assert not requires & {"black", "future", "pydot", "dataclasses"}
    record = (dist_info / "RECORD").read_text()
    assert "detectron2/_C.py," in record
    assert "detectron2/model_zoo/configs/COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml," in record
    assert "detectron2/projects/point_rend/__init__.py," in record
    assert not list(target.glob("*.egg-info"))


def test_second_run_is_a_noop(site):
    target, _ = site
    before = snapshot(target)
    result = run_installer("--target", target)  # no --sdist: a real install would have to download
    assert result.returncode == 0, result.stdout + result.stderr
    assert "already installed, nothing to do: detectron2 0.6 at" in result.stdout
    assert "pb1-detectron2 0.6+pure" in result.stdout
    assert "-m pip" not in result.stdout
    assert snapshot(target) == before


def make_venv(folder: Path) -> tuple[Path, Path]:
    """A venv without pip that sees this interpreter's packages (torch, pip, setuptools...) after its own."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    purelib = run_python("import sysconfig; print(sysconfig.get_paths()['purelib'])", python=python).stdout.strip()
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    outer |= {p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)}
    (Path(purelib) / "outer.pth").write_text("\n".join(sorted(outer)) + "\n")
    return python, Path(purelib)


@needs_sdist
def test_source_route_into_venv_then_pip_show_and_uninstall(tmp_path):
    installer = load_installer()
    root = installer.extract_sdist(SDIST, tmp_path / "src")  # a local pure-Python source tree, built as route 3 does
    version = installer.check_layout(root)
    installer.apply_compat_fixes(root)
    installer.write_pure_build(root, version)
    python, venv_site = make_venv(tmp_path / "venv")

    result = run_installer("--source", root, "--no-deps", "--force", python=python)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"-m pip install --no-build-isolation --no-deps {root}" in result.stdout
    assert f"installed: detectron2 0.6 at {venv_site / 'detectron2'}" in result.stdout
    show = subprocess.run([python, "-m", "pip", "show", "pb1-detectron2"], capture_output=True, text=True, check=False)
    assert "Version: 0.6+pure" in show.stdout and f"Location: {venv_site}" in show.stdout

    uninstall = subprocess.run(
        [python, "-m", "pip", "uninstall", "-y", "pb1-detectron2"], capture_output=True, text=True, check=False
    )
    assert uninstall.returncode == 0, uninstall.stderr
    assert not (venv_site / "detectron2").exists()
    assert not list(venv_site.glob("pb1_detectron2*"))


def assert_clean_failure(result: subprocess.CompletedProcess, step: str) -> str:
    """Exit status 1, the error line last on stderr naming ``step``, no traceback; return that line."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{ERROR_PREFIX}'{step}' failed: "), result.stderr
    return last


def test_missing_sdist_fails_clearly(tmp_path):
    missing = tmp_path / "nope" / "pb1-detectron2-0.6.tar.gz"
    line = assert_clean_failure(run_installer("--sdist", missing, "--target", tmp_path / "site"), "sdist")
    assert str(missing) in line
    assert not (tmp_path / "site").exists()


def test_missing_source_fails_clearly(tmp_path):
    line = assert_clean_failure(run_installer("--source", tmp_path / "absent", "--force"), "source")
    assert str(tmp_path / "absent") in line


@pytest.mark.parametrize("kind", ["not-a-tarball", "no-detectron2"])
def test_bad_sdist_fails_clearly(tmp_path, kind):
    sdist = tmp_path / "pb1-detectron2-0.6.tar.gz"
    if kind == "not-a-tarball":
        sdist.write_text("not a tarball")
    else:
        (tmp_path / "pkg" / "other").mkdir(parents=True)
        (tmp_path / "pkg" / "other" / "__init__.py").write_text("")
        with tarfile.open(sdist, "w:gz") as tar:
            tar.add(tmp_path / "pkg", arcname="pkg")
    line = assert_clean_failure(run_installer("--sdist", sdist, "--target", tmp_path / "site", "--force"), "extract")
    assert str(sdist) in line


def test_pip_failure_shows_pip_output(tmp_path):
    empty = tmp_path / "empty_project"
    empty.mkdir()
    result = run_installer("--source", empty, "--target", tmp_path / "site", "--no-deps", "--force")
    line = assert_clean_failure(result, "pip install")
    assert "pip exited with status" in line
    assert str(empty) in result.stderr.split(ERROR_PREFIX)[0]  # pip's own complaint, shown before the error line


def test_help_documents_the_routes():
    result = run_installer("--help")
    assert result.returncode == 0
    for text in ("--source SRC", "--sdist FILE", "--target DIR", "--no-deps", "--python PY", "--force"):
        assert text in result.stdout
    assert "0.6+pure" in result.stdout and "use_fast_impl=False" in result.stdout
