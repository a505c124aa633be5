"""
Pictures of what distillation does (PNG files).

* :func:`draw_fpn_activations` (PKD view): per FPN level, the max-over-channel activation maps
  of the teacher, the student trained alone and the distilled student (the PKD paper's Fig. 1
  style), with each student's Pearson correlation to the teacher.
* :func:`draw_boxes`: boxes on an image with per-box colours and optional lines between
  pairs, used by the GID view (selected general instances) and the D3ETR view (matched
  teacher/student boxes).

The command line views run the models as training and evaluation do: on the test image as
``dataloader.test.mapper`` makes it (resized by its augmentations), the loader's channel order
checked (``check_input_format``), the teacher's input from ``DistillationDetector.teacher_images``;
they draw on that image, in its coordinates.

Command line::

    python -m detkd.viz pkd --config configs/demo/pkd_retinanet.py \\
        --teacher output/demo/teacher_retinanet/model_final.pth \\
        --before output/demo/student_retinanet/model_final.pth \\
        --after output/demo/pkd_retinanet/model_final_student.pth --out pkd_fpn.png
    python -m detkd.viz gid --config configs/demo/gid_retinanet.py --teacher T.pth --student S.pth
    python -m detkd.viz d3etr --config configs/demo/d3etr_detr.py --teacher T.pth --student S.pth
"""

import argparse
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["max_activation", "draw_fpn_activations", "draw_boxes", "main"]


def max_activation(feat: torch.Tensor) -> np.ndarray:
    """
    Args:
        feat (Tensor): one image's feature map, shape (C, H, W).

    Returns:
        ndarray: (H, W) max over channels, min-max normalised to [0, 1].
    """
    a = feat.detach().float().amax(dim=0).cpu().numpy()
    return (a - a.min()) / max(float(a.max() - a.min()), 1e-12)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps; NaN when one is constant (e.g. a level of one cell),
    where it is undefined (it read 0.00, even for the teacher's map with itself)."""
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float((a * b).sum() / norm) if norm > 1e-12 else float("nan")


def _r_text(r: float) -> str:
    """A Pearson r as the PKD view shows it; NaN (a constant map) as "n/a (constant map)"."""
    return "n/a (constant map)" if np.isnan(r) else f"{r:.2f}"


def draw_fpn_activations(
    image: np.ndarray,
    rows: Dict[str, Dict[str, torch.Tensor]],
    levels: Sequence[str],
    path: str,
    reference: str = "teacher",
) -> Dict[str, Dict[str, float]]:
    """
    Draw one row per model and one column per FPN level.

    Args:
        image (ndarray): (H, W, 3) RGB uint8 input image, shown in the first column.
        rows (dict[str, dict[str, Tensor]]): model name -> FPN dict of one image,
            each map (C, Hl, Wl). Levels of equal name must have equal sizes across rows.
        levels (list[str]): the levels to draw, e.g. ["p3", "p4", "p5", "p6"].
        path (str): output PNG.
        reference (str): the row the others are correlated with.

    Returns:
        dict[str, dict[str, float]]: Pearson correlation of each row's max-activation map with
        the reference row's, per level (NaN where a map is constant, e.g. a level of one cell).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, levels = list(rows), list(levels)
    if not names or not levels:
        raise ValueError(
            f"draw_fpn_activations: nothing to draw ({len(names)} rows, levels {levels}); give "
            "at least one model's FPN dict and one level, e.g. levels=['p3', 'p4']"
        )
    if reference not in rows:
        raise ValueError(f"draw_fpn_activations: reference row {reference!r} is not in {names}")
    missing = {n: [lvl for lvl in levels if lvl not in rows[n]] for n in names}
    missing = {n: m for n, m in missing.items() if m}
    if missing:
        raise ValueError(
            f"draw_fpn_activations: levels {missing} (row: levels) are not in those rows' FPN "
            f"dicts (the first row has {sorted(rows[names[0]])})"
        )
    fig, axes = plt.subplots(
        len(names),
        len(levels) + 1,
        figsize=(2.2 * (len(levels) + 1), 2.2 * len(names)),
        squeeze=False,  # (rows, columns) for one row or one level too
    )
    corr = {}
    for r, name in enumerate(names):
        axes[r, 0].imshow(image)
        axes[r, 0].set_ylabel(name, fontsize=9)
        corr[name] = {}
        for c, lvl in enumerate(levels):
            m = max_activation(rows[name][lvl])
            corr[name][lvl] = _pearson(m, max_activation(rows[reference][lvl]))
            ax = axes[r, c + 1]
            ax.imshow(m, cmap="jet", vmin=0, vmax=1)
            r_text = _r_text(corr[name][lvl])
            title = lvl if name == reference else f"{lvl}  r={r_text}"
            ax.set_title(title, fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return corr


def draw_boxes(
    image: np.ndarray,
    boxes: np.ndarray,
    colors: Sequence[str],
    path: str,
    *,
    labels: Optional[Sequence[str]] = None,
    pairs: Optional[List[Tuple[int, int]]] = None,
    gt_boxes: Optional[np.ndarray] = None,
    title: str = "",
    legend: Optional[Dict[str, str]] = None,
) -> None:
    """
    Draw boxes on an image.

    Args:
        image (ndarray): (H, W, 3) RGB uint8.
        boxes (ndarray): (R, 4) XYXY absolute.
        colors (list[str]): one matplotlib colour per box.
        labels (list[str] or None): text per box.
        pairs (list[(int, int)] or None): draw a line between the centres of these boxes.
        gt_boxes (ndarray or None): (G, 4) ground truth, drawn dashed white.
        legend (dict[str, str] or None): label -> colour.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5 * image.shape[0] / image.shape[1]))
    ax.imshow(image)
    if gt_boxes is not None:
        for x0, y0, x1, y1 in gt_boxes:
            ax.add_patch(
                patches.Rectangle(
                    (x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", ls="--", lw=1.2
                )
            )
    for k, ((x0, y0, x1, y1), col) in enumerate(zip(boxes, colors)):
        ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=col, lw=1.5))
        if labels is not None:
            ax.text(x0, y0, labels[k], color=col, fontsize=6, va="bottom")
    for i, j in pairs or []:
        ci = (boxes[i, :2] + boxes[i, 2:]) / 2
        cj = (boxes[j, :2] + boxes[j, 2:]) / 2
        ax.plot([ci[0], cj[0]], [ci[1], cj[1]], color="yellow", lw=0.8)
    if legend:
        handles = [patches.Patch(color=c, label=n) for n, c in legend.items()]
        ax.legend(handles=handles, fontsize=6, loc="lower right")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _load_image(cfg, index: int):
    """The test set's ``index``-th image (a batch of one) as the config's test mapper makes it, its
    augmentations included (e.g. COCO's ResizeShortestEdge): the image the models see at test
    time. The views draw on this image, in its coordinates. SystemExit with the test set's size
    if there is none."""
    from detectron2.config import instantiate

    cfg.dataloader.test.num_workers = 0
    if "batch_size" in cfg.dataloader.test:  # one image per batch: --index counts images
        cfg.dataloader.test.batch_size = 1
    # Keep the annotations, transformed as the image is, for the GT overlay.
    cfg.dataloader.test.mapper.is_train = True
    loader = instantiate(cfg.dataloader.test)
    k = -1
    for k, inputs in enumerate(loader):
        if k == index:
            return inputs
    raise SystemExit(f"[viz] --index {index}: the config's test set has {k + 1} images (0 to {k})")


