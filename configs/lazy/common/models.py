"""Box-only R-CNN R50-FPN models from Detectron2's LazyConfig pieces (model_zoo ``common/models``), as the YAML
configs of this repository build them: box heads on PrRoIPoolV2, stem and res2 frozen (``FREEZE_AT 2``)."""

from detectron2 import model_zoo


def _box_only(model):
    model.roi_heads.update(mask_in_features=None, mask_pooler=None, mask_head=None)
    model.roi_heads.box_pooler.pooler_type = "PrRoIPoolV2"
    model.backbone.bottom_up.freeze_at = 2
    return model


def faster_rcnn_fpn():
    """Faster R-CNN R50-FPN: Detectron2's ``mask_rcnn_fpn.py`` without the mask head."""
    return _box_only(model_zoo.get_config("common/models/mask_rcnn_fpn.py").model)


def cascade_rcnn_fpn():
    """Cascade R-CNN R50-FPN: Detectron2's ``cascade_rcnn.py`` without the mask head, 2000 proposals in training (as
    its Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml)."""
    model = _box_only(model_zoo.get_config("common/models/cascade_rcnn.py").model)
    model.proposal_generator.post_nms_topk = (2000, 1000)
    return model
