"""The embedded synthetic set at CPU size, as configs/iounet_synthetic_R18.yaml: ``synthetic_model(model)`` turns a
lazy R-CNN R50-FPN (with or without IoU-Net) into that config's R18-FPN-GN from scratch; the dataloaders, SGD
schedule and training settings are that config's."""

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from prroi_d2.engine.steps import build_evaluator

NUM_CLASSES = 5
MAX_ITER, STEPS = 750, (550, 700)  # the main job's schedule; its Faster and Cascade baselines train 1500, (1100, 1400)


def synthetic_model(model):
    """R18-FPN with GroupNorm (64 channels), anchors 16-256, smaller RPN / ROI samples, 256-wide box (and IoU) heads,
    5 classes; IoU-guided NMS ranked by score x IoU."""
    resnet = model.backbone.bottom_up
    resnet.stem.norm = "GN"
    resnet.stages.update(depth=18, norm="GN")
    resnet.stages.pop("stride_in_1x1")
    resnet.freeze_at = 0
    model.backbone.update(out_channels=64, norm="GN")
    model.pixel_mean = [110.0, 110.0, 110.0]
    model.pixel_std = [50.0, 50.0, 50.0]
    rpn = model.proposal_generator
    rpn.head.in_channels = 64
    rpn.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
    rpn.update(pre_nms_topk=(1000, 500), post_nms_topk=(256, 200), batch_size_per_image=128)
    heads = model.roi_heads
    heads.update(num_classes=NUM_CLASSES, batch_size_per_image=128)
    for box_head in heads.box_heads if "box_heads" in heads else [heads.box_head]:
        box_head.update(input_shape=ShapeSpec(channels=64, height=7, width=7), fc_dims=[256, 256])
    for predictor in heads.box_predictors if "box_predictors" in heads else [heads.box_predictor]:
        predictor.input_shape = ShapeSpec(channels=256)
    if "iou_branch" in heads:
        heads.iou_branch.iou_head.update(fc_dim=256, loss_type="bce")
        heads.iou_branch.jitter.num_samples = 64
        heads.iou_branch.jitter.min_iou = 0.3
        heads.iou_branch.update(nms_rank="score_x_iou", refine_step=1.0)
    return model


dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.dataset.names = "iounet_synth_train"
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(160,), max_size=192, sample_style="choice"),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.mapper.use_instance_mask = False
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "iounet_synth_val"
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=160, max_size=192)]
dataloader.test.num_workers = 1
dataloader.evaluator = L(build_evaluator)(
    dataset_name="${..test.dataset.names}", output_dir="${...train.output_dir}/inference", mask_on=False
)

optimizer = model_zoo.get_config("common/optim.py").SGD  # lr 0.02, momentum 0.9, weight decay 1e-4


def synthetic_schedule(train, max_iter, steps):
    """The YAML configs' SOLVER: ``max_iter`` iterations, linear warm-up over 100, x0.1 at each of ``steps``;
    checkpoints every third of the run. Sets ``train``'s fields and returns the lr multiplier."""
    train.update(max_iter=max_iter)
    train.checkpointer.period = max_iter // 3
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=list(steps), num_updates=max_iter),
        warmup_length=100 / max_iter,
        warmup_method="linear",
        warmup_factor=0.001,
    )


train = model_zoo.get_config("common/train.py").train
train.update(eval_period=0, device="cuda", seed=0)
# Each parameter's gradient norm clipped at 1, as the YAML config's SOLVER.CLIP_GRADIENTS (prroi_d2.engine.lazy_train).
train.clip_gradients = dict(enabled=True, clip_type="norm", clip_value=1.0)
lr_multiplier = synthetic_schedule(train, MAX_ITER, STEPS)
