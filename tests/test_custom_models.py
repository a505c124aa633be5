"""Teachers and students beyond the ResNet-FPN twins: a ViTDet-style teacher (detectron2's
SimpleFeaturePyramid), students with a Backbone of their own (level names of their own)."""

import torch
from detectron2.config import LazyCall as L
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import Backbone, SimpleFeaturePyramid
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.utils.events import EventStorage
from torch import nn

from detkd import DistillationDetector, GIDDistiller, PKDDistiller, ReviewKDDistiller

import pytest
from conftest import build, make_inputs, tiny_faster_rcnn_cfg, tiny_retinanet_cfg


class Patchify(Backbone):
    """ViT's patch embedding alone (a stride-16 conv, which drops the rows and columns past the
    last multiple of 16): the single-scale ``net`` of a ViTDet-style SimpleFeaturePyramid,
    without the transformer blocks (timm) of detectron2's ViT."""

    def __init__(self, dim=32):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=16, stride=16)
        self._out_features = ["last_feat"]
        self._out_feature_channels = {"last_feat": dim}
        self._out_feature_strides = {"last_feat": 16}

    def forward(self, x):
        return {"last_feat": self.proj(x)}


class StridedNet(Backbone):
    """A custom student backbone: stride-2 convs of ``width`` channels, levels named by stride
    (``s8``, ``s16``, ``s32``), no FPN; no size divisibility unless given."""

    def __init__(
        self, width=8, out_features=("s8", "s16", "s32"), strides=True, size_divisibility=0
    ):
        super().__init__()
        self.convs = nn.ModuleList(
            Conv2d(
                3 if i == 0 else width,
                width,
                3,
                stride=2,
                padding=1,
                bias=False,
                norm=get_norm("BN", width),
                activation=nn.ReLU(),
            )
            for i in range(5)
        )
        self._out_features = list(out_features)
        self._strides = strides
        self._size_divisibility = size_divisibility

    @property
    def size_divisibility(self):
        return self._size_divisibility

    def forward(self, x):
        out = {}
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if f"s{2 ** (i + 1)}" in self._out_features:
                out[f"s{2 ** (i + 1)}"] = x
        return out

    def output_shape(self):
        width = self.convs[0].out_channels
        return {
            n: ShapeSpec(channels=width, stride=int(n[1:]) if self._strides else None)
            for n in self._out_features
        }


def vitdet_teacher(fpn=32):
    """A tiny ViTDet-style Faster R-CNN: SimpleFeaturePyramid (p2-p6) on a stride-16 map, no
    square padding (its padding_constraints declare a size divisibility of 32)."""
    model = tiny_faster_rcnn_cfg(width=16, fpn=fpn)
    model.backbone = L(SimpleFeaturePyramid)(
        net=L(Patchify)(dim=32),
        in_feature="last_feat",
        out_channels=fpn,
        scale_factors=(4.0, 2.0, 1.0, 0.5),
        top_block=L(LastLevelMaxPool)(),
        norm="LN",
        square_pad=0,
    )
    return model


def custom_retinanet(width=8, **backbone):
    """A RetinaNet whose head sits directly on a StridedNet (levels s8, s16, s32)."""
    model = tiny_retinanet_cfg(width=width, fpn=width)
    model.backbone = L(StridedNet)(width=width, **backbone)
    model.head_in_features = ["s8", "s16", "s32"]
    model.head.input_shape = [ShapeSpec(channels=width)] * 3
    model.head.conv_dims = [width]
    model.anchor_generator.update(
        sizes=[[16], [32], [64]], aspect_ratios=[1.0], strides=[8, 16, 32]
    )
    model.head.num_anchors = 1
    return model


