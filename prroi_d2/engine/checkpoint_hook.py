"""The periodic checkpoint hook: Detectron2's ``PeriodicCheckpointer`` keeping only what is asked for.

``SOLVER.CHECKPOINT_KEEP`` (declared here, :func:`add_checkpoint_config`) is how many periodic checkpoints
(``model_NNNNNNN.pth``) a run leaves besides ``model_final.pth``: 0 (default) only the final one, N the newest N,
-1 every one (Detectron2's behaviour). While training, the newest periodic checkpoint always stays so that a killed
run can ``--resume``. At the last iteration only ``model_final.pth`` is written (Detectron2 also writes an identical
periodic one there). A checkpoint that cannot be written (disk full, folder not writable) ends the run with one line
naming the file; the checkpoints already saved are kept.
"""

import logging
import os
from typing import List, Optional

from detectron2.engine import hooks

from prroi_d2.engine.checkpoint import CheckpointWriteError

__all__ = ["CHECKPOINT_KEEP_KEY", "PeriodicCheckpointer", "add_checkpoint_config", "with_checkpoint_retention"]

CHECKPOINT_KEEP_KEY = "SOLVER.CHECKPOINT_KEEP"
logger = logging.getLogger(__name__)


def add_checkpoint_config(cfg):
    """Add ``SOLVER.CHECKPOINT_KEEP`` (default 0: only ``model_final.pth`` remains) to ``cfg``; idempotent."""
    if "CHECKPOINT_KEEP" not in cfg.SOLVER:
        cfg.SOLVER.CHECKPOINT_KEEP = 0
    return cfg


def _check_keep(keep) -> int:
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < -1:
        raise SystemExit(f"{CHECKPOINT_KEEP_KEY} must be an integer >= -1 (-1 keeps every checkpoint), got {keep!r}")
    return keep


class PeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """Detectron2's hook (``period``, ``max_to_keep``, ``file_prefix`` as there) that writes no periodic checkpoint
    at the last iteration (``model_final`` is the same state) and, with ``keep_after_final`` not None, deletes all
    but the newest ``keep_after_final`` periodic checkpoints this process wrote once ``model_final`` is written.
    A :class:`~prroi_d2.engine.checkpoint.CheckpointWriteError` ends the run (``SystemExit``) with its one line."""

    def __init__(self, checkpointer, period: int, max_iter: Optional[int] = None, max_to_keep: Optional[int] = None,
                 file_prefix: str = "model", keep_after_final: Optional[int] = None):  # fmt: skip
        super().__init__(checkpointer, period, max_iter=max_iter, max_to_keep=max_to_keep, file_prefix=file_prefix)
        self.keep_after_final = keep_after_final
        self.written: List[str] = []  # periodic checkpoints of this process, oldest first

    def step(self, iteration: int, **kwargs) -> None:
        iteration = int(iteration)
        state = {"iteration": iteration, **kwargs}
        final = self.max_iter is not None and iteration >= self.max_iter - 1
        try:
            if final:
                self.checkpointer.save(f"{self.file_prefix}_final", **state)
                if self.keep_after_final is not None:
                    self._delete_all_but(self.keep_after_final)
            elif (iteration + 1) % self.period == 0:
                name = f"{self.file_prefix}_{iteration:07d}"
                self.checkpointer.save(name, **state)
                self.written.append(os.path.join(self.checkpointer.save_dir, f"{name}.pth"))
                if self.max_to_keep is not None:
                    self._delete_all_but(self.max_to_keep)
        except CheckpointWriteError as e:
            raise SystemExit(str(e)) from None

    def _delete_all_but(self, newest: int) -> None:
        doomed = self.written[: max(len(self.written) - newest, 0)]
        self.written = self.written[len(doomed) :]
        for path in doomed:
            if os.path.exists(path):
                os.remove(path)
                logger.info(f"Removed the older checkpoint {path} ({CHECKPOINT_KEEP_KEY} keeps fewer)")


def with_checkpoint_retention(hook_list: list, keep: int) -> list:
    """``hook_list`` (Detectron2's ``DefaultTrainer.build_hooks()``) with its ``PeriodicCheckpointer`` replaced by
    :class:`PeriodicCheckpointer` keeping ``keep`` periodic checkpoints besides ``model_final`` (``SOLVER.
    CHECKPOINT_KEEP``; -1: all, as Detectron2)."""
    keep = _check_keep(keep)
    out = []
    for hook in hook_list:
        if type(hook) is hooks.PeriodicCheckpointer:
            hook = PeriodicCheckpointer(
                hook.checkpointer,
                hook.period,
                max_iter=hook.max_iter,
                max_to_keep=None if keep < 0 else max(keep, 1),
                file_prefix=hook.file_prefix,
                keep_after_final=None if keep < 0 else keep,
            )
        out.append(hook)
    return out
