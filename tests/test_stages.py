"""prroi_d2.modeling.stages, the one place of the stage vocabulary: the stages a model builds and the final one for
every switch setting (checked against what IoUBranch and the evaluator actually do), the localisation rule, the
listing order, and the names of the predicted IoU in Instances and in the result records."""

import ast
import glob
import itertools
import os

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.structures import Boxes, Instances  # noqa: E402

from prroi_d2.evaluation.records import instances_to_records  # noqa: E402
from prroi_d2.modeling import stages  # noqa: E402
from prroi_d2.modeling.iou_branch import IoUBranch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The consumers that read the vocabulary from prroi_d2.modeling.stages and must not spell a stage name themselves.
CONSUMERS = sorted(glob.glob(os.path.join(ROOT, "prroi_d2", "evaluation", "*.py"))) + [
    os.path.join(ROOT, "tools", "experiments", name) for name in ("seed_table.py", "trees_seeds.py")
]


def test_built_and_final_stages_for_every_switch_setting():
    expected = {  # written out by hand: (nms, refine) -> stages in pipeline order
        (False, False): ("baseline",),
        (True, False): ("baseline", "iou_nms"),
        (False, True): ("baseline", "refined"),
        (True, True): ("baseline", "iou_nms", "refined"),
    }
    for (nms, refine), built in expected.items():
        assert stages.built_stages(nms, refine) == built
        assert stages.final_stage(nms, refine) == built[-1]
    assert stages.STAGES == ("baseline", "iou_nms", "refined") and stages.STAGE_ORDER[-1] == "final"
    assert set(stages.DISPLAY_NAMES) == set(stages.STAGE_ORDER)


@pytest.mark.parametrize("nms,refine", list(itertools.product([False, True], repeat=2)))
def test_final_stage_is_the_one_iou_branch_returns(nms, refine):
    branch = object.__new__(IoUBranch)  # only the switches: last_stage reads nothing else
    branch.__dict__.update(nms_enabled=nms, refine_enabled=refine)
    assert branch.last_stage == stages.final_stage(nms, refine)


def test_localization_stage_and_listing_order():
    assert stages.localization_stage(["baseline", "iou_nms", "refined"]) == "refined"
    assert stages.localization_stage(["final"]) == "final"
    assert stages.localization_stage(["baseline", "iou_nms"]) == "iou_nms"
    assert stages.localization_stage([]) is None
    assert stages.sort_stages(["mine", "refined", "final", "baseline", "other"]) == [
        "baseline",
        "refined",
        "final",
        "mine",
        "other",
    ]


def test_record_keys_are_written_from_the_instances_fields():
    inst = Instances((20, 30))
    inst.pred_boxes = Boxes(torch.tensor([[1.0, 2.0, 11.0, 7.0]]))
    inst.scores = torch.tensor([0.9])
    inst.pred_classes = torch.tensor([2])
    inst.set(stages.PRED_IOUS, torch.tensor([0.75]))
    inst.set(stages.PRED_BOXES_INITIAL, torch.tensor([[0.0, 0.0, 4.0, 4.0]]))
    inst.set(stages.PRED_IOUS_INITIAL, torch.tensor([0.5]))
    (record,) = instances_to_records(inst, 7)
    assert record[stages.RECORD_BOX] == [1.0, 2.0, 10.0, 5.0] and record[stages.RECORD_BOX_INITIAL] == [0, 0, 4, 4]
    assert record[stages.RECORD_IOU] == 0.75 and record[stages.RECORD_IOU_INITIAL] == 0.5
    assert stages.RECORD_IOU_OF_BOX == {"bbox": "iou", "bbox_initial": "iou_initial"}  # the files' keys, as before


@pytest.mark.parametrize("path", CONSUMERS, ids=os.path.basename)
def test_consumers_spell_no_stage_name(path):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node) is not None
    }
    names = set(stages.STAGES)  # "final" is also a histogram series of iounet_stages.json (after refinement)
    found = [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings
    ]
    assert not found, f"{os.path.relpath(path, ROOT)} spells stage names instead of importing them: {found}"
