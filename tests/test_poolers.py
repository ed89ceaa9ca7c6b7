"""PrRoIPool / PrRoIPoolV2 as Detectron2 ``ROIPooler`` types (real Detectron2, CPU)."""

import importlib
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("detectron2")

import torchvision
from detectron2 import model_zoo
from detectron2.config import LazyCall, get_cfg, instantiate
from detectron2.layers import ROIAlign
from detectron2.modeling import build_model
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.structures import BitMasks, Boxes, Instances, Keypoints, PolygonMasks
from detectron2.utils.events import EventStorage

import prroi_d2
from prroi_d2.modeling import poolers as prroi_poolers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FPN_SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
STOCK_TYPES = ("ROIAlign", "ROIAlignV2", "ROIPool", "ROIAlignRotated")


def _registry():
    return ROIPooler.__init__._prroi_d2_pooler_types


def _random_boxes(generator, n, image_size, lo, hi, min_size, max_size, dtype=torch.float64):
    """``n`` boxes with sides in [min_size, max_size], lying in [lo, hi] (image ``image_size`` x ``image_size``)."""
    assert hi <= image_size
    w = min_size + (max_size - min_size) * torch.rand(n, generator=generator, dtype=dtype)
    h = min_size + (max_size - min_size) * torch.rand(n, generator=generator, dtype=dtype)
    x0 = lo + (hi - lo - w) * torch.rand(n, generator=generator, dtype=dtype)
    y0 = lo + (hi - lo - h) * torch.rand(n, generator=generator, dtype=dtype)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def _smooth_features(batch, channels, image_size, scales, dtype=torch.float64):
    """Per level, samples (at the half-pixel-aligned pixel centres) of the same smooth function of image coordinates."""
    g = torch.Generator().manual_seed(7)
    freqs = 2 * math.pi * torch.rand(batch, channels, 3, 2, generator=g, dtype=dtype) / 256.0
    phases = 2 * math.pi * torch.rand(batch, channels, 3, generator=g, dtype=dtype)
    feats = []
    for s in scales:
        n = round(image_size * s)
        centres = (torch.arange(n, dtype=dtype) + 0.5) / s  # pixel j covers image coordinates [j / s, (j + 1) / s)
        y, x = torch.meshgrid(centres, centres, indexing="ij")
        arg = freqs[..., 0, None, None] * x + freqs[..., 1, None, None] * y + phases[..., None, None]
        feats.append(torch.sin(arg).sum(dim=2))
    return feats


# --------------------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------------------


def test_registration_installed_once():
    init = ROIPooler.__init__
    original = init.__wrapped__
    assert original.__module__ == "detectron2.modeling.poolers"
    assert original.__qualname__ == "ROIPooler.__init__"
    assert not hasattr(original, "_prroi_d2_pooler_types")  # one wrapper, not a wrapper of a wrapper
    assert prroi_poolers.PRROI_POOLER_TYPES == ("PrRoIPool", "PrRoIPoolV2")
    assert set(prroi_poolers.registered_pooler_types()) >= {"PrRoIPool", "PrRoIPoolV2"}
    assert prroi_d2.register_pooler_type is prroi_poolers.register_pooler_type

    # Importing / reloading the module or registering again never wraps a second time.
    importlib.reload(prroi_poolers)
    importlib.import_module("prroi_d2.modeling.poolers")
    assert ROIPooler.__init__ is init
    assert ROIPooler.__init__.__wrapped__ is original
    prroi_poolers.register_pooler_type("PrRoIPoolV2", _registry()["PrRoIPoolV2"])  # same factory: no-op
    assert ROIPooler.__init__ is init
    assert isinstance(ROIPooler(7, FPN_SCALES, 0, "PrRoIPoolV2").level_poolers[0], prroi_d2.PrRoIPool)


@pytest.mark.parametrize("name", STOCK_TYPES)
def test_registering_a_detectron2_type_raises(name):
    before = dict(_registry())
    with pytest.raises(ValueError, match="implemented by Detectron2"):
        prroi_d2.register_pooler_type(name, lambda output_size, spatial_scale, sampling_ratio: None)
    with pytest.raises(ValueError, match="implemented by Detectron2"):
        prroi_d2.register_pooler_type(name, lambda *a: None, overwrite=True)
    assert _registry() == before


