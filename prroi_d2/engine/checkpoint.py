"""Checkpoints that survive a kill, and weights that must fit the model.

* :class:`SafeCheckpointer`: Detectron2's ``DetectionCheckpointer`` writing every checkpoint and ``last_checkpoint``
  to a temporary file renamed over the target (a kill never leaves a half-written checkpoint under its name),
  naming the file and what it is when one cannot be read, and, on ``resume``, skipping a latest checkpoint that
  cannot be read for the one before it (with a warning).
* :func:`load_weights_for_eval`: ``--eval-only`` loading that refuses to evaluate random or partial weights.
* :func:`check_frozen_weights_loaded`: when only the IoU head trains, every frozen key must be loaded.
"""

import logging
import os
import zipfile
from typing import Callable, List, Optional

from detectron2.checkpoint import DetectionCheckpointer

__all__ = [
    "CheckpointReadError",
    "SafeCheckpointer",
    "WeightsError",
    "check_frozen_weights_loaded",
    "describe_file",
    "load_weights_for_eval",
]

logger = logging.getLogger(__name__)
_EXAMPLES = 5


class CheckpointReadError(RuntimeError):
    """A checkpoint file cannot be read; the message names the file and what it is."""


class WeightsError(RuntimeError):
    """The loaded weights do not fit the model (or none were loaded) where that would make the run meaningless."""


def describe_file(path: str) -> str:
    """What ``path`` is, in words: missing, empty, a truncated zip archive, a text file, ..."""
    if not os.path.exists(path):
        return "no such file"
    if os.path.isdir(path):
        return "a directory, not a file"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4096)
    if size == 0:
        return "an empty file (0 bytes)"
    if head.startswith(b"PK\x03\x04"):
        if zipfile.is_zipfile(path):
            return f"a zip archive of {size} bytes (PyTorch's format) that torch.load rejects"
        return f"a truncated or corrupt zip archive of {size} bytes (PyTorch's format): an interrupted write?"
    if head[:1] == b"\x80":
        return f"a pickle file of {size} bytes (legacy torch.save or a .pkl model)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"a binary file of {size} bytes that is not a PyTorch checkpoint (starts with {head[:8].hex()})"
    first = text.strip().splitlines()[0][:60] if text.strip() else ""
    return f"a text file of {size} bytes, not a PyTorch checkpoint (starts with {first!r})"


