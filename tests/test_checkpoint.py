"""SafeCheckpointer (atomic writes, resume past an unreadable checkpoint), the --eval-only weight checks and the
head-only frozen-key check, on real checkpoint files and real Detectron2 models; and a real training process killed
in the middle of writing a checkpoint."""

import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from prroi_d2 import add_iounet_config
from prroi_d2.engine.checkpoint import (
    CheckpointReadError,
    SafeCheckpointer,
    WeightsError,
    check_frozen_weights_loaded,
    load_weights_for_eval,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
SYNTHETIC = os.path.join(REPO, "configs", "iounet_synthetic_R18.yaml")


def _cfg(output_dir, *opts):
    cfg = get_cfg()
    add_iounet_config(cfg)
    cfg.merge_from_file(SYNTHETIC)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(output_dir), "MODEL.FPN.OUT_CHANNELS", "32",
                         "MODEL.ROI_BOX_HEAD.FC_DIM", "16", "MODEL.IOU_NET.HEAD.FC_DIM", "16", *opts])  # fmt: skip
    return cfg


@pytest.fixture(scope="module")
def model_and_cfg(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("out"))
    torch.manual_seed(0)
    return build_model(cfg), cfg


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 3])


def test_save_is_atomic_and_resume_falls_back_past_a_truncated_checkpoint(model_and_cfg, tmp_path, caplog):
    model, _ = model_and_cfg
    checkpointer = SafeCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    first = _state(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    checkpointer.save("model_0000003", iteration=3)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth", "model_0000003.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"

    _truncate(tmp_path / "model_0000003.pth")
    with caplog.at_level(logging.WARNING):
        extra = SafeCheckpointer(model, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 1
    assert all(torch.equal(v, first[k]) for k, v in model.state_dict().items())
    warning = caplog.text
    assert f"Cannot read checkpoint {tmp_path / 'model_0000003.pth'}: a truncated or corrupt zip archive" in warning
    assert f"falling back to the previous checkpoint {tmp_path / 'model_0000001.pth'}" in warning

    os.remove(tmp_path / "model_0000003.pth")  # last_checkpoint names a file that is gone
    assert SafeCheckpointer(model, save_dir=str(tmp_path)).resume_or_load("", resume=True)["iteration"] == 1
    assert f"Cannot read checkpoint {tmp_path / 'model_0000003.pth'}: no such file" in caplog.text

    _truncate(tmp_path / "model_0000001.pth")
    with pytest.raises(CheckpointReadError, match="--resume: no checkpoint in .* can be read"):
        SafeCheckpointer(model, save_dir=str(tmp_path)).resume_or_load("", resume=True)


def test_eval_only_refuses_missing_or_foreign_weights(model_and_cfg, tmp_path, caplog):
    model, cfg = model_and_cfg
    with pytest.raises(WeightsError, match="--eval-only needs trained weights, but MODEL.WEIGHTS is empty and"):
        load_weights_for_eval(model, cfg, resume=True)

    text = tmp_path / "weights.pth"
    text.write_text("not a model\n")
    cfg = _cfg(tmp_path, "MODEL.WEIGHTS", str(text))
    with pytest.raises(CheckpointReadError) as info:
        load_weights_for_eval(model, cfg, resume=False)
    expected = f"Cannot read checkpoint {text}: a text file of 12 bytes, not a PyTorch checkpoint"
    assert str(info.value).startswith(expected)

    other = tmp_path / "other.pth"
    torch.save({"model": {"backbone.fc.weight": torch.zeros(2, 2)}}, other)
    cfg = _cfg(tmp_path, "MODEL.WEIGHTS", str(other))
    with pytest.raises(WeightsError) as info:
        load_weights_for_eval(model, cfg, resume=False)
    total = len(model.state_dict())
    assert f"the checkpoint {other} does not fit the model: {total} of its {total} keys are missing" in str(info.value)
    assert "--allow-partial-weights" in str(info.value)
    with caplog.at_level(logging.WARNING):
        assert load_weights_for_eval(model, cfg, resume=False, allow_partial=True) == str(other)
    assert "Evaluating anyway (--allow-partial-weights)" in caplog.text


def test_eval_only_names_keys_skipped_for_another_num_classes(model_and_cfg, tmp_path):
    model, _ = model_and_cfg
    three = build_model(_cfg(tmp_path, "MODEL.ROI_HEADS.NUM_CLASSES", "3"))
    path = tmp_path / "three.pth"
    torch.save({"model": three.state_dict()}, path)
    with pytest.raises(WeightsError) as info:
        load_weights_for_eval(model, _cfg(tmp_path, "MODEL.WEIGHTS", str(path)), resume=False)
    assert "0 of its" in str(info.value) and "were skipped for a shape mismatch" in str(info.value)
    assert "roi_heads.box_predictor.cls_score.weight (4, 16) vs (6, 16)" in str(info.value)
    # The same checkpoint of the same model loads.
    assert load_weights_for_eval(three, _cfg(tmp_path, "MODEL.WEIGHTS", str(path)), resume=False) == str(path)


def test_head_only_training_needs_every_frozen_key(tmp_path):
    detector = build_model(_cfg(tmp_path, "MODEL.META_ARCHITECTURE", "GeneralizedRCNN",
                                "MODEL.ROI_HEADS.NAME", "StandardROIHeads"))  # fmt: skip
    weights = {k: v for k, v in detector.state_dict().items()}
    path = tmp_path / "detector.pth"
    torch.save({"model": weights}, path)
    cfg = _cfg(tmp_path, "MODEL.IOU_NET.TRAIN_ONLY_IOU_HEAD", "True", "MODEL.WEIGHTS", str(path))
    head_only = build_model(cfg)
    checkpointer = SafeCheckpointer(head_only, save_dir=str(tmp_path))
    checkpointer.resume_or_load(str(path), resume=False)
    check_frozen_weights_loaded(
        checkpointer, cfg.MODEL.IOU_NET.TRAIN_ONLY_IOU_HEAD
    )  # only the IoU head is missing: fine
    assert any(k.startswith("roi_heads.iou_head.") for k in checkpointer.incompatible.missing_keys)

    weights.pop("backbone.bottom_up.stem.conv1.weight")
    torch.save({"model": weights}, path)
    checkpointer.resume_or_load(str(path), resume=False)
    with pytest.raises(WeightsError, match="TRAIN_ONLY_IOU_HEAD: 1 frozen keys .*backbone.bottom_up.stem.conv1"):
        check_frozen_weights_loaded(checkpointer, cfg.MODEL.IOU_NET.TRAIN_ONLY_IOU_HEAD)
    checkpointer.resume_or_load("", resume=False)
    with pytest.raises(WeightsError, match="no weights were loaded .MODEL.WEIGHTS is empty"):
        check_frozen_weights_loaded(checkpointer, cfg.MODEL.IOU_NET.TRAIN_ONLY_IOU_HEAD)


def _tiny(output_dir, max_iter):
    return [
        "MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
        "MODEL.IOU_NET.HEAD.FC_DIM", "32", "MODEL.IOU_NET.JITTER.NUM_PER_IMAGE", "16",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "32",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.MAX_ITER", str(max_iter), "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()",
        "OUTPUT_DIR", str(output_dir),
    ]  # fmt: skip


def test_training_killed_while_writing_a_checkpoint_resumes(tmp_path):
    """Kill a real training run while it writes its second checkpoint: the half-written bytes never take the
    checkpoint's name and last_checkpoint still names the first one. Then the same bytes as the latest checkpoint
    (what a non-atomic writer leaves): --resume warns, falls back to the first and finishes the run."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, TRAIN_NET, "--config-file", SYNTHETIC]
    # The second checkpoint's temporary file is a pipe: its writer blocks once the pipe is full, mid-write.
    pipe = tmp_path / "model_0000003.pth.tmp"
    os.mkfifo(pipe)
    reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
    log = open(tmp_path.parent / f"{tmp_path.name}.log", "w+")
    proc = subprocess.Popen(cmd + _tiny(tmp_path, 6), env=env, stdout=log, stderr=subprocess.STDOUT)
    partial, deadline = b"", time.time() + 240
    try:
        while len(partial) < 256 * 1024 and time.time() < deadline:
            assert proc.poll() is None, open(log.name).read()[-3000:]
            try:
                chunk = os.read(reader, 1 << 16)
            except BlockingIOError:
                chunk = b""
            partial += chunk
            if not chunk:
                time.sleep(0.05)
        assert proc.poll() is None, "training ended before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        os.close(reader)
        log.close()
        if proc.poll() is None:
            proc.kill()
    assert len(partial) >= 256 * 1024 and partial.startswith(b"PK")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (tmp_path / "model_0000003.pth").exists()
    first = torch.load(tmp_path / "model_0000001.pth", weights_only=False)
    assert first["iteration"] == 1
    os.remove(pipe)

    (tmp_path / "model_0000003.pth").write_bytes(partial)
    (tmp_path / "last_checkpoint").write_text("model_0000003.pth")
    resumed = subprocess.run(cmd + ["--resume"] + _tiny(tmp_path, 6), env=env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    printed = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, printed[-3000:]
    assert f"Cannot read checkpoint {tmp_path / 'model_0000003.pth'}: a truncated or corrupt zip archive" in printed
    assert f"falling back to the previous checkpoint {tmp_path / 'model_0000001.pth'}" in printed
    assert "Starting training from iteration 2" in printed
    final = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert final["iteration"] == 5
    assert torch.load(tmp_path / "model_0000001.pth", weights_only=False)["iteration"] == 1  # nothing lost
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
