"""Cascade R-CNN + IoU-Net on the embedded synthetic set, CPU-sized: configs/iounet_cascade_synthetic_R18.yaml as a
LazyConfig.

    python tools/train_net.py --config-file configs/lazy/iounet_cascade_synthetic_R18.py [train.seed=1 ...]
"""

from prroi_d2.lazy_config import with_iou_net

from .common.models import cascade_rcnn_fpn
from .common.synthetic import dataloader, optimizer, synthetic_model, synthetic_schedule, train  # noqa: F401

model = synthetic_model(with_iou_net(cascade_rcnn_fpn()))
lr_multiplier = synthetic_schedule(train, 1500, (1100, 1400))  # as configs/iounet_cascade_synthetic_R18.yaml
train.output_dir = "output/lazy_iounet_cascade_synthetic_R18"
