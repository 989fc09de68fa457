"""Models: the timm DINOv3 backbone, task-conditioned MoE, task heads and M2DINO."""

from __future__ import annotations

from taskgroup.models.backbone import build_backbone, freeze_backbone, load_pretrained, read_state_dict
from taskgroup.models.heads import HEADS, build_head, soft_argmax
from taskgroup.models.m2dino import M2DINO, build_model, convert_to_moe
from taskgroup.models.moe import TaskMoE, load_share


def __getattr__(name: str):
    """``decode_outputs`` moved to :mod:`taskgroup.kinds` (decoding is per task kind and makes
    submission records, which models do not know); this alias keeps the old import working."""
    if name == "decode_outputs":
        from taskgroup.kinds import decode_outputs

        return decode_outputs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HEADS",
    "M2DINO",
    "TaskMoE",
    "build_backbone",
    "build_head",
    "build_model",
    "convert_to_moe",
    "freeze_backbone",
    "load_pretrained",
    "load_share",
    "read_state_dict",
    "soft_argmax",
]
