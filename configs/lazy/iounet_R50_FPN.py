"""IoU-Net, Faster R-CNN R50-FPN, 1x, COCO 2017 (configs/iounet_R50.yaml as a LazyConfig).

python tools/train_net.py --config-file configs/lazy/iounet_R50_FPN.py --num-gpus 8 [key=value ...]
"""

from prroi_d2.lazy_config import with_iou_net

from .common.coco import dataloader, lr_multiplier, optimizer, train  # noqa: F401
from .common.models import faster_rcnn_fpn

model = with_iou_net(faster_rcnn_fpn())
train.output_dir = "output/lazy_iounet_R50_FPN"
