"""LazyConfigs (configs/lazy/*.py) build the models of the YAML configs: the YAML model's state_dict loads with
strict=True, outputs of every stage and fixed-seed losses are identical, the trainable parameters the same; and
tools/train_net.py trains and evaluates from a LazyConfig with key=value overrides. Nothing imports
detectron2.export (it fails on Detectron2 v0.6)."""

import json
import os
import subprocess
import sys

import pytest
import tool_processes
import torch

pytest.importorskip("detectron2")

from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from test_iounet_model import _batch

from prroi_d2 import add_iounet_config
from prroi_d2.data import generate_synthetic_coco
from prroi_d2.engine.lazy_train import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = {  # YAML config -> its LazyConfig
    "iounet_synthetic_R18.yaml": "iounet_synthetic_R18.py",
    "iounet_cascade_synthetic_R18.yaml": "iounet_cascade_synthetic_R18.py",
    "iounet_R50.yaml": "iounet_R50_FPN.py",
    "iounet_cascade_R50.yaml": "iounet_cascade_R50_FPN.py",
}


def _models(yaml_name, score_thresh=None):
    cfg = get_cfg()
    add_iounet_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", yaml_name))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    lazy = LazyConfig.load(os.path.join(REPO, "configs", "lazy", PAIRS[yaml_name]))
    if score_thresh is not None:  # untrained models: detect something
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_thresh
        heads = lazy.model.roi_heads
        for predictor in heads.box_predictors if "box_predictors" in heads else [heads.box_predictor]:
            predictor.test_score_thresh = score_thresh
    return build_model(cfg), instantiate(lazy.model)


@pytest.mark.parametrize("yaml_name", ["iounet_R50.yaml", "iounet_cascade_R50.yaml"])
def test_coco_lazy_model_loads_the_yaml_state_dict_strictly_with_the_same_trainable_parameters(yaml_name):
    ours, lazy = _models(yaml_name)
    assert type(ours) is type(lazy) and type(ours.roi_heads) is type(lazy.roi_heads)
    lazy.load_state_dict(ours.state_dict(), strict=True)
    trainable = lambda m: {n for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable(ours) == trainable(lazy)
    assert not any(n.startswith("backbone.bottom_up.stem.") for n in trainable(lazy))  # FREEZE_AT 2
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(lazy)


@pytest.mark.parametrize("yaml_name", ["iounet_synthetic_R18.yaml", "iounet_cascade_synthetic_R18.yaml"])
def test_synthetic_lazy_model_equals_the_yaml_model(yaml_name):
    ours, lazy = _models(yaml_name, score_thresh=0.0)
    lazy.load_state_dict(ours.state_dict(), strict=True)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in lazy.named_parameters() if p.requires_grad
    }
    # Fixed-seed losses in training: the same sampling, the same numbers.
    losses = []
    for model in (ours, lazy):
        model.train()
        torch.manual_seed(7)
        with EventStorage():
            losses.append({k: float(v) for k, v in model(_batch(seed=1)).items()})
    assert "loss_iou" in losses[0] and losses[0] == losses[1]
    # Every stage in eval.
    outputs = []
    for model in (ours, lazy):
        model.eval()
        with torch.no_grad():
            outputs.append(model(_batch(seed=2)))
    for a, b in zip(*outputs):
        assert set(a["stages"]) == set(b["stages"]) == {"baseline", "iou_nms", "refined"}
        pairs = [(a["instances"], b["instances"])] + [(a["stages"][s], b["stages"][s]) for s in a["stages"]]
        for x, y in pairs:
            assert len(x) > 0 and x.get_fields().keys() == y.get_fields().keys()
            for name in x.get_fields():
                u, v = x.get(name), y.get(name)
                u, v = (u.tensor, v.tensor) if hasattr(u, "tensor") else (u, v)
                torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_overrides_are_checked_and_applied():
    path = os.path.join(REPO, "configs", "lazy", "iounet_cascade_synthetic_R18.py")
    cfg = load_config(path, ["train.max_iter=7", "model.roi_heads.iou_branch.refine_step=1.0", "train.seed=3"])
    assert cfg.train.max_iter == 7 and cfg.model.roi_heads.iou_branch.refine_step == 1.0 and cfg.train.seed == 3
    cfg = load_config(path, ["model.roi_heads.batch_size_per_image=64"])  # an argument the heads take
    assert instantiate(cfg.model).roi_heads.batch_size_per_image == 64
    with pytest.raises(SystemExit, match="model.roi_heads.iou_branch.refine_stpe"):
        load_config(path, ["model.roi_heads.iou_branch.refine_stpe=1.0"])
    with pytest.raises(SystemExit, match="key=value"):
        load_config(path, ["train.max_iter", "7"])


