"""
A synthetic detection dataset in COCO format: squares, circles and triangles of varied sizes
and colours on noisy, cluttered backgrounds (distractor lines and blobs that are not objects),
with some images holding no object at all. Written once (fixed seed) as JPEG images and a COCO
JSON file, then registered with detectron2's own COCO loader, so training reads it through
``load_coco_json`` and evaluation runs the real :class:`COCOEvaluator`.
"""

import json
import logging
import math
import numbers
import os
import uuid
from typing import Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from PIL import Image, ImageDraw, ImageFilter

__all__ = ["SHAPES_CLASSES", "write_shapes", "register_shapes", "shapes_root"]

logger = logging.getLogger(__name__)

SHAPES_CLASSES = ["square", "circle", "triangle"]


def shapes_root() -> str:
    """Folder of the generated datasets: ``$DETKD_DATASETS`` or ``./datasets``."""
    return os.path.expanduser(os.environ.get("DETKD_DATASETS", "datasets"))


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float):
    if kind == "square":
        pts = [
            (cx + r * math.cos(angle + k * math.pi / 2), cy + r * math.sin(angle + k * math.pi / 2))
            for k in range(4)
        ]
    elif kind == "triangle":
        pts = [
            (
                cx + r * math.cos(angle + k * 2 * math.pi / 3),
                cy + r * math.sin(angle + k * 2 * math.pi / 3),
            )
            for k in range(3)
        ]
    else:
        pts = [
            (cx + r * math.cos(k * math.pi / 12), cy + r * math.sin(k * math.pi / 12))
            for k in range(24)
        ]
    return pts


def _polygon_area(pts) -> float:
    """Area of a simple polygon given by its vertices (shoelace formula)."""
    x, y = np.array(pts, dtype=np.float64).T
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _tmp_path(path: str) -> str:
    """A temporary name beside ``path``, unique across processes and machines (processes of
    two machines sharing a filesystem can have the same pid)."""
    return f"{path}.{uuid.uuid4().hex}.tmp"