def test_register_conflicts_overwrite_and_custom_type():
    def factory_a(output_size, spatial_scale, sampling_ratio):
        return torchvision.ops.RoIAlign(output_size, spatial_scale, sampling_ratio, aligned=True)

    def factory_b(output_size, spatial_scale, sampling_ratio):
        return prroi_d2.PrRoIPool(output_size, spatial_scale, aligned=True)

    name = "TestTorchvisionAlignV2"
    try:
        prroi_d2.register_pooler_type(name, factory_a)
        prroi_d2.register_pooler_type(name, factory_a)  # idempotent
        with pytest.raises(ValueError, match="already registered"):
            prroi_d2.register_pooler_type(name, factory_b)
        assert _registry()[name] is factory_a

        # The factory gets (h, w), each level's scale and the sampling ratio: equal to Detectron2's ROIAlignV2.
        feats = _smooth_features(2, 3, 128, FPN_SCALES, dtype=torch.float32)
        g = torch.Generator().manual_seed(0)
        boxes = [Boxes(_random_boxes(g, 6, 128, 2, 126, 4, 120, torch.float32)) for _ in range(2)]
        custom = ROIPooler((5, 5), FPN_SCALES, 2, name)
        assert [m.spatial_scale for m in custom.level_poolers] == list(FPN_SCALES)
        assert all(m.sampling_ratio == 2 and tuple(m.output_size) == (5, 5) for m in custom.level_poolers)
        stock = ROIPooler((5, 5), FPN_SCALES, 2, "ROIAlignV2")
        torch.testing.assert_close(custom(feats, boxes), stock(feats, boxes), rtol=0, atol=0)

        prroi_d2.register_pooler_type(name, factory_b, overwrite=True)
        assert isinstance(ROIPooler(5, FPN_SCALES, 2, name).level_poolers[0], prroi_d2.PrRoIPool)
    finally:
        _registry().pop(name, None)
    with pytest.raises(ValueError, match="Unknown pooler type: " + name):
        ROIPooler(5, FPN_SCALES, 2, name)


def test_register_rejects_bad_arguments():
    with pytest.raises(TypeError):
        prroi_d2.register_pooler_type("", lambda *a: None)
    with pytest.raises(TypeError):
        prroi_d2.register_pooler_type(None, lambda *a: None)
    with pytest.raises(TypeError):
        prroi_d2.register_pooler_type("TestNotCallable", 3)
    assert "TestNotCallable" not in _registry()


@pytest.mark.parametrize("name", ["Unknown", "prroipool", "PrRoIPoolV3", "ROIAlignV3"])
def test_unknown_type_raises_detectron2_error(name):
    with pytest.raises(ValueError, match=f"^Unknown pooler type: {name}$"):
        ROIPooler(7, FPN_SCALES, 0, name)
    with pytest.raises(ValueError, match=f"^Unknown pooler type: {name}$"):
        ROIPooler(output_size=7, scales=FPN_SCALES, sampling_ratio=0, pooler_type=name)


@pytest.mark.parametrize("pooler_type,aligned", [("PrRoIPool", False), ("PrRoIPoolV2", True)])
def test_construction_positional_and_keyword(pooler_type, aligned):
    variants = [
        ROIPooler(7, FPN_SCALES, 0, pooler_type),
        ROIPooler((7, 7), FPN_SCALES, 2, pooler_type, 224, 4),
        ROIPooler(output_size=[7, 7], scales=list(FPN_SCALES), sampling_ratio=0, pooler_type=pooler_type),
        ROIPooler(7, FPN_SCALES, pooler_type=pooler_type, sampling_ratio=4, canonical_level=3, canonical_box_size=112),
        ROIPooler((14, 10), (1 / 16,), 0, pooler_type),
    ]
    for pooler in variants:
        assert len(pooler.level_poolers) == pooler.max_level - pooler.min_level + 1
        for m in pooler.level_poolers:
            assert isinstance(m, prroi_d2.PrRoIPool) and type(m) is prroi_poolers.LevelPrRoIPool
            assert m.aligned is aligned
        assert sum(p.numel() for p in pooler.parameters()) == 0
        assert len(pooler.state_dict()) == 0
    assert [m.spatial_scale for m in variants[0].level_poolers] == list(FPN_SCALES)
    assert (variants[0].min_level, variants[0].max_level) == (2, 5)
    assert (variants[3].canonical_level, variants[3].canonical_box_size) == (3, 112)
    assert (variants[4].level_poolers[0].pooled_height, variants[4].level_poolers[0].pooled_width) == (14, 10)
    # Detectron2's own checks still run for registered types.
    with pytest.raises(AssertionError):
        ROIPooler(7, (1 / 4, 1 / 16), 0, pooler_type)  # not a pyramid
    with pytest.raises(AssertionError):
        ROIPooler(7, (1 / 3,), 0, pooler_type)  # stride not a power of 2
    with pytest.raises(TypeError):
        ROIPooler(7, FPN_SCALES, pooler_type=pooler_type)  # sampling_ratio missing


