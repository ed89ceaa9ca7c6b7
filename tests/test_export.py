"""Export (tools/export_model.py): IoU-Net traced whole, refinement and IoU-guided NMS on, equals the eager model on
images of other sizes and detection counts than the one it was traced on, loaded in a fresh process without
Detectron2. Real Detectron2 models (R18-FPN, random weights, small images) on the CPU; CUDA when available."""

import os
import subprocess
import sys

import pytest
import tool_processes
import torch

pytest.importorskip("detectron2")

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from prroi_d2 import add_iounet_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import export_model  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# (config, overrides): the demo config, its Cascade variant, and a Mask R-CNN variant (masks on refined boxes).
CONFIGS = {
    "synthetic": ("iounet_synthetic_R18.yaml", []),
    "cascade": ("iounet_cascade_synthetic_R18.yaml", []),
    "mask": ("iounet_synthetic_R18.yaml", ["MODEL.MASK_ON", True, "MODEL.ROI_MASK_HEAD.NUM_CONV", 1]),
}
# Small and fast, with real detections from random weights: score threshold near the untrained scores (so the
# candidate count depends on the image) and a per-image cap above what IoU-guided NMS keeps (so counts vary).
TINY = [
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 300,
    "MODEL.RPN.POST_NMS_TOPK_TEST", 60,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.17,
    "TEST.DETECTIONS_PER_IMAGE", 200,
    "MODEL.IOU_NET.OUTPUT_STAGES", False,
    "MODEL.FPN.OUT_CHANNELS", 32,
]  # fmt: skip
SIZES = [(128, 160), (96, 96), (80, 128), (136, 112), (64, 96), (120, 150), (96, 72), (144, 144), (72, 120),
         (104, 136), (88, 88)]  # fmt: skip


def _cfg(name, device="cpu", extra=()):
    config, overrides = CONFIGS[name]
    cfg = get_cfg()
    add_iounet_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", config))
    cfg.merge_from_list(list(overrides) + TINY + list(extra))
    cfg.MODEL.DEVICE = device
    return cfg


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    predictors = model.roi_heads.box_predictor
    with torch.no_grad():  # a less uniform box classifier than the initial one: scores differ between boxes
        for predictor in predictors if isinstance(predictors, torch.nn.ModuleList) else [predictors]:
            predictor.cls_score.weight.normal_(0, 0.05)
    return model


def _images(device="cpu", seed=0):
    """Images of SIZES with a few bright rectangles each (something to detect), float32 (3, H, W)."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for h, w in SIZES:
        image = torch.randint(60, 120, (3, h, w), generator=g).float()
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            x0, y0 = int(torch.randint(0, w - 24, (1,), generator=g)), int(torch.randint(0, h - 24, (1,), generator=g))
            x1, y1 = (
                x0 + int(torch.randint(16, w - x0 + 1, (1,), generator=g)),
                y0 + int(torch.randint(16, h - y0 + 1, (1,), generator=g)),
            )
            image[:, y0:y1, x0:x1] = float(torch.randint(150, 255, (1,), generator=g))
        images.append(image.to(device))
    return images


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["synthetic", "cascade", "mask"])
def test_traced_equals_eager_on_other_sizes_and_counts(name, device, tmp_path):
    cfg = _cfg(name, device)
    model = _model(cfg)
    names = export_model.output_names(cfg)
    assert "pred_boxes_initial" in names and (("pred_masks" in names) == (name == "mask"))
    images = _images(device)
    path = str(tmp_path / "model.ts")
    traced = export_model.export_torchscript(model, names, images[0], path)
    assert model.roi_heads.iou_tf32 is False  # eager now computes what the file does (no TF32 in a trace)
    counts = []
    with torch.no_grad():
        for image in images[1:]:
            eager = export_model.detections(model, image, names)
            got = traced(image)
            assert export_model.compare(names, eager, got, 1e-4) == "", tuple(image.shape)
            counts.append(len(eager[0]))
    assert min(counts) > 0 and len(set(counts)) >= 3, counts  # real detections, and varied counts
    # Refinement ran inside the trace: boxes moved, the predicted IoU never went down.
    eager = dict(zip(names, export_model.detections(model, images[3], names)))
    assert not torch.equal(eager["pred_boxes"], eager["pred_boxes_initial"])
    assert (eager["pred_ious"] >= eager["pred_ious_initial"]).all()


def _weights(cfg, tmp_path):
    model = _model(cfg)
    path = str(tmp_path / "weights.pth")
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("weights")
    return path


def _write_images(tmp_path, count=4):
    from PIL import Image

    paths = []
    for i, image in enumerate(_images()[:count]):
        path = str(tmp_path / f"sample{i}.png")
        Image.fromarray(image.permute(1, 2, 0).clamp(0, 255).byte().numpy()).save(path)
        paths.append(path)
    return paths


def _run_tool(args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return tool_processes.run(
        [sys.executable, os.path.join(REPO, "tools", "export_model.py")] + args,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow(seconds=15)
def test_tool_exports_and_checks_in_a_fresh_process(tmp_path):
    cfg = _cfg("synthetic")
    weights = _weights(cfg, tmp_path)
    images = _write_images(tmp_path)
    out = tmp_path / "export"
    overrides = [str(v) for v in TINY] + ["MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu"]
    args = ["--config-file", os.path.join(REPO, "configs", "iounet_synthetic_R18.yaml"), "--output", str(out)]
    args += sum((["--sample-image", p] for p in images), []) + ["--num-images", "5", "--run", "--repeats", "2"]
    done = _run_tool(args + overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "matches eager on 5 images in a fresh process" in done.stdout
    assert "latency on cpu" in done.stdout
    assert (out / "model.ts").is_file() and (out / "model.json").is_file()
    # The file runs where only torch and the op layer are imported; its outputs are those model.json names.
    probe = (
        "import json, sys, torch, torchvision, prroi_d2\n"
        f"m = torch.jit.load({str(out / 'model.ts')!r})\n"
        "outs = m(torch.full((3, 100, 120), 100.0))\n"
        f"names = json.load(open({str(out / 'model.json')!r}))['outputs']\n"
        "assert len(outs) == len(names) and outs[0].shape[1] == 4\n"
        "bad = [m for m in sys.modules if m.startswith(('detectron2', 'prroi_d2.modeling'))]\n"
        "assert not bad, bad\n"
        "print('ok', len(outs[0]))\n"
    )
    ran = subprocess.run([sys.executable, "-c", probe], env=dict(os.environ, PYTHONPATH=REPO), capture_output=True)
    assert ran.returncode == 0, ran.stderr.decode()[-2000:]


def test_tool_names_bad_input_in_one_line(tmp_path):
    config = os.path.join(REPO, "configs", "iounet_synthetic_R18.yaml")
    done = _run_tool(["--config-file", config, "--output", str(tmp_path)])
    assert done.returncode == 1 and "MODEL.WEIGHTS is empty" in done.stderr
    # One line of ours (torch's own import-time FutureWarnings may precede it), no traceback.
    assert "Traceback" not in done.stderr and done.stderr.strip().splitlines()[-1].startswith("export_model: MODEL")
    done = _run_tool(["--config-file", config, "--output", str(tmp_path), "MODEL.WEIGHTS", str(tmp_path / "no.pth")])
    assert done.returncode == 1 and "no.pth: no such file" in done.stderr
    done = _run_tool(["--config-file", config, "--output", str(tmp_path), "MODEL.NO_SUCH_KEY", "1"])
    assert done.returncode == 1 and "NO_SUCH_KEY" in done.stderr and "Traceback" not in done.stderr
