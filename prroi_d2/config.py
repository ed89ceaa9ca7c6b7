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
    # 3x3 convolutions (ReLU) on the pooled features before the FC layers (Detectron2's "4conv1fc": NUM_CONV 4).
    iou.HEAD.NUM_CONV = 0
    iou.HEAD.CONV_DIM = 256
    # "iou": regress IoU; "decoupled": regress the fraction of the box covered by the object and of the object
    # covered by the box (each with LOSS_TYPE's loss), and combine them into IoU.
    iou.HEAD.TARGET = "iou"

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
    # Per-box acceptance (prroi_d2.modeling.refine_acceptance): a refined box is kept only when its predicted IoU
    # rose by more than ACCEPT_MARGIN and its initial predicted IoU lies in ACCEPT_IOU_RANGE; other boxes keep their
    # initial box. The defaults keep every refined box (the paper). The calibration chooses them on a held-out split.
    iou.REFINE.ACCEPT_MARGIN = 0.0
    iou.REFINE.ACCEPT_IOU_RANGE = [0.0, 1.0]

    # On CUDA the IoU branch's matrix multiplications (IoU head forward, and its backward in refinement) use TF32
    # tensor cores (Ampere and newer), as PyTorch runs cuDNN convolutions by default: IoU prediction and refinement
    # about twice as fast, predicted IoU within a few 1e-3 of IEEE float32 (tested < 5e-3). False: IEEE float32.
    iou.TF32 = True

    # Final score of a detection: "cls" (classification score; the cluster max after IoU-guided NMS), "iou"
    # (predicted IoU) or "cls_x_iou".
    iou.SCORE = "cls"

    # Calibration of refinement on a held-out split (prroi_d2.engine.calibration, tools/calibrate_refinement.py):
    # with DATASET set, training ends by choosing NMS.ENABLED, REFINE.ENABLED, STEP, MAX_ITER, ACCEPT_MARGIN and
    # ACCEPT_IOU_RANGE on it (refinement off when no setting helps), before the final evaluation, and writes the
    # choice into OUTPUT_DIR/config.yaml. The grid: every STEPS x MAX_ITERS, then every MARGINS x IOU_RANGES.
    iou.CALIBRATION = CN()
    iou.CALIBRATION.DATASET = ""
    iou.CALIBRATION.STEPS = [0.5, 1.0, 2.0]
    iou.CALIBRATION.MAX_ITERS = [5, 10]
    iou.CALIBRATION.MARGINS = [0.0, 0.01, 0.03]
    iou.CALIBRATION.IOU_RANGES = [[0.0, 1.0], [0.0, 0.9], [0.5, 1.0], [0.5, 0.9]]
    return cfg
