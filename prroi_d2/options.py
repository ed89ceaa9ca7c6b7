"""Every IoU-Net option, declared once: ``OPTIONS``, one :class:`Option` per key of ``MODEL.IOU_NET``.

Read from this table, and nowhere else written:

* the YAML defaults (:func:`prroi_d2.config.add_iounet_config`);
* the value rules of both config paths (:mod:`prroi_d2.config_checks`: ``MODEL.IOU_NET.<key>`` of a YAML config,
  ``model.roi_heads.iou_branch.<arg>`` of a LazyConfig);
* the keyword arguments of ``IoUBranch`` / ``IoUHead`` (their ``from_config``, ``IoUBranch``'s keyword defaults and
  the keys of :func:`prroi_d2.lazy_config.iou_branch`);
* the README table "IoU-Net options" (``python -m prroi_d2.options --write-readme README.md`` rewrites it; a test
  fails when the README and this table disagree).

Adding an option is one entry in ``OPTIONS``: ``Option("REFINE.NEW_KEY", default, rule, "refine_new_key", "help")``
(``arg``: the ``IoUBranch`` keyword, ``jitter.<name>`` for the box sampler, ``iou_head.<name>`` for the IoU head's
constructor, ``pooler.<name>`` for its pooler), then the keyword in the constructor that uses it (its default read
from :data:`ARG_DEFAULTS`) and ``--write-readme``. This module imports nothing of the package (no cycle).
"""

import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

__all__ = [
    "ARG_DEFAULTS",
    "OPTIONS",
    "Option",
    "Rule",
    "arguments",
    "choice",
    "config_arguments",
    "finite",
    "flag",
    "integer",
    "markdown_table",
]


@dataclass(frozen=True)
class Rule:
    """What a valid value is: ``test(value)`` is true for it; ``expected`` says it in words ("an integer >= 1")."""

    test: Callable[[Any], bool]
    expected: str

    def problem(self, name: str, value: Any) -> Optional[str]:
        """None if ``value`` is valid, else one line naming ``name``, what is expected and what was given."""
        try:
            valid = bool(self.test(value))
        except (TypeError, ValueError):
            valid = False
        return None if valid else f"{name} must be {self.expected}, got {value!r}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def flag() -> Rule:
    return Rule(lambda v: isinstance(v, bool), "a bool (True or False)")


def integer(low: int) -> Rule:
    return Rule(lambda v: _is_int(v) and v >= low, f"an integer >= {low}")


def finite(test: Callable[[float], bool], text: str) -> Rule:
    return Rule(lambda v: _is_finite(v) and test(v), f"a finite number {text}")


def choice(*choices) -> Rule:
    return Rule(lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


def _name() -> Rule:
    return Rule(lambda v: isinstance(v, str) and bool(v), "a non-empty string")


def _feature_names() -> Rule:
    return Rule(
        lambda v: isinstance(v, (list, tuple)) and all(isinstance(s, str) and s for s in v) and len(set(v)) == len(v),
        "a list of distinct feature names (empty: MODEL.ROI_HEADS.IN_FEATURES)",
    )


def _unit_pair(v) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_finite(x) for x in v) and 0 <= v[0] <= v[1] <= 1


def unit_range() -> Rule:
    return Rule(_unit_pair, "a pair [low, high] with 0 <= low <= high <= 1")


def non_empty_list(test: Callable[[Any], bool], text: str) -> Rule:
    return Rule(
        lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(test(x) for x in v), f"a non-empty list of {text}"
    )


@dataclass(frozen=True)
class Option:
    """One IoU-Net option. ``key``: its path under ``MODEL.IOU_NET``; ``default``: its value in
    ``add_iounet_config`` and in ``IoUBranch``; ``rule``: what a valid value is; ``arg``: its keyword path under
    ``IoUBranch`` (= its key under ``model.roi_heads.iou_branch`` of a LazyConfig), or None where it has none
    (``HEAD.NAME`` picks the head's class); ``help``: its meaning in the README."""

    key: str
    default: Any
    rule: Rule
    arg: Optional[str]
    help: str


