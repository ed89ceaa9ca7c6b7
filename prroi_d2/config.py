"""IoU-Net options of a Detectron2 config: ``add_iounet_config(cfg)`` adds the node ``MODEL.IOU_NET``.

Its keys, defaults and meanings are those of :data:`prroi_d2.options.OPTIONS` (the one declaration; the README
table "IoU-Net options" is generated from it). Defaults follow the paper (Jiang et al., ECCV 2018, sections 3 and 4)
where it gives a value.
"""

import copy

from detectron2.config import CfgNode as CN

from prroi_d2.options import OPTIONS

__all__ = ["add_iounet_config"]


def add_iounet_config(cfg: CN) -> CN:
    """Add ``MODEL.IOU_NET`` (and nothing else) to ``cfg`` in place; returns ``cfg``. Idempotent."""
    if "IOU_NET" in cfg.MODEL:
        return cfg
    iou = cfg.MODEL.IOU_NET = CN()
    for option in OPTIONS:
        *parents, name = option.key.split(".")
        node = iou
        for part in parents:
            if part not in node:
                node[part] = CN()
            node = node[part]
        node[name] = copy.deepcopy(option.default)
    return cfg
