"""``import prroi_d2`` is cheap and quiet (torch only); the Detectron2 glue registers itself in either import order,
in spawned worker processes too."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("detectron2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGISTERED = textwrap.dedent(
    """
    from detectron2.modeling import META_ARCH_REGISTRY, ROI_HEADS_REGISTRY
    from detectron2.modeling.poolers import ROIPooler
    assert type(ROIPooler(7, (0.25,), 0, "PrRoIPoolV2")).__name__ == "PrRoIPooler"
    assert ROI_HEADS_REGISTRY.get("IoUNetROIHeads") and META_ARCH_REGISTRY.get("IoUNetRCNN")
    """
)


def _python(code, *flags, cwd=None):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, *flags, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_op_import_is_quiet_without_detectron2_and_the_glue_registers_when_detectron2_modeling_follows():
    """One process: ``import prroi_d2`` under warnings-as-errors loads no Detectron2 module; importing
    ``detectron2.modeling`` afterwards registers the glue (the import hook)."""
    code = "import sys, warnings\nwith warnings.catch_warnings():\n    warnings.simplefilter('error')\n"
    code += "    import prroi_d2\nbad = [m for m in sys.modules if m.split('.')[0] in ('detectron2', 'fvcore')]\n"
    code += "assert not bad, bad\nimport detectron2.modeling\n" + REGISTERED
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr


def test_glue_registers_when_detectron2_modeling_came_first():
    proc = _python("import detectron2.modeling\nimport prroi_d2\n" + REGISTERED)
    assert proc.returncode == 0, proc.stderr


def test_add_iounet_config_registers_everything_and_spawned_workers_see_the_registered_types(tmp_path):
    """One script: its main process checks that ``from prroi_d2 import add_iounet_config`` registers everything; the
    worker it spawns, which re-imports only the script's top (``import prroi_d2``), sees the registered types."""
    script = tmp_path / "spawn_check.py"
    script.write_text(
        "import multiprocessing as mp\nimport prroi_d2\n\n\ndef check(_):\n"
        + textwrap.indent(REGISTERED, "    ")
        + "    return True\n\n\nif __name__ == '__main__':\n"
        + "    from prroi_d2 import add_iounet_config\n"
        + textwrap.indent(REGISTERED, "    ")
        + "    with mp.get_context('spawn').Pool(1) as pool:\n        assert pool.map(check, [0]) == [True]\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr


def test_one_version_number(monkeypatch, capsys):
    """``setup.py --version`` (run in this process: torch is loaded already) is ``prroi_d2.__version__``."""
    import runpy

    import prroi_d2

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["setup.py", "--version"])
    runpy.run_path(os.path.join(REPO, "setup.py"), run_name="__main__")
    assert capsys.readouterr().out.strip().splitlines()[-1] == prroi_d2.__version__