def _draw_image(rng: np.random.Generator, size: Tuple[int, int], max_objects: int, empty: bool):
    h, w = size
    # Background: smooth colour gradient plus noise.
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    t = np.linspace(0, 1, w)[None, :, None]
    bg = c0 * (1 - t) + c1 * t + rng.normal(0, 12, (h, w, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    # Clutter: thin lines and small blobs (not objects).
    for _ in range(rng.integers(2, 6)):
        x0, y0, x1, y1 = rng.uniform(0, [w, h, w, h])
        draw.line([(x0, y0), (x1, y1)], fill=tuple(int(v) for v in rng.uniform(0, 255, 3)), width=1)
    for _ in range(rng.integers(0, 4)):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1, 3)
        draw.ellipse(
            [x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.uniform(0, 255, 3))
        )

    anns, placed = [], []
    n = 0 if empty else int(rng.integers(1, max_objects + 1))
    short = min(h, w)
    for _ in range(n):
        for _attempt in range(20):
            r = rng.uniform(0.06, 0.22) * short
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            # Objects may touch but not hide each other.
            if all(math.hypot(cx - px, cy - py) > 0.8 * (r + pr) for px, py, pr in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        cls = int(rng.integers(0, len(SHAPES_CLASSES)))
        pts = _polygon(SHAPES_CLASSES[cls], cx, cy, r, rng.uniform(0, 2 * math.pi))
        color = tuple(int(v) for v in rng.uniform(0, 255, 3))
        draw.polygon(pts, fill=color, outline=tuple(255 - c for c in color))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, y0 = max(min(xs), 0.0), max(min(ys), 0.0)
        x1, y1 = min(max(xs), w), min(max(ys), h)
        anns.append(
            {
                "category_id": cls + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                # the object's area (COCO's, which COCOEvaluator's small / medium / large
                # ranges read), the polygon's by the shoelace formula; the polygon lies inside
                # the image (its vertices are within r of a centre at least r from each side)
                "area": _polygon_area(pts),
                "segmentation": [[float(v) for p in pts for v in p]],
                "iscrowd": 0,
            }
        )
    img = img.filter(ImageFilter.GaussianBlur(radius=0.5))
    return img, anns


# Bumped when the written data changes for the same arguments (2: box areas are the shapes'
# polygon areas, were the box areas), so a folder written by an older DetKD is written again.
SHAPES_FORMAT = 2


def _written_by_this_version(json_file: str) -> bool:
    """Whether ``json_file`` exists and was written with this :data:`SHAPES_FORMAT`."""
    try:
        with open(json_file) as f:
            return json.load(f).get("info", {}).get("version") == SHAPES_FORMAT
    except (OSError, ValueError):
        return False


def _check_settings(num_images, image_size, max_objects, empty_fraction) -> None:
    """ValueError naming a generation setting out of its range (numpy's "low >= high" named
    none, and an empty split stopped detectron2's loader only later)."""

    def whole(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not whole(num_images) or num_images < 1:
        raise ValueError(f"shapes data: num_images must be an integer >= 1 (got {num_images!r})")
    try:  # a tuple, list, or a config's ListConfig
        size = () if isinstance(image_size, str) else tuple(image_size)
    except TypeError:
        size = ()
    if len(size) != 2 or not all(whole(v) for v in size) or not 1 <= size[0] <= size[1]:
        raise ValueError(
            f"shapes data: image_size is (min, max) of each image side, integers with "
            f"1 <= min <= max (got {image_size!r})"
        )
    if not whole(max_objects) or max_objects < 1:
        raise ValueError(
            f"shapes data: max_objects must be an integer >= 1 (got {max_objects!r}); "
            "empty_fraction sets the share of images without objects"
        )
    if isinstance(empty_fraction, bool) or not isinstance(empty_fraction, numbers.Real):
        raise ValueError(
            f"shapes data: empty_fraction must be a number in [0, 1] (got {empty_fraction!r})"
        )
    if not 0 <= empty_fraction <= 1:  # also refuses NaN
        raise ValueError(f"shapes data: empty_fraction must be in [0, 1] (got {empty_fraction!r})")


def write_shapes(
    folder: str,
    num_images: int,
    *,
    seed: int = 0,
    image_size: Tuple[int, int] = (96, 160),
    max_objects: int = 4,
    empty_fraction: float = 0.1,
) -> str:
    """
    Write ``num_images`` images and ``annotations.json`` (COCO format) into ``folder``.

    Args:
        folder (str): output folder (images under ``folder/images``).
        num_images (int): number of images.
        seed (int): the dataset is a pure function of its arguments.
        image_size (tuple[int, int]): (min, max) of each image side, sampled per image
            (1 <= min <= max).
        max_objects (int): up to this many objects per non-empty image (>= 1).
        empty_fraction (float): share of images without any object (in [0, 1]).

    Raises:
        ValueError: a setting out of its range (named).

    Returns:
        str: the path of the JSON file.
    """
    _check_settings(num_images, image_size, max_objects, empty_fraction)
    json_file = os.path.join(folder, "annotations.json")
    img_dir = os.path.join(folder, "images")
    os.makedirs(img_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(num_images):
        h, w = (int(v) for v in rng.integers(image_size[0], image_size[1] + 1, 2))
        img, anns = _draw_image(rng, (h, w), max_objects, empty=rng.uniform() < empty_fraction)
        name = f"{i:06d}.jpg"
        # Written to a temporary file and renamed: under DDP every process writes the same
        # (deterministic) dataset, and a process that already reads it never sees a file that
        # another one is rewriting in place.
        path = os.path.join(img_dir, name)
        tmp = _tmp_path(path)
        img.save(tmp, format="JPEG", quality=95)
        os.replace(tmp, path)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for a in anns:
            annotations.append(dict(a, id=len(annotations) + 1, image_id=i + 1))
    coco = {
        "info": {"description": f"DetKD synthetic shapes, seed {seed}", "version": SHAPES_FORMAT},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(SHAPES_CLASSES)],
    }
    tmp = _tmp_path(json_file)
    with open(tmp, "w") as f:
        json.dump(coco, f)
    os.replace(tmp, json_file)  # atomic: a JSON file present means a complete dataset
    return json_file


def register_shapes(
    split: str = "train",
    num_images: int = 256,
    *,
    seed: int = None,
    image_size: Tuple[int, int] = (96, 160),
    max_objects: int = 4,
    empty_fraction: float = 0.1,
    root: str = None,
) -> str:
    """
    Write (if not yet written) and register a shapes split with detectron2's COCO loader.

    Meant to be called from a LazyConfig, e.g.
    ``dataset=L(get_detection_dataset_dicts)(names=L(register_shapes)(split="train"))``:
    it returns the registered dataset name, so the same call can feed the data loader and
    ``COCOEvaluator(dataset_name=...)``.

    Args:
        split (str): the split's name ("train", "val", the demo's "heldout"); the default
            seed is 0 for "train", 1 for any other split (the demo passes its held-out seed).
        num_images, seed, image_size, max_objects, empty_fraction: see :func:`write_shapes`.
        root (str): parent folder; default :func:`shapes_root`.

    Returns:
        str: the dataset name, ``detkd_shapes_<split>_<num_images>_s<seed>``, followed by the
        generation settings that differ from the defaults (``_i<min>x<max>``, ``_o<max_objects>``,
        ``_e<empty_fraction>``), so that other settings never reuse a folder written with others.
    """
    _check_settings(num_images, image_size, max_objects, empty_fraction)
    seed = (0 if split == "train" else 1) if seed is None else seed
    name = f"detkd_shapes_{split}_{num_images}_s{seed}"
    if tuple(image_size) != (96, 160):
        name += f"_i{image_size[0]}x{image_size[1]}"
    if max_objects != 4:
        name += f"_o{max_objects}"
    if empty_fraction != 0.1:
        name += f"_e{empty_fraction:g}"
    # absolute: the same folder given relative and absolute registers once (not a collision)
    folder = os.path.abspath(os.path.join(root or shapes_root(), name))
    json_file = os.path.join(folder, "annotations.json")
    if not _written_by_this_version(json_file):
        what = (
            "Rewriting the synthetic shapes dataset (written by an older DetKD)"
            if os.path.isfile(json_file)
            else "Writing the synthetic shapes dataset"
        )
        logger.info(f"{what} {name} to {folder}")
        write_shapes(
            folder,
            num_images,
            seed=seed,
            image_size=tuple(image_size),
            max_objects=max_objects,
            empty_fraction=empty_fraction,
        )
    if name in DatasetCatalog.list():
        if MetadataCatalog.get(name).json_file != json_file:
            raise ValueError(f"Dataset {name} is already registered with another folder")
        return name
    register_coco_instances(
        name, {"thing_classes": list(SHAPES_CLASSES)}, json_file, os.path.join(folder, "images")
    )
    return name