def test_train_net_trains_and_evaluates_every_stage_from_a_lazy_config(tmp_path):
    out = tmp_path / "out"
    data = tmp_path / "data"
    register = []
    for name, split, n in (("lazy_train", "train", 4), ("lazy_val", "val", 3)):
        register += ["--register", name, generate_synthetic_coco(str(data), split, n), str(data / split)]
    overrides = [
        "dataloader.train.dataset.names=lazy_train",
        "dataloader.test.dataset.names=lazy_val",
        f"train.output_dir={out}",
        "train.max_iter=2",
        "train.log_period=1",
        "train.seed=5",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "model.proposal_generator.post_nms_topk=[64,50]",
        "model.roi_heads.batch_size_per_image=32",
        "model.roi_heads.iou_branch.jitter.num_samples=16",
        "model.roi_heads.box_predictors.2.test_topk_per_image=150",  # the evaluator's cap follows the last stage's
    ]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    config = os.path.join(REPO, "configs", "lazy", "iounet_cascade_synthetic_R18.py")
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", config, *register, *overrides]
    proc = tool_processes.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "model_final.pth").exists()
    with open(out / "inference" / "iounet_stages.json") as f:
        stages = json.load(f)
    assert {"baseline", "iou_nms", "refined"} <= set(stages)
    with open(out / "inference" / "iounet_stages.md") as f:
        assert "COCOeval maxDets 150 " in f.read()
    printed = proc.stdout + proc.stderr
    assert "| refined |" in printed
    with open(out / "metrics.json") as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    assert any("loss_iou" in m for m in metrics)
    checkpoint = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert "roi_heads.iou_head.predictor.weight" in checkpoint["model"] and checkpoint["iteration"] == 1
    assert "optimizer" in checkpoint["trainer"]  # resumable: the optimizer state is saved with the model


def test_nothing_imports_detectron2_export():
    code = (
        "import sys; import prroi_d2.lazy_config, prroi_d2.engine.lazy_train; from detectron2.config import "
        f"LazyConfig; LazyConfig.load({os.path.join(REPO, 'configs', 'lazy', 'iounet_cascade_R50_FPN.py')!r}); "
        "assert not [m for m in sys.modules if m.startswith('detectron2.export')]; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=REPO), capture_output=True)
    assert proc.returncode == 0 and b"ok" in proc.stdout, proc.stderr[-2000:]


def test_lazy_gradient_clipping_is_detectron2s_and_its_keys_are_checked():
    from omegaconf import OmegaConf

    from prroi_d2.engine.lazy_train import _with_gradient_clipping

    cfg = load_config(os.path.join(REPO, "configs", "lazy", "iounet_synthetic_R18.py"), [])
    assert dict(cfg.train.clip_gradients) == {"enabled": True, "clip_type": "norm", "clip_value": 1.0}  # as the YAML
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = _with_gradient_clipping(torch.optim.SGD([weight], lr=0.5), cfg.train.clip_gradients)
    weight.grad = torch.tensor([6.0, 8.0, 0.0])  # norm 10, clipped to 1
    optimizer.step()
    assert torch.allclose(weight.detach(), torch.tensor([-0.3, -0.4, 0.0]))
    for bad, message in (({"clip_vale": 1.0}, "train.clip_gradients.clip_vale: unknown key"),
                         ({"clip_type": "l2"}, "clip_type must be 'value' or 'norm', got 'l2'")):  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            _with_gradient_clipping(torch.optim.SGD([weight], lr=0.5), OmegaConf.create(bad))


def test_lazy_training_names_an_image_that_does_not_decode(tmp_path):
    from coco_files import write_coco_set

    json_file, image_root = write_coco_set(str(tmp_path / "broken"), num_images=2, size=(64, 48))
    path = os.path.join(image_root, "1.png")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    config = os.path.join(REPO, "configs", "lazy", "iounet_synthetic_R18.py")
    overrides = ["dataloader.train.dataset.names=broken", "dataloader.test.dataset.names=broken",
                 f"train.output_dir={tmp_path / 'out'}", "train.max_iter=4", "dataloader.train.total_batch_size=2",
                 "dataloader.train.num_workers=1", "model.roi_heads.num_classes=3"]  # fmt: skip
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", config,
           "--register", "broken", json_file, image_root, *overrides]  # fmt: skip
    proc = tool_processes.run(cmd, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Cannot decode image {path} of dataset 'broken': OSError: image file is truncated"), last


def test_lazy_values_are_checked_before_training_with_their_keys(tmp_path):
    """Issue 31 item 5: the YAML path's rules on the LazyConfig path, one line per key, before anything is built."""
    config = os.path.join(REPO, "configs", "lazy", "iounet_synthetic_R18.py")
    overrides = ["model.roi_heads.iou_branch.refine_step=-1.0", "model.roi_heads.iou_branch.nms_thresh=1.5",
                 "train.max_iter=abc", f"train.output_dir={tmp_path / 'out'}"]  # fmt: skip
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", config, *overrides]
    proc = tool_processes.run(cmd, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    printed = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in printed and "Starting training" not in printed, printed[-3000:]
    assert proc.stderr.strip().splitlines()[-4:] == [
        f"{config}: Invalid config value(s):",
        "  model.roi_heads.iou_branch.nms_thresh must be a finite number in [0, 1], got 1.5",
        "  model.roi_heads.iou_branch.refine_step must be a finite number > 0 (lambda, the step size), got -1.0",
        "  train.max_iter must be an integer >= 1, got 'abc'",
    ]
    assert not (tmp_path / "out").exists()  # refused before the run's folder was made


def test_a_lazy_config_that_does_not_load_is_named(tmp_path):
    """A LazyConfig copied away from configs/lazy/ (its relative imports stay behind) or with a syntax error."""
    with open(os.path.join(REPO, "configs", "lazy", "iounet_synthetic_R18.py")) as f:
        (tmp_path / "copied.py").write_text(f.read())
    (tmp_path / "syntax.py").write_text("model = dict(\n")
    for name, cause in (("copied.py", "ImportError: "), ("syntax.py", "SyntaxError: ")):
        with pytest.raises(SystemExit) as info:
            load_config(str(tmp_path / name), [])
        assert str(info.value).startswith(f"Config file {tmp_path / name} does not load: {cause}"), str(info.value)
        assert "\n" not in str(info.value)