# fmt: off
OPTIONS: Tuple[Option, ...] = (
    # key, default, rule, arg (IoUBranch keyword / LazyConfig key), help (README)
    Option("TRAIN_ONLY_IOU_HEAD", False, flag(), "train_only_iou_head",
           "freeze the detector, train the IoU head only (needs `IoUNetRCNN`)"),
    Option("OUTPUT_STAGES", False, flag(), "output_stages",
           'also output `"stages"` (baseline, iou_nms, refined) for evaluation (True in the configs)'),
    Option("IN_FEATURES", [], _feature_names(), "in_features",
           "FPN levels of the IoU branch; empty: `MODEL.ROI_HEADS.IN_FEATURES`"),
    Option("POOLER_TYPE", "PrRoIPoolV2", _name(), "pooler.pooler_type",
           "the IoU branch's pooler (refinement needs `PrRoIPool` or `PrRoIPoolV2`)"),
    Option("POOLER_RESOLUTION", 7, integer(1), "pooler.output_size",
           "bins per side of the IoU branch's pooled features"),
    Option("HEAD.NAME", "IoUHead", _name(), None,
           "entry of `IOU_HEAD_REGISTRY`"),
    Option("HEAD.NUM_FC", 2, integer(0), "iou_head.num_fc",
           "hidden FC layers (ReLU) of the IoU head, own weights"),
    Option("HEAD.FC_DIM", 1024, integer(1), "iou_head.fc_dim",
           "width of each hidden FC layer of the IoU head"),
    Option("HEAD.CLS_AGNOSTIC", False, flag(), "iou_head.class_agnostic",
           "one IoU per class (False) or one for all"),
    Option("HEAD.LOSS_TYPE", "smooth_l1", choice("smooth_l1", "bce"), "iou_head.loss_type",
           "`smooth_l1`: target 2·IoU − 1; `bce`: target IoU, sigmoid + binary cross-entropy"),
    Option("HEAD.SMOOTH_L1_BETA", 1.0, finite(lambda v: v >= 0, ">= 0"), "iou_head.smooth_l1_beta",
           "β of the smooth-L1 loss"),
    Option("HEAD.LOSS_WEIGHT", 5.0, finite(lambda v: v >= 0, ">= 0"), "iou_head.loss_weight",
           "weight of `loss_iou`"),
    Option("HEAD.PRED_INIT_STD", 0.01, finite(lambda v: v >= 0, ">= 0"), "iou_head.pred_init_std",
           "std of the last layer's Normal initialisation"),
    Option("HEAD.NORM", "", choice("", "LN"), "iou_head.norm",
           "`LN`: LayerNorm on each hidden FC layer (per box) before its ReLU, which keeps the head from collapsing "
           "to a constant"),
    Option("HEAD.NUM_CONV", 0, integer(0), "iou_head.num_conv",
           "3x3 convolutions (ReLU) on the pooled features before the FC layers (Detectron2's `4conv1fc`: 4)"),
    Option("HEAD.CONV_DIM", 256, integer(1), "iou_head.conv_dim",
           "channels of each of those convolutions"),
    Option("HEAD.TARGET", "iou", choice("iou", "decoupled"), "iou_head.target",
           "`iou`: regress IoU; `decoupled`: regress the fraction of the box covered by its object and of the object "
           "covered by the box (each with `LOSS_TYPE`'s loss) and combine them into IoU"),
    Option("JITTER.NUM_PER_IMAGE", 128, integer(1), "jitter.num_samples",
           "jittered training boxes per image"),
    Option("JITTER.NUM_BINS", 5, integer(1), "jitter.num_bins",
           "equal-width IoU bins over [MIN_IOU, 1], sampled uniformly"),
    Option("JITTER.MIN_IOU", 0.5, finite(lambda v: 0 <= v < 1, "in [0, 1)"), "jitter.min_iou",
           "lowest IoU of a jittered training box with its object"),
    Option("JITTER.MAX_SHIFT", 0.3, finite(lambda v: v >= 0, ">= 0"), "jitter.max_shift",
           "centre shift, fraction of width/height, times a magnitude drawn in [0, 1]"),
    Option("JITTER.MAX_SCALE", 1.6, finite(lambda v: v >= 1, ">= 1"), "jitter.max_scale",
           "width/height scaled by up to this factor (log-uniform), times the same magnitude"),
    Option("JITTER.CANDIDATES_PER_SAMPLE", 8, integer(1), "jitter.candidates_per_sample",
           "candidates drawn per kept box before binning"),
    Option("JITTER.ADD_PROPOSALS", False, flag(), "jitter.add_proposals",
           "also train on the sampled RPN proposals with IoU >= MIN_IOU"),
    Option("NMS.ENABLED", True, flag(), "nms_enabled",
           "IoU-guided NMS (off: Detectron2's NMS, `MODEL.ROI_HEADS.NMS_THRESH_TEST`)"),
    Option("NMS.IOU_THRESH", 0.5, finite(lambda v: 0 <= v <= 1, "in [0, 1]"), "nms_thresh",
           "overlap above which a box joins a cluster"),
    Option("NMS.RANK", "iou", choice("iou", "score_x_iou"), "nms_rank",
           "rank by predicted IoU (`iou`, the paper) or by score × predicted IoU (`score_x_iou`)"),
    Option("REFINE.ENABLED", True, flag(), "refine_enabled",
           "refinement of the kept boxes (top `TEST.DETECTIONS_PER_IMAGE` per image by score)"),
    Option("REFINE.STEP", 0.5, finite(lambda v: v > 0, "> 0 (lambda, the step size)"), "refine_step",
           "λ; each coordinate's gradient is scaled by the box's width / height"),
    Option("REFINE.MAX_ITER", 5, integer(0), "refine_max_iter",
           "T, the most refinement steps per box"),
    Option("REFINE.STOP_DELTA", 0.001, finite(lambda v: v >= 0, ">= 0 (a change of predicted IoU)"),
           "refine_stop_delta", "Ω1: a box stops when its predicted IoU changes by less than this"),
    Option("REFINE.STOP_DROP", -0.01, finite(lambda v: v <= 0, "<= 0 (a drop of predicted IoU)"), "refine_stop_drop",
           "Ω2: a box stops when its predicted IoU changes by less than this (a drop)"),
    Option("REFINE.CUDA_GRAPHS", 8, integer(0), "refine_cuda_graphs",
           "on CUDA, refinement replays a CUDA graph per feature shape (captured the second time it is seen), at "
           "most this many kept, each holding a copy of the IoU branch's feature maps (~85 MB for an 800x1216 "
           "R50-FPN image); 0: kernels launched one by one"),
    Option("REFINE.ACCEPT_MARGIN", 0.0, finite(lambda v: v >= 0, ">= 0 (a gain of predicted IoU)"),
           "refine_accept_margin", "keep a refined box only when its predicted IoU rose by more than this (else "
           "the initial box); chosen by the calibration"),
    Option("REFINE.ACCEPT_IOU_RANGE", [0.0, 1.0], unit_range(), "refine_accept_iou_range",
           "refine only boxes whose initial predicted IoU lies in [low, high] (where the IoU head is reliable); "
           "chosen by the calibration"),
    Option("CALIBRATION.DATASET", "", Rule(lambda v: isinstance(v, str), "a dataset name (empty: none)"), None,
           "held-out dataset: training ends by choosing NMS and refinement settings on it, written to "
           "`OUTPUT_DIR/config.yaml` (`tools/calibrate_refinement.py` does it for any trained model)"),
    Option("CALIBRATION.STEPS", [0.5, 1.0, 2.0], non_empty_list(lambda v: _is_finite(v) and v > 0, "numbers > 0"),
           None, "refinement steps λ tried"),
    Option("CALIBRATION.MAX_ITERS", [5, 10], non_empty_list(lambda v: _is_int(v) and v >= 1, "integers >= 1"),
           None, "iterations T tried, with each step"),
    Option("CALIBRATION.MARGINS", [0.0, 0.01, 0.03], non_empty_list(lambda v: _is_finite(v) and v >= 0,
           "numbers >= 0"), None, "acceptance margins tried, with each step and T"),
    Option("CALIBRATION.IOU_RANGES", [[0.0, 1.0], [0.0, 0.9], [0.5, 1.0], [0.5, 0.9]],
           non_empty_list(_unit_pair, "pairs [low, high], 0 <= low <= high <= 1"), None,
           "acceptance IoU ranges tried, with each margin"),
    Option("TF32", True, flag(), "tf32",
           "on CUDA, the IoU head's matrix multiplications (and their backward in refinement) use TF32 tensor cores,"
           " as PyTorch's cuDNN convolutions do by default; False: IEEE float32"),
    Option("SCORE", "cls", choice("cls", "iou", "cls_x_iou"), "score_mode",
           "final score: `cls` (classification; the cluster max), `iou` (predicted IoU) or `cls_x_iou`"),
)
# fmt: on


