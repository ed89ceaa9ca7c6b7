"""``register_coco_dataset``: ``register_coco_instances`` that refuses a taken name unless told to replace it."""

import logging

__all__ = ["register_coco_dataset"]

logger = logging.getLogger(__name__)


def register_coco_dataset(name: str, json_file: str, image_root: str, *, replace: bool = False) -> None:
    """Register the COCO-format dataset ``name`` (Detectron2's ``register_coco_instances``). A name already
    registered (e.g. Detectron2's built-in ``coco_2017_val``) raises ``ValueError`` naming what holds it, unless
    ``replace``: then the old entry is removed and a warning says what was replaced by what."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    new = f"json_file={json_file!r}, image_root={image_root!r}"
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        old = f"json_file={meta.get('json_file', None)!r}, image_root={meta.get('image_root', None)!r}"
        if not replace:
            raise ValueError(
                f"--register {name}: a dataset named {name!r} is already registered ({old}). Choose another name, "
                "or add --register-replace to replace it."
            )
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        logger.warning(f"--register-replace: dataset {name!r} ({old}) replaced by {new}")
    register_coco_instances(name, {}, json_file, image_root)
