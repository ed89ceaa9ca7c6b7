"""``config_file_problem(path)``: what is wrong with a config file before Detectron2 reads it, in one line naming the
file: missing, a folder, binary, not YAML, empty, a list or a single value instead of keys, or a ``_BASE_`` that does
not resolve (followed through every base, as Detectron2 resolves it: relative to the file that names it).

The YAML is only composed (``yaml.compose``: the node tree, no object is constructed and no tag is run), so this
check is safe on any file; loading is Detectron2's (or the safe loader's) business.
"""

import os
from typing import List, Optional

import yaml

__all__ = ["config_file_problem"]

_BASE_KEY = "_BASE_"
_SUFFIXES = (".yaml", ".yml", ".py")


def config_file_problem(path: str) -> Optional[str]:
    """None if ``path`` is a readable config file (a LazyConfig ``.py``, or a YAML mapping whose ``_BASE_`` files
    are too), else one line naming the file and what is wrong."""
    return _problem(path, named_by=None, seen=[])


def _problem(path: str, named_by: Optional[str], seen: List[str]) -> Optional[str]:
    where = f"Config file {path}" if named_by is None else f"Config file {named_by}: its _BASE_ {path}"
    if not os.path.exists(path):
        if named_by is None:
            return f"{where} does not exist"
        return (
            f"{where} does not exist (a relative _BASE_ is read from the folder of the config that names it: copy "
            "the base config there too, or give its absolute path)"
        )
    if os.path.isdir(path):
        return f"{where} is a folder, not a config file"
    if not path.endswith(_SUFFIXES):
        return f"{where}: a config file must end in .yaml, .yml (a YAML config) or .py (a LazyConfig)"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"{where} cannot be read: {e.strerror or e}"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        return f"{where} is not a text file (binary content); a config is YAML or Python text"
    if path.endswith(".py"):
        return None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{where} is not valid YAML{at}: {getattr(e, 'problem', None) or e}"
    if node is None:
        return f"{where} is empty; a YAML config maps keys to values (MODEL: ..., SOLVER: ...)"
    if isinstance(node, yaml.SequenceNode):
        return f"{where} holds a list; a YAML config maps keys to values (MODEL: ..., SOLVER: ...)"
    if not isinstance(node, yaml.MappingNode):
        return f"{where} holds a single value; a YAML config maps keys to values (MODEL: ..., SOLVER: ...)"
    for key, value in node.value:
        if key.value != _BASE_KEY:
            continue
        bases = [value] if isinstance(value, yaml.ScalarNode) else getattr(value, "value", [])
        for base in bases:
            if not isinstance(base, yaml.ScalarNode) or not base.value:
                return f"{where}: _BASE_ must be a file name or a list of file names"
            problem = _base_problem(path, base.value, seen)
            if problem:
                return problem
    return None


def _base_problem(path: str, base: str, seen: List[str]) -> Optional[str]:
    if base.startswith(("https://", "http://")):
        return None  # fetched by Detectron2's PathManager
    resolved = os.path.expanduser(base) if base.startswith("~") else base
    if not resolved.startswith("/"):
        resolved = os.path.join(os.path.dirname(path), resolved)
    key = os.path.realpath(resolved)
    if key in seen:
        return f"Config file {path}: its _BASE_ {resolved} is a cycle (a base that names itself again)"
    return _problem(resolved, named_by=path, seen=seen + [key])