def test_vitdet_style_teacher_gets_inputs_padded_to_its_declared_size_divisibility():
    """detectron2's SimpleFeaturePyramid declares its size divisibility (32) under the misspelt
    key 'size_divisiblity' and relies on its square padding, which the teacher's images do not
    get (they are padded as the student's): for a student without a size divisibility, the
    teacher's images were not padded at all, so its patch embedding dropped the image's last
    rows and columns, and a size mismatch was reported as 'student 0, teacher 0'."""

    def kd(**student):
        torch.manual_seed(0)
        return build(
            L(DistillationDetector)(
                student=custom_retinanet(**student),
                teacher=vitdet_teacher(),
                distillers={"pkd": L(PKDDistiller)(num_levels=None)},
            )
        )

    model = kd()
    assert model.distillers["pkd"].pairs == [("s8", "p3"), ("s16", "p4"), ("s32", "p5")]
    inputs = make_inputs(n=2, size=(100, 130))
    assert model.student.preprocess_image(inputs).tensor.shape[-2:] == (100, 130)
    assert model.teacher_images(inputs).tensor.shape[-2:] == (128, 160)
    match = (
        r"'s8' map is \(13, 17\).*'p3'.*\(16, 20\).*student 0, teacher 32\).*"
        r"backbone's size_divisibility property: a custom Backbone overrides it"
    )
    with EventStorage(), pytest.raises(ValueError, match=match):
        model(inputs)
    model = kd(size_divisibility=32)  # the fix the error names: equal maps, the loss trains
    assert model.student.preprocess_image(inputs).tensor.shape[-2:] == (128, 160)
    with EventStorage():
        losses = model(inputs)
    assert torch.isfinite(losses["loss_pkd"]) and losses["loss_pkd"] > 0


@pytest.mark.parametrize(
    "distiller",
    [
        L(PKDDistiller)(num_levels=None),
        L(ReviewKDDistiller)(),
        L(GIDDistiller)(selection="location", response=False),
    ],
)
def test_a_custom_backbone_without_strides_is_a_clear_error(distiller):
    """Levels are ordered and paired by stride: a Backbone whose output_shape() gives none (a
    detectron2 RetinaNet trains without them) was a bare "'<' not supported between
    'NoneType' and 'NoneType'" from sorting."""
    student = custom_retinanet(strides=False)
    match = (
        r"distillers\['kd'\].*student backbone's output_shape\(\) gives no stride for "
        r"\['s8', 's16', 's32'\].*ShapeSpec\(channels=\.\.\., stride=\.\.\.\)"
    )
    with pytest.raises(ValueError, match=match):
        build(
            L(DistillationDetector)(
                student=student,
                teacher=tiny_retinanet_cfg(width=16, fpn=32),
                distillers={"kd": distiller},
            )
        )


def test_gid_on_levels_that_are_no_pyramid_is_a_clear_error():
    """A custom student with levels s8 and s32 only: GID's ROIAlign needs consecutive strides
    (detectron2's ROIPooler asserted "Sizes of input featuremaps do not form a pyramid!",
    naming neither the levels nor the fix); num_levels=1 keeps s8 alone, which trains."""
    student = custom_retinanet(out_features=("s8", "s32"))
    student.update(head_in_features=["s8", "s32"])
    student.head.input_shape = [ShapeSpec(channels=8)] * 2
    student.anchor_generator.update(sizes=[[16], [64]], strides=[8, 32])

    def kd(**gid):
        torch.manual_seed(0)
        return build(
            L(DistillationDetector)(
                student=student,
                teacher=tiny_retinanet_cfg(width=16, fpn=32),
                distillers={"gid": L(GIDDistiller)(selection="location", response=False, **gid)},
            )
        )

    match = r"paired levels \[\('s8', 'p3'\), \('s32', 'p5'\)\] have strides \[8, 32\].*num_levels"
    with pytest.raises(ValueError, match=match):
        kd()
    model = kd(num_levels=1)
    assert model.distillers["gid"].pairs == [("s8", "p3")]
    with EventStorage():
        losses = model(make_inputs(n=2, size=(96, 128)))
    assert torch.isfinite(losses["loss_gid_feat"]) and torch.isfinite(losses["loss_gid_relation"])