def _check_args(args):
    """SystemExit naming the option, before anything loads: a checkpoint file that does not
    exist, an output folder that does not exist, an index or count out of range."""
    for opt in ("teacher", "before", "after", "student"):
        path = getattr(args, opt, None)
        if path and "://" not in path and not os.path.isfile(path):
            raise SystemExit(f"[viz {args.view}] --{opt}: no checkpoint file {path}")
    folder = os.path.dirname(args.out)
    if folder and not os.path.isdir(folder):
        raise SystemExit(f"[viz {args.view}] --out {args.out}: the folder {folder} does not exist")
    if args.index < 0:
        raise SystemExit(f"[viz {args.view}] --index {args.index}: an image index is 0 or more")
    if getattr(args, "top", 1) < 1:
        raise SystemExit(f"[viz {args.view}] --top {args.top}: draw at least 1 pair")


def _kd_config(args):
    """The distillation config of ``args.config``; SystemExit with the reason if it is none."""
    from detectron2.config import LazyConfig

    from .config_checks import check_override_keys
    from .demo import REPO

    if not os.path.isfile(args.config) and os.path.isfile(os.path.join(REPO, args.config)):
        args.config = os.path.join(REPO, args.config)  # configs/... from outside the repository
    if not os.path.isfile(args.config):
        raise SystemExit(
            f"[viz {args.view}] config not found: {args.config} (neither here nor under {REPO})"
        )
    cfg = LazyConfig.load(args.config)
    opts = list(getattr(args, "opts", None) or [])
    if opts:  # the run's overrides: the model (levels, widths) and test data it trained with
        try:
            check_override_keys(cfg, opts)
        except (KeyError, ValueError) as e:
            raise SystemExit(f"[viz {args.view}] {e.args[0]}") from e
        cfg = LazyConfig.apply_overrides(cfg, opts)
    model = cfg.get("model")
    if model is None or "teacher" not in model or "student" not in model:
        raise SystemExit(
            f"[viz {args.view}] {args.config} is not a distillation config (its model has no "
            "teacher and student); pass a DistillationDetector config, "
            f"e.g. configs/demo/{args.view}_*.py"
        )
    return cfg


