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
import tool_processes
import torch

pytest.importorskip("detectron2")

from detectron2.config import get_cfg
from detectron2.engine import SimpleTrainer, hooks
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer

from prroi_d2 import add_iounet_config
from prroi_d2.engine.checkpoint import (
    CheckpointReadError,
    ResumeMismatchError,
    SafeCheckpointer,
    WeightsError,
    check_frozen_weights_loaded,
    load_weights_for_eval,
)
from prroi_d2.engine.checkpoint_hook import with_checkpoint_retention

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
        "MODEL.IOU_NET.CALIBRATION.DATASET", "",
        "OUTPUT_DIR", str(output_dir),
    ]  # fmt: skip


@pytest.mark.slow
def test_training_killed_while_writing_a_checkpoint_resumes(tmp_path):
    """Kill a real training run while it writes its second checkpoint: the half-written bytes never take the
    checkpoint's name and last_checkpoint still names the first one. Then the same bytes as the latest checkpoint
    (what a non-atomic writer leaves): --resume warns, falls back to the first and finishes the run."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, TRAIN_NET, "--config-file", SYNTHETIC]
    # The second checkpoint's temporary file (one name per process) is a pipe: its writer blocks once the pipe is
    # full, mid-write. The run takes seconds to reach it.
    log = open(tmp_path.parent / f"{tmp_path.name}.log", "w+")
    proc = subprocess.Popen(cmd + _tiny(tmp_path, 6), env=env, stdout=log, stderr=subprocess.STDOUT)
    pipe = tmp_path / f"model_0000003.pth.tmp.{proc.pid}"
    os.mkfifo(pipe)
    reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
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
    resumed = tool_processes.run(cmd + ["--resume"] + _tiny(tmp_path, 6), env=env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    printed = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, printed[-3000:]
    assert f"Cannot read checkpoint {tmp_path / 'model_0000003.pth'}: a truncated or corrupt zip archive" in printed
    assert f"falling back to the previous checkpoint {tmp_path / 'model_0000001.pth'}" in printed
    assert "Starting training from iteration 2" in printed
    final = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert final["iteration"] == 5
    assert torch.load(tmp_path / "model_0000001.pth", weights_only=False)["iteration"] == 1  # nothing lost
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]


def _with_optimizer_state(cfg):
    """A model of ``cfg`` and its optimizer after one step (momentum buffers of every parameter's shape)."""
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("other", ["num_classes", "model"])
def test_resume_refuses_a_checkpoint_of_another_model_or_num_classes(model_and_cfg, tmp_path, other):
    """Before: the shape mismatch was skipped with a warning and the optimizer's momentum of the other shape made
    the first step fail (RuntimeError: the size of tensor a (4) must match ... (6)); another model's optimizer
    state failed to load (ValueError: ... parameter group that doesn't match ...)."""
    _, cfg = model_and_cfg
    opts = ["MODEL.ROI_HEADS.NUM_CLASSES", "3"] if other == "num_classes" else [
        "MODEL.META_ARCHITECTURE", "GeneralizedRCNN", "MODEL.ROI_HEADS.NAME", "StandardROIHeads"]  # fmt: skip
    theirs, their_optimizer = _with_optimizer_state(_cfg(tmp_path, *opts))
    SafeCheckpointer(theirs, save_dir=str(tmp_path), optimizer=their_optimizer).save("model_0000009", iteration=9)

    ours, our_optimizer = _with_optimizer_state(cfg)
    before = {k: v["momentum_buffer"].clone() for k, v in our_optimizer.state_dict()["state"].items()}
    assert len(before) == len(list(ours.parameters()))
    with pytest.raises(ResumeMismatchError) as info:
        SafeCheckpointer(ours, save_dir=str(tmp_path), optimizer=our_optimizer).resume_or_load("", resume=True)
    message = str(info.value)
    path = tmp_path / "model_0000009.pth"
    assert "\n" not in message
    assert message.startswith(f"--resume: checkpoint {path} comes from a different model or config: ")
    if other == "num_classes":
        assert "key roi_heads.box_predictor.cls_score.weight has shape (4, 16) there and (6, 16) in the model" in (
            message
        )
        assert "(MODEL.ROI_HEADS.NUM_CLASSES changed?)" in message
    else:
        assert "the model's key roi_heads.iou_head." in message and "is not in it" in message
    assert "MODEL.WEIGHTS FILE without --resume" in message
    after = our_optimizer.state_dict()["state"]  # refused before the optimizer's state was replaced
    assert all(torch.equal(v, after[k]["momentum_buffer"]) for k, v in before.items())

    # Without --resume, the same file fine-tunes: the other shapes are skipped (Detectron2's behaviour).
    SafeCheckpointer(ours, save_dir=str(tmp_path)).resume_or_load(str(path), resume=False)


class _LinearLoss(torch.nn.Module):
    """The smallest model Detectron2's SimpleTrainer trains: a dict of losses."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 1)

    def forward(self, batch):
        return {"loss": self.fc(batch).pow(2).mean()}


def _checkpoints_left(folder, keep, max_iter=7, period=2):
    torch.manual_seed(0)
    model = _LinearLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SimpleTrainer(model, iter(lambda: torch.randn(8, 4), None), optimizer)
    checkpointer = SafeCheckpointer(model, save_dir=str(folder))
    detectron2_hook = hooks.PeriodicCheckpointer(checkpointer, period)
    trainer.register_hooks(with_checkpoint_retention([detectron2_hook], keep) if keep != "detectron2" else
                           [detectron2_hook])  # fmt: skip
    trainer.train(0, max_iter)
    final = torch.load(folder / "model_final.pth", weights_only=True)
    assert final["iteration"] == max_iter - 1
    assert torch.equal(final["model"]["fc.weight"], model.fc.weight.detach())
    assert (folder / "last_checkpoint").read_text() == "model_final.pth"
    return sorted(name for name in os.listdir(folder) if name.endswith(".pth"))


@pytest.mark.parametrize(
    "keep, max_iter, left",
    [
        # Detectron2: every periodic checkpoint, and at the last iteration one identical to model_final.
        ("detectron2", 6, ["model_0000001.pth", "model_0000003.pth", "model_0000005.pth", "model_final.pth"]),
        (0, 6, ["model_final.pth"]),  # SOLVER.CHECKPOINT_KEEP's default
        (0, 7, ["model_final.pth"]),
        (1, 7, ["model_0000005.pth", "model_final.pth"]),
        (-1, 6, ["model_0000001.pth", "model_0000003.pth", "model_final.pth"]),  # all, without the duplicate
    ],
)
def test_checkpoint_keep(tmp_path, keep, max_iter, left):
    assert _checkpoints_left(tmp_path, keep, max_iter) == left


def test_checkpoint_keep_must_be_an_integer_from_minus_one():
    for bad in (-2, 1.5, "all", True):
        with pytest.raises(SystemExit, match="SOLVER.CHECKPOINT_KEEP must be an integer >= -1"):
            with_checkpoint_retention([], bad)


def test_a_run_keeps_only_model_final_and_refuses_to_resume_with_another_model(tmp_path):
    """The real trainer: periodic checkpoints while training, only model_final.pth at the end (SOLVER.
    CHECKPOINT_KEEP 0); then --resume of that folder with another box head (MODEL.ROI_BOX_HEAD.FC_DIM) stops with
    one line before training. (Another NUM_CLASSES on the same data is stopped earlier by the pre-flight check.)"""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, TRAIN_NET, "--config-file", SYNTHETIC]
    first = tool_processes.run(cmd + _tiny(tmp_path, 4), env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    assert "Saving checkpoint to " + str(tmp_path / "model_0000001.pth") in first.stderr + first.stdout
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".pth")) == ["model_final.pth"]

    other = tool_processes.run(cmd + ["--resume"] + _tiny(tmp_path, 6) + ["MODEL.ROI_BOX_HEAD.FC_DIM", "16"], env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    printed = other.stdout + other.stderr
    assert other.returncode == 1, printed[-3000:]
    assert "Traceback" not in printed and "Starting training" not in printed, printed[-3000:]
    lines = [line for line in printed.splitlines() if line.startswith("--resume:")]
    assert len(lines) == 1, printed[-3000:]
    assert lines[0].startswith(f"--resume: checkpoint {tmp_path / 'model_final.pth'} comes from a different model")
    assert "key roi_heads.box_head.fc1.weight has shape (32, " in lines[0] and ") there and (16, " in lines[0]
    assert "NUM_CLASSES" not in lines[0]
