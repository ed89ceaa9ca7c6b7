"""IoU-Net options of a Detectron2 config: ``add_iounet_config(cfg)`` adds the node ``MODEL.IOU_NET``.

Every key is documented in the README ("IoU-Net options"). Defaults follow the paper (Jiang et al., ECCV 2018,
sections 3 and 4) where it gives a value.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_iounet_config"]


def add_iounet_config(cfg: CN) -> CN:
    """Add ``MODEL.IOU_NET`` (and nothing else) to ``cfg`` in place; returns ``cfg``. Idempotent."""
    if "IOU_NET" in cfg.MODEL:
        return cfg
    iou = cfg.MODEL.IOU_NET = CN()

    # Head-only training: freeze every parameter but the IoU head's; BatchNorm statistics stay as loaded.
    iou.TRAIN_ONLY_IOU_HEAD = False
    # Also return {"stages": {"baseline", "iou_nms", "refined"}} per image (evaluation of every stage in one pass).
    iou.OUTPUT_STAGES = False

    # The IoU branch: its own pooler on the box head's features, then the IoU head.
    iou.IN_FEATURES = []  # empty: the box head's MODEL.ROI_HEADS.IN_FEATURES
    iou.POOLER_TYPE = "PrRoIPoolV2"
    iou.POOLER_RESOLUTION = 7

    iou.HEAD = CN()
    iou.HEAD.NAME = "IoUHead"
    iou.HEAD.NUM_FC = 2
    iou.HEAD.FC_DIM = 1024
    iou.HEAD.CLS_AGNOSTIC = False
    # "smooth_l1": target 2 * IoU - 1, smooth-L1; "bce": target IoU, sigmoid + binary cross-entropy.
    iou.HEAD.LOSS_TYPE = "smooth_l1"
    iou.HEAD.SMOOTH_L1_BETA = 1.0
    iou.HEAD.LOSS_WEIGHT = 5.0
    iou.HEAD.PRED_INIT_STD = 0.01
    # "" or "LN": LayerNorm on each hidden FC layer before its ReLU (per box), which keeps the head from collapsing
    # to a constant when early updates kill every unit of a layer.
    iou.HEAD.NORM = ""

    # Training boxes of the IoU branch: jittered ground truth, sampled uniformly over IoU bins in [MIN_IOU, 1].
    iou.JITTER = CN()
    iou.JITTER.NUM_PER_IMAGE = 128
    iou.JITTER.NUM_BINS = 5
    iou.JITTER.MIN_IOU = 0.5
    iou.JITTER.MAX_SHIFT = 0.3  # centre shift, fraction of the box's width / height (uniform in +-)
    iou.JITTER.MAX_SCALE = 1.6  # width and height scaled by a log-uniform factor in [1 / MAX_SCALE, MAX_SCALE]
    iou.JITTER.CANDIDATES_PER_SAMPLE = 8  # candidates drawn per kept sample before binning
    iou.JITTER.ADD_PROPOSALS = False  # also train on the sampled RPN proposals with IoU >= MIN_IOU

    # IoU-guided NMS (Algorithm 1). Off: Detectron2's NMS (MODEL.ROI_HEADS.NMS_THRESH_TEST).
    iou.NMS = CN()
    iou.NMS.ENABLED = True
    iou.NMS.IOU_THRESH = 0.5
    iou.NMS.RANK = "iou"  # "iou" (the paper) or "score_x_iou"

    # Optimisation-based refinement (Algorithm 2).
    iou.REFINE = CN()
    iou.REFINE.ENABLED = True
    iou.REFINE.STEP = 0.5  # lambda
    iou.REFINE.MAX_ITER = 5  # T
    iou.REFINE.STOP_DELTA = 0.001  # Omega_1: stop when |IoU change| < this
    iou.REFINE.STOP_DROP = -0.01  # Omega_2: stop when the IoU change < this
    # On CUDA, refinement replays CUDA graphs (captured the second time a feature shape is seen; boxes padded to
    # images x detections per image): at most this many are kept, one per feature shape. 0: launch every kernel
    # from Python.
    iou.REFINE.CUDA_GRAPHS = 8

    # On CUDA the IoU branch's matrix multiplications (IoU head forward, and its backward in refinement) use TF32
    # tensor cores (Ampere and newer), as PyTorch runs cuDNN convolutions by default: IoU prediction and refinement
    # about twice as fast, predicted IoU within a few 1e-3 of IEEE float32 (tested < 5e-3). False: IEEE float32.
    iou.TF32 = True

    # Final score of a detection: "cls" (classification score; the cluster max after IoU-guided NMS), "iou"
    # (predicted IoU) or "cls_x_iou".
    iou.SCORE = "cls"
    return cfg