def _distiller(model, cls_name: str, args):
    """The ``cls_name`` distiller of ``model``; SystemExit naming the config's distillers if
    none."""
    found = [d for d in model.distillers.values() if type(d).__name__ == cls_name]
    if not found:
        have = {k: type(d).__name__ for k, d in model.distillers.items()}
        raise SystemExit(
            f"[viz {args.view}] {args.config} has no {cls_name} (its distillers: {have}); pass a "
            f"config that distils with it, e.g. configs/demo/{args.view}_*.py"
        )
    return found[0]


def _pkd_view(args):
    from detectron2.config import instantiate

    from .checkpoint import load_student
    from .losses import pair_fpn_levels

    cfg = _kd_config(args)
    # The teacher and the student trained alone in the config's DistillationDetector: its
    # input-format check and channel orders, and its teacher input (teacher_images).
    model, _ = _kd_model(cfg, args.teacher, args.before)
    after = instantiate(cfg.model.student).eval()
    load_student(after, args.after, strict=True)  # a picture of a half-loaded student misleads
    models = {"teacher": model.teacher, "student alone": model.student, "student + KD": after}
    inputs = _load_image(cfg, args.index)
    # The level pairs the config's PKD distiller distils (its pair_by, num_levels, ...), else
    # levels paired by stride as PKD pairs them by default; finest first, named by the
    # student's levels: a backbone may name its own (s8, s16, ... with an FPN teacher's p3..).
    shapes = {name: m.backbone.output_shape() for name, m in models.items()}
    s_shapes, t_shapes = shapes["student alone"], shapes["teacher"]
    try:
        pairs = dict(pair_fpn_levels(s_shapes, t_shapes))
    except ValueError as e:  # no stride in common, or a level without a stride
        raise SystemExit(f"[viz pkd] {e}") from None
    default = list(pairs)[:4]
    pkd = [d for d in model.distillers.values() if type(d).__name__ == "PKDDistiller"]
    if pkd:
        pairs.update(pkd[0].pairs)
        default = [s for s, _ in pkd[0].pairs]
    common = sorted(pairs, key=lambda k: s_shapes[k].stride)
    levels = args.levels or default
    if not set(levels) <= set(common):
        raise SystemExit(
            f"[viz pkd] --levels {' '.join(levels)}: the levels both models have are {common} "
            "(the student's levels of a stride the teacher has, or that the PKDDistiller pairs)"
        )
    rows = {}
    h, w = inputs[0]["image"].shape[-2:]
    with torch.no_grad():
        for name, m in models.items():
            # Each model's input as in training: the teacher's from teacher_images (its channel
            # order and normalisation, padded as the student pads its own), each student's its
            # own preprocessing.
            if name == "teacher":
                images = model.teacher_images(inputs)
            else:
                images = m.preprocess_image(inputs)
            feats = m.backbone(images.tensor)
            # Each map cropped to the image (the padding to the size divisibility is no part of
            # the picture in the first column): cells covering the image, ceil(side / stride).
            rows[name] = {}
            for k in levels:
                stride = s_shapes[k].stride
                if name == "teacher":
                    v = feats[pairs[k]]
                    if t_shapes[pairs[k]].stride != stride:
                        # paired by index: the whole padded map resized onto the student's map of
                        # the same padded input (as PKD pairs them in training), then cropped:
                        # cropping first would stretch another part of the image over the cells
                        hp, wp = images.tensor.shape[-2:]
                        v = F.interpolate(
                            v,
                            size=(-(-hp // stride), -(-wp // stride)),
                            mode="bilinear",
                            align_corners=False,
                        )
                    rows[name][k] = v[0, :, : -(-h // stride), : -(-w // stride)]
                else:
                    rows[name][k] = feats[k][0, :, : -(-h // stride), : -(-w // stride)]
    img = _rgb(cfg, model, inputs)
    corr = draw_fpn_activations(np.ascontiguousarray(img), rows, levels, args.out)
    shown = {
        name: ", ".join(f"{lvl} {_r_text(r)}" for lvl, r in per_level.items())
        for name, per_level in corr.items()
    }
    print(f"wrote {args.out}; Pearson r with the teacher's maps: {shown}")


def _kd_model(cfg, teacher_ckpt, student_ckpt, args=None, distiller=None):
    """The config's DistillationDetector in eval mode, the test loader's channel order checked
    as in evaluation (check_input_format), the weights loaded, and its ``distiller`` (a class
    name; None: none is looked up) as ``(model, distiller or None)``. A config without that
    distiller is refused first: checkpoints of the view's models do not fit another config's, and
    the error would name the checkpoint, not the config."""
    from detectron2.config import instantiate

    from .checkpoint import load_student, load_teacher
    from .config_checks import check_input_format

    model = instantiate(cfg.model)
    found = _distiller(model, distiller, args) if distiller is not None else None
    check_input_format(cfg, model, splits=("test",))
    load_teacher(model.teacher, teacher_ckpt)
    load_student(model.student, student_ckpt, strict=True)  # every student weight, or an error
    return model.eval(), found


def _rgb(cfg, model, inputs):
    """The loader's image as RGB. Its channel order: the test mapper's ``image_format``, else the
    one the DistillationDetector assumes (the student's, or for a student without one, e.g.
    detectron2's FCOS, the teacher's), else detectron2's default BGR."""
    from omegaconf import OmegaConf

    from .distiller import _input_format

    fmt = (
        OmegaConf.select(cfg, "dataloader.test.mapper.image_format", default=None)
        or model.student_format
        or _input_format(model.teacher)
        or "BGR"
    )
    img = inputs[0]["image"].permute(1, 2, 0).numpy()
    return np.ascontiguousarray(img if fmt == "RGB" else img[:, :, ::-1])


def _gid_view(args):
    """Selected general instances, coloured by their IoU with the ground truth."""
    from detectron2.structures import pairwise_iou

    from .capture import FeatureCapture
    from .distiller import run_teacher
    from .losses.gid import dense_outputs

    cfg = _kd_config(args)
    model, gid = _kd_model(cfg, args.teacher, args.student, args, "GIDDistiller")
    inputs = _load_image(cfg, args.index)
    # clone: RetinaNet inference applies sigmoid_ in place to a view of the head logits.
    cap = FeatureCapture(model.student, gid.student_taps(model.student), clone=True)
    images = model.teacher_images(inputs)
    with torch.no_grad():
        run_teacher(model.teacher, images, model._teacher_capture)
        with cap:
            model.student(inputs)
    # The distiller's own selection (as GIDDistiller.forward): per anchor or per location
    # (different heads), with all its settings (pre-NMS top-k, shared decoding).
    decode = not gid.shared_decoding
    t_out = dense_outputs(model.teacher, model._teacher_capture.as_dict(), decode)
    s_out = dense_outputs(model.student, cap.as_dict(), decode)
    ((boxes, scores),) = gid._select(s_out, t_out, images.image_sizes)
    # Boxes, GT and picture in the coordinates of the image the models ran on (_load_image).
    gt = inputs[0]["instances"].gt_boxes if "instances" in inputs[0] else None
    colors = {"positive (IoU>=0.5)": "lime", "semi-positive": "orange", "negative (IoU<0.1)": "red"}
    names = list(colors)
    cols = []
    iou = (
        pairwise_iou(boxes, gt).amax(dim=1)
        if gt is not None and len(gt) and len(boxes)
        else torch.zeros(len(boxes))
    )
    for v in iou.tolist():
        cols.append(colors[names[0] if v >= 0.5 else names[1] if v >= 0.1 else names[2]])
    image = _rgb(cfg, model, inputs)
    draw_boxes(
        image,
        boxes.tensor.numpy(),
        cols,
        args.out,
        labels=[f"{x:.2f}" for x in scores.tolist()],
        gt_boxes=gt.tensor.numpy() if gt is not None else None,
        title=f"GID: {len(boxes)} general instances (label = GI score); dashed = GT",
        legend=colors,
    )
    print(f"wrote {args.out}: {len(boxes)} GIs, IoU with GT {[round(v, 2) for v in iou.tolist()]}")


def _d3etr_view(args):
    """Matched teacher (blue) / student (red) boxes of one decoder layer, lines between pairs."""
    from torchvision.ops import box_convert

    from .capture import FeatureCapture
    from .distiller import run_teacher

    cfg = _kd_config(args)
    model, d3 = _kd_model(cfg, args.teacher, args.student, args, "D3ETRDistiller")
    inputs = _load_image(cfg, args.index)
    # As in training: the teacher sees the images in its own channel order and normalisation,
    # padded as the student pads them (teacher_images); the student its own inputs.
    t_cap, s_cap = FeatureCapture(model.teacher, ["head"]), FeatureCapture(model.student, ["head"])
    with torch.no_grad():
        run_teacher(model.teacher, model.teacher_images(inputs), t_cap)
        with s_cap:
            model.student(inputs)
    t, s = t_cap["head"], s_cap["head"]
    layers = t["pred_logits"].shape[0]
    if not -layers <= args.layer < layers:
        raise SystemExit(
            f"[viz d3etr] --layer {args.layer}: the teacher's decoder has {layers} layers "
            f"(0 to {layers - 1}, or -{layers} to -1 from the last)"
        )
    l = args.layer % layers  # -1 = the last layer
    ti, si, _ = d3._match(
        t["pred_logits"][l : l + 1],
        t["pred_boxes"][l : l + 1],
        s["pred_logits"][l : l + 1],
        s["pred_boxes"][l : l + 1],
    )
    pairs = torch.stack([ti[0, 0], si[0, 0]], 1).cpu()  # (P, 2) of image 0
    conf = t["pred_logits"][l, 0].sigmoid().amax(-1)[pairs[:, 0]]
    top = pairs[conf.argsort(descending=True)[: args.top].numpy()]
    h, w = inputs[0]["image"].shape[-2:]
    scale = torch.tensor([w, h, w, h])
    tb = box_convert(t["pred_boxes"][l, 0][top[:, 0]], "cxcywh", "xyxy") * scale
    sb = box_convert(s["pred_boxes"][l, 0][top[:, 1]], "cxcywh", "xyxy") * scale
    boxes = torch.cat([tb, sb]).numpy()
    k = len(top)
    gt = inputs[0].get("instances")
    image = _rgb(cfg, model, inputs)
    draw_boxes(
        image,
        boxes,
        ["deepskyblue"] * k + ["red"] * k,
        args.out,
        pairs=[(i, i + k) for i in range(k)],
        gt_boxes=gt.gt_boxes.tensor.numpy() if gt is not None else None,
        title=f"D3ETR layer {l}: top-{k} teacher queries and matched student queries",
        legend={"teacher": "deepskyblue", "student (matched)": "red"},
    )
    print(f"wrote {args.out}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="view", required=True)
    p = sub.add_parser("pkd", help="FPN max-activation maps: teacher vs student before/after")
    p.add_argument("--config", required=True, help="a distillation config (model.student/teacher)")
    p.add_argument("--teacher", required=True)
    p.add_argument("--before", required=True, help="the student trained alone")
    p.add_argument("--after", required=True, help="the distilled student")
    p.add_argument("--index", type=int, default=0, help="test image index")
    p.add_argument(
        "--levels",
        nargs="*",
        help="the student's levels to draw, each beside the "
        "teacher's it is paired with (default: the pairs of the config's PKDDistiller, "
        "else the 4 finest levels of a stride both models have)",
    )
    p.add_argument("--out", default="pkd_fpn.png")
    g = sub.add_parser("gid", help="selected general instances on an image")
    g.add_argument("--config", required=True, help="a config with a GIDDistiller")
    g.add_argument("--teacher", required=True)
    g.add_argument("--student", required=True)
    g.add_argument("--index", type=int, default=0)
    g.add_argument("--out", default="gid_instances.png")
    d = sub.add_parser("d3etr", help="matched teacher/student boxes of a decoder layer")
    d.add_argument("--config", required=True, help="a config with a D3ETRDistiller")
    d.add_argument("--teacher", required=True)
    d.add_argument("--student", required=True)
    d.add_argument("--index", type=int, default=0)
    d.add_argument("--layer", type=int, default=-1, help="decoder layer (-1: the last)")
    d.add_argument("--top", type=int, default=8, help="the most confident teacher queries drawn")
    d.add_argument("--out", default="d3etr_matches.png")
    for sp in (p, g, d):
        sp.add_argument(
            "opts",
            nargs="*",
            help="key=value overrides of the config, as the run was "
            "trained with (last, after --)",
        )
    args = parser.parse_args(argv)
    _check_args(args)
    {"pkd": _pkd_view, "gid": _gid_view, "d3etr": _d3etr_view}[args.view](args)


if __name__ == "__main__":
    main()
