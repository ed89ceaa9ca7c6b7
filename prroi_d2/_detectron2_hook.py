"""Registers prroi_d2's Detectron2 glue when, and only when, Detectron2's modeling package is imported.

``import prroi_d2`` stays cheap and quiet (torch only). It installs a finder on ``sys.meta_path`` that watches for
``detectron2.modeling``: right after that package has executed, ``prroi_d2.modeling`` is imported, which registers
the pooler types and the IoU-Net registry entries. If ``detectron2.modeling`` was imported before ``prroi_d2``, the
registration happens at ``import prroi_d2``. Either import order works, in the main process and in spawned
data-loader workers (they import the main module, hence ``prroi_d2``, before anything of Detectron2's).
"""

import importlib.abc
import sys
import threading

_TRIGGER = "detectron2.modeling"
_LOCK = threading.Lock()


def _register() -> None:
    import prroi_d2.modeling  # noqa: F401  (registers everything)


class _Detectron2ModelingFinder(importlib.abc.MetaPathFinder):
    """Finds ``detectron2.modeling`` through the other finders and wraps its loader to register prroi_d2 after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRIGGER:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Idempotent: register now if ``detectron2.modeling`` is loaded, else watch for its import."""
    with _LOCK:
        if _TRIGGER in sys.modules:
            _register()
            return
        if not any(isinstance(f, _Detectron2ModelingFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Detectron2ModelingFinder())
