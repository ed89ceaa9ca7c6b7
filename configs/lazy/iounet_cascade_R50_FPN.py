"""Cascade R-CNN R50-FPN + IoU-Net, 1x, COCO 2017 (configs/iounet_cascade_R50.yaml as a LazyConfig).

python tools/train_net.py --config-file configs/lazy/iounet_cascade_R50_FPN.py --num-gpus 8 [key=value ...]
"""

from prroi_d2.lazy_config import with_iou_net

from .common.coco import dataloader, lr_multiplier, optimizer, train  # noqa: F401
from .common.models import cascade_rcnn_fpn

model = with_iou_net(cascade_rcnn_fpn())
train.output_dir = "output/lazy_iounet_cascade_R50_FPN"
