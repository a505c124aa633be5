"""
A detector from a detectron2 yacs ``.yaml`` config, as a LazyConfig node.

Most trained detectron2 models come with a yacs config: the model zoo's
``COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml`` and the ``config.yaml`` that
``DefaultTrainer`` writes next to a researcher's own teacher. :func:`build_yacs_detector` builds
the model such a file describes (``detectron2.modeling.build_model``), so that it can be the
teacher or the student of a DetKD config without writing its architecture again::

    from detectron2 import model_zoo
    from detectron2.config import LazyCall as L
    from detkd.modeling import build_yacs_detector

    zoo_id = "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml"
    model.teacher = L(build_yacs_detector)(config_file=zoo_id)
    train.teacher_checkpoint = model_zoo.get_checkpoint_url(zoo_id)

The arguments are strings, so the node is saved in the run's ``config.yaml`` like any other.
"""

import logging
import os
from typing import Optional, Sequence, Union

from detectron2 import model_zoo
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.utils.file_io import PathManager
from detectron2.utils.registry import locate

from omegaconf import OmegaConf

from ..utils import without_file_scheme

__all__ = ["build_yacs_detector", "load_yacs_config"]

logger = logging.getLogger(__name__)


def load_yacs_config(
    config_file: str,
    opts: Optional[Sequence[str]] = None,
    add_config: Union[str, Sequence[str]] = (),
) -> CfgNode:
    """
    The yacs config of a ``.yaml`` file: detectron2's defaults (``get_cfg``), the keys the
    ``add_config`` functions add, the file (with its ``_BASE_`` chain), then ``opts``.

    Args:
        config_file (str): a ``.yaml`` path (local, or anything detectron2's PathManager opens),
            or a model-zoo config name such as ``"COCO-Detection/retinanet_R_101_FPN_3x.yaml"``
            (``detectron2.model_zoo.get_config_file``).
        opts (list[str] or None): ``["KEY", value, "KEY", value, ...]`` as ``merge_from_list``.
        add_config (str or list[str]): import paths of functions ``f(cfg)`` that add a project's
            keys before the file is read, e.g.
            ``"detectron2.projects.point_rend.add_pointrend_config"``.

    Returns:
        CfgNode
    """
    # a local file, as DetKD's checkpoint paths take it
    path = without_file_scheme(str(config_file))
    if path.endswith(".py"):
        raise ValueError(
            f"build_yacs_detector reads yacs .yaml configs; {path} is a LazyConfig: use its model "
            f"node directly (detectron2.model_zoo.get_config({path!r}).model or LazyConfig.load)"
        )
    try:
        exists = PathManager.isfile(path)
    except NotImplementedError:
        # a handler that cannot tell (http URLs), which detectron2's merge_from_file asks: read
        # its local copy (downloaded and cached; a relative _BASE_ is looked up beside it)
        path, exists = PathManager.get_local_path(path), True
    if not exists:
        try:
            path = model_zoo.get_config_file(path)
        except RuntimeError:
            raise FileNotFoundError(
                f"build_yacs_detector: {config_file!r} is neither a file nor a config of "
                "detectron2's model zoo (e.g. 'COCO-Detection/retinanet_R_101_FPN_3x.yaml'); give "
                "the .yaml's path (relative paths start from the working directory, "
                f"{os.getcwd()}: the repository root in the train_net.py runs of detkd.demo and "
                "detkd.repro)"
            ) from None
    cfg = get_cfg()
    if isinstance(add_config, str):  # one function: not its characters
        add_config = [add_config]
    for name in add_config:
        fn = locate(name)
        if fn is None:
            raise ImportError(f"build_yacs_detector: cannot import add_config function {name!r}")
        fn(cfg)
    hint = (
        "A project's own keys need its add_config function "
        "(add_config=['module.add_xxx_config'])"
    )
    try:
        cfg.merge_from_file(path)
    except (KeyError, AssertionError) as e:
        # yacs: "Non-existent config key: ..." (KeyError); a LazyConfig's objects, e.g. the
        # ShapeSpec of an R-CNN's box_head.input_shape, fail its value-type assertion first
        lazy = CfgNode.load_yaml_with_base(path, allow_unsafe=True)
        if isinstance(lazy, dict) and "model" in lazy and "MODEL" not in lazy:
            raise ValueError(
                f"{path} is a LazyConfig (e.g. the config.yaml of a DetKD or LazyConfig run), "
                "not a yacs config: use its model node, LazyConfig.load(path).model"
            ) from e
        if not isinstance(e, KeyError):
            raise
        raise KeyError(f"{path}: {e.args[0] if e.args else e}. {hint}") from e
    # A LazyConfig node's lists reach here as omegaconf ListConfigs (instantiate, overrides):
    # yacs takes only plain values (a ListConfig value, e.g. MODEL.PIXEL_MEAN's, is a type
    # mismatch).
    opts = [OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for v in (opts or [])]
    if len(opts) % 2:
        raise ValueError(
            f"build_yacs_detector: opts must be KEY, value pairs; got {len(opts)} items: {opts}"
        )
    try:
        cfg.merge_from_list(opts)
    except (KeyError, AssertionError) as e:  # yacs asserts: "Non-existent key: ..."
        raise KeyError(f"opts of {path}: {e.args[0] if e.args else e}. {hint}") from e
    return cfg


def build_yacs_detector(
    config_file: str,
    opts: Optional[Sequence[str]] = None,
    add_config: Union[str, Sequence[str]] = (),
):
    """
    The detector a yacs config describes, built by ``detectron2.modeling.build_model`` with
    random weights, on the CPU (the trainer moves the whole model to ``train.device``).

    Weights are not loaded here: ``MODEL.WEIGHTS`` of the file is ignored, as DetKD loads the
    teacher from ``train.teacher_checkpoint`` and the student from ``train.init_checkpoint``.
    Everything else the file sets stays the model's: input format (``INPUT.FORMAT``), pixel
    mean/std, anchors, class count, test-time thresholds.

    Args:
        config_file, opts, add_config: see :func:`load_yacs_config`.

    Returns:
        nn.Module: e.g. a GeneralizedRCNN or RetinaNet, in training mode.
    """
    cfg = load_yacs_config(config_file, opts, add_config)
    if cfg.MODEL.WEIGHTS:
        logger.info(
            f"build_yacs_detector({config_file!r}): MODEL.WEIGHTS={cfg.MODEL.WEIGHTS} is not "
            "loaded; the weights come from train.teacher_checkpoint / train.init_checkpoint"
        )
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch not in META_ARCH_REGISTRY:
        fcos = (
            " detectron2's FCOS has no yacs config, only a LazyConfig: use "
            "model_zoo.get_config('common/models/fcos.py').model (or DetKD's "
            "configs/common/twins.py)."
            if arch == "FCOS"
            else ""
        )
        raise KeyError(
            f"build_yacs_detector({config_file!r}): MODEL.META_ARCHITECTURE {arch!r} is not a "
            f"registered meta-architecture ({', '.join(sorted(k for k, _ in META_ARCH_REGISTRY))})"
            ". "
            "A project's own registers when its module is imported: name a function of that module "
            f"in add_config.{fcos}"
        )
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg)
