"""
Stages of a narrow ResNet (BasicBlock, ResNet-18/34 layout with a chosen width), for the CPU
demo and the tests. detectron2's :meth:`ResNet.make_default_stages` fixes the widths
(64-512); this keeps its block and stage code and only scales the channels.
"""

from typing import List

from detectron2.modeling.backbone.resnet import BasicBlock, ResNet

__all__ = ["basic_resnet_stages"]

_BLOCKS = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


def basic_resnet_stages(depth: int = 18, width: int = 64, norm: str = "BN") -> List[list]:
    """
    Args:
        depth (int): 10, 18 or 34.
        width (int): channels of res2; res3/res4/res5 have 2x/4x/8x. ``width=64`` is the
            standard ResNet-18/34 (then identical to ``ResNet.make_default_stages``).
        norm (str): detectron2 norm name ("BN", "SyncBN", "FrozenBN", "GN").

    Returns:
        list[list[CNNBlockBase]]: stages res2..res5 for :class:`ResNet` (``stages=``); the stem
        must output ``width`` channels.
    """
    if depth not in _BLOCKS:
        raise ValueError(f"basic_resnet_stages supports depth {sorted(_BLOCKS)}, got {depth}")
    stages, in_ch = [], width
    for i, n in enumerate(_BLOCKS[depth]):
        out_ch = width * 2**i
        stages.append(
            ResNet.make_stage(
                BasicBlock,
                n,
                stride_per_block=[1 if i == 0 else 2] + [1] * (n - 1),
                in_channels=in_ch,
                out_channels=out_ch,
                norm=norm,
            )
        )
        in_ch = out_ch
    return stages
