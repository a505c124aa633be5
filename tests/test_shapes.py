"""The synthetic shapes dataset: deterministic COCO JSON read by detectron2's own loader."""

import json
import math
import os

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator

from detkd.data import SHAPES_CLASSES, register_shapes, write_shapes

import pytest
from PIL import Image


def test_write_is_deterministic_and_valid(tmp_path):
    a = json.load(open(write_shapes(str(tmp_path / "a"), 24, seed=5)))
    b = json.load(open(write_shapes(str(tmp_path / "b"), 24, seed=5)))
    c = json.load(open(write_shapes(str(tmp_path / "c"), 24, seed=6)))
    assert a["annotations"] == b["annotations"] and a["images"] == b["images"]
    assert a["annotations"] != c["annotations"]
    assert [x["name"] for x in a["categories"]] == SHAPES_CLASSES
    img0 = np.asarray(Image.open(tmp_path / "a" / "images" / a["images"][0]["file_name"]))
    img0b = np.asarray(Image.open(tmp_path / "b" / "images" / a["images"][0]["file_name"]))
    assert np.array_equal(img0, img0b)
    sizes = {im["id"]: (im["width"], im["height"]) for im in a["images"]}
    for ann in a["annotations"]:
        x, y, w, h = ann["bbox"]
        W, H = sizes[ann["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= W + 1e-6 and y + h <= H + 1e-6 and w > 5 and h > 5
    assert {ann["category_id"] for ann in a["annotations"]} == {1, 2, 3}


def test_registered_through_detectron2_coco_loader(tmp_path):
    name = register_shapes("val", 40, root=str(tmp_path))
    assert register_shapes("val", 40, root=str(tmp_path)) == name  # idempotent
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 40
    assert any(len(d["annotations"]) == 0 for d in dicts)  # some images hold no object
    n_obj = [len(d["annotations"]) for d in dicts]
    assert max(n_obj) > 1
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == SHAPES_CLASSES
    assert os.path.isfile(meta.json_file)
    evaluator = COCOEvaluator(name, output_dir=str(tmp_path / "eval"))
    evaluator.reset()


def test_other_generation_settings_get_their_own_dataset(tmp_path):
    # an override of image_size / max_objects / empty_fraction must not reuse a folder written
    # with the defaults (same split, size and seed)
    root = str(tmp_path)
    default = register_shapes("val", 3, root=root)
    other = register_shapes(
        "val", 3, image_size=(200, 210), max_objects=6, empty_fraction=0.0, root=root
    )
    assert default == "detkd_shapes_val_3_s1"
    assert other == "detkd_shapes_val_3_s1_i200x210_o6_e0"
    sizes = [(d["height"], d["width"]) for d in DatasetCatalog.get(other)]
    assert all(200 <= h <= 210 and 200 <= w <= 210 for h, w in sizes), sizes
    assert all(len(d["annotations"]) >= 1 for d in DatasetCatalog.get(other))  # no empty images
    assert all(
        max(h, w) <= 160
        for h, w in ((d["height"], d["width"]) for d in DatasetCatalog.get(default))
    )


def test_rewriting_a_dataset_replaces_images_without_touching_open_files(tmp_path):
    """Under DDP every process writes the same dataset: an image another process has open keeps
    its complete old content (a new file is renamed over it, never rewritten in place), and no
    temporary file is left."""
    write_shapes(str(tmp_path), 2, seed=0)
    first = tmp_path / "images" / "000000.jpg"
    expected = first.read_bytes()
    first.write_bytes(b"complete file being read by another process")
    with open(first, "rb") as reader:
        write_shapes(str(tmp_path), 2, seed=0)
        assert reader.read() == b"complete file being read by another process"
    assert first.read_bytes() == expected
    assert sorted(os.listdir(tmp_path / "images")) == ["000000.jpg", "000001.jpg"]


def test_annotations_describe_the_drawn_shapes(tmp_path):
    """Each annotation from its own polygon: vertex count of its class (square 4, circle 24,
    triangle 3, all at one radius from the centre), bbox the polygon's bounds, area the polygon's;
    objects of an image farther apart than 0.8 (r1 + r2); 1 to max_objects objects per image,
    max_objects reached; both ends of image_size reached."""
    coco = json.load(
        open(write_shapes(str(tmp_path), 40, seed=3, image_size=(60, 64), max_objects=3))
    )
    vertices = {1: 4, 2: 24, 3: 3}
    placed = {}
    for ann in coco["annotations"]:
        pts = np.array(ann["segmentation"][0]).reshape(-1, 2)
        assert len(pts) == vertices[ann["category_id"]], ann
        centre = pts.mean(0)
        radii = np.linalg.norm(pts - centre, axis=1)
        assert np.allclose(radii, radii[0], rtol=1e-6)
        x0, y0 = pts.min(0)
        x1, y1 = pts.max(0)
        assert np.allclose(ann["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=1e-6)
        # COCO's area is the object's (its size range in COCOEvaluator), not the box's: a
        # regular n-gon of circumradius r has area n r^2 sin(2 pi / n) / 2
        n, r = len(pts), radii[0]
        assert ann["area"] == pytest.approx(n * r * r * math.sin(2 * math.pi / n) / 2, rel=1e-6)
        assert ann["area"] < (x1 - x0) * (y1 - y0)
        placed.setdefault(ann["image_id"], []).append((centre, radii[0]))
    for objs in placed.values():
        for i in range(len(objs)):
            for j in range(i):
                (ci, ri), (cj, rj) = objs[i], objs[j]
                assert np.linalg.norm(ci - cj) > 0.8 * (ri + rj)
    counts = [len(v) for v in placed.values()]
    assert max(counts) == 3 and min(counts) >= 1
    sides = {v for im in coco["images"] for v in (im["height"], im["width"])}
    assert min(sides) == 60 and max(sides) == 64


def test_temporary_names_are_unique_across_machines_and_left_behind_by_no_write(
    tmp_path, monkeypatch
):
    """Processes of two machines sharing a filesystem can have one pid: the temporary files of
    concurrent writers of the same dataset were both '<name>.tmp<pid>', and the second rename
    failed. Each name is unique now, and a finished write leaves no temporary file."""
    from detkd.data import shapes

    monkeypatch.setattr(os, "getpid", lambda: 4242)
    assert shapes._tmp_path("a.jpg") != shapes._tmp_path("a.jpg")
    write_shapes(str(tmp_path), 3, seed=1)
    left = [
        f for _, _, files in os.walk(tmp_path) for f in files if f.endswith(".tmp") or ".tmp" in f
    ]
    assert left == []


def test_the_same_folder_relative_and_absolute_registers_once(tmp_path, monkeypatch):
    """A root given relative, then absolute (or after a chdir elsewhere, the same absolute
    folder), is the same dataset: it was refused as 'already registered with another folder'."""
    monkeypatch.chdir(tmp_path)
    name = register_shapes("val", 5, seed=11, root="rel")
    assert register_shapes("val", 5, seed=11, root=str(tmp_path / "rel")) == name
    assert MetadataCatalog.get(name).json_file == str(tmp_path / "rel" / name / "annotations.json")
    with pytest.raises(ValueError, match="already registered with another folder"):
        register_shapes("val", 5, seed=11, root=str(tmp_path / "other"))


def test_a_folder_written_by_an_older_version_is_written_again(tmp_path):
    """A folder that an older DetKD wrote (other box areas, no version in its json) was reused
    for ever: the same name is written again once, then reused."""
    name = register_shapes("val", 6, seed=21, root=str(tmp_path))
    json_file = tmp_path / name / "annotations.json"
    fresh = json.loads(json_file.read_text())
    assert fresh["info"]["version"] == 2
    stamp = os.stat(json_file).st_mtime_ns
    register_shapes("val", 6, seed=21, root=str(tmp_path))
    assert os.stat(json_file).st_mtime_ns == stamp  # this version's folder: reused
    for old_info in ({"description": "DetKD synthetic shapes, seed 21"}, {"version": 1}):
        stale = dict(fresh, info=old_info)
        stale["annotations"] = [
            dict(a, area=a["bbox"][2] * a["bbox"][3]) for a in fresh["annotations"]
        ]
        json_file.write_text(json.dumps(stale))
        assert register_shapes("val", 6, seed=21, root=str(tmp_path)) == name
        assert json.loads(json_file.read_text()) == fresh
    # the areas differ (COCOEvaluator reads them from this json for APs / APm / APl)
    assert any(a["area"] != a["bbox"][2] * a["bbox"][3] for a in fresh["annotations"])


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(num_images=0), r"num_images must be an integer >= 1 \(got 0\)"),
        (dict(max_objects=0), r"max_objects must be an integer >= 1 \(got 0\)"),
        (
            dict(image_size=(160, 96)),
            r"image_size is \(min, max\).*1 <= min <= max \(got \(160, 96\)\)",
        ),
        (dict(image_size=96), r"image_size is \(min, max\)"),
        (dict(image_size=(0, 8)), r"1 <= min <= max \(got \(0, 8\)\)"),
        (dict(empty_fraction="0.1"), r"empty_fraction must be a number in \[0, 1\] \(got '0\.1'\)"),
        (dict(empty_fraction=1.5), r"empty_fraction must be in \[0, 1\] \(got 1\.5\)"),
        # a bool is an int to Python: True would be accepted as 1
        (dict(num_images=True), r"num_images must be an integer >= 1 \(got True\)"),
        (dict(max_objects=True), r"max_objects must be an integer >= 1 \(got True\)"),
        (dict(image_size=(True, 8)), r"image_size is \(min, max\).*\(got \(True, 8\)\)"),
        (dict(empty_fraction=False), r"empty_fraction must be a number in \[0, 1\]"),
    ],
)
def test_generation_settings_out_of_range_are_named(tmp_path, setting, message):
    """An out-of-range setting names itself (numpy's "low >= high" named none; no images
    stopped detectron2's loader later, on "Dataset ... is empty!"), and nothing is written."""
    kwargs = dict(dict(num_images=4), **setting)
    n = kwargs.pop("num_images")
    with pytest.raises(ValueError, match=message):
        register_shapes("t", n, root=str(tmp_path), **kwargs)
    with pytest.raises(ValueError, match=message):
        write_shapes(str(tmp_path / "w"), n, **kwargs)
    assert not list(tmp_path.iterdir())


def test_image_size_from_a_config_is_a_list(tmp_path):
    """A config's list (a ListConfig after instantiate / overrides) is a valid image_size."""
    from omegaconf import OmegaConf

    name = register_shapes("listcfg", 2, image_size=OmegaConf.create([32, 40]), root=str(tmp_path))
    assert name.endswith("_i32x40") and len(DatasetCatalog.get(name)) == 2
    # numpy numbers, and small images (the review found 8 x 8 refused by a floor of 16)
    write_shapes(
        str(tmp_path / "np"),
        np.int64(2),
        image_size=(np.int32(8), 8),
        max_objects=np.int64(2),
        empty_fraction=np.float32(0.1),
    )


def test_empty_fraction_takes_both_ends_of_its_range(tmp_path):
    """empty_fraction in [0, 1], ends included: 1 gives images without any object, 0 none."""
    coco = json.load(open(write_shapes(str(tmp_path / "all"), 4, empty_fraction=1)))
    assert len(coco["images"]) == 4 and coco["annotations"] == []
    coco = json.load(open(write_shapes(str(tmp_path / "none"), 4, empty_fraction=0)))
    assert {a["image_id"] for a in coco["annotations"]} == {im["id"] for im in coco["images"]}


def test_annotation_ids_start_at_1_and_perfect_predictions_score_ap_100(tmp_path):
    """pycocotools reads a matched ground-truth id of 0 as "unmatched" (ids from 0 scored the
    ground truth itself at AP 92.8), and crowd objects are ignored by the evaluation (AP NaN)
    and dropped by detectron2's mapper: ids are 1, 2, ... and no object is a crowd, so the
    ground truth submitted as predictions scores AP 100 in COCOEvaluator."""
    import torch
    from detectron2.structures import Boxes, BoxMode, Instances

    coco = json.load(open(write_shapes(str(tmp_path / "ids"), 12, seed=2)))
    ids = [a["id"] for a in coco["annotations"]]
    assert ids == list(range(1, len(ids) + 1))
    assert not any(a["iscrowd"] for a in coco["annotations"])

    name = register_shapes("perfect", 12, seed=4, root=str(tmp_path))
    evaluator = COCOEvaluator(name, output_dir=str(tmp_path / "eval"))
    evaluator.reset()
    objects = 0
    for d in DatasetCatalog.get(name):
        anns = d["annotations"]
        objects += len(anns)
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
        inst = Instances((d["height"], d["width"]))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.ones(len(anns))
        inst.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.long)
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    assert objects > 12
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100.0)
