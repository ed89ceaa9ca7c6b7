"""Weights (.pkl) and YAML configs that would run code when loaded are refused, by name, before running it; the
model zoo's pickles (numpy arrays in dicts) still load. Each payload is shown to run under plain Detectron2 loading
(the reference), so these tests fail without prroi_d2's safe loading."""

import os
import pickle
import sys
from collections import OrderedDict

import numpy as np
import pytest
import tool_processes
import torch

pytest.importorskip("detectron2")

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg

from prroi_d2.engine.checkpoint import CheckpointReadError, SafeCheckpointer
from prroi_d2.safe_loading import UntrustedFileError, load_pickled_weights, safe_merge_from_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")


class _Touch:
    """Pickles as a call of ``os.system("touch PATH")`` (what a malicious .pkl does)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))


def _zoo_pickle(path, model, protocol, **extra):
    """A Detectron2 model-zoo ``.pkl``: ``{"model": {name: ndarray}, "__author__": ...}``."""
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "Detectron2 Model Zoo", **extra}, f, protocol=protocol)


def test_a_pickle_that_runs_code_is_refused_by_name(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model_final_evil.pkl"
    _zoo_pickle(evil, _model(), protocol=2, payload=_Touch(marker))  # a valid dict: training would go on

    with pytest.raises(CheckpointReadError) as info:
        SafeCheckpointer(_model()).load(str(evil))
    assert str(info.value).startswith(f"Refusing to load {evil}: the pickle calls posix.system")
    assert "\n" not in str(info.value)
    assert not marker.exists()

    DetectionCheckpointer(_model()).load(str(evil))  # the reference: plain pickle runs the payload
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_model_zoo_pickles_load(tmp_path, protocol):
    source = _model()
    with torch.no_grad():
        for p in source.parameters():
            p.uniform_(-1, 1)
    path = tmp_path / "R-toy.pkl"
    _zoo_pickle(path, source, protocol, extra=OrderedDict(step=np.float32(0.5), ids=[1, 2], name=b"x"))
    target = _model()
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    SafeCheckpointer(target).load(str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    loaded = load_pickled_weights(str(path))
    assert loaded["extra"]["step"] == np.float32(0.5) and loaded["extra"]["name"] == b"x"


def test_caffe2_style_blobs_load(tmp_path):
    """Detectron's / Caffe2's ImageNet pickles: ``{"blobs": {name: ndarray}}``, momentum blobs left out."""
    path = tmp_path / "caffe2.pkl"
    blobs = {"conv1_w": np.ones((4, 3, 3, 3), np.float32), "conv1_w_momentum": np.zeros((4, 3, 3, 3), np.float32)}
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    data = SafeCheckpointer(_model())._load_file(str(path))
    assert list(data["model"]) == ["conv1_w"] and data["matching_heuristics"] is True


def _evil_yaml(path, marker, base=None):
    lines = [f'_BASE_: "{base}"'] if base else []
    lines += ["SOLVER:", f'  BASE_LR: !!python/object/apply:os.system ["touch {marker}"]']
    path.write_text("\n".join(lines) + "\n")


def test_a_yaml_config_with_a_python_tag_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    _evil_yaml(evil, marker)
    with pytest.raises(UntrustedFileError) as info:
        safe_merge_from_file(get_cfg(), str(evil))
    assert str(info.value).startswith(f"YAML tag !!python/object/apply:os.system in {evil}, line 2 would run")
    assert not marker.exists()

    child = tmp_path / "child.yaml"  # the tag in a _BASE_ file: that file is named
    child.write_text('_BASE_: "evil.yaml"\nSEED: 3\n')
    with pytest.raises(UntrustedFileError, match=f"in {evil}, line 2"):
        safe_merge_from_file(get_cfg(), str(child))
    assert not marker.exists()

    plain = tmp_path / "plain.yaml"  # a plain config with a _BASE_ still merges
    (tmp_path / "base.yaml").write_text("SOLVER:\n  BASE_LR: 0.5\n")
    plain.write_text('_BASE_: "base.yaml"\nSEED: 7\n')
    cfg = get_cfg()
    safe_merge_from_file(cfg, str(plain))
    assert (cfg.SOLVER.BASE_LR, cfg.SEED) == (0.5, 7)

    with pytest.raises(ValueError, match="SOLVER.BASE_LR"):  # the reference: Detectron2's CfgNode runs the tag
        get_cfg().merge_from_file(str(child))  # (and then finds os.system's exit code of the wrong type)
    assert marker.exists()


def test_train_net_refuses_a_yaml_config_with_a_python_tag(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    _evil_yaml(evil, marker, base=os.path.join(REPO, "configs", "iounet_synthetic_R18.yaml"))
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [sys.executable, TRAIN_NET, "--config-file", str(evil), "OUTPUT_DIR", str(tmp_path / "out")]
    result = tool_processes.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"YAML tag !!python/object/apply:os.system in {evil}, line 3 would run Python code" in result.stderr
    assert not marker.exists()
