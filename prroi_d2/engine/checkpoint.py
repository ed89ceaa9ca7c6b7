"""Checkpoints that survive a kill, and weights that must fit the model.

* :class:`SafeCheckpointer`: Detectron2's ``DetectionCheckpointer`` writing every checkpoint and ``last_checkpoint``
  to a temporary file of its process (``NAME.pth.tmp.<pid>``) renamed over the target (a kill never leaves a
  half-written checkpoint under its name; a failed write, e.g. a full disk, leaves no temporary file and raises
  :class:`CheckpointWriteError` naming the file), naming the file and what it is when one cannot be read, reading
  ``.pkl`` weights without running code (:mod:`prroi_d2.safe_loading`), and, on ``resume``, skipping a latest
  checkpoint that cannot be read for the one before it (with a warning) and refusing a checkpoint of another model
  or config (:class:`ResumeMismatchError`) before the optimizer's state is touched.
* :func:`load_weights_for_eval`: ``--eval-only`` loading that refuses to evaluate random or partial weights.
* :func:`check_frozen_weights_loaded`: when only the IoU head trains, every frozen key must be loaded.
"""

import logging
import os
import zipfile
from typing import Callable, List, Optional

from detectron2.checkpoint import DetectionCheckpointer

from prroi_d2.safe_loading import UntrustedFileError, load_pickled_weights

__all__ = [
    "CheckpointReadError",
    "CheckpointWriteError",
    "ResumeMismatchError",
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


class ResumeMismatchError(WeightsError):
    """``--resume`` found a checkpoint of another model or config in the output folder."""


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


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, folder not writable); nothing already saved was replaced."""


class _RecordingFile:
    """A binary file whose first ``OSError`` on write is kept: ``torch.save`` reports a failed write of its zip
    writer as a ``RuntimeError`` without the errno."""

    def __init__(self, f):
        self._f = f
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _atomic_write(path: str, write: Callable) -> None:
    """``write(f)`` into ``path + ".tmp.<pid>"`` (one name per process), flushed to disk, then renamed to ``path``
    (atomic on POSIX). On failure the temporary file is removed, ``path`` is untouched and
    :class:`CheckpointWriteError` names the file and the reason (e.g. "No space left on device")."""
    tmp = f"{path}.tmp.{os.getpid()}"
    recorder = None
    try:
        with open(tmp, "wb") as f:
            recorder = _RecordingFile(f)
            write(recorder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        cause = (recorder.error if recorder is not None else None) or e
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else f"{type(cause).__name__}: {cause}"
        raise CheckpointWriteError(
            f"Cannot write checkpoint {path}: {reason}; nothing was replaced (no temporary file is left)"
        ) from e
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
    strict_resume = True  # False: resume_or_load loads what fits (load_weights_for_eval checks on its own)
    _resuming: Optional[str] = None

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
            if filename.endswith(".pkl"):
                return _zoo_checkpoint(load_pickled_weights(filename), self.logger)
            return super()._load_file(filename)
        except UntrustedFileError as e:
            raise CheckpointReadError(str(e)) from None
        except Exception as e:
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            raise CheckpointReadError(
                f"Cannot read checkpoint {filename}: {describe_file(filename)} ({type(e).__name__}: {reason})"
            ) from e

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        if self._resuming:
            _refuse_foreign_checkpoint(self._resuming, self.incompatible, len(self.model.state_dict()))
        return self.incompatible

    def load(self, path: str, checkpointables: Optional[List[str]] = None):
        self.loaded_path, self.incompatible = None, None
        if path and "://" not in path and not os.path.isfile(path):
            raise CheckpointReadError(f"Cannot read checkpoint {path}: {describe_file(path)}")
        ret = super().load(path, checkpointables)
        self.loaded_path = path or None
        return ret

    def _resume_from(self, path: str):
        """``load(path)`` of the model and every checkpointable; with ``strict_resume``, a checkpoint of another
        model or config (any key missing, unexpected or of another shape) raises :class:`ResumeMismatchError`
        before the optimizer's state is touched, and so does saved training state that does not fit."""
        if not self.strict_resume:
            return self.load(path)
        self._resuming = path
        try:
            return self.load(path)
        except (ResumeMismatchError, CheckpointReadError):
            raise
        except (ValueError, KeyError, RuntimeError, IndexError) as e:  # optimizer / scheduler / trainer state
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            raise ResumeMismatchError(
                f"--resume: checkpoint {path} comes from a different model or config: its training state does not "
                f"fit ({type(e).__name__}: {reason}); {_RESUME_ADVICE}"
            ) from None
        finally:
            self._resuming = None

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
                return self._resume_from(candidate)
            except CheckpointReadError as e:
                skipped.append(str(e))
        raise CheckpointReadError(f"--resume: no checkpoint in {self.save_dir} can be read:\n  " + "\n  ".join(skipped))


_RESUME_ADVICE = (
    "resume it with the config it was trained with, set another OUTPUT_DIR, or start from its weights with "
    "MODEL.WEIGHTS FILE without --resume (keys of other shapes are then skipped, as when fine-tuning)"
)


def _refuse_foreign_checkpoint(path: str, incompatible, total: int) -> None:
    """Raise :class:`ResumeMismatchError` if the model's keys and shapes differ from those of ``path``, the
    checkpoint ``--resume`` continues: a run resumes only from its own checkpoints."""
    shapes = incompatible.incorrect_shapes
    skipped = {k for k, _, _ in shapes}
    missing = [k for k in incompatible.missing_keys if k not in skipped]
    unexpected = list(incompatible.unexpected_keys)
    if not (shapes or missing or unexpected):
        return
    if shapes:
        key, in_checkpoint, in_model = shapes[0]
        first = f"key {key} has shape {tuple(in_checkpoint)} there and {tuple(in_model)} in the model"
    elif missing:
        first = f"the model's key {missing[0]} is not in it"
    else:
        first = f"its key {unexpected[0]} is not in the model"
    counts = (
        f"{len(shapes)} keys of another shape, {len(missing)} of the model's {total} keys missing, "
        f"{len(unexpected)} unexpected"
    )
    classes_differ = any(k.endswith("cls_score.weight") and a[0] != b[0] for k, a, b in shapes)
    hint = " (MODEL.ROI_HEADS.NUM_CLASSES changed?)" if classes_differ else ""
    raise ResumeMismatchError(
        f"--resume: checkpoint {path} comes from a different model or config: {first} ({counts}){hint}; "
        f"{_RESUME_ADVICE}"
    )


def _zoo_checkpoint(data, logger) -> dict:
    """A loaded ``.pkl`` as Detectron2's checkpointer returns it: Detectron2's model zoo format as is; a Caffe2 /
    Detectron model (its ``blobs``, momentum buffers left out) for name-matching conversion."""
    if not isinstance(data, dict):
        raise ValueError(f"a .pkl of weights holds a dict, this one a {type(data).__name__}")
    if "model" in data and "__author__" in data:
        logger.info(f"Reading a file from '{data['__author__']}'")
        return data
    blobs = data.get("blobs", data)
    weights = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
    return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}


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
    checkpointer.strict_resume = False  # the partial-weights check below names what does not fit
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
