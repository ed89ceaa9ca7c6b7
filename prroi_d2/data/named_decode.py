"""``NamedDecodeErrors(mapper, dataset_names)``: any dataset mapper, with decode failures naming the file and dataset.

An image whose header is fine but whose data is broken (a truncated PNG or JPEG) fails only when the mapper decodes
it, inside a data-loader worker. The wrapper turns that failure into an :class:`ImageDecodeError` naming the image
file and its dataset; :func:`decode_error_message` recovers the one-line message from the copy a worker re-raises
in the main process. It wraps whatever mapper a trainer builds (``DatasetMapper`` with any augmentations).
"""

import os
import zlib
from typing import Callable, Optional, Sequence

from PIL import Image

__all__ = ["EndRunOnDecodeError", "ImageDecodeError", "NamedDecodeErrors", "decode_error_message"]

# What PIL and numpy raise for broken image data (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, zlib.error, Image.DecompressionBombError)


class ImageDecodeError(RuntimeError):
    """An image of a dataset could not be decoded; the message names the file and the dataset."""


class NamedDecodeErrors:
    """Callable wrapping ``mapper``: ``mapper(dataset_dict)``, with image decode errors re-raised as
    :class:`ImageDecodeError` naming ``dataset_dict["file_name"]`` and the dataset it belongs to (of
    ``dataset_names``, by image folder)."""

    def __init__(self, mapper: Callable, dataset_names: Sequence[str]):
        self.mapper = mapper
        self.dataset_names = [dataset_names] if isinstance(dataset_names, str) else list(dataset_names)

    def _dataset_of(self, file_name: str) -> str:
        from detectron2.data import MetadataCatalog

        for name in self.dataset_names:
            root = MetadataCatalog.get(name).get("image_root")
            if root and os.path.abspath(file_name).startswith(os.path.abspath(root) + os.sep):
                return repr(name)
        return " / ".join(repr(n) for n in self.dataset_names)

    def __call__(self, dataset_dict: dict):
        try:
            return self.mapper(dataset_dict)
        except _DECODE_ERRORS as e:
            file_name = dataset_dict.get("file_name", "?")
            raise ImageDecodeError(
                f"Cannot decode image {file_name} of dataset {self._dataset_of(file_name)}: {type(e).__name__}: {e} "
                "(fix or remove the file; --check-images full decodes every image before training)"
            ) from e

    def __repr__(self) -> str:
        return f"NamedDecodeErrors({self.mapper!r}, {self.dataset_names!r})"


def decode_error_message(error: BaseException) -> Optional[str]:
    """The one-line message of an :class:`ImageDecodeError`, also of the copy a data-loader worker re-raises in
    the main process (whose message is the worker's whole traceback); None for other errors."""
    if not isinstance(error, ImageDecodeError):
        return None
    lines = str(error).strip().splitlines()
    marker = ImageDecodeError.__name__ + ": "
    for line in reversed(lines):
        if marker in line:
            return line.split(marker, 1)[1]
    return lines[-1] if lines else ImageDecodeError.__name__


class EndRunOnDecodeError:
    """Trainer mixin (before Detectron2's trainer class in the bases): an image that does not decode ends the run
    with the one line naming it and its dataset, as SystemExit (for an Exception, Detectron2's trainer would log the
    data-loader worker's whole traceback)."""

    def run_step(self):
        try:
            super().run_step()
        except ImageDecodeError as e:
            raise SystemExit(decode_error_message(e)) from None
