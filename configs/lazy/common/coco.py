"""Training on COCO 2017, 1x schedule (Detectron2's ``common/`` LazyConfig pieces), evaluated with every IoU-Net
stage (the evaluator of tools/train_net.py's YAML path)."""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from prroi_d2.engine.steps import build_evaluator

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.mapper.use_instance_mask = False
dataloader.evaluator = L(build_evaluator)(
    dataset_name="${..test.dataset.names}", output_dir="${...train.output_dir}/inference", mask_on=False
)
optimizer = model_zoo.get_config("common/optim.py").SGD
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_1x
train = model_zoo.get_config("common/train.py").train
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.seed = -1  # as the YAML SEED: < 0 draws one
