"""Models: the timm DINOv3 backbone, task-conditioned MoE, task heads and M2DINO."""

from __future__ import annotations

from taskgroup.models.backbone import build_backbone, freeze_backbone, load_pretrained, read_state_dict
from taskgroup.models.heads import HEADS, build_head, soft_argmax
from taskgroup.models.m2dino import M2DINO, build_model, convert_to_moe
from taskgroup.models.moe import TaskMoE, load_share
from taskgroup.models.predict import decode_outputs

__all__ = [
    "HEADS",
    "M2DINO",
    "TaskMoE",
    "build_backbone",
    "build_head",
    "build_model",
    "convert_to_moe",
    "decode_outputs",
    "freeze_backbone",
    "load_pretrained",
    "load_share",
    "read_state_dict",
    "soft_argmax",
]
