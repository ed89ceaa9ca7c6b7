"""Loading files that may carry code (pickled weights, YAML configs) without running that code.

* :func:`load_pickled_weights`: a ``.pkl`` of Detectron2's model zoo (or Caffe2's / Detectron's) read with an
  unpickler that builds only plain containers, numbers, strings and numpy arrays. Plain ``pickle.load`` (what
  Detectron2's checkpointer uses) calls any function the file names, e.g. ``os.system``.
* :func:`safe_merge_from_file`: ``cfg.merge_from_file`` with ``yaml.safe_load`` for the file and its ``_BASE_``
  files. Detectron2's ``CfgNode`` falls back to ``yaml.unsafe_load``, which runs ``!!python/object/apply`` tags.

Either refuses with one line naming the file and what it would have called (:class:`UntrustedFileError`).
"""

import pickle
from typing import Any

import yaml

__all__ = ["ALLOWED_PICKLE_GLOBALS", "UntrustedFileError", "load_pickled_weights", "safe_merge_from_file"]

# What the model zoo's pickles name: numpy arrays (``ndarray.__reduce__``: ``_reconstruct`` + ``ndarray`` +
# ``dtype``; protocol 5: ``_frombuffer``), numpy scalars, ordered dicts, and bytes pickled by Python 3 at protocol
# 2 (``_codecs.encode(str, "latin1")``). ``numpy._core`` is numpy 2's name for ``numpy.core``.
ALLOWED_PICKLE_GLOBALS = frozenset(
    [(f"{core}.multiarray", name) for core in ("numpy.core", "numpy._core") for name in ("_reconstruct", "scalar")]
    + [(f"{core}.numeric", "_frombuffer") for core in ("numpy.core", "numpy._core")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("_codecs", "encode")]
)


class UntrustedFileError(ValueError):
    """A weights or config file asks to run code; the message names the file and what it would call."""


class _WeightsUnpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED_PICKLE_GLOBALS` (every function or class a pickle calls goes through here)."""

    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_PICKLE_GLOBALS:
            raise UntrustedFileError(
                f"Refusing to load {self._path}: the pickle calls {module}.{name}, which weights never need (a .pkl "
                "can run any code when loaded; only dicts, lists, numbers, strings and numpy arrays are read)"
            )
        return super().find_class(module, name)


def load_pickled_weights(path: str) -> Any:
    """The object pickled in ``path`` (a model-zoo ``.pkl``: ``{"model": {name: ndarray}, "__author__": ...}``),
    built without calling anything but numpy's array constructors. Raises :class:`UntrustedFileError` naming the
    file and the first other global the pickle names (before calling it)."""
    with open(path, "rb") as f:
        return _WeightsUnpickler(f, path).load()


def _yaml_tag_error(error: yaml.constructor.ConstructorError, path: str) -> UntrustedFileError:
    mark = error.problem_mark
    where = f"{mark.name}, line {mark.line + 1}" if mark is not None else path
    problem = error.problem or ""
    tag = problem.split("tag ", 1)[1].strip("'\" ") if "tag " in problem else problem
    tag = tag.replace("tag:yaml.org,2002:", "!!")
    return UntrustedFileError(
        f"YAML tag {tag} in {where} would run Python code when loaded: refused (configs are read with "
        "yaml.safe_load: plain values, lists and mappings only)"
    )


def safe_merge_from_file(cfg, path: str) -> None:
    """``cfg.merge_from_file(path)`` (Detectron2 / fvcore ``CfgNode``, ``_BASE_`` files included) reading every file
    with ``yaml.safe_load``; raises :class:`UntrustedFileError` naming the file, line and tag of a Python tag."""
    try:
        cfg.merge_from_file(path, allow_unsafe=False)
    except yaml.constructor.ConstructorError as e:
        raise _yaml_tag_error(e, path) from None