def arguments(values: Callable[[Option], Any], options: Iterable[Option] = OPTIONS) -> Dict[str, Any]:
    """The nested keyword arguments ``{arg: values(option)}`` of every option with an ``arg`` (``"jitter.min_iou"``
    becomes ``{"jitter": {"min_iou": ...}}``)."""
    out: Dict[str, Any] = {}
    for option in options:
        if option.arg is None:
            continue
        *parents, name = option.arg.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = values(option)
    return out


def config_arguments(iou_net) -> Dict[str, Any]:
    """The nested keyword arguments of every option from the values of a ``MODEL.IOU_NET`` node."""

    def value(option: Option):
        node = iou_net
        for part in option.key.split("."):
            node = node[part]
        return node

    return arguments(value)


def _copy(value):
    return [_copy(v) for v in value] if isinstance(value, list) else value


# Every keyword's default, nested as the arguments (``ARG_DEFAULTS["jitter"]["min_iou"]``).
ARG_DEFAULTS: Dict[str, Any] = arguments(lambda option: _copy(option.default))


def _cell(value) -> str:
    if isinstance(value, str):
        return f'`"{value}"`' if value == "" else f"`{value}`"
    if isinstance(value, list):
        return f"`{value}`"
    return str(value)


def markdown_table() -> str:
    """The README table "IoU-Net options": key, LazyConfig key, default and meaning of every option."""
    lines = [
        "| key | LazyConfig key (under `model.roi_heads.iou_branch.`) | default | meaning |",
        "|---|---|---|---|",
    ]
    for option in OPTIONS:
        arg = f"`{option.arg}`" if option.arg else "(the head's `_target_`)" if option.key == "HEAD.NAME" else "—"
        lines.append(f"| `{option.key}` | {arg} | {_cell(option.default)} | {option.help} |")
    return "\n".join(lines) + "\n"


README_HEADING = "### IoU-Net options"


def readme_table_span(text: str) -> Tuple[int, int]:
    """(start, end) character offsets of the options table in the README ``text`` (the first table after the
    heading ``README_HEADING``)."""
    heading = text.index(README_HEADING)
    start = text.index("\n|", heading) + 1
    end = start
    while end < len(text) and text.startswith("|", end):
        end = text.index("\n", end) + 1
    return start, end


def _main() -> None:
    parser = argparse.ArgumentParser(description="Print (or write into the README) the IoU-Net options table.")
    parser.add_argument("--write-readme", metavar="README", help="replace the table in this README file")
    args = parser.parse_args()
    if not args.write_readme:
        print(markdown_table(), end="")
        return
    with open(args.write_readme, encoding="utf-8") as f:
        text = f.read()
    start, end = readme_table_span(text)
    with open(args.write_readme, "w", encoding="utf-8") as f:
        f.write(text[:start] + markdown_table() + text[end:])


if __name__ == "__main__":
    _main()