def test_lazy_config_instantiate():
    cfg = LazyCall(ROIPooler)(output_size=7, scales=(1 / 4, 1 / 8), sampling_ratio=0, pooler_type="PrRoIPool")
    pooler = instantiate(cfg)
    assert isinstance(pooler, ROIPooler)
    assert all(isinstance(m, prroi_d2.PrRoIPool) for m in pooler.level_poolers)
    assert [m.aligned for m in pooler.level_poolers] == [False, False]
    feats = [torch.randn(1, 4, 32, 32), torch.randn(1, 4, 16, 16)]
    out = pooler(feats, [Boxes(torch.tensor([[4.0, 4.0, 60.0, 50.0], [1.0, 2.0, 9.0, 9.0]]))])
    assert out.shape == (2, 4, 7, 7) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------------------------
# Stock pooler types are untouched
# --------------------------------------------------------------------------------------------------------------------

_STOCK_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from detectron2.modeling.poolers import ROIPooler
    from detectron2.structures import Boxes
    assert not any(m == "prroi_d2" or m.startswith("prroi_d2.") for m in sys.modules)
    data = torch.load(sys.argv[1])
    out = {}
    for name in ("ROIAlign", "ROIAlignV2", "ROIPool"):
        for sr in (0, 2):
            pooler = ROIPooler(data["size"], data["scales"], sr, name)
            out[(name, sr)] = pooler(data["feats"], [Boxes(b) for b in data["boxes"]])
    torch.save(out, sys.argv[2])
    """
)


def _stock_inputs():
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(2, 3, int(96 * s), int(96 * s), generator=g) for s in FPN_SCALES]
    boxes = [_random_boxes(g, 9, 96, 0, 96, 1, 90, torch.float32) for _ in range(2)]
    return {"size": 5, "scales": FPN_SCALES, "feats": feats, "boxes": boxes}


def test_stock_types_identical_to_unpatched_detectron2(tmp_path):
    data = _stock_inputs()
    torch.save(data, tmp_path / "in.pt")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.abspath(p) != REPO)
    subprocess.run(
        [sys.executable, "-c", _STOCK_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        check=True,
        env=env,
        cwd=str(tmp_path),
    )
    before = torch.load(tmp_path / "out.pt")
    assert len(before) == 6
    for (name, sr), expected in before.items():
        pooler = ROIPooler(data["size"], data["scales"], sr, name)
        got = pooler(data["feats"], [Boxes(b) for b in data["boxes"]])
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"{name} sampling_ratio={sr}")


def test_stock_types_match_torchvision():
    data = _stock_inputs()
    feats, boxes = data["feats"], [Boxes(b) for b in data["boxes"]]
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(data["boxes"])])
    levels = assign_boxes_to_levels(boxes, 2, 5, 224, 4)
    for name in ("ROIAlign", "ROIAlignV2", "ROIPool"):
        pooler = ROIPooler(5, FPN_SCALES, 2, name)
        if name == "ROIPool":
            assert all(type(m) is torchvision.ops.RoIPool for m in pooler.level_poolers)
        else:
            assert all(type(m) is ROIAlign and m.aligned == (name == "ROIAlignV2") for m in pooler.level_poolers)
        got = pooler(feats, boxes)
        for k in range(len(rois)):
            lvl = int(levels[k])
            if name == "ROIPool":
                ref = torchvision.ops.roi_pool(feats[lvl], rois[k : k + 1], 5, FPN_SCALES[lvl])
            else:
                ref = torchvision.ops.roi_align(
                    feats[lvl], rois[k : k + 1], 5, FPN_SCALES[lvl], 2, aligned=(name == "ROIAlignV2")
                )
            torch.testing.assert_close(got[k : k + 1], ref, rtol=0, atol=0)
    rotated = ROIPooler(7, (1 / 16,), 0, "ROIAlignRotated")
    assert type(rotated.level_poolers[0]).__name__ == "ROIAlignRotated"


# --------------------------------------------------------------------------------------------------------------------
# Numerics through ROIPooler
# --------------------------------------------------------------------------------------------------------------------


def test_level_assignment_and_order_match_detectron2():
    """Channels: image x, image y, level number, image index. PrRoI pooling of a bilinear map that is linear (or
    constant) reproduces the bin average exactly, so each output identifies its box, level and image."""
    image_size, n_per_image = 512, (23, 17)
    g = torch.Generator().manual_seed(11)
    box_tensors = [_random_boxes(g, n, image_size, 16, 496, 6, 470) for n in n_per_image]
    box_tensors[1][:3] = torch.tensor([[20.0, 20.0, 26.0, 27.0], [16.0, 16.0, 496.0, 496.0], [100, 100, 324, 324]])
    boxes = [Boxes(b) for b in box_tensors]  # float32 (Boxes casts), features float64
    box_tensors = [b.tensor.double() for b in boxes]
    feats = []
    for lvl, s in enumerate(FPN_SCALES):
        n = int(image_size * s)
        centres = (torch.arange(n, dtype=torch.float64) + 0.5) / s
        y, x = torch.meshgrid(centres, centres, indexing="ij")
        per_image = [torch.stack([x, y, torch.full_like(x, 2.0 + lvl), torch.full_like(x, float(i))]) for i in (0, 1)]
        feats.append(torch.stack(per_image))

    pooler = ROIPooler(3, FPN_SCALES, 0, "PrRoIPoolV2")
    out = pooler(feats, boxes).mean(dim=(2, 3))
    expected_levels = assign_boxes_to_levels(boxes, 2, 5, 224, 4) + 2
    assert len(set(expected_levels.tolist())) == 4  # the boxes cover all four levels
    all_boxes = torch.cat(box_tensors)
    images = torch.cat([torch.full((n,), float(i), dtype=torch.float64) for i, n in enumerate(n_per_image)])
    torch.testing.assert_close(out[:, 0], (all_boxes[:, 0] + all_boxes[:, 2]) / 2, rtol=0, atol=1e-9)
    torch.testing.assert_close(out[:, 1], (all_boxes[:, 1] + all_boxes[:, 3]) / 2, rtol=0, atol=1e-9)
    torch.testing.assert_close(out[:, 2], expected_levels.to(out.dtype), rtol=0, atol=1e-9)
    torch.testing.assert_close(out[:, 3], images, rtol=0, atol=1e-9)

    # Same order and levels as Detectron2's ROIAlignV2 pooler (exact on these maps too).
    torch.testing.assert_close(out, ROIPooler(3, FPN_SCALES, 2, "ROIAlignV2")(feats, boxes).mean(dim=(2, 3)))


@pytest.mark.parametrize("pooler_type,stock_type", [("PrRoIPoolV2", "ROIAlignV2"), ("PrRoIPool", "ROIAlign")])
def test_close_to_dense_roi_align_on_smooth_features(pooler_type, stock_type):
    image_size = 256
    feats = _smooth_features(2, 4, image_size, FPN_SCALES)
    g = torch.Generator().manual_seed(5)
    # Inside the region where both ops see only interior pixels of every level.
    boxes = [Boxes(_random_boxes(g, 20, image_size, 48, 208, 8, 160)) for _ in range(2)]
    ours = ROIPooler(7, FPN_SCALES, 0, pooler_type)(feats, boxes)
    dense = ROIPooler(7, FPN_SCALES, 16, stock_type)(feats, boxes)
    assert ours.shape == dense.shape == (40, 4, 7, 7)
    assert dense.abs().max() > 0.5
    torch.testing.assert_close(ours, dense, rtol=0, atol=2e-3)
    # ... and further from a sparse one, as it should be for an exact integral.
    sparse = ROIPooler(7, FPN_SCALES, 1, stock_type)(feats, boxes)
    assert (ours - dense).abs().max() < (sparse - dense).abs().max()


@pytest.mark.parametrize("pooler_type", ["PrRoIPoolV2", "PrRoIPool"])
def test_box_gradient_through_pooler_matches_finite_differences(pooler_type):
    image_size = 256
    feats = _smooth_features(2, 2, image_size, FPN_SCALES)
    g = torch.Generator().manual_seed(9)
    # sqrt(area) away from the level boundaries (112, 224), so the perturbed boxes keep their levels 2, 3, 4.
    sizes = [(10.0, 12.0), (60.0, 80.0), (130.0, 140.0), (200.0, 240.0), (230.0, 250.0)]
    tensors = []
    for _ in range(2):
        t = torch.tensor([[0.0, 0.0, w, h] for w, h in sizes], dtype=torch.float64)
        shift = 3 + (image_size - 6 - t[:, 2:]) * torch.rand(len(sizes), 2, generator=g, dtype=torch.float64)
        tensors.append((t + shift.repeat(1, 2)).requires_grad_(True))
    pooler = ROIPooler(5, FPN_SCALES, 0, pooler_type)
    levels = assign_boxes_to_levels([Boxes(t.detach()) for t in tensors], 2, 5, 224, 4)
    assert set(levels.tolist()) == {0, 1, 2}
    weight = torch.randn(10, 2, 5, 5, generator=g, dtype=torch.float64)

    def boxes64(t):  # Detectron2's Boxes casts to float32; keep float64 for the finite differences
        b = Boxes(t.detach())
        b.tensor = t
        return b

    def f(b0, b1):
        return (pooler(feats, [boxes64(b0), boxes64(b1)]) * weight).sum()

    f(*tensors).backward()
    assert tensors[0].dtype == torch.float64 and Boxes(tensors[0]).tensor.dtype == torch.float32
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tensors)
    assert torch.autograd.gradcheck(f, tuple(tensors), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_features_of_another_dtype_than_boxes(dtype):
    """Boxes are float32; features of another dtype are pooled in the wider dtype and returned in theirs."""
    feats32 = _smooth_features(2, 3, 128, FPN_SCALES, dtype=torch.float32)
    feats = [f.to(dtype).requires_grad_(True) for f in feats32]
    g = torch.Generator().manual_seed(4)
    box_tensors = [_random_boxes(g, 6, 128, 0, 128, 4, 120, torch.float32).requires_grad_(True) for _ in range(2)]
    pooler = ROIPooler(7, FPN_SCALES, 0, "PrRoIPoolV2")
    out = pooler(feats, [Boxes(b) for b in box_tensors])
    assert out.dtype == dtype
    # Same as pooling features and boxes both cast to the wider dtype, then casting back.
    wide = torch.promote_types(dtype, torch.float32)
    ref_boxes = []
    for t in box_tensors:
        ref_boxes.append(Boxes(t.detach()))
        ref_boxes[-1].tensor = t.detach().to(wide)
    ref = pooler([f.detach().to(wide) for f in feats], ref_boxes)
    assert ref.dtype == wide
    torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0)
    loose = {torch.float64: 1e-4, torch.float16: 5e-3, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(
        out.float(), pooler(feats32, [Boxes(b.detach()) for b in box_tensors]), atol=loose, rtol=0
    )
    out.float().sum().backward()
    assert all(f.grad is not None and f.grad.dtype == dtype for f in feats)
    assert all(b.grad is not None and b.grad.dtype == torch.float32 and b.grad.abs().sum() > 0 for b in box_tensors)


def test_feature_gradient_through_pooler():
    feats = [f.requires_grad_(True) for f in _smooth_features(2, 2, 256, FPN_SCALES)]
    boxes = [Boxes(torch.tensor([[2.0, 3.0, 20.0, 30.0], [10.0, 10.0, 200.0, 180.0]], dtype=torch.float64))] * 2
    out = ROIPooler(3, FPN_SCALES, 0, "PrRoIPoolV2")(feats, boxes)
    out.sum().backward()
    # sqrt(area) 22 -> level 2 (stride 4); sqrt(area) 180 -> level 3 (stride 8).
    assert feats[0].grad.abs().sum() > 0 and feats[1].grad.abs().sum() > 0
    assert feats[2].grad.abs().sum() == 0 and feats[3].grad.abs().sum() == 0


def test_torchscript():
    pooler = ROIPooler(7, FPN_SCALES, 0, "PrRoIPoolV2")
    scripted = torch.jit.script(pooler)
    feats = _smooth_features(2, 3, 128, FPN_SCALES, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    boxes = [Boxes(_random_boxes(g, 5, 128, 0, 128, 4, 120, torch.float32)) for _ in range(2)]
    torch.testing.assert_close(scripted(feats, boxes), pooler(feats, boxes), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------------------------------

MODEL_ZOO_CASES = [
    # config, expected number of ROIPoolers, mask kind
    ("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", 1, None),
    ("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml", 1, None),
    ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", 2, "bitmask"),
    ("COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml", 2, None),
    ("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml", 2, "polygon"),
]


def _small_cfg(cfg):
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    # Untrained and with caffe-style PIXEL_STD 1, activations reach ~1e4 and Detectron2's own keypoint
    # post-processing overflows (for ROIAlignV2 too); unit-scale inputs keep the untrained model's outputs moderate.
    cfg.MODEL.PIXEL_STD = [57.0, 57.0, 57.0]
    cfg.INPUT.MIN_SIZE_TRAIN = (128,)
    cfg.INPUT.MAX_SIZE_TRAIN = 160
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 160
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 32
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 16
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 16
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # so untrained models still send detections to the mask/kpt heads
    cfg.TEST.DETECTIONS_PER_IMAGE = 5
    return cfg


def _swap_to_prroi(cfg):
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "PrRoIPoolV2"
    cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE = "PrRoIPoolV2"
    cfg.MODEL.ROI_KEYPOINT_HEAD.POOLER_TYPE = "PrRoIPoolV2"
    return cfg


def _synthetic_batch(cfg, mask_kind, generator):
    batch = []
    for h, w in ((128, 160), (120, 144)):
        n = 3
        boxes = _random_boxes(generator, n, min(h, w), 2, min(h, w) - 2, 16, 90, torch.float32)
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(cfg.MODEL.ROI_HEADS.NUM_CLASSES, (n,), generator=generator)
        if mask_kind == "bitmask":
            masks = torch.zeros(n, h, w, dtype=torch.bool)
            for k, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
                masks[k, y0 + 2 : y1 - 2, x0 + 2 : x1 - 2] = True
            inst.gt_masks = BitMasks(masks)
        elif mask_kind == "polygon":
            polys = [[[x0, y0, x1, y0, (x0 + x1) / 2, y1]] for x0, y0, x1, y1 in boxes.tolist()]
            inst.gt_masks = PolygonMasks(polys)
        if cfg.MODEL.KEYPOINT_ON:
            k = cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS
            frac = torch.rand(n, k, 2, generator=generator)
            xy = boxes[:, None, :2] + frac * (boxes[:, None, 2:] - boxes[:, None, :2])
            inst.gt_keypoints = Keypoints(torch.cat([xy, torch.full((n, k, 1), 2.0)], dim=2))
        image = torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8)
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch


def _check_prroi_poolers(model, expected_count):
    poolers = [m for m in model.modules() if isinstance(m, ROIPooler)]
    assert len(poolers) == expected_count
    for pooler in poolers:
        assert len(pooler.level_poolers) > 0
        for m in pooler.level_poolers:
            assert isinstance(m, prroi_d2.PrRoIPool) and m.aligned
    heads = model.roi_heads
    for attr in ("box_pooler", "pooler", "mask_pooler", "keypoint_pooler"):
        if getattr(heads, attr, None) is not None:
            assert isinstance(getattr(heads, attr), ROIPooler)


def _train_and_infer(model, batch, check_backbone_grad=True):
    model.train()
    with EventStorage():
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    # Only the RoI-head losses: their one path back to the backbone goes through the RoI poolers (proposals are
    # detached), so backbone gradients show that PrRoI pooling passes gradients to the features.
    roi_loss = sum(v for k, v in losses.items() if not k.startswith("loss_rpn"))
    model.zero_grad(set_to_none=True)
    roi_loss.backward()
    backbone_grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert backbone_grads and any(gr is not None and gr.abs().sum() > 0 for gr in backbone_grads)
    model.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad():
        outputs = model([{"image": d["image"], "height": d["height"], "width": d["width"]} for d in batch])
    assert len(outputs) == len(batch)
    for out, d in zip(outputs, batch):
        inst = out["instances"]
        assert isinstance(inst, Instances)
        assert inst.image_size == (d["height"], d["width"])
    return losses, outputs


@pytest.mark.parametrize("config,n_poolers,mask_kind", MODEL_ZOO_CASES, ids=[c[0] for c in MODEL_ZOO_CASES])
def test_model_zoo_config_with_prroi(config, n_poolers, mask_kind):
    torch.manual_seed(0)
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(config))
    cfg = _swap_to_prroi(_small_cfg(cfg))
    model = build_model(cfg)
    _check_prroi_poolers(model, n_poolers)
    batch = _synthetic_batch(cfg, mask_kind, torch.Generator().manual_seed(2))
    losses, outputs = _train_and_infer(model, batch)
    assert ("loss_mask" in losses) == cfg.MODEL.MASK_ON
    assert ("loss_keypoint" in losses) == cfg.MODEL.KEYPOINT_ON
    if cfg.MODEL.KEYPOINT_ON:
        assert losses["loss_keypoint"] > 0
    for o in outputs:
        if len(o["instances"]):
            assert o["instances"].has("pred_masks") == cfg.MODEL.MASK_ON
            assert o["instances"].has("pred_keypoints") == cfg.MODEL.KEYPOINT_ON

    # An untrained detector may score every class 0 and detect nothing; run the mask / keypoint heads at inference
    # time on given boxes so that their PrRoI poolers are exercised in eval mode too.
    if cfg.MODEL.MASK_ON or cfg.MODEL.KEYPOINT_ON:
        with torch.no_grad():
            images = model.preprocess_image(batch)
            features = model.backbone(images.tensor)
            given = []
            for d in batch:
                inst = Instances(d["instances"].image_size)
                inst.pred_boxes = d["instances"].gt_boxes
                inst.pred_classes = d["instances"].gt_classes
                given.append(inst)
            results = model.roi_heads.forward_with_given_boxes(features, given)
        for r in results:
            n = len(r)
            if cfg.MODEL.MASK_ON:
                res = cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION * 2
                assert r.pred_masks.shape == (n, 1, res, res) and torch.isfinite(r.pred_masks).all()
            if cfg.MODEL.KEYPOINT_ON:
                assert r.pred_keypoints.shape == (n, cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS, 3)
                assert torch.isfinite(r.pred_keypoints).all()


def test_swapping_pooler_keeps_checkpoint():
    """A model built with ROIAlignV2 and one built with PrRoIPoolV2 have the same parameters and buffers."""
    base = get_cfg()
    base.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    base = _small_cfg(base)
    torch.manual_seed(0)
    stock = build_model(base)
    swapped = build_model(_swap_to_prroi(base.clone()))
    s1, s2 = stock.state_dict(), swapped.state_dict()
    assert s1.keys() == s2.keys()
    assert all(s1[k].shape == s2[k].shape for k in s1)
    swapped.load_state_dict(s1, strict=True)
    _check_prroi_poolers(swapped, 2)


# --------------------------------------------------------------------------------------------------------------------
# The project's configs
# --------------------------------------------------------------------------------------------------------------------

PROJECT_CONFIGS = [
    ("faster_rcnn_R_50_FPN_1x_prroi.yaml", "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", 1),
    ("mask_rcnn_R_50_FPN_1x_prroi.yaml", "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", 2),
]


def _flatten(node, prefix=""):
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


@pytest.mark.parametrize("ours,zoo,n_poolers", PROJECT_CONFIGS, ids=[c[0] for c in PROJECT_CONFIGS])
def test_project_configs(ours, zoo, n_poolers):
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", ours))
    reference = get_cfg()
    reference.merge_from_file(model_zoo.get_config_file(zoo))
    a, b = _flatten(cfg), _flatten(reference)
    assert a.keys() == b.keys()
    differing = {k for k in a if a[k] != b[k]}
    assert differing == {
        "MODEL.ROI_BOX_HEAD.POOLER_TYPE",
        "MODEL.ROI_MASK_HEAD.POOLER_TYPE",
        "MODEL.ROI_KEYPOINT_HEAD.POOLER_TYPE",
    }
    assert all(a[k] == "PrRoIPoolV2" and b[k] == "ROIAlignV2" for k in differing)
    assert cfg.MODEL.WEIGHTS == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"

    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg)
    _check_prroi_poolers(model, n_poolers)
