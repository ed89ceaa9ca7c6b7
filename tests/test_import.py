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


def test_op_import_needs_no_detectron2_and_warns_nothing():
    code = "import sys, prroi_d2; bad = [m for m in sys.modules if m.split('.')[0] in ('detectron2', 'fvcore')]; "
    code += "assert not bad, bad"
    proc = _python(code, "-W", "error")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "first", ["import prroi_d2\nimport detectron2.modeling", "import detectron2.modeling\nimport prroi_d2"]
)
def test_glue_registers_in_either_order(first):
    proc = _python(first + "\n" + REGISTERED)
    assert proc.returncode == 0, proc.stderr


def test_add_iounet_config_registers_everything():
    proc = _python("from prroi_d2 import add_iounet_config\n" + REGISTERED)
    assert proc.returncode == 0, proc.stderr


def test_spawned_workers_see_the_registered_types(tmp_path):
    script = tmp_path / "spawn_check.py"
    script.write_text(
        "import multiprocessing as mp\nimport prroi_d2\n\n\ndef check(_):\n"
        + textwrap.indent(REGISTERED, "    ")
        + "    return True\n\n\nif __name__ == '__main__':\n"
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