def _atomic_write(path: str, write: Callable) -> None:
    """``write(f)`` into ``path + ".tmp"``, flushed to disk, then renamed to ``path`` (atomic on POSIX)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SafeCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic writes, named read errors and a resume that skips unreadable
    checkpoints. After :meth:`load`, ``loaded_path`` is the file loaded (None if none) and ``incompatible`` the
    keys that did not load (``missing_keys``, ``unexpected_keys``, ``incorrect_shapes``), or None."""

    loaded_path: Optional[str] = None
    incompatible = None

    @classmethod
    def from_checkpointer(cls, other: DetectionCheckpointer) -> "SafeCheckpointer":
        """The same model, folder and checkpointables as ``other`` (e.g. the one ``DefaultTrainer`` made)."""
        return cls(other.model, other.save_dir, save_to_disk=other.save_to_disk, **other.checkpointables)

    def _local(self) -> bool:
        return "://" not in self.save_dir

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk or not self._local():
            return super().save(name, **kwargs)
        import torch

        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        _atomic_write(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._local():
            return super().tag_last_checkpoint(last_filename_basename)
        path = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

    def _load_file(self, filename: str):
        try:
            return super()._load_file(filename)
        except Exception as e:
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            raise CheckpointReadError(
                f"Cannot read checkpoint {filename}: {describe_file(filename)} ({type(e).__name__}: {reason})"
            ) from e

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible

    def load(self, path: str, checkpointables: Optional[List[str]] = None):
        self.loaded_path, self.incompatible = None, None
        if path and "://" not in path and not os.path.isfile(path):
            raise CheckpointReadError(f"Cannot read checkpoint {path}: {describe_file(path)}")
        ret = super().load(path, checkpointables)
        self.loaded_path = path or None
        return ret

    def _resume_candidates(self) -> List[str]:
        """The tagged last checkpoint first, then the folder's other ``.pth`` files, newest first."""
        tagged = self.get_checkpoint_file()
        others = [p for p in self.get_all_checkpoint_files() if os.path.abspath(p) != os.path.abspath(tagged)]
        others.sort(key=lambda p: os.path.getmtime(p), reverse=True)
        return [tagged] + others

    def resume_or_load(self, path: str, *, resume: bool = True):
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        skipped = []
        for candidate in self._resume_candidates():
            if skipped:
                self.logger.warning(f"{skipped[-1]}; falling back to the previous checkpoint {candidate}")
            try:
                return self.load(candidate)
            except CheckpointReadError as e:
                skipped.append(str(e))
        raise CheckpointReadError(f"--resume: no checkpoint in {self.save_dir} can be read:\n  " + "\n  ".join(skipped))


def _examples(keys) -> str:
    keys = list(keys)
    return ", ".join(keys[:_EXAMPLES]) + (", ..." if len(keys) > _EXAMPLES else "")


def _unloaded_keys(checkpointer: SafeCheckpointer):
    """(missing keys, keys skipped for a shape mismatch as ``"key checkpoint-shape vs model-shape"``)."""
    inc = checkpointer.incompatible
    if inc is None:
        return list(checkpointer.model.state_dict()), []
    skipped = [f"{k} {tuple(ck)} vs {tuple(m)}" for k, ck, m in inc.incorrect_shapes]
    skipped_keys = {k for k, _, _ in inc.incorrect_shapes}  # fvcore also lists them as missing
    return [k for k in inc.missing_keys if k not in skipped_keys], skipped


def load_weights_for_eval(model, cfg, *, resume: bool, allow_partial: bool = False) -> str:
    """Load ``--eval-only`` weights into ``model``: the last checkpoint of ``cfg.OUTPUT_DIR`` with ``resume``
    (falling back past unreadable ones), else ``cfg.MODEL.WEIGHTS``. Raises :class:`WeightsError` when none is
    given, or when any key of the model is missing from the checkpoint or skipped (shape mismatch) unless
    ``allow_partial``; :class:`CheckpointReadError` when the file cannot be read. Returns the path loaded."""
    checkpointer = SafeCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
    resuming = resume and checkpointer.has_checkpoint()
    if not resuming and not cfg.MODEL.WEIGHTS:
        where = f" and {cfg.OUTPUT_DIR} has no last_checkpoint to resume from" if resume else ""
        raise WeightsError(
            f"--eval-only needs trained weights, but MODEL.WEIGHTS is empty{where}: evaluation would measure a "
            "randomly initialised model. Pass MODEL.WEIGHTS path/to/model_final.pth (or --resume with the "
            "training run's OUTPUT_DIR)."
        )
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    missing, skipped = _unloaded_keys(checkpointer)
    if missing or skipped:
        total = len(checkpointer.model.state_dict())
        message = (
            f"--eval-only: the checkpoint {checkpointer.loaded_path} does not fit the model: {len(missing)} of its "
            f"{total} keys are missing from it (first: {_examples(missing) or '-'}) and {len(skipped)} were skipped "
            f"for a shape mismatch (first: {_examples(skipped) or '-'}); a checkpoint of another model or "
            "MODEL.ROI_HEADS.NUM_CLASSES?"
        )
        if not allow_partial:
            raise WeightsError(message + " Pass --allow-partial-weights to evaluate the partly random model anyway.")
        logger.warning(message + " Evaluating anyway (--allow-partial-weights).")
    return checkpointer.loaded_path


def check_frozen_weights_loaded(
    checkpointer: SafeCheckpointer,
    train_only_iou_head: bool,
    flag_key: str = "MODEL.IOU_NET.TRAIN_ONLY_IOU_HEAD",
    weights_key: str = "MODEL.WEIGHTS",
) -> None:
    """With ``train_only_iou_head``, raise :class:`WeightsError` if any frozen key of the model (everything but the
    IoU head: the parameters without ``requires_grad`` and the buffers) was not loaded: it would stay random for the
    whole run. Without it, Detectron2's warnings for partial weights stand. The keys name the config's settings in
    the messages (a LazyConfig's: ``model.train_only_iou_head``, ``train.init_checkpoint``)."""
    if not train_only_iou_head:
        return
    model = checkpointer.model
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing, skipped = _unloaded_keys(checkpointer)
    frozen_missing = [k for k in missing if k not in trainable]
    frozen_skipped = [s for s in skipped if s.split(" ", 1)[0] not in trainable]
    if checkpointer.incompatible is None:
        raise WeightsError(
            f"{flag_key} trains the IoU head on a trained detector, but no weights were loaded ({weights_key} is "
            f"empty): the frozen detector would stay random. Set {weights_key} to your detector's checkpoint."
        )
    if frozen_missing or frozen_skipped:
        raise WeightsError(
            f"{flag_key}: {len(frozen_missing)} frozen keys (outside the IoU head) are "
            f"missing from {checkpointer.loaded_path} (first: {_examples(frozen_missing) or '-'}) and "
            f"{len(frozen_skipped)} were skipped for a shape mismatch (first: {_examples(frozen_skipped) or '-'}); "
            "they would stay random for the whole run. Load a checkpoint of the same detector."
        )
