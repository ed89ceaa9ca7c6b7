"""The IoU head's training signal (iou_net/train_pearson, iou_net/loss_ratio) and the warning when it stalls."""

import logging
import math

import pytest
import torch
from detectron2.engine import SimpleTrainer
from torch import nn

from prroi_d2.engine import IoULearningMonitor
from prroi_d2.modeling.iou_training_signal import iou_training_signal, put_iou_training_signal


def _smooth_l1(x, y, beta):
    d = abs(x - y)
    return 0.5 * d * d / beta if d < beta else d - 0.5 * beta


def _bce(logit, t):
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(t * math.log(p) + (1.0 - t) * math.log(1.0 - p))


def _entropy(t):
    return 0.0 if t in (0.0, 1.0) else -(t * math.log(t) + (1.0 - t) * math.log(1.0 - t))


def _reference(outputs, ious, loss_type, beta=1.0):
    """Plain-loop float64 reference of the ratio and the Pearson correlation."""
    n = len(ious)
    if loss_type == "bce":
        pred = [1.0 / (1.0 + math.exp(-o)) for o in outputs]
        loss = sum(_bce(o, t) for o, t in zip(outputs, ious)) / n
        floor = sum(_entropy(t) for t in ious) / n
        constant = _entropy(sum(ious) / n)
    else:
        targets = [2.0 * t - 1.0 for t in ious]
        pred = [(o + 1.0) / 2.0 for o in outputs]
        loss = sum(_smooth_l1(o, t, beta) for o, t in zip(outputs, targets)) / n
        floor = 0.0
        mean = sum(targets) / n
        constant = sum(_smooth_l1(mean, t, beta) for t in targets) / n
    mp, mt = sum(pred) / n, sum(ious) / n
    cov = sum((p - mp) * (t - mt) for p, t in zip(pred, ious))
    var = math.sqrt(sum((p - mp) ** 2 for p in pred) * sum((t - mt) ** 2 for t in ious))
    return (loss - floor) / (constant - floor), cov / var


@pytest.mark.parametrize("loss_type", ["smooth_l1", "bce"])
def test_signal_matches_plain_loops(loss_type):
    g = torch.Generator().manual_seed(0)
    ious = 0.3 + 0.7 * torch.rand(200, generator=g, dtype=torch.float64)
    outputs = torch.randn(200, generator=g, dtype=torch.float64) * 0.5
    signal = iou_training_signal(outputs.float(), ious.float(), loss_type)
    ratio, pearson = _reference(outputs.float().double().tolist(), ious.float().double().tolist(), loss_type)
    assert signal["loss_ratio"].item() == pytest.approx(ratio, rel=1e-6)
    assert signal["train_pearson"].item() == pytest.approx(pearson, rel=1e-6)


@pytest.mark.parametrize("loss_type", ["smooth_l1", "bce"])
def test_constant_is_one_perfect_is_zero(loss_type):
    ious = torch.linspace(0.5, 1.0, 64)
    if loss_type == "bce":
        perfect, constant = torch.logit(ious.clamp(max=1 - 1e-6)), torch.logit(ious.mean()).expand(64)
    else:
        perfect, constant = 2 * ious - 1, (2 * ious - 1).mean().expand(64)
    assert iou_training_signal(constant, ious, loss_type)["loss_ratio"].item() == pytest.approx(1.0, abs=1e-9)
    assert iou_training_signal(perfect, ious, loss_type)["loss_ratio"].item() == pytest.approx(0.0, abs=1e-4)
    assert iou_training_signal(perfect, ious, loss_type)["train_pearson"].item() == pytest.approx(1.0, abs=1e-6)


def test_undefined_is_nan_and_not_put():
    one = iou_training_signal(torch.zeros(1), torch.full((1,), 0.7), "smooth_l1")
    flat = iou_training_signal(torch.randn(8), torch.full((8,), 0.7), "smooth_l1")
    assert math.isnan(one["loss_ratio"]) and math.isnan(one["train_pearson"])
    assert math.isnan(flat["loss_ratio"]) and math.isnan(flat["train_pearson"])
    put_iou_training_signal(torch.zeros(3), torch.rand(3), "bce")  # outside a training loop: nothing, no error


class _IoURegressor(nn.Module):
    """A model whose training loss is an IoU head's: it regresses IoU targets that depend on its input (learnable),
    or, frozen at a constant, cannot learn."""

    def __init__(self, learn: bool):
        super().__init__()
        self.linear = nn.Linear(4, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.constant_(self.linear.bias, 0.5)
        self.linear.requires_grad_(learn)
        self.anchor = nn.Parameter(torch.zeros(()))  # keeps the optimizer non-empty when frozen

    def forward(self, batch):
        x, ious = batch
        out = self.linear(x).squeeze(1)
        put_iou_training_signal(out, ious, "smooth_l1")
        return {"loss_iou": nn.functional.smooth_l1_loss(out, 2 * ious - 1) + 0 * self.anchor}


def _train(learn: bool, iters: int):
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(iters):
        x = torch.randn(64, 4, generator=g)
        batches.append((x, torch.sigmoid(x @ torch.tensor([1.0, -1.0, 0.5, 0.0]))))
    model = _IoURegressor(learn)
    trainer = SimpleTrainer(model, batches, torch.optim.SGD(model.parameters(), lr=0.5))
    monitor = IoULearningMonitor(start_iter=40, window=20)
    trainer.register_hooks([monitor])
    trainer.train(0, iters)
    return trainer.storage.history("iou_net/loss_ratio").median(20), monitor


def test_monitor_warns_once_when_the_head_stalls(caplog):
    with caplog.at_level(logging.WARNING, logger="prroi_d2.engine.iou_learning_monitor"):
        ratio, monitor = _train(learn=False, iters=60)
    assert ratio > 0.9 and monitor.warned
    warnings = [r for r in caplog.records if "iou_net/loss_ratio" in r.getMessage()]
    assert len(warnings) == 1 and "iteration 40" in warnings[0].getMessage()


def test_monitor_silent_when_the_head_learns(caplog):
    with caplog.at_level(logging.WARNING, logger="prroi_d2.engine.iou_learning_monitor"):
        ratio, monitor = _train(learn=True, iters=60)
    assert ratio < 0.5 and not monitor.warned
    assert not [r for r in caplog.records if "iou_net/loss_ratio" in r.getMessage()]
